#!/usr/bin/env bash
# Single-row INSERT transactions (pgbench -c 4 -j 2) into an untracked table and a tracked twin,
# with the worker preloaded and sending paused, interleaved: the ratio of their TPS, and the
# passes the worker ran meanwhile (about one per certyo.poll_interval when commits do not wake
# it; one per commit when they do). Run by bench/run.sh; needs the extension installed.
set -euo pipefail
cd "$(dirname "$0")/.."
. pg_test/cluster.sh
SECONDS_PER_RUN=${BENCH_PAUSED_SECONDS:-8}
cluster_start /tmp/certyo-bench-paused 54333 "shared_preload_libraries = 'certyo_cdc'" "autovacuum = off" \
    "certyo.base_url = 'http://127.0.0.1:9'" "certyo.api_key = 'bench-key'" "certyo.tenant_id = 'bench'"
cluster_psql -q -c "CREATE EXTENSION certyo_cdc" \
    -c "CREATE TABLE untracked (id bigserial PRIMARY KEY, a int, b text, c timestamptz)" \
    -c "CREATE TABLE tracked (id bigserial PRIMARY KEY, a int, b text, c timestamptz)" \
    -c "SELECT certyo.track('tracked')" -c "SELECT certyo.pause()" >/dev/null
script=$(mktemp -d)
trap 'cluster_stop "$CLUSTER_DIR"; rm -rf "$script"' EXIT
for table in untracked tracked; do
    echo "INSERT INTO $table (a, b, c) VALUES (1, 'x', now());" >"$script/$table.sql"
done
passes() { cluster_psql -Atc "SELECT passes FROM certyo.worker_status()"; }
declare -A tps
for round in 1 2 3 4 5; do
    for table in untracked tracked; do
        before=$(passes)
        tps[$table]+="$("$PG_BIN/pgbench" -h "$CLUSTER_DIR" -p "$CLUSTER_PORT" -U postgres -n -c 4 -j 2 \
            -T "$SECONDS_PER_RUN" -f "$script/$table.sql" postgres 2>/dev/null | grep -oP 'tps = \K[0-9.]+' | head -1) "
        [ "$table" = tracked ] && echo "round $round: worker passes during ${SECONDS_PER_RUN} s of tracked commits: $(($(passes) - before))"
    done
done
python3 - "${tps[untracked]}" "${tps[tracked]}" <<'PY'
import statistics, sys
untracked, tracked = (statistics.median(map(float, arg.split())) for arg in sys.argv[1:])
print(f"sending paused, single-row INSERT, 4 clients: untracked {untracked:,.0f} tps, "
      f"tracked {tracked:,.0f} tps ({tracked / untracked:.0%}; target >= 95%)")
PY
