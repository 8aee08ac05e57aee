//! The embedded refinery migrations: applied under a Postgres advisory lock (several instances
//! starting at once do not race) and a `lock_timeout` with bounded retries (DDL never queues
//! behind a long transaction and blocks the application's writes); plus `status` and `dry_run`.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;
use tokio_postgres::error::SqlState;
use tracing::warn;

use super::DbError;
use crate::backoff::Backoff;

mod embedded {
    #![allow(missing_docs)]
    refinery::embed_migrations!("migrations");
}

/// Advisory lock key held while migrating ('op' + 'mg' in ASCII); private to orderpush.
const MIGRATION_LOCK_KEY: i64 = 0x6f70_6d67;

/// refinery's bookkeeping table (its default name; orderpush does not change it).
pub(crate) const HISTORY_TABLE: &str = "refinery_schema_history";

/// Wait before the first retry; doubled after each failed attempt.
pub(crate) const RETRY_BACKOFF_FIRST: Duration = Duration::from_secs(2);
/// Longest wait between two attempts.
pub(crate) const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(15);
/// How often, while a migration runs, a second connection looks up who blocks it. A lock wait
/// shorter than this may go unnamed; the lock timeout is at least a second, so a real one is seen.
pub(crate) const BLOCKER_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Characters of a blocking session's last statement quoted in messages.
const QUERY_EXCERPT_CHARS: usize = 160;

/// How to apply migrations. `Default` gives the production values (the named constants).
#[derive(Debug, Clone)]
pub struct Options {
    /// `lock_timeout` of the migrating session.
    pub lock_timeout: Duration,
    /// Attempts (1 = no retry) when a migration cannot get a lock in time.
    pub attempts: u32,
    /// Stop after this version (`None`: apply everything).
    pub target: Option<i32>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            lock_timeout: crate::config::MIGRATE_LOCK_TIMEOUT,
            attempts: crate::config::MIGRATE_LOCK_ATTEMPTS,
            target: None,
        }
    }
}

/// What went wrong while migrating.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The database could not be reached or queried.
    #[error(transparent)]
    Db(#[from] DbError),
    /// refinery refused or a migration's SQL failed.
    #[error("{0}")]
    Refinery(String),
    /// Every attempt timed out waiting for a lock.
    #[error(
        "gave up after {attempts} attempt(s): {detail}. Nothing of that migration was applied; \
         end or wait for the blocking transaction, then run `orderpush migrate` again"
    )]
    LockTimeout {
        /// Attempts made.
        attempts: u32,
        /// Which migration waited for what, held by whom.
        detail: String,
    },
    /// Instances of a version that numbers events in the writer's transaction are still
    /// connected; they cannot run beside the sequencer that V5 introduces.
    #[error(
        "instances of an older orderpush are still connected ({0}); they number events in the \
         writers' transactions and cannot run beside this version's sequencer. Stop them, run \
         `orderpush migrate` again, then start this version (docs/operations.md, \"Upgrading\")"
    )]
    OlderInstancesConnected(String),
    /// `--target` names no embedded migration.
    #[error("no migration has version {0}; see `orderpush migrate status`")]
    UnknownTarget(i32),
}

impl From<tokio_postgres::Error> for MigrateError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Db(e.into())
    }
}

/// Applies every pending migration with the production options; returns the names applied now.
pub async fn run(config: &tokio_postgres::Config) -> Result<Vec<String>, DbError> {
    apply(config, &Options::default())
        .await
        .map_err(|e| match e {
            MigrateError::Db(e) => e,
            other => DbError::Migration(other.to_string()),
        })
}

/// Applies pending migrations (up to `options.target`); returns the names applied now.
pub async fn apply(
    config: &tokio_postgres::Config,
    options: &Options,
) -> Result<Vec<String>, MigrateError> {
    let mut runner = embedded::migrations::runner().set_abort_divergent(true);
    if let Some(v) = options.target {
        if !runner.get_migrations().iter().any(|m| m.version() == v) {
            return Err(MigrateError::UnknownTarget(v));
        }
        runner = runner.set_target(refinery::Target::Version(v));
    }
    let mut client = super::connect(config, "orderpush-migrate").await?;
    // Session-level lock: a second instance waits here until the first has finished, then finds
    // nothing left to do. It is released by the unlock below or, at the latest, on disconnect.
    // Taken before lock_timeout is set: waiting for a fellow migrator is expected and harmless.
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await?;
    let result = match refuse_beside_older_instances(&client, options.target).await {
        Ok(()) => apply_locked(config, &mut client, &runner, options).await,
        Err(e) => Err(e),
    };
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    result
}

/// The first migration of the staged write path (a sequencer numbers events after commit).
const STAGED_WRITE_PATH: i32 = 5;
/// The `application_name`s of a running instance's connections (older versions included).
const INSTANCE_SESSIONS: [&str; 4] = [
    "orderpush",
    "orderpush-listener",
    "orderpush-presence",
    "orderpush-revocation",
];

/// Refuses to install the staged write path while an older instance is connected: it would
/// keep numbering events in the writers' transactions, beside the new sequencer.
async fn refuse_beside_older_instances(
    client: &tokio_postgres::Client,
    target: Option<i32>,
) -> Result<(), MigrateError> {
    let versions: Vec<i32> = applied(client).await?.iter().map(|a| a.version).collect();
    let upgrading = versions.contains(&2) && !versions.contains(&STAGED_WRITE_PATH);
    if !upgrading || target.is_some_and(|t| t < STAGED_WRITE_PATH) {
        return Ok(());
    }
    let rows = client
        .query(
            "SELECT application_name || ' (pid ' || pid || coalesce(', ' || host(client_addr), '') || ')'
             FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND application_name = ANY($1)
             ORDER BY pid",
            &[&INSTANCE_SESSIONS.as_slice()],
        )
        .await?;
    let mut sessions: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    // Presence rows of instances whose heartbeat is fresh, in case they set their own
    // application_name.
    let live: Vec<String> = client
        .query(
            "SELECT 'instance ' || id || ' on ' || hostname FROM orderpush.instances
             WHERE to_regclass('orderpush.instances') IS NOT NULL
               AND heartbeat_at > now() - interval '15 seconds'",
            &[],
        )
        .await
        .map(|rows| rows.iter().map(|r| r.get(0)).collect())
        .unwrap_or_default();
    sessions.extend(live);
    if sessions.is_empty() {
        Ok(())
    } else {
        Err(MigrateError::OlderInstancesConnected(sessions.join(", ")))
    }
}

async fn apply_locked(
    config: &tokio_postgres::Config,
    client: &mut tokio_postgres::Client,
    runner: &refinery::Runner,
    options: &Options,
) -> Result<Vec<String>, MigrateError> {
    client
        .batch_execute(&format!(
            "SET lock_timeout = '{}ms'",
            options.lock_timeout.as_millis()
        ))
        .await?;
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .get(0);
    // A second connection names whoever blocks us; without it we still migrate, just say less.
    let monitor = super::connect(config, "orderpush-migrate-monitor")
        .await
        .ok();
    let attempts = options.attempts.max(1);
    let mut applied = Vec::new();
    let mut backoff = Backoff::new(RETRY_BACKOFF_FIRST, RETRY_BACKOFF_MAX);
    for attempt in 1..=attempts {
        let mut blockers: Vec<Blocker> = Vec::new();
        let result = {
            let run = runner.run_async(client);
            tokio::pin!(run);
            let mut poll = tokio::time::interval(BLOCKER_POLL_INTERVAL);
            loop {
                tokio::select! {
                    r = &mut run => break r,
                    _ = poll.tick() => {
                        if let Some(m) = &monitor {
                            if let Ok(found) = blockers_of(m, pid).await {
                                if !found.is_empty() {
                                    blockers = found;
                                }
                            }
                        }
                    }
                }
            }
        };
        match result {
            Ok(report) => {
                applied.extend(report.applied_migrations().iter().map(|m| m.to_string()));
                return Ok(applied);
            }
            Err(e) if is_lock_timeout(&e) => {
                if let Some(report) = e.report() {
                    applied.extend(report.applied_migrations().iter().map(|m| m.to_string()));
                }
                let detail = describe_wait(&e, &blockers, options.lock_timeout);
                if attempt == attempts {
                    return Err(MigrateError::LockTimeout { attempts, detail });
                }
                let delay = backoff.next_delay();
                warn!(
                    "{detail}; attempt {attempt} of {attempts} failed, retrying in {}s",
                    delay.as_secs()
                );
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(MigrateError::Refinery(describe_error(&e))),
        }
    }
    unreachable!("the loop returns on its last attempt")
}

/// True when the failure is Postgres's `lock_timeout` (SQLSTATE 55P03).
fn is_lock_timeout(e: &refinery::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(pg) = s.downcast_ref::<tokio_postgres::Error>() {
            return pg.code() == Some(&SqlState::LOCK_NOT_AVAILABLE);
        }
        source = s.source();
    }
    false
}

/// refinery's message plus the database's own (which refinery hides in the source chain).
fn describe_error(e: &refinery::Error) -> String {
    match e.kind() {
        refinery::error::Kind::Connection(what, source) => {
            let db = source
                .downcast_ref::<tokio_postgres::Error>()
                .and_then(|pg| pg.as_db_error())
                .map(|d| d.to_string())
                .unwrap_or_else(|| source.to_string());
            format!("{what}: {db}")
        }
        other => other.to_string(),
    }
}

fn describe_wait(e: &refinery::Error, blockers: &[Blocker], timeout: Duration) -> String {
    let what = match e.kind() {
        refinery::error::Kind::Connection(what, _) => what
            .strip_prefix("error applying migration ")
            .map(|m| format!("migration {m}"))
            .unwrap_or_else(|| what.clone()),
        _ => "a migration".into(),
    };
    let mut s = format!(
        "{what} waited {} ms (lock_timeout) for a table lock",
        timeout.as_millis()
    );
    if blockers.is_empty() {
        s.push_str(" (the holder released it before it could be identified)");
    }
    for (i, b) in blockers.iter().enumerate() {
        let _ = write!(
            s,
            "{} {} on {} held by pid {} (application '{}', user '{}'{}, {}, transaction open {}s; last statement: {})",
            if i == 0 { ": needs" } else { "; and" },
            b.mode,
            b.relation,
            b.pid,
            b.application,
            b.user,
            b.client
                .as_deref()
                .map(|c| format!(", from {c}"))
                .unwrap_or_default(),
            b.state,
            b.transaction_seconds,
            b.query,
        );
    }
    s
}

/// A session holding a lock the migration waits for.
#[derive(Debug, Clone)]
struct Blocker {
    relation: String,
    mode: String,
    pid: i32,
    application: String,
    user: String,
    client: Option<String>,
    state: String,
    transaction_seconds: i64,
    query: String,
}

async fn blockers_of(client: &tokio_postgres::Client, pid: i32) -> Result<Vec<Blocker>, DbError> {
    let rows = client
        .query(
            "SELECT coalesce((SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
                              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                              WHERE c.oid = w.relation), w.locktype),
                    w.mode, b.pid,
                    coalesce(b.application_name, ''), coalesce(b.usename::text, ''),
                    b.client_addr::text, coalesce(b.state, 'unknown'),
                    coalesce(extract(epoch FROM now() - b.xact_start)::bigint, 0),
                    regexp_replace(coalesce(b.query, ''), '\\s+', ' ', 'g')
             FROM pg_locks w
             CROSS JOIN LATERAL unnest(pg_blocking_pids(w.pid)) AS bp(pid)
             JOIN pg_stat_activity b ON b.pid = bp.pid
             WHERE w.pid = $1 AND NOT w.granted
             ORDER BY b.pid",
            &[&pid],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| Blocker {
            relation: r.get(0),
            mode: r.get(1),
            pid: r.get(2),
            application: r.get(3),
            user: r.get(4),
            client: r.get(5),
            state: r.get(6),
            transaction_seconds: r.get(7),
            query: excerpt(r.get(8)),
        })
        .collect())
}

fn excerpt(query: String) -> String {
    if query.chars().count() <= QUERY_EXCERPT_CHARS {
        return query;
    }
    let mut s: String = query.chars().take(QUERY_EXCERPT_CHARS).collect();
    s.push('…');
    s
}

/// Where one migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Applied, with the checksum this binary has.
    Applied,
    /// Not applied yet; `migrate` will apply it.
    Pending,
    /// Applied, but its SQL differs from this binary's (edited after it ran): `migrate` refuses.
    Divergent,
    /// Not applied but older than the newest applied one: refinery will never apply it.
    Skipped,
    /// In the history but not in this binary (applied by a newer orderpush).
    Unknown,
}

impl State {
    /// The word shown in the text table.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Applied => "applied",
            State::Pending => "pending",
            State::Divergent => "DIVERGENT",
            State::Skipped => "SKIPPED",
            State::Unknown => "unknown",
        }
    }
}

/// One line of `orderpush migrate status`.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationStatus {
    /// The version (`V<version>__name`).
    pub version: i32,
    /// The name after `__`.
    pub name: String,
    /// Applied, pending, ...
    pub state: State,
    /// When it was applied (RFC 3339, as refinery recorded it).
    pub applied_on: Option<String>,
    /// Checksum of this binary's SQL (refinery's SipHash-1-3, decimal); None for unknown ones.
    pub checksum: Option<String>,
    /// Checksum recorded when it was applied.
    pub applied_checksum: Option<String>,
}

struct Applied {
    version: i32,
    name: String,
    applied_on: String,
    checksum: String,
}

async fn applied(client: &tokio_postgres::Client) -> Result<Vec<Applied>, DbError> {
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&HISTORY_TABLE])
        .await?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            &format!(
                "SELECT version, coalesce(name, ''), coalesce(applied_on, ''), coalesce(checksum, '')
                 FROM {HISTORY_TABLE} ORDER BY version"
            ),
            &[],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| Applied {
            version: r.get(0),
            name: r.get(1),
            applied_on: r.get(2),
            checksum: r.get(3),
        })
        .collect())
}

/// Every migration, embedded or recorded, with its state; reads only (creates nothing).
pub async fn status(config: &tokio_postgres::Config) -> Result<Vec<MigrationStatus>, DbError> {
    let client = super::connect(config, "orderpush-migrate-status").await?;
    let done = applied(&client).await?;
    let newest = done.iter().map(|a| a.version).max();
    let runner = embedded::migrations::runner();
    let mut embedded: Vec<&refinery::Migration> = runner.get_migrations().iter().collect();
    embedded.sort_by_key(|m| m.version());
    let mut out: Vec<MigrationStatus> = embedded
        .iter()
        .map(|m| {
            let checksum = m.checksum().to_string();
            let record = done.iter().find(|a| a.version == m.version());
            let state = match record {
                Some(a) if a.checksum == checksum && a.name == m.name() => State::Applied,
                Some(_) => State::Divergent,
                None if newest.is_some_and(|n| n >= m.version()) => State::Skipped,
                None => State::Pending,
            };
            MigrationStatus {
                version: m.version(),
                name: m.name().to_owned(),
                state,
                applied_on: record.map(|a| a.applied_on.clone()),
                checksum: Some(checksum),
                applied_checksum: record.map(|a| a.checksum.clone()),
            }
        })
        .collect();
    for a in &done {
        if !embedded.iter().any(|m| m.version() == a.version) {
            out.push(MigrationStatus {
                version: a.version,
                name: a.name.clone(),
                state: State::Unknown,
                applied_on: Some(a.applied_on.clone()),
                checksum: None,
                applied_checksum: Some(a.checksum.clone()),
            });
        }
    }
    out.sort_by_key(|s| s.version);
    Ok(out)
}

/// The SQL `apply` would run, in order, as a script a DBA can read (or run with psql in a change
/// window): session settings, refinery's history table, then per pending migration its SQL and
/// its history row, each in its own transaction as refinery runs them. Reads only.
///
/// With `single_transaction`, the per-migration `BEGIN`/`COMMIT` are left out, so that
/// `psql --single-transaction -f script.sql -f more.sql` runs it and further files atomically.
pub(crate) async fn dry_run(
    config: &tokio_postgres::Config,
    options: &Options,
    single_transaction: bool,
) -> Result<(String, Vec<String>), MigrateError> {
    let statuses = status(config).await?;
    if let Some(d) = statuses.iter().find(|s| s.state == State::Divergent) {
        return Err(MigrateError::Refinery(format!(
            "migration V{}__{} was applied with another checksum ({}) than this binary's ({}); \
             `migrate` would refuse to run",
            d.version,
            d.name,
            d.applied_checksum.as_deref().unwrap_or("?"),
            d.checksum.as_deref().unwrap_or("?"),
        )));
    }
    if let Some(v) = options.target {
        if !statuses
            .iter()
            .any(|s| s.version == v && s.checksum.is_some())
        {
            return Err(MigrateError::UnknownTarget(v));
        }
    }
    let runner = embedded::migrations::runner();
    let pending: Vec<&refinery::Migration> = statuses
        .iter()
        .filter(|s| s.state == State::Pending && options.target.is_none_or(|t| s.version <= t))
        .filter_map(|s| {
            runner
                .get_migrations()
                .iter()
                .find(|m| m.version() == s.version)
        })
        .collect();
    let mut sql = String::new();
    let names: Vec<String> = pending.iter().map(|m| m.to_string()).collect();
    let _ = writeln!(
        sql,
        "-- orderpush migrate --dry-run: {} pending migration(s); nothing has been changed.",
        pending.len()
    );
    if pending.is_empty() {
        sql.push_str("-- The database is up to date.\n");
        return Ok((sql, names));
    }
    let _ = writeln!(
        sql,
        "-- `orderpush migrate` runs this on one session, holding advisory lock {MIGRATION_LOCK_KEY}."
    );
    let _ = writeln!(
        sql,
        "SET lock_timeout = '{}ms';\n",
        options.lock_timeout.as_millis()
    );
    let _ = writeln!(
        sql,
        "CREATE TABLE IF NOT EXISTS {HISTORY_TABLE} (version int4 PRIMARY KEY, name varchar(255), \
         applied_on varchar(255), checksum varchar(255));"
    );
    if single_transaction {
        sql.push_str(
            "-- No BEGIN/COMMIT: run it with `psql --single-transaction` (-1), e.g. together with \
             your own adaptation file.\n",
        );
    }
    let (begin, commit) = if single_transaction {
        ("", "")
    } else {
        ("BEGIN;\n", "\nCOMMIT;")
    };
    for m in pending {
        let body = m.sql().unwrap_or_default().trim_end();
        let _ = writeln!(
            sql,
            "\n-- ==== {m} (checksum {}) ====\n{begin}{body}\n\nINSERT INTO {HISTORY_TABLE} (version, name, applied_on, checksum)\n\
             VALUES ({}, '{}', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), '{}');{commit}",
            m.checksum(),
            m.version(),
            m.name().replace('\'', "''"),
            m.checksum(),
        );
    }
    Ok((sql, names))
}
