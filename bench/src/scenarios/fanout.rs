//! Scenario 2: one tenant with many clients; /broadcast at a steady rate (time until the LAST
//! client has each event) and then with a bounded window of events in flight (deliveries/s at
//! saturation).

use anyhow::Result;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;

use super::{Ctx, broadcast_body, frame_seq, say};
use crate::clock::{instant_at, now_ns};
use crate::http::HttpConn;
use crate::report::{Better, Results, Row};
use crate::servers::{Kind, Server};
use crate::stats::Summary;
use crate::ws::{self, ClientCounters, ClientLogic};

/// Events tracked per run at most (sizes the per-event arrays; saturation rarely passes 5,000).
const MAX_EVENTS: usize = 100_000;
/// Concurrent senders in the steady phase, so one slow POST does not delay the schedule.
const STEADY_SENDERS: usize = 4;
/// Events in flight (sent, not yet at every live client) in the saturation phase: enough to
/// keep the server busy, bounded so that a server without back-pressure cannot queue unboundedly.
const WINDOW: u64 = 8;
/// After the phases, how long to wait for stragglers before judging what arrived.
const DRAIN: Duration = Duration::from_secs(10);
/// An event that has not reached every live client after this long stops holding the window.
const STALL: Duration = Duration::from_secs(2);
/// Poll interval of the window / drain loops.
const TICK: Duration = Duration::from_micros(200);
/// Event type of this scenario's broadcasts.
const EVENT_TYPE: &str = "bench_fanout";

struct Shared {
    count: Vec<AtomicU32>,
    last: Vec<AtomicU64>,
    sent: Vec<AtomicU64>,
    answered: Vec<AtomicU64>,
}

struct FanClient(Arc<Shared>);
impl ClientLogic for FanClient {
    fn on_text(&mut self, text: &str, at_ns: u64) {
        if let Some(seq) = quick_seq(text) {
            let seq = seq as usize;
            if seq < MAX_EVENTS {
                self.0.count[seq].fetch_add(1, Ordering::Relaxed);
                self.0.last[seq].fetch_max(at_ns, Ordering::Relaxed);
            }
        }
    }
}

/// The `seq` of a fan-out frame without a full JSON parse: the load generator shares the two
/// cores with the server, so its per-frame cost must stay far below the server's. The frame is
/// ours (`{"type":"bench_fanout",...,"data":{"seq":N,...}}`); anything else falls back to serde.
fn quick_seq(text: &str) -> Option<u64> {
    if !text.contains(EVENT_TYPE) {
        return None;
    }
    match text.find("\"seq\":") {
        Some(i) => {
            let digits = text[i + 6..].trim_start();
            let end = digits
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(digits.len());
            digits[..end].parse().ok()
        }
        None => frame_seq(text).and_then(|(_, _, s)| s),
    }
}

pub struct Outcome {
    pub clients: usize,
    pub steady: Summary,
    pub answer: Summary,
    pub steady_incomplete: usize,
    pub sat_events: u64,
    pub sat_deliveries: u64,
    pub sat_rate: f64,
    pub sat_latency: Summary,
    pub post_failures: u64,
    pub disconnects: u64,
    pub close_1013: u64,
    pub cpu_server: f64,
    pub cpu_self: f64,
}

async fn one(ctx: &Ctx, kind: Kind) -> Result<Outcome> {
    let a = &ctx.args;
    let server = Server::start(&ctx.spec(kind, false, "fanout")).await?;
    let addr = server.spec.addr();
    let sh = Arc::new(Shared {
        count: (0..MAX_EVENTS).map(|_| AtomicU32::new(0)).collect(),
        last: (0..MAX_EVENTS).map(|_| AtomicU64::new(0)).collect(),
        sent: (0..MAX_EVENTS).map(|_| AtomicU64::new(0)).collect(),
        answered: (0..MAX_EVENTS).map(|_| AtomicU64::new(0)).collect(),
    });
    let counters = Arc::new(ClientCounters::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let eps = ctx.endpoints(kind, a.clients, 1);
    let (clients, _) = super::connect_all(
        ctx,
        kind,
        "fan-out",
        &eps,
        |_| FanClient(sh.clone()),
        &counters,
        false,
        &stop_rx,
    )
    .await;
    let n = clients.len();
    say(format!("{}: {n} clients on one tenant", kind.name()));
    let live = || n.saturating_sub(counters.disconnects.load(Ordering::Relaxed) as usize) as u32;
    let pad = "x".repeat(a.payload_bytes);
    let tenant = crate::pg::tenant_slug(0);
    let post_failures = Arc::new(AtomicU64::new(0));

    // Steady phase: `fanout_rate` events/s, scheduled, over a few keep-alive connections.
    let steady_n = ((a.fanout_rate * (2 * a.phase_secs) as f64) as usize).clamp(1, MAX_EVENTS / 2);
    let next = Arc::new(AtomicU64::new(0));
    let t0 = now_ns() + 20_000_000;
    let interval = 1e9 / a.fanout_rate;
    let mut senders = Vec::new();
    for _ in 0..STEADY_SENDERS {
        let (sh, next, pad, tenant, pf) = (
            sh.clone(),
            next.clone(),
            pad.clone(),
            tenant.clone(),
            post_failures.clone(),
        );
        senders.push(tokio::spawn(async move {
            let mut conn = HttpConn::new(addr);
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed) as usize;
                if k >= steady_n {
                    break;
                }
                tokio::time::sleep_until(instant_at(t0 + (k as f64 * interval) as u64).into())
                    .await;
                let body = broadcast_body(&tenant, EVENT_TYPE, k as u64, &pad);
                sh.sent[k].store(now_ns(), Ordering::Relaxed);
                match conn.request("POST", "/broadcast", Some(&body)).await {
                    Ok((200, _)) => sh.answered[k].store(now_ns(), Ordering::Relaxed),
                    _ => {
                        pf.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for s in senders {
        s.await?;
    }
    let drain_until = now_ns() + DRAIN.as_nanos() as u64;
    while now_ns() < drain_until
        && (0..steady_n).any(|k| sh.count[k].load(Ordering::Relaxed) < live())
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut lat = Vec::new();
    let mut incomplete = 0;
    for k in 0..steady_n {
        if sh.count[k].load(Ordering::Relaxed) >= live() && live() > 0 {
            lat.push(
                sh.last[k]
                    .load(Ordering::Relaxed)
                    .saturating_sub(sh.sent[k].load(Ordering::Relaxed)),
            );
        } else {
            incomplete += 1;
        }
    }
    let steady = Summary::of_ns(&mut lat);
    let mut answer: Vec<u64> = (0..steady_n)
        .map(|k| {
            sh.answered[k]
                .load(Ordering::Relaxed)
                .saturating_sub(sh.sent[k].load(Ordering::Relaxed))
        })
        .collect();
    let answer = Summary::of_ns(&mut answer);
    say(format!(
        "{}: steady {} ev/s: last-client p50 {:.1} ms p99 {:.1} ms max {:.1} ms ({incomplete} incomplete); POST answered p50 {:.1} ms",
        kind.name(),
        a.fanout_rate,
        steady.p50,
        steady.p99,
        steady.max,
        answer.p50
    ));

    // Saturation phase: keep WINDOW events in flight for phase_secs.
    let cpu_server0 = crate::servers::cpu_secs(server.pid);
    let cpu_self0 = crate::servers::cpu_secs(0);
    let base = steady_n;
    let mut k = base;
    let mut oldest = base;
    let mut oldest_since = now_ns();
    let mut conn = HttpConn::new(addr);
    let end = now_ns() + a.phase_secs * 1_000_000_000;
    let drain_end = end + DRAIN.as_nanos() as u64;
    loop {
        let now = now_ns();
        while oldest < k && sh.count[oldest].load(Ordering::Relaxed) >= live() {
            oldest += 1;
            oldest_since = now;
        }
        if oldest < k && now - oldest_since > STALL.as_nanos() as u64 {
            oldest += 1;
            oldest_since = now;
        }
        if now >= end {
            if oldest >= k || now >= drain_end {
                break;
            }
        } else if ((k - oldest) as u64) < WINDOW && k < MAX_EVENTS {
            if oldest == k {
                oldest_since = now;
            }
            let body = broadcast_body(&tenant, EVENT_TYPE, k as u64, &pad);
            sh.sent[k].store(now_ns(), Ordering::Relaxed);
            match conn.request("POST", "/broadcast", Some(&body)).await {
                Ok((200, _)) => {}
                _ => {
                    post_failures.fetch_add(1, Ordering::Relaxed);
                }
            }
            k += 1;
            continue;
        }
        tokio::time::sleep(TICK).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cpu_server = crate::servers::cpu_secs(server.pid) - cpu_server0;
    let cpu_self = crate::servers::cpu_secs(0) - cpu_self0;
    let mut deliveries = 0u64;
    let mut last_at = 0u64;
    let mut sat_lat = Vec::new();
    for e in base..k {
        let c = sh.count[e].load(Ordering::Relaxed) as u64;
        deliveries += c;
        let l = sh.last[e].load(Ordering::Relaxed);
        last_at = last_at.max(l);
        if c > 0 {
            sat_lat.push(l.saturating_sub(sh.sent[e].load(Ordering::Relaxed)));
        }
    }
    let first_sent = sh.sent[base].load(Ordering::Relaxed);
    let secs = (last_at.saturating_sub(first_sent)) as f64 / 1e9;
    let sat_rate = if secs > 0.0 {
        deliveries as f64 / secs
    } else {
        f64::NAN
    };
    let sat_latency = Summary::of_ns(&mut sat_lat);
    say(format!(
        "{}: saturation: {} events, {deliveries} deliveries in {secs:.2} s = {sat_rate:.0}/s; CPU s: server {cpu_server:.2}, load generator {cpu_self:.2}",
        kind.name(),
        k - base
    ));
    let disconnects = counters.disconnects.load(Ordering::Relaxed);
    let close_1013 = counters.close_1013.load(Ordering::Relaxed);
    ws::shutdown(clients, &stop_tx).await;
    server.stop().await?;
    Ok(Outcome {
        clients: n,
        steady,
        answer,
        steady_incomplete: incomplete,
        sat_events: (k - base) as u64,
        sat_deliveries: deliveries,
        sat_rate,
        sat_latency,
        post_failures: post_failures.load(Ordering::Relaxed),
        disconnects,
        close_1013,
        cpu_server,
        cpu_self,
    })
}

pub async fn run(ctx: &Ctx, res: &mut Results) -> Result<()> {
    let (op, nd) = super::on_each_server(ctx, "scenario 2 (fan-out)", |kind| one(ctx, kind)).await;
    for (kind, o) in [(Kind::Orderpush, &op), (Kind::Node, &nd)] {
        if let Some(o) = o {
            res.fanout_latency.insert(
                kind.name().into(),
                vec![(
                    ctx.args.fanout_rate,
                    o.steady.p50,
                    o.steady.p99,
                    o.steady.max,
                )],
            );
        }
    }
    let s = "2 fan-out";
    let n = ctx.args.clients;
    let info = |o: &Option<Outcome>| {
        o.as_ref()
            .map(|o| {
                format!(
                    "{} clients, POST answered p50 {:.1} ms, {} incomplete events, {} failed POSTs, {} disconnects ({} with 1013)",
                    o.clients, o.answer.p50, o.steady_incomplete, o.post_failures, o.disconnects, o.close_1013
                )
            })
            .unwrap_or("–".into())
    };
    res.rows.push(
        Row::new(s, &format!("last-client latency p50, 1 tenant × {n}, {} ev/s", ctx.args.fanout_rate), "ms", Better::Lower)
            .op(op.as_ref().map(|o| o.steady.p50))
            .node(nd.as_ref().map(|o| o.steady.p50))
            .note("from the POST leaving the caller to the frame at the last client (orderpush answers only once the event is durable)"),
    );
    res.rows.push(
        Row::new(s, "last-client latency p99", "ms", Better::Lower)
            .op(op.as_ref().map(|o| o.steady.p99))
            .node(nd.as_ref().map(|o| o.steady.p99))
            .target("≤ 40 ms", |v| v <= 40.0)
            .note(format!("orderpush: {}; node: {}", info(&op), info(&nd))),
    );
    res.rows.push(
        Row::new(s, "last-client latency max", "ms", Better::Lower)
            .op(op.as_ref().map(|o| o.steady.max))
            .node(nd.as_ref().map(|o| o.steady.max)),
    );
    let node_rate = nd.as_ref().map(|o| o.sat_rate);
    res.rows.push(
        Row::new(s, &format!("deliveries/s at saturation ({WINDOW} events in flight)"), "msg/s", Better::Higher)
            .op(op.as_ref().map(|o| o.sat_rate))
            .node(node_rate)
            .target("≥ 3× Node", |v| node_rate.is_some_and(|n| v >= 3.0 * n))
            .note(format!(
                "events/deliveries (server CPU s, load-generator CPU s): orderpush {}, node {}; last-client p99 under saturation: orderpush {}, node {} ms",
                op.as_ref().map(|o| format!("{}/{} ({:.1}, {:.1})", o.sat_events, o.sat_deliveries, o.cpu_server, o.cpu_self)).unwrap_or("–".into()),
                nd.as_ref().map(|o| format!("{}/{} ({:.1}, {:.1})", o.sat_events, o.sat_deliveries, o.cpu_server, o.cpu_self)).unwrap_or("–".into()),
                op.as_ref().map(|o| format!("{:.1}", o.sat_latency.p99)).unwrap_or("–".into()),
                nd.as_ref().map(|o| format!("{:.1}", o.sat_latency.p99)).unwrap_or("–".into()),
            )),
    );
    Ok(())
}
