"""Security: a backfill condition runs as the role that asked, in its own settings, and cannot
escape its parentheses.

Same fixtures and after-test checks as every security suite (pg_test/conftest.py): no role
gains a privilege, the server never crashes, vault.canary stays intact; shared helpers in
pg_test/security/helpers.py."""
import pytest

from helpers import (assert_no_backtrace, assert_ran_only_as, assert_still_delivering,
                     assert_unprivileged, backfill_rows, count_rows, exercise_worker, literal,
                     lookalikes, make_table, returned, superuser_runs, upserts_captured,
                     wait_backfill, wait_rows)


# ---------------------------------------------------------------------------------------------
# Backfill conditions run in the worker


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
# Injection through backfill conditions


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
