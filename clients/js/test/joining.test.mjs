// Joining with the open orders (`snapshot=open`), the `ready` frame and type filters (`types`),
// as docs/protocol.md specifies them, against the real server.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { OrderpushClient } from 'orderpush-client';

import {
  Recorder,
  Server,
  WAIT_MS,
  headId,
  insertLoyalty,
  insertOrder,
  newTenant,
  psql,
  serverMissing,
  setStatus,
  sleep,
  waitFor,
} from './helpers.mjs';

const until = (what, check) => waitFor(what, check, WAIT_MS);

describe('snapshot, ready and types', { skip: serverMissing ?? false, concurrency: true }, () => {
  let server;
  before(async () => {
    server = await Server.start();
  });
  after(() => server?.stop());

  const start = (t, options) => {
    const c = new OrderpushClient({ url: server.url, ...options });
    t.after(() => c.close());
    const r = new Recorder(c);
    c.start();
    return { c, r, s: server };
  };

  /** Two open orders, a completed one and a loyalty event: the snapshot holds the open two. */
  async function openOrders(tenant) {
    await insertOrder(tenant, 'OPEN-1', 'confirmed');
    await insertOrder(tenant, 'OPEN-2', 'pending');
    await setStatus(tenant, 'OPEN-2', 'preparing');
    await insertOrder(tenant, 'DONE-1', 'confirmed');
    await setStatus(tenant, 'DONE-1', 'completed');
    await insertLoyalty(tenant, 10);
    await until('the events numbered', async () => (await headId(tenant)) === 6);
    return 6;
  }

  function assertSnapshot(r, head, numbers) {
    const snapshot = r.frames.filter((f) => f.type === 'order_snapshot');
    assert.deepEqual(snapshot.map((f) => f.data.orderNumber).sort(), numbers);
    for (const f of snapshot) {
      assert.equal(f.id, head, 'every frame of a snapshot carries its id');
      assert.equal(typeof f.data.status, 'string');
      assert.ok(Array.isArray(f.data.items));
    }
    const end = r.frames.find((f) => f.type === 'snapshot_end');
    assert.equal(end.id, head);
    assert.equal(end.complete, true);
    return snapshot;
  }

  test('a first start (no since) gets the open orders as order_snapshot, then snapshot_end, then live', async (t) => {
    const { tenant, key } = await newTenant('snap');
    const head = await openOrders(tenant);
    const { c, r } = await start(t, { tenant, key });
    await until('snapshot_end', () => r.frames.some((f) => f.type === 'snapshot_end'));
    const snapshot = assertSnapshot(r, head, ['OPEN-1', 'OPEN-2']);
    assert.equal(snapshot.find((f) => f.data.orderNumber === 'OPEN-2').data.status, 'preparing', 'as it is now');
    assert.equal(c.position, head);
    await insertOrder(tenant, 'LIVE-1');
    const live = await until('the live order', () => r.frames.find((f) => f.type === 'new_order'));
    assert.equal(live.id, head + 1);
    assert.ok(!r.frames.some((f) => f.type === 'resync_required'));
  });

  test('a since the server cannot resume from gets a snapshot instead of resync_required', async (t) => {
    const { tenant, key } = await newTenant('snapsince');
    const head = await openOrders(tenant);
    const { c, r } = await start(t, { tenant, key, since: 1000 }); // ahead of the log: a restore
    await until('snapshot_end', () => r.frames.some((f) => f.type === 'snapshot_end'));
    assertSnapshot(r, head, ['OPEN-1', 'OPEN-2']);
    assert.ok(!r.frames.some((f) => f.type === 'resync_required'));
    assert.equal(c.position, head, 'adopted although lower than since');
    await insertLoyalty(tenant, 1);
    assert.equal((await until('a live event', () => r.frames.find((f) => f.type === 'loyalty_updated'))).id, head + 1);
  });

  test('after an in-stream resync_required, the reconnect brings the orders it covered as order_snapshot', async (t) => {
    const { tenant, key } = await newTenant('snapresync');
    const { c, r } = await start(t, { tenant, key });
    await until('the first snapshot', () => r.frames.some((f) => f.type === 'snapshot_end'));
    await psql(`BEGIN;
      SET LOCAL orderpush.suppress = 'on';
      INSERT INTO orders (tenant_slug, order_number, customer_name, order_type, order_source, status, total_amount)
      VALUES ('${tenant}', 'QUIET-1', 'Test', 'delivery', 'online', 'confirmed', 10.00);
      COMMIT;`);
    const snapshot = await until('the order as order_snapshot', () => r.frames.find((f) => f.type === 'order_snapshot' && f.data.orderNumber === 'QUIET-1'));
    const resync = r.frames.find((f) => f.type === 'resync_required');
    assert.ok(resync, 'the resync was reported first');
    assert.ok(r.frames.indexOf(resync) < r.frames.indexOf(snapshot));
    assert.equal(r.opens.at(-1).since, null);
    const end = await until('the snapshot_end', () => r.frames.filter((f) => f.type === 'snapshot_end')[1]);
    assert.equal(c.position, end.id);
  });

  test('ready after the replay, and at once for a live join', async (t) => {
    const { tenant, key } = await newTenant('ready');
    for (const p of [1, 2, 3]) await insertLoyalty(tenant, p);
    await until('three events', async () => (await headId(tenant)) === 3);
    const { r } = await start(t, { tenant, key, since: 1, snapshot: false });
    const ready = await until('ready', () => r.frames.find((f) => f.type === 'ready'));
    assert.deepEqual(r.frames.map((f) => [f.type, f.id]), [['loyalty_updated', 2], ['loyalty_updated', 3], ['ready', 3]]);
    assert.equal(ready.tenant, tenant);

    const { r: live } = await start(t, { tenant, key, snapshot: false });
    const first = await until('ready for a live join', () => live.frames[0]);
    assert.deepEqual([first.type, first.id], ['ready', 3]);
  });

  test('types: only the listed types arrive, and the position follows ready past filtered ids', async (t) => {
    const { tenant, key } = await newTenant('types');
    const types = ['new_order', 'order_updated'];
    const { c, r, s } = await start(t, { tenant, key, types, snapshot: false });
    await r.opened();
    assert.match(r.opens[0].url, /[?&]types=new_order,order_updated(&|$)/);
    await insertLoyalty(tenant, 1);
    await insertOrder(tenant, 'T-1');
    await s.broadcast(tenant, 'menu_changed', {});
    await setStatus(tenant, 'T-1', 'preparing');
    await until('the order update', () => r.frames.some((f) => f.type === 'order_updated'));
    await sleep(200);
    assert.deepEqual(r.events().map((f) => f.type), ['new_order', 'order_updated']);
    await c.close();

    // Four more events the filter drops; a resume gets none of them but a ready at the head.
    for (const p of [2, 3]) await insertLoyalty(tenant, p);
    await s.broadcast(tenant, 'menu_changed', {});
    const head = 7;
    await until('seven events', async () => (await headId(tenant)) === head);
    const { c: again, r: r2 } = await start(t, { tenant, key, types, since: c.position, snapshot: false });
    await until('ready', () => r2.frames.some((f) => f.type === 'ready'));
    assert.deepEqual(r2.events(), []);
    assert.equal(again.position, head, 'a filtered socket resumes from the last id considered');
  });
});
