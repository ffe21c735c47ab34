#!/usr/bin/env bash
# Installs the host tools the build and the tests use. Safe to run again; needs root for apt.
set -euo pipefail

# libslirp0: the slirp network backend loads it at run time (its tests skip without it).
packages=(mandoc nasm qemu-system-x86 acpica-tools xz-utils libslirp0)
# The Linux test guest (tests/linux-guest/build.sh): the kernel source, which Debian 12 ships in
# bookworm-security (the default sources have it), busybox for its user space, and what
# building a kernel and static test programs takes.
packages+=(linux-source-6.12 busybox-static gcc libc6-dev make bc bison flex libelf-dev libssl-dev)
# pip installs zig and cargo-zigbuild below; Debian's python3 comes without it.
python3 -m pip --version >/dev/null 2>&1 || packages+=(python3 python3-pip)
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

# zig from PyPI links the FreeBSD binaries (through cargo-zigbuild) against FreeBSD 14's libc and
# ships the FreeBSD headers the vmm-sys ABI probe is compiled against. Pinned, so the headers the
# probe reads change only on purpose.
zig_packages=(ziglang==0.17.1 cargo-zigbuild==0.24.1)
if ! python3 - "${zig_packages[@]}" <<'EOF'
import importlib.metadata, sys
for pinned in sys.argv[1:]:
    name, version = pinned.split("==")
    try:
        if importlib.metadata.version(name) != version:
            sys.exit(1)
    except importlib.metadata.PackageNotFoundError:
        sys.exit(1)
EOF
then
    # Debian marks its Python as externally managed; these two packages bring only their own files.
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --disable-pip-version-check \
        --root-user-action=ignore "${zig_packages[@]}"
fi
