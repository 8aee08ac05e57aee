//! Authentication helpers: the POS key cache, the operator-token rule shared by /broadcast
//! and the admin endpoints, and the failed-authentication limiter (429 for an address that
//! keeps presenting bad credentials).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use tracing::warn;

use super::Error;
use crate::config::Tuning;
use crate::db::DbError;
use crate::db::keys::{self, KeyIdentity};

/// How long a successful key lookup is reused. Revocation does not wait for it: the revocation
/// check evicts revoked keys and closes their sockets within seconds.
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(60);
/// Most cached keys; past it the cache starts over (a few MB at most, and a flood of distinct
/// valid keys is not a realistic load).
pub const KEY_CACHE_MAX: usize = 100_000;

/// Active keys by hash, so a reconnect storm costs no database query per connection.
#[derive(Debug, Default)]
pub struct KeyCache {
    entries: Mutex<HashMap<[u8; 32], (KeyIdentity, Instant)>>,
}

impl KeyCache {
    /// Resolves a presented key: from the cache, else from the database (and caches it).
    /// Unknown keys are not cached, so a key created a moment ago works at once.
    pub async fn resolve(
        &self,
        pool: &deadpool_postgres::Pool,
        secret: &str,
    ) -> Result<Option<KeyIdentity>, DbError> {
        let hash = keys::hash(secret);
        if let Some((identity, at)) = self.lock().get(&hash) {
            if at.elapsed() < KEY_CACHE_TTL {
                return Ok(Some(identity.clone()));
            }
        }
        let client = pool.get().await?;
        let found = keys::lookup(&**client, &hash).await?;
        if let Some(identity) = &found {
            let mut entries = self.lock();
            if entries.len() >= KEY_CACHE_MAX {
                entries.clear();
            }
            entries.insert(hash, (identity.clone(), Instant::now()));
        }
        Ok(found)
    }

    /// Ids of every cached key, for the revocation check.
    pub fn cached_ids(&self) -> Vec<String> {
        self.lock().values().map(|(k, _)| k.id.clone()).collect()
    }

    /// Forgets these keys.
    pub fn evict(&self, ids: &[String]) {
        self.lock().retain(|_, (k, _)| !ids.contains(&k.id));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], (KeyIdentity, Instant)>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Compares two secrets in time independent of where they differ: both are hashed first, so
/// even their lengths are not compared directly.
pub fn secrets_match(presented: &str, expected: &str) -> bool {
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The operator-endpoint rule (contract §4 for /broadcast, reused for /admin and /status): a
/// configured token must be presented as `Authorization: Bearer <token>` (401 otherwise);
/// without a configured token only callers on the loopback interface are accepted (403
/// otherwise). `what` names the endpoint group in the messages.
pub fn authorize(
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
        None if is_loopback(peer) => Ok(()),
        None => Err(Error::Forbidden(format!(
            "{what} requests are accepted only from loopback unless a {what} token is configured"
        ))),
    }
}

/// True for 127.0.0.0/8, ::1 and IPv4-mapped loopback (a dual-stack listener's view of
/// 127.0.0.1).
pub fn is_loopback(peer: SocketAddr) -> bool {
    match peer.ip() {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Failed authentications (answers 401 or 403 on `/ws/pos/...`, `/broadcast`, `/admin/...`
/// and `/status...`) one address
/// may make within [`AUTH_FAILURE_WINDOW`] before it is answered 429 for the cooling-off period.
/// Keys are 256-bit random, so the limit is not what makes guessing hopeless; it stops a
/// scanner from costing a database lookup per guess and flooding the logs. 50 a minute is far
/// above what a misconfigured POS reconnecting with any sane backoff (≥ 2 s) produces, so its
/// siblings behind the same NAT are not locked out by it. Override with `--auth-failure-limit`
/// (0 turns the limiter off, e.g. behind a proxy that makes every client one address).
pub const AUTH_FAILURE_LIMIT: u32 = 50;
/// The window failures are counted in; it restarts with the first failure after it ends.
pub const AUTH_FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// How long an address that hit the limit is answered 429 (with `Retry-After`): long enough
/// to make scanning pointless, short enough that a fixed POS is back within a minute.
pub const AUTH_COOLDOWN: Duration = Duration::from_secs(60);
/// Most addresses tracked at once (about 100 bytes each). When full, expired entries are
/// dropped first; if every entry is live, the table starts over (an attacker needs this many
/// addresses to do that, and then a per-address limit could not stop it anyway).
pub const AUTH_LIMITER_MAX_ADDRESSES: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct FailureWindow {
    started: Instant,
    failures: u32,
    blocked_until: Option<Instant>,
}

/// Counts failed authentications per client address and refuses an address that made too
/// many, before its credentials are even looked at (so a blocked scanner learns nothing).
/// Only failures count: any number of successful connections from one address is fine.
#[derive(Debug)]
pub struct AuthLimiter {
    limit: u32,
    window: Duration,
    cooldown: Duration,
    entries: Mutex<HashMap<IpAddr, FailureWindow>>,
}

impl AuthLimiter {
    /// A limiter allowing `limit` failures per `window`, then refusing for `cooldown`.
    /// `limit == 0` never refuses.
    pub fn new(limit: u32, window: Duration, cooldown: Duration) -> Self {
        Self {
            limit,
            window,
            cooldown,
            entries: Mutex::default(),
        }
    }

    /// The limiter a server with this tuning uses.
    pub fn from_tuning(tuning: &Tuning) -> Self {
        Self::new(
            tuning.auth_failure_limit,
            AUTH_FAILURE_WINDOW,
            tuning.auth_cooldown,
        )
    }

    /// `Err(retry_after)` while `addr` is cooling off.
    pub fn check(&self, addr: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.limit == 0 {
            return Ok(());
        }
        match self
            .lock()
            .get(&limiter_key(addr))
            .and_then(|e| e.blocked_until)
        {
            Some(until) if until > now => Err(until - now),
            _ => Ok(()),
        }
    }

    /// Counts one failure; returns true when it starts a cooling-off period.
    pub fn record_failure(&self, addr: IpAddr, now: Instant) -> bool {
        if self.limit == 0 {
            return false;
        }
        let key = limiter_key(addr);
        let mut entries = self.lock();
        if entries.len() >= AUTH_LIMITER_MAX_ADDRESSES && !entries.contains_key(&key) {
            entries.retain(|_, e| !self.expired(e, now));
            if entries.len() >= AUTH_LIMITER_MAX_ADDRESSES {
                entries.clear();
            }
        }
        let entry = entries.entry(key).or_insert(FailureWindow {
            started: now,
            failures: 0,
            blocked_until: None,
        });
        if self.expired(entry, now) {
            *entry = FailureWindow {
                started: now,
                failures: 0,
                blocked_until: None,
            };
        }
        entry.failures = entry.failures.saturating_add(1);
        if entry.failures >= self.limit && entry.blocked_until.is_none() {
            entry.blocked_until = Some(now + self.cooldown);
            return true;
        }
        false
    }

    /// Neither counting nor cooling off any more.
    fn expired(&self, e: &FailureWindow, now: Instant) -> bool {
        match e.blocked_until {
            Some(until) => until <= now,
            None => now.duration_since(e.started) >= self.window,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, FailureWindow>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The address a failure is charged to: IPv4 as is (IPv4-mapped IPv6 too), IPv6 by its /64,
/// because one IPv6 host typically controls a whole /64 and could rotate within it.
pub fn limiter_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u64::MAX as u128))),
        },
    }
}

/// Middleware on the authenticated routes: answers 429 while the caller's address is cooling
/// off, and counts every 401/403 the route answers against that address.
pub async fn limit_failed_auth(
    State(limiter): State<Arc<AuthLimiter>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(peer) = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
    else {
        return next.run(request).await;
    };
    if let Err(retry_after) = limiter.check(peer, Instant::now()) {
        // Whole seconds, rounded up, so a client that waits exactly this long is let in.
        let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        return Error::TooManyRequests(secs).into_response();
    }
    let response = next.run(request).await;
    if matches!(
        response.status(),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
    ) && limiter.record_failure(peer, Instant::now())
    {
        warn!(
            addr = %limiter_key(peer),
            limit = limiter.limit,
            cooldown = ?limiter.cooldown,
            "too many failed authentications; answering 429 during the cooldown"
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limiter_refuses_after_the_limit_until_the_cooldown_ends() {
        let limiter = AuthLimiter::new(3, Duration::from_secs(60), Duration::from_secs(30));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        assert!(!limiter.record_failure(a, t0));
        assert!(!limiter.record_failure(a, t0));
        assert!(limiter.check(a, t0).is_ok());
        assert!(
            limiter.record_failure(a, t0),
            "the third failure starts the cooldown"
        );
        assert_eq!(limiter.check(a, t0), Err(Duration::from_secs(30)));
        assert!(
            limiter.check(b, t0).is_ok(),
            "other addresses are unaffected"
        );
        let later = t0 + Duration::from_secs(30);
        assert!(limiter.check(a, later).is_ok(), "the cooldown ends");
        assert!(
            !limiter.record_failure(a, later),
            "and counting starts over"
        );
    }

    #[test]
    fn failures_spread_beyond_the_window_never_trip_the_limiter() {
        let limiter = AuthLimiter::new(3, Duration::from_secs(60), Duration::from_secs(30));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let t0 = Instant::now();
        for i in 0..10u64 {
            assert!(!limiter.record_failure(a, t0 + Duration::from_secs(31 * i)));
        }
        assert!(limiter.check(a, t0 + Duration::from_secs(310)).is_ok());
    }

    #[test]
    fn a_zero_limit_turns_the_limiter_off() {
        let limiter = AuthLimiter::new(0, Duration::from_secs(60), Duration::from_secs(30));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert!(!limiter.record_failure(a, t0));
        }
        assert!(limiter.check(a, t0).is_ok());
    }

    #[test]
    fn ipv6_is_limited_per_64_and_mapped_ipv4_as_ipv4() {
        let key = |s: &str| limiter_key(s.parse().unwrap());
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::2"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.1"), key("192.0.2.1"));
    }

    #[test]
    fn secrets_match_only_when_equal() {
        assert!(secrets_match("0123456789abcdef", "0123456789abcdef"));
        assert!(!secrets_match("0123456789abcdeX", "0123456789abcdef"));
        assert!(!secrets_match("", "0123456789abcdef"));
    }
}
