//! The acknowledgement chain (docs/protocol.md, "Acknowledge"): per order, when it first reached
//! a terminal and when, and by which terminal, it was first acknowledged, readable by the web
//! app through `orderpush.order_deliveries`; and the unacknowledged-order alert
//! (docs/operations.md): a WARN, a counter and gauges, /status and /admin, cleared by the ack or
//! by a closed status.

use std::time::Duration;

use serde_json::Value;

use crate::common::*;

/// One row of the view, as the web app reads it: (delivered, acknowledged, by key, by label).
async fn delivery(
    c: &tokio_postgres::Client,
    order_id: &str,
) -> (bool, bool, Option<String>, Option<String>) {
    let r = c
        .query_one(
            "SELECT first_delivered_at IS NOT NULL, first_acked_at IS NOT NULL, acked_by_key,
                    acked_by_label
             FROM orderpush.order_deliveries WHERE order_id = $1",
            &[&order_id],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

/// Waits for `ready`, so the socket is subscribed before the test writes.
async fn until_ready(pos: &mut Pos) {
    let frame = pos.next_frame_within(WAIT).await.expect("ready arrives");
    assert!(is_ready(&frame), "{frame}");
}

#[tokio::test]
async fn the_view_shows_an_order_delivered_then_acknowledged_by_its_terminal() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let c = db.client().await;
    let till = orderpush::db::keys::create(&c, "kitchen", Some("till 1"))
        .await
        .unwrap();
    let screen = orderpush::db::keys::create(&c, "kitchen", Some("bar screen"))
        .await
        .unwrap();
    let server = TestServer::builder(&db).tuning(fast_presence).start().await;

    // A screen that asked for loyalty only: what it receives and acknowledges says nothing
    // about the kitchen having the order, though its position moves past it.
    let mut loyalty_only =
        Pos::join(&server, "kitchen", &screen.secret, "?types=loyalty_updated").await;
    until_ready(&mut loyalty_only).await;
    let mut w = db.client().await;
    let order = insert_order(&mut w, "kitchen", "KIT-6452", 1).await;
    insert_loyalty(&c, "kitchen", 5).await;
    let loyalty = loyalty_only.next().await;
    assert_eq!(loyalty["id"], 2, "{loyalty}");
    loyalty_only.send_text(r#"{"type":"ack","id":2}"#).await;
    eventually("the screen's ack recorded", WAIT, || async {
        let (_, v) = get_json(&server, "/admin/tenants/kitchen", None).await;
        v["connections"][0]["last_acked_id"] == 2
    })
    .await;
    assert_eq!(
        delivery(&c, &order).await,
        (false, false, None, None),
        "the order is neither delivered nor acknowledged"
    );

    // The till resumes from the start: the order reaches it.
    let mut pos = Pos::connect(&server, "kitchen", &till.secret, Some(0)).await;
    let event = pos.next().await;
    assert_eq!(
        (&event["type"], &event["id"]),
        (&Value::from("new_order"), &Value::from(1))
    );
    eventually("delivered", WAIT, || async { delivery(&c, &order).await.0 }).await;
    assert_eq!(
        delivery(&c, &order).await,
        (true, false, None, None),
        "delivered, not acknowledged yet"
    );

    // The kitchen acknowledges it (and everything before it).
    pos.send_text(r#"{"type":"ack","id":1}"#).await;
    eventually("acknowledged", WAIT, || async {
        delivery(&c, &order).await.1
    })
    .await;
    assert_eq!(
        delivery(&c, &order).await,
        (
            true,
            true,
            Some(till.id.clone()),
            Some("till 1".to_string())
        ),
        "acknowledged by the till"
    );
    let in_order: bool = c
        .query_one(
            "SELECT first_delivered_at <= first_acked_at FROM orderpush.order_deliveries
             WHERE order_id = $1",
            &[&order],
        )
        .await
        .unwrap()
        .get(0);
    assert!(in_order, "delivered no later than acknowledged");
}

#[tokio::test]
async fn the_web_app_reads_the_view_with_the_documented_grant_and_nothing_else() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let (role, mut app) = app_role(
        &db,
        &[
            "**The application's role**",
            "To show \"the restaurant has received your order\"",
        ],
    )
    .await;
    let order = insert_order(&mut app, "kitchen", "APP-1", 1).await;
    number_staged(&db).await;
    let row = app
        .query_one(
            "SELECT order_number, tenant, event_id, first_delivered_at
             FROM orderpush.order_deliveries WHERE order_id = $1",
            &[&order],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("APP-1"));
    assert_eq!(row.get::<_, String>(1), "kitchen");
    assert_eq!(row.get::<_, i64>(2), 1);
    assert!(row.get::<_, Option<std::time::SystemTime>>(3).is_none());
    for forbidden in [
        "SELECT * FROM orderpush.order_acks",
        "SELECT key_hash FROM orderpush.api_keys",
        "UPDATE orderpush.order_acks SET first_acked_at = now()",
    ] {
        let err = app
            .batch_execute(forbidden)
            .await
            .expect_err("the app's role may not");
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{forbidden}: {err}"
        );
    }
    drop(app);
    drop_app_role(&db, &role).await;
}

/// The lines of `serve`'s log whose message starts with `prefix`.
fn lines_about(serve: &mut Serve, prefix: &str) -> Vec<String> {
    serve
        .drain()
        .iter()
        .filter(|l| log_message(l).is_some_and(|m| m.starts_with(prefix)))
        .cloned()
        .collect()
}

async fn admin_get(addr: &str, path: &str) -> Value {
    reqwest::get(format!("http://{addr}{path}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn metric_at(addr: &str, series: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test]
async fn an_order_nobody_acknowledges_in_time_is_warned_about_once_counted_and_cleared() {
    let db = TestDb::create().await;
    for t in ["kitchen", "bistro", "quiet"] {
        db.tenant(t).await;
    }
    let key = db.key("kitchen").await;
    let c = db.client().await;
    // The per-tenant setting: no alert for this tenant (its terminals never acknowledge).
    c.execute(
        "INSERT INTO orderpush.tenant_settings (tenant_slug, ack_timeout_seconds) VALUES ('quiet', 0)",
        &[],
    )
    .await
    .unwrap();
    let mut serve = Serve::start(&db, &["--log-format", "json", "--ack-timeout", "5s"]);
    let addr = serve.json_listening_addr();

    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{addr}/ws/pos/kitchen"),
    )
    .unwrap();
    req.headers_mut().insert("X-API-Key", key.parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let mut pos = Pos { ws };
    let mut w = db.client().await;
    insert_order(&mut w, "kitchen", "KIT-6452", 1).await;
    let event = pos.next().await;
    assert_eq!(event["data"]["orderNumber"], "KIT-6452");
    // Bistro has no terminal at all; quiet has turned the alert off.
    let bistro_order = insert_order(&mut w, "bistro", "BIS-1", 1).await;
    insert_order(&mut w, "quiet", "QUI-1", 1).await;

    let warning = serve.wait_for("the kitchen's warning", |l| {
        log_message(l).is_some_and(|m| m.starts_with("order KIT-6452 for tenant kitchen"))
    });
    assert_eq!(
        log_message(&warning).unwrap(),
        "order KIT-6452 for tenant kitchen not acknowledged after 5 s"
    );
    let v: Value = serde_json::from_str(&warning).unwrap();
    assert_eq!(v["level"], "WARN");
    assert_eq!(v["target"], "orderpush::alert");
    serve.wait_for("bistro's warning", |l| {
        log_message(l).is_some_and(|m| {
            m == "order BIS-1 for tenant bistro not acknowledged after 5 s (never delivered to a terminal)"
        })
    });

    // Two states, apart: delivered-not-acknowledged and never delivered.
    eventually("the gauges", WAIT, || async {
        metric_at(&addr, "orderpush_orders_unacknowledged").await == Some(1.0)
            && metric_at(&addr, "orderpush_orders_undelivered").await == Some(1.0)
    })
    .await;
    assert_eq!(
        metric_at(&addr, "orderpush_orders_unacknowledged_total").await,
        Some(2.0),
        "kitchen and bistro, not quiet"
    );
    let kitchen = admin_get(&addr, "/admin/tenants/kitchen").await;
    assert_eq!(
        kitchen["orders_unacknowledged"][0]["order_number"],
        "KIT-6452"
    );
    assert_eq!(kitchen["orders_undelivered"], serde_json::json!([]));
    let bistro = admin_get(&addr, "/admin/tenants/bistro").await;
    assert_eq!(bistro["orders_undelivered"][0]["order_number"], "BIS-1");
    assert_eq!(
        admin_get(&addr, "/admin/tenants/quiet").await["orders_undelivered"],
        serde_json::json!([])
    );
    let status = admin_get(&addr, "/status/data").await;
    let numbers: Vec<&str> = status["overdue_orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["order_number"].as_str().unwrap())
        .collect();
    assert_eq!(numbers, ["KIT-6452", "BIS-1"]);
    let red: Vec<(&str, bool)> = status["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["tenant"].as_str().unwrap(), t["alert"].as_bool().unwrap()))
        .collect();
    assert!(red.contains(&("kitchen", true)), "{red:?}");
    assert!(red.contains(&("bistro", true)), "{red:?}");

    // The kitchen acknowledges; bistro's order is completed (a closed status) unacknowledged.
    pos.send_text(&format!(r#"{{"type":"ack","id":{}}}"#, event["id"]))
        .await;
    c.execute(
        "UPDATE orders SET status = 'completed' WHERE id = $1::text::uuid",
        &[&bistro_order],
    )
    .await
    .unwrap();
    serve.wait_for("the late acknowledgement", |l| {
        log_message(l)
            .is_some_and(|m| m.starts_with("order KIT-6452 for tenant kitchen acknowledged after"))
    });
    eventually("the gauges clear", WAIT, || async {
        metric_at(&addr, "orderpush_orders_unacknowledged").await == Some(0.0)
            && metric_at(&addr, "orderpush_orders_undelivered").await == Some(0.0)
    })
    .await;
    let status = admin_get(&addr, "/status/data").await;
    assert_eq!(status["overdue_orders"], serde_json::json!([]));
    assert!(
        status["tenants"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["orders_undelivered"] == 0 && t["orders_unacknowledged"] == 0),
        "{status}"
    );

    // Warned once each, however many checks ran; never about the quiet tenant.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        lines_about(&mut serve, "order KIT-6452 for tenant kitchen not").len(),
        1
    );
    assert_eq!(
        lines_about(&mut serve, "order BIS-1 for tenant bistro not").len(),
        1
    );
    assert!(lines_about(&mut serve, "order QUI-1 for tenant quiet not").is_empty());
    assert_eq!(
        metric_at(&addr, "orderpush_orders_unacknowledged_total").await,
        Some(2.0)
    );
}
