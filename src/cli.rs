//! The subcommands behind `main`: each runs against the library and renders what people read
//! (tables, JSON, messages on stderr). `main` only parses, starts tracing and calls [`run`].

pub mod keys;
pub mod migrate;
pub mod prune;
pub mod serve;
pub mod tail;
pub mod triggers;
pub mod uninstall;

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;

use crate::config::{Command, MissingDatabaseUrl};
use crate::db::DbError;
use crate::db::keys::KeyError;
use crate::db::migrate::MigrateError;
use crate::db::uninstall::UninstallError;
use crate::server::ServerError;
use crate::tail::TailError;

/// Why a subcommand failed; `main` prints it with its causes and exits non-zero.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// No database URL was given.
    #[error(transparent)]
    MissingDatabaseUrl(#[from] MissingDatabaseUrl),
    /// `serve` could not bind its address.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address from `--listen`.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The server failed.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// A database operation failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// A migration failed.
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    /// A key operation failed.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// `uninstall --yes` failed.
    #[error(transparent)]
    Uninstall(#[from] UninstallError),
    /// `tail` stopped with an error.
    #[error(transparent)]
    Tail(#[from] TailError),
    /// JSON output could not be written.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// `uninstall` without `--yes`: the SQL was printed, nothing ran.
    #[error("nothing was changed: the SQL above is what `orderpush uninstall --yes` runs")]
    UninstallNotConfirmed,
    /// `prune` on a database without orderpush.
    #[error("the database has no orderpush schema: run `orderpush migrate` first")]
    NotInstalled,
}

/// Runs one subcommand to completion.
pub async fn run(command: Command) -> Result<(), CliError> {
    match command {
        Command::Serve(args) => serve::run(args).await,
        Command::Migrate(args) => migrate::run(args).await,
        Command::Triggers(args) => triggers::run(args).await,
        Command::Uninstall(args) => uninstall::run(args).await,
        Command::Tail(args) => tail::run(args).await,
        Command::Keys(args) => keys::run(args).await,
        Command::Prune(args) => prune::run(args).await,
    }
}

/// A token cancelled on SIGINT or SIGTERM, for the commands that run until stopped.
fn cancelled_on_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    // Deliberately detached: it lives as long as the process and only cancels a token.
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    shutdown
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    // The target this line always had (it was written by the binary).
    tracing::info!(target: "orderpush", "shutdown requested; closing connections");
    shutdown.cancel();
}
