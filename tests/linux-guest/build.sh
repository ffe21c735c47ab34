#!/usr/bin/env bash
# Builds the Linux test guest from Debian packages only: the kernel from linux-source-6.12
# (kernel.sh: patches/ and kernel.config on tinyconfig), and an uncompressed initramfs holding
# busybox-static and the small programs of initramfs/ (decompressing in emulated guest ring 0
# would cost minutes). Both are cached outside the source tree, each under the hash of its
# inputs, and rebuilt only when one of them changes:
#   $cache/kernel-<hash>/vmlinux          tarball, kernel.sh, kernel.config, patches/, compiler
#   $cache/initramfs-<hash>/initramfs.cpio busybox, initramfs/, this file, mkcpio.sh, compiler
# where $cache is $BHYVE_RS_LINUX_GUEST_CACHE, or ${XDG_CACHE_HOME:-$HOME/.cache}/bhyve-rs/linux-guest.
#
# usage: build.sh            build what is missing (the kernel takes ~10 minutes of 2 cores,
#                            under nice), then print kernel=PATH and initramfs=PATH
#        build.sh --locate   print the same if both are built and current; otherwise say why on
#                            stderr and exit 3 (nothing is built)
# Needs: linux-source-6.12 busybox-static gcc libc6-dev make flex bison bc libelf-dev libssl-dev
# (tests/install-deps.sh installs them).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=$(realpath -m "${BHYVE_RS_LINUX_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bhyve-rs/linux-guest}")
# The inputs are named relative to this directory, so the checkout's place does not matter.
cd "$here"
tarball=/usr/src/linux-source-6.12.tar.xz
busybox=/bin/busybox
locate=0
case "${1:-}" in
    --locate) locate=1 ;;
    '') ;;
    *) echo "usage: build.sh [--locate]" >&2; exit 2 ;;
esac

not_built() {
    echo "linux guest not built: $*" >&2
    exit 3
}

[ -f "$tarball" ] || not_built "$tarball is missing (apt-get install linux-source-6.12; tests/install-deps.sh)"
file -L "$busybox" 2>/dev/null | grep -q 'statically linked' ||
    not_built "$busybox is not a static busybox (apt-get install busybox-static)"
command -v gcc >/dev/null || not_built "no gcc"

# One line per input, its content hash and name, so the key changes with any of them; a missing
# input stops the build.
hash_inputs() { sha256sum -- "$@"; }
compiler() { gcc --version | head -n1; ld --version | head -n1; }

kernel_key=$({
    hash_inputs "$tarball" kernel.sh kernel.config patches/series patches/*.patch &&
        compiler
} | sha256sum | cut -c1-16)
initramfs_key=$({
    hash_inputs "$busybox" build.sh mkcpio.sh $(find initramfs -type f | LC_ALL=C sort) &&
        compiler
} | sha256sum | cut -c1-16)
kernel=$cache/kernel-$kernel_key/vmlinux
initramfs=$cache/initramfs-$initramfs_key/initramfs.cpio

if [ "$locate" -eq 1 ]; then
    [ -f "$kernel" ] || not_built "no kernel for the current inputs at $kernel (make linux-guest builds it, ~10 minutes)"
    [ -f "$initramfs" ] || not_built "no initramfs for the current inputs at $initramfs (make linux-guest builds it)"
    echo "kernel=$kernel"
    echo "initramfs=$initramfs"
    exit 0
fi

mkdir -p "$cache"
# Two builds at once (two test runs, make -j) wait for each other instead of sharing a tree.
exec {lock}> "$cache/lock"
flock "$lock"

if [ ! -f "$kernel" ]; then
    echo "build.sh: building the guest kernel into $(dirname "$kernel") (about 10 minutes)" >&2
    start=$SECONDS
    mkdir -p "$(dirname "$kernel")"
    # The heaviest job on shared machines: lowest priority.
    nice -n 19 bash "$here/kernel.sh" "$tarball" "$cache/build-$kernel_key" "$kernel" >&2
    rm -rf "$cache/build-$kernel_key"
    echo "build.sh: kernel built in $((SECONDS - start)) s" >&2
fi

if [ ! -f "$initramfs" ]; then
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    mkdir -p "$root"/{bin,dev,proc,sys,tmp,root}
    cp "$busybox" "$root/bin/busybox"
    # Links made here, not by `busybox --install` at boot: each system call costs ~0.4 ms there.
    for applet in $("$busybox" --list); do
        [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
    done
    for program in "$here"/initramfs/*.c; do
        gcc -O2 -static -s -Wall -Werror -o "$root/bin/$(basename "$program" .c)" "$program"
    done
    for script in "$here"/initramfs/*.sh; do
        install -m 0755 "$script" "$root/bin/$(basename "$script" .sh)"
    done
    mv "$root/bin/init" "$root/init"
    # Equal inputs, equal archive.
    find "$root" -exec touch -h -d @0 {} +
    mkdir -p "$(dirname "$initramfs")"
    "$here/mkcpio.sh" "$root" > "$initramfs.tmp"
    mv "$initramfs.tmp" "$initramfs"
fi

echo "kernel=$kernel"
echo "initramfs=$initramfs"
