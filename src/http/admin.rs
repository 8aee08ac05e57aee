//! The admin API, `GET /admin/tenants` and `GET /admin/tenants/{tenant}`: tenants, their
//! terminals and the running instances as JSON, across every instance (read from presence in
//! the database), behind the admin token; also the admin authorization used by `/status`.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use serde::Serialize;
use serde_json::{Value, json};
use tokio_postgres::GenericClient;

use super::{AppState, Error, auth};
use crate::db::{DbError, is_valid_tenant_slug};
use crate::presence::STALE_AFTER;

/// Most tenants `GET /admin/tenants` lists; past it the answer says `"truncated": true`. Keeps
/// one request's memory and time bounded on a database with very many tenants.
pub const MAX_TENANTS: i64 = 10_000;
/// Most connections one answer lists (per tenant, or on the status page in total): far more
/// terminals than a restaurant has, and still a small answer.
pub const MAX_CONNECTIONS: i64 = 1_000;
/// Admin queries slower than this are answered 503 rather than holding a pooled connection.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Routes of this group.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/tenants", get(tenants))
        .route("/admin/tenants/{tenant}", get(tenant))
}

/// How a 401 tells the client what to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Challenge {
    /// API clients: `Authorization: Bearer <admin token>`.
    Bearer,
    /// Pages opened in a browser: the browser's own password prompt (any user name, the admin
    /// token as password), which it then repeats for the page's own requests.
    Basic,
}

/// An authorization failure that carries its `WWW-Authenticate` challenge.
#[derive(Debug)]
pub struct Denied(pub Error, pub Challenge);

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        let unauthorized = matches!(self.0, Error::Unauthorized(_));
        let mut response = self.0.into_response();
        if unauthorized {
            let challenge = match self.1 {
                Challenge::Bearer => r#"Bearer realm="orderpush admin""#,
                Challenge::Basic => r#"Basic realm="orderpush admin", charset="UTF-8""#,
            };
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        response
    }
}

/// The admin rule: with `--admin-token`, `Authorization: Bearer <token>` or HTTP Basic with the
/// token as password; without one, loopback callers only (the rule /broadcast follows).
pub fn authorize(
    state: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    challenge: Challenge,
) -> Result<(), Denied> {
    if let (Some(expected), Some(password)) =
        (state.admin_token.as_deref(), basic_password(headers))
    {
        return if auth::secrets_match(&password, expected) {
            Ok(())
        } else {
            Err(Denied(
                Error::Unauthorized("invalid admin token".into()),
                challenge,
            ))
        };
    }
    auth::authorize(state.admin_token.as_deref(), peer, headers, "admin")
        .map_err(|e| Denied(e, challenge))
}

/// The password of an `Authorization: Basic` header (the user name is ignored).
fn basic_password(headers: &HeaderMap) -> Option<String> {
    let encoded = headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Basic ")?
        .trim();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (_user, password) = text.split_once(':')?;
    Some(password.to_owned())
}

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

/// Live instances, oldest id first.
pub async fn instances(client: &impl GenericClient) -> Result<Vec<InstanceRow>, DbError> {
    let rows = client
        .query(
            "SELECT i.id, i.hostname, i.pid, i.listen, i.version, orderpush.iso(i.started_at),
                    orderpush.iso(i.heartbeat_at), i.listener_up, i.listener_mode,
                    i.listener_read_age_ms, i.events_per_second, i.listener_lag_ms,
                    (SELECT count(*) FROM orderpush.connections c WHERE c.instance_id = i.id)
             FROM orderpush.instances i
             WHERE i.heartbeat_at >= now() - make_interval(secs => $1)
             ORDER BY i.id",
            &[&STALE_AFTER.as_secs_f64()],
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
            connections: r.get(12),
            listener_lag_ms: r.get(11),
        })
        .collect())
}

/// Terminals connected to live instances, of one tenant or of all, by tenant then age.
pub async fn connections(
    client: &impl GenericClient,
    tenant: Option<&str>,
) -> Result<Vec<ConnectionRow>, DbError> {
    let rows = client
        .query(
            "SELECT c.tenant_slug, c.key_id, k.label, c.instance_id, c.peer,
                    orderpush.iso(c.connected_at), c.last_delivered_id, c.last_acked_id
             FROM orderpush.connections c
             JOIN orderpush.instances i ON i.id = c.instance_id
             LEFT JOIN orderpush.api_keys k ON k.id = c.key_id
             WHERE i.heartbeat_at >= now() - make_interval(secs => $1)
               AND ($2::text IS NULL OR c.tenant_slug = $2)
             ORDER BY c.tenant_slug, c.connected_at, c.key_id
             LIMIT $3",
            &[&STALE_AFTER.as_secs_f64(), &tenant, &MAX_CONNECTIONS],
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

/// Runs a query on the admin share of the pool (`db::ADMIN_CONNECTIONS`, so a flood of admin
/// requests cannot take the connections logins need) within [`QUERY_TIMEOUT`]; a query that
/// times out is cancelled and answered 503.
pub async fn with_client<T, F>(state: &AppState, f: F) -> Result<T, Error>
where
    F: AsyncFnOnce(&deadpool_postgres::Client) -> Result<T, DbError>,
{
    state
        .admin_db
        .run(QUERY_TIMEOUT, f)
        .await
        .map_err(Error::from)
}

async fn tenants(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Json<Value>, Response> {
    authorize(&state, peer, &headers, Challenge::Bearer).map_err(IntoResponse::into_response)?;
    let (instances, tenants) = with_client(&state, async |c| {
        let instances = instances(&***c).await?;
        let rows = c
            .query(
                "WITH live AS (
                     SELECT id FROM orderpush.instances
                     WHERE heartbeat_at >= now() - make_interval(secs => $1)),
                 conns AS (
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
                 LIMIT $2",
                &[&STALE_AFTER.as_secs_f64(), &(MAX_TENANTS + 1)],
            )
            .await?;
        Ok((instances, rows))
    })
    .await
    .map_err(IntoResponse::into_response)?;
    let truncated = tenants.len() as i64 > MAX_TENANTS;
    let tenants: Vec<Value> = tenants
        .iter()
        .take(MAX_TENANTS as usize)
        .map(|r| {
            json!({
                "tenant": r.get::<_, String>(0),
                "name": r.get::<_, String>(1),
                "latest_event_id": r.get::<_, i64>(2),
                "active_keys": r.get::<_, i64>(3),
                "connections": r.get::<_, i64>(4),
                "terminals": r.get::<_, i64>(5),
                "connected_since": r.get::<_, Option<String>>(6),
            })
        })
        .collect();
    Ok(Json(json!({
        "this_instance": state.presence.info().id,
        "instances": instances,
        "tenants": tenants,
        "truncated": truncated,
    })))
}

async fn tenant(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(slug): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, Response> {
    authorize(&state, peer, &headers, Challenge::Bearer).map_err(IntoResponse::into_response)?;
    let not_found =
        || Error::NotFound(format!("unknown tenant '{}'", slug.escape_debug())).into_response();
    if !is_valid_tenant_slug(&slug) {
        return Err(not_found());
    }
    let found = with_client(&state, async |c| {
        let Some(t) = c
            .query_opt(
                "SELECT t.name, coalesce(s.seq, 0) FROM public.tenants t
                 LEFT JOIN orderpush.heads s ON s.tenant_slug = t.slug
                 WHERE t.slug = $1",
                &[&slug],
            )
            .await?
        else {
            return Ok(None);
        };
        let connections = connections(&***c, Some(&slug)).await?;
        let keys = c
            .query(
                "SELECT k.id, k.label, orderpush.iso(k.created_at), orderpush.iso(k.revoked_at),
                        EXISTS (SELECT 1 FROM orderpush.connections c
                                JOIN orderpush.instances i ON i.id = c.instance_id
                                WHERE c.key_id = k.id
                                  AND i.heartbeat_at >= now() - make_interval(secs => $2))
                 FROM orderpush.api_keys k WHERE k.tenant_slug = $1
                 ORDER BY k.created_at, k.id",
                &[&slug, &STALE_AFTER.as_secs_f64()],
            )
            .await?;
        Ok(Some((t, connections, keys)))
    })
    .await
    .map_err(IntoResponse::into_response)?;
    let Some((t, connections, keys)) = found else {
        return Err(not_found());
    };
    let keys: Vec<Value> = keys
        .iter()
        .map(|k| {
            json!({
                "id": k.get::<_, String>(0),
                "label": k.get::<_, Option<String>>(1),
                "created": k.get::<_, String>(2),
                "revoked": k.get::<_, Option<String>>(3),
                "connected": k.get::<_, bool>(4),
            })
        })
        .collect();
    Ok(Json(json!({
        "tenant": slug,
        "name": t.get::<_, String>(0),
        "latest_event_id": t.get::<_, i64>(1),
        "connections": connections,
        "keys": keys,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_password_is_the_part_after_the_first_colon() {
        let mut h = HeaderMap::new();
        // "ops:s3cret:with-colon"
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic b3BzOnMzY3JldDp3aXRoLWNvbG9u"),
        );
        assert_eq!(basic_password(&h).as_deref(), Some("s3cret:with-colon"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic !!!"));
        assert_eq!(basic_password(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        assert_eq!(basic_password(&h), None);
    }
}
