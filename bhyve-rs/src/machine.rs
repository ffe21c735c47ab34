//! A VM built from the configuration tree: memory, vCPUs, devices; its run loop and exit status.

use std::path::Path;

use crate::config::Config;

/// Build the VM `config` describes (or, with `restore`, the one saved in that snapshot file),
/// run it until it stops, and return bhyve's exit status (0 reset, 1 power-off, 2 halt,
/// 3 triple fault, 4 error).
pub fn run(_config: &Config, _restore: Option<&Path>) -> i32 {
    eprintln!("bhyve: running guests is not implemented yet");
    4
}
