//! Presence: this instance's connected POS terminals and its heartbeat, written to the database
//! in one batch per interval, so that every instance (admin API, status page, undelivered-order
//! alert) sees all of them; rows of instances whose heartbeat stopped expire.
//!
//! The socket tasks never touch the database: they update atomics on their [`Connection`]; the
//! flush loop collects what changed every `Tuning::presence_interval` ([`crate::config::PRESENCE_INTERVAL`]) and writes it in one transaction.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::activity::Activity;
pub use crate::db::presence::{InstanceStats, STALE_AFTER};

use crate::db::{self, DbError};
use crate::listener::ListenerHealth;
use crate::metrics::Metrics;

/// Any presence query slower than this is abandoned; the next flush rewrites everything.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// A value meaning "none yet" in the atomics (event ids are >= 0).
const NONE: i64 = -1;

/// Who this process is, as other instances and the admin API see it.
#[derive(Debug, Clone)]
pub struct InstanceInfo {
    /// Random per process (12 hex digits).
    pub id: String,
    /// The machine's host name.
    pub hostname: String,
    /// This process's id.
    pub pid: u32,
    /// The address it serves HTTP and WebSocket on.
    pub listen: String,
    /// The orderpush version.
    pub version: &'static str,
    /// When it started.
    pub started_at: SystemTime,
}

impl InstanceInfo {
    /// Describes this process, serving on `listen`.
    pub fn current(listen: SocketAddr) -> Self {
        let mut buf = [0u8; 6];
        // Without randomness, fall back to time and pid: unique enough for a process id.
        let id = if getrandom::fill(&mut buf).is_ok() {
            buf.iter().map(|b| format!("{b:02x}")).collect()
        } else {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            format!(
                "{:012x}",
                (nanos ^ u128::from(std::process::id())) & 0xffff_ffff_ffff
            )
        };
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown".into());
        Self {
            id,
            hostname,
            pid: std::process::id(),
            listen: listen.to_string(),
            version: env!("CARGO_PKG_VERSION"),
            started_at: SystemTime::now(),
        }
    }
}

/// One connected terminal, shared between its socket task (which updates it) and the flush.
#[derive(Debug)]
pub struct Connection {
    id: u64,
    tenant: Arc<str>,
    key_id: Arc<str>,
    peer: SocketAddr,
    connected_at: SystemTime,
    since: i64,
    last_delivered: AtomicI64,
    last_acked: AtomicI64,
    dirty: AtomicBool,
}

impl Connection {
    /// Records that event `id` was written to the socket.
    pub fn delivered(&self, id: i64) {
        self.last_delivered.store(id, Ordering::Relaxed);
        self.dirty.store(true, Ordering::Release);
    }

    /// Records a POS's `{"type":"ack","id":N}`. Acks only move forward and only up to what the
    /// POS can have seen (the last id delivered on this connection, or its `since`); anything
    /// else is a client bug and is ignored. Returns whether it was recorded.
    pub fn acked(&self, id: i64) -> bool {
        let seen = self.last_delivered.load(Ordering::Relaxed).max(self.since);
        if id < 0 || id > seen {
            return false;
        }
        let previous = self.last_acked.fetch_max(id, Ordering::Relaxed);
        if id > previous {
            self.dirty.store(true, Ordering::Release);
        }
        true
    }

    /// The last id delivered on this connection, if any.
    pub fn last_delivered(&self) -> Option<i64> {
        some(self.last_delivered.load(Ordering::Relaxed))
    }

    /// The last id this POS acknowledged, if any.
    pub fn last_acked(&self) -> Option<i64> {
        some(self.last_acked.load(Ordering::Relaxed))
    }

    /// Its row in the database, as of now.
    fn as_terminal(&self) -> db::presence::Terminal<'_> {
        db::presence::Terminal {
            conn_id: self.id,
            tenant: &self.tenant,
            key_id: &self.key_id,
            peer: self.peer,
            connected_at: self.connected_at,
            last_delivered: self.last_delivered(),
            last_acked: self.last_acked(),
        }
    }
}

fn some(v: i64) -> Option<i64> {
    (v != NONE).then_some(v)
}

/// A registered connection; dropping it unregisters it.
#[derive(Debug)]
pub struct Registration {
    presence: Arc<Presence>,
    conn: Arc<Connection>,
}

impl std::ops::Deref for Registration {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut local = self.presence.lock_local();
        local.live.remove(&self.conn.id);
        // A full rewrite is pending anyway (and during a database outage this list would only
        // grow): remembering the id is needed only for an incremental flush.
        if !local.full_resync {
            local.removed.push(self.conn.id);
        }
    }
}

#[derive(Debug, Default)]
struct Local {
    live: HashMap<u64, Arc<Connection>>,
    /// Closed since the last flush (bounded by connections closed per interval: cleared when
    /// a flush takes it or fails).
    removed: Vec<u64>,
    /// The database may not match memory (first flush, or a failed one): rewrite every row.
    full_resync: bool,
}

/// What the last successful flush learnt about the other instances.
#[derive(Debug, Default)]
struct ClusterView {
    synced_at: Option<Instant>,
    /// Ids of live instances, this one included, sorted.
    instances: Vec<String>,
    /// Tenants with a terminal connected to another live instance.
    elsewhere: HashSet<Arc<str>>,
}

/// This instance's presence registry.
#[derive(Debug)]
pub struct Presence {
    info: InstanceInfo,
    next_conn: AtomicU64,
    local: Mutex<Local>,
    view: Mutex<ClusterView>,
}

impl Presence {
    /// An empty registry for this instance.
    pub fn new(info: InstanceInfo) -> Arc<Self> {
        Arc::new(Self {
            info,
            next_conn: AtomicU64::new(1),
            local: Mutex::new(Local {
                full_resync: true,
                ..Local::default()
            }),
            view: Mutex::default(),
        })
    }

    /// Who this instance is.
    pub fn info(&self) -> &InstanceInfo {
        &self.info
    }

    /// Registers a connected terminal (`since`: the id it resumed from, if any).
    pub fn register(
        self: &Arc<Self>,
        tenant: &Arc<str>,
        key_id: &str,
        peer: SocketAddr,
        since: Option<i64>,
    ) -> Registration {
        let conn = Arc::new(Connection {
            id: self.next_conn.fetch_add(1, Ordering::Relaxed),
            tenant: Arc::clone(tenant),
            key_id: Arc::from(key_id),
            peer,
            connected_at: SystemTime::now(),
            since: since.unwrap_or(NONE),
            last_delivered: AtomicI64::new(NONE),
            last_acked: AtomicI64::new(NONE),
            dirty: AtomicBool::new(true),
        });
        self.lock_local().live.insert(conn.id, Arc::clone(&conn));
        Registration {
            presence: Arc::clone(self),
            conn,
        }
    }

    /// Whether a terminal of `tenant` is connected to another live instance, as of the last
    /// flush; `None` when that view is missing or older than [`STALE_AFTER`] (database trouble).
    pub fn connected_elsewhere(&self, tenant: &str) -> Option<bool> {
        let view = self.lock_view();
        let fresh = view.synced_at.is_some_and(|t| t.elapsed() < STALE_AFTER);
        fresh.then(|| view.elsewhere.contains(tenant))
    }

    /// Whether this instance reports cluster-wide conditions (the undelivered alert and its
    /// metric), so that N instances do not report one event N times: the live instance with the
    /// smallest id does. Without a fresh view every instance reports for itself.
    pub fn is_reporter(&self) -> bool {
        let view = self.lock_view();
        let fresh = view.synced_at.is_some_and(|t| t.elapsed() < STALE_AFTER);
        !fresh
            || view
                .instances
                .first()
                .is_none_or(|first| *first >= self.info.id)
    }

    /// Time since the last successful flush (a round trip to the database on presence's own
    /// connection); `None` before the first.
    pub fn last_flush_age(&self) -> Option<Duration> {
        self.lock_view().synced_at.map(|t| t.elapsed())
    }

    /// Live instances seen at the last flush (0 before the first).
    pub fn live_instances(&self) -> usize {
        self.lock_view().instances.len()
    }

    /// Connections open on this instance.
    pub fn local_connections(&self) -> usize {
        self.lock_local().live.len()
    }

    /// Writes the heartbeat, this instance's connection changes and its stats in one
    /// transaction, expires dead instances, then refreshes the cluster view. On failure the
    /// next flush rewrites every row.
    pub async fn flush(
        &self,
        client: &mut tokio_postgres::Client,
        stats: &InstanceStats,
    ) -> Result<FlushReport, DbError> {
        let result = tokio::time::timeout(QUERY_TIMEOUT, self.try_flush(client, stats)).await;
        let result = match result {
            Ok(r) => r,
            Err(_) => Err(DbError::Timeout),
        };
        if result.is_err() {
            self.need_full_resync();
        }
        result
    }

    /// The database may no longer match memory: the next flush rewrites every row.
    pub fn need_full_resync(&self) {
        let mut local = self.lock_local();
        local.full_resync = true;
        local.removed = Vec::new();
    }

    async fn try_flush(
        &self,
        client: &mut tokio_postgres::Client,
        stats: &InstanceStats,
    ) -> Result<FlushReport, DbError> {
        let (mut full, mut removed, mut changed) = self.take_changes(false);
        let tx = client.transaction().await?;
        let instance = db::presence::Instance {
            id: &self.info.id,
            hostname: &self.info.hostname,
            pid: self.info.pid,
            listen: &self.info.listen,
            version: self.info.version,
            started_at: self.info.started_at,
        };
        let inserted = db::presence::heartbeat(&tx, &instance, stats).await?;
        if inserted && !full {
            // Our row was gone (expired by another instance after a long stall, or the database
            // failed over and the unlogged tables came back empty): rewrite everything.
            warn!("presence: this instance's rows had disappeared; re-registering");
            (full, removed, changed) = self.take_changes(true);
        }
        if full {
            db::presence::clear_terminals(&tx, &self.info.id).await?;
        } else if !removed.is_empty() {
            db::presence::remove_terminals(&tx, &self.info.id, &removed).await?;
        }
        if !changed.is_empty() {
            let terminals: Vec<db::presence::Terminal<'_>> =
                changed.iter().map(|c| c.as_terminal()).collect();
            db::presence::upsert_terminals(&tx, &self.info.id, &terminals).await?;
        }
        let expired = db::presence::expire_instances(&tx, &self.info.id).await?;
        tx.commit().await?;
        if expired > 0 {
            info!(
                expired,
                "presence: removed instances whose heartbeat stopped"
            );
        }

        let instances = db::presence::live_instance_ids(&*client).await?;
        let elsewhere = db::presence::tenants_connected_elsewhere(&*client, &self.info.id).await?;
        let report = FlushReport {
            written: changed.len(),
            removed: if full { 0 } else { removed.len() },
            expired_instances: expired,
            live_instances: instances.len(),
        };
        *self.lock_view() = ClusterView {
            synced_at: Some(Instant::now()),
            instances,
            elsewhere,
        };
        Ok(report)
    }

    /// Takes what must be written: (full rewrite?, closed ids, connections to upsert).
    fn take_changes(&self, force_full: bool) -> (bool, Vec<u64>, Vec<Arc<Connection>>) {
        let mut local = self.lock_local();
        let full = std::mem::take(&mut local.full_resync) || force_full;
        let removed = std::mem::take(&mut local.removed);
        let changed = local
            .live
            .values()
            // swap first: a change made after this point marks it dirty again for next time.
            .filter(|c| c.dirty.swap(false, Ordering::AcqRel) || full)
            .cloned()
            .collect();
        (full, removed, changed)
    }

    /// Deletes this instance's rows (clean shutdown), so others stop counting its terminals at
    /// once instead of after [`STALE_AFTER`].
    pub async fn deregister(&self, client: &tokio_postgres::Client) -> Result<(), DbError> {
        let work = db::presence::deregister(client, &self.info.id);
        match tokio::time::timeout(QUERY_TIMEOUT, work).await {
            Ok(r) => r,
            Err(_) => Err(DbError::Timeout),
        }
    }

    fn lock_local(&self) -> std::sync::MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_view(&self) -> std::sync::MutexGuard<'_, ClusterView> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What one flush wrote, for tests and debug logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushReport {
    /// Connection rows inserted or updated.
    pub written: usize,
    /// Connection rows deleted.
    pub removed: usize,
    /// Dead instances removed.
    pub expired_instances: u64,
    /// Live instances now (this one included).
    pub live_instances: usize,
}

/// Runs the flush every `interval` on a connection of its own (so a busy request pool never
/// delays the heartbeat), until `shutdown`; then deletes this instance's rows.
pub async fn run(
    presence: Arc<Presence>,
    database: tokio_postgres::Config,
    interval: Duration,
    listener: Arc<ListenerHealth>,
    activity: Arc<Activity>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = crate::db::connect(&database, "orderpush-presence")
                .await
                .ok();
        }
        let Some(c) = client.as_mut() else {
            presence.need_full_resync();
            metrics
                .presence_flush_failures
                .fetch_add(1, Ordering::Relaxed);
            if !failing {
                warn!("presence: cannot reach the database; retrying every {interval:?}");
                failing = true;
            }
            continue;
        };
        let stats = InstanceStats {
            listener_up: listener.is_following(),
            listener_mode: listener.mode().map(|m| format!("{m:?}").to_lowercase()),
            listener_read_age_ms: listener.last_read_age().map(|d| d.as_millis() as i64),
            listener_lag_ms: metrics.last_lag().map(|d| d.as_secs_f64() * 1000.0),
            events_per_second: activity.events_per_second(),
        };
        match presence.flush(c, &stats).await {
            Ok(report) => {
                if failing {
                    info!("presence: writing heartbeats again");
                    failing = false;
                }
                debug!(?report, "presence flushed");
            }
            Err(e) => {
                metrics
                    .presence_flush_failures
                    .fetch_add(1, Ordering::Relaxed);
                if !failing {
                    warn!(error = %e, "presence: heartbeat failed; retrying every {interval:?}");
                    failing = true;
                }
                client = None;
            }
        }
    }
    if let Some(c) = client.as_ref() {
        if let Err(e) = presence.deregister(c).await {
            debug!(error = %e, "presence: could not deregister; the rows expire by themselves");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn presence() -> Arc<Presence> {
        Presence::new(InstanceInfo::current("127.0.0.1:9011".parse().unwrap()))
    }

    #[test]
    fn acks_move_forward_and_never_past_what_was_delivered() {
        let p = presence();
        let tenant: Arc<str> = Arc::from("kitchen");
        let c = p.register(&tenant, "k1", "127.0.0.1:1".parse().unwrap(), Some(5));
        assert!(c.acked(5), "the resume point may be acked");
        assert!(!c.acked(6), "nothing past 5 was delivered yet");
        c.delivered(9);
        assert!(c.acked(8));
        assert!(c.acked(3)); // a late ack is accepted but does not move backwards
        assert_eq!(c.last_acked(), Some(8));
        assert!(!c.acked(-1));
    }

    #[test]
    fn changes_are_collected_once_and_closures_remembered() {
        let p = presence();
        let tenant: Arc<str> = Arc::from("kitchen");
        let a = p.register(&tenant, "k1", "127.0.0.1:1".parse().unwrap(), None);
        let b = p.register(&tenant, "k2", "127.0.0.1:2".parse().unwrap(), None);
        let (full, removed, changed) = p.take_changes(false);
        assert!(full, "the first flush rewrites everything");
        assert!(removed.is_empty());
        assert_eq!(changed.len(), 2);
        assert!(p.take_changes(false).2.is_empty(), "nothing changed since");
        a.delivered(1);
        let id_b = b.id;
        drop(b);
        let (full, removed, changed) = p.take_changes(false);
        assert!(!full);
        assert_eq!(removed, vec![id_b]);
        assert_eq!(changed.len(), 1);
        assert_eq!(p.local_connections(), 1);
    }

    #[test]
    fn without_a_fresh_view_every_instance_reports_for_itself() {
        let p = presence();
        assert_eq!(p.connected_elsewhere("kitchen"), None);
        assert!(p.is_reporter());
        *p.lock_view() = ClusterView {
            synced_at: Some(Instant::now()),
            instances: vec!["0".into(), p.info.id.clone()],
            elsewhere: HashSet::from([Arc::from("kitchen")]),
        };
        assert_eq!(p.connected_elsewhere("kitchen"), Some(true));
        assert_eq!(p.connected_elsewhere("bistro"), Some(false));
        assert!(
            !p.is_reporter(),
            "the smallest id (\"0\") reports, not this one"
        );
    }
}
