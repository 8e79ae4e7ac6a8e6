#!/usr/bin/env python3
"""Capture benchmark: an untracked table, the same table tracked by certyo_cdc, and the
PL/pgSQL baseline (bench/baseline.sql), measured in one run on one cluster, interleaved.
Prints each scenario's median and the ratio to the untracked table, with the target.

Usage: bench/capture.py SOCKET_DIR PORT CONFIG_LABEL   (bench/run.sh starts the cluster and calls this)
"""
import re
import statistics
import subprocess
import sys

SOCKET, PORT, CONFIG = sys.argv[1], sys.argv[2], sys.argv[3]
VARIANTS = ["untracked", "certyo_cdc", "plpgsql"]
ROWS = 200_000
REPEATS = 7
PGBENCH_SECONDS = 5
PGBENCH_ROUNDS = 6


def psql(sql):
    out = subprocess.run(
        ["psql", "-h", SOCKET, "-p", PORT, "-U", "postgres", "-d", "postgres", "-X", "-q", "-At",
         "-v", "ON_ERROR_STOP=1", "-c", sql],
        check=True, capture_output=True, text=True)
    return out.stdout.strip()


def timed(sql):
    return float(psql(f"SELECT bench.elapsed_ms($stmt${sql}$stmt$)"))


def bulk_run(variant):
    """One pass of the three bulk scenarios on a fresh table; returns ms per scenario."""
    t = f"bench.t_{variant}"
    psql(f"SELECT bench.reset('{variant}')")
    psql("CHECKPOINT")
    insert = timed(f"INSERT INTO {t} (id, sku, price, qty, note, updated_at) "
                   f"SELECT g, 'SKU-' || g, g % 1000 + 0.99, g % 50, 'note ' || g, now() "
                   f"FROM generate_series(1, {ROWS}) g")
    psql(f"VACUUM ANALYZE {t}")
    psql("CHECKPOINT")
    writeback = timed(f"UPDATE {t} SET certyo_record_hash = 'sha256:' || id, certyo_anchor_status = 'pending'")
    psql(f"VACUUM ANALYZE {t}")
    psql("CHECKPOINT")
    business = timed(f"UPDATE {t} SET price = price + 1")
    return {"insert": insert, "writeback": writeback, "business": business}


def pgbench_tps(variant):
    script = f"/tmp/certyo-bench-{variant}.sql"
    with open(script, "w") as f:
        f.write(f"INSERT INTO bench.t_{variant} (id, sku, price, qty, note, updated_at) "
                f"VALUES (nextval('bench.ids'), 'SKU', 9.99, 1, 'pgbench', now());\n")
    out = subprocess.run(
        ["/usr/lib/postgresql/15/bin/pgbench", "-h", SOCKET, "-p", PORT, "-U", "postgres", "-n",
         "-c", "4", "-j", "2", "-T", str(PGBENCH_SECONDS), "-f", script, "postgres"],
        check=True, capture_output=True, text=True).stdout
    return float(re.search(r"tps = ([0-9.]+)", out).group(1))


def main():
    results = {v: {"insert": [], "writeback": [], "business": [], "tps": []} for v in VARIANTS}
    for rep in range(REPEATS):
        for variant in VARIANTS:  # interleaved, so drift in the machine hits all variants alike
            for scenario, ms in bulk_run(variant).items():
                results[variant][scenario].append(ms)
        print(f"  bulk pass {rep + 1}/{REPEATS} done", file=sys.stderr)
    for variant in VARIANTS:
        psql(f"SELECT bench.reset('{variant}')")
    for rep in range(PGBENCH_ROUNDS):
        for variant in VARIANTS:
            results[variant]["tps"].append(pgbench_tps(variant))
        print(f"  pgbench pass {rep + 1}/{PGBENCH_ROUNDS} done", file=sys.stderr)

    median = {v: {k: statistics.median(xs) for k, xs in r.items()} for v, r in results.items()}
    rows = [
        ("insert", f"{ROWS // 1000}k-row INSERT ... SELECT", "ms", "<= 2.0x", lambda r: r <= 2.0),
        ("writeback", f"{ROWS // 1000}k-row bookkeeping-only UPDATE", "ms", "<= 1.1x", lambda r: r <= 1.1),
        ("business", f"{ROWS // 1000}k-row business UPDATE", "ms", "<= 1.8x", lambda r: r <= 1.8),
        ("tps", "single-row INSERT, pgbench -c 4", "tps", ">= 0.95x", lambda r: r >= 0.95),
    ]
    print(f"\ncapture benchmark [{CONFIG}]: median of {REPEATS} interleaved runs (pgbench: {PGBENCH_ROUNDS} x {PGBENCH_SECONDS} s)")
    print(f"{'scenario':40} {'untracked':>11} {'certyo_cdc':>11} {'plpgsql':>11} {'cdc/untr':>9} {'plpg/untr':>9}  target")
    for key, label, unit, target, ok in rows:
        base = median["untracked"][key]
        cdc, plpg = median["certyo_cdc"][key] / base, median["plpgsql"][key] / base
        cells = "".join(f"{median[v][key]:>8.0f} {unit:<2}" for v in VARIANTS)
        print(f"{label:40} {cells} {cdc:>8.2f}x {plpg:>8.2f}x  {target} {'met' if ok(cdc) else 'MISSED'}")


if __name__ == "__main__":
    main()
