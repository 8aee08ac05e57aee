//! `orderpush uninstall`: prints the removal SQL, or with `--yes` runs it and says what went.

use super::CliError;
use crate::config::UninstallArgs;
use crate::db::{self, uninstall};

/// Without `--yes` prints the SQL and fails (nothing changes); with it, removes orderpush.
pub async fn run(args: UninstallArgs) -> Result<(), CliError> {
    if !args.yes {
        print!("{}", uninstall::UNINSTALL_SQL);
        return Err(CliError::UninstallNotConfirmed);
    }
    let client = db::connect(args.db.database()?, "orderpush-uninstall").await?;
    let removed = uninstall::uninstall(&client).await?;
    if removed.schema_existed {
        eprintln!(
            "removed orderpush: {} event(s) and {} API key(s) deleted; application tables untouched",
            removed.events, removed.keys
        );
    } else {
        eprintln!("orderpush was not installed; removed any leftovers");
    }
    Ok(())
}
