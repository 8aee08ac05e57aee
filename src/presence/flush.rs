//! The flush: one transaction per interval on presence's own connection writes this instance's
//! heartbeat and its terminals' changes and expires dead instances; then it refreshes the
//! cluster view. The loop that runs it deletes this instance's rows on shutdown.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Presence;
use super::registry::Changes;
use crate::db::presence::{InstanceStats, Terminal};
use crate::db::{self, DbError};
use crate::metrics::Metrics;
use crate::periodic::Periodic;

/// The log target of presence's lines, wherever in the module they are written.
const PRESENCE_LOG_TARGET: &str = "orderpush::presence";

/// What one flush wrote, for tests and debug logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushReport {
    /// Connection rows inserted or updated.
    pub written: usize,
    /// Connection rows deleted.
    pub removed: usize,
    /// Dead instances removed.
    pub expired_instances: u64,
    /// Live instances now (this one included).
    pub live_instances: usize,
}

impl Presence {
    /// Writes the heartbeat, this instance's connection changes and its stats in one
    /// transaction, with what its terminals received and acknowledged (the acknowledgement
    /// chain), expires dead instances, then refreshes the cluster view. On failure the next
    /// flush rewrites every row.
    pub async fn flush(
        &self,
        client: &mut tokio_postgres::Client,
        stats: &InstanceStats,
    ) -> Result<FlushReport, DbError> {
        // Taken out here, not in the timed part: a flush that times out is dropped mid-way,
        // and what closed connections received must survive it.
        let mut changes = self.registry.take_changes(false);
        // Slower than db::QUERY_TIMEOUT: abandoned; the next flush rewrites everything.
        let result =
            db::with_timeout(db::QUERY_TIMEOUT, self.write(client, stats, &mut changes)).await;
        if result.is_err() {
            self.need_full_resync();
            self.registry.keep_finished(changes.finished);
        }
        result
    }

    async fn write(
        &self,
        client: &mut tokio_postgres::Client,
        stats: &InstanceStats,
        changes: &mut Changes,
    ) -> Result<FlushReport, DbError> {
        let me = self.info.id.as_str();
        let tx = client.transaction().await?;
        let inserted = db::presence::heartbeat(&tx, &self.info.as_row(), stats).await?;
        if inserted && !changes.full {
            // Our row was gone (expired by another instance after a long stall, or the database
            // failed over and the unlogged tables came back empty): rewrite everything.
            warn!(target: PRESENCE_LOG_TARGET, "presence: this instance's rows had disappeared; re-registering");
            let all = self.registry.take_changes(true);
            changes.full = true;
            changes.removed = all.removed;
            changes.changed = all.changed;
            changes.finished.extend(all.finished);
        }
        if changes.full {
            db::presence::clear_terminals(&tx, me).await?;
        } else if !changes.removed.is_empty() {
            db::presence::remove_terminals(&tx, me, &changes.removed).await?;
        }
        if !changes.changed.is_empty() {
            let terminals: Vec<Terminal<'_>> =
                changes.changed.iter().map(|c| c.as_terminal()).collect();
            db::presence::upsert_terminals(&tx, me, &terminals).await?;
        }
        let acked_late = db::acks::record(&tx, &changes.progress()).await?;
        let expired = db::presence::expire_instances(&tx, me).await?;
        tx.commit().await?;
        if expired > 0 {
            info!(
                target: PRESENCE_LOG_TARGET,
                expired,
                "presence: removed instances whose heartbeat stopped"
            );
        }
        for order in acked_late {
            // The other half of the unacknowledged warning, so a log reader sees the order's
            // story end. Escaped: an order number is the application's data.
            let number = order.order_number.as_deref().unwrap_or("?").escape_debug();
            info!(
                target: PRESENCE_LOG_TARGET,
                tenant = %order.tenant, id = order.event_id,
                "order {number} for tenant {} acknowledged after {:.0} s",
                order.tenant, order.waited_seconds
            );
        }

        let instances = db::presence::live_instance_ids(&*client).await?;
        let elsewhere = db::presence::tenants_connected_elsewhere(&*client, me).await?;
        let report = FlushReport {
            written: changes.changed.len(),
            removed: if changes.full {
                0
            } else {
                changes.removed.len()
            },
            expired_instances: expired,
            live_instances: instances.len(),
        };
        self.cluster.synced(instances, elsewhere);
        Ok(report)
    }

    /// Deletes this instance's rows (clean shutdown), so others stop counting its terminals at
    /// once instead of after [`super::INSTANCE_STALE_AFTER`].
    pub(crate) async fn deregister(&self, client: &tokio_postgres::Client) -> Result<(), DbError> {
        let work = db::presence::deregister(client, &self.info.id);
        db::with_timeout(db::QUERY_TIMEOUT, work).await
    }
}

/// Runs the flush every `interval` on a connection of its own (so a busy request pool never
/// delays the heartbeat), until `shutdown`; then deletes this instance's rows. `stats` says,
/// at each flush, what the instance publishes about itself (its listener, its event rate).
pub async fn run(
    presence: Arc<Presence>,
    database: tokio_postgres::Config,
    interval: Duration,
    stats: impl Fn() -> InstanceStats,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut clock = Periodic::every(interval);
    let mut failing = false;
    while clock.tick(&shutdown).await {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = db::connect(&database, "orderpush-presence").await.ok();
        }
        let Some(c) = client.as_mut() else {
            presence.need_full_resync();
            metrics
                .presence_flush_failures
                .fetch_add(1, Ordering::Relaxed);
            if !failing {
                warn!(target: PRESENCE_LOG_TARGET, "presence: cannot reach the database; retrying every {interval:?}");
                failing = true;
            }
            continue;
        };
        match presence.flush(c, &stats()).await {
            Ok(report) => {
                if failing {
                    info!(target: PRESENCE_LOG_TARGET, "presence: writing heartbeats again");
                    failing = false;
                }
                debug!(target: PRESENCE_LOG_TARGET, ?report, "presence flushed");
            }
            Err(e) => {
                metrics
                    .presence_flush_failures
                    .fetch_add(1, Ordering::Relaxed);
                if !failing {
                    warn!(target: PRESENCE_LOG_TARGET, error = %e, "presence: heartbeat failed; retrying every {interval:?}");
                    failing = true;
                }
                client = None;
            }
        }
    }
    if let Some(c) = client.as_ref() {
        if let Err(e) = presence.deregister(c).await {
            debug!(target: PRESENCE_LOG_TARGET, error = %e, "presence: could not deregister; the rows expire by themselves");
        }
    }
}
