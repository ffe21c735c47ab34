//! `getopt_long(3)` as FreeBSD's libc implements it (GNU-compatible mode) for an empty short
//! option string: `--name=value` and `--name value`, unique prefixes, ambiguous prefixes refused,
//! operands permuted out of the way, `--` ends the options, and FreeBSD's diagnostics.
//!
//! Options FreeBSD does not have (marked `extension`) are looked up only when FreeBSD's own
//! options neither match nor make the name ambiguous, so every prefix FreeBSD resolves still
//! resolves to the same option here.

/// Whether a long option takes a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HasArg {
    No,
    Required,
}

/// One entry of the option table. Two entries with the same `id` and `has_arg` are the same
/// option for prefix matching (getopt_long compares `flag` and `val`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongOpt {
    pub name: &'static str,
    pub has_arg: HasArg,
    pub id: &'static str,
    /// Not one of FreeBSD's options: matched only after FreeBSD's options found nothing.
    pub extension: bool,
}

/// What looking a name up among some of the table's entries found.
enum Lookup<'t> {
    Found(&'t LongOpt),
    Ambiguous,
    Missing,
}

/// getopt_long's search: an exact name wins, a prefix of entries that all mean the same option
/// picks the first of them, a prefix of entries with different meanings is ambiguous.
fn lookup<'t>(table: &'t [LongOpt], name: &str, extensions: bool) -> Lookup<'t> {
    let mut found: Option<&'t LongOpt> = None;
    let mut ambiguous = false;
    for opt in table.iter().filter(|o| o.extension == extensions) {
        if !opt.name.starts_with(name) {
            continue;
        }
        if opt.name.len() == name.len() {
            return Lookup::Found(opt);
        }
        match found {
            None => found = Some(opt),
            Some(first) if first.id != opt.id || first.has_arg != opt.has_arg => ambiguous = true,
            Some(_) => {}
        }
    }
    match found {
        _ if ambiguous => Lookup::Ambiguous,
        Some(opt) => Lookup::Found(opt),
        None => Lookup::Missing,
    }
}

/// One step of the scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item<'a, 't> {
    /// A recognised option (its table entry) and its value.
    Opt(&'t LongOpt, Option<&'a str>),
    /// An operand (permuted: reported in order but otherwise ignored by the caller).
    Operand(&'a str),
    /// A diagnostic line (`prog: …`); the scan stops after it.
    Error(String),
}

/// Scan `args` (`args[0]` is the program name) against `table`. With `posixly_correct` (the
/// POSIXLY_CORRECT environment variable) the first operand ends the options and short-option
/// errors use the POSIX wording.
pub fn parse<'a, 't>(
    args: &'a [String],
    table: &'t [LongOpt],
    progname: &str,
    posixly_correct: bool,
) -> Vec<Item<'a, 't>> {
    let mut items = Vec::new();
    let mut i = 1;
    while i < args.len() {
        let word = args[i].as_str();
        i += 1;
        if word == "--" {
            items.extend(args[i..].iter().map(|a| Item::Operand(a.as_str())));
            break;
        }
        if !word.starts_with('-') || word == "-" {
            if posixly_correct {
                items.extend(args[i - 1..].iter().map(|a| Item::Operand(a.as_str())));
                break;
            }
            items.push(Item::Operand(word));
            continue;
        }
        let Some(current) = word.strip_prefix("--") else {
            // A short option: the option string is empty, so every letter is unknown.
            let letter = word[1..].chars().next().unwrap_or('-');
            let msg = if posixly_correct {
                format!("{progname}: illegal option -- {letter}")
            } else {
                format!("{progname}: invalid option -- {letter}")
            };
            items.push(Item::Error(msg));
            break;
        };
        let (name, value) = match current.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (current, None),
        };
        let found = match lookup(table, name, false) {
            Lookup::Missing => lookup(table, name, true),
            freebsd => freebsd,
        };
        let opt = match found {
            Lookup::Found(opt) => opt,
            Lookup::Ambiguous => {
                items.push(Item::Error(format!(
                    "{progname}: option `--{name}' is ambiguous"
                )));
                break;
            }
            Lookup::Missing => {
                items.push(Item::Error(format!(
                    "{progname}: unrecognized option `--{current}'"
                )));
                break;
            }
        };
        match (opt.has_arg, value) {
            (HasArg::No, Some(_)) => {
                items.push(Item::Error(format!(
                    "{progname}: option `--{name}' doesn't allow an argument"
                )));
                break;
            }
            (HasArg::No, None) => items.push(Item::Opt(opt, None)),
            (HasArg::Required, Some(v)) => items.push(Item::Opt(opt, Some(v))),
            (HasArg::Required, None) => match args.get(i) {
                // The next word is the value even when it looks like an option.
                Some(next) => {
                    i += 1;
                    items.push(Item::Opt(opt, Some(next.as_str())));
                }
                None => {
                    items.push(Item::Error(format!(
                        "{progname}: option `--{current}' requires an argument"
                    )));
                    break;
                }
            },
        }
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    static TABLE: &[LongOpt] = &[
        LongOpt {
            name: "vm",
            has_arg: HasArg::Required,
            id: "vm",
            extension: false,
        },
        LongOpt {
            name: "checkpoint",
            has_arg: HasArg::Required,
            id: "checkpoint",
            extension: false,
        },
        LongOpt {
            name: "get-cr0",
            has_arg: HasArg::No,
            id: "get-cr0",
            extension: false,
        },
        LongOpt {
            name: "get-cr2",
            has_arg: HasArg::No,
            id: "get-cr2",
            extension: false,
        },
        LongOpt {
            name: "destroy",
            has_arg: HasArg::No,
            id: "destroy",
            extension: false,
        },
        LongOpt {
            name: "get-avic",
            has_arg: HasArg::No,
            id: "apic",
            extension: false,
        },
        LongOpt {
            name: "get-avic-x",
            has_arg: HasArg::No,
            id: "apic",
            extension: false,
        },
        LongOpt {
            name: "run",
            has_arg: HasArg::No,
            id: "run",
            extension: false,
        },
        LongOpt {
            name: "rundir",
            has_arg: HasArg::Required,
            id: "rundir",
            extension: true,
        },
    ];

    fn scan(words: &[&str]) -> Vec<Item<'static, 'static>> {
        let args: &'static [String] = Box::leak(
            std::iter::once("bhyvectl")
                .chain(words.iter().copied())
                .map(String::from)
                .collect::<Vec<_>>()
                .into_boxed_slice(),
        );
        parse(args, TABLE, "bhyvectl", false)
    }

    fn opt(name: &str, v: Option<&'static str>) -> Item<'static, 'static> {
        Item::Opt(TABLE.iter().find(|o| o.name == name).unwrap(), v)
    }

    #[test]
    fn equals_and_separate_word_values() {
        assert_eq!(
            scan(&["--vm=a", "--destroy"]),
            vec![opt("vm", Some("a")), opt("destroy", None)]
        );
        assert_eq!(
            scan(&["--checkpoint", "f", "--vm", "x"]),
            vec![opt("checkpoint", Some("f")), opt("vm", Some("x"))]
        );
        assert_eq!(
            scan(&["--vm", "--destroy"]),
            vec![opt("vm", Some("--destroy"))]
        );
        assert_eq!(scan(&["--vm="]), vec![opt("vm", Some(""))]);
    }

    #[test]
    fn unique_prefix_accepted_ambiguous_refused() {
        assert_eq!(scan(&["--checkp=x"]), vec![opt("checkpoint", Some("x"))]);
        assert_eq!(scan(&["--dest"]), vec![opt("destroy", None)]);
        assert_eq!(
            scan(&["--get-cr"]),
            vec![Item::Error(
                "bhyvectl: option `--get-cr' is ambiguous".into()
            )]
        );
        // Prefixes of entries that mean the same thing are not ambiguous.
        assert_eq!(scan(&["--get-av"]), vec![opt("get-avic", None)]);
    }

    #[test]
    fn extensions_only_answer_names_freebsd_does_not_know() {
        // Both entries start with "ru", but FreeBSD's table alone decides: --run.
        assert_eq!(scan(&["--ru"]), vec![opt("run", None)]);
        assert_eq!(scan(&["--run"]), vec![opt("run", None)]);
        assert_eq!(scan(&["--rund=/d"]), vec![opt("rundir", Some("/d"))]);
        assert_eq!(scan(&["--rundir", "/d"]), vec![opt("rundir", Some("/d"))]);
    }

    #[test]
    fn diagnostics() {
        assert_eq!(
            scan(&["--nope"]),
            vec![Item::Error("bhyvectl: unrecognized option `--nope'".into())]
        );
        assert_eq!(
            scan(&["--destroy=1"]),
            vec![Item::Error(
                "bhyvectl: option `--destroy' doesn't allow an argument".into()
            )]
        );
        assert_eq!(
            scan(&["--vm"]),
            vec![Item::Error(
                "bhyvectl: option `--vm' requires an argument".into()
            )]
        );
        assert_eq!(
            scan(&["-x"]),
            vec![Item::Error("bhyvectl: invalid option -- x".into())]
        );
    }

    #[test]
    fn operands_are_permuted_and_double_dash_ends() {
        assert_eq!(
            scan(&["x", "--destroy", "-", "--", "--vm=a"]),
            vec![
                Item::Operand("x"),
                opt("destroy", None),
                Item::Operand("-"),
                Item::Operand("--vm=a"),
            ]
        );
    }
}
