//! The application's writers: paced order transactions (one orders row, then 2-3 order_items
//! rows, one transaction), recording when each COMMIT returned.

use anyhow::Result;
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::{instant_at, now_ns};
use crate::pg;
use crate::stats::Summary;

/// Orders recorded in one run at most (sizes the commit-time table; 1,000/s for 10 minutes).
pub const MAX_ORDERS: usize = 600_000;
/// A writer that falls this far behind its schedule counts the order as "late" (the offered
/// rate was not sustained); it still writes it.
const LATE_AFTER_NS: u64 = 50_000_000;
/// A single order transaction slower than this is abandoned and counted as failed.
const TX_TIMEOUT: Duration = Duration::from_secs(10);

/// Commit times by order index, shared between writers and clients.
pub struct OrderLog {
    /// now_ns() when COMMIT returned; 0 = not (yet) committed.
    pub commit_ns: Vec<AtomicU64>,
    pub tenants: usize,
    /// Distinguishes this run's order UUIDs from a previous run's in the same database.
    pub salt: u32,
    /// With `Some`, orders are spread over all tenants instead of round-robin (see
    /// [`OrderLog::spread`]).
    spread: Option<Spread>,
}

/// Orders spread over many tenants, with a few watched tenants (0..watched) receiving every
/// [`WATCHED_EVERY`]-th order so that their clients get enough events to check and time.
#[derive(Clone, Copy)]
struct Spread {
    watched: usize,
    stride: usize,
}

/// In a spread log, every this-many-th order goes to a watched tenant.
pub const WATCHED_EVERY: usize = 10;

impl OrderLog {
    pub fn new(tenants: usize, salt: u32) -> OrderLog {
        OrderLog {
            commit_ns: (0..MAX_ORDERS).map(|_| AtomicU64::new(0)).collect(),
            tenants,
            salt,
            spread: None,
        }
    }
    /// A log whose orders go to tenants spread over all `tenants` (a stride coprime with the
    /// count walks every residue), except every [`WATCHED_EVERY`]-th order, which goes to one of
    /// the tenants `0..watched` in turn.
    pub fn spread(tenants: usize, watched: usize, salt: u32) -> OrderLog {
        let tenants = tenants.max(1);
        // About 0.618 of the count, made coprime with it: consecutive orders land far apart and
        // every tenant is visited once per `tenants` orders.
        let mut stride = ((tenants as f64 * 0.618) as usize).max(1);
        while gcd(stride, tenants) != 1 {
            stride += 1;
        }
        OrderLog {
            spread: Some(Spread {
                watched: watched.clamp(1, tenants),
                stride,
            }),
            ..OrderLog::new(tenants, salt)
        }
    }
    pub fn tenant_of(&self, idx: usize) -> usize {
        match self.spread {
            None => idx % self.tenants,
            Some(s) if idx % WATCHED_EVERY == 0 => (idx / WATCHED_EVERY) % s.watched,
            Some(s) => (idx as u128 * s.stride as u128 % self.tenants as u128) as usize,
        }
    }
    /// Items per order: alternately 2 and 3.
    pub fn items_of(idx: usize) -> usize {
        2 + idx % 2
    }
    pub fn committed_at(&self, idx: usize) -> Option<u64> {
        match self.commit_ns.get(idx)?.load(Ordering::Acquire) {
            0 => None,
            v => Some(v),
        }
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// What the writers did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WriterStats {
    pub committed: u64,
    pub failed: u64,
    pub late: u64,
    pub first_idx: usize,
    pub end_idx: usize,
    pub tx_latency: Summary,
    pub first_error: Option<String>,
}

/// The SQL of order `idx`: BEGIN; orders row; 2-3 items rows; COMMIT (one round trip).
fn order_sql(log: &OrderLog, idx: usize) -> String {
    let id = format!("{:08x}-0000-4000-8000-{:012x}", log.salt, idx);
    let tenant = pg::tenant_slug(log.tenant_of(idx));
    let mut items = String::new();
    for j in 0..OrderLog::items_of(idx) {
        if j > 0 {
            items.push(',');
        }
        items.push_str(&format!(
            "('{id}','m{j}','Item {j}',{q},{p}.50,'[{{\"name\":\"extra cheese\",\"price\":1.5}}]')",
            q = 1 + j,
            p = 8 + j
        ));
    }
    format!(
        "BEGIN;\
         INSERT INTO orders (id, tenant_slug, order_number, customer_name, customer_phone, \
         order_type, order_source, status, total_amount, special_instructions) VALUES \
         ('{id}','{tenant}','bench-{idx}','Bench Customer','+44 7700 900000','delivery',\
         'online','pending',{total}.50,'ring the bell');\
         INSERT INTO order_items (order_id, menu_item_id, name, quantity, price, selected_addons) \
         VALUES {items};\
         COMMIT;",
        total = 20 + idx % 30
    )
}

/// Writes orders `first_idx..` at `rate` per second for `duration` (open loop: order k is due at
/// start + k/rate whatever happened before), over `conns` connections, until `stop` is set.
pub async fn run(
    url: &str,
    conns: usize,
    rate: f64,
    duration: Duration,
    first_idx: usize,
    log: Arc<OrderLog>,
    stop: Arc<AtomicBool>,
) -> Result<WriterStats> {
    let total = ((rate * duration.as_secs_f64()).round() as usize)
        .min(MAX_ORDERS.saturating_sub(first_idx));
    let next = Arc::new(AtomicU64::new(0));
    let t0 = now_ns() + 10_000_000;
    let interval_ns = 1e9 / rate;
    let mut tasks = Vec::new();
    for _ in 0..conns.max(1) {
        // Named, so Postgres CPU measurements can tell the writers' backends from the service's.
        let client = pg::connect(&pg::bench_url(url)).await?;
        let (next, log, stop) = (next.clone(), log.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut st = WriterStats::default();
            let mut lat = Vec::new();
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed) as usize;
                if k >= total || stop.load(Ordering::Relaxed) {
                    break;
                }
                let due = t0 + (k as f64 * interval_ns) as u64;
                tokio::time::sleep_until(instant_at(due).into()).await;
                let started = now_ns();
                if started > due + LATE_AFTER_NS {
                    st.late += 1;
                }
                let idx = first_idx + k;
                let sql = order_sql(&log, idx);
                match tokio::time::timeout(TX_TIMEOUT, client.batch_execute(&sql)).await {
                    Ok(Ok(())) => {
                        let done = now_ns();
                        log.commit_ns[idx].store(done, Ordering::Release);
                        lat.push(done - started);
                        st.committed += 1;
                    }
                    Ok(Err(e)) => {
                        st.failed += 1;
                        st.first_error.get_or_insert_with(|| e.to_string());
                        let _ = client.batch_execute("ROLLBACK").await;
                    }
                    Err(_) => {
                        st.failed += 1;
                        st.first_error
                            .get_or_insert_with(|| "transaction timed out".into());
                    }
                }
            }
            (st, lat)
        }));
    }
    let mut out = WriterStats {
        first_idx,
        end_idx: first_idx + total,
        ..Default::default()
    };
    let mut lat = Vec::new();
    for t in tasks {
        let (st, l) = t.await?;
        out.committed += st.committed;
        out.failed += st.failed;
        out.late += st.late;
        if out.first_error.is_none() {
            out.first_error = st.first_error;
        }
        lat.extend(l);
    }
    out.tx_latency = Summary::of_ns(&mut lat);
    Ok(out)
}
