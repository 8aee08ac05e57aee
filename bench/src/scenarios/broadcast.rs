//! Scenario 5: POST /broadcast with concurrent callers: accepted requests/s and latency, live
//! delivery to one client per tenant, and (orderpush) durability: every accepted event is
//! replayed to a client that reconnects with `?since=0`.

use anyhow::Result;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;

use super::{Ctx, broadcast_body, frame_seq, say};
use crate::clock::now_ns;
use crate::http::HttpConn;
use crate::report::{Better, Results, Row};
use crate::servers::{Kind, Server};
use crate::stats::Summary;
use crate::ws::{self, ClientCounters, ClientLogic};

/// Requests one caller sends at most (bounds the loop besides the phase's duration).
const MAX_REQUESTS_PER_CALLER: u64 = 200_000;
/// Wait for live deliveries / replays to finish.
const DRAIN: Duration = Duration::from_secs(15);
/// Event type of this scenario's broadcasts (replay counts only these).
const EVENT_TYPE: &str = "bench_broadcast";

/// Counts this scenario's events per tenant.
struct Counter {
    tenant: usize,
    per_tenant: Arc<Vec<AtomicU64>>,
    total: Arc<AtomicU64>,
}
impl ClientLogic for Counter {
    fn on_text(&mut self, text: &str, _at_ns: u64) {
        if let Some((kind, _, _)) = frame_seq(text) {
            if kind == EVENT_TYPE {
                self.per_tenant[self.tenant].fetch_add(1, Ordering::Relaxed);
                self.total.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

struct Outcome {
    accepted: u64,
    rejected: u64,
    errors: u64,
    rate: f64,
    latency: Summary,
    live_delivered: u64,
    durable: Option<u64>,
    cpu: f64,
    elapsed: f64,
}

async fn one(ctx: &Ctx, kind: Kind) -> Result<Outcome> {
    let a = &ctx.args;
    let server = Server::start(&ctx.spec(kind, false, "broadcast")).await?;
    let addr = server.spec.addr();
    let t = a.tenants;
    let per_tenant: Arc<Vec<AtomicU64>> = Arc::new((0..t).map(|_| AtomicU64::new(0)).collect());
    let total = Arc::new(AtomicU64::new(0));
    let counters = Arc::new(ClientCounters::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let eps = ctx.endpoints(kind, t, t);
    let (clients, _) = super::connect_all(
        ctx,
        kind,
        "broadcast-scenario",
        &eps,
        |i| Counter {
            tenant: i,
            per_tenant: per_tenant.clone(),
            total: total.clone(),
        },
        &counters,
        false,
        &stop_rx,
    )
    .await;
    let accepted_per_tenant: Arc<Vec<AtomicU64>> =
        Arc::new((0..t).map(|_| AtomicU64::new(0)).collect());
    let pad = Arc::new("x".repeat(a.payload_bytes));
    let cpu0 = crate::servers::cpu_secs(server.pid);
    let start = now_ns();
    let end = start + a.phase_secs * 1_000_000_000;
    let mut tasks = Vec::new();
    for c in 0..a.callers {
        let (acc, pad) = (accepted_per_tenant.clone(), pad.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = HttpConn::new(addr);
            let mut lat = Vec::new();
            let (mut ok, mut rejected, mut errors, mut unnumbered) = (0u64, 0u64, 0u64, 0u64);
            for k in 0..MAX_REQUESTS_PER_CALLER {
                if now_ns() >= end {
                    break;
                }
                let tenant = (c + k as usize * 7) % t;
                let body = broadcast_body(&crate::pg::tenant_slug(tenant), EVENT_TYPE, k, &pad);
                let t0 = now_ns();
                match conn.request("POST", "/broadcast", Some(&body)).await {
                    Ok((200, answer)) => {
                        lat.push(now_ns() - t0);
                        if !crate::http::broadcast_numbered(&answer) {
                            unnumbered += 1;
                        }
                        ok += 1;
                        acc[tenant].fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => rejected += 1,
                    Err(_) => errors += 1,
                }
            }
            (lat, ok, rejected, errors, unnumbered)
        }));
    }
    let mut lat = Vec::new();
    let (mut accepted, mut rejected, mut errors, mut unnumbered) = (0, 0, 0, 0u64);
    for task in tasks {
        let (l, o, r, e, u) = task.await?;
        unnumbered += u;
        lat.extend(l);
        accepted += o;
        rejected += r;
        errors += e;
    }
    let elapsed = (now_ns() - start) as f64 / 1e9;
    let cpu = crate::servers::cpu_secs(server.pid) - cpu0;
    let latency = Summary::of_ns(&mut lat);
    let until = now_ns() + DRAIN.as_nanos() as u64;
    while total.load(Ordering::Relaxed) < accepted && now_ns() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let live_delivered = total.load(Ordering::Relaxed);
    ws::shutdown(clients, &stop_tx).await;
    if unnumbered > 0 {
        ctx.note(format!(
            "{}: {unnumbered} accepted broadcasts answered \"numbered\": false (no sequencer numbered them within the answer's deadline)",
            kind.name()
        ));
    }
    say(format!(
        "{}: {accepted} accepted in {elapsed:.1} s = {:.0}/s, p50 {:.2} p99 {:.2} ms, {rejected} rejected, {errors} errors, live delivered {live_delivered}",
        kind.name(),
        accepted as f64 / elapsed,
        latency.p50,
        latency.p99
    ));

    // Durability: replay every tenant from the start and count this scenario's events.
    let durable = if kind == Kind::Orderpush {
        let replayed: Arc<Vec<AtomicU64>> = Arc::new((0..t).map(|_| AtomicU64::new(0)).collect());
        let rtotal = Arc::new(AtomicU64::new(0));
        let (stop2_tx, stop2_rx) = watch::channel(false);
        let mut clients = Vec::new();
        for (tenant, ep) in eps.iter().enumerate() {
            match ws::open(ep, Some(0)).await {
                Ok(w) => {
                    let st = Arc::new(std::sync::Mutex::new(Counter {
                        tenant,
                        per_tenant: replayed.clone(),
                        total: rtotal.clone(),
                    }));
                    let task = ws::spawn_reader(
                        w,
                        ep.clone(),
                        st.clone(),
                        counters.clone(),
                        false,
                        stop2_rx.clone(),
                        1,
                    );
                    clients.push(ws::Client { state: st, task });
                }
                Err(e) => ctx.note(format!("orderpush: replay connect failed: {e:#}")),
            }
        }
        let until = now_ns() + DRAIN.as_nanos() as u64;
        while rtotal.load(Ordering::Relaxed) < accepted && now_ns() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        ws::shutdown(clients, &stop2_tx).await;
        let mut missing = 0u64;
        for i in 0..t {
            let (a, r) = (
                accepted_per_tenant[i].load(Ordering::Relaxed),
                replayed[i].load(Ordering::Relaxed),
            );
            missing += a.saturating_sub(r);
        }
        if missing > 0 {
            ctx.note(format!(
                "orderpush: {missing} accepted broadcasts not replayed with ?since=0"
            ));
        }
        Some(accepted - missing.min(accepted))
    } else {
        None
    };
    server.stop().await?;
    Ok(Outcome {
        accepted,
        rejected,
        errors,
        rate: accepted as f64 / elapsed,
        latency,
        live_delivered,
        durable,
        cpu,
        elapsed,
    })
}

pub async fn run(ctx: &Ctx, res: &mut Results) -> Result<()> {
    let (op, nd) =
        super::on_each_server(ctx, "scenario 5 (/broadcast)", |kind| one(ctx, kind)).await;
    let s = "5 /broadcast";
    let c = ctx.args.callers;
    let desc = |o: &Option<Outcome>| {
        o.as_ref()
            .map(|o| {
                format!(
                    "server CPU {:.1} s in {:.1} s, {} accepted, {} rejected, {} errors, {} delivered live{}",
                    o.cpu,
                    o.elapsed,
                    o.accepted,
                    o.rejected,
                    o.errors,
                    o.live_delivered,
                    o.durable
                        .map(|d| format!(", {d} replayed from the table"))
                        .unwrap_or_default()
                )
            })
            .unwrap_or("–".into())
    };
    res.rows.push(
        Row::new(
            s,
            &format!("accepted broadcasts/s, {c} callers"),
            "req/s",
            Better::Higher,
        )
        .op(op.as_ref().map(|o| o.rate))
        .node(nd.as_ref().map(|o| o.rate))
        .target("≥ 5000/s, all durable", {
            let all_durable = op.as_ref().is_some_and(|o| o.durable == Some(o.accepted));
            move |v| v >= 5000.0 && all_durable
        })
        .note(format!(
            "orderpush: {}; node (in memory, nothing durable): {}",
            desc(&op),
            desc(&nd)
        )),
    );
    res.rows.push(
        Row::new(s, "request latency p50", "ms", Better::Lower)
            .op(op.as_ref().map(|o| o.latency.p50))
            .node(nd.as_ref().map(|o| o.latency.p50)),
    );
    res.rows.push(
        Row::new(s, "request latency p99", "ms", Better::Lower)
            .op(op.as_ref().map(|o| o.latency.p99))
            .node(nd.as_ref().map(|o| o.latency.p99))
            .target("≤ 20 ms", |v| v <= 20.0),
    );
    Ok(())
}
