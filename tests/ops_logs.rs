//! Logs as on-call reads them (docs/operations.md, "Logs", "Undelivered-order alert"):
//! `--log-format json` (one JSON object per line; text stays the default), the undelivered-order
//! WARN once per tenant per interval, and a browser key never in the logs.
//! These run the real binary, as an operator does.

use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::common::*;

#[tokio::test]
async fn json_logs_warn_once_about_an_order_no_pos_receives_and_never_log_a_key() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    db.tenant("bistro").await;
    let key = db.key("bistro").await;
    let mut serve = Serve::start(&db, &["--log-format", "json"]);
    let addr = serve.json_listening_addr();

    // A browser-style POS for bistro: its key travels in Sec-WebSocket-Protocol.
    let mut req = format!("ws://{addr}/ws/pos/bistro")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        format!("orderpush.v1, orderpush.key.{key}")
            .parse()
            .unwrap(),
    );
    let (_bistro, _) = tokio_tungstenite::connect_async(req).await.unwrap();

    let mut client = db.client().await;
    insert_order(&mut client, "kitchen", "KIT-6452", 1).await;
    let warning = serve.wait_for("the undelivered warning", |l| {
        log_message(l)
            .is_some_and(|m| m.starts_with("order KIT-6452 for tenant kitchen: no POS connected"))
    });
    let v: Value = serde_json::from_str(&warning).unwrap();
    assert_eq!(v["level"], "WARN");
    assert_eq!(v["fields"]["tenant"], "kitchen");
    // The target operators filter on (docs/operations.md), wherever the code lives.
    assert_eq!(v["target"], "orderpush::listener");

    // A second order within the interval is not warned about again (but still logged at INFO).
    insert_order(&mut client, "kitchen", "KIT-6453", 1).await;
    // A fence: the listener handles events one at a time, so once bistro's event is logged,
    // everything about the second order (including any warning) is logged too.
    insert_loyalty(&client, "bistro", 1).await;
    serve.wait_for("the fence", |l| {
        log_message(l).is_some_and(|m| m.starts_with("event 'loyalty_updated' sent to 1 clients"))
    });

    let lines = serve.drain().to_vec();
    let warnings = lines
        .iter()
        .filter(|l| log_message(l).is_some_and(|m| m.contains("no POS connected")))
        .count();
    assert_eq!(warnings, 1, "once per tenant per interval");
    for line in &lines {
        assert!(
            serde_json::from_str::<Value>(line).is_ok(),
            "every line is one JSON object: {line}"
        );
        assert!(!line.contains(&key[4..]), "the key is never logged: {line}");
    }
}

#[tokio::test]
async fn text_logs_are_the_default() {
    let db = TestDb::create().await;
    let mut serve = Serve::start(&db, &[]);
    let line = serve.wait_for("listening", |l| l.contains("orderpush listening"));
    assert!(serde_json::from_str::<Value>(&line).is_err(), "{line}");
    assert!(line.contains("INFO"), "{line}");
}
