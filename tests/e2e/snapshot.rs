//! Snapshots end to end: `bhyvectl --checkpoint/--suspend` against a running `bhyve`, then
//! `bhyve -r` resuming the console test guest where it stopped. Needs /dev/kvm (skips with a
//! message without it, fails if BHYVE_RS_REQUIRE_KVM=1).

#[path = "common/mod.rs"]
mod common;

use common::guest;
use common::{kvm_usable, run_to_exit, vm_name, Console, BOOT_TIMEOUT, COMMAND_TIMEOUT};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const SAVE_TIMEOUT: Duration = Duration::from_secs(60);

/// A scratch directory for control sockets and snapshot files, removed afterwards.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("bhyve-rs-{tag}-{}", vm_name()));
        std::fs::create_dir_all(&dir).expect("create scratch directory");
        Scratch(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn bhyvectl() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_bhyve")).with_file_name("bhyvectl")
}

fn boot(rundir: &Path, name: &str, memory: &str) -> Console {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bhyve"));
    cmd.args([
        "-c",
        "1",
        "-m",
        memory,
        "-s",
        "0,hostbridge",
        "-s",
        "31,lpc",
    ]);
    cmd.args(["-l", "com1,stdio"]);
    cmd.arg("-o")
        .arg(format!("boot.kernel={}", guest::console_guest().display()));
    cmd.arg("-o").arg(format!("rundir={}", rundir.display()));
    cmd.arg(name);
    let mut console = Console::spawn("bhyve", cmd);
    console.expect(guest::READY, BOOT_TIMEOUT);
    console.expect_prompt(COMMAND_TIMEOUT);
    console
}

fn resume(rundir: &Path, file: &Path) -> Console {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bhyve"));
    cmd.arg("-r").arg(file);
    cmd.arg("-o").arg(format!("rundir={}", rundir.display()));
    Console::spawn("bhyve -r", cmd)
}

/// Run bhyvectl with `args` against VM `name`; returns (exit code, stderr).
fn ctl(rundir: &Path, name: &str, args: &[String]) -> (i32, String) {
    let out = Command::new(bhyvectl())
        .arg(format!("--vm={name}"))
        .arg(format!("--rundir={}", rundir.display()))
        .args(args)
        .output()
        .expect("run bhyvectl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn counter(vm: &mut Console) -> u64 {
    let line = vm.command_line("counter");
    line.strip_prefix("counter ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected counter line {line:?}"))
}

#[test]
fn checkpoint_keeps_running_and_suspend_resume_cycles_continue_the_guest() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("cycle");
    let name = vm_name();
    let mut vm = boot(&scratch.0, &name, "256M");
    assert_eq!(counter(&mut vm), 1);
    let fill = vm.command_line("memfill 64 1234");
    assert_eq!(fill, guest::memfill_line(64, 1234));

    let checkpoint = scratch.path("running.snap");
    let (code, err) = ctl(
        &scratch.0,
        &name,
        &[format!("--checkpoint={}", checkpoint.display())],
    );
    assert_eq!(code, 0, "bhyvectl --checkpoint failed: {err}");
    assert!(checkpoint.exists());
    // The VM carries on after a checkpoint.
    assert_eq!(counter(&mut vm), 2);

    // The counter stood at 2 when the first suspend was taken.
    for (cycle, expected) in (0..3).zip(3u64..) {
        let file = scratch.path(&format!("suspend-{cycle}.snap"));
        let (code, err) = ctl(
            &scratch.0,
            &name,
            &["--suspend".to_string(), file.display().to_string()],
        );
        assert_eq!(code, 0, "bhyvectl --suspend failed: {err}");
        let status = vm.wait_exit(SAVE_TIMEOUT);
        assert_eq!(status.code(), Some(0), "bhyve after --suspend: {status:?}");
        assert!(
            !scratch.path(&name).exists(),
            "control socket left behind after exit"
        );

        vm = resume(&scratch.0, &file);
        // No reboot: no banner, and the counter goes on from where it stopped.
        assert_eq!(counter(&mut vm), expected, "cycle {cycle}");
        let sum = vm.command_line("memsum 64");
        assert_eq!(
            sum,
            guest::memfill_line(64, 1234).replace("memfill 64 MiB seed 1234", "memsum 64 MiB"),
            "cycle {cycle}: guest memory changed across suspend/resume"
        );
        assert!(
            !vm.transcript().contains(guest::READY),
            "cycle {cycle}: the guest rebooted"
        );
    }
    // Timer interrupts still arrive after the last restore.
    let lines = vm.command("ticks 300", COMMAND_TIMEOUT);
    assert!(
        lines.iter().any(|l| l.starts_with("ticks done ")),
        "{lines:?}"
    );
    vm.send_line("halt");
    assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
}

#[test]
fn snapshot_of_a_large_guest_stores_only_the_memory_it_touched() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("sparse");
    let name = vm_name();
    let mut vm = boot(&scratch.0, &name, "1G");
    vm.command_line("memfill 64 99");
    let file = scratch.path("big.snap");
    let (code, err) = ctl(
        &scratch.0,
        &name,
        &[format!("--suspend={}", file.display())],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(vm.wait_exit(SAVE_TIMEOUT).code(), Some(0));
    let meta = std::fs::metadata(&file).expect("snapshot exists");
    assert!(meta.len() > 1 << 30, "logical size {} < 1 GiB", meta.len());
    let allocated = meta.blocks() * 512;
    assert!(
        allocated < 100 << 20,
        "a 1 GiB guest that touched 64 MiB used {allocated} bytes on disk"
    );
    let mut vm = resume(&scratch.0, &file);
    assert_eq!(
        vm.command_line("memsum 64"),
        guest::memfill_line(64, 99).replace("memfill 64 MiB seed 99", "memsum 64 MiB")
    );
}

#[test]
fn failed_checkpoints_leave_the_vm_running_and_no_file_behind() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("errors");
    let name = vm_name();
    let mut vm = boot(&scratch.0, &name, "256M");

    let missing_dir = scratch.path("no/such/dir/x.snap");
    let (code, err) = ctl(
        &scratch.0,
        &name,
        &[format!("--checkpoint={}", missing_dir.display())],
    );
    assert_ne!(code, 0);
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let (code, err) = ctl(
        &scratch.0,
        "no-such-vm",
        &[format!("--checkpoint={}", scratch.path("x.snap").display())],
    );
    assert_ne!(code, 0);
    assert!(err.contains("no-such-vm"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!scratch.path("x.snap").exists());

    assert_eq!(counter(&mut vm), 1);
    vm.send_line("halt");
    assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
}

#[test]
fn corrupted_or_truncated_snapshots_are_refused_with_one_line() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("corrupt");
    let name = vm_name();
    let mut vm = boot(&scratch.0, &name, "256M");
    let file = scratch.path("good.snap");
    let (code, err) = ctl(
        &scratch.0,
        &name,
        &[format!("--suspend={}", file.display())],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(vm.wait_exit(SAVE_TIMEOUT).code(), Some(0));

    let bytes = std::fs::read(&file).expect("read snapshot");
    let truncated = scratch.path("truncated.snap");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write");
    let mut flipped = bytes.clone();
    let last = flipped.len() - 200;
    flipped[last] ^= 0x55;
    let corrupted = scratch.path("corrupted.snap");
    std::fs::write(&corrupted, &flipped).expect("write");

    for bad in [&truncated, &corrupted, &scratch.path("missing.snap")] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bhyve"));
        cmd.arg("-r").arg(bad);
        cmd.arg("-o").arg(format!("rundir={}", scratch.0.display()));
        let (status, _out, err) = run_to_exit(cmd, COMMAND_TIMEOUT);
        assert_ne!(status.code(), Some(0), "{}: {err}", bad.display());
        assert_eq!(err.trim().lines().count(), 1, "{}: {err}", bad.display());
        assert!(err.starts_with("bhyve: "), "{err}");
    }
}
