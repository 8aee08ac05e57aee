//! Scenario 4: the application's write cost. pgbench runs the orders+items transaction at 1, 8
//! and 32 writers on the application tables without triggers, with orderpush's staging triggers in
//! each wake-up mode (`ALTER DATABASE .. SET orderpush.wakeup`, the service running, so its
//! sequencer numbers the staged rows as in production), and with the Node baseline's naive
//! NOTIFY triggers (its listener running). An orderpush figure counts only if the sequencer
//! numbered every committed row: the staging table must be empty shortly after pgbench ends.

use anyhow::Result;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;
use tokio::sync::watch;

use super::{Ctx, DbSetup, pct, say};
use crate::clock::now_ns;
use crate::pg::{self, PgbenchRun};
use crate::report::{Better, Results, Row};
use crate::servers::{Kind, Server, ServerSpec};

/// One configuration of the tables.
struct Config {
    name: String,
    setup: Setup,
}

enum Setup {
    Plain,
    Orderpush(String),
    Naive,
}

/// Rounds over all configurations; each figure is the best valid round's. The machine is shared
/// (other sessions' builds and tests use the same cores and Postgres), so one unlucky 5 s run
/// should not decide a ratio; rounds interleave the configurations so a busy spell hits all.
const ROUNDS: usize = 2;
/// The staging table must be empty this soon after pgbench ends, or the run's figure is not
/// valid: a sequencer that falls behind during the run makes the writers look cheaper than they
/// are (its work is deferred past the measurement).
const NUMBERED_WITHIN: Duration = Duration::from_secs(5);
/// How long to keep waiting for a late sequencer, to report how late it was (bounds the wait).
const NUMBERING_WAIT_MAX: Duration = Duration::from_secs(30);
/// How often the staging table is counted while pgbench runs (the backlog during the run).
const BACKLOG_SAMPLE: Duration = Duration::from_secs(1);
/// How often it is counted after pgbench, while waiting for it to empty.
const DRAIN_POLL: Duration = Duration::from_millis(20);
/// The wake-up mode whose figure is judged (the default).
const DEFAULT_MODE: &str = "gated";

/// What the sequencer did with one pgbench run's writes.
#[derive(Debug, Clone, Copy)]
struct Numbering {
    /// Transactions pgbench committed (each stages one `new_order` row).
    transactions: u64,
    /// Events numbered between the start of the run and the end of the wait.
    numbered: i64,
    /// Largest staging-table backlog counted while pgbench ran.
    max_backlog: i64,
    /// Staged rows when pgbench ended.
    backlog_at_end: i64,
    /// How long after pgbench ended the staging table was empty (None: not within
    /// NUMBERING_WAIT_MAX).
    drained_ms: Option<f64>,
    /// Staged rows left at NUMBERED_WITHIN after pgbench ended.
    left: i64,
}

impl Numbering {
    /// Why this run's figure is not valid, if it is not.
    fn invalid(&self) -> Option<String> {
        if self.left > 0 {
            return Some(format!(
                "{} staged rows still unnumbered {} s after pgbench ended",
                self.left,
                NUMBERED_WITHIN.as_secs()
            ));
        }
        if self.numbered < self.transactions as i64 {
            return Some(format!(
                "{} of {} committed transactions numbered",
                self.numbered, self.transactions
            ));
        }
        None
    }
}

/// One pgbench run and, with orderpush, what its sequencer did.
#[derive(Clone)]
struct Run {
    pg: PgbenchRun,
    numbering: Option<Numbering>,
}

impl Run {
    fn valid(&self) -> bool {
        self.numbering.is_none_or(|n| n.invalid().is_none())
    }
}

/// Creates the configuration's database once (tables, triggers, wake-up mode, tenants).
async fn prepare(ctx: &Ctx, cfg: &Config) -> Result<String> {
    let suffix = format!("wp_{}", cfg.name.replace(['=', '-'], "_"));
    Ok(match &cfg.setup {
        Setup::Plain => ctx.prepare_db(&suffix, DbSetup::Plain).await?,
        Setup::Orderpush(mode) => {
            ctx.prepare_db(&suffix, DbSetup::Orderpush { wakeup: Some(mode) })
                .await?
        }
        Setup::Naive => ctx.prepare_db(&suffix, DbSetup::Naive).await?,
    })
}

/// Waits (bounded) until the staging table is empty; returns (ms waited or None, rows left at
/// `valid_within`).
async fn wait_numbered(c: &tokio_postgres::Client) -> Result<(Option<f64>, i64)> {
    let t0 = now_ns();
    let mut left_at_deadline = None;
    loop {
        let n = pg::staged_rows(c).await?;
        let waited = now_ns() - t0;
        if n == 0 {
            return Ok((Some(waited as f64 / 1e6), left_at_deadline.unwrap_or(0)));
        }
        if waited >= NUMBERED_WITHIN.as_nanos() as u64 && left_at_deadline.is_none() {
            left_at_deadline = Some(n);
        }
        if waited >= NUMBERING_WAIT_MAX.as_nanos() as u64 {
            return Ok((None, left_at_deadline.unwrap_or(n)));
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// pgbench with orderpush's sequencer watched: the staging backlog sampled during the run, and
/// the wait for it to empty afterwards.
async fn pgbench_numbered(ctx: &Ctx, db: &str, writers: usize) -> Result<Run> {
    let url = pg::bench_url(&ctx.pg.url(db));
    let c = pg::connect(&url).await?;
    // Start from an empty queue, so the counts below are this run's.
    let (_, before_left) = wait_numbered(&c).await?;
    anyhow::ensure!(
        before_left == 0,
        "{before_left} staged rows left from before the run"
    );
    let numbered0 = pg::numbered_events(&c).await?;
    let max_backlog = Arc::new(AtomicI64::new(0));
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let sampler = {
        let (url, max_backlog) = (url.clone(), max_backlog.clone());
        tokio::spawn(async move {
            let c = pg::connect(&url).await?;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(BACKLOG_SAMPLE) => {}
                    _ = stop_rx.changed() => return Ok::<_, anyhow::Error>(()),
                }
                let n = pg::staged_rows(&c).await?;
                max_backlog.fetch_max(n, Ordering::Relaxed);
            }
        })
    };
    let r = pg::pgbench(&ctx.pg, db, writers, ctx.args.pgbench_secs, &ctx.work_dir).await;
    let backlog_at_end = pg::staged_rows(&c).await?;
    let _ = stop_tx.send(true);
    let _ = sampler.await;
    let r = r?;
    let (drained_ms, left) = wait_numbered(&c).await?;
    let numbered = pg::numbered_events(&c).await? - numbered0;
    let numbering = Numbering {
        transactions: r.transactions,
        numbered,
        max_backlog: max_backlog.load(Ordering::Relaxed).max(backlog_at_end),
        backlog_at_end,
        drained_ms,
        left,
    };
    Ok(Run {
        pg: r,
        numbering: Some(numbering),
    })
}

/// One round of pgbench runs on a configuration, its listener running as in production.
async fn run_config(ctx: &Ctx, cfg: &Config, db: &str) -> Result<Vec<Run>> {
    let url = ctx.pg.url(db);
    let tag = format!("wp_{}", cfg.name.replace(['=', '-'], "_"));
    let server = match &cfg.setup {
        Setup::Plain => None,
        Setup::Orderpush(_) => {
            let mut spec = ctx.spec(Kind::Orderpush, false, &tag);
            spec.database_url = url.clone();
            Some(Server::start(&spec).await?)
        }
        Setup::Naive => {
            let mut spec: ServerSpec = ctx.spec(Kind::Node, true, &tag);
            spec.database_url = url.clone();
            Some(Server::start(&spec).await?)
        }
    };
    let mut runs = Vec::new();
    for &w in &ctx.args.writers {
        let c = pg::connect(&url).await?;
        c.batch_execute("CHECKPOINT").await?;
        drop(c);
        let r = match &cfg.setup {
            Setup::Orderpush(_) => pgbench_numbered(ctx, db, w).await,
            _ => pg::pgbench(&ctx.pg, db, w, ctx.args.pgbench_secs, &ctx.work_dir)
                .await
                .map(|pg| Run {
                    pg,
                    numbering: None,
                }),
        };
        match r {
            Ok(r) => {
                say(format!(
                    "write path {}: {w} writers: {:.0} tps, latency p50 {:.3} ms p99 {:.3} ms, {} failed{}",
                    cfg.name,
                    r.pg.tps,
                    r.pg.latency.p50,
                    r.pg.latency.p99,
                    r.pg.failed,
                    r.numbering
                        .map(|n| format!(
                            "; numbered {} of {} transactions, staged backlog max {} / at the end {}, empty {}{}",
                            n.numbered,
                            n.transactions,
                            n.max_backlog,
                            n.backlog_at_end,
                            n.drained_ms
                                .map(|ms| format!("{ms:.0} ms after pgbench"))
                                .unwrap_or("never".into()),
                            n.invalid().map(|w| format!(" — INVALID: {w}")).unwrap_or_default()
                        ))
                        .unwrap_or_default()
                ));
                runs.push(r);
            }
            Err(e) => ctx.note(format!(
                "pgbench {} with {w} writers failed: {e:#}",
                cfg.name
            )),
        }
    }
    if let Some(s) = server {
        s.stop().await?;
    }
    Ok(runs)
}

/// Numbering over all runs of one mode (every round, every writer count).
#[derive(Default)]
struct ModeNumbering {
    runs: usize,
    invalid_runs: usize,
    transactions: u64,
    numbered: i64,
    max_backlog: i64,
    max_left: i64,
    slowest_drain_ms: Option<f64>,
    never_drained: usize,
}

pub async fn run(ctx: &Ctx, res: &mut Results) -> Result<()> {
    let mut configs = vec![Config {
        name: "no-triggers".into(),
        setup: Setup::Plain,
    }];
    if ctx.has(Kind::Orderpush) {
        for m in &ctx.args.wakeup_modes {
            configs.push(Config {
                name: format!("wakeup={m}"),
                setup: Setup::Orderpush(m.clone()),
            });
        }
    }
    if ctx.has(Kind::Node) {
        configs.push(Config {
            name: "node-naive-notify".into(),
            setup: Setup::Naive,
        });
    }
    let mut dbs: BTreeMap<String, String> = BTreeMap::new();
    for cfg in &configs {
        match prepare(ctx, cfg).await {
            Ok(db) => {
                dbs.insert(cfg.name.clone(), db);
            }
            Err(e) => ctx.note(format!("scenario 4 config {} failed: {e:#}", cfg.name)),
        }
    }
    let mut all: BTreeMap<String, Vec<Run>> = BTreeMap::new();
    let mut numbering: BTreeMap<String, ModeNumbering> = BTreeMap::new();
    for round in 1..=ROUNDS {
        for cfg in &configs {
            let Some(db) = dbs.get(&cfg.name) else {
                continue;
            };
            super::ensure_idle(ctx, &format!("scenario 4 {}", cfg.name)).await;
            say(format!(
                "scenario 4 (write path), round {round}/{ROUNDS}: {}",
                cfg.name
            ));
            match run_config(ctx, cfg, db).await {
                Ok(runs) => {
                    let best = all.entry(cfg.name.clone()).or_default();
                    for r in runs {
                        if let Some(n) = r.numbering {
                            let m = numbering.entry(cfg.name.clone()).or_default();
                            m.runs += 1;
                            m.invalid_runs += usize::from(n.invalid().is_some());
                            m.transactions += n.transactions;
                            m.numbered += n.numbered;
                            m.max_backlog = m.max_backlog.max(n.max_backlog);
                            m.max_left = m.max_left.max(n.left);
                            match n.drained_ms {
                                Some(ms) => {
                                    m.slowest_drain_ms =
                                        Some(m.slowest_drain_ms.map_or(ms, |s| s.max(ms)))
                                }
                                None => m.never_drained += 1,
                            }
                        }
                        // A valid run beats an invalid one; then the higher throughput wins.
                        match best.iter_mut().find(|b| b.pg.writers == r.pg.writers) {
                            Some(b) if (b.valid(), b.pg.tps) >= (r.valid(), r.pg.tps) => {}
                            Some(b) => *b = r,
                            None => best.push(r),
                        }
                    }
                }
                Err(e) => ctx.note(format!("scenario 4 config {} failed: {e:#}", cfg.name)),
            }
        }
    }
    for (name, runs) in &all {
        res.write_tps.insert(
            name.clone(),
            runs.iter().map(|r| (r.pg.writers, r.pg.tps)).collect(),
        );
    }
    let get = |name: &str, w: usize| {
        all.get(name)
            .and_then(|v| v.iter().find(|r| r.pg.writers == w))
            .cloned()
    };
    let invalid = |r: &Option<Run>| {
        r.as_ref()
            .and_then(|r| r.numbering)
            .and_then(|n| n.invalid())
    };
    let numbering_text = |r: &Option<Run>| {
        r.as_ref()
            .and_then(|r| r.numbering)
            .map(|n| {
                format!(
                    "numbered {}/{}, staged backlog max {}, empty {} after pgbench",
                    n.numbered,
                    n.transactions,
                    n.max_backlog,
                    n.drained_ms
                        .map(|ms| format!("{ms:.0} ms"))
                        .unwrap_or("never".into())
                )
            })
            .unwrap_or("–".into())
    };
    let s = "4 write path";
    let naive = "node-naive-notify";
    let max_w = ctx.args.writers.iter().copied().max().unwrap_or(32);
    let min_w = ctx.args.writers.iter().copied().min().unwrap_or(1);
    for &w in &ctx.args.writers {
        let base = get("no-triggers", w);
        res.rows.push(
            Row::new(
                s,
                &format!("tps, no triggers, {w} writers"),
                "tx/s",
                Better::Higher,
            )
            .note(format!(
                "trigger-free reference: {}",
                base.as_ref()
                    .map(|b| format!("{:.0} tps, p50 {:.3} ms", b.pg.tps, b.pg.latency.p50))
                    .unwrap_or("–".into())
            ))
            .op(base.as_ref().map(|b| b.pg.tps)),
        );
        let share_of = |r: &Option<Run>| match (r, &base) {
            (Some(r), Some(b)) => Some(pct(r.pg.tps, b.pg.tps)),
            _ => None,
        };
        let share_text = |r: &Option<Run>| {
            share_of(r)
                .map(|v| format!("{v:.0} %"))
                .unwrap_or("–".into())
        };
        let n = get(naive, w);
        for m in &ctx.args.wakeup_modes {
            let o = get(&format!("wakeup={m}"), w);
            res.rows.push(
                Row::new(s, &format!("tps, triggers, wakeup={m}, {w} writers"), "tx/s", Better::Higher)
                    .op(o.as_ref().map(|r| r.pg.tps))
                    .node(n.as_ref().map(|r| r.pg.tps))
                    .invalid(invalid(&o))
                    .note(format!(
                        "share of trigger-free: orderpush {}, node naive {}; p50/p99 ms: orderpush {}, node {}; sequencer: {}",
                        share_text(&o),
                        share_text(&n),
                        o.as_ref().map(|r| format!("{:.3}/{:.3}", r.pg.latency.p50, r.pg.latency.p99)).unwrap_or("–".into()),
                        n.as_ref().map(|r| format!("{:.3}/{:.3}", r.pg.latency.p50, r.pg.latency.p99)).unwrap_or("–".into()),
                        numbering_text(&o),
                    )),
            );
        }
        if w == max_w && ctx.args.wakeup_modes.iter().any(|m| m == DEFAULT_MODE) {
            let o = get(&format!("wakeup={DEFAULT_MODE}"), w);
            res.rows.push(
                Row::new(
                    s,
                    &format!("share of trigger-free tps, wakeup={DEFAULT_MODE}, {w} writers"),
                    "%",
                    Better::Higher,
                )
                .op(share_of(&o))
                .node(share_of(&n))
                .target("≥ 75 %", |v| v >= 75.0)
                .moonshot("≥ 90 %", |v| v >= 90.0)
                .invalid(invalid(&o))
                .note(format!(
                    "the service running (its sequencer numbering every staged row); node: its naive NOTIFY triggers, its listener running; other modes: {}",
                    ctx.args
                        .wakeup_modes
                        .iter()
                        .filter(|m| *m != DEFAULT_MODE)
                        .map(|m| format!("{m} {}", share_text(&get(&format!("wakeup={m}"), w))))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            );
        }
    }
    // Added commit latency at the smallest writer count.
    let base = get("no-triggers", min_w);
    for m in &ctx.args.wakeup_modes {
        let o = get(&format!("wakeup={m}"), min_w);
        let n = get(naive, min_w);
        let added = |r: &Option<Run>| match (r, &base) {
            (Some(r), Some(b)) => Some(r.pg.latency.p50 - b.pg.latency.p50),
            _ => None,
        };
        let mut row = Row::new(
            s,
            &format!("added p50 commit latency, wakeup={m}, {min_w} writer"),
            "ms",
            // A difference of two noisy ~0.6 ms medians: a ratio of two of them means nothing.
            Better::Neither,
        )
        .op(added(&o))
        .node(added(&n))
        .invalid(invalid(&o))
        .note(format!(
            "trigger-free p50 {}",
            base.as_ref()
                .map(|b| format!("{:.3} ms", b.pg.latency.p50))
                .unwrap_or("–".into())
        ));
        if m == DEFAULT_MODE {
            row = row.target("≤ 0.2 ms", |v| v <= 0.2);
        }
        res.rows.push(row);
    }
    // Did the sequencer keep up, in every run of every mode?
    for m in &ctx.args.wakeup_modes {
        let Some(n) = numbering.get(&format!("wakeup={m}")) else {
            continue;
        };
        let all_numbered = n.invalid_runs == 0;
        res.rows.push(
            Row::new(
                s,
                &format!(
                    "staged rows left {} s after pgbench, wakeup={m}",
                    NUMBERED_WITHIN.as_secs()
                ),
                "rows",
                Better::Neither,
            )
            .op(Some(n.max_left as f64))
            .target("0, every committed row numbered", move |v| {
                v == 0.0 && all_numbered
            })
            .note(format!(
                "{} runs ({} invalid): {} rows numbered for {} committed transactions; staged backlog max {} rows during a run; slowest to empty {}{}",
                n.runs,
                n.invalid_runs,
                n.numbered,
                n.transactions,
                n.max_backlog,
                n.slowest_drain_ms
                    .map(|ms| format!("{ms:.0} ms after pgbench"))
                    .unwrap_or("–".into()),
                if n.never_drained > 0 {
                    format!(", {} runs never emptied within {} s", n.never_drained, NUMBERING_WAIT_MAX.as_secs())
                } else {
                    String::new()
                }
            )),
        );
    }
    Ok(())
}
