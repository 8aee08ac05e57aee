//! The fan-out's two write paths on one socket: frames written straight into the socket by the
//! fan-out, and frames queued for the socket's task when the socket would block, interleave in
//! order, once each (docs/architecture.md, "Fan-out").

use std::time::Duration;

use serde_json::json;

use crate::common::*;

/// A receive buffer small enough that the server's writes block after a few frames.
const SMALL_RCVBUF: u32 = 4096;
/// Frames pushed while the client does not read: far more than the kernel's buffers on both
/// sides hold together, far less than the server's queue bound (1 MiB).
const STALLED_FRAMES: i64 = 40;
const STALLED_FRAME_BYTES: usize = 16 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_and_queued_frames_interleave_in_order_on_one_socket() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let key = db.key("kitchen").await;
    let server = TestServer::builder(&db).start().await;
    let mut pos = connect_small_buffer(&server, "/ws/pos/kitchen", &key, SMALL_RCVBUF).await;
    let broadcast = |n: i64, pad: usize| {
        let body = json!({"tenant": "kitchen", "event": {"type": "fan", "data": {"n": n, "pad": "p".repeat(pad)}}});
        let server = &server;
        async move {
            let (status, reply) = server.broadcast(&body).await;
            assert_eq!(status, 200, "{reply}");
        }
    };
    // The client reads nothing: the first frames go straight into the socket, then the socket
    // blocks and the rest queue for the socket's task.
    for n in 1..=STALLED_FRAMES {
        broadcast(n, STALLED_FRAME_BYTES).await;
    }
    let direct_before = metric(&server, "orderpush_frames_direct_total").await;
    assert!(
        direct_before >= 1.0,
        "the first frames were written directly"
    );
    let sent_before = metric(&server, "orderpush_frames_sent_total").await;
    assert!(
        sent_before < STALLED_FRAMES as f64,
        "the rest wait in the queue ({sent_before} sent)"
    );
    // It reads again: the queue drains, then small frames go direct again.
    let mut ids = Vec::new();
    for _ in 1..=STALLED_FRAMES {
        let ev = pos.next().await;
        ids.push(ev["data"]["n"].as_i64().unwrap());
    }
    for n in STALLED_FRAMES + 1..=STALLED_FRAMES + 10 {
        broadcast(n, 10).await;
        ids.push(pos.next().await["data"]["n"].as_i64().unwrap());
    }
    assert_eq!(
        ids,
        (1..=STALLED_FRAMES + 10).collect::<Vec<_>>(),
        "in order, once each"
    );
    assert!(pos.next_within(Duration::from_millis(300)).await.is_none());
    let direct_after = metric(&server, "orderpush_frames_direct_total").await;
    assert!(
        direct_after >= direct_before + 5.0,
        "after the queue drained, frames went direct again ({direct_before} → {direct_after})"
    );
    assert_eq!(
        metric(&server, "orderpush_frames_sent_total").await,
        (STALLED_FRAMES + 10) as f64
    );
}
