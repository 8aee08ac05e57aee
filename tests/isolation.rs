//! Pool isolation (docs/architecture.md, *Bounds*): replays, scrapes and probes cannot take the
//! connections /broadcast needs. Many slow replays at once, and a flood of /metrics and /readyz
//! while the database gauges' tables are locked, leave /broadcast answering 200.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::protocol::Message;

use crate::common::*;

/// Events the slow replayers each replay from the start: thousands, about 1 KB each.
const HISTORY: i32 = 3_000;
/// Sockets replaying at once: more than the request pool's 16 connections.
const SLOW_REPLAYERS: usize = 20;
/// How long a slow replayer pauses after each frame: 3,000 frames take it 30 s, so every replay
/// is still running while the test broadcasts.
const READ_PAUSE: Duration = Duration::from_millis(10);
/// Broadcasts sent while the replays (or the flood) run; each must answer 200.
const BROADCASTS: usize = 15;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_slow_replays_leave_broadcast_readyz_and_metrics_answering() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    db.tenant("bistro").await;
    let key = db.key("kitchen").await;
    let client = db.client().await;
    bulk_loyalty(&client, "kitchen", HISTORY, 1000).await;
    number_staged(&db).await;
    // Many sockets of one key at once: the per-key connection cap is not what is tested here.
    let server = TestServer::builder(&db)
        .tuning(|t| t.max_connections_per_key = 64)
        .start()
        .await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..SLOW_REPLAYERS {
        let mut pos = connect_small_buffer(&server, "/ws/pos/kitchen?since=0", &key, 4096).await;
        let stop = Arc::clone(&stop);
        readers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(WAIT, pos.ws.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) if is_ready(&t) => {}
                    Ok(Some(Ok(Message::Text(t)))) => {
                        let ev: Value = serde_json::from_str(&t).unwrap();
                        ids.push(ev["id"].as_i64().unwrap());
                        tokio::time::sleep(READ_PAUSE).await;
                    }
                    Ok(Some(Ok(_))) => {}
                    other => panic!("a slow replayer's socket ended: {other:?}"),
                }
            }
            ids
        }));
    }

    let http = reqwest::Client::new();
    for n in 0..BROADCASTS {
        // Another tenant's broadcast: the writer must get a connection whatever replays do.
        let (status, body) = server
            .broadcast(&json!({"tenant": "bistro", "event": {"type": "ping", "data": n}}))
            .await;
        assert_eq!(status, 200, "broadcast {n} during the replays: {body}");
        assert_eq!(readyz(&server).await, 200, "/readyz during the replays");
        let metrics = http.get(server.http("/metrics")).send().await.unwrap();
        assert_eq!(metrics.status(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        let ids = reader.await.unwrap();
        assert!(!ids.is_empty(), "every replay made progress");
        assert!(
            ids.len() < HISTORY as usize,
            "the replays were still running during the broadcasts"
        );
        let want: Vec<i64> = (1..=ids.len() as i64).collect();
        assert_eq!(ids, want, "each replay in order, without gaps");
    }
}

/// Concurrent clients hammering /metrics and /readyz in the flood test.
const FLOODERS: usize = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_and_readyz_flood_with_the_gauge_tables_locked_never_slows_broadcast() {
    let OneTenant { db, key, server } = one_tenant("kitchen").await;
    let mut pos = Pos::connect(&server, "kitchen", &key, None).await;

    // The database gauges read `orderpush.connections`: with it locked, any scrape that queried
    // the database would wait (and a timed-out query would wedge its pooled connection).
    let mut locker = db.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE orderpush.connections IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let mut flood = Vec::new();
    for i in 0..FLOODERS {
        let (stop, answered) = (Arc::clone(&stop), Arc::clone(&answered));
        let url = server.http(if i % 2 == 0 { "/metrics" } else { "/readyz" });
        flood.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                let r = tokio::time::timeout(WAIT, http.get(&url).send())
                    .await
                    .expect("a scrape answers")
                    .unwrap();
                assert_eq!(r.status(), 200, "{url}");
                answered.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for n in 0..BROADCASTS {
        let (status, body) = server
            .broadcast(&json!({"tenant": "kitchen", "event": {"type": "flood", "data": n}}))
            .await;
        assert_eq!(status, 200, "broadcast {n} during the flood: {body}");
        assert_eq!(pos.next().await["data"], n);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        f.await.unwrap();
    }
    lock.rollback().await.unwrap();
    assert!(
        answered.load(Ordering::Relaxed) >= FLOODERS,
        "the flood really ran"
    );
}
