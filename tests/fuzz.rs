//! Hostile input, property-based: random and malformed /broadcast bodies and headers, raw HTTP
//! requests and WebSocket frames against a running server. It never answers 5xx for a client's
//! mistake, never panics, never writes an event for a rejected request, and keeps serving.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

/// Cases per property: enough to cover every strategy branch many times, small enough that
/// the whole test takes seconds.
const HTTP_CASES: u32 = 300;
const RAW_CASES: u32 = 120;
const WS_CASES: u32 = 60;
/// How long a raw or WebSocket case waits for the server's reaction before moving on.
const REACTION: Duration = Duration::from_millis(250);
/// The broadcast token the fuzzed server requires.
const TOKEN: &str = "fuzz-token-0123456789abcdef";
/// Server threads are named so that the panic hook counts only panics inside the server.
const SERVER_THREAD: &str = "fuzz-server";

static SERVER_PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_server_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with(SERVER_THREAD))
        {
            SERVER_PANICS.fetch_add(1, Ordering::SeqCst);
        }
        previous(info);
    }));
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,24}".prop_map(Value::from),
    ];
    leaf.prop_recursive(5, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            btree_map(".{0,12}", inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A well-formed broadcast: what the web app sends.
fn valid_body() -> impl Strategy<Value = Value> {
    body_for(prop_oneof![
        Just("kitchen".to_string()),
        Just("bistro".to_string())
    ])
}

/// A well-formed broadcast event for whatever tenant `tenant` yields.
fn body_for(tenant: impl Strategy<Value = String>) -> impl Strategy<Value = Value> {
    (
        tenant,
        "[A-Za-z0-9_.-]{1,64}",
        proptest::option::of("[ -~]{0,64}"),
        arb_json(),
    )
        .prop_map(|(tenant, kind, timestamp, data)| {
            let mut event = json!({"type": kind, "data": data});
            if let Some(ts) = timestamp {
                event["timestamp"] = Value::from(ts);
            }
            json!({"tenant": tenant, "event": event})
        })
}

#[derive(Debug, Clone)]
enum Body {
    /// Must be accepted (when the headers are right) and delivered as sent.
    Valid(Value),
    /// Well-formed but for a tenant that does not exist (or cannot): 404 (400 when empty),
    /// nothing written.
    NoSuchTenant(Value),
    /// Anything: must be answered 4xx or 200, and 200 only with an event written.
    Unknown(Vec<u8>),
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        3 => valid_body().prop_map(Body::Valid),
        1 => body_for(prop_oneof![
            "[a-z0-9-]{1,63}",
            ".{0,80}",
            Just("Kitchen".to_string()),
            Just("kitchen ".to_string()),
            Just(String::new()),
        ])
        .prop_filter("an existing tenant", |v| v["tenant"] != "kitchen" && v["tenant"] != "bistro")
        .prop_map(Body::NoSuchTenant),
        // A valid body with bytes changed, inserted or cut.
        2 => (valid_body(), vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..4)).prop_map(
            |(v, edits)| {
                let mut bytes = serde_json::to_vec(&v).unwrap();
                for (at, byte, op) in edits {
                    let i = at.index(bytes.len().max(1));
                    match op {
                        0 if i < bytes.len() => bytes[i] = byte,
                        1 => bytes.insert(i.min(bytes.len()), byte),
                        _ => bytes.truncate(i),
                    }
                }
                Body::Unknown(bytes)
            }
        ),
        // Right shape, wrong values: any JSON in every field.
        2 => (arb_json(), arb_json(), arb_json(), arb_json()).prop_map(|(t, k, ts, d)| {
            Body::Unknown(serde_json::to_vec(&json!({"tenant": t, "event": {"type": k, "timestamp": ts, "data": d}})).unwrap())
        }),
        1 => arb_json().prop_map(|v| Body::Unknown(serde_json::to_vec(&v).unwrap())),
        1 => vec(any::<u8>(), 0..2048).prop_map(Body::Unknown),
        // Deep nesting, around the 32-level limit and far beyond it.
        1 => (1usize..200).prop_map(|depth| Body::Unknown(
            format!(r#"{{"tenant":"kitchen","event":{{"type":"deep","data":{}1{}}}}}"#, "[".repeat(depth), "]".repeat(depth)).into_bytes()
        )),
        // Around the 256 KiB body limit.
        1 => (250 * 1024usize..270 * 1024).prop_map(|n| Body::Unknown(
            format!(r#"{{"tenant":"kitchen","event":{{"type":"big","data":"{}"}}}}"#, "x".repeat(n)).into_bytes()
        )),
    ]
}

#[derive(Debug, Clone)]
struct BroadcastCase {
    body: Body,
    content_type: Option<String>,
    authorization: Option<String>,
}

fn broadcast_case() -> impl Strategy<Value = BroadcastCase> {
    let content_type = prop_oneof![
        6 => Just(Some("application/json".to_string())),
        1 => Just(Some("application/json; charset=utf-8".to_string())),
        1 => Just(Some("Application/JSON".to_string())),
        1 => Just(Some("text/plain".to_string())),
        1 => Just(None),
        1 => "[ -~]{0,40}".prop_map(Some),
    ];
    let authorization = prop_oneof![
        8 => Just(Some(format!("Bearer {TOKEN}"))),
        1 => Just(None),
        1 => Just(Some(TOKEN.to_string())),
        1 => Just(Some(format!("bearer {TOKEN}"))),
        1 => Just(Some(format!("Bearer {}", &TOKEN[1..]))),
        1 => "[ -~]{0,80}".prop_map(Some),
    ];
    (body(), content_type, authorization).prop_map(|(body, content_type, authorization)| {
        BroadcastCase {
            body,
            content_type,
            authorization,
        }
    })
}

struct Target {
    server: TestServer,
    db: TestDb,
    key: String,
    http: reqwest::Client,
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

async fn check_broadcast(t: &Target, case: BroadcastCase) -> Result<(), TestCaseError> {
    let before = t.db.event_count().await;
    let bytes = match &case.body {
        Body::Valid(v) | Body::NoSuchTenant(v) => serde_json::to_vec(v).unwrap(),
        Body::Unknown(b) => b.clone(),
    };
    let mut req = t.http.post(t.server.http("/broadcast")).body(bytes);
    for (name, value) in [
        ("content-type", &case.content_type),
        ("authorization", &case.authorization),
    ] {
        if let Some(v) = value {
            match reqwest::header::HeaderValue::from_str(v) {
                Ok(v) => req = req.header(name, v),
                Err(_) => return Ok(()), // not sendable as a header at all
            }
        }
    }
    let response = req
        .send()
        .await
        .map_err(|e| fail(format!("no answer (did the handler panic?): {e}")))?;
    let status = response.status().as_u16();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    let after = t.db.event_count().await;
    if status >= 500 {
        return Err(fail(format!("{status} {answer} for {case:?}")));
    }
    if status == 200 {
        if after != before + 1 {
            return Err(fail(format!("200 but {} events written", after - before)));
        }
    } else {
        if after != before {
            return Err(fail(format!("{status} but an event was written")));
        }
        if answer["success"] != false || !answer["error"].is_string() {
            return Err(fail(format!("{status} without an error body: {answer}")));
        }
    }
    let auth_ok = case.authorization.as_deref() == Some(&format!("Bearer {TOKEN}"));
    let json_ok = case
        .content_type
        .as_deref()
        .is_some_and(|c| c.to_ascii_lowercase().starts_with("application/json"));
    if !auth_ok && status != 401 {
        return Err(fail(format!("wrong credentials answered {status}")));
    }
    if let (Body::NoSuchTenant(sent), true, true) = (&case.body, auth_ok, json_ok) {
        // An empty tenant is a missing field (400); any other non-existent one is unknown (404).
        let want = if sent["tenant"] == "" { 400 } else { 404 };
        if status != want {
            return Err(fail(format!(
                "tenant {} answered {status}, not {want}",
                sent["tenant"]
            )));
        }
    }
    if let (Body::Valid(sent), true, true) = (&case.body, auth_ok, json_ok) {
        if status != 200 {
            return Err(fail(format!(
                "a valid broadcast was refused: {status} {answer}"
            )));
        }
        // Stored exactly as sent: the same text, not merely an equal value.
        let row = t
            .db
            .client()
            .await
            .query_one(
                "SELECT type, data::text FROM orderpush.events WHERE tenant_slug = $1 ORDER BY id DESC LIMIT 1",
                &[&sent["tenant"].as_str().unwrap()],
            )
            .await
            .unwrap();
        let (kind, data): (String, String) = (row.get(0), row.get(1));
        let expected = serde_json::to_string(&sent["event"]["data"]).unwrap();
        if kind != sent["event"]["type"] || data != expected {
            return Err(fail(format!("stored {kind} {data} for {sent}")));
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
struct RawCase {
    head: Vec<u8>,
    body: Vec<u8>,
}

fn raw_case() -> impl Strategy<Value = RawCase> {
    let method = prop_oneof![
        Just("POST".to_string()),
        Just("GET".to_string()),
        Just("PUT".to_string()),
        Just("POST\0".to_string()),
        "[A-Z]{0,8}"
    ];
    let path = prop_oneof![
        Just("/broadcast".to_string()),
        Just("/ws/pos/kitchen".to_string()),
        Just("/ws/pos/kitchen?since=99999999999999999999".to_string()),
        "/[ -~]{0,100}",
        ".{0,40}",
    ];
    let version = prop_oneof![
        Just("HTTP/1.1".to_string()),
        Just("HTTP/1.0".to_string()),
        Just("HTTP/2.0".to_string()),
        "[ -~]{0,10}"
    ];
    let header = prop_oneof![
        Just("Content-Type: application/json".to_string()),
        Just(format!("Authorization: Bearer {TOKEN}")),
        Just("Content-Length: 99999999999999999999".to_string()),
        Just("Content-Length: -1".to_string()),
        (0u32..2000).prop_map(|n| format!("Content-Length: {n}")),
        Just("Transfer-Encoding: chunked".to_string()),
        Just("Upgrade: websocket".to_string()),
        Just("Connection: Upgrade".to_string()),
        Just("Sec-WebSocket-Version: 13".to_string()),
        Just("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==".to_string()),
        "X-API-Key: [ -~]{0,80}",
        "[ -~]{0,60}",
        ".{0,60}",
        (1usize..40_000).prop_map(|n| format!("X-Big: {}", "a".repeat(n))),
    ];
    let body = prop_oneof![
        vec(any::<u8>(), 0..512),
        Just(b"5\r\nhello\r\n0\r\n\r\n".to_vec()),
        Just(b"zz\r\nbroken".to_vec()),
        valid_body().prop_map(|v| serde_json::to_vec(&v).unwrap()),
    ];
    (method, path, version, vec(header, 0..8), body).prop_map(|(m, p, v, headers, body)| {
        let mut head = format!("{m} {p} {v}\r\nHost: fuzz\r\n").into_bytes();
        for h in headers {
            head.extend_from_slice(h.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        RawCase { head, body }
    })
}

/// The status of the first response in `bytes`, if it starts with one.
fn status_of(bytes: &[u8]) -> Option<u16> {
    let line = bytes.split(|b| *b == b'\r').next()?;
    let text = std::str::from_utf8(line).ok()?;
    text.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
}

async fn check_raw(t: &Target, case: RawCase) -> Result<(), TestCaseError> {
    let before = t.db.event_count().await;
    let mut stream = tokio::net::TcpStream::connect(t.server.addr).await.unwrap();
    let _ = stream.write_all(&case.head).await;
    let _ = stream.write_all(&case.body).await;
    let _ = stream.shutdown().await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(REACTION, stream.read_to_end(&mut got)).await;
    if let Some(status) = status_of(&got) {
        let accepted_broadcast = status == 200 && case.head.starts_with(b"POST /broadcast ");
        if status >= 500 {
            return Err(fail(format!("{status}: {}", String::from_utf8_lossy(&got))));
        }
        let after = t.db.event_count().await;
        if !accepted_broadcast && after != before {
            return Err(fail(format!("{status} but an event was written")));
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
struct Frame {
    fin: bool,
    rsv: u8,
    opcode: u8,
    masked: bool,
    payload: Vec<u8>,
    /// Claim a length other than the payload's.
    lie: Option<u64>,
}

fn encode(f: &Frame) -> Vec<u8> {
    let mut out = vec![(u8::from(f.fin) << 7) | ((f.rsv & 7) << 4) | (f.opcode & 15)];
    let len = f.lie.unwrap_or(f.payload.len() as u64);
    let mask_bit = u8::from(f.masked) << 7;
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if len <= u64::from(u16::MAX) {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    let key = [0x12, 0x34, 0x56, 0x78];
    if f.masked {
        out.extend_from_slice(&key);
    }
    out.extend(
        f.payload
            .iter()
            .enumerate()
            .map(|(i, b)| if f.masked { b ^ key[i % 4] } else { *b }),
    );
    out
}

fn ws_frame() -> impl Strategy<Value = Frame> {
    let payload = prop_oneof![
        4 => vec(any::<u8>(), 0..200),
        1 => vec(any::<u8>(), 4000..9000),
        2 => arb_json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => Just(br#"{"type":"ack","id":1}"#.to_vec()),
    ];
    (
        prop::bool::weighted(0.9),
        prop_oneof![8 => Just(0u8), 1 => 0u8..8],
        prop_oneof![3 => Just(1u8), 1 => Just(2u8), 1 => Just(8u8), 1 => Just(9u8), 1 => Just(10u8), 1 => Just(0u8), 1 => 0u8..16],
        prop::bool::weighted(0.9),
        payload,
        prop_oneof![9 => Just(None), 1 => prop_oneof![Just(u64::MAX), Just(1u64 << 40), 0u64..70_000].prop_map(Some)],
    )
        .prop_map(|(fin, rsv, opcode, masked, payload, lie)| Frame {
            fin,
            rsv,
            opcode,
            masked,
            payload,
            lie,
        })
}

#[derive(Debug, Clone)]
struct WsCase {
    path: String,
    key: Option<String>,
    frames: Vec<Frame>,
    junk: Vec<u8>,
}

fn ws_case() -> impl Strategy<Value = WsCase> {
    let path = prop_oneof![
        6 => Just("/ws/pos/kitchen".to_string()),
        1 => Just("/ws/pos/kitchen?since=0".to_string()),
        1 => "/ws/pos/[a-zA-Z0-9%._~-]{0,20}",
        1 => "/ws/pos/kitchen\\?since=[ -~&&[^ #]]{0,12}",
    ];
    let key = prop_oneof![
        6 => Just(None), // the right key, filled in per run
        1 => "pos_[0-9a-f]{64}".prop_map(Some),
        1 => "[!-~]{0,80}".prop_map(Some),
    ];
    (path, key, vec(ws_frame(), 0..6), vec(any::<u8>(), 0..64)).prop_map(
        |(path, key, frames, junk)| WsCase {
            path,
            key,
            frames,
            junk,
        },
    )
}

async fn check_ws(t: &Target, case: WsCase) -> Result<(), TestCaseError> {
    let before = t.db.event_count().await;
    let key = case.key.clone().unwrap_or_else(|| t.key.clone());
    let mut stream = tokio::net::TcpStream::connect(t.server.addr).await.unwrap();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: fuzz\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nX-API-Key: {key}\r\n\r\n",
        case.path
    );
    let _ = stream.write_all(request.as_bytes()).await;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(WAIT, stream.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => break,
        }
    }
    let status = status_of(&head).ok_or_else(|| fail(format!("no HTTP answer: {head:?}")))?;
    if status >= 500 {
        return Err(fail(format!("upgrade answered {status}")));
    }
    if status == 101 {
        if key != t.key {
            return Err(fail(format!("{key} opened a socket")));
        }
        for f in &case.frames {
            let _ = stream.write_all(&encode(f)).await;
        }
        let _ = stream.write_all(&case.junk).await;
        let mut sink = vec![0u8; 16 * 1024];
        let deadline = tokio::time::Instant::now() + REACTION;
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, stream.read(&mut sink)).await {
            if n == 0 {
                break;
            }
        }
    }
    if t.db.event_count().await != before {
        return Err(fail("a POS frame wrote an event".into()));
    }
    Ok(())
}

fn run_property<S: Strategy>(
    cases: u32,
    strategy: S,
    check: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 200,
        ..Config::default()
    });
    if let Err(e) = runner.run(&strategy, check) {
        panic!("{e}");
    }
}

#[test]
fn hostile_input_never_breaks_the_server() {
    count_server_panics();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(SERVER_THREAD)
        .enable_all()
        .build()
        .unwrap();
    let (target, kitchen, bistro) = rt.block_on(async {
        let db = TestDb::create().await;
        db.tenant("kitchen").await;
        db.tenant("bistro").await;
        let key = db.key("kitchen").await;
        let bistro_key = db.key("bistro").await;
        let server = TestServer::builder(&db)
            .broadcast_token(TOKEN)
            .tuning(|t| {
                // Fuzzing from loopback fails authentication on purpose, many times; the
                // limiter has a test of its own.
                t.auth_failure_limit = 0;
                // Each WebSocket case opens a socket with the one kitchen key and drops it, and
                // the next may connect before the server has seen the last one end; the per-key
                // cap (4) has tests of its own (`bounds`).
                t.max_connections_per_key = 64;
            })
            .start()
            .await;
        let kitchen = Collector::spawn(Pos::connect(&server, "kitchen", &key, None).await);
        let bistro = Collector::spawn(Pos::connect(&server, "bistro", &bistro_key, None).await);
        let target = Target {
            server,
            db,
            key,
            http: reqwest::Client::new(),
        };
        (target, kitchen, bistro)
    });

    run_property(HTTP_CASES, broadcast_case(), |c| {
        rt.block_on(check_broadcast(&target, c))
    });
    run_property(RAW_CASES, raw_case(), |c| {
        rt.block_on(check_raw(&target, c))
    });
    run_property(WS_CASES, ws_case(), |c| rt.block_on(check_ws(&target, c)));

    rt.block_on(async {
        // Still serving: the watchers got exactly the accepted events, a newcomer gets a new one.
        let client = target.db.client().await;
        target.db.wait_numbered().await;
        for (tenant, watcher) in [("kitchen", kitchen), ("bistro", bistro)] {
            let log = event_log(&client, tenant).await;
            watcher.wait_for(log.len(), WAIT).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_exactly_the_log(tenant, &watcher.stop(), &log);
        }
        let mut newcomer = Pos::connect(&target.server, "kitchen", &target.key, None).await;
        let sent = reqwest::Client::new()
            .post(target.server.http("/broadcast"))
            .bearer_auth(TOKEN)
            .json(&json!({"tenant": "kitchen", "event": {"type": "still_serving", "data": 1}}))
            .send()
            .await
            .unwrap();
        assert_eq!(sent.status(), 200);
        assert_eq!(newcomer.next().await["type"], "still_serving");
        assert_eq!(readyz(&target.server).await, 200);
    });
    assert_eq!(
        SERVER_PANICS.load(Ordering::SeqCst),
        0,
        "the server panicked"
    );
    drop(target);
}
