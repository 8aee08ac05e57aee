//! Wires the service together and runs it until shutdown: migrations, the pool, the listener,
//! the hub, the background jobs (revocation watcher, retention, presence) and the HTTP server.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::activity::Activity;
use crate::alert::{self, UndeliveredAlert};
use crate::config::Tuning;
use crate::db::{self, DbError, events};
use crate::http::{self, AppState, Shared, auth, broadcast, limits::ConnectionLimits};
use crate::hub::{self, Frame, Hub, RECENT_FRAMES};
use crate::listener::{Listener, ListenerHealth, NumberedWaiters, Start};
use crate::metrics::Metrics;
use crate::periodic::Periodic;
use crate::presence::{self, InstanceInfo, InstanceStats, Presence};
use crate::revocation;
use crate::sequencer::{Sequencer, SequencerHealth};

/// After shutdown starts, how long sockets get to send their 1001 close frames and background
/// tasks to stop before the process exits anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How far back the hub's resume history is loaded at start-up: a POS that was away longer
/// than this (or whose tenant is quiet) replays from the database instead.
pub(crate) const PRELOAD_WINDOW: Duration = Duration::from_secs(15 * 60);

/// Pending connections the kernel queues for `accept`. mio's default (128) overflows when a
/// fleet of terminals reconnects at once (each dropped SYN costs the client a ~1 s retransmit);
/// 4096 absorbs a 10k-terminal storm (Linux caps it at net.core.somaxconn).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds the service's listening socket with [`LISTEN_BACKLOG`].
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // A restarted instance can bind at once despite the old one's sockets in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// What `run` needs to know.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where the database is.
    pub database: tokio_postgres::Config,
    /// Bearer token for /broadcast; `None` = loopback callers only.
    pub broadcast_token: Option<String>,
    /// Bearer token for /admin/* and /status; `None` = loopback callers only.
    pub admin_token: Option<String>,
    /// How long events stay replayable.
    pub retention: Duration,
    /// Apply migrations before serving.
    pub migrate: bool,
    /// Intervals and bounds.
    pub tuning: Tuning,
}

/// Why the server could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The database could not be reached or migrated.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The listening socket failed.
    #[error("HTTP server: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves on `listener` until `shutdown` is cancelled, then closes every socket with 1001 and
/// returns once all tasks have stopped (or [`SHUTDOWN_GRACE`] has passed).
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    if config.migrate {
        let applied = db::migrate::run(&config.database).await?;
        if !applied.is_empty() {
            info!(?applied, "applied migrations");
        }
    }
    let pool = db::pool(&config.database)?;
    let metrics = Arc::new(Metrics::default());
    let hub = Hub::new(
        config.tuning.client_queue_bytes,
        config.tuning.client_queue_frames,
        config.retention,
        Arc::clone(&metrics),
    );
    let listener_health = Arc::new(ListenerHealth::default());
    let tracker = TaskTracker::new();

    // The listener starts at the current heads, read before the first socket is accepted:
    // clients that were away catch up with `since`, new ones get everything from now on. The
    // hub is seeded with each tenant's newest events, so the reconnect storm after a restart is
    // served from memory.
    let start = {
        let client = pool.get().await.map_err(DbError::from)?;
        let (batch, heads) = events::start(&**client).await?;
        let recent = events::recent(&**client, RECENT_FRAMES as i64, PRELOAD_WINDOW).await?;
        let mut by_tenant: HashMap<String, Vec<Frame>> = HashMap::new();
        for e in recent {
            let frame = Frame::event(e.id, &e.kind, &e.to_frame(), e.emitted_at);
            by_tenant
                .entry(e.tenant.to_string())
                .or_default()
                .push(frame);
        }
        for (tenant, head) in &heads {
            hub.reset(tenant, *head, by_tenant.remove(tenant).unwrap_or_default());
        }
        Start { batch, heads }
    };
    let presence = Presence::new(InstanceInfo::current(listener.local_addr()?));
    let activity = Arc::new(Activity::default());
    let waiters = Arc::new(NumberedWaiters::default());
    let follower = Listener::new(
        &config.database,
        start,
        Arc::clone(&hub),
        Arc::clone(&metrics),
        Arc::clone(&listener_health),
        Arc::clone(&waiters),
    )
    .with_alert(
        UndeliveredAlert::new(Arc::clone(&metrics))
            .cluster_wide(Arc::clone(&presence), Arc::clone(&activity)),
    );
    tracker.spawn(follower.run(shutdown.clone()));
    // Every instance stands for election; one numbers staged rows at a time.
    let sequencer_health = Arc::new(SequencerHealth::default());
    let sequencer = Sequencer::new(
        &config.database,
        Arc::clone(&metrics),
        Arc::clone(&sequencer_health),
        {
            let listener = Arc::clone(&listener_health);
            move || listener.mode()
        },
    );
    tracker.spawn(sequencer.run(shutdown.clone()));
    tracker.spawn(presence::run(
        Arc::clone(&presence),
        config.database.clone(),
        config.tuning.presence_interval,
        {
            let listener = Arc::clone(&listener_health);
            let activity = Arc::clone(&activity);
            let metrics = Arc::clone(&metrics);
            move || InstanceStats {
                listener_up: listener.is_following(),
                listener_mode: listener.mode().map(|m| m.as_str().to_owned()),
                listener_read_age_ms: listener.last_read_age().map(|d| d.as_millis() as i64),
                listener_lag_ms: metrics.last_lag().map(|d| d.as_secs_f64() * 1000.0),
                events_per_second: activity.events_per_second(),
            }
        },
        Arc::clone(&metrics),
        shutdown.clone(),
    ));
    // Its own pool: no amount of replays, logins or scrapes can keep a broadcast from a
    // connection.
    let broadcasts =
        broadcast::Writer::spawn(db::writer_pool(&config.database)?, waiters, &tracker);

    let state = AppState::new(Shared {
        pool: pool.clone(),
        replays: db::PoolShare::new(pool.clone(), db::REPLAY_CONNECTIONS),
        admin_db: db::PoolShare::new(pool.clone(), db::ADMIN_CONNECTIONS),
        db_gauges: Arc::default(),
        hub,
        metrics,
        listener: listener_health,
        keys: Arc::default(),
        broadcast_token: config.broadcast_token.clone(),
        admin_token: config.admin_token.clone(),
        presence,
        activity,
        broadcasts,
        connection_limits: Arc::new(ConnectionLimits::from_tuning(&config.tuning)),
        tuning: config.tuning.clone(),
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
    });
    tracker.spawn(revocation::run(
        revocation::Watched {
            keys: Arc::clone(&state.keys),
            hub: Arc::clone(&state.hub),
            check_interval: state.tuning.revocation_check_interval,
            shutdown: shutdown.clone(),
        },
        config.database.clone(),
    ));
    tracker.spawn(http::status::refresh_gauges(state.clone()));
    tracker.spawn(alert::unacknowledged::run(
        state.admin_db.clone(),
        state.tuning.ack_timeout,
        state.tuning.ack_check_interval,
        Arc::clone(&state.metrics),
        shutdown.clone(),
    ));
    tracker.spawn(hub::watch_drains(
        Arc::clone(&state.hub),
        state.tuning.drain_timeout,
        shutdown.clone(),
    ));
    tracker.spawn(retention_loop(
        pool,
        config.retention,
        state.tuning.prune_interval,
        Arc::clone(&state.metrics),
        shutdown.clone(),
    ));

    for warning in auth::exposure_warnings(
        listener.local_addr()?,
        config.broadcast_token.is_some(),
        config.admin_token.is_some(),
    ) {
        warn!("{warning}");
    }
    info!(addr = %listener.local_addr()?, "orderpush listening");
    let timeouts = http::serve::Timeouts::from_tuning(&state.tuning);
    let app = http::router(state);
    http::serve::serve(listener, app, timeouts, shutdown.clone(), tracker.clone()).await;

    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        warn!("some connections did not close within {SHUTDOWN_GRACE:?}; exiting anyway");
    }
    info!("orderpush stopped");
    Ok(())
}

/// Deletes events past the retention now and then every `interval`.
async fn retention_loop(
    pool: deadpool_postgres::Pool,
    retention: Duration,
    interval: Duration,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut clock = Periodic::every(interval);
    while clock.tick(&shutdown).await {
        let result = match pool.get().await {
            Ok(client) => events::prune(&**client, retention).await,
            Err(e) => Err(e.into()),
        };
        match result {
            Ok(0) => {}
            Ok(n) => {
                metrics
                    .pruned_events
                    .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                info!(deleted = n, "retention: pruned old events");
            }
            Err(e) => warn!(error = %e, "retention run failed; will retry"),
        }
    }
}
