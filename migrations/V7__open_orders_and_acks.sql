-- Open orders for `?snapshot=open`, and the acknowledgement chain: which order reached which
-- terminal, and when the kitchen acknowledged it (docs/protocol.md, docs/operations.md).

-- Which order statuses are closed: every other status is open, and a POS asking for a snapshot
-- receives the open orders. A DBA changes the set here (docs/dba.md):
--   INSERT INTO orderpush.closed_statuses VALUES ('refunded');
CREATE TABLE orderpush.closed_statuses (
    status text PRIMARY KEY
);
INSERT INTO orderpush.closed_statuses (status) VALUES ('completed'), ('cancelled');

-- Per-tenant settings that override the service's flags. `ack_timeout_seconds`: an order not
-- acknowledged by any terminal after this long raises the unacknowledged alert (default: the
-- `--ack-timeout` of `orderpush serve`).
CREATE TABLE orderpush.tenant_settings (
    tenant_slug         text PRIMARY KEY,
    ack_timeout_seconds integer CHECK (ack_timeout_seconds BETWEEN 1 AND 86400)
);

-- One row per `new_order` event, written by the sequencer with the event: when the order first
-- reached a terminal, when a terminal first acknowledged it, and which (the presence heartbeat
-- of every instance fills these in, every 2 s). Pruned with the event log.
CREATE TABLE orderpush.order_acks (
    tenant_slug        text NOT NULL,
    event_id           bigint NOT NULL,
    order_id           text,
    order_number       text,
    numbered_at        timestamptz NOT NULL DEFAULT now(),
    first_delivered_at timestamptz,
    first_acked_at     timestamptz,
    acked_by_key       text,
    PRIMARY KEY (tenant_slug, event_id)
);
-- The heartbeat looks only at what is still pending: these stay small whatever the history.
CREATE INDEX order_acks_undelivered_idx ON orderpush.order_acks (tenant_slug, event_id)
    WHERE first_delivered_at IS NULL;
CREATE INDEX order_acks_unacked_idx ON orderpush.order_acks (tenant_slug, event_id)
    WHERE first_acked_at IS NULL;
CREATE INDEX order_acks_numbered_at_idx ON orderpush.order_acks (numbered_at);

-- What the web app may read to show "the restaurant has received your order" (docs/dba.md gives
-- the GRANT): per order, its event, when it first reached a terminal and when (and by which
-- terminal, its key's public id and label) it was first acknowledged.
CREATE VIEW orderpush.order_deliveries AS
SELECT a.order_id,
       a.order_number,
       a.tenant_slug AS tenant,
       a.event_id,
       a.first_delivered_at,
       a.first_acked_at,
       a.acked_by_key,
       k.label AS acked_by_label
FROM orderpush.order_acks a
LEFT JOIN orderpush.api_keys k ON k.id = a.acked_by_key;
