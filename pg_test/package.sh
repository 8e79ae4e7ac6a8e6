#!/usr/bin/env bash
# The Debian packages as a user installs them, inside a clean Debian root with nothing of
# PostgreSQL in it (scripts/test-package.sh runs this by scripts/pg-root.sh --clean, which
# discards every change afterwards). Prints "N passed, M failed".
#
#   pg_test/package.sh 15|17|18   postgresql-NN-certyo-cdc: `apt-get install ./...deb` (which
#       brings the server), README's quick start (preload, the key file, CREATE EXTENSION,
#       track), a change delivered to the emulator and its hash written back; then
#       `apt-get remove` and `purge` leave none of the package's files
#   pg_test/package.sh relay      certyo-relay: its user, the configuration's rights, the
#       conffile; remove keeps the configuration, purge takes it
#   pg_test/package.sh lint       lintian over every package in target/debian/
set -uo pipefail
cd "$(dirname "$0")/.."
. pg_test/check.sh
what=${1:?usage: pg_test/package.sh 15|17|18|relay|lint}
KEY=e2e-secret

apt() { DEBIAN_FRONTEND=noninteractive apt-get -q -y --no-install-recommends -o Dpkg::Use-Pty=0 "$@" >/tmp/apt.log 2>&1 || { cat /tmp/apt.log; return 1; }; }
status() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null; }
# Files of ours anywhere in the root but the checkout (another mount): names, not contents.
# (The clean root's own marker and apt setting are scripts/pg-root.sh's.)
ours() {
    find / -xdev -name '*certyo*' ! -path /etc/postgresql/certyo.key ! -path '/.certyo-clean-ready-*' \
        ! -path /etc/apt/apt.conf.d/99certyo 2>/dev/null | sort
}
# The files (not directories) a package installed.
files_of() { dpkg-query -L "$1" | while read -r path; do [ -d "$path" ] || echo "$path"; done; }
still_there() { while read -r path; do [ -e "$path" ] && echo "$path"; done; }

started=$SECONDS
# The root's package lists are as old as the root: what a user does first.
apt update

case "$what" in
lint)
    package="the packages' lint"
    check "lintian installs" "$(apt install lintian && status lintian)" "install ok installed"
    # Not ours to mend: a changelog closing no Debian bug (an upload to Debian's archive would),
    # certyo-relay has --help but no manual page, Rust has no _FORTIFY_SOURCE.
    lintian --fail-on error,warning --suppress-tags initial-upload-closes-no-bugs,no-manual-page \
        target/debian/*.deb >/tmp/lintian.out 2>&1
    linted=$?
    check "lintian finds no error and no warning in $(ls target/debian/*.deb | wc -l) packages" \
        "$linted $(grep -E '^[EW]:' /tmp/lintian.out)" "0 "
    ;;
relay)
    package=certyo-relay
    deb=$(ls target/debian/certyo-relay_*.deb)
    check "apt-get install ./${deb##*/} installs it and what it depends on" \
        "$(apt install "./$deb" && status certyo-relay)" "install ok installed"
    check "the service's user is a system user without a login" \
        "$(getent passwd certyo-relay | awk -F: '{ print ($3 < 1000) ":" $7 }')" "1:/usr/sbin/nologin"
    check "the configuration is a conffile" \
        "$(dpkg-query -W -f='${Conffiles}' certyo-relay | awk '{ print $1 }')" "/etc/certyo-relay/relay.toml"
    check "the configuration is readable by the relay's group only" \
        "$(stat -c '%U:%G %a' /etc/certyo-relay/relay.toml)" "root:certyo-relay 640"
    check "the relay runs as its user" \
        "$(runuser -u certyo-relay -- certyo-relay --version)" "certyo-relay $(dpkg-query -W -f='${Version}' certyo-relay | cut -d- -f1)"
    # The key file as the example configuration says to make it.
    sed -n 's/^#   \(install .*\) <<< .*/\1/p' /etc/certyo-relay/relay.toml >/tmp/install-key
    check "the example's command for the key file is there" "$(cut -d' ' -f1-7 /tmp/install-key)" \
        "install -o root -g certyo-relay -m 640"
    bash -c "$(cat /tmp/install-key) <<< '$KEY'"
    runuser -u certyo-relay -- certyo-relay --config /etc/certyo-relay/relay.toml check >/tmp/check.out 2>&1
    check "the relay's user reads the configuration and the key (check gets as far as the example's source)" \
        "$? $(grep -c '^FAIL source shop' /tmp/check.out)" "1 1"
    runuser -u nobody -- certyo-relay --config /etc/certyo-relay/relay.toml check >/tmp/check.out 2>&1
    check "another user cannot read the configuration" \
        "$? $(grep -c 'relay.toml.*Permission denied' /tmp/check.out)" "2 1"
    check "the unit runs the relay as its user" \
        "$(grep -E '^(User|ExecStart)=' /usr/lib/systemd/system/certyo-relay.service | tr '\n' ' ')" \
        "User=certyo-relay ExecStart=/usr/bin/certyo-relay --config /etc/certyo-relay/relay.toml run "

    files=$(files_of certyo-relay | grep -v '^/etc/')
    check "apt-get remove succeeds" "$(apt remove certyo-relay && status certyo-relay)" "deinstall ok config-files"
    check "remove takes every file but the configuration" "$(still_there <<<"$files")" ""
    check "remove keeps the configuration" "$(ls /etc/certyo-relay)" "$(printf 'api_key\nrelay.toml')"
    check "apt-get purge succeeds" "$(apt purge certyo-relay && status certyo-relay)" ""
    check "purge takes the configuration and the key: nothing named certyo is left" "$(ours)" ""
    ;;
15 | 17 | 18)
    version=$what
    package=postgresql-$version-certyo-cdc
    deb=$(ls "target/debian/${package}_"*.deb)
    check "PostgreSQL $version is not installed before" "$(status postgresql-"$version")" ""
    check "apt-get install ./${deb##*/} installs it" "$(apt install "./$deb" && status "$package")" "install ok installed"
    check "and the server it depends on" "$(status postgresql-"$version")" "install ok installed"

    # The server as Debian made it (the cluster "main"), on its Unix socket only; it and the
    # emulator end with the test, whatever happens (the root's mounts are undone afterwards).
    pg_conftool -s "$version" main set listen_addresses ''
    pg_ctlcluster "$version" main start
    trap 'kill "${EMULATOR_PID:-}" 2>/dev/null; pg_ctlcluster "$version" main stop -m immediate 2>/dev/null' EXIT
    q() { runuser -u postgres -- psql -X -q -At -v ON_ERROR_STOP=1 -c "$1" 2>&1; }

    # The emulator of Certyo, on a port of its own.
    coproc EMULATOR { exec target/release/certyo-emulator --port 0 --api-key "$KEY" --anchor-delay 1; }
    read -r url <&"${EMULATOR[0]}"
    port=${url##*:}

    # README's quick start, in its order: preload and restart, then the key and the tenant.
    install -o postgres -m 600 /dev/stdin /etc/postgresql/certyo.key <<<"$KEY"
    check "ALTER SYSTEM SET shared_preload_libraries" "$(q "ALTER SYSTEM SET shared_preload_libraries = 'certyo_cdc'")" ""
    pg_ctlcluster "$version" main restart
    check "the server starts with the library preloaded" "$(q 'SHOW shared_preload_libraries')" "certyo_cdc"
    for setting in "certyo.api_key_file = '/etc/postgresql/certyo.key'" "certyo.tenant_id = 'acme-corp'" \
        "certyo.base_url = '$url'"; do
        check "ALTER SYSTEM SET $setting" "$(q "ALTER SYSTEM SET $setting")" ""
    done
    q "SELECT pg_reload_conf()" >/dev/null
    check "CREATE EXTENSION certyo_cdc" "$(q 'CREATE EXTENSION certyo_cdc')" ""
    check "the packaged version" "$(q "SELECT extversion FROM pg_extension WHERE extname = 'certyo_cdc'")" \
        "$(dpkg-query -W -f='${Version}' "$package" | cut -d- -f1)"
    q "CREATE TABLE products (id int PRIMARY KEY, sku text, price numeric(10,2));
       SELECT certyo.track('public.products');
       INSERT INTO products (id, sku, price) VALUES (42, 'A-1', 9.50);" >/dev/null
    for _ in $(seq 150); do
        [ "$(q "SELECT count(*) FROM certyo.receipt WHERE record_id = '42'")" = 1 ] && break
        sleep 0.2
    done
    # The row takes the hash once Certyo anchors the version (certyo.verify_min_age later); the
    # receipt holds it from acceptance on.
    hash=$(q "SELECT record_hash FROM certyo.receipt WHERE record_id = '42'")
    check "the worker delivers the change and keeps Certyo's hash in its receipt" "${hash:0:7}" "sha256:"
    exec 3<>"/dev/tcp/127.0.0.1/$port"
    printf 'GET /_emulator/records HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
    records=$(cat <&3)
    exec 3<&-
    check "Certyo holds the record with that hash" \
        "$(grep -o "\"recordHash\":\"$hash\"" <<<"$records" | wc -l)" "1"
    kill "$EMULATOR_PID"
    wait "$EMULATOR_PID" 2>/dev/null

    files=$(files_of "$package")
    check "apt-get remove succeeds" "$(apt remove "$package" && status "$package")" ""
    check "remove takes every file of the package" "$(still_there <<<"$files")" ""
    check "the server no longer offers the extension" \
        "$(q "SELECT count(*) FROM pg_available_extensions WHERE name = 'certyo_cdc'")" "0"
    check "and stays installed" "$(status postgresql-"$version")" "install ok installed"
    check "nothing named certyo is left but the key file the user made" "$(ours)" ""
    # It has no configuration files: remove leaves nothing to purge. Purge straight away instead:
    check "installed again, apt-get purge succeeds" \
        "$(apt install "./$deb" && apt purge "$package" && status "$package")" ""
    check "and leaves nothing either" "$(ours)" ""
    ;;
*)
    echo "pg_test/package.sh: $what is neither a PostgreSQL version (15, 17, 18), relay nor lint" >&2
    exit 2
    ;;
esac
echo "== $package in a clean $(. /etc/os-release && echo "${VERSION_CODENAME:-$ID}") root: $((SECONDS - started)) s"
check_summary
