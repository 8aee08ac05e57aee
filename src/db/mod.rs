//! Postgres access: connection settings, the pool, and one module per group of queries.

pub mod broadcasts;
pub mod events;
pub mod keys;
pub mod migrate;
pub mod sequencer;
pub mod triggers;
pub mod uninstall;

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

/// Connections the pool may open. /broadcast batches and replays are short; 16 covers two cores
/// many times over while staying far below Postgres's default max_connections of 100.
pub const POOL_SIZE: usize = 16;
/// How long a request waits for a pooled connection before it is answered 503.
pub const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection attempt that has not completed by then is a dead or unreachable server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP keepalive idle time: a half-open connection (e.g. after a failover) is noticed by the
/// kernel in about a minute even when no query is running.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);

/// A database failure, as the library reports it.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The driver reported an error (connection, SQL, constraint).
    #[error("postgres: {0}")]
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

/// Applies orderpush's connection defaults (timeouts, keepalive, application name) to a config
/// parsed from the user's URL, without overriding what the URL set explicitly.
pub fn with_defaults(
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
pub fn pool(config: &tokio_postgres::Config) -> Result<Pool, DbError> {
    let manager = Manager::from_config(
        with_defaults(config, "orderpush"),
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Ok(Pool::builder(manager)
        .max_size(POOL_SIZE)
        .wait_timeout(Some(POOL_WAIT_TIMEOUT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .runtime(Runtime::Tokio1)
        .build()?)
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

/// Checks a tenant slug's syntax (the `tenants.slug` CHECK constraint) without a query.
pub fn is_valid_tenant_slug(s: &str) -> bool {
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
