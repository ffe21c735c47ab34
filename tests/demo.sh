#!/usr/bin/env bash
# `make demo`: boot a guest with the release bhyve (built with snapshot support), as a user would
# type it, and show a snapshot round trip on its console: a live checkpoint while the guest keeps
# counting, a suspend (bhyve exits 0), and `bhyve -r` carrying on from where it stopped.
# On a host with hardware virtualization the guest is the Debian kernel of tests/linux-guest;
# elsewhere a stock kernel cannot run under KVM, and the console test guest of tests/guests is
# used instead.
set -euo pipefail
cd "$(dirname "$0")/.."
# The Makefile keeps release binaries with snapshots apart from those without.
bin_dir=${BHYVE_BIN_DIR:-target/snapshot/release}
bhyve=$bin_dir/bhyve
bhyvectl=$bin_dir/bhyvectl
for tool in "$bhyve" "$bhyvectl"; do
    [ -x "$tool" ] || { echo "demo: $tool is missing; run make demo" >&2; exit 1; }
done
if ! [ -r /dev/kvm ] || ! [ -w /dev/kvm ]; then
    echo "demo: /dev/kvm is not usable here; the guest cannot be booted" >&2
    exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/bhyve-demo.XXXXXX")
vm_pid=
feeder=
cleanup() {
    [ -n "$feeder" ] && exec {feeder}>&-
    [ -n "$vm_pid" ] && kill "$vm_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

# Start bhyve in the background with com1 on a FIFO (our keyboard) and its output both on the
# terminal and in $work/console.N.log (so the script can wait for lines). Sets vm_pid, feeder, log.
run=0
start_vm() {
    run=$((run + 1))
    log=$work/console.$run.log
    local fifo=$work/console.$run.in
    mkfifo "$fifo"
    : > "$log"
    "$@" < "$fifo" > >(tee -a "$log") 2>&1 &
    vm_pid=$!
    exec {feeder}> "$fifo"
}

send() { printf '%s' "$1" >&"$feeder"; }

# wait_for PATTERN SECONDS: until the current console log holds PATTERN (a grep -E regex).
wait_for() {
    local deadline=$((SECONDS + $2))
    until tr -d '\r' < "$log" | grep -qE "$1"; do
        if [ $SECONDS -ge $deadline ] || ! kill -0 "$vm_pid" 2>/dev/null; then
            echo
            echo "demo: gave up waiting for '$1' on the console" >&2
            exit 1
        fi
        sleep 0.1
    done
}

# numbers PREFIX [FILE...]: every N of the lines "PREFIX N" (default: the current log).
numbers() {
    local prefix=$1
    shift
    cat "${@:-$log}" | tr -d '\r' | sed -n "s/^$prefix\([0-9][0-9]*\)\$/\1/p"
}

# last_number PREFIX: the highest N printed so far. A line cut short by a suspend shows a prefix
# of the next number, which is always smaller, so the maximum is the last complete one.
last_number() { numbers "$1" | sort -n | tail -n1; }

# first_after PREFIX N: the first number above N in both runs' output joined, where a line the
# suspend cut in two is whole again.
first_after() {
    numbers "$1" "$work"/console.1.log "$work"/console.2.log | awk -v n="$2" '$1 > n { print; exit }'
}

wait_exit() {
    local status=0
    wait "$vm_pid" || status=$?
    vm_pid=
    exec {feeder}>&-
    feeder=
    return $status
}

ctl() {
    echo
    echo "demo: $bhyvectl --vm=demo --rundir=$work $*"
    local t0 t1
    t0=$(date +%s.%N)
    "$bhyvectl" --vm=demo --rundir="$work" "$@"
    t1=$(date +%s.%N)
    echo "demo: bhyvectl returned 0 after $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') s"
}

describe_file() {
    local size alloc
    size=$(stat -c %s "$1")
    alloc=$(( $(stat -c %b "$1") * $(stat -c %B "$1") ))
    echo "demo: $1: $((size >> 20)) MiB long, $((alloc >> 20)) MiB on disk (untouched memory is a hole)"
}

have_hw_virt() { grep -qwE 'vmx|svm' /proc/cpuinfo; }

# The console test guest: `count` prints "count N" every 100 ms until a key arrives.
console_demo() {
    local guest
    guest=$(tests/guests/build.sh)
    local vm=("$bhyve" -c 1 -m 256M -s 0,hostbridge -s 31,lpc -l com1,stdio
        -o boot.kernel="$guest" -o rundir="$work" demo)
    echo "demo: ${vm[*]}"
    start_vm "${vm[@]}"
    wait_for '^> ' 60
    send 'memfill 64 42'$'\r'
    wait_for '^memfill 64 MiB' 30
    echo
    echo "demo: starting the guest's count (one line every 100 ms)"
    send 'count'$'\r'
    wait_for '^count 10$' 30

    ctl --checkpoint="$work/live.ckp"
    describe_file "$work/live.ckp"
    local at_checkpoint
    at_checkpoint=$(last_number 'count ')
    sleep 1
    echo "demo: the guest kept counting: count $at_checkpoint at the checkpoint, $(last_number 'count ') now"

    suspend_and_restore count
    wait_for "^count $((stopped_at + 10))\$" 30
    send $'\r'
    wait_for '^count stopped' 10
    local first
    first=$(first_after 'count ' "$stopped_at")
    echo
    echo "demo: the restored guest went on with count $first (it stopped at $stopped_at); no reboot"
    send 'memsum 64'$'\r'
    wait_for '^memsum 64 MiB' 30
    send 'halt'$'\r'
    local status=0
    wait_exit || status=$?
    echo
    echo "demo: bhyve exited with status $status (2 = the guest halted)"
    [ "$status" -eq 2 ]
}

# Suspend the VM with bhyvectl, check that bhyve exits 0, and resume it with bhyve -r. Sets
# stopped_at to the last "WORD N" line the guest printed before it was suspended.
suspend_and_restore() {
    local word=$1 status=0
    ctl --suspend="$work/demo.snap"
    wait_exit || status=$?
    stopped_at=$(last_number "$word ")
    echo
    echo "demo: bhyve exited with status $status (0 = suspended); the guest had printed $word $stopped_at"
    [ "$status" -eq 0 ] || exit 1
    describe_file "$work/demo.snap"

    echo "demo: $bhyve -r $work/demo.snap -o rundir=$work"
    start_vm "$bhyve" -r "$work/demo.snap" -o rundir="$work"
}

# The Debian guest: a shell loop prints "loop N" five times a second.
linux_demo() {
    tests/linux-guest/build.sh >/dev/null
    local cache=tests/guest/.cache
    local vm=("$bhyve" -c 1 -m 512M -s 0,hostbridge -s 31,lpc -l com1,stdio
        -o boot.kernel=$cache/vmlinuz -o boot.initrd=$cache/initramfs.cpio.gz
        -o "boot.cmdline=console=ttyS0 panic=-1" -o rundir="$work" demo)
    echo "demo: ${vm[*]}"
    start_vm "${vm[@]}"
    wait_for 'bhyve-rs linux guest: ready' 300
    sleep 1
    send 'mkdir -p /mnt/t; mount -t tmpfs tmpfs /mnt/t; dd if=/dev/urandom of=/mnt/t/data bs=1M count=32 2>/dev/null; md5sum /mnt/t/data'$'\n'
    wait_for '^[0-9a-f]{32} +/mnt/t/data' 60
    send '(i=0; while true; do i=$((i+1)); echo "loop $i"; sleep 0.2; done) &'$'\n'
    wait_for '^loop 10$' 30

    ctl --checkpoint="$work/live.ckp"
    describe_file "$work/live.ckp"
    suspend_and_restore loop
    wait_for "^loop $((stopped_at + 5))\$" 30
    send 'kill %1; md5sum /mnt/t/data'$'\n'
    wait_for '^[0-9a-f]{32} +/mnt/t/data' 30
    echo
    echo "demo: the loop went on with loop $(first_after 'loop ' "$stopped_at") after loop $stopped_at;"
    echo "demo: compare the tmpfs checksum above with the one from before the suspend"
    send 'poweroff -f'$'\n'
    status=0
    wait_exit || status=$?
    echo
    echo "demo: bhyve exited with status $status (1 = powered off)"
}

if have_hw_virt; then
    echo "demo: hardware virtualization present: booting the Debian guest of tests/linux-guest"
    linux_demo
else
    echo "demo: no vmx/svm on this host, so a stock Linux kernel cannot run under KVM here;"
    echo "demo: using the console test guest of tests/guests instead"
    console_demo
fi
