//! The application's side: the writes the web app makes (orders with items, loyalty changes),
//! and the event log they must produce, to compare with what clients received.

use serde_json::Value;

/// Inserts an online order with items in one transaction (items after the order row).
pub(crate) async fn insert_order(
    client: &mut tokio_postgres::Client,
    tenant: &str,
    number: &str,
    items: usize,
) -> String {
    let tx = client.transaction().await.unwrap();
    let row = tx
        .query_one(
            "INSERT INTO orders (tenant_slug, order_number, customer_name, order_type, order_source, status, total_amount)
             VALUES ($1, $2, 'Test', 'delivery', 'online', 'confirmed', 10.00) RETURNING id::text",
            &[&tenant, &number],
        )
        .await
        .unwrap();
    let id: String = row.get(0);
    for i in 0..items {
        tx.execute(
            "INSERT INTO order_items (order_id, menu_item_id, name, quantity, price) VALUES ($1::text::uuid, $2, $3, 1, 5.00)",
            &[&id, &format!("item-{i}"), &format!("Item {i}")],
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    id
}

/// Inserts a loyalty transaction (one `loyalty_updated` event).
pub(crate) async fn insert_loyalty(client: &tokio_postgres::Client, tenant: &str, points: i32) {
    client
        .execute(
            "INSERT INTO loyalty_transactions (tenant_slug, customer_id, points_change, new_balance, transaction_type)
             VALUES ($1, 'cust', $2, $2, 'earned')",
            &[&tenant, &points],
        )
        .await
        .unwrap();
}

/// Inserts an online order and its items in one statement (one round trip, one transaction,
/// items inserted after the order row). Returns nothing: the event carries the order number.
pub(crate) async fn insert_order_fast(
    client: &tokio_postgres::Client,
    tenant: &str,
    number: &str,
    items: i32,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "WITH o AS (
                 INSERT INTO orders (tenant_slug, order_number, customer_name, order_type, order_source, status, total_amount)
                 VALUES ($1, $2, 'Test', 'delivery', 'online', 'confirmed', 10.00) RETURNING id)
             INSERT INTO order_items (order_id, menu_item_id, name, quantity, price)
             SELECT o.id, 'item-' || i, 'Item ' || i, 1, 5.00 FROM o, generate_series(1, $3) AS i",
            &[&tenant, &number, &items],
        )
        .await
        .map(|_| ())
}

/// A tenant's whole retained event log as `{id, type, tenant, data}` objects, in id order:
/// what every client of the tenant must have received, exactly once, in this order.
pub(crate) async fn event_log(client: &tokio_postgres::Client, tenant: &str) -> Vec<Value> {
    client
        .query(
            "SELECT id, type, data::text FROM orderpush.events WHERE tenant_slug = $1 AND id > 0 ORDER BY id",
            &[&tenant],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let data: String = r.get(2);
            serde_json::json!({
                "id": r.get::<_, i64>(0),
                "type": r.get::<_, String>(1),
                "tenant": tenant,
                "data": serde_json::from_str::<Value>(&data).unwrap(),
            })
        })
        .collect()
}

/// Asserts that `got` (frames as received) is exactly `log` (from [`event_log`]): every
/// committed event once, in id order, with the committed content, and nothing else.
pub(crate) fn assert_exactly_the_log(who: &str, got: &[Value], log: &[Value]) {
    let ids: Vec<i64> = got.iter().map(|e| e["id"].as_i64().unwrap_or(-1)).collect();
    let want: Vec<i64> = log.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    if ids != want {
        let first_diff = ids.iter().zip(&want).position(|(a, b)| a != b);
        panic!(
            "{who}: received {} events, the log has {}; first difference at index {first_diff:?} \
             (received around it: {:?})",
            ids.len(),
            want.len(),
            first_diff.map(|i| &ids[i.saturating_sub(3)..(i + 3).min(ids.len())])
        );
    }
    for (g, w) in got.iter().zip(log) {
        for field in ["type", "tenant", "data"] {
            assert_eq!(g[field], w[field], "{who}: {field} of event {}", w["id"]);
        }
    }
}

/// Writes `n` loyalty events for `tenant` in one statement (one transaction), each with a
/// `reason` of `reason_len` bytes.
pub(crate) async fn bulk_loyalty(
    client: &tokio_postgres::Client,
    tenant: &str,
    n: i32,
    reason_len: i32,
) {
    client
        .execute(
            "INSERT INTO loyalty_transactions (tenant_slug, customer_id, points_change, new_balance,
                                               transaction_type, reason)
             SELECT $1, 'cust', i, i, 'earned', repeat('r', $3) FROM generate_series(1, $2) AS i",
            &[&tenant, &n, &reason_len],
        )
        .await
        .unwrap();
}
