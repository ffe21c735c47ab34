//! End to end: `bhyve` boots a stock Debian cloud kernel with a busybox initramfs (both built by
//! tests/linux-guest/build.sh from Debian packages) through direct kernel boot, and the guest
//! prints its ready line on COM1.
//!
//! A stock kernel needs hardware virtualization (see docs on test machines: without VT-x/AMD-V,
//! KVM cannot emulate everything a kernel does in ring 0), so the test runs only when
//! /proc/cpuinfo lists `vmx` or `svm`, and says why it skips otherwise.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const READY_LINE: &str = "bhyve-rs linux guest: ready";
const BOOT_LIMIT: Duration = Duration::from_secs(300);

fn has_hardware_virtualization() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

fn kvm_usable() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("BHYVE_RS_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("BHYVE_RS_REQUIRE_KVM=1 but /dev/kvm cannot be opened: {e}");
            }
            eprintln!("skipped: /dev/kvm cannot be opened: {e}");
            false
        }
    }
}

#[test]
fn debian_kernel_boots_to_the_ready_line_on_com1() {
    if !has_hardware_virtualization() {
        eprintln!(
            "skipped: no vmx/svm flag in /proc/cpuinfo; without hardware virtualization KVM \
             emulates guest kernel code and cannot run a stock Linux kernel"
        );
        return;
    }
    if !kvm_usable() {
        return;
    }
    let tests = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests");
    let cache = tests.join("guest/.cache");
    if !cache.join("vmlinuz").exists() || !cache.join("initramfs.cpio.gz").exists() {
        let status = Command::new("bash")
            .arg(tests.join("linux-guest/build.sh"))
            .status()
            .expect("run tests/linux-guest/build.sh");
        assert!(status.success(), "tests/linux-guest/build.sh failed");
    }

    let mut child = Command::new(env!("CARGO_BIN_EXE_bhyve"))
        .args([
            "-c",
            "1",
            "-m",
            "512M",
            "-s",
            "0,hostbridge",
            "-s",
            "31,lpc",
        ])
        .args(["-l", "com1,stdio"])
        .arg("-o")
        .arg(format!("boot.kernel={}", cache.join("vmlinuz").display()))
        .arg("-o")
        .arg(format!(
            "boot.initrd={}",
            cache.join("initramfs.cpio.gz").display()
        ))
        .args(["-o", "boot.cmdline=console=ttyS0 panic=-1", "linuxguest"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start bhyve");
    let stdout = child.stdout.take().expect("bhyve stdout");
    let (lines, seen) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let started = Instant::now();
    let mut transcript = Vec::new();
    let ready = loop {
        let left = BOOT_LIMIT.saturating_sub(started.elapsed());
        match seen.recv_timeout(left) {
            Ok(line) => {
                let done = line.contains(READY_LINE);
                transcript.push(line);
                if done {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        ready,
        "no ready line within {BOOT_LIMIT:?}; console said:\n{}",
        transcript.join("\n")
    );
}
