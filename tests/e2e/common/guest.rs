//! The console test guest (tests/guests): building it, and host-side reference versions of what
//! it computes, so tests check its output against an independent calculation.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// Last line of the boot banner; the prompt follows it.
pub const READY: &str = "bhyve-rs test guest ready\n";
/// The shell prompt, printed at the start of a line.
pub const PROMPT: &str = "> ";
/// Every command of the shell, as `help` lists them.
pub const COMMANDS: [&str; 29] = [
    "help",
    "info",
    "counter",
    "count",
    "memfill",
    "memsum",
    "cmos",
    "ticks",
    "pci",
    "ecam",
    "bars",
    "acpi",
    "pmtimer",
    "hpet",
    "poweroff",
    "reset",
    "powerbutton",
    "sci",
    "cpus",
    "work",
    "halt",
    "triple",
    "vblk",
    "vrnd",
    "vnet",
    "e1000",
    "vcon",
    "nvme",
    "ahci",
];

/// Builds the guest once per test process (`tests/guests/build.sh`; cargo's own lock on the
/// guest's target directory serialises builds from concurrent test processes) and returns the
/// path of its ELF.
pub fn console_guest() -> &'static Path {
    static ELF: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = ELF.get_or_init(|| {
        let script = super::repo_root().join("tests/guests/build.sh");
        let output = Command::new("bash")
            .arg(&script)
            .output()
            .map_err(|err| format!("cannot run {}: {err}", script.display()))?;
        if !output.status.success() {
            return Err(format!(
                "{} failed ({}):\n{}",
                script.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let path = PathBuf::from(stdout.lines().last().unwrap_or("").trim());
        if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "{} printed no ELF path: {stdout:?}",
                script.display()
            ))
        }
    });
    match built {
        Ok(path) => path,
        Err(why) => panic!("building the test guest: {why}"),
    }
}

/// splitmix64, the generator `memfill` fills memory with (one output per 64-bit word).
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The line `memfill <mib> <seed>` must print: FNV-1a 64 folded over whole 64-bit words of the
/// splitmix64 stream seeded with `seed`.
pub fn memfill_line(mib: u64, seed: u64) -> String {
    let mut state = seed;
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for _ in 0..(mib << 20) / 8 {
        hash = (hash ^ splitmix64(&mut state)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("memfill {mib} MiB seed {seed} fnv {hash:#018x}")
}

/// Parses "cmos YYYY-MM-DD HH:MM:SS" into seconds since the Unix epoch (proleptic Gregorian).
pub fn parse_cmos_line(line: &str) -> Option<i64> {
    let rest = line.strip_prefix("cmos ")?;
    let (date, time) = rest.split_once(' ')?;
    let d: Vec<i64> = date
        .split('-')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let t: Vec<i64> = time
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    if d.len() != 3 || t.len() != 3 || date.len() != 10 || time.len() != 8 {
        return None;
    }
    let (year, month, day) = (d[0], d[1], d[2]);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || t[0] > 23 || t[1] > 59 || t[2] > 59
    {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + t[0] * 3600 + t[1] * 60 + t[2])
}

/// How far (in seconds) the time in a `cmos` line is from the host's clock, read either as UTC
/// or as local time (bhyve keeps the RTC in local time unless `-u`). `i64::MAX` if unparsable.
pub fn cmos_skew_seconds(line: &str) -> i64 {
    let Some(guest) = parse_cmos_line(line) else {
        return i64::MAX;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let utc = (guest - now).abs();
    let local = (guest - now - local_utc_offset(now)).abs();
    utc.min(local)
}

/// The host's local-time offset from UTC, in seconds, at `now`.
fn local_utc_offset(now: i64) -> i64 {
    let t = now as libc::time_t;
    // SAFETY: an all-zero `tm` is a valid value of this plain C struct.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: localtime_r only writes into `tm`; both pointers are valid for the call.
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return 0;
    }
    tm.tm_gmtoff
}

/// What `hpet [ms]` printed: the table, the capabilities and the measured rates.
#[derive(Debug, Clone, PartialEq)]
pub struct HpetReport {
    /// Hardware block id from the ACPI HPET table.
    pub table_id: u64,
    pub base: u64,
    pub vendor: u64,
    pub timers: u64,
    pub counter_bits: u64,
    pub legacy: bool,
    /// Counter period in femtoseconds, from the capabilities register.
    pub period_fs: u64,
    /// 10^15 / period, as the guest computed it.
    pub advertised_hz: f64,
    /// The counter's rate measured against the ACPI PM timer and against the PIT's ticks.
    pub by_pmtimer_hz: f64,
    pub by_pit_hz: f64,
}

/// Parses the lines of `hpet [ms]`; `None` if any is missing or malformed.
pub fn parse_hpet_report(lines: &[String]) -> Option<HpetReport> {
    let line = |prefix: &str| lines.iter().find_map(|l| l.strip_prefix(prefix));
    let words = |text: &str| {
        text.split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let after = |words: &[String], key: &str| {
        let at = words.iter().position(|w| w == key)?;
        words.get(at + 1).cloned()
    };
    let number = |text: &str| match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    };
    let table = words(line("hpet table ")?);
    let caps = words(line("hpet caps ")?);
    let rates = words(line("hpet advertised ")?);
    Some(HpetReport {
        table_id: number(&after(&table, "id")?)?,
        base: number(&after(&table, "base")?)?,
        vendor: number(&after(&caps, "vendor")?)?,
        timers: number(&after(&caps, "timers")?)?,
        counter_bits: number(after(&caps, "counter")?.strip_suffix("-bit")?)?,
        legacy: after(&caps, "legacy")? == "yes",
        period_fs: number(&after(&caps, "period")?)?,
        advertised_hz: rates.first()?.parse().ok()?,
        by_pmtimer_hz: rates.get(2)?.parse().ok()?,
        by_pit_hz: rates.get(6)?.parse().ok()?,
    })
}

/// What `hpet irq` printed: (I/O APIC pin, one-shot interrupts, periodic interrupts, PIT ticks
/// the periodic timer ran, PIT rate).
pub fn parse_hpet_irq(line: &str) -> Option<(u64, u64, u64, u64, u64)> {
    let words: Vec<&str> = line.strip_prefix("hpet irq ")?.split_whitespace().collect();
    let after = |key: &str| {
        let at = words.iter().position(|w| *w == key)?;
        words.get(at + 1)?.parse().ok()
    };
    Some((
        after("pin")?,
        after("one-shot")?,
        after("periodic")?,
        after("in")?,
        after("of")?,
    ))
}

/// Days since 1970-01-01 of a civil date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_published_sequence() {
        // First outputs for seed 1234567 from the reference implementation.
        let mut state = 1_234_567;
        assert_eq!(splitmix64(&mut state), 6_457_827_717_110_365_317);
        assert_eq!(splitmix64(&mut state), 3_203_168_211_198_807_973);
    }

    #[test]
    fn cmos_lines_parse_to_epoch_seconds() {
        assert_eq!(parse_cmos_line("cmos 1970-01-01 00:00:00"), Some(0));
        assert_eq!(
            parse_cmos_line("cmos 2000-03-01 12:34:56"),
            Some(951_914_096)
        );
        assert_eq!(parse_cmos_line("cmos 2000-13-01 12:34:56"), None);
        assert_eq!(parse_cmos_line("cmos 2000-3-1 12:34:56"), None);
    }

    #[test]
    fn hpet_reports_parse() {
        let lines: Vec<String> = [
            "hpet table id 0x80860701 base 0xfed00000 space 0 flags 0x1",
            "hpet caps vendor 0x8086 revision 1 timers 8 counter 32-bit legacy no period 59604644 fs",
            "hpet enabled, config 0x0 -> 0x1",
            "hpet advertised 16777216 Hz, 16777000 Hz by pmtimer 16770000 Hz by pit over 200 ticks of 100 Hz",
        ]
        .map(String::from)
        .to_vec();
        let report = parse_hpet_report(&lines).unwrap();
        assert_eq!(report.table_id, 0x8086_0701);
        assert_eq!(report.base, 0xfed0_0000);
        assert_eq!(
            (report.vendor, report.timers, report.counter_bits),
            (0x8086, 8, 32)
        );
        assert!(!report.legacy);
        assert_eq!(report.period_fs, 59_604_644);
        assert_eq!(report.advertised_hz, 16_777_216.0);
        assert_eq!(report.by_pmtimer_hz, 16_777_000.0);
        assert_eq!(report.by_pit_hz, 16_770_000.0);
        assert_eq!(parse_hpet_report(&lines[..2]), None);
        assert_eq!(
            parse_hpet_irq(
                "hpet irq pin 23 one-shot 1 after 2 ticks periodic 50 in 50 ticks of 100 Hz"
            ),
            Some((23, 1, 50, 50, 100))
        );
        assert_eq!(parse_hpet_irq("hpet irq: no route"), None);
    }
}
