"""The MySQL/MariaDB companion (sql/mysql/certyo_queue.sql) on its own, against the real server of
conftest.py's session (MariaDB, or MySQL in its Debian root: scripts/pg-root.sh mysql): the
script, the trigger generator, what the triggers queue, and the upgrade of a first version's queue.
The tests share one database with the companion and a tracked `products` table, put back as it
was before each test (`shop`); the upgrade test has a database of its own.

Run:  python3 -m pytest -q relay/tests/test_companion.py
"""
import calendar
import itertools
import json
import subprocess
import time
from pathlib import Path

import pytest

from mariadb import CLIENT, MYSQL, SOCKET

REPO = Path(__file__).resolve().parents[2]
SCRIPT = (REPO / "sql/mysql/certyo_queue.sql").read_text()
TZINFO = "mysql_tzinfo_to_sql" if MYSQL else "mariadb-tzinfo-to-sql"
_databases = itertools.count(1)


class Db:
    """A database of the session's server, reached by the command-line client as root."""

    def __init__(self, server, name):
        self.server, self.name = server, name
        server.sql(f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")

    def run(self, statements):
        """What the client prints for `statements` (standard output, then errors), as a shell's
        `$(client ... 2>&1)` would give it."""
        done = subprocess.run([CLIENT, "-S", str(SOCKET), "-u", "root", "-N", "-r", "-B", self.name],
                              input=statements, capture_output=True, text=True)
        return (done.stdout + done.stderr).rstrip("\n")

    def track(self, table, exclude="NULL", timestamp="NULL", before=""):
        """Create `table`'s triggers with the generator; `before` runs first in its session."""
        ddl = self.run(f"{before}CALL certyo_trigger_ddl('{self.name}', '{table}', {exclude}, {timestamp})")
        assert self.run(ddl) == "", ddl

    def last(self, column):
        return self.run(f"SELECT {column} FROM certyo_queue ORDER BY id DESC LIMIT 1")

    def create_queue(self):
        """`SHOW CREATE TABLE certyo_queue`, without its AUTO_INCREMENT counter."""
        text = self.run("SHOW CREATE TABLE certyo_queue")
        return " ".join(part for part in text.split(" ") if not part.startswith("AUTO_INCREMENT="))


def as_stored(payload):
    """A payload as the queue's JSON column gives it back: MariaDB keeps the text the trigger wrote,
    MySQL its own normal form (keys ordered by length, then bytes, numbers as written): the same
    object, and the same record hash (Certyo hashes canonical JSON)."""
    if not MYSQL:
        return payload

    class Number:
        def __init__(self, raw):
            self.raw = raw

    def text(v):
        if isinstance(v, dict):
            pairs = sorted(v.items(), key=lambda kv: (len(kv[0].encode()), kv[0].encode()))
            return "{" + ", ".join(text(k) + ": " + text(x) for k, x in pairs) + "}"
        if isinstance(v, list):
            return "[" + ", ".join(map(text, v)) + "]"
        return v.raw if isinstance(v, Number) else json.dumps(v, ensure_ascii=False)

    return text(json.loads(payload, parse_float=Number, parse_int=Number))


PRODUCTS = """CREATE TABLE products (
    id INT PRIMARY KEY, sku VARCHAR(32) NOT NULL, name VARCHAR(100), price DECIMAL(10,2), ratio DOUBLE,
    tags JSON, made DATE, updated_at TIMESTAMP(6) NULL, pic VARBINARY(8), stock INT,
    certyo_record_hash VARCHAR(128) NULL, certyo_anchor_status VARCHAR(20) DEFAULT 'pending',
    certyo_verified_at DATETIME(6) NULL)"""
# Written at +02:00: the timestamp is queued in UTC.
FIRST_ROW = r"""SET time_zone = '+02:00';
    INSERT INTO products VALUES (1, 'A-1', 'Zoë "quoted" \\ back', 9.50, 0.1, '{"b": [1, {"c": null}]}',
                                 '2026-04-14', '2026-04-14 12:30:00.25', x'00ff', NULL, NULL, DEFAULT, NULL)"""


@pytest.fixture(scope="module")
def installed(mariadb):
    """The module's database: the companion's script run in it (its output kept), `products`
    tracked by the generator. A database and the script per test took four times as long as
    the whole shell script these tests replace; `shop` puts this one back as it was instead."""
    db = Db(mariadb, f"companion{next(_databases)}")
    db.script_output = db.run(SCRIPT)
    assert db.run(PRODUCTS) == ""
    db.track("products")
    yield db
    mariadb.sql(f"DROP DATABASE {db.name}")


@pytest.fixture
def shop(installed):
    """The module's database as the companion and `products` left it: nothing queued, no rows,
    no other table (dropped with its triggers); queue ids start again at 1."""
    others = installed.run(f"""SELECT GROUP_CONCAT(CONCAT('`', TABLE_NAME, '`')) FROM information_schema.TABLES
                               WHERE TABLE_SCHEMA = '{installed.name}' AND TABLE_NAME <> 'products'
                                 AND TABLE_NAME NOT LIKE 'certyo\\_%'""")
    drop = f"DROP TABLE {others};" if others != "NULL" else ""
    assert installed.run(f"{drop} TRUNCATE products; TRUNCATE certyo_queue") == ""
    return installed


def test_the_script_runs_without_an_error_or_output(installed):
    assert installed.script_output == ""


def test_no_cleanup_event_the_relay_removes_delivered_rows(installed):
    assert installed.run(f"SELECT COUNT(*) FROM information_schema.EVENTS WHERE EVENT_SCHEMA = '{installed.name}'") == "0"


def test_the_generator_creates_four_triggers(shop):
    assert shop.run("SELECT GROUP_CONCAT(TRIGGER_NAME ORDER BY TRIGGER_NAME) FROM information_schema.TRIGGERS "
                    f"WHERE EVENT_OBJECT_SCHEMA = '{shop.name}' AND EVENT_OBJECT_TABLE = 'products'") == \
        "certyo_products_ad,certyo_products_ai,certyo_products_au,certyo_products_bu"


def test_an_insert_is_queued_with_its_columns_as_json_and_timestamps_in_utc(shop):
    shop.run(FIRST_ROW)
    assert shop.run("SELECT payload FROM certyo_queue") == as_stored(
        r'{"id": 1, "sku": "A-1", "name": "Zoë \"quoted\" \\ back", "price": 9.50, "ratio": 0.1, '
        r'"tags": {"b": [1, {"c": null}]}, "made": "2026-04-14", "updated_at": "2026-04-14T10:30:00.250000", '
        r'"pic": "\\x00ff", "stock": null}')
    assert shop.run("SELECT CONCAT_WS('|', collection, record_id, operation, source_timestamp) FROM certyo_queue") == \
        f"{shop.name}.products|1|insert|2026-04-14 10:30:00.250000", "collection, record id, operation, source timestamp"
    assert shop.run("SELECT idempotency_key = CONCAT((SELECT installation_id FROM certyo_installation), '-', id) "
                    "FROM certyo_queue") == "1", "the idempotency key is the installation and the queue id"
    assert shop.run("""SELECT CONCAT_WS('|', status, attempts, IFNULL(next_attempt_at, '-'), IFNULL(last_attempt_at, '-'),
                              IFNULL(last_status, '-'), IFNULL(last_error, '-'), IFNULL(record_hash, '-'), IFNULL(delivered_at, '-'),
                              IFNULL(anchor_status, '-'), IFNULL(next_verify_at, '-'), IFNULL(verified_at, '-'),
                              IFNULL(polygon_tx_hash, '-'))
                       FROM certyo_queue""") == "pending|0|-|-|-|-|-|-|-|-|-|-", \
        "a new queue row is pending, never tried, not yet anchored"
    assert shop.run("SELECT ABS(TIMESTAMPDIFF(SECOND, queued_at, UTC_TIMESTAMP(6))) < 60 FROM certyo_queue") == "1", \
        "queued_at is UTC, also for a writer in another time zone (+02:00)"


def test_bookkeeping_only_and_no_op_updates_queue_nothing(shop):
    shop.run(FIRST_ROW)
    shop.run("UPDATE products SET certyo_record_hash = 'sha256:ab', certyo_anchor_status = 'anchored', "
             "certyo_verified_at = NOW(6)")
    shop.run("UPDATE products SET price = 9.5, stock = NULL")
    assert shop.run("SELECT COUNT(*) FROM certyo_queue") == "1"
    assert shop.run("SELECT CONCAT_WS('|', certyo_record_hash, certyo_anchor_status, certyo_verified_at IS NOT NULL) "
                    "FROM products") == "sha256:ab|anchored|1", "... and leave the bookkeeping as written"


def test_a_change_of_the_business_columns_resets_the_bookkeeping(shop):
    shop.run(FIRST_ROW)
    shop.run("UPDATE products SET certyo_record_hash = 'sha256:ab', certyo_anchor_status = 'anchored', "
             "certyo_verified_at = NOW(6)")
    shop.run("UPDATE products SET sku = 'a-1'")
    assert shop.run("SELECT CONCAT_WS('|', IFNULL(certyo_record_hash, '-'), certyo_anchor_status, "
                    "IFNULL(certyo_verified_at, '-')) FROM products") == "-|pending|-", \
        "the earlier version's hash is not the row's"
    assert shop.last("CONCAT(operation, ' ', JSON_VALUE(payload, '$.sku'))") == "update a-1", \
        "a change of case is a change, even under a case-insensitive collation"
    shop.run("UPDATE products SET stock = 5")
    assert shop.last("JSON_VALUE(payload, '$.stock')") == "5", "NULL to a value is a change (null-safe comparison)"


def test_a_rolled_back_transaction_queues_nothing(shop):
    shop.run("START TRANSACTION; INSERT INTO products (id, sku) VALUES (2, 'rolled back'); ROLLBACK;")
    assert shop.run("SELECT COUNT(*) FROM certyo_queue") == "0"


def test_a_changed_primary_key_queues_a_delete_and_an_insert_and_a_delete_the_old_row(shop):
    shop.run(FIRST_ROW)
    first = shop.run("SELECT MAX(id) FROM certyo_queue")
    shop.run("UPDATE products SET id = 3 WHERE id = 1")
    assert shop.run(f"SELECT GROUP_CONCAT(CONCAT(operation, ':', record_id) ORDER BY id) FROM certyo_queue "
                    f"WHERE id > {first}") == "delete:1,insert:3"
    shop.run("DELETE FROM products WHERE id = 3")
    assert shop.last("CONCAT(operation, ' ', JSON_VALUE(payload, '$.sku'))") == "delete A-1", "delete queues the old row"
    assert shop.run("SELECT COUNT(DISTINCT idempotency_key) = COUNT(*) AND COUNT(*) = 4 FROM certyo_queue") == "1", \
        "every change has its own idempotency key"


STOCK_LEVELS = """CREATE TABLE `stock levels` (`region` VARCHAR(20), `sku` VARCHAR(20), `qty` INT, `secret` TEXT,
                                              `changed` DATETIME, `ünï` TEXT, PRIMARY KEY (`region`, `sku`))"""


def test_a_composite_key_an_excluded_column_and_a_chosen_timestamp(shop):
    """The generator on a table unlike products: composite key, an excluded column, a chosen
    timestamp column, odd identifiers."""
    shop.run(STOCK_LEVELS)
    shop.track("stock levels", exclude="'secret'", timestamp="'changed'")
    shop.run(r"INSERT INTO `stock levels` VALUES ('EU/West', 'A\\1', 5, 'hidden', '2026-01-02 03:04:05', 'ü')")
    assert shop.last("record_id") == r"EU\/West/A\\1", "a composite record id escapes and joins its parts"
    assert shop.last("CONCAT(payload, ' @ ', source_timestamp)") == as_stored(
        r'{"region": "EU/West", "sku": "A\\1", "qty": 5, "changed": "2026-01-02T03:04:05", "ünï": "ü"}') + \
        " @ 2026-01-02 03:04:05.000000", "excluded columns are not sent; the chosen timestamp is the source timestamp"
    shop.run("UPDATE `stock levels` SET secret = 'changed'")
    assert shop.run("SELECT COUNT(*) FROM certyo_queue") == "1", "an update of only an excluded column queues nothing"


def test_a_table_without_a_primary_key_is_refused_with_a_clear_message(shop):
    out = shop.run(f"CREATE TABLE keyless (a INT); CALL certyo_trigger_ddl('{shop.name}', 'keyless', NULL, NULL)")
    assert [line for line in out.splitlines() if line.startswith("ERROR")] == [
        "ERROR 1644 (45000) at line 1: certyo_trigger_ddl: the table does not exist or has no primary key; "
        "add one (the record id is the primary key)"]


def test_a_datetime_timestamp_column_is_moved_to_utc_and_sent_as_written(shop):
    """A DATETIME is taken as written in the writer's time zone (MySQL stores no zone with it)."""
    shop.run(STOCK_LEVELS)
    shop.track("stock levels", exclude="'secret'", timestamp="'changed'")
    shop.run("SET time_zone = '+02:00'; INSERT INTO `stock levels` VALUES ('EU', 'B', 1, NULL, '2026-01-02 12:00:00', NULL)")
    assert shop.last("CONCAT(JSON_VALUE(payload, '$.changed'), ' @ ', source_timestamp)") == \
        "2026-01-02T12:00:00 @ 2026-01-02 10:00:00.000000"


def test_a_datetime_in_a_named_zone_with_daylight_saving_time(shop):
    """SET timestamp fixes the instant of the change; the zone's tables are loaded here."""
    zone = subprocess.run([TZINFO, "/usr/share/zoneinfo/Europe/Berlin", "Europe/Berlin"], capture_output=True,
                          text=True, check=True).stdout
    subprocess.run([CLIENT, "-S", str(SOCKET), "-u", "root", "mysql"], input=zone, capture_output=True, text=True)
    shop.run(STOCK_LEVELS)
    shop.track("stock levels", exclude="'secret'", timestamp="'changed'")

    def berlin(instant, region, value):
        epoch = calendar.timegm(time.strptime(instant, "%Y-%m-%d %H:%M:%S"))
        shop.run(f"SET time_zone = 'Europe/Berlin'; SET timestamp = {epoch}; "
                 f"INSERT INTO `stock levels` VALUES ('{region}', 'C', 1, NULL, {value}, NULL)")
        return shop.last("CONCAT(JSON_VALUE(payload, '$.changed'), ' @ ', source_timestamp)")

    assert berlin("2026-07-01 10:00:00", "summer", "NOW()") == "2026-07-01T12:00:00 @ 2026-07-01 10:00:00.000000", \
        "a datetime written as NOW() in a named zone (summer time) is the UTC instant of the change"
    assert berlin("2026-10-25 01:30:00", "repeated", "NOW()") == "2026-10-25T02:30:00 @ 2026-10-25 01:30:00.000000", \
        "... also in the hour repeated when clocks go back (02:30 CET, not 02:30 CEST)"
    assert berlin("2026-07-01 10:00:00", "winter", "'2026-01-15 12:00:00'") == \
        "2026-01-15T12:00:00 @ 2026-01-15 10:00:00.000000", \
        "a datetime from the other side of a DST change is moved by the offset of the change (documented limit)"


def test_a_string_column_named_like_another_tables_json_check_stays_a_string(shop):
    """MariaDB names a column CHECK after its column, so another table's check `tags` (products.tags
    is JSON) must not make this LONGTEXT json. A TIME renders as text with its own digits."""
    shop.run("CREATE TABLE notes (id INT PRIMARY KEY, tags LONGTEXT CHECK (tags <> ''), at TIME(3))")
    shop.track("notes")
    shop.run("""INSERT INTO notes VALUES (1, '{"a": 1}', '12:00:00.5')""")
    assert shop.last("payload") == as_stored(r'{"id": 1, "tags": "{\"a\": 1}", "at": "12:00:00.500"}')


def test_a_wide_table_is_captured_whole_whatever_group_concat_max_len(shop):
    """MySQL's group_concat_max_len is 1024 by default: the generator must not depend on it."""
    columns = "".join(f", `column number {i:02d}` INT DEFAULT {i}" for i in range(1, 61))
    shop.run(f"CREATE TABLE wide (id INT PRIMARY KEY {columns})")
    shop.track("wide", before="SET SESSION group_concat_max_len = 1024; ")
    shop.run("INSERT INTO wide (id) VALUES (1)")
    assert shop.last("""CONCAT(JSON_LENGTH(payload), ' ', JSON_VALUE(payload, '$."column number 60"'))""") == "61 60"
    out = shop.run(f"SET SESSION group_concat_max_len = 1024; CALL certyo_trigger_ddl('{shop.name}', 'wide', NULL, NULL); "
                   "SELECT @@session.group_concat_max_len")
    assert out.splitlines()[-1] == "1024", "the session's group_concat_max_len is left as it was"


# The first version of the script's queue and cleanup event (as in commit a28993b), with a row
# delivered by an earlier reader and a pending one.
FIRST_VERSION = """
    CREATE TABLE certyo_queue (
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
    VALUES ('shop.products', '1', 'insert', '{"id": 1}', '2026-01-01', 'x-1', 'sha256:aa', UTC_TIMESTAMP(6) - INTERVAL 1 HOUR),
           ('shop.products', '2', 'insert', '{"id": 2}', '2026-01-01', 'x-2', NULL, NULL)"""


@pytest.fixture
def first_version(mariadb):
    """A database set up by the first version of the script."""
    db = Db(mariadb, f"upgrade{next(_databases)}")
    assert db.run(FIRST_VERSION) == ""
    yield db
    mariadb.sql(f"DROP DATABASE {db.name}")


def test_the_script_upgrades_a_first_versions_queue(first_version, installed):
    old = first_version
    assert old.run(SCRIPT) == "", "the script upgrades an existing queue without an error or output"
    assert old.run(f"""SELECT GROUP_CONCAT(COLUMN_NAME ORDER BY ORDINAL_POSITION) FROM information_schema.COLUMNS
                       WHERE TABLE_SCHEMA = '{old.name}' AND TABLE_NAME = 'certyo_queue'""") == \
        "id,collection,record_id,operation,payload,source_timestamp,idempotency_key,queued_at,status,attempts," \
        "next_attempt_at,last_attempt_at,last_status,last_error,record_hash,delivered_at,anchor_status,next_verify_at," \
        "verified_at,verify_attempts,polygon_tx_hash,reported_hash,write_back_at,write_back_attempts,write_back_error", \
        "the upgrade adds the relay's columns, in the order of a new queue"
    assert old.run("""SELECT GROUP_CONCAT(CONCAT_WS(':', record_id, status, attempts, IFNULL(anchor_status, '-'),
                                                     next_verify_at BETWEEN UTC_TIMESTAMP() - INTERVAL 1 MINUTE AND UTC_TIMESTAMP(6))
                                           ORDER BY id)
                      FROM certyo_queue""") == "1:delivered:0:pending:1,2:pending:0:-", \
        "a row delivered before the upgrade is delivered with its anchoring to verify; the other is pending"
    assert old.run("SELECT GROUP_CONCAT(CONCAT(record_id, ':', write_back_at IS NOT NULL) ORDER BY id) FROM certyo_queue") == \
        "1:1,2:0", "the upgrade has each record's newest delivered change written back once more (an earlier relay could lose it)"
    assert old.run(f"""SELECT CONCAT((SELECT GROUP_CONCAT(DISTINCT INDEX_NAME ORDER BY INDEX_NAME) FROM information_schema.STATISTICS
                                      WHERE TABLE_SCHEMA = '{old.name}' AND TABLE_NAME = 'certyo_queue'), ' events:',
                                     (SELECT COUNT(*) FROM information_schema.EVENTS WHERE EVENT_SCHEMA = '{old.name}'))""") == \
        "certyo_queue_record,certyo_queue_take,certyo_queue_verify,certyo_queue_write_back,PRIMARY events:0", \
        "the upgrade replaces the index on delivered_at and drops the cleanup event"
    assert old.create_queue() == installed.create_queue(), "an upgraded queue has the definition of a new one"
    before = (old.create_queue(), old.run("CHECKSUM TABLE certyo_queue"))
    assert old.run(SCRIPT) == "" and (old.create_queue(), old.run("CHECKSUM TABLE certyo_queue")) == before, \
        "a second run changes nothing"
    # A trigger made by the first version leaves queued_at to its default.
    old.run("SET time_zone = '+02:00'; INSERT INTO certyo_queue (collection, record_id, operation, payload, source_timestamp) "
            "VALUES ('shop.products', '3', 'insert', '{}', UTC_TIMESTAMP(6))")
    assert old.run("SELECT CONCAT(status, ' ', ABS(TIMESTAMPDIFF(SECOND, queued_at, UTC_TIMESTAMP(6))) < 60) "
                   "FROM certyo_queue WHERE record_id = '3'") == "pending 1", \
        "queued_at defaults to UTC after the upgrade (an old trigger, a writer at +02:00)"
