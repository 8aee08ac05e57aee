//! The HTTP surface (axum): one module per route group, each exposing `router()`, sharing
//! [`AppState`].

pub mod admin;
pub mod auth;
pub mod broadcast;
pub mod error;
pub mod health;
pub mod limits;
pub mod serve;
pub mod status;
pub mod ws;

use std::sync::Arc;

use axum::Router;
use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use error::Error;

use crate::activity::Activity;
use crate::config::Tuning;
use crate::db::PoolShare;
use crate::hub::Hub;
use crate::listener::ListenerHealth;
use crate::metrics::Metrics;
use crate::presence::Presence;

/// What every handler can reach. Cloning is one reference count.
#[derive(Clone)]
pub(crate) struct AppState(Arc<Shared>);

/// The shared parts behind [`AppState`].
pub struct Shared {
    /// Request pool (never used for LISTEN; /broadcast has a pool of its own).
    pub pool: Pool,
    /// The request pool's share for replays from the event log (`db::REPLAY_CONNECTIONS`).
    pub replays: PoolShare,
    /// The request pool's share for the admin API, the status page and the background
    /// refresh of the `/metrics` database gauges (`db::ADMIN_CONNECTIONS`).
    pub admin_db: PoolShare,
    /// The `/metrics` gauges read from the database, refreshed in the background.
    pub db_gauges: Arc<status::DatabaseGauges>,
    /// Per-tenant fan-out.
    pub hub: Arc<Hub>,
    /// Process metrics.
    pub metrics: Arc<Metrics>,
    /// The listener's state, for /readyz.
    pub listener: Arc<ListenerHealth>,
    /// Cached key lookups.
    pub keys: Arc<auth::KeyCache>,
    /// Required bearer token for /broadcast, if configured.
    pub broadcast_token: Option<String>,
    /// Required bearer token for /admin/* and /status, if configured.
    pub admin_token: Option<String>,
    /// This instance's connected terminals, synced to the database for every instance to see.
    pub presence: Arc<Presence>,
    /// Recent events and rates, for the status page.
    pub activity: Arc<Activity>,
    /// Queue to the batching /broadcast writer.
    pub broadcasts: broadcast::Writer,
    /// Intervals and bounds.
    pub tuning: Tuning,
    /// The caps on WebSocket connections and their counts.
    pub connection_limits: Arc<limits::ConnectionLimits>,
    /// Cancelled when the server shuts down: sockets send 1001 and end.
    pub shutdown: CancellationToken,
    /// Tracks every socket task so shutdown can wait for their close frames.
    pub tracker: TaskTracker,
}

impl AppState {
    /// Wraps the shared parts.
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// All routes. The authenticated ones (POS sockets, /broadcast, /admin, /status) sit behind
/// the failed-authentication limiter; the health and metrics endpoints do not.
pub(crate) fn router(state: AppState) -> Router {
    let limiter = Arc::new(auth::AuthLimiter::from_tuning(&state.tuning));
    Router::new()
        .merge(ws::router())
        .merge(broadcast::router())
        .merge(admin::router())
        .merge(status::router())
        .route_layer(axum::middleware::from_fn_with_state(
            limiter,
            auth::limit_failed_auth,
        ))
        .merge(health::router())
        .with_state(state)
}
