# Assertions for the end-to-end scripts: source it, call check NAME ACTUAL EXPECTED for each
# expectation, and finish with check_summary, which prints "N passed, M failed" and fails when
# anything failed.
passed=0 failed=0
check() {
    if [ "$2" == "$3" ]; then
        passed=$((passed + 1)); echo "ok   $1"
    else
        failed=$((failed + 1)); printf 'FAIL %s\n     expected: %s\n     actual:   %s\n' "$1" "$3" "$2"
    fi
}
check_summary() {
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
}
