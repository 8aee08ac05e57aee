//! The unacknowledged-order alert: every instance periodically claims the orders no terminal
//! acknowledged within their tenant's timeout (each order is claimed once, cluster-wide) and
//! warns about each one and counts it. /status and /metrics read the overdue orders themselves.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::AckTimeout;
use crate::db::{self, PoolShare};
use crate::metrics::Metrics;
use crate::periodic::Periodic;

/// Orders warned about per check at most: a flood (a tenant whose terminals never acknowledge,
/// a kitchen offline at rush hour) gives 50 lines a second at most; the rest follow at the next
/// checks, oldest first, and the gauges count them all at once.
pub(crate) const MAX_WARNINGS_PER_CHECK: i64 = 100;
/// The log target of the warnings, which docs/operations.md names for log filters.
const UNACKNOWLEDGED_LOG_TARGET: &str = "orderpush::alert";

/// Claims and warns about overdue orders every `interval` until `shutdown`, on `db` (a share of
/// the pool: one short statement, the connection returned before anything is logged).
pub async fn run(
    db: PoolShare,
    timeout: AckTimeout,
    interval: Duration,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut clock = Periodic::every(interval);
    while clock.tick(&shutdown).await {
        // A claim slower than db::QUERY_TIMEOUT is cancelled; the next check tries again.
        let claim = db.run(db::QUERY_TIMEOUT, async |c| {
            db::acks::claim_overdue(&***c, timeout.as_secs(), MAX_WARNINGS_PER_CHECK).await
        });
        let due = tokio::select! {
            _ = shutdown.cancelled() => return,
            due = claim => due,
        };
        let due = match due {
            Ok(due) => due,
            Err(e) => {
                // Nothing is lost: the orders stay unclaimed until a check succeeds.
                debug!(target: UNACKNOWLEDGED_LOG_TARGET, error = %e, "could not look for unacknowledged orders");
                continue;
            }
        };
        metrics
            .orders_unacknowledged
            .fetch_add(due.len() as u64, Ordering::Relaxed);
        for order in due {
            // Escaped: an order number is the application's data and must not forge log lines.
            let number = order.order_number.as_deref().unwrap_or("?").escape_debug();
            let timeout = order.timeout_seconds;
            if order.undelivered() {
                warn!(
                    target: UNACKNOWLEDGED_LOG_TARGET, tenant = %order.tenant, id = order.event_id,
                    "order {number} for tenant {} not acknowledged after {timeout} s (never delivered to a terminal)",
                    order.tenant
                );
            } else {
                warn!(
                    target: UNACKNOWLEDGED_LOG_TARGET, tenant = %order.tenant, id = order.event_id,
                    "order {number} for tenant {} not acknowledged after {timeout} s",
                    order.tenant
                );
            }
        }
    }
}
