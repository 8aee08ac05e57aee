//! Operations endpoints (contract §6): `/healthz`, `/readyz`, `/metrics`.

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use super::AppState;

/// /readyz's database probe: a healthy local Postgres answers `SELECT 1` in well under a
/// millisecond; two seconds means it is not serving.
pub const READY_DB_TIMEOUT: Duration = Duration::from_secs(2);

/// Routes of this group.
pub fn router() -> Router<AppState> {
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

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let database = tokio::time::timeout(READY_DB_TIMEOUT, async {
        let client = state.pool.get().await.ok()?;
        client.query_one("SELECT 1", &[]).await.ok()
    })
    .await
    .ok()
    .flatten()
    .is_some();
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
    ];
    extra.extend(super::status::scrape_gauges(&state).await);
    let body = state.metrics.render(&extra);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}
