"""certyo-relay end to end: a real MariaDB with the companion installed, the Certyo emulator,
and the relay binary as users run it. Every scenario ends with the same question: does the
emulator hold every committed change exactly once (by idempotency key), with nothing lost?
Fixtures in conftest.py."""
import json
import re
import signal
import time

from harness import wait_for  # pg_test/, on the path by conftest.py


def delivered_keys(emulator, shop):
    """The idempotency keys the emulator holds for this shop's database, and whether any twice."""
    keys = [r["idempotencyKey"] for r in emulator.records() if r["database"] == shop.name]
    return keys, len(keys) != len(set(keys))


def assert_exactly_once(emulator, shop):
    keys, doubled = delivered_keys(emulator, shop)
    queued = {row[0] for row in shop.sql("SELECT idempotency_key FROM certyo_queue WHERE status = 'delivered'")}
    assert not doubled, "a change was recorded twice"
    assert set(keys) == queued, f"emulator {len(keys)} vs delivered {len(queued)}"


def test_every_change_once_hash_written_back_then_anchored(shop, emulator, relay):
    shop.sql("INSERT INTO products (id, name, price) VALUES (1, 'Tea', 3.50), (2, 'Zoë \"q\"', 2), (3, 'Jam', 4);"
             "UPDATE products SET price = 3.75 WHERE id = 1;"
             "DELETE FROM products WHERE id = 3;")
    r = relay().start()
    wait_for(shop.drained)
    assert [(q[1], q[2], q[3]) for q in shop.queue()] == [
        ("1", "insert", "delivered"), ("2", "insert", "delivered"), ("3", "insert", "delivered"),
        ("1", "update", "delivered"), ("3", "delete", "delivered")]
    assert_exactly_once(emulator, shop)
    by_key = {r["idempotencyKey"]: r for r in emulator.records()}
    # The emulator's hash of the latest version is on the source row; the write-back queued nothing.
    latest = shop.value("SELECT record_hash FROM certyo_queue WHERE record_id = '1' ORDER BY id DESC LIMIT 1")
    key = shop.value("SELECT idempotency_key FROM certyo_queue WHERE record_id = '1' ORDER BY id DESC LIMIT 1")
    assert latest == by_key[key]["recordHash"]
    assert wait_for(lambda: shop.value("SELECT certyo_record_hash FROM products WHERE id = 1") == latest)
    assert by_key[key]["recordPayload"] == {"id": 1, "name": "Tea", "price": 3.75, "updated_at": None}
    assert by_key[key]["operationType"] == "update" and by_key[key]["collection"] == f"{shop.name}.products"
    # Verification after verify_min_age: the queue rows and the source rows are anchored.
    assert wait_for(lambda: shop.value("SELECT COUNT(*) FROM certyo_queue WHERE anchor_status = 'anchored'") == "5",
                    timeout=30), shop.queue()
    assert wait_for(lambda: shop.sql("SELECT certyo_anchor_status FROM products ORDER BY id")
                    == [["anchored"], ["anchored"]])
    assert shop.value("SELECT COUNT(*) FROM certyo_queue") == "5", "the write-back queued changes"
    assert shop.value("SELECT COUNT(*) FROM certyo_queue WHERE polygon_tx_hash IS NOT NULL") == "5"
    r.stop()
    assert "batch" in r.output() and "ERROR" not in r.output()


def test_bookkeeping_only_updates_are_not_sent(shop, emulator, relay):
    shop.sql("INSERT INTO products (id, name) VALUES (1, 'Tea')")
    relay().start()
    wait_for(shop.drained)
    shop.sql("UPDATE products SET certyo_anchor_status = 'x', certyo_verified_at = NOW(6)")
    assert shop.value("SELECT COUNT(*) FROM certyo_queue") == "1"
    assert len(delivered_keys(emulator, shop)[0]) == 1


def test_faults_deliver_each_change_exactly_once(shop, emulator, relay):
    # A bulk batch (more than bulk_threshold) through 429, 500, a dropped connection and a
    # bulk answer missing a record.
    emulator.fault("429", retryAfter=1)
    emulator.fault("500")
    emulator.fault("drop")
    emulator.fault("partial")
    shop.sql("INSERT INTO products (id, name) VALUES " + ", ".join(f"({i}, 'p{i}')" for i in range(1, 61)))
    r = relay(request_timeout="2s").start()
    assert wait_for(shop.drained, timeout=60), shop.queue()
    assert_exactly_once(emulator, shop)
    assert len(delivered_keys(emulator, shop)[0]) == 60
    assert emulator.stats()["faultsServed"] >= 4
    # Each receipt holds its delivery, and nothing of the failed attempts before it: changes
    # sent more than once (recorded by the full statement) as well as those sent once.
    shop.sql("INSERT INTO products (id, name) VALUES " + ", ".join(f"({i}, 'p{i}')" for i in range(61, 81)))
    assert wait_for(shop.drained, timeout=60), shop.queue()
    receipts = shop.sql("SELECT attempts, last_status, last_error IS NULL, next_attempt_at IS NULL, "
                        "write_back_attempts, write_back_error IS NULL FROM certyo_queue")
    assert {int(r[0]) > 1 for r in receipts} == {True, False}, receipts
    assert all(r[1:] == ["202", "1", "1", "0", "1"] for r in receipts), receipts
    r.stop()
    assert "retried" in r.output()


def test_kill_9_mid_batch_and_restart_loses_nothing_and_records_nothing_twice(shop, emulator, relay):
    shop.sql("INSERT INTO products (id, name) VALUES " + ", ".join(f"({i}, 'p{i}')" for i in range(1, 201)))
    emulator.fault("slow", seconds=3)  # the first batch is accepted, and answered late
    r = relay().start()
    assert wait_for(lambda: emulator.stats()["ingestRequests"] >= 1, timeout=30)
    time.sleep(0.3)  # inside the slow answer: Certyo has the batch, the queue does not know yet
    r.kill(signal.SIGKILL)
    assert shop.value("SELECT COUNT(*) FROM certyo_queue WHERE status = 'delivered'") == "0"
    r2 = relay().start()
    assert wait_for(shop.drained, timeout=60)
    assert_exactly_once(emulator, shop)
    assert len(delivered_keys(emulator, shop)[0]) == 200
    assert emulator.stats()["replayed"] >= 200, "the resent batch was answered as a replay"
    r2.stop()


def test_sigterm_finishes_the_batch_in_flight(shop, emulator, relay):
    shop.sql("INSERT INTO products (id, name) VALUES " + ", ".join(f"({i}, 'p{i}')" for i in range(1, 31)))
    emulator.fault("slow", seconds=2)
    r = relay().start()
    assert wait_for(lambda: emulator.stats()["ingestRequests"] >= 1, timeout=30)
    started = time.time()
    assert r.kill(signal.SIGTERM) == 0
    assert time.time() - started < 10
    # The batch went out before SIGTERM: its answers were recorded before the relay exited.
    assert shop.drained(), shop.queue()
    assert_exactly_once(emulator, shop)
    assert "stopped" in r.output()


def test_sigterm_ends_the_relay_while_an_application_holds_a_tracked_table_locked(shop, emulator, relay, session):
    # LOCK TABLES of a tracked table also locks certyo_queue, which its triggers write: the
    # queue's session waits for it (a year, by the server's default), at most 5 s a statement, so
    # SIGTERM is answered, and nothing is lost: the changes are delivered once it is released.
    shop.sql("INSERT INTO products (id, name) VALUES " + ", ".join(f"({i}, 'p{i}')" for i in range(1, 6)))
    app = session()
    app.run("LOCK TABLES products WRITE")
    try:
        r = relay().start()
        waiting = f"SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = 'relay_{shop.name}' " \
                  "AND STATE LIKE '%metadata lock%'"
        assert wait_for(lambda: shop.server.value(waiting, shop.name) != "0", timeout=30), r.output()[-2000:]
        asked = time.time()
        r.kill(signal.SIGTERM)
        assert time.time() - asked < 40, "the relay did not end at SIGTERM while it waited for the lock"
    finally:
        app.run("UNLOCK TABLES")
    r = relay().start()
    assert wait_for(lambda: shop.drained(), timeout=60), shop.queue()
    assert_exactly_once(emulator, shop)


def test_each_records_changes_arrive_in_commit_order(shop, emulator, relay):
    shop.sql("INSERT INTO products (id, name, price) VALUES (1, 'Tea', 1), (2, 'Jam', 1)")
    for price in range(2, 8):
        shop.sql(f"UPDATE products SET price = {price} WHERE id = 1")
    shop.sql("UPDATE products SET price = 9 WHERE id = 2")
    emulator.fault("500")  # the first batch fails: order must hold through the retry
    relay().start()
    assert wait_for(shop.drained, timeout=60)
    accepted = [r for r in emulator.records() if r["database"] == shop.name and r["recordId"] == "1"]
    assert [r["recordPayload"]["price"] for r in accepted] == [1, 2, 3, 4, 5, 6, 7]
    assert_exactly_once(emulator, shop)


def test_a_bad_record_is_a_dead_letter_and_blocks_no_other(shop, emulator, relay):
    shop.sql("INSERT INTO products (id, name) VALUES (1, 'Tea')")
    # A row Certyo refuses (no recordId), queued by hand among good ones, in a bulk batch.
    shop.sql("INSERT INTO certyo_queue (collection, record_id, operation, payload, source_timestamp, idempotency_key)"
             f" VALUES ('{shop.name}.products', '', 'insert', '{{\"id\": 0}}', UTC_TIMESTAMP(6), 'bad-1')")
    shop.sql("INSERT INTO products (id, name) VALUES " + ", ".join(f"({i}, 'p{i}')" for i in range(2, 21)))
    r = relay().start()
    assert wait_for(shop.drained, timeout=60)
    dead = shop.sql("SELECT record_id, last_status, last_error FROM certyo_queue WHERE status = 'dead'")
    assert len(dead) == 1 and dead[0][0] == "" and dead[0][1] == "422", dead
    assert "recordId" in dead[0][2], dead
    assert shop.value("SELECT COUNT(*) FROM certyo_queue WHERE status = 'delivered'") == "20"
    assert_exactly_once(emulator, shop)
    status = json.loads(r.command("status", "--json").stdout)
    assert (status["dead"], status["delivered"], status["pending"]) == (1, 20, 0)
    assert "422" in status["last_error"]


def test_a_payload_over_the_cap_is_a_dead_letter_never_sent_and_batches_stay_under_it(shop, emulator, relay):
    # 4 kB of payload a batch: 30 changes of over 200 bytes each go in several batches; one of
    # 5 kB is never sent, a dead letter with no HTTP status (0), as the extension does.
    shop.sql("ALTER TABLE products MODIFY name TEXT")
    shop.sql("INSERT INTO products (id, name) VALUES " + ", ".join(f"({i}, '{'x' * 200}')" for i in range(1, 31)))
    shop.sql(f"INSERT INTO products (id, name) VALUES (99, '{'y' * 5000}')")
    r = relay(max_payload_size=4).start()
    assert wait_for(shop.drained, timeout=60), shop.queue()
    dead = shop.sql("SELECT record_id, last_status, last_error FROM certyo_queue WHERE status = 'dead'")
    assert len(dead) == 1 and dead[0][:2] == ["99", "0"], dead
    assert "larger than max_payload_size (4 kB); it was not sent" in dead[0][2], dead
    records = [r for r in emulator.records() if r["database"] == shop.name]
    assert not any(r["recordId"] == "99" for r in records), "the large payload was sent"
    assert shop.value("SELECT COUNT(*) FROM certyo_queue WHERE status = 'delivered'") == "30"
    assert_exactly_once(emulator, shop)
    r.stop()
    batches = [int(m) for m in re.findall(r"\bbatch source=\S+ sent=(\d+)", r.output())]
    assert len(batches) >= 2 and max(batches) <= 4096 // 200, batches


def test_an_outage_is_probed_one_change_at_a_time_then_drained(shop, emulator, relay):
    emulator.call("POST", "/_emulator/faults", {"fault": "outage", "seconds": 6})
    shop.sql("INSERT INTO products (id, name) VALUES " + ", ".join(f"({i}, 'p{i}')" for i in range(1, 101)))
    r = relay(max_retry_interval="2s").start()
    time.sleep(5)
    during = emulator.stats()["ingestRequests"]
    # One bulk that failed, then probes at a growing interval: a handful, not one per change.
    assert 1 <= during <= 6, during
    assert wait_for(shop.drained, timeout=60)
    assert_exactly_once(emulator, shop)
    r.stop()
    log = r.output()
    assert "Certyo does not answer" in log and "Certyo answers again" in log


def test_anchored_changes_are_removed_after_the_retention(shop, emulator, relay):
    shop.sql("INSERT INTO products (id, name) VALUES (1, 'Tea'), (2, 'Jam')")
    shop.sql("INSERT INTO certyo_queue (collection, record_id, operation, payload, source_timestamp, idempotency_key)"
             f" VALUES ('{shop.name}.products', '', 'insert', '{{}}', UTC_TIMESTAMP(6), 'bad-1')")
    r = relay(retention="1s").start()
    assert wait_for(lambda: shop.value("SELECT COUNT(*) FROM certyo_queue WHERE anchor_status = 'anchored'") == "2",
                    timeout=30)
    r.stop()
    # The clean-up runs at start and then once a minute: a restart runs one at once. Anchored
    # changes past the retention go; the dead letter stays for an operator; the rows keep
    # their hashes.
    time.sleep(1.1)
    relay(retention="1s").start()
    assert wait_for(lambda: shop.value("SELECT COUNT(*) FROM certyo_queue") == "1", timeout=30)
    assert shop.value("SELECT status FROM certyo_queue") == "dead"
    assert shop.value("SELECT COUNT(*) FROM products WHERE certyo_anchor_status = 'anchored'") == "2"


def test_check_names_what_is_wrong(shop, emulator, relay):
    r = relay()
    ok = r.command("check")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ok   source shop" in ok.stdout and "ok   Certyo" in ok.stdout
    assert "relay-pw" not in ok.stdout + ok.stderr
    wrong_key = r.command("check", env=r.env | {"CERTYO_API_KEY": "wrong"})
    assert wrong_key.returncode == 1 and "HTTP 401" in wrong_key.stdout and "API key" in wrong_key.stdout
    shop.sql("DROP TABLE certyo_queue")
    missing = r.command("check")
    assert missing.returncode == 1 and "sql/mysql/certyo_queue.sql" in missing.stdout, missing.stdout
    no_key = r.command("check", env={k: v for k, v in r.env.items() if k != "CERTYO_API_KEY"})
    assert no_key.returncode == 2 and "CERTYO_API_KEY" in no_key.stderr


def test_a_refused_key_sends_nothing_more_until_fixed_and_loses_nothing(shop, emulator, relay):
    shop.sql("INSERT INTO products (id, name) VALUES " + ", ".join(f"({i}, 'p{i}')" for i in range(1, 21)))
    r = relay(max_retry_interval="1s")
    r.env = r.env | {"CERTYO_API_KEY": "wrong"}
    r.start()
    assert wait_for(lambda: "refuses the configuration" in r.output(), timeout=30)
    time.sleep(3)
    assert emulator.stats()["unauthorized"] <= 8, emulator.stats()
    assert shop.value("SELECT COUNT(*) FROM certyo_queue WHERE status = 'pending' AND attempts = 0") == "20"
    r.stop()
    relay().start()
    assert wait_for(shop.drained, timeout=30)
    assert_exactly_once(emulator, shop)


def test_write_back_finds_rows_by_composite_and_text_keys(shop, emulator, relay):
    shop.sql("""CREATE TABLE stock (region VARCHAR(20) CHARACTER SET latin1 COLLATE latin1_swedish_ci,
                                    sku VARCHAR(20), qty INT, certyo_record_hash VARCHAR(128),
                                    certyo_anchor_status VARCHAR(20), certyo_verified_at DATETIME(6),
                                    PRIMARY KEY (region, sku))""")
    shop.track("stock")
    shop.server.sql(f"GRANT SELECT (region, sku, certyo_record_hash), "
                    f"UPDATE (certyo_record_hash, certyo_anchor_status, certyo_verified_at) "
                    f"ON {shop.name}.stock TO 'relay_{shop.name}'@'localhost'")
    shop.sql("INSERT INTO stock (region, sku, qty) VALUES ('EU/West', 'A\\\\1', 5), ('US', 'b', 1), ('us2', 'Ü', 2)")
    relay().start()
    assert wait_for(shop.drained, timeout=30)
    assert_exactly_once(emulator, shop)
    held = dict((r[0], r[1]) for r in shop.sql("SELECT record_id, record_hash FROM certyo_queue"))
    assert set(held) == {"EU\\/West/A\\\\1", "US/b", "us2/Ü"}
    rows = shop.sql("SELECT CONCAT(REPLACE(REPLACE(region, '\\\\', '\\\\\\\\'), '/', '\\\\/'), '/', "
                    "REPLACE(REPLACE(sku, '\\\\', '\\\\\\\\'), '/', '\\\\/')), certyo_record_hash FROM stock")
    assert {r[0]: r[1] for r in rows} == held
    assert wait_for(lambda: shop.value("SELECT COUNT(*) FROM stock WHERE certyo_anchor_status = 'anchored'") == "3",
                    timeout=30)
    assert shop.value("SELECT COUNT(*) FROM certyo_queue") == "3", "the write-back queued changes"


def test_verification_never_marks_a_newer_version_anchored(shop, emulator, relay):
    shop.sql("INSERT INTO products (id, name) VALUES (1, 'Tea')")
    r = relay(verify_min_age="1h").start()
    assert wait_for(lambda: shop.drained() and shop.value("SELECT certyo_record_hash FROM products") != "NULL")
    first = shop.value("SELECT certyo_record_hash FROM products")
    # A newer version is delivered and written back before the old one is verified.
    shop.sql("UPDATE products SET name = 'Green tea'")
    newer = lambda: shop.value("SELECT record_hash FROM certyo_queue ORDER BY id DESC LIMIT 1")  # noqa: E731
    assert wait_for(lambda: shop.drained() and newer() not in (None, "NULL")
                    and shop.value("SELECT certyo_record_hash FROM products") == newer(), timeout=30), shop.queue()
    r.stop()
    shop.sql("UPDATE certyo_queue SET next_verify_at = UTC_TIMESTAMP(6) ORDER BY id LIMIT 1")
    relay(verify_min_age="1h").start()
    assert wait_for(lambda: shop.value("SELECT anchor_status FROM certyo_queue ORDER BY id LIMIT 1") == "anchored",
                    timeout=30)
    assert shop.sql("SELECT certyo_record_hash, certyo_anchor_status FROM products") == [[newer(), "pending"]]
    assert first != newer()


def test_a_database_outage_is_ridden_out_without_a_log_storm(shop, emulator, relay, mariadb):
    shop.sql("INSERT INTO products (id, name) VALUES (1, 'Tea')")
    r = relay(poll_interval="100ms").start()
    assert wait_for(shop.drained, timeout=30)
    mariadb.stop()
    time.sleep(4)  # the relay polls a database that is gone
    mariadb.start()
    shop.sql("INSERT INTO products (id, name) VALUES (2, 'Jam')")
    assert wait_for(shop.drained, timeout=30)
    assert_exactly_once(emulator, shop)
    assert len(delivered_keys(emulator, shop)[0]) == 2
    r.stop()
    failures = r.output().count("the source failed")
    # Logged when it starts and once a minute after (plus when the error text changes as the
    # server goes down): a handful of lines, not one per poll.
    assert 1 <= failures <= 3, r.output()
