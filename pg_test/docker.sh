#!/usr/bin/env bash
# docker/ cannot be built here (no Docker engine): hadolint lints the Dockerfile, and the compose
# file must parse and name only build targets the Dockerfile has. Prints "N passed, M failed".
set -uo pipefail
cd "$(dirname "$0")/.."
. pg_test/check.sh
check "hadolint finds nothing in docker/Dockerfile" "$(hadolint docker/Dockerfile 2>&1; echo "exit $?")" "exit 0"
check "docker/compose.yaml builds only targets of docker/Dockerfile" "$(python3 - <<'PY'
import re, yaml
compose = yaml.safe_load(open("docker/compose.yaml"))
targets = set(re.findall(r"^FROM \S+ AS (\S+)", open("docker/Dockerfile").read(), re.M))
wanted = {s["build"]["target"] for s in compose["services"].values()}
print(sorted(wanted - targets) if wanted - targets else "ok")
PY
)" "ok"
check "the postgres service preloads certyo_cdc and points the worker at the emulator" \
    "$(grep -c -e 'shared_preload_libraries=certyo_cdc' -e 'certyo.base_url=http://emulator:8080' docker/compose.yaml)" "2"
check "the postgres service is published on 127.0.0.1 only and asks for a password (no trust)" "$(python3 - <<'PY'
import yaml
service = yaml.safe_load(open("docker/compose.yaml"))["services"]["postgres"]
ports, env = service.get("ports", []), service.get("environment", {})
problems = [p for p in ports if not str(p).startswith("127.0.0.1:")]
if "trust" in str(env) or "POSTGRES_PASSWORD" not in env:
    problems.append("authentication")
print(problems or "ok")
PY
)" "ok"
check "the Dockerfile builds for the PostgreSQL version given as PG_MAJOR" \
    "$(grep -c -e '^ARG PG_MAJOR=15$' -e 'FROM postgres:\${PG_MAJOR}-bookworm AS postgres' docker/Dockerfile)" "2"
check "each image installs its Debian package (scripts/package.sh), nothing copied by hand" "$(python3 - <<'PY'
import re
stages = dict(re.findall(r"^FROM \S+ AS (\S+)\n(.*?)(?=^FROM |\Z)", open("docker/Dockerfile").read(), re.M | re.S))
problems = []
for stage, deb in (("postgres", "postgresql-${PG_MAJOR}-certyo-cdc_*.deb"), ("relay", "certyo-relay_*.deb")):
    text = stages.get(stage, "")
    if not re.search(r"apt-get install [^\n]*/tmp/" + re.escape(deb), text):
        problems.append(f"{stage}: no apt-get install of {deb}")
    copied = [c for c in re.findall(r"^COPY --from=build (\S+)", text, re.M) if not c.endswith(".deb")]
    if copied:
        problems.append(f"{stage}: copies {copied}")
if "scripts/package.sh" not in stages.get("build", ""):
    problems.append("build: scripts/package.sh does not make the packages")
print(problems or "ok")
PY
)" "ok"
check_summary
