//! `GET /ws/pos/{tenant}`: authenticates a POS before the upgrade (docs/protocol.md), performs the
//! WebSocket handshake itself and takes the upgraded TCP stream over, then runs one task per
//! socket that replays from `?since=` and hands the socket to the fan-out (which writes live
//! frames straight into it), with nothing lost and nothing twice at the seam. The task reads
//! what the POS sends (pongs, pings, acks), pings it, and writes what the fan-out had to queue.
//! Browsers, which cannot set headers on a WebSocket, present the key as a subprotocol
//! (docs/browser-auth.md). Each socket is registered in presence and may acknowledge what it
//! processed with `{"type":"ack","id":N}`.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Extension, Path, Query, Request, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use serde::Deserialize;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::auth::{self, Caller, KeyRefusal, VerifiedKey};
use super::limits::{self, ConnectionSlot};
use super::{AppState, Error};
use crate::config::Tuning;
use crate::db::events;
use crate::db::keys;
use crate::event;
use crate::hub::{Frame, KickReason, Replay};
use crate::metrics::DisconnectReason;
use crate::presence::Registration;
use crate::sequencer::render;
use crate::socket::{Conn, Flush, TypeFilter, handshake, wire};

/// The header a POS presents its key in (the legacy Node server's).
pub(crate) const API_KEY_HEADER: &str = "x-api-key";
/// The subprotocol the service speaks. A browser must offer it with its key entry, and it is the
/// only value ever echoed in the response's `Sec-WebSocket-Protocol` (never the key).
pub(crate) const SUBPROTOCOL: &str = "orderpush.v1";
/// Prefix of the `Sec-WebSocket-Protocol` entry that carries a browser's key:
/// `orderpush.key.pos_<64 hex>` (an RFC 6455 token: letters, digits, `.` and `_` only).
pub(crate) const KEY_PROTOCOL_PREFIX: &str = "orderpush.key.";
/// Largest message a POS may send. POS clients only receive (and at most ack); 4 KiB keeps a
/// hostile client from making the server buffer anything sizeable.
pub(crate) const MAX_INCOMING_MESSAGE: usize = 4 * 1024;
/// Bytes read from a socket at a time: a POS sends pongs and acks of tens of bytes; a larger
/// message (up to [`MAX_INCOMING_MESSAGE`]) takes a few reads.
pub(crate) const READ_CHUNK: usize = 512;
/// The kernel's send buffer per POS socket (`SO_SNDBUF`; Linux doubles it). Enough for dozens
/// of typical orders, so the fan-out's direct writes almost always fit; small enough that a
/// client that stops reading fills it quickly and meets the queue's bound (1 MiB), rather than
/// the kernel's autotuned buffer (up to 4 MiB) hiding a slow client from it.
pub(crate) const SEND_BUFFER: usize = 64 * 1024;
/// Most event types one socket may ask for with `?types=`: there are four database types and a
/// handful of the web app's; the bound keeps the per-frame check short.
pub(crate) const MAX_TYPES_ASKED: usize = 32;
/// Events fetched per replay query: bounds memory for a POS that was away for a long time.
pub(crate) const REPLAY_PAGE: i64 = 500;
/// Event data fetched per replay query, beyond its first row: 500 typical orders (~1 KB each)
/// fit, while a page of near-maximal (1 MiB) events stops after about one, so a replay holds at
/// most ~2 MiB of rows however large its events are.
pub(crate) const REPLAY_PAGE_BYTES: i64 = 1 << 20;
/// One replay query slower than this means a sick database: the socket is closed with 1011
/// and the query cancelled, rather than holding a pooled connection.
pub(crate) const REPLAY_QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long we wait for a close frame to be written before dropping the connection.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Close codes (RFC 6455) this service sends.
pub mod close_code {
    /// Going away: the service is shutting down.
    pub(crate) const GOING_AWAY: u16 = 1001;
    /// Policy violation: the key was revoked.
    pub(crate) const POLICY: u16 = 1008;
    /// Internal error: e.g. the database was unreachable during replay.
    pub(crate) const INTERNAL: u16 = 1011;
    /// Try again later: the client read too slowly (its queue overflowed, or nothing drained
    /// for the drain timeout); resume with `since`.
    pub(crate) const TRY_AGAIN_LATER: u16 = 1013;
}

/// Routes of this group.
pub(crate) fn router() -> Router<AppState> {
    Router::new().route("/ws/pos/{tenant}", get(upgrade))
}

#[derive(Deserialize)]
struct JoinQuery {
    since: Option<String>,
    snapshot: Option<String>,
    types: Option<String>,
}

/// How a socket joins: where it resumes from, whether it wants the open orders instead of
/// `resync_required`, and which event types it wants.
struct Join {
    since: Option<i64>,
    snapshot: bool,
    types: Option<TypeFilter>,
}

impl JoinQuery {
    /// Checks the query; every problem is a 400 before the upgrade.
    fn parse(self) -> Result<Join, Error> {
        let since = match self.since.as_deref() {
            None => None,
            Some(s) => Some(s.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
                Error::BadRequest("since must be a non-negative integer event id".into())
            })?),
        };
        let snapshot = match self.snapshot.as_deref() {
            None => false,
            Some("open") => true,
            Some(_) => {
                return Err(Error::BadRequest(
                    "snapshot must be 'open' (the open orders)".into(),
                ));
            }
        };
        let types = match self.types {
            None => None,
            Some(list) => {
                let types: Vec<String> = list.split(',').map(str::to_owned).collect();
                if types.len() > MAX_TYPES_ASKED || !types.iter().all(|t| event::is_valid_type(t)) {
                    return Err(Error::BadRequest(format!(
                        "types must be 1..{MAX_TYPES_ASKED} comma-separated event types of 1..{} letters, digits, '_', '.' or '-'",
                        event::MAX_TYPE_LEN
                    )));
                }
                Some(TypeFilter::new(types))
            }
        };
        Ok(Join {
            since,
            snapshot,
            types,
        })
    }
}

async fn upgrade(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    caller: Option<Extension<Caller>>,
    Path(tenant): Path<String>,
    Query(query): Query<JoinQuery>,
    mut request: Request,
) -> Result<Response, Error> {
    let caller = caller.map(|Extension(c)| c);
    let key = match authenticate(&state, caller.as_ref(), &tenant, request.headers()).await {
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
    let join = query.parse()?;
    let switching = match handshake::accept(request.headers(), SUBPROTOCOL) {
        Ok(response) => response,
        Err(e) => return Ok((e.status(), e.to_string()).into_response()),
    };
    // Reserved before the upgrade, released when the socket ends: the slot moves into the
    // socket's task, so it is also released if the upgrade never completes (the client went
    // away before it).
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
    let key = KeyFacts {
        generation: key.generation,
        tenant_since: key.identity.tenant_since,
    };
    let upgraded = hyper::upgrade::on(&mut request);
    // Tracked: shutdown waits for every socket's close frame.
    state.tracker.spawn(Box::pin(serve_socket(
        upgraded,
        state.clone(),
        slot,
        key,
        join,
        peer,
    )));
    Ok(switching.map(|()| Body::empty()))
}

/// docs/protocol.md, "Connect": no key, or an unknown or revoked one → 401; another tenant's key → 403; a key
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

/// Runs one POS socket from upgrade to close: takes the TCP stream over from the HTTP
/// connection, registers it, and serves it.
async fn serve_socket(
    upgraded: hyper::upgrade::OnUpgrade,
    state: AppState,
    // Released (dropped) only after the socket is closed.
    slot: ConnectionSlot,
    key: KeyFacts,
    join: Join,
    peer: SocketAddr,
) {
    let Ok(upgraded) = upgraded.await else {
        // The client went away before the upgrade completed.
        return;
    };
    let (stream, early) = match super::serve::into_tcp(upgraded) {
        Ok(parts) => parts,
        Err(_) => {
            warn!("an upgraded connection is not a TCP stream of ours; dropping it");
            return;
        }
    };
    // Frames go out whole and at once: Nagle's algorithm would hold a small frame back until
    // the previous one is acknowledged (up to 40 ms with delayed ACKs).
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER);
    let (tenant, key_id) = (slot.tenant(), slot.key_id());
    state.metrics.connects.fetch_add(1, Ordering::Relaxed);
    state.metrics.connections.fetch_add(1, Ordering::Relaxed);
    let Join {
        since,
        snapshot,
        types,
    } = join;
    info!(tenant = %tenant, key_id = %key_id, since, snapshot, "new WebSocket connection for tenant: {tenant}");
    let registration = state.presence.register(tenant, key_id, peer, since);
    if types.as_ref().is_some_and(|t| !t.passes("new_order")) {
        // It never sees orders: what it receives and acknowledges must not count as the
        // kitchen having them (the acknowledgement chain).
        registration.takes_no_orders();
    }
    let conn = Conn::new(stream, registration.delivery_log(), types);
    // Subscribe before replaying: every event is then either in the replay or offered to the
    // connection (queued while it replays).
    let joined = state
        .hub
        .subscribe(tenant, key_id, since, key.tenant_since, Arc::clone(&conn));
    let sub = joined.sub;
    let reason = if !state.keys.still_valid(key_id, tenant, key.generation) {
        // The key was revoked or moved while this socket was being set up: that change found
        // no socket here to close, so close it now.
        DisconnectReason::KeyRevoked
    } else {
        // Pinned once per connection: creating these futures for every frame would register
        // and unregister a waiter under a lock each time.
        let shutdown = state.shutdown.cancelled();
        let kicked = conn.kicked();
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(shutdown, kicked, timer);
        let now = Instant::now();
        let mut reader = wire::Reader::new(MAX_INCOMING_MESSAGE);
        reader.feed(&early);
        drop(early);
        let mut socket_task = SocketTask {
            conn: &conn,
            state: &state,
            tenant,
            registration: &registration,
            reader,
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
        let start = Start {
            since,
            snapshot,
            replay: joined.replay,
            position: joined.position,
        };
        socket_task.run(start).await
    };
    drop(sub);
    drop(registration);
    // Boxed: the close handshake (with its timer) is rare, and inline it would enlarge every
    // idle connection's task.
    Box::pin(close(&conn, reason)).await;
    conn.shutdown();
    state.metrics.disconnected(reason);
    info!(tenant = %tenant, key_id = %key_id, ?reason, "WebSocket connection closed for tenant: {tenant}");
}

/// Sends the close frame that tells the POS why, if the reason has one (and answers a POS that
/// closed), giving it at most [`CLOSE_TIMEOUT`] to be written.
async fn close(conn: &Conn, reason: DisconnectReason) {
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
        // The POS closed: its close frame was answered (queued) when it was read.
        DisconnectReason::Client => (0, ""),
        // Nobody listens (a dead peer) or it broke the protocol: nothing more to say.
        DisconnectReason::PingTimeout | DisconnectReason::ProtocolError => return,
    };
    if code != 0 {
        conn.close_with(wire::close_frame(code, text));
    }
    let written = async {
        loop {
            match conn.flush().0 {
                Flush::Blocked => {
                    if conn.writable().await.is_err() {
                        return;
                    }
                }
                // `close_with` left no event to decide on; anything else ends it.
                Flush::Idle | Flush::Gone | Flush::Decide { .. } => return,
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, written).await;
}

/// Where a socket starts: its `since`, whether it asked for the open orders, how the hub says it
/// catches up, and the tenant's position when it joined.
struct Start {
    since: Option<i64>,
    snapshot: bool,
    replay: Replay,
    position: Option<i64>,
}

/// How a catch-up from the log ended.
enum CatchUp {
    /// Caught up to this id.
    Done(i64),
    /// `since` cannot be honoured for this reason (the client had `since`; the tenant's latest
    /// id is the second).
    Resync(event::ResyncReason, i64, i64),
}

/// One POS socket's task: its connection, what the POS sent so far, the two ways it can be told
/// to stop, and its liveness watch.
struct SocketTask<'a, S, K> {
    conn: &'a Arc<Conn>,
    state: &'a AppState,
    tenant: &'a Arc<str>,
    registration: &'a Registration,
    reader: wire::Reader,
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
/// `pong_timeout` after its last frame whatever the ping phase, also while a write to it is
/// stuck (a peer that stopped reading), and the task holds a single timer, inline.
struct Liveness<'a> {
    timer: Pin<&'a mut tokio::time::Sleep>,
    /// False during the replay (the socket is not read then, so silence proves nothing).
    watching: bool,
    /// A ping fell due while the task was busy; it goes out next.
    ping_due: bool,
    /// When the last frame from the peer arrived (any frame: pong, text, ping).
    last_heard: Instant,
    next_ping: Instant,
}

impl<S: Future<Output = ()>, K: Future<Output = ()>> SocketTask<'_, S, K> {
    async fn run(&mut self, start: Start) -> DisconnectReason {
        match Box::pin(self.catch_up_at_start(start)).await {
            Ok(last) => self.conn.go_live(last),
            Err(reason) => return reason,
        }
        let state: &AppState = self.state;
        let tuning = &state.tuning;
        self.live.start(tuning);
        loop {
            // What the fan-out queued (a blocked or partial write, a frame out of sequence):
            // written out here until the socket takes no more.
            let blocked = match self.flush().await {
                Ok(blocked) => blocked,
                Err(reason) => return reason,
            };
            if self.live.ping_due {
                self.live.ping_due = false;
                self.conn.control(wire::PING);
                self.live.pinged(tuning);
                continue;
            }
            tokio::select! {
                biased;
                _ = &mut self.shutdown => return DisconnectReason::Shutdown,
                _ = &mut self.kicked => return kick_reason(self.conn),
                // A frame queued for the task (or a kick, seen above on the next turn).
                _ = self.conn.woken() => {}
                // The socket takes bytes again.
                r = self.conn.writable(), if blocked => {
                    if r.is_err() {
                        return DisconnectReason::Client;
                    }
                }
                r = self.conn.readable() => {
                    if r.is_err() {
                        return DisconnectReason::Client;
                    }
                    if let Err(reason) = self.read() {
                        return reason;
                    }
                }
                _ = &mut self.live.timer => {
                    if let Err(reason) = self.live.on_timer(tuning) {
                        return reason;
                    }
                }
            }
        }
    }

    /// Brings a socket from `since` to the live stream (a replay, the open orders, or
    /// `resync_required`), then tells it so with `ready`. Returns its position: the last event
    /// id written or considered (`None` for a socket that joined without `since`, when this
    /// instance knows nothing of the tenant yet).
    async fn catch_up_at_start(&mut self, start: Start) -> Result<Option<i64>, DisconnectReason> {
        let last = match (start.since, start.replay) {
            (None, _) if start.snapshot => Some(Box::pin(self.snapshot(None)).await?),
            (None, _) => start.position,
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
                    self.replay_event(frame.id, &frame.kind, &frame.wire)
                        .await?;
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
                match Box::pin(self.catch_up(since)).await? {
                    CatchUp::Done(last) => Some(last),
                    // Where the POS would be told to refetch, it asked for the open orders.
                    CatchUp::Resync(reason, since, head) if start.snapshot => {
                        Some(Box::pin(self.snapshot(Some((reason, since, head)))).await?)
                    }
                    CatchUp::Resync(reason, since, head) => {
                        Some(Box::pin(self.resync(reason, since, head)).await?)
                    }
                }
            }
        };
        let ready = event::ready(self.tenant, last.unwrap_or(0));
        self.write_frame(&wire::text_frame(ready.as_bytes()))
            .await?;
        Ok(last)
    }

    /// Sends the tenant's open orders as `order_snapshot` frames, all with the id N they are
    /// consistent with, then `snapshot_end`; returns N: live events follow from there. Read in
    /// one REPEATABLE READ transaction on a replay connection, released before anything is
    /// sent. A snapshot the database cannot give (a column it needs renamed) falls back to
    /// `resync_required` (`instead`, or reason `retention` for a socket without `since`).
    async fn snapshot(
        &mut self,
        instead: Option<(event::ResyncReason, i64, i64)>,
    ) -> Result<i64, DisconnectReason> {
        let tenant = Arc::clone(self.tenant);
        let tuning = &self.state.tuning;
        let (max_orders, max_bytes) = (tuning.snapshot_max_orders, tuning.snapshot_max_bytes);
        let limit = i64::try_from(max_orders).unwrap_or(i64::MAX - 1) + 1;
        let read = self
            .read_log_or_fail(async |c| crate::db::snapshot::open_orders(c, &tenant, limit).await)
            .await?;
        let open = match read {
            Ok(open) => open,
            Err(e) => {
                warn!(error = %e, tenant = %self.tenant, "the open orders could not be read; sending resync_required instead");
                let (reason, since, head) =
                    instead.unwrap_or((event::ResyncReason::Retention, 0, 0));
                return Box::pin(self.resync(reason, since, head)).await;
            }
        };
        let fields = render::FieldMap::new(open.columns);
        let now = event::iso_now();
        let (mut sent, mut bytes) = (0usize, 0usize);
        let mut complete = open.orders.len() <= max_orders;
        for (row, items) in open.orders.iter().take(max_orders) {
            let (Some(row), Ok(items)) = (
                render::columns(row),
                serde_json::from_str::<Vec<render::Columns<'_>>>(items),
            ) else {
                continue;
            };
            let data = render::new_order(&fields, &row, &items);
            let Ok((data, truncated)) = event::fit_data("order_snapshot", &tenant, &now, data)
            else {
                continue;
            };
            let text =
                event::envelope("order_snapshot", &tenant, &now, &data, open.head, truncated);
            if bytes + text.len() > max_bytes {
                complete = false;
                break;
            }
            bytes += text.len();
            self.write_frame(&wire::text_frame(text.as_bytes())).await?;
            sent += 1;
        }
        let end = event::snapshot_end(&tenant, open.head, complete);
        self.write_frame(&wire::text_frame(end.as_bytes())).await?;
        self.conn.wrote(open.head);
        self.state.metrics.snapshots.fetch_add(1, Ordering::Relaxed);
        debug!(tenant = %tenant, orders = sent, complete, id = open.head, "snapshot sent");
        Ok(open.head)
    }

    /// Writes what is queued until the socket takes no more; decides on the events the
    /// connection could not place (a hole before them, a rewind). Returns true when the socket
    /// is full and the rest waits for it to be writable.
    async fn flush(&mut self) -> Result<bool, DisconnectReason> {
        loop {
            let (outcome, written) = self.conn.flush();
            self.state
                .metrics
                .frames_sent
                .fetch_add(written, Ordering::Relaxed);
            match outcome {
                Flush::Idle => return Ok(false),
                Flush::Blocked => return Ok(true),
                Flush::Gone => return Err(DisconnectReason::Client),
                // Rare (a rewound log, a hole): boxed, so the idle socket's task stays small.
                Flush::Decide { id, frame, rewind } => {
                    Box::pin(self.decide(id, frame, rewind)).await?
                }
            }
        }
    }

    /// Places an event the connection could not: after a rewind, the socket continues from the
    /// lower id (told so when it was sent more); before an event after a hole (pruned before
    /// the listener read it), the hole is filled from the log or the POS told to resync, never
    /// skipped silently.
    async fn decide(
        &mut self,
        id: i64,
        frame: Option<Bytes>,
        rewind: bool,
    ) -> Result<(), DisconnectReason> {
        let last = self.conn.last_id();
        if rewind {
            if let Some(frame) = frame.filter(|_| last.is_some_and(|last| last > id)) {
                self.write_frame(&frame).await?;
            }
            self.conn.go_live(Some(id));
            return Ok(());
        }
        let mut last = match last {
            Some(last) => match Box::pin(self.catch_up(last)).await? {
                CatchUp::Done(last) => last,
                CatchUp::Resync(reason, since, head) => {
                    Box::pin(self.resync(reason, since, head)).await?
                }
            },
            None => id - 1,
        };
        if id > last {
            match frame {
                Some(frame) => self.write_event(id, &frame, false).await?,
                // A type this socket did not ask for: only its position moves.
                None => self.conn.wrote(id),
            }
            last = id;
        }
        self.conn.go_live(Some(last));
        Ok(())
    }

    /// Reads what the POS sent and acts on each complete message.
    fn read(&mut self) -> Result<(), DisconnectReason> {
        let mut buf = [0u8; READ_CHUNK];
        match self.conn.try_read(&mut buf) {
            Ok(0) => return Err(DisconnectReason::Client),
            Ok(n) => self.reader.feed(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(_) => return Err(DisconnectReason::Client),
        }
        // Anything a POS sends proves it is alive.
        self.live.last_heard = Instant::now();
        loop {
            match self.reader.next_message() {
                Ok(None) => return Ok(()),
                Ok(Some(wire::Incoming::Ping(payload))) => {
                    self.conn.control(wire::pong_frame(&payload));
                }
                Ok(Some(wire::Incoming::Pong | wire::Incoming::Binary)) => {}
                // A text message may be an ack.
                Ok(Some(wire::Incoming::Text(text))) => {
                    client_message(self.state, self.registration, &text);
                }
                Ok(Some(wire::Incoming::Close)) => {
                    // Answer it; the close handshake is then complete.
                    self.conn.close_with(wire::close_frame(1000, ""));
                    return Err(DisconnectReason::Client);
                }
                Err(e) => {
                    debug!(error = %e, "a POS broke the WebSocket protocol");
                    return Err(DisconnectReason::ProtocolError);
                }
            }
        }
    }

    /// Writes a whole frame from the task (while the connection is paused: replay, catch-up, a
    /// decision), waiting for the socket to take it, but giving up as soon as the socket is
    /// kicked, the server shuts down or (once live) the peer's deadline passes: a stalled peer
    /// must not pin its task. The hub's drain watch sees a write that makes no progress.
    async fn write_frame(&mut self, frame: &[u8]) -> Result<(), DisconnectReason> {
        let mut written = 0;
        while written < frame.len() {
            match self.conn.write_some(&frame[written..]) {
                Ok(n) => {
                    written += n;
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return Err(DisconnectReason::Client),
            }
            loop {
                tokio::select! {
                    biased;
                    r = self.conn.writable() => {
                        if r.is_err() {
                            return Err(DisconnectReason::Client);
                        }
                        break;
                    }
                    _ = &mut self.kicked => return Err(kick_reason(self.conn)),
                    _ = &mut self.shutdown => return Err(DisconnectReason::Shutdown),
                    _ = &mut self.live.timer, if self.live.watching => {
                        self.live.on_timer(&self.state.tuning)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes one event frame from the task and records it (metrics, presence).
    async fn write_event(
        &mut self,
        id: i64,
        frame: &Bytes,
        replayed: bool,
    ) -> Result<(), DisconnectReason> {
        self.write_frame(frame).await?;
        self.conn.wrote(id);
        let metrics = &self.state.metrics;
        metrics.frames_sent.fetch_add(1, Ordering::Relaxed);
        if replayed {
            metrics.replayed_frames.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// A replayed event: written when the socket wants its type, else only its position moves.
    async fn replay_event(
        &mut self,
        id: i64,
        kind: &str,
        frame: &Bytes,
    ) -> Result<(), DisconnectReason> {
        if self.conn.wants(kind) {
            self.write_event(id, frame, true).await
        } else {
            self.conn.wrote(id);
            Ok(())
        }
    }

    /// Sends every retained event with `id > since`, in order, and returns the last id the
    /// client now has. The log is read a page at a time on a replay connection (at most half
    /// the pool), which goes back to the pool before the page is written to the socket. When
    /// `since` cannot be honoured ([`resume_plan`]), or rows vanish under the replay (pruned
    /// meanwhile), sends `resync_required` instead and returns the tenant's latest id.
    async fn catch_up(&mut self, since: i64) -> Result<CatchUp, DisconnectReason> {
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
            Err(reason) => return Ok(CatchUp::Resync(reason, since, head)),
        };
        let mut last = since;
        while last < head {
            // Every id up to the head is committed, and retention deletes only a prefix: a
            // missing row means it was pruned since the replay began.
            if page.first().is_none_or(|e| e.id != last + 1) {
                return Ok(CatchUp::Resync(event::ResyncReason::Retention, last, head));
            }
            for e in std::mem::take(&mut page) {
                if e.id != last + 1 {
                    break;
                }
                let frame = Frame::event(e.id, &e.kind, &e.to_frame(), e.emitted_at);
                self.replay_event(e.id, &frame.kind, &frame.wire).await?;
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
        Ok(CatchUp::Done(last))
    }

    /// Runs one read of the event log on a replay connection, giving up as soon as the socket
    /// is kicked or the server shuts down. A database that cannot serve it ends the socket with
    /// 1011.
    async fn read_log<T>(
        &mut self,
        work: impl AsyncFnOnce(&deadpool_postgres::Client) -> Result<T, crate::db::DbError>,
    ) -> Result<T, DisconnectReason> {
        let read = self.state.replays.run(REPLAY_QUERY_TIMEOUT, work);
        let result = tokio::select! {
            biased;
            _ = &mut self.shutdown => return Err(DisconnectReason::Shutdown),
            _ = &mut self.kicked => return Err(kick_reason(self.conn)),
            r = read => r,
        };
        result.map_err(|e| {
            tracing::warn!(error = %e, tenant = %self.tenant, "replay failed");
            DisconnectReason::ServerError
        })
    }

    /// As [`SocketTask::read_log`], but a query the database refused (not a lost connection) is
    /// handed back for the caller to fall back from.
    async fn read_log_or_fail<T>(
        &mut self,
        work: impl AsyncFnOnce(&tokio_postgres::Client) -> Result<T, crate::db::DbError>,
    ) -> Result<Result<T, crate::db::DbError>, DisconnectReason> {
        let read = self
            .state
            .replays
            .run(REPLAY_QUERY_TIMEOUT, async |c| Ok(work(c).await));
        let result = tokio::select! {
            biased;
            _ = &mut self.shutdown => return Err(DisconnectReason::Shutdown),
            _ = &mut self.kicked => return Err(kick_reason(self.conn)),
            r = read => r,
        };
        match result {
            Ok(Ok(value)) => Ok(Ok(value)),
            Ok(Err(crate::db::DbError::Postgres(e))) if e.as_db_error().is_some() => {
                Ok(Err(crate::db::DbError::Postgres(e)))
            }
            Ok(Err(e)) | Err(e) => {
                tracing::warn!(error = %e, tenant = %self.tenant, "reading the log failed");
                Err(DisconnectReason::ServerError)
            }
        }
    }

    /// Sends `resync_required` (the client has `since`; the tenant's latest id is `head`) and
    /// returns `head`: the client continues live from there.
    async fn resync(
        &mut self,
        reason: event::ResyncReason,
        since: i64,
        head: i64,
    ) -> Result<i64, DisconnectReason> {
        let text = event::resync_required(self.tenant, reason, since, head);
        self.write_frame(&wire::text_frame(text.as_bytes())).await?;
        self.state.metrics.resync(reason);
        self.conn.wrote(head);
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
    fn on_timer(&mut self, tuning: &Tuning) -> Result<(), DisconnectReason> {
        let now = Instant::now();
        if now >= self.last_heard + tuning.pong_timeout {
            return Err(DisconnectReason::PingTimeout);
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
fn kick_reason(conn: &Conn) -> DisconnectReason {
    match conn.kick_reason() {
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
pub(crate) fn resume_plan(
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
