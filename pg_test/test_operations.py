"""End-to-end verification and operator surface: a real PostgreSQL 15 cluster with certyo_cdc
preloaded, pointed at the Certyo emulator (anchoring after 2 s). Rows go pending → anchored;
a mismatch is reported; dead letters are revived by certyo.retry(); certyo.pause() stops
sending and certyo.resume() delivers the backlog; certyo.audit() finds a row changed behind the
trigger's back; a chunked backfill survives an immediate restart and never lets an older image
overtake a newer change; an operator role can run certyo_cdc and an ordinary one cannot.

Fixtures in conftest.py (the emulator, anchoring after 2 s); this module brings its own
cluster. conftest.py's checks run after every test here too: no crash, no restart of the
postmaster (the backfill test restarts the server on purpose and says so), vault.canary intact.

Run:  CERTYO_EMULATOR=target/release/certyo-emulator python3 -m pytest -q pg_test/test_operations.py
"""
import json
import pathlib
import threading
import time

import pytest

from conftest import watched_cluster
from harness import KEY, TMP, wait_for

DIR = f"{TMP}/certyo-e2e-operations"
SETTINGS = """
certyo.verify_min_age = '1s'
certyo.verify_interval = '500ms'
certyo.anchor_timeout = '60s'
certyo.backfill_chunk_size = 1000
"""


@pytest.fixture(scope="module")
def cluster(emulator):
    """Overrides conftest's: this module's own cluster, with the canary conftest checks."""
    yield from watched_cluster(DIR, emulator, SETTINGS)


def statuses(cluster, table):
    return cluster.sql(f"SELECT string_agg(DISTINCT coalesce(certyo_anchor_status, 'none'), ',') FROM {table}")


def status(cluster, table, columns):
    """Columns of certyo.status for one table."""
    return cluster.sql(f"SELECT {columns} FROM certyo.status WHERE \"table\" = '{table}'::regclass")


def worker(cluster, column):
    return cluster.sql(f"SELECT {column} FROM certyo.worker_status()")


def quiet(cluster, timeout=180):
    """Until nothing is pending: no change waits for delivery, no receipt for verification.
    Verification answers are not per table (an injected mismatch is the next one, whichever
    record it is for; the worker counts every anchor it finds): a test that relies on them
    starts from here."""
    assert cluster.wait_drained(timeout), "changes from before the test are still pending"
    assert wait_for(lambda: cluster.sql("SELECT count(*) FROM certyo.receipt "
                                        "WHERE anchor_status IN ('pending', 'overdue')") == "0", timeout), \
        "receipts from before the test are still being verified"


def test_pending_then_anchored(cluster):
    quiet(cluster)
    anchored_before = int(worker(cluster, "anchored"))
    cluster.sql("""
        CREATE TABLE anchor_products (id int PRIMARY KEY, sku text, price numeric(10,2));
        SELECT certyo.track('anchor_products');
        INSERT INTO anchor_products SELECT g, 'SKU-' || g, g FROM generate_series(1, 30) g;
        DELETE FROM anchor_products WHERE id = 30;
    """)
    receipts = "certyo.receipt WHERE relid = 'anchor_products'::regclass"
    assert cluster.wait_drained(), "the changes are delivered"
    assert statuses(cluster, "anchor_products") == "pending", "accepted rows are pending first"
    anchored = wait_for(lambda: statuses(cluster, "anchor_products") == "anchored" and cluster.sql(
        f"SELECT count(*) FROM {receipts} AND anchor_status <> 'anchored'") == "1", timeout=30)
    assert anchored, "then every row is anchored"
    assert cluster.sql(f"SELECT record_id || ' ' || operation || ' ' || anchor_status FROM {receipts} "
                       "AND anchor_status <> 'anchored'") == "30 insert superseded", \
        "the insert that its delete replaced before it was verified is superseded, never asked about"
    assert cluster.sql("SELECT count(*) FROM anchor_products WHERE certyo_verified_at IS NULL") == "0", \
        "...with the time it was verified"
    assert cluster.sql("SELECT count(*) FILTER (WHERE polygon_tx_hash LIKE '0x%'), count(*) "
                       f"FROM {receipts} AND anchor_status = 'anchored'") == "30|30", \
        "receipts hold the anchoring transaction, the delete's too"
    # The worker records its count at the end of the pass that marked the receipts.
    wait_for(lambda: int(worker(cluster, "anchored")) - anchored_before >= 30, 10)
    assert int(worker(cluster, "anchored")) - anchored_before == 30, "the worker counts every anchor it found"
    assert cluster.sql("SELECT count(*) FROM certyo.queue") == "0", "writing the anchor status back queued nothing"
    assert status(cluster, "anchor_products", "format('%s %s %s %s', queued, dead_letters, awaiting_anchor, anchored)") \
        == "0 0 0 30", "the status view counts them"
    cluster.sql("UPDATE anchor_products SET price = 99 WHERE id = 1")
    assert wait_for(lambda: cluster.sql(
        f"SELECT count(*) FROM {receipts} AND record_id = '1' AND anchor_status = 'anchored'") == "2", 30), \
        "the update is anchored"
    history = cluster.sql("SELECT string_agg(operation || ':' || state || ':' || anchor_status, ' ' ORDER BY id) "
                          "FROM certyo.history('anchor_products', '1')")
    assert history == "insert:accepted:anchored update:accepted:anchored", "history shows both versions, each anchored"
    assert cluster.sql("SELECT certyo_record_hash = (SELECT record_hash FROM certyo.history('anchor_products', '1') "
                       "ORDER BY id DESC LIMIT 1) FROM anchor_products WHERE id = 1") == "t", \
        "the row carries its newest version's hash"


def test_mismatch(cluster, emulator):
    cluster.sql("""
        CREATE TABLE mismatch_products (id int PRIMARY KEY, sku text, price numeric(10,2));
        SELECT certyo.track('mismatch_products');
    """)
    quiet(cluster)
    log_offset = cluster.log_size()
    receipt = "certyo.receipt WHERE relid = 'mismatch_products'::regclass AND record_id = '500'"
    # Named: every verification answer about this record reports another hash. (The next
    # answer, whichever record it is for, once went to another verification and the test waited
    # in vain.)
    emulator.fault("mismatch", 1, collection="public.mismatch_products", recordId="500")
    cluster.sql("INSERT INTO mismatch_products VALUES (500, 'M', 1)")
    found = wait_for(lambda: cluster.sql(f"SELECT anchor_status FROM {receipt}") == "mismatch", 30)
    assert found, "a hash Certyo reports differently marks the receipt mismatch"
    assert cluster.sql("SELECT certyo_anchor_status FROM mismatch_products WHERE id = 500") == "mismatch", "...and the row"
    assert cluster.sql(f"SELECT reported_hash <> record_hash FROM {receipt}") == "t", \
        "...never overwritten: the receipt keeps both hashes"
    assert "Certyo reports hash" in cluster.log_since(log_offset), "...with a WARNING in the log"
    assert status(cluster, "mismatch_products", "mismatched") == "1", "...and in the status"


def test_dead_letters_and_retry(cluster, emulator):
    cluster.sql("""
        CREATE TABLE dead_products (id int PRIMARY KEY, sku text, price numeric(10,2));
        SELECT certyo.track('dead_products');
    """)
    assert cluster.wait_drained(), "changes from before the test are still pending"  # the rejection is for the next request
    emulator.fault("reject", 1)
    cluster.sql("INSERT INTO dead_products VALUES (600, 'R', 1)")
    dead = wait_for(lambda: status(cluster, "dead_products", "dead_letters") == "1", 20)
    assert dead, "a 422 becomes a dead letter"
    assert "injected rejection" in status(cluster, "dead_products", "last_error"), "...whose error the status shows"
    assert cluster.sql("SELECT certyo.retry('dead_products')") == "1", "certyo.retry() revives it"
    assert cluster.wait_drained(), "...and it is delivered"
    assert [r["recordId"] for r in emulator.records() if r["collection"] == "public.dead_products"].count("600") == 1, \
        "...once"
    assert worker(cluster, "dead") == "0", "no dead letters are left"


def test_a_failing_pass_shows_in_the_worker_status(cluster):
    """A pass that fails again and again (here a constraint an operator put on the receipts)
    shows in certyo.worker_status(): its error in last_error and a detail saying the pass is
    retried, not the "idle" of the last pass that worked. Once the cause is gone, the change
    is delivered and the state is back to idle."""
    cluster.sql("""
        CREATE TABLE poisoned (v text PRIMARY KEY);
        SELECT certyo.track('poisoned');
        ALTER TABLE certyo.receipt ADD CONSTRAINT no_poison CHECK (record_id <> 'poison') NOT VALID;
    """)
    try:
        cluster.sql("INSERT INTO poisoned VALUES ('poison')")
        assert wait_for(lambda: 'violates check constraint "no_poison"' in worker(cluster, "coalesce(last_error, '')"), 20), \
            cluster.explain()
        assert wait_for(lambda: "the last pass failed" in worker(cluster, "detail"), 20), cluster.explain()
        # Between two failed passes the batch is taken and sent again: never "idle" meanwhile.
        states = set()
        for _ in range(20):
            states.add(worker(cluster, "state"))
            time.sleep(0.1)
        assert states == {"delivering"}, states
    finally:
        cluster.sql("ALTER TABLE certyo.receipt DROP CONSTRAINT no_poison")
    assert cluster.wait_drained(), "delivered once the constraint is gone"
    assert wait_for(lambda: worker(cluster, "state") == "idle", 20), cluster.explain()
    cluster.sql("DROP TABLE poisoned")


def test_pause_and_resume(cluster, emulator):
    cluster.sql("""
        CREATE TABLE paused_products (id int PRIMARY KEY, sku text, price numeric(10,2));
        SELECT certyo.track('paused_products');
    """)
    assert cluster.wait_drained(), "changes from before the test are still pending"
    cluster.sql("SELECT certyo.pause()")
    try:
        assert wait_for(lambda: worker(cluster, "state") == "paused", 10), "the worker does not pause"
        before = emulator.stats()["accepted"]
        cluster.sql("INSERT INTO paused_products SELECT g, 'P', 1 FROM generate_series(700, 719) g")
        # The commit rang the worker's doorbell: passes that see the 20 changes and must not send them.
        assert cluster.wait_passes(5)
        assert emulator.stats()["accepted"] == before, "paused: nothing is sent"
        assert worker(cluster, "paused || ' ' || state") == "true paused", "paused: the status says so"
        assert worker(cluster, "pending") == "20", "paused: capture continues"
    finally:
        cluster.sql("SELECT certyo.resume()")
    assert cluster.wait_drained(), "resumed: the backlog is delivered"
    assert emulator.stats()["accepted"] - before == 20, "resumed: all 20 arrived"


def go_through_it_all(cluster, emulator, table):
    """A table that went through what `products` had gone through in the script this module
    replaced before it was audited: inserts, updates and a delete, all anchored; a mismatch; a
    dead letter revived by certyo.retry(); changes captured while paused and sent on resume."""
    cluster.sql(f"""
        CREATE TABLE {table} (id int PRIMARY KEY, sku text, price numeric(10,2));
        SELECT certyo.track('{table}');
        INSERT INTO {table} SELECT g, 'SKU-' || g, g FROM generate_series(1, 30) g;
        DELETE FROM {table} WHERE id = 30;
        UPDATE {table} SET price = 99 WHERE id = 1;
    """)
    quiet(cluster)
    emulator.fault("mismatch", 1, collection=f"public.{table}", recordId="500")
    cluster.sql(f"INSERT INTO {table} VALUES (500, 'M', 1)")
    assert wait_for(lambda: cluster.sql(f"SELECT certyo_anchor_status FROM {table} WHERE id = 500") == "mismatch", 30), \
        "setup: a mismatch"
    emulator.fault("reject", 1)
    cluster.sql(f"INSERT INTO {table} VALUES (600, 'R', 1)")
    assert wait_for(lambda: status(cluster, table, "dead_letters") == "1", 20), "setup: a dead letter"
    assert cluster.sql(f"SELECT certyo.retry('{table}')") == "1", "setup: the dead letter revived"
    cluster.sql("SELECT certyo.pause()")
    try:
        assert wait_for(lambda: worker(cluster, "state") == "paused", 10), "setup: paused"
        cluster.sql(f"INSERT INTO {table} SELECT g, 'P', 1 FROM generate_series(700, 719) g")
    finally:
        cluster.sql("SELECT certyo.resume()")
    assert cluster.wait_drained(), "setup: everything delivered"


def test_audit(cluster, emulator):
    go_through_it_all(cluster, emulator, "audited_products")
    cluster.sql("CREATE TABLE audit_untouched (id int PRIMARY KEY, v text); SELECT certyo.track('audit_untouched');"
                "INSERT INTO audit_untouched SELECT g, 'u' || g FROM generate_series(1, 50) g")
    assert cluster.wait_drained(), "the untouched table's rows are delivered"
    assert cluster.sql("SELECT count(*) FROM certyo.audit('audit_untouched')") == "0", "an untouched table audits clean"
    assert cluster.sql("SELECT count(*) FROM certyo.audit('audited_products')") == "0", \
        "so does the busy one, after all it went through"
    cluster.sql("""
        ALTER TABLE audited_products DISABLE TRIGGER certyo_capture;
        UPDATE audited_products SET price = 0.01 WHERE id = 2;
        ALTER TABLE audited_products ENABLE TRIGGER certyo_capture;
    """)
    assert cluster.sql("SELECT record_id || ': ' || problem FROM certyo.audit('audited_products')") == \
        "2: changed without capture", "a row changed with the trigger disabled is found"
    assert cluster.sql("SELECT count(*) FROM certyo.audit('audit_untouched')") == "0", \
        "the untouched table still audits clean"


def audit_of(cluster, table):
    return cluster.sql(f"SELECT string_agg(record_id || ': ' || problem, ', ' ORDER BY record_id::int) "
                       f"FROM certyo.audit('{table}')")


def marked_as_receipts(cluster, table, n, key="id"):
    """Until the n rows of `table` carry the hash and status of the newest receipt of their own
    record id (`key`, rendered as text), and no receipt of the table waits to be written back."""
    return wait_for(lambda: cluster.sql(f"""
        SELECT count(*) FROM {table} t
          JOIN LATERAL (SELECT r.record_hash, r.anchor_status FROM certyo.receipt r
                         WHERE r.relid = '{table}'::regclass AND r.record_id = t.{key}::text
                         ORDER BY r.id DESC LIMIT 1) r ON true
         WHERE t.certyo_record_hash = r.record_hash
           AND t.certyo_anchor_status = CASE r.anchor_status WHEN 'anchored' THEN 'anchored' ELSE 'pending' END""")
        == str(n) and cluster.sql(f"SELECT count(*) FROM certyo.receipt WHERE relid = '{table}'::regclass "
                                  "AND NOT written_back") == "0", 60)


def tamper_and_find(cluster, table, also=None):
    """A real change behind the trigger's back is still found, and only it (with `also`)."""
    cluster.sql(f"SET session_replication_role = replica; UPDATE {table} SET v = 'tampered' WHERE id = 3")
    expected = ", ".join(["3: changed without capture"] + ([also] if also else []))
    assert audit_of(cluster, table) == expected, "a real change is still found"


def while_paused(cluster, do):
    """do() while the worker is paused (resumed whatever happens); what it returned."""
    cluster.sql("SELECT certyo.pause()")
    try:
        assert wait_for(lambda: worker(cluster, "state") == "paused", 10), "the worker does not pause"
        return do()
    finally:
        cluster.sql("SELECT certyo.resume()")


def anchored_table(cluster, table):
    """A tracked table of 20 rows, each delivered and anchored."""
    quiet(cluster)
    cluster.sql(f"""
        CREATE TABLE {table} (id int PRIMARY KEY, v text);
        SELECT certyo.track('{table}');
        INSERT INTO {table} SELECT g, 'first' FROM generate_series(1, 20) g;
    """)
    assert cluster.wait_drained(), "the rows are delivered"
    assert wait_for(lambda: statuses(cluster, table) == "anchored", 30), "and anchored"


def test_untrack_then_track_again_raises_no_false_alarm(cluster):
    """Attack (a truth review of 2026-12-05): changes captured while tracked and delivered while the table was untracked
    had nothing to write back to, yet their receipts said written back; tracked again, the audit
    took the rows' older hashes for forgeries (10 of 20 rows "record hash changed without
    capture"). Tracked again, every receipt is written back anew: the audit of the unchanged
    table is empty at once and after the write-back, each row carries its newest version's hash
    and status, and a real change made behind the trigger's back is still found."""
    anchored_table(cluster, "retracked")
    while_paused(cluster, lambda: cluster.sql(
        "UPDATE retracked SET v = 'second' WHERE id <= 10; DELETE FROM retracked WHERE id = 20; "
        "SELECT certyo.untrack('retracked'); INSERT INTO retracked VALUES (20, 'while untracked')"))
    assert cluster.wait_drained(), "the backlog is delivered while the table is untracked"
    assert cluster.sql("SELECT count(*) FROM retracked WHERE v = 'second' AND certyo_record_hash = "
                       "(SELECT record_hash FROM certyo.receipt r WHERE r.relid = 'retracked'::regclass "
                       "AND r.record_id = '1' ORDER BY id DESC LIMIT 1)") == "0", "nothing was written back meanwhile"
    cluster.sql("SELECT certyo.track('retracked')")
    inserted_untracked = "20: changed without capture"  # true: its delete is Certyo's last word on it
    assert audit_of(cluster, "retracked") == inserted_untracked, "tracked again, the unchanged rows audit clean"
    assert marked_as_receipts(cluster, "retracked", 19), \
        "every row is written back with its newest version's hash and status\n" + cluster.explain()
    assert cluster.sql("SELECT coalesce(certyo_record_hash, 'none') FROM retracked WHERE id = 20") == "none", \
        "the row inserted while untracked is not marked with the hash of the record's delete"
    assert audit_of(cluster, "retracked") == inserted_untracked, "and still audit clean once written back"
    tamper_and_find(cluster, "retracked", also=inserted_untracked)


def test_untrack_dropping_the_columns_then_track_again_raises_no_false_alarm(cluster):
    """The same review: untrack(drop_columns => true) then track() of a table nobody changed: the
    rows' hashes went with the columns, and the audit called all 20 rows "record hash changed
    without capture". Tracked again, the audit is empty, the rows get their hashes and anchor
    status back from the receipts, and a real change behind the trigger's back is still found."""
    anchored_table(cluster, "recolumned")
    cluster.sql("SELECT certyo.untrack('recolumned', drop_columns => true); SELECT certyo.track('recolumned')")
    assert audit_of(cluster, "recolumned") == "", "tracked again, the unchanged table audits clean"
    assert marked_as_receipts(cluster, "recolumned", 20), \
        "every row gets its hash and anchor status back\n" + cluster.explain()
    assert statuses(cluster, "recolumned") == "anchored"
    assert audit_of(cluster, "recolumned") == "", "and still audits clean once written back"
    assert cluster.sql("SELECT count(*) FROM certyo.queue") == "0", "writing back queued nothing"
    tamper_and_find(cluster, "recolumned")


def row_findings(cluster, table):
    """The audit's findings about rows (record id and problem), in record id order."""
    return cluster.sql(f"SELECT string_agg(record_id || ': ' || problem, ', ' ORDER BY record_id) "
                       f"FROM certyo.audit('{table}') WHERE record_id IS NOT NULL")


def delivered_table(cluster, table):
    """A tracked table of 20 rows (record id `id`, a unique `code`), each version delivered."""
    cluster.sql(f"""
        CREATE TABLE {table} (id int PRIMARY KEY, code text NOT NULL UNIQUE, v text, extra int);
        SELECT certyo.track('{table}');
        INSERT INTO {table} SELECT g, 'C' || g, 'first', g FROM generate_series(1, 20) g;
        UPDATE {table} SET v = 'second' WHERE id <= 5;
    """)
    assert cluster.wait_drained(), "the rows are delivered\n" + cluster.explain()


# Each: the statement, and a phrase the schema finding's detail holds.
ROUTINE_DDL = {
    "add_column": ("ADD COLUMN c int", 'added "c" integer'),
    "add_column_default": ("ADD COLUMN c int DEFAULT 7", 'added "c" integer'),
    "add_column_volatile_default": ("ADD COLUMN c timestamptz DEFAULT clock_timestamp()",
                                    'added "c" timestamp with time zone'),
    "drop_column": ("DROP COLUMN extra", 'dropped "extra"'),
    "rename_column": ("RENAME COLUMN extra TO renamed", 'renamed "extra" to "renamed"'),
    "retype_column": ("ALTER COLUMN extra TYPE numeric(10,2)", '"extra" integer to numeric(10,2)'),
    "move_primary_key": ("DROP CONSTRAINT {table}_pkey, ADD PRIMARY KEY (code)", 'record id ("id") to ("code")'),
}


@pytest.mark.parametrize("ddl", ROUTINE_DDL)
def test_routine_ddl_is_reported_as_a_schema_change_never_as_tampering(cluster, ddl):
    """A truth review (2026-12-06): with no row changed, ADD COLUMN (with or without a default),
    DROP COLUMN or a moved primary key made the audit call every row "changed without capture"
    (a moved key: 40 findings, each row "never captured" under its new id and "deleted without
    capture" under its old one). The audit compares each row on the columns, and under the
    record key, its newest version was captured with: the DDL is one finding of its own (with
    when and what), no row is, and a real change behind the trigger's back (an update and a
    delete with session_replication_role = replica) is still found, naming exactly those rows."""
    table = f"ddl_{ddl}"
    statement, what = ROUTINE_DDL[ddl]
    delivered_table(cluster, table)
    assert row_findings(cluster, table) == "", "setup: the table audits clean"
    cluster.sql(f"ALTER TABLE {table} {statement.format(table=table)}")
    assert row_findings(cluster, table) == "", "no row was changed: no row is a finding"
    schema = cluster.sql(f"SELECT problem || ' | ' || detail || ' | ' || (changed_at > now() - interval '1 minute') "
                         f"FROM certyo.audit('{table}') WHERE record_id IS NULL")
    assert schema.startswith("schema changed since capture | ") and what in schema and schema.endswith(" | true"), \
        f"the DDL is reported once, as a schema change, with what and when: {schema!r}"
    cluster.sql(f"SET session_replication_role = replica; UPDATE {table} SET v = 'tampered' WHERE id = 3; "
                f"DELETE FROM {table} WHERE id = 5")
    # A moved key: the rows are reported under the record id they were captured under.
    expected = "3: changed without capture, 5: deleted without capture"
    assert row_findings(cluster, table) == expected, "the real changes are still found, and only they"
    # New writes under the new shape audit clean; the schema finding stays while rows remain
    # that were captured before it.
    cluster.sql(f"UPDATE {table} SET v = 'third' WHERE id IN (1, 2, 3)")
    assert cluster.wait_drained(), "the new versions are delivered"
    assert row_findings(cluster, table) == "5: deleted without capture", \
        "the row captured again matches its new version; the deletion is still found"


def test_the_worker_never_writes_a_status_the_audit_accepts_from_anyone_else(cluster):
    """A truth review (2026-12-06): a row whose receipt is anchored, hand-marked `mismatch`, or
    holding a status the worker never writes, audited clean. Both are found; the rows the
    worker marked are not."""
    anchored_table(cluster, "planted")
    cluster.sql("UPDATE planted SET certyo_anchor_status = 'mismatch' WHERE id = 4; "
                "UPDATE planted SET certyo_anchor_status = 'verified' WHERE id = 6")
    assert audit_of(cluster, "planted") == \
        "4: anchor status changed without capture, 6: anchor status changed without capture"


def twenty_delivered(cluster, table):
    """A tracked table of 20 rows (id, v = 'old'), each delivered."""
    cluster.sql(f"""
        CREATE TABLE {table} (id int PRIMARY KEY, v text);
        SELECT certyo.track('{table}');
        INSERT INTO {table} SELECT g, 'old' FROM generate_series(1, 20) g;
    """)
    assert cluster.wait_drained(), "the rows are delivered"


def test_emptying_a_table_the_documented_way_raises_no_alarm(cluster):
    """The documented way to empty a tracked table without recording each deletion, `untrack;
    TRUNCATE; track` in one transaction, left the audit calling every removed row "deleted
    without capture". Rows removed while the table was untracked are recorded when it is tracked
    again: the audit is empty, and rows written since are audited as ever (a change behind the
    trigger's back is found)."""
    twenty_delivered(cluster, "emptied")
    cluster.sql("BEGIN; SELECT certyo.untrack('emptied'); TRUNCATE emptied; SELECT certyo.track('emptied'); COMMIT")
    assert audit_of(cluster, "emptied") == "", "the documented emptying is no finding"
    cluster.sql("INSERT INTO emptied SELECT g, 'new' FROM generate_series(1, 10) g")
    assert cluster.wait_drained(), "the new rows are delivered"
    assert audit_of(cluster, "emptied") == "", "the new rows audit clean"
    cluster.sql("SET session_replication_role = replica; UPDATE emptied SET v = 'tampered' WHERE id = 3; "
                "DELETE FROM emptied WHERE id = 7")
    assert audit_of(cluster, "emptied") == "3: changed without capture, 7: deleted without capture"


def table_findings(cluster, table):
    """The audit's findings about the table (problem: detail), in order of when."""
    return cluster.sql(f"SELECT coalesce(string_agg(problem || ': ' || detail, ', ' ORDER BY changed_at, detail), '') "
                       f"FROM certyo.audit('{table}') WHERE record_id IS NULL")


def test_rows_removed_while_untracked_are_said_once_for_the_table_never_row_by_row(cluster):
    """Rows deleted while the table was untracked were silent in the audit once it was tracked
    again: removed without capture, and Certyo's last word on each is not a delete. The audit
    says so once per track() that found them (how many records, when), reports no row, counts
    only the records still without a newer version, and still finds a row changed behind the
    trigger's back."""
    twenty_delivered(cluster, "removed")
    cluster.sql("SELECT certyo.untrack('removed'); DELETE FROM removed WHERE id <= 5; SELECT certyo.track('removed')")
    assert audit_of(cluster, "removed") == "", "no row is a finding"
    said = "removed while untracked: 5 records whose rows were removed while the table was untracked"
    assert table_findings(cluster, "removed").startswith(said), table_findings(cluster, "removed")
    assert cluster.sql("SELECT count(*) FROM certyo.audit('removed') WHERE changed_at > now() - interval '1 minute'") == "1"
    cluster.sql("INSERT INTO removed VALUES (1, 'new')")
    assert cluster.wait_drained(), "the new row is delivered"
    assert table_findings(cluster, "removed").startswith(
        "removed while untracked: 4 records"), "a record written since is no longer counted"
    cluster.sql("SET session_replication_role = replica; UPDATE removed SET v = 'tampered' WHERE id = 7")
    assert audit_of(cluster, "removed") == "7: changed without capture"


def test_a_key_changed_to_an_equal_value_never_takes_the_old_records_hash(cluster, emulator):
    """A truth review (2026-12-05): a key changed to a value its type calls equal but capture renders apart
    (case under a nondeterministic collation, a numeric's scale) is the delete of one record
    and the insert of another at Certyo. The write-back matched rows by equality: the old
    record's version, answered after the key changed, marked the row that now holds the new
    record with the old record's hash. Here the first inserts' answers are held back (a slow
    Certyo) while the keys change, and the new records are refused (dead letters): the rows
    must carry no hash rather than another record's. Once the new records are delivered, each
    row carries its own record's newest hash, anchored, and the audit is empty."""
    quiet(cluster)
    cluster.sql("""
        CREATE COLLATION IF NOT EXISTS case_blind (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
        CREATE TABLE blind_keys (k text COLLATE case_blind PRIMARY KEY, v text);
        CREATE TABLE scaled_keys (k numeric PRIMARY KEY, v text);
        SELECT certyo.track('blind_keys'); SELECT certyo.track('scaled_keys');
    """)
    tables = ("blind_keys", "scaled_keys")
    before = emulator.stats()["accepted"]
    emulator.fault("slow", 2, seconds=1)  # each of the two first inserts: stored, answered 1 s later (the timeout is 2 s)
    cluster.sql("INSERT INTO blind_keys VALUES ('key1', 'v'); INSERT INTO scaled_keys VALUES (1001.5, 'v')")
    assert wait_for(lambda: emulator.stats()["accepted"] > before, 10), "the first insert reached Certyo"
    cluster.sql("UPDATE blind_keys SET k = upper(k); UPDATE scaled_keys SET k = k + 0.00")
    assert wait_for(lambda: emulator.stats()["accepted"] > before + 1, 10), "the second insert reached Certyo"
    emulator.fault("reject", 4)  # what comes next: the new records (and the deletes), dead letters
    assert wait_for(lambda: cluster.sql("SELECT count(*) FROM certyo.receipt WHERE relid IN "
                                        "('blind_keys'::regclass, 'scaled_keys'::regclass)") == "2", 20), \
        "the first inserts' answers are recorded\n" + cluster.explain()
    assert wait_for(lambda: cluster.sql("SELECT count(*) FROM certyo.delivery WHERE state = 'dead' "
                                        "AND record_id IN ('KEY1', '1001.50')") == "2", 20), \
        "the new records are dead letters\n" + cluster.explain()
    for table in tables:
        assert cluster.sql(f"SELECT coalesce(certyo_record_hash, 'none') FROM {table}") == "none", \
            f"the row of {table} holds the new record, which Certyo does not have: it has no hash, not the old record's"
    for table in tables:
        cluster.sql(f"SELECT certyo.retry('{table}')")
    quiet(cluster)
    for table in tables:
        assert marked_as_receipts(cluster, table, 1, key="k"), \
            f"the row of {table} carries its own record's newest hash and status:\n" + cluster.sql(
                f"SELECT string_agg(t.k || ' has ' || coalesce(r.operation || ' ' || r.record_id, 'no record'), ', ') "
                f"FROM {table} t LEFT JOIN certyo.receipt r ON r.record_hash = t.certyo_record_hash")
        assert statuses(cluster, table) == "anchored"
        assert cluster.sql(f"SELECT count(*) FROM certyo.audit('{table}')") == "0", f"{table} audits clean"
    cluster.sql("DROP TABLE blind_keys, scaled_keys")


def test_a_row_that_no_longer_renders_to_its_captured_content_is_never_marked_with_its_hash(cluster):
    """The table owner renames an enum label (ALTER TYPE ... RENAME VALUE): no row changes, no
    change is captured, but rows holding that label no longer render to the payload Certyo
    anchored. Renamed before the versions were accepted, their rows take no hash; renamed after
    acceptance but before verification, their rows stay `pending`: never `anchored` with the
    hash of content they no longer render to. The other rows are marked as ever, and the audit
    names exactly the rows whose rendering changed."""
    quiet(cluster)
    cluster.sql("""
        CREATE TYPE mood AS ENUM ('calm', 'angry', 'glad');
        CREATE TABLE moods (id int PRIMARY KEY, v mood);
        SELECT certyo.track('moods');
    """)
    while_paused(cluster, lambda: cluster.sql(
        "INSERT INTO moods SELECT g, CASE WHEN g <= 3 THEN 'calm' WHEN g <= 6 THEN 'glad' ELSE 'angry' END::mood "
        "FROM generate_series(1, 10) g; ALTER TYPE mood RENAME VALUE 'calm' TO 'serene'"))
    assert cluster.wait_drained(), "the rows are delivered"
    # Accepted, not yet verified: the glad rows' label is renamed now.
    assert wait_for(lambda: cluster.sql("SELECT count(*) FROM moods WHERE id > 3 AND certyo_record_hash IS NOT NULL") == "7", 30), \
        cluster.explain()
    pending = while_paused(cluster, lambda: (
        cluster.sql("SELECT string_agg(id::text, ',' ORDER BY id) FROM moods WHERE v = 'glad' AND certyo_anchor_status = 'pending'"),
        cluster.sql("ALTER TYPE mood RENAME VALUE 'glad' TO 'happy'"))[0])
    assert pending, "the glad rows were anchored before the label could be renamed (anchoring takes 2 s)"
    assert wait_for(lambda: cluster.sql("SELECT count(*) FROM moods WHERE v = 'angry' AND certyo_anchor_status = 'anchored'") == "4",
                    60), "the rows that render as captured are anchored\n" + cluster.explain()
    assert wait_for(lambda: cluster.sql("SELECT count(*) FROM certyo.receipt WHERE relid = 'moods'::regclass "
                                        "AND anchor_status = 'pending'") == "0", 60), "every version is verified"
    assert wait_for(lambda: cluster.sql("SELECT count(*) FROM certyo.receipt WHERE relid = 'moods'::regclass "
                                        "AND NOT written_back") == "0", 30), "and its write-back done"
    assert cluster.sql("SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM moods "
                       "WHERE v = 'serene' AND certyo_record_hash IS NOT NULL") == "", \
        "a row renamed before acceptance takes no hash of content it no longer renders to"
    assert cluster.sql(f"SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM moods "
                       f"WHERE id IN ({pending}) AND certyo_anchor_status = 'anchored'") == "", \
        "a row renamed after acceptance is never marked anchored"
    refused = cluster.sql("SELECT string_agg(record_id, ',' ORDER BY record_id::int) FROM certyo.receipt "
                          "WHERE relid = 'moods'::regclass AND write_back_dropped LIKE '%no longer renders%'")
    assert refused == "1,2,3," + pending, "the receipts refused say why, and only theirs"
    expected = ", ".join(f"{i}: changed without capture" for i in sorted([1, 2, 3] + [int(i) for i in pending.split(",")]))
    assert audit_of(cluster, "moods") == expected, "the audit names exactly the rows whose rendering changed"
    cluster.sql("DROP TABLE moods; DROP TYPE mood")


def test_backfill_survives_an_immediate_restart(cluster, emulator, watch):
    cluster.sql("""
        CREATE TABLE backfill_big (id int PRIMARY KEY, v int);
        INSERT INTO backfill_big SELECT g, 0 FROM generate_series(1, 20000) g;
        SELECT certyo.track('backfill_big');
    """)
    stop = threading.Event()
    updates = []

    def writer():
        n = 0
        while not stop.is_set():
            row = 1 + (n * 7919) % 20000
            try:
                cluster.sql(f"UPDATE backfill_big SET v = v + 1 WHERE id = {row}")
                updates.append(row)
            except Exception:
                time.sleep(0.2)  # the server is restarting
            n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert wait_for(lambda: len(updates) >= 5, 10), "the writer commits"
        backfill = cluster.sql("SELECT certyo.backfill('backfill_big')")
        assert wait_for(lambda: int(cluster.sql(f"SELECT rows_queued FROM certyo.backfills WHERE id = {backfill}")) >= 3000,
                        30, 0.05), "the backfill queues rows"
        cluster.pg_ctl("-m", "immediate", "restart")
        done = wait_for(lambda: cluster.sql(f"SELECT state FROM certyo.backfills WHERE id = {backfill}") == "done", 120)
    finally:
        stop.set()
        thread.join()
    unexpected = watch.restarted_on_purpose()
    assert not unexpected, f"a crash besides the immediate restart: {unexpected[:3]}"
    assert done, "a backfill survives an immediate restart and finishes"
    assert int(cluster.sql(f"SELECT chunks FROM certyo.backfills WHERE id = {backfill}")) >= 20, "...in chunks"
    assert len(updates) > 5, "writes went on meanwhile"
    assert cluster.wait_drained(120), "...and everything is delivered"
    delivered = {r["recordId"] for r in emulator.records() if r["collection"] == "public.backfill_big"}
    assert len(delivered) == 20000, "every row reached Certyo"
    assert cluster.sql("SELECT count(*) FROM certyo.audit('backfill_big')") == "0", \
        "no older image overtook a newer change: every row matches its last accepted version"
    assert status(cluster, "backfill_big", "backfill_state || ' ' || backfill_rows_queued").split()[0] == "done", \
        "the status shows the backfill"


def test_operator_role(cluster):
    cluster.sql("""
        CREATE TABLE operator_products (id int PRIMARY KEY, sku text, price numeric(10,2));
        SELECT certyo.track('operator_products');
        INSERT INTO operator_products VALUES (1, 'SKU-1', 1);
        UPDATE operator_products SET price = 2 WHERE id = 1;
    """)
    assert cluster.wait_drained(), "setup: both versions of record 1 are delivered"
    try:
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
                                   "SELECT count(*) FROM certyo.history('operator_products', '1'); "
                                   "SELECT running FROM certyo.worker_status()", "alice")
        assert (out.split(), err) == (["t", "2", "t"], ""), "an operator reads the status, pauses, resumes, reads history"
        out, err = cluster.attempt("SELECT record_hash FROM certyo.receipt LIMIT 1", "alice")
        assert "permission denied" in err, "...but not the receipts or payloads directly"
        for call in ("SELECT * FROM certyo.status", "SELECT certyo.pause()",
                     "SELECT * FROM certyo.history('operator_products', '1')",
                     "SELECT * FROM certyo.audit('operator_products')"):
            out, err = cluster.attempt(call, "bob")
            assert "permission denied" in err, f"an ordinary role is refused: {call}"
        for user in ("alice", "bob"):
            out, err = cluster.attempt("SELECT current_setting('certyo.api_key')", user)
            assert KEY not in out, f"{user} cannot read the API key"
    finally:
        cluster.sql("SELECT certyo.resume()")  # should alice's resume not have run
        for role in ("alice", "bob", "certyo_operator"):
            cluster.sql(f"DROP OWNED BY {role}", check=False)  # its grants; fails if the role was never created
            cluster.sql(f"DROP ROLE IF EXISTS {role}")


def test_the_postgres_exporter_query_file_reads_every_metric(cluster):
    """docs/postgres_exporter.yaml, the ready query file for Prometheus: each query runs as the
    exporter would run it, returning every column it declares, a number for each metric."""
    import yaml
    spec = yaml.safe_load((pathlib.Path(__file__).resolve().parent.parent / "docs/postgres_exporter.yaml").read_text())
    cluster.sql("""CREATE TABLE exported (id int PRIMARY KEY, name text);
                   SELECT certyo.track('exported');
                   INSERT INTO exported SELECT g, 'n' || g FROM generate_series(1, 3) g;""")
    assert cluster.wait_drained(), "the changes are delivered"
    for name, query in spec.items():
        rows = [json.loads(line) for line in cluster.sql(
            f"SELECT row_to_json(q) FROM ({query['query']}) q").splitlines()]
        assert rows, f"{name} returned no row"
        declared = {column: usage["usage"] for entry in query["metrics"] for column, usage in entry.items()}
        for row in rows:
            assert set(row) == set(declared), f"{name}: the query's columns are not the ones declared"
            for column, usage in declared.items():
                if usage != "LABEL":
                    assert isinstance(row[column], (int, float)), f"{name}.{column} is not a number: {row[column]!r}"
    exported = [json.loads(line) for line in cluster.sql(
        f"SELECT row_to_json(q) FROM ({spec['certyo_table']['query']}) q WHERE relation = 'exported'").splitlines()]
    assert [(r["pending"], r["dead_letters"], r["last_delivery_timestamp_seconds"] > 0) for r in exported] == \
        [(0, 0, True)]
    assert json.loads(cluster.sql(f"SELECT row_to_json(q) FROM ({spec['certyo_worker']['query']}) q"))["running"] == 1
