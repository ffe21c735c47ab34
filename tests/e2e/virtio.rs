//! virtio-blk and virtio-rnd end to end: the test guest's legacy virtio driver (tests/guests,
//! `vblk`, `vrnd`) first against QEMU's legacy devices, the independent oracle, then against
//! `bhyve` with the same commands and the same expected output, checked against the host file.

#[path = "common/mod.rs"]
mod common;

use common::control::Scratch;
use common::disk::{disk_image, file_range, fnv, pattern, write_flush_read, DISK_SECTORS};
use common::guest;
use common::{console_vm_command_with, kvm_usable, qemu_binary, qemu_command_with, vm_name};
use common::{Console, BOOT_TIMEOUT, COMMAND_TIMEOUT};
use std::path::Path;

const SERIAL: &str = "VIRTIO-E2E-7";

fn sectors(path: &Path, first: u64, count: u64) -> Vec<u8> {
    file_range(path, first, count, 512)
}

fn qemu_with_virtio(image: &Path, readonly: bool) -> Option<Console> {
    let qemu = qemu_binary()?;
    let drive = format!(
        "if=none,id=vd0,file={},format=raw{}",
        image.display(),
        if readonly { ",readonly=on" } else { "" }
    );
    let device = format!("virtio-blk-pci,disable-modern=on,drive=vd0,serial={SERIAL}");
    let extra = [
        "-drive",
        &drive,
        "-device",
        &device,
        "-device",
        "virtio-rng-pci,disable-modern=on",
        "-no-reboot",
    ];
    let cmd = qemu_command_with(&qemu, guest::console_guest(), "", &extra);
    let mut vm = Console::spawn("qemu", cmd);
    vm.expect(guest::READY, BOOT_TIMEOUT);
    vm.expect_prompt(COMMAND_TIMEOUT);
    Some(vm)
}

fn bhyve_with_virtio(scratch: &Scratch, name: &str, disk_options: &str) -> Console {
    let disk = format!("3,virtio-blk,{}", disk_options);
    let cmd = console_vm_command_with(
        Path::new(env!("CARGO_BIN_EXE_bhyve")),
        "256M",
        &scratch.0,
        name,
        &["-s", &disk, "-s", "4,virtio-rnd"],
    );
    let mut vm = Console::spawn("bhyve", cmd);
    vm.expect(guest::READY, BOOT_TIMEOUT);
    vm.expect_prompt(COMMAND_TIMEOUT);
    vm
}

/// What every implementation must answer: capacity, a write that lands in the host file, its
/// read back, an untouched range as the file has it, FLUSH, GET_ID and entropy.
fn exercise(vm: &mut Console, image: &Path) {
    let info = vm.command_line("vblk info");
    assert!(
        info.starts_with(&format!("vblk capacity {DISK_SECTORS} ")),
        "{info}"
    );
    write_flush_read(vm, image, "vblk", "status 0", 16);
    assert_eq!(
        vm.command_line("vblk id"),
        format!("vblk id status 0 '{SERIAL}'")
    );
    let first = vm.command_line("vrnd 32");
    let second = vm.command_line("vrnd 32");
    for line in [&first, &second] {
        let hex = line
            .strip_prefix("vrnd 32 bytes ")
            .unwrap_or_else(|| panic!("{line}"));
        assert_eq!(hex.len(), 64, "{line}");
        assert_ne!(hex, "0".repeat(64), "{line}");
    }
    assert_ne!(first, second, "entropy repeats");
}

#[test]
fn legacy_virtio_driver_against_qemu() {
    let scratch = Scratch::new("virtio-qemu");
    let image = disk_image(&scratch);
    let Some(mut vm) = qemu_with_virtio(&image, false) else {
        return;
    };
    exercise(&mut vm, &image);
}

#[test]
fn virtio_blk_and_rnd_under_bhyve_answer_as_qemu_does() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("virtio-bhyve");
    let image = disk_image(&scratch);
    let name = vm_name();
    let options = format!("{},ser={SERIAL}", image.display());
    let mut vm = bhyve_with_virtio(&scratch, &name, &options);
    exercise(&mut vm, &image);
    let info = vm.command_line("vblk info");
    // bhyve's values: 126 segments, 512-byte blocks, SEG_MAX|BLK_SIZE|FLUSH|TOPOLOGY
    // accepted, 128 entries.
    assert_eq!(
        info,
        format!("vblk capacity {DISK_SECTORS} seg_max 126 blk_size 512 features 0x00000644 queue 128 isr 0")
    );
    // Past the end of the disk: an I/O error for the guest, bhyve carries on.
    assert_eq!(
        vm.command_line("vblk read 2040 16"),
        format!(
            "vblk read 2040 16 status 1 fnv {:#018x}",
            fnv(&[0u8; 16 * 512])
        )
    );
    assert_eq!(vm.command_line("vblk flush"), "vblk flush status 0");
    vm.send_line("halt");
    assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
}

#[test]
fn a_read_only_disk_refuses_writes() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("virtio-ro");
    let image = disk_image(&scratch);
    let before = std::fs::read(&image).unwrap();
    let name = vm_name();
    let mut vm = bhyve_with_virtio(&scratch, &name, &format!("{},ro", image.display()));
    let line = vm.command_line("vblk write 0 8 5");
    assert!(line.starts_with("vblk write 0 8 status 1 "), "{line}");
    assert_eq!(
        vm.command_line("vblk read 0 8"),
        format!(
            "vblk read 0 8 status 0 fnv {:#018x}",
            fnv(&before[..8 * 512])
        )
    );
    assert_eq!(std::fs::read(&image).unwrap(), before);
    vm.send_line("halt");
    assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
}

#[test]
fn flushed_writes_survive_kill_9() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("virtio-kill");
    let image = disk_image(&scratch);
    let name = vm_name();
    let mut vm = bhyve_with_virtio(&scratch, &name, &image.display().to_string());
    vm.command_line("vblk write 64 128 77");
    assert_eq!(vm.command_line("vblk flush"), "vblk flush status 0");
    vm.kill().unwrap();
    assert_eq!(sectors(&image, 64, 128), pattern(77, 128));
}

/// A checkpoint and then a suspend while the guest rewrites and rereads its disk in a loop:
/// every round before and after checks, and the file holds the round the guest was on.
#[cfg(feature = "bhyve_snapshot")]
#[test]
fn snapshots_while_the_guest_streams_writes_to_its_disk() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("virtio-snap");
    let image = disk_image(&scratch);
    let name = vm_name();
    let vm = bhyve_with_virtio(&scratch, &name, &image.display().to_string());
    let (mut vm, round) = common::disk::snapshot_while_streaming(&scratch, &name, vm, "vblk");
    assert_eq!(vm.command_line("vblk flush"), "vblk flush status 0");
    assert_eq!(sectors(&image, 0, 64), pattern(round, 64), "round {round}");
    // The entropy device came through the restore too.
    let entropy = vm.command_line("vrnd 16");
    assert!(entropy.starts_with("vrnd 16 bytes "), "{entropy}");
    vm.send_line("halt");
    assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
}
