// The resume position: which id to send as `since`, and which received frames are duplicates.

import type { ServerFrame } from './frames.js';

/**
 * Tracks the last id the client has seen, following docs/protocol.md:
 *
 * - an event moves the position to its id; an event at or below the position is a duplicate
 *   (a correct server never sends one; dropping it keeps a POS from printing an order twice);
 * - `resync_required` and `snapshot_end` set the position to their id, even a lower one
 *   (`log_rewound`: the database was restored, and the server's numbering starts again below);
 * - `ready` carries the last id the socket considered (with a `types` filter, the ids skipped
 *   count too); it never moves the position back, since without a resync nothing was rewound;
 * - `order_snapshot` frames do not move it: all of one snapshot share the id its `snapshot_end`
 *   brings.
 */
export class Position {
  #id: number | null;

  /** Starts at `initial`, the last id the application processed (null: none yet). */
  constructor(initial: number | null = null) {
    this.#id = initial;
  }

  /** The id to resume from (`since`), or null when nothing has been seen. */
  get id(): number | null {
    return this.#id;
  }

  /** Applies a received frame; returns false for a duplicate, which must not be delivered. */
  observe(frame: ServerFrame): boolean {
    switch (frame.type) {
      case 'order_snapshot':
        return true;
      case 'resync_required':
      case 'snapshot_end':
        this.#id = frame.id;
        return true;
      case 'ready':
        this.#id = this.#id === null ? frame.id : Math.max(this.#id, frame.id);
        return true;
      default:
        if (this.#id !== null && frame.id <= this.#id) return false;
        this.#id = frame.id;
        return true;
    }
  }
}
