#!/usr/bin/env bash
# Every test: Rust unit tests and #[pg_test]s (cargo pgrx test), then the end-to-end checks
# under pg_test/ against real clusters. Fails when any test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "== unit tests and #[pg_test]s"
cargo pgrx test pg15 --runas postgres --pgdata /tmp/certyo-pgrx-test
# cargo pgrx test installed a debug build; the end-to-end checks run the release build.
cargo pgrx install --release --pg-config /usr/bin/pg_config >/dev/null
echo "== end to end: capture"
pg_test/capture.sh
echo "== end to end (pytest): delivery, verification and the operator surface, security, the worker as a daemon, integrity (failover)"
cargo build --release -p certyo-emulator --quiet
CERTYO_EMULATOR=target/release/certyo-emulator python3 -m pytest -q -p no:cacheprovider \
    pg_test/test_delivery.py pg_test/test_operations.py pg_test/test_security.py pg_test/test_daemon.py \
    pg_test/test_integrity.py
echo "== end to end: MySQL/MariaDB companion"
pg_test/mariadb.sh
echo "== SQL Server companion: T-SQL syntax"
pg_test/sqlserver.sh
echo "== docker/: Dockerfile lint and compose targets"
pg_test/docker.sh
