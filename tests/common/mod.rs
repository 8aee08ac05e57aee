//! Shared test harness: a fresh database per test, the real server on port 0, and real
//! WebSocket/HTTP clients over loopback.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use orderpush::config::Tuning;
use orderpush::server::{self, ServerConfig};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_postgres::NoTls;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

/// An admin connection (to the database named in [`admin_url`]).
pub async fn admin() -> tokio_postgres::Client {
    connect(&admin_url().parse().unwrap()).await
}

/// Where the tests create their databases: an admin connection to an existing database.
pub fn admin_url() -> String {
    std::env::var("ORDERPUSH_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// How long a test waits for something that should happen promptly before failing.
pub const WAIT: Duration = Duration::from_secs(15);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A database of its own, migrated, dropped when the test ends.
pub struct TestDb {
    pub name: String,
    pub config: tokio_postgres::Config,
}

impl TestDb {
    pub async fn create() -> Self {
        let db = Self::create_empty().await;
        orderpush::db::migrate::run(&db.config)
            .await
            .expect("migrations apply");
        db
    }

    /// A database of its own with nothing in it (no migrations applied).
    pub async fn create_empty() -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("orderpush_test_{}_{n}", std::process::id());
        let admin = connect(&admin_url().parse().unwrap()).await;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let mut config: tokio_postgres::Config = admin_url().parse().unwrap();
        config.dbname(&name);
        Self { name, config }
    }

    pub fn url(&self) -> String {
        let mut url = admin_url();
        let cut = url.rfind('/').unwrap();
        url.truncate(cut + 1);
        url.push_str(&self.name);
        url
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.config).await
    }

    /// Adds a tenant.
    pub async fn tenant(&self, slug: &str) {
        self.client()
            .await
            .execute("INSERT INTO tenants (slug, name) VALUES ($1, $1)", &[&slug])
            .await
            .unwrap();
    }

    /// Creates a POS key for a tenant and returns the secret.
    pub async fn key(&self, tenant: &str) -> String {
        let c = self.client().await;
        orderpush::db::keys::create(&c, tenant, Some("test"))
            .await
            .unwrap()
            .secret
    }

    /// Number of events in the log (the markers a tenant's log may start with excluded).
    pub async fn event_count(&self) -> i64 {
        self.client()
            .await
            .query_one("SELECT count(*) FROM orderpush.events WHERE id > 0", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// Rows written by the application (or /broadcast) that no sequencer has numbered yet.
    pub async fn staged_count(&self) -> i64 {
        self.client()
            .await
            .query_one("SELECT count(*) FROM orderpush.staged", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// Waits until a running server's sequencer has numbered every staged row: the log then
    /// holds every event of every committed write.
    pub async fn wait_numbered(&self) {
        wait_numbered_on(&self.client().await).await;
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Best effort, on a thread of its own: Drop cannot await, and the test's runtime may be
        // shutting down.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok((c, conn)) = tokio_postgres::connect(&admin_url(), NoTls).await {
                    tokio::spawn(conn);
                    let _ = c
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

pub async fn connect(config: &tokio_postgres::Config) -> tokio_postgres::Client {
    let (client, conn) = config
        .connect(NoTls)
        .await
        .expect("connect to test Postgres");
    tokio::spawn(conn);
    client
}

/// Waits until every staged row of the database `client` is connected to is numbered (a server
/// must be running).
pub async fn wait_numbered_on(client: &tokio_postgres::Client) {
    eventually("every staged row is numbered", WAIT, || async {
        client
            .query_one("SELECT count(*) FROM orderpush.staged", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 0
    })
    .await;
}

/// Numbers every staged row by running a server until its sequencer has, then stopping it: for
/// tests that prepare the event log before the server under test starts.
pub async fn number_staged(db: &TestDb) {
    let server = TestServer::start(db).await;
    db.wait_numbered().await;
    server.stop().await;
}

/// A running orderpush on 127.0.0.1:<random port>.
pub struct TestServer {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    handle: Option<JoinHandle<Result<(), server::ServerError>>>,
}

impl TestServer {
    pub async fn start(db: &TestDb) -> Self {
        Self::start_with(db, |_| {}).await
    }

    pub async fn start_with(db: &TestDb, adjust: impl FnOnce(&mut ServerConfig)) -> Self {
        Self::start_at(db, "127.0.0.1:0".parse().unwrap(), adjust).await
    }

    /// Starts on a given address (e.g. the one a stopped server had, to test reconnection).
    pub async fn start_at(
        db: &TestDb,
        bind: SocketAddr,
        adjust: impl FnOnce(&mut ServerConfig),
    ) -> Self {
        Self::start_on_at(db.config.clone(), bind, adjust).await
    }

    /// A server on any database (e.g. a private cluster's), migrated at start.
    pub async fn start_on(
        database: tokio_postgres::Config,
        adjust: impl FnOnce(&mut ServerConfig),
    ) -> Self {
        Self::start_on_at(database, "127.0.0.1:0".parse().unwrap(), adjust).await
    }

    async fn start_on_at(
        database: tokio_postgres::Config,
        bind: SocketAddr,
        adjust: impl FnOnce(&mut ServerConfig),
    ) -> Self {
        let mut config = ServerConfig {
            database,
            broadcast_token: None,
            admin_token: None,
            retention: Duration::from_secs(86_400),
            migrate: true,
            tuning: Tuning::default(),
        };
        adjust(&mut config);
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .expect("the address is free");
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(server::run(listener, config, shutdown.clone()));
        let server = Self {
            addr,
            shutdown,
            handle: Some(handle),
        };
        server.wait_ready().await;
        server
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Waits until /readyz says the listener is following.
    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(r) = reqwest::get(self.http("/readyz")).await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "server did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Requests shutdown and waits for the server to finish.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(20), h)
                .await
                .expect("server stops in time")
                .unwrap()
                .unwrap();
        }
    }

    /// POSTs a JSON body to /broadcast.
    pub async fn broadcast(&self, body: &Value) -> (u16, Value) {
        let r = reqwest::Client::new()
            .post(self.http("/broadcast"))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A POS terminal: a real WebSocket client.
pub struct Pos {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What a WebSocket connection attempt got back, when it was refused.
pub async fn connect_status(server: &TestServer, path: &str, key: Option<&str>) -> u16 {
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
    pub async fn connect(server: &TestServer, tenant: &str, key: &str, since: Option<i64>) -> Self {
        let path = match since {
            Some(s) => format!("/ws/pos/{tenant}?since={s}"),
            None => format!("/ws/pos/{tenant}"),
        };
        let mut req = server.ws(&path).into_client_request().unwrap();
        req.headers_mut().insert("X-API-Key", key.parse().unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .expect("websocket connects");
        Self { ws }
    }

    /// The next event frame, parsed (pings and pongs skipped). Panics after [`WAIT`].
    pub async fn next(&mut self) -> Value {
        self.next_within(WAIT)
            .await
            .expect("an event arrives in time")
    }

    /// The next event frame within `d`, or None.
    pub async fn next_within(&mut self, d: Duration) -> Option<Value> {
        self.next_raw_within(d)
            .await
            .map(|t| serde_json::from_str(&t).expect("frame is JSON"))
    }

    /// The next text frame as sent, within `d`, or None; `ready` (the control frame that says
    /// the socket caught up, sent once per connection) is skipped: see [`Pos::next_frame_within`].
    pub async fn next_raw_within(&mut self, d: Duration) -> Option<String> {
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
    pub async fn next_frame_within(&mut self, d: Duration) -> Option<String> {
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

    /// Reads until a close frame arrives; returns its code (None if the stream just ended).
    pub async fn close_code(&mut self, d: Duration) -> Option<u16> {
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

    pub async fn send_text(&mut self, s: &str) {
        self.ws.send(Message::Text(s.into())).await.unwrap();
    }
}

/// Inserts an online order with items in one transaction (items after the order row).
pub async fn insert_order(
    client: &mut tokio_postgres::Client,
    tenant: &str,
    number: &str,
    items: usize,
) -> String {
    let tx = client.transaction().await.unwrap();
    let row = tx
        .query_one(
            "INSERT INTO orders (tenant_slug, order_number, customer_name, order_type, order_source, status, total_amount)
             VALUES ($1, $2, 'Test', 'delivery', 'online', 'confirmed', 10.00) RETURNING id::text",
            &[&tenant, &number],
        )
        .await
        .unwrap();
    let id: String = row.get(0);
    for i in 0..items {
        tx.execute(
            "INSERT INTO order_items (order_id, menu_item_id, name, quantity, price) VALUES ($1::text::uuid, $2, $3, 1, 5.00)",
            &[&id, &format!("item-{i}"), &format!("Item {i}")],
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    id
}

/// Inserts a loyalty transaction (one `loyalty_updated` event).
pub async fn insert_loyalty(client: &tokio_postgres::Client, tenant: &str, points: i32) {
    client
        .execute(
            "INSERT INTO loyalty_transactions (tenant_slug, customer_id, points_change, new_balance, transaction_type)
             VALUES ($1, 'cust', $2, $2, 'earned')",
            &[&tenant, &points],
        )
        .await
        .unwrap();
}

/// Inserts an online order and its items in one statement (one round trip, one transaction,
/// items inserted after the order row). Returns nothing: the event carries the order number.
pub async fn insert_order_fast(
    client: &tokio_postgres::Client,
    tenant: &str,
    number: &str,
    items: i32,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "WITH o AS (
                 INSERT INTO orders (tenant_slug, order_number, customer_name, order_type, order_source, status, total_amount)
                 VALUES ($1, $2, 'Test', 'delivery', 'online', 'confirmed', 10.00) RETURNING id)
             INSERT INTO order_items (order_id, menu_item_id, name, quantity, price)
             SELECT o.id, 'item-' || i, 'Item ' || i, 1, 5.00 FROM o, generate_series(1, $3) AS i",
            &[&tenant, &number, &items],
        )
        .await
        .map(|_| ())
}

/// The backends of orderpush listeners connected to database `db`.
pub async fn listener_pids(client: &tokio_postgres::Client, db: &str) -> Vec<i32> {
    session_pids(client, db, "orderpush-listener").await
}

/// The backends connected to database `db` under this `application_name`.
pub async fn session_pids(client: &tokio_postgres::Client, db: &str, app: &str) -> Vec<i32> {
    client
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name = $2",
            &[&db, &app],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Terminates the elected sequencer's backend (and every standby's) on database `db`, whatever
/// it is doing: between batches or in the middle of one. Returns how many.
pub async fn kill_sequencers(client: &tokio_postgres::Client, db: &str) -> usize {
    let pids = session_pids(client, db, "orderpush-sequencer").await;
    for pid in &pids {
        client
            .execute("SELECT pg_terminate_backend($1)", &[pid])
            .await
            .unwrap();
    }
    pids.len()
}

/// Terminates every orderpush listener connected to database `db`; returns how many.
pub async fn kill_listeners(client: &tokio_postgres::Client, db: &str) -> usize {
    let pids = listener_pids(client, db).await;
    for pid in &pids {
        client
            .execute("SELECT pg_terminate_backend($1)", &[pid])
            .await
            .unwrap();
    }
    pids.len()
}

/// Polls `check` every 20 ms until it holds; panics with `what` after `within`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// GET /readyz's status code (0 when the request failed).
pub async fn readyz(server: &TestServer) -> u16 {
    match reqwest::get(server.http("/readyz")).await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// The value of one series in /metrics, e.g.
/// `orderpush_disconnects_total{reason="slow_consumer"}` (0 when absent).
pub async fn metric(server: &TestServer, series: &str) -> f64 {
    metric_opt(server, series).await.unwrap_or(0.0)
}

/// The value of one series in /metrics, or `None` when it is not rendered.
pub async fn metric_opt(server: &TestServer, series: &str) -> Option<f64> {
    let text = reqwest::get(server.http("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Runs the real `orderpush` binary against a test database.
pub fn orderpush_cli(db: &TestDb, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_orderpush"))
        .args(args)
        .env("DATABASE_URL", db.url())
        .env("RUST_LOG", "warn")
        .output()
        .expect("the binary runs")
}

/// Command output as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A tenant's whole retained event log as `{id, type, tenant, data}` objects, in id order:
/// what every client of the tenant must have received, exactly once, in this order.
pub async fn event_log(client: &tokio_postgres::Client, tenant: &str) -> Vec<Value> {
    client
        .query(
            "SELECT id, type, data::text FROM orderpush.events WHERE tenant_slug = $1 AND id > 0 ORDER BY id",
            &[&tenant],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let data: String = r.get(2);
            serde_json::json!({
                "id": r.get::<_, i64>(0),
                "type": r.get::<_, String>(1),
                "tenant": tenant,
                "data": serde_json::from_str::<Value>(&data).unwrap(),
            })
        })
        .collect()
}

/// Asserts that `got` (frames as received) is exactly `log` (from [`event_log`]): every
/// committed event once, in id order, with the committed content, and nothing else.
pub fn assert_exactly_the_log(who: &str, got: &[Value], log: &[Value]) {
    let ids: Vec<i64> = got.iter().map(|e| e["id"].as_i64().unwrap_or(-1)).collect();
    let want: Vec<i64> = log.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    if ids != want {
        let first_diff = ids.iter().zip(&want).position(|(a, b)| a != b);
        panic!(
            "{who}: received {} events, the log has {}; first difference at index {first_diff:?} \
             (received around it: {:?})",
            ids.len(),
            want.len(),
            first_diff.map(|i| &ids[i.saturating_sub(3)..(i + 3).min(ids.len())])
        );
    }
    for (g, w) in got.iter().zip(log) {
        for field in ["type", "tenant", "data"] {
            assert_eq!(g[field], w[field], "{who}: {field} of event {}", w["id"]);
        }
    }
}

/// A port that was free a moment ago (for processes that must bind it themselves).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Performs the WebSocket upgrade by hand on a plain TCP socket and returns the socket after
/// the 101, for clients that must misbehave below the WebSocket library (never reading, never
/// answering pings, sending malformed frames). `rcvbuf` shrinks the socket's receive buffer.
pub async fn raw_ws_connect(
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
pub async fn connect_small_buffer(server: &TestServer, path: &str, key: &str, rcvbuf: u32) -> Pos {
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
pub fn is_ready(frame: &str) -> bool {
    frame.starts_with(r#"{"type":"ready","#)
}

/// Reads a POS socket on a task of its own, keeping every event frame, so a test can write
/// for a while and check what arrived afterwards (without the socket's queue overflowing).
pub struct Collector {
    events: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    task: JoinHandle<Option<u16>>,
}

impl Collector {
    /// Starts reading `pos` until its socket closes.
    pub fn spawn(mut pos: Pos) -> Self {
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
    pub fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    /// Waits until at least `n` events have arrived; panics (saying how many did) otherwise.
    pub async fn wait_for(&self, n: usize, within: Duration) {
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
    pub fn is_open(&self) -> bool {
        !self.task.is_finished()
    }

    /// Stops reading and returns everything received.
    pub fn stop(self) -> Vec<Value> {
        self.task.abort();
        self.events()
    }
}

/// A child process that prints JSON documents on stdout (one per line or pretty-printed): the
/// documents and the stderr lines arrive on channels; killed on drop.
pub struct JsonChild {
    child: std::process::Child,
    docs: std::sync::mpsc::Receiver<Value>,
    lines: std::sync::mpsc::Receiver<String>,
    /// Every stderr line read so far.
    pub stderr: Vec<String>,
}

impl JsonChild {
    /// Spawns `cmd` with piped stdout and stderr.
    pub fn spawn(mut cmd: std::process::Command) -> Self {
        use std::io::{BufRead, BufReader};
        use std::process::Stdio;
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (dtx, docs) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        // A stream of documents: works for one-per-line and for pretty JSON spanning lines.
        std::thread::spawn(move || {
            for v in serde_json::Deserializer::from_reader(stdout).into_iter::<Value>() {
                match v {
                    Ok(v) => {
                        let _ = dtx.send(v);
                    }
                    Err(_) => break,
                }
            }
        });
        let (ltx, lines) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = ltx.send(line);
            }
        });
        Self {
            child,
            docs,
            lines,
            stderr: Vec::new(),
        }
    }

    fn drain(&mut self) {
        while let Ok(l) = self.lines.try_recv() {
            self.stderr.push(l);
        }
    }

    /// The next document; panics (with the stderr so far) after twice [`WAIT`].
    pub async fn next_event(&mut self) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT * 2;
        loop {
            if let Ok(v) = self.docs.try_recv() {
                return v;
            }
            self.drain();
            assert!(
                tokio::time::Instant::now() < deadline,
                "no event; stderr:\n{}",
                self.stderr.join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until a stderr line contains `needle`.
    pub async fn expect_stderr(&mut self, needle: &str) {
        let deadline = tokio::time::Instant::now() + WAIT * 2;
        while !self.stderr.iter().any(|l| l.contains(needle)) {
            self.drain();
            assert!(
                tokio::time::Instant::now() < deadline,
                "no stderr line with {needle:?}:\n{}",
                self.stderr.join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until a stderr line contains `needle`, then hands the process back.
    pub async fn after_stderr(mut self, needle: &str) -> Self {
        self.expect_stderr(needle).await;
        self
    }

    /// Waits for the process to exit by itself; returns (exit code, stderr).
    pub async fn exit(&mut self) -> (Option<i32>, String) {
        let deadline = tokio::time::Instant::now() + WAIT;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the process kept running (a retry loop?):\n{}",
                self.stderr.join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.drain();
        (status.code(), self.stderr.join("\n"))
    }
}

impl Drop for JsonChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Tenants `kitchen` and `bistro`, a server, and one live POS on each tenant.
pub async fn kitchen_and_bistro(db: &TestDb) -> (TestServer, Pos, Pos) {
    db.tenant("kitchen").await;
    db.tenant("bistro").await;
    let server = TestServer::start(db).await;
    let kitchen = Pos::connect(&server, "kitchen", &db.key("kitchen").await, None).await;
    let bistro = Pos::connect(&server, "bistro", &db.key("bistro").await, None).await;
    (server, kitchen, bistro)
}
