//! Presence: this instance's connected POS terminals and its heartbeat, written to the database
//! in one batch per interval, so that every instance (admin API, status page, undelivered-order
//! alert) sees all of them; rows of instances whose heartbeat stopped expire.
//!
//! The socket tasks never touch the database: they update atomics on their [`Connection`]; the
//! flush loop collects what changed every `Tuning::presence_interval`
//! ([`crate::config::PRESENCE_INTERVAL`]) and writes it in one transaction.
//!
//! - [`identity`]: who this process is ([`InstanceInfo`]).
//! - [`registry`]: the terminals connected here, and what changed since the last flush.
//! - [`cluster`]: what the last flush learnt about the other instances.
//! - [`flush`]: the heartbeat transaction and the loop that runs it.

pub mod cluster;
pub mod flush;
pub mod identity;
pub mod registry;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub(crate) use crate::db::presence::InstanceStats;
pub(crate) use flush::run;
pub(crate) use identity::InstanceInfo;
pub(crate) use registry::Registration;

use cluster::ClusterView;
use registry::Registry;

/// This instance's presence: who it is, its connected terminals, and its view of the others.
#[derive(Debug)]
pub struct Presence {
    info: InstanceInfo,
    registry: Arc<Registry>,
    cluster: ClusterView,
}

impl Presence {
    /// An empty registry for this instance.
    pub fn new(info: InstanceInfo) -> Arc<Self> {
        Arc::new(Self {
            info,
            registry: Arc::new(Registry::default()),
            cluster: ClusterView::default(),
        })
    }

    /// Who this instance is.
    pub fn info(&self) -> &InstanceInfo {
        &self.info
    }

    /// Registers a connected terminal (`since`: the id it resumed from, if any).
    pub(crate) fn register(
        &self,
        tenant: &Arc<str>,
        key_id: &str,
        peer: SocketAddr,
        since: Option<i64>,
    ) -> Registration {
        self.registry.register(tenant, key_id, peer, since)
    }

    /// Whether a terminal of `tenant` is connected to another live instance, as of the last
    /// flush; `None` when that view is missing or older than [`INSTANCE_STALE_AFTER`] (database trouble).
    pub(crate) fn connected_elsewhere(&self, tenant: &str) -> Option<bool> {
        self.cluster.connected_elsewhere(tenant)
    }

    /// Whether this instance reports cluster-wide conditions (the undelivered alert and its
    /// metric), so that N instances do not report one event N times: the live instance with the
    /// smallest id does. Without a fresh view every instance reports for itself.
    pub(crate) fn is_reporter(&self) -> bool {
        self.cluster.is_reporter(&self.info.id)
    }

    /// Time since the last successful flush (a round trip to the database on presence's own
    /// connection); `None` before the first.
    pub(crate) fn last_flush_age(&self) -> Option<Duration> {
        self.cluster.last_sync_age()
    }

    /// Live instances seen at the last flush (0 before the first).
    pub(crate) fn live_instances(&self) -> usize {
        self.cluster.live_instances()
    }

    /// The database may no longer match memory: the next flush rewrites every row.
    pub(crate) fn need_full_resync(&self) {
        self.registry.need_full_resync();
    }
}
