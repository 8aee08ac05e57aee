//! The listener: one dedicated Postgres connection per instance that follows the event log by
//! batch number, as the sequencer commits it (a NOTIFY per batch is the hint, the table the
//! truth), and hands every event to the hub in order. It reconnects with capped backoff and
//! continues from its cursor, notices a log that went backwards (a restore, a failover) and tells
//! the affected sockets, and answers /broadcast requests waiting for their event's id.

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Notify, oneshot};
use tokio::time::{MissedTickBehavior, sleep};
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::alert::UndeliveredAlert;
use crate::backoff::Backoff;
use crate::db::events::{FollowQueries, LogPosition, LogState};
use crate::db::sequencer::BATCH_CHANNEL;
use crate::db::wakeup::{ModeQuery, WakeupMode};
use crate::db::{self, DbError};
use crate::event::{Event, TENANT_RESET};
use crate::hub::{Frame, Hub, MAX_RUN_FRAMES};
use crate::metrics::Metrics;

/// Rows per read: bounds memory after a long outage; the scan loops until caught up.
const SCAN_LIMIT: i64 = 500;
/// Safety-net poll: the sequencer announces every batch, so this only bounds the delay of an
/// announcement lost while reconnecting; it doubles as the half-open-connection probe.
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How often the listener re-reads the database's `orderpush.wakeup` (the sequencer paces its
/// reads by it) and checks that staged rows are being numbered.
const MODE_RECHECK: Duration = Duration::from_secs(2);
/// /readyz turns 503 when the listener has not completed a read for this long (docs/protocol.md:
/// noticed within 10 s).
pub(crate) const LISTENER_STALE_AFTER: Duration = Duration::from_secs(8);
/// /readyz turns 503 when a staged row has waited this long: no sequencer is numbering.
pub(crate) const SEQUENCER_STALL: Duration = Duration::from_secs(10);

/// The listener's state as /readyz and the status page see it.
#[derive(Debug)]
pub struct ListenerHealth {
    started: Instant,
    connected: AtomicBool,
    /// Milliseconds since `started` of the last completed read; 0 = never.
    last_read_ms: AtomicU64,
    /// A staged row has waited longer than [`SEQUENCER_STALL`] (no sequencer is numbering).
    sequencer_stalled: AtomicBool,
    mode: Mutex<Option<WakeupMode>>,
}

impl Default for ListenerHealth {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            connected: AtomicBool::new(false),
            last_read_ms: AtomicU64::new(0),
            sequencer_stalled: AtomicBool::new(false),
            mode: Mutex::new(None),
        }
    }
}

impl ListenerHealth {
    /// True when connected, a read completed within [`LISTENER_STALE_AFTER`], and staged rows are being
    /// numbered.
    pub(crate) fn is_following(&self) -> bool {
        let last = self.last_read_ms.load(Ordering::Acquire);
        self.connected.load(Ordering::Acquire)
            && last > 0
            && (self.started.elapsed().as_millis() as u64).saturating_sub(last)
                <= LISTENER_STALE_AFTER.as_millis() as u64
            && !self.sequencer_stalled()
    }

    /// True when a staged row has waited longer than [`SEQUENCER_STALL`]: no instance is
    /// numbering events (none elected, or the elected one is stuck).
    pub(crate) fn sequencer_stalled(&self) -> bool {
        self.sequencer_stalled.load(Ordering::Acquire)
    }

    /// The wake-up mode, as last read from the database.
    pub fn mode(&self) -> Option<WakeupMode> {
        *self.mode.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Time since the listener's last completed read (its lag behind the log, at most one poll
    /// interval while healthy); `None` before the first read.
    pub(crate) fn last_read_age(&self) -> Option<Duration> {
        let last = self.last_read_ms.load(Ordering::Acquire);
        (last > 0).then(|| {
            Duration::from_millis((self.started.elapsed().as_millis() as u64).saturating_sub(last))
        })
    }

    fn read_completed(&self) {
        let ms = (self.started.elapsed().as_millis() as u64).max(1);
        self.last_read_ms.store(ms, Ordering::Release);
    }

    fn set_mode(&self, mode: WakeupMode) {
        *self.mode.lock().unwrap_or_else(|e| e.into_inner()) = Some(mode);
    }
}

/// Recently numbered broadcasts remembered for a request that registers late (a retried
/// request whose original was numbered a moment ago): a few seconds of /broadcast traffic.
const NUMBERED_REMEMBERED: usize = 4096;

/// /broadcast requests waiting for their staged row to be numbered, by staged row (`gid`). The
/// listener resolves them as it reads the log, so a request learns its id from whichever
/// instance numbered it.
#[derive(Debug, Default)]
pub struct NumberedWaiters {
    inner: Mutex<Waiting>,
}

#[derive(Debug, Default)]
struct Waiting {
    waiting: HashMap<i64, oneshot::Sender<i64>>,
    recent: VecDeque<(i64, i64)>,
}

impl NumberedWaiters {
    /// Waits for staged row `gid`: the receiver gets its event id. Register before the row is
    /// committed, so the answer cannot pass by unseen. Bounded by the requests in flight (the
    /// /broadcast writer's queue); [`NumberedWaiters::forget`] removes abandoned ones.
    pub(crate) fn register(&self, gid: i64) -> oneshot::Receiver<i64> {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.lock();
        if let Some(&(_, id)) = inner.recent.iter().find(|(g, _)| *g == gid) {
            let _ = tx.send(id);
        } else {
            inner.waiting.insert(gid, tx);
        }
        rx
    }

    /// Stops waiting for `gid` (the request gave up or its transaction failed).
    pub fn forget(&self, gid: i64) {
        self.lock().waiting.remove(&gid);
    }

    fn resolve(&self, gid: i64, id: i64) {
        let mut inner = self.lock();
        if let Some(tx) = inner.waiting.remove(&gid) {
            let _ = tx.send(id);
        }
        if inner.recent.len() >= NUMBERED_REMEMBERED {
            inner.recent.pop_front();
        }
        inner.recent.push_back((gid, id));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Where the listener starts: the log's position and every tenant's head, read together before
/// the server accepts its first socket.
#[derive(Debug, Clone, Default)]
pub struct Start {
    /// The last committed batch.
    pub batch: i64,
    /// Each tenant's last id.
    pub heads: Vec<(String, i64)>,
}

/// Follows the event log and feeds the hub.
pub struct Listener {
    config: tokio_postgres::Config,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    health: Arc<ListenerHealth>,
    /// The last row handed to the hub. Kept across reconnects: that is what makes a reconnect
    /// continue instead of skipping.
    position: LogPosition,
    /// The sequencer epoch seen last; a new one that starts at or before `position` means the
    /// log was rewound.
    epoch: Option<i64>,
    /// Per tenant, the last id handed to the hub, to notice holes and rewinds.
    last_ids: HashMap<Arc<str>, i64>,
    /// What follows each hand-off: delivery logs, the status page's record, the undelivered
    /// alert.
    alert: UndeliveredAlert,
    /// /broadcast requests waiting for their ids.
    waiters: Arc<NumberedWaiters>,
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
    /// connections do not deliver notifications), starting after `start`.
    ///
    /// `start` must be read before the server accepts its first socket: a POS that connects
    /// without `since` is promised every event committed after it connected, and a listener
    /// that picked its starting point later would skip the events in between.
    pub fn new(
        config: &tokio_postgres::Config,
        start: Start,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        health: Arc<ListenerHealth>,
        waiters: Arc<NumberedWaiters>,
    ) -> Self {
        Self {
            config: db::with_defaults(config, "orderpush-listener"),
            hub,
            metrics: Arc::clone(&metrics),
            health,
            position: LogPosition::after_batch(start.batch),
            epoch: None,
            last_ids: start
                .heads
                .into_iter()
                .map(|(t, seq)| (Arc::from(t), seq))
                .collect(),
            alert: UndeliveredAlert::new(Arc::clone(&metrics)),
            waiters,
        }
    }

    /// Replaces the default alert (this instance's sockets only, no status-page record), e.g.
    /// with a cluster-wide one ([`UndeliveredAlert::cluster_wide`]).
    pub(crate) fn with_alert(mut self, alert: UndeliveredAlert) -> Self {
        self.alert = alert;
        self
    }

    /// Runs until `shutdown`: connect, LISTEN, catch up, follow; on any failure back off and
    /// start over.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Backoff::database();
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.follow(&shutdown) => r,
            };
            // A connection that got as far as following worked: the next attempt starts from
            // the shortest delay. Only consecutive failures to get there back off further.
            if self.health.connected.swap(false, Ordering::AcqRel) {
                backoff.reset();
            }
            self.metrics.listener_up.store(0, Ordering::Relaxed);
            let delay = backoff.next_delay();
            match result {
                Ok(()) => return, // shutdown
                Err(e) => {
                    warn!(error = %e, retry_in = ?delay, "listener lost its connection; reconnecting")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = sleep(delay) => {}
            }
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

        // LISTEN first, then read: a batch committed in between is seen by the read, and its
        // announcement only causes one extra (empty) read.
        with_timeout(db::listen(&client, BATCH_CHANNEL)).await?;
        let mode_query = with_timeout(ModeQuery::prepare(&client)).await?;
        let queries = with_timeout(FollowQueries::prepare(&client)).await?;
        self.check(&client, &mode_query, &queries).await?;
        self.metrics
            .listener_connects
            .fetch_add(1, Ordering::Relaxed);
        self.scan(&client, &queries).await?;
        self.health.connected.store(true, Ordering::Release);
        self.metrics.listener_up.store(1, Ordering::Relaxed);
        info!("listener following the event log");

        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut recheck = tokio::time::interval(MODE_RECHECK);
        recheck.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = &mut driver.0 => return Err(DbError::Closed),
                _ = wake.notified() => {}
                _ = poll.tick() => {}
                _ = recheck.tick() => {
                    self.check(&client, &mode_query, &queries).await?;
                    continue;
                }
            }
            self.scan(&client, &queries).await?;
        }
    }

    /// Reads the wake-up mode (a DBA may switch it at any time; a session's own setting is fixed
    /// at connect, so the database's is read) and whether staged rows wait for a sequencer.
    async fn check(
        &self,
        client: &tokio_postgres::Client,
        mode_query: &ModeQuery,
        queries: &FollowQueries,
    ) -> Result<(), DbError> {
        let mode = with_timeout(mode_query.read(client)).await?;
        if self.health.mode() != Some(mode) {
            info!(mode = mode.as_str(), "wake-up mode");
            self.health.set_mode(mode);
        }
        let age = with_timeout(queries.oldest_staged_age(client)).await?;
        let stalled = age.is_some_and(|a| a >= SEQUENCER_STALL.as_secs_f64());
        if stalled
            != self
                .health
                .sequencer_stalled
                .swap(stalled, Ordering::AcqRel)
        {
            if stalled {
                warn!(
                    waited_s = age.unwrap_or_default(),
                    "staged writes are not being numbered: no sequencer is running (or it is stuck)"
                );
            } else {
                info!("staged writes are being numbered again");
            }
        }
        Ok(())
    }

    /// Reads everything committed after the cursor and publishes it in log order, until caught
    /// up. Returns how many events it delivered.
    async fn scan(
        &mut self,
        client: &tokio_postgres::Client,
        queries: &FollowQueries,
    ) -> Result<usize, DbError> {
        let mut delivered = 0;
        loop {
            let (state, rows) = with_timeout(async {
                let (state, rows) = tokio::join!(
                    queries.state(client),
                    queries.read_after(client, &self.position, SCAN_LIMIT)
                );
                Ok::<_, DbError>((state?, rows?))
            })
            .await?;
            if let Some(to_batch) = self.rewound(&state) {
                self.rewind(client, queries, to_batch).await?;
                continue;
            }
            let full = rows.len() as i64 >= SCAN_LIMIT;
            self.metrics
                .listener_rows
                .fetch_add(rows.len() as u64, Ordering::Relaxed);
            delivered += rows.len();
            // Consecutive events of one tenant are published as one run: a socket with room
            // takes them with one write (docs/architecture.md, "Fan-out").
            let mut run: Vec<(Event, Frame)> = Vec::new();
            for (position, gid, event) in rows {
                self.position = position;
                // A marker ends the run before it: what it does to the hub must follow the
                // frames read before it.
                let joins_run = !is_tenant_reset(&event)
                    && run.last().is_some_and(|(last, _)| {
                        last.tenant == event.tenant && run.len() < MAX_RUN_FRAMES
                    });
                if !joins_run {
                    self.publish(&mut run).await;
                }
                if let Some(frame) = self.accept(&event, gid) {
                    run.push((event, frame));
                }
            }
            self.publish(&mut run).await;
            if !full {
                self.health.read_completed();
                return Ok(delivered);
            }
        }
    }

    /// `Some(batch)` when the log went backwards to `batch`: a batch number below what was read,
    /// or a new sequencer epoch that started at or before it.
    fn rewound(&mut self, state: &LogState) -> Option<i64> {
        let read = self.position.batch_read();
        let previous = self.epoch.replace(state.epoch);
        if state.batch < read {
            return Some(state.batch);
        }
        if previous.is_some_and(|e| e != state.epoch) && state.epoch_first_batch <= read {
            return Some(state.epoch_first_batch - 1);
        }
        None
    }

    /// Follows a log restored to `batch`: every tenant whose events this instance delivered
    /// beyond what the restored log holds is told so (`resync_required`, `log_rewound`, with the
    /// lower id its sockets adopt), then reading continues after `batch`.
    async fn rewind(
        &mut self,
        client: &tokio_postgres::Client,
        queries: &FollowQueries,
        batch: i64,
    ) -> Result<(), DbError> {
        let heads = with_timeout(queries.heads_at(client, batch)).await?;
        let heads: HashMap<String, i64> = heads.into_iter().collect();
        let mut rewound = 0;
        for (tenant, last) in self.last_ids.iter_mut() {
            let head = heads.get(&**tenant).copied().unwrap_or(0);
            if head < *last {
                self.hub.rewind(tenant, head);
                *last = head;
                rewound += 1;
            }
        }
        warn!(
            to_batch = batch,
            tenants = rewound,
            "the event log went backwards (a restore or a failover); affected POS were told to resync"
        );
        self.position = LogPosition::after_batch(batch);
        Ok(())
    }

    /// Takes an event read from the log in order: its bookkeeping (the tenant's last id, the
    /// /broadcast caller waiting for its id, metrics) and its frame, to be published; `None`
    /// for a marker that is not sent (a tenant created again, handled here).
    fn accept(&mut self, event: &Event, gid: Option<i64>) -> Option<Frame> {
        if is_tenant_reset(event) {
            // A tenant deleted and created again under its slug: its log starts over, and
            // nothing of the previous restaurant may be served from memory. (The run before it
            // was published first: a run never spans a marker.)
            self.hub.rewind(&event.tenant, 0);
            self.last_ids.insert(Arc::clone(&event.tenant), 0);
            info!(tenant = %event.tenant, "tenant created again: its event log starts over");
            return None;
        }
        let last = self.last_ids.entry(Arc::clone(&event.tenant)).or_insert(0);
        if event.id != *last + 1 {
            // Rows pruned before this listener read them (it was away longer than the
            // retention). Sockets notice the jump and tell their POS to resync.
            warn!(tenant = %event.tenant, expected = *last + 1, got = event.id, "event ids skipped");
        }
        *last = event.id;
        if let (crate::event::Origin::Broadcast, Some(gid)) = (event.origin, gid) {
            self.waiters.resolve(gid, event.id);
        }
        self.metrics.event_received(event.origin, &event.kind);
        self.metrics.observe_lag(
            SystemTime::now()
                .duration_since(event.emitted_at)
                .unwrap_or_default(),
        );
        Some(Frame::event(
            event.id,
            &event.kind,
            &event.to_frame(),
            event.emitted_at,
        ))
    }

    /// Publishes a run of one tenant's events (emptying it) and reports each delivery.
    async fn publish(&mut self, run: &mut Vec<(Event, Frame)>) {
        let Some((first, _)) = run.first() else {
            return;
        };
        let tenant = Arc::clone(&first.tenant);
        let (events, frames): (Vec<Event>, Vec<Frame>) = run.drain(..).unzip();
        let deliveries = self.hub.publish_run(&tenant, &frames).await;
        for (event, delivery) in events.iter().zip(deliveries) {
            self.alert.published(event, delivery.sent, delivery.failed);
        }
    }
}

/// The marker the sequencer writes when a tenant is created again under its slug.
fn is_tenant_reset(event: &Event) -> bool {
    event.id == 0 && event.kind == TENANT_RESET
}

/// Any listener query, bounded by [`db::QUERY_TIMEOUT`]: slower means a dead or wedged
/// connection, and the listener reconnects.
async fn with_timeout<T, E: Into<DbError>>(
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, DbError> {
    db::with_timeout(db::QUERY_TIMEOUT, f).await
}
