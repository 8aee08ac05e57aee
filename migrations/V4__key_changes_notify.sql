-- Key changes reach every running orderpush at once: when a POS key is revoked, moved to another
-- tenant or deleted (also by cascade, when its tenant is deleted), its id is sent on the NOTIFY
-- channel `orderpush_keys`. Each instance LISTENs on a connection of its own, forgets the key
-- and closes its sockets within milliseconds instead of waiting for its periodic check, which
-- stays as the safety net (docs/reliability.md, "Revocation").
--
-- The notification must never fail the transaction that changes the key:
--   * NOTIFY fails at COMMIT when Postgres's notification queue is full; the notify is skipped
--     while the queue is more than half full (the periodic check then closes the sockets, within
--     seconds instead of milliseconds);
--   * ids are 12 hex digits, far below the 8000-byte payload limit, but a hand-made key row
--     could carry a longer id: such an id is not notified either;
--   * any other error raised by pg_notify is caught and reported as a WARNING.

CREATE FUNCTION orderpush.notify_key_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE'
       AND OLD.revoked_at IS NOT DISTINCT FROM NEW.revoked_at
       AND OLD.tenant_slug IS NOT DISTINCT FROM NEW.tenant_slug THEN
        RETURN NULL;
    END IF;
    IF octet_length(OLD.id) <= 1000 AND pg_notification_queue_usage() < 0.5 THEN
        BEGIN
            PERFORM pg_notify('orderpush_keys', OLD.id);
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'orderpush: key change of % not notified (%); instances notice it at their next periodic check',
                OLD.id, SQLERRM;
        END;
    END IF;
    RETURN NULL;
END
$$;

-- AFTER ... FOR EACH ROW: only committed changes are delivered (NOTIFY is transactional), and
-- UPDATE OF limits it to the two columns that decide who may connect where.
CREATE TRIGGER orderpush_key_changed
    AFTER UPDATE OF revoked_at, tenant_slug OR DELETE ON orderpush.api_keys
    FOR EACH ROW EXECUTE FUNCTION orderpush.notify_key_change();
