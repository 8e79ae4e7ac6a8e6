"""A MySQL or MariaDB server from Debian's packages, for the relay's tests, demo and benchmark:
started on a Unix socket under DIR as the mysql user (no TCP), UTC, stopped by `stop`. Which one
is whichever this machine (or Debian root, scripts/pg-root.sh) has: MariaDB's `mariadbd`, else
MySQL's `mysqld`. CLIENT and ADMIN are its command-line client and admin tool."""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "pg_test"))
from harness import wait_for  # noqa: E402

DIR = Path(os.environ.get("CERTYO_MARIADB_DIR", "/tmp/certyo-relay-e2e"))
SOCKET = DIR / "mysqld.sock"
MYSQL = shutil.which("mariadbd") is None
CLIENT = "mysql" if MYSQL else "mariadb"
ADMIN = "mysqladmin" if MYSQL else "mariadb-admin"


class MariaDB:
    """A MySQL or MariaDB server on a socket under DIR; `sql` runs statements as root (socket
    authentication on MariaDB; MySQL's root has no password and listens on no network)."""

    def __init__(self):
        if DIR.exists():
            self._stop_leftover()
            shutil.rmtree(DIR)
        DIR.mkdir(parents=True)
        shutil.chown(DIR, "mysql")
        if MYSQL:
            initialize = ["mysqld", "--no-defaults", "--initialize-insecure", f"--datadir={DIR}/data", "--user=mysql"]
        else:
            initialize = ["mariadb-install-db", f"--datadir={DIR}/data", "--user=mysql", "--skip-test-db",
                          "--auth-root-authentication-method=socket"]
        subprocess.run(initialize, check=True, capture_output=True)
        self.start()

    def start(self):
        common = [f"--datadir={DIR}/data", f"--socket={SOCKET}", "--skip-networking", "--user=mysql",
                  f"--pid-file={DIR}/mysqld.pid", f"--log-error={DIR}/error.log", "--innodb-flush-log-at-trx-commit=2",
                  # A deadlock is written to the error log whole: a failing test shows which locks met.
                  "--innodb-print-all-deadlocks=ON"]
        # MySQL: its own defaults (binary log on, as MySQL ships), no X protocol listener, and
        # the binary log not synced per commit (as innodb's log above: speed, not durability).
        command = (["mysqld", "--no-defaults"] + common + ["--mysqlx=OFF", "--sync-binlog=0", "--log-error-verbosity=3"] if MYSQL
                   else ["mariadbd"] + common)
        self.process = subprocess.Popen(command, env=os.environ | {"TZ": "UTC"})
        assert wait_for(lambda: subprocess.run([ADMIN, "-S", str(SOCKET), "-u", "root", "ping"],
                                               capture_output=True).returncode == 0, timeout=60), \
            (DIR / "error.log").read_text()

    def _stop_leftover(self):
        pid = DIR / "mysqld.pid"
        if pid.exists():
            try:
                leftover = int(pid.read_text())
                os.kill(leftover, signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                return
            # Gone before its directory is: MySQL takes seconds to shut down.
            wait_for(lambda: not Path(f"/proc/{leftover}").exists(), timeout=60)

    def sql(self, statement, database=None, check=True):
        """Rows as lists of strings (tab-separated, NULL as 'NULL')."""
        args = [CLIENT, "-S", str(SOCKET), "-u", "root", "-N", "-r", "-B"] + ([database] if database else [])
        done = subprocess.run(args, input=statement, capture_output=True, text=True)
        if check and done.returncode != 0:
            raise AssertionError(f"{statement}\n{done.stderr}")
        return [line.split("\t") for line in done.stdout.splitlines()]

    def value(self, statement, database):
        rows = self.sql(statement, database)
        return rows[0][0] if rows else None

    def log_position(self):
        """Where the server's error log ends now: `deadlocks` reads from there."""
        return (DIR / "error.log").stat().st_size

    def deadlocks(self, since):
        """The deadlocks the server reported after `since` (`log_position`), each report's text
        from its detection to the transaction rolled back."""
        with open(DIR / "error.log", "rb") as log:
            log.seek(since)
            text = log.read().decode("utf-8", "replace")
        reports = text.split("deadlock detected")[1:]
        return [r.split("WE ROLL BACK TRANSACTION")[0] for r in reports]

    def version(self):
        """`SELECT VERSION()`: e.g. 9.7.4 or 11.8.3-MariaDB-..."""
        return self.sql("SELECT VERSION()")[0][0]

    def lock_waits(self):
        """How many lock waits the server sees now (MySQL 8+ moved them to performance_schema)."""
        table = "performance_schema.data_lock_waits" if MYSQL else "information_schema.INNODB_LOCK_WAITS"
        return int(self.sql(f"SELECT COUNT(*) FROM {table}")[0][0])

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=60)

    def alive(self):
        return subprocess.run([ADMIN, "-S", str(SOCKET), "-u", "root", "ping"], capture_output=True).returncode == 0
