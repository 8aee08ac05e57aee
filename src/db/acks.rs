//! The acknowledgement chain in the database (`orderpush.order_acks`, docs/protocol.md
//! "Acknowledge"): when each order first reached a terminal and when, and by which terminal, it
//! was first acknowledged; which orders wait past their tenant's timeout, and the claim of an
//! order by the instance that warns about it.

use serde::Serialize;
use tokio_postgres::GenericClient;

use super::DbError;

/// The orders waiting for an acknowledgement past their tenant's timeout: not acknowledged,
/// not closed, the timeout not off (0). `$1` is the service's `--ack-timeout` in seconds (0 =
/// off), which `orderpush.tenant_settings.ack_timeout_seconds` overrides per tenant. Reads the
/// partial index `order_acks_waiting_idx`, which holds only orders still waiting.
macro_rules! overdue_orders {
    () => {
        "FROM orderpush.order_acks a
         LEFT JOIN orderpush.tenant_settings s ON s.tenant_slug = a.tenant_slug
         WHERE a.first_acked_at IS NULL AND a.closed_at IS NULL
           AND coalesce(s.ack_timeout_seconds, $1) > 0
           AND a.numbered_at <= now() - make_interval(secs => coalesce(s.ack_timeout_seconds, $1))"
    };
}

/// The columns of an [`Overdue`] order, in [`overdue_row`]'s order (`$1` is the default timeout).
macro_rules! overdue_columns {
    () => {
        "a.tenant_slug, a.order_id, a.order_number, a.event_id, orderpush.iso(a.numbered_at),
         orderpush.iso(a.first_delivered_at), extract(epoch FROM now() - a.numbered_at)::float8"
    };
}

/// What one terminal received and acknowledged, as its instance knows it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress<'a> {
    /// Its tenant.
    pub tenant: &'a str,
    /// The public id of its key.
    pub key_id: &'a str,
    /// The last event id written to it.
    pub delivered: Option<i64>,
    /// The last event id it acknowledged (everything up to it is acknowledged).
    pub acked: Option<i64>,
}

/// An order that was warned about and has now been acknowledged.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AckedLate {
    /// Its tenant.
    pub tenant: String,
    /// Its number.
    pub order_number: Option<String>,
    /// Its `new_order` event id.
    pub event_id: i64,
    /// Seconds from numbering to the acknowledgement.
    pub waited_seconds: f64,
}

/// Records what terminals received and acknowledged: every order of the tenant up to what a
/// terminal received is delivered, up to what it acknowledged is acknowledged (by the terminal
/// that acknowledged the least that still covers it). Only first times are kept, so recording
/// the same progress again changes nothing. Returns the orders already warned about that are
/// acknowledged now.
///
/// Rows are locked in (tenant, event id) order, the order every writer of these rows takes, so
/// instances recording for one tenant at once wait for each other instead of deadlocking.
pub(crate) async fn record(
    client: &impl GenericClient,
    progress: &[Progress<'_>],
) -> Result<Vec<AckedLate>, DbError> {
    if progress.is_empty() {
        return Ok(Vec::new());
    }
    let tenants: Vec<&str> = progress.iter().map(|p| p.tenant).collect();
    let keys: Vec<&str> = progress.iter().map(|p| p.key_id).collect();
    let delivered: Vec<Option<i64>> = progress.iter().map(|p| p.delivered).collect();
    let acked: Vec<Option<i64>> = progress.iter().map(|p| p.acked).collect();
    let rows = client
        .query(
            "WITH p AS (
                 SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[])
                     AS p(tenant, key_id, delivered, acked)),
             m AS (
                 SELECT tenant, max(greatest(delivered, acked)) AS seen, max(acked) AS acked
                 FROM p GROUP BY tenant),
             target AS (
                 SELECT a.tenant_slug, a.event_id,
                        coalesce(a.first_acked_at IS NULL AND a.event_id <= m.acked, false) AS acking
                 FROM orderpush.order_acks a
                 JOIN m ON m.tenant = a.tenant_slug
                 WHERE (a.first_delivered_at IS NULL AND a.event_id <= m.seen)
                    OR (a.first_acked_at IS NULL AND a.event_id <= m.acked)
                 ORDER BY a.tenant_slug, a.event_id
                 FOR UPDATE OF a),
             done AS (
                 UPDATE orderpush.order_acks a
                 SET first_delivered_at = coalesce(a.first_delivered_at, now()),
                     first_acked_at = CASE WHEN t.acking AND a.first_acked_at IS NULL
                                           THEN now() ELSE a.first_acked_at END,
                     acked_by_key = CASE WHEN t.acking AND a.first_acked_at IS NULL
                                         THEN (SELECT p.key_id FROM p
                                               WHERE p.tenant = a.tenant_slug
                                                 AND p.acked >= a.event_id
                                               ORDER BY p.acked, p.key_id LIMIT 1)
                                         ELSE a.acked_by_key END
                 FROM target t
                 WHERE a.tenant_slug = t.tenant_slug AND a.event_id = t.event_id
                 RETURNING a.tenant_slug, a.order_number, a.event_id, t.acking, a.alerted_at,
                           a.numbered_at)
             SELECT tenant_slug, order_number, event_id,
                    extract(epoch FROM now() - numbered_at)::float8
             FROM done WHERE acking AND alerted_at IS NOT NULL",
            &[&tenants, &keys, &delivered, &acked],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| AckedLate {
            tenant: r.get(0),
            order_number: r.get(1),
            event_id: r.get(2),
            waited_seconds: r.get(3),
        })
        .collect())
}

/// An order waiting for an acknowledgement past its tenant's timeout.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Overdue {
    /// Its tenant.
    pub tenant: String,
    /// The order's id.
    pub order_id: Option<String>,
    /// Its number.
    pub order_number: Option<String>,
    /// Its `new_order` event id.
    pub event_id: i64,
    /// When it was numbered (ISO 8601).
    pub numbered_at: String,
    /// When it first reached a terminal (ISO 8601); `None`: it never did (undelivered).
    pub first_delivered_at: Option<String>,
    /// Seconds since it was numbered.
    pub waited_seconds: f64,
    /// The tenant's timeout in seconds.
    pub timeout_seconds: i32,
}

impl Overdue {
    /// It never reached a terminal (as opposed to reached one and not acknowledged).
    pub fn undelivered(&self) -> bool {
        self.first_delivered_at.is_none()
    }
}

fn overdue_row(r: &tokio_postgres::Row) -> Overdue {
    Overdue {
        tenant: r.get(0),
        order_id: r.get(1),
        order_number: r.get(2),
        event_id: r.get(3),
        numbered_at: r.get(4),
        first_delivered_at: r.get(5),
        waited_seconds: r.get(6),
        timeout_seconds: r.get(7),
    }
}

/// Claims up to `limit` overdue orders not warned about yet, oldest first, and returns them: the
/// caller warns about each. Every instance may run it; an order is claimed once (rows another
/// instance is claiming are skipped, not waited for). `default_timeout` is `--ack-timeout` in
/// seconds (0 = off).
pub(crate) async fn claim_overdue(
    client: &impl GenericClient,
    default_timeout: i32,
    limit: i64,
) -> Result<Vec<Overdue>, DbError> {
    let rows = client
        .query(
            concat!(
                "WITH due AS (
                     SELECT a.tenant_slug, a.event_id, coalesce(s.ack_timeout_seconds, $1) AS timeout ",
                overdue_orders!(),
                "      AND a.alerted_at IS NULL
                     ORDER BY a.numbered_at, a.tenant_slug, a.event_id
                     LIMIT $2
                     FOR UPDATE OF a SKIP LOCKED)
                 UPDATE orderpush.order_acks a SET alerted_at = now()
                 FROM due
                 WHERE a.tenant_slug = due.tenant_slug AND a.event_id = due.event_id
                 RETURNING ",
                overdue_columns!(),
                ", due.timeout"
            ),
            &[&default_timeout, &limit],
        )
        .await?;
    let mut due: Vec<Overdue> = rows.iter().map(overdue_row).collect();
    due.sort_by(|a, b| a.numbered_at.cmp(&b.numbered_at));
    Ok(due)
}

/// Overdue orders, oldest first, of one tenant or of all (at most `limit`), whether warned about
/// yet or not.
pub async fn overdue(
    client: &impl GenericClient,
    tenant: Option<&str>,
    default_timeout: i32,
    limit: i64,
) -> Result<Vec<Overdue>, DbError> {
    let rows = client
        .query(
            concat!(
                "SELECT ",
                overdue_columns!(),
                ", coalesce(s.ack_timeout_seconds, $1) ",
                overdue_orders!(),
                "  AND ($3::text IS NULL OR a.tenant_slug = $3)
                 ORDER BY a.numbered_at, a.tenant_slug, a.event_id
                 LIMIT $2"
            ),
            &[&default_timeout, &limit, &tenant],
        )
        .await?;
    Ok(rows.iter().map(overdue_row).collect())
}

/// How many orders are overdue, cluster-wide: (never delivered, delivered but not acknowledged).
pub(crate) async fn overdue_counts(
    client: &impl GenericClient,
    default_timeout: i32,
) -> Result<(i64, i64), DbError> {
    let row = client
        .query_one(
            concat!(
                "SELECT count(*) FILTER (WHERE a.first_delivered_at IS NULL),
                        count(*) FILTER (WHERE a.first_delivered_at IS NOT NULL) ",
                overdue_orders!()
            ),
            &[&default_timeout],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}
