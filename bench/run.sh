#!/usr/bin/env bash
# The benchmark: for each configuration a fresh cluster, then the capture scenarios of
# bench/capture.py (untracked vs certyo_cdc vs the PL/pgSQL baseline, interleaved).
#   defaults: initdb's postgresql.conf, as a user starts out;
#   strict:   synchronous_commit off and no checkpoints during a run, so that per-row CPU cost
#             is not hidden behind disk flushes (the harder comparison for a trigger).
# Both preload the library, as users run it (queue ids come from shared memory then); sending
# is not configured, so the worker sleeps and commits do not ring it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"  # the Python tools setup installed
. pg_test/cluster.sh
for config in ${BENCH_CONFIGS:-defaults strict}; do
    case $config in
        defaults) settings=("autovacuum = off" "shared_preload_libraries = 'certyo_cdc'") ;;
        strict) settings=("autovacuum = off" "shared_preload_libraries = 'certyo_cdc'" "synchronous_commit = off"
                          "shared_buffers = '1GB'" "max_wal_size = '8GB'" "checkpoint_timeout = '30min'") ;;
        *) echo "unknown configuration $config" >&2; exit 2 ;;
    esac
    cluster_start /tmp/certyo-bench 54332 "${settings[@]}"
    cluster_psql -c "CREATE EXTENSION certyo_cdc" -f bench/baseline.sql
    python3 bench/capture.py "$CLUSTER_DIR" "$CLUSTER_PORT" "$config: ${settings[*]}"
    cluster_stop "$CLUSTER_DIR"
done

# The write path in CPU instructions (callgrind): repeatable where TPS on two cores is not.
python3 bench/instructions.py

# Capture with the worker running and sending paused: commits must not wake it.
bench/paused.sh

# Single-row transactions at 1, 4 and 8 clients with the worker delivering, paused, disabled.
cargo build --release -p certyo-emulator --quiet
python3 bench/oltp.py

# Delivery: the worker against the emulator on this machine.
cargo build --release -p certyo-emulator --quiet
target/release/certyo-emulator --port 54392 --api-key bench-key --anchor-delay 60 >/dev/null &
EMULATOR_PID=$!
cluster_start /tmp/certyo-bench 54332 "shared_preload_libraries = 'certyo_cdc'" \
    "certyo.base_url = 'http://127.0.0.1:54392'" "certyo.api_key = 'bench-key'" "certyo.tenant_id = 'bench'"
trap 'cluster_stop "$CLUSTER_DIR"; kill $EMULATOR_PID 2>/dev/null' EXIT
cluster_psql -c "CREATE EXTENSION certyo_cdc"
python3 bench/delivery.py "$CLUSTER_DIR" "$CLUSTER_PORT"
# Stopped before the next parts: left running, its worker went on verifying the receipts made
# due above against its emulator, on the cores the relay and the soak were measured on (the
# relay drain measured 6,820 records/s beside it, 20,000 alone).
cluster_stop "$CLUSTER_DIR"
kill $EMULATOR_PID 2>/dev/null || true
trap - EXIT

# certyo-relay: a 100k-change MariaDB backlog drained to the emulator; then once on MySQL 9.7
# (its Debian root, scripts/pg-root.sh).
cargo build --release -p certyo-relay --quiet
python3 bench/relay.py 100000
scripts/pg-root.sh mysql python3 bench/relay.py 100000

# The soak of make test, longer: memory, log and exactly-once over five minutes of faults.
CERTYO_SOAK_SECONDS=${CERTYO_SOAK_SECONDS:-300} CERTYO_EMULATOR=target/release/certyo-emulator \
    python3 -m pytest -q -s -p no:cacheprovider pg_test/test_daemon.py -k soak

# Fairness: another role's commit-to-accepted latency while one owner's triggers are slow.
python3 bench/fairness.py
# ... and while they loop forever catching their cancellation (the hard limit ends them).
python3 bench/fairness.py stubborn
