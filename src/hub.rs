//! Per-tenant fan-out: the listener hands each committed event to every socket of its tenant,
//! through one bounded queue per socket, so a slow POS never delays the listener or other POS.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// One rendered event, shared by every socket that sends it (cloning is a reference count).
#[derive(Debug, Clone)]
pub struct Frame {
    /// The event's per-tenant id, used to stitch replay and live frames without gaps or repeats.
    pub id: i64,
    /// The JSON text.
    pub text: Utf8Bytes,
}

/// Why the hub (or the revocation check) ended a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KickReason {
    /// The socket's queue was full: close 1013, the POS resumes with `since`.
    SlowConsumer,
    /// The key was revoked: close 1008.
    KeyRevoked,
}

/// A one-shot "stop now" signal for one socket, with the reason.
#[derive(Debug, Default)]
struct Kick {
    token: CancellationToken,
    reason: OnceLock<KickReason>,
}

impl Kick {
    fn fire(&self, reason: KickReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }
}

#[derive(Debug)]
struct Client {
    tx: mpsc::Sender<Frame>,
    queued_bytes: Arc<AtomicUsize>,
    kick: Arc<Kick>,
    key_id: Arc<str>,
}

#[derive(Debug, Default)]
struct Tenant {
    clients: HashMap<u64, Client>,
}

/// What one `publish` did, for the seed's log line and the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Sockets that had the frames queued.
    pub sent: usize,
    /// Sockets disconnected because their queue was full.
    pub failed: usize,
}

/// The registry of connected sockets, per tenant.
///
/// Locking: one mutex for the tenant map, one per tenant for its sockets; always map first, then
/// tenant. Publishing holds only the tenant's lock while it queues frames (no I/O, no await), so
/// tenants never wait on one another and a socket task never holds a lock across a send.
#[derive(Debug)]
pub struct Hub {
    tenants: Mutex<HashMap<Arc<str>, Arc<Mutex<Tenant>>>>,
    next_client: AtomicU64,
    queue_bytes: usize,
    queue_frames: usize,
    metrics: Arc<Metrics>,
}

/// A socket's end of its queue. Dropping it unregisters the socket.
#[derive(Debug)]
pub struct Subscription {
    rx: mpsc::Receiver<Frame>,
    queued_bytes: Arc<AtomicUsize>,
    kick: Arc<Kick>,
    hub: Arc<Hub>,
    tenant: Arc<str>,
    client: u64,
}

impl Subscription {
    /// The next queued frame; `None` once the hub has dropped this socket.
    pub async fn recv(&mut self) -> Option<Frame> {
        let frame = self.rx.recv().await?;
        self.queued_bytes
            .fetch_sub(frame.text.len(), Ordering::Relaxed);
        Some(frame)
    }

    /// Resolves when the hub ends this subscription; then [`Subscription::kick_reason`] says why.
    pub async fn kicked(&self) {
        self.kick.token.cancelled().await;
    }

    /// A handle that is cancelled when the hub ends this subscription (usable while the
    /// subscription itself is borrowed for `recv`).
    pub fn kick_signal(&self) -> CancellationToken {
        self.kick.token.clone()
    }

    /// Why the subscription was ended, if it was.
    pub fn kick_reason(&self) -> Option<KickReason> {
        self.kick.reason.get().copied()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.remove(&self.tenant, self.client);
    }
}

impl Hub {
    /// A hub whose sockets may each queue `queue_bytes` / `queue_frames` before being dropped.
    pub fn new(queue_bytes: usize, queue_frames: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            tenants: Mutex::default(),
            next_client: AtomicU64::new(1),
            queue_bytes,
            queue_frames: queue_frames.max(1),
            metrics,
        })
    }

    /// Registers a socket for a tenant's live events. Events published after this returns are
    /// queued for it; the caller replays older ones from the database.
    pub fn subscribe(self: &Arc<Self>, tenant: &Arc<str>, key_id: &str) -> Subscription {
        let (tx, rx) = mpsc::channel(self.queue_frames);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let kick = Arc::new(Kick::default());
        let client = self.next_client.fetch_add(1, Ordering::Relaxed);
        let entry = Client {
            tx,
            queued_bytes: Arc::clone(&queued_bytes),
            kick: Arc::clone(&kick),
            key_id: Arc::from(key_id),
        };
        {
            let mut map = lock(&self.tenants);
            let tenant_state = map.entry(Arc::clone(tenant)).or_default();
            lock(tenant_state).clients.insert(client, entry);
        }
        Subscription {
            rx,
            queued_bytes,
            kick,
            hub: Arc::clone(self),
            tenant: Arc::clone(tenant),
            client,
        }
    }

    fn remove(&self, tenant: &str, client: u64) {
        let mut map = lock(&self.tenants);
        if let Some(t) = map.get(tenant) {
            let now_empty = {
                let mut t = lock(t);
                t.clients.remove(&client);
                t.clients.is_empty()
            };
            if now_empty {
                map.remove(tenant);
            }
        }
    }

    /// Queues a frame for every socket of the tenant. A socket whose queue would exceed its
    /// bounds is kicked as a slow consumer instead of being waited for.
    pub fn publish(&self, tenant: &str, frame: &Frame) -> Delivery {
        let Some(state) = lock(&self.tenants).get(tenant).cloned() else {
            return Delivery::default();
        };
        let len = frame.text.len();
        let mut delivery = Delivery::default();
        let mut t = lock(&state);
        t.clients.retain(|_, c| {
            if c.kick.token.is_cancelled() {
                return false;
            }
            let fits = c.queued_bytes.fetch_add(len, Ordering::Relaxed) + len <= self.queue_bytes;
            let sent = fits
                && match c.tx.try_send(frame.clone()) {
                    Ok(()) => true,
                    // The socket task is gone; its Subscription drop removes it anyway.
                    Err(mpsc::error::TrySendError::Closed(_)) => return false,
                    Err(mpsc::error::TrySendError::Full(_)) => false,
                };
            if sent {
                delivery.sent += 1;
            } else {
                c.kick.fire(KickReason::SlowConsumer);
                delivery.failed += 1;
            }
            sent
        });
        let empty = t.clients.is_empty();
        drop(t);
        if empty {
            // Lock order map → tenant; re-check under both, a socket may have joined meanwhile.
            let mut map = lock(&self.tenants);
            if map.get(tenant).is_some_and(|s| lock(s).clients.is_empty()) {
                map.remove(tenant);
            }
        }
        delivery
    }

    /// Ids of the keys behind the connected sockets (deduplicated).
    pub fn connected_key_ids(&self) -> Vec<String> {
        let map = lock(&self.tenants);
        let mut ids: Vec<String> = map
            .values()
            .flat_map(|t| {
                lock(t)
                    .clients
                    .values()
                    .map(|c| c.key_id.to_string())
                    .collect::<Vec<_>>()
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Ends every socket authenticated with one of these keys; returns how many.
    pub fn kick_keys(&self, key_ids: &[String], reason: KickReason) -> usize {
        let map = lock(&self.tenants);
        let mut n = 0;
        for t in map.values() {
            let mut t = lock(t);
            t.clients.retain(|_, c| {
                if key_ids.iter().any(|k| **k == *c.key_id) {
                    c.kick.fire(reason);
                    n += 1;
                    false
                } else {
                    true
                }
            });
        }
        n
    }

    /// Sockets of one tenant on this instance.
    pub fn tenant_connections(&self, tenant: &str) -> usize {
        lock(&self.tenants)
            .get(tenant)
            .map_or(0, |t| lock(t).clients.len())
    }

    /// The metrics this hub reports to.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// Locks a mutex, recovering from poisoning: the guarded maps stay consistent across a panic
/// because every mutation is a single insert/remove.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(id: i64, text: &str) -> Frame {
        Frame {
            id,
            text: Utf8Bytes::from(text.to_owned()),
        }
    }

    #[tokio::test]
    async fn a_full_queue_kicks_only_that_socket() {
        let hub = Hub::new(10, 100, Arc::default());
        let tenant: Arc<str> = Arc::from("kitchen");
        let mut fast = hub.subscribe(&tenant, "k1");
        let slow = hub.subscribe(&tenant, "k2");
        assert_eq!(
            hub.publish("kitchen", &frame(1, "12345")),
            Delivery { sent: 2, failed: 0 }
        );
        assert_eq!(fast.recv().await.unwrap().id, 1);
        // `slow` still holds 5 bytes; 6 more exceed its 10-byte budget, `fast` has room.
        assert_eq!(
            hub.publish("kitchen", &frame(2, "123456")),
            Delivery { sent: 1, failed: 1 }
        );
        assert_eq!(slow.kick_reason(), Some(KickReason::SlowConsumer));
        assert_eq!(fast.recv().await.unwrap().id, 2);
        assert_eq!(hub.tenant_connections("kitchen"), 1);
    }

    #[tokio::test]
    async fn dropping_the_last_subscription_forgets_the_tenant() {
        let hub = Hub::new(1024, 16, Arc::default());
        let tenant: Arc<str> = Arc::from("kitchen");
        let sub = hub.subscribe(&tenant, "k1");
        assert_eq!(hub.connected_key_ids(), vec!["k1".to_string()]);
        drop(sub);
        assert_eq!(hub.tenant_connections("kitchen"), 0);
        assert!(lock(&hub.tenants).is_empty());
        assert_eq!(hub.publish("kitchen", &frame(1, "x")), Delivery::default());
    }

    #[tokio::test]
    async fn revoked_keys_are_kicked() {
        let hub = Hub::new(1024, 16, Arc::default());
        let tenant: Arc<str> = Arc::from("kitchen");
        let a = hub.subscribe(&tenant, "k1");
        let b = hub.subscribe(&tenant, "k2");
        assert_eq!(hub.kick_keys(&["k1".into()], KickReason::KeyRevoked), 1);
        assert_eq!(a.kick_reason(), Some(KickReason::KeyRevoked));
        assert_eq!(b.kick_reason(), None);
    }
}
