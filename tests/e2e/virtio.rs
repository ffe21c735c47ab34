//! virtio-blk and virtio-rnd end to end: the test guest's legacy virtio driver (tests/guests,
//! `vblk`, `vrnd`) first against QEMU's legacy devices, the independent oracle, then against
//! `bhyve` with the same commands and the same expected output, checked against the host file.

#[path = "common/mod.rs"]
mod common;

use common::control::Scratch;
use common::guest::{self, splitmix64};
use common::{console_vm_command_with, kvm_usable, qemu_binary, qemu_command_with, vm_name};
use common::{Console, BOOT_TIMEOUT, COMMAND_TIMEOUT};
use std::path::{Path, PathBuf};
#[cfg(feature = "bhyve_snapshot")]
use std::time::Duration;

const DISK_SECTORS: u64 = 2048;
const SERIAL: &str = "VIRTIO-E2E-7";

/// `sectors` sectors of the guest's fill pattern for `seed`: splitmix64 words, little endian.
fn pattern(seed: u64, sectors: u64) -> Vec<u8> {
    let mut state = seed;
    (0..sectors * 512 / 8)
        .flat_map(|_| splitmix64(&mut state).to_le_bytes())
        .collect()
}

/// The guest's checksum: FNV-1a 64 over little-endian 64-bit words.
fn fnv(bytes: &[u8]) -> u64 {
    bytes
        .chunks_exact(8)
        .fold(0xcbf2_9ce4_8422_2325u64, |h, w| {
            (h ^ u64::from_le_bytes(w.try_into().unwrap())).wrapping_mul(0x0000_0100_0000_01b3)
        })
}

/// A 1 MiB disk whose sector n holds the byte n % 251.
fn disk_image(scratch: &Scratch) -> PathBuf {
    let path = scratch.path("disk.img");
    let data: Vec<u8> = (0..DISK_SECTORS * 512)
        .map(|i| ((i / 512) % 251) as u8)
        .collect();
    std::fs::write(&path, data).unwrap();
    path
}

fn sectors(path: &Path, first: u64, count: u64) -> Vec<u8> {
    let data = std::fs::read(path).unwrap();
    data[(first * 512) as usize..((first + count) * 512) as usize].to_vec()
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
    let written = pattern(42, 16);
    assert_eq!(
        vm.command_line("vblk write 8 16 42"),
        format!("vblk write 8 16 status 0 fnv {:#018x}", fnv(&written))
    );
    assert_eq!(vm.command_line("vblk flush"), "vblk flush status 0");
    assert_eq!(
        sectors(image, 8, 16),
        written,
        "the host file holds the write"
    );
    assert_eq!(
        vm.command_line("vblk read 8 16"),
        format!("vblk read 8 16 status 0 fnv {:#018x}", fnv(&written))
    );
    let untouched = sectors(image, 1000, 128);
    assert_eq!(
        vm.command_line("vblk read 1000 128"),
        format!("vblk read 1000 128 status 0 fnv {:#018x}", fnv(&untouched))
    );
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
    use common::control::{ctl, suspend};
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("virtio-snap");
    let image = disk_image(&scratch);
    let name = vm_name();
    let mut vm = bhyve_with_virtio(&scratch, &name, &image.display().to_string());
    vm.send_line("vblk stream 64");
    vm.expect("vblk stream round 100\n", COMMAND_TIMEOUT);
    let live = scratch.path("live.snap");
    let (code, err) = ctl(
        &scratch.0,
        &name,
        &[format!("--checkpoint={}", live.display())],
    );
    assert_eq!(code, 0, "bhyvectl --checkpoint failed: {err}");
    let next = last_round(&vm.transcript()) + 200;
    vm.expect(&format!("vblk stream round {next}\n"), COMMAND_TIMEOUT);

    let file = scratch.path("suspend.snap");
    suspend(&scratch, &name, &mut vm, &file);
    let suspended_at = last_round(&vm.transcript());
    let mut cmd = common::bhyve();
    cmd.arg("-r").arg(&file);
    cmd.arg("-o").arg(format!("rundir={}", scratch.0.display()));
    let mut vm = Console::spawn("bhyve -r", cmd);
    vm.expect(
        &format!("vblk stream round {}\n", suspended_at + 200),
        Duration::from_secs(60),
    );
    vm.send("\n");
    let stopped = vm.expect("errors ", COMMAND_TIMEOUT);
    let line = vm.expect("\n", COMMAND_TIMEOUT);
    assert!(
        !vm.transcript().contains(guest::READY),
        "the guest rebooted"
    );
    assert_eq!(
        line.trim(),
        "0",
        "stream errors after restore: {stopped}{line}"
    );
    let round: u64 = stopped
        .rsplit("stopped round ")
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{stopped}"));
    vm.expect_prompt(COMMAND_TIMEOUT);
    assert_eq!(vm.command_line("vblk flush"), "vblk flush status 0");
    assert_eq!(sectors(&image, 0, 64), pattern(round, 64), "round {round}");
    // The entropy device came through the restore too.
    let entropy = vm.command_line("vrnd 16");
    assert!(entropy.starts_with("vrnd 16 bytes "), "{entropy}");
    vm.send_line("halt");
    assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
}

#[cfg(feature = "bhyve_snapshot")]
fn last_round(transcript: &str) -> u64 {
    transcript
        .lines()
        .rev()
        .filter_map(|l| l.trim().strip_prefix("vblk stream round "))
        .find_map(|n| n.parse().ok())
        .unwrap_or(0)
}
