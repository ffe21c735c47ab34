#!/usr/bin/env bash
# Builds the test guest's kernel: Debian's linux-source-6.12, the patch series in patches/, and
# kernel.config on top of `make tinyconfig`. Called by build.sh, which decides whether a build is
# needed and where it goes.
# usage: kernel.sh SOURCE_TARBALL BUILD_DIR OUT_VMLINUX
# Everything that changes the result is an input of build.sh's cache key: this file, the tarball,
# patches/, kernel.config and the compiler.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tarball=$1 build=$2 out=$3

rm -rf "$build"
mkdir -p "$build"
tar -xJf "$tarball" -C "$build" --strip-components=1
cd "$build"
while read -r patch; do
    case "$patch" in '' | '#'*) continue ;; esac
    patch -p1 --quiet --forward < "$here/patches/$patch"
done < "$here/patches/series"

# The build's date, user and host end up in the image; fix them so equal inputs give equal output.
export KBUILD_BUILD_USER=bhyve-rs KBUILD_BUILD_HOST=bhyve-rs KBUILD_BUILD_VERSION=1
export KBUILD_BUILD_TIMESTAMP="2026-01-01 00:00:00 UTC"
make -s tinyconfig
./scripts/kconfig/merge_config.sh -m -Q .config "$here/kernel.config" >/dev/null
make -s olddefconfig
# merge_config reports options olddefconfig dropped (a dependency missing); fail instead, so the
# config cannot silently differ from kernel.config.
missing=0
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*) grep -qxF "$line" .config || { echo "kernel.sh: not in .config: $line" >&2; missing=1; } ;;
        '# CONFIG_'*' is not set')
            option=${line#\# }; option=${option%% *}
            ! grep -q "^$option=" .config || { echo "kernel.sh: still set: $option" >&2; missing=1; } ;;
    esac
done < "$here/kernel.config"
[ "$missing" -eq 0 ]

make -s -j"${JOBS:-2}" vmlinux
cp vmlinux "$out.tmp"
mv "$out.tmp" "$out"
