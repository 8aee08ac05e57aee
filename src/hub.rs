//! Per-tenant fan-out: the listener hands each committed event to every socket of its tenant.
//! Each event is encoded once; the fan-out offers the frame to every connection, which writes
//! it straight into its socket when the socket has room (no task woken, nothing queued), and
//! otherwise queues it, bounded, for the socket's own task — so a slow POS never delays the
//! listener or other POS. A tenant with many sockets is fanned out in chunks over the runtime's
//! workers. The hub also keeps each tenant's most recent frames, so a POS that reconnects with
//! `since` (after a blip, or all 10k at once after a restart) is served from memory, and watches
//! that every socket with something to send keeps draining.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::periodic::Periodic;
/// Most frames [`Hub::publish_run`] takes at once.
pub(crate) use crate::socket::MAX_RUN_FRAMES;
use crate::socket::{Conn, Kick, Offered, QueueBounds, Run, wire};

/// One rendered event, its WebSocket frame encoded once and shared by every socket that sends
/// it (cloning is a reference count).
#[derive(Debug, Clone)]
pub struct Frame {
    /// The event's per-tenant id, used to stitch replay and live frames without gaps or repeats.
    pub id: i64,
    /// The event's type, for sockets that asked for some types only.
    pub kind: Arc<str>,
    /// The complete WebSocket text frame (header and JSON): server frames are unmasked, so these
    /// bytes are what every socket receives.
    pub wire: Bytes,
    /// When the event was written: resumes from memory honour the retention as the log does.
    pub emitted_at: SystemTime,
    /// A `resync_required` (`log_rewound`) after the log went backwards: the socket sends it
    /// although its id is not above the last one sent, and continues from that id.
    pub rewind: bool,
}

impl Frame {
    /// The frame of an event's JSON text.
    pub fn event(id: i64, kind: &str, text: &str, emitted_at: SystemTime) -> Self {
        Self {
            id,
            kind: Arc::from(kind),
            wire: wire::text_frame(text.as_bytes()),
            emitted_at,
            rewind: false,
        }
    }

    /// Its size on the wire.
    pub fn len(&self) -> usize {
        self.wire.len()
    }

    /// True for an empty frame (never: a frame has at least its header).
    pub fn is_empty(&self) -> bool {
        self.wire.is_empty()
    }
}

/// Why the hub (or the revocation check) ended a subscription.
pub(crate) type KickReason = Kick;

#[derive(Debug)]
struct Client {
    conn: Arc<Conn>,
    key_id: Arc<str>,
    drain: DrainWatch,
}

/// What the drain watch remembers of one socket between its looks (owned by the hub, under
/// the tenant's lock; the connection only bumps atomics).
#[derive(Debug, Default)]
struct DrainWatch {
    /// The connection's write count at the last look.
    seen_writes: u32,
    /// Since when it has had work and made no progress, as first seen by a look.
    stalled_since: Option<Instant>,
}

impl DrainWatch {
    /// Looks at the socket at `now`; true when it has had something to send and completed no
    /// write for at least `timeout`.
    fn stalled(&mut self, conn: &Conn, now: Instant, timeout: Duration) -> bool {
        let writes = conn.writes();
        if writes != self.seen_writes || !conn.has_work() {
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
pub(crate) const DRAIN_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Recent frames kept per tenant for resuming from memory. 64 frames is minutes of a busy
/// kitchen's traffic, which covers a reconnect after a network blip or a restart.
pub const RECENT_FRAMES: usize = 64;
/// Byte cap of one tenant's recent frames: with orders of ~1 KB the frame cap binds first; a
/// burst of very large events shortens the history instead of growing memory, and a frame
/// larger than the cap is not kept at all (resumes across it read the log). Worst case the hub
/// holds `tenants × 64 KiB`.
pub(crate) const RECENT_BYTES: usize = 64 * 1024;
/// Sockets below which a tenant's event is fanned out on the listener's own thread: splitting
/// a few hundred non-blocking writes over the workers costs more in task hand-offs than it
/// saves.
pub(crate) const PARALLEL_FANOUT_MIN: usize = 512;

#[derive(Debug, Default)]
struct Tenant {
    clients: HashMap<u64, Client>,
    /// The connections, as the fan-out iterates them: rebuilt after a socket joins or leaves,
    /// shared by every event until then (one reference count per event, not one per socket).
    snapshot: Option<Arc<[Arc<Conn>]>>,
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
        self.recent_bytes += frame.len();
        self.recent.push_back(frame.clone());
        while self.recent.len() > RECENT_FRAMES || self.recent_bytes > RECENT_BYTES {
            match self.recent.pop_front() {
                Some(old) => self.recent_bytes -= old.len(),
                None => break,
            }
        }
    }

    /// The connections to fan out to.
    fn targets(&mut self) -> Arc<[Arc<Conn>]> {
        let clients = &self.clients;
        Arc::clone(
            self.snapshot
                .get_or_insert_with(|| clients.values().map(|c| Arc::clone(&c.conn)).collect()),
        )
    }

    fn changed(&mut self) {
        self.snapshot = None;
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

/// What a new socket learns when it joins: how to catch up, and the tenant's position then.
#[derive(Debug)]
pub(crate) struct Joined {
    /// The socket's registration.
    pub sub: Subscription,
    /// How it catches up to its `since`.
    pub replay: Replay,
    /// The last id published to the tenant when it joined (`None`: not known here): a socket
    /// without `since` is caught up to it, and everything after it is offered to the socket.
    pub position: Option<i64>,
}

/// How a new socket catches up to `since`.
#[derive(Debug)]
pub(crate) enum Replay {
    /// These frames (possibly none), in order, bring it up to date; live frames follow.
    Frames(Vec<Frame>),
    /// Memory does not reach back far enough: replay from the event log.
    Database,
}

/// What one `publish` did, for the log line and the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Sockets that took the frame (written directly or queued).
    pub sent: usize,
    /// Of those, sockets it was written to directly, without their task.
    pub direct: usize,
    /// Sockets disconnected because their queue was full.
    pub failed: usize,
}

impl Delivery {
    fn add(&mut self, other: Delivery) {
        self.sent += other.sent;
        self.direct += other.direct;
        self.failed += other.failed;
    }
}

/// The registry of connected sockets, per tenant.
///
/// Locking: one mutex for the tenant map, one per tenant for its sockets; always map first, then
/// tenant. Publishing holds the tenant's lock only to remember the frame and take the tenant's
/// connection list; the writes happen outside it (each under its connection's own lock, never
/// waiting), so joining, leaving and other tenants never wait on a fan-out.
#[derive(Debug)]
pub struct Hub {
    tenants: Mutex<HashMap<Arc<str>, Arc<Mutex<Tenant>>>>,
    next_client: AtomicU64,
    bounds: QueueBounds,
    retention: Duration,
    metrics: Arc<Metrics>,
}

/// A socket's registration in the hub. Dropping it unregisters the socket.
#[derive(Debug)]
pub(crate) struct Subscription {
    #[cfg(test)]
    conn: Arc<Conn>,
    hub: Arc<Hub>,
    tenant: Arc<str>,
    client: u64,
}

#[cfg(test)]
impl Subscription {
    /// The connection the hub writes to.
    pub fn conn(&self) -> &Arc<Conn> {
        &self.conn
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
            bounds: QueueBounds {
                bytes: queue_bytes,
                frames: queue_frames.max(1),
            },
            retention,
            metrics,
        })
    }

    /// Registers a socket's connection for a tenant's live events, and says how it catches up
    /// from `since`: both are decided under the tenant's lock, so no frame falls between the
    /// replay and what is offered to the connection. `tenant_since` is when the tenant was
    /// created: frames written before it (by an earlier tenant under the same slug) are never
    /// served from memory.
    pub(crate) fn subscribe(
        self: &Arc<Self>,
        tenant: &Arc<str>,
        key_id: &str,
        since: Option<i64>,
        tenant_since: Option<SystemTime>,
        conn: Arc<Conn>,
    ) -> Joined {
        let client = self.next_client.fetch_add(1, Ordering::Relaxed);
        let entry = Client {
            conn: Arc::clone(&conn),
            key_id: Arc::from(key_id),
            drain: DrainWatch::default(),
        };
        let (replay, position) = {
            let mut map = lock(&self.tenants);
            let mut t = lock(map.entry(Arc::clone(tenant)).or_default());
            t.clients.insert(client, entry);
            t.changed();
            let retained = SystemTime::now().checked_sub(self.retention);
            (t.replay_after(since, retained.max(tenant_since)), t.last_id)
        };
        let sub = Subscription {
            #[cfg(test)]
            conn,
            hub: Arc::clone(self),
            tenant: Arc::clone(tenant),
            client,
        };
        Joined {
            sub,
            replay,
            position,
        }
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
    pub(crate) fn rewind(&self, tenant: &str, to_id: i64) {
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
        let text = crate::event::resync_required(
            tenant,
            crate::event::ResyncReason::LogRewound,
            previous,
            to_id,
        );
        let frame = Frame {
            rewind: true,
            ..Frame::event(to_id, "resync_required", &text, SystemTime::now())
        };
        for c in t.clients.values() {
            if c.conn
                .offer(frame.id, &frame.kind, &frame.wire, true, self.bounds)
                == Offered::TooSlow
            {
                c.conn.fire(Kick::SlowConsumer);
            }
        }
    }

    fn remove(&self, tenant: &str, client: u64) {
        // The tenant's entry stays (it holds the recent history); entries are bounded by the
        // number of tenants.
        let state = lock(&self.tenants).get(tenant).cloned();
        if let Some(state) = state {
            let mut t = lock(&state);
            if t.clients.remove(&client).is_some() {
                t.changed();
            }
        }
    }

    /// Offers a frame to every socket of the tenant and remembers it for resumes: a run of one.
    #[cfg(test)]
    pub(crate) async fn publish(&self, tenant: &str, frame: &Frame) -> Delivery {
        self.publish_run(tenant, std::slice::from_ref(frame)).await[0]
    }

    /// Offers consecutive event frames of one tenant (at most [`MAX_RUN_FRAMES`], in id order)
    /// to every socket of the tenant and remembers them for resumes; returns what became of
    /// each frame, in order. A socket that has room takes the whole run with one write (see
    /// [`Run`]). A socket that cannot take a frame (its queue is full) is kicked as a slow
    /// consumer instead of being waited for. Returns once every socket has been offered every
    /// frame, so the tenant's next events are offered after these, to every socket.
    pub(crate) async fn publish_run(&self, tenant: &str, frames: &[Frame]) -> Vec<Delivery> {
        debug_assert!(frames.len() <= MAX_RUN_FRAMES && frames.iter().all(|f| !f.rewind));
        let state = {
            let mut map = lock(&self.tenants);
            match map.get(tenant) {
                Some(s) => Arc::clone(s),
                None => Arc::clone(map.entry(Arc::from(tenant)).or_default()),
            }
        };
        let targets = {
            let mut t = lock(&state);
            for frame in frames {
                t.remember(frame);
            }
            t.targets()
        };
        let deliveries = if targets.len() < PARALLEL_FANOUT_MIN {
            offer_all(&targets, frames, self.bounds)
        } else {
            fan_out_in_parallel(targets, frames, self.bounds).await
        };
        let direct: usize = deliveries.iter().map(|d| d.direct).sum();
        self.metrics
            .frames_sent
            .fetch_add(direct as u64, Ordering::Relaxed);
        self.metrics
            .frames_direct
            .fetch_add(direct as u64, Ordering::Relaxed);
        deliveries
    }

    /// Ids of the keys behind the connected sockets (deduplicated).
    pub(crate) fn connected_key_ids(&self) -> Vec<String> {
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

    /// Kicks, with [`Kick::KeyRevoked`], every socket whose key is in `tenant_of` and whose
    /// tenant is not the one that key may read now (`None`: revoked or deleted, so all of its
    /// sockets). One pass over all sockets, whatever the number of keys. Returns how many.
    pub(crate) fn kick_keys_off_tenant(&self, tenant_of: &HashMap<&str, Option<&str>>) -> usize {
        if tenant_of.is_empty() {
            return 0;
        }
        let map = lock(&self.tenants);
        let mut n = 0;
        for (tenant, t) in map.iter() {
            let mut t = lock(t);
            let before = t.clients.len();
            t.clients.retain(|_, c| match tenant_of.get(&*c.key_id) {
                Some(allowed) if *allowed != Some(&**tenant) => {
                    c.conn.fire(Kick::KeyRevoked);
                    n += 1;
                    false
                }
                _ => true,
            });
            if t.clients.len() != before {
                t.changed();
            }
        }
        n
    }

    /// Kicks every socket that has had something to send (queued bytes, or a write the socket
    /// would not take) and completed no write for `timeout`, as seen by successive calls (one
    /// per [`DRAIN_CHECK_INTERVAL`]); returns how many. A peer that stopped reading with a
    /// large frame pending is cut this way even though its queue never overflows.
    pub(crate) fn check_drains(&self, now: Instant, timeout: Duration) -> usize {
        // Not holding the map lock while looking: subscribing and publishing go on meanwhile.
        let tenants: Vec<Arc<Mutex<Tenant>>> = lock(&self.tenants).values().cloned().collect();
        let mut kicked = 0;
        for t in tenants {
            let mut t = lock(&t);
            let before = t.clients.len();
            t.clients.retain(|_, c| {
                if c.conn.kick_reason().is_some() {
                    return false;
                }
                if c.drain.stalled(&c.conn, now, timeout) {
                    c.conn.fire(Kick::Stalled);
                    kicked += 1;
                    return false;
                }
                true
            });
            if t.clients.len() != before {
                t.changed();
            }
        }
        self.metrics
            .drain_timeouts
            .fetch_add(kicked as u64, Ordering::Relaxed);
        kicked
    }

    /// Sockets of one tenant on this instance.
    pub(crate) fn tenant_connections(&self, tenant: &str) -> usize {
        lock(&self.tenants)
            .get(tenant)
            .map_or(0, |t| lock(t).clients.len())
    }
}

/// Offers `frames` (one run) to each connection in turn; what became of each frame.
fn offer_all(conns: &[Arc<Conn>], frames: &[Frame], bounds: QueueBounds) -> Vec<Delivery> {
    let run = Run::new(frames.iter().map(|f| (f.id, &*f.kind, &f.wire)));
    let mut deliveries = vec![Delivery::default(); frames.len()];
    // One buffer for every connection's outcomes: nothing is allocated per socket.
    let mut outcomes = Vec::with_capacity(frames.len());
    for conn in conns {
        conn.offer_run(&run, bounds, &mut outcomes);
        for (delivery, offered) in deliveries.iter_mut().zip(&outcomes) {
            match offered {
                Offered::Written => {
                    delivery.sent += 1;
                    delivery.direct += 1;
                }
                // Considered, not for this socket (it asked for other types).
                Offered::Skipped => {}
                Offered::Queued => delivery.sent += 1,
                Offered::TooSlow => {
                    conn.fire(Kick::SlowConsumer);
                    delivery.failed += 1;
                }
                Offered::Gone => {}
            }
        }
    }
    deliveries
}

/// Offers `frames` to a large tenant's connections in one chunk per runtime worker, all at
/// once: the current thread takes the first chunk, a task per other worker the rest, and the
/// call returns when every chunk is done (so events of a tenant never overtake each other).
async fn fan_out_in_parallel(
    targets: Arc<[Arc<Conn>]>,
    frames: &[Frame],
    bounds: QueueBounds,
) -> Vec<Delivery> {
    let workers = tokio::runtime::Handle::current()
        .metrics()
        .num_workers()
        .max(1);
    let chunk = targets.len().div_ceil(workers);
    let mut others = tokio::task::JoinSet::new();
    for start in (chunk..targets.len()).step_by(chunk) {
        let targets = Arc::clone(&targets);
        // Clones share the frames' bytes (reference counts).
        let frames = frames.to_vec();
        others.spawn(async move {
            let end = (start + chunk).min(targets.len());
            offer_all(&targets[start..end], &frames, bounds)
        });
    }
    let mut deliveries = offer_all(&targets[..chunk.min(targets.len())], frames, bounds);
    while let Some(done) = others.join_next().await {
        if let Ok(part) = done {
            for (delivery, other) in deliveries.iter_mut().zip(part) {
                delivery.add(other);
            }
        }
    }
    deliveries
}

/// Runs [`Hub::check_drains`] every [`DRAIN_CHECK_INTERVAL`] (or a quarter of a shortened
/// `timeout`) until `shutdown`.
pub(crate) async fn watch_drains(hub: Arc<Hub>, timeout: Duration, shutdown: CancellationToken) {
    let every = DRAIN_CHECK_INTERVAL
        .min(timeout / 4)
        .max(Duration::from_millis(10));
    let mut clock = Periodic::every(every);
    while clock.tick(&shutdown).await {
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
    use crate::socket::{DeliveryLog, Flush};
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    const DAY: Duration = Duration::from_secs(86_400);

    struct NullLog;

    impl DeliveryLog for NullLog {
        fn delivered(&self, _: i64) {}
    }

    /// A connection over a real loopback socket, and the peer's end.
    async fn pair() -> (Arc<Conn>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (Conn::new(server, Arc::new(NullLog), None), peer)
    }

    fn frame(id: i64, text: &str) -> Frame {
        Frame::event(id, "x", text, SystemTime::now())
    }

    fn ids(r: Replay) -> Option<Vec<i64>> {
        match r {
            Replay::Frames(f) => Some(f.iter().map(|f| f.id).collect()),
            Replay::Database => None,
        }
    }

    /// Subscribes a fresh connection (the peer's end is kept alive by the caller's vector).
    async fn subscribe(
        hub: &Arc<Hub>,
        tenant: &Arc<str>,
        key: &str,
        since: Option<i64>,
        peers: &mut Vec<TcpStream>,
    ) -> (Subscription, Replay) {
        let (conn, peer) = pair().await;
        peers.push(peer);
        let joined = hub.subscribe(tenant, key, since, None, conn);
        (joined.sub, joined.replay)
    }

    #[tokio::test]
    async fn a_full_queue_kicks_only_that_socket() {
        let mut peers = Vec::new();
        // Each test frame is 7 bytes on the wire (2 of header): a budget of 10 holds one.
        let hub = Hub::new(10, 100, DAY, Arc::default());
        let tenant: Arc<str> = Arc::from("kitchen");
        let (fast, _) = subscribe(&hub, &tenant, "k1", None, &mut peers).await;
        let (slow, _) = subscribe(&hub, &tenant, "k2", None, &mut peers).await;
        let d = hub.publish("kitchen", &frame(1, "12345")).await;
        assert_eq!(
            (d.sent, d.failed),
            (2, 0),
            "queued for both: neither is live yet"
        );
        // `fast` goes live and writes its queue out; `slow` never does.
        fast.conn().go_live(None);
        assert!(matches!(fast.conn().flush().0, Flush::Idle));
        let d = hub.publish("kitchen", &frame(2, "123456")).await;
        assert_eq!((d.sent, d.direct, d.failed), (1, 1, 1));
        assert_eq!(slow.conn().kick_reason(), Some(KickReason::SlowConsumer));
        assert_eq!(fast.conn().kick_reason(), None);
        let mut got = vec![0u8; 7 + 8];
        peers[0].read_exact(&mut got).await.unwrap();
        assert_eq!(&got[2..7], b"12345");
        assert_eq!(
            &got[9..],
            b"123456",
            "written in order, the second one directly"
        );
    }

    #[tokio::test]
    async fn dropping_a_subscription_unregisters_it() {
        let mut peers = Vec::new();
        let hub = Hub::new(1024, 16, DAY, Arc::default());
        let tenant: Arc<str> = Arc::from("kitchen");
        let (sub, _) = subscribe(&hub, &tenant, "k1", None, &mut peers).await;
        assert_eq!(hub.connected_key_ids(), vec!["k1".to_string()]);
        drop(sub);
        assert_eq!(hub.tenant_connections("kitchen"), 0);
        assert!(hub.connected_key_ids().is_empty());
        assert_eq!(
            hub.publish("kitchen", &frame(1, "x")).await,
            Delivery::default()
        );
    }

    #[tokio::test]
    async fn revoked_and_moved_keys_are_kicked_off_the_tenants_they_left() {
        let mut peers = Vec::new();
        let hub = Hub::new(1024, 16, DAY, Arc::default());
        let kitchen: Arc<str> = Arc::from("kitchen");
        let bistro: Arc<str> = Arc::from("bistro");
        let (revoked, _) = subscribe(&hub, &kitchen, "k1", None, &mut peers).await;
        let (untouched, _) = subscribe(&hub, &kitchen, "k2", None, &mut peers).await;
        let (moved_away, _) = subscribe(&hub, &kitchen, "k3", None, &mut peers).await;
        let (moved_here, _) = subscribe(&hub, &bistro, "k3", None, &mut peers).await;
        let states = HashMap::from([("k1", None), ("k3", Some("bistro"))]);
        assert_eq!(hub.kick_keys_off_tenant(&states), 2);
        assert_eq!(revoked.conn().kick_reason(), Some(KickReason::KeyRevoked));
        assert_eq!(
            moved_away.conn().kick_reason(),
            Some(KickReason::KeyRevoked)
        );
        assert_eq!(untouched.conn().kick_reason(), None);
        assert_eq!(moved_here.conn().kick_reason(), None);
        assert_eq!(
            hub.connected_key_ids(),
            vec!["k2".to_string(), "k3".to_string()]
        );
    }

    #[tokio::test]
    async fn resumes_come_from_memory_while_history_reaches_back() {
        let mut p = Vec::new();
        let hub = Hub::new(1 << 20, 1024, DAY, Arc::default());
        let t: Arc<str> = Arc::from("kitchen");
        hub.reset("kitchen", 10, vec![frame(9, "a"), frame(10, "b")]);
        for id in 11..=12 {
            hub.publish("kitchen", &frame(id, "c")).await;
        }
        let mut replay = async |since| ids(subscribe(&hub, &t, "k", since, &mut p).await.1);
        assert_eq!(replay(Some(12)).await, Some(vec![]));
        assert_eq!(replay(Some(10)).await, Some(vec![11, 12]));
        assert_eq!(replay(Some(8)).await, Some(vec![9, 10, 11, 12]));
        assert_eq!(replay(Some(7)).await, None, "id 8 is not in memory");
        assert_eq!(replay(Some(13)).await, None, "ahead: ask the database");
        assert_eq!(replay(None).await, Some(vec![]));
        // A jump in ids drops the history rather than serving a hole.
        hub.publish("kitchen", &frame(20, "d")).await;
        assert_eq!(replay(Some(12)).await, None);
        assert_eq!(replay(Some(19)).await, Some(vec![20]));
    }

    #[tokio::test]
    async fn memory_never_serves_what_retention_or_an_earlier_tenant_left() {
        let mut p = Vec::new();
        let hub = Hub::new(1 << 20, 1024, Duration::from_secs(60), Arc::default());
        let t: Arc<str> = Arc::from("kitchen");
        let old = Frame {
            emitted_at: SystemTime::now() - Duration::from_secs(120),
            ..frame(1, "a")
        };
        hub.reset("kitchen", 2, vec![old, frame(2, "b")]);
        let (_s, r) = subscribe(&hub, &t, "k", Some(0), &mut p).await;
        assert_eq!(ids(r), None, "id 1 is past retention");
        let (_s, r) = subscribe(&hub, &t, "k", Some(1), &mut p).await;
        assert_eq!(ids(r), Some(vec![2]));
        // The tenant was created after id 2 was written: that frame is not its.
        let (conn, peer) = pair().await;
        p.push(peer);
        let created = Some(SystemTime::now() + Duration::from_secs(1));
        let joined = hub.subscribe(&t, "k", Some(1), created, conn);
        assert_eq!(ids(joined.replay), None);
        assert_eq!(joined.position, Some(2));
    }

    #[tokio::test]
    async fn history_is_bounded() {
        let mut p = Vec::new();
        let hub = Hub::new(1 << 20, 1024, DAY, Arc::default());
        let t: Arc<str> = Arc::from("kitchen");
        hub.reset("kitchen", 0, vec![]);
        let last = (RECENT_FRAMES + 10) as i64;
        for id in 1..=last {
            hub.publish("kitchen", &frame(id, "x")).await;
        }
        let first_kept = last - RECENT_FRAMES as i64 + 1;
        let (_s, r) = subscribe(&hub, &t, "k", Some(first_kept - 2), &mut p).await;
        assert_eq!(ids(r), None);
        let (_s, r) = subscribe(&hub, &t, "k", Some(first_kept - 1), &mut p).await;
        assert_eq!(ids(r).map(|v| v.len()), Some(RECENT_FRAMES));
        let big = "y".repeat(RECENT_BYTES + 1);
        hub.publish("kitchen", &frame(last + 1, &big)).await;
        let (_s, r) = subscribe(&hub, &t, "k", Some(last), &mut p).await;
        assert_eq!(ids(r), None, "too big to keep");
    }

    #[tokio::test]
    async fn an_empty_queue_takes_a_maximal_frame_and_a_full_one_does_not() {
        let mut p = Vec::new();
        let hub = Hub::new(
            crate::config::CLIENT_QUEUE_BYTES,
            crate::config::CLIENT_QUEUE_FRAMES,
            DAY,
            Arc::default(),
        );
        let t: Arc<str> = Arc::from("kitchen");
        let (sub, _) = subscribe(&hub, &t, "k1", None, &mut p).await;
        // Larger than the queue's byte bound on its own: still taken, the queue being empty.
        let big = "b".repeat(crate::event::MAX_FRAME_BYTES + 100);
        let d = hub.publish("kitchen", &frame(1, &big)).await;
        assert_eq!((d.sent, d.failed), (1, 0));
        // Behind a queued maximal frame, even a small one is over the bound: too slow.
        assert_eq!(hub.publish("kitchen", &frame(2, "x")).await.failed, 1);
        assert_eq!(sub.conn().kick_reason(), Some(KickReason::SlowConsumer));
    }

    #[tokio::test]
    async fn a_socket_with_work_and_no_progress_is_kicked_after_the_drain_timeout() {
        let mut p = Vec::new();
        let hub = Hub::new(1 << 20, 1024, DAY, Arc::default());
        let t: Arc<str> = Arc::from("kitchen");
        let timeout = Duration::from_secs(30);
        let (idle, _) = subscribe(&hub, &t, "idle", None, &mut p).await;
        let (stuck, _) = subscribe(&hub, &t, "stuck", None, &mut p).await;
        let (busy, _) = subscribe(&hub, &t, "busy", None, &mut p).await;
        idle.conn().go_live(None);
        assert!(matches!(idle.conn().flush().0, Flush::Idle));
        let t0 = Instant::now();
        assert_eq!(hub.check_drains(t0, timeout), 0);
        // `idle` writes its frame at once (live, room in the socket); `stuck` never writes its
        // queue out (no task); `busy` writes one frame per look.
        hub.publish("kitchen", &frame(1, "x")).await;
        busy.conn().go_live(None);
        for step in 1..=31 {
            let id = step + 1;
            hub.publish("kitchen", &frame(id, "y")).await;
            busy.conn().flush();
            let now = t0 + Duration::from_secs(step as u64);
            let kicked = hub.check_drains(now, timeout);
            // First seen stalled at step 1: kicked when 30 s have passed since.
            assert_eq!(kicked, if step == 31 { 1 } else { 0 }, "at {step} s");
        }
        assert_eq!(stuck.conn().kick_reason(), Some(KickReason::Stalled));
        assert_eq!(busy.conn().kick_reason(), None);
        assert_eq!(idle.conn().kick_reason(), None);
        assert_eq!(hub.tenant_connections("kitchen"), 2);
        assert_eq!(hub.metrics.drain_timeouts.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn history_stays_bounded_with_maximal_frames() {
        let mut p = Vec::new();
        let hub = Hub::new(1 << 20, 1024, DAY, Arc::default());
        let t: Arc<str> = Arc::from("kitchen");
        hub.reset("kitchen", 0, vec![]);
        let big = "b".repeat(crate::event::MAX_FRAME_BYTES);
        for id in 1..=3 {
            hub.publish("kitchen", &frame(id, &big)).await;
        }
        {
            let map = lock(&hub.tenants);
            let state = lock(&map["kitchen"]);
            assert!(
                state.recent.is_empty(),
                "a frame over RECENT_BYTES is not kept"
            );
            assert_eq!((state.recent_bytes, state.last_id), (0, Some(3)));
        }
        let (_s, r) = subscribe(&hub, &t, "k", Some(2), &mut p).await;
        assert_eq!(ids(r), None, "the log");
        // Small frames after it are kept again, and served.
        hub.publish("kitchen", &frame(4, "x")).await;
        let (_s, r) = subscribe(&hub, &t, "k", Some(3), &mut p).await;
        assert_eq!(ids(r), Some(vec![4]));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_tenant_is_fanned_out_over_the_workers_in_order() {
        let mut p = Vec::new();
        let hub = Hub::new(1 << 20, 1024, DAY, Arc::default());
        let t: Arc<str> = Arc::from("kitchen");
        let mut subs = Vec::new();
        for i in 0..PARALLEL_FANOUT_MIN + 100 {
            let (sub, _) = subscribe(&hub, &t, &format!("k{i}"), None, &mut p).await;
            sub.conn().go_live(None);
            sub.conn().flush();
            subs.push(sub);
        }
        for id in 1..=3 {
            let d = hub.publish("kitchen", &frame(id, &format!("e{id}"))).await;
            assert_eq!((d.sent, d.direct, d.failed), (subs.len(), subs.len(), 0));
        }
        // Every socket got the three frames, in order.
        for peer in p.iter_mut() {
            let mut got = [0u8; 12];
            peer.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"\x81\x02e1\x81\x02e2\x81\x02e3");
        }
    }
}
