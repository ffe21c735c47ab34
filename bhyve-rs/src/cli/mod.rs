//! bhyve's command line: getopt-compatible parsing into the configuration tree.

/// Entry point of the `bhyve` binary; returns the process exit status.
pub fn main() -> i32 {
    eprintln!("bhyve: not implemented yet");
    4
}
