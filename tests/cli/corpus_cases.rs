//! The corpus file format (see tests/cli/corpus.rs for its directives) and its parser, shared by
//! the configuration test and the test that starts the corpus's command lines as VMs.

// Each of the two test programs reads only some of a case's fields.
#![allow(dead_code)]

use std::collections::BTreeMap;

/// POSIX shell word splitting (quotes, backslashes, backslash-newline), enough for the corpus.
pub fn shell_words(text: &str) -> Vec<String> {
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
pub struct Case {
    pub title: String,
    pub line: usize,
    pub command: String,
    pub feature: Option<(bool, String)>,
    pub files: Vec<(String, Vec<String>)>,
    pub status: Option<String>,
    pub keys: BTreeMap<String, String>,
    pub absent: Vec<String>,
    pub partial: bool,
    pub stderr_first: Option<String>,
    pub stderr_has: Vec<String>,
    pub stderr_lacks: Vec<String>,
    pub stdout_has: Vec<String>,
}

pub fn parse_corpus(name: &str, text: &str) -> Vec<Case> {
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
