//! The clock of the periodic background jobs (retention, the drain watch, the presence
//! heartbeat, the gauge refresh, the unacknowledged-order check): a tick every interval until
//! shutdown, late ticks delayed rather than bunched.

use std::time::Duration;

use tokio::time::{Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// Ticks every interval, the first at once.
#[derive(Debug)]
pub struct Periodic {
    tick: Interval,
}

impl Periodic {
    /// A clock ticking every `every`. A job that overruns delays the next tick instead of
    /// catching up with a burst (a database that was slow for a minute must not be asked the
    /// same question thirty times in a row).
    pub fn every(every: Duration) -> Self {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self { tick }
    }

    /// Waits for the next tick: true when it is time to run, false once `shutdown` is
    /// cancelled (the job then returns).
    pub async fn tick(&mut self, shutdown: &CancellationToken) -> bool {
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = self.tick.tick() => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn it_ticks_at_once_then_after_the_interval_and_stops_at_shutdown() {
        let shutdown = CancellationToken::new();
        let every = Duration::from_millis(50);
        let mut clock = Periodic::every(every);
        assert!(clock.tick(&shutdown).await);
        let first = tokio::time::Instant::now();
        assert!(clock.tick(&shutdown).await);
        assert!(
            first.elapsed() >= every - Duration::from_millis(5),
            "not before the interval"
        );
        shutdown.cancel();
        assert!(!clock.tick(&shutdown).await, "shutdown ends the job");
    }
}
