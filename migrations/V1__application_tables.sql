-- The web app's tables (contract §2). Column names and types are fixed: other programs write them.
-- orderpush only reads these tables; its own objects live in the `orderpush` schema (V2).

CREATE TABLE IF NOT EXISTS public.tenants (
    slug       text PRIMARY KEY
               CONSTRAINT tenants_slug_format CHECK (slug ~ '^[a-z0-9-]{1,63}$'),
    name       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS public.orders (
    id                   uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_slug          text NOT NULL REFERENCES public.tenants (slug),
    order_number         text NOT NULL,
    customer_name        text,
    customer_phone       text,
    order_type           text NOT NULL,
    order_source         text NOT NULL,
    status               text NOT NULL,
    total_amount         numeric(10, 2) NOT NULL,
    special_instructions text,
    scheduled_for        timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS orders_tenant_slug_idx ON public.orders (tenant_slug);

CREATE TABLE IF NOT EXISTS public.order_items (
    id                   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id             uuid NOT NULL REFERENCES public.orders (id) ON DELETE CASCADE,
    menu_item_id         text,
    name                 text NOT NULL,
    quantity             int NOT NULL,
    price                numeric(10, 2) NOT NULL,
    selected_addons      jsonb NOT NULL DEFAULT '[]',
    special_instructions text
);
-- new_order gathers an order's items at commit; without this index that is a sequential scan.
CREATE INDEX IF NOT EXISTS order_items_order_id_idx ON public.order_items (order_id);

CREATE TABLE IF NOT EXISTS public.gift_cards (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_slug     text NOT NULL REFERENCES public.tenants (slug),
    card_number     text NOT NULL UNIQUE,
    initial_balance numeric(10, 2) NOT NULL,
    current_balance numeric(10, 2) NOT NULL,
    purchased_by    text,
    recipient_name  text,
    recipient_email text,
    expiry_date     date,
    purchased_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS public.loyalty_transactions (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_slug      text NOT NULL REFERENCES public.tenants (slug),
    customer_id      text NOT NULL,
    customer_phone   text,
    points_change    int NOT NULL,
    new_balance      int NOT NULL,
    transaction_type text NOT NULL,
    reason           text,
    created_at       timestamptz NOT NULL DEFAULT now()
);
