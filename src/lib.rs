//! orderpush: pushes Postgres changes to restaurant POS terminals over WebSocket, per tenant.
//!
//! One event flows through each module once, never back:
//!
//! ```text
//!  app write ──► trigger orderpush.stage() (migrations/) ──► orderpush.staged row (+ wake-up)
//!  POST /broadcast (http::broadcast) ──► db::broadcasts ─────┘
//!                                                            │
//!   sequencer (one elected instance) ◄───────────────────────┘ renders and numbers them into
//!        │                                                     orderpush.events, one batch
//!        ▼                                                     per statement, then NOTIFY
//!   listener (every instance)  follows the log by batch (the table is the truth)
//!        │
//!       hub   per-tenant fan-out: each frame encoded once, offered to every socket
//!        │
//!   socket::Conn  written directly when the socket has room, else queued for its task
//!        │
//!   http::ws  one task per POS socket: replay (`since`) or snapshot, `ready`, then live
//! ```
//!
//! - [`config`]: the command line (clap, with environment fallbacks), the server's tunables and
//!   every default; it imports nothing from the crate.
//! - [`event`]: the event envelope and the exact JSON frame a POS receives.
//! - [`db`]: the connection pool and every SQL statement: migrations, API keys, the event log,
//!   the sequencer's batches, presence and the admin queries.
//! - [`listener`]: the dedicated LISTEN connection that follows the event log.
//! - [`sequencer`]: the elected instance that numbers staged rows into events.
//! - [`hub`]: per-tenant fan-out to connected clients with bounded queues.
//! - [`socket`]: one POS socket's wire format, handshake and ordered write path.
//! - [`alert`]: the undelivered-event alert, after each event is handed to the sockets, and the
//!   unacknowledged-order alert.
//! - [`http`]: the axum routes (`/ws/pos/{tenant}`, `/broadcast`, health, metrics, admin).
//! - [`metrics`]: counters and histograms rendered in Prometheus text format.
//! - [`presence`]: which terminals are connected to which instance, shared through the database.
//! - [`revocation`]: the LISTEN connection for key changes and the key cache it keeps honest;
//!   closes revoked keys' sockets.
//! - [`activity`]: recent events and rates for the status page (in memory, bounded).
//! - [`server`]: wires everything together and runs until shutdown.
//! - [`tail`]: `orderpush tail`, a reconnecting POS client for people.
//! - [`cli`]: the subcommands behind the binary, and everything they print.
//! - [`backoff`]: the capped exponential backoff of every reconnect loop.
//! - [`periodic`]: the clock of the periodic background jobs.
//!
//! Modules depend on each other top-down (`cli` → `server` → `http` → `hub`, `listener`,
//! `sequencer`, `revocation`, `presence`, `alert` → `socket` → `db` → `event`, with `config`,
//! `backoff` and `periodic` below all); `tests/structure.rs` checks it.

pub mod activity;
pub mod alert;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod db;
pub mod event;
pub mod http;
pub mod hub;
pub mod listener;
pub mod metrics;
pub mod periodic;
pub mod presence;
pub mod revocation;
pub mod sequencer;
pub mod server;
pub mod socket;
pub mod tail;
