//! A backend over a datagram socket pair for the device models' tests: one datagram, one
//! frame, with the other end in the test's hands.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use super::{NetBackend, MAX_FRAME_LEN};

/// A backend over a datagram socket pair: one datagram, one frame.
pub struct PairBackend {
    socket: UnixDatagram,
}

impl NetBackend for PairBackend {
    fn name(&self) -> &str {
        "pair"
    }
    fn send(&mut self, frame: &[IoSlice<'_>]) -> std::io::Result<usize> {
        let bytes: Vec<u8> = frame.iter().flat_map(|s| s.iter().copied()).collect();
        self.socket.send(&bytes)
    }
    fn peek_recv_len(&mut self) -> std::io::Result<usize> {
        let mut buffer = vec![0u8; MAX_FRAME_LEN];
        match nix::sys::socket::recv(
            self.socket.as_raw_fd(),
            &mut buffer,
            nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(n) => Ok(n),
            Err(nix::errno::Errno::EAGAIN) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }
    fn recv(&mut self, buffers: &mut [IoSliceMut<'_>]) -> std::io::Result<usize> {
        match nix::sys::uio::readv(&self.socket, buffers) {
            Ok(n) => Ok(n),
            Err(nix::errno::Errno::EAGAIN) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }
    fn ready_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.socket)
    }
}

/// A backend, and the host end of it (reads time out after two seconds).
pub fn socket_pair_backend() -> (Box<dyn NetBackend>, UnixDatagram) {
    let (host, device_end) = UnixDatagram::pair().unwrap();
    device_end.set_nonblocking(true).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    (Box::new(PairBackend { socket: device_end }), host)
}
