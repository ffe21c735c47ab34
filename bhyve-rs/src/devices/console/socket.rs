//! The host side of a virtio-console port: a UNIX stream socket bhyve listens on at the port's
//! `path`, as pci_virtio_console.c does.
//!
//! One client at a time is served; a second connection while one is open is accepted and
//! closed at once. Bytes from the guest are queued (up to [`MAX_PENDING`]) and written as the
//! client takes them, so a slow client never blocks a vCPU; a client that falls further behind,
//! hangs up or errs is disconnected, and the port goes back to waiting for the next one. The
//! socket file is removed when the port goes away.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use crate::config::Config;

/// Ports per device (`VTCON_MAXPORTS`).
pub const MAX_PORTS: usize = 16;

/// The most guest output held for a client that does not read (`VTCON_SOCK_TX_MAX` plays this
/// part in bhyve); past it the client is disconnected rather than the guest stalled.
pub const MAX_PENDING: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("vtcon: Invalid port {0}: not a number from 0 to 15")]
    InvalidPort(String),
    #[error("vtcon: required {key} missing for port {port}")]
    Missing { port: usize, key: &'static str },
    #[error("vtcon: port {port} and port {other} both use the name \"{name}\"")]
    DuplicateName {
        port: usize,
        other: usize,
        name: String,
    },
    #[error("vtcon: cannot create port {name} at {path}: {source}")]
    Bind {
        name: String,
        path: String,
        source: io::Error,
    },
}

/// One `port.N` node of a virtio-console: its number, name and socket path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    pub id: usize,
    pub name: String,
    pub path: PathBuf,
}

/// The ports `node.port.*` configures, by number, checked without creating anything.
pub fn ports_from_config(config: &Config, node: &str) -> Result<Vec<PortSpec>, PortError> {
    let ports_node = format!("{node}.port");
    let mut ports: Vec<PortSpec> = Vec::new();
    for child in config.children(&ports_node) {
        // pci_vtcon_parse_port: decimal digits only, 0 to VTCON_MAXPORTS - 1.
        let id = Some(child)
            .filter(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|c| c.parse::<usize>().ok())
            .filter(|&id| id < MAX_PORTS)
            .ok_or_else(|| PortError::InvalidPort(child.to_string()))?;
        let value = |key: &'static str| {
            config
                .get(&format!("{ports_node}.{child}.{key}"))
                .map(str::to_string)
                .ok_or(PortError::Missing { port: id, key })
        };
        let path = value("path")?;
        let name = value("name")?;
        // The guest finds ports by name (/dev/virtio-ports/NAME); two with one name clash.
        if let Some(other) = ports.iter().find(|p| p.name == name) {
            return Err(PortError::DuplicateName {
                port: id,
                other: other.id,
                name,
            });
        }
        ports.push(PortSpec {
            id,
            name,
            path: PathBuf::from(path),
        });
    }
    ports.sort_by_key(|p| p.id);
    Ok(ports)
}

/// What a read from the client found.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// Bytes for the guest.
    Data(usize),
    /// Nothing now.
    Nothing,
    /// The client went away (or there is none); the port is closed.
    Closed,
}

/// A port's socket: listening, and at most one client.
pub struct SocketPort {
    spec: PortSpec,
    listener: UnixListener,
    client: Option<UnixStream>,
    /// Guest output the client has not taken yet.
    pending: VecDeque<u8>,
}

impl SocketPort {
    /// Listen on the port's path. An existing file there is an error, as with bhyve.
    pub fn bind(spec: &PortSpec) -> Result<Self, PortError> {
        let error = |source| PortError::Bind {
            name: spec.name.clone(),
            path: spec.path.display().to_string(),
            source,
        };
        let listener = UnixListener::bind(&spec.path).map_err(error)?;
        remove_at_exit(&spec.path);
        // From here on the file is ours: remove it if the port cannot be set up.
        let port = SocketPort {
            spec: spec.clone(),
            listener,
            client: None,
            pending: VecDeque::new(),
        };
        port.listener.set_nonblocking(true).map_err(error)?;
        Ok(port)
    }

    pub fn spec(&self) -> &PortSpec {
        &self.spec
    }

    /// Whether a client is connected (the guest sees the port open).
    pub fn is_open(&self) -> bool {
        self.client.is_some()
    }

    /// Readable when a client is waiting to be accepted.
    pub fn listener_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }

    /// The connected client: readable when it sent bytes or hung up, writable when queued
    /// output can move.
    pub fn client_fd(&self) -> Option<BorrowedFd<'_>> {
        self.client.as_ref().map(|c| c.as_fd())
    }

    /// Whether output is queued for the client (poll its descriptor for writing).
    pub fn has_pending_output(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Accept waiting connections. Returns true when a client became this port's (the port
    /// opened); connections beyond the first are closed at once.
    pub fn accept(&mut self) -> bool {
        let mut opened = false;
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.client.is_some() || stream.set_nonblocking(true).is_err() {
                        continue; // dropped: closed
                    }
                    self.client = Some(stream);
                    opened = true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return opened,
            }
        }
    }

    /// Read what the client sent into `buffer` (one read).
    pub fn receive(&mut self, buffer: &mut [u8]) -> Received {
        let Some(client) = self.client.as_mut() else {
            return Received::Closed;
        };
        if buffer.is_empty() {
            return Received::Nothing;
        }
        match client.read(buffer) {
            Ok(0) => {
                self.disconnect();
                Received::Closed
            }
            Ok(n) => Received::Data(n),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                Received::Nothing
            }
            Err(_) => {
                self.disconnect();
                Received::Closed
            }
        }
    }

    /// Queue guest output for the client and write what it takes now. Without a client the
    /// bytes are dropped (as bhyve does). Returns false when the client was disconnected.
    pub fn send(&mut self, data: &[u8]) -> bool {
        if self.client.is_none() {
            return true;
        }
        if self.pending.len() + data.len() > MAX_PENDING {
            self.disconnect();
            return false;
        }
        self.pending.extend(data);
        self.flush()
    }

    /// Write queued output the client can take now. Returns false when the client was
    /// disconnected (it hung up or erred).
    pub fn flush(&mut self) -> bool {
        let Some(client) = self.client.as_mut() else {
            self.pending.clear();
            return true;
        };
        while !self.pending.is_empty() {
            let (front, _) = self.pending.as_slices();
            // send(2) with MSG_NOSIGNAL: a client that hung up must not raise SIGPIPE.
            match nix::sys::socket::send(
                std::os::fd::AsRawFd::as_raw_fd(client),
                front,
                nix::sys::socket::MsgFlags::MSG_NOSIGNAL | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(nix::errno::Errno::EAGAIN) => return true,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => {
                    self.disconnect();
                    return false;
                }
            }
        }
        let _ = client.flush();
        true
    }

    /// Drop the client (the port closes); queued output goes with it.
    pub fn disconnect(&mut self) {
        self.client = None;
        self.pending.clear();
    }
}

impl Drop for SocketPort {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.spec.path);
        if let Ok(mut paths) = SOCKET_FILES.lock() {
            paths.retain(|p| p != &self.spec.path);
        }
    }
}

/// Socket files this process made and has not removed yet. bhyve ends with exit(3), which
/// drops nothing, so they are also removed then: a VM started again finds its paths free.
static SOCKET_FILES: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn remove_at_exit(path: &Path) {
    static REGISTERED: std::sync::Once = std::sync::Once::new();
    REGISTERED.call_once(|| {
        // SAFETY: atexit(3) with a function that takes no arguments and does not unwind.
        unsafe { libc::atexit(remove_socket_files) };
    });
    if let Ok(mut paths) = SOCKET_FILES.lock() {
        paths.push(path.to_path_buf());
    }
}

extern "C" fn remove_socket_files() {
    if let Ok(paths) = SOCKET_FILES.lock() {
        for path in paths.iter() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Whether `path` is a socket file (for tests and diagnostics).
pub fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}
