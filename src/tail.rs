//! `orderpush tail`: a POS client for people. Connects to `/ws/pos/{tenant}` with an API key,
//! hands every event to a callback (the binary prints it as pretty JSON), and reconnects by
//! itself with `?since=<last id>` and a capped backoff, so nothing is missed across a restart.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::db::{is_valid_tenant_slug, keys};
use crate::http::ws::close_code;

/// First wait before reconnecting; doubled after each failed attempt.
pub(crate) const TAIL_RETRY_FIRST: Duration = Duration::from_millis(250);
/// Longest wait between reconnection attempts: a tail left running through an outage is back
/// within 10 s of the server's return, while a down server sees one attempt per 10 s per tail.
pub(crate) const TAIL_RETRY_CAP: Duration = Duration::from_secs(10);
/// A connection that stayed up this long (or delivered an event) was healthy: the next
/// disconnect starts again from [`BACKOFF_FIRST`] rather than continuing to grow.
pub(crate) const HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// The server pings at least every 30 s (docs/protocol.md); hearing nothing for 75 s (two missed
/// pings and slack) means the connection is dead even if TCP has not noticed.
pub(crate) const SILENCE_TIMEOUT: Duration = Duration::from_secs(75);
/// A TCP + WebSocket handshake that has not completed by then is retried.
pub(crate) const TAIL_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Characters of an HTTP error body quoted in messages.
const BODY_EXCERPT_CHARS: usize = 300;

/// What to tail.
#[derive(Debug, Clone)]
pub struct Options {
    /// `ws://host:port` (or the full `ws://host:port/ws/pos/{tenant}` URL).
    pub url: String,
    /// Tenant slug.
    pub tenant: String,
    /// The POS API key (`pos_<64 hex>`).
    pub key: String,
    /// Resume after this id; None starts with live events only.
    pub since: Option<i64>,
    /// Ask for the open orders (`?snapshot=open`) where the server would otherwise answer
    /// `resync_required`, and when starting without `since`.
    pub snapshot: bool,
    /// Only these event types (`?types=`); `None`: all.
    pub types: Option<Vec<String>>,
    /// Acknowledge each event once it is printed (`{"type":"ack","id":N}`).
    pub ack: bool,
}

/// Why tailing stopped for good (every other failure is retried).
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    /// The options cannot work (bad URL, slug or key syntax).
    #[error("{0}")]
    Invalid(String),
    /// 401: no such key, or revoked. Retrying cannot help.
    #[error(
        "the server rejected the API key (HTTP 401: {0}): it is unknown or revoked; create one with `orderpush keys create --tenant TENANT`"
    )]
    Unauthorized(String),
    /// 403: a valid key of another tenant.
    #[error("the API key belongs to another tenant than '{tenant}' (HTTP 403: {body})")]
    Forbidden {
        /// The tenant asked for.
        tenant: String,
        /// The server's explanation.
        body: String,
    },
    /// Another 4xx: the request itself is wrong (path, `since`).
    #[error("the server refused the connection (HTTP {status}: {body})")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// The server's explanation.
        body: String,
    },
    /// Closed with 1008: the key was revoked while connected.
    #[error("the server closed the connection: the API key was revoked (close code 1008)")]
    Revoked,
    /// The event callback failed (e.g. stdout closed).
    #[error("cannot write the event: {0}")]
    Output(#[from] std::io::Error),
}

/// What one connection attempt asks for besides the tenant.
#[derive(Debug, Clone, Default)]
pub struct Query<'a> {
    /// Resume after this id.
    pub since: Option<i64>,
    /// `snapshot=open`.
    pub snapshot: bool,
    /// `types=a,b`.
    pub types: Option<&'a [String]>,
}

/// Builds the WebSocket URL for one connection attempt.
pub fn endpoint(base: &str, tenant: &str, query: &Query<'_>) -> Result<String, TailError> {
    let base = base.trim();
    let rest = if let Some(r) = base.strip_prefix("ws://") {
        r
    } else if base.starts_with("wss://") {
        return Err(TailError::Invalid(
            "wss:// is not supported by this build of `orderpush tail`; connect to the service's \
             own ws:// port (e.g. over an SSH tunnel) instead"
                .into(),
        ));
    } else {
        return Err(TailError::Invalid(format!(
            "--url must start with ws:// (e.g. ws://127.0.0.1:9011), got '{base}'"
        )));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.is_empty() || rest.contains(['?', '#']) {
        return Err(TailError::Invalid(format!(
            "--url must be ws://HOST:PORT (no query), got '{base}'"
        )));
    }
    let expected = format!("/ws/pos/{tenant}");
    let path = match path.trim_end_matches('/') {
        "" => expected,
        p if p == expected => expected,
        p => {
            return Err(TailError::Invalid(format!(
                "--url path '{p}' is not {expected}; give just ws://HOST:PORT"
            )));
        }
    };
    let mut params = Vec::new();
    if let Some(s) = query.since {
        params.push(format!("since={s}"));
    }
    if query.snapshot {
        params.push("snapshot=open".to_owned());
    }
    if let Some(types) = query.types {
        if types.is_empty() || !types.iter().all(|t| crate::event::is_valid_type(t)) {
            return Err(TailError::Invalid(
                "--types must be event types of 1..64 letters, digits, '_', '.' or '-', separated by commas".into(),
            ));
        }
        params.push(format!("types={}", types.join(",")));
    }
    Ok(if params.is_empty() {
        format!("ws://{authority}{path}")
    } else {
        format!("ws://{authority}{path}?{}", params.join("&"))
    })
}

/// How one connection ended.
enum Ended {
    /// Retry, after the backoff (the reason is logged).
    Retry(String),
    /// Stop for good.
    Fatal(TailError),
    /// `shutdown` was cancelled.
    Shutdown,
}

/// Tails until `shutdown` is cancelled or a failure that retrying cannot fix. Every event goes to
/// `on_event` in order, parsed and as the exact text received; the last `id` seen is the next
/// `since`.
pub async fn run(
    options: Options,
    mut on_event: impl FnMut(&Value, &str) -> std::io::Result<()>,
    shutdown: CancellationToken,
) -> Result<(), TailError> {
    if !is_valid_tenant_slug(&options.tenant) {
        return Err(TailError::Invalid(format!(
            "'{}' is not a tenant slug (lower-case letters, digits and '-')",
            options.tenant
        )));
    }
    if !keys::is_well_formed(&options.key) {
        return Err(TailError::Invalid(
            "the key must look like pos_<64 hex digits> (as printed by `orderpush keys create`)"
                .into(),
        ));
    }
    if options.since.is_some_and(|s| s < 0) {
        return Err(TailError::Invalid("--since must be 0 or more".into()));
    }
    let query = |since| Query {
        since,
        snapshot: options.snapshot,
        types: options.types.as_deref(),
    };
    endpoint(&options.url, &options.tenant, &query(None))?;
    let mut since = options.since;
    let mut backoff = Backoff::new(TAIL_RETRY_FIRST, TAIL_RETRY_CAP);
    loop {
        let url = endpoint(&options.url, &options.tenant, &query(since))?;
        let started = Instant::now();
        let mut delivered = false;
        let ended = session(
            &url,
            &options,
            &mut since,
            &mut delivered,
            &mut on_event,
            &shutdown,
        )
        .await;
        let reason = match ended {
            Ended::Shutdown => return Ok(()),
            Ended::Fatal(e) => return Err(e),
            Ended::Retry(reason) => reason,
        };
        if delivered || started.elapsed() >= HEALTHY_AFTER {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        let resume = match since {
            Some(s) => format!("since={s}"),
            None => "live only (no event seen yet to resume from)".into(),
        };
        warn!(
            "{reason}; reconnecting in {} ms, {resume}",
            delay.as_millis()
        );
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

async fn session(
    url: &str,
    options: &Options,
    since: &mut Option<i64>,
    delivered: &mut bool,
    on_event: &mut impl FnMut(&Value, &str) -> std::io::Result<()>,
    shutdown: &CancellationToken,
) -> Ended {
    let mut request = match url.into_client_request() {
        Ok(r) => r,
        Err(e) => return Ended::Fatal(TailError::Invalid(format!("bad URL {url}: {e}"))),
    };
    match options.key.parse() {
        Ok(v) => {
            request.headers_mut().insert("X-API-Key", v);
        }
        Err(_) => return Ended::Fatal(TailError::Invalid("the key is not a valid header".into())),
    }
    let connect = tokio::time::timeout(
        TAIL_CONNECT_TIMEOUT,
        tokio_tungstenite::connect_async(request),
    );
    let mut ws = tokio::select! {
        _ = shutdown.cancelled() => return Ended::Shutdown,
        r = connect => match r {
            Err(_) => return Ended::Retry(format!("no answer from {url} within {} s", TAIL_CONNECT_TIMEOUT.as_secs())),
            Ok(Ok((ws, _))) => ws,
            Ok(Err(tungstenite::Error::Http(resp))) => return refused(options, resp.status().as_u16(), resp.body().as_deref()),
            Ok(Err(e)) => return Ended::Retry(format!("cannot connect to {url}: {e}")),
        }
    };
    info!("connected to {url}");
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "tail stopped".into() })).await;
                return Ended::Shutdown;
            }
            r = tokio::time::timeout(SILENCE_TIMEOUT, ws.next()) => r,
        };
        let msg = match next {
            Err(_) => {
                return Ended::Retry(format!(
                    "nothing heard for {} s (not even a ping)",
                    SILENCE_TIMEOUT.as_secs()
                ));
            }
            Ok(None) => return Ended::Retry("the connection ended without a close frame".into()),
            Ok(Some(Err(e))) => return Ended::Retry(format!("the connection failed: {e}")),
            Ok(Some(Ok(m))) => m,
        };
        match msg {
            Message::Text(text) => {
                let value = serde_json::from_str::<Value>(&text)
                    .unwrap_or_else(|_| Value::String(text.to_string()));
                let id = value.get("id").and_then(Value::as_i64);
                let kind = value
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                // Every frame with an id is a position to resume from (for `ready` and
                // `snapshot_end` too: a filtered socket's position moves past what it skipped).
                if let Some(id) = id {
                    *since = Some(id);
                }
                *delivered = true;
                if kind == "ready" {
                    info!("caught up at id {}", id.unwrap_or(0));
                    continue;
                }
                if let Err(e) = on_event(&value, &text) {
                    return Ended::Fatal(e.into());
                }
                // Acknowledged once printed; the snapshot's frames are not events.
                let is_event = !matches!(kind, "order_snapshot" | "snapshot_end");
                if let (true, true, Some(id)) = (options.ack, is_event, id) {
                    let ack = serde_json::json!({"type": "ack", "id": id}).to_string();
                    if let Err(e) = ws.send(Message::Text(ack.into())).await {
                        return Ended::Retry(format!("the connection failed: {e}"));
                    }
                }
            }
            Message::Close(frame) => {
                let (code, reason) = frame
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                if code == close_code::POLICY {
                    return Ended::Fatal(TailError::Revoked);
                }
                return Ended::Retry(format!(
                    "the server closed the connection ({code}: {})",
                    if reason.is_empty() {
                        close_meaning(code)
                    } else {
                        &reason
                    }
                ));
            }
            // Pings are answered by tungstenite itself on the next read.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            Message::Binary(_) => warn!("ignoring a binary frame (events are text)"),
        }
    }
}

fn refused(options: &Options, status: u16, body: Option<&[u8]>) -> Ended {
    let body = body
        .map(|b| {
            let text = String::from_utf8_lossy(b);
            // The service answers {"success": false, "error": "..."}; show just the error.
            serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_else(|| text.chars().take(BODY_EXCERPT_CHARS).collect())
        })
        .unwrap_or_default();
    match status {
        401 => Ended::Fatal(TailError::Unauthorized(body)),
        403 => Ended::Fatal(TailError::Forbidden {
            tenant: options.tenant.clone(),
            body,
        }),
        // 408 and 429 are worth retrying; any other 4xx means the request is wrong.
        408 | 429 => Ended::Retry(format!("the server answered HTTP {status}: {body}")),
        400..=499 => Ended::Fatal(TailError::Rejected { status, body }),
        _ => Ended::Retry(format!("the server answered HTTP {status}: {body}")),
    }
}

/// What a close code from orderpush means, for the log line.
pub(crate) fn close_meaning(code: u16) -> &'static str {
    match code {
        close_code::GOING_AWAY => "server shutting down",
        close_code::POLICY => "API key revoked",
        close_code::INTERNAL => "server error",
        close_code::TRY_AGAIN_LATER => "client too slow",
        1000 => "normal closure",
        1005 => "no code",
        _ => "unexpected code",
    }
}

/// Indents JSON text two spaces per level without re-encoding it: keys keep the order and
/// numbers the spelling the server sent (`45.00` stays `45.00`). The input must be valid JSON.
pub fn pretty(json: &str) -> String {
    let mut out = String::with_capacity(json.len() * 2);
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.extend(std::iter::repeat_n(' ', depth * 2));
    };
    let mut chars = json.chars().peekable();
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                // Keep empty containers on one line: `[]`, `{}`.
                while chars.peek().is_some_and(|c| c.is_whitespace()) {
                    chars.next();
                }
                if matches!(chars.peek(), Some('}') | Some(']')) {
                    out.push(chars.next().unwrap_or_default());
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_whitespace() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pretty_keeps_order_and_number_spelling() {
        let raw = r#"{"type":"new_order","data":{"total":45.00,"items":[],"o":{},"s":"a,\"b\":{"},"id":1}"#;
        let p = pretty(raw);
        assert_eq!(
            p,
            "{\n  \"type\": \"new_order\",\n  \"data\": {\n    \"total\": 45.00,\n    \"items\": [],\n    \"o\": {},\n    \"s\": \"a,\\\"b\\\":{\"\n  },\n  \"id\": 1\n}"
        );
        let a: Value = serde_json::from_str(raw).unwrap();
        let b: Value = serde_json::from_str(&p).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn endpoint_accepts_a_base_url_and_rejects_others() {
        assert_eq!(
            endpoint("ws://h:9011", "kitchen", &Query::default()).unwrap(),
            "ws://h:9011/ws/pos/kitchen"
        );
        assert_eq!(
            endpoint(
                "ws://h:9011/",
                "kitchen",
                &Query {
                    since: Some(7),
                    ..Query::default()
                }
            )
            .unwrap(),
            "ws://h:9011/ws/pos/kitchen?since=7"
        );
        assert_eq!(
            endpoint(
                "ws://h:9011/ws/pos/kitchen",
                "kitchen",
                &Query {
                    since: Some(0),
                    snapshot: true,
                    types: Some(&["new_order".to_owned(), "x.y".to_owned()]),
                }
            )
            .unwrap(),
            "ws://h:9011/ws/pos/kitchen?since=0&snapshot=open&types=new_order,x.y"
        );
        for bad in [
            "http://h:9011",
            "wss://h",
            "ws://",
            "ws://h/other",
            "ws://h/ws/pos/bar",
            "ws://h?x=1",
        ] {
            assert!(
                endpoint(bad, "kitchen", &Query::default()).is_err(),
                "{bad}"
            );
        }
    }
}
