//! A database of its own per test, created on the admin URL's server, migrated, and dropped
//! when the test ends; plus direct access to the backends the server runs (to kill them).

use std::sync::atomic::{AtomicU32, Ordering};

use tokio_postgres::NoTls;

use super::{WAIT, eventually};

/// An admin connection (to the database named in [`admin_url`]).
pub(crate) async fn admin() -> tokio_postgres::Client {
    connect(&admin_url().parse().unwrap()).await
}

/// Lets the database take new connections or refuses them all (`ALTER DATABASE … ALLOW_CONNECTIONS`),
/// through an `admin` connection; sessions already open are not touched.
pub(crate) async fn allow_connections(admin: &tokio_postgres::Client, database: &str, allow: bool) {
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {database} ALLOW_CONNECTIONS {allow}"
        ))
        .await
        .unwrap();
}

/// Where the tests create their databases: an admin connection to an existing database.
pub(crate) fn admin_url() -> String {
    std::env::var("ORDERPUSH_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A database of its own, migrated, dropped when the test ends.
pub(crate) struct TestDb {
    /// Its name on the server.
    pub(crate) name: String,
    /// How to connect to it.
    pub(crate) config: tokio_postgres::Config,
}

impl TestDb {
    /// A database of its own with orderpush's migrations applied.
    pub(crate) async fn create() -> Self {
        let db = Self::create_empty().await;
        orderpush::db::migrate::run(&db.config)
            .await
            .expect("migrations apply");
        db
    }

    /// A database of its own with nothing in it (no migrations applied).
    pub(crate) async fn create_empty() -> Self {
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

    /// Its URL, for processes that take `DATABASE_URL`.
    pub(crate) fn url(&self) -> String {
        let mut url = admin_url();
        let cut = url.rfind('/').unwrap();
        url.truncate(cut + 1);
        url.push_str(&self.name);
        url
    }

    /// A new connection to it.
    pub(crate) async fn client(&self) -> tokio_postgres::Client {
        connect(&self.config).await
    }

    /// Adds a tenant.
    pub(crate) async fn tenant(&self, slug: &str) {
        self.client()
            .await
            .execute("INSERT INTO tenants (slug, name) VALUES ($1, $1)", &[&slug])
            .await
            .unwrap();
    }

    /// Creates a POS key for a tenant and returns the secret.
    pub(crate) async fn key(&self, tenant: &str) -> String {
        let c = self.client().await;
        orderpush::db::keys::create(&c, tenant, Some("test"))
            .await
            .unwrap()
            .secret
    }

    /// Number of events in the log (the markers a tenant's log may start with excluded).
    pub(crate) async fn event_count(&self) -> i64 {
        self.client()
            .await
            .query_one("SELECT count(*) FROM orderpush.events WHERE id > 0", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// Rows written by the application (or /broadcast) that no sequencer has numbered yet.
    pub(crate) async fn staged_count(&self) -> i64 {
        self.client()
            .await
            .query_one("SELECT count(*) FROM orderpush.staged", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// Waits until a running server's sequencer has numbered every staged row: the log then
    /// holds every event of every committed write.
    pub(crate) async fn wait_numbered(&self) {
        wait_numbered_on(&self.client().await).await;
    }
}

/// Lets `TestServer::builder(&db)` start a server on this database.
impl From<&TestDb> for tokio_postgres::Config {
    fn from(db: &TestDb) -> Self {
        db.config.clone()
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

/// A connection to `config`, its driver on a task of the test's runtime.
pub(crate) async fn connect(config: &tokio_postgres::Config) -> tokio_postgres::Client {
    let (client, conn) = config
        .connect(NoTls)
        .await
        .expect("connect to test Postgres");
    tokio::spawn(conn);
    client
}

/// Waits until every staged row of the database `client` is connected to is numbered (a server
/// must be running).
pub(crate) async fn wait_numbered_on(client: &tokio_postgres::Client) {
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

/// The backends of orderpush listeners connected to database `db`.
pub(crate) async fn listener_pids(client: &tokio_postgres::Client, db: &str) -> Vec<i32> {
    session_pids(client, db, "orderpush-listener").await
}

/// The backends connected to database `db` under this `application_name`.
pub(crate) async fn session_pids(client: &tokio_postgres::Client, db: &str, app: &str) -> Vec<i32> {
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
pub(crate) async fn kill_sequencers(client: &tokio_postgres::Client, db: &str) -> usize {
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
pub(crate) async fn kill_listeners(client: &tokio_postgres::Client, db: &str) -> usize {
    let pids = listener_pids(client, db).await;
    for pid in &pids {
        client
            .execute("SELECT pg_terminate_backend($1)", &[pid])
            .await
            .unwrap();
    }
    pids.len()
}
