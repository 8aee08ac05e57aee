// A server killed (SIGKILL) in the middle of a stream and started again on the same port: the
// client reconnects with since, and every event arrives exactly once, in order.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { OrderpushClient } from 'orderpush-client';

import { Recorder, Server, WAIT_MS, insertLoyalty, newTenant, serverMissing, sleep, waitFor, withLog } from './helpers.mjs';

/** Broadcasts written in all; the server is killed after `KILL_AFTER` of them. */
const BROADCASTS = 60;
const KILL_AFTER = 20;
/** Events written straight into the database while the server is down. */
const WRITTEN_WHILE_DOWN = 3;

test('a server killed with SIGKILL mid-stream and restarted: every event exactly once, in order', { skip: serverMissing ?? false }, async (t) => {
  const server = await Server.start();
  t.after(() => server.kill('SIGKILL'));
  const { tenant, key } = await newTenant('restart');
  const client = new OrderpushClient({ url: server.url, tenant, key, backoff: { maxDelayMs: 1_000 } });
  t.after(() => client.close());
  const r = new Recorder(client);
  client.start();
  await r.opened();

  // The web app keeps broadcasting; a request that fails (server down, or killed before it
  // answered) is retried with the same Idempotency-Key, so each one is stored exactly once.
  let sent = 0;
  let ended = false;
  t.after(() => (ended = true));
  const writer = (async () => {
    for (let seq = 1; seq <= BROADCASTS; seq++) {
      const deadline = Date.now() + WAIT_MS;
      for (;;) {
        try {
          await server.broadcast(tenant, 'stream', { seq }, { idempotencyKey: `stream-${seq}` });
          break;
        } catch (e) {
          if (ended || Date.now() > deadline) throw e;
          await sleep(50);
        }
      }
      sent = seq;
      await sleep(10);
    }
  })();

  writer.catch(() => {}); // awaited below; a failure before that must not go unhandled
  await withLog(server, async () => {
    await waitFor(`${KILL_AFTER} broadcasts sent`, () => sent >= KILL_AFTER);
    await r.nFrames(5);
    await server.kill('SIGKILL');
    const lastBeforeKill = client.position;
    await waitFor('the client to notice', () => r.closes.length >= 1);
    for (let p = 1; p <= WRITTEN_WHILE_DOWN; p++) await insertLoyalty(tenant, p);
    await server.restart();
    const reopened = await r.opened(2);
    assert.ok(reopened.since >= lastBeforeKill, `resumed with since=${reopened.since}`);
    await writer;
    await waitFor(`all ${BROADCASTS + WRITTEN_WHILE_DOWN} events`, () => r.events().length >= BROADCASTS + WRITTEN_WHILE_DOWN);
    await sleep(300); // a duplicate would arrive now
  })();

  const events = r.events();
  assert.equal(events.length, BROADCASTS + WRITTEN_WHILE_DOWN, 'nothing twice');
  assert.deepEqual(events.map((e) => e.id), events.map((_, i) => i + 1), 'every id once, in order');
  assert.deepEqual(events.filter((e) => e.type === 'stream').map((e) => e.data.seq), Array.from({ length: BROADCASTS }, (_, i) => i + 1));
  assert.deepEqual(events.filter((e) => e.type === 'loyalty_updated').map((e) => e.data.pointsChange), [1, 2, 3]);
  assert.equal(r.closes[0].code, 1006, 'killed: no close frame');
  assert.equal(client.position, BROADCASTS + WRITTEN_WHILE_DOWN);
});
