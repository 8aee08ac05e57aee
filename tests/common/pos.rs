//! POS terminals: real WebSocket clients of the server, well-behaved ([`Pos`], [`Collector`])
//! or misbehaving below the WebSocket library ([`raw_ws_connect`], [`connect_small_buffer`]).

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{TestServer, WAIT};

/// A POS terminal: a real WebSocket client.
pub(crate) struct Pos {
    pub(crate) ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What a WebSocket connection attempt got back, when it was refused.
pub(crate) async fn connect_status(server: &TestServer, path: &str, key: Option<&str>) -> u16 {
    let mut req = server.ws(path).into_client_request().unwrap();
    if let Some(k) = key {
        req.headers_mut().insert("X-API-Key", k.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("unexpected connect error: {e}"),
    }
}

impl Pos {
    /// Connects to `tenant`'s stream, resuming after `since` when given.
    pub(crate) async fn connect(
        server: &TestServer,
        tenant: &str,
        key: &str,
        since: Option<i64>,
    ) -> Self {
        let query = since.map_or(String::new(), |s| format!("?since={s}"));
        Self::join(server, tenant, key, &query).await
    }

    /// Connects to `tenant`'s stream with a query string of its own (`""` or `"?…"`), e.g.
    /// `"?snapshot=open&types=new_order"`.
    pub(crate) async fn join(server: &TestServer, tenant: &str, key: &str, query: &str) -> Self {
        let path = format!("/ws/pos/{tenant}{query}");
        let mut req = server.ws(&path).into_client_request().unwrap();
        req.headers_mut().insert("X-API-Key", key.parse().unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .expect("websocket connects");
        Self { ws }
    }

    /// The next event frame, parsed (pings and pongs skipped). Panics after [`WAIT`].
    pub(crate) async fn next(&mut self) -> Value {
        self.next_within(WAIT)
            .await
            .expect("an event arrives in time")
    }

    /// The next event frame within `d`, or None.
    pub(crate) async fn next_within(&mut self, d: Duration) -> Option<Value> {
        self.next_raw_within(d)
            .await
            .map(|t| serde_json::from_str(&t).expect("frame is JSON"))
    }

    /// The next text frame as sent, within `d`, or None; `ready` (the control frame that says
    /// the socket caught up, sent once per connection) is skipped: see [`Pos::next_frame_within`].
    pub(crate) async fn next_raw_within(&mut self, d: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let text = self.next_frame_within(remaining).await?;
            if !is_ready(&text) {
                return Some(text);
            }
        }
    }

    /// The next text frame as sent, `ready` included, within `d`, or None.
    pub(crate) async fn next_frame_within(&mut self, d: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()??;
            match msg.expect("websocket read") {
                Message::Text(t) => return Some(t.to_string()),
                Message::Close(c) => panic!("closed while waiting for an event: {c:?}"),
                _ => continue,
            }
        }
    }

    /// Every event frame until the socket closes (`ready` skipped), parsed, and the close code
    /// (None if the stream just ended). Panics if nothing arrives for [`WAIT`].
    pub(crate) async fn events_until_close(&mut self) -> (Vec<Value>, Option<u16>) {
        let mut events = Vec::new();
        loop {
            match tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame or a close")
            {
                Some(Ok(Message::Text(t))) if is_ready(&t) => {}
                Some(Ok(Message::Text(t))) => {
                    events.push(serde_json::from_str(&t).expect("frame is JSON"))
                }
                Some(Ok(Message::Close(c))) => return (events, c.map(|c| u16::from(c.code))),
                Some(Ok(_)) => {}
                None | Some(Err(_)) => return (events, None),
            }
        }
    }

    /// Reads until a close frame arrives; returns its code (None if the stream just ended).
    pub(crate) async fn close_code(&mut self, d: Duration) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => panic!("no close within {d:?}"),
                Ok(None) | Ok(Some(Err(_))) => return None,
                Ok(Some(Ok(Message::Close(c)))) => return c.map(|c| u16::from(c.code)),
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    pub(crate) async fn send_text(&mut self, s: &str) {
        self.ws.send(Message::Text(s.into())).await.unwrap();
    }
}

/// Performs the WebSocket upgrade by hand on a plain TCP socket and returns the socket after
/// the 101, for clients that must misbehave below the WebSocket library (never reading, never
/// answering pings, sending malformed frames). `rcvbuf` shrinks the socket's receive buffer.
pub(crate) async fn raw_ws_connect(
    addr: SocketAddr,
    path: &str,
    key: &str,
    rcvbuf: Option<u32>,
) -> TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(size) = rcvbuf {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let mut stream = socket.connect(addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         X-API-Key: {key}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    // Read the response head byte by byte, so no frame byte after it is consumed.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(WAIT, stream.read(&mut b))
            .await
            .expect("upgrade response in time")
            .unwrap();
        assert!(n == 1, "connection closed during the upgrade");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
    stream
}

/// A WebSocket client whose socket has a small receive buffer, so that a test can make the
/// server's per-client queue fill without pushing megabytes through kernel buffers first.
pub(crate) async fn connect_small_buffer(
    server: &TestServer,
    path: &str,
    key: &str,
    rcvbuf: u32,
) -> Pos {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(rcvbuf).unwrap();
    let stream = socket.connect(server.addr).await.unwrap();
    let mut req = server.ws(path).into_client_request().unwrap();
    req.headers_mut().insert("X-API-Key", key.parse().unwrap());
    let (ws, _) = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(stream))
        .await
        .expect("websocket connects");
    Pos { ws }
}

/// True for the `ready` control frame (docs/protocol.md): not an event.
pub(crate) fn is_ready(frame: &str) -> bool {
    frame.starts_with(r#"{"type":"ready","#)
}

/// Reads a POS socket on a task of its own, keeping every event frame, so a test can write
/// for a while and check what arrived afterwards (without the socket's queue overflowing).
pub(crate) struct Collector {
    events: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    task: JoinHandle<Option<u16>>,
}

impl Collector {
    /// Starts reading `pos` until its socket closes.
    pub(crate) fn spawn(mut pos: Pos) -> Self {
        let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&events);
        let task = tokio::spawn(async move {
            loop {
                match pos.ws.next().await {
                    Some(Ok(Message::Text(t))) if is_ready(&t) => {}
                    Some(Ok(Message::Text(t))) => sink
                        .lock()
                        .unwrap()
                        .push(serde_json::from_str(&t).expect("frame is JSON")),
                    Some(Ok(Message::Close(c))) => return c.map(|c| u16::from(c.code)),
                    Some(Ok(_)) => {}
                    None | Some(Err(_)) => return None,
                }
            }
        });
        Self { events, task }
    }

    /// Events received so far.
    pub(crate) fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    /// Waits until at least `n` events have arrived; panics (saying how many did) otherwise.
    pub(crate) async fn wait_for(&self, n: usize, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let have = self.events.lock().unwrap().len();
            if have >= n {
                return;
            }
            assert!(
                !self.task.is_finished(),
                "the socket closed after {have} of {n} events"
            );
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {have} of {n} events arrived within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// True while the socket is open.
    pub(crate) fn is_open(&self) -> bool {
        !self.task.is_finished()
    }

    /// Stops reading and returns everything received.
    pub(crate) fn stop(self) -> Vec<Value> {
        self.task.abort();
        self.events()
    }
}
