//! Queries on the event log (`orderpush.events`) and the per-tenant heads: replaying a tenant's
//! history, the listener's reads by batch, and retention.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_postgres::{GenericClient, Row, Statement};

use super::DbError;
use crate::event::{Event, Origin};

const EVENT_COLUMNS: &str = "e.tenant_slug, e.id, e.type, e.ts, e.data::text, e.origin, \
                             extract(epoch FROM e.emitted_at)::float8, e.truncated";

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
            truncated: row.try_get(7).unwrap_or(false),
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

/// Where the listener is in the log: the last row it handed on, in log order (batch, then
/// tenant, then id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LogPosition {
    batch: i64,
    tenant: String,
    id: i64,
}

impl LogPosition {
    /// Just after every row of `batch` (and before every row of the next one).
    pub(crate) fn after_batch(batch: i64) -> Self {
        // The empty tenant sorts before every slug and -1 before every id, so "after (b+1, '',
        // -1)" is "from the first row of batch b+1".
        Self {
            batch: batch + 1,
            tenant: String::new(),
            id: -1,
        }
    }

    /// The last batch read completely or in part.
    pub(crate) fn batch_read(&self) -> i64 {
        if self.id < 0 {
            self.batch - 1
        } else {
            self.batch
        }
    }
}

/// The log's position as the sequencer last committed it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LogState {
    /// The last committed batch.
    pub batch: i64,
    /// The elected sequencer's epoch (random per election).
    pub epoch: i64,
    /// The first batch of that epoch.
    pub epoch_first_batch: i64,
}

/// The log's position and every tenant's head, from one snapshot: where a listener starts.
pub async fn start(client: &impl GenericClient) -> Result<(i64, Vec<(String, i64)>), DbError> {
    let rows = client
        .query(
            "SELECT l.batch, h.tenant_slug, h.seq FROM orderpush.log_state l
             LEFT JOIN orderpush.heads h ON true",
            &[],
        )
        .await?;
    let batch = rows.first().map_or(0, |r| r.get(0));
    let heads = rows
        .iter()
        .filter_map(|r| Some((r.get::<_, Option<String>>(1)?, r.get(2))))
        .collect();
    Ok((batch, heads))
}

/// The listener's statements, prepared once per connection: under load they run hundreds of
/// times a second, and parsing and planning them each time would cost more than running them.
pub(crate) struct FollowQueries {
    state: Statement,
    after: Statement,
    staged_age: Statement,
}

impl FollowQueries {
    /// Prepares the statements on the listener's connection.
    pub async fn prepare(client: &impl GenericClient) -> Result<Self, DbError> {
        // Rows after the position, in log order. Only one committer ever writes the log and each
        // batch commits whole, so nothing can appear later behind a position already read.
        let after = format!(
            "SELECT {EVENT_COLUMNS}, e.batch, e.gid FROM orderpush.events e
             WHERE e.batch >= $1 AND (e.batch, e.tenant_slug, e.id) > ($1, $2, $3)
             ORDER BY e.batch, e.tenant_slug, e.id LIMIT $4"
        );
        Ok(Self {
            state: client
                .prepare("SELECT batch, epoch, epoch_first_batch FROM orderpush.log_state")
                .await?,
            after: client.prepare(&after).await?,
            staged_age: client
                .prepare(
                    "SELECT extract(epoch FROM now() - (SELECT staged_at FROM orderpush.staged
                                                        ORDER BY gid LIMIT 1))::float8",
                )
                .await?,
        })
    }

    /// The log's position as last committed.
    pub async fn state(&self, client: &impl GenericClient) -> Result<LogState, DbError> {
        let row = client.query_one(&self.state, &[]).await?;
        Ok(LogState {
            batch: row.get(0),
            epoch: row.get(1),
            epoch_first_batch: row.get(2),
        })
    }

    /// At most `limit` events after `position`, in log order, each with its position and the
    /// staged row it came from.
    pub(crate) async fn read_after(
        &self,
        client: &impl GenericClient,
        position: &LogPosition,
        limit: i64,
    ) -> Result<Vec<(LogPosition, Option<i64>, Event)>, DbError> {
        let rows = client
            .query(
                &self.after,
                &[&position.batch, &position.tenant, &position.id, &limit],
            )
            .await?;
        let mut out: Vec<(LogPosition, Option<i64>, Event)> = Vec::with_capacity(rows.len());
        for row in &rows {
            // Share the tenant string among a tenant's consecutive rows.
            let same = out
                .last()
                .filter(|(_, _, e)| *e.tenant == *row.get::<_, &str>(0))
                .map(|(_, _, e)| Arc::clone(&e.tenant));
            let event = event_from_row(row, same.as_ref());
            let position = LogPosition {
                batch: row.try_get(8).unwrap_or(position.batch),
                tenant: event.tenant.to_string(),
                id: event.id,
            };
            out.push((position, row.try_get(9).unwrap_or(None), event));
        }
        Ok(out)
    }

    /// Seconds the oldest staged row has waited to be numbered (`None`: none waits).
    pub(crate) async fn oldest_staged_age(
        &self,
        client: &impl GenericClient,
    ) -> Result<Option<f64>, DbError> {
        Ok(client.query_one(&self.staged_age, &[]).await?.get(0))
    }

    /// Each tenant's head as it was after `batch`: its head now, less the events numbered since
    /// (ids are gap-free, so that count is the difference). For a log that was rewound.
    pub(crate) async fn heads_at(
        &self,
        client: &impl GenericClient,
        batch: i64,
    ) -> Result<Vec<(String, i64)>, DbError> {
        let rows = client
            .query(
                "SELECT h.tenant_slug, h.seq - coalesce(n.later, 0) FROM orderpush.heads h
                 LEFT JOIN (SELECT tenant_slug, count(*) AS later FROM orderpush.events
                            WHERE batch > $1 AND id > 0 GROUP BY tenant_slug) n USING (tenant_slug)",
                &[&batch],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
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
        "SELECT {EVENT_COLUMNS} FROM orderpush.heads s
         CROSS JOIN LATERAL (
             SELECT * FROM orderpush.events x
             WHERE x.tenant_slug = s.tenant_slug AND x.id <= s.seq AND x.id > 0
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
            "SELECT coalesce((SELECT h.seq FROM orderpush.heads h
                              WHERE h.tenant_slug = $1
                                AND h.tenant_created_at IS NOT DISTINCT FROM t.created_at), 0),
                    (SELECT min(e.id) FROM orderpush.events e
                     WHERE e.tenant_slug = $1 AND e.id > 0
                       AND e.emitted_at >= coalesce(t.created_at, '-infinity'))
             FROM (SELECT (SELECT created_at FROM public.tenants WHERE slug = $1) AS created_at) t",
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
               -- Only this tenant's: not those of an earlier tenant under the same slug.
               AND x.emitted_at >= coalesce((SELECT created_at FROM public.tenants
                                             WHERE slug = $1), '-infinity')
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

/// Whether the database has orderpush's event log (the migrations were applied).
pub async fn installed(client: &impl GenericClient) -> Result<bool, DbError> {
    Ok(client
        .query_one("SELECT to_regclass('orderpush.events') IS NOT NULL", &[])
        .await?
        .get(0))
}

/// Rows deleted per retention statement: small enough that each DELETE holds its row locks for
/// milliseconds and never blocks writers (they never touch old rows anyway).
pub(crate) const PRUNE_BATCH: i64 = 5_000;

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
            break;
        }
    }
    // The bookkeeping beside the log: failures are kept as long as events, idempotency keys for
    // their fixed window (docs/protocol.md).
    client
        .execute(
            "DELETE FROM orderpush.emit_failures WHERE failed_at < now() - $1::float8 * interval '1 second'",
            &[&secs],
        )
        .await?;
    client
        .execute(
            "DELETE FROM orderpush.order_acks WHERE numbered_at < now() - $1::float8 * interval '1 second'",
            &[&secs],
        )
        .await?;
    client
        .execute(
            "DELETE FROM orderpush.broadcast_requests
             WHERE created_at < now() - $1::float8 * interval '1 second'",
            &[&super::broadcasts::IDEMPOTENCY_WINDOW.as_secs_f64()],
        )
        .await?;
    Ok(total)
}
