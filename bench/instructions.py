#!/usr/bin/env python3
"""The write path's cost in CPU instructions, counted by callgrind: repeatable to a few parts in
a thousand whatever else the machine does, where TPS on two shared cores swings by 10-20% from
run to run. Each figure is what one statement costs a single-user-mode backend (no client, no
network, no commit flush), measured as the difference between two runs that differ only in that
statement: the same set-up, warm-up and library load are in both and cancel out.

Variants: the three tables of bench/capture.py, all with certyo_cdc's bookkeeping columns
(untracked; tracked by certyo_cdc; the PL/pgSQL trigger of bench/baseline.sql), and the same
table without the bookkeeping columns (narrow), as bench/oltp.py's untracked twin is.
Scenarios: a single-row INSERT (per transaction), and per row of a ROWS-row INSERT ... SELECT,
business UPDATE and bookkeeping-only UPDATE (the statements of bench/capture.py), and the
bookkeeping-only UPDATE in replica mode, as the worker's write-back runs it, and the business
UPDATE again once the rows hold marks (as anchored rows do).

Usage: bench/instructions.py [--rows 10000] [--pg-bin DIR]   (needs valgrind and the extension
installed; runs as root, the server as the postgres user, in a throwaway data directory)
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The tables of bench/capture.py (bench.reset in bench/baseline.sql: untracked, certyo_cdc and
# plpgsql, each with the bookkeeping columns), and the same without them (narrow), as the
# untracked twin of bench/oltp.py is.
NARROW = """CREATE TABLE bench.t_narrow (id bigint PRIMARY KEY, sku text NOT NULL, price numeric(12,2),
    qty int, note text, updated_at timestamptz);"""
VARIANTS = ("narrow", "untracked", "certyo_cdc", "plpgsql")


def single_row(table, n):
    return f"INSERT INTO bench.t_{table} (id, sku, price, qty, note, updated_at) VALUES ({n}, 'SKU-{n}', 9.99, 1, 'note {n}', now());"


def bulk_insert(table, first, rows):
    return (f"INSERT INTO bench.t_{table} (id, sku, price, qty, note, updated_at) "
            f"SELECT g, 'SKU-' || g, g % 1000 + 0.99, g % 50, 'note ' || g, now() "
            f"FROM generate_series({first}, {first + rows - 1}) g;")


def business_update(table):
    return f"UPDATE bench.t_{table} SET price = price + 1 WHERE id > 1000000;"


def bookkeeping_update(table):
    return (f"UPDATE bench.t_{table} SET certyo_record_hash = 'sha256:' || id, "
            f"certyo_anchor_status = 'pending' WHERE id > 1000000;")


def write_back(table):
    """The bookkeeping-only UPDATE as the worker runs its write-back on a table whose UPDATE runs
    no user code: in replica mode (only triggers that fire always fire)."""
    return ("SET session_replication_role = replica; " + bookkeeping_update(table)
            + " RESET session_replication_role;")


class Server:
    """A data directory, and postgres --single on it under callgrind."""

    def __init__(self, pg_bin):
        self.pg_bin = pg_bin
        self.dir = tempfile.mkdtemp(prefix="certyo-instructions-")
        shutil.chown(self.dir, "postgres")
        self.data = f"{self.dir}/data"
        subprocess.run(["sudo", "-u", "postgres", f"{pg_bin}/initdb", "-D", self.data, "-A", "trust", "-U",
                        "postgres"], check=True, capture_output=True)

    def run(self, statements, counted=False):
        """Run statements, one transaction per line; the instructions counted, if asked. The
        library is preloaded, as users run it (queue ids come from shared memory then)."""
        out = f"{self.dir}/callgrind.out"
        command = [f"{self.pg_bin}/postgres", "--single", "-D", self.data, "-c", "synchronous_commit=off",
                   "-c", "autovacuum=off", "-c", "shared_preload_libraries=certyo_cdc", "postgres"]
        if counted:
            command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"] + command
        done = subprocess.run(["sudo", "-u", "postgres"] + command, input="\n".join(statements) + "\n",
                              capture_output=True, text=True)
        if done.returncode != 0 or "ERROR" in done.stdout + done.stderr:
            sys.exit(f"postgres --single failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        if counted:
            return int(re.search(r"Collected : (\d+)", done.stderr).group(1))
        return None

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def per_statement(server, warmup, measured, times):
    """Instructions of `measured` (run `times` over), net of everything else: two counted runs
    of the same warm-up, one followed by the measured statements."""
    base = server.run(warmup, counted=True)
    both = server.run(warmup + measured, counted=True)
    return (both - base) / times


def rolled_back(statements):
    """Warm-up that loads the library and builds this table's caches, and leaves no rows."""
    return ["BEGIN;"] + statements + ["ROLLBACK;"]


def count_variant(server, variant, args):
    """Instructions per statement or row of every scenario on one variant's table."""
    results = {}
    first = 1_000_001
    in_range = f"id BETWEEN {first} AND {first + 99}"
    warmup = rolled_back([bulk_insert(variant, 1, 100)] + [single_row(variant, 200 + i) for i in range(20)])
    results[(variant, "single")] = per_statement(
        server, warmup, [single_row(variant, 1000 + i) for i in range(args.single)], args.single)
    warmup = rolled_back([bulk_insert(variant, 1, 100)])
    results[(variant, "insert")] = per_statement(server, warmup, [bulk_insert(variant, first, args.rows)], args.rows)
    # Both counted runs inserted the rows; keep one set of them for the updates.
    server.run([f"DELETE FROM bench.t_{variant};", bulk_insert(variant, first, args.rows), f"VACUUM bench.t_{variant};"])
    warmup = rolled_back([business_update(variant).replace("id > 1000000", in_range)])
    results[(variant, "business")] = per_statement(server, warmup, [business_update(variant)], args.rows)
    if variant != "narrow":
        server.run([f"VACUUM bench.t_{variant};"])
        warmup = rolled_back([bookkeeping_update(variant).replace("id > 1000000", in_range)])
        results[(variant, "bookkeeping")] = per_statement(server, warmup, [bookkeeping_update(variant)], args.rows)
        server.run([f"VACUUM bench.t_{variant};"])
        warmup = rolled_back([write_back(variant).replace("id > 1000000", in_range)])
        results[(variant, "write_back")] = per_statement(server, warmup, [write_back(variant)], args.rows)
        # The rows hold marks now, as anchored rows do: a business UPDATE clears them.
        server.run([f"VACUUM bench.t_{variant};"])
        warmup = rolled_back([business_update(variant).replace("id > 1000000", in_range)])
        results[(variant, "business_marked")] = per_statement(server, warmup, [business_update(variant)], args.rows)
    server.run([f"DELETE FROM bench.t_{variant};", f"VACUUM bench.t_{variant};"])
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--single", type=int, default=1_000, help="single-row INSERTs counted")
    parser.add_argument("--pg-bin", default=os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    server = Server(args.pg_bin)
    try:
        # Line by line, one command per line: the script's comments would swallow the rest.
        baseline = " ".join(line for line in (REPO / "bench/baseline.sql").read_text().splitlines()
                            if not line.lstrip().startswith("--"))
        server.run(["CREATE EXTENSION certyo_cdc;", baseline, " ".join(NARROW.split())]
                   + [f"SELECT bench.reset('{v}');" for v in VARIANTS if v != "narrow"])
        results = {}
        for variant in VARIANTS:
            results.update(count_variant(server, variant, args))
            print(f"  {variant} counted", file=sys.stderr)
    finally:
        server.close()

    print(f"\nwrite-path instructions (callgrind, postgres --single, synchronous_commit off), "
          f"per statement or row; bulk statements of {args.rows:,} rows")
    print(f"{'scenario':36} {'narrow':>11} {'untracked':>11} {'certyo_cdc':>11} {'plpgsql':>11} "
          f"{'untr/narrow':>11} {'cdc/narrow':>10} {'cdc/untr':>9} {'plpg/untr':>9}")
    rows = [("single", "single-row INSERT (per transaction)"), ("insert", "INSERT ... SELECT (per row)"),
            ("business", "business UPDATE (per row)"), ("bookkeeping", "bookkeeping-only UPDATE (per row)"),
            ("write_back", "the same in replica mode (per row)"),
            ("business_marked", "business UPDATE of marked rows (per row)")]
    for key, label in rows:
        cells = [results.get((v, key)) for v in VARIANTS]
        shown = "".join(f"{c:>12,.0f}" if c is not None else f"{'':>12}" for c in cells)
        narrow, untracked, cdc, plpgsql = cells

        def ratio(a, b, width):
            return f"{a / b:>{width - 1}.2f}x" if a is not None and b is not None else " " * width

        print(f"{label:36}{shown} {ratio(untracked, narrow, 12)}{ratio(cdc, narrow, 11)}"
              f"{ratio(cdc, untracked, 10)}{ratio(plpgsql, untracked, 10)}")


if __name__ == "__main__":
    main()
