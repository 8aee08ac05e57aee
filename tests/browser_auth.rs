//! A browser, which cannot set `X-API-Key` on a WebSocket, presents its key as a
//! `Sec-WebSocket-Protocol` entry; the server echoes only `orderpush.v1` (docs/browser-auth.md).

use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::common::*;

/// Connects with the given `Sec-WebSocket-Protocol` value and no `X-API-Key`: the response's
/// status and its `Sec-WebSocket-Protocol`, plus the socket when upgraded.
async fn connect_with_protocols(
    server: &TestServer,
    tenant: &str,
    protocols: &str,
) -> (u16, Option<String>, Option<Pos>) {
    let mut req = server
        .ws(&format!("/ws/pos/{tenant}"))
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", protocols.parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, resp)) => {
            let echoed = resp
                .headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().unwrap().to_owned());
            (101, echoed, Some(Pos { ws }))
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let echoed = resp
                .headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().unwrap().to_owned());
            (resp.status().as_u16(), echoed, None)
        }
        Err(e) => panic!("unexpected connect error: {e}"),
    }
}

#[tokio::test]
async fn a_key_offered_as_a_subprotocol_authenticates_and_is_not_echoed() {
    let OneTenant {
        db: _db,
        key,
        server,
    } = one_tenant("kitchen").await;
    let (status, echoed, pos) = connect_with_protocols(
        &server,
        "kitchen",
        &format!("orderpush.v1, orderpush.key.{key}"),
    )
    .await;
    assert_eq!(status, 101);
    assert_eq!(
        echoed.as_deref(),
        Some("orderpush.v1"),
        "only the protocol is echoed"
    );
    let mut pos = pos.unwrap();
    server
        .broadcast(&json!({"tenant": "kitchen", "event": {"type": "hello", "data": 1}}))
        .await;
    assert_eq!(pos.next().await["type"], "hello");

    // The key entry may come first, and a client speaking X-API-Key may offer the protocol too.
    let (status, echoed, _) = connect_with_protocols(
        &server,
        "kitchen",
        &format!("orderpush.key.{key}, orderpush.v1"),
    )
    .await;
    assert_eq!((status, echoed.as_deref()), (101, Some("orderpush.v1")));
}

#[tokio::test]
async fn wrong_or_misused_subprotocol_keys_are_refused() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    db.tenant("bistro").await;
    let key = db.key("kitchen").await;
    let other = db.key("bistro").await;
    let server = TestServer::builder(&db).start().await;
    let unknown = format!("pos_{}", "0".repeat(64));
    let cases = [
        (
            format!("orderpush.v1, orderpush.key.{unknown}"),
            401,
            "unknown key",
        ),
        (
            "orderpush.v1, orderpush.key.pos_nope".to_owned(),
            401,
            "malformed key",
        ),
        ("orderpush.v1".to_owned(), 401, "no key at all"),
        (
            format!("orderpush.v1, orderpush.key.{other}"),
            403,
            "another tenant's key",
        ),
        (
            format!("orderpush.key.{key}"),
            400,
            "key without orderpush.v1",
        ),
        (
            format!("orderpush.v1, orderpush.key.{key}, orderpush.key.{other}"),
            401,
            "two keys",
        ),
    ];
    for (protocols, want, what) in cases {
        let (status, echoed, _) = connect_with_protocols(&server, "kitchen", &protocols).await;
        assert_eq!(status, want, "{what}");
        assert!(
            echoed.is_none_or(|e| !e.contains("pos_")),
            "{what}: a refusal echoes no key"
        );
    }
}
