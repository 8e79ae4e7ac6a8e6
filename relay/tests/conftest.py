"""Fixtures for certyo-relay's end-to-end tests: a real MariaDB server from Debian's packages
(started once per session on a Unix socket, as the mysql user), a fresh database per test with
the companion (sql/mysql/certyo_queue.sql) and a tracked `products` table, the Certyo emulator
(pg_test/emulator) per test, and the relay binary run as users run it.

Run:  CERTYO_RELAY=target/release/certyo-relay CERTYO_EMULATOR=target/release/certyo-emulator \
      python3 -m pytest -q relay/tests
"""
import itertools
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "pg_test"))
from harness import KEY, Emulator  # noqa: E402
from mariadb import CLIENT, SOCKET, MariaDB  # noqa: E402

RELAY = os.environ.get("CERTYO_RELAY", str(REPO / "target/release/certyo-relay"))
EMULATOR = os.environ.get("CERTYO_EMULATOR", str(REPO / "target/release/certyo-emulator"))
PASSWORD = "relay-pw"
_databases = itertools.count(1)


@pytest.fixture(scope="session")
def mariadb():
    server = MariaDB()
    yield server
    server.stop()


class Shop:
    """One test's database: the companion, `products` tracked, a `relay` user with what the
    relay needs (docs/relay.md: the grants)."""

    def __init__(self, server):
        self.server = server
        self.name = f"shop{next(_databases)}"
        server.sql(f"CREATE DATABASE {self.name}")
        server.sql((REPO / "sql/mysql/certyo_queue.sql").read_text(), self.name)
        self.sql("""CREATE TABLE products (
                        id INT PRIMARY KEY, name VARCHAR(100), price DECIMAL(10,2), updated_at DATETIME(6),
                        certyo_record_hash VARCHAR(128) NULL, certyo_anchor_status VARCHAR(20) DEFAULT 'pending',
                        certyo_verified_at DATETIME(6) NULL)""")
        self.track("products")
        user = f"'relay_{self.name}'@'localhost'"
        server.sql(f"CREATE USER {user} IDENTIFIED BY '{PASSWORD}';"
                   f"GRANT SELECT, UPDATE, DELETE ON {self.name}.certyo_queue TO {user};"
                   f"GRANT SELECT (id, certyo_record_hash), UPDATE (certyo_record_hash, certyo_anchor_status, certyo_verified_at)"
                   f"  ON {self.name}.products TO {user};")
        self.url = f"mysql://relay_{self.name}:{PASSWORD}@localhost/{self.name}?socket={SOCKET}"

    def track(self, table, exclude="NULL"):
        ddl = self.server.sql(f"CALL certyo_trigger_ddl('{self.name}', '{table}', {exclude}, NULL)", self.name)
        self.server.sql("\n".join(row[0] for row in ddl), self.name)

    def sql(self, statement):
        return self.server.sql(statement, self.name)

    def value(self, statement):
        return self.server.value(statement, self.name)

    def queue(self):
        """Each queued change: id, record_id, operation, status, record_hash, anchor_status."""
        return self.sql("SELECT id, record_id, operation, status, COALESCE(record_hash, ''), "
                        "COALESCE(anchor_status, '') FROM certyo_queue ORDER BY id")

    def drained(self):
        return self.value("SELECT COUNT(*) FROM certyo_queue WHERE status = 'pending'") == "0"


class Session:
    """Another application's open transaction, on a connection of its own: `run` sends
    statements and waits for their answer (so a lock is held when it returns), `commit` ends it."""

    def __init__(self, shop):
        self.process = subprocess.Popen([CLIENT, "-S", str(SOCKET), "-u", "root", "-N", "-B", "--unbuffered", shop.name],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
        self.run("START TRANSACTION")

    def run(self, statement):
        self.process.stdin.write(f"{statement}; SELECT 'certyo-test-done';\n")
        self.process.stdin.flush()
        lines = []
        while (line := self.process.stdout.readline()) and line.strip() != "certyo-test-done":
            lines.append(line.rstrip("\n"))
        assert line, f"the session ended: {lines}"
        return lines

    def commit(self):
        self.run("COMMIT")
        self.close()

    def close(self):
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)


@pytest.fixture
def session(shop):
    opened = []

    def make():
        opened.append(Session(shop))
        return opened[-1]

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def shop(mariadb):
    db = Shop(mariadb)
    yield db
    mariadb.sql(f"DROP DATABASE {db.name}; DROP USER 'relay_{db.name}'@'localhost'")


@pytest.fixture
def emulator():
    emulator = Emulator(EMULATOR, anchor_delay=1)
    yield emulator
    emulator.stop()


class Relay:
    """certyo-relay with a config file of its own; `start` runs it, `command` runs check/status."""

    def __init__(self, directory, emulator, shop, **settings):
        self.config = directory / "relay.toml"
        self.log_path = directory / "relay.log"
        values = {"verify_min_age": "1s", "verify_interval": "1s", "poll_interval": "200ms",
                  "max_retry_interval": "2s", "request_timeout": "5s"} | settings
        lines = ["[certyo]", f'base_url = "{emulator.url}"', 'tenant_id = "acme"']
        lines += [f'{k} = {v!r}'.replace("'", '"') if isinstance(v, str) else f"{k} = {v}"
                  for k, v in values.items() if v is not None]
        lines += ["", "[[source]]", 'name = "shop"', f'url = "{shop.url}"']
        self.config.write_text("\n".join(lines) + "\n")
        self.env = os.environ | {"CERTYO_API_KEY": KEY, "CERTYO_RELAY_LOG": "info,certyo_relay=debug"}
        self.process = None

    def command(self, *args, env=None):
        return subprocess.run([RELAY, "--config", str(self.config), *args], capture_output=True, text=True,
                              env=env or self.env, timeout=60)

    def start(self, *options):
        self.log = open(self.log_path, "a")
        self.process = subprocess.Popen([RELAY, "--config", str(self.config), "run", *options], env=self.env,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def output(self):
        return self.log_path.read_text() if self.log_path.exists() else ""

    def kill(self, sig=signal.SIGKILL):
        self.process.send_signal(sig)
        code = self.process.wait(timeout=60)
        self.log.close()
        return code

    def stop(self):
        if self.process and self.process.poll() is None:
            self.kill(signal.SIGTERM)


@pytest.fixture
def relay(tmp_path, emulator, shop):
    made = []

    def make(**settings):
        r = Relay(tmp_path, emulator, shop, **settings)
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()
