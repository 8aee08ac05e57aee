//! `POST /broadcast` (docs/protocol.md, "`POST /broadcast`"): its answers and every error case.

use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn a_broadcast_reaches_the_tenant_and_is_answered_as_documented() {
    let OneTenant {
        db: _db,
        key,
        server,
    } = one_tenant("kitchen").await;
    let mut pos = Pos::connect(&server, "kitchen", &key, None).await;

    let given = json!({"tenant": "kitchen", "event": {"type": "test_broadcast",
        "timestamp": "2025-10-11T14:17:00.000Z", "data": {"message": "Test message", "n": [1, 2.5]}}});
    let (status, body) = server.broadcast(&given).await;
    assert_eq!(status, 200);
    assert_eq!(body["success"], true);
    assert_eq!(body["message"], "Event broadcasted to kitchen");
    let ev = pos.next().await;
    assert_eq!(ev["type"], "test_broadcast");
    assert_eq!(ev["tenant"], "kitchen");
    assert_eq!(
        ev["timestamp"], "2025-10-11T14:17:00.000Z",
        "a given timestamp is passed on as given"
    );
    assert_eq!(
        ev["data"],
        json!({"message": "Test message", "n": [1, 2.5]})
    );
    assert_eq!(ev["id"], 1);

    // Without a timestamp the service stamps one; `data` may be any JSON value.
    let (status, _) = server
        .broadcast(&json!({"tenant": "kitchen", "event": {"type": "ping.v1-x", "data": null}}))
        .await;
    assert_eq!(status, 200);
    let ev = pos.next().await;
    assert_eq!(ev["id"], 2);
    assert!(ev["data"].is_null());
    assert!(ev["timestamp"].as_str().unwrap().ends_with('Z'));
}

async fn raw_post(
    server: &TestServer,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (u16, serde_json::Value) {
    let mut req = reqwest::Client::new()
        .post(server.http("/broadcast"))
        .body(body);
    if let Some(ct) = content_type {
        req = req.header("Content-Type", ct);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or_default())
}

#[tokio::test]
async fn bad_broadcasts_are_refused_with_a_reason_and_write_nothing() {
    let OneTenant { db, key, server } = one_tenant("kitchen").await;
    let mut pos = Pos::connect(&server, "kitchen", &key, None).await;
    let json_ct = Some("application/json");
    let event = |t: &str| {
        format!(r#"{{"tenant":"kitchen","event":{{"type":"{t}","data":{{}}}}}}"#).into_bytes()
    };

    let cases: Vec<(u16, Option<&str>, Vec<u8>, &str)> = vec![
        (400, json_ct, b"{not json".to_vec(), "invalid request"),
        (
            400,
            json_ct,
            br#"{"tenant":"kitchen"}"#.to_vec(),
            "missing field `event`",
        ),
        (
            400,
            json_ct,
            br#"{"tenant":"kitchen","event":{"type":"x"}}"#.to_vec(),
            "missing field `data`",
        ),
        (
            400,
            json_ct,
            br#"{"event":{"type":"x","data":1}}"#.to_vec(),
            "missing field `tenant`",
        ),
        (400, json_ct, event("has space"), "event.type"),
        (400, json_ct, event(""), "event.type"),
        (400, json_ct, event(&"x".repeat(65)), "event.type"),
        (
            400,
            json_ct,
            br#"{"tenant":"kitchen","event":{"type":"x","timestamp":5,"data":1}}"#.to_vec(),
            "invalid type",
        ),
        (
            400,
            json_ct,
            format!(
                r#"{{"tenant":"kitchen","event":{{"type":"x","data":{}}}}}"#,
                "[".repeat(40) + &"]".repeat(40)
            )
            .into_bytes(),
            "nested",
        ),
        (
            404,
            json_ct,
            br#"{"tenant":"nowhere","event":{"type":"x","data":1}}"#.to_vec(),
            "unknown tenant 'nowhere'",
        ),
        (
            404,
            json_ct,
            br#"{"tenant":"Kitchen/..","event":{"type":"x","data":1}}"#.to_vec(),
            "unknown tenant",
        ),
        (
            413,
            json_ct,
            format!(
                r#"{{"tenant":"kitchen","event":{{"type":"x","data":"{}"}}}}"#,
                "a".repeat(300 * 1024)
            )
            .into_bytes(),
            "larger than",
        ),
        (415, Some("text/plain"), event("x"), "application/json"),
        (415, None, event("x"), "application/json"),
    ];
    for (want, ct, body, says) in cases {
        let (status, reply) = raw_post(&server, ct, body).await;
        assert_eq!(status, want, "{reply}");
        assert_eq!(reply["success"], false, "{reply}");
        let error = reply["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "expected {says:?} in {error:?}");
    }
    assert_eq!(db.event_count().await, 0, "nothing was written");
    assert!(
        pos.next_within(std::time::Duration::from_millis(300))
            .await
            .is_none(),
        "nothing was sent"
    );
    // The server is still fine.
    assert_eq!(raw_post(&server, json_ct, event("ok")).await.0, 200);
    assert_eq!(pos.next().await["type"], "ok");
}

#[tokio::test]
async fn a_configured_token_is_required() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let token = "s3cret-token-0123456789";
    let server = TestServer::builder(&db)
        .broadcast_token(token)
        .start()
        .await;
    let body = json!({"tenant": "kitchen", "event": {"type": "x", "data": 1}});
    let client = reqwest::Client::new();
    let post = |auth: Option<String>| {
        let mut r = client.post(server.http("/broadcast")).json(&body);
        if let Some(a) = auth {
            r = r.header("Authorization", a);
        }
        r.send()
    };
    assert_eq!(post(None).await.unwrap().status(), 401);
    assert_eq!(
        post(Some("Bearer wrong-token-0123456789".into()))
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        post(Some(token.into())).await.unwrap().status(),
        401,
        "the Bearer scheme is required"
    );
    assert_eq!(db.event_count().await, 0);
    assert_eq!(
        post(Some(format!("Bearer {token}")))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(db.event_count().await, 1);
}

#[tokio::test]
async fn concurrent_broadcasts_are_batched_without_losing_or_mixing_any() {
    let db = TestDb::create().await;
    let (server, mut kitchen, mut bistro) = kitchen_and_bistro(&db).await;
    let client = reqwest::Client::new();
    let url = server.http("/broadcast");
    let mut calls = Vec::new();
    for i in 0..300 {
        let tenant = ["kitchen", "bistro", "ghost"][i % 3];
        let (client, url) = (client.clone(), url.clone());
        calls.push(tokio::spawn(async move {
            let body = json!({"tenant": tenant, "event": {"type": "n", "data": {"i": i}}});
            let r = client.post(url).json(&body).send().await.unwrap();
            (
                tenant,
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }));
    }
    let mut ids = std::collections::HashMap::<&str, Vec<i64>>::new();
    for call in calls {
        let (tenant, status, body) = call.await.unwrap();
        if tenant == "ghost" {
            assert_eq!(status, 404, "{body}");
        } else {
            assert_eq!(status, 200, "{body}");
            ids.entry(tenant)
                .or_default()
                .push(body["id"].as_i64().unwrap());
        }
    }
    for (tenant, pos) in [("kitchen", &mut kitchen), ("bistro", &mut bistro)] {
        let mut got = ids.remove(tenant).unwrap();
        got.sort_unstable();
        assert_eq!(
            got,
            (1..=100).collect::<Vec<_>>(),
            "{tenant}: every answer has its own id"
        );
        let mut seen = std::collections::HashSet::new();
        for want in 1..=100 {
            let ev = pos.next().await;
            assert_eq!(ev["id"], want);
            assert_eq!(ev["tenant"], tenant);
            assert!(
                seen.insert(ev["data"]["i"].as_i64().unwrap()),
                "no event twice"
            );
        }
    }
    assert_eq!(
        db.event_count().await,
        200,
        "the unknown tenant's requests wrote nothing"
    );
}

#[tokio::test]
async fn an_empty_tenant_is_a_missing_field_400_not_an_unknown_tenant() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let server = TestServer::builder(&db).start().await;
    let (status, reply) = server
        .broadcast(&json!({"tenant": "", "event": {"type": "x", "data": 1}}))
        .await;
    assert_eq!(status, 400, "{reply}");
    assert_eq!(reply["success"], false);
    let error = reply["error"].as_str().unwrap();
    assert!(
        error.contains("tenant") && error.contains("empty"),
        "{error}"
    );
    // A tenant that is given but does not exist stays 404.
    let (status, _) = server
        .broadcast(&json!({"tenant": "nowhere", "event": {"type": "x", "data": 1}}))
        .await;
    assert_eq!(status, 404);
    assert_eq!(db.event_count().await, 0, "nothing was written");
}
