//! `GET /ws/pos/{tenant}`: authenticates a POS before the upgrade (contract §5), then runs one
//! task per socket that replays from `?since=` and continues live from the hub, with nothing lost
//! and nothing twice at the seam. Browsers, which cannot set headers on a WebSocket, present
//! the key as a subprotocol (docs/browser-auth.md). Each socket is registered in presence and
//! may acknowledge what it processed with `{"type":"ack","id":N}`.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Extension, Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use tokio::time::Instant;
use tracing::{debug, info};

use super::auth::{self, Caller, KeyRefusal, VerifiedKey};
use super::limits::{self, ConnectionSlot};
use super::{AppState, Error};
use crate::config::Tuning;
use crate::db::events;
use crate::db::keys;
use crate::event;
use crate::hub::{KickReason, Replay, Subscription};
use crate::metrics::DisconnectReason;
use crate::presence::Registration;

/// The header a POS presents its key in (the seed's).
pub const API_KEY_HEADER: &str = "x-api-key";
/// The subprotocol the service speaks. A browser must offer it with its key entry, and it is the
/// only value ever echoed in the response's `Sec-WebSocket-Protocol` (never the key).
pub const SUBPROTOCOL: &str = "orderpush.v1";
/// Prefix of the `Sec-WebSocket-Protocol` entry that carries a browser's key:
/// `orderpush.key.pos_<64 hex>` (an RFC 6455 token: letters, digits, `.` and `_` only).
pub const KEY_PROTOCOL_PREFIX: &str = "orderpush.key.";
/// Largest message a POS may send. POS clients only receive (and at most ack); 4 KiB keeps a
/// hostile client from making the server buffer anything sizeable.
pub const MAX_INCOMING_MESSAGE: usize = 4 * 1024;
/// tungstenite's read buffer per socket, allocated up front; its 128 KiB default is sized for
/// throughput, and 10k idle terminals would hold 1.25 GB with it. A POS sends only pongs and
/// acks (tens of bytes); the buffer still grows on demand up to MAX_INCOMING_MESSAGE.
pub const READ_BUFFER: usize = 128;
/// Largest write backlog inside tungstenite for one socket: one maximal frame
/// (`event::MAX_FRAME_BYTES`, the envelope included) and what may follow it. A frame that does
/// not fit fails the socket without a close frame, on every attempt, so this must hold the
/// largest frame the service ever sends. Our own queue (the hub's) bounds everything else.
/// tungstenite allocates it on demand (an idle socket holds none of it) but keeps the capacity
/// a big frame grew it to until the socket closes.
pub const MAX_WRITE_BUFFER: usize = event::MAX_FRAME_BYTES + WRITE_BUFFER_SLACK;
/// Room beyond one maximal frame in [`MAX_WRITE_BUFFER`]: its WebSocket header (at most 14
/// bytes) and a close frame behind it (at most 129 bytes) when the socket is closed
/// mid-frame, rounded up generously.
pub const WRITE_BUFFER_SLACK: usize = 4 * 1024;
/// Events fetched per replay query: bounds memory for a POS that was away for a long time.
pub const REPLAY_PAGE: i64 = 500;
/// Event data fetched per replay query, beyond its first row: 500 typical orders (~1 KB each)
/// fit, while a page of near-maximal (1 MiB) events stops after about one, so a replay holds at
/// most ~2 MiB of rows however large its events are.
pub const REPLAY_PAGE_BYTES: i64 = 1 << 20;
/// One replay query slower than this means a sick database: the socket is closed with 1011
/// and the query cancelled, rather than holding a pooled connection.
pub const REPLAY_QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long we wait for a close frame to be written before dropping the connection.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Close codes (RFC 6455) this service sends.
pub mod close_code {
    /// Going away: the service is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// Policy violation: the key was revoked.
    pub const POLICY: u16 = 1008;
    /// Internal error: e.g. the database was unreachable during replay.
    pub const INTERNAL: u16 = 1011;
    /// Try again later: the client read too slowly (its queue overflowed, or nothing drained
    /// for the drain timeout); resume with `since`.
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// Routes of this group.
pub fn router() -> Router<AppState> {
    Router::new().route("/ws/pos/{tenant}", get(upgrade))
}

#[derive(Deserialize)]
struct ResumeQuery {
    since: Option<String>,
}

async fn upgrade(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    caller: Option<Extension<Caller>>,
    Path(tenant): Path<String>,
    Query(query): Query<ResumeQuery>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, Error> {
    let caller = caller.map(|Extension(c)| c);
    let key = match authenticate(&state, caller.as_ref(), &tenant, &headers).await {
        Ok(key) => key,
        Err(refusal) => {
            if matches!(
                refusal.error,
                Error::Unauthorized(_) | Error::Forbidden(_) | Error::BadRequest(_)
            ) {
                state.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(refusal.into_response());
        }
    };
    let since = match query.since.as_deref() {
        None => None,
        Some(s) => Some(s.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
            Error::BadRequest("since must be a non-negative integer event id".into())
        })?),
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return Ok(axum::response::IntoResponse::into_response(rejection)),
    };
    // Reserved before the upgrade, released when the socket ends: the slot moves into the
    // upgrade callback, so it is also released if that callback never runs (the client went
    // away before the upgrade completed).
    let (tenant, key_id): (Arc<str>, Arc<str>) = (tenant.into(), key.identity.id.into());
    let slot = match state
        .connection_limits
        .reserve(Arc::clone(&tenant), Arc::clone(&key_id))
    {
        Ok(slot) => slot,
        Err(reason) => {
            state.metrics.connection_refused(reason);
            info!(%tenant, %key_id, cap = reason.label(), "WebSocket refused: connection cap reached");
            return Err(Error::OverCapacity {
                message: state.connection_limits.refusal_message(reason),
                retry_after: limits::CAP_RETRY_AFTER.as_secs(),
            });
        }
    };
    let generation = key.generation;
    let tenant_since = key.identity.tenant_since;
    // The token keeps the tracker open from now on, so shutdown waits for this socket too.
    let token = state.tracker.token();
    Ok(ws
        .protocols([SUBPROTOCOL])
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(MAX_INCOMING_MESSAGE)
        .max_frame_size(MAX_INCOMING_MESSAGE)
        .on_upgrade(move |socket| {
            serve_socket(
                Box::new(socket),
                state,
                slot,
                KeyFacts {
                    generation,
                    tenant_since,
                },
                since,
                peer,
                token,
            )
        }))
}

/// Contract §5: no key, or an unknown or revoked one → 401; another tenant's key → 403; a key
/// that cannot be verified now (database unreachable) → 503 with Retry-After.
async fn authenticate(
    state: &AppState,
    caller: Option<&Caller>,
    tenant: &str,
    headers: &HeaderMap,
) -> Result<VerifiedKey, KeyRefusal> {
    let presented = presented_key(headers)?;
    if !keys::is_well_formed(presented) {
        return Err(Error::Unauthorized("invalid API key".into()).into());
    }
    let key = auth::verify_key(state, caller, presented).await?;
    // The path is compared, never queried: a malformed tenant simply is not the key's tenant.
    if key.identity.tenant != tenant {
        return Err(Error::Forbidden("this API key belongs to another tenant".into()).into());
    }
    Ok(key)
}

/// The key a client presented: the `X-API-Key` header or, for browsers, one
/// `orderpush.key.<key>` entry in `Sec-WebSocket-Protocol` offered together with
/// [`SUBPROTOCOL`]. The header wins when both are present. Never logged.
fn presented_key(headers: &HeaderMap) -> Result<&str, Error> {
    if let Some(value) = headers.get(API_KEY_HEADER) {
        return value
            .to_str()
            .map_err(|_| Error::Unauthorized("invalid API key".into()));
    }
    let mut offered_subprotocol = false;
    let mut key = None;
    for value in headers.get_all(header::SEC_WEBSOCKET_PROTOCOL) {
        let value = value
            .to_str()
            .map_err(|_| Error::Unauthorized("invalid API key".into()))?;
        for entry in value.split(',').map(str::trim) {
            if entry == SUBPROTOCOL {
                offered_subprotocol = true;
            } else if let Some(k) = entry.strip_prefix(KEY_PROTOCOL_PREFIX) {
                if key.replace(k).is_some() {
                    return Err(Error::Unauthorized("more than one API key offered".into()));
                }
            }
        }
    }
    match key {
        None => Err(Error::Unauthorized(format!(
            "missing X-API-Key header (browsers: offer the subprotocols {SUBPROTOCOL} and {KEY_PROTOCOL_PREFIX}<key>)"
        ))),
        Some(_) if !offered_subprotocol => Err(Error::BadRequest(format!(
            "a key in Sec-WebSocket-Protocol must be offered together with the {SUBPROTOCOL} subprotocol"
        ))),
        Some(k) => Ok(k),
    }
}

/// What was known of a socket's key when it was verified.
struct KeyFacts {
    /// The key cache's change generation then: a change after it closes the socket.
    generation: u64,
    /// When the key's tenant was created: nothing older is this tenant's.
    tenant_since: Option<std::time::SystemTime>,
}

/// Runs one POS socket from upgrade to close. The socket arrives boxed and the tenant and key
/// id shared (in the slot): an async fn's arguments are stored in its task for its whole life,
/// so keeping them small keeps every idle connection small.
async fn serve_socket(
    mut socket: Box<WebSocket>,
    state: AppState,
    // Released (dropped) only after the socket is closed.
    slot: ConnectionSlot,
    key: KeyFacts,
    since: Option<i64>,
    peer: SocketAddr,
    // Held until the socket is closed, so shutdown waits for the close frame.
    _tracked: tokio_util::task::task_tracker::TaskTrackerToken,
) {
    let (tenant, key_id) = (slot.tenant(), slot.key_id());
    state.metrics.connects.fetch_add(1, Ordering::Relaxed);
    state.metrics.connections.fetch_add(1, Ordering::Relaxed);
    info!(tenant = %tenant, key_id = %key_id, since, "new WebSocket connection for tenant: {tenant}");
    // Subscribe before replaying: every event is then either in the replay or in the queue.
    let (sub, replay) = state
        .hub
        .subscribe_after(tenant, key_id, since, key.tenant_since);
    let conn = state.presence.register(tenant, key_id, peer, since);
    let reason = if !state.keys.still_valid(key_id, tenant, key.generation) {
        // The key was revoked or moved while this socket was being set up: that change found
        // no socket here to close, so close it now.
        DisconnectReason::KeyRevoked
    } else {
        // Pinned once per connection: creating these futures for every frame would register
        // and unregister a waiter under a lock each time.
        let shutdown = state.shutdown.cancelled();
        let kicked = sub.kicked();
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(shutdown, kicked, timer);
        let now = Instant::now();
        let mut socket_task = SocketTask {
            socket: &mut socket,
            state: &state,
            tenant,
            sub: &sub,
            conn: &conn,
            shutdown,
            kicked,
            live: Liveness {
                timer,
                watching: false,
                ping_due: false,
                last_heard: now,
                next_ping: now,
            },
        };
        socket_task.run(since, replay).await
    };
    drop(sub);
    drop(conn);
    // Boxed: the close handshake (with its timer) is rare, and inline it would enlarge every
    // idle connection's task.
    Box::pin(close(&mut socket, reason)).await;
    state.metrics.disconnected(reason);
    info!(tenant = %tenant, key_id = %key_id, ?reason, "WebSocket connection closed for tenant: {tenant}");
}

/// Sends the close frame that tells the POS why, if the reason has one.
async fn close(socket: &mut WebSocket, reason: DisconnectReason) {
    let (code, text) = match reason {
        DisconnectReason::Shutdown => (close_code::GOING_AWAY, "server shutting down"),
        DisconnectReason::SlowConsumer => (
            close_code::TRY_AGAIN_LATER,
            "too slow: reconnect with ?since=<last id>",
        ),
        DisconnectReason::KeyRevoked => (close_code::POLICY, "API key revoked"),
        DisconnectReason::ServerError => (
            close_code::INTERNAL,
            "temporary server error: reconnect with ?since=<last id>",
        ),
        DisconnectReason::Client
        | DisconnectReason::PingTimeout
        | DisconnectReason::ProtocolError => {
            return;
        }
    };
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from_static(text),
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.send(Message::Close(Some(frame)))).await;
}

/// Why a send was interrupted.
enum Stop {
    Ended(DisconnectReason),
}

/// One POS socket's task: its socket, its queue, the two ways it can be told to stop, and its
/// liveness watch.
struct SocketTask<'a, S, K> {
    socket: &'a mut WebSocket,
    state: &'a AppState,
    tenant: &'a Arc<str>,
    sub: &'a Subscription,
    conn: &'a Registration,
    shutdown: Pin<&'a mut S>,
    kicked: Pin<&'a mut K>,
    live: Liveness<'a>,
}

/// When to ping a socket and when to give up on it.
///
/// One timer serves both the ping schedule and the liveness deadline (`last_heard` +
/// `pong_timeout`): it is set for whichever comes first. A received frame only moves
/// `last_heard`, so no timer is reset per frame; when the timer fires for a deadline that has
/// since moved, it is re-armed for the new one. A silent peer is therefore dropped
/// `pong_timeout` after its last frame whatever the ping phase, also while a send to it is
/// stuck (a peer that stopped reading), and the task holds a single timer, inline.
struct Liveness<'a> {
    timer: Pin<&'a mut tokio::time::Sleep>,
    /// False during the replay (the socket is not read then, so silence proves nothing).
    watching: bool,
    /// A ping fell due while a send was in progress; it goes out next.
    ping_due: bool,
    /// When the last frame from the peer arrived (any frame: pong, text, ping).
    last_heard: Instant,
    next_ping: Instant,
}

impl<S: Future<Output = ()>, K: Future<Output = ()>> SocketTask<'_, S, K> {
    async fn run(&mut self, since: Option<i64>, replay: Replay) -> DisconnectReason {
        let mut last_sent = match (since, replay) {
            (None, _) => None,
            // Memory never replays more than the log would (it holds 64 frames; only a
            // shortened limit, as in tests, can be smaller).
            (Some(since), Replay::Frames(frames))
                if frames.len() as i64 <= self.state.tuning.max_replay_rows =>
            {
                // Served from the hub's memory: no database query on the reconnect path.
                self.state
                    .metrics
                    .resumes_from_memory
                    .fetch_add(1, Ordering::Relaxed);
                let mut last = since;
                for frame in frames {
                    if let Err(Stop::Ended(reason)) =
                        self.send_event(frame.id, frame.text, true).await
                    {
                        return reason;
                    }
                    last = frame.id;
                }
                Some(last)
            }
            (Some(since), _) => {
                self.state
                    .metrics
                    .resumes_from_database
                    .fetch_add(1, Ordering::Relaxed);
                // Boxed: the database replay's futures are large and rarely needed.
                match Box::pin(self.catch_up(since)).await {
                    Ok(last) => Some(last),
                    Err(Stop::Ended(reason)) => return reason,
                }
            }
        };
        let state: &AppState = self.state;
        let tuning = &state.tuning;
        self.live.start(tuning);
        loop {
            if self.live.ping_due {
                self.live.ping_due = false;
                if let Err(Stop::Ended(reason)) = self.send(Message::Ping(Default::default())).await
                {
                    return reason;
                }
                self.live.pinged(tuning);
            }
            tokio::select! {
                biased;
                _ = &mut self.shutdown => return DisconnectReason::Shutdown,
                _ = &mut self.kicked => return kick_reason(self.sub),
                frame = self.sub.recv() => {
                    if frame.rewind {
                        // The log went backwards: a socket that was sent more than it now holds
                        // is told so, and continues from its lower id.
                        if last_sent.is_some_and(|last| last > frame.id) {
                            if let Err(Stop::Ended(reason)) = self.send_event(frame.id, frame.text, false).await {
                                return reason;
                            }
                            last_sent = Some(frame.id);
                        }
                        continue;
                    }
                    if let Some(last) = last_sent {
                        if frame.id <= last {
                            continue; // already sent by the replay
                        }
                        if frame.id > last + 1 {
                            // A hole (e.g. pruned before the listener read it): fill it from
                            // the log, or tell the POS to resync; never skip silently.
                            match Box::pin(self.catch_up(last)).await {
                                Ok(l) => last_sent = Some(l),
                                Err(Stop::Ended(reason)) => return reason,
                            }
                            if frame.id <= last_sent.unwrap_or(last) {
                                continue;
                            }
                        }
                    }
                    if let Err(Stop::Ended(reason)) = self.send_event(frame.id, frame.text, false).await {
                        return reason;
                    }
                    last_sent = Some(frame.id);
                }
                msg = self.socket.recv() => {
                    match msg {
                        None | Some(Ok(Message::Close(_))) => return DisconnectReason::Client,
                        Some(Err(e)) => {
                            debug!(error = %e, "socket read failed");
                            return DisconnectReason::ProtocolError;
                        }
                        // Anything a POS sends proves it is alive; a text frame may be an ack.
                        Some(Ok(msg)) => {
                            self.live.last_heard = Instant::now();
                            if let Message::Text(text) = msg {
                                client_message(self.state, self.conn, &text);
                            }
                        }
                    }
                }
                _ = &mut self.live.timer => {
                    if let Err(Stop::Ended(reason)) = self.live.on_timer(tuning) {
                        return reason;
                    }
                }
            }
        }
    }

    /// Sends one message, giving up as soon as the socket is kicked or the server shuts down
    /// (a stalled peer must not pin its task). The hub's drain watch sees the write start and
    /// finish, and kicks the socket if it does not finish within the drain timeout: no timer
    /// of our own per send or per socket.
    async fn send(&mut self, msg: Message) -> Result<(), Stop> {
        self.sub.write_started();
        let send = self.socket.send(msg);
        tokio::pin!(send);
        let result = loop {
            tokio::select! {
                biased;
                r = &mut send => break r.map_err(|_| Stop::Ended(DisconnectReason::Client)),
                _ = &mut self.kicked => break Err(Stop::Ended(kick_reason(self.sub))),
                _ = &mut self.shutdown => break Err(Stop::Ended(DisconnectReason::Shutdown)),
                // Once live, the peer's deadline also ends a send it does not read.
                _ = &mut self.live.timer, if self.live.watching => {
                    if let Err(stop) = self.live.on_timer(&self.state.tuning) {
                        break Err(stop);
                    }
                }
            }
        };
        if result.is_ok() {
            self.sub.write_done();
        }
        result
    }

    /// Sends one event frame and records it (metrics, presence).
    async fn send_event(&mut self, id: i64, text: Utf8Bytes, replayed: bool) -> Result<(), Stop> {
        self.send(Message::Text(text)).await?;
        let metrics = &self.state.metrics;
        metrics.frames_sent.fetch_add(1, Ordering::Relaxed);
        if replayed {
            metrics.replayed_frames.fetch_add(1, Ordering::Relaxed);
        }
        self.conn.delivered(id);
        Ok(())
    }

    /// Sends every retained event with `id > since`, in order, and returns the last id the
    /// client now has. The log is read a page at a time on a replay connection (at most half
    /// the pool), which goes back to the pool before the page is written to the socket. When
    /// `since` cannot be honoured ([`resume_plan`]), or rows vanish under the replay (pruned
    /// meanwhile), sends `resync_required` instead and returns the tenant's latest id.
    async fn catch_up(&mut self, since: i64) -> Result<i64, Stop> {
        let tenant = Arc::clone(self.tenant);
        let max_rows = self.state.tuning.max_replay_rows;
        let (head, first_page) = self
            .read_log(async |c| {
                let (head, oldest) = events::bounds(&***c, &tenant).await?;
                let page = match resume_plan(since, head, oldest, max_rows) {
                    Ok(()) if since < head => {
                        events::replay(&***c, &tenant, since, head, REPLAY_PAGE, REPLAY_PAGE_BYTES)
                            .await?
                    }
                    Ok(()) => Vec::new(),
                    Err(reason) => return Ok((head, Err(reason))),
                };
                Ok((head, Ok(page)))
            })
            .await?;
        let mut page = match first_page {
            Ok(page) => page,
            Err(reason) => return self.resync(reason, since, head).await,
        };
        let mut last = since;
        while last < head {
            // Every id up to the head is committed, and retention deletes only a prefix: a
            // missing row means it was pruned since the replay began.
            if page.first().is_none_or(|e| e.id != last + 1) {
                return self
                    .resync(event::ResyncReason::Retention, last, head)
                    .await;
            }
            for e in std::mem::take(&mut page) {
                if e.id != last + 1 {
                    break;
                }
                self.send_event(e.id, e.to_frame().into(), true).await?;
                last = e.id;
            }
            if last < head {
                page = self
                    .read_log(async |c| {
                        events::replay(&***c, &tenant, last, head, REPLAY_PAGE, REPLAY_PAGE_BYTES)
                            .await
                    })
                    .await?;
            }
        }
        Ok(last)
    }

    /// Runs one read of the event log on a replay connection, giving up as soon as the socket
    /// is kicked or the server shuts down. A database that cannot serve it ends the socket with
    /// 1011.
    async fn read_log<T>(
        &mut self,
        work: impl AsyncFnOnce(&deadpool_postgres::Client) -> Result<T, crate::db::DbError>,
    ) -> Result<T, Stop> {
        let read = self.state.replays.run(REPLAY_QUERY_TIMEOUT, work);
        let result = tokio::select! {
            biased;
            _ = &mut self.shutdown => return Err(Stop::Ended(DisconnectReason::Shutdown)),
            _ = &mut self.kicked => return Err(Stop::Ended(kick_reason(self.sub))),
            r = read => r,
        };
        result.map_err(|e| {
            tracing::warn!(error = %e, tenant = %self.tenant, "replay failed");
            Stop::Ended(DisconnectReason::ServerError)
        })
    }

    /// Sends `resync_required` (the client has `since`; the tenant's latest id is `head`) and
    /// returns `head`: the client continues live from there.
    async fn resync(
        &mut self,
        reason: event::ResyncReason,
        since: i64,
        head: i64,
    ) -> Result<i64, Stop> {
        let text = event::resync_required(self.tenant, reason, since, head);
        self.send(Message::Text(text.into())).await?;
        self.state.metrics.resync(reason);
        self.conn.delivered(head);
        Ok(head)
    }
}

impl Liveness<'_> {
    /// Starts watching (after the replay): the deadline counts from now.
    fn start(&mut self, tuning: &Tuning) {
        self.last_heard = Instant::now();
        self.next_ping = self.last_heard + tuning.ping_interval;
        self.watching = true;
        self.arm(tuning);
    }

    /// A ping went out: the next one is due an interval from now.
    fn pinged(&mut self, tuning: &Tuning) {
        self.next_ping = Instant::now() + tuning.ping_interval;
        self.arm(tuning);
    }

    /// The timer fired: the peer's deadline has passed (drop it), or a ping is due (sent by the
    /// loop, not from inside a send), or the deadline moved since the timer was set (re-arm).
    fn on_timer(&mut self, tuning: &Tuning) -> Result<(), Stop> {
        let now = Instant::now();
        if now >= self.last_heard + tuning.pong_timeout {
            return Err(Stop::Ended(DisconnectReason::PingTimeout));
        }
        if now >= self.next_ping {
            self.ping_due = true;
        }
        self.arm(tuning);
        Ok(())
    }

    /// Sets the timer for the deadline, or for the next ping if that comes first and is not
    /// already due.
    fn arm(&mut self, tuning: &Tuning) {
        let deadline = self.last_heard + tuning.pong_timeout;
        let at = if self.ping_due {
            deadline
        } else {
            deadline.min(self.next_ping)
        };
        self.timer.as_mut().reset(at);
    }
}

/// Why the hub kicked a socket.
fn kick_reason(sub: &Subscription) -> DisconnectReason {
    match sub.kick_reason() {
        Some(KickReason::KeyRevoked) => DisconnectReason::KeyRevoked,
        // A stalled drain is a slow consumer too: same close code (1013), same remedy.
        Some(KickReason::SlowConsumer | KickReason::Stalled) | None => {
            DisconnectReason::SlowConsumer
        }
    }
}

/// Whether a resume from `since` can be replayed from the log, given the tenant's latest id
/// (`head`) and its oldest retained id (`oldest`, `None` when nothing is retained); otherwise
/// the reason for `resync_required`. `since` may be the last pruned id: `since + 1` retained
/// means no gap.
pub fn resume_plan(
    since: i64,
    head: i64,
    oldest: Option<i64>,
    max_rows: i64,
) -> Result<(), event::ResyncReason> {
    if since > head {
        Err(event::ResyncReason::LogRewound)
    } else if since == head {
        Ok(())
    } else if oldest.is_none_or(|oldest| oldest > since + 1) {
        Err(event::ResyncReason::Retention)
    } else if head - since > max_rows {
        Err(event::ResyncReason::ReplayTooLong)
    } else {
        Ok(())
    }
}

/// What a POS may send: `{"type": "ack", "id": N}`. Other fields are allowed (and ignored).
#[derive(Deserialize)]
struct ClientMessage {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: Option<serde_json::Value>,
}

/// Records an ack; anything else a POS sends (other JSON, text, a bad id) is ignored: old
/// clients may send anything, and none of it may affect delivery.
fn client_message(state: &AppState, conn: &Registration, text: &str) {
    let ack = serde_json::from_str::<ClientMessage>(text)
        .ok()
        .filter(|m| m.kind == "ack")
        .and_then(|m| m.id?.as_i64());
    if ack.is_some_and(|id| conn.acked(id)) {
        state.metrics.acks.fetch_add(1, Ordering::Relaxed);
    } else {
        state
            .metrics
            .client_messages_ignored
            .fetch_add(1, Ordering::Relaxed);
        debug!(ack, "ignored a message from a POS");
    }
}

#[cfg(test)]
mod tests {
    use super::resume_plan;
    use crate::event::ResyncReason;

    #[test]
    fn resumes_replay_only_what_the_log_holds_and_the_limit_allows() {
        let max = 100;
        // Up to date, or a replay within retention and the limit.
        assert_eq!(resume_plan(50, 50, Some(1), max), Ok(()));
        assert_eq!(resume_plan(0, 50, Some(1), max), Ok(()));
        // `since` is the last pruned id: nothing is missing.
        assert_eq!(resume_plan(9, 50, Some(10), max), Ok(()));
        assert_eq!(
            resume_plan(8, 50, Some(10), max),
            Err(ResyncReason::Retention)
        );
        assert_eq!(resume_plan(0, 50, None, max), Err(ResyncReason::Retention));
        // Ahead of the log: a restored database.
        assert_eq!(
            resume_plan(51, 50, Some(1), max),
            Err(ResyncReason::LogRewound)
        );
        // Exactly the limit replays; one more does not.
        assert_eq!(resume_plan(100, 200, Some(1), max), Ok(()));
        assert_eq!(
            resume_plan(99, 200, Some(1), max),
            Err(ResyncReason::ReplayTooLong)
        );
        // Retention is the reason when both apply: it is what the POS must know.
        assert_eq!(
            resume_plan(0, 500, Some(300), max),
            Err(ResyncReason::Retention)
        );
    }
}
