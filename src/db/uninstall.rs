//! Removing orderpush from a database: its triggers, schema, settings and migration history,
//! never the application's tables or data (`orderpush uninstall`, docs/dba.md).

use super::DbError;

/// The SQL `orderpush uninstall --yes` runs, verbatim; docs/dba.md carries the same text (a test
/// keeps them equal) for DBAs who prefer psql.
pub const UNINSTALL_SQL: &str = include_str!("uninstall.sql");

/// Another session of orderpush still connected to the database.
#[derive(Debug, Clone)]
pub struct Session {
    /// Backend pid.
    pub pid: i32,
    /// Its `application_name` (orderpush, orderpush-listener, ...).
    pub application: String,
    /// Client address, if over TCP.
    pub client: Option<String>,
}

/// Why uninstalling did not happen.
#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    /// orderpush instances are still connected; they would fail noisily once the schema is gone.
    #[error(
        "{} orderpush session(s) still connected ({}); stop every `orderpush serve` first",
        .0.len(),
        .0.iter().map(|s| format!("pid {} {}{}", s.pid, s.application,
            s.client.as_deref().map(|c| format!(" from {c}")).unwrap_or_default()))
            .collect::<Vec<_>>().join(", ")
    )]
    InUse(Vec<Session>),
    /// The database failed (e.g. a lock timeout: retry when the tables are quieter).
    #[error(transparent)]
    Db(#[from] DbError),
}

/// What was there before removal, for the operator's record.
#[derive(Debug, Clone, Default)]
pub struct Removed {
    /// Rows in the event log.
    pub events: i64,
    /// API keys (revoked or not).
    pub keys: i64,
    /// Whether the schema existed at all.
    pub schema_existed: bool,
}

/// Other orderpush sessions connected to this database (by `application_name`).
pub async fn other_sessions(client: &tokio_postgres::Client) -> Result<Vec<Session>, DbError> {
    let rows = client
        .query(
            "SELECT pid, application_name, client_addr::text FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND application_name LIKE 'orderpush%'
             ORDER BY pid",
            &[],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| Session {
            pid: r.get(0),
            application: r.get(1),
            client: r.get(2),
        })
        .collect())
}

/// Runs [`UNINSTALL_SQL`] unless another orderpush session is connected.
pub async fn uninstall(client: &tokio_postgres::Client) -> Result<Removed, UninstallError> {
    let others = other_sessions(client).await?;
    if !others.is_empty() {
        return Err(UninstallError::InUse(others));
    }
    let schema_existed: bool = client
        .query_one("SELECT to_regnamespace('orderpush') IS NOT NULL", &[])
        .await
        .map_err(DbError::from)?
        .get(0);
    let mut removed = Removed {
        schema_existed,
        ..Removed::default()
    };
    if schema_existed {
        let count = |table: &'static str| async move {
            let exists: bool = client
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
                .await?
                .get(0);
            if !exists {
                return Ok::<i64, tokio_postgres::Error>(0);
            }
            Ok(client
                .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await?
                .get(0))
        };
        removed.events = count("orderpush.events").await.map_err(DbError::from)?;
        removed.keys = count("orderpush.api_keys").await.map_err(DbError::from)?;
    }
    client
        .batch_execute(UNINSTALL_SQL)
        .await
        .map_err(DbError::from)?;
    Ok(removed)
}
