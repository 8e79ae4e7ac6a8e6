"""Shared by the end-to-end scripts: a real PostgreSQL 15 cluster with certyo_cdc preloaded
(started as the postgres user, over a Unix socket), the Certyo emulator as a child process, and
the check/summary bookkeeping. Each script gets its own directory and port."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

PG_BIN = "/usr/lib/postgresql/15/bin"
KEY = "e2e-secret"
results = {"passed": 0, "failed": 0}


def check(name, actual, expected):
    if actual == expected:
        results["passed"] += 1
        print(f"ok   {name}", flush=True)
    else:
        results["failed"] += 1
        print(f"FAIL {name}\n     expected: {expected!r}\n     actual:   {actual!r}", flush=True)


def summary():
    print(f"{results['passed']} passed, {results['failed']} failed")
    sys.exit(0 if results["failed"] == 0 and results["passed"] > 0 else 1)


def wait_for(condition, timeout=30, every=0.2):
    """Poll until condition() is truthy; returns its last value."""
    deadline = time.time() + timeout
    value = None
    while time.time() < deadline:
        try:
            value = condition()
        except Exception:
            value = None
        if value:
            return value
        time.sleep(every)
    return value


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    def __init__(self, binary, anchor_delay=2):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([binary, "--port", str(self.port), "--api-key", KEY,
                                         "--anchor-delay", str(anchor_delay)], stdout=subprocess.PIPE, text=True)
        self.process.stdout.readline()  # the URL: listening

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def fault(self, fault, times=1, **extra):
        self.call("POST", "/_emulator/faults", {"fault": fault, "times": times, **extra})

    def records(self):
        return [r["record"] | {"recordHash": r["recordHash"]} for r in self.call("GET", "/_emulator/records")]

    def stats(self):
        return self.call("GET", "/_emulator/stats")

    def reset(self):
        self.call("POST", "/_emulator/reset", {})

    def stop(self):
        self.process.terminate()


class Cluster:
    def __init__(self, directory, port, emulator_url, settings=""):
        self.dir, self.port = directory, port
        subprocess.run(["sudo", "-u", "postgres", f"{PG_BIN}/pg_ctl", "-D", f"{self.dir}/data", "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        shutil.chown(self.dir, "postgres")
        subprocess.run(["sudo", "-u", "postgres", f"{PG_BIN}/initdb", "-D", f"{self.dir}/data", "-A", "trust", "-U", "postgres"],
                       check=True, capture_output=True)
        with open(f"{self.dir}/data/postgresql.conf", "a") as conf:
            conf.write(f"""
listen_addresses = ''
unix_socket_directories = '{self.dir}'
port = {self.port}
shared_preload_libraries = 'certyo_cdc'
certyo.base_url = '{emulator_url}'
certyo.api_key = '{KEY}'
certyo.tenant_id = 'acme'
certyo.poll_interval = '300ms'
certyo.request_timeout = '2s'
certyo.bulk_threshold = 10
certyo.batch_size = 100
{settings}
""")
        self.start()

    def pg_ctl(self, *args):
        subprocess.run(["sudo", "-u", "postgres", f"{PG_BIN}/pg_ctl", "-D", f"{self.dir}/data", "-l", f"{self.dir}/server.log",
                        "-w", *args], check=True, capture_output=True)

    def start(self):
        self.pg_ctl("start")

    def stop(self):
        self.pg_ctl("-m", "fast", "stop")

    def log(self):
        with open(f"{self.dir}/server.log", errors="replace") as log:
            return log.read()

    def sql(self, statement, check=True, user="postgres"):
        out = subprocess.run(["psql", "-h", self.dir, "-p", str(self.port), "-U", user, "-d", "postgres", "-X", "-q", "-At",
                              "-v", "ON_ERROR_STOP=1", "-c", statement], capture_output=True, text=True)
        if check and out.returncode != 0:
            raise RuntimeError(f"{statement}: {out.stderr}")
        return out.stdout.strip()

    def attempt(self, statement, user):
        """(stdout, stderr) of a statement run as `user`, failing or not."""
        out = subprocess.run(["psql", "-h", self.dir, "-p", str(self.port), "-U", user, "-d", "postgres", "-X", "-q", "-At",
                              "-c", statement], capture_output=True, text=True)
        return out.stdout.strip(), out.stderr.strip()

    def wait_drained(self, timeout=60):
        """Until nothing is pending: queue empty, no pending delivery entries."""
        return bool(wait_for(lambda: self.sql("SELECT pending FROM certyo.worker_status()", check=False) == "0", timeout))


def run(directory, port, scenarios, settings="", anchor_delay=2):
    """Start the emulator (sys.argv[1]) and a cluster, run each scenario(cluster, emulator) in
    order, stop both, print the summary and exit with its verdict."""
    emulator = Emulator(sys.argv[1], anchor_delay=anchor_delay)
    cluster = Cluster(directory, port, emulator.url, settings)
    try:
        for scenario in scenarios:
            scenario(cluster, emulator)
    finally:
        try:
            cluster.stop()
        except Exception:
            pass
        emulator.stop()
    summary()
