#!/usr/bin/env bash
# The MySQL/MariaDB companion (sql/mysql/) against a real MariaDB server from Debian's packages,
# started here on a socket under /tmp and stopped on exit. Prints "N passed, M failed".
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=/tmp/certyo-mariadb
SOCK=$DIR/mysqld.sock

stop() { [ -f "$DIR/mysqld.pid" ] && kill "$(cat "$DIR/mysqld.pid")" 2>/dev/null; sleep 1; }
stop; rm -rf "$DIR"; mkdir -p "$DIR"; chown mysql "$DIR"
mariadb-install-db --datadir="$DIR/data" --user=mysql --skip-test-db --auth-root-authentication-method=socket >/dev/null 2>&1
mariadbd --datadir="$DIR/data" --socket="$SOCK" --skip-networking --user=mysql --pid-file="$DIR/mysqld.pid" \
    --log-error="$DIR/error.log" --event-scheduler=ON &
trap stop EXIT
for _ in $(seq 50); do mariadb-admin -S "$SOCK" ping >/dev/null 2>&1 && break; sleep 0.2; done

db() { mariadb -S "$SOCK" -N -r -B "$@" shop; }
q() { db -e "$1" 2>&1; }
. pg_test/check.sh

mariadb -S "$SOCK" -e "CREATE DATABASE shop CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci"
db < sql/mysql/certyo_queue.sql
q "CREATE TABLE products (
       id INT PRIMARY KEY, sku VARCHAR(32) NOT NULL, name VARCHAR(100), price DECIMAL(10,2), ratio DOUBLE,
       tags JSON, made DATE, updated_at TIMESTAMP(6) NULL, pic VARBINARY(8), stock INT,
       certyo_record_hash VARCHAR(128) NULL, certyo_anchor_status VARCHAR(20) DEFAULT 'pending',
       certyo_verified_at DATETIME(6) NULL)"
db -e "CALL certyo_trigger_ddl('shop', 'products', NULL, NULL)" > "$DIR/products_triggers.sql"
db < "$DIR/products_triggers.sql"
check "the generator creates three triggers" \
    "$(q "SELECT GROUP_CONCAT(TRIGGER_NAME ORDER BY TRIGGER_NAME) FROM information_schema.TRIGGERS WHERE EVENT_OBJECT_TABLE = 'products'")" \
    "certyo_products_ad,certyo_products_ai,certyo_products_au"

q "SET time_zone = '+02:00';
   INSERT INTO products VALUES (1, 'A-1', 'Zoë \"quoted\" \\\\ back', 9.50, 0.1, '{\"b\": [1, {\"c\": null}]}',
                                '2026-04-14', '2026-04-14 12:30:00.25', x'00ff', NULL, NULL, DEFAULT, NULL)"
check "insert queues the business columns as JSON, timestamps in UTC" \
    "$(q "SELECT payload FROM certyo_queue")" \
    '{"id": 1, "sku": "A-1", "name": "Zoë \"quoted\" \\ back", "price": 9.50, "ratio": 0.1, "tags": {"b": [1, {"c": null}]}, "made": "2026-04-14", "updated_at": "2026-04-14T10:30:00.250000", "pic": "\\x00ff", "stock": null}'
check "insert queues collection, record id, operation, source timestamp" \
    "$(q "SELECT CONCAT_WS('|', collection, record_id, operation, source_timestamp) FROM certyo_queue")" \
    "shop.products|1|insert|2026-04-14 10:30:00.250000"
check "the idempotency key is the installation and the queue id" \
    "$(q "SELECT idempotency_key = CONCAT((SELECT installation_id FROM certyo_installation), '-', id) FROM certyo_queue")" "1"

q "UPDATE products SET certyo_record_hash = 'sha256:ab', certyo_anchor_status = 'anchored', certyo_verified_at = NOW(6)"
q "UPDATE products SET price = 9.5, stock = NULL"
check "bookkeeping-only and no-op updates queue nothing" "$(q "SELECT COUNT(*) FROM certyo_queue")" "1"

q "UPDATE products SET sku = 'a-1'"
check "a change of case is a change, even under a case-insensitive collation" \
    "$(q "SELECT CONCAT(operation, ' ', JSON_VALUE(payload, '$.sku')) FROM certyo_queue ORDER BY id DESC LIMIT 1")" "update a-1"
q "UPDATE products SET stock = 5"
check "NULL to a value is a change (null-safe comparison)" \
    "$(q "SELECT JSON_VALUE(payload, '$.stock') FROM certyo_queue ORDER BY id DESC LIMIT 1")" "5"

q "START TRANSACTION; INSERT INTO products (id, sku) VALUES (2, 'rolled back'); ROLLBACK;"
check "a rolled-back transaction queues nothing" "$(q "SELECT COUNT(*) FROM certyo_queue WHERE record_id = '2'")" "0"

q "UPDATE products SET id = 3 WHERE id = 1"
check "changing the primary key queues a delete of the old id and an insert of the new" \
    "$(q "SELECT GROUP_CONCAT(CONCAT(operation, ':', record_id) ORDER BY id) FROM certyo_queue WHERE id > 3")" "delete:1,insert:3"
q "DELETE FROM products WHERE id = 3"
check "delete queues the old row" \
    "$(q "SELECT CONCAT(operation, ' ', JSON_VALUE(payload, '$.sku')) FROM certyo_queue ORDER BY id DESC LIMIT 1")" "delete a-1"
check "every change has its own idempotency key" \
    "$(q "SELECT COUNT(DISTINCT idempotency_key) = COUNT(*) AND COUNT(*) = 6 FROM certyo_queue")" "1"

# The generator on a second, different table: composite key, an excluded column, a chosen
# timestamp column, odd identifiers.
q 'CREATE TABLE `stock levels` (`region` VARCHAR(20), `sku` VARCHAR(20), `qty` INT, `secret` TEXT,
                                `changed` DATETIME, `ünï` TEXT, PRIMARY KEY (`region`, `sku`))'
db -e "CALL certyo_trigger_ddl('shop', 'stock levels', 'secret', 'changed')" | db
q "INSERT INTO \`stock levels\` VALUES ('EU/West', 'A\\\\1', 5, 'hidden', '2026-01-02 03:04:05', 'ü')"
check "a composite record id escapes and joins its parts" \
    "$(q "SELECT record_id FROM certyo_queue ORDER BY id DESC LIMIT 1")" 'EU\/West/A\\1'
check "excluded columns are not sent; the chosen timestamp is the source timestamp" \
    "$(q "SELECT CONCAT(payload, ' @ ', source_timestamp) FROM certyo_queue ORDER BY id DESC LIMIT 1")" \
    '{"region": "EU/West", "sku": "A\\1", "qty": 5, "changed": "2026-01-02T03:04:05", "ünï": "ü"} @ 2026-01-02 03:04:05.000000'
q 'UPDATE `stock levels` SET secret = '"'"'changed'"'"
check "an update of only an excluded column queues nothing" "$(q "SELECT COUNT(*) FROM certyo_queue")" "7"

check "a table without a primary key is refused with a clear message" \
    "$(q "CREATE TABLE keyless (a INT); CALL certyo_trigger_ddl('shop', 'keyless', NULL, NULL)" | grep '^ERROR')" \
    "ERROR 1644 (45000) at line 1: certyo_trigger_ddl: the table does not exist or has no primary key; add one (the record id is the primary key)"

# The cleanup event removes delivered rows older than 24 hours, and nothing else.
q "UPDATE certyo_queue SET delivered_at = UTC_TIMESTAMP(6) - INTERVAL 25 HOUR, record_hash = 'h' WHERE id <= 2;
   UPDATE certyo_queue SET delivered_at = UTC_TIMESTAMP(6) WHERE id = 3;
   ALTER EVENT certyo_queue_cleanup ON SCHEDULE EVERY 1 SECOND"
for _ in $(seq 30); do [ "$(q "SELECT COUNT(*) FROM certyo_queue WHERE id <= 2")" = 0 ] && break; sleep 0.2; done
# (id 4 went to the rolled-back insert: AUTO_INCREMENT values are not given back.)
check "the cleanup event removes delivered rows older than 24 h only" \
    "$(q "SELECT GROUP_CONCAT(id ORDER BY id) FROM certyo_queue")" "3,5,6,7,8"

check_summary
