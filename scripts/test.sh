#!/usr/bin/env bash
# Every test: for each PostgreSQL version in PG_VERSIONS (default 15, the machine's own; `make
# test-all` adds 17 and 18, each in a Debian root made by scripts/pg-root.sh), the unit tests,
# #[pg_test]s and end-to-end suites of scripts/test-version.sh; then what does not depend on the
# version: the Certyo client, the emulator and certyo-relay (unit tests; end to end against MariaDB), the
# companions (MariaDB, T-SQL) and docker/. Fails when any test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"  # the Python tools setup installed
for version in ${PG_VERSIONS:-15}; do
    started=$SECONDS
    if [ "$version" = 15 ]; then
        scripts/test-version.sh 15
    else
        scripts/pg-root.sh "$version" scripts/test-version.sh "$version"
    fi
    echo "== PostgreSQL $version: every test passed in $((SECONDS - started)) s"
done
echo "== the Certyo client, the emulator and certyo-relay: unit tests (the SQL Server source against its in-process fake)"
cargo test -p certyo -p certyo-emulator -p certyo-relay --quiet
echo "== end to end: MySQL/MariaDB companion"
pg_test/mariadb.sh
echo "== end to end: certyo-relay against MariaDB and the emulator"
cargo build --release -p certyo-relay -p certyo-emulator --quiet
CERTYO_RELAY=target/release/certyo-relay CERTYO_EMULATOR=target/release/certyo-emulator \
    python3 -m pytest -q -p no:cacheprovider relay/tests
echo "== SQL Server companion: T-SQL syntax"
pg_test/sqlserver.sh
echo "== docker/: Dockerfile lint and compose targets"
pg_test/docker.sh
