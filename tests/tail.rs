//! `orderpush tail`, run as a POS developer would: events as pretty JSON, resume with `since`
//! across a server restart, and a clean stop (no retry loop) when the key is refused.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

/// A running `orderpush tail`: parsed stdout documents and stderr lines on channels.
struct Tail {
    child: Child,
    events: mpsc::Receiver<Value>,
    lines: mpsc::Receiver<String>,
    stderr: Vec<String>,
}

impl Tail {
    fn start(server: &TestServer, tenant: &str, key: &str, since: Option<i64>) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_orderpush"));
        cmd.args(["tail", "--url", &server.ws(""), "--tenant", tenant])
            .env("ORDERPUSH_KEY", key)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(s) = since {
            cmd.args(["--since", &s.to_string()]);
        }
        let mut child = cmd.spawn().unwrap();
        let (etx, events) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        // Pretty JSON spans lines: read a stream of documents.
        std::thread::spawn(move || {
            for v in serde_json::Deserializer::from_reader(stdout).into_iter::<Value>() {
                match v {
                    Ok(v) => {
                        let _ = etx.send(v);
                    }
                    Err(_) => break,
                }
            }
        });
        let (ltx, lines) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = ltx.send(line);
            }
        });
        Self {
            child,
            events,
            lines,
            stderr: Vec::new(),
        }
    }

    async fn next_event(&mut self) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT * 2;
        loop {
            if let Ok(v) = self.events.try_recv() {
                return v;
            }
            self.drain();
            assert!(
                tokio::time::Instant::now() < deadline,
                "no event; stderr:\n{}",
                self.stderr.join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn drain(&mut self) {
        while let Ok(l) = self.lines.try_recv() {
            self.stderr.push(l);
        }
    }

    async fn expect_stderr(&mut self, needle: &str) {
        let deadline = tokio::time::Instant::now() + WAIT * 2;
        while !self.stderr.iter().any(|l| l.contains(needle)) {
            self.drain();
            assert!(
                tokio::time::Instant::now() < deadline,
                "no stderr line with {needle:?}:\n{}",
                self.stderr.join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the process to exit by itself; returns (success, stderr).
    async fn exit(&mut self) -> (bool, String) {
        let deadline = tokio::time::Instant::now() + WAIT;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "tail kept running (a retry loop?):\n{}",
                self.stderr.join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.drain();
        (status.success(), self.stderr.join("\n"))
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn tail_prints_events_and_resumes_across_a_server_restart() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let key = db.key("kitchen").await;
    let server = TestServer::start(&db).await;
    let addr = server.addr;
    let mut tail = Tail::start(&server, "kitchen", &key, None)
        .await_connected()
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
    let server = TestServer::start_at(&db, addr, |_| {}).await;
    tail.expect_stderr("since=1").await;
    let ev = tail.next_event().await;
    assert_eq!(ev["type"], "loyalty_updated", "missed event replayed");
    assert_eq!(ev["id"], 2);
    insert_loyalty(&c, "kitchen", 8).await;
    let ev = tail.next_event().await;
    assert_eq!(ev["id"], 3, "then live, nothing twice");
    server.stop().await;
}

impl Tail {
    async fn await_connected(mut self) -> Self {
        self.expect_stderr("connected to").await;
        self
    }
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
    let server = TestServer::start(&db).await;
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
    let server = TestServer::start(&db).await;

    let unknown = format!("pos_{}", "ab".repeat(32));
    let mut tail = Tail::start(&server, "kitchen", &unknown, None);
    let (ok, stderr) = tail.exit().await;
    assert!(!ok);
    assert!(stderr.contains("HTTP 401"), "{stderr}");
    assert!(stderr.contains("unknown or revoked"), "{stderr}");
    assert!(!stderr.contains("reconnecting"), "{stderr}");

    let mut tail = Tail::start(&server, "kitchen", &other, None);
    let (ok, stderr) = tail.exit().await;
    assert!(!ok);
    assert!(stderr.contains("HTTP 403"), "{stderr}");
    assert!(stderr.contains("another tenant than 'kitchen'"), "{stderr}");

    let mut tail = Tail::start(&server, "kitchen", "not-a-key", None);
    let (ok, stderr) = tail.exit().await;
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
    let server = TestServer::start(&db).await;
    let mut tail = Tail::start(&server, "kitchen", &key.secret, None)
        .await_connected()
        .await;
    orderpush::db::keys::revoke(&c, &key.id).await.unwrap();
    let (ok, stderr) = tail.exit().await;
    assert!(!ok);
    assert!(stderr.contains("revoked"), "{stderr}");
    server.stop().await;
}
