//! POS API keys: creation, listing, revocation and lookup. Only SHA-256 hashes are stored; the
//! secret is shown once, at creation.

use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio_postgres::GenericClient;

use super::DbError;

/// Every key starts with this, as the legacy server's keys do.
pub(crate) const KEY_PREFIX: &str = "pos_";
/// Random bytes per key (64 hex digits): far beyond brute force.
const KEY_BYTES: usize = 32;
/// Random bytes in a key's public id (12 hex digits): short to type, unique in practice
/// (creation retries on the rare collision).
const ID_BYTES: usize = 6;

/// Why a key operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// `keys create` for a tenant that is not in `public.tenants`.
    #[error("unknown tenant '{0}' (create it first: INSERT INTO tenants (slug, name) ...)")]
    UnknownTenant(String),
    /// `keys revoke` with an id that does not exist.
    #[error("no key with id '{0}'")]
    UnknownKey(String),
    /// The operating system's random source failed.
    #[error("random source unavailable: {0}")]
    Random(String),
    /// Database failure.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<tokio_postgres::Error> for KeyError {
    fn from(e: tokio_postgres::Error) -> Self {
        KeyError::Db(e.into())
    }
}

/// A freshly created key: the secret exists only here.
#[derive(Debug)]
pub struct NewKey {
    /// Public id, safe to log and show.
    pub id: String,
    /// The secret `pos_<64 hex>`.
    pub secret: String,
}

/// A stored key as `keys list` shows it (never the secret or its hash).
#[derive(Debug, Serialize)]
pub struct KeyInfo {
    /// Public id.
    pub id: String,
    /// Tenant slug.
    pub tenant: String,
    /// Free-text label.
    pub label: Option<String>,
    /// Creation time, ISO 8601 UTC.
    pub created: String,
    /// Revocation time, ISO 8601 UTC, if revoked.
    pub revoked: Option<String>,
}

/// A key that authenticated: who it is and which tenant it may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyIdentity {
    /// Public id.
    pub id: String,
    /// Tenant slug.
    pub tenant: String,
    /// When that tenant was created (`tenants.created_at`): events from before it belong to an
    /// earlier tenant under the same slug and are never served to this key.
    pub tenant_since: Option<std::time::SystemTime>,
}

/// SHA-256 of a key: what is stored and looked up.
pub fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// True when `s` has the shape `pos_<64 lower-case hex>`; anything else is rejected unqueried.
pub fn is_well_formed(s: &str) -> bool {
    s.strip_prefix(KEY_PREFIX).is_some_and(|hex| {
        hex.len() == 2 * KEY_BYTES
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn random_hex(n: usize) -> Result<String, KeyError> {
    let mut buf = vec![0u8; n];
    getrandom::fill(&mut buf).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Creates a key for an existing tenant.
pub async fn create(
    client: &impl GenericClient,
    tenant: &str,
    label: Option<&str>,
) -> Result<NewKey, KeyError> {
    let exists = client
        .query_opt("SELECT 1 FROM public.tenants WHERE slug = $1", &[&tenant])
        .await?;
    if exists.is_none() {
        return Err(KeyError::UnknownTenant(tenant.to_owned()));
    }
    let secret = format!("{KEY_PREFIX}{}", random_hex(KEY_BYTES)?);
    let key_hash = hash(&secret).to_vec();
    // A public-id collision is astronomically rare; retry a few times rather than fail.
    for _ in 0..5 {
        let id = random_hex(ID_BYTES)?;
        let inserted = client
            .execute(
                "INSERT INTO orderpush.api_keys (id, tenant_slug, key_hash, label)
                 VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING",
                &[&id, &tenant, &key_hash, &label],
            )
            .await?;
        if inserted == 1 {
            return Ok(NewKey { id, secret });
        }
    }
    Err(KeyError::Random("could not find an unused key id".into()))
}

/// Lists keys, newest first, optionally of one tenant.
pub async fn list(
    client: &impl GenericClient,
    tenant: Option<&str>,
) -> Result<Vec<KeyInfo>, KeyError> {
    let rows = client
        .query(
            "SELECT id, tenant_slug, label, orderpush.iso(created_at), orderpush.iso(revoked_at)
             FROM orderpush.api_keys WHERE $1::text IS NULL OR tenant_slug = $1
             ORDER BY created_at DESC, id",
            &[&tenant],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| KeyInfo {
            id: r.get(0),
            tenant: r.get(1),
            label: r.get(2),
            created: r.get(3),
            revoked: r.get(4),
        })
        .collect())
}

/// Revokes a key. Returns false when it was already revoked (nothing changes then).
pub async fn revoke(client: &impl GenericClient, id: &str) -> Result<bool, KeyError> {
    let revoked = client
        .execute(
            "UPDATE orderpush.api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
            &[&id],
        )
        .await?;
    if revoked == 1 {
        return Ok(true);
    }
    match client
        .query_opt("SELECT 1 FROM orderpush.api_keys WHERE id = $1", &[&id])
        .await?
    {
        Some(_) => Ok(false),
        None => Err(KeyError::UnknownKey(id.to_owned())),
    }
}

/// Finds the active key with this hash.
pub async fn lookup(
    client: &impl GenericClient,
    key_hash: &[u8; 32],
) -> Result<Option<KeyIdentity>, DbError> {
    let row = client
        .query_opt(
            "SELECT k.id, k.tenant_slug, extract(epoch FROM t.created_at)::float8
             FROM orderpush.api_keys k LEFT JOIN public.tenants t ON t.slug = k.tenant_slug
             WHERE k.key_hash = $1 AND k.revoked_at IS NULL",
            &[&key_hash.as_slice()],
        )
        .await?;
    Ok(row.map(|r| KeyIdentity {
        id: r.get(0),
        tenant: r.get(1),
        tenant_since: r
            .get::<_, Option<f64>>(2)
            .and_then(|s| std::time::Duration::try_from_secs_f64(s).ok())
            .and_then(|d| std::time::SystemTime::UNIX_EPOCH.checked_add(d)),
    }))
}

/// The NOTIFY channel a key change is announced on, with the key id as payload (migration
/// V4: revoked, moved to another tenant, or deleted).
pub(crate) const CHANGES_CHANNEL: &str = "orderpush_keys";

/// Most ids asked about in one [`tenants_of`] query: bounds the statement's size when many keys
/// are cached or connected (the caller asks in chunks).
pub(crate) const STATE_QUERY_MAX_IDS: usize = 10_000;

/// For each given key id, the tenant it may read now: `None` when it is revoked or no longer
/// exists. Every id is answered, in no particular order.
pub(crate) async fn tenants_of(
    client: &impl GenericClient,
    ids: &[String],
) -> Result<Vec<(String, Option<String>)>, DbError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT k.id, a.tenant_slug FROM unnest($1::text[]) AS k(id)
             LEFT JOIN orderpush.api_keys a ON a.id = k.id AND a.revoked_at IS NULL",
            &[&ids],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_shape_is_checked_before_any_query() {
        let good = format!("pos_{}", "ab12".repeat(16));
        assert!(is_well_formed(&good));
        assert!(!is_well_formed(&good.to_uppercase()));
        assert!(!is_well_formed(&good[..good.len() - 1]));
        assert!(!is_well_formed(&format!("key_{}", "ab12".repeat(16))));
        assert!(!is_well_formed(""));
    }

    #[test]
    fn hash_is_sha256() {
        let h = hash("abc");
        assert_eq!(h[..4], [0xba, 0x78, 0x16, 0xbf]);
    }
}
