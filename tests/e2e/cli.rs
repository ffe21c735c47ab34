//! Command-line errors of the real `bhyve` binary: one line on stderr, bhyve's exit codes.

#[path = "common/mod.rs"]
mod common;

use common::{bhyve_command, guest, run_to_exit};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(30);

fn assert_one_line_error(stderr: &str, mentions: &str) {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected a one-line error, got {stderr:?}");
    assert!(lines[0].starts_with("bhyve: "), "{stderr:?}");
    assert!(
        lines[0].contains(mentions),
        "{stderr:?} should mention {mentions:?}"
    );
}

#[test]
fn bad_memory_size_is_a_usage_error_exit_64() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bhyve"));
    cmd.args([
        "-c",
        "1",
        "-m",
        "lots",
        "-l",
        "com1,stdio",
        "-o",
        "boot.kernel=/dev/null",
        "vm0",
    ]);
    let (status, stdout, stderr) = run_to_exit(cmd, TIMEOUT);
    assert_eq!(status.code(), Some(64), "{status}: {stderr}");
    assert_one_line_error(&stderr, "lots");
    assert_eq!(stdout, "");
}

#[test]
fn unknown_option_prints_usage_and_exits_1() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bhyve"));
    cmd.args(["-Z", "vm0"]);
    let (status, stdout, stderr) = run_to_exit(cmd, TIMEOUT);
    assert_eq!(status.code(), Some(1), "{status}: {stderr}");
    assert!(stderr.to_lowercase().contains("usage"), "{stderr:?}");
    assert_eq!(stdout, "");
}

#[test]
fn missing_kernel_is_a_one_line_error_exit_4() {
    if !common::kvm_usable() {
        return;
    }
    let missing = Path::new("/nonexistent/bhyve-rs-e2e/vmlinux");
    let (status, stdout, stderr) = run_to_exit(bhyve_command(missing, ""), TIMEOUT);
    assert_eq!(status.code(), Some(4), "{status}: {stderr}");
    assert_one_line_error(&stderr, &missing.display().to_string());
    assert_eq!(stdout, "");
}

#[test]
fn guest_build_produces_an_elf_with_linux_and_pvh_entries() {
    let elf = std::fs::read(guest::console_guest()).expect("guest ELF readable");
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(elf[4], 2, "ELFCLASS64");
    let entry = u64::from_le_bytes(elf[24..32].try_into().unwrap_or_default());
    assert!(
        entry >= 0x20_0000,
        "e_entry {entry:#x} below the 2 MiB load address"
    );
    // The Xen PVH note (type 18, name "Xen") that QEMU boots through.
    let note = [4u32.to_le_bytes(), 8u32.to_le_bytes(), 18u32.to_le_bytes()].concat();
    assert!(
        elf.windows(note.len()).any(|w| w == note.as_slice()),
        "no PVH note"
    );
}
