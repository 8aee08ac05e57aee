//! Caps on concurrent WebSocket connections, in total, per API key and per tenant: a slot is
//! reserved before the upgrade and released when the socket ends, or when the upgrade never
//! completes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::config::Tuning;
use crate::metrics::RefusalReason;

/// The `Retry-After` sent with a refusal. A till refused for its key is usually waiting for its
/// own old socket to be dropped (within the 60 s dead-peer deadline): retrying every 10 s gets it
/// back within seconds of that, matches the 10 s cap of the backoff docs/protocol.md recommends,
/// and does not hammer an instance that is full.
pub(crate) const CAP_RETRY_AFTER: Duration = Duration::from_secs(10);

/// The three caps and the counts they bound. Cheap to check: one short lock per upgrade and per
/// socket end; nothing is allocated per socket (the maps' keys are the socket's own `Arc`s).
#[derive(Debug)]
pub struct ConnectionLimits {
    total_cap: usize,
    per_key_cap: usize,
    per_tenant_cap: usize,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_key: HashMap<Arc<str>, usize>,
    per_tenant: HashMap<Arc<str>, usize>,
}

impl ConnectionLimits {
    /// Caps of `total`, `per_key` and `per_tenant` connections (each at least 1).
    pub fn new(total: usize, per_key: usize, per_tenant: usize) -> Self {
        Self {
            total_cap: total,
            per_key_cap: per_key,
            per_tenant_cap: per_tenant,
            counts: Mutex::new(Counts::default()),
        }
    }

    /// The caps configured in `tuning`.
    pub(crate) fn from_tuning(tuning: &Tuning) -> Self {
        Self::new(
            tuning.max_connections,
            tuning.max_connections_per_key,
            tuning.max_connections_per_tenant,
        )
    }

    /// Reserves a slot for one socket of `key_id` on `tenant`, or says which cap is reached
    /// (the most specific first: key, tenant, then the instance). Check and count happen under
    /// one lock, so concurrent upgrades can never overshoot a cap.
    pub(crate) fn reserve(
        self: &Arc<Self>,
        tenant: Arc<str>,
        key_id: Arc<str>,
    ) -> Result<ConnectionSlot, RefusalReason> {
        let mut counts = self.lock();
        let of_key = counts.per_key.get(&key_id).copied().unwrap_or(0);
        let of_tenant = counts.per_tenant.get(&tenant).copied().unwrap_or(0);
        if of_key >= self.per_key_cap {
            return Err(RefusalReason::Key);
        }
        if of_tenant >= self.per_tenant_cap {
            return Err(RefusalReason::Tenant);
        }
        if counts.total >= self.total_cap {
            return Err(RefusalReason::Total);
        }
        counts.total += 1;
        *counts.per_key.entry(Arc::clone(&key_id)).or_default() += 1;
        *counts.per_tenant.entry(Arc::clone(&tenant)).or_default() += 1;
        drop(counts);
        Ok(ConnectionSlot {
            limits: Arc::clone(self),
            tenant,
            key_id,
        })
    }

    /// What a refused client is told: which cap, and its value.
    pub(crate) fn refusal_message(&self, reason: RefusalReason) -> String {
        let retry = CAP_RETRY_AFTER.as_secs();
        match reason {
            RefusalReason::Key => format!(
                "this API key already holds {} WebSocket connections, the most one key may; \
                 close one (or wait for a dead one to be dropped) and retry in {retry} s",
                self.per_key_cap
            ),
            RefusalReason::Tenant => format!(
                "this tenant already holds {} WebSocket connections, the most one tenant may on \
                 this instance; retry in {retry} s",
                self.per_tenant_cap
            ),
            RefusalReason::Total => format!(
                "this instance holds its maximum of {} WebSocket connections; retry in {retry} s \
                 (or connect to another instance)",
                self.total_cap
            ),
        }
    }

    /// Slots held right now (sockets open or being upgraded).
    #[cfg(test)]
    pub(crate) fn reserved(&self) -> usize {
        self.lock().total
    }

    fn release(&self, tenant: &str, key_id: &str) {
        let mut counts = self.lock();
        counts.total = counts.total.saturating_sub(1);
        decrement(&mut counts.per_key, key_id);
        decrement(&mut counts.per_tenant, tenant);
    }

    /// The counts stay consistent even if a thread panicked while holding the lock: every
    /// update is a few integer operations that leave them whole.
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Counts one release; an entry that reaches zero is removed, so the maps hold only keys and
/// tenants with a socket open.
fn decrement(map: &mut HashMap<Arc<str>, usize>, name: &str) {
    if let Some(n) = map.get_mut(name) {
        *n -= 1;
        if *n == 0 {
            map.remove(name);
        }
    }
}

/// One reserved connection: released when dropped, wherever that happens (the socket's task
/// ending, or the upgrade callback being dropped without ever running because the client went
/// away). It also carries the socket's tenant and key id, so the socket task keeps them once.
#[derive(Debug)]
pub(crate) struct ConnectionSlot {
    limits: Arc<ConnectionLimits>,
    tenant: Arc<str>,
    key_id: Arc<str>,
}

impl ConnectionSlot {
    /// The tenant the socket serves.
    pub fn tenant(&self) -> &Arc<str> {
        &self.tenant
    }

    /// The public id of the key the socket authenticated with.
    pub fn key_id(&self) -> &Arc<str> {
        &self.key_id
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.limits.release(&self.tenant, &self.key_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn each_cap_refuses_with_its_reason_and_a_release_frees_the_slot() {
        let limits = Arc::new(ConnectionLimits::new(5, 2, 3));
        let a1 = limits.reserve(name("kitchen"), name("a")).unwrap();
        let _a2 = limits.reserve(name("kitchen"), name("a")).unwrap();
        assert_eq!(
            limits.reserve(name("kitchen"), name("a")).unwrap_err(),
            RefusalReason::Key
        );
        let _b1 = limits.reserve(name("kitchen"), name("b")).unwrap();
        assert_eq!(
            limits.reserve(name("kitchen"), name("c")).unwrap_err(),
            RefusalReason::Tenant
        );
        let _d1 = limits.reserve(name("bistro"), name("d")).unwrap();
        let _d2 = limits.reserve(name("bistro"), name("d")).unwrap();
        assert_eq!(
            limits.reserve(name("cafe"), name("e")).unwrap_err(),
            RefusalReason::Total
        );
        assert_eq!(limits.reserved(), 5);
        drop(a1);
        assert_eq!(limits.reserved(), 4);
        let _a3 = limits.reserve(name("kitchen"), name("a")).unwrap();
        assert_eq!(limits.reserved(), 5);
    }

    #[test]
    fn counts_are_exact_under_concurrency_and_nothing_is_left_behind() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let limits = Arc::new(ConnectionLimits::new(1_000, 4, 1_000));
        // Sockets "open" right now, across all threads: counted after a reservation succeeds
        // and before its slot is released, so it can never exceed what the limits let through.
        let open = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (limits, open, peak) =
                    (Arc::clone(&limits), Arc::clone(&open), Arc::clone(&peak));
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        if let Ok(slot) = limits.reserve(name("kitchen"), name("k")) {
                            peak.fetch_max(open.fetch_add(1, SeqCst) + 1, SeqCst);
                            std::thread::yield_now();
                            open.fetch_sub(1, SeqCst);
                            drop(slot);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let peak = peak.load(SeqCst);
        assert!(
            (2..=4).contains(&peak),
            "at most 4 at once, and they did overlap: {peak}"
        );
        assert_eq!(limits.reserved(), 0);
        let counts = limits.lock();
        assert!(counts.per_key.is_empty() && counts.per_tenant.is_empty());
    }
}
