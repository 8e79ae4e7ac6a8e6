"""End-to-end delivery: a real PostgreSQL 15 cluster with certyo_cdc preloaded, pointed at the
Certyo emulator (pg_test/emulator), driven over real connections. Every scenario ends with the
same question: does the emulator hold every committed change exactly once (by idempotency key),
with nothing lost?

Fixtures in conftest.py (the emulator, anchoring after 2 s); this module brings its own cluster,
with harness.Cluster's default settings. conftest.py's checks run after every test here too: no
crash, no restart of the postmaster (a test that kills the worker or restarts the server on
purpose says so, and the checks go on from there), vault.canary intact.

Run:  CERTYO_EMULATOR=target/release/certyo-emulator python3 -m pytest -q pg_test/test_delivery.py
"""
import os
import shutil
import signal
import threading
import time

import pytest

from conftest import CRASH_SIGNS, watched_cluster
from harness import KEY, TMP, Cluster, free_port, wait_for

DIR = f"{TMP}/certyo-e2e-delivery"
SETTINGS = ""  # harness.Cluster's defaults, as the script this module replaced used


@pytest.fixture(scope="module")
def cluster(emulator):
    """Overrides conftest's: this module's own cluster, with the canary conftest checks."""
    yield from watched_cluster(DIR, emulator, SETTINGS)


def crashes(cluster):
    """What shows that `cluster` crashed or restarted, if anything (conftest's invariant (b))."""
    found = []
    if cluster.postmaster_pid() != cluster.start_pid:
        found.append(f"the postmaster restarted: PID {cluster.postmaster_pid()}, was {cluster.start_pid}")
    log = cluster.log()
    for sign in CRASH_SIGNS:
        lines = [line for line in log.splitlines() if sign in line]
        if lines:
            found.append(f"the server log shows a crash ({sign!r}): {lines[:3]}")
    return found


@pytest.fixture
def bare_cluster(emulator):
    """A cluster of the test's own, certyo_cdc preloaded but the extension not created: for what
    happens before CREATE EXTENSION and at DROP EXTENSION, which would take the extension (and
    every receipt) away from the other tests. Checked afterwards for a crash or restart."""
    directory = DIR + "-bare"
    bare = Cluster(directory, free_port(), emulator.url, SETTINGS)
    bare.start_pid = bare.postmaster_pid()
    try:
        yield bare
        problems = crashes(bare)
        assert not problems, "\n".join(problems)
    finally:
        try:
            bare.stop()
        except Exception:
            pass
        shutil.rmtree(directory, ignore_errors=True)


class Window:
    """What reached Certyo and what certyo_cdc recorded from the moment a test opens it on. It
    opens once nothing is pending (so nothing from before is in flight): the emulator's records
    from then on (it keeps them in acceptance order) and the receipts of the changes queued
    from then on (a receipt's id is its change's queue id)."""

    def __init__(self, cluster, emulator):
        assert cluster.wait_drained(), "changes from before the test are still pending"
        self.cluster, self.emulator = cluster, emulator
        self.first_record = len(emulator.records())
        self.last_change = int(cluster.sql("""
            SELECT greatest((SELECT max(id) FROM certyo.receipt), (SELECT max(id) FROM certyo.delivery),
                            (SELECT max(id) FROM certyo.queue), 0)"""))
        self.stats = emulator.stats()

    def records(self):
        """The records the emulator accepted since the window opened."""
        return self.emulator.records()[self.first_record:]

    def stat(self, name):
        """How much one of the emulator's counters grew since the window opened."""
        return self.emulator.stats()[name] - self.stats[name]

    def exactly_once(self, name):
        """Every change committed since the window opened is at the emulator once, and nothing
        else arrived there meanwhile."""
        assert self.cluster.wait_drained(), f"{name}: the queue drains"
        keys = self.cluster.sql("SELECT string_agg(idempotency_key, ',' ORDER BY id) FROM certyo.receipt "
                                f"WHERE id > {self.last_change}").split(",")
        stored = [r["idempotencyKey"] for r in self.records()]
        assert sorted(stored) == sorted(k for k in keys if k), \
            f"{name}: each committed change reached Certyo exactly once"
        assert self.cluster.sql("SELECT count(*) FROM certyo.delivery") == "0", \
            f"{name}: every change has its receipt, none is left behind"


def reload_conf(cluster, name, value):
    """pg_reload_conf(), then wait until it is in effect: a new session shows `value` for `name`
    (the postmaster has reloaded, and signalled the worker before any later session started),
    and the worker has begun passes since (each begins by processing a pending reload)."""
    cluster.sql("SELECT pg_reload_conf()")
    assert wait_for(lambda: cluster.sql(f"SHOW {name}") == value, 10), f"{name} is not {value!r} after a reload"
    assert cluster.wait_passes(2), "the worker began no pass after the reload"


def test_the_launcher_runs_before_the_extension_exists_and_starts_a_worker_with_it(bare_cluster):
    """With the library preloaded the launcher runs; no delivery worker stays in a database
    without the extension; CREATE EXTENSION starts one, without a restart."""
    launcher = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'certyo_cdc launcher'"
    workers = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'certyo_cdc delivery'"
    assert wait_for(lambda: bare_cluster.sql(launcher) == "1", 30), "the launcher runs and shows in pg_stat_activity"
    assert wait_for(lambda: bare_cluster.sql(workers) == "0", 30), "no worker where nothing is installed"
    bare_cluster.sql("CREATE EXTENSION certyo_cdc")
    assert wait_for(lambda: bare_cluster.sql("SELECT running FROM certyo.worker_status()") == "t", 30), \
        "CREATE EXTENSION starts the database's worker"
    bare_cluster.sql("DROP EXTENSION certyo_cdc")


def test_changes_across_two_tables(cluster, emulator):
    window = Window(cluster, emulator)
    cluster.sql("""
        CREATE TABLE two_products (id int PRIMARY KEY, sku text, price numeric(10,2));
        CREATE TABLE two_stock (region text, sku text, qty int, PRIMARY KEY (region, sku));
        SELECT certyo.track('two_products'); SELECT certyo.track('two_stock');
        INSERT INTO two_products SELECT g, 'SKU-' || g, g FROM generate_series(1, 40) g;
        INSERT INTO two_stock VALUES ('EU/West', 'A', 1), ('US', 'B', 2);
        UPDATE two_products SET price = price + 1 WHERE id <= 5;
        UPDATE two_products SET certyo_anchor_status = 'pending' WHERE id <= 10;
        DELETE FROM two_products WHERE id = 40;
        UPDATE two_stock SET qty = 3 WHERE region = 'EU/West';
    """)
    window.exactly_once("changes across two tables")
    records = window.records()
    ops = sorted((r["collection"], r["recordId"], r["operationType"]) for r in records
                 if r["recordId"] in ("5", "40", "EU\\/West/A"))
    assert ops == [
        ("public.two_products", "40", "delete"), ("public.two_products", "40", "insert"),
        ("public.two_products", "5", "insert"), ("public.two_products", "5", "update"),
        ("public.two_stock", "EU\\/West/A", "insert"), ("public.two_stock", "EU\\/West/A", "update")], \
        "operations and record ids as captured"
    latest = {}
    for r in records:
        latest[(r["collection"], r["recordId"])] = r
    assert latest[("public.two_products", "5")]["recordPayload"] == {"id": 5, "sku": "SKU-5", "price": 6.0}, \
        "payloads are the captured rows"
    hashes = dict(line.split("|") for line in cluster.sql(
        "SELECT id || '|' || certyo_record_hash FROM two_products WHERE id IN (1, 5)").splitlines())
    assert hashes == {"1": latest[("public.two_products", "1")]["recordHash"],
                      "5": latest[("public.two_products", "5")]["recordHash"]}, \
        "source rows carry the hash Certyo returned for their newest version"
    assert cluster.sql("SELECT certyo_record_hash FROM two_stock WHERE region = 'EU/West'") == \
        latest[("public.two_stock", "EU\\/West/A")]["recordHash"], "composite-key rows get their hash too"
    assert cluster.sql("SELECT count(*) FROM certyo.queue") == "0", "the write-back queued nothing"
    assert window.stat("bulkRequests") > 0, "bulk requests were used for the backlog"


def test_an_empty_record_id_is_refused_where_it_is_written(cluster, emulator):
    """Certyo requires a recordId and refuses an empty one: a row keyed '' was captured, and
    every change of it became a dead letter. It is refused in the writer's statement (23514,
    with a detail and a hint) and nothing is written; a composite key with empty parts is not
    empty ('/') and is delivered; a row keyed '' from before the table was tracked can still
    be re-keyed or deleted (Certyo never held it: only the new key's insert is sent), and the
    audit reports it as never captured."""
    assert cluster.wait_drained(), "changes from before the test are still pending"
    cluster.sql("""
        CREATE TABLE blank_keys (k text PRIMARY KEY, v text);
        INSERT INTO blank_keys VALUES ('gone', 'x');
        CREATE TABLE blank_before (k text PRIMARY KEY, v text);
        INSERT INTO blank_before VALUES ('', 'from before tracking');
        CREATE TABLE blank_deleted (k text PRIMARY KEY, v text);
        INSERT INTO blank_deleted VALUES ('', 'from before tracking');
        CREATE TABLE blank_pairs (a text, b text, v text, PRIMARY KEY (a, b));
        SELECT certyo.track(t) FROM unnest(ARRAY['blank_keys', 'blank_before', 'blank_deleted', 'blank_pairs']) t;
    """)
    for table, statement in (("blank_keys", "INSERT INTO blank_keys VALUES ('', 'new')"),
                             ("blank_keys", "UPDATE blank_keys SET k = '' WHERE k = 'gone'"),
                             ("blank_before", "UPDATE blank_before SET v = 'changed' WHERE k = ''"),
                             ("blank_before", "SELECT certyo.track('blank_before', backfill => true)")):
        refused = cluster.attempt_verbose(statement)
        assert refused.sqlstates == ["23514"], (statement, refused)
        assert f"record id of this row of tracked table public.{table} is empty" in refused.stderr, refused
        assert "DETAIL:" in refused.stderr and "HINT:" in refused.stderr, refused
    assert cluster.sql("SELECT count(*) FROM certyo.queue WHERE collection LIKE 'public.blank%'") == "0", \
        "nothing was written"
    assert cluster.sql("SELECT v FROM blank_before") == "from before tracking"
    assert cluster.sql("SELECT record_id || '|' || problem FROM certyo.audit('blank_before')") == "|never captured", \
        "the audit reads such a row, and says what it is"
    cluster.sql("INSERT INTO blank_pairs VALUES ('', '', 'both empty'); UPDATE blank_before SET k = 'named'; "
                "DELETE FROM blank_keys WHERE k = 'gone'; DELETE FROM blank_deleted")
    assert cluster.wait_drained(), "delivered\n" + cluster.explain()
    sent = sorted((r["collection"], r["recordId"], r["operationType"]) for r in emulator.records()
                  if r["collection"].startswith("public.blank"))
    assert sent == [("public.blank_before", "named", "insert"), ("public.blank_keys", "gone", "delete"),
                    ("public.blank_pairs", "/", "insert")], sent
    assert cluster.sql("SELECT count(*) FROM certyo.delivery WHERE state = 'dead'") == "0", "no dead letter"


def test_faults(cluster, emulator):
    cluster.sql("""
        CREATE TABLE fault_products (id int PRIMARY KEY, sku text, price numeric(10,2));
        SELECT certyo.track('fault_products');
    """)
    window = Window(cluster, emulator)
    emulator.fault("429", 3, retryAfter=1)
    emulator.fault("429", 2)
    emulator.fault("500", 2)
    emulator.fault("partial", 1)
    emulator.fault("slow", 1, seconds=3)
    emulator.fault("drop", 1)
    cluster.sql("INSERT INTO fault_products SELECT g, 'F-' || g, 1 FROM generate_series(100, 160) g")
    for i in range(5):
        cluster.sql(f"UPDATE fault_products SET price = price + 1 WHERE id = {100 + i}")
    window.exactly_once("429 storms, 5xx, a timeout, no answer, a partial bulk answer")
    assert window.stat("faultsServed") == 10, "every fault was served"
    assert [r["recordPayload"]["price"] for r in window.records()
            if r["collection"] == "public.fault_products" and r["recordId"] == "100"] == [1, 2], \
        "changes of one record arrived in commit order"


def records_out_of_order(window, collection):
    """Records whose changes did not reach Certyo one after another in commit order: each
    change here raises the row's price by one, so a record's prices must arrive increasing,
    and each in a later request than the one before (the worker waits for a change's answer
    before it sends the record's next: a failure of the first must not let the second pass it).
    Returns them and how many records arrived."""
    seen = {}
    for r in window.records():
        if r["collection"] == collection:
            seen.setdefault(r["recordId"], []).append((r["recordPayload"]["price"], r["request"]))
    wrong = [rid for rid, changes in seen.items()
             if any(a[0] >= b[0] or a[1] >= b[1] for a, b in zip(changes, changes[1:]))]
    return wrong, len(seen)


def queue_three_changes_per_record(cluster, table, rows):
    """Each record's three changes one after another in the queue (insert, then two updates)."""
    cluster.sql(f"""
        DO $$ BEGIN
            FOR g IN 1..{rows} LOOP
                INSERT INTO {table} VALUES (g, 1);
                UPDATE {table} SET price = 2 WHERE id = g;
                UPDATE {table} SET price = 3 WHERE id = g;
            END LOOP;
        END $$;
    """)


@pytest.mark.parametrize("rows", [2_000, 20_000])
def test_a_long_backlog_keeps_each_records_order(cluster, emulator, rows):
    """A backlog longer than a few batches is read into the worker's list once and sent from
    it (rows=2,000: 6,000 changes, one list; rows=20,000: 60,000 changes, more than a list
    holds, so later changes lie beyond the first list). Each record has three changes in a
    row, which must reach Certyo in commit order, each exactly once, nothing left in
    certyo.delivery; and the list's changes were never copied there."""
    table = f"backlog_items_{rows}"
    cluster.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, price int); SELECT certyo.track('{table}')")
    window = Window(cluster, emulator)

    def stat(name):
        return int(cluster.sql(f"SELECT n_tup_ins FROM pg_stat_all_tables WHERE relid = 'certyo.{name}'::regclass"))
    moved_before, receipts_before = stat("delivery"), stat("receipt")
    cluster.sql("SELECT certyo.pause()")
    queue_three_changes_per_record(cluster, table, rows)
    cluster.sql("SELECT certyo.resume()")
    window.exactly_once(f"a backlog of {3 * rows} changes")
    out_of_order, records = records_out_of_order(window, f"public.{table}")
    assert records == rows and out_of_order == [], f"records whose changes arrived out of order: {out_of_order[:5]}"
    assert cluster.sql(f"SELECT count(*) FROM {table} WHERE certyo_record_hash IS NULL") == "0", \
        "every row has its hash"
    # The worker reports its table statistics after its passes: once the receipts show, so
    # would any copy into certyo.delivery made before them.
    assert wait_for(lambda: stat("receipt") - receipts_before >= 3 * rows, 30), "the worker reported its receipts"
    assert stat("delivery") == moved_before, "no change of the backlog was copied into certyo.delivery"


def test_a_failure_in_a_long_backlog_sends_the_rest_in_order(cluster, emulator):
    """A batch of the list whose answer lacks one result, then a batch that fails, end the
    list: the rest waits in certyo.delivery, and each record's order and exactly once hold."""
    cluster.sql("CREATE TABLE backlog_faults (id int PRIMARY KEY, price int); SELECT certyo.track('backlog_faults')")
    window = Window(cluster, emulator)
    cluster.sql("SELECT certyo.pause()")
    queue_three_changes_per_record(cluster, "backlog_faults", 3000)
    served = emulator.stats()["faultsServed"]
    emulator.fault("partial", 1)
    emulator.fault("500", 1)
    cluster.sql("SELECT certyo.resume()")
    window.exactly_once("a long backlog with a partial answer and a 500")
    assert emulator.stats()["faultsServed"] - served == 2, "both faults were served"
    # The record left out of the partial answer was stored: its retry is the one replay.
    assert window.stat("replayed") == 1, \
        f"{window.stat('replayed')} changes were sent again after Certyo had accepted them"
    out_of_order, records = records_out_of_order(window, "public.backlog_faults")
    assert records == 3000 and out_of_order == [], f"records whose changes arrived out of order: {out_of_order[:5]}"


def test_a_batch_in_flight_when_a_retry_begins_is_not_sent_again(cluster, emulator):
    """A partial answer ends the list: the next pass moves the queue into certyo.delivery,
    with the changes of the batch then in flight. Their answers come after the move: they
    become receipts where the changes now wait, and none is sent again."""
    cluster.sql("CREATE TABLE backlog_moved (id int PRIMARY KEY, price int); SELECT certyo.track('backlog_moved')")
    window = Window(cluster, emulator)
    cluster.sql("SELECT certyo.pause()")
    queue_three_changes_per_record(cluster, "backlog_moved", 3000)
    emulator.fault("partial", 1)
    cluster.sql("SELECT certyo.resume()")
    window.exactly_once("a batch in flight while the queue moves into certyo.delivery")
    # The record left out of the partial answer was stored: its retry is the one replay.
    assert window.stat("replayed") == 1, \
        f"{window.stat('replayed')} changes were sent again after Certyo had accepted them"


def test_the_worker_vacuums_the_queue_it_empties_and_reports_what_it_wrote(cluster, emulator):
    """Autovacuum comes by once a minute at most, and acts only on the statistics reported to
    it: the worker vacuums the queue itself as it empties it (every pass reads the whole
    queue, dead rows too), and reports the rows it wrote, as backends do."""
    def stat(table, column):
        return int(cluster.sql(f"SELECT {column} FROM pg_stat_all_tables WHERE relid = 'certyo.{table}'::regclass"))
    # The worker's VACUUM skips its turn while autovacuum holds the queue (SKIP_LOCKED), and
    # 25,000 inserts invite autovacuum: it stays away for this test (the count is the worker's
    # either way, as vacuum_count leaves autovacuum's out).
    cluster.sql("ALTER TABLE certyo.queue SET (autovacuum_enabled = off)")
    try:
        vacuums, receipts = stat("queue", "vacuum_count"), stat("receipt", "n_tup_ins")
        offset = cluster.log_size()
        cluster.sql("""
            CREATE TABLE vacuumed_items (id int PRIMARY KEY, v int);
            SELECT certyo.track('vacuumed_items');
            INSERT INTO vacuumed_items SELECT g, 0 FROM generate_series(1, 25000) g;
        """)
        assert wait_for(lambda: stat("queue", "vacuum_count") > vacuums, timeout=120), \
            "the worker vacuumed the queue once it had settled 20,000 changes; the log said:\n" + \
            "\n".join(line for line in cluster.log_since(offset).splitlines() if "vacuum" in line.lower())
        assert wait_for(lambda: stat("receipt", "n_tup_ins") - receipts >= 25000, timeout=60), \
            "the receipts the worker inserted are counted in pg_stat_all_tables"
    finally:
        cluster.sql("ALTER TABLE certyo.queue RESET (autovacuum_enabled)")


def test_kill_the_worker_mid_batch_then_an_immediate_restart(cluster, emulator, watch):
    cluster.sql("""
        CREATE TABLE crash_products (id int PRIMARY KEY, sku text, price numeric(10,2));
        SELECT certyo.track('crash_products');
    """)
    window = Window(cluster, emulator)
    stop = threading.Event()
    committed = []

    def writer():
        n = 1000
        while not stop.is_set():
            try:
                cluster.sql(f"INSERT INTO crash_products VALUES ({n}, 'W', 1)")
                committed.append(n)
            except Exception:
                time.sleep(0.2)  # the server is restarting: this insert did not commit
            n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert wait_for(lambda: len(committed) >= 5, 30), "the writer commits"
        served = emulator.stats()["faultsServed"]
        emulator.fault("slow", 2, seconds=3)
        # Mid-batch: Certyo holds a request of the worker's (the first slow answer is under way).
        assert wait_for(lambda: emulator.stats()["faultsServed"] > served, 30), "no batch reached the slow Certyo"
        pid = cluster.sql("SELECT pid FROM certyo.worker_status()")
        assert pid.isdigit(), f"the worker's pid: {pid!r}"
        os.kill(int(pid), signal.SIGKILL)
        # The postmaster reinitializes after the kill: until a new worker runs and writes go on.
        assert wait_for(lambda: cluster.sql(f"SELECT running AND pid <> {pid} FROM certyo.worker_status()",
                                            check=False) == "t", 60), "no new worker after the kill"
        before_restart = len(committed)
        assert wait_for(lambda: len(committed) > before_restart, 30), "writes go on after the kill"
        cluster.pg_ctl("-m", "immediate", "restart")
        after_restart = len(committed)
        assert wait_for(lambda: len(committed) >= after_restart + 5, 30), "writes go on after the restart"
    finally:
        stop.set()
        thread.join()
    unexpected = watch.restarted_on_purpose(allowed=(f"(PID {pid}) was terminated by signal 9",))
    assert not unexpected, f"a crash other than the worker's kill: {unexpected[:3]}"
    assert len(committed) > 10, "writes committed while the worker was killed and the server restarted"
    window.exactly_once("kill -9 of the worker mid-batch, then an immediate restart")
    delivered = set(int(r["recordId"]) for r in window.records() if r["collection"] == "public.crash_products")
    assert sorted(set(committed) - delivered) == [], "every committed write is delivered"
    # Not in the script this replaced: no slow answer is left queued for another test.
    assert emulator.stats()["faultsServed"] - served == 2, "both slow answers were served"


def test_a_wrong_api_key(cluster, emulator):
    cluster.sql("""
        CREATE TABLE key_products (id int PRIMARY KEY, sku text, price numeric(10,2));
        SELECT certyo.track('key_products');
    """)
    window = Window(cluster, emulator)
    cluster.sql("ALTER SYSTEM SET certyo.api_key = 'wrong'")
    try:
        reload_conf(cluster, "certyo.api_key", "wrong")
        accepted_before = emulator.stats()["accepted"]
        cluster.sql("INSERT INTO key_products SELECT g, 'K', 1 FROM generate_series(5000, 5020) g")
        # The worker sent them and Certyo refused the key; then it goes on passing (and must not send).
        assert wait_for(lambda: cluster.sql("SELECT state FROM certyo.worker_status()") == "unauthorized", 30), \
            cluster.sql("SELECT state || ': ' || detail FROM certyo.worker_status()")
        assert cluster.wait_passes(4)
        assert emulator.stats()["accepted"] == accepted_before, "with a wrong key nothing is accepted"
        status = cluster.sql("SELECT state || ': ' || detail FROM certyo.worker_status()")
        assert status.startswith("unauthorized: Certyo refused the API key"), \
            f"the status says the key was refused: {status}"
        assert cluster.sql("SELECT count(*) FROM certyo.delivery WHERE state = 'dead'") == "0", \
            "nothing became a dead letter"
    finally:
        cluster.sql("ALTER SYSTEM RESET certyo.api_key")  # back to the key in postgresql.conf
        reload_conf(cluster, "certyo.api_key", KEY)
    window.exactly_once("after the key is fixed and reloaded")


def test_a_missing_tenant_id_is_reported(cluster):
    expected = "not configured: set certyo.tenant_id (ALTER SYSTEM SET ...; SELECT pg_reload_conf())"
    detail = "SELECT detail FROM certyo.worker_status()"
    cluster.sql("ALTER SYSTEM SET certyo.tenant_id = ''")
    try:
        cluster.sql("SELECT pg_reload_conf()")
        assert wait_for(lambda: cluster.sql(detail) == expected, 15), \
            f"a missing tenant id is reported in the status: {cluster.sql(detail)!r}"
    finally:
        cluster.sql("ALTER SYSTEM RESET certyo.tenant_id")
        reload_conf(cluster, "certyo.tenant_id", "acme")
        assert wait_for(lambda: cluster.sql("SELECT state FROM certyo.worker_status()") != "not configured", 15), \
            "the worker still says it is not configured"


def test_drop_extension_is_not_blocked_by_the_worker_which_ends(bare_cluster):
    """With a tracked table whose changes the worker delivered (it has worked with the
    extension's tables), as in a cluster in use: DROP EXTENSION is not blocked, and the
    database's worker ends (no crash, no restart); the launcher stays."""
    bare_cluster.sql("""
        CREATE EXTENSION certyo_cdc;
        CREATE TABLE dropped_products (id int PRIMARY KEY, sku text);
        SELECT certyo.track('dropped_products');
        INSERT INTO dropped_products SELECT g, 'D' FROM generate_series(1, 20) g;
    """)
    assert bare_cluster.wait_drained(), "the changes are delivered"
    worker = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'certyo_cdc delivery'"
    launcher = "SELECT pid FROM pg_stat_activity WHERE backend_type = 'certyo_cdc launcher'"
    assert bare_cluster.sql(worker) == "1"
    before = bare_cluster.sql(launcher)
    bare_cluster.sql("SET statement_timeout = '5s'; DROP EXTENSION certyo_cdc CASCADE")
    assert wait_for(lambda: bare_cluster.sql(worker) == "0", 10), "the worker ends with the extension"
    assert bare_cluster.sql(launcher) == before, "the launcher keeps running"
    problems = crashes(bare_cluster)
    assert not problems, "\n".join(problems)


def test_under_load_changes_linger_until_a_full_batch_or_the_linger(cluster, tmp_path):
    """certyo.linger: under a steady stream of single-row commits the worker lets changes gather
    between passes (far fewer passes than commits), and a full batch ends the wait early: with
    a linger of a whole second and certyo.batch_size 100, 400 commits/s (a full batch every
    quarter of a second) are accepted well within the second, and every change arrives."""
    from harness import PG_BIN
    import subprocess
    cluster.sql("CREATE TABLE lingering (id bigserial PRIMARY KEY, v int); SELECT certyo.track('lingering')")
    cluster.sql("ALTER SYSTEM SET certyo.linger = '1s'")
    cluster.sql("SELECT pg_reload_conf()")
    try:
        assert cluster.wait_drained()
        script = tmp_path / "insert.sql"
        script.write_text("INSERT INTO lingering (v) VALUES (1);\n")
        os.chmod(tmp_path, 0o755)
        os.chmod(script, 0o644)
        before = cluster.passes()
        subprocess.run([f"{PG_BIN}/pgbench", "-h", cluster.dir, "-p", str(cluster.port), "-U", "postgres", "-n",
                        "-c", "2", "-j", "2", "-R", "400", "-T", "4", "-f", str(script), "postgres"],
                       check=True, capture_output=True)
        assert cluster.wait_drained(), cluster.explain()
        commits = int(cluster.sql("SELECT count(*) FROM lingering"))
        passes = cluster.passes() - before
        assert int(cluster.sql("SELECT count(*) FROM certyo.receipt WHERE relid = 'lingering'::regclass")) == commits
        # A pass per full batch or linger, and one to record its answers (more while idle at
        # the end, every certyo.poll_interval): not a pass per handful of commits.
        assert passes < commits / 10, f"{passes} passes for {commits} commits"
        p90 = float(cluster.sql("SELECT percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM accepted_at - queued_at)) "
                                "FROM certyo.receipt WHERE relid = 'lingering'::regclass"))
        assert p90 < 0.8, f"commit to accepted p90 {p90 * 1000:.0f} ms: the linger was waited out, not a full batch"
    finally:
        cluster.sql("ALTER SYSTEM RESET certyo.linger")
        cluster.sql("SELECT pg_reload_conf()")
