//! The sequencer: one instance at a time (elected by a session advisory lock) turns staged rows
//! into numbered events, in batches, after the writers have committed (docs/architecture.md).
//!
//! Every instance runs this task; all but one wait as standbys, retrying the election every
//! second, so a successor takes over within seconds of a clean death (the lock is released with
//! the leader's session) and within about 30 s of a lost host (the leader's session sets TCP
//! keepalives the server acts on). Only one committer ever writes the log, so ids per tenant are
//! gap-free and increase in the order events become visible, and followers can read the log by
//! batch number without the late-commit trap.

pub mod render;

use std::collections::{HashMap, HashSet};
use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::time::{MissedTickBehavior, sleep};
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::db::sequencer::{
    Batch, CurrentOrder, NewEvent, NumberedOrder, STAGED_CHANNEL, SequencerQueries, StagedRow,
    TenantState,
};
use crate::db::wakeup::WakeupMode;
use crate::db::{self, DbError};
use crate::event::{self, ResyncReason, TENANT_RESET};
use crate::metrics::Metrics;
use render::FieldMap;

/// How often a standby retries the election: the takeover delay after a clean death.
pub(crate) const ELECTION_RETRY: Duration = Duration::from_secs(1);
/// A sequencer query slower than this means a dead or wedged connection (the batch statement
/// itself is bounded by the session's 30 s `statement_timeout`; this is the client's bound on
/// waiting for any answer at all).
const SEQUENCER_QUERY_TIMEOUT: Duration = Duration::from_secs(35);
/// Rows per batch at most: a backlog (the service was down while orders came in) is worked off
/// in transactions of bounded size and time, each committed before the next is read.
pub(crate) const MAX_BATCH_ROWS: i64 = 1_000;
/// Bytes of staged rows per batch at most (beyond the first row, which is always taken): 1,000
/// rows of 700 KB notes would otherwise be 700 MB in one statement.
pub(crate) const MAX_BATCH_BYTES: i64 = 16 << 20;
/// In `gated` mode, a second read this long after each productive batch picks up the
/// concurrent commits that skipped their own NOTIFY (they commit within a WAL flush of the one
/// that notified); reads continue while they keep finding rows.
const FOLLOW_UP: Duration = Duration::from_millis(2);
/// Least time between batches after one that found a single row, so a burst collects.
const PACE_QUIET: Duration = Duration::from_millis(1);
/// Least time between batches after one that found several: at 1,000 orders/s one batch then
/// numbers a few commits, while adding at most 2 ms to delivery.
const PACE_BUSY: Duration = Duration::from_millis(2);
/// Staged rows deleted between two explicit `VACUUM`s of the staging table (and at most one per
/// [`VACUUM_INTERVAL`]): keeps the head of the queue free of dead entries that every read would
/// otherwise walk until autovacuum's next visit.
const VACUUM_EVERY_ROWS: u64 = 2_000;
/// Least time between two explicit `VACUUM`s.
const VACUUM_INTERVAL: Duration = Duration::from_secs(1);

/// The sequencer's state, for the status page and the metrics.
#[derive(Debug, Default)]
pub(crate) struct SequencerHealth {
    leader: AtomicBool,
    /// Batches this instance committed.
    pub batches: AtomicU64,
}

/// The wake-up mode as last read from the database (the listener reads it), `None` before the
/// first read.
pub(crate) type ModeSource = Box<dyn Fn() -> Option<WakeupMode> + Send + Sync>;

/// Numbers staged rows while elected.
pub(crate) struct Sequencer {
    config: tokio_postgres::Config,
    metrics: Arc<Metrics>,
    health: Arc<SequencerHealth>,
    mode: ModeSource,
}

/// Aborts the connection-driver task when the sequencer lets go of a connection.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Sequencer {
    /// A sequencer on its own connection built from `config` (a session holds the election
    /// lock; pooled connections could not). It paces its reads by the wake-up mode `mode`
    /// reports (the listener re-reads the database's setting; the sequencer does not repeat
    /// that query).
    pub fn new(
        config: &tokio_postgres::Config,
        metrics: Arc<Metrics>,
        health: Arc<SequencerHealth>,
        mode: impl Fn() -> Option<WakeupMode> + Send + Sync + 'static,
    ) -> Self {
        Self {
            config: db::with_defaults(config, "orderpush-sequencer"),
            metrics,
            health,
            mode: Box::new(mode),
        }
    }

    /// Runs until `shutdown`: connect, stand by until elected, then number batches; on any
    /// failure let go of the connection (and with it the election), back off and start over.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::database();
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.session(&shutdown) => r,
            };
            if self.health.leader.swap(false, Ordering::AcqRel) {
                // A session that got elected worked: start again from the shortest delay.
                backoff.reset();
                info!("sequencer: stepped down");
            }
            self.metrics.sequencer_leader.store(0, Ordering::Relaxed);
            let delay = backoff.next_delay();
            match result {
                Ok(()) => return,
                Err(e) => warn!(error = %e, retry_in = ?delay, "sequencer lost its connection"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = sleep(delay) => {}
            }
        }
    }

    /// One connection's life: stand by, then lead. Returns Ok only on shutdown.
    async fn session(&self, shutdown: &CancellationToken) -> Result<(), DbError> {
        let (mut client, mut connection) = self.config.connect(NoTls).await?;
        let wake = Arc::new(Notify::new());
        let wake_tx = Arc::clone(&wake);
        // The connection must be polled for notifications to arrive; this task does only that.
        let mut driver = AbortOnDrop(tokio::spawn(async move {
            loop {
                match poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(_))) => wake_tx.notify_one(),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        debug!(error = %e, "sequencer connection failed");
                        return;
                    }
                    None => return,
                }
            }
        }));

        // Stand by until elected. The session's settings (keepalives) are set by the first try.
        let mut retry = tokio::time::interval(ELECTION_RETRY);
        retry.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = &mut driver.0 => return Err(DbError::Closed),
                _ = retry.tick() => {}
            }
            if with_timeout(db::sequencer::try_lead(&client)).await? {
                break;
            }
        }
        let epoch = random_epoch();
        let last = with_timeout(db::sequencer::start_epoch(&client, epoch)).await?;
        with_timeout(db::listen(&client, STAGED_CHANNEL)).await?;
        let queries = with_timeout(SequencerQueries::prepare(&client)).await?;
        self.health.leader.store(true, Ordering::Release);
        self.metrics.sequencer_leader.store(1, Ordering::Relaxed);
        info!(
            epoch,
            after_batch = last,
            "sequencer: elected; numbering staged rows"
        );

        let mut mode = (self.mode)().unwrap_or(WakeupMode::Gated);
        let mut poll = tokio::time::interval(poll_interval(mode));
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut next_read: Option<tokio::time::Instant> = None;
        let mut not_before = tokio::time::Instant::now();
        let mut deleted_since_vacuum = 0u64;
        let mut last_vacuum = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = &mut driver.0 => return Err(DbError::Closed),
                _ = wake.notified() => {
                    let now = tokio::time::Instant::now();
                    if now < not_before {
                        next_read = Some(next_read.map_or(not_before, |t| t.min(not_before)));
                        continue;
                    }
                }
                _ = sleep_until_opt(next_read), if next_read.is_some() => next_read = None,
                _ = poll.tick() => {}
            }
            // Work off a backlog batch after batch; each is its own transaction.
            let mut found = 0;
            loop {
                let n = self.batch(&mut client, &queries).await?;
                found += n;
                deleted_since_vacuum += n as u64;
                if (n as i64) < MAX_BATCH_ROWS || shutdown.is_cancelled() {
                    break;
                }
            }
            if deleted_since_vacuum >= VACUUM_EVERY_ROWS && last_vacuum.elapsed() >= VACUUM_INTERVAL
            {
                with_timeout(db::sequencer::vacuum_staged(&client)).await?;
                deleted_since_vacuum = 0;
                last_vacuum = Instant::now();
            }
            let current = (self.mode)().unwrap_or(WakeupMode::Gated);
            if current != mode {
                mode = current;
                poll = tokio::time::interval(poll_interval(mode));
                poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
            }
            let now = tokio::time::Instant::now();
            not_before = now + pace(found);
            if mode == WakeupMode::Gated && found > 0 {
                let at = now + FOLLOW_UP.max(pace(found));
                next_read = Some(next_read.map_or(at, |t| t.min(at)));
            }
        }
    }

    /// Reads, renders, numbers and commits one batch; returns the staged rows it consumed.
    async fn batch(
        &self,
        client: &mut tokio_postgres::Client,
        queries: &SequencerQueries,
    ) -> Result<usize, DbError> {
        let rows = with_timeout(queries.staged(client, MAX_BATCH_ROWS, MAX_BATCH_BYTES)).await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let parsed: Vec<Parsed<'_>> = rows.iter().map(Parsed::new).collect();
        let mut slugs: Vec<String> = parsed.iter().filter_map(|p| p.tenant.clone()).collect();
        slugs.sort_unstable();
        slugs.dedup();
        let order_ids: Vec<String> = parsed
            .iter()
            .filter(|p| p.row.kind == "new_order")
            .filter_map(|p| p.columns.as_ref().and_then(|c| render::text(c, "id")))
            .filter(|id| is_uuid(id))
            .collect();
        // Three reads, pipelined on the one connection: one round trip.
        let (tenants, settings, orders) = with_timeout(async {
            Ok::<_, DbError>(tokio::join!(
                queries.tenants(&*client, &slugs),
                queries.settings(&*client),
                queries.orders(&*client, &order_ids),
            ))
        })
        .await?;
        let tenants = tenants?;
        let settings = settings?;
        let rules = Rules {
            sources: settings.sources,
            fields: FieldMap::new(settings.columns),
            closed: settings.closed,
        };
        // A failure to read the orders (a table renamed, a type changed) must not stop the
        // other events: those orders become `emit_failed` for their tenants.
        let orders = orders.map_err(|e| e.to_string());
        let now = event::iso_now();
        let batch = number(&parsed, &tenants, &rules, &orders, &now);
        for (_, tenant, reason) in &batch.failures {
            warn!(
                tenant = tenant.as_deref().unwrap_or("?").escape_debug().to_string(),
                reason = reason.escape_debug().to_string(),
                "a write could not become an event; its tenant is told to resync (emit_failed)"
            );
        }
        let consumed = rows.len();
        match with_timeout(queries.commit(client, &batch)).await {
            Ok(number) => {
                self.health.batches.fetch_add(1, Ordering::Relaxed);
                self.metrics.sequencer_batch(consumed, batch.failures.len());
                debug!(
                    batch = number,
                    rows = consumed,
                    events = batch.events.len(),
                    "sequencer: batch committed"
                );
                Ok(consumed)
            }
            // The statement itself was refused (not the connection): a row the batch could not
            // store. Take that batch apart rather than retrying it forever.
            Err(DbError::Postgres(e)) if e.as_db_error().is_some() && consumed > 1 => {
                warn!(error = %e, rows = consumed, "sequencer: batch refused; numbering its rows one by one");
                let mut done = 0;
                for row in &rows {
                    done += self
                        .single(client, queries, row, &tenants, &rules, &orders, &now)
                        .await?;
                }
                Ok(done)
            }
            Err(DbError::Postgres(e)) if e.as_db_error().is_some() => {
                // One row, refused: record it as a failure without its event, so the queue moves.
                let row = &rows[0];
                let p = Parsed::new(row);
                warn!(error = %e, gid = row.gid, "sequencer: a staged row cannot be stored; recording it as an emit failure");
                let failed = Batch {
                    gids: vec![row.gid],
                    failures: vec![(
                        row.gid,
                        p.tenant.clone(),
                        format!("the event could not be stored: {e}"),
                    )],
                    ..Batch::default()
                };
                with_timeout(queries.commit(client, &failed)).await?;
                self.metrics.sequencer_batch(1, 1);
                Ok(1)
            }
            Err(e) => Err(e),
        }
    }

    /// Numbers one row on its own (after its batch was refused).
    #[allow(clippy::too_many_arguments)]
    async fn single(
        &self,
        client: &mut tokio_postgres::Client,
        queries: &SequencerQueries,
        row: &StagedRow,
        tenants: &HashMap<String, TenantState>,
        rules: &Rules,
        orders: &Result<HashMap<String, CurrentOrder>, String>,
        now: &str,
    ) -> Result<usize, DbError> {
        // Heads may have moved with the rows numbered before this one: read them again.
        let p = Parsed::new(row);
        let slugs: Vec<String> = p.tenant.iter().cloned().collect();
        let fresh = match slugs.is_empty() {
            true => tenants.clone(),
            false => with_timeout(queries.tenants(client, &slugs)).await?,
        };
        let batch = number(std::slice::from_ref(&p), &fresh, rules, orders, now);
        match with_timeout(queries.commit(client, &batch)).await {
            Ok(_) => {
                self.metrics.sequencer_batch(1, batch.failures.len());
                Ok(1)
            }
            Err(DbError::Postgres(e)) if e.as_db_error().is_some() => {
                warn!(error = %e, gid = row.gid, "sequencer: a staged row cannot be stored; recording it as an emit failure");
                let failed = Batch {
                    gids: vec![row.gid],
                    failures: vec![(
                        row.gid,
                        p.tenant.clone(),
                        format!("the event could not be stored: {e}"),
                    )],
                    ..Batch::default()
                };
                with_timeout(queries.commit(client, &failed)).await?;
                self.metrics.sequencer_batch(1, 1);
                Ok(1)
            }
            Err(e) => Err(e),
        }
    }
}

/// What the DBA decided: which order sources emit, which columns hold which fields, and which
/// statuses close an order.
struct Rules {
    sources: HashSet<String>,
    fields: FieldMap,
    closed: HashSet<String>,
}

/// A staged row with its columns parsed and its tenant found.
struct Parsed<'a> {
    row: &'a StagedRow,
    columns: Option<render::Columns<'a>>,
    tenant: Option<String>,
}

impl<'a> Parsed<'a> {
    fn new(row: &'a StagedRow) -> Self {
        let columns = render::columns(&row.row);
        let tenant = columns
            .as_ref()
            .and_then(|c| render::text(c, "tenant_slug"))
            .filter(|t| !t.is_empty());
        Self {
            row,
            columns,
            tenant,
        }
    }
}

/// What one staged row becomes.
enum Outcome {
    /// An event of this type and data (and envelope timestamp), for the row's tenant.
    Event {
        kind: String,
        timestamp: String,
        data: String,
        origin: &'static str,
    },
    /// Nothing: an order source that does not emit.
    Nothing,
    /// It should have been an event but cannot be built.
    Failed(String),
}

/// Renders and numbers a batch. Pure: everything it needs was read before.
fn number(
    rows: &[Parsed<'_>],
    tenants: &HashMap<String, TenantState>,
    rules: &Rules,
    orders: &Result<HashMap<String, CurrentOrder>, String>,
    now: &str,
) -> Batch {
    let mut batch = Batch::default();
    // Per tenant: the next id and whether its log starts over in this batch.
    let mut heads: HashMap<&str, i64> = HashMap::new();
    for p in rows {
        batch.gids.push(p.row.gid);
        let outcome = render_row(p, rules, orders, now);
        let Some(tenant) = p.tenant.as_deref() else {
            if !matches!(outcome, Outcome::Nothing) {
                batch.failures.push((
                    p.row.gid,
                    None,
                    "the row has no tenant_slug (was the column renamed or dropped?)".into(),
                ));
            }
            continue;
        };
        let Some(state) = tenants.get(tenant) else {
            continue;
        };
        // The tenant no longer exists (deleted after the write), or the row was written for an
        // earlier tenant under the same slug: nobody may receive it.
        let Some(created) = state.created_epoch else {
            debug!(tenant = %tenant.escape_debug(), gid = p.row.gid, "dropping a staged row of a deleted tenant");
            continue;
        };
        if p.row.staged_at < created {
            continue;
        }
        let (kind, timestamp, data, origin) = match outcome {
            Outcome::Nothing => continue,
            Outcome::Event {
                kind,
                timestamp,
                data,
                origin,
            } => match event::fit_data(&kind, tenant, &timestamp, data) {
                Ok((data, truncated)) => (kind, timestamp, (data, truncated), origin),
                Err(e) => {
                    batch
                        .failures
                        .push((p.row.gid, Some(tenant.to_owned()), e.to_string()));
                    emit_failed(now)
                }
            },
            Outcome::Failed(reason) => {
                batch
                    .failures
                    .push((p.row.gid, Some(tenant.to_owned()), reason));
                emit_failed(now)
            }
        };
        let next = heads.entry(tenant).or_insert_with(|| {
            if state.same_incarnation {
                state.head
            } else if !state.had_events {
                // A tenant's first event. Rows left by a tenant deleted before this version
                // counted per tenant are cleared first, so its ids can start at 1.
                batch.resets.push(tenant.to_owned());
                0
            } else {
                // A slug deleted and created again: its log starts over. The marker (id 0) tells
                // every follower to forget the old tenant's frames.
                batch.resets.push(tenant.to_owned());
                batch.events.push(NewEvent {
                    tenant: tenant.to_owned(),
                    id: 0,
                    kind: TENANT_RESET.into(),
                    timestamp: now.to_owned(),
                    data: "{}".into(),
                    origin: "db",
                    gid: None,
                    truncated: false,
                });
                0
            }
        });
        *next += 1;
        if origin == "broadcast" {
            batch.requests.push((p.row.gid, *next));
        }
        if let ("new_order" | "order_updated", Some(columns)) = (kind.as_str(), &p.columns) {
            let order = render::order_ref(&rules.fields, &kind, columns);
            let closed = order
                .status
                .as_ref()
                .is_some_and(|s| rules.closed.contains(s));
            if kind == "new_order" {
                batch.orders.push(NumberedOrder {
                    tenant: tenant.to_owned(),
                    event_id: *next,
                    order_id: order.id,
                    number: order.number,
                    closed,
                });
            } else if let (true, Some(id)) = (closed, order.id) {
                // Numbered in this same batch, its row does not exist yet: it is written closed.
                match batch
                    .orders
                    .iter_mut()
                    .find(|o| o.tenant == tenant && o.order_id.as_ref() == Some(&id))
                {
                    Some(numbered) => numbered.closed = true,
                    None => batch.closed.push((tenant.to_owned(), id)),
                }
            }
        }
        batch.events.push(NewEvent {
            tenant: tenant.to_owned(),
            id: *next,
            kind,
            timestamp,
            data: data.0,
            origin,
            gid: Some(p.row.gid),
            truncated: data.1,
        });
    }
    for (tenant, head) in heads {
        let created = tenants.get(tenant).and_then(|s| s.created_at.clone());
        batch.heads.push((tenant.to_owned(), head, created));
    }
    batch
}

/// The event that stands in for a write that could not become one: its tenant's POS refetch.
fn emit_failed(now: &str) -> (String, String, (String, bool), &'static str) {
    let data = serde_json::json!({ "reason": ResyncReason::EmitFailed.as_str() }).to_string();
    (
        "resync_required".into(),
        now.to_owned(),
        (data, false),
        "db",
    )
}

fn render_row(
    p: &Parsed<'_>,
    rules: &Rules,
    orders: &Result<HashMap<String, CurrentOrder>, String>,
    now: &str,
) -> Outcome {
    let Some(columns) = &p.columns else {
        return Outcome::Failed("the staged row is not a JSON object".into());
    };
    let event = |kind: &str, data: String| Outcome::Event {
        kind: kind.to_owned(),
        timestamp: now.to_owned(),
        data,
        origin: "db",
    };
    match p.row.kind.as_str() {
        "new_order" => {
            let source = render::text(columns, "order_source");
            if !source.is_some_and(|s| rules.sources.contains(&s)) {
                return Outcome::Nothing;
            }
            let id = render::text(columns, "id").unwrap_or_default();
            let current = match orders {
                Ok(found) => found.get(&id),
                Err(e) => {
                    return Outcome::Failed(format!(
                        "could not read the order's current row and items: {e}"
                    ));
                }
            };
            match current {
                // As of numbering: the order and the items committed with it.
                Some(current) => {
                    let (Some(row), Some(items)) = (
                        render::columns(&current.row),
                        serde_json::from_str::<Vec<render::Columns<'_>>>(&current.items).ok(),
                    ) else {
                        return Outcome::Failed("the order's row could not be read".into());
                    };
                    event("new_order", render::new_order(&rules.fields, &row, &items))
                }
                // Deleted before it was numbered: what was written, without items.
                None => event("new_order", render::new_order(&rules.fields, columns, &[])),
            }
        }
        "order_updated" => {
            let old = p.row.old.as_deref().and_then(render::columns);
            event(
                "order_updated",
                render::order_updated(&rules.fields, columns, old.as_ref(), p.row.staged_at),
            )
        }
        "gift_card_purchased" => event(
            "gift_card_purchased",
            render::gift_card_purchased(&rules.fields, columns),
        ),
        "loyalty_updated" => event(
            "loyalty_updated",
            render::loyalty_updated(&rules.fields, columns),
        ),
        "suppressed" => event(
            "resync_required",
            serde_json::json!({ "reason": ResyncReason::Suppressed.as_str() }).to_string(),
        ),
        "broadcast" => {
            let (Some(kind), Some(data)) = (render::text(columns, "type"), p.row.raw.clone())
            else {
                return Outcome::Failed("a broadcast without type or data".into());
            };
            Outcome::Event {
                kind,
                timestamp: render::text(columns, "timestamp").unwrap_or_else(|| now.to_owned()),
                data,
                origin: "broadcast",
            }
        }
        other => Outcome::Failed(format!("unknown kind of staged row '{other}'")),
    }
}

/// True for the textual form of a UUID (what `uuid::text` prints): only those are passed to the
/// query that re-reads orders, whose cast would fail the whole batch on anything else.
fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

fn random_epoch() -> i64 {
    let mut buf = [0u8; 8];
    if getrandom::fill(&mut buf).is_err() {
        // Without randomness, time is unique enough to tell two elections apart.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        return nanos as i64;
    }
    i64::from_le_bytes(buf)
}

/// How often the sequencer polls the staging table in `mode` (its safety net): rarely when
/// every commit notifies, often when none does.
fn poll_interval(mode: WakeupMode) -> Duration {
    match mode {
        WakeupMode::Notify => Duration::from_secs(1),
        // Bounds the delay of a commit whose wake-up was skipped and which committed after the
        // follow-up read.
        WakeupMode::Gated => Duration::from_millis(100),
        // The delivery latency a DBA accepts for a database without NOTIFY.
        WakeupMode::Poll => Duration::from_millis(10),
    }
}

/// How long to wait before the next batch, given what the last one found.
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

/// Any sequencer query, bounded by [`SEQUENCER_QUERY_TIMEOUT`].
async fn with_timeout<T, E: Into<DbError>>(
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, DbError> {
    db::with_timeout(SEQUENCER_QUERY_TIMEOUT, f).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staged(gid: i64, kind: &str, row: &str) -> StagedRow {
        StagedRow {
            gid,
            kind: kind.into(),
            row: row.into(),
            old: None,
            raw: None,
            staged_at: 2_000_000_000.0,
        }
    }

    fn tenant(head: i64, same: bool) -> TenantState {
        TenantState {
            created_at: Some("2026-01-01 00:00:00+00".into()),
            created_epoch: Some(1_767_225_600.0),
            head,
            same_incarnation: same,
            had_events: head > 0 || !same,
        }
    }

    #[test]
    fn ids_continue_per_tenant_in_staging_order_and_sources_filter() {
        let rows = [
            staged(
                1,
                "loyalty_updated",
                r#"{"tenant_slug":"a","customer_id":"c"}"#,
            ),
            staged(
                2,
                "new_order",
                r#"{"tenant_slug":"b","id":"x","order_source":"pos"}"#,
            ),
            staged(
                3,
                "loyalty_updated",
                r#"{"tenant_slug":"b","customer_id":"c"}"#,
            ),
            staged(
                4,
                "loyalty_updated",
                r#"{"tenant_slug":"a","customer_id":"d"}"#,
            ),
        ];
        let parsed: Vec<Parsed<'_>> = rows.iter().map(Parsed::new).collect();
        let tenants = HashMap::from([("a".into(), tenant(7, true)), ("b".into(), tenant(0, true))]);
        let rules = Rules {
            sources: HashSet::from(["online".to_string()]),
            fields: FieldMap::default(),
            closed: HashSet::new(),
        };
        let b = number(&parsed, &tenants, &rules, &Ok(HashMap::new()), "t");
        assert_eq!(b.gids, vec![1, 2, 3, 4], "every row is consumed");
        let ids: Vec<(&str, i64)> = b.events.iter().map(|e| (e.tenant.as_str(), e.id)).collect();
        assert_eq!(ids, vec![("a", 8), ("b", 1), ("a", 9)]);
        assert!(b.resets.is_empty());
        let mut heads = b.heads.clone();
        heads.sort();
        assert_eq!(heads[0].0, "a");
        assert_eq!(heads[0].1, 9);
    }

    #[test]
    fn a_recreated_tenant_starts_over_and_old_rows_are_dropped() {
        let mut early = staged(1, "loyalty_updated", r#"{"tenant_slug":"a"}"#);
        early.staged_at = 1_700_000_000.0; // before the tenant's created_at: the old restaurant
        let rows = [
            early,
            staged(2, "loyalty_updated", r#"{"tenant_slug":"a"}"#),
        ];
        let parsed: Vec<Parsed<'_>> = rows.iter().map(Parsed::new).collect();
        let tenants = HashMap::from([("a".into(), tenant(0, false))]);
        let rules = Rules {
            sources: HashSet::new(),
            fields: FieldMap::default(),
            closed: HashSet::new(),
        };
        let b = number(&parsed, &tenants, &rules, &Ok(HashMap::new()), "t");
        assert_eq!(b.resets, vec!["a".to_string()]);
        let ids: Vec<(i64, &str)> = b.events.iter().map(|e| (e.id, e.kind.as_str())).collect();
        assert_eq!(ids, vec![(0, TENANT_RESET), (1, "loyalty_updated")]);
    }

    #[test]
    fn unbuildable_rows_become_emit_failed_for_their_tenant() {
        let rows = [
            staged(
                1,
                "new_order",
                r#"{"tenant_slug":"a","id":"84df662a-a9f1-4dab-8c40-daa588ddc749","order_source":"online"}"#,
            ),
            staged(2, "mystery", r#"{"tenant_slug":"a"}"#),
            staged(
                3,
                "loyalty_updated",
                r#"{"customer_id":"no tenant column"}"#,
            ),
        ];
        let parsed: Vec<Parsed<'_>> = rows.iter().map(Parsed::new).collect();
        let tenants = HashMap::from([("a".into(), tenant(0, true))]);
        let rules = Rules {
            sources: HashSet::from(["online".to_string()]),
            fields: FieldMap::default(),
            closed: HashSet::new(),
        };
        let b = number(
            &parsed,
            &tenants,
            &rules,
            &Err("relation renamed".into()),
            "t",
        );
        assert_eq!(b.failures.len(), 3);
        assert_eq!(b.failures[2].1, None);
        let kinds: Vec<&str> = b.events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, vec!["resync_required", "resync_required"]);
        assert!(b.events[0].data.contains("emit_failed"));
    }

    #[test]
    fn orders_are_recorded_for_acknowledgement_and_closed_by_a_closed_status() {
        let order = |gid, kind: &str, id: &str, status: &str| {
            staged(
                gid,
                kind,
                &format!(
                    r#"{{"tenant_slug":"a","id":"{id}","order_number":"N-{gid}","order_source":"online","status":"{status}"}}"#
                ),
            )
        };
        let rows = [
            order(1, "new_order", "o1", "pending"),
            order(2, "new_order", "o2", "pending"),
            // o2 is closed in the batch that numbers it: its row is written closed.
            order(3, "order_updated", "o2", "completed"),
            // o3 was numbered earlier: its row is closed by id.
            order(4, "order_updated", "o3", "cancelled"),
            // Not a closed status: nothing to record.
            order(5, "order_updated", "o1", "ready"),
            // Created closed.
            order(6, "new_order", "o4", "completed"),
        ];
        let parsed: Vec<Parsed<'_>> = rows.iter().map(Parsed::new).collect();
        let tenants = HashMap::from([("a".into(), tenant(10, true))]);
        let rules = Rules {
            sources: HashSet::from(["online".to_string()]),
            fields: FieldMap::default(),
            closed: HashSet::from(["completed".to_string(), "cancelled".to_string()]),
        };
        let b = number(&parsed, &tenants, &rules, &Ok(HashMap::new()), "t");
        let orders: Vec<(i64, Option<&str>, Option<&str>, bool)> = b
            .orders
            .iter()
            .map(|o| {
                (
                    o.event_id,
                    o.order_id.as_deref(),
                    o.number.as_deref(),
                    o.closed,
                )
            })
            .collect();
        assert_eq!(
            orders,
            vec![
                (11, Some("o1"), Some("N-1"), false),
                (12, Some("o2"), Some("N-2"), true),
                (16, Some("o4"), Some("N-6"), true),
            ]
        );
        assert_eq!(b.closed, vec![("a".to_string(), "o3".to_string())]);
    }

    #[test]
    fn uuids_are_recognised() {
        assert!(is_uuid("84df662a-a9f1-4dab-8c40-daa588ddc749"));
        assert!(!is_uuid("84df662a-a9f1-4dab-8c40-daa588ddc74"));
        assert!(!is_uuid("84df662a_a9f1-4dab-8c40-daa588ddc749"));
        assert!(!is_uuid("42"));
    }
}
