"""Security tests of the worker's statements over user tables: what a table owner, a database
owner or any LOGIN role can make of the SQL the delivery worker (a superuser) builds and runs.
Same fixtures and after-test checks as the other security suites (pg_test/conftest.py): no role gains a
privilege, the server never crashes, vault.canary stays intact.

Each test is an attack that worked against the build before it (an attacker pass of
2026-12-06): a column named `t` crashed the server in a loop through a backfill, the write-back
ran the owner's code in replica mode, a pre-created schema made its owner a superuser, a TEMP
table injected records, a deferrable key lost a row at Certyo, two tables shared a collection,
a date in a condition changed meaning with DateStyle, a retyped status column hid a forgery
from the audit, a huge condition held the worker in the planner, an advisory lock taken in a
condition stayed with the worker.

Run:  CERTYO_EMULATOR=target/release/certyo-emulator python3 -m pytest -q pg_test/security/test_worker.py
"""
import re
import time
from pathlib import Path

import pytest

from conftest import DIR, SETTINGS
from harness import Cluster, free_port, wait_for
from helpers import (assert_delivered_meanwhile, assert_ran_only_as, assert_unprivileged, literal,
                     make_table, wait_anchored, wait_backfill, wait_written_back)

REPO = Path(__file__).resolve().parent.parent.parent

# Where the worker builds SQL over user tables, and the SQL it runs there.
WORKER_SQL = ["src/backfill", "src/delivery", "src/track/key.rs", "src/audit.rs", "src/capture/scan.rs",
              "sql/delivery.sql", "sql/operations.sql"]


def worker_identifiers():
    """Every lowercase word in the worker's SQL and the code around it: aliases (t, v, n, k1,
    ...), column names of its own tables, function names. A user column of any of these names
    must not change what the worker's statements mean."""
    words = set()
    for place in WORKER_SQL:
        path = REPO / place
        for file in ([path] if path.is_file() else sorted(path.rglob("*"))):
            if file.suffix in (".rs", ".sql"):
                words.update(re.findall(r"\b[a-z_][a-z0-9_]{0,62}\b", file.read_text()))
    # k1..k8: the write-back's parts of a record id, whatever the key's width.
    words.update(f"k{i}" for i in range(1, 9))
    words -= {"id", "certyo_record_hash", "certyo_anchor_status", "certyo_verified_at",
              "ctid", "oid", "xmin", "xmax", "cmin", "cmax", "tableoid"}  # system columns
    return sorted(words)


def quoted(name):
    return '"' + name.replace('"', '""') + '"'


def emulator_ids(emulator, collection):
    return sorted(r["recordId"] for r in emulator.records() if r["collection"] == collection)


def test_worker_identifiers_are_many():
    """The generated-names tests below are only as good as the names: they must include the
    aliases the worker's statements use."""
    names = worker_identifiers()
    for alias in ("t", "v", "n", "k1", "hash", "rid", "qid", "one", "updated_at", "relid"):
        assert alias in names, alias
    assert len(names) > 300, len(names)


def test_columns_named_after_the_workers_sql(cluster, attacker, emulator, make_role):
    """Attack: a tracked table with a column for every identifier in the worker's SQL (bigint
    and text in turn: a bigint column `t` made the backfill read an integer as a row, a
    segmentation fault that restarted the server about 7 times a second; a text one sent
    garbage memory to Certyo). Capture, delivery, write-back, verification, backfill and
    audit all run over it, and every record holds exactly the row's content."""
    s = attacker.schema
    # PostgreSQL allows 1,600 columns: the shortest names first, where the aliases are.
    names = sorted(worker_identifiers(), key=lambda n: (len(n), n))[:1500]
    columns = ", ".join(f"{quoted(n)} {'bigint' if i % 2 == 0 else 'text'}" for i, n in enumerate(names))
    attacker.sql(f"CREATE TABLE {s}.wide (id int PRIMARY KEY, {columns})")
    table = f"{s}.wide"
    attacker.sql(f"SELECT certyo.track('{table}')")
    t_type = "bigint" if names.index("t") % 2 == 0 else "text"
    t_value = "7" if t_type == "bigint" else "'seven'"
    attacker.sql(f"INSERT INTO {table} (id, t, v) SELECT g, {t_value}, {'g' if names.index('v') % 2 == 0 else 'g::text'}"
                 f" FROM generate_series(1, 5) g")
    wait_anchored(cluster, table, 5)
    backfill = attacker.sql(f"SELECT certyo.backfill('{table}')")
    assert wait_backfill(cluster, backfill) == "done"
    assert cluster.sql(f"SELECT rows_queued FROM certyo.backfills WHERE id = {backfill}") == "5"
    assert wait_for(lambda: len(emulator_ids(emulator, table)) >= 10, 30), emulator_ids(emulator, table)
    for record in (r for r in emulator.records() if r["collection"] == table):
        payload = record["recordPayload"]
        assert payload["id"] == int(record["recordId"]), record
        assert payload["t"] in (7, "seven"), payload["t"]
    wait_anchored(cluster, table, 5)
    assert cluster.sql(f"SELECT count(*) FROM certyo.audit('{table}')") == "0", \
        cluster.sql(f"SELECT * FROM certyo.audit('{table}')")
    assert_delivered_meanwhile(cluster, make_role("bystander"))


ALIASES = ["t", "v", "n", "k1", "hash", "rid", "qid", "one", "x", "id"]


@pytest.mark.parametrize("key", ALIASES)
def test_a_record_key_named_after_a_workers_alias(cluster, attacker, key, emulator):
    """Attack: the record id column itself named like an alias of the worker's statements
    (write-back `t.k = v.k1`, backfill `ORDER BY`), with a second column named `t` or `v` of
    another type. Write-back, verification, backfill and audit mark and read the right rows."""
    s = attacker.schema
    other = "v" if key != "v" else "t"
    table = f"{s}.keyed_{re.sub('[^a-z0-9]', '', key)}"
    attacker.sql(f"CREATE TABLE {table} ({quoted(key)} bigint PRIMARY KEY, {quoted(other)} text, payload text)")
    attacker.sql(f"SELECT certyo.track('{table}')")
    attacker.sql(f"INSERT INTO {table} ({quoted(key)}, {quoted(other)}) SELECT g, 'x' || g FROM generate_series(1, 4) g")
    wait_anchored(cluster, table, 4)
    backfill = attacker.sql(f"SELECT certyo.backfill('{table}', {literal(quoted(key) + ' >= 2')})")
    assert wait_backfill(cluster, backfill) == "done"
    assert cluster.sql(f"SELECT rows_queued FROM certyo.backfills WHERE id = {backfill}") == "3"
    wait_anchored(cluster, table, 4)
    assert cluster.sql(f"SELECT count(*) FROM certyo.audit('{table}')") == "0"


# ---------------------------------------------------------------------------------------------
# No owner code ever runs in replica mode


def replica_observer(s):
    """A function that notes the replication role it runs under in {s}.seen, and a table
    {s}.other with a foreign key, owned by the same role (the write of owner code elsewhere)."""
    return f"""
        CREATE TABLE {s}.seen (srr text, who name);
        CREATE FUNCTION {s}.note(tag text) RETURNS boolean LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO {s}.seen VALUES (tag || ':' || pg_catalog.current_setting('session_replication_role'), current_user);
            RETURN true;
        END $$;
    """


def seen_modes(cluster, s):
    """What replica_observer noted: 'tag:session_replication_role' each, comma-separated."""
    return cluster.sql(f"SELECT coalesce(string_agg(DISTINCT srr, ','), '') FROM {s}.seen")


OWNER_CODE = {
    "always-trigger": (
        "CREATE FUNCTION {s}.trg() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN PERFORM {s}.note('trigger'); RETURN NEW; END $$;",
        "id int PRIMARY KEY, v text",
        "CREATE TRIGGER watch BEFORE UPDATE ON {s}.t FOR EACH ROW EXECUTE FUNCTION {s}.trg(); "
        "ALTER TABLE {s}.t ENABLE ALWAYS TRIGGER watch;",
    ),
    "replica-trigger": (
        "CREATE FUNCTION {s}.trg() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN PERFORM {s}.note('trigger'); RETURN NEW; END $$;",
        "id int PRIMARY KEY, v text",
        "CREATE TRIGGER watch AFTER UPDATE ON {s}.t FOR EACH ROW EXECUTE FUNCTION {s}.trg(); "
        "ALTER TABLE {s}.t ENABLE REPLICA TRIGGER watch;",
    ),
    "table-check": (
        "",
        "id int PRIMARY KEY, v text, CHECK ({s}.note('check'))",
        "",
    ),
    "domain-key": (
        "CREATE DOMAIN {s}.k AS int CHECK ({s}.note('domain'));",
        "id {s}.k PRIMARY KEY, v text",
        "",
    ),
    "text-cast-key": (
        "CREATE TYPE {s}.k AS ENUM ('1', '2', '3'); "
        "CREATE FUNCTION {s}.k_of(x text) RETURNS {s}.k LANGUAGE plpgsql AS $$ "
        "BEGIN PERFORM {s}.note('cast'); "
        "RETURN (SELECT e FROM unnest(enum_range(NULL::{s}.k)) e WHERE e::text = x); END $$; "
        "CREATE CAST (text AS {s}.k) WITH FUNCTION {s}.k_of(text) AS ASSIGNMENT;",
        "id {s}.k PRIMARY KEY, v text",
        "",
    ),
    "forced-policy": (
        "",
        "id int PRIMARY KEY, v text",
        "ALTER TABLE {s}.t ENABLE ROW LEVEL SECURITY; ALTER TABLE {s}.t FORCE ROW LEVEL SECURITY; "
        "CREATE POLICY p ON {s}.t USING ({s}.note('policy'));",
    ),
    "json-cast-in-check": (
        # to_json() is PostgreSQL's, but looks up the owner's cast to json of an enum when it runs
        "CREATE TYPE {s}.e AS ENUM ('a', 'b'); "
        "CREATE FUNCTION {s}.e_json(x {s}.e) RETURNS json LANGUAGE plpgsql AS $$ "
        "BEGIN PERFORM {s}.note('cast'); RETURN pg_catalog.to_json(x::text); END $$; "
        "CREATE CAST ({s}.e AS json) WITH FUNCTION {s}.e_json({s}.e);",
        "id int PRIMARY KEY, v text, e {s}.e DEFAULT 'a', CHECK (pg_catalog.to_json(e) IS NOT NULL)",
        "",
    ),
    "composite-from-text-in-check": (
        # reading a composite from text runs the checks of the domains it holds
        "CREATE DOMAIN {s}.d AS text CHECK ({s}.note('domain')); "
        "CREATE TYPE {s}.c AS (x {s}.d);",
        "id int PRIMARY KEY, v text DEFAULT '(a)', CHECK ((v::{s}.c) IS NOT NULL)",
        "",
    ),
    "input-function-in-check": (
        # record_in reads a type it is given when it runs: no catalog row names the type
        "CREATE DOMAIN {s}.d AS text CHECK ({s}.note('domain')); "
        "CREATE TYPE {s}.c AS (x {s}.d);",
        "id int PRIMARY KEY, v text, "
        "CHECK (pg_catalog.record_in('(a)'::cstring, pg_catalog.to_regtype('{s}.c')::oid, -1) IS NOT NULL)",
        "",
    ),
    "domain-input-in-check": (
        "CREATE DOMAIN {s}.d AS text CHECK ({s}.note('domain'));",
        "id int PRIMARY KEY, v text, "
        "CHECK (pg_catalog.domain_in('a'::cstring, pg_catalog.to_regtype('{s}.d')::oid, -1) IS NOT NULL)",
        "",
    ),
    "sql-text-in-check": (
        "",
        "id int PRIMARY KEY, v text, "
        "CHECK (pg_catalog.query_to_xml('SELECT {s}.note(''xml'')', true, true, '') IS NOT NULL)",
        "",
    ),
    "index-expression": (
        "CREATE FUNCTION {s}.idx(x text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$ "
        "BEGIN IF pg_catalog.current_setting('session_replication_role') = 'replica' THEN "
        "PERFORM pg_catalog.setval('{s}.replica_seen', 1); END IF; RETURN x; END $$;",
        "id int PRIMARY KEY, v text",
        "CREATE INDEX t_watch ON {s}.t ({s}.idx(certyo_record_hash));",
    ),
}


@pytest.mark.parametrize("vector", list(OWNER_CODE))
def test_no_owner_code_runs_in_replica_mode(cluster, attacker, make_role, vector):
    """Attack: owner code that an UPDATE of the tracked table runs (an ENABLE ALWAYS or ENABLE
    REPLICA trigger, a CHECK constraint, an index expression) writes to another role's table
    during the write-back. The write-back ran it with session_replication_role = replica, so
    that table's foreign keys, triggers and capture were skipped. No owner code may ever see
    replica mode; the write-back still marks every row."""
    s = attacker.schema
    attacker.sql(replica_observer(s) + f"CREATE SEQUENCE {s}.replica_seen MINVALUE 0 START 0;")
    before, columns, after = (part.format(s=s) for part in OWNER_CODE[vector])
    if before:
        attacker.sql(before)
    table = make_table(attacker, columns=columns)
    if after:
        attacker.sql(after)
    ids = "g::text" if vector == "text-cast-key" else "g"  # an enum key, from text by the owner's cast
    attacker.sql(f"INSERT INTO {table} (id) SELECT {ids} FROM generate_series(1, 3) g")
    wait_written_back(cluster, table, 3)
    wait_anchored(cluster, table, 3)
    seen = cluster.sql(f"SELECT string_agg(DISTINCT srr, ',') FROM {s}.seen")
    assert "replica" not in seen, f"owner code ran in replica mode: {seen}"
    assert cluster.sql(f"SELECT last_value FROM {s}.replica_seen") == "0", "an index expression saw replica mode"
    assert_unprivileged(attacker)
    assert_ran_only_as(attacker, attacker.name)


# Owner code added to a table the worker has written back to already, whose record key and
# facts it keeps until the catalog changes (src/delivery/keys.rs): (code made first, DDL that
# puts it on the table, the table's columns).
OWNER_CODE_LATER = {
    "always-trigger": OWNER_CODE["always-trigger"][::2],
    "replica-trigger": OWNER_CODE["replica-trigger"][::2],
    "table-check": ("", "ALTER TABLE {s}.t ADD CONSTRAINT watch CHECK ({s}.note('check'))"),
    "forced-policy": OWNER_CODE["forced-policy"][::2],
    "index-expression": OWNER_CODE["index-expression"][::2],
    "generated-column": ("CREATE FUNCTION {s}.inote(x text) RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$ "
                         "BEGIN RETURN {s}.note('generated'); END $$;",
                         "ALTER TABLE {s}.t ADD COLUMN w boolean GENERATED ALWAYS AS ({s}.inote(v)) STORED"),
}


@pytest.mark.parametrize("vector", list(OWNER_CODE_LATER))
def test_owner_code_added_after_a_write_back_never_runs_in_replica_mode(cluster, attacker, make_role, vector):
    """Attack on the worker's kept record keys: the table is written back to in replica mode
    (no owner code), so the worker keeps that finding; then its owner adds code that an UPDATE
    runs (a trigger, a check, a policy, an index expression, a generated column) and writes
    again. Functions are made before the first write-back, so that only the DDL on the table
    (a relcache invalidation) tells the worker. The next write-back must see it: the finding is forgotten when the catalog
    changes, and the code runs in origin mode as its owner, never in replica mode."""
    s = attacker.schema
    attacker.sql(replica_observer(s) + f"CREATE SEQUENCE {s}.replica_seen MINVALUE 0 START 0;")
    table = make_table(attacker)
    before, after = (part.format(s=s) for part in OWNER_CODE_LATER[vector])
    if before:
        attacker.sql(before)
    attacker.sql(f"INSERT INTO {table} (id, v) SELECT g, 'x' FROM generate_series(1, 3) g")
    wait_anchored(cluster, table, 3)
    attacker.sql(after)
    attacker.sql(f"INSERT INTO {table} (id, v) SELECT g, 'x' FROM generate_series(4, 6) g")
    wait_anchored(cluster, table, 6)
    seen = seen_modes(cluster, s)
    assert "replica" not in seen, f"owner code ran in replica mode: {seen}"
    if vector == "always-trigger":  # fires on UPDATE only: the write-back's
        assert "trigger:origin" in seen, f"the trigger did not run in the write-back: {seen}"
    assert cluster.sql(f"SELECT last_value FROM {s}.replica_seen") == "0", "an index expression saw replica mode"
    assert_unprivileged(attacker)
    assert_ran_only_as(attacker, attacker.name)


def test_a_database_default_of_repeatable_read_hides_no_owner_code(cluster, attacker):
    """Attack (a helper's pass of 2026-12-07): the attacker owns the database and sets REPEATABLE
    READ for every session, the worker's too. A trigger committed while the worker waits for the
    table's lock was then not seen by its catalog read after the lock (the transaction's first
    snapshot), and fired in replica mode; the kept record key kept that finding. The worker's
    sessions are READ COMMITTED whatever the database says."""
    s = attacker.schema
    workers = ("SELECT coalesce(string_agg(pid::text, ','), '') FROM pg_stat_activity"
               " WHERE backend_type = 'certyo_cdc delivery'")

    def restart_worker():
        old = cluster.sql(workers)
        cluster.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'certyo_cdc delivery'")
        assert wait_for(lambda: cluster.sql(workers) not in ("", old), 30), "no new delivery worker"

    attacker.sql(replica_observer(s) + f"""
        CREATE FUNCTION {s}.trg() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM {s}.note('trigger'); RETURN NEW; END $$;""")
    cluster.sql(f"ALTER DATABASE postgres OWNER TO {attacker.name}")
    try:
        attacker.sql("ALTER DATABASE postgres SET default_transaction_isolation = 'repeatable read'")
        restart_worker()
        table = make_table(attacker)
        attacker.sql(f"INSERT INTO {table} (id, v) SELECT g, 'x' FROM generate_series(1, 3) g")
        wait_anchored(cluster, table, 3)
        attacker.sql(f"INSERT INTO {table} (id, v) SELECT g, 'x' FROM generate_series(4, 6) g")
        # The trigger commits once the worker waits for the table (or after 15 s).
        attacker.sql(f"""
            BEGIN;
            CREATE TRIGGER watch BEFORE UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION {s}.trg();
            ALTER TABLE {table} ENABLE ALWAYS TRIGGER watch;
            DO $$ DECLARE i int := 0; BEGIN
              LOOP
                EXIT WHEN EXISTS (SELECT FROM pg_catalog.pg_locks
                                   WHERE relation = '{table}'::regclass AND NOT granted);
                i := i + 1; EXIT WHEN i > 3000;
                PERFORM pg_catalog.pg_sleep(0.005);
              END LOOP; END $$;
            COMMIT;""")
        wait_anchored(cluster, table, 6)
        attacker.sql(f"INSERT INTO {table} (id, v) SELECT g, 'x' FROM generate_series(7, 9) g")
        wait_anchored(cluster, table, 9)
        seen = seen_modes(cluster, s)
        assert "replica" not in seen, f"owner code ran in replica mode: {seen}"
        assert "trigger:origin" in seen, f"the trigger did not run in the write-back: {seen}"
    finally:
        cluster.sql("ALTER DATABASE postgres RESET default_transaction_isolation;"
                    " ALTER DATABASE postgres OWNER TO postgres")
        restart_worker()
    assert_unprivileged(attacker)


def test_owner_code_added_to_a_partition_after_a_write_back_never_runs_in_replica_mode(cluster, attacker):
    """The same on a tracked partitioned table: the trigger goes on one partition, whose own
    relcache is invalidated, not the tracked parent's."""
    s = attacker.schema
    attacker.sql(replica_observer(s) + f"""
        CREATE FUNCTION {s}.trg() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM {s}.note('trigger'); RETURN NEW; END $$;
        CREATE TABLE {s}.p (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
        CREATE TABLE {s}.p1 PARTITION OF {s}.p FOR VALUES FROM (0) TO (100);
        SELECT certyo.track('{s}.p');
        INSERT INTO {s}.p (id, v) SELECT g, 'x' FROM generate_series(1, 3) g;
    """)
    wait_anchored(cluster, f"{s}.p", 3)
    attacker.sql(f"""
        CREATE TRIGGER watch BEFORE UPDATE ON {s}.p1 FOR EACH ROW EXECUTE FUNCTION {s}.trg();
        ALTER TABLE {s}.p1 ENABLE ALWAYS TRIGGER watch;
        INSERT INTO {s}.p (id, v) SELECT g, 'x' FROM generate_series(4, 6) g;
    """)
    wait_anchored(cluster, f"{s}.p", 6)
    seen = seen_modes(cluster, s)
    assert "trigger:origin" in seen and "replica" not in seen, f"the partition's trigger: {seen}"
    assert_unprivileged(attacker)
    assert_ran_only_as(attacker, attacker.name)


def test_no_partition_is_attached_while_a_replica_mode_write_back_holds_the_tree(cluster, attacker):
    """Attack on the replica-mode write-back of a partitioned table (reported by an attacker
    helper of 2026-12-07): the worker locks the tree ROW EXCLUSIVE, checks what code an UPDATE
    of it can run, then updates it in replica mode. `ATTACH PARTITION` takes only SHARE UPDATE
    EXCLUSIVE on the parent, which does not conflict: a table attached between the check and
    the UPDATE would bring its triggers into the UPDATE unchecked, to fire in replica mode.
    Here the write-back waits for a row lock the owner holds, after its check: caught in that
    state (one reading of pg_locks), it must hold the parent SHARE UPDATE EXCLUSIVE too, so
    that an ATTACH waits for it and is seen by the next check. FAILS on 7bc500b (ROW EXCLUSIVE
    alone)."""
    s = attacker.schema
    attacker.sql(f"""
        CREATE TABLE {s}.p (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
        CREATE TABLE {s}.p1 PARTITION OF {s}.p FOR VALUES FROM (0) TO (100);
        SELECT certyo.track('{s}.p');
        INSERT INTO {s}.p VALUES (1, 'x');""")
    wait_anchored(cluster, f"{s}.p", 1)
    # The delivery worker (which writes back in replica mode; a slow lane writes an open tree
    # back in origin mode) waiting for a lock while holding the parent ROW EXCLUSIVE (the
    # write-back's), and whether it holds it SHARE UPDATE EXCLUSIVE as well.
    caught = f"""
        WITH l AS MATERIALIZED (SELECT * FROM pg_catalog.pg_locks),
             w AS (SELECT DISTINCT l.pid FROM l WHERE NOT l.granted
                      AND EXISTS (SELECT FROM l h WHERE h.pid = l.pid AND h.granted AND h.mode = 'RowExclusiveLock'
                                     AND h.relation = '{s}.p'::regclass))
        SELECT coalesce(string_agg(w.pid || ':' || EXISTS (SELECT FROM l WHERE l.pid = w.pid AND l.granted
                                   AND l.mode = 'ShareUpdateExclusiveLock' AND l.relation = '{s}.p'::regclass), ','), '')
          FROM w JOIN pg_catalog.pg_stat_activity a ON a.pid = w.pid AND a.backend_type = 'certyo_cdc delivery'"""
    cluster.sql("SELECT certyo.pause()")
    attacker.sql(f"INSERT INTO {s}.p VALUES (2, 'x')")
    held = cluster.hold_open(f"BEGIN; SELECT FROM {s}.p WHERE id = 2 FOR UPDATE;", user=attacker.name)
    try:
        cluster.sql("SELECT certyo.resume()")
        seen = []
        assert wait_for(lambda: seen.append(cluster.sql(caught)) or seen[-1] != "", 60, every=0.005), \
            "the write-back never waited for the row"
        assert ":false" not in seen[-1], f"the write-back waits holding the tree open to ATTACH: {seen[-1]}"
    finally:
        held.close()
        cluster.sql("SELECT certyo.resume()")
    wait_anchored(cluster, f"{s}.p", 2, timeout=60)
    assert_unprivileged(attacker)


def test_a_write_back_closing_a_tree_holds_none_of_its_partitions_while_it_waits(cluster, attacker):
    """The close of the last test must not deadlock with ATTACH PARTITION (a review of
    2026-12-07): ATTACH locks the parent SHARE UPDATE EXCLUSIVE, then the default partition
    ACCESS EXCLUSIVE. A write-back that locked the partitions first and the parent's SHARE
    UPDATE EXCLUSIVE after waited for the ATTACH while holding the default partition it
    wanted. Here the owner holds the parent and the default partition as ATTACH does: the
    worker must be found waiting for the parent (not for the default partition, which it
    would otherwise lock first). FAILS on 1e8aff0."""
    s = attacker.schema
    attacker.sql(f"""
        CREATE TABLE {s}.p (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
        CREATE TABLE {s}.p1 PARTITION OF {s}.p FOR VALUES FROM (0) TO (100);
        CREATE TABLE {s}.p_default PARTITION OF {s}.p DEFAULT;
        SELECT certyo.track('{s}.p');
        INSERT INTO {s}.p VALUES (1, 'x');""")
    wait_anchored(cluster, f"{s}.p", 1)
    waiting = (f"SELECT count(*) FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a USING (pid)"
               f" WHERE a.backend_type LIKE 'certyo_cdc%' AND NOT l.granted AND l.relation = '{s}.p'::regclass")
    held = cluster.hold_open(f"BEGIN; LOCK TABLE ONLY {s}.p IN SHARE UPDATE EXCLUSIVE MODE;", user=attacker.name)
    # And the default partition, as ATTACH would next: a write-back that locked partitions
    # first waits for it, and never gets to wait for the parent.
    default = cluster.hold_open(f"BEGIN; LOCK TABLE {s}.p_default IN ACCESS EXCLUSIVE MODE;", user=attacker.name)
    try:
        attacker.sql(f"INSERT INTO {s}.p VALUES (2, 'x')")
        assert wait_for(lambda: cluster.sql(waiting) != "0", 60, every=0.005), \
            "the write-back never waited for the parent: it holds a partition first, and an ATTACH would deadlock with it"
    finally:
        default.close()
        held.close()
    wait_anchored(cluster, f"{s}.p", 2, timeout=60)
    assert_unprivileged(attacker)


def test_an_analyze_left_open_holds_no_partitioned_tables_write_back(cluster, attacker, make_role):
    """ATTACK (the database's owner, who may ANALYZE every table; an attacker helper of
    2026-12-07, on a008914): `BEGIN; ANALYZE victim.p;` left open keeps the victim's
    partitioned table SHARE UPDATE EXCLUSIVE, which the replica-mode write-back's close of the
    tree waits for: the victim's rows were not written back for as long as it stayed open. Now
    the delivery worker leaves such a tree to the slow lane, which writes it back in origin
    mode without closing it."""
    victim = make_role("victim")
    s = victim.schema
    victim.sql(f"""
        CREATE TABLE {s}.p (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
        CREATE TABLE {s}.p1 PARTITION OF {s}.p FOR VALUES FROM (0) TO (100);
        SELECT certyo.track('{s}.p');
        INSERT INTO {s}.p VALUES (1, 'a');""")
    wait_written_back(cluster, f"{s}.p", 1)
    cluster.sql(f"ALTER DATABASE postgres OWNER TO {attacker.name}")
    try:
        held = cluster.hold_open(f"BEGIN; ANALYZE {s}.p;", user=attacker.name)
        try:
            assert cluster.sql(f"SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE "
                               f"a.usename = '{attacker.name}' AND l.relation = '{s}.p'::regclass "
                               f"AND l.mode = 'ShareUpdateExclusiveLock' AND l.granted") == "1"
            victim.sql(f"INSERT INTO {s}.p VALUES (2, 'b')")
            wait_written_back(cluster, f"{s}.p", 2, timeout=60)
        finally:
            held.close()
    finally:
        cluster.sql("ALTER DATABASE postgres OWNER TO postgres")
    assert_unprivileged(attacker)


def test_a_cast_made_or_dropped_later_never_runs_in_replica_mode(cluster, attacker, make_role):
    """Attack (a review of 2026-12-06): the write-back keeps its plan, and reads record id parts
    back with `::type`. An enum key with no cast of the owner's: replica mode, planned with
    PostgreSQL's own cast; the owner then creates a cast from text (their function), or drops
    it after a write-back planned with it in origin mode, keeping the function. No plan or cast
    may ever run the owner's function in replica mode: a key of a type PostgreSQL did not ship
    is written back in origin mode, and a plan is kept per mode."""
    s = attacker.schema
    attacker.sql(replica_observer(s) + f"""
        CREATE TYPE {s}.k AS ENUM ('1', '2', '3', '4', '5', '6', '7', '8', '9');
        CREATE FUNCTION {s}.k_of(x text) RETURNS {s}.k LANGUAGE plpgsql AS $$
        BEGIN PERFORM {s}.note('cast');
              RETURN (SELECT e FROM unnest(enum_range(NULL::{s}.k)) e WHERE e::text = x); END $$;
    """)
    table = make_table(attacker, columns=f"id {s}.k PRIMARY KEY")
    cast = f"CREATE CAST (text AS {s}.k) WITH FUNCTION {s}.k_of(text) AS ASSIGNMENT"
    attacker.sql(cast)
    attacker.sql(f"INSERT INTO {table} (id) VALUES ('1'), ('2'), ('3')")
    wait_written_back(cluster, table, 3)
    attacker.sql(f"DROP CAST (text AS {s}.k)")
    attacker.sql(f"INSERT INTO {table} (id) VALUES ('4'), ('5'), ('6')")
    wait_written_back(cluster, table, 6)
    attacker.sql(cast)
    attacker.sql(f"INSERT INTO {table} (id) VALUES ('7'), ('8'), ('9')")
    wait_written_back(cluster, table, 9)
    seen = seen_modes(cluster, s)
    assert "replica" not in seen, f"the owner's cast ran in replica mode: {seen}"
    assert_unprivileged(attacker)


def test_an_identity_key_table_with_owner_code_is_written_back(cluster, attacker):
    """A table whose key is GENERATED ALWAYS AS IDENTITY and that has an ENABLE ALWAYS trigger
    (so its write-back runs in origin mode and names a business column for capture to watch):
    the watched column is never the identity, which may only be set to DEFAULT."""
    s = attacker.schema
    table = make_table(attacker, columns="id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text")
    attacker.sql(f"""
        CREATE FUNCTION {s}.noop() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
        CREATE TRIGGER noop AFTER UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION {s}.noop();
        ALTER TABLE {table} ENABLE ALWAYS TRIGGER noop;
        INSERT INTO {table} (v) VALUES ('a'), ('b');
    """)
    wait_anchored(cluster, table, 2)


def test_owner_code_writing_elsewhere_during_write_back_keeps_that_tables_rules(cluster, attacker, make_role):
    """Attack, as filed: an owner's ENABLE ALWAYS trigger writes into a table of another role
    during the write-back; that table's foreign key must hold and its capture must record
    the row (in replica mode both were skipped)."""
    s = attacker.schema
    victim = make_role("victim")
    v = victim.schema
    victim.sql(f"""
        CREATE TABLE {v}.parent (id int PRIMARY KEY);
        CREATE TABLE {v}.child (id serial PRIMARY KEY, parent int REFERENCES {v}.parent, note text);
        GRANT INSERT ON {v}.child TO {attacker.name};
        GRANT USAGE ON SEQUENCE {v}.child_id_seq TO {attacker.name};
        SELECT certyo.track('{v}.child');
    """)
    table = make_table(attacker)
    attacker.sql(f"""
        CREATE FUNCTION {s}.spill() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.certyo_record_hash IS DISTINCT FROM OLD.certyo_record_hash THEN
                BEGIN
                    INSERT INTO {v}.child (parent, note) VALUES (999, pg_catalog.current_setting('session_replication_role'));
                EXCEPTION WHEN foreign_key_violation THEN
                    INSERT INTO {v}.child (parent, note) VALUES (NULL, 'fk held');
                END;
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER spill AFTER UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION {s}.spill();
        ALTER TABLE {table} ENABLE ALWAYS TRIGGER spill;
    """)
    attacker.sql(f"INSERT INTO {table} (id) VALUES (1)")
    wait_anchored(cluster, table, 1)
    notes = cluster.sql(f"SELECT string_agg(DISTINCT coalesce(note, '-'), ',') FROM {v}.child")
    assert notes == "fk held", f"the other role's foreign key was skipped: {notes}"
    rows = int(cluster.sql(f"SELECT count(*) FROM {v}.child"))
    assert wait_for(lambda: cluster.sql(
        f"SELECT count(*) FROM {v}.child WHERE certyo_record_hash IS NOT NULL") == str(rows), 30), \
        "the rows the trigger wrote to the other role's table were never captured"


def test_a_trigger_that_changes_content_on_write_back_never_leaves_a_false_anchored(cluster, attacker, make_role):
    """Attack: a table with an ENABLE ALWAYS trigger (so its write-back runs the owner's
    triggers) and an ordinary BEFORE UPDATE trigger that stamps a business column on every
    update. The write-back would change the row's content while marking it with the hash of
    the version before: it is refused and recorded as a failing write-back naming the cause,
    and no row says anchored for content Certyo never saw."""
    s = attacker.schema
    table = make_table(attacker, columns="id int PRIMARY KEY, v text, stamped timestamptz")
    attacker.sql(f"""
        CREATE FUNCTION {s}.noop() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
        CREATE TRIGGER noop AFTER UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION {s}.noop();
        ALTER TABLE {table} ENABLE ALWAYS TRIGGER noop;
        CREATE FUNCTION {s}.stamp() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN NEW.stamped := pg_catalog.clock_timestamp(); RETURN NEW; END $$;
        CREATE TRIGGER stamp BEFORE UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION {s}.stamp();
    """)
    attacker.sql(f"INSERT INTO {table} (id) VALUES (1)")
    failure = f"SELECT error FROM certyo.write_back_failure WHERE relid = '{table}'::regclass"
    assert wait_for(lambda: "changed business columns" in cluster.sql(failure), 30), cluster.sql(failure)
    assert cluster.sql(f"SELECT count(*) FROM {table} WHERE certyo_anchor_status = 'anchored'") == "0"
    assert_delivered_meanwhile(cluster, make_role("bystander"))
    # Excluding the stamped column is the fix the error names: the write-back then goes through.
    attacker.sql(f"SELECT certyo.track('{table}', exclude_columns => ARRAY['stamped'])")
    attacker.sql(f"UPDATE {table} SET v = 'again' WHERE id = 1")
    wait_anchored(cluster, table, 1, timeout=60)


# ---------------------------------------------------------------------------------------------
# The extension's schema is its own


def test_create_extension_refuses_a_schema_another_role_made(cluster, make_role):
    """Attack: a database owner creates schema certyo before a superuser runs CREATE
    EXTENSION, which reused it; the owner could then rename it and plant look-alikes for the
    worker. CREATE EXTENSION refuses such a schema; an empty one a superuser made is fine."""
    owner = make_role("dbowner")
    database = f"{owner.name}_db"
    cluster.sql(f"CREATE DATABASE {database} OWNER {owner.name}")
    try:
        cluster.sql("CREATE SCHEMA certyo", user=owner.name, database=database)
        refused = cluster.attempt_verbose(f"\\c {database}\nCREATE EXTENSION certyo_cdc")
        assert refused.sqlstate == "42P06", refused
        assert "schema of its own" in refused.stderr, refused
        assert cluster.sql("SELECT count(*) FROM pg_extension WHERE extname = 'certyo_cdc'", database=database) == "0"
        # A superuser's own empty schema, CREATE granted to no one else: accepted (DROP
        # EXTENSION leaves such a schema behind, and CREATE EXTENSION must work again).
        cluster.sql("DROP SCHEMA certyo; CREATE SCHEMA certyo AUTHORIZATION postgres", database=database)
        cluster.sql("CREATE EXTENSION certyo_cdc", database=database)
        # CREATE granted to someone: refused.
        cluster.sql("DROP EXTENSION certyo_cdc; GRANT CREATE ON SCHEMA certyo TO PUBLIC",
                    database=database)
        refused = cluster.attempt_verbose(f"\\c {database}\nCREATE EXTENSION certyo_cdc")
        assert refused.sqlstate == "42P06", refused
    finally:
        cluster.sql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


# ---------------------------------------------------------------------------------------------
# Capture queues changes of tracked tables only; track() refuses what cannot be delivered right


def test_a_hand_made_capture_trigger_on_a_temp_table_queues_nothing(cluster, attacker):
    """Attack: any LOGIN role may execute certyo.capture() (CREATE TRIGGER needs it, and so
    does creating a partition of a tracked table), so a TEMP table with a hand-made capture
    trigger delivered records to Certyo. Capture refuses any table it does not track."""
    queued = "SELECT count(*) FROM certyo.queue"
    before = cluster.sql(queued)
    refused = attacker.attempt(f"""
        CREATE TEMP TABLE fake (id int PRIMARY KEY, v text);
        CREATE TRIGGER certyo_capture AFTER INSERT ON fake FOR EACH ROW EXECUTE FUNCTION certyo.capture('record_id=id');
        INSERT INTO fake SELECT g, 'forged' FROM generate_series(1, 200) g;
    """)
    assert refused.sqlstate == "39P01", refused
    assert "not a tracked table" in refused.stderr, refused
    assert cluster.sql(queued) == before
    s = attacker.schema
    refused = attacker.attempt(f"""
        CREATE TABLE {s}.fake (id int PRIMARY KEY, v text);
        CREATE TRIGGER sneaky AFTER INSERT ON {s}.fake FOR EACH ROW EXECUTE FUNCTION certyo.capture('record_id=id');
        INSERT INTO {s}.fake VALUES (1, 'forged');
    """)
    assert refused.sqlstate == "39P01", refused


@pytest.mark.parametrize("key", ["PRIMARY KEY DEFERRABLE", "PRIMARY KEY DEFERRABLE INITIALLY DEFERRED",
                                 "UNIQUE DEFERRABLE"])
def test_track_refuses_a_deferrable_key(cluster, attacker, key):
    """Attack: with a DEFERRABLE primary key, UPDATE ... SET id = 3 - id swaps two ids in one
    statement; capture sees delete 1, insert 2, delete 2, insert 1, and Certyo ends with
    record 2 deleted while row 2 exists. track() refuses a deferrable record key."""
    s = attacker.schema
    attacker.sql(f"CREATE TABLE {s}.d (id int NOT NULL {key}, v text)")
    options = "" if "PRIMARY" in key else ", record_id_columns => ARRAY['id']"
    refused = attacker.attempt(f"SELECT certyo.track('{s}.d'{options})")
    assert refused.sqlstate == "42P16", refused
    assert "DEFERRABLE" in refused.stderr, refused


def test_two_tables_never_share_a_collection(cluster, attacker, emulator):
    """Attack: "a.b".c and a."b.c" both became collection a.b.c, so each table's records
    overwrote the other's at Certyo. A name part holding a dot (or a quote) is quoted."""
    s = attacker.schema
    cluster.sql(f'CREATE SCHEMA "{s}.x" AUTHORIZATION {attacker.name}')
    attacker.sql(f"""
        CREATE TABLE "{s}.x".y (id int PRIMARY KEY, v text);
        CREATE TABLE {s}."x.y" (id int PRIMARY KEY, v text);
        SELECT certyo.track('"{s}.x".y');
        SELECT certyo.track('{s}."x.y"');
        INSERT INTO "{s}.x".y VALUES (1, 'first');
        INSERT INTO {s}."x.y" VALUES (1, 'second');
    """)
    wait_anchored(cluster, f'"{s}.x".y', 1)
    wait_anchored(cluster, f'{s}."x.y"', 1)
    collections = {r["collection"]: r["recordPayload"]["v"] for r in emulator.records()
                   if r["collection"].startswith((f'"{s}.x"', f"{s}."))}
    assert collections == {f'"{s}.x".y': "first", f'{s}."x.y"': "second"}, collections
    attacker.sql(f'DROP TABLE "{s}.x".y; DROP SCHEMA "{s}.x"')


def test_a_retyped_status_column_hides_no_forgery(cluster, attacker):
    """Attack: certyo_anchor_status retyped to varchar, then a row's status forged: the audit
    skipped the column and reported nothing (later, it refused to run). The retyping is refused
    now (42804), and the forgery found."""
    table = make_table(attacker, rows=2)
    wait_anchored(cluster, table, 2)
    refused = attacker.attempt(f"ALTER TABLE {table} ALTER COLUMN certyo_anchor_status TYPE varchar(20)")
    assert refused.sqlstate == "42804", refused
    assert "certyo_anchor_status" in refused.stderr, refused
    cluster.sql(f"UPDATE {table} SET certyo_anchor_status = 'anchored', certyo_record_hash = 'forged' WHERE id = 1")
    findings = cluster.sql(f"SELECT string_agg(record_id || ': ' || problem, ', ') FROM certyo.audit('{table}')")
    assert findings == "1: record hash changed without capture", findings


# ---------------------------------------------------------------------------------------------
# Backfill conditions


def test_a_condition_means_what_the_caller_meant_whatever_datestyle(cluster, attacker):
    """Attack: under DateStyle = 'SQL, DMY', '01/02/2026' is 1 February; the condition was
    stored as '01/02/2026'::date and the worker read it as 2 January: 1 row instead of 2."""
    s = attacker.schema
    table = make_table(attacker, columns="id int PRIMARY KEY, d date")
    attacker.sql(f"INSERT INTO {table} VALUES (1, '2026-01-15'), (2, '2026-02-01'), (3, '2026-02-10')")
    backfill = attacker.sql(f"SET DateStyle = 'SQL, DMY'; SELECT certyo.backfill('{table}', 'd >= ''01/02/2026''')"
                            ).splitlines()[-1]
    assert wait_backfill(cluster, backfill) == "done"
    assert cluster.sql(f"SELECT rows_queued FROM certyo.backfills WHERE id = {backfill}") == "2"
    stored = cluster.sql(f"SELECT where_clause FROM certyo.backfills WHERE id = {backfill}")
    assert "2026-02-01" in stored, stored


def test_a_huge_condition_is_refused_when_requested(cluster, attacker, make_role):
    """Attack: 200,000 ANDed comparisons kept the worker in the planner for about two minutes,
    deaf to its timeout and to pg_terminate_backend. A condition is bounded when requested."""
    table = make_table(attacker, rows=3)
    condition = " AND ".join(f"id <> {i}" for i in range(200_000))
    path = Path(f"/tmp/{attacker.name}-condition.sql")
    path.write_text(f"SELECT certyo.backfill('{table}', {literal(condition)});\n")
    path.chmod(0o644)
    refused = attacker.attempt(f"\\i {path}")
    path.unlink()
    assert refused.sqlstate == "54000", refused
    assert cluster.sql(f"SELECT count(*) FROM certyo.backfills WHERE relid = '{table}'::regclass") == "0"


def test_an_advisory_lock_taken_in_a_condition_ends_with_the_pass(cluster, attacker):
    """Attack: a condition that takes a session-level advisory lock: the worker kept holding
    it (another session waiting on that lock waited forever)."""
    table = make_table(attacker, rows=3)
    backfill = attacker.sql(f"SELECT certyo.backfill('{table}', 'pg_catalog.pg_advisory_lock(4242) IS NOT NULL')")
    assert wait_backfill(cluster, backfill) == "done"
    held = ("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND a.backend_type = 'certyo_cdc delivery'")
    assert wait_for(lambda: cluster.sql(held) == "0", 10), "the worker still holds the condition's advisory lock"
    assert cluster.sql("SELECT pg_try_advisory_lock(4242)") == "t"


def test_backfills_of_a_temp_table_or_too_many_are_refused(cluster, attacker):
    """Attack: 5,000 backfill requests of one temporary table were accepted. A temporary
    table is never tracked, and one table has at most 16 backfills open."""
    refused = attacker.attempt("CREATE TEMP TABLE tmp (id int PRIMARY KEY); SELECT certyo.backfill('tmp')")
    assert refused.sqlstate == "55000", refused
    table = make_table(attacker, rows=1)
    cluster.sql("SELECT certyo.pause()")
    try:
        refused = attacker.attempt(f"SELECT certyo.backfill('{table}') FROM generate_series(1, 17)")
        assert refused.sqlstate == "54000", refused
    finally:
        cluster.sql(f"UPDATE certyo.backfills SET state = 'cancelled' WHERE relid = '{table}'::regclass "
                    "AND state IN ('queued', 'running')")
        cluster.sql("SELECT certyo.resume()")


def test_a_table_renamed_onto_the_backfilled_name_is_not_read_as_it(cluster, attacker, make_role):
    """Attack: while a backfill chunk waits for the tracked table's lock, its owner renames
    it away and another table (other column types) onto its name, and commits: the worker read
    the other table's rows as the tracked one's (`datum attribute "v" ... does not match`) and
    exited. Now the table is locked by OID before its name is looked up."""
    s = attacker.schema
    table = make_table(attacker, rows=3, columns="id int PRIMARY KEY, v int")
    attacker.sql(f"CREATE TABLE {s}.impostor (id int PRIMARY KEY, v text); INSERT INTO {s}.impostor VALUES (1, 'imp')")
    pid = cluster.sql("SELECT pid FROM certyo.worker_status()")
    held = cluster.hold_open(f"BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE;", user=attacker.name)
    try:
        backfill = attacker.sql(f"SELECT certyo.backfill('{table}')")
        waiting = f"SELECT count(*) FROM pg_locks WHERE pid = {pid} AND NOT granted"
        assert wait_for(lambda: cluster.sql(waiting) != "0", 20, every=0.01), "the worker never waited for the table"
        held.process.stdin.write(f"ALTER TABLE {table} RENAME TO renamed; ALTER TABLE {s}.impostor RENAME TO t; COMMIT;\n")
        held.process.stdin.flush()
        assert wait_for(lambda: cluster.sql(f"SELECT count(*) FROM pg_class WHERE relname = 'renamed' "
                                            f"AND relnamespace = '{s}'::regnamespace") == "1", 10)
    finally:
        held.close()
    state = wait_backfill(cluster, backfill, timeout=60)
    assert state == "done", cluster.sql(f"SELECT error FROM certyo.backfills WHERE id = {backfill}")
    assert cluster.sql("SELECT pid FROM certyo.worker_status()") == pid, "the worker exited"
    assert cluster.sql(f"SELECT rows_queued FROM certyo.backfills WHERE id = {backfill}") == "3"
    assert_delivered_meanwhile(cluster, make_role("bystander"))


# ---------------------------------------------------------------------------------------------
# One owner's slow code delays that owner's tables only


def write_back_trigger_tables(attacker, n, name, body):
    """n tracked tables of the attacker (NAME0, NAME1, ...) whose ENABLE ALWAYS trigger runs
    `body` (PL/pgSQL) in every write-back, and only there."""
    s = attacker.schema
    attacker.sql(f"""
        CREATE FUNCTION {s}.{name}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.certyo_record_hash IS DISTINCT FROM OLD.certyo_record_hash THEN
                {body}
            END IF;
            RETURN NEW;
        END $$;
    """)
    tables = []
    for i in range(n):
        table = make_table(attacker, name=f"{name}{i}")
        attacker.sql(f"CREATE TRIGGER {name} BEFORE UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION {s}.{name}(); "
                     f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {name}")
        tables.append(table)
    return tables


def slow_tables(attacker, n, seconds):
    """Tables whose write-back trigger sleeps `seconds`."""
    return write_back_trigger_tables(attacker, n, "slow", f"PERFORM pg_catalog.pg_sleep({seconds});")


# PL/pgSQL that runs forever, catching every cancellation (the statement timeout's too).
FOREVER = """
                LOOP
                    BEGIN
                        PERFORM pg_catalog.pg_sleep(0.05);
                    EXCEPTION WHEN query_canceled OR others THEN
                        NULL;
                    END;
                END LOOP;"""


def stubborn_tables(attacker, n):
    """Tables whose write-back trigger loops forever, catching every cancellation."""
    return write_back_trigger_tables(attacker, n, "stubborn", FOREVER)


def accepted_latencies(cluster, table):
    """Seconds from each row's commit (its queue entry) to Certyo's acceptance."""
    out = cluster.sql(f"SELECT extract(epoch FROM accepted_at - queued_at) FROM certyo.receipt "
                      f"WHERE relid = '{table}'::regclass ORDER BY 1")
    return [float(x) for x in out.splitlines() if x]


def test_slow_owner_code_runs_in_the_slow_lane_while_others_are_delivered(cluster, attacker, make_role):
    """Attack: 10 tables whose ENABLE ALWAYS triggers take 4.5 s in each write-back, each
    statement under certyo.user_code_timeout (5 s). One worker ran them one after another and
    sent nothing meanwhile: another role's commit-to-accepted went from 0.0 s to 34.9 s on
    average. Now an owner's code runs at most its share of the delivery worker's pass (250 ms),
    the rest in the slow lane: while the slow lane sleeps in an attacker's trigger, another
    role's changes are accepted and written back, and the attacker's rows are written back in
    the end too."""
    tables = slow_tables(attacker, 10, 4.5)
    for i, table in enumerate(tables):
        attacker.sql(f"INSERT INTO {table} (id) VALUES ({i})")
    sleeping = ("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'certyo_cdc slow lane' "
                "AND wait_event = 'PgSleep'")
    assert wait_for(lambda: cluster.sql(sleeping) == "1", 30, every=0.05), "the slow lane never ran the triggers"
    bystander = make_role("bystander")
    table = make_table(bystander, name="fast")
    for i in range(1, 6):
        bystander.sql(f"INSERT INTO {table} (id) VALUES ({i})")
    wait_written_back(cluster, table, 5, timeout=30)
    delivery_sleeping = ("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'certyo_cdc delivery' "
                         "AND wait_event = 'PgSleep'")
    assert cluster.sql(delivery_sleeping) == "0", "the delivery worker itself ran an attacker's trigger to its end"
    latencies = accepted_latencies(cluster, table)
    assert max(latencies) < 4.5, f"a bystander's change waited for an attacker's trigger: {latencies}"
    for t in tables:
        wait_written_back(cluster, t, 1, timeout=120)


def test_a_slow_owner_has_a_lane_of_their_own(cluster, attacker, make_role):
    """Attack (an attacker pass of 2026-12-06): one owner's tables whose ENABLE ALWAYS triggers
    take seconds in each write-back held up, in the one slow lane, every other owner's
    write-backs that run their own code: their rows waited 38 s (p50) for their hash. Now an
    owner whose code has taken 2 s of the lanes lately has a lane of their own: another owner's
    tables with triggers are written back by the slow lane while the slow owner's trigger
    sleeps in theirs."""
    import threading
    tables = slow_tables(attacker, 3, 3)
    stop = threading.Event()

    errors = []

    def keep_busy():
        n = 0
        try:
            while not stop.is_set():
                n += 1
                for t in tables:
                    attacker.sql(f"INSERT INTO {t} (id) VALUES ({n})")
                stop.wait(1)
        except Exception as e:  # noqa: BLE001 (reported by the test)
            errors.append(e)

    busy = threading.Thread(target=keep_busy)
    busy.start()
    try:
        own_lane = ("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'certyo_cdc slow owners'' lane' "
                    "AND wait_event = 'PgSleep'")
        assert wait_for(lambda: cluster.sql(own_lane) == "1", 60, every=0.05), \
            f"the slow owner never got a lane of their own\n{cluster.explain()}"
        bystander = make_role("bystander")
        cluster.sql(f"GRANT pg_read_all_stats TO {bystander.name}")
        b = bystander.schema
        table = make_table(bystander, name="watched")
        bystander.sql(f"""
            CREATE TABLE {b}.seen (id int, lane text, attacker_asleep boolean);
            CREATE FUNCTION {b}.seen() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.certyo_record_hash IS DISTINCT FROM OLD.certyo_record_hash THEN
                    INSERT INTO {b}.seen
                    SELECT NEW.id,
                           (SELECT backend_type FROM pg_catalog.pg_stat_activity WHERE pid = pg_catalog.pg_backend_pid()),
                           EXISTS (SELECT FROM pg_catalog.pg_stat_activity
                                    WHERE backend_type = 'certyo_cdc slow owners'' lane' AND wait_event = 'PgSleep');
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER seen AFTER UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION {b}.seen();
            ALTER TABLE {table} ENABLE ALWAYS TRIGGER seen;
        """)
        for i in range(1, 6):
            # Each while the slow owner's trigger sleeps in their lane.
            assert wait_for(lambda: cluster.sql(own_lane) == "1", 30, every=0.02)
            bystander.sql(f"INSERT INTO {table} (id) VALUES ({i})")
            wait_written_back(cluster, table, i, timeout=30)
        assert not errors, f"the slow owner's load stopped: {errors}"
        seen = cluster.sql(f"SELECT lane, attacker_asleep FROM {b}.seen ORDER BY id").splitlines()
        assert all(line.startswith("certyo_cdc slow lane|") for line in seen), seen
        assert any(line.endswith("|t") for line in seen), \
            f"no write-back of the bystander ran while the slow owner's trigger ran: {seen}"
        cluster.sql(f"REVOKE pg_read_all_stats FROM {bystander.name}")  # granted by the test itself
    finally:
        stop.set()
        busy.join()
    for t in tables:
        attacker.sql(f"DROP TABLE {t}")


IN_OWNER_CODE = ("SELECT pid FROM pg_stat_activity WHERE backend_type = '{kind}' AND wait_event = 'PgSleep'")


def test_owner_code_that_catches_its_cancellation_cannot_hold_delivery(cluster, attacker, make_role):
    """Attack (an attacker pass of 2026-12-06): a write-back trigger that loops forever, catching
    `query_canceled`. The 250 ms share and certyo.user_code_timeout cancel it, it catches both:
    the delivery worker ran it for good, and no other table was delivered again. Now the
    delivery worker runs no owner's code (the slow lane writes such tables back), and the lane
    ends itself a second after the cancellation (FATAL, which no code catches); a new lane
    retries the table with back-off, further and further apart; another role's changes are
    delivered and written back meanwhile."""
    tables = stubborn_tables(attacker, 2)
    offset = cluster.log_size()
    for i, table in enumerate(tables):
        attacker.sql(f"INSERT INTO {table} (id) VALUES ({i})")
    failing = ("SELECT count(*) FROM certyo.write_back_failure WHERE error LIKE '%hard limit%' AND relid IN "
               f"({', '.join(literal(t) + '::regclass' for t in tables)})")
    assert wait_for(lambda: cluster.sql(failing) == "2", 90), \
        f"no write-back was ended at its hard limit\n{cluster.explain()}"
    bystander = make_role("bystander")
    table = make_table(bystander, name="served")
    for i in range(1, 6):
        bystander.sql(f"INSERT INTO {table} (id) VALUES ({i})")
    wait_written_back(cluster, table, 5, timeout=60)
    wait_anchored(cluster, table, 5, timeout=120)
    log = cluster.log_since(offset)
    assert "hard limit" in log, "the log does not say why the worker ended"
    # Ended again and again, but with back-off: not once a second.
    ended = log.count("due to administrator command")
    assert 1 <= ended <= 20, f"{ended} ends of the worker or lane"
    status = cluster.sql("SELECT state || ': ' || detail FROM certyo.worker_status()")
    assert "hard limit" in status or "write-back" in status, status
    for t in tables:
        assert cluster.sql(f"SELECT count(*) FROM {t} WHERE certyo_record_hash IS NOT NULL") == "0"
    for t in tables:
        attacker.sql(f"DROP TABLE {t}")


def test_a_backfill_condition_that_catches_its_cancellation_fails_its_backfill(cluster, attacker, make_role):
    """Attack (the same pass): a backfill whose condition loops forever catching
    `query_canceled`. Now the slow lane ends itself a second after the cancellation; the
    backfill fails, naming why, and another role's backfill is done."""
    s = attacker.schema
    attacker.sql(f"""
        CREATE FUNCTION {s}.forever(int) RETURNS boolean LANGUAGE plpgsql AS $$
        BEGIN
            {FOREVER}
        END $$;
    """)
    table = make_table(attacker, name="endless", rows=3)
    backfill = attacker.sql(f"SELECT certyo.backfill('{table}', '{s}.forever(id)')")
    assert wait_backfill(cluster, backfill, 90) == "failed", cluster.explain()
    error = cluster.sql(f"SELECT error FROM certyo.backfills WHERE id = {backfill}")
    assert "hard limit" in error and "catch" in error, error
    bystander = make_role("bystander")
    theirs = make_table(bystander, name="filled", rows=4, track=False)
    bystander.sql(f"SELECT certyo.track('{theirs}')")
    done = bystander.sql(f"SELECT certyo.backfill('{theirs}')")
    assert wait_backfill(cluster, done, 60) == "done", cluster.explain()
    wait_written_back(cluster, theirs, 4, timeout=60)


def test_sigterm_and_fast_shutdown_end_owner_code_that_catches_cancellation(cluster, attacker, watch):
    """Attack (the same pass): with certyo.user_code_timeout at an hour, a write-back trigger
    that loops catching `query_canceled` kept the slow lane through pg_terminate_backend (pgrx's
    SIGTERM handler only sets a flag for the main loop) and `pg_ctl stop -m fast` never ended.
    Now SIGTERM ends owners' code as it ends a backend's statement."""
    cluster.sql("ALTER SYSTEM SET certyo.user_code_timeout = '1h'")
    cluster.sql("SELECT pg_reload_conf()")
    try:
        tables = stubborn_tables(attacker, 1)
        attacker.sql(f"INSERT INTO {tables[0]} (id) VALUES (1)")
        lane = IN_OWNER_CODE.format(kind="certyo_cdc slow lane")
        pid = wait_for(lambda: cluster.sql(lane), 60, every=0.1)
        assert pid, f"the slow lane never ran the trigger\n{cluster.explain()}"
        cluster.sql(f"SELECT pg_terminate_backend({pid})")
        gone = f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"
        assert wait_for(lambda: cluster.sql(gone) == "0", 10, every=0.1), "pg_terminate_backend did not end the lane"
        # The next lane runs it again (SIGTERM is no reason to hold back); a fast shutdown ends it.
        assert wait_for(lambda: cluster.sql(lane), 60, every=0.1), f"no lane ran the trigger again\n{cluster.explain()}"
        started = time.monotonic()
        cluster.stop()
        took = time.monotonic() - started
        cluster.start()
        assert not watch.restarted_on_purpose(), "the server crashed on the way down"
        assert took < 15, f"a fast shutdown took {took:.1f} s"
    finally:
        cluster.sql("ALTER SYSTEM RESET certyo.user_code_timeout")
        cluster.sql("SELECT pg_reload_conf()")
        # A lane that started the trigger under the hour-long limit keeps it until SIGTERM.
        cluster.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'certyo_cdc slow lane'")
        for t in cluster.sql(f"SELECT oid::regclass FROM pg_class WHERE relname LIKE 'stubborn%' AND relkind = 'r' "
                             f"AND relnamespace = '{attacker.schema}'::regnamespace").splitlines():
            attacker.sql(f"DROP TABLE {t}")


def test_with_no_slot_for_a_lane_owner_code_write_backs_and_backfills_wait(emulator):
    """Review finding (2026-12-06): with every background worker slot taken, the delivery
    worker did the slow lane's retries itself, found that a table's UPDATE runs its owner's
    code (which it never runs), and recorded the receipts as written back all the same: rows
    kept an earlier version's hash. Now they wait, and are written back once a lane can start.
    So do backfills: the worker ran their chunks itself, an owner's condition in the process
    that delivers every table (one that catches its cancellation ended it at the hard limit)."""
    directory = DIR + "-no-slot"
    # The launcher, the delivery worker and the logical replication launcher: no slot is left.
    cluster = Cluster(directory, free_port(), emulator.url, SETTINGS + "\nmax_worker_processes = 3\n")
    try:
        cluster.sql("CREATE EXTENSION certyo_cdc")
        assert wait_for(lambda: cluster.sql("SELECT running FROM certyo.worker_status()") == "t", 30)
        cluster.sql("""
            CREATE TABLE t (id int PRIMARY KEY, v text);
            SELECT certyo.track('t');
            CREATE FUNCTION trg() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
            CREATE TRIGGER watch BEFORE UPDATE ON t FOR EACH ROW EXECUTE FUNCTION trg();
            ALTER TABLE t ENABLE ALWAYS TRIGGER watch;
            INSERT INTO t (id, v) SELECT g, 'a' FROM generate_series(1, 3) g;
        """)
        receipts = "SELECT count(*) FROM certyo.receipt WHERE relid = 't'::regclass"
        assert wait_for(lambda: cluster.sql(receipts) == "3", 30), cluster.explain()
        # Passes of the worker go by: nothing is written back, and nothing says it was.
        passes = int(cluster.sql("SELECT passes FROM certyo.worker_status()"))
        assert wait_for(lambda: int(cluster.sql("SELECT passes FROM certyo.worker_status()")) > passes + 10, 30)
        assert cluster.sql("SELECT count(*) FROM t WHERE certyo_record_hash IS NOT NULL") == "0"
        assert cluster.sql("SELECT count(*) FROM certyo.receipt WHERE relid = 't'::regclass AND written_back") == "0"
        assert "no background worker slot" in cluster.log()
        status = "SELECT detail FROM certyo.worker_status()"
        assert wait_for(lambda: "no background worker slot" in cluster.sql(status), 30), cluster.sql(status)
        backfill = cluster.sql("SELECT certyo.backfill('t')")
        passes = int(cluster.sql("SELECT passes FROM certyo.worker_status()"))
        assert wait_for(lambda: int(cluster.sql("SELECT passes FROM certyo.worker_status()")) > passes + 10, 30)
        assert cluster.sql(f"SELECT state, rows_queued FROM certyo.backfills WHERE id = {backfill}") == "queued|0", \
            "the delivery worker ran the backfill's chunk itself"
        # With slots again, a lane writes them back, and runs the backfill.
        with open(f"{directory}/data/postgresql.conf", "a") as conf:
            conf.write("\nmax_worker_processes = 8\n")
        cluster.stop()
        cluster.start()
        written = "SELECT count(*) FROM t WHERE certyo_record_hash IS NOT NULL"
        assert wait_for(lambda: cluster.sql(written) == "3", 60), cluster.explain()
        assert wait_for(lambda: cluster.sql(f"SELECT state FROM certyo.backfills WHERE id = {backfill}") == "done", 60)
        assert not any(sign in cluster.log() for sign in ("terminated by signal", "PANIC:"))
    finally:
        try:
            cluster.stop()
        except Exception:
            pass


def test_a_cast_on_the_key_type_of_another_roles_table_never_runs(cluster, attacker):
    """Attack (an attacker pass of 2026-12-06): a role owns an enum type and creates casts
    between text and it, with functions of its own; a superuser's table is keyed by that type.
    The write-back read record id parts back with `::type` and the backfill wrote keys out with
    `::text`, both as the table's owner: the slow lane ran the role's cast as the superuser,
    and the role made itself one. Now no cast runs at all (the types' own input and output
    functions are called), and a key of another role's enum is refused outright (its owner may
    rename labels, see test_record_keys.py). The role's own table keyed by its own enum, with
    its casts made before and anew while plans are kept, is written back and backfilled, and
    the casts never run."""
    s = attacker.schema
    casts = f"""
        CREATE CAST (text AS {s}.e) WITH FUNCTION {s}.in_(text);
        CREATE CAST ({s}.e AS text) WITH FUNCTION {s}.out_({s}.e);
        CREATE CAST (varchar AS {s}.e) WITH FUNCTION {s}.in_(text) AS IMPLICIT;
    """
    attacker.sql(f"""
        CREATE TYPE {s}.e AS ENUM ('a', 'b', 'c', 'd', 'e', 'f');
        CREATE TABLE {s}.called (who name);
        GRANT INSERT ON {s}.called TO PUBLIC;
        CREATE FUNCTION {s}.in_(t text) RETURNS {s}.e LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO {s}.called VALUES (current_user); PERFORM {s}.pwn('text-cast');
              RETURN pg_catalog.enum_in(t::cstring, '{s}.e'::regtype); END $$;
        CREATE FUNCTION {s}.out_(v {s}.e) RETURNS text LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO {s}.called VALUES (current_user); PERFORM {s}.pwn('type-cast');
              RETURN pg_catalog.enum_out(v)::text; END $$;
    """ + casts)
    theirs = f"public.keyed_by_{s}"
    cluster.sql(f"CREATE TABLE {theirs} (id {s}.e PRIMARY KEY, v text)")
    refused = cluster.sql(f"SELECT certyo.track('{theirs}')", check=False)
    assert cluster.sql(f"SELECT count(*) FROM pg_trigger WHERE tgrelid = '{theirs}'::regclass") == "0", \
        f"a superuser's table keyed by another role's enum was tracked: {refused}"
    cluster.sql(f"DROP TABLE {theirs}")
    table = f"{s}.keyed"
    attacker.sql(f"CREATE TABLE {table} (id {s}.e PRIMARY KEY, v text); SELECT certyo.track('{table}'); "
                 f"INSERT INTO {table} VALUES ('a', 'x'), ('b', 'y')")
    wait_written_back(cluster, table, 2)
    # Made anew while the write-back's plan is kept, between two write-backs.
    attacker.sql(f"DROP CAST (text AS {s}.e); DROP CAST ({s}.e AS text); DROP CAST (varchar AS {s}.e)")
    attacker.sql(f"INSERT INTO {table} VALUES ('c', 'z')")
    wait_written_back(cluster, table, 3)
    attacker.sql(casts)
    attacker.sql(f"INSERT INTO {table} VALUES ('d', 'z'), ('e', 'z'), ('f', 'z')")
    wait_written_back(cluster, table, 6)
    backfill = attacker.sql(f"SELECT certyo.backfill('{table}')")
    assert wait_backfill(cluster, backfill) == "done", cluster.explain()
    assert cluster.sql(f"SELECT rows_queued FROM certyo.backfills WHERE id = {backfill}") == "6"
    assert cluster.sql(f"SELECT count(*) FROM {s}.called") == "0", "the role's cast ran"
    assert_unprivileged(attacker)
    attacker.sql(f"DROP TABLE {table}")
