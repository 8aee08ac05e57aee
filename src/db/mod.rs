//! Postgres access: connection settings, the pool, and one module per group of queries. Every
//! SQL statement of the service lives in this module tree.

/// The live-instance rule, written once: the CTE `live`, the instances whose heartbeat is within
/// `$1` seconds (every query that uses it binds [`presence::INSTANCE_STALE_AFTER`] there). Used as
/// `concat!("WITH ", live_instances!(), " SELECT … FROM live …")`.
macro_rules! live_instances {
    () => {
        "live AS (SELECT * FROM orderpush.instances
                  WHERE heartbeat_at >= now() - make_interval(secs => $1))"
    };
}

pub mod acks;
pub mod admin;
pub mod broadcasts;
pub mod events;
pub mod keys;
pub mod migrate;
pub mod presence;
pub mod sequencer;
pub mod snapshot;
pub mod triggers;
pub mod uninstall;
pub mod wakeup;

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::Semaphore;
use tokio_postgres::NoTls;

/// Connections the request pool may open. Replay pages, key lookups and admin queries are
/// short; 16 covers two cores many times over while staying far below Postgres's default
/// max_connections of 100.
pub(crate) const POOL_SIZE: usize = 16;
/// Replays (`?since=` from the event log) may hold at most half the request pool at once
/// ([`PoolShare`]): however many terminals replay, the other half stays free for key lookups
/// (logins), admin queries and retention.
pub(crate) const REPLAY_CONNECTIONS: usize = POOL_SIZE / 2;
/// The admin API, the status page and the background refresh of the `/metrics` database
/// gauges share this many request-pool connections: enough for an operator and a scraper, and
/// a flood of admin requests waits (then gets 503) instead of taking the pool.
pub(crate) const ADMIN_CONNECTIONS: usize = 2;
/// The /broadcast writer's own pool: one connection that nothing else can take, re-opened by
/// the pool when it breaks. The writer is one task writing one batch at a time, so one is
/// all it can use.
pub(crate) const WRITER_CONNECTIONS: usize = 1;
/// How long a request waits for a pooled connection before it is answered 503.
pub(crate) const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection attempt that has not completed by then is a dead or unreachable server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a query of the service's own connections (listener, revocation watcher, presence,
/// the admin share) may take: slower means a dead or wedged connection (or a database in
/// trouble), and the caller reconnects or answers 503. Generous for the small statements they
/// run, short enough that /readyz and the operators notice within seconds.
pub(crate) const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs a database call for at most `limit`: a call that takes longer is abandoned and reported
/// as [`DbError::Timeout`] (the caller drops or cancels the connection it ran on).
pub(crate) async fn with_timeout<T, E: Into<DbError>>(
    limit: Duration,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, DbError> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(DbError::Timeout),
    }
}

/// TCP keepalive idle time: a half-open connection (e.g. after a failover) is noticed by the
/// kernel in about a minute even when no query is running.
pub(crate) const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);

/// A database failure, as the library reports it.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The driver reported an error (connection, SQL, constraint).
    #[error("postgres: {}", describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// No pooled connection could be had in time.
    #[error("connection pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// The pool could not be built from the configuration.
    #[error("connection pool setup: {0}")]
    PoolSetup(#[from] deadpool_postgres::BuildError),
    /// The connection ended.
    #[error("database connection closed")]
    Closed,
    /// A query did not finish in time.
    #[error("database query timed out")]
    Timeout,
    /// A migration failed.
    #[error("migration: {0}")]
    Migration(String),
}

/// The server's own message for an error it reported (the driver's `Display` says only "db
/// error"), else the driver's description.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// Applies orderpush's connection defaults (timeouts, keepalive, application name) to a config
/// parsed from the user's URL, without overriding what the URL set explicitly.
pub(crate) fn with_defaults(
    config: &tokio_postgres::Config,
    application_name: &str,
) -> tokio_postgres::Config {
    let mut c = config.clone();
    if c.get_connect_timeout().is_none() {
        c.connect_timeout(CONNECT_TIMEOUT);
    }
    c.keepalives(true).keepalives_idle(KEEPALIVE_IDLE);
    if c.get_application_name().is_none() {
        c.application_name(application_name);
    }
    c
}

/// Builds the request pool (never used for LISTEN: pooled connections drop notifications).
/// Replays and admin queries reach it only through a [`PoolShare`].
pub fn pool(config: &tokio_postgres::Config) -> Result<Pool, DbError> {
    build_pool(config, "orderpush", POOL_SIZE)
}

/// Builds the /broadcast writer's pool of [`WRITER_CONNECTIONS`], separate from the request
/// pool, so that no amount of replays, logins or scrapes can keep a broadcast from being
/// written.
pub(crate) fn writer_pool(config: &tokio_postgres::Config) -> Result<Pool, DbError> {
    build_pool(config, "orderpush-writer", WRITER_CONNECTIONS)
}

fn build_pool(
    config: &tokio_postgres::Config,
    application_name: &str,
    size: usize,
) -> Result<Pool, DbError> {
    let manager = Manager::from_config(
        with_defaults(config, application_name),
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Ok(Pool::builder(manager)
        .max_size(size)
        .wait_timeout(Some(POOL_WAIT_TIMEOUT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .runtime(Runtime::Tokio1)
        .build()?)
}

/// A bounded share of the request pool for one kind of work (replays, admin queries): at most
/// `size` of its connections at once, whatever the demand. Cloning shares the same bound.
#[derive(Debug, Clone)]
pub struct PoolShare {
    pool: Pool,
    permits: Arc<Semaphore>,
    size: usize,
}

impl PoolShare {
    /// A share of `pool` of at most `size` connections.
    pub fn new(pool: Pool, size: usize) -> Self {
        Self {
            pool,
            permits: Arc::new(Semaphore::new(size)),
            size,
        }
    }

    /// Runs `work` on a connection of this share. A permit is taken before the connection, so
    /// waiting callers never hold one; both together are waited for at most
    /// [`POOL_WAIT_TIMEOUT`] each, and `work` runs for at most `timeout`. A query that times out
    /// is cancelled on the server and its connection discarded: the pool never hands out a
    /// connection with someone else's query still running on it.
    pub async fn run<T>(
        &self,
        timeout: Duration,
        work: impl AsyncFnOnce(&deadpool_postgres::Client) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        let _permit = tokio::time::timeout(POOL_WAIT_TIMEOUT, self.permits.acquire())
            .await
            .map_err(|_| DbError::Timeout)?
            .map_err(|_| DbError::Closed)?;
        let client = self.pool.get().await?;
        match tokio::time::timeout(timeout, work(&client)).await {
            Ok(result) => result,
            Err(_) => {
                let cancel = client.cancel_token();
                drop(deadpool_postgres::Object::take(client));
                // Deliberately detached: one short request to the server, bounded by the
                // connect timeout, that must outlive the caller (who has given up).
                tokio::spawn(async move {
                    if let Err(e) = cancel.cancel_query(NoTls).await {
                        tracing::debug!(error = %e, "could not cancel a timed-out query");
                    }
                });
                Err(DbError::Timeout)
            }
        }
    }

    /// Connections of this share in use (or being waited for) now.
    pub(crate) fn in_use(&self) -> usize {
        self.size - self.permits.available_permits()
    }
}

/// Opens one unpooled connection, for the CLI and the migrator. The connection driver runs on a
/// detached task that ends by itself when the returned client is dropped.
pub async fn connect(
    config: &tokio_postgres::Config,
    application_name: &str,
) -> Result<tokio_postgres::Client, DbError> {
    let (client, connection) = with_defaults(config, application_name)
        .connect(NoTls)
        .await?;
    // Deliberately detached: it owns nothing but the socket and finishes with the client.
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "database connection closed");
        }
    });
    Ok(client)
}

/// Subscribes `client`'s session to the NOTIFY `channel`: one of the channel constants of this
/// module tree ([`sequencer::BATCH_CHANNEL`], [`sequencer::STAGED_CHANNEL`],
/// [`keys::CHANGES_CHANNEL`]), which are plain identifiers and are not quoted.
pub async fn listen(client: &tokio_postgres::Client, channel: &'static str) -> Result<(), DbError> {
    client.batch_execute(&format!("LISTEN {channel}")).await?;
    Ok(())
}

/// One round trip that proves the connection alive.
pub async fn ping(client: &tokio_postgres::Client) -> Result<(), DbError> {
    client.simple_query("SELECT 1").await?;
    Ok(())
}

/// Checks a tenant slug's syntax (the `tenants.slug` CHECK constraint) without a query.
pub(crate) fn is_valid_tenant_slug(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::is_valid_tenant_slug;

    #[test]
    fn slugs_follow_the_check_constraint() {
        for ok in ["kitchen", "a", "pizza-palace-2", &"a".repeat(63)] {
            assert!(is_valid_tenant_slug(ok), "{ok}");
        }
        for bad in [
            "",
            "Kitchen",
            "kit chen",
            "kitchen/..",
            "k%2F",
            "ünï",
            &"a".repeat(64),
        ] {
            assert!(!is_valid_tenant_slug(bad), "{bad}");
        }
    }
}
