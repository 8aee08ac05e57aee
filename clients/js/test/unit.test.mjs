// The client's pure logic, without a server: position tracking, backoff, Retry-After, URL
// building, validation, frame parsing, and the delivery order of a scripted socket.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import {
  Backoff,
  MAX_RETRY_AFTER_MS,
  MAX_TYPES,
  OrderpushClient,
  Position,
  RETRY_AFTER_JITTER_MS,
  buildUrl,
  fatalStatus,
  parseFrame,
  parseRetryAfter,
  retryDelay,
  validateBaseUrl,
  validateSince,
  validateTenant,
  validateTypes,
} from 'orderpush-client';

const event = (type, id) => ({ type, tenant: 'kitchen', timestamp: '2025-10-11T14:00:00.000Z', data: {}, id });

describe('Position', () => {
  test('events move it; an event at or below it is a duplicate', () => {
    const p = new Position(null);
    assert.equal(p.id, null);
    assert.equal(p.observe(event('new_order', 3)), true);
    assert.equal(p.id, 3);
    assert.equal(p.observe(event('test_broadcast', 4)), true);
    assert.equal(p.observe(event('order_updated', 4)), false, 'same id twice');
    assert.equal(p.observe(event('order_updated', 2)), false, 'older');
    assert.equal(p.id, 4);
  });

  test('starts from since', () => {
    const p = new Position(10);
    assert.equal(p.observe(event('new_order', 10)), false);
    assert.equal(p.observe(event('new_order', 11)), true);
    assert.equal(p.id, 11);
  });

  test('resync_required is adopted even when lower (log_rewound), and events after it flow', () => {
    const p = new Position(1000);
    assert.equal(p.observe(event('resync_required', 2)), true);
    assert.equal(p.id, 2);
    assert.equal(p.observe(event('loyalty_updated', 3)), true);
    assert.equal(p.id, 3);
  });

  test('order_snapshot frames do not move it; snapshot_end sets it, even lower', () => {
    const p = new Position(50);
    for (let i = 0; i < 3; i++) assert.equal(p.observe(event('order_snapshot', 40)), true);
    assert.equal(p.id, 50);
    assert.equal(p.observe({ type: 'snapshot_end', tenant: 'kitchen', id: 40, complete: true }), true);
    assert.equal(p.id, 40);
    assert.equal(p.observe(event('new_order', 41)), true);
  });

  test('ready moves it forward (a filtered socket skipped ids), never back', () => {
    const p = new Position(5);
    p.observe({ type: 'ready', tenant: 'kitchen', id: 9 });
    assert.equal(p.id, 9);
    p.observe({ type: 'ready', tenant: 'kitchen', id: 7 });
    assert.equal(p.id, 9);
    const q = new Position(null);
    q.observe({ type: 'ready', tenant: 'kitchen', id: 0 });
    assert.equal(q.id, 0);
  });
});

describe('Backoff', () => {
  test('doubles from 250 ms to the 10 s cap, each delay in the upper half of its step', () => {
    const low = new Backoff({}, () => 0);
    const high = new Backoff({}, () => 0.999999);
    const nominal = [250, 500, 1000, 2000, 4000, 8000, 10000, 10000, 10000];
    for (const n of nominal) {
      assert.equal(low.next(), n / 2);
      assert.equal(high.next(), n);
    }
    assert.equal(low.attempt, nominal.length);
    low.reset();
    assert.equal(low.attempt, 0);
    assert.equal(low.next(), 125);
  });

  test('jitter spreads the delays', () => {
    const b = new Backoff({ initialDelayMs: 1000, maxDelayMs: 1000 });
    const seen = new Set(Array.from({ length: 50 }, () => b.next()));
    assert.ok(seen.size > 10, `${seen.size} distinct delays`);
    for (const d of seen) assert.ok(d >= 500 && d <= 1000, `${d}`);
  });

  test('stays finite after very many attempts', () => {
    const b = new Backoff({}, () => 1);
    for (let i = 0; i < 5000; i++) b.next();
    assert.equal(b.next(), 10000);
  });

  test('rejects nonsense settings', () => {
    assert.throws(() => new Backoff({ initialDelayMs: 0 }), RangeError);
    assert.throws(() => new Backoff({ maxDelayMs: Number.NaN }), RangeError);
    assert.throws(() => new Backoff({ initialDelayMs: 500, maxDelayMs: 100 }), RangeError);
  });
});

describe('Retry-After', () => {
  test('delta-seconds and HTTP dates, capped, null when absent or unreadable', () => {
    assert.equal(parseRetryAfter('10'), 10_000);
    assert.equal(parseRetryAfter(' 5 '), 5_000);
    assert.equal(parseRetryAfter('0'), 0);
    const now = Date.parse('2025-10-11T14:00:00Z');
    assert.equal(parseRetryAfter('Sat, 11 Oct 2025 14:00:30 GMT', now), 30_000);
    assert.equal(parseRetryAfter('Sat, 11 Oct 2025 13:00:00 GMT', now), 0, 'a past date: now');
    assert.equal(parseRetryAfter('99999999'), MAX_RETRY_AFTER_MS);
    assert.equal(parseRetryAfter(undefined), null);
    assert.equal(parseRetryAfter('soon'), null);
    assert.equal(parseRetryAfter('-3'), null);
  });

  test('the retry waits at least Retry-After, plus at most the jitter', () => {
    assert.equal(retryDelay(300, null), 300);
    assert.equal(retryDelay(300, 10_000, () => 0), 10_000);
    assert.equal(retryDelay(300, 10_000, () => 1), 10_000 + RETRY_AFTER_JITTER_MS);
    assert.equal(retryDelay(20_000, 10_000, () => 0), 20_000, 'a longer backoff wins');
  });
});

describe('URL', () => {
  test('since, snapshot and types in the query', () => {
    const base = 'ws://127.0.0.1:9011';
    assert.equal(buildUrl(base, 'kitchen', { since: null, snapshot: false, types: null }), `${base}/ws/pos/kitchen`);
    assert.equal(buildUrl(base, 'kitchen', { since: 0, snapshot: false, types: null }), `${base}/ws/pos/kitchen?since=0`);
    assert.equal(
      buildUrl(base, 'kitchen', { since: 41, snapshot: true, types: ['new_order', 'order_updated'] }),
      `${base}/ws/pos/kitchen?since=41&snapshot=open&types=new_order,order_updated`,
    );
    assert.equal(buildUrl(base, 'kitchen', { since: null, snapshot: true, types: null }), `${base}/ws/pos/kitchen?snapshot=open`);
  });

  test('base URLs: schemes mapped, path prefix kept, trailing slash dropped', () => {
    assert.equal(validateBaseUrl('ws://127.0.0.1:9011'), 'ws://127.0.0.1:9011');
    assert.equal(validateBaseUrl('http://pos.local:9011/'), 'ws://pos.local:9011');
    assert.equal(validateBaseUrl('https://example.com/orderpush/'), 'wss://example.com/orderpush');
    assert.equal(validateBaseUrl('wss://example.com'), 'wss://example.com');
    for (const bad of ['', 'example.com', 'ftp://example.com', 'ws://h/?since=3', 'ws://h/#x', 'ws://u:p@h/']) {
      assert.throws(() => validateBaseUrl(bad), TypeError, bad);
    }
  });

  test('type names follow the server rule: 1..64 of [A-Za-z0-9_.-]', () => {
    assert.deepEqual(validateTypes(['new_order', 'x.y-Z_9', 'new_order']), ['new_order', 'x.y-Z_9']);
    assert.deepEqual(validateTypes(['a'.repeat(64)]), ['a'.repeat(64)]);
    for (const bad of [[], [''], ['a'.repeat(65)], ['new order'], ['a,b'], ['é'], [3], 'new_order']) {
      assert.throws(() => validateTypes(bad), TypeError, JSON.stringify(bad));
    }
    const many = Array.from({ length: MAX_TYPES + 1 }, (_, i) => `t${i}`);
    assert.throws(() => validateTypes(many), TypeError);
    assert.equal(validateTypes(many.slice(1)).length, MAX_TYPES);
  });

  test('tenants and since', () => {
    assert.equal(validateTenant('kitchen-2'), 'kitchen-2');
    for (const bad of ['', 'Kitchen', 'a/b', 'a'.repeat(64), '../x']) assert.throws(() => validateTenant(bad), TypeError);
    assert.equal(validateSince(undefined), null);
    assert.equal(validateSince(0), 0);
    for (const bad of [-1, 1.5, '3', Number.MAX_SAFE_INTEGER + 1]) assert.throws(() => validateSince(bad), TypeError);
  });
});

describe('frames', () => {
  test('parses what the client relies on and keeps everything else', () => {
    const ok = parseFrame('{"type":"new_order","tenant":"kitchen","id":7,"data":{"a":1},"extra":true}');
    assert.equal(ok.ok, true);
    assert.equal(ok.frame.extra, true);
    assert.deepEqual(ok.frame.data, { a: 1 });
    const end = parseFrame('{"type":"snapshot_end","tenant":"kitchen","id":7}');
    assert.equal(end.frame.complete, false, 'an unstated complete is not claimed');
    for (const bad of ['nope', '[]', 'null', '{"id":1}', '{"type":"","id":1}', '{"type":"x"}', '{"type":"x","id":-1}', '{"type":"x","id":1.5}', '{"type":"x","id":"1"}']) {
      assert.equal(parseFrame(bad).ok, false, bad);
    }
  });

  test('refusals: 401, 403, 400 and other 4xx stop; 408, 429 and 5xx are retried', () => {
    assert.equal(fatalStatus(401), 'unauthorized');
    assert.equal(fatalStatus(403), 'forbidden');
    assert.equal(fatalStatus(400), 'bad_request');
    assert.equal(fatalStatus(404), 'refused');
    for (const s of [408, 429, 500, 502, 503]) assert.equal(fatalStatus(s), null, `${s}`);
  });
});

describe('client options', () => {
  const good = { url: 'ws://127.0.0.1:9', tenant: 'kitchen', key: `pos_${'a'.repeat(64)}` };

  test('bad options are refused at construction', () => {
    assert.doesNotThrow(() => new OrderpushClient(good));
    for (const [name, value] of [
      ['url', 'nope'],
      ['tenant', 'Bad Tenant'],
      ['key', ''],
      ['key', 'pos_a, orderpush.key.x'],
      ['since', -1],
      ['snapshot', 'all'],
      ['types', []],
      ['types', ['bad type']],
      ['silenceTimeoutMs', 0],
    ]) {
      assert.throws(() => new OrderpushClient({ ...good, [name]: value }), /invalid|must|types/, `${name}=${value}`);
    }
  });

  test('ack ids must be non-negative integers; start() only once', async () => {
    const client = new OrderpushClient(good);
    for (const bad of [-1, 1.5, '3', null]) assert.throws(() => client.ack(bad), TypeError);
    client.ack(3); // no socket yet: kept for the first connection
    assert.equal(client.state, 'idle');
    await client.close();
    assert.equal(client.state, 'stopped');
    assert.throws(() => client.start(), /stopped/);
  });
});

/**
 * A scripted standard WebSocket: opens on the next tick, then delivers what the test pushes.
 * Only for the client's own ordering logic; the real server is in server.test.mjs.
 */
class ScriptedSocket {
  static last = null;
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 0;
    this.sent = [];
    ScriptedSocket.last = this;
    setTimeout(() => {
      this.readyState = 1;
      this.onopen?.({});
    });
  }
  push(frame) {
    this.onmessage?.({ data: typeof frame === 'string' ? frame : JSON.stringify(frame) });
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close(code = 1000, reason = '') {
    if (this.readyState === 3) return;
    this.readyState = 3;
    setTimeout(() => this.onclose?.({ code, reason }));
  }
}

describe('delivery (scripted socket)', () => {
  const options = { url: 'ws://scripted', tenant: 'kitchen', key: `pos_${'b'.repeat(64)}`, WebSocket: ScriptedSocket };

  test('offers the key as a subprotocol; async listeners run one frame at a time, in order; duplicates are dropped', async (t) => {
    const client = new OrderpushClient({ ...options, since: 1 });
    t.after(() => client.close());
    const log = [];
    const positions = [];
    client.on('position', (id) => void positions.push(id));
    client.on('new_order', async (e) => {
      log.push(`start ${e.id} at ${client.position}`);
      await new Promise((resolve) => setTimeout(resolve, 20));
      log.push(`end ${e.id}`);
      client.ack(e.id);
    });
    client.on('broadcast', (e) => void log.push(`broadcast ${e.type} ${e.id}`));
    client.start();
    await new Promise((resolve) => client.on('open', resolve));
    const ws = ScriptedSocket.last;
    assert.deepEqual(ws.protocols, ['orderpush.v1', `orderpush.key.pos_${'b'.repeat(64)}`]);
    assert.equal(ws.url, 'ws://scripted/ws/pos/kitchen?since=1&snapshot=open');
    ws.push(event('new_order', 2));
    ws.push(event('new_order', 2)); // a duplicate
    ws.push(event('test_broadcast', 3));
    ws.push(event('new_order', 4));
    ws.push(event('new_order', 1)); // older than since
    await new Promise((resolve) => setTimeout(resolve, 150));
    assert.deepEqual(log, ['start 2 at 1', 'end 2', 'broadcast test_broadcast 3', 'start 4 at 3', 'end 4']);
    assert.deepEqual(ws.sent, [{ type: 'ack', id: 2 }, { type: 'ack', id: 4 }]);
    assert.equal(client.position, 4);
    assert.deepEqual(positions, [2, 3, 4], 'the position moves once each frame is handled');
    await client.close();
  });

  test('a failing listener is reported and the next frame still delivered; bad frames are reported', async (t) => {
    const client = new OrderpushClient(options);
    t.after(() => client.close());
    const errors = [];
    const seen = [];
    client.on('error', (e) => void errors.push(e.kind));
    client.on('loyalty_updated', (e) => {
      if (e.id === 1) throw new Error('printer on fire');
      seen.push(e.id);
    });
    client.start();
    await new Promise((resolve) => client.on('open', resolve));
    const ws = ScriptedSocket.last;
    ws.push(event('loyalty_updated', 1));
    ws.push('not json');
    ws.push(event('loyalty_updated', 2));
    await new Promise((resolve) => setTimeout(resolve, 20));
    assert.deepEqual(seen, [2]);
    assert.deepEqual(errors, ['handler', 'bad_frame']);
    await client.close();
  });

  test('the highest ack made while disconnected is sent when the next connection opens', async (t) => {
    const client = new OrderpushClient({ ...options, snapshot: false, backoff: { initialDelayMs: 1, maxDelayMs: 1 } });
    t.after(() => client.close());
    client.start();
    await new Promise((resolve) => client.on('open', resolve));
    const first = ScriptedSocket.last;
    first.push(event('new_order', 1));
    first.push(event('new_order', 2));
    first.close(1006, '');
    await new Promise((resolve) => client.on('reconnecting', resolve));
    client.ack(1);
    client.ack(2);
    client.ack(1);
    assert.deepEqual(first.sent, []);
    await new Promise((resolve) => client.on('open', resolve));
    const second = ScriptedSocket.last;
    assert.notEqual(second, first);
    assert.equal(second.url, 'ws://scripted/ws/pos/kitchen?since=2');
    assert.deepEqual(second.sent, [{ type: 'ack', id: 2 }]);
    await client.close();
  });

  test('listeners falling far behind: the client disconnects, and resumes from the last frame received once they caught up', async (t) => {
    const client = new OrderpushClient({ ...options, snapshot: false });
    t.after(() => client.close());
    const errors = [];
    client.on('error', (e) => void errors.push(e.kind));
    let release;
    const gate = new Promise((resolve) => (release = resolve));
    const handled = [];
    client.on('loyalty_updated', async (e) => {
      if (e.id === 1) await gate; // a jammed printer
      handled.push(e.id);
    });
    client.start();
    await new Promise((resolve) => client.on('open', resolve));
    const first = ScriptedSocket.last;
    const total = 1002; // one in the listener, 1,001 waiting: one more than MAX_QUEUED_FRAMES
    for (let id = 1; id <= total; id++) first.push(event('loyalty_updated', id));
    first.push(event('loyalty_updated', total + 1)); // after the disconnect: ignored, not queued
    assert.deepEqual(errors, ['too_slow']);
    assert.equal(first.readyState, 3, 'the socket was closed');
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.equal(ScriptedSocket.last, first, 'no reconnect while the listeners are behind');
    assert.equal(client.position, null);
    release();
    await new Promise((resolve) => client.on('open', resolve));
    assert.equal(ScriptedSocket.last.url, `ws://scripted/ws/pos/kitchen?since=${total}`);
    assert.deepEqual(handled, Array.from({ length: total }, (_, i) => i + 1), 'every frame received, once');
    assert.equal(client.position, total);
  });
});
