//! Scenario 6: reconnect storm. Many clients across tenants follow orders written at a steady
//! rate; the server is restarted under them (SIGTERM, start again); every client reconnects with
//! `?since=<last id>` while orders keep coming. Reports the time until every client has every
//! order committed before the new server was up, and losses over the whole run.

use anyhow::Result;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;

use super::commit::{OrderClient, drain, judge, writer_conns};
use super::{Ctx, say};
use crate::clock::{ms, now_ns};
use crate::report::{Better, Results, Row};
use crate::servers::{Kind, Server};
use crate::writer::{self, OrderLog};
use crate::ws::{self, ClientCounters, lock};

/// Orders flow this long before the restart (so every client has a last id to resume from).
const WARM: Duration = Duration::from_secs(2);

struct Outcome {
    clients: usize,
    restart_ms: f64,
    reconnected: usize,
    all_reconnected_ms: Option<f64>,
    caught_up_ms: Option<f64>,
    caught_up_after_up_ms: Option<f64>,
    not_caught_up: usize,
    lost: u64,
    dups: u64,
    out_of_order: u64,
    resyncs: u64,
    committed: u64,
    reconnect_failures: u64,
    overflows: u64,
    per_client: crate::stats::Summary,
}

async fn one(ctx: &Ctx, kind: Kind) -> Result<Outcome> {
    let a = &ctx.args;
    let spec = ctx.spec(kind, true, "storm");
    let server = Server::start(&spec).await?;
    let url = spec.database_url.clone();
    let eps = ctx.endpoints(kind, a.clients, a.tenants);
    let counters = Arc::new(ClientCounters::default());
    let new_orders = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (clients, _) = super::connect_all(
        ctx,
        kind,
        "storm",
        &eps,
        |i| OrderClient::new(i % a.tenants, new_orders.clone()),
        &counters,
        true,
        &stop_rx,
    )
    .await;
    say(format!(
        "{}: {} clients following orders",
        kind.name(),
        clients.len()
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = Arc::new(OrderLog::new(a.tenants, ctx.next_salt()));
    let wstop = Arc::new(AtomicBool::new(false));
    let writers = {
        let (url, log, wstop) = (url.clone(), log.clone(), wstop.clone());
        let rate = a.storm_rate;
        let secs = a.storm_secs;
        tokio::spawn(async move {
            writer::run(
                &url,
                writer_conns(rate),
                rate,
                Duration::from_secs(secs),
                0,
                log,
                wstop,
            )
            .await
        })
    };
    tokio::time::sleep(WARM).await;
    let ovf0 = crate::servers::listen_overflows();
    let t_kill = now_ns();
    let exit = server.stop().await?;
    let server = Server::start(&spec).await?;
    let t_up = now_ns();
    say(format!(
        "{}: restarted in {:.0} ms (old one: {exit})",
        kind.name(),
        ms(t_up - t_kill)
    ));
    let w = match writers.await {
        Ok(Ok(w)) => w,
        Ok(Err(e)) => {
            wstop.store(true, Ordering::Relaxed);
            return Err(e);
        }
        Err(e) => return Err(e.into()),
    };
    let expected = w.committed * (a.clients / a.tenants) as u64;
    drain(&new_orders, expected).await;
    let overflows = crate::servers::listen_overflows().0 - ovf0.0;

    // Caught up: a client has every order of its tenant committed before `t_up`.
    let mut worst = 0u64;
    let mut per_client = Vec::new();
    let mut not_caught_up = 0;
    let mut reconnected = 0;
    let mut last_reconnect = 0u64;
    let mut resyncs = 0;
    for c in &clients {
        let s = lock(&c.state);
        resyncs += s.resyncs;
        if let Some(r) = s.reconnected_at {
            reconnected += 1;
            last_reconnect = last_reconnect.max(r);
        }
        let mut done_at = 0u64;
        let mut missing = false;
        for idx in w.first_idx..w.end_idx {
            if log.tenant_of(idx) != s.tenant {
                continue;
            }
            match log.committed_at(idx) {
                Some(cat) if cat < t_up => {}
                _ => continue,
            }
            match s.arrivals.iter().find(|(i, _)| *i as usize == idx) {
                Some(&(_, at)) => done_at = done_at.max(at),
                None => missing = true,
            }
        }
        if missing {
            not_caught_up += 1;
        } else {
            worst = worst.max(done_at);
            per_client.push(done_at.max(t_up) - t_kill);
        }
    }
    let d = judge(&clients, &log, w.first_idx..w.end_idx);
    let reconnect_failures = counters.reconnect_failures.load(Ordering::Relaxed);
    let n = clients.len();
    ws::shutdown(clients, &stop_tx).await;
    server.stop().await?;
    let caught = (not_caught_up == 0 && n > 0).then_some(worst.max(t_up));
    let out = Outcome {
        clients: n,
        restart_ms: ms(t_up - t_kill),
        reconnected,
        all_reconnected_ms: (reconnected == n && n > 0)
            .then(|| ms(last_reconnect.saturating_sub(t_kill))),
        caught_up_ms: caught.map(|c| ms(c - t_kill)),
        caught_up_after_up_ms: caught.map(|c| ms(c - t_up)),
        not_caught_up,
        lost: d.lost,
        dups: d.dups,
        out_of_order: d.out_of_order,
        resyncs,
        committed: w.committed,
        reconnect_failures,
        overflows,
        per_client: crate::stats::Summary::of_ns(&mut per_client),
    };
    say(format!(
        "{}: reconnected {}/{} (all by {:?} ms), caught up {:?} ms after the drop, {} not caught up, lost {} dup {} ooo {}",
        kind.name(),
        out.reconnected,
        n,
        out.all_reconnected_ms,
        out.caught_up_ms,
        out.not_caught_up,
        out.lost,
        out.dups,
        out.out_of_order
    ));
    Ok(out)
}

pub async fn run(ctx: &Ctx, res: &mut Results) -> Result<()> {
    let (op, nd) =
        super::on_each_server(ctx, "scenario 6 (reconnect storm)", |kind| one(ctx, kind)).await;
    let s = "6 reconnect storm";
    let n = ctx.args.clients;
    let desc = |o: &Option<Outcome>| {
        o.as_ref()
            .map(|o| {
                format!(
                    "{} clients, restart {:.0} ms, per-client caught-up p50 {:.0} / p99 {:.0} ms, {} reconnected ({} failed attempts, {} SYNs dropped at a full listen queue), {} not caught up, {} orders committed, {} resync_required",
                    o.clients, o.restart_ms, o.per_client.p50, o.per_client.p99, o.reconnected, o.reconnect_failures, o.overflows, o.not_caught_up, o.committed, o.resyncs
                )
            })
            .unwrap_or("–".into())
    };
    res.rows.push(
        Row::new(s, &format!("all {n} caught up, from the drop"), "ms", Better::Lower)
            .op(op.as_ref().and_then(|o| o.caught_up_ms))
            .node(nd.as_ref().and_then(|o| o.caught_up_ms))
            .target("≤ 5000 ms", |v| v <= 5000.0)
            .note(format!(
                "{} orders/s throughout; caught up = has every order committed before the new server answered /healthz; after it was up: orderpush {} ms, node {} ms. orderpush: {}; node: {}",
                ctx.args.storm_rate,
                op.as_ref().and_then(|o| o.caught_up_after_up_ms).map(|v| format!("{v:.0}")).unwrap_or("–".into()),
                nd.as_ref().and_then(|o| o.caught_up_after_up_ms).map(|v| format!("{v:.0}")).unwrap_or("never".into()),
                desc(&op),
                desc(&nd)
            )),
    );
    res.rows.push(
        Row::new(s, "all reconnected, from the drop", "ms", Better::Lower)
            .op(op.as_ref().and_then(|o| o.all_reconnected_ms))
            .node(nd.as_ref().and_then(|o| o.all_reconnected_ms)),
    );
    res.rows.push(
        Row::new(
            s,
            "lost / duplicate / out-of-order over the storm",
            "frames",
            Better::Neither,
        )
        .op(op
            .as_ref()
            .map(|o| (o.lost + o.dups + o.out_of_order) as f64))
        .node(nd.as_ref().map(|o| (o.lost + o.dups) as f64))
        .target("0", |v| v == 0.0)
        .note(format!(
            "orderpush lost/dup/ooo {}; node lost/dup {}",
            op.as_ref()
                .map(|o| format!("{}/{}/{}", o.lost, o.dups, o.out_of_order))
                .unwrap_or("–".into()),
            nd.as_ref()
                .map(|o| format!("{}/{}", o.lost, o.dups))
                .unwrap_or("–".into())
        )),
    );
    Ok(())
}
