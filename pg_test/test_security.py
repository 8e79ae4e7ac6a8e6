"""Security regression tests for certyo_cdc: real attacks by an unprivileged LOGIN role against a
real PostgreSQL 15 cluster with certyo_cdc preloaded and the Certyo emulator (fixtures in
conftest.py). After every test conftest.py also checks that the attacking roles are still
unprivileged, that the server never crashed (same postmaster, no crash in the log) and that
vault.canary, a postgres-owned table every attack payload overwrites when it runs as a
superuser, is intact.

Run:  CERTYO_EMULATOR=target/release/certyo-emulator python3 -m pytest -q pg_test/test_security.py

Against the unfixed build (commit cea1fa2, built with `cargo pgrx package` into a private copy of
PostgreSQL 15 and selected with CERTYO_PG_BIN), 28 of the 84 tests failed, each because its
attack worked:
- server crash (signal 6, "fatal runtime error: failed to initiate panic") on any backfill
  condition the parser rejects: test_temp_table_cannot_be_tracked,
  test_malformed_backfill_condition_is_a_syntax_error, the injections 'true; DROP TABLE ...',
  'true) LIMIT (1', 'true ORDER BY 1', '/* unterminated', test_backfill_condition_with_trailing_comment,
  test_malformed_input[megabyte-condition-parentheses];
- the attacker became a superuser through the write-back (run as the bootstrap superuser): the
  triggers before-row, before-row-always, after-row, before-statement, after-statement-always;
  table code index-expression, domain-check, table-check, generated-column;
- ... through the backfill condition (requested_by was recorded as the bootstrap superuser):
  test_backfill_condition_runs_as_requester; through the worker's search_path, poisoned by the
  condition (the attacker's now() ran as postgres): test_backfill_condition_cannot_poison_worker_search_path;
  through look-alikes in public (unnest(text[]), format(text, name, name), * on (bigint, interval)
  ran as postgres): test_worker_ignores_lookalikes_in_public;
- conditions accepted that escape their parentheses: '1=1) OR (true', 'true) --', 'true) FOR UPDATE --';
- the API key in the server log (parameter "certyo.api_key" changed to "..."): test_api_key_never_logged;
  no certyo.api_key_file: test_api_key_file;
- NULL array elements gave XX000 "array contains NULL", not 22004: test_malformed_input[null-*].
The others passed there too (e.g. REPLICA triggers, column defaults and row security policies did
not run in the worker, which as a superuser bypasses row security). Against the fixed build
(commit c5ee483) all 84 pass, in about 2 minutes.

Later: with the worker's session put in replica mode to keep its plans (commit 9b3a72a),
test_backfill_condition_cannot_skip_foreign_keys_or_triggers failed: the attacker's condition
ran in replica mode, so its writes skipped foreign keys and other owners' triggers. Fixed in the
next commit (user code runs in origin mode); all 85 pass.
"""
import os
import pwd
import subprocess
import time
import uuid
import warnings

import pytest

from conftest import DIR
from harness import KEY, wait_for

BACKTRACE_SIGNS = ("backtrace", ".rs:", "panicked")


# ---------------------------------------------------------------------------------------------
# Shared helpers


def make_table(role, name="t", rows=0, columns="id int PRIMARY KEY, v text", track=True):
    """A table in the role's schema, tracked, with rows 1..rows inserted by the role."""
    table = f"{role.schema}.{name}"
    role.sql(f"CREATE TABLE {table} ({columns})")
    if track:
        role.sql(f"SELECT certyo.track('{table}')")
    if rows:
        role.sql(f"INSERT INTO {table} (id) SELECT g FROM generate_series(1, {rows}) g")
    return table


def literal(text):
    return "'" + text.replace("'", "''") + "'"


def count_rows(cluster, table, where="true"):
    return int(cluster.sql(f"SELECT count(*) FROM {table} WHERE {where}"))


def wait_rows(cluster, table, where, n, what, timeout=30):
    ok = wait_for(lambda: count_rows(cluster, table, where) == n, timeout)
    assert ok, f"{what}: {count_rows(cluster, table, where)} of {n} rows of {table} after {timeout}s"


def wait_written_back(cluster, table, n, timeout=30):
    wait_rows(cluster, table, "certyo_record_hash IS NOT NULL", n, "hash written back", timeout)


def wait_anchored(cluster, table, n, timeout=30):
    wait_rows(cluster, table, "certyo_anchor_status = 'anchored'", n, "anchored", timeout)


def wait_backfill(cluster, backfill, timeout=30):
    """The backfill's final state (done, failed, cancelled), or its state at the timeout."""
    query = f"SELECT state FROM certyo.backfills WHERE id = {backfill}"
    wait_for(lambda: cluster.sql(query) in ("done", "failed", "cancelled"), timeout)
    return cluster.sql(query)


def backfill_rows(cluster, table):
    return int(cluster.sql(f"SELECT count(*) FROM certyo.backfills WHERE relid = '{table}'::regclass"))


def upserts_captured(cluster, table):
    """Upserts of the table anywhere in their life: queued, being delivered, or receipted."""
    counts = [f"(SELECT count(*) FROM certyo.{t} WHERE relid = '{table}'::regclass AND operation = 'upsert')"
              for t in ("queue", "delivery", "receipt")]
    return int(cluster.sql("SELECT " + " + ".join(counts)))


def returned(attempt):
    """The last line a successful call printed (e.g. a backfill's id)."""
    assert attempt.returncode == 0 and attempt.sqlstate is None and attempt.stdout, attempt
    return attempt.stdout.splitlines()[-1]


def assert_unprivileged(role):
    assert role.problems() == [], role.problems()


def superuser_runs(role):
    """Attack code that ran as a superuser, from the role's log."""
    return [entry for entry in role.log() if entry[2] == "t"]


def assert_ran_only_as(role, owner):
    """Whatever attack code ran, ran as `owner` and never as a superuser."""
    log = role.log()
    assert superuser_runs(role) == [], f"attack code ran as a superuser: {log}"
    assert {who for _, who, _ in log} <= {owner}, f"attack code ran as someone other than {owner}: {log}"


def error_message(attempt):
    lines = [line for line in attempt.stderr.splitlines() if "ERROR:" in line]
    return lines[0] if lines else ""


def assert_no_backtrace(attempt):
    """The error's text (message, DETAIL, HINT, CONTEXT) shows no Rust internals. LOCATION lines
    (VERBOSITY=verbose names the source file of every error, .rs for certyo_cdc's) are left out."""
    text = "\n".join(line for line in attempt.stderr.splitlines() if not line.strip().startswith("LOCATION:"))
    for sign in BACKTRACE_SIGNS:
        assert sign not in text.lower(), f"{sign!r} in the error: {text[:2000]}"


def assert_still_delivering(cluster, role, name="alive"):
    """A fresh insert into a fresh tracked table gets its hash written back."""
    table = make_table(role, name=name)
    role.sql(f"INSERT INTO {table} (id) VALUES (1)")
    wait_written_back(cluster, table, 1)


def reload(cluster):
    cluster.sql("SELECT pg_reload_conf()")


def lookalikes(schema, kit):
    """SQL for functions, an aggregate and operators in `schema` named like built-ins that SQL
    run by the worker calls unqualified. Each runs kit.once() (the payload: ALTER ROLE ...
    SUPERUSER when it runs as a superuser, and a log entry) and then does what the built-in
    does, so that the statement it is part of succeeds and commits. coalesce, greatest and least
    are syntax, not functions; greatest(bigint, bigint) is there anyway."""

    def fn(signature, returns, result, tag, extra=""):
        return (f"CREATE FUNCTION {schema}.{signature} RETURNS {returns} LANGUAGE plpgsql {extra} "
                f"SET search_path = pg_catalog, pg_temp AS $f$ BEGIN PERFORM {kit}.once('{schema}.{tag}'); "
                f"RETURN {result}; END $f$;")

    return "\n".join([
        fn("now()", "timestamptz", "pg_catalog.now()", "now()"),
        fn("pg_backend_pid()", "integer", "pg_catalog.pg_backend_pid()", "pg_backend_pid()"),
        fn("to_char(timestamptz, text)", "text", "pg_catalog.to_char($1, $2)", "to_char(timestamptz, text)"),
        fn("to_char(timestamp, text)", "text", "pg_catalog.to_char($1, $2)", "to_char(timestamp, text)"),
        fn("format(text, name, name)", "text", "pg_catalog.format($1, $2, $3)", "format(text, name, name)"),
        fn("quote_ident(text)", "text", "pg_catalog.quote_ident($1)", "quote_ident(text)"),
        fn("format_type(oid, integer)", "text", "pg_catalog.format_type($1, $2)", "format_type(oid, integer)"),
        fn("greatest(bigint, bigint)", "bigint", "CASE WHEN $1 > $2 THEN $1 ELSE $2 END", "greatest(bigint, bigint)"),
        f"CREATE FUNCTION {schema}.unnest(anyarray) RETURNS SETOF anyelement LANGUAGE plpgsql "
        f"SET search_path = pg_catalog, pg_temp AS $f$ BEGIN PERFORM {kit}.once('{schema}.unnest(anyarray)'); "
        f"RETURN QUERY SELECT pg_catalog.unnest($1); END $f$;",
        f"CREATE FUNCTION {schema}.unnest(text[]) RETURNS SETOF text LANGUAGE plpgsql "
        f"SET search_path = pg_catalog, pg_temp AS $f$ BEGIN PERFORM {kit}.once('{schema}.unnest(text[])'); "
        f"RETURN QUERY SELECT pg_catalog.unnest($1); END $f$;",
        fn("evil_count_star(bigint)", "bigint", "$1 + 1", "count(*)"),
        f"CREATE AGGREGATE {schema}.count(*) (SFUNC = {schema}.evil_count_star, STYPE = bigint, INITCOND = '0');",
        fn("evil_count(bigint, bigint)", "bigint", "$1 + 1", "count(bigint)", extra="STRICT"),
        f"CREATE AGGREGATE {schema}.count(bigint) (SFUNC = {schema}.evil_count, STYPE = bigint, INITCOND = '0');",
        fn("evil_int8eq(bigint, bigint)", "boolean", "$1 OPERATOR(pg_catalog.=) $2", "=(bigint, bigint)"),
        f"CREATE OPERATOR {schema}.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = {schema}.evil_int8eq);",
        fn("evil_texteq(text, text)", "boolean", "$1 OPERATOR(pg_catalog.=) $2", "=(text, text)"),
        f"CREATE OPERATOR {schema}.= (LEFTARG = text, RIGHTARG = text, FUNCTION = {schema}.evil_texteq);",
        fn("evil_oideq(oid, oid)", "boolean", "$1 OPERATOR(pg_catalog.=) $2", "=(oid, oid)"),
        f"CREATE OPERATOR {schema}.= (LEFTARG = oid, RIGHTARG = oid, FUNCTION = {schema}.evil_oideq);",
        fn("evil_times(bigint, interval)", "interval", "$1::float8 OPERATOR(pg_catalog.*) $2", "*(bigint, interval)"),
        f"CREATE OPERATOR {schema}.* (LEFTARG = bigint, RIGHTARG = interval, FUNCTION = {schema}.evil_times);",
        # Exact matches where pg_catalog has none: `tgparentid = 0` is oid = integer, a join of
        # pg_partition_ancestors' regclass with an oid is oid = regclass, and unnest(indkey::int2[])
        # prefers unnest(smallint[]) to pg_catalog.unnest(anyarray).
        fn("evil_oid_int(oid, integer)", "boolean", "$1 OPERATOR(pg_catalog.=) $2::oid", "=(oid, integer)"),
        f"CREATE OPERATOR {schema}.= (LEFTARG = oid, RIGHTARG = integer, FUNCTION = {schema}.evil_oid_int);",
        fn("evil_oid_regclass(oid, regclass)", "boolean", "$1 OPERATOR(pg_catalog.=) $2::oid", "=(oid, regclass)"),
        f"CREATE OPERATOR {schema}.= (LEFTARG = oid, RIGHTARG = regclass, FUNCTION = {schema}.evil_oid_regclass);",
        f"CREATE FUNCTION {schema}.unnest(smallint[]) RETURNS SETOF smallint LANGUAGE plpgsql "
        f"SET search_path = pg_catalog, pg_temp AS $f$ BEGIN PERFORM {kit}.once('{schema}.unnest(smallint[])'); "
        f"RETURN QUERY SELECT pg_catalog.unnest($1); END $f$;",
    ])


def exercise_worker(cluster, role, table, first_id, n=5):
    """Make the worker run every kind of pass on `table`: deliveries of inserts and updates,
    write-back of hashes, verification and write-back of the anchor status."""
    last = first_id + n - 1
    role.sql(f"INSERT INTO {table} (id) SELECT g FROM generate_series({first_id}, {last}) g")
    role.sql(f"UPDATE {table} SET v = 'changed' WHERE id BETWEEN {first_id} AND {first_id + 1}")
    total = count_rows(cluster, table)
    wait_written_back(cluster, table, total)
    wait_anchored(cluster, table, total)


# ---------------------------------------------------------------------------------------------
# 1. A LOGIN role crashed the server


def test_temp_table_cannot_be_tracked(cluster, attacker):
    """Attack: track a TEMP table and backfill it with a malformed condition (this crashed the
    whole server: 'fatal runtime error: failed to initiate panic'). track() must refuse a
    temporary table (0A000, the message says so) and no capture trigger may exist on it."""
    attempt = attacker.attempt("""
        CREATE TEMP TABLE t (id int PRIMARY KEY);
        SELECT certyo.track('t');
        SELECT certyo.backfill('t', 'id = = 1');
        SELECT 'triggers:' || count(*) FROM pg_trigger WHERE tgrelid = 'pg_temp.t'::regclass AND tgname = 'certyo_capture';
    """, stop_on_error=False)
    assert attempt.sqlstate == "0A000", attempt
    assert "temporary" in error_message(attempt).lower(), attempt
    assert "triggers:0" in attempt.stdout.splitlines(), attempt
    assert_no_backtrace(attempt)


def test_malformed_backfill_condition_is_a_syntax_error(cluster, attacker):
    """Attack: certyo.backfill() with a condition the parser rejects ('id = = 1') on an ordinary
    tracked table: a syntax error (42601), never a crash."""
    table = make_table(attacker, rows=3)
    attempt = attacker.attempt(f"SELECT certyo.backfill('{table}', 'id = = 1')")
    assert attempt.sqlstate == "42601", attempt
    assert_no_backtrace(attempt)
    assert backfill_rows(cluster, table) == 0


# ---------------------------------------------------------------------------------------------
# 2. Write-back runs user code of the table's owner


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
    table = make_table(attacker, columns=columns)
    if after:
        attacker.sql(after)
    attacker.sql(f"INSERT INTO {table} (id) SELECT g FROM generate_series(1, 3) g")
    assert attacker.log(), f"the {vector} did not run on the owner's own INSERT: the attack is not set up"
    wait_written_back(cluster, table, 3)
    wait_anchored(cluster, table, 3)
    assert_unprivileged(attacker)
    assert_ran_only_as(attacker, attacker.name)


# ---------------------------------------------------------------------------------------------
# 3. Backfill conditions run in the worker


def test_backfill_condition_runs_as_requester(cluster, attacker):
    """Attack: a backfill condition calling a function that makes the requester a superuser
    when it runs as one. The worker evaluates it as the requesting role."""
    s = attacker.schema
    table = make_table(attacker, rows=5)
    attacker.sql(f"CREATE FUNCTION {s}.cond(id int) RETURNS boolean LANGUAGE plpgsql AS $$ "
                 f"BEGIN RETURN {s}.pwn('backfill condition'); END $$")
    backfill = attacker.sql(f"SELECT certyo.backfill('{table}', '{s}.cond(id)')")
    assert wait_backfill(cluster, backfill) == "done"
    assert_unprivileged(attacker)
    assert cluster.sql(f"SELECT requested_by::regrole FROM certyo.backfills WHERE id = {backfill}") == attacker.name
    assert cluster.sql(f"SELECT rows_queued FROM certyo.backfills WHERE id = {backfill}") == "5"
    log = attacker.log()
    assert len([e for e in log if e[0] == "backfill condition"]) >= 5, log
    assert_ran_only_as(attacker, attacker.name)


def test_backfill_condition_cannot_poison_worker_search_path(cluster, attacker):
    """Attack: the condition calls set_config('search_path', '<attacker schema>, pg_catalog',
    false); the attacker's schema holds look-alikes of now(), unnest(), count(*), =, to_char(),
    format(), ... that make the attacker a superuser when they run as one. After the backfill,
    more changes make the worker deliver, write back and verify: none of the look-alikes may run
    as a superuser."""
    s = attacker.schema
    table = make_table(attacker, rows=5)
    attacker.sql(lookalikes(s, s))
    condition = f"pg_catalog.set_config('search_path', '{s}, pg_catalog', false) IS NOT NULL"
    backfill = attacker.sql(f"SELECT certyo.backfill('{table}', {literal(condition)})")
    assert wait_backfill(cluster, backfill) in ("done", "failed")
    exercise_worker(cluster, attacker, table, first_id=6)
    assert_unprivileged(attacker)
    assert superuser_runs(attacker) == [], attacker.log()
    assert_still_delivering(cluster, attacker)


def test_backfill_condition_cannot_skip_foreign_keys_or_triggers(cluster, attacker):
    """Attack: the worker's own session is in replica mode (its write-back fires no ordinary
    trigger), and in replica mode foreign keys and ordinary triggers do not fire. The condition
    inserts an orphan into a table whose foreign key the attacker did not make optional, and
    notes the replication role it saw: it must run as in any session of its own (origin), so
    the orphan is refused."""
    s = attacker.schema
    table = make_table(attacker, rows=3)
    attacker.sql(f"""
        CREATE TABLE {s}.parent (id int PRIMARY KEY);
        CREATE TABLE {s}.child (parent int NOT NULL REFERENCES {s}.parent);
        CREATE TABLE {s}.seen (mode text);
        CREATE FUNCTION {s}.cond(id int) RETURNS boolean LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO {s}.seen VALUES (pg_catalog.current_setting('session_replication_role'));
            BEGIN
                INSERT INTO {s}.child VALUES (999);
            EXCEPTION WHEN foreign_key_violation THEN NULL;
            END;
            RETURN true;
        END $$""")
    backfill = attacker.sql(f"SELECT certyo.backfill('{table}', '{s}.cond(id)')")
    assert wait_backfill(cluster, backfill) == "done"
    assert cluster.sql(f"SELECT string_agg(DISTINCT mode, ',') FROM {s}.seen") == "origin", \
        "the condition ran in origin mode, not in the worker's replica mode"
    assert cluster.sql(f"SELECT count(*) FROM {s}.child") == "0", "the foreign key held"
    assert_unprivileged(attacker)


@pytest.mark.parametrize("setting, value", [
    pytest.param("session_replication_role", "replica", id="session_replication_role"),
    pytest.param("role", "postgres", id="role-postgres"),
    pytest.param("role", "{attacker}", id="role-attacker"),
    pytest.param("session_authorization", "postgres", id="session_authorization"),
])
def test_backfill_condition_cannot_change_worker_session(cluster, attacker, setting, value):
    """Attack: the condition calls set_config() on a setting that would change how the worker
    runs from then on (replication role, role, session authorization). It must fail or leave no
    lasting effect: the attacker stays unprivileged and the worker keeps delivering."""
    value = value.format(attacker=attacker.name)
    table = make_table(attacker, rows=3)
    condition = f"pg_catalog.set_config('{setting}', '{value}', false) IS NOT NULL"
    attempt = attacker.attempt(f"SELECT certyo.backfill('{table}', {literal(condition)})")
    assert_no_backtrace(attempt)
    if attempt.sqlstate is None:
        assert wait_backfill(cluster, returned(attempt)) in ("done", "failed")
    exercise_worker(cluster, attacker, table, first_id=4, n=2)
    assert_unprivileged(attacker)
    assert_still_delivering(cluster, attacker)


# ---------------------------------------------------------------------------------------------
# 4. Injection through backfill conditions


INJECTIONS = [
    pytest.param("1=1) OR (true", "42601", id="or-outside-parentheses"),
    pytest.param("true) --", "42601", id="comment-out-rest"),
    pytest.param("true; DROP TABLE {table}", "42601", id="second-statement"),
    pytest.param("true) UNION SELECT (1", "42601", id="union"),
    pytest.param("true) LIMIT (1", "42601", id="limit"),
    pytest.param("true ORDER BY 1", "42601", id="order-by"),
    pytest.param("true) FOR UPDATE --", "42601", id="for-update"),
    pytest.param("/* unterminated", "42601", id="unterminated-comment"),
    pytest.param("id", "42804", id="not-boolean"),
    pytest.param("count(*) > 0", "42803", id="aggregate"),
]


@pytest.mark.parametrize("condition, sqlstate", INJECTIONS)
def test_backfill_condition_injection_is_refused(cluster, attacker, condition, sqlstate):
    """Attack: a condition that closes the WHERE clause's parenthesis, comments out the rest,
    adds statements or clauses, or is not a boolean expression. Refused with its SQLSTATE; no
    backfill is recorded; the table is untouched."""
    table = make_table(attacker, rows=10)
    condition = condition.format(table=table)
    attempt = attacker.attempt(f"SELECT certyo.backfill('{table}', {literal(condition)})")
    assert attempt.sqlstate == sqlstate, attempt
    assert_no_backtrace(attempt)
    assert backfill_rows(cluster, table) == 0
    assert count_rows(cluster, table) == 10


def test_backfill_condition_with_trailing_comment(cluster, attacker):
    """Attack: a condition ending in a line comment ('true --'), which would swallow whatever
    follows it in the chunk query. Either refused (42601) or harmless: the backfill then
    finishes and queues each row exactly once."""
    table = make_table(attacker, rows=10)
    attempt = attacker.attempt(f"SELECT certyo.backfill('{table}', 'true --')")
    assert_no_backtrace(attempt)
    if attempt.sqlstate is not None:
        assert attempt.sqlstate == "42601", attempt
        assert backfill_rows(cluster, table) == 0
        return
    backfill = returned(attempt)
    assert wait_backfill(cluster, backfill) == "done"
    assert cluster.sql(f"SELECT rows_queued FROM certyo.backfills WHERE id = {backfill}") == "10"
    wait_rows(cluster, "certyo.receipt", f"relid = '{table}'::regclass AND operation = 'upsert'", 10, "upserts delivered")
    assert upserts_captured(cluster, table) == 10


def test_backfill_condition_with_or_queues_matching_rows_once(cluster, attacker):
    """A valid condition with OR on rows 1..10 ('id < 3 OR id > 8') queues exactly the 4
    matching rows and finishes: the chunk query must keep the condition in its parentheses,
    or OR would bind looser than the resume key and the backfill would loop."""
    table = make_table(attacker, rows=10)
    backfill = attacker.sql(f"SELECT certyo.backfill('{table}', 'id < 3 OR id > 8')")
    assert wait_backfill(cluster, backfill) == "done"
    assert cluster.sql(f"SELECT rows_queued FROM certyo.backfills WHERE id = {backfill}") == "4"
    wait_rows(cluster, "certyo.receipt", f"relid = '{table}'::regclass AND operation = 'upsert'", 4, "upserts delivered")
    assert upserts_captured(cluster, table) == 4
    assert cluster.sql(f"SELECT state || ' ' || rows_queued FROM certyo.backfills WHERE id = {backfill}") == "done 4"


# ---------------------------------------------------------------------------------------------
# 5. Only the owner may track, untrack or backfill


# ---------------------------------------------------------------------------------------------
# Holding up the worker: its statements that run a role's code get certyo.user_code_timeout
# (5 s by default), so no role stalls the delivery of the other tables.


def test_a_backfill_condition_that_sleeps_cannot_hold_up_delivery(cluster, attacker, make_role):
    """Attack: a backfill whose condition sleeps a minute per row. The chunk is canceled after
    certyo.user_code_timeout and the backfill fails, naming the setting; another role's changes
    are delivered meanwhile, long before the condition would have woken."""
    table = make_table(attacker, rows=3)
    backfill = attacker.sql(f"SELECT certyo.backfill('{table}', 'pg_sleep(60) IS NOT NULL')")
    assert_delivered_meanwhile(cluster, make_role("bystander"))
    assert wait_backfill(cluster, backfill) == "failed"
    error = cluster.sql(f"SELECT error FROM certyo.backfills WHERE id = {backfill}")
    assert "certyo.user_code_timeout" in error, error


def test_rows_locked_by_a_role_cannot_hold_up_delivery(cluster, attacker, make_role):
    """Attack: the owner locks its rows (SELECT ... FOR UPDATE, then LOCK TABLE) in a transaction
    it keeps open, then requests a backfill, whose chunk reads the rows FOR SHARE. The worker
    waits a second at most, then tries again later with back-off: another role's changes are
    delivered meanwhile, and the backfill completes once the locks are released."""
    table = make_table(attacker, rows=3)
    for lock in (f"SELECT * FROM {table} FOR UPDATE", f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"):
        holder = cluster.hold_open(f"BEGIN; {lock};", user=attacker.name)
        try:
            backfill = attacker.sql(f"SELECT certyo.backfill('{table}')")
            assert wait_for(lambda: "locked by another transaction" in cluster.sql(
                f"SELECT coalesce(error, '') FROM certyo.backfills WHERE id = {backfill}"), 30), \
                f"the worker did not give up waiting for the locked rows ({lock})"
            assert_delivered_meanwhile(cluster, make_role("bystander"))
            state = cluster.sql(f"SELECT state FROM certyo.backfills WHERE id = {backfill}")
            assert state in ("queued", "running"), f"the backfill waits for the locked rows, it is {state}"
        finally:
            holder.close()
        assert wait_backfill(cluster, backfill, timeout=60) == "done", f"once the lock ({lock}) is gone"


def backfill_of_a_locked_table(cluster, role):
    """A backfill of the role's new table, which the role keeps locked in an open transaction:
    (the session holding the lock, to close; the backfill's id), once the worker has found the
    lock."""
    table = make_table(role, rows=3)
    holder = cluster.hold_open(f"BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE;", user=role.name)
    try:
        backfill = role.sql(f"SELECT certyo.backfill('{table}')")
        assert wait_for(lambda: "locked by another transaction" in cluster.sql(
            f"SELECT coalesce(error, '') FROM certyo.backfills WHERE id = {backfill}"), 30)
    except BaseException:
        holder.close()
        raise
    return holder, backfill


def test_a_role_whose_rows_are_locked_holds_up_its_own_backfill_only(cluster, attacker, make_role):
    """Attack (an attacker pass of 2026-12-05): the owner keeps its table locked and requests a
    backfill first. The worker took backfills strictly in order, so every backfill requested
    after it, by any role, waited as long as the lock was held, and a back-off after that.
    Now only the attacker's backfill waits."""
    holder, stuck = backfill_of_a_locked_table(cluster, attacker)
    try:
        bystander = make_role("bystander")
        other = make_table(bystander, rows=50)
        backfill = bystander.sql(f"SELECT certyo.backfill('{other}')")
        assert wait_backfill(cluster, backfill) == "done", "a backfill behind a locked one waited for its lock"
        assert upserts_captured(cluster, other) == 50
        assert cluster.sql(f"SELECT state FROM certyo.backfills WHERE id = {stuck}") in ("queued", "running")
    finally:
        holder.close()
    assert wait_backfill(cluster, stuck, timeout=60) == "done", "once the lock is gone"


def test_a_backfill_cancelled_while_it_waited_for_locks_leaves_the_worker_asleep(cluster, attacker):
    """A backfill waits for rows its owner keeps locked; an operator cancels it meanwhile. The
    worker remembered when to try it again and, once that time had passed, asked to be woken at
    once, pass after pass: it never slept again (found while reviewing the fix above)."""
    holder, backfill = backfill_of_a_locked_table(cluster, attacker)
    try:
        cluster.sql(f"SELECT certyo.cancel_backfill({backfill})")
    finally:
        holder.close()
    # Past the back-off of the first attempts (1-2 s), then a window of 3 s.
    retried = f"SELECT updated_at < now() - interval '3 s' FROM certyo.backfills WHERE id = {backfill}"
    assert wait_for(lambda: cluster.sql(retried) == "t", 30)
    before = int(cluster.sql("SELECT passes FROM certyo.worker_status()"))
    time.sleep(3)  # the window measured, as in test_daemon.py's idle tests
    passes = int(cluster.sql("SELECT passes FROM certyo.worker_status()")) - before
    assert passes < 100, f"the worker ran {passes} passes in 3 s with nothing to do"


def test_a_cast_that_does_not_round_trip_cannot_make_a_backfill_endless(cluster, attacker, make_role):
    """Attack (an attacker pass of 2026-12-05): a backfill keeps its place between chunks as
    the record id's text form, and wrote and read it with casts; the owner of an enum type may
    CREATE CAST (type AS text) with a function that forgets the value. Every chunk then started
    over: the backfill never ended, queuing the same rows again and again (670,000 upserts of
    a 150-row table in 80 s, sent to Certyo and receipted), and every backfill requested after
    it waited. Now the place is written and read by the type's own output and input functions,
    never a cast: the backfill queues each row once and ends."""
    schema = attacker.schema
    attacker.sql(f"""
        CREATE TYPE {schema}.label AS ENUM ('a', 'b');
        CREATE TABLE {schema}.label_calls (n int);
        CREATE FUNCTION {schema}.label_text({schema}.label) RETURNS text LANGUAGE plpgsql
            AS $$ BEGIN INSERT INTO {schema}.label_calls VALUES (1); RETURN 'a'; END $$;
        CREATE CAST ({schema}.label AS text) WITH FUNCTION {schema}.label_text({schema}.label);
    """)
    table = make_table(attacker, name="endless", columns=f"e {schema}.label NOT NULL, id int NOT NULL, "
                                                           "v text, PRIMARY KEY (e, id)", track=False)
    attacker.sql(f"INSERT INTO {table} SELECT 'b', g, 'x' FROM generate_series(1, 250) g")
    attacker.sql(f"SELECT certyo.track('{table}')")
    backfill = attacker.sql(f"SELECT certyo.backfill('{table}')")
    assert wait_backfill(cluster, backfill) == "done", cluster.explain()
    assert cluster.sql(f"SELECT rows_queued FROM certyo.backfills WHERE id = {backfill}") == "250"
    assert upserts_captured(cluster, table) == 250
    assert cluster.sql(f"SELECT count(*) FROM {schema}.label_calls") == "0", "the cast ran"
    bystander = make_role("bystander")
    other = make_table(bystander, rows=5)
    assert wait_backfill(cluster, bystander.sql(f"SELECT certyo.backfill('{other}')")) == "done"


def test_text_that_is_not_utf8_is_refused_where_it_is_written(cluster, attacker):
    """Attack (an attacker pass of 2026-12-05): in a SQL_ASCII database text may hold any bytes;
    capture copied them into the queue, and the worker, which sends JSON (UTF-8), failed every
    pass on the change: one INSERT of E'\\xfe' stopped the delivery of every table of the
    database. Now the writer's statement is refused (22021) and the others are delivered."""
    database = f"ascii_{attacker.name}"
    cluster.sql(f"CREATE DATABASE {database} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    try:
        cluster.sql(f"CREATE EXTENSION certyo_cdc; GRANT CREATE ON DATABASE {database} TO {attacker.name}",
                    database=database)
        run = lambda sql: cluster.sql(sql, user=attacker.name, database=database)  # noqa: E731
        run("CREATE SCHEMA mine; CREATE TABLE mine.t (id text PRIMARY KEY, v text); SELECT certyo.track('mine.t')")
        for values in ("('bad value', E'v\\xfe')", "(E'bad key \\xff', 'v')"):
            refused = subprocess.run(["psql", "-h", cluster.dir, "-p", str(cluster.port), "-U", attacker.name, "-d",
                                      database, "-X", "-qAt", "-v", "VERBOSITY=verbose", "-c",
                                      f"INSERT INTO mine.t VALUES {values}"], capture_output=True)
            assert refused.returncode != 0 and b"22021" in refused.stderr and b"not valid UTF-8" in refused.stderr, \
                refused.stderr
        run("INSERT INTO mine.t VALUES ('fine', 'ascii only')")
        assert wait_for(lambda: cluster.sql("SELECT count(*) FROM mine.t WHERE certyo_record_hash IS NOT NULL",
                                            database=database) == "1", 30), "the valid change was not delivered"
    finally:
        cluster.sql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def test_a_huge_error_from_write_back_code_is_cut_short(cluster, attacker, make_role):
    """Attack (an attacker pass of 2026-12-05): an ENABLE ALWAYS trigger that raises a 100 MB
    error in the write-back only. The worker kept the text per table, stored it, put it in its
    status every pass and logged it once a minute per table: with 13 tables, 3 GB of worker
    memory, a 5 GB log, and every pass failing with "out of memory". Now the error is cut to
    1,000 bytes where it is caught."""
    schema = attacker.schema
    table = make_table(attacker, name="boom")
    attacker.sql(f"""
        CREATE FUNCTION {schema}.boom() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.certyo_record_hash IS DISTINCT FROM OLD.certyo_record_hash THEN  -- the write-back
                RAISE EXCEPTION '%', repeat('X', 5000000);
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER boom BEFORE UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION {schema}.boom();
        ALTER TABLE {table} ENABLE ALWAYS TRIGGER boom;
    """)
    log_before = cluster.log_size()
    attacker.sql(f"INSERT INTO {table} (id) VALUES (1)")
    failure = f"SELECT length(error) FROM certyo.write_back_failure WHERE relid = '{table}'::regclass"
    assert wait_for(lambda: cluster.sql(failure) != "", 30), "the write-back did not fail"
    assert int(cluster.sql(failure)) <= 1100, cluster.sql(failure)
    assert_delivered_meanwhile(cluster, make_role("bystander"))
    detail = int(cluster.sql("SELECT length(detail) FROM certyo.worker_status()"))
    assert detail <= 3000, f"the worker's status holds {detail} bytes"
    grown = cluster.log_size() - log_before
    assert grown < 100_000, f"the log grew by {grown} bytes"


def test_the_backlog_count_is_told_only_to_whoever_may_drop_the_extension(cluster, attacker):
    """Attack (an attacker pass of 2026-12-05): DROP EXTENSION, as anyone, answered with the
    database's count of undelivered changes and dead letters (the operator's figures, of every
    role's writes) before Postgres refused it for lack of ownership."""
    table = make_table(attacker)
    cluster.sql("SELECT certyo.pause()")
    try:
        attacker.sql(f"INSERT INTO {table} (id) VALUES (1), (2)")
        for statement in ("DROP EXTENSION certyo_cdc", "DROP EXTENSION certyo_cdc CASCADE"):
            refused = cluster.attempt_verbose(statement, user=attacker.name)
            assert "must be owner of extension" in refused.stderr, refused
            assert "captured change" not in refused.stderr, refused
        refused = cluster.attempt_verbose("DROP EXTENSION certyo_cdc")
        assert "captured change(s) not delivered" in refused.stderr, "the owner is still told"
    finally:
        cluster.sql("SELECT certyo.resume()")


def test_renaming_tables_cannot_grow_the_workers_memory_without_bound(cluster, attacker):
    """Attack (an attacker pass of 2026-12-05): the worker kept a write-back statement per table
    name, forever: renaming tracked tables in a loop, each with a change to write back, grew it
    by 50 kB a rename (6,000 renames: 66 -> 411 MB). It keeps at most 256 statements now."""
    tables = [make_table(attacker, name=f"rn{i}_0") for i in range(20)]
    pid = cluster.sql("SELECT pid FROM certyo.worker_status()")
    before = peak_memory_kib(pid)
    for it in range(1, 101):
        renames = "; ".join(f"ALTER TABLE {attacker.schema}.rn{i}_{it - 1} RENAME TO rn{i}_{it}; "
                            f"INSERT INTO {attacker.schema}.rn{i}_{it} (id) VALUES ({it})" for i in range(20))
        attacker.sql(f"BEGIN; {renames}; COMMIT")
        if it % 10 == 0:
            last = f"{attacker.schema}.rn0_{it}"
            wait_written_back(cluster, last, it, timeout=60)
    assert len(tables) == 20
    assert cluster.sql("SELECT pid FROM certyo.worker_status()") == pid, "the worker restarted"
    rise = peak_memory_kib(pid) - before
    assert rise < 40 * 1024, f"the worker's peak memory rose by {rise} KiB over 2,000 renames"


def test_failing_backfills_cannot_flood_the_log(cluster, attacker):
    """Attack (an attacker pass of 2026-12-05): one statement requests 20,000 backfills whose
    condition raises a 10 kB error (now at most 16 a table: 208 of 13 tables). The worker logged each failure with its error: 330 warnings
    a second, 63 MB of log in 20 s. Now each error is cut to 1,000 bytes, and the log names at
    most ten failed backfills a minute (each one's error stays in certyo.backfills)."""
    schema = attacker.schema
    # At most 16 backfills of a table may be open: 13 tables take 208.
    tables = [make_table(attacker, name=f"f{i}", rows=3) for i in range(13)]
    attacker.sql(f"CREATE FUNCTION {schema}.fail(int) RETURNS boolean LANGUAGE plpgsql AS "
                 f"$$ BEGIN RAISE EXCEPTION 'nope %', repeat('L', 10000); END $$")
    offset = cluster.log_size()
    attacker.sql("; ".join(f"SELECT count(certyo.backfill('{table}', '{schema}.fail(id)')) FROM generate_series(1, 16)"
                           for table in tables))
    mine = f"relid IN (SELECT oid FROM pg_class WHERE relnamespace = '{schema}'::regnamespace)"
    open_ones = f"SELECT count(*) FROM certyo.backfills WHERE {mine} AND state <> 'failed'"
    assert wait_for(lambda: cluster.sql(open_ones) == "0", 60), "the backfills did not all fail"
    log = cluster.log_since(offset)
    logged = log.count("failed: nope")
    assert 1 <= logged <= 10, f"{logged} failed backfills logged"
    assert len(log) < 50_000, f"the log grew by {len(log)} bytes"
    longest = int(cluster.sql(f"SELECT max(length(error)) FROM certyo.backfills WHERE {mine}"))
    assert longest <= 1100, longest


def test_a_slow_trigger_on_write_back_cannot_hold_up_delivery(cluster, attacker, make_role):
    """Attack: an ENABLE ALWAYS trigger that sleeps a minute in the write-back. The write-back is canceled after certyo.user_code_timeout and retried with
    back-off as a failing table; another role's changes are delivered meanwhile."""
    s = attacker.schema
    table = make_table(attacker)
    attacker.sql(f"""
        CREATE FUNCTION {s}.slow() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.certyo_record_hash IS DISTINCT FROM OLD.certyo_record_hash THEN PERFORM pg_sleep(60); END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER slow BEFORE UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION {s}.slow();
        ALTER TABLE {table} ENABLE ALWAYS TRIGGER slow;
        INSERT INTO {table} (id) VALUES (1);
    """)
    assert wait_for(lambda: cluster.sql(
        f"SELECT count(*) FROM certyo.write_back_failure WHERE relid = '{table}'::regclass") == "1", 30), \
        "the write-back to the slow table is recorded as failing"
    assert_delivered_meanwhile(cluster, make_role("bystander"))
    attacker.sql(f"DROP TRIGGER slow ON {table}")
    wait_written_back(cluster, table, 1, timeout=60)


def test_an_oversized_change_cannot_hold_up_delivery(cluster, attacker, make_role):
    """Attack: a change too large to be sent within certyo.request_timeout would fail every
    attempt, and as the oldest pending change be every probe: no other change of the database
    would go out. A payload above certyo.max_payload_size is kept as a dead letter instead,
    never sent, with the setting named; another role's changes are delivered."""
    cluster.sql("ALTER SYSTEM SET certyo.max_payload_size = '64kB'")
    reload(cluster)
    assert cluster.wait_passes(2), "the worker began no pass after the reload"
    try:
        table = make_table(attacker)
        attacker.sql(f"INSERT INTO {table} VALUES (1, repeat('y', 100000))")
        dead = (f"SELECT last_error FROM certyo.delivery WHERE relid = '{table}'::regclass AND state = 'dead'")
        assert wait_for(lambda: "certyo.max_payload_size" in cluster.sql(dead), 30), cluster.explain()
        assert_delivered_meanwhile(cluster, make_role("bystander"))
    finally:
        cluster.sql("ALTER SYSTEM RESET certyo.max_payload_size")
        reload(cluster)


def peak_memory_kib(pid):
    """The process's peak resident memory so far (VmHWM)."""
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1])


def test_large_changes_are_taken_a_few_at_a_time(cluster, attacker, emulator):
    """Attack: a writer queues 60 changes of 1.5 MB each (a few kB each on disk: they compress).
    A batch of up to 1,000 changes read them all into the worker's memory at once, in several
    copies (the rows read, the records, the request body), and sent them as one 90 MB request:
    with more or larger changes, enough memory to get the worker killed, and a request no
    timeout lets through, with every other change of the database behind it. A batch holds at
    most certyo.max_payload_size of payloads (here 4 MB: two of these changes), and the
    worker's peak memory rises by a few MB."""
    cluster.sql("ALTER SYSTEM SET certyo.max_payload_size = '4MB'")
    reload(cluster)
    assert cluster.wait_passes(2), "the worker began no pass after the reload"
    try:
        pid = cluster.sql("SELECT pid FROM certyo.worker_status()")
        before = peak_memory_kib(pid)
        table = make_table(attacker)
        attacker.sql(f"INSERT INTO {table} SELECT g, repeat('x', 1500000) FROM generate_series(1, 60) g")
        wait_written_back(cluster, table, 60, timeout=120)
        assert cluster.sql("SELECT pid FROM certyo.worker_status()") == pid, "the worker restarted"
        rise = peak_memory_kib(pid) - before
        largest = emulator.stats()["largestRequest"]
        assert largest <= 4 * 1024 * 1024, f"a request of {largest} bytes went out"
        assert rise < 64 * 1024, f"the worker's peak memory rose by {rise} KiB"
    finally:
        cluster.sql("ALTER SYSTEM RESET certyo.max_payload_size")
        reload(cluster)


def test_a_record_id_too_long_to_index_is_refused_where_it_is_written(cluster, attacker, make_role):
    """Attack: a table whose record id is longer than a B-tree entry can hold. It made the
    statement recording its batch fail (the receipts are indexed by record id), pass after
    pass: no change of the database was delivered any more (a bystander's change waited past
    30 s, and the worker said "idle"). A record id over 2,048 bytes is refused in the writer's
    statement (54000), naming the limit; one of 2,048 bytes is delivered, and so are other
    roles' changes."""
    s = attacker.schema
    # A bytea key's text form is twice as long as its value: 1,600 random bytes fit in the
    # table's own index, and become a record id of 3,202 bytes (\x and hex digits), which
    # no index entry can hold (random bytes do not compress).
    attacker.sql(f"CREATE TABLE {s}.keyed (k bytea PRIMARY KEY, v int)")
    attacker.sql(f"SELECT certyo.track('{s}.keyed')")
    random_key = "(SELECT decode(string_agg(md5(random()::text), ''), 'hex') FROM generate_series(1, 100))"
    attempt = attacker.attempt(f"INSERT INTO {s}.keyed VALUES ({random_key}, 1)")
    assert attempt.sqlstate == "54000", attempt
    assert "is 3202 bytes, longer than the 2048 certyo_cdc can keep" in attempt.stderr, attempt
    assert count_rows(cluster, f"{s}.keyed") == 0
    attacker.sql(f"INSERT INTO {s}.keyed VALUES (substr({random_key}, 1, 1023), 1)")
    wait_written_back(cluster, f"{s}.keyed", 1)
    assert_delivered_meanwhile(cluster, make_role("bystander"))


def test_anchoring_evidence_forged_by_a_writer_is_found_by_the_audit(cluster, attacker, make_role):
    """Attack: a role allowed to UPDATE someone else's tracked table sets a row's written-back
    columns itself (capture skips such updates: they are bookkeeping). The audit compares them
    with the receipts: a forged hash, and an anchoring Certyo never confirmed, are named."""
    owner = make_role("owner")
    table = make_table(owner, rows=3)
    owner.sql(f"GRANT USAGE ON SCHEMA {owner.schema} TO {attacker.name}; GRANT SELECT, UPDATE ON {table} TO {attacker.name}")
    wait_anchored(cluster, table, 3)  # verification is over: nothing the worker does changes them now
    assert cluster.sql(f"SELECT count(*) FROM certyo.audit('{table}')") == "0", "the table audits clean first"
    attacker.sql(f"UPDATE {table} SET certyo_record_hash = 'sha256:forged' WHERE id = 1")
    # Receipt 2 as if Certyo had answered its verification with another hash.
    cluster.sql(f"UPDATE certyo.receipt SET anchor_status = 'mismatch' WHERE relid = '{table}'::regclass"
                f" AND record_id = '2'")
    attacker.sql(f"UPDATE {table} SET certyo_anchor_status = 'anchored' WHERE id = 2")
    found = cluster.sql(f"SELECT string_agg(record_id || ': ' || problem, '; ' ORDER BY record_id)"
                        f" FROM certyo.audit('{table}')")
    assert found == "1: record hash changed without capture; 2: anchor status changed without capture", found


def test_a_bc_key_from_a_writer_does_not_block_the_tables_write_back(cluster, attacker, make_role):
    """Attack: a role allowed only to INSERT into someone else's tracked tables adds rows whose
    record id is a date or timestamp before Christ. Capture renders them in ISO 8601 with
    astronomical years (-0001 is 2 BC, 0000 is 1 BC), which Postgres' input refuses: the
    write-back of the whole batch failed, for the owner's rows too, attempt after attempt. The
    write-back now reads them back as BC values, and every row gets its hash."""
    owner = make_role("owner")
    s = owner.schema
    owner.sql(f"""
        CREATE TABLE {s}.events (at timestamptz PRIMARY KEY, v text); SELECT certyo.track('{s}.events');
        CREATE TABLE {s}.days (day date PRIMARY KEY, v text); SELECT certyo.track('{s}.days');
        GRANT USAGE ON SCHEMA {s} TO {attacker.name};
        GRANT INSERT ON {s}.events, {s}.days TO {attacker.name};
    """)
    cluster.sql("SELECT certyo.pause()")  # one batch: the owner's rows and the attacker's together
    try:
        owner.sql(f"INSERT INTO {s}.events VALUES ('2026-03-01 00:00Z', 'v1'); "
                  f"INSERT INTO {s}.days VALUES ('2020-01-01', 'v1'), ('infinity', 'v2')")
        attacker.sql(f"INSERT INTO {s}.events VALUES ('0002-01-01 00:00Z BC', 'x'), ('0001-06-01 12:00Z BC', 'y'); "
                     f"INSERT INTO {s}.days VALUES ('0044-03-15 BC', 'x')")
        owner.sql(f"INSERT INTO {s}.events VALUES ('2026-03-03 00:00Z', 'v3')")
    finally:
        cluster.sql("SELECT certyo.resume()")
    wait_written_back(cluster, f"{s}.events", 4)
    wait_written_back(cluster, f"{s}.days", 3)
    assert cluster.sql(f"SELECT count(*) FROM certyo.write_back_failure WHERE relid IN "
                       f"('{s}.events'::regclass, '{s}.days'::regclass)") == "0"


def test_an_array_or_composite_record_id_is_refused(cluster, attacker):
    """A record id column whose value does not read back from its text (an array, a composite:
    rendered as JSON) would make every write-back to the table fail, forever: track() refuses
    it, naming the column, and tracks nothing."""
    s = attacker.schema
    attacker.sql(f"CREATE TYPE {s}.pair AS (x int, y text); "
                 f"CREATE TABLE {s}.keyed (tags text[] NOT NULL, p {s}.pair NOT NULL, v text)")
    for column, kind in (("tags", "an array"), ("p", "of a composite type")):
        attempt = attacker.attempt(f"SELECT certyo.track('{s}.keyed', record_id_columns => ARRAY['{column}'])")
        assert attempt.sqlstate == "42804", attempt
        assert f'record id column "{column}" of {s}.keyed is {kind}' in attempt.stderr, attempt
    assert cluster.sql(f"SELECT count(*) FROM certyo.tracked_tables WHERE \"table\" = '{s}.keyed'::regclass") == "0"


def assert_delivered_meanwhile(cluster, role):
    """A change of another role's table gets its hash written back within 30 s: before the
    attacker's minute-long sleep (or lock) ends."""
    table = make_table(role, name="served")
    role.sql(f"INSERT INTO {table} (id) VALUES (1)")
    wait_written_back(cluster, table, 1, timeout=30)


def test_non_owner_cannot_track_untrack_or_backfill(cluster, attacker, make_role):
    """Attack: a role with every privilege on a table but not its owner (one owned by another
    ordinary role, one by postgres) calls track(), untrack() and backfill() on it: 42501 each,
    and nothing changes."""
    victim = make_role("victim")
    tables = [make_table(victim, rows=2)]
    cluster.sql(f"CREATE TABLE {victim.schema}.su (id int PRIMARY KEY, v text); SELECT certyo.track('{victim.schema}.su')")
    tables.append(f"{victim.schema}.su")
    cluster.sql(f"GRANT USAGE ON SCHEMA {victim.schema} TO {attacker.name}; "
                f"GRANT ALL ON ALL TABLES IN SCHEMA {victim.schema} TO {attacker.name}")
    state = ("SELECT (SELECT string_agg(tgname || ':' || tgenabled::text || ':' || encode(tgargs, 'hex'), ' ' ORDER BY tgname) "
             "FROM pg_trigger WHERE tgrelid = '{t}'::regclass), (SELECT count(*) FROM certyo.backfills WHERE relid = '{t}'::regclass), "
             "(SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute WHERE attrelid = '{t}'::regclass AND attnum > 0)")
    for table in tables:
        before = cluster.sql(state.format(t=table))
        for call in (f"SELECT certyo.track('{table}')",
                     f"SELECT certyo.track('{table}', exclude_columns => ARRAY['v'])",
                     f"SELECT certyo.untrack('{table}')",
                     f"SELECT certyo.untrack('{table}', drop_columns => true)",
                     f"SELECT certyo.backfill('{table}')",
                     f"SELECT certyo.backfill('{table}', 'true')"):
            attempt = attacker.attempt(call)
            assert attempt.sqlstate == "42501", (call, attempt)
        assert cluster.sql(state.format(t=table)) == before


# ---------------------------------------------------------------------------------------------
# 6. The API key


def test_api_key_is_hidden_from_settings(cluster, attacker):
    """Attack: read the API key through SHOW, current_setting() and pg_settings. An ordinary
    role gets 42501; pg_settings does not list it, even for a superuser."""
    assert cluster.sql("SELECT count(*) FROM pg_settings WHERE name = 'certyo.api_key'") == "0"
    for statement in ("SHOW certyo.api_key", "SELECT current_setting('certyo.api_key')"):
        attempt = attacker.attempt(statement)
        assert attempt.sqlstate == "42501", (statement, attempt)
    attempt = attacker.attempt("SHOW ALL; SELECT setting FROM pg_settings;")
    assert attempt.sqlstate is None, attempt
    assert KEY not in attempt.stdout


def wait_unauthorized(cluster, timeout=30):
    return wait_for(lambda: cluster.sql("SELECT state FROM certyo.worker_status()") == "unauthorized", timeout)


def test_api_key_never_logged(cluster, attacker):
    """Attack (on the log's readers): the key set with ALTER SYSTEM and reloaded must not
    appear in the server log, where Postgres reports changed parameters."""
    key = f"leak-check-{uuid.uuid4().hex}"
    table = make_table(attacker)
    offset = cluster.log_size()
    try:
        cluster.sql(f"ALTER SYSTEM SET certyo.api_key = '{key}'")
        reload(cluster)
        changed = wait_for(lambda: any("certyo.api_key" in line and "changed" in line
                                       for line in cluster.log_since(offset).splitlines()), 30)
        assert changed, "the server log never said that certyo.api_key changed"
        attacker.sql(f"INSERT INTO {table} (id) VALUES (1)")
        assert wait_unauthorized(cluster), "the worker did not take the new key (Certyo does not know it)"
        assert key not in cluster.log(), "the API key is in the server log"
        assert key not in cluster.sql("SELECT row_to_json(w)::text FROM certyo.worker_status() w")
    finally:
        cluster.sql("ALTER SYSTEM RESET certyo.api_key")
        reload(cluster)
    wait_written_back(cluster, table, 1)
    assert key not in cluster.log(), "the API key is in the server log"


def write_key_file(path, key):
    with open(path, "w") as f:
        f.write(key + "\n")
    postgres = pwd.getpwnam("postgres")
    os.chown(path, postgres.pw_uid, postgres.pw_gid)
    os.chmod(path, 0o600)


def test_api_key_file(cluster, attacker):
    """certyo.api_key_file names a file (postgres's, mode 0600) holding the key, used instead
    of certyo.api_key: with it set and certyo.api_key empty, changes are delivered; with a wrong
    key in the file the worker reports 'unauthorized' without showing the key, anywhere."""
    path = f"{DIR}/api-key-{uuid.uuid4().hex}"
    wrong = f"wrong-key-{uuid.uuid4().hex}"
    write_key_file(path, KEY)
    table = make_table(attacker)
    try:
        cluster.sql(f"ALTER SYSTEM SET certyo.api_key_file = '{path}'")
        # Not RESET: that would fall back to the key in postgresql.conf and prove nothing.
        cluster.sql("ALTER SYSTEM SET certyo.api_key = ''")
        reload(cluster)
        assert wait_for(lambda: cluster.sql("SELECT current_setting('certyo.api_key_file')") == path, 30)
        attacker.sql(f"INSERT INTO {table} (id) VALUES (1)")
        wait_written_back(cluster, table, 1)

        write_key_file(path, wrong)
        reload(cluster)
        attacker.sql(f"INSERT INTO {table} (id) VALUES (2)")
        assert wait_unauthorized(cluster), cluster.sql("SELECT row_to_json(w)::text FROM certyo.worker_status() w")
        assert count_rows(cluster, table, "id = 2 AND certyo_record_hash IS NULL") == 1
        assert wrong not in cluster.sql("SELECT row_to_json(w)::text FROM certyo.worker_status() w")
        assert wrong not in cluster.log(), "the key from the file is in the server log"
    finally:
        cluster.sql("ALTER SYSTEM RESET certyo.api_key_file", check=False)
        cluster.sql("ALTER SYSTEM RESET certyo.api_key")
        reload(cluster)
    wait_written_back(cluster, table, count_rows(cluster, table))


# Statements that set the key, in spellings the server's parser accepts ({k}: the key), each
# run with log_statement = 'all' and log_min_duration_statement = 0 (and the default
# log_min_error_statement = error, which logs the statement of a failed one).
KEY_STATEMENTS = {
    "spaces": "ALTER SYSTEM SET certyo . api_key = '{k}';",
    "quoted-name": 'ALTER SYSTEM SET "certyo"."api_key" = \'{k}\';',
    "comment-in-name": "ALTER SYSTEM SET certyo/**/.api_key = '{k}';",
    "upper-case": "ALTER SYSTEM SET CERTYO.API_KEY = '{k}';",
    "to-and-newlines": 'ALTER SYSTEM SET "CERTYO"\n  . api_key\n  TO\n  \'{k}\';',
    "unquoted-value": "ALTER SYSTEM SET certyo.api_key = {k};",
    "dollar-quoted-value": "ALTER SYSTEM SET certyo.api_key = $${k}$$;",
    "escape-string-value": "ALTER SYSTEM SET certyo.api_key = E'{k}';",
    "unicode-escaped-name": 'ALTER SYSTEM SET U&"certyo".U&"api\\005fkey" = \'{k}\';',
    "syntax-error-after": "ALTER SYSTEM SET \"certyo\".api_key = '{k}' garbage;",
    "unterminated-string": "ALTER SYSTEM SET certyo . api_key = '{k}",
    "alter-database": "ALTER DATABASE postgres SET certyo . api_key = '{k}';",
    "alter-role": 'ALTER ROLE postgres SET "certyo"."api_key" TO \'{k}\';',
    "session-set": "SET certyo .api_key TO '{k}';",
    "set-config": "SELECT set_config('CERTYO.api_key', '{k}', false);",
    "set-config-named-arguments": "SELECT set_config(new_value => '{k}', setting_name => 'certyo.api_key', is_local => false);",
    "set-config-unquoted-value": "SELECT set_config('certyo.api_key', {k}, false);",
    "set-config-bound-parameter": "SELECT set_config('certyo.api_key', $1, false) \\bind '{k}' \\g",
    "prepared-statement": "PREPARE set_key(text) AS SELECT set_config('certyo.api_key', $1, false);\nEXECUTE set_key('{k}');",
}


@pytest.mark.parametrize("case", list(KEY_STATEMENTS))
def test_api_key_set_in_any_spelling_is_not_logged(cluster, case):
    """Attack (on the log's readers): the key is set with a statement that every log setting
    writes out (log_statement = 'all', log_min_duration_statement = 0, the statement of an
    error), spelled as the parser allows: spaces, quotes or a comment in the name, upper case,
    TO, a value unquoted, dollar- or E-quoted, a Unicode-escaped name, a syntax error after the
    value or an unterminated string, ALTER DATABASE / ROLE, SET, set_config() with the name in
    any case, by named arguments, with the key as a bound parameter or as the argument of a
    prepared statement's EXECUTE. The log says that a
    statement ran, never the key (nor any part of it as long as its random half)."""
    secret = uuid.uuid4().hex
    key = f"leak_check_{secret}"  # a valid identifier too, for the unquoted value
    statement = KEY_STATEMENTS[case].format(k=key)
    offset = cluster.log_size()
    try:
        attempt = cluster.attempt_verbose("SET log_statement = 'all';\nSET log_min_duration_statement = 0;\n"
                                          f"{statement}\n", stop_on_error=False)
    finally:
        cluster.sql("ALTER SYSTEM RESET certyo.api_key")
        cluster.sql("ALTER DATABASE postgres RESET certyo.api_key")
        cluster.sql("ALTER ROLE postgres RESET certyo.api_key")
    log = cluster.log_since(offset)
    assert "log_min_duration_statement" in log, f"the statements were not logged: {log[-2000:]}"
    assert secret not in log, f"the API key is in the server log ({attempt!r}):\n{log[-3000:]}"


def test_api_key_echoed_by_certyo_is_masked(cluster, attacker, emulator):
    """Attack (on the readers of the log, certyo.worker_status(), certyo.status and
    certyo.history()): Certyo's answer quotes the API key it was sent, which came from
    certyo.api_key_file: a 400 (the change becomes a dead letter, its error kept) and a 401
    (the worker stops, saying what Certyo answered). The answers are recorded and shown, the
    key in them masked."""
    path = f"{DIR}/api-key-{uuid.uuid4().hex}"
    write_key_file(path, KEY)
    table = make_table(attacker)
    offset = cluster.log_size()
    echoed = "request refused for X-API-Key"
    try:
        cluster.sql(f"ALTER SYSTEM SET certyo.api_key_file = '{path}'")
        # Not RESET: the key would come from postgresql.conf, where the log hook knows it.
        cluster.sql("ALTER SYSTEM SET certyo.api_key = ''")
        reload(cluster)
        assert cluster.wait_passes(2), cluster.explain()
        attacker.sql(f"INSERT INTO {table} (id) VALUES (1)")
        wait_written_back(cluster, table, 1)

        emulator.fault("echo-key", status=400)
        attacker.sql(f"INSERT INTO {table} (id) VALUES (2)")
        dead = f"SELECT last_error FROM certyo.delivery WHERE state = 'dead' AND record_id = '2' AND relid = '{table}'::regclass"
        assert wait_for(lambda: echoed in cluster.sql(dead), 30), cluster.explain()
        shown = "\n".join([cluster.sql(dead),
                           cluster.sql(f"SELECT row_to_json(h)::text FROM certyo.history('{table}', '2') h"),
                           cluster.sql("SELECT row_to_json(s)::text FROM certyo.status s"),
                           cluster.sql("SELECT row_to_json(w)::text FROM certyo.worker_status() w")])
        assert echoed in shown and KEY not in shown, shown

        emulator.fault("echo-key", status=401)
        attacker.sql(f"INSERT INTO {table} (id) VALUES (3)")
        assert wait_unauthorized(cluster), cluster.explain()
        status = cluster.sql("SELECT row_to_json(w)::text FROM certyo.worker_status() w")
        assert echoed in status and KEY not in status, status
        log = cluster.log_since(offset)
        assert echoed in log, log[-3000:]
        assert KEY not in log, f"the key from the file is in the server log:\n{log[-3000:]}"
    finally:
        cluster.sql("ALTER SYSTEM RESET certyo.api_key_file", check=False)
        cluster.sql("ALTER SYSTEM RESET certyo.api_key")
        reload(cluster)
    cluster.sql(f"SELECT certyo.retry('{table}')")
    wait_written_back(cluster, table, 3)


def test_api_key_file_must_be_a_regular_file(cluster, attacker):
    """Attack (on delivery): certyo.api_key_file names a FIFO, which a read waits on until
    someone writes to it, forever. The worker refuses it, says why, and goes on serving."""
    fifo = f"{DIR}/api-key-fifo-{uuid.uuid4().hex}"
    os.mkfifo(fifo, 0o600)
    postgres = pwd.getpwnam("postgres")
    os.chown(fifo, postgres.pw_uid, postgres.pw_gid)
    table = make_table(attacker)
    try:
        cluster.sql(f"ALTER SYSTEM SET certyo.api_key_file = '{fifo}'")
        reload(cluster)
        refused = wait_for(lambda: "is not a regular file" in cluster.sql("SELECT detail FROM certyo.worker_status()"), 30)
        assert refused, cluster.explain()
        assert cluster.sql("SELECT state FROM certyo.worker_status()") == "not configured"
    finally:
        # A worker that waits in open() or read() on the FIFO gets a writer, and the end of it.
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # no reader waits: nothing to release
        cluster.sql("ALTER SYSTEM RESET certyo.api_key_file")
        reload(cluster)
        os.unlink(fifo)
    attacker.sql(f"INSERT INTO {table} (id) VALUES (1)")
    wait_written_back(cluster, table, 1)


# ---------------------------------------------------------------------------------------------
# 7. Malformed input never crashes and never shows Rust internals

# (statement run by the owner of {t}, a tracked table in schema {s}; expected SQLSTATE, or
# "error" for any ordinary error, or "any" for a result or an ordinary error).
MALFORMED = {
    "null-record-id-element": ("SELECT certyo.track('{t}', record_id_columns => ARRAY[NULL]::text[])", "22004"),
    "null-among-record-id": ("SELECT certyo.track('{t}', record_id_columns => ARRAY['id', NULL])", "22004"),
    "null-exclude-element": ("SELECT certyo.track('{t}', exclude_columns => ARRAY[NULL]::text[])", "22004"),
    "empty-record-id-column": ("SELECT certyo.track('{t}', record_id_columns => ARRAY[''])", "error"),
    "empty-exclude-column": ("SELECT certyo.track('{t}', exclude_columns => ARRAY[''])", "error"),
    "empty-timestamp-column": ("SELECT certyo.track('{t}', timestamp_column => '')", "error"),
    "empty-table-name": ("SELECT certyo.track('')", "error"),
    "empty-condition": ("SELECT certyo.backfill('{t}', '')", "any"),
    "megabyte-record-id-column": ("SELECT certyo.track('{t}', record_id_columns => ARRAY[repeat('x', 1048576)])", "error"),
    "megabyte-exclude-column": ("SELECT certyo.track('{t}', exclude_columns => ARRAY[repeat('x', 1048576)])", "error"),
    "megabyte-timestamp-column": ("SELECT certyo.track('{t}', timestamp_column => repeat('x', 1048576))", "error"),
    "megabyte-condition-identifier": ("SELECT certyo.backfill('{t}', repeat('x', 1048576))", "error"),
    "megabyte-condition-parentheses": ("SELECT certyo.backfill('{t}', repeat('(', 524288) || 'true' || repeat(')', 524288))", "error"),
    "megabyte-condition-literal": ("SELECT certyo.backfill('{t}', 'v IS DISTINCT FROM ' || quote_literal(repeat('x', 1048576)))", "any"),
    "injected-record-id-column": ("SELECT certyo.track('{t}', record_id_columns => ARRAY['id\"; DROP TABLE vault.canary; --'])", "error"),
    "quoted-exclude-column": ("SELECT certyo.track('{t}', exclude_columns => ARRAY['v'' OR ''1''=''1'])", "error"),
    "quoted-timestamp-column": ("SELECT certyo.track('{t}', timestamp_column => 'a\"b')", "error"),
    "capture-option-garbage": ("SELECT certyo.capture_option('\\xdeadbeef00ff00fe'::bytea, 'record_id')", "any"),
    "capture-option-invalid-utf8": ("SELECT certyo.capture_option('\\x7265636f72645f69643dff3d'::bytea, 'record_id')", "any"),
    "capture-option-huge": ("SELECT certyo.capture_option(decode(repeat('ff00', 262144), 'hex'), repeat('k', 1048576))", "any"),
    "capture-called-directly": ("SELECT certyo.capture()", "error"),
    "capture-as-before-trigger": ("CREATE TABLE {s}.u (id int PRIMARY KEY); CREATE TRIGGER x BEFORE INSERT ON {s}.u "
                                  "FOR EACH ROW EXECUTE FUNCTION certyo.capture(); INSERT INTO {s}.u VALUES (1);", "error"),
    "capture-as-statement-trigger": ("CREATE TABLE {s}.u (id int PRIMARY KEY); CREATE TRIGGER x AFTER INSERT ON {s}.u "
                                     "FOR EACH STATEMENT EXECUTE FUNCTION certyo.capture(); INSERT INTO {s}.u VALUES (1);", "error"),
    "capture-without-arguments": ("CREATE TABLE {s}.u (id int PRIMARY KEY); CREATE TRIGGER x AFTER INSERT ON {s}.u "
                                  "FOR EACH ROW EXECUTE FUNCTION certyo.capture(); INSERT INTO {s}.u VALUES (1);", "error"),
    "capture-with-garbage-arguments": ("CREATE TABLE {s}.u (id int PRIMARY KEY); CREATE TRIGGER x AFTER INSERT ON {s}.u "
                                       "FOR EACH ROW EXECUTE FUNCTION certyo.capture('record_id=nope', 'exclude', '=', 'timestamp=id'); "
                                       "INSERT INTO {s}.u VALUES (1);", "error"),
    "untrack-null": ("SELECT certyo.untrack(NULL)", "error"),
    "untrack-null-drop-columns": ("SELECT certyo.untrack('{t}', NULL)", "any"),
}


def check_malformed(attempt, expect, what):
    assert_no_backtrace(attempt)
    if expect == "error":
        assert attempt.sqlstate is not None, (what, attempt)
    elif expect != "any":
        assert attempt.sqlstate == expect, (what, attempt)
    if attempt.sqlstate == "XX000":
        warnings.warn(f"{what}: internal error (XX000) rather than an ordinary one: {error_message(attempt)[:300]}")


def assert_no_backtrace_logged(cluster, watch):
    log = cluster.log_since(watch.log_offset)
    for sign in ("panicked at", "stack backtrace"):
        assert sign not in log, f"{sign!r} in the server log: {log[-2000:]}"


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_input(cluster, attacker, watch, case):
    """Attack: malformed arguments (NULL array elements, empty strings, 1 MB names and
    conditions, quotes, garbage trigger arguments, capture() outside a trigger): an ordinary
    ERROR, never a crash or a Rust backtrace."""
    table = make_table(attacker, rows=2)
    statement, expect = MALFORMED[case]
    attempt = attacker.attempt(statement.format(t=table, s=attacker.schema))
    check_malformed(attempt, expect, case)
    assert_no_backtrace_logged(cluster, watch)


VALUES = {"regclass": "'{t}'::regclass", "text": "'1'", "text[]": "ARRAY['id']", "name": "'v'::name",
          "boolean": "false", "bigint": "-1", "bigint[]": "ARRAY[-1]::bigint[]", "bytea": "'\\x00'::bytea",
          "integer": "-1", "oid": "0::oid"}


def test_null_arguments_to_every_function(cluster, attacker, watch):
    """Attack: every function of schema certyo called with NULL for all its arguments, and for
    each argument alone, by a superuser (to reach the code) and by an ordinary role: a result or
    an ordinary error, never a crash or a backtrace."""
    table = make_table(attacker, rows=2)
    functions = cluster.sql("""
        SELECT p.proname, array_to_string(ARRAY(SELECT format_type(t, NULL) FROM unnest(p.proargtypes::oid[]) t), ',')
          FROM pg_proc p WHERE p.pronamespace = 'certyo'::regnamespace AND p.pronargs > 0 AND p.prokind = 'f'
         ORDER BY 1, 2""").splitlines()
    assert len(functions) >= 8, functions
    calls = []
    for line in functions:
        name, types = line.split("|")
        types = types.split(",")
        calls.append(f"SELECT certyo.{name}({', '.join(f'NULL::{t}' for t in types)})")
        for i in range(len(types)):
            args = [f"NULL::{t}" if j == i else VALUES.get(t, f"NULL::{t}").format(t=table) for j, t in enumerate(types)]
            calls.append(f"SELECT certyo.{name}({', '.join(args)})")
    for user in ("postgres", attacker.name):
        for call in calls:
            check_malformed(cluster.attempt_verbose(call, user), "any", f"{call} as {user}")
    assert_no_backtrace_logged(cluster, watch)


def test_refresh_capture_trigger_on_someone_elses_table(cluster, attacker, make_role):
    """Attack: certyo.refresh_capture_trigger() (meant for the DDL event trigger) on a tracked
    table of another role: 42501, and the trigger is unchanged."""
    victim = make_role("victim")
    table = make_table(victim, rows=1)
    before = cluster.sql(f"SELECT tgargs, tgattr FROM pg_trigger WHERE tgrelid = '{table}'::regclass ORDER BY tgname")
    attempt = attacker.attempt(f"SELECT certyo.refresh_capture_trigger('{table}')")
    assert attempt.sqlstate == "42501", attempt
    assert_no_backtrace(attempt)
    assert cluster.sql(f"SELECT tgargs, tgattr FROM pg_trigger WHERE tgrelid = '{table}'::regclass ORDER BY tgname") == before


# ---------------------------------------------------------------------------------------------
# 8. The operator surface is not for ordinary roles


OPERATOR_CALLS = {
    "worker_status": "SELECT * FROM certyo.worker_status()",
    "wake": "SELECT certyo.wake()",
    "pause": "SELECT certyo.pause()",
    "resume": "SELECT certyo.resume()",
    "retry": "SELECT certyo.retry()",
    "verify_now": "SELECT certyo.verify_now()",
    "history": "SELECT * FROM certyo.history('{t}', '1')",
    "cancel_backfill": "SELECT certyo.cancel_backfill(1)",
    "audit": "SELECT * FROM certyo.audit('{t}')",
    "status": "SELECT * FROM certyo.status",
    "queue": "SELECT * FROM certyo.queue",
    "delivery": "SELECT * FROM certyo.delivery",
    "receipt": "SELECT * FROM certyo.receipt",
    "backfills": "SELECT * FROM certyo.backfills",
    "worker_state": "SELECT * FROM certyo.worker_state",
    "worker_state-update": "UPDATE certyo.worker_state SET paused = true",
    "queue-delete": "DELETE FROM certyo.queue",
}


@pytest.mark.parametrize("call", list(OPERATOR_CALLS.values()), ids=list(OPERATOR_CALLS))
def test_operator_surface_refused_to_ordinary_role(cluster, attacker, call):
    """Attack: an ordinary role calls the operator functions and reads or writes the worker's
    tables: 42501 each (even on its own table)."""
    table = make_table(attacker, rows=1)
    attempt = attacker.attempt(call.format(t=table))
    assert attempt.sqlstate == "42501", attempt
    assert cluster.sql("SELECT paused FROM certyo.worker_state") == "f"


# ---------------------------------------------------------------------------------------------
# 9. Search-path hijack of the worker through schema public


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
