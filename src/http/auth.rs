//! Authentication: the operator rule shared by /broadcast, /admin and /status (a token, or a
//! caller that is really local), POS key verification through the key cache, and the middleware
//! that charges bad credentials to the caller's address and throttles it (429).

pub mod limiter;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use tracing::warn;

pub use crate::revocation::key_cache::REVOCATION_FRESHNESS;
pub(crate) use crate::revocation::key_cache::{KeyCache, UNVERIFIABLE_RETRY_AFTER, VerifiedKey};
pub use limiter::{AUTH_FAILURE_WINDOW, BLOCKED_LOOKUP_INTERVAL};
pub(crate) use limiter::{AuthLimiter, limiter_key};

use super::{AppState, Error};
use crate::db::keys;

/// Headers a proxy adds to say whom it forwards for. A request carrying any of them came through
/// a proxy, so its loopback peer address says nothing about the real caller.
pub(crate) const PROXY_HEADERS: [&str; 3] = ["forwarded", "x-forwarded-for", "x-real-ip"];

/// Response marker: this 401/403 is not a credential failure (e.g. a caller refused for not being
/// local), so the limiter does not count it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NotCounted;

/// Response marker: the database refused this key; its fingerprint lets the limiter recognise
/// the same bad key from the same address without another lookup.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BadKey(pub u64);

/// Compares two secrets in time independent of where they differ: both are hashed first, so
/// even their lengths are not compared directly.
pub(crate) fn secrets_match(presented: &str, expected: &str) -> bool {
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The operator-endpoint rule (/broadcast, and with its own token /admin and /status): a
/// configured token must be presented as `Authorization: Bearer <token>` (401 otherwise) and
/// then nothing else matters; without a configured token only local callers are accepted (403
/// otherwise, see [`local_caller`]). `what` names the endpoint group in the messages.
pub(crate) fn authorize(
    token: Option<&str>,
    peer: SocketAddr,
    headers: &HeaderMap,
    what: &str,
) -> Result<(), Error> {
    match token {
        Some(expected) => {
            let presented = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            match presented {
                Some(p) if secrets_match(p, expected) => Ok(()),
                Some(_) => Err(Error::Unauthorized(format!("invalid {what} token"))),
                None => Err(Error::Unauthorized(
                    "missing Authorization: Bearer <token>".into(),
                )),
            }
        }
        None => local_caller(peer, headers).map_err(|why| {
            Error::NotLocal(format!(
                "{what} requests are accepted only from local callers unless a {what} token is \
                 configured: {why}"
            ))
        }),
    }
}

/// `Ok` when the caller is on this machine, as far as can be told: a loopback peer, no proxy
/// header ([`PROXY_HEADERS`]: behind a proxy or TLS terminator on the same host every caller is
/// a loopback peer), and exactly one `Host` naming this machine ([`is_local_host`]: a browser
/// tricked by DNS rebinding sends the attacker's host name). A request without `Host` is
/// refused: HTTP/1.1 requires it, and every real client (curl, browsers, HTTP libraries) sends
/// one, so its absence says nothing good about the caller. `Err` says why, for the 403.
pub(crate) fn local_caller(peer: SocketAddr, headers: &HeaderMap) -> Result<(), String> {
    if !is_loopback(peer) {
        return Err("the caller is not on the loopback interface".into());
    }
    if let Some(name) = PROXY_HEADERS.iter().find(|h| headers.contains_key(**h)) {
        return Err(format!(
            "the request came through a proxy (it carries {name}); configure a token"
        ));
    }
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) => Err("the request has no Host header".into()),
        (Some(host), None) if host.to_str().is_ok_and(is_local_host) => Ok(()),
        _ => Err("its Host is not localhost or an IP address".into()),
    }
}

/// True for a `Host` naming this machine without DNS: `localhost` (any case) or an IP literal
/// (`127.0.0.1`, `[::1]`), each with an optional port. A DNS name, even `localhost.` or
/// `localhost.example`, could resolve anywhere.
pub(crate) fn is_local_host(host: &str) -> bool {
    let valid_port = |p: &str| !p.is_empty() && p.len() <= 5 && p.parse::<u16>().is_ok();
    let port_ok = |rest: &str| rest.is_empty() || rest.strip_prefix(':').is_some_and(valid_port);
    if let Some(bracketed) = host.strip_prefix('[') {
        return bracketed
            .split_once(']')
            .is_some_and(|(ip, rest)| ip.parse::<Ipv6Addr>().is_ok() && port_ok(rest));
    }
    let (name, rest) = match host.find(':') {
        Some(i) => host.split_at(i),
        None => (host, ""),
    };
    port_ok(rest) && (name.eq_ignore_ascii_case("localhost") || name.parse::<Ipv4Addr>().is_ok())
}

/// True for 127.0.0.0/8, ::1 and IPv4-mapped loopback (a dual-stack listener's view of
/// 127.0.0.1).
pub(crate) fn is_loopback(peer: SocketAddr) -> bool {
    match peer.ip() {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// The start-up warnings for a service reachable beyond this host with an operator token unset:
/// those endpoints then answer only direct local callers, which is easy to mistake for "open"
/// (or to open by mistake through a local proxy). One message per unset token; none when
/// `listen` is a loopback address.
pub(crate) fn exposure_warnings(
    listen: SocketAddr,
    broadcast_token_set: bool,
    admin_token_set: bool,
) -> Vec<String> {
    if is_loopback(listen) {
        return Vec::new();
    }
    let unset = [
        (broadcast_token_set, "--broadcast-token", "POST /broadcast"),
        (admin_token_set, "--admin-token", "/admin and /status"),
    ];
    unset
        .iter()
        .filter(|(set, _, _)| !set)
        .map(|(_, flag, endpoints)| {
            format!(
                "listening on {listen}, which is not a loopback address, without {flag}: only \
                 direct local callers (loopback, no proxy headers, a local Host) may use \
                 {endpoints}; set {flag} to let other hosts or a reverse proxy in"
            )
        })
        .collect()
}

/// A refused POS key: the answer, and the key's fingerprint when the database refused it.
#[derive(Debug)]
pub(crate) struct KeyRefusal {
    /// What the client is told.
    pub error: Error,
    /// Set when the database said the key is unknown or revoked.
    pub bad_key: Option<u64>,
}

impl From<Error> for KeyRefusal {
    fn from(error: Error) -> Self {
        Self {
            error,
            bad_key: None,
        }
    }
}

impl IntoResponse for KeyRefusal {
    fn into_response(self) -> Response {
        let mut response = self.error.into_response();
        if let Some(fingerprint) = self.bad_key {
            response.extensions_mut().insert(BadKey(fingerprint));
        }
        response
    }
}

/// Verifies a presented POS key (already checked for shape): from the key cache when it may be
/// trusted, else from the database. A caller whose address is cooling off may cause a lookup
/// only as [`AuthLimiter::permit_lookup`] allows (429 otherwise). A key the database refused
/// is 401; a key that cannot be verified because the database is unreachable is 503 with
/// `Retry-After`, never 401 (a POS stops for good on 401).
pub(crate) async fn verify_key(
    state: &AppState,
    caller: Option<&Caller>,
    secret: &str,
) -> Result<VerifiedKey, KeyRefusal> {
    let hash = keys::hash(secret);
    let generation = match state.keys.cached(&hash) {
        Ok(verified) => return Ok(verified),
        Err(generation) => generation,
    };
    let fingerprint = limiter::fingerprint(&hash);
    if let Some(caller) = caller {
        caller
            .limiter
            .permit_lookup(caller.addr, fingerprint, Instant::now())
            .map_err(|retry_after| Error::TooManyRequests(whole_seconds(retry_after)))?;
    }
    state.metrics.key_lookups.fetch_add(1, Ordering::Relaxed);
    match state.keys.lookup(&state.pool, &hash, generation).await {
        Ok(Some(verified)) => Ok(verified),
        Ok(None) => Err(KeyRefusal {
            error: Error::Unauthorized("invalid API key".into()),
            bad_key: Some(fingerprint),
        }),
        // Whatever failed (no connection, a connection terminated mid-query, a timeout), the key
        // is not known to be bad: the client must retry, not give up.
        Err(e) => {
            warn!(error = %e, "could not look up a POS key; answering 503");
            Err(Error::KeyUnverifiable(whole_seconds(UNVERIFIABLE_RETRY_AFTER)).into())
        }
    }
}

/// The caller's address and the limiter it is charged to, handed to handlers by
/// [`limit_failed_auth`] as a request extension.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    limiter: Arc<AuthLimiter>,
    addr: IpAddr,
}

/// Whole seconds, rounded up, so a client that waits exactly this long is let in.
fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Middleware on the authenticated routes. Every 401/403 a route answers for bad credentials
/// (not those marked [`NotCounted`]) is charged to the caller's address; while the address is
/// cooling off, such answers become 429 with `Retry-After`. Valid credentials pass whatever
/// the address did, so one broken or hostile client cannot lock out the others behind the same
/// address; routes that cost a lookup per attempt bound it through [`Caller`].
pub(crate) async fn limit_failed_auth(
    State(limiter): State<Arc<AuthLimiter>>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(peer) = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
    else {
        return next.run(request).await;
    };
    let blocked = limiter.check(peer, Instant::now()).is_err();
    request.extensions_mut().insert(Caller {
        limiter: Arc::clone(&limiter),
        addr: peer,
    });
    let response = next.run(request).await;
    let credential_failure = matches!(
        response.status(),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
    ) && response.extensions().get::<NotCounted>().is_none();
    if !credential_failure {
        return response;
    }
    let now = Instant::now();
    let bad_key = response.extensions().get::<BadKey>().map(|b| b.0);
    if limiter.record_failure(peer, now, bad_key) {
        warn!(
            addr = %limiter_key(peer),
            limit = limiter.limit(),
            cooldown = ?limiter.cooldown(),
            "too many failed authentications; bad credentials from this address are answered 429 during the cooldown"
        );
    }
    match limiter.check(peer, now) {
        Err(retry_after) if blocked => {
            Error::TooManyRequests(whole_seconds(retry_after)).into_response()
        }
        _ => response,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn peer(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn with_host(host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        h
    }

    #[test]
    fn secrets_match_only_when_equal() {
        assert!(secrets_match("0123456789abcdef", "0123456789abcdef"));
        assert!(!secrets_match("0123456789abcdeX", "0123456789abcdef"));
        assert!(!secrets_match("", "0123456789abcdef"));
    }

    #[test]
    fn local_hosts_are_localhost_and_ip_literals() {
        for ok in [
            "localhost",
            "LocalHost:9011",
            "127.0.0.1",
            "127.0.0.1:9011",
            "[::1]",
            "[::1]:9011",
            "10.1.2.3:80",
            "[2001:db8::1]:443",
        ] {
            assert!(is_local_host(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.example",
            "evil.example:9011",
            "localhost.",
            "localhost.evil.example",
            "localhost:",
            "localhost:99999",
            "localhost:90x1",
            "localhost:9011:1",
            "127.0.0.1.nip.io",
            "127.1",
            "::1",
            "[::1",
            "[::1]x",
            "[evil.example]",
            " localhost",
        ] {
            assert!(!is_local_host(bad), "{bad:?}");
        }
    }

    #[test]
    fn without_a_token_only_truly_local_callers_pass() {
        let local = with_host("127.0.0.1:9011");
        assert!(authorize(None, peer("127.0.0.1:5000"), &local, "broadcast").is_ok());
        assert!(authorize(None, peer("[::ffff:127.0.0.1]:5000"), &local, "broadcast").is_ok());
        let refused = |peer_addr: &str, headers: &HeaderMap| {
            let e = authorize(None, peer(peer_addr), headers, "broadcast").unwrap_err();
            assert!(matches!(e, Error::NotLocal(_)), "{e:?}");
            assert_eq!(e.status(), StatusCode::FORBIDDEN);
        };
        refused("10.0.0.7:5000", &local);
        refused("[2001:db8::1]:5000", &local);
        for proxy_header in PROXY_HEADERS {
            let mut h = local.clone();
            h.insert(proxy_header, HeaderValue::from_static("203.0.113.7"));
            refused("127.0.0.1:5000", &h);
        }
        refused("127.0.0.1:5000", &with_host("evil.example"));
        refused("127.0.0.1:5000", &HeaderMap::new());
        let mut two = local.clone();
        two.append(header::HOST, HeaderValue::from_static("evil.example"));
        refused("127.0.0.1:5000", &two);
    }

    #[test]
    fn with_a_token_the_token_alone_decides() {
        let token = "0123456789abcdef";
        let mut h = with_host("evil.example");
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
        let e = authorize(Some(token), peer("127.0.0.1:5000"), &h, "admin").unwrap_err();
        assert_eq!(e.status(), StatusCode::UNAUTHORIZED);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        assert!(authorize(Some(token), peer("198.51.100.1:5000"), &h, "admin").is_ok());
    }

    #[test]
    fn exposure_is_warned_once_per_unset_token_off_loopback() {
        let any = peer("0.0.0.0:9011");
        assert!(exposure_warnings(peer("127.0.0.1:9011"), false, false).is_empty());
        assert!(exposure_warnings(peer("[::1]:9011"), false, false).is_empty());
        assert!(exposure_warnings(any, true, true).is_empty());
        let both = exposure_warnings(any, false, false);
        assert_eq!(both.len(), 2);
        assert!(both[0].contains("--broadcast-token") && both[1].contains("--admin-token"));
        let admin_only = exposure_warnings(peer("[::]:9011"), true, false);
        assert_eq!(admin_only.len(), 1);
        assert!(admin_only[0].contains("--admin-token"));
    }
}
