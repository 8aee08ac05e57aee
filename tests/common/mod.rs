//! The shared test harness, by concern: a fresh database per test ([`db`]), the real server on
//! port 0 ([`server`]), real WebSocket clients ([`pos`]), the application's writes
//! ([`writers`]), child processes ([`process`]), the SQL of the docs ([`docs`]) and the set-ups
//! many tests share ([`fixture`]).
//! Tests `use crate::common::*`.

pub(crate) mod db;
pub(crate) mod docs;
pub(crate) mod fixture;
pub(crate) mod pos;
pub(crate) mod process;
pub(crate) mod server;
pub(crate) mod writers;

use std::time::Duration;

pub(crate) use db::*;
pub(crate) use docs::*;
pub(crate) use fixture::*;
pub(crate) use pos::*;
pub(crate) use process::*;
pub(crate) use server::*;
pub(crate) use writers::*;

/// How long a test waits for something that should happen promptly before failing.
pub(crate) const WAIT: Duration = Duration::from_secs(15);

/// Polls `check` every 20 ms until it holds; panics with `what` after `within`.
pub(crate) async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `f` every 50 ms until it returns `Some`, and returns that; panics with `what` after
/// [`WAIT`].
pub(crate) async fn eventually_some<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
