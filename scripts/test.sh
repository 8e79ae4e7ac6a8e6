#!/usr/bin/env bash
# Every test: for each PostgreSQL version in PG_VERSIONS (default 15, the machine's own; `make
# test-all` adds 17 and 18, each in a Debian root made by scripts/pg-root.sh), the unit tests,
# #[pg_test]s and end-to-end suites of scripts/test-version.sh; then the companions (MariaDB,
# T-SQL) and docker/, which do not depend on the version. Fails when any test fails.
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
echo "== end to end: MySQL/MariaDB companion"
pg_test/mariadb.sh
echo "== SQL Server companion: T-SQL syntax"
pg_test/sqlserver.sh
echo "== docker/: Dockerfile lint and compose targets"
pg_test/docker.sh
