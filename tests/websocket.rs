//! Contract §5: who may connect, tenant isolation, shutdown (revocation: `security.rs`).

use std::time::Duration;

use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn keys_are_checked_before_the_upgrade() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    db.tenant("bistro").await;
    let key = db.key("kitchen").await;
    let other = db.key("bistro").await;
    let revoked_id = {
        let c = db.client().await;
        orderpush::db::keys::create(&c, "kitchen", None)
            .await
            .unwrap()
    };
    orderpush::db::keys::revoke(&db.client().await, &revoked_id.id)
        .await
        .unwrap();
    let server = TestServer::builder(&db).start().await;

    assert_eq!(connect_status(&server, "/ws/pos/kitchen", None).await, 401);
    assert_eq!(
        connect_status(&server, "/ws/pos/kitchen", Some("pos_nope")).await,
        401
    );
    let unknown = format!("pos_{}", "0".repeat(64));
    assert_eq!(
        connect_status(&server, "/ws/pos/kitchen", Some(&unknown)).await,
        401
    );
    assert_eq!(
        connect_status(&server, "/ws/pos/kitchen", Some(&revoked_id.secret)).await,
        401
    );
    assert_eq!(
        connect_status(&server, "/ws/pos/kitchen", Some(&other)).await,
        403
    );
    assert_eq!(
        connect_status(&server, "/ws/pos/kitchen?since=abc", Some(&key)).await,
        400
    );
    assert_eq!(
        connect_status(&server, "/ws/pos/kitchen?since=-1", Some(&key)).await,
        400
    );
    assert_eq!(
        connect_status(&server, "/ws/pos/kitchen", Some(&key)).await,
        101
    );
}

#[tokio::test]
async fn path_tricks_never_reach_another_tenant() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    db.tenant("bistro").await;
    let key = db.key("kitchen").await;
    let server = TestServer::builder(&db).start().await;
    for path in [
        "/ws/pos/bistro",
        "/ws/pos/kitchen%2F..%2Fbistro",
        "/ws/pos/KITCHEN",
        "/ws/pos/Kitchen",
        "/ws/pos/bistro?since=0",
    ] {
        assert_eq!(
            connect_status(&server, path, Some(&key)).await,
            403,
            "{path}"
        );
    }
}

#[tokio::test]
async fn a_tenant_never_sees_another_tenants_events() {
    let db = TestDb::create().await;
    let (_server, mut kitchen, mut bistro) = kitchen_and_bistro(&db).await;
    let client = db.client().await;
    insert_loyalty(&client, "bistro", 7).await;
    insert_loyalty(&client, "kitchen", 3).await;
    let k = kitchen.next().await;
    assert_eq!(
        (k["tenant"].as_str(), k["data"]["pointsChange"].as_i64()),
        (Some("kitchen"), Some(3))
    );
    let b = bistro.next().await;
    assert_eq!(
        (b["tenant"].as_str(), b["data"]["pointsChange"].as_i64()),
        (Some("bistro"), Some(7))
    );
    // Both are id 1: ids are per tenant.
    assert_eq!((k["id"].as_i64(), b["id"].as_i64()), (Some(1), Some(1)));
    assert!(
        kitchen
            .next_within(Duration::from_millis(300))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn shutdown_sends_going_away() {
    let OneTenant {
        db: _db,
        key,
        server,
    } = one_tenant("kitchen").await;
    let mut pos = Pos::connect(&server, "kitchen", &key, None).await;
    server.shutdown.cancel();
    assert_eq!(pos.close_code(Duration::from_secs(10)).await, Some(1001));
    server.stop().await;
}

#[tokio::test]
async fn client_frames_are_ignored_and_oversized_ones_end_the_socket() {
    let OneTenant {
        db: _db,
        key,
        server,
    } = one_tenant("kitchen").await;
    let mut pos = Pos::connect(&server, "kitchen", &key, None).await;
    pos.send_text(&json!({"type": "ack", "id": 1}).to_string())
        .await;
    pos.send_text("garbage").await;
    server
        .broadcast(&json!({"tenant": "kitchen", "event": {"type": "x", "data": 1}}))
        .await;
    assert_eq!(pos.next().await["type"], "x");
    // 64 KiB is far over the 4 KiB a POS may send: the server drops the socket.
    let _ = futures_util::SinkExt::send(
        &mut pos.ws,
        tokio_tungstenite::tungstenite::Message::Text("a".repeat(64 * 1024).into()),
    )
    .await;
    let code = pos.close_code(Duration::from_secs(5)).await;
    assert!(matches!(code, None | Some(1009)), "{code:?}");
    // Other clients are unaffected.
    let mut other = Pos::connect(&server, "kitchen", &key, None).await;
    server
        .broadcast(&json!({"tenant": "kitchen", "event": {"type": "y", "data": 1}}))
        .await;
    assert_eq!(other.next().await["type"], "y");
}
