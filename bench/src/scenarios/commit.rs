//! Scenario 3: order writers at fixed rates across tenants; latency from COMMIT returning to the
//! frame arriving at each of the tenant's clients, and lost / duplicate / out-of-order counts.
//! Also holds the order-tracking client that scenario 6 reuses.

use anyhow::Result;
use serde::Deserialize;
use serde::de::IgnoredAny;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;

use super::{Ctx, say};
use crate::clock::now_ns;
use crate::report::{Better, Results, Row};
use crate::servers::{Kind, Server};
use crate::stats::Summary;
use crate::writer::{self, OrderLog};
use crate::ws::{self, Client, ClientCounters, ClientLogic, Frame, lock};

/// After the writers stop, how long to wait for the last frames before counting losses.
const DRAIN: Duration = Duration::from_secs(10);
/// Extra wait once everything expected has arrived, to catch late duplicates.
const DUP_GRACE: Duration = Duration::from_millis(300);
/// Orders per second one writer connection is given (a transaction is ~1 ms here; keeps each
/// connection well below its own ceiling so the offered rate is what is measured).
const ORDERS_PER_WRITER: f64 = 100.0;
/// Most writer connections (Postgres max_connections is 100 here, shared with the servers).
const MAX_WRITER_CONNS: usize = 16;

#[derive(Deserialize)]
struct OrderData<'a> {
    #[serde(rename = "orderNumber", borrow)]
    order_number: Option<&'a str>,
    items: Option<Vec<IgnoredAny>>,
}

/// One POS terminal that tracks `new_order` events by order index.
pub struct OrderClient {
    pub tenant: usize,
    pub last_id: Option<i64>,
    pub seen: HashSet<u32>,
    pub arrivals: Vec<(u32, u64)>,
    pub dups: u64,
    pub out_of_order: u64,
    pub wrong_items: u64,
    pub resyncs: u64,
    pub new_orders: Arc<AtomicU64>,
    pub reconnected_at: Option<u64>,
    pub disconnected_at: Option<u64>,
}

impl OrderClient {
    pub fn new(tenant: usize, new_orders: Arc<AtomicU64>) -> OrderClient {
        OrderClient {
            tenant,
            last_id: None,
            seen: HashSet::new(),
            arrivals: Vec::new(),
            dups: 0,
            out_of_order: 0,
            wrong_items: 0,
            resyncs: 0,
            new_orders,
            reconnected_at: None,
            disconnected_at: None,
        }
    }
}

impl OrderClient {
    /// Zeroes the per-phase counters (duplicates, out-of-order, wrong items) after a judgement.
    pub fn reset_counters(&mut self) {
        self.dups = 0;
        self.out_of_order = 0;
        self.wrong_items = 0;
    }
}

impl ClientLogic for OrderClient {
    fn on_text(&mut self, text: &str, at_ns: u64) {
        let Ok(f) = serde_json::from_str::<Frame>(text) else {
            return;
        };
        let kind = f.kind.as_deref().unwrap_or("");
        if kind == "resync_required" {
            self.resyncs += 1;
            return;
        }
        // Control frames carry the connection's position (`ready`: the last id sent), not an
        // event: they are neither counted nor checked for order.
        if matches!(kind, "ready" | "snapshot_end") {
            return;
        }
        let mut dup = false;
        if kind == "new_order" {
            let d = f
                .data
                .and_then(|d| serde_json::from_str::<OrderData>(d.get()).ok());
            let idx = d
                .as_ref()
                .and_then(|d| d.order_number)
                .and_then(|n| n.strip_prefix("bench-"))
                .and_then(|n| n.parse::<u32>().ok());
            if let Some(idx) = idx {
                self.new_orders.fetch_add(1, Ordering::Relaxed);
                if self.seen.insert(idx) {
                    self.arrivals.push((idx, at_ns));
                } else {
                    self.dups += 1;
                    dup = true;
                }
                let items = d.and_then(|d| d.items).map(|i| i.len()).unwrap_or(0);
                if items != OrderLog::items_of(idx as usize) {
                    self.wrong_items += 1;
                }
            }
        }
        if let Some(id) = f.id {
            if let Some(last) = self.last_id {
                if id <= last && !dup {
                    self.out_of_order += 1;
                }
            }
            self.last_id = Some(self.last_id.map_or(id, |l| l.max(id)));
        }
    }
    fn resume_from(&self) -> Option<i64> {
        self.last_id
    }
    fn on_disconnect(&mut self, _code: Option<u16>, at_ns: u64) {
        self.disconnected_at.get_or_insert(at_ns);
    }
    fn on_reconnect(&mut self, at_ns: u64) {
        self.reconnected_at = Some(at_ns);
    }
}

/// Delivery figures over orders `range` for a set of clients.
#[derive(Debug, Default, Clone)]
pub struct Delivery {
    pub latency: Summary,
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub dups: u64,
    pub out_of_order: u64,
    pub wrong_items: u64,
    pub early: u64,
}

/// Judges what `clients` received of orders `range` against the commit log.
pub fn judge(
    clients: &[Client<OrderClient>],
    log: &OrderLog,
    range: std::ops::Range<usize>,
) -> Delivery {
    let mut d = Delivery::default();
    let mut lat = Vec::new();
    for c in clients {
        let s = lock(&c.state);
        for idx in range.clone() {
            if log.tenant_of(idx) != s.tenant || log.committed_at(idx).is_none() {
                continue;
            }
            d.expected += 1;
            if !s.seen.contains(&(idx as u32)) {
                d.lost += 1;
            }
        }
        for &(idx, at) in &s.arrivals {
            if !range.contains(&(idx as usize)) {
                continue;
            }
            d.delivered += 1;
            match log.committed_at(idx as usize) {
                Some(c) if at >= c => lat.push(at - c),
                _ => {
                    d.early += 1;
                    lat.push(0);
                }
            }
        }
        d.dups += s.dups;
        d.out_of_order += s.out_of_order;
        d.wrong_items += s.wrong_items;
    }
    d.latency = Summary::of_ns(&mut lat);
    d
}

/// Writer connections for a rate.
pub fn writer_conns(rate: f64) -> usize {
    ((rate / ORDERS_PER_WRITER).ceil() as usize).clamp(2, MAX_WRITER_CONNS)
}

/// Waits until `counter` reaches `expected` or DRAIN passes.
pub async fn drain(counter: &AtomicU64, expected: u64) {
    let until = now_ns() + DRAIN.as_nanos() as u64;
    while counter.load(Ordering::Relaxed) < expected && now_ns() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(DUP_GRACE).await;
}

struct PhaseOut {
    rate: f64,
    d: Delivery,
    w: writer::WriterStats,
}

async fn one(ctx: &Ctx, kind: Kind) -> Result<Vec<PhaseOut>> {
    let a = &ctx.args;
    let spec = ctx.spec(kind, true, "commit");
    let server = Server::start(&spec).await?;
    let db = match kind {
        Kind::Orderpush => ctx.op_db.clone(),
        Kind::Node => ctx.node_db.clone(),
    }
    .unwrap_or_default();
    let url = ctx.pg.url(&db);
    let n = a.tenants * a.clients_per_tenant;
    let eps = ctx.endpoints(kind, n, a.tenants);
    let counters = Arc::new(ClientCounters::default());
    let new_orders = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (clients, _) = super::connect_all(
        ctx,
        kind,
        "commit-scenario",
        &eps,
        |i| OrderClient::new(i % a.tenants, new_orders.clone()),
        &counters,
        false,
        &stop_rx,
    )
    .await;
    // Let the server finish subscribing every client before the first order.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = Arc::new(OrderLog::new(a.tenants, ctx.next_salt()));
    let mut out = Vec::new();
    let mut idx = 0usize;
    for &rate in &a.rates {
        let stop = Arc::new(AtomicBool::new(false));
        let before = new_orders.load(Ordering::Relaxed);
        let w = writer::run(
            &url,
            writer_conns(rate),
            rate,
            Duration::from_secs(a.phase_secs),
            idx,
            log.clone(),
            stop,
        )
        .await?;
        let expected = before + w.committed * a.clients_per_tenant as u64;
        drain(&new_orders, expected).await;
        let d = judge(&clients, &log, w.first_idx..w.end_idx);
        for c in &clients {
            lock(&c.state).reset_counters();
        }
        say(format!(
            "{}: {rate} orders/s: committed {} (late {}), commit->POS p50 {:.2} p99 {:.2} max {:.2} ms, lost {} dup {} ooo {} wrong-items {}",
            kind.name(),
            w.committed,
            w.late,
            d.latency.p50,
            d.latency.p99,
            d.latency.max,
            d.lost,
            d.dups,
            d.out_of_order,
            d.wrong_items
        ));
        if let Some(e) = &w.first_error {
            ctx.note(format!("{}: writer error at {rate}/s: {e}", kind.name()));
        }
        idx = w.end_idx;
        out.push(PhaseOut { rate, d, w });
    }
    let disconnects = counters.disconnects.load(Ordering::Relaxed);
    if disconnects > 0 {
        ctx.note(format!(
            "{}: {disconnects} clients disconnected during scenario 3",
            kind.name()
        ));
    }
    ws::shutdown(clients, &stop_tx).await;
    server.stop().await?;
    Ok(out)
}

pub async fn run(ctx: &Ctx, res: &mut Results) -> Result<()> {
    let mut op: Vec<PhaseOut> = vec![];
    let mut nd: Vec<PhaseOut> = vec![];
    for kind in ctx.args.servers.clone() {
        super::ensure_idle(ctx, &format!("scenario 3 on {}", kind.name())).await;
        say(format!("scenario 3 (commit → POS) against {}", kind.name()));
        match one(ctx, kind).await {
            Ok(o) => {
                res.commit_latency.insert(
                    kind.name().into(),
                    o.iter()
                        .map(|p| (p.rate, p.d.latency.p50, p.d.latency.p99, p.d.latency.max))
                        .collect(),
                );
                match kind {
                    Kind::Orderpush => op = o,
                    Kind::Node => nd = o,
                }
            }
            Err(e) => ctx.note(format!("scenario 3 on {} failed: {e:#}", kind.name())),
        }
    }
    let s = "3 commit→POS";
    let cpt = ctx.args.clients_per_tenant;
    let t = ctx.args.tenants;
    for &rate in &ctx.args.rates {
        let o = op.iter().find(|p| p.rate == rate);
        let n = nd.iter().find(|p| p.rate == rate);
        let f = |p: Option<&PhaseOut>, g: fn(&PhaseOut) -> f64| p.map(g);
        let lbl = format!("{rate:.0} orders/s, {t} tenants × {cpt} clients");
        let mut p50 = Row::new(s, &format!("p50 @ {lbl}"), "ms", Better::Lower)
            .op(f(o, |p| p.d.latency.p50))
            .node(f(n, |p| p.d.latency.p50));
        let mut p99 = Row::new(s, &format!("p99 @ {rate:.0}/s"), "ms", Better::Lower)
            .op(f(o, |p| p.d.latency.p99))
            .node(f(n, |p| p.d.latency.p99));
        if rate == 100.0 {
            p50 = p50.target("≤ 2 ms", |v| v <= 2.0);
            p99 = p99.target("≤ 5 ms", |v| v <= 5.0);
        } else if rate == 1000.0 {
            p99 = p99.target("≤ 20 ms", |v| v <= 20.0);
        }
        let desc = |p: Option<&PhaseOut>| {
            p.map(|p| {
                format!(
                    "{} orders committed ({} late, {} failed), writer tx p50 {:.2} ms, {} frames expected, {} early",
                    p.w.committed, p.w.late, p.w.failed, p.w.tx_latency.p50, p.d.expected, p.d.early
                )
            })
            .unwrap_or("–".into())
        };
        res.rows
            .push(p50.note(format!("orderpush: {}; node: {}", desc(o), desc(n))));
        res.rows.push(p99);
        res.rows.push(
            Row::new(s, &format!("max @ {rate:.0}/s"), "ms", Better::Lower)
                .op(f(o, |p| p.d.latency.max))
                .node(f(n, |p| p.d.latency.max)),
        );
        res.rows.push(
            Row::new(s, &format!("lost / duplicate / out-of-order @ {rate:.0}/s"), "frames", Better::Neither)
                .op(f(o, |p| (p.d.lost + p.d.dups + p.d.out_of_order) as f64))
                .node(f(n, |p| (p.d.lost + p.d.dups) as f64))
                .target("0", |v| v == 0.0)
                .note(format!(
                    "orderpush lost/dup/ooo {}; node lost/dup {} (no ids: order not checkable); new_order without all its items: orderpush {}, node {}",
                    o.map(|p| format!("{}/{}/{}", p.d.lost, p.d.dups, p.d.out_of_order)).unwrap_or("–".into()),
                    n.map(|p| format!("{}/{}", p.d.lost, p.d.dups)).unwrap_or("–".into()),
                    o.map(|p| p.d.wrong_items.to_string()).unwrap_or("–".into()),
                    n.map(|p| p.d.wrong_items.to_string()).unwrap_or("–".into()),
                )),
        );
    }
    Ok(())
}
