//! POSIX `getopt(3)` as FreeBSD's libc implements it: bundled flags, a value glued to its option
//! or taken from the next word, `--` ends the options, the first operand ends them too, and the
//! diagnostics read `prog: illegal option -- x` / `prog: option requires an argument -- x`.

/// What one step of the scan found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GetoptItem<'a> {
    /// An option letter with its value (for letters followed by `:` in the option string).
    Opt(char, Option<&'a str>),
    /// A letter not in the option string; the diagnostic line FreeBSD prints.
    Illegal(char, String),
    /// An option needing a value at the end of the words; the diagnostic line.
    MissingArgument(char, String),
}

/// A scan over `args` (`args[0]` is the program name) with option string `optstring`.
pub struct Getopt<'a> {
    args: &'a [String],
    optstring: &'a str,
    progname: &'a str,
    /// Index of the word being scanned (FreeBSD's `optind`).
    optind: usize,
    /// Byte offset inside `args[optind]` of the next letter; 0 when at a word boundary.
    place: usize,
    done: bool,
}

impl<'a> Getopt<'a> {
    pub fn new(args: &'a [String], optstring: &'a str, progname: &'a str) -> Self {
        Getopt {
            args,
            optstring,
            progname,
            optind: 1,
            place: 0,
            done: false,
        }
    }

    /// Index of the first operand once the scan has ended (FreeBSD's `optind`).
    pub fn optind(&self) -> usize {
        self.optind.min(self.args.len())
    }

    /// Whether `letter` takes a value, or `None` when it is not an option at all.
    fn takes_value(&self, letter: char) -> Option<bool> {
        if letter == ':' {
            return None;
        }
        let pos = self.optstring.find(letter)?;
        Some(self.optstring[pos + letter.len_utf8()..].starts_with(':'))
    }
}

impl<'a> Iterator for Getopt<'a> {
    type Item = GetoptItem<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if self.place == 0 {
            let Some(word) = self.args.get(self.optind) else {
                self.done = true;
                return None;
            };
            if !word.starts_with('-') || word == "-" {
                // An operand (a lone "-" is one too, the option string has no '-').
                self.done = true;
                return None;
            }
            if word == "--" {
                self.optind += 1;
                self.done = true;
                return None;
            }
            self.place = 1;
        }
        let word: &'a str = &self.args[self.optind];
        let letter = word[self.place..].chars().next()?;
        self.place += letter.len_utf8();
        let at_end = self.place >= word.len();
        match self.takes_value(letter) {
            None => {
                if at_end {
                    self.optind += 1;
                    self.place = 0;
                }
                let msg = format!("{}: illegal option -- {letter}", self.progname);
                Some(GetoptItem::Illegal(letter, msg))
            }
            Some(false) => {
                if at_end {
                    self.optind += 1;
                    self.place = 0;
                }
                Some(GetoptItem::Opt(letter, None))
            }
            Some(true) => {
                let value = if !at_end {
                    &word[self.place..]
                } else if let Some(next) = self.args.get(self.optind + 1) {
                    self.optind += 1;
                    next.as_str()
                } else {
                    self.optind += 1;
                    self.place = 0;
                    self.done = true;
                    let msg = format!("{}: option requires an argument -- {letter}", self.progname);
                    return Some(GetoptItem::MissingArgument(letter, msg));
                };
                self.optind += 1;
                self.place = 0;
                Some(GetoptItem::Opt(letter, Some(value)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(words: &[&str]) -> Vec<String> {
        std::iter::once("bhyve")
            .chain(words.iter().copied())
            .map(String::from)
            .collect()
    }

    fn scan(words: &[&str]) -> (Vec<GetoptItem<'static>>, Vec<String>) {
        let args: &'static [String] = Box::leak(argv(words).into_boxed_slice());
        let mut g = Getopt::new(args, "aAHPwl:s:m:", "bhyve");
        let items: Vec<_> = g.by_ref().collect();
        let rest = args[g.optind()..].to_vec();
        (items, rest)
    }

    #[test]
    fn bundled_flags_with_trailing_value_option_take_next_word() {
        let (items, rest) = scan(&["-Hwl", "bootrom,/fw", "vm"]);
        assert_eq!(
            items,
            vec![
                GetoptItem::Opt('H', None),
                GetoptItem::Opt('w', None),
                GetoptItem::Opt('l', Some("bootrom,/fw")),
            ]
        );
        assert_eq!(rest, vec!["vm"]);
    }

    #[test]
    fn glued_value_and_repeated_letters() {
        let (items, _) = scan(&["-AHPww", "-lcom1,/dev/nmdm0A"]);
        assert_eq!(items.len(), 6);
        assert_eq!(items[4], GetoptItem::Opt('w', None));
        assert_eq!(items[5], GetoptItem::Opt('l', Some("com1,/dev/nmdm0A")));
    }

    #[test]
    fn value_with_leading_blank_is_kept_verbatim() {
        let (items, _) = scan(&["-s 29,fbuf,tcp=0.0.0.0:5900", "vm"]);
        assert_eq!(
            items,
            vec![GetoptItem::Opt('s', Some(" 29,fbuf,tcp=0.0.0.0:5900"))]
        );
    }

    #[test]
    fn first_operand_and_double_dash_end_options() {
        let (items, rest) = scan(&["-H", "vm", "-w"]);
        assert_eq!(items, vec![GetoptItem::Opt('H', None)]);
        assert_eq!(rest, vec!["vm", "-w"]);
        let (items, rest) = scan(&["-H", "--", "-w"]);
        assert_eq!(items, vec![GetoptItem::Opt('H', None)]);
        assert_eq!(rest, vec!["-w"]);
        let (_, rest) = scan(&["-", "x"]);
        assert_eq!(rest, vec!["-", "x"]);
    }

    #[test]
    fn illegal_and_missing_argument_diagnostics() {
        let (items, _) = scan(&["-Q"]);
        assert_eq!(
            items,
            vec![GetoptItem::Illegal(
                'Q',
                "bhyve: illegal option -- Q".into()
            )]
        );
        let (items, _) = scan(&["-s"]);
        assert_eq!(
            items,
            vec![GetoptItem::MissingArgument(
                's',
                "bhyve: option requires an argument -- s".into()
            )]
        );
        let (items, _) = scan(&["-:"]);
        assert!(matches!(items[0], GetoptItem::Illegal(':', _)));
    }

    #[test]
    fn dash_inside_a_bundle_is_an_illegal_option() {
        // FreeBSD's getopt looks '-' up like any other letter once past the word's leading
        // dash (4.4BSD's ended the options there instead): "-H-" is -H, then an illegal "-",
        // and "--x" (not "--") is an illegal "-" too.
        let (items, _) = scan(&["-H-", "vm"]);
        assert_eq!(
            items,
            vec![
                GetoptItem::Opt('H', None),
                GetoptItem::Illegal('-', "bhyve: illegal option -- -".into()),
            ]
        );
        let (items, _) = scan(&["--x", "vm"]);
        assert_eq!(
            items[0],
            GetoptItem::Illegal('-', "bhyve: illegal option -- -".into())
        );
        // A lone "-" after a bundle is an operand, as at the start.
        let (items, rest) = scan(&["-H", "-", "vm"]);
        assert_eq!(items, vec![GetoptItem::Opt('H', None)]);
        assert_eq!(rest, vec!["-", "vm"]);
    }

    #[test]
    fn empty_next_word_is_a_value() {
        let (items, rest) = scan(&["-s", "", "vm"]);
        assert_eq!(items, vec![GetoptItem::Opt('s', Some(""))]);
        assert_eq!(rest, vec!["vm"]);
    }
}
