//! The real server on 127.0.0.1, started through [`TestServer::builder`], and what tests ask
//! it over HTTP (readiness, metrics, JSON endpoints).

use std::net::SocketAddr;
use std::time::Duration;

use orderpush::config::Tuning;
use orderpush::server::{self, ServerConfig};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{TestDb, WAIT};

/// Presence written every 200 ms instead of 2 s, so tests wait less for it.
pub(crate) const FAST_PRESENCE: Duration = Duration::from_millis(200);

/// Tuning for tests that watch presence: [`FAST_PRESENCE`].
pub(crate) fn fast_presence(t: &mut Tuning) {
    t.presence_interval = FAST_PRESENCE;
}

/// A running orderpush on 127.0.0.1:<random port> (or the address given to the builder).
pub(crate) struct TestServer {
    /// Where it listens.
    pub(crate) addr: SocketAddr,
    /// Cancelling it shuts the server down (as SIGTERM would).
    pub(crate) shutdown: CancellationToken,
    handle: Option<JoinHandle<Result<(), server::ServerError>>>,
}

/// How a [`TestServer`] is configured before it starts: production defaults, migrations
/// applied at start, no tokens, a day of retention, port 0.
pub(crate) struct TestServerBuilder {
    config: ServerConfig,
    bind: SocketAddr,
}

impl TestServer {
    /// A server on `database` (a `&TestDb`, or any database's config).
    pub(crate) fn builder(database: impl Into<tokio_postgres::Config>) -> TestServerBuilder {
        TestServerBuilder {
            config: ServerConfig {
                database: database.into(),
                broadcast_token: None,
                admin_token: None,
                retention: Duration::from_secs(86_400),
                migrate: true,
                tuning: Tuning::default(),
            },
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }

    /// `http://addr{path}`.
    pub(crate) fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `ws://addr{path}`.
    pub(crate) fn ws(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Waits until /readyz says the listener is following.
    pub(crate) async fn wait_ready(&self) {
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
    pub(crate) async fn stop(mut self) {
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
    pub(crate) async fn broadcast(&self, body: &Value) -> (u16, Value) {
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

impl TestServerBuilder {
    /// Adjusts the intervals and bounds, e.g. `.tuning(|t| t.max_replay_rows = 100)`.
    pub(crate) fn tuning(mut self, adjust: impl FnOnce(&mut Tuning)) -> Self {
        adjust(&mut self.config.tuning);
        self
    }

    /// Requires this bearer token on /broadcast.
    pub(crate) fn broadcast_token(mut self, token: &str) -> Self {
        self.config.broadcast_token = Some(token.into());
        self
    }

    /// Requires this bearer token on /admin and /status.
    pub(crate) fn admin_token(mut self, token: &str) -> Self {
        self.config.admin_token = Some(token.into());
        self
    }

    /// Connects to the database as this role instead of the admin URL's.
    pub(crate) fn user(mut self, role: &str) -> Self {
        self.config.database.user(role);
        self
    }

    /// Whether the server applies the migrations at start (it does by default).
    pub(crate) fn migrate(mut self, migrate: bool) -> Self {
        self.config.migrate = migrate;
        self
    }

    /// Listens on this address (e.g. the one a stopped server had, to test reconnection).
    pub(crate) fn bind(mut self, addr: SocketAddr) -> Self {
        self.bind = addr;
        self
    }

    /// Starts the server and waits until it is ready.
    pub(crate) async fn start(self) -> TestServer {
        let listener = tokio::net::TcpListener::bind(self.bind)
            .await
            .expect("the address is free");
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(server::run(listener, self.config, shutdown.clone()));
        let server = TestServer {
            addr,
            shutdown,
            handle: Some(handle),
        };
        server.wait_ready().await;
        server
    }
}

/// Numbers every staged row by running a server until its sequencer has, then stopping it: for
/// tests that prepare the event log before the server under test starts.
pub(crate) async fn number_staged(db: &TestDb) {
    let server = TestServer::builder(db).start().await;
    db.wait_numbered().await;
    server.stop().await;
}

/// GET /readyz's status code (0 when the request failed).
pub(crate) async fn readyz(server: &TestServer) -> u16 {
    match reqwest::get(server.http("/readyz")).await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// The value of one series in /metrics, e.g.
/// `orderpush_disconnects_total{reason="slow_consumer"}` (0 when absent).
pub(crate) async fn metric(server: &TestServer, series: &str) -> f64 {
    metric_opt(server, series).await.unwrap_or(0.0)
}

/// The value of one series in /metrics, or `None` when it is not rendered.
pub(crate) async fn metric_opt(server: &TestServer, series: &str) -> Option<f64> {
    let text = metrics_text(server).await;
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The whole /metrics exposition.
pub(crate) async fn metrics_text(server: &TestServer) -> String {
    reqwest::get(server.http("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// GET with an optional `Authorization` header: (status, body as JSON or Null).
pub(crate) async fn get_json(server: &TestServer, path: &str, auth: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new().get(server.http(path));
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}
