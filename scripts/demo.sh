#!/usr/bin/env bash
# The demo: a throwaway PostgreSQL 15 cluster with certyo_cdc preloaded, its worker pointed at
# the bundled Certyo emulator (no credentials needed); one tracked table, a few writes, the
# queue they produced, and their delivery. Act 2 (scripts/demo-relay.sh): the same table in
# MariaDB, delivered by certyo-relay. Runs set-up first; leaves nothing running.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p certyo-emulator --quiet
. pg_test/cluster.sh

EMULATOR_PORT=${DEMO_EMULATOR_PORT:-54390}
target/release/certyo-emulator --port "$EMULATOR_PORT" --api-key demo-key --anchor-delay 5 >/dev/null &
EMULATOR_PID=$!
cluster_start "${DEMO_DIR:-/tmp/certyo-demo}" "${DEMO_PORT:-54330}" \
    "shared_preload_libraries = 'certyo_cdc'" \
    "certyo.base_url = 'http://127.0.0.1:$EMULATOR_PORT'" \
    "certyo.api_key = 'demo-key'" \
    "certyo.tenant_id = 'demo-tenant'" \
    "certyo.verify_min_age = '2s'" \
    "certyo.verify_interval = '1s'"
trap 'cluster_stop "$CLUSTER_DIR"; kill $EMULATOR_PID 2>/dev/null' EXIT

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

\echo '== writes: insert two, update one, delete one, one rolled back'
BEGIN;
INSERT INTO products (id, sku, price, tags) VALUES (42, 'A-1', 9.50, '{new}'), (43, 'B-2', 120.00, NULL);
UPDATE products SET price = 8.75 WHERE id = 42;
DELETE FROM products WHERE id = 43;
\echo '== certyo.queue inside the writing transaction: one row per change, nothing sent before COMMIT'
SELECT id, record_id, operation, payload FROM certyo.queue ORDER BY id;
COMMIT;
BEGIN; INSERT INTO products (id, sku) VALUES (44, 'never'); ROLLBACK;
SELECT pg_sleep(1.5);

\echo '== delivered: receipts kept by the worker (woken by the commit, not by a poll)'
SELECT id, record_id, operation, record_hash, replayed, accepted_at - queued_at AS commit_to_accepted
  FROM certyo.receipt ORDER BY id;
\echo '== the source row: nothing written back yet (NULL until Certyo anchors the version; the receipt holds the hash)'
SELECT id, sku, price, certyo_record_hash, certyo_anchor_status FROM products;
SELECT count(*) AS queued_again FROM certyo.queue;
\echo '== verification: the emulator anchors 5 s after acceptance; the worker verifies after 2 s, then every second'
\echo '== once anchored: hash, status and time written back in one update (without re-queuing the row)'
SELECT pg_sleep(6);
SELECT id, sku, certyo_record_hash, certyo_anchor_status, certyo_verified_at FROM products;
\echo '== the history of record 42: every version sent, with its anchor'
SELECT id, operation, state, anchor_status, polygon_tx_hash FROM certyo.history('products', '42');
\echo '== the status per table, and the tamper audit: a row changed behind the trigger is found'
SELECT "table", queued, dead_letters, awaiting_anchor, anchored, mismatched, last_delivery_at FROM certyo.status;
ALTER TABLE products DISABLE TRIGGER certyo_capture;
UPDATE products SET price = 0.01 WHERE id = 42;
ALTER TABLE products ENABLE TRIGGER certyo_capture;
SELECT * FROM certyo.audit('products');
\echo '== the worker'
\x on
SELECT * FROM certyo.worker_status();
SQL
echo "== the emulator's counters"
curl -s "http://127.0.0.1:$EMULATOR_PORT/_emulator/stats"; echo
echo "== act 1 done: 4 committed changes delivered once each; the rolled-back insert was never queued"

echo
echo "== act 2: MySQL/MariaDB, delivered by certyo-relay"
EMULATOR_PORT=$EMULATOR_PORT scripts/demo-relay.sh
echo "== the emulator's counters"
curl -s "http://127.0.0.1:$EMULATOR_PORT/_emulator/stats"; echo
