#!/usr/bin/env bash
# The MySQL/MariaDB companion (relay/tests/test_companion.py) and certyo-relay end to end (relay/tests)
# against the server this machine has, or a Debian root's: scripts/test.sh runs it on the host
# (MariaDB 10.11) and, with `scripts/pg-root.sh mysql|mariadb scripts/test-relay.sh`, on MySQL 9.7
# and MariaDB 11.8. The relay and the emulator are the host's release builds (built first).
# Fails when any test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
CERTYO_RELAY=target/release/certyo-relay CERTYO_EMULATOR=target/release/certyo-emulator \
    "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider relay/tests "$@"
echo "== the companion and certyo-relay passed in $((SECONDS - started)) s"
