#!/usr/bin/env bash
# Runs pg_test/test_sequences.py with new seeds, one after another, for SOAK_MINUTES (default
# 10), and prints every failing seed with the command that replays it. Needs certyo_cdc
# installed in the PostgreSQL that CERTYO_PG_BIN names (by default the system's 15, as after
# `make test`) and the emulator built (cargo build --release -p certyo-emulator).
# Exits 1 when a seed failed.
set -uo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-${SOAK_MINUTES:-10}}
export CERTYO_EMULATOR=${CERTYO_EMULATOR:-target/release/certyo-emulator}
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
log=$(mktemp -d "${CERTYO_TEST_TMP:-/tmp}/certyo-soak.XXXXXX")
deadline=$(( $(date +%s) + 60 * minutes ))
failed=() runs=0
while [ "$(date +%s)" -lt "$deadline" ]; do
    seed=$(( (RANDOM << 15 | RANDOM) ))
    runs=$((runs + 1))
    if CERTYO_SEED=$seed "$python" -m pytest -q -p no:cacheprovider pg_test/test_sequences.py >"$log/$seed.log" 2>&1; then
        rm -f "$log/$seed.log"
    else
        failed+=("$seed")
        echo "seed $seed FAILED (log: $log/$seed.log); replay: CERTYO_SEED=$seed CERTYO_EMULATOR=$CERTYO_EMULATOR $python -m pytest -q pg_test/test_sequences.py"
        grep -A12 '^problems:' "$log/$seed.log" | head -14
    fi
done
echo "soak: $runs seed(s) in $minutes min, ${#failed[@]} failed${failed:+: ${failed[*]}}"
[ ${#failed[@]} -eq 0 ]
