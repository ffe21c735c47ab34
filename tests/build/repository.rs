//! Rules for the repository's own test set-up: the Makefile's test targets, and where the tests
//! let bhyve put its control sockets.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives in the workspace")
        .to_path_buf()
}

/// A directory under the build's temporary space holding a fake `cargo` that appends its
/// arguments to `calls` and exits 101 (cargo's status for failed tests) for `cargo test`.
fn failing_cargo(name: &str) -> (PathBuf, PathBuf) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    let calls = dir.join("calls");
    let cargo = dir.join("cargo");
    std::fs::write(
        &cargo,
        format!(
            "#!/bin/sh\necho \"$*\" >> '{}'\n[ \"$1\" = test ] && exit 101\nexit 0\n",
            calls.display()
        ),
    )
    .expect("fake cargo");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&cargo, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    (cargo, calls)
}

/// The test targets, run with a stand-in for cargo that records its arguments and fails every
/// `cargo test`: each test run keeps going past a failing test binary (`--no-fail-fast`) and
/// `make` still exits non-zero.
#[test]
fn test_targets_run_every_test_binary_and_still_fail() {
    if Command::new("make").arg("--version").output().is_err() {
        eprintln!("NOTICE: skipped, no make on this host");
        return;
    }
    for target in ["test-default", "test-snapshot"] {
        let (cargo, calls) = failing_cargo(target);
        let out = Command::new("make")
            .arg("-s")
            .arg("-C")
            .arg(repo_root())
            .arg(format!("CARGO={}", cargo.display()))
            .arg(target)
            .output()
            .expect("make runs");
        assert!(
            !out.status.success(),
            "make {target} passed although cargo test failed"
        );
        let calls = std::fs::read_to_string(&calls).expect("cargo was called");
        let tests: Vec<&str> = calls.lines().filter(|l| l.starts_with("test")).collect();
        assert!(!tests.is_empty(), "make {target} ran no tests: {calls}");
        for call in tests {
            assert!(
                call.split_whitespace().any(|a| a == "--no-fail-fast"),
                "make {target} stops at the first failing test binary: cargo {call}"
            );
        }
    }
}

/// The Rust files under `dir`, skipping build output and the guests (which never start bhyve).
fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("test directory") {
        let path = entry.expect("directory entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            if !["target", "guests"].contains(&name) {
                rust_files(&path, found);
            }
        } else if name.ends_with(".rs") {
            found.push(path);
        }
    }
}

/// A test that starts bhyve without `-o rundir=` would put its socket in the host's
/// /var/run/bhyve. The end-to-end helpers add a run directory of the test process's own (and
/// refuse to spawn a bhyve without one); this checks that no test goes around them.
#[test]
fn every_bhyve_a_test_starts_has_a_run_directory_of_its_own() {
    let root = repo_root();
    let mut files = Vec::new();
    rust_files(&root.join("tests"), &mut files);
    rust_files(&root.join("bhyve-rs/tests"), &mut files);
    // The helpers themselves, and the command-line tests, whose command lines all end before
    // a VM (and its socket) exists.
    let allowed = [
        root.join("tests/e2e/common/mod.rs"),
        root.join("tests/cli/bhyve_binary.rs"),
        root.join("tests/build/repository.rs"),
    ];
    let mut offenders = Vec::new();
    for file in files.iter().filter(|f| !allowed.contains(f)) {
        let text = std::fs::read_to_string(file).expect("test source");
        for (n, line) in text.lines().enumerate() {
            if line.contains("Command::new(env!(\"CARGO_BIN_EXE_bhyve\"))")
                || line.contains("DEFAULT_RUNDIR")
            {
                offenders.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(files.len() > 10, "found only {files:?}");
    assert!(
        offenders.is_empty(),
        "bhyve started without common::bhyve()/bhyve_at():\n{}",
        offenders.join("\n")
    );
}

/// The commands `make -n` prints for `args`.
fn dry_run(args: &[&str]) -> Vec<String> {
    let out = Command::new("make")
        .arg("-n")
        .arg("-C")
        .arg(repo_root())
        .args(args)
        .output()
        .expect("make runs");
    assert!(out.status.success(), "make -n {args:?} failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// A release build without snapshots after `make demo` (or `make WITH_BHYVE_SNAPSHOT=yes`)
/// used to overwrite the snapshot-enabled binaries, turning `bhyve -r` into an illegal option:
/// every release build with snapshots goes to its own target directory, every one without
/// stays out of it, and the demo and install take the binaries from where they were built.
#[test]
fn release_builds_with_and_without_snapshots_never_share_binaries() {
    if Command::new("make").arg("--version").output().is_err() {
        eprintln!("NOTICE: skipped, no make on this host");
        return;
    }
    let snapshot_dir = "--target-dir target/snapshot";
    let release_builds = |lines: &[String]| -> Vec<String> {
        lines
            .iter()
            .filter(|l| l.contains(" build --release") || l.contains(" test --release"))
            .cloned()
            .collect()
    };
    for args in [
        &["demo"][..],
        &["bench"],
        &["build", "WITH_BHYVE_SNAPSHOT=yes"],
    ] {
        let builds = release_builds(&dry_run(args));
        assert!(!builds.is_empty(), "make {args:?} builds nothing");
        for build in builds {
            assert!(build.contains("bhyve_snapshot"), "make {args:?}: {build}");
            assert!(build.contains(snapshot_dir), "make {args:?}: {build}");
        }
    }
    for build in release_builds(&dry_run(&["build"])) {
        assert!(!build.contains("target/snapshot"), "make build: {build}");
        assert!(!build.contains("bhyve_snapshot"), "make build: {build}");
    }
    let demo = dry_run(&["demo"]);
    assert!(
        demo.iter()
            .any(|l| l.contains("BHYVE_BIN_DIR=target/snapshot/release") && l.contains("demo.sh")),
        "{demo:?}"
    );
    let demo_script = std::fs::read_to_string(repo_root().join("tests/demo.sh")).unwrap();
    assert!(demo_script.contains("${BHYVE_BIN_DIR:-target/snapshot/release}"));
    let install = dry_run(&["install", "WITH_BHYVE_SNAPSHOT=yes", "DESTDIR=/nonexistent"]);
    assert!(
        install
            .iter()
            .any(|l| l.contains("target/snapshot/release/bhyve target/snapshot/release/bhyvectl")),
        "{install:?}"
    );
    let install = dry_run(&["install", "DESTDIR=/nonexistent"]);
    assert!(
        install
            .iter()
            .any(|l| l.contains("target/release/bhyve target/release/bhyvectl")),
        "{install:?}"
    );
}

/// README's table of what works lists exactly the `-s` emulations this build runs: each name of
/// `bhyve -s help` is tried in a command line that stops before a VM exists.
#[test]
fn readme_names_the_pci_emulations_that_run() {
    let bhyve = env!("CARGO_BIN_EXE_bhyve");
    let help = Command::new(bhyve).args(["-s", "help"]).output().unwrap();
    let runs: std::collections::BTreeSet<String> = String::from_utf8_lossy(&help.stdout)
        .lines()
        .filter(|name| {
            let mut cmd = Command::new(bhyve);
            cmd.args(["-c", "1", "-m", "64M", "-s", "0,hostbridge", "-s", "31,lpc"]);
            if *name != "lpc" {
                cmd.args(["-s", &format!("3,{name}")]);
            }
            cmd.args(["-l", "com1,stdio", "-o", "boot.kernel=/nonexistent", "vm"]);
            let out = cmd.output().unwrap();
            // Past the devices, loading the kernel is what fails.
            String::from_utf8_lossy(&out.stderr).contains("boot.kernel: /nonexistent")
        })
        .map(str::to_string)
        .collect();
    assert!(runs.contains("hostbridge"), "{runs:?}");

    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let row = readme
        .lines()
        .find(|l| l.starts_with("| `-s` emulations |"))
        .expect("README has a row for the -s emulations");
    let linux = row.split('|').nth(2).expect("a Linux column");
    let listed: std::collections::BTreeSet<String> = linux
        .split(';')
        .next()
        .unwrap()
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    assert_eq!(listed, runs, "README: {linux}");
}
