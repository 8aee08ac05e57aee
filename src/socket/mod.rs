//! POS sockets owned end to end: the WebSocket handshake, the wire format, and each
//! connection's write path shared by the fan-out (which writes frames straight into sockets
//! that have room) and the socket's own task (which takes over when one has not).
//!
//! axum's `WebSocket` belongs to its task and offers no non-blocking write, so every delivery
//! would wake the socket's task; at 10,000 sockets per tenant those wakes, not the writes, are
//! the cost (docs/architecture.md, "Fan-out"). Owning the upgraded TCP stream lets the fan-out
//! write each event's frame, encoded once, with one non-blocking write per socket.

pub mod conn;
pub mod handshake;
pub mod wire;

pub(crate) use conn::{
    Conn, DeliveryLog, Flush, Kick, MAX_RUN_FRAMES, Offered, QueueBounds, Run, TypeFilter,
};
