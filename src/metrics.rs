//! Process-wide counters, gauges and one histogram, rendered in Prometheus text format.
//!
//! Plain atomics instead of a metrics crate: the set is small and fixed, and no label takes
//! unbounded values (event types outside the known set are counted as `other`).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::event::ResyncReason;

/// Why a POS socket ended; a label of `orderpush_disconnects_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The client closed or the TCP connection broke.
    Client,
    /// The client's queue overflowed, or it drained nothing for the drain timeout (close code
    /// 1013; the latter are also counted by `orderpush_drain_timeouts_total`).
    SlowConsumer,
    /// Its key was revoked.
    KeyRevoked,
    /// It did not answer pings in time.
    PingTimeout,
    /// The service shut down (close code 1001).
    Shutdown,
    /// The client sent something it must not (e.g. an oversized frame).
    ProtocolError,
    /// The server could not serve it (e.g. the database was unreachable during replay).
    ServerError,
}

impl DisconnectReason {
    /// Every reason, in declaration order: a reason's counter is `disconnects[reason as usize]`
    /// (the unit tests check the order, so a new reason cannot be counted as another).
    const ALL: [DisconnectReason; DisconnectReason::ServerError as usize + 1] = [
        DisconnectReason::Client,
        DisconnectReason::SlowConsumer,
        DisconnectReason::KeyRevoked,
        DisconnectReason::PingTimeout,
        DisconnectReason::Shutdown,
        DisconnectReason::ProtocolError,
        DisconnectReason::ServerError,
    ];

    fn label(self) -> &'static str {
        match self {
            DisconnectReason::Client => "client",
            DisconnectReason::SlowConsumer => "slow_consumer",
            DisconnectReason::KeyRevoked => "key_revoked",
            DisconnectReason::PingTimeout => "ping_timeout",
            DisconnectReason::Shutdown => "shutdown",
            DisconnectReason::ProtocolError => "protocol_error",
            DisconnectReason::ServerError => "server_error",
        }
    }
}

/// Which cap refused a WebSocket upgrade; a label of `orderpush_connections_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefusalReason {
    /// The instance holds its maximum of connections.
    Total,
    /// The API key holds its maximum of connections.
    Key,
    /// The tenant holds its maximum of connections.
    Tenant,
}

impl RefusalReason {
    /// Every cap, in declaration order (its counter is `connections_refused[reason as usize]`).
    const ALL: [RefusalReason; RefusalReason::Tenant as usize + 1] = [
        RefusalReason::Total,
        RefusalReason::Key,
        RefusalReason::Tenant,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            RefusalReason::Total => "total",
            RefusalReason::Key => "key",
            RefusalReason::Tenant => "tenant",
        }
    }
}

/// Event types with their own label value; everything else (free-form /broadcast types) is
/// `other`, which keeps the label set bounded.
const KNOWN_TYPES: [&str; 6] = [
    "new_order",
    "order_updated",
    "gift_card_purchased",
    "loyalty_updated",
    "resync_required",
    "other",
];

fn type_index(kind: &str) -> usize {
    KNOWN_TYPES
        .iter()
        .position(|t| *t == kind)
        .unwrap_or(KNOWN_TYPES.len() - 1)
}

/// Every `resync_required` reason, in declaration order (its counter is
/// `resyncs[reason as usize]`).
const RESYNC_REASONS: [ResyncReason; ResyncReason::Suppressed as usize + 1] = [
    ResyncReason::Retention,
    ResyncReason::ReplayTooLong,
    ResyncReason::BadEvent,
    ResyncReason::EmitFailed,
    ResyncReason::LogRewound,
    ResyncReason::Suppressed,
];

/// Upper bounds (seconds) of the delivery-lag histogram: from sub-millisecond to the listener's
/// slowest safety-net poll and beyond.
const LAG_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// All metrics of one process.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Open POS sockets.
    pub connections: AtomicI64,
    /// POS sockets accepted.
    pub connects: AtomicU64,
    disconnects: [AtomicU64; DisconnectReason::ALL.len()],
    /// WebSocket upgrades refused for a missing, unknown or revoked key (401) or a wrong tenant (403).
    pub auth_failures: AtomicU64,
    /// POS keys looked up in the database (keys found in the key cache need none).
    pub key_lookups: AtomicU64,
    connections_refused: [AtomicU64; RefusalReason::ALL.len()],
    events_db: [AtomicU64; KNOWN_TYPES.len()],
    events_broadcast: [AtomicU64; KNOWN_TYPES.len()],
    /// Event frames written to sockets (replay included).
    pub frames_sent: AtomicU64,
    /// Of those, frames the fan-out wrote straight into a socket (no task woken, nothing
    /// queued).
    pub frames_direct: AtomicU64,
    /// Replayed frames sent for `?since=`.
    pub replayed_frames: AtomicU64,
    /// Resumes (`?since=`) served from the hub's memory.
    pub resumes_from_memory: AtomicU64,
    /// Resumes (`?since=`) that had to read the event log.
    pub resumes_from_database: AtomicU64,
    /// Snapshots of open orders sent (`?snapshot=open`).
    pub snapshots: AtomicU64,
    /// `resync_required` frames a socket sent because its `since` could not be honoured, by
    /// reason (see [`Metrics::resync`]).
    resyncs: [AtomicU64; RESYNC_REASONS.len()],
    /// Sockets cut because they had something to send and completed no write for the drain
    /// timeout (`config::DRAIN_TIMEOUT`); counted when the hub kicks them.
    pub drain_timeouts: AtomicU64,
    /// /broadcast requests answered 200.
    pub broadcasts_accepted: AtomicU64,
    /// /broadcast requests answered 4xx/5xx.
    pub broadcasts_rejected: AtomicU64,
    /// Events for a tenant with no terminal connected to any instance, by type; counted only by
    /// the reporting instance (see [`crate::presence::Presence::is_reporter`]).
    undelivered: [AtomicU64; KNOWN_TYPES.len()],
    /// `{"type":"ack"}` messages recorded from POS clients.
    pub acks: AtomicU64,
    /// Orders no terminal acknowledged within their tenant's timeout; each is counted once, by
    /// the instance that warned about it.
    pub orders_unacknowledged: AtomicU64,
    /// Messages from POS clients that were not a valid ack (ignored).
    pub client_messages_ignored: AtomicU64,
    /// Presence heartbeats that failed (the database was unreachable or slow).
    pub presence_flush_failures: AtomicU64,
    /// Times the listener (re)connected.
    pub listener_connects: AtomicU64,
    /// 1 while the listener is connected and following, else 0.
    pub listener_up: AtomicI64,
    /// Rows the listener read from the event log.
    pub listener_rows: AtomicU64,
    /// Events deleted by retention.
    pub pruned_events: AtomicU64,
    /// 1 while this instance is the elected sequencer, else 0.
    pub sequencer_leader: AtomicI64,
    /// Batches this instance's sequencer committed.
    pub sequencer_batches: AtomicU64,
    /// Staged rows this instance's sequencer consumed.
    pub sequencer_rows: AtomicU64,
    /// Writes that could not become events (each became `resync_required`, `emit_failed`).
    pub emit_errors: AtomicU64,
    lag_buckets: [AtomicU64; LAG_BUCKETS.len()],
    lag_count: AtomicU64,
    lag_sum_micros: AtomicU64,
    /// The last observed lag plus one, in microseconds; 0 = none yet.
    last_lag_micros_plus_one: AtomicU64,
}

impl Metrics {
    /// Counts one socket end.
    pub fn disconnected(&self, reason: DisconnectReason) {
        self.disconnects[reason as usize].fetch_add(1, Relaxed);
        self.connections.fetch_sub(1, Relaxed);
    }

    /// Sockets closed for this reason so far.
    pub(crate) fn disconnect_count(&self, reason: DisconnectReason) -> f64 {
        self.disconnects[reason as usize].load(Relaxed) as f64
    }

    /// Counts one WebSocket upgrade refused (503) because a connection cap was reached.
    pub(crate) fn connection_refused(&self, reason: RefusalReason) {
        self.connections_refused[reason as usize].fetch_add(1, Relaxed);
    }

    /// Counts one `resync_required` a socket sent instead of a replay.
    pub fn resync(&self, reason: ResyncReason) {
        self.resyncs[reason as usize].fetch_add(1, Relaxed);
    }

    /// Counts one event read from the log, by origin and type.
    pub(crate) fn event_received(&self, origin: crate::event::Origin, kind: &str) {
        let i = type_index(kind);
        match origin {
            crate::event::Origin::Db => &self.events_db[i],
            crate::event::Origin::Broadcast => &self.events_broadcast[i],
        }
        .fetch_add(1, Relaxed);
    }

    /// Counts one committed sequencer batch: staged rows consumed, and those of them that could
    /// not become events.
    pub(crate) fn sequencer_batch(&self, rows: usize, failures: usize) {
        self.sequencer_batches.fetch_add(1, Relaxed);
        self.sequencer_rows.fetch_add(rows as u64, Relaxed);
        self.emit_errors.fetch_add(failures as u64, Relaxed);
    }

    /// Counts one event that no terminal on any instance received.
    pub fn undelivered(&self, kind: &str) {
        self.undelivered[type_index(kind)].fetch_add(1, Relaxed);
    }

    /// Records the time from an event's write to its hand-off to client queues.
    pub(crate) fn observe_lag(&self, lag: Duration) {
        let secs = lag.as_secs_f64();
        for (bound, bucket) in LAG_BUCKETS.iter().zip(&self.lag_buckets) {
            if secs <= *bound {
                bucket.fetch_add(1, Relaxed);
            }
        }
        self.lag_count.fetch_add(1, Relaxed);
        self.lag_sum_micros
            .fetch_add(lag.as_micros() as u64, Relaxed);
        self.last_lag_micros_plus_one
            .store((lag.as_micros() as u64).saturating_add(1), Relaxed);
    }

    /// The commit-to-send lag of the last event the listener handed to the hub, if any.
    pub(crate) fn last_lag(&self) -> Option<Duration> {
        match self.last_lag_micros_plus_one.load(Relaxed) {
            0 => None,
            n => Some(Duration::from_micros(n - 1)),
        }
    }

    /// Renders everything in Prometheus text format; `extra` lines (gauges read at scrape time)
    /// are appended as given.
    pub fn render(&self, extra: &[(&str, &str, f64)]) -> String {
        let mut out = String::with_capacity(4096);
        let load = |a: &AtomicU64| a.load(Relaxed) as f64;
        let gauges: [(&str, &str, f64); 3] = [
            (
                "orderpush_sequencer_leader",
                "1 while this instance is the elected sequencer.",
                self.sequencer_leader.load(Relaxed) as f64,
            ),
            (
                "orderpush_connections",
                "Open POS WebSocket connections.",
                self.connections.load(Relaxed) as f64,
            ),
            (
                "orderpush_listener_up",
                "1 while the listener is connected and following.",
                self.listener_up.load(Relaxed) as f64,
            ),
        ];
        let counters: [(&str, &str, f64); 23] = [
            (
                "orderpush_connects_total",
                "POS WebSocket connections accepted.",
                load(&self.connects),
            ),
            (
                "orderpush_auth_failures_total",
                "WebSocket upgrades refused with 401 or 403.",
                load(&self.auth_failures),
            ),
            (
                "orderpush_key_lookups_total",
                "POS keys looked up in the database (cache misses).",
                load(&self.key_lookups),
            ),
            (
                "orderpush_frames_direct_total",
                "Event frames the fan-out wrote straight into a socket, without its task.",
                load(&self.frames_direct),
            ),
            (
                "orderpush_frames_sent_total",
                "Event frames written to POS sockets.",
                load(&self.frames_sent),
            ),
            (
                "orderpush_replayed_frames_total",
                "Frames replayed for ?since=.",
                load(&self.replayed_frames),
            ),
            (
                "orderpush_resumes_from_memory_total",
                "Resumes with ?since= served from memory.",
                load(&self.resumes_from_memory),
            ),
            (
                "orderpush_snapshots_total",
                "Snapshots of open orders sent for ?snapshot=open.",
                load(&self.snapshots),
            ),
            (
                "orderpush_resumes_from_database_total",
                "Resumes with ?since= that read the event log.",
                load(&self.resumes_from_database),
            ),
            (
                "orderpush_drain_timeouts_total",
                "Sockets closed with 1013 because they drained nothing for the drain timeout.",
                load(&self.drain_timeouts),
            ),
            (
                "orderpush_broadcasts_accepted_total",
                "POST /broadcast requests accepted.",
                load(&self.broadcasts_accepted),
            ),
            (
                "orderpush_broadcasts_rejected_total",
                "POST /broadcast requests rejected.",
                load(&self.broadcasts_rejected),
            ),
            (
                "orderpush_acks_total",
                "Acks recorded from POS clients.",
                load(&self.acks),
            ),
            (
                "orderpush_orders_unacknowledged_total",
                "Orders no terminal acknowledged within their tenant's timeout (each counted once, cluster-wide).",
                load(&self.orders_unacknowledged),
            ),
            (
                "orderpush_client_messages_ignored_total",
                "Messages from POS clients that were not a valid ack.",
                load(&self.client_messages_ignored),
            ),
            (
                "orderpush_presence_flush_failures_total",
                "Presence heartbeats that failed.",
                load(&self.presence_flush_failures),
            ),
            (
                "orderpush_listener_connects_total",
                "Listener (re)connections.",
                load(&self.listener_connects),
            ),
            (
                "orderpush_listener_rows_total",
                "Event rows read by the listener.",
                load(&self.listener_rows),
            ),
            (
                "orderpush_pruned_events_total",
                "Events deleted by retention.",
                load(&self.pruned_events),
            ),
            (
                "orderpush_sequencer_batches_total",
                "Batches of staged rows this instance's sequencer numbered.",
                load(&self.sequencer_batches),
            ),
            (
                "orderpush_sequencer_rows_total",
                "Staged rows this instance's sequencer consumed.",
                load(&self.sequencer_rows),
            ),
            (
                "orderpush_emit_errors_total",
                "Writes that could not become events (sent as resync_required, emit_failed).",
                load(&self.emit_errors),
            ),
            (
                "orderpush_slow_client_disconnects_total",
                "Sockets closed with 1013: their queue was full, or they drained nothing for the drain timeout.",
                self.disconnect_count(DisconnectReason::SlowConsumer),
            ),
        ];
        let kinds = gauges
            .iter()
            .chain(extra)
            .map(|g| (g, "gauge"))
            .chain(counters.iter().map(|c| (c, "counter")));
        for ((name, help, value), kind) in kinds {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }

        let _ = writeln!(
            out,
            "# HELP orderpush_disconnects_total POS sockets closed, by reason.\n# TYPE orderpush_disconnects_total counter"
        );
        for (reason, n) in DisconnectReason::ALL.iter().zip(&self.disconnects) {
            let _ = writeln!(
                out,
                "orderpush_disconnects_total{{reason=\"{}\"}} {}",
                reason.label(),
                n.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP orderpush_resyncs_total resync_required frames sent instead of a replay, by reason.\n# TYPE orderpush_resyncs_total counter"
        );
        for (reason, n) in RESYNC_REASONS.iter().zip(&self.resyncs) {
            let _ = writeln!(
                out,
                "orderpush_resyncs_total{{reason=\"{}\"}} {}",
                reason.as_str(),
                n.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP orderpush_connections_refused_total WebSocket upgrades refused with 503 because a connection cap was reached, by cap.\n# TYPE orderpush_connections_refused_total counter"
        );
        for (reason, n) in RefusalReason::ALL.iter().zip(&self.connections_refused) {
            let _ = writeln!(
                out,
                "orderpush_connections_refused_total{{reason=\"{}\"}} {}",
                reason.label(),
                n.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP orderpush_events_total Events read from the event log, by origin and type.\n# TYPE orderpush_events_total counter"
        );
        for (origin, counts) in [
            ("db", &self.events_db),
            ("broadcast", &self.events_broadcast),
        ] {
            for (kind, n) in KNOWN_TYPES.iter().zip(counts.iter()) {
                let _ = writeln!(
                    out,
                    "orderpush_events_total{{origin=\"{origin}\",type=\"{kind}\"}} {}",
                    n.load(Relaxed)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP orderpush_undelivered_events_total Events for a tenant with no POS connected to any instance, by type (counted by one instance).\n# TYPE orderpush_undelivered_events_total counter"
        );
        for (kind, n) in KNOWN_TYPES.iter().zip(&self.undelivered) {
            let _ = writeln!(
                out,
                "orderpush_undelivered_events_total{{type=\"{kind}\"}} {}",
                n.load(Relaxed)
            );
        }
        let name = "orderpush_delivery_lag_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time from an event row's write to its hand-off to client queues.\n# TYPE {name} histogram"
        );
        for (bound, n) in LAG_BUCKETS.iter().zip(&self.lag_buckets) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", n.load(Relaxed));
        }
        let count = self.lag_count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.lag_sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_counter_in_declaration_order() {
        for (i, r) in DisconnectReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
        for (i, r) in RefusalReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
        for (i, r) in RESYNC_REASONS.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
        let m = Metrics::default();
        for r in DisconnectReason::ALL {
            m.disconnected(r);
        }
        m.disconnected(DisconnectReason::ServerError);
        let text = m.render(&[]);
        for r in DisconnectReason::ALL {
            let want = if r == DisconnectReason::ServerError {
                2
            } else {
                1
            };
            let line = format!(
                "orderpush_disconnects_total{{reason=\"{}\"}} {want}",
                r.label()
            );
            assert!(text.contains(&line), "{line}\n{text}");
        }
    }

    #[test]
    fn unknown_event_types_count_as_other() {
        assert_eq!(KNOWN_TYPES[type_index("new_order")], "new_order");
        assert_eq!(KNOWN_TYPES[type_index("chaos")], "other");
    }
}
