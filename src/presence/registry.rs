//! The terminals connected to this instance: one [`Connection`] per socket, updated by its
//! socket task with atomics only, and what changed since the last flush.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::db::acks::Progress;
use crate::db::presence::Terminal;

/// A value meaning "none yet" in the atomics (event ids are >= 0).
const NONE: i64 = -1;
/// Closed connections whose last deliveries and acknowledgements wait for the next flush. One
/// interval's worth of closes is far below this; during a database outage the oldest are
/// dropped, which only loses when those orders were first delivered or acknowledged (the
/// acknowledgement chain's times), never an event.
const MAX_FINISHED: usize = 10_000;

/// One connected terminal, shared between its socket task (which updates it) and the flush.
#[derive(Debug)]
pub struct Connection {
    id: u64,
    tenant: Arc<str>,
    key_id: Arc<str>,
    peer: SocketAddr,
    connected_at: SystemTime,
    since: i64,
    last_delivered: AtomicI64,
    last_acked: AtomicI64,
    dirty: AtomicBool,
    /// It receives `new_order` (no type filter leaves it out), so what it was sent and
    /// acknowledged counts in the acknowledgement chain.
    takes_orders: AtomicBool,
}

impl Connection {
    /// The socket asked for types that leave `new_order` out: its deliveries and
    /// acknowledgements say nothing about orders.
    pub(crate) fn takes_no_orders(&self) {
        self.takes_orders.store(false, Ordering::Relaxed);
    }

    /// What it received and acknowledged, for the acknowledgement chain; `None` when that says
    /// nothing about orders (nothing yet, or a socket without `new_order`).
    pub fn progress(&self) -> Option<Progress<'_>> {
        let (delivered, acked) = (self.last_delivered(), self.last_acked());
        (self.takes_orders.load(Ordering::Relaxed) && (delivered.is_some() || acked.is_some()))
            .then_some(Progress {
                tenant: &self.tenant,
                key_id: &self.key_id,
                delivered,
                acked,
            })
    }

    /// Records that event `id` was written to the socket.
    pub fn delivered(&self, id: i64) {
        self.last_delivered.store(id, Ordering::Relaxed);
        self.dirty.store(true, Ordering::Release);
    }

    /// Records a POS's `{"type":"ack","id":N}`. Acks only move forward and only up to what the
    /// POS can have seen (the last id delivered on this connection, or its `since`); anything
    /// else is a client bug and is ignored. Returns whether it was recorded.
    pub fn acked(&self, id: i64) -> bool {
        let seen = self.last_delivered.load(Ordering::Relaxed).max(self.since);
        if id < 0 || id > seen {
            return false;
        }
        let previous = self.last_acked.fetch_max(id, Ordering::Relaxed);
        if id > previous {
            self.dirty.store(true, Ordering::Release);
        }
        true
    }

    /// The last id delivered on this connection, if any.
    pub(crate) fn last_delivered(&self) -> Option<i64> {
        some(self.last_delivered.load(Ordering::Relaxed))
    }

    /// The last id this POS acknowledged, if any.
    pub(crate) fn last_acked(&self) -> Option<i64> {
        some(self.last_acked.load(Ordering::Relaxed))
    }

    /// Its row in the database, as of now.
    pub(crate) fn as_terminal(&self) -> Terminal<'_> {
        Terminal {
            conn_id: self.id,
            tenant: &self.tenant,
            key_id: &self.key_id,
            peer: self.peer,
            connected_at: self.connected_at,
            last_delivered: self.last_delivered(),
            last_acked: self.last_acked(),
        }
    }
}

fn some(v: i64) -> Option<i64> {
    (v != NONE).then_some(v)
}

/// A registered connection; dropping it unregisters it.
#[derive(Debug)]
pub(crate) struct Registration {
    registry: Arc<Registry>,
    conn: Arc<Connection>,
}

impl Registration {
    /// The connection's record, to be told of every event written to its socket.
    pub(crate) fn delivery_log(&self) -> Arc<dyn crate::socket::DeliveryLog> {
        Arc::clone(&self.conn) as Arc<dyn crate::socket::DeliveryLog>
    }
}

impl crate::socket::DeliveryLog for Connection {
    fn delivered(&self, id: i64) {
        Connection::delivered(self, id);
    }
}

impl std::ops::Deref for Registration {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut local = self.registry.lock();
        local.live.remove(&self.conn.id);
        // What it received since the last flush still counts for the orders' chain.
        if self.conn.dirty.load(Ordering::Acquire) && self.conn.progress().is_some() {
            if local.finished.len() >= MAX_FINISHED {
                local.finished.remove(0);
            }
            local.finished.push(Arc::clone(&self.conn));
        }
        // A full rewrite is pending anyway (and during a database outage this list would only
        // grow): remembering the id is needed only for an incremental flush.
        if !local.full_resync {
            local.removed.push(self.conn.id);
        }
    }
}

#[derive(Debug)]
struct Local {
    live: HashMap<u64, Arc<Connection>>,
    /// Closed since the last flush (bounded by connections closed per interval: cleared when
    /// a flush takes it or fails).
    removed: Vec<u64>,
    /// Closed since the last flush with deliveries or acknowledgements not yet written (at most
    /// [`MAX_FINISHED`]).
    finished: Vec<Arc<Connection>>,
    /// The database may not match memory (first flush, or a failed one): rewrite every row.
    full_resync: bool,
}

/// What a flush must write.
#[derive(Debug)]
pub(crate) struct Changes {
    /// Rewrite every row (the first flush, or after a failed one).
    pub full: bool,
    /// Connections closed since the last flush (empty when `full`).
    pub removed: Vec<u64>,
    /// Connections to insert or update (all of them when `full`).
    pub changed: Vec<Arc<Connection>>,
    /// Connections closed since the last flush whose last deliveries and acknowledgements are
    /// not written yet.
    pub finished: Vec<Arc<Connection>>,
}

impl Changes {
    /// Deliveries and acknowledgements to record in the acknowledgement chain.
    pub fn progress(&self) -> Vec<Progress<'_>> {
        self.changed
            .iter()
            .chain(&self.finished)
            .filter_map(|c| c.progress())
            .collect()
    }
}

/// The terminals connected to this instance.
#[derive(Debug)]
pub(crate) struct Registry {
    next_conn: AtomicU64,
    local: Mutex<Local>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            next_conn: AtomicU64::new(1),
            local: Mutex::new(Local {
                live: HashMap::new(),
                removed: Vec::new(),
                finished: Vec::new(),
                // Nothing of this instance is in the database yet.
                full_resync: true,
            }),
        }
    }
}

impl Registry {
    /// Registers a connected terminal (`since`: the id it resumed from, if any).
    pub(crate) fn register(
        self: &Arc<Self>,
        tenant: &Arc<str>,
        key_id: &str,
        peer: SocketAddr,
        since: Option<i64>,
    ) -> Registration {
        let conn = Arc::new(Connection {
            id: self.next_conn.fetch_add(1, Ordering::Relaxed),
            tenant: Arc::clone(tenant),
            key_id: Arc::from(key_id),
            peer,
            connected_at: SystemTime::now(),
            since: since.unwrap_or(NONE),
            last_delivered: AtomicI64::new(NONE),
            last_acked: AtomicI64::new(NONE),
            dirty: AtomicBool::new(true),
            takes_orders: AtomicBool::new(true),
        });
        self.lock().live.insert(conn.id, Arc::clone(&conn));
        Registration {
            registry: Arc::clone(self),
            conn,
        }
    }

    /// Takes what must be written (everything when `force_full`, e.g. because this instance's
    /// rows disappeared); each change is handed out once.
    pub(crate) fn take_changes(&self, force_full: bool) -> Changes {
        let mut local = self.lock();
        let full = std::mem::take(&mut local.full_resync) || force_full;
        let removed = std::mem::take(&mut local.removed);
        let finished = std::mem::take(&mut local.finished);
        let changed = local
            .live
            .values()
            // swap first: a change made after this point marks it dirty again for next time.
            .filter(|c| c.dirty.swap(false, Ordering::AcqRel) || full)
            .cloned()
            .collect();
        Changes {
            full,
            removed,
            changed,
            finished,
        }
    }

    /// A flush that took `finished` failed: they wait for the next one (recording them twice
    /// is harmless, each order keeps its first times).
    pub(crate) fn keep_finished(&self, finished: Vec<Arc<Connection>>) {
        let mut local = self.lock();
        let room = MAX_FINISHED.saturating_sub(local.finished.len());
        local.finished.extend(finished.into_iter().take(room));
    }

    /// The database may no longer match memory: the next flush rewrites every row.
    pub(crate) fn need_full_resync(&self) {
        let mut local = self.lock();
        local.full_resync = true;
        local.removed = Vec::new();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn acks_move_forward_and_never_past_what_was_delivered() {
        let r = Arc::new(Registry::default());
        let tenant: Arc<str> = Arc::from("kitchen");
        let c = r.register(&tenant, "k1", peer(1), Some(5));
        assert!(c.acked(5), "the resume point may be acked");
        assert!(!c.acked(6), "nothing past 5 was delivered yet");
        c.delivered(9);
        assert!(c.acked(8));
        assert!(c.acked(3)); // a late ack is accepted but does not move backwards
        assert_eq!(c.last_acked(), Some(8));
        assert!(!c.acked(-1));
    }

    #[test]
    fn changes_are_collected_once_and_closures_remembered() {
        let r = Arc::new(Registry::default());
        let tenant: Arc<str> = Arc::from("kitchen");
        let a = r.register(&tenant, "k1", peer(1), None);
        let b = r.register(&tenant, "k2", peer(2), None);
        let first = r.take_changes(false);
        assert!(first.full, "the first flush rewrites everything");
        assert!(first.removed.is_empty());
        assert_eq!(first.changed.len(), 2);
        assert!(
            r.take_changes(false).changed.is_empty(),
            "nothing changed since"
        );
        a.delivered(1);
        let id_b = b.id;
        drop(b);
        let next = r.take_changes(false);
        assert!(!next.full);
        assert_eq!(next.removed, vec![id_b]);
        assert_eq!(next.changed.len(), 1);
        assert_eq!(r.lock().live.len(), 1);
    }
}
