//! The bhyvectl side of the control socket.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Failed(String),
}

/// Default directory holding one control socket per running VM.
pub const DEFAULT_RUNDIR: &str = "/var/run/bhyve";

/// Ask the bhyve running `vmname` to write a snapshot to `filename` (relative paths resolve
/// against the caller's working directory); with `suspend`, bhyve exits once it is durable.
pub fn request_checkpoint(
    _rundir: &Path,
    _vmname: &str,
    _filename: &Path,
    _suspend: bool,
) -> Result<(), ClientError> {
    Err(ClientError::Failed("not implemented yet".into()))
}
