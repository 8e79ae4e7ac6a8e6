"""Which table and which row a change belongs to, through a restore into a fresh cluster and
through a change of the record key: the receipts, deliveries and queued changes of a table
stay that table's (history and audit), and a write-back only ever marks the row whose version
it carries, never another table's or another row's.

Each test brings its own clusters and uses the Certyo emulator of conftest.py.

Run:  CERTYO_EMULATOR=target/release/certyo-emulator python3 -m pytest -q pg_test/test_identity.py
"""
import subprocess

import pytest

from harness import PG_BIN, TMP, Cluster, free_port, wait_for

SOURCE_DIR = f"{TMP}/certyo-e2e-identity-source"
TARGET_DIR = f"{TMP}/certyo-e2e-identity-target"
REKEY_DIR = f"{TMP}/certyo-e2e-identity-rekey"


@pytest.fixture(autouse=True)
def watch():
    """Overrides conftest's: these tests bring their own clusters."""
    yield None


def stop(*clusters):
    for cluster in clusters:
        if cluster is not None:
            try:
                cluster.pg_ctl("-m", "immediate", "stop")
            except Exception:
                pass


def wrongly_marked(cluster, table, key="id"):
    """Rows of `table` whose hash is not the newest accepted hash of their own record (same
    collection, same record id), or that say anchored without one: 'id:hash' each."""
    return cluster.sql(f"""
        SELECT coalesce(string_agg(t.{key}::text || ':' || coalesce(t.certyo_record_hash, '-'), ',' ORDER BY t.{key}), '')
          FROM {table} t
          LEFT JOIN LATERAL (SELECT r.record_hash FROM certyo.receipt r
                              WHERE r.collection = 'public.{table}' AND r.record_id = t.{key}::text
                              ORDER BY r.id DESC LIMIT 1) own ON true
         WHERE t.certyo_record_hash IS DISTINCT FROM own.record_hash""")


def foreign_hashes(cluster, table, key="id"):
    """Rows of `table` holding a hash Certyo gave another record (another table's, another
    row's): 'id:collection/record' each."""
    return cluster.sql(f"""
        SELECT coalesce(string_agg(t.{key}::text || ':' || r.collection || '/' || r.record_id, ',' ORDER BY t.{key}), '')
          FROM {table} t JOIN certyo.receipt r ON r.record_hash = t.certyo_record_hash
         WHERE r.collection <> 'public.{table}' OR r.record_id <> t.{key}::text""")


def restore(mode, source, target, dump_dir):
    """Dump `source` and restore it into `target` (a cluster initdb'd anew, nothing created in
    it): in one transaction, statement by statement (many transactions), or with two jobs."""
    connect = ["-h", source.dir, "-p", str(source.port), "-U", "postgres"]
    into = ["-h", target.dir, "-p", str(target.port), "-U", "postgres", "-d", "postgres"]
    if mode == "psql, many transactions":
        plain = f"{dump_dir}.sql"
        subprocess.run([f"{PG_BIN}/pg_dump", *connect, "-f", plain, "postgres"], check=True)
        done = subprocess.run(["psql", *into, "-X", "-q", "-f", plain], capture_output=True, text=True)
    else:
        archive = f"{dump_dir}.dump"
        subprocess.run([f"{PG_BIN}/pg_dump", *connect, "-Fc", "-f", archive, "postgres"], check=True)
        how = ["--single-transaction"] if mode == "pg_restore, one transaction" else ["-j", "2"]
        done = subprocess.run([f"{PG_BIN}/pg_restore", *into, *how, archive], capture_output=True, text=True)
    assert "ERROR" not in done.stderr, done.stderr


@pytest.mark.parametrize("mode", ["pg_restore, one transaction", "psql, many transactions", "pg_restore, two jobs",
                                  "pg_restore, two jobs, into a cluster with tables"])
def test_a_restore_into_a_fresh_cluster_keeps_each_tables_history_and_marks_only_its_rows(emulator, mode):
    """Two tracked tables and an untracked one between them, created in another order than a
    restore creates them: in a cluster initdb'd anew their OIDs differ from the source's and
    may be another table's old ones. After the restore, each record's history is its own, the
    audit is clean, the changes queued at the dump and the writes after the restore are
    delivered and written back, each row marked with its own record's hash only. (The foreign
    key is restored by an ALTER TABLE after the capture trigger, which refreshes the trigger
    while the restored rows still carry the old OIDs.)"""
    source = Cluster(SOURCE_DIR, free_port(), emulator.url)
    target = None
    try:
        source.sql("""
            CREATE EXTENSION certyo_cdc;
            CREATE TABLE zeta (id int PRIMARY KEY, v text);
            CREATE TABLE xtra (id int PRIMARY KEY, v text);
            CREATE TABLE pay (id int PRIMARY KEY, v text, x int REFERENCES xtra);  -- restored by an ALTER TABLE after its trigger
            SELECT certyo.track('zeta');
            SELECT certyo.track('pay');
            INSERT INTO zeta SELECT g, 'zeta ' || g FROM generate_series(1, 10) g;
            INSERT INTO xtra SELECT g, 'xtra ' || g FROM generate_series(1, 10) g;
            INSERT INTO pay SELECT g, 'pay ' || g FROM generate_series(1, 10) g;
            UPDATE zeta SET v = v || ' changed' WHERE id <= 3;
        """)
        assert source.wait_drained(30), source.explain()
        assert wait_for(lambda: source.sql("SELECT count(*) FROM certyo.receipt WHERE NOT written_back") == "0", 30)
        source.sql("SELECT certyo.pause()")
        assert wait_for(lambda: source.sql("SELECT state FROM certyo.worker_status()") == "paused", 10)
        source.sql("UPDATE zeta SET v = v || ' queued' WHERE id IN (5, 6); UPDATE pay SET v = v || ' queued' WHERE id = 7")
        assert source.sql("SELECT count(*) FROM certyo.queue") == "3"
        old = source.sql("SELECT string_agg(c.relname || '=' || c.oid, ',' ORDER BY c.relname) FROM pg_class c "
                         "WHERE c.relname IN ('zeta', 'xtra', 'pay')")
        target = Cluster(TARGET_DIR, free_port(), emulator.url)
        if mode.endswith("with tables"):
            target.sql("CREATE TABLE other (id int PRIMARY KEY, v text); CREATE TABLE another (id int)")
        restore(mode.removesuffix(", into a cluster with tables"), source, target, TARGET_DIR)
        source.stop()
        new = target.sql("SELECT string_agg(c.relname || '=' || c.oid, ',' ORDER BY c.relname) FROM pg_class c "
                         "WHERE c.relname IN ('zeta', 'xtra', 'pay')")
        print(f"OIDs before the dump {old}, after the restore {new}")

        # At once, worker or not: every record's history is its own table's.
        zeta_1 = target.sql("SELECT string_agg(operation || ':' || state, ',' ORDER BY id) FROM certyo.history('zeta', '1')")
        assert zeta_1 == "insert:accepted,update:accepted", zeta_1
        pay_5 = target.sql("SELECT string_agg(operation || ':' || state, ',' ORDER BY id) FROM certyo.history('pay', '5')")
        assert pay_5 == "insert:accepted", pay_5
        assert target.sql("SELECT count(*) FROM certyo.history('xtra', '1')") == "0"

        assert target.wait_drained(60), target.explain()
        target.sql("UPDATE pay SET v = v || ' after' WHERE id IN (1, 6); UPDATE zeta SET v = v || ' after' WHERE id = 2;"
                   "INSERT INTO zeta VALUES (11, 'zeta 11'); INSERT INTO pay VALUES (11, 'pay 11')")
        assert target.wait_drained(60), target.explain()
        for table in ("zeta", "pay"):
            assert wait_for(lambda: wrongly_marked(target, table) == "", 30), \
                f"{table}: rows not marked with their own record's newest hash: {wrongly_marked(target, table)}\n{target.explain()}"
            assert foreign_hashes(target, table) == "", f"{table}: rows marked with another record's hash"
            findings = target.sql(f"SELECT string_agg(record_id || ' ' || problem, ', ' ORDER BY record_id) FROM certyo.audit('{table}')")
            assert findings == "", f"{table}: {findings}"
        assert target.sql("SELECT count(*) FROM xtra WHERE v NOT LIKE 'xtra %'") == "0"
        history = target.sql("SELECT string_agg(operation, ',' ORDER BY id) FROM certyo.history('zeta', '6')")
        assert history == "insert,update", "the change queued at the dump is in its record's history: " + history
        history = target.sql("SELECT string_agg(operation, ',' ORDER BY id) FROM certyo.history('pay', '6')")
        assert history == "insert,update", "the change after the restore is in its record's history: " + history
        assert target.sql("SELECT count(*) FROM certyo.write_back_failure") == "0"
    finally:
        stop(target, source)


def rekey_cluster(emulator, schema):
    cluster = Cluster(REKEY_DIR, free_port(), emulator.url)
    cluster.sql("CREATE EXTENSION certyo_cdc;" + schema)
    return cluster


def rk_cluster(emulator):
    """A cluster with table rk tracked by id (row id=n has code=n+1), its ten rows delivered."""
    cluster = rekey_cluster(emulator, """
        CREATE TABLE rk (id int PRIMARY KEY, code int NOT NULL UNIQUE, v text);
        SELECT certyo.track('rk');
        INSERT INTO rk SELECT g, g + 1, 'first' FROM generate_series(1, 10) g;""")
    assert cluster.wait_drained(30), cluster.explain()
    return cluster


def pause(cluster):
    cluster.sql("SELECT certyo.pause()")
    assert wait_for(lambda: cluster.sql("SELECT state FROM certyo.worker_status()") == "paused", 10)


def test_tracking_again_with_other_record_id_columns_never_marks_a_row_with_another_rows_hash(emulator):
    """Ten updates queued under the key id, then the table tracked by the column code (row id=n
    has code=n+1): those updates are delivered under the key they were captured with (Certyo's
    record ids 1..10), and their write-back, which no longer has a key to find its row by, is
    dropped and recorded, never put on the row whose code equals the old id."""
    cluster = rk_cluster(emulator)
    try:
        pause(cluster)
        cluster.sql("UPDATE rk SET v = 'queued'")
        cluster.sql("SELECT certyo.track('rk', record_id_columns => ARRAY['code'])")
        cluster.sql("SELECT certyo.resume()")
        assert cluster.wait_drained(30), cluster.explain()
        assert wait_for(lambda: cluster.sql("SELECT count(*) FROM certyo.receipt WHERE NOT written_back") == "0", 30), \
            cluster.explain()
        sent = sorted(r["recordId"] for r in emulator.records() if r["collection"] == "public.rk")
        assert sent == sorted([str(i) for i in range(1, 11)] * 2), "each change under the key it was captured with"
        marked = cluster.sql("""
            SELECT coalesce(string_agg(t.id || '<-' || r.record_id, ',' ORDER BY t.id), '')
              FROM rk t JOIN certyo.receipt r ON r.record_hash = t.certyo_record_hash AND r.operation <> 'insert'""")
        assert marked == "", "rows marked with the hash of an update captured for another row: " + marked
        dropped = cluster.sql("SELECT count(*) FROM certyo.receipt WHERE write_back_dropped IS NOT NULL")
        assert dropped == "10", "the dropped write-backs are recorded"
        findings = cluster.sql("SELECT string_agg(record_id || ' ' || problem, ', ') FROM certyo.audit('rk') WHERE record_id IS NOT NULL")
        assert findings == "", "a row whose version's write-back was dropped is no forgery: " + findings
        assert cluster.sql("SELECT count(*) FROM certyo.write_back_failure") == "0"

        # Under the new key, the next change is written back to its row.
        cluster.sql("UPDATE rk SET v = 'after' WHERE id = 1")
        assert cluster.wait_drained(30), cluster.explain()
        assert wait_for(lambda: wrongly_marked(cluster, "rk", "code").split(",")[0] != "2:", 30)
        own = cluster.sql("""SELECT t.certyo_record_hash = r.record_hash FROM rk t, certyo.receipt r
                              WHERE t.id = 1 AND r.record_id = '2' AND r.id = (SELECT max(id) FROM certyo.receipt)""")
        assert own == "t", cluster.explain()
    finally:
        stop(cluster)


def test_a_primary_key_moved_to_a_column_of_another_type_drops_the_old_keys_write_backs(emulator):
    """Updates queued under a text primary key, then the primary key moved to an int column:
    the old versions' write-back cannot be cast to the new key, and is dropped and recorded
    instead of failing forever; the worker goes on, and the next change is written back."""
    cluster = rekey_cluster(emulator, """
        CREATE TABLE pk (k text PRIMARY KEY, n int NOT NULL UNIQUE, v text);
        SELECT certyo.track('pk');
        INSERT INTO pk SELECT 'K' || g, g, 'first' FROM generate_series(1, 10) g;""")
    try:
        assert cluster.wait_drained(30), cluster.explain()
        pause(cluster)
        cluster.sql("UPDATE pk SET v = 'queued'")
        cluster.sql("ALTER TABLE pk DROP CONSTRAINT pk_pkey, ADD PRIMARY KEY (n)")
        assert cluster.sql("SELECT record_id_columns FROM certyo.tracked_tables") == "{n}"
        cluster.sql("SELECT certyo.resume()")
        assert cluster.wait_drained(30), cluster.explain()
        assert wait_for(lambda: cluster.sql("SELECT count(*) FROM certyo.receipt WHERE NOT written_back") == "0", 30), \
            cluster.explain()
        assert cluster.sql("SELECT count(*) FROM certyo.receipt WHERE write_back_dropped IS NOT NULL") == "10"
        assert cluster.sql("SELECT count(*) FROM certyo.write_back_failure") == "0"
        assert cluster.sql("SELECT state FROM certyo.worker_status()") != "write-back failing"
        findings = cluster.sql("SELECT string_agg(record_id || ' ' || problem, ', ') FROM certyo.audit('pk') WHERE record_id IS NOT NULL")
        assert findings == "", "a row whose version's write-back was dropped is no forgery: " + findings
        cluster.sql("UPDATE pk SET v = 'after' WHERE n = 3")
        assert cluster.wait_drained(30), cluster.explain()
        own = cluster.sql("""SELECT t.certyo_record_hash = r.record_hash FROM pk t, certyo.receipt r
                              WHERE t.n = 3 AND r.record_id = '3' AND r.collection = 'public.pk'""")
        assert wait_for(lambda: cluster.sql("""SELECT t.certyo_record_hash = r.record_hash FROM pk t, certyo.receipt r
                              WHERE t.n = 3 AND r.record_id = '3' AND r.collection = 'public.pk'""") == "t", 30), own
    finally:
        stop(cluster)


def test_a_restored_change_whose_table_is_not_restored_waits_for_it_and_marks_no_other(emulator):
    """A dump restored without one of its tracked tables: the extension cannot tell where that
    table's changes go, says so (a WARNING), and writes none of them back, not to another table
    that now has the old OID, nor to a table made later under that name and tracked anew (a
    new identity). Once the table itself is restored from the same dump (its capture trigger
    carries its identity), its changes find it, and the change queued at the dump is written
    back to its row."""
    source = Cluster(SOURCE_DIR, free_port(), emulator.url)
    target = None
    archive = f"{TARGET_DIR}.dump"
    try:
        source.sql("""
            CREATE EXTENSION certyo_cdc;
            CREATE TABLE pay (id int PRIMARY KEY, v text);
            CREATE TABLE zeta (id int PRIMARY KEY, v text);
            SELECT certyo.track('pay');
            SELECT certyo.track('zeta');
            INSERT INTO pay SELECT g, 'pay ' || g FROM generate_series(1, 10) g;
            INSERT INTO zeta SELECT g, 'zeta ' || g FROM generate_series(1, 10) g;
        """)
        assert source.wait_drained(30), source.explain()
        assert wait_for(lambda: source.sql("SELECT count(*) FROM certyo.receipt WHERE NOT written_back") == "0", 30)
        pause(source)
        source.sql("UPDATE pay SET v = 'queued' WHERE id = 7")
        connect = ["-h", source.dir, "-p", str(source.port), "-U", "postgres"]
        subprocess.run([f"{PG_BIN}/pg_dump", *connect, "-Fc", "-f", archive, "postgres"], check=True)
        source.stop()
        listing = subprocess.run([f"{PG_BIN}/pg_restore", "-l", archive], check=True, capture_output=True,
                                 text=True).stdout.splitlines()
        of_pay = [line for line in listing if " public pay " in line]
        assert len(of_pay) >= 4, listing  # the table, its data, its key, its triggers
        with open(f"{TARGET_DIR}.without", "w") as out:
            out.write("\n".join(line for line in listing if line not in of_pay) + "\n")
        with open(f"{TARGET_DIR}.pay", "w") as out:
            out.write("\n".join(of_pay) + "\n")

        target = Cluster(TARGET_DIR, free_port(), emulator.url)
        into = ["-h", target.dir, "-p", str(target.port), "-U", "postgres", "-d", "postgres"]
        done = subprocess.run([f"{PG_BIN}/pg_restore", *into, "--single-transaction", "-L", f"{TARGET_DIR}.without",
                               archive], capture_output=True, text=True)
        assert "ERROR" not in done.stderr, done.stderr
        assert target.wait_drained(60), target.explain()
        assert wait_for(lambda: "public.pay (id" in target.log() and "is not in this database" in target.log(), 30), \
            target.explain()
        assert target.sql("SELECT relid FROM certyo.table_identity WHERE table_name = 'pay'") == "0"
        assert wrongly_marked(target, "zeta") == "" and foreign_hashes(target, "zeta") == ""
        assert target.sql("SELECT count(*) FROM certyo.audit('zeta')") == "0"

        # Restored now, from the same dump: its changes find it by its trigger.
        done = subprocess.run([f"{PG_BIN}/pg_restore", *into, "--single-transaction", "-L", f"{TARGET_DIR}.pay", archive],
                              capture_output=True, text=True)
        assert "ERROR" not in done.stderr, done.stderr
        assert wait_for(lambda: wrongly_marked(target, "pay") == "", 30), \
            f"pay: {wrongly_marked(target, 'pay')}\n{target.explain()}"
        assert target.sql("SELECT v FROM pay WHERE id = 7") == "queued"
        history = target.sql("SELECT string_agg(operation || ':' || state, ',' ORDER BY id) FROM certyo.history('pay', '7')")
        assert history == "insert:accepted,update:accepted", history
        assert target.sql("SELECT count(*) FROM certyo.audit('pay')") == "0"
        assert wrongly_marked(target, "zeta") == ""
    finally:
        stop(target, source)


def audit_lines(cluster, table):
    """The audit's findings: 'record_id: problem' for rows, 'table: problem: detail' for the table."""
    return cluster.sql(f"SELECT coalesce(string_agg(coalesce(record_id || ': ' || problem, 'table: ' || problem || ': ' || detail), "
                       f"', ' ORDER BY record_id NULLS FIRST), '') FROM certyo.audit('{table}')")


def assert_no_row_finding(cluster, table):
    """The audit of `table` names no row (findings about the table itself aside)."""
    rows = cluster.sql(f"SELECT count(*) FROM certyo.audit('{table}') WHERE record_id IS NOT NULL")
    assert rows == "0", audit_lines(cluster, table)


@pytest.mark.parametrize("ddl", ["DROP COLUMN extra", "DROP COLUMN extra, ADD COLUMN extra text"])
def test_a_column_dropped_before_a_dump_keeps_the_audit_true_after_a_restore_into_a_fresh_cluster(emulator, ddl):
    """A column dropped before the dump: the restored table's columns are numbered anew (the
    dropped one leaves no gap), while the capture shapes kept the source's attribute numbers.
    After the restore into a fresh cluster the audit says what it said before the dump (the
    schema change, no row), and a row changed behind the trigger's back afterwards is found,
    exactly that one. (The foreign key is restored by an ALTER TABLE after the capture trigger,
    which records the table's shape while the restore runs.)"""
    source = Cluster(SOURCE_DIR, free_port(), emulator.url)
    target = None
    try:
        source.sql(f"""
            CREATE EXTENSION certyo_cdc;
            CREATE TABLE ref (id int PRIMARY KEY);
            INSERT INTO ref SELECT g FROM generate_series(1, 10) g;
            CREATE TABLE dropped (id int PRIMARY KEY, a text, extra text, v text, r int REFERENCES ref);
            SELECT certyo.track('dropped');
            INSERT INTO dropped SELECT g, 'a' || g, 'extra' || g, 'v' || g, g FROM generate_series(1, 10) g;
            ALTER TABLE dropped {ddl};
            UPDATE dropped SET a = 'after' WHERE id = 9;
        """)
        assert source.wait_drained(30), source.explain()
        assert wait_for(lambda: source.sql("SELECT count(*) FROM certyo.receipt WHERE NOT written_back") == "0", 30)
        before = audit_lines(source, "dropped")
        assert before.startswith("table: schema changed since capture: dropped \"extra\""), before
        assert "changed without capture" not in before and "deleted" not in before, before
        target = Cluster(TARGET_DIR, free_port(), emulator.url)
        restore("pg_restore, one transaction", source, target, TARGET_DIR)
        source.stop()
        assert audit_lines(target, "dropped") == before, "the restore changes nothing the audit says"
        assert target.wait_drained(60), target.explain()
        assert audit_lines(target, "dropped") == before, "nor does the worker's first pass"
        target.sql("SET session_replication_role = replica; UPDATE dropped SET v = 'tampered' WHERE id = 3")
        assert audit_lines(target, "dropped") == before + ", 3: changed without capture", \
            "a row changed behind the trigger's back after the restore is found, and only it"
    finally:
        stop(target, source)


@pytest.mark.parametrize("how", ["old key column excluded", "old key column dropped"])
def test_a_table_tracked_again_under_another_key_audits_as_a_key_change_not_as_deleted_or_uncaptured_rows(emulator, how):
    """Tracked again with a record key that leaves out the old key column, and that column out
    of the payload (excluded, or dropped): the receipts captured under the old key are no
    deleted rows, nor are the rows never captured. The audit says what happened for the table
    (the record key changed since capture). Excluded, the rows are still found under the old
    key: a row changed and a row deleted behind the trigger's back are found, under the record
    id they were captured with. Dropped, no key finds the old versions; a row captured since,
    then changed behind the trigger's back, is found."""
    cluster = rk_cluster(emulator)
    try:
        if how.endswith("excluded"):
            cluster.sql("SELECT certyo.track('rk', record_id_columns => ARRAY['code'], exclude_columns => ARRAY['id'])")
        else:
            cluster.sql("SELECT certyo.track('rk', record_id_columns => ARRAY['code']); ALTER TABLE rk DROP COLUMN id")
        findings = audit_lines(cluster, "rk")
        assert 'table: schema changed since capture: record id ("id") to ("code")' in findings \
            and "capture, " not in findings and not findings.endswith("capture"), \
            "findings for the table only: " + findings
        if how.endswith("excluded"):
            cluster.sql("SET session_replication_role = replica; UPDATE rk SET v = 'tampered' WHERE id = 3; "
                        "DELETE FROM rk WHERE id = 5")
            expected = "3: changed without capture, 5: deleted without capture"
        else:
            cluster.sql("UPDATE rk SET v = 'second' WHERE code = 8")
            assert cluster.wait_drained(30), cluster.explain()
            cluster.sql("SET session_replication_role = replica; UPDATE rk SET v = 'tampered' WHERE code = 8")
            expected = "8: changed without capture"
        rows = cluster.sql("SELECT string_agg(record_id || ': ' || problem, ', ' ORDER BY record_id) "
                           "FROM certyo.audit('rk') WHERE record_id IS NOT NULL")
        assert rows == expected, rows
    finally:
        stop(cluster)


def test_a_backfill_open_at_the_dump_is_not_continued_on_another_table_after_a_restore(emulator):
    """A backfill names its table and the role that asked by OID, and a restore into a fresh
    cluster gives those OIDs to others. A backfill still open at the dump is not continued on
    whatever table its OID names now: the worker marks it failed, with a WARNING, and nothing
    of any table is queued by it; requested again, it runs."""
    source = Cluster(SOURCE_DIR, free_port(), emulator.url)
    target = None
    try:
        source.sql("""
            CREATE EXTENSION certyo_cdc;
            CREATE TABLE secret (id int PRIMARY KEY, v text);
            INSERT INTO secret SELECT g, 'secret ' || g FROM generate_series(1, 5) g;
            CREATE TABLE pay (id int PRIMARY KEY, v text);
            INSERT INTO pay SELECT g, 'pay ' || g FROM generate_series(1, 5) g;
            SELECT certyo.track('pay');
        """)
        # The table held so that the backfill's chunks wait (EXCLUSIVE: pg_dump may still read).
        holder = subprocess.Popen(["psql", "-h", source.dir, "-p", str(source.port), "-U", "postgres", "-X", "-q", "-At",
                                   "-d", "postgres"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        holder.stdin.write("BEGIN; LOCK TABLE pay IN EXCLUSIVE MODE; SELECT 'held';\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "held"
        source.sql("SELECT certyo.backfill('pay')")
        target = Cluster(TARGET_DIR, free_port(), emulator.url)
        restore("pg_restore, one transaction", source, target, TARGET_DIR)
        holder.stdin.close()
        holder.wait(timeout=30)
        source.stop()
        assert wait_for(lambda: target.sql("SELECT state FROM certyo.backfills") == "failed", 30), target.explain()
        assert "restored" in target.sql("SELECT error FROM certyo.backfills")
        assert "not continued after its restore" in target.log()
        assert target.sql("SELECT count(*) FROM certyo.receipt WHERE collection <> 'public.pay'") == "0"
        target.sql("SELECT certyo.backfill('pay')")
        assert wait_for(lambda: target.sql("SELECT count(*) FROM certyo.receipt WHERE collection = 'public.pay'") == "5",
                        30), target.explain()
        assert target.sql("SELECT count(*) FROM certyo.receipt WHERE collection <> 'public.pay'") == "0"
    finally:
        stop(target, source)


def test_a_row_deleted_or_rekeyed_through_capture_after_its_primary_key_moved_is_no_finding(emulator):
    """Rows captured under the primary key id, then the primary key moved to n, then one row
    deleted and another's id changed (both captured: Certyo gets a delete and an update, under
    the record ids n gives them now). The audit reports the schema change, and nothing about
    either row: what happened to them was captured, so neither was "deleted without capture"
    under the record id it had before the move. (Found by pg_test/test_sequences.py, seeds
    303, 74863709 and 171216525.)"""
    cluster = rekey_cluster(emulator, """
        CREATE TABLE pkd (id int PRIMARY KEY, n int NOT NULL UNIQUE, v text);
        SELECT certyo.track('pkd');
        INSERT INTO pkd SELECT g, 100 + g, 'first' FROM generate_series(1, 3) g;""")
    try:
        assert cluster.wait_drained(30), cluster.explain()
        cluster.sql("ALTER TABLE pkd DROP CONSTRAINT pkd_pkey, ADD PRIMARY KEY (n)")
        cluster.sql("DELETE FROM pkd WHERE id = 2")
        cluster.sql("UPDATE pkd SET id = 30 WHERE id = 3")
        assert cluster.wait_drained(30), cluster.explain()
        sent = [(r["recordId"], r["operationType"]) for r in emulator.records() if r["collection"] == "public.pkd"]
        assert ("102", "delete") in sent and ("103", "update") in sent, sent
        findings = cluster.sql("SELECT string_agg(record_id || ' ' || problem, ', ') FROM certyo.audit('pkd') "
                               "WHERE record_id IS NOT NULL")
        assert findings == "", "a deletion or key change that was captured is no tampering: " + findings
    finally:
        stop(cluster)


@pytest.mark.parametrize("how", ["while untracked", "behind the trigger"])
def test_a_key_column_changed_without_capture_before_a_rekey_is_a_change_not_a_deletion(emulator, how):
    """A row's column k changes without capture (while the table is untracked, or in replica
    mode behind the trigger's back); then the table is tracked again with k as its record key.
    The row is still there, under the old key too: the audit finds it changed without capture,
    in k, under the record id it was captured with, and not deleted beside a row never
    captured. Captured again, the row is no finding. (Found by pg_test/test_sequences.py, seed
    962766491.)"""
    cluster = rekey_cluster(emulator, """
        CREATE TABLE kc (id int PRIMARY KEY, k text NOT NULL UNIQUE, v text);
        SELECT certyo.track('kc');
        INSERT INTO kc VALUES (70, 'a', 'v1'), (71, 'c', 'v1');""")
    try:
        assert cluster.wait_drained(30), cluster.explain()
        if how == "while untracked":
            cluster.sql("SELECT certyo.untrack('kc'); UPDATE kc SET k = 'b' WHERE id = 70; SELECT certyo.track('kc')")
        else:
            cluster.sql("SET session_replication_role = replica; UPDATE kc SET k = 'b' WHERE id = 70")
        assert audit_lines(cluster, "kc") == "70: changed without capture", audit_lines(cluster, "kc")
        cluster.sql("SELECT certyo.track('kc', record_id_columns => ARRAY['k'])")
        rows = cluster.sql("SELECT string_agg(record_id || ': ' || problem || coalesce(' (' || detail || ')', ''), ', ') "
                           "FROM certyo.audit('kc') WHERE record_id IS NOT NULL")
        assert rows == '70: changed without capture (differs in "k")', rows
        # Captured again under its new record id, the row is no finding (a change without
        # capture is forgiven once the row is captured again, as ever).
        cluster.sql("UPDATE kc SET v = 'v2' WHERE id = 70")
        assert cluster.wait_drained(30), cluster.explain()
        assert_no_row_finding(cluster, "kc")
    finally:
        stop(cluster)


def rekeyed_a_to_b(emulator, table, rows):
    """A cluster with `table` (a, b unique, v) tracked by a, `rows` delivered, then re-keyed by b."""
    cluster = rekey_cluster(emulator, f"""
        CREATE TABLE {table} (a int NOT NULL UNIQUE, b int NOT NULL UNIQUE, v text);
        SELECT certyo.track('{table}', record_id_columns => ARRAY['a']);
        INSERT INTO {table} VALUES {rows};""")
    assert cluster.wait_drained(30), cluster.explain()
    cluster.sql(f"SELECT certyo.track('{table}', record_id_columns => ARRAY['b'])")
    return cluster


@pytest.mark.parametrize("then", ["taken by a row", "taken by a new row", "taken, freed and taken again"])
def test_a_row_deleted_without_capture_whose_old_key_another_row_takes_stays_a_finding(emulator, then):
    """Records keyed by a, re-keyed by b. Row Y (a = 2, b = 20) is deleted behind the trigger's
    back; then, through capture, row X takes Y's old value of a; or a new row does; or new rows
    take Y's value of b, one after the other. Another row holding Y's old record id or key
    values is not Y: Y's record is still deleted without capture, and no other is a finding."""
    cluster = rekeyed_a_to_b(emulator, "dk", "(1, 10, 'x'), (2, 20, 'y')")
    try:
        cluster.sql("SET session_replication_role = replica; DELETE FROM dk WHERE b = 20")
        rows = "SELECT string_agg(record_id || ': ' || problem, ', ' ORDER BY record_id) FROM certyo.audit('dk') WHERE record_id IS NOT NULL"
        assert cluster.sql(rows) == "2: deleted without capture", cluster.sql(rows)
        cluster.sql({"taken by a row": "UPDATE dk SET a = 2 WHERE b = 10",
                     "taken by a new row": "INSERT INTO dk VALUES (2, 15, 'n')",
                     "taken, freed and taken again": "INSERT INTO dk VALUES (3, 20, 'z'); DELETE FROM dk WHERE a = 3; "
                                                     "INSERT INTO dk VALUES (4, 20, 'q')"}[then])
        assert cluster.wait_drained(30), cluster.explain()
        assert cluster.sql(rows) == "2: deleted without capture", cluster.sql(rows)
    finally:
        stop(cluster)


@pytest.mark.parametrize("how", ["reused", "swapped"])
def test_key_values_that_pass_between_rows_through_capture_after_a_rekey_are_no_finding(emulator, how):
    """Records keyed by a, re-keyed by b; then, all through capture, a row's b changes and a new
    row takes its old value ("reused"), or two rows swap their values of b by way of a third
    ("swapped"). Under b the old value's record was deleted and inserted again by another row:
    its newest version is that insert, but the delete before it tells that the row captured
    under a went on. Nothing was done behind capture's back: no finding of a row."""
    cluster = rekeyed_a_to_b(emulator, "kv", "(1, 10, 'x'), (2, 20, 'y'), (3, 30, 'z')")
    try:
        if how == "reused":
            cluster.sql("UPDATE kv SET b = 11 WHERE a = 1; INSERT INTO kv VALUES (5, 10, 'w')")
        else:
            cluster.sql("UPDATE kv SET b = 99 WHERE a = 1; UPDATE kv SET b = 10 WHERE a = 2; UPDATE kv SET b = 20 WHERE a = 1")
        assert cluster.wait_drained(30), cluster.explain()
        assert_no_row_finding(cluster, "kv")
    finally:
        stop(cluster)


@pytest.mark.parametrize("tampered", [True, False])
def test_a_rekey_and_a_retype_neither_hide_a_deletion_nor_raise_a_false_one(emulator, tampered):
    """Records keyed by a, re-keyed by b, b retyped (its values render otherwise since, so whether
    a row holds a record's values of b cannot be told). Row Y is deleted behind the trigger's
    back and row X takes Y's old value of a through capture: the audit is not silent. Without
    the deletion, X changed through capture is no finding."""
    cluster = rekeyed_a_to_b(emulator, "rd", "(1, 10, 'x'), (2, 20, 'y')")
    try:
        cluster.sql("ALTER TABLE rd ALTER COLUMN b TYPE text")
        if tampered:
            cluster.sql("SET session_replication_role = replica; DELETE FROM rd WHERE a = 2")
            cluster.sql("UPDATE rd SET a = 2 WHERE a = 1")
        else:
            cluster.sql("UPDATE rd SET v = 'w' WHERE a = 1")
        assert cluster.wait_drained(30), cluster.explain()
        rows = cluster.sql("SELECT count(*) FROM certyo.audit('rd') WHERE record_id IS NOT NULL")
        assert (rows != "0") == tampered, audit_lines(cluster, "rd")
    finally:
        stop(cluster)


def test_the_present_key_retyped_after_a_rekey_is_no_finding_of_a_row(emulator):
    """Records keyed by a, re-keyed by b, then b retyped (int to text, the same values): no row
    changed, so the audit names none (the schema changes are the table's findings)."""
    cluster = rekeyed_a_to_b(emulator, "rt", "(1, 10, 'x'), (2, 20, 'y')")
    try:
        cluster.sql("ALTER TABLE rt ALTER COLUMN b TYPE text")
        assert_no_row_finding(cluster, "rt")
    finally:
        stop(cluster)


def test_a_table_untracked_at_the_dump_and_tracked_again_after_the_restore_keeps_its_receipts(emulator):
    """A table tracked, delivered, then untracked (its receipts wait to be written back until
    it is tracked again), dumped, and restored into a fresh cluster by a script that tracks it
    again in the same transaction (before any worker or audit ran the relink): track() finds
    the table's restored identity by its name, so its receipts are written back to its rows,
    and the audit finds nothing. (Found by pg_test/test_sequences.py, seed 448011321: the
    receipts waited for "their own table" forever, a WARNING every pass, and the audit called
    every row "never captured".)"""
    source = Cluster(SOURCE_DIR, free_port(), emulator.url)
    target = None
    try:
        source.sql("""
            CREATE EXTENSION certyo_cdc;
            CREATE TABLE ut (id int PRIMARY KEY, v text);
            SELECT certyo.track('ut');
            INSERT INTO ut SELECT g, 'first' FROM generate_series(1, 3) g;""")
        assert source.wait_drained(30), source.explain()
        assert wait_for(lambda: source.sql("SELECT count(*) FROM ut WHERE certyo_record_hash IS NULL") == "0", 30)
        source.sql("SELECT certyo.untrack('ut')")
        plain = f"{TARGET_DIR}.sql"
        subprocess.run([f"{PG_BIN}/pg_dump", "-h", source.dir, "-p", str(source.port), "-U", "postgres", "-f", plain,
                        "postgres"], check=True)
        source.stop()
        with open(plain, "a") as script:
            script.write("\nSELECT certyo.track('public.ut');\n")
        target = Cluster(TARGET_DIR, free_port(), emulator.url)
        done = subprocess.run(["psql", "-h", target.dir, "-p", str(target.port), "-U", "postgres", "-d", "postgres", "-X",
                               "-q", "-1", "-v", "ON_ERROR_STOP=1", "-f", plain], capture_output=True, text=True)
        assert done.returncode == 0 and "ERROR" not in done.stderr, done.stderr
        assert wait_for(lambda: target.sql("SELECT count(*) FROM certyo.receipt WHERE NOT written_back") == "0", 30), \
            target.explain()
        assert wrongly_marked(target, "ut") == "", wrongly_marked(target, "ut")
        findings = target.sql("SELECT string_agg(coalesce(record_id, '-') || ' ' || problem, ', ') FROM certyo.audit('ut')")
        assert findings == "", findings
        assert "wait until their own table is found" not in target.log(), target.explain()
    finally:
        stop(target, source)


def workers_relink_check():
    """The worker's kept statement that asks what certyo.relink_needed() asks
    (src/track/identity.rs, RELINK_NEEDED), its parameters given as the SQL functions give them
    (the worker reads the triggers' ids as certyo.tracked_oids() does, once per trigger)."""
    from pathlib import Path
    import re
    source = (Path(__file__).resolve().parent.parent / "src/track/identity.rs").read_text()
    statement = re.search(r'pub const RELINK_NEEDED: &str = "(.*?)";', source, re.S).group(1)
    return (statement.replace("$1", "certyo.this_installation()")
            .replace("$2", "ARRAY(SELECT relid FROM certyo.tracked_oids() ORDER BY relid)")
            .replace("$3", "ARRAY(SELECT table_id FROM certyo.tracked_oids() ORDER BY relid)"))


def test_the_workers_relink_check_answers_as_relink_needed(emulator):
    """The worker asks, at every pass, whether the table ids' OIDs may be wrong, in a statement
    of its own (planned once) rather than by calling certyo.relink_needed(): both must answer
    alike in every state that makes either true, and in those that must not."""
    cluster = rekey_cluster(emulator, """
        CREATE TABLE a (id int PRIMARY KEY, v text); SELECT certyo.track('a');
        CREATE TABLE b (id int PRIMARY KEY, v text); SELECT certyo.track('b');
        CREATE TABLE c (id int PRIMARY KEY, v text);""")
    try:
        pause(cluster)
        check = workers_relink_check()

        def both():
            # One statement, one snapshot: the worker may relink between two.
            return tuple(cluster.sql(f"SELECT certyo.relink_needed(), ({check})").split("|"))

        def both_after(change):
            """Both answers in the transaction that makes the change, left uncommitted (the
            worker would relink at once)."""
            out = cluster.sql(f"BEGIN; {change}; SELECT certyo.relink_needed(), ({check})")
            return tuple(out.splitlines()[-1].split("|"))

        assert both() == ("f", "f")
        a_id = cluster.sql("SELECT id FROM certyo.table_identity WHERE table_name = 'a'")
        # restored from another installation
        assert both_after("UPDATE certyo.table_identity SET installation = 'elsewhere' WHERE table_name = 'a'") \
            == ("t", "t")
        # an id placed at an OID that names no table here, or another table
        assert both_after("UPDATE certyo.table_identity SET relid = 1 WHERE table_name = 'a'") == ("t", "t")
        cluster.sql("UPDATE certyo.table_identity SET relid = 'c'::regclass WHERE table_name = 'a'")
        assert both() == ("f", "f"), "an id placed here at a table that exists stays where it is"
        assert both_after("UPDATE certyo.table_identity SET relid = 0 WHERE table_name = 'a'") == ("t", "t")
        cluster.sql("UPDATE certyo.table_identity SET relid = 'a'::regclass WHERE table_name = 'a'")
        assert both() == ("f", "f")
        # an id two tables' triggers carry, none under its name: placed at none, it stays so
        b_args = cluster.sql("SELECT encode(tgargs, 'escape') FROM pg_trigger WHERE tgrelid = 'b'::regclass"
                             " AND tgname = 'certyo_capture'").split("\\000")
        forged = ", ".join(f"'table_id={a_id}'" if p.startswith("table_id=") else f"'{p}'" for p in b_args if p)
        cluster.sql(f"CREATE TABLE d (id int PRIMARY KEY, v text); CREATE TABLE e (id int PRIMARY KEY, v text);"
                    f" CREATE TRIGGER certyo_capture AFTER INSERT ON d FOR EACH ROW EXECUTE FUNCTION certyo.capture({forged});"
                    f" CREATE TRIGGER certyo_capture AFTER INSERT ON e FOR EACH ROW EXECUTE FUNCTION certyo.capture({forged});")
        # (a, renamed, is a third one)
        away = ("ALTER TABLE a RENAME TO a_old; UPDATE certyo.table_identity SET relid = {}, table_name = 'a'"
                f" WHERE id = {a_id}")
        assert both_after(away.format(0)) == ("f", "f"), "the relink would place it at none again"
        assert both_after(away.format(0) + f"; UPDATE certyo.table_identity SET table_name = 'd' WHERE id = {a_id}") \
            == ("t", "t"), "one has the name kept"
        assert both_after(away.format(1)) == ("t", "t"), "placed at a table gone: the relink says so"
        cluster.sql("DROP TABLE d, e")
        # a trigger carrying no id, or an id the catalog does not know
        cluster.sql(f"UPDATE certyo.table_identity SET id = 999 WHERE id = {a_id}")
        assert both() == ("f", "f")
    finally:
        stop(cluster)


def test_a_renamed_schema_keeps_its_tables_names_through_a_restore(emulator):
    """ATTACK (an attacker helper of 2026-12-07; a plain LOGIN role with CREATE on the database,
    as a database owner has): the victim renames its schema, which left the name kept with its
    table id (certyo.table_identity) the old one. The attacker takes the old name (schema and
    table) and puts a hand-made certyo_capture trigger carrying the victim's id on it. After a
    superuser's pg_dump | pg_restore into a fresh cluster, the relink found two tables carrying
    the id and chose the one under the kept name: the attacker's. The victim's changes queued
    at the dump were never written back and its table refused writes. Now ALTER SCHEMA ...
    RENAME keeps the names (certyo.refresh_table_names())."""
    source = Cluster(f"{TMP}/certyo-e2e-identity-squat-a", free_port(), emulator.url)
    target = None
    try:
        source.sql("CREATE EXTENSION certyo_cdc; CREATE ROLE victim LOGIN; CREATE ROLE mallory LOGIN; "
                   "GRANT CREATE ON DATABASE postgres TO victim, mallory; CREATE SCHEMA victim AUTHORIZATION victim")
        source.sql("CREATE TABLE victim.orders (id int PRIMARY KEY, v text); SELECT certyo.track('victim.orders'); "
                   "INSERT INTO victim.orders SELECT g, 'v' || g FROM generate_series(1, 3) g", user="victim")
        assert wait_for(lambda: source.sql("SELECT count(*) FROM victim.orders WHERE certyo_record_hash IS NOT NULL") == "3", 30)
        vid = source.sql("SELECT certyo.capture_table_id(tgargs) FROM pg_trigger "
                         "WHERE tgrelid = 'victim.orders'::regclass AND tgname = 'certyo_capture'")
        source.sql("ALTER SCHEMA victim RENAME TO sales", user="victim")
        assert source.sql(f"SELECT schema_name || '.' || table_name FROM certyo.table_identity WHERE id = {vid}") \
            == "sales.orders", "the name kept with the table's id is its old one"
        args = source.sql("SELECT string_agg(quote_literal(p), ', ') FROM pg_trigger, "
                          "unnest(string_to_array(rtrim(encode(tgargs, 'escape'), '\\000'), '\\000')) p "
                          "WHERE tgname = 'certyo_capture' AND tgrelid = 'sales.orders'::regclass")
        source.sql("CREATE SCHEMA victim; CREATE TABLE victim.orders (id int PRIMARY KEY, v text); "
                   "SELECT certyo.track('victim.orders'); SELECT certyo.untrack('victim.orders'); "
                   "INSERT INTO victim.orders VALUES (1, 'mallory 1'), (2, 'mallory 2'); "
                   f"CREATE TRIGGER certyo_capture AFTER INSERT ON victim.orders FOR EACH ROW EXECUTE FUNCTION certyo.capture({args})",
                   user="mallory")
        pause(source)
        source.sql("UPDATE sales.orders SET v = v || ' queued' WHERE id IN (1, 2)", user="victim")
        archive = f"{TMP}/certyo-e2e-identity-squat.dump"
        subprocess.run([f"{PG_BIN}/pg_dump", "-h", source.dir, "-p", str(source.port), "-U", "postgres", "-Fc",
                        "-f", archive, "postgres"], check=True)
        source.stop()
        target = Cluster(f"{TMP}/certyo-e2e-identity-squat-b", free_port(), emulator.url)
        target.sql("CREATE ROLE victim LOGIN; CREATE ROLE mallory LOGIN")
        done = subprocess.run([f"{PG_BIN}/pg_restore", "-h", target.dir, "-p", str(target.port), "-U", "postgres",
                               "-d", "postgres", archive], capture_output=True, text=True)
        assert "ERROR" not in done.stderr, done.stderr
        target.sql("SELECT certyo.resume()")
        assert wait_for(lambda: target.sql(f"SELECT relid::regclass FROM certyo.table_identity WHERE id = {vid}")
                        == "sales.orders", 30), "the victim's id is placed at another table"
        assert wait_for(lambda: target.sql("SELECT count(*) FROM sales.orders WHERE v LIKE '%queued'"
                                           " AND certyo_record_hash IS NOT NULL") == "2", 30), \
            "the victim's changes queued at the dump are not written back"
        target.sql("INSERT INTO sales.orders VALUES (10, 'after the restore')", user="victim")
    finally:
        stop(target, source)
