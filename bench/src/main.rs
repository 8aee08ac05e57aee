//! orderpush-bench entry point: parses options, prepares databases and servers, runs the
//! selected scenarios against orderpush and the Node baseline, prints the table and writes
//! docs/benchmarks.md plus the chart.

mod clock;
mod config;
mod http;
mod pg;
mod report;
mod scenarios;
mod servers;
mod stats;
mod writer;
mod ws;

use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

use config::Args;
use report::Results;
use scenarios::{Ctx, say};

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match Args::parse(&argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e:#}");
            std::process::exit(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(args, argv)) {
        eprintln!("orderpush-bench failed: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args, argv: Vec<String>) -> Result<()> {
    clock::epoch();
    let nofile = servers::raise_nofile();
    if args.scenarios.iter().any(|s| s == "cleanup") {
        let pg = pg::PgConfig {
            host: args.pg_host.clone(),
            port: args.pg_port,
            user: args.pg_user.clone(),
        };
        for d in pg::drop_leftovers(&pg).await? {
            println!("dropped {d}");
        }
        return Ok(());
    }
    let started = chrono_like_now();
    let mut ctx = Ctx::new(args.clone()).await?;
    say(format!(
        "run {} (open-file limit {nofile}); logs in {}",
        ctx.run_id,
        ctx.work_dir.display()
    ));
    if (nofile as usize) < args.clients + 1000 {
        ctx.note(format!(
            "open-file limit {nofile} is tight for {} client sockets",
            args.clients
        ));
    }
    let mut res = Results {
        command: format!(
            "cargo run --release --manifest-path bench/Cargo.toml -- {}",
            argv.join(" ")
        )
        .trim()
        .to_string(),
        started,
        machine: machine(&ctx).await,
        ..Default::default()
    };
    let t0 = clock::now_ns();
    let outcome = run_scenarios(&mut ctx, &mut res).await;
    ctx.cleanup().await;
    outcome?;
    res.duration_s = (clock::now_ns() - t0) as f64 / 1e9;
    res.notes = ws::lock(&ctx.notes).clone();
    println!();
    report::print_table(&res);
    let json = ctx.args.out_dir.join("results.json");
    std::fs::write(&json, serde_json::to_vec_pretty(&res)?)?;
    std::fs::write(
        ctx.work_dir.join("results.json"),
        serde_json::to_vec_pretty(&res)?,
    )?;
    println!("\nresults: {}", json.display());
    if ctx.args.write_docs && !ctx.args.no_docs {
        let docs = &ctx.args.docs;
        let png = docs.with_file_name("benchmarks.png");
        let chart = match plot(&ctx.args.repo, &json, &png).await {
            Ok(()) => Some("benchmarks.png"),
            Err(e) => {
                eprintln!("chart not drawn: {e:#}");
                None
            }
        };
        report::write_docs(docs, &report::markdown(&res, chart))?;
        println!(
            "wrote {}{}",
            docs.display(),
            if chart.is_some() {
                " and the chart"
            } else {
                ""
            }
        );
    }
    Ok(())
}

async fn run_scenarios(ctx: &mut Ctx, res: &mut Results) -> Result<()> {
    ctx.setup_main().await?;
    for s in ctx.args.scenarios.clone() {
        let r = match s.as_str() {
            "connections" => scenarios::connections::run(ctx, res).await,
            "fanout" => scenarios::fanout::run(ctx, res).await,
            "commit" => scenarios::commit::run(ctx, res).await,
            "writepath" => scenarios::writepath::run(ctx, res).await,
            "broadcast" => scenarios::broadcast::run(ctx, res).await,
            "storm" => scenarios::storm::run(ctx, res).await,
            "tenants" => scenarios::tenants::run(ctx, res).await,
            _ => Ok(()),
        };
        if let Err(e) = r {
            ctx.note(format!("scenario {s} failed: {e:#}"));
        }
    }
    Ok(())
}

/// Draws the chart with bench/plot.py (matplotlib).
async fn plot(repo: &Path, json: &Path, png: &Path) -> Result<()> {
    let script = repo.join("bench/plot.py");
    pg::run_cmd(
        tokio::process::Command::new("python3")
            .arg(&script)
            .arg(json)
            .arg(png),
    )
    .await
    .context("python3 bench/plot.py (needs matplotlib: pip install matplotlib)")?;
    Ok(())
}

/// UTC wall-clock time as `YYYY-MM-DD HH:MM UTC` without a date crate.
fn chrono_like_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let (h, m) = ((secs % 86_400) / 3600, (secs % 3600) / 60);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if mo <= 2 { 1 } else { 0 };
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02} UTC")
}

/// Facts about the machine and the versions under test.
async fn machine(ctx: &Ctx) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let cmd = |prog: &str, args: &[&str]| {
        let mut c = tokio::process::Command::new(prog);
        c.args(args);
        c
    };
    let first_line = |s: String| s.lines().next().unwrap_or("").trim().to_string();
    m.insert(
        "cores (nproc)".into(),
        std::thread::available_parallelism()
            .map(|n| n.to_string())
            .unwrap_or_default(),
    );
    if let Ok(mi) = std::fs::read_to_string("/proc/meminfo") {
        if let Some(l) = mi.lines().find(|l| l.starts_with("MemTotal")) {
            let kib: u64 = l
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            m.insert(
                "memory".into(),
                format!("{:.1} GiB", kib as f64 / 1048576.0),
            );
        }
    }
    if let Ok(ci) = std::fs::read_to_string("/proc/cpuinfo") {
        if let Some(l) = ci.lines().find(|l| l.starts_with("model name")) {
            m.insert(
                "cpu".into(),
                l.split(':').nth(1).unwrap_or("").trim().to_string(),
            );
        }
    }
    if let Ok(k) = std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        m.insert("kernel".into(), k.trim().to_string());
    }
    if let Ok(o) = pg::run_cmd(&mut cmd("node", &["--version"])).await {
        m.insert("node".into(), first_line(o));
    }
    if let Ok(o) = pg::run_cmd(&mut cmd("pgbench", &["--version"])).await {
        m.insert("pgbench".into(), first_line(o));
    }
    if let Ok(c) = pg::connect(&ctx.pg.url("postgres")).await {
        if let Ok(r) = c.query_one("SELECT version()", &[]).await {
            let v: String = r.get(0);
            m.insert(
                "postgres".into(),
                v.split(" on ").next().unwrap_or(&v).to_string(),
            );
        }
        if let Ok(r) = c.query_one("SELECT current_setting('synchronous_commit') || ', max_connections ' || current_setting('max_connections') || ', shared_buffers ' || current_setting('shared_buffers')", &[]).await {
            let v: String = r.get(0);
            m.insert("postgres settings".into(), format!("synchronous_commit {v}"));
        }
    }
    if let Ok(o) = pg::run_cmd(&mut cmd("rustc", &["--version"])).await {
        m.insert("rustc".into(), first_line(o));
    }
    if ctx.has(servers::Kind::Orderpush) {
        let bin = &ctx.orderpush_bin;
        let rev =
            pg::run_cmd(cmd("git", &["rev-parse", "--short", "HEAD"]).current_dir(&ctx.args.repo))
                .await
                .map(first_line)
                .unwrap_or_else(|_| "no commit".into());
        let dirty = pg::run_cmd(
            cmd(
                "git",
                &[
                    "status",
                    "--porcelain",
                    "--",
                    "src",
                    "migrations",
                    "Cargo.toml",
                ],
            )
            .current_dir(&ctx.args.repo),
        )
        .await
        .map(|o| !o.trim().is_empty())
        .unwrap_or(false);
        let built = std::fs::metadata(bin)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .map(|age| format!("binary built {} min before the run; ", age.as_secs() / 60))
            .unwrap_or_default();
        m.insert(
            "orderpush".into(),
            format!(
                "{} ({built}repo HEAD {rev}{})",
                bin.display(),
                if dirty { ", uncommitted changes" } else { "" }
            ),
        );
    }
    m.insert("load generator".into(), "orderpush-bench (tokio + tokio-tungstenite 0.29) on the same 2 cores as the servers and Postgres".into());
    m
}
