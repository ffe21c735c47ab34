//! AHCI end to end: the test guest's AHCI driver (tests/guests, `ahci`) first against QEMU's
//! `ich9-ahci` with `ide-hd` and `ide-cd`, the independent oracle, then against `bhyve` with
//! `ahci-hd` and `ahci-cd` and the same commands and expected output, checked against the host
//! files; then a snapshot taken while the guest streams writes through the controller.

#[path = "common/mod.rs"]
mod common;

use common::control::Scratch;
use common::disk::{disk_image, file_range, fnv, pattern, DISK_SECTORS};
use common::guest;
use common::{console_vm_command_with, kvm_usable, qemu_binary, qemu_command_with, vm_name};
use common::{Console, BOOT_TIMEOUT, COMMAND_TIMEOUT};
use std::path::{Path, PathBuf};

const CD_FRAMES: u64 = 16;

/// A CD image of 2048-byte frames, each a different splitmix64 pattern.
fn cd_image(scratch: &Scratch) -> PathBuf {
    let path = scratch.path("cd.iso");
    let data: Vec<u8> = (0..CD_FRAMES).flat_map(|f| pattern(1000 + f, 4)).collect();
    std::fs::write(&path, data).unwrap();
    path
}

fn qemu_with_ahci(disk: &Path, cd: &Path) -> Option<Console> {
    let qemu = qemu_binary()?;
    let hd = format!("if=none,id=d0,file={},format=raw", disk.display());
    let cd = format!(
        "if=none,id=c0,file={},format=raw,media=cdrom,readonly=on",
        cd.display()
    );
    let extra = [
        "-device",
        "ich9-ahci,id=ahci",
        "-drive",
        &hd,
        "-device",
        "ide-hd,drive=d0,bus=ahci.0",
        "-drive",
        &cd,
        "-device",
        "ide-cd,drive=c0,bus=ahci.1",
        "-no-reboot",
    ];
    let cmd = qemu_command_with(&qemu, guest::console_guest(), "", &extra);
    let mut vm = Console::spawn("qemu", cmd);
    vm.expect(guest::READY, BOOT_TIMEOUT);
    vm.expect_prompt(COMMAND_TIMEOUT);
    Some(vm)
}

fn bhyve_with_ahci(scratch: &Scratch, name: &str, disk: &str, cd: &Path) -> Console {
    let hd = format!("3,ahci-hd,{disk}");
    let cd = format!("4,ahci-cd,{}", cd.display());
    bhyve_with_slots(scratch, name, &["-s", &hd, "-s", &cd])
}

fn bhyve_with_slots(scratch: &Scratch, name: &str, slots: &[&str]) -> Console {
    let cmd = console_vm_command_with(
        Path::new(env!("CARGO_BIN_EXE_bhyve")),
        "256M",
        &scratch.0,
        name,
        slots,
    );
    let mut vm = Console::spawn("bhyve", cmd);
    vm.expect(guest::READY, BOOT_TIMEOUT);
    vm.expect_prompt(COMMAND_TIMEOUT);
    vm
}

/// What every implementation must answer: sizes, a write that lands in the host file, its
/// read back, an untouched range as the file has it, FLUSH, and CD frames as the image has
/// them.
fn exercise(vm: &mut Console, disk: &Path, cd: &Path) -> String {
    let info = vm.command("ahci info", COMMAND_TIMEOUT);
    let hd_line = info
        .iter()
        .find(|l| l.starts_with("ahci hd "))
        .unwrap_or_else(|| panic!("{info:?}"))
        .clone();
    assert!(
        hd_line.starts_with(&format!("ahci hd ok sectors {DISK_SECTORS} model '")),
        "{hd_line}"
    );
    assert!(
        info.iter()
            .any(|l| l == &format!("ahci cd ok last {} block 2048", CD_FRAMES - 1)),
        "{info:?}"
    );
    let written = pattern(42, 24);
    assert_eq!(
        vm.command_line("ahci write 8 24 42"),
        format!("ahci write 8 24 ok fnv {:#018x}", fnv(&written))
    );
    assert_eq!(vm.command_line("ahci flush"), "ahci flush ok");
    assert_eq!(
        file_range(disk, 8, 24, 512),
        written,
        "the host file holds the write"
    );
    assert_eq!(
        vm.command_line("ahci read 8 24"),
        format!("ahci read 8 24 ok fnv {:#018x}", fnv(&written))
    );
    // The same through native command queuing.
    let queued = pattern(7, 16);
    assert_eq!(
        vm.command_line("ahci qwrite 100 16 7"),
        format!("ahci qwrite 100 16 ok fnv {:#018x}", fnv(&queued))
    );
    assert_eq!(
        vm.command_line("ahci qread 96 24"),
        format!(
            "ahci qread 96 24 ok fnv {:#018x}",
            fnv(&file_range(disk, 96, 24, 512))
        )
    );
    assert_eq!(
        file_range(disk, 100, 16, 512),
        queued,
        "the host file holds the queued write"
    );
    let untouched = file_range(disk, 1000, 128, 512);
    assert_eq!(
        vm.command_line("ahci read 1000 128"),
        format!("ahci read 1000 128 ok fnv {:#018x}", fnv(&untouched))
    );
    let frames = file_range(cd, 3, 5, 2048);
    assert_eq!(
        vm.command_line("ahci cdread 3 5"),
        format!("ahci cdread 3 5 ok fnv {:#018x}", fnv(&frames))
    );
    hd_line
}

#[test]
fn ahci_driver_against_qemu() {
    let scratch = Scratch::new("ahci-qemu");
    let disk = disk_image(&scratch);
    let cd = cd_image(&scratch);
    let Some(mut vm) = qemu_with_ahci(&disk, &cd) else {
        return;
    };
    let hd = exercise(&mut vm, &disk, &cd);
    assert!(hd.contains("'QEMU HARDDISK'"), "{hd}");
}

#[test]
fn ahci_hd_and_cd_under_bhyve_answer_as_qemu_does() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("ahci-bhyve");
    let disk = disk_image(&scratch);
    let cd = cd_image(&scratch);
    let cd_before = std::fs::read(&cd).unwrap();
    let name = vm_name();
    let options = format!("{},model=E2E DISK", disk.display());
    let mut vm = bhyve_with_ahci(&scratch, &name, &options, &cd);
    let hd = exercise(&mut vm, &disk, &cd);
    assert!(hd.ends_with("model 'E2E DISK'"), "{hd}");
    // Past the end of the disk and of the CD: an error status for the guest, bhyve carries on.
    let line = vm.command_line("ahci read 2040 16");
    assert!(
        line.starts_with("ahci read 2040 16 error tfd 0x4"),
        "{line}"
    );
    let line = vm.command_line("ahci cdread 15 2");
    assert!(line.starts_with("ahci cdread 15 2 error tfd 0x5"), "{line}");
    assert_eq!(vm.command_line("ahci flush"), "ahci flush ok");
    assert_eq!(
        std::fs::read(&cd).unwrap(),
        cd_before,
        "the CD stays as it was"
    );
    vm.send_line("halt");
    assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
}

/// One controller with the disk on port 2 and the CD on port 5 (`hd:`/`cd:` syntax) answers the
/// same.
#[test]
fn one_ahci_controller_with_disk_and_cd_ports() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("ahci-ports");
    let disk = disk_image(&scratch);
    let cd = cd_image(&scratch);
    let name = vm_name();
    let ports = format!(
        "3,ahci,hd:,hd:,hd:{},ser=PORT2,cd:,cd:,cd:{}",
        disk.display(),
        cd.display()
    );
    let mut vm = bhyve_with_slots(&scratch, &name, &["-s", &ports]);
    let hd = exercise(&mut vm, &disk, &cd);
    assert!(hd.ends_with("model 'BHYVE SATA DISK'"), "{hd}");
    vm.send_line("halt");
    assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
}

/// A checkpoint and then a suspend while the guest rewrites and rereads its disk through the
/// controller in a loop: every round before and after checks, and the file holds the round the
/// guest was on.
#[cfg(feature = "bhyve_snapshot")]
#[test]
fn snapshots_while_the_guest_streams_writes_through_ahci() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("ahci-snap");
    let disk = disk_image(&scratch);
    let cd = cd_image(&scratch);
    let name = vm_name();
    let vm = bhyve_with_ahci(&scratch, &name, &disk.display().to_string(), &cd);
    let (mut vm, round) = common::disk::snapshot_while_streaming(&scratch, &name, vm, "ahci");
    assert_eq!(vm.command_line("ahci flush"), "ahci flush ok");
    assert_eq!(
        file_range(&disk, 0, 64, 512),
        pattern(round, 64),
        "round {round}"
    );
    // The CD came through the restore too.
    let frames = file_range(&cd, 0, 2, 2048);
    assert_eq!(
        vm.command_line("ahci cdread 0 2"),
        format!("ahci cdread 0 2 ok fnv {:#018x}", fnv(&frames))
    );
    vm.send_line("halt");
    assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
}
