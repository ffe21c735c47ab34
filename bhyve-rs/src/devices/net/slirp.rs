//! The slirp backend: user-mode networking through libslirp, as FreeBSD's
//! net_backend_slirp.c, so a guest has a network without privileges, taps or bridges.
//!
//! libslirp is loaded when a VM first asks for it (dlopen of `libslirp.so.0`), so this program
//! neither links against it nor needs it installed unless slirp is used. The network is the
//! one bhyve hard-codes: 10.0.2.0/24, the host (gateway) at 10.0.2.2, DHCP handing out
//! 10.0.2.15 on, and "restricted" mode: the guest reaches only the gateway and what `hostfwd`
//! rules forward to it from the host, unless `open` (FreeBSD 15's slirp-helper) lets its
//! connections out through the host's sockets.
//!
//! Frames from the guest go into libslirp with `slirp_input` under a lock; frames libslirp
//! sends to the guest arrive in a datagram socket pair, whose reading end is the backend's
//! ready descriptor. A thread polls libslirp's own sockets and runs its timers.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use super::{HostForward, NetBackend, NetError};

/// The MTU bhyve configures libslirp with (`SLIRP_MTU`).
const SLIRP_MTU: usize = 2048;

const SLIRP_POLL_IN: c_int = 1 << 0;
const SLIRP_POLL_OUT: c_int = 1 << 1;
const SLIRP_POLL_PRI: c_int = 1 << 2;
const SLIRP_POLL_ERR: c_int = 1 << 3;
const SLIRP_POLL_HUP: c_int = 1 << 4;
const SLIRP_HOSTFWD_UDP: c_int = 1;

/// libslirp.h `SlirpConfig`, version 4 (libslirp 4.1 and later read exactly these fields).
#[repr(C)]
struct SlirpConfig {
    version: u32,
    restricted: c_int,
    in_enabled: bool,
    vnetwork: libc::in_addr,
    vnetmask: libc::in_addr,
    vhost: libc::in_addr,
    in6_enabled: bool,
    vprefix_addr6: libc::in6_addr,
    vprefix_len: u8,
    vhost6: libc::in6_addr,
    vhostname: *const c_char,
    tftp_server_name: *const c_char,
    tftp_path: *const c_char,
    bootfile: *const c_char,
    vdhcp_start: libc::in_addr,
    vnameserver: libc::in_addr,
    vnameserver6: libc::in6_addr,
    vdnssearch: *const *const c_char,
    vdomainname: *const c_char,
    if_mtu: usize,
    if_mru: usize,
    disable_host_loopback: bool,
    enable_emu: bool,
    outbound_addr: *const libc::sockaddr_in,
    outbound_addr6: *const libc::sockaddr_in6,
    disable_dns: bool,
    disable_dhcp: bool,
}

type TimerCallback = extern "C" fn(*mut c_void);

/// libslirp.h `SlirpCb`. Timers are used only with IPv6, which stays off (as in bhyve).
#[repr(C)]
struct SlirpCallbacks {
    send_packet: extern "C" fn(*const c_void, usize, *mut c_void) -> isize,
    guest_error: extern "C" fn(*const c_char, *mut c_void),
    clock_get_ns: extern "C" fn(*mut c_void) -> i64,
    timer_new: Option<extern "C" fn(TimerCallback, *mut c_void, *mut c_void) -> *mut c_void>,
    timer_free: Option<extern "C" fn(*mut c_void, *mut c_void)>,
    timer_mod: Option<extern "C" fn(*mut c_void, i64, *mut c_void)>,
    register_poll_fd: extern "C" fn(c_int, *mut c_void),
    unregister_poll_fd: extern "C" fn(c_int, *mut c_void),
    notify: extern "C" fn(*mut c_void),
    init_completed: Option<extern "C" fn(*mut c_void, *mut c_void)>,
    timer_new_opaque: Option<extern "C" fn(c_int, *mut c_void, *mut c_void) -> *mut c_void>,
}

type AddPoll = extern "C" fn(c_int, c_int, *mut c_void) -> c_int;
type GetRevents = extern "C" fn(c_int, *mut c_void) -> c_int;

type SlirpNew =
    unsafe extern "C" fn(*const SlirpConfig, *const SlirpCallbacks, *mut c_void) -> *mut c_void;
type SlirpCleanup = unsafe extern "C" fn(*mut c_void);
type SlirpInput = unsafe extern "C" fn(*mut c_void, *const u8, c_int);
type SlirpPollfdsFill = unsafe extern "C" fn(*mut c_void, *mut u32, AddPoll, *mut c_void);
type SlirpPollfdsPoll = unsafe extern "C" fn(*mut c_void, c_int, GetRevents, *mut c_void);
type SlirpAddHostxfwd = unsafe extern "C" fn(
    *mut c_void,
    *const libc::sockaddr,
    libc::socklen_t,
    *const libc::sockaddr,
    libc::socklen_t,
    c_int,
) -> c_int;

/// The libslirp functions used, resolved once.
struct Library {
    new: SlirpNew,
    cleanup: SlirpCleanup,
    input: SlirpInput,
    pollfds_fill: SlirpPollfdsFill,
    pollfds_poll: SlirpPollfdsPoll,
    add_hostxfwd: SlirpAddHostxfwd,
}

/// The library's file name, as bhyve loads it.
pub const LIBRARY: &str = "libslirp.so.0";

fn dl_error() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string valid until the next dl call.
    let message = unsafe { libc::dlerror() };
    if message.is_null() {
        "unknown error".to_string()
    } else {
        // SAFETY: checked non-null above; the string is NUL-terminated.
        unsafe { CStr::from_ptr(message) }
            .to_string_lossy()
            .into_owned()
    }
}

fn load() -> Result<Library, String> {
    let name = c"libslirp.so.0";
    // SAFETY: dlopen with a NUL-terminated name; the handle is never closed, so the resolved
    // functions stay valid for the life of the process.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        return Err(format!(
            "cannot load {LIBRARY} ({}); install libslirp to use the slirp backend",
            dl_error()
        ));
    }
    let symbol = |name: &CStr| -> Result<*mut c_void, String> {
        // SAFETY: `handle` is a live handle from dlopen; `name` is NUL-terminated.
        let address = unsafe { libc::dlsym(handle, name.as_ptr()) };
        if address.is_null() {
            Err(format!(
                "{LIBRARY} has no {} (libslirp 4.5 or later is needed)",
                name.to_string_lossy()
            ))
        } else {
            Ok(address)
        }
    };
    // SAFETY: each symbol is the libslirp function of that name, whose C prototype in
    // libslirp.h the field's type reproduces.
    unsafe {
        Ok(Library {
            new: std::mem::transmute::<*mut c_void, SlirpNew>(symbol(c"slirp_new")?),
            cleanup: std::mem::transmute::<*mut c_void, SlirpCleanup>(symbol(c"slirp_cleanup")?),
            input: std::mem::transmute::<*mut c_void, SlirpInput>(symbol(c"slirp_input")?),
            pollfds_fill: std::mem::transmute::<*mut c_void, SlirpPollfdsFill>(symbol(
                c"slirp_pollfds_fill",
            )?),
            pollfds_poll: std::mem::transmute::<*mut c_void, SlirpPollfdsPoll>(symbol(
                c"slirp_pollfds_poll",
            )?),
            add_hostxfwd: std::mem::transmute::<*mut c_void, SlirpAddHostxfwd>(symbol(
                c"slirp_add_hostxfwd",
            )?),
        })
    }
}

fn library() -> Result<&'static Library, NetError> {
    static LIBRARY: OnceLock<Result<Library, String>> = OnceLock::new();
    LIBRARY
        .get_or_init(load)
        .as_ref()
        .map_err(|e| NetError::Slirp(e.clone()))
}

/// Whether libslirp can be loaded here (tests skip slirp cases without it).
pub fn available() -> bool {
    library().is_ok()
}

/// What libslirp's callbacks reach through their `opaque` pointer. Boxed, so its address is
/// stable for the instance's life.
struct CallbackState {
    /// Writing end of the socket pair towards the guest; non-blocking, so a guest that does
    /// not take its frames loses them rather than stalling the network.
    to_guest: UnixDatagram,
}

extern "C" fn send_packet(buffer: *const c_void, length: usize, opaque: *mut c_void) -> isize {
    // SAFETY: `opaque` is the CallbackState this instance was created with, alive until
    // slirp_cleanup; libslirp passes a buffer of `length` readable bytes.
    let (state, frame) = unsafe {
        (
            &*(opaque as *const CallbackState),
            std::slice::from_raw_parts(buffer as *const u8, length),
        )
    };
    match state.to_guest.send(frame) {
        Ok(n) => n as isize,
        // Full: dropped, as a wire would. Still "sent" for libslirp's accounting.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => length as isize,
        Err(e) => {
            log::warn!("slirp: frame to the guest lost: {e}");
            -1
        }
    }
}

extern "C" fn guest_error(message: *const c_char, _opaque: *mut c_void) {
    if !message.is_null() {
        // SAFETY: libslirp passes a NUL-terminated message.
        let message = unsafe { CStr::from_ptr(message) };
        log::warn!("slirp: guest error: {}", message.to_string_lossy());
    }
}

extern "C" fn clock_get_ns(_opaque: *mut c_void) -> i64 {
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    let elapsed = START.get_or_init(std::time::Instant::now).elapsed();
    i64::try_from(elapsed.as_nanos()).unwrap_or(i64::MAX)
}

extern "C" fn ignore_fd(_fd: c_int, _opaque: *mut c_void) {}

extern "C" fn notify(_opaque: *mut c_void) {}

static CALLBACKS: SlirpCallbacks = SlirpCallbacks {
    send_packet,
    guest_error,
    clock_get_ns,
    timer_new: None,
    timer_free: None,
    timer_mod: None,
    register_poll_fd: ignore_fd,
    unregister_poll_fd: ignore_fd,
    notify,
    init_completed: None,
    timer_new_opaque: None,
};

/// libslirp's poll event bits and poll(2)'s.
const EVENTS: [(c_int, libc::c_short); 5] = [
    (SLIRP_POLL_IN, libc::POLLIN),
    (SLIRP_POLL_OUT, libc::POLLOUT),
    (SLIRP_POLL_PRI, libc::POLLPRI),
    (SLIRP_POLL_ERR, libc::POLLERR),
    (SLIRP_POLL_HUP, libc::POLLHUP),
];

fn to_poll_events(slirp: c_int) -> libc::c_short {
    EVENTS
        .iter()
        .filter(|(s, _)| slirp & s != 0)
        .fold(0, |events, (_, p)| events | p)
}

fn to_slirp_events(poll: libc::c_short) -> c_int {
    EVENTS
        .iter()
        .filter(|(_, p)| poll & p != 0)
        .fold(0, |events, (s, _)| events | s)
}

extern "C" fn add_poll(fd: c_int, events: c_int, opaque: *mut c_void) -> c_int {
    // SAFETY: `opaque` is the poll thread's Vec<pollfd>, exclusively borrowed for the
    // duration of slirp_pollfds_fill.
    let fds = unsafe { &mut *(opaque as *mut Vec<libc::pollfd>) };
    fds.push(libc::pollfd {
        fd,
        events: to_poll_events(events),
        revents: 0,
    });
    (fds.len() - 1) as c_int
}

extern "C" fn get_revents(index: c_int, opaque: *mut c_void) -> c_int {
    // SAFETY: `opaque` is the poll thread's Vec<pollfd>, borrowed for slirp_pollfds_poll.
    let fds = unsafe { &*(opaque as *const Vec<libc::pollfd>) };
    usize::try_from(index)
        .ok()
        .and_then(|i| fds.get(i))
        .map_or(0, |fd| to_slirp_events(fd.revents))
}

/// One libslirp instance; every call into it goes through the mutex around this.
struct Instance {
    library: &'static Library,
    slirp: *mut c_void,
    /// Kept alive (and at a fixed address) as long as `slirp`.
    _callbacks: Box<CallbackState>,
}

// SAFETY: libslirp instances are not tied to a thread; every use is serialised by the Mutex
// that owns the Instance.
unsafe impl Send for Instance {}

impl Drop for Instance {
    fn drop(&mut self) {
        // SAFETY: `slirp` came from slirp_new and is cleaned up exactly once, after the poll
        // thread has stopped using it (it holds an Arc of the mutex until it exits).
        unsafe { (self.library.cleanup)(self.slirp) };
    }
}

struct Shared {
    instance: Mutex<Instance>,
    stop: AtomicBool,
}

pub struct Slirp {
    shared: Arc<Shared>,
    /// Reading end of the frames libslirp sends to the guest.
    from_slirp: UnixDatagram,
    /// Wakes the poll thread: to stop, or to poll sockets a guest frame may have created.
    wake: UnixDatagram,
    thread: Option<JoinHandle<()>>,
}

fn sockaddr_in(address: std::net::SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain data for which all-zero bytes are a valid value.
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sin.sin_family = libc::AF_INET as libc::sa_family_t;
    sin.sin_port = address.port().to_be();
    sin.sin_addr.s_addr = u32::from(*address.ip()).to_be();
    #[cfg(target_os = "freebsd")]
    {
        sin.sin_len = std::mem::size_of::<libc::sockaddr_in>() as u8;
    }
    sin
}

impl Slirp {
    /// A slirp network forwarding `hostfwd` into the guest; `open` lets the guest's own
    /// connections out (libslirp's unrestricted mode).
    pub fn open(hostfwd: &[HostForward], open: bool) -> Result<Self, NetError> {
        let library = library()?;
        let io_error = |what: &str, e: io::Error| NetError::Slirp(format!("{what}: {e}"));
        let (from_slirp, to_guest) =
            UnixDatagram::pair().map_err(|e| io_error("socket pair", e))?;
        to_guest
            .set_nonblocking(true)
            .map_err(|e| io_error("socket pair", e))?;
        from_slirp
            .set_nonblocking(true)
            .map_err(|e| io_error("socket pair", e))?;
        set_send_buffer(&to_guest, 1 << 20);
        let (wake, wake_poller) = UnixDatagram::pair().map_err(|e| io_error("socket pair", e))?;
        wake.set_nonblocking(true)
            .map_err(|e| io_error("socket pair", e))?;
        wake_poller
            .set_nonblocking(true)
            .map_err(|e| io_error("socket pair", e))?;

        let address = |a: [u8; 4]| libc::in_addr {
            s_addr: u32::from_be_bytes(a).to_be(),
        };
        // SAFETY: in6_addr is plain data; all-zero is "::".
        let unspecified6: libc::in6_addr = unsafe { std::mem::zeroed() };
        let config = SlirpConfig {
            version: 4,
            restricted: c_int::from(!open),
            in_enabled: true,
            vnetwork: address([10, 0, 2, 0]),
            vnetmask: address([255, 255, 255, 0]),
            vhost: address([10, 0, 2, 2]),
            in6_enabled: false,
            vprefix_addr6: unspecified6,
            vprefix_len: 0,
            vhost6: unspecified6,
            vhostname: std::ptr::null(),
            tftp_server_name: std::ptr::null(),
            tftp_path: std::ptr::null(),
            bootfile: std::ptr::null(),
            vdhcp_start: address([10, 0, 2, 15]),
            vnameserver: address([0, 0, 0, 0]),
            vnameserver6: unspecified6,
            vdnssearch: std::ptr::null(),
            vdomainname: std::ptr::null(),
            if_mtu: SLIRP_MTU,
            if_mru: 0,
            disable_host_loopback: false,
            enable_emu: false,
            outbound_addr: std::ptr::null(),
            outbound_addr6: std::ptr::null(),
            disable_dns: false,
            disable_dhcp: false,
        };
        let callbacks = Box::new(CallbackState { to_guest });
        // SAFETY: `config` and CALLBACKS match libslirp.h; libslirp copies the configuration
        // and keeps the callback table (static) and the opaque pointer (boxed, owned by the
        // Instance that owns the result) for the instance's life.
        let slirp = unsafe {
            (library.new)(
                &config,
                &CALLBACKS,
                &*callbacks as *const CallbackState as *mut c_void,
            )
        };
        if slirp.is_null() {
            return Err(NetError::Slirp("cannot create a slirp instance".into()));
        }
        let instance = Instance {
            library,
            slirp,
            _callbacks: callbacks,
        };
        for rule in hostfwd {
            let host = sockaddr_in(rule.host);
            let guest = sockaddr_in(rule.guest);
            let length = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            // SAFETY: both addresses are sockaddr_in of `length` bytes; libslirp copies them.
            let rc = unsafe {
                (library.add_hostxfwd)(
                    instance.slirp,
                    &host as *const libc::sockaddr_in as *const libc::sockaddr,
                    length,
                    &guest as *const libc::sockaddr_in as *const libc::sockaddr,
                    length,
                    if rule.udp { SLIRP_HOSTFWD_UDP } else { 0 },
                )
            };
            if rc != 0 {
                return Err(NetError::Slirp(format!(
                    "cannot forward {} {} to the guest's {}: {}",
                    if rule.udp { "udp" } else { "tcp" },
                    rule.host,
                    rule.guest,
                    io::Error::last_os_error()
                )));
            }
        }

        let shared = Arc::new(Shared {
            instance: Mutex::new(instance),
            stop: AtomicBool::new(false),
        });
        let poller = shared.clone();
        let thread = std::thread::Builder::new()
            .name("slirp poll".into())
            .spawn(move || poll_loop(&poller, &wake_poller))
            .map_err(|e| io_error("cannot start the poll thread", e))?;
        Ok(Slirp {
            shared,
            from_slirp,
            wake,
            thread: Some(thread),
        })
    }
}

fn set_send_buffer(socket: &UnixDatagram, bytes: c_int) {
    // SAFETY: SO_SNDBUF takes one int; a failure only leaves the default size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            &bytes as *const c_int as *const c_void,
            std::mem::size_of::<c_int>() as libc::socklen_t,
        );
    }
}

/// Poll libslirp's sockets (and the wake socket, always first) and let libslirp handle what
/// they report and its timeouts, until told to stop.
fn poll_loop(shared: &Shared, wake: &UnixDatagram) {
    let wake_fd: RawFd = wake.as_raw_fd();
    let mut fds: Vec<libc::pollfd> = Vec::new();
    loop {
        fds.clear();
        fds.push(libc::pollfd {
            fd: wake_fd,
            events: libc::POLLIN,
            revents: 0,
        });
        let mut timeout = u32::MAX;
        {
            let Ok(instance) = shared.instance.lock() else {
                return;
            };
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            // SAFETY: the instance is live and locked; `fds` outlives the call.
            unsafe {
                (instance.library.pollfds_fill)(
                    instance.slirp,
                    &mut timeout,
                    add_poll,
                    &mut fds as *mut Vec<libc::pollfd> as *mut c_void,
                )
            };
        }
        let timeout = c_int::try_from(timeout).unwrap_or(-1);
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        let error = rc < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted;
        if fds[0].revents != 0 {
            let mut drain = [0u8; 64];
            while wake.recv(&mut drain).is_ok() {}
        }
        let Ok(instance) = shared.instance.lock() else {
            return;
        };
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        if rc < 0 && !error {
            continue;
        }
        // SAFETY: the instance is live and locked; `fds` holds the revents for the indices
        // add_poll returned during the fill above.
        unsafe {
            (instance.library.pollfds_poll)(
                instance.slirp,
                c_int::from(error),
                get_revents,
                &mut fds as *mut Vec<libc::pollfd> as *mut c_void,
            )
        };
    }
}

impl NetBackend for Slirp {
    fn name(&self) -> &str {
        "slirp"
    }

    fn send(&mut self, frame: &[IoSlice<'_>]) -> io::Result<usize> {
        let bytes: Vec<u8> = frame.iter().flat_map(|s| s.iter().copied()).collect();
        let length = c_int::try_from(bytes.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too long"))?;
        {
            let instance = self
                .shared
                .instance
                .lock()
                .map_err(|_| io::Error::other("slirp poll thread panicked"))?;
            // SAFETY: the instance is live and locked; libslirp copies the frame.
            unsafe { (instance.library.input)(instance.slirp, bytes.as_ptr(), length) };
        }
        // The frame may have opened a socket the poll thread must watch.
        let _ = self.wake.send(&[0]);
        Ok(bytes.len())
    }

    fn peek_recv_len(&mut self) -> io::Result<usize> {
        let fd = self.from_slirp.as_raw_fd();
        // SAFETY: a zero-length MSG_PEEK|MSG_TRUNC receive reads nothing into the (null)
        // buffer and returns the length of the next datagram.
        let n = unsafe {
            libc::recv(
                fd,
                std::ptr::null_mut(),
                0,
                libc::MSG_PEEK | libc::MSG_TRUNC | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(0)
            } else {
                Err(e)
            };
        }
        Ok(n as usize)
    }

    fn recv(&mut self, buffers: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        match nix::sys::uio::readv(&self.from_slirp, buffers) {
            Err(nix::errno::Errno::EAGAIN) => Ok(0),
            Err(e) => Err(e.into()),
            Ok(n) => Ok(n),
        }
    }

    fn ready_fd(&self) -> BorrowedFd<'_> {
        self.from_slirp.as_fd()
    }
}

impl Drop for Slirp {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let _ = self.wake.send(&[0]);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    const GUEST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x12, 0x34, 0x56];
    const GUEST_IP: [u8; 4] = [10, 0, 2, 15];
    const GATEWAY_IP: [u8; 4] = [10, 0, 2, 2];

    fn open_or_skip(hostfwd: &[HostForward]) -> Option<Slirp> {
        if let Err(e) = library() {
            if std::env::var("BHYVE_RS_REQUIRE_SLIRP").as_deref() == Ok("1") {
                panic!("{e}");
            }
            eprintln!("skipped: {e}");
            return None;
        }
        Some(Slirp::open(hostfwd, false).expect("slirp"))
    }

    fn arp(operation: u16, sender: ([u8; 6], [u8; 4]), target: ([u8; 6], [u8; 4])) -> Vec<u8> {
        let destination = if operation == 1 { [0xff; 6] } else { target.0 };
        let mut frame = destination.to_vec();
        frame.extend_from_slice(&sender.0);
        frame.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4]);
        frame.extend_from_slice(&operation.to_be_bytes());
        frame.extend_from_slice(&sender.0);
        frame.extend_from_slice(&sender.1);
        frame.extend_from_slice(&target.0);
        frame.extend_from_slice(&target.1);
        frame
    }

    /// Frames from slirp until `accept` takes one (answering slirp's ARP requests for the
    /// guest on the way), or two seconds pass.
    fn expect_frame(slirp: &mut Slirp, mut accept: impl FnMut(&[u8]) -> bool) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut buffer = vec![0u8; crate::devices::net::MAX_FRAME_LEN];
        while Instant::now() < deadline {
            let length = slirp.peek_recv_len().unwrap();
            if length == 0 {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            let n = slirp.recv(&mut [IoSliceMut::new(&mut buffer)]).unwrap();
            assert_eq!(n, length, "peek and recv disagree");
            let frame = &buffer[..n];
            if accept(frame) {
                return frame.to_vec();
            }
            let is_arp_request_for_guest = frame[12..14] == [0x08, 0x06]
                && frame[20..22] == [0, 1]
                && frame[38..42] == GUEST_IP;
            if is_arp_request_for_guest {
                let mut slirp_mac = [0u8; 6];
                slirp_mac.copy_from_slice(&frame[22..28]);
                let reply = arp(2, (GUEST_MAC, GUEST_IP), (slirp_mac, GATEWAY_IP));
                slirp.send(&[IoSlice::new(&reply)]).unwrap();
            }
        }
        panic!("no expected frame from slirp within 2 s");
    }

    /// The gateway answers ARP as RFC 826 says: a reply, from 10.0.2.2, to our address.
    #[test]
    fn gateway_answers_arp() {
        let Some(mut slirp) = open_or_skip(&[]) else {
            return;
        };
        let request = arp(1, (GUEST_MAC, GUEST_IP), ([0; 6], GATEWAY_IP));
        assert_eq!(
            slirp.send(&[IoSlice::new(&request)]).unwrap(),
            request.len()
        );
        let reply = expect_frame(&mut slirp, |f| f[12..14] == [0x08, 0x06]);
        assert_eq!(reply[0..6], GUEST_MAC, "to the guest");
        assert_eq!(reply[20..22], [0, 2], "an ARP reply");
        assert_eq!(reply[28..32], GATEWAY_IP, "for the gateway's address");
        assert_eq!(reply[32..38], GUEST_MAC);
        assert_eq!(reply[38..42], GUEST_IP);
        assert_eq!(reply[6..12], reply[22..28], "sender MAC consistent");
    }

    /// A host connection to a forwarded port reaches the guest as a TCP SYN to the guest
    /// address and port of the rule.
    #[test]
    fn hostfwd_turns_a_host_connection_into_a_syn_to_the_guest() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let rule = HostForward::parse(&format!("tcp:127.0.0.1:{port}-:7")).unwrap();
        let Some(mut slirp) = open_or_skip(&[rule]) else {
            return;
        };
        // Let slirp learn the guest's MAC first, as a guest's own traffic would.
        let request = arp(1, (GUEST_MAC, GUEST_IP), ([0; 6], GATEWAY_IP));
        slirp.send(&[IoSlice::new(&request)]).unwrap();
        expect_frame(&mut slirp, |f| {
            f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2]
        });

        let client = std::thread::spawn(move || {
            std::net::TcpStream::connect(("127.0.0.1", port)).map(|_| ())
        });
        let is_syn_to_guest = |f: &[u8]| {
            f.len() >= 54
                && f[12..14] == [0x08, 0x00]
                && f[23] == 6
                && f[30..34] == GUEST_IP
                && f[36..38] == 7u16.to_be_bytes()
                && f[47] & 0x02 != 0
        };
        let syn = expect_frame(&mut slirp, is_syn_to_guest);
        assert_eq!(syn[0..6], GUEST_MAC);
        assert_eq!(syn[26..30], GATEWAY_IP, "from the gateway");
        client.join().unwrap().expect("host connect");
    }

    #[test]
    fn a_port_in_use_is_a_clear_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let rule = HostForward::parse(&format!("tcp:127.0.0.1:{port}-:22")).unwrap();
        if library().is_err() {
            eprintln!("skipped: libslirp unavailable");
            return;
        }
        let error = match Slirp::open(&[rule], false) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("forwarded a port already in use"),
        };
        assert!(error.contains(&port.to_string()), "{error}");
    }
}
