"""Record keys read back: the worker reads each record id's parts back into the key's types (to
find the row for its write-back, and a backfill's place between chunks) and compares them. It
does so with the types' own input and output functions and operator classes, never with a cast,
a domain's checks, or an operator resolved by name, and with the settings text depends on
pinned. Each test is an attack of an attacker pass of 2026-12-06; same fixtures and after-test
checks as the other security suites (pg_test/conftest.py)."""
import subprocess

import pytest

from harness import wait_for
from helpers import (assert_unprivileged, make_table, superuser_runs, wait_backfill,
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


def refused_to_track(cluster, role, table):
    """The error track() gives `role` for `table` (stderr), or fails the test if it tracks it."""
    out = subprocess.run(["psql", "-h", cluster.dir, "-p", str(cluster.port), "-U", role, "-d", "postgres", "-X", "-qAt",
                          "-c", f"SELECT certyo.track('{table}')"], capture_output=True, text=True)
    assert out.returncode != 0, f"track() took {table}"
    return out.stderr


def test_a_key_that_is_a_name_someone_may_rename_is_refused(cluster, attacker, make_role):
    """Two attacks of names read back. (1) A role allowed only to INSERT into a table keyed by
    regclass adds rows naming two tables of its own and swaps their names before the write-back:
    each row read back as the other and took its hash, both marked `anchored`; a name of a
    table dropped since blocked the write-back of the whole table, forever. (2) The owner of an
    enum that another owner's table is keyed by swaps two labels (ALTER TYPE ... RENAME VALUE):
    the same crossed hashes. Now track() refuses a key of an object identifier type, or of
    another role's enum, and says why."""
    owner = make_role("owner")
    s, a = owner.schema, attacker.schema
    owner.sql(f"CREATE TABLE {s}.registry (rel regclass PRIMARY KEY, v text)")
    assert "names of database objects" in refused_to_track(cluster, owner.name, f"{s}.registry")
    attacker.sql(f"CREATE TYPE {a}.color AS ENUM ('red', 'blue'); GRANT USAGE ON TYPE {a}.color TO PUBLIC")
    owner.sql(f"CREATE TABLE {s}.paint (c {a}.color PRIMARY KEY, v text)")
    assert "enum of another role" in refused_to_track(cluster, owner.name, f"{s}.paint")
    # An enum of the table's own owner is the owner's to rename: accepted.
    owner.sql(f"CREATE TYPE {s}.size AS ENUM ('s', 'm'); CREATE TABLE {s}.shirts (z {s}.size PRIMARY KEY); "
              f"SELECT certyo.track('{s}.shirts'); INSERT INTO {s}.shirts VALUES ('s'), ('m')")
    wait_written_back(cluster, f"{s}.shirts", 2)


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


def test_a_backfill_of_a_key_collated_unlike_the_database_completes(cluster, attacker):
    """A text key with COLLATE "und-x-icu" in a C.UTF-8 database. Chunks page in the column's
    order, but the check that a chunk ended past the one before compared the two keys as
    parameters, in the database's collation: 'B143' is not after 'a53' there, and the backfill
    failed ("made no progress") after its first chunk. Values read from record ids are now
    compared in the column's collation."""
    table = f"{attacker.schema}.words"
    attacker.sql(f"""
        CREATE TABLE {table} (k text COLLATE "und-x-icu" PRIMARY KEY, v text);
        INSERT INTO {table} SELECT 'a' || g, 'x' FROM generate_series(1, 150) g;
        INSERT INTO {table} SELECT 'B' || g, 'x' FROM generate_series(1, 150) g;
        SELECT certyo.track('{table}');
    """)
    backfill = attacker.sql(f"SELECT certyo.backfill('{table}')")
    wait_backfill(cluster, backfill, 60)
    found = cluster.sql(f"SELECT state, rows_queued, error FROM certyo.backfills WHERE id = {backfill}")
    assert found == "done|300|", found
    attacker.sql(f"DROP TABLE {table}")


def test_a_key_unique_only_in_another_order_is_refused(cluster, attacker):
    """A citext key made unique by a case-sensitive index (`email text_ops`): 'user1' and
    'USER1' are two rows, equal in citext's order, which a backfill pages by. A chunk that
    ended on one of them began the next after it, skipping the other: the backfill said `done`
    having queued 600 of 601 rows. Now track() wants a unique index in the key type's own
    order and the column's collation."""
    cluster.sql("CREATE EXTENSION IF NOT EXISTS citext")
    try:
        table = f"{attacker.schema}.users"
        attacker.sql(f"CREATE TABLE {table} (email public.citext NOT NULL, v text); "
                     f"CREATE UNIQUE INDEX ON {table} (email text_ops)")
        out = subprocess.run(["psql", "-h", cluster.dir, "-p", str(cluster.port), "-U", attacker.name, "-d", "postgres",
                              "-X", "-qAt", "-c", f"SELECT certyo.track('{table}', record_id_columns => ARRAY['email'])"],
                             capture_output=True, text=True)
        assert out.returncode != 0 and "own order" in out.stderr, out.stderr
        attacker.sql(f"CREATE UNIQUE INDEX ON {table} (email); "
                     f"SELECT certyo.track('{table}', record_id_columns => ARRAY['email'])")
        attacker.sql(f"DROP TABLE {table}")
    finally:
        cluster.sql("DROP EXTENSION IF EXISTS citext CASCADE")


@pytest.mark.parametrize("key_type", ["range", "multirange"])
def test_a_key_holding_another_roles_enum_is_refused(cluster, attacker, make_role, key_type):
    """track() refuses a key of another role's enum (its owner may swap two labels, ALTER TYPE
    ... RENAME VALUE, and each row's record id then reads back as the other row); the check
    looked at the key's type only. A range over such an enum (and its multirange, an array of
    it, a composite holding it) reads its values with the enum's input function all the same:
    an attacker pass keyed a table by a range over the attacker's enum, swapped the labels
    between capture and write-back, and each row took the other's hash, marked anchored. Now
    every type within a key is judged as the key itself. (Arrays and composite types are no
    record id columns at all.)"""
    owner = make_role("owner")
    s, a = owner.schema, attacker.schema
    attacker.sql(f"CREATE TYPE {a}.color AS ENUM ('red', 'blue'); GRANT USAGE ON TYPE {a}.color TO PUBLIC")
    column = {"range": f"{s}.colors", "multirange": f"{s}.colors_multirange"}[key_type]
    owner.sql(f"CREATE TYPE {s}.colors AS RANGE (subtype = {a}.color, multirange_type_name = {s}.colors_multirange); "
              f"CREATE TABLE {s}.paint (c {column} PRIMARY KEY, v text)")
    refused = owner.attempt(f"SELECT certyo.track('{s}.paint')")
    assert refused.returncode != 0 and "enum of another role" in refused.stderr, refused
    assert superuser_runs(attacker) == []


@pytest.mark.parametrize("key_type", ["range", "multirange"])
def test_a_key_holding_object_names_is_refused(cluster, attacker, make_role, key_type):
    """A key of an object identifier type (`regclass` and the like) is refused: its text is a
    name that the object's owner may rename, and a record id would then name another row. A
    range over regclass, or its multirange, holds such names all the same: an attacker pass
    recorded two of its tables in a range-keyed table, swapped their names before the
    write-back, and the rows took each other's hashes. Refused now like the plain type."""
    owner = make_role("owner")
    s = owner.schema
    column = {"range": f"{s}.rels", "multirange": f"{s}.rels_multirange"}[key_type]
    owner.sql(f"CREATE TYPE {s}.rels AS RANGE (subtype = regclass, multirange_type_name = {s}.rels_multirange); "
              f"CREATE TABLE {s}.registry (r {column} PRIMARY KEY, v text)")
    refused = owner.attempt(f"SELECT certyo.track('{s}.registry')")
    assert refused.returncode != 0 and "names of database objects" in refused.stderr, refused


def test_a_key_of_a_domain_over_another_roles_enum_is_refused(cluster, attacker, make_role):
    """Held in an attacker pass: a domain (the table owner's) over the attacker's enum is read
    as its base type, the enum, and track() refuses it as another role's enum."""
    owner = make_role("owner")
    s, a = owner.schema, attacker.schema
    attacker.sql(f"CREATE TYPE {a}.color AS ENUM ('red', 'blue'); GRANT USAGE ON TYPE {a}.color TO PUBLIC")
    owner.sql(f"CREATE DOMAIN {s}.dcolor AS {a}.color; CREATE TABLE {s}.paint (c {s}.dcolor PRIMARY KEY, v text)")
    refused = owner.attempt(f"SELECT certyo.track('{s}.paint')")
    assert refused.returncode != 0 and "enum of another role" in refused.stderr, refused
    assert superuser_runs(attacker) == []
