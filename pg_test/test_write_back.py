"""When the worker writes back to the rows (`certyo.track(..., write_back => ...)`):
- 'anchored' (the default for tables tracked from 0.2.0 on): one UPDATE per version, hash,
  'anchored' and certyo_verified_at together, once Certyo confirms the version on chain; until
  then the row's bookkeeping columns hold NULL, and no INSERT evaluates a column default;
- 'accepted' (0.1.0's behaviour, kept by tables tracked before the update): the hash and
  'pending' at acceptance, the status again once anchored.
What every mode must keep: a row never says 'anchored' for a version that is not, and the audit
stays silent.

Fixtures in conftest.py (the emulator, anchoring 2 s after acceptance); this module brings its
own cluster, verifying 1 s after acceptance, with the extension's default write-back mode.

Run:  CERTYO_EMULATOR=target/release/certyo-emulator python3 -m pytest -q pg_test/test_write_back.py
"""
import threading

import pytest

from conftest import watched_cluster
from harness import TMP, wait_for

DIR = f"{TMP}/certyo-e2e-write-back"
# The harness's clusters keep the two-step write-back of the suites written before the modes;
# this one runs with the extension's default.
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


def updates(cluster, table):
    """Row versions the table's UPDATEs made so far (the worker reports its statistics)."""
    return int(cluster.sql(f"SELECT n_tup_upd FROM pg_stat_user_tables WHERE relid = '{table}'::regclass"))


def claims_not_anchored(cluster, table, record_id="t.id::text"):
    """Rows whose bookkeeping says something that the receipts do not back, in one snapshot: a
    hash that is not their newest accepted version's, or 'anchored' for a version that is not;
    or a hash while a newer change of the record waits to be accepted (the row holds that
    change's content, which no receipt covers yet).
    `record_id`: the row's record id, as an expression of its columns (row alias t)."""
    return cluster.sql(f"""
        SELECT count(*) FROM {table} t
          LEFT JOIN LATERAL (SELECT r.record_hash, r.anchor_status FROM certyo.receipt r
                              WHERE r.relid = '{table}'::regclass AND r.record_id = {record_id}
                              ORDER BY r.id DESC LIMIT 1) r ON true
         WHERE t.certyo_record_hash IS NOT NULL
           AND (EXISTS (SELECT FROM certyo.queue q WHERE q.relid = '{table}'::regclass AND q.record_id = {record_id})
                OR EXISTS (SELECT FROM certyo.delivery d WHERE d.relid = '{table}'::regclass AND d.record_id = {record_id})
                OR r.record_hash IS DISTINCT FROM t.certyo_record_hash
                OR t.certyo_anchor_status IS DISTINCT FROM r.anchor_status
                OR (t.certyo_verified_at IS NULL) <> (r.anchor_status <> 'anchored'))""")


def test_anchored_rows_hold_null_until_verified_then_hash_and_status_in_one_update(cluster):
    table = "wb_anchored"
    cluster.sql(f"""
        CREATE TABLE {table} (id int PRIMARY KEY, v text);
        SELECT certyo.track('{table}');
    """)
    assert cluster.sql(f"SELECT write_back FROM certyo.tracked_tables WHERE \"table\" = '{table}'::regclass") == \
        "anchored", "a table tracked without naming a mode writes back once anchored"
    assert cluster.sql(f"SELECT atthasdef FROM pg_attribute WHERE attrelid = '{table}'::regclass"
                       " AND attname = 'certyo_anchor_status'") == "f", "no default for every INSERT to evaluate"
    cluster.sql(f"INSERT INTO {table} SELECT g, 'v' || g FROM generate_series(1, {ROWS}) g")
    assert cluster.sql(f"SELECT count(*) FROM {table} WHERE certyo_anchor_status IS NULL") == str(ROWS)

    seen_accepted_unanchored = False
    mistakes = []

    def settled():
        nonlocal seen_accepted_unanchored
        wrong = claims_not_anchored(cluster, table)
        if wrong != "0":
            mistakes.append(wrong)
        pending = cluster.sql(f"""
            SELECT count(*) FROM {table} t JOIN certyo.receipt r
                ON r.relid = '{table}'::regclass AND r.record_id = t.id::text AND r.anchor_status = 'pending'
             WHERE t.certyo_record_hash IS NULL AND t.certyo_anchor_status IS NULL AND t.certyo_verified_at IS NULL""")
        seen_accepted_unanchored |= pending != "0"
        return cluster.sql(f"SELECT count(*) FROM {table} WHERE certyo_anchor_status = 'anchored'") == str(ROWS)

    assert wait_for(settled, 60, every=0.1), "every row is marked once its version is anchored"
    assert not mistakes, f"rows said more than their receipts back: {mistakes}"
    assert seen_accepted_unanchored, "accepted but not yet anchored, a row holds NULL"
    assert claims_not_anchored(cluster, table) == "0"
    assert cluster.sql(f"SELECT count(*) FROM {table} WHERE certyo_verified_at IS NULL") == "0"
    assert wait_for(lambda: updates(cluster, table) >= ROWS, 15)
    assert updates(cluster, table) == ROWS, "one new row version per change: hash and status together"
    assert cluster.sql(f"SELECT count(*) FROM certyo.audit('{table}')") == "0", "the audit is silent"

    # A change of an anchored row: its earlier marks are cleared in the writer's UPDATE (they are
    # not this content's), so at no moment does it claim more than its receipts back; the new
    # version marks it once anchored.
    cluster.sql(f"UPDATE {table} SET v = 'changed' WHERE id <= 5")
    mistakes.clear()

    def changed_and_settled():
        wrong = claims_not_anchored(cluster, table)
        if wrong != "0":
            mistakes.append(wrong)
        return cluster.sql(f"""
            SELECT count(*) FROM {table} t JOIN certyo.receipt r
                ON r.relid = '{table}'::regclass AND r.record_id = t.id::text AND r.operation = 'update'
             WHERE t.certyo_record_hash = r.record_hash AND t.certyo_anchor_status = 'anchored'""") == "5"

    assert wait_for(changed_and_settled, 60, every=0.1), "the changed rows carry their new version once anchored"
    assert not mistakes, f"rows said more than their receipts back: {mistakes}"
    assert cluster.sql(f"SELECT count(*) FROM certyo.audit('{table}')") == "0", "the audit is silent"


def test_accepted_keeps_the_two_step_write_back(cluster):
    table = "wb_accepted"
    cluster.sql(f"""
        CREATE TABLE {table} (id int PRIMARY KEY, v text);
        SELECT certyo.track('{table}', write_back => 'accepted');
        INSERT INTO {table} SELECT g, 'v' || g FROM generate_series(1, {ROWS}) g;
    """)
    assert cluster.sql(f"SELECT write_back FROM certyo.tracked_tables WHERE \"table\" = '{table}'::regclass") == \
        "accepted"
    assert cluster.sql(f"SELECT count(*) FROM {table} WHERE certyo_anchor_status = 'pending'") == str(ROWS), \
        "rows say 'pending' from their first version on, as before"
    assert wait_for(lambda: cluster.sql(f"SELECT count(*) FROM {table} WHERE certyo_anchor_status = 'anchored'")
                    == str(ROWS), 60)
    assert claims_not_anchored(cluster, table) == "0"
    assert wait_for(lambda: updates(cluster, table) >= 2 * ROWS, 15)
    assert updates(cluster, table) == 2 * ROWS, "the hash at acceptance, the status once anchored"
    assert cluster.sql(f"SELECT count(*) FROM certyo.audit('{table}')") == "0"


def test_switching_a_tracked_table_to_anchored_writes_its_rows_back_again(cluster):
    """Re-tracking keeps the mode unless one is named; naming the other changes the column's
    default and writes each record's newest version back as the new mode writes it."""
    table = "wb_switch"
    cluster.sql(f"""
        CREATE TABLE {table} (id int PRIMARY KEY, v text);
        SELECT certyo.track('{table}', write_back => 'accepted');
        INSERT INTO {table} SELECT g, 'v' || g FROM generate_series(1, 10) g;
    """)
    assert wait_for(lambda: cluster.sql(f"SELECT count(*) FROM {table} WHERE certyo_anchor_status = 'anchored'")
                    == "10", 60)
    cluster.sql(f"SELECT certyo.track('{table}', exclude_columns => '{{}}')")
    assert cluster.sql(f"SELECT write_back FROM certyo.tracked_tables WHERE \"table\" = '{table}'::regclass") == \
        "accepted", "re-tracking without naming a mode keeps the table's"
    cluster.sql(f"SELECT certyo.track('{table}', write_back => 'anchored')")
    assert cluster.sql(f"SELECT atthasdef FROM pg_attribute WHERE attrelid = '{table}'::regclass"
                       " AND attname = 'certyo_anchor_status'") == "f"
    cluster.sql(f"INSERT INTO {table} VALUES (11, 'new')")
    assert cluster.sql(f"SELECT certyo_anchor_status IS NULL FROM {table} WHERE id = 11") == "t"
    assert wait_for(lambda: cluster.sql(f"SELECT count(*) FROM {table} WHERE certyo_anchor_status = 'anchored'")
                    == "11", 60)
    assert claims_not_anchored(cluster, table) == "0"
    assert cluster.sql(f"SELECT count(*) FROM certyo.audit('{table}')") == "0"


@pytest.mark.parametrize("mode,together", [("anchored", True), ("anchored", False), ("accepted", True), ("accepted", False)])
def test_a_row_changed_while_untracked_keeps_no_earlier_mark_once_tracked_again(cluster, mode, together):
    """Untracked with its columns, a row changed (nothing captures it), tracked again: every
    record's newest version is written back again, and this row no longer holds it. Its
    earlier version's hash and 'anchored' were left on it, claiming content it no longer has;
    they are cleared (the audit names the row). The rows left alone keep their marks."""
    table = f"wb_again_{mode}_{'one' if together else 'apart'}"
    cluster.sql(f"""
        CREATE TABLE {table} (id int PRIMARY KEY, v text);
        SELECT certyo.track('{table}', write_back => '{mode}');
        INSERT INTO {table} SELECT g, 'v' || g FROM generate_series(1, 4) g;
    """)
    assert wait_for(lambda: cluster.sql(f"SELECT count(*) FROM {table} WHERE certyo_anchor_status = 'anchored'")
                    == "4", 60), cluster.explain()
    steps = [f"SELECT certyo.untrack('{table}')",
             f"UPDATE {table} SET v = 'changed while untracked' WHERE id <= 2",
             f"SELECT certyo.track('{table}')"]
    if together:
        cluster.sql("BEGIN; " + "; ".join(steps) + "; COMMIT;")
    else:
        for step in steps:
            cluster.sql(step)
    assert wait_for(lambda: cluster.sql(f"SELECT count(*) FROM certyo.receipt WHERE relid = '{table}'::regclass "
                                        "AND NOT written_back") == "0", 60), cluster.explain()
    assert cluster.sql(f"SELECT string_agg(id || ':' || coalesce(certyo_anchor_status, '-') || ':' "
                       f"|| (certyo_record_hash IS NULL) || ':' || (certyo_verified_at IS NULL), ',' ORDER BY id) "
                       f"FROM {table}") == "1:-:true:true,2:-:true:true,3:anchored:false:false,4:anchored:false:false"
    assert claims_not_anchored(cluster, table) == "0"
    assert cluster.sql(f"SELECT string_agg(record_id || ': ' || problem, ', ' ORDER BY record_id::int) "
                       f"FROM certyo.audit('{table}')") == \
        "1: changed without capture, 2: changed without capture"
    cluster.sql(f"DROP TABLE {table}")


# Statements that change the content of one row each (row n, by its id), in every way an UPDATE
# reaches a row: its own statement, a join, an upsert, MERGE, a new key, a move to another
# partition, a BEFORE trigger of the table (the statement sets an excluded column only, and the
# table's trigger stamps updated_at).
CONTENT_CHANGES = {
    "set": "UPDATE {t} SET v = 'changed' WHERE id = 1",
    "join": "UPDATE {t} AS t SET v = s.v FROM (VALUES (2, 'changed')) AS s(id, v) WHERE t.id = s.id",
    "upsert": "INSERT INTO {t} (id, part, v) VALUES (3, 1, 'changed') ON CONFLICT (id, part) DO UPDATE SET v = excluded.v",
    "merge": "MERGE INTO {t} AS t USING (VALUES (4)) AS s(id) ON t.id = s.id WHEN MATCHED THEN UPDATE SET v = 'changed'",
    "new key": "UPDATE {t} SET id = 1005 WHERE id = 5",
    "other partition": "UPDATE {t} SET part = 2 WHERE id = 6",
    "trigger": "UPDATE {t} SET note = 'changed' WHERE id = 7",
}
CHANGED_IDS = {"1": "set", "2": "join", "3": "upsert", "4": "merge", "1005": "new key", "6": "other partition",
               "7": "trigger"}


@pytest.mark.parametrize("mode", ["anchored", "accepted"])
def test_a_row_whose_content_changes_lets_go_of_its_earlier_marks_in_the_writers_statement(cluster, mode):
    """Every row anchored, delivery paused (an outage), then each row's content changed another
    way: in the writer's own statement, the row lets go of its earlier version's hash, status
    and verification time (they would claim, for hours, content Certyo never saw). The rows
    left alone keep theirs. Once delivery resumes, each captured row is marked with its new
    version, and the audit is silent."""
    t = f"wb_moves_{mode}"
    cluster.sql(f"""
        CREATE TABLE {t} (id int, part int NOT NULL DEFAULT 1, v text, note text, updated_at timestamptz,
                          PRIMARY KEY (id, part)) PARTITION BY LIST (part);
        CREATE TABLE {t}_1 PARTITION OF {t} FOR VALUES IN (1);
        CREATE TABLE {t}_2 PARTITION OF {t} FOR VALUES IN (2);
        CREATE FUNCTION {t}_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN NEW.updated_at := clock_timestamp(); RETURN NEW; END $$;
        CREATE TRIGGER set_updated_at BEFORE UPDATE ON {t} FOR EACH ROW EXECUTE FUNCTION {t}_stamp();
        SELECT certyo.track('{t}', exclude_columns => ARRAY['note'], write_back => '{mode}');
        INSERT INTO {t} (id, v) SELECT g, 'v' || g FROM generate_series(1, 10) g;
    """)
    assert wait_for(lambda: cluster.sql(f"SELECT count(*) FROM {t} WHERE certyo_anchor_status = 'anchored'")
                    == "10", 60), cluster.explain()
    cluster.sql("SELECT certyo.pause()")
    try:
        for statement in CONTENT_CHANGES.values():
            cluster.sql(statement.format(t=t))
        marks = cluster.sql(f"""SELECT string_agg(id || ':' || coalesce(certyo_anchor_status, '-') || ':'
                                                  || (certyo_record_hash IS NULL) || ':' || (certyo_verified_at IS NULL),
                                                  ',' ORDER BY id) FROM {t}""").split(",")
        for row in marks:
            id_, status, no_hash, not_verified = row.split(":")
            if id_ in CHANGED_IDS:
                # Under 'accepted' a row says 'pending' from its first version on, as a new row does.
                cleared = "pending" if mode == "accepted" else "-"
                assert (status, no_hash, not_verified) == (cleared, "true", "true"), \
                    f"{CHANGED_IDS[id_]}: row {id_} still shows an earlier version's marks: {row}"
            else:
                assert (status, no_hash, not_verified) == ("anchored", "false", "false"), f"left alone: {row}"
    finally:
        cluster.sql("SELECT certyo.resume()")
    assert wait_for(lambda: cluster.sql(f"SELECT count(*) FROM {t} WHERE certyo_anchor_status = 'anchored'")
                    == "10", 60), cluster.sql(f"SELECT string_agg(id || ':' || coalesce(certyo_anchor_status, '-'), ',' "
                                              f"ORDER BY id) FROM {t}") + cluster.explain()
    assert claims_not_anchored(cluster, t, record_id="t.id || '/' || t.part") == "0"
    assert cluster.sql(f"SELECT count(*) FROM certyo.audit('{t}')") == "0"
    cluster.sql(f"DROP TABLE {t}; DROP FUNCTION {t}_stamp()")


@pytest.mark.parametrize("mode", ["anchored", "accepted"])
def test_a_row_whose_content_stays_keeps_its_marks(cluster, mode):
    """Updates that leave the content as it is keep the row's marks, and queue nothing: the
    same values, an excluded column, the bookkeeping columns themselves. The table has a stored
    generated column, computed after the BEFORE triggers: no change seen there either."""
    t = f"wb_stays_{mode}"
    cluster.sql(f"""
        CREATE TABLE {t} (id int PRIMARY KEY, v text, note text, size int GENERATED ALWAYS AS (length(v)) STORED);
        SELECT certyo.track('{t}', exclude_columns => ARRAY['note'], write_back => '{mode}');
        INSERT INTO {t} (id, v) SELECT g, 'v' || g FROM generate_series(1, 3) g;
    """)
    assert wait_for(lambda: cluster.sql(f"SELECT count(*) FROM {t} WHERE certyo_anchor_status = 'anchored'")
                    == "3", 60), cluster.explain()
    before = cluster.sql(f"SELECT string_agg(certyo_record_hash || certyo_verified_at, ',' ORDER BY id) FROM {t}")
    cluster.sql(f"""
        UPDATE {t} SET v = v WHERE id = 1;
        UPDATE {t} SET note = 'a note' WHERE id = 2;
        UPDATE {t} SET certyo_verified_at = certyo_verified_at WHERE id = 3;
    """)
    assert cluster.sql(f"SELECT count(*) FROM {t} WHERE certyo_anchor_status = 'anchored'") == "3"
    assert cluster.sql(f"SELECT string_agg(certyo_record_hash || certyo_verified_at, ',' ORDER BY id) FROM {t}") == before
    assert cluster.sql(f"SELECT count(*) FROM certyo.queue WHERE relid = '{t}'::regclass") == "0"
    cluster.sql(f"DROP TABLE {t}")


def test_a_write_back_mode_that_does_not_exist_is_refused(cluster):
    cluster.sql("CREATE TABLE wb_wrong (id int PRIMARY KEY)")
    attempt = cluster.attempt_verbose("SELECT certyo.track('wb_wrong', write_back => 'never')")
    assert attempt.sqlstate == "22023", attempt.stderr
    assert "'anchored', 'accepted' or 'none'" in attempt.stderr
    assert cluster.sql("SELECT count(*) FROM certyo.tracked_tables WHERE \"table\" = 'wb_wrong'::regclass") == "0"


def test_anchored_marks_the_rows_of_a_partitioned_table_with_a_composite_key(cluster):
    """The one write-back finds each row by its place: within its partition (places repeat
    across partitions), under a key of two columns."""
    cluster.sql("""
        CREATE TABLE wb_parted (region text, id int, v text, PRIMARY KEY (region, id)) PARTITION BY LIST (region);
        CREATE TABLE wb_parted_eu PARTITION OF wb_parted FOR VALUES IN ('eu');
        CREATE TABLE wb_parted_us PARTITION OF wb_parted FOR VALUES IN ('us');
        SELECT certyo.track('wb_parted');
        INSERT INTO wb_parted SELECT r, g, 'v' FROM unnest(ARRAY['eu', 'us']) r, generate_series(1, 10) g;
    """)
    assert wait_for(lambda: cluster.sql("SELECT count(*) FROM wb_parted WHERE certyo_anchor_status = 'anchored'")
                    == "20", 60)
    assert cluster.sql("""
        SELECT count(*) FROM wb_parted t JOIN certyo.receipt r
            ON r.relid = 'wb_parted'::regclass AND r.record_id = t.region || '/' || t.id
         WHERE r.record_hash = t.certyo_record_hash""") == "20", "each row holds its own version's hash"
    assert cluster.sql("SELECT count(*) FROM certyo.audit('wb_parted')") == "0"


def test_anchored_marks_no_row_that_no_longer_renders_to_its_captured_content(cluster):
    """The content guard holds in the one write-back too: the table owner renames an enum
    label (ALTER TYPE ... RENAME VALUE) between capture and verification. No row changes and
    nothing is captured, but the rows holding that label no longer render to the payload
    Certyo anchored: they are never marked (hash and 'anchored') with it, their receipts say
    why, and the audit names exactly them. The other rows are marked as ever."""
    cluster.sql("""
        CREATE TYPE wb_mood AS ENUM ('calm', 'angry');
        CREATE TABLE wb_moods (id int PRIMARY KEY, v wb_mood);
        SELECT certyo.track('wb_moods');
        SELECT certyo.pause();
        INSERT INTO wb_moods SELECT g, CASE WHEN g <= 3 THEN 'calm' ELSE 'angry' END::wb_mood
          FROM generate_series(1, 10) g;
        ALTER TYPE wb_mood RENAME VALUE 'calm' TO 'serene';
        SELECT certyo.resume();
    """)
    assert wait_for(lambda: cluster.sql("SELECT count(*) FROM wb_moods WHERE certyo_anchor_status = 'anchored'") == "7"
                    and cluster.sql("SELECT count(*) FROM certyo.receipt WHERE relid = 'wb_moods'::regclass "
                                    "AND (anchor_status = 'pending' OR NOT written_back)") == "0", 60), cluster.explain()
    assert cluster.sql("SELECT coalesce(string_agg(id::text, ','), '') FROM wb_moods "
                       "WHERE certyo_record_hash IS NOT NULL AND v = 'serene'") == ""
    assert cluster.sql("SELECT string_agg(record_id, ',' ORDER BY record_id::int) FROM certyo.receipt "
                       "WHERE relid = 'wb_moods'::regclass AND write_back_dropped LIKE '%no longer renders%'") == "1,2,3"
    assert claims_not_anchored(cluster, "wb_moods") == "0"
    assert cluster.sql("SELECT string_agg(record_id || ': ' || problem, ', ' ORDER BY record_id::int) "
                       "FROM certyo.audit('wb_moods')") == \
        "1: changed without capture, 2: changed without capture, 3: changed without capture"
    cluster.sql("DROP TABLE wb_moods; DROP TYPE wb_mood")


@pytest.mark.parametrize("mode", ["anchored", "accepted"])
def test_a_column_added_before_the_write_back_does_not_keep_rows_from_their_marks(cluster, mode):
    """The content guard compares a row with what was captured under the version's own shape:
    a column added (or dropped) between capture and the write-back changes how the row renders
    now, not the content that was captured, so every row is marked as ever ('anchored' with
    its own hash), nothing is refused, and the audit reports the schema change only."""
    table = f"wb_added_{mode}"
    cluster.sql(f"""
        CREATE TABLE {table} (id int PRIMARY KEY, v text, gone int);
        SELECT certyo.track('{table}', write_back => '{mode}');
        SELECT certyo.pause();
        INSERT INTO {table} (id, v, gone) SELECT g, 'v' || g, g FROM generate_series(1, {ROWS}) g;
        ALTER TABLE {table} ADD COLUMN added int, DROP COLUMN gone;
        SELECT certyo.resume();
    """)
    assert wait_for(lambda: cluster.sql(f"SELECT count(*) FROM {table} WHERE certyo_anchor_status = 'anchored'")
                    == str(ROWS), 60), cluster.explain()
    assert cluster.sql(f"SELECT count(*) FROM certyo.receipt WHERE relid = '{table}'::regclass "
                       "AND write_back_dropped IS NOT NULL") == "0"
    assert claims_not_anchored(cluster, table) == "0"
    assert cluster.sql(f"SELECT coalesce(string_agg(coalesce(record_id, '-') || ': ' || problem, ', '), '') "
                       f"FROM certyo.audit('{table}') WHERE record_id IS NOT NULL") == ""


def three_versions_of_one_row(cluster, table, mode):
    """Track `table` in `mode`; row 1 gets three versions (insert, two updates), row 2 one, all
    accepted together, long before the first is due for verification."""
    cluster.sql(f"""
        CREATE TABLE {table} (id int PRIMARY KEY, v text);
        SELECT certyo.track('{table}', write_back => '{mode}');
        SELECT certyo.pause();
    """)
    cluster.sql(f"INSERT INTO {table} VALUES (1, 'first'), (2, 'only')")
    cluster.sql(f"UPDATE {table} SET v = 'second' WHERE id = 1")
    cluster.sql(f"UPDATE {table} SET v = 'third' WHERE id = 1")
    cluster.sql("SELECT certyo.resume()")


def anchored_with_the_last_hash(cluster, table):
    """Both rows say 'anchored' with their newest receipt's hash, that receipt anchored."""
    return cluster.sql(f"""
        SELECT count(*) FROM {table} t
          JOIN LATERAL (SELECT r.record_hash, r.anchor_status FROM certyo.receipt r
                         WHERE r.relid = '{table}'::regclass AND r.record_id = t.id::text
                         ORDER BY r.id DESC LIMIT 1) r ON true
         WHERE t.certyo_anchor_status = 'anchored' AND t.certyo_verified_at IS NOT NULL
           AND t.certyo_record_hash = r.record_hash AND r.anchor_status = 'anchored'""") == "2"


def audit_findings(cluster, table):
    return cluster.sql(f"SELECT coalesce(string_agg(record_id || ': ' || problem, ', ' ORDER BY record_id), '') "
                       f"FROM certyo.audit('{table}') WHERE record_id IS NOT NULL")


@pytest.mark.parametrize("mode", ["anchored", "accepted"])
def test_only_the_current_version_of_a_record_is_verified(cluster, mode):
    """certyo.verify = 'current' (the default): of three versions of a row accepted before the
    first is due, only the last is asked about; the earlier two are 'superseded' in the history,
    never verified, and the row ends 'anchored' with the last version's hash. The audit is
    silent, and loud once the row is changed behind capture."""
    table = f"wb_current_{mode}"
    three_versions_of_one_row(cluster, table, mode)
    assert wait_for(lambda: anchored_with_the_last_hash(cluster, table), 60), cluster.explain()
    assert cluster.sql(f"SELECT string_agg(operation || ' ' || anchor_status, ', ' ORDER BY id) "
                       f"FROM certyo.history('{table}', '1')") == \
        "insert superseded, update superseded, update anchored"
    assert cluster.sql(f"SELECT count(*) FROM certyo.receipt WHERE relid = '{table}'::regclass AND record_id = '1' "
                       "AND anchor_status = 'superseded' AND verify_attempts = 0 AND last_verified_at IS NULL "
                       "AND next_verify_at IS NULL AND anchored_at IS NULL") == "2", "never asked about"
    assert claims_not_anchored(cluster, table) == "0"
    assert audit_findings(cluster, table) == ""
    cluster.sql(f"SET session_replication_role = replica; UPDATE {table} SET v = 'forged' WHERE id = 1")
    assert audit_findings(cluster, table) == "1: changed without capture"


def test_every_version_is_verified_when_the_setting_asks(cluster):
    """certyo.verify = 'every': each of the three versions is verified and anchored, and the row
    holds the last one's hash."""
    table = "wb_every"
    cluster.sql("ALTER SYSTEM SET certyo.verify = 'every'")
    cluster.sql("SELECT pg_reload_conf()")
    try:
        three_versions_of_one_row(cluster, table, "anchored")
        assert wait_for(lambda: anchored_with_the_last_hash(cluster, table), 60), cluster.explain()
        assert wait_for(lambda: cluster.sql(f"SELECT string_agg(anchor_status, ', ' ORDER BY id) "
                                            f"FROM certyo.history('{table}', '1')") == "anchored, anchored, anchored",
                        30), cluster.explain()
        assert audit_findings(cluster, table) == ""
    finally:
        cluster.sql("ALTER SYSTEM RESET certyo.verify")
        cluster.sql("SELECT pg_reload_conf()")


def test_the_marks_trigger_is_put_back_as_installed_by_the_next_alter_table(cluster):
    """ALTER TABLE ... DISABLE TRIGGER zz_certyo_marks (or ALL) would keep a changed row's earlier
    marks. The ALTER TABLE itself installs it again as track() does, so a change clears them."""
    t = "wb_put_back"
    cluster.sql(f"""
        CREATE TABLE {t} (id int PRIMARY KEY, v text);
        SELECT certyo.track('{t}');
        INSERT INTO {t} VALUES (1, 'a'), (2, 'b');
    """)
    assert wait_for(lambda: cluster.sql(f"SELECT count(*) FROM {t} WHERE certyo_anchor_status = 'anchored'")
                    == "2", 60), cluster.explain()
    marks = f"SELECT tgenabled::text || ':' || (tgqual IS NULL) FROM pg_trigger WHERE tgrelid = '{t}'::regclass AND tgname = 'zz_certyo_marks'"
    cluster.sql(f"ALTER TABLE {t} DISABLE TRIGGER ALL")
    assert cluster.sql(marks) == "O:true"
    cluster.sql(f"ALTER TABLE {t} ENABLE TRIGGER ALL; ALTER TABLE {t} DISABLE TRIGGER zz_certyo_marks")
    assert cluster.sql(marks) == "O:true"
    cluster.sql(f"UPDATE {t} SET v = 'changed' WHERE id = 1")
    assert cluster.sql(f"SELECT string_agg(id || ':' || coalesce(certyo_anchor_status, '-'), ',' ORDER BY id) "
                       f"FROM {t}") == "1:-,2:anchored"
    cluster.sql(f"DROP TABLE {t}")


def test_certyo_cdcs_triggers_are_neither_dropped_nor_renamed_on_a_tracked_table(cluster):
    """Renaming a trigger out of the way and dropping it under its new name would stop capture,
    or the clearing of marks, without a word: refused on a tracked table, as DROP TRIGGER is,
    and so is giving a trigger of the owner's one of their names. On a table that is not
    tracked, a trigger of such a name is the owner's own: dropped and renamed as any other."""
    cluster.sql("""
        CREATE TABLE wb_guarded (id int PRIMARY KEY, v text);
        SELECT certyo.track('wb_guarded');
        CREATE FUNCTION wb_noop() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
        CREATE TRIGGER mine BEFORE UPDATE ON wb_guarded FOR EACH ROW EXECUTE FUNCTION wb_noop();
    """)
    for trigger in ("certyo_capture", "certyo_truncate_guard", "zz_certyo_marks"):
        for statement in (f"ALTER TRIGGER {trigger} ON wb_guarded RENAME TO a_trigger",
                          f"DROP TRIGGER {trigger} ON wb_guarded",
                          # DROP EXTENSION plpgsql would drop it with that extension
                          f"ALTER TRIGGER {trigger} ON wb_guarded DEPENDS ON EXTENSION plpgsql"):
            attempt = cluster.attempt_verbose(statement)
            assert attempt.sqlstate == "2BP01", f"{statement}: {attempt.stderr}"
            assert f"trigger {trigger} on public.wb_guarded" in attempt.stderr
            assert "certyo.untrack('public.wb_guarded')" in attempt.stderr
        # Replaced by hand, it could capture less, or never clear (WHEN (false)).
        attempt = cluster.attempt_verbose(f"CREATE OR REPLACE TRIGGER {trigger} BEFORE UPDATE ON wb_guarded "
                                          "FOR EACH ROW WHEN (false) EXECUTE FUNCTION certyo.capture()")
        assert attempt.sqlstate == "42939", attempt.stderr
        assert f"the trigger name {trigger} is certyo_cdc's" in attempt.stderr
    cluster.sql("DROP TRIGGER mine ON wb_guarded")
    cluster.sql("CREATE TRIGGER mine BEFORE UPDATE ON wb_guarded FOR EACH ROW EXECUTE FUNCTION wb_noop()")
    attempt = cluster.attempt_verbose("ALTER TRIGGER mine ON wb_guarded RENAME TO zz_certyo_marks")
    assert attempt.sqlstate == "42939", attempt.stderr
    assert cluster.sql("SELECT string_agg(tgname, ',' ORDER BY tgname) FROM pg_trigger "
                       "WHERE tgrelid = 'wb_guarded'::regclass") == "certyo_capture,certyo_truncate_guard,mine,zz_certyo_marks"
    cluster.sql("""
        CREATE TABLE wb_unguarded (id int PRIMARY KEY);
        CREATE TRIGGER zz_certyo_marks BEFORE UPDATE ON wb_unguarded FOR EACH ROW EXECUTE FUNCTION wb_noop();
        ALTER TRIGGER zz_certyo_marks ON wb_unguarded RENAME TO certyo_capture;
        DROP TRIGGER certyo_capture ON wb_unguarded;
        DROP TABLE wb_unguarded, wb_guarded; DROP FUNCTION wb_noop();
    """)


@pytest.mark.parametrize("mode", ["anchored", "accepted"])
def test_a_captured_generated_column_computed_from_a_column_not_captured_is_refused(cluster, mode):
    """Computed from an excluded column, it changes when only that column does, after every
    BEFORE trigger: the row's earlier marks could not be cleared in that UPDATE. Computed from a
    bookkeeping column, every write-back would change the content it marks. Refused by track()
    and by the ALTER TABLE that would make such a column (undone); excluded too, it is fine."""
    t = f"wb_generated_{mode}"
    cluster.sql(f"""
        CREATE TABLE {t} (id int PRIMARY KEY, v text, note text,
                          note_len int GENERATED ALWAYS AS (length(note)) STORED)""")
    attempt = cluster.attempt_verbose(f"SELECT certyo.track('{t}', exclude_columns => ARRAY['note'], write_back => '{mode}')")
    assert attempt.sqlstate == "42P16", attempt.stderr
    assert 'generated column "note_len"' in attempt.stderr and "ARRAY['note', 'note_len']" in attempt.stderr
    cluster.sql(f"SELECT certyo.track('{t}', exclude_columns => ARRAY['note', 'note_len'], write_back => '{mode}')")
    attempt = cluster.attempt_verbose(f"ALTER TABLE {t} ADD COLUMN label text "
                                      "GENERATED ALWAYS AS (coalesce(certyo_anchor_status, '-')) STORED")
    assert attempt.sqlstate == "42P16", attempt.stderr
    assert "certyo_anchor_status" in attempt.stderr
    assert cluster.sql(f"SELECT count(*) FROM pg_attribute WHERE attrelid = '{t}'::regclass AND attname = 'label'") == "0"
    cluster.sql(f"DROP TABLE {t}")
    cluster.sql(f"""
        CREATE TABLE {t} (id int PRIMARY KEY, v text, note text,
                          note_len int GENERATED ALWAYS AS (length(note)) STORED);
        SELECT certyo.track('{t}', exclude_columns => ARRAY['note'], write_back => 'none');
        DROP TABLE {t};
    """)


def test_a_partitions_clones_of_the_tables_triggers_fire_as_the_tables_do(cluster):
    """ALTER TABLE partition DISABLE TRIGGER certyo_capture (or zz_certyo_marks) would change the
    partition's clone alone: its rows uncaptured (or their marks kept), with
    certyo.tracked_tables, which reads the table's own trigger, still saying 'capturing'.
    Refused, naming the tracked table to change instead; the table's own triggers, the owner's
    triggers on the partition, and ALL (pg_restore --disable-triggers) change as ever."""
    cluster.sql("""
        CREATE TABLE wb_parts (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
        CREATE TABLE wb_parts_1 PARTITION OF wb_parts FOR VALUES FROM (0) TO (100);
        SELECT certyo.track('wb_parts');
        CREATE FUNCTION wb_parts_noop() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
        CREATE TRIGGER mine BEFORE UPDATE ON wb_parts_1 FOR EACH ROW EXECUTE FUNCTION wb_parts_noop();
    """)
    for statement in ("ALTER TABLE wb_parts_1 DISABLE TRIGGER certyo_capture",
                      "ALTER TABLE wb_parts_1 DISABLE TRIGGER zz_certyo_marks",
                      "ALTER TABLE wb_parts_1 ENABLE REPLICA TRIGGER certyo_capture"):
        attempt = cluster.attempt_verbose(statement)
        assert attempt.sqlstate == "55000", f"{statement}: {attempt.stderr}"
        assert "Change it on the tracked table (public.wb_parts)" in attempt.stderr, attempt.stderr
    cluster.sql("ALTER TABLE wb_parts_1 DISABLE TRIGGER mine; ALTER TABLE wb_parts_1 ENABLE TRIGGER mine")
    # As pg_restore --disable-triggers brackets a partition's data: let through, and while the
    # partition's capture is off, certyo.tracked_tables says the table is not capturing.
    capturing = "SELECT capturing FROM certyo.tracked_tables WHERE \"table\" = 'wb_parts'::regclass"
    assert cluster.sql(capturing) == "t"
    for off in ("DISABLE TRIGGER ALL", "DISABLE TRIGGER USER"):
        cluster.sql(f"ALTER TABLE wb_parts_1 {off}")
        assert cluster.sql(capturing) == "f", f"{off} on a partition: its rows are not captured"
        cluster.sql("ALTER TABLE wb_parts_1 ENABLE TRIGGER ALL")
        assert cluster.sql(capturing) == "t"
    # On the table itself, a capture trigger that fires only in replica mode captures nothing.
    cluster.sql("ALTER TABLE wb_parts ENABLE REPLICA TRIGGER certyo_capture")
    assert cluster.sql(capturing) == "f", "fires in replica mode only"
    cluster.sql("ALTER TABLE wb_parts ENABLE ALWAYS TRIGGER certyo_capture")
    assert cluster.sql(capturing) == "t", "fires always"
    cluster.sql("ALTER TABLE wb_parts ENABLE TRIGGER certyo_capture")
    # The check runs in every database, also one without the extension: nothing of it named there.
    cluster.sql("CREATE DATABASE wb_elsewhere")
    cluster.sql("CREATE TABLE t (id int); CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$; "
                "CREATE TRIGGER mine BEFORE UPDATE ON t FOR EACH ROW EXECUTE FUNCTION f(); "
                "ALTER TABLE t DISABLE TRIGGER mine; ALTER TABLE t ENABLE ALWAYS TRIGGER mine; ALTER TABLE t DISABLE TRIGGER ALL",
                database="wb_elsewhere")
    # ... and where a look-alike certyo.capture() is anyone's (not the extension's), it is not ours.
    cluster.sql("CREATE SCHEMA certyo; CREATE FUNCTION certyo.capture() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RETURN NEW; END $$; "
                "CREATE TABLE pt (id int PRIMARY KEY) PARTITION BY RANGE (id); "
                "CREATE TABLE pt_1 PARTITION OF pt FOR VALUES FROM (0) TO (100); "
                "CREATE TRIGGER certyo_capture AFTER INSERT ON pt FOR EACH ROW EXECUTE FUNCTION certyo.capture(); "
                "ALTER TABLE pt_1 DISABLE TRIGGER certyo_capture", database="wb_elsewhere")
    cluster.sql("DROP DATABASE wb_elsewhere")
    cluster.sql("ALTER TABLE wb_parts DISABLE TRIGGER certyo_capture")
    assert cluster.sql("SELECT capturing FROM certyo.tracked_tables WHERE \"table\" = 'wb_parts'::regclass") == "f"
    cluster.sql("ALTER TABLE wb_parts ENABLE TRIGGER certyo_capture")
    assert cluster.sql("SELECT string_agg(tgname || ':' || tgenabled::text, ',' ORDER BY tgname) FROM pg_trigger "
                       "WHERE tgrelid = 'wb_parts_1'::regclass") == "certyo_capture:O,mine:O,zz_certyo_marks:O"
    cluster.sql("DROP TABLE wb_parts; DROP FUNCTION wb_parts_noop()")


def test_a_table_with_a_partition_being_detached_is_refused_by_track(cluster):
    """An interrupted DETACH PARTITION ... CONCURRENTLY leaves the partition "detach pending": it
    can no longer be altered (no bookkeeping columns: inserts into it failed once tracked), and
    its rows are on their way out. track() refuses the table, naming the statement that
    finishes the detach; once finished, the table is tracked."""
    cluster.sql("""
        CREATE TABLE wb_pending (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
        CREATE TABLE wb_pending_1 PARTITION OF wb_pending FOR VALUES FROM (0) TO (100);
        CREATE TABLE wb_pending_2 PARTITION OF wb_pending FOR VALUES FROM (100) TO (200);
        INSERT INTO wb_pending VALUES (1, 'a'), (150, 'b');
    """)
    # DETACH ... CONCURRENTLY waits for every older snapshot: one held open, it is cancelled.
    held = cluster.hold_open("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM wb_pending;")
    try:
        attempt = cluster.attempt_verbose(
            "SET statement_timeout = '2s'; ALTER TABLE wb_pending DETACH PARTITION wb_pending_2 CONCURRENTLY")
        assert attempt.sqlstate == "57014", attempt.stderr
    finally:
        held.close()
    assert cluster.sql("SELECT inhdetachpending FROM pg_inherits WHERE inhrelid = 'wb_pending_2'::regclass") == "t"
    attempt = cluster.attempt_verbose("SELECT certyo.track('wb_pending')")
    assert attempt.sqlstate == "55000", attempt.stderr
    assert "wb_pending_2 of public.wb_pending is being detached" in attempt.stderr, attempt.stderr
    assert "DETACH PARTITION public.wb_pending_2 FINALIZE" in attempt.stderr, attempt.stderr
    tracked = "SELECT count(*) FROM certyo.tracked_tables WHERE \"table\" = 'wb_pending'::regclass"
    assert cluster.sql(tracked) == "0"
    assert cluster.sql("SELECT count(*) FROM pg_attribute WHERE attrelid = 'wb_pending_1'::regclass "
                       "AND attname = 'certyo_record_hash'") == "0", "nothing of the refused track() is left"
    # Attached to a tracked table, the same: refused.
    cluster.sql("CREATE TABLE wb_pending_host (id int PRIMARY KEY, v text) PARTITION BY RANGE (id); "
                "SELECT certyo.track('wb_pending_host')")
    attempt = cluster.attempt_verbose(
        "ALTER TABLE wb_pending_host ATTACH PARTITION wb_pending FOR VALUES FROM (0) TO (1000)")
    assert attempt.sqlstate == "55000", attempt.stderr
    assert "wb_pending_2 of public.wb_pending is being detached" in attempt.stderr, attempt.stderr
    cluster.sql("SELECT certyo.untrack('wb_pending_host', drop_columns => true); DROP TABLE wb_pending_host")
    cluster.sql("ALTER TABLE wb_pending DETACH PARTITION wb_pending_2 FINALIZE")
    cluster.sql("SELECT certyo.track('wb_pending')")
    assert cluster.sql(tracked) == "1"
    cluster.sql("SELECT certyo.untrack('wb_pending', drop_columns => true); DROP TABLE wb_pending, wb_pending_2")


def test_partitions_cannot_leave_through_a_schema_owner_or_another_extension(cluster):
    """Three ways a partition of a tracked table could leave it with no delete captured, or a
    view's code run by the attaching superuser, each refused or left to PostgreSQL:
    DROP OWNED BY the owner of the partition's schema (CASCADE drops what the schema holds,
    whoever owns it); an ATTACH of a table that another extension owns (its DROP EXTENSION would
    drop the partition); an ATTACH of a view, whose columns would run its owner's functions as
    the session attaching it, before PostgreSQL says it is no table."""
    cluster.sql("""
        CREATE ROLE wb_sowner LOGIN; CREATE ROLE wb_mallory LOGIN;
        CREATE SCHEMA wb_s AUTHORIZATION wb_sowner;
        CREATE TABLE wb_leave (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
        CREATE TABLE wb_s.wb_leave_1 PARTITION OF wb_leave FOR VALUES FROM (0) TO (100);
        SELECT certyo.track('wb_leave');
        INSERT INTO wb_leave VALUES (1, 'a');
    """)
    try:
        attempt = cluster.attempt_verbose("DROP OWNED BY wb_sowner CASCADE", user="wb_sowner")
        assert attempt.sqlstate == "55000", attempt.stderr
        assert "wb_s.wb_leave_1 is a partition of tracked table public.wb_leave, and dropping it" in attempt.stderr, \
            attempt.stderr
        assert cluster.sql("SELECT count(*) FROM wb_s.wb_leave_1") == "1"
        # A table of another extension's, as a partition.
        cluster.sql("""
            CREATE EXTENSION hstore;
            CREATE TABLE wb_member (id int PRIMARY KEY, v text);
            ALTER EXTENSION hstore ADD TABLE wb_member;
        """)
        attempt = cluster.attempt_verbose("ALTER TABLE wb_leave ATTACH PARTITION wb_member FOR VALUES FROM (100) TO (200)")
        assert attempt.sqlstate == "55000", attempt.stderr
        assert "belongs to extension hstore" in attempt.stderr, attempt.stderr
        cluster.sql("ALTER EXTENSION hstore DROP TABLE wb_member; DROP EXTENSION hstore")
        cluster.sql("ALTER TABLE wb_leave ATTACH PARTITION wb_member FOR VALUES FROM (100) TO (200)")
        # A view of mallory's, named in the superuser's ATTACH: PostgreSQL's refusal, no code of hers.
        cluster.sql("""
            CREATE FUNCTION wb_mal() RETURNS text LANGUAGE plpgsql AS $$
            BEGIN RAISE NOTICE 'wb_mal runs as %', current_user; RETURN NULL; END $$;
            ALTER FUNCTION wb_mal() OWNER TO wb_mallory;
            GRANT CREATE ON SCHEMA public TO wb_mallory;
        """)
        cluster.sql("CREATE VIEW wb_mal_v AS SELECT 300 AS id, 'x'::text AS v, wb_mal() AS certyo_record_hash",
                    user="wb_mallory")
        attempt = cluster.attempt_verbose("ALTER TABLE wb_leave ATTACH PARTITION wb_mal_v FOR VALUES FROM (300) TO (400)")
        assert attempt.returncode != 0, attempt.stdout
        assert "wb_mal runs as" not in attempt.stderr, attempt.stderr
        assert "certyo_cdc" not in attempt.stderr, attempt.stderr
    finally:
        cluster.sql("""
            SELECT certyo.untrack('wb_leave', drop_columns => true) FROM certyo.tracked_tables WHERE "table" = 'wb_leave'::regclass;
            DROP TABLE IF EXISTS wb_leave, wb_member; DROP VIEW IF EXISTS wb_mal_v; DROP FUNCTION IF EXISTS wb_mal();
            DROP EXTENSION IF EXISTS hstore; DROP SCHEMA IF EXISTS wb_s CASCADE;
            REVOKE CREATE ON SCHEMA public FROM wb_mallory;
            DROP ROLE wb_sowner; DROP ROLE wb_mallory;
        """)


def test_a_changed_row_never_keeps_an_earlier_versions_marks(cluster):
    """The marks trigger lets go of a changed row's hash and status. Where it does not fire, the
    row would keep an earlier version's 'anchored' beside content Certyo never saw: on a
    partition whose triggers were turned off (DISABLE TRIGGER USER, allowed for pg_restore) and
    whose capture came back through its table (ENABLE TRIGGER certyo_capture recurses, the
    marks trigger's clone stays off); or in replica mode under a capture trigger set to fire
    always (a logical replication subscriber). The first is refused by the capture trigger, whatever
    the cause; in the second, the marks trigger fires as capture does."""
    cluster.sql("""
        CREATE TABLE wb_kept (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
        CREATE TABLE wb_kept_1 PARTITION OF wb_kept FOR VALUES FROM (0) TO (100);
        CREATE TABLE wb_kept_2 PARTITION OF wb_kept FOR VALUES FROM (100) TO (200);
        SELECT certyo.track('wb_kept');
        INSERT INTO wb_kept VALUES (1, 'a'), (2, 'b');
    """)
    anchored = "SELECT count(*) FROM wb_kept WHERE certyo_anchor_status = 'anchored'"
    assert wait_for(lambda: cluster.sql(anchored) == "2", 60), "both rows anchored"
    cluster.sql("SELECT certyo.pause()")
    try:
        cluster.sql("ALTER TABLE wb_kept_1 DISABLE TRIGGER USER; ALTER TABLE wb_kept ENABLE TRIGGER certyo_capture")
        assert cluster.sql("SELECT tgenabled FROM pg_trigger WHERE tgrelid = 'wb_kept_1'::regclass "
                           "AND tgname = 'zz_certyo_marks'") == "D", "the clone of the marks trigger stays off"
        queued = cluster.sql("SELECT count(*) FROM certyo.queue")
        attempt = cluster.attempt_verbose("UPDATE wb_kept SET v = 'changed' WHERE id = 1")
        assert attempt.sqlstate == "55000", attempt.stderr
        assert "keeps what Certyo said of its earlier version" in attempt.stderr, attempt.stderr
        assert cluster.sql("SELECT v || ':' || certyo_anchor_status FROM wb_kept WHERE id = 1") == "a:anchored"
        assert cluster.sql("SELECT count(*) FROM certyo.queue") == queued, "nothing queued"
        # Moved to another partition (a DELETE and an INSERT for PostgreSQL), it would keep them too.
        attempt = cluster.attempt_verbose("UPDATE wb_kept SET id = 150, v = 'changed and moved' WHERE id = 1")
        assert attempt.sqlstate == "55000", attempt.stderr
        assert "a new row of public.wb_kept (partition public.wb_kept_2) brings values" in attempt.stderr, attempt.stderr
        # And a new row copied from another, bookkeeping columns and all (an ORM's duplicate).
        attempt = cluster.attempt_verbose(
            "INSERT INTO wb_kept SELECT 3, 'a copy', certyo_record_hash, certyo_anchor_status, certyo_verified_at "
            "FROM wb_kept WHERE id = 2")
        assert attempt.sqlstate == "55000", attempt.stderr
        assert "Leave the bookkeeping columns out of the INSERT" in attempt.stderr, attempt.stderr
        assert cluster.sql("SELECT count(*) FROM certyo.queue") == queued, "nothing queued"
        cluster.sql("INSERT INTO wb_kept (id, v) VALUES (3, 'a copy, without them'); DELETE FROM wb_kept WHERE id = 3")
        # A row whose content stays keeps its marks, trigger or not.
        cluster.sql("UPDATE wb_kept SET v = v WHERE id = 2")
        cluster.sql("ALTER TABLE wb_kept_1 ENABLE TRIGGER USER")
        cluster.sql("UPDATE wb_kept SET v = 'changed' WHERE id = 1")
        assert cluster.sql("SELECT v || ':' || coalesce(certyo_anchor_status, 'none') FROM wb_kept WHERE id = 1") == "changed:none"
        # Capture set to fire always: the marks trigger follows, and a replica-mode UPDATE (as a
        # subscriber's apply) lets go of the row's marks as it is captured.
        cluster.sql("ALTER TABLE wb_kept ENABLE ALWAYS TRIGGER certyo_capture")
        assert cluster.sql("SELECT string_agg(tgrelid::regclass || ':' || tgenabled::text, ',' ORDER BY tgrelid::regclass::text) "
                           "FROM pg_trigger WHERE tgname = 'zz_certyo_marks' "
                           "AND tgrelid IN ('wb_kept'::regclass, 'wb_kept_1'::regclass)") == "wb_kept:A,wb_kept_1:A"
        # Capture in replica mode only: the marks trigger fires always, so that a change made
        # in origin mode (not captured) lets go of the marks as well.
        cluster.sql("ALTER TABLE wb_kept ENABLE REPLICA TRIGGER certyo_capture")
        assert cluster.sql("SELECT tgenabled FROM pg_trigger WHERE tgrelid = 'wb_kept'::regclass "
                           "AND tgname = 'zz_certyo_marks'") == "A"
        cluster.sql("ALTER TABLE wb_kept ENABLE ALWAYS TRIGGER certyo_capture")
        cluster.sql("SET session_replication_role = replica; UPDATE wb_kept SET v = 'replicated' WHERE id = 2")
        assert cluster.sql("SELECT v || ':' || coalesce(certyo_anchor_status, 'none') FROM wb_kept WHERE id = 2") == "replicated:none"
        cluster.sql("ALTER TABLE wb_kept ENABLE TRIGGER certyo_capture")
        assert cluster.sql("SELECT tgenabled FROM pg_trigger WHERE tgrelid = 'wb_kept'::regclass "
                           "AND tgname = 'zz_certyo_marks'") == "O", "back to origin mode with capture"
    finally:
        cluster.sql("SELECT certyo.resume()")
    assert wait_for(lambda: cluster.sql(anchored) == "2", 60), "the new versions anchored"
    assert cluster.sql("SELECT count(*) FROM certyo.audit('wb_kept')") == "0"
    cluster.sql("SELECT certyo.untrack('wb_kept', drop_columns => true); DROP TABLE wb_kept")


def test_under_accepted_a_status_alone_claims_nothing_only_when_it_is_pending(cluster):
    """Under 'accepted' a new row starts with the status 'pending' and no hash, and a changed row
    is cleared to that: 'pending' alone claims nothing. 'anchored' alone, with no hash beside it,
    claims what Certyo has not said: a new row bringing it is refused, and a changed row lets
    go of it in the writer's statement."""
    cluster.sql("""
        CREATE TABLE wb_alone (id int PRIMARY KEY, v text);
        SELECT certyo.track('wb_alone', write_back => 'accepted');
    """)
    cluster.sql("SELECT certyo.pause()")
    try:
        queued = cluster.sql("SELECT count(*) FROM certyo.queue")
        for status in ("anchored", "mismatch", "overdue"):
            attempt = cluster.attempt_verbose(
                f"INSERT INTO wb_alone (id, v, certyo_anchor_status) VALUES (1, 'a', '{status}')")
            assert attempt.sqlstate == "55000", attempt.stderr
            assert "a new row of public.wb_alone brings values" in attempt.stderr, attempt.stderr
        assert cluster.sql("SELECT count(*) FROM wb_alone") == "0"
        assert cluster.sql("SELECT count(*) FROM certyo.queue") == queued, "nothing queued"
        cluster.sql("INSERT INTO wb_alone (id, v, certyo_anchor_status) VALUES (1, 'a', 'pending'), (2, 'b', NULL)")
        # Before acceptance the row holds no hash: a changed row setting 'anchored' alone gets
        # 'pending', as a changed row does.
        cluster.sql("UPDATE wb_alone SET v = 'changed', certyo_anchor_status = 'anchored' WHERE id = 1")
        assert cluster.sql("SELECT v || ':' || certyo_anchor_status || ':' || (certyo_record_hash IS NULL) "
                           "FROM wb_alone WHERE id = 1") == "changed:pending:true"
    finally:
        cluster.sql("SELECT certyo.resume()")
    assert wait_for(lambda: cluster.sql("SELECT count(*) FROM wb_alone WHERE certyo_anchor_status = 'anchored' "
                                        "AND certyo_record_hash IS NOT NULL") == "2", 60), "both anchored"
    assert cluster.sql("SELECT count(*) FROM certyo.audit('wb_alone')") == "0"
    cluster.sql("SELECT certyo.untrack('wb_alone', drop_columns => true); DROP TABLE wb_alone")


def untrack_and_drop(cluster, table, *others):
    """Clean-up after a test: `table` untracked (its bookkeeping columns dropped) if it is still
    tracked, and it and `others` dropped if they exist."""
    cluster.sql(f"""
        SELECT certyo.untrack('{table}', drop_columns => true) FROM certyo.tracked_tables WHERE "table" = to_regclass('{table}');
        DROP TABLE IF EXISTS {", ".join((table,) + others)};
    """)


def race(cluster, held_statements, statement, waiting_on, then="COMMIT;"):
    """Run `statement` while another session, which ran `held_statements` in an open
    transaction, holds what it waits for; end that session with `then` (a commit) once
    `statement` waits for a lock (its query text contains `waiting_on`). The statement's
    Attempt; the other session must have ended without an error."""
    held = cluster.hold_open(held_statements)
    outcome = {}
    racing = threading.Thread(target=lambda: outcome.setdefault("attempt", cluster.attempt_verbose(statement)))
    try:
        racing.start()
        waiting = ("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                   f"AND query LIKE '%{waiting_on}%'")
        assert wait_for(lambda: cluster.sql(waiting) == "1", 15), f"{statement}: waits for a lock"
        _, errors = held.process.communicate(then + "\n", timeout=15)
        assert held.process.returncode == 0, f"{then}: {errors}"
    finally:
        if held.process.poll() is None:
            held.close()
        racing.join(60)
    assert "attempt" in outcome, f"{statement}: did not end"
    return outcome["attempt"]


def test_no_partition_leaves_or_comes_by_a_way_the_checks_did_not_see(cluster):
    """The checks before a statement go by the names it gives. A drop can cascade to a partition
    no name gives (DROP ACCESS METHOD ... CASCADE, DROP EXTENSION ... CASCADE of an extension
    that owns its schema), and a name can mean another table by the time the statement, having
    waited for a lock, resolves it again (another session renamed a partition, or a schema, to
    it). Each took a partition's rows out of the tracked table uncaptured, or brought some in
    unseen: the outcome is checked after the statement, which is refused, and nothing is lost.
    A detach run inside the statement (by an event trigger) counts, as the checks handled it."""
    cluster.sql("""
        CREATE TABLE wb_ways (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
        CREATE TABLE wb_ways_1 PARTITION OF wb_ways FOR VALUES FROM (0) TO (100);
        CREATE ACCESS METHOD wb_heap2 TYPE TABLE HANDLER heap_tableam_handler;
        CREATE TABLE wb_ways_2 PARTITION OF wb_ways FOR VALUES FROM (100) TO (200) USING wb_heap2;
        CREATE EXTENSION hstore;
        CREATE SCHEMA wb_ext;
        ALTER EXTENSION hstore ADD SCHEMA wb_ext;
        CREATE TABLE wb_ext.wb_ways_3 PARTITION OF wb_ways FOR VALUES FROM (200) TO (300);
        CREATE TABLE wb_ways_4 PARTITION OF wb_ways FOR VALUES FROM (400) TO (500);
        SELECT certyo.track('wb_ways');
        INSERT INTO wb_ways VALUES (1, 'a'), (150, 'b'), (250, 'c'), (450, 'd');
        CREATE TABLE wb_decoy (id int PRIMARY KEY, v text);
        CREATE SCHEMA wb_sa; CREATE SCHEMA wb_sb;
        CREATE TABLE wb_sa.wb_x (id int PRIMARY KEY, v text);
        CREATE TABLE wb_sb.wb_x (id int PRIMARY KEY, v text, certyo_record_hash text,
                                 certyo_anchor_status text, certyo_verified_at timestamptz);
        INSERT INTO wb_sb.wb_x VALUES (350, 'never seen', 'sha256:forged', 'anchored', now());
    """)
    rows = "SELECT count(*) FROM wb_ways"
    try:
        # A detach rolled back (to its savepoint, or with its transaction, also within one query
        # string) is no detach; a partition detached, then brought back under a new table, is in
        # again: the drop after either is refused.
        for statement in ("BEGIN; SAVEPOINT s; ALTER TABLE wb_ways DETACH PARTITION wb_ways_2; "
                          "ROLLBACK TO SAVEPOINT s; DROP ACCESS METHOD wb_heap2 CASCADE; COMMIT;",
                          "BEGIN; ALTER TABLE wb_ways DETACH PARTITION wb_ways_2; ROLLBACK; "
                          "DROP ACCESS METHOD wb_heap2 CASCADE;",
                          "BEGIN; ALTER TABLE wb_ways DETACH PARTITION wb_ways_2; "
                          "CREATE TABLE wb_mid (LIKE wb_ways INCLUDING DEFAULTS) PARTITION BY RANGE (id); "
                          "ALTER TABLE wb_mid ATTACH PARTITION wb_ways_2 FOR VALUES FROM (100) TO (200); "
                          "UPDATE wb_mid SET certyo_record_hash = NULL, certyo_anchor_status = NULL, certyo_verified_at = NULL; "
                          "ALTER TABLE wb_ways ATTACH PARTITION wb_mid FOR VALUES FROM (100) TO (200); "
                          "DROP ACCESS METHOD wb_heap2 CASCADE; COMMIT;",
                          "DROP ACCESS METHOD wb_heap2 CASCADE", "DROP EXTENSION hstore CASCADE"):
            outcome = cluster.attempt(statement, "postgres")[1]  # one query string, as psql -c sends it
            assert "out of tracked table public.wb_ways without capturing its rows' deletes" in outcome, \
                (statement, outcome)
            assert cluster.sql(rows) == "4", statement
        # In a REPEATABLE READ transaction whose snapshot is older than a partition, or than the
        # table's tracking (also once the transaction has an id): the checks read the catalogs
        # with the latest snapshot, as PostgreSQL's DDL does.
        cluster.sql("CREATE TABLE wb_late (id int PRIMARY KEY, v text) PARTITION BY RANGE (id); "
                    "CREATE TABLE wb_late_1 PARTITION OF wb_late FOR VALUES FROM (0) TO (100)")
        for begin in ("SELECT count(*) FROM pg_class;", "SELECT pg_catalog.txid_current();"):
            for statement in ("DROP TABLE wb_ways_5", "TRUNCATE wb_ways_5", "DROP TABLE wb_late_1",
                              "TRUNCATE wb_late_1"):
                held = cluster.hold_open(f"BEGIN ISOLATION LEVEL REPEATABLE READ; {begin}")
                try:
                    cluster.sql("CREATE TABLE IF NOT EXISTS wb_ways_5 PARTITION OF wb_ways FOR VALUES FROM (500) TO (600); "
                                "INSERT INTO wb_ways VALUES (550, 'e') ON CONFLICT DO NOTHING; "
                                "SELECT certyo.track('wb_late'); INSERT INTO wb_late VALUES (1, 'f') ON CONFLICT DO NOTHING")
                    _, said = held.process.communicate(f"{statement};\nCOMMIT;\n", timeout=30)
                finally:
                    if held.process.poll() is None:
                        held.close()
                table = "public.wb_late" if "late" in statement else "public.wb_ways"
                assert f"partition of tracked table {table}" in said, (begin, statement, said)
                assert cluster.sql("SELECT count(*) FROM wb_ways WHERE id = 550") == "1", "the partition stays"
                assert cluster.sql("SELECT count(*) FROM wb_late") == "1", "the partition stays"
                cluster.sql("SELECT certyo.untrack('wb_late')")
        cluster.sql("ALTER TABLE wb_ways DETACH PARTITION wb_ways_5; DROP TABLE wb_ways_5; DROP TABLE wb_late")
        # Another session's detach and drop, committed while this statement waits, is not its doing.
        cluster.sql("CREATE TABLE wb_ways_6 PARTITION OF wb_ways FOR VALUES FROM (600) TO (700); CREATE TABLE wb_other (id int)")
        attempt = race(cluster, "BEGIN; LOCK TABLE wb_other IN ACCESS EXCLUSIVE MODE; "
                                "ALTER TABLE wb_ways DETACH PARTITION wb_ways_6; DROP TABLE wb_ways_6;",
                       "DROP TABLE wb_other", "wb_other")
        assert attempt.returncode == 0, attempt.stderr
        # Another session holds the decoy, renames it away and a partition to its name.
        for statement in ("DROP TABLE wb_decoy", "ALTER TABLE wb_ways DETACH PARTITION wb_decoy"):
            attempt = race(cluster, "BEGIN; LOCK TABLE wb_decoy IN ACCESS EXCLUSIVE MODE; "
                                    "ALTER TABLE wb_decoy RENAME TO wb_decoy_old; "
                                    "ALTER TABLE wb_ways_1 RENAME TO wb_decoy;", statement, "wb_decoy")
            assert attempt.sqlstate == "55000", (statement, attempt.stderr)
            assert "takes partition public.wb_ways_1 out of tracked table public.wb_ways" in attempt.stderr, \
                attempt.stderr
            assert cluster.sql(rows) == "4", statement
            cluster.sql("ALTER TABLE wb_decoy RENAME TO wb_ways_1; ALTER TABLE wb_decoy_old RENAME TO wb_decoy")
        # ATTACH, through a schema renamed while the statement waits for the table's lock (ONLY:
        # its partitions stay free): the table that comes in holds marks the checks never saw.
        attempt = race(cluster, "BEGIN; LOCK TABLE ONLY wb_ways IN ACCESS EXCLUSIVE MODE; "
                                "ALTER SCHEMA wb_sa RENAME TO wb_sa_old;",
                       "SET search_path = wb_sa, wb_sb, public; "
                       "ALTER TABLE public.wb_ways ATTACH PARTITION wb_x FOR VALUES FROM (300) TO (400)",
                       "ATTACH PARTITION wb_x")
        assert attempt.sqlstate == "55000", attempt.stderr
        assert "attaches wb_sb.wb_x to tracked table public.wb_ways, which is not the table its checks saw" \
            in attempt.stderr, attempt.stderr
        assert cluster.sql("SELECT count(*) FROM pg_inherits WHERE inhrelid = 'wb_sb.wb_x'::regclass") == "0"
        # A detach inside the statement, by an event trigger: handled, so the statement stands.
        cluster.sql("""
            CREATE FUNCTION wb_detach_on_drop() RETURNS event_trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF EXISTS (SELECT FROM pg_event_trigger_dropped_objects() WHERE object_name = 'wb_junk') THEN
                    EXECUTE 'ALTER TABLE public.wb_ways DETACH PARTITION public.wb_ways_4';
                END IF;
            END $$;
            CREATE EVENT TRIGGER wb_detach_on_drop ON sql_drop EXECUTE FUNCTION wb_detach_on_drop();
            CREATE TABLE wb_junk (id int);
        """)
        attempt = cluster.attempt_verbose("DROP TABLE wb_junk")
        assert attempt.returncode == 0 and "a delete of each is queued" in attempt.stderr, attempt.stderr
        assert cluster.sql(rows) == "3"
        assert cluster.wait_drained(60)
        assert cluster.sql("SELECT count(*) FROM certyo.audit('wb_ways')") == "0"
    finally:
        cluster.sql("""
            DROP EVENT TRIGGER IF EXISTS wb_detach_on_drop; DROP FUNCTION IF EXISTS wb_detach_on_drop();
            DROP TABLE IF EXISTS wb_junk;
            SELECT certyo.untrack('wb_ways', drop_columns => true) FROM certyo.tracked_tables WHERE "table" = 'wb_ways'::regclass;
            DROP TABLE IF EXISTS wb_ways, wb_decoy, wb_decoy_old, wb_ways_4, wb_ways_5, wb_ways_6, wb_other, wb_mid, wb_late;
            DROP ACCESS METHOD IF EXISTS wb_heap2 CASCADE; DROP EXTENSION IF EXISTS hstore CASCADE;
            DROP SCHEMA IF EXISTS wb_sa CASCADE; DROP SCHEMA IF EXISTS wb_sa_old CASCADE; DROP SCHEMA IF EXISTS wb_sb CASCADE;
        """)


@pytest.mark.parametrize("statement", ["DROP TABLE wb_late_1", "DROP TABLE wb_late_1a",
                                       "ALTER TABLE wb_late DETACH PARTITION wb_late_1",
                                       "ALTER TABLE wb_late_1 DETACH PARTITION wb_late_1a",
                                       "DROP SCHEMA wb_late_s CASCADE"])
def test_a_table_tracked_while_a_statement_waits_keeps_the_partitions_it_takes(cluster, statement):
    """The checks before a statement see the table untracked; another session tracks it while
    the statement waits for a lock that track() holds, and commits; the statement then drops or
    detaches a partition whose rows Certyo now holds, without their deletes queued. It is
    refused (40001: run it again, and the checks see the table tracked)."""
    cluster.sql("""
        CREATE SCHEMA wb_late_s;
        CREATE TABLE wb_late (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
        CREATE TABLE wb_late_s.wb_late_0 PARTITION OF wb_late FOR VALUES FROM (-100) TO (0);
        CREATE TABLE wb_late_1 PARTITION OF wb_late FOR VALUES FROM (0) TO (100) PARTITION BY RANGE (id);
        CREATE TABLE wb_late_1a PARTITION OF wb_late_1 FOR VALUES FROM (0) TO (50);
        CREATE TABLE wb_late_2 PARTITION OF wb_late FOR VALUES FROM (100) TO (200);
        INSERT INTO wb_late VALUES (-1, 'z'), (1, 'a'), (150, 'b');
    """)
    try:
        attempt = race(cluster, "BEGIN; SELECT certyo.track('wb_late');", statement, statement)
        assert attempt.sqlstate == "40001", attempt.stderr
        assert "public.wb_late was tracked by another session while this statement waited" in attempt.stderr, \
            attempt.stderr
        assert cluster.sql("SELECT count(*) FROM wb_late") == "3", "every partition stays"
        cluster.sql("SELECT certyo.backfill('wb_late')")
        audit = "SELECT count(*) FROM certyo.audit('wb_late')"
        assert wait_for(lambda: cluster.sql(audit) == "0", 60), "the rows Certyo holds are the table's"
        # Run again, the checks see the table tracked: a detach queues the deletes, a drop of
        # a partition is refused as ever.
        again = cluster.attempt_verbose(statement)
        if "DETACH" in statement:
            assert again.returncode == 0 and "a delete of each is queued" in again.stderr, again.stderr
        else:
            assert again.sqlstate == "55000", again.stderr
        assert cluster.wait_drained(60)
        assert cluster.sql(audit) == "0"
    finally:
        untrack_and_drop(cluster, "wb_late", "wb_late_1", "wb_late_1a")
        cluster.sql("DROP SCHEMA IF EXISTS wb_late_s CASCADE")


@pytest.mark.parametrize("statement", ["DROP TABLE wb_joins_x", "ALTER TABLE wb_joins DETACH PARTITION wb_joins_x"])
def test_a_table_attached_while_a_statement_waits_keeps_the_partitions_it_takes(cluster, statement):
    """Another session attaches a partitioned table to a tracked one (its rows queued as they
    come) while this statement, which drops or detaches a partition of the table attached,
    waits for the lock the ATTACH holds: the checks before it saw that partition outside the
    tracked table. Its rows would leave without their deletes: refused (40001)."""
    cluster.sql("""
        CREATE TABLE wb_host (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
        CREATE TABLE wb_host_1 PARTITION OF wb_host FOR VALUES FROM (0) TO (100);
        SELECT certyo.track('wb_host');
        CREATE TABLE wb_joins (LIKE wb_host INCLUDING DEFAULTS) PARTITION BY RANGE (id);
        CREATE TABLE wb_joins_x PARTITION OF wb_joins FOR VALUES FROM (100) TO (200);
        INSERT INTO wb_joins (id, v) VALUES (150, 'joins');
    """)
    try:
        attempt = race(cluster, "BEGIN; ALTER TABLE wb_host ATTACH PARTITION wb_joins FOR VALUES FROM (100) TO (200);",
                       statement, statement)
        assert attempt.sqlstate == "40001", attempt.stderr
        assert "public.wb_joins joined tracked table public.wb_host by another session's ATTACH" in attempt.stderr, \
            attempt.stderr
        assert cluster.sql("SELECT count(*) FROM wb_host") == "1", "the partition stays"
        assert cluster.wait_drained(60)
        assert cluster.sql("SELECT count(*) FROM certyo.audit('wb_host')") == "0"
    finally:
        untrack_and_drop(cluster, "wb_host", "wb_joins", "wb_joins_x")


@pytest.mark.parametrize("how", ["track", "track partitioned", "attach", "attach partitioned"])
def test_marks_a_writer_commits_while_the_table_is_tracked_or_attached_are_refused(cluster, how):
    """A writer's open transaction inserts a row that claims a hash and 'anchored', Certyo never
    having seen it; track(), or ATTACH PARTITION to a tracked table, comes meanwhile and waits
    for that writer; the writer commits. The row's claims are checked all the same (as those of
    rows already there): refused, nothing tracked or attached."""
    partitioned = how.endswith("partitioned")
    cluster.sql(f"""
        CREATE TABLE wb_host2 (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
        SELECT certyo.track('wb_host2', write_back => 'anchored');
        CREATE TABLE wb_forged (id int PRIMARY KEY, v text, certyo_record_hash text,
                                certyo_anchor_status text, certyo_verified_at timestamptz)
            {"PARTITION BY RANGE (id)" if partitioned else ""};
        {"CREATE TABLE wb_forged_1 PARTITION OF wb_forged FOR VALUES FROM (0) TO (100);" if partitioned else ""}
        INSERT INTO wb_forged (id, v) VALUES (1, 'plain');
    """)
    writes_to = "wb_forged_1" if partitioned else "wb_forged"
    statement = ("SELECT certyo.track('wb_forged', write_back => 'anchored')" if how.startswith("track")
                 else "ALTER TABLE wb_host2 ATTACH PARTITION wb_forged FOR VALUES FROM (0) TO (100)")
    try:
        attempt = race(cluster, f"BEGIN; INSERT INTO {writes_to} VALUES (2, 'forged', 'sha256:' || repeat('0', 64), "
                                "'anchored', now());", statement, statement.split("(")[0])
        assert attempt.sqlstate == "55000", attempt.stderr
        assert "hold bookkeeping values that no receipt of" in attempt.stderr, attempt.stderr
        assert cluster.sql("SELECT count(*) FROM certyo.tracked_tables WHERE \"table\" = 'wb_forged'::regclass") == "0"
        assert cluster.sql("SELECT count(*) FROM pg_inherits WHERE inhrelid = 'wb_forged'::regclass") == "0"
    finally:
        untrack_and_drop(cluster, "wb_host2", "wb_forged")


@pytest.mark.parametrize("statement,sqlstate,said", [
    ("TRUNCATE wb_named_decoy", "55000", "a partition of tracked table public.wb_named, is refused"),
    ("DROP TRIGGER certyo_truncate_guard ON wb_named_decoy", "2BP01", "refuses TRUNCATE of this table"),
    ("ALTER TABLE wb_named_child INHERIT wb_named_decoy", "0A000", "is tracked, and a table inheriting from it would not be"),
    ("CREATE TABLE wb_named_child2 () INHERITS (wb_named_decoy)", "0A000", "is tracked, and a table inheriting from it would not be"),
    ("ALTER TABLE wb_named_decoy DISABLE TRIGGER certyo_capture", "55000", "fires trigger certyo_capture as its tracked table does"),
    ("ALTER EXTENSION plpgsql ADD TABLE wb_named_decoy", "55000", "cannot become a member of extension plpgsql"),
    ("CREATE TRIGGER zzz_late BEFORE UPDATE ON wb_named_decoy FOR EACH ROW EXECUTE FUNCTION wb_named_nothing()",
     "42P17", "would fire after zz_certyo_marks")])
def test_a_name_that_comes_to_mean_a_tracked_table_while_a_statement_waits_is_refused(cluster, statement, sqlstate, said):
    """The checks before a TRUNCATE, a DROP TRIGGER, an INHERIT or a DISABLE TRIGGER go by the
    name it gives; another session renames that table away and a tracked table (or its
    partition) to the name while the statement waits for its lock, and PostgreSQL, resolving the
    name again, acts on the tracked one: rows emptied, its truncate guard dropped, a child's rows
    (bookkeeping values and all) brought in uncaptured, a partition's capture turned off. The
    checks run again after the statement, on what it acted on: refused as if named, nothing
    lost."""
    cluster.sql("""
        CREATE TABLE wb_named (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
        CREATE TABLE wb_named_1 PARTITION OF wb_named FOR VALUES FROM (0) TO (100);
        CREATE TABLE wb_named_flat (id int PRIMARY KEY, v text);
        SELECT certyo.track('wb_named'); SELECT certyo.track('wb_named_flat');
        INSERT INTO wb_named VALUES (1, 'a'); INSERT INTO wb_named_flat VALUES (1, 'a');
        CREATE TABLE wb_named_decoy (id int PRIMARY KEY, v text);
        CREATE FUNCTION wb_named_nothing() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
        CREATE TRIGGER certyo_truncate_guard BEFORE TRUNCATE ON wb_named_decoy EXECUTE FUNCTION wb_named_nothing();
        CREATE TABLE wb_named_child (LIKE wb_named_flat);
        INSERT INTO wb_named_child VALUES (7, 'unseen', 'sha256:forged', 'anchored', now());
    """)
    target = "wb_named_1" if any(w in statement for w in ("TRUNCATE", "DISABLE", "EXTENSION")) else "wb_named_flat"
    # A new table whose name shadows its parent's (a schema per tenant) is no race: let through.
    cluster.sql("CREATE SCHEMA wb_tenant; SET search_path = wb_tenant, public; "
                "CREATE TABLE wb_named_decoy () INHERITS (wb_named_decoy); DROP SCHEMA wb_tenant CASCADE")
    try:
        attempt = race(cluster, "BEGIN; LOCK TABLE wb_named_decoy IN ACCESS EXCLUSIVE MODE; "
                                "ALTER TABLE wb_named_decoy RENAME TO wb_named_decoy_old; "
                                f"ALTER TABLE {target} RENAME TO wb_named_decoy;", statement, statement)
        assert attempt.sqlstate == sqlstate, attempt.stderr
        assert said in attempt.stderr, attempt.stderr
        cluster.sql(f"ALTER TABLE wb_named_decoy RENAME TO {target}; ALTER TABLE wb_named_decoy_old RENAME TO wb_named_decoy")
        assert cluster.sql("SELECT count(*) FROM wb_named") == "1"
        assert cluster.sql("SELECT count(*) FROM wb_named_flat") == "1"
        assert cluster.sql("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'wb_named_flat'::regclass "
                           "AND tgname = 'certyo_truncate_guard'") == "1"
        assert cluster.sql("SELECT count(*) FROM pg_inherits WHERE inhrelid = 'wb_named_child'::regclass") == "0"
        assert cluster.sql("SELECT string_agg(tgenabled::text, '') FROM pg_trigger WHERE tgrelid = 'wb_named_1'::regclass "
                           "AND tgname = 'certyo_capture'") == "O", "the partition's capture stays on"
        assert cluster.sql("SELECT count(*) FROM pg_depend WHERE objid = 'wb_named_1'::regclass AND deptype = 'e'") == "0"
        assert cluster.sql("SELECT count(*) FROM pg_trigger WHERE tgname = 'zzz_late'") == "0"
        assert cluster.wait_drained(60)
        assert cluster.sql("SELECT count(*) FROM certyo.audit('wb_named')") == "0"
        assert cluster.sql("SELECT count(*) FROM certyo.audit('wb_named_flat')") == "0"
    finally:
        cluster.sql("""
            SELECT certyo.untrack("table", drop_columns => true) FROM certyo.tracked_tables
             WHERE "table" IN ('wb_named'::regclass, 'wb_named_flat'::regclass);
            DROP TABLE IF EXISTS wb_named, wb_named_flat, wb_named_decoy, wb_named_decoy_old, wb_named_child, wb_named_child2;
            DROP FUNCTION IF EXISTS wb_named_nothing();
        """)


def test_a_table_untracked_under_anchored_is_tracked_again_under_accepted(cluster):
    """Untracked before anything was accepted, with its columns kept, a table tracked under
    'anchored' holds NULL in certyo_anchor_status: that says nothing under 'accepted' either,
    and tracking it again in that mode is not refused as if the rows held marks."""
    cluster.sql("""
        CREATE TABLE wb_again (id int PRIMARY KEY, v text);
        SELECT certyo.pause();
        SELECT certyo.track('wb_again', write_back => 'anchored');
        INSERT INTO wb_again VALUES (1, 'a'), (2, 'b');
        SELECT certyo.untrack('wb_again');
        DELETE FROM certyo.queue;
    """)
    try:
        attempt = cluster.attempt_verbose("SELECT certyo.track('wb_again', write_back => 'accepted', backfill => true)")
        assert attempt.returncode == 0, attempt.stderr
    finally:
        cluster.sql("SELECT certyo.resume()")
    assert wait_for(lambda: cluster.sql("SELECT count(*) FROM wb_again WHERE certyo_anchor_status = 'anchored'") == "2", 60)
    assert cluster.sql("SELECT count(*) FROM certyo.audit('wb_again')") == "0"
    cluster.sql("SELECT certyo.untrack('wb_again', drop_columns => true); DROP TABLE wb_again")


def test_a_concurrent_detach_of_a_name_renamed_to_a_tracked_partition_while_it_waits_is_refused(cluster):
    """DETACH PARTITION ... CONCURRENTLY of a tracked table's partition is refused, but its
    first transaction commits inside the statement, before any check after it: another session
    that renamed a partition to the name the statement gives, while it waited for the lock,
    took the partition's rows out uncaptured, left detach pending. The partition is resolved
    as the statement resolves it, waiting for its lock: refused (0A000), nothing left."""
    cluster.sql("""
        CREATE TABLE wb_dc (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
        CREATE TABLE wb_dc_1 PARTITION OF wb_dc FOR VALUES FROM (0) TO (100);
        SELECT certyo.track('wb_dc');
        INSERT INTO wb_dc VALUES (1, 'a');
        CREATE TABLE wb_dc_decoy (id int PRIMARY KEY, v text);
    """)
    try:
        statement = "ALTER TABLE wb_dc DETACH PARTITION wb_dc_decoy CONCURRENTLY"
        attempt = race(cluster, "BEGIN; LOCK TABLE wb_dc_decoy IN ACCESS EXCLUSIVE MODE; "
                                "ALTER TABLE wb_dc_decoy RENAME TO wb_dc_decoy_old; "
                                "ALTER TABLE wb_dc_1 RENAME TO wb_dc_decoy;", statement, statement)
        assert attempt.sqlstate == "0A000", attempt.stderr
        assert cluster.sql("SELECT count(*) FROM pg_inherits WHERE inhrelid = 'wb_dc_decoy'::regclass "
                           "AND NOT inhdetachpending") == "1", "still a partition"
        assert cluster.sql("SELECT count(*) FROM wb_dc") == "1"
        assert cluster.wait_drained(60)
        assert cluster.sql("SELECT count(*) FROM certyo.audit('wb_dc')") == "0"
    finally:
        untrack_and_drop(cluster, "wb_dc", "wb_dc_decoy", "wb_dc_decoy_old")


def test_a_detach_that_does_nothing_queues_nothing(cluster):
    """`ALTER TABLE IF EXISTS` of a table that is not there does nothing: no delete is queued
    for the rows of the partition it names, which stay in the tracked table."""
    cluster.sql("""
        CREATE TABLE wb_noop (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
        CREATE TABLE wb_noop_1 PARTITION OF wb_noop FOR VALUES FROM (0) TO (100);
        SELECT certyo.track('wb_noop');
        INSERT INTO wb_noop VALUES (1, 'stays');
    """)
    try:
        assert cluster.wait_drained(60)
        queued = cluster.sql("SELECT count(*) FROM certyo.queue")
        attempt = cluster.attempt_verbose("ALTER TABLE IF EXISTS wb_not_there DETACH PARTITION wb_noop_1")
        assert attempt.returncode == 0, attempt.stderr
        assert "a delete of each is queued" not in attempt.stderr, attempt.stderr
        assert cluster.sql("SELECT count(*) FROM certyo.queue") == queued, "nothing queued"
        assert cluster.wait_drained(60)
        assert cluster.sql("SELECT count(*) FROM certyo.audit('wb_noop')") == "0"
    finally:
        cluster.sql("SELECT certyo.untrack('wb_noop', drop_columns => true); DROP TABLE wb_noop")


def test_the_marks_trigger_comes_and_goes_with_the_modes_that_write_back(cluster):
    """Tracked with write_back => 'none', a table has no bookkeeping columns and no marks
    trigger; moved to a mode that writes back, it gets both; back, it loses the trigger."""
    cluster.sql("CREATE TABLE wb_modes (id int PRIMARY KEY, v text); SELECT certyo.track('wb_modes', write_back => 'none')")
    triggers = "SELECT string_agg(tgname, ',' ORDER BY tgname) FROM pg_trigger WHERE tgrelid = 'wb_modes'::regclass"
    assert cluster.sql(triggers) == "certyo_capture,certyo_truncate_guard"
    cluster.sql("SELECT certyo.track('wb_modes', write_back => 'anchored')")
    assert cluster.sql(triggers) == "certyo_capture,certyo_truncate_guard,zz_certyo_marks"
    cluster.sql("BEGIN; SELECT certyo.untrack('wb_modes', drop_columns => true); "
                "SELECT certyo.track('wb_modes', write_back => 'none'); COMMIT;")
    assert cluster.sql(triggers) == "certyo_capture,certyo_truncate_guard"
    cluster.sql("SELECT certyo.untrack('wb_modes')")
    assert cluster.sql(triggers) == ""
    cluster.sql("DROP TABLE wb_modes")


def test_a_trigger_of_the_owners_named_as_the_marks_trigger_is_neither_replaced_nor_dropped(cluster):
    """track() in a mode that writes back refuses a table with a trigger of the owner's named
    zz_certyo_marks (it would replace it), naming the rename; under 'none' the name is free:
    the owner's trigger stays through track() and untrack(), and its owner drops it at will."""
    cluster.sql("""
        CREATE TABLE wb_owners (id int PRIMARY KEY, v text, stamped timestamptz);
        CREATE FUNCTION wb_owners_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN NEW.stamped := now(); RETURN NEW; END $$;
        CREATE TRIGGER zz_certyo_marks BEFORE UPDATE ON wb_owners FOR EACH ROW EXECUTE FUNCTION wb_owners_stamp();
    """)
    attempt = cluster.attempt_verbose("SELECT certyo.track('wb_owners', write_back => 'anchored')")
    assert attempt.sqlstate == "42710", attempt.stderr
    assert "ALTER TRIGGER zz_certyo_marks ON" in attempt.stderr and "RENAME TO" in attempt.stderr
    owners = ("SELECT tgfoid::regprocedure::text FROM pg_trigger "
              "WHERE tgrelid = 'wb_owners'::regclass AND tgname = 'zz_certyo_marks'")
    cluster.sql("SELECT certyo.track('wb_owners', write_back => 'none')")
    assert cluster.sql(owners) == "wb_owners_stamp()"
    cluster.sql("ALTER TRIGGER zz_certyo_marks ON wb_owners RENAME TO stamp; ALTER TRIGGER stamp ON wb_owners RENAME TO zz_certyo_marks")
    cluster.sql("SELECT certyo.untrack('wb_owners')")
    assert cluster.sql(owners) == "wb_owners_stamp()"
    cluster.sql("SELECT certyo.track('wb_owners', write_back => 'none'); DROP TRIGGER zz_certyo_marks ON wb_owners")
    cluster.sql("SELECT certyo.untrack('wb_owners'); DROP TABLE wb_owners; DROP FUNCTION wb_owners_stamp()")


@pytest.mark.parametrize("mode", ["anchored", "accepted", "none"])
def test_a_virtual_generated_column_is_left_out_of_capture(cluster, emulator, mode):
    """PostgreSQL 18's virtual generated columns are computed when read, never when a trigger
    fires (in a C trigger their content is undefined; they are stored as NULL). Capture leaves
    them out, as it does excluded columns: a record never claims NULL for a column a SELECT
    shows a value in. The rows are anchored, the audit is silent, and a virtual column computed
    from a bookkeeping column (not captured, so not refused) changes nothing of that."""
    if int(cluster.sql("SHOW server_version_num")) < 180000:
        pytest.skip("virtual generated columns came with PostgreSQL 18")
    t = f"wb_virtual_{mode}"
    cluster.sql(f"""
        CREATE TABLE {t} (id int PRIMARY KEY, price numeric NOT NULL, qty int NOT NULL,
                          total numeric GENERATED ALWAYS AS (price * qty) VIRTUAL);
        SELECT certyo.track('{t}', write_back => '{mode}');
        INSERT INTO {t} (id, price, qty) SELECT g, g * 1.5, g FROM generate_series(1, 5) g;
    """)
    if mode != "none":
        cluster.sql(f"ALTER TABLE {t} ADD COLUMN claim text GENERATED ALWAYS AS (upper(certyo_anchor_status)) VIRTUAL")
    cluster.sql(f"UPDATE {t} SET qty = qty + 10 WHERE id = 2; UPDATE {t} SET price = 9 WHERE id = 3")
    assert wait_for(lambda: cluster.sql(f"""
        SELECT count(*) FROM certyo.receipt r WHERE r.relid = '{t}'::regclass AND r.anchor_status = 'anchored'
           AND NOT EXISTS (SELECT FROM certyo.receipt n WHERE n.relid = r.relid AND n.record_id = r.record_id AND n.id > r.id)
    """) == "5", timeout=60), cluster.sql(f"SELECT * FROM certyo.history('{t}')")
    records = [r for r in emulator.records() if r["collection"] == f"public.{t}"]
    assert records and all(set(r["recordPayload"]) == {"id", "price", "qty"} for r in records), records
    latest = {r["recordId"]: r["recordPayload"] for r in records}
    assert latest["2"] == {"id": 2, "price": 3.0, "qty": 12}, latest
    if mode != "none":
        assert wait_for(lambda: cluster.sql(f"SELECT count(*) FROM {t} WHERE certyo_anchor_status = 'anchored'") == "5",
                        timeout=60), cluster.sql(f"SELECT * FROM {t}")
        assert cluster.sql(f"SELECT count(*) FROM {t} WHERE claim = 'ANCHORED'") == "5"
        assert claims_not_anchored(cluster, t) == "0"
    assert cluster.sql(f"SELECT count(*) FROM certyo.audit('{t}')") == "0", cluster.sql(f"SELECT * FROM certyo.audit('{t}')")
    # The column's expression changed is no content change: nothing is captured for it.
    cluster.sql(f"ALTER TABLE {t} ALTER COLUMN total SET EXPRESSION AS (price * qty * 2)")
    assert cluster.sql(f"SELECT count(*) FROM certyo.queue WHERE relid = '{t}'::regclass") == "0"
    assert cluster.sql(f"SELECT count(*) FROM certyo.audit('{t}')") == "0", cluster.sql(f"SELECT * FROM certyo.audit('{t}')")
    cluster.sql(f"DROP TABLE {t}")


def test_a_virtual_generated_column_is_no_timestamp_column(cluster):
    """Capture cannot read it (PostgreSQL never computes it when a trigger fires): refused,
    naming it and what to do, and nothing tracked."""
    if int(cluster.sql("SHOW server_version_num")) < 180000:
        pytest.skip("virtual generated columns came with PostgreSQL 18")
    cluster.sql("""CREATE TABLE wb_virtual_ts (id int PRIMARY KEY, at timestamptz,
                                               shown timestamptz GENERATED ALWAYS AS (at) VIRTUAL)""")
    attempt = cluster.attempt_verbose("SELECT certyo.track('wb_virtual_ts', timestamp_column => 'shown')")
    assert attempt.sqlstate == "42611", attempt.stderr
    assert '"shown"' in attempt.stderr and "STORED" in attempt.stderr, attempt.stderr
    assert cluster.sql("SELECT count(*) FROM certyo.tracked_tables WHERE \"table\" = 'wb_virtual_ts'::regclass") == "0"
    cluster.sql("DROP TABLE wb_virtual_ts")


@pytest.mark.parametrize("mode", ["anchored", "accepted"])
def test_no_before_update_trigger_fires_after_the_marks_trigger(cluster, mode):
    """BEFORE UPDATE row triggers fire in the byte order of their names: one named after
    zz_certyo_marks (zzz_..., a non-ASCII first letter) could stamp a business column after the
    marks trigger judged the row unchanged, and the row would go on saying 'anchored' of its
    earlier version. Refused, naming the trigger and a way out, wherever such a trigger could
    come from: CREATE TRIGGER on the table or a partition, a rename, track() of a table that has
    one, ATTACH of a partition that has one. Triggers that cannot change the row after it (AFTER,
    BEFORE INSERT, statement-level, or named before it) and tables under 'none' are left alone."""
    t = f"wb_order_{mode}"
    cluster.sql(f"""
        CREATE TABLE {t} (id int, region text, note text, updated_at timestamptz, PRIMARY KEY (id, region))
            PARTITION BY LIST (region);
        CREATE TABLE {t}_eu PARTITION OF {t} FOR VALUES IN ('eu');
        CREATE FUNCTION {t}_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN NEW.updated_at := clock_timestamp(); RETURN NEW; END $$;
        SELECT certyo.track('{t}', exclude_columns => ARRAY['note'], write_back => '{mode}');
    """)
    for on, name, replace in ((t, "zzz_stamp", ""), (t, "Ästamp", ""), (f"{t}_eu", "zzz_stamp", ""),
                              (t, "zz_stamp", ""), (t, "zzz_replaced", "OR REPLACE ")):
        attempt = cluster.attempt_verbose(
            f'CREATE {replace}TRIGGER "{name}" BEFORE UPDATE ON {on} FOR EACH ROW EXECUTE FUNCTION {t}_stamp()')
        assert attempt.sqlstate == "42P17", (name, attempt.stderr)
        assert f'"{name}"' in attempt.stderr and "sorts before zz_certyo_marks" in attempt.stderr, attempt.stderr
    cluster.sql(f"""
        CREATE TRIGGER stamp BEFORE UPDATE ON {t} FOR EACH ROW EXECUTE FUNCTION {t}_stamp();
        CREATE TRIGGER zzz_insert BEFORE INSERT ON {t} FOR EACH ROW EXECUTE FUNCTION {t}_stamp();
        CREATE TRIGGER zzz_after AFTER UPDATE ON {t} FOR EACH ROW EXECUTE FUNCTION {t}_stamp();
        CREATE FUNCTION {t}_nothing() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
        CREATE TRIGGER zzz_statement BEFORE UPDATE ON {t} FOR EACH STATEMENT EXECUTE FUNCTION {t}_nothing();
        ALTER TRIGGER zzz_after ON {t} RENAME TO zzzz_after;
    """)
    attempt = cluster.attempt_verbose(f"ALTER TRIGGER stamp ON {t} RENAME TO zzz_stamp")
    assert attempt.sqlstate == "42P17", attempt.stderr
    # A partition that brings one, and a table that has one, are refused too.
    cluster.sql(f"""
        CREATE TABLE {t}_us (id int, region text, note text, updated_at timestamptz, PRIMARY KEY (id, region));
        CREATE TRIGGER zzz_stamp BEFORE UPDATE ON {t}_us FOR EACH ROW EXECUTE FUNCTION {t}_stamp();
    """)
    attempt = cluster.attempt_verbose(f"ALTER TABLE {t} ATTACH PARTITION {t}_us FOR VALUES IN ('us')")
    assert attempt.sqlstate == "42P17", attempt.stderr
    attempt = cluster.attempt_verbose(f"SELECT certyo.track('{t}_us', write_back => '{mode}')")
    assert attempt.sqlstate == "42P17" and f"public.{t}_us" in attempt.stderr, attempt.stderr
    cluster.sql(f"SELECT certyo.track('{t}_us', write_back => 'none'); SELECT certyo.untrack('{t}_us')")
    # The trigger that fires before the marks trigger is judged with the row as it leaves it: an
    # UPDATE of the excluded column alone, stamped, lets go of the row's earlier marks. (Sending
    # paused: the INSERT's own write-back, under 'accepted' at once, would mark the row again.)
    cluster.sql("SELECT certyo.pause()")
    try:
        cluster.sql(f"""
            INSERT INTO {t} VALUES (1, 'eu', 'n', now());
            UPDATE {t} SET certyo_record_hash = 'sha256:earlier', certyo_anchor_status = 'anchored';
            UPDATE {t} SET note = 'only the excluded column';
        """)
        assert cluster.sql(f"SELECT certyo_record_hash IS NULL FROM {t}") == "t"
    finally:
        cluster.sql("SELECT certyo.resume()")
    cluster.sql(f"DROP TABLE {t}, {t}_us; DROP FUNCTION {t}_stamp(), {t}_nothing()")


def test_drop_index_concurrently_works_where_the_library_is_loaded(cluster):
    """DROP INDEX CONCURRENTLY must be the first action of a transaction that has no id yet:
    the check that keeps a tracked table's last unique index on its record id columns reads the
    catalogs without assigning one. (It did, and every such drop failed with the library
    loaded, on tracked tables or not.) The check itself still refuses that last index."""
    cluster.sql("""
        CREATE TABLE cap_dic (id int PRIMARY KEY, code text NOT NULL, v text);
        CREATE INDEX cap_dic_v ON cap_dic (v);
        CREATE UNIQUE INDEX cap_dic_code ON cap_dic (code);
        CREATE TABLE cap_dic_plain (id int, v text);
        CREATE INDEX cap_dic_plain_v ON cap_dic_plain (v);
        SELECT certyo.track('cap_dic', record_id_columns => ARRAY['code']);
    """)
    try:
        for index in ("cap_dic_plain_v", "cap_dic_v"):
            attempt = cluster.attempt_verbose(f"DROP INDEX CONCURRENTLY {index}")
            assert attempt.returncode == 0, (index, attempt.stderr)
        attempt = cluster.attempt_verbose("DROP INDEX CONCURRENTLY cap_dic_code")
        assert attempt.sqlstate == "2BP01", attempt.stderr
        assert cluster.sql("SELECT count(*) FROM pg_class WHERE relname = 'cap_dic_code'") == "1"
    finally:
        cluster.sql("SELECT certyo.untrack('cap_dic'); DROP TABLE cap_dic, cap_dic_plain")


@pytest.mark.parametrize("meanwhile", ["renamed", "tracked"])
def test_a_concurrent_index_drop_drops_only_what_its_checks_saw(cluster, meanwhile):
    """`DROP INDEX CONCURRENTLY` commits inside the statement, so no check after it can undo
    it. While it waits for a lock, another session either renames the index it names away and
    the unique index of a tracked table's record id onto its name, or tracks the table of the
    index it names by that index. The statement then drops the index a tracked table's record
    ids rest on, unless its checks see what it will drop: refused, the index stays valid."""
    try:
        cluster.sql("""
            CREATE TABLE wb_dic (id int NOT NULL, v text);
            CREATE UNIQUE INDEX wb_dic_key ON wb_dic (id);
            CREATE TABLE wb_dic_plain (id int NOT NULL, v text);
            CREATE UNIQUE INDEX wb_dic_plain_key ON wb_dic_plain (id);
        """)
        if meanwhile == "renamed":
            cluster.sql("SELECT certyo.track('wb_dic', record_id_columns => ARRAY['id'])")
            held = ("BEGIN; ALTER INDEX wb_dic_plain_key RENAME TO wb_dic_plain_old; "
                    "ALTER INDEX wb_dic_key RENAME TO wb_dic_plain_key;")
            table = "wb_dic"
        else:
            held = "BEGIN; SELECT certyo.track('wb_dic_plain', record_id_columns => ARRAY['id']);"
            table = "wb_dic_plain"
        attempt = race(cluster, held, "DROP INDEX CONCURRENTLY wb_dic_plain_key", "DROP INDEX CONCURRENTLY")
        assert attempt.sqlstate == "2BP01", attempt.stderr
        assert cluster.sql(f"""SELECT count(*) FROM pg_index WHERE indrelid = '{table}'::regclass
                                 AND indisunique AND indisvalid""") == "1", "the record id's index stays"
    finally:
        untrack_and_drop(cluster, "wb_dic_plain")
        untrack_and_drop(cluster, "wb_dic")


@pytest.mark.parametrize("mode", ["anchored", "accepted"])
def test_bookkeeping_columns_keep_the_types_certyo_cdc_reads_them_as(cluster, mode):
    """The owner retypes a bookkeeping column of a tracked table (to a domain over text, to
    varchar, or the verification time to timestamp without time zone), or tracks a table
    whose columns of those names are already of another type. Capture reads them as text and
    timestamptz only: under 'accepted' every INSERT's 'pending' would read as a claim and be
    refused, and a claim in a column of another type could go unseen. Refused, naming the
    type; the table's writes go on."""
    cluster.sql(f"""
        CREATE DOMAIN wb_status_text AS text;
        CREATE TABLE wb_types (id int PRIMARY KEY, v text);
        SELECT certyo.track('wb_types', write_back => '{mode}');
        CREATE TABLE wb_types_kept (id int PRIMARY KEY, v text, certyo_record_hash text,
                                    certyo_anchor_status varchar(20), certyo_verified_at timestamptz);
    """)
    try:
        for column, to in (("certyo_anchor_status", "wb_status_text"), ("certyo_anchor_status", "varchar"),
                           ("certyo_record_hash", "wb_status_text"), ("certyo_verified_at", "timestamp")):
            refused = cluster.attempt_verbose(f"ALTER TABLE wb_types ALTER COLUMN {column} TYPE {to}")
            assert refused.sqlstate == "42804", (column, to, refused.stderr)
            assert f'column "{column}" of tracked table public.wb_types must be of type' in refused.stderr, refused.stderr
        cluster.sql("INSERT INTO wb_types VALUES (1, 'a'); UPDATE wb_types SET v = 'b'")
        refused = cluster.attempt_verbose(f"SELECT certyo.track('wb_types_kept', write_back => '{mode}')")
        assert refused.sqlstate == "42804", refused.stderr
        assert cluster.sql("SELECT count(*) FROM certyo.tracked_tables WHERE \"table\" = 'wb_types_kept'::regclass") == "0"
        cluster.sql(f"""ALTER TABLE wb_types_kept ALTER COLUMN certyo_anchor_status TYPE text;
                        SELECT certyo.track('wb_types_kept', write_back => '{mode}');
                        INSERT INTO wb_types_kept (id, v) VALUES (1, 'a')""")
    finally:
        untrack_and_drop(cluster, "wb_types")
        untrack_and_drop(cluster, "wb_types_kept")
        cluster.sql("DROP DOMAIN IF EXISTS wb_status_text")


def test_a_write_in_the_statement_that_tracks_its_table_is_refused(cluster):
    """An INSERT beside track() in one statement (a data-modifying WITH) runs with the triggers
    its table had when the statement began: none of certyo_cdc's. Its row would be neither
    captured nor cleared of the marks it brings, and would say 'anchored' in a tracked table.
    track() refuses a table this session's statement is using (55006), as ALTER TABLE does."""
    cluster.sql("""CREATE TABLE wb_same (id int PRIMARY KEY, v text, certyo_record_hash text,
                                         certyo_anchor_status text, certyo_verified_at timestamptz)""")
    try:
        attempt = cluster.attempt_verbose(
            "WITH t AS MATERIALIZED (SELECT certyo.track('wb_same', write_back => 'anchored')), "
            "i AS (INSERT INTO wb_same VALUES (1, 'never captured', 'sha256:' || repeat('0', 64), 'anchored', now())) "
            "SELECT * FROM t")
        assert attempt.sqlstate == "55006", attempt.stderr
        assert cluster.sql("SELECT count(*) FROM wb_same") == "0"
        assert cluster.sql("SELECT count(*) FROM certyo.tracked_tables WHERE \"table\" = 'wb_same'::regclass") == "0"
    finally:
        untrack_and_drop(cluster, "wb_same")


@pytest.mark.parametrize("mode", ["anchored", "accepted"])
def test_marks_written_by_hand_on_a_row_not_yet_accepted_are_found_by_the_audit(cluster, mode):
    """The owner writes a hash and 'anchored' by hand (an UPDATE of bookkeeping columns only,
    which capture skips) on a row whose version Certyo has not accepted yet (delivery paused).
    Nothing is written to a row before its version is accepted: the audit names what was forged,
    not only "not yet accepted"."""
    cluster.sql("SELECT certyo.pause()")
    assert wait_for(lambda: cluster.sql("SELECT state FROM certyo.worker_status()") == "paused", 10)
    cluster.sql(f"""
        CREATE TABLE wb_early (id int PRIMARY KEY, v text);
        SELECT certyo.track('wb_early', write_back => '{mode}');
        INSERT INTO wb_early VALUES (1, 'honest'), (2, 'forged status'), (3, 'forged hash');
        UPDATE wb_early SET certyo_anchor_status = 'anchored' WHERE id = 2;
        UPDATE wb_early SET certyo_record_hash = 'sha256:' || repeat('0', 64), certyo_anchor_status = 'anchored' WHERE id = 3;
    """)
    try:
        findings = cluster.sql("SELECT string_agg(record_id || ': ' || problem, ', ' ORDER BY record_id) FROM certyo.audit('wb_early')")
        assert findings == ("1: not yet accepted, 2: anchor status changed without capture, "
                            "3: record hash changed without capture"), findings
        # A row whose earlier version was written back, changed since (its marks cleared by the
        # change), given that version's marks again by hand: they are not its content's.
        cluster.sql("SELECT certyo.resume()")
        cluster.sql("INSERT INTO wb_early VALUES (4, 'first')")
        written = f"SELECT certyo_record_hash FROM wb_early WHERE id = 4 AND certyo_anchor_status = '{'pending' if mode == 'accepted' else 'anchored'}'"
        assert wait_for(lambda: cluster.sql(written) != "", 60), cluster.explain()
        first = cluster.sql(written)
        cluster.sql("SELECT certyo.pause()")
        assert wait_for(lambda: cluster.sql("SELECT state FROM certyo.worker_status()") == "paused", 10)
        cluster.sql(f"UPDATE wb_early SET v = 'second' WHERE id = 4; "
                    f"UPDATE wb_early SET certyo_record_hash = '{first}', certyo_anchor_status = 'anchored' WHERE id = 4")
        findings = cluster.sql("SELECT problem FROM certyo.audit('wb_early') WHERE record_id = '4'")
        assert findings == "record hash changed without capture", findings
    finally:
        cluster.sql("SELECT certyo.resume()")
        untrack_and_drop(cluster, "wb_early")


def test_marks_planted_while_a_table_is_untracked_are_found_once_it_is_tracked_again(cluster):
    """Untracked with its bookkeeping columns kept, a table takes a row from a role that may
    only INSERT, with a hash and 'anchored' of its own making; tracked again (its receipts
    kept), the row is no receipt's: the audit names its claim, not only "never captured"."""
    cluster.sql("""
        CREATE TABLE wb_planted (id int PRIMARY KEY, v text);
        SELECT certyo.track('wb_planted', write_back => 'anchored');
        INSERT INTO wb_planted VALUES (1, 'delivered');
    """)
    try:
        assert cluster.wait_drained(60)
        assert wait_for(lambda: cluster.sql("SELECT certyo_anchor_status FROM wb_planted WHERE id = 1") == "anchored", 60)
        cluster.sql("""
            SELECT certyo.untrack('wb_planted');
            INSERT INTO wb_planted VALUES (2, 'planted', 'sha256:' || repeat('0', 64), 'anchored', now()),
                                          (3, 'planted status', NULL, 'anchored', NULL), (4, 'plain', NULL, NULL, NULL);
            SELECT certyo.track('wb_planted');
        """)
        findings = cluster.sql("SELECT string_agg(record_id || ': ' || problem, ', ' ORDER BY record_id) "
                               "FROM certyo.audit('wb_planted') WHERE record_id IS NOT NULL")
        assert findings == ("2: record hash changed without capture, 3: anchor status changed without capture, "
                            "4: never captured"), findings
    finally:
        untrack_and_drop(cluster, "wb_planted")


def test_track_waits_for_a_writer_that_read_the_table_first_without_a_deadlock(cluster):
    """A writer's transaction reads the table, then writes it; track() comes between, adding
    the bookkeeping columns (ACCESS EXCLUSIVE). Had track() held a weaker lock first and then
    asked for that one, the writer's write would wait for track() and track() for the writer's
    read: a deadlock, one of them aborted. Both go through, the writer's first."""
    cluster.sql("CREATE TABLE wb_reader (id int PRIMARY KEY, v text); INSERT INTO wb_reader VALUES (1, 'a')")
    try:
        attempt = race(cluster, "BEGIN; SELECT count(*) FROM wb_reader;", "SELECT certyo.track('wb_reader')",
                       "certyo.track(", then="UPDATE wb_reader SET v = 'b'; COMMIT;")
        assert attempt.returncode == 0, attempt.stderr
        assert cluster.sql("SELECT v FROM wb_reader") == "b"
    finally:
        untrack_and_drop(cluster, "wb_reader")


@pytest.mark.parametrize("mode", ["anchored", "accepted"])
def test_rows_backfilled_again_keep_their_marks_and_are_no_finding(cluster, mode):
    """Rows written back, then backfilled again (track(..., backfill => true), as after a
    schema change): each row keeps its last version's hash and status while the backfill's image
    of it waits for Certyo. No forgery: the audit says only that the new version is not yet
    accepted."""
    cluster.sql(f"""
        CREATE TABLE wb_again (id int PRIMARY KEY, v text);
        SELECT certyo.track('wb_again', write_back => '{mode}');
        INSERT INTO wb_again VALUES (1, 'a'), (2, 'b');
    """)
    try:
        anchored = "SELECT count(*) FROM wb_again WHERE certyo_anchor_status = 'anchored'"
        assert wait_for(lambda: cluster.sql(anchored) == "2", 60), cluster.explain()
        cluster.sql("SELECT certyo.pause()")
        assert wait_for(lambda: cluster.sql("SELECT state FROM certyo.worker_status()") == "paused", 10)
        cluster.sql("SELECT certyo.track('wb_again', backfill => true)")
        assert cluster.sql(anchored) == "2"
        findings = cluster.sql("SELECT string_agg(record_id || ': ' || problem, ', ' ORDER BY record_id) FROM certyo.audit('wb_again')")
        assert findings == "1: not yet accepted, 2: not yet accepted", findings
    finally:
        cluster.sql("SELECT certyo.resume()")
        untrack_and_drop(cluster, "wb_again")
