"""The sidecar mode, `certyo.track(..., write_back => 'none')`: the table gets no column of ours
and the worker never writes to its rows; `certyo.record_status()` gives each record's newest
version, hash and anchor status from the receipts, and `certyo.audit()` works from the receipts
alone. What every mode must keep: capture, the update filter, history and the audit behave the
same, and nothing ever says 'anchored' for content that is not.

Fixtures in conftest.py (the emulator, anchoring 2 s after acceptance); this module brings its
own cluster, verifying 1 s after acceptance.

Run:  CERTYO_EMULATOR=target/release/certyo-emulator python3 -m pytest -q pg_test/test_sidecar.py
"""
import pytest

from conftest import watched_cluster
from harness import TMP, wait_for

DIR = f"{TMP}/certyo-e2e-sidecar"
SETTINGS = """
certyo.verify_min_age = '1s'
certyo.verify_interval = '500ms'
certyo.write_back = 'anchored'
"""
ROWS = 30


@pytest.fixture(scope="module")
def cluster(emulator):
    """Overrides conftest's: this module's own cluster, with the canary conftest checks."""
    yield from watched_cluster(DIR, emulator, SETTINGS)


def columns(cluster, table):
    return cluster.sql(f"""SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute
                            WHERE attrelid = '{table}'::regclass AND attnum > 0 AND NOT attisdropped""")


def newest_receipts_disagree(cluster, table):
    """Records whose record_status() row is not their newest version's own state."""
    return cluster.sql(f"""
        SELECT count(*) FROM certyo.record_status('{table}') s
          LEFT JOIN LATERAL (SELECT r.id, r.record_hash, r.anchor_status FROM certyo.receipt r
                              WHERE r.relid = '{table}'::regclass AND r.record_id = s.record_id
                              ORDER BY r.id DESC LIMIT 1) r ON true
         WHERE s.state = 'accepted'
           AND (r.id IS DISTINCT FROM s.id OR r.record_hash IS DISTINCT FROM s.record_hash
                OR r.anchor_status IS DISTINCT FROM s.anchor_status)""")


def all_anchored(cluster, table, n):
    return lambda: cluster.sql(
        f"SELECT count(*) FILTER (WHERE anchor_status = 'anchored') || '/' || count(*) "
        f"FROM certyo.record_status('{table}')") == f"{n}/{n}"


def test_none_adds_no_column_never_writes_to_the_rows_and_record_status_tells_each_records_state(cluster):
    table = "sidecar_plain"
    cluster.sql(f"""
        CREATE TABLE {table} (id int PRIMARY KEY, v text, note text);
        SELECT certyo.track('{table}', exclude_columns => ARRAY['note'], write_back => 'none');
    """)
    assert columns(cluster, table) == "id,v,note", "no column of ours on the table"
    assert cluster.sql(f"SELECT write_back FROM certyo.tracked_tables WHERE \"table\" = '{table}'::regclass") == "none"
    cluster.sql("SELECT certyo.pause()")
    try:
        cluster.sql(f"INSERT INTO {table} SELECT g, 'v' || g, 'n' FROM generate_series(1, {ROWS}) g")
        assert cluster.sql(f"SELECT count(*) FROM certyo.record_status('{table}') WHERE state = 'queued' "
                           "AND record_hash IS NULL AND anchor_status IS NULL") == str(ROWS), \
            "before delivery every record is there, queued, without a hash"
    finally:
        cluster.sql("SELECT certyo.resume()")
    cluster.sql(f"UPDATE {table} SET v = 'changed' WHERE id <= 5")
    cluster.sql(f"UPDATE {table} SET v = 'changed again' WHERE id = 1")
    cluster.sql(f"DELETE FROM {table} WHERE id IN (29, 30)")
    before = cluster.sql(f"SELECT string_agg(id || ':' || ctid || ':' || xmin, ',' ORDER BY id) FROM {table}")
    assert wait_for(all_anchored(cluster, table, ROWS - 2), 60, every=0.2), \
        "each live record's newest version is anchored, deleted ones are not listed"
    assert newest_receipts_disagree(cluster, table) == "0"
    assert cluster.sql(f"SELECT s.record_hash = r.record_hash FROM certyo.record_status('{table}') s "
                       f"JOIN certyo.receipt r ON r.id = s.id WHERE s.record_id = '1'") == "t"
    assert cluster.sql(f"SELECT operation FROM certyo.record_status('{table}') s JOIN certyo.receipt r ON r.id = s.id "
                       "WHERE s.record_id = '1'") == "update", "record 1 shows its newest version"
    assert cluster.sql(f"SELECT count(*) FROM certyo.history('{table}', '1')") == "3", "history keeps every version"
    # The worker never wrote to a row: each row is the version the application's last write made.
    assert cluster.sql(f"SELECT string_agg(id || ':' || ctid || ':' || xmin, ',' ORDER BY id) FROM {table}") == before, \
        "no row version of the worker's"
    # The update filter is the same in every mode: only excluded columns, or nothing, is no change.
    queued = cluster.sql("SELECT count(*) FROM certyo.history('sidecar_plain', '2')")
    cluster.sql(f"UPDATE {table} SET note = 'other' WHERE id = 2")
    cluster.sql(f"UPDATE {table} SET v = v WHERE id = 2")
    assert cluster.sql("SELECT count(*) FROM certyo.history('sidecar_plain', '2')") == queued
    assert cluster.sql(f"SELECT count(*) FROM certyo.audit('{table}')") == "0", "the audit is silent"


def test_the_audit_works_from_the_receipts_alone(cluster):
    table = "sidecar_audit"
    cluster.sql(f"""
        CREATE TABLE {table} (id int PRIMARY KEY, v text);
        SELECT certyo.track('{table}', write_back => 'none');
        INSERT INTO {table} SELECT g, 'v' || g FROM generate_series(1, 10) g;
    """)
    assert wait_for(all_anchored(cluster, table, 10), 60, every=0.2)
    assert cluster.sql(f"SELECT count(*) FROM certyo.audit('{table}')") == "0"
    cluster.sql(f"""
        SET session_replication_role = replica;
        UPDATE {table} SET v = 'forged' WHERE id = 3;
        DELETE FROM {table} WHERE id = 7;
    """)
    assert cluster.sql(f"SELECT string_agg(record_id, ',' ORDER BY record_id) FROM certyo.audit('{table}')") == "3,7", \
        "a change and a delete behind capture's back are named, and only they"
    # record_status says what was captured and anchored, not that the row still holds it.
    assert cluster.sql(f"SELECT anchor_status FROM certyo.record_status('{table}') WHERE record_id = '3'") == "anchored"


def test_none_is_refused_on_a_table_with_bookkeeping_columns_which_nothing_would_keep_true(cluster):
    table = "sidecar_refused"
    cluster.sql(f"""
        CREATE TABLE {table} (id int PRIMARY KEY, v text);
        SELECT certyo.track('{table}');
        INSERT INTO {table} VALUES (1, 'a');
    """)
    assert wait_for(lambda: cluster.sql(f"SELECT certyo_anchor_status FROM {table}") == "anchored", 60, every=0.2)
    attempt = cluster.attempt_verbose(f"SELECT certyo.track('{table}', write_back => 'none')")
    assert attempt.returncode != 0 and attempt.sqlstate == "55000", attempt
    assert "bookkeeping columns" in attempt.stderr and "drop_columns => true" in attempt.stderr, attempt
    assert cluster.sql(f"SELECT write_back FROM certyo.tracked_tables WHERE \"table\" = '{table}'::regclass") == \
        "anchored", "the refusal changed nothing"
    # The documented way: untrack with the columns, then track in the sidecar mode.
    cluster.sql(f"SELECT certyo.untrack('{table}', drop_columns => true)")
    cluster.sql(f"SELECT certyo.track('{table}', write_back => 'none')")
    assert columns(cluster, table) == "id,v"
    # A column of the user's that happens to have a bookkeeping name is refused as well.
    cluster.sql("CREATE TABLE sidecar_named (id int PRIMARY KEY, certyo_anchor_status text)")
    attempt = cluster.attempt_verbose("SELECT certyo.track('sidecar_named', write_back => 'none')")
    assert attempt.returncode != 0 and attempt.sqlstate == "55000" and "DROP COLUMN" in attempt.stderr, attempt
    attempt = cluster.attempt_verbose("SELECT certyo.track('sidecar_named', write_back => 'nothing')")
    assert attempt.returncode != 0 and attempt.sqlstate == "22023" and "'none'" in attempt.stderr, attempt


@pytest.mark.parametrize("how", ["alter", "inherits", "typed"])
def test_a_column_of_a_bookkeeping_name_that_comes_later_is_the_tables_own_data(cluster, emulator, how):
    """No column is ours in the sidecar mode: one that takes a bookkeeping name after tracking
    (ALTER TABLE, a parent's rename, a composite type's) is captured like any other; a change
    of it alone is a change, and untrack(drop_columns) leaves it. (Were it left out of the
    payloads, a captured value renamed so could be changed with the audit silent.)"""
    table = f"sidecar_later_{how}"
    if how == "alter":
        cluster.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, amount text)")
        rename = f"ALTER TABLE {table} RENAME COLUMN amount TO certyo_record_hash"
    elif how == "inherits":
        cluster.sql(f"CREATE TABLE {table}_parent (amount text); "
                    f"CREATE TABLE {table} (id int PRIMARY KEY) INHERITS ({table}_parent)")
        rename = f"ALTER TABLE {table}_parent RENAME COLUMN amount TO certyo_record_hash"
    else:
        cluster.sql(f"CREATE TYPE {table}_type AS (id int, amount text); "
                    f"CREATE TABLE {table} OF {table}_type (PRIMARY KEY (id))")
        rename = f"ALTER TYPE {table}_type RENAME ATTRIBUTE amount TO certyo_record_hash CASCADE"
    cluster.sql(f"SELECT certyo.track('{table}', write_back => 'none'); INSERT INTO {table} (id, amount) VALUES (1, '100')")
    assert wait_for(all_anchored(cluster, table, 1), 60, every=0.2)
    cluster.sql(rename)
    cluster.sql(f"UPDATE {table} SET certyo_record_hash = '1000000'")

    def captured():
        return any(r["collection"] == f"public.{table}" and r["recordPayload"].get("certyo_record_hash") == "1000000"
                   for r in emulator.records())

    assert wait_for(captured, 60, every=0.2), "the change of the renamed column reached Certyo"
    assert wait_for(all_anchored(cluster, table, 1), 60, every=0.2)
    assert cluster.sql(f"SELECT count(*) FROM certyo.history('{table}', '1')") == "2"
    cluster.sql(f"SET session_replication_role = replica; UPDATE {table} SET certyo_record_hash = '1'")
    assert cluster.sql(f"SELECT string_agg(record_id, ',') FROM certyo.audit('{table}') WHERE record_id IS NOT NULL") == "1", \
        "a change behind capture's back is named"
    cluster.sql(f"SELECT certyo.untrack('{table}', drop_columns => true)")
    assert "certyo_record_hash" in columns(cluster, table), "untrack kept the table's own column"


def test_from_none_to_anchored_the_columns_come_and_each_records_newest_version_is_written_back(cluster):
    table = "sidecar_switch"
    cluster.sql(f"""
        CREATE TABLE {table} (id int PRIMARY KEY, v text);
        SET certyo.write_back = 'none';
        SELECT certyo.track('{table}');
    """)
    assert cluster.sql(f"SELECT write_back FROM certyo.tracked_tables WHERE \"table\" = '{table}'::regclass") == \
        "none", "certyo.write_back gives the mode of a table tracked without naming one"
    cluster.sql(f"INSERT INTO {table} SELECT g, 'v' || g FROM generate_series(1, 10) g")
    cluster.sql(f"UPDATE {table} SET v = 'changed' WHERE id <= 3")
    assert wait_for(all_anchored(cluster, table, 10), 60, every=0.2)
    cluster.sql(f"SELECT certyo.track('{table}', write_back => 'anchored')")
    assert columns(cluster, table) == "id,v,certyo_record_hash,certyo_anchor_status,certyo_verified_at"

    def marked():
        return cluster.sql(f"""
            SELECT count(*) FROM {table} t JOIN certyo.record_status('{table}') s ON s.record_id = t.id::text
             WHERE t.certyo_record_hash = s.record_hash AND t.certyo_anchor_status = 'anchored'""") == "10"

    assert wait_for(marked, 60, every=0.2), "each row takes its newest version's hash and 'anchored'"
    assert cluster.sql(f"SELECT count(*) FROM certyo.audit('{table}')") == "0", "the audit is silent"


def test_record_status_of_an_untracked_table_is_an_error_and_is_not_for_everyone(cluster):
    cluster.sql("CREATE TABLE sidecar_untracked (id int PRIMARY KEY)")
    attempt = cluster.attempt_verbose("SELECT * FROM certyo.record_status('sidecar_untracked')")
    assert attempt.returncode != 0 and attempt.sqlstate == "55000" and "not tracked" in attempt.stderr, attempt
    cluster.sql("""
        CREATE TABLE sidecar_parted (id int, region text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
        CREATE TABLE sidecar_parted_eu PARTITION OF sidecar_parted FOR VALUES IN ('eu');
        SELECT certyo.track('sidecar_parted', write_back => 'none');
    """)
    attempt = cluster.attempt_verbose("SELECT * FROM certyo.record_status('sidecar_parted_eu')")
    assert attempt.returncode != 0 and attempt.sqlstate == "55000" and "partition" in attempt.stderr, attempt
    cluster.sql("""
        CREATE TABLE sidecar_private (id int PRIMARY KEY);
        SELECT certyo.track('sidecar_private', write_back => 'none');
        CREATE ROLE sidecar_reader LOGIN;
        GRANT SELECT ON sidecar_private TO sidecar_reader;
    """)
    attempt = cluster.attempt_verbose("SELECT * FROM certyo.record_status('sidecar_private')", user="sidecar_reader")
    assert attempt.returncode != 0 and attempt.sqlstate == "42501", "revoked from PUBLIC, as history() is"


def test_an_expired_delete_never_brings_its_record_back(cluster, watch):
    """Receipts expire after certyo.retention; the delete that ended a record goes only once no
    earlier receipt of the record is left (here one still being verified), or that one would be
    the record's newest: alive again in record_status(), and the audit would name its row."""
    table = "sidecar_expiry"
    cluster.sql(f"""
        CREATE TABLE {table} (id int PRIMARY KEY, v text);
        SELECT certyo.track('{table}', write_back => 'none');
        INSERT INTO {table} VALUES (1, 'a'), (2, 'b');
    """)
    assert wait_for(all_anchored(cluster, table, 2), 60, every=0.2)
    # Record 1's first version still being verified (overdue, next try tomorrow); record 2's done.
    cluster.sql(f"""UPDATE certyo.receipt SET anchor_status = 'overdue', next_verify_at = now() + interval '1 day'
                     WHERE relid = '{table}'::regclass AND record_id = '1'""")
    cluster.sql(f"DELETE FROM {table}")
    assert wait_for(lambda: cluster.sql(f"SELECT count(*) FROM certyo.receipt WHERE relid = '{table}'::regclass "
                                        "AND operation = 'delete' AND anchor_status = 'anchored'") == "2", 60, every=0.2)
    cluster.sql("ALTER SYSTEM SET certyo.retention = 0")
    cluster.sql("SELECT pg_reload_conf()")
    try:
        # The worker expires receipts when it starts, then once a minute.
        cluster.sql("SELECT pg_terminate_backend(pid) FROM certyo.worker_status()")
        assert wait_for(lambda: cluster.sql(f"SELECT count(*) FROM certyo.receipt WHERE relid = '{table}'::regclass "
                                            "AND record_id = '2'") == "0", 60, every=0.2), \
            "record 2's receipts expired, the delete with them"
        assert cluster.sql(f"SELECT string_agg(operation || ':' || anchor_status, ',' ORDER BY id) FROM certyo.receipt "
                           f"WHERE relid = '{table}'::regclass AND record_id = '1'") == "insert:overdue,delete:anchored", \
            "record 1's delete stays while its earlier version is being verified"
        assert cluster.sql(f"SELECT count(*) FROM certyo.record_status('{table}')") == "0", "no record comes back"
        assert cluster.sql(f"SELECT count(*) FROM certyo.audit('{table}')") == "0", "and the audit stays silent"
    finally:
        cluster.sql("ALTER SYSTEM RESET certyo.retention")
        cluster.sql("SELECT pg_reload_conf()")
        assert not watch.restarted_on_purpose(allowed=("certyo_cdc delivery", "terminating background worker"))


def test_an_expired_delete_waits_for_an_earlier_dead_letter(cluster, emulator, watch):
    """An earlier version that is a dead letter (in certyo.delivery, no receipt) holds its
    record's delete back from expiry too, or the dead letter would be the record's newest."""
    table = "sidecar_expiry_dead"
    cluster.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, v text); SELECT certyo.track('{table}', write_back => 'none')")
    emulator.fault("reject", 1)
    cluster.sql(f"INSERT INTO {table} VALUES (1, 'x')")
    assert wait_for(lambda: cluster.sql(f"SELECT state FROM certyo.delivery WHERE relid = '{table}'::regclass") == "dead", 60)
    cluster.sql(f"DELETE FROM {table} WHERE id = 1")
    assert wait_for(lambda: cluster.sql(f"SELECT anchor_status FROM certyo.receipt WHERE relid = '{table}'::regclass") == "anchored", 60)
    cluster.sql("ALTER SYSTEM SET certyo.retention = 0")
    cluster.sql("SELECT pg_reload_conf()")
    try:
        cluster.sql("SELECT pg_terminate_backend(pid) FROM certyo.worker_status()")  # expires when it starts
        assert wait_for(lambda: cluster.sql("SELECT running FROM certyo.worker_status()") == "t", 60)
        assert cluster.wait_passes(2), "the restarted worker ran its passes"
        assert cluster.sql(f"SELECT operation FROM certyo.receipt WHERE relid = '{table}'::regclass") == "delete", \
            "the delete stays while the dead letter before it does"
        assert cluster.sql(f"SELECT count(*) FROM certyo.record_status('{table}')") == "0"
        assert cluster.sql(f"SELECT count(*) FROM certyo.audit('{table}')") == "0"
    finally:
        cluster.sql("ALTER SYSTEM RESET certyo.retention")
        cluster.sql("SELECT pg_reload_conf()")
        assert not watch.restarted_on_purpose(allowed=("certyo_cdc delivery", "terminating background worker"))


def test_expiry_keeps_a_records_receipt_that_another_keys_record_of_the_same_id_follows(cluster, watch):
    """A record is one record id under one record key: after a change of key, a new key's
    record '5' (another row) does not replace the old key's record '5', whose receipt is its
    row's only one (expired, the audit would name an untouched row)."""
    table = "sidecar_expiry_key"
    cluster.sql(f"""
        CREATE TABLE {table} (id int PRIMARY KEY, code int UNIQUE NOT NULL, v text);
        SELECT certyo.track('{table}', write_back => 'none');
        INSERT INTO {table} VALUES (5, 7, 'a'), (9, 5, 'b');
    """)
    assert wait_for(all_anchored(cluster, table, 2), 60, every=0.2)
    cluster.sql(f"SELECT certyo.track('{table}', record_id_columns => ARRAY['code'], write_back => 'none')")
    cluster.sql(f"UPDATE {table} SET v = 'b2' WHERE id = 9")  # record '5' under the new key: row (9, 5)
    assert wait_for(all_anchored(cluster, table, 1), 60, every=0.2)
    first = cluster.sql(f"SELECT min(id) FROM certyo.receipt WHERE relid = '{table}'::regclass")
    cluster.sql("ALTER SYSTEM SET certyo.retention = 0")
    cluster.sql("SELECT pg_reload_conf()")
    try:
        cluster.sql("SELECT pg_terminate_backend(pid) FROM certyo.worker_status()")  # expires when it starts
        assert wait_for(lambda: cluster.sql("SELECT running FROM certyo.worker_status()") == "t", 60)
        assert cluster.wait_passes(2)
        assert cluster.sql(f"SELECT count(*) FROM certyo.receipt WHERE id = {first}") == "1", \
            "row (5, 7)'s only receipt is kept"
        assert cluster.sql(f"SELECT count(*) FROM certyo.audit('{table}') WHERE record_id IS NOT NULL") == "0"
    finally:
        cluster.sql("ALTER SYSTEM RESET certyo.retention")
        cluster.sql("SELECT pg_reload_conf()")
        assert not watch.restarted_on_purpose(allowed=("certyo_cdc delivery", "terminating background worker"))
