//! `POST /broadcast`: explicit pushes from the web app (contract §4), validated, then written to
//! the event log by a batching writer so that concurrent requests share one transaction.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, header};
use axum::routing::post;
use axum::{Json, Router};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};

use super::{AppState, Error, auth};
use crate::db::events::{self, Broadcast};
use crate::db::{DbError, is_valid_tenant_slug};

/// Contract §4: the body limit.
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// Longest `event.type` (contract §4).
pub const MAX_TYPE_LEN: usize = 64;
/// Longest `event.timestamp` accepted: an ISO 8601 string is ~30 characters; this leaves room
/// for any reasonable format while keeping junk out of every frame.
pub const MAX_TIMESTAMP_LEN: usize = 64;
/// Deepest JSON nesting accepted in a body. Real events nest 3-4 levels; this stops
/// pathological inputs long before serde_json's own recursion limit (128).
pub const MAX_JSON_DEPTH: usize = 32;
/// Requests waiting for the writer. With 32 callers this never fills; past it callers wait
/// (backpressure) rather than the queue growing.
pub const WRITER_QUEUE: usize = 1024;
/// Most broadcasts written in one transaction: amortises the commit's WAL flush over many
/// requests while keeping each transaction short.
pub const WRITER_BATCH: usize = 256;
/// A request that cannot be queued and committed within this time is answered 503.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Routes of this group.
pub fn router() -> Router<AppState> {
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
    let broadcast = parse(&bytes)?;
    let tenant = broadcast.tenant.clone();
    match state.broadcasts.submit(broadcast).await? {
        Some(id) => Ok(Json(serde_json::json!({
            "success": true,
            "message": format!("Event broadcasted to {tenant}"),
            "id": id,
        }))),
        None => Err(Error::NotFound(format!("unknown tenant '{tenant}'"))),
    }
}

/// Contract §4: a configured token must be presented as `Bearer`; without one, only loopback
/// callers are accepted. The rule is shared with the admin endpoints ([`auth::authorize`]).
fn authorize(token: Option<&str>, peer: SocketAddr, headers: &HeaderMap) -> Result<(), Error> {
    auth::authorize(token, peer, headers, "broadcast")
}

/// Validates a body into a [`Broadcast`]; every problem is a 400 with a precise message.
fn parse(bytes: &[u8]) -> Result<Broadcast, Error> {
    if json_depth_exceeds(bytes, MAX_JSON_DEPTH) {
        return Err(Error::BadRequest(format!(
            "JSON nested deeper than {MAX_JSON_DEPTH} levels"
        )));
    }
    let req: Request<'_> = serde_json::from_slice(bytes)
        .map_err(|e| Error::BadRequest(format!("invalid request: {e}")))?;
    let kind = req.event.kind;
    let valid_type = (1..=MAX_TYPE_LEN).contains(&kind.len())
        && kind
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !valid_type {
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
    Ok(Broadcast {
        tenant: req.tenant,
        kind,
        timestamp: req.event.timestamp,
        data: req.event.data.get().to_owned(),
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

type Reply = oneshot::Sender<Result<Option<i64>, ()>>;

/// The handle /broadcast submits to; the writer task behind it batches concurrent requests.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<(Broadcast, Reply)>,
}

impl Writer {
    /// Starts the writer task on `tracker`. It stops once every `Writer` handle is gone, so
    /// requests in flight at shutdown are still committed and answered.
    pub fn spawn(pool: deadpool_postgres::Pool, tracker: &tokio_util::task::TaskTracker) -> Self {
        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        tracker.spawn(write_loop(pool, rx));
        Self { tx }
    }

    /// Queues one broadcast and waits until it is committed. `Ok(None)`: unknown tenant.
    pub async fn submit(&self, b: Broadcast) -> Result<Option<i64>, Error> {
        let (reply, answer) = oneshot::channel();
        let work = async {
            self.tx
                .send((b, reply))
                .await
                .map_err(|_| Error::Unavailable)?;
            answer
                .await
                .map_err(|_| Error::Unavailable)?
                .map_err(|()| Error::Unavailable)
        };
        tokio::time::timeout(WRITE_TIMEOUT, work)
            .await
            .map_err(|_| Error::Unavailable)?
    }
}

/// One transaction per batch: whatever is queued when the previous commit returns goes into the
/// next one, so batches grow exactly as fast as callers arrive and a lone request is not delayed.
async fn write_loop(pool: deadpool_postgres::Pool, mut rx: mpsc::Receiver<(Broadcast, Reply)>) {
    let mut batch: Vec<(Broadcast, Reply)> = Vec::with_capacity(WRITER_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < WRITER_BATCH {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        let (items, replies): (Vec<Broadcast>, Vec<Reply>) = batch.drain(..).unzip();
        match write_batch(&pool, &items).await {
            Ok(ids) => {
                for (reply, id) in replies.into_iter().zip(ids) {
                    let _ = reply.send(Ok(id));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, batch = items.len(), "broadcast batch failed; answering 503");
                for reply in replies {
                    let _ = reply.send(Err(()));
                }
            }
        }
    }
}

async fn write_batch(
    pool: &deadpool_postgres::Pool,
    items: &[Broadcast],
) -> Result<Vec<Option<i64>>, DbError> {
    let mut client = pool.get().await?;
    events::append_broadcasts(&mut client, items).await
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
        let ok = parse(br#"{"tenant":"kitchen","event":{"type":"test_broadcast","data":{"m":1}}}"#)
            .unwrap();
        assert_eq!(ok.data, r#"{"m":1}"#);
        assert!(ok.timestamp.is_none());
        let e = parse(br#"{"tenant":"kitchen","event":{"type":"x"}}"#).unwrap_err();
        assert!(e.to_string().contains("missing field `data`"), "{e}");
        let e =
            parse(br#"{"tenant":"kitchen","event":{"type":"bad type!","data":1}}"#).unwrap_err();
        assert!(e.to_string().contains("event.type"), "{e}");
        let e = parse(br#"{"tenant":"Kitchen","event":{"type":"x","data":1}}"#).unwrap_err();
        assert!(matches!(e, Error::NotFound(_)));
        let e = parse(br#"{"tenant":"","event":{"type":"x","data":1}}"#).unwrap_err();
        assert!(matches!(e, Error::BadRequest(_)), "{e}");
        assert!(e.to_string().contains("tenant must not be empty"), "{e}");
    }
}
