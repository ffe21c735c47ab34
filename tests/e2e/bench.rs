//! `make bench`: snapshot figures measured through the real binaries on the console test guest,
//! printed as a table (and kept in target/bench/snapshot.txt), and device throughput (see
//! bench/devices.rs, kept in target/bench/devices.txt). Nothing here passes or fails on speed;
//! the benchmarks are ignored tests so that `make test` never runs them (it runs a short smoke
//! run of the device benchmark).
//!
//! For 1 GiB and 4 GiB guests with about 1 %, 25 % and 75 % (62 % at 4 GiB) of their memory
//! filled by the guest
//! (`memfill`), bhyve-rs and QEMU with KVM in turn:
//! * save: wall time of `bhyvectl --checkpoint` on a guest that is counting (QEMU: the total
//!   time it reports for a live migration to a file, `migrate exec:cat>FILE`, unthrottled;
//!   QEMU's `savevm` needs a qcow2 disk this guest does not have), and the touched memory
//!   divided by it;
//! * stall: the longest gap between two of the guest's `count` lines (printed every 100 ms)
//!   around the checkpoint, less 100 ms: how long the guest stood still, seen from inside;
//! * stop: how long the VMM says it stopped the guest (bhyve's log, QEMU's downtime);
//! * suspend: stopping the guest and leaving a durable file to restore from
//!   (`bhyvectl --suspend`; QEMU: `stop`, the migration, and an fsync of its file);
//! * file: apparent size and space allocated on disk;
//! * restore: from starting `bhyve -r` to the guest's answer to a command typed at once, with
//!   RAM mapped (default) and copied (`snapshot.restore=copy`); the file is read from where the
//!   save left it (bhyve-rs writes guest memory past the page cache);
//!   QEMU: `-incoming exec:cat FILE` to the first answer.
//!
//! Then the ratios bhyve-rs / QEMU KVM, where each bhyve-rs suspend spent its time (its debug
//! log), and one QEMU TCG row for reference. `BHYVE_RS_BENCH_SIZES=1024:768,4096:2560` measures
//! only the configurations named (guest MiB:touched MiB) and leaves the TCG row out.

#[path = "common/mod.rs"]
mod common;
#[path = "bench/devices.rs"]
mod devices;

use common::guest;
use common::{
    console_vm_command, console_vm_command_with, kvm_usable, qemu_binary, repo_root, vm_name,
    Console, BOOT_TIMEOUT, COMMAND_TIMEOUT,
};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(300);

struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("bhyve-rs-bench-{}", vm_name()));
        std::fs::create_dir_all(&dir).expect("create scratch directory");
        common::writable_by_owner_only(&dir);
        Scratch(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One measured configuration.
struct Row {
    vmm: &'static str,
    memory_mib: u64,
    touched_mib: u64,
    save: Duration,
    stall: Duration,
    /// How long the VMM itself says the guest was stopped during the checkpoint (bhyve's log,
    /// QEMU's reported downtime).
    stop: Duration,
    /// Stopping the guest and writing a durable file it can be restored from: `bhyvectl
    /// --suspend`; for QEMU, `stop`, the migration and an fsync of its file.
    suspend: Duration,
    /// The same without making the file durable (QEMU only: bhyve-rs always fsyncs).
    suspend_volatile: Option<Duration>,
    /// bhyve-rs's own account of where the suspend's time went (its debug log).
    phases: Vec<String>,
    apparent: u64,
    allocated: u64,
    /// (what, time to the first answer)
    restores: Vec<(&'static str, Duration)>,
}

fn bhyvectl() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_bhyve")).with_file_name("bhyvectl")
}

fn file_sizes(path: &Path) -> (u64, u64) {
    let meta = std::fs::metadata(path).expect("snapshot file");
    (meta.len(), meta.blocks() * 512)
}

/// While `busy` runs, follows the guest's `count` lines from `next` on and records when each
/// arrives; returns the longest gap between two lines once `busy` is done and a few more lines
/// came, less the 100 ms the guest waits between lines.
fn stall_while(vm: &mut Console, mut next: u64, busy: impl FnOnce() + Send) -> Duration {
    std::thread::scope(|scope| {
        let worker = scope.spawn(busy);
        let mut arrivals = vec![Instant::now()];
        let mut after_done = 0;
        while after_done < 5 {
            vm.expect(&format!("count {next}\n"), LONG);
            arrivals.push(Instant::now());
            next += 1;
            if worker.is_finished() {
                after_done += 1;
            }
        }
        let _ = worker.join();
        let longest = arrivals
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        longest.saturating_sub(Duration::from_millis(100))
    })
}

fn last_count(vm: &Console) -> u64 {
    vm.transcript()
        .lines()
        .filter_map(|l| l.strip_prefix("count ")?.parse().ok())
        .max()
        .unwrap_or(0)
}

fn stop_count(vm: &mut Console) {
    vm.send("\n");
    vm.expect("count stopped\n", COMMAND_TIMEOUT);
    vm.expect_prompt(COMMAND_TIMEOUT);
}

/// Time from starting `cmd` to the guest's answer to `counter`, typed as soon as it started and
/// again every 100 ms until an answer comes (QEMU drops input that arrives while it is still
/// loading the migration stream).
fn first_answer(label: &'static str, cmd: Command) -> Duration {
    let started = Instant::now();
    let mut vm = Console::spawn(label, cmd);
    loop {
        vm.send_line("counter");
        if vm
            .try_expect("\ncounter ", Duration::from_millis(100))
            .is_ok()
        {
            break;
        }
        assert!(started.elapsed() < LONG, "{label}: no answer");
    }
    started.elapsed()
}

fn bhyve_row(scratch: &Scratch, memory_mib: u64, touched_mib: u64) -> Row {
    let name = vm_name();
    let mut cmd = console_vm_command(
        Path::new(env!("CARGO_BIN_EXE_bhyve")),
        &format!("{memory_mib}M"),
        &scratch.0,
        &name,
    );
    cmd.env("BHYVE_LOG", "debug");
    let mut vm = Console::spawn("bhyve", cmd);
    vm.expect(guest::READY, BOOT_TIMEOUT);
    vm.expect_prompt(COMMAND_TIMEOUT);
    vm.command(&format!("memfill {touched_mib} 7"), LONG);

    vm.send_line("count");
    vm.expect("count 5\n", COMMAND_TIMEOUT);
    let checkpoint = scratch.path("bench.ckp");
    let ctl = |args: Vec<String>| {
        let out = Command::new(bhyvectl())
            .arg(format!("--vm={name}"))
            .arg(format!("--rundir={}", scratch.0.display()))
            .args(args)
            .output()
            .expect("run bhyvectl");
        assert!(
            out.status.success(),
            "bhyvectl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let mut save = Duration::ZERO;
    let next = last_count(&vm) + 1;
    let stall = stall_while(&mut vm, next, || {
        let started = Instant::now();
        ctl(vec![format!("--checkpoint={}", checkpoint.display())]);
        save = started.elapsed();
    });
    let (apparent, allocated) = file_sizes(&checkpoint);
    std::fs::remove_file(&checkpoint).expect("remove checkpoint");
    stop_count(&mut vm);
    let stop = vm
        .stderr()
        .lines()
        .find_map(|l| {
            let rest = l.split("guest stopped for ").nth(1)?;
            rest.split(' ').next()?.parse::<f64>().ok()
        })
        .map(|ms| Duration::from_secs_f64(ms / 1e3))
        .unwrap_or_default();

    let file = scratch.path("bench.snap");
    let started = Instant::now();
    let logged_before = vm.stderr().len();
    ctl(vec![format!("--suspend={}", file.display())]);
    let suspend = started.elapsed();
    vm.wait_exit(LONG);
    let phases = vm.stderr()[logged_before..]
        .lines()
        .filter(|l| l.contains(" ms"))
        .map(|l| l.split_once(": ").map_or(l, |(_, rest)| rest).to_string())
        .collect();

    let mut restores = Vec::new();
    for (what, extra) in [("mapped", None), ("copied", Some("snapshot.restore=copy"))] {
        let mut cmd = common::bhyve();
        cmd.arg("-r").arg(&file);
        cmd.arg("-o").arg(format!("rundir={}", scratch.0.display()));
        if let Some(option) = extra {
            cmd.args(["-o", option]);
        }
        restores.push((what, first_answer("bhyve -r", cmd)));
    }
    std::fs::remove_file(&file).expect("remove snapshot");
    Row {
        vmm: "bhyve-rs",
        memory_mib,
        touched_mib,
        save,
        stall,
        stop,
        suspend,
        suspend_volatile: None,
        phases,
        apparent,
        allocated,
        restores,
    }
}

/// QEMU's human monitor on a UNIX socket.
struct Monitor(UnixStream);

impl Monitor {
    fn connect(path: &Path) -> Monitor {
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => {
                    let mut monitor = Monitor(stream);
                    monitor.until_prompt();
                    return monitor;
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("QEMU monitor {}: {e}", path.display()),
            }
        }
    }

    fn until_prompt(&mut self) -> String {
        let mut text = Vec::new();
        let mut buf = [0u8; 4096];
        while !text.ends_with(b"(qemu) ") {
            let n = self.0.read(&mut buf).expect("read QEMU monitor");
            assert!(n > 0, "QEMU monitor closed");
            text.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&text).into_owned()
    }

    fn run(&mut self, command: &str) -> String {
        self.0
            .write_all(format!("{command}\n").as_bytes())
            .expect("write QEMU monitor");
        self.until_prompt()
    }

    /// Start a migration into `file` and wait for it; returns (total time, downtime) as QEMU
    /// reports them.
    fn migrate_to(&mut self, file: &Path) -> (Duration, Duration) {
        self.run(&format!("migrate -d \"exec:cat > {}\"", file.display()));
        let deadline = Instant::now() + LONG;
        loop {
            let info = self.run("info migrate");
            if info.contains("Migration status: completed") {
                let ms = |key: &str| {
                    info.lines()
                        .find_map(|l| l.trim().strip_prefix(key)?.split_whitespace().next())
                        .and_then(|n| n.parse::<u64>().ok())
                        .map(Duration::from_millis)
                        .unwrap_or_default()
                };
                return (ms("total time:"), ms("downtime:"));
            }
            assert!(
                !info.contains("Migration status: failed"),
                "QEMU migration failed: {info}"
            );
            assert!(Instant::now() < deadline, "QEMU migration did not end");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// QEMU's accelerators, as the bench names them.
#[derive(Clone, Copy, PartialEq)]
enum Accel {
    Kvm,
    Tcg,
}

/// The console guest under QEMU with accelerator `accel` ("kvm" or "tcg") and `extra` options.
fn qemu_args(qemu: &Path, accel: &str, extra: &[String]) -> Command {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let base = common::qemu_command_with(qemu, guest::console_guest(), "", &extra);
    let mut cmd = Command::new(base.get_program());
    cmd.args(base.get_args().map(|a| {
        if a == "tcg" {
            std::ffi::OsStr::new(accel)
        } else {
            a
        }
    }));
    cmd.arg("-no-reboot");
    cmd
}

/// The console guest under this build's bhyve with `extra` options, its control socket in
/// `scratch`.
fn bhyve_args(scratch: &Scratch, extra: &[String]) -> Command {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    console_vm_command_with(
        Path::new(env!("CARGO_BIN_EXE_bhyve")),
        "256M",
        &scratch.0,
        &vm_name(),
        &extra,
    )
}

fn qemu_command(qemu: &Path, memory_mib: u64, monitor: &Path, accel: Accel) -> Command {
    let name = match accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
    };
    let mut cmd = qemu_args(qemu, name, &[]);
    cmd.args(["-m", &memory_mib.to_string()]);
    cmd.arg("-monitor")
        .arg(format!("unix:{},server=on,wait=off", monitor.display()));
    cmd
}

fn qemu_row(
    qemu: &Path,
    scratch: &Scratch,
    memory_mib: u64,
    touched_mib: u64,
    accel: Accel,
) -> Row {
    let monitor_path = scratch.path("qemu.mon");
    let mut vm = Console::spawn("qemu", qemu_command(qemu, memory_mib, &monitor_path, accel));
    vm.expect(guest::READY, BOOT_TIMEOUT);
    vm.expect_prompt(COMMAND_TIMEOUT);
    let mut monitor = Monitor::connect(&monitor_path);
    // QEMU throttles a migration to 128 MiB/s unless told otherwise; a file takes more.
    monitor.run("migrate_set_parameter max-bandwidth 100G");
    vm.command(&format!("memfill {touched_mib} 7"), LONG);

    vm.send_line("count");
    vm.expect("count 5\n", COMMAND_TIMEOUT);
    let checkpoint = scratch.path("qemu.ckp");
    let mut reported = (Duration::ZERO, Duration::ZERO);
    let next = last_count(&vm) + 1;
    let stall = stall_while(&mut vm, next, || {
        reported = monitor.migrate_to(&checkpoint);
        // A finished migration leaves the source paused; a checkpoint goes on running.
        monitor.run("cont");
    });
    let (apparent, allocated) = file_sizes(&checkpoint);
    std::fs::remove_file(&checkpoint).expect("remove checkpoint");
    stop_count(&mut vm);

    // A suspend: stopped first, and made durable as bhyve's files are. A stream of a stopped
    // guest restores stopped, so the restore below takes one of the running guest.
    let file = scratch.path("qemu.snap");
    let started = Instant::now();
    monitor.run("stop");
    monitor.migrate_to(&file);
    let suspend_volatile = Some(started.elapsed());
    std::fs::File::open(&file)
        .and_then(|f| f.sync_all())
        .expect("fsync QEMU's file");
    let suspend = started.elapsed();
    monitor.run("cont");
    // A stream taken at the prompt, for the restore.
    monitor.migrate_to(&file);
    // QEMU exits without another prompt.
    let _ = monitor.0.write_all(b"quit\n");
    vm.wait_exit(LONG);
    let _ = std::fs::remove_file(&monitor_path);

    let mut cmd = qemu_command(qemu, memory_mib, &monitor_path, accel);
    cmd.arg("-incoming")
        .arg(format!("exec:cat {}", file.display()));
    let restore = first_answer("qemu -incoming", cmd);
    std::fs::remove_file(&file).expect("remove stream");
    Row {
        vmm: match accel {
            Accel::Kvm => "QEMU KVM",
            Accel::Tcg => "QEMU TCG",
        },
        memory_mib,
        touched_mib,
        save: reported.0,
        stall,
        stop: reported.1,
        suspend,
        suspend_volatile,
        phases: Vec::new(),
        apparent,
        allocated,
        restores: vec![("incoming", restore)],
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / f64::from(1u32 << 20))
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<9} {:>7} {:>8} {:>8} {:>9} {:>8} {:>8} {:>10} {:>9} {:>10} {:>10}  {}\n",
        "vmm",
        "RAM MiB",
        "touched",
        "save ms",
        "MiB/s",
        "stall ms",
        "stop ms",
        "suspend ms",
        "no fsync",
        "file MiB",
        "on disk",
        "restore to first answer (ms)"
    ));
    for r in rows {
        let throughput = r.touched_mib as f64 / r.save.as_secs_f64().max(1e-9);
        let restores: Vec<String> = r
            .restores
            .iter()
            .map(|(what, d)| format!("{what} {}", ms(*d)))
            .collect();
        out.push_str(&format!(
            "{:<9} {:>7} {:>8} {:>8} {:>9.0} {:>8} {:>8} {:>10} {:>9} {:>10} {:>10}  {}\n",
            r.vmm,
            r.memory_mib,
            r.touched_mib,
            ms(r.save),
            throughput,
            ms(r.stall),
            ms(r.stop),
            ms(r.suspend),
            r.suspend_volatile.map_or("-".to_string(), ms),
            mib(r.apparent),
            mib(r.allocated),
            restores.join(", ")
        ));
    }
    out
}

/// Where each bhyve-rs suspend spent its time, as bhyve logged it.
fn phases(rows: &[Row]) -> String {
    let mut out = String::new();
    for r in rows.iter().filter(|r| !r.phases.is_empty()) {
        out.push_str(&format!(
            "{} MiB, {} MiB touched, suspend {} ms:\n",
            r.memory_mib,
            r.touched_mib,
            ms(r.suspend)
        ));
        for line in &r.phases {
            out.push_str(&format!("  {line}\n"));
        }
    }
    out
}

/// The configurations `BHYVE_RS_BENCH_SIZES` names (`MiB:touched,...`), else `all`.
fn chosen_sizes(all: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let Ok(list) = std::env::var("BHYVE_RS_BENCH_SIZES") else {
        return all.to_vec();
    };
    list.split(',')
        .map(|pair| {
            let (memory, touched) = pair
                .split_once(':')
                .and_then(|(m, t)| Some((m.trim().parse().ok()?, t.trim().parse().ok()?)))
                .unwrap_or_else(|| panic!("BHYVE_RS_BENCH_SIZES: '{pair}' is not MiB:touched"));
            (memory, touched)
        })
        .collect()
}

/// bhyve-rs over QEMU with KVM, per configuration measured by both.
fn ratios(rows: &[Row]) -> String {
    let ratio = |a: Duration, b: Duration| {
        if b.is_zero() {
            "-".to_string()
        } else {
            format!("{:.2}", a.as_secs_f64() / b.as_secs_f64())
        }
    };
    let mut out = format!(
        "{:>7} {:>8} {:>8} {:>8} {:>8} {:>10} {:>12} {:>8} {:>8} {:>14}\n",
        "RAM MiB",
        "touched",
        "save",
        "stall",
        "stop",
        "suspend",
        "vs no fsync",
        "on disk",
        "restore",
        "disk/touched"
    );
    for ours in rows.iter().filter(|r| r.vmm == "bhyve-rs") {
        let Some(theirs) = rows.iter().find(|r| {
            r.vmm == "QEMU KVM"
                && r.memory_mib == ours.memory_mib
                && r.touched_mib == ours.touched_mib
        }) else {
            continue;
        };
        let first = |r: &Row| r.restores.first().map(|(_, d)| *d).unwrap_or_default();
        out.push_str(&format!(
            "{:>7} {:>8} {:>8} {:>8} {:>8} {:>10} {:>12} {:>8.2} {:>8} {:>14.3}\n",
            ours.memory_mib,
            ours.touched_mib,
            ratio(ours.save, theirs.save),
            ratio(ours.stall, theirs.stall),
            ratio(ours.stop, theirs.stop),
            ratio(ours.suspend, theirs.suspend),
            ratio(ours.suspend, theirs.suspend_volatile.unwrap_or_default()),
            ours.allocated as f64 / theirs.allocated.max(1) as f64,
            ratio(first(ours), first(theirs)),
            ours.allocated as f64 / (ours.touched_mib << 20).max(1) as f64,
        ));
    }
    out
}

#[test]
#[ignore = "benchmark: run by make bench"]
fn snapshot_bench() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new();
    // 1 GiB and 4 GiB guests with about 1 %, 25 % and 75 % of their RAM touched (62 % of the
    // 4 GiB guest: the guest fills only its largest free range, below the 32-bit PCI hole);
    // bhyve-rs and QEMU with KVM take turns, so a change in the machine's load hits both.
    let sizes = [
        (1024, 10),
        (1024, 256),
        (1024, 768),
        (4096, 40),
        (4096, 1024),
        (4096, 2560),
    ];
    let qemu = qemu_binary();
    let mut rows = Vec::new();
    for (memory, touched) in chosen_sizes(&sizes) {
        rows.push(bhyve_row(&scratch, memory, touched));
        if let Some(qemu) = &qemu {
            rows.push(qemu_row(qemu, &scratch, memory, touched, Accel::Kvm));
        }
    }
    // QEMU under TCG, the oracle of the other tests, for reference only.
    let mut footnote = Vec::new();
    if let (Some(qemu), Err(_)) = (&qemu, std::env::var("BHYVE_RS_BENCH_SIZES")) {
        footnote.push(qemu_row(qemu, &scratch, 1024, 256, Accel::Tcg));
    }
    let host = Command::new("uname")
        .arg("-srm")
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let text = format!(
        "snapshot bench on {host}, load average {}, snapshot files in {}\n{}\n\
         bhyve-rs / QEMU KVM (below 1: bhyve-rs is faster or smaller; suspend: against QEMU's \
         time with an fsync of its file, then without; disk/touched: space bhyve-rs allocated \
         over RAM the guest touched)\n{}\n\
         bhyve-rs suspend phases\n{}\n\
         for reference, QEMU TCG\n{}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        std::env::temp_dir().display(),
        table(&rows),
        ratios(&rows),
        phases(&rows),
        table(&footnote)
    );
    println!("\n{text}");
    let dir = repo_root().join("target/bench");
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join("snapshot.txt"), &text);
    }
}
