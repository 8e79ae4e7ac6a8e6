"""Shared by the security suites under pg_test/security/ (fixtures and after-test checks in
pg_test/conftest.py): tables made and changed by an attacking role, waits on delivery, and
checks of who ran the attack code.

Run:  CERTYO_EMULATOR=target/release/certyo-emulator python3 -m pytest -q pg_test/security

How these suites began (then one file, pg_test/test_security.py):

Security regression tests for certyo_cdc: real attacks by an unprivileged LOGIN role against a
real PostgreSQL 15 cluster with certyo_cdc preloaded and the Certyo emulator (fixtures in
conftest.py). After every test conftest.py also checks that the attacking roles are still
unprivileged, that the server never crashed (same postmaster, no crash in the log) and that
vault.canary, a postgres-owned table every attack payload overwrites when it runs as a
superuser, is intact.

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


from harness import wait_for

BACKTRACE_SIGNS = ("backtrace", ".rs:", "panicked")


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


def assert_delivered_meanwhile(cluster, role):
    """A change of another role's table gets its hash written back within 30 s: before the
    attacker's minute-long sleep (or lock) ends."""
    table = make_table(role, name="served")
    role.sql(f"INSERT INTO {table} (id) VALUES (1)")
    wait_written_back(cluster, table, 1, timeout=30)
