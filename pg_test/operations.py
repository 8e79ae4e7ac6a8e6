#!/usr/bin/env python3
"""End-to-end verification and operator surface: a real PostgreSQL 15 cluster with certyo_cdc
preloaded, pointed at the Certyo emulator (anchoring after 2 s). Rows go pending → anchored;
a mismatch is reported; dead letters are revived by certyo.retry(); certyo.pause() stops
sending and certyo.resume() delivers the backlog; certyo.audit() finds a row changed behind the
trigger's back; a chunked backfill survives an immediate restart and never lets an older image
overtake a newer change; an operator role can run certyo_cdc and an ordinary one cannot.

Usage: pg_test/operations.py EMULATOR_BINARY   (scripts/test.sh builds it and calls this)
"""
import threading
import time

from harness import KEY, check, run, wait_for

DIR = "/tmp/certyo-e2e-operations"
PORT = 54337
SETTINGS = """
certyo.verify_min_age = '1s'
certyo.verify_interval = '500ms'
certyo.anchor_timeout = '60s'
certyo.backfill_chunk_size = 1000
"""


def statuses(cluster, table):
    return cluster.sql(f"SELECT string_agg(DISTINCT coalesce(certyo_anchor_status, 'none'), ',') FROM {table}")


def scenario_pending_then_anchored(cluster, emulator):
    cluster.sql("""
        CREATE TABLE products (id int PRIMARY KEY, sku text, price numeric(10,2));
        SELECT certyo.track('products');
        INSERT INTO products SELECT g, 'SKU-' || g, g FROM generate_series(1, 30) g;
        DELETE FROM products WHERE id = 30;
    """)
    check("the changes are delivered", cluster.wait_drained(), True)
    check("accepted rows are pending first", statuses(cluster, "products"), "pending")
    anchored = wait_for(lambda: statuses(cluster, "products") == "anchored" and cluster.sql(
        "SELECT count(*) FROM certyo.receipt WHERE anchor_status <> 'anchored'") == "0", timeout=30)
    check("then every row is anchored", anchored, True)
    check("...with the time it was verified",
          cluster.sql("SELECT count(*) FROM products WHERE certyo_verified_at IS NULL"), "0")
    check("receipts hold the anchoring transaction, the delete's too",
          cluster.sql("SELECT count(*) FILTER (WHERE polygon_tx_hash LIKE '0x%'), count(*) FROM certyo.receipt "
                      "WHERE anchor_status = 'anchored'"), "31|31")
    check("the worker counts every anchor it found", cluster.sql("SELECT anchored FROM certyo.worker_status()"), "31")
    check("writing the anchor status back queued nothing", cluster.sql("SELECT count(*) FROM certyo.queue"), "0")
    check("the status view counts them",
          cluster.sql("SELECT format('%s %s %s %s', queued, dead_letters, awaiting_anchor, anchored) FROM certyo.status "
                      "WHERE \"table\" = 'products'::regclass"), "0 0 0 31")
    cluster.sql("UPDATE products SET price = 99 WHERE id = 1")
    wait_for(lambda: cluster.sql("SELECT count(*) FROM certyo.receipt WHERE record_id = '1' AND anchor_status = 'anchored'") == "2")
    history = cluster.sql("SELECT string_agg(operation || ':' || state || ':' || anchor_status, ' ' ORDER BY id) "
                          "FROM certyo.history('products', '1')")
    check("history shows both versions, each anchored", history, "insert:accepted:anchored update:accepted:anchored")
    check("the row carries its newest version's hash",
          cluster.sql("SELECT certyo_record_hash = (SELECT record_hash FROM certyo.history('products', '1') ORDER BY id DESC LIMIT 1) "
                      "FROM products WHERE id = 1"), "t")


def scenario_mismatch(cluster, emulator):
    emulator.fault("mismatch", 1)
    cluster.sql("INSERT INTO products VALUES (500, 'M', 1)")
    found = wait_for(lambda: cluster.sql("SELECT anchor_status FROM certyo.receipt WHERE record_id = '500'") == "mismatch", 30)
    check("a hash Certyo reports differently marks the receipt mismatch", found, True)
    check("...and the row", cluster.sql("SELECT certyo_anchor_status FROM products WHERE id = 500"), "mismatch")
    check("...never overwritten: the receipt keeps both hashes",
          cluster.sql("SELECT reported_hash <> record_hash FROM certyo.receipt WHERE record_id = '500'"), "t")
    check("...with a WARNING in the log", "Certyo reports hash" in cluster.log(), True)
    check("...and in the status", cluster.sql("SELECT mismatched FROM certyo.status WHERE \"table\" = 'products'::regclass"), "1")


def scenario_dead_letters_and_retry(cluster, emulator):
    emulator.fault("reject", 1)
    cluster.sql("INSERT INTO products VALUES (600, 'R', 1)")
    dead = wait_for(lambda: cluster.sql("SELECT dead_letters FROM certyo.status WHERE \"table\" = 'products'::regclass") == "1", 20)
    check("a 422 becomes a dead letter", dead, True)
    check("...whose error the status shows",
          "injected rejection" in cluster.sql("SELECT last_error FROM certyo.status WHERE \"table\" = 'products'::regclass"), True)
    check("certyo.retry() revives it", cluster.sql("SELECT certyo.retry('products')"), "1")
    check("...and it is delivered", cluster.wait_drained(), True)
    check("...once", [r["recordId"] for r in emulator.records()].count("600"), 1)
    check("no dead letters are left", cluster.sql("SELECT dead FROM certyo.worker_status()"), "0")


def scenario_pause_and_resume(cluster, emulator):
    cluster.sql("SELECT certyo.pause()")
    time.sleep(0.5)
    before = emulator.stats()["accepted"]
    cluster.sql("INSERT INTO products SELECT g, 'P', 1 FROM generate_series(700, 719) g")
    time.sleep(1.5)
    check("paused: nothing is sent", emulator.stats()["accepted"], before)
    check("paused: the status says so", cluster.sql("SELECT paused || ' ' || state FROM certyo.worker_status()"), "true paused")
    check("paused: capture continues", cluster.sql("SELECT pending FROM certyo.worker_status()"), "20")
    cluster.sql("SELECT certyo.resume()")
    check("resumed: the backlog is delivered", cluster.wait_drained(), True)
    check("resumed: all 20 arrived", emulator.stats()["accepted"] - before, 20)


def scenario_audit(cluster, emulator):
    cluster.sql("CREATE TABLE untouched (id int PRIMARY KEY, v text); SELECT certyo.track('untouched');"
                "INSERT INTO untouched SELECT g, 'u' || g FROM generate_series(1, 50) g")
    cluster.wait_drained()
    check("an untouched table audits clean", cluster.sql("SELECT count(*) FROM certyo.audit('untouched')"), "0")
    check("so does the busy one, after all it went through", cluster.sql("SELECT count(*) FROM certyo.audit('products')"), "0")
    cluster.sql("""
        ALTER TABLE products DISABLE TRIGGER certyo_capture;
        UPDATE products SET price = 0.01 WHERE id = 2;
        ALTER TABLE products ENABLE TRIGGER certyo_capture;
    """)
    check("a row changed with the trigger disabled is found",
          cluster.sql("SELECT record_id || ': ' || problem FROM certyo.audit('products')"), "2: changed without capture")
    check("the untouched table still audits clean", cluster.sql("SELECT count(*) FROM certyo.audit('untouched')"), "0")


def scenario_backfill(cluster, emulator):
    cluster.sql("""
        CREATE TABLE big (id int PRIMARY KEY, v int);
        INSERT INTO big SELECT g, 0 FROM generate_series(1, 20000) g;
        SELECT certyo.track('big');
    """)
    stop = threading.Event()
    updates = []

    def writer():
        n = 0
        while not stop.is_set():
            row = 1 + (n * 7919) % 20000
            try:
                cluster.sql(f"UPDATE big SET v = v + 1 WHERE id = {row}")
                updates.append(row)
            except Exception:
                time.sleep(0.2)  # the server is restarting
            n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    wait_for(lambda: len(updates) >= 5, 10)
    backfill = cluster.sql("SELECT certyo.backfill('big')")
    wait_for(lambda: int(cluster.sql(f"SELECT rows_queued FROM certyo.backfills WHERE id = {backfill}")) >= 3000, 30, 0.05)
    cluster.pg_ctl("-m", "immediate", "restart")
    done = wait_for(lambda: cluster.sql(f"SELECT state FROM certyo.backfills WHERE id = {backfill}") == "done", 120)
    stop.set()
    thread.join()
    check("a backfill survives an immediate restart and finishes", done, True)
    check("...in chunks", int(cluster.sql(f"SELECT chunks FROM certyo.backfills WHERE id = {backfill}")) >= 20, True)
    check("writes went on meanwhile", len(updates) > 5, True)
    check("...and everything is delivered", cluster.wait_drained(120), True)
    delivered = {r["recordId"] for r in emulator.records() if r["collection"] == "public.big"}
    check("every row reached Certyo", len(delivered), 20000)
    check("no older image overtook a newer change: every row matches its last accepted version",
          cluster.sql("SELECT count(*) FROM certyo.audit('big')"), "0")
    check("the status shows the backfill", cluster.sql("SELECT backfill_state || ' ' || backfill_rows_queued FROM certyo.status "
                                                       "WHERE \"table\" = 'big'::regclass").split()[0], "done")


def scenario_operator_role(cluster, emulator):
    cluster.sql("""
        CREATE ROLE certyo_operator NOLOGIN;
        GRANT SELECT ON certyo.status TO certyo_operator;
        GRANT EXECUTE ON FUNCTION certyo.worker_status(), certyo.pause(), certyo.resume(), certyo.wake(),
              certyo.retry(regclass, bigint[]), certyo.verify_now(regclass, text), certyo.history(regclass, text),
              certyo.audit(regclass), certyo.cancel_backfill(bigint) TO certyo_operator;
        CREATE ROLE alice LOGIN IN ROLE certyo_operator;
        CREATE ROLE bob LOGIN;
    """)
    out, err = cluster.attempt("SELECT count(*) > 0 FROM certyo.status; SELECT certyo.pause(); SELECT certyo.resume(); "
                               "SELECT count(*) FROM certyo.history('products', '1'); SELECT running FROM certyo.worker_status()", "alice")
    check("an operator reads the status, pauses, resumes, reads history", (out.split(), err), (["t", "2", "t"], ""))
    out, err = cluster.attempt("SELECT record_hash FROM certyo.receipt LIMIT 1", "alice")
    check("...but not the receipts or payloads directly", "permission denied" in err, True)
    for call in ("SELECT * FROM certyo.status", "SELECT certyo.pause()", "SELECT * FROM certyo.history('products', '1')",
                 "SELECT * FROM certyo.audit('products')"):
        out, err = cluster.attempt(call, "bob")
        check(f"an ordinary role is refused: {call}", "permission denied" in err, True)
    for user in ("alice", "bob"):
        out, err = cluster.attempt("SELECT current_setting('certyo.api_key')", user)
        check(f"{user} cannot read the API key", KEY in out, False)


def scenario_extension(cluster, emulator):
    cluster.sql("CREATE EXTENSION certyo_cdc")


def main():
    run(DIR, PORT, [
        scenario_extension,
        scenario_pending_then_anchored,
        scenario_mismatch,
        scenario_dead_letters_and_retry,
        scenario_pause_and_resume,
        scenario_audit,
        scenario_backfill,
        scenario_operator_role,
    ], SETTINGS, anchor_delay=2)


if __name__ == "__main__":
    main()
