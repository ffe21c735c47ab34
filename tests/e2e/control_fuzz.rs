//! A running bhyve's control socket under hostile clients: hundreds of mutated requests and
//! abusive connections, after each batch of which the VM still runs, its guest still
//! answers on the console, and a real `bhyvectl --checkpoint` still succeeds. Needs /dev/kvm
//! (skips with a message without it, fails if BHYVE_RS_REQUIRE_KVM=1).

#[path = "common/mod.rs"]
mod common;

#[path = "../../bhyve-rs/tests/support/nvlist_mutations.rs"]
mod mutations;

use std::fs::File;
use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Instant;

use bhyve::control::nvlist::{NvList, NvValue};
use bhyve::control::transport::nvlist_send;
use bhyve::snapshot::SnapshotReader;
use common::control::{boot, counter, ctl, reply_error, Scratch};
use common::{kvm_usable, vm_name, Console};
use mutations::{mutate, seeds, SplitMix64};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

/// The VM is alive, its guest counts on, and bhyvectl can still take a checkpoint.
fn assert_unharmed(vm: &mut Console, expected_counter: &mut u64, rundir: &Path, name: &str) {
    assert!(vm.running(), "bhyve exited:\n{}", vm.stderr());
    *expected_counter += 1;
    assert_eq!(counter(vm), *expected_counter, "the guest's counter");
    let file = rundir.join("snaps/checked.snap");
    let _ = std::fs::remove_file(&file);
    let (code, err) = ctl(rundir, name, &[format!("--checkpoint={}", file.display())]);
    assert_eq!(code, 0, "bhyvectl --checkpoint failed: {err}");
    SnapshotReader::open(&file).unwrap_or_else(|e| panic!("snapshot unreadable: {e}"));
}

/// Send `bytes` and `fds` as libnv does and take whatever reply comes: the server may refuse
/// before it has read everything.
fn send_with_fds(socket: &Path, bytes: &[u8], fds: &[RawFd]) -> Vec<u8> {
    common::control::send_with_fds(socket, bytes, fds).reply
}

/// Send a well-formed list the way bhyvectl does and read the reply's error.
fn send_list(socket: &Path, list: &NvList) -> Option<String> {
    let mut stream = UnixStream::connect(socket).expect("connect to bhyve");
    nvlist_send(&stream, list).expect("send list");
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    reply_error(&reply)
}

/// A checkpoint request as bhyvectl builds it, with `filename` as raw bytes.
fn checkpoint_request(filename: &[u8], fddir: OwnedFd) -> NvList {
    let mut list = NvList::new();
    list.add_string("cmd", "checkpoint").unwrap();
    list.add("filename", NvValue::String(filename.to_vec()))
        .unwrap();
    list.add_bool("suspend", false).unwrap();
    list.add_descriptor("fddir", fddir).unwrap();
    list
}

/// Whether the server has closed `stream` or answered on it; false while it still waits.
fn closed_or_answered(stream: &UnixStream) -> bool {
    stream.set_nonblocking(true).expect("nonblocking");
    let result = (&*stream).read(&mut [0u8]);
    stream.set_nonblocking(false).expect("blocking");
    !matches!(result, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[test]
fn hostile_control_clients_leave_the_vm_running_and_bhyvectl_working() {
    if !kvm_usable() {
        return;
    }
    let started = Instant::now();
    let scratch = Scratch::new("ctlfuzz");
    let snapdir = scratch.path("snaps");
    std::fs::create_dir_all(&snapdir).expect("create snapshot directory");
    let name = vm_name();
    let mut vm = boot(&scratch.0, &name, "256M");
    let socket = scratch.path(&name);
    let mut expected_counter = 0;
    let open_dir = || OwnedFd::from(File::open(&snapdir).expect("open snapshot directory"));

    // Batch 1: mutated requests, with as many descriptors as declared or a few more or less.
    let all = seeds();
    let requests: Vec<_> = all
        .iter()
        .filter(|s| s.name.starts_with("req-") || s.name.starts_with("bhyvectl-"))
        .collect();
    assert!(requests.len() >= 5, "request vectors missing");
    let (mut errors, mut closed, mut written, mut skipped) = (0, 0, 0, 0);
    let dir = open_dir();
    for case in 0..300u64 {
        let mut rng = SplitMix64(case);
        let seed = requests[rng.below(requests.len())];
        let mut bytes = seed.bytes.clone();
        for _ in 0..1 + rng.below(3) {
            mutate(&mut rng, &mut bytes, &all);
        }
        // A mutation that still asks to suspend would end the VM, as it should: not sent.
        let suspends = NvList::unpack(&bytes, Vec::new())
            .ok()
            .or_else(|| {
                let fds = (0..4).map(|_| dir.try_clone().unwrap()).collect();
                NvList::unpack(&bytes, fds).ok()
            })
            .is_some_and(|l| l.get_bool("suspend") == Some(true));
        if suspends {
            skipped += 1;
            continue;
        }
        let nfds = match rng.below(4) {
            0 => rng.below(seed.nfds + 3),
            _ => seed.nfds,
        };
        // The server may refuse the bytes before the descriptors are sent.
        let reply = send_with_fds(&socket, &bytes, &vec![dir.as_raw_fd(); nfds]);
        if reply.is_empty() {
            closed += 1;
        } else if let Some(error) = reply_error(&reply) {
            assert!(!error.is_empty() && !error.contains('\n'), "{error:?}");
            errors += 1;
        } else {
            // Only a well-formed checkpoint request is answered with success.
            assert_eq!(
                NvList::unpack(&reply, Vec::new()).map(|l| l.len()).ok(),
                Some(0),
                "case {case}: reply {reply:?}"
            );
            written += 1;
        }
    }
    eprintln!(
        "mutated requests: {errors} error replies, {closed} closed, {written} carried out, \
         {skipped} suspends not sent"
    );
    assert!(errors > 200, "only {errors} error replies");
    assert_unharmed(&mut vm, &mut expected_counter, &scratch.0, &name);

    // Batch 2: abusive connections.
    // A client that connects and says nothing holds up nobody: bhyvectl is served while it
    // waits, and it is still waiting afterwards.
    let silent = UnixStream::connect(&socket).expect("connect");
    // Half a header, then gone.
    let header = &requests[0].bytes[..9];
    let mut half = UnixStream::connect(&socket).expect("connect");
    half.write_all(header).unwrap();
    drop(half);
    // A header announcing a 1 GiB body: refused without reading (or allocating) it.
    let mut huge = requests[0].bytes[..19].to_vec();
    huge[11..19].copy_from_slice(&(1u64 << 30).to_le_bytes());
    let reply = send_with_fds(&socket, &huge, &[]);
    let error = reply_error(&reply).expect("an error for a 1 GiB header");
    assert!(error.contains("exceeds"), "{error}");
    // More descriptors than the request declares, in its package or with its bytes.
    let checkpoint = std::fs::read(mutations::data_dir().join("bhyvectl-checkpoint.bin"))
        .expect("checkpoint vector");
    let extra = [dir.as_raw_fd(); 3];
    assert!(reply_error(&send_with_fds(&socket, &checkpoint, &extra)).is_some());
    {
        let stream = UnixStream::connect(&socket).expect("connect");
        let cmsgs = [ControlMessage::ScmRights(&extra)];
        let iov = [IoSlice::new(&checkpoint)];
        sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsgs, MsgFlags::empty(), None).expect("sendmsg");
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut reply = Vec::new();
        let _ = (&stream).read_to_end(&mut reply);
        assert!(reply_error(&reply).is_some(), "{reply:?}");
    }
    // A regular file as the directory.
    let not_a_dir = OwnedFd::from(File::open(scratch.path("snaps/checked.snap")).unwrap());
    let error = send_list(&socket, &checkpoint_request(b"plain", not_a_dir));
    assert!(error.is_some(), "a file accepted as fddir");
    // Names that leave the directory, or are no name at all.
    let escapes: [&[u8]; 7] = [
        b"..",
        b".",
        b"../escape",
        b"sub/file",
        b"/tmp/abs",
        b"",
        b"\xff\xfe",
    ];
    for filename in escapes {
        let error = send_list(&socket, &checkpoint_request(filename, open_dir()));
        assert!(error.is_some(), "{filename:?} accepted");
    }
    assert!(!scratch.path("escape").exists() && !Path::new("/tmp/abs").exists());
    // A NUL inside the filename: a string libnv cannot hold.
    let (mut bytes, _) = checkpoint_request(b"aXb", open_dir()).pack();
    let at = bytes.windows(3).position(|w| w == b"aXb").unwrap() + 1;
    bytes[at] = 0;
    assert!(reply_error(&send_with_fds(&socket, &bytes, &[dir.as_raw_fd()])).is_some());
    // The same key twice.
    let mut list = checkpoint_request(b"dup", open_dir());
    list.add_string("cmE", "checkpoint").unwrap();
    let (mut bytes, _) = list.pack();
    let at = bytes.windows(4).rposition(|w| w == b"cmE\0").unwrap();
    bytes[at + 2] = b'd';
    let error = reply_error(&send_with_fds(&socket, &bytes, &[dir.as_raw_fd()]));
    assert!(error.is_some_and(|e| e.contains("duplicate")));
    // `cmd` of every wrong type.
    for value in [
        NvValue::Number(1),
        NvValue::Bool(true),
        NvValue::Null,
        NvValue::Binary(b"checkpoint".to_vec()),
        NvValue::NvList(NvList::new()),
        NvValue::Descriptor(open_dir()),
    ] {
        let mut list = NvList::new();
        list.add("cmd", value).unwrap();
        let error = send_list(&socket, &list);
        assert!(error.is_some_and(|e| e.contains("command")));
    }
    assert!(
        std::fs::read_dir(&snapdir).unwrap().count() <= 1 + written,
        "refused requests left files behind"
    );
    assert_unharmed(&mut vm, &mut expected_counter, &scratch.0, &name);
    assert!(
        !closed_or_answered(&silent),
        "the silent client was given up on first"
    );
    drop(silent);

    // The last well-formed request, after everything: still carried out.
    assert_unharmed(&mut vm, &mut expected_counter, &scratch.0, &name);
    eprintln!("ran for {:?}", started.elapsed());
}
