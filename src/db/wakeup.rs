//! The wake-up mode a DBA sets for the database (`ALTER DATABASE … SET orderpush.wakeup`): its
//! values and the query that reads it.

use tokio_postgres::{GenericClient, Statement};

use super::DbError;

/// How the triggers wake the sequencer (`ALTER DATABASE ... SET orderpush.wakeup`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeupMode {
    /// Every staging transaction notifies.
    Notify,
    /// One in-flight transaction at a time notifies; the sequencer re-reads and polls.
    Gated,
    /// No NOTIFY; the sequencer polls.
    Poll,
}

impl WakeupMode {
    /// The mode a setting's value names; unset or unknown is the default, as in
    /// `orderpush.stage()`: gated.
    pub fn parse(s: Option<&str>) -> Self {
        match s {
            Some("notify") => WakeupMode::Notify,
            Some("poll") => WakeupMode::Poll,
            _ => WakeupMode::Gated,
        }
    }

    /// The name a DBA sets and sees.
    pub fn as_str(self) -> &'static str {
        match self {
            WakeupMode::Notify => "notify",
            WakeupMode::Gated => "gated",
            WakeupMode::Poll => "poll",
        }
    }
}

/// The database-level `orderpush.wakeup` (what new sessions get), or NULL when unset. A
/// session's own setting is fixed at connect, so the database's is read instead.
const MODE_SQL: &str = "SELECT (SELECT substr(c, length('orderpush.wakeup=') + 1)
       FROM pg_db_role_setting s, unnest(s.setconfig) AS c
       WHERE s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
         AND s.setrole = 0 AND c LIKE 'orderpush.wakeup=%')";

/// The mode query, prepared once on a connection that re-reads the setting periodically.
pub(crate) struct ModeQuery(Statement);

impl ModeQuery {
    /// Prepares the query on `client`.
    pub async fn prepare(client: &impl GenericClient) -> Result<Self, DbError> {
        Ok(Self(client.prepare(MODE_SQL).await?))
    }

    /// The database's mode now.
    pub async fn read(&self, client: &impl GenericClient) -> Result<WakeupMode, DbError> {
        let row = client.query_one(&self.0, &[]).await?;
        Ok(WakeupMode::parse(row.get::<_, Option<&str>>(0)))
    }
}

#[cfg(test)]
mod tests {
    use super::WakeupMode;

    #[test]
    fn unset_or_unknown_settings_mean_gated() {
        assert_eq!(WakeupMode::parse(Some("notify")), WakeupMode::Notify);
        assert_eq!(WakeupMode::parse(Some("poll")), WakeupMode::Poll);
        assert_eq!(WakeupMode::parse(Some("gated")), WakeupMode::Gated);
        assert_eq!(WakeupMode::parse(Some("loud")), WakeupMode::Gated);
        assert_eq!(WakeupMode::parse(None), WakeupMode::Gated);
    }
}
