//! The bhyvectl side of the control socket.
//!
//! The request is byte for byte what FreeBSD's bhyvectl sends (`usr.sbin/bhyvectl/bhyvectl.c`,
//! `snapshot_request`/`send_message`): `{cmd = "checkpoint", filename = basename(F),
//! suspend = <bool>, fddir = <dirname(F) opened O_DIRECTORY>}`, flags 0. FreeBSD's bhyvectl
//! closes right after sending; this one waits for the answer: a 2025 bhyve (and bhyve-rs)
//! replies with an nvlist holding `error` on failure, a FreeBSD 14 bhyve closes the connection
//! without a word once the checkpoint is done, and so does any bhyve after a suspend.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::nvlist::{NvError, NvList, NvValue};
use super::server::CLIENT_TIMEOUT;
use super::transport::{nvlist_recv_or_eof, nvlist_send, RecvLimits, TransportError};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid VM name '{0}'")]
    BadVmName(String),
    #[error("'{0}' does not name a file")]
    BadFilename(PathBuf),
    #[error("cannot open directory '{path}': {source}")]
    Directory { path: PathBuf, source: io::Error },
    #[error("no such VM '{name}' (no control socket at {path})")]
    NoSuchVm { name: String, path: PathBuf },
    #[error("permission denied on control socket {path}")]
    PermissionDenied { path: PathBuf },
    #[error(
        "VM '{name}' does not answer on {path} \
         (bhyve not running, or built without snapshot support)"
    )]
    NotListening { name: String, path: PathBuf },
    #[error("cannot connect to {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("cannot build the request: {0}")]
    Request(NvError),
    #[error("sending the request: {0}")]
    Send(TransportError),
    #[error("reading bhyve's reply: {0}")]
    Reply(TransportError),
    /// bhyve carried out the request and reports this failure.
    #[error("{0}")]
    Failed(String),
}

/// Default directory holding one control socket per running VM.
pub const DEFAULT_RUNDIR: &str = "/var/run/bhyve";

/// Split `filename` as bhyvectl does with dirname(3)/basename(3): a bare name lives in the
/// current directory.
fn split_filename(filename: &Path) -> Result<(&Path, &std::ffi::OsStr), ClientError> {
    let base = filename
        .file_name()
        .ok_or_else(|| ClientError::BadFilename(filename.to_path_buf()))?;
    let dir = match filename.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    Ok((dir, base))
}

fn open_directory(dir: &Path) -> Result<OwnedFd, ClientError> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)
        .map(OwnedFd::from)
        .map_err(|source| ClientError::Directory {
            path: dir.to_path_buf(),
            source,
        })
}

/// The request bhyvectl sends, pairs in bhyvectl's order.
pub fn checkpoint_request(
    filename: &Path,
    suspend: bool,
    dir: OwnedFd,
) -> Result<NvList, ClientError> {
    let (_, base) = split_filename(filename)?;
    let mut request = NvList::new();
    request
        .add_string("cmd", "checkpoint")
        .and_then(|()| request.add("filename", NvValue::String(base.as_bytes().to_vec())))
        .and_then(|()| request.add_bool("suspend", suspend))
        .and_then(|()| request.add_descriptor("fddir", dir))
        .map_err(ClientError::Request)?;
    Ok(request)
}

fn connect(rundir: &Path, vmname: &str) -> Result<(UnixStream, PathBuf), ClientError> {
    if vmname.is_empty() || vmname == "." || vmname == ".." || vmname.contains(['/', '\0']) {
        return Err(ClientError::BadVmName(vmname.to_string()));
    }
    let path = rundir.join(vmname);
    match UnixStream::connect(&path) {
        Ok(stream) => Ok((stream, path)),
        Err(e) => Err(match (e.kind(), e.raw_os_error()) {
            (io::ErrorKind::NotFound, _) => ClientError::NoSuchVm {
                name: vmname.to_string(),
                path,
            },
            (io::ErrorKind::PermissionDenied, _) => ClientError::PermissionDenied { path },
            (_, Some(libc::ECONNREFUSED)) => ClientError::NotListening {
                name: vmname.to_string(),
                path,
            },
            _ => ClientError::Connect { path, source: e },
        }),
    }
}

/// Ask the bhyve running `vmname` to write a snapshot to `filename` (relative paths resolve
/// against the caller's working directory); with `suspend`, bhyve exits once it is durable.
///
/// `Ok` when bhyve reports success, or when it closes the connection without a reply as a
/// FreeBSD 14 bhyve does after its checkpoint (it never reports failures).
pub fn request_checkpoint(
    rundir: &Path,
    vmname: &str,
    filename: &Path,
    suspend: bool,
) -> Result<(), ClientError> {
    let (dir, _) = split_filename(filename)?;
    let (stream, path) = connect(rundir, vmname)?;
    let request = checkpoint_request(filename, suspend, open_directory(dir)?)?;
    stream
        .set_write_timeout(Some(CLIENT_TIMEOUT))
        .map_err(|source| ClientError::Connect {
            path: path.clone(),
            source,
        })?;
    nvlist_send(&stream, &request).map_err(ClientError::Send)?;
    // Our copy of the directory descriptor is no longer needed while bhyve works.
    drop(request);
    // No read timeout: writing guest memory out may take minutes.
    match nvlist_recv_or_eof(&stream, RecvLimits::CONTROL).map_err(ClientError::Reply)? {
        None => {
            log::info!(
                "bhyve closed {} without a reply; the checkpoint has ended",
                path.display()
            );
            Ok(())
        }
        Some(reply) => match reply.get_string_bytes("error") {
            Some(message) => Err(ClientError::Failed(
                String::from_utf8_lossy(message).into_owned(),
            )),
            None => Ok(()),
        },
    }
}
