"""The delivery worker as a daemon a DBA keeps (issue 10): asleep when idle, every answer on its
own receipt, bookkeeping that users never see as a change, and a fast stop that stops.

A real PostgreSQL 15 cluster with certyo_cdc preloaded and the Certyo emulator (fixtures in
conftest.py; this module brings its own cluster). conftest.py's checks run after every test
here too: no crash, no restart of the postmaster.

Run:  CERTYO_EMULATOR=target/release/certyo-emulator python3 -m pytest -q pg_test/test_daemon.py
"""
import os
import shutil
import threading
import time
from datetime import datetime

import pytest

from conftest import watched_cluster
from harness import TMP, Cluster, cpu_use, free_port, wait_for

DIR = f"{TMP}/certyo-e2e-daemon"
POLL_INTERVAL_S = 0.3
SETTINGS = f"""
certyo.poll_interval = '{int(POLL_INTERVAL_S * 1000)}ms'
certyo.verify_min_age = '500ms'
certyo.verify_interval = '500ms'
"""


@pytest.fixture(scope="module")
def cluster(emulator):
    """Overrides conftest's: this module's own cluster, with the canary conftest checks."""
    yield from watched_cluster(DIR, emulator, SETTINGS)


def idle_cost(cluster, seconds):
    """(passes, CPU seconds, threads started) of the worker over a window in which nothing
    happens."""
    pid = cluster.sql("SELECT pid FROM certyo.worker_status()")
    passes = cluster.passes()
    cpu, threads = cpu_use(pid)
    time.sleep(seconds)  # a measurement window, not a wait for a condition
    cpu_after, threads_after = cpu_use(pid)
    return cluster.passes() - passes, cpu_after - cpu, threads_after - threads


def assert_asleep(cluster, state):
    seconds = 5.0
    # The best of up to three windows: a worker that spins or works for nothing does so in
    # every window, while the CPU time the scheduler charges a sleeping worker's few wake-ups
    # swings with the rest of the machine (on a busy 2-core VM, 5-9 ms in one window, 47-53 ms
    # in another, the same build: 2026-12-05).
    for _ in range(3):
        passes, cpu, started = idle_cost(cluster, seconds)
        print(f"{state}: {passes} passes, {cpu * 1000:.1f} ms of CPU in {seconds} s")
        if passes <= seconds / POLL_INTERVAL_S + 5 and not started and cpu <= 0.01 * seconds:
            return
    # Asleep: about one pass per poll_interval (plus a few for the doorbell of our own
    # queries); a worker that spins runs thousands.
    assert passes <= seconds / POLL_INTERVAL_S + 5, f"{state}: {passes} passes in {seconds} s"
    # No thread is started for nothing (one that started and ended in the window would take
    # its CPU time with it), so the time below is all of it.
    assert not started, f"{state}: threads {sorted(started)} started while nothing happened"
    # At most 1% of a core, measured to the nanosecond: a worker that spins uses 100%.
    assert cpu <= 0.01 * seconds, f"{state}: {cpu * 1000:.1f} ms of CPU in {seconds} s"


def test_idle_worker_sleeps_in_every_quiet_state(cluster):
    """Nothing tracked; rows delivered and all anchored; sending paused: the worker sleeps."""
    assert_asleep(cluster, "nothing tracked")
    cluster.sql("""
        CREATE TABLE quiet (id int PRIMARY KEY, v text);
        SELECT certyo.track('quiet');
        INSERT INTO quiet SELECT g, 'v' FROM generate_series(1, 100) g;
    """)
    assert wait_for(lambda: cluster.sql(
        "SELECT count(*) FILTER (WHERE certyo_anchor_status = 'anchored') FROM quiet") == "100", 60)
    assert wait_for(lambda: cluster.sql(
        "SELECT count(*) FROM certyo.receipt WHERE anchor_status <> 'anchored'") == "0", 30)
    assert_asleep(cluster, "all delivered and anchored")
    cluster.sql("SELECT certyo.pause(); INSERT INTO quiet VALUES (101, 'waits')")
    try:
        assert wait_for(lambda: cluster.sql("SELECT state FROM certyo.worker_status()") == "paused", 10)
        assert_asleep(cluster, "paused")
    finally:
        cluster.sql("SELECT certyo.resume()")
    assert cluster.wait_drained()
    cluster.sql("DROP TABLE quiet")


def test_a_paused_worker_is_not_woken_by_every_commit(cluster):
    """While sending is paused, committing writers do not ring the worker (it could send
    nothing): 500 single-row transactions cost it about one pass per poll_interval, not one
    per commit; certyo.resume() wakes it and the backlog is delivered."""
    cluster.sql("CREATE TABLE muted (id int PRIMARY KEY); SELECT certyo.track('muted'); SELECT certyo.pause()")
    try:
        assert wait_for(lambda: cluster.sql("SELECT state FROM certyo.worker_status()") == "paused", 10)
        passes = cluster.passes()
        started = time.monotonic()
        script = "".join(f"INSERT INTO muted VALUES ({i});\n" for i in range(500))
        assert cluster.attempt_verbose(script).returncode == 0
        elapsed = time.monotonic() - started
        ran = cluster.passes() - passes
        print(f"passes while 500 commits ran in {elapsed:.2f} s, paused: {ran}")
        assert ran <= elapsed / POLL_INTERVAL_S + 5, f"{ran} passes for 500 commits in {elapsed:.2f} s"
    finally:
        cluster.sql("SELECT certyo.resume()")
    assert cluster.wait_drained(30)
    assert cluster.sql("SELECT count(*) FROM muted WHERE certyo_record_hash IS NOT NULL") == "500"
    cluster.sql("DROP TABLE muted")


def test_write_back_changes_nothing_users_see_as_a_change(cluster):
    """The seed's set_updated_at BEFORE trigger and an AFTER trigger that logs changes: the
    worker's write-back fires neither, so no business column drifts from what was anchored,
    the audit is clean and the log stays empty."""
    cluster.sql("""
        CREATE TABLE shop (id int PRIMARY KEY, sku text, updated_at timestamptz NOT NULL DEFAULT now());
        CREATE TABLE shop_log (id int, op text);
        CREATE FUNCTION set_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN NEW.updated_at := clock_timestamp(); RETURN NEW; END $$;
        CREATE FUNCTION log_change() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN INSERT INTO shop_log VALUES (NEW.id, TG_OP); RETURN NULL; END $$;
        CREATE TRIGGER set_updated_at BEFORE UPDATE ON shop FOR EACH ROW EXECUTE FUNCTION set_updated_at();
        CREATE TRIGGER log_change AFTER UPDATE ON shop FOR EACH ROW EXECUTE FUNCTION log_change();
        SELECT certyo.track('shop');
        INSERT INTO shop (id, sku) SELECT g, 'SKU-' || g FROM generate_series(1, 50) g;
    """)
    assert wait_for(lambda: cluster.sql(
        "SELECT count(*) FILTER (WHERE certyo_anchor_status = 'anchored') FROM shop") == "50", 60)
    assert cluster.sql("SELECT count(*) FROM shop_log") == "0"
    assert cluster.sql("SELECT count(*) FROM certyo.audit('shop')") == "0"
    assert cluster.sql("SELECT count(*) FROM certyo.queue") == "0"
    cluster.sql("DROP TABLE shop, shop_log; DROP FUNCTION set_updated_at(), log_change()")


def test_fast_stop_with_a_batch_in_flight_finishes_quickly(emulator):
    """pg_ctl -m fast stop while a batch waits on a slow Certyo and a backlog waits behind it:
    the worker abandons the batch (idempotency makes resending safe) and the server stops
    within 5 s; after a restart everything arrives exactly once."""
    directory = DIR + "-stop"
    stopping = Cluster(directory, free_port(), emulator.url,
                       SETTINGS + "certyo.request_timeout = '60s'\ncertyo.bulk_threshold = 0\n")
    try:
        stopping.sql("""
            CREATE EXTENSION certyo_cdc;
            CREATE TABLE slow (id int PRIMARY KEY);
            SELECT certyo.track('slow');
        """)
        emulator.fault("slow", times=1, seconds=40)
        requests = emulator.stats()["ingestRequests"]
        stopping.sql("INSERT INTO slow VALUES (1)")
        # The first batch is on the wire (the emulator has it) and more wait behind it.
        assert wait_for(lambda: emulator.stats()["ingestRequests"] > requests, 10)
        stopping.sql("INSERT INTO slow SELECT g FROM generate_series(2, 500) g")
        started = time.monotonic()
        stopping.stop()
        elapsed = time.monotonic() - started
        assert elapsed < 5, f"fast stop took {elapsed:.1f} s"
        stopping.start()
        assert stopping.wait_drained(60)
        ids = [r["recordId"] for r in emulator.records() if r["collection"] == "public.slow"]
        assert sorted(ids, key=int) == [str(i) for i in range(1, 501)], "each row exactly once"
    finally:
        try:
            stopping.stop()
        except Exception:
            pass
        shutil.rmtree(directory, ignore_errors=True)


def test_an_outage_is_probed_not_flooded_and_nothing_is_lost(cluster, emulator):
    """Certyo answers 503 to everything for 8 s while 2,000 changes wait: the worker sends a
    bounded number of requests (the batches already under way, then one probe at a growing
    interval), makes no dead letter, says so in worker_status(), and once Certyo is back
    delivers every change exactly once."""
    cluster.sql("""
        CREATE TABLE flood (id int PRIMARY KEY, v text);
        SELECT certyo.track('flood');
    """)
    served = emulator.stats()["faultsServed"]
    emulator.fault("outage", seconds=8)
    started = time.monotonic()
    cluster.sql("INSERT INTO flood SELECT g, 'v' FROM generate_series(1, 2000) g")
    assert wait_for(lambda: cluster.sql("SELECT state FROM certyo.worker_status()") == "unreachable", 10)
    assert "probe" in cluster.sql("SELECT detail FROM certyo.worker_status()")
    while time.monotonic() - started < 8:
        assert cluster.sql("SELECT dead FROM certyo.worker_status()") == "0"
        time.sleep(0.5)  # watching the outage run its course
    during = emulator.stats()["faultsServed"] - served
    print(f"requests during an 8 s outage with 2,000 changes pending: {during}")
    # Batches under way when it started (at most two in flight with one being taken), then
    # probes at 0.5-1, 1-2, 2-4, 4-8 s: at most 2 + 4 in 8 s. Before: ~20 requests a second.
    assert during <= 8, f"{during} requests during an 8 s outage"
    assert cluster.wait_drained(90)
    print(f"everything delivered {time.monotonic() - started - 8:.1f} s after the outage ended")
    assert cluster.sql("SELECT count(*) FROM flood WHERE certyo_record_hash IS NOT NULL") == "2000"
    ids = [r["recordId"] for r in emulator.records() if r["collection"] == "public.flood"]
    assert len(ids) == 2000 and len(set(ids)) == 2000, "each change exactly once"
    assert cluster.sql("SELECT dead FROM certyo.worker_status()") == "0"
    cluster.sql("DROP TABLE flood")


def test_retry_after_pauses_sending_as_a_whole(cluster, emulator):
    """A 429 with Retry-After: 3 pauses sending as a whole for 3 s: not only the request that
    got it, but every batch committed meanwhile waits too (one batch in flight at a time), and
    then everything is delivered exactly once, none of it a dead letter."""
    cluster.sql("CREATE TABLE limited (id int PRIMARY KEY)")
    cluster.sql("SELECT certyo.track('limited')")
    served = emulator.stats()["faultsServed"]
    emulator.fault("429", 1, retryAfter=3)
    started = time.time()
    cluster.sql("INSERT INTO limited SELECT g FROM generate_series(1, 5) g")
    assert wait_for(lambda: emulator.stats()["faultsServed"] > served, 10), \
        f"the 429 was served\n{cluster.explain()}"
    cluster.sql("INSERT INTO limited SELECT g FROM generate_series(6, 10) g")  # during the pause
    assert cluster.wait_drained(30)
    accepted = [datetime.fromisoformat(r["acceptedAt"].replace("Z", "+00:00")).timestamp()
                for r in emulator.records() if r["collection"] == "public.limited"]
    assert len(accepted) == 10, "each change exactly once"
    earliest = min(accepted) - started
    print(f"first change accepted {earliest:.2f} s after a 429 with Retry-After: 3")
    assert earliest >= 3 - 0.05, f"a change was accepted {earliest:.2f} s after the 429, within its Retry-After"
    assert cluster.sql("SELECT dead FROM certyo.worker_status()") == "0"
    cluster.sql("DROP TABLE limited")


def test_a_backfill_chunk_that_fails_halfway_leaves_nothing_behind(cluster, emulator):
    """A backfill chunk meets, after queuing 50 rows, a row it cannot capture (a NULL record id,
    loaded with session_replication_role = replica, as a logical replication subscriber loads
    rows, so neither capture nor certyo_cdc's DDL check saw it): the chunk's transaction is
    rolled back as a whole, so none of the 50 is queued or delivered, and the backfill says why
    it failed. Fixed and requested again,
    every row is delivered exactly once. (pgrx's own BackgroundWorker::transaction would have
    committed the 50 rows without advancing the backfill.)"""
    cluster.sql("""
        CREATE TABLE halfway (id int PRIMARY KEY, code text NOT NULL UNIQUE);
        INSERT INTO halfway SELECT g, 'c' || g FROM generate_series(1, 50) g;
        SELECT certyo.track('halfway', record_id_columns => ARRAY['code']);
        SET session_replication_role = replica;  -- neither event trigger nor capture fires
        ALTER TABLE halfway ALTER COLUMN code DROP NOT NULL;
        INSERT INTO halfway VALUES (51, NULL);
    """)
    backfill = cluster.sql("SELECT certyo.backfill('halfway')")
    assert wait_for(lambda: cluster.sql(f"SELECT state FROM certyo.backfills WHERE id = {backfill}") == "failed", 30)
    failed = cluster.sql(f"SELECT rows_queued || '|' || error FROM certyo.backfills WHERE id = {backfill}")
    assert failed.startswith("0|") and "is NULL" in failed, failed
    assert cluster.wait_drained(30)
    assert cluster.sql("SELECT count(*) FROM certyo.queue WHERE collection = 'public.halfway'") == "0"
    assert cluster.sql("SELECT count(*) FROM certyo.receipt WHERE collection = 'public.halfway'") == "0"
    assert not [r for r in emulator.records() if r["collection"] == "public.halfway"], \
        "no row of the failed chunk reached Certyo"

    cluster.sql("""
        SET session_replication_role = replica;
        UPDATE halfway SET code = 'c51' WHERE id = 51;
        ALTER TABLE halfway ALTER COLUMN code SET NOT NULL;
    """)
    backfill = cluster.sql("SELECT certyo.backfill('halfway')")
    assert wait_for(lambda: cluster.sql(f"SELECT state FROM certyo.backfills WHERE id = {backfill}") == "done", 30)
    assert cluster.wait_drained(30)
    ids = [r["recordId"] for r in emulator.records() if r["collection"] == "public.halfway"]
    assert sorted(ids) == sorted(f"c{g}" for g in range(1, 52)), "each row exactly once"
    cluster.sql("DROP TABLE halfway")


def test_a_wrong_base_url_path_stops_sending_instead_of_dead_lettering(cluster, emulator):
    """A 404 (certyo.base_url pointing at the wrong path) is the configuration's fault, not the
    records': nothing becomes a dead letter, worker_status() says what to fix, and fixing it
    delivers everything."""
    cluster.sql("CREATE TABLE lost (id int PRIMARY KEY)")
    cluster.sql("SELECT certyo.track('lost')")
    cluster.sql(f"ALTER SYSTEM SET certyo.base_url = '{emulator.url}/wrong/path'")
    cluster.sql("SELECT pg_reload_conf()")
    try:
        assert wait_for(lambda: cluster.sql("SHOW certyo.base_url").endswith("/wrong/path"), 10)
        cluster.sql("INSERT INTO lost SELECT g FROM generate_series(1, 20) g")
        assert wait_for(lambda: cluster.sql("SELECT state FROM certyo.worker_status()") == "misconfigured", 15)
        assert "certyo.base_url" in cluster.sql("SELECT detail FROM certyo.worker_status()")
        assert cluster.sql("SELECT dead FROM certyo.worker_status()") == "0"
    finally:
        cluster.sql("ALTER SYSTEM RESET certyo.base_url")
        cluster.sql("SELECT pg_reload_conf()")
    # The fix is not undone by an answer to a request sent with the wrong path before it.
    assert cluster.wait_drained(60), cluster.explain()
    assert cluster.sql("SELECT count(*) FROM lost WHERE certyo_record_hash IS NOT NULL") == "20"
    cluster.sql("DROP TABLE lost")


def test_one_bad_record_never_poisons_its_batch(cluster, emulator):
    """50 changes in one bulk batch, one of them with an empty record id, which Certyo refuses
    (422, "recordId is required"): the batch is split until only that record is a dead letter,
    with its own status and body; the 49 others are delivered. certyo.retry() sends it alone
    into the same refusal, never the others with it. (Capture refuses an empty record id
    since 2026-12-06: the bad record is planted in the queue, in the writer's transaction.)"""
    cluster.sql("""
        CREATE TABLE mixed (code text PRIMARY KEY, v int);
        SELECT certyo.track('mixed');
        BEGIN;
        INSERT INTO mixed SELECT 'c' || g, g FROM generate_series(1, 50) g;
        UPDATE certyo.queue SET record_id = '' WHERE collection = 'public.mixed' AND record_id = 'c25';
        COMMIT;
    """)
    assert wait_for(lambda: cluster.sql("SELECT dead FROM certyo.worker_status()") == "1", 30)
    assert cluster.wait_drained(30)
    assert cluster.sql("SELECT count(*) FROM mixed WHERE certyo_record_hash IS NOT NULL") == "49"
    dead = cluster.sql("SELECT record_id || '|' || last_status || '|' || last_error FROM certyo.delivery WHERE state = 'dead'")
    assert dead.startswith("|422|") and "recordId is required" in dead, dead
    assert cluster.sql("SELECT certyo.retry('mixed')") == "1"
    assert wait_for(lambda: cluster.sql(
        "SELECT attempts FROM certyo.delivery WHERE state = 'dead'") == "2", 30)
    assert cluster.sql("SELECT count(*) FROM certyo.delivery") == "1"
    cluster.sql("DELETE FROM certyo.delivery WHERE state = 'dead'; DROP TABLE mixed")


def test_a_table_whose_write_back_fails_is_retried_and_reported_while_others_flow(cluster):
    """An owner's ENABLE ALWAYS trigger refuses every update of one table while a gate is
    closed: that table's changes are still delivered (receipts recorded), its rows wait, the
    status names the table and the error, another table is written back meanwhile, and once
    the gate opens the waiting rows are marked (with their anchor status too)."""
    cluster.sql("""
        CREATE TABLE gate (open boolean NOT NULL);
        INSERT INTO gate VALUES (false);
        CREATE TABLE stuck (id int PRIMARY KEY, v text);
        CREATE TABLE flowing (id int PRIMARY KEY, v text);
        CREATE FUNCTION refuse_unless_open() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NOT (SELECT open FROM public.gate) THEN RAISE EXCEPTION 'the gate is closed'; END IF;
                RETURN NEW;
            END $$;
        CREATE TRIGGER refuse BEFORE UPDATE ON stuck FOR EACH ROW EXECUTE FUNCTION refuse_unless_open();
        ALTER TABLE stuck ENABLE ALWAYS TRIGGER refuse;
        SELECT certyo.track('stuck'); SELECT certyo.track('flowing');
        INSERT INTO stuck SELECT g, 'v' FROM generate_series(1, 20) g;
        INSERT INTO flowing SELECT g, 'v' FROM generate_series(1, 20) g;
    """)
    try:
        assert wait_for(lambda: cluster.sql("SELECT state FROM certyo.worker_status()") == "write-back failing", 20)
        detail = cluster.sql("SELECT detail FROM certyo.worker_status()")
        assert "stuck" in detail and "the gate is closed" in detail, detail
        assert "the gate is closed" in cluster.sql(
            "SELECT write_back_error FROM certyo.status WHERE \"table\" = 'stuck'::regclass")
        assert wait_for(lambda: cluster.sql(
            "SELECT count(*) FROM flowing WHERE certyo_anchor_status = 'anchored'") == "20", 30)
        assert cluster.sql("SELECT count(*) FROM certyo.receipt WHERE relid = 'stuck'::regclass") == "20"
        assert cluster.sql("SELECT count(*) FROM stuck WHERE certyo_record_hash IS NOT NULL") == "0"
        # Waiting receipts are verified meanwhile; their status is written back with them.
        assert wait_for(lambda: cluster.sql(
            "SELECT count(*) FROM certyo.receipt WHERE relid = 'stuck'::regclass AND anchor_status = 'anchored'") == "20", 30)
    finally:
        cluster.sql("UPDATE gate SET open = true")
    # Retried with back-off: within a few seconds of the gate opening.
    assert wait_for(lambda: cluster.sql(
        "SELECT count(*) FROM stuck WHERE certyo_anchor_status = 'anchored' AND certyo_record_hash IS NOT NULL") == "20", 60)
    assert wait_for(lambda: cluster.sql("SELECT state FROM certyo.worker_status()") == "idle", 20)
    assert cluster.sql("SELECT count(*) FROM certyo.write_back_failure") == "0"
    assert cluster.sql("SELECT count(*) FROM certyo.audit('stuck')") == "0"
    cluster.sql("DROP TABLE stuck, flowing, gate; DROP FUNCTION refuse_unless_open()")


def worker_rss_kib(cluster):
    """Private (anonymous) resident memory of the worker: shared buffers it touches are not its own."""
    pid = cluster.sql("SELECT pid FROM certyo.worker_status()")
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("RssAnon:"))
    return int(line.split()[1])


def test_soak_mixed_writes_with_faults(cluster, emulator):
    """A bounded soak (CERTYO_SOAK_SECONDS, 60 in make test, longer in make bench): one writer
    commits upserts and deletes as fast as it can while Certyo answers 429s, 500s, dropped and
    slow requests and short outages. Afterwards every committed change arrived exactly once,
    the worker's memory stayed flat, and the server log holds no ERROR and no WARNING storm."""
    seconds = int(os.environ.get("CERTYO_SOAK_SECONDS", "60"))
    cluster.sql("""
        CREATE TABLE soak (id int PRIMARY KEY, v text, n int NOT NULL DEFAULT 0);
        CREATE TABLE soak_count (changes bigint);
        SELECT certyo.track('soak');
    """)
    log_offset = cluster.log_size()
    writer = threading.Thread(target=cluster.sql, args=(f"""
        DO $$
        DECLARE
            changes bigint := 0;
            deleted int;
            deadline timestamptz := clock_timestamp() + interval '{seconds} seconds';
        BEGIN
            WHILE clock_timestamp() < deadline LOOP
                INSERT INTO soak (id, v) VALUES (1 + (random() * 500)::int, md5(random()::text))
                    ON CONFLICT (id) DO UPDATE SET n = soak.n + 1, v = excluded.v;
                changes := changes + 1;
                IF random() < 0.1 THEN
                    DELETE FROM soak WHERE id = 1 + (random() * 500)::int;
                    GET DIAGNOSTICS deleted = ROW_COUNT;
                    changes := changes + deleted;
                END IF;
                COMMIT;
                PERFORM pg_sleep(0.002);  -- a steady stream, not a flood: a soak, not a benchmark
            END LOOP;
            INSERT INTO soak_count VALUES (changes);
        END $$""",))
    writer.start()
    faults = [("429", {"times": 3, "retryAfter": 1}), ("500", {"times": 5}), ("drop", {"times": 1}),
              ("slow", {"times": 1, "seconds": 3}), ("outage", {"seconds": 3})]
    started = time.monotonic()
    rss_start = None
    samples = []
    step = 0
    served_before, expected_served = emulator.stats()["faultsServed"], 0
    while writer.is_alive():
        time.sleep(5)  # the pace of fault injection, not a wait for a condition
        if rss_start is None and time.monotonic() - started > 10:
            rss_start = worker_rss_kib(cluster)  # after warm-up: caches and plans in place
        samples.append(worker_rss_kib(cluster))
        # Faults as a real service has them: one at a time, the next only once the last was
        # met (queued faults would wait for requests the worker, rightly, no longer sends)
        # and the service has been seen answering again. (Faults injected during an outage
        # would each fail one probe, keep the outage going and its probes ever further apart,
        # up to certyo's 5-minute cap: a service that never recovers.)
        recovered = cluster.sql("SELECT state FROM certyo.worker_status()") != "unreachable"
        if recovered and emulator.stats()["faultsServed"] - served_before >= expected_served:
            fault, extra = faults[step % len(faults)]
            emulator.fault(fault, **extra)
            expected_served += extra.get("times", 0)
            step += 1
    writer.join()
    assert cluster.wait_drained(180)
    changes = int(cluster.sql("SELECT changes FROM soak_count"))
    receipts = int(cluster.sql("SELECT count(*) FROM certyo.receipt WHERE relid = 'soak'::regclass"))
    keys = {r["idempotencyKey"] for r in emulator.records() if r["collection"] == "public.soak"}
    rss_end = worker_rss_kib(cluster)
    log = cluster.log_since(log_offset)
    errors = [line for line in log.splitlines() if "ERROR:" in line]
    warnings = [line for line in log.splitlines() if "WARNING:" in line]
    print(f"soak {seconds} s: {changes} changes, {receipts} receipts, {len(keys)} records at Certyo, "
          f"{step} faults, worker RSS {rss_start} -> {rss_end} KiB (samples {samples}), {len(warnings)} warnings, "
          f"{len(errors)} errors")
    assert changes > 1000
    assert receipts == changes and len(keys) == changes, "every committed change exactly once"
    assert cluster.sql("SELECT dead FROM certyo.worker_status()") == "0"
    assert rss_start and rss_end - rss_start < 8 * 1024, f"worker RSS grew {rss_start} -> {rss_end} KiB"
    assert not errors, errors[:5]
    assert len(warnings) <= 5, warnings[:5]
    cluster.sql("DROP TABLE soak, soak_count")
