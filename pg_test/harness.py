"""Shared by the end-to-end suites (pytest, fixtures in conftest.py): a real PostgreSQL 15
cluster with certyo_cdc preloaded (started as the postgres user, over a Unix socket) and the
Certyo emulator as a child process. Each suite gets its own directory and port."""
import inspect
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request

# CERTYO_PG_BIN points the tests at another PostgreSQL 15 installation (e.g. a private copy
# holding a different build of certyo_cdc); by default, the system one.
PG_BIN = os.environ.get("CERTYO_PG_BIN", "/usr/lib/postgresql/15/bin")
# Where the suites put their clusters: two sessions that run the same suite at once each need
# their own (CERTYO_TEST_TMP=/tmp/mine).
TMP = os.environ.get("CERTYO_TEST_TMP", "/tmp")
KEY = "e2e-secret"


def wait_for(condition, timeout=30, every=0.2):
    """Poll until condition() is truthy and return that value. An exception of condition() counts
    as not yet. If it never holds within `timeout` seconds: a `TimedOut`, falsy as the last value
    was, which says what was waited for, the last value and the last exception (so `assert
    wait_for(...)` fails saying why, and callers that test it, or ignore it, work as before)."""
    deadline = time.time() + timeout
    value, error = None, None
    while True:
        try:
            value = condition()
        except Exception as e:
            value, error = None, e
        if value:
            return value
        if time.time() >= deadline:
            return TimedOut(condition, timeout, value, error)
        time.sleep(every)


class TimedOut:
    """What `wait_for` returns when its condition never held: falsy, and its text names the
    condition (its source), the time waited, the condition's last value and its last exception."""

    def __init__(self, condition, timeout, value, error):
        self.condition, self.timeout, self.value, self.error = condition, timeout, value, error

    def __bool__(self):
        return False

    def what(self):
        code = getattr(self.condition, "__code__", None)
        where = f"{os.path.basename(code.co_filename)}:{code.co_firstlineno}" if code else ""
        try:
            source = " ".join(line.strip() for line in inspect.getsource(self.condition).splitlines())
        except (OSError, TypeError):
            source = getattr(self.condition, "__qualname__", repr(self.condition))
        if len(source) > 300:
            source = source[:300] + "..."
        return f"{where}: {source}" if where else source

    def __repr__(self):
        text = f"timed out after {self.timeout} s waiting for {self.what()} (last value {self.value!r}"
        if self.error is not None:
            text += f"; last exception {type(self.error).__name__}: {str(self.error).strip()[:2000]}"
        return text + ")"

    __str__ = __repr__


def cpu_use(pid):
    """(CPU seconds, thread ids) of a process: the scheduler's nanosecond count of each live
    thread (/proc/PID/task/*/schedstat), not the 10 ms ticks of /proc/PID/stat, which charge a
    short wake-up a whole tick or nothing. A thread that ended takes its time with it: compare
    the thread ids of two readings before their times."""
    total, tasks = 0, set()
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as stat:
                total += int(stat.read().split()[0])
            tasks.add(int(task))
        except FileNotFoundError:
            pass  # a thread that ended meanwhile
    return total / 1e9, tasks


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    def __init__(self, binary, anchor_delay=2):
        # Port 0: the emulator binds a free port itself and prints its URL once listening (a
        # port picked here could be taken meanwhile by a suite running beside this one).
        self.process = subprocess.Popen([binary, "--port", "0", "--api-key", KEY,
                                         "--anchor-delay", str(anchor_delay)], stdout=subprocess.PIPE, text=True)
        self.url = self.process.stdout.readline().strip()
        if not self.url.startswith("http://"):
            self.process.kill()
            raise RuntimeError(f"the emulator {binary} did not say where it listens: {self.url!r}")
        self.port = int(self.url.rsplit(":", 1)[1])

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def fault(self, fault, times=1, **extra):
        self.call("POST", "/_emulator/faults", {"fault": fault, "times": times, **extra})

    def records(self):
        return [r["record"] | {"recordHash": r["recordHash"], "acceptedAt": r["acceptedAt"], "request": r["request"]}
                for r in self.call("GET", "/_emulator/records")]

    def stats(self):
        return self.call("GET", "/_emulator/stats")

    def reset(self):
        self.call("POST", "/_emulator/reset", {})

    def stop(self):
        self.process.terminate()


class Attempt:
    """What psql made of a script: exit code, output, and the SQLSTATEs of the errors raised."""

    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr
        self.sqlstates = re.findall(r"(?:ERROR|FATAL|PANIC):\s+([0-9A-Z]{5}):", stderr)

    @property
    def sqlstate(self):
        """The SQLSTATE of the first error, or None when nothing failed."""
        return self.sqlstates[0] if self.sqlstates else None

    def __repr__(self):
        return f"Attempt(rc={self.returncode}, sqlstates={self.sqlstates}, stdout={self.stdout[:300]!r}, stderr={self.stderr[:600]!r})"


_held_sessions = itertools.count(1)


class Held:
    """A psql session kept open by Cluster.hold_open: close() rolls back and ends it."""

    def __init__(self, process):
        self.process = process

    def close(self):
        try:
            self.process.communicate("ROLLBACK;\n", timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()


class Cluster:
    """A throwaway cluster in `directory`, started. With `emulator_url`, certyo_cdc is preloaded
    and delivers there; without (None), the library is not preloaded and no certyo setting is
    set: what `CREATE EXTENSION` alone gives."""

    def __init__(self, directory, port, emulator_url, settings=""):
        self.dir, self.port = directory, port
        subprocess.run(["sudo", "-u", "postgres", f"{PG_BIN}/pg_ctl", "-D", f"{self.dir}/data", "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        shutil.chown(self.dir, "postgres")
        subprocess.run(["sudo", "-u", "postgres", f"{PG_BIN}/initdb", "-D", f"{self.dir}/data", "-A", "trust", "-U", "postgres"],
                       check=True, capture_output=True)
        with open(f"{self.dir}/data/postgresql.conf", "a") as conf:
            conf.write(f"""
listen_addresses = ''
unix_socket_directories = '{self.dir}'
port = {self.port}
""")
            if emulator_url is None:
                conf.write(settings + "\n")
            else:
                conf.write(f"""
shared_preload_libraries = 'certyo_cdc'
certyo.base_url = '{emulator_url}'
certyo.api_key = '{KEY}'
certyo.tenant_id = 'acme'
certyo.poll_interval = '300ms'
certyo.request_timeout = '2s'
certyo.bulk_threshold = 10
certyo.batch_size = 100
# The suites written before the write-back modes assert the two-step write-back; the default's
# own suite is pg_test/test_write_back.py.
certyo.write_back = 'accepted'
{settings}
""")
        self.start()

    @classmethod
    def standby_of(cls, primary, directory, port):
        """A streaming standby of `primary` (pg_basebackup -R, WAL streamed), started."""
        standby = cls.__new__(cls)
        standby.dir, standby.port = directory, port
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory)
        shutil.chown(directory, "postgres")
        subprocess.run(["sudo", "-u", "postgres", f"{PG_BIN}/pg_basebackup", "-h", primary.dir, "-p", str(primary.port),
                        "-U", "postgres", "-D", f"{directory}/data", "-R", "-X", "stream"], check=True, capture_output=True)
        with open(f"{directory}/data/postgresql.conf", "a") as conf:
            conf.write(f"\nunix_socket_directories = '{directory}'\nport = {port}\n")
        standby.start()
        return standby

    def pg_ctl(self, *args):
        subprocess.run(["sudo", "-u", "postgres", f"{PG_BIN}/pg_ctl", "-D", f"{self.dir}/data", "-l", f"{self.dir}/server.log",
                        "-w", *args], check=True, capture_output=True)

    def start(self):
        self.pg_ctl("start")

    def stop(self):
        self.pg_ctl("-m", "fast", "stop")

    def log(self):
        with open(f"{self.dir}/server.log", errors="replace") as log:
            return log.read()

    def sql(self, statement, check=True, user="postgres", database="postgres"):
        out = subprocess.run(["psql", "-h", self.dir, "-p", str(self.port), "-U", user, "-d", database, "-X", "-q", "-At",
                              "-v", "ON_ERROR_STOP=1", "-c", statement], capture_output=True, text=True)
        if check and out.returncode != 0:
            raise RuntimeError(f"{statement}: {out.stderr}")
        return out.stdout.strip()

    def attempt(self, statement, user):
        """(stdout, stderr) of a statement run as `user`, failing or not."""
        out = subprocess.run(["psql", "-h", self.dir, "-p", str(self.port), "-U", user, "-d", "postgres", "-X", "-q", "-At",
                              "-c", statement], capture_output=True, text=True)
        return out.stdout.strip(), out.stderr.strip()

    def attempt_verbose(self, statement, user="postgres", stop_on_error=True):
        """Run a script as `user` (read from standard input, so it may be megabytes long), failing
        or not, with VERBOSITY=verbose so errors carry their SQLSTATE. Returns an Attempt."""
        out = subprocess.run(["psql", "-h", self.dir, "-p", str(self.port), "-U", user, "-d", "postgres", "-X", "-q", "-At",
                              "-v", "VERBOSITY=verbose", "-v", f"ON_ERROR_STOP={int(stop_on_error)}", "-f", "-"],
                             input=statement, capture_output=True, text=True)
        return Attempt(out.returncode, out.stdout.strip(), out.stderr.strip())

    def hold_open(self, statements, user="postgres", application_name=None):
        """A session that runs `statements` (say, BEGIN and a lock) and stays open, its
        transaction too, until the returned Held is closed; returned once it waits idle in that
        transaction. Named `application_name` if given (one that no other session has)."""
        name = application_name or f"held-{next(_held_sessions)}"
        process = subprocess.Popen(["psql", "-h", self.dir, "-p", str(self.port), "-U", user, "-d", "postgres", "-X",
                                    "-q", "-v", "ON_ERROR_STOP=1"], stdin=subprocess.PIPE,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   env=dict(os.environ, PGAPPNAME=name))
        process.stdin.write(statements + "\n")
        process.stdin.flush()
        state = f"SELECT state FROM pg_stat_activity WHERE application_name = '{name}'"
        if not wait_for(lambda: self.sql(state) == "idle in transaction", 15):
            process.kill()
            raise RuntimeError(f"{statements}: the session did not stay open ({process.stderr.read()})")
        return Held(process)

    def postmaster_pid(self):
        """The postmaster's PID: the first line of DATA/postmaster.pid."""
        with open(f"{self.dir}/data/postmaster.pid") as pidfile:
            return int(pidfile.readline())

    def log_size(self):
        return os.path.getsize(f"{self.dir}/server.log")

    def log_since(self, offset):
        """The server log from byte `offset` on."""
        with open(f"{self.dir}/server.log", "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def explain(self, lines=15, database="postgres"):
        """For an assertion's message: what the worker says it is doing, and the server log's
        last lines (a test that failed on a timeout then shows why)."""
        status = self.sql("SELECT state || ': ' || detail || ' (last error: ' || coalesce(last_error, '-') || ')'"
                          " FROM certyo.worker_status()", check=False, database=database)
        tail = "\n".join(self.log().splitlines()[-lines:])
        return f"worker: {status}\nserver log:\n{tail}"

    def wait_drained(self, timeout=60):
        """Until nothing is pending: queue empty, no pending delivery entries."""
        return bool(wait_for(lambda: self.sql("SELECT pending FROM certyo.worker_status()", check=False) == "0", timeout))

    def passes(self):
        """How many passes the delivery worker has begun (certyo.worker_status().passes)."""
        return int(self.sql("SELECT passes FROM certyo.worker_status()"))

    def wait_passes(self, n, timeout=30):
        """Until the worker has begun n more passes than it had now. A pass begun after an
        event has seen it (each looks anew at a pending reload, the pause switch, the queue);
        the first of the n may have begun just before, so ask for one more than needed."""
        start = self.passes()
        return bool(wait_for(lambda: self.passes() >= start + n, timeout))

