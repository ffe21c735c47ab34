//! The C number conversions bhyve's parsers rely on (`sscanf("%d")`, `strtol`), reproduced so that
//! odd inputs (leading blanks, trailing garbage, signs) are read exactly as FreeBSD reads them.

/// C `isspace` in the "C" locale.
pub fn is_c_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r')
}

/// One `%d` conversion of `sscanf`: skip blanks, read an optional sign and decimal digits.
/// Returns the value (as FreeBSD stores it: converted through `intmax_t`, then truncated to `int`)
/// and the unread rest, or `None` when no digit follows.
pub fn scan_int(input: &str) -> Option<(i32, &str)> {
    let bytes = input.as_bytes();
    let mut i = 0;
    while i < bytes.len() && is_c_space(bytes[i]) {
        i += 1;
    }
    let negative = match bytes.get(i) {
        Some(b'-') => {
            i += 1;
            true
        }
        Some(b'+') => {
            i += 1;
            false
        }
        _ => false,
    };
    let start = i;
    // strtoimax saturates; the saturated value is then truncated to int by the assignment.
    let mut value: i128 = 0;
    while i < bytes.len() && bytes[i].is_ascii_digit() {
        value = (value * 10 + i128::from(bytes[i] - b'0')).min(i128::from(i64::MAX) + 1);
        i += 1;
    }
    if i == start {
        return None;
    }
    let value = if negative {
        (-value).max(i128::from(i64::MIN))
    } else {
        value.min(i128::from(i64::MAX))
    };
    Some((value as i64 as i32, &input[i..]))
}

/// `sscanf(input, pattern)` for patterns made of `%d` conversions and literal characters, as used
/// by bhyve (`"%d:%d:%d"`, `"%d/%d/%d"`, `"pci%d:%d:%d"`). Returns the values converted before the
/// first mismatch; the caller compares the count with what it needs.
pub fn scan_ints(input: &str, pattern: &str) -> Vec<i32> {
    let mut values = Vec::new();
    let mut rest = input;
    let mut pat = pattern;
    while !pat.is_empty() {
        if let Some(after) = pat.strip_prefix("%d") {
            match scan_int(rest) {
                Some((v, r)) => {
                    values.push(v);
                    rest = r;
                    pat = after;
                }
                None => break,
            }
        } else {
            let c = pat.as_bytes()[0];
            if rest.as_bytes().first() != Some(&c) {
                break;
            }
            rest = &rest[1..];
            pat = &pat[1..];
        }
    }
    values
}

/// `strtol(value, &end, 0)` with bhyve's `parse_int_value` checks: the whole string must convert
/// (leading blanks and a sign allowed), no overflow.
pub fn strtol_whole(value: &str) -> Option<i64> {
    let trimmed = value.trim_start_matches(|c: char| c.is_ascii() && is_c_space(c as u8));
    let (negative, body) = match trimmed.as_bytes().first() {
        Some(b'-') => (true, &trimmed[1..]),
        Some(b'+') => (false, &trimmed[1..]),
        _ => (false, trimmed),
    };
    let magnitude = crate::config::parse_c_unsigned(body)?;
    let magnitude = i128::from(magnitude);
    let v = if negative { -magnitude } else { magnitude };
    i64::try_from(v).ok()
}

/// `strtoul(value, &end, 0)`: leading blanks, an optional sign (a minus negates modulo 2^64),
/// a `0x` or `0` base prefix; the first character that is not a digit ends the number, and
/// overflow gives `u64::MAX`. Returns the value and the unread rest, or `None` when no digit
/// converts.
pub fn strtoul(value: &str) -> Option<(u64, &str)> {
    let t = value.trim_start_matches(|c: char| c.is_ascii() && is_c_space(c as u8));
    let (negative, body) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits_at) = if (body.starts_with("0x") || body.starts_with("0X"))
        && body.as_bytes().get(2).is_some_and(u8::is_ascii_hexdigit)
    {
        (16, 2)
    } else if body.starts_with('0') {
        (8, 0)
    } else {
        (10, 0)
    };
    let digits = body[digits_at..]
        .bytes()
        .take_while(|b| (*b as char).is_digit(radix))
        .count();
    if digits == 0 {
        return None;
    }
    let end = digits_at + digits;
    let value = u64::from_str_radix(&body[digits_at..end], radix).unwrap_or(u64::MAX);
    let value = if negative {
        value.wrapping_neg()
    } else {
        value
    };
    Some((value, &body[end..]))
}

/// `atoi`: leading blanks, optional sign, digits; anything else ends the number; no digits is 0.
pub fn atoi(value: &str) -> i32 {
    scan_int(value).map_or(0, |(v, _)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_int_skips_leading_blanks_and_stops_at_garbage() {
        assert_eq!(scan_int(" 29"), Some((29, "")));
        assert_eq!(scan_int("31abc"), Some((31, "abc")));
        assert_eq!(scan_int("0x1f"), Some((0, "x1f")));
        assert_eq!(scan_int("-1:2"), Some((-1, ":2")));
        assert_eq!(scan_int("abc"), None);
        assert_eq!(scan_int(""), None);
        assert_eq!(scan_int("- 1"), None);
    }

    #[test]
    fn scan_int_truncates_huge_values_like_freebsd() {
        assert_eq!(scan_int("4294967297").map(|v| v.0), Some(1));
        assert_eq!(
            scan_int("99999999999999999999999").map(|v| v.0),
            Some(i64::MAX as i32)
        );
    }

    #[test]
    fn scan_ints_stops_at_first_mismatch() {
        assert_eq!(scan_ints("1:2:3", "%d:%d:%d"), vec![1, 2, 3]);
        assert_eq!(scan_ints("1:2", "%d:%d:%d"), vec![1, 2]);
        assert_eq!(scan_ints(" 29", "%d:%d:%d"), vec![29]);
        assert_eq!(scan_ints("1 :2", "%d:%d"), vec![1]);
        assert_eq!(scan_ints("1: 2", "%d:%d"), vec![1, 2]);
        assert_eq!(scan_ints("pci1:2:3", "pci%d:%d:%d"), vec![1, 2, 3]);
        assert_eq!(scan_ints("3/0/0", "%d/%d/%d"), vec![3, 0, 0]);
    }

    #[test]
    fn strtol_whole_needs_the_whole_string() {
        assert_eq!(strtol_whole(" 2"), Some(2));
        assert_eq!(strtol_whole("0x10"), Some(16));
        assert_eq!(strtol_whole("010"), Some(8));
        assert_eq!(strtol_whole("-3"), Some(-3));
        assert_eq!(strtol_whole("2 "), None);
        assert_eq!(strtol_whole(""), None);
        assert_eq!(strtol_whole("x"), None);
    }
}
