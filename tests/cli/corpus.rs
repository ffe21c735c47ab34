//! Table-driven command-line corpus: real client command lines and the configuration FreeBSD's
//! bhyve builds from them.
//!
//! Each `tests/cli/corpus/*.txt` file holds cases:
//!
//! ```text
//! == title                     starts a case
//! % feature bhyve_snapshot     run only with (or `% nofeature …` only without) the feature
//! % file NAME                  a temporary file whose lines follow as `| …`; `{NAME}` in the
//! | line                       command line becomes its path
//! $ bhyve -c 1 … \             the command line, shell-quoted; more lines may follow
//!   -s 0,hostbridge vm         (indented) while the previous one ends in a backslash
//! ? run | exit N               expected outcome: a VM to run, or an exit status
//! = key=value                  expected variable; with any `=` line the set is exact
//! ! key                        variable that must be absent
//! + partial                    `=` lines are a subset, not the whole tree
//! ~ text                       the first stderr line
//! ~~ text                      some stderr line
//! !~ text                      no stderr line contains this
//! > text                       some stdout line
//! ```

mod corpus_cases;

use std::collections::BTreeMap;
use std::path::PathBuf;

use corpus_cases::{parse_corpus, shell_words, Case};

use bhyve::cli::{parse_bhyve_args, Invocation};

fn feature_enabled(name: &str) -> bool {
    match name {
        "bhyve_snapshot" => cfg!(feature = "bhyve_snapshot"),
        other => panic!("unknown feature {other}"),
    }
}

/// Run one case; returns a description of every mismatch.
fn check(case: &Case, tmp: &std::path::Path) -> Vec<String> {
    let mut paths = Vec::new();
    for (name, lines) in &case.files {
        let path = tmp.join(format!("case{}-{name}", case.line));
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(&path, text).expect("write corpus file");
        paths.push((format!("{{{name}}}"), path.to_string_lossy().into_owned()));
    }
    let subst = |s: &str| {
        paths
            .iter()
            .fold(s.to_string(), |acc, (from, to)| acc.replace(from, to))
    };
    let args = shell_words(&subst(&case.command));
    let mut problems = Vec::new();
    let (status, keys, stdout, stderr) = match parse_bhyve_args(&args) {
        Ok(Invocation::Run { config, .. }) => {
            let keys: BTreeMap<String, String> = config
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            ("run".to_string(), Some(keys), String::new(), String::new())
        }
        Ok(Invocation::Exit {
            stdout,
            stderr,
            status,
        }) => (format!("exit {status}"), None, stdout, stderr),
        Err(e) => (format!("exit {}", e.status), None, String::new(), e.text()),
    };
    let want_status = case.status.clone().unwrap_or_else(|| "run".to_string());
    if status != want_status {
        problems.push(format!(
            "status: got {status:?}, want {want_status:?}; stderr: {stderr}"
        ));
    }
    if let Some(keys) = &keys {
        for (k, v) in &case.keys {
            match keys.get(k) {
                Some(got) if got == v => {}
                got => problems.push(format!("{k}: got {got:?}, want {v:?}")),
            }
        }
        if !case.partial && !case.keys.is_empty() {
            for (k, v) in keys {
                if !case.keys.contains_key(k) {
                    problems.push(format!("unexpected {k}={v}"));
                }
            }
        }
        for k in &case.absent {
            if let Some(v) = keys.get(k) {
                problems.push(format!("{k} should be absent, is {v:?}"));
            }
        }
    } else if !case.keys.is_empty() {
        problems.push("keys expected but no configuration was built".to_string());
    }
    let err_lines: Vec<&str> = stderr.lines().collect();
    if let Some(first) = case.stderr_first.as_deref().map(subst) {
        if err_lines.first() != Some(&first.as_str()) {
            problems.push(format!(
                "first stderr line: got {:?}, want {first:?}",
                err_lines.first()
            ));
        }
    }
    for want in case.stderr_has.iter().map(|w| subst(w)) {
        if !err_lines.contains(&want.as_str()) {
            problems.push(format!("stderr lacks line {want:?}"));
        }
    }
    for bad in &case.stderr_lacks {
        if stderr.contains(bad.as_str()) {
            problems.push(format!("stderr contains {bad:?}"));
        }
    }
    for want in &case.stdout_has {
        if !stdout.lines().any(|l| l == want) {
            problems.push(format!("stdout lacks line {want:?}"));
        }
    }
    problems
}

#[test]
fn corpus_command_lines_build_freebsd_configuration() {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/cli/corpus"));
    let tmp = std::env::temp_dir().join(format!("bhyve-corpus-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("temp dir");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("corpus directory")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    let mut ran = 0;
    let mut failures = Vec::new();
    for file in &files {
        let name = file
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(file).expect("corpus file");
        for case in parse_corpus(&name, &text) {
            if let Some((want, feature)) = &case.feature {
                if feature_enabled(feature) != *want {
                    continue;
                }
            }
            ran += 1;
            let problems = check(&case, &tmp);
            if !problems.is_empty() {
                failures.push(format!("{}:\n    {}", case.title, problems.join("\n    ")));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    // Every case of the corpus files; a lower count means cases went missing. Two cases run only
    // with snapshot support and one only without it.
    let expected = if cfg!(feature = "bhyve_snapshot") {
        213
    } else {
        212
    };
    assert!(ran >= expected, "only {ran} of {expected} corpus cases ran");
    assert!(
        failures.is_empty(),
        "{} of {ran} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn shell_words_follow_posix_quoting() {
    assert_eq!(
        shell_words("bhyve \\\n-o 'board.version=0B98401 Pro' \"a\\\"b\" x\\ y"),
        vec!["bhyve", "-o", "board.version=0B98401 Pro", "a\"b", "x y"]
    );
    assert_eq!(shell_words("a '' b"), vec!["a", "", "b"]);
}
