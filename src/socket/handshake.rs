//! The WebSocket opening handshake, server side (RFC 6455, 4.2): checks the upgrade request and
//! builds the `101 Switching Protocols` answer. No extension is ever agreed (frames stay plain),
//! and the only subprotocol echoed is the service's own.

use axum::http::{HeaderMap, HeaderValue, Response, StatusCode, header};

/// Why an upgrade request is refused (before anything is upgraded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// `Connection` does not include `upgrade`.
    #[error("Connection header did not include 'upgrade'")]
    Connection,
    /// `Upgrade` is not `websocket`.
    #[error("`Upgrade` header did not include 'websocket'")]
    Upgrade,
    /// `Sec-WebSocket-Version` is not 13.
    #[error("`Sec-WebSocket-Version` header did not include '13'")]
    Version,
    /// `Sec-WebSocket-Key` is missing or not 16 bytes in base64.
    #[error("`Sec-WebSocket-Key` header missing or invalid")]
    Key,
}

impl HandshakeError {
    /// The HTTP status to refuse with: 426 tells a client that spoke plain HTTP to upgrade.
    pub fn status(self) -> StatusCode {
        match self {
            HandshakeError::Upgrade | HandshakeError::Connection => StatusCode::UPGRADE_REQUIRED,
            HandshakeError::Version | HandshakeError::Key => StatusCode::BAD_REQUEST,
        }
    }
}

/// True when a comma-separated header (any occurrence) lists `token`, ignoring case.
fn lists(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Checks an upgrade request and returns the 101 answer, echoing `subprotocol` when the client
/// offered it.
pub fn accept(headers: &HeaderMap, subprotocol: &str) -> Result<Response<()>, HandshakeError> {
    if !lists(headers, header::CONNECTION, "upgrade") {
        return Err(HandshakeError::Connection);
    }
    if !lists(headers, header::UPGRADE, "websocket") {
        return Err(HandshakeError::Upgrade);
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err(HandshakeError::Version);
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|k| is_base64_nonce(k.as_bytes()))
        .ok_or(HandshakeError::Key)?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut response = Response::new(());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if lists(headers, header::SEC_WEBSOCKET_PROTOCOL, subprotocol) {
        if let Ok(v) = HeaderValue::from_str(subprotocol) {
            h.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
        }
    }
    Ok(response)
}

/// A 16-byte nonce in base64: 22 characters of the alphabet and `==`.
fn is_base64_nonce(k: &[u8]) -> bool {
    k.len() == 24
        && k.ends_with(b"==")
        && k[..22]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    const GOOD: [(&str, &str); 4] = [
        ("connection", "keep-alive, Upgrade"),
        ("upgrade", "WebSocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    #[test]
    fn a_valid_request_gets_the_rfc_accept_key() {
        let r = accept(&request(&GOOD), "orderpush.v1").unwrap();
        assert_eq!(r.status(), StatusCode::SWITCHING_PROTOCOLS);
        // RFC 6455's own example.
        assert_eq!(
            r.headers()[header::SEC_WEBSOCKET_ACCEPT],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert!(r.headers().get(header::SEC_WEBSOCKET_PROTOCOL).is_none());
        let mut offered = GOOD.to_vec();
        offered.push(("sec-websocket-protocol", "orderpush.key.x, orderpush.v1"));
        let r = accept(&request(&offered), "orderpush.v1").unwrap();
        assert_eq!(r.headers()[header::SEC_WEBSOCKET_PROTOCOL], "orderpush.v1");
    }

    #[test]
    fn broken_requests_are_refused_with_a_reason() {
        for (drop, want) in [
            ("connection", HandshakeError::Connection),
            ("upgrade", HandshakeError::Upgrade),
            ("sec-websocket-version", HandshakeError::Version),
            ("sec-websocket-key", HandshakeError::Key),
        ] {
            let pairs: Vec<_> = GOOD.iter().copied().filter(|(k, _)| *k != drop).collect();
            assert_eq!(accept(&request(&pairs), "p").unwrap_err(), want);
        }
        let mut bad_key = GOOD.to_vec();
        bad_key[3] = ("sec-websocket-key", "not a key");
        assert_eq!(
            accept(&request(&bad_key), "p").unwrap_err(),
            HandshakeError::Key
        );
        let mut bad_version = GOOD.to_vec();
        bad_version[2] = ("sec-websocket-version", "8");
        assert_eq!(
            accept(&request(&bad_version), "p").unwrap_err(),
            HandshakeError::Version
        );
    }
}
