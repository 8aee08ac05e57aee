//! Everything at once, for a bounded time: writers on several tenants, two instances, the
//! listener killed again and again, clients reconnecting, one client slow. Afterwards every
//! client that stayed or resumed must have every committed event of its tenant exactly once,
//! in id order.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::protocol::Message;
use tokio_util::sync::CancellationToken;

use crate::common::*;

/// How long the faults run. Bounded so the test stays well under a minute on a loaded machine.
const CHAOS_FOR: Duration = Duration::from_secs(25);
/// Listener kills, spread over the run.
const KILL_EVERY: Duration = Duration::from_millis(2500);
/// The slow client stalls between bursts of reading until this many large broadcasts on its
/// tenant were answered since the stall began: their 100 KiB frames are more than its queue,
/// the server's socket buffer and its own receive buffer hold, so it overflows by its own
/// slowness (listener outages are short, so catch-up bursts cannot be relied on). Counting
/// broadcasts instead of sleeping a fixed time keeps that true on a loaded machine, where the
/// writers slow down.
const STALL_BROADCASTS: usize = 6;
/// The longest stall: shorter than the server's 5 s close timeout, so the client still reads
/// the 1013 when the broadcasts are slow.
const STALL_MAX: Duration = Duration::from_millis(4000);
/// Per-client queue on both instances: small, so the slow client overflows quickly.
const QUEUE_BYTES: usize = 256 * 1024;
/// Size of the padding of the large broadcasts on t1.
const LARGE_PAD: usize = 100 * 1024;
const TENANTS: [&str; 3] = ["t1", "t2", "t3"];

/// What a client does between reconnects.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Reads all the time and stays on its instance; it reconnects only when cut off (a
    /// listener's catch-up after a long outage can be a burst larger than its queue).
    Steady,
    /// Drops its connection every second or so and resumes on the other instance.
    Hopper,
    /// Stops reading for a while, then reads; resumes whenever it is cut off.
    Slow,
}

/// Where each received event came from: which connection of the client (its round, instance
/// and `since`), so a hole can be traced to the connection that should have filled it.
type Origins = Vec<String>;

/// One resuming client: returns everything it received (and from which connection) and how
/// many 1013 closes it got. `large_sent` counts the large broadcasts answered so far (what the
/// slow client waits on).
async fn resuming_client(
    servers: Arc<Vec<TestServer>>,
    tenant: &'static str,
    key: String,
    behaviour: Behaviour,
    first_server: usize,
    stop: CancellationToken,
    large_sent: Arc<AtomicUsize>,
) -> (Vec<Value>, Origins, usize) {
    let mut got: Vec<Value> = Vec::new();
    let mut origins = Origins::new();
    let mut cut_off = 0;
    let mut round = 0usize;
    while !stop.is_cancelled() {
        let index = match behaviour {
            Behaviour::Steady => first_server,
            _ => (first_server + round) % servers.len(),
        };
        let server = &servers[index];
        round += 1;
        let since = got.last().map_or(0, |e| e["id"].as_i64().unwrap());
        let path = format!("/ws/pos/{tenant}?since={since}");
        let mut pos = match behaviour {
            Behaviour::Steady | Behaviour::Hopper => {
                Pos::connect(server, tenant, &key, Some(since)).await
            }
            Behaviour::Slow => connect_small_buffer(server, &path, &key, 4096).await,
        };
        let read_for = match behaviour {
            Behaviour::Steady => CHAOS_FOR * 4,
            Behaviour::Hopper => Duration::from_millis(700 + 150 * (round as u64 % 5)),
            Behaviour::Slow => Duration::from_millis(3000),
        };
        if let Behaviour::Slow = behaviour {
            let stall_until = tokio::time::Instant::now() + STALL_MAX;
            let target = large_sent.load(Ordering::Relaxed) + STALL_BROADCASTS;
            while large_sent.load(Ordering::Relaxed) < target
                && tokio::time::Instant::now() < stall_until
                && !stop.is_cancelled()
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let until = tokio::time::Instant::now() + read_for;
        loop {
            let next = tokio::select! {
                n = tokio::time::timeout_at(until, pos.ws.next()) => n,
                _ = stop.cancelled() => break,
            };
            match next {
                Err(_) => break, // done with this connection: drop it
                Ok(Some(Ok(Message::Text(t)))) if is_ready(&t) => {}
                Ok(Some(Ok(Message::Text(t)))) => {
                    got.push(serde_json::from_str(&t).unwrap());
                    origins.push(format!("round {round} on instance {index} since {since}"));
                }
                Ok(Some(Ok(Message::Close(c)))) => {
                    let code = c.map(|c| u16::from(c.code));
                    assert_eq!(code, Some(1013), "{tenant}: unexpected close");
                    cut_off += 1;
                    break;
                }
                Ok(Some(Ok(_))) => {}
                Ok(None) | Ok(Some(Err(_))) => break,
            }
        }
    }
    (got, origins, cut_off)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_every_client_that_stayed_or_resumed_has_every_event_once_in_order() {
    let db = TestDb::create().await;
    let mut keys = Vec::new();
    for t in TENANTS {
        db.tenant(t).await;
        keys.push(db.key(t).await);
    }
    let mut servers = Vec::new();
    for _ in 0..2 {
        servers.push(
            TestServer::builder(&db)
                .tuning(|t| t.client_queue_bytes = QUEUE_BYTES)
                .start()
                .await,
        );
    }
    let servers = Arc::new(servers);
    let stop = CancellationToken::new();
    let large_sent = Arc::new(AtomicUsize::new(0));

    // Clients: per tenant one steady reader on each instance and one that hops between them;
    // one slow reader on t1. All start from the beginning of the log.
    let mut clients = Vec::new();
    for (t, key) in TENANTS.iter().zip(&keys) {
        for (who, behaviour, first) in [
            ("steady on A", Behaviour::Steady, 0),
            ("steady on B", Behaviour::Steady, 1),
            ("hopper", Behaviour::Hopper, 0),
        ] {
            let task = resuming_client(
                Arc::clone(&servers),
                t,
                key.clone(),
                behaviour,
                first,
                stop.clone(),
                Arc::clone(&large_sent),
            );
            clients.push((*t, who, tokio::spawn(task)));
        }
    }
    clients.push((
        "t1",
        "slow",
        tokio::spawn(resuming_client(
            Arc::clone(&servers),
            "t1",
            keys[0].clone(),
            Behaviour::Slow,
            0,
            stop.clone(),
            Arc::clone(&large_sent),
        )),
    ));

    // Writers: database writes on every tenant, broadcasts through both instances, and large
    // broadcasts on t1 (what makes the slow client overflow).
    let mut writers = Vec::new();
    for (n, t) in TENANTS.iter().enumerate() {
        let client = db.client().await;
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.is_cancelled() {
                i += 1;
                match i % 3 {
                    0 => insert_loyalty(&client, t, i).await,
                    1 => insert_order_fast(&client, t, &format!("{t}-{i}"), 1 + i % 3).await.unwrap(),
                    _ => {
                        client
                            .execute(
                                "UPDATE orders SET status = CASE status WHEN 'ready' THEN 'preparing' ELSE 'ready' END
                                 WHERE id = (SELECT id FROM orders WHERE tenant_slug = $1 ORDER BY created_at DESC LIMIT 1)",
                                &[t],
                            )
                            .await
                            .unwrap();
                    }
                }
                tokio::time::sleep(Duration::from_millis(5 + 3 * n as u64)).await;
            }
        }));
    }
    // Two writers of large broadcasts, so their rate holds up when each waits for numbering.
    for (n, pad) in [(0usize, 16usize), (1, LARGE_PAD), (1, LARGE_PAD)] {
        let servers = Arc::clone(&servers);
        let stop = stop.clone();
        let large_sent = Arc::clone(&large_sent);
        writers.push(tokio::spawn(async move {
            let pad = "p".repeat(pad);
            let mut i = 0usize;
            while !stop.is_cancelled() {
                i += 1;
                let tenant = if n == 1 { "t1" } else { TENANTS[i % TENANTS.len()] };
                let (status, _) = servers[i % 2]
                    .broadcast(&json!({"tenant": tenant, "event": {"type": "chaos", "data": {"i": i, "pad": pad}}}))
                    .await;
                assert_eq!(status, 200);
                if n == 1 {
                    large_sent.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(if n == 1 { 80 } else { 20 })).await;
            }
        }));
    }

    // Faults: the listeners of both instances, and the sequencer (elected and standby, in the
    // middle of a batch or not), killed again and again.
    let admin = admin().await;
    let started = tokio::time::Instant::now();
    let mut kills = 0;
    let mut sequencer_kills = 0;
    while started.elapsed() < CHAOS_FOR {
        tokio::time::sleep(KILL_EVERY).await;
        kills += kill_listeners(&admin, &db.name).await;
        tokio::time::sleep(KILL_EVERY / 3).await;
        sequencer_kills += kill_sequencers(&admin, &db.name).await;
    }
    assert!(
        sequencer_kills >= 4,
        "sequencers were killed ({sequencer_kills})"
    );
    stop.cancel();
    for w in writers {
        w.await.unwrap();
    }
    assert!(kills >= 4, "listeners were killed ({kills})");

    // Verdict, per tenant, from the log.
    let client = db.client().await;
    db.wait_numbered().await;
    let mut logs = std::collections::HashMap::new();
    for t in TENANTS {
        let log = event_log(&client, t).await;
        assert!(log.len() > 100, "{t}: the writers wrote ({})", log.len());
        logs.insert(t, log);
    }
    for (t, who, task) in clients {
        let (mut got, mut origins, cut_off) = task.await.unwrap();
        if who == "slow" {
            assert!(cut_off >= 1, "the slow client was never cut off with 1013");
        }
        // A last resume picks up what was written after it stopped reading (resuming again if
        // a listener's catch-up burst overflows its queue meanwhile).
        let key = &keys[TENANTS.iter().position(|x| *x == t).unwrap()];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let last_of = |events: &[Value]| events.last().map_or(0, |e| e["id"].as_i64().unwrap());
        let head = last_of(&logs[t]);
        while last_of(&got) < head {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{t} {who}: catch-up stalled"
            );
            let since = got.last().map_or(0, |e| e["id"].as_i64().unwrap());
            let mut pos = Pos::connect(&servers[0], t, key, Some(since)).await;
            while last_of(&got) < head {
                let next = match tokio::time::timeout(WAIT, pos.ws.next()).await {
                    Ok(next) => next,
                    Err(_) => panic!(
                        "{t} {who}: catch-up from {since} stalled at {} of {} events\n{}",
                        got.len(),
                        logs[t].len(),
                        stall_report(&servers[0], &client, t, since).await
                    ),
                };
                match next {
                    Some(Ok(Message::Text(text))) if is_ready(&text) => {}
                    Some(Ok(Message::Text(text))) => {
                        got.push(serde_json::from_str(&text).unwrap());
                        origins.push(format!("the final catch-up since {since}"));
                    }
                    Some(Ok(Message::Close(c))) => {
                        assert_eq!(c.map(|c| u16::from(c.code)), Some(1013), "{t} {who}");
                        break;
                    }
                    Some(Ok(_)) => {}
                    None | Some(Err(_)) => break,
                }
            }
        }
        if let Some(at) = first_difference(&got, &logs[t]) {
            let around: Vec<String> = (at.saturating_sub(3)..(at + 3).min(got.len()))
                .map(|i| format!("{} from {}", got[i]["id"], origins[i]))
                .collect();
            panic!(
                "{t} {who}: received {} events, the log has {}; first difference at index {at}, \
                 received around it:\n{}",
                got.len(),
                logs[t].len(),
                around.join("\n")
            );
        }
        assert_exactly_the_log(&format!("{t} {who}"), &got, &logs[t]);
    }
}

/// The index of the first event id that differs between `got` and `log`, if any.
fn first_difference(got: &[Value], log: &[Value]) -> Option<usize> {
    let id = |e: &Value| e["id"].as_i64();
    (0..got.len().max(log.len())).find(|&i| got.get(i).map(id) != log.get(i).map(id))
}

/// What a stalled catch-up needs explained: the instance's listener and resume counters, its
/// view of the tenant, and the log around the client's position.
async fn stall_report(
    server: &TestServer,
    client: &tokio_postgres::Client,
    tenant: &str,
    since: i64,
) -> String {
    let metrics = metrics_text(server).await;
    let metrics: Vec<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#') && (l.contains("listener") || l.contains("resumes")))
        .collect();
    let tenant_view = reqwest::get(server.http(&format!("/admin/tenants/{tenant}")))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let rows = client
        .query(
            "SELECT format('%s batch %s %s', id, batch, type) FROM orderpush.events
             WHERE tenant_slug = $1 AND id >= $2::int8 - 2 ORDER BY id",
            &[&tenant, &since],
        )
        .await
        .unwrap();
    let rows: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    format!("metrics: {metrics:#?}\ntenant: {tenant_view}\nlog: {rows:#?}")
}
