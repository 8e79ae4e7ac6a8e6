#!/usr/bin/env bash
# Every test of the extension against one PostgreSQL version: unit tests and #[pg_test]s
# (cargo pgrx test), then the end-to-end suites under pg_test/ on real clusters of that
# version. Run by scripts/test.sh: for 15 on this machine, for 17 and 18 inside the Debian
# root that scripts/pg-root.sh makes. Fails when any test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: scripts/test-version.sh VERSION}
pg_config=/usr/lib/postgresql/$version/bin/pg_config
# Each version builds into its own target directory: the bindings differ, and so do the C
# libraries of a Debian root.
if [ "$version" != 15 ]; then
    export CARGO_TARGET_DIR=target/pg$version
fi
target=${CARGO_TARGET_DIR:-target}

if ! grep -qs "^pg$version *=" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    echo "== pointing pgrx at PostgreSQL $version"
    cargo pgrx init "--pg$version" "$pg_config" >/dev/null
fi

echo "== PostgreSQL $version: unit tests and #[pg_test]s"
# As root, .cargo/config.toml (written by setup.sh) runs its cluster as postgres.
cargo pgrx test "pg$version"
# cargo pgrx test installed a debug build; the end-to-end checks run the release build.
cargo pgrx install --release --pg-config "$pg_config" --no-default-features --features "pg$version" >/dev/null
# Its Debian package, from that release build (scripts/test-package.sh installs it later).
scripts/package.sh "$version"
export PG_BIN=/usr/lib/postgresql/$version/bin CERTYO_PG_BIN=/usr/lib/postgresql/$version/bin

echo "== PostgreSQL $version, end to end (pytest): capture, delivery, verification and the operator surface, security, the worker as a daemon, integrity, upgrades, every database, table identity, random operation sequences, the write-back modes and the sidecar mode"
cargo build --release -p certyo-emulator --quiet
# Every suite under pg_test/ (a new one runs without being listed here) but those of the
# documentation and the harness, which need no database and run once, in scripts/test.sh.
CERTYO_EMULATOR=$target/release/certyo-emulator "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider \
    pg_test --ignore=pg_test/test_docs.py --ignore=pg_test/test_harness.py
