//! The live status page: `/status` (plain HTML), `/status/app.js` (polls the JSON) and
//! `/status/data` (instances, listener state and lag, tenants with their terminals, events per
//! second, the last events), all behind the admin token; plus the `/metrics` gauges that need
//! presence or the database, the latter refreshed in the background so a scrape never queries.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use axum::Json;
use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use serde_json::json;

use super::AppState;
use super::admin::{self, Challenge};
use crate::activity::{RecentEvent, Undelivered};
use crate::db::{self, admin::ConnectionRow};
use crate::periodic::Periodic;

/// The page itself: static, no data (the data comes from `/status/data`).
const PAGE: &str = include_str!("status/index.html");
/// The page's script.
const SCRIPT: &str = include_str!("status/app.js");
/// Database gauges older than this are left out of `/metrics` and
/// `orderpush_scrape_database_ok` is 0: several refreshes in a row failed, and a stale value
/// must not look current.
pub(crate) const GAUGE_MAX_AGE: Duration = Duration::from_secs(15);
/// Headers of every status response: no caching of operational data, no framing, no guessing
/// of types, scripts only from this origin.
const SECURITY_HEADERS: [(header::HeaderName, &str); 5] = [
    (header::CACHE_CONTROL, "no-store"),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::X_FRAME_OPTIONS, "DENY"),
    (header::REFERRER_POLICY, "no-referrer"),
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
    ),
];

/// Routes of this group.
pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/status", get(page))
        .route("/status/app.js", get(script))
        .route("/status/data", get(data))
}

async fn page(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    asset(&state, peer, &headers, "text/html; charset=utf-8", PAGE)
}

async fn script(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    asset(
        &state,
        peer,
        &headers,
        "text/javascript; charset=utf-8",
        SCRIPT,
    )
}

/// Serves one embedded file to an authorized caller.
fn asset(
    state: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    content_type: &'static str,
    body: &'static str,
) -> Response {
    if let Err(denied) = admin::authorize(state, peer, headers, Challenge::Basic) {
        return denied.into_response();
    }
    (
        SECURITY_HEADERS,
        [(header::CONTENT_TYPE, content_type)],
        body,
    )
        .into_response()
}

/// Overdue orders the page lists at most (oldest first): more than a screen; the gauges count
/// them all.
const MAX_OVERDUE_SHOWN: i64 = 200;

/// One tenant as the status page shows it.
#[derive(Debug, Serialize)]
struct TenantView {
    tenant: String,
    terminals: Vec<ConnectionRow>,
    /// Received events with no terminal connected within the last 10 minutes.
    undelivered: Option<Undelivered>,
    /// Orders past the acknowledgement timeout that never reached a terminal.
    orders_undelivered: usize,
    /// Orders past the acknowledgement timeout that reached a terminal, not acknowledged.
    orders_unacknowledged: usize,
    /// No terminal now and events arrived with none, or orders wait for an acknowledgement past
    /// the timeout: shown in red.
    alert: bool,
    last_event: Option<RecentEvent>,
}

async fn data(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Err(denied) = admin::authorize(&state, peer, &headers, Challenge::Basic) {
        return denied.into_response();
    }
    let recent = state.activity.recent();
    let undelivered = state.activity.undelivered();
    let ack_timeout = state.tuning.ack_timeout.as_secs();
    let from_db = admin::with_client(&state, async |c| {
        let instances = db::admin::instances(&***c).await?;
        let connections =
            db::admin::connections(&***c, None, admin::MAX_CONNECTIONS_LISTED).await?;
        let (tenants, connections_total) = db::admin::counts(&***c).await?;
        let overdue = db::acks::overdue(&***c, None, ack_timeout, MAX_OVERDUE_SHOWN).await?;
        Ok((instances, connections, tenants, connections_total, overdue))
    })
    .await;
    let (instances, connections, tenant_count, connection_count, overdue, database_error) =
        match from_db {
            Ok((i, c, t, n, o)) => (i, c, Some(t), Some(n), o, None),
            Err(e) => (
                Vec::new(),
                Vec::new(),
                None,
                None,
                Vec::new(),
                Some(e.to_string()),
            ),
        };
    let database_ok = database_error.is_none();

    let mut tenants: BTreeMap<String, TenantView> = BTreeMap::new();
    let view = |slug: &str| TenantView {
        tenant: slug.to_owned(),
        terminals: Vec::new(),
        undelivered: None,
        orders_undelivered: 0,
        orders_unacknowledged: 0,
        alert: false,
        last_event: None,
    };
    for c in connections {
        tenants
            .entry(c.tenant.clone())
            .or_insert_with(|| view(&c.tenant))
            .terminals
            .push(c);
    }
    for u in undelivered {
        let slug = u.tenant.to_string();
        tenants
            .entry(slug)
            .or_insert_with_key(|slug| view(slug))
            .undelivered = Some(u);
    }
    for o in &overdue {
        let t = tenants
            .entry(o.tenant.clone())
            .or_insert_with(|| view(&o.tenant));
        if o.undelivered() {
            t.orders_undelivered += 1;
        } else {
            t.orders_unacknowledged += 1;
        }
    }
    // `recent` is newest first: the first seen per tenant is its last event.
    for e in &recent {
        let t = tenants
            .entry(e.tenant.to_string())
            .or_insert_with(|| view(&e.tenant));
        if t.last_event.is_none() {
            t.last_event = Some(e.clone());
        }
    }
    let mut tenants: Vec<TenantView> = tenants
        .into_values()
        .map(|mut t| {
            // Without the database the terminals are unknown: no red we cannot stand behind.
            t.alert = (database_ok && t.terminals.is_empty() && t.undelivered.is_some())
                || t.orders_undelivered + t.orders_unacknowledged > 0;
            t
        })
        .collect();
    tenants.sort_by(|a, b| b.alert.cmp(&a.alert).then_with(|| a.tenant.cmp(&b.tenant)));

    let listener = &state.listener;
    let body = json!({
        "generated_at": crate::event::iso(SystemTime::now()),
        "this_instance": state.presence.info().id,
        "database_ok": database_ok,
        "database_error": database_error,
        "listener": {
            "up": listener.is_following(),
            "mode": listener.mode().map(|m| m.as_str()),
            "read_age_ms": listener.last_read_age().map(|d| d.as_millis() as u64),
            "lag_ms": state.metrics.last_lag().map(|d| d.as_secs_f64() * 1000.0),
        },
        "events_per_second": state.activity.events_per_second(),
        "instances": instances,
        "tenant_count": tenant_count,
        "connection_count": connection_count,
        "tenants": tenants,
        "overdue_orders": overdue,
        "recent": recent,
    });
    (SECURITY_HEADERS, Json(body)).into_response()
}

/// The `/metrics` gauges read from the database, as of the last successful background refresh
/// ([`refresh_gauges`]).
#[derive(Debug, Default)]
pub struct DatabaseGauges(Mutex<Option<GaugeReading>>);

#[derive(Debug, Clone, Copy)]
struct GaugeReading {
    at: Instant,
    notification_queue_usage: f64,
    tenants_without_terminal: i64,
    /// Overdue orders never delivered to a terminal.
    orders_undelivered: i64,
    /// Overdue orders delivered and not acknowledged.
    orders_unacknowledged: i64,
}

impl DatabaseGauges {
    fn set(&self, reading: GaugeReading) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(reading);
    }

    /// The last reading if it is at most `max_age` old.
    fn fresh(&self, max_age: Duration) -> Option<GaugeReading> {
        let reading = *self.0.lock().unwrap_or_else(|e| e.into_inner());
        reading.filter(|r| r.at.elapsed() <= max_age)
    }
}

/// Refreshes [`DatabaseGauges`] every presence interval until shutdown, on the admin share of
/// the pool: they count what the presence heartbeat writes, so refreshing more often would read
/// the same rows again, and scrapes (however many) cost the database nothing.
pub(crate) async fn refresh_gauges(state: AppState) {
    let mut clock = Periodic::every(state.tuning.presence_interval);
    while clock.tick(&state.shutdown).await {
        let ack_timeout = state.tuning.ack_timeout.as_secs();
        let read = state.admin_db.run(db::QUERY_TIMEOUT, async |c| {
            let gauges = db::admin::gauges(&***c).await?;
            let overdue = db::acks::overdue_counts(&***c, ack_timeout).await?;
            Ok((gauges, overdue))
        });
        let read = tokio::select! {
            _ = state.shutdown.cancelled() => return,
            r = read => r,
        };
        match read {
            Ok((gauges, (undelivered, unacknowledged))) => state.db_gauges.set(GaugeReading {
                at: Instant::now(),
                notification_queue_usage: gauges.notification_queue_usage,
                tenants_without_terminal: gauges.tenants_without_terminal,
                orders_undelivered: undelivered,
                orders_unacknowledged: unacknowledged,
            }),
            // Visible as orderpush_scrape_database_ok 0 once the last reading is too old.
            Err(e) => tracing::debug!(error = %e, "database gauges not refreshed"),
        }
    }
}

/// Gauges for `/metrics`, all from memory (a scrape never touches the database): presence, the
/// listener's read age, the undelivered alert, and the database gauges as of the last
/// background refresh ([`refresh_gauges`]) when it is recent enough.
pub(crate) fn scrape_gauges(state: &AppState) -> Vec<(&'static str, &'static str, f64)> {
    let mut gauges = Vec::with_capacity(8);
    if let Some(age) = state.listener.last_read_age() {
        gauges.push((
            "orderpush_listener_read_age_seconds",
            "Seconds since the listener last completed a read of the event log (its lag).",
            age.as_secs_f64(),
        ));
    }
    if let Some(lag) = state.metrics.last_lag() {
        gauges.push((
            "orderpush_listener_last_lag_seconds",
            "Commit-to-send lag of the last event the listener read (see the histogram for all).",
            lag.as_secs_f64(),
        ));
    }
    gauges.push((
        "orderpush_instances",
        "Live orderpush instances seen through presence at the last heartbeat.",
        state.presence.live_instances() as f64,
    ));
    let alerting = state
        .activity
        .undelivered()
        .iter()
        .filter(|u| {
            state.hub.tenant_connections(&u.tenant) == 0
                && state.presence.connected_elsewhere(&u.tenant) != Some(true)
        })
        .count();
    gauges.push((
        "orderpush_tenants_undelivered",
        "Tenants that received events in the last 10 minutes with no terminal connected, and still have none.",
        alerting as f64,
    ));
    let max_age = GAUGE_MAX_AGE.max(state.tuning.presence_interval * 3);
    let reading = state.db_gauges.fresh(max_age);
    gauges.push((
        "orderpush_scrape_database_ok",
        "1 when the database gauges below are fresh (refreshed in the background within 15 s).",
        f64::from(u8::from(reading.is_some())),
    ));
    if let Some(r) = reading {
        gauges.push((
            "orderpush_notification_queue_usage_ratio",
            "pg_notification_queue_usage(): fraction of Postgres's NOTIFY queue in use (1 = NOTIFY fails).",
            r.notification_queue_usage,
        ));
        gauges.push((
            "orderpush_tenants_without_terminal",
            "Tenants with an active API key and no terminal connected to any instance.",
            r.tenants_without_terminal as f64,
        ));
        gauges.push((
            "orderpush_orders_undelivered",
            "Open orders past their tenant's acknowledgement timeout that never reached a terminal (cluster-wide).",
            r.orders_undelivered as f64,
        ));
        gauges.push((
            "orderpush_orders_unacknowledged",
            "Open orders past their tenant's acknowledgement timeout that reached a terminal and were not acknowledged (cluster-wide).",
            r.orders_unacknowledged as f64,
        ));
    }
    gauges
}
