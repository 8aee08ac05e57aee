//! `orderpush migrate`, `migrate status` and `migrate --dry-run`: applies the embedded
//! migrations, or shows what is applied and what would run.

use std::fmt::Write as _;

use super::CliError;
use crate::config::{MigrateArgs, MigrateCommand};
use crate::db::migrate::{self, MigrationStatus, Options, State};

/// Runs `migrate` as its flags say.
pub async fn run(args: MigrateArgs) -> Result<(), CliError> {
    let database = args.db.database()?;
    let options = Options {
        lock_timeout: args.lock_timeout,
        attempts: args.attempts,
        target: args.target,
    };
    match args.command {
        Some(MigrateCommand::Status { json }) => {
            let statuses = migrate::status(database).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&statuses)?);
            } else {
                print!("{}", render_status(&statuses));
            }
        }
        None if args.dry_run => {
            let (sql, names) =
                migrate::dry_run(database, &options, args.single_transaction).await?;
            print!("{sql}");
            eprintln!(
                "dry run: {} migration(s) would be applied{}; nothing was changed",
                names.len(),
                if names.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", names.join(", "))
                }
            );
        }
        None => {
            let applied = migrate::apply(database, &options).await?;
            if applied.is_empty() {
                eprintln!("database is up to date");
            }
            for name in applied {
                eprintln!("applied {name}");
            }
        }
    }
    Ok(())
}

/// `migrate status` as a text table for people.
pub(crate) fn render_status(statuses: &[MigrationStatus]) -> String {
    let mut s = format!(
        "{:<8} {:<32} {:<10} {:<34} CHECKSUM\n",
        "VERSION", "NAME", "STATE", "APPLIED ON"
    );
    for m in statuses {
        let checksum = match (&m.checksum, &m.applied_checksum) {
            (Some(c), Some(a)) if c != a => format!("{a} (this binary: {c})"),
            (Some(c), _) => c.clone(),
            (None, Some(a)) => a.clone(),
            (None, None) => "-".into(),
        };
        let _ = writeln!(
            s,
            "{:<8} {:<32} {:<10} {:<34} {checksum}",
            m.version,
            m.name,
            m.state.as_str(),
            m.applied_on.as_deref().unwrap_or("-"),
        );
    }
    let pending = statuses
        .iter()
        .filter(|m| m.state == State::Pending)
        .count();
    let _ = writeln!(
        s,
        "\n{pending} pending{}",
        if statuses.iter().any(|m| m.state == State::Divergent) {
            "; DIVERGENT migrations were edited after they ran: `migrate` refuses until resolved"
        } else {
            ""
        }
    );
    s
}
