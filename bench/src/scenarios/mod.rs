//! The shared run context (databases, keys, server specs) and the seven scenarios.

pub mod broadcast;
pub mod commit;
pub mod connections;
pub mod fanout;
pub mod storm;
pub mod tenants;
pub mod writepath;

use anyhow::{Context, Result};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::config::Args;
use crate::pg::{self, PgConfig};
use crate::servers::{self, Kind, ServerSpec};
use crate::ws::Endpoint;

/// Handshakes in flight while opening thousands of clients: enough to keep both servers'
/// accept loops busy, few enough not to overflow their listen backlogs (SOMAXCONN 4096).
pub const CONNECT_CONCURRENCY: usize = 200;
/// Share of both cores that may be busy (with other processes) when a scenario starts.
const IDLE_BUSY_MAX: f64 = 0.30;

/// Busy share of all CPUs over `window` (from /proc/stat).
pub async fn cpu_busy(window: std::time::Duration) -> f64 {
    fn read() -> Option<(u64, u64)> {
        let s = std::fs::read_to_string("/proc/stat").ok()?;
        let l = s.lines().next()?;
        let v: Vec<u64> = l
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let idle = v.get(3)? + v.get(4).unwrap_or(&0);
        Some((v.iter().sum(), idle))
    }
    let a = read();
    tokio::time::sleep(window).await;
    match (a, read()) {
        (Some((t0, i0)), Some((t1, i1))) if t1 > t0 => 1.0 - (i1 - i0) as f64 / (t1 - t0) as f64,
        _ => f64::NAN,
    }
}

/// Waits until the machine is quiet enough to measure (bounded); notes it when it is not.
pub async fn ensure_idle(ctx: &Ctx, label: &str) {
    // How long to wait for a busy machine (e.g. someone's `cargo build`) to calm down.
    let until = crate::clock::now_ns() + ctx.args.idle_wait_secs * 1_000_000_000;
    let mut busy = cpu_busy(std::time::Duration::from_secs(1)).await;
    let mut waited = false;
    while busy > IDLE_BUSY_MAX && crate::clock::now_ns() < until {
        if !waited {
            say(format!(
                "machine {:.0} % busy before {label}; waiting for it to calm down",
                busy * 100.0
            ));
            waited = true;
        }
        busy = cpu_busy(std::time::Duration::from_secs(2)).await;
    }
    if busy > IDLE_BUSY_MAX {
        ctx.note(format!(
            "machine still {:.0} % busy (other processes) when {label} started: its figures are pessimistic",
            busy * 100.0
        ));
    }
}

/// Opens a client to every endpoint (at most [`CONNECT_CONCURRENCY`] handshakes at once) and
/// notes the first failure, if any, as "`what` connects failed".
#[allow(clippy::too_many_arguments)]
pub async fn connect_all<S: crate::ws::ClientLogic>(
    ctx: &Ctx,
    kind: Kind,
    what: &str,
    eps: &[Endpoint],
    make_state: impl FnMut(usize) -> S,
    counters: &std::sync::Arc<crate::ws::ClientCounters>,
    reconnect: bool,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> (Vec<crate::ws::Client<S>>, crate::ws::ConnectStats) {
    let mut first_err = None;
    let (clients, st) = crate::ws::connect_many(
        eps,
        make_state,
        counters,
        reconnect,
        stop,
        CONNECT_CONCURRENCY,
        &mut first_err,
    )
    .await;
    if let Some(e) = first_err {
        ctx.note(format!(
            "{}: {} {what} connects failed, first: {e}",
            kind.name(),
            st.failed
        ));
    }
    (clients, st)
}

/// Runs one scenario against every configured server in turn (waiting for a quiet machine
/// before each) and returns orderpush's and Node's outcomes; a failure is noted, not fatal.
pub async fn on_each_server<O, F, Fut>(
    ctx: &Ctx,
    scenario: &str,
    mut one: F,
) -> (Option<O>, Option<O>)
where
    F: FnMut(Kind) -> Fut,
    Fut: std::future::Future<Output = Result<O>>,
{
    let (mut op, mut nd) = (None, None);
    for kind in ctx.args.servers.clone() {
        ensure_idle(ctx, &format!("{scenario} on {}", kind.name())).await;
        say(format!("{scenario} against {}", kind.name()));
        match one(kind).await {
            Ok(o) => match kind {
                Kind::Orderpush => op = Some(o),
                Kind::Node => nd = Some(o),
            },
            Err(e) => ctx.note(format!("{scenario} on {} failed: {e:#}", kind.name())),
        }
    }
    (op, nd)
}

/// A message into a scenario's log, so progress is visible in a multi-minute run.
pub fn say(msg: impl AsRef<str>) {
    eprintln!(
        "[{:7.1}s] {}",
        crate::clock::now_ns() as f64 / 1e9,
        msg.as_ref()
    );
}

/// Everything a scenario needs about this run.
pub struct Ctx {
    pub args: Args,
    pub pg: PgConfig,
    pub run_id: String,
    pub work_dir: PathBuf,
    pub orderpush_bin: PathBuf,
    pub node_dir: PathBuf,
    /// The orderpush database of scenarios 1-3, 5, 6 and its keys (one per tenant).
    pub op_db: Option<String>,
    pub op_keys: Vec<String>,
    /// The Node baseline's database (the application tables + naive triggers) and keys.
    pub node_db: Option<String>,
    pub node_keys: Vec<String>,
    pub node_keys_file: PathBuf,
    /// Every database this run created (dropped at the end).
    pub dbs: Mutex<Vec<String>>,
    salt: AtomicU32,
    pub notes: Mutex<Vec<String>>,
}

impl Ctx {
    pub async fn new(args: Args) -> Result<Ctx> {
        let pg = PgConfig {
            host: args.pg_host.clone(),
            port: args.pg_port,
            user: args.pg_user.clone(),
        };
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let run_id = format!("{}_{}", secs, std::process::id());
        let work_dir = args.out_dir.join(format!("run_{run_id}"));
        std::fs::create_dir_all(&work_dir)
            .with_context(|| format!("create {}", work_dir.display()))?;
        let node_dir = args.out_dir.join("node-baseline");
        Ok(Ctx {
            orderpush_bin: args.orderpush_bin(),
            pg,
            run_id,
            node_keys_file: work_dir.join("node-keys.json"),
            work_dir,
            node_dir,
            op_db: None,
            op_keys: vec![],
            node_db: None,
            node_keys: vec![],
            dbs: Mutex::new(vec![]),
            salt: AtomicU32::new((secs as u32) << 8),
            notes: Mutex::new(vec![]),
            args,
        })
    }

    pub fn note(&self, n: impl Into<String>) {
        let n = n.into();
        say(format!("note: {n}"));
        crate::ws::lock(&self.notes).push(n);
    }

    /// A fresh salt for order UUIDs, so scenarios sharing a database never collide.
    pub fn next_salt(&self) -> u32 {
        self.salt.fetch_add(1, Ordering::Relaxed)
    }

    pub fn db_name(&self, suffix: &str) -> String {
        format!("orderpush_bench_{}_{}", self.run_id, suffix)
    }

    /// Creates a database and remembers it for the final drop.
    pub async fn create_db(&self, suffix: &str) -> Result<String> {
        let name = self.db_name(suffix);
        pg::create_db(&self.pg, &name).await?;
        crate::ws::lock(&self.dbs).push(name.clone());
        Ok(name)
    }

    /// A database with the application tables and `tenants` tenants, set up as `kind` needs:
    /// orderpush: its migrations (optionally a wake-up mode first); node: schema.sql plus,
    /// with `naive`, naive-triggers.sql; neither: schema.sql alone (trigger-free).
    pub async fn prepare_db(&self, suffix: &str, setup: DbSetup<'_>) -> Result<String> {
        let db = self.create_db(suffix).await?;
        let url = self.pg.url(&db);
        match setup {
            DbSetup::Orderpush { wakeup } => {
                if let Some(mode) = wakeup {
                    pg::set_wakeup(&self.pg, &db, mode).await?;
                }
                pg::orderpush_migrate(&self.orderpush_bin, &url)
                    .await
                    .context("orderpush migrate")?;
            }
            DbSetup::Plain => {
                pg::run_sql_file(&url, &self.args.node_src.join("schema.sql")).await?;
            }
            DbSetup::Naive => {
                pg::run_sql_file(&url, &self.args.node_src.join("schema.sql")).await?;
                pg::run_sql_file(&url, &self.args.node_src.join("naive-triggers.sql")).await?;
            }
        }
        pg::insert_tenants(&url, self.args.tenants).await?;
        Ok(db)
    }

    /// Sets up what the selected servers need: the Node baseline's copy and key file, and, for
    /// scenarios 1-3, 5, 6, the shared databases and orderpush's keys (4 and 7 make their own).
    pub async fn setup_main(&mut self) -> Result<()> {
        let salt = self.next_salt() as u64;
        let shared_db = self.args.scenarios.iter().any(|s| {
            matches!(
                s.as_str(),
                "connections" | "fanout" | "commit" | "broadcast" | "storm"
            )
        });
        if self.has(Kind::Orderpush) {
            anyhow::ensure!(
                self.orderpush_bin.exists(),
                "orderpush binary {} not found: build it (cargo build --release --bin orderpush) \
                 or pass --orderpush-bin",
                self.orderpush_bin.display()
            );
        }
        if self.has(Kind::Orderpush) && shared_db {
            say("orderpush: database, migrations, tenants, keys");
            let db = self
                .prepare_db("op", DbSetup::Orderpush { wakeup: None })
                .await?;
            let t0 = crate::clock::now_ns();
            self.op_keys =
                pg::orderpush_keys(&self.orderpush_bin, &self.pg.url(&db), self.args.tenants)
                    .await?;
            say(format!(
                "orderpush: {} keys created in {:.1} s",
                self.op_keys.len(),
                (crate::clock::now_ns() - t0) as f64 / 1e9
            ));
            self.op_db = Some(db);
        }
        if self.has(Kind::Node) {
            say("node: npm ci (once), database with naive triggers, key file");
            servers::prepare_node(&self.args.node_src, &self.node_dir).await?;
            self.node_keys = pg::node_keys(self.args.tenants, salt);
            servers::write_node_keys(&self.node_keys_file, &self.node_keys)?;
            if shared_db {
                let db = self.prepare_db("node", DbSetup::Naive).await?;
                self.node_db = Some(db);
            }
        }
        Ok(())
    }

    pub fn has(&self, k: Kind) -> bool {
        self.args.servers.contains(&k)
    }

    /// How to start `kind` for the shared scenarios; Node LISTENs on its database if `listen_pg`.
    pub fn spec(&self, kind: Kind, listen_pg: bool, tag: &str) -> ServerSpec {
        let log_file = self.work_dir.join(format!("{}-{tag}.log", kind.name()));
        match kind {
            Kind::Orderpush => ServerSpec {
                kind,
                program: self.orderpush_bin.clone(),
                port: self.args.port_base,
                database_url: self.pg.url(self.op_db.as_deref().unwrap_or("postgres")),
                listen_pg: false,
                keys_file: None,
                log_file,
            },
            Kind::Node => ServerSpec {
                kind,
                program: self.node_dir.clone(),
                port: self.args.port_base + 1,
                database_url: self.pg.url(self.node_db.as_deref().unwrap_or("postgres")),
                listen_pg,
                keys_file: Some(self.node_keys_file.clone()),
                log_file,
            },
        }
    }

    /// `n` endpoints spread over the first `tenants` tenants (client i -> tenant i % tenants).
    pub fn endpoints(&self, kind: Kind, n: usize, tenants: usize) -> Vec<Endpoint> {
        let keys = match kind {
            Kind::Orderpush => &self.op_keys,
            Kind::Node => &self.node_keys,
        };
        let addr = self.spec(kind, false, "x").addr();
        (0..n)
            .map(|i| {
                let t = i % tenants.max(1);
                Endpoint {
                    addr,
                    tenant: pg::tenant_slug(t),
                    key: keys[t].clone(),
                }
            })
            .collect()
    }

    /// Drops this run's databases (unless --keep-db).
    pub async fn cleanup(&self) {
        if self.args.keep_db {
            return;
        }
        let dbs: Vec<String> = crate::ws::lock(&self.dbs).drain(..).collect();
        for db in dbs {
            if let Err(e) = pg::drop_db(&self.pg, &db).await {
                eprintln!("could not drop {db}: {e:#}");
            }
        }
    }
}

/// How a scenario database is laid out.
pub enum DbSetup<'a> {
    Orderpush { wakeup: Option<&'a str> },
    Plain,
    Naive,
}

/// Percent helper for notes.
pub fn pct(a: f64, b: f64) -> f64 {
    if b > 0.0 { 100.0 * a / b } else { f64::NAN }
}

/// A `/broadcast` body as the web app sends it; `data` carries a sequence number and padding.
pub fn broadcast_body(tenant: &str, event_type: &str, seq: u64, pad: &str) -> Vec<u8> {
    format!(
        r#"{{"tenant":"{tenant}","event":{{"type":"{event_type}","data":{{"seq":{seq},"pad":"{pad}"}}}}}}"#
    )
    .into_bytes()
}

/// The `seq` of a broadcast frame's data.
#[derive(serde::Deserialize)]
pub struct SeqData {
    pub seq: Option<u64>,
}

/// Parses a frame and returns (type, id, data.seq).
pub fn frame_seq(text: &str) -> Option<(String, Option<i64>, Option<u64>)> {
    let f: crate::ws::Frame = serde_json::from_str(text).ok()?;
    let seq = f
        .data
        .and_then(|d| serde_json::from_str::<SeqData>(d.get()).ok())
        .and_then(|d| d.seq);
    Some((
        f.kind.map(|k| k.into_owned()).unwrap_or_default(),
        f.id,
        seq,
    ))
}
