"""Randomized operation sequences (in the spirit of Jepsen and of state-machine property tests).

From a seed, a generator interleaves on one tracked table: writers (INSERT, UPDATE, DELETE;
some in transactions held open across other steps, some rolled back), record key changes
(including to a value equal under the column's collation or numeric scale), ADD / DROP /
RENAME COLUMN, primary key moves, untrack and track (again, with other record id columns,
with or without backfill), certyo.backfill(), pause and resume, Certyo faults, the worker
ended (pg_terminate_backend) or killed (kill -9, a crash restart of the server), server
restarts, dump and restore into a cluster made anew by initdb or failover to a streaming
standby (in some sequences: at least once in those), and tampering (rows changed
as a superuser with session_replication_role = replica, behind capture's back). A model in
this file follows what each committed step did to the table.

After each sequence, once the system has settled (conditions, not sleeps), the invariants:
  1. every committed version captured while the table was tracked is at Certyo exactly once
     (an insert, update or delete under the record id the row had then; a key change as a
     delete of the old record id and an insert of the new), nothing else but backfill
     upserts of committed versions; nothing a rolled-back transaction wrote, nothing written
     while the table was untracked;
  2. per record id, in the order of the commits (an upsert after the version it carries);
  3. no row holds a record hash that is not Certyo's hash of a version of that row (never
     another row's, never a delete's) and, unless the sequence changed the row behind
     capture's back, of the row's current content in every column that version holds;
     `anchored` only with such a hash;
  4. certyo.audit() names exactly the rows changed behind capture's back (tampered, or
     written while untracked: documented as "changed without capture" / "never captured";
     rows deleted while untracked are no row finding but the table's "removed while untracked",
     see docs/operations.md), and otherwise
     only "schema changed since capture" for sequences that changed the schema or key.

Every row carries `r` (its number in the model, never changed) and `ver` (a number unique to
each version written), so that each version at Certyo can be told apart.

Each seed tracks the table in one write-back mode ('accepted', 'anchored' or the sidecar mode
'none', by the seed modulo 3, or CERTYO_WRITE_BACK); in the sidecar mode what a row's bookkeeping columns would say
is read from certyo.record_status() and held to the same invariants.

CI runs the fixed SEEDS; CERTYO_SEED=1234 (or 1,2,3) runs others, CERTYO_STEPS the steps per
sequence (default 24); `make soak SOAK_MINUTES=30` runs new seeds for that long
(scripts/soak.sh) and prints each failing seed with the command that replays it:

    CERTYO_SEED=1234 CERTYO_EMULATOR=target/release/certyo-emulator python3 -m pytest -q pg_test/test_sequences.py
"""
import json
import os
import random
import signal
import subprocess
from decimal import Decimal

import pytest

from harness import PG_BIN, TMP, Cluster, free_port, wait_for

# Chosen so that together they take every kind of step, two of them a dump and restore.
SEEDS = [101, 202, 303, 404, 505, 606]
STEPS = int(os.environ.get("CERTYO_STEPS", "24"))
DIRS = [f"{TMP}/certyo-e2e-sequences-a", f"{TMP}/certyo-e2e-sequences-b"]
SETTINGS = """
certyo.verify_min_age = '1s'
certyo.verify_interval = '500ms'
certyo.backfill_chunk_size = 4
certyo.max_retry_interval = '2s'
"""
FIXED = ("r", "id", "k", "n", "ver", "v")  # the model's columns, never dropped
SETTLE = 90  # seconds a sequence may take to settle before that is itself a failure


def seeds():
    chosen = os.environ.get("CERTYO_SEED")
    return [int(s) for s in chosen.split(",")] if chosen else SEEDS


@pytest.fixture(autouse=True)
def watch():
    """Overrides conftest's: each sequence brings its own clusters."""
    yield None


def quote(value):
    return "'" + str(value).replace("'", "''") + "'"


def parse(text):
    """JSON with numbers kept exact (numeric scale aside: Decimal('1.5') == Decimal('1.50'))."""
    return json.loads(text, parse_float=Decimal, parse_int=Decimal)


class Row:
    def __init__(self, r, id_, k, n, ver, v):
        self.r, self.id, self.k, self.n, self.ver, self.v = r, id_, k, n, ver, v
        self.alive = True
        self.captured = None  # the content Certyo last got for this row (tuple), None: never
        self.captured_key = None  # the record key column that content was captured under
        self.deleted_behind = False  # deleted behind capture's back while tracked
        self.removed_untracked = False  # deleted while untracked, Certyo last holding it alive
        self.names = set()  # every record id it has had under any key column
        self.name_all()

    def content(self):
        return (self.id, self.k, self.n, self.ver, self.v)

    def name_all(self):
        self.names |= {str(self.id), self.k, self.n}

    def record_id(self, column):
        return {"id": str(self.id), "k": self.k, "n": self.n}[column]

    def dirty(self):
        """Would the audit name it (see the module's invariant 4)?"""
        if self.alive:
            return self.captured is None or self.captured != self.content()
        return self.deleted_behind and self.captured is not None


class Txn:
    """A transaction held open across steps: its statements ran, its effects wait for COMMIT."""

    def __init__(self, held, effects, rows):
        self.held, self.effects, self.rows = held, effects, rows


class Sequence:
    def __init__(self, seed, emulator):
        self.seed, self.emulator = seed, emulator
        self.rng = random.Random(seed)
        self.may_restore = self.rng.random() < 0.4
        # The write-back mode by the seed (the steps of a seed stay what they were): a third of
        # the seeds each, and CI's SEEDS two of each.
        self.write_back = os.environ.get("CERTYO_WRITE_BACK") or ("accepted", "anchored", "none")[seed % 3]
        self.log = []
        self.rows = {}
        self.counter = 0  # for fresh ids, k, n, ver
        self.seq = 0  # commit order of writes
        self.events = []  # (record_id, operation, r, ver, seq): what Certyo must get
        self.written = {}  # (r, ver) -> seq of the commit that wrote it, tracked or not
        self.rolled_back = set()  # (r, ver) of versions never committed
        self.txns = []
        self.pk = "id"
        self.record_columns = None  # None: the primary key
        self.tracked = True
        self.paused = False
        self.extra = []  # columns added by the sequence, still there
        self.schema_changed = False
        self.removed_while_untracked = False
        self.tampered = False
        self.dir_index = 0
        self.restored = False
        self.cluster = None

    # -- plumbing ---------------------------------------------------------------------------

    def fresh(self):
        self.counter += 1
        return self.counter

    def key(self):
        return self.record_columns or self.pk

    def say(self, what):
        self.log.append(what)

    def sql(self, statement):
        return self.cluster.sql(statement)

    def start(self):
        self.cluster = Cluster(DIRS[0], free_port(), self.emulator.url, SETTINGS)
        self.sql(f"""
            CREATE EXTENSION certyo_cdc;
            CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
            CREATE TABLE t (r int NOT NULL UNIQUE, id int PRIMARY KEY, k text COLLATE ci NOT NULL UNIQUE,
                            n numeric NOT NULL UNIQUE, ver int NOT NULL, v text);
            CREATE UNIQUE INDEX t_id_key ON t (id);  -- each key column stays unique when the primary key moves
            SELECT certyo.track('t', write_back => '{self.write_back}');""")
        self.say(f"tracked with write_back => '{self.write_back}'")
        assert wait_for(lambda: self.sql("SELECT running FROM certyo.worker_status()") == "t", 30), \
            "the delivery worker did not start"
        self.insert(self.rng.randint(3, 6))

    def stop(self):
        for txn in self.txns:
            txn.held.process.kill()
        if self.cluster is not None:
            try:
                self.cluster.pg_ctl("-m", "immediate", "stop")
            except Exception:
                pass

    def free_rows(self):
        locked = {r for txn in self.txns for r in txn.rows}
        return [row for row in self.rows.values() if row.alive and row.r not in locked]

    def new_row(self):
        c = self.fresh()
        return Row(len(self.rows) + 1000 + c, 10 * c, f"k{c}a", f"{1000 + c}.5", self.fresh(), f"v{c}")

    # -- what a committed write does to the model and to Certyo -----------------------------

    def committed(self, effects, behind=False):
        """Apply effects (('insert', row) | ('update', row, new values) | ('delete', row)) of
        one committed transaction, in statement order. `behind`: with capture off (replica)."""
        captured = self.tracked and not behind
        column = self.key()
        for effect in effects:
            kind, row = effect[0], effect[1]
            self.seq += 1
            if kind == "insert":
                self.rows[row.r] = row
                self.written[(row.r, row.ver)] = self.seq
                if captured:
                    self.events.append((row.record_id(column), "insert", row.r, row.ver, self.seq))
            elif kind == "update":
                old_id, old_ver = row.record_id(column), row.ver
                for name, value in effect[2].items():
                    setattr(row, name, value)
                row.name_all()
                if captured:
                    if row.record_id(column) != old_id:
                        self.events.append((old_id, "delete", row.r, old_ver, self.seq))
                        self.seq += 1
                        self.events.append((row.record_id(column), "insert", row.r, row.ver, self.seq))
                    else:
                        self.events.append((old_id, "update", row.r, row.ver, self.seq))
                self.written[(row.r, row.ver)] = self.seq
            else:
                row.alive = False
                if captured:
                    self.events.append((row.record_id(column), "delete", row.r, row.ver, self.seq))
                elif self.tracked:
                    row.deleted_behind = True
                elif row.captured is not None:
                    row.removed_untracked = True  # Certyo last held it alive
            if captured:
                row.captured, row.captured_key = row.content(), column

    def all_captured(self):
        for row in self.rows.values():
            if row.alive:
                row.captured, row.captured_key = row.content(), self.key()

    # -- statements --------------------------------------------------------------------------

    def insert_sql(self, row):
        return (f"INSERT INTO t (r, id, k, n, ver, v) VALUES ({row.r}, {row.id}, {quote(row.k)}, "
                f"{row.n}, {row.ver}, {quote(row.v)});")

    def update_values(self, row):
        """New values for an update of `row`: content only, or a key column too (sometimes to
        a value equal under the column's collation or numeric scale)."""
        values = {"ver": self.fresh(), "v": f"v{self.counter}"}
        change = self.rng.random()
        if change < 0.15:
            values["id"] = 10 * self.fresh() + 1
        elif change < 0.3:
            # Equal under the collation ci while it is lower case, else a fresh value.
            values["k"] = row.k.upper() if row.k.islower() else f"k{self.fresh()}a"
        elif change < 0.45:
            values["n"] = row.n + "0"  # equal as numeric, another scale
        return values

    def update_sql(self, row, values):
        sets = ", ".join(f"{name} = {quote(value) if name in ('k', 'v') else value}" for name, value in values.items())
        return f"UPDATE t SET {sets} WHERE r = {row.r};"

    def write_statements(self, count):
        """(SQL, effects) of `count` random writes to free rows."""
        statements, effects, touched = [], [], set()
        for _ in range(count):
            free = [row for row in self.free_rows() if row.r not in touched]
            what = self.rng.random()
            if what < 0.35 or len(free) < 3:
                row = self.new_row()
                statements.append(self.insert_sql(row))
                effects.append(("insert", row))
            elif what < 0.85:
                row = self.rng.choice(free)
                values = self.update_values(row)
                statements.append(self.update_sql(row, values))
                effects.append(("update", row, values))
            else:
                row = self.rng.choice(free)
                statements.append(f"DELETE FROM t WHERE r = {row.r};")
                effects.append(("delete", row))
            touched.add(effects[-1][1].r)
        return statements, effects, touched

    def insert(self, count):
        rows = [self.new_row() for _ in range(count)]
        self.sql("".join(self.insert_sql(row) for row in rows))
        self.committed([("insert", row) for row in rows])

    # -- steps -------------------------------------------------------------------------------

    def step_write(self):
        statements, effects, _ = self.write_statements(self.rng.randint(1, 3))
        self.say(f"write: {' '.join(statements)}")
        self.sql("BEGIN;" + "".join(statements) + "COMMIT;")
        self.committed(effects)

    def step_rolled_back(self):
        statements, effects, _ = self.write_statements(self.rng.randint(1, 3))
        self.say(f"rolled back: {' '.join(statements)}")
        self.sql("BEGIN;" + "".join(statements) + "ROLLBACK;")
        self.lost(effects)

    def step_open(self):
        if len(self.txns) >= 2:
            return self.step_close()
        statements, effects, touched = self.write_statements(self.rng.randint(1, 2))
        self.say(f"open transaction {len(self.txns)}: {' '.join(statements)}")
        held = self.cluster.hold_open("BEGIN;" + "".join(statements))
        self.txns.append(Txn(held, effects, touched))

    def step_close(self, commit=None):
        if not self.txns:
            return self.step_write()
        txn = self.txns.pop(self.rng.randrange(len(self.txns)))
        commit = self.rng.random() < 0.7 if commit is None else commit
        self.say(f"{'commit' if commit else 'roll back'} an open transaction")
        try:
            _, errors = txn.held.process.communicate("COMMIT;\n" if commit else "ROLLBACK;\n", timeout=30)
        except subprocess.TimeoutExpired:
            txn.held.process.kill()
            raise
        if commit:
            assert txn.held.process.returncode == 0, f"COMMIT failed: {errors}"
            self.committed(txn.effects)
        else:
            self.lost(txn.effects)

    def lost(self, effects):
        """Effects of a transaction that did not commit: their versions must never reach Certyo."""
        for effect in effects:
            if effect[0] == "insert":
                self.rolled_back.add((effect[1].r, effect[1].ver))
            elif effect[0] == "update":
                self.rolled_back.add((effect[1].r, effect[2]["ver"]))

    def close_all(self):
        while self.txns:
            self.step_close()

    def aborted_all(self):
        """The server went down: every open transaction was rolled back."""
        for txn in self.txns:
            txn.held.process.kill()
            self.lost(txn.effects)
        self.txns = []

    def step_tamper(self):
        free = self.free_rows()
        if not free:
            return self.step_write()
        row = self.rng.choice(free)
        if self.rng.random() < 0.75:
            values = {"ver": self.fresh(), "v": f"tampered{self.counter}"}
            statement = self.update_sql(row, values)
            effects = [("update", row, values)]
        else:
            statement = f"DELETE FROM t WHERE r = {row.r};"
            effects = [("delete", row)]
        self.say(f"tamper (replica): {statement}")
        self.sql("SET session_replication_role = replica;" + statement)
        self.tampered = True
        self.committed(effects, behind=True)

    def step_add_column(self):
        self.close_all()
        name = f"c{self.fresh()}"
        default = self.rng.choice(["", f" DEFAULT {self.counter}"])
        self.say(f"ALTER TABLE t ADD COLUMN {name} int{default}")
        self.sql(f"ALTER TABLE t ADD COLUMN {name} int{default}")
        self.extra.append(name)
        self.schema_changed = True

    def step_drop_or_rename_column(self):
        if not self.extra:
            return self.step_add_column()
        self.close_all()
        name = self.rng.choice(self.extra)
        self.extra.remove(name)
        if self.rng.random() < 0.5:
            self.say(f"ALTER TABLE t DROP COLUMN {name}")
            self.sql(f"ALTER TABLE t DROP COLUMN {name}")
        else:
            new = f"c{self.fresh()}"
            self.say(f"ALTER TABLE t RENAME COLUMN {name} TO {new}")
            self.sql(f"ALTER TABLE t RENAME COLUMN {name} TO {new}")
            self.extra.append(new)
        self.schema_changed = True

    def step_move_primary_key(self):
        self.close_all()
        column = self.rng.choice([c for c in ("id", "k", "n") if c != self.pk])
        self.say(f"primary key moved from {self.pk} to {column}")
        self.sql(f"ALTER TABLE t DROP CONSTRAINT t_pkey, ADD PRIMARY KEY ({column})")
        self.pk = column
        self.schema_changed = True

    def step_untrack(self):
        if not self.tracked:
            return self.step_track()
        self.close_all()
        drop = self.rng.random() < 0.3
        self.say(f"untrack (drop_columns => {drop})")
        assert self.sql(f"SELECT certyo.untrack('t', drop_columns => {str(drop).lower()})") == "t"
        self.tracked = False

    def step_track(self):
        self.close_all()
        columns = self.rng.choice([None, None, "id", "k", "n"])
        backfill = self.rng.random() < 0.3
        option = f", record_id_columns => ARRAY['{columns}']" if columns else ""
        self.say(f"track (record_id_columns {columns}, backfill => {backfill}), was tracked: {self.tracked}")
        if self.key() != (columns or self.pk):
            self.schema_changed = True  # the record key moved (also across untrack and track)
        if not self.tracked:
            # Rows removed while untracked: no row finding, but the table's one finding, "removed
            # while untracked", for those Certyo last held alive (docs/operations.md).
            for row in self.rows.values():
                if not row.alive:
                    if row.deleted_behind or row.removed_untracked:
                        self.removed_while_untracked = True
                    row.deleted_behind = False
                elif row.captured is not None:
                    # A row whose record id changed while untracked, under the key it was
                    # captured with (which may be older than the last tracking's, when the row
                    # was not captured then) or the key it is tracked with now: no row is known to
                    # hold the record Certyo last held alive any more (a row stands for a record
                    # of an earlier key only if it holds that record's present-key values), as
                    # after a delete (docs/operations.md: "a track() after an untrack records its
                    # old record as removed while untracked"); the row itself is then one never
                    # captured, and a deletion of it behind capture's back is no finding, as of
                    # any row never captured.
                    was = dict(zip(("id", "k", "n"), row.captured))
                    keys = (row.captured_key, columns or self.pk)
                    if any(str(was[key]) != row.record_id(key) for key in keys):
                        self.removed_while_untracked = True
                        row.captured = row.captured_key = None
        if self.write_back == "none":
            option += ", write_back => 'none'"  # untracked, the table keeps no mode of its own
        self.sql(f"SELECT certyo.track('t'{option}, backfill => {str(backfill).lower()})")
        self.tracked, self.record_columns = True, columns
        if backfill:
            self.all_captured()

    def step_backfill(self):
        if not self.tracked:
            return self.step_track()
        self.close_all()
        number = self.sql("SELECT certyo.backfill('t')")
        self.say(f"certyo.backfill('t') = {number}")
        state = wait_for(lambda: self.sql(f"SELECT state FROM certyo.backfills WHERE id = {number}")
                         in ("done", "failed", "cancelled") and self.sql(f"SELECT state FROM certyo.backfills WHERE id = {number}"), 60)
        assert state == "done", f"backfill {number}: {state}: {self.sql(f'SELECT error FROM certyo.backfills WHERE id = {number}')}"
        self.all_captured()

    def step_pause(self):
        self.paused = not self.paused
        self.say("pause" if self.paused else "resume")
        self.sql("SELECT certyo.pause()" if self.paused else "SELECT certyo.resume()")

    def step_fault(self):
        fault = self.rng.choice(["429", "500", "drop", "partial", "outage", "slow"])
        times = 1 if fault in ("slow", "drop") else self.rng.randint(1, 3)
        extra = {"429": {"retryAfter": 1}, "outage": {"seconds": 1}, "slow": {"seconds": 3}}.get(fault, {})
        self.say(f"Certyo fault {fault} x{times}")
        self.emulator.fault(fault, times, **extra)

    def step_end_worker(self):
        pid = self.sql("SELECT pid FROM certyo.worker_status()")
        if not pid:
            return
        if self.rng.random() < 0.6:
            self.say(f"pg_terminate_backend(worker {pid})")
            self.sql(f"SELECT pg_terminate_backend({pid})")
        else:
            self.say(f"kill -9 worker {pid} (crash restart)")
            postmaster = self.cluster.postmaster_pid()
            os.kill(int(pid), signal.SIGKILL)
            self.aborted_all()
            assert wait_for(lambda: self.sql("SELECT 1") == "1", 60), "the server did not come back"
            assert self.cluster.postmaster_pid() == postmaster
        assert wait_for(lambda: self.sql("SELECT running FROM certyo.worker_status()") == "t", 30), \
            "no worker after it was ended"

    def step_restart(self):
        mode = self.rng.choice(["fast", "immediate"])
        self.say(f"restart ({mode})")
        self.cluster.pg_ctl("-m", mode, "stop")
        self.aborted_all()
        self.cluster.start()

    def step_restore(self):
        if not self.may_restore:
            return self.step_restart()
        self.close_all()
        source = self.cluster
        self.dir_index = 1 - self.dir_index
        directory = DIRS[self.dir_index]
        mode = self.rng.choice(["single", "jobs", "psql", "failover"])
        if mode == "failover":
            return self.failover(source, directory)
        self.say(f"dump and restore into a fresh cluster ({mode})")
        self.restored = True
        connect = ["-h", source.dir, "-p", str(source.port), "-U", "postgres"]
        target = Cluster(directory, free_port(), self.emulator.url, SETTINGS)
        into = ["-h", target.dir, "-p", str(target.port), "-U", "postgres", "-d", "postgres"]
        if mode == "psql":
            subprocess.run([f"{PG_BIN}/pg_dump", *connect, "-f", f"{directory}.sql", "postgres"], check=True)
            done = subprocess.run(["psql", *into, "-X", "-q", "-f", f"{directory}.sql"], capture_output=True, text=True)
        else:
            subprocess.run([f"{PG_BIN}/pg_dump", *connect, "-Fc", "-f", f"{directory}.dump", "postgres"], check=True)
            how = ["--single-transaction"] if mode == "single" else ["-j", "2"]
            done = subprocess.run([f"{PG_BIN}/pg_restore", *into, *how, f"{directory}.dump"], capture_output=True, text=True)
        source.pg_ctl("-m", "immediate", "stop")
        self.cluster = target
        assert "ERROR" not in done.stderr, done.stderr

    def failover(self, primary, directory):
        """A streaming standby, caught up with every commit so far, promoted; the primary
        stopped at once (what it did after the standby caught up is lost with it)."""
        self.say("failover to a streaming standby")
        self.restored = True
        standby = Cluster.standby_of(primary, directory, free_port())
        lsn = primary.sql("SELECT pg_current_wal_lsn()")
        assert wait_for(lambda: standby.sql(f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'") == "t", 60), \
            "the standby did not catch up"
        primary.pg_ctl("-m", "immediate", "stop")
        standby.pg_ctl("promote")
        assert wait_for(lambda: standby.sql("SELECT NOT pg_is_in_recovery()") == "t", 30), "the standby was not promoted"
        self.cluster = standby

    STEPS = [(step_write, 30), (step_rolled_back, 5), (step_open, 8), (step_close, 6), (step_tamper, 4),
             (step_add_column, 3), (step_drop_or_rename_column, 3), (step_move_primary_key, 2), (step_untrack, 3),
             (step_track, 3), (step_backfill, 2), (step_pause, 3), (step_fault, 6), (step_end_worker, 3),
             (step_restart, 2), (step_restore, 2)]

    def run(self, steps):
        self.start()
        functions, weights = zip(*self.STEPS)
        for _ in range(steps):
            self.rng.choices(functions, weights)[0](self)
        if self.may_restore and not self.restored:
            self.step_restore()  # a sequence that may restore does, at the latest here
        # Then everything is let finish: the open transactions end, delivery resumes, the
        # table is tracked.
        self.close_all()
        if self.paused:
            self.step_pause()
        if not self.tracked:
            self.step_track()
        self.say("settle")

    # -- invariants --------------------------------------------------------------------------

    def settled(self):
        return self.sql("""
            SELECT (SELECT pending FROM certyo.worker_status()) = 0
               AND NOT EXISTS (SELECT FROM certyo.backfills WHERE state IN ('queued', 'running'))
               AND NOT EXISTS (SELECT FROM certyo.receipt WHERE NOT written_back)""") == "t"

    def check(self):
        problems = []
        if not wait_for(self.settled, SETTLE):
            return [f"did not settle in {SETTLE} s:\n{self.cluster.explain(30)}"]
        # Verification then marks rows anchored; give it a moment (not required).
        wait_for(lambda: self.sql(f"SELECT count(*) FROM ({self.marks()}) m WHERE m.hash IS NOT NULL "
                                  "AND m.status <> 'anchored'") == "0", 8)
        records = [r for r in self.emulator.records() if r["collection"] == "public.t"]
        problems += self.check_model()
        problems += self.check_certyo(records)
        problems += self.check_rows(records)
        problems += self.check_audit()
        return problems

    def marks(self):
        """Each row (as JSON text, without bookkeeping columns) with the hash and anchor status
        that say which version it holds: its bookkeeping columns, or in the sidecar mode
        certyo.record_status() of its record id (the table must have no column of ours)."""
        if self.write_back != "none":
            return ("SELECT (to_jsonb(t) - 'certyo_record_hash' - 'certyo_anchor_status' - 'certyo_verified_at')::text AS row, "
                    "t.certyo_record_hash AS hash, t.certyo_anchor_status AS status FROM t")
        if self.tracked:
            return (f"SELECT to_jsonb(t)::text AS row, s.record_hash AS hash, s.anchor_status AS status FROM t "
                    f"LEFT JOIN certyo.record_status('t') s ON s.record_id = t.{self.key()}::text")
        return "SELECT to_jsonb(t)::text AS row, NULL::text AS hash, NULL::text AS status FROM t"

    def check_model(self):
        """The table holds what the model says (else the model, not the product, is wrong)."""
        out = self.sql("SELECT coalesce(json_agg(json_build_array(r, id, k, n::text, ver, v) ORDER BY r), '[]') FROM t")
        actual = {row[0]: tuple(row[1:]) for row in json.loads(out)}
        expected = {row.r: row.content() for row in self.rows.values() if row.alive}
        if actual != expected:
            return [f"the model is wrong: table {actual}, model {expected}"]
        return []

    def check_certyo(self, records):
        problems = []
        expected = {(e[0], e[1], e[3]): e for e in self.events}
        seen = {}
        order = {}  # record id -> [(seq, what)]
        for record in records:
            payload = record["recordPayload"]
            r, ver, op, rid = payload.get("r"), payload.get("ver"), record["operationType"], record["recordId"]
            if (r, ver) in self.rolled_back:
                problems.append(f"rolled back version sent: {rid} {op} {payload}")
                continue
            if op == "upsert":
                if (r, ver) not in self.written or r not in self.rows or rid not in self.rows[r].names:
                    problems.append(f"an upsert of no committed version of its row: {rid} {payload}")
                    continue
                order.setdefault(rid, []).append((self.written[(r, ver)], f"upsert ver {ver}"))
                continue
            event = expected.get((rid, op, ver))
            if event is None or event[2] != r:
                problems.append(f"sent but never committed while tracked: {rid} {op} {payload}")
                continue
            seen[(rid, op, ver)] = seen.get((rid, op, ver), 0) + 1
            order.setdefault(rid, []).append((event[4], f"{op} ver {ver}"))
        for key, count in seen.items():
            if count > 1:
                problems.append(f"sent {count} times: {key}")
        missing = [key for key in expected if key not in seen]
        if missing:
            problems.append(f"committed but not at Certyo (record id, operation, ver): {missing}")
        for rid, versions in order.items():
            seqs = [s for s, _ in versions]
            if seqs != sorted(seqs):
                problems.append(f"record {rid} out of commit order at Certyo: {versions}")
        return problems

    def check_rows(self, records):
        problems = []
        by_hash = {}
        for record in records:
            by_hash.setdefault(record["recordHash"], []).append(record)
        # A version captured under a record key the table no longer has is not written back
        # (its write-back is dropped and recorded: docs/operations.md, Dump and restore): its
        # row keeps an older version's hash, pending, until its next change.
        if self.write_back == "none":
            ours = self.sql("SELECT string_agg(attname, ', ') FROM pg_attribute WHERE attrelid = 't'::regclass "
                            "AND attname LIKE 'certyo%' AND NOT attisdropped")
            if ours:
                problems.append(f"the sidecar mode's table has columns of ours: {ours}")
        names = {name: row.r for row in self.rows.values() for name in row.names}
        dropped = {names.get(rid) for rid in
                   self.sql("SELECT record_id FROM certyo.receipt WHERE write_back_dropped IS NOT NULL").splitlines()}
        out = self.sql(f"SELECT coalesce(json_agg(json_build_array(m.row, m.hash, m.status)), '[]') FROM ({self.marks()}) m")
        for text, hash_, status in json.loads(out):
            row = parse(text)
            r = int(row["r"])
            dirty = self.rows[r].dirty()
            if hash_ is None:
                if status == "anchored":
                    problems.append(f"row r={r} says anchored with no hash")
                continue
            # The hash covers the record id and payload, not the operation: a delete carries the
            # row's last content, and so the hash of the version before it too.
            versions = [v for v in by_hash.get(hash_, []) if v["operationType"] != "delete"]
            if not versions:
                what = by_hash.get(hash_, [{}])[0]
                problems.append(f"row r={r} holds {hash_}, which Certyo gave no version of a row "
                                f"({what.get('recordId')} {what.get('operationType')}, status {status})")
                continue
            for record in versions:
                payload = parse(json.dumps(record["recordPayload"]))
                if payload.get("r") != r:
                    problems.append(f"row r={r} holds the hash of {record['recordId']} {record['operationType']} "
                                    f"{record['recordPayload']} (status {status})")
                elif not dirty:
                    differs = [c for c in payload if c in row and payload[c] != row[c]]
                    if differs and status == "pending" and r in dropped:
                        self.say(f"note: row r={r} keeps an older version's hash, pending: a later version's "
                                 f"write-back was dropped")
                    elif differs:
                        problems.append(f"row r={r} {row} holds the hash of {record['recordId']} "
                                        f"{record['recordPayload']}: differs in {differs} (status {status})")
        return problems

    def check_audit(self):
        problems = []
        out = self.sql("SELECT coalesce(json_agg(json_build_array(record_id, problem, detail)), '[]') FROM certyo.audit('t')")
        findings = json.loads(out)
        names = {}
        for row in self.rows.values():
            for name in row.names:
                names[name] = row.r
        named = set()
        for record_id, problem, detail in findings:
            if record_id is None:
                if problem == "removed while untracked":
                    if not self.removed_while_untracked:
                        problems.append(f"audit: {problem} ({detail}), though no row was removed while untracked")
                elif problem != "schema changed since capture" or not self.schema_changed:
                    problems.append(f"audit: {problem} ({detail}) without a schema change")
                continue
            if record_id not in names:
                problems.append(f"audit names a record id no row ever had: {record_id} {problem}")
                continue
            r = names[record_id]
            named.add(r)
            if not self.rows[r].dirty():
                row = self.rows[r]
                problems.append(f"audit: {record_id} {problem} ({detail}), though row r={r} was only changed "
                                f"through capture (alive {row.alive}, {row.content()})")
        for row in self.rows.values():
            if row.dirty() and row.r not in named:
                problems.append(f"audit does not name row r={row.r} ({row.content()}, alive {row.alive}), "
                                f"changed behind capture's back (captured {row.captured})")
        return problems


@pytest.mark.parametrize("seed", seeds())
def test_a_random_sequence_keeps_every_claim(emulator, seed):
    emulator.reset()
    sequence = Sequence(seed, emulator)
    try:
        failure = None
        try:
            sequence.run(STEPS)
            problems = sequence.check()
            print(f"seed {seed}:\n  " + "\n  ".join(sequence.log))  # shown with pytest -s
        except Exception as error:  # a step itself failed: also a finding, with the steps so far
            failure = error
            problems = [f"a step failed: {error!r}"]
        if problems:
            steps = "\n  ".join(sequence.log)
            replay = f"CERTYO_SEED={seed} CERTYO_STEPS={STEPS} python3 -m pytest -q pg_test/test_sequences.py"
            pytest.fail(f"seed {seed} (replay: {replay})\nsteps:\n  {steps}\nproblems:\n  " + "\n  ".join(problems),
                        pytrace=failure is not None)
    finally:
        sequence.stop()
