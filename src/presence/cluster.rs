//! The cluster view: what the last successful flush learnt about the other live instances
//! (which exist, and which tenants have a terminal on one of them), trusted only while fresh.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::db::presence::INSTANCE_STALE_AFTER;

#[derive(Debug, Default)]
struct View {
    synced_at: Option<Instant>,
    /// Ids of live instances, this one included, sorted.
    instances: Vec<String>,
    /// Tenants with a terminal connected to another live instance.
    elsewhere: HashSet<Arc<str>>,
}

/// What the last successful flush learnt about the other instances.
#[derive(Debug, Default)]
pub(crate) struct ClusterView(Mutex<View>);

impl ClusterView {
    /// Records what a flush just read: the live instances' ids (sorted) and the tenants with a
    /// terminal on another instance.
    pub(crate) fn synced(&self, instances: Vec<String>, elsewhere: HashSet<Arc<str>>) {
        *self.lock() = View {
            synced_at: Some(Instant::now()),
            instances,
            elsewhere,
        };
    }

    /// Whether a terminal of `tenant` is connected to another live instance; `None` when the
    /// view is missing or older than [`INSTANCE_STALE_AFTER`].
    pub(crate) fn connected_elsewhere(&self, tenant: &str) -> Option<bool> {
        let view = self.lock();
        let fresh = view
            .synced_at
            .is_some_and(|t| t.elapsed() < INSTANCE_STALE_AFTER);
        fresh.then(|| view.elsewhere.contains(tenant))
    }

    /// Whether the instance `me` reports cluster-wide conditions: the live instance with the
    /// smallest id does; without a fresh view every instance does.
    pub(crate) fn is_reporter(&self, me: &str) -> bool {
        let view = self.lock();
        let fresh = view
            .synced_at
            .is_some_and(|t| t.elapsed() < INSTANCE_STALE_AFTER);
        !fresh
            || view
                .instances
                .first()
                .is_none_or(|first| first.as_str() >= me)
    }

    /// Time since the last successful flush; `None` before the first.
    pub(crate) fn last_sync_age(&self) -> Option<Duration> {
        self.lock().synced_at.map(|t| t.elapsed())
    }

    /// Live instances seen at the last flush (0 before the first).
    pub(crate) fn live_instances(&self) -> usize {
        self.lock().instances.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, View> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_fresh_view_every_instance_reports_for_itself() {
        let view = ClusterView::default();
        let me = "5";
        assert_eq!(view.connected_elsewhere("kitchen"), None);
        assert!(view.is_reporter(me));
        view.synced(
            vec!["0".into(), me.into()],
            HashSet::from([Arc::from("kitchen")]),
        );
        assert_eq!(view.connected_elsewhere("kitchen"), Some(true));
        assert_eq!(view.connected_elsewhere("bistro"), Some(false));
        assert!(
            !view.is_reporter(me),
            "the smallest id (\"0\") reports, not this one"
        );
        assert!(view.is_reporter("0"));
        assert_eq!(view.live_instances(), 2);
    }
}
