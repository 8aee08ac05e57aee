// Reconnect delays: capped exponential backoff with jitter, and the server's `Retry-After`.

/** First delay: short enough that a server restart costs a till well under a second. */
export const DEFAULT_INITIAL_DELAY_MS = 250;
/** Longest delay between attempts (docs/protocol.md): a till is back within 10 s of the server. */
export const DEFAULT_MAX_DELAY_MS = 10_000;
/**
 * Longest `Retry-After` obeyed: the server asks for seconds; a header asking for more than an
 * hour is taken as an hour, so a broken proxy cannot park a till for days.
 */
export const MAX_RETRY_AFTER_MS = 3_600_000;
/**
 * Random extra wait after a `Retry-After`, so the tills refused together (a connection cap, a
 * restart) do not all come back in the same millisecond.
 */
export const RETRY_AFTER_JITTER_MS = 1_000;

/** Backoff settings. */
export interface BackoffOptions {
  /** First delay in milliseconds (default 250). */
  initialDelayMs?: number;
  /** Cap in milliseconds (default 10,000). */
  maxDelayMs?: number;
}

/**
 * Doubles from `initialDelayMs` up to `maxDelayMs`; each delay is drawn uniformly from its
 * upper half ("equal jitter"): never shorter than half the nominal delay, and spread out so a
 * fleet of tills reconnecting after a restart does not arrive in lockstep.
 */
export class Backoff {
  readonly initialDelayMs: number;
  readonly maxDelayMs: number;
  #attempt = 0;
  #random: () => number;

  constructor(options: BackoffOptions = {}, random: () => number = Math.random) {
    this.initialDelayMs = positive(options.initialDelayMs ?? DEFAULT_INITIAL_DELAY_MS, 'initialDelayMs');
    this.maxDelayMs = positive(options.maxDelayMs ?? DEFAULT_MAX_DELAY_MS, 'maxDelayMs');
    if (this.maxDelayMs < this.initialDelayMs) {
      throw new RangeError('backoff.maxDelayMs must be at least backoff.initialDelayMs');
    }
    this.#random = random;
  }

  /** Failed attempts since the last reset. */
  get attempt(): number {
    return this.#attempt;
  }

  /** The delay before the next attempt, in milliseconds. */
  next(): number {
    // 2^30 already exceeds any sane cap; bounding the exponent keeps the arithmetic finite.
    const nominal = Math.min(this.maxDelayMs, this.initialDelayMs * 2 ** Math.min(this.#attempt, 30));
    this.#attempt += 1;
    return Math.round(nominal / 2 + this.#random() * (nominal / 2));
  }

  /** Back to the first delay (after a connection proved healthy). */
  reset(): void {
    this.#attempt = 0;
  }
}

/**
 * The wait a `Retry-After` header asks for, in milliseconds (delta-seconds or an HTTP date),
 * capped at [`MAX_RETRY_AFTER_MS`]; null when absent or unreadable.
 */
export function parseRetryAfter(value: string | null | undefined, now: number = Date.now()): number | null {
  if (value === null || value === undefined) return null;
  const text = value.trim();
  if (/^\d+$/.test(text)) return Math.min(Number(text) * 1000, MAX_RETRY_AFTER_MS);
  // An HTTP date names its weekday and month; Date.parse alone would also take "-3" as a year.
  const date = /[A-Za-z]/.test(text) ? Date.parse(text) : Number.NaN;
  if (Number.isNaN(date)) return null;
  return Math.min(Math.max(date - now, 0), MAX_RETRY_AFTER_MS);
}

/**
 * The delay before a retry: the backoff's, or, when the server gave a `Retry-After`, never
 * less than it plus a little jitter.
 */
export function retryDelay(backoffMs: number, retryAfterMs: number | null, random: () => number = Math.random): number {
  if (retryAfterMs === null) return backoffMs;
  return Math.max(backoffMs, retryAfterMs) + Math.round(random() * RETRY_AFTER_JITTER_MS);
}

function positive(n: number, name: string): number {
  if (!Number.isFinite(n) || n <= 0) throw new RangeError(`backoff.${name} must be a positive number`);
  return n;
}
