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


def test_a_non_owners_track_holds_up_no_writer(cluster, attacker, make_role):
    """Attack: while a writer's transaction is open on a table (a tracked one of another role's,
    or certyo_cdc's own queue, which every capture writes), a role that owns neither calls
    track() on it, by OID (no USAGE on its schema needed). Had track() asked for its lock
    before its owner check, that request would wait for the writer, and every writer after it
    would queue behind it. Refused at once (42501), waiting for no lock."""
    victim = make_role("victim")
    cluster.sql(f"CREATE TABLE {victim.schema}.busy (id int PRIMARY KEY, v text); "
                f"ALTER TABLE {victim.schema}.busy OWNER TO {victim.name}; SELECT certyo.track('{victim.schema}.busy')")
    held = cluster.hold_open(f"BEGIN; INSERT INTO {victim.schema}.busy VALUES (1, 'open');")
    try:
        # (certyo_cdc's own tables are refused as such, before whose they are.)
        for table, refused in ((f"{victim.schema}.busy", "42501"), ("certyo.queue", "22023")):
            oid = cluster.sql(f"SELECT '{table}'::regclass::oid")
            attempt = attacker.attempt(f"SET lock_timeout = '5s'; SELECT certyo.track({oid}::oid::regclass)")
            assert attempt.sqlstate == refused, (table, attempt)
    finally:
        held.close()


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


# ---------------------------------------------------------------------------------------------
# A superuser's track() or ATTACH reads an ordinary role's table, never what its name comes to mean


@pytest.mark.parametrize("statement", ["attach", "track"])
def test_a_table_swapped_for_a_view_while_its_rows_are_read_runs_nothing_as_the_reader(cluster, attacker, statement):
    """Attack: a superuser attaches (or tracks) a table that an ordinary role prepared, with a
    bookkeeping column, so that its rows are read for marks. The role holds its table locked;
    while the read waits, it renames the table away and creates a view of that name whose
    column calls its function, which, run as a superuser, makes the role one. The read went
    by name and ran the view as the superuser. Now the table is locked by OID before its name
    is read, so the view is never what the read opens."""
    import threading
    from harness import wait_for
    s = attacker.schema
    o = f"{attacker.name}_offered"
    cluster.sql(f"GRANT CREATE ON SCHEMA public TO {attacker.name}")
    cluster.sql(f"CREATE TABLE {s}.host (id int PRIMARY KEY, v text) PARTITION BY RANGE (id); "
                f"CREATE TABLE {s}.host_1 PARTITION OF {s}.host FOR VALUES FROM (0) TO (100); "
                f"SELECT certyo.track('{s}.host')")
    attacker.sql(f"""
        CREATE TABLE public.{o} (id int PRIMARY KEY, v text, certyo_record_hash text);
        CREATE FUNCTION {s}.evil() RETURNS text LANGUAGE plpgsql AS $$
        BEGIN
            IF current_setting('is_superuser') = 'on' THEN
                EXECUTE 'ALTER ROLE {attacker.name} SUPERUSER';
                -- the names put back, so that the superuser's statement succeeds and commits
                EXECUTE 'ALTER VIEW public.{o} RENAME TO {o}_view';
                EXECUTE 'ALTER TABLE public.{o}_real RENAME TO {o}';
            END IF;
            RETURN NULL;
        END $$;
    """)
    victim = {"attach": f"ALTER TABLE {s}.host ATTACH PARTITION public.{o} FOR VALUES FROM (100) TO (200)",
              "track": f"SELECT certyo.track('public.{o}')"}[statement]
    held = cluster.hold_open(f"BEGIN; LOCK TABLE public.{o} IN ACCESS EXCLUSIVE MODE;", user=attacker.name)
    outcome = {}
    running = threading.Thread(target=lambda: outcome.setdefault("attempt", cluster.attempt_verbose(victim)))
    try:
        running.start()
        waiting = f"SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%public.{o}%'"
        assert wait_for(lambda: cluster.sql(waiting) == "1", 15), "the superuser's statement waits for the table"
        held.process.communicate(f"ALTER TABLE public.{o} RENAME TO {o}_real; "
                                 f"CREATE VIEW public.{o} AS SELECT {s}.evil() AS certyo_record_hash, "
                                 f"NULL::text AS certyo_anchor_status, NULL::timestamptz AS certyo_verified_at; COMMIT;\n",
                                 timeout=15)
    finally:
        if held.process.poll() is None:
            held.close()
        running.join(60)
    assert "attempt" in outcome, "the statement ended"
    assert cluster.sql(f"SELECT rolsuper FROM pg_roles WHERE rolname = '{attacker.name}'") == "f"
    cluster.sql(f"SELECT certyo.untrack(\"table\") FROM certyo.tracked_tables "
                f"WHERE \"table\" IN (to_regclass('{s}.host'), to_regclass('public.{o}'), to_regclass('public.{o}_real')); "
                f"DROP VIEW IF EXISTS public.{o}, public.{o}_view; DROP TABLE IF EXISTS {s}.host, public.{o}, public.{o}_real; "
                f"REVOKE CREATE ON SCHEMA public FROM {attacker.name}")
