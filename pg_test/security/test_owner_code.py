"""Security: the worker (a superuser) runs the code of a table's owner with the owner's rights:
the write-back's triggers and table code, and look-alikes of built-ins planted in schema public.

Same fixtures and after-test checks as every security suite (pg_test/conftest.py): no role
gains a privilege, the server never crashes, vault.canary stays intact; shared helpers in
pg_test/security/helpers.py."""
import os
import subprocess

import pytest

from harness import wait_for
from helpers import (assert_ran_only_as, assert_unprivileged, exercise_worker, lookalikes,
                     make_table, superuser_runs, wait_anchored, wait_backfill, wait_written_back)


# ---------------------------------------------------------------------------------------------
# Write-back runs user code of the table's owner


TRIGGERS = [
    pytest.param("BEFORE UPDATE", "ROW", None, id="before-row"),
    pytest.param("BEFORE UPDATE", "ROW", "ALWAYS", id="before-row-always"),
    pytest.param("BEFORE UPDATE", "ROW", "REPLICA", id="before-row-replica"),
    pytest.param("AFTER UPDATE", "ROW", None, id="after-row"),
    pytest.param("BEFORE UPDATE", "STATEMENT", None, id="before-statement"),
    pytest.param("AFTER UPDATE", "STATEMENT", "ALWAYS", id="after-statement-always"),
]


@pytest.mark.parametrize("timing, level, firing", TRIGGERS)
def test_write_back_does_not_run_owner_triggers_as_superuser(cluster, attacker, timing, level, firing):
    """Attack: the owner of a tracked table adds an UPDATE trigger whose function makes the
    owner a superuser when it runs as one; the worker's write-back of the hash (and of the
    anchor status) updates the table. Ordinary (origin) triggers must not fire during write-back
    at all; ALWAYS/REPLICA triggers may, but only as the table's owner."""
    s = attacker.schema
    table = make_table(attacker)
    attacker.sql(f"""
        CREATE FUNCTION {s}.evil() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
                EXECUTE 'ALTER ROLE {attacker.name} SUPERUSER';
            END IF;
            PERFORM {s}.pwn('trigger');  -- logs current_user (and overwrites vault.canary as a superuser)
            IF TG_LEVEL = 'ROW' THEN RETURN NEW; END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER evil {timing} ON {table} FOR EACH {level} EXECUTE FUNCTION {s}.evil();
    """)
    if firing:
        attacker.sql(f"ALTER TABLE {table} ENABLE {firing} TRIGGER evil")
    attacker.sql(f"INSERT INTO {table} (id) SELECT g FROM generate_series(1, 3) g")
    wait_written_back(cluster, table, 3)
    wait_anchored(cluster, table, 3)
    assert_unprivileged(attacker)
    assert_ran_only_as(attacker, attacker.name)
    if firing is None:
        assert attacker.log() == [], "an ordinary trigger fired during write-back"

    # The trigger is live: the owner's own UPDATE fires it (except a REPLICA one), as the owner.
    before = len(attacker.log())
    old_hash = cluster.sql(f"SELECT certyo_record_hash FROM {table} WHERE id = 1")
    attacker.sql(f"UPDATE {table} SET v = 'changed' WHERE id = 1")
    if firing != "REPLICA":
        assert ("trigger", attacker.name, "f") in attacker.log()[before:]
    assert wait_for(lambda: cluster.sql(f"SELECT certyo_record_hash FROM {table} WHERE id = 1") not in (old_hash, ""), 30)
    wait_anchored(cluster, table, 3)
    assert_unprivileged(attacker)
    assert_ran_only_as(attacker, attacker.name)
    if firing is None:
        assert attacker.log() == [("trigger", attacker.name, "f")], "an ordinary trigger fired during write-back"


# Other user code that an UPDATE of the table runs: (SQL before the table, its columns, SQL
# after track()). {s} is the attacker's schema; each vector calls {s}.pwn().
ROW_CODE = {
    "index-expression": (
        "CREATE FUNCTION {s}.idx(x text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$ "
        "BEGIN PERFORM {s}.pwn('index expression'); RETURN x; END $$;",
        "id int PRIMARY KEY, v text",
        "CREATE INDEX t_evil ON {s}.t ({s}.idx(certyo_record_hash));",
    ),
    "column-default": (
        "CREATE FUNCTION {s}.dflt(tag text) RETURNS text LANGUAGE plpgsql AS $$ "
        "BEGIN PERFORM {s}.pwn(tag); RETURN NULL; END $$;",
        "id int PRIMARY KEY, v text DEFAULT {s}.dflt('default of v'), "
        "certyo_record_hash text DEFAULT {s}.dflt('default of certyo_record_hash'), "
        "certyo_anchor_status text DEFAULT {s}.dflt('default of certyo_anchor_status')",
        "",
    ),
    "domain-check": (
        "CREATE FUNCTION {s}.chk(tag text, x text) RETURNS boolean LANGUAGE plpgsql AS $$ "
        "BEGIN RETURN {s}.pwn(tag); END $$; "
        "CREATE DOMAIN {s}.hash AS text CHECK ({s}.chk('domain check', VALUE));",
        "id int PRIMARY KEY, v text, certyo_record_hash {s}.hash",
        "",
    ),
    "table-check": (
        "CREATE FUNCTION {s}.chk(tag text, x text) RETURNS boolean LANGUAGE plpgsql AS $$ "
        "BEGIN RETURN {s}.pwn(tag); END $$;",
        "id int PRIMARY KEY, v text, certyo_record_hash text, CHECK ({s}.chk('table check', certyo_record_hash))",
        "",
    ),
    "generated-column": (
        "CREATE FUNCTION {s}.gen(x text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$ "
        "BEGIN PERFORM {s}.pwn('generated column'); RETURN 'g'; END $$;",
        "id int PRIMARY KEY, v text, certyo_record_hash text, g text GENERATED ALWAYS AS ({s}.gen(certyo_record_hash)) STORED",
        "",
    ),
    "row-security-policy": (
        "CREATE FUNCTION {s}.pol(id int) RETURNS boolean LANGUAGE plpgsql AS $$ "
        "BEGIN RETURN {s}.pwn('row security policy'); END $$;",
        "id int PRIMARY KEY, v text",
        "ALTER TABLE {s}.t ENABLE ROW LEVEL SECURITY; ALTER TABLE {s}.t FORCE ROW LEVEL SECURITY; "
        "CREATE POLICY evil ON {s}.t USING ({s}.pol(id));",
    ),
}


@pytest.mark.parametrize("vector", list(ROW_CODE))
def test_write_back_runs_table_code_as_owner(cluster, attacker, vector):
    """Attack: code of the table's owner that any UPDATE of the table runs (an index expression
    over certyo_record_hash calling an IMMUTABLE-declared function, a column DEFAULT, a domain
    CHECK on certyo_record_hash, a table CHECK, a generated column, a FORCEd row-level security
    policy) makes the owner a superuser when it runs as one. The write-back must run it, if at
    all, as the owner."""
    s = attacker.schema
    before, columns, after = (part.format(s=s) for part in ROW_CODE[vector])
    attacker.sql(before)
    table = make_table(attacker, columns=columns, track=False)
    # A captured generated column is computed from captured columns only (track() refuses one
    # computed from a bookkeeping column): the attacker's is left out of capture, and every
    # write-back still computes it.
    excluded = ", exclude_columns => ARRAY['g']" if vector == "generated-column" else ""
    if vector == "domain-check":
        # A bookkeeping column of another type than text, a domain over it included, is
        # refused, by track() and by the ALTER TABLE that would make it so: no write-back ever
        # assigns to the domain.
        refused = attacker.attempt(f"SELECT certyo.track('{table}')")
        assert refused.sqlstate == "42804", refused
        attacker.sql(f"ALTER TABLE {table} ALTER COLUMN certyo_record_hash TYPE text; SELECT certyo.track('{table}')")
        refused = attacker.attempt(f"ALTER TABLE {table} ALTER COLUMN certyo_record_hash TYPE {s}.hash")
        assert refused.sqlstate == "42804", refused
        assert_unprivileged(attacker)
        assert_ran_only_as(attacker, attacker.name)
        return
    attacker.sql(f"SELECT certyo.track('{table}'{excluded})")
    if after:
        attacker.sql(after)
    attacker.sql(f"INSERT INTO {table} (id) SELECT g FROM generate_series(1, 3) g")
    assert attacker.log(), f"the {vector} did not run on the owner's own INSERT: the attack is not set up"
    wait_written_back(cluster, table, 3)
    wait_anchored(cluster, table, 3)
    assert_unprivileged(attacker)
    assert_ran_only_as(attacker, attacker.name)


# ---------------------------------------------------------------------------------------------
# Search-path hijack of the worker through schema public


def test_worker_ignores_lookalikes_in_public(cluster, attacker):
    """Attack: a role with CREATE on schema public plants functions and operators named like
    the built-ins the worker's SQL calls unqualified (unnest(text[]) and format(text, name,
    name) are better matches than the built-ins for the worker's arguments, as is * on
    (bigint, interval)); each makes the attacker a superuser when it runs as one. A tracked
    table then gets changes that the worker delivers, writes back and verifies."""
    cluster.sql(f"GRANT CREATE ON SCHEMA public TO {attacker.name}")
    attacker.sql(lookalikes("public", attacker.schema))
    table = make_table(attacker)
    exercise_worker(cluster, attacker, table, first_id=1)
    backfill = attacker.sql(f"SELECT certyo.backfill('{table}')")
    assert wait_backfill(cluster, backfill) == "done"
    exercise_worker(cluster, attacker, table, first_id=6)
    assert_unprivileged(attacker)
    assert superuser_runs(attacker) == [], attacker.log()


def test_a_superusers_own_session_ignores_lookalikes_in_public(cluster, attacker):
    """Attack (an attacker pass of 2026-12-05): the same look-alikes, waiting for the statements
    certyo_cdc runs in other roles' sessions, with their rights and search_path: track() and
    untrack(), the checks before DROP INDEX, ALTER TABLE ... DROP COLUMN and ATTACH PARTITION,
    backfill(), and the capture plan of a partition, built in the session of its first writer.
    Before the fix, a superuser who did any of these in a session of its own (default
    search_path, "$user", public) ran the attacker's =(oid, integer), =(oid, regclass) or
    unnest(smallint[]) as a superuser, and the attacker became one."""
    cluster.sql(f"GRANT CREATE ON SCHEMA public TO {attacker.name}")
    attacker.sql(lookalikes("public", attacker.schema))
    statements = [
        "CREATE TABLE public.victim_orders (id int PRIMARY KEY, sku text, price numeric)",
        "SELECT certyo.track('public.victim_orders')",
        "INSERT INTO public.victim_orders VALUES (1, 'a', 1)",
        "CREATE INDEX victim_orders_sku ON public.victim_orders (sku)",
        "DROP INDEX public.victim_orders_sku",
        "ALTER TABLE public.victim_orders DROP COLUMN price",
        "SELECT certyo.backfill('public.victim_orders', 'id > 0')",
        "CREATE TABLE public.victim_ledger (id int, region text, PRIMARY KEY (id, region)) PARTITION BY LIST (region)",
        "CREATE TABLE public.victim_ledger_eu PARTITION OF public.victim_ledger FOR VALUES IN ('eu')",
        "SELECT certyo.track('public.victim_ledger')",
        "CREATE TABLE public.victim_ledger_us (id int NOT NULL, region text NOT NULL)",
        "ALTER TABLE public.victim_ledger ATTACH PARTITION public.victim_ledger_us FOR VALUES IN ('us')",
        "INSERT INTO public.victim_ledger VALUES (1, 'eu'), (2, 'us')",
        "SELECT certyo.untrack('public.victim_orders')",
    ]
    env = dict(os.environ, PGAPPNAME="someone-else")  # not the harness: the look-alikes go off here
    try:
        for statement in statements:
            subprocess.run(["psql", "-h", cluster.dir, "-p", str(cluster.port), "-U", "postgres", "-d", "postgres",
                            "-X", "-qAt", "-v", "ON_ERROR_STOP=1", "-c", statement],
                           env=env, check=True, capture_output=True, text=True)
        assert superuser_runs(attacker) == [], attacker.log()
        assert_unprivileged(attacker)
    finally:
        cluster.sql("DROP TABLE IF EXISTS public.victim_orders, public.victim_ledger CASCADE")


def test_harness_sessions_do_not_set_off_lookalikes(cluster, attacker):
    """Guard for the test above: the look-alikes in public must not go off in the harness's
    own superuser sessions (which carry application_name = HARNESS_APP), but do go off in a
    superuser session without it, so the attack is real."""
    cluster.sql(f"GRANT CREATE ON SCHEMA public TO {attacker.name}")
    attacker.sql(lookalikes("public", attacker.schema))
    probe = "SELECT count(*) FROM unnest(ARRAY['a', 'b']::text[])"
    assert cluster.sql(probe) == "2"
    assert attacker.log() == []
    env = dict(os.environ, PGAPPNAME="someone-else")
    subprocess.run(["psql", "-h", cluster.dir, "-p", str(cluster.port), "-U", "postgres", "-d", "postgres", "-X", "-qAt",
                    "-c", probe], env=env, check=True, capture_output=True)
    assert ("public.unnest(text[])", "postgres", "t") in attacker.log()
    # It worked: undo it, as the test would otherwise (rightly) fail on the escalation.
    cluster.sql(f"ALTER ROLE {attacker.name} NOSUPERUSER; UPDATE vault.canary SET v = 'intact'")
