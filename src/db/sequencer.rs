//! The sequencer's queries: election, reading staged rows and what renders them, and writing a
//! numbered batch to the event log in one statement (docs/architecture.md, "The write path").

use std::collections::{HashMap, HashSet};

use tokio_postgres::{Client, Statement};

use super::DbError;

/// Session advisory lock that elects the one sequencer: key (28528, 2). 28528 is 0x6f70, 'op' in
/// ASCII, orderpush's private advisory-lock namespace (1 is the wake-up gate of the triggers).
const ELECTION_LOCK: (i32, i32) = (28528, 2);

/// The NOTIFY channel the sequencer announces each committed batch on (payload: the batch).
pub(crate) const BATCH_CHANNEL: &str = "orderpush_events";
/// The NOTIFY channel the triggers and /broadcast wake the sequencer on.
pub(crate) const STAGED_CHANNEL: &str = "orderpush";

/// Server-side settings of the sequencer's session, sent once per connection.
///
/// - The TCP settings make the *server* notice a sequencer host that vanished (power loss, a
///   partition): its backend then exits and releases the election lock, so another instance
///   takes over within about 30 s (keepalive probes after 5 s idle, 5 s apart, 3 lost = 20 s;
///   unacknowledged data gives up after 20 s). A process that dies cleanly closes its socket,
///   and the lock is free at once.
/// - UTC and ISO dates make every timestamp this session prints comparable as text.
/// - The statement timeout bounds a batch that would otherwise hold rows for long.
const SESSION_SETTINGS: &str = "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 5; \
     SET tcp_keepalives_count = 3; SET tcp_user_timeout = 20000; SET TimeZone = 'UTC'; \
     SET DateStyle = 'ISO, YMD'; SET statement_timeout = '30s'";

/// Prepares the session and tries to become the sequencer. True when this session now holds the
/// election lock (until it disconnects).
pub(crate) async fn try_lead(client: &Client) -> Result<bool, DbError> {
    client.batch_execute(SESSION_SETTINGS).await?;
    let row = client
        .query_one(
            "SELECT pg_try_advisory_lock($1, $2)",
            &[&ELECTION_LOCK.0, &ELECTION_LOCK.1],
        )
        .await?;
    Ok(row.get(0))
}

/// Starts this sequencer's epoch (a random id, from the next batch on) and returns the last
/// committed batch. Followers compare epochs to notice a log that went backwards.
pub(crate) async fn start_epoch(client: &Client, epoch: i64) -> Result<i64, DbError> {
    let row = client
        .query_one(
            "UPDATE orderpush.log_state SET epoch = $1, epoch_first_batch = batch + 1
             RETURNING batch",
            &[&epoch],
        )
        .await?;
    Ok(row.get(0))
}

/// One staged row, as the trigger or /broadcast wrote it.
#[derive(Debug, Clone)]
pub(crate) struct StagedRow {
    /// Its place in the staging order.
    pub gid: i64,
    /// What it may become: `new_order`, `order_updated`, … (see the staging table).
    pub kind: String,
    /// The written row as JSON text.
    pub row: String,
    /// `order_updated`: the status and updated_at before the change.
    pub old: Option<String>,
    /// `broadcast`: `event.data` as sent.
    pub raw: Option<String>,
    /// The writer's transaction time, seconds since the epoch.
    pub staged_at: f64,
}

/// What the sequencer knows of a tenant when numbering its rows.
#[derive(Debug, Clone)]
pub(crate) struct TenantState {
    /// `tenants.created_at` as text (UTC), `None` when the tenant no longer exists.
    pub created_at: Option<String>,
    /// The same, in seconds since the epoch, to tell which incarnation a staged row belongs to.
    pub created_epoch: Option<f64>,
    /// The last id numbered for this incarnation; 0 when none.
    pub head: i64,
    /// False when the heads row counts for an earlier tenant under the same slug (or there is
    /// none): the log starts over for this one.
    pub same_incarnation: bool,
    /// A heads row exists: some tenant under this slug had events.
    pub had_events: bool,
}

/// The DBA's settings the sequencer applies (docs/dba.md, "Controls").
#[derive(Debug, Clone, Default)]
pub(crate) struct Settings {
    /// `orders.order_source` values that emit `new_order`.
    pub sources: HashSet<String>,
    /// Column-name overrides: (event kind, field, column).
    pub columns: Vec<(String, String, String)>,
    /// Order statuses that close an order (`orderpush.closed_statuses`).
    pub closed: HashSet<String>,
}

/// The sequencer's statements, prepared once per connection: they run for every batch.
pub(crate) struct SequencerQueries {
    staged: Statement,
    orders: Statement,
    tenants: Statement,
    settings: Statement,
    commit: Statement,
    reset: Statement,
}

/// An order as it is now: the row and its items, as JSON text.
#[derive(Debug, Clone)]
pub(crate) struct CurrentOrder {
    /// `to_json(orders row)`.
    pub row: String,
    /// `json_agg(item)` in id order, `[]` without items.
    pub items: String,
}

/// A numbered batch, ready to be written in one statement.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// Staged rows it consumes (numbered, dropped or failed alike).
    pub gids: Vec<i64>,
    /// Events, in id order per tenant.
    pub events: Vec<NewEvent>,
    /// Each touched tenant's new head.
    pub heads: Vec<(String, i64, Option<String>)>,
    /// Tenants whose log starts over (a new incarnation): their old events are deleted first.
    pub resets: Vec<String>,
    /// Staged rows that could not become events: (gid, tenant if known, reason).
    pub failures: Vec<(i64, Option<String>, String)>,
    /// Idempotent broadcasts numbered now: (gid, id).
    pub requests: Vec<(i64, i64)>,
    /// `new_order` events numbered now, for the acknowledgement chain.
    pub orders: Vec<NumberedOrder>,
    /// Orders whose status changed to a closed one: (tenant, order id). Their acknowledgement
    /// rows stop being overdue.
    pub closed: Vec<(String, String)>,
}

/// A `new_order` numbered in a batch: one row of `orderpush.order_acks`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NumberedOrder {
    /// Tenant slug.
    pub tenant: String,
    /// The `new_order` event's id.
    pub event_id: i64,
    /// The order's id, as text.
    pub order_id: Option<String>,
    /// The order's number.
    pub number: Option<String>,
    /// Its status is already a closed one (closed in the batch, or created closed).
    pub closed: bool,
}

/// One event to append.
#[derive(Debug, Clone)]
pub(crate) struct NewEvent {
    /// Tenant slug.
    pub tenant: String,
    /// Its id within the tenant.
    pub id: i64,
    /// Event type.
    pub kind: String,
    /// The envelope timestamp.
    pub timestamp: String,
    /// `data` as JSON text (already fitted to the frame limit).
    pub data: String,
    /// `db` or `broadcast`.
    pub origin: &'static str,
    /// The staged row it came from (`None` for markers).
    pub gid: Option<i64>,
    /// `data` was shortened.
    pub truncated: bool,
}

impl SequencerQueries {
    /// Prepares the statements on the sequencer's connection.
    pub async fn prepare(client: &Client) -> Result<Self, DbError> {
        Ok(Self {
            // The head of the queue in staging order: at most $1 rows, and no more than $2 bytes
            // beyond the first row. A prefix by gid, so that a write is never numbered before
            // one it depends on (which staged, and committed, before it).
            staged: client
                .prepare(
                    "SELECT gid, kind, row::text, old::text, raw, extract(epoch FROM staged_at)::float8
                     FROM (SELECT s.*, sum(pg_column_size(s.row) + coalesce(octet_length(s.raw), 0))
                                       OVER (ORDER BY s.gid) AS upto,
                                  pg_column_size(s.row) + coalesce(octet_length(s.raw), 0) AS size
                           FROM orderpush.staged s ORDER BY s.gid LIMIT $1) x
                     WHERE x.upto - x.size < $2
                     ORDER BY x.gid",
                )
                .await?,
            // `json`, not `jsonb`: the rows are only printed, and building `json` text skips
            // jsonb's tree, key sort and binary round trip (about a third of this query's CPU,
            // the sequencer's costliest, measured on a 1,000-order batch; docs/benchmarks.md).
            orders: client
                .prepare(
                    "SELECT o.id::text, to_json(o)::text,
                            coalesce((SELECT json_agg(i ORDER BY i.id)
                                      FROM public.order_items i WHERE i.order_id = o.id), '[]')::text
                     FROM public.orders o WHERE o.id = ANY($1::text[]::uuid[])",
                )
                .await?,
            tenants: client
                .prepare(
                    "SELECT s.slug, t.created_at::text, extract(epoch FROM t.created_at)::float8,
                            CASE WHEN h.tenant_created_at IS NOT DISTINCT FROM t.created_at
                                 THEN h.seq ELSE 0 END,
                            h.tenant_slug IS NOT NULL
                                AND h.tenant_created_at IS NOT DISTINCT FROM t.created_at,
                            h.tenant_slug IS NOT NULL
                     FROM unnest($1::text[]) AS s(slug)
                     LEFT JOIN public.tenants t ON t.slug = s.slug
                     LEFT JOIN orderpush.heads h ON h.tenant_slug = s.slug",
                )
                .await?,
            settings: client
                .prepare(
                    "SELECT 'source', order_source, NULL::text FROM orderpush.new_order_sources
                     UNION ALL
                     SELECT 'closed', status, NULL FROM orderpush.closed_statuses
                     UNION ALL
                     SELECT kind, field, column_name FROM orderpush.field_columns",
                )
                .await?,
            // One statement, one implicit transaction: consume the staged rows, append the
            // events, move the heads, record failures, answer idempotent broadcasts, and wake
            // the followers. Data-modifying CTEs all see the same snapshot, so the failures can
            // still read the rows being deleted.
            commit: client
                .prepare(
                    "WITH st AS (
                         UPDATE orderpush.log_state SET batch = batch + 1, committed_at = now()
                         RETURNING batch),
                     taken AS (DELETE FROM orderpush.staged WHERE gid = ANY($1::int8[])),
                     ev AS (
                         INSERT INTO orderpush.events
                             (tenant_slug, id, type, ts, data, origin, batch, gid, truncated, emitted_at)
                         SELECT u.tenant, u.id, u.type, u.ts, u.data::json, u.origin, st.batch, u.gid,
                                u.truncated, clock_timestamp()
                         FROM st, unnest($2::text[], $3::int8[], $4::text[], $5::text[], $6::text[],
                                         $7::text[], $8::int8[], $9::bool[])
                                  AS u(tenant, id, type, ts, data, origin, gid, truncated)),
                     hd AS (
                         INSERT INTO orderpush.heads AS h (tenant_slug, seq, tenant_created_at)
                         SELECT u.tenant, u.seq, u.created::timestamptz
                         FROM unnest($10::text[], $11::int8[], $12::text[]) AS u(tenant, seq, created)
                         ON CONFLICT (tenant_slug) DO UPDATE
                         SET seq = excluded.seq, tenant_created_at = excluded.tenant_created_at),
                     failed AS (
                         INSERT INTO orderpush.emit_failures (kind, tenant_slug, reason, row)
                         SELECT s.kind, u.tenant, u.reason, s.row
                         FROM unnest($13::int8[], $14::text[], $15::text[]) AS u(gid, tenant, reason)
                         JOIN orderpush.staged s ON s.gid = u.gid),
                     answered AS (
                         UPDATE orderpush.broadcast_requests b SET event_id = u.id
                         FROM unnest($16::int8[], $17::int8[]) AS u(gid, id)
                         WHERE b.gid = u.gid),
                     orders AS (
                         INSERT INTO orderpush.order_acks
                             (tenant_slug, event_id, order_id, order_number, closed_at)
                         SELECT u.tenant, u.id, u.order_id, u.number,
                                CASE WHEN u.closed THEN now() END
                         FROM unnest($19::text[], $20::int8[], $21::text[], $22::text[], $23::bool[])
                              AS u(tenant, id, order_id, number, closed)),
                     closed AS (
                         UPDATE orderpush.order_acks a SET closed_at = now()
                         FROM unnest($24::text[], $25::text[]) AS u(tenant, order_id)
                         WHERE a.tenant_slug = u.tenant AND a.order_id = u.order_id
                           AND a.closed_at IS NULL)
                     SELECT batch, pg_notify($18, batch::text) FROM st",
                )
                .await?,
            reset: client
                .prepare(
                    "WITH acks AS (
                         DELETE FROM orderpush.order_acks WHERE tenant_slug = ANY($1::text[]))
                     DELETE FROM orderpush.events WHERE tenant_slug = ANY($1::text[])",
                )
                .await?,
        })
    }

    /// The next staged rows, in staging order (see the statement for the bounds).
    pub async fn staged(
        &self,
        client: &Client,
        max_rows: i64,
        max_bytes: i64,
    ) -> Result<Vec<StagedRow>, DbError> {
        let rows = client.query(&self.staged, &[&max_rows, &max_bytes]).await?;
        Ok(rows
            .iter()
            .map(|r| StagedRow {
                gid: r.get(0),
                kind: r.get(1),
                row: r.get(2),
                old: r.get(3),
                raw: r.get(4),
                staged_at: r.get(5),
            })
            .collect())
    }

    /// The current row and items of each order (by id as text; ids must be UUIDs). Orders that
    /// no longer exist are absent.
    pub async fn orders(
        &self,
        client: &Client,
        ids: &[String],
    ) -> Result<HashMap<String, CurrentOrder>, DbError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let rows = client.query(&self.orders, &[&ids]).await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    CurrentOrder {
                        row: r.get(1),
                        items: r.get(2),
                    },
                )
            })
            .collect())
    }

    /// Each named tenant's incarnation and head.
    pub async fn tenants(
        &self,
        client: &Client,
        slugs: &[String],
    ) -> Result<HashMap<String, TenantState>, DbError> {
        let rows = client.query(&self.tenants, &[&slugs]).await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    TenantState {
                        created_at: r.get(1),
                        created_epoch: r.get(2),
                        head: r.get(3),
                        same_incarnation: r.get(4),
                        had_events: r.get(5),
                    },
                )
            })
            .collect())
    }

    /// The DBA's settings, read for every batch so a change applies to the next one: the order
    /// sources that emit `new_order`, and the `(kind, field, column)` overrides of column names.
    pub async fn settings(&self, client: &Client) -> Result<Settings, DbError> {
        let rows = client.query(&self.settings, &[]).await?;
        let mut settings = Settings::default();
        for r in &rows {
            let (a, b, c): (String, String, Option<String>) = (r.get(0), r.get(1), r.get(2));
            // `kind` of a column override is an event type (its CHECK), never these two words.
            match (a.as_str(), c) {
                (_, Some(column)) => settings.columns.push((a, b, column)),
                ("closed", None) => {
                    settings.closed.insert(b);
                }
                _ => {
                    settings.sources.insert(b);
                }
            }
        }
        Ok(settings)
    }

    /// Writes a batch and returns its number. Tenants that start over are reset in the same
    /// transaction.
    pub async fn commit(&self, client: &mut Client, batch: &Batch) -> Result<i64, DbError> {
        let ev = &batch.events;
        let tenants: Vec<&str> = ev.iter().map(|e| e.tenant.as_str()).collect();
        let ids: Vec<i64> = ev.iter().map(|e| e.id).collect();
        let kinds: Vec<&str> = ev.iter().map(|e| e.kind.as_str()).collect();
        let stamps: Vec<&str> = ev.iter().map(|e| e.timestamp.as_str()).collect();
        let data: Vec<&str> = ev.iter().map(|e| e.data.as_str()).collect();
        let origins: Vec<&str> = ev.iter().map(|e| e.origin).collect();
        let gids: Vec<Option<i64>> = ev.iter().map(|e| e.gid).collect();
        let truncated: Vec<bool> = ev.iter().map(|e| e.truncated).collect();
        let head_tenants: Vec<&str> = batch.heads.iter().map(|h| h.0.as_str()).collect();
        let head_seqs: Vec<i64> = batch.heads.iter().map(|h| h.1).collect();
        let head_created: Vec<Option<&str>> = batch.heads.iter().map(|h| h.2.as_deref()).collect();
        let fail_gids: Vec<i64> = batch.failures.iter().map(|f| f.0).collect();
        let fail_tenants: Vec<Option<&str>> =
            batch.failures.iter().map(|f| f.1.as_deref()).collect();
        let fail_reasons: Vec<&str> = batch.failures.iter().map(|f| f.2.as_str()).collect();
        let req_gids: Vec<i64> = batch.requests.iter().map(|r| r.0).collect();
        let req_ids: Vec<i64> = batch.requests.iter().map(|r| r.1).collect();
        let order_tenants: Vec<&str> = batch.orders.iter().map(|o| o.tenant.as_str()).collect();
        let order_events: Vec<i64> = batch.orders.iter().map(|o| o.event_id).collect();
        let order_ids: Vec<Option<&str>> =
            batch.orders.iter().map(|o| o.order_id.as_deref()).collect();
        let order_numbers: Vec<Option<&str>> =
            batch.orders.iter().map(|o| o.number.as_deref()).collect();
        let order_closed: Vec<bool> = batch.orders.iter().map(|o| o.closed).collect();
        let closed_tenants: Vec<&str> = batch.closed.iter().map(|c| c.0.as_str()).collect();
        let closed_orders: Vec<&str> = batch.closed.iter().map(|c| c.1.as_str()).collect();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 25] = [
            &batch.gids,
            &tenants,
            &ids,
            &kinds,
            &stamps,
            &data,
            &origins,
            &gids,
            &truncated,
            &head_tenants,
            &head_seqs,
            &head_created,
            &fail_gids,
            &fail_tenants,
            &fail_reasons,
            &req_gids,
            &req_ids,
            &BATCH_CHANNEL,
            &order_tenants,
            &order_events,
            &order_ids,
            &order_numbers,
            &order_closed,
            &closed_tenants,
            &closed_orders,
        ];
        if batch.resets.is_empty() {
            // The common case: one round trip, one implicit transaction.
            let row = client.query_one(&self.commit, &params).await?;
            return Ok(row.get(0));
        }
        let tx = client.transaction().await?;
        tx.execute(&self.reset, &[&batch.resets]).await?;
        let row = tx.query_one(&self.commit, &params).await?;
        tx.commit().await?;
        Ok(row.get(0))
    }
}

/// Removes dead rows from the staging table. The sequencer deletes every row it numbers; left to
/// autovacuum (which visits a database about once a minute), thousands of dead entries would
/// pile up at the head of the queue that every read walks.
pub(crate) async fn vacuum_staged(client: &Client) -> Result<(), DbError> {
    client.batch_execute("VACUUM orderpush.staged").await?;
    Ok(())
}
