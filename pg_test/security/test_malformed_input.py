"""Security: malformed input from an ordinary role never crashes the server and never shows
Rust internals (a backfill condition the parser rejects once crashed it).

Same fixtures and after-test checks as every security suite (pg_test/conftest.py): no role
gains a privilege, the server never crashes, vault.canary stays intact; shared helpers in
pg_test/security/helpers.py."""
import warnings

import pytest

from helpers import assert_no_backtrace, backfill_rows, error_message, make_table


# ---------------------------------------------------------------------------------------------
# A LOGIN role crashed the server


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
# Malformed input never crashes and never shows Rust internals

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
    "capture-table-id-garbage": ("SELECT certyo.capture_table_id('\\x7461626c655f69643dff3d00'::bytea)", "any"),
    "capture-table-id-huge": ("SELECT certyo.capture_table_id(convert_to('table_id=' || repeat('9', 1048576), 'UTF8'))", "any"),
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
