//! Operations endpoints (docs/operations.md): `/healthz`, `/readyz`, `/metrics`, all answered from
//! memory: no probe or scrape ever waits for the database or takes a pooled connection.

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use super::AppState;

/// /readyz counts the database reachable while a background connection completed a query this
/// recently: the listener reads at least every second and the presence heartbeat writes every
/// 2 s when healthy, so 8 s is several missed rounds, and a database that stops answering is
/// noticed within the 10 s docs/protocol.md promises.
pub(crate) const DATABASE_FRESH: Duration = Duration::from_secs(8);

/// Routes of this group.
pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

async fn healthz() -> impl IntoResponse {
    (
        StatusCode::OK,
        axum::Json(serde_json::json!({ "status": "ok" })),
    )
}

/// 200 when the database is reachable and the listener is following, else 503. "Reachable" is
/// what the background connections saw (the listener's last read, the last presence flush),
/// not a query of its own: a flood of probes costs the database nothing, and a busy pool
/// cannot make the instance look down.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let database = [
        state.listener.last_read_age(),
        state.presence.last_flush_age(),
    ]
    .into_iter()
    .flatten()
    .any(|age| age <= DATABASE_FRESH);
    let listener = state.listener.is_following();
    let ready = database && listener;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "not ready" },
        "database": database,
        "listener": listener,
    });
    (status, axum::Json(body))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let pool = state.pool.status();
    let mut extra = vec![
        (
            "orderpush_db_pool_connections",
            "Connections held by the request pool.",
            pool.size as f64,
        ),
        (
            "orderpush_db_pool_available",
            "Idle connections in the request pool.",
            pool.available as f64,
        ),
        (
            "orderpush_db_replay_connections",
            "Request-pool connections taken by replays from the event log (at most half the pool).",
            state.replays.in_use() as f64,
        ),
        (
            "orderpush_db_admin_connections",
            "Request-pool connections taken by the admin API, the status page and the gauge refresh.",
            state.admin_db.in_use() as f64,
        ),
    ];
    extra.extend(super::status::scrape_gauges(&state));
    let body = state.metrics.render(&extra);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}
