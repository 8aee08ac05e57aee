//! Database writes become events, shaped exactly as docs/protocol.md ("Read events") shows them.

use serde_json::json;

use crate::common::*;

async fn setup() -> (TestDb, TestServer, Pos, tokio_postgres::Client) {
    let OneTenant { db, key, server } = one_tenant("kitchen").await;
    let pos = Pos::connect(&server, "kitchen", &key, None).await;
    let client = db.client().await;
    (db, server, pos, client)
}

fn assert_envelope(ev: &serde_json::Value, kind: &str, id: i64) {
    assert_eq!(ev["type"], kind);
    assert_eq!(ev["tenant"], "kitchen");
    assert_eq!(ev["id"], id);
    let ts = ev["timestamp"].as_str().expect("timestamp is a string");
    assert_eq!(ts.len(), 24, "{ts}");
    assert!(
        ts.ends_with('Z') && ts.as_bytes()[10] == b'T' && ts.as_bytes()[19] == b'.',
        "{ts}"
    );
}

#[tokio::test]
async fn new_order_carries_items_inserted_after_the_order_row() {
    let (_db, _server, mut pos, mut client) = setup().await;
    let tx = client.transaction().await.unwrap();
    let id: String = tx
        .query_one(
            "INSERT INTO orders (tenant_slug, order_number, customer_name, customer_phone, order_type,
                                 order_source, status, total_amount, special_instructions, created_at)
             VALUES ('kitchen', 'KIT-6452', 'John Doe', '07700900123', 'delivery', 'online', 'confirmed',
                     45.00, 'Ring doorbell', '2025-10-11T14:00:00Z') RETURNING id::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    tx.execute(
        "INSERT INTO order_items (order_id, menu_item_id, name, quantity, price, selected_addons, special_instructions)
         VALUES ($1::text::uuid, 'item-123', 'Pizza Margherita', 2, 12.50, '[{\"name\": \"Extra Cheese\", \"price\": 1.50}]', 'No olives'),
                ($1::text::uuid, 'item-7', 'Cola', 1, 2.00, '[]', NULL)",
        &[&id],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let raw = pos.next_raw_within(WAIT).await.unwrap();
    let ev: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_envelope(&ev, "new_order", 1);
    assert_eq!(
        ev["data"],
        json!({
            "orderId": id,
            "orderNumber": "KIT-6452",
            "customerName": "John Doe",
            "customerPhone": "07700900123",
            "orderType": "delivery",
            "orderSource": "online",
            "status": "confirmed",
            "totalAmount": 45.0,
            "items": [
                {"menuItemId": "item-123", "name": "Pizza Margherita", "quantity": 2, "price": 12.5,
                 "selectedAddons": [{"name": "Extra Cheese", "price": 1.5}], "specialInstructions": "No olives"},
                {"menuItemId": "item-7", "name": "Cola", "quantity": 1, "price": 2.0,
                 "selectedAddons": [], "specialInstructions": null}
            ],
            "specialInstructions": "Ring doorbell",
            "scheduledFor": null,
            "createdAt": "2025-10-11T14:00:00.000Z"
        })
    );
    // The key order of docs/protocol.md is kept (the frame is built in that order, not re-sorted).
    let order: Vec<usize> = [
        "\"type\"",
        "\"tenant\"",
        "\"orderId\"",
        "\"totalAmount\"",
        "\"items\"",
        "\"createdAt\"",
        "\"id\":1}",
    ]
    .iter()
    .map(|k| raw.find(k).unwrap_or_else(|| panic!("{k} in {raw}")))
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{raw}");
}

#[tokio::test]
async fn order_status_changes_emit_one_event_each_and_nothing_for_no_change() {
    let (_db, _server, mut pos, mut client) = setup().await;
    let tx = client.transaction().await.unwrap();
    let id: String = tx
        .query_one(
            "INSERT INTO orders (tenant_slug, order_number, order_type, order_source, status, total_amount)
             VALUES ('kitchen', 'POS-1', 'dine_in', 'pos', 'confirmed', 9.99) RETURNING id::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    tx.commit().await.unwrap();
    // Same value: no event. Then two real changes in one transaction: two events.
    client
        .execute(
            "UPDATE orders SET status = 'confirmed' WHERE id = $1::text::uuid",
            &[&id],
        )
        .await
        .unwrap();
    let tx = client.transaction().await.unwrap();
    tx.execute(
        "UPDATE orders SET status = 'preparing', updated_at = '2025-10-11T14:05:00Z' WHERE id = $1::text::uuid",
        &[&id],
    )
    .await
    .unwrap();
    tx.execute("UPDATE orders SET status = 'ready', updated_at = '2025-10-11T14:06:00Z' WHERE id = $1::text::uuid", &[&id])
        .await
        .unwrap();
    tx.commit().await.unwrap();

    // The 'pos' order produced no new_order: the first event is the first status change.
    let first = pos.next().await;
    assert_envelope(&first, "order_updated", 1);
    assert_eq!(
        first["data"],
        json!({"orderId": id, "orderNumber": "POS-1", "status": "preparing", "previousStatus": "confirmed",
               "updatedAt": "2025-10-11T14:05:00.000Z"})
    );
    let second = pos.next().await;
    assert_envelope(&second, "order_updated", 2);
    assert_eq!(second["data"]["previousStatus"], "preparing");
    assert_eq!(second["data"]["status"], "ready");
    assert_eq!(second["data"]["updatedAt"], "2025-10-11T14:06:00.000Z");
    assert!(
        pos.next_within(std::time::Duration::from_millis(300))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn gift_card_and_loyalty_events_have_the_documented_shape() {
    let (_db, _server, mut pos, client) = setup().await;
    client
        .execute(
            "INSERT INTO gift_cards (tenant_slug, card_number, initial_balance, current_balance, purchased_by,
                                     recipient_name, recipient_email, expiry_date, purchased_at)
             VALUES ('kitchen', 'GC-1234-5678', 50.00, 50.00, 'Jane Smith', 'John Doe', 'john@example.com',
                     '2026-10-11', '2025-10-11T14:10:00Z')",
            &[],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO loyalty_transactions (tenant_slug, customer_id, customer_phone, points_change, new_balance,
                                               transaction_type, reason, created_at)
             VALUES ('kitchen', 'cust-123', '07700900123', 45, 145, 'earned', 'Order #KIT-6452', '2025-10-11T14:15:00Z')",
            &[],
        )
        .await
        .unwrap();
    let gift = pos.next().await;
    assert_envelope(&gift, "gift_card_purchased", 1);
    assert_eq!(
        gift["data"],
        json!({"cardNumber": "GC-1234-5678", "initialBalance": 50.0, "currentBalance": 50.0,
               "purchasedBy": "Jane Smith", "recipientName": "John Doe", "recipientEmail": "john@example.com",
               "expiryDate": "2026-10-11", "purchasedAt": "2025-10-11T14:10:00.000Z"})
    );
    let loyalty = pos.next().await;
    assert_envelope(&loyalty, "loyalty_updated", 2);
    assert_eq!(
        loyalty["data"],
        json!({"customerId": "cust-123", "customerPhone": "07700900123", "pointsChange": 45, "newBalance": 145,
               "transactionType": "earned", "reason": "Order #KIT-6452", "updatedAt": "2025-10-11T14:15:00.000Z"})
    );
}

#[tokio::test]
async fn rolled_back_and_non_online_writes_emit_nothing() {
    let (db, _server, mut pos, mut client) = setup().await;
    let tx = client.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO orders (tenant_slug, order_number, order_type, order_source, status, total_amount)
         VALUES ('kitchen', 'RB-1', 'delivery', 'online', 'pending', 1.00)",
        &[],
    )
    .await
    .unwrap();
    tx.execute(
        "INSERT INTO loyalty_transactions (tenant_slug, customer_id, points_change, new_balance, transaction_type)
         VALUES ('kitchen', 'c', 1, 1, 'earned')",
        &[],
    )
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    client
        .execute(
            "INSERT INTO orders (tenant_slug, order_number, order_type, order_source, status, total_amount)
             VALUES ('kitchen', 'PH-1', 'collection', 'phone', 'pending', 1.00)",
            &[],
        )
        .await
        .unwrap();
    insert_order(&mut client, "kitchen", "ON-1", 1).await;
    let ev = pos.next().await;
    assert_eq!(ev["type"], "new_order");
    assert_eq!(ev["data"]["orderNumber"], "ON-1");
    assert_eq!(
        ev["id"], 1,
        "the rolled-back writes and the phone order took no id"
    );
    assert_eq!(db.event_count().await, 1);
}

#[tokio::test]
async fn emitting_order_sources_are_changed_in_one_table() {
    let (_db, _server, mut pos, client) = setup().await;
    client
        .execute(
            "INSERT INTO orderpush.new_order_sources VALUES ('kiosk')",
            &[],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO orders (tenant_slug, order_number, order_type, order_source, status, total_amount)
             VALUES ('kitchen', 'KI-1', 'collection', 'kiosk', 'pending', 3.00)",
            &[],
        )
        .await
        .unwrap();
    let ev = pos.next().await;
    assert_eq!(ev["type"], "new_order");
    assert_eq!(ev["data"]["orderSource"], "kiosk");
}

#[tokio::test]
async fn an_order_with_200_items_arrives_intact() {
    let (_db, _server, mut pos, mut client) = setup().await;
    insert_order(&mut client, "kitchen", "BIG-1", 200).await;
    let ev = pos.next().await;
    let items = ev["data"]["items"].as_array().unwrap();
    assert_eq!(items.len(), 200);
    for (i, item) in items.iter().enumerate() {
        assert_eq!(
            item["menuItemId"],
            format!("item-{i}"),
            "items keep insertion order"
        );
    }
    assert!(
        serde_json::to_string(&ev).unwrap().len() > 8000,
        "well over NOTIFY's payload limit"
    );
}

#[tokio::test]
async fn a_suppressed_bulk_job_emits_one_resync_per_tenant() {
    let (db, _server, mut pos, mut client) = setup().await;
    let tx = client.transaction().await.unwrap();
    tx.batch_execute("SET LOCAL orderpush.suppress = 'on'")
        .await
        .unwrap();
    for _ in 0..5 {
        tx.execute(
            "INSERT INTO loyalty_transactions (tenant_slug, customer_id, points_change, new_balance, transaction_type)
             VALUES ('kitchen', 'c', 1, 1, 'adjusted')",
            &[],
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    let ev = pos.next().await;
    assert_eq!(ev["type"], "resync_required");
    assert_eq!(ev["data"]["reason"], "suppressed");
    assert_eq!(db.event_count().await, 1);
}
