#!/usr/bin/env bash
# The MySQL/MariaDB companion (sql/mysql/) against a real MariaDB server from Debian's packages,
# started here on a socket under /tmp and stopped on exit. Prints "N passed, M failed".
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${CERTYO_MARIADB_SH_DIR:-/tmp/certyo-mariadb}
SOCK=$DIR/mysqld.sock

stop() { [ -f "$DIR/mysqld.pid" ] && kill "$(cat "$DIR/mysqld.pid")" 2>/dev/null; sleep 1; }
stop; rm -rf "$DIR"; mkdir -p "$DIR"; chown mysql "$DIR"
mariadb-install-db --datadir="$DIR/data" --user=mysql --skip-test-db --auth-root-authentication-method=socket >/dev/null 2>&1
# The server's zone is UTC whatever the machine's, so that SYSTEM means UTC in the checks below.
TZ=UTC mariadbd --datadir="$DIR/data" --socket="$SOCK" --skip-networking --user=mysql --pid-file="$DIR/mysqld.pid" \
    --log-error="$DIR/error.log" 2>>"$DIR/error.log" &
trap stop EXIT
for _ in $(seq 50); do mariadb-admin -S "$SOCK" ping >/dev/null 2>&1 && break; sleep 0.2; done

db() { mariadb -S "$SOCK" -N -r -B "$@" shop; }
q() { db -e "$1" 2>&1; }
. pg_test/check.sh

mariadb -S "$SOCK" -e "CREATE DATABASE shop CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci"
check "the script runs without an error or output" "$(db < sql/mysql/certyo_queue.sql 2>&1)" ""
q "CREATE TABLE products (
       id INT PRIMARY KEY, sku VARCHAR(32) NOT NULL, name VARCHAR(100), price DECIMAL(10,2), ratio DOUBLE,
       tags JSON, made DATE, updated_at TIMESTAMP(6) NULL, pic VARBINARY(8), stock INT,
       certyo_record_hash VARCHAR(128) NULL, certyo_anchor_status VARCHAR(20) DEFAULT 'pending',
       certyo_verified_at DATETIME(6) NULL)"
db -e "CALL certyo_trigger_ddl('shop', 'products', NULL, NULL)" > "$DIR/products_triggers.sql"
db < "$DIR/products_triggers.sql"
check "the generator creates four triggers" \
    "$(q "SELECT GROUP_CONCAT(TRIGGER_NAME ORDER BY TRIGGER_NAME) FROM information_schema.TRIGGERS WHERE EVENT_OBJECT_TABLE = 'products'")" \
    "certyo_products_ad,certyo_products_ai,certyo_products_au,certyo_products_bu"

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
check "a new queue row is pending, never tried, not yet anchored" \
    "$(q "SELECT CONCAT_WS('|', status, attempts, IFNULL(next_attempt_at, '-'), IFNULL(last_attempt_at, '-'),
                          IFNULL(last_status, '-'), IFNULL(last_error, '-'), IFNULL(record_hash, '-'), IFNULL(delivered_at, '-'),
                          IFNULL(anchor_status, '-'), IFNULL(next_verify_at, '-'), IFNULL(verified_at, '-'), IFNULL(polygon_tx_hash, '-'))
          FROM certyo_queue")" "pending|0|-|-|-|-|-|-|-|-|-|-"
check "queued_at is UTC, also for a writer in another time zone (+02:00)" \
    "$(q "SELECT ABS(TIMESTAMPDIFF(SECOND, queued_at, UTC_TIMESTAMP(6))) < 60 FROM certyo_queue")" "1"

q "UPDATE products SET certyo_record_hash = 'sha256:ab', certyo_anchor_status = 'anchored', certyo_verified_at = NOW(6)"
q "UPDATE products SET price = 9.5, stock = NULL"
check "bookkeeping-only and no-op updates queue nothing" "$(q "SELECT COUNT(*) FROM certyo_queue")" "1"
check "... and leave the bookkeeping as written" \
    "$(q "SELECT CONCAT_WS('|', certyo_record_hash, certyo_anchor_status, certyo_verified_at IS NOT NULL) FROM products")" "sha256:ab|anchored|1"

q "UPDATE products SET sku = 'a-1'"
check "a change of the business columns resets the bookkeeping: the earlier version's hash is not the row's" \
    "$(q "SELECT CONCAT_WS('|', IFNULL(certyo_record_hash, '-'), certyo_anchor_status, IFNULL(certyo_verified_at, '-')) FROM products")" "-|pending|-"
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

# A DATETIME timestamp column is taken as written in the writer's time zone: the source timestamp
# is moved to UTC, the payload keeps the value as written (MySQL stores no zone with it).
q "SET time_zone = '+02:00'; INSERT INTO \`stock levels\` VALUES ('EU', 'B', 1, NULL, '2026-01-02 12:00:00', NULL)"
check "a datetime timestamp column: source timestamp in UTC, payload as written (writer at +02:00)" \
    "$(q "SELECT CONCAT(JSON_VALUE(payload, '$.changed'), ' @ ', source_timestamp) FROM certyo_queue ORDER BY id DESC LIMIT 1")" \
    "2026-01-02T12:00:00 @ 2026-01-02 10:00:00.000000"

# A named zone with daylight saving time; SET timestamp fixes the instant of the change.
mariadb-tzinfo-to-sql /usr/share/zoneinfo/Europe/Berlin Europe/Berlin 2>/dev/null | mariadb -S "$SOCK" mysql
berlin() { q "SET time_zone = 'Europe/Berlin'; SET timestamp = $(date -u -d "$1" +%s);
              INSERT INTO \`stock levels\` VALUES ('$2', 'C', 1, NULL, $3, NULL)"; }
last_ts() { q "SELECT CONCAT(JSON_VALUE(payload, '$.changed'), ' @ ', source_timestamp) FROM certyo_queue ORDER BY id DESC LIMIT 1"; }
berlin '2026-07-01 10:00:00' summer 'NOW()'
check "a datetime written as NOW() in a named zone (summer time) is the UTC instant of the change" \
    "$(last_ts)" "2026-07-01T12:00:00 @ 2026-07-01 10:00:00.000000"
berlin '2026-10-25 01:30:00' repeated 'NOW()'
check "... also in the hour repeated when clocks go back (02:30 CET, not 02:30 CEST)" \
    "$(last_ts)" "2026-10-25T02:30:00 @ 2026-10-25 01:30:00.000000"
berlin '2026-07-01 10:00:00' winter "'2026-01-15 12:00:00'"
check "a datetime from the other side of a DST change is moved by the offset of the change (documented limit)" \
    "$(last_ts)" "2026-01-15T12:00:00 @ 2026-01-15 10:00:00.000000"

# MariaDB names a column CHECK after its column, so another table's check `tags` (products.tags
# is JSON) must not make this LONGTEXT json. A TIME renders as text with its own digits.
q "CREATE TABLE notes (id INT PRIMARY KEY, tags LONGTEXT CHECK (tags <> ''), at TIME(3))"
db -e "CALL certyo_trigger_ddl('shop', 'notes', NULL, NULL)" | db
q "INSERT INTO notes VALUES (1, '{\"a\": 1}', '12:00:00.5')"
check "a string column with another table's json check of the same name stays a string; TIME as text" \
    "$(q "SELECT payload FROM certyo_queue ORDER BY id DESC LIMIT 1")" '{"id": 1, "tags": "{\"a\": 1}", "at": "12:00:00.500"}'

# MySQL's group_concat_max_len is 1024 by default: the generator must not depend on it.
cols=$(for i in $(seq 60); do printf ', `column number %02d` INT DEFAULT %d' "$i" "$i"; done)
q "CREATE TABLE wide (id INT PRIMARY KEY $cols)"
db -e "SET SESSION group_concat_max_len = 1024; CALL certyo_trigger_ddl('shop', 'wide', NULL, NULL)" | db
q "INSERT INTO wide (id) VALUES (1)"
check "a wide table (61 columns) with group_concat_max_len = 1024 is captured whole" \
    "$(q "SELECT CONCAT(JSON_LENGTH(payload), ' ', JSON_VALUE(payload, '$.\"column number 60\"')) FROM certyo_queue ORDER BY id DESC LIMIT 1")" "61 60"
check "... and the session's group_concat_max_len is left as it was" \
    "$(q "SET SESSION group_concat_max_len = 1024; CALL certyo_trigger_ddl('shop', 'wide', NULL, NULL); SELECT @@session.group_concat_max_len" | tail -n 1)" "1024"

check "no cleanup event: the relay removes delivered rows" \
    "$(q "SELECT COUNT(*) FROM information_schema.EVENTS WHERE EVENT_SCHEMA = 'shop'")" "0"

# Upgrade: a database set up by the first version of the script (its queue and cleanup event,
# as in commit a28993b), with a row delivered by an earlier reader and a pending one.
udb() { mariadb -S "$SOCK" -N -r -B "$@" upgrade; }
uq() { udb -e "$1" 2>&1; }
mariadb -S "$SOCK" -e "CREATE DATABASE upgrade CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci"
uq "CREATE TABLE certyo_queue (
        id               BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
        collection       VARCHAR(192)  NOT NULL,
        record_id        VARCHAR(768)  NOT NULL,
        operation        ENUM('insert', 'update', 'delete', 'upsert') NOT NULL,
        payload          JSON          NOT NULL,
        source_timestamp DATETIME(6)   NOT NULL,
        idempotency_key  VARCHAR(80)   NULL,
        queued_at        DATETIME(6)   NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
        record_hash      VARCHAR(100)  NULL,
        delivered_at     DATETIME(6)   NULL,
        KEY certyo_queue_pending (delivered_at, id)
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
    CREATE EVENT certyo_queue_cleanup ON SCHEDULE EVERY 10 MINUTE
        DO DELETE FROM certyo_queue
            WHERE delivered_at IS NOT NULL AND delivered_at < UTC_TIMESTAMP(6) - INTERVAL 24 HOUR LIMIT 10000;
    INSERT INTO certyo_queue (collection, record_id, operation, payload, source_timestamp, idempotency_key, record_hash, delivered_at)
    VALUES ('shop.products', '1', 'insert', '{\"id\": 1}', '2026-01-01', 'x-1', 'sha256:aa', '2026-01-01 00:00:01'),
           ('shop.products', '2', 'insert', '{\"id\": 2}', '2026-01-01', 'x-2', NULL, NULL)"
check "the script upgrades an existing queue without an error or output" "$(udb < sql/mysql/certyo_queue.sql 2>&1)" ""
check "the upgrade adds the relay's columns, in the order of a new queue" \
    "$(uq "SELECT GROUP_CONCAT(COLUMN_NAME ORDER BY ORDINAL_POSITION) FROM information_schema.COLUMNS
           WHERE TABLE_SCHEMA = 'upgrade' AND TABLE_NAME = 'certyo_queue'")" \
    "id,collection,record_id,operation,payload,source_timestamp,idempotency_key,queued_at,status,attempts,next_attempt_at,last_attempt_at,last_status,last_error,record_hash,delivered_at,anchor_status,next_verify_at,verified_at,verify_attempts,polygon_tx_hash,reported_hash,write_back_at,write_back_attempts,write_back_error"
check "a row delivered before the upgrade is delivered with its anchoring to verify; the other is pending" \
    "$(uq "SELECT GROUP_CONCAT(CONCAT_WS(':', record_id, status, attempts, IFNULL(anchor_status, '-'),
                                          next_verify_at BETWEEN UTC_TIMESTAMP() - INTERVAL 1 MINUTE AND UTC_TIMESTAMP(6)) ORDER BY id)
           FROM certyo_queue")" "1:delivered:0:pending:1,2:pending:0:-"
check "the upgrade has each record's newest delivered change written back once more (an earlier relay could lose it)" \
    "$(uq "SELECT GROUP_CONCAT(CONCAT(record_id, ':', write_back_at IS NOT NULL) ORDER BY id) FROM certyo_queue")" "1:1,2:0"
check "the upgrade replaces the index on delivered_at and drops the cleanup event" \
    "$(uq "SELECT CONCAT((SELECT GROUP_CONCAT(DISTINCT INDEX_NAME ORDER BY INDEX_NAME) FROM information_schema.STATISTICS
                          WHERE TABLE_SCHEMA = 'upgrade' AND TABLE_NAME = 'certyo_queue'), ' events:',
                         (SELECT COUNT(*) FROM information_schema.EVENTS WHERE EVENT_SCHEMA = 'upgrade'))")" \
    "certyo_queue_record,certyo_queue_take,certyo_queue_verify,certyo_queue_write_back,PRIMARY events:0"
create_table() { mariadb -S "$SOCK" -N -r -B -e "SHOW CREATE TABLE certyo_queue" "$1" | sed 's/ AUTO_INCREMENT=[0-9]*//'; }
check "an upgraded queue has the definition of a new one" "$(create_table upgrade)" "$(create_table shop)"
before="$(create_table upgrade; uq "CHECKSUM TABLE certyo_queue")"
check "a second run changes nothing" "$(udb < sql/mysql/certyo_queue.sql 2>&1; create_table upgrade; uq "CHECKSUM TABLE certyo_queue")" "$before"
# A trigger made by the first version leaves queued_at to its default.
uq "SET time_zone = '+02:00';
    INSERT INTO certyo_queue (collection, record_id, operation, payload, source_timestamp) VALUES ('shop.products', '3', 'insert', '{}', UTC_TIMESTAMP(6))"
check "queued_at defaults to UTC after the upgrade (an old trigger, a writer at +02:00)" \
    "$(uq "SELECT CONCAT(status, ' ', ABS(TIMESTAMPDIFF(SECOND, queued_at, UTC_TIMESTAMP(6))) < 60) FROM certyo_queue WHERE record_id = '3'")" "pending 1"

check_summary
