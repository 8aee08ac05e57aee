//! Resuming with `?since=` (docs/protocol.md, "Resume after a disconnect"): replay in order, then
//! live, nothing twice; retention on its own schedule, and `resync_required` once history is gone.

use std::time::Duration;

use crate::common::*;

#[tokio::test]
async fn since_replays_then_continues_live_without_gap_or_repeat() {
    let OneTenant { db, key, server } = one_tenant("kitchen").await;
    let client = db.client().await;
    for i in 1..=5 {
        insert_loyalty(&client, "kitchen", i).await;
    }
    db.wait_numbered().await;
    // Let the listener pass these events before the POS connects, so they must come from replay.
    let mut probe = Pos::connect(&server, "kitchen", &key, Some(4)).await;
    assert_eq!(probe.next().await["id"], 5);
    drop(probe);

    let mut pos = Pos::connect(&server, "kitchen", &key, Some(2)).await;
    // Writes racing the replay: each must arrive exactly once, in order.
    let writer = {
        let db_client = db.client().await;
        tokio::spawn(async move {
            for i in 6..=30 {
                insert_loyalty(&db_client, "kitchen", i).await;
            }
        })
    };
    for want in 3..=30 {
        let ev = pos.next().await;
        assert_eq!(ev["id"], want);
        assert_eq!(ev["data"]["pointsChange"], want);
    }
    writer.await.unwrap();
    assert!(
        pos.next_within(Duration::from_millis(300)).await.is_none(),
        "nothing twice"
    );
}

#[tokio::test]
async fn recent_resumes_come_from_memory_older_ones_from_the_log() {
    let OneTenant { db, key, server } = one_tenant("kitchen").await;
    let mut live = Pos::connect(&server, "kitchen", &key, None).await;
    let client = db.client().await;
    let total = orderpush::hub::RECENT_FRAMES as i64 + 30;
    for i in 1..=total {
        insert_loyalty(&client, "kitchen", i as i32).await;
    }
    for want in 1..=total {
        assert_eq!(live.next().await["id"], want);
    }
    // Within the hub's history: memory.
    let mut recent = Pos::connect(&server, "kitchen", &key, Some(total - 3)).await;
    for want in total - 2..=total {
        assert_eq!(recent.next().await["id"], want);
    }
    assert_eq!(
        metric(&server, "orderpush_resumes_from_memory_total").await,
        1.0
    );
    // Older than the history: the event log, with the same frames.
    let mut old = Pos::connect(&server, "kitchen", &key, Some(5)).await;
    for want in 6..=total {
        assert_eq!(old.next().await["id"], want);
    }
    assert_eq!(
        metric(&server, "orderpush_resumes_from_database_total").await,
        1.0
    );
    insert_loyalty(&client, "kitchen", 0).await;
    assert_eq!(old.next().await["id"], total + 1, "then live");
    assert_eq!(recent.next().await["id"], total + 1);
}

#[tokio::test]
async fn a_restarted_server_serves_resumes_from_preloaded_history() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let key = db.key("kitchen").await;
    let client = db.client().await;
    for i in 1..=5 {
        insert_loyalty(&client, "kitchen", i).await;
    }
    number_staged(&db).await;
    let server = TestServer::builder(&db).start().await;
    let mut pos = Pos::connect(&server, "kitchen", &key, Some(2)).await;
    for want in 3..=5 {
        assert_eq!(pos.next().await["id"], want);
    }
    assert_eq!(
        metric(&server, "orderpush_resumes_from_memory_total").await,
        1.0
    );
    assert_eq!(
        metric(&server, "orderpush_resumes_from_database_total").await,
        0.0
    );
}

#[tokio::test]
async fn since_older_than_retention_gets_resync_required_first() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let key = db.key("kitchen").await;
    let client = db.client().await;
    for i in 1..=3 {
        insert_loyalty(&client, "kitchen", i).await;
    }
    number_staged(&db).await;
    // Age the first two events past the retention and prune them.
    client
        .execute(
            "UPDATE orderpush.events SET emitted_at = now() - interval '2 days' WHERE id <= 2",
            &[],
        )
        .await
        .unwrap();
    let deleted = orderpush::db::events::prune(&client, Duration::from_secs(86_400))
        .await
        .unwrap();
    assert_eq!(deleted, 2);
    let server = TestServer::builder(&db).start().await;

    // since=1 needs id 2, which is gone.
    let mut pos = Pos::connect(&server, "kitchen", &key, Some(1)).await;
    let first = pos.next().await;
    assert_eq!(first["type"], "resync_required");
    assert_eq!(first["id"], 3, "resume point after refetching");
    insert_loyalty(&client, "kitchen", 4).await;
    assert_eq!(pos.next().await["id"], 4);

    // since=2 still works: id 3 is retained.
    let mut ok = Pos::connect(&server, "kitchen", &key, Some(2)).await;
    assert_eq!(ok.next().await["id"], 3);
    assert_eq!(ok.next().await["id"], 4);

    // since ahead of the log (e.g. a restored database): resync too.
    let mut ahead = Pos::connect(&server, "kitchen", &key, Some(99)).await;
    let ev = ahead.next().await;
    assert_eq!(ev["type"], "resync_required");
    assert_eq!(ev["id"], 4);
}

#[tokio::test]
async fn prune_deletes_only_a_prefix_per_tenant() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let client = db.client().await;
    for i in 1..=4 {
        insert_loyalty(&client, "kitchen", i).await;
    }
    number_staged(&db).await;
    // Id 3 looks old but id 2 does not (commit order and timestamps can disagree): deleting
    // only id 3 would punch a hole, so everything up to 3 goes.
    client
        .execute(
            "UPDATE orderpush.events SET emitted_at = now() - interval '2 days' WHERE id IN (1, 3)",
            &[],
        )
        .await
        .unwrap();
    let deleted = orderpush::db::events::prune(&client, Duration::from_secs(86_400))
        .await
        .unwrap();
    assert_eq!(deleted, 3);
    let left: Vec<i64> = client
        .query("SELECT id FROM orderpush.events ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, vec![4]);
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
    // Numbered after their commit: age them once they are all in the log.
    db.wait_numbered().await;
    client
        .execute(
            "UPDATE orderpush.events SET emitted_at = now() - interval '2 days' WHERE id <= 15",
            &[],
        )
        .await
        .unwrap();
    // Nobody calls prune: the server's schedule does. (The counter moves once the prune's
    // statement has committed, a moment after the rows are gone.)
    eventually(
        "the scheduled retention prunes the old events and counts them",
        WAIT,
        || async {
            db.event_count().await == 5
                && metric(&server, "orderpush_pruned_events_total").await >= 15.0
        },
    )
    .await;
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
