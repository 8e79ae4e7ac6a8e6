#!/usr/bin/env bash
# The demo's second act: the same products table in MariaDB, captured by the companion's
# triggers (sql/mysql/certyo_queue.sql) and delivered by certyo-relay to the emulator at
# http://127.0.0.1:$EMULATOR_PORT (started by scripts/demo.sh). Leaves nothing running.
set -euo pipefail
cd "$(dirname "$0")/.."
EMULATOR_PORT=${EMULATOR_PORT:?scripts/demo.sh starts the emulator and sets EMULATOR_PORT}
DIR=${DEMO_MARIADB_DIR:-/tmp/certyo-demo-mariadb}
SOCK=$DIR/mysqld.sock
cargo build --release -p certyo-relay --quiet

stop() {
    [ -n "${RELAY_PID:-}" ] && kill "$RELAY_PID" 2>/dev/null && wait "$RELAY_PID" 2>/dev/null
    [ -f "$DIR/mysqld.pid" ] && kill "$(cat "$DIR/mysqld.pid")" 2>/dev/null
    return 0
}
stop; rm -rf "$DIR"; mkdir -p "$DIR"; chown mysql "$DIR"
mariadb-install-db --datadir="$DIR/data" --user=mysql --skip-test-db --auth-root-authentication-method=socket >/dev/null 2>&1
TZ=UTC mariadbd --datadir="$DIR/data" --socket="$SOCK" --skip-networking --user=mysql --pid-file="$DIR/mysqld.pid" \
    --log-error="$DIR/error.log" &
trap stop EXIT
for _ in $(seq 100); do mariadb-admin -S "$SOCK" ping >/dev/null 2>&1 && break; sleep 0.2; done
db() { mariadb -S "$SOCK" --table "$@" shop; }

echo "== MariaDB: the companion, and the products table tracked by its triggers"
mariadb -S "$SOCK" -e "CREATE DATABASE shop"
db < sql/mysql/certyo_queue.sql
db -e "CREATE TABLE products (
           id BIGINT PRIMARY KEY, sku VARCHAR(32) NOT NULL, price DECIMAL(10,2), updated_at DATETIME(6),
           certyo_record_hash VARCHAR(128) NULL, certyo_anchor_status VARCHAR(20) DEFAULT 'pending',
           certyo_verified_at DATETIME(6) NULL)"
mariadb -S "$SOCK" -N -r -e "CALL certyo_trigger_ddl('shop', 'products', NULL, NULL)" shop | db
db -e "CREATE USER relay@localhost IDENTIFIED BY 'relay-demo';
       GRANT SELECT, UPDATE, DELETE ON shop.certyo_queue TO relay@localhost;
       GRANT SELECT (id, certyo_record_hash), UPDATE (certyo_record_hash, certyo_anchor_status, certyo_verified_at)
          ON shop.products TO relay@localhost;"

echo "== writes: insert two, update one, delete one, one rolled back"
db -e "START TRANSACTION;
       INSERT INTO products (id, sku, price) VALUES (42, 'A-1', 9.50), (43, 'B-2', 120.00);
       UPDATE products SET price = 8.75 WHERE id = 42;
       DELETE FROM products WHERE id = 43;
       COMMIT;
       START TRANSACTION; INSERT INTO products (id, sku) VALUES (44, 'never'); ROLLBACK;"
db -e "SELECT id, record_id, operation, payload, status FROM certyo_queue ORDER BY id"

cat > "$DIR/relay.toml" <<EOF
[certyo]
base_url = "http://127.0.0.1:$EMULATOR_PORT"
tenant_id = "demo-tenant"
verify_min_age = "2s"
verify_interval = "1s"

[[source]]
name = "shop"
url = "mysql://relay:relay-demo@localhost/shop?socket=$SOCK"
EOF
export CERTYO_API_KEY=demo-key
echo "== certyo-relay check"
target/release/certyo-relay --config "$DIR/relay.toml" check
echo "== certyo-relay run"
target/release/certyo-relay --config "$DIR/relay.toml" run 2> "$DIR/relay.log" &
RELAY_PID=$!
for _ in $(seq 50); do
    [ "$(mariadb -S "$SOCK" -N -e "SELECT COUNT(*) FROM certyo_queue WHERE status = 'pending'" shop)" = 0 ] && break
    sleep 0.2
done
echo "== its log: one line per batch"
sed 's/^/   /' "$DIR/relay.log"
echo "== delivered: the receipts on the queue rows, and the hash on the source row (queued nothing)"
db -e "SELECT id, record_id, operation, status, record_hash, delivered_at FROM certyo_queue ORDER BY id;
       SELECT id, sku, price, certyo_record_hash, certyo_anchor_status FROM products"
echo "== verification: anchored 5 s after acceptance, verified after 2 s, then every second"
sleep 6
db -e "SELECT id, record_id, anchor_status, polygon_tx_hash FROM certyo_queue ORDER BY id;
       SELECT id, sku, certyo_anchor_status, certyo_verified_at FROM products"
echo "== certyo-relay status"
target/release/certyo-relay --config "$DIR/relay.toml" status
echo "== act 2 done: 4 committed MariaDB changes delivered once each by certyo-relay"
