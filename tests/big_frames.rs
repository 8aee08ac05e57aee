//! Big frames always have a path that delivers (docs/reliability.md, *Hostile input*): an order
//! with a 700 KB note, and one whose frame is just under the 1 MiB frame limit, reach live and
//! resuming terminals intact; a peer that stops reading with such a frame pending is closed
//! with 1013 after the drain timeout instead of holding its socket forever.

use std::time::Duration;

use serde_json::Value;

use crate::common::*;

/// The customer-controlled note of the first order: 700 KB.
const NOTE_BYTES: usize = 700 * 1024;
/// Room left for the envelope and the rest of the order when a note fills a frame up to
/// `event::MAX_FRAME_BYTES` (a one-item order's frame is under 1 KB without its note).
const ENVELOPE_ROOM: usize = 2 * 1024;

/// Text of the notes: characters JSON must escape and non-ASCII text, so an intact copy
/// proves the frame was neither cut nor re-encoded.
const NOTE_TEXT: &str = "Ring twice \"please\"\n\tcafé ☕ \\ ";

/// A note of about `len` bytes.
fn note(len: usize) -> String {
    let mut s = NOTE_TEXT.repeat(len / NOTE_TEXT.len() + 1);
    while s.len() > len {
        s.pop();
    }
    s
}

/// The longest note whose JSON string (escapes included, quotes excluded) has at most
/// `json_len` bytes: what fills a frame.
fn note_filling(json_len: usize) -> String {
    let mut s = String::with_capacity(json_len);
    let mut escaped = 0;
    for c in NOTE_TEXT.chars().cycle() {
        let n = serde_json::to_string(&c).unwrap().len() - 2;
        if escaped + n > json_len {
            return s;
        }
        escaped += n;
        s.push(c);
    }
    unreachable!("the cycle never ends")
}

/// Inserts an online order with `note` as its special instructions, and one item, in one
/// transaction (items after the order, as the web app does).
async fn insert_order_with_note(client: &mut tokio_postgres::Client, number: &str, note: &str) {
    let tx = client.transaction().await.unwrap();
    let id: String = tx
        .query_one(
            "INSERT INTO orders (tenant_slug, order_number, customer_name, order_type, order_source,
                                 status, total_amount, special_instructions)
             VALUES ('kitchen', $1, 'Test', 'delivery', 'online', 'confirmed', 10.00, $2)
             RETURNING id::text",
            &[&number, &note],
        )
        .await
        .unwrap()
        .get(0);
    tx.execute(
        "INSERT INTO order_items (order_id, menu_item_id, name, quantity, price)
         VALUES ($1::text::uuid, 'item-1', 'Pizza', 1, 10.00)",
        &[&id],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

/// Reads the next text frame: (raw length, parsed).
async fn next_frame(pos: &mut Pos) -> (usize, Value) {
    let raw = pos
        .next_raw_within(WAIT)
        .await
        .expect("a frame arrives in time");
    (raw.len(), serde_json::from_str(&raw).unwrap())
}

fn assert_order(ev: &Value, id: i64, number: &str, note: &str) {
    assert_eq!(ev["id"], id);
    assert_eq!(ev["type"], "new_order");
    assert_eq!(ev["data"]["orderNumber"], number);
    assert_eq!(ev["data"]["items"].as_array().map(Vec::len), Some(1));
    assert!(
        ev["data"]["specialInstructions"].as_str() == Some(note),
        "the note of order {number} arrived intact"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_700_kb_order_note_and_a_maximal_frame_reach_live_and_resuming_pos_intact() {
    let OneTenant { db, key, server } = one_tenant("kitchen").await;
    let mut live = Pos::connect(&server, "kitchen", &key, None).await;
    let mut client = db.client().await;
    insert_loyalty(&client, "kitchen", 1).await;
    assert_eq!(live.next().await["id"], 1);

    let big = note(NOTE_BYTES);
    insert_order_with_note(&mut client, "BIG-1", &big).await;
    let (_, ev) = next_frame(&mut live).await;
    assert_order(&ev, 2, "BIG-1", &big);
    // Too big for the in-memory history: the resume reads the log.
    let mut resumed = Pos::connect(&server, "kitchen", &key, Some(1)).await;
    let (_, ev) = next_frame(&mut resumed).await;
    assert_order(&ev, 2, "BIG-1", &big);

    let max_frame = orderpush::event::MAX_FRAME_BYTES;
    let biggest = note_filling(max_frame - ENVELOPE_ROOM);
    insert_order_with_note(&mut client, "BIG-2", &biggest).await;
    for pos in [&mut live, &mut resumed] {
        let (len, ev) = next_frame(pos).await;
        assert!(len <= max_frame, "a {len}-byte frame");
        assert!(len > max_frame - 2 * ENVELOPE_ROOM, "a {len}-byte frame");
        assert_order(&ev, 3, "BIG-2", &biggest);
    }
    let mut resumed_again = Pos::connect(&server, "kitchen", &key, Some(2)).await;
    let (_, ev) = next_frame(&mut resumed_again).await;
    assert_order(&ev, 3, "BIG-2", &biggest);

    // Nobody was dropped: every socket goes on live.
    insert_loyalty(&client, "kitchen", 4).await;
    for pos in [&mut live, &mut resumed, &mut resumed_again] {
        assert_eq!(pos.next().await["id"], 4);
    }
    assert_eq!(metric(&server, "orderpush_connections").await, 3.0);
    assert_eq!(
        metric(&server, "orderpush_resumes_from_database_total").await,
        2.0
    );
}

/// The drain timeout in the test below (production: `config::DRAIN_TIMEOUT`, 30 s).
const SHORT_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Near-maximal frames sent to the peer that stopped reading: more than the kernel's socket
/// buffers take on loopback (the server's send buffer grows up to `tcp_wmem`'s maximum, 4 MiB
/// by default), with room to spare.
fn stalling_frames() -> usize {
    let wmem_max = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().last()?.parse::<usize>().ok())
        .unwrap_or(4 << 20);
    wmem_max / orderpush::event::MAX_FRAME_BYTES + 4
}
/// Its queue in that test: room for all of them (on any usual `tcp_wmem`), so the queue never
/// overflows and only the drain timeout can end the stall.
const ROOMY_QUEUE_BYTES: usize = 64 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_with_a_big_frame_pending_is_closed_with_1013() {
    let OneTenant { db, key, server } = one_tenant_with("kitchen", |s| {
        s.tuning(|t| {
            t.drain_timeout = SHORT_DRAIN_TIMEOUT;
            t.client_queue_bytes = ROOMY_QUEUE_BYTES;
        })
    })
    .await;
    let mut live = Pos::connect(&server, "kitchen", &key, None).await;
    // It will not read.
    let mut stalled = connect_small_buffer(&server, "/ws/pos/kitchen", &key, 4096).await;

    let mut client = db.client().await;
    let big = note_filling(orderpush::event::MAX_FRAME_BYTES - ENVELOPE_ROOM);
    let frames = stalling_frames();
    for n in 1..=frames {
        insert_order_with_note(&mut client, &format!("BIG-{n}"), &big).await;
        let (_, ev) = next_frame(&mut live).await;
        assert_order(&ev, n as i64, &format!("BIG-{n}"), &big);
    }

    eventually(
        "the stalled socket is cut by the drain timeout",
        WAIT,
        || async { metric(&server, "orderpush_drain_timeouts_total").await == 1.0 },
    )
    .await;
    // It reads again at last: what was pending, intact and in order, then close 1013.
    let (events, code) = stalled.events_until_close().await;
    for (ev, id) in events.iter().zip(1..) {
        assert_order(ev, id, &format!("BIG-{id}"), &big);
    }
    let ids: Vec<i64> = events.iter().map(|ev| ev["id"].as_i64().unwrap()).collect();
    assert_eq!(
        code,
        Some(1013),
        "closed with 'try again later' after {ids:?}"
    );
    assert!(ids.len() < frames, "it really stalled");
    eventually("the disconnect is counted", WAIT, || async {
        metric(
            &server,
            "orderpush_disconnects_total{reason=\"slow_consumer\"}",
        )
        .await
            == 1.0
    })
    .await;

    // The live socket, idle for longer than the drain timeout since, was not touched.
    tokio::time::sleep(SHORT_DRAIN_TIMEOUT * 2).await;
    insert_loyalty(&client, "kitchen", 3).await;
    assert_eq!(live.next().await["id"], frames as i64 + 1);
    assert_eq!(metric(&server, "orderpush_drain_timeouts_total").await, 1.0);
}
