//! The bhyvectl side of the control socket.
//!
//! The request is byte for byte what FreeBSD's bhyvectl sends (`usr.sbin/bhyvectl/bhyvectl.c`,
//! `snapshot_request`/`send_message`): `{cmd = "checkpoint", filename = basename(F),
//! suspend = <bool>, fddir = <dirname(F) opened O_DIRECTORY>}`, flags 0. FreeBSD's bhyvectl
//! closes right after sending; this one waits for the answer: a 2025 bhyve (and bhyve-rs)
//! replies with an nvlist holding `error` on failure; a FreeBSD 14 bhyve closes the connection
//! without a word, after a checkpoint that worked as after one that failed. Silence is also all a
//! bhyve that crashes while saving leaves behind, so after a silent close the file itself is the
//! answer: it must have been (re)written since the request was sent, and read as a snapshot.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
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
    /// A target ending in `/` or `/.`: path resolution wants a directory there.
    #[error("'{}': {}", path.display(), errno.desc())]
    NotAFileName {
        path: PathBuf,
        errno: nix::errno::Errno,
    },
    #[error("cannot open directory '{path}': {source}")]
    Directory { path: PathBuf, source: io::Error },
    #[error("no such VM '{name}' (no control socket at {path}; bhyve is not running)")]
    NoSuchVm { name: String, path: PathBuf },
    #[error("permission denied on control socket {path}")]
    PermissionDenied { path: PathBuf },
    #[error("VM '{name}' does not answer on {path} (bhyve is not running)")]
    NotListening { name: String, path: PathBuf },
    #[error("cannot connect to {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    /// The listener is neither root nor the caller: not a bhyve to trust with a descriptor.
    #[error(
        "control socket {path} is served by uid {peer}, neither root nor this user \
         (uid {user}): not sending it the directory"
    )]
    UntrustedPeer { path: PathBuf, peer: u32, user: u32 },
    #[error("cannot build the request: {0}")]
    Request(NvError),
    #[error("sending the request: {0}")]
    Send(TransportError),
    #[error("reading bhyve's reply: {0}")]
    Reply(TransportError),
    /// bhyve carried out the request and reports this failure.
    #[error("{0}")]
    Failed(String),
    /// bhyve closed the connection without a word and left no complete snapshot behind (it
    /// crashed or was killed while saving, or failed in a way it does not report).
    #[error("bhyve closed the connection without a reply and {} is not a snapshot it wrote: {why}", path.display())]
    NotWritten { path: PathBuf, why: String },
}

/// Default directory holding one control socket per running VM.
pub const DEFAULT_RUNDIR: &str = "/var/run/bhyve";

/// Split `filename` as bhyvectl does with dirname(3)/basename(3): a bare name lives in the
/// current directory.
///
/// A name ending in `/` or `/.` (which `Path` would quietly drop) names a directory, as POSIX
/// path resolution reads it: ENOTDIR when what comes before is not one, EISDIR when it is.
fn split_filename(filename: &Path) -> Result<(&Path, &std::ffi::OsStr), ClientError> {
    let bytes = filename.as_os_str().as_bytes();
    if bytes.ends_with(b"/") || bytes.ends_with(b"/.") {
        let errno = match std::fs::metadata(filename) {
            Ok(meta) if meta.is_dir() => nix::errno::Errno::EISDIR,
            Ok(_) => nix::errno::Errno::ENOTDIR,
            Err(e) => e
                .raw_os_error()
                .map_or(nix::errno::Errno::ENOTDIR, nix::errno::Errno::from_raw),
        };
        return Err(ClientError::NotAFileName {
            path: filename.to_path_buf(),
            errno,
        });
    }
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

/// User id of the process that listens at the other end of `stream`.
#[cfg(target_os = "linux")]
fn peer_uid(stream: &UnixStream) -> nix::Result<u32> {
    nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map(|credentials| credentials.uid())
}

#[cfg(not(target_os = "linux"))]
fn peer_uid(stream: &UnixStream) -> nix::Result<u32> {
    nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::LocalPeerCred)
        .map(|credentials| credentials.uid())
}

/// The directory descriptor gives whoever receives it the caller's access to the directory, so
/// it goes only to a bhyve running as root or as the caller: a socket planted by someone else
/// gets nothing.
fn check_peer(stream: &UnixStream, path: &Path) -> Result<(), ClientError> {
    let peer = peer_uid(stream).map_err(|errno| ClientError::Connect {
        path: path.to_path_buf(),
        source: errno.into(),
    })?;
    let user = nix::unistd::geteuid().as_raw();
    if peer == 0 || peer == user {
        return Ok(());
    }
    Err(ClientError::UntrustedPeer {
        path: path.to_path_buf(),
        peer,
        user,
    })
}

/// Ask the bhyve running `vmname` to write a snapshot to `filename` (relative paths resolve
/// against the caller's working directory); with `suspend`, bhyve exits once it is durable.
///
/// `Ok` when bhyve reports success, or when it closes the connection without a reply (as a
/// FreeBSD 14 bhyve does) and a fresh, readable snapshot is at `filename`.
pub fn request_checkpoint(
    rundir: &Path,
    vmname: &str,
    filename: &Path,
    suspend: bool,
) -> Result<(), ClientError> {
    let (dir, _) = split_filename(filename)?;
    let (stream, path) = connect(rundir, vmname)?;
    check_peer(&stream, &path)?;
    let before = FileStamp::of(filename);
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
    // A peer that dies with part of the request unread resets the connection instead of
    // closing it; either way there is no reply, and the file has to speak for itself.
    let reply = match nvlist_recv_or_eof(&stream, RecvLimits::CONTROL) {
        Err(TransportError::Io(nix::errno::Errno::ECONNRESET)) => None,
        other => other.map_err(ClientError::Reply)?,
    };
    match reply {
        None => {
            log::info!(
                "bhyve closed {} without a reply; checking {}",
                path.display(),
                filename.display()
            );
            check_written(filename, before).map_err(|why| ClientError::NotWritten {
                path: filename.to_path_buf(),
                why,
            })
        }
        Some(reply) => match reply.get_string_bytes("error") {
            Some(message) => Err(ClientError::Failed(
                String::from_utf8_lossy(message).into_owned(),
            )),
            None => Ok(()),
        },
    }
}

/// Send `request` to the bhyve running `vmname` and return its reply; a reply holding `error`
/// is [`ClientError::Failed`] with bhyve's words.
pub fn request(rundir: &Path, vmname: &str, request: &NvList) -> Result<NvList, ClientError> {
    let (stream, path) = connect(rundir, vmname)?;
    check_peer(&stream, &path)?;
    let timeouts = stream
        .set_write_timeout(Some(CLIENT_TIMEOUT))
        .and_then(|()| stream.set_read_timeout(Some(CLIENT_TIMEOUT)));
    timeouts.map_err(|source| ClientError::Connect { path, source })?;
    nvlist_send(&stream, request).map_err(ClientError::Send)?;
    let reply = nvlist_recv_or_eof(&stream, RecvLimits::CONTROL)
        .map_err(ClientError::Reply)?
        .ok_or_else(|| ClientError::Failed("bhyve closed the connection without a reply".into()))?;
    match reply.get_string_bytes("error") {
        Some(message) => Err(ClientError::Failed(
            String::from_utf8_lossy(message).into_owned(),
        )),
        None => Ok(reply),
    }
}

/// Identity and change time of a file, to tell a file written for this request from one that
/// was there before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    ctime: i64,
    ctime_nsec: i64,
    size: u64,
}

impl FileStamp {
    fn of(path: &Path) -> Option<FileStamp> {
        std::fs::metadata(path).ok().map(|m| FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            ctime: m.ctime(),
            ctime_nsec: m.ctime_nsec(),
            size: m.len(),
        })
    }
}

/// After a silent close: `path` must exist, be new or changed since `before`, and read as a
/// snapshot: a bhyve-rs file whose header, section table and data sections check out, or
/// FreeBSD bhyve's three files (`F`, `F.kern`, `F.meta`) with a complete `.meta` document.
fn check_written(path: &Path, before: Option<FileStamp>) -> Result<(), String> {
    let now = match FileStamp::of(path) {
        Some(stamp) => stamp,
        None => return Err("no such file".to_string()),
    };
    if Some(now) == before {
        return Err("the file is unchanged since the request".to_string());
    }
    let mut magic = [0u8; 8];
    let read = std::fs::File::open(path)
        .and_then(|mut f| io::Read::read(&mut f, &mut magic))
        .map_err(|e| format!("cannot read it: {e}"))?;
    if read == magic.len() && &magic == b"BHYVSNAP" {
        return check_bhyve_rs_snapshot(path);
    }
    check_freebsd_checkpoint(path)
}

#[cfg(feature = "bhyve_snapshot")]
fn check_bhyve_rs_snapshot(path: &Path) -> Result<(), String> {
    crate::snapshot::SnapshotReader::open(path)
        .map(drop)
        .map_err(|e| e.to_string())
}

#[cfg(not(feature = "bhyve_snapshot"))]
fn check_bhyve_rs_snapshot(_path: &Path) -> Result<(), String> {
    Err("this build cannot read snapshots".to_string())
}

/// FreeBSD's bhyve writes RAM to `F`, device state to `F.kern` and a JSON index to `F.meta`,
/// the index last; a save cut short leaves the index without its closing brace.
fn check_freebsd_checkpoint(path: &Path) -> Result<(), String> {
    let with_suffix = |suffix: &str| {
        let mut name = path.as_os_str().to_os_string();
        name.push(suffix);
        PathBuf::from(name)
    };
    let meta_path = with_suffix(".meta");
    let meta = std::fs::read(&meta_path)
        .map_err(|_| "not a bhyve-rs snapshot, and no FreeBSD .meta file next to it".to_string())?;
    let text = String::from_utf8_lossy(&meta);
    let complete = text.trim_end().ends_with('}')
        && text.contains("\"basic metadata\"")
        && text.contains("\"devices\"");
    if !complete {
        return Err(format!("{} is incomplete", meta_path.display()));
    }
    if !with_suffix(".kern").is_file() {
        return Err("the FreeBSD .kern file is missing".to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_ending_in_slash_or_slash_dot_names_a_directory() {
        let dir = std::env::temp_dir().join(format!("bhyve-rs-client-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("notes.txt"), "notes").unwrap();
        let refused = |name: &str| match split_filename(&dir.join(name)) {
            Err(ClientError::NotAFileName { errno, .. }) => errno,
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(refused("notes.txt/."), nix::errno::Errno::ENOTDIR);
        assert_eq!(refused("notes.txt/"), nix::errno::Errno::ENOTDIR);
        assert_eq!(refused("sub/."), nix::errno::Errno::EISDIR);
        assert_eq!(refused("sub/"), nix::errno::Errno::EISDIR);
        assert_eq!(refused("missing/."), nix::errno::Errno::ENOENT);
        let message = split_filename(Path::new("/nonexistent-dir/notes.txt/."))
            .unwrap_err()
            .to_string();
        assert_eq!(
            message,
            "'/nonexistent-dir/notes.txt/.': No such file or directory"
        );
        let notes = dir.join("notes.txt");
        let (parent, base) = split_filename(&notes).unwrap();
        assert_eq!(
            (parent, base),
            (dir.as_path(), std::ffi::OsStr::new("notes.txt"))
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("notes.txt")).unwrap(),
            "notes"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
