"""certyo-relay drain: a backlog of N changes queued in a real MariaDB (or MySQL, in its Debian
root: scripts/pg-root.sh mysql python3 bench/relay.py) by the companion's
triggers (one INSERT ... SELECT of N rows into a tracked table), delivered by the relay binary
to the emulator, as users run both. Prints records/s from the relay's start to an empty queue,
the CPU the server, the relay and the emulator spent per 1,000 changes (steadier than the rate
on a shared machine; the emulator's includes answering this script's polls), and where a
batch's time goes (the relay's own per-batch log lines: HTTP vs. the rest).

Usage: python3 bench/relay.py [N]     (default 100000; make bench runs it)
Needs target/release/certyo-relay and certyo-emulator (cargo build --release).
"""
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("CERTYO_MARIADB_DIR", "/tmp/certyo-relay-bench")
sys.path.insert(0, str(REPO / "relay/tests"))
sys.path.insert(0, str(REPO / "pg_test"))
from harness import KEY, Emulator, wait_for  # noqa: E402
from mariadb import MYSQL, SOCKET, MariaDB  # noqa: E402

def cpu_seconds(pid):
    """User and system CPU of a process, all its threads, in seconds (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


RELAY = os.environ.get("CERTYO_RELAY", str(REPO / "target/release/certyo-relay"))
EMULATOR = os.environ.get("CERTYO_EMULATOR", str(REPO / "target/release/certyo-emulator"))


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    server = MariaDB()
    emulator = Emulator(EMULATOR, anchor_delay=3600)  # anchoring is not what is measured
    try:
        server.sql("CREATE DATABASE shop")
        server.sql((REPO / "sql/mysql/certyo_queue.sql").read_text(), "shop")
        server.sql("""CREATE TABLE products (id INT PRIMARY KEY, sku VARCHAR(32), name VARCHAR(100),
                        price DECIMAL(10,2), updated_at DATETIME(6), certyo_record_hash VARCHAR(128),
                        certyo_anchor_status VARCHAR(20) DEFAULT 'pending', certyo_verified_at DATETIME(6))""", "shop")
        ddl = server.sql("CALL certyo_trigger_ddl('shop', 'products', NULL, NULL)", "shop")
        server.sql("\n".join(row[0] for row in ddl), "shop")
        server.sql("CREATE USER relay@localhost IDENTIFIED BY 'pw'; GRANT ALL ON shop.* TO relay@localhost")
        started = time.time()
        # 1..N: MariaDB's Sequence engine (seq_1_to_N); MySQL has none, a recursive CTE instead.
        numbers = (f"SET SESSION cte_max_recursion_depth = {n + 1}; INSERT INTO products (id, sku, name, price, updated_at) "
                   f"WITH RECURSIVE sequence (seq) AS (SELECT 1 UNION ALL SELECT seq + 1 FROM sequence WHERE seq < {n}) "
                   if MYSQL else "INSERT INTO products (id, sku, name, price, updated_at) ")
        table = "sequence" if MYSQL else f"seq_1_to_{n}"
        server.sql(f"""{numbers}
            SELECT seq, CONCAT('SKU-', seq), CONCAT('Product ', seq), seq % 1000 + 0.99, UTC_TIMESTAMP(6)
              FROM {table}""", "shop")
        queued = int(server.value("SELECT COUNT(*) FROM certyo_queue", "shop"))
        print(f"relay drain: {queued} changes queued by the triggers in {time.time() - started:.1f} s")
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "relay.toml"
            config.write_text(f"""[certyo]
base_url = "{emulator.url}"
tenant_id = "bench"

[[source]]
name = "shop"
url = "mysql://relay:pw@localhost/shop?socket={SOCKET}"
""")
            log = Path(tmp) / "relay.log"
            env = os.environ | {"CERTYO_API_KEY": KEY}
            with open(log, "w") as out:
                started = time.time()
                relay = subprocess.Popen([RELAY, "--config", str(config), "run"], env=env,
                                         stdout=out, stderr=subprocess.STDOUT)
                processes = {"server": server.process.pid, "relay": relay.pid, "emulator": emulator.process.pid}
                cpu_before = {name: cpu_seconds(pid) for name, pid in processes.items()}
                # Watched cheaply: first the emulator's count of accepted records, then the queue,
                # looked at (not counted) only for the last batch's receipts. A COUNT(*) of the
                # backlog every 50 ms, each through a new client process, took a tenth of the
                # server's CPU and a seventh of a core from the drain it measured.
                sent = wait_for(lambda: emulator.stats()["accepted"] >= queued, timeout=600, every=0.02)
                drained = sent and wait_for(lambda: server.value(
                    "SELECT NOT EXISTS (SELECT 1 FROM certyo_queue WHERE status = 'pending')", "shop") == "1",
                    timeout=600, every=0.02)
                elapsed = time.time() - started
                cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in processes.items()}
                # The write-back runs on its own thread and session, beside delivery: the rows
                # hold their hashes once none is due.
                written = drained and wait_for(lambda: server.value(
                    "SELECT NOT EXISTS (SELECT 1 FROM certyo_queue WHERE write_back_at IS NOT NULL)", "shop") == "1",
                    timeout=600, every=0.05)
                written_back = time.time() - started
                relay.terminate()
                relay.wait(timeout=60)
            if not drained:
                sys.exit(f"relay drain: the queue did not drain in 600 s; log:\n{log.read_text()[-3000:]}")
            if not written:
                sys.exit(f"relay drain: the write-backs were not done in 600 s; log:\n{log.read_text()[-3000:]}")
            hashed = int(server.value("SELECT COUNT(*) FROM products WHERE certyo_record_hash IS NOT NULL", "shop"))
            delivered = int(server.value("SELECT COUNT(*) FROM certyo_queue WHERE status = 'delivered'", "shop"))
            accepted = emulator.stats()["accepted"]
            batches = [tuple(map(int, b)) for b in
                       re.findall(r"take_ms=(\d+) http_ms=(\d+) record_ms=(\d+)", log.read_text())]
        rate = delivered / elapsed
        print(f"relay drain: {delivered} delivered ({accepted} accepted by the emulator) in {elapsed:.2f} s "
              f"= {rate:,.0f} records/s on {server.version()} (target >= 20,000)")
        print(f"relay drain: {hashed} rows written back by {written_back:.2f} s "
              f"= {hashed / written_back:,.0f} records/s delivered and written back")
        # CPU, not only time: this 2-core machine's other tenants make a drain's time vary by a
        # fifth from run to run; the CPU each process spends per change varies far less.
        print("relay drain: CPU per 1,000 changes delivered: "
              + ", ".join(f"{name} {seconds / delivered * 1e6:.0f} ms" for name, seconds in cpu.items())
              + f" (the server's {cpu['server'] / elapsed:.2f} of {os.cpu_count()} cores)")
        if batches:
            take, http, record = (statistics.median(b[i] for b in batches) for i in range(3))
            print(f"relay drain: {len(batches)} batches; per batch (median): take {take} ms, HTTP {http} ms, "
                  f"record (the receipts; the write-back runs beside) {record} ms")
    finally:
        emulator.stop()
        server.stop()


if __name__ == "__main__":
    main()
