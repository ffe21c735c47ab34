//! A tap interface for one test and a packet socket on it: the host side of a guest's wire
//! (Linux). The network tests check frames through it; the device benchmark counts and sends
//! streams of them.

use super::notice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The ethertype of the test guest's frames (IEEE local experimental 1).
pub const TEST_TYPE: [u8; 2] = [0x88, 0xb5];

/// A tap interface, persistent until dropped, with a packet socket bound to it that sees the
/// frames whose source is `guest_mac`.
pub struct Tap {
    pub name: String,
    guest_mac: [u8; 6],
    socket: OwnedFd,
}

impl Tap {
    /// `None` (after a skip message) when the interface cannot be created (no root or no
    /// /dev/net/tun).
    pub fn create(tag: &str, guest_mac: [u8; 6]) -> Option<Tap> {
        let name = format!("tap{tag}{}", std::process::id() % 100_000);
        let ok = std::process::Command::new("ip")
            .args(["tuntap", "add", "dev", &name, "mode", "tap"])
            .status()
            .is_ok_and(|s| s.success())
            && std::process::Command::new("ip")
                .args(["link", "set", &name, "up"])
                .status()
                .is_ok_and(|s| s.success());
        if !ok {
            notice(
                "skipped: cannot create a tap interface (ip tuntap needs root and /dev/net/tun)",
            );
            return None;
        }
        let index: i32 = std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket(2) with constant arguments; checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(protocol),
            )
        };
        assert!(
            raw >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `raw` was just returned by socket(2).
        let socket = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain data.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_protocol = protocol;
        address.sll_ifindex = index;
        // SAFETY: bind(2) with a sockaddr_ll of the size given.
        let rc = unsafe {
            libc::bind(
                socket.as_raw_fd(),
                &address as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        // A stream of frames from a guest must not overflow the default receive buffer (a few
        // hundred full-size frames) while the reader is descheduled. Best effort: only root may
        // go past the system's limit.
        let size: libc::c_int = 16 << 20;
        // SAFETY: setsockopt(2) with an int option of its size.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        Some(Tap {
            name,
            guest_mac,
            socket,
        })
    }

    /// Sends `frame` onto the wire; false if the kernel refused it for now (a full queue).
    pub fn try_send(&self, frame: &[u8]) -> bool {
        // SAFETY: send(2) from a buffer of frame.len() bytes.
        let n = unsafe {
            libc::send(
                self.socket.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
            )
        };
        n == frame.len() as isize
    }

    pub fn send(&self, frame: &[u8]) {
        assert!(self.try_send(frame), "{}", std::io::Error::last_os_error());
    }

    /// One frame from the socket into `buffer`: its length, or `None` if none is queued.
    fn recv(&self, buffer: &mut [u8]) -> Option<usize> {
        // SAFETY: recv(2) into a buffer of buffer.len() bytes.
        let n = unsafe {
            libc::recv(
                self.socket.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
            )
        };
        usize::try_from(n).ok()
    }

    fn is_guest_test_frame(&self, frame: &[u8]) -> bool {
        frame.len() >= 14 && frame[12..14] == TEST_TYPE && frame[6..12] == self.guest_mac
    }

    /// Waits up to `timeout` for the socket to have a frame queued.
    fn wait_readable(&self, timeout: Duration) {
        let mut poll = libc::pollfd {
            fd: self.socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: poll(2) on one pollfd that lives across the call.
        unsafe { libc::poll(&mut poll, 1, ms) };
    }

    /// The next test frame (type 0x88b5) the guest sent, within `timeout`.
    pub fn receive(&self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buffer = vec![0u8; 65536];
        while Instant::now() < deadline {
            match self.recv(&mut buffer) {
                Some(n) if self.is_guest_test_frame(&buffer[..n]) => {
                    return Some(buffer[..n].to_vec())
                }
                Some(_) => {}
                None => self.wait_readable(Duration::from_millis(2)),
            }
        }
        None
    }

    /// Counts the guest's test frames (and their bytes) until `stop` is set and nothing more
    /// is queued.
    pub fn count_until(&self, stop: &AtomicBool) -> (u64, u64) {
        let (mut frames, mut bytes) = (0u64, 0u64);
        let mut buffer = vec![0u8; 65536];
        loop {
            match self.recv(&mut buffer) {
                Some(n) => {
                    if self.is_guest_test_frame(&buffer[..n]) {
                        frames += 1;
                        bytes += n as u64;
                    }
                }
                None if stop.load(Ordering::SeqCst) => return (frames, bytes),
                None => self.wait_readable(Duration::from_millis(20)),
            }
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["tuntap", "del", "dev", &self.name, "mode", "tap"])
            .status();
    }
}
