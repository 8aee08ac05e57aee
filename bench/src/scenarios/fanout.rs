//! Scenario 2: one tenant with many clients. At the largest client count (`--clients`),
//! /broadcast at a steady rate: time until the LAST client has each event, and the server's CPU
//! per delivery split into user space and kernel. Then, at every client count of the curve
//! (`--fanout-curve` and `--clients`), a bounded window of events in flight: deliveries/s and
//! CPU per delivery at saturation.

use anyhow::Result;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{Semaphore, watch};

use super::{Ctx, broadcast_body, frame_seq, say};
use crate::clock::{instant_at, now_ns};
use crate::http::{self, HttpConn};
use crate::report::{Better, Results, Row};
use crate::servers::{CpuMeter, CpuUse, Kind, Server};
use crate::stats::Summary;
use crate::ws::{self, ClientCounters, ClientLogic};

/// Events tracked per client count at most (sizes the per-event arrays; saturation with 200
/// clients stays below 10,000 events/s, so 100,000 covers a 10 s phase).
const MAX_EVENTS: usize = 100_000;
/// Concurrent senders in the steady phase, so one slow POST does not delay the schedule.
const STEADY_SENDERS: usize = 4;
/// Events in flight (sent, not yet at every live client) in the saturation phase, each with a
/// sender of its own (orderpush answers a POST once the event is numbered, so one sender
/// would measure the answer's latency, not the fan-out): enough to keep the server busy,
/// bounded so that a server without back-pressure cannot queue unboundedly.
const WINDOW: usize = 8;
/// After a phase, how long to wait for stragglers before judging what arrived.
const DRAIN: Duration = Duration::from_secs(10);
/// An event that has not reached every live client after this long stops holding the window.
const STALL: Duration = Duration::from_secs(2);
/// Poll interval of the window / drain loops.
const TICK: Duration = Duration::from_micros(200);
/// Pause after connecting, so the server has subscribed every client before the first event.
const CONNECTED_SETTLE: Duration = Duration::from_millis(500);
/// Event type of this scenario's broadcasts.
const EVENT_TYPE: &str = "bench_fanout";

/// Per-event arrival counts and times, shared by the clients of one client count.
struct Shared {
    count: Vec<AtomicU32>,
    last: Vec<AtomicU64>,
    sent: Vec<AtomicU64>,
    answered: Vec<AtomicU64>,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            count: (0..MAX_EVENTS).map(|_| AtomicU32::new(0)).collect(),
            last: (0..MAX_EVENTS).map(|_| AtomicU64::new(0)).collect(),
            sent: (0..MAX_EVENTS).map(|_| AtomicU64::new(0)).collect(),
            answered: (0..MAX_EVENTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    fn complete(&self, k: usize, live: u32) -> bool {
        live > 0 && self.count[k].load(Ordering::Relaxed) >= live
    }
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

/// orderpush's direct-write counters over a phase: (frames sent, of which written directly).
type Direct = Option<(f64, f64)>;

fn direct_delta(a: Direct, b: Direct) -> Direct {
    match (a, b) {
        (Some(a), Some(b)) => Some((b.0 - a.0, b.1 - a.1)),
        _ => None,
    }
}

/// The steady phase at the largest client count.
pub struct Steady {
    pub latency: Summary,
    pub answer: Summary,
    pub incomplete: usize,
    pub events: usize,
    pub deliveries: u64,
    pub cpu: CpuUse,
    pub cpu_self: CpuUse,
    pub direct: Direct,
}

/// The saturation phase at one client count.
pub struct Saturated {
    /// Clients asked for (the curve's x) and clients connected.
    pub requested: usize,
    pub clients: usize,
    pub events: u64,
    pub deliveries: u64,
    pub rate: f64,
    pub latency: Summary,
    pub cpu: CpuUse,
    pub cpu_self: CpuUse,
    pub direct: Direct,
}

impl Saturated {
    /// Server CPU µs per delivery: (total, user, system).
    fn per_delivery(&self) -> (f64, f64, f64) {
        per_delivery(self.cpu, self.deliveries)
    }
}

/// CPU µs per delivery: (total, user, system); NaN without deliveries.
fn per_delivery(cpu: CpuUse, deliveries: u64) -> (f64, f64, f64) {
    if deliveries == 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let d = deliveries as f64 / 1e6;
    (cpu.total() / d, cpu.user / d, cpu.sys / d)
}

pub struct Outcome {
    pub clients: usize,
    pub steady: Option<Steady>,
    pub curve: Vec<Saturated>,
    pub post_failures: u64,
    pub unnumbered: u64,
    pub disconnects: u64,
    pub close_1013: u64,
}

/// What the phases of one client count share.
struct Phase<'a> {
    kind: Kind,
    addr: SocketAddr,
    pid: u32,
    sh: Arc<Shared>,
    counters: &'a ClientCounters,
    requested: usize,
    clients: usize,
    body: Arc<dyn Fn(u64) -> Vec<u8> + Send + Sync>,
    post_failures: Arc<AtomicU64>,
    unnumbered: Arc<AtomicU64>,
}

impl Phase<'_> {
    fn live(&self) -> u32 {
        self.clients
            .saturating_sub(self.counters.disconnects.load(Ordering::Relaxed) as usize)
            as u32
    }

    async fn direct(&self) -> Direct {
        match self.kind {
            Kind::Orderpush => http::frame_counters(self.addr).await,
            Kind::Node => None,
        }
    }
}

/// Records the answer of a POST (failed, or answered but not numbered); true if answered 200.
fn answered(r: &Result<(u16, Vec<u8>)>, failures: &AtomicU64, unnumbered: &AtomicU64) -> bool {
    match r {
        Ok((200, body)) => {
            if !http::broadcast_numbered(body) {
                unnumbered.fetch_add(1, Ordering::Relaxed);
            }
            true
        }
        _ => {
            failures.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

/// `fanout_rate` events/s, scheduled, over a few keep-alive connections; events `0..n`.
async fn steady(ctx: &Ctx, p: &Phase<'_>) -> Result<Steady> {
    let a = &ctx.args;
    let steady_n = ((a.fanout_rate * (2 * a.phase_secs) as f64) as usize).clamp(1, MAX_EVENTS / 2);
    let next = Arc::new(AtomicU64::new(0));
    let direct0 = p.direct().await;
    let cpu = CpuMeter::start(p.pid);
    let me = CpuMeter::start(0);
    let t0 = now_ns() + 20_000_000;
    let interval = 1e9 / a.fanout_rate;
    let mut senders = Vec::new();
    for _ in 0..STEADY_SENDERS {
        let (sh, next, body, pf, un, addr) = (
            p.sh.clone(),
            next.clone(),
            p.body.clone(),
            p.post_failures.clone(),
            p.unnumbered.clone(),
            p.addr,
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
                let b = body(k as u64);
                sh.sent[k].store(now_ns(), Ordering::Relaxed);
                let r = conn.request("POST", "/broadcast", Some(&b)).await;
                if answered(&r, &pf, &un) {
                    sh.answered[k].store(now_ns(), Ordering::Relaxed);
                }
            }
        }));
    }
    for s in senders {
        s.await?;
    }
    let drain_until = now_ns() + DRAIN.as_nanos() as u64;
    while now_ns() < drain_until && (0..steady_n).any(|k| !p.sh.complete(k, p.live())) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (cpu, cpu_self) = (cpu.read(), me.read());
    let direct = direct_delta(direct0, p.direct().await);
    let mut lat = Vec::new();
    let mut incomplete = 0;
    let mut deliveries = 0u64;
    for k in 0..steady_n {
        deliveries += p.sh.count[k].load(Ordering::Relaxed) as u64;
        if p.sh.complete(k, p.live()) {
            lat.push(
                p.sh.last[k]
                    .load(Ordering::Relaxed)
                    .saturating_sub(p.sh.sent[k].load(Ordering::Relaxed)),
            );
        } else {
            incomplete += 1;
        }
    }
    let latency = Summary::of_ns(&mut lat);
    let mut answer: Vec<u64> = (0..steady_n)
        .map(|k| {
            p.sh.answered[k]
                .load(Ordering::Relaxed)
                .saturating_sub(p.sh.sent[k].load(Ordering::Relaxed))
        })
        .collect();
    let answer = Summary::of_ns(&mut answer);
    let (us, us_user, us_sys) = per_delivery(cpu, deliveries);
    say(format!(
        "{}: steady {} ev/s to {}: last-client p50 {:.1} ms p99 {:.1} ms max {:.1} ms ({incomplete} incomplete); POST answered p50 {:.1} ms; server CPU {us:.2} µs/delivery (user {us_user:.2}, system {us_sys:.2})",
        p.kind.name(),
        a.fanout_rate,
        p.clients,
        latency.p50,
        latency.p99,
        latency.max,
        answer.p50
    ));
    Ok(Steady {
        latency,
        answer,
        incomplete,
        events: steady_n,
        deliveries,
        cpu,
        cpu_self,
        direct,
    })
}

/// Keeps WINDOW events in flight for `phase_secs`; events `base..`.
async fn saturate(ctx: &Ctx, p: &Phase<'_>, base: usize) -> Result<Saturated> {
    let a = &ctx.args;
    let direct0 = p.direct().await;
    let cpu = CpuMeter::start(p.pid);
    let me = CpuMeter::start(0);
    let sem = Arc::new(Semaphore::new(WINDOW));
    let next = Arc::new(AtomicU64::new(base as u64));
    let start = now_ns();
    let end = start + a.phase_secs * 1_000_000_000;
    let mut senders = Vec::new();
    for _ in 0..WINDOW {
        let (sh, next, body, pf, un, addr, sem) = (
            p.sh.clone(),
            next.clone(),
            p.body.clone(),
            p.post_failures.clone(),
            p.unnumbered.clone(),
            p.addr,
            sem.clone(),
        );
        senders.push(tokio::spawn(async move {
            let mut conn = HttpConn::new(addr);
            loop {
                // Closed at the end of the phase; a permit is given back per completed event.
                let Ok(permit) = sem.acquire().await else {
                    break;
                };
                permit.forget();
                let k = next.fetch_add(1, Ordering::Relaxed) as usize;
                if k >= MAX_EVENTS || now_ns() >= end {
                    break;
                }
                let b = body(k as u64);
                sh.sent[k].store(now_ns(), Ordering::Relaxed);
                let r = conn.request("POST", "/broadcast", Some(&b)).await;
                answered(&r, &pf, &un);
            }
        }));
    }
    // Frees a window slot per event that reached every live client (or stalled), in order.
    let sent_upto = |next: &AtomicU64| (next.load(Ordering::Relaxed) as usize).min(MAX_EVENTS);
    let mut oldest = base;
    let mut oldest_since = now_ns();
    while now_ns() < end {
        let now = now_ns();
        let upto = sent_upto(&next);
        while oldest < upto
            && p.sh.sent[oldest].load(Ordering::Relaxed) != 0
            && p.sh.complete(oldest, p.live())
        {
            oldest += 1;
            oldest_since = now;
            sem.add_permits(1);
        }
        if oldest < upto && now - oldest_since > STALL.as_nanos() as u64 {
            oldest += 1;
            oldest_since = now;
            sem.add_permits(1);
        }
        tokio::time::sleep(TICK).await;
    }
    sem.close();
    for s in senders {
        s.await?;
    }
    // Events actually sent: those whose send time was recorded (a sender that claimed a
    // number as the phase ended sent nothing).
    let sent: Vec<usize> = (base..sent_upto(&next))
        .filter(|&k| p.sh.sent[k].load(Ordering::Relaxed) != 0)
        .collect();
    let drain_end = now_ns() + DRAIN.as_nanos() as u64;
    while now_ns() < drain_end && sent.iter().any(|&e| !p.sh.complete(e, p.live())) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (cpu, cpu_self) = (cpu.read(), me.read());
    let direct = direct_delta(direct0, p.direct().await);
    let mut deliveries = 0u64;
    let mut last_at = 0u64;
    let mut lat = Vec::new();
    for &e in &sent {
        let c = p.sh.count[e].load(Ordering::Relaxed) as u64;
        deliveries += c;
        let l = p.sh.last[e].load(Ordering::Relaxed);
        last_at = last_at.max(l);
        if c > 0 {
            lat.push(l.saturating_sub(p.sh.sent[e].load(Ordering::Relaxed)));
        }
    }
    let first_sent = sent
        .first()
        .map_or(0, |&e| p.sh.sent[e].load(Ordering::Relaxed));
    let secs = last_at.saturating_sub(first_sent) as f64 / 1e9;
    let rate = if secs > 0.0 {
        deliveries as f64 / secs
    } else {
        f64::NAN
    };
    let out = Saturated {
        requested: p.requested,
        clients: p.clients,
        events: sent.len() as u64,
        deliveries,
        rate,
        latency: Summary::of_ns(&mut lat),
        cpu,
        cpu_self,
        direct,
    };
    let (us, us_user, us_sys) = out.per_delivery();
    say(format!(
        "{}: saturation with {} clients: {} events, {deliveries} deliveries in {secs:.2} s = {rate:.0}/s; server CPU {:.2} s = {us:.2} µs/delivery (user {us_user:.2}, system {us_sys:.2}); load generator {:.2} s",
        p.kind.name(),
        p.clients,
        out.events,
        cpu.total(),
        cpu_self.total()
    ));
    Ok(out)
}

async fn one(ctx: &Ctx, kind: Kind) -> Result<Outcome> {
    let a = &ctx.args;
    let server = Server::start(&ctx.spec(kind, false, "fanout")).await?;
    let addr = server.spec.addr();
    let pad = "x".repeat(a.payload_bytes);
    let tenant = crate::pg::tenant_slug(0);
    let body: Arc<dyn Fn(u64) -> Vec<u8> + Send + Sync> =
        Arc::new(move |seq| broadcast_body(&tenant, EVENT_TYPE, seq, &pad));
    let post_failures = Arc::new(AtomicU64::new(0));
    let unnumbered = Arc::new(AtomicU64::new(0));
    let mut sizes = a.fanout_curve.clone();
    sizes.push(a.clients);
    let mut out = Outcome {
        clients: 0,
        steady: None,
        curve: vec![],
        post_failures: 0,
        unnumbered: 0,
        disconnects: 0,
        close_1013: 0,
    };
    for n in sizes {
        let counters = Arc::new(ClientCounters::default());
        let (stop_tx, stop_rx) = watch::channel(false);
        let sh = Arc::new(Shared::new());
        let eps = ctx.endpoints(kind, n, 1);
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
        say(format!(
            "{}: {} clients on one tenant",
            kind.name(),
            clients.len()
        ));
        tokio::time::sleep(CONNECTED_SETTLE).await;
        let phase = Phase {
            kind,
            addr,
            pid: server.pid,
            sh,
            counters: &counters,
            requested: n,
            clients: clients.len(),
            body: body.clone(),
            post_failures: post_failures.clone(),
            unnumbered: unnumbered.clone(),
        };
        let mut base = 0;
        if n == a.clients {
            let st = steady(ctx, &phase).await?;
            base = st.events;
            out.steady = Some(st);
            out.clients = clients.len();
        }
        out.curve.push(saturate(ctx, &phase, base).await?);
        out.disconnects += counters.disconnects.load(Ordering::Relaxed);
        out.close_1013 += counters.close_1013.load(Ordering::Relaxed);
        ws::shutdown(clients, &stop_tx).await;
    }
    server.stop().await?;
    out.post_failures = post_failures.load(Ordering::Relaxed);
    out.unnumbered = unnumbered.load(Ordering::Relaxed);
    if out.unnumbered > 0 {
        ctx.note(format!(
            "{}: {} fan-out broadcasts answered \"numbered\": false (no sequencer numbered them in time)",
            kind.name(),
            out.unnumbered
        ));
    }
    Ok(out)
}

/// `µs` with two decimals, or a dash.
fn us(v: Option<f64>) -> String {
    v.filter(|v| v.is_finite())
        .map(|v| format!("{v:.2}"))
        .unwrap_or("–".into())
}

/// Share of frames written straight into the socket, as text.
fn direct_text(d: Direct) -> String {
    match d {
        Some((sent, direct)) if sent > 0.0 => {
            format!("{:.1} % of {sent:.0} frames", 100.0 * direct / sent)
        }
        _ => "–".into(),
    }
}

pub async fn run(ctx: &Ctx, res: &mut Results) -> Result<()> {
    let (op, nd) = super::on_each_server(ctx, "scenario 2 (fan-out)", |kind| one(ctx, kind)).await;
    for (kind, o) in [(Kind::Orderpush, &op), (Kind::Node, &nd)] {
        if let Some(o) = o {
            if let Some(st) = &o.steady {
                res.fanout_latency.insert(
                    kind.name().into(),
                    vec![(
                        ctx.args.fanout_rate,
                        st.latency.p50,
                        st.latency.p99,
                        st.latency.max,
                    )],
                );
            }
            res.fanout_cpu.insert(
                kind.name().into(),
                o.curve
                    .iter()
                    .map(|c| {
                        let (t, u, s) = c.per_delivery();
                        (c.requested, t, u, s)
                    })
                    .collect(),
            );
        }
    }
    let s = "2 fan-out";
    let n = ctx.args.clients;
    let rate = ctx.args.fanout_rate;
    fn steady(o: &Option<Outcome>) -> Option<&Steady> {
        o.as_ref().and_then(|o| o.steady.as_ref())
    }
    let (op_st, nd_st) = (steady(&op), steady(&nd));
    let info = |o: &Option<Outcome>| {
        o.as_ref()
            .map(|o| {
                format!(
                    "{} clients, POST answered p50 {}, {} incomplete events, {} failed POSTs, {} unnumbered, {} disconnects ({} with 1013)",
                    o.clients,
                    o.steady.as_ref().map(|s| format!("{:.1} ms", s.answer.p50)).unwrap_or("–".into()),
                    o.steady.as_ref().map(|s| s.incomplete).unwrap_or(0),
                    o.post_failures,
                    o.unnumbered,
                    o.disconnects,
                    o.close_1013
                )
            })
            .unwrap_or("–".into())
    };
    res.rows.push(
        Row::new(s, &format!("last-client latency p50, 1 tenant × {n}, {rate} ev/s"), "ms", Better::Lower)
            .op(op_st.map(|o| o.latency.p50))
            .node(nd_st.map(|o| o.latency.p50))
            .note("from the POST leaving the caller to the frame at the last client (orderpush answers only once the event is durable and numbered)"),
    );
    res.rows.push(
        Row::new(s, "last-client latency p99", "ms", Better::Lower)
            .op(op_st.map(|o| o.latency.p99))
            .node(nd_st.map(|o| o.latency.p99))
            .target("≤ 100 ms", |v| v <= 100.0)
            .moonshot("≤ 60 ms", |v| v <= 60.0)
            .note(format!("orderpush: {}; node: {}", info(&op), info(&nd))),
    );
    res.rows.push(
        Row::new(s, "last-client latency max", "ms", Better::Lower)
            .op(op_st.map(|o| o.latency.max))
            .node(nd_st.map(|o| o.latency.max)),
    );
    let st_pd = |o: Option<&Steady>| o.map(|o| per_delivery(o.cpu, o.deliveries));
    let (op_pd, nd_pd) = (st_pd(op_st), st_pd(nd_st));
    let node_us = nd_pd.map(|p| p.0);
    let gen_us = |o: Option<&Steady>| o.map(|o| per_delivery(o.cpu_self, o.deliveries).0);
    res.rows.push(
        Row::new(s, &format!("server CPU per delivery, {n} clients, {rate} ev/s"), "µs", Better::Lower)
            .op(op_pd.map(|p| p.0))
            .node(node_us)
            .target_if("≤ 0.75× Node's", |v| node_us.map(|n| v <= 0.75 * n))
            .note(format!(
                "utime+stime of the server process from the first POST until every client had every event, over the deliveries; load generator's own CPU per delivery: orderpush run {} µs, node run {} µs; orderpush frames written straight into the socket: {}",
                us(gen_us(op_st)),
                us(gen_us(nd_st)),
                direct_text(op_st.and_then(|o| o.direct)),
            )),
    );
    res.rows.push(
        Row::new(s, "  of which user space", "µs", Better::Lower)
            .op(op_pd.map(|p| p.1))
            .node(nd_pd.map(|p| p.1))
            .note("utime: what the server's own code costs per delivery"),
    );
    res.rows.push(
        Row::new(s, "  of which kernel (system)", "µs", Better::Lower)
            .op(op_pd.map(|p| p.2))
            .node(nd_pd.map(|p| p.2))
            .note("stime: mostly the kernel's loopback TCP send path, a floor both servers share"),
    );
    fn curve(o: &Option<Outcome>, c: usize) -> Option<&Saturated> {
        o.as_ref()
            .and_then(|o| o.curve.iter().find(|p| p.requested == c))
    }
    let mut sizes = ctx.args.fanout_curve.clone();
    sizes.push(n);
    for &c in &sizes {
        let (o, d) = (curve(&op, c), curve(&nd, c));
        let node_us = d.map(|d| d.per_delivery().0);
        let desc = |p: Option<&Saturated>| {
            p.map(|p| {
                let (_, u, sy) = p.per_delivery();
                format!(
                    "{} clients, {} events, {:.0} deliveries/s, user {u:.2} / system {sy:.2} µs, load generator {:.2} µs, last-client p99 {:.1} ms, direct writes {}",
                    p.clients,
                    p.events,
                    p.rate,
                    per_delivery(p.cpu_self, p.deliveries).0,
                    p.latency.p99,
                    direct_text(p.direct)
                )
            })
            .unwrap_or("–".into())
        };
        let mut row = Row::new(
            s,
            &format!("server CPU per delivery at saturation, {c} clients"),
            "µs",
            Better::Lower,
        )
        .op(o.map(|p| p.per_delivery().0))
        .node(node_us)
        .note(format!(
            "{WINDOW} events in flight; orderpush: {}; node: {}",
            desc(o),
            desc(d)
        ));
        if c == 200 {
            row = row.target_if("≤ ⅓ of Node's", |v| node_us.map(|n| v <= n / 3.0));
        }
        res.rows.push(row);
    }
    let (o, d) = (curve(&op, n), curve(&nd, n));
    let node_rate = d.map(|p| p.rate);
    res.rows.push(
        Row::new(
            s,
            &format!("deliveries/s at saturation ({WINDOW} events in flight), {n} clients"),
            "msg/s",
            Better::Higher,
        )
        .op(o.map(|p| p.rate))
        .node(node_rate)
        .target_if("≥ 3× Node", |v| node_rate.map(|n| v >= 3.0 * n))
        .note(format!(
            "events/deliveries (server CPU s, load-generator CPU s): orderpush {}, node {}",
            o.map(|p| format!(
                "{}/{} ({:.1}, {:.1})",
                p.events,
                p.deliveries,
                p.cpu.total(),
                p.cpu_self.total()
            ))
            .unwrap_or("–".into()),
            d.map(|p| format!(
                "{}/{} ({:.1}, {:.1})",
                p.events,
                p.deliveries,
                p.cpu.total(),
                p.cpu_self.total()
            ))
            .unwrap_or("–".into()),
        )),
    );
    Ok(())
}
