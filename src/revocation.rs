//! The revocation watcher: on a Postgres connection of its own it LISTENs for key changes
//! (migration V4 notifies a revoked, moved or deleted key's id) and re-checks every cached and
//! connected key periodically as a safety net; a changed key leaves the key cache and its
//! sockets close with 1008 at once. It tells the key cache whether revocation can be checked,
//! so that while the database is unreachable unverifiable keys get 503 rather than a guess.

pub mod key_cache;

use std::collections::HashMap;
use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::time::{MissedTickBehavior, sleep};
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::db::{self, DbError, keys};
use crate::hub::Hub;
use key_cache::KeyCache;

/// The watcher's `application_name`, to find its connection in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "orderpush-revocation";
/// Key ids queued between the connection and the watcher. A bigger burst (a tenant with
/// thousands of keys deleted) is handled by one full check instead of per id.
const NOTIFICATION_QUEUE: usize = 1024;

/// What the watcher keeps honest.
#[derive(Debug, Clone)]
pub struct Watched {
    /// The key cache: changed keys leave it, and it learns whether revocation can be checked.
    pub keys: Arc<KeyCache>,
    /// The sockets: those of changed keys are closed.
    pub hub: Arc<Hub>,
    /// How often every cached and connected key is re-checked
    /// (`Tuning::revocation_check_interval`).
    pub check_interval: Duration,
    /// Cancelled when the server shuts down.
    pub shutdown: CancellationToken,
}

/// Runs until the shutdown token is cancelled: connect, LISTEN, check everything once, then act
/// on each notification and re-check every `check_interval`; on any failure, back off (100 ms
/// doubling to 5 s) and start over.
///
/// Start it once per server, before serving (it needs the database config, not the pool: the
/// check must get its connection even when the request pool is exhausted, and pooled
/// connections drop notifications).
pub async fn run(state: Watched, database: tokio_postgres::Config) {
    let config = db::with_defaults(&database, APPLICATION_NAME);
    let mut backoff = Backoff::database();
    loop {
        let mut reached_live = false;
        let result = tokio::select! {
            _ = state.shutdown.cancelled() => return,
            r = watch(&state, &config, &mut reached_live) => r,
        };
        state.keys.watcher_lost();
        // A connection that went live worked: only consecutive failures back off further.
        if reached_live {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        match result {
            Ok(()) => return,
            Err(e) => warn!(
                error = %e,
                retry_in = ?delay,
                "revocation watcher lost its database connection; reconnecting (meanwhile keys not \
                 verified in the last {}s are answered 503)",
                key_cache::REVOCATION_FRESHNESS.as_secs()
            ),
        }
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = sleep(delay) => {}
        }
    }
}

/// Aborts the connection-driver task when the watcher lets go of its connection.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One connection's life. Returns Ok only on shutdown.
async fn watch(
    state: &Watched,
    config: &tokio_postgres::Config,
    reached_live: &mut bool,
) -> Result<(), DbError> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let (ids_tx, mut ids_rx) = mpsc::channel::<String>(NOTIFICATION_QUEUE);
    let overflowed = Arc::new(AtomicBool::new(false));
    let overflow_flag = Arc::clone(&overflowed);
    // The connection must be polled for notifications to arrive at all; this task does only
    // that. It ends with the connection (dropping the sender tells the watcher), and is aborted
    // with the guard when the watcher returns.
    let _driver = AbortOnDrop(tokio::spawn(async move {
        loop {
            match poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if ids_tx.try_send(n.payload().to_owned()).is_err() {
                        overflow_flag.store(true, Ordering::Release);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    debug!(error = %e, "revocation watcher connection failed");
                    return;
                }
                None => return,
            }
        }
    }));
    // Any watcher query slower than db::QUERY_TIMEOUT means a dead or wedged connection.
    db::with_timeout(
        db::QUERY_TIMEOUT,
        db::listen(&client, keys::CHANGES_CHANNEL),
    )
    .await?;
    // From here on every committed change is notified to this connection.
    let live_since = Instant::now();
    full_check(state, &client, live_since).await?;
    *reached_live = true;
    debug!("revocation watcher listening for key changes");

    let interval = state.check_interval;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = state.shutdown.cancelled() => return Ok(()),
            id = ids_rx.recv() => {
                let Some(id) = id else {
                    return Err(DbError::Closed);
                };
                let mut ids = vec![id];
                while ids.len() < keys::STATE_QUERY_MAX_IDS {
                    match ids_rx.try_recv() {
                        Ok(id) => ids.push(id),
                        Err(_) => break,
                    }
                }
                if overflowed.swap(false, Ordering::AcqRel) {
                    // Some ids were not queued: check everything instead.
                    state.keys.forget(&ids);
                    full_check(state, &client, live_since).await?;
                } else {
                    notified(state, &client, ids, live_since).await?;
                }
            }
            _ = tick.tick() => full_check(state, &client, live_since).await?,
        }
    }
}

/// Acts on notified key ids: asks where each key stands now, drops it from the cache unless it
/// still holds, and closes its sockets on tenants it may no longer read.
async fn notified(
    state: &Watched,
    client: &tokio_postgres::Client,
    mut ids: Vec<String>,
    live_since: Instant,
) -> Result<(), DbError> {
    ids.sort_unstable();
    ids.dedup();
    let started = Instant::now();
    let result = db::with_timeout(db::QUERY_TIMEOUT, keys::tenants_of(client, &ids)).await;
    let states = match result {
        Ok(states) => states,
        Err(e) => {
            // The keys changed, but how is unknown: at least stop trusting the cache for them.
            // Their sockets are dealt with by the full check after the reconnect.
            state.keys.forget(&ids);
            return Err(e);
        }
    };
    apply(state, &states, started, live_since, true);
    Ok(())
}

/// Re-checks every key in the cache or on a socket here; with none, proves the connection alive.
async fn full_check(
    state: &Watched,
    client: &tokio_postgres::Client,
    live_since: Instant,
) -> Result<(), DbError> {
    let started = Instant::now();
    let mut ids = state.hub.connected_key_ids();
    ids.extend(state.keys.ids_to_check());
    ids.sort_unstable();
    ids.dedup();
    let mut states = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(keys::STATE_QUERY_MAX_IDS) {
        states.extend(db::with_timeout(db::QUERY_TIMEOUT, keys::tenants_of(client, chunk)).await?);
    }
    if ids.is_empty() {
        db::with_timeout(db::QUERY_TIMEOUT, db::ping(client)).await?;
    }
    apply(state, &states, started, live_since, false);
    Ok(())
}

/// Applies what the database said at `checked_at` to the key cache and the sockets, and records
/// the successful check.
fn apply(
    state: &Watched,
    states: &[(String, Option<String>)],
    checked_at: Instant,
    live_since: Instant,
    notified: bool,
) {
    let tenant_of: HashMap<&str, Option<&str>> = states
        .iter()
        .map(|(id, tenant)| (id.as_str(), tenant.as_deref()))
        .collect();
    state.keys.apply(&tenant_of, checked_at, notified);
    let closed = state.hub.kick_keys_off_tenant(&tenant_of);
    state.keys.checked(live_since, checked_at);
    if closed > 0 {
        let changed: Vec<(&str, Option<&str>)> = states
            .iter()
            .map(|(id, tenant)| (id.as_str(), tenant.as_deref()))
            .filter(|(_, tenant)| notified || tenant.is_none())
            .collect();
        info!(keys = ?changed, closed, "closed connections of revoked or moved keys (close 1008)");
    }
}
