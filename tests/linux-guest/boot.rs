//! End to end with a real Linux: the kernel and initramfs tests/linux-guest/build.sh builds
//! from Debian's linux-source-6.12 (patched and configured so that it runs where KVM emulates
//! guest kernel code) boots to a busybox shell on COM1.
//!
//! Booting takes about a minute here, so it happens once: the first test that needs the guest
//! boots it under this build's `bhyve`, records what the guest reported, suspends it at its shell
//! prompt (`bhyvectl --suspend`) and keeps the snapshot under `CARGO_TARGET_TMPDIR`, keyed by the
//! content of the `bhyve` binary, the kernel, the initramfs and the machine's command line. Every
//! test then starts a guest with `bhyve -r` from that snapshot, in milliseconds. A file lock
//! makes concurrent test processes wait for one boot instead of booting each; a change to any
//! input gives a new key, hence a new boot, so a snapshot never outlives what it was made from.
//!
//! QEMU (KVM, q35, qboot) boots the same image as the oracle for what the guest sees of the
//! machine. devices.rs does the same with a second machine that has every disk and network
//! device, for Linux's own drivers against them. Without the image the tests say so and skip, unless BHYVE_RS_REQUIRE_LINUX_GUEST=1;
//! without /dev/kvm or QEMU they skip as the other end-to-end tests do.

#[path = "../e2e/common/mod.rs"]
mod common;
// Tap interfaces, which every copy of the device machine needs, are Linux's here.
#[cfg(target_os = "linux")]
mod devices;

use common::control::{ctl, Scratch, SAVE_TIMEOUT};
use common::{kvm_usable, notice, qemu_binary, repo_root, Console};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What the guest's /init prints on COM1 before it starts the shell.
const READY: &str = "bhyve-rs linux guest: ready";
/// The shell prompt /init sets.
const PROMPT: &str = "linux# ";
/// The kernel command line, shared with `make demo`: the file says why each option is there.
fn cmdline() -> &'static str {
    include_str!("cmdline")
        .lines()
        .find(|l| !l.starts_with('#') && !l.trim().is_empty())
        .expect("tests/linux-guest/cmdline holds a command line")
}
/// One vCPU: bringing up a second one and keeping it in step (IPIs, TLB shootdowns) runs yet
/// more emulated guest kernel code, and the boot is already the slow part.
const CPUS: &str = "cpus=1,sockets=1,cores=1,threads=1";
const QEMU_SMP: &str = "1,sockets=1,cores=1,threads=1";
const MEMORY_MIB: u64 = 256;
/// About a minute alone, several on a busy shared machine.
const BOOT_LIMIT: Duration = Duration::from_secs(600);
/// A shell command starting a process or two: seconds alone (page faults and system calls run
/// emulated guest kernel code), much longer on a busy shared machine.
const SHELL_LIMIT: Duration = Duration::from_secs(240);
/// The VM name of the booted guest; every restored copy keeps it, each in its own run directory.
const VM_NAME: &str = "linux-guest";
/// The background counter started before the snapshot: its period in milliseconds.
const COUNT_PERIOD_MS: u64 = 200;
/// The file the counter keeps its latest line in.
const COUNT_NOW: &str = "/tmp/count.now";

fn env_set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty() && v != "0")
}

/// The kernel and initramfs build.sh made for the current inputs.
struct Image {
    kernel: PathBuf,
    initramfs: PathBuf,
}

/// The image, if built: `build.sh --locate` never builds, it only says where the files for the
/// current inputs are, or why there are none. Skips with that reason, or fails the test when
/// BHYVE_RS_REQUIRE_LINUX_GUEST=1.
fn image() -> Option<&'static Image> {
    static IMAGE: OnceLock<Result<Image, String>> = OnceLock::new();
    let found = IMAGE.get_or_init(|| {
        let script = repo_root().join("tests/linux-guest/build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg("--locate")
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let value = |key: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(PathBuf::from)
        };
        match (out.status.success(), value("kernel"), value("initramfs")) {
            (true, Some(kernel), Some(initramfs)) => Ok(Image { kernel, initramfs }),
            _ => Err(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        }
    });
    match found {
        Ok(image) => Some(image),
        Err(why) if env_set("BHYVE_RS_REQUIRE_LINUX_GUEST") => {
            panic!("{why} (BHYVE_RS_REQUIRE_LINUX_GUEST=1; run make linux-guest)")
        }
        Err(why) => {
            notice(&format!("{why}; make linux-guest builds it"));
            None
        }
    }
}

fn host_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// sha256 of `bytes` in hex, by sha256sum(1) (coreutils; the tests need no hashing crate).
fn sha256(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sha256sum");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(bytes)
        .expect("feed sha256sum");
    let out = child.wait_with_output().expect("sha256sum output");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_string()
}

/// Runs `command` in the guest's shell and returns what it printed, through the guest's `x`
/// (initramfs/shell-functions.sh): its marker lines are computed by the shell, so the terminal's
/// echo of the typed line never matches them, and the line typed stays short.
fn sh(vm: &mut Console, command: &str) -> String {
    vm.send_line(&format!("x '{}'", command.replace('\'', r"'\''")));
    vm.expect("x-begin-42\n", SHELL_LIMIT);
    let out = vm.expect("x-end-42\n", SHELL_LIMIT);
    out.trim_end_matches("x-end-42\n").to_string()
}

/// What the guest's clock and counter say, read by shell built-ins only (no process started):
/// its uptime, the name of process `pid`, and the counter's latest line.
struct Probe {
    uptime: f64,
    comm: String,
    count: u64,
    /// Host time just before the command was typed and just after its answer.
    sent: Instant,
    answered: Instant,
}

fn probe(vm: &mut Console, pid: u64) -> Probe {
    let sent = Instant::now();
    let out = sh(
        vm,
        &format!(
            "read -r u i </proc/uptime; read -r c </proc/{pid}/comm; read -r w n m <{COUNT_NOW}; \
             echo \"probe $u $c $n\""
        ),
    );
    let answered = Instant::now();
    let words: Vec<&str> = out
        .lines()
        .find_map(|l| l.strip_prefix("probe "))
        .unwrap_or_else(|| panic!("no probe line in {out:?}"))
        .split_whitespace()
        .collect();
    match words[..] {
        [uptime, comm, count] => Probe {
            uptime: uptime
                .parse()
                .unwrap_or_else(|_| panic!("uptime {uptime:?}")),
            comm: comm.to_string(),
            count: count.parse().unwrap_or_else(|_| panic!("count {count:?}")),
            sent,
            answered,
        },
        _ => panic!("bad probe line in {out:?}"),
    }
}

/// One `report` line of the guest (see initramfs/report.c), field by field.
type Report = BTreeMap<String, String>;

fn parse_report(output: &str) -> Report {
    let line = output
        .lines()
        .find(|l| l.starts_with("linux-report "))
        .unwrap_or_else(|| panic!("no linux-report line in {output:?}"));
    line.split_whitespace()
        .skip(1)
        .map(|field| match field.split_once('=') {
            Some((key, value)) => (key.to_string(), value.to_string()),
            None => panic!("report field {field:?} has no value in {line:?}"),
        })
        .collect()
}

fn field<'a>(report: &'a Report, key: &str) -> &'a str {
    report
        .get(key)
        .unwrap_or_else(|| panic!("report without {key}: {report:?}"))
}

fn number(report: &Report, key: &str) -> u64 {
    let value = field(report, key);
    value
        .parse()
        .unwrap_or_else(|_| panic!("report field {key}={value:?} is not a number"))
}

/// The guest booted once under this `bhyve` and suspended at its prompt.
struct Booted {
    snapshot: PathBuf,
    /// The report the guest printed at boot, and the host's clock when it did.
    report: Report,
    report_host_time: u64,
    /// The background `count` process and the last line it had written before the suspend.
    count_pid: u64,
    count_before: u64,
    uptime_before: f64,
}

/// The booted guest's record, `key=value` lines next to the snapshot.
fn read_record(dir: &Path) -> Option<Booted> {
    let text = std::fs::read_to_string(dir.join("boot.txt")).ok()?;
    let snapshot = dir.join("linux.snap");
    if !snapshot.is_file() {
        return None;
    }
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_string)
    };
    Some(Booted {
        snapshot,
        report: parse_report(&get("report")?),
        report_host_time: get("report_host_time")?.parse().ok()?,
        count_pid: get("count_pid")?.parse().ok()?,
        count_before: get("count_before")?.parse().ok()?,
        uptime_before: get("uptime_before")?.parse().ok()?,
    })
}

/// The `bhyve` command line the guest boots with, `devices` added to the platform's.
fn boot_command(image: &Image, rundir: &Path, name: &str, devices: &[String]) -> Command {
    // The later `-o rundir=` replaces the per-process one common::bhyve() starts with.
    let mut cmd = common::bhyve();
    cmd.args(["-c", CPUS, "-m", &format!("{MEMORY_MIB}M"), "-u", "-H"])
        .args(["-s", "0,hostbridge", "-s", "31,lpc", "-l", "com1,stdio"])
        .args(devices)
        .arg("-o")
        .arg(format!("boot.kernel={}", image.kernel.display()))
        .arg("-o")
        .arg(format!("boot.initrd={}", image.initramfs.display()))
        .arg("-o")
        .arg(format!("boot.cmdline={}", cmdline()))
        .arg("-o")
        .arg(format!("rundir={}", rundir.display()))
        .arg(name);
    cmd
}

/// What a snapshot is made from: the `bhyve` binary's content, the image files (whose paths
/// carry build.sh's content hashes) and the machine's command line, `command`, given with
/// placeholders for what differs per boot (the run directory, disk images, tap interfaces).
fn snapshot_key(command: &Command) -> String {
    let bhyve = std::fs::read(env!("CARGO_BIN_EXE_bhyve")).expect("read the bhyve binary");
    let machine: Vec<_> = command
        .get_args()
        .filter(|a| !a.to_string_lossy().starts_with("rundir="))
        .collect();
    let machine = format!("{machine:?}");
    sha256(format!("bhyve {}\n{machine}\n", sha256(&bhyve)).as_bytes())[..16].to_string()
}

/// The booted guest: from the snapshot of an earlier boot with the same key, or booted now.
/// `None` (after saying why) where the guest cannot run here.
fn booted() -> Option<&'static Booted> {
    // A failed boot fails every test that needs it, once: without the Err the other tests
    // would each try to boot again.
    static BOOTED: OnceLock<Result<Booted, String>> = OnceLock::new();
    if !kvm_usable() {
        return None;
    }
    let image = image()?;
    let booted = BOOTED.get_or_init(|| {
        once(|| {
            let command = |rundir: &Path| boot_command(image, rundir, VM_NAME, &[]);
            let dir = boot_and_suspend(VM_NAME, &command(Path::new("RUNDIR")), command, setup);
            read_record(&dir).expect("the record of the boot")
        })
    });
    match booted {
        Ok(booted) => Some(booted),
        Err(why) => panic!("the Linux guest did not boot: {why}"),
    }
}

/// `f`'s value, or the message it panicked with: a failed boot fails every test that needs it,
/// once, where a panic inside a `OnceLock` would leave the others to try again.
fn once<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> Result<T, String> {
    std::panic::catch_unwind(f).map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}

/// The directory holding the snapshot `machine` left at its prompt (`linux.snap`) and the
/// `key=value` record (`boot.txt`) that `setup` returned after the boot: from an earlier run
/// with the same key (`placeholder` is the boot command with placeholders for what differs per
/// boot), or booted now with `command(directory)`, which keeps what the boot needs on the host
/// in that directory.
fn boot_and_suspend(
    machine: &str,
    placeholder: &Command,
    command: impl FnOnce(&Path) -> Command,
    setup: impl FnOnce(&mut Console) -> String,
) -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("linux-guest")
        .join(machine);
    std::fs::create_dir_all(&root).expect("create the snapshot directory");
    let key = snapshot_key(placeholder);
    let dir = root.join(&key);
    let lock_file = std::fs::File::create(root.join("lock")).expect("create the lock file");
    // Held until the snapshot exists: other test processes wait for this boot.
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("lock {}: {e}", root.display()));
    if dir.join("boot.txt").is_file() && dir.join("linux.snap").is_file() {
        return dir;
    }
    // Snapshots of other binaries or images (and what a killed boot left) only take space.
    if let Ok(entries) = std::fs::read_dir(&root) {
        for entry in entries.flatten() {
            if entry.path().is_dir() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let partial = root.join(format!("{key}.partial"));
    std::fs::create_dir_all(&partial).expect("create the snapshot directory");
    common::writable_by_owner_only(&partial);

    let started = Instant::now();
    let mut vm = Console::spawn("bhyve (linux boot)", command(&partial));
    vm.expect(READY, BOOT_LIMIT);
    vm.expect(PROMPT, SHELL_LIMIT);
    let boot_time = started.elapsed();
    let record = setup(&mut vm);

    let snapshot = partial.join("linux.snap");
    let suspend_started = Instant::now();
    let (code, err) = ctl(
        &partial,
        machine,
        &[format!("--suspend={}", snapshot.display())],
    );
    assert_eq!(code, 0, "bhyvectl --suspend failed: {err}");
    let status = vm.wait_exit(SAVE_TIMEOUT);
    assert_eq!(status.code(), Some(0), "bhyve after --suspend: {status}");
    eprintln!(
        "linux guest ({machine}): booted to its prompt in {:.1} s, suspended in {:.2} s \
         ({} MiB on disk)",
        boot_time.as_secs_f64(),
        suspend_started.elapsed().as_secs_f64(),
        std::fs::metadata(&snapshot).map_or(0, |m| {
            use std::os::unix::fs::MetadataExt;
            (m.blocks() * 512) >> 20
        })
    );
    let record = format!("{record}boot_seconds={:.1}\n", boot_time.as_secs_f64());
    std::fs::write(partial.join("boot.txt"), record).expect("write the boot record");
    std::fs::rename(&partial, &dir).expect("publish the snapshot");
    dir
}

/// The base guest's setup before its snapshot: its report, and the counter every restored copy
/// finds running.
fn setup(vm: &mut Console) -> String {
    let report = sh(vm, "report");
    let report_host_time = host_seconds();
    parse_report(&report);
    // A process with a timer, running across every snapshot restored from this one.
    let pid = sh(
        vm,
        &format!("count {COUNT_PERIOD_MS} {COUNT_NOW} >/tmp/count.log & echo pid=$!"),
    );
    let count_pid = pid
        .lines()
        .find_map(|l| l.trim().strip_prefix("pid="))
        .and_then(|p| p.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no pid from {pid:?}"));
    // Let it write a few lines, so the snapshot holds a counter already under way.
    std::thread::sleep(Duration::from_millis(5 * COUNT_PERIOD_MS));
    let state = probe(vm, count_pid);
    assert_eq!(state.comm, "count");
    format!(
        "report={}\nreport_host_time={report_host_time}\ncount_pid={count_pid}\n\
         count_before={}\nuptime_before={}\n",
        report.trim(),
        state.count,
        state.uptime
    )
}

/// A guest restored from a boot snapshot, with its own run directory.
struct Linux {
    vm: Console,
    scratch: Scratch,
    name: &'static str,
}

impl Linux {
    fn ctl(&self, args: &[String]) -> (i32, String) {
        ctl(&self.scratch.0, self.name, args)
    }

    fn checkpoint(&self, file: &Path) {
        let (code, err) = self.ctl(&[format!("--checkpoint={}", file.display())]);
        assert_eq!(code, 0, "bhyvectl --checkpoint failed: {err}");
    }

    fn suspend(mut self, file: &Path) -> Scratch {
        let (code, err) = self.ctl(&[format!("--suspend={}", file.display())]);
        assert_eq!(code, 0, "bhyvectl --suspend failed: {err}");
        let status = self.vm.wait_exit(SAVE_TIMEOUT);
        assert_eq!(status.code(), Some(0), "bhyve after --suspend: {status}");
        self.scratch
    }
}

/// `bhyve -r file` with its own run directory; the guest answers a shell command before this
/// returns.
fn restore_from(file: &Path, scratch: Scratch) -> Linux {
    let mut cmd = common::bhyve();
    cmd.arg("-r")
        .arg(file)
        .arg("-o")
        .arg(format!("rundir={}", scratch.0.display()));
    restore_with(cmd, file, scratch, VM_NAME)
}

/// Starts `cmd`, a restore of `file` into `scratch`, and waits for the guest to answer.
fn restore_with(cmd: Command, file: &Path, scratch: Scratch, name: &'static str) -> Linux {
    let started = Instant::now();
    let mut vm = Console::spawn("bhyve -r (linux)", cmd);
    let answer = sh(&mut vm, "echo restored-$((1+1))");
    assert!(answer.contains("restored-2"), "{answer:?}");
    eprintln!(
        "linux guest: restored from {} and answering in {:.2} s",
        file.display(),
        started.elapsed().as_secs_f64()
    );
    Linux { vm, scratch, name }
}

/// A fresh copy of the booted guest; `None` where it cannot run here.
fn restore() -> Option<(Linux, &'static Booted)> {
    let booted = booted()?;
    let linux = restore_from(&booted.snapshot, Scratch::new("linux"));
    Some((linux, booted))
}

/// (n, monotonic ms) of the `count` lines in `text`.
fn count_lines(text: &str) -> Vec<(u64, u64)> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some("count"), Some(n), Some(ms)) => Some((n.parse().ok()?, ms.parse().ok()?)),
                _ => None,
            }
        })
        .collect()
}

#[test]
fn restored_linux_keeps_its_processes_timers_and_console() {
    let Some((mut linux, booted)) = restore() else {
        return;
    };
    let vm = &mut linux.vm;
    // The counter started before the snapshot is the same process, still counting.
    let first = probe(vm, booted.count_pid);
    assert_eq!(
        first.comm, "count",
        "process {} is not the counter",
        booted.count_pid
    );
    assert!(
        first.uptime >= booted.uptime_before,
        "uptime went back: {} before the snapshot, {} after the restore",
        booted.uptime_before,
        first.uptime
    );
    assert!(
        first.count > booted.count_before,
        "the counter stood at {} at the snapshot and at {} after the restore",
        booted.count_before,
        first.count
    );
    std::thread::sleep(Duration::from_secs(3));
    let second = probe(vm, booted.count_pid);
    // The guest's clock and its timer run at the host's pace after the restore: the guest
    // read its uptime somewhere between typing and answer of each probe.
    let shortest = second.sent.duration_since(first.answered).as_secs_f64();
    let longest = second.answered.duration_since(first.sent).as_secs_f64();
    let advanced = second.uptime - first.uptime;
    assert!(
        advanced > shortest - 0.5 && advanced < longest + 0.5,
        "uptime advanced {advanced:.2} s while the host waited {shortest:.2} to {longest:.2} s"
    );
    let ticks = (second.count - first.count) as f64;
    let period = COUNT_PERIOD_MS as f64 / 1000.0;
    assert!(
        ticks > (shortest / period - 2.0) * 0.7 && ticks < longest / period + 2.0,
        "the counter advanced {ticks} times in {shortest:.2} to {longest:.2} s of {period} s"
    );

    // The whole log, from boot through the restore: no restart, no gap, and the guest's
    // monotonic clock never went back (it may jump by the time the guest spent suspended).
    let counts = count_lines(&sh(vm, "cat /tmp/count.log"));
    let numbers: Vec<u64> = counts.iter().map(|&(n, _)| n).collect();
    let expected: Vec<u64> = (1..=numbers.len() as u64).collect();
    assert_eq!(numbers, expected, "the counter restarted or skipped");
    assert!(numbers.len() as u64 >= second.count);
    assert!(
        counts.windows(2).all(|w| w[0].1 <= w[1].1),
        "monotonic time went back: {counts:?}"
    );
    // The console carried a program's output (cat above), and the guest did not boot again.
    assert!(
        !vm.transcript().contains(READY),
        "the restored guest booted again"
    );
}

/// Host-side `churn`: the sum after each of `rounds` rounds over `mib` MiB (see
/// initramfs/churn.c).
fn churn_sums(mib: u64, rounds: u64) -> Vec<u64> {
    let mut words = vec![0u64; (mib << 17) as usize];
    (1..=rounds)
        .map(|round| {
            let mut sum = 14_695_981_039_346_656_037u64;
            for (i, w) in words.iter_mut().enumerate() {
                *w = w
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(round << 32 | i as u64);
                sum = (sum ^ *w).wrapping_mul(1_099_511_628_211);
            }
            sum
        })
        .collect()
}

/// Small: every page the guest touches first costs a page fault in emulated kernel code.
const CHURN_MIB: u64 = 1;
/// The file churn keeps its latest line in.
const CHURN_NOW: &str = "/tmp/churn.now";

/// (round, sum) of the `churn` lines in `text`.
fn churn_lines(text: &str) -> Vec<(u64, u64)> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some("churn"), Some(r), Some(s)) => {
                    Some((r.parse().ok()?, u64::from_str_radix(s, 16).ok()?))
                }
                _ => None,
            }
        })
        .collect()
}

/// Polls `file`, whose first line a guest program rewrites in place as "WORD N ..." with N
/// growing, with shell built-ins until N passes `beyond`; returns N.
fn latest_beyond(vm: &mut Console, file: &str, beyond: u64, what: &str) -> u64 {
    let deadline = Instant::now() + SHELL_LIMIT;
    loop {
        let out = sh(vm, &format!("read -r w n rest <{file}; echo \"latest $n\""));
        let now = out
            .lines()
            .find_map(|l| l.strip_prefix("latest "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if now > beyond {
            return now;
        }
        assert!(Instant::now() < deadline, "{what}: {file} stuck at {now}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Waits until the guest's churn goes beyond round `beyond` (polling its latest line with shell
/// built-ins), then checks its whole log: rounds 1, 2, 3... with the sums the host computes.
/// Returns the last round.
fn churn_beyond(vm: &mut Console, beyond: u64, what: &str) -> u64 {
    latest_beyond(vm, CHURN_NOW, beyond, what);
    let rounds = churn_lines(&sh(vm, "cat /tmp/churn.log"));
    let last = rounds.last().map_or(0, |&(r, _)| r);
    let expected: Vec<(u64, u64)> = (1..).zip(churn_sums(CHURN_MIB, last)).collect();
    assert_eq!(rounds, expected, "{what}: churn rounds or sums wrong");
    last
}

#[test]
fn a_second_checkpoint_and_restore_of_the_running_linux_keeps_its_counter_and_checksum() {
    let Some((mut linux, booted)) = restore() else {
        return;
    };
    let files = Scratch::new("linux-second");
    sh(
        &mut linux.vm,
        &format!("churn {CHURN_MIB} 100 {CHURN_NOW} >/tmp/churn.log &"),
    );
    let before = churn_beyond(&mut linux.vm, 1, "before the checkpoint");

    // A live checkpoint of the running guest: it carries on.
    let live = files.path("live.snap");
    let started = Instant::now();
    linux.checkpoint(&live);
    eprintln!(
        "linux guest: live checkpoint in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let count_after_checkpoint = probe(&mut linux.vm, booted.count_pid).count;
    let after_checkpoint = churn_beyond(&mut linux.vm, before, "after the checkpoint");

    // Suspend and restore: the counter and the checksums go on from where they stopped.
    let suspended = files.path("suspended.snap");
    let scratch = linux.suspend(&suspended);
    let mut resumed = restore_from(&suspended, scratch);
    churn_beyond(
        &mut resumed.vm,
        after_checkpoint,
        "after suspend and restore",
    );
    let count_resumed = probe(&mut resumed.vm, booted.count_pid).count;
    assert!(
        count_resumed > count_after_checkpoint,
        "the counter went from {count_after_checkpoint} to {count_resumed}"
    );

    // The live checkpoint restores too, to the moment it was taken: churn goes on from a round
    // at or after `before`, with the right sums.
    let mut from_live = restore_from(&live, Scratch::new("linux-live"));
    churn_beyond(
        &mut from_live.vm,
        before,
        "restored from the live checkpoint",
    );
    let count_live = probe(&mut from_live.vm, booted.count_pid).count;
    assert!(
        count_live > booted.count_before,
        "the counter of the live checkpoint's copy stands at {count_live}"
    );
}

/// The ACPI tables only QEMU's q35 machine provides: WAET (Windows ACPI Emulated Devices
/// Table) tells Windows its RTC and ACPI PM timer need no workarounds; bhyve has none.
const QEMU_ONLY_ACPI_TABLES: &[&str] = &["WAET"];
/// The ACPI tables only bhyve provides: SPCR names the serial console for the firmware and the
/// OS (FreeBSD's bhyve writes one for COM1); QEMU's x86 machines have none.
const BHYVE_ONLY_ACPI_TABLES: &[&str] = &["SPCR"];
/// PCI functions of QEMU's q35 (ICH9) built in at slot 0x1f: the AHCI controller (function 2)
/// and the SMBus controller (function 3). bhyve's LPC bridge has neither.
const QEMU_ONLY_PCI_FUNCTIONS: &[&str] = &["0000:00:1f.2", "0000:00:1f.3"];

/// Boots the image under QEMU with KVM (q35, qboot, as the doc on the Linux guest measured) and
/// returns its report and the host's time when it printed it.
fn qemu_report(image: &Image) -> Option<(Report, u64)> {
    let qemu = qemu_binary()?;
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display",
        "none",
    ])
    .args([
        "-accel",
        "kvm",
        "-M",
        "q35",
        "-bios",
        "/usr/share/qemu/qboot.rom",
    ])
    // The host's CPU, as bhyve passes it through: QEMU's default model is an AMD one without
    // XSAVEERPTR, for which Linux restores FPU state through FNCLEX/EMMS/FILD (the FXSAVE leak
    // workaround), instructions the emulated guest ring 0 lacks. Without arch-capabilities:
    // QEMU aborts on that MSR with this KVM. Without kvmclock: bhyve offers no paravirtual
    // clock, so the guest must pick its clock source from the same hardware under both.
    .args(["-cpu", "host,-arch-capabilities,kvmclock=off"])
    .args(["-smp", QEMU_SMP, "-m", &MEMORY_MIB.to_string()])
    .args(["-rtc", "base=utc", "-serial", "stdio", "-monitor", "none"])
    .arg("-kernel")
    .arg(&image.kernel)
    .arg("-initrd")
    .arg(&image.initramfs)
    .args(["-append", cmdline()]);
    let started = Instant::now();
    let mut vm = Console::spawn("qemu (linux)", cmd);
    vm.expect(READY, BOOT_LIMIT);
    vm.expect(PROMPT, SHELL_LIMIT);
    eprintln!(
        "linux guest: booted under QEMU in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let report = parse_report(&sh(&mut vm, "report"));
    let host_time = host_seconds();
    vm.send_line("poweroff -f");
    let status = vm.wait_exit(SHELL_LIMIT);
    assert!(status.success(), "QEMU after poweroff: {status}");
    Some((report, host_time))
}

fn list<'a>(report: &'a Report, key: &str) -> Vec<&'a str> {
    field(report, key).split(',').collect()
}

/// PCI functions as (address, class), without vendor and device IDs.
fn pci_classes(report: &Report) -> BTreeMap<String, String> {
    list(report, "pci")
        .into_iter()
        .map(|f| {
            let (address, ids) = f.split_once('=').unwrap_or((f, ""));
            let class = ids.rsplit(':').next().unwrap_or("");
            (address.to_string(), class.to_string())
        })
        .collect()
}

/// The guest's clocks must read the host's time, within `slack` seconds.
fn check_clocks(report: &Report, host_time: u64, who: &str) {
    for clock in ["rtc", "clock"] {
        let value = number(report, clock);
        assert!(
            value.abs_diff(host_time) <= 5,
            "{who}: {clock}={value}, the host said {host_time}"
        );
    }
}

#[test]
fn linux_sees_the_same_machine_under_bhyve_and_qemu() {
    if !kvm_usable() {
        return;
    }
    let Some(image) = image() else {
        return;
    };
    // One boot at a time: each keeps a host CPU busy for a minute or more.
    let Some(booted) = booted() else {
        return;
    };
    let Some((qemu, qemu_time)) = qemu_report(image) else {
        return;
    };
    let bhyve = &booted.report;
    eprintln!("bhyve-rs: {bhyve:?}\nqemu:     {qemu:?}");
    assert_eq!(
        bhyve.keys().collect::<Vec<_>>(),
        qemu.keys().collect::<Vec<_>>(),
        "report fields"
    );
    for same in [
        "kernel",
        "cpus",
        "topology",
        "console",
        "uart",
        "clocksource",
    ] {
        assert_eq!(field(bhyve, same), field(&qemu, same), "{same}");
    }
    assert_eq!(field(bhyve, "cpus"), "1");
    assert_eq!(field(bhyve, "console"), "ttyS0");
    assert_eq!(field(bhyve, "uart"), "0x3F8/4");

    // Firmware and chipset reserve different amounts of memory: within 2 % of each other and
    // of what the command lines asked for.
    let asked_kb = MEMORY_MIB * 1024;
    for (who, report) in [("bhyve-rs", bhyve), ("qemu", &qemu)] {
        let kb = number(report, "mem_kb");
        assert!(
            kb <= asked_kb && kb >= asked_kb * 80 / 100,
            "{who}: MemTotal {kb} kB of {asked_kb} kB"
        );
    }
    let (a, b) = (number(bhyve, "mem_kb"), number(&qemu, "mem_kb"));
    assert!(
        a.abs_diff(b) <= asked_kb / 50,
        "MemTotal {a} kB under bhyve-rs, {b} kB under QEMU"
    );

    let tables = |report: &Report, only: &[&str]| -> Vec<String> {
        let all = list(report, "acpi");
        for table in only {
            assert!(all.contains(table), "no {table} in {all:?}");
        }
        all.into_iter()
            .filter(|t| !only.contains(t))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        tables(bhyve, BHYVE_ONLY_ACPI_TABLES),
        tables(&qemu, QEMU_ONLY_ACPI_TABLES),
        "ACPI tables"
    );

    // Vendor and device IDs differ by design (bhyve's host bridge is 1275:1275 and its LPC
    // bridge a PIIX3's 8086:7000; q35 has an ICH9's 8086:29c0 and 8086:2918); addresses and
    // classes must not.
    let mut qemu_pci = pci_classes(&qemu);
    for extra in QEMU_ONLY_PCI_FUNCTIONS {
        assert!(qemu_pci.remove(*extra).is_some(), "q35 without {extra}?");
    }
    assert_eq!(pci_classes(bhyve), qemu_pci, "PCI functions and classes");

    check_clocks(bhyve, booted.report_host_time, "bhyve-rs");
    check_clocks(&qemu, qemu_time, "qemu");
}

#[test]
fn restored_linux_reports_the_machine_it_booted_on() {
    let Some((mut linux, booted)) = restore() else {
        return;
    };
    let report = parse_report(&sh(&mut linux.vm, "report"));
    let host_time = host_seconds();
    for (key, value) in &booted.report {
        if key != "rtc" && key != "clock" {
            assert_eq!(
                field(&report, key),
                value,
                "{key} changed across the restore"
            );
        }
    }
    // Neither clock goes back across the restore, nor runs ahead of the host.
    for clock in ["rtc", "clock"] {
        let (then, now) = (number(&booted.report, clock), number(&report, clock));
        assert!(
            then <= now && now <= host_time + 2,
            "{clock}: {then} at boot, {now} after the restore, host {host_time}"
        );
    }
    // And they agree: the CMOS clock moves on across the restore exactly when the guest's TSC
    // clock does (a KVM that cannot set the TSC), or neither does.
    let (rtc, clock) = (number(&report, "rtc"), number(&report, "clock"));
    assert!(
        rtc.abs_diff(clock) <= 2,
        "after the restore the RTC reads {rtc}, the system clock {clock}"
    );
}

#[test]
fn build_says_why_when_the_image_is_not_built() {
    let empty = Scratch::new("linux-cache");
    let out = Command::new("bash")
        .arg(repo_root().join("tests/linux-guest/build.sh"))
        .arg("--locate")
        .env("BHYVE_RS_LINUX_GUEST_CACHE", &empty.0)
        .output()
        .expect("run build.sh --locate");
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("linux guest not built: "), "{err}");
}
