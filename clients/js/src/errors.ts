// What the client reports: recoverable problems (`error` events) and why it stopped for good.

import type { ServerFrame } from './frames.js';

/** The kinds of recoverable problem; the client carries on (reconnecting if need be). */
export type ErrorKind =
  /** The server refused the upgrade with a status worth retrying (429, 503, other 5xx). */
  | 'refused'
  /** A connection attempt failed before opening (network, DNS, server down; any refusal in a browser). */
  | 'connect_failed'
  /** Nothing was heard (no frame, no ping) for `silenceTimeoutMs`: the socket was dropped. */
  | 'silent'
  /** The server sent something that is not an orderpush frame; it was skipped. */
  | 'bad_frame'
  /** A listener threw or its promise rejected; the next frame is delivered anyway. */
  | 'handler'
  /** Frames arrive faster than the listeners handle them: the client disconnected and resumes later. */
  | 'too_slow';

/** A recoverable problem, reported with the `error` event. */
export class OrderpushError extends Error {
  /** What went wrong. */
  readonly kind: ErrorKind;
  /** The HTTP status, for `refused`. */
  readonly status: number | undefined;
  /** The server's `Retry-After` in milliseconds, for `refused` (null when it sent none). */
  readonly retryAfterMs: number | null | undefined;
  /** The frame being handled, for `handler`. */
  readonly frame: ServerFrame | undefined;

  constructor(
    kind: ErrorKind,
    message: string,
    details: { status?: number; retryAfterMs?: number | null; frame?: ServerFrame; cause?: unknown } = {},
  ) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.name = 'OrderpushError';
    this.kind = kind;
    this.status = details.status;
    this.retryAfterMs = details.retryAfterMs;
    this.frame = details.frame;
  }
}

/** Why the client stopped. Every reason except `closed` needs a human: retrying cannot help. */
export type StopReason =
  /** `close()` was called. */
  | 'closed'
  /** HTTP 401: no key, or an unknown or revoked key. */
  | 'unauthorized'
  /** HTTP 403: the key belongs to another tenant. */
  | 'forbidden'
  /** HTTP 400: the request was malformed (a bug or a proxy rewriting it). */
  | 'bad_request'
  /** Another 4xx status (e.g. 404 from a proxy: a wrong URL). */
  | 'refused'
  /** Close code 1008: the key was revoked or moved while connected. */
  | 'revoked'
  /** No WebSocket implementation could be used here. */
  | 'unsupported';

/** Reported once, with the `stopped` event, when the client stops for good. */
export interface StopInfo {
  reason: StopReason;
  /** A sentence for a log or an alert. */
  message: string;
  /** The HTTP status that stopped it, if any. */
  status?: number;
  /** The close code that stopped it, if any. */
  code?: number;
  /** True unless the application closed it: alert a human (wrong or revoked key, wrong URL). */
  needsHuman: boolean;
}

/** The stop reason for a refused upgrade's status, or null when it is worth retrying. */
export function fatalStatus(status: number): Exclude<StopReason, 'closed' | 'revoked' | 'unsupported'> | null {
  switch (status) {
    case 401:
      return 'unauthorized';
    case 403:
      return 'forbidden';
    case 400:
      return 'bad_request';
    case 408: // request timeout
    case 429: // too many requests: retry after Retry-After
      return null;
    default:
      return status >= 400 && status < 500 ? 'refused' : null;
  }
}
