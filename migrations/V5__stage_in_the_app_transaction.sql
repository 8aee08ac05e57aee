-- The application's transaction only stages a row; a single sequencer (one orderpush instance at
-- a time) numbers, renders and stores events after commit. docs/architecture.md explains the
-- design, docs/dba.md the objects and the privileges.
--
-- What runs inside the application's transaction from here on is one INSERT of the written row
-- (`to_jsonb(NEW)`, no column named, no table read, no row lock) and, at most once in flight,
-- a NOTIFY. Nothing in it can fail the write, make it wait, deadlock it or need a privilege of
-- the application's role: schema drift, isolation level and rendering all move to the service.
--
-- Upgrading in place: `orderpush migrate` refuses while instances of the previous version are
-- connected (they number events inside the writer's transaction and cannot run beside a
-- sequencer). The triggers are swapped in this one transaction, which waits (under the
-- migration's lock_timeout) for transactions already writing to `orders`; a write committed
-- before it was numbered by the old path, one committed after is staged. Ids continue: the
-- sequencer starts from the old per-tenant counters.

-- 1. The owner of the trigger function: a role that cannot log in and may only append to the
--    staging table. The function runs as this role (SECURITY DEFINER), so the application's own
--    role needs no privilege on schema orderpush at all, and cannot read or forge anything in it.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'orderpush_owner') THEN
        BEGIN
            CREATE ROLE orderpush_owner NOLOGIN;
        EXCEPTION
            -- Roles belong to the cluster: another database's migration may create it meanwhile.
            WHEN duplicate_object OR unique_violation THEN NULL;
            WHEN insufficient_privilege THEN
                RAISE EXCEPTION 'orderpush needs the role orderpush_owner, and this role may not create roles'
                    USING HINT = 'Ask a superuser to run: CREATE ROLE orderpush_owner NOLOGIN; GRANT orderpush_owner TO '
                                 || current_user || '; then run orderpush migrate again (docs/dba.md, "Privileges").';
        END;
    END IF;
    -- Handing the function to the owner role requires membership in it.
    IF NOT pg_has_role(current_user, 'orderpush_owner', 'MEMBER') THEN
        EXECUTE format('GRANT orderpush_owner TO %I', current_user);
    END IF;
END
$$;
GRANT USAGE ON SCHEMA orderpush TO orderpush_owner;

-- 2. The staging table: one row per write that may become an event, appended by the trigger and
--    by POST /broadcast, taken (and deleted) by the sequencer within milliseconds. `gid` orders
--    it: a write that depends on another's commit always stages after it.
--    Aggressive autovacuum: rows live for milliseconds, and a queue table full of dead rows makes
--    every read of its head walk them.
CREATE TABLE orderpush.staged (
    gid       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind      text NOT NULL,        -- new_order | order_updated | gift_card_purchased | loyalty_updated | suppressed | broadcast
    row       jsonb NOT NULL,       -- the written row, as the application wrote it
    old       jsonb,                -- order_updated: the status and updated_at before the change
    raw       text,                 -- broadcast: `event.data` exactly as sent
    staged_at timestamptz NOT NULL DEFAULT now()
) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000,
        autovacuum_vacuum_cost_delay = 0);
GRANT INSERT ON orderpush.staged TO orderpush_owner;

-- 3. The trigger function, shared by all four triggers (TG_ARGV[0] names the event kind).
--    No EXCEPTION block on purpose: it would cost a subtransaction per row and overflow
--    PostgreSQL's per-backend subtransaction cache in bulk imports; nothing in it can fail.
CREATE FUNCTION orderpush.stage() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_row jsonb := to_jsonb(NEW);
    v_old jsonb;
    v_tenant text;
    v_done text;
BEGIN
    IF current_setting('orderpush.suppress', true) IN ('on', 'true', '1') THEN
        -- A quiet bulk job: instead of one event per row, one `resync_required` per tenant and
        -- transaction, so that tenant's POS refetches rather than silently missing changes.
        v_tenant := coalesce(v_row ->> 'tenant_slug', '');
        v_done := coalesce(current_setting('orderpush.suppressed_tenants', true), '');
        IF position(',' || v_tenant || ',' IN v_done) > 0 THEN
            RETURN NULL;
        END IF;
        PERFORM set_config('orderpush.suppressed_tenants',
                           CASE WHEN v_done = '' THEN ',' ELSE v_done END || v_tenant || ',', true);
        INSERT INTO orderpush.staged (kind, row)
        VALUES ('suppressed', jsonb_build_object('tenant_slug', v_tenant));
    ELSIF TG_OP = 'UPDATE' THEN
        v_old := to_jsonb(OLD);
        INSERT INTO orderpush.staged (kind, row, old)
        VALUES (TG_ARGV[0], v_row,
                jsonb_build_object('status', v_old -> 'status', 'updated_at', v_old -> 'updated_at'));
    ELSE
        INSERT INTO orderpush.staged (kind, row) VALUES (TG_ARGV[0], v_row);
    END IF;
    -- Wake the sequencer. The payload is constant and empty: identical notifications fold into
    -- one per transaction, and no payload can reach NOTIFY's 8000-byte limit. The table stays
    -- the truth; this is a hint. Mode per database (docs/dba.md, "Wake-up mode"):
    --   gated (default): only the transaction that wins the try-lock notifies, so concurrent
    --     writers never queue on the cluster-wide notify lock at commit; the sequencer re-reads
    --     every few milliseconds while rows keep coming, and polls;
    --   notify: every staging transaction notifies; poll: nobody does, the sequencer polls.
    -- The try-lock never waits. Key (28528, 1): 28528 is 0x6f70, 'op' in ASCII, orderpush's
    -- private advisory-lock namespace; 1 is this gate (2 elects the sequencer).
    -- A notify queue more than half full (a stuck listener elsewhere in the cluster) would make
    -- this COMMIT fail once it is full: then skip the hint and let the sequencer's poll find it.
    CASE current_setting('orderpush.wakeup', true)
        WHEN 'poll' THEN
            NULL;
        WHEN 'notify' THEN
            IF pg_notification_queue_usage() < 0.5 THEN
                PERFORM pg_notify('orderpush', '');
            END IF;
        ELSE
            IF pg_try_advisory_xact_lock(28528, 1) AND pg_notification_queue_usage() < 0.5 THEN
                PERFORM pg_notify('orderpush', '');
            END IF;
    END CASE;
    RETURN NULL;
END
$$;
ALTER FUNCTION orderpush.stage() OWNER TO orderpush_owner;
REVOKE ALL ON FUNCTION orderpush.stage() FROM PUBLIC;

-- 4. Swap the triggers. Same names as before, so every DBA control keeps working
--    (`ALTER TABLE ... DISABLE TRIGGER orderpush_new_order`). Plain AFTER ROW triggers now: the
--    row is staged at the end of its statement, and rendered (with the order's items) after
--    commit, when the sequencer numbers it.
DROP TRIGGER IF EXISTS orderpush_new_order ON public.orders;
DROP TRIGGER IF EXISTS orderpush_order_updated ON public.orders;
DROP TRIGGER IF EXISTS orderpush_gift_card_purchased ON public.gift_cards;
DROP TRIGGER IF EXISTS orderpush_loyalty_updated ON public.loyalty_transactions;

CREATE TRIGGER orderpush_new_order
    AFTER INSERT ON public.orders
    FOR EACH ROW EXECUTE FUNCTION orderpush.stage('new_order');

CREATE TRIGGER orderpush_order_updated
    AFTER UPDATE OF status ON public.orders
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION orderpush.stage('order_updated');

CREATE TRIGGER orderpush_gift_card_purchased
    AFTER INSERT ON public.gift_cards
    FOR EACH ROW EXECUTE FUNCTION orderpush.stage('gift_card_purchased');

CREATE TRIGGER orderpush_loyalty_updated
    AFTER INSERT ON public.loyalty_transactions
    FOR EACH ROW EXECUTE FUNCTION orderpush.stage('loyalty_updated');

-- 5. Per-tenant heads, written only by the sequencer (no writer ever waits on them), with the
--    tenant incarnation they count for: a tenant deleted and created again under the same slug
--    has a new `tenants.created_at`, and its ids start over without ever exposing the old
--    restaurant's events. Ids continue from the old counters.
CREATE TABLE orderpush.heads (
    tenant_slug       text PRIMARY KEY,
    seq               bigint NOT NULL CHECK (seq >= 0),
    tenant_created_at timestamptz
);
INSERT INTO orderpush.heads (tenant_slug, seq, tenant_created_at)
SELECT s.tenant_slug, s.seq, t.created_at
FROM orderpush.tenant_seq s
JOIN public.tenants t ON t.slug = s.tenant_slug;

-- 6. The log's position, one row: the last batch the sequencer committed, and the epoch of the
--    sequencer that committed it. A new epoch starts at every election; an epoch that starts at
--    or below a follower's position, or a batch number that went backwards, tells the followers
--    the log was rewound (a restore, a failover to a replica that was behind).
CREATE TABLE orderpush.log_state (
    singleton         boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    batch             bigint NOT NULL,
    epoch             bigint NOT NULL,
    epoch_first_batch bigint NOT NULL,
    committed_at      timestamptz NOT NULL
);
INSERT INTO orderpush.log_state (batch, epoch, epoch_first_batch, committed_at)
VALUES (0, 0, 1, now());

-- 7. Writes that could not become events (a row without a tenant, an order whose items could not
--    be read): logged, counted, turned into `resync_required` (reason `emit_failed`) for the
--    tenant, and kept here for the DBA, pruned with the log.
CREATE TABLE orderpush.emit_failures (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    failed_at   timestamptz NOT NULL DEFAULT now(),
    kind        text NOT NULL,
    tenant_slug text,
    reason      text NOT NULL,
    row         jsonb
);
CREATE INDEX emit_failures_failed_at_idx ON orderpush.emit_failures (failed_at);
CREATE VIEW orderpush.emit_errors AS
SELECT f.failed_at,
       CASE f.kind
           WHEN 'new_order' THEN 'orders'
           WHEN 'order_updated' THEN 'orders'
           WHEN 'gift_card_purchased' THEN 'gift_cards'
           WHEN 'loyalty_updated' THEN 'loyalty_transactions'
           ELSE f.kind
       END AS source_table,
       f.kind,
       f.tenant_slug AS tenant,
       f.reason,
       f.row
FROM orderpush.emit_failures f;

-- 8. Column names for schemas that differ from the reference tables: the sequencer reads the
--    event fields from these columns instead of the default ones (docs/dba.md, "Adapting to your
--    schema"). Empty by default. `field` is the event's key (`items.` prefixes an item's).
CREATE TABLE orderpush.field_columns (
    kind        text NOT NULL CHECK (kind IN ('new_order', 'order_updated', 'gift_card_purchased', 'loyalty_updated')),
    field       text NOT NULL,
    column_name text NOT NULL,
    PRIMARY KEY (kind, field)
);

-- 9. The old write path: numbering in the writer's transaction.
DROP FUNCTION IF EXISTS orderpush.on_order_inserted();
DROP FUNCTION IF EXISTS orderpush.on_order_status_changed();
DROP FUNCTION IF EXISTS orderpush.on_gift_card_inserted();
DROP FUNCTION IF EXISTS orderpush.on_loyalty_transaction_inserted();
DROP FUNCTION IF EXISTS orderpush.suppressed(text);
DROP FUNCTION IF EXISTS orderpush.emit(text, text, json, text, text);
DROP TABLE orderpush.tenant_seq;
