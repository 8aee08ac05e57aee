//! Staging `POST /broadcast` requests for the sequencer, with their idempotency keys: one
//! transaction per batch of concurrent requests, its statements pipelined.

use std::time::Duration;

use futures_util::future::join_all;
use tokio_postgres::Client;

type PooledClient = deadpool_postgres::Object;

use super::DbError;
use super::sequencer::STAGED_CHANNEL;

/// How long an `Idempotency-Key` is remembered per tenant: a caller's retries end within
/// minutes, and a day covers any retry queue that survives a restart (docs/protocol.md).
pub(crate) const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// One explicit push from `POST /broadcast`, already validated.
#[derive(Debug, Clone)]
pub struct Broadcast {
    /// Tenant slug.
    pub tenant: String,
    /// Event type.
    pub kind: String,
    /// The envelope timestamp as given, or `None` to stamp it when numbered.
    pub timestamp: Option<String>,
    /// `event.data` as JSON text, exactly as sent.
    pub data: String,
    /// The caller's `Idempotency-Key` and a hash of the request it names.
    pub idempotency: Option<Idempotency>,
}

/// An `Idempotency-Key` and the request it was first used for.
#[derive(Debug, Clone)]
pub struct Idempotency {
    /// The caller's key.
    pub key: String,
    /// SHA-256 of the request (tenant, type, timestamp and data), to tell a retry from a reuse.
    pub request_sha256: [u8; 32],
}

/// What became of one request of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Staged {
    /// Staged now as this row; its id comes when the sequencer numbers it.
    New(i64),
    /// No such tenant: nothing was written.
    UnknownTenant,
    /// The idempotency key was used before for the same request: that request's staged row,
    /// and its id once numbered. Nothing new was written.
    Repeat {
        /// The first request's staged row.
        gid: i64,
        /// Its event id, if numbered yet.
        id: Option<i64>,
    },
    /// The idempotency key was used before for a different request: nothing was written.
    KeyReused,
}

/// Why a batch could not be staged, by whether anything may have been written.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The transaction failed or was refused before it committed: nothing was written.
    #[error("not written: {0}")]
    NotWritten(DbError),
    /// The connection was lost while committing: the batch may or may not be written.
    #[error("outcome unknown: {0}")]
    Unknown(DbError),
}

fn not_written(e: impl Into<DbError>) -> StageError {
    StageError::NotWritten(e.into())
}

/// Stages `batch` in one transaction and returns, per request (same order), what became of it.
/// `before_commit` sees each new staged row before the COMMIT, so a waiter registered there
/// cannot miss its numbering.
pub async fn stage(
    client: &mut PooledClient,
    batch: &[Broadcast],
    mut before_commit: impl FnMut(i64),
) -> Result<Vec<Staged>, StageError> {
    let tx = client.transaction().await.map_err(not_written)?;
    let insert = tx
        .prepare_cached(
            "INSERT INTO orderpush.staged (kind, row, raw)
             SELECT 'broadcast',
                    jsonb_build_object('tenant_slug', $1::text, 'type', $2::text, 'timestamp', $3::text),
                    $4::text
             WHERE EXISTS (SELECT 1 FROM public.tenants t WHERE t.slug = $1)
             RETURNING gid",
        )
        .await
        .map_err(not_written)?;
    // Pipelined: every insert is sent before the first answer is awaited.
    let inserted = join_all(batch.iter().map(|b| async {
        tx.query_opt(&insert, &[&b.tenant, &b.kind, &b.timestamp, &b.data])
            .await
    }))
    .await;
    let mut outcome = Vec::with_capacity(batch.len());
    for row in inserted {
        outcome.push(match row.map_err(not_written)? {
            Some(r) => Staged::New(r.get(0)),
            None => Staged::UnknownTenant,
        });
    }

    // Idempotency keys: claim each new one; a key already claimed (earlier, or by another
    // instance, or by an earlier request of this batch) is a repeat or a reuse.
    let claim = tx
        .prepare_cached(
            "INSERT INTO orderpush.broadcast_requests (tenant_slug, idempotency_key, request_sha256, gid)
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING gid",
        )
        .await
        .map_err(not_written)?;
    let keyed: Vec<(usize, &Idempotency, i64)> = batch
        .iter()
        .zip(&outcome)
        .enumerate()
        .filter_map(|(i, (b, o))| match (o, &b.idempotency) {
            (Staged::New(gid), Some(k)) => Some((i, k, *gid)),
            _ => None,
        })
        .collect();
    let claimed = join_all(keyed.iter().map(|(i, k, gid)| async {
        let hash: &[u8] = &k.request_sha256;
        tx.query_opt(&claim, &[&batch[*i].tenant, &k.key, &hash, gid])
            .await
    }))
    .await;
    for ((i, k, gid), claim) in keyed.iter().zip(claimed) {
        if claim.map_err(not_written)?.is_some() {
            continue;
        }
        // Taken: undo this request's staged row, and answer as the first request was answered.
        tx.execute("DELETE FROM orderpush.staged WHERE gid = $1", &[gid])
            .await
            .map_err(not_written)?;
        let first = tx
            .query_one(
                "SELECT request_sha256, gid, event_id FROM orderpush.broadcast_requests
                 WHERE tenant_slug = $1 AND idempotency_key = $2",
                &[&batch[*i].tenant, &k.key],
            )
            .await
            .map_err(not_written)?;
        let hash: &[u8] = first.get(0);
        outcome[*i] = if hash == k.request_sha256.as_slice() {
            Staged::Repeat {
                gid: first.get(1),
                id: first.get(2),
            }
        } else {
            Staged::KeyReused
        };
    }

    let new: Vec<i64> = outcome
        .iter()
        .filter_map(|o| match o {
            Staged::New(gid) => Some(*gid),
            _ => None,
        })
        .collect();
    if !new.is_empty() {
        // Wake the sequencer (a hint; it also polls). One per batch, not per request.
        tx.execute("SELECT pg_notify($1, '')", &[&STAGED_CHANNEL])
            .await
            .map_err(not_written)?;
    }
    for gid in new {
        before_commit(gid);
    }
    match tx.commit().await {
        Ok(()) => Ok(outcome),
        // The server answered: the transaction did not commit.
        Err(e) if e.as_db_error().is_some() => Err(StageError::NotWritten(e.into())),
        // No answer: it may have committed just before the connection went.
        Err(e) => Err(StageError::Unknown(e.into())),
    }
}

/// The event id of a repeated request's first staged row, once numbered (`None` before).
pub(crate) async fn numbered_id(
    client: &Client,
    tenant: &str,
    key: &str,
) -> Result<Option<i64>, DbError> {
    let row = client
        .query_opt(
            "SELECT event_id FROM orderpush.broadcast_requests
             WHERE tenant_slug = $1 AND idempotency_key = $2",
            &[&tenant, &key],
        )
        .await?;
    Ok(row.and_then(|r| r.get(0)))
}
