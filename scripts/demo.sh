#!/usr/bin/env bash
# The demo: a throwaway PostgreSQL 15 cluster with certyo_cdc, one tracked table, a few writes,
# and the queue they produced. Runs set-up first; leaves nothing running.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. pg_test/cluster.sh
cluster_start "${DEMO_DIR:-/tmp/certyo-demo}" "${DEMO_PORT:-54330}"

cluster_psql <<'SQL'
\echo '== CREATE EXTENSION certyo_cdc; track public.products'
CREATE EXTENSION certyo_cdc;
CREATE TABLE public.products (
    id         bigint PRIMARY KEY,
    sku        text NOT NULL,
    price      numeric(10, 2),
    tags       text[],
    updated_at timestamptz DEFAULT now()
);
SELECT certyo.track('public.products');
SELECT * FROM certyo.tracked_tables;

\echo '== writes: insert two, update one, delete one, one rolled back, one bookkeeping write-back'
INSERT INTO products (id, sku, price, tags) VALUES (42, 'A-1', 9.50, '{new}'), (43, 'B-2', 120.00, NULL);
UPDATE products SET price = 8.75 WHERE id = 42;
DELETE FROM products WHERE id = 43;
BEGIN; INSERT INTO products (id, sku) VALUES (44, 'never'); ROLLBACK;
UPDATE products SET certyo_record_hash = 'sha256:written-back-by-the-worker' WHERE id = 42;

\echo '== certyo.queue: one row per committed change, ready to become a Certyo record'
\x on
SELECT id, collection, record_id, operation, payload, source_timestamp, idempotency_key FROM certyo.queue ORDER BY id;
SQL
echo "== demo done: 4 committed changes queued; the rolled-back insert and the write-back queued nothing"
