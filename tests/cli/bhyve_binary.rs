//! The `bhyve` binary itself: exit statuses and where its output goes.

use std::process::{Command, Output};

fn bhyve(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bhyve"))
        .args(args)
        .output()
        .expect("the bhyve binary runs")
}

#[test]
fn help_prints_usage_on_stderr_and_exits_0() {
    let out = bhyve(&["-h"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("Usage: bhyve [-aCDeHhPSuWwxY]\n"), "{err}");
    assert!(err.contains("-u: RTC keeps UTC time"));
    assert!(!err.contains("-c vcpus"));
}

#[test]
fn bad_option_prints_diagnostic_and_usage_and_exits_1() {
    let out = bhyve(&["-Q", "vm"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let mut lines = err.lines();
    assert_eq!(lines.next(), Some("bhyve: illegal option -- Q"));
    assert_eq!(lines.next(), Some("Usage: bhyve [-aCDeHhPSuWwxY]"));
}

#[test]
fn bad_memsize_is_one_line_and_exit_64() {
    let out = bhyve(&["-m", "12Q", "vm"]);
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "bhyve: invalid memsize '12Q'\n"
    );
}

#[test]
fn config_dump_prints_keys_on_stdout_and_exits_1() {
    let out = bhyve(&[
        "-c",
        "2",
        "-s",
        "0,hostbridge",
        "-o",
        "config.dump=1",
        "vm0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    for key in [
        "acpi_tables=true",
        "memory.size=256M",
        "cpus=2",
        "pci.0.0.0.device=hostbridge",
        "config.dump=1",
        "name=vm0",
    ] {
        assert!(lines.contains(&key), "{key} missing from {text}");
    }
    assert!(out.stderr.is_empty());
}

#[test]
fn unknown_device_probe_names_three_field_slot() {
    let out = bhyve(&["-s", "0,nosuchdev"]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "pci slot 0:0:0: unknown device \"nosuchdev\"\n"
    );
}

#[test]
fn device_list_goes_to_stdout() {
    let out = bhyve(&["-s", "help"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    // What this build implements, aliases included, as FreeBSD lists what it has built in;
    // emulations it only knows the syntax of are left out.
    assert!(text.lines().any(|l| l == "hostbridge"));
    assert!(text.lines().any(|l| l == "amd_hostbridge"));
    assert!(text.lines().any(|l| l == "lpc"));
    assert!(text.lines().any(|l| l == "virtio-blk"));
    assert!(text.lines().any(|l| l == "virtio-rnd"));
    assert!(text.lines().any(|l| l == "virtio-net"));
    assert!(text.lines().any(|l| l == "virtio-console"));
    assert!(text.lines().any(|l| l == "nvme"));
    assert!(text.lines().any(|l| l == "ahci"));
    assert!(text.lines().any(|l| l == "ahci-hd"));
    assert!(text.lines().any(|l| l == "e1000"));
}

#[test]
fn every_emulation_not_implemented_yet_is_named_in_one_run() {
    let out = bhyve(&[
        "-s",
        "0,hostbridge",
        "-s",
        "2,xhci,tablet",
        "-s",
        "3,hda",
        // Implemented, with a missing disk: the refusal of the others comes first.
        "-s",
        "5,virtio-blk,/nonexistent/disk.img",
        "-o",
        "boot.kernel=/nonexistent/kernel",
        "vm",
    ]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "bhyve: devices: pci slot 0:2:0: device emulation \"xhci\" is not supported yet\n\
         bhyve: devices: pci slot 0:3:0: device emulation \"hda\" is not supported yet\n"
    );
}

#[test]
fn an_emulation_not_implemented_yet_is_one_line_before_any_vm_exists() {
    let args = [
        "-s",
        "0,hostbridge",
        "-s",
        "2,xhci,tablet",
        "-o",
        "boot.kernel=/nonexistent/kernel",
        "vm",
    ];
    let out = bhyve(&args);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "bhyve: devices: pci slot 0:2:0: device emulation \"xhci\" is not supported yet\n"
    );
    // The configuration can still be dumped for such a device.
    let mut dump = args.to_vec();
    dump.splice(0..0, ["-o", "config.dump=1"]);
    let out = bhyve(&dump);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("pci.0.2.0.device=xhci"));
}

#[test]
fn a_disk_that_cannot_be_opened_is_one_line_before_any_vm_exists() {
    let out = bhyve(&[
        "-s",
        "0,hostbridge",
        "-s",
        "2,virtio-blk,/nonexistent/disk.img,ro",
        "-o",
        "boot.kernel=/nonexistent/kernel",
        "vm",
    ]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "bhyve: devices: pci slot 0:2:0: Could not open backing file: /nonexistent/disk.img: \
         No such file or directory (os error 2)\n"
    );
}

#[test]
fn freebsd_network_backends_are_refused_by_name_before_any_vm_exists() {
    for (backend, facility) in [("netgraph", "netgraph(4)"), ("vale0:1", "netmap(4)")] {
        let slot = format!("2,virtio-net,{backend}");
        let out = bhyve(&[
            "-s",
            "0,hostbridge",
            "-s",
            &slot,
            "-o",
            "boot.kernel=/nonexistent/kernel",
            "vm",
        ]);
        assert_eq!(out.status.code(), Some(4));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with(&format!(
                "bhyve: devices: pci slot 0:2:0: network backend \"{backend}\" needs {facility}"
            )),
            "{stderr}"
        );
    }
}
