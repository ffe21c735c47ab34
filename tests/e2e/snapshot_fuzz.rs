//! Forged snapshots end to end: a real snapshot of the console guest (two vCPUs, host bridge,
//! LPC with the COM ports, the `dummy` PCI device) is edited section by section — bits flipped,
//! payloads cut, extended, zeroed, length prefixes made huge, RAM regions moved or resized — and
//! every checksum renewed, so each forged file passes the integrity checks and reaches the
//! decoders and the restore. `bhyve -r` must then refuse it in one line, or restore it and run:
//! never panic, never hang. Needs /dev/kvm (skips with a message without it, fails if
//! BHYVE_RS_REQUIRE_KVM=1).

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bhyve::devices::hpet::{HpetState, HpetTimerState};
use bhyve::devices::pci::irq::IntxState;
use bhyve::devices::pci::msix::{MsixEntry, MsixState};
use bhyve::devices::pci::PciFunctionState;
use bhyve::devices::pm::PmState;
use bhyve::devices::rtc::RtcState;
use bhyve::devices::uart::UartState;
use bhyve::snapshot::backend_state::{decode_backend_state, BackendStatePayload};
use bhyve::snapshot::{
    decode_section, encode_section, reseal, SectionEntry, SectionKind, SnapshotReader,
    FORMAT_PAGE_SIZE,
};
use bhyve::vmm::BackendState;
use common::control::{suspend, Scratch};
use common::guest::{self, splitmix64};
use common::{console_vm_command_with, kvm_usable, vm_name, Console};
use common::{BOOT_TIMEOUT, COMMAND_TIMEOUT};

/// Restores run this many at a time: enough to keep two cores busy while some wait.
const RESTORES_AT_ONCE: usize = 3;
/// How long a restore may take to either fail or have the VM running.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long an accepted variant runs before it is killed: a restored machine whose state makes
/// bhyve fall over usually does so at once.
const RUN_FOR: Duration = Duration::from_millis(1000);
/// Console guest commands an accepted variant runs, to use the restored devices.
const WORKOUT: &str = "pci\nbars\ncmos\nsci\ncounter\n";
/// Guest memory: small, so each forged file is written in full quickly.
const MEMORY: &str = "8M";

/// bhyve's exit status after an error, a refused restore included.
const ERROR_STATUS: i32 = 4;

/// bincode 2 varint markers: the next 2, 4 or 8 bytes hold the value.
const VARINT_U16: u8 = 251;
const VARINT_U32: u8 = 252;
const VARINT_U64: u8 = 253;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        splitmix64(&mut self.0)
    }

    /// Uniform enough in `0..n`; 0 when `n` is 0.
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// One forged file: which section was edited, how, and the edited table.
struct Variant {
    section: usize,
    what: String,
    entries: Vec<SectionEntry>,
    /// The edited section's new bytes, placed at the end of the file (data sections).
    payload: Option<Vec<u8>>,
    /// RAM bytes to flip, as (file offset, mask).
    ram_flips: Vec<(usize, u8)>,
}

impl Variant {
    /// The forged file: the original with the edits applied and every checksum renewed.
    fn image(&self, original: &[u8]) -> Vec<u8> {
        let mut image = original.to_vec();
        let mut entries = self.entries.clone();
        if let Some(payload) = &self.payload {
            let entry = &mut entries[self.section];
            entry.offset = image.len() as u64;
            entry.length = payload.len() as u64;
            image.extend_from_slice(payload);
        }
        for &(at, mask) in &self.ram_flips {
            image[at] ^= mask;
        }
        reseal(&mut image, &entries).expect("the original's table can be resealed");
        image
    }
}

/// Where bincode length prefixes probably are: the first byte, and for every string with its
/// one-byte length in front (a field or sub-section name), that length and the varint after
/// the string (a sub-section's byte count follows its name).
fn count_positions(payload: &[u8]) -> Vec<usize> {
    let mut positions = vec![0];
    for (at, &len) in payload.iter().enumerate() {
        let len = usize::from(len);
        if !(2..usize::from(VARINT_U16)).contains(&len) {
            continue;
        }
        let Some(text) = payload.get(at + 1..at + 1 + len) else {
            continue;
        };
        if text.iter().all(|b| b.is_ascii_graphic()) {
            positions.push(at);
            if at + 1 + len < payload.len() {
                positions.push(at + 1 + len);
            }
        }
    }
    positions
}

/// Replace the varint at `at` with `marker` followed by `width` bytes of 0xff: a huge count.
fn huge_count(payload: &[u8], at: usize, marker: u8, width: usize) -> Vec<u8> {
    let mut forged = payload[..at.min(payload.len())].to_vec();
    forged.push(marker);
    forged.extend(vec![0xff; width]);
    forged.extend_from_slice(payload.get(at + 1..).unwrap_or(&[]));
    forged
}

fn data_variants(payload: &[u8], rng: &mut Rng) -> Vec<(&'static str, Vec<u8>)> {
    let n = payload.len();
    let mut flipped = payload.to_vec();
    for _ in 0..1 + rng.below(4) {
        if n > 0 {
            let at = rng.below(n);
            flipped[at] ^= 1 << rng.below(8);
        }
    }
    let mut head = payload.to_vec();
    if n > 0 {
        let at = rng.below(n.min(8));
        head[at] ^= 1 << rng.below(8);
    }
    let mut extended = payload.to_vec();
    for _ in 0..1 + rng.below(64) {
        extended.push(rng.next() as u8);
    }
    let positions = count_positions(payload);
    let mut pick = || positions[rng.below(positions.len())];
    let (at16, at32, at64) = (pick(), pick(), pick());
    vec![
        ("flipped bits", flipped),
        ("flipped bit in the first bytes", head),
        ("truncated", payload[..rng.below(n)].to_vec()),
        ("extended with garbage", extended),
        ("u16 count", huge_count(payload, at16, VARINT_U16, 2)),
        ("u32 count", huge_count(payload, at32, VARINT_U32, 4)),
        ("u64 count", huge_count(payload, at64, VARINT_U64, 8)),
        ("zeroed", vec![0; n]),
        ("emptied", Vec::new()),
    ]
}

/// Edits of sections whose structure this test knows. The payload still decodes, so the
/// hostile values reach the restore code instead of stopping in the decoder.
fn typed_variants(entry: &SectionEntry, payload: &[u8], rng: &mut Rng) -> Vec<(String, Vec<u8>)> {
    match entry.name.as_str() {
        "vm" | "vcpu" => backend_variants(entry, payload, rng),
        "pci" => pci_variants(payload, rng),
        "uart" => {
            let state: UartState = decode(payload);
            let mut full = state.clone();
            full.rx_fifo_size = 16;
            full.rx_fifo = (0..16).map(|_| rng.next() as u8).collect();
            let mut over = state.clone();
            over.rx_fifo_size = 1;
            over.rx_fifo = vec![0x41; 300];
            let mut ones = state;
            ones.ier = 0xff;
            ones.lcr = 0xff;
            ones.mcr = 0xff;
            ones.lsr = 0xff;
            ones.msr = 0xff;
            ones.fcr = 0xff;
            ones.dll = 0xff;
            ones.dlh = 0xff;
            vec![
                typed("receive FIFO full", &full),
                typed("receive FIFO over its size", &over),
                typed("every register 0xff", &ones),
            ]
        }
        "rtc" => {
            let state: RtcState = decode(payload);
            let edit = |change: &dyn Fn(&mut RtcState)| {
                let mut edited = state.clone();
                change(&mut edited);
                edited
            };
            vec![
                typed("3 registers", &edit(&|s| s.registers.truncate(3))),
                typed("4096 registers", &edit(&|s| s.registers.resize(4096, 0xff))),
                typed("registers 0xff", &edit(&|s| s.registers.fill(0xff))),
                typed("clock at i64::MAX", &edit(&|s| s.rtc_time = Some(i64::MAX))),
                typed("clock at i64::MIN", &edit(&|s| s.rtc_time = Some(i64::MIN))),
                typed("index 0xff", &edit(&|s| s.addr = 0xff)),
            ]
        }
        "hpet" => {
            let state: HpetState = decode(payload);
            let mut none = state.clone();
            none.timers.clear();
            let mut many = state.clone();
            many.timers = vec![state.timers[0].clone(); 100];
            let ones = HpetState {
                config: u64::MAX,
                isr: u64::MAX,
                counter: u32::MAX,
                timers: vec![
                    HpetTimerState {
                        cap_config: u64::MAX,
                        msireg: u64::MAX,
                        comparator: u32::MAX,
                        period: u32::MAX,
                    };
                    state.timers.len()
                ],
            };
            vec![
                typed("no timers", &none),
                typed("100 timers", &many),
                typed("every bit set", &ones),
            ]
        }
        "pm" => {
            let _: PmState = decode(payload);
            let ones = PmState {
                pm1_status: u16::MAX,
                pm1_enable: u16::MAX,
                pm1_control: u16::MAX,
                gpe0_active: u8::MAX,
                gpe0_enabled: u8::MAX,
                reset_control: u8::MAX,
                timer: u32::MAX,
            };
            vec![typed("every bit set", &ones)]
        }
        "config" => {
            let state: Vec<(String, String)> = decode(payload);
            let set = |key: &str, value: Option<&str>| {
                let mut edited: Vec<(String, String)> =
                    state.iter().filter(|(k, _)| k != key).cloned().collect();
                if let Some(value) = value {
                    edited.push((key.to_string(), value.to_string()));
                }
                edited
            };
            vec![
                typed("memory.size=16M", &set("memory.size", Some("16M"))),
                typed("memory.size=0", &set("memory.size", Some("0"))),
                typed("memory.size=16E", &set("memory.size", Some("16E"))),
                typed("cpus=0", &set("cpus", Some("0"))),
                typed("cpus=3", &set("cpus", Some("3"))),
                typed("cpus=65535", &set("cpus", Some("65535"))),
                typed("no dummy device", &set("pci.0.4.0.device", None)),
                typed("another dummy", &set("pci.0.5.0.device", Some("dummy"))),
                typed("unknown device", &set("pci.0.4.0.device", Some("nonesuch"))),
                typed(
                    "dummy as host bridge",
                    &set("pci.0.4.0.device", Some("hostbridge")),
                ),
                typed("four sockets", &set("sockets", Some("4"))),
                typed("name with a slash", &set("name", Some("../escape"))),
                typed("empty name", &set("name", Some(""))),
            ]
        }
        _ => Vec::new(),
    }
}

fn decode<T: serde::de::DeserializeOwned>(payload: &[u8]) -> T {
    decode_section(payload).expect("the original section decodes")
}

fn typed<T: serde::Serialize>(what: &str, value: &T) -> (String, Vec<u8>) {
    (
        what.to_string(),
        encode_section(value).expect("encode an edited section"),
    )
}

/// Sub-sections of a `vm` or `vcpu` section cut, grown, repeated 300 times (lists far longer
/// than KVM takes) or with bits flipped: all four for `vm`, two for each vCPU (the other two
/// for the next one); and one sub-section left out.
fn backend_variants(entry: &SectionEntry, payload: &[u8], rng: &mut Rng) -> Vec<(String, Vec<u8>)> {
    let state = decode_backend_state(payload).expect("the original state decodes");
    let encode = |state: &BackendState| {
        encode_section(&BackendStatePayload::from(state)).expect("encode an edited state")
    };
    let kinds: &[usize] = match entry.instance.parse::<usize>() {
        Ok(vcpu) if vcpu % 2 == 0 => &[0, 2],
        Ok(_) => &[1, 3],
        Err(_) => &[0, 1, 2, 3],
    };
    let mut out = Vec::new();
    for (index, sub) in state.sections.iter().enumerate() {
        for &kind in kinds {
            let mut edited = state.clone();
            let bytes = &mut edited.sections[index].bytes;
            let how = match kind {
                0 => {
                    bytes.truncate(rng.below(sub.bytes.len()));
                    "cut"
                }
                1 => {
                    for _ in 0..1 + rng.below(64) {
                        bytes.push(rng.next() as u8);
                    }
                    "grown"
                }
                2 => {
                    *bytes = sub.bytes.repeat(300);
                    "repeated 300 times"
                }
                _ => {
                    for _ in 0..1 + rng.below(8) {
                        if !bytes.is_empty() {
                            let at = rng.below(bytes.len());
                            bytes[at] ^= 1 << rng.below(8);
                        }
                    }
                    "with bits flipped"
                }
            };
            out.push((format!("{} {how}", sub.name), encode(&edited)));
        }
    }
    let mut missing = state.clone();
    let gone = missing.sections.remove(rng.below(state.sections.len()));
    out.push((format!("{} missing", gone.name), encode(&missing)));
    out
}

fn pci_variants(payload: &[u8], rng: &mut Rng) -> Vec<(String, Vec<u8>)> {
    let state: PciFunctionState = decode(payload);
    let edit = |change: &dyn Fn(&mut PciFunctionState)| {
        let mut edited = state.clone();
        change(&mut edited);
        edited
    };
    let decoding = |s: &mut PciFunctionState| s.config[4] |= 0x03;
    let msix_entries = 1 + rng.below(4096);
    vec![
        typed("config space cut", &edit(&|s| s.config.truncate(64))),
        typed(
            "config space of 4 KiB",
            &edit(&|s| s.config.resize(4096, 0xff)),
        ),
        typed("no BARs", &edit(&|s| s.bars.clear())),
        typed(
            "BARs at the top of the address space, decoding",
            &edit(&|s| {
                decoding(s);
                for bar in s.bars.iter_mut().filter(|b| b.size > 0) {
                    bar.addr = 0u64.wrapping_sub(bar.size);
                }
            }),
        ),
        typed(
            "BARs at 0, decoding",
            &edit(&|s| {
                decoding(s);
                for bar in &mut s.bars {
                    bar.addr = 0;
                }
            }),
        ),
        typed(
            "BAR sizes doubled",
            &edit(&|s| {
                s.bars
                    .iter_mut()
                    .for_each(|b| b.size = b.size.wrapping_mul(2))
            }),
        ),
        typed(
            "capability list into the void",
            &edit(&|s| {
                s.config[6] |= 0x10;
                s.config[0x34] = 0xfc;
            }),
        ),
        typed(
            "device state cut",
            &edit(&|s| s.device.truncate(s.device.len() / 2)),
        ),
        typed(
            "device state doubled",
            &edit(&|s| s.device = s.device.repeat(2)),
        ),
        typed(
            "MSI-X table added",
            &edit(&|s| {
                s.msix = Some(MsixState {
                    enabled: true,
                    function_mask: false,
                    entries: vec![MsixEntry::default(); msix_entries],
                })
            }),
        ),
        typed(
            "INTx asserted",
            &edit(&|s| s.intx = Some(IntxState::Asserted)),
        ),
    ]
}

/// A RAM region's contents changed (its chunk checksums renewed), or its table entry resized
/// or moved.
fn ram_variants(entries: &[SectionEntry], section: usize, rng: &mut Rng) -> Vec<Variant> {
    let page = u64::from(FORMAT_PAGE_SIZE);
    let region = &entries[section];
    let edit = |what: &str, change: &dyn Fn(&mut SectionEntry)| {
        let mut edited = entries.to_vec();
        change(&mut edited[section]);
        Variant {
            section,
            what: what.to_string(),
            entries: edited,
            payload: None,
            ram_flips: Vec::new(),
        }
    };
    let mut flipped = edit("RAM bits flipped", &|_| {});
    flipped.ram_flips = (0..8)
        .map(|_| {
            let at = region.offset as usize + rng.below(region.length as usize);
            (at, 1u8 << rng.below(8))
        })
        .collect();
    vec![
        flipped,
        edit("one page shorter", &|e| e.length -= page),
        edit("empty", &|e| e.length = 0),
        edit("twice as long", &|e| e.length *= 2),
        edit("moved up a page", &|e| e.gpa += page),
        edit("moved to 4 GiB", &|e| e.gpa = 4 << 30),
        edit("at the top of the address space", &|e| {
            e.gpa = 0u64.wrapping_sub(e.length)
        }),
        edit("read from the file's start", &|e| e.offset = 0),
    ]
}

fn variants(original: &[u8], entries: &[SectionEntry]) -> Vec<Variant> {
    let mut all = Vec::new();
    for (section, entry) in entries.iter().enumerate() {
        let mut rng = Rng(0x5eed_f022_0000_0000 ^ (section as u64) << 16);
        match entry.kind {
            SectionKind::Ram => all.extend(ram_variants(entries, section, &mut rng)),
            _ => {
                let start = entry.offset as usize;
                let payload = &original[start..start + entry.length as usize];
                let raw = data_variants(payload, &mut rng)
                    .into_iter()
                    .map(|(what, forged)| (what.to_string(), forged));
                let typed = typed_variants(entry, payload, &mut rng);
                for (what, forged) in raw.chain(typed) {
                    all.push(Variant {
                        section,
                        what,
                        entries: entries.to_vec(),
                        payload: Some(forged),
                        ram_flips: Vec::new(),
                    });
                }
            }
        }
    }
    all
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Refused,
    /// Restored; the guest ran until the test killed it or ended on its own.
    Accepted,
}

/// Restore `file` with its control socket in `rundir` and judge how bhyve behaved.
fn restore(file: &Path, rundir: &Path) -> Result<Outcome, String> {
    let mut cmd = common::bhyve();
    cmd.arg("-r").arg(file);
    cmd.arg("-o").arg(format!("rundir={}", rundir.display()));
    let mut vm = Console::spawn("bhyve -r", cmd);
    let started = Instant::now();
    let running = || std::fs::read_dir(rundir).is_ok_and(|mut d| d.next().is_some());
    let mut seen_running = false;
    let status = loop {
        match vm.try_wait_exit(Duration::from_millis(20)) {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(format!("cannot wait for bhyve: {e}")),
        }
        if running() {
            seen_running = true;
            // The control socket is opened once the restore is complete: the VM runs. Have
            // the guest touch the restored devices: PCI configuration and BARs (sized and
            // moved back), the RTC, the PM registers, the UART it talks through.
            // It may have ended already; how is judged below.
            let _ = vm.try_send(WORKOUT);
            match vm.try_wait_exit(RUN_FOR) {
                Ok(Some(status)) => break status,
                Ok(None) => {
                    let status = vm.kill().map_err(|e| format!("cannot kill bhyve: {e}"))?;
                    judge_end(&vm, status, Some(libc::SIGKILL))?;
                    return Ok(Outcome::Accepted);
                }
                Err(e) => return Err(format!("cannot wait for bhyve: {e}")),
            }
        }
        if started.elapsed() > RESTORE_TIMEOUT {
            let _ = vm.kill();
            return Err(format!(
                "neither failed nor running after {RESTORE_TIMEOUT:?}; stderr: {:?}",
                vm.stderr()
            ));
        }
    };
    judge_end(&vm, status, None)?;
    let err = vm.stderr();
    // bhyve(8)'s exit status: 0-3 say how the guest ended (reset, power-off, halt, triple
    // fault), so the restore went through; 4 is an error.
    if seen_running || matches!(status.code(), Some(0..=3)) {
        return Ok(Outcome::Accepted);
    }
    if status.code() != Some(ERROR_STATUS) {
        return Err(format!("ended with {status}: {err:?}"));
    }
    let lines: Vec<&str> = err.trim_end().lines().collect();
    if lines.len() != 1 || !lines[0].starts_with("bhyve: ") {
        return Err(format!(
            "refused ({status}) without exactly one 'bhyve: ' line: {err:?}"
        ));
    }
    Ok(Outcome::Refused)
}

/// The panic's location and message, without the backtrace.
fn panic_message(stderr: &str) -> String {
    let mut lines = stderr.lines().skip_while(|l| !l.contains("panicked"));
    let location = lines.next().unwrap_or(stderr.trim());
    format!("{location} {}", lines.next().unwrap_or(""))
}

/// No panic, no signal but the test's own.
fn judge_end(vm: &Console, status: ExitStatus, own_signal: Option<i32>) -> Result<(), String> {
    let err = vm.stderr();
    if err.contains("panicked") || status.code() == Some(101) {
        return Err(format!("panicked ({status}): {}", panic_message(&err)));
    }
    match status.signal() {
        Some(signal) if Some(signal) != own_signal => {
            Err(format!("killed by signal {signal}: {:?}", err.trim()))
        }
        _ => Ok(()),
    }
}

fn boot(scratch: &Scratch, name: &str) -> Console {
    let bhyve = Path::new(env!("CARGO_BIN_EXE_bhyve"));
    let extra = ["-c", "2", "-s", "4:0,dummy"];
    let cmd = console_vm_command_with(bhyve, MEMORY, &scratch.0, name, &extra);
    let mut vm = Console::spawn("bhyve", cmd);
    vm.expect(guest::READY, BOOT_TIMEOUT);
    vm.expect_prompt(COMMAND_TIMEOUT);
    vm
}

#[test]
fn forged_snapshots_are_refused_in_one_line_or_restored_never_a_panic_or_a_hang() {
    if !kvm_usable() {
        return;
    }
    let started = Instant::now();
    let scratch = Scratch::new("fuzz");
    let name = vm_name();
    let mut vm = boot(&scratch, &name);
    let file = scratch.path("good.snap");
    suspend(&scratch, &name, &mut vm, &file);

    let original = std::fs::read(&file).expect("read the snapshot");
    let entries = SnapshotReader::open(&file)
        .expect("the snapshot opens")
        .sections()
        .to_vec();
    for needed in [
        "vm", "vcpu", "pci", "uart", "rtc", "pm", "hpet", "config", "ram",
    ] {
        assert!(
            entries.iter().any(|e| e.name == needed),
            "no {needed} section in {entries:?}"
        );
    }
    assert_eq!(entries.iter().filter(|e| e.name == "vcpu").count(), 2);
    assert!(entries.iter().any(|e| e.instance.starts_with("dummy@")));

    let variants = variants(&original, &entries);
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, Result<Outcome, String>)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..RESTORES_AT_ONCE {
            s.spawn(|| loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(variant) = variants.get(index) else {
                    return;
                };
                let path = scratch.path(&format!("forged-{index}.snap"));
                std::fs::write(&path, variant.image(&original)).expect("write a forged file");
                let rundir = scratch.path(&format!("run-{index}"));
                std::fs::create_dir_all(&rundir).expect("create a run directory");
                common::writable_by_owner_only(&rundir);
                let result = restore(&path, &rundir);
                let _ = std::fs::remove_file(&path);
                let _ = std::fs::remove_dir_all(&rundir);
                results
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((index, result));
            });
        }
    });

    let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    assert_eq!(results.len(), variants.len(), "every variant ran");
    let mut counts: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
    let mut failures = Vec::new();
    for (index, result) in &results {
        let variant = &variants[*index];
        let count = counts.entry(variant.section).or_default();
        match result {
            Ok(Outcome::Refused) => count.0 += 1,
            // A configuration that does not describe the RAM in the file must not run.
            Ok(Outcome::Accepted) if variant.what.starts_with("memory.size=") => failures.push(
                format!("{}: restored with RAM it does not hold", variant.what),
            ),
            Ok(Outcome::Accepted) => count.1 += 1,
            Err(why) => failures.push(format!(
                "{} {}: {why}",
                entries[variant.section].label(),
                variant.what
            )),
        }
    }
    for (section, (refused, accepted)) in &counts {
        eprintln!(
            "forged {:<24} refused {refused:>2}, restored {accepted:>2}",
            entries[*section].label()
        );
    }
    for failure in &failures {
        eprintln!("FAILED {failure}");
    }
    eprintln!(
        "{} forged snapshots in {:.1} s",
        variants.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {} forged snapshots were mishandled:\n{}",
        failures.len(),
        variants.len(),
        failures.join("\n")
    );
}
