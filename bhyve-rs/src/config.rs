//! The configuration tree of bhyve_config(5): dotted keys with string values.
//!
//! Like FreeBSD's `config.c`, the tree distinguishes nodes (`pci.0.3.0`) from variables
//! (`pci.0.3.0.device`): a variable cannot get children and a node cannot get a value. Entries keep
//! their insertion order, and re-setting a variable moves it to the end of its node, so
//! [`Config::dump`] prints exactly what `-o config.dump=1` prints on FreeBSD.

pub mod cnum;
pub mod legacy;

use std::collections::BTreeMap;

/// A refusal of the tree to take a value, with FreeBSD's wording.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A node path with an empty component such as `a..b` or `.a`.
    #[error("Invalid configuration node: {path}")]
    InvalidNode { path: String },
    /// A node path that walks below an existing variable.
    #[error("Configuration node {path} is a child of existing variable {variable}")]
    ChildOfVariable { path: String, variable: String },
    /// A value for a name that is already a node.
    #[error("Attempting to add value {value} to existing node {path}")]
    ValueOnNode { value: String, path: String },
    /// A node-relative name containing a dot.
    #[error("Invalid config node name {name}")]
    InvalidName { name: String },
}

impl ConfigError {
    /// The lines FreeBSD prints for this failure (a warning may precede the fatal line).
    pub fn lines(&self) -> Vec<String> {
        match self {
            ConfigError::InvalidNode { path } | ConfigError::ChildOfVariable { path, .. } => {
                vec![
                    self.to_string(),
                    format!("Failed to create configuration node {path}"),
                ]
            }
            _ => vec![self.to_string()],
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Node {
    entries: Vec<(String, Entry)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Value(String),
    Node(Node),
}

impl Node {
    fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, e)| e)
    }

    fn position(&self, name: &str) -> Option<usize> {
        self.entries.iter().position(|(n, _)| n == name)
    }

    fn dump(&self, prefix: &str, out: &mut String) {
        for (name, entry) in &self.entries {
            match entry {
                Entry::Value(v) => {
                    out.push_str(prefix);
                    out.push_str(name);
                    out.push('=');
                    out.push_str(v);
                    out.push('\n');
                }
                Entry::Node(child) => child.dump(&format!("{prefix}{name}."), out),
            }
        }
    }
}

/// Every setting of a VM as bhyve keeps it: `memory.size`, `pci.0.31.0.device`, `lpc.com1.path`…
///
/// Two configurations are equal when they hold the same variables with the same values, whatever
/// the order they were set in.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Flat view of every variable, for cheap lookups and sorted iteration.
    values: BTreeMap<String, String>,
    /// The same variables as FreeBSD's nvlist tree, in insertion order.
    root: Node,
    /// Values with `%(…)` references or `\` escapes, expanded (what [`Config::get`] returns).
    expanded: BTreeMap<String, String>,
}

impl PartialEq for Config {
    fn eq(&self, other: &Self) -> bool {
        self.values == other.values
    }
}

impl Eq for Config {}

impl Config {
    pub fn new() -> Self {
        Self::default()
    }

    /// A tree holding `pairs`, set in order (for tests).
    #[cfg(test)]
    pub(crate) fn from_pairs(pairs: &[(&str, &str)]) -> Self {
        let mut config = Self::new();
        for (key, value) in pairs {
            config.set(key, value);
        }
        config
    }

    /// Set a variable; a value the tree refuses (see [`Config::try_set`]) is logged and dropped.
    pub fn set(&mut self, key: &str, value: &str) {
        if let Err(e) = self.try_set(key, value) {
            log::warn!("{e}");
        }
    }

    /// A variable's value as FreeBSD's `get_config_value` returns it: `%(path)` references are
    /// replaced by the referenced (expanded) value and `\x` escapes by `x`. Plain values are
    /// returned as stored.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.expanded
            .get(key)
            .or_else(|| self.values.get(key))
            .map(String::as_str)
    }

    /// A variable's value exactly as it was set, without expansion.
    pub fn get_raw(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// All keys and their values as set (not expanded), in sorted key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Set a variable as FreeBSD's `set_config_value` does: create the parent nodes, refuse a
    /// path below a variable or a value on a node.
    pub fn try_set(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let (node_path, name) = match key.rsplit_once('.') {
            Some((node, name)) => (Some(node), name),
            None => (None, key),
        };
        if let Some(node_path) = node_path {
            self.create_node(node_path)?;
        }
        let Some(node) = self.node_mut(node_path.unwrap_or("")) else {
            // create_node succeeded, so the node is there; keep the refusal path total anyway.
            return Err(ConfigError::InvalidNode {
                path: key.to_string(),
            });
        };
        if let Some(Entry::Node(_)) = node.get(name) {
            return Err(ConfigError::ValueOnNode {
                value: value.to_string(),
                path: key.to_string(),
            });
        }
        if let Some(pos) = node.position(name) {
            // FreeBSD frees and re-adds the string, which moves it to the end of its node.
            node.entries.remove(pos);
        }
        node.entries
            .push((name.to_string(), Entry::Value(value.to_string())));
        self.values.insert(key.to_string(), value.to_string());
        self.refresh_expansions();
        Ok(())
    }

    fn needs_expansion(value: &str) -> bool {
        value.contains('%') || value.contains('\\')
    }

    /// Recompute expanded values; any change can alter what a reference resolves to.
    fn refresh_expansions(&mut self) {
        if self.expanded.is_empty() && !self.values.values().any(|v| Self::needs_expansion(v)) {
            return;
        }
        let expanded = self
            .values
            .iter()
            .filter(|(_, v)| Self::needs_expansion(v))
            .map(|(k, v)| (k.clone(), self.expand(v, 0, false)))
            .collect();
        self.expanded = expanded;
    }

    /// Set `name` (which may not contain a dot) inside the node `node_path` (empty: the root), as
    /// FreeBSD's `set_config_value_node` does.
    pub fn set_in_node(
        &mut self,
        node_path: &str,
        name: &str,
        value: &str,
    ) -> Result<(), ConfigError> {
        if name.contains('.') {
            return Err(ConfigError::InvalidName {
                name: name.to_string(),
            });
        }
        if node_path.is_empty() {
            self.try_set(name, value)
        } else {
            self.try_set(&format!("{node_path}.{name}"), value)
        }
    }

    /// Set a variable only when it has no value yet.
    pub fn set_if_unset(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        if self.get(key).is_some() {
            return Ok(());
        }
        self.try_set(key, value)
    }

    /// Create a node (and its parents) as `create_config_node` does; an existing node is fine.
    pub fn create_node(&mut self, path: &str) -> Result<(), ConfigError> {
        self.walk(path, true).map(|_| ())
    }

    /// Whether `path` names an existing node (not a variable).
    pub fn node_exists(&self, path: &str) -> bool {
        let mut node = &self.root;
        for name in path.split('.') {
            match node.get(name) {
                Some(Entry::Node(child)) => node = child,
                _ => return false,
            }
        }
        true
    }

    /// Names of the entries (variables and nodes) directly under the node `path` (empty: the root),
    /// in the order they were first created; empty when `path` is not a node. Walking `pci`, then
    /// each bus, slot and function visits every `-s` device (grouped by bus, then slot).
    pub fn children(&self, path: &str) -> Vec<&str> {
        let mut node = &self.root;
        if !path.is_empty() {
            for name in path.split('.') {
                match node.get(name) {
                    Some(Entry::Node(child)) => node = child,
                    _ => return Vec::new(),
                }
            }
        }
        node.entries.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Validate (and with `create`, build) the node path; returns whether the node exists.
    fn walk(&mut self, path: &str, create: bool) -> Result<bool, ConfigError> {
        let mut node = &mut self.root;
        let mut walked = String::new();
        for name in path.split('.') {
            if name.is_empty() {
                return Err(ConfigError::InvalidNode {
                    path: path.to_string(),
                });
            }
            if !walked.is_empty() {
                walked.push('.');
            }
            walked.push_str(name);
            let pos = match node.position(name) {
                Some(pos) => pos,
                None if create => {
                    node.entries
                        .push((name.to_string(), Entry::Node(Node::default())));
                    node.entries.len() - 1
                }
                None => return Ok(false),
            };
            node = match &mut node.entries[pos].1 {
                Entry::Node(child) => child,
                Entry::Value(_) => {
                    return Err(ConfigError::ChildOfVariable {
                        path: path.to_string(),
                        variable: walked,
                    })
                }
            };
        }
        Ok(true)
    }

    fn node_mut(&mut self, path: &str) -> Option<&mut Node> {
        let mut node = &mut self.root;
        if path.is_empty() {
            return Some(node);
        }
        for name in path.split('.') {
            let entry = node.entries.iter_mut().find(|(n, _)| n == name)?;
            match &mut entry.1 {
                Entry::Node(child) => node = child,
                Entry::Value(_) => return None,
            }
        }
        Some(node)
    }

    /// Every variable as `key=value` lines, in FreeBSD's `dump_config` order.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        self.root.dump("", &mut out);
        out
    }

    /// Like [`Config::get`], owned, logging the warnings FreeBSD prints for bad references.
    pub fn get_expanded(&self, key: &str) -> Option<String> {
        self.get_raw(key).map(|v| self.expand(v, 0, true))
    }

    fn expand(&self, value: &str, depth: u32, warn: bool) -> String {
        // FreeBSD stops following references below this depth.
        const MAX_DEPTH: u32 = 15;
        if !value.contains('%') && !value.contains('\\') {
            return value.to_string();
        }
        let mut out = String::new();
        let mut rest = value;
        while let Some(c) = rest.chars().next() {
            match c {
                '%' => {
                    if depth > MAX_DEPTH {
                        if warn {
                            log::warn!("Too many recursive references in configuration value");
                        }
                        out.push('%');
                        rest = &rest[1..];
                        continue;
                    }
                    let close = rest
                        .strip_prefix("%(")
                        .filter(|r| !r.is_empty())
                        .and_then(|r| r.find(')').map(|i| (r, i)));
                    let Some((inner, end)) = close else {
                        if warn {
                            log::warn!("Invalid reference in configuration value \"{value}\"");
                        }
                        out.push('%');
                        rest = &rest[1..];
                        continue;
                    };
                    if end == 0 {
                        if warn {
                            log::warn!("Empty reference in configuration value \"{value}\"");
                        }
                        rest = &inner[1..];
                        continue;
                    }
                    let path = &inner[..end];
                    match self.get_raw(path) {
                        Some(v) => out.push_str(&self.expand(v, depth + 1, warn)),
                        None if warn => {
                            log::warn!("Failed to fetch referenced configuration variable {path}")
                        }
                        None => {}
                    }
                    rest = &inner[end + 1..];
                }
                '\\' => {
                    rest = &rest[1..];
                    match rest.chars().next() {
                        Some(next) => {
                            out.push(next);
                            rest = &rest[next.len_utf8()..];
                        }
                        None if warn => {
                            log::warn!("Trailing \\ in configuration value \"{value}\"");
                        }
                        None => {}
                    }
                }
                _ => {
                    out.push(c);
                    rest = &rest[c.len_utf8()..];
                }
            }
        }
        out
    }
}

/// The defaults amd64 bhyve sets before parsing options (`bhyve_init_config`).
pub fn default_config() -> Config {
    let mut c = Config::new();
    for (k, v) in [
        ("acpi_tables", "true"),
        ("acpi_tables_in_memory", "true"),
        ("memory.size", "256M"),
        ("x86.strictmsr", "true"),
        ("lpc.fwcfg", "bhyve"),
    ] {
        c.set(k, v);
    }
    c
}

/// Parse a boolean the way bhyve_config(5) does: true/on/yes/1 and false/off/no/0, any case.
pub fn parse_bool(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "on" | "yes" | "1" => Some(true),
        "false" | "off" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// Parse a memory size as bhyve's `-m` does (libvmmapi `vm_parse_memsize`): a plain number below
/// 1 MiB means MiB, a larger plain number means bytes; otherwise `expand_number(3)`: a number
/// followed by a K/M/G/T/P/E (or B) unit in either case, scaled by powers of 1024. Like
/// `expand_number`, only the character right after the number is looked at, so `512MB` is 512 MiB.
pub fn parse_memsize(value: &str) -> Option<u64> {
    const MIB: u64 = 1 << 20;
    let value = value.trim_start();
    if let Some(plain) = parse_c_unsigned(value) {
        return if plain < MIB {
            plain.checked_mul(MIB)
        } else {
            Some(plain)
        };
    }
    let value = value.strip_prefix('+').unwrap_or(value);
    let (number, rest) = split_c_unsigned_prefix(value)?;
    let shift = match rest.chars().next().map(|c| c.to_ascii_lowercase()) {
        None | Some('b') => 0,
        Some('k') => 10,
        Some('m') => 20,
        Some('g') => 30,
        Some('t') => 40,
        Some('p') => 50,
        Some('e') => 60,
        Some(_) => return None,
    };
    let scaled = number.checked_shl(shift)?;
    (scaled >> shift == number).then_some(scaled)
}

/// The longest leading strtoul-style (base 0) number of `value` and the text after it.
fn split_c_unsigned_prefix(value: &str) -> Option<(u64, &str)> {
    let bytes = value.as_bytes();
    let (start, radix) = if (value.starts_with("0x") || value.starts_with("0X"))
        && bytes.get(2).is_some_and(u8::is_ascii_hexdigit)
    {
        (2, 16)
    } else if value.starts_with('0') {
        (0, 8)
    } else {
        (0, 10)
    };
    let digits = value[start..]
        .bytes()
        .take_while(|b| (*b as char).is_digit(radix))
        .count();
    if digits == 0 {
        return None;
    }
    let number = u64::from_str_radix(&value[start..start + digits], radix).ok()?;
    Some((number, &value[start + digits..]))
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
    fn memsize_reads_only_the_unit_letter_like_expand_number() {
        assert_eq!(parse_memsize("512MB"), Some(512 << 20));
        assert_eq!(parse_memsize("2GiB"), Some(2 << 30));
        assert_eq!(parse_memsize("4096B"), Some(4096));
        assert_eq!(parse_memsize("2147483648"), Some(2 << 30));
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

    #[test]
    fn dump_keeps_insertion_order_and_moves_reset_values_last() {
        let mut c = Config::new();
        c.set("memory.size", "256M");
        c.set("acpi_tables", "true");
        c.set("pci.0.0.0.device", "hostbridge");
        c.set("memory.wired", "true");
        c.set("memory.size", "1G");
        assert_eq!(
            c.dump(),
            "memory.wired=true\nmemory.size=1G\nacpi_tables=true\npci.0.0.0.device=hostbridge\n"
        );
    }

    #[test]
    fn value_below_a_variable_is_refused() {
        let mut c = Config::new();
        c.try_set("a.b", "1").unwrap();
        let err = c.try_set("a.b.c", "2").unwrap_err();
        assert_eq!(
            err.lines(),
            vec![
                "Configuration node a.b is a child of existing variable a.b".to_string(),
                "Failed to create configuration node a.b".to_string()
            ]
        );
        assert_eq!(c.get("a.b.c"), None);
    }

    #[test]
    fn value_on_a_node_is_refused() {
        let mut c = Config::new();
        c.try_set("pci.0.3.0.device", "virtio-rnd").unwrap();
        let err = c.try_set("pci.0.3.0", "x").unwrap_err();
        assert_eq!(
            err.to_string(),
            "Attempting to add value x to existing node pci.0.3.0"
        );
    }

    #[test]
    fn empty_path_component_is_refused() {
        let mut c = Config::new();
        assert!(matches!(
            c.try_set("a..b", "1"),
            Err(ConfigError::InvalidNode { .. })
        ));
        // An empty last component is an ordinary (if odd) variable name, as on FreeBSD.
        c.try_set("a.", "1").unwrap();
        assert_eq!(c.get("a."), Some("1"));
    }

    #[test]
    fn nodes_exist_without_values() {
        let mut c = Config::new();
        c.create_node("lpc.com1").unwrap();
        assert!(c.node_exists("lpc.com1"));
        assert!(c.node_exists("lpc"));
        assert!(!c.node_exists("lpc.com2"));
        assert_eq!(c.dump(), "");
    }

    #[test]
    fn children_list_nodes_and_variables_in_order() {
        let mut c = Config::new();
        c.set("pci.0.4.0.device", "virtio-blk");
        c.set("pci.0.0.0.device", "hostbridge");
        c.set("pci.1.0.0.device", "virtio-rnd");
        c.set("pci.0.4.0.path", "/d");
        assert_eq!(c.children("pci"), vec!["0", "1"]);
        assert_eq!(c.children("pci.0"), vec!["4", "0"]);
        assert_eq!(c.children("pci.0.4.0"), vec!["device", "path"]);
        assert!(c.children("pci.0.4.0.path").is_empty());
        assert!(c.children("nothing").is_empty());
        assert_eq!(c.children(""), vec!["pci"]);
    }

    #[test]
    fn expansion_follows_references_and_escapes() {
        let mut c = Config::new();
        c.set("name", "vm1");
        c.set("path", "/vm/%(name)/disk\\%");
        c.set("loop", "%(loop)");
        c.set("bad", "50%");
        assert_eq!(c.get_expanded("path").as_deref(), Some("/vm/vm1/disk%"));
        assert_eq!(c.get_expanded("bad").as_deref(), Some("50%"));
        assert_eq!(c.get_expanded("missing"), None);
        assert_eq!(c.get("path"), Some("/vm/vm1/disk%"));
        assert_eq!(c.get_raw("path"), Some("/vm/%(name)/disk\\%"));
        c.set("name", "vm2");
        assert_eq!(c.get("path"), Some("/vm/vm2/disk%"));
        // Recursion is bounded; the result is finite.
        assert!(c.get_expanded("loop").is_some());
    }
}
