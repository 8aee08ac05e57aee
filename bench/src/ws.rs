//! The POS client side: many WebSocket connections, each a task that reads frames into a
//! scenario's per-client state, optionally reconnecting with `?since=<last id>`.

use anyhow::{Result, anyhow};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{WebSocketStream, client_async_with_config};

use crate::clock::now_ns;

/// Client read buffer: POS frames are a few hundred bytes; tungstenite zeroes this chunk on
/// every read, so its 128 KiB default (or even 8 KiB) costs the load generator more CPU per
/// frame than the parsing does.
const CLIENT_READ_BUFFER: usize = 2 * 1024;
/// A handshake slower than this is a failed connect (bounds every connect loop).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// First reconnect delay after a drop; doubled per failed attempt up to `RECONNECT_MAX`, with
/// jitter, as a POS terminal would (so 10k clients do not hammer a restarting server in lockstep).
const RECONNECT_MIN: Duration = Duration::from_millis(50);
/// Upper bound of the reconnect back-off.
const RECONNECT_MAX: Duration = Duration::from_millis(500);

pub type Ws = WebSocketStream<TcpStream>;

/// What a client's frames feed; one per connection, shared with the scenario through a Mutex.
pub trait ClientLogic: Send + 'static {
    /// One text frame arrived at `at_ns`.
    fn on_text(&mut self, text: &str, at_ns: u64);
    /// The id to resume from on reconnect (`?since=`), if any.
    fn resume_from(&self) -> Option<i64> {
        None
    }
    /// The connection ended (close code if the server sent one).
    fn on_disconnect(&mut self, _code: Option<u16>, _at_ns: u64) {}
    /// A reconnect succeeded.
    fn on_reconnect(&mut self, _at_ns: u64) {}
}

/// The envelope fields every scenario needs; the rest of the frame is skipped.
#[derive(Deserialize)]
pub struct Frame<'a> {
    #[serde(rename = "type", default)]
    pub kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    pub id: Option<i64>,
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
}

/// Counters shared by all clients of a run.
#[derive(Default)]
pub struct ClientCounters {
    pub frames: AtomicU64,
    pub disconnects: AtomicU64,
    pub close_1013: AtomicU64,
    pub close_1001: AtomicU64,
    pub reconnects: AtomicU64,
    pub reconnect_failures: AtomicU64,
}

/// Where and as whom a client connects.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub tenant: String,
    pub key: String,
}

/// Opens one authenticated POS WebSocket.
pub async fn open(ep: &Endpoint, since: Option<i64>) -> Result<Ws> {
    let fut = async {
        let path = match since {
            Some(s) => format!("ws://{}/ws/pos/{}?since={s}", ep.addr, ep.tenant),
            None => format!("ws://{}/ws/pos/{}", ep.addr, ep.tenant),
        };
        let mut req = path.into_client_request()?;
        req.headers_mut()
            .insert("X-API-Key", HeaderValue::from_str(&ep.key)?);
        let tcp = TcpStream::connect(ep.addr).await?;
        tcp.set_nodelay(true)?;
        let cfg = WebSocketConfig::default()
            .read_buffer_size(CLIENT_READ_BUFFER)
            .write_buffer_size(0);
        match client_async_with_config(req, tcp, Some(cfg)).await {
            Ok((ws, _)) => Ok(ws),
            Err(WsError::Http(resp)) => Err(anyhow!("upgrade refused: HTTP {}", resp.status())),
            Err(e) => Err(anyhow!(e)),
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, fut)
        .await
        .map_err(|_| anyhow!("connect timed out after {CONNECT_TIMEOUT:?}"))?
}

/// A running client: its state and its reader task.
pub struct Client<S> {
    pub state: Arc<Mutex<S>>,
    pub task: JoinHandle<()>,
}

/// Locks a client's state; a poisoned lock (a panicked reader) still yields the data.
pub fn lock<S>(m: &Mutex<S>) -> std::sync::MutexGuard<'_, S> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Spawns the reader of an open connection. With `reconnect`, a dropped connection is reopened
/// with `?since=<resume_from>` until `stop` turns true.
pub fn spawn_reader<S: ClientLogic>(
    ws: Ws,
    ep: Endpoint,
    state: Arc<Mutex<S>>,
    counters: Arc<ClientCounters>,
    reconnect: bool,
    mut stop: watch::Receiver<bool>,
    seed: u64,
) -> JoinHandle<()> {
    let st = state.clone();
    tokio::spawn(async move {
        let mut ws = ws;
        let mut rng = seed | 1;
        loop {
            let code = read_until_closed(&mut ws, &st, &counters, &mut stop).await;
            if *stop.borrow() {
                return;
            }
            counters.disconnects.fetch_add(1, Ordering::Relaxed);
            match code {
                Some(1013) => counters.close_1013.fetch_add(1, Ordering::Relaxed),
                Some(1001) => counters.close_1001.fetch_add(1, Ordering::Relaxed),
                _ => 0,
            };
            lock(&st).on_disconnect(code, now_ns());
            if !reconnect {
                return;
            }
            let mut backoff = RECONNECT_MIN;
            ws = loop {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let jitter = Duration::from_micros(rng % (backoff.as_micros() as u64 + 1));
                tokio::select! {
                    _ = tokio::time::sleep(backoff / 2 + jitter / 2) => {}
                    _ = stop.changed() => return,
                }
                if *stop.borrow() {
                    return;
                }
                let since = lock(&st).resume_from();
                match open(&ep, since).await {
                    Ok(ws) => {
                        counters.reconnects.fetch_add(1, Ordering::Relaxed);
                        lock(&st).on_reconnect(now_ns());
                        break ws;
                    }
                    Err(_) => {
                        counters.reconnect_failures.fetch_add(1, Ordering::Relaxed);
                        backoff = (backoff * 2).min(RECONNECT_MAX);
                    }
                }
            };
        }
    })
}

/// Reads frames until the connection ends or `stop` flips; returns the close code, if any.
async fn read_until_closed<S: ClientLogic>(
    ws: &mut Ws,
    st: &Arc<Mutex<S>>,
    counters: &ClientCounters,
    stop: &mut watch::Receiver<bool>,
) -> Option<u16> {
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    let at = now_ns();
                    counters.frames.fetch_add(1, Ordering::Relaxed);
                    lock(st).on_text(t.as_str(), at);
                }
                Some(Ok(Message::Close(c))) => return c.map(|c| u16::from(c.code)),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            },
            _ = stop.changed() => {
                if *stop.borrow() {
                    return None;
                }
            }
        }
    }
}

/// Outcome of opening many connections.
#[derive(Debug, Default, Clone, Copy)]
pub struct ConnectStats {
    pub ok: usize,
    pub failed: usize,
    pub elapsed_ns: u64,
}

/// Opens `eps.len()` connections, at most `concurrency` handshakes in flight, and spawns their
/// readers as soon as each is open. Failed connects are counted, not retried (the report shows
/// them); `first_error` keeps the first reason.
#[allow(clippy::too_many_arguments)]
pub async fn connect_many<S: ClientLogic>(
    eps: &[Endpoint],
    mut make_state: impl FnMut(usize) -> S,
    counters: &Arc<ClientCounters>,
    reconnect: bool,
    stop: &watch::Receiver<bool>,
    concurrency: usize,
    first_error: &mut Option<String>,
) -> (Vec<Client<S>>, ConnectStats) {
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let t0 = now_ns();
    let mut pending = Vec::with_capacity(eps.len());
    for (i, ep) in eps.iter().enumerate() {
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let ep = ep.clone();
        let state = Arc::new(Mutex::new(make_state(i)));
        let st = state.clone();
        let counters = counters.clone();
        let stop = stop.clone();
        let h = tokio::spawn(async move {
            let r = open(&ep, None).await;
            drop(permit);
            r.map(|ws| {
                let seed = 0x5151_u64.wrapping_mul(i as u64 + 7);
                spawn_reader(ws, ep, st, counters, reconnect, stop, seed)
            })
        });
        pending.push((state, h));
    }
    let mut clients = Vec::with_capacity(eps.len());
    let mut stats = ConnectStats::default();
    for (state, h) in pending {
        let err = match h.await {
            Ok(Ok(task)) => {
                clients.push(Client { state, task });
                stats.ok += 1;
                continue;
            }
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        stats.failed += 1;
        if first_error.is_none() {
            *first_error = Some(err);
        }
    }
    stats.elapsed_ns = now_ns() - t0;
    (clients, stats)
}

/// Stops every reader (they drop their sockets) and waits for them, bounded.
pub async fn shutdown<S>(clients: Vec<Client<S>>, stop: &watch::Sender<bool>) {
    let _ = stop.send(true);
    let waits = clients.into_iter().map(|c| c.task);
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        futures_util::future::join_all(waits),
    )
    .await;
}
