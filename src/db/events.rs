//! Queries on the event log (`orderpush.events`) and the per-tenant counters: publishing a
//! broadcast, replaying a tenant's history, the listener's catch-up scan, and retention.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_postgres::{GenericClient, Row, Statement};

use super::DbError;
use crate::event::{Event, Origin};

const EVENT_COLUMNS: &str = "e.tenant_slug, e.id, e.type, e.ts, e.data::text, e.origin, \
                             extract(epoch FROM e.emitted_at)::float8";

fn event_from_row(row: &Row, tenant: Option<&Arc<str>>) -> Event {
    let tenant = match tenant {
        Some(t) => Arc::clone(t),
        None => Arc::from(row.try_get::<_, &str>(0).unwrap_or("")),
    };
    let id: i64 = row.try_get(1).unwrap_or(0);
    match decode_row(row) {
        Ok((kind, timestamp, data, origin, emitted_at)) => Event {
            tenant,
            id,
            kind,
            timestamp,
            data,
            origin,
            emitted_at,
        },
        Err(reason) => {
            // Never panic or skip on a row we cannot read: the POS is told to refetch instead
            // (docs/protocol.md, `bad_event`), and the operator sees which row it was.
            tracing::warn!(tenant = %tenant.escape_debug(), id, reason, "undecodable event row; sending resync_required");
            Event::bad(tenant, id)
        }
    }
}

/// The columns of an event row after the tenant and id, or why they cannot be used.
fn decode_row(row: &Row) -> Result<(String, String, String, Origin, SystemTime), &'static str> {
    let kind: String = row.try_get(2).map_err(|_| "type is not text")?;
    let timestamp: String = row.try_get(3).map_err(|_| "ts is not text")?;
    let data: String = row.try_get(4).map_err(|_| "data is not readable")?;
    let origin: &str = row.try_get(5).map_err(|_| "origin is not text")?;
    let emitted: f64 = row.try_get(6).map_err(|_| "emitted_at is not a time")?;
    // `infinity` and dates beyond what SystemTime holds are not times an event was written at.
    let emitted_at = Duration::try_from_secs_f64(emitted)
        .ok()
        .and_then(|d| SystemTime::UNIX_EPOCH.checked_add(d))
        .ok_or("emitted_at is not a finite time after 1970")?;
    if serde_json::from_str::<serde::de::IgnoredAny>(&data).is_err() {
        return Err("data is not valid JSON");
    }
    Ok((kind, timestamp, data, Origin::from_db(origin), emitted_at))
}

/// One explicit push from `POST /broadcast`, already validated.
#[derive(Debug, Clone)]
pub struct Broadcast {
    /// Tenant slug.
    pub tenant: String,
    /// Event type.
    pub kind: String,
    /// The envelope timestamp as given, or `None` to let the database stamp it.
    pub timestamp: Option<String>,
    /// `event.data` as JSON text.
    pub data: String,
}

/// Appends broadcasts to the log in one transaction and one statement. Returns, per broadcast
/// (same order as `batch`), its id, or `None` when its tenant does not exist (that one writes
/// nothing; the others still do).
///
/// The requests of a batch are concurrent, so any order among them is a valid one; rows are
/// emitted in tenant order so that two instances' batches lock `tenant_seq` rows in the same
/// order and cannot deadlock. A client's own sequential requests are in different batches (it
/// waits for each answer), so their order is kept.
pub async fn append_broadcasts(
    client: &mut deadpool_postgres::Object,
    batch: &[Broadcast],
) -> Result<Vec<Option<i64>>, DbError> {
    let tenants: Vec<&str> = batch.iter().map(|b| b.tenant.as_str()).collect();
    let kinds: Vec<&str> = batch.iter().map(|b| b.kind.as_str()).collect();
    let data: Vec<&str> = batch.iter().map(|b| b.data.as_str()).collect();
    let stamps: Vec<Option<&str>> = batch.iter().map(|b| b.timestamp.as_deref()).collect();
    let tx = client.transaction().await?;
    let stmt = tx
        .prepare_cached(
            "SELECT b.i, orderpush.emit(b.tenant, b.kind, b.data::json, b.ts, 'broadcast')
             FROM (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
                       WITH ORDINALITY AS u(tenant, kind, data, ts, i)
                   WHERE EXISTS (SELECT 1 FROM public.tenants t WHERE t.slug = u.tenant)
                   ORDER BY u.tenant, u.i OFFSET 0) b",
        )
        .await?;
    let rows = tx.query(&stmt, &[&tenants, &kinds, &data, &stamps]).await?;
    tx.commit().await?;
    let mut ids = vec![None; batch.len()];
    for row in rows {
        let i: i64 = row.get(0);
        if let Some(slot) = usize::try_from(i - 1).ok().and_then(|i| ids.get_mut(i)) {
            *slot = Some(row.get::<_, i64>(1));
        }
    }
    Ok(ids)
}

/// Every tenant's latest id (`orderpush.tenant_seq`): which tenants have moved.
pub async fn heads(client: &impl GenericClient) -> Result<Vec<(String, i64)>, DbError> {
    let rows = client.query(HEADS_SQL, &[]).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

const HEADS_SQL: &str = "SELECT tenant_slug, seq FROM orderpush.tenant_seq";

/// The listener's two queries, prepared once per connection: under load they run hundreds of
/// times a second, and parsing and planning them each time cost the database more than running
/// them.
pub struct FollowQueries {
    heads: Statement,
    ranges: Statement,
}

impl FollowQueries {
    /// Prepares both statements on the listener's connection.
    pub async fn prepare(client: &impl GenericClient) -> Result<Self, DbError> {
        let ranges = format!(
            "SELECT {EVENT_COLUMNS}
             FROM unnest($1::text[], $2::int8[], $3::int8[]) AS c(tenant, after, upto)
             JOIN orderpush.events e
               ON e.tenant_slug = c.tenant AND e.id > c.after AND e.id <= c.upto
             ORDER BY e.tenant_slug, e.id LIMIT $4"
        );
        Ok(Self {
            heads: client.prepare(HEADS_SQL).await?,
            ranges: client.prepare(&ranges).await?,
        })
    }

    /// Every tenant's latest id, as [`heads`].
    pub async fn heads(&self, client: &impl GenericClient) -> Result<Vec<(String, i64)>, DbError> {
        let rows = client.query(&self.heads, &[]).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// For each `(tenant, after, upto)`, the events with `after < id <= upto`, ordered by
    /// tenant then id, at most `limit` rows in all. `upto` comes from [`FollowQueries::heads`]:
    /// every id up to a committed head is committed too, so the rows returned per tenant are
    /// contiguous.
    pub async fn read_ranges(
        &self,
        client: &impl GenericClient,
        ranges: &[(Arc<str>, i64, i64)],
        limit: i64,
    ) -> Result<Vec<Event>, DbError> {
        let tenants: Vec<&str> = ranges.iter().map(|r| &*r.0).collect();
        let afters: Vec<i64> = ranges.iter().map(|r| r.1).collect();
        let uptos: Vec<i64> = ranges.iter().map(|r| r.2).collect();
        let rows = client
            .query(&self.ranges, &[&tenants, &afters, &uptos, &limit])
            .await?;
        let mut out: Vec<Event> = Vec::with_capacity(rows.len());
        for row in &rows {
            // Share the tenant string among a tenant's consecutive rows.
            let same = out
                .last()
                .filter(|e| *e.tenant == *row.get::<_, &str>(0))
                .map(|e| Arc::clone(&e.tenant));
            out.push(event_from_row(row, same.as_ref()));
        }
        Ok(out)
    }
}

/// Each tenant's newest events (at most `per_tenant`, emitted within `window`), ordered by
/// tenant then id: the hub's resume history at start-up.
pub async fn recent(
    client: &impl GenericClient,
    per_tenant: i64,
    window: Duration,
) -> Result<Vec<Event>, DbError> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM orderpush.tenant_seq s
         CROSS JOIN LATERAL (
             SELECT * FROM orderpush.events x
             WHERE x.tenant_slug = s.tenant_slug AND x.id <= s.seq
               AND x.emitted_at > now() - $2::float8 * interval '1 second'
             ORDER BY x.id DESC LIMIT $1) e
         ORDER BY e.tenant_slug, e.id"
    );
    let rows = client
        .query(&sql, &[&per_tenant, &window.as_secs_f64()])
        .await?;
    Ok(rows.iter().map(|r| event_from_row(r, None)).collect())
}

/// A tenant's latest id (0 when it never had an event) and its oldest retained id (`None` when
/// the log holds none of its events), in one round trip of two primary-key lookups: what a
/// replay needs to know before it reads anything.
pub async fn bounds(
    client: &impl GenericClient,
    tenant: &str,
) -> Result<(i64, Option<i64>), DbError> {
    let row = client
        .query_one(
            "SELECT coalesce((SELECT seq FROM orderpush.tenant_seq WHERE tenant_slug = $1), 0),
                    (SELECT min(id) FROM orderpush.events WHERE tenant_slug = $1)",
            &[&tenant],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// One page of a tenant's replay: its events with `after < id <= upto`, in order, at most
/// `limit` rows and only as many as start within `max_bytes` of event data (always at least
/// one), so a page of near-maximal events is as bounded in memory as a page of small ones.
pub async fn replay(
    client: &impl GenericClient,
    tenant: &Arc<str>,
    after: i64,
    upto: i64,
    limit: i64,
    max_bytes: i64,
) -> Result<Vec<Event>, DbError> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM (
             SELECT x.*, sum(octet_length(x.data::text)) OVER (ORDER BY x.id) AS running
             FROM orderpush.events x
             WHERE x.tenant_slug = $1 AND x.id > $2 AND x.id <= $3
             ORDER BY x.id LIMIT $4) e
         WHERE e.running - octet_length(e.data::text) < $5
         ORDER BY e.id"
    );
    let rows = client
        .query(&sql, &[&&**tenant, &after, &upto, &limit, &max_bytes])
        .await?;
    Ok(rows
        .iter()
        .map(|r| event_from_row(r, Some(tenant)))
        .collect())
}

/// Rows deleted per retention statement: small enough that each DELETE holds its row locks for
/// milliseconds and never blocks writers (they never touch old rows anyway).
pub const PRUNE_BATCH: i64 = 5_000;

/// Deletes events older than `older_than`, in batches. Per tenant only a prefix of ids is ever
/// deleted (everything up to the newest expired id), so the retained range has no holes even
/// when commit order and timestamps disagree. Returns the number of rows deleted.
pub async fn prune(client: &impl GenericClient, older_than: Duration) -> Result<u64, DbError> {
    let stmt = client
        .prepare(
            "WITH cut AS (
                 SELECT tenant_slug, max(id) AS upto FROM orderpush.events
                 WHERE emitted_at < now() - $1::float8 * interval '1 second'
                 GROUP BY tenant_slug),
             doomed AS (
                 SELECT e.tenant_slug, e.id FROM orderpush.events e
                 JOIN cut ON e.tenant_slug = cut.tenant_slug AND e.id <= cut.upto
                 ORDER BY e.tenant_slug, e.id LIMIT $2)
             DELETE FROM orderpush.events e USING doomed
             WHERE e.tenant_slug = doomed.tenant_slug AND e.id = doomed.id",
        )
        .await?;
    let secs = older_than.as_secs_f64();
    let mut total = 0;
    loop {
        let n = client.execute(&stmt, &[&secs, &PRUNE_BATCH]).await?;
        total += n;
        if n < PRUNE_BATCH as u64 {
            return Ok(total);
        }
    }
}
