"""The companion installs and captures whatever the database's and the client's character set and
collation: docs/relay.md's commands (the script, then the generator piped into the client) on a
database created with the collation WordPress and Laravel use, MariaDB's newer default, latin1,
and with a latin1 client; then an application (utf8mb4) writes rows with non-ASCII keys and
values, and the relay delivers them and writes the hashes back. Fixtures in conftest.py."""
import json
import subprocess

import pytest
from conftest import CLIENT, PASSWORD, REPO, SOCKET, Relay, _databases
from harness import wait_for  # pg_test/, on the path by conftest.py

CASES = [
    # (database's character set or collation, client's --default-character-set; None: its default)
    ("COLLATE utf8mb4_unicode_ci", None),
    ("COLLATE utf8mb4_unicode_ci", "utf8mb4"),
    ("COLLATE utf8mb4_uca1400_ai_ci", "utf8mb4"),
    ("COLLATE utf8mb4_0900_ai_ci", "utf8mb4"),
    ("CHARACTER SET latin1", "utf8mb4"),
    ("COLLATE utf8mb4_unicode_ci", "latin1"),
    ("CHARACTER SET latin1", "latin1"),
]


def client(charset):
    return [CLIENT, "-S", str(SOCKET), "-u", "root"] + ([f"--default-character-set={charset}"] if charset else [])


class Database:
    """A database created with `create`, the companion installed by a client with `charset`."""

    def __init__(self, server, create, charset):
        self.server, self.charset = server, charset
        self.name = f"install{next(_databases)}"
        server.sql(f"CREATE DATABASE {self.name} {create}")
        installed = subprocess.run(client(charset) + [self.name], stdin=open(REPO / "sql/mysql/certyo_queue.sql"),
                                   capture_output=True, text=True)
        assert (installed.returncode, installed.stderr) == (0, ""), installed.stderr
        self.url = f"mysql://relay_{self.name}:{PASSWORD}@localhost/{self.name}?socket={SOCKET}"

    def sql(self, statement):
        return self.server.sql(statement, self.name)

    def track(self, table):
        """docs/relay.md's command: the generator's output piped back into the client."""
        call = f"CALL certyo_trigger_ddl('{self.name}', '{table}', NULL, NULL)"
        generate = subprocess.Popen(client(self.charset) + ["-N", "-r", "-e", call, self.name],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        install = subprocess.run(client(self.charset) + [self.name], stdin=generate.stdout, capture_output=True)
        generate.stdout.close()
        errors = generate.stderr.read().decode(errors="replace")
        assert generate.wait() == 0 and errors == "", errors
        assert install.returncode == 0, install.stderr.decode(errors="replace")

    def drained(self):
        return self.sql("SELECT COUNT(*) FROM certyo_queue WHERE status = 'pending'") == [["0"]]


@pytest.fixture(params=CASES, ids=lambda c: f"{c[0].split()[-1]}-client-{c[1] or 'default'}")
def database(request, mariadb):
    create, charset = request.param
    collation = create.split()[-1]
    if collation.startswith("utf8mb4_") and not mariadb.sql(f"SHOW COLLATION LIKE '{collation}'"):
        pytest.skip(f"this server does not know {collation}")
    db = Database(mariadb, create, charset)
    yield db
    mariadb.sql(f"DROP DATABASE {db.name}; DROP USER IF EXISTS 'relay_{db.name}'@'localhost'")


def test_the_companion_installs_and_captures_whatever_the_character_sets(database, emulator, tmp_path):
    db = database
    # A column whose name latin1 cannot spell, unless the client is latin1 (the generator's
    # output passes through it, names and all).
    extra = "" if db.charset == "latin1" else "`ŝtono` INT DEFAULT 7,"
    db.sql(f"""CREATE TABLE products (
                  sku VARCHAR(20) PRIMARY KEY, `ünï` VARCHAR(50), price DECIMAL(10,2), {extra}
                  certyo_record_hash VARCHAR(128) NULL, certyo_anchor_status VARCHAR(20) DEFAULT 'pending',
                  certyo_verified_at DATETIME(6) NULL)""")
    db.track("products")
    # An application writing utf8mb4, with what the table's character set can hold.
    latin1 = db.sql("SELECT DEFAULT_CHARACTER_SET_NAME FROM information_schema.SCHEMATA "
                    f"WHERE SCHEMA_NAME = '{db.name}'") == [["latin1"]]
    sku, name = ("Zoë-é", "Grüße") if latin1 else ("Zoë-ł", "Grüße ✓")
    db.sql(f"SET NAMES utf8mb4; INSERT INTO products (sku, `ünï`, price) VALUES ('{sku}', '{name}', 1), ('b', 'x', 2);"
           f"UPDATE products SET price = 3 WHERE sku = '{sku}';"
           "UPDATE products SET certyo_anchor_status = 'x' WHERE sku = 'b'")
    queued = db.sql("SET NAMES utf8mb4; SELECT record_id, operation, payload FROM certyo_queue ORDER BY id")
    assert [(q[0], q[1]) for q in queued] == [(sku, "insert"), ("b", "insert"), (sku, "update")], queued
    assert json.loads(queued[2][2]) == {"sku": sku, "ünï": name, "price": 3} | ({"ŝtono": 7} if extra else {})
    # The relay delivers them and finds the rows by their text keys to write the hashes back.
    db.server.sql(f"CREATE USER 'relay_{db.name}'@'localhost' IDENTIFIED BY '{PASSWORD}';"
                  f"GRANT SELECT, UPDATE, DELETE ON {db.name}.certyo_queue TO 'relay_{db.name}'@'localhost';"
                  f"GRANT SELECT (sku, certyo_record_hash), "
                  f"UPDATE (certyo_record_hash, certyo_anchor_status, certyo_verified_at) "
                  f"ON {db.name}.products TO 'relay_{db.name}'@'localhost'")
    relay = Relay(tmp_path, emulator, db).start()
    try:
        assert wait_for(db.drained, timeout=30), db.sql("SELECT * FROM certyo_queue")
        assert wait_for(lambda: db.sql("SET NAMES utf8mb4; SELECT p.sku FROM products p JOIN certyo_queue q "
                                       "ON q.record_id = p.sku AND q.record_hash = p.certyo_record_hash "
                                       "AND q.id = (SELECT MAX(id) FROM certyo_queue m WHERE m.record_id = q.record_id) "
                                       "WHERE p.certyo_anchor_status = 'anchored' ORDER BY p.sku")
                        == [["b"], [sku]], timeout=30), db.sql("SELECT * FROM products")
        received = {r["recordId"] for r in emulator.records() if r["database"] == db.name}
        assert received == {sku, "b"}
    finally:
        relay.stop()
    assert "ERROR" not in relay.output() and "WARN" not in relay.output(), relay.output()
