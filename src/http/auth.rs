//! Authentication helpers: the POS key cache and the /broadcast token check.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

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
