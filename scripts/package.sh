#!/usr/bin/env bash
# Debian packages of certyo_cdc and certyo-relay, into target/debian/:
#
#   scripts/package.sh 15        # postgresql-15-certyo-cdc, for this machine's PostgreSQL 15
#   scripts/pg-root.sh 17 scripts/package.sh 17   # postgresql-17-certyo-cdc, in 17's Debian root
#   scripts/package.sh relay     # certyo-relay: the binary, /etc/certyo-relay/, a systemd unit
#
# `make package` makes them all. The extension is built by `cargo pgrx package` (reusing the
# release build the tests made), the package by dpkg-shlibdeps, dpkg-gencontrol and dpkg-deb
# from packaging/debian/; each for the Debian release it is built on (the library needs that
# release's C library, and Depends on its postgresql-NN).
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:?usage: scripts/package.sh 15|17|18|relay}
out=$PWD/target/debian
templates=$PWD/packaging/debian

say() { printf '== %s\n' "$*"; }

command -v dpkg-gencontrol >/dev/null || {
    say "installing dpkg-dev (dpkg-gencontrol, dpkg-shlibdeps)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dpkg-dev >/dev/null
}

case "$what" in
relay)
    package=certyo-relay
    upstream=$(sed -n 's/^version = "\(.*\)"$/\1/p' relay/Cargo.toml | head -1)
    # Built as scripts/test.sh builds it for the relay's tests, with the emulator: one set of
    # the dependencies' features, so the binary packaged is the binary tested, built once.
    say "building certyo-relay (release)"
    cargo build --release -p certyo-relay -p certyo-emulator --quiet
    built=${CARGO_TARGET_DIR:-target}/release/certyo-relay
    ;;
15 | 17 | 18)
    version=$what
    package=postgresql-$version-certyo-cdc
    upstream=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
    pg_config=/usr/lib/postgresql/$version/bin/pg_config
    [ -x "$pg_config" ] || {
        echo "scripts/package.sh: no PostgreSQL $version here ($pg_config); 17 and 18 are built in their roots: scripts/pg-root.sh $version scripts/package.sh $version" >&2
        exit 2
    }
    # The target directory scripts/test-version.sh uses for this version: its release build is reused.
    [ "$version" = 15 ] || export CARGO_TARGET_DIR=target/pg$version
    if ! grep -qs "^pg$version *=" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
        say "pointing pgrx at PostgreSQL $version"
        cargo pgrx init "--pg$version" "$pg_config" >/dev/null
    fi
    say "building certyo_cdc for PostgreSQL $version (cargo pgrx package)"
    cargo pgrx package --pg-config "$pg_config" --no-default-features --features "pg$version" >/dev/null
    built=${CARGO_TARGET_DIR:-target}/release/certyo_cdc-pg$version
    ;;
*)
    echo "scripts/package.sh: $what is neither a PostgreSQL version (15, 17, 18) nor relay" >&2
    exit 2
    ;;
esac

# A package revision of our own under the crate's version.
debian_version=$upstream-1
stage=$out/build/$package
work=$out/build/$package.source
rm -rf "$stage" "$work"
mkdir -p "$stage/DEBIAN" "$work/debian" "$stage/usr/share/doc/$package"

# The package's files, as dh_strip, dh_fixperms and dh_compress would leave them.
case "$what" in
relay)
    install -D -m 755 "$built" "$stage/usr/bin/certyo-relay"
    strip --remove-section=.comment --remove-section=.note "$stage/usr/bin/certyo-relay"
    install -D -m 644 "$templates/relay.toml" "$stage/etc/certyo-relay/relay.toml"
    install -D -m 644 "$templates/certyo-relay.service" "$stage/usr/lib/systemd/system/certyo-relay.service"
    gzip -9n <docs/relay.md >"$stage/usr/share/doc/$package/relay.md.gz"
    echo /etc/certyo-relay/relay.toml >"$stage/DEBIAN/conffiles"
    for script in postinst prerm postrm; do
        install -m 755 "$templates/certyo-relay.$script" "$stage/DEBIAN/$script"
    done
    objects=("$stage/usr/bin/certyo-relay")
    ;;
*)
    cp -r "$built/usr" "$stage/"
    library=$stage/usr/lib/postgresql/$version/lib/certyo_cdc.so
    strip --remove-section=.comment --remove-section=.note --strip-unneeded "$library"
    objects=("$library")
    ;;
esac
install -m 644 "$templates/copyright" "$stage/usr/share/doc/$package/copyright"
find "$stage" -type d -exec chmod 755 {} +
find "$stage/usr" -type f ! -path '*/bin/*' -exec chmod 644 {} +

# The source package's control file and changelog, from the templates and the crate's version.
sed "s/@PG_MAJOR@/${version:-}/g" "$templates/control" >"$work/debian/control"
. /etc/os-release
cat >"$work/debian/changelog" <<CHANGELOG
certyo-cdc ($debian_version) ${VERSION_CODENAME:-unstable}; urgency=medium

  * certyo_cdc $upstream, certyo-relay $upstream.

 -- $(sed -n 's/^Maintainer: //p' "$work/debian/control")  $(date -R -d "@${SOURCE_DATE_EPOCH:-$(date +%s)}")
CHANGELOG
gzip -9n <"$work/debian/changelog" >"$stage/usr/share/doc/$package/changelog.Debian.gz"

# Depends: the C libraries the objects link (dpkg-shlibdeps), then the control file.
(
    cd "$work"
    dpkg-shlibdeps -Tdebian/substvars "${objects[@]}"
    dpkg-gencontrol "-p$package" -Tdebian/substvars "-P$stage"
)
(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) \
    >"$stage/DEBIAN/md5sums"
chmod 644 "$stage/DEBIAN/md5sums"
rm -f "$out/${package}_"*.deb
dpkg-deb --root-owner-group -Zxz --build "$stage" "$out/" >/dev/null
deb=$(ls "$out/${package}_"*.deb)
say "built ${deb#"$PWD"/}"
dpkg-deb --field "$deb" Package Version Architecture Depends Installed-Size | sed 's/^/   /'
