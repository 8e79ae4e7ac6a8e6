"""Where the delivery worker's time goes, statement by statement: a fresh cluster with
pg_stat_statements (track = all, so the worker's own statements are counted), one tracked table
(write_back => 'anchored' unless told), pgbench single-row INSERTs at 4 clients for 5 s to warm
up and then for the given seconds, everything delivered and verified (verification 1 s after
acceptance, an emulator that anchors at once, at SCHED_IDLE). Prints the worker's CPU per change
(all its threads) and, per change, each statement's execution time in microseconds, its calls,
rows, shared buffers hit and WAL bytes, the costliest first.

Usage: python3 bench/statements.py [anchored|accepted|none] [seconds]
Needs the extension installed (release build) and target/release/certyo-emulator.
"""
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "pg_test"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Cluster, Emulator, free_port, wait_for  # noqa: E402
import oltp  # noqa: E402


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "anchored"
    seconds = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    emulator = Emulator(oltp.EMULATOR, anchor_delay=0)
    oltp.idle_priority(emulator.process.pid)
    directory = tempfile.mkdtemp(prefix="certyo-bench-statements-")
    os.chmod(directory, 0o777)
    settings = ("certyo.poll_interval = '1s'\ncertyo.request_timeout = '30s'\ncertyo.batch_size = 1000\n"
                "certyo.verify_min_age = '1s'\nshared_preload_libraries = 'certyo_cdc,pg_stat_statements'\n"
                "pg_stat_statements.track = all\n")
    cluster = Cluster(directory, free_port(), emulator.url, settings)
    try:
        cluster.sql("CREATE EXTENSION pg_stat_statements; CREATE EXTENSION IF NOT EXISTS certyo_cdc;"
                    "CREATE TABLE t (id bigserial PRIMARY KEY, a int, b text, c timestamptz);"
                    f"SELECT certyo.track('t', write_back => '{mode}')")
        script = os.path.join(directory, "insert.sql")
        with open(script, "w") as f:
            f.write("INSERT INTO t (a, b, c) VALUES (1, 'x', now());\n")
        oltp.pgbench(cluster, script, 4, 5)
        wait_for(lambda: oltp.delivered(cluster), timeout=180)
        cluster.sql("SELECT pg_stat_statements_reset()")
        worker = oltp.worker_pid(cluster)
        before = oltp.cpu_seconds(worker)
        tps, changes = oltp.pgbench(cluster, script, 4, seconds)
        wait_for(lambda: oltp.delivered(cluster), timeout=180)
        cpu = oltp.cpu_seconds(worker) - before
        print(f"write_back => '{mode}': {tps:,.0f} tps, {changes:,} changes, the worker {cpu * 1e6 / changes:.1f} us"
              " of CPU per change; per change, the costliest statements (us, calls, rows, buffers hit, WAL bytes):")
        print(cluster.sql(f"""
            SELECT round((total_exec_time * 1000 / {changes})::numeric, 2), calls, rows, shared_blks_hit,
                   round(wal_bytes / {changes}), left(regexp_replace(query, '\\s+', ' ', 'g'), 110)
              FROM pg_stat_statements WHERE total_exec_time > 0 AND query NOT LIKE 'INSERT INTO t %'
             ORDER BY total_exec_time DESC LIMIT 25"""))
    finally:
        cluster.stop()
        emulator.stop()


if __name__ == "__main__":
    main()
