//! Sending and receiving nvlists on a SOCK_STREAM UNIX socket, as libnv's `nvlist_send` and
//! `nvlist_recv` do (FreeBSD `sys/contrib/libnv/nvlist.c`, `lib/libnv/msgio.c`).
//!
//! On the stream: the packed list, then — if it holds descriptors — one package per up to
//! [`FDS_PER_PACKAGE`] descriptors, each a single 0x00 data byte carrying the descriptors as
//! `SCM_RIGHTS`, one control message per descriptor. No length prefix, no terminator.
//!
//! The receiver reads exactly the bytes the header announces before asking for the
//! descriptors: a read past the list would swallow the byte that carries them, and the kernel
//! would drop the descriptors.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    cmsg_space, recv, recvmsg, send, sendmsg, setsockopt, sockopt, ControlMessage,
    ControlMessageOwned, MsgFlags, UnixAddr,
};
use nix::sys::time::TimeVal;

use super::nvlist::{ListHeader, NvError, NvList, HEADER_SIZE};

/// Descriptors per `sendmsg`: libnv's `PKG_MAX_SIZE` on FreeBSD (`MCLBYTES / 24`).
pub const FDS_PER_PACKAGE: usize = 85;

/// What a receiver is prepared to take; anything larger is refused before it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvLimits {
    /// Largest packed list, header included.
    pub max_size: usize,
    /// Most descriptors.
    pub max_descriptors: usize,
}

impl RecvLimits {
    /// Enough for any control request or reply bhyve exchanges (they are ~150 bytes, ≤ 1 fd).
    pub const CONTROL: RecvLimits = RecvLimits {
        max_size: 64 * 1024,
        max_descriptors: 16,
    };
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The peer closed the connection in the middle of a list (libnv: ENOTCONN).
    #[error("connection closed after {received} bytes of a {expected}-byte message")]
    Truncated { received: usize, expected: usize },
    /// No data within the socket's timeout.
    #[error("timed out waiting for the peer")]
    Timeout,
    #[error("message of {size} bytes exceeds the limit of {limit}")]
    TooLarge { size: u64, limit: usize },
    #[error("message carries {count} descriptors, more than the {limit} allowed")]
    TooManyDescriptors { count: u64, limit: usize },
    /// The descriptors did not arrive as libnv sends them (libnv: EINVAL).
    #[error("descriptors not received as announced: {0}")]
    Descriptors(&'static str),
    #[error(transparent)]
    Decode(#[from] NvError),
    #[error("{0}")]
    Io(Errno),
}

impl From<Errno> for TransportError {
    fn from(errno: Errno) -> Self {
        match errno {
            Errno::EAGAIN => TransportError::Timeout,
            other => TransportError::Io(other),
        }
    }
}

/// Bound how long one send or receive on `sock` may block (`None`: forever).
pub fn set_timeouts(
    sock: BorrowedFd<'_>,
    recv: Option<Duration>,
    send: Option<Duration>,
) -> Result<(), Errno> {
    setsockopt(&sock, sockopt::ReceiveTimeout, &timeval(recv))?;
    setsockopt(&sock, sockopt::SendTimeout, &timeval(send))?;
    Ok(())
}

fn timeval(timeout: Option<Duration>) -> TimeVal {
    // A zero timeval means "no timeout" to the kernel, so a requested one is at least 1 µs.
    match timeout {
        None => TimeVal::new(0, 0),
        Some(d) => {
            let d = d.max(Duration::from_micros(1));
            TimeVal::new(
                d.as_secs().min(i32::MAX as u64) as _,
                d.subsec_micros() as _,
            )
        }
    }
}

/// Before a blocking receive: let it wait until `deadline` at most, so a peer that sends a
/// byte now and then cannot stretch the exchange beyond it.
fn arm_deadline(sock: BorrowedFd<'_>, deadline: Option<Instant>) -> Result<(), TransportError> {
    let Some(deadline) = deadline else {
        return Ok(());
    };
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(TransportError::Timeout);
    }
    setsockopt(&sock, sockopt::ReceiveTimeout, &timeval(Some(left)))?;
    Ok(())
}

fn send_all(sock: RawFd, mut data: &[u8]) -> Result<(), TransportError> {
    while !data.is_empty() {
        // MSG_NOSIGNAL: a peer that went away must be an error, not a SIGPIPE.
        match send(sock, data, MsgFlags::MSG_NOSIGNAL) {
            Ok(0) => return Err(TransportError::Io(Errno::ENOTCONN)),
            Ok(n) => data = &data[n..],
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Send one package of descriptors: one 0x00 byte, one SCM_RIGHTS message per descriptor.
fn send_package(sock: RawFd, fds: &[RawFd]) -> Result<(), TransportError> {
    let dummy = [0u8];
    let iov = [IoSlice::new(&dummy)];
    let cmsgs: Vec<ControlMessage<'_>> = fds.chunks(1).map(ControlMessage::ScmRights).collect();
    loop {
        match sendmsg::<UnixAddr>(sock, &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(1) => return Ok(()),
            Ok(_) => return Err(TransportError::Io(Errno::ENOTCONN)),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Send `list` as libnv's `nvlist_send` does. The list keeps its descriptors.
pub fn nvlist_send(sock: impl AsFd, list: &NvList) -> Result<(), TransportError> {
    let sock = sock.as_fd().as_raw_fd();
    let (bytes, fds) = list.pack();
    send_all(sock, &bytes)?;
    for package in fds.chunks(FDS_PER_PACKAGE) {
        send_package(sock, package)?;
    }
    Ok(())
}

/// Fill `buf` exactly. Returns how many bytes arrived before EOF (== len on success).
fn recv_exact(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    deadline: Option<Instant>,
) -> Result<usize, TransportError> {
    let mut filled = 0;
    while filled < buf.len() {
        arm_deadline(sock, deadline)?;
        match recv(sock.as_raw_fd(), &mut buf[filled..], MsgFlags::empty()) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(filled)
}

/// Receive one package of exactly `count` descriptors (msgio's `fd_package_recv`).
fn recv_package(
    sock: BorrowedFd<'_>,
    count: usize,
    out: &mut Vec<OwnedFd>,
    deadline: Option<Instant>,
) -> Result<(), TransportError> {
    let mut dummy = [0u8];
    let mut iov = [IoSliceMut::new(&mut dummy)];
    // Room for one control message per descriptor, the way libnv sends them; a merged
    // message with all of them needs less.
    let mut space = vec![0u8; count * cmsg_space::<RawFd>()];
    let msg = loop {
        arm_deadline(sock, deadline)?;
        let flags = MsgFlags::MSG_CMSG_CLOEXEC;
        match recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space), flags) {
            Err(Errno::EINTR) => {}
            other => break other?,
        }
    };
    let mut received = 0;
    let mut foreign = false;
    let cmsgs = msg
        .cmsgs()
        .map_err(|_| TransportError::Descriptors("control data truncated"))?;
    for cmsg in cmsgs {
        match cmsg {
            ControlMessageOwned::ScmRights(fds) => {
                for fd in fds {
                    // SAFETY: the kernel has just installed this descriptor in our table for
                    // this message; nothing else refers to it, so we are its only owner.
                    out.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    received += 1;
                }
            }
            _ => foreign = true,
        }
    }
    if foreign {
        return Err(TransportError::Descriptors("unexpected control message"));
    }
    if msg.bytes != 1 || received != count {
        return Err(TransportError::Descriptors(
            "fewer or more descriptors than the list announces",
        ));
    }
    Ok(())
}

/// Receive one list as libnv's `nvlist_recv(sock, 0)` does, within `limits`.
/// `Ok(None)`: the peer closed the connection before sending anything.
pub fn nvlist_recv_or_eof(
    sock: impl AsFd,
    limits: RecvLimits,
) -> Result<Option<NvList>, TransportError> {
    receive(sock.as_fd(), limits, None)
}

/// [`nvlist_recv_or_eof`] that gives up with [`TransportError::Timeout`] once `deadline`
/// has passed, however the peer spaces out its bytes (it changes the socket's receive
/// timeout).
pub fn nvlist_recv_or_eof_before(
    sock: impl AsFd,
    limits: RecvLimits,
    deadline: Instant,
) -> Result<Option<NvList>, TransportError> {
    receive(sock.as_fd(), limits, Some(deadline))
}

fn receive(
    sock: BorrowedFd<'_>,
    limits: RecvLimits,
    deadline: Option<Instant>,
) -> Result<Option<NvList>, TransportError> {
    let mut raw = [0u8; HEADER_SIZE];
    match recv_exact(sock, &mut raw, deadline)? {
        0 => return Ok(None),
        HEADER_SIZE => {}
        received => {
            return Err(TransportError::Truncated {
                received,
                expected: HEADER_SIZE,
            })
        }
    }
    let header = ListHeader::parse(&raw)?;
    let total = header.size.saturating_add(HEADER_SIZE as u64);
    if total > limits.max_size as u64 {
        return Err(TransportError::TooLarge {
            size: total,
            limit: limits.max_size,
        });
    }
    if header.descriptors > limits.max_descriptors as u64 {
        return Err(TransportError::TooManyDescriptors {
            count: header.descriptors,
            limit: limits.max_descriptors,
        });
    }
    // Both fit in usize: bounded by the limits just checked.
    let total = total as usize;
    let mut buf = vec![0u8; total];
    buf[..HEADER_SIZE].copy_from_slice(&raw);
    let received = recv_exact(sock, &mut buf[HEADER_SIZE..], deadline)?;
    if received != total - HEADER_SIZE {
        return Err(TransportError::Truncated {
            received: HEADER_SIZE + received,
            expected: total,
        });
    }
    let wanted = header.descriptors as usize;
    let mut fds = Vec::with_capacity(wanted);
    while fds.len() < wanted {
        let count = (wanted - fds.len()).min(FDS_PER_PACKAGE);
        // On failure `fds` is dropped, closing what did arrive.
        recv_package(sock, count, &mut fds, deadline)?;
    }
    Ok(Some(NvList::unpack(&buf, fds)?))
}

/// Receive one list; a connection closed before any byte is [`TransportError::Truncated`].
pub fn nvlist_recv(sock: impl AsFd, limits: RecvLimits) -> Result<NvList, TransportError> {
    nvlist_recv_or_eof(sock, limits)?.ok_or(TransportError::Truncated {
        received: 0,
        expected: HEADER_SIZE,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    fn vector(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/data/nvlist/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn null_fd() -> OwnedFd {
        OwnedFd::from(File::open("/dev/null").expect("/dev/null"))
    }

    /// Read the whole stream the way a byte-level capture would, collecting descriptors.
    fn capture(sock: &UnixStream) -> (Vec<u8>, Vec<OwnedFd>) {
        let mut bytes = Vec::new();
        let mut fds = Vec::new();
        loop {
            let mut buf = [0u8; 4096];
            let mut iov = [IoSliceMut::new(&mut buf)];
            let mut space = vec![0u8; 128 * cmsg_space::<RawFd>()];
            let msg = recvmsg::<()>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .expect("recvmsg");
            let n = msg.bytes;
            for cmsg in msg.cmsgs().expect("cmsgs") {
                if let ControlMessageOwned::ScmRights(received) = cmsg {
                    for fd in received {
                        // SAFETY: freshly received descriptor, owned by nobody else.
                        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
            if n == 0 {
                break;
            }
            bytes.extend_from_slice(&buf[..n]);
        }
        (bytes, fds)
    }

    #[test]
    fn send_writes_the_libnv_stream_for_a_checkpoint_request() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut req = NvList::new();
        req.add_string("cmd", "checkpoint").unwrap();
        req.add_string("filename", "snap").unwrap();
        req.add_bool("suspend", true).unwrap();
        req.add_descriptor("fddir", null_fd()).unwrap();
        nvlist_send(&a, &req).unwrap();
        drop(a);
        let (bytes, fds) = capture(&b);
        assert_eq!(bytes, vector("bhyvectl-suspend.stream.bin"));
        assert_eq!(fds.len(), 1);
    }

    #[test]
    fn descriptor_array_travels_in_one_package() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut list = NvList::new();
        list.add(
            "fds",
            crate::control::nvlist::NvValue::DescriptorArray(vec![null_fd(), null_fd(), null_fd()]),
        )
        .unwrap();
        list.add_descriptor("single", null_fd()).unwrap();
        nvlist_send(&a, &list).unwrap();
        drop(a);
        let (bytes, fds) = capture(&b);
        assert_eq!(bytes, vector("descriptor-array.stream.bin"));
        assert_eq!(fds.len(), 4);
    }

    #[test]
    fn recv_takes_the_list_and_its_descriptor() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut req = NvList::new();
        req.add_string("cmd", "checkpoint").unwrap();
        req.add_descriptor("fddir", null_fd()).unwrap();
        nvlist_send(&a, &req).unwrap();
        let got = nvlist_recv(&b, RecvLimits::CONTROL).unwrap();
        assert_eq!(got.get_string("cmd"), Some("checkpoint"));
        assert!(got.get_descriptor("fddir").is_some());
    }

    #[test]
    fn recv_refuses_fewer_descriptors_than_announced() {
        // The list says four descriptors; only two follow, then the peer closes.
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&vector("x-recv-fewer-fds.bin")).unwrap();
        let fds = [null_fd(), null_fd()];
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        send_package(a.as_raw_fd(), &raw).unwrap();
        drop(a);
        let err = nvlist_recv(&b, RecvLimits::CONTROL).unwrap_err();
        assert!(matches!(err, TransportError::Descriptors(_)), "{err}");
    }

    #[test]
    fn recv_refuses_an_oversized_list_before_reading_it() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut header = vector("empty.bin");
        header[11..19].copy_from_slice(&(1u64 << 40).to_le_bytes());
        (&a).write_all(&header).unwrap();
        let err = nvlist_recv(&b, RecvLimits::CONTROL).unwrap_err();
        assert!(matches!(err, TransportError::TooLarge { .. }), "{err}");
        // The big-endian header claiming 2^64-1 bytes (SA-24:09) is refused too.
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&vector("x-size-overflow-be-recv.bin"))
            .unwrap();
        assert!(nvlist_recv(&b, RecvLimits::CONTROL).is_err());
    }

    #[test]
    fn recv_reports_eof_before_any_byte_and_truncation_after() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        assert!(matches!(
            nvlist_recv_or_eof(&b, RecvLimits::CONTROL),
            Ok(None)
        ));
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&vector("string.bin")[..30]).unwrap();
        drop(a);
        let err = nvlist_recv(&b, RecvLimits::CONTROL).unwrap_err();
        assert!(
            matches!(err, TransportError::Truncated { received: 30, .. }),
            "{err}"
        );
    }

    #[test]
    fn recv_times_out_on_a_silent_peer() {
        let (_a, b) = UnixStream::pair().unwrap();
        set_timeouts(b.as_fd(), Some(Duration::from_millis(50)), None).unwrap();
        let err = nvlist_recv(&b, RecvLimits::CONTROL).unwrap_err();
        assert!(matches!(err, TransportError::Timeout), "{err}");
    }

    #[test]
    fn a_deadline_bounds_a_peer_that_trickles_its_bytes() {
        // One byte every 20 ms: each wait is short, the whole list would take ~0.8 s.
        let (a, b) = UnixStream::pair().unwrap();
        let bytes = vector("string.bin");
        let trickle = std::thread::spawn(move || {
            for byte in bytes {
                std::thread::sleep(Duration::from_millis(20));
                if (&a).write_all(&[byte]).is_err() {
                    return;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_millis(200);
        let err = nvlist_recv_or_eof_before(&b, RecvLimits::CONTROL, deadline).unwrap_err();
        assert!(matches!(err, TransportError::Timeout), "{err}");
        assert!(Instant::now() >= deadline);
        drop(b);
        trickle.join().unwrap();
        // A deadline already past fails at once, before reading anything.
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&vector("string.bin")).unwrap();
        let err = nvlist_recv_or_eof_before(&b, RecvLimits::CONTROL, Instant::now()).unwrap_err();
        assert!(matches!(err, TransportError::Timeout), "{err}");
        let got = nvlist_recv_or_eof_before(
            &b,
            RecvLimits::CONTROL,
            Instant::now() + Duration::from_secs(5),
        );
        assert!(got.unwrap().is_some());
    }

    #[test]
    fn recv_accepts_every_libnv_stream_capture() {
        for name in ["bhyvectl-checkpoint", "bhyvectl-suspend", "descriptor"] {
            let (a, b) = UnixStream::pair().unwrap();
            let stream = vector(&format!("{name}.stream.bin"));
            let (list, dummy) = stream.split_at(stream.len() - 1);
            assert_eq!(dummy, &[0]);
            (&a).write_all(list).unwrap();
            let fd = null_fd();
            send_package(a.as_raw_fd(), &[fd.as_raw_fd()]).unwrap();
            let got = nvlist_recv(&b, RecvLimits::CONTROL).unwrap();
            assert_eq!(got.pack().0, list, "{name}");
        }
    }

    #[test]
    fn send_to_a_closed_peer_is_an_error_not_a_signal() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let mut list = NvList::new();
        list.add_string("error", "x").unwrap();
        assert!(nvlist_send(&a, &list).is_err());
        let mut rest = Vec::new();
        let _ = (&a).read_to_end(&mut rest);
    }
}
