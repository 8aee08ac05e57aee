//! Scenario 1: idle authenticated connections across tenants: server RSS per connection
//! (VmRSS before/after) and connect rate.

use anyhow::Result;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

use super::{CONNECT_CONCURRENCY, Ctx, say};
use crate::report::{Better, Results, Row};
use crate::servers::{Kind, Server};
use crate::ws::{self, ClientCounters, ClientLogic};

/// Connections are opened in this many waves; RSS is sampled after each (the memory curve).
const WAVES: usize = 10;
/// Pause after a wave before sampling RSS, so the server has finished the handshakes' work.
const WAVE_SETTLE: Duration = Duration::from_millis(300);
/// Pause before the idle baseline and the final RSS reading (lets allocators settle).
const SETTLE: Duration = Duration::from_secs(2);

/// An idle POS: counts nothing, just holds the connection (answers pings through tungstenite).
struct Idle;
impl ClientLogic for Idle {
    fn on_text(&mut self, _text: &str, _at_ns: u64) {}
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
    let wave = n.div_ceil(WAVES);
    let ovf0 = crate::servers::listen_overflows();
    for chunk in eps.chunks(wave) {
        let (mut c, st) = ws::connect_many(
            chunk,
            |_| Idle,
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
    Ok(())
}
