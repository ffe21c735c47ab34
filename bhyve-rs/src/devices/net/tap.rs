//! The tap backend (`tapN`, `vmnetN`, or any name with `type=tap`): Ethernet frames through a
//! tap interface of the host.
//!
//! On Linux the interface is attached through `/dev/net/tun` (`IFF_TAP | IFF_NO_PI`, so each
//! read or write is one bare frame); if no interface of that name exists, one is created and
//! goes away with this program. On FreeBSD `/dev/NAME` is opened, as bhyve does. Either way
//! the interface is brought up, so the host side need not do it.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};

use super::{NetBackend, NetError, MAX_FRAME_LEN};

pub struct Tap {
    name: String,
    file: File,
    /// A frame read ahead by [`NetBackend::peek_recv_len`], handed out by the next `recv`.
    pending: Vec<u8>,
    pending_len: usize,
}

impl Tap {
    /// Attach to (or create) the tap interface `name`.
    pub fn open(name: &str) -> Result<Self, NetError> {
        let error = |source| NetError::Tap {
            name: name.to_string(),
            source,
        };
        let file = open_interface(name).map_err(error)?;
        set_up(name).map_err(error)?;
        Ok(Tap {
            name: name.to_string(),
            file,
            pending: vec![0; MAX_FRAME_LEN],
            pending_len: 0,
        })
    }
}

/// Reads that find nothing are "no frame", not errors.
fn none_if_would_block(result: io::Result<usize>) -> io::Result<usize> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
        other => other,
    }
}

impl NetBackend for Tap {
    fn name(&self) -> &str {
        &self.name
    }

    fn send(&mut self, frame: &[IoSlice<'_>]) -> io::Result<usize> {
        let length = frame.iter().map(|s| s.len()).sum();
        match (&self.file).write_vectored(frame) {
            // The interface's queue is full (or it is down): the frame is lost, as on a wire.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(length),
            other => other,
        }
    }

    fn peek_recv_len(&mut self) -> io::Result<usize> {
        if self.pending_len == 0 {
            self.pending_len = none_if_would_block((&self.file).read(&mut self.pending))?;
        }
        Ok(self.pending_len)
    }

    fn recv(&mut self, buffers: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        if self.pending_len == 0 {
            return none_if_would_block((&self.file).read_vectored(buffers));
        }
        let mut frame = &self.pending[..self.pending_len];
        let mut copied = 0;
        for buffer in buffers.iter_mut() {
            if frame.is_empty() {
                break;
            }
            let n = buffer.len().min(frame.len());
            buffer[..n].copy_from_slice(&frame[..n]);
            frame = &frame[n..];
            copied += n;
        }
        self.pending_len = 0;
        Ok(copied)
    }

    fn ready_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// `ifreq` with the name and the flags member of the union, which is all this file uses.
#[cfg(target_os = "linux")]
#[repr(C)]
struct InterfaceRequest {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    /// The rest of the union (`struct ifmap` is the largest member, 24 bytes on x86_64).
    _pad: [u8; 22],
}

#[cfg(target_os = "linux")]
impl InterfaceRequest {
    fn new(name: &str) -> io::Result<Self> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("an interface name has 1 to {} bytes", libc::IFNAMSIZ - 1),
            ));
        }
        let mut request = InterfaceRequest {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        for (dst, &src) in request.name.iter_mut().zip(bytes) {
            *dst = src as libc::c_char;
        }
        Ok(request)
    }
}

#[cfg(target_os = "linux")]
fn open_interface(name: &str) -> io::Result<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;

    // linux/if_tun.h: TUNSETIFF = _IOW('T', 202, int).
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;

    let mut request = InterfaceRequest::new(name)?;
    request.flags = IFF_TAP | IFF_NO_PI;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .map_err(|e| io::Error::new(e.kind(), format!("/dev/net/tun: {e}")))?;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `request` matches in size
    // and layout; the descriptor is open for the duration of the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut request) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Bring the interface up (SIOCGIFFLAGS, then SIOCSIFFLAGS with IFF_UP), as bhyve does rather
/// than relying on the host's configuration.
#[cfg(target_os = "linux")]
fn set_up(name: &str) -> io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor just returned by socket(2) and owned by no one else.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut request = InterfaceRequest::new(name)?;
    // SAFETY: SIOCGIFFLAGS fills the flags of one `struct ifreq`, which `request` matches.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if request.flags & libc::IFF_UP as libc::c_short != 0 {
        return Ok(());
    }
    request.flags |= libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads one `struct ifreq`, which `request` matches.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS as _, &request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn open_interface(name: &str) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;

    if name.is_empty() || name.contains('/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a device name",
        ));
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(format!("/dev/{name}"))
}

/// FreeBSD brings a tap up when it is opened if net.link.tap.up_on_open is set; bhyve also
/// sets IFF_UP itself, which this build does not do yet.
#[cfg(not(target_os = "linux"))]
fn set_up(_name: &str) -> io::Result<()> {
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::ffi::c_int;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::time::{Duration, Instant};

    /// An ethertype reserved for local experiments (IEEE 802 "Local Experimental Ethertype 1"),
    /// so the host's own traffic on the interface (IPv6 router solicitations…) is told apart.
    const TEST_ETHERTYPE: [u8; 2] = [0x88, 0xb5];

    fn tun_usable() -> bool {
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
        {
            Ok(_) => true,
            Err(e) => {
                eprintln!("skipped: /dev/net/tun cannot be opened ({e})");
                false
            }
        }
    }

    /// A name unique to this test run (interface names have at most 15 bytes).
    fn interface_name(tag: &str) -> String {
        format!("bt{tag}{}", std::process::id() % 100_000)
    }

    fn frame(source: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0x02, 0, 0, 0, 0, 0xdd, 0x02, 0, 0, 0, 0, source];
        frame.extend_from_slice(&TEST_ETHERTYPE);
        frame.extend_from_slice(payload);
        frame
    }

    /// The host side of the interface: a packet socket bound to it, the kernel as oracle.
    fn packet_socket(name: &str) -> OwnedFd {
        let index: u32 = std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
            .expect("interface index")
            .trim()
            .parse()
            .unwrap();
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket(2) with constant arguments; checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                c_int::from(protocol),
            )
        };
        assert!(raw >= 0, "packet socket: {}", io::Error::last_os_error());
        // SAFETY: `raw` was just returned by socket(2).
        let socket = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain data.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_protocol = protocol;
        address.sll_ifindex = index as i32;
        // SAFETY: bind(2) with a sockaddr_ll of the size given.
        let rc = unsafe {
            libc::bind(
                socket.as_raw_fd(),
                &address as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind: {}", io::Error::last_os_error());
        socket
    }
    /// One frame from the packet socket into `buffer`; 0 when none is waiting.
    fn host_receive(socket: &OwnedFd, buffer: &mut [u8]) -> usize {
        // SAFETY: recv(2) into a buffer of buffer.len() bytes.
        let n = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
            )
        };
        n.max(0) as usize
    }

    /// Wait up to two seconds for a frame of the test ethertype from `receive`.
    fn wait_for(mut receive: impl FnMut(&mut [u8]) -> usize) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut buffer = vec![0u8; MAX_FRAME_LEN];
        while Instant::now() < deadline {
            let n = receive(&mut buffer);
            if n >= 14 && buffer[12..14] == TEST_ETHERTYPE {
                return buffer[..n].to_vec();
            }
            if n == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        panic!("no test frame within 2 s");
    }

    #[test]
    fn frames_cross_a_tap_it_creates_in_both_directions() {
        if !tun_usable() {
            return;
        }
        let name = interface_name("c");
        let mut tap = Tap::open(&name).expect("create tap");
        // Created and brought up, as bhyve brings its tap up.
        let flags = std::fs::read_to_string(format!("/sys/class/net/{name}/flags")).unwrap();
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
        assert_ne!(flags & libc::IFF_UP as u32, 0, "interface is down");
        let host = packet_socket(&name);

        // Guest to host: gathered from three pieces, one frame on the wire.
        let sent = frame(1, b"guest to host, in pieces");
        let (a, rest) = sent.split_at(5);
        let (b, c) = rest.split_at(9);
        let n = tap
            .send(&[IoSlice::new(a), IoSlice::new(b), IoSlice::new(c)])
            .unwrap();
        assert_eq!(n, sent.len());
        let seen = wait_for(|buffer| host_receive(&host, buffer));
        assert_eq!(seen, sent);

        // Host to guest: peek tells the length, recv scatters it into two buffers.
        let back = frame(2, &[0x5a; 300]);
        // SAFETY: send(2) from a buffer of back.len() bytes.
        let n = unsafe { libc::send(host.as_raw_fd(), back.as_ptr().cast(), back.len(), 0) };
        assert_eq!(n, back.len() as isize, "{}", io::Error::last_os_error());
        let deadline = Instant::now() + Duration::from_secs(2);
        let received = loop {
            assert!(Instant::now() < deadline, "no frame from the host");
            let length = tap.peek_recv_len().unwrap();
            if length == 0 {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            let mut head = [0u8; 20];
            let mut tail = vec![0u8; MAX_FRAME_LEN];
            let n = tap
                .recv(&mut [IoSliceMut::new(&mut head), IoSliceMut::new(&mut tail)])
                .unwrap();
            assert_eq!(n, length);
            let mut whole = head[..n.min(20)].to_vec();
            whole.extend_from_slice(&tail[..n.saturating_sub(20)]);
            if whole[12..14] == TEST_ETHERTYPE {
                break whole;
            }
        };
        assert_eq!(received, back);
        assert_eq!(tap.peek_recv_len().unwrap(), 0);
        drop(tap);
        // A tap this program created goes away with it.
        assert!(!std::path::Path::new(&format!("/sys/class/net/{name}")).exists());
    }

    #[test]
    fn attaches_to_an_existing_tap_and_leaves_it() {
        if !tun_usable() {
            return;
        }
        let name = interface_name("e");
        let status = std::process::Command::new("ip")
            .args(["tuntap", "add", "dev", &name, "mode", "tap"])
            .status();
        match status {
            Ok(s) if s.success() => {}
            other => {
                eprintln!("skipped: cannot create a persistent tap with ip(8): {other:?}");
                return;
            }
        }
        let result = std::panic::catch_unwind(|| {
            let mut tap = Tap::open(&name).expect("attach");
            let host = packet_socket(&name);
            let sent = frame(3, b"to an existing tap");
            tap.send(&[IoSlice::new(&sent)]).unwrap();
            let seen = wait_for(|buffer| host_receive(&host, buffer));
            assert_eq!(seen, sent);
        });
        let still_there = std::path::Path::new(&format!("/sys/class/net/{name}")).exists();
        let _ = std::process::Command::new("ip")
            .args(["tuntap", "del", "dev", &name, "mode", "tap"])
            .status();
        result.unwrap();
        assert!(still_there, "a persistent tap must outlive the backend");
    }

    #[test]
    fn a_bad_name_is_one_clear_error() {
        if !tun_usable() {
            return;
        }
        let error = match Tap::open("a-name-far-too-long-for-linux") {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted"),
        };
        assert!(error.contains("a-name-far-too-long-for-linux"), "{error}");
        // An existing interface that is not a tap (the loopback) is refused by the kernel.
        let error = match Tap::open("lo") {
            Err(e) => e.to_string(),
            Ok(_) => panic!("attached to lo"),
        };
        assert!(error.contains("\"lo\""), "{error}");
    }
}
