-- The event log as the sequencer writes it (docs/architecture.md): every event carries the batch
-- that numbered it, and the followers on every instance read the log by batch. A separate
-- migration from the trigger swap, so that building the index below never holds a lock the
-- application's writes wait on: since V5 they no longer touch orderpush.events.

-- Existing rows get batch 0 (adding a column with a constant default rewrites nothing). The
-- followers start after the current batch, so old rows are only ever served by replays.
ALTER TABLE orderpush.events
    ADD COLUMN batch     bigint NOT NULL DEFAULT 0,
    -- The staged row it came from: /broadcast waits for its own row to be numbered.
    ADD COLUMN gid       bigint,
    -- `data` was shortened to the frame limit; the frame says `"truncated": true`.
    ADD COLUMN truncated boolean NOT NULL DEFAULT false;
CREATE INDEX events_batch_idx ON orderpush.events (batch);

-- Idempotency keys of POST /broadcast (docs/protocol.md): a caller that timed out and retries
-- with the same `Idempotency-Key` gets the first answer, on any instance, for 24 hours.
CREATE TABLE orderpush.broadcast_requests (
    tenant_slug     text NOT NULL,
    idempotency_key text NOT NULL,
    request_sha256  bytea NOT NULL CHECK (octet_length(request_sha256) = 32),
    gid             bigint NOT NULL,      -- its staged row
    event_id        bigint,               -- set by the sequencer when it numbers that row
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_slug, idempotency_key)
);
-- The sequencer finds the request of a staged row it numbers; pruning finds old requests.
CREATE INDEX broadcast_requests_gid_idx ON orderpush.broadcast_requests (gid);
CREATE INDEX broadcast_requests_created_at_idx ON orderpush.broadcast_requests (created_at);
