#!/usr/bin/env bash
# Every test: for each PostgreSQL version in PG_VERSIONS (default 15, the machine's own; `make
# test-all` adds 17 and 18, each in a Debian root made by scripts/pg-root.sh), the unit tests,
# #[pg_test]s and end-to-end suites of scripts/test-version.sh; then what does not depend on the
# version: the Certyo client, the emulator and certyo-relay (unit tests; end to end against MariaDB), the
# documentation against the sources, the companions (MariaDB, T-SQL) and docker/; and the Debian
# packages, each installed into a clean Debian root (scripts/test-package.sh). Fails when any test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"  # the Python tools setup installed
# Every version side by side, 15 on this machine and the others each in a Debian root made by
# scripts/pg-root.sh (their suites mostly wait on clusters; each root has its own /tmp and
# build directory, 15 builds into target/), each one's output shown whole when it ends.
logs=$(mktemp -d)
versions=() pids=()
started=$SECONDS
for version in ${PG_VERSIONS:-15}; do
    if [ "$version" = 15 ]; then
        scripts/test-version.sh 15 >"$logs/$version.log" 2>&1 &
    else
        scripts/pg-root.sh "$version" scripts/test-version.sh "$version" >"$logs/$version.log" 2>&1 &
    fi
    versions+=("$version") pids+=($!)
done
failed=()
for i in "${!versions[@]}"; do
    version=${versions[$i]}
    if wait "${pids[$i]}"; then
        cat "$logs/$version.log"
        echo "== PostgreSQL $version: every test passed in $((SECONDS - started)) s (beside ${versions[*]})"
    else
        cat "$logs/$version.log"
        echo "== PostgreSQL $version: FAILED (above)"
        failed+=("$version")
    fi
done
rm -rf "$logs"
if [ ${#failed[@]} -gt 0 ]; then
    echo "== tests failed on PostgreSQL ${failed[*]}" >&2
    exit 1
fi
# The packages, each installed into a clean Debian root, beside the suites below (they wait on
# apt and on clusters): postgresql-NN-certyo-cdc, made by scripts/test-version.sh, and certyo-relay.
cargo build --release -p certyo-relay -p certyo-emulator --quiet
scripts/package.sh relay
packages_log=$(mktemp)
scripts/test-package.sh ${PG_VERSIONS:-15} relay lint >"$packages_log" 2>&1 &
packages_pid=$!
echo "== lints: clippy on every crate, warnings as errors (every unsafe block says why it is sound)"
cargo clippy --all-targets --no-default-features --features pg15 --quiet -- -D warnings
cargo clippy -p certyo -p certyo-relay -p certyo-emulator --all-targets --quiet -- -D warnings
echo "== the Certyo client, the emulator and certyo-relay: unit tests (the SQL Server source against its in-process fake)"
cargo test -p certyo -p certyo-emulator -p certyo-relay --quiet
echo "== end to end: the MySQL/MariaDB companion and certyo-relay against MariaDB ${RELAY_SERVERS:+and $RELAY_SERVERS }and the emulator"
# MySQL and MariaDB of newer Debian releases (RELAY_SERVERS, `make test-all`: mysql, mariadb),
# each in its Debian root, side by side with the host's MariaDB: the suites mostly wait on
# their servers. Each one's output is shown whole when it ends.
for server in ${RELAY_SERVERS:-}; do
    scripts/pg-root.sh "$server" true  # the root and its server, once, before anything runs beside it
done
logs=$(mktemp -d)
servers=() pids=()
for server in ${RELAY_SERVERS:-}; do
    scripts/pg-root.sh "$server" scripts/test-relay.sh >"$logs/$server.log" 2>&1 &
    servers+=("$server") pids+=($!)
done
host_ok=true
scripts/test-relay.sh || host_ok=false
failed=()
for i in "${!servers[@]}"; do
    wait "${pids[$i]}" || failed+=("${servers[$i]}")
    echo "== the companion and certyo-relay on ${servers[$i]} (its Debian root):"
    cat "$logs/${servers[$i]}.log"
done
rm -rf "$logs"
$host_ok || failed+=("the host's MariaDB")
if [ ${#failed[@]} -gt 0 ]; then
    echo "== the companion or certyo-relay failed on ${failed[*]}" >&2
    exit 1
fi
echo "== the documentation against the sources, and the harness (pg_test/test_docs.py, pg_test/test_harness.py: no database)"
python3 -m pytest -q -p no:cacheprovider pg_test/test_docs.py pg_test/test_harness.py
echo "== SQL Server companion: T-SQL syntax"
pg_test/sqlserver.sh
echo "== docker/: Dockerfile lint and compose targets"
pg_test/docker.sh
echo "== the Debian packages, each installed into a clean Debian root (scripts/test-package.sh)"
if wait "$packages_pid"; then
    cat "$packages_log"
else
    cat "$packages_log"
    rm -f "$packages_log"
    echo "== the package tests failed (above)" >&2
    exit 1
fi
rm -f "$packages_log"
