//! What on-call reads over HTTP (docs/operations.md, "Admin API", "Metrics"): the admin API, acks,
//! the admin token, and `/metrics` (Prometheus text, the presence and database gauges).

use std::time::Duration;

use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn admin_api_shows_terminals_with_delivered_and_acked_ids() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    db.tenant("bistro").await;
    let key = db.key("kitchen").await;
    let key_id: String = db
        .client()
        .await
        .query_one("SELECT id FROM orderpush.api_keys", &[])
        .await
        .unwrap()
        .get(0);
    let server = TestServer::builder(&db).tuning(fast_presence).start().await;
    let mut pos = Pos::connect(&server, "kitchen", &key, None).await;
    insert_loyalty(&db.client().await, "kitchen", 5).await;
    assert_eq!(pos.next().await["id"], 1);
    pos.send_text(&json!({"type": "ack", "id": 1}).to_string())
        .await;

    let detail = eventually_some("the ack reaches the admin API", async || {
        let (status, body) = get_json(&server, "/admin/tenants/kitchen", None).await;
        assert_eq!(status, 200, "{body}");
        (body["connections"][0]["last_acked_id"] == 1).then_some(body)
    })
    .await;
    let conn = &detail["connections"][0];
    assert_eq!(detail["connections"].as_array().unwrap().len(), 1);
    assert_eq!(conn["key_id"], key_id.as_str());
    assert_eq!(conn["key_label"], "test");
    assert_eq!(conn["last_delivered_id"], 1);
    assert!(
        conn["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{conn}"
    );
    assert!(conn["connected_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(detail["latest_event_id"], 1);
    assert_eq!(detail["keys"][0]["id"], key_id.as_str());
    assert_eq!(detail["keys"][0]["connected"], true);

    let (status, list) = get_json(&server, "/admin/tenants", None).await;
    assert_eq!(status, 200);
    assert_eq!(conn["instance"], list["this_instance"]);
    let instances = list["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 1, "{list}");
    assert_eq!(instances[0]["listener_up"], true);
    assert_eq!(instances[0]["connections"], 1);
    let tenants = list["tenants"].as_array().unwrap();
    let by_slug = |s: &str| tenants.iter().find(|t| t["tenant"] == s).unwrap().clone();
    assert_eq!(
        (
            by_slug("kitchen")["terminals"].as_i64(),
            by_slug("kitchen")["active_keys"].as_i64()
        ),
        (Some(1), Some(1))
    );
    assert_eq!(by_slug("bistro")["connections"], 0);
    assert_eq!(list["truncated"], false);

    // Acks past what was delivered, and junk, are ignored; the socket stays up.
    pos.send_text(&json!({"type": "ack", "id": 99}).to_string())
        .await;
    pos.send_text(r#"{"type":"ack","id":"1"}"#).await;
    pos.send_text("not json").await;
    insert_loyalty(&db.client().await, "kitchen", 6).await;
    assert_eq!(pos.next().await["id"], 2);
    eventually_some("ignored messages are counted", async || {
        (metric_opt(&server, "orderpush_client_messages_ignored_total").await? >= 3.0).then_some(())
    })
    .await;
    assert_eq!(metric_opt(&server, "orderpush_acks_total").await, Some(1.0));
    eventually_some("delivered id 2 is recorded, the ack stays 1", async || {
        let (_, body) = get_json(&server, "/admin/tenants/kitchen", None).await;
        let c = &body["connections"][0];
        (c["last_delivered_id"] == 2 && c["last_acked_id"] == 1).then_some(())
    })
    .await;

    // A closed socket leaves presence.
    drop(pos);
    eventually_some("the closed connection disappears", async || {
        let (_, body) = get_json(&server, "/admin/tenants/kitchen", None).await;
        body["connections"].as_array()?.is_empty().then_some(())
    })
    .await;

    for path in ["/admin/tenants/nope", "/admin/tenants/NOT%20A%20SLUG"] {
        let (status, body) = get_json(&server, path, None).await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(body["success"], false);
    }
}

#[tokio::test]
async fn admin_endpoints_require_the_admin_token_when_one_is_set() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let token = "admin-token-0123456789";
    let server = TestServer::builder(&db).admin_token(token).start().await;
    let client = reqwest::Client::new();
    let get = async |path: &str, auth: Option<String>| {
        let mut req = client.get(server.http(path));
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        req.send().await.unwrap()
    };
    for path in ["/admin/tenants", "/admin/tenants/kitchen"] {
        let r = get(path, None).await;
        assert_eq!(
            r.status(),
            401,
            "{path}: loopback is not enough with a token"
        );
        assert_eq!(
            r.headers()["www-authenticate"],
            r#"Bearer realm="orderpush admin""#
        );
        assert_eq!(
            get(path, Some("Bearer wrong-token-0123456789".into()))
                .await
                .status(),
            401
        );
        assert_eq!(
            get(path, Some(format!("Bearer {token}"))).await.status(),
            200
        );
    }
    // The page: the browser's own prompt (Basic, any user, the token as password).
    for path in ["/status", "/status/app.js", "/status/data"] {
        let r = get(path, None).await;
        assert_eq!(r.status(), 401, "{path}");
        assert!(
            r.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Basic realm=")
        );
        let basic = |user_pass: &str| {
            use base64::Engine as _;
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(user_pass)
            )
        };
        assert_eq!(get(path, Some(basic("ops:wrong"))).await.status(), 401);
        assert_eq!(
            get(path, Some(basic(&format!("ops:{token}"))))
                .await
                .status(),
            200,
            "{path}"
        );
        assert_eq!(
            get(path, Some(format!("Bearer {token}"))).await.status(),
            200
        );
    }
    // The admin token is not the broadcast token.
    let r = client
        .post(server.http("/broadcast"))
        .header("Authorization", format!("Bearer {token}"))
        .json(&json!({"tenant": "kitchen", "event": {"type": "x", "data": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "no broadcast token set: loopback is enough"
    );
}

#[tokio::test]
async fn metrics_report_presence_notify_queue_and_tenants_without_terminal() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    db.tenant("bistro").await; // no key: not expected to have a terminal
    let key = db.key("kitchen").await;
    let server = TestServer::builder(&db).tuning(fast_presence).start().await;
    eventually_some("one live instance", async || {
        (metric_opt(&server, "orderpush_instances").await? == 1.0).then_some(())
    })
    .await;
    assert_eq!(
        metric_opt(&server, "orderpush_tenants_without_terminal").await,
        Some(1.0)
    );
    let usage = metric_opt(&server, "orderpush_notification_queue_usage_ratio")
        .await
        .expect("pg_notification_queue_usage() is reported");
    assert!((0.0..=1.0).contains(&usage));
    assert_eq!(
        metric_opt(&server, "orderpush_scrape_database_ok").await,
        Some(1.0)
    );
    assert!(
        metric_opt(&server, "orderpush_listener_read_age_seconds")
            .await
            .is_some()
    );

    let _pos = Pos::connect(&server, "kitchen", &key, None).await;
    eventually_some("kitchen has a terminal", async || {
        (metric_opt(&server, "orderpush_tenants_without_terminal").await? == 0.0).then_some(())
    })
    .await;
    // Slow-client disconnects are a reason of the disconnect counter.
    assert!(
        metric_opt(
            &server,
            "orderpush_disconnects_total{reason=\"slow_consumer\"}"
        )
        .await
        .is_some()
    );
}

#[test]
fn a_short_admin_token_is_refused_at_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_orderpush"))
        .args(["serve", "--admin-token", "short"])
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--admin-token"), "{err}");
    assert!(err.contains("at least 16"), "{err}");
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let server = TestServer::builder(&db).start().await;
    server
        .broadcast(&json!({"tenant": "kitchen", "event": {"type": "new_order", "data": {}}}))
        .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = metrics_text(&server).await;
        assert!(text.contains("# TYPE orderpush_connections gauge"));
        if text.contains("orderpush_events_total{origin=\"broadcast\",type=\"new_order\"} 1") {
            assert!(text.contains("orderpush_broadcasts_accepted_total 1"));
            assert!(text.contains("orderpush_listener_up 1"));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
