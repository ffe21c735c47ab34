//! `make bench`: snapshot figures measured through the real binaries on the console test guest,
//! printed as a table (and kept in target/bench/snapshot.txt). Nothing here passes or fails on
//! speed; the test is ignored so that `make test` never runs it.
//!
//! For each guest size, with part of its memory filled by the guest (`memfill`):
//! * save: wall time of `bhyvectl --checkpoint` on a guest that is counting, and the touched
//!   memory divided by it;
//! * stall: the longest gap between two of the guest's `count` lines (printed every 100 ms)
//!   around the checkpoint, less 100 ms: how long the guest stood still;
//! * file: apparent size and space allocated on disk;
//! * restore: from starting `bhyve -r` to the guest's answer to a command typed at once, with
//!   RAM mapped (default) and copied (`snapshot.restore=copy`); the file is in the page cache.
//!
//! The same for QEMU (TCG) where installed: live migration to a file (`migrate exec:cat>FILE`,
//! QEMU's `savevm` needs a qcow2 disk this guest does not have), its reported downtime, and
//! `-incoming exec:cat FILE` to the first answer.

#[path = "common/mod.rs"]
mod common;

use common::guest;
use common::{
    console_vm_command, kvm_usable, qemu_binary, repo_root, vm_name, Console, BOOT_TIMEOUT,
    COMMAND_TIMEOUT,
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
        let dir = std::env::temp_dir().join(format!("bhyve-rs-bench-{}", std::process::id()));
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
    let cmd = console_vm_command(
        Path::new(env!("CARGO_BIN_EXE_bhyve")),
        &format!("{memory_mib}M"),
        &scratch.0,
        &name,
    );
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

    let file = scratch.path("bench.snap");
    ctl(vec![format!("--suspend={}", file.display())]);
    vm.wait_exit(LONG);

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

fn qemu_command(qemu: &Path, memory_mib: u64, monitor: &Path) -> Command {
    let mut cmd = common::qemu_command(qemu, guest::console_guest(), "");
    cmd.args(["-m", &memory_mib.to_string()]);
    cmd.arg("-monitor")
        .arg(format!("unix:{},server=on,wait=off", monitor.display()));
    cmd
}

fn qemu_row(qemu: &Path, scratch: &Scratch, memory_mib: u64, touched_mib: u64) -> Row {
    let monitor_path = scratch.path("qemu.mon");
    let mut vm = Console::spawn("qemu", qemu_command(qemu, memory_mib, &monitor_path));
    vm.expect(guest::READY, BOOT_TIMEOUT);
    vm.expect_prompt(COMMAND_TIMEOUT);
    let mut monitor = Monitor::connect(&monitor_path);
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

    // A stream taken at the prompt, for the restore.
    let file = scratch.path("qemu.snap");
    monitor.migrate_to(&file);
    // QEMU exits without another prompt.
    let _ = monitor.0.write_all(b"quit\n");
    vm.wait_exit(LONG);
    let _ = std::fs::remove_file(&monitor_path);

    let mut cmd = qemu_command(qemu, memory_mib, &monitor_path);
    cmd.arg("-incoming")
        .arg(format!("exec:cat {}", file.display()));
    let restore = first_answer("qemu -incoming", cmd);
    std::fs::remove_file(&file).expect("remove stream");
    Row {
        vmm: "QEMU TCG",
        memory_mib,
        touched_mib,
        save: reported.0,
        stall,
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
        "{:<9} {:>7} {:>8} {:>8} {:>9} {:>8} {:>10} {:>10}  {}\n",
        "vmm",
        "RAM MiB",
        "touched",
        "save ms",
        "MiB/s",
        "stall ms",
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
            "{:<9} {:>7} {:>8} {:>8} {:>9.0} {:>8} {:>10} {:>10}  {}\n",
            r.vmm,
            r.memory_mib,
            r.touched_mib,
            ms(r.save),
            throughput,
            ms(r.stall),
            mib(r.apparent),
            mib(r.allocated),
            restores.join(", ")
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
    let sizes = [(256, 64), (2048, 512)];
    let mut rows = Vec::new();
    for (memory, touched) in sizes {
        rows.push(bhyve_row(&scratch, memory, touched));
    }
    if let Some(qemu) = qemu_binary() {
        for (memory, touched) in sizes {
            rows.push(qemu_row(&qemu, &scratch, memory, touched));
        }
    }
    let host = Command::new("uname")
        .arg("-srm")
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let text = format!(
        "snapshot bench on {host}, snapshot files in {} (page cache warm)\n{}",
        std::env::temp_dir().display(),
        table(&rows)
    );
    println!("\n{text}");
    let dir = repo_root().join("target/bench");
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join("snapshot.txt"), &text);
    }
}
