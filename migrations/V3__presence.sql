-- Presence: which orderpush instances are running and which POS terminals are connected to
-- each, so the admin API, the status page and the undelivered-order alert see every instance.
-- Each instance writes its own rows in one batch every 2 s (never per frame) and deletes the
-- rows of instances whose heartbeat stopped (docs/operations.md, "Presence").
--
-- UNLOGGED: these rows describe the present moment and are rewritten by the running instances
-- within seconds, so they are not worth WAL or replication traffic. After a crash or a failover
-- the tables start empty and every live instance re-registers with its next heartbeat.

CREATE UNLOGGED TABLE orderpush.instances (
    id                   text PRIMARY KEY,          -- random per process
    hostname             text NOT NULL,
    pid                  integer NOT NULL,
    listen               text NOT NULL,             -- the address it serves on
    version              text NOT NULL,
    started_at           timestamptz NOT NULL,
    heartbeat_at         timestamptz NOT NULL DEFAULT now(),
    listener_up          boolean NOT NULL DEFAULT false,
    listener_mode        text,                      -- notify | gated | poll
    listener_read_age_ms bigint,                    -- time since the listener's last completed read
    listener_lag_ms      double precision,          -- commit-to-send lag of the last event it read
    events_per_second    double precision NOT NULL DEFAULT 0
);
-- Expiry finds dead instances by heartbeat.
CREATE INDEX instances_heartbeat_at_idx ON orderpush.instances (heartbeat_at);

CREATE UNLOGGED TABLE orderpush.connections (
    instance_id       text NOT NULL REFERENCES orderpush.instances (id) ON DELETE CASCADE,
    conn_id           bigint NOT NULL,              -- unique within its instance
    tenant_slug       text NOT NULL,
    key_id            text NOT NULL,                -- orderpush.api_keys.id (public, not the secret)
    peer              text NOT NULL,                -- remote address as the instance saw it
    connected_at      timestamptz NOT NULL,
    last_delivered_id bigint,                       -- last event id written to the socket
    last_acked_id     bigint,                       -- last {"type":"ack","id":N} from the POS
    PRIMARY KEY (instance_id, conn_id)
);
CREATE INDEX connections_tenant_slug_idx ON orderpush.connections (tenant_slug);
