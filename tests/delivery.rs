//! Delivery without faults (docs/architecture.md, "Numbering", "Following the log"): every
//! committed event reaches its tenant's terminals once, in commit order, under eight concurrent
//! writers, on two instances, and in every wake-up mode (docs/dba.md, "Wake-up mode").

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;

use crate::common::*;

/// Writers on the busy tenant, and orders each writes: the load docs/reliability.md states.
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

#[tokio::test]
async fn two_instances_deliver_one_broadcast_with_the_same_id() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let key = db.key("kitchen").await;
    let a = TestServer::builder(&db).start().await;
    let b = TestServer::builder(&db).start().await;
    let mut on_a = Pos::connect(&a, "kitchen", &key, None).await;
    let mut on_b = Pos::connect(&b, "kitchen", &key, None).await;
    let (status, _) = a
        .broadcast(&json!({"tenant": "kitchen", "event": {"type": "hello", "data": {"x": 1}}}))
        .await;
    assert_eq!(status, 200);
    let ea = on_a.next().await;
    let eb = on_b.next().await;
    assert_eq!(ea, eb, "identical frames, same id, on both instances");
    assert_eq!(ea["id"], 1);
}

/// Every wake-up mode a DBA can pick is lossless and in order under concurrent writers.
#[tokio::test]
async fn every_wakeup_mode_delivers_every_event_in_order() {
    for mode in ["notify", "gated", "poll"] {
        let db = TestDb::create().await;
        db.tenant("kitchen").await;
        let key = db.key("kitchen").await;
        admin()
            .await
            .batch_execute(&format!(
                "ALTER DATABASE {} SET orderpush.wakeup = '{mode}'",
                db.name
            ))
            .await
            .unwrap();
        let server = TestServer::builder(&db).start().await;
        let mut pos = Pos::connect(&server, "kitchen", &key, None).await;
        const WRITERS: i32 = 4;
        const EACH: i32 = 50;
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let client = db.client().await;
            writers.push(tokio::spawn(async move {
                for i in 0..EACH {
                    insert_loyalty(&client, "kitchen", w * 1000 + i).await;
                }
            }));
        }
        let mut seen = std::collections::HashSet::new();
        for want in 1..=(WRITERS * EACH) as i64 {
            let ev = pos.next().await;
            assert_eq!(ev["id"], want, "{mode}: in order, none lost");
            assert!(
                seen.insert(ev["data"]["pointsChange"].as_i64().unwrap()),
                "{mode}: none twice"
            );
        }
        for w in writers {
            w.await.unwrap();
        }
        let (_, status) = get_json(&server, "/status/data", None).await;
        assert!(
            status.to_string().contains(&format!("\"{mode}\"")),
            "{mode}: {status}"
        );
    }
}

/// A DBA's `ALTER DATABASE … SET orderpush.wakeup` reaches a running service without a restart.
#[tokio::test]
async fn a_changed_wakeup_mode_is_picked_up_while_running() {
    let OneTenant { db, key, server } = one_tenant("kitchen").await;
    let mode = || async { get_json(&server, "/status/data", None).await.1.to_string() };
    assert!(mode().await.contains("\"gated\""), "the default");
    admin()
        .await
        .batch_execute(&format!(
            "ALTER DATABASE {} SET orderpush.wakeup = 'poll'",
            db.name
        ))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !mode().await.contains("\"poll\"") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "mode never switched"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And delivery goes on in the new mode.
    let mut pos = Pos::connect(&server, "kitchen", &key, None).await;
    insert_loyalty(&db.client().await, "kitchen", 1).await;
    assert_eq!(pos.next().await["id"], 1);
}
