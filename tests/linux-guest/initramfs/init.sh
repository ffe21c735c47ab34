#!/bin/sh
# /init of the Linux test guest: mount what the tests read, say so on COM1, and give the console
# a shell with job control. Shell built-ins where possible: starting a process costs seconds when
# guest kernel code is emulated (page faults and ~0.4 ms per system call).
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
read -r uptime idle < /proc/uptime
echo "bhyve-rs linux guest: ready uptime=$uptime"
export PS1='linux# ' ENV=/bin/shell-functions
exec setsid cttyhack sh
