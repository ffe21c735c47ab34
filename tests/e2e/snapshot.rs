//! Snapshots end to end: `bhyvectl --checkpoint/--suspend` against a running `bhyve`, then
//! `bhyve -r` resuming the console test guest where it stopped. Needs /dev/kvm (skips with a
//! message without it, fails if BHYVE_RS_REQUIRE_KVM=1).

#[path = "common/mod.rs"]
mod common;

use bhyve::snapshot::{reseal, SnapshotReader, SECTION_FLAG_MANDATORY};
use common::control::{bhyvectl, boot, cargo_build, counter, ctl, exchange, reply_error, Scratch};
use common::control::{suspend, SAVE_TIMEOUT};
use common::guest;
use common::{
    assert_within_ten_percent, console_vm_command, kvm_usable, notice, repo_root, run_to_exit,
    timed_ticks, vm_name, work_counts, Console, BOOT_TIMEOUT, COMMAND_TIMEOUT,
};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn resume(rundir: &Path, file: &Path) -> Console {
    let mut cmd = common::bhyve();
    cmd.arg("-r").arg(file);
    cmd.arg("-o").arg(format!("rundir={}", rundir.display()));
    Console::spawn("bhyve -r", cmd)
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

/// Let a restored `memchurn` guest run two more rounds, so every page was checked against the
/// round before it, then stop it: it must have found no page out of step.
fn churn_checks_clean(vm: &mut Console, what: &str) {
    for _ in 0..2 {
        vm.expect("memchurn round ", SAVE_TIMEOUT);
        vm.expect("\n", COMMAND_TIMEOUT);
    }
    vm.send("\n");
    let stopped = vm.expect(" errors ", COMMAND_TIMEOUT);
    let errors = vm.expect("\n", COMMAND_TIMEOUT);
    assert_eq!(
        errors.trim(),
        "0",
        "{what}: the restored memory is not the memory of one instant:\n{stopped}{errors}\n{}",
        vm.transcript()
    );
}

#[test]
fn a_live_checkpoint_of_a_guest_rewriting_its_memory_restores_one_instant() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("live");
    let name = vm_name();
    let mut cmd = console_vm_command(
        Path::new(env!("CARGO_BIN_EXE_bhyve")),
        "512M",
        &scratch.0,
        &name,
    );
    cmd.env("BHYVE_LOG", "info");
    let mut vm = Console::spawn("bhyve", cmd);
    vm.expect(guest::READY, BOOT_TIMEOUT);
    vm.expect_prompt(COMMAND_TIMEOUT);
    // 256 MiB rewritten round after round, each page checked against the round before.
    vm.send_line("memchurn 256");
    vm.expect("memchurn round 3\n", SAVE_TIMEOUT);

    let checkpoint = scratch.path("live.snap");
    let (code, err) = ctl(
        &scratch.0,
        &name,
        &[format!("--checkpoint={}", checkpoint.display())],
    );
    assert_eq!(code, 0, "bhyvectl --checkpoint failed: {err}");
    let log = vm.stderr();
    // The guest ran on and rewrote pages after they had been copied.
    let again = log
        .lines()
        .find_map(|l| {
            let rest = l.split("precopy: ").nth(1)?;
            rest.split(", ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or_else(|| panic!("no precopy line in bhyve's log:\n{log}"));
    assert!(again > 0, "no page was dirtied during the copy:\n{log}");
    assert!(log.contains("(live)"), "{log}");
    // The guest itself found nothing out of step before or during the checkpoint.
    vm.send("\n");
    vm.expect(" errors 0\n", COMMAND_TIMEOUT);
    vm.expect_prompt(COMMAND_TIMEOUT);
    vm.send_line("halt");
    assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));

    // Mapped from the file, and copied with every chunk checked against the ram-index: the
    // guest goes on churning from the instant of the stop and finds every page as it left it.
    let mut restored = resume(&scratch.0, &checkpoint);
    churn_checks_clean(&mut restored, "mapped restore");
    restored.send_line("halt");
    assert_eq!(restored.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
    let mut cmd = common::bhyve();
    cmd.arg("-r").arg(&checkpoint);
    cmd.args(["-o", "snapshot.restore=copy"]);
    cmd.arg("-o").arg(format!("rundir={}", scratch.0.display()));
    let mut copied = Console::spawn("bhyve -r (copy)", cmd);
    churn_checks_clean(&mut copied, "copied restore");
    copied.send_line("halt");
    assert_eq!(copied.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
}

#[test]
fn a_suspend_of_a_guest_rewriting_its_memory_restores_one_instant() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("churn-suspend");
    let name = vm_name();
    let mut vm = Console::spawn(
        "bhyve",
        console_vm_command(
            Path::new(env!("CARGO_BIN_EXE_bhyve")),
            "512M",
            &scratch.0,
            &name,
        ),
    );
    vm.expect(guest::READY, BOOT_TIMEOUT);
    vm.expect_prompt(COMMAND_TIMEOUT);
    // Large enough that the RAM goes out through several writer threads.
    vm.send_line("memchurn 384");
    vm.expect("memchurn round 3\n", SAVE_TIMEOUT);
    let file = scratch.path("churn.snap");
    let (code, err) = ctl(
        &scratch.0,
        &name,
        &[format!("--suspend={}", file.display())],
    );
    assert_eq!(code, 0, "bhyvectl --suspend failed: {err}");
    vm.wait_exit(COMMAND_TIMEOUT);
    assert!(
        !vm.transcript().contains("memchurn error"),
        "{}",
        vm.transcript()
    );

    let mut restored = resume(&scratch.0, &file);
    churn_checks_clean(&mut restored, "mapped restore");
    restored.send_line("halt");
    assert_eq!(restored.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
    let mut cmd = common::bhyve();
    cmd.arg("-r").arg(&file);
    cmd.args(["-o", "snapshot.restore=copy"]);
    cmd.arg("-o").arg(format!("rundir={}", scratch.0.display()));
    let mut copied = Console::spawn("bhyve -r (copy)", cmd);
    churn_checks_clean(&mut copied, "copied restore");
    copied.send_line("halt");
    assert_eq!(copied.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
}

/// Work counts of every CPU, waiting until each has moved past `floor` (same APIC order).
fn counts_beyond(vm: &mut Console, floor: &[(u32, u64)]) -> Vec<(u32, u64)> {
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    loop {
        let now = work_counts(vm);
        let apics: Vec<u32> = now.iter().map(|&(apic, _)| apic).collect();
        let floor_apics: Vec<u32> = floor.iter().map(|&(apic, _)| apic).collect();
        assert_eq!(apics, floor_apics, "the set of CPUs changed");
        if now.iter().zip(floor).all(|(n, f)| n.1 > f.1) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "a CPU stopped counting: {floor:?} then {now:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn two_vcpus_keep_their_work_across_checkpoint_and_suspend_cycles() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("smp");
    let rundir = format!("rundir={}", scratch.0.display());
    let cmd = common::bhyve_command_with(guest::console_guest(), "", &["-c", "2", "-o", &rundir]);
    let name = common::vm_name_of(&cmd);
    let mut vm = Console::spawn("bhyve", cmd);
    vm.expect("cpus 2 online\n", BOOT_TIMEOUT);
    vm.expect(guest::READY, BOOT_TIMEOUT);
    vm.expect_prompt(COMMAND_TIMEOUT);
    let fill = vm.command_line("memfill 32 77");
    assert_eq!(fill, guest::memfill_line(32, 77));
    assert_eq!(vm.command_line("work on"), "work on");
    let mut last = counts_beyond(&mut vm, &[(0, 0), (1, 0)]);

    let checkpoint = scratch.path("running.snap");
    let (code, err) = ctl(
        &scratch.0,
        &name,
        &[format!("--checkpoint={}", checkpoint.display())],
    );
    assert_eq!(code, 0, "bhyvectl --checkpoint failed: {err}");
    last = counts_beyond(&mut vm, &last);

    for cycle in 0..3 {
        let file = scratch.path(&format!("suspend-{cycle}.snap"));
        let (code, err) = ctl(
            &scratch.0,
            &name,
            &[format!("--suspend={}", file.display())],
        );
        assert_eq!(code, 0, "cycle {cycle}: bhyvectl --suspend failed: {err}");
        assert_eq!(vm.wait_exit(SAVE_TIMEOUT).code(), Some(0), "cycle {cycle}");
        vm = resume(&scratch.0, &file);
        // Both CPUs carry on from at least where they were seen last: no reboot, no restart.
        last = counts_beyond(&mut vm, &last);
        assert!(
            !vm.transcript().contains(guest::READY),
            "cycle {cycle}: the guest rebooted"
        );
    }
    assert_eq!(
        vm.command_line("memsum 32"),
        guest::memfill_line(32, 77).replace("memfill 32 MiB seed 77", "memsum 32 MiB")
    );
    // The boot CPU's timer still runs at its rate while the other CPU works.
    assert_within_ten_percent(timed_ticks(&mut vm, 100, 2000), 2000);
    vm.send_line("halt");
    vm.expect("halting\n", COMMAND_TIMEOUT);
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
    suspend(&scratch, &name, &mut vm, &file);
    let meta = std::fs::metadata(&file).expect("snapshot exists");
    assert!(meta.len() > 1 << 30, "logical size {} < 1 GiB", meta.len());
    let allocated = meta.blocks() * 512;
    assert!(
        allocated < 100 << 20,
        "a 1 GiB guest that touched 64 MiB used {allocated} bytes on disk"
    );
    // Restored by mapping, the guest answers before its 64 MiB are read: resident memory
    // stays well below them until the guest touches them itself.
    let mut vm = resume(&scratch.0, &file);
    assert_eq!(counter(&mut vm), 1);
    let mapped = resident_bytes(&vm);
    assert!(
        mapped < 32 << 20,
        "a mapped restore made {mapped} bytes resident before the guest read its memory"
    );
    assert_eq!(
        vm.command_line("memsum 64"),
        guest::memfill_line(64, 99).replace("memfill 64 MiB seed 99", "memsum 64 MiB")
    );
    assert!(resident_bytes(&vm) > 64 << 20, "memsum read the memory");
    vm.send_line("halt");
    assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));

    // The eager restore reads everything stored before the guest runs: the contrast shows the
    // measure above means something.
    let mut cmd = common::bhyve();
    cmd.arg("-r").arg(&file);
    cmd.args(["-o", "snapshot.restore=copy"]);
    cmd.arg("-o").arg(format!("rundir={}", scratch.0.display()));
    let mut vm = Console::spawn("bhyve -r (copy)", cmd);
    assert_eq!(counter(&mut vm), 1);
    let copied = resident_bytes(&vm);
    assert!(
        copied > 64 << 20,
        "a copying restore left only {copied} bytes resident"
    );
}

/// Resident memory of the VM's process (VmRSS), in bytes.
fn resident_bytes(vm: &Console) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.pid()))
        .expect("the VM's /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .unwrap_or_else(|| panic!("no VmRSS in {status}"))
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

    // Targets that are not regular files stay what they are.
    use std::os::unix::fs::FileTypeExt;
    let fifo = scratch.path("fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let device = scratch.path("null");
    let have_device = Command::new("mknod")
        .arg(&device)
        .args(["c", "1", "3"])
        .status()
        .is_ok_and(|s| s.success());
    std::fs::write(scratch.path("notes.txt"), "notes").expect("notes");
    let mut refused = vec![
        (fifo.display().to_string(), "is a FIFO"),
        (
            format!("{}/.", scratch.path("notes.txt").display()),
            "Not a directory",
        ),
        (
            format!("{}/", scratch.path("notes.txt").display()),
            "Not a directory",
        ),
    ];
    if have_device {
        refused.push((device.display().to_string(), "is a character device"));
    }
    for (target, why) in &refused {
        let (code, err) = ctl(&scratch.0, &name, &[format!("--checkpoint={target}")]);
        assert_ne!(code, 0, "{target}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(why), "{target}: {err}");
    }
    assert!(std::fs::symlink_metadata(&fifo)
        .expect("FIFO kept")
        .file_type()
        .is_fifo());
    if have_device {
        let meta = std::fs::symlink_metadata(&device).expect("device kept");
        assert!(meta.file_type().is_char_device());
    }
    assert_eq!(
        std::fs::read_to_string(scratch.path("notes.txt")).unwrap(),
        "notes"
    );

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
    suspend(&scratch, &name, &mut vm, &file);

    let bytes = std::fs::read(&file).expect("read snapshot");
    // Where the vCPU state lies, from the file's own section table.
    let vcpu = bhyve::snapshot::SnapshotReader::open(&file)
        .expect("the good snapshot opens")
        .sections()
        .iter()
        .find(|e| e.name == "vcpu")
        .map(|e| (e.offset, e.length))
        .expect("a vcpu section");
    let variant = |name: &str, change: &dyn Fn(&mut Vec<u8>)| {
        let mut copy = bytes.clone();
        change(&mut copy);
        let path = scratch.path(name);
        std::fs::write(&path, &copy).expect("write");
        path
    };
    // (file, what the one-line error must mention)
    let cases = [
        (variant("truncated.snap", &|b| b.truncate(b.len() / 2)), ""),
        (variant("header.snap", &|b| b[24] ^= 0x01), "header"),
        (
            variant("table.snap", &|b| {
                let at = b.len() - 200;
                b[at] ^= 0x55
            }),
            "",
        ),
        (
            variant("vcpu.snap", &|b| b[(vcpu.0 + vcpu.1 / 2) as usize] ^= 0x01),
            "vcpu",
        ),
        (scratch.path("missing.snap"), "missing.snap"),
    ];

    // A VM of the same name runs meanwhile: refused restores must leave it alone.
    let mut bystander = boot(&scratch.0, &name, "256M");
    for (bad, mentions) in &cases {
        let mut cmd = common::bhyve();
        cmd.arg("-r").arg(bad);
        cmd.arg("-o").arg(format!("rundir={}", scratch.0.display()));
        let (status, _out, err) = run_to_exit(cmd, COMMAND_TIMEOUT);
        assert_ne!(status.code(), Some(0), "{}: {err}", bad.display());
        assert_eq!(err.trim().lines().count(), 1, "{}: {err}", bad.display());
        assert!(err.starts_with("bhyve: "), "{err}");
        assert!(
            err.contains(mentions),
            "{}: {err:?} should mention {mentions:?}",
            bad.display()
        );
        assert_eq!(counter(&mut bystander), 1 + counter_offset(bad, &cases));
    }
    assert!(
        scratch.path(&name).exists(),
        "the running VM lost its control socket"
    );
}

/// How many times the bystander's counter ran before the case `bad`.
fn counter_offset(bad: &Path, cases: &[(PathBuf, &str)]) -> u64 {
    cases.iter().position(|(p, _)| p == bad).unwrap_or(0) as u64
}

/// The numbers of every complete `count N` line in `text`, in order.
fn count_numbers(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("count ")?.trim().parse().ok())
        .collect()
}

#[test]
fn timer_keeps_its_rate_and_the_cmos_clock_does_not_go_back_after_a_restore() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("clock");
    let name = vm_name();
    let mut vm = boot(&scratch.0, &name, "256M");
    let before_line = vm.command_line("cmos");
    let before = guest::parse_cmos_line(&before_line).expect("cmos line parses");
    let host_before = Instant::now();
    let file = scratch.path("clock.snap");
    suspend(&scratch, &name, &mut vm, &file);
    const SUSPENDED: Duration = Duration::from_secs(4);
    std::thread::sleep(SUSPENDED);
    let mut vm = resume(&scratch.0, &file);
    let after_line = vm.command_line("cmos");
    let after = guest::parse_cmos_line(&after_line).expect("cmos line parses");
    let host_elapsed = host_before.elapsed().as_secs() as i64;
    assert!(
        after >= before,
        "the guest's clock went back: {before_line:?} before the suspend, {after_line:?} after"
    );
    // The RTC goes on from its saved time, as on FreeBSD: the seconds spent suspended do not
    // pass for the guest. A clock that was not restored, and read the host's time again,
    // would have jumped by them. Where KVM cannot hold the guest's TSC at its saved value, the
    // guest's TSC clock moves on by them, and the RTC moves with it so the two agree.
    let lost = host_elapsed - (after - before);
    if common::kvm_holds_a_written_tsc() {
        assert!(
            lost >= SUSPENDED.as_secs() as i64 - 1,
            "the guest's clock advanced {}s over {host_elapsed}s of which {SUSPENDED:?} \
             suspended: {before_line:?} then {after_line:?}",
            after - before
        );
    } else {
        assert!(
            lost.abs() <= 2,
            "with a TSC that ran on, the guest's clock advanced {}s over {host_elapsed}s: \
             {before_line:?} then {after_line:?}",
            after - before
        );
    }
    assert_within_ten_percent(timed_ticks(&mut vm, 100, 3000), 3000);
}

/// `hpet state`: (configuration, counter, timer 0 configuration, timer 0 comparator).
fn hpet_state(vm: &mut Console) -> (u64, u32, u64, u64) {
    let line = vm.command_line("hpet state");
    let words: Vec<&str> = line.split_whitespace().collect();
    let hex = |at: usize, key: &str| {
        (words.get(at - 1) == Some(&key))
            .then(|| words.get(at)?.strip_prefix("0x"))
            .flatten()
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .unwrap_or_else(|| panic!("no {key} at word {at} of {line:?}"))
    };
    (
        hex(2, "config"),
        hex(4, "counter") as u32,
        hex(7, "config"),
        hex(9, "comparator"),
    )
}

/// The HPET's state is in the snapshot (as vhpet_snapshot saves it): after a checkpoint and a
/// suspend/resume its configuration and timer registers are as the guest left them and its
/// counter counts on from its saved value, at its rate; the seconds spent suspended do not pass
/// for it, as they do not for the RTC.
#[test]
fn hpet_counts_on_with_its_configuration_across_checkpoint_and_restore() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("hpet");
    let name = vm_name();
    let mut vm = boot(&scratch.0, &name, "256M");
    let lines = vm.command("hpet 200", COMMAND_TIMEOUT);
    guest::parse_hpet_report(&lines).unwrap_or_else(|| panic!("{lines:?}"));
    const COMPARATOR: u64 = 0x1234_5678;
    vm.command_line(&format!("hpet comparator={COMPARATOR:#x}"));

    let checkpoint = scratch.path("running.snap");
    let (code, err) = ctl(
        &scratch.0,
        &name,
        &[format!("--checkpoint={}", checkpoint.display())],
    );
    assert_eq!(code, 0, "bhyvectl --checkpoint failed: {err}");
    let before = hpet_state(&mut vm);
    let host_before = Instant::now();
    assert_eq!(before.0, 1, "counter enabled before the suspend");
    assert_eq!(before.3, COMPARATOR);

    let file = scratch.path("hpet.snap");
    suspend(&scratch, &name, &mut vm, &file);
    const SUSPENDED: Duration = Duration::from_secs(4);
    std::thread::sleep(SUSPENDED);
    let mut vm = resume(&scratch.0, &file);
    let after = hpet_state(&mut vm);
    let host_elapsed = host_before.elapsed().as_secs_f64();
    assert_eq!(
        (after.0, after.2, after.3),
        (before.0, before.2, before.3),
        "configuration changed across the restore"
    );
    // Counting on, not from 0 and not from host time: over 100 s worth of ticks would mean a
    // wrap or a reset.
    let counted = after.1.wrapping_sub(before.1);
    let counted_secs = f64::from(counted) / f64::from(1u32 << 24);
    assert!(
        counted > 0 && counted_secs < 100.0,
        "counter {:#x} before, {:#x} after",
        before.1,
        after.1
    );
    let lost = host_elapsed - counted_secs;
    assert!(
        lost >= SUSPENDED.as_secs_f64() - 0.5,
        "the HPET advanced {counted_secs:.2} s over {host_elapsed:.2} s of which {SUSPENDED:?} \
         suspended"
    );
    let lines = vm.command("hpet 1000", COMMAND_TIMEOUT);
    let report = guest::parse_hpet_report(&lines).unwrap_or_else(|| panic!("{lines:?}"));
    assert!(
        (report.by_pmtimer_hz - report.advertised_hz).abs() <= report.advertised_hz * 0.10,
        "HPET at {} Hz after the restore: {lines:?}",
        report.by_pmtimer_hz
    );
    vm.send_line("halt");
    assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));

    // The checkpoint taken while the VM ran restores with the same configuration.
    let mut vm = resume(&scratch.0, &checkpoint);
    let restored = hpet_state(&mut vm);
    assert_eq!(
        (restored.0, restored.2, restored.3),
        (before.0, before.2, before.3)
    );
    vm.send_line("halt");
    assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
}

/// A snapshot written before the HPET existed has no `hpet` section: it restores, with the
/// HPET in its reset state. Made here from a new snapshot whose `hpet` section is renamed to
/// a name no bhyve knows and marked optional, which a restore skips.
#[test]
fn a_snapshot_without_an_hpet_section_restores_the_hpet_in_its_reset_state() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("hpet-old");
    let name = vm_name();
    let mut vm = boot(&scratch.0, &name, "256M");
    vm.command("hpet 100", COMMAND_TIMEOUT);
    vm.command_line("hpet comparator=0x1000");
    assert_eq!(counter(&mut vm), 1);
    let file = scratch.path("new.snap");
    suspend(&scratch, &name, &mut vm, &file);

    let mut image = std::fs::read(&file).expect("read the snapshot");
    let mut entries = SnapshotReader::open(&file)
        .expect("the snapshot opens")
        .sections()
        .to_vec();
    let hpet = entries
        .iter_mut()
        .find(|e| e.name == "hpet")
        .expect("an hpet section");
    hpet.name = "xpet".to_string();
    hpet.flags &= !SECTION_FLAG_MANDATORY;
    reseal(&mut image, &entries).expect("reseal");
    let old = scratch.path("old.snap");
    std::fs::write(&old, &image).expect("write the edited snapshot");

    let mut vm = resume(&scratch.0, &old);
    assert_eq!(counter(&mut vm), 2, "the guest runs on from where it was");
    let (config, count, timer0, comparator) = hpet_state(&mut vm);
    assert_eq!((config, count), (0, 0), "counter stopped at 0");
    // vhpet_init: the upper four pins of a 24-pin I/O APIC, FSB and periodic capable.
    assert_eq!(timer0, 0x00f0_0000_0000_8010);
    assert_eq!(comparator, 0xffff_ffff);
    vm.send_line("halt");
    assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
}

#[test]
fn count_runs_through_a_checkpoint_and_a_suspend_without_losing_a_number_or_a_key() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("count");
    let name = vm_name();
    let mut vm = boot(&scratch.0, &name, "256M");
    vm.send_line("count");
    vm.expect("count 5\n", COMMAND_TIMEOUT);
    // A checkpoint while the guest writes to its UART: the numbers go on.
    let (code, err) = ctl(
        &scratch.0,
        &name,
        &[format!(
            "--checkpoint={}",
            scratch.path("live.snap").display()
        )],
    );
    assert_eq!(code, 0, "{err}");
    let seen = count_numbers(&vm.transcript());
    let last = *seen.last().expect("count lines");
    vm.expect(&format!("count {}\n", last + 10), COMMAND_TIMEOUT);

    // A suspend while counting; the restored guest carries on from the next number.
    let file = scratch.path("count.snap");
    suspend(&scratch, &name, &mut vm, &file);
    let before = vm.transcript();
    let mut vm = resume(&scratch.0, &file);
    let resumed_from = count_numbers(&before).last().copied().expect("count lines") + 1;
    vm.expect(&format!("count {}\n", resumed_from + 5), COMMAND_TIMEOUT);
    // One key right away stops the count; then a command typed at once still arrives whole.
    vm.send("\n");
    vm.expect("count stopped\n", COMMAND_TIMEOUT);
    vm.expect_prompt(COMMAND_TIMEOUT);
    // The output of both processes, joined: a line cut by the suspend is finished by the
    // restored guest, and every number appears once, in order.
    let joined = format!("{before}{}", vm.transcript());
    let numbers = count_numbers(&joined);
    let expected: Vec<u64> = (1..=*numbers.last().unwrap_or(&0)).collect();
    assert_eq!(
        numbers, expected,
        "count sequence across checkpoint and suspend"
    );
    assert!(
        !vm.transcript().contains(guest::READY),
        "the guest rebooted"
    );

    // A suspend at the prompt, and a command sent before the restored guest has run at all.
    let file = scratch.path("idle.snap");
    suspend(&scratch, &name, &mut vm, &file);
    let mut vm = resume(&scratch.0, &file);
    vm.send_line("counter");
    vm.expect("counter\n", COMMAND_TIMEOUT);
    assert_eq!(vm.expect_prompt(COMMAND_TIMEOUT).trim(), "counter 1");
    vm.send_line("halt");
    assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
}

/// Every name in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// A read-only directory for root: root ignores permission bits, so only a read-only mount
/// makes writes fail (EROFS) the way an administrator would meet it. Unmounted on drop.
struct ReadOnlyDir(PathBuf);

impl ReadOnlyDir {
    fn new(path: PathBuf) -> Option<Self> {
        std::fs::create_dir_all(&path).ok()?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"])
            .arg(&path)
            .stderr(Stdio::null())
            .status()
            .ok()?;
        if status.success() {
            return Some(ReadOnlyDir(path));
        }
        // Without the right to mount, permission bits do the job for anyone but root.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            let mut perms = std::fs::metadata(&path).ok()?.permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o555);
            std::fs::set_permissions(&path, perms).ok()?;
            return Some(ReadOnlyDir(path));
        }
        None
    }
}

impl Drop for ReadOnlyDir {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// `bhyve` built without the `bhyve_snapshot` feature, in its own target directory under
/// target/ (built once, then cached).
fn bhyve_without_snapshots() -> &'static Path {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let target_dir = repo_root().join("target/e2e-without-snapshot");
        cargo_build(&["-p", "bhyve-rs", "--bin", "bhyve"], &[], &target_dir)?;
        Ok(target_dir.join("debug/bhyve"))
    });
    match built {
        Ok(path) => path,
        Err(why) => panic!("building bhyve without snapshot support: {why}"),
    }
}

fn assert_one_line_failure(what: &str, code: i32, err: &str) {
    assert_ne!(code, 0, "{what}: exit 0 ({err})");
    assert_eq!(err.trim().lines().count(), 1, "{what}: {err:?}");
}

#[test]
fn refused_snapshots_and_restores_say_why_in_one_line_and_harm_nothing() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("refused");
    let name = vm_name();
    let mut vm = boot(&scratch.0, &name, "256M");
    assert_eq!(counter(&mut vm), 1);

    // A read-only target directory: bhyve's write fails and is reported by bhyvectl.
    match ReadOnlyDir::new(scratch.path("ro")) {
        Some(ro) => {
            let target = ro.0.join("x.snap");
            let (code, err) = ctl(
                &scratch.0,
                &name,
                &[format!("--checkpoint={}", target.display())],
            );
            assert_one_line_failure("read-only directory", code, &err);
            assert!(
                err.contains("Read-only file system") || err.contains("ermission"),
                "{err}"
            );
            assert!(listing(&ro.0).is_empty(), "{:?}", listing(&ro.0));
            assert_eq!(counter(&mut vm), 2);
        }
        None => notice("no read-only mount possible here; read-only directory case skipped"),
    }

    // A good snapshot of the running VM to restore from.
    let good = scratch.path("good.snap");
    let (code, err) = ctl(
        &scratch.0,
        &name,
        &[format!("--checkpoint={}", good.display())],
    );
    assert_eq!(code, 0, "{err}");

    // A newer major format version.
    let mut bytes = std::fs::read(&good).expect("read snapshot");
    bytes[8..10].copy_from_slice(&99u16.to_le_bytes());
    let newer = scratch.path("newer.snap");
    std::fs::write(&newer, &bytes).expect("write");
    // A command line that does not match the snapshot: one more device.
    let restore_cases: [(&str, &Path, &[&str], &str); 3] = [
        (
            "newer format",
            &newer,
            &[],
            "newer than this bhyve supports",
        ),
        (
            "extra device",
            &good,
            &[
                "-c",
                "1",
                "-s",
                "0,hostbridge",
                "-s",
                "31,lpc",
                "-s",
                "3,virtio-rnd",
            ],
            "pci.0.3.0.device is unset in the snapshot but 'virtio-rnd' on the command line",
        ),
        (
            "more memory",
            &good,
            &["-m", "512M"],
            "memory.size is '256M' in the snapshot but '512M' on the command line",
        ),
    ];
    for (what, file, args, expected) in restore_cases {
        let restored_name = format!("{name}-r");
        let mut cmd = common::bhyve();
        cmd.arg("-r").arg(file).args(args);
        cmd.args(["-l", "com1,stdio"]);
        cmd.arg("-o").arg(format!("rundir={}", scratch.0.display()));
        cmd.arg(&restored_name);
        let (status, _out, err) = run_to_exit(cmd, COMMAND_TIMEOUT);
        assert_one_line_failure(what, status.code().unwrap_or(-1), &err);
        assert!(err.starts_with("bhyve: restore "), "{what}: {err}");
        assert!(err.contains(expected), "{what}: {err}");
        assert!(
            !scratch.path(&restored_name).exists(),
            "{what}: a control socket was left"
        );
    }
    // The same command line as at boot, with another console backend and a copy restore, is
    // accepted (shown by the restored guest answering).
    let mut cmd = common::bhyve();
    cmd.arg("-r").arg(&good);
    cmd.args(common::CONSOLE_MACHINE);
    cmd.args(["-l", "com1,stdio", "-o", "snapshot.restore=copy"]);
    cmd.arg("-o")
        .arg(format!("rundir={}", scratch.path("run2").display()));
    cmd.arg("-o")
        .arg(format!("boot.kernel={}", guest::console_guest().display()));
    cmd.arg(format!("{name}-copy"));
    let mut copy = Console::spawn("bhyve -r copy", cmd);
    assert_eq!(counter(&mut copy), 3);
    assert!(
        scratch.path("run2").join(format!("{name}-copy")).exists(),
        "rundir given at restore is used"
    );
    copy.send_line("halt");
    assert_eq!(copy.wait_exit(COMMAND_TIMEOUT).code(), Some(2));

    // Only host-side settings (the console's backend, the run directory): the snapshot
    // supplies the machine.
    let mut cmd = common::bhyve();
    cmd.arg("-r").arg(&good);
    cmd.args(["-l", "com1,stdio"]);
    cmd.arg("-o")
        .arg(format!("rundir={}", scratch.path("run3").display()));
    cmd.arg(format!("{name}-host"));
    let mut host_side = Console::spawn("bhyve -r -l", cmd);
    assert_eq!(counter(&mut host_side), 3, "{}", host_side.stderr());
    host_side.send_line("halt");
    assert_eq!(host_side.wait_exit(COMMAND_TIMEOUT).code(), Some(2));

    // The original VM took none of it amiss.
    assert_eq!(counter(&mut vm), 3);
    let stray: Vec<String> = listing(&scratch.0)
        .into_iter()
        .filter(|n| n.contains(".tmp.") || n.starts_with("x.snap"))
        .collect();
    assert!(stray.is_empty(), "left behind: {stray:?}");
    vm.send_line("halt");
    assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
}

#[test]
fn bhyvectl_says_clearly_that_a_bhyve_without_snapshots_does_not_answer() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("nofeature");
    let name = vm_name();
    let cmd = console_vm_command(bhyve_without_snapshots(), "256M", &scratch.0, &name);
    let mut vm = Console::spawn("bhyve (no snapshots)", cmd);
    vm.expect(guest::READY, BOOT_TIMEOUT);
    vm.expect_prompt(COMMAND_TIMEOUT);
    let file = scratch.path("x.snap");
    let (code, err) = ctl(
        &scratch.0,
        &name,
        &[format!("--checkpoint={}", file.display())],
    );
    assert_one_line_failure("bhyve without snapshots", code, &err);
    assert!(
        err.contains(&name) && err.contains("snapshot support"),
        "{err}"
    );
    assert!(!file.exists());
    assert_eq!(counter(&mut vm), 1);

    // Like FreeBSD's bhyve built without BHYVE_SNAPSHOT, it does not know -r.
    let mut cmd = common::bhyve_at(bhyve_without_snapshots());
    cmd.arg("-r").arg(&file).arg("other");
    let (status, _out, err) = run_to_exit(cmd, COMMAND_TIMEOUT);
    assert_ne!(status.code(), Some(0));
    assert!(err.starts_with("bhyve: illegal option -- r\n"), "{err}");
    vm.send_line("halt");
    assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
}

#[test]
fn bhyvectl_fails_when_bhyve_dies_while_saving() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("crash");
    let name = vm_name();
    let mut vm = boot(&scratch.0, &name, "2G");
    // Enough memory that the save takes a while.
    vm.command_line("memfill 1024 5");
    let file = scratch.path("big.snap");
    let mut bhyvectl = Command::new(bhyvectl())
        .arg(format!("--vm={name}"))
        .arg(format!("--rundir={}", scratch.0.display()))
        .arg(format!("--checkpoint={}", file.display()))
        .stderr(Stdio::piped())
        .spawn()
        .expect("run bhyvectl");
    // Kill bhyve as soon as it has a file open in the directory: the snapshot being written,
    // unnamed (shown as "#inode (deleted)") or under a temporary name.
    let deadline = Instant::now() + SAVE_TIMEOUT;
    let fds = format!("/proc/{}/fd", vm.pid());
    let writing = || {
        std::fs::read_dir(&fds).into_iter().flatten().any(|fd| {
            fd.ok()
                .and_then(|fd| std::fs::read_link(fd.path()).ok())
                .is_some_and(|target| target.starts_with(&scratch.0) && target != scratch.0)
        })
    };
    while !writing() {
        assert!(
            Instant::now() < deadline,
            "bhyve never opened a file to save into"
        );
        assert!(
            !file.exists(),
            "the save finished before it could be interrupted"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = Command::new("kill")
        .args(["-KILL", &vm.pid().to_string()])
        .status();
    vm.wait_exit(COMMAND_TIMEOUT);
    let status = bhyvectl.wait().expect("bhyvectl exits");
    let mut err = String::new();
    if let Some(mut stderr) = bhyvectl.stderr.take() {
        let _ = stderr.read_to_string(&mut err);
    }
    assert_one_line_failure("bhyve killed mid-save", status.code().unwrap_or(-1), &err);
    assert!(err.contains("without a reply"), "{err}");
    assert!(!file.exists());
    // Nothing of the unfinished snapshot is left: it never had a name (or a later writer of
    // the same file removes the dead one's temporary file).
    let left: Vec<String> = listing(&scratch.0)
        .into_iter()
        .filter(|n| n.contains("big.snap"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// One line of the vendored libnv vector manifest.
struct VectorCase {
    file: String,
    nfds: usize,
    /// A request bhyve must carry out: a list libnv accepts whose `cmd` is `checkpoint`.
    checkpoint: bool,
}

fn vector_dir() -> PathBuf {
    repo_root().join("bhyve-rs/tests/data/nvlist")
}

fn vector_cases() -> Vec<VectorCase> {
    let text = std::fs::read_to_string(vector_dir().join("manifest.tsv")).expect("manifest.tsv");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            assert_eq!(f.len(), 8, "manifest line {line}");
            let receivable = f[1] == "recv" && f[5] == "1";
            // libnv's nvlist_recv refuses every big-endian list (it converts the header twice);
            // bhyve-rs reads it as the request it is (see tests/nvlist_vectors.rs).
            let big_endian_request = f[0] == "h-big-endian-checkpoint.bin" && f[1] == "recv";
            VectorCase {
                file: f[0].to_string(),
                nfds: if f[1] == "recv" {
                    f[3].parse().expect("nfds")
                } else {
                    0
                },
                checkpoint: (receivable && f[7].contains(r#""value":"checkpoint""#))
                    || big_endian_request,
            }
        })
        .collect()
}

#[test]
fn a_real_bhyve_takes_every_valid_request_vector_and_refuses_every_other() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("vectors");
    let snapdir = scratch.path("snaps");
    std::fs::create_dir_all(&snapdir).expect("create snapshot directory");
    let name = vm_name();
    let mut vm = boot(&scratch.0, &name, "256M");
    let socket = scratch.path(&name);
    let cases = vector_cases();
    let mut refused = 0;
    let mut suspend_case = None;
    for case in &cases {
        let bytes = std::fs::read(vector_dir().join(&case.file)).expect("read vector");
        if case.checkpoint && case.file.contains("suspend") {
            suspend_case = Some(bytes);
            continue;
        }
        let _ = std::fs::remove_file(snapdir.join("snap"));
        let reply = exchange(&socket, &bytes, case.nfds, &snapdir);
        if case.checkpoint {
            assert_eq!(reply_error(&reply), None, "{}: refused", case.file);
            bhyve::snapshot::SnapshotReader::open(&snapdir.join("snap"))
                .unwrap_or_else(|e| panic!("{}: snapshot unreadable: {e}", case.file));
        } else {
            assert!(
                reply_error(&reply).is_some()
                    || (case.file == "x-empty-buffer.bin" && reply.is_empty()),
                "{} ({} fds): no error reply, got {reply:?}",
                case.file,
                case.nfds
            );
            assert!(
                !snapdir.join("snap").exists(),
                "{}: a snapshot was written",
                case.file
            );
            refused += 1;
        }
    }
    assert!(refused > 50, "only {refused} invalid vectors sent");
    // Still running, still counting from where it was.
    assert_eq!(counter(&mut vm), 1);
    // The suspend request: a snapshot, then bhyve exits 0.
    let bytes = suspend_case.expect("manifest has the suspend request");
    let reply = exchange(&socket, &bytes, 1, &snapdir);
    assert_eq!(reply_error(&reply), None);
    assert_eq!(vm.wait_exit(SAVE_TIMEOUT).code(), Some(0));
    let restored = resume(&scratch.0, &snapdir.join("snap"));
    let mut restored = restored;
    assert_eq!(counter(&mut restored), 2);
}

#[test]
fn bhyvectl_sends_the_bytes_of_freebsd_bhyvectl() {
    let scratch = Scratch::new("wire");
    let snapdir = scratch.path("snaps");
    std::fs::create_dir_all(&snapdir).expect("create snapshot directory");
    for (flag, stream_file) in [
        ("--checkpoint", "bhyvectl-checkpoint.stream.bin"),
        ("--suspend", "bhyvectl-suspend.stream.bin"),
    ] {
        let listener = UnixListener::bind(scratch.path("vm0")).expect("bind fake bhyve");
        let expected = std::fs::read(vector_dir().join(stream_file)).expect("read vector");
        let expected_len = expected.len();
        let fake = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut bytes = vec![0u8; expected_len];
            stream.read_exact(&mut bytes).expect("read request");
            let empty_reply = std::fs::read(vector_dir().join("empty.bin")).expect("empty.bin");
            stream.write_all(&empty_reply).expect("reply");
            bytes
        });
        let out = Command::new(bhyvectl())
            .arg("--vm=vm0")
            .arg(format!("--rundir={}", scratch.0.display()))
            .arg(format!("{flag}={}", snapdir.join("snap").display()))
            .output()
            .expect("run bhyvectl");
        let sent = fake.join().expect("fake bhyve");
        assert_eq!(sent, expected, "{flag}: bytes on the socket");
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::remove_file(scratch.path("vm0")).expect("remove socket");
    }
}

#[test]
fn bhyvectl_refuses_a_silent_close_that_left_no_snapshot() {
    let scratch = Scratch::new("silent");
    let listener = UnixListener::bind(scratch.path("vm0")).expect("bind fake bhyve");
    let fake = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut bytes = vec![0u8; 147];
        let _ = stream.read_exact(&mut bytes);
        // Closes without a reply and without writing anything, like a bhyve that crashed.
        std::thread::sleep(Duration::from_millis(200));
    });
    let file = scratch.path("x.snap");
    let out = Command::new(bhyvectl())
        .arg("--vm=vm0")
        .arg(format!("--rundir={}", scratch.0.display()))
        .arg(format!("--checkpoint={}", file.display()))
        .output()
        .expect("run bhyvectl");
    fake.join().expect("fake bhyve");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_one_line_failure("silent close", out.status.code().unwrap_or(-1), &err);
    assert!(err.contains("without a reply"), "{err}");
}

/// The host CPU's vendor as tests/fixtures names it (`amd`, `intel`), from /proc/cpuinfo.
fn host_cpu_vendor() -> &'static str {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let vendor = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("vendor_id"))
        .and_then(|rest| rest.split(':').nth(1))
        .map(str::trim)
        .unwrap_or_default();
    match vendor {
        "AuthenticAMD" | "HygonGenuine" => "amd",
        "GenuineIntel" => "intel",
        _ => "unknown",
    }
}

/// A snapshot taken by an earlier bhyve (see tests/fixtures/README.md) restores, and the guest
/// goes on from where it was: its counter stood at 1, its timer and console still work. Saved
/// again, the file has the sections the earlier bhyve wrote.
#[test]
fn a_snapshot_written_by_an_earlier_bhyve_restores_and_the_guest_continues() {
    if !kvm_usable() {
        return;
    }
    let fixtures = repo_root().join("tests/fixtures");
    let vendor = host_cpu_vendor();
    let own = fixtures.join(format!("console-{vendor}-v1.snap.xz"));
    let (compressed, same_vendor) = if own.exists() {
        (own, true)
    } else {
        (fixtures.join("console-amd-v1.snap.xz"), false)
    };
    let scratch = Scratch::new("fixture");
    let packed = scratch.path("fixture.snap.xz");
    std::fs::copy(&compressed, &packed).expect("copy the fixture");
    // xz writes the long runs of zeros as holes: the 32 MiB of RAM stay sparse.
    let status = Command::new("xz")
        .arg("-d")
        .arg(&packed)
        .status()
        .expect("run xz (tests/install-deps.sh installs it)");
    assert!(status.success(), "xz -d {}: {status}", packed.display());
    let file = scratch.path("fixture.snap");

    let mut vm = resume(&scratch.0, &file);
    // The counter stood at 1 when the snapshot was taken.
    vm.send_line("counter");
    if let Err(why) = vm.try_expect("counter 2\n", COMMAND_TIMEOUT) {
        // vCPU state (CPUID, MSRs) of another vendor's CPU may be refused by this kernel.
        if !same_vendor {
            if let Ok(Some(status)) = vm.try_wait_exit(Duration::from_secs(1)) {
                notice(&format!(
                    "no fixture for this CPU vendor ({vendor}); the {} one did not restore \
                     ({status}): {}",
                    compressed.display(),
                    vm.stderr().trim()
                ));
                return;
            }
        }
        panic!(
            "restored guest: {why}\n{}\n{}",
            vm.transcript(),
            vm.stderr()
        );
    }
    vm.expect_prompt(COMMAND_TIMEOUT);
    assert!(
        !vm.transcript().contains(guest::READY),
        "the guest rebooted"
    );
    let lines = vm.command("ticks 200", COMMAND_TIMEOUT);
    assert!(
        lines.iter().any(|l| l.starts_with("ticks done ")),
        "{lines:?}"
    );

    // Saved again by this bhyve, the machine has the same sections, in the same order, with
    // the same versions, plus the HPET's (a device added since, restored in its reset state);
    // the device sections have the same sizes.
    let again = scratch.path("again.snap");
    suspend(&scratch, "fixture", &mut vm, &again);
    let (old, new) = (section_table(&file), section_table(&again));
    let shape = |table: &[(String, String, String, String)]| -> Vec<(String, String, String)> {
        table
            .iter()
            .map(|(name, instance, version, _)| (name.clone(), instance.clone(), version.clone()))
            .collect()
    };
    let mut expected = shape(&old);
    let after_rtc = expected
        .iter()
        .position(|(name, ..)| name == "rtc")
        .map_or(0, |i| i + 1);
    expected.insert(after_rtc, ("hpet".into(), "-".into(), "1".into()));
    assert_eq!(expected, shape(&new));
    let device_sizes = |table: &[(String, String, String, String)]| -> Vec<String> {
        table
            .iter()
            .filter(|(name, ..)| ["pci", "uart", "rtc", "pm", "pctestdev"].contains(&name.as_str()))
            .map(|(name, instance, _, length)| format!("{name}/{instance} {length}"))
            .collect()
    };
    assert_eq!(device_sizes(&old), device_sizes(&new));

    let mut vm = resume(&scratch.0, &again);
    assert_eq!(counter(&mut vm), 3);
    vm.send_line("halt");
    vm.expect("halting\n", COMMAND_TIMEOUT);
    assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
}

/// The section table `bhyvectl --inspect-snapshot` prints: (name, instance, version, length).
fn section_table(file: &Path) -> Vec<(String, String, String, String)> {
    let out = Command::new(bhyvectl())
        .arg(format!("--inspect-snapshot={}", file.display()))
        .output()
        .expect("run bhyvectl --inspect-snapshot");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rows: Vec<(String, String, String, String)> = text
        .lines()
        .skip_while(|l| !l.starts_with("sections ("))
        .skip(2)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            assert!(words.len() >= 7, "bad section line {l:?}");
            let word = |i: usize| words[i].to_string();
            (word(0), word(1), word(2), word(6))
        })
        .collect();
    assert!(!rows.is_empty(), "no sections in {text}");
    rows
}

#[test]
fn sigint_and_sighup_end_bhyve_without_leaving_its_socket() {
    use std::os::unix::process::ExitStatusExt;
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("signals");
    for (signal, number) in [("INT", libc::SIGINT), ("HUP", libc::SIGHUP)] {
        let name = vm_name();
        let mut vm = boot(&scratch.0, &name, "256M");
        assert!(scratch.path(&name).exists(), "control socket");
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &vm.pid().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success());
        let status = vm.wait_exit(COMMAND_TIMEOUT);
        // As FreeBSD's bhyve: it dies of the signal.
        assert_eq!(status.signal(), Some(number), "SIG{signal}: {status}");
        assert!(
            !scratch.path(&name).exists(),
            "SIG{signal} left the control socket behind"
        );
    }
}

#[test]
fn a_mapped_snapshot_cut_short_under_the_running_guest_stops_it_with_one_line() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("cut");
    let name = vm_name();
    let mut vm = boot(&scratch.0, &name, "256M");
    let fill = vm.command_line("memfill 16 77");
    let file = scratch.path("vm.snap");
    suspend(&scratch, &name, &mut vm, &file);
    // A writer that has the file open before the restore keeps bhyve from taking a lease on
    // it: bhyve says so once and runs the guest from the file all the same.
    let cut = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    let mut restored = resume(&scratch.0, &file);
    assert_eq!(counter(&mut restored), 1);
    // The file the guest's memory is mapped from loses its RAM.
    cut.set_len(4096).unwrap();
    // The guest may stop on its own first (its timer touches memory too).
    let _ = restored.try_send("memsum 16\n");
    let status = restored.wait_exit(COMMAND_TIMEOUT);
    let err = restored.stderr();
    assert_eq!(status.code(), Some(4), "{status}: {err}");
    assert_unleased_then_one_line(&err, &file);

    // bhyve's own access to such a page (a checkpoint reads all guest memory) takes SIGBUS:
    // the same one line and status 4, not death by the signal.
    let file = scratch.path("vm2.snap");
    let mut vm = boot(&scratch.0, &name, "256M");
    assert_eq!(vm.command_line("memfill 16 78").len(), fill.len());
    suspend(&scratch, &name, &mut vm, &file);
    let cut = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    let mut restored = resume(&scratch.0, &file);
    assert_eq!(counter(&mut restored), 1);
    cut.set_len(4096).unwrap();
    let (code, ctl_err) = ctl(
        &scratch.0,
        &name,
        &[format!(
            "--checkpoint={}",
            scratch.path("again.snap").display()
        )],
    );
    assert_ne!(code, 0, "{ctl_err}");
    let status = restored.wait_exit(COMMAND_TIMEOUT);
    let err = restored.stderr();
    assert_eq!(status.code(), Some(4), "{status}: {err}");
    assert_unleased_then_one_line(&err, &file);
}

/// `err` is the warning that `file` could not be leased because it was open for writing,
/// then one line saying guest memory was lost with it.
fn assert_unleased_then_one_line(err: &str, file: &Path) {
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert_eq!(
        lines[0],
        format!(
            "bhyve: warning: cannot keep writers away from {} while guest memory is mapped \
             from it (it is open for writing): it must stay unchanged while the guest runs",
            file.display()
        )
    );
    assert!(
        lines[1].starts_with("bhyve: guest memory is mapped from")
            && lines[1].contains(&file.display().to_string()),
        "{err}"
    );
}

/// A guest with 16 MiB of `memfill` data, suspended into `file` and restored from it mapped
/// (the default), with progress messages on; its name and the `counter` it is at.
fn restored_mapped_with_filled_memory(scratch: &Scratch, file: &Path) -> (Console, String, u64) {
    let name = vm_name();
    let mut vm = boot(&scratch.0, &name, "256M");
    assert_eq!(
        vm.command_line("memfill 16 91"),
        guest::memfill_line(16, 91)
    );
    suspend(scratch, &name, &mut vm, file);
    let mut cmd = common::bhyve();
    cmd.arg("-r").arg(file);
    cmd.arg("-o").arg(format!("rundir={}", scratch.0.display()));
    cmd.env("BHYVE_LOG", "info");
    let mut restored = Console::spawn("bhyve -r", cmd);
    let at = counter(&mut restored);
    (restored, name, at)
}

/// What bhyve said about moving guest memory out of the file.
struct Moved {
    read_mib: u64,
    read_ms: u64,
    paused_ms: u64,
    copied_kib: u64,
}

impl std::fmt::Display for Moved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} MiB read from the file in {} ms, then the guest paused {} ms to copy the {} KiB \
             it wrote (256 MiB guest)",
            self.read_mib, self.read_ms, self.paused_ms, self.copied_kib
        )
    }
}

/// The guest's memory is the one it was suspended with and it runs on: its counter went on
/// from `at`, and bhyve is still there.
fn assert_intact_and_running(restored: &mut Console, at: u64) -> Moved {
    assert_eq!(
        restored.command_line("memsum 16"),
        guest::memfill_line(16, 91).replace("memfill 16 MiB seed 91", "memsum 16 MiB")
    );
    assert_eq!(counter(restored), at + 1);
    assert!(restored.running(), "bhyve exited: {}", restored.stderr());
    let err = restored.stderr();
    assert!(!err.contains("warning"), "{err}");
    let moved = err
        .lines()
        .find_map(|l| {
            l.split_once("guest memory moved out of it (")
                .map(|(_, rest)| rest)
        })
        .unwrap_or_else(|| panic!("no word of the copy in {err}"));
    let numbers: Vec<u64> = moved
        .split_whitespace()
        .filter_map(|word| word.parse().ok())
        .collect();
    let [read_mib, read_ms, paused_ms, copied_kib] = numbers[..] else {
        panic!("{moved}");
    };
    // The file's data (the 16 MiB filled, the guest's code) was read as the guest ran; only
    // the few pages it wrote since the restore were copied with the guest paused.
    assert!(read_mib >= 16, "{moved}");
    assert!(copied_kib < 4096, "{moved}");
    Moved {
        read_mib,
        read_ms,
        paused_ms,
        copied_kib,
    }
}

/// How long a writer may wait at most: far less than the kernel's lease-break time, which is
/// how long it would wait if nobody gave the lease up.
fn writer_delay_bound() -> Duration {
    let break_time: u64 = std::fs::read_to_string("/proc/sys/fs/lease-break-time")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(45);
    Duration::from_secs(5).min(Duration::from_secs(break_time) / 4)
}

#[test]
fn a_snapshot_file_truncated_under_its_mapped_guest_is_let_go_and_the_guest_runs_on() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("lease-cut");
    let file = scratch.path("vm.snap");
    let (mut restored, _, at) = restored_mapped_with_filled_memory(&scratch, &file);
    let started = Instant::now();
    nix::unistd::truncate(&file, 4096).expect("truncate the snapshot");
    let waited = started.elapsed();
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 4096);
    let moved = assert_intact_and_running(&mut restored, at);
    eprintln!("truncate(2) waited {waited:?}: {moved}");
    assert!(
        waited < writer_delay_bound(),
        "the writer waited {waited:?}"
    );
}

#[test]
fn a_snapshot_file_rewritten_under_its_mapped_guest_is_let_go_and_the_guest_runs_on() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("lease-rewrite");
    let file = scratch.path("vm.snap");
    let (mut restored, name, at) = restored_mapped_with_filled_memory(&scratch, &file);
    let length = std::fs::metadata(&file).unwrap().len();
    let started = Instant::now();
    let mut writer = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&file)
        .expect("open the snapshot for writing");
    let waited = started.elapsed();
    // Garbage of the same length: pages the guest never touched would read it.
    let garbage: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut written = 0;
    while written < length {
        let n = garbage.len().min((length - written) as usize);
        writer.write_all(&garbage[..n]).unwrap();
        written += n as u64;
    }
    drop(writer);
    let moved = assert_intact_and_running(&mut restored, at);
    eprintln!("open(O_TRUNC) waited {waited:?}: {moved}");
    assert!(
        waited < writer_delay_bound(),
        "the writer waited {waited:?}"
    );

    // The memory that left the file is whole: a checkpoint of it restores as it was.
    let again = scratch.path("again.snap");
    let (code, err) = ctl(
        &scratch.0,
        &name,
        &[format!("--checkpoint={}", again.display())],
    );
    assert_eq!(code, 0, "{err}");
    drop(restored);
    let mut cmd = common::bhyve();
    cmd.arg("-r").arg(&again);
    cmd.args(["-o", "snapshot.restore=copy"]);
    cmd.arg("-o").arg(format!("rundir={}", scratch.0.display()));
    let mut copy = Console::spawn("bhyve -r", cmd);
    assert_eq!(
        copy.command_line("memsum 16"),
        guest::memfill_line(16, 91).replace("memfill 16 MiB seed 91", "memsum 16 MiB")
    );
}
