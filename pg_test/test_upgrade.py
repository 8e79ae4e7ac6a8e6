"""Upgrades (issue 13): `ALTER EXTENSION certyo_cdc UPDATE` from every released version gives
exactly the schema of a fresh install of the current version, and the changes queued and the
receipts recorded before the update survive it and are delivered.

Every released version's full script is kept, never edited, as sql/certyo_cdc--V.sql; each
release's schema changes ship as sql/certyo_cdc--A--B.sql (installed by cargo pgrx install). A
test per released version: a fresh cluster, that version installed from its script, changes
captured (some delivered, some waiting), the update, then the comparison with a fresh install
in another database (pg_test/sql/describe_extension.sql lists every member object, column,
constraint, index, trigger, privilege and comment) and delivery of what waited.

Run:  CERTYO_EMULATOR=target/release/certyo-emulator python3 -m pytest -q pg_test/test_upgrade.py
"""
import difflib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness import PG_BIN, TMP, Cluster, free_port, wait_for

REPO = Path(__file__).resolve().parent.parent
DIR = f"{TMP}/certyo-e2e-upgrade"
DESCRIBE = (REPO / "pg_test/sql/describe_extension.sql").read_text()


def released_versions():
    """Versions whose full script is kept in sql/ (certyo_cdc--V.sql, one version in the name)."""
    names = (p.name for p in (REPO / "sql").glob("certyo_cdc--*.sql"))
    versions = (re.fullmatch(r"certyo_cdc--(.+)\.sql", name).group(1) for name in names)
    return sorted(v for v in versions if "--" not in v)


def current_version():
    return re.search(r'^version = "([^"]+)"', (REPO / "Cargo.toml").read_text(), re.M).group(1)


def extension_dir():
    sharedir = subprocess.run([f"{PG_BIN}/pg_config", "--sharedir"], check=True, capture_output=True,
                              text=True).stdout.strip()
    return Path(sharedir) / "extension"


@pytest.fixture(autouse=True)
def watch():
    """Overrides conftest's: these tests bring their own clusters."""
    yield None


def test_a_release_is_kept_for_every_update_script():
    """Every update script starts from a kept release or from the end of another script, and
    the chain from the oldest release reaches the current version: no release without a way
    up, no script that no installation can reach."""
    releases = released_versions()
    assert releases, "no released version is kept in sql/ (certyo_cdc--V.sql)"
    steps = dict(m.groups() for m in (re.match(r"^certyo_cdc--(.+?)--(.+)\.sql$", p.name)
                                     for p in (REPO / "sql").glob("certyo_cdc--*--*.sql")) if m)
    for release in releases:
        version, seen = release, set()
        while version != current_version():
            assert version in steps, f"no update script from {version} (sql/certyo_cdc--{version}--NEXT.sql)"
            assert version not in seen, f"the update scripts loop at {version}"
            seen.add(version)
            version = steps[version]


@pytest.mark.parametrize("release", [v for v in released_versions() if v != current_version()])
def test_update_from_a_release_equals_a_fresh_install_and_loses_nothing(emulator, release):
    """Install the release, deliver 50 rows, pause and capture 21 more changes, update: the
    schema equals a fresh install's, and after resuming every change arrives exactly once,
    history and audit intact."""
    shutil.copy(REPO / f"sql/certyo_cdc--{release}.sql", extension_dir() / f"certyo_cdc--{release}.sql")
    # The extension's default write-back mode, which tables tracked before the update must not take.
    cluster = Cluster(DIR, free_port(), emulator.url, "certyo.write_back = 'anchored'")
    table = "items_" + re.sub(r"\W", "_", release)  # the emulator is shared by the module's tests
    try:
        cluster.sql(f"""
            CREATE EXTENSION certyo_cdc VERSION '{release}';
            CREATE TABLE {table} (id int PRIMARY KEY, v text);
            SELECT certyo.track('{table}');
            INSERT INTO {table} SELECT g, 'before' FROM generate_series(1, 50) g;
            -- As 0.1.0's library let a table be (this one refuses it: the event trigger is kept
            -- from checking the ALTER TABLE here).
            CREATE TABLE {table}_sized (id int PRIMARY KEY, note text);
            SELECT certyo.track('{table}_sized', exclude_columns => ARRAY['note']);
            ALTER EVENT TRIGGER certyo_alter_table DISABLE;
            ALTER TABLE {table}_sized ADD COLUMN size int GENERATED ALWAYS AS (length(note)) STORED;
            ALTER EVENT TRIGGER certyo_alter_table ENABLE;
        """)
        assert cluster.wait_drained(30), f"{release} delivers before the update"
        assert wait_for(lambda: cluster.sql(f"SELECT count(*) FROM {table} WHERE certyo_record_hash IS NOT NULL") == "50", 30)
        cluster.sql("SELECT certyo.pause()")
        assert wait_for(lambda: cluster.sql("SELECT state FROM certyo.worker_status()") == "paused", 10)
        cluster.sql(f"UPDATE {table} SET v = 'waiting' WHERE id <= 20; INSERT INTO {table} VALUES (51, 'waiting')")
        assert cluster.sql("SELECT count(*) FROM certyo.queue") == "21"

        # A table this version refuses to track (a captured generated column computed from an
        # excluded one) is said, not a reason for the update to fail for the whole database.
        updated = cluster.attempt_verbose("ALTER EXTENSION certyo_cdc UPDATE")
        assert updated.returncode == 0, updated.stderr
        assert f'generated column "size" of public.{table}_sized' in updated.stderr, updated.stderr
        assert cluster.sql("SELECT extversion FROM pg_extension WHERE extname = 'certyo_cdc'") == current_version()
        # Every change, queued or accepted before, belongs to the table's identity, which its capture
        # trigger now carries (a restore finds the table by it).
        assert cluster.sql("SELECT (SELECT count(*) FROM certyo.queue WHERE table_id = 0)"
                           " + (SELECT count(*) FROM certyo.receipt WHERE table_id = 0)") == "0"
        assert cluster.sql(f"SELECT table_id = (SELECT id FROM certyo.table_identity WHERE relid = '{table}'::regclass) "
                           f"FROM certyo.tracked_oids() WHERE relid = '{table}'::regclass") == "t"

        # Tracked before the update, it keeps writing back at acceptance; a table tracked now
        # takes the default, writing back once anchored.
        assert cluster.sql(f"SELECT write_back FROM certyo.tracked_tables WHERE \"table\" = '{table}'::regclass") == "accepted"
        assert cluster.sql("SELECT boot_val FROM pg_settings WHERE name = 'certyo.write_back'") == "anchored"
        cluster.sql("CREATE TABLE tracked_after (id int PRIMARY KEY); SELECT certyo.track('tracked_after')")
        assert cluster.sql("SELECT write_back FROM certyo.tracked_tables WHERE \"table\" = 'tracked_after'::regclass") == "anchored"
        cluster.sql("SELECT certyo.untrack('tracked_after', drop_columns => true); DROP TABLE tracked_after")

        cluster.sql("CREATE DATABASE fresh")
        fresh = subprocess.run(["psql", "-h", cluster.dir, "-p", str(cluster.port), "-U", "postgres", "-d", "fresh",
                                "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
                                "-c", "CREATE EXTENSION certyo_cdc", "-c", DESCRIBE],
                               check=True, capture_output=True, text=True).stdout.splitlines()
        updated = cluster.sql(DESCRIBE).splitlines()
        assert len(fresh) > 50, "the description lists the extension's objects"
        difference = "\n".join(difflib.unified_diff(fresh, updated, "fresh install", f"updated from {release}", lineterm=""))
        assert updated == fresh, f"the updated schema differs from a fresh install:\n{difference}"

        # What waited is delivered after the update, and what was delivered before keeps its history.
        cluster.sql("SELECT certyo.resume()")
        assert cluster.wait_drained(30)
        records = [r for r in emulator.records() if r["collection"] == f"public.{table}"]
        assert len(records) == 71, "50 inserts, 20 updates and 1 insert, each exactly once"
        assert cluster.sql(f"SELECT count(*) FROM certyo.history('{table}', '1')") == "2"
        # Its changes after the update too: the hash at acceptance (nothing is verified yet).
        assert wait_for(lambda: cluster.sql(f"SELECT count(*) FROM {table} WHERE certyo_record_hash IS NULL"
                                            " OR certyo_anchor_status <> 'pending'") == "0", 30)
        assert cluster.sql(f"SELECT count(*) FROM certyo.audit('{table}')") == "0"
        assert cluster.sql("SELECT dead FROM certyo.worker_status()") == "0"
    finally:
        try:
            cluster.stop()
        except Exception:
            pass
