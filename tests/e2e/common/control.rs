//! Helpers for tests that talk to a running bhyve over its control socket: a scratch run
//! directory, the bhyvectl of this build, raw exchanges of nvlist bytes.

use super::{guest, repo_root, vm_name, Console, BOOT_TIMEOUT, COMMAND_TIMEOUT};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

/// A scratch directory for control sockets and snapshot files, removed afterwards.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("bhyve-rs-{tag}-{}", vm_name()));
        std::fs::create_dir_all(&dir).expect("create scratch directory");
        // It is bhyve's run directory too, which no one else may write, whatever the umask.
        super::writable_by_owner_only(&dir);
        Scratch(dir)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The bhyvectl of this build, with snapshot support when the tests have it. Cargo builds only
/// this package's binaries for its tests, so a test run on its own builds bhyvectl (a no-op
/// when `make test` has already built the workspace with the same features: building it with
/// others would replace the binary other tests of the run are using).
pub fn bhyvectl() -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let features: &[&str] = if cfg!(feature = "bhyve_snapshot") {
        &["--features", "bhyvectl-rs/bhyve_snapshot"]
    } else {
        &[]
    };
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_bhyve"))
        .parent()
        .expect("bhyve lives in a directory");
    let target_dir = bin_dir
        .parent()
        .expect("the profile directory lives in the target directory");
    let built = BUILT.get_or_init(|| {
        cargo_build(
            &["-p", "bhyvectl-rs", "--bin", "bhyvectl"],
            features,
            target_dir,
        )?;
        Ok(bin_dir.join("bhyvectl"))
    });
    match built {
        Ok(path) => path.clone(),
        Err(why) => panic!("building bhyvectl: {why}"),
    }
}

/// `cargo build --quiet ARGS EXTRA --target-dir DIR` in the repository.
pub fn cargo_build(args: &[&str], extra: &[&str], target_dir: &Path) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(repo_root())
        .args(["build", "--quiet"])
        .args(args)
        .args(extra)
        .arg("--target-dir")
        .arg(target_dir)
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Boot the console guest with its control socket `rundir/name`.
pub fn boot(rundir: &Path, name: &str, memory: &str) -> Console {
    let cmd =
        super::console_vm_command(Path::new(env!("CARGO_BIN_EXE_bhyve")), memory, rundir, name);
    let mut console = Console::spawn("bhyve", cmd);
    console.expect(guest::READY, BOOT_TIMEOUT);
    console.expect_prompt(COMMAND_TIMEOUT);
    console
}

/// Run bhyvectl with `args` against VM `name`; returns (exit code, stderr).
pub fn ctl(rundir: &Path, name: &str, args: &[String]) -> (i32, String) {
    let (status, _, stderr) = ctl_output(rundir, name, args);
    (status, stderr)
}

/// Run bhyvectl with `args` against VM `name`; returns (exit code, stdout, stderr).
pub fn ctl_output(
    rundir: &Path,
    name: &str,
    args: &[impl AsRef<std::ffi::OsStr>],
) -> (i32, String, String) {
    let out = Command::new(bhyvectl())
        .arg(format!("--vm={name}"))
        .arg(format!("--rundir={}", rundir.display()))
        .args(args)
        .output()
        .expect("run bhyvectl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn counter(vm: &mut Console) -> u64 {
    let line = vm.command_line("counter");
    line.strip_prefix("counter ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected counter line {line:?}"))
}

/// What one raw request over the control socket came to.
pub struct Exchanged {
    /// Sending the descriptors (when there were any): a server may close before taking them.
    pub fds_sent: nix::Result<usize>,
    /// The reply, as far as it came.
    pub reply: Vec<u8>,
    /// How reading the reply ended.
    pub read: std::io::Result<usize>,
}

/// Send `bytes`, then one dummy byte per descriptor of `fds` carrying it (SCM_RIGHTS, as libnv
/// does), close the writing side and read the reply.
pub fn send_with_fds(socket: &Path, bytes: &[u8], fds: &[RawFd]) -> Exchanged {
    let mut stream = UnixStream::connect(socket).expect("connect to bhyve");
    stream.write_all(bytes).expect("send request");
    let fds_sent = if fds.is_empty() {
        Ok(0)
    } else {
        let cmsgs: Vec<_> = fds.chunks(1).map(ControlMessage::ScmRights).collect();
        sendmsg::<()>(
            stream.as_raw_fd(),
            &[std::io::IoSlice::new(&[0])],
            &cmsgs,
            MsgFlags::empty(),
            None,
        )
    };
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut reply = Vec::new();
    let read = stream.read_to_end(&mut reply);
    Exchanged {
        fds_sent,
        reply,
        read,
    }
}

/// Send `request` and `nfds` copies of `dir`'s descriptor as libnv does, then read the whole
/// reply; the descriptors must go through.
pub fn exchange(socket: &Path, request: &[u8], nfds: usize, dir: &Path) -> Vec<u8> {
    let dir = std::fs::File::open(dir).expect("open directory");
    let exchanged = send_with_fds(socket, request, &vec![dir.as_raw_fd(); nfds]);
    exchanged.fds_sent.expect("sendmsg");
    exchanged.reply
}

pub fn reply_error(reply: &[u8]) -> Option<String> {
    bhyve::control::nvlist::NvList::unpack(reply, Vec::new())
        .ok()?
        .get_string("error")
        .map(str::to_string)
}

/// How long a checkpoint or suspend may take.
pub const SAVE_TIMEOUT: Duration = Duration::from_secs(60);

/// `bhyvectl --suspend=FILE` against VM `name` (its control socket in `scratch`), which must
/// succeed and end the VM.
pub fn suspend(scratch: &Scratch, name: &str, vm: &mut Console, file: &Path) {
    let (code, err) = ctl(&scratch.0, name, &[format!("--suspend={}", file.display())]);
    assert_eq!(code, 0, "bhyvectl --suspend failed: {err}");
    assert_eq!(vm.wait_exit(SAVE_TIMEOUT).code(), Some(0));
}
