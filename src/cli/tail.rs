//! `orderpush tail`: a tenant's events as pretty JSON on stdout, until a signal stops it.

use super::CliError;
use crate::config::TailArgs;
use crate::tail::{self, Options};

/// Follows the tenant's events, reconnecting by itself, until SIGINT or SIGTERM.
pub async fn run(args: TailArgs) -> Result<(), CliError> {
    let shutdown = super::cancelled_on_signal();
    let options = Options {
        url: args.url,
        tenant: args.tenant,
        key: args.key,
        since: args.since,
        snapshot: args.snapshot,
        types: args.types,
        ack: args.ack,
    };
    tail::run(options, print_event, shutdown).await?;
    Ok(())
}

/// One pretty-printed JSON document per event (keys in the order sent), flushed at once so a
/// pipe sees it.
fn print_event(event: &serde_json::Value, raw: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match event {
        serde_json::Value::String(s) if !raw.trim_start().starts_with('"') => writeln!(out, "{s}")?,
        _ => writeln!(out, "{}", tail::pretty(raw))?,
    }
    out.flush()
}
