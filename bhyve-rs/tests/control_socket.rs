//! bhyvectl's client against bhyve's control server over real sockets, and each end against
//! the bytes FreeBSD's tools exchange.

#[path = "../../tests/e2e/common/mod.rs"]
mod common;

use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bhyve::control::client::{request_checkpoint, ClientError};
use bhyve::control::nvlist::NvList;
use bhyve::control::server::{CheckpointRequest, ControlHandler, ControlServer, ServerError};
use bhyve::control::transport::{nvlist_recv, nvlist_send, RecvLimits};
use nix::sys::socket::{cmsg_space, recvmsg, ControlMessageOwned, MsgFlags};

fn vector(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/nvlist")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A fresh scratch directory, short enough for socket paths.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("bhyve-ctl-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        common::writable_by_owner_only(&dir);
        Scratch(dir)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the mock bhyve saw of one checkpoint request.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    filename: String,
    suspend: bool,
    /// (device, inode) of the directory descriptor.
    dir: (u64, u64),
}

/// What `after_checkpoint_reply` was called with.
type AfterReply = (bool, Result<(), String>);

struct MockBhyve {
    result: Result<(), String>,
    delay: Duration,
    seen: Mutex<Vec<Seen>>,
    after: Mutex<Sender<AfterReply>>,
}

impl MockBhyve {
    fn new(result: Result<(), String>) -> (Arc<MockBhyve>, Receiver<AfterReply>) {
        let (tx, rx) = channel();
        let mock = Arc::new(MockBhyve {
            result,
            delay: Duration::ZERO,
            seen: Mutex::new(Vec::new()),
            after: Mutex::new(tx),
        });
        (mock, rx)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl ControlHandler for MockBhyve {
    fn checkpoint(&self, request: CheckpointRequest) -> Result<(), String> {
        let stat = nix::sys::stat::fstat(request.dir.as_fd()).expect("fstat fddir");
        self.seen.lock().unwrap().push(Seen {
            filename: request.filename.clone(),
            suspend: request.suspend,
            dir: (stat.st_dev as u64, stat.st_ino as u64),
        });
        // Prove the descriptor is usable the way the snapshot writer uses it.
        let file = nix::fcntl::openat(
            request.dir.as_fd(),
            request.filename.as_str(),
            nix::fcntl::OFlag::O_CREAT | nix::fcntl::OFlag::O_WRONLY,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| format!("openat: {e}"))?;
        drop(file);
        std::thread::sleep(self.delay);
        self.result.clone()
    }

    fn after_checkpoint_reply(&self, suspend: bool, result: &Result<(), String>) {
        let _ = self.after.lock().unwrap().send((suspend, result.clone()));
    }
}

fn identity(path: &Path) -> (u64, u64) {
    let m = std::fs::metadata(path).expect("metadata");
    (m.dev(), m.ino())
}

/// Send raw request bytes (plus `nfds` descriptors, as libnv does) and read the raw reply.
/// The descriptors are `dir`, opened once per descriptor slot.
fn raw_exchange(socket: &Path, request: &[u8], nfds: usize, dir: &Path) -> Vec<u8> {
    let dir = std::fs::File::open(dir).expect("open dir");
    let exchanged = common::control::send_with_fds(socket, request, &vec![dir.as_raw_fd(); nfds]);
    exchanged.fds_sent.expect("sendmsg");
    exchanged.read.expect("read reply");
    exchanged.reply
}

fn reply_error(reply: &[u8]) -> Option<String> {
    let list = NvList::unpack(reply, Vec::new()).expect("reply decodes");
    list.get_string("error").map(str::to_string)
}

#[test]
fn checkpoint_round_trip_hands_bhyve_the_directory_and_basename() {
    let scratch = Scratch::new("roundtrip");
    let rundir = scratch.path("run");
    let snapdir = scratch.path("snaps");
    std::fs::create_dir(&snapdir).unwrap();
    let (mock, after) = MockBhyve::new(Ok(()));
    let server = ControlServer::start(&rundir, "vm0", mock.clone()).expect("start");
    assert_eq!(server.path(), rundir.join("vm0"));

    request_checkpoint(&rundir, "vm0", &snapdir.join("snap"), false).expect("checkpoint");

    assert_eq!(
        mock.seen(),
        vec![Seen {
            filename: "snap".into(),
            suspend: false,
            dir: identity(&snapdir),
        }]
    );
    assert!(snapdir.join("snap").exists(), "file created through fddir");
    let (suspend, result) = after.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(!suspend);
    assert_eq!(result, Ok(()));
    // The VM keeps running: a second checkpoint works too.
    request_checkpoint(&rundir, "vm0", &snapdir.join("again"), false).expect("second");
    assert_eq!(mock.seen().len(), 2);
}

#[test]
fn relative_filename_resolves_against_the_working_directory() {
    let scratch = Scratch::new("relative");
    let rundir = scratch.path("run");
    let (mock, _after) = MockBhyve::new(Ok(()));
    let _server = ControlServer::start(&rundir, "vm0", mock.clone()).expect("start");
    // A bare name means bhyvectl's current directory, as dirname(3) gives ".".
    let cwd = std::env::current_dir().unwrap();
    let name = format!("bhyve-ctl-rel-{}", std::process::id());
    let result = request_checkpoint(&rundir, "vm0", Path::new(&name), false);
    let _ = std::fs::remove_file(cwd.join(&name));
    result.expect("checkpoint");
    assert_eq!(mock.seen()[0].dir, identity(&cwd));
    assert_eq!(mock.seen()[0].filename, name);
}

#[test]
fn handler_error_reaches_the_client() {
    let scratch = Scratch::new("handlererr");
    let rundir = scratch.path("run");
    let (mock, after) = MockBhyve::new(Err("no space left on device".into()));
    let _server = ControlServer::start(&rundir, "vm0", mock).expect("start");
    let err = request_checkpoint(&rundir, "vm0", &scratch.path("snap"), true).unwrap_err();
    assert!(
        matches!(&err, ClientError::Failed(m) if m == "no space left on device"),
        "{err}"
    );
    assert_eq!(err.to_string(), "no space left on device");
    let (suspend, result) = after.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(suspend);
    assert!(result.is_err());
    // A failed suspend leaves the VM running and the socket in place.
    assert!(rundir.join("vm0").exists());
}

#[test]
fn unknown_command_gets_the_reply_bhyve_sends() {
    let scratch = Scratch::new("unknown");
    let rundir = scratch.path("run");
    let (mock, _after) = MockBhyve::new(Ok(()));
    let server = ControlServer::start(&rundir, "vm0", mock.clone()).expect("start");
    let reply = raw_exchange(server.path(), &vector("req-unknown-cmd.bin"), 0, &scratch.0);
    assert_eq!(reply, vector("bhyve-reply-unknown-command.bin"));
    assert!(mock.seen().is_empty());
}

#[test]
fn malformed_requests_get_an_error_and_the_server_keeps_serving() {
    let scratch = Scratch::new("malformed");
    let rundir = scratch.path("run");
    let (mock, _after) = MockBhyve::new(Ok(()));
    let server = ControlServer::start(&rundir, "vm0", mock.clone()).expect("start");
    let socket = server.path().to_path_buf();

    let cases: [(&str, usize, &str); 7] = [
        // Bytes that do not decode.
        ("x-bad-magic.bin", 0, "malformed request"),
        (
            "x-string-array-last-not-terminated.bin",
            0,
            "malformed request",
        ),
        ("x-duplicate-names.bin", 0, "malformed request"),
        // Requests FreeBSD's 2025 bhyve aborts on.
        ("req-no-cmd.bin", 0, "missing command name"),
        ("req-cmd-number.bin", 0, "missing command name"),
        // The 2022 request without a directory descriptor.
        ("req-checkpoint-no-fddir.bin", 0, "fddir"),
        // A checkpoint request whose header counts a descriptor that never comes.
        ("bhyvectl-checkpoint.bin", 0, "malformed request"),
    ];
    for (file, nfds, expected) in cases {
        let reply = raw_exchange(&socket, &vector(file), nfds, &scratch.0);
        let error = reply_error(&reply).unwrap_or_default();
        assert!(error.contains(expected), "{file}: reply error {error:?}");
    }
    // A header announcing far more than a control request can be is refused unread.
    let mut huge = vector("empty.bin");
    huge[11..19].copy_from_slice(&(1u64 << 30).to_le_bytes());
    let reply = raw_exchange(&socket, &huge, 0, &scratch.0);
    let error = reply_error(&reply).unwrap_or_default();
    assert!(error.contains("exceeds the limit"), "{error:?}");
    // A connection that closes without sending anything, and a truncated request.
    drop(UnixStream::connect(&socket).unwrap());
    let reply = raw_exchange(
        &socket,
        &vector("bhyvectl-checkpoint.bin")[..60],
        0,
        &scratch.0,
    );
    assert!(reply_error(&reply).is_some());
    assert!(mock.seen().is_empty());

    // Still serving, and a stock bhyvectl request (bytes + one descriptor) is accepted.
    let reply = raw_exchange(&socket, &vector("bhyvectl-checkpoint.bin"), 1, &scratch.0);
    assert_eq!(reply, vector("empty.bin"), "success reply is an empty list");
    assert_eq!(mock.seen().len(), 1);
    assert_eq!(mock.seen()[0].filename, "snap");
    assert!(scratch.path("snap").exists());
}

#[test]
fn client_closing_before_the_reply_does_not_stop_the_server() {
    let scratch = Scratch::new("earlyclose");
    let rundir = scratch.path("run");
    let (tx, after) = channel();
    let mock = Arc::new(MockBhyve {
        result: Ok(()),
        delay: Duration::from_millis(200),
        seen: Mutex::new(Vec::new()),
        after: Mutex::new(tx),
    });
    let server = ControlServer::start(&rundir, "vm0", mock.clone()).expect("start");
    // As FreeBSD 14's bhyvectl: send, close, never read.
    {
        let stream = UnixStream::connect(server.path()).unwrap();
        let mut request = NvList::new();
        request.add_string("cmd", "checkpoint").unwrap();
        request.add_string("filename", "early").unwrap();
        request.add_bool("suspend", false).unwrap();
        let dir = std::fs::File::open(&scratch.0).unwrap();
        request.add_descriptor("fddir", OwnedFd::from(dir)).unwrap();
        nvlist_send(&stream, &request).unwrap();
    }
    let (_, result) = after.recv_timeout(Duration::from_secs(5)).expect("handled");
    assert_eq!(result, Ok(()));
    request_checkpoint(&rundir, "vm0", &scratch.path("later"), false).expect("still serving");
    assert_eq!(mock.seen().len(), 2);
}

#[test]
fn socket_is_private_and_rundir_is_created() {
    let scratch = Scratch::new("mode");
    let rundir = scratch.path("var/run/bhyve");
    let (mock, _after) = MockBhyve::new(Ok(()));
    let server = ControlServer::start(&rundir, "vm0", mock).expect("start");
    let meta = std::fs::symlink_metadata(server.path()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert!(std::fs::metadata(&rundir).unwrap().is_dir());
    // Nothing but the socket is left in the run directory.
    let entries: Vec<_> = std::fs::read_dir(&rundir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("vm0")]);
}

#[test]
fn socket_is_removed_when_the_server_is_dropped() {
    let scratch = Scratch::new("drop");
    let rundir = scratch.path("run");
    let (mock, _after) = MockBhyve::new(Ok(()));
    let server = ControlServer::start(&rundir, "vm0", mock).expect("start");
    let path = server.path().to_path_buf();
    assert!(path.exists());
    drop(server);
    assert!(!path.exists());
    let err = request_checkpoint(&rundir, "vm0", &scratch.path("snap"), false).unwrap_err();
    assert!(matches!(err, ClientError::NoSuchVm { .. }), "{err}");
}

#[test]
fn second_server_for_a_live_vm_is_refused_but_a_stale_socket_is_replaced() {
    let scratch = Scratch::new("live");
    let rundir = scratch.path("run");
    let (mock, _after) = MockBhyve::new(Ok(()));
    let first = ControlServer::start(&rundir, "vm0", mock.clone()).expect("first");
    let err = ControlServer::start(&rundir, "vm0", mock.clone())
        .err()
        .expect("second refused");
    assert!(matches!(err, ServerError::AlreadyRunning(_)), "{err}");
    // The refused start left the live socket alone.
    request_checkpoint(&rundir, "vm0", &scratch.path("snap"), false).expect("first serves");
    drop(first);

    // A socket left behind by a crashed bhyve: nobody listens.
    drop(UnixListener::bind(rundir.join("vm1")).unwrap());
    let err = request_checkpoint(&rundir, "vm1", &scratch.path("snap"), false).unwrap_err();
    assert!(matches!(err, ClientError::NotListening { .. }), "{err}");
    let _server = ControlServer::start(&rundir, "vm1", mock.clone()).expect("stale replaced");
    request_checkpoint(&rundir, "vm1", &scratch.path("snap1"), false).expect("serves");

    // A regular file is never replaced.
    std::fs::write(rundir.join("vm2"), b"not a socket").unwrap();
    let err = ControlServer::start(&rundir, "vm2", mock)
        .err()
        .expect("refused");
    assert!(matches!(err, ServerError::NotASocket(_)), "{err}");
}

#[test]
fn successful_suspend_replies_then_removes_the_socket_and_calls_back() {
    let scratch = Scratch::new("suspend");
    let rundir = scratch.path("run");
    let (mock, after) = MockBhyve::new(Ok(()));
    let server = ControlServer::start(&rundir, "vm0", mock.clone()).expect("start");
    request_checkpoint(&rundir, "vm0", &scratch.path("snap"), true).expect("suspend");
    let (suspend, result) = after.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(suspend);
    assert_eq!(result, Ok(()));
    assert!(!server.path().exists(), "socket removed before bhyve exits");
    let err = request_checkpoint(&rundir, "vm0", &scratch.path("snap2"), false).unwrap_err();
    assert!(matches!(err, ClientError::NoSuchVm { .. }), "{err}");
    drop(server);
}

#[test]
fn client_errors_say_what_is_wrong() {
    let scratch = Scratch::new("clienterr");
    let rundir = scratch.path("run");
    std::fs::create_dir(&rundir).unwrap();
    common::writable_by_owner_only(&rundir);
    let err = request_checkpoint(&rundir, "ghost", &scratch.path("snap"), false).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "no such VM 'ghost' (no control socket at {}; bhyve is not running)",
            rundir.join("ghost").display()
        )
    );
    assert!(matches!(
        request_checkpoint(&rundir, "../etc", &scratch.path("snap"), false),
        Err(ClientError::BadVmName(_))
    ));
    let (mock, _after) = MockBhyve::new(Ok(()));
    let _server = ControlServer::start(&rundir, "vm0", mock).expect("start");
    let err = request_checkpoint(&rundir, "vm0", &scratch.path("missing/snap"), false).unwrap_err();
    assert!(matches!(err, ClientError::Directory { .. }), "{err}");
    // "/" (like anything ending in "/") names a directory, never a snapshot file.
    let err = request_checkpoint(&rundir, "vm0", Path::new("/"), false).unwrap_err();
    assert_eq!(err.to_string(), "'/': Is a directory");
}

/// A fake FreeBSD bhyve: accept one connection, capture every byte and descriptor the client
/// sends, then answer with `reply` (or close silently, as FreeBSD 14 does).
fn fake_bhyve(
    listener: UnixListener,
    reply: Option<Vec<u8>>,
) -> std::thread::JoinHandle<(Vec<u8>, Vec<OwnedFd>)> {
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut bytes = vec![0u8; 147];
        stream.read_exact(&mut bytes).unwrap();
        let mut dummy = [0u8; 1];
        let mut iov = [IoSliceMut::new(&mut dummy)];
        let mut space = vec![0u8; 4 * cmsg_space::<RawFd>()];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )
        .unwrap();
        let mut fds = Vec::new();
        let dummy_len = msg.bytes;
        for cmsg in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                for fd in received {
                    // SAFETY: just received; this test is its only owner.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        bytes.extend_from_slice(&dummy[..dummy_len]);
        if let Some(reply) = reply {
            stream.write_all(&reply).unwrap();
        }
        (bytes, fds)
    })
}

#[test]
fn client_sends_exactly_what_freebsd_bhyvectl_sends() {
    let scratch = Scratch::new("bytes");
    let rundir = scratch.path("run");
    std::fs::create_dir(&rundir).unwrap();
    let snapdir = scratch.path("snaps");
    std::fs::create_dir(&snapdir).unwrap();
    for (suspend, stream_file) in [
        (false, "bhyvectl-checkpoint.stream.bin"),
        (true, "bhyvectl-suspend.stream.bin"),
    ] {
        let listener = UnixListener::bind(rundir.join("vm0")).unwrap();
        let fake = fake_bhyve(listener, Some(vector("empty.bin")));
        request_checkpoint(&rundir, "vm0", &snapdir.join("snap"), suspend).expect("success");
        let (bytes, fds) = fake.join().unwrap();
        assert_eq!(bytes, vector(stream_file));
        assert_eq!(fds.len(), 1);
        let stat = nix::sys::stat::fstat(fds[0].as_fd()).unwrap();
        assert_eq!((stat.st_dev as u64, stat.st_ino as u64), identity(&snapdir));
        std::fs::remove_file(rundir.join("vm0")).unwrap();
    }
}

#[test]
fn client_reports_a_2025_bhyve_error() {
    let scratch = Scratch::new("stock");
    let rundir = scratch.path("run");
    std::fs::create_dir(&rundir).unwrap();

    let listener = UnixListener::bind(rundir.join("vm0")).unwrap();
    let fake = fake_bhyve(listener, Some(vector("bhyve-reply-unknown-command.bin")));
    let err = request_checkpoint(&rundir, "vm0", &scratch.path("snap"), false).unwrap_err();
    assert_eq!(err.to_string(), "command 'foo' not found");
    fake.join().unwrap();
}

/// A bhyve that closes without a reply, after doing `write` to the snapshot path (what a
/// FreeBSD 14 bhyve does after its checkpoint, or what is left when bhyve dies mid-save).
fn silent_bhyve_result(
    scratch: &Scratch,
    snap: &Path,
    write: impl FnOnce(&Path) + Send + 'static,
) -> Result<(), ClientError> {
    let rundir = scratch.path("run");
    std::fs::create_dir_all(&rundir).unwrap();
    let _ = std::fs::remove_file(rundir.join("vm0"));
    let listener = UnixListener::bind(rundir.join("vm0")).unwrap();
    let target = snap.to_path_buf();
    let fake = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        // The request, then the one-byte package carrying its directory descriptor: a bhyve
        // that closed before taking both would make the client's second send fail.
        let mut bytes = vec![0u8; 147 + 1];
        (&stream).read_exact(&mut bytes).unwrap();
        write(&target);
        drop(stream);
    });
    let result = request_checkpoint(&rundir, "vm0", snap, false);
    fake.join().unwrap();
    result
}

fn freebsd_meta() -> &'static str {
    "{\n  \"basic metadata\": {\"ncpus\": 1, \"vmname\": \"vm0\", \"memsize\": 4096, \
     \"memflags\": 0},\n  \"kern_structs\": [],\n  \"devices\": []\n}\n"
}

#[test]
fn a_silent_close_succeeds_only_with_a_fresh_complete_snapshot_on_disk() {
    let scratch = Scratch::new("silent");
    let snap = scratch.path("snap");

    // Nothing written: bhyve died before or while saving.
    let err = silent_bhyve_result(&scratch, &snap, |_| {}).unwrap_err();
    assert!(matches!(err, ClientError::NotWritten { .. }), "{err}");
    assert!(err.to_string().contains("no such file"), "{err}");

    // FreeBSD's three files, index complete: accepted.
    silent_bhyve_result(&scratch, &snap, |snap| {
        std::fs::write(snap, vec![0u8; 4096]).unwrap();
        std::fs::write(format!("{}.kern", snap.display()), [0u8; 16]).unwrap();
        std::fs::write(format!("{}.meta", snap.display()), freebsd_meta()).unwrap();
    })
    .expect("a complete FreeBSD checkpoint");

    // The same files left from before, untouched this time: refused.
    let err = silent_bhyve_result(&scratch, &snap, |_| {}).unwrap_err();
    assert!(
        err.to_string().contains("unchanged since the request"),
        "{err}"
    );

    // A FreeBSD save cut short: the index lacks its end.
    silent_bhyve_result(&scratch, &snap, |snap| {
        std::fs::write(snap, vec![1u8; 4096]).unwrap();
        let meta = freebsd_meta();
        std::fs::write(format!("{}.meta", snap.display()), &meta[..40]).unwrap();
    })
    .expect_err("an incomplete FreeBSD index");
}

#[cfg(feature = "bhyve_snapshot")]
#[test]
fn a_silent_close_accepts_a_valid_bhyve_rs_snapshot_and_refuses_a_cut_one() {
    use bhyve::snapshot::{Backend, HeaderInfo, SnapshotWriter};
    fn write_snapshot(path: &Path) {
        let mut writer =
            SnapshotWriter::create(path, HeaderInfo::this_build(Backend::Kvm)).unwrap();
        writer
            .add_config([("name", "vm0"), ("memory.size", "1M")])
            .unwrap();
        writer.add_ram_region(0, &vec![7u8; 1 << 20]).unwrap();
        writer.commit().unwrap();
    }
    let scratch = Scratch::new("silent-rs");
    let snap = scratch.path("snap");
    silent_bhyve_result(&scratch, &snap, write_snapshot).expect("a complete snapshot");

    let err = silent_bhyve_result(&scratch, &snap, |snap| {
        let bytes = std::fs::read(snap).unwrap();
        std::fs::write(snap, &bytes[..bytes.len() / 2]).unwrap();
    })
    .unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[test]
fn server_replies_are_nvlists_a_libnv_client_can_read() {
    let scratch = Scratch::new("replies");
    let rundir = scratch.path("run");
    let (mock, _after) = MockBhyve::new(Err("boom".into()));
    let server = ControlServer::start(&rundir, "vm0", mock).expect("start");
    let stream = UnixStream::connect(server.path()).unwrap();
    let mut request = NvList::new();
    request.add_string("cmd", "checkpoint").unwrap();
    request.add_string("filename", "snap").unwrap();
    request.add_bool("suspend", false).unwrap();
    let dir = std::fs::File::open(&scratch.0).unwrap();
    request.add_descriptor("fddir", OwnedFd::from(dir)).unwrap();
    nvlist_send(&stream, &request).unwrap();
    let reply = nvlist_recv(&stream, RecvLimits::CONTROL).unwrap();
    assert_eq!(reply.get_string("error"), Some("boom"));
    assert_eq!(reply.len(), 1);
}

/// Whether the server has closed `stream` (or answered on it) yet; false while it waits.
fn closed_or_answered(stream: &UnixStream) -> bool {
    stream.set_nonblocking(true).expect("nonblocking");
    let mut byte = [0u8];
    let result = (&*stream).read(&mut byte);
    stream.set_nonblocking(false).expect("blocking");
    !matches!(result, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[test]
fn silent_clients_hold_up_no_one() {
    let scratch = Scratch::new("silent");
    let rundir = scratch.path("run");
    let snapdir = scratch.path("snaps");
    std::fs::create_dir(&snapdir).unwrap();
    let (mock, _after) = MockBhyve::new(Ok(()));
    let server = ControlServer::start(&rundir, "vm0", mock.clone()).expect("start");
    // Connected before the real request, and saying nothing.
    let mut silent: Vec<UnixStream> = (0..15)
        .map(|_| UnixStream::connect(server.path()).expect("connect"))
        .collect();
    request_checkpoint(&rundir, "vm0", &snapdir.join("snap"), false).expect("checkpoint");
    assert_eq!(mock.seen().len(), 1);
    // The request was served while the silent clients still waited: the server had not
    // given up on them first.
    assert!(silent.iter().all(|s| !closed_or_answered(s)));
    // Past 16 silent clients, the oldest is let go.
    silent.extend((0..2).map(|_| UnixStream::connect(server.path()).expect("connect")));
    silent[0]
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(
        (&silent[0]).read(&mut [0u8]).ok(),
        Some(0),
        "oldest not closed"
    );
    assert!(silent[1..].iter().all(|s| !closed_or_answered(s)));
    // A silent client that finally speaks is still served.
    let mut late = &silent[16];
    late.write_all(&vector("req-unknown-cmd.bin")).unwrap();
    late.shutdown(std::net::Shutdown::Write).ok();
    let mut reply = Vec::new();
    late.read_to_end(&mut reply).unwrap();
    assert!(reply_error(&reply).is_some_and(|e| e.contains("not found")));
    // One that hangs up unheard costs nothing either.
    drop(silent);
    request_checkpoint(&rundir, "vm0", &snapdir.join("again"), false).expect("checkpoint");
    assert_eq!(mock.seen().len(), 2);
}

#[test]
fn of_servers_started_together_for_one_name_exactly_one_wins() {
    const TRIALS: usize = 20;
    const STARTERS: usize = 6;
    let scratch = Scratch::new("race");
    let rundir = scratch.path("run");
    std::fs::create_dir_all(&rundir).unwrap();
    common::writable_by_owner_only(&rundir);
    let (mock, _after) = MockBhyve::new(Ok(()));
    for trial in 0..TRIALS {
        let name = format!("vm{trial}");
        let start = Arc::new(std::sync::Barrier::new(STARTERS));
        let starters: Vec<_> = (0..STARTERS)
            .map(|_| {
                let (rundir, name, mock, start) =
                    (rundir.clone(), name.clone(), mock.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    ControlServer::start(&rundir, &name, mock)
                })
            })
            .collect();
        let results: Vec<_> = starters.into_iter().map(|t| t.join().unwrap()).collect();
        let winners = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(
            winners, 1,
            "trial {trial}: {winners} servers run for {name}"
        );
        for result in &results {
            if let Err(err) = result {
                assert!(matches!(err, ServerError::AlreadyRunning(_)), "{err}");
            }
        }
        // The winner is the one that answers.
        request_checkpoint(&rundir, &name, &scratch.path("snap"), false).expect("winner serves");
    }
}

#[test]
fn a_run_directory_another_user_owns_or_can_write_is_refused() {
    let scratch = Scratch::new("rundir");
    let (mock, _after) = MockBhyve::new(Ok(()));
    for mode in [0o777, 0o1777, 0o775, 0o757] {
        let rundir = scratch.path(&format!("run{mode:o}"));
        std::fs::create_dir(&rundir).unwrap();
        std::fs::set_permissions(&rundir, std::fs::Permissions::from_mode(mode)).unwrap();
        let err = ControlServer::start(&rundir, "vm0", mock.clone())
            .err()
            .expect("refused");
        assert_eq!(
            err.to_string(),
            format!(
                "run directory {} can be written by other users (mode {mode:04o}): \
                 refusing to put a control socket there",
                rundir.display()
            )
        );
        assert!(!rundir.join("vm0").exists());
    }
    let own = scratch.path("own");
    std::fs::create_dir(&own).unwrap();
    std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o700)).unwrap();
    let server = ControlServer::start(&own, "vm0", mock.clone()).expect("own 0700 directory");
    drop(server);

    if !nix::unistd::geteuid().is_root() {
        common::notice("not root: cannot give a run directory to another user");
        return;
    }
    let theirs = scratch.path("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let err = ControlServer::start(&theirs, "vm0", mock)
        .err()
        .expect("refused");
    assert!(
        matches!(
            err,
            ServerError::RunDirOwner {
                owner: 65534,
                user: 0,
                ..
            }
        ),
        "{err}"
    );
}

/// bhyvectl run as root, and a listener planted by user 65534 (as the one who could write the
/// run directory would): the request fails before any byte, descriptor included, is sent.
#[test]
fn bhyvectl_sends_nothing_to_a_listener_of_another_user() {
    use std::os::unix::process::CommandExt;
    if !nix::unistd::geteuid().is_root() {
        common::notice("not root: cannot start a listener as another user");
        return;
    }
    let scratch = Scratch::new("planted");
    let rundir = scratch.path("run");
    std::fs::create_dir(&rundir).unwrap();
    std::fs::set_permissions(&rundir, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(&scratch.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    // The planted listener reports how many bytes and descriptors reached it.
    let script = r#"
import array, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1]); s.listen(1); print("ready", flush=True)
s.settimeout(20); c, _ = s.accept(); c.settimeout(20)
data, fds = b"", 0
while True:
    msg, anc, _, _ = c.recvmsg(4096, socket.CMSG_SPACE(64))
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += len(payload) // 4
    if not msg: break
    data += msg
print("bytes", len(data), "fds", fds, flush=True)
"#;
    let mut planted = match std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(rundir.join("vm0"))
        .uid(65534)
        .gid(65534)
        .stdout(std::process::Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            common::notice(&format!("no python3 to plant a listener with: {e}"));
            return;
        }
    };
    let mut out = std::io::BufReader::new(planted.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line, "ready\n");
    let err = request_checkpoint(&rundir, "vm0", &scratch.path("private.ckp"), false).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "control socket {} is served by uid 65534, neither root nor this user (uid 0): \
             not sending it the directory",
            rundir.join("vm0").display()
        )
    );
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line, "bytes 0 fds 0\n");
    assert!(planted.wait().unwrap().success());
}

#[test]
fn requests_queued_behind_a_suspend_are_told_the_vm_is_suspending() {
    let scratch = Scratch::new("queued");
    let rundir = scratch.path("run");
    let (tx, after) = channel();
    let mock = Arc::new(MockBhyve {
        result: Ok(()),
        delay: Duration::from_millis(500),
        seen: Mutex::new(Vec::new()),
        after: Mutex::new(tx),
    });
    let server = ControlServer::start(&rundir, "vm0", mock.clone()).expect("start");
    let suspend = {
        let (rundir, file) = (rundir.clone(), scratch.path("suspended"));
        std::thread::spawn(move || request_checkpoint(&rundir, "vm0", &file, true))
    };
    // Both connect while the suspend is being written; one never says anything.
    std::thread::sleep(Duration::from_millis(150));
    let silent = UnixStream::connect(server.path()).unwrap();
    let queued: Vec<_> = (0..2)
        .map(|n| {
            let (rundir, file) = (rundir.clone(), scratch.path(&format!("queued{n}")));
            std::thread::spawn(move || request_checkpoint(&rundir, "vm0", &file, false))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    suspend.join().unwrap().expect("the suspend succeeds");
    for client in queued {
        let err = client.join().unwrap().unwrap_err();
        assert_eq!(err.to_string(), "the VM is suspending");
    }
    let (suspended, result) = after
        .recv_timeout(Duration::from_secs(5))
        .expect("called back");
    assert!(suspended && result.is_ok());
    assert_eq!(mock.seen().len(), 1, "only the suspend was carried out");
    assert!(!scratch.path("queued0").exists() && !scratch.path("queued1").exists());
    // The silent connection is answered the same and closed, not kept.
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let reply = nvlist_recv(&silent, RecvLimits::CONTROL).expect("a reply");
    assert_eq!(
        reply.get_string_bytes("error"),
        Some(&b"the VM is suspending"[..])
    );
    let mut rest = Vec::new();
    (&silent).read_to_end(&mut rest).expect("closed");
    assert!(rest.is_empty());
    drop(server);
}
