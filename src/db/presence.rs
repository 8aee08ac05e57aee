//! Presence in the database: each instance's heartbeat row (`orderpush.instances`) and its
//! connected terminals (`orderpush.connections`), written by that instance in one transaction
//! per interval, and what it reads back about the other live instances.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_postgres::GenericClient;

use super::DbError;

/// An instance whose heartbeat is older than this is dead: its rows are ignored and deleted.
/// Several missed heartbeats, so a busy database or a GC-like pause does not evict a live one.
/// Every query that uses the live-instance rule (`live_instances!`) binds it as `$1`.
pub(crate) const INSTANCE_STALE_AFTER: Duration = Duration::from_secs(15);

/// [`INSTANCE_STALE_AFTER`] as the live-instance rule's `$1`.
pub(crate) fn stale_after_secs() -> f64 {
    INSTANCE_STALE_AFTER.as_secs_f64()
}

/// Who an instance is, as its heartbeat row says.
#[derive(Debug, Clone, Copy)]
pub struct Instance<'a> {
    /// Random per process.
    pub id: &'a str,
    /// The machine's host name.
    pub hostname: &'a str,
    /// The process id.
    pub pid: u32,
    /// The address it serves HTTP and WebSocket on.
    pub listen: &'a str,
    /// The orderpush version.
    pub version: &'a str,
    /// When it started.
    pub started_at: SystemTime,
}

/// What an instance publishes about itself with each heartbeat.
#[derive(Debug, Clone, Default)]
pub struct InstanceStats {
    /// Its listener is connected and following.
    pub listener_up: bool,
    /// The listener's wake-up mode.
    pub listener_mode: Option<String>,
    /// Milliseconds since the listener's last completed read.
    pub listener_read_age_ms: Option<i64>,
    /// Commit-to-send lag of the last event its listener read, in milliseconds.
    pub listener_lag_ms: Option<f64>,
    /// Events per second read from the log.
    pub events_per_second: f64,
}

/// One connected terminal, as its instance last knew it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Terminal<'a> {
    /// Unique within its instance.
    pub conn_id: u64,
    /// Its tenant.
    pub tenant: &'a str,
    /// The public id of its key.
    pub key_id: &'a str,
    /// Its remote address as the instance saw it.
    pub peer: SocketAddr,
    /// When it connected.
    pub connected_at: SystemTime,
    /// The last event id written to it.
    pub last_delivered: Option<i64>,
    /// The last event id it acknowledged.
    pub last_acked: Option<i64>,
}

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Writes the instance's heartbeat (inserting its row if it is missing); true when the row was
/// inserted, i.e. it had disappeared (or never existed).
pub async fn heartbeat(
    client: &impl GenericClient,
    instance: &Instance<'_>,
    stats: &InstanceStats,
) -> Result<bool, DbError> {
    let row = client
        .query_one(
            "INSERT INTO orderpush.instances AS i (id, hostname, pid, listen, version, started_at,
                 heartbeat_at, listener_up, listener_mode, listener_read_age_ms, listener_lag_ms,
                 events_per_second)
             VALUES ($1, $2, $3, $4, $5, to_timestamp($6), now(), $7, $8, $9, $10, $11)
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(),
                 listener_up = excluded.listener_up, listener_mode = excluded.listener_mode,
                 listener_read_age_ms = excluded.listener_read_age_ms,
                 listener_lag_ms = excluded.listener_lag_ms,
                 events_per_second = excluded.events_per_second
             RETURNING (xmax = 0) AS inserted",
            &[
                &instance.id,
                &instance.hostname,
                &(instance.pid as i32),
                &instance.listen,
                &instance.version,
                &unix_secs(instance.started_at),
                &stats.listener_up,
                &stats.listener_mode,
                &stats.listener_read_age_ms,
                &stats.listener_lag_ms,
                &stats.events_per_second,
            ],
        )
        .await?;
    Ok(row.get(0))
}

/// Deletes every terminal row of `instance` (before rewriting them all).
pub(crate) async fn clear_terminals(
    client: &impl GenericClient,
    instance: &str,
) -> Result<(), DbError> {
    client
        .execute(
            "DELETE FROM orderpush.connections WHERE instance_id = $1",
            &[&instance],
        )
        .await?;
    Ok(())
}

/// Deletes the terminal rows of `instance` with these connection ids (closed sockets).
pub(crate) async fn remove_terminals(
    client: &impl GenericClient,
    instance: &str,
    conn_ids: &[u64],
) -> Result<(), DbError> {
    let ids: Vec<i64> = conn_ids.iter().map(|&id| id as i64).collect();
    client
        .execute(
            "DELETE FROM orderpush.connections WHERE instance_id = $1 AND conn_id = ANY($2)",
            &[&instance, &ids],
        )
        .await?;
    Ok(())
}

/// Inserts or updates the rows of these terminals of `instance`: one statement however many.
pub(crate) async fn upsert_terminals(
    client: &impl GenericClient,
    instance: &str,
    terminals: &[Terminal<'_>],
) -> Result<(), DbError> {
    let mut ids = Vec::with_capacity(terminals.len());
    let mut tenants = Vec::with_capacity(terminals.len());
    let mut keys = Vec::with_capacity(terminals.len());
    let mut peers = Vec::with_capacity(terminals.len());
    let mut connected = Vec::with_capacity(terminals.len());
    let mut delivered = Vec::with_capacity(terminals.len());
    let mut acked = Vec::with_capacity(terminals.len());
    for t in terminals {
        ids.push(t.conn_id as i64);
        tenants.push(t.tenant);
        keys.push(t.key_id);
        peers.push(t.peer.to_string());
        connected.push(unix_secs(t.connected_at));
        delivered.push(t.last_delivered);
        acked.push(t.last_acked);
    }
    client
        .execute(
            "INSERT INTO orderpush.connections AS c (instance_id, conn_id, tenant_slug, key_id, peer,
                 connected_at, last_delivered_id, last_acked_id)
             SELECT $1, u.id, u.tenant, u.key, u.peer, to_timestamp(u.at), u.delivered, u.acked
             FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[], $6::float8[], $7::bigint[],
                         $8::bigint[]) AS u(id, tenant, key, peer, at, delivered, acked)
             ON CONFLICT (instance_id, conn_id) DO UPDATE SET
                 last_delivered_id = excluded.last_delivered_id, last_acked_id = excluded.last_acked_id",
            &[
                &instance, &ids, &tenants, &keys, &peers, &connected, &delivered, &acked,
            ],
        )
        .await?;
    Ok(())
}

/// Deletes the instances that are no longer live (their terminal rows go with them), except
/// `keep` (the caller, which is writing its heartbeat); returns how many.
pub(crate) async fn expire_instances(
    client: &impl GenericClient,
    keep: &str,
) -> Result<u64, DbError> {
    Ok(client
        .execute(
            concat!(
                "WITH ",
                live_instances!(),
                " DELETE FROM orderpush.instances d
                  WHERE NOT EXISTS (SELECT 1 FROM live WHERE live.id = d.id) AND d.id <> $2"
            ),
            &[&stale_after_secs(), &keep],
        )
        .await?)
}

/// The ids of the live instances, sorted.
pub(crate) async fn live_instance_ids(client: &impl GenericClient) -> Result<Vec<String>, DbError> {
    Ok(client
        .query(
            concat!(
                "WITH ",
                live_instances!(),
                " SELECT id FROM live ORDER BY id"
            ),
            &[&stale_after_secs()],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Tenants with a terminal connected to a live instance other than `instance`.
pub(crate) async fn tenants_connected_elsewhere(
    client: &impl GenericClient,
    instance: &str,
) -> Result<HashSet<Arc<str>>, DbError> {
    Ok(client
        .query(
            concat!(
                "WITH ",
                live_instances!(),
                " SELECT DISTINCT c.tenant_slug FROM orderpush.connections c
                  JOIN live i ON i.id = c.instance_id
                  WHERE c.instance_id <> $2"
            ),
            &[&stale_after_secs(), &instance],
        )
        .await?
        .iter()
        .map(|r| Arc::from(r.get::<_, &str>(0)))
        .collect())
}

/// Deletes `instance`'s rows (a clean shutdown), so that other instances stop counting its
/// terminals at once.
pub(crate) async fn deregister(client: &impl GenericClient, instance: &str) -> Result<(), DbError> {
    client
        .execute(
            "DELETE FROM orderpush.instances WHERE id = $1",
            &[&instance],
        )
        .await?;
    Ok(())
}
