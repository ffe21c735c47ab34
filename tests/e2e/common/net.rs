//! Host ends of the guests' networks for the end-to-end tests: a tap interface watched with a
//! packet socket (Linux), checks for what slirp needs, and the console guest booted with a
//! network card under QEMU or bhyve.

#[cfg(target_os = "linux")]
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
#[cfg(target_os = "linux")]
use std::time::{Duration, Instant};

use super::control::Scratch;
use super::{console_vm_command_with, guest, notice, qemu_binary, qemu_command_with};
use super::{Console, BOOT_TIMEOUT, COMMAND_TIMEOUT};

/// The console guest under QEMU with `extra` arguments; `None` (with a notice) without QEMU.
pub fn boot_qemu(extra: &[&str]) -> Option<Console> {
    let qemu = qemu_binary()?;
    let mut args = extra.to_vec();
    args.push("-no-reboot");
    let cmd = qemu_command_with(&qemu, guest::console_guest(), "", &args);
    let mut vm = Console::spawn("qemu", cmd);
    vm.expect(guest::READY, BOOT_TIMEOUT);
    vm.expect_prompt(COMMAND_TIMEOUT);
    Some(vm)
}

/// The console guest under this project's `bhyve` with `extra` arguments.
pub fn boot_bhyve(scratch: &Scratch, name: &str, extra: &[&str]) -> Console {
    let cmd = console_vm_command_with(
        Path::new(env!("CARGO_BIN_EXE_bhyve")),
        "256M",
        &scratch.0,
        name,
        extra,
    );
    let mut vm = Console::spawn("bhyve", cmd);
    vm.expect(guest::READY, BOOT_TIMEOUT);
    vm.expect_prompt(COMMAND_TIMEOUT);
    vm
}

/// Whether libslirp is installed (a notice when not).
pub fn slirp_usable() -> bool {
    let found = [
        "/usr/lib/x86_64-linux-gnu/libslirp.so.0",
        "/usr/lib/libslirp.so.0",
        "/usr/local/lib/libslirp.so.0",
    ]
    .iter()
    .any(|p| Path::new(p).exists());
    if !found {
        notice("skipped: libslirp.so.0 not installed (tests/install-deps.sh installs it)");
    }
    found
}

/// A free TCP port on 127.0.0.1 (bound, then released for the VM to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A tap interface for one test, persistent until dropped, and a packet socket on it: the
/// host side of the guest's wire.
#[cfg(target_os = "linux")]
pub struct Tap {
    pub name: String,
    socket: OwnedFd,
}

#[cfg(target_os = "linux")]
impl Tap {
    pub fn create(tag: &str) -> Option<Tap> {
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
        Some(Tap { name, socket })
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

    /// Counts the frames `accept` takes (and their bytes) until `stop` is set and nothing more
    /// is queued.
    pub fn count_until(
        &self,
        accept: impl Fn(&[u8]) -> bool,
        stop: &std::sync::atomic::AtomicBool,
    ) -> (u64, u64) {
        let (mut frames, mut bytes) = (0u64, 0u64);
        let mut buffer = vec![0u8; 65536];
        loop {
            // SAFETY: recv(2) into a buffer of buffer.len() bytes.
            let n = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    0,
                )
            };
            if n > 0 {
                if accept(&buffer[..n as usize]) {
                    frames += 1;
                    bytes += n as u64;
                }
                continue;
            }
            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                return (frames, bytes);
            }
            let mut poll = libc::pollfd {
                fd: self.socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll(2) on one pollfd that lives across the call.
            unsafe { libc::poll(&mut poll, 1, 20) };
        }
    }

    /// The next frame `accept` takes that crosses the interface, within `timeout`.
    pub fn receive(&self, timeout: Duration, accept: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buffer = vec![0u8; 65536];
        while Instant::now() < deadline {
            // SAFETY: recv(2) into a buffer of buffer.len() bytes.
            let n = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    0,
                )
            };
            if n > 0 && accept(&buffer[..n as usize]) {
                return Some(buffer[..n as usize].to_vec());
            }
            if n < 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        None
    }
}

#[cfg(target_os = "linux")]
impl Drop for Tap {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["tuntap", "del", "dev", &self.name, "mode", "tap"])
            .status();
    }
}

/// The ethertype of the test frames (IEEE local experimental 1).
pub const TEST_TYPE: [u8; 2] = [0x88, 0xb5];

/// FNV-1a 64, the checksum the guest prints for frames.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The frame the guest's `send <len> <seed>` sends from `mac`: broadcast, type 0x88b5, then
/// splitmix64 words from `seed`, little endian, cut to length.
pub fn guest_frame(mac: &[u8; 6], len: usize, seed: u64) -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(mac);
    frame.extend_from_slice(&TEST_TYPE);
    let mut state = seed;
    while frame.len() < len {
        let word = guest::splitmix64(&mut state).to_le_bytes();
        let take = (len - frame.len()).min(8);
        frame.extend_from_slice(&word[..take]);
    }
    frame
}

/// A test frame from the host to `mac`, from 02:00:00:00:00:77, `seed`'s bytes.
pub fn host_frame(mac: &[u8; 6], seed: u64, len: usize) -> Vec<u8> {
    let mut frame = mac.to_vec();
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x77]);
    frame.extend_from_slice(&TEST_TYPE);
    let mut state = seed;
    while frame.len() < len {
        frame.push(guest::splitmix64(&mut state) as u8);
    }
    frame
}

/// Whether `frame` is a test frame sent from `mac`.
pub fn is_test_frame_from(mac: &[u8; 6], frame: &[u8]) -> bool {
    frame.len() >= 14 && frame[12..14] == TEST_TYPE && frame[6..12] == *mac
}

/// `<driver> echo` in the guest behind `tap`: twenty frames of growing length each come back
/// to their sender intact, then one input byte ends it.
#[cfg(target_os = "linux")]
pub fn echo_twenty(vm: &mut Console, tap: &Tap, driver: &str, mac: &[u8; 6]) {
    vm.send_line(&format!("{driver} echo"));
    vm.expect(&format!("{driver} echo started\n"), COMMAND_TIMEOUT);
    for seed in 0..20u64 {
        let frame = host_frame(mac, 100 + seed, 64 + 50 * seed as usize);
        tap.send(&frame);
        let echoed = tap
            .receive(COMMAND_TIMEOUT, |f| is_test_frame_from(mac, f))
            .expect("echo");
        assert_eq!(echoed[..6], frame[6..12], "back to the sender");
        assert_eq!(echoed[12..], frame[12..], "payload intact, seed {seed}");
    }
    vm.send("\n");
    vm.expect(&format!("{driver} echo stopped 20\n"), COMMAND_TIMEOUT);
    vm.expect_prompt(COMMAND_TIMEOUT);
}

/// Frames through an echoing guest one at a time until `stop` is set; how many came back.
#[cfg(target_os = "linux")]
pub fn echo_until(tap: &Tap, mac: &[u8; 6], stop: &std::sync::atomic::AtomicBool) -> u64 {
    let mut echoed = 0u64;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let frame = host_frame(mac, 1000 + echoed, 128);
        tap.send(&frame);
        let back = tap
            .receive(Duration::from_secs(30), |f| is_test_frame_from(mac, f))
            .unwrap_or_else(|| panic!("frame {echoed} not echoed"));
        assert_eq!(back[12..], frame[12..], "frame {echoed}");
        echoed += 1;
    }
    echoed
}

/// A checkpoint of the VM `name` (run directory in `scratch`) while its guest, already in
/// `<driver> echo`, echoes a stream of frames: every frame sent before, during and after
/// comes back intact and exactly once (the guest's count at the end says so), and the guest
/// goes on.
#[cfg(target_os = "linux")]
pub fn checkpoint_while_echoing(
    vm: &mut Console,
    tap: &Tap,
    scratch: &Scratch,
    name: &str,
    driver: &str,
    mac: &[u8; 6],
) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let checkpoint = {
        let stop = stop.clone();
        let rundir = scratch.0.clone();
        let name = name.to_string();
        let file = scratch.path("live.snap");
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let result = super::control::ctl(
                &rundir,
                &name,
                &[format!("--checkpoint={}", file.display())],
            );
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            result
        })
    };
    let mut echoed = echo_until(tap, mac, &stop);
    assert!(echoed > 0, "no frame crossed before the checkpoint ended");
    let (code, err) = checkpoint.join().unwrap();
    assert_eq!(code, 0, "bhyvectl --checkpoint failed: {err}");
    // Twenty more after the checkpoint.
    for extra in 0..20u64 {
        let frame = host_frame(mac, 50_000 + extra, 100);
        tap.send(&frame);
        let back = tap
            .receive(COMMAND_TIMEOUT, |f| is_test_frame_from(mac, f))
            .expect("echo after checkpoint");
        assert_eq!(back[12..], frame[12..]);
        echoed += 1;
    }
    // Nothing comes back twice.
    assert!(tap
        .receive(Duration::from_millis(300), |f| is_test_frame_from(mac, f))
        .is_none());
    vm.send("\n");
    vm.expect(
        &format!("{driver} echo stopped {echoed}\n"),
        COMMAND_TIMEOUT,
    );
}
