//! `POST /broadcast`: explicit pushes from the web app (docs/protocol.md), validated, staged by a
//! batching writer (concurrent requests share one transaction), and answered once the sequencer
//! has numbered the event. An `Idempotency-Key` makes a retry safe on any instance.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, header};
use axum::routing::post;
use axum::{Json, Router};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{AppState, Error, auth};
use crate::db::broadcasts::{self, Broadcast, Idempotency, StageError, Staged};
use crate::db::{DbError, is_valid_tenant_slug};
use crate::listener::NumberedWaiters;

/// The body limit (docs/protocol.md, `POST /broadcast`).
pub(crate) const MAX_BODY_BYTES: usize = 256 * 1024;
/// Longest `event.type` (docs/protocol.md).
pub(crate) use crate::event::MAX_TYPE_LEN;
/// Longest `event.timestamp` accepted: an ISO 8601 string is ~30 characters; this leaves room
/// for any reasonable format while keeping junk out of every frame.
pub(crate) const MAX_TIMESTAMP_LEN: usize = 64;
/// Deepest JSON nesting accepted in a body. Real events nest 3-4 levels; this stops
/// pathological inputs long before serde_json's own recursion limit (128).
pub(crate) const MAX_JSON_DEPTH: usize = 32;
/// Requests waiting for the writer. With 32 callers this never fills; past it callers wait
/// (backpressure) rather than the queue growing.
pub(crate) const WRITER_QUEUE: usize = 1024;
/// Most broadcasts written in one transaction: amortises the commit's WAL flush over many
/// requests while keeping each transaction short.
pub(crate) const WRITER_BATCH: usize = 256;
/// A request that cannot be queued and committed within this time is answered 503; one committed
/// but not numbered by then is answered 200 without its id (it is durable and will be
/// delivered once a sequencer numbers it).
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The header that makes a retry safe (docs/protocol.md).
pub(crate) const IDEMPOTENCY_HEADER: &str = "idempotency-key";
/// Longest `Idempotency-Key`: a UUID or a request hash fits many times over; the bound keeps
/// the table's keys small.
pub(crate) const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// Routes of this group.
pub(crate) fn router() -> Router<AppState> {
    Router::new().route("/broadcast", post(broadcast))
}

#[derive(Deserialize)]
struct Request<'a> {
    tenant: String,
    #[serde(borrow)]
    event: EventIn<'a>,
}

#[derive(Deserialize)]
struct EventIn<'a> {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    timestamp: Option<String>,
    #[serde(borrow)]
    data: &'a RawValue,
}

async fn broadcast(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, Error> {
    let result = accept(&state, peer, &headers, body).await;
    let counter = if result.is_ok() {
        &state.metrics.broadcasts_accepted
    } else {
        &state.metrics.broadcasts_rejected
    };
    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    result
}

async fn accept(
    state: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, Error> {
    authorize(state.broadcast_token.as_deref(), peer, headers)?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(Error::UnsupportedMediaType);
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(Error::PayloadTooLarge(MAX_BODY_BYTES));
    }
    let bytes = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(Error::PayloadTooLarge(MAX_BODY_BYTES));
        }
        Err(_) => return Err(Error::BadRequest("could not read the request body".into())),
    };
    let idempotency_key = idempotency_key(headers)?;
    let broadcast = parse(&bytes, idempotency_key)?;
    let tenant = broadcast.tenant.clone();
    let id = match state.broadcasts.submit(broadcast).await? {
        Answer::Numbered(id) => Some(id),
        Answer::Pending => None,
        Answer::UnknownTenant => {
            return Err(Error::NotFound(format!("unknown tenant '{tenant}'")));
        }
        Answer::KeyReused => {
            return Err(Error::Unprocessable(
                "this Idempotency-Key was already used for a different request".into(),
            ));
        }
    };
    let mut reply = serde_json::json!({
        "success": true,
        "message": format!("Event broadcasted to {tenant}"),
    });
    match id {
        Some(id) => reply["id"] = id.into(),
        // Durable and on its way, but not numbered within the request's time (no sequencer
        // running right now): it reaches the POS once one is.
        None => reply["numbered"] = false.into(),
    }
    Ok(Json(reply))
}

/// The `Idempotency-Key` header, if any: 1..=255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Error> {
    let Some(value) = headers.get(IDEMPOTENCY_HEADER) else {
        return Ok(None);
    };
    let key = value.to_str().unwrap_or_default();
    let valid = (1..=MAX_IDEMPOTENCY_KEY_LEN).contains(&key.len())
        && key.bytes().all(|b| b.is_ascii_graphic());
    if !valid {
        return Err(Error::BadRequest(format!(
            "Idempotency-Key must be 1..{MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters"
        )));
    }
    Ok(Some(key.to_owned()))
}

/// docs/protocol.md, `POST /broadcast`: a configured token must be presented as `Bearer`; without one, only loopback
/// callers are accepted. The rule is shared with the admin endpoints ([`auth::authorize`]).
fn authorize(token: Option<&str>, peer: SocketAddr, headers: &HeaderMap) -> Result<(), Error> {
    auth::authorize(token, peer, headers, "broadcast")
}

/// Validates a body into a [`Broadcast`]; every problem is a 400 with a precise message.
fn parse(bytes: &[u8], idempotency_key: Option<String>) -> Result<Broadcast, Error> {
    if json_depth_exceeds(bytes, MAX_JSON_DEPTH) {
        return Err(Error::BadRequest(format!(
            "JSON nested deeper than {MAX_JSON_DEPTH} levels"
        )));
    }
    let req: Request<'_> = serde_json::from_slice(bytes)
        .map_err(|e| Error::BadRequest(format!("invalid request: {e}")))?;
    let kind = req.event.kind;
    if !crate::event::is_valid_type(&kind) {
        return Err(Error::BadRequest(format!(
            "event.type must be 1..{MAX_TYPE_LEN} characters of letters, digits, '_', '.' or '-'"
        )));
    }
    if let Some(ts) = &req.event.timestamp {
        if ts.len() > MAX_TIMESTAMP_LEN || ts.chars().any(char::is_control) {
            return Err(Error::BadRequest(format!(
                "event.timestamp must be a string of at most {MAX_TIMESTAMP_LEN} printable characters"
            )));
        }
    }
    if req.tenant.is_empty() {
        // No tenant named at all: a missing field, not an unknown tenant.
        return Err(Error::BadRequest(
            "tenant must not be empty: name the tenant's slug".into(),
        ));
    }
    if !is_valid_tenant_slug(&req.tenant) {
        // Cannot exist (the tenants table's CHECK constraint): unknown, without a query.
        return Err(Error::NotFound(format!(
            "unknown tenant '{}'",
            truncate(&req.tenant, 63)
        )));
    }
    let data = req.event.data.get().to_owned();
    let idempotency = idempotency_key.map(|key| {
        // Length-prefixed fields: no two different requests hash alike.
        let mut h = Sha256::new();
        for part in [
            req.tenant.as_str(),
            kind.as_str(),
            req.event.timestamp.as_deref().unwrap_or("\0none"),
            data.as_str(),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        Idempotency {
            key,
            request_sha256: h.finalize().into(),
        }
    });
    Ok(Broadcast {
        tenant: req.tenant,
        kind,
        timestamp: req.event.timestamp,
        data,
        idempotency,
    })
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// True when brackets nest deeper than `max` outside strings. A linear pre-scan, so a hostile
/// body costs no recursion at all.
fn json_depth_exceeds(bytes: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// How a request ended, for the handler.
#[derive(Debug)]
pub enum Answer {
    /// Numbered: its event id.
    Numbered(i64),
    /// Written, but not numbered within [`WRITE_TIMEOUT`].
    Pending,
    /// No such tenant; nothing written.
    UnknownTenant,
    /// The idempotency key names a different request; nothing written.
    KeyReused,
}

/// What the writer tells one request.
enum Written {
    /// Staged as a new row; the receiver gets its id when numbered.
    New(i64, oneshot::Receiver<i64>),
    /// Already answered: a repeat (with its id if numbered) or a refusal.
    Done(Staged),
}

type Reply = oneshot::Sender<Result<Written, WriteFailure>>;

/// Why the writer could not write a request.
enum WriteFailure {
    /// Nothing was written: the request may be retried as is.
    NotWritten,
    /// The connection was lost while committing.
    Unknown,
}

/// A queued request: what to write, until when it is worth writing, where to answer.
struct Job {
    broadcast: Broadcast,
    deadline: Instant,
    reply: Reply,
}

/// The handle /broadcast submits to; the writer task behind it batches concurrent requests.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Job>,
    waiters: Arc<NumberedWaiters>,
    pool: deadpool_postgres::Pool,
}

impl Writer {
    /// Starts the writer task on `tracker`. It stops once every `Writer` handle is gone, so
    /// requests in flight at shutdown are still committed and answered.
    pub fn spawn(
        pool: deadpool_postgres::Pool,
        waiters: Arc<NumberedWaiters>,
        tracker: &tokio_util::task::TaskTracker,
    ) -> Self {
        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        tracker.spawn(write_loop(pool.clone(), Arc::clone(&waiters), rx));
        Self { tx, waiters, pool }
    }

    /// Queues one broadcast, waits until it is staged, then until it is numbered (all within
    /// [`WRITE_TIMEOUT`]).
    pub(crate) async fn submit(&self, broadcast: Broadcast) -> Result<Answer, Error> {
        let deadline = Instant::now() + WRITE_TIMEOUT;
        let tenant = broadcast.tenant.clone();
        let key = broadcast.idempotency.as_ref().map(|k| k.key.clone());
        let (reply, answer) = oneshot::channel();
        let job = Job {
            broadcast,
            deadline,
            reply,
        };
        // Not queued in time, or the writer dropped it unwritten: nothing was written.
        tokio::time::timeout_at(deadline, self.tx.send(job))
            .await
            .map_err(|_| Error::Unavailable)?
            .map_err(|_| Error::Unavailable)?;
        let written = match answer.await {
            Ok(Ok(w)) => w,
            Ok(Err(WriteFailure::Unknown)) => return Err(Error::OutcomeUnknown),
            Ok(Err(WriteFailure::NotWritten)) | Err(_) => return Err(Error::Unavailable),
        };
        match written {
            Written::New(gid, numbered) => {
                match tokio::time::timeout_at(deadline, numbered).await {
                    Ok(Ok(id)) => Ok(Answer::Numbered(id)),
                    _ => {
                        self.waiters.forget(gid);
                        Ok(Answer::Pending)
                    }
                }
            }
            Written::Done(Staged::Repeat { id: Some(id), .. }) => Ok(Answer::Numbered(id)),
            Written::Done(Staged::Repeat { gid, id: None }) => {
                // The first request is staged but not numbered yet (or its answer passed this
                // instance before we asked): wait for it, and ask the database once at the end.
                let numbered = self.waiters.register(gid);
                if let Ok(Ok(id)) = tokio::time::timeout_at(deadline, numbered).await {
                    return Ok(Answer::Numbered(id));
                }
                self.waiters.forget(gid);
                let id = match (self.pool.get().await, key) {
                    (Ok(client), Some(key)) => broadcasts::numbered_id(&client, &tenant, &key)
                        .await
                        .ok()
                        .flatten(),
                    _ => None,
                };
                Ok(id.map_or(Answer::Pending, Answer::Numbered))
            }
            Written::Done(Staged::KeyReused) => Ok(Answer::KeyReused),
            Written::Done(Staged::UnknownTenant) => Ok(Answer::UnknownTenant),
            // The writer answers a new row with `Written::New`.
            Written::Done(Staged::New(_)) => Ok(Answer::Pending),
        }
    }
}

/// One transaction per batch: whatever is queued when the previous commit returns goes into the
/// next one, so batches grow exactly as fast as callers arrive and a lone request is not delayed.
async fn write_loop(
    pool: deadpool_postgres::Pool,
    waiters: Arc<NumberedWaiters>,
    mut rx: mpsc::Receiver<Job>,
) {
    let mut batch: Vec<Job> = Vec::with_capacity(WRITER_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < WRITER_BATCH {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        // A request whose caller has given up is not written: it would be answered 503 (never
        // written) while its event went out anyway.
        let now = Instant::now();
        let (live, expired): (Vec<Job>, Vec<Job>) = batch.drain(..).partition(|j| j.deadline > now);
        for job in expired {
            let _ = job.reply.send(Err(WriteFailure::NotWritten));
        }
        if live.is_empty() {
            continue;
        }
        let items: Vec<Broadcast> = live.iter().map(|j| j.broadcast.clone()).collect();
        let mut receivers = std::collections::HashMap::new();
        let result = match pool.get().await {
            Ok(mut client) => {
                broadcasts::stage(&mut client, &items, |gid| {
                    receivers.insert(gid, waiters.register(gid));
                })
                .await
            }
            Err(e) => Err(StageError::NotWritten(DbError::from(e))),
        };
        match result {
            Ok(outcomes) => {
                for (job, outcome) in live.into_iter().zip(outcomes) {
                    let written = match outcome {
                        Staged::New(gid) => match receivers.remove(&gid) {
                            Some(rx) => Written::New(gid, rx),
                            None => Written::Done(Staged::New(gid)),
                        },
                        other => Written::Done(other),
                    };
                    let _ = job.reply.send(Ok(written));
                }
            }
            Err(e) => {
                for gid in receivers.keys() {
                    waiters.forget(*gid);
                }
                let unknown = matches!(e, StageError::Unknown(_));
                tracing::warn!(error = %e, batch = live.len(), outcome_unknown = unknown, "broadcast batch failed");
                for job in live {
                    let failure = if unknown {
                        WriteFailure::Unknown
                    } else {
                        WriteFailure::NotWritten
                    };
                    let _ = job.reply.send(Err(failure));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_token_only_loopback_may_broadcast() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "127.0.0.1:9011".parse().unwrap());
        let peer = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(authorize(None, peer("127.0.0.1:5000"), &headers).is_ok());
        assert!(authorize(None, peer("127.0.0.2:5000"), &headers).is_ok());
        assert!(authorize(None, peer("[::1]:5000"), &headers).is_ok());
        assert!(authorize(None, peer("[::ffff:127.0.0.1]:5000"), &headers).is_ok());
        for remote in [
            "10.0.0.7:5000",
            "192.0.2.1:5000",
            "[2001:db8::1]:5000",
            "[::ffff:10.0.0.7]:5000",
        ] {
            let e = authorize(None, peer(remote), &headers).unwrap_err();
            assert_eq!(e.status(), axum::http::StatusCode::FORBIDDEN, "{remote}");
        }
        // With a token, loopback alone is not enough.
        let e = authorize(Some("0123456789abcdef"), peer("127.0.0.1:5000"), &headers).unwrap_err();
        assert_eq!(e.status(), axum::http::StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn depth_scan_ignores_brackets_in_strings() {
        assert!(!json_depth_exceeds(br#"{"a":"[[[[[[[[[[[[["}"#, 3));
        assert!(json_depth_exceeds(b"[[[[", 3));
        assert!(!json_depth_exceeds(br#"[[["\"[[["]]]"#, 3));
    }

    #[test]
    fn parse_reports_what_is_wrong() {
        let ok = parse(
            br#"{"tenant":"kitchen","event":{"type":"test_broadcast","data":{"m":1}}}"#,
            None,
        )
        .unwrap();
        assert_eq!(ok.data, r#"{"m":1}"#);
        assert!(ok.timestamp.is_none());
        let e = parse(br#"{"tenant":"kitchen","event":{"type":"x"}}"#, None).unwrap_err();
        assert!(e.to_string().contains("missing field `data`"), "{e}");
        let e = parse(
            br#"{"tenant":"kitchen","event":{"type":"bad type!","data":1}}"#,
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("event.type"), "{e}");
        let e = parse(
            br#"{"tenant":"Kitchen","event":{"type":"x","data":1}}"#,
            None,
        )
        .unwrap_err();
        assert!(matches!(e, Error::NotFound(_)));
        let e = parse(br#"{"tenant":"","event":{"type":"x","data":1}}"#, None).unwrap_err();
        assert!(matches!(e, Error::BadRequest(_)), "{e}");
        assert!(e.to_string().contains("tenant must not be empty"), "{e}");
    }
}
