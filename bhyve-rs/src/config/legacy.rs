//! The legacy option syntax of `-s slot,emulation,conf` and `-l device,conf`: turning the `conf`
//! string into keys below one configuration node, as FreeBSD's `pci_parse_legacy_config` and the
//! emulations' own `pe_legacy_config` parsers do. Each emulation's parser lives with its
//! registry entry ([`crate::devices::registry`]); these are the pieces they share.

use super::{Config, ConfigError};

/// Why a legacy option string was refused. The command line prints it and exits with 4.
#[derive(Debug)]
pub enum LegacyError {
    /// The configuration tree refused a key (printed as `bhyve: <reason>`).
    Tree(ConfigError),
    /// The emulation refused the string; the line is printed as it is.
    Invalid(String),
}

impl From<ConfigError> for LegacyError {
    fn from(e: ConfigError) -> Self {
        LegacyError::Tree(e)
    }
}

/// A legacy parser: the option string (`None` when the `-s` value ends after the emulation)
/// into keys below `node`.
pub type LegacyParser = fn(&mut LegacyWriter<'_>, &str, Option<&str>) -> Result<(), LegacyError>;

/// Writes keys below configuration nodes for a legacy parser.
pub struct LegacyWriter<'a> {
    pub config: &'a mut Config,
}

impl LegacyWriter<'_> {
    pub fn set(&mut self, node: &str, name: &str, value: &str) -> Result<(), LegacyError> {
        Ok(self.config.set_in_node(node, name, value)?)
    }

    pub fn create(&mut self, node: &str) -> Result<(), LegacyError> {
        Ok(self.config.create_node(node)?)
    }

    /// `pci_parse_legacy_config`: `name=value` pairs, bare names become `true`.
    pub fn generic(&mut self, node: &str, conf: Option<&str>) -> Result<(), LegacyError> {
        let Some(conf) = conf else {
            return Ok(());
        };
        for token in conf.split(',') {
            match token.split_once('=') {
                Some((name, value)) => self.set(node, name, value)?,
                None => self.set(node, token, "true")?,
            }
        }
        Ok(())
    }

    /// The first token is the value of `key`, the rest is [`LegacyWriter::generic`].
    pub fn first_token_then_generic(
        &mut self,
        node: &str,
        key: &str,
        conf: Option<&str>,
    ) -> Result<(), LegacyError> {
        let Some(conf) = conf else {
            return Ok(());
        };
        match conf.split_once(',') {
            None => self.set(node, key, conf),
            Some((first, rest)) => {
                self.set(node, key, first)?;
                self.generic(node, Some(rest))
            }
        }
    }
}

/// The generic syntax, for an emulation without a parser of its own.
pub fn generic(
    w: &mut LegacyWriter<'_>,
    node: &str,
    conf: Option<&str>,
) -> Result<(), LegacyError> {
    w.generic(node, conf)
}
