//! Integration tests: the real server, a fresh Postgres database per test, real clients.

mod admin;
mod big_frames;
mod bounds;
mod broadcast;
mod browser_auth;
mod chaos;
mod cli;
mod common;
mod dba;
mod events;
mod faults;
mod fuzz;
mod isolation;
mod ops_logs;
mod presence;
mod protocol;
mod replay;
mod resilience;
mod restart;
mod resume;
mod security;
mod status_page;
mod structure;
mod tail;
mod websocket;
mod write_path;
