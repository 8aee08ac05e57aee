//! Integration tests: the real server, a fresh Postgres database per test, real clients.

mod broadcast;
mod cli;
mod common;
mod dba;
mod events;
mod protocol;
mod resilience;
mod resume;
mod tail;
mod websocket;
