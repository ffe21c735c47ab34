//! Device throughput, bhyve-rs and QEMU with KVM on the same console test guest with the same
//! devices (QEMU's in legacy mode, as the end-to-end tests use them), in turn: bhyve-rs, QEMU,
//! bhyve-rs, ... Each VM runs every row once; a row's figure is the median of the runs, with
//! their spread. The guest times its own requests (`vblk bench`, `nvme bench`, `vnet bench`:
//! the TSC calibrated against the ACPI PM timer), so neither the console nor the host's clock
//! is in the figures.
//!
//! * virtio-blk, NVMe and AHCI (`ahci-hd`; QEMU `ich9-ahci` with `ide-hd`): sequential writes,
//!   then reads, of 4 KiB and 64 KiB, one request at a time, for a fixed span of guest time, on
//!   raw files preallocated in the scratch directory (a disk-backed file system, named in the
//!   output), through the host's page cache and again with `nocache` (O_DIRECT; QEMU
//!   `cache=none`).
//! * virtio-net and e1000 (QEMU `e1000-82545em`), each over a tap: 64- and 1514-byte frames from the guest (frames the device took,
//!   one at a time, per guest second; a packet socket on the tap counts what arrived) and from
//!   the host (a packet socket sends as fast as it can; the guest counts from the first frame
//!   to the last, and what it missed is reported).

use super::{bhyve_args, qemu_args, Scratch};
use crate::common::guest;
use crate::common::{kvm_usable, qemu_binary, repo_root, Console, BOOT_TIMEOUT, COMMAND_TIMEOUT};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The network cards' MAC addresses, one per card.
const VIRTIO_NET_MAC: [u8; 6] = [0x58, 0x9c, 0xfc, 0, 0, 0xb5];
const E1000_MAC: [u8; 6] = [0x58, 0x9c, 0xfc, 0, 0, 0xb6];

fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// How a run is set up and how long each of its rows runs.
#[derive(Clone, Copy)]
pub struct Plan {
    /// Guest time per disk row and transmit row, host time per receive row.
    pub row_ms: u64,
    pub runs: usize,
    /// Size of each raw disk file.
    pub disk_mib: u64,
    pub qemu_accel: &'static str,
}

/// The figures of one row in one run.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub requests: u64,
    pub bytes: u64,
    pub ns: u64,
    /// Failed requests (disk), frames not taken or not arrived (transmit) or missed (receive).
    pub lost: u64,
    /// Requests made (disk), frames given to the device (transmit) or sent by the host
    /// (receive): what `lost` is a part of.
    pub offered: u64,
}

impl Sample {
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / (self.ns.max(1) as f64 / 1e9)
    }
    pub fn per_s(&self) -> f64 {
        self.requests as f64 / (self.ns.max(1) as f64 / 1e9)
    }
}

/// One row of the table: its name and what each VMM measured, run by run.
pub struct Row {
    pub name: String,
    pub bhyve: Vec<Sample>,
    pub qemu: Vec<Sample>,
}

/// Parses `... requests <n> bytes <n> ns <n> errors <n>` (the disks' and the transmit bench).
pub fn parse_requests(line: &str) -> Option<Sample> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |key: &str| -> Option<u64> {
        let at = words.iter().position(|w| *w == key)?;
        words.get(at + 1)?.parse().ok()
    };
    let requests = after("requests")?;
    Some(Sample {
        requests,
        bytes: after("bytes")?,
        ns: after("ns")?,
        lost: after("errors")?,
        offered: requests,
    })
}

/// Parses `<driver> bench recv frames <n> bytes <n> ns <n>`; `sent` frames were offered.
pub fn parse_received(line: &str, sent: u64) -> Option<Sample> {
    let (_, rest) = line.split_once(" bench recv frames ")?;
    let words: Vec<&str> = rest.split_whitespace().collect();
    match words[..] {
        [frames, "bytes", bytes, "ns", ns] => {
            let frames: u64 = frames.parse().ok()?;
            Some(Sample {
                // Rates run from the first frame to the last: one frame less than counted.
                requests: frames.saturating_sub(1),
                bytes: bytes.parse::<u64>().ok()? * frames.saturating_sub(1) / frames.max(1),
                ns: ns.parse().ok()?,
                lost: sent.saturating_sub(frames),
                offered: sent,
            })
        }
        _ => None,
    }
}

/// A raw disk file of `mib` MiB with every block written, so neither VMM reads holes.
fn disk_file(path: &Path, mib: u64) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).expect("create the disk file");
    let block: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    for _ in 0..mib {
        file.write_all(&block).expect("write the disk file");
    }
    file.sync_all().expect("sync the disk file");
}

fn command_result(vm: &mut Console, command: &str, prefix: &str) -> Sample {
    let lines = vm.command(command, Duration::from_secs(120));
    let line = lines
        .iter()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("{command}: no '{prefix}' line in {lines:?}"));
    parse_requests(line).unwrap_or_else(|| panic!("{command}: cannot read {line:?}"))
}

/// The disk rows: (row name, guest command).
fn disk_rows(nocache: bool) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    let cache = if nocache { " nocache" } else { "" };
    for (device, command) in [("virtio-blk", "vblk"), ("NVMe", "nvme"), ("AHCI", "ahci")] {
        for op in ["write", "read"] {
            for (kib, count) in [(4, 8), (64, 128)] {
                rows.push((
                    format!("{device} {op} {kib} KiB{cache}"),
                    format!("{command} bench {op} {count}"),
                ));
            }
        }
    }
    rows
}

fn run_disk_rows(vm: &mut Console, nocache: bool, plan: Plan) -> Vec<(String, Sample)> {
    // Not counted: the first requests of a run are slower (threads and caches warming up,
    // on both VMMs), and the guest calibrates its clock on first use.
    for warm_up in [
        "vblk bench read 8",
        "nvme bench read 8",
        "ahci bench read 8",
    ] {
        command_result(vm, &format!("{warm_up} {}", plan.row_ms.min(100)), warm_up);
    }
    disk_rows(nocache)
        .into_iter()
        .map(|(name, command)| {
            let full = format!("{command} {}", plan.row_ms);
            let sample = command_result(vm, &full, &command);
            (name, sample)
        })
        .collect()
}

#[cfg(target_os = "linux")]
mod net {
    use super::*;
    use crate::common::net::{host_frame, is_test_frame_from, Tap};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    /// A network card under test: the guest's driver command, the card's MAC and its tap.
    pub struct Card {
        pub driver: &'static str,
        pub label: &'static str,
        pub mac: [u8; 6],
        pub tap: Tap,
    }

    /// virtio-net and e1000, each on a tap of its own; none without taps.
    pub fn cards() -> Vec<Card> {
        [
            ("vnet", "virtio-net", "i", VIRTIO_NET_MAC),
            ("e1000", "e1000", "j", E1000_MAC),
        ]
        .into_iter()
        .filter_map(|(driver, label, tag, mac)| {
            Some(Card {
                driver,
                label,
                mac,
                tap: Tap::create(tag)?,
            })
        })
        .collect()
    }

    pub fn run_rows(vm: &mut Console, card: &Card, plan: Plan) -> Vec<(String, Sample)> {
        let (tap, driver, mac) = (&card.tap, card.driver, card.mac);
        let mut rows = Vec::new();
        for len in [64usize, 1514] {
            // Guest to host: the guest times the frames the card took; the host counts what
            // reached the tap.
            let stop = AtomicBool::new(false);
            let (sample, (arrived, _)) = std::thread::scope(|scope| {
                let counter =
                    scope.spawn(|| tap.count_until(|f| is_test_frame_from(&mac, f), &stop));
                let command = format!("{driver} bench send {len}");
                let sample = command_result(vm, &format!("{command} {}", plan.row_ms), &command);
                // Frames still on their way through the host.
                std::thread::sleep(Duration::from_millis(200));
                stop.store(true, Ordering::SeqCst);
                (sample, counter.join().expect("frame counter"))
            });
            let sample = Sample {
                lost: sample.requests.saturating_sub(arrived) + sample.lost,
                ..sample
            };
            rows.push((format!("{} guest->host {len} B", card.label), sample));
        }
        for len in [64usize, 1514] {
            // Host to guest: the host sends as fast as the tap takes frames; the guest times
            // the ones it got.
            vm.send_line(&format!("{driver} bench recv"));
            vm.expect(&format!("{driver} bench recv started\n"), COMMAND_TIMEOUT);
            let frame = host_frame(&mac, 1, len);
            let started = Instant::now();
            let mut sent = 0u64;
            while started.elapsed() < Duration::from_millis(plan.row_ms) || sent < 5 {
                if tap.try_send(&frame) {
                    sent += 1;
                }
            }
            // Frames still queued for the VMM.
            std::thread::sleep(Duration::from_millis(300));
            vm.send("\n");
            let text = vm.expect_prompt(COMMAND_TIMEOUT);
            let prefix = format!("{driver} bench recv frames");
            let line = text
                .lines()
                .find(|l| l.starts_with(&prefix))
                .unwrap_or_else(|| panic!("{driver} bench recv: {text:?}"));
            let sample = parse_received(line, sent)
                .unwrap_or_else(|| panic!("{driver} bench recv: cannot read {line:?}"));
            rows.push((format!("{} host->guest {len} B", card.label), sample));
        }
        rows
    }
}

fn boot(label: &'static str, cmd: Command) -> Console {
    let mut vm = Console::spawn(label, cmd);
    vm.expect(guest::READY, BOOT_TIMEOUT);
    vm.expect_prompt(COMMAND_TIMEOUT);
    vm
}

/// The devices of one run; `tap` is the network backend (none: no network card).
struct Devices<'a> {
    vblk: &'a Path,
    nvme: &'a Path,
    ahci: &'a Path,
    nocache: bool,
    /// The taps of the virtio-net and e1000 cards (none: no card).
    virtio_net_tap: Option<&'a str>,
    e1000_tap: Option<&'a str>,
}

fn bhyve_devices(d: &Devices) -> Vec<String> {
    let cache = if d.nocache { ",nocache" } else { "" };
    let mut args = vec![
        "-s".to_string(),
        format!("3,virtio-blk,{}{cache}", d.vblk.display()),
        "-s".to_string(),
        format!("4,nvme,{}{cache},ser=BENCH", d.nvme.display()),
        "-s".to_string(),
        format!("6,ahci-hd,{}{cache}", d.ahci.display()),
    ];
    if let Some(tap) = d.virtio_net_tap {
        args.push("-s".into());
        args.push(format!(
            "5,virtio-net,{tap},mac={}",
            mac_text(&VIRTIO_NET_MAC)
        ));
    }
    if let Some(tap) = d.e1000_tap {
        args.push("-s".into());
        args.push(format!("7,e1000,{tap},mac={}", mac_text(&E1000_MAC)));
    }
    args
}

fn qemu_devices(d: &Devices) -> Vec<String> {
    let cache = if d.nocache { ",cache=none" } else { "" };
    let mut args = vec![
        "-drive".to_string(),
        format!("if=none,id=vd0,file={},format=raw{cache}", d.vblk.display()),
        "-device".to_string(),
        "virtio-blk-pci,disable-modern=on,drive=vd0".to_string(),
        "-drive".to_string(),
        format!("if=none,id=nv0,file={},format=raw{cache}", d.nvme.display()),
        "-device".to_string(),
        "nvme,drive=nv0,serial=BENCH".to_string(),
        "-device".to_string(),
        "ich9-ahci,id=ahci".to_string(),
        "-drive".to_string(),
        format!("if=none,id=hd0,file={},format=raw{cache}", d.ahci.display()),
        "-device".to_string(),
        "ide-hd,drive=hd0,bus=ahci.0".to_string(),
    ];
    if let Some(tap) = d.virtio_net_tap {
        args.push("-netdev".into());
        args.push(format!("tap,id=n0,ifname={tap},script=no,downscript=no"));
        args.push("-device".into());
        args.push(format!(
            "virtio-net-pci,disable-modern=on,netdev=n0,mac={}",
            mac_text(&VIRTIO_NET_MAC)
        ));
    }
    if let Some(tap) = d.e1000_tap {
        args.push("-netdev".into());
        args.push(format!("tap,id=n1,ifname={tap},script=no,downscript=no"));
        args.push("-device".into());
        // The 82545EM, as bhyve's e1000 (QEMU's plain e1000 is an 82540EM).
        args.push(format!(
            "e1000-82545em,netdev=n1,mac={}",
            mac_text(&E1000_MAC)
        ));
    }
    args
}

/// Adds one run's samples to the rows, in order.
fn record(rows: &mut Vec<Row>, samples: Vec<(String, Sample)>, bhyve: bool) {
    for (name, sample) in samples {
        let at = match rows.iter().position(|r| r.name == name) {
            Some(at) => at,
            None => {
                rows.push(Row {
                    name,
                    bhyve: Vec::new(),
                    qemu: Vec::new(),
                });
                rows.len() - 1
            }
        };
        let row = &mut rows[at];
        if bhyve {
            row.bhyve.push(sample);
        } else {
            row.qemu.push(sample);
        }
    }
}

/// Every run of `plan`: bhyve-rs and QEMU in turn, through the page cache, then with
/// `nocache`. Returns the rows and where the disk files were.
pub fn measure(plan: Plan) -> Option<(Vec<Row>, String)> {
    if !kvm_usable() {
        return None;
    }
    let qemu = qemu_binary();
    let scratch = Scratch::new();
    let vblk = scratch.path("vblk.img");
    let nvme = scratch.path("nvme.img");
    let ahci = scratch.path("ahci.img");
    for disk in [&vblk, &nvme, &ahci] {
        disk_file(disk, plan.disk_mib);
    }
    #[cfg(target_os = "linux")]
    let cards = net::cards();
    #[cfg(target_os = "linux")]
    let tap_of = |driver: &str| {
        cards
            .iter()
            .find(|c| c.driver == driver)
            .map(|c| c.tap.name.clone())
    };
    #[cfg(not(target_os = "linux"))]
    let tap_of = |_: &str| None::<String>;
    let (virtio_net_tap, e1000_tap) = (tap_of("vnet"), tap_of("e1000"));

    let mut rows = Vec::new();
    for nocache in [false, true] {
        let devices = Devices {
            vblk: &vblk,
            nvme: &nvme,
            ahci: &ahci,
            nocache,
            // The network rows run once, with the cached disks.
            virtio_net_tap: virtio_net_tap.as_deref().filter(|_| !nocache),
            e1000_tap: e1000_tap.as_deref().filter(|_| !nocache),
        };
        for _ in 0..plan.runs {
            let mut vmms: Vec<(bool, Command)> =
                vec![(true, bhyve_args(&scratch, &bhyve_devices(&devices)))];
            if let Some(qemu) = &qemu {
                vmms.push((
                    false,
                    qemu_args(qemu, plan.qemu_accel, &qemu_devices(&devices)),
                ));
            }
            for (is_bhyve, cmd) in vmms {
                let mut vm = boot(if is_bhyve { "bhyve" } else { "qemu" }, cmd);
                // Only Linux adds the network rows.
                #[cfg_attr(not(target_os = "linux"), allow(unused_mut))]
                let mut samples = run_disk_rows(&mut vm, nocache, plan);
                #[cfg(target_os = "linux")]
                if !nocache {
                    for card in &cards {
                        samples.extend(net::run_rows(&mut vm, card, plan));
                    }
                }
                record(&mut rows, samples, is_bhyve);
                drop(vm);
            }
        }
    }
    let fs = Command::new("df")
        .arg("--output=fstype")
        .arg(&scratch.0)
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.lines().nth(1).unwrap_or("").trim().to_string()
        })
        .unwrap_or_default();
    Some((rows, format!("{} ({fs})", scratch.0.display())))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// "median (min-max)" of `f` over `samples`, and the median.
fn summary(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> (String, f64) {
    if samples.is_empty() {
        return ("-".into(), 0.0);
    }
    let mut values: Vec<f64> = samples.iter().map(f).collect();
    let m = median(&mut values);
    let fmt = |v: f64| {
        if v >= 100.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.1}")
        }
    };
    (
        format!(
            "{} ({}-{})",
            fmt(m),
            fmt(values[0]),
            fmt(values[values.len() - 1])
        ),
        m,
    )
}

pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<34} {:>22} {:>22} {:>24} {:>24} {:>6} {:>11}\n",
        "row", "bhyve-rs MB/s", "QEMU MB/s", "bhyve-rs req/s", "QEMU req/s", "ratio", "lost % b/q"
    );
    for r in rows {
        let (bhyve_mb, bhyve_median) = summary(&r.bhyve, Sample::mb_per_s);
        let (qemu_mb, qemu_median) = summary(&r.qemu, Sample::mb_per_s);
        let (bhyve_rate, _) = summary(&r.bhyve, Sample::per_s);
        let (qemu_rate, _) = summary(&r.qemu, Sample::per_s);
        let ratio = if qemu_median > 0.0 {
            format!("{:.2}", bhyve_median / qemu_median)
        } else {
            "-".into()
        };
        let lost = |s: &[Sample]| {
            let offered = s.iter().map(|s| s.offered).sum::<u64>();
            if offered == 0 {
                return "-".to_string();
            }
            let lost = s.iter().map(|s| s.lost).sum::<u64>();
            format!("{:.0}", 100.0 * lost as f64 / offered as f64)
        };
        out.push_str(&format!(
            "{:<34} {:>22} {:>22} {:>24} {:>24} {:>6} {:>11}\n",
            r.name,
            bhyve_mb,
            qemu_mb,
            bhyve_rate,
            qemu_rate,
            ratio,
            format!("{}/{}", lost(&r.bhyve), lost(&r.qemu)),
        ));
    }
    out
}

/// The report `make bench` prints and leaves in target/bench/devices.txt.
pub fn report(rows: &[Row], disks: &str, plan: Plan) -> String {
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into());
    format!(
        "device throughput: bhyve-rs and QEMU ({} accel, legacy devices) in turn, {} runs each, \
         {} ms per row; median (min-max) over the runs\n\
         disk files: {} MiB raw, preallocated, in {}; one request at a time, sequential\n\
         ratio: bhyve-rs / QEMU of the median MB/s (above 1: bhyve-rs is faster)\n\
         lost: failed requests, or frames that did not arrive, in % of those offered over all runs \
         (bhyve-rs/QEMU); host->guest frames are sent as fast as the tap takes them, far more \
         than either VMM can take\n\
         load average at the end: {load}\n\n{}",
        plan.qemu_accel,
        plan.runs,
        plan.row_ms,
        plan.disk_mib,
        disks,
        table(rows)
    )
}

#[test]
#[ignore = "benchmark: run by make bench"]
fn device_bench() {
    let plan = Plan {
        row_ms: 1000,
        runs: 3,
        disk_mib: 64,
        qemu_accel: "kvm",
    };
    let Some((rows, disks)) = measure(plan) else {
        return;
    };
    let text = report(&rows, &disks, plan);
    println!("\n{text}");
    let dir = repo_root().join("target/bench");
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join("devices.txt"), &text);
    }
}

/// One short run of every row under both VMMs, so the benchmark's commands, parsing and
/// table stay working; no figure is checked, only that each request succeeded and every
/// row was measured by both.
#[test]
fn device_bench_smoke() {
    let plan = Plan {
        row_ms: 20,
        runs: 1,
        disk_mib: 4,
        // TCG boots the guest's firmware faster here than KVM without hardware
        // virtualization; the devices and the guest's commands are the same.
        qemu_accel: "tcg",
    };
    let Some((rows, disks)) = measure(plan) else {
        return;
    };
    let text = report(&rows, &disks, plan);
    println!("{text}");
    for row in &rows {
        assert_eq!(row.bhyve.len(), 1, "{text}");
        // Frames from the host may all be dropped in so short a run; the rest must go.
        if !row.name.contains("host->guest") {
            assert!(row.bhyve[0].requests > 0, "{text}");
        }
        if !row.name.contains("->") {
            assert_eq!(row.bhyve[0].lost, 0, "{text}");
        }
        if qemu_binary().is_some() {
            assert_eq!(row.qemu.len(), 1, "{text}");
        }
    }
    assert!(rows.len() >= 24, "{text}");
}

#[test]
fn bench_lines_parse() {
    let s = parse_requests("vblk bench write 8 requests 10 bytes 40960 ns 2000000 errors 0")
        .expect("parses");
    assert_eq!(
        (s.requests, s.bytes, s.ns, s.lost, s.offered),
        (10, 40960, 2_000_000, 0, 10)
    );
    assert_eq!(s.per_s(), 5000.0);
    assert!((s.mb_per_s() - 20.48).abs() < 1e-9);
    let r = parse_received("e1000 bench recv frames 11 bytes 1100 ns 1000000", 15).expect("parses");
    assert_eq!((r.requests, r.bytes, r.lost, r.offered), (10, 1000, 4, 15));
    assert_eq!(
        parse_received("vnet bench recv frames x", 1).map(|_| ()),
        None
    );
    assert_eq!(
        parse_requests("vblk: no virtio-blk device").map(|_| ()),
        None
    );
}
