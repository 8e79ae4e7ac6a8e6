"""Single-row transactions with the worker running as users run it (issue 14): pgbench, one
INSERT of one row per transaction into a 4-column table, interleaved runs, medians, beside an
untracked twin and a plain PL/pgSQL trigger that inserts the row's to_jsonb into an indexed
queue table, for each state of the worker and each client count:
  delivering: sending to the emulator with default settings (the worker drains as it goes);
  paused:     certyo.pause();
  disabled:   certyo.enabled = off.
For the certyo_cdc runs it also prints what delivery costs, medians over the rounds: the
worker's CPU (all its threads, /proc/PID/stat) and the emulator's per change written, and the
WAL per transaction (pg_current_wal_lsn before and after).

Usage: python3 bench/oltp.py [--rounds 5] [--seconds 5] [--clients 1,4,8]
                             [--modes delivering,paused,disabled]
Needs the extension installed (release build) and target/release/certyo-emulator.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "pg_test"))
from harness import Cluster, Emulator, free_port, wait_for  # noqa: E402

PG_BIN = os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin")
EMULATOR = os.environ.get("CERTYO_EMULATOR", str(REPO / "target/release/certyo-emulator"))
TABLES = ("untracked", "certyo_cdc", "plpgsql")

SETUP = """
CREATE EXTENSION IF NOT EXISTS certyo_cdc;
CREATE TABLE untracked (id bigserial PRIMARY KEY, a int, b text, c timestamptz);
CREATE TABLE certyo_cdc (id bigserial PRIMARY KEY, a int, b text, c timestamptz);
SELECT certyo.track('certyo_cdc');
CREATE TABLE plpgsql (id bigserial PRIMARY KEY, a int, b text, c timestamptz);
CREATE TABLE plpgsql_queue (id bigserial PRIMARY KEY, relid oid NOT NULL, payload jsonb NOT NULL,
                            queued_at timestamptz NOT NULL DEFAULT now());
CREATE FUNCTION plpgsql_capture() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO plpgsql_queue (relid, payload) VALUES (TG_RELID, to_jsonb(NEW));
    RETURN NULL;
END $$;
CREATE TRIGGER capture AFTER INSERT OR UPDATE OR DELETE ON plpgsql
    FOR EACH ROW EXECUTE FUNCTION plpgsql_capture();
"""


def pgbench(cluster, script, clients, seconds):
    jobs = min(clients, 2)
    done = subprocess.run(
        [f"{PG_BIN}/pgbench", "-h", cluster.dir, "-p", str(cluster.port), "-U", "postgres", "-n",
         "-c", str(clients), "-j", str(jobs), "-T", str(seconds), "-f", script, "postgres"],
        capture_output=True, text=True)
    found = re.search(r"tps = ([0-9.]+)", done.stdout)
    if not found:
        sys.exit(f"pgbench failed: {done.stdout}\n{done.stderr}")
    return float(found.group(1))


def cpu_seconds(pid):
    """utime + stime of process `pid` (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_pid(cluster):
    """The delivery worker's process (waited for: it may be restarting after a mode change)."""
    query = "SELECT pid FROM pg_stat_activity WHERE backend_type = 'certyo_cdc delivery'"
    wait_for(lambda: cluster.sql(query).strip() != "", timeout=30)
    return cluster.sql(query).strip()


def wal_lsn(cluster):
    return cluster.sql("SELECT pg_current_wal_lsn()").strip()


def set_mode(cluster, mode):
    cluster.sql("ALTER SYSTEM SET certyo.enabled = off" if mode == "disabled" else "ALTER SYSTEM RESET certyo.enabled")
    cluster.sql("SELECT pg_reload_conf()")
    cluster.sql("SELECT certyo.pause()" if mode == "paused" else "SELECT certyo.resume()")
    time.sleep(0.5)


def drain(cluster):
    """Between runs: let the worker deliver what is queued (delivering) or drop it (else), so
    each run starts from an empty queue."""
    wait_for(lambda: cluster.sql("SELECT count(*) FROM certyo.queue").strip() == "0"
             and cluster.sql("SELECT count(*) FROM certyo.delivery WHERE state = 'pending'").strip() == "0",
             timeout=120)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--modes", default="delivering,paused,disabled")
    args = parser.parse_args()
    emulator = Emulator(EMULATOR, anchor_delay=3600)
    directory = tempfile.mkdtemp(prefix="certyo-bench-oltp-")
    os.chmod(directory, 0o777)
    # The harness's test settings put back to the extension's defaults: the worker as users run it.
    defaults = ("autovacuum = off\ncertyo.poll_interval = '1s'\ncertyo.request_timeout = '30s'\n"
                "certyo.batch_size = 1000")
    cluster = Cluster(directory, free_port(), emulator.url, defaults)
    results = {}
    try:
        cluster.sql(SETUP)
        scripts = {}
        for table in TABLES:
            path = Path(directory) / f"{table}.sql"
            path.write_text(f"INSERT INTO {table} (a, b, c) VALUES (1, 'x', now());\n")
            scripts[table] = str(path)
        print(f"single-row INSERT per transaction, pgbench -T {args.seconds}, {args.rounds} interleaved rounds, "
              f"medians ({time.strftime('%Y-%m-%d')}):")
        for mode in args.modes.split(","):
            set_mode(cluster, mode)
            for clients in map(int, args.clients.split(",")):
                tps = {t: [] for t in TABLES}
                costs = {"worker": [], "emulator": [], "wal": []}
                for _ in range(args.rounds):
                    for table in TABLES:
                        if mode == "delivering":
                            drain(cluster)
                        worker = worker_pid(cluster)
                        before = (cpu_seconds(worker), cpu_seconds(emulator.process.pid), wal_lsn(cluster))
                        tps[table].append(pgbench(cluster, scripts[table], clients, args.seconds))
                        if table == "certyo_cdc":
                            changes = tps[table][-1] * args.seconds
                            lsn = wal_lsn(cluster)
                            costs["worker"].append((cpu_seconds(worker) - before[0]) * 1e6 / changes)
                            costs["emulator"].append((cpu_seconds(emulator.process.pid) - before[1]) * 1e6 / changes)
                            costs["wal"].append(float(cluster.sql(
                                f"SELECT pg_wal_lsn_diff('{lsn}', '{before[2]}')")) / changes)
                    if mode != "delivering":
                        cluster.sql("TRUNCATE certyo.queue")
                m = {t: statistics.median(v) for t, v in tps.items()}
                results[(mode, clients)] = m
                print(f"  worker {mode:10} {clients} client(s): untracked {m['untracked']:8,.0f} tps | "
                      f"certyo_cdc {m['certyo_cdc']:8,.0f} tps ({m['certyo_cdc'] / m['untracked']:4.0%}) | "
                      f"PL/pgSQL queue trigger {m['plpgsql']:8,.0f} tps ({m['plpgsql'] / m['untracked']:4.0%})"
                      f"   [certyo_cdc runs: {', '.join(f'{v:,.0f}' for v in tps['certyo_cdc'])}]", flush=True)
                c = {k: statistics.median(v) for k, v in costs.items()}
                print(f"      certyo_cdc runs: worker {c['worker']:.1f} us CPU per change, emulator {c['emulator']:.1f} us, "
                      f"WAL {c['wal']:,.0f} B per transaction", flush=True)
        print("  target: certyo_cdc >= 95% of untracked in every row")
    finally:
        cluster.stop()
        emulator.stop()


if __name__ == "__main__":
    main()
