//! Minimal HTTP/1.1 keep-alive client over raw TCP: enough for `POST /broadcast` and `GET /healthz`.

use anyhow::{Context, Result, anyhow, bail};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Largest response body read; the servers' answers are a few hundred bytes (bounds memory).
const MAX_BODY: usize = 1 << 20;
/// Largest header block accepted (bounds a misbehaving server).
const MAX_HEADER_LINES: usize = 100;
/// A request that takes longer than this is counted as failed (bounds every caller loop).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One keep-alive connection; reconnects by itself after the server closes it.
pub struct HttpConn {
    addr: SocketAddr,
    stream: Option<BufReader<TcpStream>>,
}

impl HttpConn {
    pub fn new(addr: SocketAddr) -> HttpConn {
        HttpConn { addr, stream: None }
    }

    /// Sends one request and returns (status, body). A timeout or I/O error drops the connection.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>)> {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.request_inner(method, path, body)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                self.stream = None;
                Err(e)
            }
            Err(_) => {
                self.stream = None;
                bail!("request timed out after {REQUEST_TIMEOUT:?}")
            }
        }
    }

    async fn request_inner(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>)> {
        if self.stream.is_none() {
            let s = TcpStream::connect(self.addr)
                .await
                .with_context(|| format!("connect {}", self.addr))?;
            s.set_nodelay(true)?;
            self.stream = Some(BufReader::new(s));
        }
        let stream = self.stream.as_mut().ok_or_else(|| anyhow!("no stream"))?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.addr);
        if let Some(b) = body {
            req.push_str("Content-Type: application/json\r\n");
            req.push_str(&format!("Content-Length: {}\r\n", b.len()));
        }
        req.push_str("\r\n");
        let mut buf = req.into_bytes();
        if let Some(b) = body {
            buf.extend_from_slice(b);
        }
        stream.get_mut().write_all(&buf).await?;

        let mut line = String::new();
        stream.read_line(&mut line).await?;
        if line.is_empty() {
            bail!("connection closed before the status line");
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("bad status line {line:?}"))?;
        let mut content_length: Option<usize> = None;
        let mut chunked = false;
        let mut close = false;
        for _ in 0..MAX_HEADER_LINES {
            line.clear();
            stream.read_line(&mut line).await?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let lower = l.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                content_length = v.trim().parse().ok();
            } else if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            } else if lower.starts_with("connection:") && lower.contains("close") {
                close = true;
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                line.clear();
                stream.read_line(&mut line).await?;
                let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                    .map_err(|_| anyhow!("bad chunk size {line:?}"))?;
                if body.len() + size > MAX_BODY {
                    bail!("response body over {MAX_BODY} bytes");
                }
                let start = body.len();
                body.resize(start + size, 0);
                stream.read_exact(&mut body[start..]).await?;
                line.clear();
                stream.read_line(&mut line).await?;
                if size == 0 {
                    break;
                }
            }
        } else if let Some(n) = content_length {
            if n > MAX_BODY {
                bail!("response body over {MAX_BODY} bytes");
            }
            body.resize(n, 0);
            stream.read_exact(&mut body).await?;
        } else {
            close = true;
            stream.take(MAX_BODY as u64).read_to_end(&mut body).await?;
        }
        if close {
            self.stream = None;
        }
        Ok((status, body))
    }
}

/// One-shot GET; returns the status.
pub async fn get_status(addr: SocketAddr, path: &str) -> Result<u16> {
    let mut c = HttpConn::new(addr);
    Ok(c.request("GET", path, None).await?.0)
}

/// orderpush's fan-out counters from `/metrics`: (`orderpush_frames_sent_total`,
/// `orderpush_frames_direct_total`); None when the server has no such endpoint or counters.
pub async fn frame_counters(addr: SocketAddr) -> Option<(f64, f64)> {
    let mut c = HttpConn::new(addr);
    let (status, body) = c.request("GET", "/metrics", None).await.ok()?;
    if status != 200 {
        return None;
    }
    let text = String::from_utf8_lossy(&body);
    let value = |name: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
    };
    Some((
        value("orderpush_frames_sent_total")?,
        value("orderpush_frames_direct_total")?,
    ))
}

/// Whether a 200 answer of `/broadcast` says the event was numbered: orderpush answers
/// `"numbered": false` when no sequencer numbered it in time; Node and a numbered answer
/// (`"id": N`) count as numbered.
pub fn broadcast_numbered(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Answer {
        numbered: Option<bool>,
    }
    serde_json::from_slice::<Answer>(body)
        .ok()
        .and_then(|a| a.numbered)
        .unwrap_or(true)
}
