#!/usr/bin/env bash
# `make demo`: boot the console test guest with the release bhyve, as a user would type it, feed
# it a few commands on com1 and show what the guest answers. The guest halts at the end, so
# bhyve exits 2 (halt).
set -euo pipefail
cd "$(dirname "$0")/.."
bhyve=target/release/bhyve
[ -x "$bhyve" ] || { echo "demo: $bhyve is missing; run make first" >&2; exit 1; }
if ! [ -r /dev/kvm ] || ! [ -w /dev/kvm ]; then
    echo "demo: /dev/kvm is not usable here; the guest cannot be booted" >&2
    exit 1
fi
guest=$(tests/guests/build.sh)
echo "demo: $bhyve -c 1 -m 256M -s 0,hostbridge -s 31,lpc -l com1,stdio -o boot.kernel=$guest demo"
status=0
{
    sleep 1
    printf 'help\r'; sleep 0.3
    printf 'counter\r'; sleep 0.2
    printf 'counter\r'; sleep 0.2
    printf 'memfill 64 42\r'; sleep 1
    printf 'cmos\r'; sleep 0.2
    printf 'pci\r'; sleep 0.2
    printf 'ticks 500\r'; sleep 1
    printf 'halt\r'
} | "$bhyve" -c 1 -m 256M -s 0,hostbridge -s 31,lpc -l com1,stdio \
    -o boot.kernel="$guest" demo || status=$?
echo
echo "demo: bhyve exited with status $status (2 = the guest halted)"
[ "$status" -eq 2 ]
