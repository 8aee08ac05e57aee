// Test harness: the real `orderpush serve` on a free port, events written through
// POST /broadcast and psql, tenants and keys of their own, and waiting without timed asserts.
// tests/js_client.rs passes ORDERPUSH_BIN, DATABASE_URL, ORDERPUSH_TENANT and ORDERPUSH_KEY.

import { execFile, spawn } from 'node:child_process';
import { createServer } from 'node:net';
import { promisify } from 'node:util';

const run = promisify(execFile);

/** How long a test waits for something that should happen promptly (a shared 2-core machine). */
export const WAIT_MS = 20_000;

export const env = {
  bin: process.env.ORDERPUSH_BIN,
  databaseUrl: process.env.DATABASE_URL,
  tenant: process.env.ORDERPUSH_TENANT,
  key: process.env.ORDERPUSH_KEY,
};

/** Why the server tests cannot run (null when they can): skip them, e.g. in `npm test` by hand. */
export const serverMissing =
  env.bin && env.databaseUrl && env.tenant && env.key
    ? null
    : 'needs ORDERPUSH_BIN, DATABASE_URL, ORDERPUSH_TENANT and ORDERPUSH_KEY (cargo test --test main js_client sets them)';

/** A port nothing listens on right now. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Polls `check` until it returns a value other than undefined/false, or fails after `ms`. */
export async function waitFor(what, check, ms = WAIT_MS) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value !== undefined && value !== false && value !== null) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(25);
  }
}

/** Servers still running: killed when this process ends, however it ends, so none outlives it. */
const running = new Set();
const killAll = () => running.forEach((child) => child.kill('SIGKILL'));
process.on('exit', killAll);
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.once(signal, () => {
    killAll();
    process.exit(1);
  });
}

/** Most stderr kept per server for a failure message. */
const LOG_TAIL_BYTES = 64 * 1024;

/** `orderpush serve` as a child process. */
export class Server {
  constructor(port, args) {
    this.port = port;
    this.args = args;
    this.url = `ws://127.0.0.1:${port}`;
    this.log = '';
    this.child = null;
  }

  /** Starts a server on `port` (a free one by default) and waits until /readyz says 200. */
  static async start({ port, args = [] } = {}) {
    const server = new Server(port ?? (await freePort()), args);
    await server.#spawn();
    return server;
  }

  http(path) {
    return `http://127.0.0.1:${this.port}${path}`;
  }

  async #spawn() {
    const child = spawn(env.bin, ['serve', '--listen', `127.0.0.1:${this.port}`, ...this.args], {
      env: { ...process.env, DATABASE_URL: env.databaseUrl, RUST_LOG: process.env.RUST_LOG ?? 'warn' },
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    this.child = child;
    running.add(child);
    child.once('exit', () => running.delete(child));
    child.stderr.on('data', (d) => {
      this.log = (this.log + d).slice(-LOG_TAIL_BYTES);
    });
    let exited = null;
    child.once('exit', (code, signal) => (exited = { code, signal }));
    await waitFor(`orderpush serve on port ${this.port} to be ready`, async () => {
      if (exited) throw new Error(`orderpush serve exited (${JSON.stringify(exited)}):\n${this.log}`);
      try {
        return (await fetch(this.http('/readyz'))).status === 200;
      } catch {
        return false;
      }
    });
  }

  /** Starts it again on the same port. */
  async restart() {
    await this.#spawn();
  }

  /** Kills it with `signal` and waits for the exit. */
  async kill(signal = 'SIGTERM') {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((resolve) => child.once('exit', resolve));
    child.kill(signal);
    await exited;
  }

  /** A graceful stop (close frames 1001). */
  stop() {
    return this.kill('SIGTERM');
  }

  /** POST /broadcast (loopback needs no token): the reply's JSON, with its status. */
  async broadcast(tenant, type, data, { idempotencyKey } = {}) {
    const headers = { 'Content-Type': 'application/json' };
    if (idempotencyKey) headers['Idempotency-Key'] = idempotencyKey;
    const r = await fetch(this.http('/broadcast'), {
      method: 'POST',
      headers,
      body: JSON.stringify({ tenant, event: { type, data } }),
    });
    const body = await r.json();
    if (r.status !== 200) throw new Error(`broadcast refused: ${r.status} ${JSON.stringify(body)}`);
    return body;
  }

  /** The value of a Prometheus series (0 when absent). */
  async metric(series) {
    const text = await (await fetch(this.http('/metrics'))).text();
    const line = text.split('\n').find((l) => l.startsWith(series + ' '));
    return line ? Number(line.slice(series.length + 1)) : 0;
  }

  /** GET /admin/tenants/{tenant} (loopback needs no token). */
  async adminTenant(tenant) {
    return (await fetch(this.http(`/admin/tenants/${tenant}`))).json();
  }
}

/** Runs SQL with psql against the test database. */
export async function psql(sql) {
  const { stdout } = await run('psql', [env.databaseUrl, '-X', '-q', '-t', '-A', '-v', 'ON_ERROR_STOP=1', '-c', sql]);
  return stdout.trim();
}

let tenants = 0;

/** A tenant of the test's own (its ids start at 1), and a key for it: `{ tenant, key, keyId }`. */
export async function newTenant(label = 't') {
  const tenant = `${label}-${process.pid}-${++tenants}`;
  await psql(`INSERT INTO tenants (slug, name) VALUES ('${tenant}', '${tenant}')`);
  return { tenant, ...(await createKey(tenant)) };
}

/** A new key for a tenant: `{ key, keyId }` (the id is printed on stderr). */
export async function createKey(tenant) {
  const { stdout, stderr } = await run(env.bin, ['keys', 'create', '--tenant', tenant, '--label', 'js test'], {
    env: { ...process.env, DATABASE_URL: env.databaseUrl },
  });
  const keyId = stderr.match(/created key (\S+)/)?.[1] ?? null;
  return { key: stdout.trim(), keyId };
}

/** An online order with one item, in one transaction (one `new_order`). */
export function insertOrder(tenant, number, status = 'confirmed') {
  return psql(`WITH o AS (
      INSERT INTO orders (tenant_slug, order_number, customer_name, order_type, order_source, status, total_amount)
      VALUES ('${tenant}', '${number}', 'Test', 'delivery', 'online', '${status}', 10.00) RETURNING id)
    INSERT INTO order_items (order_id, menu_item_id, name, quantity, price, selected_addons)
    SELECT id, 'item-1', 'Pizza Margherita', 2, 12.50, '[{"name": "Extra Cheese", "price": 1.50}]' FROM o`);
}

/** Changes an order's status (one `order_updated`). */
export function setStatus(tenant, number, status) {
  return psql(`UPDATE orders SET status = '${status}' WHERE tenant_slug = '${tenant}' AND order_number = '${number}'`);
}

/** A loyalty transaction (one `loyalty_updated`). */
export function insertLoyalty(tenant, points) {
  return psql(`INSERT INTO loyalty_transactions (tenant_slug, customer_id, points_change, new_balance, transaction_type)
    VALUES ('${tenant}', 'cust-1', ${points}, ${points}, 'earned')`);
}

/** A gift card (one `gift_card_purchased`). */
export function insertGiftCard(tenant, number) {
  return psql(`INSERT INTO gift_cards (tenant_slug, card_number, initial_balance, current_balance, purchased_by)
    VALUES ('${tenant}', '${number}', 50.00, 50.00, 'Jane Smith')`);
}

/** The tenant's latest event id (0 when none). */
export async function headId(tenant) {
  return Number(await psql(`SELECT coalesce(max(id), 0) FROM orderpush.events WHERE tenant_slug = '${tenant}'`));
}

/**
 * Records everything a client reports: frames in order, lifecycle events, errors. `stop()`
 * closes the client.
 */
export class Recorder {
  constructor(client) {
    this.client = client;
    this.frames = [];
    this.opens = [];
    this.closes = [];
    this.reconnects = [];
    this.errors = [];
    this.stopped = null;
    client.on('frame', (f) => void this.frames.push(f));
    client.on('open', (i) => void this.opens.push({ ...i, at: Date.now() }));
    client.on('close', (i) => void this.closes.push(i));
    client.on('reconnecting', (i) => void this.reconnects.push({ ...i, at: Date.now() }));
    client.on('error', (e) => void this.errors.push({ kind: e.kind, status: e.status, retryAfterMs: e.retryAfterMs, message: e.message, at: Date.now() }));
    client.on('stopped', (s) => void (this.stopped = s));
  }

  /** Frames other than control frames. */
  events() {
    return this.frames.filter((f) => f.type !== 'ready' && f.type !== 'snapshot_end');
  }

  /**
   * Waits until `n` frames of `type` arrived or, without a type, `n` events (control frames
   * left out: a server that sends `ready` must not satisfy a wait for an event); returns them.
   */
  async nFrames(n, type) {
    const pick = () => (type === undefined ? this.events() : this.frames.filter((f) => f.type === type));
    return waitFor(`${n} ${type ?? 'events'} (have ${JSON.stringify(this.frames.map((f) => [f.type, f.id]))})`, () => {
      const got = pick();
      return got.length >= n ? got : undefined;
    });
  }

  async opened(n = 1) {
    return waitFor(`${n} connections to open`, () => (this.opens.length >= n ? this.opens[n - 1] : undefined));
  }

  async whenStopped() {
    return waitFor('the client to stop', () => this.stopped ?? undefined);
  }
}

/** Prints a server's log tail when a test fails, so the failure can be read. */
export function withLog(server, fn) {
  return async (...args) => {
    try {
      return await fn(...args);
    } catch (e) {
      e.message += `\n--- orderpush serve log (tail) ---\n${server?.log ?? ''}`;
      throw e;
    }
  };
}
