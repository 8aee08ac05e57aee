//! Delivery across instances and listener failures.

use std::time::Duration;

use serde_json::json;

use crate::common::*;

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
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS false",
            db.name
        ))
        .await
        .unwrap();
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
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS true",
            db.name
        ))
        .await
        .unwrap();
    server.wait_ready().await;
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
        let text = reqwest::get(server.http("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
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
        let status: serde_json::Value = reqwest::get(server.http("/status/data"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
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
    let mode = || async {
        let status: serde_json::Value = reqwest::get(server.http("/status/data"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        status.to_string()
    };
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
