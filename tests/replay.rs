//! Resumes from the event log at volume (docs/protocol.md, *Resume*): a `since` the log no
//! longer covers gets `resync_required` at once, whatever the volume retained, and a replay
//! longer than a socket may perform is refused with `replay_too_long`; either way the POS
//! continues live from the tenant's latest id.

use std::time::Duration;

use serde_json::json;

use crate::common::*;

/// Events of the tenant in the pruned-range test: more than two replay pages (500 rows), the
/// volume at which a resume into a pruned range used to re-read one page forever.
const RETAINED_AT_VOLUME: i64 = 1_200;
/// Events aged past the retention and pruned in that test (ids 1..=PRUNED).
const PRUNED: i64 = 10;
/// Sockets resuming into the pruned range at once: more than the request pool's 16
/// connections, which a wedged replay each used to hold.
const WEDGE_ATTEMPTS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_since_in_the_pruned_range_gets_resync_required_at_once_whatever_the_volume() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let key = db.key("kitchen").await;
    let client = db.client().await;
    bulk_loyalty(&client, "kitchen", RETAINED_AT_VOLUME as i32, 16).await;
    number_staged(&db).await;
    client
        .execute(
            "UPDATE orderpush.events SET emitted_at = now() - interval '2 days' WHERE id <= $1",
            &[&PRUNED],
        )
        .await
        .unwrap();
    let deleted = orderpush::db::events::prune(&client, Duration::from_secs(86_400))
        .await
        .unwrap();
    assert_eq!(deleted, PRUNED as u64);
    // Many sockets of one key at once: the per-key connection cap is not what is tested here.
    let server = TestServer::builder(&db)
        .tuning(|t| t.max_connections_per_key = 64)
        .start()
        .await;

    // `since=0` and a `since` inside the pruned range: told at once, nothing replayed.
    for since in [0, PRUNED / 2, PRUNED - 1] {
        let mut pos = Pos::connect(&server, "kitchen", &key, Some(since)).await;
        let first = pos.next().await;
        assert_eq!(first["type"], "resync_required", "since={since}");
        assert_eq!(
            first["data"],
            json!({"reason": "retention", "since": since, "latestId": RETAINED_AT_VOLUME})
        );
        assert_eq!(first["id"], RETAINED_AT_VOLUME, "the resume point");
        assert!(
            pos.next_within(Duration::from_millis(200)).await.is_none(),
            "nothing replayed after the resync"
        );
    }

    // More such sockets at once than the pool has connections: none of them holds one.
    let mut wedged = Vec::new();
    for _ in 0..WEDGE_ATTEMPTS {
        wedged.push(Pos::connect(&server, "kitchen", &key, Some(0)).await);
    }
    for pos in &mut wedged {
        assert_eq!(pos.next().await["data"]["reason"], "retention");
    }
    let (status, body) = server
        .broadcast(&json!({"tenant": "kitchen", "event": {"type": "after", "data": 1}}))
        .await;
    assert_eq!(status, 200, "{body}");
    for pos in &mut wedged {
        let live = pos.next().await;
        assert_eq!(
            (live["type"].as_str(), live["id"].as_i64()),
            (Some("after"), Some(RETAINED_AT_VOLUME + 1)),
            "live from the latest id"
        );
    }

    // `since` = the last pruned id leaves no gap: a full replay of what is retained.
    let mut exact = Pos::connect(&server, "kitchen", &key, Some(PRUNED)).await;
    for want in PRUNED + 1..=RETAINED_AT_VOLUME + 1 {
        assert_eq!(exact.next().await["id"], want);
    }
    assert_eq!(
        metric(&server, "orderpush_resyncs_total{reason=\"retention\"}").await,
        (3 + WEDGE_ATTEMPTS) as f64
    );
}

/// The replay limit in the test below (production: `config::MAX_REPLAY_ROWS`, 100,000).
const SHORT_REPLAY_LIMIT: i64 = 100;

#[tokio::test]
async fn a_replay_longer_than_the_limit_gets_replay_too_long_then_continues_live() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let key = db.key("kitchen").await;
    let client = db.client().await;
    let total = SHORT_REPLAY_LIMIT + 50;
    bulk_loyalty(&client, "kitchen", total as i32, 16).await;
    number_staged(&db).await;
    let server = TestServer::builder(&db)
        .tuning(|t| t.max_replay_rows = SHORT_REPLAY_LIMIT)
        .start()
        .await;

    // One event more than the limit: refused.
    let since = total - SHORT_REPLAY_LIMIT - 1;
    let mut far = Pos::connect(&server, "kitchen", &key, Some(since)).await;
    let first = far.next().await;
    assert_eq!(
        (first["type"].as_str(), first["id"].as_i64()),
        (Some("resync_required"), Some(total))
    );
    assert_eq!(
        first["data"],
        json!({"reason": "replay_too_long", "since": since, "latestId": total})
    );
    // Exactly the limit: replayed.
    let mut near = Pos::connect(&server, "kitchen", &key, Some(since + 1)).await;
    for want in since + 2..=total {
        assert_eq!(near.next().await["id"], want);
    }
    // Both continue live.
    insert_loyalty(&client, "kitchen", 1).await;
    assert_eq!(far.next().await["id"], total + 1);
    assert_eq!(near.next().await["id"], total + 1);
    assert!(
        far.next_within(Duration::from_millis(200)).await.is_none(),
        "nothing twice"
    );
    assert_eq!(
        metric(
            &server,
            "orderpush_resyncs_total{reason=\"replay_too_long\"}"
        )
        .await,
        1.0
    );
}
