-- The unacknowledged-order alert (docs/operations.md): an order that no terminal acknowledged
-- within the tenant's timeout is warned about once, counted, and shown red on /status until it
-- is acknowledged or reaches a closed status.

-- `closed_at`: when the order reached a status of `orderpush.closed_statuses`, as the sequencer
-- numbered that change (an order closed without an acknowledgement stops being overdue).
-- `alerted_at`: when an instance warned about it (once per order, whichever instance got it).
ALTER TABLE orderpush.order_acks
    ADD COLUMN closed_at  timestamptz,
    ADD COLUMN alerted_at timestamptz;

-- What the alert and the overdue counts read: orders still waiting for an acknowledgement. Only
-- orders both open and unacknowledged are in it, so it stays small whatever the history.
CREATE INDEX order_acks_waiting_idx ON orderpush.order_acks (numbered_at)
    WHERE first_acked_at IS NULL AND closed_at IS NULL;
-- How the sequencer finds an order's row when its status changes to a closed one.
CREATE INDEX order_acks_open_order_idx ON orderpush.order_acks (tenant_slug, order_id)
    WHERE closed_at IS NULL;

-- 0 now means "no unacknowledged alert for this tenant" (terminals that never acknowledge, such
-- as the legacy POS); NULL still means the service's `--ack-timeout`.
ALTER TABLE orderpush.tenant_settings
    DROP CONSTRAINT tenant_settings_ack_timeout_seconds_check,
    ADD CONSTRAINT tenant_settings_ack_timeout_seconds_check
        CHECK (ack_timeout_seconds BETWEEN 0 AND 86400);

-- The view gains when the order was closed (a new last column: existing readers are unchanged).
CREATE OR REPLACE VIEW orderpush.order_deliveries AS
SELECT a.order_id,
       a.order_number,
       a.tenant_slug AS tenant,
       a.event_id,
       a.first_delivered_at,
       a.first_acked_at,
       a.acked_by_key,
       k.label AS acked_by_label,
       a.closed_at
FROM orderpush.order_acks a
LEFT JOIN orderpush.api_keys k ON k.id = a.acked_by_key;
