"""The record id of a MySQL/MariaDB row (its primary key as text, written by the companion's
triggers and computed again by the relay to find the row it marks): one text per row, the same in
every session, another for every other row. Keys for which that cannot hold are refused by
certyo_trigger_ddl, each saying why; a TIMESTAMP key is one record id in every time zone; a key
changed in case only is another record; a key too long for the queue is refused with a reason,
never cut. Fixtures in conftest.py."""
import re

import pytest
from harness import wait_for  # pg_test/, on the path by conftest.py


def make(shop, name, columns, key, key_columns, sql_mode=None, exclude="NULL"):
    """A tracked table `name` with `columns` and `label`, primary key `key`, the bookkeeping
    columns and the relay's grants; its triggers created under `sql_mode` when given."""
    shop.sql(f"""CREATE TABLE {name} ({columns}, label VARCHAR(100),
                     certyo_record_hash VARCHAR(128), certyo_anchor_status VARCHAR(20) DEFAULT 'pending',
                     certyo_verified_at DATETIME(6), PRIMARY KEY ({key}))""")
    ddl = shop.server.sql(f"CALL certyo_trigger_ddl('{shop.name}', '{name}', {exclude}, NULL)", shop.name)
    prefix = f"SET SESSION sql_mode = '{sql_mode}';\n" if sql_mode is not None else ""
    shop.server.sql(prefix + "\n".join(row[0] for row in ddl), shop.name)
    shop.server.sql(f"GRANT SELECT ({', '.join(key_columns)}, certyo_record_hash), "
                    f"UPDATE (certyo_record_hash, certyo_anchor_status, certyo_verified_at) "
                    f"ON {shop.name}.{name} TO 'relay_{shop.name}'@'localhost'")


def queued(shop):
    return [tuple(r) for r in shop.sql("SELECT record_id, operation FROM certyo_queue ORDER BY id")]


@pytest.mark.parametrize("columns, key, exclude, refusal", [
    ("k FLOAT NOT NULL", "k", "NULL", "a FLOAT/DOUBLE key rounds as text (rows could share a record id); use an exact type: k"),
    ("k DOUBLE NOT NULL", "k", "NULL", "a FLOAT/DOUBLE key rounds as text"),
    ("k BINARY(16) NOT NULL", "k", "NULL", "binary keys are not supported (bytes are no text; a UUID as CHAR(36) is): k binary"),
    ("a INT NOT NULL, k VARBINARY(16) NOT NULL", "a, k", "NULL", "binary keys are not supported"),
    ("k VARCHAR(10) CHARACTER SET cp932 NOT NULL", "k", "NULL", "a key in this character set is not supported; convert it to utf8mb4: k cp932"),
    ("k VARCHAR(10) NOT NULL", "k", "'label,k'", "p_exclude names a key column (the record id is always captured): k"),
], ids=["float", "double", "binary", "composite-varbinary", "cp932", "excluded-key"])
def test_keys_whose_text_is_not_one_record_id_per_row_are_refused(shop, columns, key, exclude, refusal):
    shop.sql(f"CREATE TABLE t ({columns}, label VARCHAR(100), PRIMARY KEY ({key}))")
    with pytest.raises(AssertionError, match=re.escape(refusal)):
        shop.sql(f"CALL certyo_trigger_ddl('{shop.name}', 't', {exclude}, NULL)")


@pytest.mark.parametrize("action", ["ON DELETE CASCADE", "ON UPDATE CASCADE", "ON DELETE SET NULL"])
def test_a_table_that_foreign_key_cascades_change_is_refused(shop, action):
    # MySQL and MariaDB fire no trigger for a row a cascade changes: its change would be lost.
    shop.sql("CREATE TABLE orders (id INT PRIMARY KEY)")
    shop.sql(f"""CREATE TABLE items (id INT PRIMARY KEY, order_id INT NULL, label VARCHAR(100),
                 CONSTRAINT items_order FOREIGN KEY (order_id) REFERENCES orders (id) {action})""")
    with pytest.raises(AssertionError, match=f"a cascade fires no trigger; make the foreign key RESTRICT: items_order {action}"):
        shop.sql(f"CALL certyo_trigger_ddl('{shop.name}', 'items', NULL, NULL)")
    # The referenced table is not changed by the cascade: it is tracked as any other.
    shop.track("orders")
    shop.sql("ALTER TABLE items DROP FOREIGN KEY items_order")
    shop.sql("ALTER TABLE items ADD CONSTRAINT items_order FOREIGN KEY (order_id) REFERENCES orders (id) ON DELETE RESTRICT")
    shop.track("items")


def test_a_timestamp_column_that_is_none_is_refused_with_a_reason(shop):
    shop.sql("CREATE TABLE t (id INT PRIMARY KEY, label VARCHAR(100))")
    with pytest.raises(AssertionError, match=re.escape("p_timestamp_column is no DATETIME/TIMESTAMP column of the table")):
        shop.sql(f"CALL certyo_trigger_ddl('{shop.name}', 't', NULL, 'label')")


def test_a_timestamp_key_is_one_record_id_in_every_time_zone(shop):
    make(shop, "ev", "sensor INT NOT NULL, at TIMESTAMP(3) NOT NULL DEFAULT '2000-01-01 00:00:00'", "sensor, at", ["sensor", "at"])
    shop.sql("SET time_zone = '+02:00'; INSERT INTO ev (sensor, at, label) VALUES (1, '2026-01-01 10:00:00.250', 'A')")
    shop.sql("SET time_zone = '-05:00'; UPDATE ev SET label = 'A2'")
    shop.sql("SET time_zone = '+00:00'; DELETE FROM ev")
    assert queued(shop) == [("1/2026-01-01 08:00:00.250", "insert"), ("1/2026-01-01 08:00:00.250", "update"),
                            ("1/2026-01-01 08:00:00.250", "delete")]


def test_a_timestamp_key_changed_in_another_time_zone_marks_its_own_row(shop, emulator, relay):
    make(shop, "ev", "sensor INT NOT NULL, at TIMESTAMP NOT NULL DEFAULT '2000-01-01 00:00:00'", "sensor, at", ["sensor", "at"])
    shop.sql("SET time_zone = '+00:00'; INSERT INTO ev (sensor, at, label) VALUES "
             "(1, '2026-01-01 08:00:00', 'A'), (1, '2026-01-01 10:00:00', 'B')")
    r = relay(verify_min_age="1s").start()
    settled = "SELECT COUNT(*) FROM certyo_queue WHERE status = 'pending' OR write_back_at IS NOT NULL OR anchor_status = 'pending'"
    assert wait_for(lambda: shop.value(settled) == "0", timeout=30), shop.queue()
    # An application in Central Europe changes row A (08:00 UTC is 10:00 there).
    shop.sql("SET time_zone = '+02:00'; UPDATE ev SET label = 'A2' WHERE sensor = 1 AND at = '2026-01-01 10:00:00'")
    assert wait_for(lambda: shop.value(settled) == "0" and shop.value(
        "SELECT COUNT(*) FROM ev WHERE certyo_anchor_status = 'anchored'") == "2", timeout=30), shop.queue()
    by_hash = {x["recordHash"]: x for x in emulator.records() if x["database"] == shop.name}
    rows = shop.sql("SET time_zone = '+00:00'; SELECT at, label, certyo_record_hash FROM ev ORDER BY at")
    assert [(at, label, by_hash[held]["recordId"], by_hash[held]["recordPayload"]["label"]) for at, label, held in rows] == [
        ("2026-01-01 08:00:00", "A2", "1/2026-01-01 08:00:00", "A2"),
        ("2026-01-01 10:00:00", "B", "1/2026-01-01 10:00:00", "B")]
    r.stop()


def test_a_key_changed_in_case_only_is_another_record(shop):
    # One key to a case-insensitive collation, two records to Certyo: the delete of the one is
    # queued, then the insert of the other (never an update that leaves 'tea' alive at Certyo).
    make(shop, "tags", "code VARCHAR(40) CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci NOT NULL", "code", ["code"])
    shop.sql("INSERT INTO tags (code, label) VALUES ('tea', 'Tea')")
    shop.sql("UPDATE tags SET code = 'TEA'")
    shop.sql("UPDATE tags SET code = 'TEA '")
    shop.sql("UPDATE tags SET label = 'Tea!'")
    assert queued(shop) == [("tea", "insert"), ("tea", "delete"), ("TEA", "insert"), ("TEA", "delete"),
                            ("TEA ", "insert"), ("TEA ", "update")]


@pytest.mark.parametrize("sql_mode", [None, ""], ids=["default", "not-strict"])
def test_a_record_id_longer_than_the_queue_holds_is_refused_with_a_reason(shop, sql_mode):
    # Two latin1 columns of 500: their record id may be 1,001 characters (twice, escaped), more
    # than certyo_queue.record_id holds. Cut, two rows would share one record id.
    make(shop, "docs", "a VARCHAR(500) CHARACTER SET latin1 NOT NULL, b VARCHAR(500) CHARACTER SET latin1 NOT NULL",
         "a, b", ["a", "b"], sql_mode=sql_mode)
    shop.sql("INSERT INTO docs (a, b, label) VALUES ('short', 'key', 'fits')")
    for b in ("y" * 400, "y" * 400 + "z"):
        with pytest.raises(AssertionError, match="longer than 768 characters"):
            shop.sql(f"SET SESSION sql_mode = ''; INSERT INTO docs (a, b, label) VALUES ('{'x' * 400}', '{b}', 'long')")
    assert queued(shop) == [("short/key", "insert")]
    assert shop.value("SELECT COUNT(*) FROM docs") == "1"


@pytest.mark.parametrize("sql_mode", [None, "NO_BACKSLASH_ESCAPES"], ids=["default", "no-backslash-escapes"])
def test_composite_keys_are_escaped_alike_whatever_the_sql_mode_of_the_triggers(shop, emulator, relay, sql_mode):
    make(shop, "pairs", "a VARCHAR(20) NOT NULL, b VARCHAR(20) NOT NULL", "a, b", ["a", "b"], sql_mode=sql_mode)
    keys = [("x/y", "z"), ("x", "y/z"), ("back\\\\slash", "b"), ("plain", "key")]
    values = ", ".join(f"('{a}', '{b}', 'L{i}')" for i, (a, b) in enumerate(keys))
    shop.sql(f"SET SESSION sql_mode = ''; INSERT INTO pairs (a, b, label) VALUES {values}")
    assert [r for r, _ in queued(shop)] == ["x\\/y/z", "x/y\\/z", "back\\\\slash/b", "plain/key"]
    r = relay(verify_min_age="1s").start()
    assert wait_for(lambda: shop.value("SELECT COUNT(*) FROM pairs WHERE certyo_anchor_status = 'anchored'") == "4",
                    timeout=30), (shop.queue(), shop.sql("SELECT a, b, certyo_anchor_status FROM pairs"))
    r.stop()
