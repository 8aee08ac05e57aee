//! The embedded refinery migrations, applied under a Postgres advisory lock so that several
//! instances starting at once do not race.

use super::DbError;

mod embedded {
    #![allow(missing_docs)]
    refinery::embed_migrations!("migrations");
}

/// Advisory lock key held while migrating ('op' + 'mg' in ASCII); private to orderpush.
const MIGRATION_LOCK_KEY: i64 = 0x6f70_6d67;

/// Applies every pending migration; returns the names of those applied now.
pub async fn run(config: &tokio_postgres::Config) -> Result<Vec<String>, DbError> {
    let mut client = super::connect(config, "orderpush-migrate").await?;
    // Session-level lock: a second instance waits here until the first has finished, then finds
    // nothing left to do. It is released by the unlock below or, at the latest, on disconnect.
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await?;
    let result = embedded::migrations::runner()
        .set_abort_divergent(true)
        .run_async(&mut client)
        .await;
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    let report = result.map_err(|e| DbError::Migration(e.to_string()))?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| m.to_string())
        .collect())
}
