#!/usr/bin/env bash
# Writes a "newc" cpio archive of directory $1 to stdout (what the kernel's initramfs unpacker
# reads), without needing cpio(1). Owners become root; directories, regular files and symlinks
# are supported.
set -euo pipefail
root=$1
cd "$root"
ino=1

pad4() { # bytes already written ($1) -> NUL padding to a multiple of 4
    local n=$(( (4 - $1 % 4) % 4 ))
    [ "$n" -eq 0 ] || head -c "$n" /dev/zero
}

entry() { # name mode(hex) size mtime
    local name=$1 mode=$2 size=$3 mtime=$4
    local namesize=$(( ${#name} + 1 ))
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%s\0' \
        "$ino" "$mode" 0 0 1 "$mtime" "$size" 0 0 0 0 "$namesize" 0 "$name"
    pad4 $(( 110 + namesize ))
    ino=$((ino + 1))
}

find . -mindepth 1 | LC_ALL=C sort | while IFS= read -r path; do
    name=${path#./}
    mode=$((16#$(stat -c %f "$path")))
    mtime=$(stat -c %Y "$path")
    if [ -L "$path" ]; then
        target=$(readlink "$path")
        entry "$name" "$mode" "${#target}" "$mtime"
        printf '%s' "$target"
        pad4 "${#target}"
    elif [ -f "$path" ]; then
        size=$(stat -c %s "$path")
        entry "$name" "$mode" "$size" "$mtime"
        cat "$path"
        pad4 "$size"
    else
        entry "$name" "$mode" 0 "$mtime"
    fi
done
ino=0
entry "TRAILER!!!" 0 0 0
