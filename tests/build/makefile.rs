//! The Makefile's test targets, run with a stand-in for cargo that records its arguments and
//! fails every `cargo test`: each test run keeps going past a failing test binary
//! (`--no-fail-fast`) and `make` still exits non-zero.

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
