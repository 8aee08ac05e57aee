//! Restarts for real: a private Postgres cluster stopped and started under a running service,
//! and the `orderpush` binary itself stopped with SIGTERM and killed with SIGKILL.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;

/// How long `pg_ctl` may take to start or stop a cluster on a loaded machine.
const PG_CTL_TIMEOUT_SECS: &str = "120";

static CLUSTERS: AtomicU32 = AtomicU32::new(0);

/// A throw-away Postgres cluster of the test's own, on a free port: stopping it disturbs no
/// one else. Stopped and deleted on drop, also when the test panics.
struct PrivateCluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
}

impl PrivateCluster {
    fn start() -> Self {
        let bin = pg_bin_dir();
        let dir = std::env::temp_dir().join(format!(
            "orderpush-pg-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let cluster = Self {
            dir,
            bin,
            port: free_port(),
        };
        if is_root() {
            // initdb and postgres refuse to run as root: the cluster belongs to `postgres`.
            run(Command::new("chown")
                .arg("postgres:postgres")
                .arg(&cluster.dir));
        }
        let data = cluster.data();
        run(cluster
            .pg_command("initdb")
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data));
        cluster.pg_ctl_start();
        cluster
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn pg_command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn pg_ctl_start(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60",
            self.port,
            self.dir.display()
        );
        run(self
            .pg_command("pg_ctl")
            .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "-D"])
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-o", &options, "start"]));
    }

    /// Stops the cluster: `fast` (sessions terminated, clean shutdown) or `immediate` (as a
    /// crash: recovery at the next start).
    fn stop(&self, mode: &str) {
        run(self
            .pg_command("pg_ctl")
            .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "-D"])
            .arg(self.data())
            .args(["-m", mode, "stop"]));
    }

    fn config(&self, dbname: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(self.port)
            .user("postgres")
            .dbname(dbname);
        c
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = self
            .pg_command("pg_ctl")
            .args(["-w", "-t", "30", "-D"])
            .arg(self.data())
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// Where `initdb` and `pg_ctl` are: `$ORDERPUSH_PG_BIN`, else `pg_config --bindir`, else the
/// newest `/usr/lib/postgresql/*/bin`.
fn pg_bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("ORDERPUSH_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    candidates.sort();
    if let Some(dir) = candidates
        .into_iter()
        .rev()
        .find(|d| d.join("initdb").exists())
    {
        return dir;
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    panic!("initdb/pg_ctl not found: install PostgreSQL server binaries or set ORDERPUSH_PG_BIN");
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Keeps writing events to two tenants until stopped, reconnecting whenever the database goes
/// away. Which writes committed is read back from the log afterwards: a write whose COMMIT was
/// cut off may or may not have happened, and the log is the truth either way.
fn spawn_resilient_writer(
    config: tokio_postgres::Config,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u32> {
    tokio::spawn(async move {
        let mut attempts = 0u32;
        let mut client: Option<tokio_postgres::Client> = None;
        while !stop.load(Ordering::Relaxed) {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = match config.connect(tokio_postgres::NoTls).await {
                    Ok((c, conn)) => {
                        tokio::spawn(conn);
                        Some(c)
                    }
                    Err(_) => None,
                };
            }
            if let Some(c) = &client {
                attempts += 1;
                let tenant = if attempts % 3 == 0 {
                    "bistro"
                } else {
                    "kitchen"
                };
                let _ = insert_order_fast(c, tenant, &format!("o-{attempts}"), 1).await;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        attempts
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_is_survived_and_nothing_is_lost() {
    let pg = tokio::task::spawn_blocking(PrivateCluster::start)
        .await
        .unwrap();
    let admin = connect(&pg.config("postgres")).await;
    admin.batch_execute("CREATE DATABASE app").await.unwrap();
    let config = pg.config("app");
    orderpush::db::migrate::run(&config).await.unwrap();
    let app = connect(&config).await;
    app.batch_execute("INSERT INTO tenants (slug, name) VALUES ('kitchen', 'K'), ('bistro', 'B')")
        .await
        .unwrap();
    let kitchen_key = orderpush::db::keys::create(&app, "kitchen", None)
        .await
        .unwrap()
        .secret;
    let bistro_key = orderpush::db::keys::create(&app, "bistro", None)
        .await
        .unwrap()
        .secret;
    drop(app);
    let server = TestServer::builder(config.clone()).start().await;
    let stayer = Collector::spawn(Pos::connect(&server, "kitchen", &kitchen_key, None).await);
    let bistro = Collector::spawn(Pos::connect(&server, "bistro", &bistro_key, None).await);
    let mut resumer = Some(Pos::connect(&server, "kitchen", &kitchen_key, None).await);
    let mut resumer_got = Vec::new();

    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_resilient_writer(config.clone(), Arc::clone(&stop));
    for mode in ["fast", "immediate"] {
        tokio::time::sleep(Duration::from_millis(700)).await;
        // The resumer leaves before the outage, noting where it was.
        if let Some(mut pos) = resumer.take() {
            let leave_at = tokio::time::Instant::now() + Duration::from_millis(200);
            while let Some(ev) = pos
                .next_within(leave_at - tokio::time::Instant::now())
                .await
            {
                resumer_got.push(ev);
            }
        }
        let pg_ref = &pg;
        tokio::task::block_in_place(|| pg_ref.stop(mode));
        eventually(
            "/readyz turns 503 with Postgres down",
            Duration::from_secs(10),
            || async { readyz(&server).await == 503 },
        )
        .await;
        let (status, _) = server
            .broadcast(&json!({"tenant": "kitchen", "event": {"type": "x", "data": 1}}))
            .await;
        assert_eq!(
            status, 503,
            "a broadcast that cannot be made durable is refused"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        tokio::task::block_in_place(|| pg_ref.pg_ctl_start());
        eventually(
            "/readyz is 200 after Postgres is back",
            Duration::from_secs(30),
            || async { readyz(&server).await == 200 },
        )
        .await;
        let last = resumer_got.last().map_or(0, |e| e["id"].as_i64().unwrap());
        resumer = Some(Pos::connect(&server, "kitchen", &kitchen_key, Some(last)).await);
        let (status, _) = server
            .broadcast(
                &json!({"tenant": "kitchen", "event": {"type": "after_restart", "data": mode}}),
            )
            .await;
        assert_eq!(status, 200);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    assert!(writer.await.unwrap() > 20, "the writer kept writing");

    let check = connect(&config).await;
    wait_numbered_on(&check).await;
    let kitchen_log = event_log(&check, "kitchen").await;
    let bistro_log = event_log(&check, "bistro").await;
    stayer
        .wait_for(kitchen_log.len(), Duration::from_secs(30))
        .await;
    bistro
        .wait_for(bistro_log.len(), Duration::from_secs(30))
        .await;
    let mut resumer = resumer.unwrap();
    while resumer_got.len() < kitchen_log.len() {
        resumer_got.push(resumer.next().await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        stayer.is_open(),
        "a connected POS stays connected through the restarts"
    );
    assert_exactly_the_log("stayer", &stayer.stop(), &kitchen_log);
    assert_exactly_the_log("bistro", &bistro.stop(), &bistro_log);
    assert_exactly_the_log("resumer", &resumer_got, &kitchen_log);
    assert!(
        resumer
            .next_within(Duration::from_millis(200))
            .await
            .is_none()
    );
    drop(check);
    server.stop().await;
}

/// The sequencer's process SIGKILLed while writers run: the other instance takes over (its
/// standby retries the election every second; the dead process's session, and with it the
/// lock, ends with its socket), and the log has every write once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sequencers_process_killed_mid_stream_is_replaced_and_nothing_is_lost() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let key = db.key("kitchen").await;
    let logs = std::env::temp_dir().join(format!("orderpush-takeover-{}", std::process::id()));
    std::fs::create_dir_all(&logs).unwrap();
    let first = Service::start(&db, &logs.join("first.log"));
    first.wait_ready().await;
    let second = Service::start(&db, &logs.join("second.log"));
    second.wait_ready().await;
    // Whichever was elected first is the one killed; the other must take over.
    let leader_of = |s: &Service| {
        let url = s.url("/metrics");
        async move {
            let text = reqwest::get(url).await.ok()?.text().await.ok()?;
            text.lines()
                .find_map(|l| l.strip_prefix("orderpush_sequencer_leader "))
                .map(|v| v.trim() == "1")
        }
    };
    eventually("one instance is elected", WAIT, || async {
        leader_of(&first).await == Some(true) || leader_of(&second).await == Some(true)
    })
    .await;
    let (mut victim, survivor) = if leader_of(&first).await == Some(true) {
        (first, second)
    } else {
        (second, first)
    };
    let mut pos = survivor.pos(&key, None).await;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let c = db.client().await;
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                insert_loyalty(&c, "kitchen", i).await;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            i
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    victim.signal("KILL");
    tokio::task::block_in_place(|| victim.wait_exit(EXIT_WITHIN));
    eventually(
        "the survivor takes over",
        Duration::from_secs(10),
        || async { leader_of(&survivor).await == Some(true) },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.unwrap();
    let client = db.client().await;
    wait_numbered_on(&client).await;
    let log = event_log(&client, "kitchen").await;
    assert_eq!(log.len(), written as usize, "one event per write");
    let mut got = Vec::new();
    while got.len() < log.len() {
        got.push(pos.next().await);
    }
    assert_exactly_the_log("POS on the survivor", &got, &log);
    let points: Vec<i64> = got
        .iter()
        .map(|e| e["data"]["pointsChange"].as_i64().unwrap())
        .collect();
    assert_eq!(
        points,
        (1..=written as i64).collect::<Vec<_>>(),
        "in commit order"
    );
    drop(survivor);
    let _ = std::fs::remove_dir_all(&logs);
}

/// The `orderpush serve` binary as a child process, killed on drop.
struct Service {
    child: Child,
    port: u16,
}

impl Service {
    fn start(db: &TestDb, log: &Path) -> Self {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_orderpush"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .env("DATABASE_URL", db.url())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("the binary starts");
        Self { child, port }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn wait_ready(&self) {
        eventually("the service is ready", Duration::from_secs(30), || async {
            matches!(reqwest::get(self.url("/readyz")).await, Ok(r) if r.status() == 200)
        })
        .await;
    }

    /// A kitchen POS connected to this process.
    async fn pos(&self, key: &str, since: Option<i64>) -> Pos {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut url = format!("ws://127.0.0.1:{}/ws/pos/kitchen", self.port);
        if let Some(s) = since {
            url.push_str(&format!("?since={s}"));
        }
        let mut req = url.into_client_request().unwrap();
        req.headers_mut().insert("X-API-Key", key.parse().unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .expect("websocket connects");
        Pos { ws }
    }

    fn signal(&self, name: &str) {
        run(Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]));
    }

    /// Waits for the process to exit; returns its status and how long it took.
    fn wait_exit(&mut self, within: Duration) -> (std::process::ExitStatus, Duration) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, started.elapsed());
            }
            assert!(
                started.elapsed() < within,
                "the process did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// After SIGTERM the process must be gone within the shutdown grace plus start-up slack.
const EXIT_WITHIN: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_with_1001_and_sigkill_loses_nothing() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let key = db.key("kitchen").await;
    let logs = std::env::temp_dir().join(format!("orderpush-restart-{}", std::process::id()));
    std::fs::create_dir_all(&logs).unwrap();
    let client = db.client().await;

    // SIGTERM: every client gets 1001, the process exits cleanly and promptly.
    let mut first = Service::start(&db, &logs.join("first.log"));
    first.wait_ready().await;
    let mut a = first.pos(&key, None).await;
    let mut b = first.pos(&key, None).await;
    for i in 1..=3 {
        insert_loyalty(&client, "kitchen", i).await;
    }
    let mut got_a = Vec::new();
    for _ in 1..=3 {
        got_a.push(a.next().await);
        b.next().await;
    }
    first.signal("TERM");
    assert_eq!(a.close_code(Duration::from_secs(10)).await, Some(1001));
    assert_eq!(b.close_code(Duration::from_secs(10)).await, Some(1001));
    let (status, took) = tokio::task::block_in_place(|| first.wait_exit(EXIT_WITHIN));
    assert!(status.success(), "clean exit after SIGTERM: {status:?}");
    assert!(took < orderpush::server::SHUTDOWN_GRACE + Duration::from_secs(5));

    // Written while no service runs at all.
    for i in 4..=6 {
        insert_loyalty(&client, "kitchen", i).await;
    }
    let mut second = Service::start(&db, &logs.join("second.log"));
    second.wait_ready().await;
    let mut a = second.pos(&key, Some(3)).await;
    for i in 4..=8 {
        if i > 6 {
            insert_loyalty(&client, "kitchen", i).await;
        }
        got_a.push(a.next().await);
    }

    // SIGKILL: no close frame, no goodbye; the next process serves the resume.
    second.signal("KILL");
    assert_eq!(
        a.close_code(Duration::from_secs(10)).await,
        None,
        "the socket just ends"
    );
    tokio::task::block_in_place(|| second.wait_exit(EXIT_WITHIN));
    for i in 9..=20 {
        insert_loyalty(&client, "kitchen", i).await;
    }
    let third = Service::start(&db, &logs.join("third.log"));
    third.wait_ready().await;
    let last = got_a.last().unwrap()["id"].as_i64().unwrap();
    let mut a = third.pos(&key, Some(last)).await;
    insert_loyalty(&client, "kitchen", 21).await;
    while got_a.len() < 21 {
        got_a.push(a.next().await);
    }
    wait_numbered_on(&client).await;
    assert_exactly_the_log(
        "resuming client",
        &got_a,
        &event_log(&client, "kitchen").await,
    );
    assert!(a.next_within(Duration::from_millis(300)).await.is_none());
    drop(third);
    let _ = std::fs::remove_dir_all(&logs);
}
