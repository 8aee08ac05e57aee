//! Who gets in, and to what (docs/reliability.md, "Security model"): keys checked before the
//! upgrade, limits on failed authentication, operator endpoints, secrets kept out of logs,
//! revocation on every instance (503, not 401, while it cannot be checked), tenant isolation.

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
async fn repeated_failed_authentication_is_answered_429_until_the_cooldown_ends() {
    let OneTenant {
        db: _db,
        key,
        server,
    } = one_tenant_with("kitchen", |s| {
        s.tuning(|t| {
            t.auth_failure_limit = TEST_LIMIT;
            t.auth_cooldown = TEST_COOLDOWN;
        })
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
    // Cooling off: bad credentials get 429 with Retry-After...
    let (status, retry_after) = attempt(&server, "/ws/pos/kitchen", &[&unknown]).await;
    assert_eq!(status, 429);
    let secs: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert!((1..=TEST_COOLDOWN.as_secs()).contains(&secs), "{secs}");
    // ...valid ones from the same address still pass: the right key, and a local broadcast.
    assert_eq!(attempt(&server, "/ws/pos/kitchen", &[&key]).await.0, 101);
    let (status, body) = server
        .broadcast(&json!({"tenant": "kitchen", "event": {"type": "x", "data": 1}}))
        .await;
    assert_eq!((status, body["success"].as_bool()), (200, Some(true)));
    assert_eq!(
        readyz(&server).await,
        200,
        "operations endpoints are not limited"
    );

    tokio::time::sleep(TEST_COOLDOWN + Duration::from_millis(200)).await;
    assert_eq!(
        attempt(&server, "/ws/pos/kitchen", &[&unknown]).await.0,
        401,
        "after the cooldown a bad key is answered normally again"
    );
}

#[tokio::test]
async fn a_wrong_broadcast_token_counts_as_a_failed_authentication() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let token = "a-long-enough-secret-token";
    let server = TestServer::builder(&db)
        .broadcast_token(token)
        .tuning(|t| t.auth_failure_limit = TEST_LIMIT)
        .start()
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
        let wrong = post("Bearer guess-guess-guess".into()).await.unwrap();
        assert_eq!(wrong.status(), 401);
    }
    let throttled = post("Bearer guess-guess-guess".into()).await.unwrap();
    assert_eq!(throttled.status(), 429);
    assert!(throttled.headers().contains_key("retry-after"));
    // The right token still works from the throttled address.
    assert_eq!(post(format!("Bearer {token}")).await.unwrap().status(), 200);
    assert_eq!(db.event_count().await, 2);
}

/// A well-formed key that exists nowhere: what a scanner presents.
fn guess(n: u32) -> String {
    format!("pos_{n:064x}")
}

#[tokio::test]
async fn bad_keys_from_an_address_are_throttled_while_valid_keys_from_it_keep_connecting() {
    use orderpush::config::AUTH_FAILURE_LIMIT;
    use orderpush::http::auth::BLOCKED_LOOKUP_INTERVAL;
    // The default limit (50): every test client is 127.0.0.1, like terminals behind one NAT.
    let OneTenant {
        db,
        key: connected_before,
        server,
    } = one_tenant("kitchen").await;
    let never_used = db.key("kitchen").await;
    assert_eq!(
        attempt(&server, "/ws/pos/kitchen", &[&connected_before])
            .await
            .0,
        101
    );
    for n in 0..60 {
        let (status, _) = attempt(&server, "/ws/pos/kitchen", &[&guess(n)]).await;
        let expected = if n < AUTH_FAILURE_LIMIT { 401 } else { 429 };
        assert_eq!(status, expected, "bad key {n}");
    }
    // A till that was connected before keeps connecting from the throttled address.
    for _ in 0..3 {
        assert_eq!(
            attempt(&server, "/ws/pos/kitchen", &[&connected_before])
                .await
                .0,
            101
        );
    }
    // A scanner behind it gets 429 and cannot make the service query the database per guess.
    let lookups = "orderpush_key_lookups_total";
    let before = metric(&server, lookups).await;
    let started = std::time::Instant::now();
    for n in 1000..1100 {
        let (status, retry_after) = attempt(&server, "/ws/pos/kitchen", &[&guess(n)]).await;
        assert_eq!(status, 429, "guess {n}");
        assert!(retry_after.is_some());
    }
    let allowed = 1 + started.elapsed().as_secs() / BLOCKED_LOOKUP_INTERVAL.as_secs();
    let caused = metric(&server, lookups).await - before;
    assert!(
        caused <= allowed as f64,
        "100 guesses caused {caused} lookups (at most {allowed} allowed)"
    );
    // A valid key that is not cached yet gets in with the next lookup the address is allowed.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match attempt(&server, "/ws/pos/kitchen", &[&never_used]).await.0 {
            101 => break,
            429 => assert!(
                tokio::time::Instant::now() < deadline,
                "the uncached valid key never got a lookup"
            ),
            other => panic!("the uncached valid key got {other}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn tills_retrying_a_revoked_key_do_not_lock_out_a_valid_one() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let revoked = orderpush::db::keys::create(&db.client().await, "kitchen", None)
        .await
        .unwrap();
    orderpush::db::keys::revoke(&db.client().await, &revoked.id)
        .await
        .unwrap();
    let valid = db.key("kitchen").await;
    let server = TestServer::builder(&db)
        .tuning(|t| t.auth_failure_limit = TEST_LIMIT)
        .start()
        .await;
    for _ in 0..TEST_LIMIT {
        let (status, _) = attempt(&server, "/ws/pos/kitchen", &[&revoked.secret]).await;
        assert_eq!(status, 401);
    }
    // The address is throttled; the revoked key's retries cost no query any more...
    let lookups = "orderpush_key_lookups_total";
    let before = metric(&server, lookups).await;
    for _ in 0..20 {
        let (status, _) = attempt(&server, "/ws/pos/kitchen", &[&revoked.secret]).await;
        assert_eq!(status, 429);
    }
    assert_eq!(metric(&server, lookups).await, before);
    // ...and use up nothing, so a valid key that needs a lookup gets in at the first attempt.
    assert_eq!(attempt(&server, "/ws/pos/kitchen", &[&valid]).await.0, 101);
    assert_eq!(metric(&server, lookups).await, before + 1.0);
}

/// GET or POST on an operator endpoint with extra headers; returns the status.
async fn operator_call(server: &TestServer, path: &str, headers: &[(&str, &str)]) -> u16 {
    let client = reqwest::Client::new();
    let mut request = if path == "/broadcast" {
        client
            .post(server.http(path))
            .json(&json!({"tenant": "kitchen", "event": {"type": "x", "data": 1}}))
    } else {
        client.get(server.http(path))
    };
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap().status().as_u16()
}

/// A raw HTTP request (e.g. one without a Host header); returns the response's status.
async fn raw_status(server: &TestServer, request: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .expect("a response in time")
        .unwrap();
    let text = String::from_utf8_lossy(&response);
    text.get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text}"))
}

/// Ways a request reaching loopback may not come from this machine.
const NOT_LOCAL: [(&str, &str); 7] = [
    ("Forwarded", "for=203.0.113.7"),
    ("X-Forwarded-For", "203.0.113.7"),
    ("X-Real-IP", "203.0.113.7"),
    ("Host", "evil.example"),
    ("Host", "evil.example:9011"),
    ("Host", "localhost.evil.example"),
    ("Host", ""),
];

#[tokio::test]
async fn without_tokens_proxied_and_non_local_requests_are_refused_and_not_counted() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let server = TestServer::builder(&db).start().await;
    let endpoints = ["/broadcast", "/admin/tenants", "/status"];
    for path in endpoints {
        for header in NOT_LOCAL {
            assert_eq!(
                operator_call(&server, path, &[header]).await,
                403,
                "{path} {header:?}"
            );
        }
        for host in ["localhost", "LOCALHOST:9011", "127.0.0.1", "[::1]:9011"] {
            assert_eq!(
                operator_call(&server, path, &[("Host", host)]).await,
                200,
                "{path} Host: {host}"
            );
        }
    }
    // No Host at all (HTTP/1.0 allows it): not known to be local either.
    for path in ["/admin/tenants", "/status"] {
        let request = format!("GET {path} HTTP/1.0\r\n\r\n");
        assert_eq!(raw_status(&server, &request).await, 403, "{path}");
    }
    let no_host = "POST /broadcast HTTP/1.0\r\nContent-Type: application/json\r\n\
                   Content-Length: 2\r\n\r\n{}";
    assert_eq!(raw_status(&server, no_host).await, 403);
    assert_eq!(
        db.event_count().await,
        4,
        "only the local broadcasts went through"
    );
    // 60 such refusals from one address are configuration, not guessing: no 429 for it.
    for i in 0..60 {
        let header = NOT_LOCAL[i % NOT_LOCAL.len()];
        assert_eq!(
            operator_call(&server, endpoints[i % 3], &[header]).await,
            403
        );
    }
    let unknown = format!("pos_{}", "0".repeat(64));
    assert_eq!(
        attempt(&server, "/ws/pos/kitchen", &[&unknown]).await.0,
        401,
        "the address was not throttled"
    );
}

#[tokio::test]
async fn with_tokens_configured_proxy_headers_and_host_do_not_matter() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let broadcast_token = "broadcast-secret-0123456789";
    let admin_token = "admin-secret-0123456789";
    let server = TestServer::builder(&db)
        .broadcast_token(broadcast_token)
        .admin_token(admin_token)
        .start()
        .await;
    for (path, token) in [
        ("/broadcast", broadcast_token),
        ("/admin/tenants", admin_token),
        ("/status", admin_token),
    ] {
        let bearer = format!("Bearer {token}");
        for header in NOT_LOCAL {
            let with_token = [header, ("Authorization", bearer.as_str())];
            assert_eq!(
                operator_call(&server, path, &with_token).await,
                200,
                "{path} {header:?}"
            );
            let wrong = [header, ("Authorization", "Bearer not-the-token-at-all")];
            assert_eq!(
                operator_call(&server, path, &wrong).await,
                401,
                "{path} {header:?}"
            );
        }
    }
}

#[tokio::test]
async fn serve_warns_about_unset_tokens_when_it_listens_beyond_loopback() {
    let db = TestDb::create().await;
    let serve = |listen: String, admin_token: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_orderpush"));
        cmd.args(["serve", "--listen", &listen])
            .env("DATABASE_URL", db.url())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        if let Some(token) = admin_token {
            cmd.env("ORDERPUSH_ADMIN_TOKEN", token);
        }
        JsonChild::spawn(cmd)
    };
    let exposed = serve(
        format!("0.0.0.0:{}", free_port()),
        Some("admin-secret-0123456789"),
    )
    .after_stderr("orderpush listening")
    .await;
    let warnings: Vec<&String> = exposed
        .stderr
        .iter()
        .filter(|l| l.contains("WARN") && l.contains("not a loopback address"))
        .collect();
    assert_eq!(warnings.len(), 1, "{:#?}", exposed.stderr);
    assert!(warnings[0].contains("--broadcast-token"), "{}", warnings[0]);
    drop(exposed);
    let local = serve(format!("127.0.0.1:{}", free_port()), None)
        .after_stderr("orderpush listening")
        .await;
    assert!(
        !local
            .stderr
            .iter()
            .any(|l| l.contains("not a loopback address")),
        "{:#?}",
        local.stderr
    );
}

#[tokio::test]
async fn the_default_limit_is_documented_and_sane() {
    use orderpush::http::auth;
    // Sane: a POS retrying every 2 s with a revoked key never trips it.
    let per_window = auth::AUTH_FAILURE_WINDOW.as_secs() / 2;
    assert!(u64::from(orderpush::config::AUTH_FAILURE_LIMIT) > per_window);
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/reliability.md"))
        .expect("docs/reliability.md exists");
    assert!(docs.contains(&format!(
        "{} failed authentications",
        orderpush::config::AUTH_FAILURE_LIMIT
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

/// The periodic revocation check pushed out of the test's reach: only a key-change
/// notification can act in time.
fn notifications_only(t: &mut orderpush::config::Tuning) {
    t.revocation_check_interval = Duration::from_secs(3600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_is_refused_within_a_second_and_its_sockets_close_on_every_instance() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let created = orderpush::db::keys::create(&db.client().await, "kitchen", None)
        .await
        .unwrap();
    let other_key = db.key("kitchen").await;
    let a = TestServer::builder(&db)
        .tuning(notifications_only)
        .start()
        .await;
    let b = TestServer::builder(&db)
        .tuning(notifications_only)
        .start()
        .await;
    // A third instance has the key cached but no socket open with it.
    let c = TestServer::builder(&db)
        .tuning(notifications_only)
        .start()
        .await;
    drop(Pos::connect(&c, "kitchen", &created.secret, None).await);
    let mut on_a = Pos::connect(&a, "kitchen", &created.secret, None).await;
    let mut on_b = Pos::connect(&b, "kitchen", &created.secret, None).await;
    let mut bystander = Pos::connect(&a, "kitchen", &other_key, None).await;

    let out = orderpush_cli(&db, &["keys", "revoke", &created.id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    tokio::time::sleep(Duration::from_secs(1)).await;
    for server in [&a, &b, &c] {
        assert_eq!(
            connect_status(server, "/ws/pos/kitchen", Some(&created.secret)).await,
            401
        );
    }
    assert_eq!(on_a.close_code(Duration::from_secs(5)).await, Some(1008));
    assert_eq!(on_b.close_code(Duration::from_secs(5)).await, Some(1008));
    // The tenant's other key is untouched.
    server_broadcast_reaches(&a, &mut bystander).await;
}

/// A broadcast on `server` reaches `pos` (which is therefore still connected).
async fn server_broadcast_reaches(server: &TestServer, pos: &mut Pos) {
    let (status, _) = server
        .broadcast(&json!({"tenant": "kitchen", "event": {"type": "still_here", "data": 1}}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(pos.next().await["type"], "still_here");
}

#[tokio::test]
async fn a_key_moved_to_another_tenant_or_deleted_with_its_tenant_loses_its_sockets() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    db.tenant("annex").await;
    let created = orderpush::db::keys::create(&db.client().await, "kitchen", None)
        .await
        .unwrap();
    let server = TestServer::builder(&db)
        .tuning(notifications_only)
        .start()
        .await;
    let mut on_kitchen = Pos::connect(&server, "kitchen", &created.secret, None).await;
    let client = db.client().await;
    client
        .execute(
            "UPDATE orderpush.api_keys SET tenant_slug = 'annex' WHERE id = $1",
            &[&created.id],
        )
        .await
        .unwrap();
    assert_eq!(
        on_kitchen.close_code(Duration::from_secs(5)).await,
        Some(1008)
    );
    assert_eq!(
        connect_status(&server, "/ws/pos/kitchen", Some(&created.secret)).await,
        403,
        "the cache forgot the old tenant"
    );
    let mut on_annex = Pos::connect(&server, "annex", &created.secret, None).await;
    // Deleting the tenant deletes its keys by cascade: that is a key change too.
    client
        .execute("DELETE FROM tenants WHERE slug = 'annex'", &[])
        .await
        .unwrap();
    assert_eq!(
        on_annex.close_code(Duration::from_secs(5)).await,
        Some(1008)
    );
    assert_eq!(
        connect_status(&server, "/ws/pos/annex", Some(&created.secret)).await,
        401
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_revocation_watcher_reconnects_and_listens_again() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let created = orderpush::db::keys::create(&db.client().await, "kitchen", None)
        .await
        .unwrap();
    let server = TestServer::builder(&db)
        .tuning(notifications_only)
        .start()
        .await;
    let mut pos = Pos::connect(&server, "kitchen", &created.secret, None).await;
    let admin = admin().await;
    // The watcher's backend once it has listened and run its first check (idle after a query
    // other than the LISTEN itself).
    let watcher = async || -> Option<i32> {
        admin
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name = $2
                 AND state = 'idle' AND query <> '' AND query NOT LIKE 'LISTEN%'",
                &[&db.name, &orderpush::revocation::APPLICATION_NAME],
            )
            .await
            .unwrap()
            .map(|r| r.get(0))
    };
    let wait_for_watcher = async |other_than: Option<i32>| -> i32 {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match watcher().await {
                Some(pid) if Some(pid) != other_than => return pid,
                _ => assert!(
                    tokio::time::Instant::now() < deadline,
                    "no listening revocation watcher"
                ),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let first = wait_for_watcher(None).await;
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&first])
        .await
        .unwrap();
    wait_for_watcher(Some(first)).await;
    // Only a notification on the new connection can close the socket in time.
    orderpush::db::keys::revoke(&db.client().await, &created.id)
        .await
        .unwrap();
    assert_eq!(pos.close_code(Duration::from_secs(5)).await, Some(1008));
}

#[tokio::test]
async fn the_periodic_check_closes_sockets_when_a_notification_is_missed() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let created = orderpush::db::keys::create(&db.client().await, "kitchen", None)
        .await
        .unwrap();
    let server = TestServer::builder(&db).start().await;
    let mut pos = Pos::connect(&server, "kitchen", &created.secret, None).await;
    let client = db.client().await;
    // As when the notify is skipped (the notification queue more than half full).
    client
        .batch_execute("ALTER TABLE orderpush.api_keys DISABLE TRIGGER orderpush_key_changed")
        .await
        .unwrap();
    orderpush::db::keys::revoke(&client, &created.id)
        .await
        .unwrap();
    // The documented bound (docs/reliability.md, "Failure modes"): closed within 5 s (the check
    // runs every 2 s).
    assert_eq!(pos.close_code(Duration::from_secs(5)).await, Some(1008));
    assert_eq!(
        connect_status(&server, "/ws/pos/kitchen", Some(&created.secret)).await,
        401
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_database_is_unreachable_keys_not_verified_recently_get_503_never_401() {
    use orderpush::http::auth::REVOCATION_FRESHNESS;
    let OneTenant {
        db,
        key: cached,
        server,
    } = one_tenant("kitchen").await;
    let uncached = db.key("kitchen").await;
    let unknown = format!("pos_{}", "7".repeat(64));
    assert_eq!(attempt(&server, "/ws/pos/kitchen", &[&cached]).await.0, 101);

    // The database refuses every connection, and the service's are cut.
    let admin = admin().await;
    allow_connections(&admin, &db.name, false).await;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
            &[&db.name],
        )
        .await
        .unwrap();
    // A key confirmed a moment ago still connects (for up to 10 s)...
    assert_eq!(attempt(&server, "/ws/pos/kitchen", &[&cached]).await.0, 101);
    // ...keys the service cannot confirm get 503 with Retry-After: maybe valid, so never 401.
    for key in [&uncached, &unknown] {
        let (status, retry_after) = attempt(&server, "/ws/pos/kitchen", &[key]).await;
        assert_eq!(status, 503);
        assert!(retry_after.unwrap().parse::<u64>().unwrap() >= 1);
    }
    // Once no revocation check has succeeded for 10 s, the cached key is unverifiable too.
    let deadline = tokio::time::Instant::now() + REVOCATION_FRESHNESS + WAIT;
    loop {
        let (status, retry_after) = attempt(&server, "/ws/pos/kitchen", &[&cached]).await;
        match status {
            101 => assert!(
                tokio::time::Instant::now() < deadline,
                "the cached key is still trusted"
            ),
            503 => {
                assert!(retry_after.is_some());
                break;
            }
            other => panic!("a cached key during the outage got {other}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    allow_connections(&admin, &db.name, true).await;
    eventually("keys are verified again", WAIT, || async {
        attempt(&server, "/ws/pos/kitchen", &[&cached]).await.0 == 101
    })
    .await;
    assert_eq!(
        attempt(&server, "/ws/pos/kitchen", &[&uncached]).await.0,
        101
    );
    assert_eq!(
        attempt(&server, "/ws/pos/kitchen", &[&unknown]).await.0,
        401
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
async fn no_trick_reaches_another_tenants_events() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    db.tenant("bistro").await;
    let key = db.key("kitchen").await;
    let bistro_key = db.key("bistro").await;
    let server = TestServer::builder(&db).start().await;
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
