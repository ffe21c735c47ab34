//! The `bhyvectl` binary: usage, exit statuses, unsupported actions, snapshot requests.

use std::process::{Command, Output};

fn bhyvectl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bhyvectl"))
        .args(args)
        .env_remove("POSIXLY_CORRECT")
        .output()
        .expect("the bhyvectl binary runs")
}

#[test]
fn no_arguments_prints_usage_and_exits_1() {
    let out = bhyvectl(&[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("Usage: bhyvectl --vm=<vmname>\n"), "{err}");
    assert!(err.contains("       [--destroy]\n"));
    assert_eq!(
        err.contains("[--suspend=<filename>]"),
        cfg!(feature = "bhyve_snapshot")
    );
}

#[test]
fn unknown_and_ambiguous_options_print_diagnostic_then_usage() {
    let out = bhyvectl(&["--vm=x", "--frobnicate"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.lines().next(),
        Some("bhyvectl: unrecognized option `--frobnicate'")
    );
    let out = bhyvectl(&["--vm=x", "--get-r"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.lines().next(),
        Some("bhyvectl: option `--get-r' is ambiguous")
    );
}

#[test]
fn vm_actions_fail_with_one_clear_line() {
    let dir = std::env::temp_dir().join("bhyvectl-no-such-rundir");
    let rundir = format!("--rundir={}", dir.display());
    let out = bhyvectl(&["--destroy", "--vm=nosuchvm", &rundir]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("bhyvectl: no such VM 'nosuchvm' (no control socket at "),
        "{err}"
    );
    // What no platform here can do is refused before any VM is looked for.
    for option in ["--get-vmcs-link", "--get-vmcb-asid"] {
        let out = bhyvectl(&["--vm=nosuchvm", option, &rundir]);
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("unrecognized option") {
            continue; // the other CPU vendor's option
        }
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with(&format!("bhyvectl: {option} ")), "{err}");
    }
}

#[test]
fn status_probe_of_missing_vm_exits_1() {
    let dir = std::env::temp_dir();
    let rundir = format!("--rundir={}", dir.display());
    let out = bhyvectl(&["--vm=no-such-vm-for-bhyvectl-test", &rundir]);
    assert_eq!(out.status.code(), Some(1));
}

#[cfg(feature = "bhyve_snapshot")]
#[test]
fn checkpoint_request_failure_is_reported() {
    let dir = std::env::temp_dir().join("bhyvectl-no-such-rundir");
    let rundir = format!("--rundir={}", dir.display());
    let out = bhyvectl(&["--vm=x", &rundir, "--checkpoint", "/tmp/x.ckp"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("bhyvectl: "));
}

#[cfg(feature = "bhyve_snapshot")]
#[test]
fn a_file_name_with_a_newline_stays_on_one_error_line() {
    let dir = std::env::temp_dir().join("bhyvectl-no-such-rundir");
    let rundir = format!("--rundir={}", dir.display());
    let forged = "/nonexistent-bhyvectl-dir/x\nbhyvectl: checkpoint done/.";
    let out = bhyvectl(&["--vm=x", &rundir, &format!("--checkpoint={forged}")]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "bhyvectl: '/nonexistent-bhyvectl-dir/x\\nbhyvectl: checkpoint done/.': \
         No such file or directory\n"
    );
}

#[cfg(feature = "bhyve_snapshot")]
#[test]
fn verify_snapshot_passes_an_intact_file_and_names_damaged_guest_memory() {
    use bhyve::snapshot::{Backend, HeaderInfo, SnapshotReader, SnapshotWriter};
    use std::os::unix::fs::FileExt;
    let dir = std::env::temp_dir().join(format!("bhyvectl-verify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("vm.snap");
    let mut writer = SnapshotWriter::create(&path, HeaderInfo::this_build(Backend::Kvm)).unwrap();
    writer
        .add_config([("name", "vm"), ("memory.size", "2M")])
        .unwrap();
    let ram: Vec<u8> = (0..6 << 20).map(|i: u32| (i % 251) as u8).collect();
    writer.add_ram_region(0, &ram).unwrap();
    writer.commit().unwrap();
    let arg = format!("--verify-snapshot={}", path.display());

    let out = bhyvectl(&[&arg]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "{}: intact: 3 sections, 1 RAM regions (6 MiB of guest memory) checked\n",
            path.display()
        )
    );
    // Flip one byte of guest memory at 3 MiB: in the second 2 MiB checksum chunk.
    let offset = SnapshotReader::open(&path).unwrap().ram_regions()[0].file_offset;
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&[0], offset + (3 << 20) + 1).unwrap();
    let out = bhyvectl(&[&arg]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "bhyvectl: {}: corrupt snapshot: checksum mismatch in RAM",
            path.display()
        )),
        "{err}"
    );
    assert!(
        err.ends_with("RAM region 0 at guest addresses 0x200000-0x3fffff\n"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}
