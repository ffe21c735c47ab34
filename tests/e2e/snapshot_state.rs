//! Saved state is complete: a guest suspended to A, restored from A and checkpointed again at
//! once to B gives a B equal to A section by section, except where time is kept, and there time
//! only moves forward. Needs /dev/kvm (skips with a message without it, fails if
//! BHYVE_RS_REQUIRE_KVM=1).
// The section layouts compared are KVM's.
#![cfg(target_os = "linux")]

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bhyve::devices::pm::{PmState, PMTMR_FREQ};
use bhyve::devices::rtc::RtcState;
use bhyve::snapshot::backend_state::decode_backend_state;
use bhyve::snapshot::{SnapshotReader, HEADER_FLAG_SUSPENDED};
use bhyve::vmm::BackendState;
use common::control::{bhyvectl, Scratch};
use common::guest;
use common::{
    console_vm_command_with, kvm_usable, vm_name, Console, BOOT_TIMEOUT, COMMAND_TIMEOUT,
};
use kvm_bindings::{kvm_clock_data, kvm_lapic_state, kvm_pit_state2};

const SAVE_TIMEOUT: Duration = Duration::from_secs(60);
/// The guest's free range starts at 4 MiB; `memfill 16` fills [4 MiB, 20 MiB).
const FILL_GPA: u64 = 4 << 20;
const FILL_MIB: u64 = 16;
/// How long the VM stays suspended: kvm-clock must not count it.
const SUSPENDED_FOR: Duration = Duration::from_secs(3);

const MSR_IA32_TSC: u32 = 0x10;
/// LAPIC register offsets: timer current count, interrupt request and in-service registers.
const APIC_TMCCT: usize = 0x390;

fn ctl(rundir: &Path, name: &str, arg: String) -> (i32, String, String) {
    let out = Command::new(bhyvectl())
        .arg(format!("--vm={name}"))
        .arg(format!("--rundir={}", rundir.display()))
        .arg(arg)
        .output()
        .expect("run bhyvectl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The console guest with the devices bhyve-rs emulates: host bridge, LPC with the COM ports,
/// and the `dummy` PCI device. (pc-testdev's IRQ ports would collide with the dummy's I/O BAR
/// at 0x2000, as in bhyve; its state is covered by the devices' unit tests.)
fn boot(rundir: &Path, name: &str) -> Console {
    let bhyve = Path::new(env!("CARGO_BIN_EXE_bhyve"));
    let cmd = console_vm_command_with(bhyve, "256M", rundir, name, &["-s", "4:0,dummy"]);
    let mut console = Console::spawn("bhyve", cmd);
    console.expect(guest::READY, BOOT_TIMEOUT);
    console.expect_prompt(COMMAND_TIMEOUT);
    console
}

fn pod<T: Default + Copy>(bytes: &[u8]) -> T {
    assert_eq!(bytes.len(), std::mem::size_of::<T>(), "section size");
    let mut value = T::default();
    // SAFETY: T is one of the kvm-bindings structs of plain integers, so any bytes of its size
    // form a valid value; the length was checked above.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            (&mut value as *mut T).cast::<u8>(),
            bytes.len(),
        )
    };
    value
}

fn msrs(bytes: &[u8]) -> Vec<(u32, u64)> {
    bytes
        .chunks_exact(12)
        .map(|c| {
            (
                u32::from_le_bytes(c[..4].try_into().unwrap()),
                u64::from_le_bytes(c[4..].try_into().unwrap()),
            )
        })
        .collect()
}

fn backend(reader: &SnapshotReader, name: &str, instance: &str) -> BackendState {
    let section = reader
        .section(name, instance)
        .unwrap_or_else(|| panic!("no section {name}/{instance}"));
    decode_backend_state(section.payload).expect("decode backend state")
}

fn sub<'a>(state: &'a BackendState, name: &str) -> &'a [u8] {
    state
        .section(name)
        .unwrap_or_else(|| panic!("no sub-section {name}"))
}

/// Bytes of guest memory at `gpa` as stored in the snapshot (holes read as zero).
fn ram(path: &Path, reader: &SnapshotReader, gpa: u64, len: usize) -> Vec<u8> {
    let region = reader
        .ram_regions()
        .iter()
        .find(|r| r.gpa <= gpa && gpa + len as u64 <= r.gpa + r.size)
        .expect("a RAM region holds the range");
    let mut bytes = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut bytes, region.file_offset + (gpa - region.gpa))
        .unwrap();
    bytes
}

/// `kvm_irqchip` bytes without the request bits of the PIT's line (PIC IRQ 0, I/O APIC pins 0
/// and 2). The PIT runs in the kernel and keeps ticking while the VM is paused for a save, so
/// either snapshot may hold a tick that was raised but not yet taken; that is timer state.
fn without_timer_edges(chip: &str, bytes: &[u8]) -> Vec<u8> {
    // Offsets in kvm_irqchip: chip id and padding (8 bytes), then the chip's state.
    const PIC_LAST_IRR: usize = 8;
    const PIC_IRR: usize = 9;
    const IOAPIC_IRR: usize = 24;
    let mut bytes = bytes.to_vec();
    if chip == "ioapic" {
        bytes[IOAPIC_IRR] &= !0b101;
    } else if chip == "pic_master" {
        bytes[PIC_LAST_IRR] &= !1;
        bytes[PIC_IRR] &= !1;
    }
    bytes
}

/// Whether the snapshot caught the guest at rest: vCPU 0 halted and no interrupt in service,
/// i.e. not in the middle of its (emulated, slow) timer interrupt handler.
fn at_rest(path: &Path) -> bool {
    const PIC_ISR: usize = 11;
    const KVM_MP_STATE_HALTED: u32 = 3;
    let reader = SnapshotReader::open(path).expect("open snapshot");
    let vm = backend(&reader, "vm", "");
    let vcpu = backend(&reader, "vcpu", "0");
    let halted = sub(&vcpu, "mp_state") == KVM_MP_STATE_HALTED.to_ne_bytes();
    halted && sub(&vm, "pic_master")[PIC_ISR] == 0 && sub(&vm, "pic_slave")[PIC_ISR] == 0
}

fn resume(rundir: &Path, name: &str, file: &Path) -> Console {
    let mut cmd = common::bhyve();
    cmd.arg("-r").arg(file);
    cmd.arg("-o").arg(format!("rundir={}", rundir.display()));
    let console = Console::spawn("bhyve -r", cmd);
    let socket = rundir.join(name);
    let deadline = Instant::now() + BOOT_TIMEOUT;
    while !socket.exists() {
        assert!(Instant::now() < deadline, "no control socket after restore");
        std::thread::sleep(Duration::from_millis(10));
    }
    console
}

/// Fails with a short account of where `a` and `b` differ (sizes, the number of differing bytes
/// and the first few offsets) rather than both arrays in full.
fn assert_same_bytes(a: &[u8], b: &[u8], what: &str) {
    if a == b {
        return;
    }
    let differing: Vec<usize> = (0..a.len().min(b.len()))
        .filter(|&i| a[i] != b[i])
        .collect();
    let first: Vec<String> = differing
        .iter()
        .take(8)
        .map(|&i| format!("{i:#x}: {:#04x} vs {:#04x}", a[i], b[i]))
        .collect();
    panic!(
        "{what}: {} and {} bytes, {} differ; first at {}",
        a.len(),
        b.len(),
        differing.len(),
        if first.is_empty() {
            "the end of the shorter".to_string()
        } else {
            first.join(", ")
        }
    );
}

/// XSAVE header: XSTATE_BV, the state components that are not in their initial configuration.
const XSTATE_BV: usize = 512;

/// An XSAVE area (standard format, as KVM_GET_XSAVE gives it) with every component's value
/// spelled out: a component whose XSTATE_BV bit is clear holds its initial value, whatever the
/// bytes say, and the bit itself is dropped. The processor may clear the bit of a component
/// that is back in its initial configuration (or keep it set) as it likes, so only this form
/// says whether two areas hold the same state.
fn xsave_values(area: &[u8]) -> Vec<u8> {
    let mut values = area.to_vec();
    let present = u64::from_le_bytes(area[XSTATE_BV..XSTATE_BV + 8].try_into().unwrap());
    values[XSTATE_BV..XSTATE_BV + 8].fill(0);
    if present & 1 == 0 {
        // x87: FCW 0x037F, everything else up to FDP zero (MXCSR at 24 is SSE's), ST0-ST7 zero.
        values[..24].fill(0);
        values[..2].copy_from_slice(&0x037fu16.to_le_bytes());
        values[32..160].fill(0);
    }
    if present & 2 == 0 {
        values[160..416].fill(0); // XMM0-XMM15
    }
    for component in 2..63 {
        if present & (1 << component) != 0 {
            continue;
        }
        #[allow(unused_unsafe)] // `__cpuid_count` is safe in newer compilers
        // SAFETY: CPUID exists on every x86-64 CPU; leaf 0xD describes the host's (and so the
        // guest's) XSAVE layout, and an unknown component reads as size 0.
        let leaf = unsafe { std::arch::x86_64::__cpuid_count(0xd, component) };
        let (size, offset) = (leaf.eax as usize, leaf.ebx as usize);
        // Supervisor components (offset 0) are not in the standard-format area.
        if size != 0 && offset != 0 && offset + size <= values.len() {
            values[offset..offset + size].fill(0);
        }
    }
    values
}

/// Tries before giving up on catching the guest at rest.
const TRIES: usize = 8;

/// Compare the `vm` sections: the interrupt controllers must be equal; kvm-clock and the PIT's
/// load timestamps are clocks. Returns how far kvm-clock moved, in ns.
fn compare_vm(a: &BackendState, b: &BackendState) -> u64 {
    let names = |s: &BackendState| {
        s.sections
            .iter()
            .map(|x| x.name.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(a), names(b));
    for chip in ["pic_master", "pic_slave", "ioapic"] {
        assert_same_bytes(
            &without_timer_edges(chip, sub(a, chip)),
            &without_timer_edges(chip, sub(b, chip)),
            &format!("vm/{chip} changed"),
        );
    }
    // kvm-clock: guest nanoseconds. It went on counting while B's VM ran, never back.
    let (clock_a, clock_b) = (
        pod::<kvm_clock_data>(sub(a, "clock")).clock,
        pod::<kvm_clock_data>(sub(b, "clock")).clock,
    );
    assert!(
        clock_b > clock_a,
        "kvm-clock went from {clock_a} to {clock_b}"
    );
    // PIT: every channel's programming and count are the guest's; `count_load_time` is the
    // host time the count was (re)loaded, which a restore sets to the time of the restore.
    let (mut pit_a, mut pit_b) = (
        pod::<kvm_pit_state2>(sub(a, "pit2")),
        pod::<kvm_pit_state2>(sub(b, "pit2")),
    );
    for (ca, cb) in pit_a.channels.iter_mut().zip(pit_b.channels.iter_mut()) {
        assert!(
            cb.count_load_time >= ca.count_load_time,
            "PIT load time went back"
        );
        ca.count_load_time = 0;
        cb.count_load_time = 0;
    }
    assert_eq!(
        format!("{pit_a:?}"),
        format!("{pit_b:?}"),
        "PIT programming changed"
    );
    clock_b - clock_a
}

/// Compare one `vcpu` section: all equal but the TSC, which only moves forward, and the LAPIC
/// timer's current count.
fn compare_vcpu(a: &BackendState, b: &BackendState) {
    let names = |s: &BackendState| {
        s.sections
            .iter()
            .map(|x| x.name.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(a), names(b));
    for name in names(a) {
        match name.as_str() {
            "msrs" => {
                let (ma, mb) = (msrs(sub(a, "msrs")), msrs(sub(b, "msrs")));
                assert_eq!(ma.len(), mb.len(), "MSR lists differ");
                for (&(index, va), &(index_b, vb)) in ma.iter().zip(&mb) {
                    assert_eq!(index, index_b);
                    if index == MSR_IA32_TSC {
                        assert!(vb > va, "TSC went from {va} to {vb}");
                    } else {
                        assert_eq!(va, vb, "MSR {index:#x} changed");
                    }
                }
            }
            "lapic" => {
                let (mut la, mut lb) = (
                    pod::<kvm_lapic_state>(sub(a, "lapic")),
                    pod::<kvm_lapic_state>(sub(b, "lapic")),
                );
                // The timer's current count counts down with time (0 while it is unused).
                la.regs[APIC_TMCCT..APIC_TMCCT + 4].fill(0);
                lb.regs[APIC_TMCCT..APIC_TMCCT + 4].fill(0);
                assert_same_bytes(
                    &la.regs.map(|r| r as u8),
                    &lb.regs.map(|r| r as u8),
                    "LAPIC registers changed",
                );
            }
            "xsave" => assert_same_bytes(
                &xsave_values(sub(a, "xsave")),
                &xsave_values(sub(b, "xsave")),
                "vcpu/xsave changed (values, initial state spelled out)",
            ),
            other => assert_same_bytes(
                sub(a, other),
                sub(b, other),
                &format!("vcpu/{other} changed"),
            ),
        }
    }
}

/// RTC: registers equal but the clock's (seconds to year, and the century); the time it shows
/// moved forward.
fn compare_rtc(a: &RtcState, b: &RtcState) {
    let (ta, tb) = (
        a.rtc_time.expect("RTC running"),
        b.rtc_time.expect("RTC running"),
    );
    assert!(tb >= ta, "RTC went from {ta} to {tb}");
    const CLOCK_REGISTERS: [usize; 8] = [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32];
    let mask = |s: &RtcState| {
        let mut r = s.registers.clone();
        for i in CLOCK_REGISTERS {
            r[i] = 0;
        }
        r
    };
    assert_eq!(mask(a), mask(b), "RTC registers changed");
    assert_eq!(a.addr, b.addr);
}

/// ACPI PM registers: equal but the PM timer (3.579545 MHz, 32 bits), which counted on from
/// A's value for no longer than the restored VM existed.
fn compare_pm(a: &PmState, b: &PmState, lived: Duration) {
    let ticks = b.timer.wrapping_sub(a.timer);
    let most = lived.as_secs_f64() * PMTMR_FREQ as f64;
    assert!(
        ticks > 0 && f64::from(ticks) <= most,
        "PM timer moved {ticks} ticks in {lived:?}"
    );
    let without_timer = |s: &PmState| PmState { timer: 0, ..*s };
    assert_eq!(without_timer(a), without_timer(b), "PM registers changed");
}

#[test]
fn a_snapshot_of_a_restored_guest_equals_the_one_it_came_from_but_for_clocks() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("state");
    let rundir = &scratch.0;
    let name = vm_name();
    let mut vm = boot(rundir, &name);
    let fill = vm.command_line(&format!("memfill {FILL_MIB} 4242"));
    assert_eq!(fill, guest::memfill_line(FILL_MIB, 4242));

    // Suspend to A; the guest must be at rest in it, or B could not match (see `at_rest`).
    let mut a = None;
    for attempt in 0..TRIES {
        let file = rundir.join(format!("a{attempt}.snap"));
        let (code, _, err) = ctl(rundir, &name, format!("--suspend={}", file.display()));
        assert_eq!(code, 0, "bhyvectl --suspend failed: {err}");
        assert_eq!(vm.wait_exit(SAVE_TIMEOUT).code(), Some(0));
        if at_rest(&file) {
            a = Some(file);
            break;
        }
        vm = resume(rundir, &name, &file);
        std::thread::sleep(Duration::from_millis(50));
    }
    let a = a.expect("the guest was never at rest when suspended");
    std::thread::sleep(SUSPENDED_FOR);

    // Restore and checkpoint again straight away: the guest sits at its prompt meanwhile.
    let restored_at = Instant::now();
    let mut vm = resume(rundir, &name, &a);
    // Let the restored vCPU run for a little while (tens of timer ticks) before B.
    std::thread::sleep(Duration::from_millis(300));
    let mut b = None;
    for attempt in 0..TRIES {
        let file = rundir.join(format!("b{attempt}.snap"));
        let (code, _, err) = ctl(rundir, &name, format!("--checkpoint={}", file.display()));
        assert_eq!(code, 0, "bhyvectl --checkpoint failed: {err}");
        if at_rest(&file) {
            b = Some(file);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let b = b.expect("the guest was never at rest when checkpointed");
    let restore_to_b = restored_at.elapsed();
    // The restored guest carries on after B, with its memory intact.
    let sum = vm.command_line(&format!("memsum {FILL_MIB}"));
    assert_eq!(
        sum,
        fill.replace(
            &format!("memfill {FILL_MIB} MiB seed 4242"),
            &format!("memsum {FILL_MIB} MiB")
        ),
    );
    vm.send_line("halt");
    assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));

    let (code, text_a, err) = ctl(rundir, &name, format!("--inspect-snapshot={}", a.display()));
    assert_eq!(code, 0, "{err}");
    assert!(text_a.contains("(suspended)"), "{text_a}");
    let (code, text_b, err) = ctl(rundir, &name, format!("--inspect-snapshot={}", b.display()));
    assert_eq!(code, 0, "{err}");
    assert!(!text_b.contains("(suspended)"), "{text_b}");

    let ra = SnapshotReader::open(&a).expect("open A");
    let rb = SnapshotReader::open(&b).expect("open B");
    assert_ne!(ra.header().flags & HEADER_FLAG_SUSPENDED, 0);
    assert_eq!(rb.header().flags & HEADER_FLAG_SUSPENDED, 0);
    assert_eq!(ra.config(), rb.config(), "configuration changed");

    let labels = |r: &SnapshotReader| {
        r.sections()
            .iter()
            .map(|s| (s.name.clone(), s.instance.clone(), s.version))
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(labels(&ra), labels(&rb), "different sections");
    // Every device of the VM is in the file.
    for (section, instance) in [
        ("pci", "hostbridge@pci.0.0.0"),
        ("pci", "dummy@pci.0.4.0"),
        ("pci", "lpc@pci.0.31.0"),
        ("uart", "com1"),
        ("rtc", ""),
        ("pm", ""),
        ("hpet", ""),
        ("vm", ""),
        ("vcpu", "0"),
    ] {
        assert!(
            ra.section(section, instance).is_some(),
            "A lacks {section}/{instance}"
        );
    }

    let mut compared = 0;
    for entry in ra.sections() {
        let (name, instance) = (entry.name.as_str(), entry.instance.as_str());
        if name == "ram" || name == "ram-index" {
            continue;
        }
        let (sa, sb) = (
            ra.section(name, instance).unwrap(),
            rb.section(name, instance).unwrap(),
        );
        match name {
            "vm" => {
                let moved = compare_vm(&backend(&ra, "vm", ""), &backend(&rb, "vm", ""));
                // The suspended seconds did not pass for the guest: kvm-clock moved by no more
                // than the restored VM existed.
                assert!(
                    u128::from(moved) <= restore_to_b.as_nanos(),
                    "kvm-clock moved {moved} ns in {restore_to_b:?}"
                );
            }
            "vcpu" => compare_vcpu(
                &backend(&ra, "vcpu", instance),
                &backend(&rb, "vcpu", instance),
            ),
            "rtc" => compare_rtc(&sa.decode().unwrap(), &sb.decode().unwrap()),
            "pm" => compare_pm(&sa.decode().unwrap(), &sb.decode().unwrap(), restore_to_b),
            _ => assert_same_bytes(
                sa.payload,
                sb.payload,
                &format!("{name}/{instance} changed"),
            ),
        }
        compared += 1;
    }
    assert!(compared >= 10, "only {compared} sections compared");

    // Guest memory: the region the test filled is byte for byte the same. (Elsewhere the
    // guest's timer tick counter and stack change while it runs.)
    let len = (FILL_MIB << 20) as usize;
    let (fill_a, fill_b) = (ram(&a, &ra, FILL_GPA, len), ram(&b, &rb, FILL_GPA, len));
    assert!(
        fill_a.iter().any(|&b| b != 0),
        "filled region is empty in A"
    );
    assert!(
        fill_a == fill_b,
        "the filled memory differs between A and B"
    );
}

/// A vCPU state of one `xsave` section.
fn with_xsave(area: Vec<u8>) -> BackendState {
    BackendState {
        backend: "kvm".to_string(),
        sections: vec![bhyve::vmm::StateSection {
            name: "xsave".to_string(),
            bytes: area,
        }],
    }
}

/// The area as it was when the comparison failed: SSE marked in use in A and not in B, with
/// the same (initial) register values in both.
fn sse_in_use(in_use: bool) -> Vec<u8> {
    let mut area = vec![0u8; 4096];
    area[..2].copy_from_slice(&0x037fu16.to_le_bytes());
    area[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
    area[XSTATE_BV] = 1 | if in_use { 2 } else { 0 };
    area
}

#[test]
fn xsave_areas_with_the_same_values_compare_equal_however_the_cpu_marked_them() {
    compare_vcpu(
        &with_xsave(sse_in_use(true)),
        &with_xsave(sse_in_use(false)),
    );
    // x87 in its initial configuration with the bit clear, as XSAVEOPT may leave it.
    let mut untouched = sse_in_use(false);
    untouched[..2].fill(0);
    untouched[XSTATE_BV] = 0;
    compare_vcpu(&with_xsave(sse_in_use(false)), &with_xsave(untouched));
}

#[test]
#[should_panic(expected = "vcpu/xsave changed")]
fn xsave_area_that_lost_an_sse_register_compares_different() {
    let mut a = sse_in_use(true);
    a[160] = 0x2a; // XMM0
    let mut b = a.clone();
    b[XSTATE_BV] = 1; // XMM0 back to its initial value: lost
    compare_vcpu(&with_xsave(a), &with_xsave(b));
}

#[test]
fn a_byte_difference_is_told_in_a_line() {
    let a = vec![0u8; 25 << 10];
    let mut b = a.clone();
    b[512] = 2;
    b[9000] = 1;
    let message = std::panic::catch_unwind(|| assert_same_bytes(&a, &b, "vcpu/xsave changed"))
        .expect_err("different")
        .downcast::<String>()
        .expect("a formatted message");
    assert_eq!(
        *message,
        "vcpu/xsave changed: 25600 and 25600 bytes, 2 differ; first at 0x200: 0x00 vs 0x02, \
         0x2328: 0x00 vs 0x01"
    );
}
