//! bhyve's end of the control socket: `<rundir>/<vmname>`, one request per connection.
//!
//! Protocol as FreeBSD bhyve speaks it (`usr.sbin/bhyve/ipc.c`, 2025 main, and the
//! `checkpoint` command of `snapshot.c`): the client connects, sends one nvlist with a string
//! `cmd`, and bhyve answers on the same connection with one nvlist, then closes it:
//! * unknown command: `{error = "command '<cmd>' not found"}` (byte-identical to bhyve's);
//! * `checkpoint` with string `filename`, bool `suspend`, descriptor `fddir`: the snapshot is
//!   written relative to `fddir`; the reply is an empty list on success and
//!   `{error = "<why>"}` on failure.
//!
//! Where bhyve crashes or stays silent, this server answers with an `error` instead and keeps
//! serving: a request without a string `cmd` (bhyve aborts), a request that does not decode
//! (bhyve logs and closes), a checkpoint missing an argument (bhyve drops it silently).
//! A client that closes early (FreeBSD 14's bhyvectl never reads the reply) costs nothing.
//! Requests are carried out one at a time, but a connection waits for its first byte without
//! holding up the others: a client that connects and stays silent delays nobody, and one
//! that has started must finish its request within [`CLIENT_TIMEOUT`] of connecting.
//! Unlike FreeBSD, which exits inside the handler, a successful suspend is answered first;
//! then the socket is removed, every request still queued is answered [`SUSPENDING`], and
//! [`ControlHandler::after_checkpoint_reply`] may exit.

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::nvlist::NvList;
use super::transport::{nvlist_recv_or_eof_before, nvlist_send, RecvLimits};

/// How long a client may take from connecting to the end of its request, and to take each
/// part of the reply.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The answer to requests that were queued behind a suspend that succeeded.
pub const SUSPENDING: &str = "the VM is suspending";

/// Connections still silent that are kept; past that, the oldest is closed.
const MAX_SILENT_CLIENTS: usize = 16;

/// A `checkpoint` request as received.
#[derive(Debug)]
pub struct CheckpointRequest {
    /// Directory the snapshot files go into (the client's `fddir`).
    pub dir: OwnedFd,
    /// File name relative to `dir` (bhyvectl sends a basename). FreeBSD's bhyve writes
    /// `filename`, `filename.kern` and `filename.meta`; bhyve-rs writes the one file
    /// `filename` (bhyve_snapshot(5)).
    pub filename: String,
    /// Stop the VM once the snapshot is written.
    pub suspend: bool,
}

/// What bhyve does with control requests. Called on the control thread, one at a time.
pub trait ControlHandler: Send + Sync {
    /// Write a snapshot; `Err` carries the message the client prints.
    fn checkpoint(&self, request: CheckpointRequest) -> Result<(), String>;

    /// Called after the reply to a checkpoint was sent and the connection closed (also when
    /// the client had already gone). After a successful suspend the control socket has been
    /// removed and no further request will be served: this is where bhyve exits.
    fn after_checkpoint_reply(&self, _suspend: bool, _result: &Result<(), String>) {}

    /// Any other command ([`super::vmstate`]): `Some` reply list or error text, `None` when the
    /// command is unknown.
    fn request(&self, _cmd: &str, _request: &NvList) -> Option<Result<NvList, String>> {
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("VM name '{0}' cannot name a control socket")]
    BadName(String),
    #[error("cannot create run directory {path}: {source}")]
    RunDir { path: PathBuf, source: io::Error },
    #[error(
        "run directory {path} belongs to uid {owner}, not to this user (uid {user}): \
         refusing to put a control socket there"
    )]
    RunDirOwner {
        path: PathBuf,
        owner: u32,
        user: u32,
    },
    #[error(
        "run directory {path} can be written by other users (mode {mode:04o}): \
         refusing to put a control socket there"
    )]
    RunDirWritable { path: PathBuf, mode: u32 },
    #[error("control socket path {0} is too long")]
    PathTooLong(PathBuf),
    #[error("another bhyve is already serving {0}")]
    AlreadyRunning(PathBuf),
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("control socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
}

/// The listening control socket and its thread. Dropping it stops the thread and removes
/// the socket (if it is still the one this server created).
pub struct ControlServer {
    path: PathBuf,
    wake: UnixStream,
    thread: Option<JoinHandle<()>>,
    identity: SocketIdentity,
}

/// Device and inode of the socket file, so only our own socket is ever removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SocketIdentity {
    dev: u64,
    ino: u64,
}

impl SocketIdentity {
    fn of(path: &Path) -> Option<SocketIdentity> {
        fs::symlink_metadata(path).ok().map(|m| SocketIdentity {
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    fn remove_if_ours(self, path: &Path) {
        if SocketIdentity::of(path) == Some(self) {
            if let Err(e) = fs::remove_file(path) {
                log::warn!("cannot remove control socket {}: {e}", path.display());
            }
        }
    }
}

/// Longest socket path a client can connect to (`sun_path` less its NUL).
fn max_socket_path() -> usize {
    if cfg!(target_os = "linux") {
        107
    } else {
        103
    }
}

fn socket_error(path: &Path) -> impl FnOnce(io::Error) -> ServerError + '_ {
    move |source| ServerError::Socket {
        path: path.to_path_buf(),
        source,
    }
}

/// The run directory must belong to this user and be writable by no one else: whoever can
/// write it can move the socket away and plant a listener of their own, which bhyvectl would
/// then hand a directory descriptor. A sticky bit does not help (the planter owns the entry).
fn check_rundir(rundir: &Path) -> Result<(), ServerError> {
    let meta = fs::metadata(rundir).map_err(|source| ServerError::RunDir {
        path: rundir.to_path_buf(),
        source,
    })?;
    let user = nix::unistd::geteuid().as_raw();
    if meta.uid() != user {
        return Err(ServerError::RunDirOwner {
            path: rundir.to_path_buf(),
            owner: meta.uid(),
            user,
        });
    }
    if meta.mode() & 0o022 != 0 {
        return Err(ServerError::RunDirWritable {
            path: rundir.to_path_buf(),
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(())
}

/// An exclusive lock on the run directory while a server checks for a live socket and puts its
/// own in place: of bhyve processes starting together with one VM name, exactly one wins and
/// the others find it answering.
fn lock_rundir(rundir: &Path) -> Result<Flock<fs::File>, ServerError> {
    let dir = fs::File::open(rundir).map_err(|source| ServerError::RunDir {
        path: rundir.to_path_buf(),
        source,
    })?;
    Flock::lock(dir, FlockArg::LockExclusive).map_err(|(_, errno)| ServerError::RunDir {
        path: rundir.to_path_buf(),
        source: errno.into(),
    })
}

/// Fail if a live server answers on `path`; a stale socket is left for the rename to replace.
fn check_existing(path: &Path) -> Result<(), ServerError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(socket_error(path)(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ServerError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ServerError::AlreadyRunning(path.to_path_buf())),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            log::info!("replacing stale control socket {}", path.display());
            Ok(())
        }
        Err(e) => Err(socket_error(path)(e)),
    }
}

/// Bind a listening socket at `path` with mode 0600, never visible with wider permissions:
/// bind inside a fresh 0700 directory, chmod, then rename into place.
fn bind_private(rundir: &Path, path: &Path) -> Result<UnixListener, ServerError> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let staging = loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = rundir.join(format!(".ctl-{}-{n}", std::process::id()));
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => break dir,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1000 => continue,
            Err(e) => return Err(socket_error(path)(e)),
        }
    };
    let staged = staging.join("s");
    let result = UnixListener::bind(&staged)
        .and_then(|listener| {
            fs::set_permissions(&staged, fs::Permissions::from_mode(0o600))?;
            fs::rename(&staged, path)?;
            Ok(listener)
        })
        .map_err(socket_error(path));
    let _ = fs::remove_file(&staged);
    let _ = fs::remove_dir(&staging);
    result
}

impl ControlServer {
    /// Create `<rundir>/<vmname>` (and `rundir`, mode 0755, if missing) and serve it on a
    /// thread. Refuses a run directory another user owns or can write, and to take over the
    /// socket of a bhyve that still answers.
    pub fn start(
        rundir: &Path,
        vmname: &str,
        handler: Arc<dyn ControlHandler>,
    ) -> Result<ControlServer, ServerError> {
        if vmname.is_empty() || vmname == "." || vmname == ".." || vmname.contains(['/', '\0']) {
            return Err(ServerError::BadName(vmname.to_string()));
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(rundir)
            .map_err(|source| ServerError::RunDir {
                path: rundir.to_path_buf(),
                source,
            })?;
        let path = rundir.join(vmname);
        if path.as_os_str().len() > max_socket_path() {
            return Err(ServerError::PathTooLong(path));
        }
        check_rundir(rundir)?;
        let lock = lock_rundir(rundir)?;
        check_existing(&path)?;
        let listener = bind_private(rundir, &path)?;
        let identity = SocketIdentity::of(&path)
            .ok_or_else(|| socket_error(&path)(io::Error::from(io::ErrorKind::NotFound)))?;
        // The socket listens: a later start sees it answer.
        drop(lock);
        listener
            .set_nonblocking(true)
            .map_err(socket_error(&path))?;
        let (wake, wake_rx) = UnixStream::pair().map_err(socket_error(&path))?;
        let thread_path = path.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || serve(listener, wake_rx, handler, thread_path, identity))
            .map_err(socket_error(&path))?;
        log::debug!("control socket listening on {}", path.display());
        Ok(ControlServer {
            path,
            wake,
            thread: Some(thread),
            identity,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = (&self.wake).write_all(&[0]);
        if let Some(thread) = self.thread.take() {
            // Dropped from a handler callback: the thread is ending by itself.
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
        self.identity.remove_if_ours(&self.path);
    }
}

enum Flow {
    Continue,
    /// A suspend succeeded and its socket is gone: answer whoever still waits, then call
    /// [`ControlHandler::after_checkpoint_reply`] and stop.
    Suspended,
}

/// A connection that has not sent anything yet.
struct Silent {
    stream: UnixStream,
    /// When its whole request must be in.
    deadline: Instant,
}

fn serve(
    listener: UnixListener,
    mut wake: UnixStream,
    handler: Arc<dyn ControlHandler>,
    path: PathBuf,
    identity: SocketIdentity,
) {
    let mut silent: Vec<Silent> = Vec::new();
    loop {
        let now = Instant::now();
        // A client whose time ran out while another request was being carried out may have
        // sent its request meanwhile: it is kept and served.
        silent.retain(|client| {
            let waiting = client.deadline > now || readable(&client.stream);
            if !waiting {
                log::debug!("control: client sent nothing within {CLIENT_TIMEOUT:?}");
            }
            waiting
        });
        let timeout = match silent.iter().map(|c| c.deadline).min() {
            None => PollTimeout::NONE,
            Some(deadline) => {
                let ms = deadline.saturating_duration_since(now).as_millis() + 1;
                PollTimeout::try_from(ms.min(60_000) as i32).unwrap_or(PollTimeout::MAX)
            }
        };
        let (accept_ready, woken, ready) = {
            let mut fds = vec![
                PollFd::new(listener.as_fd(), PollFlags::POLLIN),
                PollFd::new(wake.as_fd(), PollFlags::POLLIN),
            ];
            fds.extend(
                silent
                    .iter()
                    .map(|c| PollFd::new(c.stream.as_fd(), PollFlags::POLLIN)),
            );
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    log::error!("control socket {}: poll: {e}", path.display());
                    return;
                }
            }
            let fired: Vec<bool> = fds
                .iter()
                .map(|fd| fd.revents().is_some_and(|r| !r.is_empty()))
                .collect();
            (fired[0], fired[1], fired[2..].to_vec())
        };
        if woken {
            let mut byte = [0u8];
            let _ = wake.read(&mut byte);
            return;
        }
        // Serve, in the order they connected, the clients that have sent something (or
        // closed): a request is on its way and takes no more than its deadline.
        let (talking, still): (Vec<_>, Vec<_>) = std::mem::take(&mut silent)
            .into_iter()
            .zip(ready)
            .partition(|(_, ready)| *ready);
        silent = still.into_iter().map(|(client, _)| client).collect();
        let mut talking = talking.into_iter().map(|(client, _)| client);
        while let Some(mut client) = talking.next() {
            // Requests are carried out one at a time: a client's time runs from when its turn
            // comes, not from when it connected.
            client.deadline = client.deadline.max(Instant::now() + CLIENT_TIMEOUT);
            let flow = handle_connection(client, handler.as_ref(), &path, identity);
            if let Flow::Suspended = flow {
                let mut queued: Vec<Silent> = talking.collect();
                queued.append(&mut silent);
                accept_waiting(&listener, &mut queued, &path);
                for client in queued {
                    refuse_while_suspending(client);
                }
                handler.after_checkpoint_reply(true, &Ok(()));
                return;
            }
        }
        if accept_ready {
            accept_waiting(&listener, &mut silent, &path);
        }
    }
}

/// Whether `stream` has bytes (or an end of file) to read right now.
fn readable(stream: &UnixStream) -> bool {
    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// Take the connections waiting in the listen queue; each may stay silent until its deadline.
fn accept_waiting(listener: &UnixListener, silent: &mut Vec<Silent>, path: &Path) {
    // Bounded, so a flood of connections cannot keep the others from being served.
    for _ in 0..MAX_SILENT_CLIENTS {
        match listener.accept() {
            Ok((stream, _)) => {
                if silent.len() >= MAX_SILENT_CLIENTS {
                    log::warn!("control: too many silent clients; closing the oldest");
                    silent.remove(0);
                }
                silent.push(Silent {
                    stream,
                    deadline: Instant::now() + CLIENT_TIMEOUT,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => {
                // Out of descriptors or similar: back off instead of spinning.
                log::warn!("control socket {}: accept: {e}", path.display());
                std::thread::sleep(Duration::from_millis(100));
                return;
            }
        }
    }
}

fn error_reply(message: &str) -> NvList {
    let mut reply = NvList::new();
    // A message with a NUL cannot be represented; drop what follows it.
    let text = message.split('\0').next().unwrap_or_default();
    if reply.add_string("error", text).is_err() {
        log::warn!("control: cannot encode error reply");
    }
    reply
}

fn send_reply(stream: &UnixStream, reply: &NvList) {
    // The client may already be gone (FreeBSD 14's bhyvectl closes without reading).
    if let Err(e) = nvlist_send(stream, reply) {
        log::debug!("control: reply not delivered: {e}");
    }
}

/// Closing a stream socket with unread input makes the peer's read fail (ECONNRESET on
/// Linux) and can destroy the reply it has not read yet: read what is left, briefly, first.
fn discard_input(mut stream: UnixStream) {
    const DRAIN_LIMIT: usize = 1 << 20;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 4096];
    let deadline = std::time::Instant::now() + Duration::from_millis(500);
    let mut drained = 0;
    while drained < DRAIN_LIMIT && std::time::Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

/// Answer a connection that was waiting when the VM suspended: its request (if any arrives in
/// time) is read and answered [`SUSPENDING`], so its client does not take the silence for a
/// crash.
fn refuse_while_suspending(client: Silent) {
    let Silent { stream, deadline } = client;
    if stream.set_nonblocking(false).is_err() {
        return;
    }
    let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
    // A client that has not sent its request yet gets a moment, not its full time.
    let deadline = deadline.min(Instant::now() + Duration::from_secs(1));
    if let Ok(None) = nvlist_recv_or_eof_before(&stream, RecvLimits::CONTROL, deadline) {
        return;
    }
    log::info!("control: refusing a request queued behind the suspend");
    send_reply(&stream, &error_reply(SUSPENDING));
    discard_input(stream);
}

fn handle_connection(
    client: Silent,
    handler: &dyn ControlHandler,
    path: &Path,
    identity: SocketIdentity,
) -> Flow {
    let Silent { stream, deadline } = client;
    // Accepted sockets inherit O_NONBLOCK from the listener on FreeBSD.
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_write_timeout(Some(CLIENT_TIMEOUT)));
    if let Err(e) = setup {
        log::warn!("control: cannot set up connection: {e}");
        return Flow::Continue;
    }
    let mut request = match nvlist_recv_or_eof_before(&stream, RecvLimits::CONTROL, deadline) {
        Ok(Some(request)) => request,
        Ok(None) => {
            log::debug!("control: connection closed without a request");
            return Flow::Continue;
        }
        Err(e) => {
            log::warn!("control: nvlist_recv() failed: {e}");
            send_reply(&stream, &error_reply(&format!("malformed request: {e}")));
            discard_input(stream);
            return Flow::Continue;
        }
    };
    let cmd = match request.get_string_bytes("cmd") {
        Some(cmd) => cmd.to_vec(),
        None => {
            log::warn!("control: request without a command name");
            send_reply(&stream, &error_reply("missing command name"));
            return Flow::Continue;
        }
    };
    if cmd != b"checkpoint" {
        let cmd = String::from_utf8_lossy(&cmd);
        let reply = match handler.request(&cmd, &request) {
            Some(Ok(reply)) => reply,
            Some(Err(why)) => {
                log::info!("control: {cmd}: {why}");
                error_reply(&why)
            }
            None => {
                log::warn!("control: unknown command '{cmd}'");
                error_reply(&format!("command '{cmd}' not found"))
            }
        };
        send_reply(&stream, &reply);
        return Flow::Continue;
    }

    let request = match checkpoint_request(&mut request) {
        Ok(request) => request,
        Err(why) => {
            log::warn!("control: {why}");
            send_reply(&stream, &error_reply(&why));
            return Flow::Continue;
        }
    };
    let suspend = request.suspend;
    let filename = request.filename.clone();
    let result = handler.checkpoint(request);
    match &result {
        Ok(()) => log::info!("checkpoint written to '{filename}'"),
        Err(e) => log::warn!("checkpoint to '{filename}' failed: {e}"),
    }
    let reply = match &result {
        Ok(()) => NvList::new(),
        Err(e) => error_reply(e),
    };
    send_reply(&stream, &reply);
    drop(stream);
    if suspend && result.is_ok() {
        // The VM is gone: nothing more to serve.
        identity.remove_if_ours(path);
        return Flow::Suspended;
    }
    handler.after_checkpoint_reply(suspend, &result);
    Flow::Continue
}

/// Take the checkpoint arguments out of a request, as `vm_do_checkpoint` requires them.
fn checkpoint_request(request: &mut NvList) -> Result<CheckpointRequest, String> {
    let filename = request
        .get_string_bytes("filename")
        .ok_or("checkpoint: request lacks a string 'filename'")?;
    let filename = String::from_utf8(filename.to_vec())
        .map_err(|_| "checkpoint: filename is not valid UTF-8".to_string())?;
    if filename.is_empty() {
        return Err("checkpoint: empty filename".into());
    }
    let suspend = request
        .get_bool("suspend")
        .ok_or("checkpoint: request lacks a bool 'suspend'")?;
    let dir = request
        .take_descriptor("fddir")
        .ok_or("checkpoint: request lacks a descriptor 'fddir'")?;
    Ok(CheckpointRequest {
        dir,
        filename,
        suspend,
    })
}
