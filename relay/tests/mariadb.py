"""A MariaDB server from Debian's packages, for the relay's tests, demo and benchmark: started
on a Unix socket under DIR as the mysql user (no TCP), UTC, stopped by `stop`."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "pg_test"))
from harness import wait_for  # noqa: E402

DIR = Path(os.environ.get("CERTYO_MARIADB_DIR", "/tmp/certyo-relay-e2e"))
SOCKET = DIR / "mysqld.sock"


class MariaDB:
    """A MariaDB server on a socket under DIR; `sql` runs statements as root (socket auth)."""

    def __init__(self):
        if DIR.exists():
            self._stop_leftover()
            shutil.rmtree(DIR)
        DIR.mkdir(parents=True)
        shutil.chown(DIR, "mysql")
        subprocess.run(["mariadb-install-db", f"--datadir={DIR}/data", "--user=mysql", "--skip-test-db",
                        "--auth-root-authentication-method=socket"], check=True, capture_output=True)
        self.start()

    def start(self):
        self.process = subprocess.Popen(
            ["mariadbd", f"--datadir={DIR}/data", f"--socket={SOCKET}", "--skip-networking", "--user=mysql",
             f"--pid-file={DIR}/mysqld.pid", f"--log-error={DIR}/error.log", "--innodb-flush-log-at-trx-commit=2"],
            env=os.environ | {"TZ": "UTC"})
        assert wait_for(lambda: subprocess.run(["mariadb-admin", "-S", str(SOCKET), "ping"],
                                               capture_output=True).returncode == 0, timeout=60), \
            (DIR / "error.log").read_text()

    def _stop_leftover(self):
        pid = DIR / "mysqld.pid"
        if pid.exists():
            try:
                os.kill(int(pid.read_text()), signal.SIGTERM)
                time.sleep(2)
            except (ProcessLookupError, ValueError):
                pass

    def sql(self, statement, database=None, check=True):
        """Rows as lists of strings (tab-separated, NULL as 'NULL')."""
        args = ["mariadb", "-S", str(SOCKET), "-N", "-r", "-B"] + ([database] if database else [])
        done = subprocess.run(args, input=statement, capture_output=True, text=True)
        if check and done.returncode != 0:
            raise AssertionError(f"{statement}\n{done.stderr}")
        return [line.split("\t") for line in done.stdout.splitlines()]

    def value(self, statement, database):
        rows = self.sql(statement, database)
        return rows[0][0] if rows else None

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=60)

    def alive(self):
        return subprocess.run(["mariadb-admin", "-S", str(SOCKET), "ping"], capture_output=True).returncode == 0


