#!/usr/bin/env bash
# The SQL Server companion scripts (sql/sqlserver/) and every statement certyo-relay sends to
# SQL Server (the string constants of relay/src/source/sqlserver/statements.rs) cannot run here
# (no SQL Server): each is parsed with sqlfluff's T-SQL dialect, which fails on any syntax
# error. Prints "N passed, M failed".
set -uo pipefail
cd "$(dirname "$0")/.."
passed=0 failed=0
check() { # file, label
    if output=$(sqlfluff parse --dialect tsql "$1" 2>&1); then
        passed=$((passed + 1)); echo "ok   $2 parses as T-SQL"
    else
        failed=$((failed + 1)); echo "FAIL $2"; grep -E "unparsable|PRS" <<<"$output" | head -5
    fi
}
for script in sql/sqlserver/*.sql; do
    check "$script" "$script"
done

statements=relay/src/source/sqlserver/statements.rs
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
# One file per `pub const NAME: &str = "...";` (plain string literals: the file uses no escapes
# but \" and \\, which are undone here). Every &str constant must be extracted, or it fails.
if ! python3 - "$statements" "$dir" <<'PY'
import os, re, sys
source = open(sys.argv[1]).read()
found = re.findall(r'pub const ([A-Z0-9_]+): &str =\s*"((?:[^"\\]|\\.)*)";', source, re.S)
declared = re.findall(r'pub const ([A-Z0-9_]+): &str\b', source)
if not found or len(found) != len(declared):
    sys.exit(f"{sys.argv[1]}: {len(declared)} &str constants, {len(found)} plain string literals extracted")
for name, text in found:
    text = text.replace('\\"', '"').replace('\\\\', '\\')
    with open(os.path.join(sys.argv[2], name + ".sql"), "w") as f:
        f.write(text.strip() + "\n")
PY
then
    failed=$((failed + 1)); echo "FAIL could not extract the statements of $statements"
fi
for statement in "$dir"/*.sql; do
    [ -e "$statement" ] || continue
    check "$statement" "$statements: $(basename "$statement" .sql)"
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
