//! The queries of the admin API and the status page: instances, terminals, tenants and keys,
//! across every live instance (read from what presence wrote), and the `/metrics` gauges that
//! need the database.

use serde::Serialize;
use tokio_postgres::GenericClient;

use super::DbError;
use super::presence::stale_after_secs;

/// One running instance, as its heartbeat row says.
#[derive(Debug, Serialize)]
pub struct InstanceRow {
    /// Random per process.
    pub id: String,
    /// Host name.
    pub hostname: String,
    /// Process id.
    pub pid: i32,
    /// Address it serves on.
    pub listen: String,
    /// orderpush version.
    pub version: String,
    /// Start time (ISO 8601 UTC).
    pub started_at: String,
    /// Last heartbeat (ISO 8601 UTC).
    pub heartbeat_at: String,
    /// Its listener is following the log.
    pub listener_up: bool,
    /// notify | gated | poll.
    pub listener_mode: Option<String>,
    /// Milliseconds since its listener's last completed read.
    pub listener_read_age_ms: Option<i64>,
    /// Commit-to-send lag of the last event its listener read, in milliseconds.
    pub listener_lag_ms: Option<f64>,
    /// Events per second it read.
    pub events_per_second: f64,
    /// POS sockets connected to it.
    pub connections: i64,
}

/// One connected terminal.
#[derive(Debug, Serialize)]
pub struct ConnectionRow {
    /// Tenant slug.
    pub tenant: String,
    /// The key's public id (the terminal).
    pub key_id: String,
    /// The key's label.
    pub key_label: Option<String>,
    /// The instance it is connected to.
    pub instance: String,
    /// Its remote address as that instance saw it.
    pub peer: String,
    /// Since when (ISO 8601 UTC).
    pub connected_at: String,
    /// The last event id written to it.
    pub last_delivered_id: Option<i64>,
    /// The last id it acknowledged.
    pub last_acked_id: Option<i64>,
}

/// One tenant in the overview.
#[derive(Debug)]
pub struct TenantSummary {
    /// Its slug.
    pub tenant: String,
    /// Its name.
    pub name: String,
    /// Its latest event id (0 before its first event).
    pub latest_event_id: i64,
    /// Keys not revoked.
    pub active_keys: i64,
    /// Sockets connected to live instances.
    pub connections: i64,
    /// Distinct keys among them.
    pub terminals: i64,
    /// When the oldest of them connected (ISO 8601 UTC).
    pub connected_since: Option<String>,
}

/// One tenant, for its detail page.
#[derive(Debug)]
pub struct Tenant {
    /// Its name.
    pub name: String,
    /// Its latest event id (0 before its first event).
    pub latest_event_id: i64,
}

/// One key of a tenant.
#[derive(Debug)]
pub(crate) struct KeyRow {
    /// Its public id.
    pub id: String,
    /// Its label.
    pub label: Option<String>,
    /// When it was created (ISO 8601 UTC).
    pub created: String,
    /// When it was revoked (ISO 8601 UTC).
    pub revoked: Option<String>,
    /// A terminal with this key is connected to a live instance.
    pub connected: bool,
}

/// The database gauges of `/metrics`.
#[derive(Debug, Clone, Copy)]
pub struct Gauges {
    /// `pg_notification_queue_usage()`.
    pub notification_queue_usage: f64,
    /// Tenants with an active key and no terminal connected to any live instance.
    pub tenants_without_terminal: i64,
}

/// Live instances, oldest id first.
pub async fn instances(client: &impl GenericClient) -> Result<Vec<InstanceRow>, DbError> {
    let rows = client
        .query(
            concat!(
                "WITH ",
                live_instances!(),
                " SELECT i.id, i.hostname, i.pid, i.listen, i.version, orderpush.iso(i.started_at),
                         orderpush.iso(i.heartbeat_at), i.listener_up, i.listener_mode,
                         i.listener_read_age_ms, i.events_per_second, i.listener_lag_ms,
                         (SELECT count(*) FROM orderpush.connections c WHERE c.instance_id = i.id)
                  FROM live i
                  ORDER BY i.id"
            ),
            &[&stale_after_secs()],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| InstanceRow {
            id: r.get(0),
            hostname: r.get(1),
            pid: r.get(2),
            listen: r.get(3),
            version: r.get(4),
            started_at: r.get(5),
            heartbeat_at: r.get(6),
            listener_up: r.get(7),
            listener_mode: r.get(8),
            listener_read_age_ms: r.get(9),
            events_per_second: r.get(10),
            listener_lag_ms: r.get(11),
            connections: r.get(12),
        })
        .collect())
}

/// Terminals connected to live instances, of one tenant or of all, by tenant then age; at most
/// `limit`.
pub async fn connections(
    client: &impl GenericClient,
    tenant: Option<&str>,
    limit: i64,
) -> Result<Vec<ConnectionRow>, DbError> {
    let rows = client
        .query(
            concat!(
                "WITH ",
                live_instances!(),
                " SELECT c.tenant_slug, c.key_id, k.label, c.instance_id, c.peer,
                         orderpush.iso(c.connected_at), c.last_delivered_id, c.last_acked_id
                  FROM orderpush.connections c
                  JOIN live i ON i.id = c.instance_id
                  LEFT JOIN orderpush.api_keys k ON k.id = c.key_id
                  WHERE ($2::text IS NULL OR c.tenant_slug = $2)
                  ORDER BY c.tenant_slug, c.connected_at, c.key_id
                  LIMIT $3"
            ),
            &[&stale_after_secs(), &tenant, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ConnectionRow {
            tenant: r.get(0),
            key_id: r.get(1),
            key_label: r.get(2),
            instance: r.get(3),
            peer: r.get(4),
            connected_at: r.get(5),
            last_delivered_id: r.get(6),
            last_acked_id: r.get(7),
        })
        .collect())
}

/// Every tenant with its head, active keys and terminals, by slug; at most `limit`.
pub async fn tenants(
    client: &impl GenericClient,
    limit: i64,
) -> Result<Vec<TenantSummary>, DbError> {
    let rows = client
        .query(
            concat!(
                "WITH ",
                live_instances!(),
                ", conns AS (
                     SELECT c.tenant_slug, count(*) AS connections,
                            count(DISTINCT c.key_id) AS terminals,
                            orderpush.iso(min(c.connected_at)) AS since
                     FROM orderpush.connections c JOIN live ON live.id = c.instance_id
                     GROUP BY c.tenant_slug)
                 SELECT t.slug, t.name, coalesce(s.seq, 0),
                        (SELECT count(*) FROM orderpush.api_keys k
                         WHERE k.tenant_slug = t.slug AND k.revoked_at IS NULL),
                        coalesce(c.connections, 0), coalesce(c.terminals, 0), c.since
                 FROM public.tenants t
                 LEFT JOIN orderpush.heads s ON s.tenant_slug = t.slug
                 LEFT JOIN conns c ON c.tenant_slug = t.slug
                 ORDER BY t.slug
                 LIMIT $2"
            ),
            &[&stale_after_secs(), &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| TenantSummary {
            tenant: r.get(0),
            name: r.get(1),
            latest_event_id: r.get(2),
            active_keys: r.get(3),
            connections: r.get(4),
            terminals: r.get(5),
            connected_since: r.get(6),
        })
        .collect())
}

/// The tenant with this slug, if it exists.
pub async fn tenant(client: &impl GenericClient, slug: &str) -> Result<Option<Tenant>, DbError> {
    let row = client
        .query_opt(
            "SELECT t.name, coalesce(s.seq, 0) FROM public.tenants t
             LEFT JOIN orderpush.heads s ON s.tenant_slug = t.slug
             WHERE t.slug = $1",
            &[&slug],
        )
        .await?;
    Ok(row.map(|r| Tenant {
        name: r.get(0),
        latest_event_id: r.get(1),
    }))
}

/// A tenant's keys, oldest first, each with whether a terminal uses it now.
pub(crate) async fn tenant_keys(
    client: &impl GenericClient,
    slug: &str,
) -> Result<Vec<KeyRow>, DbError> {
    let rows = client
        .query(
            concat!(
                "WITH ",
                live_instances!(),
                " SELECT k.id, k.label, orderpush.iso(k.created_at), orderpush.iso(k.revoked_at),
                         EXISTS (SELECT 1 FROM orderpush.connections c
                                 JOIN live i ON i.id = c.instance_id
                                 WHERE c.key_id = k.id)
                  FROM orderpush.api_keys k WHERE k.tenant_slug = $2
                  ORDER BY k.created_at, k.id"
            ),
            &[&stale_after_secs(), &slug],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|k| KeyRow {
            id: k.get(0),
            label: k.get(1),
            created: k.get(2),
            revoked: k.get(3),
            connected: k.get(4),
        })
        .collect())
}

/// How many tenants exist, and how many terminals are connected to live instances.
pub async fn counts(client: &impl GenericClient) -> Result<(i64, i64), DbError> {
    let row = client
        .query_one(
            concat!(
                "WITH ",
                live_instances!(),
                " SELECT (SELECT count(*) FROM public.tenants),
                         (SELECT count(*) FROM orderpush.connections c
                          JOIN live i ON i.id = c.instance_id)"
            ),
            &[&stale_after_secs()],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// The database gauges of `/metrics`.
pub async fn gauges(client: &impl GenericClient) -> Result<Gauges, DbError> {
    let row = client
        .query_one(
            concat!(
                "WITH ",
                live_instances!(),
                " SELECT pg_notification_queue_usage(),
                         (SELECT count(*) FROM public.tenants t
                          WHERE EXISTS (SELECT 1 FROM orderpush.api_keys k
                                        WHERE k.tenant_slug = t.slug AND k.revoked_at IS NULL)
                            AND NOT EXISTS (SELECT 1 FROM orderpush.connections c
                                            JOIN live i ON i.id = c.instance_id
                                            WHERE c.tenant_slug = t.slug))"
            ),
            &[&stale_after_secs()],
        )
        .await?;
    Ok(Gauges {
        notification_queue_usage: row.get(0),
        tenants_without_terminal: row.get(1),
    })
}
