//! Nobody let in: brute-force limiting, secrets kept out of logs, revocation on every instance,
//! and every way of reaching another tenant's events (issue 3, "Security").

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::common::*;

/// The failed-authentication limit the limiter test runs with (instead of the default 50).
const TEST_LIMIT: u32 = 5;
/// Its cooling-off period: short so the test can watch it end.
const TEST_COOLDOWN: Duration = Duration::from_secs(2);

/// Upgrade attempt with raw headers; returns the status and the Retry-After header.
async fn attempt(server: &TestServer, path: &str, keys: &[&str]) -> (u16, Option<String>) {
    let mut req = server.ws(path).into_client_request().unwrap();
    for k in keys {
        req.headers_mut().append("X-API-Key", k.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => (101, None),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => (
            resp.status().as_u16(),
            resp.headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned()),
        ),
        Err(e) => panic!("unexpected connect error: {e}"),
    }
}

#[tokio::test]
async fn repeated_failed_authentication_is_answered_429_until_the_cooldown_ends() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let key = db.key("kitchen").await;
    let server = TestServer::start_with(&db, |c| {
        c.tuning.auth_failure_limit = TEST_LIMIT;
        c.tuning.auth_cooldown = TEST_COOLDOWN;
    })
    .await;
    // Successes never count, however many.
    for _ in 0..(3 * TEST_LIMIT) {
        assert_eq!(attempt(&server, "/ws/pos/kitchen", &[&key]).await.0, 101);
    }
    let unknown = format!("pos_{}", "0".repeat(64));
    for n in 1..=TEST_LIMIT {
        let (status, _) = attempt(&server, "/ws/pos/kitchen", &[&unknown]).await;
        assert_eq!(status, 401, "failure {n} is answered normally");
    }
    // Cooling off: even the right key is refused without being looked at, with Retry-After.
    let (status, retry_after) = attempt(&server, "/ws/pos/kitchen", &[&key]).await;
    assert_eq!(status, 429);
    let secs: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert!((1..=TEST_COOLDOWN.as_secs()).contains(&secs), "{secs}");
    let (status, body) = server
        .broadcast(&json!({"tenant": "kitchen", "event": {"type": "x", "data": 1}}))
        .await;
    assert_eq!((status, body["success"].as_bool()), (429, Some(false)));
    assert_eq!(
        db.event_count().await,
        0,
        "a refused broadcast writes nothing"
    );
    assert_eq!(
        readyz(&server).await,
        200,
        "operations endpoints are not limited"
    );

    tokio::time::sleep(TEST_COOLDOWN + Duration::from_millis(200)).await;
    assert_eq!(attempt(&server, "/ws/pos/kitchen", &[&key]).await.0, 101);
}

#[tokio::test]
async fn a_wrong_broadcast_token_counts_as_a_failed_authentication() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let token = "a-long-enough-secret-token";
    let server = TestServer::start_with(&db, |c| {
        c.broadcast_token = Some(token.into());
        c.tuning.auth_failure_limit = TEST_LIMIT;
    })
    .await;
    let post = |auth: String| {
        reqwest::Client::new()
            .post(server.http("/broadcast"))
            .header("Authorization", auth)
            .json(&json!({"tenant": "kitchen", "event": {"type": "x", "data": 1}}))
            .send()
    };
    assert_eq!(post(format!("Bearer {token}")).await.unwrap().status(), 200);
    for _ in 0..TEST_LIMIT {
        assert_eq!(
            post("Bearer guess-guess-guess".into())
                .await
                .unwrap()
                .status(),
            401
        );
    }
    assert_eq!(post(format!("Bearer {token}")).await.unwrap().status(), 429);
    assert_eq!(db.event_count().await, 1);
}

#[tokio::test]
async fn the_default_limit_is_documented_and_sane() {
    use orderpush::http::auth;
    // Sane: a POS retrying every 2 s with a revoked key never trips it.
    let per_window = auth::AUTH_FAILURE_WINDOW.as_secs() / 2;
    assert!(u64::from(auth::AUTH_FAILURE_LIMIT) > per_window);
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/reliability.md"))
        .expect("docs/reliability.md exists");
    assert!(docs.contains(&format!(
        "{} failed authentications",
        auth::AUTH_FAILURE_LIMIT
    )));
    assert!(docs.contains("--auth-failure-limit"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_tokens_never_reach_the_logs() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    db.tenant("bistro").await;
    let created = orderpush::db::keys::create(&db.client().await, "kitchen", None)
        .await
        .unwrap();
    let other = db.key("bistro").await;
    let token = "broadcast-secret-0123456789";
    let wrong_token = "not-the-token-9876543210";
    let unknown = format!("pos_{}", "e".repeat(64));
    let malformed = "pos_SECRET-LOOKING-GARBAGE";
    let port = free_port();
    let log = std::env::temp_dir().join(format!("orderpush-logs-{}.log", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_orderpush"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("DATABASE_URL", db.url())
        .env("ORDERPUSH_BROADCAST_TOKEN", token)
        // Everything, including dependencies' debug and trace output.
        .env("RUST_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let base = format!("127.0.0.1:{port}");
    eventually("the service is ready", Duration::from_secs(30), || async {
        matches!(reqwest::get(format!("http://{base}/readyz")).await, Ok(r) if r.status() == 200)
    })
    .await;
    let try_key = |path: &'static str, key: String| {
        let base = base.clone();
        async move {
            let mut req = format!("ws://{base}{path}").into_client_request().unwrap();
            req.headers_mut().insert("X-API-Key", key.parse().unwrap());
            tokio_tungstenite::connect_async(req)
                .await
                .ok()
                .map(|(ws, _)| ws)
        }
    };
    let mut live = try_key("/ws/pos/kitchen", created.secret.clone())
        .await
        .expect("valid key connects");
    for (path, key) in [
        ("/ws/pos/kitchen", unknown.clone()),
        ("/ws/pos/kitchen", malformed.to_string()),
        ("/ws/pos/kitchen", other.clone()),
        ("/ws/pos/bistro", created.secret.clone()),
    ] {
        assert!(try_key(path, key).await.is_none());
    }
    for auth in [token, wrong_token] {
        reqwest::Client::new()
            .post(format!("http://{base}/broadcast"))
            .header("Authorization", format!("Bearer {auth}"))
            .json(&json!({"tenant": "kitchen", "event": {"type": "x", "data": 1}}))
            .send()
            .await
            .unwrap();
    }
    orderpush::db::keys::revoke(&db.client().await, &created.id)
        .await
        .unwrap();
    use futures_util::StreamExt;
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(5), live.next()).await {}
    run_kill(child.id(), "TERM");
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert!(
        text.contains(&created.id),
        "the key's public id is what identifies it in logs"
    );
    assert!(text.contains("revoked"), "the revocation was logged");
    let hash_hex: String = orderpush::db::keys::hash(&created.secret)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    for secret in [
        created.secret.as_str(),
        &created.secret[4..],
        other.as_str(),
        unknown.as_str(),
        malformed,
        token,
        wrong_token,
        hash_hex.as_str(),
    ] {
        assert!(
            !text.contains(secret),
            "a secret appears in the logs: {secret}"
        );
    }

    // The CLI: the secret goes to stdout only; listings show neither secret nor hash.
    let out = Command::new(env!("CARGO_BIN_EXE_orderpush"))
        .args(["keys", "create", "--tenant", "kitchen"])
        .env("DATABASE_URL", db.url())
        .env("RUST_LOG", "trace")
        .output()
        .unwrap();
    let secret = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(secret.starts_with("pos_"));
    assert!(!String::from_utf8_lossy(&out.stderr).contains(&secret[4..]));
    let list = Command::new(env!("CARGO_BIN_EXE_orderpush"))
        .args(["keys", "list", "--json"])
        .env("DATABASE_URL", db.url())
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(!listed.contains(&secret[4..]) && !listed.contains(&created.secret[4..]));
    assert!(!listed.contains(&hash_hex));
}

fn run_kill(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_is_cut_off_on_every_instance_within_five_seconds() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let created = orderpush::db::keys::create(&db.client().await, "kitchen", None)
        .await
        .unwrap();
    let a = TestServer::start(&db).await;
    let b = TestServer::start(&db).await;
    // A third instance has the key cached but no socket open with it.
    let c = TestServer::start(&db).await;
    drop(Pos::connect(&c, "kitchen", &created.secret, None).await);
    let mut on_a = Pos::connect(&a, "kitchen", &created.secret, None).await;
    let mut on_b = Pos::connect(&b, "kitchen", &created.secret, None).await;
    let started = std::time::Instant::now();
    // Revoked through the database alone (as `orderpush keys revoke` from another host does).
    orderpush::db::keys::revoke(&db.client().await, &created.id)
        .await
        .unwrap();
    assert_eq!(on_a.close_code(Duration::from_secs(5)).await, Some(1008));
    assert_eq!(on_b.close_code(Duration::from_secs(5)).await, Some(1008));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    for server in [&a, &b, &c] {
        let deadline = started + Duration::from_secs(5);
        loop {
            let status = connect_status(server, "/ws/pos/kitchen", Some(&created.secret)).await;
            if status == 401 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still accepted: {status}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test]
async fn no_trick_reaches_another_tenants_events() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    db.tenant("bistro").await;
    let key = db.key("kitchen").await;
    let bistro_key = db.key("bistro").await;
    let server = TestServer::start(&db).await;
    let client = db.client().await;
    for i in 1..=10 {
        insert_loyalty(&client, "bistro", 1000 + i).await;
    }
    for i in 1..=2 {
        insert_loyalty(&client, "kitchen", i).await;
    }

    // Path tricks with kitchen's key: none opens a socket onto bistro.
    for path in [
        "/ws/pos/bistro",
        "/ws/pos/kitchen%2F..%2Fbistro",
        "/ws/pos/kitchen%2f..%2fbistro",
        "/ws/pos/..%2Fbistro",
        "/ws/pos/%2E%2E%2Fbistro",
        "/ws/pos/%62istro",
        "/ws/pos/BISTRO",
        "/ws/pos/Bistro",
        "/ws/pos/KITCHEN",
        "/ws/pos/Kitchen",
        "/ws/pos/bistro%00",
        "/ws/pos/kitchen%00bistro",
        "/ws/pos/bistro%20",
        "/ws/pos/kitchen%20",
        "/ws/pos/bistro/",
        "/ws/pos//bistro",
        "/ws/pos/kitchen/bistro",
        "/ws/pos/kitchen;bistro",
        "/ws/pos/kitchen,bistro",
        "/ws/pos/*",
        "/ws/pos/%2A",
        "/ws/pos/",
        "/ws/pos/b%C4%B1stro",
    ] {
        let status = connect_status(&server, path, Some(&key)).await;
        assert!(matches!(status, 400 | 403 | 404), "{path}: {status}");
    }
    // Another tenant's key on kitchen's path, and key variants.
    assert_eq!(
        connect_status(&server, "/ws/pos/kitchen", Some(&bistro_key)).await,
        403
    );
    for variant in [
        key.to_uppercase(),
        key[..key.len() - 1].to_string(),
        format!("{key} {key}"),
        format!("{key}0"),
        key.replace("pos_", "POS_"),
    ] {
        assert_eq!(
            connect_status(&server, "/ws/pos/kitchen", Some(&variant)).await,
            401,
            "{variant}"
        );
    }
    // Two keys: the first one decides, so a bistro key cannot ride along with kitchen's.
    assert_eq!(
        attempt(&server, "/ws/pos/bistro", &[&key, &bistro_key])
            .await
            .0,
        403
    );

    // What does open (kitchen's own tenant, however spelled) only ever carries kitchen's events,
    // whatever `since` says (bistro's ids run to 10, kitchen's to 2).
    for (path, first) in [
        ("/ws/pos/kitchen?since=0", Some(1)),
        ("/ws/pos/%6Bitchen?since=1", Some(2)),
        ("/ws/pos/kitchen?since=5&tenant=bistro", None),
        ("/ws/pos/kitchen?since=9", None),
    ] {
        let mut req = server.ws(path).into_client_request().unwrap();
        req.headers_mut().insert("X-API-Key", key.parse().unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        let mut pos = Pos { ws };
        let ev = pos.next().await;
        assert_eq!(ev["tenant"], "kitchen", "{path}");
        match first {
            Some(id) => assert_eq!(ev["id"], id, "{path}"),
            // Ahead of kitchen's log: a resync to kitchen's head, not bistro's events.
            None => assert_eq!(
                (ev["type"].as_str(), ev["id"].as_i64()),
                (Some("resync_required"), Some(2))
            ),
        }
        while let Some(ev) = pos.next_within(Duration::from_millis(200)).await {
            assert_eq!(ev["tenant"], "kitchen", "{path}");
            assert!(
                ev["data"]["pointsChange"].as_i64().unwrap() < 1000,
                "{path}: {ev}"
            );
        }
    }

    // A broadcast to a look-alike tenant is unknown and reaches no one.
    let mut kitchen = Pos::connect(&server, "kitchen", &key, None).await;
    for tenant in [
        "Kitchen",
        "kitchen ",
        "kitchen/../bistro",
        "KITCHEN",
        "kitchen\u{0}",
    ] {
        let (status, _) = server
            .broadcast(&json!({"tenant": tenant, "event": {"type": "x", "data": 1}}))
            .await;
        assert_eq!(status, 404, "{tenant:?}");
    }
    assert!(
        kitchen
            .next_within(Duration::from_millis(300))
            .await
            .is_none()
    );
    assert_eq!(db.event_count().await, 12);
}
