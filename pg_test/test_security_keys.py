"""Record keys read back: the worker reads each record id's parts back into the key's types (to
find the row for its write-back, and a backfill's place between chunks) and compares them. It
does so with the types' own input and output functions and operator classes, never with a cast,
a domain's checks, or an operator resolved by name, and with the settings text depends on
pinned. Each test is an attack of an attacker pass of 2026-12-06; same fixtures and after-test
checks as test_security.py (conftest.py)."""
import subprocess

from harness import wait_for
from test_security import (assert_unprivileged, make_table, superuser_runs, wait_backfill,
                           wait_written_back)


def test_a_domain_check_added_to_the_key_type_of_a_superusers_table_never_runs_as_the_superuser(cluster, attacker):
    """A role owns a domain; a superuser's table is keyed by it and lets the role INSERT. The
    role then adds a CHECK to its domain (`ALTER DOMAIN ... ADD CONSTRAINT ... NOT VALID`, which
    only the domain's owner may do, at any time) calling its own function, and inserts a row.
    The write-back read the record id back with the domain's input function, which evaluates
    the domain's checks, as the table's owner: the role's function ran as the superuser and
    made the role one. Now a domain key is read as its base type (the value passed the checks
    when it was written), and the rows are written back."""
    s = attacker.schema
    attacker.sql(f"CREATE DOMAIN {s}.d AS int CHECK (VALUE > 0)")
    table = f"public.domain_keyed_by_{s}"
    cluster.sql(f"CREATE TABLE {table} (id {s}.d PRIMARY KEY, v text); SELECT certyo.track('{table}'); "
                f"GRANT INSERT ON {table} TO {attacker.name}; INSERT INTO {table} VALUES (1, 'x')")
    wait_written_back(cluster, table, 1)
    attacker.sql(f"ALTER DOMAIN {s}.d ADD CONSTRAINT later CHECK ({s}.pwn('domain-check')) NOT VALID")
    attacker.sql(f"INSERT INTO {table} VALUES (2, 'y')")
    wait_written_back(cluster, table, 2)
    backfill = cluster.sql(f"SELECT certyo.backfill('{table}')")
    assert wait_backfill(cluster, backfill) == "done", cluster.explain()
    assert superuser_runs(attacker) == [], f"the domain's check ran as the superuser: {attacker.log()}"
    assert_unprivileged(attacker)
    cluster.sql(f"DROP TABLE {table}")


def test_a_key_whose_type_holds_another_roles_domain_is_refused(cluster, attacker):
    """The same, one step removed: a range type over the role's domain reads its bounds with
    the domain's input function, checks included. track() refuses such a key, saying why."""
    s = attacker.schema
    attacker.sql(f"CREATE DOMAIN {s}.d AS int CHECK (VALUE > 0); GRANT USAGE ON DOMAIN {s}.d TO PUBLIC")
    table = f"public.range_keyed_by_{s}"
    cluster.sql(f"CREATE TYPE public.r_{s} AS RANGE (subtype = {s}.d); "
                f"CREATE TABLE {table} (id public.r_{s} PRIMARY KEY, v text)")
    try:
        refused = subprocess.run(["psql", "-h", cluster.dir, "-p", str(cluster.port), "-U", "postgres", "-X", "-qAt",
                                  "-v", "VERBOSITY=verbose", "-c", f"SELECT certyo.track('{table}')"],
                                 capture_output=True, text=True)
        assert refused.returncode != 0 and "holds a domain" in refused.stderr, refused.stderr
        assert superuser_runs(attacker) == []
    finally:
        cluster.sql(f"DROP TABLE {table}; DROP TYPE public.r_{s}")


def test_a_backfill_of_a_citext_keyed_table_queues_every_row(cluster, attacker):
    """A table keyed by citext in mixed case. The chunk query ordered by citext's (case-
    insensitive) operator class but found the rows after the last key with `>` resolved on the
    worker's pinned search_path, where citext's operators are not: text's, case-sensitive. The
    backfill said `done` having queued 625 of 1,000 rows. Now `>` is the type's own."""
    cluster.sql("CREATE EXTENSION IF NOT EXISTS citext")
    try:
        s = attacker.schema
        table = f"{s}.users"
        attacker.sql(f"""
            CREATE TABLE {table} (email public.citext PRIMARY KEY, name text);
            INSERT INTO {table} SELECT CASE WHEN g % 2 = 0 THEN 'User' ELSE 'user' END || g || '@example.com', 'n'
              FROM generate_series(1, 1000) g;
            SELECT certyo.track('{table}');
        """)
        backfill = attacker.sql(f"SELECT certyo.backfill('{table}')")
        assert wait_backfill(cluster, backfill, 60) == "done", cluster.explain()
        queued = cluster.sql(f"SELECT rows_queued FROM certyo.backfills WHERE id = {backfill}")
        assert queued == "1000", f"the backfill queued {queued} of 1000 rows and says done"
        wait_written_back(cluster, table, 1000, timeout=120)
        attacker.sql(f"DROP TABLE {table}")
    finally:
        cluster.sql("DROP EXTENSION IF EXISTS citext CASCADE")


def test_a_table_keyed_by_an_extension_type_is_written_back_and_backfilled(cluster, attacker):
    """A table keyed by ltree, whose operators live in the extension's schema: every
    write-back failed, forever ("operator does not exist: public.ltree = public.ltree"), and so
    did its backfill. Now the type's own operators are named, schema and all. A two-column key
    of it pages through the table by the type's order too."""
    cluster.sql("CREATE EXTENSION IF NOT EXISTS ltree")
    try:
        s = attacker.schema
        table = f"{s}.paths"
        attacker.sql(f"CREATE TABLE {table} (id public.ltree, n int, v text, PRIMARY KEY (id, n)); "
                     f"SELECT certyo.track('{table}')")
        attacker.sql(f"INSERT INTO {table} VALUES ('a.b', 1, '1'), ('a.c', 1, '2'), ('b', 2, '3')")
        wait_written_back(cluster, table, 3)
        attacker.sql(f"INSERT INTO {table} SELECT ('x.' || g)::public.ltree, g % 3, 'v' FROM generate_series(1, 250) g")
        backfill = attacker.sql(f"SELECT certyo.backfill('{table}')")
        assert wait_backfill(cluster, backfill) == "done", \
            cluster.sql(f"SELECT error FROM certyo.backfills WHERE id = {backfill}")
        assert cluster.sql(f"SELECT rows_queued FROM certyo.backfills WHERE id = {backfill}") == "253"
        attacker.sql(f"DROP TABLE {table}")
    finally:
        cluster.sql("DROP EXTENSION IF EXISTS ltree CASCADE")


def test_a_writer_cannot_block_the_write_back_of_a_table_keyed_by_an_object_identifier(cluster, attacker, make_role):
    """A role allowed only to INSERT into someone else's table keyed by regclass adds a row
    naming a table of its own, then drops that table. The record id is the name; reading it
    back failed ("relation ... does not exist"), and with it the write-back of the whole
    table, the owner's rows too, forever. Now that one version is left out (no row can hold
    it), and the others are written back."""
    owner = make_role("owner")
    s = owner.schema
    table = f"{s}.registry"
    owner.sql(f"""
        CREATE TABLE {table} (rel regclass PRIMARY KEY, v text); SELECT certyo.track('{table}');
        GRANT USAGE ON SCHEMA {s} TO {attacker.name}; GRANT INSERT ON {table} TO {attacker.name};
    """)
    a = attacker.schema
    cluster.sql("SELECT certyo.pause()")  # one batch: the owner's rows and the attacker's together
    try:
        owner.sql(f"INSERT INTO {table} VALUES ('pg_class', 'v1')")
        attacker.sql(f"CREATE TABLE {a}.gone (); INSERT INTO {table} VALUES ('{a}.gone', 'x'); DROP TABLE {a}.gone")
        owner.sql(f"INSERT INTO {table} VALUES ('pg_type', 'v2'), ('pg_proc', 'v3')")
    finally:
        cluster.sql("SELECT certyo.resume()")
    written = f"SELECT count(*) FROM {table} WHERE certyo_record_hash IS NOT NULL AND rel::oid < 16384"
    assert wait_for(lambda: cluster.sql(written) == "3", 30), \
        cluster.sql(f"SELECT error FROM certyo.write_back_failure WHERE relid = '{table}'::regclass")
    owner.sql(f"DROP TABLE {table}")


def test_a_database_setting_cannot_make_a_backfill_skip_rows(cluster, attacker):
    """The database's owner sets extra_float_digits = -15 (`ALTER DATABASE ... SET`). The
    lanes take the database's settings when they start, and the backfill wrote its place out
    with the key type's output function under them: 1.5 printed as "2", and the next chunk
    started after 2. The backfill of a float-keyed table said `done` having queued 110 of 210
    rows. Now the settings text depends on are pinned around every read and write of a key."""
    s = attacker.schema
    table = f"{s}.measures"
    attacker.sql(f"""
        CREATE TABLE {table} (k float8 PRIMARY KEY, v text);
        INSERT INTO {table} SELECT 1.0 + g * 0.005, 'a' FROM generate_series(1, 200) g;
        INSERT INTO {table} SELECT 2.0 + g, 'b' FROM generate_series(1, 10) g;
        SELECT certyo.track('{table}');
    """)
    cluster.sql("ALTER DATABASE postgres SET extra_float_digits = -15")
    try:
        # A lane started from now on has the database's setting.
        cluster.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type LIKE 'certyo_cdc slow%'")
        backfill = attacker.sql(f"SELECT certyo.backfill('{table}')")
        state = wait_backfill(cluster, backfill, 60)
        queued = cluster.sql(f"SELECT rows_queued FROM certyo.backfills WHERE id = {backfill}")
        assert (state, queued) == ("done", "210"), f"the backfill is {state} having queued {queued} of 210 rows"
    finally:
        cluster.sql("ALTER DATABASE postgres RESET extra_float_digits")
