//! `orderpush serve`: the command line turned into a [`ServerConfig`], then the server until a
//! signal stops it.

use super::CliError;
use crate::config::{ServeArgs, Tuning};
use crate::server::{self, ServerConfig};

/// Binds `--listen`, then serves until SIGINT or SIGTERM.
pub async fn run(args: ServeArgs) -> Result<(), CliError> {
    let listener = server::bind(args.listen).map_err(|source| CliError::Listen {
        addr: args.listen,
        source,
    })?;
    let shutdown = super::cancelled_on_signal();
    let config = ServerConfig {
        database: args.db.database()?.clone(),
        broadcast_token: args.broadcast_token,
        admin_token: args.admin_token,
        retention: args.retention,
        migrate: !args.no_migrate,
        tuning: Tuning {
            auth_failure_limit: args.auth_failure_limit,
            max_connections: args.max_connections,
            max_connections_per_key: args.max_connections_per_key,
            max_connections_per_tenant: args.max_connections_per_tenant,
            snapshot_max_orders: args.snapshot_max_orders,
            snapshot_max_bytes: args.snapshot_max_bytes,
            ack_timeout: args.ack_timeout,
            ..Tuning::default()
        },
    };
    server::run(listener, config, shutdown).await?;
    Ok(())
}
