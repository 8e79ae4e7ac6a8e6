"""Hand-made capture triggers against the relink and the audit, the anchored write-back
against owners' columns and triggers: an attacker pass of 2026-12-06 on capture's identity
check. Then, capture ran certyo.relink_restored(true) as the superuser inside the writer's
transaction, and the relink adopted capture triggers with ids it did not know and moved ids
placed at existing tables: four attacks succeeded (a sequence exhausted, every role's delivery
held by one open transaction, an untracked table's identity and history taken over, a delete
behind capture's back hidden behind a key change). Now capture only reads the catalog, the
relink adopts no unknown id and never moves an id placed here at a table that exists, and the
audit matches a row to a record of an earlier key only when the row holds that record's
present-key values. Roles: plain LOGIN roles owning a schema (conftest.py); same fixtures and
after-test checks as the other security suites (pg_test/conftest.py)."""
import subprocess

import pytest

from harness import PG_BIN, TMP, wait_for
from helpers import superuser_runs, wait_anchored, wait_rows, wait_written_back

INT_MAX = 2147483647


def capture_arguments(role, table):
    """The arguments of `table`'s capture trigger, as anyone can read them in pg_trigger."""
    args = role.sql(f"SELECT encode(tgargs, 'escape') FROM pg_trigger "
                    f"WHERE tgrelid = '{table}'::regclass AND tgname = 'certyo_capture'")
    return [p for p in args.split("\\000") if p]


def table_id(role, table):
    return int(next(p for p in capture_arguments(role, table) if p.startswith("table_id=")).split("=")[1])


def forged_arguments(role, model, claimed_id):
    """A tracked table's trigger arguments, with table_id replaced, SQL-quoted."""
    return ", ".join(f"'table_id={claimed_id}'" if p.startswith("table_id=") else f"'{p}'"
                     for p in capture_arguments(role, model))


def hand_made_trigger(role, table, arguments):
    return (f"CREATE TRIGGER certyo_capture AFTER INSERT OR UPDATE OR DELETE ON {table} FOR EACH ROW "
            f"EXECUTE FUNCTION certyo.capture({arguments});")


def test_a_hand_made_trigger_cannot_exhaust_the_table_id_sequence(cluster, attacker, make_role):
    """ATTACK (plain LOGIN role; SUCCEEDS on 094076b, so this test fails there): the role
    tracks a table of its own to learn the shape of capture's arguments, then creates a second
    table with a hand-made certyo_capture trigger carrying table_id=2147483647 and inserts a
    row. Capture's identity check finds the id unknown, certyo.relink_needed() is true, and
    certyo.relink_restored(true) runs as the superuser in the writer's transaction: it ADOPTS
    the unknown id for the attacker's table and `setval('certyo.table_identity_id_seq',
    max(id))` moves the identity sequence to its maximum. From then on every certyo.track() of
    a table not tracked before, by any role, fails with 'nextval: reached maximum value of
    sequence "table_identity_id_seq"' (the worker's own relink does the same adoption even if
    the attacker never writes). Expected: another role can still track a new table."""
    a = attacker.schema
    attacker.sql(f"CREATE TABLE {a}.model (id int PRIMARY KEY, v text); SELECT certyo.track('{a}.model')")
    arguments = forged_arguments(attacker, f"{a}.model", INT_MAX)
    try:
        planted = attacker.attempt(f"""
            CREATE TABLE {a}.big (id int PRIMARY KEY, v text);
            {hand_made_trigger(attacker, f'{a}.big', arguments)}
            INSERT INTO {a}.big VALUES (1, 'x');
        """)
        victim = make_role("victim")
        s = victim.schema
        tracked = victim.attempt(f"CREATE TABLE {s}.orders (id int PRIMARY KEY, v text); "
                                 f"SELECT certyo.track('{s}.orders')")
        assert tracked.returncode == 0, (
            f"after the attacker's hand-made trigger with table_id={INT_MAX}, another role cannot track a table: "
            f"{tracked.stderr[:400]}; sequence now "
            f"{cluster.sql('SELECT last_value FROM certyo.table_identity_id_seq')}")
    finally:
        # Leave the module's cluster usable for the other tests.
        cluster.sql(f"DROP TABLE IF EXISTS {a}.big; DELETE FROM certyo.table_identity WHERE id = {INT_MAX}; "
                    "SELECT setval('certyo.table_identity_id_seq', (SELECT max(id) FROM certyo.table_identity))")


def test_a_writer_cannot_hold_the_relink_lock_and_stop_others_delivery(cluster, attacker, make_role):
    """ATTACK (plain LOGIN role; SUCCEEDS on 094076b, so this test fails there): the role puts a
    never-firing hand-made certyo_capture trigger carrying a victim's table_id on a table of
    its own (committed), which keeps certyo.relink_needed() true for good, so the worker runs
    certyo.relink_restored(true) at every pass. Then, in a transaction it leaves open, it
    inserts into a third table whose hand-made trigger carries a fresh unknown id: capture's
    identity check runs the relink as the superuser in that transaction, which takes SHARE ROW
    EXCLUSIVE on certyo.table_identity and keeps it until the attacker ends its transaction.
    The worker's next relink waits on that lock: no role's changes are delivered or written
    back meanwhile, and certyo.track() of other roles waits too. Expected: the victim's new
    change is written back while the attacker's transaction is open."""
    victim = make_role("victim")
    s, a = victim.schema, attacker.schema
    victim.sql(f"CREATE TABLE {s}.orders (id int PRIMARY KEY, v text); SELECT certyo.track('{s}.orders'); "
               f"INSERT INTO {s}.orders VALUES (1, 'first')")
    wait_written_back(cluster, f"{s}.orders", 1)
    vid = table_id(victim, f"{s}.orders")
    attacker.sql(f"CREATE TABLE {a}.model (id int PRIMARY KEY, v text); SELECT certyo.track('{a}.model')")
    # Never fires (no row is ever written to it): it only keeps relink_needed() true.
    attacker.sql(f"CREATE TABLE {a}.stuck (id int PRIMARY KEY, v text); "
                 + hand_made_trigger(attacker, f"{a}.stuck", forged_arguments(attacker, f"{a}.model", vid)))
    # A trigger carrying the id of a table placed here that exists needs no relink (held).
    assert cluster.sql("SELECT certyo.relink_needed()") == "f"
    fresh = 1500000000
    # Capture only reads the catalog now: an unknown id is refused, and no writer's transaction
    # takes the relink's lock.
    refused = attacker.attempt(f"""
        BEGIN;
        CREATE TABLE {a}.holder (id int PRIMARY KEY, v text);
        {hand_made_trigger(attacker, f'{a}.holder', forged_arguments(attacker, f'{a}.model', fresh))}
        INSERT INTO {a}.holder VALUES (1, 'hold');
    """)
    assert refused.returncode != 0 and "not this table's" in refused.stderr, refused
    victim.sql(f"INSERT INTO {s}.orders VALUES (2, 'second')")
    wait_written_back(cluster, f"{s}.orders", 2, timeout=60)
    cluster.sql(f"DROP TABLE {a}.stuck")
    assert superuser_runs(attacker) == []


@pytest.mark.parametrize("claimed", ["abc", "99999999999", "", "1 2", "two", "two-integers"])
def test_a_hand_made_trigger_with_an_unreadable_id_stops_no_one(cluster, attacker, make_role, claimed):
    """ATTACK (plain LOGIN role; SUCCEEDS on 7bc500b, so this test fails there): the role
    commits a hand-made certyo_capture trigger whose table_id is not one integer (text, more
    than an int holds, empty, or with `two`, two ids; `two-integers`, which capture took the last
    of and the worker's SQL the first of, is refused now). The worker's relink check, and
    certyo.tracked_oids() under certyo.relink_needed(), relink_restored() and every role's
    certyo.track(), read the id with `::integer`, which raised 'invalid input syntax' or 'out
    of range' at every pass: no table of the database was delivered or written back, and no
    role could track a table, until the trigger was dropped. Expected: the trigger's own table
    refuses writes, naming the argument, and everyone else goes on."""
    victim = make_role("victim")
    s, a = victim.schema, attacker.schema
    victim.sql(f"CREATE TABLE {s}.orders (id int PRIMARY KEY, v text); SELECT certyo.track('{s}.orders'); "
               f"INSERT INTO {s}.orders VALUES (1, 'first')")
    wait_written_back(cluster, f"{s}.orders", 1)
    attacker.sql(f"CREATE TABLE {a}.model (id int PRIMARY KEY, v text); SELECT certyo.track('{a}.model')")
    arguments = {"two": "'table_id=abc', " + forged_arguments(attacker, f"{a}.model", 1),
                 "two-integers": "'table_id=7', " + forged_arguments(attacker, f"{a}.model", 8),
                 }.get(claimed) or forged_arguments(attacker, f"{a}.model", claimed)
    attacker.sql(f"CREATE TABLE {a}.odd (id int PRIMARY KEY, v text); "
                 + hand_made_trigger(attacker, f"{a}.odd", arguments))
    try:
        refused = attacker.attempt(f"INSERT INTO {a}.odd VALUES (1, 'x')")
        assert refused.returncode != 0 and "unreadable argument" in refused.stderr, refused
        assert cluster.sql("SELECT certyo.relink_needed()") == "f"
        assert cluster.sql(f"SELECT table_id FROM certyo.tracked_oids() WHERE relid = '{a}.odd'::regclass") == "0"
        # Delivery and write-back go on, and another role can still track a table.
        victim.sql(f"INSERT INTO {s}.orders VALUES (2, 'second'); "
                   f"CREATE TABLE {s}.later (id int PRIMARY KEY, v text); SELECT certyo.track('{s}.later'); "
                   f"INSERT INTO {s}.later VALUES (1, 'one')")
        wait_written_back(cluster, f"{s}.orders", 2)
        wait_written_back(cluster, f"{s}.later", 1)
        assert cluster.sql(f"SELECT count(*) FROM certyo.record_status('{s}.orders')") == "2"
    finally:
        cluster.sql(f"DROP TABLE IF EXISTS {a}.odd")
    assert superuser_runs(attacker) == []


def test_a_hand_made_triggers_huge_arguments_are_not_read_at_every_pass(cluster, attacker, make_role):
    """ATTACK (plain LOGIN role; on 7bc500b the worker read them): a hand-made certyo_capture
    trigger whose arguments are 100 MB made the worker's relink check, certyo.tracked_oids()
    and so every role's track() read them whole, 275 ms a trigger at every pass: ten such
    tables would slow every table's delivery to a pass every few seconds. track() never writes
    arguments over 1 MiB (32 key and 1,600 excluded column names fit in about 120 kB), and
    none over it is read. Here 2 MiB carry a victim's table id: it is not read, so nothing is
    taken for the victim's, and the victim's changes are written back."""
    victim = make_role("victim")
    s, a = victim.schema, attacker.schema
    victim.sql(f"CREATE TABLE {s}.orders (id int PRIMARY KEY, v text); SELECT certyo.track('{s}.orders')")
    vid = table_id(victim, f"{s}.orders")
    attacker.sql(f"CREATE TABLE {a}.model (id int PRIMARY KEY, v text); SELECT certyo.track('{a}.model'); "
                 f"CREATE TABLE {a}.huge (id int PRIMARY KEY, v text)")
    arguments = forged_arguments(attacker, f"{a}.model", vid).replace("'", "''")
    attacker.sql(f"DO $$ BEGIN EXECUTE format('CREATE TRIGGER certyo_capture AFTER INSERT ON {a}.huge "
                 f"FOR EACH ROW EXECUTE FUNCTION certyo.capture({arguments}, %L)', "
                 f"'exclude=' || repeat('x', 2097152)); END $$")
    try:
        assert int(cluster.sql(f"SELECT octet_length(tgargs) FROM pg_trigger WHERE tgrelid = '{a}.huge'::regclass")) > 2097152
        assert cluster.sql(f"SELECT table_id FROM certyo.tracked_oids() WHERE relid = '{a}.huge'::regclass") == "0"
        assert cluster.sql("SELECT certyo.relink_needed()") == "f"
        victim.sql(f"INSERT INTO {s}.orders VALUES (1, 'first')")
        wait_written_back(cluster, f"{s}.orders", 1)
    finally:
        cluster.sql(f"DROP TABLE IF EXISTS {a}.huge")
    assert superuser_runs(attacker) == []


@pytest.mark.parametrize("how", ["named-pg_restore", "dropped-id-on-two-triggers", "during-a-superusers-restore"])
def test_an_open_track_stops_no_delivery(cluster, attacker, make_role, how):
    """ATTACK (plain LOGIN role; an attacker helper of 2026-12-07; SUCCEEDS on 8a98994): the
    worker's relink (certyo.relink_restored(true)) locks certyo.table_identity SHARE ROW
    EXCLUSIVE, and a session that calls certyo.track() holds that table until it commits. The
    worker relinks at every pass while a session is named pg_restore (anyone may name theirs
    so), or while certyo.relink_needed() is true: with `dropped-id-on-two-triggers`, the role
    tracks a table, drops it and puts its id on hand-made triggers of two other tables (the
    relink found two candidates, none of the name kept, placed the id at none, said so in a
    WARNING, and was needed again at the next pass, forever). Then the role leaves
    `BEGIN; SELECT certyo.track(...)` open: the worker waited for it, and nothing in the
    database was delivered or written back. Expected: the relink that cannot have the table at
    once is left to a later pass, relink_needed() settles, and the victim is written back. With
    `during-a-superusers-restore` the worker does relink at every pass (a superuser's session
    is named pg_restore), and must still not wait for the open track()."""
    victim = make_role("victim")
    s, a = victim.schema, attacker.schema
    victim.sql(f"CREATE TABLE {s}.orders (id int PRIMARY KEY, v text); SELECT certyo.track('{s}.orders'); "
               f"INSERT INTO {s}.orders VALUES (1, 'first')")
    wait_written_back(cluster, f"{s}.orders", 1)
    name, restore = None, None
    if how == "named-pg_restore":
        name = "pg_restore"
    elif how == "during-a-superusers-restore":
        restore = cluster.hold_open("BEGIN;", application_name="pg_restore")
    else:
        attacker.sql(f"CREATE TABLE {a}.gone (id int PRIMARY KEY, v text); SELECT certyo.track('{a}.gone')")
        arguments = forged_arguments(attacker, f"{a}.gone", table_id(attacker, f"{a}.gone"))
        attacker.sql(f"DROP TABLE {a}.gone")
        for t in ("c1", "c2"):
            attacker.sql(f"CREATE TABLE {a}.{t} (id int PRIMARY KEY, v text); "
                         + hand_made_trigger(attacker, f"{a}.{t}", arguments))
        assert wait_for(lambda: cluster.sql("SELECT certyo.relink_needed()") == "f", 30), \
            "relink_needed() stays true: the worker relinks at every pass"
    attacker.sql(f"CREATE TABLE {a}.t (id int PRIMARY KEY, v text)")
    held = cluster.hold_open(f"BEGIN; SELECT certyo.track('{a}.t');", user=attacker.name, application_name=name)
    try:
        victim.sql(f"INSERT INTO {s}.orders VALUES (2, 'second')")
        wait_written_back(cluster, f"{s}.orders", 2, timeout=60)
        if not restore:  # during a restore, others' track() relinks, and waits for it
            other = make_role("other")
            tracked = other.attempt(f"SET lock_timeout = '5s'; CREATE TABLE {other.schema}.x (id int PRIMARY KEY); "
                                    f"SELECT certyo.track('{other.schema}.x')")
            assert tracked.returncode == 0, tracked
    finally:
        held.close()
        if restore:
            restore.close()
    assert superuser_runs(attacker) == []


def test_a_postponed_relink_loses_no_write_back(cluster, attacker, make_role):
    """ATTACK (plain LOGIN role; an attacker helper of 2026-12-07, on 1e8aff0): the role leaves
    `BEGIN; SELECT certyo.track(...)` open, so the worker's relink is left to later passes. The
    victim dumps its tracked table with changes not delivered yet, drops it and restores it:
    the catalog places its id at the dropped OID until the relink runs. The write-back took
    the versions for that (gone) table's, untracked meanwhile, and marked them written back
    without writing them: rows 1 and 2 never got the hashes of their restored changes, even
    after the relink. Expected: they wait for the relink (the victim's new changes are
    written back meanwhile), and are written back once it has run."""
    victim = make_role("victim")
    s, a = victim.schema, attacker.schema
    victim.sql(f"CREATE TABLE {s}.orders (id int PRIMARY KEY, v text); SELECT certyo.track('{s}.orders'); "
               f"INSERT INTO {s}.orders VALUES (1, 'first')")
    wait_written_back(cluster, f"{s}.orders", 1)
    attacker.sql(f"CREATE TABLE {a}.t (id int PRIMARY KEY, v text)")
    hold = cluster.hold_open(f"BEGIN; SELECT certyo.track('{a}.t');", user=attacker.name)
    try:
        cluster.sql("SELECT certyo.pause()")
        assert wait_for(lambda: cluster.sql("SELECT state FROM certyo.worker_status()") == "paused", 10)
        victim.sql(f"UPDATE {s}.orders SET v = 'queued' WHERE id = 1; INSERT INTO {s}.orders VALUES (2, 'queued')")
        dump = f"{TMP}/postponed-{victim.name}.sql"
        for step in ([f"{PG_BIN}/pg_dump", "-h", cluster.dir, "-p", str(cluster.port), "-U", victim.name,
                      "-t", f"{s}.orders", "-f", dump, "postgres"],
                     ["psql", "-h", cluster.dir, "-p", str(cluster.port), "-U", victim.name, "-d", "postgres", "-X",
                      "-q", "-v", "ON_ERROR_STOP=1", "-c", f"DROP TABLE {s}.orders", "-f", dump]):
            done = subprocess.run(step, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
        cluster.sql("SELECT certyo.resume()")
        assert cluster.sql("SELECT certyo.relink_needed()") == "t"
        victim.sql(f"INSERT INTO {s}.orders VALUES (3, 'new')")
        wait_rows(cluster, f"{s}.orders", "id = 3 AND certyo_record_hash IS NOT NULL", 1, "the new row written back", 60)
    finally:
        hold.close()
        cluster.sql("SELECT certyo.resume()")
    # Each restored row holds the hash of its newest version.
    wait_rows(cluster, f"{s}.orders",
              f"v = 'queued' AND certyo_record_hash = (SELECT r.record_hash FROM certyo.receipt r WHERE "
              f"r.collection = '{s}.orders' AND r.record_id = orders.id::text ORDER BY r.id DESC LIMIT 1)",
              2, "the restored changes written back", 60)
    assert superuser_runs(attacker) == []


def test_a_hand_made_trigger_cannot_take_over_an_untracked_tables_identity(cluster, attacker, make_role):
    """ATTACK (plain LOGIN role; SUCCEEDS on 094076b, so this test fails there): a victim
    tracks a table, its row is anchored, and it untracks the table (its identity row stays,
    placed at its OID, with all its receipts). The attacker, who read the victim's table_id in
    pg_trigger while it was tracked (or guesses: ids are small and sequential), creates a table
    with a hand-made certyo_capture trigger carrying that id and inserts a row. Capture's check
    runs certyo.relink_restored(true) as the superuser; the victim's id now has exactly one
    capture trigger, the attacker's, so the relink moves the identity -- schema and table name
    included -- and every queued, delivered and accepted change of the victim to the
    attacker's table; the attacker's insert is captured under the victim's id. The victim's
    history() is empty, the attacker's history() of its own table lists the victim's records
    (history() is the superuser's; record ids are key values), and when the victim deletes a row while untracked and tracks
    the table again, its audit() is silent about the record removed while untracked and
    reports its untouched row 4711 as 'never captured' (a false alarm).
    Expected: the attacker's insert is refused, the identity stays the victim's."""
    victim = make_role("victim")
    s, a = victim.schema, attacker.schema
    victim.sql(f"CREATE TABLE {s}.orders (id int PRIMARY KEY, v text); SELECT certyo.track('{s}.orders'); "
               f"INSERT INTO {s}.orders VALUES (4711, 'secret key value'), (2, 'kept')")
    wait_anchored(cluster, f"{s}.orders", 2)
    vid = table_id(victim, f"{s}.orders")
    arguments = forged_arguments(victim, f"{s}.orders", vid)
    victim.sql(f"SELECT certyo.untrack('{s}.orders')")
    taken = attacker.attempt(f"""
        CREATE TABLE {a}.grab (id int PRIMARY KEY, v text);
        {hand_made_trigger(attacker, f'{a}.grab', arguments)}
        INSERT INTO {a}.grab VALUES (1, 'mine');
    """)
    placed = cluster.sql(f"SELECT schema_name || '.' || table_name || '|' || (relid = '{s}.orders'::regclass) "
                         f"FROM certyo.table_identity WHERE id = {vid}")
    leaked = cluster.sql(f"SELECT count(*) FROM certyo.history('{a}.grab', '4711')")
    # The victim deletes a row while untracked, then tracks the table again.
    victim.sql(f"DELETE FROM {s}.orders WHERE id = 2; SELECT certyo.track('{s}.orders')")
    audit = cluster.sql(f"SELECT string_agg(coalesce(record_id, '-') || ':' || problem, '; ') "
                        f"FROM certyo.audit('{s}.orders')")
    history = cluster.sql(f"SELECT count(*) FROM certyo.history('{s}.orders', '4711')")
    assert placed in (f"{s}.orders|t", f"{s}.orders|true") and taken.returncode != 0, (
        f"the attacker's hand-made trigger took over the untracked victim's identity {vid}: now placed at {placed}; "
        f"attacker's insert {'succeeded' if taken.returncode == 0 else 'failed: ' + taken.stderr[:200]}; "
        f"attacker's history() of its own table for the victim's key 4711: {leaked}; "
        f"victim's history of 4711 after re-tracking: {history}; victim's audit findings: {audit}")
    assert history != "0"
    assert audit == "-:removed while untracked", f"the record deleted while untracked is said, and only it: {audit!r}"


@pytest.mark.parametrize("renamed", [False, True])
def test_a_hand_made_trigger_cannot_stop_a_tracked_tables_writes(cluster, attacker, make_role, renamed):
    """Attack (plain LOGIN role): a hand-made certyo_capture trigger carrying a tracked
    victim's table_id on the attacker's table (the relink then sees two candidates and chooses
    by the name kept in certyo.table_identity); with `renamed`, the victim renamed its table
    after tracking it, so that, were the kept name stale, neither candidate would match: the
    relink would place the id at OID 0 and the victim's next session would be refused by
    capture ('carries the identity of another table'). Expected: the victim's writes in a
    fresh session are captured and written back."""
    victim = make_role("victim")
    s, a = victim.schema, attacker.schema
    victim.sql(f"CREATE TABLE {s}.orders (id int PRIMARY KEY, v text); SELECT certyo.track('{s}.orders'); "
               f"INSERT INTO {s}.orders VALUES (1, 'first')")
    wait_written_back(cluster, f"{s}.orders", 1)
    name = f"{s}.orders"
    if renamed:
        victim.sql(f"ALTER TABLE {s}.orders RENAME TO orders2")
        name = f"{s}.orders2"
    vid = table_id(victim, name)
    attacker.sql(f"CREATE TABLE {a}.twin (id int PRIMARY KEY, v text); "
                 + hand_made_trigger(attacker, f"{a}.twin", forged_arguments(victim, name, vid)))
    cluster.sql("SELECT certyo.relink_restored(true)")
    wrote = victim.attempt(f"INSERT INTO {name} VALUES (2, 'second')")
    assert wrote.returncode == 0, f"the victim's write was refused: {wrote.stderr[:400]}"
    wait_written_back(cluster, name, 2)
    attacker.sql(f"DROP TABLE {a}.twin")


def test_the_anchored_write_back_is_not_confused_by_columns_named_like_its_aliases(cluster, attacker, emulator):
    """Attack (table owner): a table tracked with write_back => 'anchored' whose columns are
    named like the aliases of the worker's lock, guard and UPDATE statements (t, v, n, ord,
    hash, toid, place, k1, ctid-like names), keyed by `v`. Expected: rows are anchored with the
    hash of their own record, nothing runs as the superuser, audit() silent."""
    a = attacker.schema
    attacker.sql(f"""CREATE TABLE {a}.alias (v int PRIMARY KEY, t text, n int, ord int, hash text, toid oid,
                                             place text, k1 int, here text);
                     SELECT certyo.track('{a}.alias', write_back => 'anchored');
                     INSERT INTO {a}.alias VALUES (1, 't', 2, 3, 'h', 4, '(0,1)', 5, 'x'),
                                                  (2, 'u', 3, 4, 'i', 5, '(0,2)', 6, 'y')""")
    wait_anchored(cluster, f"{a}.alias", 2)
    held = cluster.sql(f"SELECT string_agg(v || '=' || certyo_record_hash, ',' ORDER BY v) FROM {a}.alias")
    own = {r["recordHash"] for r in emulator.records() if r["collection"] == f"{a}.alias"}
    for part in held.split(","):
        assert part.split("=")[1] in own
    assert cluster.sql(f"SELECT count(*) FROM certyo.audit('{a}.alias')") == "0"
    assert superuser_runs(attacker) == []


def test_the_content_guard_refuses_a_row_whose_rendering_changes_between_reads(cluster, attacker):
    """Attack (table owner): a column of a type whose output function the owner controls
    cannot be made (C only), so the owner uses a generated column and a BEFORE UPDATE trigger
    that changes a business column when the worker's UPDATE runs (the lock and guard saw the
    captured content, the UPDATE writes other content): in anchored mode the row must not end
    up `anchored` while holding content Certyo never anchored."""
    a = attacker.schema
    attacker.sql(f"""CREATE TABLE {a}.shifty (id int PRIMARY KEY, v text, g text GENERATED ALWAYS AS (v || '!') STORED);
                     SELECT certyo.track('{a}.shifty', write_back => 'anchored');
                     CREATE FUNCTION {a}.sneak() RETURNS trigger LANGUAGE plpgsql AS $$
                     BEGIN
                         IF NEW.certyo_anchor_status IS NOT NULL THEN NEW.v := 'changed on write-back'; END IF;
                         RETURN NEW;
                     END $$;
                     CREATE TRIGGER sneak BEFORE UPDATE ON {a}.shifty FOR EACH ROW EXECUTE FUNCTION {a}.sneak();
                     INSERT INTO {a}.shifty (id, v) VALUES (1, 'original')""")
    wait_for(lambda: cluster.sql(f"SELECT count(*) FROM certyo.receipt WHERE relid = '{a}.shifty'::regclass "
                                 "AND anchor_status = 'anchored'") == "1", timeout=30)
    wait_for(lambda: cluster.sql(f"SELECT count(*) FROM certyo.queue WHERE relid = '{a}.shifty'::regclass") == "0"
             and cluster.sql(f"SELECT count(*) FROM certyo.delivery WHERE relid = '{a}.shifty'::regclass") == "0",
             timeout=30)
    row = cluster.sql(f"SELECT v, certyo_anchor_status FROM {a}.shifty WHERE id = 1")
    assert row != "changed on write-back|anchored", f"the row says anchored for content never anchored: {row}"


@pytest.mark.parametrize("cover", [False, True])
def test_a_delete_behind_captures_back_is_not_hidden_by_a_later_row_taking_the_old_key(cluster, attacker, cover):
    """Audit after a change of record key (new in 8904096: a record of an earlier key is taken
    to have 'gone on' under another record id when a later non-insert version of another record
    has the same values of some key's columns). A table keyed by `a` (record ids '1', '2') is
    re-keyed to `b`; row a=1 is then deleted behind capture's back (session_replication_role =
    replica, as a tamperer with the rights to do so); with `cover`, a writer then moves another
    row onto a=1 by an ordinary, captured UPDATE. Expected both ways: audit() reports record
    '1' of the earlier key as deleted without capture. If only the `cover` case fails, the
    tampering was hidden behind the other row's key change: ATTACK SUCCEEDS on 094076b with
    `cover` (audit() returns nothing; without `cover` it reports '1: deleted without capture').
    Any role with UPDATE on the table can thus cover a deletion made behind capture's back."""
    a = attacker.schema
    table = f"{a}.rekeyed"
    attacker.sql(f"CREATE TABLE {table} (a int PRIMARY KEY, b int UNIQUE NOT NULL, v text); "
                 f"SELECT certyo.track('{table}', write_back => 'accepted'); "
                 f"INSERT INTO {table} VALUES (1, 10, 'one'), (2, 20, 'two')")
    wait_anchored(cluster, table, 2)
    attacker.sql(f"SELECT certyo.track('{table}', record_id_columns => ARRAY['b'])")
    cluster.sql(f"SET session_replication_role = replica; DELETE FROM {table} WHERE a = 1")
    assert cluster.sql(f"SELECT count(*) FROM certyo.queue WHERE relid = '{table}'::regclass") == "0"
    if cover:
        attacker.sql(f"UPDATE {table} SET a = 1 WHERE a = 2")
        wait_for(lambda: cluster.sql(f"SELECT count(*) FROM certyo.queue WHERE relid = '{table}'::regclass") == "0"
                 and cluster.sql(f"SELECT count(*) FROM certyo.delivery WHERE relid = '{table}'::regclass") == "0",
                 timeout=30)
        wait_anchored(cluster, table, 1)
    findings = cluster.sql(f"SELECT record_id || ':' || problem FROM certyo.audit('{table}') ORDER BY 1")
    assert "deleted without capture" in findings, (
        f"row a=1 (b=10) was deleted behind capture's back, and audit() says nothing about it: {findings!r}")
