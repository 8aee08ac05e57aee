//! Authentication helpers: the POS key cache and the operator-token rule shared by /broadcast
//! and the admin endpoints.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, header};

use sha2::{Digest, Sha256};

use super::Error;
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

#[cfg(test)]
mod tests {
    use super::secrets_match;

    #[test]
    fn secrets_match_only_when_equal() {
        assert!(secrets_match("0123456789abcdef", "0123456789abcdef"));
        assert!(!secrets_match("0123456789abcdeX", "0123456789abcdef"));
        assert!(!secrets_match("", "0123456789abcdef"));
    }
}
