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
    let mut cmd = common::bhyve();
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
    let mut cmd = common::bhyve();
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

/// A scratch directory for one test's files.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("bhyve-rs-e2e-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A one-page ROM assembled by nasm whose reset vector writes `byte` to COM1 and halts.
fn assemble_rom(dir: &Path, byte: u8) -> std::path::PathBuf {
    let source = dir.join("rom.asm");
    let rom = dir.join("rom.bin");
    std::fs::write(
        &source,
        format!(
            "bits 16\n\
             times 0xff0 db 0xff\n\
             reset:\n\
             mov dx, 0x3f8\n\
             mov al, {byte}\n\
             out dx, al\n\
             cli\n\
             hlt\n\
             times 0x1000 - ($ - $$) db 0xff\n"
        ),
    )
    .unwrap();
    let status = Command::new("nasm")
        .args(["-f", "bin", "-o"])
        .arg(&rom)
        .arg(&source)
        .status()
        .expect("nasm (tests/install-deps.sh installs it)");
    assert!(status.success(), "nasm failed");
    assert_eq!(std::fs::metadata(&rom).unwrap().len(), 4096);
    rom
}

fn bootrom_command(rom: &Path) -> Command {
    let mut cmd = common::bhyve();
    cmd.args(["-c", "1", "-m", "64M", "-s", "0,hostbridge", "-s", "31,lpc"]);
    cmd.args(["-l", "com1,stdio", "-l"]);
    cmd.arg(format!("bootrom,{}", rom.display()));
    cmd.arg(common::vm_name());
    cmd
}

#[test]
fn a_bootrom_vm_starts_at_the_reset_vector_and_halts_with_status_2() {
    if !common::kvm_usable() {
        return;
    }
    let dir = Scratch::new("bootrom");
    let rom = assemble_rom(&dir.0, b'R');
    let (status, stdout, stderr) = run_to_exit(bootrom_command(&rom), TIMEOUT);
    assert_eq!(status.code(), Some(2), "{status}: {stderr}");
    assert_eq!(stdout, "R");
}

#[test]
fn bootrom_files_are_checked_before_any_vm_exists() {
    let dir = Scratch::new("bootrom-errors");
    let missing = dir.0.join("missing.fd");
    let (status, stdout, stderr) = run_to_exit(bootrom_command(&missing), TIMEOUT);
    assert_eq!(status.code(), Some(4), "{status}: {stderr}");
    assert_one_line_error(&stderr, "Error opening bootrom");
    assert_eq!(stdout, "");

    let big = dir.0.join("big.fd");
    std::fs::write(&big, vec![0u8; (16 << 20) + 4096]).unwrap();
    let (status, _, stderr) = run_to_exit(bootrom_command(&big), TIMEOUT);
    assert_eq!(status.code(), Some(4), "{status}: {stderr}");
    assert_one_line_error(
        &stderr,
        &format!("ROM size {} is invalid", (16 << 20) + 4096),
    );
}
