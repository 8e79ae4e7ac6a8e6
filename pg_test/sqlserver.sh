#!/usr/bin/env bash
# The SQL Server companion scripts (sql/sqlserver/) cannot run here (no SQL Server): each is
# parsed with sqlfluff's T-SQL dialect, which fails on any syntax error. Prints "N passed, M failed".
set -uo pipefail
cd "$(dirname "$0")/.."
passed=0 failed=0
for script in sql/sqlserver/*.sql; do
    if output=$(sqlfluff parse --dialect tsql "$script" 2>&1); then
        passed=$((passed + 1)); echo "ok   $script parses as T-SQL"
    else
        failed=$((failed + 1)); echo "FAIL $script"; grep -E "unparsable|PRS" <<<"$output" | head -5
    fi
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
