#!/usr/bin/env python3
"""End-to-end delivery: a real PostgreSQL 15 cluster with certyo_cdc preloaded, pointed at the
Certyo emulator (pg_test/emulator), driven over real connections. Every scenario ends with the
same question: does the emulator hold every committed change exactly once (by idempotency key),
with nothing lost? Prints "N passed, M failed".

Usage: pg_test/delivery.py EMULATOR_BINARY   (scripts/test.sh builds it and calls this)
"""
import os
import signal
import threading
import time

from harness import KEY, check, run

DIR = "/tmp/certyo-e2e-delivery"
PORT = 54336


def exactly_once(name, cluster, emulator):
    """Every committed change is at the emulator once, and nothing else is."""
    drained = cluster.wait_drained()
    check(f"{name}: the queue drains", drained, True)
    keys = cluster.sql("SELECT string_agg(idempotency_key, ',' ORDER BY id) FROM certyo.receipt").split(",")
    stored = [r["idempotencyKey"] for r in emulator.records()]
    check(f"{name}: each committed change reached Certyo exactly once", sorted(stored), sorted(k for k in keys if k))
    check(f"{name}: every change has its receipt, none is left behind", cluster.sql("SELECT count(*) FROM certyo.delivery"), "0")


def scenario_changes_across_two_tables(cluster, emulator):
    cluster.sql("""
        CREATE TABLE products (id int PRIMARY KEY, sku text, price numeric(10,2));
        CREATE TABLE stock (region text, sku text, qty int, PRIMARY KEY (region, sku));
        SELECT certyo.track('products'); SELECT certyo.track('stock');
        INSERT INTO products SELECT g, 'SKU-' || g, g FROM generate_series(1, 40) g;
        INSERT INTO stock VALUES ('EU/West', 'A', 1), ('US', 'B', 2);
        UPDATE products SET price = price + 1 WHERE id <= 5;
        UPDATE products SET certyo_anchor_status = 'pending' WHERE id <= 10;
        DELETE FROM products WHERE id = 40;
        UPDATE stock SET qty = 3 WHERE region = 'EU/West';
    """)
    exactly_once("changes across two tables", cluster, emulator)
    records = emulator.records()
    ops = sorted((r["collection"], r["recordId"], r["operationType"]) for r in records if r["recordId"] in ("5", "40", "EU\\/West/A"))
    check("operations and record ids as captured", ops, [
        ("public.products", "40", "delete"), ("public.products", "40", "insert"),
        ("public.products", "5", "insert"), ("public.products", "5", "update"),
        ("public.stock", "EU\\/West/A", "insert"), ("public.stock", "EU\\/West/A", "update")])
    latest = {}
    for r in records:
        latest[(r["collection"], r["recordId"])] = r
    check("payloads are the captured rows", latest[("public.products", "5")]["recordPayload"], {"id": 5, "sku": "SKU-5", "price": 6.0})
    hashes = dict(line.split("|") for line in cluster.sql(
        "SELECT id || '|' || certyo_record_hash FROM products WHERE id IN (1, 5)").splitlines())
    check("source rows carry the hash Certyo returned for their newest version",
          hashes, {"1": latest[("public.products", "1")]["recordHash"], "5": latest[("public.products", "5")]["recordHash"]})
    check("composite-key rows get their hash too",
          cluster.sql("SELECT certyo_record_hash FROM stock WHERE region = 'EU/West'"),
          latest[("public.stock", "EU\\/West/A")]["recordHash"])
    check("the write-back queued nothing", cluster.sql("SELECT count(*) FROM certyo.queue"), "0")
    check("bulk requests were used for the backlog", emulator.stats()["bulkRequests"] > 0, True)


def scenario_faults(cluster, emulator):
    emulator.fault("429", 3, retryAfter=1)
    emulator.fault("429", 2)
    emulator.fault("500", 2)
    emulator.fault("partial", 1)
    emulator.fault("slow", 1, seconds=3)
    emulator.fault("drop", 1)
    cluster.sql("INSERT INTO products SELECT g, 'F-' || g, 1 FROM generate_series(100, 160) g")
    for i in range(5):
        cluster.sql(f"UPDATE products SET price = price + 1 WHERE id = {100 + i}")
    exactly_once("429 storms, 5xx, a timeout, no answer, a partial bulk answer", cluster, emulator)
    check("every fault was served", emulator.stats()["faultsServed"], 10)
    check("changes of one record arrived in commit order",
          [r["recordPayload"]["price"] for r in emulator.records() if r["recordId"] == "100"], [1, 2])


def scenario_crash_and_restart(cluster, emulator):
    stop = threading.Event()
    committed = []

    def writer():
        n = 1000
        while not stop.is_set():
            try:
                cluster.sql(f"INSERT INTO products VALUES ({n}, 'W', 1)")
                committed.append(n)
            except Exception:
                time.sleep(0.2)  # the server is restarting: this insert did not commit
            n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(1)
    emulator.fault("slow", 2, seconds=3)
    time.sleep(0.5)
    pid = cluster.sql("SELECT pid FROM certyo.worker_status()", check=False)
    if pid.isdigit():
        os.kill(int(pid), signal.SIGKILL)
    time.sleep(3)
    cluster.pg_ctl("-m", "immediate", "restart")
    time.sleep(1)
    stop.set()
    thread.join()
    check("writes committed while the worker was killed and the server restarted", len(committed) > 10, True)
    exactly_once("kill -9 of the worker mid-batch, then an immediate restart", cluster, emulator)
    delivered = set(int(r["recordId"]) for r in emulator.records() if r["collection"] == "public.products" and int(r["recordId"]) >= 1000)
    check("every committed write is delivered", sorted(set(committed) - delivered), [])


def scenario_wrong_key(cluster, emulator):
    cluster.sql("ALTER SYSTEM SET certyo.api_key = 'wrong'")
    cluster.sql("SELECT pg_reload_conf()")
    time.sleep(1)
    accepted_before = emulator.stats()["accepted"]
    cluster.sql("INSERT INTO products SELECT g, 'K', 1 FROM generate_series(5000, 5020) g")
    time.sleep(3)
    check("with a wrong key nothing is accepted", emulator.stats()["accepted"], accepted_before)
    status = cluster.sql("SELECT state || ': ' || detail FROM certyo.worker_status()")
    check("the status says the key was refused", status.startswith("unauthorized: Certyo refused the API key"), True)
    check("nothing became a dead letter", cluster.sql("SELECT count(*) FROM certyo.delivery WHERE state = 'dead'"), "0")
    cluster.sql("ALTER SYSTEM SET certyo.api_key = '" + KEY + "'")
    cluster.sql("SELECT pg_reload_conf()")
    exactly_once("after the key is fixed and reloaded", cluster, emulator)


def scenario_api_key_is_hidden(cluster):
    cluster.sql("CREATE ROLE clerk LOGIN")
    out, err = cluster.attempt("SELECT current_setting('certyo.api_key')", "clerk")
    check("an ordinary role cannot read certyo.api_key", KEY in out, False)
    check("...and is told why", "permission denied" in err or "must be superuser" in err, True)
    names = [line.split("|")[0] for line in cluster.sql("SHOW ALL").splitlines()]
    check("SHOW ALL does not list it", "certyo.api_key" in names, False)
    check("...nor does it show its value", KEY in cluster.sql("SHOW ALL"), False)


def scenario_not_configured(cluster):
    cluster.sql("ALTER SYSTEM SET certyo.tenant_id = ''")
    cluster.sql("SELECT pg_reload_conf()")
    time.sleep(1.5)
    check("a missing tenant id is reported in the status",
          cluster.sql("SELECT detail FROM certyo.worker_status()"),
          "not configured: set certyo.tenant_id (ALTER SYSTEM SET ...; SELECT pg_reload_conf())")
    cluster.sql("ALTER SYSTEM RESET certyo.tenant_id")
    cluster.sql("SELECT pg_reload_conf()")


def scenario_drop_extension(cluster):
    before = cluster.sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'certyo_cdc delivery'")
    cluster.sql("SET statement_timeout = '5s'; DROP EXTENSION certyo_cdc CASCADE")
    time.sleep(1.5)
    check("DROP EXTENSION is not blocked by the worker, which keeps running (no crash, no restart)",
          cluster.sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'certyo_cdc delivery'"), before)


def scenario_worker_starts(cluster, emulator):
    check("the worker runs and shows in pg_stat_activity",
          cluster.sql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'certyo_cdc delivery'"), "1")
    cluster.sql("CREATE EXTENSION certyo_cdc")


def main():
    run(DIR, PORT, [
        scenario_worker_starts,
        scenario_changes_across_two_tables,
        scenario_faults,
        scenario_crash_and_restart,
        scenario_wrong_key,
        lambda cluster, _: scenario_api_key_is_hidden(cluster),
        lambda cluster, _: scenario_not_configured(cluster),
        lambda cluster, _: scenario_drop_extension(cluster),
    ])


if __name__ == "__main__":
    main()
