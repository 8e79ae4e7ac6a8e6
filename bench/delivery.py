#!/usr/bin/env python3
"""Delivery benchmark against the Certyo emulator on this machine (bench/run.sh starts both):
- drain throughput: 100k changes queued while delivery is off, then records/s until every one
  is accepted and its hash written back;
- where a drain's time goes: the same drain again with the worker's per-pass debug1 line on
  (take, wait for answers, receipts, write-back, commit), summed per record, beside the
  ceiling of issue 14 (50,000 records/s: 20 us a record);
- commit-to-accepted latency (p50, p99) at a steady 1,000 single-row commits per second;
- verification: receipts verified per second once every receipt is due (one request each:
  the contract has no bulk verification), and the latency above measured again meanwhile;
- the idle worker: its CPU time and passes over 30 s with nothing to do (extension created,
  nothing tracked), as a DBA sees it in `top`.

Usage: bench/delivery.py SOCKET_DIR PORT
"""
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "pg_test"))
from harness import cpu_use  # noqa: E402

SOCKET, PORT = sys.argv[1], sys.argv[2]
BACKLOG = 100_000


def psql(sql):
    return subprocess.run(["psql", "-h", SOCKET, "-p", PORT, "-U", "postgres", "-d", "postgres", "-X", "-q", "-At",
                           "-v", "ON_ERROR_STOP=1", "-c", sql], check=True, capture_output=True, text=True).stdout.strip()


def wait_until(sql, expected, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if psql(sql) == expected:
            return True
        time.sleep(0.05)
    return False


def drain():
    psql("ALTER SYSTEM SET certyo.enabled = off")
    psql("SELECT pg_reload_conf()")
    time.sleep(1)
    psql("DROP TABLE IF EXISTS bench_drain; CREATE TABLE bench_drain (id int PRIMARY KEY, sku text, price numeric(10,2));"
         "SELECT certyo.track('bench_drain', write_back => 'accepted');")
    psql(f"INSERT INTO bench_drain SELECT g, 'SKU-' || g, g % 1000 FROM generate_series(1, {BACKLOG}) g")
    started = time.time()
    psql("ALTER SYSTEM SET certyo.enabled = on")
    psql("SELECT pg_reload_conf()")
    ok = wait_until("SELECT count(*) FROM bench_drain WHERE certyo_record_hash IS NULL", "0")
    elapsed = time.time() - started
    accepted = psql("SELECT count(*) FROM certyo.receipt WHERE relid = 'bench_drain'::regclass")
    return ok, elapsed, int(accepted)


PHASES = ("take", "wait for answers", "receipts", "write-back", "commit")


def breakdown():
    """The drain again, with log_min_messages = debug1 (a diagnostic run: its own figure is not
    the drain's), and the worker's per-pass lines summed: microseconds per record in each phase,
    and what the passes spent outside them (verification, expiry, state, sleeps)."""
    log = f"{SOCKET}/server.log"
    with open(log, "rb") as f:
        offset = f.seek(0, 2)
    psql("ALTER SYSTEM SET log_min_messages = debug1")
    psql("SELECT pg_reload_conf()")
    _, elapsed, accepted = drain()
    psql("ALTER SYSTEM RESET log_min_messages")
    psql("SELECT pg_reload_conf()")
    with open(log, "rb") as f:
        f.seek(offset)
        lines = [line for line in f.read().decode(errors="replace").splitlines() if "certyo_cdc: delivered" in line]
    totals = dict.fromkeys(PHASES, 0.0)
    for line in lines:
        for phase, value in re.findall(r"(take|wait for answers|receipts|write-back|commit) ([0-9.]+) ms", line):
            totals[phase] += float(value)
    per_record = {phase: ms * 1000 / max(accepted, 1) for phase, ms in totals.items()}
    per_record["outside the passes' delivery step"] = elapsed * 1e6 / max(accepted, 1) - sum(per_record.values())
    return accepted, elapsed, len(lines), per_record


def latency(rate=1000, seconds=15):
    psql("DROP TABLE IF EXISTS bench_latency; CREATE TABLE bench_latency (id bigserial PRIMARY KEY, v int);"
         "SELECT certyo.track('bench_latency', write_back => 'accepted');")
    with open("/tmp/certyo-bench-latency.sql", "w") as f:
        f.write("INSERT INTO bench_latency (v) VALUES (1);\n")
    subprocess.run(["/usr/lib/postgresql/15/bin/pgbench", "-h", SOCKET, "-p", PORT, "-U", "postgres", "-n", "-c", "4",
                    "-j", "2", "-R", str(rate), "-T", str(seconds), "-f", "/tmp/certyo-bench-latency.sql", "postgres"],
                   check=True, capture_output=True)
    wait_until("SELECT count(*) FROM bench_latency WHERE certyo_record_hash IS NULL", "0", timeout=120)
    # queued_at is the writing transaction's start; for a single-row transaction that is the
    # commit to within its own (sub-millisecond) duration.
    return psql("""
        SELECT count(*) || ' ' ||
               round((percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM accepted_at - queued_at)) * 1000)::numeric, 1) || ' ' ||
               round((percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM accepted_at - queued_at)) * 1000)::numeric, 1)
          FROM certyo.receipt WHERE relid = 'bench_latency'::regclass""").split()


def verification(seconds=10):
    """Make every receipt due at once; count verification answers recorded per second, and
    measure the commit-to-accepted latency again while they run."""
    psql("ALTER SYSTEM SET certyo.verify_interval = '1h'")
    psql("SELECT pg_reload_conf()")
    before = int(psql("SELECT count(*) FROM certyo.receipt WHERE last_verified_at IS NOT NULL"))
    psql("SELECT certyo.verify_now()")
    started = time.time()
    count, p50, p99 = latency(seconds=seconds)
    done = int(psql("SELECT count(*) FROM certyo.receipt WHERE last_verified_at IS NOT NULL")) - before
    return done / (time.time() - started), count, p50, p99


def idle(seconds=30):
    """CPU seconds and passes of the worker over `seconds` in which nothing happens."""
    assert wait_until("SELECT running FROM certyo.worker_status()", "t", 60), "the worker runs"
    pid = psql("SELECT pid FROM certyo.worker_status()")
    passes, (before, _) = int(psql("SELECT passes FROM certyo.worker_status()")), cpu_use(pid)
    time.sleep(seconds)  # the measurement window
    return cpu_use(pid)[0] - before, int(psql("SELECT passes FROM certyo.worker_status()")) - passes


def main():
    idle_cpu, idle_passes = idle()
    ok, elapsed, accepted = drain()
    b_accepted, b_elapsed, b_passes, per_record = breakdown()
    count, p50, p99 = latency()
    rate, v_count, v_p50, v_p99 = verification()
    print("\ndelivery benchmark (emulator on this machine, bulk requests of 1000)")
    print(f"idle worker (nothing tracked): {idle_cpu * 1000:.1f} ms of CPU in 30 s = {idle_cpu / 30 * 100:.2f}% of a core "
          f"(target <= 1%), {idle_passes} passes (poll_interval 1 s)")
    print(f"drain: {accepted} of {BACKLOG} changes accepted and written back in {elapsed:.1f} s "
          f"= {accepted / elapsed:,.0f} records/s (target >= 20,000){'' if ok else '  [DID NOT FINISH]'}")
    total = sum(per_record.values())
    print(f"where a drain's time goes (the drain again with debug1 on: {b_accepted} records in {b_elapsed:.1f} s, "
          f"{b_passes} passes): {total:.1f} us a record; the ceiling of 50,000 records/s is 20 us")
    for phase, us in per_record.items():
        print(f"  {phase:35} {us:6.1f} us a record ({us / total:4.0%})")
    print(f"latency at 1,000 commits/s: {count} changes, commit-to-accepted p50 {p50} ms, p99 {p99} ms "
          f"(targets p50 <= 10 ms, p99 <= 50 ms)")
    print(f"verification: {rate:,.0f} receipts/s verified (one request each), while the latency at 1,000 commits/s "
          f"was p50 {v_p50} ms, p99 {v_p99} ms ({v_count} changes)")


if __name__ == "__main__":
    main()
