//! End to end: `bhyve` boots a stock Debian cloud kernel with a busybox initramfs (both built by
//! tests/linux-guest/build.sh from Debian packages) through direct kernel boot; the tests then
//! drive the guest's shell on COM1 and check what Linux sees of the platform and how bhyve ends.
//!
//! A stock kernel needs hardware virtualization (without VT-x/AMD-V, KVM emulates guest kernel
//! code one instruction at a time and cannot emulate all of it), so the bhyve tests run only when
//! /proc/cpuinfo lists `vmx` or `svm`, and say why they skip otherwise. The same guest image also
//! boots under QEMU's TCG everywhere, which checks the image and what these tests expect of a
//! PC platform against an independent implementation.

#[path = "../e2e/common/mod.rs"]
mod common;

use common::Console;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

const READY_LINE: &str = "bhyve-rs linux guest: ready";
const BOOT_LIMIT: Duration = Duration::from_secs(300);
const SHELL_LIMIT: Duration = Duration::from_secs(60);

fn has_hardware_virtualization() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// The kernel and initramfs, built once per test process. The script always runs: the Debian
/// packages stay cached, and the initramfs follows any change to the script in seconds.
fn guest_files() -> &'static (PathBuf, PathBuf) {
    static FILES: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    FILES.get_or_init(|| {
        let tests = common::repo_root().join("tests");
        let output = Command::new("bash")
            .arg(tests.join("linux-guest/build.sh"))
            .output()
            .expect("run tests/linux-guest/build.sh");
        assert!(
            output.status.success(),
            "tests/linux-guest/build.sh failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let cache = tests.join("guest/.cache");
        (cache.join("vmlinuz"), cache.join("initramfs.cpio.gz"))
    })
}

/// Boots the Debian guest with `cpus` vCPUs and waits for its shell; `None` (with the reason
/// printed) where this host cannot run it.
fn boot_linux(cpus: u32) -> Option<Console> {
    if !has_hardware_virtualization() {
        common::notice(
            "no vmx/svm flag in /proc/cpuinfo; without hardware virtualization KVM emulates \
             guest kernel code and cannot run a stock Linux kernel",
        );
        return None;
    }
    if !common::kvm_usable() {
        return None;
    }
    let (kernel, initrd) = guest_files();
    let mut cmd = common::bhyve();
    cmd.args(["-c", &cpus.to_string(), "-m", "512M", "-A", "-H", "-P"])
        .args(["-s", "0,hostbridge", "-s", "31,lpc", "-l", "com1,stdio"])
        .arg("-o")
        .arg(format!("boot.kernel={}", kernel.display()))
        .arg("-o")
        .arg(format!("boot.initrd={}", initrd.display()))
        .args(["-o", "boot.cmdline=console=ttyS0 panic=-1"])
        .arg(common::vm_name());
    let mut vm = Console::spawn("bhyve", cmd);
    vm.expect(READY_LINE, BOOT_LIMIT);
    Some(vm)
}

/// Runs a shell command whose output carries `marker=`, and returns the value after it. The
/// marker is built by the shell (`echo m""arker=`), so the terminal's echo of the typed line
/// never matches.
fn shell_value(vm: &mut Console, marker: &str, command: &str) -> String {
    let (head, tail) = marker.split_at(1);
    vm.send_line(&format!("echo \"{head}\"\"{tail}=$({command})\""));
    vm.expect(&format!("{marker}="), SHELL_LIMIT);
    vm.expect("\n", SHELL_LIMIT).trim().to_string()
}

/// Boots the same guest under QEMU (TCG) with a monitor socket at `monitor`.
fn boot_linux_qemu(cpus: u32, monitor: &Path) -> Option<Console> {
    let qemu = common::qemu_binary()?;
    let (kernel, initrd) = guest_files();
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display",
        "none",
    ])
    .args(["-accel", "tcg", "-m", "512", "-smp", &cpus.to_string()])
    .args(["-serial", "stdio", "-monitor"])
    .arg(format!("unix:{},server,nowait", monitor.display()))
    .arg("-kernel")
    .arg(kernel)
    .arg("-initrd")
    .arg(initrd)
    .args(["-append", "console=ttyS0 panic=-1"]);
    let mut vm = Console::spawn("qemu", cmd);
    vm.expect(READY_LINE, BOOT_LIMIT);
    Some(vm)
}

/// What Linux must find on any PC platform these tests boot it on: every vCPU, a host bridge,
/// ACPI tables without errors and an SCI.
fn check_platform(vm: &mut Console, cpus: u32) -> String {
    assert_eq!(shell_value(vm, "nproc", "nproc"), cpus.to_string());
    let pci = shell_value(vm, "pci", "ls /sys/bus/pci/devices | tr '\\n' ' '");
    assert!(pci.contains("0000:00:00.0"), "hostbridge missing: {pci}");
    let acpi_errors = shell_value(
        vm,
        "acpierrors",
        "dmesg | grep -cE 'ACPI( BIOS)? (Error|Exception|Warning)'",
    );
    assert_eq!(acpi_errors, "0", "{}", vm.transcript());
    let sci = shell_value(vm, "sci", "grep -c acpi /proc/interrupts");
    assert_ne!(sci, "0", "no SCI in /proc/interrupts");
    // acpid must be listening for the power button tests.
    assert_ne!(shell_value(vm, "acpid", "pidof acpid"), "");
    pci
}

#[test]
fn debian_guest_under_qemu_sees_the_platform_and_obeys_the_power_button() {
    let dir = std::env::temp_dir().join(format!("bhyve-rs-linux-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    let monitor = dir.join("monitor");
    let Some(mut vm) = boot_linux_qemu(2, &monitor) else {
        return;
    };
    check_platform(&mut vm, 2);
    let mut control = UnixStream::connect(&monitor).expect("QEMU monitor socket");
    control
        .write_all(b"system_powerdown\n")
        .expect("press the power button");
    vm.expect("bhyve-rs linux guest: power button", SHELL_LIMIT);
    let status = vm.wait_exit(SHELL_LIMIT);
    assert!(status.success(), "QEMU after poweroff: {status}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn debian_guest_sees_every_vcpu_the_pci_bus_and_clean_acpi() {
    let Some(mut vm) = boot_linux(2) else {
        return;
    };
    let pci = check_platform(&mut vm, 2);
    assert!(pci.contains("0000:00:1f.0"), "LPC bridge missing: {pci}");
    let lpc = shell_value(
        &mut vm,
        "lpcid",
        "cat /sys/bus/pci/devices/0000:00:1f.0/vendor",
    );
    assert_eq!(lpc, "0x8086");
    vm.send_line("poweroff -f");
    let status = vm.wait_exit(SHELL_LIMIT);
    assert_eq!(
        status.code(),
        Some(1),
        "poweroff: {status}: {}",
        vm.stderr()
    );
}

#[test]
fn debian_guest_reboot_ends_bhyve_with_0() {
    let Some(mut vm) = boot_linux(1) else {
        return;
    };
    vm.send_line("reboot -f");
    let status = vm.wait_exit(SHELL_LIMIT);
    assert_eq!(status.code(), Some(0), "reboot: {status}: {}", vm.stderr());
}

#[test]
fn sigterm_presses_the_power_button_and_the_debian_guest_powers_off() {
    let Some(mut vm) = boot_linux(1) else {
        return;
    };
    // acpid must be listening before the button is pressed.
    assert_ne!(shell_value(&mut vm, "acpid", "pidof acpid"), "");
    let pid = vm.pid().to_string();
    let kill = Command::new("kill").args(["-TERM", &pid]).status();
    assert!(kill.is_ok_and(|s| s.success()));
    vm.expect("bhyve-rs linux guest: power button", SHELL_LIMIT);
    let status = vm.wait_exit(SHELL_LIMIT);
    assert_eq!(status.code(), Some(1), "SIGTERM: {status}: {}", vm.stderr());
}
