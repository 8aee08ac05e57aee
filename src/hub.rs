//! Per-tenant fan-out: the listener hands each committed event to every socket of its tenant,
//! through one bounded queue per socket, so a slow POS never delays the listener or other POS.
//! The hub also keeps each tenant's most recent frames, so a POS that reconnects with `since`
//! (after a blip, or all 10k at once after a restart) is served from memory, not the database,
//! and watches that every socket with something to send keeps draining.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// One rendered event, shared by every socket that sends it (cloning is a reference count).
#[derive(Debug, Clone)]
pub struct Frame {
    /// The event's per-tenant id, used to stitch replay and live frames without gaps or repeats.
    pub id: i64,
    /// The JSON text.
    pub text: Utf8Bytes,
    /// When the event was written: resumes from memory honour the retention as the log does.
    pub emitted_at: SystemTime,
    /// A `resync_required` (`log_rewound`) after the log went backwards: the socket sends it
    /// although its id is not above the last one sent, and continues from that id.
    pub rewind: bool,
}

/// Why the hub (or the revocation check) ended a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KickReason {
    /// The socket's queue was full: close 1013, the POS resumes with `since`.
    SlowConsumer,
    /// The key was revoked: close 1008.
    KeyRevoked,
    /// It had something to send and completed no write for the drain timeout: close 1013.
    Stalled,
}

/// One socket's queue and its "stop now" signal, shared by the hub (producer) and the socket
/// task (consumer).
///
/// Deliberately not a tokio mpsc channel: that allocates its first block (32 slots, ~1.3 KB)
/// up front, for every one of 10k mostly idle terminals. An empty `VecDeque` allocates nothing.
#[derive(Debug, Default)]
struct Mailbox {
    queue: Mutex<Queue>,
    /// Woken when a frame is queued (`notify_one` keeps a permit if the task is not waiting).
    frames: Notify,
    /// Woken once, when the socket is kicked (every waiter: the task may wait in two places).
    kick: Notify,
    /// 0 = not kicked, else a [`KickReason`] code.
    kicked: AtomicU8,
    /// Writes the socket task completed (wrapping): the progress the drain watch looks for.
    writes: AtomicU32,
    /// True while the socket task is writing to its socket.
    writing: AtomicBool,
}

#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Frame>,
    bytes: usize,
}

impl Mailbox {
    /// Queues a frame unless that would exceed either bound; false means "too slow".
    ///
    /// An empty queue takes any frame, whatever the bounds: frames are at most
    /// `event::MAX_FRAME_BYTES` (plus nothing: the envelope is included), and a byte bound
    /// smaller than one frame would cut every socket of the tenant on that frame, and again on
    /// every resume (a disconnect loop). So a queue holds at most
    /// `max(max_bytes, one maximal frame)`; the frame's bytes are shared with every other
    /// socket's queue, not copied.
    fn push(&self, frame: &Frame, max_bytes: usize, max_frames: usize) -> bool {
        let mut q = lock(&self.queue);
        let fits = q.frames.is_empty()
            || (q.frames.len() < max_frames && q.bytes + frame.text.len() <= max_bytes);
        if !fits {
            return false;
        }
        q.bytes += frame.text.len();
        q.frames.push_back(frame.clone());
        drop(q);
        self.frames.notify_one();
        true
    }

    fn pop(&self) -> Option<Frame> {
        let mut q = lock(&self.queue);
        let frame = q.frames.pop_front()?;
        q.bytes -= frame.text.len();
        if q.frames.is_empty() {
            // Give back the memory a burst grew the queue to: idle sockets hold nothing.
            q.frames = VecDeque::new();
        }
        Some(frame)
    }

    fn fire(&self, reason: KickReason) {
        let code = match reason {
            KickReason::SlowConsumer => 1,
            KickReason::KeyRevoked => 2,
            KickReason::Stalled => 3,
        };
        if self
            .kicked
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.kick.notify_waiters();
        }
    }

    fn reason(&self) -> Option<KickReason> {
        match self.kicked.load(Ordering::Acquire) {
            0 => None,
            1 => Some(KickReason::SlowConsumer),
            2 => Some(KickReason::KeyRevoked),
            _ => Some(KickReason::Stalled),
        }
    }

    /// True when the socket has something to send: a frame queued or a write in progress.
    fn has_work(&self) -> bool {
        self.writing.load(Ordering::Acquire) || !lock(&self.queue).frames.is_empty()
    }
}

#[derive(Debug)]
struct Client {
    mailbox: Arc<Mailbox>,
    key_id: Arc<str>,
    drain: DrainWatch,
}

/// What the drain watch remembers of one socket between its looks (owned by the hub, under
/// the tenant's lock; the socket task only bumps atomics).
#[derive(Debug, Default)]
struct DrainWatch {
    /// The socket's write count at the last look.
    seen_writes: u32,
    /// Since when it has had work and made no progress, as first seen by a look.
    stalled_since: Option<Instant>,
}

impl DrainWatch {
    /// Looks at the socket at `now`; true when it has had something to send and completed no
    /// write for at least `timeout`.
    fn stalled(&mut self, mailbox: &Mailbox, now: Instant, timeout: Duration) -> bool {
        let writes = mailbox.writes.load(Ordering::Acquire);
        if writes != self.seen_writes || !mailbox.has_work() {
            self.seen_writes = writes;
            self.stalled_since = None;
            return false;
        }
        let since = *self.stalled_since.get_or_insert(now);
        now.saturating_duration_since(since) >= timeout
    }
}

/// How often the drain watch looks at every socket ([`watch_drains`]): the drain timeout is
/// enforced to within two of these, for a few microseconds of locking per thousand sockets.
pub const DRAIN_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Recent frames kept per tenant for resuming from memory. 64 frames is minutes of a busy
/// kitchen's traffic, which covers a reconnect after a network blip or a restart.
pub const RECENT_FRAMES: usize = 64;
/// Byte cap of one tenant's recent frames: with orders of ~1 KB the frame cap binds first; a
/// burst of very large events shortens the history instead of growing memory, and a frame
/// larger than the cap is not kept at all (resumes across it read the log). Worst case the hub
/// holds `tenants × 64 KiB`.
pub const RECENT_BYTES: usize = 64 * 1024;

#[derive(Debug, Default)]
struct Tenant {
    clients: HashMap<u64, Client>,
    /// Contiguous ids ending at `last_id` (possibly empty).
    recent: VecDeque<Frame>,
    recent_bytes: usize,
    /// The last id published (or the listener's starting point); `None` until known.
    last_id: Option<i64>,
}

impl Tenant {
    fn remember(&mut self, frame: &Frame) {
        if self.last_id.is_some_and(|last| frame.id != last + 1) {
            // A jump (pruned rows, a restored database): history is no longer contiguous.
            self.recent.clear();
            self.recent_bytes = 0;
        }
        self.last_id = Some(frame.id);
        self.recent_bytes += frame.text.len();
        self.recent.push_back(frame.clone());
        while self.recent.len() > RECENT_FRAMES || self.recent_bytes > RECENT_BYTES {
            match self.recent.pop_front() {
                Some(old) => self.recent_bytes -= old.text.len(),
                None => break,
            }
        }
    }

    /// `retained_since`: events written before it count as pruned, as in the event log.
    fn replay_after(&self, since: Option<i64>, retained_since: Option<SystemTime>) -> Replay {
        let Some(since) = since else {
            return Replay::Frames(Vec::new());
        };
        match self.last_id {
            Some(last) if since == last => Replay::Frames(Vec::new()),
            Some(last) if since < last => match self.recent.front() {
                Some(first) if first.id <= since + 1 => {
                    let frames: Vec<Frame> = self
                        .recent
                        .iter()
                        .filter(|f| f.id > since)
                        .cloned()
                        .collect();
                    // Past the retention the log would answer resync_required: let it.
                    let expired = frames
                        .first()
                        .zip(retained_since)
                        .is_some_and(|(f, cutoff)| f.emitted_at < cutoff);
                    if expired {
                        Replay::Database
                    } else {
                        Replay::Frames(frames)
                    }
                }
                _ => Replay::Database,
            },
            // Ahead of what this instance has published (or unknown): the database decides
            // whether the listener is behind or the client is ahead of the log.
            _ => Replay::Database,
        }
    }
}

/// How a new socket catches up to `since`.
#[derive(Debug)]
pub enum Replay {
    /// These frames (possibly none), in order, bring it up to date; live frames follow.
    Frames(Vec<Frame>),
    /// Memory does not reach back far enough: replay from the event log.
    Database,
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
    retention: Duration,
    metrics: Arc<Metrics>,
}

/// A socket's end of its queue. Dropping it unregisters the socket.
#[derive(Debug)]
pub struct Subscription {
    mailbox: Arc<Mailbox>,
    hub: Arc<Hub>,
    tenant: Arc<str>,
    client: u64,
}

impl Subscription {
    /// The next queued frame, waiting for one if need be. Cancel-safe: a frame is only taken
    /// from the queue when it is returned.
    pub async fn recv(&self) -> Frame {
        loop {
            if let Some(frame) = self.mailbox.pop() {
                return frame;
            }
            self.mailbox.frames.notified().await;
        }
    }

    /// Resolves when the hub ends this subscription; then [`Subscription::kick_reason`] says why.
    pub async fn kicked(&self) {
        loop {
            // Register before checking, so a kick between the check and the await still wakes.
            let notified = self.mailbox.kick.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.mailbox.reason().is_some() {
                return;
            }
            notified.await;
        }
    }

    /// Why the subscription was ended, if it was.
    pub fn kick_reason(&self) -> Option<KickReason> {
        self.mailbox.reason()
    }

    /// The socket task starts writing to its socket: until [`Subscription::write_done`], the
    /// drain watch expects it to finish within the drain timeout.
    pub fn write_started(&self) {
        self.mailbox.writing.store(true, Ordering::Release);
    }

    /// The socket task finished a write: progress.
    pub fn write_done(&self) {
        self.mailbox.writes.fetch_add(1, Ordering::AcqRel);
        self.mailbox.writing.store(false, Ordering::Release);
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.remove(&self.tenant, self.client);
    }
}

impl Hub {
    /// A hub whose sockets may each queue `queue_bytes` / `queue_frames` before being dropped,
    /// and whose resume history honours `retention`.
    pub fn new(
        queue_bytes: usize,
        queue_frames: usize,
        retention: Duration,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            tenants: Mutex::default(),
            next_client: AtomicU64::new(1),
            queue_bytes,
            queue_frames: queue_frames.max(1),
            retention,
            metrics,
        })
    }

    /// Registers a socket for a tenant's live events, and says how it catches up from `since`:
    /// both are decided under the tenant's lock, so no frame falls between the replay and the
    /// queue. Events published after this returns are queued for the socket.
    pub fn subscribe(
        self: &Arc<Self>,
        tenant: &Arc<str>,
        key_id: &str,
        since: Option<i64>,
    ) -> (Subscription, Replay) {
        self.subscribe_after(tenant, key_id, since, None)
    }

    /// [`Hub::subscribe`] for a tenant that exists since `tenant_since`: frames written before
    /// it (by an earlier tenant under the same slug) are never served from memory.
    pub fn subscribe_after(
        self: &Arc<Self>,
        tenant: &Arc<str>,
        key_id: &str,
        since: Option<i64>,
        tenant_since: Option<SystemTime>,
    ) -> (Subscription, Replay) {
        let mailbox = Arc::new(Mailbox::default());
        let client = self.next_client.fetch_add(1, Ordering::Relaxed);
        let entry = Client {
            mailbox: Arc::clone(&mailbox),
            key_id: Arc::from(key_id),
            drain: DrainWatch::default(),
        };
        let replay = {
            let mut map = lock(&self.tenants);
            let mut t = lock(map.entry(Arc::clone(tenant)).or_default());
            t.clients.insert(client, entry);
            let retained = SystemTime::now().checked_sub(self.retention);
            t.replay_after(since, retained.max(tenant_since))
        };
        let sub = Subscription {
            mailbox,
            hub: Arc::clone(self),
            tenant: Arc::clone(tenant),
            client,
        };
        (sub, replay)
    }

    /// Sets a tenant's starting point and recent history (frames contiguous, ending at
    /// `last_id`), e.g. at start-up or after the event counter went backwards.
    pub fn reset(&self, tenant: &str, last_id: i64, recent: Vec<Frame>) {
        let state = Arc::clone(lock(&self.tenants).entry(Arc::from(tenant)).or_default());
        let mut t = lock(&state);
        t.recent.clear();
        t.recent_bytes = 0;
        t.last_id = None;
        for f in recent.iter().filter(|f| f.id <= last_id) {
            t.remember(f);
        }
        if t.last_id != Some(last_id) {
            t.recent.clear();
            t.recent_bytes = 0;
            t.last_id = Some(last_id);
        }
    }

    /// The log went backwards to `to_id` for this tenant (a restore, or the tenant created again
    /// under its slug): forget its recent frames and tell every socket of it to resync from
    /// `to_id`, the lower id it adopts.
    pub fn rewind(&self, tenant: &str, to_id: i64) {
        let state = Arc::clone(lock(&self.tenants).entry(Arc::from(tenant)).or_default());
        let mut t = lock(&state);
        let previous = t.last_id.unwrap_or(to_id);
        t.recent.clear();
        t.recent_bytes = 0;
        t.last_id = Some(to_id);
        if previous <= to_id {
            // Nothing was published beyond it: no socket can be ahead.
            return;
        }
        let frame = Frame {
            id: to_id,
            text: Utf8Bytes::from(crate::event::resync_required(
                tenant,
                crate::event::ResyncReason::LogRewound,
                previous,
                to_id,
            )),
            emitted_at: SystemTime::now(),
            rewind: true,
        };
        t.clients.retain(|_, c| {
            if c.mailbox.push(&frame, self.queue_bytes, self.queue_frames) {
                true
            } else {
                c.mailbox.fire(KickReason::SlowConsumer);
                false
            }
        });
    }

    fn remove(&self, tenant: &str, client: u64) {
        // The tenant's entry stays (it holds the recent history); entries are bounded by the
        // number of tenants.
        let state = lock(&self.tenants).get(tenant).cloned();
        if let Some(state) = state {
            lock(&state).clients.remove(&client);
        }
    }

    /// Queues a frame for every socket of the tenant and remembers it for resumes. A socket
    /// whose queue would exceed its bounds is kicked as a slow consumer instead of being waited
    /// for.
    pub fn publish(&self, tenant: &str, frame: &Frame) -> Delivery {
        let state = {
            let mut map = lock(&self.tenants);
            match map.get(tenant) {
                Some(s) => Arc::clone(s),
                None => Arc::clone(map.entry(Arc::from(tenant)).or_default()),
            }
        };
        let mut delivery = Delivery::default();
        let mut t = lock(&state);
        t.remember(frame);
        t.clients.retain(|_, c| {
            if c.mailbox.reason().is_some() {
                return false;
            }
            if c.mailbox.push(frame, self.queue_bytes, self.queue_frames) {
                delivery.sent += 1;
                true
            } else {
                c.mailbox.fire(KickReason::SlowConsumer);
                delivery.failed += 1;
                false
            }
        });
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

    /// Kicks, with [`KickReason::KeyRevoked`], every socket whose key is in `tenant_of` and whose
    /// tenant is not the one that key may read now (`None`: revoked or deleted, so all of its
    /// sockets). One pass over all sockets, whatever the number of keys. Returns how many.
    pub fn kick_keys_off_tenant(&self, tenant_of: &HashMap<&str, Option<&str>>) -> usize {
        if tenant_of.is_empty() {
            return 0;
        }
        let map = lock(&self.tenants);
        let mut n = 0;
        for (tenant, t) in map.iter() {
            let mut t = lock(t);
            t.clients.retain(|_, c| match tenant_of.get(&*c.key_id) {
                Some(allowed) if *allowed != Some(&**tenant) => {
                    c.mailbox.fire(KickReason::KeyRevoked);
                    n += 1;
                    false
                }
                _ => true,
            });
        }
        n
    }

    /// Kicks every socket that has had something to send (a queued frame or a write in
    /// progress) and completed no write for `timeout`, as seen by successive calls (one per
    /// [`DRAIN_CHECK_INTERVAL`]); returns how many. A peer that stopped reading with a large
    /// frame pending is cut this way even though its queue never overflows.
    pub fn check_drains(&self, now: Instant, timeout: Duration) -> usize {
        // Not holding the map lock while looking: subscribing and publishing go on meanwhile.
        let tenants: Vec<Arc<Mutex<Tenant>>> = lock(&self.tenants).values().cloned().collect();
        let mut kicked = 0;
        for t in tenants {
            lock(&t).clients.retain(|_, c| {
                if c.mailbox.reason().is_some() {
                    return false;
                }
                if c.drain.stalled(&c.mailbox, now, timeout) {
                    c.mailbox.fire(KickReason::Stalled);
                    kicked += 1;
                    return false;
                }
                true
            });
        }
        self.metrics
            .drain_timeouts
            .fetch_add(kicked as u64, Ordering::Relaxed);
        kicked
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

/// Runs [`Hub::check_drains`] every [`DRAIN_CHECK_INTERVAL`] (or a quarter of a shortened
/// `timeout`) until `shutdown`.
pub async fn watch_drains(hub: Arc<Hub>, timeout: Duration, shutdown: CancellationToken) {
    let every = DRAIN_CHECK_INTERVAL
        .min(timeout / 4)
        .max(Duration::from_millis(10));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let kicked = hub.check_drains(Instant::now(), timeout);
        if kicked > 0 {
            tracing::info!(
                kicked,
                "closing sockets that drained nothing for {timeout:?} (close 1013)"
            );
        }
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

    const DAY: Duration = Duration::from_secs(86_400);

    fn frame(id: i64, text: &str) -> Frame {
        Frame {
            emitted_at: SystemTime::now(),
            id,
            text: Utf8Bytes::from(text.to_owned()),
            rewind: false,
        }
    }

    fn ids(r: Replay) -> Option<Vec<i64>> {
        match r {
            Replay::Frames(f) => Some(f.iter().map(|f| f.id).collect()),
            Replay::Database => None,
        }
    }

    #[tokio::test]
    async fn a_full_queue_kicks_only_that_socket() {
        let hub = Hub::new(10, 100, DAY, Arc::default());
        let tenant: Arc<str> = Arc::from("kitchen");
        let (fast, _) = hub.subscribe(&tenant, "k1", None);
        let (slow, _) = hub.subscribe(&tenant, "k2", None);
        assert_eq!(
            hub.publish("kitchen", &frame(1, "12345")),
            Delivery { sent: 2, failed: 0 }
        );
        assert_eq!(fast.recv().await.id, 1);
        // `slow` still holds 5 bytes; 6 more exceed its 10-byte budget, `fast` has room.
        assert_eq!(
            hub.publish("kitchen", &frame(2, "123456")),
            Delivery { sent: 1, failed: 1 }
        );
        assert_eq!(slow.kick_reason(), Some(KickReason::SlowConsumer));
        assert_eq!(fast.recv().await.id, 2);
        assert_eq!(hub.tenant_connections("kitchen"), 1);
    }

    #[tokio::test]
    async fn dropping_a_subscription_unregisters_it() {
        let hub = Hub::new(1024, 16, DAY, Arc::default());
        let tenant: Arc<str> = Arc::from("kitchen");
        let (sub, _) = hub.subscribe(&tenant, "k1", None);
        assert_eq!(hub.connected_key_ids(), vec!["k1".to_string()]);
        drop(sub);
        assert_eq!(hub.tenant_connections("kitchen"), 0);
        assert!(hub.connected_key_ids().is_empty());
        assert_eq!(hub.publish("kitchen", &frame(1, "x")), Delivery::default());
    }

    #[tokio::test]
    async fn revoked_and_moved_keys_are_kicked_off_the_tenants_they_left() {
        let hub = Hub::new(1024, 16, DAY, Arc::default());
        let kitchen: Arc<str> = Arc::from("kitchen");
        let bistro: Arc<str> = Arc::from("bistro");
        let (revoked, _) = hub.subscribe(&kitchen, "k1", None);
        let (untouched, _) = hub.subscribe(&kitchen, "k2", None);
        let (moved_away, _) = hub.subscribe(&kitchen, "k3", None);
        let (moved_here, _) = hub.subscribe(&bistro, "k3", None);
        let states = HashMap::from([("k1", None), ("k3", Some("bistro"))]);
        assert_eq!(hub.kick_keys_off_tenant(&states), 2);
        assert_eq!(revoked.kick_reason(), Some(KickReason::KeyRevoked));
        assert_eq!(moved_away.kick_reason(), Some(KickReason::KeyRevoked));
        assert_eq!(untouched.kick_reason(), None);
        assert_eq!(moved_here.kick_reason(), None);
        assert_eq!(
            hub.connected_key_ids(),
            vec!["k2".to_string(), "k3".to_string()]
        );
    }

    #[test]
    fn resumes_come_from_memory_while_history_reaches_back() {
        let hub = Hub::new(1 << 20, 1024, DAY, Arc::default());
        let tenant: Arc<str> = Arc::from("kitchen");
        hub.reset("kitchen", 10, vec![frame(9, "a"), frame(10, "b")]);
        for id in 11..=12 {
            hub.publish("kitchen", &frame(id, "c"));
        }
        assert_eq!(ids(hub.subscribe(&tenant, "k", Some(12)).1), Some(vec![]));
        assert_eq!(
            ids(hub.subscribe(&tenant, "k", Some(10)).1),
            Some(vec![11, 12])
        );
        assert_eq!(
            ids(hub.subscribe(&tenant, "k", Some(8)).1),
            Some(vec![9, 10, 11, 12])
        );
        assert_eq!(
            ids(hub.subscribe(&tenant, "k", Some(7)).1),
            None,
            "id 8 is not in memory"
        );
        assert_eq!(
            ids(hub.subscribe(&tenant, "k", Some(13)).1),
            None,
            "ahead: ask the database"
        );
        assert_eq!(ids(hub.subscribe(&tenant, "k", None).1), Some(vec![]));
        // A jump in ids drops the history rather than serving a hole.
        hub.publish("kitchen", &frame(20, "d"));
        assert_eq!(ids(hub.subscribe(&tenant, "k", Some(12)).1), None);
        assert_eq!(ids(hub.subscribe(&tenant, "k", Some(19)).1), Some(vec![20]));
    }

    #[test]
    fn memory_never_serves_what_retention_has_expired() {
        let hub = Hub::new(1 << 20, 1024, Duration::from_secs(60), Arc::default());
        let tenant: Arc<str> = Arc::from("kitchen");
        let old = Frame {
            emitted_at: SystemTime::now() - Duration::from_secs(120),
            ..frame(1, "a")
        };
        hub.reset("kitchen", 2, vec![old, frame(2, "b")]);
        assert_eq!(
            ids(hub.subscribe(&tenant, "k", Some(0)).1),
            None,
            "id 1 is past retention"
        );
        assert_eq!(ids(hub.subscribe(&tenant, "k", Some(1)).1), Some(vec![2]));
    }

    #[test]
    fn history_is_bounded() {
        let hub = Hub::new(1 << 20, 1024, DAY, Arc::default());
        let tenant: Arc<str> = Arc::from("kitchen");
        hub.reset("kitchen", 0, vec![]);
        let last = (RECENT_FRAMES + 10) as i64;
        for id in 1..=last {
            hub.publish("kitchen", &frame(id, "x"));
        }
        let first_kept = last - RECENT_FRAMES as i64 + 1;
        assert_eq!(
            ids(hub.subscribe(&tenant, "k", Some(first_kept - 2)).1),
            None
        );
        assert_eq!(
            ids(hub.subscribe(&tenant, "k", Some(first_kept - 1)).1).map(|v| v.len()),
            Some(RECENT_FRAMES)
        );
        let big = "y".repeat(RECENT_BYTES + 1);
        hub.publish("kitchen", &frame(last + 1, &big));
        assert_eq!(
            ids(hub.subscribe(&tenant, "k", Some(last)).1),
            None,
            "too big to keep"
        );
    }

    #[tokio::test]
    async fn an_empty_queue_takes_a_maximal_frame_and_a_full_one_does_not() {
        let hub = Hub::new(
            crate::config::CLIENT_QUEUE_BYTES,
            crate::config::CLIENT_QUEUE_FRAMES,
            DAY,
            Arc::default(),
        );
        let tenant: Arc<str> = Arc::from("kitchen");
        let (sub, _) = hub.subscribe(&tenant, "k1", None);
        // Larger than the queue's byte bound on its own: still taken, the queue being empty.
        let big = "b".repeat(crate::event::MAX_FRAME_BYTES + 100);
        assert_eq!(
            hub.publish("kitchen", &frame(1, &big)),
            Delivery { sent: 1, failed: 0 }
        );
        assert_eq!(sub.recv().await.text.len(), big.len());
        assert_eq!(hub.publish("kitchen", &frame(2, &big)).sent, 1);
        // Behind a queued maximal frame, even a small one is over the bound: too slow.
        assert_eq!(hub.publish("kitchen", &frame(3, "x")).failed, 1);
        assert_eq!(sub.kick_reason(), Some(KickReason::SlowConsumer));
    }

    #[test]
    fn a_socket_with_work_and_no_progress_is_kicked_after_the_drain_timeout() {
        let hub = Hub::new(1 << 20, 1024, DAY, Arc::default());
        let tenant: Arc<str> = Arc::from("kitchen");
        let timeout = Duration::from_secs(30);
        let (idle, _) = hub.subscribe(&tenant, "idle", None);
        let (stuck_queue, _) = hub.subscribe(&tenant, "queue", None);
        let (stuck_write, _) = hub.subscribe(&tenant, "write", None);
        let (busy, _) = hub.subscribe(&tenant, "busy", None);
        let t0 = Instant::now();
        assert_eq!(hub.check_drains(t0, timeout), 0);
        // Every socket but `idle` gets a frame; `stuck_write` takes it and never finishes
        // writing it; `busy` writes one frame per look; `stuck_queue` never takes it.
        hub.publish("kitchen", &frame(1, "x"));
        drop(idle.mailbox.pop());
        drop(stuck_write.mailbox.pop());
        stuck_write.write_started();
        busy.write_started();
        for step in 1..=31 {
            busy.write_done();
            busy.write_started();
            let now = t0 + Duration::from_secs(step);
            let kicked = hub.check_drains(now, timeout);
            // First seen stalled at step 1: kicked when 30 s have passed since.
            assert_eq!(kicked, if step == 31 { 2 } else { 0 }, "at {step} s");
        }
        assert_eq!(stuck_queue.kick_reason(), Some(KickReason::Stalled));
        assert_eq!(stuck_write.kick_reason(), Some(KickReason::Stalled));
        assert_eq!(busy.kick_reason(), None);
        assert_eq!(idle.kick_reason(), None);
        assert_eq!(hub.tenant_connections("kitchen"), 2);
        assert_eq!(hub.metrics().drain_timeouts.load(Ordering::Relaxed), 2);
        // Progress resets the clock: a socket that finished its write is not stalled.
        busy.write_done();
        assert_eq!(hub.check_drains(t0 + Duration::from_secs(120), timeout), 0);
    }

    #[test]
    fn history_stays_bounded_with_maximal_frames() {
        let hub = Hub::new(1 << 20, 1024, DAY, Arc::default());
        let tenant: Arc<str> = Arc::from("kitchen");
        hub.reset("kitchen", 0, vec![]);
        let big = "b".repeat(crate::event::MAX_FRAME_BYTES);
        for id in 1..=3 {
            hub.publish("kitchen", &frame(id, &big));
        }
        {
            let map = lock(&hub.tenants);
            let t = lock(&map["kitchen"]);
            assert!(t.recent.is_empty(), "a frame over RECENT_BYTES is not kept");
            assert_eq!((t.recent_bytes, t.last_id), (0, Some(3)));
        }
        assert_eq!(ids(hub.subscribe(&tenant, "k", Some(2)).1), None, "the log");
        // Small frames after it are kept again, and served.
        hub.publish("kitchen", &frame(4, "x"));
        assert_eq!(ids(hub.subscribe(&tenant, "k", Some(3)).1), Some(vec![4]));
        assert_eq!(ids(hub.subscribe(&tenant, "k", Some(2)).1), None);
    }
}
