//! `bhyvectl --inspect-snapshot`: a text description of a snapshot file.

use std::fmt::Write as _;
use std::path::Path;

use super::format::{HEADER_FLAG_SUSPENDED, SECTION_FLAG_MANDATORY};
use super::{SnapshotError, SnapshotReader};

pub(crate) fn describe(path: &Path) -> Result<String, SnapshotError> {
    let reader = SnapshotReader::open(path)?;
    let header = reader.header();
    let mut out = String::new();
    let mut line = |label: &str, value: String| {
        let _ = writeln!(out, "{:<14}{value}", format!("{label}:"));
    };
    line("snapshot", path.display().to_string());
    line("format", format!("{}.{}", header.major, header.minor));
    line("architecture", header.arch.to_string());
    line("backend", header.backend.to_string());
    line(
        "producer",
        format!("{} {}", header.producer_name, header.producer_version),
    );
    line(
        "created",
        format!("{} ({})", utc_time(header.created), header.created),
    );
    line("flags", describe_flags(header.flags));
    line("page size", header.page_size.to_string());
    let allocated = reader.allocated_bytes()?;
    line(
        "file size",
        format!(
            "{} ({}), allocated {} ({})",
            reader.file_len(),
            human(reader.file_len()),
            allocated,
            human(allocated)
        ),
    );

    let _ = writeln!(out, "\nconfiguration ({} keys):", reader.config().len());
    for (key, value) in reader.config() {
        let _ = writeln!(out, "  {}={}", printable(key), printable(value));
    }

    let sections = reader.sections();
    let _ = writeln!(out, "\nsections ({}):", sections.len());
    let name_width = sections
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(0)
        .max(4);
    let instance_width = sections
        .iter()
        .map(|s| s.instance.len())
        .max()
        .unwrap_or(0)
        .max(8);
    let _ = writeln!(
        out,
        "  {:<name_width$}  {:<instance_width$}  {:>7}  {:<4}  {:<9}  {:>12}  {:>12}  CRC32C",
        "NAME", "INSTANCE", "VERSION", "KIND", "FLAGS", "OFFSET", "LENGTH"
    );
    for section in sections {
        let instance = if section.instance.is_empty() {
            "-"
        } else {
            &section.instance
        };
        let mut flags = if section.flags & SECTION_FLAG_MANDATORY != 0 {
            "mandatory".to_string()
        } else {
            "optional".to_string()
        };
        let other = section.flags & !SECTION_FLAG_MANDATORY;
        if other != 0 {
            let _ = write!(flags, ",{other:#x}");
        }
        let checksum = if section.kind == super::SectionKind::Ram {
            "-".to_string()
        } else {
            format!("{:#010x}", section.checksum)
        };
        let _ = writeln!(
            out,
            "  {:<name_width$}  {:<instance_width$}  {:>7}  {:<4}  {:<9}  {:>12}  {:>12}  {checksum}",
            section.name,
            instance,
            section.version,
            section.kind.to_string(),
            flags,
            section.offset,
            section.length,
        );
    }

    let regions = reader.ram_regions();
    let _ = writeln!(out, "\nram regions ({}):", regions.len());
    let _ = writeln!(
        out,
        "  {:<8}  {:>18}  {:>12}  {:>12}  {:>12}  IN FILE",
        "INSTANCE", "GUEST ADDRESS", "SIZE", "FILE OFFSET", "DATA"
    );
    let mut total = 0u64;
    let mut total_data = 0u64;
    for region in regions {
        let data = reader.ram_data_bytes(region)?;
        total += region.size;
        total_data += data;
        let _ = writeln!(
            out,
            "  {:<8}  {:>#18x}  {:>12}  {:>12}  {:>12}  {} of {} ({:.1}%)",
            region.instance,
            region.gpa,
            region.size,
            region.file_offset,
            data,
            human(data),
            human(region.size),
            percent(data, region.size)
        );
    }
    let _ = writeln!(
        out,
        "  total: {} of guest RAM, {} stored ({:.1}%), checksummed in {} chunks",
        human(total),
        human(total_data),
        percent(total_data, total),
        human(u64::from(super::RAM_CHUNK_SIZE))
    );
    Ok(out)
}

fn describe_flags(flags: u32) -> String {
    let mut text = format!("{flags:#010x}");
    if flags & HEADER_FLAG_SUSPENDED != 0 {
        text.push_str(" (suspended)");
    }
    text
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// Sizes in the largest binary unit that keeps a whole number in front.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Keys and values are free text; show control characters escaped so each stays on one line.
fn printable(text: &str) -> String {
    if text.chars().any(char::is_control) {
        text.escape_debug().to_string()
    } else {
        text.to_string()
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC` for seconds since the epoch (proleptic Gregorian calendar).
fn utc_time(seconds: u64) -> String {
    let days = seconds / 86_400;
    let rest = seconds % 86_400;
    // Days to civil date, after Howard Hinnant's public-domain algorithm.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_time_matches_known_dates() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_time(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc_time(1_795_444_496), "2026-11-23 14:34:56 UTC");
    }

    #[test]
    fn sizes_are_shown_in_binary_units() {
        assert_eq!(human(512), "512 bytes");
        assert_eq!(human(8 << 20), "8.0 MiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
    }
}
