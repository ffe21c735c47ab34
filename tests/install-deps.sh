#!/usr/bin/env bash
# Installs the host tools the build and the tests use. Safe to run again; needs root for apt.
set -euo pipefail

packages=(mandoc nasm qemu-system-x86 acpica-tools xz-utils)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-deps: need root to install: ${missing[*]}" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

rustup component add rustfmt clippy >/dev/null 2>&1 || true
rustup target add x86_64-unknown-freebsd x86_64-unknown-none
