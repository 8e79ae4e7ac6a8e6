"""Capture end to end, on a cluster that does not preload certyo_cdc (so no worker delivers, and
the queue keeps what was captured): what needs real commits and real connections. A rolled-back
transaction, a login role without rights on schema certyo, dump and restore, DROP EXTENSION.

Each test gets a database of its own with certyo_cdc and a tracked table `products`. Run:
  python3 -m pytest -q pg_test/test_capture.py
"""
import itertools
import subprocess

import pytest

from harness import PG_BIN, TMP, Cluster, free_port

DIR = f"{TMP}/certyo-e2e-capture"
_databases = itertools.count(1)


@pytest.fixture(autouse=True)
def watch():
    """Overrides conftest's: this cluster has no canary (and no worker)."""
    yield None


@pytest.fixture(scope="module")
def cluster():
    """Overrides conftest's: a cluster without certyo_cdc preloaded, nothing to deliver to, and
    a template database with certyo_cdc and `products` tracked, which each test's database copies
    (quicker than installing the extension anew)."""
    cluster = Cluster(DIR, free_port(), None)
    try:
        cluster.sql("CREATE DATABASE capture_template")
        cluster.sql("""CREATE EXTENSION certyo_cdc;
                       CREATE TABLE products (id int PRIMARY KEY, sku text, price numeric(10,2));
                       SELECT certyo.track('products');""", database="capture_template")
        yield cluster
    finally:
        # Thrown away: no shutdown checkpoint to write the test databases out.
        cluster.pg_ctl("-m", "immediate", "stop")


class Database:
    """A database of the cluster, for statements as postgres (`sql`) or as another role (`run`:
    its output and errors, failing or not)."""

    def __init__(self, cluster, name):
        self.cluster, self.name = cluster, name

    def sql(self, statement):
        return self.cluster.sql(statement, database=self.name)

    def run(self, statement, user):
        out = subprocess.run(["psql", "-h", self.cluster.dir, "-p", str(self.cluster.port), "-U", user, "-d", self.name,
                              "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", statement], capture_output=True, text=True)
        return (out.stdout + out.stderr).strip()


@pytest.fixture
def db(cluster):
    """A fresh database with certyo_cdc and `products` tracked, nothing captured yet. It goes with
    the module's cluster (a DROP DATABASE waits for a checkpoint)."""
    name = f"capture_{next(_databases)}"
    cluster.sql(f"CREATE DATABASE {name} TEMPLATE capture_template")
    return Database(cluster, name)


def test_create_extension_works_without_preloading_and_says_how_to_deliver(db):
    assert db.sql("SELECT state FROM certyo.worker_status()") == "not delivering"
    assert db.sql("LOAD 'certyo_cdc'; SHOW certyo.batch_size") == "1000", \
        "loading the library outside preloading defines the settings (and does not fail)"


def test_a_rolled_back_transaction_queues_nothing(db):
    db.sql("BEGIN; INSERT INTO products VALUES (1, 'rolled back', 1); ROLLBACK;")
    assert db.sql("SELECT count(*) FROM certyo.queue") == "0"


def test_a_committed_insert_is_queued_once(db):
    db.sql("INSERT INTO products VALUES (1, 'A', 1)")
    assert db.sql("SELECT string_agg(operation || record_id, ',') FROM certyo.queue") == "insert1"


def test_a_login_role_without_rights_on_certyo_can_write_a_tracked_table(db):
    db.sql("INSERT INTO products VALUES (1, 'A', 1)")
    db.sql(f"CREATE ROLE clerk_{db.name} LOGIN; GRANT SELECT, INSERT, UPDATE, DELETE ON products TO clerk_{db.name}")
    clerk = f"clerk_{db.name}"
    try:
        assert db.run("UPDATE products SET price = 2 WHERE id = 1", clerk) == ""
        assert db.sql("SELECT operation FROM certyo.queue ORDER BY id DESC LIMIT 1") == "update", "its change is queued"
        assert db.run("SELECT payload FROM certyo.queue", clerk).splitlines()[0] == \
            "ERROR:  permission denied for table queue", "it cannot read the queue"
        assert db.run("SELECT certyo.untrack('products')", clerk).splitlines()[0] == \
            "ERROR:  certyo_cdc: must be owner of table public.products to change its tracking", "it cannot untrack the table"
    finally:
        db.sql(f"REVOKE ALL ON products FROM {clerk}")
        db.sql(f"DROP ROLE {clerk}")


def test_dump_and_restore_keep_the_queue_the_tracking_and_backfills(db, cluster):
    """The options travel with the trigger; the queue, receipts and backfills with the extension."""
    db.sql("INSERT INTO products VALUES (1, 'A', 1); UPDATE products SET price = 2 WHERE id = 1")
    db.sql("SELECT certyo.backfill('products')")
    dump, restored = f"{cluster.dir}/{db.name}.dump", f"{db.name}_restored"
    subprocess.run(["sudo", "-u", "postgres", f"{PG_BIN}/pg_dump", "-h", cluster.dir, "-p", str(cluster.port),
                    "-Fc", "-f", dump, db.name], check=True, capture_output=True)
    cluster.sql(f"CREATE DATABASE {restored}")
    # pg_restore reports what it could not restore; the checks below say what matters.
    subprocess.run(["sudo", "-u", "postgres", f"{PG_BIN}/pg_restore", "-h", cluster.dir, "-p", str(cluster.port),
                    "-d", restored, dump], capture_output=True)
    again = Database(cluster, restored)
    assert again.sql("SELECT count(*) FROM certyo.queue") == "2", "restore keeps the queued changes"
    assert again.sql('SELECT "table"::text || record_id_columns::text FROM certyo.tracked_tables') == "products{id}", \
        "restore keeps the tracking"
    again.sql("INSERT INTO products VALUES (2, 'B', 3)")
    assert again.sql("SELECT id > ALL (SELECT id FROM certyo.queue WHERE record_id = '1') "
                     "FROM certyo.queue WHERE record_id = '2'") == "t", \
        "the restored database captures with queue ids past the restored ones"
    assert again.sql("SELECT certyo.backfill('products'); "
                     "SELECT string_agg(id::text, ',' ORDER BY id) FROM certyo.backfills").splitlines()[-1] == "1,2", \
        "restore keeps backfill requests, and new ones get fresh ids"


def test_drop_extension_removes_the_capture_triggers_and_the_table_stays_writable(db):
    db.sql("DROP EXTENSION certyo_cdc")
    assert db.sql("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'products'::regclass") == "0"
    assert db.sql("INSERT INTO products VALUES (9, 'after', 1)") == ""
