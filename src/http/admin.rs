//! The admin API, `GET /admin/tenants` and `GET /admin/tenants/{tenant}`: tenants, their
//! terminals and the running instances as JSON, across every instance (read from presence in
//! the database), behind the admin token; also the admin authorization used by `/status`.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::{Value, json};

use super::{AppState, Error, auth};
use crate::db::{self, DbError, is_valid_tenant_slug};

/// Most tenants `GET /admin/tenants` lists; past it the answer says `"truncated": true`. Keeps
/// one request's memory and time bounded on a database with very many tenants.
pub(crate) const MAX_TENANTS: i64 = 10_000;
/// Most connections one answer lists (per tenant, or on the status page in total): far more
/// terminals than a restaurant has, and still a small answer.
pub(crate) const MAX_CONNECTIONS_LISTED: i64 = 1_000;

/// Routes of this group.
pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/tenants", get(tenants))
        .route("/admin/tenants/{tenant}", get(tenant))
}

/// How a 401 tells the client what to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Challenge {
    /// API clients: `Authorization: Bearer <admin token>`.
    Bearer,
    /// Pages opened in a browser: the browser's own password prompt (any user name, the admin
    /// token as password), which it then repeats for the page's own requests.
    Basic,
}

/// An authorization failure that carries its `WWW-Authenticate` challenge.
#[derive(Debug)]
pub(crate) struct Denied(pub Error, pub Challenge);

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
pub(crate) fn authorize(
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

/// Runs a query on the admin share of the pool (`db::ADMIN_CONNECTIONS`, so a flood of admin
/// requests cannot take the connections logins need) within [`db::QUERY_TIMEOUT`]; a query that
/// times out is cancelled and answered 503.
pub(crate) async fn with_client<T, F>(state: &AppState, f: F) -> Result<T, Error>
where
    F: AsyncFnOnce(&deadpool_postgres::Client) -> Result<T, DbError>,
{
    state
        .admin_db
        .run(db::QUERY_TIMEOUT, f)
        .await
        .map_err(Error::from)
}

/// Overdue orders one tenant's view lists at most (oldest first).
const MAX_OVERDUE: i64 = 100;

async fn tenants(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Json<Value>, Response> {
    authorize(&state, peer, &headers, Challenge::Bearer).map_err(IntoResponse::into_response)?;
    let (instances, tenants) = with_client(&state, async |c| {
        let instances = db::admin::instances(&***c).await?;
        let tenants = db::admin::tenants(&***c, MAX_TENANTS + 1).await?;
        Ok((instances, tenants))
    })
    .await
    .map_err(IntoResponse::into_response)?;
    let truncated = tenants.len() as i64 > MAX_TENANTS;
    let tenants: Vec<Value> = tenants
        .iter()
        .take(MAX_TENANTS as usize)
        .map(|t| {
            json!({
                "tenant": t.tenant,
                "name": t.name,
                "latest_event_id": t.latest_event_id,
                "active_keys": t.active_keys,
                "connections": t.connections,
                "terminals": t.terminals,
                "connected_since": t.connected_since,
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
    let ack_timeout = state.tuning.ack_timeout.as_secs();
    let found = with_client(&state, async |c| {
        let Some(t) = db::admin::tenant(&***c, &slug).await? else {
            return Ok(None);
        };
        let connections =
            db::admin::connections(&***c, Some(&slug), MAX_CONNECTIONS_LISTED).await?;
        let keys = db::admin::tenant_keys(&***c, &slug).await?;
        let overdue = db::acks::overdue(&***c, Some(&slug), ack_timeout, MAX_OVERDUE).await?;
        Ok(Some((t, connections, keys, overdue)))
    })
    .await
    .map_err(IntoResponse::into_response)?;
    let Some((t, connections, keys, overdue)) = found else {
        return Err(not_found());
    };
    let keys: Vec<Value> = keys
        .iter()
        .map(|k| {
            json!({
                "id": k.id,
                "label": k.label,
                "created": k.created,
                "revoked": k.revoked,
                "connected": k.connected,
            })
        })
        .collect();
    // Two states, kept apart: an order no terminal received (the POS are offline) is a
    // different problem from one a terminal received and nobody acknowledged (the kitchen).
    let (undelivered, unacknowledged): (Vec<_>, Vec<_>) =
        overdue.into_iter().partition(|o| o.undelivered());
    Ok(Json(json!({
        "tenant": slug,
        "name": t.name,
        "latest_event_id": t.latest_event_id,
        "connections": connections,
        "keys": keys,
        "orders_undelivered": undelivered,
        "orders_unacknowledged": unacknowledged,
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
