//! The listener: one dedicated Postgres connection that LISTENs for wake-ups, reads new event
//! rows per tenant (the table is the truth, a notification only a hint) and hands them to the
//! hub in id order. It reconnects with capped backoff and catches up from its cursors, so writes
//! made while it was away are delivered, in order, once.

use std::collections::HashMap;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Notify;
use tokio::time::{MissedTickBehavior, sleep, timeout};
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::activity::Activity;
use crate::db::events::FollowQueries;
use crate::db::{self, DbError};
use crate::event::Event;
use crate::hub::{Frame, Hub};
use crate::metrics::Metrics;
use crate::presence::Presence;

/// The NOTIFY channel the triggers wake us on (migrations/V2).
pub const CHANNEL: &str = "orderpush";
/// First reconnect delay: a killed backend is usually replaceable at once.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Reconnect delay cap: a restarting Postgres is retried every few seconds, no faster.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Any listener query slower than this means a dead or wedged connection: reconnect.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Rows per catch-up read: bounds memory after a long outage; the scan loops until caught up.
const SCAN_LIMIT: i64 = 2_000;
/// Safety-net poll in `notify` mode; it doubles as the half-open-connection probe.
const POLL_NOTIFY: Duration = Duration::from_secs(1);
/// Poll in `gated` mode: bounds the delay of a commit whose wake-up was skipped and which
/// committed after the follow-up read.
const POLL_GATED: Duration = Duration::from_millis(100);
/// Poll in `poll` mode (no NOTIFY at all): the delivery latency a DBA accepts for it.
const POLL_POLL: Duration = Duration::from_millis(10);
/// In `gated` mode, a second read this long after each productive read picks up the concurrent
/// commits that skipped their own NOTIFY (they commit within a WAL flush of the one that
/// notified); the reads continue while they keep finding events.
const FOLLOW_UP: Duration = Duration::from_millis(2);
/// Least time between reads after a read that found one event: enough to let a burst collect.
const PACE_QUIET: Duration = Duration::from_millis(1);
/// Least time between reads after a read that found several: under load, reading once per
/// commit would double the listener's queries for nothing; 2 ms batches a few commits per read
/// at 1,000 orders/s while adding at most 2 ms to delivery (measured: p99 11 ms at 5 ms pacing,
/// the counter table's churn, not the read count, dominates the listener's database CPU).
const PACE_BUSY: Duration = Duration::from_millis(2);
/// How often the listener re-reads the database's `orderpush.wakeup`: a DBA's change takes
/// effect within seconds, for one tiny catalog query.
const MODE_RECHECK: Duration = Duration::from_secs(5);
/// The database-level `orderpush.wakeup` (what new sessions get), or NULL when unset.
const MODE_SQL: &str = "SELECT (SELECT substr(c, length('orderpush.wakeup=') + 1)
       FROM pg_db_role_setting s, unnest(s.setconfig) AS c
       WHERE s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
         AND s.setrole = 0 AND c LIKE 'orderpush.wakeup=%')";
/// /readyz turns 503 when the listener has not completed a read for this long (contract: 10 s).
pub const STALE_AFTER: Duration = Duration::from_secs(8);
/// At most one "no POS connected" warning per tenant per this interval.
const UNDELIVERED_WARN_INTERVAL: Duration = Duration::from_secs(60);

/// How the triggers wake the listener (`ALTER DATABASE ... SET orderpush.wakeup`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeupMode {
    /// Every emitting transaction notifies.
    Notify,
    /// One in-flight transaction at a time notifies; the listener re-reads and polls.
    Gated,
    /// No NOTIFY; the listener polls.
    Poll,
}

impl WakeupMode {
    fn parse(s: Option<&str>) -> Self {
        match s {
            Some("notify") => WakeupMode::Notify,
            Some("poll") => WakeupMode::Poll,
            // The default, as in orderpush.emit(): gated.
            _ => WakeupMode::Gated,
        }
    }

    fn poll_interval(self) -> Duration {
        match self {
            WakeupMode::Notify => POLL_NOTIFY,
            WakeupMode::Gated => POLL_GATED,
            WakeupMode::Poll => POLL_POLL,
        }
    }
}

/// The listener's state as /readyz and the status page see it.
#[derive(Debug)]
pub struct ListenerHealth {
    started: Instant,
    connected: AtomicBool,
    /// Milliseconds since `started` of the last completed read; 0 = never.
    last_read_ms: AtomicU64,
    mode: Mutex<Option<WakeupMode>>,
}

impl Default for ListenerHealth {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            connected: AtomicBool::new(false),
            last_read_ms: AtomicU64::new(0),
            mode: Mutex::new(None),
        }
    }
}

impl ListenerHealth {
    /// True when connected and a read completed within [`STALE_AFTER`].
    pub fn is_following(&self) -> bool {
        let last = self.last_read_ms.load(Ordering::Acquire);
        self.connected.load(Ordering::Acquire)
            && last > 0
            && (self.started.elapsed().as_millis() as u64).saturating_sub(last)
                <= STALE_AFTER.as_millis() as u64
    }

    /// The wake-up mode read at the last connect.
    pub fn mode(&self) -> Option<WakeupMode> {
        *self.mode.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Time since the listener's last completed read (its lag behind the log, at most one poll
    /// interval while healthy); `None` before the first read.
    pub fn last_read_age(&self) -> Option<Duration> {
        let last = self.last_read_ms.load(Ordering::Acquire);
        (last > 0).then(|| {
            Duration::from_millis((self.started.elapsed().as_millis() as u64).saturating_sub(last))
        })
    }

    fn read_completed(&self) {
        let ms = (self.started.elapsed().as_millis() as u64).max(1);
        self.last_read_ms.store(ms, Ordering::Release);
    }
}

/// Follows the event log and feeds the hub.
pub struct Listener {
    config: tokio_postgres::Config,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    health: Arc<ListenerHealth>,
    /// Per tenant, the last id handed to the hub. Kept across reconnects: that is what makes a
    /// reconnect catch up instead of skipping.
    cursors: HashMap<Arc<str>, i64>,
    last_undelivered_warning: HashMap<Arc<str>, Instant>,
    /// Where other instances' terminals are known (the undelivered alert); `None` = only this
    /// instance's sockets count.
    presence: Option<Arc<Presence>>,
    /// The status page's record of recent events.
    activity: Option<Arc<Activity>>,
}

/// Aborts the connection-driver task when the listener lets go of a connection.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Listener {
    /// A listener on its own connection built from `config` (never a pooled one: pooled
    /// connections do not deliver notifications), starting after the given per-tenant ids.
    ///
    /// `start` must be read before the server accepts its first socket: a POS that connects
    /// without `since` is promised every event committed after it connected, and a listener
    /// that picked its starting point later would skip the events in between.
    pub fn new(
        config: &tokio_postgres::Config,
        start: Vec<(String, i64)>,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        health: Arc<ListenerHealth>,
    ) -> Self {
        Self {
            config: db::with_defaults(config, "orderpush-listener"),
            hub,
            metrics,
            health,
            cursors: start
                .into_iter()
                .map(|(t, seq)| (Arc::from(t), seq))
                .collect(),
            last_undelivered_warning: HashMap::new(),
            presence: None,
            activity: None,
        }
    }

    /// Makes the undelivered alert cluster-wide (a terminal on another instance counts, and one
    /// instance reports) and records events for the status page.
    pub fn with_presence(mut self, presence: Arc<Presence>, activity: Arc<Activity>) -> Self {
        self.presence = Some(presence);
        self.activity = Some(activity);
        self
    }

    /// Runs until `shutdown`: connect, LISTEN, catch up, follow; on any failure back off and
    /// start over.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.follow(&shutdown) => r,
            };
            // A connection that got as far as following worked: the next attempt starts from
            // the shortest delay. Only consecutive failures to get there back off further.
            if self.health.connected.swap(false, Ordering::AcqRel) {
                backoff = BACKOFF_MIN;
            }
            self.metrics.listener_up.store(0, Ordering::Relaxed);
            match result {
                Ok(()) => return, // shutdown
                Err(e) => {
                    warn!(error = %e, retry_in = ?backoff, "listener lost its connection; reconnecting")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One connection's life. Returns Ok only on shutdown.
    async fn follow(&mut self, shutdown: &CancellationToken) -> Result<(), DbError> {
        let (client, mut connection) = self.config.connect(NoTls).await?;
        let wake = Arc::new(Notify::new());
        let wake_tx = Arc::clone(&wake);
        // The connection must be polled for notifications to arrive at all; this task does only
        // that, and is aborted with the guard when this function returns.
        let mut driver = AbortOnDrop(tokio::spawn(async move {
            loop {
                match poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(_))) => wake_tx.notify_one(),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        debug!(error = %e, "listener connection failed");
                        return;
                    }
                    None => return,
                }
            }
        }));

        // LISTEN first, then read: a write committed in between is seen by the read, and its
        // wake-up, if any, only causes one extra (empty) read.
        with_timeout(client.batch_execute(&format!("LISTEN {CHANNEL}"))).await?;
        let mode_query = with_timeout(client.prepare(MODE_SQL)).await?;
        let mut mode = WakeupMode::parse(
            with_timeout(client.query_one(&mode_query, &[]))
                .await?
                .get::<_, Option<&str>>(0),
        );
        *self.health.mode.lock().unwrap_or_else(|e| e.into_inner()) = Some(mode);

        let queries = with_timeout(FollowQueries::prepare(&client)).await?;
        self.metrics
            .listener_connects
            .fetch_add(1, Ordering::Relaxed);
        self.scan(&client, &queries).await?;
        self.health.connected.store(true, Ordering::Release);
        self.metrics.listener_up.store(1, Ordering::Relaxed);
        info!(?mode, "listener following the event log");

        let mut poll = tokio::time::interval(mode.poll_interval());
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut recheck = tokio::time::interval(MODE_RECHECK);
        recheck.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The next read, when one is due: a follow-up (gated mode) or a wake-up that came while
        // reads were being paced.
        let mut next_read: Option<tokio::time::Instant> = None;
        // Reads are paced while events keep coming, so that one read collects many commits.
        let mut not_before = tokio::time::Instant::now();
        loop {
            let found = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = &mut driver.0 => return Err(DbError::Closed),
                _ = wake.notified() => {
                    let now = tokio::time::Instant::now();
                    if now < not_before {
                        next_read = Some(next_read.map_or(not_before, |t| t.min(not_before)));
                        continue;
                    }
                    self.scan(&client, &queries).await?
                }
                _ = async { sleep_until_opt(next_read).await }, if next_read.is_some() => {
                    next_read = None;
                    self.scan(&client, &queries).await?
                }
                _ = poll.tick() => self.scan(&client, &queries).await?,
                _ = recheck.tick() => {
                    // A DBA may switch the mode at any time; this session's own setting is
                    // fixed at connect, so read the database's.
                    let now = WakeupMode::parse(
                        with_timeout(client.query_one(&mode_query, &[])).await?.get::<_, Option<&str>>(0),
                    );
                    if now != mode {
                        info!(from = ?mode, to = ?now, "wake-up mode changed");
                        mode = now;
                        *self.health.mode.lock().unwrap_or_else(|e| e.into_inner()) = Some(mode);
                        poll = tokio::time::interval(mode.poll_interval());
                        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
                    }
                    continue;
                }
            };
            let now = tokio::time::Instant::now();
            not_before = now + pace(found);
            // Gated mode: while reads keep finding events, keep reading: commits that skipped
            // their wake-up are then picked up within a few milliseconds, not at the next poll.
            if mode == WakeupMode::Gated && found > 0 {
                let at = now + FOLLOW_UP.max(pace(found));
                next_read = Some(next_read.map_or(at, |t| t.min(at)));
            }
        }
    }

    /// Reads everything committed since the cursors and publishes it, tenant by tenant, in id
    /// order, until caught up. Returns how many events it delivered.
    async fn scan(
        &mut self,
        client: &tokio_postgres::Client,
        queries: &FollowQueries,
    ) -> Result<usize, DbError> {
        let mut delivered = 0;
        loop {
            let heads = with_timeout(queries.heads(client)).await?;
            let mut ranges = Vec::new();
            for (tenant, head) in heads {
                let cursor = self.cursors.get(tenant.as_str()).copied().unwrap_or(0);
                if head > cursor {
                    let key = self
                        .cursors
                        .get_key_value(tenant.as_str())
                        .map(|(k, _)| Arc::clone(k));
                    ranges.push((key.unwrap_or_else(|| Arc::from(tenant)), cursor, head));
                } else if head < cursor {
                    // The counter went backwards: the database was restored or the tenant
                    // recreated. Follow the database; clients with a larger `since` get a resync.
                    warn!(
                        tenant,
                        head, cursor, "tenant's event counter went backwards; following it"
                    );
                    self.hub.reset(&tenant, head, Vec::new());
                    self.cursors.insert(Arc::from(tenant), head);
                }
            }
            if ranges.is_empty() {
                self.health.read_completed();
                return Ok(delivered);
            }
            let rows = with_timeout(queries.read_ranges(client, &ranges, SCAN_LIMIT)).await?;
            let truncated = rows.len() as i64 >= SCAN_LIMIT;
            self.metrics
                .listener_rows
                .fetch_add(rows.len() as u64, Ordering::Relaxed);
            delivered += rows.len();
            for event in rows {
                self.deliver(event);
            }
            if !truncated {
                // Every id up to each head was read (or pruned before we could read it).
                for (tenant, _, head) in ranges {
                    self.cursors.insert(tenant, head);
                }
                self.health.read_completed();
                return Ok(delivered);
            }
        }
    }

    fn deliver(&mut self, event: Event) {
        let cursor = self.cursors.entry(Arc::clone(&event.tenant)).or_insert(0);
        if event.id != *cursor + 1 {
            // Rows pruned before this listener read them (it was away longer than the
            // retention). Sockets notice the jump and tell their POS to resync.
            warn!(tenant = %event.tenant, expected = *cursor + 1, got = event.id, "event ids skipped");
        }
        *cursor = event.id;
        self.metrics.event_received(event.origin, &event.kind);
        self.metrics.observe_lag(
            SystemTime::now()
                .duration_since(event.emitted_at)
                .unwrap_or_default(),
        );
        let frame = Frame {
            emitted_at: event.emitted_at,
            id: event.id,
            text: event.to_frame().into(),
        };
        let delivery = self.hub.publish(&event.tenant, &frame);
        let here = delivery.sent + delivery.failed;
        // Another instance's terminal counts as delivered; without a fresh presence view
        // (database trouble) only this instance's sockets can be known.
        let elsewhere = self
            .presence
            .as_ref()
            .and_then(|p| p.connected_elsewhere(&event.tenant));
        let undelivered = here == 0 && elsewhere != Some(true);
        if let Some(activity) = &self.activity {
            activity.record(&event, delivery.sent, undelivered);
        }
        if here == 0 && elsewhere == Some(true) {
            // Its terminals are on other instances, which log the delivery: no noise here.
            debug!(tenant = %event.tenant, "no local connections for tenant: {}", event.tenant);
        } else if here == 0 {
            info!(tenant = %event.tenant, "no connections for tenant: {}", event.tenant);
        } else {
            info!(
                tenant = %event.tenant, event_type = %event.kind, id = event.id,
                "event '{}' sent to {} clients for tenant: {} ({} failed)",
                event.kind, delivery.sent, event.tenant, delivery.failed
            );
        }
        // Every instance reads every event: one of them reports, so an event is warned about
        // and counted once, not once per instance.
        if undelivered && self.presence.as_ref().is_none_or(|p| p.is_reporter()) {
            self.metrics.undelivered(&event.kind);
            self.warn_undelivered(&event, elsewhere.is_some());
        }
    }

    /// WARN once per tenant per [`UNDELIVERED_WARN_INTERVAL`] for orders, and separately for
    /// other events, so an order is never hidden behind an earlier loyalty warning.
    fn warn_undelivered(&mut self, event: &Event, cluster_wide: bool) {
        let now = Instant::now();
        let is_order = event.kind == "new_order";
        let key: Arc<str> = if is_order {
            Arc::clone(&event.tenant)
        } else {
            Arc::from(format!("{}\0other", event.tenant))
        };
        let last = self.last_undelivered_warning.get(&key);
        if last.is_some_and(|t| now.duration_since(*t) < UNDELIVERED_WARN_INTERVAL) {
            return;
        }
        // Bounded by tenants with recent warnings: older entries no longer suppress anything.
        self.last_undelivered_warning
            .retain(|_, t| now.duration_since(*t) < UNDELIVERED_WARN_INTERVAL);
        self.last_undelivered_warning.insert(key, now);
        let scope = if cluster_wide {
            "no POS connected"
        } else {
            "no POS connected to this instance (presence unavailable)"
        };
        if is_order {
            let number = serde_json::from_str::<serde_json::Value>(&event.data)
                .ok()
                .and_then(|d| {
                    d.get("orderNumber")
                        .and_then(|n| n.as_str())
                        .map(str::to_owned)
                })
                .unwrap_or_else(|| "?".into());
            warn!(
                tenant = %event.tenant, id = event.id,
                "order {number} for tenant {}: {scope}", event.tenant
            );
        } else {
            warn!(
                tenant = %event.tenant, id = event.id, event_type = %event.kind,
                "event {} (id {}) for tenant {}: {scope}", event.kind, event.id, event.tenant
            );
        }
    }
}

/// How long to wait before the next read, given what the last one found.
fn pace(found: usize) -> Duration {
    match found {
        0 => Duration::ZERO,
        1 => PACE_QUIET,
        _ => PACE_BUSY,
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn with_timeout<T, E: Into<DbError>>(
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, DbError> {
    match timeout(QUERY_TIMEOUT, f).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(DbError::Timeout),
    }
}
