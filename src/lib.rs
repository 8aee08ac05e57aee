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
//! - [`config`]: the command line (clap, with environment fallbacks) and the server's tunables.
//! - [`event`]: the event envelope and the exact JSON frame a POS receives.
//! - [`db`]: the connection pool, migrations, API keys and event-log queries.
//! - [`listener`]: the dedicated LISTEN connection that follows the event log.
//! - [`hub`]: per-tenant fan-out to connected clients with bounded queues.
//! - [`http`]: the axum routes (`/ws/pos/{tenant}`, `/broadcast`, health, metrics).
//! - [`metrics`]: counters and histograms rendered in Prometheus text format.
//! - [`presence`]: which terminals are connected to which instance, shared through the database.
//! - [`revocation`]: the LISTEN connection for key changes; closes revoked keys' sockets.
//! - [`alert`]: the undelivered-event alert, after each event is handed to the sockets.
//! - [`activity`]: recent events and rates for the status page (in memory, bounded).
//! - [`server`]: wires everything together and runs until shutdown.
//! - [`tail`]: `orderpush tail`, a reconnecting POS client for people.
//! - [`cli`]: the subcommands behind the binary, and everything they print.

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
pub mod tail;
