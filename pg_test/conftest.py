"""pytest fixtures for the end-to-end security tests (pg_test/security/).

One Certyo emulator and one real PostgreSQL 15 cluster with certyo_cdc preloaded per test module
(harness.Emulator, harness.Cluster), one for all the security suites under pg_test/security/
together, and, per test, fresh unprivileged LOGIN roles that each own a
schema of the same name: an `attacker` fixture and a `make_role` factory. Nothing a test creates
outlives it, so the tests run alone or in any order.

After every test, whether it passed or not, a shared check runs (pytest_runtest_call below, so
a breach fails the test itself):
  (a) every role the test created is still no superuser (nor CREATEROLE, CREATEDB, REPLICATION,
      BYPASSRLS) and is a member of no role;
  (b) the postmaster did not restart (same PID in DATA/postmaster.pid as at module start) and
      the server log written during the test holds no crash ("terminated by signal", a Rust
      "fatal runtime error", a PANIC);
  (c) vault.canary, a table owned by postgres that every attack payload tries to overwrite when
      it runs as a superuser, is intact.

Usage: CERTYO_EMULATOR=target/release/certyo-emulator python3 -m pytest -q pg_test/security
CERTYO_PG_BIN (harness.py) selects another PostgreSQL 15 installation, e.g. a private copy
holding an older build of certyo_cdc.
"""
import itertools
import os
import time
from pathlib import Path

import pytest

from harness import TMP, Cluster, Emulator, free_port, wait_for

REPO = Path(__file__).resolve().parent.parent
DIR = f"{TMP}/certyo-e2e-security"
SETTINGS = """
certyo.verify_min_age = '1s'
certyo.verify_interval = '500ms'
certyo.backfill_chunk_size = 100
"""
# Every psql the tests start carries this application name. Attack code planted where every
# session could run it (functions in schema public) ignores sessions that carry it, so the
# harness's own superuser queries never set an attack off; the delivery worker does not carry it.
HARNESS_APP = "certyo-security-harness"
os.environ["PGAPPNAME"] = HARNESS_APP

CRASH_SIGNS = ("terminated by signal", "fatal runtime error", "PANIC:")
CANARY = "intact"

_role_numbers = itertools.count(1)


def new_emulator():
    binary = Path(os.environ.get("CERTYO_EMULATOR", "target/release/certyo-emulator"))
    if not binary.is_absolute():
        binary = REPO / binary
    assert binary.exists(), f"no emulator binary at {binary}: cargo build --release -p certyo-emulator"
    return Emulator(str(binary))


# The security suites (pg_test/security/) share one emulator and one cluster, started for the
# first of them and stopped after the last (their tests leave nothing behind, as within one
# suite); every other suite gets its own per module.
SECURITY = Path(__file__).resolve().parent / "security"


def in_security(node):
    return Path(str(node.path)).resolve().parent == SECURITY


class Shared:
    """The security suites' emulator and cluster, while they run."""
    emulator = None
    cluster = None   # the watched_cluster generator and the cluster it yielded

    def get_emulator(self):
        if self.emulator is None:
            self.emulator = new_emulator()
        return self.emulator

    def get_cluster(self):
        if self.cluster is None:
            generator = watched_cluster(DIR, self.get_emulator(), SETTINGS)
            self.cluster = (generator, next(generator))
        return self.cluster[1]

    def stop(self):
        if self.cluster is not None:
            self.cluster[0].close()
            self.cluster = None
        if self.emulator is not None:
            self.emulator.stop()
            self.emulator = None


SHARED = Shared()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After the last test of the security suites (its own fixtures torn down): stop theirs."""
    result = yield
    if nextitem is None or not in_security(nextitem):
        SHARED.stop()
    return result


def pytest_sessionfinish(session):
    """Also when the run is cut short."""
    SHARED.stop()


@pytest.fixture(scope="module")
def emulator(request):
    if in_security(request.node):
        yield SHARED.get_emulator()
        return
    emulator = new_emulator()
    yield emulator
    emulator.stop()


def watched_cluster(directory, emulator, settings):
    """A cluster with certyo_cdc and the canary that the checks after each test look at,
    once its worker runs; stopped afterwards. Each suite's `cluster` fixture yields from it."""
    cluster = Cluster(directory, free_port(), emulator.url, settings)
    try:
        cluster.sql(f"""
            CREATE EXTENSION certyo_cdc;
            CREATE SCHEMA vault;
            CREATE TABLE vault.canary (id int PRIMARY KEY, v text NOT NULL);
            INSERT INTO vault.canary VALUES (1, '{CANARY}');
        """)
        assert wait_for(lambda: cluster.sql("SELECT running FROM certyo.worker_status()") == "t", 30), \
            "the delivery worker did not start"
        cluster.start_pid = cluster.postmaster_pid()
        yield cluster
    finally:
        try:
            cluster.stop()
        except Exception:
            pass


@pytest.fixture(scope="module")
def cluster(emulator, request):
    if in_security(request.node):
        yield SHARED.get_cluster()
        return
    yield from watched_cluster(DIR, emulator, SETTINGS)


class Role:
    """An unprivileged LOGIN role that owns the schema of its name, with an attack kit in it:
    NAME.log (who ran attack code, as which user, superuser or not; anyone may append) and
    NAME.pwn(tag), which, when it runs as a superuser, makes the role a superuser and scribbles
    on vault.canary, and in any case logs the user it ran as; NAME.once(tag), pwn() at most once
    per transaction, outside the harness's sessions."""

    def __init__(self, cluster, name):
        self.cluster, self.name, self.schema = cluster, name, name
        cluster.sql(f"""
            CREATE ROLE {name} LOGIN;
            CREATE SCHEMA {name} AUTHORIZATION {name};
            GRANT USAGE ON SCHEMA {name} TO PUBLIC;
        """)
        self.sql(f"""
            CREATE TABLE {name}.log (at timestamptz NOT NULL DEFAULT clock_timestamp(), tag text,
                                     who name, super boolean);
            GRANT INSERT ON {name}.log TO PUBLIC;
            CREATE FUNCTION {name}.pwn(tag text) RETURNS boolean
                LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $pwn$
            DECLARE
                su boolean := (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = CURRENT_USER);
            BEGIN
                IF su THEN
                    EXECUTE 'ALTER ROLE {name} SUPERUSER';
                    UPDATE vault.canary SET v = 'overwritten by ' || CURRENT_USER || ' via ' || tag;
                END IF;
                INSERT INTO {name}.log (tag, who, super) VALUES (tag, CURRENT_USER, coalesce(su, false));
                RETURN true;
            END
            $pwn$;
            -- pwn() at most once per transaction and tag, never in the harness's own sessions:
            -- for look-alikes of built-ins, which may run for every row of a query.
            CREATE FUNCTION {name}.once(tag text) RETURNS void
                LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $once$
            BEGIN
                IF current_setting('application_name') IS DISTINCT FROM '{HARNESS_APP}'
                   AND coalesce(current_setting('attack.t' || md5(tag), true), '') <> 'y' THEN
                    PERFORM set_config('attack.t' || md5(tag), 'y', true);
                    PERFORM {name}.pwn(tag);
                END IF;
            END
            $once$;
        """)

    def sql(self, statement):
        """Run as this role; raises on error."""
        return self.cluster.sql(statement, user=self.name)

    def attempt(self, statement, stop_on_error=True):
        """Run as this role with VERBOSITY=verbose, failing or not (a harness.Attempt)."""
        return self.cluster.attempt_verbose(statement, self.name, stop_on_error)

    def log(self):
        """Every run of attack code so far: [(tag, who, super)], oldest first."""
        out = self.cluster.sql(f"SELECT tag, who, super FROM {self.name}.log ORDER BY at")
        return [tuple(line.split("|")) for line in out.splitlines() if line]

    def problems(self):
        """What is wrong with this role now, if anything (invariant (a))."""
        out = self.cluster.sql(f"""
            SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls,
                   (SELECT count(*) FROM pg_auth_members m WHERE m.member = r.oid)
              FROM pg_roles r WHERE rolname = '{self.name}'""")
        if out != "f|f|f|f|f|0":
            return [f"role {self.name} gained privileges (super|createrole|createdb|replication|bypassrls|memberships): {out}"]
        return []

    def drop(self):
        """Cancel the role's backfills, drop everything it owns and the role. Retried: attack
        code that still runs elsewhere (a worker an attack got into) may change the role at the
        same time ("tuple concurrently updated")."""
        n = self.name
        statements = [
            f"ALTER ROLE {n} NOSUPERUSER NOCREATEROLE NOCREATEDB NOREPLICATION NOBYPASSRLS",
            f"""UPDATE certyo.backfills SET state = 'cancelled', finished_at = now(), updated_at = now()
                 WHERE state IN ('queued', 'running')
                   AND (requested_by = '{n}'::regrole OR relid IN (SELECT oid FROM pg_class WHERE relowner = '{n}'::regrole))""",
            f"DROP OWNED BY {n} CASCADE",
            f"DROP ROLE {n}",
        ]
        error = None
        for _ in range(40):
            if self.cluster.sql(f"SELECT count(*) FROM pg_roles WHERE rolname = '{n}'") == "0":
                return
            try:
                for statement in statements:
                    self.cluster.sql(statement)
                return
            except RuntimeError as e:
                error = e
                time.sleep(0.25)
        raise error


class Watch:
    """Per test: the roles it created and where the server log stood when it started."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.roles = []
        self.log_offset = cluster.log_size()

    def problems(self):
        cluster, found = self.cluster, []
        pid = cluster.postmaster_pid()
        if pid != cluster.start_pid:
            found.append(f"the postmaster restarted: PID {pid}, was {cluster.start_pid}")
        log = cluster.log_since(self.log_offset)
        for sign in CRASH_SIGNS:
            lines = [line for line in log.splitlines() if sign in line]
            if lines:
                found.append(f"the server log shows a crash ({sign!r}): {lines[:3]}")
        # After a crash the server reinitializes; give it time before looking further.
        wait_for(lambda: cluster.sql("SELECT 1", check=False) == "1", 60)
        for role in self.roles:
            found += role.problems()
        canary = cluster.sql("SELECT string_agg(v, ',') || ' ' || pg_get_userbyid(c.relowner) FROM vault.canary, "
                             "pg_class c WHERE c.oid = 'vault.canary'::regclass GROUP BY c.relowner", check=False)
        if canary != f"{CANARY} postgres":
            found.append(f"vault.canary was changed: {canary!r}")
        return found

    def restarted_on_purpose(self, allowed=()):
        """For a test that kills a server process or restarts the server on purpose: the lines
        of the log written since the test began that show a crash other than the expected ones
        (lines holding one of `allowed`). The checks after the test then go on from here: the
        postmaster that runs now, the log written from now on."""
        unexpected = [line for line in self.cluster.log_since(self.log_offset).splitlines()
                      if any(sign in line for sign in CRASH_SIGNS) and not any(a in line for a in allowed)]
        self.cluster.start_pid = self.cluster.postmaster_pid()
        self.log_offset = self.cluster.log_size()
        return unexpected


@pytest.fixture(autouse=True)
def watch(cluster):
    # A crash in an earlier test leaves the server recovering: wait until it answers.
    assert wait_for(lambda: cluster.sql("SELECT 1", check=False) == "1", 60), "the server does not answer"
    watch = Watch(cluster)
    yield watch
    for role in reversed(watch.roles):
        role.drop()
    cluster.sql(f"UPDATE vault.canary SET v = '{CANARY}' WHERE v <> '{CANARY}'")


@pytest.fixture
def make_role(cluster, watch):
    """Factory: a fresh unprivileged LOGIN role (attacker_<n>) owning its schema; dropped after the test."""

    def make(prefix="attacker"):
        role = Role(cluster, f"{prefix}_{next(_role_numbers)}")
        watch.roles.append(role)
        return role

    return make


@pytest.fixture
def attacker(make_role):
    return make_role()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Invariants (a), (b), (c) after every test body: a breach fails the test."""
    watch = item.funcargs.get("watch")
    try:
        result = yield
    except BaseException:
        if watch is not None:
            problems = watch.problems()
            if problems:
                print("invariants also broken:\n" + "\n".join(problems))
        raise
    if watch is not None:
        problems = watch.problems()
        assert not problems, "invariants broken:\n" + "\n".join(problems)
    return result
