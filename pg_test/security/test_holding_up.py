"""Security: no role holds up the delivery of other tables (sleeps, locks, slow triggers, large
changes), or grows the worker's memory or log without bound.

Same fixtures and after-test checks as every security suite (pg_test/conftest.py): no role
gains a privilege, the server never crashes, vault.canary stays intact; shared helpers in
pg_test/security/helpers.py."""
import subprocess
import time

from harness import wait_for
from helpers import (assert_delivered_meanwhile, count_rows, make_table, reload, upserts_captured,
                     wait_anchored, wait_backfill, wait_written_back)


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
