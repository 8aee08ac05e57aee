//! orderpush: pushes Postgres changes to restaurant POS terminals over WebSocket, per tenant.
//!
//! One event flows through each module once, never back:
//!
//! ```text
//!  app write ──► trigger (migrations/) ──► orderpush.events row + pg_notify wake-up
//!  POST /broadcast (http::broadcast) ──► db::events::append_broadcasts ┘
//!                                             │
//!                 listener  ◄─────────────────┘  reads new rows per tenant (the table is the truth)
//!                    │
//!                   hub     fan-out per tenant into bounded per-client queues
//!                    │
//!                 http::ws  one task per POS socket: replay (`since`), then live frames
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
//! - [`alert`]: the undelivered-event alert, after each event is handed to the sockets.
//! - [`http`]: the axum routes (`/ws/pos/{tenant}`, `/broadcast`, health, metrics, admin).
//! - [`metrics`]: counters and histograms rendered in Prometheus text format.
//! - [`presence`]: which terminals are connected to which instance, shared through the database.
//! - [`revocation`]: the LISTEN connection for key changes and the key cache it keeps honest;
//!   closes revoked keys' sockets.
//! - [`activity`]: recent events and rates for the status page (in memory, bounded).
//! - [`server`]: wires everything together and runs until shutdown.
//! - [`tail`]: `orderpush tail`, a reconnecting POS client for people.
//! - [`cli`]: the subcommands behind the binary, and everything they print.
//!
//! Modules depend on each other top-down (`cli` → `server` → `http` → `hub`, `listener`,
//! `sequencer`, `revocation`, `presence`, `alert` → `db` → `event`, with `config` below all);
//! `tests/structure.rs` checks it.

pub mod activity;
pub mod alert;
pub mod cli;
pub mod config;
pub mod db;
pub mod event;
pub mod http;
pub mod hub;
pub mod listener;
pub mod metrics;
pub mod presence;
pub mod revocation;
pub mod sequencer;
pub mod server;
pub mod socket;
pub mod tail;
