//! The application's own writes never fail, wait or deadlock because of orderpush, whatever the
//! schema drift, isolation level, tenant history or privileges (docs/architecture.md, "The write
//! path"); and what the sequencer does with what they stage: render, shorten, number, fail
//! visibly, follow a rewound log.

use std::time::Duration;

use serde_json::{Value, json};
use tokio_postgres::IsolationLevel;

use crate::common::*;

async fn online_order(tx: &tokio_postgres::Transaction<'_>, tenant: &str, number: &str) {
    tx.execute(
        "INSERT INTO orders (tenant_slug, order_number, customer_name, customer_phone, order_type,
                             order_source, status, total_amount)
         VALUES ($1, $2, 'Ann', '0770', 'delivery', 'online', 'confirmed', 10.00)",
        &[&tenant, &number],
    )
    .await
    .unwrap();
}

async fn kitchen() -> (TestDb, TestServer, Pos, String) {
    let OneTenant { db, key, server } = one_tenant("kitchen").await;
    let pos = Pos::connect(&server, "kitchen", &key, None).await;
    (db, server, pos, key)
}

#[tokio::test]
async fn renamed_and_dropped_columns_never_fail_a_write_and_become_null() {
    let (db, _server, mut pos, _key) = kitchen().await;
    let mut c = db.client().await;
    c.batch_execute(
        "ALTER TABLE orders RENAME customer_phone TO phone;
         ALTER TABLE orders DROP COLUMN special_instructions;
         ALTER TABLE orders ADD COLUMN loyalty_card text;",
    )
    .await
    .unwrap();
    for source in ["pos", "online"] {
        let tx = c.transaction().await.unwrap();
        tx.execute(
            "INSERT INTO orders (tenant_slug, order_number, order_type, order_source, status,
                                 total_amount, phone, loyalty_card)
             VALUES ('kitchen', $1, 'collection', $2, 'new', 5.00, '0770', 'LC-1')",
            &[&format!("{source}-1"), &source],
        )
        .await
        .unwrap();
        tx.commit().await.expect("the application's write commits");
    }
    let ev = pos.next().await;
    assert_eq!(ev["type"], "new_order");
    assert_eq!(
        ev["data"]["orderNumber"], "online-1",
        "only the online source emits"
    );
    assert_eq!(ev["data"]["customerPhone"], Value::Null, "renamed: null");
    assert_eq!(
        ev["data"]["specialInstructions"],
        Value::Null,
        "dropped: null"
    );
    assert!(
        ev["data"].get("loyaltyCard").is_none(),
        "new columns add no keys"
    );
}

#[tokio::test]
async fn concurrent_writers_of_one_tenant_commit_at_every_isolation_level() {
    let (db, _server, mut pos, _key) = kitchen().await;
    let mut expected = 0;
    for level in [
        IsolationLevel::ReadCommitted,
        IsolationLevel::RepeatableRead,
        IsolationLevel::Serializable,
    ] {
        let mut a = db.client().await;
        let mut b = db.client().await;
        let ta = a
            .build_transaction()
            .isolation_level(level)
            .start()
            .await
            .unwrap();
        let tb = b
            .build_transaction()
            .isolation_level(level)
            .start()
            .await
            .unwrap();
        // Both open, both write the same tenant, then both commit: with a per-tenant counter
        // row taken in the transaction, the second commit failed with 40001 under snapshot
        // isolation.
        online_order(&ta, "kitchen", &format!("{level:?}-a")).await;
        online_order(&tb, "kitchen", &format!("{level:?}-b")).await;
        ta.commit().await.expect("first commit");
        tb.commit()
            .await
            .expect("second commit: no serialization failure");
        expected += 2;
    }
    let mut ids = Vec::new();
    for _ in 0..expected {
        ids.push(pos.next().await["id"].as_i64().unwrap());
    }
    assert_eq!(ids, (1..=expected).collect::<Vec<_>>());
}

#[tokio::test]
async fn two_tenants_written_in_opposite_orders_never_deadlock() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    db.tenant("bistro").await;
    let _server = TestServer::builder(&db).start().await;
    let mut a = db.client().await;
    let mut b = db.client().await;
    let ta = a.transaction().await.unwrap();
    let tb = b.transaction().await.unwrap();
    online_order(&ta, "kitchen", "A-1").await;
    online_order(&tb, "bistro", "B-1").await;
    // Neither insert may wait on the other transaction.
    tokio::time::timeout(WAIT, online_order(&ta, "bistro", "A-2"))
        .await
        .expect("no wait on the other tenant");
    tokio::time::timeout(WAIT, online_order(&tb, "kitchen", "B-2"))
        .await
        .expect("no wait on the other tenant");
    let (ra, rb) = tokio::join!(ta.commit(), tb.commit());
    ra.expect("no deadlock");
    rb.expect("no deadlock");
    db.wait_numbered().await;
    assert_eq!(db.event_count().await, 4);
}

#[tokio::test]
async fn a_recreated_tenant_writes_at_once_and_never_sees_the_old_restaurants_events() {
    let OneTenant {
        db,
        key: old_key,
        server,
    } = one_tenant("kitchen").await;
    let mut old_pos = Pos::connect(&server, "kitchen", &old_key, None).await;
    let mut c = db.client().await;
    for i in 1..=3 {
        insert_order(&mut c, "kitchen", &format!("OLD-{i}"), 1).await;
    }
    for _ in 1..=3 {
        old_pos.next().await;
    }
    // The restaurant leaves; a new one takes the slug within the retention window.
    c.batch_execute(
        "DELETE FROM order_items; DELETE FROM orders; DELETE FROM tenants WHERE slug = 'kitchen';
         INSERT INTO tenants (slug, name) VALUES ('kitchen', 'New Kitchen');",
    )
    .await
    .unwrap();
    let new_key = db.key("kitchen").await;
    // Before the new restaurant has any event: nothing of the old one, from memory or the log.
    for since in [Some(0), Some(1), None] {
        let mut pos = Pos::connect(&server, "kitchen", &new_key, since).await;
        if let Some(ev) = pos.next_within(Duration::from_millis(500)).await {
            assert_eq!(ev["type"], "resync_required", "since {since:?}: {ev}");
            assert!(ev["data"].to_string().find("OLD-").is_none());
        }
    }
    // Its first write succeeds (no duplicate key on the log), and its ids start over. A socket
    // joined before it sees it live once this instance has followed the restart of the log (the
    // marker before it): only then does the resume below start from the new log alone (a resume
    // racing that step is told `log_rewound` and gets the order again, as docs/protocol.md allows).
    let mut live = Pos::connect(&server, "kitchen", &new_key, None).await;
    insert_order(&mut c, "kitchen", "NEW-1", 1).await;
    loop {
        let ev = live.next().await;
        assert!(ev["data"].to_string().find("OLD-").is_none(), "{ev}");
        if ev["data"]["orderNumber"] == "NEW-1" {
            break;
        }
        assert_eq!(ev["type"], "resync_required", "{ev}");
    }
    let mut fresh = Pos::connect(&server, "kitchen", &new_key, Some(0)).await;
    let ev = fresh.next().await;
    assert_eq!(ev["data"]["orderNumber"], "NEW-1", "{ev}");
    assert_eq!(ev["id"], 1);
    assert!(
        fresh
            .next_within(Duration::from_millis(300))
            .await
            .is_none(),
        "and nothing else"
    );
    let old_left: i64 = c
        .query_one(
            "SELECT count(*) FROM orderpush.events WHERE data::text LIKE '%OLD-%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(old_left, 0, "the old restaurant's events are deleted");
}

#[tokio::test]
async fn an_app_role_with_rights_on_its_tables_only_takes_orders_and_cannot_touch_orderpush() {
    let (db, _server, mut pos, _key) = kitchen().await;
    let (role, mut app) = app_role(&db, &["**The application's role**"]).await;
    insert_order(&mut app, "kitchen", "APP-1", 2).await;
    app.execute(
        "UPDATE orders SET status = 'preparing' WHERE order_number = 'APP-1'",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(pos.next().await["data"]["orderNumber"], "APP-1");
    assert_eq!(pos.next().await["type"], "order_updated");
    for forge in [
        "INSERT INTO orderpush.staged (kind, row) VALUES ('broadcast', '{}')",
        "UPDATE orderpush.heads SET seq = 0",
        "SELECT key_hash FROM orderpush.api_keys",
        "INSERT INTO orderpush.events (tenant_slug, id, type, ts, data, origin) VALUES ('kitchen', 99, 'x', 'x', '{}', 'db')",
    ] {
        let err = app
            .batch_execute(forge)
            .await
            .expect_err("the app's role may not");
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{forge}: {err}"
        );
    }
    drop(app);
    drop_app_role(&db, &role).await;
}

#[tokio::test]
async fn a_write_that_cannot_become_an_event_is_counted_listed_and_resyncs_its_tenant() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let key = db.key("kitchen").await;
    // The service runs as a role of its own with exactly the GRANTs docs/dba.md gives.
    let role = format!("svc_{}", db.name);
    let mut c = db.client().await;
    c.batch_execute(&format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN;"
    ))
    .await
    .unwrap();
    c.batch_execute(&documented_sql(
        "**The service's role**",
        &[("orderpush_service", &role)],
    ))
    .await
    .unwrap();
    let server = TestServer::builder(&db)
        .user(&role)
        .migrate(false)
        .start()
        .await;
    let mut pos = Pos::connect(&server, "kitchen", &key, None).await;
    insert_order(&mut c, "kitchen", "KIT-1", 2).await;
    let ev = pos.next().await;
    assert_eq!(
        ev["type"], "new_order",
        "the documented GRANTs suffice: {ev}"
    );
    assert_eq!(ev["data"]["items"].as_array().unwrap().len(), 2);
    let (status, _) = server
        .broadcast(&json!({"tenant": "kitchen", "event": {"type": "promo", "data": {}}}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(pos.next().await["type"], "promo");

    // A GRANT the DBA forgot: an order still saves, but its items cannot be read when it is
    // numbered.
    c.batch_execute(&format!("REVOKE SELECT ON public.order_items FROM {role}"))
        .await
        .unwrap();
    let tx = c.transaction().await.unwrap();
    online_order(&tx, "kitchen", "KIT-2").await;
    tx.commit().await.expect("the write commits");
    let ev = pos.next().await;
    assert_eq!(ev["type"], "resync_required", "{ev}");
    assert_eq!(ev["data"]["reason"], "emit_failed");
    assert_eq!(ev["id"], 3, "it takes the event's place in the ids");
    let row = c
        .query_one(
            "SELECT source_table, kind, tenant, reason FROM orderpush.emit_errors",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "orders");
    assert_eq!(row.get::<_, &str>(1), "new_order");
    assert_eq!(row.get::<_, &str>(2), "kitchen");
    assert!(
        row.get::<_, &str>(3).contains("order_items"),
        "{}",
        row.get::<_, &str>(3)
    );
    assert_eq!(metric(&server, "orderpush_emit_errors_total").await, 1.0);
    // Other events keep flowing.
    insert_loyalty(&c, "kitchen", 5).await;
    assert_eq!(pos.next().await["type"], "loyalty_updated");
    server.stop().await;
    c.batch_execute(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}';
         DROP OWNED BY {role}; DROP ROLE {role};"
    ))
    .await
    .unwrap();
}

#[tokio::test]
async fn an_order_note_over_the_frame_limit_arrives_shortened_with_every_key() {
    let (db, _server, mut pos, _key) = kitchen().await;
    let c = db.client().await;
    let note = "n".repeat(3 << 20);
    c.execute(
        "INSERT INTO orders (tenant_slug, order_number, order_type, order_source, status,
                             total_amount, special_instructions)
         VALUES ('kitchen', 'BIG-1', 'delivery', 'online', 'new', 1.00, $1)",
        &[&note],
    )
    .await
    .unwrap();
    let raw = pos.next_raw_within(WAIT).await.expect("the event arrives");
    assert!(
        raw.len() <= orderpush::event::MAX_FRAME_BYTES,
        "{}",
        raw.len()
    );
    let ev: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(ev["truncated"], true);
    assert_eq!(ev["data"]["orderNumber"], "BIG-1");
    for key in [
        "customerName",
        "items",
        "scheduledFor",
        "createdAt",
        "totalAmount",
    ] {
        assert!(ev["data"].get(key).is_some(), "{key} kept");
    }
    let kept = ev["data"]["specialInstructions"].as_str().unwrap().len();
    assert!(kept > 900_000 && kept < note.len(), "{kept}");
    // Every replay sends the same bytes: it was shortened once, where it is stored.
    let key = db.key("kitchen").await;
    let mut again = Pos::connect(&_server, "kitchen", &key, Some(0)).await;
    assert_eq!(again.next_raw_within(WAIT).await.unwrap(), raw);
}

#[tokio::test]
async fn a_retried_broadcast_with_an_idempotency_key_is_delivered_once_on_any_instance() {
    let (db, first, mut pos, _key) = kitchen().await;
    let second = TestServer::builder(&db).start().await;
    let body = json!({"tenant": "kitchen", "event": {"type": "promo", "data": {"n": 1}}});
    let post = |server: &TestServer, key: &'static str, body: &Value| {
        let request = reqwest::Client::new()
            .post(server.http("/broadcast"))
            .header("Idempotency-Key", key)
            .json(body);
        async move {
            let r = request.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, a) = post(&first, "req-1", &body).await;
    assert_eq!(status, 200, "{a}");
    let (status, b) = post(&second, "req-1", &body).await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(a["id"], b["id"], "the retry gets the first answer");
    let other = json!({"tenant": "kitchen", "event": {"type": "promo", "data": {"n": 2}}});
    let (status, c) = post(&first, "req-1", &other).await;
    assert_eq!(status, 422, "{c}");
    let (status, d) = post(&first, "bad key with spaces", &body).await;
    assert_eq!(status, 400, "{d}");
    assert_eq!(pos.next().await["id"], a["id"]);
    assert!(
        pos.next_within(Duration::from_millis(500)).await.is_none(),
        "delivered once"
    );
    db.wait_numbered().await;
    assert_eq!(db.event_count().await, 1);
}

#[tokio::test]
async fn readyz_turns_503_while_no_sequencer_numbers_and_a_standby_takes_over() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let key = db.key("kitchen").await;
    // Another session holds the election lock: no instance can become the sequencer.
    let blocker = db.client().await;
    blocker
        .execute("SELECT pg_advisory_lock(28528, 2)", &[])
        .await
        .unwrap();
    let server = TestServer::builder(&db).start().await;
    let mut pos = Pos::connect(&server, "kitchen", &key, None).await;
    insert_loyalty(&db.client().await, "kitchen", 1).await;
    eventually(
        "readyz reports the stalled sequencer",
        Duration::from_secs(30),
        || async { readyz(&server).await == 503 },
    )
    .await;
    assert!(pos.next_within(Duration::from_millis(100)).await.is_none());
    // The lock is freed (the old sequencer died): a standby takes over and numbers the row.
    drop(blocker);
    let ev = pos.next().await;
    assert_eq!(
        (ev["type"].as_str(), ev["id"].as_i64()),
        (Some("loyalty_updated"), Some(1))
    );
    eventually("readyz recovers", WAIT, || async {
        readyz(&server).await == 200
    })
    .await;
    assert_eq!(metric(&server, "orderpush_sequencer_leader").await, 1.0);
}

#[tokio::test]
async fn a_rewound_log_tells_connected_pos_to_resync_and_they_adopt_the_lower_id() {
    let (db, server, mut pos, key) = kitchen().await;
    let c = db.client().await;
    for i in 1..=3 {
        insert_loyalty(&c, "kitchen", i).await;
    }
    for _ in 1..=3 {
        pos.next().await;
    }
    // A backup taken now ...
    c.batch_execute(
        "CREATE TABLE backup_events AS SELECT * FROM orderpush.events;
         CREATE TABLE backup_heads AS SELECT * FROM orderpush.heads;
         CREATE TABLE backup_log_state AS SELECT * FROM orderpush.log_state;",
    )
    .await
    .unwrap();
    for i in 4..=6 {
        insert_loyalty(&c, "kitchen", i).await;
    }
    for want in 4..=6 {
        assert_eq!(pos.next().await["id"], want);
    }
    // ... is restored: the database goes back to id 3 while the service runs. Every session
    // ends, as it would when a database is restored or fails over.
    c.batch_execute(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = '{}' AND pid <> pg_backend_pid();
         BEGIN;
         DELETE FROM orderpush.events; INSERT INTO orderpush.events SELECT * FROM backup_events;
         DELETE FROM orderpush.heads; INSERT INTO orderpush.heads SELECT * FROM backup_heads;
         DELETE FROM orderpush.log_state; INSERT INTO orderpush.log_state SELECT * FROM backup_log_state;
         COMMIT;",
        db.name
    ))
    .await
    .unwrap();
    let ev = pos.next().await;
    assert_eq!(ev["type"], "resync_required", "{ev}");
    assert_eq!(ev["data"]["reason"], "log_rewound");
    assert_eq!(ev["id"], 3, "the lower id to adopt");
    insert_loyalty(&c, "kitchen", 7).await;
    let ev = pos.next().await;
    assert_eq!(
        (ev["id"].as_i64(), &ev["data"]["pointsChange"]),
        (Some(4), &json!(7))
    );
    // A POS that connects with an id the restored log never had is told the same.
    let mut ahead = Pos::connect(&server, "kitchen", &key, Some(6)).await;
    let ev = ahead.next().await;
    assert_eq!(ev["data"]["reason"], "log_rewound");
    assert_eq!(ev["id"], 4);
}

#[tokio::test]
async fn an_undecodable_row_becomes_bad_event_and_the_server_keeps_serving() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let key = db.key("kitchen").await;
    let c = db.client().await;
    insert_loyalty(&c, "kitchen", 1).await;
    number_staged(&db).await;
    // A row of the log that cannot be a time: it used to panic the listener, and every
    // restart (the preload reads it) crash-looped.
    c.batch_execute("UPDATE orderpush.events SET emitted_at = 'infinity' WHERE id = 1")
        .await
        .unwrap();
    let server = TestServer::builder(&db).start().await;
    let mut resumed = Pos::connect(&server, "kitchen", &key, Some(0)).await;
    let ev = resumed.next().await;
    assert_eq!(ev["type"], "resync_required", "{ev}");
    assert_eq!(ev["data"]["reason"], "bad_event");
    assert_eq!(ev["id"], 1, "in the row's place");
    insert_loyalty(&c, "kitchen", 2).await;
    assert_eq!(resumed.next().await["id"], 2, "then live");
}

#[tokio::test]
async fn vacuum_never_truncates_the_staging_table_so_the_apps_writes_never_wait_for_it() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let c = db.client().await;
    // 2,000 staged writes, then taken the way the sequencer takes them: the table's tail pages
    // are empty, which is what VACUUM would hand back to the operating system.
    c.execute(
        "INSERT INTO orders (tenant_slug, order_number, customer_name, customer_phone, order_type,
                             order_source, status, total_amount)
         SELECT 'kitchen', 'bulk-' || g, 'Ann', '0770', 'delivery', 'online', 'new', 10.00
         FROM generate_series(1, 2000) AS g",
        &[],
    )
    .await
    .unwrap();
    c.execute("DELETE FROM orderpush.staged", &[])
        .await
        .unwrap();
    let size = async || -> i64 {
        c.query_one("SELECT pg_relation_size('orderpush.staged')", &[])
            .await
            .unwrap()
            .get(0)
    };
    let before = size().await;
    assert!(before > 0, "the staged rows took space");
    c.batch_execute("VACUUM orderpush.staged").await.unwrap();
    assert_eq!(
        size().await,
        before,
        "VACUUM truncated the staging table: it took the ACCESS EXCLUSIVE lock that the \
         application's INSERTs (through the trigger) wait behind"
    );
}
