//! Recent activity for the status page, kept in memory and bounded: the last events (type and
//! tenant only, never customer data), the event rate, and which tenants recently received events
//! while no terminal was connected anywhere.
//!
//! Every instance's listener reads every event, so each instance's view is the whole cluster's.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::event::{Event, iso};

/// Events kept for the status page's "last events" list: a screenful, a few KB of memory.
pub(crate) const RECENT_EVENTS: usize = 50;
/// Events per second is averaged over this window: long enough to be steady for a person
/// watching, short enough to show a burst within seconds.
pub(crate) const RATE_WINDOW_SECS: u64 = 10;
/// How long a tenant that received an event with no terminal connected stays flagged (red on
/// the status page while it still has no terminal): long enough for a person to notice.
pub(crate) const UNDELIVERED_WINDOW: Duration = Duration::from_secs(600);
/// Per-second buckets kept for the rate (one spare so the current, partial second is excluded).
const RATE_BUCKETS: usize = RATE_WINDOW_SECS as usize + 2;

/// One event as the status page lists it: no `data`, so no customer data.
#[derive(Debug, Clone, Serialize)]
pub struct RecentEvent {
    /// When this instance handed it to its sockets (ISO 8601 UTC).
    pub at: String,
    /// Tenant slug.
    #[serde(serialize_with = "str_ref")]
    pub tenant: Arc<str>,
    /// The tenant's event id.
    pub id: i64,
    /// Event type.
    #[serde(rename = "type")]
    pub kind: String,
    /// `db` or `broadcast`.
    pub origin: &'static str,
    /// Sockets on this instance it was queued for.
    pub sent_here: usize,
    /// True when no terminal was connected to any instance.
    pub undelivered: bool,
}

/// A tenant that received events while no terminal was connected.
#[derive(Debug, Clone, Serialize)]
pub struct Undelivered {
    /// Tenant slug.
    #[serde(serialize_with = "str_ref")]
    pub tenant: Arc<str>,
    /// Such events within [`UNDELIVERED_WINDOW`].
    pub events: u64,
    /// Of which `new_order`.
    pub orders: u64,
    /// The last one (ISO 8601 UTC).
    pub last_at: String,
    #[serde(skip)]
    last: SystemTime,
}

#[derive(Debug, Default)]
struct Inner {
    recent: VecDeque<RecentEvent>,
    /// (unix second, events in it), indexed by second modulo the length.
    rate: [(u64, u64); RATE_BUCKETS],
    undelivered: HashMap<Arc<str>, Undelivered>,
}

/// The in-memory activity record of one instance.
#[derive(Debug, Default)]
pub struct Activity {
    inner: Mutex<Inner>,
}

impl Activity {
    /// Records one event handed to the hub: `sent_here` sockets on this instance, and whether no
    /// terminal was connected anywhere.
    pub(crate) fn record(&self, event: &Event, sent_here: usize, undelivered: bool) {
        let now = SystemTime::now();
        let second = unix_secs(now);
        let mut inner = self.lock();
        let slot = &mut inner.rate[(second % RATE_BUCKETS as u64) as usize];
        if slot.0 != second {
            *slot = (second, 0);
        }
        slot.1 += 1;
        if inner.recent.len() == RECENT_EVENTS {
            inner.recent.pop_back();
        }
        inner.recent.push_front(RecentEvent {
            at: iso(now),
            tenant: Arc::clone(&event.tenant),
            id: event.id,
            kind: event.kind.clone(),
            origin: event.origin.as_str(),
            sent_here,
            undelivered,
        });
        if undelivered {
            let entry = inner
                .undelivered
                .entry(Arc::clone(&event.tenant))
                .or_insert_with(|| Undelivered {
                    tenant: Arc::clone(&event.tenant),
                    events: 0,
                    orders: 0,
                    last_at: String::new(),
                    last: now,
                });
            if now.duration_since(entry.last).unwrap_or_default() > UNDELIVERED_WINDOW {
                entry.events = 0;
                entry.orders = 0;
            }
            entry.events += 1;
            entry.orders += u64::from(event.kind == "new_order");
            entry.last = now;
            entry.last_at = iso(now);
        }
    }

    /// The last events, newest first.
    pub fn recent(&self) -> Vec<RecentEvent> {
        self.lock().recent.iter().cloned().collect()
    }

    /// Events per second over the last [`RATE_WINDOW_SECS`] complete seconds.
    pub fn events_per_second(&self) -> f64 {
        let now = unix_secs(SystemTime::now());
        let inner = self.lock();
        let total: u64 = inner
            .rate
            .iter()
            .filter(|(s, _)| *s < now && now - *s <= RATE_WINDOW_SECS)
            .map(|(_, n)| n)
            .sum();
        total as f64 / RATE_WINDOW_SECS as f64
    }

    /// Tenants that received events with no terminal connected within [`UNDELIVERED_WINDOW`].
    /// Older entries are forgotten here (every status poll and scrape): the map never holds
    /// more than one entry per tenant, and usually only the recent ones.
    pub fn undelivered(&self) -> Vec<Undelivered> {
        let now = SystemTime::now();
        let mut inner = self.lock();
        inner
            .undelivered
            .retain(|_, u| now.duration_since(u.last).unwrap_or_default() <= UNDELIVERED_WINDOW);
        let mut list: Vec<Undelivered> = inner.undelivered.values().cloned().collect();
        list.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        list
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn str_ref<S: serde::Serializer>(v: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v)
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Origin;

    fn event(tenant: &str, id: i64, kind: &str) -> Event {
        Event {
            tenant: Arc::from(tenant),
            id,
            kind: kind.into(),
            timestamp: String::new(),
            data: r#"{"customerName":"secret"}"#.into(),
            origin: Origin::Db,
            emitted_at: SystemTime::now(),
            truncated: false,
        }
    }

    #[test]
    fn recent_events_are_bounded_newest_first_and_carry_no_data() {
        let a = Activity::default();
        for i in 1..=(RECENT_EVENTS as i64 + 5) {
            a.record(&event("kitchen", i, "new_order"), 1, false);
        }
        let recent = a.recent();
        assert_eq!(recent.len(), RECENT_EVENTS);
        assert_eq!(recent[0].id, RECENT_EVENTS as i64 + 5);
        let json = serde_json::to_string(&recent).unwrap();
        assert!(!json.contains("secret"), "{json}");
    }

    #[test]
    fn undelivered_tenants_are_tracked_per_tenant() {
        let a = Activity::default();
        a.record(&event("kitchen", 1, "new_order"), 0, true);
        a.record(&event("kitchen", 2, "order_updated"), 0, true);
        a.record(&event("bistro", 1, "new_order"), 2, false);
        let u = a.undelivered();
        assert_eq!(u.len(), 1);
        assert_eq!((&*u[0].tenant, u[0].events, u[0].orders), ("kitchen", 2, 1));
    }
}
