//! The HPET from the guest's side: found through the ACPI HPET table (RSDP → XSDT → HPET),
//! its registers read and written from ring 3 (the block lies in the uncached, user-accessible
//! top GiB of the identity map), and its main counter measured against the ACPI PM timer and
//! the PIT.

use crate::acpi::{Acpi, Gas};
use crate::boot::TICKS;
use crate::svc;
use core::sync::atomic::Ordering;

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
