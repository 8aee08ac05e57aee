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

    /// Number of rows in the event log.
    pub async fn event_count(&self) -> i64 {
        self.client()
            .await
            .query_one("SELECT count(*) FROM orderpush.events", &[])
            .await
            .unwrap()
            .get(0)
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
        let mut config = ServerConfig {
            database: db.config.clone(),
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

    /// The next text frame as sent, within `d`, or None.
    pub async fn next_raw_within(&mut self, d: Duration) -> Option<String> {
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
