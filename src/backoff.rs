//! Capped exponential backoff for the reconnect loops (listener, sequencer, revocation watcher,
//! migrations, `tail`): the delay before each retry doubles from a first delay up to a cap, and
//! starts over once an attempt got far enough.

use std::time::Duration;

/// First delay before reconnecting to Postgres: a killed backend is usually replaceable at once.
pub(crate) const DATABASE_RETRY_FIRST: Duration = Duration::from_millis(100);
/// Longest delay between reconnects to Postgres: a restarting database is retried every few
/// seconds, no faster, and no slower either (a failover completes in seconds).
pub(crate) const DATABASE_RETRY_CAP: Duration = Duration::from_secs(5);

/// The delays of one retry loop.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    first: Duration,
    cap: Duration,
    next: Duration,
}

impl Backoff {
    /// Delays of `first`, then twice as long each time, up to `cap`.
    pub const fn new(first: Duration, cap: Duration) -> Self {
        Self {
            first,
            cap,
            next: first,
        }
    }

    /// The delays for reconnecting to Postgres ([`DATABASE_RETRY_FIRST`] up to
    /// [`DATABASE_RETRY_CAP`]).
    pub const fn database() -> Self {
        Self::new(DATABASE_RETRY_FIRST, DATABASE_RETRY_CAP)
    }

    /// The delay to wait before the next attempt; the one after it is twice as long (capped).
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (delay * 2).min(self.cap);
        delay
    }

    /// The last attempt got far enough (connected, elected, received): the next failure waits
    /// the first delay again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_start_over_after_a_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let delays: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }
}
