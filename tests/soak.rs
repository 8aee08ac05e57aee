//! A bounded hostile soak (docs/reliability.md, "Hostile input"): for a minute, at once,
//! `?since=0` storms into a pruned range, floods of bad keys, connections that trickle their
//! headers, `/metrics` floods and 300 KB-3 MB orders on one tenant — while an ordinary kitchen
//! on another tenant must get every order, in order, once, and every `/broadcast` must be
//! answered 200. Latencies are printed for the benchmark notes, never asserted: timed assertions
//! flake on shared cores.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::common::*;

/// How long the hostile load runs.
const SOAK_FOR: Duration = Duration::from_secs(60);
/// Events of the hostile tenant before the soak; the first ones are pruned, so `since=0` is a
/// resume into a pruned range.
const HOSTILE_HISTORY: i32 = 600;
/// Concurrent `since=0` stormers and bad-key flooders.
const STORMERS: usize = 6;
const FLOODERS: usize = 3;
/// Connections trickling their headers a byte a second, at any time.
const TRICKLERS: usize = 20;
/// Concurrent `/metrics` scrapers.
const SCRAPERS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordinary_kitchen_gets_everything_through_a_minute_of_hostile_load() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    db.tenant("hostile").await;
    let kitchen_key = db.key("kitchen").await;
    let mut hostile_keys = Vec::new();
    for _ in 0..3 {
        hostile_keys.push(db.key("hostile").await);
    }
    let c = db.client().await;
    c.execute(
        "INSERT INTO loyalty_transactions (tenant_slug, customer_id, points_change, new_balance, transaction_type)
         SELECT 'hostile', 'c', i, i, 'earned' FROM generate_series(1, $1) AS i",
        &[&HOSTILE_HISTORY],
    )
    .await
    .unwrap();
    number_staged(&db).await;
    c.execute(
        "UPDATE orderpush.events SET emitted_at = now() - interval '2 days' WHERE tenant_slug = 'hostile' AND id <= 10",
        &[],
    )
    .await
    .unwrap();
    orderpush::db::events::prune(&c, Duration::from_secs(86_400))
        .await
        .unwrap();
    let server = Arc::new(TestServer::builder(&db).start().await);
    let kitchen = Collector::spawn(Pos::connect(&server, "kitchen", &kitchen_key, None).await);
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();

    // The hostile load.
    for n in 0..STORMERS {
        let (server, stop, key) = (
            Arc::clone(&server),
            Arc::clone(&stop),
            hostile_keys[n % 3].clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut req = server
                    .ws("/ws/pos/hostile?since=0")
                    .into_client_request()
                    .unwrap();
                req.headers_mut().insert("X-API-Key", key.parse().unwrap());
                // Over the per-key cap some are refused (503): that is the defence working.
                if let Ok((mut ws, _)) = tokio_tungstenite::connect_async(req).await {
                    // Reads a little, then drops the socket: whatever it was sent (the big
                    // orders may cut it off with 1013 first) does not matter.
                    let _ = tokio::time::timeout(Duration::from_millis(200), ws.next()).await;
                }
            }
        }));
    }
    for _ in 0..FLOODERS {
        let (server, stop) = (Arc::clone(&server), Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let bad = format!("pos_{:064x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let status = connect_status(&server, "/ws/pos/kitchen", Some(&bad)).await;
                assert!(matches!(status, 401 | 429), "a bad key got {status}");
            }
        }));
    }
    for _ in 0..TRICKLERS {
        let (addr, stop) = (server.addr, Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
                    continue;
                };
                // A byte a second until the server gives up on the headers (10 s).
                for b in b"GET /metrics HTTP/1.1\r\nHost: x\r\n".iter() {
                    if stop.load(Ordering::Relaxed) || s.write_all(&[*b]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }));
    }
    for _ in 0..SCRAPERS {
        let (server, stop) = (Arc::clone(&server), Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                let r = http.get(server.http("/metrics")).send().await.unwrap();
                assert_eq!(r.status(), 200);
                let _ = r.bytes().await;
            }
        }));
    }
    {
        // Orders with customer notes from 300 KB to 3 MB on the hostile tenant (the largest
        // shortened to the frame limit where they are stored).
        let (w, stop) = (db.client().await, Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let note = "n".repeat([300 << 10, 700 << 10, 1 << 20, 3 << 20][i % 4]);
                w.execute(
                    "INSERT INTO orders (tenant_slug, order_number, order_type, order_source, status, total_amount, special_instructions)
                     VALUES ('hostile', $1, 'delivery', 'online', 'new', 1.00, $2)",
                    &[&format!("BIG-{i}"), &note],
                )
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }));
    }

    // The ordinary kitchen: orders written, broadcasts posted, all through the soak.
    let broadcasts = Arc::new(AtomicU64::new(0));
    let writer = {
        let (w, stop) = (db.client().await, Arc::clone(&stop));
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                insert_loyalty(&w, "kitchen", i).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let broadcaster = {
        let (server, stop, count) = (
            Arc::clone(&server),
            Arc::clone(&stop),
            Arc::clone(&broadcasts),
        );
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let started = Instant::now();
                let (status, reply) = server
                    .broadcast(
                        &json!({"tenant": "kitchen", "event": {"type": "note", "data": {"i": i}}}),
                    )
                    .await;
                assert_eq!(status, 200, "a /broadcast during the soak: {reply}");
                latencies.push(started.elapsed());
                count.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            latencies
        })
    };
    tokio::time::sleep(SOAK_FOR).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let mut latencies = broadcaster.await.unwrap();
    for t in tasks {
        t.await.unwrap();
    }

    // The verdict: the kitchen got exactly its log.
    db.wait_numbered().await;
    let log = event_log(&c, "kitchen").await;
    assert!(
        log.len() > 500,
        "the kitchen's writers wrote ({})",
        log.len()
    );
    kitchen.wait_for(log.len(), Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_exactly_the_log("the ordinary kitchen", &kitchen.stop(), &log);
    latencies.sort();
    let p = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    eprintln!(
        "soak: {} broadcasts, /broadcast p50 {:?} p99 {:?} max {:?}; {} kitchen events delivered",
        broadcasts.load(Ordering::Relaxed),
        p(0.5),
        p(0.99),
        latencies.last().unwrap(),
        log.len()
    );
}
