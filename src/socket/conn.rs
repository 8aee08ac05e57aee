//! One POS connection, shared by the fan-out and the socket's own task.
//!
//! Every write to the socket goes through one lock and never waits: the fan-out writes an event
//! frame straight into the socket with a non-blocking write when the socket is live, nothing is
//! queued before it and the kernel has room (the common case: no task is woken, no queue
//! touched). Otherwise — the socket is still replaying, a write would block or only part of the
//! frame fits, the frame is out of sequence — the frame joins the connection's queue, and the
//! socket's task writes the queue out when the socket is writable again. Order per socket holds
//! because nothing is written directly while anything is queued.

use std::collections::VecDeque;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Told of the events written to the socket, completely, in order (presence records it for
/// the admin API and to check acks; a delivery covers every event up to it, so a write of
/// several frames reports its last).
pub(crate) trait DeliveryLog: Send + Sync {
    /// Event `id`, and every event before it, was written to the socket.
    fn delivered(&self, id: i64);
}

/// Why a connection was ended from outside its task (the task closes it accordingly).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kick {
    /// Its queue was full: close 1013, the POS resumes with `since`.
    SlowConsumer,
    /// Its key was revoked or moved: close 1008.
    KeyRevoked,
    /// It had something to send and completed no write for the drain timeout: close 1013.
    Stalled,
}

/// How many bytes and frames may wait for one socket before it counts as too slow.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueBounds {
    /// Bytes queued at most (an empty queue takes one frame of any size).
    pub bytes: usize,
    /// Frames queued at most.
    pub frames: usize,
}

/// The event types a socket asked for (`?types=`), plus the frames every socket gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TypeFilter(Box<[Box<str>]>);

impl TypeFilter {
    /// Types that pass every filter: what a POS must see whatever it asked for.
    pub(crate) const ALWAYS: [&'static str; 4] =
        ["resync_required", "ready", "snapshot_end", "order_snapshot"];

    /// A filter letting these types through.
    pub fn new(types: impl IntoIterator<Item = String>) -> Self {
        Self(types.into_iter().map(String::into_boxed_str).collect())
    }

    /// Whether a frame of this type is sent.
    pub fn passes(&self, kind: &str) -> bool {
        Self::ALWAYS.contains(&kind) || self.0.iter().any(|t| &**t == kind)
    }
}

/// Most frames offered as one run: a socket that takes a run directly writes it with one
/// vectored write, and 64 frames (the most a burst of one tenant's batch holds in practice)
/// stay far below the kernel's 1,024 slices per `writev`.
pub(crate) const MAX_RUN_FRAMES: usize = 64;

/// Consecutive event frames of one tenant, offered to each of its sockets together: a socket
/// that is live, has nothing queued, continues from just before the first and wants every type
/// in the run takes them all with one vectored write (one system call and, on the wire, as few
/// segments as the bytes need, rather than one of each per frame).
#[derive(Debug)]
pub(crate) struct Run<'a> {
    /// (id, type, frame) in id order.
    frames: Vec<(i64, &'a str, &'a Bytes)>,
    /// The frames' bytes, built once for every socket.
    slices: Vec<io::IoSlice<'a>>,
    /// Ids follow each other without a hole: the one-write path applies.
    consecutive: bool,
}

impl<'a> Run<'a> {
    /// A run of these frames (at most [`MAX_RUN_FRAMES`]), in id order.
    pub fn new(frames: impl IntoIterator<Item = (i64, &'a str, &'a Bytes)>) -> Self {
        let frames: Vec<_> = frames.into_iter().collect();
        debug_assert!(frames.len() <= MAX_RUN_FRAMES);
        let consecutive = frames.windows(2).all(|w| w[1].0 == w[0].0 + 1);
        let slices = frames.iter().map(|(_, _, b)| io::IoSlice::new(b)).collect();
        Self {
            frames,
            slices,
            consecutive,
        }
    }

    /// How many frames it holds.
    pub fn len(&self) -> usize {
        self.frames.len()
    }
}

/// What became of a frame offered to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Offered {
    /// Written to the socket in full, directly.
    Written,
    /// Not for this socket (a type it did not ask for); it moves the socket's position.
    Skipped,
    /// Queued (or partly written): the socket's task writes the rest.
    Queued,
    /// The queue is full: the connection must be kicked as a slow consumer.
    TooSlow,
    /// The connection is closing or broken: nothing to do.
    Gone,
}

/// What the socket's task must do after [`Conn::flush`].
#[derive(Debug)]
pub(crate) enum Flush {
    /// Everything is written; direct writes are on again if the socket is live.
    Idle,
    /// The socket takes no more now: wait until it is writable, then flush again.
    Blocked,
    /// An event out of sequence (a hole before it, as after pruning) or a rewind: the task
    /// decides what to send, then flushes again. Direct writes stay off meanwhile.
    Decide {
        /// The event's id.
        id: i64,
        /// Its frame; `None` for an event of a type the socket did not ask for.
        frame: Option<Bytes>,
        /// A `resync_required` (`log_rewound`) telling the socket to go back to `id`.
        rewind: bool,
    },
    /// A write failed: the peer is gone.
    Gone,
}

#[derive(Debug)]
enum What {
    Event(i64),
    /// An event the socket did not ask for: it only moves the position (no bytes).
    Skip(i64),
    Rewind(i64),
    Control,
}

#[derive(Debug)]
struct Pending {
    bytes: Bytes,
    what: What,
}

#[derive(Debug, Default)]
struct Out {
    /// The task follows the live stream (not replaying or catching up).
    live: bool,
    /// The fan-out may write directly: live and nothing queued.
    direct: bool,
    /// The last event written (or being written) to the socket, in order.
    last_id: Option<i64>,
    queue: VecDeque<Pending>,
    /// Bytes of the queue's first frame already written.
    head_written: usize,
    queued_bytes: usize,
    /// A write failed.
    broken: bool,
}

/// The connection: the socket and its ordered write path, its kick signal and the counters the
/// drain watch reads.
pub(crate) struct Conn {
    stream: TcpStream,
    out: Mutex<Out>,
    /// Wakes the task: something is queued, or the connection was kicked.
    wake: Notify,
    /// Wakes every waiter once, when the connection is kicked.
    kick: Notify,
    /// 0 = not kicked, else a [`Kick`] code.
    kicked: AtomicU8,
    /// Writes completed (wrapping): the progress the drain watch looks for.
    writes: AtomicU32,
    /// The task waits for the socket to take queued bytes.
    waiting: AtomicBool,
    log: Arc<dyn DeliveryLog>,
    /// The types the socket asked for; `None`: all.
    types: Option<TypeFilter>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("stream", &self.stream)
            .finish()
    }
}

impl Conn {
    /// A connection over an upgraded socket, reporting what it writes to `log`, sending only the
    /// event types in `types` (all when `None`).
    pub fn new(
        stream: TcpStream,
        log: Arc<dyn DeliveryLog>,
        types: Option<TypeFilter>,
    ) -> Arc<Self> {
        Arc::new(Self {
            stream,
            out: Mutex::default(),
            wake: Notify::new(),
            kick: Notify::new(),
            kicked: AtomicU8::new(0),
            writes: AtomicU32::new(0),
            waiting: AtomicBool::new(false),
            log,
            types,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Out> {
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this socket is sent frames of type `kind`.
    pub(crate) fn wants(&self, kind: &str) -> bool {
        self.types.as_ref().is_none_or(|t| t.passes(kind))
    }

    /// Offers an event frame from the fan-out: written at once when the socket is live, nothing
    /// is queued and the kernel has room; queued (within `bounds`) otherwise. An event of a type
    /// the socket did not ask for is not sent, but moves its position, so the next one is not
    /// taken for a gap.
    pub fn offer(
        &self,
        id: i64,
        kind: &str,
        frame: &Bytes,
        rewind: bool,
        bounds: QueueBounds,
    ) -> Offered {
        if self.kick_reason().is_some() {
            return Offered::Gone;
        }
        let mut out = self.lock();
        if out.broken {
            return Offered::Gone;
        }
        let in_order = out.last_id.is_none_or(|last| id == last + 1);
        if !rewind && !self.wants(kind) {
            if out.direct && in_order {
                out.last_id = Some(id);
            } else {
                // Behind queued frames, or after a gap: its place in the order is kept.
                out.direct = false;
                out.queue.push_back(Pending {
                    bytes: Bytes::new(),
                    what: What::Skip(id),
                });
                drop(out);
                self.wake.notify_one();
            }
            return Offered::Skipped;
        }
        if out.direct && !rewind && in_order {
            debug_assert!(out.queue.is_empty());
            match self.stream.try_write(frame) {
                // Nothing taken: queue it, as for a write that would block.
                Ok(0) => {}
                Ok(n) if n == frame.len() => {
                    out.last_id = Some(id);
                    self.writes.fetch_add(1, Ordering::Relaxed);
                    drop(out);
                    self.log.delivered(id);
                    return Offered::Written;
                }
                Ok(n) => {
                    self.writes.fetch_add(1, Ordering::Relaxed);
                    Self::queue_partly_written(&mut out, id, frame, n);
                    drop(out);
                    self.wake.notify_one();
                    return Offered::Queued;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    out.broken = true;
                    drop(out);
                    self.wake.notify_one();
                    return Offered::Gone;
                }
            }
        }
        let what = if rewind {
            What::Rewind(id)
        } else {
            What::Event(id)
        };
        let offered = Self::enqueue(&mut out, frame, what, bounds);
        drop(out);
        if offered == Offered::Queued {
            self.wake.notify_one();
        }
        offered
    }

    /// Offers a run of consecutive event frames from the fan-out, their outcomes (in order) into
    /// `outcomes`. Where the whole run can go out directly (see [`Run`]) it is written with one
    /// vectored write, and what the socket did not take is queued behind, in order, exactly as
    /// [`Conn::offer`] queues a frame whose write would block or fit partly. Anything else
    /// (a filtered type in the run, a hole, a queue or a replay in progress) is offered frame by
    /// frame through [`Conn::offer`].
    pub fn offer_run(&self, run: &Run<'_>, bounds: QueueBounds, outcomes: &mut Vec<Offered>) {
        outcomes.clear();
        // Frame by frame; after a frame the queue could not take, nothing more (the caller
        // kicks the socket, which resumes from its last id).
        let one_by_one = |outcomes: &mut Vec<Offered>| {
            for (id, kind, frame) in &run.frames {
                let offered = match outcomes.last() {
                    Some(Offered::TooSlow | Offered::Gone) => Offered::Gone,
                    _ => self.offer(*id, kind, frame, false, bounds),
                };
                outcomes.push(offered);
            }
        };
        let Some(&(first, _, _)) = run.frames.first() else {
            return;
        };
        if run.len() == 1 || !run.consecutive || self.kick_reason().is_some() {
            one_by_one(outcomes);
            return;
        }
        let mut out = self.lock();
        let takes_all = out.direct
            && !out.broken
            && out.last_id.is_none_or(|last| first == last + 1)
            && run.frames.iter().all(|(_, kind, _)| self.wants(kind));
        if !takes_all {
            drop(out);
            one_by_one(outcomes);
            return;
        }
        debug_assert!(out.queue.is_empty());
        let mut taken = match self.stream.try_write_vectored(&run.slices) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(_) => {
                out.broken = true;
                drop(out);
                self.wake.notify_one();
                outcomes.extend(run.frames.iter().map(|_| Offered::Gone));
                return;
            }
        };
        if taken > 0 {
            self.writes.fetch_add(1, Ordering::Relaxed);
        }
        let mut written_in_full = None;
        let mut queued = false;
        let mut too_slow = false;
        for &(id, _, frame) in &run.frames {
            let offered = if too_slow {
                // The socket is being kicked as too slow: nothing more for it.
                Offered::Gone
            } else if taken >= frame.len() {
                taken -= frame.len();
                out.last_id = Some(id);
                written_in_full = Some(id);
                Offered::Written
            } else if taken > 0 {
                Self::queue_partly_written(&mut out, id, frame, taken);
                taken = 0;
                queued = true;
                Offered::Queued
            } else {
                let offered = Self::enqueue(&mut out, frame, What::Event(id), bounds);
                queued |= offered == Offered::Queued;
                too_slow = offered == Offered::TooSlow;
                offered
            };
            outcomes.push(offered);
        }
        drop(out);
        if let Some(id) = written_in_full {
            self.log.delivered(id);
        }
        if queued {
            self.wake.notify_one();
        }
    }

    /// Event `id`'s frame went out directly up to byte `written` (not all of it): its first
    /// bytes are out, so it is the socket's position, and the task writes the rest, and
    /// everything after it. The queue is empty before it (direct writes only happen then), so it
    /// takes it whatever its size. The caller wakes the task.
    fn queue_partly_written(out: &mut Out, id: i64, frame: &Bytes, written: usize) {
        debug_assert!(out.queue.is_empty() && 0 < written && written < frame.len());
        out.last_id = Some(id);
        out.direct = false;
        out.head_written = written;
        out.queued_bytes += frame.len();
        out.queue.push_back(Pending {
            bytes: frame.clone(),
            what: What::Event(id),
        });
    }

    /// Queues `frame` for the socket's task, within `bounds`; the caller wakes the task.
    fn enqueue(out: &mut Out, frame: &Bytes, what: What, bounds: QueueBounds) -> Offered {
        // An empty queue takes any frame: frames are at most one maximal frame, and a bound
        // smaller than that would cut every socket of the tenant on it, again on every resume.
        let fits = out.queue.is_empty()
            || (out.queue.len() < bounds.frames && out.queued_bytes + frame.len() <= bounds.bytes);
        if !fits {
            return Offered::TooSlow;
        }
        out.direct = false;
        out.queued_bytes += frame.len();
        out.queue.push_back(Pending {
            bytes: frame.clone(),
            what,
        });
        Offered::Queued
    }

    /// The task follows the live stream from `last_id` (the last event it wrote; `None` for a
    /// socket that joined without `since` and was sent nothing yet). Direct writes resume once
    /// the queue is written out ([`Conn::flush`]).
    pub(crate) fn go_live(&self, last_id: Option<i64>) {
        let mut out = self.lock();
        out.live = true;
        if last_id.is_some() {
            out.last_id = last_id;
        }
    }

    /// Writes what is queued, in order, as far as the socket takes it without waiting. Returns
    /// what the task must do next and how many events it wrote in full.
    pub fn flush(&self) -> (Flush, u64) {
        let mut out = self.lock();
        let mut events = 0;
        loop {
            if out.broken {
                return (Flush::Gone, events);
            }
            let Some(front) = out.queue.front() else {
                out.direct = out.live;
                self.waiting.store(false, Ordering::Release);
                return (Flush::Idle, events);
            };
            if out.head_written == 0 {
                match front.what {
                    What::Event(id) | What::Skip(id)
                        if out.last_id.is_some_and(|last| id <= last) =>
                    {
                        // Already sent (by the replay, at the seam).
                        let p = out.queue.pop_front().expect("front exists");
                        out.queued_bytes -= p.bytes.len();
                        continue;
                    }
                    What::Skip(id) if out.last_id.is_none_or(|last| id == last + 1) => {
                        out.last_id = Some(id);
                        out.queue.pop_front();
                        continue;
                    }
                    // Next in order: written below. `last_id` moves once its first bytes are
                    // out, never before: a write that would block leaves the frame untouched
                    // at the front, and the next flush must not take it for already sent.
                    What::Event(id) if out.last_id.is_none_or(|last| id == last + 1) => {}
                    What::Event(_) | What::Skip(_) | What::Rewind(_) => {
                        let p = out.queue.pop_front().expect("front exists");
                        out.queued_bytes -= p.bytes.len();
                        out.live = false;
                        out.direct = false;
                        let (id, frame, rewind) = match p.what {
                            What::Rewind(id) => (id, Some(p.bytes), true),
                            What::Event(id) => (id, Some(p.bytes), false),
                            What::Skip(id) => (id, None, false),
                            What::Control => unreachable!("matched above"),
                        };
                        return (Flush::Decide { id, frame, rewind }, events);
                    }
                    What::Control => {}
                }
            }
            let written = out.head_written;
            let front = out.queue.front().expect("front exists");
            let starting = match front.what {
                What::Event(id) if written == 0 => Some(id),
                _ => None,
            };
            let result = self.stream.try_write(&front.bytes[written..]);
            match result {
                Ok(n) => {
                    self.writes.fetch_add(1, Ordering::Relaxed);
                    if let (Some(id), 1..) = (starting, n) {
                        out.last_id = Some(id);
                    }
                    out.head_written += n;
                    let done = out
                        .queue
                        .front()
                        .is_some_and(|p| out.head_written == p.bytes.len());
                    if done {
                        let p = out.queue.pop_front().expect("front exists");
                        out.queued_bytes -= p.bytes.len();
                        out.head_written = 0;
                        if let What::Event(id) = p.what {
                            events += 1;
                            self.log.delivered(id);
                        }
                        if out.queue.is_empty() {
                            // Give back the memory a burst grew the queue to.
                            out.queue = VecDeque::new();
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.waiting.store(true, Ordering::Release);
                    return (Flush::Blocked, events);
                }
                Err(_) => {
                    out.broken = true;
                    return (Flush::Gone, events);
                }
            }
        }
    }

    /// Writes from the task while it is not live (replay, catch-up): as much of `bytes` as the
    /// socket takes now. Nothing else writes meanwhile (direct writes are off, and the queue
    /// waits for the task), so the task may write a frame in several calls.
    pub(crate) fn write_some(&self, bytes: &[u8]) -> io::Result<usize> {
        let out = self.lock();
        debug_assert!(!out.direct);
        match self.stream.try_write(bytes) {
            Ok(n) => {
                self.writes.fetch_add(1, Ordering::Relaxed);
                drop(out);
                self.waiting.store(n < bytes.len(), Ordering::Release);
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.waiting.store(true, Ordering::Release);
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Records that the task wrote event `id` itself (replay, catch-up), in order.
    pub fn wrote(&self, id: i64) {
        self.lock().last_id = Some(id);
        self.log.delivered(id);
    }

    /// The last event written to the socket, in order.
    pub fn last_id(&self) -> Option<i64> {
        self.lock().last_id
    }

    /// Sends a control frame (ping, pong): directly when nothing is queued, else behind what
    /// is. True when it still has to be flushed.
    pub fn control(&self, frame: Bytes) -> bool {
        let mut out = self.lock();
        if out.broken {
            return false;
        }
        if out.queue.is_empty() {
            match self.stream.try_write(&frame) {
                Ok(n) if n == frame.len() => return false,
                Ok(n) => out.head_written = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    out.broken = true;
                    return false;
                }
            }
        }
        out.direct = false;
        out.queued_bytes += frame.len();
        out.queue.push_back(Pending {
            bytes: frame,
            what: What::Control,
        });
        true
    }

    /// Ends the stream with a close frame: what is queued is dropped (the frame being written
    /// is finished first, so the close frame starts on a frame boundary). Flush to send it.
    pub(crate) fn close_with(&self, frame: Bytes) {
        let mut out = self.lock();
        out.live = false;
        out.direct = false;
        let keep = usize::from(out.head_written > 0).min(out.queue.len());
        out.queue.truncate(keep);
        out.queued_bytes = out.queue.iter().map(|p| p.bytes.len()).sum();
        out.queued_bytes += frame.len();
        out.queue.push_back(Pending {
            bytes: frame,
            what: What::Control,
        });
    }

    /// Waits until the socket may have bytes to read.
    ///
    /// Through the stream's read-waker slot (`poll_read_ready`), not `readable()`'s waiter
    /// list: before the upgrade, hyper's connection task left its waker in that slot, and a
    /// waker keeps its task's memory (about 1.4 KB, hyper's connection state) allocated although
    /// the task has ended. Registering the socket task's own waker there, as the first idle wait
    /// does, frees it: with `readable()` it stayed for the socket's whole life.
    pub async fn readable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.stream.poll_read_ready(cx)).await
    }

    /// Reads what has arrived, without waiting (`WouldBlock` when nothing has).
    pub(crate) fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.try_read(buf)
    }

    /// Waits until the socket takes more bytes.
    ///
    /// Through the write-waker slot, as [`Conn::readable`] does and for the same reason. Only
    /// the socket's own task waits here (the fan-out never waits), so the slot's one waker is
    /// enough.
    pub(crate) async fn writable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.stream.poll_write_ready(cx)).await
    }

    /// Resolves when there is something for the task to do: a frame queued, or a kick.
    pub(crate) async fn woken(&self) {
        self.wake.notified().await
    }

    /// Ends the connection from outside its task (the first reason wins).
    pub(crate) fn fire(&self, reason: Kick) {
        let code = match reason {
            Kick::SlowConsumer => 1,
            Kick::KeyRevoked => 2,
            Kick::Stalled => 3,
        };
        if self
            .kicked
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.kick.notify_waiters();
            self.wake.notify_one();
        }
    }

    /// Why the connection was kicked, if it was.
    pub(crate) fn kick_reason(&self) -> Option<Kick> {
        match self.kicked.load(Ordering::Acquire) {
            0 => None,
            1 => Some(Kick::SlowConsumer),
            2 => Some(Kick::KeyRevoked),
            _ => Some(Kick::Stalled),
        }
    }

    /// Resolves when the connection is kicked.
    pub(crate) async fn kicked(&self) {
        loop {
            // Register before checking, so a kick between the check and the await still wakes.
            let notified = self.kick.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.kick_reason().is_some() {
                return;
            }
            notified.await;
        }
    }

    /// Writes completed so far (wrapping).
    pub fn writes(&self) -> u32 {
        self.writes.load(Ordering::Acquire)
    }

    /// True when the connection has something to send: queued bytes, or the task waits for the
    /// socket to take a write.
    pub(crate) fn has_work(&self) -> bool {
        self.waiting.load(Ordering::Acquire) || !self.lock().queue.is_empty()
    }

    /// Closes the socket both ways at once (a FIN to the peer), whoever still holds the
    /// connection.
    pub fn shutdown(&self) {
        let _ = socket2::SockRef::from(&self.stream).shutdown(Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;
    use std::time::Duration;

    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;
    use crate::socket::wire;

    /// Records what the connection reports as delivered.
    #[derive(Default)]
    struct Delivered(StdMutex<Vec<i64>>);

    impl DeliveryLog for Delivered {
        fn delivered(&self, id: i64) {
            self.0.lock().unwrap().push(id);
        }
    }

    /// The ids in the server frames of `bytes` (unmasked text frames of JSON with an `id`),
    /// and how many bytes they took.
    fn frame_ids(bytes: &[u8]) -> (Vec<i64>, usize) {
        let mut ids = Vec::new();
        let mut at = 0;
        loop {
            let rest = &bytes[at..];
            if rest.len() < 2 {
                return (ids, at);
            }
            let (len, header) = match rest[1] {
                126 if rest.len() >= 4 => (usize::from(u16::from_be_bytes([rest[2], rest[3]])), 4),
                126 => return (ids, at),
                127 => panic!("no test frame is that large"),
                n => (usize::from(n), 2),
            };
            if rest.len() < header + len {
                return (ids, at);
            }
            let v: serde_json::Value =
                serde_json::from_slice(&rest[header..header + len]).expect("a whole, intact frame");
            ids.push(v["id"].as_i64().unwrap());
            at += header + len;
        }
    }

    /// A live connection over loopback with a small send buffer (so writes block early), its
    /// peer, and what it reports delivered.
    async fn small_buffer_pair(
        types: Option<TypeFilter>,
    ) -> (Arc<Conn>, TcpStream, Arc<Delivered>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        socket2::SockRef::from(&server)
            .set_send_buffer_size(16 * 1024)
            .unwrap();
        let log = Arc::new(Delivered::default());
        let conn = Conn::new(server, Arc::clone(&log) as Arc<dyn DeliveryLog>, types);
        conn.go_live(None);
        assert!(matches!(conn.flush().0, Flush::Idle));
        (conn, peer, log)
    }

    const UNBOUNDED: QueueBounds = QueueBounds {
        bytes: usize::MAX,
        frames: usize::MAX,
    };

    /// Event `id`'s frame: small, of a size that does not divide the buffers, as events are
    /// (the kernel often refuses a whole frame: the socket fills at a frame boundary).
    fn event_frame(id: i64) -> Bytes {
        let pad = "p".repeat(100 + (id as usize * 97) % 300);
        wire::text_frame(format!(r#"{{"id":{id},"pad":"{pad}"}}"#).as_bytes())
    }

    /// Reads everything up to event `last` as a slow peer would, a little at a time, while the
    /// socket's task flushes after every read, twice (the second finds the socket still full:
    /// a flush that blocks must lose nothing). Returns the ids received, in arrival order.
    async fn read_through_a_slow_peer(conn: &Conn, peer: &mut TcpStream, last: i64) -> Vec<i64> {
        let mut received = Vec::new();
        let mut chunk = vec![0; 4096];
        let mut round = 0usize;
        while frame_ids(&received).0.last() != Some(&last) {
            round += 1;
            assert!(round < 100_000, "the stream stopped");
            let _ = conn.flush();
            let blocked = matches!(conn.flush().0, Flush::Blocked);
            let want = 500 + (round * 389) % 3000;
            let n = tokio::time::timeout(Duration::from_secs(5), peer.read(&mut chunk[..want]))
                .await
                .expect("bytes keep coming")
                .unwrap();
            received.extend_from_slice(&chunk[..n]);
            if blocked {
                // As the socket's task does before flushing again (bounded: the space may
                // come only with the peer's next read).
                let _ = tokio::time::timeout(Duration::from_millis(20), conn.writable()).await;
            }
        }
        frame_ids(&received).0
    }

    /// Every id from 1 to `last`, in order, once.
    fn assert_every_id_in_order(ids: &[i64], last: i64) {
        let hole = ids.iter().zip(1..).find(|(got, want)| **got != *want);
        assert_eq!(hole, None, "every frame, in order ({} received)", ids.len());
        assert_eq!(ids.len(), last as usize);
    }

    #[tokio::test]
    async fn frames_queued_behind_a_blocked_socket_all_arrive_in_order() {
        let (conn, mut peer, log) = small_buffer_pair(None).await;
        // Far more than the socket buffers hold: most frames wait in the queue.
        const EVENTS: i64 = 2_000;
        for id in 1..=EVENTS {
            let offered = conn.offer(id, "x", &event_frame(id), false, UNBOUNDED);
            assert!(matches!(offered, Offered::Written | Offered::Queued));
        }
        let ids = read_through_a_slow_peer(&conn, &mut peer, EVENTS).await;
        assert_every_id_in_order(&ids, EVENTS);
        assert_eq!(
            *log.0.lock().unwrap(),
            ids,
            "reported delivered in order, each once"
        );
    }

    #[tokio::test]
    async fn a_run_goes_out_in_one_write_in_order() {
        let (conn, mut peer, log) = small_buffer_pair(None).await;
        let frames: Vec<Bytes> = (1..=5).map(event_frame).collect();
        let run = Run::new(frames.iter().zip(1..).map(|(f, id)| (id, "x", f)));
        let mut outcomes = Vec::new();
        conn.offer_run(&run, UNBOUNDED, &mut outcomes);
        assert_eq!(outcomes, [Offered::Written; 5]);
        assert_eq!(
            conn.writes.load(Ordering::Relaxed),
            1,
            "one write for the run"
        );
        assert_eq!(conn.last_id(), Some(5));
        assert_eq!(
            *log.0.lock().unwrap(),
            [5],
            "a write reports its last event"
        );
        let ids = read_through_a_slow_peer(&conn, &mut peer, 5).await;
        assert_every_id_in_order(&ids, 5);
    }

    #[tokio::test]
    async fn a_run_with_a_type_the_socket_did_not_ask_for_goes_frame_by_frame() {
        let only_x = TypeFilter::new(["x".to_string()]);
        let (conn, mut peer, _log) = small_buffer_pair(Some(only_x)).await;
        let frames: Vec<Bytes> = (1..=3).map(event_frame).collect();
        let kinds = ["x", "y", "x"];
        let run = Run::new(
            frames
                .iter()
                .zip(1..)
                .map(|(f, id)| (id, kinds[id as usize - 1], f)),
        );
        let mut outcomes = Vec::new();
        conn.offer_run(&run, UNBOUNDED, &mut outcomes);
        assert_eq!(
            outcomes,
            [Offered::Written, Offered::Skipped, Offered::Written]
        );
        assert_eq!(
            conn.last_id(),
            Some(3),
            "the skipped event moved the position"
        );
        let mut bytes = vec![0; frames[0].len() + frames[2].len()];
        peer.read_exact(&mut bytes).await.unwrap();
        assert_eq!(frame_ids(&bytes).0, [1, 3]);
    }

    #[tokio::test]
    async fn runs_a_blocked_socket_takes_partly_all_arrive_in_order() {
        let (conn, mut peer, log) = small_buffer_pair(None).await;
        // Runs of every length up to the most, far more than the socket buffers hold: writes
        // block whole, stop inside a frame, and later runs queue behind earlier ones.
        const EVENTS: i64 = 2_000;
        let frames: Vec<Bytes> = (1..=EVENTS).map(event_frame).collect();
        let mut outcomes = Vec::new();
        let (mut next, mut length) = (1i64, 1usize);
        while next <= EVENTS {
            let end = (next + length as i64 - 1).min(EVENTS);
            let run = Run::new((next..=end).map(|id| (id, "x", &frames[id as usize - 1])));
            conn.offer_run(&run, UNBOUNDED, &mut outcomes);
            assert!(
                outcomes
                    .iter()
                    .all(|o| matches!(o, Offered::Written | Offered::Queued)),
                "{outcomes:?}"
            );
            next = end + 1;
            length = length % MAX_RUN_FRAMES + 1;
        }
        let ids = read_through_a_slow_peer(&conn, &mut peer, EVENTS).await;
        assert_every_id_in_order(&ids, EVENTS);
        let reported = log.0.lock().unwrap().clone();
        assert!(
            reported.windows(2).all(|w| w[0] < w[1]) && reported.last() == Some(&EVENTS),
            "reported delivered in order, up to the last"
        );
    }
}
