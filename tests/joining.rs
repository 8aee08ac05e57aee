//! How a POS joins (docs/protocol.md, "Connect"): `ready` once it is caught up, the open orders
//! with `?snapshot=open` where it would otherwise have to refetch them, and `?types=` to receive
//! only some event types without taking the skipped ones for a gap.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

async fn kitchen() -> (TestDb, TestServer, String) {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let key = db.key("kitchen").await;
    let server = TestServer::builder(&db).start().await;
    (db, server, key)
}

/// Every frame, `ready` included, parsed.
async fn frame(pos: &mut Pos) -> Value {
    let text = pos
        .next_frame_within(WAIT)
        .await
        .expect("a frame arrives in time");
    serde_json::from_str(&text).unwrap()
}

/// The `order_snapshot` frames up to `snapshot_end`, and that frame; any other type fails.
async fn read_snapshot(pos: &mut Pos) -> (Vec<Value>, Value) {
    let mut orders = Vec::new();
    loop {
        let f = frame(pos).await;
        match f["type"].as_str() {
            Some("order_snapshot") => orders.push(f),
            Some("snapshot_end") => return (orders, f),
            other => panic!("unexpected {other:?}: {f}"),
        }
    }
}

/// Inserts an order (with one item) in status `status`, created `age_hours` ago.
async fn order(c: &tokio_postgres::Client, number: &str, status: &str, age_hours: f64) -> String {
    c.query_one(
        "WITH o AS (
           INSERT INTO orders (tenant_slug, order_number, order_type, order_source, status,
                               total_amount, created_at)
           VALUES ('kitchen', $1, 'delivery', 'online', $2, 10.00,
                   now() - $3::float8 * interval '1 hour')
           RETURNING id)
         INSERT INTO order_items (order_id, name, quantity, price)
         SELECT id, 'Soup', 1, 10.00 FROM o RETURNING order_id::text",
        &[&number, &status, &age_hours],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn ready_follows_the_last_replayed_frame_and_comes_at_once_for_a_live_join() {
    let (db, server, key) = kitchen().await;
    let c = db.client().await;
    let mut first = Pos::join(&server, "kitchen", &key, "").await;
    let ready = frame(&mut first).await;
    assert_eq!(
        (ready["type"].as_str(), ready["id"].as_i64()),
        (Some("ready"), Some(0))
    );
    for p in 1..=3 {
        insert_loyalty(&c, "kitchen", p).await;
    }
    for id in 1..=3 {
        assert_eq!(frame(&mut first).await["id"], id);
    }
    // A live join is told at once where the tenant stands.
    let mut live = Pos::join(&server, "kitchen", &key, "").await;
    let ready = frame(&mut live).await;
    assert_eq!(
        (ready["type"].as_str(), ready["id"].as_i64()),
        (Some("ready"), Some(3))
    );
    let mut resumed = Pos::join(&server, "kitchen", &key, "?since=1").await;
    let got: Vec<(String, i64)> = [
        frame(&mut resumed).await,
        frame(&mut resumed).await,
        frame(&mut resumed).await,
    ]
    .iter()
    .map(|f| {
        (
            f["type"].as_str().unwrap().to_owned(),
            f["id"].as_i64().unwrap(),
        )
    })
    .collect();
    assert_eq!(
        got,
        vec![
            ("loyalty_updated".into(), 2),
            ("loyalty_updated".into(), 3),
            ("ready".into(), 3)
        ]
    );
    insert_loyalty(&c, "kitchen", 4).await;
    assert_eq!(frame(&mut resumed).await["id"], 4, "then live");
    assert_eq!(frame(&mut live).await["id"], 4);
}

#[tokio::test]
async fn a_snapshot_sends_exactly_the_open_orders_then_live_events() {
    let (db, server, key) = kitchen().await;
    let c = db.client().await;
    let statuses = [
        "pending",
        "confirmed",
        "preparing",
        "ready",
        "completed",
        "cancelled",
    ];
    let mut open = HashSet::new();
    for i in 0..30 {
        let status = statuses[i % statuses.len()];
        let id = order(&c, &format!("O-{i}"), status, 1.0).await;
        if !matches!(status, "completed" | "cancelled") {
            open.insert(id);
        }
    }
    // Not open: older than the 48 h window. Open: a pre-order for tomorrow, placed long ago.
    order(&c, "OLD", "pending", 72.0).await;
    let pre = order(&c, "PRE", "pending", 72.0).await;
    c.execute(
        "UPDATE orders SET scheduled_for = now() + interval '1 day' WHERE id = $1::text::uuid",
        &[&pre],
    )
    .await
    .unwrap();
    open.insert(pre);
    db.wait_numbered().await;
    let head = db.event_count().await;

    let mut pos = Pos::join(&server, "kitchen", &key, "?snapshot=open").await;
    let mut got = HashSet::new();
    let (orders, end) = read_snapshot(&mut pos).await;
    for f in orders.iter().chain([&end]) {
        assert_eq!(
            f["id"], head,
            "every snapshot frame carries the snapshot's id: {f}"
        );
    }
    for f in &orders {
        let status = f["data"]["status"].as_str().unwrap();
        assert!(!matches!(status, "completed" | "cancelled"), "{f}");
        assert_eq!(f["data"]["items"][0]["name"], "Soup");
        for k in [
            "orderId",
            "orderNumber",
            "customerName",
            "totalAmount",
            "createdAt",
        ] {
            assert!(f["data"].get(k).is_some(), "{k} in {f}");
        }
        assert!(got.insert(f["data"]["orderId"].as_str().unwrap().to_owned()));
    }
    assert_eq!(end["complete"], true);
    assert_eq!(got, open, "exactly the open orders");
    let ready = frame(&mut pos).await;
    assert_eq!(
        (ready["type"].as_str(), ready["id"].as_i64()),
        (Some("ready"), Some(head))
    );
    let next = order(&c, "LIVE", "pending", 0.0).await;
    let ev = frame(&mut pos).await;
    assert_eq!(
        (ev["type"].as_str(), ev["id"].as_i64()),
        (Some("new_order"), Some(head + 1))
    );
    assert_eq!(ev["data"]["orderId"], next);
    assert_eq!(metric(&server, "orderpush_snapshots_total").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_racing_a_snapshot_are_never_lost() {
    let (db, server, key) = kitchen().await;
    let c = db.client().await;
    for i in 0..20 {
        order(&c, &format!("BASE-{i}"), "pending", 1.0).await;
    }
    // A writer adds orders and moves statuses while POS join with snapshots.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let w = db.client().await;
        let stop = std::sync::Arc::clone(&stop);
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                order(&w, &format!("RACE-{i}"), "pending", 0.0).await;
                w.execute(
                    "UPDATE orders SET status = CASE status WHEN 'pending' THEN 'preparing'
                                                            ELSE 'ready' END
                     WHERE id = (SELECT id FROM orders ORDER BY random() LIMIT 1)",
                    &[],
                )
                .await
                .unwrap();
                i += 1;
            }
        })
    };
    let mut states: Vec<HashMap<String, String>> = Vec::new();
    let mut sockets = Vec::new();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let mut pos = Pos::join(&server, "kitchen", &key, "?snapshot=open").await;
        let state: HashMap<String, String> = read_snapshot(&mut pos)
            .await
            .0
            .iter()
            .map(|f| {
                (
                    f["data"]["orderId"].as_str().unwrap().to_owned(),
                    f["data"]["status"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        states.push(state);
        sockets.push(pos);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    db.wait_numbered().await;
    let head = db.event_count().await;
    let truth: HashMap<String, String> = c
        .query("SELECT id::text, status FROM orders", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // Each POS applies the live events after its snapshot (upserting by orderId) and must end
    // with every order in its current status.
    for (mut state, mut pos) in states.into_iter().zip(sockets) {
        loop {
            let f = frame(&mut pos).await;
            match f["type"].as_str() {
                Some("ready") => {}
                Some("new_order") | Some("order_updated") => {
                    state.insert(
                        f["data"]["orderId"].as_str().unwrap().to_owned(),
                        f["data"]["status"].as_str().unwrap().to_owned(),
                    );
                }
                other => panic!("unexpected {other:?}: {f}"),
            }
            if f["id"].as_i64() >= Some(head) {
                break;
            }
        }
        assert_eq!(
            state, truth,
            "nothing lost between the snapshot and the live events"
        );
    }
}

#[tokio::test]
async fn a_snapshot_past_either_bound_says_it_is_incomplete() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let key = db.key("kitchen").await;
    let c = db.client().await;
    for i in 0..10 {
        order(&c, &format!("O-{i}"), "pending", 1.0).await;
    }
    let few = TestServer::builder(&db)
        .tuning(|t| t.snapshot_max_orders = 4)
        .start()
        .await;
    let mut pos = Pos::join(&few, "kitchen", &key, "?snapshot=open").await;
    let (orders, end) = read_snapshot(&mut pos).await;
    assert_eq!((orders.len(), &end["complete"]), (4, &Value::Bool(false)));
    few.stop().await;

    // Big orders: 3 of 300 KB fit in 1 MiB, the fourth does not.
    c.execute(
        "UPDATE orders SET special_instructions = repeat('x', 300 * 1024)",
        &[],
    )
    .await
    .unwrap();
    let small = TestServer::builder(&db)
        .tuning(|t| t.snapshot_max_bytes = 1 << 20)
        .start()
        .await;
    let mut pos = Pos::join(&small, "kitchen", &key, "?snapshot=open").await;
    let (orders, end) = read_snapshot(&mut pos).await;
    assert_eq!((orders.len(), &end["complete"]), (3, &Value::Bool(false)));
}

#[tokio::test]
async fn with_since_a_snapshot_comes_only_instead_of_resync_required() {
    let (db, server, key) = kitchen().await;
    let c = db.client().await;
    order(&c, "O-1", "pending", 1.0).await;
    insert_loyalty(&c, "kitchen", 1).await;
    db.wait_numbered().await;
    // A normal resume: unchanged.
    let mut pos = Pos::join(&server, "kitchen", &key, "?since=1&snapshot=open").await;
    assert_eq!(frame(&mut pos).await["type"], "loyalty_updated");
    assert_eq!(frame(&mut pos).await["type"], "ready");
    // Ahead of the log (a restored database): the open orders instead of resync_required.
    let mut ahead = Pos::join(&server, "kitchen", &key, "?since=99&snapshot=open").await;
    let f = frame(&mut ahead).await;
    assert_eq!(
        (f["type"].as_str(), f["id"].as_i64()),
        (Some("order_snapshot"), Some(2))
    );
    assert_eq!(frame(&mut ahead).await["type"], "snapshot_end");
    // Without snapshot=open, the same join is told to refetch.
    let mut told = Pos::join(&server, "kitchen", &key, "?since=99").await;
    assert_eq!(frame(&mut told).await["data"]["reason"], "log_rewound");
}

#[tokio::test]
async fn a_type_filter_sends_only_those_types_without_false_resyncs() {
    let (db, server, key) = kitchen().await;
    let c = db.client().await;
    let mut orders_only =
        Pos::join(&server, "kitchen", &key, "?types=new_order,order_updated").await;
    assert_eq!(frame(&mut orders_only).await["type"], "ready");
    // Loyalty events between the orders are skipped, not taken for a gap.
    for i in 0..3 {
        insert_loyalty(&c, "kitchen", i).await;
        order(&c, &format!("O-{i}"), "pending", 0.0).await;
        insert_loyalty(&c, "kitchen", i).await;
    }
    let ids: Vec<i64> = [
        frame(&mut orders_only).await,
        frame(&mut orders_only).await,
        frame(&mut orders_only).await,
    ]
    .iter()
    .map(|f| {
        assert_eq!(f["type"], "new_order", "{f}");
        f["id"].as_i64().unwrap()
    })
    .collect();
    assert_eq!(ids, vec![2, 5, 8]);
    assert!(
        orders_only
            .next_frame_within(Duration::from_millis(300))
            .await
            .is_none(),
        "no resync_required, no loyalty event"
    );
    // A filtered resume: the same, and `ready` gives the position to resume from.
    for since in [1, 0] {
        let mut again = Pos::join(
            &server,
            "kitchen",
            &key,
            &format!("?since={since}&types=new_order"),
        )
        .await;
        let got: Vec<Value> = [
            frame(&mut again).await,
            frame(&mut again).await,
            frame(&mut again).await,
            frame(&mut again).await,
        ]
        .to_vec();
        let kinds: Vec<(&str, i64)> = got
            .iter()
            .map(|f| (f["type"].as_str().unwrap(), f["id"].as_i64().unwrap()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("new_order", 2),
                ("new_order", 5),
                ("new_order", 8),
                ("ready", 9)
            ]
        );
    }
    for bad in [
        "?types=",
        "?types=new%20order",
        "?types=a,,b",
        "?snapshot=all",
        &format!("?types={}", "x".repeat(65)),
    ] {
        let status = connect_status(&server, &format!("/ws/pos/kitchen{bad}"), Some(&key)).await;
        assert_eq!(status, 400, "{bad}");
    }
}

/// The open orders' numbers in one snapshot, sorted.
async fn snapshot_numbers(server: &TestServer, key: &str) -> Vec<String> {
    let mut pos = Pos::join(server, "kitchen", key, "?snapshot=open").await;
    let mut numbers: Vec<String> = read_snapshot(&mut pos)
        .await
        .0
        .iter()
        .map(|f| f["data"]["orderNumber"].as_str().unwrap().to_owned())
        .collect();
    numbers.sort();
    numbers
}

#[tokio::test]
async fn the_documented_closed_statuses_and_index_decide_what_is_open() {
    let refund = "INSERT INTO orderpush.closed_statuses (status) VALUES ('refunded');";
    let reopen = "DELETE FROM orderpush.closed_statuses WHERE status = 'cancelled';";
    let index = "CREATE INDEX CONCURRENTLY IF NOT EXISTS orders_open_idx
    ON public.orders (tenant_slug, (coalesce(scheduled_for, created_at)));";
    for snippet in [refund, reopen, index] {
        assert!(DBA_MD.contains(snippet), "docs/dba.md lost:\n{snippet}");
    }
    let (db, server, key) = kitchen().await;
    let c = db.client().await;
    for (number, status) in [
        ("P-1", "pending"),
        ("R-1", "refunded"),
        ("C-1", "cancelled"),
    ] {
        order(&c, number, status, 1.0).await;
    }
    assert_eq!(snapshot_numbers(&server, &key).await, ["P-1", "R-1"]);
    c.batch_execute(refund).await.unwrap();
    c.batch_execute(reopen).await.unwrap();
    c.batch_execute(index).await.unwrap();
    assert_eq!(snapshot_numbers(&server, &key).await, ["C-1", "P-1"]);
}
