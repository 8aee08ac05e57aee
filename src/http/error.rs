//! The one HTTP error type: each variant maps to a status code and a JSON body
//! `{"success": false, "error": "..."}`; internal details are logged, never sent.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::db::DbError;

/// Everything a handler can answer besides success.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// 400: malformed input; the message says what is wrong.
    #[error("{0}")]
    BadRequest(String),
    /// 401: missing or unknown credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: valid credentials, not allowed here.
    #[error("{0}")]
    Forbidden(String),
    /// 403: no token is configured and the caller is not local (not a credential failure: the
    /// failed-authentication limiter does not count it).
    #[error("{0}")]
    NotLocal(String),
    /// 404: the named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// 413: the body is over the limit.
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// 422: the request is well-formed but conflicts with an earlier one (an idempotency key
    /// reused for a different request).
    #[error("{0}")]
    Unprocessable(String),
    /// 415: the body is not JSON.
    #[error("content type must be application/json")]
    UnsupportedMediaType,
    /// 429: too many failed attempts; try again later.
    #[error("too many failed attempts; try again in {0} seconds")]
    TooManyRequests(u64),
    /// 503: a dependency (the database) is unavailable or overloaded.
    #[error("service temporarily unavailable")]
    Unavailable,
    /// 500 with `"written": "unknown"`: the connection was lost while committing, so the
    /// request may or may not have been written. A retry with the same `Idempotency-Key` is safe.
    #[error(
        "the connection to the database was lost while committing: the event may or may not have been written; retry with the same Idempotency-Key"
    )]
    OutcomeUnknown,
    /// 503 with `Retry-After` (seconds): a POS key cannot be verified now (the database is
    /// unreachable and the key was not confirmed recently). Never 401: the key may be valid.
    #[error(
        "the API key cannot be verified right now (database unreachable); retry in {0} seconds"
    )]
    KeyUnverifiable(u64),
    /// 503 with `Retry-After`: a connection cap is reached; the message says which.
    #[error("{message}")]
    OverCapacity {
        /// Which cap, for the client.
        message: String,
        /// Seconds after which a retry may succeed.
        retry_after: u64,
    },
    /// 500: a bug or an unexpected database error; logged in full.
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl Error {
    /// The status code this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) | Error::NotLocal(_) => StatusCode::FORBIDDEN,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::OutcomeUnknown => StatusCode::INTERNAL_SERVER_ERROR,
            Error::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::Unavailable | Error::KeyUnverifiable(_) | Error::OverCapacity { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<DbError> for Error {
    fn from(e: DbError) -> Self {
        match e {
            // Pool exhaustion, timeouts and lost connections are the database being unavailable,
            // which the caller can retry; anything else is unexpected.
            DbError::Pool(_) | DbError::Timeout | DbError::Closed => {
                tracing::warn!(error = %e, "database unavailable");
                Error::Unavailable
            }
            DbError::Postgres(ref pg) if pg.is_closed() || pg.as_db_error().is_none() => {
                tracing::warn!(error = %e, "database unavailable");
                Error::Unavailable
            }
            other => Error::Internal(Box::new(other)),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        if let Error::Internal(ref e) = self {
            tracing::error!(error = %e, "internal error");
        }
        let mut body = serde_json::json!({ "success": false, "error": self.to_string() });
        if let Error::OutcomeUnknown = self {
            body["written"] = "unknown".into();
        }
        let mut response = (self.status(), Json(body)).into_response();
        match self {
            Error::TooManyRequests(secs)
            | Error::KeyUnverifiable(secs)
            | Error::OverCapacity {
                retry_after: secs, ..
            } => {
                if let Ok(v) = secs.to_string().parse() {
                    response
                        .headers_mut()
                        .insert(axum::http::header::RETRY_AFTER, v);
                }
            }
            Error::NotLocal(_) => {
                response.extensions_mut().insert(super::auth::NotCounted);
            }
            _ => {}
        }
        response
    }
}
