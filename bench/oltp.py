"""Single-row transactions with the worker running as users run it: pgbench, one INSERT of one
row per transaction into a 4-column table, interleaved rounds, medians, each variant beside an
untracked twin in the same run:
  untracked:  no capture, nothing consuming the WAL;
  decoding:   the peer users compare with, logical-decoding CDC: the same untracked table while
              a logical replication slot (wal2json, or pgoutput with a publication when wal2json
              is not installed) is consumed by pg_recvlogical to /dev/null; the slot is advanced
              to the current LSN before each round, and the round ends when the walsender has
              sent everything the round wrote;
  certyo_cdc: tracked with the default write-back; certyo_cdc_accepted: tracked with
              write_back => 'accepted' (the hash written back at acceptance, the status again
              once anchored), when the build has that argument; certyo_cdc_none: tracked with
              write_back => 'none' (the sidecar mode: no column, never written to), when the
              build has it;
  plpgsql:    a PL/pgSQL trigger that inserts the row's to_jsonb into an indexed queue table.
for each state of the worker and each client count:
  delivering: sending to the emulator with default settings, verifying 1 s after acceptance
              (certyo.verify_min_age) against an emulator that anchors at once, so that the
              steady-state cost, sending and verifying, falls inside the rounds;
  paused:     certyo.pause();
  disabled:   certyo.enabled = off.
With --workload update each transaction instead updates one of --rows rows picked at random
(each table filled with them first), so that a record gets many versions: the worker verifies
only each record's current one (certyo.verify = 'current', the default), and the figures show
how many verification requests that leaves per change. With --rate pgbench holds that many
transactions per second in all (-R), and the tracked variants also print the commit-to-accepted
latency, p50 and p99 (receipt accepted_at - queued_at: queued_at is the single-row transaction's
start, its commit to within a millisecond).
Per transaction it prints, medians over the rounds, what each variant cost the database: the
consumer's CPU (certyo_cdc: the worker, all its threads; decoding: the walsender and
pg_recvlogical; from the round's start until what it wrote is delivered and verified, or
decoded and sent), the WAL (pg_current_wal_lsn, over the same span) and the new versions of the
user's row (pg_stat_user_tables: inserts and updates, the HOT ones in brackets). The emulator
stands for Certyo, which is remote in production: it runs at idle scheduling priority
(SCHED_IDLE) and its CPU is reported apart. Autovacuum runs as users run it, settled between
rounds (every table vacuumed, no autovacuum worker busy).

Usage: python3 bench/oltp.py [--rounds 5] [--seconds 5] [--clients 1,4,8]
                             [--modes delivering,paused,disabled]
                             [--variants untracked,decoding,certyo_cdc,certyo_cdc_accepted,certyo_cdc_none,plpgsql]
                             [--workload insert|update] [--rows 1000] [--rate TPS]
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
VARIANTS = ("untracked", "decoding", "certyo_cdc", "certyo_cdc_accepted", "certyo_cdc_none", "plpgsql")
SLOT = "bench_decoding"

SETUP = """
CREATE EXTENSION IF NOT EXISTS certyo_cdc;
CREATE TABLE untracked (id bigserial PRIMARY KEY, a int, b text, c timestamptz);
CREATE TABLE decoding (id bigserial PRIMARY KEY, a int, b text, c timestamptz);
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
# The second write-back mode, where the build has it.
ACCEPTED = """
CREATE TABLE certyo_cdc_accepted (id bigserial PRIMARY KEY, a int, b text, c timestamptz);
SELECT certyo.track('certyo_cdc_accepted', write_back => 'accepted');
"""
# The sidecar mode, where the build has it.
SIDECAR = """
CREATE TABLE certyo_cdc_none (id bigserial PRIMARY KEY, a int, b text, c timestamptz);
SELECT certyo.track('certyo_cdc_none', write_back => 'none');
"""


def pgbench(cluster, script, clients, seconds, rate=None):
    """(tps, transactions) of one pgbench run."""
    jobs = min(clients, 2)
    done = subprocess.run(
        [f"{PG_BIN}/pgbench", "-h", cluster.dir, "-p", str(cluster.port), "-U", "postgres", "-n",
         "-c", str(clients), "-j", str(jobs), "-T", str(seconds), "-f", script, "postgres"]
        + (["-R", str(rate)] if rate else []),
        capture_output=True, text=True)
    found = re.search(r"tps = ([0-9.]+)", done.stdout)
    processed = re.search(r"number of transactions actually processed: ([0-9]+)", done.stdout)
    if not found or not processed:
        sys.exit(f"pgbench failed: {done.stdout}\n{done.stderr}")
    return float(found.group(1)), int(processed.group(1))


def latency(cluster, variant, since_id):
    """Commit-to-accepted p50 and p99 in ms of the variant's changes captured after `since_id`."""
    found = cluster.sql(f"""
        SELECT round((percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM accepted_at - queued_at)) * 1000)::numeric, 1),
               round((percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM accepted_at - queued_at)) * 1000)::numeric, 1)
          FROM certyo.receipt WHERE relid = '{variant}'::regclass AND id > {since_id}""").strip()
    return tuple(float(v) if v else float("nan") for v in found.split("|"))


def last_receipt(cluster):
    return int(cluster.sql("SELECT coalesce(max(id), 0) FROM certyo.receipt"))


def cpu_seconds(pid):
    """utime + stime of process `pid` (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_priority(pid):
    """Every thread of `pid` at SCHED_IDLE: it runs only on a core nothing else wants."""
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setscheduler(int(task), os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            pass  # a thread that ended meanwhile


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


def delivered(cluster):
    """Everything queued is delivered and every receipt verified."""
    return (cluster.sql("SELECT count(*) FROM certyo.queue").strip() == "0"
            and cluster.sql("SELECT count(*) FROM certyo.delivery WHERE state = 'pending'").strip() == "0"
            and cluster.sql("SELECT count(*) FROM certyo.receipt WHERE anchor_status IN ('pending', 'overdue')"
                            " AND operation <> 'delete'").strip() == "0")


def settle(cluster, tables):
    """Between rounds: nothing for autovacuum to do, and no autovacuum worker busy."""
    cluster.sql(f"VACUUM (ANALYZE) {', '.join(tables)}, plpgsql_queue, certyo.queue, certyo.receipt, certyo.delivery")
    wait_for(lambda: cluster.sql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'"
                                 " AND state <> 'idle'").strip() == "0", timeout=60)


def row_versions(cluster, table):
    """(inserts + updates, HOT updates) of `table` so far."""
    ins_upd, hot = cluster.sql(f"SELECT n_tup_ins + n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
                               f" WHERE relid = '{table}'::regclass").split("|")
    return int(ins_upd), int(hot)


def pkglibdir():
    return Path(subprocess.run([f"{PG_BIN}/pg_config", "--pkglibdir"], capture_output=True, text=True).stdout.strip())


def decoding_plugin():
    """wal2json when installed (this build then needs output_plugin_libraries), else pgoutput."""
    return "wal2json" if (pkglibdir() / "wal2json.so").exists() else "pgoutput"


class Decoding:
    """A logical-decoding consumer: pg_recvlogical on a slot, to /dev/null."""

    def __init__(self, cluster, plugin):
        self.cluster, self.plugin, self.process = cluster, plugin, None
        if plugin == "pgoutput":
            # The peer's table only: a publication of every table would make certyo.queue, which
            # has no replica identity, refuse the worker's deletes.
            cluster.sql("CREATE PUBLICATION bench_decoding FOR TABLE decoding")
            self.options = ["-o", "proto_version=1", "-o", "publication_names=bench_decoding"]
        else:
            self.options = []
        cluster.sql(f"SELECT pg_create_logical_replication_slot('{SLOT}', '{plugin}')")

    def start(self):
        self.cluster.sql(f"SELECT pg_replication_slot_advance('{SLOT}', pg_current_wal_lsn())")
        self.process = subprocess.Popen(
            [f"{PG_BIN}/pg_recvlogical", "-h", self.cluster.dir, "-p", str(self.cluster.port), "-U", "postgres",
             "-d", "postgres", "--slot", SLOT, "--start", "-f", "/dev/null", "-s", "1", *self.options],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: self.walsender() != "", timeout=30)

    def walsender(self):
        return self.cluster.sql(f"SELECT active_pid FROM pg_replication_slots WHERE slot_name = '{SLOT}'"
                                " AND active_pid IS NOT NULL").strip()

    def cpu(self):
        return cpu_seconds(self.walsender()) + cpu_seconds(self.process.pid)

    def caught_up(self, lsn):
        return self.cluster.sql(f"SELECT sent_lsn >= '{lsn}' FROM pg_stat_replication"
                                f" WHERE pid = {self.walsender()}").strip() == "t"

    def stop(self):
        self.process.terminate()
        self.process.wait()
        wait_for(lambda: self.walsender() == "", timeout=30)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--modes", default="delivering,paused,disabled")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--workload", choices=("insert", "update"), default="insert")
    parser.add_argument("--rows", type=int, default=1000, help="rows each table holds (--workload update)")
    parser.add_argument("--rate", type=int, default=None, help="transactions per second in all (pgbench -R)")
    args = parser.parse_args()
    emulator = Emulator(EMULATOR, anchor_delay=0)
    idle_priority(emulator.process.pid)
    directory = tempfile.mkdtemp(prefix="certyo-bench-oltp-")
    os.chmod(directory, 0o777)
    # The harness's test settings put back to the extension's defaults (the worker as users run
    # it), but verification 1 s after acceptance, and a server that can decode.
    plugin_libraries = "output_plugin_libraries = 'wal2json'\n" if decoding_plugin() == "wal2json" else ""
    settings = ("certyo.poll_interval = '1s'\ncertyo.request_timeout = '30s'\ncertyo.batch_size = 1000\n"
                "certyo.verify_min_age = '1s'\ncertyo.write_back = 'anchored'\nwal_level = logical\nmax_replication_slots = 4\n" + plugin_libraries)
    cluster = Cluster(directory, free_port(), emulator.url, settings)
    results = {}
    decoding = None
    try:
        cluster.sql(SETUP)
        variants = args.variants.split(",")
        if "certyo_cdc_accepted" in variants:
            cluster.sql(ACCEPTED, check=False)
            if cluster.sql("SELECT to_regclass('certyo_cdc_accepted') IS NULL").strip() == "t":
                print("  (this build has no write_back argument: certyo_cdc_accepted left out)")
                variants.remove("certyo_cdc_accepted")
        if "certyo_cdc_none" in variants:
            cluster.sql(SIDECAR, check=False)
            if cluster.sql("SELECT to_regclass('certyo_cdc_none') IS NULL").strip() == "t":
                print("  (this build has no sidecar mode: certyo_cdc_none left out)")
                variants.remove("certyo_cdc_none")
        if "decoding" in variants:
            decoding = Decoding(cluster, decoding_plugin())
        tables = [v for v in variants if v != "decoding"] + (["decoding"] if decoding else [])
        scripts = {}
        for variant in variants:
            path = Path(directory) / f"{variant}.sql"
            if args.workload == "update":
                cluster.sql(f"INSERT INTO {variant} (a, b, c) SELECT g, 'x', now() FROM generate_series(1, {args.rows}) g")
                path.write_text(f"\\set id random(1, {args.rows})\n"
                                f"UPDATE {variant} SET a = a + 1, c = now() WHERE id = :id;\n")
            else:
                path.write_text(f"INSERT INTO {variant} (a, b, c) VALUES (1, 'x', now());\n")
            scripts[variant] = str(path)
        statement = f"single-row UPDATE of one of {args.rows} rows" if args.workload == "update" else "single-row INSERT"
        rate = f" -R {args.rate}" if args.rate else ""
        print(f"{statement} per transaction, pgbench -T {args.seconds}{rate}, {args.rounds} interleaved rounds, "
              f"medians ({time.strftime('%Y-%m-%d %H:%M')}; decoding: {decoding.plugin if decoding else '-'}; "
              f"the emulator at SCHED_IDLE):")
        for mode in args.modes.split(","):
            set_mode(cluster, mode)
            for clients in map(int, args.clients.split(",")):
                tps = {v: [] for v in variants}
                costs = {v: {"cpu": [], "emulator": [], "wal": [], "versions": [], "hot": [], "verify": [],
                             "p50": [], "p99": []} for v in variants}
                for _ in range(args.rounds):
                    for variant in variants:
                        if mode == "delivering":
                            wait_for(lambda: delivered(cluster), timeout=180)
                        settle(cluster, tables)
                        tracked = variant.startswith("certyo_cdc")
                        if variant == "decoding":
                            decoding.start()
                        worker = worker_pid(cluster)
                        idle_priority(emulator.process.pid)
                        versions = row_versions(cluster, variant)
                        since = last_receipt(cluster)
                        verify_requests = emulator.stats()["verifyRequests"]
                        consumer = decoding.cpu() if variant == "decoding" else cpu_seconds(worker)
                        before = (consumer, cpu_seconds(emulator.process.pid), wal_lsn(cluster))
                        round_tps, changes = pgbench(cluster, scripts[variant], clients, args.seconds, args.rate)
                        tps[variant].append(round_tps)
                        if variant == "decoding":
                            end = wal_lsn(cluster)
                            wait_for(lambda: decoding.caught_up(end), timeout=120)
                            consumer = decoding.cpu()
                            decoding.stop()
                        elif tracked and mode == "delivering":
                            wait_for(lambda: delivered(cluster), timeout=180)
                            consumer = cpu_seconds(worker)
                        else:
                            consumer = cpu_seconds(worker)
                        lsn = wal_lsn(cluster)
                        time.sleep(1.0)  # the worker's and the writers' table statistics reported
                        after = row_versions(cluster, variant)
                        c = costs[variant]
                        c["cpu"].append((consumer - before[0]) * 1e6 / changes)
                        c["emulator"].append((cpu_seconds(emulator.process.pid) - before[1]) * 1e6 / changes)
                        c["wal"].append(float(cluster.sql(f"SELECT pg_wal_lsn_diff('{lsn}', '{before[2]}')")) / changes)
                        c["versions"].append((after[0] - versions[0]) / changes)
                        c["hot"].append((after[1] - versions[1]) / changes)
                        c["verify"].append((emulator.stats()["verifyRequests"] - verify_requests) / changes)
                        if tracked and mode == "delivering":
                            p50, p99 = latency(cluster, variant, since)
                            c["p50"].append(p50)
                            c["p99"].append(p99)
                    if mode != "delivering":
                        cluster.sql("TRUNCATE certyo.queue")
                base = statistics.median(tps["untracked"])
                results[(mode, clients)] = {v: statistics.median(t) for v, t in tps.items()}
                print(f"  worker {mode}, {clients} client(s):", flush=True)
                for variant in variants:
                    m = statistics.median(tps[variant])
                    c = {k: statistics.median(v) if v else None for k, v in costs[variant].items()}
                    consumer = {"decoding": "walsender + pg_recvlogical", "untracked": "worker",
                                "plpgsql": "worker"}.get(variant, "worker")
                    print(f"    {variant:20} {m:8,.0f} tps ({m / base:4.0%}) | {consumer} {c['cpu']:5.1f} us CPU, "
                          f"emulator {c['emulator']:4.1f} us, WAL {c['wal']:5,.0f} B, row versions "
                          f"{c['versions']:.2f} ({c['hot']:.2f} HOT) per transaction"
                          + (f", {c['verify']:.2f} verification requests, commit to accepted p50 {c['p50']:.1f} ms,"
                             f" p99 {c['p99']:.1f} ms" if c["p50"] is not None else "")
                          + f"   [runs: {', '.join(f'{v:,.0f}' for v in tps[variant])}]", flush=True)
        print("  targets (4 clients): delivering >= the decoding peer's ratio and >= 85%, worker CPU <= the peer's;"
              " paused/disabled >= 93% ('anchored')")
    finally:
        if decoding and decoding.process and decoding.process.poll() is None:
            decoding.process.terminate()
        cluster.stop()
        emulator.stop()


if __name__ == "__main__":
    main()
