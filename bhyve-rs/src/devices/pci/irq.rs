//! PCI legacy interrupts (INTx) as bhyve wires them (`pci_emul.c` `pci_lintr_*`,
//! `amd64/pci_irq.c`, `amd64/ioapic.c`).
//!
//! A function that wants INTx gets a pin of its slot (INTA#..INTD#, the least used one, so
//! functions of one slot spread over the four pins). Once every function exists, each slot pin
//! in use is routed twice, as on an ICH10-style chipset:
//! * to an I/O APIC input from 16 up, handed out round-robin (with a boot ROM: fixed,
//!   `16 + (4 + slot + pin) % 8`, which is what the firmware assumes);
//! * to one of eight PIRQ links A-H (the least used one; with a boot ROM fixed the same way),
//!   each PIRQ register holding the ISA IRQ it drives on the 8259s (bit 7 disables it). PIRQs
//!   get the least used ISA IRQ among 3-7, 9-12 and 14-15 not reserved by an LPC device.
//!
//! A function's interrupt line register reads the ISA IRQ of its PIRQ. Asserting a line drives
//! its I/O APIC input high and, when the PIRQ holds a valid IRQ, that IRQ on the 8259s. Lines
//! are level triggered and shared, so the router counts assertions per input and drives an
//! input low only when its last asserter lets go.
//!
//! With KVM, GSI n below 16 reaches 8259 input n and I/O APIC input n alike; guests that use
//! the I/O APIC leave the inputs of PIRQ IRQs masked, so only the 8259 leg matters there.
//! As bhyve does, an ISA IRQ is made level triggered at the 8259s (their ELCR) when a PIRQ
//! is first routed to it.

use std::sync::{Arc, Mutex};

use crate::interrupts::InterruptSink;

/// Number of PIRQ links (A-H).
pub const NPIRQS: usize = 8;
/// PIRQ register: bit 7 disables the link, bits 0-3 name the ISA IRQ.
pub const PIRQ_DIS: u8 = 0x80;
pub const PIRQ_IRQ: u8 = 0x0f;
/// ISA IRQs a PIRQ may drive: 3-7, 9-12 and 14-15.
const PERMITTED_IRQS: u16 = 0xdef8;
const NISA_IRQS: usize = 16;
/// I/O APIC inputs below this are the ISA IRQs.
pub const IOAPIC_FIRST_PCI_PIN: u8 = 16;
/// Inputs of the I/O APIC the backends emulate (KVM's has 24).
pub const IOAPIC_PINS: u8 = 24;

/// Whether `irq` is one a PIRQ may be routed to.
pub fn irq_permitted(irq: u8) -> bool {
    usize::from(irq) < NISA_IRQS && (1u16 << irq) & PERMITTED_IRQS != 0
}

/// Whether a PIRQ register value enables its link with a usable IRQ; a reserved IRQ leaves the
/// link as dead as a disabled one.
pub fn pirq_valid(reg: u8) -> bool {
    reg & PIRQ_DIS == 0 && irq_permitted(reg & PIRQ_IRQ)
}

/// Where one slot pin is wired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IntxRoute {
    /// PIRQ link, 1 (A) to 8 (H).
    pub pirq_pin: u8,
    /// I/O APIC input.
    pub ioapic_irq: u8,
}

/// How a slot pin ended up routed, for the firmware tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotIntx {
    pub bus: u8,
    pub slot: u8,
    /// INTA# = 1 … INTD# = 4.
    pub pin: u8,
    pub route: IntxRoute,
}

#[derive(Debug, Clone, Copy, Default)]
struct Pirq {
    reg: u8,
    /// Slot pins routed to this link (allocation only).
    use_count: u32,
    /// Lines currently asserted through this link.
    active_count: u32,
}

struct RouterState {
    pirqs: [Pirq; NPIRQS],
    /// Users of each ISA IRQ; `None` when it cannot be used (not permitted, or reserved).
    irq_counts: [Option<u32>; NISA_IRQS],
    next_ioapic_pin: u32,
    /// Asserters of each 8259 input a PIRQ link drives. The I/O APIC inputs are counted by
    /// the sink the router drives ([`crate::interrupts::SharedLevelPins`]), which the HPET
    /// shares.
    isa_level: [u32; NISA_IRQS],
}

/// The PIRQ router and the level bookkeeping of every INTx input.
pub struct PirqRouter {
    state: Mutex<RouterState>,
    sink: Arc<dyn InterruptSink>,
    /// Boot ROM machines get the fixed routing the firmware expects.
    bootrom: bool,
}

impl PirqRouter {
    pub fn new(sink: Arc<dyn InterruptSink>, bootrom: bool) -> Self {
        let mut irq_counts = [None; NISA_IRQS];
        for (irq, count) in irq_counts.iter_mut().enumerate() {
            if irq_permitted(irq as u8) {
                *count = Some(0);
            }
        }
        Self {
            state: Mutex::new(RouterState {
                pirqs: [Pirq {
                    reg: PIRQ_DIS,
                    ..Pirq::default()
                }; NPIRQS],
                irq_counts,
                next_ioapic_pin: 0,
                isa_level: [0; NISA_IRQS],
            }),
            sink,
            bootrom,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RouterState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keep PIRQs off `irq`: an ISA device (a COM port) owns it.
    pub fn reserve_irq(&self, irq: u8) {
        if let Some(count) = self.lock().irq_counts.get_mut(usize::from(irq)) {
            *count = None;
        }
    }

    /// Count a shared user of `irq` (the SCI), so PIRQs prefer other IRQs.
    pub fn use_irq(&self, irq: u8) {
        if let Some(Some(count)) = self.lock().irq_counts.get_mut(usize::from(irq)) {
            *count += 1;
        }
    }

    /// Route INTx `pin` (1-4) of `slot` (`pci_irq_route`).
    pub fn route(&self, slot: u8, pin: u8) -> IntxRoute {
        let mut s = self.lock();
        let fixed = (4 + usize::from(slot) + usize::from(pin)) % NPIRQS;
        let pci_pins = u32::from(IOAPIC_PINS - IOAPIC_FIRST_PCI_PIN);
        let ioapic_irq = if self.bootrom {
            IOAPIC_FIRST_PCI_PIN + fixed as u8
        } else {
            let pin = s.next_ioapic_pin % pci_pins;
            s.next_ioapic_pin += 1;
            IOAPIC_FIRST_PCI_PIN + pin as u8
        };
        let best = if self.bootrom {
            fixed
        } else {
            // The first of the least used links.
            (0..NPIRQS)
                .min_by_key(|&i| s.pirqs[i].use_count)
                .unwrap_or(0)
        };
        s.pirqs[best].use_count += 1;
        if s.pirqs[best].reg == PIRQ_DIS {
            let irq = (0..NISA_IRQS)
                .filter_map(|i| s.irq_counts[i].map(|count| (count, i)))
                .min()
                .map(|(_, i)| i);
            if let Some(irq) = irq {
                if let Some(count) = s.irq_counts[irq].as_mut() {
                    *count += 1;
                }
                s.pirqs[best].reg = irq as u8;
                if let Err(e) = self.sink.set_isa_irq_trigger(irq as u8, true) {
                    log::warn!("pci: cannot make IRQ {irq} level triggered: {e}");
                }
            }
        }
        IntxRoute {
            pirq_pin: best as u8 + 1,
            ioapic_irq,
        }
    }

    /// The register of PIRQ `pin` (1-8).
    pub fn pirq(&self, pin: usize) -> Option<u8> {
        let index = pin.checked_sub(1)?;
        self.lock().pirqs.get(index).map(|p| p.reg)
    }

    /// The guest writes PIRQ register `pin` (1-8): an asserted link moves to its new IRQ.
    pub fn set_pirq(&self, pin: usize, value: u8) {
        let Some(index) = pin.checked_sub(1).filter(|&i| i < NPIRQS) else {
            return;
        };
        let value = value & (PIRQ_DIS | PIRQ_IRQ);
        let mut s = self.lock();
        let old = s.pirqs[index].reg;
        if old == value {
            return;
        }
        let active = s.pirqs[index].active_count != 0;
        if active && pirq_valid(old) {
            self.isa_level(&mut s, old & PIRQ_IRQ, false);
        }
        s.pirqs[index].reg = value;
        if active && pirq_valid(value) {
            self.isa_level(&mut s, value & PIRQ_IRQ, true);
        }
    }

    fn drive(&self, gsi: u8, high: bool) {
        if let Err(e) = self.sink.set_irq_line(gsi.into(), high) {
            log::warn!("pci: cannot drive interrupt input {gsi}: {e}");
        }
    }

    fn isa_level(&self, s: &mut RouterState, irq: u8, up: bool) {
        let Some(count) = s.isa_level.get_mut(usize::from(irq)) else {
            return;
        };
        if let Some(level) = crate::interrupts::counted_level(count, up) {
            self.drive(irq, level);
        }
    }

    fn assert(&self, route: IntxRoute) {
        let mut s = self.lock();
        if let Some(index) = usize::from(route.pirq_pin).checked_sub(1) {
            if let Some(pirq) = s.pirqs.get_mut(index) {
                pirq.active_count += 1;
                let (first, reg) = (pirq.active_count == 1, pirq.reg);
                if first && pirq_valid(reg) {
                    self.isa_level(&mut s, reg & PIRQ_IRQ, true);
                }
            }
        }
        self.drive(route.ioapic_irq, true);
    }

    fn deassert(&self, route: IntxRoute) {
        let mut s = self.lock();
        if let Some(index) = usize::from(route.pirq_pin).checked_sub(1) {
            if let Some(pirq) = s.pirqs.get_mut(index) {
                pirq.active_count = pirq.active_count.saturating_sub(1);
                let (last, reg) = (pirq.active_count == 0, pirq.reg);
                if last && pirq_valid(reg) {
                    self.isa_level(&mut s, reg & PIRQ_IRQ, false);
                }
            }
        }
        self.drive(route.ioapic_irq, false);
    }
}

/// Where a function's INTx stands (bhyve's `lintr_stat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum IntxState {
    #[default]
    Idle,
    /// The line is driven.
    Asserted,
    /// The device asserts it, but INTx is masked (INTxDIS, or MSI/MSI-X enabled).
    Pending,
}

struct LineInner {
    /// INTA# = 1 … INTD# = 4, once the bus assigned one.
    pin: u8,
    route: Option<(Arc<PirqRouter>, IntxRoute)>,
    state: IntxState,
    permitted: bool,
}

/// One function's INTx line: the device asserts and deasserts it, the PCI layer masks it.
pub struct IntxLine {
    inner: Mutex<LineInner>,
}

impl Default for IntxLine {
    fn default() -> Self {
        Self {
            inner: Mutex::new(LineInner {
                pin: 0,
                route: None,
                state: IntxState::Idle,
                permitted: true,
            }),
        }
    }
}

impl IntxLine {
    fn lock(&self) -> std::sync::MutexGuard<'_, LineInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Raise the line (level triggered: it stays up until [`IntxLine::deassert`]). Asserting
    /// an asserted line does nothing.
    pub fn assert(&self) {
        let mut l = self.lock();
        if l.state != IntxState::Idle {
            return;
        }
        if l.permitted {
            l.state = IntxState::Asserted;
            if let Some((router, route)) = &l.route {
                router.assert(*route);
            }
        } else {
            l.state = IntxState::Pending;
        }
    }

    /// Lower the line.
    pub fn deassert(&self) {
        let mut l = self.lock();
        match l.state {
            IntxState::Asserted => {
                l.state = IntxState::Idle;
                if let Some((router, route)) = &l.route {
                    router.deassert(*route);
                }
            }
            IntxState::Pending => l.state = IntxState::Idle,
            IntxState::Idle => {}
        }
    }

    pub fn state(&self) -> IntxState {
        self.lock().state
    }

    /// INTA# = 1 … INTD# = 4; 0 before the bus assigned a pin.
    pub fn pin(&self) -> u8 {
        self.lock().pin
    }

    pub fn route(&self) -> Option<IntxRoute> {
        self.lock().route.as_ref().map(|(_, r)| *r)
    }

    pub(super) fn set_pin(&self, pin: u8) {
        self.lock().pin = pin;
    }

    pub(super) fn connect(&self, router: Arc<PirqRouter>, route: IntxRoute) {
        self.lock().route = Some((router, route));
    }

    /// Mask or unmask the line (bhyve's `pci_lintr_update`): a masked asserted line drops and
    /// waits as pending; an unmasked pending one rises.
    pub(super) fn set_permitted(&self, permitted: bool) {
        let mut l = self.lock();
        l.permitted = permitted;
        match (l.state, permitted) {
            (IntxState::Asserted, false) => {
                l.state = IntxState::Pending;
                if let Some((router, route)) = &l.route {
                    router.deassert(*route);
                }
            }
            (IntxState::Pending, true) => {
                l.state = IntxState::Asserted;
                if let Some((router, route)) = &l.route {
                    router.assert(*route);
                }
            }
            _ => {}
        }
    }

    /// Put back a saved state, driving the line if it was asserted.
    #[cfg(feature = "bhyve_snapshot")]
    pub(super) fn restore(&self, state: IntxState) {
        let mut l = self.lock();
        if l.state == IntxState::Asserted {
            if let Some((router, route)) = &l.route {
                router.deassert(*route);
            }
        }
        // The saved state comes from a file: a line held while the function masks INTx (or uses
        // MSI) waits as pending, as it would have in the running machine.
        l.state = match (state, l.permitted) {
            (IntxState::Asserted, false) => IntxState::Pending,
            (IntxState::Pending, true) => IntxState::Asserted,
            (other, _) => other,
        };
        if l.state == IntxState::Asserted {
            if let Some((router, route)) = &l.route {
                router.assert(*route);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    /// Input lines as driven, and the ISA IRQs made level triggered.
    #[derive(Default)]
    struct Lines(Mutex<Vec<(u32, bool)>>, Mutex<Vec<u8>>);

    impl InterruptSink for Lines {
        fn set_irq_line(&self, gsi: u32, high: bool) -> io::Result<()> {
            self.0.lock().unwrap().push((gsi, high));
            Ok(())
        }
        fn signal_msi(&self, _address: u64, _data: u32) -> io::Result<()> {
            Ok(())
        }
        fn set_isa_irq_trigger(&self, irq: u8, level: bool) -> io::Result<()> {
            assert!(level, "PIRQ IRQs are only ever made level triggered");
            self.1.lock().unwrap().push(irq);
            Ok(())
        }
    }

    fn router(bootrom: bool) -> (Arc<Lines>, Arc<PirqRouter>) {
        let lines = Arc::new(Lines::default());
        let pins = Arc::new(crate::interrupts::SharedLevelPins::new(lines.clone()));
        let router = Arc::new(PirqRouter::new(pins, bootrom));
        // What an LPC bridge with its COM ports and the SCI do before routing.
        router.reserve_irq(4);
        router.reserve_irq(3);
        router.use_irq(9);
        (lines, router)
    }

    #[test]
    fn links_and_ioapic_inputs_are_handed_out_as_bhyve_does() {
        let (lines, r) = router(false);
        let routes: Vec<IntxRoute> = [(3, 1), (4, 1), (5, 1), (6, 2)]
            .iter()
            .map(|&(slot, pin)| r.route(slot, pin))
            .collect();
        let pairs: Vec<(u8, u8)> = routes.iter().map(|r| (r.pirq_pin, r.ioapic_irq)).collect();
        assert_eq!(pairs, [(1, 16), (2, 17), (3, 18), (4, 19)]);
        // Least used free IRQs in order: 5, 6, 7, 10 (3 and 4 reserved, 9 has the SCI).
        let regs: Vec<u8> = (1..=4).map(|p| r.pirq(p).unwrap()).collect();
        assert_eq!(regs, [5, 6, 7, 10]);
        assert_eq!(r.pirq(5), Some(PIRQ_DIS));
        for slot in 7..11 {
            r.route(slot, 1);
        }
        // The ninth pin wraps to input 16 and link A again; all links got IRQs by then.
        assert_eq!(
            r.route(12, 1),
            IntxRoute {
                pirq_pin: 1,
                ioapic_irq: 16
            }
        );
        let regs: Vec<u8> = (1..=8).map(|p| r.pirq(p).unwrap()).collect();
        assert_eq!(regs, [5, 6, 7, 10, 11, 12, 14, 15]);
        // Each IRQ became level triggered at the 8259s when its link was first routed.
        assert_eq!(*lines.1.lock().unwrap(), regs);
    }

    #[test]
    fn a_boot_rom_gets_the_fixed_swizzle() {
        let (_, r) = router(true);
        // (4 + slot + pin) % 8: slot 3 INTA -> link A+0 = index 0, input 16.
        assert_eq!(
            r.route(3, 1),
            IntxRoute {
                pirq_pin: 1,
                ioapic_irq: 16
            }
        );
        assert_eq!(
            r.route(4, 1),
            IntxRoute {
                pirq_pin: 2,
                ioapic_irq: 17
            }
        );
        assert_eq!(
            r.route(4, 2),
            IntxRoute {
                pirq_pin: 3,
                ioapic_irq: 18
            }
        );
        assert_eq!(
            r.route(11, 1),
            IntxRoute {
                pirq_pin: 1,
                ioapic_irq: 16
            }
        );
    }

    fn line(router: &Arc<PirqRouter>, slot: u8) -> IntxLine {
        let line = IntxLine::default();
        line.set_pin(1);
        line.connect(router.clone(), router.route(slot, 1));
        line
    }

    #[test]
    fn lines_are_level_triggered_and_shared_inputs_drop_with_the_last_user() {
        let (lines, r) = router(false);
        let a = line(&r, 3);
        let events = || std::mem::take(&mut *lines.0.lock().unwrap());
        a.assert();
        assert_eq!(events(), [(5, true), (16, true)]);
        a.assert();
        assert!(events().is_empty(), "asserting twice is one assertion");
        a.deassert();
        assert_eq!(events(), [(5, false), (16, false)]);
        a.deassert();
        assert!(events().is_empty());

        // Eight more slots wrap around to link A and input 16 again.
        let others: Vec<IntxLine> = (4..12).map(|slot| line(&r, slot)).collect();
        let b = &others[7];
        assert_eq!(b.route(), a.route());
        a.assert();
        b.assert();
        assert_eq!(events(), [(5, true), (16, true)]);
        a.deassert();
        assert!(events().is_empty(), "still held by the other function");
        b.deassert();
        assert_eq!(events(), [(5, false), (16, false)]);
    }

    #[test]
    fn masking_holds_the_line_pending_and_pirq_writes_move_it() {
        let (lines, r) = router(false);
        let a = line(&r, 3);
        let events = || std::mem::take(&mut *lines.0.lock().unwrap());
        a.set_permitted(false);
        a.assert();
        assert_eq!(a.state(), IntxState::Pending);
        assert!(events().is_empty());
        a.set_permitted(true);
        assert_eq!(a.state(), IntxState::Asserted);
        assert_eq!(events(), [(5, true), (16, true)]);
        // The guest moves link A to IRQ 11, then disables it.
        r.set_pirq(1, 11);
        assert_eq!(events(), [(5, false), (11, true)]);
        r.set_pirq(1, PIRQ_DIS | 11);
        assert_eq!(events(), [(11, false)]);
        a.deassert();
        assert_eq!(events(), [(16, false)]);
        // A reserved IRQ is as good as disabled.
        r.set_pirq(1, 8);
        a.assert();
        assert_eq!(events(), [(16, true)]);
    }

    #[cfg(feature = "bhyve_snapshot")]
    #[test]
    fn a_restored_line_respects_the_functions_mask() {
        let (lines, r) = router(false);
        let a = line(&r, 3);
        let events = || std::mem::take(&mut *lines.0.lock().unwrap());
        // Saved as held, but the restored function masks INTx: nothing is driven yet.
        a.set_permitted(false);
        a.restore(IntxState::Asserted);
        assert_eq!(a.state(), IntxState::Pending);
        assert!(events().is_empty());
        a.set_permitted(true);
        assert_eq!(a.state(), IntxState::Asserted);
        assert_eq!(events(), [(5, true), (16, true)]);
    }
}
