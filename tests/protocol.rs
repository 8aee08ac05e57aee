//! docs/protocol.md's JavaScript client, run with Node against the real server: replay with
//! `since`, live events, a reconnect across a server restart, and a clean stop on 401.
//! Needs `node` and `tests/js/node_modules` (`npm ci --prefix tests/js`); skipped without them.

use std::path::PathBuf;
use std::process::Command;

use crate::common::*;

const PROTOCOL_MD: &str = include_str!("../docs/protocol.md");
const MARKER: &str = "<!-- pos-client.js:";

/// The js block after the marker in docs/protocol.md.
fn client_source() -> String {
    let from = PROTOCOL_MD
        .find(MARKER)
        .expect("marker in docs/protocol.md");
    let rest = &PROTOCOL_MD[from..];
    let start = rest.find("```js\n").expect("a js block after the marker") + 6;
    let len = rest[start..].find("\n```").expect("the block ends");
    rest[start..start + len + 1].to_owned()
}

fn node_modules() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/js/node_modules")
}

/// Why the test cannot run here, if it cannot.
fn missing_prerequisite() -> Option<String> {
    let node = Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        return Some("`node` is not installed".into());
    }
    if !node_modules().join("ws").is_dir() {
        return Some("tests/js/node_modules is missing: run `npm ci --prefix tests/js`".into());
    }
    None
}

/// The documented client, run by Node.
struct Client;

impl Client {
    fn start(script: &PathBuf, server: &TestServer, key: &str, since: Option<i64>) -> JsonChild {
        let mut cmd = Command::new("node");
        cmd.arg(script)
            .arg(server.ws(""))
            .arg("kitchen")
            .env("ORDERPUSH_KEY", key)
            .env("NODE_PATH", node_modules());
        if let Some(s) = since {
            cmd.arg(s.to_string());
        }
        JsonChild::spawn(cmd)
    }
}

#[tokio::test]
async fn the_documented_javascript_client_resumes_with_since() {
    if let Some(why) = missing_prerequisite() {
        eprintln!("skipped: {why}");
        return;
    }
    let script =
        std::env::temp_dir().join(format!("orderpush-pos-client-{}.js", std::process::id()));
    std::fs::write(&script, client_source()).unwrap();

    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let key = db.key("kitchen").await;
    let c = db.client().await;
    for p in 1..=3 {
        insert_loyalty(&c, "kitchen", p).await;
    }
    let server = TestServer::builder(&db).start().await;
    let addr = server.addr;

    // A refused key: one clear message, exit 1, no reconnect loop.
    let mut refused = Client::start(&script, &server, &format!("pos_{}", "0".repeat(64)), None);
    assert_eq!(
        refused.exit().await.0,
        Some(1),
        "one clear stop, no retry loop"
    );

    // Replay after since=1, then live.
    let mut pos = Client::start(&script, &server, &key, Some(1));
    assert_eq!(pos.next_event().await["id"], 2);
    assert_eq!(pos.next_event().await["id"], 3);
    insert_loyalty(&c, "kitchen", 4).await;
    let ev = pos.next_event().await;
    assert_eq!(
        (ev["type"].as_str(), ev["id"].as_i64()),
        (Some("loyalty_updated"), Some(4))
    );

    // Restart the server; an event written meanwhile arrives after the reconnect.
    server.stop().await;
    pos.expect_stderr("closed (1001)").await;
    insert_loyalty(&c, "kitchen", 5).await;
    let server = TestServer::builder(&db).bind(addr).start().await;
    let ev = pos.next_event().await;
    assert_eq!(ev["id"], 5, "{ev}");
    pos.expect_stderr("?since=4").await;
    insert_loyalty(&c, "kitchen", 6).await;
    assert_eq!(pos.next_event().await["id"], 6, "nothing twice");
    server.stop().await;
    let _ = std::fs::remove_file(&script);
}
