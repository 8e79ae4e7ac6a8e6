#!/usr/bin/env bash
# The Debian packages (target/debian/, made by scripts/package.sh) installed as a user installs
# them, each in a clean Debian root of its release (scripts/pg-root.sh --clean; 15 and the relay
# in bookworm, 17 in trixie, 18 in sid), side by side: pg_test/package.sh; and lintian over them
# all. Then the relay's systemd unit, checked by systemd-analyze on this machine. Fails when any
# test fails.
#
#   scripts/test-package.sh 15 17 18 relay lint
set -euo pipefail
cd "$(dirname "$0")/.."
. pg_test/check.sh
(($#)) || set -- 15 relay
started=$SECONDS

# The emulator the extension's tests deliver to (a no-op when scripts/test.sh built it already).
cargo build --release -p certyo-relay -p certyo-emulator --quiet
logs=$(mktemp -d)
pids=()
for what in "$@"; do
    version=$what
    # bookworm: the oldest release the relay runs on; lintian's, for every package.
    [ "$what" = relay ] || [ "$what" = lint ] && version=15
    scripts/pg-root.sh --clean "$version" pg_test/package.sh "$what" >"$logs/$what.log" 2>&1 &
    pids+=($!)
done
failing=()
for i in "${!pids[@]}"; do
    what=${*:$((i + 1)):1}
    wait "${pids[$i]}" || failing+=("$what")
    cat "$logs/$what.log"
done
rm -rf "$logs"

if [[ " $* " == *" relay "* ]]; then
    echo "== certyo-relay's systemd unit (systemd-analyze on this machine)"
    unit=target/debian/build/certyo-relay/usr/lib/systemd/system/certyo-relay.service
    # verify wants the program to exist: the same unit, run by /bin/true.
    probe=$(mktemp -d)
    sed 's#^ExecStart=/usr/bin/certyo-relay#ExecStart=/bin/true#' "$unit" >"$probe/certyo-relay.service"
    check "systemd-analyze verify finds nothing in the unit" \
        "$(systemd-analyze verify --man=no "$probe/certyo-relay.service" 2>&1; echo "exit $?")" "exit 0"
    rm -rf "$probe"
    exposure=$(systemd-analyze security --offline=yes "$unit" 2>/dev/null | sed -n 's/.*Overall exposure level for certyo-relay.service: \([0-9.]*\).*/\1/p')
    check "its exposure (systemd-analyze security) is OK: 2.0 or less" \
        "$(awk -v e="${exposure:-99}" 'BEGIN { print (e <= 2.0) ? "ok" : e }')" "ok"
    check_summary || failing+=("the relay's unit")
fi
echo "== packages: $((SECONDS - started)) s for $*"
if ((${#failing[@]})); then
    echo "== package tests failed: ${failing[*]}" >&2
    exit 1
fi
