"""The write-back of Certyo's hash to the source rows, against a real MariaDB and the emulator:
a locked row costs that row a retry, never the source a stall; a write-back that fails is kept
and retried, never lost; and no row ever shows a hash, least of all `anchored`, that is not the
hash of the content it holds (checked against what the emulator accepted). Fixtures in
conftest.py."""
import json
import re
import time
from decimal import Decimal

from harness import wait_for  # pg_test/, on the path by conftest.py
from mariadb import MYSQL


def untrue_rows(shop, emulator, table="products"):
    """Rows whose bookkeeping claims what is not so: a hash that is not the hash Certyo gave for
    the row's current content, or `anchored` without a hash. Rows are read before the emulator's
    records, so a hash written back in between is already in them."""
    rows = shop.sql(f"SELECT id, name, price, COALESCE(certyo_record_hash, ''), COALESCE(certyo_anchor_status, '') "
                    f"FROM {table} ORDER BY id")
    payload_of = {r["recordHash"]: r["recordPayload"] for r in emulator.records() if r["database"] == shop.name}
    bad = []
    for id_, name, price, held, status in rows:
        if not held:
            if status == "anchored":
                bad.append((id_, "anchored without a hash"))
            continue
        payload = payload_of.get(held)
        content = {"id": int(id_), "name": name, "price": Decimal(price)}
        if payload is None or {k: (Decimal(str(payload[k])) if k == "price" else payload[k]) for k in content} != content:
            bad.append((id_, status, held, payload, content))
    return bad


class Watch:
    """Checks `untrue_rows` at every poll of a wait and keeps what it found."""

    def __init__(self, shop, emulator):
        self.shop, self.emulator, self.found = shop, emulator, []
        self.check = lambda: untrue_rows(shop, emulator)

    def until(self, condition, timeout=30):
        def poll():
            bad = self.check()
            if bad and not self.found:
                self.found = bad
            return condition()
        return wait_for(poll, timeout=timeout, every=0.1)


def written_back(shop, ids, table="products"):
    """Each of `ids` holds the receipt of its record's newest change."""
    id_list = ", ".join(str(i) for i in ids)
    rows = shop.sql(f"SELECT t.id, COALESCE(t.certyo_record_hash, ''), COALESCE(q.record_hash, '-') FROM {table} t "
                    f"JOIN certyo_queue q ON q.id = (SELECT MAX(m.id) FROM certyo_queue m WHERE m.collection = "
                    f"'{shop.name}.{table}' AND m.record_id = CAST(t.id AS CHAR)) WHERE t.id IN ({id_list})")
    return len(rows) == len(ids) and all(held == receipt for _, held, receipt in rows)


def anchored(shop, ids, table="products"):
    id_list = ", ".join(str(i) for i in ids)
    return written_back(shop, ids, table) and shop.value(
        f"SELECT COUNT(*) FROM {table} WHERE id IN ({id_list}) AND certyo_anchor_status = 'anchored'") == str(len(ids))


def test_a_locked_row_costs_that_row_a_retry_not_the_source_a_stall(shop, emulator, relay, session):
    ids = range(1, 22)
    shop.sql("INSERT INTO products (id, name, price) VALUES " + ", ".join(f"({i}, 'p{i}', 1)" for i in ids))
    r = relay().start()
    assert wait_for(lambda: anchored(shop, ids), timeout=30), shop.queue()
    r.stop()
    # A new version of the 21 rows; an application holds one of them (SELECT ... FOR UPDATE)
    # while the relay delivers the batch.
    shop.sql("UPDATE products SET price = 2")
    app = session()
    app.run("SELECT id FROM products WHERE id = 5 FOR UPDATE")
    r = relay().start()
    watch = Watch(shop, emulator)
    others = [i for i in ids if i != 5]
    assert watch.until(lambda: shop.drained() and written_back(shop, others), timeout=15), shop.queue()
    # Changes committed meanwhile are delivered and written back on time, not after the lock.
    shop.sql("INSERT INTO products (id, name, price) VALUES " + ", ".join(f"({i}, 'n{i}', 3)" for i in range(101, 112)))
    committed = time.time()
    assert watch.until(lambda: shop.drained() and written_back(shop, range(101, 112)), timeout=20)
    assert time.time() - committed < 5, "the locked row held up later changes"
    # The locked row is not lost: it is recorded as not written back, and status says so.
    assert shop.value("SELECT COUNT(*) FROM certyo_queue WHERE record_id = '5' AND write_back_at IS NOT NULL") == "1"
    status = json.loads(r.command("status", "--json").stdout)
    assert status["not_written_back"] == 1 and "locked" in status["write_back_error"], status
    assert not written_back(shop, [5])
    app.commit()
    # After the release it is written back, and everything ends anchored.
    assert watch.until(lambda: written_back(shop, [5]), timeout=15), shop.queue()
    assert watch.until(lambda: anchored(shop, list(ids) + list(range(101, 112))), timeout=30), shop.queue()
    assert watch.found == []
    status = json.loads(r.command("status", "--json").stdout)
    assert status["not_written_back"] == 0, status
    r.stop()
    assert "ERROR" not in r.output()


def test_a_write_back_never_waits_for_a_lock_an_application_holds(shop, emulator, relay, session):
    # An application's open transaction has changed other rows (its queued changes are not
    # committed) and then waits for a row the relay's write-back has locked. The write-back must
    # not wait for anything of the application's while it holds rows: a wait there is a
    # deadlock, and the server may roll back the application's transaction to end it. So while
    # the application holds its uncommitted changes, every other row is written back on time,
    # without a lock wait.
    ids = range(1, 11)
    shop.sql("INSERT INTO products (id, name, price) VALUES " + ", ".join(f"({i}, 'p{i}', 1)" for i in ids))
    r = relay(verify_min_age="200ms", verify_interval="200ms", poll_interval="50ms").start()
    assert wait_for(lambda: anchored(shop, ids), timeout=30), shop.queue()
    # Of another table (as in the deadlock seen): this test's own statements then meet no lock
    # of the application's on any server.
    make_tags(shop, "utf8mb4_bin")
    app = session()
    app.run("INSERT INTO tags (code, label) VALUES ('open', 'uncommitted')")  # queued, uncommitted
    for round_ in range(1, 4):
        shop.sql(f"UPDATE products SET price = price + 1, name = 'r{round_}'")
        assert wait_for(lambda: written_back(shop, ids), timeout=10), shop.queue()
    app.commit()
    assert wait_for(lambda: anchored(shop, ids) and tags_settled(shop), timeout=30), shop.queue()
    assert "Lock wait timeout" not in r.output() and "Deadlock" not in r.output(), r.output()
    assert shop.value("SELECT COUNT(*) FROM certyo_queue WHERE write_back_error IS NOT NULL") == "0", shop.queue()


def test_a_write_back_that_fails_is_kept_and_retried_never_lost(shop, emulator, relay):
    shop.sql("""CREATE TABLE orders (id INT PRIMARY KEY, name VARCHAR(100), price DECIMAL(10,2),
                                     certyo_record_hash VARCHAR(128), certyo_anchor_status VARCHAR(20) DEFAULT 'pending',
                                     certyo_verified_at DATETIME(6))""")
    shop.track("orders")
    shop.server.sql(f"GRANT SELECT (id, certyo_record_hash), "
                    f"UPDATE (certyo_record_hash, certyo_anchor_status, certyo_verified_at) "
                    f"ON {shop.name}.orders TO 'relay_{shop.name}'@'localhost'")
    # The owner's code refuses the write-back to products (as a trigger, a check or a dropped
    # column would) until told otherwise; orders take theirs.
    shop.sql("CREATE TABLE refuse (refusing INT); INSERT INTO refuse VALUES (1)")
    shop.sql("DELIMITER //\nCREATE TRIGGER products_refuse BEFORE UPDATE ON products FOR EACH ROW "
             "IF NEW.certyo_record_hash IS NOT NULL AND (SELECT refusing FROM refuse) THEN "
             "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'the owner refuses the write-back'; END IF //\nDELIMITER ;")
    ids = range(1, 16)
    # One transaction, one batch: products and orders interleaved.
    shop.sql("START TRANSACTION;" + "".join(f"INSERT INTO products (id, name, price) VALUES ({i}, 'p{i}', 1);"
                                            f"INSERT INTO orders (id, name, price) VALUES ({i}, 'o{i}', 1);" for i in ids)
             + "COMMIT")
    r = relay().start()
    assert wait_for(lambda: shop.drained() and written_back(shop, ids, "orders"), timeout=15), shop.queue()
    assert shop.value("SELECT COUNT(*) FROM products WHERE certyo_record_hash IS NOT NULL") == "0"
    # Kept as not written back, with the reason, and tried again with back-off.
    assert wait_for(lambda: int(shop.value("SELECT MIN(write_back_attempts) FROM certyo_queue "
                                           f"WHERE collection = '{shop.name}.products'")) >= 2, timeout=15)
    assert shop.value("SELECT COUNT(*) FROM certyo_queue WHERE write_back_at IS NOT NULL") == "15"
    status = json.loads(r.command("status", "--json").stdout)
    assert status["not_written_back"] == 15 and "the owner refuses the write-back" in status["write_back_error"], status
    assert untrue_rows(shop, emulator) == [] and untrue_rows(shop, emulator, "orders") == []
    shop.sql("UPDATE refuse SET refusing = 0")
    assert wait_for(lambda: written_back(shop, ids), timeout=15), shop.queue()
    assert wait_for(lambda: anchored(shop, ids) and anchored(shop, ids, "orders"), timeout=30), shop.queue()
    assert untrue_rows(shop, emulator) == [] and untrue_rows(shop, emulator, "orders") == []
    assert shop.value("SELECT COUNT(*) FROM certyo_queue WHERE write_back_at IS NOT NULL") == "0"
    r.stop()
    assert "the owner refuses the write-back" in r.output()


def test_no_row_ever_shows_a_hash_or_anchored_that_is_not_its_contents(shop, emulator, relay, session):
    ids = range(1, 22)
    shop.sql("INSERT INTO products (id, name, price) VALUES " + ", ".join(f"({i}, 'p{i}', 1)" for i in ids))
    r = relay().start()
    watch = Watch(shop, emulator)
    assert watch.until(lambda: anchored(shop, ids), timeout=30), shop.queue()
    r.stop()
    # A new version of every row: its earlier version's hash goes with the change (the
    # before-update trigger), so no row claims to be anchored as it now is.
    shop.sql("UPDATE products SET price = 2")
    assert untrue_rows(shop, emulator) == [], "the update left the earlier version's hash on the rows"
    # It is delivered while an application holds row 5 in a transaction that changes it once
    # more: the relay marks none with an earlier version's hash, and row 5 with its newest.
    app = session()
    app.run("UPDATE products SET name = 'held' WHERE id = 5")
    r = relay().start()
    others = [i for i in ids if i != 5]
    assert watch.until(lambda: anchored(shop, others), timeout=30), shop.queue()
    app.commit()
    assert watch.until(lambda: shop.drained() and anchored(shop, ids), timeout=30), shop.queue()
    assert watch.found == []
    assert shop.value("SELECT name FROM products WHERE id = 5") == "held"
    r.stop()


def test_a_late_write_back_marks_a_row_only_with_the_version_it_holds(shop, emulator, relay, session, mariadb):
    # Triggers made before the generator added the before-update one: the relay alone must keep
    # an older version's hash off a row whose content moved on.
    shop.sql("DROP TRIGGER IF EXISTS certyo_products_bu")
    shop.sql("INSERT INTO products (id, name, price) VALUES (1, 'Tea', 1), (2, 'Jam', 1)")
    app = session()
    app.run("SELECT id FROM products WHERE id = 1 FOR UPDATE")
    r = relay().start()
    assert wait_for(shop.drained, timeout=15), shop.queue()
    first = shop.value("SELECT record_hash FROM certyo_queue WHERE record_id = '1'")

    def at_the_write_back():
        # Waiting for the row (as the relay did before), or past it, to try again later.
        if mariadb.lock_waits():
            return True
        return shop.value("SELECT write_back_attempts FROM certyo_queue WHERE record_id = '1'") not in (None, "0")
    assert wait_for(at_the_write_back, timeout=15, every=0.05)
    # While the write-back of version 1 waits for the row, the application changes it; Certyo
    # takes its time to accept version 2.
    emulator.fault("slow", seconds=4)
    app.run("UPDATE products SET name = 'Green tea' WHERE id = 1")
    app.commit()
    seen = set()

    def settled():
        seen.add(shop.value("SELECT certyo_record_hash FROM products WHERE id = 1"))
        return shop.drained() and anchored(shop, [1, 2])
    assert wait_for(settled, timeout=30, every=0.05), shop.queue()
    assert first not in seen, "the row held version 2 and was marked with version 1's hash"
    assert untrue_rows(shop, emulator) == []
    r.stop()


def test_a_locked_table_costs_that_table_a_retry_not_every_batch_a_wait(shop, emulator, relay, session):
    shop.sql("""CREATE TABLE orders (id INT PRIMARY KEY, name VARCHAR(100), price DECIMAL(10,2),
                                     certyo_record_hash VARCHAR(128), certyo_anchor_status VARCHAR(20) DEFAULT 'pending',
                                     certyo_verified_at DATETIME(6))""")
    shop.track("orders")
    shop.server.sql(f"GRANT SELECT (id, certyo_record_hash), "
                    f"UPDATE (certyo_record_hash, certyo_anchor_status, certyo_verified_at) "
                    f"ON {shop.name}.orders TO 'relay_{shop.name}'@'localhost'")
    shop.sql("START TRANSACTION;" + "".join(f"INSERT INTO products (id, name, price) VALUES ({i}, 'p{i}', 1);"
                                            f"INSERT INTO orders (id, name, price) VALUES ({i}, 'o{i}', 1);"
                                            for i in range(1, 11)) + "COMMIT")
    # Someone holds the whole orders table (a long ALTER or LOCK TABLES: a metadata lock). READ:
    # MySQL's LOCK TABLES ... WRITE also locks what the table's triggers write, the queue, so
    # that nothing could be queued or delivered meanwhile (docs/relay.md).
    app = session()
    app.run("LOCK TABLES orders READ")
    r = relay().start()
    assert wait_for(lambda: shop.drained() and written_back(shop, range(1, 11)), timeout=15), shop.queue()
    # Later changes of products, one commit each, are written back on time: the held table
    # backs off on its own and does not cost each batch a lock wait.
    for i in range(11, 16):
        shop.sql(f"INSERT INTO products (id, name, price) VALUES ({i}, 'p{i}', 1)")
        committed = time.time()
        assert wait_for(lambda: written_back(shop, [i]), timeout=15, every=0.05), shop.queue()
        assert time.time() - committed < 3, f"change {i} waited for the held table"
    status = json.loads(r.command("status", "--json").stdout)
    assert status["not_written_back"] == 10 and "orders" in status["write_back_error"], status
    app.run("UNLOCK TABLES")
    assert wait_for(lambda: anchored(shop, range(1, 11), "orders") and anchored(shop, range(1, 16)), timeout=30), \
        shop.queue()
    assert untrue_rows(shop, emulator) == [] and untrue_rows(shop, emulator, "orders") == []
    r.stop()


def make_tags(shop, collation):
    """A table keyed by text in `collation`, tracked, with the relay's grants."""
    shop.sql(f"""CREATE TABLE tags (code VARCHAR(40) PRIMARY KEY, label VARCHAR(100),
                                   certyo_record_hash VARCHAR(128), certyo_anchor_status VARCHAR(20) DEFAULT 'pending',
                                   certyo_verified_at DATETIME(6))
                 DEFAULT CHARSET utf8mb4 COLLATE {collation}""")
    shop.track("tags")
    shop.server.sql(f"GRANT SELECT (code, certyo_record_hash), "
                    f"UPDATE (certyo_record_hash, certyo_anchor_status, certyo_verified_at) "
                    f"ON {shop.name}.tags TO 'relay_{shop.name}'@'localhost'")


def untrue_tags(shop, emulator):
    """As `untrue_rows`, for `tags`: the hash a row holds must be Certyo's for exactly the row's
    record id and content, byte for byte (the key's case included)."""
    rows = shop.sql("SELECT code, label, COALESCE(certyo_record_hash, ''), COALESCE(certyo_anchor_status, '') "
                    "FROM tags ORDER BY code")
    held_by = {r["recordHash"]: r for r in emulator.records() if r["database"] == shop.name}
    bad = []
    for code, label, held, status in rows:
        if not held:
            if status == "anchored":
                bad.append((code, "anchored without a hash"))
            continue
        record = held_by.get(held)
        if record is None or record["recordId"] != code or record["recordPayload"] != {"code": code, "label": label}:
            bad.append((code, label, status, held, record and (record["recordId"], record["recordPayload"])))
    return bad


def tags_settled(shop):
    """Every tag row holds, anchored, the receipt of the newest change of its own record id."""
    rows = shop.sql(f"SELECT t.code, COALESCE(t.certyo_record_hash, ''), COALESCE(t.certyo_anchor_status, ''), "
                    f"COALESCE(q.record_hash, '-') FROM tags t "
                    f"LEFT JOIN certyo_queue q ON q.id = (SELECT MAX(m.id) FROM certyo_queue m WHERE m.collection = "
                    f"'{shop.name}.tags' AND m.record_id = CAST(t.code AS CHAR CHARACTER SET utf8mb4) COLLATE utf8mb4_bin)")
    return shop.drained() and all(held == receipt and status == "anchored" for _, held, status, receipt in rows)


def test_a_key_changed_only_in_case_never_shows_the_earlier_records_hash(shop, emulator, relay):
    # A text key in a case- and accent-insensitive collation (the default of many applications):
    # 'tea' and 'TEA' are one row to the table, and two records to Certyo (the record id is the
    # key's text). The earlier record's verification comes after the key changed: its receipt
    # must not be written to the row, which now holds the other record.
    make_tags(shop, "utf8mb4_unicode_ci")
    shop.sql("INSERT INTO tags (code, label) VALUES ('tea', 'Tea'), ('jam', 'Jam')")
    r = relay(verify_min_age="3s").start()
    watch = Watch(shop, emulator)
    watch.check = lambda: untrue_tags(shop, emulator)
    assert watch.until(lambda: shop.drained() and shop.value(
        "SELECT COUNT(*) FROM tags WHERE certyo_record_hash IS NOT NULL") == "2", timeout=15), shop.queue()
    shop.sql("UPDATE tags SET code = 'TEA' WHERE code = 'tea'")
    shop.sql("UPDATE tags SET code = 'jàm' WHERE code = 'jam'")
    assert watch.until(lambda: tags_settled(shop), timeout=30), (shop.queue(), untrue_tags(shop, emulator))
    assert watch.found == [], f"a row showed the receipt of a record it no longer holds: {watch.found}"
    assert untrue_tags(shop, emulator) == []
    r.stop()


def test_keys_that_differ_only_in_trailing_spaces_never_share_a_receipt(shop, emulator, relay):
    # 'a' and 'a ' are two rows of a table whose key's collation does not pad (MySQL's default
    # utf8mb4_0900_ai_ci, MariaDB's _nopad_ ones) and two records to Certyo, two record ids that
    # the queue's utf8mb4_bin (which pads) compares equal: each row must hold its own record's
    # receipt, anchored.
    make_tags(shop, "utf8mb4_0900_bin" if MYSQL else "utf8mb4_nopad_bin")
    shop.sql("INSERT INTO tags (code, label) VALUES ('a', 'A')")
    shop.sql("INSERT INTO tags (code, label) VALUES ('a ', 'A-space')")
    r = relay(verify_min_age="1s").start()
    assert wait_for(lambda: shop.drained() and shop.value(
        "SELECT COUNT(*) FROM certyo_queue WHERE write_back_at IS NOT NULL OR anchor_status <> 'anchored'") == "0",
        timeout=30), shop.queue()
    assert untrue_tags(shop, emulator) == [], shop.queue()
    assert shop.value("SELECT COUNT(*) FROM tags WHERE certyo_anchor_status = 'anchored'") == "2", shop.queue()
    r.stop()


def test_writers_and_write_backs_interleaved_never_mark_a_version_a_row_no_longer_holds(shop, emulator, relay,
                                                                                          session, mariadb):
    # Applications change the same rows again and again, some in transactions that hold them a
    # while, some changing a text key's case, while the relay delivers, verifies and writes back.
    # At every look, no row holds a hash (let alone `anchored`) that is not Certyo's for the
    # row's present content; at the end every row holds its newest version, anchored.
    import random
    import threading
    make_tags(shop, "utf8mb4_general_ci")
    ids = range(1, 9)
    codes = [f"k{i}" for i in range(1, 7)]
    shop.sql("INSERT INTO products (id, name, price) VALUES " + ", ".join(f"({i}, 'p{i}', 1)" for i in ids))
    shop.sql("INSERT INTO tags (code, label) VALUES " + ", ".join(f"('{c}', 'v0')" for c in codes))
    log_from = mariadb.log_position()
    r = relay(verify_min_age="200ms", verify_interval="200ms", poll_interval="50ms").start()
    stop = threading.Event()
    errors = []

    def writer(seed):
        rng = random.Random(seed)
        app = session()
        try:
            n = 0
            while not stop.is_set():
                n += 1
                i, code = rng.choice(ids), rng.choice(codes)
                app.run(f"UPDATE products SET price = price + 1, name = 'w{seed}-{n}' WHERE id = {i}")
                flip = "UPPER(code)" if rng.random() < 0.5 else "LOWER(code)"
                app.run(f"UPDATE tags SET code = {flip}, label = 'w{seed}-{n}' WHERE code = '{code}'")
                if rng.random() < 0.3:
                    # Hold the rows a moment: the relay's write-backs meet them locked.
                    deadline = time.time() + rng.uniform(0.05, 0.4)
                    while time.time() < deadline and not stop.is_set():
                        time.sleep(0.02)
                app.run("COMMIT")
                app.run("START TRANSACTION")
                time.sleep(rng.uniform(0, 0.05))
        except Exception as e:  # noqa: BLE001 (reported by the test)
            errors.append(repr(e))
        finally:
            app.run("ROLLBACK")

    writers = [threading.Thread(target=writer, args=(seed,)) for seed in range(3)]
    for w in writers:
        w.start()
    watch = Watch(shop, emulator)
    watch.check = lambda: untrue_rows(shop, emulator) + untrue_tags(shop, emulator)
    written = lambda: int(shop.value("SELECT COUNT(*) FROM certyo_queue WHERE anchor_status = 'anchored'"))  # noqa: E731
    assert watch.until(lambda: written() >= 150, timeout=90), shop.queue()[-20:]
    stop.set()
    for w in writers:
        w.join(timeout=30)
    assert errors == []
    assert watch.until(lambda: anchored(shop, ids) and tags_settled(shop), timeout=60), \
        (watch.check(), watch.found)
    assert watch.found == [], "a row held a hash that is not Certyo's for its content"
    r.stop()
    # No error logged, and the relay took part in no deadlock: it waits for no lock an
    # application holds while it holds rows (a deadlock's victim may be the application's
    # transaction).
    assert not re.search(r"Z\s+ERROR ", r.output()), r.output()[-3000:]
    assert [d for d in mariadb.deadlocks(log_from) if f"relay_{shop.name}" in d] == []
