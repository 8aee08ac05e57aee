//! Connection bounds against the real server: clients that trickle request headers or idle on a
//! keep-alive connection are disconnected.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
    let server = TestServer::start(&db).await;
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
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let key = db.key("kitchen").await;
    let header = Duration::from_secs(1);
    let idle = Duration::from_secs(3);
    let server = TestServer::start_with(&db, |c| {
        c.tuning.http_header_timeout = header;
        c.tuning.http_idle_timeout = idle;
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
