//! The HPET from the guest's side: found through the ACPI HPET table (RSDP → XSDT → HPET),
//! its registers read and written from ring 3 (the block lies in the uncached, user-accessible
//! top GiB of the identity map), its main counter measured against the ACPI PM timer and the
//! PIT, and its timer 0 interrupt taken through the I/O APIC by a short ring-0 handler (below).

use crate::acpi::{Acpi, Gas};
use crate::boot::TICKS;
use crate::svc;
use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};

/// The vector the I/O APIC delivers HPET timer 0's interrupt on.
pub const HPET_VECTOR: u8 = 0x50;
/// HPET interrupts taken.
#[no_mangle]
pub static HPET_IRQS: AtomicU64 = AtomicU64::new(0);

// Count the interrupt and end it at the local APIC (EOI register at 0xfee000b0).
global_asm!(
    r#"
    .section .text, "ax"
    .global irq_hpet
irq_hpet:
    pushq %rax
    lock incq HPET_IRQS(%rip)
    movabsq $0xfee000b0, %rax
    movl $0, (%rax)
    popq %rax
    iretq
    "#,
    options(att_syntax)
);

const IOAPIC_BASE: u64 = 0xfec0_0000;
const IOAPIC_WINDOW: u64 = 0x10;
const IOAPIC_MASKED: u32 = 1 << 16;
const LAPIC_ID: u64 = 0x20;
const TCNF_INT_ENB: u32 = 1 << 2;
const TCNF_TYPE: u32 = 1 << 3;
const TCNF_VAL_SET: u32 = 1 << 6;
const TCNF_ROUTE_SHIFT: u32 = 9;

const GAS_SYSTEM_MEMORY: u8 = 0;
const CAPABILITIES: u64 = 0x00;
const CONFIG: u64 = 0x10;
const MAIN_COUNTER: u64 = 0xf0;
const TIMER0_CONFIG: u64 = 0x100;
const TIMER0_COMPARATOR: u64 = 0x108;
const CNF_ENABLE: u32 = 1;
const FS_PER_S: u64 = 1_000_000_000_000_000;
const PMTMR_HZ: u64 = 3_579_545;

/// The HPET's register block, as the ACPI table gives it.
struct Hpet {
    base: u64,
}

impl Hpet {
    fn read(&self, offset: u64) -> u32 {
        // SAFETY: the block's address comes from the HPET table and lies in the identity map
        // (checked by `find`); the registers are 32-bit readable at 4-byte aligned offsets.
        unsafe { ((self.base + offset) as *const u32).read_volatile() }
    }

    fn write(&self, offset: u64, value: u32) {
        // SAFETY: as in `read`.
        unsafe { ((self.base + offset) as *mut u32).write_volatile(value) }
    }

    fn read64(&self, offset: u64) -> u64 {
        u64::from(self.read(offset)) | u64::from(self.read(offset + 4)) << 32
    }

    fn counter(&self) -> u32 {
        self.read(MAIN_COUNTER)
    }
}

/// The HPET of the ACPI tables, printing what the table says; `None` (with a line) without one.
fn find(acpi: &Acpi, verbose: bool) -> Option<Hpet> {
    let Some((id, Gas { space, address }, flags)) = acpi.hpet() else {
        println!("hpet: no HPET table");
        return None;
    };
    if verbose {
        println!("hpet table id {id:#010x} base {address:#x} space {space} flags {flags:#x}");
    }
    // The identity map covers the first 4 GiB.
    if space != GAS_SYSTEM_MEMORY || address % 8 != 0 || address >= (4 << 30) - 0x400 {
        println!("hpet: unusable register block {address:#x} in space {space}");
        return None;
    }
    Some(Hpet { base: address })
}

fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}

/// `hpet [ms]`: prints the table and the capabilities, enables the main counter and counts it
/// across ceil(ms*hz/1000) PIT ticks, reading it and the PM timer at every tick:
/// `hpet <Hz> Hz by pmtimer <Hz> Hz by pit over <n> ticks of <hz> Hz`.
pub fn measure(hz: u64, ms: u64) {
    let Some(acpi) = Acpi::discover() else {
        println!("hpet: no RSDP found");
        return;
    };
    let Some(hpet) = find(&acpi, true) else {
        return;
    };
    let caps = hpet.read64(CAPABILITIES);
    let period = caps >> 32;
    println!(
        "hpet caps vendor {:#06x} revision {} timers {} counter {}-bit legacy {} period {} fs",
        caps >> 16 & 0xffff,
        caps & 0xff,
        (caps >> 8 & 0x1f) + 1,
        if caps & 1 << 13 != 0 { 64 } else { 32 },
        if caps & 1 << 15 != 0 { "yes" } else { "no" },
        period
    );
    if period == 0 || period > 100_000_000 {
        println!("hpet: invalid period");
        return;
    }
    let config = hpet.read(CONFIG);
    hpet.write(CONFIG, config | CNF_ENABLE);
    println!(
        "hpet enabled, config {:#x} -> {:#x}",
        config,
        hpet.read(CONFIG)
    );
    let pm = acpi
        .fadt
        .and_then(|f| Some((f.pm_tmr_port()?, f.timer_32bit)));
    let pm_mask: u32 = match pm {
        Some((_, true)) => u32::MAX,
        _ => 0xff_ffff,
    };
    let read_pm = || pm.map_or(0, |(port, _)| svc::inl(port) & pm_mask);

    let n = (ms * hz).div_ceil(1000).max(1);
    let edge = ticks();
    while ticks() == edge {
        svc::wait_for_interrupt();
    }
    let start = ticks();
    let (mut last_hpet, mut last_pm) = (hpet.counter(), read_pm());
    let (mut hpet_counted, mut pm_counted) = (0u64, 0u64);
    // Read at every tick so that neither a 32-bit HPET counter (at 100 MHz, 43 s) nor a 24-bit
    // PM timer (4.7 s) can wrap unnoticed.
    while ticks() - start < n {
        svc::wait_for_interrupt();
        let (now_hpet, now_pm) = (hpet.counter(), read_pm());
        hpet_counted += u64::from(now_hpet.wrapping_sub(last_hpet));
        pm_counted += u64::from(now_pm.wrapping_sub(last_pm) & pm_mask);
        (last_hpet, last_pm) = (now_hpet, now_pm);
    }
    let by_pm = (hpet_counted * PMTMR_HZ)
        .checked_div(pm_counted)
        .unwrap_or(0);
    let divisor = ((crate::PIT_INPUT_HZ + hz / 2) / hz).clamp(1, 65535);
    let by_pit = hpet_counted * crate::PIT_INPUT_HZ / (divisor * n);
    println!(
        "hpet advertised {} Hz, {by_pm} Hz by pmtimer {by_pit} Hz by pit over {n} ticks of {hz} Hz",
        FS_PER_S / period
    );
}

fn ioapic_write(register: u32, value: u32) {
    // SAFETY: the I/O APIC's index and data registers at its architectural address, identity
    // mapped, user accessible and uncached.
    unsafe {
        (IOAPIC_BASE as *mut u32).write_volatile(register);
        ((IOAPIC_BASE + IOAPIC_WINDOW) as *mut u32).write_volatile(value);
    }
}

/// Route I/O APIC input `pin` to [`HPET_VECTOR`] on this CPU, edge triggered, or mask it.
fn ioapic_route(pin: u32, on: bool) {
    let apic_id = crate::smp::lapic_read(LAPIC_ID) >> 24;
    ioapic_write(0x11 + 2 * pin, apic_id << 24);
    let masked = if on { 0 } else { IOAPIC_MASKED };
    ioapic_write(0x10 + 2 * pin, u32::from(HPET_VECTOR) | masked);
}

/// Sleeps until `n` timer ticks have passed or `done` holds; returns the ticks waited.
fn wait_ticks(n: u64, done: impl Fn() -> bool) -> u64 {
    let start = ticks();
    while ticks() - start < n && !done() {
        svc::wait_for_interrupt();
    }
    ticks() - start
}

/// `hpet irq`: routes timer 0 to the highest I/O APIC input its capabilities allow, as an edge
/// interrupt on [`HPET_VECTOR`]; arms it one-shot 10 ms ahead and waits (up to 1 s) for the
/// interrupt, then periodic every 10 ms for half a second of PIT ticks, printing
/// `hpet irq pin <n> one-shot <irqs> after <ticks> ticks periodic <irqs> in <ticks> ticks of
/// <hz> Hz`. The timer and the I/O APIC input are switched off again afterwards.
pub fn irq(hz: u64) {
    let Some(hpet) = Acpi::discover().and_then(|acpi| find(&acpi, false)) else {
        return;
    };
    let period = hpet.read64(CAPABILITIES) >> 32;
    let allowed = hpet.read(TIMER0_CONFIG + 4);
    let Some(pin) = (16..32).rev().find(|pin| allowed & (1 << pin) != 0) else {
        println!("hpet irq: timer 0 has no I/O APIC input at 16 or above ({allowed:#x})");
        return;
    };
    if period == 0 || period > 100_000_000 {
        println!("hpet irq: invalid period");
        return;
    }
    // Counter ticks in 10 ms.
    let ticks_10ms = (10_000_000_000_000 / period) as u32;
    let config = hpet.read(CONFIG);
    hpet.write(CONFIG, config | CNF_ENABLE);
    ioapic_route(pin, true);
    let route = pin << TCNF_ROUTE_SHIFT | TCNF_INT_ENB;

    let before = HPET_IRQS.load(Ordering::Relaxed);
    hpet.write(TIMER0_CONFIG, route);
    hpet.write(TIMER0_COMPARATOR, hpet.counter().wrapping_add(ticks_10ms));
    let one_shot_ticks = wait_ticks(hz, || HPET_IRQS.load(Ordering::Relaxed) != before);
    // Let a second, wrong, interrupt show up if there is one.
    wait_ticks(hz / 20 + 1, || false);
    let one_shot = HPET_IRQS.load(Ordering::Relaxed) - before;

    // Periodic: the comparator first (VAL_SET), then the period.
    hpet.write(TIMER0_CONFIG, route | TCNF_TYPE | TCNF_VAL_SET);
    let edge = ticks();
    while ticks() == edge {
        svc::wait_for_interrupt();
    }
    let before = HPET_IRQS.load(Ordering::Relaxed);
    hpet.write(TIMER0_COMPARATOR, hpet.counter().wrapping_add(ticks_10ms));
    hpet.write(TIMER0_COMPARATOR, ticks_10ms);
    let n = (hz / 2).max(1);
    let waited = wait_ticks(n, || false);
    let periodic = HPET_IRQS.load(Ordering::Relaxed) - before;

    hpet.write(TIMER0_CONFIG, 0);
    ioapic_route(pin, false);
    println!(
        "hpet irq pin {pin} one-shot {one_shot} after {one_shot_ticks} ticks periodic {periodic} in {waited} ticks of {hz} Hz"
    );
}

/// `hpet state`: `hpet config 0x<16 hex> counter 0x<8 hex> timer0 config 0x<16 hex> comparator
/// 0x<16 hex>`.
pub fn state() {
    let Some(hpet) = Acpi::discover().and_then(|acpi| find(&acpi, false)) else {
        return;
    };
    println!(
        "hpet config {:#018x} counter {:#010x} timer0 config {:#018x} comparator {:#018x}",
        hpet.read64(CONFIG),
        hpet.counter(),
        hpet.read64(TIMER0_CONFIG),
        hpet.read64(TIMER0_COMPARATOR)
    );
}

/// `hpet comparator <value>`: writes timer 0's comparator (low 32 bits), then prints `state`.
pub fn set_comparator(value: u32) {
    let Some(hpet) = Acpi::discover().and_then(|acpi| find(&acpi, false)) else {
        return;
    };
    hpet.write(TIMER0_COMPARATOR, value);
    state();
}
