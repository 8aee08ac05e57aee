//! The failed-authentication limiter: counts bad credentials per client address and throttles
//! an address that presents too many, without locking out the valid keys and tokens that share
//! it (a guest Wi-Fi, a carrier NAT), and with a bounded table no flood of addresses can empty.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::Tuning;

/// The window failures are counted in; it restarts with the first failure after it ends.
pub const AUTH_FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Most addresses tracked at once (about 130 bytes each with the table's overhead: 13 MB at
/// most). When full: expired entries go first, then the tenth of the addresses still counting
/// with the fewest failures; an address cooling off is never forgotten. If every entry is
/// cooling off, new addresses go uncounted until the first cooldown ends.
pub(crate) const AUTH_LIMITER_MAX_ADDRESSES: usize = 100_000;
/// While an address cools off, at most one key lookup in the database per this interval may
/// be caused by it (keys found in the key cache need none). Enough for a valid till whose key
/// is not cached yet to get in after a retry or two; 12 a minute, a quarter of what an address
/// may cause before it is throttled, so cooling off really slows a scanner down.
pub const BLOCKED_LOOKUP_INTERVAL: Duration = Duration::from_secs(5);
/// Bad keys remembered per address (the last ones the database refused). While the address
/// cools off, these are refused without a query and without using up its lookup allowance: two
/// tills retrying a revoked key do not starve a third one whose valid key needs a lookup.
pub(crate) const BAD_KEYS_REMEMBERED: usize = 4;
/// Share of the table's capacity forgotten at once when it is full of live entries (1/10): one
/// scan then makes room for many new addresses, so a flood costs a scan per 10,000 addresses,
/// not per request.
const EVICT_DIVISOR: usize = 10;

/// What the limiter knows about one address (one IPv6 /64).
#[derive(Debug, Clone, Copy)]
struct Standing {
    started: Instant,
    failures: u32,
    blocked_until: Option<Instant>,
    /// While blocked: no uncached key lookup before this.
    next_lookup: Option<Instant>,
    /// Fingerprints of the last bad keys (0 = empty slot; fingerprints are never 0).
    bad_keys: [u64; BAD_KEYS_REMEMBERED],
    bad_next: u8,
}

impl Standing {
    fn new(now: Instant) -> Self {
        Self {
            started: now,
            failures: 0,
            blocked_until: None,
            next_lookup: None,
            bad_keys: [0; BAD_KEYS_REMEMBERED],
            bad_next: 0,
        }
    }

    fn blocked_at(&self, now: Instant) -> Option<Duration> {
        self.blocked_until
            .filter(|until| *until > now)
            .map(|until| until - now)
    }

    fn remember_bad_key(&mut self, fingerprint: u64) {
        if fingerprint == 0 || self.bad_keys.contains(&fingerprint) {
            return;
        }
        self.bad_keys[usize::from(self.bad_next) % BAD_KEYS_REMEMBERED] = fingerprint;
        self.bad_next = self.bad_next.wrapping_add(1) % BAD_KEYS_REMEMBERED as u8;
    }
}

#[derive(Debug, Default)]
struct Table {
    entries: HashMap<IpAddr, Standing>,
    /// Every entry was cooling off at the last attempt to make room: no new address is tracked
    /// (and no scan repeated) before this.
    full_until: Option<Instant>,
}

/// Counts failed authentications per client address. An address over the limit has its *bad*
/// credentials answered 429 for the cooldown; valid ones still pass, and the database lookups
/// it can cause are bounded ([`AuthLimiter::permit_lookup`]).
#[derive(Debug)]
pub(crate) struct AuthLimiter {
    limit: u32,
    window: Duration,
    cooldown: Duration,
    capacity: usize,
    table: Mutex<Table>,
}

impl AuthLimiter {
    /// A limiter allowing `limit` failures per `window`, then throttling for `cooldown`.
    /// `limit == 0` never throttles.
    pub fn new(limit: u32, window: Duration, cooldown: Duration) -> Self {
        Self {
            limit,
            window,
            cooldown,
            capacity: AUTH_LIMITER_MAX_ADDRESSES,
            table: Mutex::default(),
        }
    }

    /// The same, tracking at most `capacity` addresses instead of
    /// [`AUTH_LIMITER_MAX_ADDRESSES`].
    #[cfg(test)]
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// The limiter a server with this tuning uses.
    pub(crate) fn from_tuning(tuning: &Tuning) -> Self {
        Self::new(
            tuning.auth_failure_limit,
            AUTH_FAILURE_WINDOW,
            tuning.auth_cooldown,
        )
    }

    /// The configured limit (0 = off).
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// The configured cooldown.
    pub fn cooldown(&self) -> Duration {
        self.cooldown
    }

    /// `Err(retry_after)` while `addr` is cooling off.
    pub fn check(&self, addr: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.limit == 0 {
            return Ok(());
        }
        match self
            .lock()
            .entries
            .get(&limiter_key(addr))
            .and_then(|e| e.blocked_at(now))
        {
            Some(retry_after) => Err(retry_after),
            None => Ok(()),
        }
    }

    /// Whether a key not in the cache may be looked up for `addr` now. Always while the address
    /// is not cooling off; while it is, not for a key the database already refused for it, and
    /// otherwise once per [`BLOCKED_LOOKUP_INTERVAL`]. `Err(retry_after)` when not.
    pub(crate) fn permit_lookup(
        &self,
        addr: IpAddr,
        fingerprint: u64,
        now: Instant,
    ) -> Result<(), Duration> {
        if self.limit == 0 {
            return Ok(());
        }
        let mut table = self.lock();
        let Some(e) = table.entries.get_mut(&limiter_key(addr)) else {
            return Ok(());
        };
        let Some(retry_after) = e.blocked_at(now) else {
            return Ok(());
        };
        if e.bad_keys.contains(&fingerprint) || e.next_lookup.is_some_and(|next| now < next) {
            return Err(retry_after);
        }
        e.next_lookup = Some(now + BLOCKED_LOOKUP_INTERVAL);
        Ok(())
    }

    /// Counts one failure (with the fingerprint of the key the database refused, if that was
    /// the failure); returns true when it starts a cooling-off period.
    pub(crate) fn record_failure(&self, addr: IpAddr, now: Instant, bad_key: Option<u64>) -> bool {
        if self.limit == 0 {
            return false;
        }
        let key = limiter_key(addr);
        let mut table = self.lock();
        if !table.entries.contains_key(&key)
            && table.entries.len() >= self.capacity
            && !self.make_room(&mut table, now)
        {
            return false;
        }
        let entry = table
            .entries
            .entry(key)
            .or_insert_with(|| Standing::new(now));
        if self.expired(entry, now) {
            *entry = Standing::new(now);
        }
        if let Some(fingerprint) = bad_key {
            entry.remember_bad_key(fingerprint);
        }
        entry.failures = entry.failures.saturating_add(1);
        if entry.failures >= self.limit && entry.blocked_until.is_none() {
            entry.blocked_until = Some(now + self.cooldown);
            return true;
        }
        false
    }

    /// Frees at least one slot without forgetting an address that is cooling off; false when
    /// that is impossible (then the new address goes uncounted).
    fn make_room(&self, table: &mut Table, now: Instant) -> bool {
        if table.full_until.is_some_and(|until| now < until) {
            return false;
        }
        table.full_until = None;
        table.entries.retain(|_, e| !self.expired(e, now));
        if table.entries.len() < self.capacity {
            return true;
        }
        let mut counting: Vec<(u32, IpAddr)> = table
            .entries
            .iter()
            .filter(|(_, e)| e.blocked_until.is_none())
            .map(|(addr, e)| (e.failures, *addr))
            .collect();
        if counting.is_empty() {
            table.full_until = table.entries.values().filter_map(|e| e.blocked_until).min();
            return false;
        }
        let n = (self.capacity / EVICT_DIVISOR).clamp(1, counting.len());
        counting.select_nth_unstable(n - 1);
        for (_, addr) in &counting[..n] {
            table.entries.remove(addr);
        }
        true
    }

    /// Neither counting nor cooling off any more.
    fn expired(&self, e: &Standing, now: Instant) -> bool {
        match e.blocked_until {
            Some(until) => until <= now,
            None => now.duration_since(e.started) >= self.window,
        }
    }

    /// Addresses tracked now.
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.lock().entries.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The address a failure is charged to: IPv4 as is (IPv4-mapped IPv6 too), IPv6 by its /64,
/// because one IPv6 host typically controls a whole /64 and could rotate within it.
pub(crate) fn limiter_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u64::MAX as u128))),
        },
    }
}

/// A short, never-zero fingerprint of a key's hash: enough to recognise a bad key an address
/// presents again, too short to be worth anything if the limiter's memory leaked.
pub fn fingerprint(key_hash: &[u8; 32]) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&key_hash[..8]);
    u64::from_le_bytes(first) | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_limiter_throttles_after_the_limit_until_the_cooldown_ends() {
        let limiter = AuthLimiter::new(3, MINUTE, Duration::from_secs(30));
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        let t0 = Instant::now();
        assert!(!limiter.record_failure(a, t0, None));
        assert!(!limiter.record_failure(a, t0, None));
        assert!(limiter.check(a, t0).is_ok());
        assert!(
            limiter.record_failure(a, t0, None),
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
            !limiter.record_failure(a, later, None),
            "and counting starts over"
        );
    }

    #[test]
    fn failures_spread_beyond_the_window_never_trip_the_limiter() {
        let limiter = AuthLimiter::new(3, MINUTE, Duration::from_secs(30));
        let a = ip("192.0.2.1");
        let t0 = Instant::now();
        for i in 0..10u64 {
            assert!(!limiter.record_failure(a, t0 + Duration::from_secs(31 * i), None));
        }
        assert!(limiter.check(a, t0 + Duration::from_secs(310)).is_ok());
    }

    #[test]
    fn a_zero_limit_turns_the_limiter_off() {
        let limiter = AuthLimiter::new(0, MINUTE, Duration::from_secs(30));
        let a = ip("192.0.2.1");
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert!(!limiter.record_failure(a, t0, Some(7)));
        }
        assert!(limiter.check(a, t0).is_ok());
        assert!(limiter.permit_lookup(a, 7, t0).is_ok());
        assert_eq!(limiter.tracked(), 0);
    }

    #[test]
    fn ipv6_is_limited_per_64_and_mapped_ipv4_as_ipv4() {
        let key = |s: &str| limiter_key(ip(s));
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::2"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.1"), key("192.0.2.1"));
    }

    #[test]
    fn a_blocked_address_gets_a_lookup_now_and_then_but_never_for_a_key_already_refused() {
        let limiter = AuthLimiter::new(3, MINUTE, MINUTE);
        let nat = ip("198.51.100.7");
        let (revoked_1, revoked_2, valid, guess) = (11, 13, 15, 17);
        let t0 = Instant::now();
        assert!(
            limiter.permit_lookup(nat, revoked_1, t0).is_ok(),
            "not blocked"
        );
        // Two tills retrying revoked keys get the address blocked.
        limiter.record_failure(nat, t0, Some(revoked_1));
        limiter.record_failure(nat, t0, Some(revoked_2));
        assert!(limiter.record_failure(nat, t0, Some(revoked_1)));
        // Their retries cost nothing and use up nothing...
        for _ in 0..10 {
            assert!(limiter.permit_lookup(nat, revoked_1, t0).is_err());
            assert!(limiter.permit_lookup(nat, revoked_2, t0).is_err());
        }
        // ...so a till whose valid key is not cached gets its lookup at once.
        assert!(limiter.permit_lookup(nat, valid, t0).is_ok());
        // A scanner behind the same address gets one lookup per interval, no more.
        assert!(limiter.permit_lookup(nat, guess, t0).is_err());
        let t1 = t0 + BLOCKED_LOOKUP_INTERVAL / 2;
        assert!(limiter.permit_lookup(nat, guess + 2, t1).is_err());
        let t2 = t0 + BLOCKED_LOOKUP_INTERVAL;
        assert!(limiter.permit_lookup(nat, guess + 4, t2).is_ok());
        assert!(limiter.permit_lookup(nat, guess + 6, t2).is_err());
        // Other addresses are not affected.
        assert!(limiter.permit_lookup(ip("198.51.100.8"), guess, t2).is_ok());
    }

    #[test]
    fn the_table_stays_within_its_capacity() {
        let limiter = AuthLimiter::new(5, MINUTE, MINUTE).with_capacity(100);
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            let addr = IpAddr::from(i.to_be_bytes());
            limiter.record_failure(addr, t0 + Duration::from_millis(u64::from(i)), None);
            assert!(limiter.tracked() <= 100);
        }
        assert!(limiter.tracked() > 50, "room is made in small steps");
        // Entries whose window ended are the first to go, all at once.
        let much_later = t0 + Duration::from_secs(3600);
        let newcomers: Vec<IpAddr> = (0..100u32)
            .map(|i| IpAddr::from((0x0b00_0000 + i).to_be_bytes()))
            .collect();
        for addr in &newcomers {
            limiter.record_failure(*addr, much_later, None);
        }
        assert_eq!(limiter.tracked(), 100);
        let table = limiter.lock();
        assert!(newcomers.iter().all(|a| table.entries.contains_key(a)));
    }

    #[test]
    fn a_flood_of_new_addresses_does_not_lift_an_existing_block() {
        let limiter = AuthLimiter::new(3, MINUTE, MINUTE).with_capacity(100);
        let scanner = ip("203.0.113.9");
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.record_failure(scanner, t0, None);
        }
        assert!(limiter.check(scanner, t0).is_err());
        // An attacker with many addresses fails once from each, far more than the table holds.
        for i in 0..100_000u32 {
            limiter.record_failure(IpAddr::from(i.to_be_bytes()), t0, None);
        }
        assert!(limiter.check(scanner, t0).is_err(), "the block holds");
        assert!(limiter.tracked() <= 100);
        // Even when every tracked address is blocked, new ones are simply not tracked.
        let crowd: Vec<IpAddr> = (0..200u32)
            .map(|i| IpAddr::from((0x0a00_0000 + i).to_be_bytes()))
            .collect();
        for addr in &crowd {
            for _ in 0..3 {
                limiter.record_failure(*addr, t0, None);
            }
        }
        assert!(limiter.check(scanner, t0).is_err(), "the block still holds");
        assert!(limiter.tracked() <= 100);
        // Once the blocks end, the table takes new addresses again.
        let later = t0 + MINUTE;
        assert!(limiter.check(scanner, later).is_ok());
        limiter.record_failure(ip("192.0.2.200"), later, None);
        assert!(limiter.tracked() <= 100);
        assert!(
            limiter.lock().entries.contains_key(&ip("192.0.2.200")),
            "tracked after the cooldowns ended"
        );
    }

    #[test]
    fn a_standing_stays_small() {
        // AUTH_LIMITER_MAX_ADDRESSES' memory estimate rests on this.
        assert!(std::mem::size_of::<(IpAddr, Standing)>() <= 112);
    }

    #[test]
    fn fingerprints_are_never_zero() {
        assert_ne!(fingerprint(&[0; 32]), 0);
        assert_ne!(fingerprint(&[1; 32]), fingerprint(&[2; 32]));
    }
}
