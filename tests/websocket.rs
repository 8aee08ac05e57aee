//! The WebSocket connection's mechanics (docs/protocol.md, "Stay connected", "Close codes"):
//! client frames ignored or too big (1009), pings and the dead-peer deadline, the per-client
//! queue and its 1013, 1001 on shutdown. Who may connect: `security.rs`.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

#[tokio::test]
async fn shutdown_sends_going_away() {
    let OneTenant {
        db: _db,
        key,
        server,
    } = one_tenant("kitchen").await;
    let mut pos = Pos::connect(&server, "kitchen", &key, None).await;
    server.shutdown.cancel();
    assert_eq!(pos.close_code(Duration::from_secs(10)).await, Some(1001));
    server.stop().await;
}

#[tokio::test]
async fn client_frames_are_ignored_and_oversized_ones_end_the_socket() {
    let OneTenant {
        db: _db,
        key,
        server,
    } = one_tenant("kitchen").await;
    let mut pos = Pos::connect(&server, "kitchen", &key, None).await;
    pos.send_text(&json!({"type": "ack", "id": 1}).to_string())
        .await;
    pos.send_text("garbage").await;
    server
        .broadcast(&json!({"tenant": "kitchen", "event": {"type": "x", "data": 1}}))
        .await;
    assert_eq!(pos.next().await["type"], "x");
    // 64 KiB is far over the 4 KiB a POS may send: the server drops the socket.
    let _ = futures_util::SinkExt::send(
        &mut pos.ws,
        tokio_tungstenite::tungstenite::Message::Text("a".repeat(64 * 1024).into()),
    )
    .await;
    let code = pos.close_code(Duration::from_secs(5)).await;
    assert!(matches!(code, None | Some(1009)), "{code:?}");
    // Other clients are unaffected.
    let mut other = Pos::connect(&server, "kitchen", &key, None).await;
    server
        .broadcast(&json!({"tenant": "kitchen", "event": {"type": "y", "data": 1}}))
        .await;
    assert_eq!(other.next().await["type"], "y");
}

/// Per-client queue for the slow-consumer test: a few large frames.
const SMALL_QUEUE_BYTES: usize = 256 * 1024;
/// Size of each event in that test: large, so that the server's queue fills after a few
/// events rather than after megabytes of kernel socket buffers.
const LARGE_EVENT_BYTES: usize = 160 * 1024;
/// Events pushed while the slow client does not read: far more than its queue, the socket
/// buffers and tungstenite's write buffer hold together (~1 MB with a small receive buffer).
const PUSHED_WHILE_STALLED: i64 = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_gets_1013_while_a_fast_one_gets_everything_then_resumes() {
    let OneTenant {
        db: _db,
        key,
        server,
    } = one_tenant_with("kitchen", |s| {
        s.tuning(|t| t.client_queue_bytes = SMALL_QUEUE_BYTES)
    })
    .await;
    let mut fast = Pos::connect(&server, "kitchen", &key, None).await;
    let mut slow = connect_small_buffer(&server, "/ws/pos/kitchen", &key, 4096).await;

    let pad = "x".repeat(LARGE_EVENT_BYTES);
    for n in 1..=PUSHED_WHILE_STALLED {
        let (status, _) = server
            .broadcast(&json!({"tenant": "kitchen", "event": {"type": "bulk", "data": {"n": n, "pad": pad}}}))
            .await;
        assert_eq!(status, 200);
        // The fast client is served while the slow one is stalled.
        let ev = fast.next().await;
        assert_eq!(
            (ev["id"].as_i64(), ev["data"]["n"].as_i64()),
            (Some(n), Some(n))
        );
    }

    // The slow client reads again: what was buffered before the cut, then close 1013.
    let (events, code) = slow.events_until_close().await;
    for (ev, id) in events.iter().zip(1..) {
        assert_eq!(ev["id"].as_i64(), Some(id), "in order up to the cut");
    }
    let last = events.len() as i64;
    assert_eq!(
        code,
        Some(1013),
        "cut off with 'try again later' after {last} events"
    );
    assert!(last < PUSHED_WHILE_STALLED, "it really missed events");
    assert_eq!(
        metric(
            &server,
            "orderpush_disconnects_total{reason=\"slow_consumer\"}"
        )
        .await,
        1.0
    );

    // It resumes from the last id it has and gets the rest, then live events.
    let mut resumed = Pos::connect(&server, "kitchen", &key, Some(last)).await;
    for id in last + 1..=PUSHED_WHILE_STALLED {
        assert_eq!(resumed.next().await["id"].as_i64(), Some(id));
    }
    server
        .broadcast(&json!({"tenant": "kitchen", "event": {"type": "after", "data": 1}}))
        .await;
    assert_eq!(resumed.next().await["type"], "after");
    assert_eq!(fast.next().await["type"], "after");
    assert!(
        resumed
            .next_within(Duration::from_millis(300))
            .await
            .is_none(),
        "nothing twice"
    );
}

/// The dead-peer test's ping interval and timeout: the interval is half the timeout, so a live
/// client that answers every ping is never near the deadline, while a drop that waited for the
/// next ping tick would come up to a whole interval (4 s) after the deadline.
const DEAD_PEER_PING: Duration = Duration::from_secs(4);
const DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(8);
/// How much later than the deadline the client may see the drop: timer and loopback delays on
/// a busy 2-core machine, generously, yet well below the 3.5 s a ping-tick check would add.
const DEAD_PEER_SLACK: Duration = Duration::from_secs(2);
/// How long after a ping the silent peer sends its one frame: late enough that a ping tick
/// falling exactly on its deadline could not catch it (ticks are never early, pongs can be
/// sub-millisecond), early enough that the tick after would come 3.5 s late.
const DEAD_PEER_PAUSE: Duration = Duration::from_millis(500);

#[tokio::test]
async fn a_silent_peer_is_dropped_on_its_own_deadline_and_a_live_one_is_kept() {
    let OneTenant {
        db: _db,
        key,
        server,
    } = one_tenant_with("kitchen", |s| {
        s.tuning(|t| {
            t.ping_interval = DEAD_PEER_PING;
            t.pong_timeout = DEAD_PEER_TIMEOUT;
        })
    })
    .await;
    // A raw client: upgrades, answers the first ping with one frame, then is silent for good.
    let mut dead = raw_ws_connect(server.addr, "/ws/pos/kitchen", &key, None).await;
    let mut live = Pos::connect(&server, "kitchen", &key, None).await;
    let mut buf = vec![0u8; 64 * 1024];
    let mut before = Vec::new();
    while !before.windows(2).any(|w| w == [0x89, 0x00]) {
        let n = tokio::time::timeout(WAIT, dead.read(&mut buf))
            .await
            .expect("the server pings")
            .unwrap();
        assert!(n > 0, "closed before the first ping");
        before.extend_from_slice(&buf[..n]);
    }
    // Just after a ping tick: a drop that waited for a tick would come almost a whole interval
    // late. (A masked, empty pong: FIN + opcode 0xA, mask bit + length 0, a zero mask key.)
    tokio::time::sleep(DEAD_PEER_PAUSE).await;
    dead.write_all(&[0x8A, 0x80, 0, 0, 0, 0]).await.unwrap();
    let last_frame = Instant::now();

    // The live client keeps reading (tungstenite answers pings) while the dead one is watched.
    let watch_dead = async {
        let mut after = Vec::new();
        loop {
            let n = tokio::time::timeout(Duration::from_secs(30), dead.read(&mut buf))
                .await
                .expect("the server drops the silent peer")
                .unwrap_or(0);
            if n == 0 {
                return (after, last_frame.elapsed());
            }
            after.extend_from_slice(&buf[..n]);
        }
    };
    let watch_live = live.next_within(DEAD_PEER_TIMEOUT + DEAD_PEER_SLACK + DEAD_PEER_PING);
    let ((after, silent_for), event) = tokio::join!(watch_dead, watch_live);
    assert!(event.is_none(), "no event was sent: {event:?}");
    assert!(
        silent_for >= DEAD_PEER_TIMEOUT - Duration::from_millis(10),
        "dropped {silent_for:?} after its last frame, before the {DEAD_PEER_TIMEOUT:?} deadline"
    );
    assert!(
        silent_for <= DEAD_PEER_TIMEOUT + DEAD_PEER_SLACK,
        "dropped {silent_for:?} after its last frame: the deadline is {DEAD_PEER_TIMEOUT:?}"
    );
    assert!(
        after.windows(2).any(|w| w == [0x89, 0x00]),
        "the server kept pinging it after its last frame"
    );
    assert_eq!(
        metric(
            &server,
            "orderpush_disconnects_total{reason=\"ping_timeout\"}"
        )
        .await,
        1.0
    );

    // The live one, connected for longer than the timeout, answered every ping and stays.
    server
        .broadcast(&json!({"tenant": "kitchen", "event": {"type": "still_here", "data": 1}}))
        .await;
    assert_eq!(live.next().await["type"], "still_here");
}
