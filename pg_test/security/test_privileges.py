"""Security: only a table's owner may track, untrack, backfill or refresh its capture, and the
operator surface is not for ordinary roles.

Same fixtures and after-test checks as every security suite (pg_test/conftest.py): no role
gains a privilege, the server never crashes, vault.canary stays intact; shared helpers in
pg_test/security/helpers.py."""
import pytest

from helpers import assert_no_backtrace, make_table


# ---------------------------------------------------------------------------------------------
# Only the owner may track, untrack, backfill or refresh the capture trigger


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
# The operator surface is not for ordinary roles


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
