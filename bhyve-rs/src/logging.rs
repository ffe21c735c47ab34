//! Diagnostics on stderr, as FreeBSD's bhyve gives them with warnx(3): warnings and errors
//! always, one line each with the program's name; `BHYVE_LOG=info` or `BHYVE_LOG=debug` adds
//! the progress messages. Standard output stays the guest console's.

use std::borrow::Cow;
use std::io::{IsTerminal, Write};

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger {
    level: LevelFilter,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let kind = match record.level() {
            Level::Error => "",
            Level::Warn => "warning: ",
            Level::Info | Level::Debug | Level::Trace => "info: ",
        };
        let mut stderr = std::io::stderr().lock();
        // A console on a terminal in raw mode does not turn "\n" into a new line by itself.
        let end = if stderr.is_terminal() { "\r\n" } else { "\n" };
        let _ = write!(stderr, "{}{end}", log_line(kind, record.args()));
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// `text` with its control characters escaped (`\n`, `\t`, `\u{1b}`, ...), so that a name from
/// a file, a client or a guest cannot end a diagnostic line early, forge another one or send
/// the terminal escape sequences.
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    Cow::Owned(escaped)
}

/// One diagnostic line, without its end: `bhyve: <kind><message>`, the message escaped.
fn log_line(kind: &str, message: &std::fmt::Arguments<'_>) -> String {
    let message = message.to_string();
    format!("bhyve: {kind}{}", escape_controls(&message))
}

/// The level `BHYVE_LOG` asks for; warnings when unset or not understood.
pub fn level_from(value: Option<&str>) -> LevelFilter {
    match value.map(str::to_ascii_lowercase).as_deref() {
        Some("off") => LevelFilter::Off,
        Some("error") => LevelFilter::Error,
        Some("info") => LevelFilter::Info,
        Some("debug") => LevelFilter::Debug,
        Some("trace") => LevelFilter::Trace,
        _ => LevelFilter::Warn,
    }
}

/// Install the logger for the whole process; a second call changes nothing.
pub fn init() {
    let level = level_from(std::env::var("BHYVE_LOG").ok().as_deref());
    let logger = Box::leak(Box::new(StderrLogger { level }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_with_control_characters_stays_on_one_line() {
        let name = "x.ckp'\nbhyve: checkpoint written to 'forged\u{1b}[2J";
        let line = log_line("info: ", &format_args!("checkpoint written to '{name}'"));
        assert_eq!(
            line,
            "bhyve: info: checkpoint written to 'x.ckp'\\nbhyve: checkpoint written to \
             'forged\\u{1b}[2J'"
        );
        assert_eq!(escape_controls("vm1 é\t"), "vm1 é\\t");
        assert!(matches!(escape_controls("plain"), Cow::Borrowed("plain")));
    }

    #[test]
    fn bhyve_log_picks_the_level_and_defaults_to_warnings() {
        assert_eq!(level_from(None), LevelFilter::Warn);
        assert_eq!(level_from(Some("INFO")), LevelFilter::Info);
        assert_eq!(level_from(Some("debug")), LevelFilter::Debug);
        assert_eq!(level_from(Some("off")), LevelFilter::Off);
        assert_eq!(level_from(Some("loud")), LevelFilter::Warn);
    }
}
