//! The crate's layering, checked: a module uses only modules below it (see the crate
//! documentation), so there is no import cycle and data flows one way.

use std::path::{Path, PathBuf};

/// Every top-level module, lowest first. A module may use those before it and itself.
const LAYERS: &[&str] = &[
    // The configuration and what it describes, and the plain parts everything shares.
    "config",
    "memory",
    "description",
    "bus",
    "interrupts",
    "lifecycle",
    "logging",
    "proctitle",
    "affinity",
    // The backend seam.
    "vmm",
    // The snapshot file format and the control protocol.
    "snapshot",
    "control",
    // Devices, then the firmware tables that describe them and the boot loaders.
    "devices",
    "mptable",
    "acpi",
    "boot",
    "bootrom",
    "firmware",
    // Building and running a machine.
    "vcpu",
    "machine",
    // argv into a configuration tree, above everything it names (the device registry).
    "cli",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read the source directory") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file that is not test code: test files are skipped, and a file's own test
/// module (`#[cfg(test)]` followed by a `mod`) ends what is read.
fn production_code(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    if name == "tests.rs" || name.ends_with("_tests.rs") {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    let mut code = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#[cfg(test)]")
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().starts_with("mod "))
        {
            break;
        }
        if !trimmed.starts_with("//") {
            code.push_str(line);
            code.push('\n');
        }
    }
    Some(code)
}

/// The top-level modules `code` names as `crate::NAME`.
fn crate_modules(code: &str) -> Vec<String> {
    let mut names: Vec<String> = code
        .match_indices("crate::")
        .map(|(at, prefix)| {
            code[at + prefix.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .filter(|name: &String| !name.is_empty())
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn every_module_uses_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let rank = |module: &str| LAYERS.iter().position(|m| *m == module);
    let mut violations = Vec::new();
    for path in files {
        let relative = path.strip_prefix(&src).expect("below src");
        let top = relative
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|c| c.trim_end_matches(".rs").to_string())
            .expect("a module name");
        if ["lib", "main", "layering_tests", "test_rng"].contains(&top.as_str()) {
            continue;
        }
        let Some(own) = rank(&top) else {
            violations.push(format!(
                "{}: module {top} is not in LAYERS",
                relative.display()
            ));
            continue;
        };
        let Some(code) = production_code(&path) else {
            continue;
        };
        for used in crate_modules(&code) {
            match rank(&used) {
                Some(r) if r <= own => {}
                Some(_) => violations.push(format!("{}: {top} uses {used}", relative.display())),
                None => violations.push(format!("{}: uses unknown {used}", relative.display())),
            }
        }
    }
    assert!(
        violations.is_empty(),
        "imports against the layering:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_layering_check_names_every_module_a_file_uses() {
    let code = "use crate::machine::Machine;\nlet d = crate::devices::Devices::default();\n";
    assert_eq!(crate_modules(code), ["devices", "machine"]);
}
