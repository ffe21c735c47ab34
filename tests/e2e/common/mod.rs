//! End-to-end harness: runs the real `bhyve` binary (or QEMU) with the guest's COM1 on the
//! child's stdin/stdout, collects the output on a reader thread and talks to the guest with
//! `expect` / `send`. The child is always killed when the handle is dropped, so a failing test
//! never leaves a VM behind.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod control;
pub mod disk;
pub mod guest;
pub mod net;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// How long a VM may take to print the guest's ready line. Generous: the machines running the
/// tests are shared and guest kernel mode may be emulated.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a simple command may take to answer.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Root of the source tree.
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bhyve-rs lives one level below the repository root")
}

/// Writes straight to the process's stderr, which libtest does not capture, so that a skip is
/// visible in a normal `cargo test` run.
pub fn notice(message: &str) {
    let test = thread::current().name().unwrap_or("?").to_string();
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {message}");
}

fn env_set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty() && v != "0")
}

/// Whether /dev/kvm can be used. Without it the test is skipped with a visible message, unless
/// `BHYVE_RS_REQUIRE_KVM=1`, in which case the test fails.
pub fn kvm_usable() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(err) if std::env::var("BHYVE_RS_REQUIRE_KVM").as_deref() == Ok("1") => {
            panic!("/dev/kvm cannot be opened ({err}) and BHYVE_RS_REQUIRE_KVM=1")
        }
        Err(err) => {
            notice(&format!("/dev/kvm cannot be opened ({err})"));
            false
        }
    }
}

/// Whether this KVM keeps a TSC value written to a vCPU, as hardware virtualization does by
/// offsetting the TSC; a KVM whose guests read the host's TSC (these machines' kvm_pvm)
/// ignores the write. Asked of KVM directly, not through bhyve-rs. FreeBSD's vmm sets the TSC
/// at restore (VM_RESTORE_TIME).
#[cfg(target_os = "linux")]
pub fn kvm_holds_a_written_tsc() -> bool {
    use kvm_bindings::{kvm_msr_entry, Msrs};
    const MSR_IA32_TSC: u32 = 0x10;
    let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let tsc = |data| {
        Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_IA32_TSC,
            data,
            ..Default::default()
        }])
        .expect("one MSR")
    };
    let read = || {
        let mut msrs = tsc(0);
        vcpu.get_msrs(&mut msrs).expect("read the TSC");
        msrs.as_slice()[0].data
    };
    // Far from the TSC the vCPU has: an older KVM takes a write close to the value it expects
    // as a request to keep the vCPUs in step, and keeps its own.
    let written = read().wrapping_add(1 << 44);
    vcpu.set_msrs(&tsc(written)).expect("write the TSC");
    // Well under a minute of ticks at any TSC rate: the written value, counting on.
    read().wrapping_sub(written) < 1 << 36
}

#[cfg(not(target_os = "linux"))]
pub fn kvm_holds_a_written_tsc() -> bool {
    true
}

/// Path of `qemu-system-x86_64`, if installed. Missing QEMU skips the test with a message,
/// except under CI (`CI` or `BHYVE_RS_REQUIRE_QEMU` set), where `tests/install-deps.sh` should
/// have installed it, so the test fails.
pub fn qemu_binary() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("qemu-system-x86_64"))
            .find(|candidate| candidate.is_file())
    });
    if found.is_none() {
        if env_set("CI") || env_set("BHYVE_RS_REQUIRE_QEMU") {
            panic!("qemu-system-x86_64 not found in PATH (run tests/install-deps.sh)");
        }
        notice("qemu-system-x86_64 not found in PATH");
    }
    found
}

/// A fresh VM name for this process.
pub fn vm_name() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "e2e-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The VM name that ends a command line from [`bhyve_command_with`].
pub fn vm_name_of(cmd: &Command) -> String {
    cmd.get_args()
        .last()
        .and_then(|n| n.to_str())
        .expect("the VM name ends the command line")
        .to_string()
}

/// The machine the console guest runs on in most tests: one vCPU, 256 MiB, host bridge and
/// LPC bridge, as a user would type it.
pub const CONSOLE_MACHINE: [&str; 8] = [
    "-c",
    "1",
    "-m",
    "256M",
    "-s",
    "0,hostbridge",
    "-s",
    "31,lpc",
];

/// This test process's run directory for bhyve's control sockets, so that no test touches the
/// host's /var/run/bhyve (or meets another process's sockets there).
pub fn own_rundir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("run-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("the test run directory");
        writable_by_owner_only(&dir);
        dir
    })
}

/// bhyve refuses a run directory that others can write: a test's run directories are made
/// 0755 whatever the umask.
pub fn writable_by_owner_only(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .expect("chmod the run directory");
}

/// The `bhyve` at `binary`, keeping its control socket in [`own_rundir`]; a later
/// `-o rundir=` on the same command line replaces it.
pub fn bhyve_at(binary: &Path) -> Command {
    let mut cmd = Command::new(binary);
    cmd.arg("-o")
        .arg(format!("rundir={}", own_rundir().display()));
    cmd
}

/// This build's `bhyve`, as [`bhyve_at`] starts it.
pub fn bhyve() -> Command {
    bhyve_at(Path::new(env!("CARGO_BIN_EXE_bhyve")))
}

/// Refuses to start a `bhyve` that would fall back to the host's run directory.
fn check_own_rundir(cmd: &Command) {
    let program = Path::new(cmd.get_program());
    if program.file_name() != Some(std::ffi::OsStr::new("bhyve")) {
        return;
    }
    let has_rundir = cmd
        .get_args()
        .any(|a| a.to_str().is_some_and(|a| a.starts_with("rundir=")));
    assert!(
        has_rundir,
        "{cmd:?} has no -o rundir=: start bhyve with common::bhyve() or common::bhyve_at()"
    );
}

/// `bhyve` command line booting `kernel` with COM1 on stdio, as the tests (and users) run it.
pub fn bhyve_command(kernel: &Path, guest_cmdline: &str) -> Command {
    bhyve_command_with(kernel, guest_cmdline, &[])
}

/// [`bhyve_command`] with more options before the VM name; a later `-c` replaces the default
/// single vCPU.
pub fn bhyve_command_with(kernel: &Path, guest_cmdline: &str, extra: &[&str]) -> Command {
    let mut cmd = bhyve();
    cmd.args(CONSOLE_MACHINE);
    cmd.args(["-l", "com1,stdio"]);
    cmd.arg("-o")
        .arg(format!("boot.kernel={}", kernel.display()));
    if !guest_cmdline.is_empty() {
        cmd.arg("-o").arg(format!("boot.cmdline={guest_cmdline}"));
    }
    cmd.args(extra);
    cmd.arg(vm_name());
    cmd
}

/// `bhyve` (the binary at `bhyve`) booting the console guest with `memory`, COM1 on stdio and its
/// control socket `rundir/name`: the command line of the snapshot tests and benchmarks.
pub fn console_vm_command(bhyve: &Path, memory: &str, rundir: &Path, name: &str) -> Command {
    console_vm_command_with(bhyve, memory, rundir, name, &[])
}

/// [`console_vm_command`] with more options before the VM name; a later `-c` replaces the single
/// vCPU.
pub fn console_vm_command_with(
    bhyve: &Path,
    memory: &str,
    rundir: &Path,
    name: &str,
    extra: &[&str],
) -> Command {
    let mut cmd = Command::new(bhyve);
    cmd.args([
        "-c",
        "1",
        "-m",
        memory,
        "-s",
        "0,hostbridge",
        "-s",
        "31,lpc",
    ]);
    cmd.args(["-l", "com1,stdio"]);
    cmd.arg("-o")
        .arg(format!("boot.kernel={}", guest::console_guest().display()));
    cmd.arg("-o").arg(format!("rundir={}", rundir.display()));
    cmd.args(extra);
    cmd.arg(name);
    cmd
}

/// The console guest's `work` output: the state line, then `cpu <n> apic <id> work <count>`
/// per CPU, returned as (APIC id, count) pairs.
pub fn work_counts(vm: &mut Console) -> Vec<(u32, u64)> {
    let lines = vm.command("work", COMMAND_TIMEOUT);
    lines
        .iter()
        .skip(1)
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            match words[..] {
                ["cpu", _, "apic", apic, "work", n] => (
                    apic.parse().expect("numeric APIC id"),
                    n.parse().expect("numeric count"),
                ),
                _ => panic!("bad work line {l:?} in {lines:?}"),
            }
        })
        .collect()
}

/// QEMU command line booting the same guest through its PVH entry, COM1 on stdio. TCG, not
/// KVM: without hardware virtualization QEMU's KVM mode emulates the firmware's real-mode code
/// instruction by instruction and is far slower.
pub fn qemu_command(qemu: &Path, kernel: &Path, guest_cmdline: &str) -> Command {
    let mut cmd = qemu_command_with(qemu, kernel, guest_cmdline, &[]);
    cmd.arg("-no-reboot");
    cmd
}

/// [`qemu_command`] with more options, and without `-no-reboot`: a guest reset restarts the
/// guest, so only a power-off ends QEMU.
pub fn qemu_command_with(
    qemu: &Path,
    kernel: &Path,
    guest_cmdline: &str,
    extra: &[&str],
) -> Command {
    let mut cmd = Command::new(qemu);
    cmd.args(["-nodefaults", "-no-user-config", "-display", "none"]);
    cmd.args([
        "-accel", "tcg", "-m", "256", "-serial", "stdio", "-monitor", "none",
    ]);
    cmd.arg("-kernel").arg(kernel);
    cmd.arg("-append").arg(guest_cmdline);
    cmd.args(extra);
    cmd
}

/// Boots the console guest under bhyve; `None` (after a skip message) without /dev/kvm.
pub fn boot_bhyve(guest_cmdline: &str) -> Option<Console> {
    boot_bhyve_with(&[], guest_cmdline)
}

/// [`boot_bhyve`] with more `bhyve` options (see [`bhyve_command_with`]).
pub fn boot_bhyve_with(extra: &[&str], guest_cmdline: &str) -> Option<Console> {
    if !kvm_usable() {
        return None;
    }
    let kernel = guest::console_guest();
    let command = bhyve_command_with(kernel, guest_cmdline, extra);
    let mut console = Console::spawn("bhyve", command);
    console.expect(guest::READY, BOOT_TIMEOUT);
    console.expect_prompt(COMMAND_TIMEOUT);
    Some(console)
}

/// Boots the console guest under QEMU; `None` (after a skip message) without QEMU.
pub fn boot_qemu(guest_cmdline: &str) -> Option<Console> {
    let qemu = qemu_binary()?;
    let kernel = guest::console_guest();
    let mut console = Console::spawn("qemu", qemu_command(&qemu, kernel, guest_cmdline));
    console.expect(guest::READY, BOOT_TIMEOUT);
    console.expect_prompt(COMMAND_TIMEOUT);
    Some(console)
}

/// Boots the console guest under QEMU with more options (see [`qemu_command_with`]: a guest
/// reset restarts it); `None` (after a skip message) without QEMU.
pub fn boot_qemu_with(extra: &[&str], guest_cmdline: &str) -> Option<Console> {
    let qemu = qemu_binary()?;
    let kernel = guest::console_guest();
    let command = qemu_command_with(&qemu, kernel, guest_cmdline, extra);
    let mut console = Console::spawn("qemu", command);
    console.expect(guest::READY, BOOT_TIMEOUT);
    console.expect_prompt(COMMAND_TIMEOUT);
    Some(console)
}

#[derive(Default)]
struct Captured {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    stdout_closed: bool,
    stderr_closed: bool,
}

struct Shared {
    captured: Mutex<Captured>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Captured> {
        // A reader thread cannot panic while holding the lock, but stay usable if one did.
        self.captured.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running VM (bhyve or QEMU) whose serial console is the child's stdin/stdout.
pub struct Console {
    label: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
    shared: Arc<Shared>,
    /// Offset in stdout up to which `expect` has consumed the output.
    cursor: usize,
    started: Instant,
    exit: Option<ExitStatus>,
}

fn spawn_reader(mut source: impl Read + Send + 'static, shared: Arc<Shared>, is_stdout: bool) {
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            let n = source.read(&mut buf).unwrap_or(0);
            let mut captured = shared.lock();
            if n == 0 {
                if is_stdout {
                    captured.stdout_closed = true;
                } else {
                    captured.stderr_closed = true;
                }
                shared.changed.notify_all();
                return;
            }
            if is_stdout {
                captured.stdout.extend_from_slice(&buf[..n]);
            } else {
                captured.stderr.extend_from_slice(&buf[..n]);
            }
            shared.changed.notify_all();
        }
    });
}

impl Console {
    /// Starts `cmd` with piped stdin/stdout/stderr.
    pub fn spawn(label: &'static str, mut cmd: Command) -> Console {
        check_own_rundir(&cmd);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|err| panic!("{label}: cannot start {cmd:?}: {err}"));
        let shared = Arc::new(Shared {
            captured: Mutex::new(Captured::default()),
            changed: Condvar::new(),
        });
        if let Some(stdout) = child.stdout.take() {
            spawn_reader(stdout, Arc::clone(&shared), true);
        }
        if let Some(stderr) = child.stderr.take() {
            spawn_reader(stderr, Arc::clone(&shared), false);
        }
        Console {
            label,
            stdin: child.stdin.take(),
            child,
            shared,
            cursor: 0,
            started,
            exit: None,
        }
    }

    /// Time since the process was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Everything the console printed so far, "\r\n" turned into "\n".
    pub fn transcript(&self) -> String {
        normalize(&self.shared.lock().stdout)
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.shared.lock().stderr).into_owned()
    }

    fn failure(&mut self, what: String) -> ! {
        let _ = self.child.kill();
        // Let the readers collect the last words.
        thread::sleep(Duration::from_millis(100));
        let transcript = self.transcript();
        let tail: String = {
            let chars: Vec<char> = transcript.chars().collect();
            chars[chars.len().saturating_sub(4000)..].iter().collect()
        };
        panic!(
            "{}: {what}\n--- console (last 4000 chars) ---\n{tail}\n--- stderr ---\n{}",
            self.label,
            self.stderr()
        );
    }

    /// Waits until `pattern` appears in the output after the cursor; returns the (normalized)
    /// text from the cursor through the pattern and moves the cursor past it. Fails the test on
    /// timeout or when the output ends first.
    pub fn expect(&mut self, pattern: &str, timeout: Duration) -> String {
        match self.try_expect(pattern, timeout) {
            Ok(text) => text,
            Err(why) => self.failure(format!("expecting {pattern:?}: {why}")),
        }
    }

    /// Like [`Console::expect`], but reports failure instead of failing the test.
    pub fn try_expect(&mut self, pattern: &str, timeout: Duration) -> Result<String, String> {
        self.wait_for(timeout, |fresh| {
            fresh.find(pattern).map(|at| at + pattern.len())
        })
    }

    /// Waits until `matcher`, given the normalized output after the cursor, returns the end of
    /// a match; returns the text up to there and moves the cursor past it. The cursor counts
    /// bytes of the normalized transcript, which only ever grows at its end.
    fn wait_for(
        &mut self,
        timeout: Duration,
        matcher: impl Fn(&str) -> Option<usize>,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let mut captured = self.shared.lock();
        loop {
            let text = normalize(&captured.stdout);
            let fresh = text.get(self.cursor..).unwrap_or("");
            if let Some(end) = matcher(fresh) {
                let matched = fresh[..end].to_string();
                self.cursor += end;
                return Ok(matched);
            }
            if captured.stdout_closed {
                return Err("output ended".into());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("timed out after {timeout:?}"));
            }
            captured = self
                .shared
                .changed
                .wait_timeout(captured, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits for the shell prompt at the start of a line; returns the text before it.
    pub fn expect_prompt(&mut self, timeout: Duration) -> String {
        let prompt = guest::PROMPT;
        let found = self.wait_for(timeout, |fresh| {
            if fresh.starts_with(prompt) {
                Some(prompt.len())
            } else {
                fresh
                    .find(&format!("\n{prompt}"))
                    .map(|at| at + 1 + prompt.len())
            }
        });
        match found {
            Ok(text) => text[..text.len() - prompt.len()].to_string(),
            Err(why) => self.failure(format!("expecting the prompt: {why}")),
        }
    }

    /// Sends raw bytes to the guest console.
    pub fn send(&mut self, text: &str) {
        if let Err(err) = self.try_send(text) {
            self.failure(format!("cannot send {text:?}: {err}"));
        }
    }

    /// Like [`Console::send`], but reports failure (e.g. the process has ended) instead of
    /// failing the test.
    pub fn try_send(&mut self, text: &str) -> std::io::Result<()> {
        match self.stdin.as_mut() {
            Some(stdin) => stdin.write_all(text.as_bytes()).and_then(|_| stdin.flush()),
            None => Err(std::io::Error::other("stdin already closed")),
        }
    }

    /// Sends `line` followed by a newline.
    pub fn send_line(&mut self, line: &str) {
        self.send(&format!("{line}\n"));
    }

    /// Runs one shell command: sends it, waits for its echo and the next prompt, and returns
    /// the lines in between (the command's output).
    pub fn command(&mut self, line: &str, timeout: Duration) -> Vec<String> {
        self.send_line(line);
        let echo = format!("{line}\n");
        self.expect(&echo, COMMAND_TIMEOUT);
        self.expect_prompt(timeout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Like [`Console::command`] for commands that print exactly one line.
    pub fn command_line(&mut self, line: &str) -> String {
        let lines = self.command(line, COMMAND_TIMEOUT);
        if lines.len() != 1 {
            self.failure(format!("{line:?} printed {lines:?}, expected one line"));
        }
        lines.into_iter().next().unwrap_or_default()
    }

    /// Waits for the process to exit; fails the test (killing it) on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.try_wait_exit(timeout) {
            Ok(Some(status)) => status,
            Ok(None) => self.failure(format!("still running after {timeout:?}")),
            Err(err) => self.failure(format!("cannot wait for the process: {err}")),
        }
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn try_wait_exit(&mut self, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
        if let Some(status) = self.exit {
            return Ok(Some(status));
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait()? {
                Some(status) => {
                    self.exit = Some(status);
                    // The pipes may still hold the last words: wait until both readers saw
                    // end-of-file (bounded, in case a grandchild inherited a pipe).
                    let until = Instant::now() + Duration::from_secs(5);
                    let drained = |c: &Captured| c.stdout_closed && c.stderr_closed;
                    while !drained(&self.shared.lock()) && Instant::now() < until {
                        thread::sleep(Duration::from_millis(10));
                    }
                    return Ok(Some(status));
                }
                None if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                None => return Ok(None),
            }
        }
    }

    /// Sends SIGKILL and reaps the process; returns how it ended.
    pub fn kill(&mut self) -> std::io::Result<ExitStatus> {
        if self.exit.is_none() {
            self.child.kill()?;
        }
        self.try_wait_exit(Duration::from_secs(10))?
            .ok_or_else(|| std::io::Error::other("still running after SIGKILL"))
    }

    /// The process id of the VM's process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM to the VM's process; false if `kill` could not be run or failed.
    pub fn sigterm(&self) -> bool {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if self.exit.is_some() {
            return;
        }
        // SIGTERM first, so the VM tears down cleanly (terminal, control socket); SIGKILL if it
        // does not go within a moment.
        self.sigterm();
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn normalize(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace("\r\n", "\n")
}

/// Times `ticks <ms>` on the host clock: the guest counts `ms` worth of timer interrupts
/// between two lines.
pub fn timed_ticks(vm: &mut Console, hz: u64, ms: u64) -> Duration {
    vm.send_line(&format!("ticks {ms}"));
    vm.expect(&format!("ticks start hz={hz} ms={ms}\n"), COMMAND_TIMEOUT);
    let start = Instant::now();
    let target = (ms * hz).div_ceil(1000);
    vm.expect(
        &format!("ticks done {target}\n"),
        Duration::from_millis(ms * 3 + 30_000),
    );
    let elapsed = start.elapsed();
    vm.expect_prompt(COMMAND_TIMEOUT);
    elapsed
}

pub fn assert_within_ten_percent(elapsed: Duration, ms: u64) {
    let ms_f = ms as f64;
    let got = elapsed.as_secs_f64() * 1000.0;
    assert!(
        (got - ms_f).abs() <= ms_f * 0.10,
        "{ms} ms of timer ticks took {got:.0} ms of host time"
    );
}

/// Runs a command to completion with a timeout, returning (status, stdout, stderr).
pub fn run_to_exit(cmd: Command, timeout: Duration) -> (ExitStatus, String, String) {
    let mut console = Console::spawn("bhyve", cmd);
    drop(console.stdin.take());
    let status = console.wait_exit(timeout);
    let stdout = console.transcript();
    let stderr = console.stderr();
    (status, stdout, stderr)
}
