#!/usr/bin/env bash
# Builds the test guests for x86_64-unknown-none and prints the path of the console guest ELF.
# Safe to run concurrently: cargo serialises builds of the same target directory with its lock.
set -euo pipefail
cd "$(dirname "$0")"
# The outer build's flags and target directory must not leak into this one: the guest needs its
# own rustflags (.cargo/config.toml) and target.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_TARGET_DIR CARGO_BUILD_TARGET CARGO_BUILD_RUSTFLAGS
rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-none \
    || rustup target add x86_64-unknown-none >&2
cargo build --release --quiet --target x86_64-unknown-none --target-dir target >&2
echo "$PWD/target/x86_64-unknown-none/release/console"
