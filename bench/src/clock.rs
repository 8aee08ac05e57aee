//! Process-wide monotonic clock in nanoseconds, shared by writers, HTTP callers and WS clients.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

static START: OnceLock<Instant> = OnceLock::new();

/// The instant every `now_ns` value counts from.
pub fn epoch() -> Instant {
    *START.get_or_init(Instant::now)
}

/// Nanoseconds since `epoch()`; comparable across tasks and threads of this process.
pub fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// The `Instant` of a `now_ns` value, for `sleep_until`.
pub fn instant_at(ns: u64) -> Instant {
    epoch() + Duration::from_nanos(ns)
}

/// Nanoseconds to milliseconds, for reports.
pub fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}
