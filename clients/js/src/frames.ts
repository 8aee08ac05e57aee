// The frames orderpush sends to a POS (docs/protocol.md), as TypeScript types, and their parsing.

/** An add-on chosen for an order item. */
export interface Addon {
  name: string;
  price: number;
  [key: string]: unknown;
}

/** One line of an order, in the order the web app inserted it. */
export interface OrderItem {
  menuItemId: string | null;
  name: string;
  quantity: number;
  price: number;
  selectedAddons: Addon[];
  specialInstructions: string | null;
}

/** `data` of `new_order`: an order placed through a source the DBA enabled (default `online`). */
export interface NewOrderData {
  orderId: string;
  orderNumber: string;
  customerName: string | null;
  customerPhone: string | null;
  /** `delivery`, `collection`, `dine_in`, ... */
  orderType: string;
  /** `online`, `pos`, `phone`, `kiosk`, ... */
  orderSource: string;
  /** `pending`, `confirmed`, `preparing`, `ready`, `completed`, `cancelled`, ... */
  status: string;
  totalAmount: number;
  items: OrderItem[];
  specialInstructions: string | null;
  /** ISO 8601 UTC, or null for "as soon as possible". */
  scheduledFor: string | null;
  createdAt: string;
}

/** `data` of `order_snapshot`: an open order as it is now, with the `new_order` keys. */
export type OrderSnapshotData = NewOrderData;

/** `data` of `order_updated`: an order's status changed. */
export interface OrderUpdatedData {
  orderId: string;
  orderNumber: string;
  status: string;
  previousStatus: string;
  updatedAt: string;
}

/** `data` of `gift_card_purchased`. */
export interface GiftCardPurchasedData {
  cardNumber: string;
  initialBalance: number;
  currentBalance: number;
  purchasedBy: string | null;
  recipientName: string | null;
  recipientEmail: string | null;
  /** `YYYY-MM-DD` or null. */
  expiryDate: string | null;
  purchasedAt: string;
}

/** `data` of `loyalty_updated`. */
export interface LoyaltyUpdatedData {
  customerId: string;
  customerPhone: string | null;
  pointsChange: number;
  newBalance: number;
  /** `earned`, `redeemed`, `adjusted`, `expired`. */
  transactionType: string;
  reason: string | null;
  updatedAt: string;
}

/** Why the server asks for a resync; unknown future reasons are possible: treat them alike. */
export type ResyncReason =
  | 'retention'
  | 'replay_too_long'
  | 'bad_event'
  | 'emit_failed'
  | 'log_rewound'
  | 'suppressed'
  | (string & {});

/** `data` of `resync_required`. */
export interface ResyncRequiredData {
  reason: ResyncReason;
  /** The position the client asked for (or was last sent), when the server knows it. */
  since?: number | null;
  /** The tenant's latest id when the resync was decided. */
  latestId?: number;
}

/** The envelope every event shares. */
export interface Envelope<T extends string, D> {
  type: T;
  /** The tenant's slug. */
  tenant: string;
  /** ISO 8601, UTC, milliseconds, `Z`. */
  timestamp: string;
  data: D;
  /** Increases per tenant (see docs/protocol.md for the two exceptions). */
  id: number;
  /** Present and true when `data` was shortened to fit the 1 MiB frame limit (every key kept). */
  truncated?: boolean;
}

/** An order was placed. */
export type NewOrderEvent = Envelope<'new_order', NewOrderData>;
/** An order's status changed. */
export type OrderUpdatedEvent = Envelope<'order_updated', OrderUpdatedData>;
/** A gift card was bought. */
export type GiftCardPurchasedEvent = Envelope<'gift_card_purchased', GiftCardPurchasedData>;
/** A loyalty balance changed. */
export type LoyaltyUpdatedEvent = Envelope<'loyalty_updated', LoyaltyUpdatedData>;
/**
 * An open order as part of a snapshot (`snapshot: 'open'`): upsert it by `orderId`. Every
 * frame of one snapshot carries the same `id`, the position the snapshot is consistent with.
 */
export type OrderSnapshotEvent = Envelope<'order_snapshot', OrderSnapshotData>;
/** Local state may be incomplete: refetch it, then carry on from this frame's `id`. */
export type ResyncRequiredEvent = Envelope<'resync_required', ResyncRequiredData>;

/** An event pushed by the web app through `POST /broadcast`, of a type this package does not know. */
export interface BroadcastEvent<D = unknown> {
  type: string;
  tenant: string;
  timestamp: string;
  data: D;
  id: number;
  truncated?: boolean;
}

/** Control frame: the socket has caught up (after the replay, or at once for a live join). */
export interface ReadyFrame {
  type: 'ready';
  tenant: string;
  /** The position this socket is consistent with. */
  id: number;
}

/** Control frame: the end of the `order_snapshot` frames. */
export interface SnapshotEndFrame {
  type: 'snapshot_end';
  tenant: string;
  /** The position the snapshot is consistent with; live events follow after it. */
  id: number;
  /** False when the server could not send every open order (refetch over REST). */
  complete: boolean;
}

/** The four event types the database emits by itself. */
export type DatabaseEvent =
  | NewOrderEvent
  | OrderUpdatedEvent
  | GiftCardPurchasedEvent
  | LoyaltyUpdatedEvent;

/** Every frame type this package knows: a discriminated union on `type`. */
export type KnownFrame =
  | DatabaseEvent
  | OrderSnapshotEvent
  | ResyncRequiredEvent
  | ReadyFrame
  | SnapshotEndFrame;

/** Any frame the server sends: a known one, or a broadcast of the web app's own type. */
export type ServerFrame = KnownFrame | BroadcastEvent;

/** The `type` values of [`KnownFrame`]. */
export const KNOWN_TYPES: ReadonlySet<string> = new Set<KnownFrame['type']>([
  'new_order',
  'order_updated',
  'gift_card_purchased',
  'loyalty_updated',
  'order_snapshot',
  'resync_required',
  'ready',
  'snapshot_end',
]);

/** Narrows a frame to the known union (then `switch (frame.type)` narrows `data`). */
export function isKnownFrame(frame: ServerFrame): frame is KnownFrame {
  return KNOWN_TYPES.has(frame.type);
}

/** Control frames carry a position but are not events. */
export function isControlFrame(frame: ServerFrame): frame is ReadyFrame | SnapshotEndFrame {
  return frame.type === 'ready' || frame.type === 'snapshot_end';
}

/** The result of parsing one text frame. */
export type ParsedFrame = { ok: true; frame: ServerFrame } | { ok: false; error: string };

/**
 * Parses one text frame. Only what the client relies on is checked (a JSON object with a
 * non-empty string `type` and a non-negative integer `id`); everything else is passed on as
 * the server sent it, so extra fields stay available.
 */
export function parseFrame(text: string): ParsedFrame {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    return { ok: false, error: 'a frame is not valid JSON' };
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    return { ok: false, error: 'a frame is not a JSON object' };
  }
  const frame = value as { type?: unknown; id?: unknown; complete?: unknown };
  if (typeof frame.type !== 'string' || frame.type === '') {
    return { ok: false, error: 'a frame has no type' };
  }
  if (typeof frame.id !== 'number' || !Number.isSafeInteger(frame.id) || frame.id < 0) {
    return { ok: false, error: `a ${frame.type} frame has no valid id` };
  }
  if (frame.type === 'snapshot_end' && typeof frame.complete !== 'boolean') {
    frame.complete = false; // not stated: do not claim the snapshot was complete
  }
  return { ok: true, frame: value as ServerFrame };
}
