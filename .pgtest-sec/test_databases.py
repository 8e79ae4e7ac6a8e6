"""Every database in the cluster (issue 13): a launcher starts one delivery worker per database
in which certyo_cdc is installed, without a restart; dropping a database, or the extension,
ends only that database's worker; certyo.max_databases and certyo.database_name say which
databases are left out, and why.

Each test brings its own cluster (conftest's emulator). Run:
  CERTYO_EMULATOR=target/release/certyo-emulator python3 -m pytest -q pg_test/test_databases.py
"""
import subprocess
import time

import pytest

from harness import Cluster, cpu_use, free_port, wait_for

DIR = "/tmp/certyo-e2e-databases"


@pytest.fixture(autouse=True)
def watch():
    """Overrides conftest's: these tests bring their own clusters."""
    yield None


@pytest.fixture
def cluster(emulator, request):
    settings = getattr(request, "param", "")
    cluster = Cluster(DIR, free_port(), emulator.url, settings)
    start_pid = cluster.postmaster_pid()
    try:
        yield cluster
        assert cluster.postmaster_pid() == start_pid, "the server restarted"
        assert "terminated by signal" not in cluster.log()
    finally:
        try:
            cluster.stop()
        except Exception:
            pass


def track_products(cluster, database, rows=10):
    cluster.sql(f"""
        CREATE EXTENSION certyo_cdc;
        CREATE TABLE products (id int PRIMARY KEY, sku text);
        SELECT certyo.track('products');
        INSERT INTO products SELECT g, 'sku-' || g FROM generate_series(1, {rows}) g;
    """, database=database)


def delivered(cluster, database, rows=10):
    return wait_for(lambda: cluster.sql(
        "SELECT count(*) FROM products WHERE certyo_record_hash IS NOT NULL", database=database) == str(rows), 30)


def worker_pid(cluster, database):
    return cluster.sql("SELECT pid FROM certyo.worker_status() WHERE running", database=database)


def records_of(emulator, database):
    return [r for r in emulator.records() if r["database"] == database]


def test_each_database_is_delivered_by_its_own_worker_without_a_restart(cluster, emulator):
    """Two databases created while the server runs, and postgres: each tracks a table, each is
    delivered by a worker of its own, with its own name as Certyo's `database`."""
    cluster.sql("CREATE DATABASE shop_a")
    cluster.sql("CREATE DATABASE shop_b")
    for database in ("shop_a", "shop_b", "postgres"):
        track_products(cluster, database)
    for database in ("shop_a", "shop_b", "postgres"):
        assert delivered(cluster, database), f"{database} delivered\n{cluster.explain(database=database)}"
        assert len(records_of(emulator, database)) == 10, f"{database}: each change once, under its own name"
    pids = {worker_pid(cluster, d) for d in ("shop_a", "shop_b", "postgres")}
    assert len(pids) == 3 and "" not in pids, f"three workers: {pids}"
    workers = cluster.sql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'certyo_cdc delivery'")
    assert workers == "3", "no worker for a database without certyo_cdc (template1 has none)"


def test_a_database_made_from_a_template_with_certyo_cdc_is_delivered(cluster, emulator):
    """CREATE EXTENSION in a template database, then CREATE DATABASE from it: the template has
    no worker (it could not be copied while one is connected), the new database has one."""
    cluster.sql("CREATE DATABASE shop_template IS_TEMPLATE true")
    track_products(cluster, "shop_template", rows=0)
    cluster.sql("CREATE DATABASE shop_copy TEMPLATE shop_template")
    cluster.sql("INSERT INTO products SELECT g, 'copy' FROM generate_series(1, 10) g", database="shop_copy")
    assert delivered(cluster, "shop_copy"), cluster.explain(database="shop_copy")
    assert worker_pid(cluster, "shop_template") == ""


def test_dropping_a_database_stops_only_its_worker(cluster, emulator):
    """DROP DATABASE without FORCE succeeds at once although a worker was connected to it; the
    other databases go on being delivered."""
    cluster.sql("CREATE DATABASE doomed")
    track_products(cluster, "doomed")
    track_products(cluster, "postgres")
    assert delivered(cluster, "doomed") and delivered(cluster, "postgres")
    started = time.monotonic()
    cluster.sql("DROP DATABASE doomed")
    assert time.monotonic() - started < 5, "DROP DATABASE waited for the worker"
    cluster.sql("INSERT INTO products VALUES (11, 'after the drop')")
    assert delivered(cluster, "postgres", rows=11), cluster.explain()
    assert wait_for(lambda: cluster.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'certyo_cdc delivery'") == "1", 10)
    assert "doomed" not in cluster.sql("SELECT string_agg(datname, ',') FROM pg_database")


def test_a_failed_drop_database_gives_the_database_its_worker_back(cluster, emulator):
    """DROP DATABASE that fails (a session is connected) stopped the worker first: the launcher
    starts a new one, and delivery goes on."""
    cluster.sql("CREATE DATABASE busy")
    track_products(cluster, "busy")
    assert delivered(cluster, "busy")
    first = worker_pid(cluster, "busy")
    holder = subprocess.Popen(["psql", "-h", cluster.dir, "-p", str(cluster.port), "-U", "postgres", "-d", "busy",
                               "-X", "-q", "-c", "SELECT pg_sleep(30)"])
    try:
        assert wait_for(lambda: cluster.sql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'busy' AND query LIKE '%pg_sleep%'") == "1", 10)
        assert "being accessed by other users" in cluster.attempt("DROP DATABASE busy", "postgres")[1]
    finally:
        holder.kill()
    assert wait_for(lambda: worker_pid(cluster, "busy") not in ("", first), 15), cluster.explain(database="busy")
    cluster.sql("INSERT INTO products VALUES (11, 'still delivered')", database="busy")
    assert delivered(cluster, "busy", rows=11), cluster.explain(database="busy")


def test_drop_extension_ends_the_worker_and_create_extension_starts_one(cluster, emulator):
    cluster.sql("CREATE DATABASE again")
    track_products(cluster, "again")
    assert delivered(cluster, "again")
    cluster.sql("DROP EXTENSION certyo_cdc CASCADE", database="again")
    assert wait_for(lambda: cluster.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'certyo_cdc delivery' AND datname = 'again'") == "0", 10)
    cluster.sql("DROP TABLE products", database="again")
    track_products(cluster, "again")
    assert delivered(cluster, "again"), cluster.explain(database="again")


def test_a_terminated_worker_is_replaced(cluster, emulator):
    """pg_terminate_backend of a database's worker: the launcher starts a new one at once (as
    Postgres restarts a worker that failed), and nothing is lost."""
    track_products(cluster, "postgres")
    assert delivered(cluster, "postgres")
    first = worker_pid(cluster, "postgres")
    cluster.sql(f"SELECT pg_terminate_backend({first})")
    assert wait_for(lambda: worker_pid(cluster, "postgres") not in ("", first), 15), cluster.explain()
    cluster.sql("INSERT INTO products VALUES (11, 'after')")
    assert delivered(cluster, "postgres", rows=11)


def test_an_ordinary_role_cannot_stop_a_worker_with_drop_database(cluster, emulator):
    """DROP DATABASE by a role that may not drop it fails before it touches the worker."""
    track_products(cluster, "postgres")
    assert delivered(cluster, "postgres")
    first = worker_pid(cluster, "postgres")
    cluster.sql("CREATE ROLE mallory LOGIN")
    try:
        error = cluster.attempt("DROP DATABASE postgres", "mallory")[1]
        assert "must be owner" in error, error
        time.sleep(1)  # a window in which a wrongly stopped worker would be gone or replaced
        assert worker_pid(cluster, "postgres") == first, "the worker was not disturbed"
    finally:
        cluster.sql("DROP ROLE mallory")


@pytest.mark.parametrize("cluster", ["certyo.max_databases = 1"], indirect=True)
def test_the_cap_on_databases_names_the_database_left_out(cluster, emulator):
    track_products(cluster, "postgres")
    assert delivered(cluster, "postgres")
    cluster.sql("CREATE DATABASE second")
    track_products(cluster, "second")
    assert wait_for(lambda: 'database "second" is not delivered: certyo.max_databases (1)' in cluster.log(), 15)
    detail = cluster.sql("SELECT state || ': ' || detail FROM certyo.worker_status()", database="second")
    assert detail.startswith("not running") and "certyo.max_databases" in detail, detail
    assert cluster.sql("SELECT pending FROM certyo.worker_status()", database="second") == "10"


@pytest.mark.parametrize("cluster", ["certyo.database_name = 'chosen'"], indirect=True)
def test_database_name_restricts_delivery_to_one_database(cluster, emulator):
    cluster.sql("CREATE DATABASE chosen")
    track_products(cluster, "chosen")
    track_products(cluster, "postgres")
    assert delivered(cluster, "chosen")
    detail = cluster.sql("SELECT detail FROM certyo.worker_status()")
    assert "certyo.database_name = chosen restricts delivery" in detail, detail
    assert cluster.sql("SELECT pending FROM certyo.worker_status()") == "10"


def launcher_pid(cluster):
    return cluster.sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'certyo_cdc launcher'")


def test_nobody_but_a_superuser_can_keep_the_launcher_busy(cluster, emulator):
    """An ordinary role's CREATE EXTENSION fails (caught in a savepoint, committed), and
    CREATE EXTENSION IF NOT EXISTS where it is installed does nothing: neither wakes the
    launcher, which would start a worker in every database without one. Before, 300 such
    commits kept it forking hundreds of processes a second."""
    track_products(cluster, "postgres", rows=0)
    cluster.sql("CREATE DATABASE idle_a")
    cluster.sql("CREATE DATABASE idle_b")
    cluster.sql("CREATE ROLE lowly LOGIN")
    try:
        cpu, _ = cpu_use(launcher_pid(cluster))
        attack = "".join("BEGIN; SAVEPOINT s; CREATE EXTENSION certyo_cdc; ROLLBACK TO s; COMMIT;\n"
                         "CREATE EXTENSION IF NOT EXISTS certyo_cdc;\n" for _ in range(150))
        cluster.attempt_verbose(attack, user="lowly", stop_on_error=False)
        time.sleep(2)  # a window for launcher work the attack would have caused
        used = cpu_use(launcher_pid(cluster))[0] - cpu
        print(f"launcher CPU during 300 attacking commits: {used * 1000:.1f} ms")
        # Starting a worker in each database costs a fork each; before, hundreds a second.
        assert used <= 0.05, f"the launcher used {used * 1000:.1f} ms of CPU"
    finally:
        cluster.sql("DROP ROLE lowly")


def test_a_database_that_sets_role_for_every_session_is_refused_with_a_reason(cluster, emulator):
    """ALTER DATABASE ... SET role (a database owner may) would make the worker run as that
    role: it serves nothing there and says why; after RESET and certyo.wake() it delivers."""
    cluster.sql("CREATE DATABASE roled")
    track_products(cluster, "roled", rows=0)
    cluster.sql("CREATE ROLE nobody_special")
    first = wait_for(lambda: worker_pid(cluster, "roled"), 15)
    assert first, "the database's worker runs"
    cluster.sql("ALTER DATABASE roled SET role = 'nobody_special'")
    cluster.sql(f"SELECT pg_terminate_backend({first})")
    assert wait_for(lambda: "sets role or session_authorization for every session" in cluster.log(), 15), \
        cluster.explain()
    cluster.sql("ALTER DATABASE roled RESET role")
    cluster.sql("SELECT certyo.wake()", database="roled")
    cluster.sql("INSERT INTO products SELECT g, 'x' FROM generate_series(1, 10) g", database="roled")
    assert delivered(cluster, "roled"), cluster.explain(database="roled")
