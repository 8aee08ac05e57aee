//! Postgres plumbing: per-run databases, tenants, POS keys, SQL files and pgbench runs.

use anyhow::{Context, Result, anyhow, bail};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_postgres::{Client, NoTls};

use crate::stats::Summary;

/// Keys created in parallel with `orderpush keys create`; each is a process with its own
/// connection, so a handful keeps Postgres's 100-connection limit and the 2 cores comfortable.
const KEY_CREATE_PARALLELISM: usize = 4;
/// `orderpush keys create` / `migrate` taking longer than this is treated as a failure.
const CLI_TIMEOUT: Duration = Duration::from_secs(120);

/// Where the local Postgres is (trust auth, user postgres).
#[derive(Clone, Debug)]
pub struct PgConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
}

impl PgConfig {
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{}@{}:{}/{}",
            self.user, self.host, self.port, db
        )
    }
}

/// Connects and drives the connection on a task of its own.
pub async fn connect(url: &str) -> Result<Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connect {url}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("postgres connection ended: {e}");
        }
    });
    Ok(client)
}

/// Creates a fresh database (dropping a leftover of the same name first).
pub async fn create_db(cfg: &PgConfig, name: &str) -> Result<()> {
    let admin = connect(&cfg.url("postgres")).await?;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .await?;
    Ok(())
}

/// Drops a database, disconnecting whoever is still on it.
pub async fn drop_db(cfg: &PgConfig, name: &str) -> Result<()> {
    let admin = connect(&cfg.url("postgres")).await?;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await?;
    Ok(())
}

/// Drops every `orderpush_bench_*` database left by an interrupted run.
pub async fn drop_leftovers(cfg: &PgConfig) -> Result<Vec<String>> {
    let admin = connect(&cfg.url("postgres")).await?;
    let rows = admin
        .query(
            "SELECT datname FROM pg_database WHERE datname LIKE 'orderpush\\_bench\\_%'",
            &[],
        )
        .await?;
    let mut dropped = Vec::new();
    for r in rows {
        let name: String = r.get(0);
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await?;
        dropped.push(name);
    }
    Ok(dropped)
}

/// `ALTER DATABASE db SET orderpush.wakeup = mode` (read by orderpush's triggers per session).
pub async fn set_wakeup(cfg: &PgConfig, db: &str, mode: &str) -> Result<()> {
    let admin = connect(&cfg.url("postgres")).await?;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{db}\" SET orderpush.wakeup = '{mode}'"
        ))
        .await?;
    Ok(())
}

/// Tenant slug of index `i` (`t000` ..).
pub fn tenant_slug(i: usize) -> String {
    format!("t{i:03}")
}

/// Inserts tenants `t000..` (slugs as [`tenant_slug`] spells them) into `public.tenants` with one
/// `INSERT ... SELECT generate_series`, so 100,000 tenants take one statement.
pub async fn insert_tenants(url: &str, n: usize) -> Result<()> {
    let c = connect(url).await?;
    let sql = "INSERT INTO tenants (slug, name) \
               SELECT 't' || CASE WHEN g < 1000 THEN lpad(g::text, 3, '0') ELSE g::text END, \
                      'Bench restaurant ' || g \
               FROM generate_series(0, $1::bigint - 1) AS g \
               ON CONFLICT DO NOTHING";
    c.execute(sql, &[&(n as i64)]).await?;
    Ok(())
}

/// Rows waiting in orderpush's staging table (written, not yet numbered by the sequencer).
pub async fn staged_rows(c: &Client) -> Result<i64> {
    Ok(c.query_one("SELECT count(*) FROM orderpush.staged", &[])
        .await?
        .get(0))
}

/// Events numbered so far, over all tenants: the sum of the per-tenant heads (ids are gap-free
/// per tenant, so the head is the tenant's event count).
pub async fn numbered_events(c: &Client) -> Result<i64> {
    Ok(c.query_one(
        "SELECT coalesce(sum(seq), 0)::bigint FROM orderpush.heads",
        &[],
    )
    .await?
    .get(0))
}

/// Runs a SQL file as one batch.
pub async fn run_sql_file(url: &str, path: &Path) -> Result<()> {
    let sql = tokio::fs::read_to_string(path)
        .await
        .with_context(|| format!("read {}", path.display()))?;
    let c = connect(url).await?;
    c.batch_execute(&sql)
        .await
        .with_context(|| format!("run {}", path.display()))?;
    Ok(())
}

/// Runs a command with a timeout and returns its stdout; non-zero exit is an error with stderr.
pub async fn run_cmd(cmd: &mut tokio::process::Command) -> Result<String> {
    cmd.kill_on_drop(true).stdin(std::process::Stdio::null());
    let out = tokio::time::timeout(CLI_TIMEOUT, cmd.output())
        .await
        .map_err(|_| anyhow!("{cmd:?} timed out"))??;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `orderpush migrate --database-url URL`.
pub async fn orderpush_migrate(bin: &Path, url: &str) -> Result<()> {
    run_cmd(
        tokio::process::Command::new(bin)
            .args(["migrate", "--database-url", url])
            .env("RUST_LOG", "warn"),
    )
    .await?;
    Ok(())
}

/// One key per tenant through `orderpush keys create`; returns keys in tenant order.
pub async fn orderpush_keys(bin: &Path, url: &str, tenants: usize) -> Result<Vec<String>> {
    let mut keys = vec![String::new(); tenants];
    let mut next = 0;
    while next < tenants {
        let batch: Vec<usize> = (next..tenants.min(next + KEY_CREATE_PARALLELISM)).collect();
        next += batch.len();
        let futs = batch.iter().map(|&i| {
            let bin: PathBuf = bin.to_path_buf();
            let url = url.to_string();
            async move {
                let out = run_cmd(
                    tokio::process::Command::new(&bin)
                        .args([
                            "keys",
                            "create",
                            "--tenant",
                            &tenant_slug(i),
                            "--label",
                            "bench",
                        ])
                        .args(["--database-url", &url])
                        .env("RUST_LOG", "warn"),
                )
                .await?;
                let key = out.trim().to_string();
                if !key.starts_with("pos_") {
                    bail!("`keys create` printed {key:?}, not a pos_ key");
                }
                Ok::<_, anyhow::Error>((i, key))
            }
        });
        for r in futures_util::future::join_all(futs).await {
            let (i, key) = r?;
            keys[i] = key;
        }
    }
    Ok(keys)
}

/// Keys for the Node baseline (any `pos_<64 hex>` string it finds in its key file), one per tenant.
pub fn node_keys(tenants: usize, salt: u64) -> Vec<String> {
    (0..tenants)
        .map(|i| {
            let mut x = salt ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut s = String::from("pos_");
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                s.push_str(&format!("{x:016x}"));
            }
            s
        })
        .collect()
}

/// The pgbench transaction of scenario 4: one order row, then 2-3 item rows, one transaction.
pub const PGBENCH_SCRIPT: &str = r#"\set t random(0, 99)
\set n random(2, 3)
BEGIN;
INSERT INTO orders (tenant_slug, order_number, customer_name, customer_phone, order_type, order_source, status, total_amount) VALUES ('t' || lpad(:t::text, 3, '0'), 'pgb-' || :client_id || '-' || (random() * 1e9)::bigint, 'Bench Customer', '+44 7700 900000', 'delivery', 'online', 'pending', 23.50) RETURNING id AS order_id \gset
INSERT INTO order_items (order_id, menu_item_id, name, quantity, price, selected_addons) SELECT :order_id::uuid, 'm' || g, 'Item ' || g, 1, 9.50, '[{"name": "extra cheese", "price": 1.5}]'::jsonb FROM generate_series(1, :n) g;
COMMIT;
"#;

/// Result of one pgbench run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PgbenchRun {
    pub writers: usize,
    pub tps: f64,
    /// Transactions committed ("number of transactions actually processed").
    pub transactions: u64,
    pub latency: Summary,
    pub failed: u64,
}

/// Runs pgbench with `PGBENCH_SCRIPT` for `secs` seconds and reads its per-transaction log.
pub async fn pgbench(
    cfg: &PgConfig,
    db: &str,
    writers: usize,
    secs: u64,
    work_dir: &Path,
) -> Result<PgbenchRun> {
    let script = work_dir.join("orders.pgbench");
    tokio::fs::write(&script, PGBENCH_SCRIPT).await?;
    let log_dir = work_dir.join(format!("pgbench-{db}-{writers}"));
    let _ = tokio::fs::remove_dir_all(&log_dir).await;
    tokio::fs::create_dir_all(&log_dir).await?;
    let threads = writers.clamp(1, 2);
    let out = run_cmd(
        tokio::process::Command::new("pgbench")
            .args(["-n", "-M", "prepared", "-l", "--log-prefix"])
            .arg(log_dir.join("tx"))
            .arg("-f")
            .arg(&script)
            .args(["-c", &writers.to_string(), "-j", &threads.to_string()])
            .args(["-T", &secs.to_string()])
            .args([
                "-h",
                &cfg.host,
                "-p",
                &cfg.port.to_string(),
                "-U",
                &cfg.user,
                db,
            ])
            .current_dir(work_dir),
    )
    .await?;
    let tps = out
        .lines()
        .find(|l| l.starts_with("tps ="))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| anyhow!("no tps line in pgbench output:\n{out}"))?;
    let transactions = out
        .lines()
        .find(|l| l.starts_with("number of transactions actually processed"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.split(['/', ' ']).find(|x| !x.is_empty()))
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| anyhow!("no transaction count in pgbench output:\n{out}"))?;
    let failed = out
        .lines()
        .find(|l| l.starts_with("number of failed transactions"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    // Per-transaction log lines: client_id transaction_no time_us script_no epoch epoch_us
    let mut lat_us = Vec::new();
    let mut rd = tokio::fs::read_dir(&log_dir).await?;
    while let Some(e) = rd.next_entry().await? {
        let text = tokio::fs::read_to_string(e.path()).await?;
        for line in text.lines() {
            if let Some(v) = line
                .split_whitespace()
                .nth(2)
                .and_then(|v| v.parse::<u64>().ok())
            {
                lat_us.push(v);
            }
        }
    }
    let _ = tokio::fs::remove_dir_all(&log_dir).await;
    Ok(PgbenchRun {
        writers,
        tps,
        transactions,
        latency: Summary::of_us(&mut lat_us),
        failed,
    })
}

/// `application_name` of the bench's own connections (writers, samplers), so that the Postgres
/// CPU attributed to the service leaves them out.
pub const BENCH_APP_NAME: &str = "orderpush-bench";

/// `url` with the bench's `application_name`.
pub fn bench_url(url: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}application_name={BENCH_APP_NAME}")
}

/// Postgres CPU over a window, from /proc/<pid>/schedstat of one database's backends (each a
/// single-threaded process, so its run time to the nanosecond), split into the
/// bench's own backends (`application_name` [`BENCH_APP_NAME`]: the writers) and all the others
/// (the service's connections and autovacuum workers on that database). Backends are listed from
/// `pg_stat_activity` at every [`PgCpu::sample`]; one that appears after the first sample is
/// counted from zero (it started within the window), one that ends between samples loses what
/// it used since the last. The postmaster's cluster-wide processes (WAL writer, checkpointer)
/// are left out: other databases on the cluster share them.
pub struct PgCpu {
    client: Client,
    db: String,
    /// pid -> (CPU seconds at its first sample, latest CPU seconds, bench's own backend).
    seen: std::collections::HashMap<i32, (f64, f64, bool)>,
    samples: usize,
}

/// What [`PgCpu`] measured, in CPU seconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct PgCpuUse {
    /// The service's backends and autovacuum on the database.
    pub service: f64,
    /// The bench's own backends (writers).
    pub bench: f64,
    /// Distinct backends seen.
    pub backends: usize,
}

impl PgCpu {
    /// Opens the sampler's own connection to `db` (its backend is never counted).
    pub async fn new(cfg: &PgConfig, db: &str) -> Result<PgCpu> {
        let client = connect(&bench_url(&cfg.url(db))).await?;
        Ok(PgCpu {
            client,
            db: db.to_string(),
            seen: Default::default(),
            samples: 0,
        })
    }

    /// Reads every backend's CPU time now.
    pub async fn sample(&mut self) -> Result<()> {
        let rows = self
            .client
            .query(
                "SELECT pid, coalesce(application_name, '') FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&self.db],
            )
            .await?;
        let first = self.samples == 0;
        for r in rows {
            let pid: i32 = r.get(0);
            let app: String = r.get(1);
            let Some(cpu) = crate::servers::schedstat_secs(&format!("/proc/{pid}/schedstat"))
            else {
                continue;
            };
            let e = self.seen.entry(pid).or_insert((
                if first { cpu } else { 0.0 },
                cpu,
                app.starts_with(BENCH_APP_NAME),
            ));
            e.1 = cpu;
        }
        self.samples += 1;
        Ok(())
    }

    /// CPU used between the first sample and the latest.
    pub fn used(&self) -> PgCpuUse {
        let mut u = PgCpuUse {
            backends: self.seen.len(),
            ..Default::default()
        };
        for &(first, last, bench) in self.seen.values() {
            let d = (last - first).max(0.0);
            if bench {
                u.bench += d;
            } else {
                u.service += d;
            }
        }
        u
    }
}
