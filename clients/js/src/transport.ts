// One WebSocket attempt, the same shape in Node (`ws`, key in `X-API-Key`) and in browsers
// (the global `WebSocket`, key as a subprotocol; docs/browser-auth.md).

import { parseRetryAfter } from './backoff.js';

/** The subprotocol a browser offers with its key (docs/browser-auth.md). */
export const SUBPROTOCOL = 'orderpush.v1';
/** Prefix of the subprotocol entry that carries the key. */
export const KEY_SUBPROTOCOL_PREFIX = 'orderpush.key.';
/**
 * Largest frame accepted. The server never sends more than 1 MiB (docs/protocol.md); twice
 * that leaves room for a future envelope field without letting a broken peer exhaust memory.
 */
export const MAX_FRAME_BYTES = 2 * 1024 * 1024;
/** How long the opening handshake may take before the attempt counts as failed. */
export const HANDSHAKE_TIMEOUT_MS = 10_000;
/** How much of a refusal's body is read for its error message (the server's are tiny). */
export const MAX_REFUSAL_BODY_BYTES = 4096;
/** How long reading a refusal's body may take before it is given up on. */
export const REFUSAL_BODY_TIMEOUT_MS = 2_000;

/** How one attempt ended; reported exactly once. */
export type ConnectionEnd =
  /** The server answered the upgrade with an HTTP status (Node only: browsers cannot see it). */
  | { kind: 'refused'; status: number; retryAfterMs: number | null; message: string }
  /** It never opened: refused TCP, DNS, TLS, timeout, or (in a browser) any refusal. */
  | { kind: 'failed'; message: string }
  /** It was open and closed (1006 when no close frame came). */
  | { kind: 'closed'; code: number; reason: string };

/** What a connection tells its owner. */
export interface ConnectionHandlers {
  open(): void;
  message(text: string): void;
  /** A binary frame arrived (orderpush never sends one). */
  binary(): void;
  /** A ping arrived: the peer is alive. */
  ping(): void;
  end(end: ConnectionEnd): void;
}

/** One WebSocket attempt. */
export interface Connection {
  /** Sends a text frame if the socket is open; false otherwise. */
  send(text: string): boolean;
  /** Starts a clean close. */
  close(code: number, reason: string): void;
  /** Drops the connection at once. */
  terminate(): void;
}

/** Opens connections. */
export interface Transport {
  connect(url: string, key: string, handlers: ConnectionHandlers): Connection;
  /** Whether pings are visible (the silence watchdog relies on them). */
  readonly seesPings: boolean;
  /** Whether the HTTP status of a refused upgrade is visible. */
  readonly seesHttpStatus: boolean;
}

/** The part of the standard (browser) `WebSocket` this package uses. */
export interface BrowserWebSocket {
  readonly readyState: number;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

/** A standard `WebSocket` constructor (`globalThis.WebSocket` in browsers, Deno, Node 22+). */
export type BrowserWebSocketConstructor = new (url: string, protocols: string[]) => BrowserWebSocket;

/** The standard WebSocket's `OPEN` ready state. */
const OPEN = 1;

/** Whether this runs in Node.js (then the `ws` package is used). */
export function isNode(): boolean {
  const p = (globalThis as { process?: { versions?: { node?: string } } }).process;
  return typeof p?.versions?.node === 'string';
}

/** The transport over a standard `WebSocket`, authenticating with the subprotocol. */
export function browserTransport(Ctor: BrowserWebSocketConstructor): Transport {
  return {
    seesPings: false,
    seesHttpStatus: false,
    connect(url, key, h) {
      let opened = false;
      let ended = false;
      const ws = new Ctor(url, [SUBPROTOCOL, KEY_SUBPROTOCOL_PREFIX + key]);
      ws.onopen = () => {
        opened = true;
        h.open();
      };
      ws.onmessage = (ev) => (typeof ev.data === 'string' ? h.message(ev.data) : h.binary());
      ws.onerror = () => {};
      ws.onclose = (ev) => {
        if (ended) return;
        ended = true;
        h.end(
          opened
            ? { kind: 'closed', code: ev.code, reason: ev.reason }
            : {
                kind: 'failed',
                message:
                  'the connection failed before it opened (a browser cannot tell why: a refused key, the wrong tenant, a full server or a network failure)',
              },
        );
      };
      return {
        send(text) {
          if (ws.readyState !== OPEN) return false;
          ws.send(text);
          return true;
        },
        close(code, reason) {
          ws.close(code, reason);
        },
        terminate() {
          ws.close();
        },
      };
    },
  };
}

type WsConstructor = typeof import('ws').WebSocket;
type NodeWebSocket = import('ws').WebSocket;
type IncomingMessage = import('http').IncomingMessage;

let nodeTransportPromise: Promise<Transport> | null = null;

/** The Node transport over the `ws` package, loaded on first use (browsers never load it). */
export function nodeTransport(): Promise<Transport> {
  // The ESM build gets ws's ES module wrapper, the CommonJS build the module itself (wrapped
  // with a `default`): the constructor is `default` in both.
  nodeTransportPromise ??= import('ws').then((m) =>
    makeNodeTransport(((m as { default?: unknown }).default ?? m) as WsConstructor),
  );
  return nodeTransportPromise;
}

function makeNodeTransport(WebSocket: WsConstructor): Transport {
  return {
    seesPings: true,
    seesHttpStatus: true,
    connect(url, key, h) {
      let opened = false;
      let ended = false;
      let refusal: ConnectionEnd | null = null;
      let lastError: string | null = null;
      const end = (e: ConnectionEnd) => {
        if (ended) return;
        ended = true;
        h.end(e);
      };
      const ws: NodeWebSocket = new WebSocket(url, {
        headers: { 'X-API-Key': key },
        handshakeTimeout: HANDSHAKE_TIMEOUT_MS,
        maxPayload: MAX_FRAME_BYTES,
        perMessageDeflate: false,
      });
      ws.on('open', () => {
        opened = true;
        h.open();
      });
      ws.on('message', (data, isBinary) => (isBinary ? h.binary() : h.message(data.toString())));
      ws.on('ping', () => h.ping());
      ws.on('unexpected-response', (_req, res: IncomingMessage) => {
        const status = res.statusCode ?? 0;
        const header = res.headers['retry-after'];
        const retryAfterMs = parseRetryAfter(Array.isArray(header) ? header[0] : header);
        void readRefusal(res).then((message) => {
          refusal = { kind: 'refused', status, retryAfterMs, message: message ?? `HTTP ${status}` };
          ws.terminate(); // aborts the request; 'close' follows
        });
      });
      ws.on('error', (err: Error) => {
        lastError = err.message;
      });
      ws.on('close', (code: number, reason: Buffer) => {
        if (refusal !== null) end(refusal);
        else if (!opened) end({ kind: 'failed', message: lastError ?? 'the connection failed' });
        else end({ kind: 'closed', code, reason: reason.toString() });
      });
      return {
        send(text) {
          if (ws.readyState !== WebSocket.OPEN) return false;
          ws.send(text);
          return true;
        },
        close(code, reason) {
          if (ws.readyState === WebSocket.CONNECTING) ws.terminate();
          else ws.close(code, reason);
        },
        terminate() {
          ws.terminate();
        },
      };
    },
  };
}

/** The `error` of a refusal's JSON body (`{"success": false, "error": "..."}`), if readable. */
function readRefusal(res: IncomingMessage): Promise<string | null> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    let size = 0;
    let finished = false;
    const done = () => {
      if (finished) return;
      finished = true;
      clearTimeout(timer);
      res.removeAllListeners('data');
      const text = Buffer.concat(chunks).toString('utf8');
      try {
        const body = JSON.parse(text) as { error?: unknown };
        resolve(typeof body.error === 'string' ? body.error : null);
      } catch {
        resolve(null);
      }
    };
    const timer = setTimeout(done, REFUSAL_BODY_TIMEOUT_MS);
    res.on('data', (chunk: Buffer) => {
      size += chunk.length;
      if (size > MAX_REFUSAL_BODY_BYTES) return done();
      chunks.push(chunk);
    });
    res.on('end', done);
    res.on('error', done);
  });
}
