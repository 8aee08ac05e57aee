//! The POS key cache: keys the database confirmed, trusted only as long as revocation can be
//! checked (the revocation watcher, [`crate::revocation`], feeds it), so a changed key is refused
//! at once and a key that cannot be verified is answered 503, never a wrong 401.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::db::DbError;
use crate::db::keys::{self, KeyIdentity};

/// Longest a cache entry is used without the database confirming it again, however healthy the
/// revocation watcher looks; also how long an unused entry is kept. While the watcher is live,
/// its periodic check re-confirms every entry in use long before this.
pub(crate) const KEY_CACHE_TTL: Duration = Duration::from_secs(60);
/// Most cached keys (about 200 bytes each, so 20 MB at most). Only keys the database confirmed
/// get in, so filling it takes that many valid keys in use within a minute; past it, unused
/// entries are dropped first and, if all are in use, the cache starts over.
pub(crate) const KEY_CACHE_MAX: usize = 100_000;
/// When no revocation check has succeeded for this long (the database is unreachable), only
/// entries the database confirmed within this window are trusted; other keys cannot be verified
/// and get 503 with Retry-After. 10 s is five missed checks at the default 2 s interval: one
/// slow query does not trip it, and a key revoked during an outage is refused at most 10 s late.
pub const REVOCATION_FRESHNESS: Duration = Duration::from_secs(10);
/// The Retry-After of that 503: about the revocation watcher's longest reconnect delay (5 s),
/// after which the database is worth asking again.
pub(crate) const UNVERIFIABLE_RETRY_AFTER: Duration = Duration::from_secs(5);
/// How long a key change is remembered, for the connections that were being authenticated
/// while it arrived (a handshake takes milliseconds; a minute is generous).
const CHANGE_MEMORY: Duration = Duration::from_secs(60);

/// A key the database confirmed, and the cache's change generation when the check began (what
/// [`KeyCache::still_valid`] compares against once the socket is registered).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedKey {
    /// Who the key is and which tenant it may read.
    pub identity: KeyIdentity,
    /// Key changes recorded up to this generation were known when the key was verified.
    pub generation: u64,
}

#[derive(Debug)]
struct Entry {
    identity: KeyIdentity,
    /// When the database last confirmed it (the start of that query: conservative).
    verified_at: Instant,
    used_at: Instant,
}

/// A key change this instance learned of: the tenant the key may read now (`None` = revoked or
/// deleted).
#[derive(Debug)]
struct Change {
    generation: u64,
    tenant: Option<String>,
    at: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<[u8; 32], Entry>,
    changes: HashMap<String, Change>,
    generation: u64,
    /// When the watcher's current LISTEN took effect; `None` while it has no connection.
    /// Every change after it is notified, so entries confirmed after it stay trustworthy.
    live_since: Option<Instant>,
    /// Start of the last revocation check that succeeded.
    last_check: Option<Instant>,
}

impl Inner {
    /// Whether an entry may be used without asking the database.
    fn trusts(&self, e: &Entry, now: Instant) -> bool {
        let age = now.saturating_duration_since(e.verified_at);
        if age >= KEY_CACHE_TTL {
            return false;
        }
        if age < REVOCATION_FRESHNESS {
            return true;
        }
        let checks_succeed = self
            .last_check
            .is_some_and(|at| now.saturating_duration_since(at) < REVOCATION_FRESHNESS);
        checks_succeed && self.live_since.is_some_and(|since| e.verified_at >= since)
    }

    fn record_change(&mut self, id: &str, tenant: Option<&str>, now: Instant) {
        self.changes.insert(
            id.to_owned(),
            Change {
                generation: self.generation,
                tenant: tenant.map(str::to_owned),
                at: now,
            },
        );
    }
}

/// Keys the database confirmed, by hash, so a reconnect storm costs no query per connection.
#[derive(Debug, Default)]
pub struct KeyCache {
    inner: Mutex<Inner>,
}

impl KeyCache {
    /// The cached key with this hash, if it may be trusted without asking the database;
    /// otherwise `Err` with the generation to pass to [`KeyCache::lookup`].
    pub fn cached(&self, key_hash: &[u8; 32]) -> Result<VerifiedKey, u64> {
        let now = Instant::now();
        let mut inner = self.lock();
        let generation = inner.generation;
        let trusted = inner
            .entries
            .get(key_hash)
            .is_some_and(|e| inner.trusts(e, now));
        match inner.entries.get_mut(key_hash) {
            Some(e) if trusted => {
                e.used_at = now;
                Ok(VerifiedKey {
                    identity: e.identity.clone(),
                    generation,
                })
            }
            _ => Err(generation),
        }
    }

    /// Asks the database for the active key with this hash and caches it. Unknown keys are not
    /// cached, so a key created a moment ago works at once.
    pub async fn lookup(
        &self,
        pool: &deadpool_postgres::Pool,
        key_hash: &[u8; 32],
        generation: u64,
    ) -> Result<Option<VerifiedKey>, DbError> {
        let started = Instant::now();
        let client = pool.get().await?;
        let found = keys::lookup(&**client, key_hash).await?;
        drop(client);
        Ok(found.map(|identity| {
            self.insert(*key_hash, &identity, started, generation);
            VerifiedKey {
                identity,
                generation,
            }
        }))
    }

    fn insert(
        &self,
        key_hash: [u8; 32],
        identity: &KeyIdentity,
        read_at: Instant,
        generation: u64,
    ) {
        let now = Instant::now();
        let mut inner = self.lock();
        // The key changed while it was being read: what was read may be stale, so do not keep it.
        if inner
            .changes
            .get(&identity.id)
            .is_some_and(|c| c.generation > generation)
        {
            return;
        }
        if inner.entries.len() >= KEY_CACHE_MAX && !inner.entries.contains_key(&key_hash) {
            inner
                .entries
                .retain(|_, e| now.saturating_duration_since(e.used_at) < KEY_CACHE_TTL);
            if inner.entries.len() >= KEY_CACHE_MAX {
                inner.entries.clear();
            }
        }
        inner.entries.insert(
            key_hash,
            Entry {
                identity: identity.clone(),
                verified_at: read_at,
                used_at: now,
            },
        );
    }

    /// Drops entries unused for [`KEY_CACHE_TTL`] and returns the ids of the rest: what the
    /// periodic revocation check asks the database about.
    pub(crate) fn ids_to_check(&self) -> Vec<String> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner
            .entries
            .retain(|_, e| now.saturating_duration_since(e.used_at) < KEY_CACHE_TTL);
        let mut ids: Vec<String> = inner
            .entries
            .values()
            .map(|e| e.identity.id.clone())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Applies what the database said, at `checked_at`, about these keys (the tenant each may
    /// read now, `None` = revoked or deleted): entries that still hold are confirmed, the others
    /// are dropped. `notified` marks the keys as changed even where the cache held nothing
    /// (a notification says a key changed; a periodic check only reports what differs).
    pub fn apply(
        &self,
        tenant_of: &HashMap<&str, Option<&str>>,
        checked_at: Instant,
        notified: bool,
    ) {
        let now = Instant::now();
        let mut guard = self.lock();
        let inner = &mut *guard;
        inner.generation += 1;
        let mut dropped = Vec::new();
        inner
            .entries
            .retain(|_, e| match tenant_of.get(e.identity.id.as_str()) {
                Some(Some(tenant)) if *tenant == e.identity.tenant => {
                    e.verified_at = e.verified_at.max(checked_at);
                    true
                }
                Some(_) => {
                    dropped.push(e.identity.id.clone());
                    false
                }
                None => true,
            });
        for id in dropped {
            let tenant = tenant_of.get(id.as_str()).copied().flatten();
            inner.record_change(&id, tenant, now);
        }
        for (id, tenant) in tenant_of {
            if notified || tenant.is_none() {
                inner.record_change(id, *tenant, now);
            }
        }
        // Changes only matter to handshakes in progress; keep the record small.
        inner
            .changes
            .retain(|_, c| now.saturating_duration_since(c.at) < CHANGE_MEMORY);
        if inner.changes.len() > KEY_CACHE_MAX {
            // Only a flood of key changes gets here; a socket set up meanwhile is then closed by
            // the next periodic check instead.
            inner.changes.clear();
        }
    }

    /// Drops these keys without knowing their new state (a notification whose follow-up query
    /// failed): the next use asks the database.
    pub fn forget(&self, ids: &[String]) {
        self.lock()
            .entries
            .retain(|_, e| !ids.contains(&e.identity.id));
    }

    /// A revocation check that started at `at` succeeded, on a connection whose LISTEN took
    /// effect at `live_since`.
    pub fn checked(&self, live_since: Instant, at: Instant) {
        let mut inner = self.lock();
        inner.live_since = Some(live_since);
        inner.last_check = Some(inner.last_check.map_or(at, |last| last.max(at)));
    }

    /// The watcher lost its connection: changes are no longer notified, so only entries
    /// confirmed within [`REVOCATION_FRESHNESS`] stay trusted.
    pub(crate) fn watcher_lost(&self) {
        self.lock().live_since = None;
    }

    /// False when a change recorded after `generation` took `key_id` away from `tenant`: the
    /// socket authenticated meanwhile must close, since the change found nothing to close.
    pub(crate) fn still_valid(&self, key_id: &str, tenant: &str, generation: u64) -> bool {
        match self.lock().changes.get(key_id) {
            Some(c) if c.generation > generation => c.tenant.as_deref() == Some(tenant),
            _ => true,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(id: &str, tenant: &str) -> KeyIdentity {
        KeyIdentity {
            id: id.into(),
            tenant: tenant.into(),
            tenant_since: None,
        }
    }

    /// A cache holding one key, confirmed `age` ago.
    fn cache_with(hash: [u8; 32], id: &KeyIdentity, age: Duration) -> KeyCache {
        let cache = KeyCache::default();
        let generation = cache.cached(&hash).unwrap_err();
        cache.insert(hash, id, Instant::now() - age, generation);
        cache
    }

    #[test]
    fn without_a_live_watcher_only_recently_confirmed_keys_are_trusted() {
        let k = identity("k1", "kitchen");
        let fresh = cache_with([1; 32], &k, Duration::ZERO);
        assert_eq!(fresh.cached(&[1; 32]).unwrap().identity, k);
        let old = cache_with([1; 32], &k, REVOCATION_FRESHNESS + Duration::from_secs(1));
        assert!(old.cached(&[1; 32]).is_err(), "must be confirmed again");
    }

    #[test]
    fn a_live_watcher_keeps_entries_confirmed_after_its_listen_trusted_until_the_ttl() {
        let k = identity("k1", "kitchen");
        let age = REVOCATION_FRESHNESS + Duration::from_secs(5);
        let cache = cache_with([1; 32], &k, age);
        let now = Instant::now();
        // LISTEN took effect after the entry was read: changes in between could be missed.
        cache.checked(now, now);
        assert!(cache.cached(&[1; 32]).is_err());
        // LISTEN took effect before: every later change would have been notified.
        cache.checked(now - age - Duration::from_secs(1), now);
        assert!(cache.cached(&[1; 32]).is_ok());
        // ... but not once checks stop succeeding, nor past the TTL.
        cache.watcher_lost();
        assert!(cache.cached(&[1; 32]).is_err());
        let ancient = cache_with([2; 32], &k, KEY_CACHE_TTL);
        ancient.checked(now - KEY_CACHE_TTL * 2, now);
        assert!(ancient.cached(&[2; 32]).is_err());
    }

    #[test]
    fn a_change_drops_the_entry_and_invalidates_handshakes_in_progress() {
        let k = identity("k1", "kitchen");
        let cache = cache_with([1; 32], &k, Duration::ZERO);
        let during_handshake = cache.cached(&[1; 32]).unwrap().generation;
        let moved = HashMap::from([("k1", Some("bistro"))]);
        cache.apply(&moved, Instant::now(), true);
        assert!(cache.cached(&[1; 32]).is_err(), "dropped");
        assert!(!cache.still_valid("k1", "kitchen", during_handshake));
        assert!(cache.still_valid("k1", "bistro", during_handshake));
        assert!(cache.still_valid("k2", "kitchen", during_handshake));
        // A read that began before the change is not cached.
        cache.insert([1; 32], &k, Instant::now(), during_handshake);
        assert!(cache.cached(&[1; 32]).is_err());
        // One that began after it is.
        let later = cache.cached(&[1; 32]).unwrap_err();
        assert!(cache.still_valid("k1", "kitchen", later));
        cache.insert([1; 32], &identity("k1", "bistro"), Instant::now(), later);
        assert!(cache.cached(&[1; 32]).is_ok());
    }

    #[test]
    fn a_periodic_check_confirms_what_holds_and_drops_what_does_not() {
        let cache = cache_with([1; 32], &identity("k1", "kitchen"), Duration::from_secs(30));
        let generation = cache.cached(&[9; 32]).unwrap_err();
        cache.insert(
            [2; 32],
            &identity("k2", "kitchen"),
            Instant::now(),
            generation,
        );
        assert_eq!(
            cache.ids_to_check(),
            vec!["k1".to_string(), "k2".to_string()]
        );
        let states = HashMap::from([("k1", Some("kitchen")), ("k2", None)]);
        cache.apply(&states, Instant::now(), false);
        assert!(cache.cached(&[1; 32]).is_ok(), "k1 confirmed again");
        assert!(cache.cached(&[2; 32]).is_err(), "k2 revoked");
        assert!(!cache.still_valid("k2", "kitchen", generation));
        assert!(cache.still_valid("k1", "kitchen", generation));
    }
}
