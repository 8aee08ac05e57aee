//! Scenario 4: the application's write cost. pgbench runs the orders+items transaction at 1, 8
//! and 32 writers on the contract tables without triggers, with orderpush's triggers in each
//! wake-up mode (`ALTER DATABASE .. SET orderpush.wakeup`, its listener running), and with the
//! Node baseline's naive NOTIFY triggers (its listener running).

use anyhow::Result;
use std::collections::BTreeMap;

use super::{Ctx, DbSetup, pct, say};
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

/// Rounds over all configurations; each figure is the best round's. The machine is shared
/// (other sessions' builds and tests use the same cores and Postgres), so one unlucky 5 s run
/// should not decide a ratio; rounds interleave the configurations so a busy spell hits all.
const ROUNDS: usize = 2;

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

/// One round of pgbench runs on a configuration, its listener running as in production.
async fn run_config(ctx: &Ctx, cfg: &Config, db: &str) -> Result<Vec<PgbenchRun>> {
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
        let r = pg::pgbench(&ctx.pg, db, w, ctx.args.pgbench_secs, &ctx.work_dir).await;
        match r {
            Ok(r) => {
                say(format!(
                    "write path {}: {w} writers: {:.0} tps, latency p50 {:.3} ms p99 {:.3} ms, {} failed",
                    cfg.name, r.tps, r.latency.p50, r.latency.p99, r.failed
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
    let mut all: BTreeMap<String, Vec<PgbenchRun>> = BTreeMap::new();
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
                        match best.iter_mut().find(|b| b.writers == r.writers) {
                            Some(b) if b.tps >= r.tps => {}
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
            runs.iter().map(|r| (r.writers, r.tps)).collect(),
        );
    }
    let get = |name: &str, w: usize| {
        all.get(name)
            .and_then(|v| v.iter().find(|r| r.writers == w))
            .cloned()
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
                    .map(|b| format!("{:.0} tps, p50 {:.3} ms", b.tps, b.latency.p50))
                    .unwrap_or("–".into())
            ))
            .op(base.as_ref().map(|b| b.tps)),
        );
        for m in &ctx.args.wakeup_modes {
            let o = get(&format!("wakeup={m}"), w);
            let n = get(naive, w);
            let share = |r: &Option<PgbenchRun>| match (r, &base) {
                (Some(r), Some(b)) => format!("{:.0} %", pct(r.tps, b.tps)),
                _ => "–".into(),
            };
            let mut row = Row::new(s, &format!("tps, triggers, wakeup={m}, {w} writers"), "tx/s", Better::Higher)
                .op(o.as_ref().map(|r| r.tps))
                .node(n.as_ref().map(|r| r.tps))
                .note(format!(
                    "share of trigger-free: orderpush {}, node naive {}; p50/p99 ms: orderpush {}, node {}",
                    share(&o),
                    share(&n),
                    o.as_ref().map(|r| format!("{:.3}/{:.3}", r.latency.p50, r.latency.p99)).unwrap_or("–".into()),
                    n.as_ref().map(|r| format!("{:.3}/{:.3}", r.latency.p50, r.latency.p99)).unwrap_or("–".into()),
                ));
            if w == max_w {
                let b = base.as_ref().map(|b| b.tps);
                row = row.target("≥ 80 % of trigger-free", move |v| {
                    b.is_some_and(|b| v >= 0.8 * b)
                });
            }
            res.rows.push(row);
        }
    }
    // Added commit latency at the smallest writer count.
    let base = get("no-triggers", min_w);
    for m in &ctx.args.wakeup_modes {
        let o = get(&format!("wakeup={m}"), min_w);
        let n = get(naive, min_w);
        let added = |r: &Option<PgbenchRun>| match (r, &base) {
            (Some(r), Some(b)) => Some(r.latency.p50 - b.latency.p50),
            _ => None,
        };
        res.rows.push(
            Row::new(
                s,
                &format!("added p50 commit latency, wakeup={m}, {min_w} writer"),
                "ms",
                // A difference of two noisy ~0.6 ms medians: a ratio of two of them means nothing.
                Better::Neither,
            )
            .op(added(&o))
            .node(added(&n))
            .target("≤ 1 ms", |v| v <= 1.0)
            .note(format!(
                "trigger-free p50 {}",
                base.as_ref()
                    .map(|b| format!("{:.3} ms", b.latency.p50))
                    .unwrap_or("–".into())
            )),
        );
    }
    Ok(())
}
