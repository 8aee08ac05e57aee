//! Presence across instances (docs/operations.md, "Presence"): every instance sees every
//! terminal, dead instances expire, lost rows come back, and the undelivered alert is counted
//! once for the cluster.

use crate::common::*;

async fn instance_id(server: &TestServer) -> String {
    let (_, body) = get_json(server, "/admin/tenants", None).await;
    body["this_instance"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn every_instance_sees_every_terminal() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let key = db.key("kitchen").await;
    let a = TestServer::builder(&db).tuning(fast_presence).start().await;
    let b = TestServer::builder(&db).tuning(fast_presence).start().await;
    let _pos = Pos::connect(&a, "kitchen", &key, None).await;
    let a_id = instance_id(&a).await;
    let body = eventually_some("B sees the terminal connected to A", async || {
        let (_, body) = get_json(&b, "/admin/tenants/kitchen", None).await;
        (body["connections"].as_array()?.len() == 1).then_some(body)
    })
    .await;
    assert_eq!(body["connections"][0]["instance"], a_id.as_str());
    let (_, list) = get_json(&b, "/admin/tenants", None).await;
    assert_eq!(list["instances"].as_array().unwrap().len(), 2, "{list}");
    let kitchen = &list["tenants"][0];
    assert_eq!(
        (kitchen["tenant"].as_str(), kitchen["connections"].as_i64()),
        (Some("kitchen"), Some(1))
    );

    // A clean shutdown removes A at once (not after the expiry).
    a.stop().await;
    eventually_some("A is gone from B's view", async || {
        let (_, list) = get_json(&b, "/admin/tenants", None).await;
        (list["instances"].as_array()?.len() == 1).then_some(())
    })
    .await;
    let (_, body) = get_json(&b, "/admin/tenants/kitchen", None).await;
    assert!(body["connections"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn rows_of_a_dead_instance_are_ignored_and_expire() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let c = db.client().await;
    // An instance that died an hour ago without cleaning up, with a terminal of kitchen.
    c.batch_execute(
        "INSERT INTO orderpush.instances (id, hostname, pid, listen, version, started_at, heartbeat_at)
         VALUES ('dead00000000', 'gone', 1, '10.0.0.1:9011', '0.0.0', now() - interval '2 hours',
                 now() - interval '1 hour');
         INSERT INTO orderpush.connections (instance_id, conn_id, tenant_slug, key_id, peer, connected_at)
         VALUES ('dead00000000', 1, 'kitchen', 'whatever', '10.0.0.2:5000', now() - interval '2 hours');",
    )
    .await
    .unwrap();
    let server = TestServer::builder(&db).tuning(fast_presence).start().await;
    let (_, body) = get_json(&server, "/admin/tenants/kitchen", None).await;
    assert!(
        body["connections"].as_array().unwrap().is_empty(),
        "a stale instance's terminal is not shown: {body}"
    );
    eventually_some("the dead instance's rows are deleted", async || {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM orderpush.instances WHERE id = 'dead00000000'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let orphans: i64 = c
            .query_one(
                "SELECT count(*) FROM orderpush.connections WHERE instance_id = 'dead00000000'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n == 0 && orphans == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_instance_whose_rows_vanished_registers_again() {
    let OneTenant { db, key, server } =
        one_tenant_with("kitchen", |s| s.tuning(fast_presence)).await;
    let _pos = Pos::connect(&server, "kitchen", &key, None).await;
    let shown = async || {
        let (_, body) = get_json(&server, "/admin/tenants/kitchen", None).await;
        (body["connections"].as_array()?.len() == 1).then_some(())
    };
    eventually_some("the terminal is shown", shown).await;
    // What a failover (unlogged tables come back empty) or an over-eager expiry does.
    db.client()
        .await
        .batch_execute("DELETE FROM orderpush.instances")
        .await
        .unwrap();
    eventually_some("the terminal is shown again", shown).await;
}

#[tokio::test]
async fn an_undelivered_order_is_counted_once_for_the_cluster() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    db.tenant("bistro").await;
    db.tenant("fence").await;
    let key = db.key("kitchen").await;
    let a = TestServer::builder(&db).tuning(fast_presence).start().await;
    let b = TestServer::builder(&db).tuning(fast_presence).start().await;
    for s in [&a, &b] {
        eventually_some("both instances see two instances", async || {
            (metric_opt(s, "orderpush_instances").await? == 2.0).then_some(())
        })
        .await;
    }
    // A loyalty event after each order is a fence: each listener handles events one at a time,
    // so once an instance has read the fence, it has finished with the order before it.
    let fence = async |n: f64| {
        insert_loyalty(&db.client().await, "fence", 1).await;
        for s in [&a, &b] {
            eventually_some("the fence is read by this instance", async || {
                let name = "orderpush_events_total{origin=\"db\",type=\"loyalty_updated\"}";
                (metric_opt(s, name).await? >= n).then_some(())
            })
            .await;
        }
    };
    let undelivered = async || {
        let mut total = 0.0;
        for s in [&a, &b] {
            total += metric_opt(s, "orderpush_undelivered_events_total{type=\"new_order\"}")
                .await
                .unwrap();
        }
        total
    };

    // No terminal anywhere: one instance reports it.
    let mut client = db.client().await;
    insert_order(&mut client, "bistro", "BIS-1", 1).await;
    fence(1.0).await;
    assert_eq!(
        undelivered().await,
        1.0,
        "counted once, not once per instance"
    );
    for s in [&a, &b] {
        // bistro, and the fence's tenant (no terminal either).
        assert_eq!(
            metric_opt(s, "orderpush_tenants_undelivered").await,
            Some(2.0)
        );
    }

    // A terminal on A only: B must not call kitchen's order undelivered.
    let mut pos = Pos::connect(&a, "kitchen", &key, None).await;
    eventually_some("B sees the terminal on A", async || {
        let (_, body) = get_json(&b, "/admin/tenants/kitchen", None).await;
        (body["connections"].as_array()?.len() == 1).then_some(())
    })
    .await;
    // B refreshes its own view on its next heartbeat.
    tokio::time::sleep(FAST_PRESENCE * 5).await;
    insert_order(&mut client, "kitchen", "KIT-1", 1).await;
    assert_eq!(pos.next().await["data"]["orderNumber"], "KIT-1");
    fence(2.0).await;
    assert_eq!(
        undelivered().await,
        1.0,
        "a terminal elsewhere counts as delivered"
    );
}

#[tokio::test]
async fn a_heartbeat_writes_each_statistic_to_its_own_column() {
    use orderpush::db::presence::{Instance, InstanceStats, heartbeat};
    use std::time::{Duration, SystemTime};

    let db = TestDb::create().await;
    let client = db.client().await;
    let instance = Instance {
        id: "i1",
        hostname: "host",
        pid: 7,
        listen: "127.0.0.1:9011",
        version: "v",
        started_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    };
    let read = async || {
        let r = client
            .query_one(
                "SELECT pid, listener_up, listener_mode, listener_read_age_ms, listener_lag_ms,
                        events_per_second, extract(epoch FROM started_at)::float8
                 FROM orderpush.instances WHERE id = 'i1'",
                &[],
            )
            .await
            .unwrap();
        (
            r.get::<_, i32>(0),
            r.get::<_, bool>(1),
            r.get::<_, Option<String>>(2),
            r.get::<_, Option<i64>>(3),
            r.get::<_, Option<f64>>(4),
            r.get::<_, f64>(5),
            r.get::<_, f64>(6),
        )
    };
    // Distinct values in every column, so a statistic bound to its neighbour's column shows.
    let first = InstanceStats {
        listener_up: true,
        listener_mode: Some("poll".into()),
        listener_read_age_ms: Some(11),
        listener_lag_ms: Some(22.5),
        events_per_second: 33.25,
    };
    assert!(
        heartbeat(&client, &instance, &first).await.unwrap(),
        "inserted"
    );
    assert_eq!(
        read().await,
        (
            7,
            true,
            Some("poll".into()),
            Some(11),
            Some(22.5),
            33.25,
            1_700_000_000.0
        )
    );
    let second = InstanceStats {
        listener_up: false,
        listener_mode: None,
        listener_read_age_ms: Some(44),
        listener_lag_ms: Some(55.5),
        events_per_second: 66.75,
    };
    assert!(
        !heartbeat(&client, &instance, &second).await.unwrap(),
        "updated"
    );
    assert_eq!(
        read().await,
        (7, false, None, Some(44), Some(55.5), 66.75, 1_700_000_000.0)
    );
}
