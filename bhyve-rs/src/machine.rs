//! A VM built from the configuration tree: memory, vCPUs, devices; its run loop and exit status.

use crate::config::Config;

/// Build the VM `config` describes, run it until it stops, and return bhyve's exit status
/// (0 reset, 1 power-off, 2 halt, 3 triple fault, 4 error).
pub fn run(_config: &Config) -> i32 {
    eprintln!("bhyve: running guests is not implemented yet");
    4
}
