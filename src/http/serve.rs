//! The HTTP accept loop: each connection is served by hyper's HTTP/1 on a tracked task, with a
//! deadline for a request's headers, a deadline for an idle keep-alive connection, WebSocket
//! upgrades and a graceful stop.
//!
//! hyper's own `header_read_timeout` is not used: in hyper 1.x its timer starts as soon as a
//! connection is idle, not at the next request's first byte, so one value would bound both the
//! headers and the idle time between requests (10 s of keep-alive, or 60 s to trickle headers).
//! Here each has its own deadline, tracked per connection by [`Activity`]: the IO wrapper sees
//! a request's first byte, the service sees its head complete and its response end.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::Service as _;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error};

use crate::config::Tuning;

/// Pause after an `accept` failure that is not the client's (out of file descriptors or
/// memory): retrying at once would spin a core while nothing can succeed; a short pause lets
/// connections close, and costs terminals of a reconnect storm little.
pub(crate) const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The two connection deadlines.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// See [`crate::config::HEADER_READ_TIMEOUT`].
    pub header_read: Duration,
    /// See [`crate::config::IDLE_TIMEOUT`].
    pub idle: Duration,
}

impl Timeouts {
    /// The deadlines configured in `tuning`.
    pub(crate) fn from_tuning(tuning: &Tuning) -> Self {
        Self {
            header_read: tuning.http_header_timeout,
            idle: tuning.http_idle_timeout,
        }
    }
}

/// Accepts connections on `listener` and serves `app` on each, until `shutdown` is cancelled.
/// Then it stops accepting (the listening socket is closed) and returns; each connection
/// finishes the request in flight and closes, and an idle one closes at once. Every connection
/// task is spawned on `tracker`, so the caller can wait for them. Handlers see the peer's
/// address as `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    timeouts: Timeouts,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // The client gave up before we accepted: nothing to serve, nothing wrong here.
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    error!(error = %e, "accepting a connection failed; pausing");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        tracker.spawn(serve_connection(
            stream,
            peer,
            app.clone(),
            timeouts,
            shutdown.clone(),
        ));
    }
    debug!("stopped accepting connections");
}

/// The TCP stream under an upgraded connection, with whatever the client sent after its
/// request head (early WebSocket frames), for the WebSocket code to own from now on.
pub(crate) fn into_tcp(
    upgraded: hyper::upgrade::Upgraded,
) -> Result<(TcpStream, bytes::Bytes), hyper::upgrade::Upgraded> {
    let parts = upgraded.downcast::<TokioIo<WatchedIo>>()?;
    Ok((parts.io.into_inner().io, parts.read_buf))
}

fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// Serves one connection until it ends, a deadline passes (the connection is dropped, which
/// closes it), or shutdown: then a request in flight is finished (hyper's graceful shutdown;
/// a WebSocket upgrade in flight completes and its socket is told 1001 by its own task), and
/// a connection between or inside request heads is closed at once.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    timeouts: Timeouts,
    shutdown: CancellationToken,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(WatchedIo {
        io: stream,
        activity: Some(Arc::clone(&activity)),
    });
    let service = {
        let app = TowerToHyperService::new(app);
        let activity = Arc::clone(&activity);
        hyper::service::service_fn(move |mut request: Request<Incoming>| {
            let guard = RequestGuard::start(Arc::clone(&activity));
            request.extensions_mut().insert(ConnectInfo(peer));
            let response = app.call(request);
            async move {
                let response = response.await?;
                if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                    guard.activity.set(Phase::Upgraded);
                }
                Ok::<_, Infallible>(response.map(|body| GuardedBody {
                    body,
                    _guard: guard,
                }))
            }
        })
    };
    let conn = http1::Builder::new()
        // The deadlines are enforced below; see the module comment.
        .header_read_timeout(None)
        .serve_connection(io, service)
        .with_upgrades();
    let stop = shutdown.cancelled();
    tokio::pin!(conn, stop);
    let mut stopping = false;
    loop {
        // Created before the phase is read, so a change in between is not missed.
        let changed = activity.changed.notified();
        let deadline = activity.deadline(timeouts);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    debug!(%peer, error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            _ = &mut stop, if !stopping => {
                stopping = true;
                if activity.phase() != Phase::Busy {
                    return;
                }
                conn.as_mut().graceful_shutdown();
            }
            _ = changed => {}
            _ = sleep_until(deadline) => {
                match activity.phase() {
                    _ if activity.deadline(timeouts).is_none_or(|d| d > Instant::now()) => {}
                    Phase::Idle => {
                        debug!(%peer, "closing a keep-alive connection idle for {:?}", timeouts.idle);
                        return;
                    }
                    _ => {
                        debug!(%peer, "closing a connection whose request headers took over {:?}", timeouts.header_read);
                        return;
                    }
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Where a connection is between requests, and since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Receiving a request head (from its first byte; from the accept for the first one).
    Head = 0,
    /// Between requests, nothing received yet.
    Idle = 1,
    /// A request is being handled or its response sent: no deadline of ours (handlers bound
    /// their own work).
    Busy = 2,
    /// Switched to WebSocket: no longer HTTP, no deadline of ours.
    Upgraded = 3,
}

/// One connection's phase, shared by its IO wrapper, its service and its task (all on that
/// task: the atomics only make it `Sync`).
struct Activity {
    born: Instant,
    /// The phase (low 2 bits) and when it began, in milliseconds since `born` (the rest).
    state: AtomicU64,
    /// Requests handled and not yet answered in full (hyper's HTTP/1 runs them one at a time;
    /// the count keeps the phase right whatever order the guards drop in).
    in_flight: AtomicU32,
    /// Woken when a deadline starts: the first byte of a head, or the end of a response.
    changed: Notify,
}

impl Activity {
    fn new() -> Self {
        Self {
            born: Instant::now(),
            state: AtomicU64::new(Phase::Head as u64),
            in_flight: AtomicU32::new(0),
            changed: Notify::new(),
        }
    }

    fn phase(&self) -> Phase {
        match self.state.load(Relaxed) & 3 {
            0 => Phase::Head,
            1 => Phase::Idle,
            2 => Phase::Busy,
            _ => Phase::Upgraded,
        }
    }

    fn set(&self, phase: Phase) {
        let since = self.born.elapsed().as_millis() as u64;
        self.state.store(since << 2 | phase as u64, Relaxed);
    }

    /// When the current phase's deadline passes, if it has one.
    fn deadline(&self, timeouts: Timeouts) -> Option<Instant> {
        let state = self.state.load(Relaxed);
        let since = self.born + Duration::from_millis(state >> 2);
        match self.phase() {
            Phase::Head => Some(since + timeouts.header_read),
            Phase::Idle => Some(since + timeouts.idle),
            Phase::Busy | Phase::Upgraded => None,
        }
    }

    /// Bytes arrived: between requests, they start the next head (and its deadline).
    fn bytes_read(&self) {
        if self.phase() == Phase::Idle {
            self.set(Phase::Head);
            self.changed.notify_one();
        }
    }
}

/// Marks a request in flight from its complete head until its response is sent (the guard
/// moves into the response body) or abandoned; then the connection is idle.
struct RequestGuard {
    activity: Arc<Activity>,
}

impl RequestGuard {
    fn start(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Relaxed);
        activity.set(Phase::Busy);
        Self { activity }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let last = self.activity.in_flight.fetch_sub(1, Relaxed) == 1;
        if last && self.activity.phase() != Phase::Upgraded {
            self.activity.set(Phase::Idle);
            self.activity.changed.notify_one();
        }
    }
}

/// A response body that holds its request's guard until hyper has sent it (and drops it).
struct GuardedBody {
    body: axum::body::Body,
    _guard: RequestGuard,
}

impl hyper::body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The connection's socket, noting each read in its [`Activity`]. After a WebSocket upgrade
/// the socket lives on inside the WebSocket: the wrapper then lets go of the `Activity` at its
/// next read or write, so an open socket keeps only this one empty pointer.
struct WatchedIo {
    io: TcpStream,
    activity: Option<Arc<Activity>>,
}

impl WatchedIo {
    /// Drops the `Activity` once the connection is a WebSocket; true while it is still HTTP.
    fn still_http(&mut self) -> bool {
        if self
            .activity
            .as_ref()
            .is_some_and(|a| a.phase() == Phase::Upgraded)
        {
            self.activity = None;
        }
        self.activity.is_some()
    }
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before && this.still_http()
        {
            if let Some(activity) = &this.activity {
                activity.bytes_read();
            }
        }
        result
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.still_http();
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.still_http();
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUTS: Timeouts = Timeouts {
        header_read: Duration::from_secs(10),
        idle: Duration::from_secs(60),
    };

    #[test]
    fn each_phase_has_its_own_deadline() {
        let activity = Arc::new(Activity::new());
        // A new connection: the first head is due `header_read` after the accept.
        let head = activity.deadline(TIMEOUTS).unwrap();
        assert!(head <= activity.born + TIMEOUTS.header_read);
        // Bytes inside a head do not move its deadline.
        activity.bytes_read();
        assert_eq!(activity.deadline(TIMEOUTS), Some(head));
        // While a request is handled there is none; after it, the idle deadline.
        let guard = RequestGuard::start(Arc::clone(&activity));
        assert_eq!(activity.deadline(TIMEOUTS), None);
        drop(guard);
        assert_eq!(activity.phase(), Phase::Idle);
        let idle = activity.deadline(TIMEOUTS).unwrap();
        assert!(idle >= head + (TIMEOUTS.idle - TIMEOUTS.header_read));
        // The next request's first byte starts a new head deadline.
        activity.bytes_read();
        assert_eq!(activity.phase(), Phase::Head);
        assert!(activity.deadline(TIMEOUTS).unwrap() < idle);
        // An upgraded connection has none, and stays upgraded when its guard drops.
        let guard = RequestGuard::start(Arc::clone(&activity));
        activity.set(Phase::Upgraded);
        drop(guard);
        assert_eq!(activity.phase(), Phase::Upgraded);
        assert_eq!(activity.deadline(TIMEOUTS), None);
    }
}
