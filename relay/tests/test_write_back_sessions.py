"""The write-back on a session of its own, beside the delivery session: the newest change of a
record is the one the row is marked with whatever the order of its changes in the queue's
indexes (long composite text keys sharing a prefix, statuses that sort the newest first), and a
write-back session that is killed is opened again, with nothing left due. Fixtures in
conftest.py."""
import json
import signal

from harness import wait_for  # pg_test/, on the path by conftest.py

PREFIX = "x" * 150  # longer than the queue index's 128-character prefix of record_id


def make_notes(shop):
    shop.sql("""CREATE TABLE notes (
                    a VARCHAR(200) NOT NULL, b VARCHAR(200) NOT NULL, body VARCHAR(100),
                    certyo_record_hash VARCHAR(128) NULL, certyo_anchor_status VARCHAR(20) DEFAULT 'pending',
                    certyo_verified_at DATETIME(6) NULL, PRIMARY KEY (a, b))""")
    shop.track("notes")
    shop.server.sql(f"GRANT SELECT, UPDATE ON {shop.name}.notes TO 'relay_{shop.name}'@'localhost'")


def make_items(shop, exclude="NULL"):
    """A tracked table with a column the server sets on every UPDATE (`ON UPDATE CURRENT_TIMESTAMP`)."""
    shop.sql("""CREATE TABLE items (
                    id INT PRIMARY KEY, name VARCHAR(50),
                    updated_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
                    certyo_record_hash VARCHAR(128) NULL, certyo_anchor_status VARCHAR(20) DEFAULT 'pending',
                    certyo_verified_at DATETIME(6) NULL)""")
    shop.track("items", exclude)


def notes(shop):
    """b -> (body, hash, status) of every note."""
    return {b: (body, h, s) for b, body, h, s in shop.sql(
        "SELECT b, body, COALESCE(certyo_record_hash, ''), COALESCE(certyo_anchor_status, '') FROM notes")}


def newest_receipts(shop):
    """b -> the receipt (record_hash) of the note's newest queued change, '' if it has none."""
    return {rid.rsplit("/", 1)[1]: h for rid, h in shop.sql(
        f"SELECT q.record_id, COALESCE(q.record_hash, '') FROM certyo_queue q "
        f"WHERE q.collection = '{shop.name}.notes' AND q.id = (SELECT MAX(m.id) FROM certyo_queue m "
        f"WHERE m.collection = q.collection AND m.record_id = q.record_id)")}


def test_a_row_is_marked_with_its_newest_change_whatever_order_the_queue_index_holds_them_in(shop, emulator,
                                                                                               relay):
    # Two notes whose record ids share their first 150 characters (the queue's record index
    # holds 128 of them), each changed several times; once all is anchored, one note changes
    # again while Certyo cannot be reached, so its newest change stays pending (the index sorts
    # pending before delivered: newest first), and a write-back of its earlier change comes due.
    # The row holds a version with no receipt: no hash, pending; never the earlier change's.
    make_notes(shop)
    shop.sql(f"INSERT INTO notes (a, b, body) VALUES ('{PREFIX}', 'k1', 'v1'), ('{PREFIX}', 'k2', 'v1')")
    for v in ("v2", "v3", "v4"):
        shop.sql(f"UPDATE notes SET body = '{v}'")
    r = relay().start()

    def settled():
        rows, receipts = notes(shop), newest_receipts(shop)
        return shop.drained() and len(rows) == 2 and all(
            h == receipts.get(b) and s == "anchored" for b, (_, h, s) in rows.items())
    assert wait_for(settled, timeout=30), (notes(shop), shop.queue())
    r.stop()
    earlier = shop.value(f"SELECT MAX(id) FROM certyo_queue WHERE record_id = '{PREFIX}/k1'")
    shop.sql(f"UPDATE notes SET body = 'v5' WHERE b = 'k1'")
    emulator.stop()
    emulator.process.wait(timeout=30)
    shop.sql(f"UPDATE certyo_queue SET write_back_at = UTC_TIMESTAMP(6) WHERE id = {earlier}")
    r = relay().start()
    assert wait_for(lambda: shop.value(f"SELECT COUNT(*) FROM certyo_queue WHERE write_back_at IS NOT NULL") == "0",
                    timeout=30), shop.queue()
    body, held, status = notes(shop)["k1"]
    assert (body, held, status) == ("v5", "", "pending"), \
        f"the row holds v5, which has no receipt, but shows {held!r} {status!r}: {shop.queue()}"
    assert notes(shop)["k2"][2] == "anchored"
    r.stop()


def test_a_killed_write_back_session_is_opened_again_and_nothing_stays_due(shop, emulator, relay, mariadb):
    # Every session of the relay is killed by the server (an operator's KILL, a failover's
    # proxy) while rows are being written back: later changes are still written back, and the
    # queue ends with no write-back due.
    ids = range(1, 41)
    shop.sql("INSERT INTO products (id, name, price) VALUES " + ", ".join(f"({i}, 'p{i}', 1)" for i in ids))
    r = relay().start()
    user = f"relay_{shop.name}"

    def kill_relay_sessions():
        for (conn_id,) in mariadb.sql(f"SELECT ID FROM information_schema.PROCESSLIST WHERE USER = '{user}'"):
            mariadb.sql(f"KILL CONNECTION {conn_id}", check=False)

    for round_ in range(3):
        shop.sql(f"UPDATE products SET price = {round_ + 2}")
        kill_relay_sessions()
    shop.sql("UPDATE products SET price = 9")

    def done():
        rows = shop.sql("SELECT COUNT(*) FROM products WHERE certyo_anchor_status = 'anchored' AND price = 9 "
                        "AND certyo_record_hash = (SELECT q.record_hash FROM certyo_queue q WHERE q.id = "
                        "(SELECT MAX(m.id) FROM certyo_queue m WHERE m.record_id = CAST(products.id AS CHAR)))")
        return shop.drained() and rows[0][0] == str(len(ids)) and shop.value(
            "SELECT COUNT(*) FROM certyo_queue WHERE write_back_at IS NOT NULL") == "0"
    assert wait_for(done, timeout=60), shop.queue()
    status = json.loads(r.command("status", "--json").stdout)
    assert status["not_written_back"] == 0, status
    r.stop()


def test_a_write_back_to_a_row_with_an_on_update_timestamp_changes_nothing_of_its_content(shop, emulator, relay):
    # `updated_at ... ON UPDATE CURRENT_TIMESTAMP` (the default of many applications' schemas)
    # is set by the server on any UPDATE that changes a value, the write-back's too: the row
    # would then hold content Certyo never saw under the hash just written, and its change be
    # captured again, and again, at every write-back.
    make_items(shop)
    shop.server.sql(f"GRANT SELECT, UPDATE ON {shop.name}.items TO 'relay_{shop.name}'@'localhost'")
    shop.sql("INSERT INTO items (id, name) VALUES (1, 'a'), (2, 'b')")
    before = shop.sql("SELECT id, updated_at FROM items ORDER BY id")
    r = relay().start()
    assert wait_for(lambda: shop.value("SELECT COUNT(*) FROM items WHERE certyo_anchor_status = 'anchored'") == "2",
                    timeout=30), (shop.sql("SELECT * FROM items"), shop.queue())
    changes = lambda: shop.value(f"SELECT COUNT(*) FROM certyo_queue WHERE collection = '{shop.name}.items'")
    assert shop.sql("SELECT id, updated_at FROM items ORDER BY id") == before
    assert changes() == "2", shop.queue()
    # An application's change still moves the timestamp, and is captured (once).
    shop.sql("UPDATE items SET name = 'c' WHERE id = 1")
    assert shop.sql("SELECT updated_at FROM items WHERE id = 1") != before[0][1:]
    assert wait_for(lambda: shop.value("SELECT COUNT(*) FROM items WHERE certyo_anchor_status = 'anchored'") == "2",
                    timeout=30), (shop.sql("SELECT * FROM items"), shop.queue())
    payload = json.loads(shop.value(f"SELECT CAST(payload AS CHAR) FROM certyo_queue WHERE id = "
                                    f"(SELECT MAX(id) FROM certyo_queue WHERE collection = '{shop.name}.items')"))
    assert payload["name"] == "c" and payload["updated_at"] == shop.value(
        "SELECT DATE_FORMAT(updated_at, '%Y-%m-%dT%H:%i:%s.%f') FROM items WHERE id = 1"), payload
    assert changes() == "3", shop.queue()
    r.stop()


def test_sigterm_ends_the_relay_promptly_while_a_table_makes_its_write_back_wait(shop, emulator, relay, session):
    # An ALTER TABLE waits for an application's open transaction on the table: the write-back,
    # queued behind it for the table's metadata lock, waits (`write_back_lock_wait`), then backs
    # off. SIGTERM still ends the relay at once, and the write-back stays due for the next relay.
    import subprocess
    import time
    from mariadb import CLIENT, SOCKET
    reader = session()
    reader.run("SELECT COUNT(*) FROM products")
    shop.sql("INSERT INTO products (id, name, price) VALUES " + ", ".join(f"({i}, 'p{i}', 1)" for i in range(1, 11)))
    alter = subprocess.Popen([CLIENT, "-S", str(SOCKET), "-u", "root", shop.name, "-e",
                              "ALTER TABLE products COMMENT 'waits for the reader'"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        r = relay(write_back_lock_wait="3s", max_retry_interval="60s").start()
        assert wait_for(lambda: shop.drained() and shop.value(
            "SELECT COUNT(*) FROM certyo_queue WHERE write_back_error IS NOT NULL") != "0", timeout=30), shop.queue()
        asked = time.time()
        r.kill(signal.SIGTERM)
        assert time.time() - asked < 10, "the relay took long to end at SIGTERM"
        assert shop.value("SELECT COUNT(*) FROM certyo_queue WHERE write_back_at IS NULL") == "0", shop.queue()
    finally:
        reader.commit()
        alter.wait(timeout=60)


def test_a_write_back_that_would_change_a_rows_content_is_refused_loudly_not_repeated_for_ever(shop, emulator,
                                                                                                  relay):
    # The same table, with the grants of docs/relay.md only (no privilege on updated_at: the
    # relay cannot see the column, let alone assign it): the server would set updated_at on the
    # write-back, and the triggers queue that as a change. Nothing of it is kept: no change is
    # queued but the application's, and status says why the table is not written back.
    import time
    make_items(shop)
    shop.server.sql(f"GRANT SELECT (id, certyo_record_hash), UPDATE (certyo_record_hash, certyo_anchor_status, "
                    f"certyo_verified_at) ON {shop.name}.items TO 'relay_{shop.name}'@'localhost'")
    shop.sql("INSERT INTO items (id, name) VALUES (1, 'a'), (2, 'b')")
    before = shop.sql("SELECT id, updated_at FROM items ORDER BY id")
    r = relay().start()
    assert wait_for(lambda: shop.value(
        "SELECT COUNT(*) FROM certyo_queue WHERE write_back_error LIKE '%ON UPDATE CURRENT_TIMESTAMP%'") != "0",
        timeout=30), (shop.queue(), r.output()[-3000:])
    time.sleep(2)  # a loop, were there one, queues dozens of changes a second
    assert shop.value(f"SELECT COUNT(*) FROM certyo_queue WHERE collection = '{shop.name}.items'") == "2", shop.queue()
    assert shop.sql("SELECT id, updated_at FROM items ORDER BY id") == before
    status = json.loads(r.command("status", "--json").stdout)
    assert status["not_written_back"] == 2 and "ON UPDATE" in status["write_back_error"], status
    r.stop()


def test_an_on_update_timestamp_left_out_of_capture_is_left_to_the_server(shop, emulator, relay):
    # `updated_at` excluded from capture, and the relay granted SELECT on the table but UPDATE
    # on the bookkeeping columns only: it may not assign updated_at, so it does not; the server
    # sets it on the write-back, which captures nothing (an excluded column), and the rows are
    # written back as before.
    make_items(shop, exclude="'updated_at'")
    shop.server.sql(f"GRANT SELECT ON {shop.name}.items TO 'relay_{shop.name}'@'localhost'; "
                    f"GRANT UPDATE (certyo_record_hash, certyo_anchor_status, certyo_verified_at) "
                    f"ON {shop.name}.items TO 'relay_{shop.name}'@'localhost'")
    shop.sql("INSERT INTO items (id, name) VALUES (1, 'a'), (2, 'b')")
    r = relay().start()
    assert wait_for(lambda: shop.value("SELECT COUNT(*) FROM items WHERE certyo_anchor_status = 'anchored'") == "2",
                    timeout=30), (shop.sql("SELECT * FROM items"), shop.queue(), r.output()[-3000:])
    assert shop.value(f"SELECT COUNT(*) FROM certyo_queue WHERE collection = '{shop.name}.items'") == "2"
    assert shop.value("SELECT COUNT(*) FROM certyo_queue WHERE write_back_error IS NOT NULL") == "0"
