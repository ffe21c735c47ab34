//! The HPET (high precision event timer) as FreeBSD's vmm presents it
//! (`sys/amd64/vmm/io/vhpet.c`, registers from `sys/dev/acpica/acpi_hpet.h`). On FreeBSD the
//! kernel provides it; on KVM it lives here, so a guest sees the same platform on both:
//!
//! * 1 KiB of MMIO at [`HPET_BASE`] (0xFED00000). Accesses must be 4 or 8 bytes wide and
//!   naturally aligned; anything else reads 0 and writes nothing. A 4-byte access at `reg + 4`
//!   reaches the upper half of a 64-bit register.
//! * Capabilities ([`capabilities`]): vendor 0x8086, revision 1, [`NUM_TIMERS`] timers, a
//!   32-bit main counter, no legacy-replacement routing, and the period of a 2^24 Hz
//!   (16.777216 MHz) counter in femtoseconds.
//! * Configuration: every bit is writable except legacy replacement (LEG_RT), which always
//!   reads 0; ENABLE starts and stops the main counter. The main counter is 32 bits, derived
//!   from the host's monotonic clock, and writable (zero-extended).
//! * Each timer: 32-bit comparator (32MODE never reads set), periodic capable, FSB (MSI)
//!   capable, and routable to the I/O APIC pins [`allowed_irqs`] gives (the top four of a
//!   24-pin I/O APIC, 20-23; 24-31 of a 32-pin one). A route to another pin is dropped to 0
//!   (not connected). One-shot timers fire when the counter passes the comparator; periodic
//!   ones re-arm by their period, missed periods collapsing into one interrupt. As in vhpet,
//!   (re)starting a periodic timer moves its comparator by whole periods, modulo 2^32, to the
//!   first value past the counter, so a comparator set ahead of the counter may read back
//!   smaller; the first interrupt still comes within one period. One departure from vhpet: a
//!   one-shot timer served on the very tick it matched waits for the counter to wrap, where
//!   vhpet's handler re-arms it for "now" and interrupts a second time. Edge interrupts
//!   are pulsed; level ones set the timer's bit in the interrupt status register and hold the
//!   line high until the guest writes that bit back as 1 or reconfigures the timer.
//! * Timers fire from a [`Ticker`] thread ([`HpetDevice`]), which [`Hpet::pause`] stops from
//!   touching state or interrupts (snapshots); the counter itself follows host time throughout.
//! * A snapshot holds the registers and the counter's value when saved (`HpetState`); a
//!   restore counts on from that value and re-arms the timers from it, as vhpet's
//!   `vhpet_restore_time` does.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::registry::{CreatePlatform, PlatformDevice, PlatformPlan};
use super::rtc::{HostClock, RtcClock};
use super::ticker::{Ticker, TickerWake, Ticking};
use super::{DeviceError, StateId, Stateful};
use crate::bus::{Bus, BusDevice};
use crate::interrupts::InterruptSink;

/// Guest-physical base of the registers (bhyve's `VHPET_BASE`, `BHYVE_ADDRESS_HPET`).
pub const HPET_BASE: u64 = 0xfed0_0000;
/// Length of the register block (`VHPET_SIZE`, `HPET_MEM_WIDTH`).
pub const HPET_SIZE: u64 = 0x400;
/// Main counter frequency.
pub const HPET_FREQ: u64 = 1 << 24;
/// Timers in the block (vhpet's `VHPET_NUM_TIMERS`).
pub const NUM_TIMERS: usize = 8;

const FS_PER_S: u64 = 1_000_000_000_000_000;
const NS_PER_S: u128 = 1_000_000_000;
const VENDOR_INTEL: u64 = 0x8086;
const REVISION: u64 = 1;

/// General registers.
const CAPABILITIES: u64 = 0x00;
const CONFIG: u64 = 0x10;
const ISR: u64 = 0x20;
const MAIN_COUNTER: u64 = 0xf0;
/// Per-timer registers: timer `n` at `TIMER_BASE + n * TIMER_STRIDE`.
const TIMER_BASE: u64 = 0x100;
const TIMER_STRIDE: u64 = 0x20;
const TIMER_CAP_CNF: u64 = 0x00;
const TIMER_COMPARATOR: u64 = 0x08;
const TIMER_FSB_VAL: u64 = 0x10;
const TIMER_FSB_ADDR: u64 = 0x14;

/// Capabilities register bits.
pub const CAP_LEG_RT: u64 = 1 << 15;
pub const CAP_COUNT_SIZE: u64 = 1 << 13;
/// General configuration bits.
pub const CNF_ENABLE: u64 = 1 << 0;
pub const CNF_LEG_RT: u64 = 1 << 1;
/// Timer configuration and capabilities bits.
pub const TCAP_INT_ROUTE: u64 = 0xffff_ffff_0000_0000;
pub const TCAP_FSB_INT_DEL: u64 = 1 << 15;
pub const TCNF_FSB_EN: u64 = 1 << 14;
pub const TCNF_INT_ROUTE: u64 = 0x3e00;
pub const TCNF_32MODE: u64 = 1 << 8;
pub const TCNF_VAL_SET: u64 = 1 << 6;
pub const TCAP_SIZE: u64 = 1 << 5;
pub const TCAP_PER_INT: u64 = 1 << 4;
pub const TCNF_TYPE: u64 = 1 << 3;
pub const TCNF_INT_ENB: u64 = 1 << 2;
pub const TCNF_INT_TYPE: u64 = 1 << 1;
const TCAP_RO_MASK: u64 = TCAP_INT_ROUTE | TCAP_FSB_INT_DEL | TCAP_SIZE | TCAP_PER_INT;
const TCNF_ROUTE_SHIFT: u32 = 9;

/// The capabilities register: what the guest reads at offset 0 and what bhyve writes, low half,
/// as the ACPI HPET table's hardware block id.
pub fn capabilities() -> u64 {
    let low = VENDOR_INTEL << 16 | (NUM_TIMERS as u64 - 1) << 8 | REVISION;
    // CAP_COUNT_SIZE clear: a 32-bit counter. CAP_LEG_RT clear: no legacy replacement.
    (FS_PER_S / HPET_FREQ) << 32 | low
}

/// The I/O APIC pins a timer may be routed to, one bit per pin, for an I/O APIC with
/// `ioapic_pins` inputs (vhpet_init): 24-31 with 32 pins or more, the top four with 20 to 31,
/// none below.
pub fn allowed_irqs(ioapic_pins: u32) -> u32 {
    match ioapic_pins {
        32.. => 0xff00_0000,
        20..=31 => 0xf << (ioapic_pins - 4),
        _ => 0,
    }
}

/// Main-counter ticks in `elapsed`, truncated as the 32-bit counter wraps.
fn ticks_in(elapsed: Duration) -> u32 {
    (elapsed.as_nanos() * u128::from(HPET_FREQ) / NS_PER_S) as u32
}

/// The time `ticks` counts take, rounded up so the counter has reached them by then.
fn duration_of(ticks: u64) -> Duration {
    let ns = (u128::from(ticks) * NS_PER_S).div_ceil(u128::from(HPET_FREQ));
    Duration::from_nanos(ns as u64)
}

/// Replace the bits of `reg` selected by `mask` with those of `data`.
fn update_register(reg: &mut u64, data: u64, mask: u64) {
    *reg = (*reg & !mask) | (data & mask);
}

#[derive(Debug, Clone, Copy, Default)]
struct Timer {
    cap_config: u64,
    /// FSB route: address in the upper half, data in the lower.
    msireg: u64,
    compval: u32,
    /// Period of a periodic timer, 0 for one-shot.
    comprate: u32,
    /// Host uptime at which the counter reaches `compval`, while the counter runs.
    deadline: Option<Duration>,
}

/// Everything a snapshot must carry (vhpet_snapshot's fields, the counter as read when saved).
#[cfg(feature = "bhyve_snapshot")]
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HpetState {
    pub config: u64,
    pub isr: u64,
    /// The main counter's value when saved.
    pub counter: u32,
    pub timers: Vec<HpetTimerState>,
}

/// One timer's registers in a snapshot.
#[cfg(feature = "bhyve_snapshot")]
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HpetTimerState {
    pub cap_config: u64,
    pub msireg: u64,
    pub comparator: u32,
    pub period: u32,
}

/// The HPET's registers and timers.
pub struct Hpet {
    clock: Box<dyn RtcClock>,
    interrupts: Arc<dyn InterruptSink>,
    wake: TickerWake,
    config: u64,
    isr: u64,
    /// Counter value at `countbase_time` (the value itself while the counter is stopped).
    countbase: u32,
    countbase_time: Duration,
    timers: [Timer; NUM_TIMERS],
    /// While set, [`Hpet::poll`] leaves registers and interrupt lines alone (snapshots).
    paused: bool,
}

impl Hpet {
    /// An HPET in its reset state (counter stopped at 0, every comparator 0xFFFFFFFF), whose
    /// timers may be routed to the pins [`allowed_irqs`] allows for `ioapic_pins`.
    pub fn new(
        clock: Box<dyn RtcClock>,
        interrupts: Arc<dyn InterruptSink>,
        ioapic_pins: u32,
    ) -> Self {
        let timer = Timer {
            cap_config: u64::from(allowed_irqs(ioapic_pins)) << 32
                | TCAP_PER_INT
                | TCAP_FSB_INT_DEL,
            compval: u32::MAX,
            ..Timer::default()
        };
        Self {
            clock,
            interrupts,
            wake: TickerWake::default(),
            config: 0,
            isr: 0,
            countbase: 0,
            countbase_time: Duration::ZERO,
            timers: [timer; NUM_TIMERS],
            paused: false,
        }
    }

    fn counter_enabled(&self) -> bool {
        self.config & CNF_ENABLE != 0
    }

    /// The main counter at host uptime `now`.
    fn counter(&self, now: Duration) -> u32 {
        if self.counter_enabled() {
            self.countbase
                .wrapping_add(ticks_in(now.saturating_sub(self.countbase_time)))
        } else {
            self.countbase
        }
    }

    fn msi_enabled(&self, n: usize) -> bool {
        let both = TCAP_FSB_INT_DEL | TCNF_FSB_EN;
        self.timers[n].cap_config & both == both
    }

    /// The I/O APIC pin timer `n` drives, 0 for none (also while it uses FSB delivery).
    fn ioapic_pin(&self, n: usize) -> u32 {
        if self.msi_enabled(n) {
            0
        } else {
            ((self.timers[n].cap_config & TCNF_INT_ROUTE) >> TCNF_ROUTE_SHIFT) as u32
        }
    }

    fn periodic(&self, n: usize) -> bool {
        self.timers[n].cap_config & TCNF_TYPE != 0
    }

    fn interrupt_enabled(&self, n: usize) -> bool {
        self.timers[n].cap_config & TCNF_INT_ENB != 0
    }

    fn edge_triggered(&self, n: usize) -> bool {
        self.timers[n].cap_config & TCNF_INT_TYPE == 0
    }

    fn set_line(&self, pin: u32, high: bool) {
        if let Err(e) = self.interrupts.set_irq_line(pin, high) {
            log::warn!("hpet: cannot drive I/O APIC pin {pin}: {e}");
        }
    }

    fn clear_isr(&mut self, n: usize) {
        if self.isr & (1 << n) != 0 {
            let pin = self.ioapic_pin(n);
            if pin != 0 {
                self.set_line(pin, false);
            }
            self.isr &= !(1 << n);
        }
    }

    /// Timer `n` reached its comparator: interrupt the guest as the timer is configured.
    fn timer_interrupt(&mut self, n: usize) {
        if !self.interrupt_enabled(n) || self.isr & (1 << n) != 0 {
            return;
        }
        if self.msi_enabled(n) {
            let msireg = self.timers[n].msireg;
            if let Err(e) = self.interrupts.signal_msi(msireg >> 32, msireg as u32) {
                log::warn!("hpet: cannot deliver timer {n}'s FSB interrupt: {e}");
            }
            return;
        }
        let pin = self.ioapic_pin(n);
        if pin == 0 {
            return;
        }
        if self.edge_triggered(n) {
            self.set_line(pin, true);
            self.set_line(pin, false);
        } else {
            self.isr |= 1 << n;
            self.set_line(pin, true);
        }
    }

    /// Next comparator value of a periodic timer: the first multiple of its period past
    /// `counter` (missed periods collapse into one interrupt).
    fn adjust_compval(&mut self, n: usize, counter: u32) {
        let timer = &mut self.timers[n];
        let (compval, rate) = (timer.compval, timer.comprate);
        let periods = counter.wrapping_sub(compval) / rate + 1;
        timer.compval = compval.wrapping_add(periods.wrapping_mul(rate));
    }

    /// Arm timer `n` for when the counter, `counter` at `now`, reaches its comparator. In
    /// one-shot mode a comparator behind the counter fires only after the counter wraps, as on
    /// hardware.
    fn start_timer(&mut self, n: usize, counter: u32, now: Duration) {
        if self.timers[n].comprate != 0 {
            self.adjust_compval(n, counter);
        }
        let delta = self.timers[n].compval.wrapping_sub(counter);
        self.timers[n].deadline = Some(now + duration_of(delta.into()));
    }

    /// Disarm timer `n`; a deadline already past that the thread has not served yet fires now,
    /// so stopping the counter cannot lose an interrupt.
    fn stop_timer(&mut self, n: usize, now: Duration) {
        if let Some(deadline) = self.timers[n].deadline.take() {
            if deadline < now {
                self.timer_interrupt(n);
            }
        }
    }

    fn start_counting(&mut self, now: Duration) {
        self.countbase_time = now;
        for n in 0..NUM_TIMERS {
            self.start_timer(n, self.countbase, now);
        }
    }

    fn stop_counting(&mut self, counter: u32, now: Duration) {
        self.countbase = counter;
        for n in 0..NUM_TIMERS {
            self.stop_timer(n, now);
        }
    }

    fn update_timer_config(&mut self, n: usize, data: u64, mask: u64) {
        let old_pin = self.ioapic_pin(n);
        let oldval = self.timers[n].cap_config;
        let mut newval = oldval;
        update_register(&mut newval, data, mask);
        newval &= !(TCAP_RO_MASK | TCNF_32MODE);
        newval |= oldval & TCAP_RO_MASK;
        if newval == oldval {
            return;
        }
        self.timers[n].cap_config = newval;

        // A route to a pin the capabilities do not offer falls back to "not connected".
        let allowed = (newval >> 32) as u32;
        let new_pin = self.ioapic_pin(n);
        if new_pin != 0 && allowed & (1 << new_pin) == 0 {
            log::debug!("hpet: timer {n} routed to pin {new_pin}, allowed {allowed:#010x}");
            self.timers[n].cap_config &= !TCNF_INT_ROUTE;
        }
        if !self.periodic(n) {
            self.timers[n].comprate = 0;
        }
        // A level interrupt must not stay asserted once nothing would ever clear it.
        if self.isr & (1 << n) != 0 {
            let clear = !self.interrupt_enabled(n)
                || self.msi_enabled(n)
                || self.edge_triggered(n)
                || self.ioapic_pin(n) != old_pin;
            if clear {
                if old_pin != 0 {
                    self.set_line(old_pin, false);
                }
                self.isr &= !(1 << n);
            }
        }
    }

    fn write_comparator(&mut self, n: usize, data: u64, mask: u64) {
        let (old_compval, old_comprate) = (self.timers[n].compval, self.timers[n].comprate);
        if self.periodic(n) {
            // In periodic mode a write sets the period, and the comparator too only while
            // VAL_SET is on.
            let mut value = u64::from(self.timers[n].comprate);
            update_register(&mut value, data, mask);
            self.timers[n].comprate = value as u32;
            if self.timers[n].cap_config & TCNF_VAL_SET != 0 {
                self.timers[n].compval = value as u32;
            }
        } else {
            let mut value = u64::from(self.timers[n].compval);
            update_register(&mut value, data, mask);
            self.timers[n].compval = value as u32;
        }
        self.timers[n].cap_config &= !TCNF_VAL_SET;
        let changed =
            self.timers[n].compval != old_compval || self.timers[n].comprate != old_comprate;
        if changed && self.counter_enabled() {
            let now = self.clock.uptime();
            let counter = self.counter(now);
            self.start_timer(n, counter, now);
        }
    }

    fn write_register(&mut self, offset: u64, data: u64, mask: u64) {
        let now = self.clock.uptime();
        match offset & !4 {
            CONFIG => {
                let counter = self.counter(now);
                let oldval = self.config;
                update_register(&mut self.config, data, mask);
                // Legacy replacement routing is not offered.
                self.config &= !CNF_LEG_RT;
                if (oldval ^ self.config) & CNF_ENABLE != 0 {
                    if self.counter_enabled() {
                        self.start_counting(now);
                    } else {
                        self.stop_counting(counter, now);
                    }
                }
            }
            ISR => {
                let clear = self.isr & data;
                for n in 0..NUM_TIMERS {
                    if clear & (1 << n) != 0 {
                        self.clear_isr(n);
                    }
                }
            }
            MAIN_COUNTER => {
                let mut value = u64::from(self.counter(now));
                update_register(&mut value, data, mask);
                self.countbase = value as u32;
                if self.counter_enabled() {
                    self.start_counting(now);
                }
            }
            _ => {
                let Some((n, register)) = timer_register(offset) else {
                    return;
                };
                match register {
                    TIMER_CAP_CNF => self.update_timer_config(n, data, mask),
                    TIMER_COMPARATOR => self.write_comparator(n, data, mask),
                    _ => update_register(&mut self.timers[n].msireg, data, mask),
                }
            }
        }
    }

    fn read_register(&self, offset: u64) -> u64 {
        match offset & !4 {
            CAPABILITIES => capabilities(),
            CONFIG => self.config,
            ISR => self.isr,
            MAIN_COUNTER => u64::from(self.counter(self.clock.uptime())),
            _ => match timer_register(offset) {
                Some((n, TIMER_CAP_CNF)) => self.timers[n].cap_config,
                Some((n, TIMER_COMPARATOR)) => u64::from(self.timers[n].compval),
                Some((n, _)) => self.timers[n].msireg,
                None => 0,
            },
        }
    }

    /// Fire the timers whose comparator the counter has reached; returns how long until the
    /// next one, or `None` while the counter is stopped or the device paused.
    pub fn poll(&mut self) -> Option<Duration> {
        if self.paused || !self.counter_enabled() {
            return None;
        }
        let now = self.clock.uptime();
        for n in 0..NUM_TIMERS {
            if self.timers[n].deadline.is_some_and(|d| d <= now) {
                let counter = self.counter(now);
                self.start_timer(n, counter, now);
                if self.timers[n].deadline == Some(now) {
                    // A one-shot timer served the very tick it matched: its next match is a
                    // counter wrap away, not now again.
                    self.timers[n].deadline = Some(now + duration_of(1 << 32));
                }
                self.timer_interrupt(n);
            }
        }
        self.timers
            .iter()
            .filter_map(|t| t.deadline)
            .min()
            .map(|d| d.saturating_sub(now))
    }

    /// Stop [`Hpet::poll`] from changing state or raising interrupts.
    pub fn pause(&mut self) {
        self.paused = true;
    }

    /// Undo [`Hpet::pause`]; timers that came due meanwhile fire at the next poll.
    pub fn resume(&mut self) {
        self.paused = false;
        self.wake.wake();
    }
}

/// Timer number and register (offset inside the timer's block) that `offset` addresses, for
/// the registers that exist: configuration and comparator (either half), FSB value and address.
fn timer_register(offset: u64) -> Option<(usize, u64)> {
    let index = offset.checked_sub(TIMER_BASE)? / TIMER_STRIDE;
    let n = usize::try_from(index).ok().filter(|&n| n < NUM_TIMERS)?;
    let register = (offset - TIMER_BASE) % TIMER_STRIDE;
    match register {
        TIMER_CAP_CNF | TIMER_COMPARATOR | TIMER_FSB_VAL | TIMER_FSB_ADDR => Some((n, register)),
        r if r == TIMER_CAP_CNF + 4 || r == TIMER_COMPARATOR + 4 => Some((n, r & !4)),
        _ => None,
    }
}

#[cfg(feature = "bhyve_snapshot")]
impl Hpet {
    /// The registers, with the counter as it reads now.
    pub fn save_state(&self) -> HpetState {
        HpetState {
            config: self.config,
            isr: self.isr,
            counter: self.counter(self.clock.uptime()),
            timers: self
                .timers
                .iter()
                .map(|t| HpetTimerState {
                    cap_config: t.cap_config,
                    msireg: t.msireg,
                    comparator: t.compval,
                    period: t.comprate,
                })
                .collect(),
        }
    }

    /// Load `state`: the counter counts on from its saved value and the timers are re-armed
    /// from it. Capability bits stay this HPET's own; a route it does not allow is dropped, and
    /// a level interrupt that was asserted is asserted again.
    pub fn restore_state(&mut self, state: &HpetState) -> Result<(), String> {
        if state.timers.len() != NUM_TIMERS {
            return Err(format!(
                "hpet: {} timers saved, this HPET has {NUM_TIMERS}",
                state.timers.len()
            ));
        }
        for n in 0..NUM_TIMERS {
            self.clear_isr(n);
        }
        for (n, saved) in state.timers.iter().enumerate() {
            let ours = self.timers[n].cap_config;
            let timer = &mut self.timers[n];
            timer.cap_config =
                (saved.cap_config & !(TCAP_RO_MASK | TCNF_32MODE)) | (ours & TCAP_RO_MASK);
            timer.msireg = saved.msireg;
            timer.compval = saved.comparator;
            timer.comprate = saved.period;
            timer.deadline = None;
            let pin = self.ioapic_pin(n);
            if pin != 0 && (ours >> 32) & (1 << pin) == 0 {
                self.timers[n].cap_config &= !TCNF_INT_ROUTE;
            }
            if !self.periodic(n) {
                self.timers[n].comprate = 0;
            }
        }
        self.config = state.config & !CNF_LEG_RT;
        self.isr = 0;
        for n in 0..NUM_TIMERS {
            let asserted = state.isr & (1 << n) != 0;
            if asserted
                && self.interrupt_enabled(n)
                && !self.msi_enabled(n)
                && !self.edge_triggered(n)
                && self.ioapic_pin(n) != 0
            {
                self.isr |= 1 << n;
                self.set_line(self.ioapic_pin(n), true);
            }
        }
        let now = self.clock.uptime();
        self.countbase = state.counter;
        self.countbase_time = now;
        if self.counter_enabled() {
            self.start_counting(now);
        }
        self.wake.wake();
        Ok(())
    }
}

impl Ticking for Hpet {
    fn poll(&mut self) -> Option<Duration> {
        Hpet::poll(self)
    }
}

/// The access's 64-bit data and the mask of the register bits it covers, or `None` for an
/// access vhpet ignores (not 4 or 8 bytes, or not naturally aligned).
fn access(offset: u64, len: usize) -> Option<u64> {
    let mask = match len {
        8 => u64::MAX,
        4 if offset & 4 != 0 => 0xffff_ffff_0000_0000,
        4 => 0xffff_ffff,
        _ => return None,
    };
    (offset % len as u64 == 0).then_some(mask)
}

impl BusDevice for Hpet {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let value = match access(offset, data.len()) {
            Some(_) if data.len() == 4 && offset & 4 != 0 => self.read_register(offset) >> 32,
            Some(_) => self.read_register(offset),
            None => {
                log::debug!("hpet: ignored {}-byte read at {offset:#x}", data.len());
                0
            }
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(bytes.len());
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(mask) = access(offset, data.len()) else {
            log::debug!("hpet: ignored {}-byte write at {offset:#x}", data.len());
            return;
        };
        let mut bytes = [0u8; 8];
        bytes[..data.len()].copy_from_slice(data);
        let mut value = u64::from_le_bytes(bytes);
        if mask == 0xffff_ffff_0000_0000 {
            value <<= 32;
        }
        self.write_register(offset, value, mask);
        // The guest may have moved a deadline earlier than the thread's current sleep.
        self.wake.wake();
    }
}

/// The HPET as the VM's device list holds it: the register model and its timer thread, which
/// stops when the device goes away.
pub struct HpetDevice {
    hpet: Arc<Mutex<Hpet>>,
    ticker: Ticker,
}

pub const DEVICE: PlatformDevice = PlatformDevice { name: "hpet", plan };

/// Every VM has an HPET; it lives here unless the backend's kernel provides it (FreeBSD's
/// vhpet), with timers routable to the pins the kernel's I/O APIC has.
fn plan(plan: &mut PlatformPlan<'_>) -> Result<Option<CreatePlatform>, DeviceError> {
    if plan.platform.kernel_hpet {
        return Ok(None);
    }
    let ioapic_pins = u32::from(plan.platform.ioapic_pins);
    Ok(Some(Box::new(move |create| {
        let device = HpetDevice::attach(&create.buses.mmio, create.interrupts.clone(), ioapic_pins)
            .map_err(DeviceError::Platform)?;
        Ok(vec![Arc::new(device) as Arc<dyn Stateful>])
    })))
}

impl HpetDevice {
    /// Create the HPET paused (see [`Stateful::resume`]), in its reset state, with timers
    /// routable as [`allowed_irqs`] says for `ioapic_pins`; claim [`HPET_BASE`] on `mmio` and
    /// start its timer thread.
    pub fn attach(
        mmio: &Bus,
        interrupts: Arc<dyn InterruptSink>,
        ioapic_pins: u32,
    ) -> Result<Self, String> {
        let mut hpet = Hpet::new(Box::new(HostClock::new()), interrupts, ioapic_pins);
        hpet.pause();
        let wake = hpet.wake.clone();
        let hpet = Arc::new(Mutex::new(hpet));
        mmio.insert(HPET_BASE, HPET_SIZE, hpet.clone())
            .map_err(|e| format!("hpet: cannot claim {HPET_BASE:#x}: {e}"))?;
        let ticker = Ticker::start("hpet", hpet.clone(), wake)
            .map_err(|e| format!("hpet: cannot start its timer thread: {e}"))?;
        Ok(Self { hpet, ticker })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Hpet> {
        self.hpet.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Stateful for HpetDevice {
    fn id(&self) -> StateId {
        StateId::single("hpet")
    }

    fn pause(&self) {
        self.lock().pause();
    }

    fn resume(&self) {
        self.lock().resume();
    }

    fn stop(&self) {
        self.ticker.stop();
    }
}

#[cfg(feature = "bhyve_snapshot")]
impl crate::devices::Persist for HpetDevice {
    fn state_version(&self) -> u32 {
        1
    }

    fn save(&self) -> Result<Vec<u8>, String> {
        let state = self.lock().save_state();
        crate::snapshot::encode_section(&state).map_err(|e| e.to_string())
    }

    fn restore(&self, section: &crate::snapshot::Section<'_>) -> Result<(), String> {
        let state: HpetState = section.decode().map_err(|e| e.to_string())?;
        self.lock().restore_state(&state)
    }

    /// Snapshots written before the HPET existed have no section: the HPET stays in its reset
    /// state, as the guest never saw one.
    fn accepts_missing_state(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Event {
        Line(u32, bool),
        Msi(u64, u32),
    }

    #[derive(Default)]
    struct Events(Mutex<Vec<Event>>);

    impl Events {
        fn take(&self) -> Vec<Event> {
            std::mem::take(&mut self.0.lock().unwrap())
        }
    }

    impl InterruptSink for Events {
        fn set_irq_line(&self, gsi: u32, high: bool) -> io::Result<()> {
            self.0.lock().unwrap().push(Event::Line(gsi, high));
            Ok(())
        }
        fn signal_msi(&self, address: u64, data: u32) -> io::Result<()> {
            self.0.lock().unwrap().push(Event::Msi(address, data));
            Ok(())
        }
        fn set_isa_irq_trigger(&self, _irq: u8, _level: bool) -> io::Result<()> {
            Ok(())
        }
    }

    /// Host uptime under the test's control.
    struct FakeClock(Arc<Mutex<Duration>>);

    impl RtcClock for FakeClock {
        fn unix_time(&self) -> i64 {
            0
        }
        fn uptime(&self) -> Duration {
            *self.0.lock().unwrap()
        }
    }

    struct Fixture {
        hpet: Hpet,
        events: Arc<Events>,
        now: Arc<Mutex<Duration>>,
    }

    /// One main-counter tick.
    const TICK_NS: f64 = 1e9 / HPET_FREQ as f64;

    fn fixture(ioapic_pins: u32) -> Fixture {
        let now = Arc::new(Mutex::new(Duration::from_secs(100)));
        let events = Arc::new(Events::default());
        let hpet = Hpet::new(
            Box::new(FakeClock(now.clone())),
            events.clone(),
            ioapic_pins,
        );
        Fixture { hpet, events, now }
    }

    impl Fixture {
        fn read(&mut self, offset: u64, len: usize) -> u64 {
            let mut data = [0u8; 8];
            self.hpet.read(HPET_BASE, offset, &mut data[..len]);
            u64::from_le_bytes(data)
        }
        fn read64(&mut self, offset: u64) -> u64 {
            self.read(offset, 8)
        }
        fn write(&mut self, offset: u64, len: usize, value: u64) {
            self.hpet
                .write(HPET_BASE, offset, &value.to_le_bytes()[..len]);
        }
        fn write64(&mut self, offset: u64, value: u64) {
            self.write(offset, 8, value);
        }
        fn advance(&self, by: Duration) {
            *self.now.lock().unwrap() += by;
        }
        fn advance_ticks(&self, ticks: u64) {
            self.advance(Duration::from_nanos((ticks as f64 * TICK_NS).ceil() as u64));
        }
        fn counter(&mut self) -> u64 {
            self.read64(MAIN_COUNTER)
        }
    }

    fn cnf(n: usize) -> u64 {
        TIMER_BASE + n as u64 * TIMER_STRIDE
    }
    fn cmp(n: usize) -> u64 {
        cnf(n) + TIMER_COMPARATOR
    }

    /// Route timer `n` to `pin` with interrupts on, edge or level.
    fn route(f: &mut Fixture, n: usize, pin: u64, level: bool, extra: u64) {
        let trigger = if level { TCNF_INT_TYPE } else { 0 };
        f.write64(
            cnf(n),
            pin << TCNF_ROUTE_SHIFT | TCNF_INT_ENB | trigger | extra,
        );
    }

    #[test]
    fn capabilities_are_vhpets() {
        let mut f = fixture(24);
        // Vendor 8086, 8 timers (field = 7), revision 1, 32-bit counter, no legacy route,
        // period 10^15 / 2^24 fs.
        let expected = 59_604_644u64 << 32 | 0x8086_0701;
        assert_eq!(capabilities(), expected);
        assert_eq!(f.read64(CAPABILITIES), expected);
        assert_eq!(f.read(CAPABILITIES, 4), 0x8086_0701);
        assert_eq!(f.read(CAPABILITIES + 4, 4), 59_604_644);
        assert_eq!(capabilities() & (CAP_COUNT_SIZE | CAP_LEG_RT), 0);
        // Read-only.
        f.write64(CAPABILITIES, 0);
        assert_eq!(f.read64(CAPABILITIES), expected);
    }

    #[test]
    fn timers_offer_the_io_apic_pins_vhpet_allows() {
        assert_eq!(allowed_irqs(32), 0xff00_0000);
        assert_eq!(allowed_irqs(24), 0x00f0_0000);
        assert_eq!(allowed_irqs(20), 0x000f_0000);
        assert_eq!(allowed_irqs(16), 0);
        let mut f = fixture(24);
        for n in 0..NUM_TIMERS {
            assert_eq!(
                f.read64(cnf(n)),
                0x00f0_0000 << 32 | TCAP_FSB_INT_DEL | TCAP_PER_INT,
                "timer {n}"
            );
            assert_eq!(f.read64(cmp(n)), 0xffff_ffff, "timer {n}");
        }
        // Past the last timer, and holes between registers, read as zero.
        assert_eq!(f.read64(cnf(NUM_TIMERS)), 0);
        assert_eq!(f.read64(cnf(0) + 0x18), 0);
        assert_eq!(f.read64(0x08), 0);
    }

    #[test]
    fn configuration_keeps_everything_but_legacy_replacement() {
        let mut f = fixture(24);
        f.write64(CONFIG, u64::MAX);
        assert_eq!(f.read64(CONFIG), !CNF_LEG_RT);
        f.write(CONFIG + 4, 4, 0);
        assert_eq!(f.read64(CONFIG), 0xffff_ffff & !CNF_LEG_RT);
        f.write(CONFIG, 4, 0);
        assert_eq!(f.read64(CONFIG), 0);
    }

    #[test]
    fn the_counter_runs_at_2_pow_24_hz_only_while_enabled_and_is_writable() {
        let mut f = fixture(24);
        f.advance(Duration::from_secs(1));
        assert_eq!(f.counter(), 0, "stopped after reset");
        f.write64(CONFIG, CNF_ENABLE);
        f.advance(Duration::from_secs(1));
        assert_eq!(f.counter(), HPET_FREQ);
        f.advance(Duration::from_millis(500));
        assert_eq!(f.counter(), HPET_FREQ * 3 / 2);
        // Disabling freezes it where it was.
        f.write64(CONFIG, 0);
        f.advance(Duration::from_secs(1));
        assert_eq!(f.counter(), HPET_FREQ * 3 / 2);
        // Writes while stopped set it; the upper half is ignored (32-bit counter).
        f.write64(MAIN_COUNTER, 0x1_0000_0010);
        assert_eq!(f.counter(), 0x10);
        f.write(MAIN_COUNTER, 4, 0x20);
        assert_eq!(f.read(MAIN_COUNTER + 4, 4), 0);
        assert_eq!(f.read(MAIN_COUNTER, 4), 0x20);
        // It wraps at 32 bits.
        f.write64(MAIN_COUNTER, 0xffff_fff0);
        f.write64(CONFIG, CNF_ENABLE);
        f.advance_ticks(0x20);
        assert_eq!(f.counter(), 0x10);
    }

    #[test]
    fn timer_configuration_keeps_read_only_bits_and_refuses_other_pins() {
        let mut f = fixture(24);
        let caps = f.read64(cnf(1));
        f.write64(cnf(1), !TCNF_FSB_EN);
        let value = f.read64(cnf(1));
        // Capabilities unchanged, 32MODE never set, pin 31 not allowed: route 0.
        assert_eq!(value & TCAP_RO_MASK, caps & TCAP_RO_MASK);
        assert_eq!(value & TCNF_32MODE, 0);
        assert_eq!(value & TCNF_INT_ROUTE, 0);
        // Every other bit, reserved ones included, is kept as written (vhpet masks nothing
        // else).
        assert_eq!(
            value & !TCAP_RO_MASK,
            0xffff_ffff & !(TCAP_RO_MASK | TCNF_32MODE | TCNF_FSB_EN | TCNF_INT_ROUTE)
        );
        // As in vhpet, a timer on FSB delivery keeps whatever route is written: it is not
        // connected to the I/O APIC, so the route is not checked.
        f.write64(cnf(1), u64::MAX);
        assert_eq!(f.read64(cnf(1)) & TCNF_INT_ROUTE, TCNF_INT_ROUTE);
        route(&mut f, 1, 21, false, 0);
        assert_eq!(f.read64(cnf(1)) & TCNF_INT_ROUTE, 21 << TCNF_ROUTE_SHIFT);
        route(&mut f, 1, 2, false, 0);
        assert_eq!(f.read64(cnf(1)) & TCNF_INT_ROUTE, 0);
        // A 32-pin I/O APIC offers 24-31.
        let mut f = fixture(32);
        route(&mut f, 0, 31, false, 0);
        assert_eq!(f.read64(cnf(0)) & TCNF_INT_ROUTE, 31 << TCNF_ROUTE_SHIFT);
    }

    #[test]
    fn a_one_shot_edge_timer_pulses_once_when_the_counter_reaches_the_comparator() {
        let mut f = fixture(24);
        route(&mut f, 0, 20, false, 0);
        f.write64(CONFIG, CNF_ENABLE);
        f.write64(cmp(0), 1000);
        let wait = f.hpet.poll().expect("armed");
        assert_eq!(wait, duration_of(1000));
        f.advance_ticks(999);
        f.hpet.poll();
        assert!(f.events.take().is_empty(), "fired early");
        f.advance_ticks(1);
        let next = f.hpet.poll().expect("re-armed for the wrap");
        assert_eq!(
            f.events.take(),
            [Event::Line(20, true), Event::Line(20, false)]
        );
        assert_eq!(f.read64(ISR), 0, "edge interrupts leave no status");
        // One-shot: the next match is a full counter wrap (2^32 ticks, 256 s) away.
        assert!(next > Duration::from_secs(255), "{next:?}");
        f.advance(Duration::from_secs(1));
        f.hpet.poll();
        assert!(f.events.take().is_empty());
    }

    #[test]
    fn a_periodic_timer_fires_every_period_and_collapses_missed_ones() {
        let mut f = fixture(24);
        route(&mut f, 2, 22, false, TCNF_TYPE | TCNF_VAL_SET);
        f.write64(cmp(2), 500);
        assert_eq!(f.read64(cmp(2)), 500);
        assert_eq!(f.read64(cnf(2)) & TCNF_VAL_SET, 0, "cleared by the write");
        // Without VAL_SET a write changes only the period.
        f.write64(cmp(2), 100);
        assert_eq!(f.read64(cmp(2)), 500);
        // Starting the counter moves the comparator by whole periods, modulo 2^32, to the first
        // value past the counter (vhpet_adjust_compval): 500 + k * 100 wraps to 4.
        f.write64(CONFIG, CNF_ENABLE);
        assert_eq!(f.read64(cmp(2)), 4);
        f.advance_ticks(4);
        f.hpet.poll();
        assert_eq!(f.events.take().len(), 2);
        assert_eq!(f.read64(cmp(2)), 104);
        f.advance_ticks(100);
        f.hpet.poll();
        assert_eq!(f.events.take().len(), 2);
        assert_eq!(f.read64(cmp(2)), 204);
        // Ten periods late: one interrupt, comparator on the next boundary.
        f.advance_ticks(1000);
        f.hpet.poll();
        assert_eq!(f.events.take().len(), 2);
        assert_eq!(f.read64(cmp(2)), 1204);
        // Back to one-shot: the period is dropped.
        route(&mut f, 2, 22, false, 0);
        f.write64(cmp(2), 5000);
        assert_eq!(f.read64(cmp(2)), 5000);
    }

    #[test]
    fn a_level_timer_holds_its_line_until_the_guest_clears_its_status_bit() {
        let mut f = fixture(24);
        route(&mut f, 3, 23, true, TCNF_TYPE | TCNF_VAL_SET);
        f.write64(cmp(3), 100);
        f.write64(CONFIG, CNF_ENABLE);
        f.hpet.poll();
        f.advance_ticks(100);
        f.hpet.poll();
        assert_eq!(f.events.take(), [Event::Line(23, true)]);
        assert_eq!(f.read64(ISR), 1 << 3);
        // Still asserted: the next period raises nothing more.
        f.advance_ticks(100);
        f.hpet.poll();
        assert!(f.events.take().is_empty());
        // Writing 0 changes nothing; writing the bit clears it and drops the line.
        f.write64(ISR, 0);
        assert_eq!(f.read64(ISR), 1 << 3);
        f.write64(ISR, 1 << 3);
        assert_eq!(f.events.take(), [Event::Line(23, false)]);
        assert_eq!(f.read64(ISR), 0);
        // Asserted again, then switched to edge: the status clears and the line drops.
        f.advance_ticks(100);
        f.hpet.poll();
        assert_eq!(f.events.take(), [Event::Line(23, true)]);
        route(&mut f, 3, 23, false, TCNF_TYPE);
        assert_eq!(f.events.take(), [Event::Line(23, false)]);
        assert_eq!(f.read64(ISR), 0);
    }

    #[test]
    fn fsb_delivery_sends_the_programmed_message() {
        let mut f = fixture(24);
        f.write(cnf(4) + TIMER_FSB_VAL, 4, 0x4041);
        f.write(cnf(4) + TIMER_FSB_ADDR, 4, 0xfee0_1000);
        assert_eq!(f.read64(cnf(4) + TIMER_FSB_VAL), 0xfee0_1000_0000_4041);
        assert_eq!(f.read(cnf(4) + TIMER_FSB_ADDR, 4), 0xfee0_1000);
        // Routed to pin 20 as well: FSB delivery wins.
        route(&mut f, 4, 20, false, TCNF_FSB_EN);
        f.write64(cmp(4), 10);
        f.write64(CONFIG, CNF_ENABLE);
        f.advance_ticks(10);
        f.hpet.poll();
        assert_eq!(f.events.take(), [Event::Msi(0xfee0_1000, 0x4041)]);
    }

    #[test]
    fn disabled_interrupts_and_unrouted_timers_stay_silent() {
        let mut f = fixture(24);
        f.write64(cnf(0), 20 << TCNF_ROUTE_SHIFT);
        f.write64(cnf(1), TCNF_INT_ENB);
        f.write64(cmp(0), 10);
        f.write64(cmp(1), 10);
        f.write64(CONFIG, CNF_ENABLE);
        f.advance_ticks(10);
        f.hpet.poll();
        assert!(f.events.take().is_empty());
        assert_eq!(f.read64(ISR), 0);
    }

    #[test]
    fn stopping_the_counter_delivers_a_deadline_already_passed() {
        let mut f = fixture(24);
        route(&mut f, 0, 20, false, 0);
        f.write64(cmp(0), 10);
        f.write64(CONFIG, CNF_ENABLE);
        f.advance_ticks(20);
        // The thread has not polled yet.
        f.write64(CONFIG, 0);
        assert_eq!(
            f.events.take(),
            [Event::Line(20, true), Event::Line(20, false)]
        );
        assert_eq!(f.hpet.poll(), None, "no timers while stopped");
    }

    #[test]
    fn odd_sizes_and_misaligned_accesses_are_ignored() {
        let mut f = fixture(24);
        assert_eq!(f.read(CAPABILITIES, 2), 0);
        assert_eq!(f.read(CAPABILITIES, 1), 0);
        assert_eq!(
            f.read(CAPABILITIES + 4, 8),
            0,
            "8 bytes at a 4-byte boundary"
        );
        f.write(CONFIG, 1, CNF_ENABLE);
        f.write(CONFIG, 2, CNF_ENABLE);
        f.write(CONFIG + 4, 8, CNF_ENABLE);
        assert_eq!(f.read64(CONFIG), 0);
        f.write(cnf(0) + TIMER_FSB_ADDR, 8, u64::MAX);
        assert_eq!(f.read64(cnf(0) + TIMER_FSB_VAL), 0);
    }

    #[test]
    fn a_paused_hpet_raises_nothing_until_resumed() {
        let mut f = fixture(24);
        route(&mut f, 0, 20, false, 0);
        f.write64(cmp(0), 10);
        f.write64(CONFIG, CNF_ENABLE);
        f.hpet.pause();
        f.advance_ticks(10);
        assert_eq!(f.hpet.poll(), None);
        assert!(f.events.take().is_empty());
        assert_eq!(f.counter(), 10, "the counter follows host time");
        f.hpet.resume();
        f.hpet.poll();
        assert_eq!(f.events.take().len(), 2);
    }

    #[cfg(feature = "bhyve_snapshot")]
    #[test]
    fn a_restored_hpet_counts_on_from_the_saved_value_with_its_configuration() {
        let mut f = fixture(24);
        route(&mut f, 1, 21, true, 0);
        f.write64(cmp(1), 1000);
        route(&mut f, 2, 22, false, 0);
        f.write64(cmp(2), 3000);
        f.write64(cnf(5) + TIMER_FSB_VAL, 0xfee0_0000_0000_0031);
        f.write64(CONFIG, CNF_ENABLE);
        f.advance_ticks(1000);
        f.hpet.poll();
        assert_eq!(f.events.take(), [Event::Line(21, true)]);
        f.advance_ticks(500);
        let state = f.hpet.save_state();
        assert_eq!(state.counter, 1500);
        assert_eq!(state.isr, 1 << 1);
        let bytes = crate::snapshot::encode_section(&state).unwrap();
        let state: HpetState = crate::snapshot::decode_section(&bytes).unwrap();

        // Restored on a host whose clock is elsewhere entirely.
        let mut g = fixture(24);
        g.advance(Duration::from_secs(5000));
        g.hpet.restore_state(&state).unwrap();
        assert_eq!(
            g.events.take(),
            [Event::Line(21, true)],
            "level line re-asserted"
        );
        assert_eq!(g.counter(), 1500);
        assert_eq!(g.read64(CONFIG), CNF_ENABLE);
        assert_eq!(g.read64(ISR), 1 << 1);
        for register in [cnf(1), cmp(1), cnf(2), cmp(2), cnf(5) + TIMER_FSB_VAL] {
            assert_eq!(g.read64(register), f.read64(register), "{register:#x}");
        }
        g.advance_ticks(1000);
        assert_eq!(g.counter(), 2500);
        g.hpet.poll();
        assert!(g.events.take().is_empty());
        // Timer 2 is armed from the restored counter: due at 3000.
        g.advance_ticks(500);
        g.hpet.poll();
        assert_eq!(
            g.events.take(),
            [Event::Line(22, true), Event::Line(22, false)]
        );

        let mut bad = state.clone();
        bad.timers.pop();
        assert!(g.hpet.restore_state(&bad).is_err());
    }
}
