-- The baseline the benchmark compares certyo_cdc against: the seed's PL/pgSQL trigger design
-- (AFTER INSERT OR UPDATE OR DELETE FOR EACH ROW, filtering inside the function), with its
-- tracking-only filter corrected, writing the same queue rows as certyo.capture().
-- Kept for measurement only; it is not part of the extension.
CREATE SCHEMA IF NOT EXISTS bench;

CREATE OR REPLACE FUNCTION bench.plpgsql_capture() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bookkeeping constant text[] := '{certyo_record_hash,certyo_anchor_status,certyo_verified_at}';
    old_payload jsonb;
    new_payload jsonb;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        old_payload := to_jsonb(OLD) - bookkeeping;
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        new_payload := to_jsonb(NEW) - bookkeeping;
    END IF;
    -- The seed compares ROW(OLD.*) with ROW(NEW.*), bookkeeping included, so a write-back
    -- always looks like a change. Comparing the business columns is what it meant.
    IF TG_OP = 'UPDATE' AND old_payload = new_payload THEN
        RETURN NULL;
    END IF;
    INSERT INTO certyo.queue (relid, collection, record_id, operation, payload, source_timestamp, idempotency_key)
    VALUES (TG_RELID, TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME,
            coalesce(new_payload, old_payload)->>'id', lower(TG_OP), coalesce(new_payload, old_payload)::json,
            coalesce((coalesce(new_payload, old_payload)->>'updated_at')::timestamptz, transaction_timestamp()),
            'plpgsql-' || gen_random_uuid());
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION bench.elapsed_ms(statement text) RETURNS float8
LANGUAGE plpgsql AS $$
DECLARE
    started timestamptz := clock_timestamp();
BEGIN
    EXECUTE statement;
    RETURN extract(epoch FROM clock_timestamp() - started) * 1000;
END
$$;

-- A fresh table for one variant: untracked, certyo_cdc, or the PL/pgSQL baseline. All three
-- have the bookkeeping columns, so rows are the same width.
CREATE OR REPLACE FUNCTION bench.reset(variant text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    t text := 'bench.t_' || variant;
BEGIN
    EXECUTE format('DROP TABLE IF EXISTS %s', t);
    EXECUTE format('CREATE TABLE %s (id bigint PRIMARY KEY, sku text NOT NULL, price numeric(12,2), qty int,
                    note text, updated_at timestamptz, certyo_record_hash text,
                    certyo_anchor_status text DEFAULT ''pending'', certyo_verified_at timestamptz)', t);
    IF variant = 'certyo_cdc' THEN
        PERFORM certyo.track(t::regclass);
    ELSIF variant = 'plpgsql' THEN
        EXECUTE format('CREATE TRIGGER capture AFTER INSERT OR UPDATE OR DELETE ON %s
                        FOR EACH ROW EXECUTE FUNCTION bench.plpgsql_capture()', t);
    END IF;
    TRUNCATE certyo.queue;
END
$$;
CREATE SEQUENCE IF NOT EXISTS bench.ids;
