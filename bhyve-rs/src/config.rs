//! The configuration tree of bhyve_config(5): dotted keys with string values.

use std::collections::BTreeMap;

/// Every setting of a VM as bhyve keeps it: `memory.size`, `pci.0.31.0.device`, `lpc.com1.path`…
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    values: BTreeMap<String, String>,
}

impl Config {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(&mut self, key: &str, value: &str) {
        self.values.insert(key.to_string(), value.to_string());
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// All keys and values in sorted key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// Parse a boolean the way bhyve_config(5) does: true/on/yes/1 and false/off/no/0, any case.
pub fn parse_bool(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "on" | "yes" | "1" => Some(true),
        "false" | "off" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// Parse a memory size as bhyve's `-m` does: a plain number below 1 MiB means MiB, a larger plain
/// number means bytes, and a K/M/G/T/P/E suffix (either case) scales by powers of 1024.
pub fn parse_memsize(value: &str) -> Option<u64> {
    const MIB: u64 = 1 << 20;
    let value = value.trim();
    if let Some(plain) = parse_c_unsigned(value) {
        return if plain < MIB {
            plain.checked_mul(MIB)
        } else {
            Some(plain)
        };
    }
    let split = value.len().checked_sub(1)?;
    let (digits, suffix) = value.split_at(split);
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "b" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        "e" => 60,
        _ => return None,
    };
    let number = parse_c_unsigned(digits)?;
    number.checked_mul(1u64 << shift)
}

/// strtoul with base 0: decimal, `0x` hexadecimal or leading-`0` octal; the whole string must be
/// a number.
pub fn parse_c_unsigned(value: &str) -> Option<u64> {
    let (digits, radix) = if let Some(hex) = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        (hex, 16)
    } else if value.len() > 1 && value.starts_with('0') {
        (&value[1..], 8)
    } else {
        (value, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

impl Config {
    /// A boolean key; `None` when absent, an error message when present but not a boolean.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => parse_bool(v)
                .map(Some)
                .ok_or_else(|| format!("invalid boolean value '{v}' for '{key}'")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memsize_follows_bhyve_rules() {
        assert_eq!(parse_memsize("256"), Some(256 << 20));
        assert_eq!(parse_memsize("1048576"), Some(1 << 20));
        assert_eq!(parse_memsize("256M"), Some(256 << 20));
        assert_eq!(parse_memsize("2g"), Some(2 << 30));
        assert_eq!(parse_memsize("512k"), Some(512 << 10));
        assert_eq!(parse_memsize("0x100"), Some(256 << 20));
        assert_eq!(parse_memsize("1T"), Some(1 << 40));
        assert_eq!(parse_memsize(""), None);
        assert_eq!(parse_memsize("M"), None);
        assert_eq!(parse_memsize("12Q"), None);
        assert_eq!(parse_memsize("-1"), None);
        assert_eq!(parse_memsize("99999999999E"), None);
    }

    #[test]
    fn booleans_accept_bhyve_spellings() {
        for t in ["true", "On", "YES", "1"] {
            assert_eq!(parse_bool(t), Some(true));
        }
        for f in ["false", "off", "No", "0"] {
            assert_eq!(parse_bool(f), Some(false));
        }
        assert_eq!(parse_bool("2"), None);
    }
}
