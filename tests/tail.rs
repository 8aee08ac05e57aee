//! `orderpush tail`, run as a POS developer would: events as pretty JSON, resume with `since`
//! across a server restart, and a clean stop (no retry loop) when the key is refused.

use std::process::Command;

use crate::common::*;

/// A running `orderpush tail`.
struct Tail;

impl Tail {
    fn start(server: &TestServer, tenant: &str, key: &str, since: Option<i64>) -> JsonChild {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_orderpush"));
        cmd.args(["tail", "--url", &server.ws(""), "--tenant", tenant])
            .env("ORDERPUSH_KEY", key)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        if let Some(s) = since {
            cmd.args(["--since", &s.to_string()]);
        }
        JsonChild::spawn(cmd)
    }
}

#[tokio::test]
async fn tail_prints_events_and_resumes_across_a_server_restart() {
    let OneTenant { db, key, server } = one_tenant("kitchen").await;
    let addr = server.addr;
    let mut tail = Tail::start(&server, "kitchen", &key, None)
        .after_stderr("connected to")
        .await;
    let mut c = db.client().await;
    insert_order(&mut c, "kitchen", "KIT-1", 2).await;
    let ev = tail.next_event().await;
    assert_eq!(ev["type"], "new_order");
    assert_eq!(ev["data"]["orderNumber"], "KIT-1");
    assert_eq!(ev["data"]["items"].as_array().unwrap().len(), 2);
    assert_eq!(ev["id"], 1);

    // The server goes away (close 1001); an event is written while it is down.
    server.stop().await;
    tail.expect_stderr("(1001: server shutting down)").await;
    insert_loyalty(&c, "kitchen", 7).await;
    let server = TestServer::builder(&db).bind(addr).start().await;
    tail.expect_stderr("since=1").await;
    let ev = tail.next_event().await;
    assert_eq!(ev["type"], "loyalty_updated", "missed event replayed");
    assert_eq!(ev["id"], 2);
    insert_loyalty(&c, "kitchen", 8).await;
    let ev = tail.next_event().await;
    assert_eq!(ev["id"], 3, "then live, nothing twice");
    server.stop().await;
}

#[tokio::test]
async fn tail_since_replays_first() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let key = db.key("kitchen").await;
    let c = db.client().await;
    for p in 1..=3 {
        insert_loyalty(&c, "kitchen", p).await;
    }
    let server = TestServer::builder(&db).start().await;
    db.wait_numbered().await;
    let mut tail = Tail::start(&server, "kitchen", &key, Some(1));
    assert_eq!(tail.next_event().await["id"], 2);
    assert_eq!(tail.next_event().await["id"], 3);
}

#[tokio::test]
async fn tail_stops_at_once_when_the_key_is_refused() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    db.tenant("bistro").await;
    let other = db.key("bistro").await;
    let server = TestServer::builder(&db).start().await;

    let unknown = format!("pos_{}", "ab".repeat(32));
    let mut tail = Tail::start(&server, "kitchen", &unknown, None);
    let (code, stderr) = tail.exit().await;
    let ok = code == Some(0);
    assert!(!ok);
    assert!(stderr.contains("HTTP 401"), "{stderr}");
    assert!(stderr.contains("unknown or revoked"), "{stderr}");
    assert!(!stderr.contains("reconnecting"), "{stderr}");

    let mut tail = Tail::start(&server, "kitchen", &other, None);
    let (code, stderr) = tail.exit().await;
    let ok = code == Some(0);
    assert!(!ok);
    assert!(stderr.contains("HTTP 403"), "{stderr}");
    assert!(stderr.contains("another tenant than 'kitchen'"), "{stderr}");

    let mut tail = Tail::start(&server, "kitchen", "not-a-key", None);
    let (code, stderr) = tail.exit().await;
    let ok = code == Some(0);
    assert!(!ok);
    assert!(stderr.contains("pos_<64 hex digits>"), "{stderr}");
}

#[tokio::test]
async fn tail_stops_when_the_key_is_revoked_while_connected() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let c = db.client().await;
    let key = orderpush::db::keys::create(&c, "kitchen", None)
        .await
        .unwrap();
    let server = TestServer::builder(&db).start().await;
    let mut tail = Tail::start(&server, "kitchen", &key.secret, None)
        .after_stderr("connected to")
        .await;
    orderpush::db::keys::revoke(&c, &key.id).await.unwrap();
    let (code, stderr) = tail.exit().await;
    let ok = code == Some(0);
    assert!(!ok);
    assert!(stderr.contains("revoked"), "{stderr}");
    server.stop().await;
}
