//! The undelivered-event alert: after the listener hands an event to this instance's sockets,
//! it logs the delivery, records the event for the status page, and warns and counts an event
//! that no terminal of its tenant received, on this instance or (through presence) any other.
//! The unacknowledged-order alert, which watches the kitchen rather than the sockets, is
//! [`unacknowledged`].

pub mod unacknowledged;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::activity::Activity;
use crate::event::Event;
use crate::metrics::Metrics;
use crate::presence::Presence;

/// At most one "no POS connected" warning per tenant per this interval.
pub(crate) const UNDELIVERED_WARN_INTERVAL: Duration = Duration::from_secs(60);

/// The log target of these lines: the one they had while the listener wrote them, which log
/// filters and docs/operations.md name.
const DELIVERY_LOG_TARGET: &str = "orderpush::listener";

/// Decides, per event, whether a terminal received it, and reports the ones none did.
pub(crate) struct UndeliveredAlert {
    metrics: Arc<Metrics>,
    /// Where other instances' terminals are known; `None` = only this instance's sockets count.
    presence: Option<Arc<Presence>>,
    /// The status page's record of recent events.
    activity: Option<Arc<Activity>>,
    /// When each tenant's orders, and separately its other events, were last warned about.
    last_warning: HashMap<(Arc<str>, Warned), Instant>,
}

/// What a tenant was warned about: its orders are never silenced by a warning about its other
/// events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Warned {
    Orders,
    OtherEvents,
}

impl UndeliveredAlert {
    /// An alert that counts this instance's sockets only and records nothing for the status page.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            presence: None,
            activity: None,
            last_warning: HashMap::new(),
        }
    }

    /// Makes the alert cluster-wide (a terminal on another instance counts, and one instance
    /// reports) and records events for the status page.
    pub(crate) fn cluster_wide(mut self, presence: Arc<Presence>, activity: Arc<Activity>) -> Self {
        self.presence = Some(presence);
        self.activity = Some(activity);
        self
    }

    /// `event` was queued on `sent` sockets of this instance and disconnected `failed` others
    /// whose queues were full.
    pub(crate) fn published(&mut self, event: &Event, sent: usize, failed: usize) {
        let here = sent + failed;
        // Another instance's terminal counts as delivered; without a fresh presence view
        // (database trouble) only this instance's sockets can be known.
        let elsewhere = self
            .presence
            .as_ref()
            .and_then(|p| p.connected_elsewhere(&event.tenant));
        let undelivered = here == 0 && elsewhere != Some(true);
        if let Some(activity) = &self.activity {
            activity.record(event, sent, undelivered);
        }
        if here == 0 && elsewhere == Some(true) {
            // Its terminals are on other instances, which log the delivery: no noise here.
            debug!(target: DELIVERY_LOG_TARGET, tenant = %event.tenant, "no local connections for tenant: {}", event.tenant);
        } else if here == 0 {
            info!(target: DELIVERY_LOG_TARGET, tenant = %event.tenant, "no connections for tenant: {}", event.tenant);
        } else {
            info!(
                target: DELIVERY_LOG_TARGET,
                tenant = %event.tenant, event_type = %event.kind, id = event.id,
                "event '{}' sent to {} clients for tenant: {} ({} failed)",
                event.kind, sent, event.tenant, failed
            );
        }
        // Every instance reads every event: one of them reports, so an event is warned about
        // and counted once, not once per instance.
        if undelivered && self.presence.as_ref().is_none_or(|p| p.is_reporter()) {
            self.metrics.undelivered(&event.kind);
            self.warn(event, elsewhere.is_some());
        }
    }

    /// WARN once per tenant per [`UNDELIVERED_WARN_INTERVAL`] for orders, and separately for
    /// other events, so an order is never hidden behind an earlier loyalty warning.
    fn warn(&mut self, event: &Event, cluster_wide: bool) {
        let now = Instant::now();
        let is_order = event.kind == "new_order";
        let what = if is_order {
            Warned::Orders
        } else {
            Warned::OtherEvents
        };
        let key = (Arc::clone(&event.tenant), what);
        let last = self.last_warning.get(&key);
        if last.is_some_and(|t| now.duration_since(*t) < UNDELIVERED_WARN_INTERVAL) {
            return;
        }
        // Bounded by tenants with recent warnings: older entries no longer suppress anything.
        self.last_warning
            .retain(|_, t| now.duration_since(*t) < UNDELIVERED_WARN_INTERVAL);
        self.last_warning.insert(key, now);
        let scope = if cluster_wide {
            "no POS connected"
        } else {
            "no POS connected to this instance (presence unavailable)"
        };
        if is_order {
            let number = serde_json::from_str::<serde_json::Value>(&event.data)
                .ok()
                .and_then(|d| {
                    d.get("orderNumber")
                        .and_then(|n| n.as_str())
                        .map(str::to_owned)
                })
                .unwrap_or_else(|| "?".into());
            // Escaped: an order number is the application's data and must not forge log lines.
            let number = number.escape_debug();
            warn!(
                target: DELIVERY_LOG_TARGET,
                tenant = %event.tenant, id = event.id,
                "order {number} for tenant {}: {scope}", event.tenant
            );
        } else {
            warn!(
                target: DELIVERY_LOG_TARGET,
                tenant = %event.tenant, id = event.id, event_type = %event.kind,
                "event {} (id {}) for tenant {}: {scope}", event.kind, event.id, event.tenant
            );
        }
    }
}
