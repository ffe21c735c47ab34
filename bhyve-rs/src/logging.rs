//! Diagnostics on stderr, as FreeBSD's bhyve gives them with warnx(3): warnings and errors
//! always, one line each with the program's name; `BHYVE_LOG=info` or `BHYVE_LOG=debug` adds
//! the progress messages. Standard output stays the guest console's.

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
        let _ = write!(stderr, "bhyve: {kind}{}{end}", record.args());
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
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
    fn bhyve_log_picks_the_level_and_defaults_to_warnings() {
        assert_eq!(level_from(None), LevelFilter::Warn);
        assert_eq!(level_from(Some("INFO")), LevelFilter::Info);
        assert_eq!(level_from(Some("debug")), LevelFilter::Debug);
        assert_eq!(level_from(Some("off")), LevelFilter::Off);
        assert_eq!(level_from(Some("loud")), LevelFilter::Warn);
    }
}
