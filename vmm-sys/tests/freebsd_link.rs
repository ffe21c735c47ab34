//! The binaries `make link-freebsd` links for `x86_64-unknown-freebsd` (cargo-zigbuild, zig's
//! FreeBSD libc stubs) must be what a FreeBSD 14 or later amd64 kernel runs: 64-bit x86-64 ELF
//! executables, FreeBSD's run-time linker as interpreter, FreeBSD's ABI note, and FreeBSD's libc.
//! A linker that silently fell back to the host's target would fail here.
//!
//! The Makefile passes the files in `BHYVE_RS_FREEBSD_BINARIES` (separated by `:`); without it
//! (a plain `cargo test`) the check of real binaries is skipped with a message.

#[path = "common/elf.rs"]
mod elf;

use std::io::Write;

use elf::Elf;

/// FreeBSD's run-time linker (`rtld`), which its kernel loads for dynamic executables.
const FREEBSD_INTERPRETER: &str = "/libexec/ld-elf.so.1";
/// `NT_FREEBSD_ABI_TAG`: a note named "FreeBSD" whose 4-byte payload is `__FreeBSD_version`.
const NT_FREEBSD_ABI_TAG: u32 = 1;
/// FreeBSD's libc soname (Linux glibc's is libc.so.6).
const FREEBSD_LIBC: &str = "libc.so.7";
/// The oldest and first-unsupported `__FreeBSD_version` of the ABI the binaries target.
const OLDEST_ABI: u32 = 1_400_000;
const NEWER_THAN_TARGET: u32 = 1_500_000;

/// What was found in a file that passed every check.
#[derive(Debug)]
struct FreebsdExecutable {
    abi_version: u32,
    needed: Vec<String>,
}

/// Checks one file, returning every problem found (not just the first).
fn check_freebsd_executable(bytes: &[u8]) -> Result<FreebsdExecutable, Vec<String>> {
    let elf = Elf::parse(bytes).map_err(|e| vec![e])?;
    let mut problems = Vec::new();
    if elf.machine != elf::EM_X86_64 {
        problems.push(format!("machine {} is not x86-64", elf.machine));
    }
    if elf.file_type != elf::ET_EXEC && elf.file_type != elf::ET_DYN {
        problems.push(format!("ELF type {} is not an executable", elf.file_type));
    }
    // FreeBSD brands an executable by its ABI note (and interpreter); lld leaves EI_OSABI at 0
    // for zig's FreeBSD target, FreeBSD's own toolchain sets 9. Anything else is another system.
    if elf.os_abi != elf::ELFOSABI_NONE && elf.os_abi != elf::ELFOSABI_FREEBSD {
        problems.push(format!(
            "EI_OSABI {} is neither 0 nor FreeBSD (9)",
            elf.os_abi
        ));
    }
    match elf.interpreter() {
        Ok(Some(path)) if path == FREEBSD_INTERPRETER => {}
        Ok(Some(path)) => problems.push(format!(
            "interpreter {path}, expected {FREEBSD_INTERPRETER}"
        )),
        Ok(None) => problems.push("no PT_INTERP: not a dynamic FreeBSD executable".into()),
        Err(e) => problems.push(format!("program headers: {e}")),
    }
    let abi_version = match elf.notes() {
        Ok(notes) => notes
            .iter()
            .find(|note| note.name == b"FreeBSD" && note.kind == NT_FREEBSD_ABI_TAG)
            .and_then(|note| Some(u32::from_le_bytes(note.desc.try_into().ok()?))),
        Err(e) => {
            problems.push(format!("notes: {e}"));
            None
        }
    };
    match abi_version {
        Some(version) if (OLDEST_ABI..NEWER_THAN_TARGET).contains(&version) => {}
        Some(version) => problems.push(format!(
            "FreeBSD ABI note says {version}, expected a FreeBSD 14 version \
             ({OLDEST_ABI}..{NEWER_THAN_TARGET})"
        )),
        None => problems.push("no FreeBSD ABI note (NT_FREEBSD_ABI_TAG)".into()),
    }
    let needed = elf.needed_libraries().unwrap_or_else(|e| {
        problems.push(format!("dynamic section: {e}"));
        Vec::new()
    });
    if !needed.iter().any(|name| name == FREEBSD_LIBC) {
        problems.push(format!("does not need {FREEBSD_LIBC}; needs {needed:?}"));
    }
    if problems.is_empty() {
        Ok(FreebsdExecutable {
            abi_version: abi_version.unwrap_or_default(),
            needed,
        })
    } else {
        Err(problems)
    }
}

#[test]
fn linked_binaries_are_freebsd_amd64_executables() {
    let Some(list) = std::env::var_os("BHYVE_RS_FREEBSD_BINARIES").filter(|v| !v.is_empty()) else {
        let _ = writeln!(
            std::io::stderr(),
            "SKIP linked_binaries_are_freebsd_amd64_executables: BHYVE_RS_FREEBSD_BINARIES \
             is unset (`make link-freebsd` links the binaries and sets it)"
        );
        return;
    };
    let mut problems = Vec::new();
    let mut checked = 0;
    for path in std::env::split_paths(&list) {
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) => {
                problems.push(format!("{}: {e}", path.display()));
                continue;
            }
        };
        match check_freebsd_executable(&bytes) {
            Ok(found) => {
                checked += 1;
                let _ = writeln!(
                    std::io::stderr(),
                    "{}: FreeBSD amd64 executable, ABI {}, {FREEBSD_INTERPRETER}, needs {}",
                    path.display(),
                    found.abi_version,
                    found.needed.join(" ")
                );
            }
            Err(found) => problems.extend(
                found
                    .into_iter()
                    .map(|problem| format!("{}: {problem}", path.display())),
            ),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(checked > 0, "BHYVE_RS_FREEBSD_BINARIES names no file");
}

#[test]
fn a_linux_executable_is_rejected() {
    // This test binary is a Linux one: the check must say why it is not a FreeBSD executable.
    let bytes = std::fs::read("/proc/self/exe").expect("read own executable");
    let problems = check_freebsd_executable(&bytes).expect_err("a Linux binary passed");
    let all = problems.join("\n");
    assert!(all.contains("interpreter"), "{all}");
    assert!(all.contains("no FreeBSD ABI note"), "{all}");
    assert!(all.contains(FREEBSD_LIBC), "{all}");
}

#[test]
fn a_file_that_is_not_elf_is_rejected() {
    let problems = check_freebsd_executable(b"#!/bin/sh\nexit 0\n").expect_err("a script passed");
    assert_eq!(problems, ["not an ELF file"]);
}
