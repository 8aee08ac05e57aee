-- Removes everything orderpush installed and leaves the application's tables and their data as
-- they are. Stop every `orderpush serve` first. Safe to run twice.
BEGIN;
-- Fail fast instead of queueing the application's writes behind a DROP TRIGGER.
SET LOCAL lock_timeout = '5s';
-- 1. The triggers: from here on, application writes no longer call orderpush code.
DROP TRIGGER IF EXISTS orderpush_new_order ON public.orders;
DROP TRIGGER IF EXISTS orderpush_order_updated ON public.orders;
DROP TRIGGER IF EXISTS orderpush_gift_card_purchased ON public.gift_cards;
DROP TRIGGER IF EXISTS orderpush_loyalty_updated ON public.loyalty_transactions;
-- 2. The schema: event log, counters, API keys, settings tables, functions (and, through
--    CASCADE, any trigger on any table that still calls one of its functions).
DROP SCHEMA IF EXISTS orderpush CASCADE;
-- 3. Per-database settings such as orderpush.wakeup (ALTER DATABASE ... SET).
DO $$
DECLARE
    setting text;
BEGIN
    FOR setting IN
        SELECT split_part(c, '=', 1)
        FROM pg_db_role_setting s
        JOIN pg_database d ON d.oid = s.setdatabase
        CROSS JOIN LATERAL unnest(s.setconfig) AS c
        WHERE d.datname = current_database() AND s.setrole = 0 AND c LIKE 'orderpush.%'
    LOOP
        EXECUTE format('ALTER DATABASE %I RESET %s', current_database(), setting);
    END LOOP;
END
$$;
-- 4. refinery's history, so that `orderpush migrate` installs from scratch again. The
--    application tables' migration (V1) only creates what does not exist, so it leaves them be.
DROP TABLE IF EXISTS public.refinery_schema_history;
COMMIT;
