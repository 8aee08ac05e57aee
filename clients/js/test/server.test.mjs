// The client against the real `orderpush serve` on Postgres: typed live events, resume with
// since, refusals (401, 403, 503 and 429 with Retry-After), revocation, ack, resyncs, close().

import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';

import { OrderpushClient } from 'orderpush-client';
import WebSocket from 'ws';

import {
  Recorder,
  Server,
  env,
  headId,
  insertGiftCard,
  insertLoyalty,
  insertOrder,
  newTenant,
  psql,
  serverMissing,
  setStatus,
  sleep,
  waitFor,
  withLog,
} from './helpers.mjs';

const run = promisify(execFile);
const badKey = () => `pos_${randomBytes(32).toString('hex')}`;

describe('against the real server', { skip: serverMissing ?? false, concurrency: true }, () => {
  /** One server for the tests that need nothing special; each test has a tenant of its own. */
  let server;
  before(async () => {
    server = await Server.start();
  });
  after(() => server?.stop());

  const client = (t, options) => {
    const c = new OrderpushClient({ url: server.url, ...options });
    t.after(() => c.close());
    return c;
  };

  test('live events arrive typed, each to its own listener, in id order', async (t) => {
    const c = client(t, { tenant: env.tenant, key: env.key });
    const r = new Recorder(c);
    const got = {};
    for (const type of ['new_order', 'order_updated', 'gift_card_purchased', 'loyalty_updated', 'broadcast']) {
      c.on(type, (e) => void (got[type] ??= []).push(e));
    }
    c.start();
    await r.opened();
    const card = `GC-${process.pid}-${Date.now()}`; // card numbers are unique database-wide
    const number = `KIT-${process.pid}-${Date.now()}`;
    await withLog(server, async () => {
      await insertOrder(env.tenant, number);
      await setStatus(env.tenant, number, 'preparing');
      await insertGiftCard(env.tenant, card);
      await insertLoyalty(env.tenant, 45);
      await server.broadcast(env.tenant, 'test_broadcast', { message: 'Test message' });
      await waitFor('five events', () => r.events().length >= 5);
    })();

    const events = r.events();
    assert.deepEqual(events.map((e) => e.type), ['new_order', 'order_updated', 'gift_card_purchased', 'loyalty_updated', 'test_broadcast']);
    const ids = events.map((e) => e.id);
    assert.deepEqual(ids, ids.map((_, i) => ids[0] + i), 'consecutive ids');
    const [order] = got.new_order;
    assert.equal(order.tenant, env.tenant);
    assert.equal(order.data.orderNumber, number);
    assert.equal(order.data.items[0].name, 'Pizza Margherita');
    assert.deepEqual(order.data.items[0].selectedAddons, [{ name: 'Extra Cheese', price: 1.5 }]);
    assert.match(order.timestamp, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
    assert.equal(got.order_updated[0].data.previousStatus, 'confirmed');
    assert.equal(got.order_updated[0].data.status, 'preparing');
    assert.equal(got.gift_card_purchased[0].data.cardNumber, card);
    assert.equal(got.loyalty_updated[0].data.pointsChange, 45);
    assert.deepEqual(got.broadcast.map((e) => [e.type, e.data]), [['test_broadcast', { message: 'Test message' }]]);
    assert.equal(c.position, ids.at(-1));

    await c.close();
    assert.equal(c.state, 'stopped');
    assert.deepEqual(r.stopped, { reason: 'closed', message: 'closed by the application', needsHuman: false });
    assert.deepEqual(r.closes, [], 'a clean close is not reported as a disconnect');
    await server.broadcast(env.tenant, 'after_close', {});
    await sleep(300);
    assert.equal(r.opens.length, 1, 'no reconnect after close()');
    assert.equal(r.events().length, 5, 'nothing delivered after close()');
  });

  test('since replays exactly what was missed, then live', async (t) => {
    const { tenant, key } = await newTenant('since');
    for (const p of [1, 2, 3]) await insertLoyalty(tenant, p);
    await waitFor('three events numbered', async () => (await headId(tenant)) === 3);

    const first = client(t, { tenant, key, since: 1, snapshot: false });
    const r1 = new Recorder(first);
    first.start();
    await r1.nFrames(2);
    assert.equal(r1.opens[0].url, `${server.url}/ws/pos/${tenant}?since=1`);
    await insertLoyalty(tenant, 4);
    await r1.nFrames(3);
    assert.deepEqual(r1.events().map((e) => [e.id, e.data.pointsChange]), [[2, 2], [3, 3], [4, 4]]);
    await first.close();
    const since = first.position;
    assert.equal(since, 4);

    // Missed while away: 5 and 6. Then 7 live.
    await insertLoyalty(tenant, 5);
    await server.broadcast(tenant, 'menu_changed', { item: 'x' });
    const second = client(t, { tenant, key, since });
    const r2 = new Recorder(second);
    second.start();
    await r2.nFrames(2);
    await insertLoyalty(tenant, 7);
    await waitFor('the live event', () => r2.events().length >= 3);
    await sleep(200); // anything extra would show up now
    assert.deepEqual(r2.events().map((e) => [e.id, e.type]), [[5, 'loyalty_updated'], [6, 'menu_changed'], [7, 'loyalty_updated']]);
  });

  test('a key of another tenant (403) stops the client for good', async (t) => {
    const { key } = await newTenant('other');
    const { tenant } = await newTenant('mine');
    const c = client(t, { tenant, key });
    const r = new Recorder(c);
    c.start();
    const stopped = await c.whenStopped();
    assert.equal(stopped.reason, 'forbidden');
    assert.equal(stopped.status, 403);
    assert.equal(stopped.needsHuman, true);
    assert.match(stopped.message, /another tenant/);
    assert.deepEqual(r.reconnects, []);
  });

  test('503 from the per-key connection cap: the client waits Retry-After, then gets in', async (t) => {
    const { tenant, key } = await newTenant('cap');
    // The key's 4 sockets (the default cap), held by other sockets.
    const holders = [];
    t.after(() => holders.forEach((ws) => ws.terminate()));
    for (let i = 0; i < 4; i++) {
      const ws = new WebSocket(`${server.url}/ws/pos/${tenant}`, { headers: { 'X-API-Key': key } });
      holders.push(ws);
      await new Promise((resolve, reject) => {
        ws.once('open', resolve);
        ws.once('error', reject);
      });
    }
    const c = client(t, { tenant, key });
    const r = new Recorder(c);
    c.start();
    const refused = await waitFor('the 503', () => r.errors.find((e) => e.kind === 'refused'));
    assert.equal(refused.status, 503);
    assert.equal(refused.retryAfterMs, 10_000, 'the server asks for 10 s');
    assert.match(refused.message, /HTTP 503/);
    const planned = r.reconnects[0];
    assert.ok(planned.delayMs >= 10_000, `planned delay ${planned.delayMs} ms`);
    holders.pop().close(); // a slot is free from now on
    const open = await r.opened(1);
    assert.ok(open.at - refused.at >= 10_000 - 15, `reconnected ${open.at - refused.at} ms after the 503`);
    assert.equal(r.errors.length, 1, 'a single attempt in between');
    await server.broadcast(tenant, 'after_cap', {});
    assert.equal((await r.nFrames(1))[0].type, 'after_cap');
  });

  test('a key revoked while connected (close 1008) stops the client for good', async (t) => {
    const { tenant, key, keyId } = await newTenant('revoke');
    assert.ok(keyId, 'the key id was printed');
    const c = client(t, { tenant, key });
    const r = new Recorder(c);
    c.start();
    await r.opened();
    await run(env.bin, ['keys', 'revoke', keyId], { env: { ...process.env, DATABASE_URL: env.databaseUrl } });
    const stopped = await c.whenStopped();
    assert.equal(stopped.reason, 'revoked');
    assert.equal(stopped.code, 1008);
    assert.equal(stopped.needsHuman, true);
    assert.deepEqual(r.closes.map((x) => x.code), [1008]);
    assert.deepEqual(r.reconnects, []);
  });

  test('a resync_required with a lower id (log_rewound: a restored database) is adopted', async (t) => {
    const { tenant, key } = await newTenant('rewound');
    await insertLoyalty(tenant, 1);
    await insertLoyalty(tenant, 2);
    await waitFor('two events numbered', async () => (await headId(tenant)) === 2);
    const c = client(t, { tenant, key, since: 1000, snapshot: false });
    const r = new Recorder(c);
    const resyncs = [];
    c.on('resync_required', (e) => void resyncs.push(e));
    c.start();
    await r.nFrames(1);
    assert.equal(resyncs[0].data.reason, 'log_rewound');
    assert.equal(resyncs[0].id, 2);
    assert.equal(c.position, 2, 'adopted although lower than since');
    await insertLoyalty(tenant, 3);
    const [, next] = await r.nFrames(2);
    assert.equal(next.id, 3, 'the next event is not mistaken for a duplicate');
    assert.equal(r.opens.length, 1, 'snapshot off: the same socket carries on');
  });

  test('an in-stream resync_required is reported, then the client reconnects with snapshot=open and no since', async (t) => {
    const { tenant, key } = await newTenant('resync');
    const c = client(t, { tenant, key });
    const r = new Recorder(c);
    const resyncs = [];
    c.on('resync_required', (e) => void resyncs.push(e));
    c.start();
    await r.opened();
    await insertLoyalty(tenant, 1);
    await r.nFrames(1);
    await psql(`BEGIN;
      SET LOCAL orderpush.suppress = 'on';
      INSERT INTO loyalty_transactions (tenant_slug, customer_id, points_change, new_balance, transaction_type)
      VALUES ('${tenant}', 'cust-1', 5, 5, 'adjusted');
      COMMIT;`);
    await waitFor('the resync', () => resyncs.length === 1);
    assert.equal(resyncs[0].data.reason, 'suppressed');
    const reopened = await r.opened(2);
    assert.equal(reopened.since, null);
    assert.equal(reopened.url, `${server.url}/ws/pos/${tenant}?snapshot=open`);
    await insertLoyalty(tenant, 3);
    const live = await waitFor('a live event after the reconnect', () => r.events().find((e) => e.type === 'loyalty_updated' && e.data.pointsChange === 3));
    assert.ok(live.id > resyncs[0].id);
    assert.equal(c.position, live.id);
  });

  test('ack(id) reaches the server; an ack made while disconnected is sent after reconnecting', async (t) => {
    const own = await Server.start();
    t.after(() => own.stop());
    const { tenant, key } = await newTenant('ack');
    const c = new OrderpushClient({ url: own.url, tenant, key });
    t.after(() => c.close());
    const r = new Recorder(c);
    c.start();
    await r.opened();
    await own.broadcast(tenant, 'first', {});
    await own.broadcast(tenant, 'second', {});
    const [one, two] = await r.nFrames(2);
    c.ack(one.id);
    const acked = (id) => async () => {
      const body = await own.adminTenant(tenant);
      return body.connections?.some((x) => x.last_acked_id === id);
    };
    await withLog(own, () => waitFor(`last_acked_id ${one.id} in presence`, acked(one.id)))();

    await own.stop();
    await waitFor('the disconnect', () => r.closes.length === 1);
    assert.equal(r.closes[0].code, 1001);
    c.ack(two.id); // no socket now: pending
    await own.restart();
    const reopened = await r.opened(2);
    assert.equal(reopened.since, two.id);
    await withLog(own, () => waitFor(`last_acked_id ${two.id} in presence after the reconnect`, acked(two.id)))();
  });

  test('401 stops the client at once, after a single attempt', async (t) => {
    const own = await Server.start();
    t.after(() => own.stop());
    const { tenant } = await newTenant('unauth');
    const c = new OrderpushClient({ url: own.url, tenant, key: badKey() });
    t.after(() => c.close());
    const r = new Recorder(c);
    c.start();
    const stopped = await c.whenStopped();
    assert.equal(stopped.reason, 'unauthorized');
    assert.equal(stopped.status, 401);
    assert.equal(stopped.needsHuman, true);
    assert.match(stopped.message, /HTTP 401: invalid API key/);
    await sleep(1_000); // four first-backoff delays: a retry would have happened by now
    assert.equal(await own.metric('orderpush_auth_failures_total'), 1, 'the server saw one attempt');
    assert.deepEqual(r.reconnects, []);
    assert.equal(c.state, 'stopped');
  });

  test('429 with Retry-After: the client plans its retry no sooner, and keeps trying', async (t) => {
    // One failure puts 127.0.0.1 in its cooling-off period; a second one uses up the lookup
    // it may cause meanwhile, so the next unknown key is answered 429 (docs/protocol.md).
    const own = await Server.start({ args: ['--auth-failure-limit', '1'] });
    t.after(() => own.stop());
    const { tenant, key } = await newTenant('limited');
    for (let i = 0; i < 2; i++) {
      const res = await fetch(own.http(`/ws/pos/${tenant}`), { headers: { 'X-API-Key': badKey() } });
      assert.equal(res.status, i === 0 ? 401 : 429);
    }
    const c = new OrderpushClient({ url: own.url, tenant, key });
    t.after(() => c.close());
    const r = new Recorder(c);
    c.start();
    const refused = await waitFor('the 429', () => r.errors.find((e) => e.kind === 'refused'));
    assert.equal(refused.status, 429);
    assert.ok(refused.retryAfterMs >= 30_000, `Retry-After ${refused.retryAfterMs} ms`);
    assert.ok(r.reconnects[0].delayMs >= refused.retryAfterMs, `planned ${r.reconnects[0].delayMs} ms`);
    await sleep(1_000);
    assert.equal(c.state, 'waiting', 'not stopped: a 429 is retried');
    assert.equal(r.errors.length, 1, 'no attempt before Retry-After');
    assert.deepEqual(r.opens, []);
  });

  test('browser-style transport: the key as a subprotocol, with a standard WebSocket', async (t) => {
    // Node 20's standard WebSocket (undici) is behind a flag: run it in a child process.
    const { tenant, key } = await newTenant('browser');
    const script = `
      import { OrderpushClient } from 'orderpush-client';
      const c = new OrderpushClient({ url: process.env.URL, tenant: process.env.TENANT, key: process.env.KEY, WebSocket: globalThis.WebSocket });
      c.on('open', (info) => console.log(JSON.stringify({ open: info })));
      c.on('broadcast', async (e) => { console.log(JSON.stringify({ event: e })); c.ack(e.id); await c.close(); });
      c.start();`;
    const child = spawn(process.execPath, ['--experimental-websocket', '--no-warnings', '--input-type=module', '-e', script], {
      cwd: new URL('..', import.meta.url),
      env: { ...process.env, URL: server.url, TENANT: tenant, KEY: key },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    t.after(() => child.kill());
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (err += d));
    await waitFor(`the browser-style client to open (stderr: ${err})`, () => out.includes('"open"'));
    await server.broadcast(tenant, 'hello_browser', { n: 1 });
    const code = await new Promise((resolve) => child.once('exit', resolve));
    assert.equal(code, 0, err);
    const lines = out.trim().split('\n').map((l) => JSON.parse(l));
    assert.equal(lines[0].open.url, `${server.url}/ws/pos/${tenant}?snapshot=open`);
    assert.equal(lines[1].event.type, 'hello_browser');
    assert.deepEqual(lines[1].event.data, { n: 1 });
  });
});

