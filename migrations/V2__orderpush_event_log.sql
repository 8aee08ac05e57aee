-- orderpush's own objects: the event log (outbox), the per-tenant id counter, POS API keys,
-- and the settings a DBA changes without a code change. Everything lives in schema `orderpush`.
-- docs/architecture.md explains the id design; docs/dba.md the controls.

CREATE SCHEMA IF NOT EXISTS orderpush;

-- Which orders.order_source values emit `new_order` (contract §3: default `online` only).
-- A DBA changes the set here, and only here:
--   INSERT INTO orderpush.new_order_sources VALUES ('kiosk');
CREATE TABLE orderpush.new_order_sources (
    order_source text PRIMARY KEY
);
INSERT INTO orderpush.new_order_sources (order_source) VALUES ('online');

-- One row per tenant that has ever had an event: the last id handed out. The row lock taken by
-- `UPDATE ... SET seq = seq + 1` at commit time is what makes ids gap-free and equal to commit
-- order within a tenant (a writer cannot take N+1 before the holder of N has committed).
-- The listener also reads this table to learn which tenants moved.
-- fillfactor 10: every commit updates one of these rows; free space on each page keeps those
-- updates HOT (no index churn) and spreads tenants over pages so writers do not contend for one.
CREATE TABLE orderpush.tenant_seq (
    tenant_slug text PRIMARY KEY REFERENCES public.tenants (slug) ON DELETE CASCADE,
    seq         bigint NOT NULL CHECK (seq >= 0)
) WITH (fillfactor = 10);

-- The event log: every event, from a trigger or from POST /broadcast, is one row here.
-- `data` is `json`, not `jsonb`, so key order and numbers reach the POS exactly as built/sent.
CREATE TABLE orderpush.events (
    tenant_slug text NOT NULL,
    id          bigint NOT NULL,
    type        text NOT NULL,
    ts          text NOT NULL,
    data        json NOT NULL,
    origin      text NOT NULL CHECK (origin IN ('db', 'broadcast')),
    emitted_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant_slug, id)
);
-- Retention finds old rows by time. BRIN, not btree: rows arrive in time order, so a block-range
-- summary finds them, and it costs the writers' commits almost nothing to maintain.
CREATE INDEX events_emitted_at_idx ON orderpush.events USING brin (emitted_at);

-- POS API keys. Only the SHA-256 of the key is stored; `id` is the short public handle.
CREATE TABLE orderpush.api_keys (
    id          text PRIMARY KEY,
    tenant_slug text NOT NULL REFERENCES public.tenants (slug) ON DELETE CASCADE,
    key_hash    bytea NOT NULL UNIQUE CHECK (octet_length(key_hash) = 32),
    label       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_tenant_slug_idx ON orderpush.api_keys (tenant_slug);

-- ISO 8601 UTC with milliseconds and `Z`, the seed's timestamp format; NULL stays NULL.
CREATE FUNCTION orderpush.iso(t timestamptz) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
$$;

-- Appends one event for a tenant and returns its id. Called by the deferred triggers below (so at
-- commit time) and by POST /broadcast. Ids come from the tenant's counter row, whose lock is held
-- to the end of the transaction: per tenant, ids are gap-free and in commit order.
CREATE FUNCTION orderpush.emit(p_tenant text, p_type text, p_data json,
                               p_ts text DEFAULT NULL, p_origin text DEFAULT 'db')
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
BEGIN
    -- One statement for the common case (the tenant has a counter row): this runs in every
    -- emitting commit, so each saved statement is write throughput.
    WITH s AS (
        UPDATE orderpush.tenant_seq SET seq = seq + 1 WHERE tenant_slug = p_tenant RETURNING seq)
    INSERT INTO orderpush.events (tenant_slug, id, type, ts, data, origin)
    SELECT p_tenant, s.seq, p_type, coalesce(p_ts, orderpush.iso(clock_timestamp())), p_data, p_origin
    FROM s
    RETURNING id INTO v_id;
    IF v_id IS NULL THEN
        INSERT INTO orderpush.tenant_seq AS s (tenant_slug, seq) VALUES (p_tenant, 1)
        ON CONFLICT (tenant_slug) DO UPDATE SET seq = s.seq + 1
        RETURNING s.seq INTO v_id;
        INSERT INTO orderpush.events (tenant_slug, id, type, ts, data, origin)
        VALUES (p_tenant, v_id, p_type, coalesce(p_ts, orderpush.iso(clock_timestamp())), p_data, p_origin);
    END IF;
    -- Wake the listeners. The payload is constant and small on purpose: identical notifications
    -- fold into one per transaction, and a payload can never grow past NOTIFY's 8000-byte limit
    -- (which would fail the application's own INSERT). The table stays the truth; this is a
    -- hint. Mode per database, without a code change (docs/dba.md):
    --   ALTER DATABASE db SET orderpush.wakeup = 'gated' | 'notify' | 'poll';
    --   gated (default): only the transaction that wins the try-lock notifies, so concurrent
    --     writers do not queue on the cluster-wide notify lock at commit; the listener keeps
    --     re-reading every few milliseconds while events keep coming, and polls;
    --   notify: every emitting transaction notifies; poll: nobody does, the listener polls.
    CASE current_setting('orderpush.wakeup', true)
        WHEN 'poll' THEN
            NULL;
        WHEN 'notify' THEN
            PERFORM pg_notify('orderpush', '');
        ELSE
            IF pg_try_advisory_xact_lock(28528, 1) THEN
                PERFORM pg_notify('orderpush', '');
            END IF;
    END CASE;
    RETURN v_id;
END
$$;

-- True when the current transaction runs with `SET LOCAL orderpush.suppress = 'on'` (a quiet bulk
-- job). The first suppressed write per tenant and transaction emits one `resync_required` event,
-- so that tenant's POS refetches its state instead of silently missing changes.
CREATE FUNCTION orderpush.suppressed(p_tenant text) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_done text := coalesce(current_setting('orderpush.resync_emitted', true), '');
BEGIN
    IF coalesce(current_setting('orderpush.suppress', true), '') NOT IN ('on', 'true', '1') THEN
        RETURN false;
    END IF;
    IF position(',' || p_tenant || ',' IN v_done) = 0 THEN
        PERFORM orderpush.emit(p_tenant, 'resync_required',
                               json_build_object('reason', 'bulk_change'));
        PERFORM set_config('orderpush.resync_emitted',
                           CASE WHEN v_done = '' THEN ',' ELSE v_done END || p_tenant || ',', true);
    END IF;
    RETURN true;
END
$$;

-- new_order: fires at commit (deferred), so the items the app inserts after the order row, in the
-- same transaction, are visible. The order is re-read because the row may have changed since.
CREATE FUNCTION orderpush.on_order_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('orderpush.suppress', true) IN ('on', 'true', '1') THEN
        -- A quiet bulk job: an order that would have emitted makes its tenant resync (once).
        PERFORM orderpush.suppressed(o.tenant_slug)
        FROM public.orders o
        WHERE o.id = NEW.id
          AND EXISTS (SELECT 1 FROM orderpush.new_order_sources s WHERE s.order_source = o.order_source);
        RETURN NULL;
    END IF;
    -- One statement: re-read the order, check its source, build the event with its items, emit.
    PERFORM orderpush.emit(o.tenant_slug, 'new_order', json_build_object(
        'orderId', o.id,
        'orderNumber', o.order_number,
        'customerName', o.customer_name,
        'customerPhone', o.customer_phone,
        'orderType', o.order_type,
        'orderSource', o.order_source,
        'status', o.status,
        'totalAmount', o.total_amount,
        'items', coalesce((
            SELECT json_agg(json_build_object(
                       'menuItemId', i.menu_item_id,
                       'name', i.name,
                       'quantity', i.quantity,
                       'price', i.price,
                       'selectedAddons', i.selected_addons,
                       'specialInstructions', i.special_instructions) ORDER BY i.id)
            FROM public.order_items i WHERE i.order_id = o.id), '[]'::json),
        'specialInstructions', o.special_instructions,
        'scheduledFor', orderpush.iso(o.scheduled_for),
        'createdAt', orderpush.iso(o.created_at)))
    FROM public.orders o
    WHERE o.id = NEW.id
      AND EXISTS (SELECT 1 FROM orderpush.new_order_sources s WHERE s.order_source = o.order_source);
    RETURN NULL;
END
$$;

-- order_updated: one event per status change, with the OLD/NEW of that change (deferred row
-- triggers keep them), so two changes in one transaction are two events.
CREATE FUNCTION orderpush.on_order_status_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('orderpush.suppress', true) IN ('on', 'true', '1')
       AND orderpush.suppressed(NEW.tenant_slug) THEN
        RETURN NULL;
    END IF;
    PERFORM orderpush.emit(NEW.tenant_slug, 'order_updated', json_build_object(
        'orderId', NEW.id,
        'orderNumber', NEW.order_number,
        'status', NEW.status,
        'previousStatus', OLD.status,
        -- The app may not touch updated_at; then the change happened in this transaction.
        'updatedAt', orderpush.iso(CASE WHEN NEW.updated_at IS DISTINCT FROM OLD.updated_at
                                        THEN NEW.updated_at ELSE now() END)));
    RETURN NULL;
END
$$;

CREATE FUNCTION orderpush.on_gift_card_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('orderpush.suppress', true) IN ('on', 'true', '1')
       AND orderpush.suppressed(NEW.tenant_slug) THEN
        RETURN NULL;
    END IF;
    PERFORM orderpush.emit(NEW.tenant_slug, 'gift_card_purchased', json_build_object(
        'cardNumber', NEW.card_number,
        'initialBalance', NEW.initial_balance,
        'currentBalance', NEW.current_balance,
        'purchasedBy', NEW.purchased_by,
        'recipientName', NEW.recipient_name,
        'recipientEmail', NEW.recipient_email,
        'expiryDate', to_char(NEW.expiry_date, 'YYYY-MM-DD'),
        'purchasedAt', orderpush.iso(NEW.purchased_at)));
    RETURN NULL;
END
$$;

CREATE FUNCTION orderpush.on_loyalty_transaction_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('orderpush.suppress', true) IN ('on', 'true', '1')
       AND orderpush.suppressed(NEW.tenant_slug) THEN
        RETURN NULL;
    END IF;
    PERFORM orderpush.emit(NEW.tenant_slug, 'loyalty_updated', json_build_object(
        'customerId', NEW.customer_id,
        'customerPhone', NEW.customer_phone,
        'pointsChange', NEW.points_change,
        'newBalance', NEW.new_balance,
        'transactionType', NEW.transaction_type,
        'reason', NEW.reason,
        'updatedAt', orderpush.iso(NEW.created_at)));
    RETURN NULL;
END
$$;

-- All four are deferred constraint triggers: they run at commit, which is what assigns ids in
-- commit order and keeps the tenant's counter row locked only for the last moment of a commit.
-- A DBA switches one off with `ALTER TABLE ... DISABLE TRIGGER <name>` (docs/dba.md).
CREATE CONSTRAINT TRIGGER orderpush_new_order
    AFTER INSERT ON public.orders
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION orderpush.on_order_inserted();

CREATE CONSTRAINT TRIGGER orderpush_order_updated
    AFTER UPDATE OF status ON public.orders
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION orderpush.on_order_status_changed();

CREATE CONSTRAINT TRIGGER orderpush_gift_card_purchased
    AFTER INSERT ON public.gift_cards
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION orderpush.on_gift_card_inserted();

CREATE CONSTRAINT TRIGGER orderpush_loyalty_updated
    AFTER INSERT ON public.loyalty_transactions
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION orderpush.on_loyalty_transaction_inserted();
