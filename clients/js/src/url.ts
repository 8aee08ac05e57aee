// The connection URL (`/ws/pos/{tenant}?since=&snapshot=&types=`) and the checks on its parts.

/** The server's rule for event type names (docs/protocol.md): 1..64 of `[A-Za-z0-9_.-]`. */
export const TYPE_NAME = /^[A-Za-z0-9_.-]{1,64}$/;
/** The tenant slug rule (a CHECK constraint in the database): 1..63 of `[a-z0-9-]`. */
export const TENANT_SLUG = /^[a-z0-9-]{1,63}$/;
/**
 * Most types one `types` filter may list: 100 names of at most 64 characters keep the request
 * line under 8 KiB, the smallest limit common proxies apply.
 */
export const MAX_TYPES = 100;

/** What the query string says. */
export interface UrlQuery {
  /** Resume after this id; null: no `since`. */
  since: number | null;
  /** Ask for a snapshot of open orders where the server would otherwise resync or start live. */
  snapshot: boolean;
  /** Only these event types (null: all). */
  types: readonly string[] | null;
}

/** Checks a `types` option: 1..100 valid names; returns them without duplicates, in order. */
export function validateTypes(types: readonly string[]): string[] {
  if (!Array.isArray(types) || types.length === 0) {
    throw new TypeError('types must list at least one event type (leave it out to receive all)');
  }
  const unique = [...new Set(types)];
  for (const t of unique) {
    if (typeof t !== 'string' || !TYPE_NAME.test(t)) {
      throw new TypeError(
        `invalid event type ${JSON.stringify(t)}: 1 to 64 letters, digits, '_', '.' or '-'`,
      );
    }
  }
  if (unique.length > MAX_TYPES) {
    throw new TypeError(`types lists ${unique.length} event types; at most ${MAX_TYPES}`);
  }
  return unique;
}

/** Checks a tenant slug. */
export function validateTenant(tenant: string): string {
  if (typeof tenant !== 'string' || !TENANT_SLUG.test(tenant)) {
    throw new TypeError(
      `invalid tenant ${JSON.stringify(tenant)}: 1 to 63 lower-case letters, digits or '-'`,
    );
  }
  return tenant;
}

/** Checks a resume position: null, or a non-negative integer. */
export function validateSince(since: number | null | undefined): number | null {
  if (since === null || since === undefined) return null;
  if (typeof since !== 'number' || !Number.isSafeInteger(since) || since < 0) {
    throw new TypeError(`invalid since ${JSON.stringify(since)}: a non-negative integer event id`);
  }
  return since;
}

/**
 * Checks the service's base URL (`ws://host:9011`, `wss://host/prefix`; `http(s)://` is taken
 * as `ws(s)://`) and returns it normalised, without a trailing slash.
 */
export function validateBaseUrl(base: string): string {
  let url: URL;
  try {
    url = new URL(base);
  } catch {
    throw new TypeError(`invalid url ${JSON.stringify(base)}: expected e.g. ws://127.0.0.1:9011`);
  }
  const schemes: Record<string, string> = { 'ws:': 'ws:', 'wss:': 'wss:', 'http:': 'ws:', 'https:': 'wss:' };
  const scheme = schemes[url.protocol];
  if (scheme === undefined) {
    throw new TypeError(`invalid url ${JSON.stringify(base)}: the scheme must be ws, wss, http or https`);
  }
  if (url.search !== '' || url.hash !== '') {
    throw new TypeError(`invalid url ${JSON.stringify(base)}: no query or fragment (the client adds the query)`);
  }
  if (url.username !== '' || url.password !== '') {
    throw new TypeError('invalid url: no credentials in the URL (the key goes in the key option)');
  }
  const path = url.pathname.replace(/\/+$/, '');
  return `${scheme}//${url.host}${path}`;
}

/** The URL of a tenant's POS socket. Inputs are expected validated. */
export function buildUrl(base: string, tenant: string, query: UrlQuery): string {
  const params: string[] = [];
  if (query.since !== null) params.push(`since=${query.since}`);
  if (query.snapshot) params.push('snapshot=open');
  // Type names are URL-safe by their rule, so the list needs no escaping.
  if (query.types !== null) params.push(`types=${query.types.join(',')}`);
  const path = `${base}/ws/pos/${encodeURIComponent(tenant)}`;
  return params.length === 0 ? path : `${path}?${params.join('&')}`;
}
