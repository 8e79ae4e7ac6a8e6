#!/usr/bin/env bash
# PostgreSQL versions that Debian 12 does not ship, from Debian's own newer releases: a minimal
# Debian root (debootstrap) holding PostgreSQL VERSION and its headers, and the command run in
# it with this checkout, the Rust toolchain and the cargo registry bound in at the same paths.
#
#   scripts/pg-root.sh 17                          # make (or check) the root for PostgreSQL 17
#   scripts/pg-root.sh 17 scripts/test-version.sh 17   # run a command in it, in this checkout
#   scripts/pg-root.sh --clean 17 COMMAND...       # run a command in a throwaway clean root
#
# 17 comes from trixie, 18 from sid. Roots live under $CERTYO_ROOTS (default
# /var/tmp/certyo-roots) and are reused; they are never deleted by this script (a root with
# the toolchain bound in must not be removed with rm -rf: it would delete ~/.cargo).
#
# --clean is a user's machine instead: a bare Debian root of the version's release (15:
# bookworm, the host's) with nothing of PostgreSQL installed, only its packages downloaded
# into apt's cache, and only this checkout bound in (no toolchain). The command runs in a
# throwaway overlay on it, whose changes are discarded when it ends, so that the clean root
# stays clean (the package test installs and removes packages there).
# Needs root, and Debian's package registry.
set -euo pipefail
cd "$(dirname "$0")/.."

clean=
if [ "${1:-}" = --clean ]; then
    clean=1
    shift
fi
version=${1:?usage: scripts/pg-root.sh [--clean] VERSION [COMMAND...]}
shift
case "$version" in
15) suite=bookworm ;;
17) suite=trixie ;;
18) suite=sid ;;
*) suite= ;;
esac
if [ -z "$suite" ] || { [ "$version" = 15 ] && [ -z "$clean" ]; }; then
    echo "scripts/pg-root.sh: no Debian release is known for PostgreSQL $version (17: trixie, 18: sid); 15 is the host's own (bookworm: only with --clean)" >&2
    exit 2
fi
roots=${CERTYO_ROOTS:-/var/tmp/certyo-roots}
root=$roots/$suite
mirror=http://deb.debian.org/debian
# sid's Release file in the registry's copy can be past its Valid-Until date.
apt_options=(-o Acquire::Check-Valid-Until=false -o APT::Install-Recommends=false)
packages=(postgresql-"$version" postgresql-server-dev-"$version" libclang-dev clang gcc libc6-dev make
    sudo python3 python3-pytest python3-yaml ca-certificates dpkg-dev)
# The marker names the package list: a root made with a shorter list gets the rest installed.
ready=$root/.certyo-ready-$version-$(printf '%s\n' "${packages[@]}" | md5sum | cut -c1-8)
if [ -n "$clean" ]; then
    root=$roots/clean-$suite
    ready=$root/.certyo-clean-ready-$version
fi

say() { printf '== %s\n' "$*"; }

mounted=()
unmount_all() {
    local i
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
        umount -l "${mounted[$i]}" 2>/dev/null || true
    done
}
trap unmount_all EXIT

bind() { # bind SOURCE: the same path inside the root
    mkdir -p "$root$1"
    mountpoint -q "$root$1" || { mount --bind "$1" "$root$1" && mounted+=("$root$1"); }
}

mount_basics() {
    mkdir -p "$root/proc" "$root/dev"
    mountpoint -q "$root/proc" || { mount -t proc proc "$root/proc" && mounted+=("$root/proc"); }
    mountpoint -q "$root/dev" || { mount --bind /dev "$root/dev" && mounted+=("$root/dev"); }
    cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
    grep -qs "$(hostname)" "$root/etc/hosts" || echo "127.0.1.1 $(hostname)" >>"$root/etc/hosts"
    # cargo pgrx test starts its server with -h localhost: a root whose /etc/hosts lacks it
    # (debootstrap leaves none on some machines) fails every #[pg_test] with "could not
    # translate host name".
    grep -qsw localhost "$root/etc/hosts" || echo "127.0.0.1 localhost" >>"$root/etc/hosts"
}

make_root() {
    if [ ! -x "$root/usr/bin/apt-get" ]; then
        command -v debootstrap >/dev/null || {
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
        }
        say "making a Debian $suite root for PostgreSQL $version in $root (about a minute)"
        debootstrap --variant=minbase "$suite" "$root" "$mirror" >/dev/null
    fi
    # No service starts inside the root.
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod +x "$root/usr/sbin/policy-rc.d"
    mount_basics
}

# One process makes a root; another one wanting it meanwhile waits (the package tests start
# side by side, two of them on the same clean root).
mkdir -p "$roots"
exec {lock}>"$roots/.lock-${root##*/}"
flock "$lock"
if [ -n "$clean" ] && [ ! -f "$ready" ]; then
    make_root
    # What apt-get is told on the command line for the roots, said once for the command's own.
    printf 'Acquire::Check-Valid-Until "false";\n' >"$root/etc/apt/apt.conf.d/99certyo"
    say "downloading PostgreSQL $version into the clean $suite root's package cache (not installed)"
    chroot "$root" apt-get "${apt_options[@]}" update -qq
    chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get "${apt_options[@]}" install -y -qq --download-only \
        postgresql-"$version" >/dev/null
    touch "$ready"
elif [ -z "$clean" ] && [ ! -f "$ready" ]; then
    make_root
    # No default cluster is made: tests make their own.
    mkdir -p "$root/etc/postgresql-common/createcluster.d"
    echo "create_main_cluster = false" >"$root/etc/postgresql-common/createcluster.d/certyo.conf"
    say "installing PostgreSQL $version and the build tools into the $suite root"
    chroot "$root" apt-get "${apt_options[@]}" update -qq
    chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get "${apt_options[@]}" install -y -qq "${packages[@]}" >/dev/null
    touch "$ready"
fi
flock -u "$lock"

(($#)) || exit 0

if [ -n "$clean" ]; then
    # The overlay's own mounts are undone here, each checked: its upper directory (what the
    # command changed) is deleted only once nothing is mounted under it any more.
    unmount_all
    mounted=()
    scratch=$(mktemp -d "$roots/scratch-$suite.XXXXXX")
    mkdir "$scratch/upper" "$scratch/work" "$scratch/root"
    mount -t overlay overlay -o "lowerdir=$root,upperdir=$scratch/upper,workdir=$scratch/work" "$scratch/root"
    root=$scratch/root
    discard() {
        local status=$? i
        for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
            umount "${mounted[$i]}" || status=1
        done
        if umount "$root"; then
            rm -rf "$scratch"
        else
            echo "scripts/pg-root.sh: $root is still mounted; left $scratch in place" >&2
            status=1
        fi
        exit $status
    }
    trap discard EXIT
    mount_basics
    bind "$(pwd)"
    status=0
    chroot "$root" env -i HOME=/root PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin TERM="${TERM:-dumb}" \
        LANG=C.UTF-8 bash -c 'cd "$1" && shift && exec "$@"' -- "$(pwd)" "$@" || status=$?
    exit $status
fi

mount_basics
bind "$(pwd)"
bind "$HOME/.cargo"
bind "$HOME/.rustup"
chroot "$root" env -i HOME="$HOME" PATH="$HOME/.cargo/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin" \
    TERM="${TERM:-dumb}" CI="${CI:-}" LANG=C.UTF-8 \
    bash -c 'cd "$1" && shift && exec "$@"' -- "$(pwd)" "$@"
