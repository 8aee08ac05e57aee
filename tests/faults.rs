//! Database-side faults (docs/reliability.md, "Failure modes"): the listener's and the sequencer's
//! connections killed while writers run, `/readyz` while the listener is down. (Postgres and the
//! service restarted: `restart.rs`; everything at once: `chaos.rs`.)

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::common::*;

/// Listener outages in the test below: even rounds hold the listener down (no new connections
/// to the database) long enough to watch /readyz; odd rounds just kill it.
const KILL_ROUNDS: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_killed_again_and_again_loses_nothing_and_readyz_follows_it() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    db.tenant("bistro").await;
    let server = TestServer::builder(&db).start().await;
    let kitchen =
        Collector::spawn(Pos::connect(&server, "kitchen", &db.key("kitchen").await, None).await);
    let bistro =
        Collector::spawn(Pos::connect(&server, "bistro", &db.key("bistro").await, None).await);

    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for (n, tenant) in ["kitchen", "kitchen", "bistro"].into_iter().enumerate() {
        let c = db.client().await;
        let stop = Arc::clone(&stop);
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                if n == 0 {
                    insert_order_fast(&c, tenant, &format!("o-{i}"), 1)
                        .await
                        .unwrap();
                } else {
                    insert_loyalty(&c, tenant, i).await;
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }

    let admin = admin().await;
    let mut kills = 0;
    for round in 0..KILL_ROUNDS {
        tokio::time::sleep(Duration::from_millis(300)).await;
        listener_back(&admin, &db.name).await;
        if round % 2 == 0 {
            allow_connections(&admin, &db.name, false).await;
            kills += kill_listeners(&admin, &db.name).await;
            // docs/reliability.md, "Failure modes": noticed within 10 s.
            eventually(
                "/readyz turns 503 while the listener is down",
                Duration::from_secs(10),
                || async { readyz(&server).await == 503 },
            )
            .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            allow_connections(&admin, &db.name, true).await;
            eventually(
                "/readyz is 200 again after catch-up",
                Duration::from_secs(30),
                || async { readyz(&server).await == 200 },
            )
            .await;
        } else {
            kills += kill_listeners(&admin, &db.name).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    assert!(
        kills >= KILL_ROUNDS,
        "the listener was really killed ({kills} kills)"
    );

    let client = db.client().await;
    db.wait_numbered().await;
    for (name, collector) in [("kitchen", kitchen), ("bistro", bistro)] {
        let log = event_log(&client, name).await;
        assert!(
            log.len() > 50,
            "the writers wrote while the listener was down"
        );
        collector.wait_for(log.len(), Duration::from_secs(30)).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_exactly_the_log(name, &collector.stop(), &log);
    }
    assert!(metric(&server, "orderpush_listener_connects_total").await > KILL_ROUNDS as f64);
}

/// Waits until the listener is connected again: after a kill it backs off before
/// reconnecting, longer after each kill.
async fn listener_back(admin: &tokio_postgres::Client, db: &str) {
    eventually(
        "the listener reconnects",
        Duration::from_secs(30),
        || async { !listener_pids(admin, db).await.is_empty() },
    )
    .await;
}

#[tokio::test]
async fn killing_the_listener_loses_nothing() {
    let OneTenant { db, key, server } = one_tenant("kitchen").await;
    let mut pos = Pos::connect(&server, "kitchen", &key, None).await;
    const EVENTS: i32 = 150;
    let writer = {
        let client = db.client().await;
        tokio::spawn(async move {
            for i in 1..=EVENTS {
                insert_loyalty(&client, "kitchen", i).await;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };
    let killer = {
        let client = db.client().await;
        let name = db.name.clone();
        tokio::spawn(async move {
            let mut kills = 0;
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(120)).await;
                for pid in listener_pids(&client, &name).await {
                    client
                        .execute("SELECT pg_terminate_backend($1)", &[&pid])
                        .await
                        .unwrap();
                    kills += 1;
                }
            }
            kills
        })
    };
    for want in 1..=EVENTS {
        let ev = pos.next().await;
        assert_eq!(ev["id"], want as i64, "in order, none lost, none twice");
        assert_eq!(ev["data"]["pointsChange"], want);
    }
    writer.await.unwrap();
    assert!(killer.await.unwrap() >= 2, "the listener was really killed");
    assert!(pos.next_within(Duration::from_millis(300)).await.is_none());
    // And it came back: /readyz is green again.
    server.wait_ready().await;
}

#[tokio::test]
async fn readyz_reports_a_lost_listener() {
    let db = TestDb::create().await;
    let server = TestServer::builder(&db).start().await;
    let admin = admin().await;
    // Refuse new connections to this database, then kill the listener: it cannot come back.
    allow_connections(&admin, &db.name, false).await;
    for pid in listener_pids(&admin, &db.name).await {
        admin
            .execute("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = reqwest::get(server.http("/readyz")).await.unwrap();
        if r.status() == 503 {
            let body: serde_json::Value = r.json().await.unwrap();
            assert_eq!(body["listener"], false);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz never noticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        reqwest::get(server.http("/healthz"))
            .await
            .unwrap()
            .status(),
        200,
        "the process is still up"
    );
    allow_connections(&admin, &db.name, true).await;
    server.wait_ready().await;
}

/// Rounds of sequencer kills in the test below, one every [`SEQUENCER_KILL_EVERY`].
const SEQUENCER_KILL_ROUNDS: usize = 8;
/// Often enough to land in the middle of batches while writers run.
const SEQUENCER_KILL_EVERY: Duration = Duration::from_millis(400);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequencer_killed_mid_batch_loses_duplicates_and_reorders_nothing() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    db.tenant("bistro").await;
    // Two instances: either may hold the election when the other's sequencer is killed.
    let a = TestServer::builder(&db).start().await;
    let b = TestServer::builder(&db).start().await;
    let kitchen =
        Collector::spawn(Pos::connect(&a, "kitchen", &db.key("kitchen").await, None).await);
    let bistro = Collector::spawn(Pos::connect(&b, "bistro", &db.key("bistro").await, None).await);

    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for (n, tenant) in ["kitchen", "kitchen", "bistro"].into_iter().enumerate() {
        let c = db.client().await;
        let stop = Arc::clone(&stop);
        writers.push(tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                insert_order_fast(&c, tenant, &format!("w{n}-{i}"), 2)
                    .await
                    .unwrap();
                i += 1;
            }
            i
        }));
    }
    let admin = admin().await;
    let mut kills = 0;
    for _ in 0..SEQUENCER_KILL_ROUNDS {
        tokio::time::sleep(SEQUENCER_KILL_EVERY).await;
        kills += kill_sequencers(&admin, &db.name).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut written = [0usize; 3];
    for (n, w) in writers.into_iter().enumerate() {
        written[n] = w.await.unwrap();
    }
    assert!(
        kills >= SEQUENCER_KILL_ROUNDS,
        "sequencers were killed ({kills})"
    );
    // Someone took over after every kill, and numbered everything.
    db.wait_numbered().await;
    let client = db.client().await;
    for (name, collector, writers) in [("kitchen", kitchen, 0..2), ("bistro", bistro, 2..3)] {
        let log = event_log(&client, name).await;
        let total: usize = written[writers.clone()].iter().sum();
        assert_eq!(log.len(), total, "{name}: one event per committed order");
        collector.wait_for(log.len(), Duration::from_secs(30)).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let got = collector.stop();
        assert_exactly_the_log(name, &got, &log);
        // Each writer's orders in the order it committed them, each once.
        let mut next = HashSet::new();
        let mut last_of_writer = std::collections::HashMap::new();
        for e in &got {
            let number = e["data"]["orderNumber"].as_str().unwrap().to_owned();
            assert_eq!(e["data"]["items"].as_array().unwrap().len(), 2, "{number}");
            let (w, i) = number[1..].split_once('-').unwrap();
            let (w, i): (usize, usize) = (w.parse().unwrap(), i.parse().unwrap());
            let expected = last_of_writer.get(&w).map_or(0, |l| l + 1);
            assert_eq!(i, expected, "writer {w}'s orders in commit order");
            last_of_writer.insert(w, i);
            assert!(next.insert(number), "an order arrived twice");
        }
    }
    assert!(
        metric(&a, "orderpush_sequencer_leader").await
            + metric(&b, "orderpush_sequencer_leader").await
            == 1.0,
        "exactly one sequencer"
    );
}
