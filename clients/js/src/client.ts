// The reconnecting POS client: connects, resumes with `since`, delivers typed frames in order.

import { Backoff, retryDelay, type BackoffOptions } from './backoff.js';
import { OrderpushError, fatalStatus, type StopInfo } from './errors.js';
import {
  KNOWN_TYPES,
  parseFrame,
  type BroadcastEvent,
  type GiftCardPurchasedEvent,
  type LoyaltyUpdatedEvent,
  type NewOrderEvent,
  type OrderSnapshotEvent,
  type OrderUpdatedEvent,
  type ReadyFrame,
  type ResyncRequiredEvent,
  type ServerFrame,
  type SnapshotEndFrame,
} from './frames.js';
import { Position } from './position.js';
import {
  browserTransport,
  isNode,
  nodeTransport,
  type BrowserWebSocketConstructor,
  type Connection,
  type ConnectionEnd,
  type Transport,
} from './transport.js';
import { buildUrl, validateBaseUrl, validateSince, validateTenant, validateTypes } from './url.js';

/**
 * Nothing heard (no frame, no ping) for this long means the connection is dead even if TCP has
 * not noticed (docs/protocol.md: the server pings every 20 s and gives up after 60 s).
 */
export const SILENCE_TIMEOUT_MS = 75_000;
/** A connection that stays open this long resets the backoff, even on a quiet tenant. */
export const STABLE_AFTER_MS = 10_000;
/** `close()` waits this long for the close handshake before dropping the socket. */
export const CLOSE_TIMEOUT_MS = 2_000;
/**
 * Frames received but not yet handled, at most. Past it (a printer jam holding up an async
 * listener) the client disconnects and resumes with `since` once the listeners caught up, so
 * memory stays bounded and nothing is lost: 1,000 frames is minutes of a busy tenant.
 */
export const MAX_QUEUED_FRAMES = 1_000;
/** The same bound in bytes (frames are at most 1 MiB each). */
export const MAX_QUEUED_BYTES = 16 * 1024 * 1024;
/** Queue length under which a client that disconnected for being behind reconnects. */
export const RESUME_QUEUED_FRAMES = 100;
/** Keys are `pos_` and hex today; any key must be a valid subprotocol token for browsers. */
const KEY_SHAPE = /^[A-Za-z0-9_.-]{1,256}$/;

/** Options of [`OrderpushClient`]. */
export interface OrderpushClientOptions {
  /** The service: `ws://host:9011`, `wss://pos.example.com` (a path prefix is kept). */
  url: string;
  /** The tenant's slug (`kitchen`). */
  tenant: string;
  /** The terminal's API key (`pos_...`). */
  key: string;
  /**
   * The id of the last frame this terminal processed (from its storage), to resume after it;
   * leave it out on a first start.
   */
  since?: number | null;
  /**
   * `'open'` (the default): when the server cannot resume (or there is no `since`), it sends
   * the open orders as `order_snapshot` frames, then `snapshot_end`; after a
   * `resync_required` the client reconnects for such a snapshot. `false`: a plain resync.
   */
  snapshot?: 'open' | false;
  /** Only these event types are sent (control frames and resyncs always are). Default: all. */
  types?: readonly string[];
  /** Reconnect delays (default 250 ms doubling to 10 s, with jitter). */
  backoff?: BackoffOptions;
  /**
   * Drop and reconnect a connection silent for this long, in ms; `false` turns it off. Default
   * 75,000 in Node; off in browsers, which cannot see the server's pings.
   */
  silenceTimeoutMs?: number | false;
  /**
   * A standard `WebSocket` constructor to use instead of the default (`ws` in Node, the global
   * one elsewhere). It authenticates with the subprotocol, as browsers do.
   */
  WebSocket?: BrowserWebSocketConstructor;
}

/** Where the client is. */
export type ClientState = 'idle' | 'connecting' | 'open' | 'waiting' | 'stopped';

/** With the `open` event. */
export interface OpenInfo {
  /** The URL connected to (it never contains the key). */
  url: string;
  /** The `since` sent, or null. */
  since: number | null;
  /** Whether `snapshot=open` was asked for. */
  snapshot: boolean;
}

/** With the `close` event: an open connection ended. */
export interface CloseInfo {
  /** The close code (1006: no close frame, e.g. the network or the server died). */
  code: number;
  reason: string;
}

/** With the `reconnecting` event. */
export interface ReconnectInfo {
  /** The wait before the next attempt. */
  delayMs: number;
  /** Attempts since the last healthy connection. */
  attempt: number;
  /** The `since` the next attempt will send (null: none, e.g. for a snapshot). */
  since: number | null;
}

/** The events of [`OrderpushClient`] and what their listeners receive. */
export interface ClientEventMap {
  new_order: NewOrderEvent;
  order_updated: OrderUpdatedEvent;
  gift_card_purchased: GiftCardPurchasedEvent;
  loyalty_updated: LoyaltyUpdatedEvent;
  order_snapshot: OrderSnapshotEvent;
  resync_required: ResyncRequiredEvent;
  ready: ReadyFrame;
  snapshot_end: SnapshotEndFrame;
  /** A frame of a type this package does not know: the web app's own `POST /broadcast` types. */
  broadcast: BroadcastEvent;
  /** Every frame, after its own type's listeners. */
  frame: ServerFrame;
  open: OpenInfo;
  close: CloseInfo;
  reconnecting: ReconnectInfo;
  error: OrderpushError;
  stopped: StopInfo;
  /**
   * The position moved: every frame up to it has been handled by the listeners (their promises
   * settled). Store it and give it back as `since` to resume after a restart of the POS.
   */
  position: number;
}

/** The names of the events that carry frames (their listeners are run in order, one at a time). */
export type FrameEventName =
  | 'new_order'
  | 'order_updated'
  | 'gift_card_purchased'
  | 'loyalty_updated'
  | 'order_snapshot'
  | 'resync_required'
  | 'ready'
  | 'snapshot_end'
  | 'broadcast'
  | 'frame';

/** A listener; a frame listener may return a promise, and the next frame waits for it. */
export type Listener<T> = (payload: T) => void | Promise<void>;

type AnyListener = (payload: unknown) => unknown;

/**
 * A reconnecting client for one terminal of one tenant.
 *
 * ```ts
 * const client = new OrderpushClient({ url: 'ws://127.0.0.1:9011', tenant: 'kitchen', key });
 * client.on('new_order', async (order) => { await print(order.data); client.ack(order.id); });
 * client.start();
 * ```
 */
export class OrderpushClient {
  /** The normalised service URL. */
  readonly url: string;
  /** The tenant. */
  readonly tenant: string;
  readonly #key: string;
  readonly #snapshot: boolean;
  readonly #types: string[] | null;
  readonly #silenceOption: number | false | undefined;
  readonly #webSocket: BrowserWebSocketConstructor | undefined;
  /** What was received: the `since` of the next connection. */
  readonly #position: Position;
  /** What the listeners have handled: what the application should store. */
  #handled: number | null;
  readonly #backoff: Backoff;
  readonly #listeners = new Map<keyof ClientEventMap, Set<AnyListener>>();

  #state: ClientState = 'idle';
  #silenceMs: number | null = null;
  /** Identifies the current connection: callbacks of an older one are ignored. */
  #token: object | null = null;
  #conn: Connection | null = null;
  #connEnded: Promise<void> | null = null;
  #open = false;
  #retryTimer: ReturnType<typeof setTimeout> | null = null;
  #silenceTimer: ReturnType<typeof setTimeout> | null = null;
  #stableTimer: ReturnType<typeof setTimeout> | null = null;
  /** The highest id acked while no socket was open: sent on the next connection. */
  #pendingAck: number | null = null;
  /** The highest id acked on the current connection. */
  #ackedOnConnection: number | null = null;
  /** After a resync in snapshot mode: connect without `since` until the snapshot arrived. */
  #needSnapshot = false;
  #queue: { frame: ServerFrame; bytes: number; positionAfter: number | null }[] = [];
  #queuedBytes = 0;
  #draining = false;
  /** Disconnected because the listeners fell behind; reconnects once they caught up. */
  #throttled = false;
  #stopInfo: StopInfo | null = null;
  #stoppedEmitted = false;
  #resolveStopped!: (info: StopInfo) => void;
  readonly #stopped: Promise<StopInfo>;

  /** Checks the options (a `TypeError` or `RangeError` for a bad one); `start()` connects. */
  constructor(options: OrderpushClientOptions) {
    if (typeof options !== 'object' || options === null) throw new TypeError('options are required');
    this.url = validateBaseUrl(options.url);
    this.tenant = validateTenant(options.tenant);
    if (typeof options.key !== 'string' || !KEY_SHAPE.test(options.key)) {
      throw new TypeError('invalid key: expected the terminal API key, pos_ followed by 64 hex digits');
    }
    this.#key = options.key;
    this.#position = new Position(validateSince(options.since));
    this.#handled = this.#position.id;
    const snapshot = options.snapshot ?? 'open';
    if (snapshot !== 'open' && snapshot !== false) {
      throw new TypeError(`invalid snapshot ${JSON.stringify(snapshot)}: 'open' or false`);
    }
    this.#snapshot = snapshot === 'open';
    this.#types = options.types === undefined ? null : validateTypes(options.types);
    this.#backoff = new Backoff(options.backoff);
    const silence = options.silenceTimeoutMs;
    if (silence !== undefined && silence !== false && !(Number.isFinite(silence) && silence > 0)) {
      throw new RangeError('silenceTimeoutMs must be a positive number of milliseconds or false');
    }
    this.#silenceOption = silence;
    this.#webSocket = options.WebSocket;
    this.#stopped = new Promise((resolve) => (this.#resolveStopped = resolve));
  }

  /** Where the client is: `idle` until `start()`, `stopped` for good after `close()` or a refusal. */
  get state(): ClientState {
    return this.#state;
  }

  /**
   * The position of the last frame the listeners have handled (null: none yet, and no
   * `since`): the id of the last event, `ready`, `snapshot_end` or `resync_required` (not of
   * `order_snapshot` frames, whose position comes with their `snapshot_end`). Store it (the
   * `position` event says when it moves) and pass it as `since` after a restart of the POS.
   * While frames wait for a busy listener, the client itself resumes from the last one
   * received, so they are not fetched twice.
   */
  get position(): number | null {
    return this.#handled;
  }

  /** Adds a listener; returns a function that removes it. */
  on<K extends keyof ClientEventMap>(name: K, listener: Listener<ClientEventMap[K]>): () => void {
    let set = this.#listeners.get(name);
    if (set === undefined) this.#listeners.set(name, (set = new Set()));
    set.add(listener as AnyListener);
    return () => this.off(name, listener);
  }

  /** Removes a listener. */
  off<K extends keyof ClientEventMap>(name: K, listener: Listener<ClientEventMap[K]>): void {
    this.#listeners.get(name)?.delete(listener as AnyListener);
  }

  /** Resolves when the client has stopped for good, with why. */
  whenStopped(): Promise<StopInfo> {
    return this.#stopped;
  }

  /** Connects (once; add listeners first or in the same tick). */
  start(): this {
    if (this.#state !== 'idle') throw new Error(`start() on a client that is ${this.#state}`);
    this.#state = 'connecting';
    void this.#connect();
    return this;
  }

  /**
   * Acknowledges every frame up to `id` for this terminal (operators see it on `/status`).
   * Sent at once when connected; otherwise the highest pending ack is sent after reconnecting.
   * Acks are optional and never change what is delivered.
   */
  ack(id: number): void {
    if (typeof id !== 'number' || !Number.isSafeInteger(id) || id < 0) {
      throw new TypeError(`invalid ack id ${JSON.stringify(id)}: a non-negative integer`);
    }
    if (this.#state === 'stopped') return;
    if (this.#ackedOnConnection !== null && id <= this.#ackedOnConnection) return;
    if (this.#open && this.#conn?.send(JSON.stringify({ type: 'ack', id }))) {
      this.#ackedOnConnection = id;
      if (this.#pendingAck !== null && this.#pendingAck <= id) this.#pendingAck = null;
      return;
    }
    this.#pendingAck = this.#pendingAck === null ? id : Math.max(this.#pendingAck, id);
  }

  /**
   * Stops for good: closes the socket cleanly (dropping it after 2 s), discards frames not yet
   * handed to a listener, and resolves once the listener running now (if any) has returned.
   */
  async close(): Promise<void> {
    if (this.#state !== 'stopped') {
      this.#queue = [];
      this.#queuedBytes = 0;
      const conn = this.#conn;
      const ended = this.#connEnded;
      this.#stop({ reason: 'closed', message: 'closed by the application', needsHuman: false });
      if (conn !== null && ended !== null) {
        let timer: ReturnType<typeof setTimeout> | undefined;
        const timedOut = new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(true), CLOSE_TIMEOUT_MS)));
        if (await Promise.race([ended.then(() => false), timedOut])) conn.terminate();
        clearTimeout(timer);
      }
    }
    await this.#stopped;
  }

  async #transport(): Promise<Transport> {
    if (this.#webSocket !== undefined) return browserTransport(this.#webSocket);
    if (isNode()) return nodeTransport();
    const Global = (globalThis as { WebSocket?: BrowserWebSocketConstructor }).WebSocket;
    if (typeof Global === 'function') return browserTransport(Global);
    throw new Error('no WebSocket implementation found: pass the WebSocket option');
  }

  async #connect(): Promise<void> {
    let transport: Transport;
    try {
      transport = await this.#transport();
    } catch (e) {
      this.#stop({ reason: 'unsupported', message: errorMessage(e), needsHuman: true });
      return;
    }
    if (this.#state === 'stopped') return;
    if (this.#silenceMs === null) {
      const option = this.#silenceOption ?? (transport.seesPings ? SILENCE_TIMEOUT_MS : false);
      this.#silenceMs = option === false ? 0 : option;
    }
    this.#state = 'connecting';
    const since = this.#needSnapshot ? null : this.#position.id;
    const url = buildUrl(this.url, this.tenant, { since, snapshot: this.#snapshot, types: this.#types });
    const info: OpenInfo = { url, since, snapshot: this.#snapshot };
    const token = {};
    let ended!: () => void;
    this.#token = token;
    this.#connEnded = new Promise((resolve) => (ended = resolve));
    try {
      this.#conn = transport.connect(url, this.#key, {
        open: () => this.#token === token && this.#onOpen(info),
        message: (text) => this.#token === token && this.#onMessage(text),
        binary: () => this.#token === token && this.#error(new OrderpushError('bad_frame', 'a binary frame was skipped')),
        ping: () => this.#token === token && this.#alive(),
        end: (end) => {
          ended();
          if (this.#token === token) this.#onEnd(end);
        },
      });
    } catch (e) {
      // The WebSocket constructor itself refused (an environment that rejects the URL or the
      // subprotocol): retrying cannot help.
      this.#token = null;
      this.#stop({ reason: 'unsupported', message: `cannot open a WebSocket: ${errorMessage(e)}`, needsHuman: true });
    }
  }

  #onOpen(info: OpenInfo): void {
    this.#state = 'open';
    this.#open = true;
    this.#ackedOnConnection = null;
    this.#emit('open', info);
    this.#alive();
    this.#stableTimer = setTimeout(() => this.#backoff.reset(), STABLE_AFTER_MS);
    if (this.#pendingAck !== null) {
      const id = this.#pendingAck;
      this.#pendingAck = null;
      this.ack(id);
    }
  }

  /** Re-arms the silence watchdog. */
  #alive(): void {
    if (!this.#silenceMs) return;
    if (this.#silenceTimer !== null) clearTimeout(this.#silenceTimer);
    const ms = this.#silenceMs;
    this.#silenceTimer = setTimeout(() => {
      this.#silenceTimer = null;
      this.#error(new OrderpushError('silent', `nothing heard for ${ms} ms: reconnecting`));
      this.#conn?.terminate();
    }, ms);
  }

  #onMessage(text: string): void {
    this.#alive();
    const parsed = parseFrame(text);
    if (!parsed.ok) {
      this.#error(new OrderpushError('bad_frame', `${parsed.error}; skipped`));
      return;
    }
    const frame = parsed.frame;
    if (!this.#position.observe(frame)) return; // a duplicate: already delivered
    const resync = frame.type === 'resync_required';
    // A connection that delivers is healthy; not a resync, so a server that answered every
    // connection with one would meet a growing backoff rather than a tight loop.
    if (!resync) this.#backoff.reset();
    if (this.#needSnapshot && !resync && frame.type !== 'order_snapshot') this.#needSnapshot = false;
    this.#queue.push({ frame, bytes: text.length, positionAfter: this.#position.id });
    this.#queuedBytes += text.length;
    if (resync && this.#snapshot) {
      // Reconnect without since for a snapshot: the server then sends the open orders as they
      // are now (order_snapshot), which covers the writes this resync says were not sent.
      this.#needSnapshot = true;
      this.#dropConnection('resync: reconnecting for a snapshot');
      this.#scheduleReconnect(null);
    } else if (this.#queue.length > MAX_QUEUED_FRAMES || this.#queuedBytes > MAX_QUEUED_BYTES) {
      this.#throttled = true;
      this.#error(
        new OrderpushError(
          'too_slow',
          `${this.#queue.length} frames wait for the listeners: disconnecting until they catch up, then resuming with since`,
        ),
      );
      this.#dropConnection('client busy: resuming later');
    }
    void this.#drain();
  }

  #onEnd(end: ConnectionEnd): void {
    this.#forgetConnection();
    if (end.kind === 'closed') {
      this.#emit('close', { code: end.code, reason: end.reason });
      if (end.code === 1008) {
        this.#stop({
          reason: 'revoked',
          code: 1008,
          message: `the API key was revoked (close 1008${end.reason ? `: ${end.reason}` : ''}): configure a new key`,
          needsHuman: true,
        });
        return;
      }
      this.#scheduleReconnect(null);
    } else if (end.kind === 'refused') {
      const text = `connection refused with HTTP ${end.status}: ${end.message}`;
      const fatal = fatalStatus(end.status);
      if (fatal !== null) {
        this.#stop({ reason: fatal, status: end.status, message: text, needsHuman: true });
        return;
      }
      const after = end.retryAfterMs === null ? '' : ` (Retry-After: ${end.retryAfterMs / 1000} s)`;
      this.#error(new OrderpushError('refused', text + after, { status: end.status, retryAfterMs: end.retryAfterMs }));
      this.#scheduleReconnect(end.retryAfterMs);
    } else {
      this.#error(new OrderpushError('connect_failed', end.message));
      this.#scheduleReconnect(null);
    }
  }

  #scheduleReconnect(retryAfterMs: number | null): void {
    if (this.#state === 'stopped' || this.#throttled || this.#retryTimer !== null || this.#conn !== null) return;
    const delayMs = retryDelay(this.#backoff.next(), retryAfterMs);
    this.#state = 'waiting';
    this.#emit('reconnecting', {
      delayMs,
      attempt: this.#backoff.attempt,
      since: this.#needSnapshot ? null : this.#position.id,
    });
    this.#retryTimer = setTimeout(() => {
      this.#retryTimer = null;
      void this.#connect();
    }, delayMs);
  }

  /** Closes the current connection cleanly; its later callbacks are ignored. */
  #dropConnection(reason: string): void {
    const conn = this.#conn;
    this.#forgetConnection();
    if (this.#state !== 'stopped') this.#state = 'waiting';
    conn?.close(1000, reason);
  }

  #forgetConnection(): void {
    this.#token = null;
    this.#conn = null;
    this.#open = false;
    this.#ackedOnConnection = null;
    for (const timer of [this.#silenceTimer, this.#stableTimer]) if (timer !== null) clearTimeout(timer);
    this.#silenceTimer = null;
    this.#stableTimer = null;
  }

  /** Hands queued frames to the listeners, one at a time, awaiting any promise they return. */
  async #drain(): Promise<void> {
    if (this.#draining) return;
    this.#draining = true;
    try {
      while (this.#queue.length > 0) {
        const { frame, bytes, positionAfter } = this.#queue.shift()!;
        this.#queuedBytes -= bytes;
        await this.#dispatch(frame);
        if (positionAfter !== this.#handled && positionAfter !== null) {
          this.#handled = positionAfter;
          this.#emit('position', positionAfter);
        }
        if (this.#throttled && this.#queue.length <= RESUME_QUEUED_FRAMES && this.#queuedBytes <= MAX_QUEUED_BYTES / 4) {
          this.#throttled = false;
          this.#scheduleReconnect(null);
        }
      }
    } finally {
      this.#draining = false;
    }
    if (this.#stopInfo !== null) this.#emitStopped();
  }

  async #dispatch(frame: ServerFrame): Promise<void> {
    const name = (KNOWN_TYPES.has(frame.type) ? frame.type : 'broadcast') as FrameEventName;
    const listeners = [...(this.#listeners.get(name) ?? []), ...(this.#listeners.get('frame') ?? [])];
    for (const listener of listeners) {
      try {
        const result = listener(frame);
        if (isThenable(result)) await result;
      } catch (e) {
        this.#error(
          new OrderpushError('handler', `a ${frame.type} listener failed: ${errorMessage(e)}`, { cause: e, frame }),
        );
      }
    }
  }

  #stop(info: StopInfo): void {
    if (this.#state === 'stopped') return;
    if (this.#retryTimer !== null) clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    const conn = this.#conn;
    this.#forgetConnection();
    this.#state = 'stopped';
    this.#stopInfo = info;
    this.#pendingAck = null;
    conn?.close(1000, 'client stopped');
    // Frames already received are delivered first; the drain reports the stop when done.
    if (!this.#draining && this.#queue.length === 0) this.#emitStopped();
  }

  #emitStopped(): void {
    if (this.#stoppedEmitted || this.#stopInfo === null) return;
    this.#stoppedEmitted = true;
    this.#emit('stopped', this.#stopInfo);
    this.#resolveStopped(this.#stopInfo);
  }

  #error(error: OrderpushError): void {
    if ((this.#listeners.get('error')?.size ?? 0) === 0) {
      // Visible by default; an 'error' listener takes over.
      console.warn(`orderpush-client: ${error.message}`);
      return;
    }
    this.#emit('error', error);
  }

  /** Runs the listeners of a lifecycle event; one that throws is reported, never fatal. */
  #emit<K extends Exclude<keyof ClientEventMap, FrameEventName>>(name: K, payload: ClientEventMap[K]): void {
    for (const listener of [...(this.#listeners.get(name) ?? [])]) {
      const report = (e: unknown) => {
        if (name === 'error') console.error('orderpush-client: an error listener failed:', e);
        else this.#error(new OrderpushError('handler', `a ${name} listener failed: ${errorMessage(e)}`, { cause: e }));
      };
      try {
        const result = listener(payload);
        if (isThenable(result)) result.then(undefined, report);
      } catch (e) {
        report(e);
      }
    }
  }
}

function isThenable(value: unknown): value is PromiseLike<unknown> {
  return typeof (value as { then?: unknown } | null)?.then === 'function';
}

function errorMessage(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
