//! `orderpush prune`: deletes events past the retention once.

use super::CliError;
use crate::config::PruneArgs;
use crate::db::{self, events};

/// Deletes events older than `--older-than` and says how many.
pub async fn run(args: PruneArgs) -> Result<(), CliError> {
    let client = db::connect(args.db.database()?, "orderpush-prune").await?;
    if !events::installed(&client).await? {
        return Err(CliError::NotInstalled);
    }
    let n = events::prune(&client, args.older_than).await?;
    eprintln!("deleted {n} events older than {:?}", args.older_than);
    Ok(())
}
