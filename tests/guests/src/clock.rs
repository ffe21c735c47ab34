//! The guest's own clock for the device benchmarks: the TSC, read in ring 3 without an exit,
//! calibrated once against the ACPI PM timer (3.579545 MHz, a fixed rate both VMMs derive from
//! the host's clock). Each end of the calibration takes the PM timer reading whose surrounding
//! TSC reads are closest together, so a host preemption in the middle of one read does not skew
//! the rate.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::acpi::Acpi;
use crate::svc;

const PMTMR_HZ: u64 = 3_579_545;
/// How long the calibration runs, in PM timer ticks (100 ms).
const CALIBRATION_TICKS: u64 = PMTMR_HZ / 10;
/// PM timer reads per end of the calibration: the tightest one is kept.
const SAMPLES: usize = 8;

static TSC_HZ: AtomicU64 = AtomicU64::new(0);

pub fn tsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter; CR4.TSD is clear, so ring 3 may use it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// (TSC at the middle of the read, PM timer value) for the tightest of [`SAMPLES`] reads.
fn paired_read(port: u16, mask: u32) -> (u64, u32) {
    let mut best = (u64::MAX, 0, 0);
    for _ in 0..SAMPLES {
        let before = tsc();
        let pm = svc::inl(port) & mask;
        let after = tsc();
        let width = after.wrapping_sub(before);
        if width < best.0 {
            best = (width, before + width / 2, pm);
        }
    }
    (best.1, best.2)
}

/// The TSC's rate in Hz, measured on first use; `None` without a PM timer.
pub fn tsc_hz() -> Option<u64> {
    let known = TSC_HZ.load(Ordering::Relaxed);
    if known != 0 {
        return Some(known);
    }
    let fadt = Acpi::discover()?.fadt?;
    let port = fadt.pm_tmr_port()?;
    let mask: u32 = if fadt.timer_32bit {
        u32::MAX
    } else {
        0xff_ffff
    };
    let (tsc0, pm0) = paired_read(port, mask);
    // 100 ms is well inside the 24-bit counter's 4.7 s period.
    let mut pm_elapsed = 0u64;
    while pm_elapsed < CALIBRATION_TICKS {
        pm_elapsed = u64::from((svc::inl(port) & mask).wrapping_sub(pm0) & mask);
    }
    let (tsc1, pm1) = paired_read(port, mask);
    let ticks = u64::from(pm1.wrapping_sub(pm0) & mask);
    let cycles = tsc1.wrapping_sub(tsc0);
    let hz = u64::try_from(u128::from(cycles) * u128::from(PMTMR_HZ) / u128::from(ticks.max(1)))
        .ok()
        .filter(|&hz| hz > 0)?;
    TSC_HZ.store(hz, Ordering::Relaxed);
    Some(hz)
}

/// A span of guest time measured with the TSC.
pub struct Stopwatch {
    start: u64,
    hz: u64,
}

impl Stopwatch {
    pub fn start(hz: u64) -> Stopwatch {
        Stopwatch { start: tsc(), hz }
    }

    pub fn elapsed_ns(&self) -> u64 {
        let cycles = tsc().wrapping_sub(self.start);
        (u128::from(cycles) * 1_000_000_000 / u128::from(self.hz)) as u64
    }
}

/// Repeats `request` (which returns whether it succeeded) until `ms` milliseconds of guest time
/// have passed, and prints `<what> requests <n> bytes <n * bytes> ns <elapsed> errors <failed>`.
pub fn run_for(what: core::fmt::Arguments, ms: u64, bytes: u64, mut request: impl FnMut() -> bool) {
    let Some(hz) = tsc_hz() else {
        println!("{what}: no PM timer to calibrate the TSC against");
        return;
    };
    let limit = ms * 1_000_000;
    let watch = Stopwatch::start(hz);
    let (mut requests, mut errors) = (0u64, 0u64);
    let mut elapsed = 0;
    while elapsed < limit {
        if !request() {
            errors += 1;
        }
        requests += 1;
        elapsed = watch.elapsed_ns();
    }
    println!(
        "{what} requests {requests} bytes {} ns {elapsed} errors {errors}",
        requests * bytes
    );
}
