//! Scenario 7: the cost of following the log grows with events, not tenants. For each tenant
//! count (`--tenant-counts`, inserted with one `INSERT ... SELECT generate_series`), orderpush
//! runs with a handful of connected clients, and the CPU of the service process and of
//! Postgres's backends serving it is measured at rest (nothing written) and under load (orders
//! spread over all tenants). orderpush only: the Node baseline has no log to follow.
//!
//! CPU is read from `schedstat` (nanoseconds) of the service's threads and of the database's
//! backends: at rest the service uses a few thousandths of a core, a handful of the 10 ms clock
//! ticks of /proc/<pid>/stat over a 15 s window, too coarse for a 1.5× comparison. The service's
//! utime / stime split (clock ticks) is in the notes.

use anyhow::Result;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;
use tokio::sync::watch;

use super::commit::{Delivery, OrderClient, drain, judge, writer_conns};
use super::{Ctx, say};
use crate::clock::now_ns;
use crate::pg::{self, PgCpu, PgCpuUse};
use crate::report::{Better, Results, Row};
use crate::servers::{CpuMeter, CpuUse, Kind, Server, ThreadsCpu};
use crate::writer::{self, OrderLog, WATCHED_EVERY, WriterStats};
use crate::ws::{self, ClientCounters, Endpoint};

/// After the start and the clients' connects, before the at-rest window: the service's one-off
/// start-up work (seeding its memory, first gauge refresh, first presence flush) is not what
/// "at rest" means.
const SETTLE: Duration = Duration::from_secs(5);
/// How often the database's backends are listed and their CPU read during a window.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Largest tenant count judged against the smallest (larger ones are reported, not judged).
const JUDGED_UP_TO: usize = 10_000;
/// The target: cost at `JUDGED_UP_TO` tenants within this factor of the smallest count's.
const RATIO_MAX: f64 = 1.5;
/// Allowed on top of the factor: a thousandth of a core is below what a 15 s window tells apart
/// at rest (one extra run of a 2 s background job, a timer firing once more), so that 0.0015
/// against 0.0005 cores is not a 3× "regression".
const SLACK_CORES: f64 = 0.001;

/// CPU over one window.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    secs: f64,
    /// The service's threads, to the nanosecond.
    service: f64,
    /// The service process's utime / stime (clock ticks), for the split.
    service_split: CpuUse,
    pg: PgCpuUse,
}

impl Window {
    fn service_cores(&self) -> f64 {
        self.service / self.secs
    }
    fn pg_cores(&self) -> f64 {
        self.pg.service / self.secs
    }
}

/// One tenant count's figures.
struct Point {
    tenants: usize,
    insert_ms: f64,
    start_ms: f64,
    rss_start_mib: f64,
    rss_end_mib: f64,
    rest: Window,
    load: Window,
    writers: WriterStats,
    delivery: Delivery,
    clients: usize,
}

/// Measures CPU over `secs` while `work` runs to its end (at least `secs`).
async fn window<F: std::future::Future<Output = Result<T>>, T>(
    ctx: &Ctx,
    db: &str,
    pid: u32,
    secs: u64,
    work: F,
) -> Result<(Window, T)> {
    let mut pg_cpu = PgCpu::new(&ctx.pg, db).await?;
    let mut threads = ThreadsCpu::new(pid);
    pg_cpu.sample().await?;
    threads.sample();
    let meter = CpuMeter::start(pid);
    let t0 = now_ns();
    let until = t0 + secs * 1_000_000_000;
    let sampler = async {
        loop {
            tokio::time::sleep(SAMPLE_EVERY).await;
            pg_cpu.sample().await?;
            threads.sample();
            if now_ns() >= until {
                return Ok::<_, anyhow::Error>(());
            }
        }
    };
    let (sampled, out) = tokio::join!(sampler, work);
    sampled?;
    let out = out?;
    pg_cpu.sample().await?;
    threads.sample();
    let w = Window {
        secs: (now_ns() - t0) as f64 / 1e9,
        service: threads.used(),
        service_split: meter.read(),
        pg: pg_cpu.used(),
    };
    Ok((w, out))
}

async fn one(ctx: &Ctx, n: usize) -> Result<Point> {
    let a = &ctx.args;
    let bin = &ctx.orderpush_bin;
    let db = ctx.create_db(&format!("tn_{n}")).await?;
    let url = ctx.pg.url(&db);
    pg::orderpush_migrate(bin, &url).await?;
    let t = now_ns();
    pg::insert_tenants(&url, n).await?;
    let insert_ms = (now_ns() - t) as f64 / 1e6;
    let watched = a.tenants_clients.min(n);
    let keys = pg::orderpush_keys(bin, &url, watched).await?;
    let mut spec = ctx.spec(Kind::Orderpush, false, &format!("tenants_{n}"));
    spec.database_url = url.clone();
    let t = now_ns();
    let server = Server::start(&spec).await?;
    let start_ms = (now_ns() - t) as f64 / 1e6;
    let rss_start_mib = server.rss_kib()? as f64 / 1024.0;
    say(format!(
        "{n} tenants: inserted in {insert_ms:.0} ms; orderpush healthy {start_ms:.0} ms after its start, RSS {rss_start_mib:.1} MiB"
    ));
    let eps: Vec<Endpoint> = (0..watched)
        .map(|i| Endpoint {
            addr: spec.addr(),
            tenant: pg::tenant_slug(i),
            key: keys[i].clone(),
        })
        .collect();
    let counters = Arc::new(ClientCounters::default());
    let new_orders = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (clients, _) = super::connect_all(
        ctx,
        Kind::Orderpush,
        "tenants-scenario",
        &eps,
        |i| OrderClient::new(i, new_orders.clone()),
        &counters,
        false,
        &stop_rx,
    )
    .await;
    tokio::time::sleep(SETTLE).await;

    let (rest, ()) = window(ctx, &db, server.pid, a.tenants_secs, async {
        tokio::time::sleep(Duration::from_secs(a.tenants_secs)).await;
        Ok(())
    })
    .await?;
    say(format!(
        "{n} tenants at rest: service {:.4} cores, Postgres {:.4} cores ({} backends)",
        rest.service_cores(),
        rest.pg_cores(),
        rest.pg.backends
    ));

    let log = Arc::new(OrderLog::spread(n, watched, ctx.next_salt()));
    let stop = Arc::new(AtomicBool::new(false));
    let rate = a.tenants_rate;
    let (load, w) = window(
        ctx,
        &db,
        server.pid,
        a.tenants_secs,
        writer::run(
            &url,
            writer_conns(rate),
            rate,
            Duration::from_secs(a.tenants_secs),
            0,
            log.clone(),
            stop,
        ),
    )
    .await?;
    let expected = (w.first_idx..w.end_idx)
        .filter(|&i| log.tenant_of(i) < watched && log.committed_at(i).is_some())
        .count() as u64;
    drain(&new_orders, expected).await;
    let delivery = judge(&clients, &log, w.first_idx..w.end_idx);
    say(format!(
        "{n} tenants under {rate} orders/s: service {:.4} cores, Postgres {:.4} cores (writers' backends {:.4}); {} committed; watched clients: {} frames, commit->POS p50 {:.2} p99 {:.2} ms, lost {} dup {} ooo {}",
        load.service_cores(),
        load.pg_cores(),
        load.pg.bench / load.secs,
        w.committed,
        delivery.delivered,
        delivery.latency.p50,
        delivery.latency.p99,
        delivery.lost,
        delivery.dups,
        delivery.out_of_order
    ));
    if let Some(e) = &w.first_error {
        ctx.note(format!("tenants {n}: writer error: {e}"));
    }
    let connected = clients.len();
    ws::shutdown(clients, &stop_tx).await;
    let rss_end_mib = server.rss_kib()? as f64 / 1024.0;
    server.stop().await?;
    Ok(Point {
        tenants: n,
        insert_ms,
        start_ms,
        rss_start_mib,
        rss_end_mib,
        rest,
        load,
        writers: w,
        delivery,
        clients: connected,
    })
}

pub async fn run(ctx: &Ctx, res: &mut Results) -> Result<()> {
    if !ctx.has(Kind::Orderpush) {
        ctx.note("scenario 7 (tenants) measures orderpush only: skipped");
        return Ok(());
    }
    let mut counts = ctx.args.tenant_counts.clone();
    counts.sort_unstable();
    counts.dedup();
    let mut points = Vec::new();
    for &n in &counts {
        super::ensure_idle(ctx, &format!("scenario 7 with {n} tenants")).await;
        say(format!("scenario 7 (tenants): {n} tenants"));
        match one(ctx, n).await {
            Ok(p) => points.push(p),
            Err(e) => ctx.note(format!("scenario 7 with {n} tenants failed: {e:#}")),
        }
    }
    for p in &points {
        res.tenants_cpu.push((
            p.tenants,
            p.rest.service_cores(),
            p.rest.pg_cores(),
            p.load.service_cores(),
            p.load.pg_cores(),
        ));
    }
    let s = "7 tenants";
    let rate = ctx.args.tenants_rate;
    let base = points.first().map(|p| (p.tenants, p.rest, p.load));
    type Measure = fn(&Window) -> f64;
    let measures: [(&str, bool, Measure); 4] = [
        ("service CPU at rest", false, Window::service_cores),
        ("Postgres CPU at rest", false, Window::pg_cores),
        ("service CPU under load", true, Window::service_cores),
        ("Postgres CPU under load", true, Window::pg_cores),
    ];
    for p in &points {
        for (what, under_load, f) in measures {
            let w = if under_load { &p.load } else { &p.rest };
            let label = if under_load {
                format!("{what} ({rate:.0} orders/s), {} tenants", p.tenants)
            } else {
                format!("{what}, {} tenants", p.tenants)
            };
            let mut row = Row::new(s, &label, "cores", Better::Lower).op(Some(f(w)));
            if let Some((bn, brest, bload)) = base {
                let bw = if under_load { bload } else { brest };
                if p.tenants > bn && p.tenants <= JUDGED_UP_TO {
                    let limit = RATIO_MAX * f(&bw) + SLACK_CORES;
                    row = row.target(
                        &format!("≤ {RATIO_MAX}× the {bn}-tenant figure (+ {SLACK_CORES})"),
                        move |v| v <= limit,
                    );
                }
                if p.tenants > bn {
                    row = row.note(format!(
                        "{:.2}× the {bn}-tenant figure ({:.4} cores; {SLACK_CORES} cores allowed on top of {RATIO_MAX}×)",
                        f(w) / f(&bw),
                        f(&bw),
                    ));
                }
            }
            if what.starts_with("Postgres") {
                let extra = format!(
                    "the database's backends but the bench's own: the service's connections and autovacuum ({} backends seen){}",
                    w.pg.backends,
                    if under_load {
                        format!(
                            "; the writers' own backends {:.4} cores more",
                            w.pg.bench / w.secs
                        )
                    } else {
                        String::new()
                    }
                );
                row.note = if row.note.is_empty() {
                    extra
                } else {
                    format!("{}; {extra}", row.note)
                };
            } else {
                let extra = format!(
                    "from the threads' schedstat; utime {:.4} / stime {:.4} cores (clock ticks of /proc/<pid>/stat)",
                    w.service_split.user / w.secs,
                    w.service_split.sys / w.secs
                );
                row.note = if row.note.is_empty() {
                    extra
                } else {
                    format!("{}; {extra}", row.note)
                };
            }
            res.rows.push(row);
        }
        let d = &p.delivery;
        res.rows.push(
            Row::new(
                s,
                &format!("watched clients lost / duplicate / out-of-order, {} tenants", p.tenants),
                "frames",
                Better::Neither,
            )
            .op(Some((d.lost + d.dups + d.out_of_order) as f64))
            .target("0", |v| v == 0.0)
            .note(format!(
                "{} tenants inserted in {:.0} ms; orderpush healthy {:.0} ms after its start, RSS {:.1} MiB then, {:.1} MiB at the end; {} orders committed ({} late) over all tenants, every {WATCHED_EVERY}th to one of {} watched tenants with a client each: {} frames, commit→POS p50 {:.2} / p99 {:.2} ms, lost/dup/ooo {}/{}/{}",
                p.tenants,
                p.insert_ms,
                p.start_ms,
                p.rss_start_mib,
                p.rss_end_mib,
                p.writers.committed,
                p.writers.late,
                p.clients,
                d.delivered,
                d.latency.p50,
                d.latency.p99,
                d.lost,
                d.dups,
                d.out_of_order
            )),
        );
    }
    Ok(())
}
