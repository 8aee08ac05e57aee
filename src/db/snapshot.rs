//! The open orders of a tenant, read in one REPEATABLE READ transaction together with the event
//! id they are consistent with (`?snapshot=open`, docs/protocol.md).

use super::DbError;

/// How far back an order's time (`coalesce(scheduled_for, created_at)`) may lie for the order
/// to count as open: a kitchen's working day and the next, and every pre-order still to come.
pub(crate) const OPEN_WINDOW_HOURS: i32 = 48;

/// A tenant's open orders as of one snapshot.
#[derive(Debug, Default)]
pub(crate) struct OpenOrders {
    /// The tenant's last event id in the same snapshot: every change the orders do not show
    /// yet comes with a larger id.
    pub head: i64,
    /// Each open order's row and its items (`to_jsonb` texts), oldest first, at most the limit
    /// asked for.
    pub orders: Vec<(String, String)>,
    /// The DBA's column-name overrides: (event kind, field, column).
    pub columns: Vec<(String, String, String)>,
}

/// Reads the open orders of `tenant` (at most `limit`) and the id they are consistent with, in
/// one read-only REPEATABLE READ transaction: an order changed after the snapshot has an event
/// with a larger id, which the socket sends live.
pub(crate) async fn open_orders(
    client: &tokio_postgres::Client,
    tenant: &str,
    limit: i64,
) -> Result<OpenOrders, DbError> {
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let result = read(client, tenant, limit).await;
    // A failed read leaves the transaction aborted: end it either way, so the pooled
    // connection goes back clean.
    let end = client.batch_execute(if result.is_ok() { "COMMIT" } else { "ROLLBACK" });
    let ended = end.await;
    let snapshot = result?;
    ended?;
    Ok(snapshot)
}

async fn read(
    client: &tokio_postgres::Client,
    tenant: &str,
    limit: i64,
) -> Result<OpenOrders, DbError> {
    let head: i64 = client
        .query_one(
            "SELECT coalesce((SELECT h.seq FROM orderpush.heads h
                              WHERE h.tenant_slug = $1
                                AND h.tenant_created_at IS NOT DISTINCT FROM
                                    (SELECT created_at FROM public.tenants WHERE slug = $1)), 0)",
            &[&tenant],
        )
        .await?
        .get(0);
    let rows = client
        .query(
            // Printed the way the sequencer prints a `new_order` (db/sequencer.rs), so a
            // snapshot renders an order exactly as its live event did.
            "SELECT to_json(o)::text,
                    coalesce((SELECT json_agg(i ORDER BY i.id)
                              FROM public.order_items i WHERE i.order_id = o.id), '[]')::text
             FROM public.orders o
             WHERE o.tenant_slug = $1
               AND NOT EXISTS (SELECT 1 FROM orderpush.closed_statuses c WHERE c.status = o.status)
               AND coalesce(o.scheduled_for, o.created_at) >= now() - make_interval(hours => $3)
             ORDER BY coalesce(o.scheduled_for, o.created_at), o.id
             LIMIT $2",
            &[&tenant, &limit, &OPEN_WINDOW_HOURS],
        )
        .await?;
    let columns = client
        .query(
            "SELECT kind, field, column_name FROM orderpush.field_columns",
            &[],
        )
        .await?;
    Ok(OpenOrders {
        head,
        orders: rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
        columns: columns
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect(),
    })
}
