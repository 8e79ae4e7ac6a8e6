"""Integrity across the database's life (issue 11): every committed version of a tracked row
reaches Certyo exactly once, and a row is marked with its own hash, through the events a
production database meets: here, failover to a standby that lagged.

Each test brings its own clusters (a primary, a standby made with pg_basebackup) and uses the
Certyo emulator of conftest.py.

Run:  CERTYO_EMULATOR=target/release/certyo-emulator python3 -m pytest -q pg_test/test_integrity.py
"""
import subprocess
import threading
from collections import Counter

import pytest

from harness import TMP, Cluster, free_port, wait_for

PRIMARY_DIR = f"{TMP}/certyo-e2e-primary"
STANDBY_DIR = f"{TMP}/certyo-e2e-standby"


@pytest.fixture(autouse=True)
def watch():
    """Overrides conftest's, which watches the security suite's shared cluster: these tests
    stop and promote servers on purpose and check their own clusters."""
    yield None


def caught_up(primary, standby):
    lsn = primary.sql("SELECT pg_current_wal_lsn()")
    return wait_for(lambda: standby.sql(
        f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn", check=False) == "t", 30)


def test_failover_to_a_lagging_standby_loses_no_change(emulator):
    """A standby stops streaming; the primary goes on writing and delivering, then fails; the
    standby, promoted, writes on. The new primary's queue ids run again over ids the old
    primary already sent (a sequence is only as far along as the WAL the standby got). Every
    change committed on either side must be in Certyo exactly once, never answered as a
    replay of another change, and each row of the new primary marked with its own hash.
    (With keys made of an installation id and the queue id, the new primary's changes were
    answered as replays of the old primary's: lost, and marked with other records' hashes.)"""
    primary = Cluster(PRIMARY_DIR, free_port(), emulator.url)
    standby = None
    try:
        primary.sql("""
            CREATE EXTENSION certyo_cdc;
            CREATE TABLE items (id int PRIMARY KEY, v text);
            SELECT certyo.track('items');
            INSERT INTO items SELECT g, 'first' FROM generate_series(1, 100) g;
        """)
        assert primary.wait_drained(30)
        standby = Cluster.standby_of(primary, STANDBY_DIR, free_port())
        assert caught_up(primary, standby)
        standby.stop()  # streaming stops: from here on the standby lags
        primary.sql("INSERT INTO items SELECT g, 'old primary' FROM generate_series(101, 200) g")
        assert primary.wait_drained(30)
        primary.pg_ctl("-m", "immediate", "stop")  # the primary fails

        standby.start()
        standby.sql("SELECT pg_promote()")
        assert wait_for(lambda: standby.sql("SELECT running FROM certyo.worker_status()", check=False) == "t", 30)
        standby.sql("""
            INSERT INTO items SELECT g, 'new primary' FROM generate_series(201, 300) g;
            UPDATE items SET v = 'updated on the new primary' WHERE id <= 50;
        """)
        assert standby.wait_drained(60)

        records = [r for r in emulator.records() if r["collection"] == "public.items"]
        versions = Counter(r["recordId"] for r in records)
        expected = Counter({str(i): 2 if i <= 50 else 1 for i in range(1, 301)})
        assert versions == expected, f"missing {expected - versions}, extra {versions - expected}"
        assert standby.sql("SELECT count(*) FROM certyo.receipt WHERE replayed") == "0", \
            "no change of the new primary was answered as a replay"
        latest = {}
        for r in sorted(records, key=lambda r: r["acceptedAt"]):
            latest[r["recordId"]] = r["recordHash"]
        marked = standby.sql("SELECT string_agg(id || '=' || certyo_record_hash, ',') FROM items")
        wrong = [pair for pair in marked.split(",") if latest[pair.split("=")[0]] != pair.split("=", 1)[1]]
        assert not wrong, f"rows marked with another version's hash: {wrong[:5]}"
    finally:
        for cluster in (standby, primary):
            if cluster is not None:
                try:
                    cluster.pg_ctl("-m", "immediate", "stop")
                except Exception:
                    pass


def test_a_replay_of_another_change_is_kept_as_a_conflict_never_as_its_receipt(emulator):
    """Should a change ever carry a key Certyo has seen for another record's change (as keys
    made of queue ids did after a failover), Certyo answers it as a replay of that change. The
    answer is not this change's receipt: the change becomes a dead letter that says so, the row
    is not marked with the other record's hash, and the log says it loudly."""
    cluster = Cluster(PRIMARY_DIR, free_port(), emulator.url)
    try:
        cluster.sql("""
            CREATE EXTENSION certyo_cdc;
            CREATE TABLE pairs (id int PRIMARY KEY, v text);
            SELECT certyo.track('pairs');
            INSERT INTO pairs VALUES (1, 'one');
        """)
        assert cluster.wait_drained(30)
        key = cluster.sql("SELECT idempotency_key FROM certyo.receipt WHERE collection = 'public.pairs'")
        log_offset = cluster.log_size()
        for bulk in (False, True):  # one request for the change, then a bulk request
            first = 2 if not bulk else 10
            cluster.sql(f"""
                BEGIN;
                INSERT INTO pairs SELECT g, 'v' FROM generate_series({first}, {first + (20 if bulk else 0)}) g;
                UPDATE certyo.queue SET idempotency_key = '{key}' WHERE record_id = '{first}';
                COMMIT;
            """)
            assert wait_for(lambda: cluster.sql(
                f"SELECT count(*) FROM certyo.delivery WHERE state = 'dead' AND record_id = '{first}'") == "1", 30)
            dead = cluster.sql(f"SELECT last_status || '|' || last_error FROM certyo.delivery WHERE record_id = '{first}'")
            assert dead.startswith('0|') and 'replay of record "1"' in dead, dead
            assert cluster.sql(f"SELECT certyo_record_hash IS NULL FROM pairs WHERE id = {first}") == "t"
        assert cluster.wait_drained(30)
        assert cluster.sql("SELECT count(*) FROM pairs WHERE certyo_record_hash IS NOT NULL") == str(1 + 20), \
            "the other changes of the bulk request were delivered"
        assert "answered by Certyo as replays of other records' changes" in cluster.log_since(log_offset)
    finally:
        cluster.pg_ctl("-m", "immediate", "stop")


def test_queue_ids_keep_the_order_they_are_drawn_in_and_never_repeat(emulator):
    """Capture draws queue ids in blocks of 1,024 (one nextval() a block) and hands them out
    from shared memory (src/capture/ids.rs). Delivery relies on their order: across sessions,
    a transaction held open across others' commits included, ids must grow in the order they
    are drawn; each database has its own; and none may come twice: not after a crash, which
    forgets the block, nor after DROP and CREATE EXTENSION, which make a new sequence."""
    cluster = Cluster(PRIMARY_DIR, free_port(), emulator.url, "certyo.enabled = off")

    def ids(database="postgres"):
        return [int(i) for i in cluster.sql("SELECT id FROM certyo.queue ORDER BY record_id::int",
                                            database=database).split()]

    setup = "CREATE EXTENSION certyo_cdc; CREATE TABLE t (id int PRIMARY KEY); SELECT certyo.track('t');"
    try:
        cluster.sql(setup)
        held = cluster.hold_open("BEGIN; INSERT INTO t VALUES (1);")
        for i in range(2, 21):  # each in its own session
            cluster.sql(f"INSERT INTO t VALUES ({i})")
        held.process.communicate("INSERT INTO t VALUES (21); COMMIT;\n", timeout=15)
        assert ids() == list(range(1, 22)), "one block, handed out in the order drawn"
        assert cluster.sql("SELECT last_value FROM certyo.queue_id_seq") == "1", "one nextval() for 21 ids"

        cluster.sql("CREATE DATABASE other")
        cluster.sql(setup + "INSERT INTO t VALUES (1), (2), (3);", database="other")
        assert ids("other") == [1, 2, 3], "a database draws from its own sequence"
        cluster.sql("INSERT INTO t VALUES (22)")
        assert ids()[-1] == 22, "the other database's block left this one's alone"

        cluster.pg_ctl("-m", "immediate", "stop")  # a crash: the blocks in shared memory are gone
        cluster.start()
        cluster.sql("INSERT INTO t VALUES (23); INSERT INTO t VALUES (24);")
        after = ids()
        assert after[:22] == list(range(1, 23)), "every change committed before the crash is queued"
        assert after[22] > 1024 and after[23] == after[22] + 1, f"a new block past every id drawn: {after[20:]}"

        cluster.sql("DROP EXTENSION certyo_cdc CASCADE; " + setup.replace("CREATE TABLE t (id int PRIMARY KEY); ", "")
                    + "INSERT INTO t VALUES (4), (5);", database="other")
        assert ids("other") == [1, 2], "a new installation's ids come from its new sequence"
    finally:
        cluster.pg_ctl("-m", "immediate", "stop")


def test_queue_ids_stay_unique_and_in_order_under_concurrent_writers(emulator):
    """Eight sessions commit single-row transactions at once, across several blocks of ids
    (2,400 changes, 1,024 ids a block): no id may come twice, and each session's changes must
    have ids in the order it made them."""
    cluster = Cluster(PRIMARY_DIR, free_port(), emulator.url, "certyo.enabled = off")
    try:
        cluster.sql("CREATE EXTENSION certyo_cdc; CREATE TABLE t (session int, n int, PRIMARY KEY (session, n));"
                    "SELECT certyo.track('t');")
        writers = [subprocess.Popen(
            ["psql", "-h", cluster.dir, "-p", str(cluster.port), "-U", "postgres", "-d", "postgres", "-X", "-q",
             "-v", "ON_ERROR_STOP=1", "-c",
             f"DO $$ BEGIN FOR i IN 1..300 LOOP INSERT INTO t VALUES ({w}, i); COMMIT; END LOOP; END $$"],
            stderr=subprocess.PIPE, text=True) for w in range(8)]
        for writer in writers:
            assert writer.wait(120) == 0, writer.stderr.read()
        assert cluster.sql("SELECT count(*), count(DISTINCT id), count(DISTINCT idempotency_key) FROM certyo.queue") \
            == "2400|2400|2400"
        out_of_order = cluster.sql("""
            SELECT count(*) FROM (
                SELECT id < lag(id) OVER (PARTITION BY split_part(record_id, '/', 1)
                                          ORDER BY split_part(record_id, '/', 2)::int) AS back
                  FROM certyo.queue) x WHERE back""")
        assert out_of_order == "0", "a session's later change got a smaller id"
        assert int(cluster.sql("SELECT last_value FROM certyo.queue_id_seq")) >= 2049, "three blocks or more were drawn"
    finally:
        cluster.pg_ctl("-m", "immediate", "stop")


def test_a_writer_holds_its_lock_on_the_queue_through_savepoints(emulator):
    """Capture asks the lock manager for the queue's lock once per (sub)transaction and
    remembers it (src/capture/queue.rs, Locker). A savepoint rolled back releases what it
    locked, so the next change must lock the queue again: while the writer's transaction
    stays open, the queue must be locked by it, and DROP EXTENSION must wait for it."""
    cluster = Cluster(PRIMARY_DIR, free_port(), emulator.url, "certyo.enabled = off")
    try:
        cluster.sql("CREATE EXTENSION certyo_cdc; CREATE TABLE t (id int PRIMARY KEY); SELECT certyo.track('t');")
        held = cluster.hold_open("BEGIN; SAVEPOINT a; INSERT INTO t VALUES (1); ROLLBACK TO a; "
                                 "INSERT INTO t VALUES (2); SAVEPOINT b; INSERT INTO t VALUES (3); RELEASE b; "
                                 "SAVEPOINT c; INSERT INTO t VALUES (4); ROLLBACK TO c;")
        try:
            locks = cluster.sql("""
                SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                 WHERE a.state = 'idle in transaction' AND l.relation = 'certyo.queue'::regclass
                   AND l.mode = 'RowExclusiveLock' AND l.granted""")
            assert locks == "1", "the open transaction holds the queue's lock"
            dropped = cluster.attempt_verbose("SET lock_timeout = '300ms'; DROP EXTENSION certyo_cdc CASCADE")
            assert dropped.sqlstates == ["55P03"], dropped
        finally:
            held.process.communicate("COMMIT;\n", timeout=15)
        assert cluster.sql("SELECT string_agg(record_id, ',' ORDER BY id) FROM certyo.queue") == "2,3"
    finally:
        cluster.pg_ctl("-m", "immediate", "stop")


def test_an_error_inside_the_queue_insert_is_the_writers_ordinary_error(emulator):
    """The queue row is opened, formed, inserted and closed under one pgrx guard
    (src/capture/queue.rs, insert_row), with the calls inside unguarded. An error raised in
    there (here a lock timeout: another session holds the queue locked) must reach the writer
    as an ordinary error with its SQLSTATE; caught by an exception block, the transaction goes
    on and commits without a leaked relation reference; and the next write, once the queue is
    free, is captured."""
    cluster = Cluster(PRIMARY_DIR, free_port(), emulator.url, "certyo.enabled = off")
    try:
        cluster.sql("CREATE EXTENSION certyo_cdc; CREATE TABLE t (id int PRIMARY KEY); SELECT certyo.track('t');")
        held = cluster.hold_open("BEGIN; LOCK TABLE certyo.queue IN ACCESS EXCLUSIVE MODE;")
        try:
            plain = cluster.attempt_verbose("SET lock_timeout = '200ms'; INSERT INTO t VALUES (1);")
            assert plain.sqlstates == ["55P03"], plain
            caught = cluster.attempt_verbose("""
                SET lock_timeout = '200ms';
                BEGIN;
                DO $$ BEGIN
                    INSERT INTO t VALUES (2);
                EXCEPTION WHEN lock_not_available THEN RAISE NOTICE 'caught %', SQLSTATE;
                END $$;
                SELECT count(*) FROM t;
                COMMIT;""")
            assert caught.returncode == 0, caught
            assert "caught 55P03" in caught.stderr, caught
            assert "WARNING" not in caught.stderr, caught
            assert caught.stdout == "0", "the row went with the subtransaction that could not queue it"
        finally:
            held.process.communicate("COMMIT;\n", timeout=15)
        cluster.sql("INSERT INTO t VALUES (3)")
        assert cluster.sql("SELECT string_agg(record_id, ',' ORDER BY id) FROM certyo.queue") == "3"
        assert cluster.sql("SELECT string_agg(id::text, ',' ORDER BY id) FROM t") == "3"
        # PostgreSQL 15: "relcache reference leak: relation ... not closed"; 17 and later:
        # "resource was not closed: relation ...".
        assert "not closed" not in cluster.log_since(0), "no resource was left to the transaction's end"
    finally:
        cluster.pg_ctl("-m", "immediate", "stop")


def test_drop_extension_never_discards_undelivered_changes_unless_told(emulator):
    """DROP EXTENSION with changes not yet delivered is refused (2BP01), naming how many and
    what to do, and everything stays as it was; DROP EXTENSION ... CASCADE discards them with
    a WARNING that counts them; with nothing undelivered a plain DROP EXTENSION just works."""
    cluster = Cluster(PRIMARY_DIR, free_port(), emulator.url, "certyo.enabled = off")
    try:
        cluster.sql("""
            CREATE EXTENSION certyo_cdc;
            CREATE TABLE kept (id int PRIMARY KEY);
            SELECT certyo.track('kept');
            INSERT INTO kept SELECT g FROM generate_series(1, 30) g;
        """)
        refused = cluster.attempt_verbose("DROP EXTENSION certyo_cdc")
        assert refused.sqlstates == ["2BP01"], refused
        assert "would discard 30 captured change(s) not delivered to Certyo" in refused.stderr, refused
        assert "DROP EXTENSION certyo_cdc CASCADE" in refused.stderr, refused
        assert cluster.sql("SELECT count(*) FROM certyo.queue") == "30", "nothing was lost"
        assert cluster.sql("SELECT count(*) FROM certyo.tracked_tables") == "1"

        dropped = cluster.attempt_verbose("DROP EXTENSION certyo_cdc CASCADE")
        assert dropped.returncode == 0, dropped
        assert "CASCADE discards 30 captured change(s)" in dropped.stderr, dropped

        cluster.sql("CREATE EXTENSION certyo_cdc")
        assert cluster.attempt_verbose("DROP EXTENSION certyo_cdc").returncode == 0, "nothing to lose: dropped"
    finally:
        cluster.pg_ctl("-m", "immediate", "stop")


def test_drop_extension_counts_a_change_committed_while_it_waited(emulator):
    """A truth review (2026-12-05): a writer's change is captured, its transaction still open; DROP EXTENSION
    starts and waits for the writer's lock on the queue; the writer commits. The change is
    committed, so DROP must count it once it has the lock and refuse (2BP01), never drop it
    unseen. (The backlog was counted before DROP waited: 0, and the committed change went with
    the extension, without a word.) With CASCADE it is discarded on purpose, and counted."""
    cluster = Cluster(PRIMARY_DIR, free_port(), emulator.url, "certyo.enabled = off")
    waiting = ("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'DROP EXTENSION%' "
               "AND wait_event_type = 'Lock'")
    try:
        cluster.sql("CREATE EXTENSION certyo_cdc; CREATE TABLE kept (id int PRIMARY KEY); SELECT certyo.track('kept');")
        for statement, expected in (("DROP EXTENSION certyo_cdc", ["2BP01"]),
                                    ("DROP EXTENSION certyo_cdc CASCADE", [])):
            assert cluster.sql("SELECT count(*) FROM certyo.queue") == "0", "nothing undelivered before the writer"
            held = cluster.hold_open("BEGIN; INSERT INTO kept VALUES (105);")
            outcome = {}
            dropper = threading.Thread(target=lambda: outcome.update(drop=cluster.attempt_verbose(statement)))
            try:
                dropper.start()
                assert wait_for(lambda: cluster.sql(waiting) == "1", 15), "DROP EXTENSION waits for the writer"
                held.process.communicate("COMMIT;\n", timeout=15)
                assert held.process.returncode == 0, "the writer committed"
            finally:
                dropper.join(30)
            dropped = outcome["drop"]
            assert dropped.sqlstates == expected, dropped
            if expected:
                assert "would discard 1 captured change(s)" in dropped.stderr, dropped
                assert cluster.sql("SELECT string_agg(record_id, ',') FROM certyo.queue") == "105", \
                    "the committed change is still queued"
                cluster.sql("DELETE FROM kept")
                cluster.sql("DELETE FROM certyo.queue")  # settled by hand: the next round starts empty
            else:
                assert "CASCADE discards 1 captured change(s)" in dropped.stderr, dropped
                assert cluster.sql("SELECT count(*) FROM pg_extension WHERE extname = 'certyo_cdc'") == "0"
    finally:
        cluster.pg_ctl("-m", "immediate", "stop")


def test_dropping_or_retyping_a_captured_column_replans_capture_under_writes(emulator):
    """DROP COLUMN, DROP COLUMN ... CASCADE and ALTER COLUMN ... TYPE of business columns of a
    tracked table, while a writer commits inserts: each statement succeeds, the capture trigger
    stays (it was dropped by CASCADE, and the others were refused, before), every insert is
    in Certyo exactly once, and the next change carries the new shape. DROP TRIGGER of the
    capture trigger is refused; certyo.untrack() is the way to stop capture."""
    cluster = Cluster(PRIMARY_DIR, free_port(), emulator.url)
    try:
        cluster.sql("""
            CREATE EXTENSION certyo_cdc;
            CREATE TABLE shapes (id int PRIMARY KEY, a text, b int, c numeric, d text);
            SELECT certyo.track('shapes');
            INSERT INTO shapes VALUES (1, 'a', 1, 1.5, 'd');
        """)
        failures = []

        def write(statement):
            try:
                cluster.sql(statement)
            except RuntimeError as e:
                failures.append(e)

        writer = threading.Thread(target=write, args=("""
            DO $$
            BEGIN
                FOR i IN 2..400 LOOP
                    INSERT INTO shapes (id, b) VALUES (i, i);
                    COMMIT;
                    PERFORM pg_sleep(0.01);
                END LOOP;
            END $$""",))
        writer.start()
        for statement in ("ALTER TABLE shapes DROP COLUMN a",
                          "ALTER TABLE shapes ALTER COLUMN b TYPE bigint",
                          "ALTER TABLE shapes DROP COLUMN c CASCADE",
                          "ALTER TABLE shapes ALTER COLUMN d TYPE varchar(10), ADD COLUMN e int",
                          "ALTER TABLE shapes DROP COLUMN d, DROP COLUMN e"):
            done = cluster.attempt_verbose(statement)
            assert done.returncode == 0, f"{statement}: {done}"
        writer.join()
        assert not failures, failures
        assert cluster.sql("SELECT count(*) FROM certyo.tracked_tables WHERE capturing") == "1", "still captured"
        assert cluster.sql("SELECT tgattr::text FROM pg_trigger WHERE tgname = 'certyo_capture'") == "", \
            "fired by every UPDATE, no column list"
        cluster.sql("UPDATE shapes SET b = 100 WHERE id = 1")
        assert cluster.wait_drained(60)
        records = [r for r in emulator.records() if r["collection"] == "public.shapes"]
        versions = Counter(r["recordId"] for r in records)
        assert versions == Counter({str(i): 2 if i == 1 else 1 for i in range(1, 401)}), \
            f"missing {Counter({str(i): 1 for i in range(1, 401)}) - versions}"
        latest = [r for r in records if r["recordId"] == "1"][-1]
        assert latest["recordPayload"] == {"id": 1, "b": 100}, latest

        refused = cluster.attempt_verbose("DROP TRIGGER certyo_capture ON shapes")
        assert refused.sqlstates == ["2BP01"] and "certyo.untrack(" in refused.stderr, refused
        assert cluster.sql("SELECT certyo.untrack('shapes')") == "t"
        assert cluster.sql("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'shapes'::regclass AND NOT tgisinternal") == "0"
    finally:
        cluster.pg_ctl("-m", "immediate", "stop")


def test_dump_and_restore_keeps_history_and_audit_and_delivery_goes_on(emulator):
    """pg_dump of a database with delivered, updated and still queued changes, restored into a
    new cluster: every table has a new OID there, yet the restored queue, deliveries and
    receipts find their tables again (by the name their changes were captured under), so
    certyo.audit() is clean, certyo.history() shows every version, and the changes that were
    still queued are delivered: each change in Certyo exactly once."""
    source = Cluster(PRIMARY_DIR, free_port(), emulator.url)
    target = None
    dump = f"{PRIMARY_DIR}.sql"
    try:
        source.sql("""
            CREATE EXTENSION certyo_cdc;
            CREATE TABLE decoy (id int);  -- so the restored table's OID differs
            CREATE TABLE ledger (id int PRIMARY KEY, amount numeric);
            SELECT certyo.track('ledger');
            INSERT INTO ledger SELECT g, g FROM generate_series(1, 30) g;
        """)
        assert source.wait_drained(30)
        source.sql("UPDATE ledger SET amount = amount * 10 WHERE id <= 5")
        assert source.wait_drained(30)
        source.sql("SELECT certyo.pause()")
        source.sql("INSERT INTO ledger SELECT g, g FROM generate_series(31, 40) g")
        assert source.sql("SELECT count(*) FROM certyo.queue") == "10"
        old_oid = source.sql("SELECT 'ledger'::regclass::oid")
        with open(dump, "w") as out:
            subprocess.run(["pg_dump", "-h", source.dir, "-p", str(source.port), "-U", "postgres", "postgres"],
                           stdout=out, check=True)
        source.pg_ctl("-m", "fast", "stop")

        target = Cluster(STANDBY_DIR, free_port(), emulator.url)
        target.sql("CREATE TABLE other (id int); CREATE TABLE another (id int)")  # OIDs move on
        restored = subprocess.run(["psql", "-h", target.dir, "-p", str(target.port), "-U", "postgres", "-X", "-q",
                                   "-d", "postgres", "-1", "-f", dump], capture_output=True, text=True)
        assert "ERROR" not in restored.stderr, restored.stderr
        assert target.sql("SELECT 'ledger'::regclass::oid") != old_oid, "the restored table has a new OID"
        # Audited at once: nothing but the changes still on their way (31 to 40, or fewer if the
        # worker has begun delivering them).
        findings = target.sql("SELECT string_agg(DISTINCT problem, ',') || ' ' || bool_and(record_id::int > 30) "
                              "FROM certyo.audit('ledger')")
        assert findings in ("not yet accepted true", ""), findings
        history = target.sql("SELECT string_agg(operation || ':' || state, ',' ORDER BY id) FROM certyo.history('ledger', '1')")
        assert history == "insert:accepted,update:accepted", history
        assert target.wait_drained(60), "the changes still queued at the dump are delivered"
        assert target.sql("SELECT count(*) FROM ledger WHERE certyo_record_hash IS NULL") == "0"
        assert target.sql("SELECT count(*) FROM certyo.audit('ledger')") == "0"
        versions = Counter(r["recordId"] for r in emulator.records() if r["collection"] == "public.ledger")
        assert versions == Counter({str(i): 2 if i <= 5 else 1 for i in range(1, 41)}), versions
    finally:
        for cluster in (target, source):
            if cluster is not None:
                try:
                    cluster.pg_ctl("-m", "immediate", "stop")
                except Exception:
                    pass


def test_renaming_a_tracked_table_or_its_schema_keeps_write_back_going(emulator):
    """The worker keeps its statements planned across passes, the lookup of a table's name and
    record key among them; a table renamed, then its schema, must still be written back under
    its new name, with nothing failing. (A key cached by table OID alone would miss the schema
    rename, which invalidates no relation, and write back to a name that is gone.)"""
    cluster = Cluster(PRIMARY_DIR, free_port(), emulator.url)
    try:
        cluster.sql("""
            CREATE EXTENSION certyo_cdc;
            CREATE SCHEMA shop;
            CREATE TABLE shop.items (id int PRIMARY KEY, v text);
            SELECT certyo.track('shop.items');
            INSERT INTO shop.items VALUES (1, 'first');
        """)
        assert cluster.wait_drained(30)
        assert cluster.sql("SELECT certyo_record_hash IS NOT NULL FROM shop.items WHERE id = 1") == "t"
        cluster.sql("ALTER TABLE shop.items RENAME TO goods; INSERT INTO shop.goods VALUES (2, 'after the table rename')")
        assert cluster.wait_drained(30)
        cluster.sql("ALTER SCHEMA shop RENAME TO store; INSERT INTO store.goods VALUES (3, 'after the schema rename');"
                    "UPDATE store.goods SET v = 'changed' WHERE id = 1")
        assert cluster.wait_drained(30)
        hashes = cluster.sql("""
            SELECT string_agg(format('%s:%s', g.id, g.certyo_record_hash = r.record_hash), ',' ORDER BY g.id)
              FROM store.goods g
              JOIN LATERAL (SELECT record_hash FROM certyo.receipt
                             WHERE relid = 'store.goods'::regclass AND record_id = g.id::text
                             ORDER BY id DESC LIMIT 1) r ON true""")
        assert hashes == "1:t,2:t,3:t", "each row carries its latest receipt's hash: " + hashes
        assert cluster.sql("SELECT count(*) FROM certyo.write_back_failure") == "0"
        assert cluster.sql("SELECT string_agg(collection, ',' ORDER BY id) FROM certyo.receipt") == \
            "shop.items,shop.goods,store.goods,store.goods"
    finally:
        cluster.stop()


def test_a_partitioned_table_is_tracked_with_its_partitions_present_and_future(emulator):
    """track() on a partitioned table captures every partition under the table's one name:
    partitions there before, created after, attached; writes through the table and straight
    into a partition; DDL on the table (a new column, a renamed column) keeps capture right. A
    detached partition is no longer captured. Tracking a partition itself, or a table with
    inheritance children (whose rows its triggers never see), is refused with the way out."""
    cluster = Cluster(PRIMARY_DIR, free_port(), emulator.url)
    try:
        cluster.sql("""
            CREATE EXTENSION certyo_cdc;
            CREATE TABLE events (id int, region text, v text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
            CREATE TABLE events_eu PARTITION OF events FOR VALUES IN ('eu');
            INSERT INTO events VALUES (1, 'eu', 'before tracking');
            SELECT certyo.track('events', backfill => true);
            CREATE TABLE events_us PARTITION OF events FOR VALUES IN ('us');
            CREATE TABLE events_apac (id int NOT NULL, region text NOT NULL, v text);  -- no bookkeeping columns
            ALTER TABLE events ATTACH PARTITION events_apac FOR VALUES IN ('apac');
            INSERT INTO events VALUES (2, 'eu', 'a'), (3, 'us', 'b'), (4, 'apac', 'c');
            INSERT INTO events_us VALUES (5, 'us', 'straight into the partition');
            UPDATE events SET v = 'changed' WHERE id = 2;
            DELETE FROM events WHERE id = 3;
        """)
        assert cluster.wait_drained(30)
        assert cluster.sql("SELECT count(*) FROM events WHERE certyo_record_hash IS NULL") == "0", "written back"
        assert cluster.sql("SELECT count(*) FROM certyo.audit('events')") == "0", "audit reads every partition"
        assert cluster.sql("SELECT string_agg(operation, ',' ORDER BY id) FROM certyo.history('events', '2/eu')") \
            == "insert,update"
        cluster.sql("""
            ALTER TABLE events ADD COLUMN note text;
            UPDATE events SET note = 'noted' WHERE id = 4;
            ALTER TABLE events RENAME COLUMN v TO val;
            INSERT INTO events VALUES (6, 'apac', 'after the rename');
        """)
        assert cluster.sql("SELECT string_agg(\"table\"::text, ',') FROM certyo.tracked_tables") == "events"
        assert cluster.wait_drained(30)
        records = [r for r in emulator.records() if r["collection"] == "public.events"]
        seen = Counter((r["recordId"], r["operationType"]) for r in records)
        assert seen == Counter({("1/eu", "upsert"): 1, ("2/eu", "insert"): 1, ("3/us", "insert"): 1,
                                ("4/apac", "insert"): 1, ("5/us", "insert"): 1, ("2/eu", "update"): 1,
                                ("3/us", "delete"): 1, ("4/apac", "update"): 1, ("6/apac", "insert"): 1}), seen
        last = {r["recordId"]: r["recordPayload"] for r in records}
        assert last["4/apac"] == {"id": 4, "region": "apac", "v": "c", "note": "noted"}, last["4/apac"]
        assert last["6/apac"] == {"id": 6, "region": "apac", "val": "after the rename", "note": None}, last["6/apac"]
        assert cluster.sql("SELECT certyo_record_hash IS NOT NULL FROM events WHERE id = 6") == "t"

        cluster.sql("ALTER TABLE events DETACH PARTITION events_apac")
        assert cluster.sql("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'events_apac'::regclass "
                           "AND tgname = 'certyo_capture'") == "0", "a detached partition is not captured"

        refused = cluster.attempt_verbose("SELECT certyo.track('events_eu')")
        # Names in messages are schema-qualified: track() reads them with search_path pinned.
        assert refused.sqlstates == ["42809"] and "certyo.track('public.events')" in refused.stderr, refused
        cluster.sql("CREATE TABLE base (id int PRIMARY KEY); CREATE TABLE kid () INHERITS (base)")
        refused = cluster.attempt_verbose("SELECT certyo.track('base')")
        assert refused.sqlstates == ["0A000"] and "inheritance children (public.kid)" in refused.stderr, refused
        cluster.sql("CREATE TABLE plain (id int PRIMARY KEY); SELECT certyo.track('plain')")
        cluster.sql("CREATE FOREIGN DATA WRAPPER dummy; CREATE SERVER dummy FOREIGN DATA WRAPPER dummy")
        # A foreign table's rows, inherited, would show in the tracked table, never captured.
        for statement in ("CREATE TABLE sub () INHERITS (plain)",
                          "CREATE TABLE sub (id int); ALTER TABLE sub INHERIT plain",
                          "CREATE FOREIGN TABLE sub () INHERITS (plain) SERVER dummy"):
            refused = cluster.attempt_verbose(statement)
            assert refused.sqlstates == ["0A000"] and "PARTITION OF public.plain" in refused.stderr, refused
            cluster.sql("DROP TABLE IF EXISTS sub")
    finally:
        cluster.pg_ctl("-m", "immediate", "stop")


def test_object_identifiers_render_the_same_under_every_search_path(emulator):
    """regclass, regtype and regproc values rendered by the writer's search_path: "app.lookup"
    under one, "lookup" under another, so the audit reported changes under every setting tried.
    They are written schema-qualified whatever the path. As a record key such a value is a name
    its object's owner may rename at any moment, so that a record id would name another row:
    track() refuses it, saying so."""
    cluster = Cluster(PRIMARY_DIR, free_port(), emulator.url)
    try:
        cluster.sql("""
            CREATE EXTENSION certyo_cdc;
            CREATE SCHEMA app;
            CREATE TABLE app.lookup (id int PRIMARY KEY);
            CREATE TYPE app.mood AS ENUM ('ok');
            CREATE FUNCTION app.f() RETURNS int LANGUAGE sql AS 'SELECT 1';
            CREATE TABLE app.refs (id int PRIMARY KEY, rel regclass, typ regtype, fn regproc);
            SELECT certyo.track('app.refs');
            CREATE TABLE app.keyed (rel regclass PRIMARY KEY);
        """)
        refused = subprocess.run(["psql", "-h", cluster.dir, "-p", str(cluster.port), "-U", "postgres", "-X", "-qAt",
                                  "-c", "SELECT certyo.track('app.keyed')"], capture_output=True, text=True)
        assert refused.returncode != 0 and "names of database objects" in refused.stderr, refused.stderr
        cluster.sql("SET search_path = app, public; "
                    "INSERT INTO app.refs VALUES (1, 'lookup', 'mood', 'f')")
        cluster.sql("SET search_path = public; "
                    "INSERT INTO app.refs VALUES (2, 'app.refs', 'app.mood[]', 'app.f')")
        assert wait_for(lambda: cluster.sql(
            "SELECT count(*) FROM app.refs WHERE certyo_record_hash IS NOT NULL") == "2", 30), \
            cluster.sql("SELECT error FROM certyo.write_back_failure")
        records = {r["recordId"]: r["recordPayload"] for r in emulator.records() if r["collection"] == "app.refs"}
        assert {k: records["1"][k] for k in ("rel", "typ", "fn")} == \
            {"rel": "app.lookup", "typ": "app.mood", "fn": "app.f"}, records
        assert {k: records["2"][k] for k in ("rel", "typ", "fn")} == \
            {"rel": "app.refs", "typ": "app.mood[]", "fn": "app.f"}, records
        for path in ("app, public", "public", "pg_catalog"):
            assert cluster.sql(f"SET search_path = {path}; SELECT count(*) FROM certyo.audit('app.refs')") == "0", path
    finally:
        cluster.stop()


def test_rows_entering_or_leaving_by_partition_ddl_are_captured(emulator):
    """ATTACH PARTITION brings a table's rows into a tracked table, DETACH PARTITION and DROP
    TABLE of a partition took them out, and no row trigger fires for any of them: Certyo never
    saw the rows that came (the audit said `never captured`) and kept the ones that went (`deleted
    without capture`), with the detached table's rows still claiming `anchored` however they
    changed while out. Now each row that enters is queued as an upsert (rows that bring marks are
    refused, with the UPDATE that clears them), each row that a DETACH takes out as a delete, in the statement's transaction, with the
    partitions held still; as the table's owner too. A drop of a partition (DROP TABLE, DROP
    SCHEMA ... CASCADE, DROP OWNED BY) is refused: detach it first. DETACH ... CONCURRENTLY is
    refused (it lets writers go on while the rows leave), and so is TRUNCATE of a partition,
    also through a foreign key's CASCADE, as the table's own; a session in replica mode queues nothing, as capture's triggers;
    and a DROP TABLE in a database without the extension, under a look-alike trigger, is left
    alone."""
    cluster = Cluster(PRIMARY_DIR, free_port(), emulator.url)

    def records(operation):
        return sorted(r["recordId"] for r in emulator.records()
                      if r["collection"] == "public.parts" and r["operationType"] == operation)

    def audit():
        return cluster.sql("SELECT string_agg(record_id || ':' || problem, ', ' ORDER BY record_id) FROM certyo.audit('parts')")

    try:
        cluster.sql("""
            CREATE EXTENSION certyo_cdc;
            CREATE ROLE parts_owner LOGIN;
            CREATE TABLE parts (id int, region text, v text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
            CREATE TABLE parts_eu PARTITION OF parts FOR VALUES IN ('eu');
            CREATE TABLE parts_us PARTITION OF parts FOR VALUES IN ('us');
            CREATE TABLE parts_ap PARTITION OF parts FOR VALUES IN ('ap');
            CREATE TABLE parts_sa PARTITION OF parts FOR VALUES IN ('sa', 'sb') PARTITION BY LIST (region);
            CREATE TABLE parts_sa1 PARTITION OF parts_sa FOR VALUES IN ('sa');
            CREATE TABLE parts_sa2 PARTITION OF parts_sa FOR VALUES IN ('sb');
            SELECT certyo.track('parts');
            INSERT INTO parts SELECT g, r, 'v' FROM generate_series(1, 3) g,
                                     unnest(ARRAY['eu', 'us', 'ap', 'sa', 'sb']) r;
        """)
        assert cluster.wait_drained(30)
        assert wait_for(lambda: cluster.sql("SELECT count(*) FROM parts WHERE certyo_record_hash IS NULL") == "0")

        detached = cluster.attempt_verbose("ALTER TABLE parts DETACH PARTITION parts_us")
        assert detached.returncode == 0 and "3 row(s) leave tracked table public.parts" in detached.stderr, detached
        # Out of the table, a row changes with no trigger to see it; its marks stay.
        cluster.sql("UPDATE parts_us SET v = 'changed while out' WHERE id = 1")
        assert cluster.wait_drained(30)
        assert records("delete") == ["1/us", "2/us", "3/us"]
        assert audit() == "", "nothing changed without capture: " + audit()

        # Its rows still say what was written back of them in parts (one changed since): back
        # in, they would claim it. Refused, with the statement that clears them.
        refused = cluster.attempt_verbose("ALTER TABLE parts ATTACH PARTITION parts_us FOR VALUES IN ('us')")
        assert refused.sqlstates == ["55000"] and "UPDATE public.parts_us SET" in refused.stderr, refused
        cluster.sql("UPDATE parts_us SET certyo_record_hash = NULL, certyo_anchor_status = 'pending', "
                    "certyo_verified_at = NULL")
        attached = cluster.attempt_verbose("ALTER TABLE parts ATTACH PARTITION parts_us FOR VALUES IN ('us')")
        assert attached.returncode == 0 and "3 row(s) entered tracked table public.parts" in attached.stderr, attached
        cluster.sql("""
            CREATE TABLE parts_in (id int NOT NULL, region text NOT NULL, v text);
            INSERT INTO parts_in VALUES (7, 'in', 'brought in');
            ALTER TABLE parts ATTACH PARTITION parts_in FOR VALUES IN ('in');
            SELECT certyo.resume();
        """)
        assert cluster.wait_drained(30)
        assert records("upsert") == ["1/us", "2/us", "3/us", "7/in"]
        latest = {r["recordId"]: r["recordPayload"] for r in emulator.records() if r["collection"] == "public.parts"}
        assert latest["1/us"]["v"] == "changed while out" and latest["7/in"]["v"] == "brought in"
        assert wait_for(lambda: cluster.sql("SELECT count(*) FROM parts WHERE certyo_record_hash IS NULL") == "0")

        # Someone who may not detach a partition (only the table's owner may) neither locks nor
        # reads it (nor learns its size): not a stranger, not the partition's own owner.
        cluster.sql("CREATE ROLE nobody LOGIN; CREATE ROLE part_only LOGIN; ALTER TABLE parts_ap OWNER TO part_only")
        for user in ("nobody", "part_only"):
            refused = cluster.attempt_verbose("ALTER TABLE parts DETACH PARTITION parts_ap", user=user)
            assert refused.sqlstates == ["42501"] and "leave tracked table" not in refused.stderr, refused
        # As the table's owner; a partitioned partition's rows go with it.
        cluster.sql("ALTER TABLE parts OWNER TO parts_owner; ALTER TABLE parts_ap OWNER TO parts_owner;"
                    "ALTER TABLE parts_sa OWNER TO parts_owner; ALTER TABLE parts_eu OWNER TO parts_owner;"
                    "ALTER TABLE parts_sa1 OWNER TO parts_owner")
        # A drop would take the rows out uncaptured (and pg_restore --clean drops each partition
        # before its table: no deletes may be queued there): refused, saying to detach first.
        for statement in ("DROP TABLE parts_ap", "DROP TABLE parts_sa, parts_sa1"):
            refused = cluster.attempt_verbose(statement, user="parts_owner")
            assert refused.sqlstates == ["55000"] and "DETACH PARTITION" in refused.stderr, refused
        for statement in ("ALTER TABLE parts DETACH PARTITION parts_ap; DROP TABLE parts_ap",
                          "ALTER TABLE parts DETACH PARTITION parts_sa; DROP TABLE parts_sa"):
            detached = cluster.attempt_verbose(statement, user="parts_owner")
            assert detached.returncode == 0 and "row(s) leave tracked table public.parts" in detached.stderr, detached
        assert cluster.wait_drained(30)
        assert records("delete") == ["1/ap", "1/sa", "1/sb", "1/us", "2/ap", "2/sa", "2/sb", "2/us",
                                     "3/ap", "3/sa", "3/sb", "3/us"]
        assert audit() == "", audit()

        refused = cluster.attempt_verbose("ALTER TABLE parts DETACH PARTITION parts_eu CONCURRENTLY")
        assert refused.sqlstates == ["0A000"] and "without CONCURRENTLY" in refused.stderr, refused
        refused = cluster.attempt_verbose("TRUNCATE parts_eu", user="parts_owner")
        assert refused.sqlstates == ["55000"] and "DELETE FROM public.parts_eu" in refused.stderr, refused
        cluster.sql("""
            CREATE TABLE regions (region text PRIMARY KEY);
            INSERT INTO regions VALUES ('eu');
            ALTER TABLE parts_eu ADD FOREIGN KEY (region) REFERENCES regions;
        """)
        refused = cluster.attempt_verbose("TRUNCATE regions CASCADE")
        assert refused.sqlstates == ["55000"] and "public.parts_eu" in refused.stderr, refused
        assert cluster.sql("SELECT count(*) FROM parts WHERE region = 'eu'") == "3", "still attached, every row"

        # Partitions no statement names: DROP SCHEMA ... CASCADE, DROP OWNED BY.
        cluster.sql("""
            CREATE SCHEMA sx;
            CREATE TABLE sx.parts_x PARTITION OF parts FOR VALUES IN ('x');
            CREATE ROLE dropper;
            CREATE TABLE parts_do PARTITION OF parts FOR VALUES IN ('do');
            ALTER TABLE parts_do OWNER TO dropper;
            INSERT INTO parts VALUES (8, 'x', 'in sx'), (9, 'do', 'of dropper');
        """)
        for statement in ("DROP SCHEMA sx CASCADE", "DROP OWNED BY dropper"):
            refused = cluster.attempt_verbose(statement)
            assert refused.sqlstates == ["55000"] and "DETACH PARTITION" in refused.stderr, refused
        assert cluster.sql("SELECT count(*) FROM parts WHERE region IN ('x', 'do')") == "2"

        # A partition whose rows bring marks is refused before anything runs: no trigger of its
        # owner's fires in the session of the superuser who attaches it.
        cluster.sql("""
            CREATE ROLE hostile LOGIN;
            CREATE SCHEMA hx AUTHORIZATION hostile;
        """)
        cluster.sql("""
            CREATE TABLE hx.parts_hx (id int NOT NULL, region text NOT NULL, v text, certyo_record_hash text,
                                      certyo_anchor_status text, certyo_verified_at timestamptz);
            CREATE FUNCTION hx.who() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN RAISE NOTICE 'ran as %', current_user; RETURN NEW; END $$;
            CREATE TRIGGER who BEFORE UPDATE ON hx.parts_hx FOR EACH ROW EXECUTE FUNCTION hx.who();
            INSERT INTO hx.parts_hx VALUES (9, 'hx', 'x', 'sha256:forged', 'anchored', now());
        """, user="hostile")
        refused = cluster.attempt_verbose("ALTER TABLE parts ATTACH PARTITION hx.parts_hx FOR VALUES IN ('hx')")
        assert refused.sqlstates == ["55000"] and "ran as" not in refused.stderr, refused
        # Nor does a partition become another extension's member (its DROP EXTENSION would drop it).
        refused = cluster.attempt_verbose("ALTER EXTENSION plpgsql ADD TABLE parts_eu")
        assert refused.sqlstates == ["55000"] and "Detach it from public.parts" in refused.stderr, refused
        # Nor a tracked table a partition of an untracked one (whose triggers it would take on).
        cluster.sql("""
            CREATE TABLE loose (id int NOT NULL, region text NOT NULL, v text) PARTITION BY LIST (region);
            CREATE TABLE solo (id int, region text, v text, PRIMARY KEY (id, region));
            SELECT certyo.track('solo');
        """)
        refused = cluster.attempt_verbose("ALTER TABLE loose ATTACH PARTITION solo FOR VALUES IN ('s')")
        assert refused.sqlstates == ["55000"] and "certyo.untrack('public.solo')" in refused.stderr, refused

        # Replica mode: as capture's triggers, nothing queued; the audit names the rows.
        cluster.sql("SET session_replication_role = replica; ALTER TABLE parts DETACH PARTITION parts_in")
        assert cluster.wait_drained(30)
        assert "7/in" not in records("delete")
        assert audit() == "7/in:deleted without capture", audit()
        # Out, its row changes, keeping what it said of its version in parts; tracked on its
        # own, no receipt of the table backs that: refused until cleared. Tracked so, it is no
        # partition to be.
        cluster.sql("UPDATE parts_in SET v = 'changed while out'")
        refused = cluster.attempt_verbose("SELECT certyo.track('parts_in')")
        assert refused.sqlstates == ["55000"] and "UPDATE public.parts_in SET" in refused.stderr, refused
        cluster.sql("UPDATE parts_in SET certyo_record_hash = NULL, certyo_anchor_status = 'pending', "
                    "certyo_verified_at = NULL; SELECT certyo.track('parts_in')")
        refused = cluster.attempt_verbose("ALTER TABLE parts ATTACH PARTITION parts_in FOR VALUES IN ('in')")
        assert refused.sqlstates == ["55000"] and "certyo.untrack('public.parts_in')" in refused.stderr, refused

        # A database without the extension: a trigger of that name, of anyone's function, is
        # not capture's; its partitions are dropped as ever.
        cluster.sql("CREATE DATABASE plain")
        cluster.sql("""
            CREATE FUNCTION certyo_capture_lookalike() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END';
            CREATE TABLE t (id int, r text) PARTITION BY LIST (r);
            CREATE TABLE t_a PARTITION OF t FOR VALUES IN ('a');
            CREATE TRIGGER certyo_capture AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION certyo_capture_lookalike('x');
            INSERT INTO t VALUES (1, 'a');
            ALTER TABLE t DETACH PARTITION t_a;
            ALTER TABLE t ATTACH PARTITION t_a FOR VALUES IN ('a');
            TRUNCATE t_a;
            DROP TABLE t_a;
        """, database="plain")
    finally:
        cluster.pg_ctl("-m", "immediate", "stop")
