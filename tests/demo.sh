#!/usr/bin/env bash
# `make demo`: boot a guest with the release bhyve (built with snapshot support), as a user would
# type it, and show a snapshot round trip on its console: a live checkpoint while the guest keeps
# counting, a suspend (bhyve exits 0), and `bhyve -r` carrying on from where it stopped.
# When tests/linux-guest/build.sh has built it, the guest is Linux; otherwise the console test
# guest of tests/guests.
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
    if [ -n "$vm_pid" ] && kill "$vm_pid" 2>/dev/null; then
        # SIGTERM presses the power button, which the Linux guest's shell does not answer.
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$vm_pid" 2>/dev/null || break; sleep 0.3; done
        kill -KILL "$vm_pid" 2>/dev/null || true
    fi
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

# The Linux guest of tests/linux-guest (boots in about a minute here): a shell loop prints
# "loop N" five times a second, next to a file in a tmpfs whose checksum the host computes too.
linux_demo() {
    # Generous waits: every process the guest starts costs seconds of emulated kernel code, many
    # more on a busy machine.
    local vm=("$bhyve" -c 1 -m 256M -u -H -s 0,hostbridge -s 31,lpc -l com1,stdio
        -o boot.kernel="$linux_kernel" -o boot.initrd="$linux_initramfs"
        -o "boot.cmdline=$(linux_cmdline)" -o rundir="$work" demo)
    echo "demo: ${vm[*]}"
    local t0=$SECONDS
    start_vm "${vm[@]}"
    wait_for 'linux# ' 900
    echo
    echo "demo: Linux reached its shell in $((SECONDS - t0)) s (its kernel code is emulated here)"
    send 'seq 50000 > /tmp/data; md5sum /tmp/data'$'\n'
    wait_for '^[0-9a-f]{32} +/tmp/data' 600
    local host_sum
    host_sum=$(seq 50000 | md5sum | cut -d' ' -f1)
    echo "demo: the host's md5sum of the same data: $host_sum"
    [ "$(tmpfs_sum)" = "$host_sum" ] || { echo "demo: the guest's checksum differs" >&2; exit 1; }
    send '(i=0; while true; do i=$((i+1)); echo "loop $i"; sleep 0.2; done) &'$'\n'
    wait_for '^loop 10$' 300

    ctl --checkpoint="$work/live.ckp"
    describe_file "$work/live.ckp"
    suspend_and_restore loop
    wait_for "^loop $((stopped_at + 5))\$" 300
    send 'kill %1; md5sum /tmp/data'$'\n'
    wait_for '^[0-9a-f]{32} +/tmp/data' 600
    echo
    echo "demo: the loop went on with loop $(first_after 'loop ' "$stopped_at") after loop $stopped_at"
    [ "$(tmpfs_sum)" = "$host_sum" ] || { echo "demo: the restored checksum differs" >&2; exit 1; }
    echo "demo: the tmpfs file still has the checksum $host_sum"
    send 'poweroff -f'$'\n'
    status=0
    wait_exit || status=$?
    echo
    echo "demo: bhyve exited with status $status (1 = powered off)"
    [ "$status" -eq 1 ]
}

# The last md5sum of /tmp/data the current console log shows.
tmpfs_sum() { tr -d '\r' < "$log" | sed -n 's|^\([0-9a-f]\{32\}\)  */tmp/data$|\1|p' | tail -n1; }

# The kernel command line the tests boot the Linux guest with.
linux_cmdline() { grep -v '^#' tests/linux-guest/cmdline; }

if located=$(bash tests/linux-guest/build.sh --locate 2>"$work/locate.err"); then
    linux_kernel=$(sed -n 's/^kernel=//p' <<<"$located")
    linux_initramfs=$(sed -n 's/^initramfs=//p' <<<"$located")
    echo "demo: booting the Linux guest of tests/linux-guest ($linux_kernel)"
    linux_demo
else
    echo "demo: $(cat "$work/locate.err")"
    echo "demo: using the console test guest of tests/guests instead (make linux-guest builds Linux)"
    console_demo
fi
