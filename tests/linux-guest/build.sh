#!/usr/bin/env bash
# Builds a small Linux guest for bhyve-rs from Debian packages only:
#   - the kernel of linux-image-cloud-amd64 (the real package its metapackage depends on),
#   - busybox-static for the userland,
#   - the virtio modules of that kernel,
# packed into an initramfs whose /init prints a ready line on the console and runs a shell.
#
# Output (in tests/guest/.cache, git-ignored): vmlinuz-<version>, initramfs-<version>.cpio.gz and
# the stable names vmlinuz and initramfs.cpio.gz pointing at them.
# Needs: apt-get (with package lists), dpkg-deb, gzip, xz. No root needed once lists exist.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=$(cd "$here/.." && pwd)/guest/.cache
mkdir -p "$cache/debs"
readonly READY_LINE="bhyve-rs linux guest: ready"

# The metapackage only depends on the versioned kernel package; fetch that one.
resolve_kernel() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}
kernel_pkg=$(resolve_kernel)
if [ -z "$kernel_pkg" ] && [ "$(id -u)" -eq 0 ]; then
    # A fresh machine may have no package lists yet.
    apt-get update -qq >&2
    kernel_pkg=$(resolve_kernel)
fi
if [ -z "$kernel_pkg" ]; then
    echo "build.sh: cannot resolve linux-image-cloud-amd64 (run apt-get update?)" >&2
    exit 1
fi
version=${kernel_pkg#linux-image-}

cd "$cache/debs"
for pkg in "$kernel_pkg" busybox-static; do
    if ! ls "${pkg}"_*.deb >/dev/null 2>&1; then
        apt-get download "$pkg"
    fi
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dpkg-deb -x "$(ls "$cache"/debs/"${kernel_pkg}"_*.deb | head -n1)" "$work/kernel"
dpkg-deb -x "$(ls "$cache"/debs/busybox-static_*.deb | head -n1)" "$work/busybox"

cp "$work/kernel/boot/vmlinuz-$version" "$cache/vmlinuz-$version"

# The initramfs tree.
root=$work/root
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,etc,lib/modules,var/log,var/run}
cp "$work/busybox/bin/busybox" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"

# virtio modules in load order; those built into this kernel are simply absent.
moddir=$work/kernel/lib/modules/$version/kernel
modules=(
    drivers/virtio/virtio_ring.ko
    drivers/virtio/virtio.ko
    drivers/virtio/virtio_pci_legacy_dev.ko
    drivers/virtio/virtio_pci_modern_dev.ko
    drivers/virtio/virtio_pci.ko
    drivers/block/virtio_blk.ko
    net/core/failover.ko
    drivers/net/net_failover.ko
    drivers/net/virtio_net.ko
    drivers/char/hw_random/virtio-rng.ko
    drivers/virtio/virtio_console.ko
    drivers/char/virtio_console.ko
    drivers/input/evdev.ko
    drivers/acpi/button.ko
)
: > "$root/lib/modules/order"
for m in "${modules[@]}"; do
    for candidate in "$moddir/$m" "$moddir/$m.xz" "$moddir/$m.zst"; do
        [ -f "$candidate" ] || continue
        name=$(basename "$m")
        case "$candidate" in
            *.xz) xz -dc "$candidate" > "$root/lib/modules/$name" ;;
            *.zst) zstd -qdc "$candidate" > "$root/lib/modules/$name" ;;
            *) cp "$candidate" "$root/lib/modules/$name" ;;
        esac
        echo "$name" >> "$root/lib/modules/order"
    done
done

cat > "$root/init" <<INIT
#!/bin/sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in \$(cat /lib/modules/order); do
    insmod /lib/modules/\$m 2>/dev/null
done
# The ACPI power button (bhyve presses it on SIGTERM) powers the guest off, as an init system's
# acpid would: busybox acpid runs /etc/acpi/PWRF/00000080 for it.
acpid -c /etc/acpi -l /var/log/acpid.log
echo "$READY_LINE" > /dev/ttyS0
echo "$READY_LINE"
exec setsid cttyhack sh
INIT
chmod 0755 "$root/init"
mkdir -p "$root/etc/acpi/PWRF"
printf '#!/bin/sh\necho "bhyve-rs linux guest: power button" > /dev/ttyS0\nexec poweroff -f\n' \
    > "$root/etc/acpi/PWRF/00000080"
chmod 0755 "$root/etc/acpi/PWRF/00000080"

"$here/mkcpio.sh" "$root" | gzip -9 > "$cache/initramfs-$version.cpio.gz"
ln -sf "vmlinuz-$version" "$cache/vmlinuz"
ln -sf "initramfs-$version.cpio.gz" "$cache/initramfs.cpio.gz"
echo "kernel:    $cache/vmlinuz-$version"
echo "initramfs: $cache/initramfs-$version.cpio.gz ($(wc -l < "$root/lib/modules/order") modules)"
