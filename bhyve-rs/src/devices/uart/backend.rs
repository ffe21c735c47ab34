//! Where a UART's bytes come from and go to: `stdio`, a terminal such as `/dev/nmdm0A`, a FIFO,
//! or a plain file (output only, appended).
//!
//! `tcp=ADDRESS:PORT` (IPv6 addresses in brackets) listens there, as bhyve's `uart_backend.c`:
//! one client at a time is the console; a second one is told the socket is already connected
//! and closed; while nobody is connected the output is dropped.
//!
//! Input is read by one thread per UART, which pushes bytes into the receive FIFO under the
//! device's lock and holds on to whatever does not fit until the guest makes room. Output is
//! written straight through, one `write(2)` per byte, so a reader sees it at once.
//!
//! A terminal on stdin is put in raw mode. Its settings are restored when the backend is dropped,
//! by [`restore_terminal`], and by an `atexit` hook registered the first time stdin is made raw,
//! so `std::process::exit` anywhere in the program leaves the user's terminal usable. A
//! `SIGKILL` cannot be handled; `stty sane` fixes the terminal then.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::termios::{self, ControlFlags, SetArg, Termios};

use super::{SharedUart, UartOutput};

/// How often a waiting input thread checks whether it should stop.
const STOP_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("stdio is already used by another device")]
    StdioInUse,
    #[error("Invalid number of parameter")]
    TcpSyntax,
    #[error("Invalid address {0}")]
    TcpAddress(String),
    #[error("bind({address}): {reason}")]
    TcpBind { address: String, reason: String },
    #[error("{path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("{path}: not a terminal, FIFO or regular file")]
    Unusable { path: String },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// A backend named by `lpc.comN.path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    Stdio,
    Tcp(String),
    Path(String),
}

impl BackendSpec {
    pub fn parse(value: &str) -> Self {
        if value == "stdio" {
            Self::Stdio
        } else if value.starts_with("tcp") {
            // bhyve treats any value starting with "tcp" as a TCP listener specification.
            Self::Tcp(value.to_string())
        } else {
            Self::Path(value.to_string())
        }
    }

    /// Refuse what cannot be opened at all, without opening anything.
    pub fn check_supported(&self) -> Result<(), BackendError> {
        match self {
            Self::Tcp(spec) => tcp_address(spec).map(|_| ()),
            _ => Ok(()),
        }
    }
}

/// The socket address of `tcp=ADDRESS:PORT` or `tcp=[IPV6]:PORT`; numeric only, as bhyve.
fn tcp_address(spec: &str) -> Result<std::net::SocketAddr, BackendError> {
    let rest = spec.strip_prefix("tcp=").ok_or(BackendError::TcpSyntax)?;
    let (host, port) = match rest.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6.split_once(']').ok_or(BackendError::TcpSyntax)?;
            (
                host,
                after.strip_prefix(':').ok_or(BackendError::TcpSyntax)?,
            )
        }
        None => rest.split_once(':').ok_or(BackendError::TcpSyntax)?,
    };
    if host.is_empty() || port.is_empty() {
        return Err(BackendError::TcpSyntax);
    }
    let invalid = || BackendError::TcpAddress(format!("{host}:{port}"));
    let ip: std::net::IpAddr = host.parse().map_err(|_| invalid())?;
    if rest.starts_with('[') != ip.is_ipv6() {
        return Err(invalid());
    }
    let port: u16 = port.parse().map_err(|_| invalid())?;
    Ok(std::net::SocketAddr::new(ip, port))
}

/// Saved settings of a terminal on stdin, restored at exit.
static STDIN_TERMIOS: Mutex<Option<Termios>> = Mutex::new(None);
static ATEXIT_HOOK: Once = Once::new();

/// Put the terminal on stdin back the way it was before a UART made it raw. Safe to call any
/// number of times, from any thread; does nothing when stdin was never made raw.
pub fn restore_terminal() {
    // try_lock: an exit hook must never wait on a lock another thread might hold forever.
    if let Ok(mut saved) = STDIN_TERMIOS.try_lock() {
        if let Some(original) = saved.take() {
            let _ = termios::tcsetattr(io::stdin().as_fd(), SetArg::TCSANOW, &original);
        }
    }
}

extern "C" fn restore_terminal_at_exit() {
    restore_terminal();
}

/// Raw mode as bhyve sets it: `cfmakeraw` plus `CLOCAL`. Returns the previous settings.
fn make_raw<Fd: AsFd>(fd: Fd) -> io::Result<Termios> {
    let original = termios::tcgetattr(&fd)?;
    let mut raw = original.clone();
    termios::cfmakeraw(&mut raw);
    raw.control_flags |= ControlFlags::CLOCAL;
    termios::tcsetattr(&fd, SetArg::TCSANOW, &raw)?;
    Ok(original)
}

fn make_stdin_raw() -> io::Result<()> {
    let original = make_raw(io::stdin().as_fd())?;
    let mut saved = STDIN_TERMIOS.lock().unwrap_or_else(|e| e.into_inner());
    // Keep the first saved settings: a second call would record raw mode as "original".
    if saved.is_none() {
        *saved = Some(original);
    }
    drop(saved);
    ATEXIT_HOOK.call_once(|| {
        // SAFETY: `restore_terminal_at_exit` is an `extern "C" fn()` that never unwinds (it only
        // takes a lock with try_lock and calls tcsetattr), which is all atexit requires.
        let rc = unsafe { libc::atexit(restore_terminal_at_exit) };
        if rc != 0 {
            log::warn!("cannot register the terminal restore hook; run `stty sane` after exit");
        }
    });
    Ok(())
}

/// Transmitted bytes written to a file descriptor, one write per byte.
struct FdOutput {
    file: File,
    failed: bool,
}

impl UartOutput for FdOutput {
    fn write_byte(&mut self, byte: u8) {
        loop {
            match self.file.write(&[byte]) {
                Ok(_) => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // A full non-blocking terminal or a vanished reader: drop the byte, as
                    // bhyve does, and say so once.
                    if !self.failed {
                        log::warn!("uart: output dropped: {e}");
                        self.failed = true;
                    }
                    return;
                }
            }
        }
    }
}

/// The connected TCP client, if any.
type TcpClient = Arc<Mutex<Option<TcpStream>>>;

/// Transmitted bytes sent to the TCP client; dropped while none is connected.
struct TcpOutput {
    client: TcpClient,
}

impl UartOutput for TcpOutput {
    fn write_byte(&mut self, byte: u8) {
        let mut client = self.client.lock().unwrap_or_else(|e| e.into_inner());
        let Some(stream) = client.as_mut() else {
            return;
        };
        loop {
            match stream.write(&[byte]) {
                Ok(_) => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // A client that does not read loses bytes, as with a terminal.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    *client = None;
                    return;
                }
            }
        }
    }
}

/// Where input comes from.
enum Input {
    File(File),
    Tcp(TcpListener, TcpClient),
}

/// What stays alive with an opened backend: the input thread and the terminal settings to
/// restore.
pub struct Backend {
    input: Option<Input>,
    output: Option<Box<dyn UartOutput>>,
    _restore: Option<TtyRestore>,
    stdio: bool,
    thread: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

/// Restores a terminal's settings when dropped.
struct TtyRestore {
    file: File,
    original: Termios,
}

impl Drop for TtyRestore {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(&self.file, SetArg::TCSANOW, &self.original);
    }
}

fn dup(fd: impl AsFd) -> io::Result<File> {
    let owned: OwnedFd = fd.as_fd().try_clone_to_owned()?;
    Ok(File::from(owned))
}

impl Backend {
    /// Open the backend `spec` names. `stdio` uses duplicates of descriptors 0 and 1.
    pub fn open(spec: &BackendSpec) -> Result<Self, BackendError> {
        match spec {
            BackendSpec::Tcp(s) => {
                let address = tcp_address(s)?;
                let listener = TcpListener::bind(address).map_err(|e| BackendError::TcpBind {
                    address: address.to_string(),
                    reason: crate::vmm::describe_io_error(&e),
                })?;
                listener.set_nonblocking(true)?;
                let client: TcpClient = Arc::new(Mutex::new(None));
                Ok(Self {
                    input: Some(Input::Tcp(listener, client.clone())),
                    output: Some(Box::new(TcpOutput { client })),
                    _restore: None,
                    stdio: false,
                    thread: None,
                    stop: Arc::new(AtomicBool::new(false)),
                })
            }
            BackendSpec::Stdio => {
                let input = dup(io::stdin())?;
                let output = dup(io::stdout())?;
                if nix::unistd::isatty(io::stdin()).unwrap_or(false) {
                    make_stdin_raw()?;
                }
                Ok(Self::new(Some(input), output, None, true))
            }
            BackendSpec::Path(path) => {
                let open_err = |source| BackendError::Open {
                    path: path.clone(),
                    source,
                };
                let kind = std::fs::metadata(path).map_err(open_err)?.file_type();
                if kind.is_file() {
                    // A log file: output appended, nothing to read.
                    let file = OpenOptions::new()
                        .append(true)
                        .open(path)
                        .map_err(open_err)?;
                    return Ok(Self::new(None, file, None, false));
                }
                if !(kind.is_char_device() || kind.is_fifo()) {
                    return Err(BackendError::Unusable { path: path.clone() });
                }
                // Non-blocking, as bhyve opens it: a console nobody reads must not stall a vCPU.
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
                    .open(path)
                    .map_err(open_err)?;
                let mut restore = None;
                if nix::unistd::isatty(&file).unwrap_or(false) {
                    let original = make_raw(&file)?;
                    restore = Some(TtyRestore {
                        file: file.try_clone()?,
                        original,
                    });
                }
                let input = file.try_clone()?;
                Ok(Self::new(Some(input), file, restore, false))
            }
        }
    }

    fn new(input: Option<File>, output: File, restore: Option<TtyRestore>, stdio: bool) -> Self {
        Self {
            input: input.map(Input::File),
            output: Some(Box::new(FdOutput {
                file: output,
                failed: false,
            })),
            _restore: restore,
            stdio,
            thread: None,
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Build a backend from already-open descriptors (a pipe or socket pair in tests, for
    /// instance). `input` may be `None` for output only.
    pub fn from_files(input: Option<File>, output: File) -> Self {
        Self::new(input, output, None, false)
    }

    /// The sink for transmitted bytes; hand it to [`super::Uart::new`]. Returns it once.
    pub fn take_output(&mut self) -> Option<Box<dyn UartOutput>> {
        self.output.take()
    }

    /// Start the thread that feeds input into `uart`. Does nothing for an output-only backend.
    pub fn start_input(&mut self, name: &str, uart: SharedUart) -> io::Result<()> {
        let Some(input) = self.input.take() else {
            return Ok(());
        };
        let stop = self.stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("{name} input"))
            .spawn(move || match input {
                Input::File(file) => input_loop(file, uart, stop),
                Input::Tcp(listener, client) => tcp_loop(listener, client, uart, stop),
            })?;
        self.thread = Some(thread);
        Ok(())
    }
}

impl Backend {
    /// Ask the input thread to stop without waiting for it; dropping the backend waits.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if self.stdio {
            restore_terminal();
        }
        // `restore` (a terminal path) is restored by its own Drop.
    }
}

/// Wait until `file` is readable or it is time to check `stop`; true when readable.
fn wait_readable(file: &impl AsFd) -> io::Result<bool> {
    let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
    let timeout = PollTimeout::try_from(STOP_POLL).unwrap_or(PollTimeout::ZERO);
    match poll(&mut fds, timeout) {
        Ok(0) => Ok(false),
        Ok(_) => Ok(true),
        Err(nix::errno::Errno::EINTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Push `bytes` into the receive FIFO, waiting for room; false when told to stop first.
fn deliver(mut pending: &[u8], uart: &SharedUart, rx_space: &Condvar, stop: &AtomicBool) -> bool {
    let mut device = uart.lock().unwrap_or_else(|e| e.into_inner());
    while !pending.is_empty() {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        if device.uart.accepts_input() {
            let taken = device.uart.receive(pending);
            pending = &pending[taken..];
        } else {
            // FIFO full or input paused: keep the bytes until there is room again.
            device = rx_space
                .wait_timeout(device, STOP_POLL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
    true
}

/// Accept one client at a time and feed what it sends into `uart`.
fn tcp_loop(listener: TcpListener, client: TcpClient, uart: SharedUart, stop: Arc<AtomicBool>) {
    const ALREADY_CONNECTED: &[u8] = b"Socket already connected\n";
    let rx_space = uart
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .uart
        .rx_space();
    let mut reader: Option<TcpStream> = None;
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::SeqCst) {
        let mut fds = vec![PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        if let Some(stream) = &reader {
            fds.push(PollFd::new(stream.as_fd(), PollFlags::POLLIN));
        }
        let timeout = PollTimeout::try_from(STOP_POLL).unwrap_or(PollTimeout::ZERO);
        match poll(&mut fds, timeout) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => {
                log::warn!("uart: tcp listener stopped: {e}");
                return;
            }
        }
        let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
        let (new_client, readable) = (ready(&fds[0]), fds.get(1).is_some_and(ready));
        drop(fds);
        // A departing client is noticed before a newcomer is looked at, so a client that
        // reconnects at once is not turned away by its own previous connection.
        if let (true, Some(stream)) = (readable, reader.as_mut()) {
            match stream.read(&mut buf) {
                Ok(0) => {
                    reader = None;
                    *client.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
                Ok(n) => {
                    if !deliver(&buf[..n], &uart, &rx_space, &stop) {
                        return;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => {
                    reader = None;
                    *client.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
            }
        }
        if new_client {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    let mut current = client.lock().unwrap_or_else(|e| e.into_inner());
                    if current.is_some() {
                        let _ = stream.write_all(ALREADY_CONNECTED);
                    } else if stream.set_nonblocking(true).is_ok() {
                        reader = stream.try_clone().ok();
                        if reader.is_some() {
                            *current = Some(stream);
                        }
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    // Out of descriptors or similar: the listener stays readable, so back off
                    // instead of spinning.
                    log::warn!("uart: tcp accept: {e}");
                    std::thread::sleep(STOP_POLL);
                }
            }
        }
    }
}

fn input_loop(mut input: File, uart: SharedUart, stop: Arc<AtomicBool>) {
    let rx_space = uart
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .uart
        .rx_space();
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::SeqCst) {
        match wait_readable(&input) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                log::warn!("uart: input stopped: {e}");
                return;
            }
        }
        let n = match input.read(&mut buf) {
            // End of input (a pipe or file on stdin): no more bytes will come.
            Ok(0) => return,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                log::warn!("uart: input stopped: {e}");
                return;
            }
        };
        if !deliver(&buf[..n], &uart, &rx_space, &stop) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::uart::tests::Line;
    use crate::devices::uart::{LegacyUart, Uart, FCR_ENABLE, REG_DATA, REG_IIR, REG_LSR};
    use crate::devices::uart::{IER_ERXRDY, LSR_RXRDY};
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn tcp_addresses_are_parsed_as_bhyve_does() {
        let check = |s: &str| {
            BackendSpec::parse(s)
                .check_supported()
                .map_err(|e| e.to_string())
        };
        assert_eq!(check("tcp=127.0.0.1:4000"), Ok(()));
        assert_eq!(check("tcp=[::1]:4000"), Ok(()));
        assert_eq!(
            check("tcp=127.0.0.1"),
            Err("Invalid number of parameter".into())
        );
        assert_eq!(check("tcp:1"), Err("Invalid number of parameter".into()));
        assert_eq!(
            check("tcp=localhost:4000"),
            Err("Invalid address localhost:4000".into())
        );
        assert_eq!(
            check("tcp=::1:4000"),
            Err("Invalid number of parameter".into())
        );
        assert_eq!(
            check("tcp=127.0.0.1:99999"),
            Err("Invalid address 127.0.0.1:99999".into())
        );
        assert_eq!(BackendSpec::parse("stdio"), BackendSpec::Stdio);
        assert_eq!(
            BackendSpec::parse("/dev/nmdm0A"),
            BackendSpec::Path("/dev/nmdm0A".into())
        );
    }

    #[test]
    fn a_tcp_console_serves_one_client_at_a_time() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut backend =
            Backend::open(&BackendSpec::parse(&format!("tcp=127.0.0.1:{port}"))).unwrap();
        let line = Line::default();
        let uart = Uart::new(backend.take_output(), Box::new(line.clone()));
        let shared: SharedUart = Arc::new(Mutex::new(LegacyUart { uart }));
        backend.start_input("com1", shared.clone()).unwrap();
        // Nobody connected: output goes nowhere, and nothing blocks.
        shared.lock().unwrap().uart.write(REG_DATA, b'x');

        let mut first = TcpStream::connect(("127.0.0.1", port)).unwrap();
        first
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // The client is taken on by the input thread; output reaches it from then on.
        assert!(wait_for(|| {
            shared.lock().unwrap().uart.write(REG_DATA, b'!');
            let mut got = [0u8; 1];
            first.set_nonblocking(true).unwrap();
            let ok = matches!(first.read(&mut got), Ok(1) if got == *b"!");
            first.set_nonblocking(false).unwrap();
            ok
        }));
        first.write_all(b"hi").unwrap();
        let mut received = Vec::new();
        assert!(wait_for(|| {
            let mut dev = shared.lock().unwrap();
            while dev.uart.read(REG_LSR) & LSR_RXRDY != 0 {
                received.push(dev.uart.read(REG_DATA));
            }
            received.ends_with(b"hi")
        }));

        let mut second = TcpStream::connect(("127.0.0.1", port)).unwrap();
        second
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut refusal = String::new();
        second.read_to_string(&mut refusal).unwrap();
        assert_eq!(refusal, "Socket already connected\n");

        drop(first);
        let mut third = TcpStream::connect(("127.0.0.1", port)).unwrap();
        assert!(wait_for(|| {
            shared.lock().unwrap().uart.write(REG_DATA, b'3');
            let mut got = [0u8; 1];
            third.set_nonblocking(true).unwrap();
            matches!(third.read(&mut got), Ok(1) if got == *b"3")
        }));
        drop(backend);
    }

    #[test]
    fn a_socket_pair_carries_bytes_both_ways_and_input_beyond_the_fifo_waits() {
        let (host, guest_side) = UnixStream::pair().unwrap();
        let input = File::from(OwnedFd::from(guest_side.try_clone().unwrap()));
        let output = File::from(OwnedFd::from(guest_side));
        let mut backend = Backend::from_files(Some(input), output);
        let line = Line::default();
        let uart = Uart::new(backend.take_output(), Box::new(line.clone()));
        let shared: SharedUart = Arc::new(Mutex::new(LegacyUart { uart }));
        backend.start_input("com1", shared.clone()).unwrap();

        shared.lock().unwrap().uart.write(REG_DATA, b'!');
        let mut host_reader = host.try_clone().unwrap();
        let mut got = [0u8; 1];
        host_reader.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"!");

        {
            let mut dev = shared.lock().unwrap();
            dev.uart.write(REG_IIR, FCR_ENABLE);
            dev.uart.write(1, IER_ERXRDY);
        }
        let sent: Vec<u8> = (0..40u8).map(|i| b'a' + (i % 26)).collect();
        (&host).write_all(&sent).unwrap();
        let mut received = Vec::new();
        assert!(wait_for(|| {
            let mut dev = shared.lock().unwrap();
            while dev.uart.read(REG_LSR) & LSR_RXRDY != 0 {
                received.push(dev.uart.read(REG_DATA));
            }
            received.len() == sent.len()
        }));
        assert_eq!(received, sent, "no byte dropped when the FIFO filled up");
        assert!(line.asserts.load(Ordering::SeqCst) > 0);
        drop(backend);
    }

    #[test]
    fn paused_input_is_held_back_and_delivered_after_resume() {
        let (host, guest_side) = UnixStream::pair().unwrap();
        let input = File::from(OwnedFd::from(guest_side.try_clone().unwrap()));
        let mut backend = Backend::from_files(Some(input), File::from(OwnedFd::from(guest_side)));
        let line = Line::default();
        let uart = Uart::new(backend.take_output(), Box::new(line.clone()));
        let shared: SharedUart = Arc::new(Mutex::new(LegacyUart { uart }));
        {
            let mut dev = shared.lock().unwrap();
            dev.uart.write(REG_IIR, FCR_ENABLE);
            dev.uart.write(1, IER_ERXRDY);
            dev.uart.pause_input();
        }
        backend.start_input("com1", shared.clone()).unwrap();
        (&host).write_all(b"held").unwrap();
        // Give the input thread time to read the bytes; they must not reach the FIFO.
        std::thread::sleep(STOP_POLL * 3);
        assert_eq!(shared.lock().unwrap().uart.read(REG_LSR) & LSR_RXRDY, 0);
        assert_eq!(line.asserts.load(Ordering::SeqCst), 0);

        shared.lock().unwrap().uart.resume_input();
        let mut received = Vec::new();
        assert!(wait_for(|| {
            let mut dev = shared.lock().unwrap();
            while dev.uart.read(REG_LSR) & LSR_RXRDY != 0 {
                received.push(dev.uart.read(REG_DATA));
            }
            received.len() == 4
        }));
        assert_eq!(received, b"held");
        drop(backend);
    }

    #[test]
    fn input_ends_cleanly_at_end_of_a_pipe() {
        let (reader, writer) = nix::unistd::pipe().unwrap();
        let mut writer = File::from(writer);
        writer.write_all(b"ok").unwrap();
        drop(writer);
        let (_host, sink) = UnixStream::pair().unwrap();
        let mut backend =
            Backend::from_files(Some(File::from(reader)), File::from(OwnedFd::from(sink)));
        let uart = Uart::new(backend.take_output(), Box::new(Line::default()));
        let shared: SharedUart = Arc::new(Mutex::new(LegacyUart { uart }));
        shared.lock().unwrap().uart.write(REG_IIR, FCR_ENABLE);
        backend.start_input("com2", shared.clone()).unwrap();
        assert!(wait_for(|| backend
            .thread
            .as_ref()
            .is_some_and(|t| t.is_finished())));
        let mut dev = shared.lock().unwrap();
        assert_eq!(dev.uart.read(REG_DATA), b'o');
        assert_eq!(dev.uart.read(REG_DATA), b'k');
        assert_eq!(dev.uart.read(REG_LSR) & LSR_RXRDY, 0);
    }

    #[test]
    fn a_regular_file_gets_output_appended_and_gives_no_input() {
        let dir = std::env::temp_dir().join(format!("bhyve-uart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        std::fs::write(&path, b"old\n").unwrap();
        let mut backend = Backend::open(&BackendSpec::Path(path.to_str().unwrap().into())).unwrap();
        assert!(backend.input.is_none());
        let mut out = backend.take_output().unwrap();
        for b in b"new\n" {
            out.write_byte(*b);
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"old\nnew\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_path_names_the_path_in_its_error() {
        let err = Backend::open(&BackendSpec::Path("/nonexistent/tty".into()))
            .err()
            .unwrap()
            .to_string();
        assert!(err.starts_with("/nonexistent/tty: "), "{err}");
    }

    #[test]
    fn a_terminal_path_is_made_raw_and_restored_when_dropped() {
        use nix::sys::termios::LocalFlags;
        let pty = nix::pty::openpty(None, None).unwrap();
        let path = nix::unistd::ttyname(&pty.slave).unwrap();
        let canonical = |fd: &OwnedFd| {
            termios::tcgetattr(fd)
                .unwrap()
                .local_flags
                .contains(LocalFlags::ICANON)
        };
        assert!(canonical(&pty.slave));
        let mut backend = Backend::open(&BackendSpec::Path(path.to_str().unwrap().into())).unwrap();
        assert!(!canonical(&pty.slave), "the guest console needs raw mode");

        let uart = Uart::new(backend.take_output(), Box::new(Line::default()));
        let shared: SharedUart = Arc::new(Mutex::new(LegacyUart { uart }));
        backend.start_input("com1", shared.clone()).unwrap();
        let mut master = File::from(pty.master);
        master.write_all(b"x").unwrap();
        assert!(wait_for(|| shared.lock().unwrap().uart.read(REG_LSR)
            & LSR_RXRDY
            != 0));
        assert_eq!(shared.lock().unwrap().uart.read(REG_DATA), b'x');
        shared.lock().unwrap().uart.write(REG_DATA, b'y');
        let mut got = [0u8; 1];
        master.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"y");

        drop(backend);
        assert!(canonical(&pty.slave), "terminal settings restored");
    }

    const EXIT_CHILD: &str = "BHYVE_RS_UART_EXIT_CHILD";

    /// Child side of the test below: make stdin raw through the stdio backend, then leave with
    /// `process::exit`, which runs no destructors. Does nothing unless started by that test.
    #[test]
    fn stdio_exit_child() {
        if std::env::var_os(EXIT_CHILD).is_none() {
            return;
        }
        let backend = Backend::open(&BackendSpec::Stdio).unwrap();
        std::mem::forget(backend);
        std::process::exit(0);
    }

    #[test]
    fn process_exit_restores_a_raw_stdin_terminal() {
        use nix::sys::termios::LocalFlags;
        use std::process::{Command, Stdio};
        let pty = nix::pty::openpty(None, None).unwrap();
        let canonical = || {
            termios::tcgetattr(&pty.slave)
                .unwrap()
                .local_flags
                .contains(LocalFlags::ICANON)
        };
        assert!(canonical());
        let stdin = Stdio::from(pty.slave.try_clone().unwrap());
        let status = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "devices::uart::backend::tests::stdio_exit_child"])
            .env(EXIT_CHILD, "1")
            .stdin(stdin)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        assert!(canonical(), "the atexit hook put the terminal back");
    }
}
