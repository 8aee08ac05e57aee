//! The event envelope: one row of the event log and the exact JSON text frame a POS receives.

mod fit;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub(crate) use fit::TooLarge;

/// Largest frame a POS is ever sent (the envelope included). Events rendered larger are
/// shortened once, where they are stored, and marked `"truncated": true` (docs/protocol.md), so
/// socket buffers and queues sized for one such frame always have a path that delivers.
/// 1 MiB holds an order with hundreds of items and long notes many times over.
pub const MAX_FRAME_BYTES: usize = 1 << 20;

/// Longest event type name (docs/protocol.md).
pub(crate) const MAX_TYPE_LEN: usize = 64;

/// An event type name: 1..64 letters, digits, `_`, `.` or `-` (what `/broadcast` accepts, and
/// what a socket may ask for with `?types=`).
pub(crate) fn is_valid_type(s: &str) -> bool {
    (1..=MAX_TYPE_LEN).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// `{"type":"ready","tenant":…,"id":N}`: the socket has caught up; `id` is its position (the
/// last id sent or, for a socket that asked for some types only, considered).
pub fn ready(tenant: &str, id: i64) -> String {
    let mut out = String::from(r#"{"type":"ready","tenant":"#);
    push_json_str(&mut out, tenant);
    out.push_str(&format!(r#","id":{id}}}"#));
    out
}

/// `{"type":"snapshot_end",…,"id":N,"complete":…}`: the open orders of a snapshot consistent
/// with id N were all sent (`complete`), or the snapshot's bounds cut them short.
pub fn snapshot_end(tenant: &str, id: i64, complete: bool) -> String {
    let mut out = String::from(r#"{"type":"snapshot_end","tenant":"#);
    push_json_str(&mut out, tenant);
    out.push_str(&format!(r#","id":{id},"complete":{complete}}}"#));
    out
}
/// The type of the marker event (id 0) that starts a tenant's log over, written by the
/// sequencer when a tenant is deleted and created again under its slug. Never sent to a POS.
pub(crate) const TENANT_RESET: &str = "orderpush.tenant_reset";

/// Why a POS is told to refetch its state (`resync_required`'s `data.reason`, docs/protocol.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncReason {
    /// `since` is older than what the log retains.
    Retention,
    /// The replay from `since` would be longer than a socket may replay.
    ReplayTooLong,
    /// A row of the log could not be read; the frame carries its id.
    BadEvent,
    /// A database write could not be turned into an event.
    EmitFailed,
    /// The log went backwards (a restore or a failover); the frame's lower id is the new
    /// position.
    LogRewound,
    /// A bulk job ran with `orderpush.suppress` on and emitted no events.
    Suppressed,
}

impl ResyncReason {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            ResyncReason::Retention => "retention",
            ResyncReason::ReplayTooLong => "replay_too_long",
            ResyncReason::BadEvent => "bad_event",
            ResyncReason::EmitFailed => "emit_failed",
            ResyncReason::LogRewound => "log_rewound",
            ResyncReason::Suppressed => "suppressed",
        }
    }
}

/// Where an event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A trigger on an application table.
    Db,
    /// `POST /broadcast`.
    Broadcast,
}

impl Origin {
    /// The value stored in `orderpush.events.origin` and used as a metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Db => "db",
            Origin::Broadcast => "broadcast",
        }
    }

    /// Parses the stored value; anything unknown counts as a database event.
    pub(crate) fn from_db(s: &str) -> Self {
        if s == "broadcast" {
            Origin::Broadcast
        } else {
            Origin::Db
        }
    }
}

/// One committed event, as read from `orderpush.events`.
#[derive(Debug, Clone)]
pub struct Event {
    /// Tenant slug.
    pub tenant: Arc<str>,
    /// Per-tenant id: gap-free and in commit order.
    pub id: i64,
    /// Event type, e.g. `new_order`.
    pub kind: String,
    /// The envelope timestamp, verbatim (stamped by the database or given by the broadcaster).
    pub timestamp: String,
    /// The `data` value as JSON text, passed through untouched.
    pub data: String,
    /// Trigger or broadcast.
    pub origin: Origin,
    /// When the row was written (for the commit-to-send latency metric).
    pub emitted_at: SystemTime,
    /// `data` was shortened to fit [`MAX_FRAME_BYTES`]; the frame says so.
    pub truncated: bool,
}

impl Event {
    /// Stands in for a row of the log that could not be read: a `resync_required` with reason
    /// `bad_event` under the row's own id, so ids stay contiguous and the POS refetches.
    pub fn bad(tenant: Arc<str>, id: i64) -> Self {
        let data = serde_json::json!({
            "reason": ResyncReason::BadEvent.as_str(),
            "since": id - 1,
            "latestId": id,
        });
        Event {
            tenant,
            id,
            kind: "resync_required".into(),
            timestamp: iso_now(),
            data: data.to_string(),
            origin: Origin::Db,
            emitted_at: SystemTime::now(),
            truncated: false,
        }
    }

    /// Renders the frame: `{"type","tenant","timestamp","data","id"}` (docs/protocol.md, "Read events"). `data` is
    /// spliced in as stored, so money, key order and nesting reach the POS as written.
    pub(crate) fn to_frame(&self) -> String {
        envelope(
            &self.kind,
            &self.tenant,
            &self.timestamp,
            &self.data,
            self.id,
            self.truncated,
        )
    }
}

/// `data` as it may be stored: unchanged when its frame fits [`MAX_FRAME_BYTES`], else shortened
/// with every key kept (the bool says it was). Done once, where the event is stored, so every
/// instance and every replay sends the same bytes.
pub(crate) fn fit_data(
    kind: &str,
    tenant: &str,
    timestamp: &str,
    data: String,
) -> Result<(String, bool), TooLarge> {
    // The largest envelope around `data`: the longest id and the truncation mark.
    let overhead = envelope(kind, tenant, timestamp, "", i64::MAX, true).len();
    let budget = MAX_FRAME_BYTES.saturating_sub(overhead);
    match fit::shorten(&data, budget)? {
        None => Ok((data, false)),
        Some(shorter) => Ok((shorter, true)),
    }
}

/// Builds an envelope from its parts; `data` must already be valid JSON text. `truncated` adds
/// `"truncated": true` after the id (docs/protocol.md).
pub fn envelope(
    kind: &str,
    tenant: &str,
    timestamp: &str,
    data: &str,
    id: i64,
    truncated: bool,
) -> String {
    let mut out = String::with_capacity(data.len() + kind.len() + tenant.len() + 112);
    out.push_str("{\"type\":");
    push_json_str(&mut out, kind);
    out.push_str(",\"tenant\":");
    push_json_str(&mut out, tenant);
    out.push_str(",\"timestamp\":");
    push_json_str(&mut out, timestamp);
    out.push_str(",\"data\":");
    out.push_str(data);
    out.push_str(",\"id\":");
    out.push_str(&id.to_string());
    if truncated {
        out.push_str(",\"truncated\":true");
    }
    out.push('}');
    out
}

/// The first frame a client gets when its `since` cannot be honoured: it must refetch its state
/// over REST and may then continue from `latest` (the id carried by this frame).
pub fn resync_required(tenant: &str, reason: ResyncReason, since: i64, latest: i64) -> String {
    let data = serde_json::json!({ "reason": reason.as_str(), "since": since, "latestId": latest });
    envelope(
        "resync_required",
        tenant,
        &iso_now(),
        &data.to_string(),
        latest,
        false,
    )
}

fn push_json_str(out: &mut String, s: &str) {
    // serde_json's escaping of a &str cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into()));
}

/// The current time as ISO 8601 UTC with milliseconds and `Z`, as the legacy Node server wrote them.
pub(crate) fn iso_now() -> String {
    iso(SystemTime::now())
}

/// Formats a time as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC).
pub(crate) fn iso(t: SystemTime) -> String {
    let since_epoch = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    iso_from_unix(since_epoch.as_secs() as i64, since_epoch.subsec_millis())
}

/// Formats seconds since 1970 (negative before) and milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub(crate) fn iso_from_unix(secs: i64, millis: u32) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        millis.min(999)
    )
}

/// [`iso_from_unix`] for fractional seconds, as Postgres's `extract(epoch …)` gives them.
pub(crate) fn iso_from_unix_f64(secs: f64) -> String {
    let whole = secs.floor();
    let millis = ((secs - whole) * 1000.0).floor() as u32;
    iso_from_unix(whole as i64, millis)
}

/// A proleptic Gregorian date to days since 1970-01-01 (Howard Hinnant's algorithm).
pub(crate) fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (i64::from(month) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn type_names_follow_the_broadcast_rule() {
        for ok in ["new_order", "a", "order.v2-x", &"x".repeat(64)] {
            assert!(is_valid_type(ok), "{ok}");
        }
        for bad in ["", "new order", "a,b", "é", &"x".repeat(65)] {
            assert!(!is_valid_type(bad), "{bad}");
        }
        assert_eq!(
            ready("kitchen", 7),
            r#"{"type":"ready","tenant":"kitchen","id":7}"#
        );
        assert_eq!(
            snapshot_end("kitchen", 7, false),
            r#"{"type":"snapshot_end","tenant":"kitchen","id":7,"complete":false}"#
        );
    }

    #[test]
    fn iso_formats_utc_with_millis() {
        assert_eq!(iso(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_760_191_200_123);
        assert_eq!(iso(t), "2025-10-11T14:00:00.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(iso(leap), "2000-02-29T00:00:00.000Z");
        assert_eq!(iso_from_unix(-1, 500), "1969-12-31T23:59:59.500Z");
        for (y, m, d) in [
            (1970, 1, 1),
            (2000, 2, 29),
            (1899, 12, 31),
            (9999, 12, 31),
            (1, 1, 1),
        ] {
            assert_eq!(civil_from_days(days_from_civil(y, m, d)), (y, m, d));
        }
    }

    #[test]
    fn envelope_is_valid_json_with_escaped_strings() {
        let f = envelope("a\"b", "kitchen", "t", r#"{"x":[1,2.50]}"#, 7, false);
        let v: serde_json::Value = serde_json::from_str(&f).unwrap();
        assert_eq!(v["type"], "a\"b");
        assert_eq!(v["data"]["x"][1], 2.5);
        assert_eq!(v["id"], 7);
        assert!(v.get("truncated").is_none());
        let t = envelope("x", "kitchen", "t", "{}", 7, true);
        assert!(t.ends_with(r#""id":7,"truncated":true}"#), "{t}");
    }

    #[test]
    fn fit_data_keeps_the_frame_within_the_limit() {
        let note = "n".repeat(700 * 1024);
        let data = format!(r#"{{"orderId":"a","specialInstructions":"{note}"}}"#);
        let (small, truncated) =
            fit_data("new_order", "kitchen", &iso_now(), data.clone()).unwrap();
        assert!(!truncated);
        assert_eq!(small, data);
        let big = format!(r#"{{"orderId":"a","specialInstructions":"{note}{note}"}}"#);
        let (fitted, truncated) = fit_data("new_order", "kitchen", &iso_now(), big).unwrap();
        assert!(truncated);
        let frame = envelope("new_order", "kitchen", &iso_now(), &fitted, i64::MAX, true);
        assert!(frame.len() <= MAX_FRAME_BYTES);
        assert!(
            frame.len() > MAX_FRAME_BYTES - 64,
            "only what is needed is cut"
        );
    }
}
