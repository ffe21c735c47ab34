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

use std::collections::BTreeMap;
use std::path::PathBuf;

use bhyve::cli::{parse_bhyve_args, Invocation};

/// POSIX shell word splitting (quotes, backslashes, backslash-newline), enough for the corpus.
fn shell_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('\n') | None => {}
                Some(n) => {
                    cur.push(n);
                    in_word = true;
                }
            },
            '\'' => {
                in_word = true;
                for n in chars.by_ref() {
                    if n == '\'' {
                        break;
                    }
                    cur.push(n);
                }
            }
            '"' => {
                in_word = true;
                while let Some(n) = chars.next() {
                    match n {
                        '"' => break,
                        '\\' if matches!(chars.peek(), Some('"' | '\\' | '$' | '`')) => {
                            cur.extend(chars.next());
                        }
                        _ => cur.push(n),
                    }
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

#[derive(Default, Debug)]
struct Case {
    title: String,
    line: usize,
    command: String,
    feature: Option<(bool, String)>,
    files: Vec<(String, Vec<String>)>,
    status: Option<String>,
    keys: BTreeMap<String, String>,
    absent: Vec<String>,
    partial: bool,
    stderr_first: Option<String>,
    stderr_has: Vec<String>,
    stderr_lacks: Vec<String>,
    stdout_has: Vec<String>,
}

fn parse_corpus(name: &str, text: &str) -> Vec<Case> {
    let mut cases: Vec<Case> = Vec::new();
    let mut continuing = false;
    for (n, line) in text.lines().enumerate() {
        let at = || format!("{name}:{}", n + 1);
        if continuing {
            let case = cases.last_mut().expect("continuation inside a case");
            case.command.push('\n');
            case.command.push_str(line.trim_start());
            continuing = line.ends_with('\\');
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(title) = line.strip_prefix("== ") {
            cases.push(Case {
                title: format!("{} ({})", title, at()),
                line: n + 1,
                ..Case::default()
            });
            continue;
        }
        let case = cases
            .last_mut()
            .unwrap_or_else(|| panic!("{}: directive outside a case", at()));
        let (tag, rest) = line.split_once(' ').unwrap_or((line, ""));
        match tag {
            "$" => {
                case.command = rest.to_string();
                continuing = rest.ends_with('\\');
            }
            "?" => case.status = Some(rest.to_string()),
            "=" => {
                let (k, v) = rest
                    .split_once('=')
                    .unwrap_or_else(|| panic!("{}: bad key line", at()));
                case.keys.insert(k.to_string(), v.to_string());
            }
            "!" => case.absent.push(rest.to_string()),
            "+" => case.partial = rest == "partial",
            "~" => case.stderr_first = Some(rest.to_string()),
            "~~" => case.stderr_has.push(rest.to_string()),
            "!~" => case.stderr_lacks.push(rest.to_string()),
            ">" => case.stdout_has.push(rest.to_string()),
            "%" => {
                let mut w = rest.split_whitespace();
                match (w.next(), w.next()) {
                    (Some("feature"), Some(f)) => case.feature = Some((true, f.to_string())),
                    (Some("nofeature"), Some(f)) => case.feature = Some((false, f.to_string())),
                    (Some("file"), Some(f)) => case.files.push((f.to_string(), Vec::new())),
                    _ => panic!("{}: bad % directive", at()),
                }
            }
            "|" => case
                .files
                .last_mut()
                .unwrap_or_else(|| panic!("{}: file line without % file", at()))
                .1
                .push(rest.to_string()),
            _ => panic!("{}: unknown directive {tag:?}", at()),
        }
    }
    cases
}

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
