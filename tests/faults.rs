//! Delivery under faults against the real Postgres: concurrent writers, a listener killed again
//! and again, slow consumers, dead peers and retention (contract §5, issue 3).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::Message;

use crate::common::*;

/// Writers on the busy tenant, and orders each writes (the numbers).
const WRITERS: usize = 8;
const ORDERS_PER_WRITER: usize = 400;
/// Orders written to each of the other tenants meanwhile.
const OTHER_TENANT_ORDERS: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_writers_deliver_every_order_once_in_commit_order() {
    let db = TestDb::create().await;
    for t in ["kitchen", "bistro", "cafe"] {
        db.tenant(t).await;
    }
    let server = TestServer::builder(&db).start().await;
    let kitchen =
        Collector::spawn(Pos::connect(&server, "kitchen", &db.key("kitchen").await, None).await);
    let bistro =
        Collector::spawn(Pos::connect(&server, "bistro", &db.key("bistro").await, None).await);

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let c = db.client().await;
        writers.push(tokio::spawn(async move {
            for i in 0..ORDERS_PER_WRITER {
                insert_order_fast(&c, "kitchen", &format!("K{w}-{i}"), 2)
                    .await
                    .unwrap();
            }
        }));
    }
    for t in ["bistro", "cafe"] {
        let c = db.client().await;
        writers.push(tokio::spawn(async move {
            for i in 0..OTHER_TENANT_ORDERS {
                insert_order_fast(&c, t, &format!("{t}-{i}"), 1)
                    .await
                    .unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let total = WRITERS * ORDERS_PER_WRITER;
    kitchen.wait_for(total, Duration::from_secs(120)).await;
    bistro.wait_for(OTHER_TENANT_ORDERS, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let got = kitchen.stop();
    let client = db.client().await;
    db.wait_numbered().await;
    assert_exactly_the_log("kitchen", &got, &event_log(&client, "kitchen").await);
    let ids: Vec<i64> = got.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert_eq!(
        ids,
        (1..=total as i64).collect::<Vec<_>>(),
        "gap-free, strictly increasing"
    );
    // Every order once; each writer's orders in the order that writer committed them.
    let mut seen = HashSet::new();
    let mut next_of_writer = [0usize; WRITERS];
    for e in &got {
        assert_eq!(e["type"], "new_order");
        assert_eq!(e["data"]["items"].as_array().unwrap().len(), 2);
        let number = e["data"]["orderNumber"].as_str().unwrap().to_owned();
        let (w, i) = number[1..].split_once('-').unwrap();
        let (w, i): (usize, usize) = (w.parse().unwrap(), i.parse().unwrap());
        assert_eq!(
            i, next_of_writer[w],
            "writer {w}'s orders arrive in its commit order"
        );
        next_of_writer[w] += 1;
        assert!(seen.insert(number), "an order arrived twice");
    }
    assert_eq!(seen.len(), total);

    let got = bistro.stop();
    assert_exactly_the_log("bistro", &got, &event_log(&client, "bistro").await);
    assert_eq!(got.len(), OTHER_TENANT_ORDERS);
}

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
            admin
                .batch_execute(&format!(
                    "ALTER DATABASE {} ALLOW_CONNECTIONS false",
                    db.name
                ))
                .await
                .unwrap();
            kills += kill_listeners(&admin, &db.name).await;
            // Contract §6: noticed within 10 s.
            eventually(
                "/readyz turns 503 while the listener is down",
                Duration::from_secs(10),
                || async { readyz(&server).await == 503 },
            )
            .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            admin
                .batch_execute(&format!(
                    "ALTER DATABASE {} ALLOW_CONNECTIONS true",
                    db.name
                ))
                .await
                .unwrap();
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

/// Per-client queue for the slow-consumer test: a few large frames.
const SMALL_QUEUE_BYTES: usize = 256 * 1024;
/// Size of each event in that test: large, so that the server's queue fills after a few
/// events rather than after megabytes of kernel socket buffers.
const LARGE_EVENT_BYTES: usize = 160 * 1024;
/// Events pushed while the slow client does not read: far more than its queue, the socket
/// buffers and tungstenite's write buffer hold together (~1 MB with a small receive buffer).
const PUSHED_WHILE_STALLED: i64 = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_gets_1013_while_a_fast_one_gets_everything_then_resumes() {
    let OneTenant {
        db: _db,
        key,
        server,
    } = one_tenant_with("kitchen", |s| {
        s.tuning(|t| t.client_queue_bytes = SMALL_QUEUE_BYTES)
    })
    .await;
    let mut fast = Pos::connect(&server, "kitchen", &key, None).await;
    let mut slow = connect_small_buffer(&server, "/ws/pos/kitchen", &key, 4096).await;

    let pad = "x".repeat(LARGE_EVENT_BYTES);
    for n in 1..=PUSHED_WHILE_STALLED {
        let (status, _) = server
            .broadcast(&json!({"tenant": "kitchen", "event": {"type": "bulk", "data": {"n": n, "pad": pad}}}))
            .await;
        assert_eq!(status, 200);
        // The fast client is served while the slow one is stalled.
        let ev = fast.next().await;
        assert_eq!(
            (ev["id"].as_i64(), ev["data"]["n"].as_i64()),
            (Some(n), Some(n))
        );
    }

    // The slow client reads again: what was buffered before the cut, then close 1013.
    let mut last = 0;
    let code = loop {
        match tokio::time::timeout(WAIT, slow.ws.next())
            .await
            .expect("a frame or a close")
        {
            Some(Ok(Message::Text(t))) if is_ready(&t) => {}
            Some(Ok(Message::Text(t))) => {
                let ev: Value = serde_json::from_str(&t).unwrap();
                assert_eq!(ev["id"].as_i64(), Some(last + 1), "in order up to the cut");
                last += 1;
            }
            Some(Ok(Message::Close(c))) => break c.map(|c| u16::from(c.code)),
            Some(Ok(_)) => {}
            None | Some(Err(_)) => break None,
        }
    };
    assert_eq!(
        code,
        Some(1013),
        "cut off with 'try again later' after {last} events"
    );
    assert!(last < PUSHED_WHILE_STALLED, "it really missed events");
    assert_eq!(
        metric(
            &server,
            "orderpush_disconnects_total{reason=\"slow_consumer\"}"
        )
        .await,
        1.0
    );

    // It resumes from the last id it has and gets the rest, then live events.
    let mut resumed = Pos::connect(&server, "kitchen", &key, Some(last)).await;
    for id in last + 1..=PUSHED_WHILE_STALLED {
        assert_eq!(resumed.next().await["id"].as_i64(), Some(id));
    }
    server
        .broadcast(&json!({"tenant": "kitchen", "event": {"type": "after", "data": 1}}))
        .await;
    assert_eq!(resumed.next().await["type"], "after");
    assert_eq!(fast.next().await["type"], "after");
    assert!(
        resumed
            .next_within(Duration::from_millis(300))
            .await
            .is_none(),
        "nothing twice"
    );
}

/// The dead-peer test's ping interval and timeout: the interval is half the timeout, so a live
/// client that answers every ping is never near the deadline, while a drop that waited for the
/// next ping tick would come up to a whole interval (4 s) after the deadline.
const DEAD_PEER_PING: Duration = Duration::from_secs(4);
const DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(8);
/// How much later than the deadline the client may see the drop: timer and loopback delays on
/// a busy 2-core machine, generously, yet well below the 3.5 s a ping-tick check would add.
const DEAD_PEER_SLACK: Duration = Duration::from_secs(2);
/// How long after a ping the silent peer sends its one frame: late enough that a ping tick
/// falling exactly on its deadline could not catch it (ticks are never early, pongs can be
/// sub-millisecond), early enough that the tick after would come 3.5 s late.
const DEAD_PEER_PAUSE: Duration = Duration::from_millis(500);

#[tokio::test]
async fn a_silent_peer_is_dropped_on_its_own_deadline_and_a_live_one_is_kept() {
    let OneTenant {
        db: _db,
        key,
        server,
    } = one_tenant_with("kitchen", |s| {
        s.tuning(|t| {
            t.ping_interval = DEAD_PEER_PING;
            t.pong_timeout = DEAD_PEER_TIMEOUT;
        })
    })
    .await;
    // A raw client: upgrades, answers the first ping with one frame, then is silent for good.
    let mut dead = raw_ws_connect(server.addr, "/ws/pos/kitchen", &key, None).await;
    let mut live = Pos::connect(&server, "kitchen", &key, None).await;
    let mut buf = vec![0u8; 64 * 1024];
    let mut before = Vec::new();
    while !before.windows(2).any(|w| w == [0x89, 0x00]) {
        let n = tokio::time::timeout(WAIT, dead.read(&mut buf))
            .await
            .expect("the server pings")
            .unwrap();
        assert!(n > 0, "closed before the first ping");
        before.extend_from_slice(&buf[..n]);
    }
    // Just after a ping tick: a drop that waited for a tick would come almost a whole interval
    // late. (A masked, empty pong: FIN + opcode 0xA, mask bit + length 0, a zero mask key.)
    tokio::time::sleep(DEAD_PEER_PAUSE).await;
    dead.write_all(&[0x8A, 0x80, 0, 0, 0, 0]).await.unwrap();
    let last_frame = Instant::now();

    // The live client keeps reading (tungstenite answers pings) while the dead one is watched.
    let watch_dead = async {
        let mut after = Vec::new();
        loop {
            let n = tokio::time::timeout(Duration::from_secs(30), dead.read(&mut buf))
                .await
                .expect("the server drops the silent peer")
                .unwrap_or(0);
            if n == 0 {
                return (after, last_frame.elapsed());
            }
            after.extend_from_slice(&buf[..n]);
        }
    };
    let watch_live = live.next_within(DEAD_PEER_TIMEOUT + DEAD_PEER_SLACK + DEAD_PEER_PING);
    let ((after, silent_for), event) = tokio::join!(watch_dead, watch_live);
    assert!(event.is_none(), "no event was sent: {event:?}");
    assert!(
        silent_for >= DEAD_PEER_TIMEOUT - Duration::from_millis(10),
        "dropped {silent_for:?} after its last frame, before the {DEAD_PEER_TIMEOUT:?} deadline"
    );
    assert!(
        silent_for <= DEAD_PEER_TIMEOUT + DEAD_PEER_SLACK,
        "dropped {silent_for:?} after its last frame: the deadline is {DEAD_PEER_TIMEOUT:?}"
    );
    assert!(
        after.windows(2).any(|w| w == [0x89, 0x00]),
        "the server kept pinging it after its last frame"
    );
    assert_eq!(
        metric(
            &server,
            "orderpush_disconnects_total{reason=\"ping_timeout\"}"
        )
        .await,
        1.0
    );

    // The live one, connected for longer than the timeout, answered every ping and stays.
    server
        .broadcast(&json!({"tenant": "kitchen", "event": {"type": "still_here", "data": 1}}))
        .await;
    assert_eq!(live.next().await["type"], "still_here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_runs_on_its_own_and_never_blocks_writers() {
    let OneTenant { db, key, server } = one_tenant_with("kitchen", |s| {
        s.tuning(|t| t.prune_interval = Duration::from_millis(200))
    })
    .await;
    let client = db.client().await;
    for i in 1..=20 {
        insert_loyalty(&client, "kitchen", i).await;
    }
    client
        .execute(
            "UPDATE orderpush.events SET emitted_at = now() - interval '2 days' WHERE id <= 15",
            &[],
        )
        .await
        .unwrap();
    // Nobody calls prune: the server's schedule does.
    eventually(
        "the scheduled retention prunes the old events",
        WAIT,
        || async { db.event_count().await == 5 },
    )
    .await;
    assert!(metric(&server, "orderpush_pruned_events_total").await >= 15.0);
    // A fresh instance (no recent frames in memory) answers from the retained log.
    let fresh = TestServer::builder(&db).start().await;
    let mut expired = Pos::connect(&fresh, "kitchen", &key, Some(3)).await;
    let first = expired.next().await;
    assert_eq!(
        (first["type"].as_str(), first["id"].as_i64()),
        (Some("resync_required"), Some(20))
    );

    // A prune in progress (its deletes uncommitted, its row locks held) does not hold up a
    // writer of the same tenant, nor the delivery of what it writes. (Rows aged 2 hours: the
    // server's 24 h schedule leaves them to this transaction's 1 h retention.)
    let mut live = Pos::connect(&server, "kitchen", &key, None).await;
    client
        .execute(
            "UPDATE orderpush.events SET emitted_at = now() - interval '2 hours' WHERE id <= 18",
            &[],
        )
        .await
        .unwrap();
    let mut pruner = db.client().await;
    let tx = pruner.transaction().await.unwrap();
    let deleted = orderpush::db::events::prune(&tx, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(deleted, 3);
    let writer = db.client().await;
    tokio::time::timeout(WAIT, async {
        for i in 21..=30 {
            insert_loyalty(&writer, "kitchen", i).await;
        }
    })
    .await
    .expect("writers are not blocked by a running prune");
    for id in 21..=30 {
        assert_eq!(live.next().await["id"], id);
    }
    tx.commit().await.unwrap();
    assert_eq!(db.event_count().await, 12);
    assert_eq!(
        expired.next().await["id"],
        21,
        "a resynced client continues live"
    );
}
