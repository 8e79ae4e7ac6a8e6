#!/usr/bin/env bash
# End-to-end capture checks that need real commits and real connections: a rolled-back
# transaction, a login role without rights on schema certyo, dump and restore, DROP EXTENSION.
# Assumes the extension is installed (scripts/setup.sh). Prints "N passed, M failed".
set -uo pipefail
cd "$(dirname "$0")/.."
. pg_test/cluster.sh
cluster_start /tmp/certyo-e2e-capture 54331

. pg_test/check.sh
q() { cluster_psql -At -c "$1" 2>&1; }

q "CREATE EXTENSION certyo_cdc;
   CREATE TABLE products (id int PRIMARY KEY, sku text, price numeric(10,2));
   SELECT certyo.track('products');" >/dev/null

check "CREATE EXTENSION works without preloading, and the status says how to deliver" \
    "$(q "SELECT state FROM certyo.worker_status()")" "not delivering"
check "loading the library outside preloading defines the settings (and does not fail)" \
    "$(q "LOAD 'certyo_cdc'; SHOW certyo.batch_size")" "1000"

q "BEGIN; INSERT INTO products VALUES (1, 'rolled back', 1); ROLLBACK;" >/dev/null
check "a rolled-back transaction queues nothing" "$(q 'SELECT count(*) FROM certyo.queue')" "0"

q "INSERT INTO products VALUES (1, 'A', 1)" >/dev/null
check "a committed insert is queued once" "$(q 'SELECT operation || record_id FROM certyo.queue')" "insert1"

q "CREATE ROLE clerk LOGIN; GRANT SELECT, INSERT, UPDATE, DELETE ON products TO clerk;" >/dev/null
check "a login role without rights on certyo can write a tracked table" \
    "$(CLUSTER_USER=clerk cluster_psql -At -c "UPDATE products SET price = 2 WHERE id = 1" 2>&1)" ""
check "its change is queued" "$(q "SELECT operation FROM certyo.queue ORDER BY id DESC LIMIT 1")" "update"
check "it cannot read the queue" \
    "$(CLUSTER_USER=clerk cluster_psql -At -c 'SELECT payload FROM certyo.queue' 2>&1 | head -1)" \
    "ERROR:  permission denied for table queue"
check "it cannot untrack the table" \
    "$(CLUSTER_USER=clerk cluster_psql -At -c "SELECT certyo.untrack('products')" 2>&1 | head -1)" \
    "ERROR:  certyo_cdc: must be owner of table public.products to change its tracking"

# Dump and restore: the options travel with the trigger, the queue, receipts and backfills
# with the extension.
q "SELECT certyo.backfill('products')" >/dev/null
sudo -u postgres "$PG_BIN/pg_dump" -h "$CLUSTER_DIR" -p "$CLUSTER_PORT" -Fc -f "$CLUSTER_DIR/dump" postgres
q "CREATE DATABASE restored" >/dev/null
sudo -u postgres "$PG_BIN/pg_restore" -h "$CLUSTER_DIR" -p "$CLUSTER_PORT" -d restored "$CLUSTER_DIR/dump" 2>&1 | grep -v "^$" || true
rq() { CLUSTER_DB=restored cluster_psql -At -c "$1" 2>&1; }
check "restore keeps the queued changes" "$(rq 'SELECT count(*) FROM certyo.queue')" "2"
check "restore keeps the tracking" "$(rq 'SELECT "table"::text || record_id_columns::text FROM certyo.tracked_tables')" "products{id}"
rq "INSERT INTO products VALUES (2, 'B', 3)" >/dev/null
check "the restored database captures with queue ids past the restored ones" \
    "$(rq "SELECT id > ALL (SELECT id FROM certyo.queue WHERE record_id = '1') FROM certyo.queue WHERE record_id = '2'")" "t"
check "restore keeps backfill requests, and new ones get fresh ids" \
    "$(rq "SELECT certyo.backfill('products'); SELECT string_agg(id::text, ',' ORDER BY id) FROM certyo.backfills" | tail -1)" "1,2"

q "DROP EXTENSION certyo_cdc" >/dev/null
check "DROP EXTENSION removes the capture triggers" "$(q "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'products'::regclass")" "0"
check "the table stays writable after DROP EXTENSION" "$(q "INSERT INTO products VALUES (9, 'after', 1)")" ""

check_summary
