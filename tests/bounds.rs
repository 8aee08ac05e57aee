//! Connection bounds against the real server: clients that trickle request headers or idle on a
//! keep-alive connection are disconnected, and WebSocket connections are capped in total, per
//! key and per tenant (503 with `Retry-After` before the upgrade), exactly under concurrency.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::common::*;

/// Reads from `stream` until the server closes it (end of stream or an error); returns what
/// arrived. Panics if it stays open longer than `within`.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => panic!(
                "the server kept the connection open for {within:?} (received {:?})",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends `GET /healthz` on a raw keep-alive connection and reads its whole response.
async fn get_healthz(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .expect("a content-length");
            if body.len() >= length {
                return text;
            }
        }
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("a response in time")
            .unwrap();
        assert!(n > 0, "closed before the response was complete: {text:?}");
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn headers_trickled_a_byte_a_second_are_cut_off_after_the_header_timeout() {
    let db = TestDb::create().await;
    // Production timeouts: the header deadline is `HEADER_READ_TIMEOUT` (10 s).
    let server = TestServer::builder(&db).start().await;
    let started = Instant::now();
    let stream = TcpStream::connect(server.addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    write
        .write_all(b"GET /healthz HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    });
    // One byte a second of a header that never ends, until the server hangs up (or 30 s pass).
    let trickle = b"st: slowloris-".iter().chain(std::iter::repeat(&b'x'));
    for byte in trickle {
        if reader.is_finished() || started.elapsed() > Duration::from_secs(30) {
            break;
        }
        if write.write_all(&[*byte]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let got = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .expect("the server closed the trickling connection within 30 s")
        .unwrap();
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(35),
        "closed only after {elapsed:?}"
    );
    assert!(
        elapsed >= Duration::from_secs(9),
        "closed after {elapsed:?}, before the 10 s header deadline"
    );
    assert!(
        !String::from_utf8_lossy(&got).contains("200 OK"),
        "the request was never complete, so never answered"
    );
}

#[tokio::test]
async fn idle_and_silent_connections_are_closed_while_keep_alive_and_sockets_still_work() {
    let header = Duration::from_secs(1);
    let idle = Duration::from_secs(3);
    let OneTenant {
        db: _db,
        key,
        server,
    } = one_tenant_with("kitchen", |s| {
        s.tuning(|t| {
            t.http_header_timeout = header;
            t.http_idle_timeout = idle;
        })
    })
    .await;
    let mut pos = Pos::connect(&server, "kitchen", &key, None).await;

    // A connection that never sends a request is closed after the header deadline.
    let opened = Instant::now();
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let got = read_until_closed(&mut silent, WAIT).await;
    assert!(got.is_empty(), "nothing is answered: {got:?}");
    assert!(opened.elapsed() >= header - Duration::from_millis(50));

    // Keep-alive: a second request after a pause longer than the header deadline (but
    // shorter than the idle deadline) is served on the same connection.
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    assert!(get_healthz(&mut stream).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(header + header / 2).await;
    assert!(get_healthz(&mut stream).await.starts_with("HTTP/1.1 200"));
    // Then nothing: the server closes the connection once it has been idle for `idle`.
    let answered = Instant::now();
    let got = read_until_closed(&mut stream, idle + WAIT).await;
    assert!(got.is_empty(), "nothing more is sent: {got:?}");
    let waited = answered.elapsed();
    assert!(
        waited >= idle - Duration::from_millis(50),
        "closed after {waited:?} of idleness, before the {idle:?} idle deadline"
    );

    // The WebSocket, silent for longer than both deadlines, is neither: it is a socket now.
    server
        .broadcast(
            &serde_json::json!({"tenant": "kitchen", "event": {"type": "still_open", "data": 1}}),
        )
        .await;
    assert_eq!(pos.next().await["type"], "still_open");
}

/// The outcome of one WebSocket connection attempt: the open socket, or the refusal's status
/// and `Retry-After`.
async fn attempt(
    server: &TestServer,
    tenant: &str,
    key: &str,
) -> Result<Pos, (u16, Option<String>)> {
    let mut req = server
        .ws(&format!("/ws/pos/{tenant}"))
        .into_client_request()
        .unwrap();
    req.headers_mut().insert("X-API-Key", key.parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(Pos { ws }),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err((
            resp.status().as_u16(),
            resp.headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned()),
        )),
        Err(e) => panic!("unexpected connect error: {e}"),
    }
}

/// Connects as soon as a slot is free (a closed socket's slot is released when the server has
/// noticed the close).
async fn connect_when_free(server: &TestServer, tenant: &str, key: &str) -> Pos {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match attempt(server, tenant, key).await {
            Ok(pos) => return pos,
            Err((503, _)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(refused) => panic!("still refused after {WAIT:?}: {refused:?}"),
        }
    }
}

async fn refused(server: &TestServer, reason: &str) -> f64 {
    metric(
        server,
        &format!("orderpush_connections_refused_total{{reason=\"{reason}\"}}"),
    )
    .await
}

#[tokio::test]
async fn a_fifth_connection_with_one_key_is_refused_503_until_one_closes() {
    // Production caps: 4 per key.
    let OneTenant { db, key, server } = one_tenant("kitchen").await;
    let other_key = db.key("kitchen").await;
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(
            attempt(&server, "kitchen", &key)
                .await
                .expect("within the cap"),
        );
    }
    assert_eq!(refused(&server, "key").await, 0.0);
    let (status, retry_after) = attempt(&server, "kitchen", &key).await.err().unwrap();
    assert_eq!(status, 503);
    let retry_after: u64 = retry_after.expect("a Retry-After header").parse().unwrap();
    assert!(retry_after >= 1, "Retry-After: {retry_after}");
    assert_eq!(refused(&server, "key").await, 1.0);
    assert_eq!(refused(&server, "tenant").await, 0.0);
    assert_eq!(refused(&server, "total").await, 0.0);
    // The refusal came before the upgrade, with the JSON error body and nothing opened.
    assert_eq!(metric(&server, "orderpush_connections").await, 4.0);

    // The cap is per key: the tenant's other terminal still connects.
    let mut other = attempt(&server, "kitchen", &other_key)
        .await
        .expect("another key");

    // Closing one socket frees its slot.
    let mut closing = open.pop().unwrap();
    closing.ws.close(None).await.unwrap();
    drop(closing);
    open.push(connect_when_free(&server, "kitchen", &key).await);
    assert_eq!(
        attempt(&server, "kitchen", &key).await.err().map(|e| e.0),
        Some(503),
        "full again"
    );

    // Every open socket still works.
    server
        .broadcast(&serde_json::json!({"tenant": "kitchen", "event": {"type": "x", "data": 1}}))
        .await;
    for pos in open.iter_mut().chain([&mut other]) {
        assert_eq!(pos.next().await["type"], "x");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_key_cap_is_exact_under_concurrency_and_abandoned_upgrades_free_their_slots() {
    let OneTenant {
        db: _db,
        key,
        server,
    } = one_tenant("kitchen").await;

    // Twelve at once with one key: exactly four get a socket, whatever the interleaving.
    let attempts = (0..12).map(|_| attempt(&server, "kitchen", &key));
    let results = futures_util::future::join_all(attempts).await;
    let refusals: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(results.len() - refusals.len(), 4, "{refusals:?}");
    assert!(
        refusals
            .iter()
            .all(|(status, retry)| *status == 503 && retry.is_some()),
        "{refusals:?}"
    );
    assert_eq!(refused(&server, "key").await, 8.0);
    for pos in results.into_iter().flatten() {
        let mut pos = pos;
        pos.ws.close(None).await.unwrap();
    }

    // Upgrades abandoned at once (the request sent, the socket reset without reading the
    // answer): their slots come back, whether the upgrade completed or never did.
    for _ in 0..12 {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        let request = format!(
            "GET /ws/pos/kitchen HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\nX-API-Key: {key}\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        stream.set_zero_linger().unwrap();
        drop(stream);
    }
    // A leaked slot would never come back: four sockets open again, and a fifth is refused.
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(connect_when_free(&server, "kitchen", &key).await);
    }
    assert_eq!(
        attempt(&server, "kitchen", &key).await.err().map(|e| e.0),
        Some(503)
    );
}

#[tokio::test]
async fn tenant_and_total_caps_refuse_503_and_count_their_reason() {
    let db = TestDb::create().await;
    for t in ["kitchen", "bistro", "cafe"] {
        db.tenant(t).await;
    }
    let server = TestServer::builder(&db)
        .tuning(|t| {
            t.max_connections_per_tenant = 2;
            t.max_connections = 3;
        })
        .start()
        .await;
    let k1 = db.key("kitchen").await;
    let k2 = db.key("kitchen").await;
    let k3 = db.key("kitchen").await;
    let b1 = db.key("bistro").await;
    let c1 = db.key("cafe").await;

    let _kitchen_1 = attempt(&server, "kitchen", &k1)
        .await
        .expect("1st of kitchen");
    let _kitchen_2 = attempt(&server, "kitchen", &k2)
        .await
        .expect("2nd of kitchen");
    let (status, retry_after) = attempt(&server, "kitchen", &k3).await.err().unwrap();
    assert_eq!((status, retry_after.is_some()), (503, true));
    assert_eq!(refused(&server, "tenant").await, 1.0);

    // Another tenant is not affected by kitchen's cap...
    let mut bistro = attempt(&server, "bistro", &b1).await.expect("bistro");
    // ...but the instance is now full (3 in total).
    let (status, retry_after) = attempt(&server, "cafe", &c1).await.err().unwrap();
    assert_eq!((status, retry_after.is_some()), (503, true));
    assert_eq!(refused(&server, "total").await, 1.0);
    assert_eq!(refused(&server, "key").await, 0.0);

    // A refused key is still a valid one: nothing was counted against it.
    drop(_kitchen_2);
    let _kitchen_3 = connect_when_free(&server, "kitchen", &k3).await;
    server
        .broadcast(&serde_json::json!({"tenant": "bistro", "event": {"type": "y", "data": 1}}))
        .await;
    assert_eq!(bistro.next().await["type"], "y");
}
