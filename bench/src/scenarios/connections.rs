//! Scenario 1: idle authenticated connections across tenants: server RSS per connection
//! (VmRSS before/after) and connect rate. Then memory after a big frame: as many idle clients on
//! one tenant, one big `/broadcast` delivered to all of them, and RSS before and after.

use anyhow::Result;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;

use super::{CONNECT_CONCURRENCY, Ctx, broadcast_body, say};
use crate::clock::now_ns;
use crate::http::HttpConn;
use crate::report::{Better, Results, Row};
use crate::servers::{Kind, Server};
use crate::ws::{self, ClientCounters, ClientLogic};

/// Connections are opened in this many waves; RSS is sampled after each (the memory curve).
const WAVES: usize = 10;
/// Pause after a wave before sampling RSS, so the server has finished the handshakes' work.
const WAVE_SETTLE: Duration = Duration::from_millis(300);
/// Pause before the idle baseline and the final RSS reading (lets allocators settle).
const SETTLE: Duration = Duration::from_secs(2);
/// After every client has the big frame, the server gets this long to give its buffers back
/// before RSS is read again.
const BIG_FRAME_SETTLE: Duration = Duration::from_secs(3);
/// Longest wait for the big frame to reach every client (bounds the loop).
const BIG_FRAME_WAIT: Duration = Duration::from_secs(30);
/// Event type of the big frame.
const BIG_TYPE: &str = "bench_big";

/// An idle POS: just holds the connection (answers pings through tungstenite) and counts the
/// big frame when it comes.
struct Idle(Arc<AtomicU64>);
impl ClientLogic for Idle {
    fn on_text(&mut self, text: &str, _at_ns: u64) {
        if text.contains(BIG_TYPE) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Memory around one big frame sent to every idle client of one tenant.
pub struct BigFrame {
    pub clients: usize,
    pub frame_bytes: usize,
    pub delivered: u64,
    pub deliver_ms: f64,
    pub rss_before_mib: f64,
    pub rss_peak_mib: f64,
    pub rss_after_mib: f64,
}

/// What one server did.
pub struct Outcome {
    pub per_conn_bytes: f64,
    pub connect_rate: f64,
    pub ok: usize,
    pub failed: usize,
    pub rss_base_mib: f64,
    pub rss_full_mib: f64,
    pub curve: Vec<(usize, f64)>,
    pub overflows: u64,
    pub big: Option<BigFrame>,
}

async fn one(ctx: &Ctx, kind: Kind) -> Result<Outcome> {
    let n = ctx.args.clients;
    let server = Server::start(&ctx.spec(kind, false, "connections")).await?;
    tokio::time::sleep(SETTLE).await;
    let rss0 = server.rss_kib()?;
    let eps = ctx.endpoints(kind, n, ctx.args.tenants);
    let counters = Arc::new(ClientCounters::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut clients = Vec::new();
    let mut curve = vec![(0usize, rss0 as f64 / 1024.0)];
    let mut connect_ns = 0u64;
    let mut failed = 0;
    let mut first_err = None;
    let big_count = Arc::new(AtomicU64::new(0));
    let wave = n.div_ceil(WAVES);
    let ovf0 = crate::servers::listen_overflows();
    for chunk in eps.chunks(wave) {
        let (mut c, st) = ws::connect_many(
            chunk,
            |_| Idle(big_count.clone()),
            &counters,
            false,
            &stop_rx,
            CONNECT_CONCURRENCY,
            &mut first_err,
        )
        .await;
        connect_ns += st.elapsed_ns;
        failed += st.failed;
        clients.append(&mut c);
        tokio::time::sleep(WAVE_SETTLE).await;
        curve.push((clients.len(), server.rss_kib()? as f64 / 1024.0));
    }
    let ovf1 = crate::servers::listen_overflows();
    tokio::time::sleep(SETTLE).await;
    let rss1 = server.rss_kib()?;
    let ok = clients.len();
    if let Some(e) = first_err {
        ctx.note(format!(
            "{}: {failed} of {n} connects failed, first: {e}",
            kind.name()
        ));
    }
    say(format!(
        "{}: {ok} connections, RSS {} -> {} KiB, connect {:.2} s, listen-queue overflows {}",
        kind.name(),
        rss0,
        rss1,
        connect_ns as f64 / 1e9,
        ovf1.0 - ovf0.0
    ));
    ws::shutdown(clients, &stop_tx).await;
    let big = if ctx.args.big_frame_bytes > 0 {
        match big_frame(ctx, kind, &server).await {
            Ok(b) => Some(b),
            Err(e) => {
                ctx.note(format!("{}: big-frame check failed: {e:#}", kind.name()));
                None
            }
        }
    } else {
        None
    };
    let exit = server.stop().await?;
    say(format!("{} stopped: {exit}", kind.name()));
    Ok(Outcome {
        per_conn_bytes: if ok > 0 {
            (rss1 as f64 - rss0 as f64) * 1024.0 / ok as f64
        } else {
            f64::NAN
        },
        connect_rate: ok as f64 / (connect_ns as f64 / 1e9),
        ok,
        failed,
        rss_base_mib: rss0 as f64 / 1024.0,
        rss_full_mib: rss1 as f64 / 1024.0,
        curve,
        overflows: ovf1.0 - ovf0.0,
        big,
    })
}

/// `--clients` idle clients on one tenant; RSS; one `/broadcast` with `--big-frame-bytes` of
/// data; wait until every client has it; let the server settle; RSS again. A server that keeps
/// each socket's write buffer at its high-water mark holds clients × frame size for good.
async fn big_frame(ctx: &Ctx, kind: Kind, server: &Server) -> Result<BigFrame> {
    let n = ctx.args.clients;
    let eps = ctx.endpoints(kind, n, 1);
    let counters = Arc::new(ClientCounters::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let got = Arc::new(AtomicU64::new(0));
    let (clients, _) = super::connect_all(
        ctx,
        kind,
        "big-frame",
        &eps,
        |_| Idle(got.clone()),
        &counters,
        false,
        &stop_rx,
    )
    .await;
    tokio::time::sleep(SETTLE).await;
    let before = server.rss_kib()?;
    let pad = "x".repeat(ctx.args.big_frame_bytes);
    let body = broadcast_body(&crate::pg::tenant_slug(0), BIG_TYPE, 0, &pad);
    let t0 = now_ns();
    let (status, answer) = HttpConn::new(server.spec.addr())
        .request("POST", "/broadcast", Some(&body))
        .await?;
    anyhow::ensure!(
        status == 200,
        "big /broadcast answered {status}: {}",
        String::from_utf8_lossy(&answer)
    );
    let live =
        || (clients.len() as u64).saturating_sub(counters.disconnects.load(Ordering::Relaxed));
    let until = t0 + BIG_FRAME_WAIT.as_nanos() as u64;
    let mut peak = before;
    while got.load(Ordering::Relaxed) < live() && now_ns() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
        peak = peak.max(server.rss_kib().unwrap_or(0));
    }
    let deliver_ms = (now_ns() - t0) as f64 / 1e6;
    let delivered = got.load(Ordering::Relaxed);
    tokio::time::sleep(BIG_FRAME_SETTLE).await;
    let after = server.rss_kib()?;
    say(format!(
        "{}: {} B frame to {delivered}/{} clients of one tenant in {deliver_ms:.0} ms; RSS {before} -> peak {peak} -> {after} KiB",
        kind.name(),
        body.len(),
        clients.len()
    ));
    let connected = clients.len();
    ws::shutdown(clients, &stop_tx).await;
    Ok(BigFrame {
        clients: connected,
        frame_bytes: body.len(),
        delivered,
        deliver_ms,
        rss_before_mib: before as f64 / 1024.0,
        rss_peak_mib: peak as f64 / 1024.0,
        rss_after_mib: after as f64 / 1024.0,
    })
}

pub async fn run(ctx: &Ctx, res: &mut Results) -> Result<()> {
    let (op, nd) =
        super::on_each_server(ctx, "scenario 1 (connections)", |kind| one(ctx, kind)).await;
    for (kind, o) in [(Kind::Orderpush, &op), (Kind::Node, &nd)] {
        if let Some(o) = o {
            res.rss_curve.insert(kind.name().into(), o.curve.clone());
        }
    }
    let n = ctx.args.clients;
    let node_pc = nd.as_ref().map(|o| o.per_conn_bytes);
    let s = "1 connections";
    res.rows.push(
        Row::new(
            s,
            &format!("RSS per idle connection ({n} conns)"),
            "bytes",
            Better::Lower,
        )
        .op(op.as_ref().map(|o| o.per_conn_bytes))
        .node(node_pc)
        .target("≤ 4096 B and < Node", |v| {
            v <= 4096.0 && node_pc.is_none_or(|n| v < n)
        })
        .note(format!(
            "RSS idle→full MiB: orderpush {}, node {}",
            op.as_ref()
                .map(|o| format!("{:.1}→{:.1}", o.rss_base_mib, o.rss_full_mib))
                .unwrap_or("–".into()),
            nd.as_ref()
                .map(|o| format!("{:.1}→{:.1}", o.rss_base_mib, o.rss_full_mib))
                .unwrap_or("–".into()),
        )),
    );
    res.rows.push(
        Row::new(s, "connect rate", "conn/s", Better::Higher)
            .op(op.as_ref().map(|o| o.connect_rate))
            .node(nd.as_ref().map(|o| o.connect_rate))
            .note(format!(
                "{CONNECT_CONCURRENCY} handshakes in flight; connected ok/failed (listen-queue overflows): orderpush {}, node {}",
                op.as_ref().map(|o| format!("{}/{} ({})", o.ok, o.failed, o.overflows)).unwrap_or("–".into()),
                nd.as_ref().map(|o| format!("{}/{} ({})", o.ok, o.failed, o.overflows)).unwrap_or("–".into()),
            )),
    );
    if ctx.args.big_frame_bytes > 0 {
        fn big(o: &Option<Outcome>) -> Option<&BigFrame> {
            o.as_ref().and_then(|o| o.big.as_ref())
        }
        let ratio = |b: Option<&BigFrame>| b.map(|b| 100.0 * b.rss_after_mib / b.rss_before_mib);
        let desc = |b: Option<&BigFrame>| {
            b.map(|b| {
                format!(
                    "RSS {:.1} MiB before, {:.1} peak, {:.1} after; {} B frame delivered to {}/{} in {:.0} ms",
                    b.rss_before_mib, b.rss_peak_mib, b.rss_after_mib, b.frame_bytes, b.delivered, b.clients, b.deliver_ms
                )
            })
            .unwrap_or("–".into())
        };
        let (ob, nb) = (big(&op), big(&nd));
        let all_delivered = ob.is_some_and(|b| b.delivered >= b.clients as u64);
        res.rows.push(
            Row::new(
                s,
                &format!(
                    "RSS after a {} KB frame to {n} idle clients, share of before",
                    ctx.args.big_frame_bytes / 1000
                ),
                "%",
                Better::Lower,
            )
            .op(ratio(ob))
            .node(ratio(nb))
            .target("≤ 110 %, every client got it", move |v| {
                v <= 110.0 && all_delivered
            })
            .note(format!(
                "all clients on one tenant, one /broadcast, RSS read {} s after the last client had it; orderpush: {}; node: {}",
                BIG_FRAME_SETTLE.as_secs(),
                desc(ob),
                desc(nb)
            )),
        );
    }
    Ok(())
}
