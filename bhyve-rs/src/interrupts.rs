//! How devices raise interrupts without knowing the backend.

use std::io;
use std::sync::{Arc, Mutex};

/// Interrupt delivery into the guest, implemented by the backend's VM.
pub trait InterruptSink: Send + Sync {
    /// Drive an IOAPIC/PIC input line (a GSI) high or low.
    fn set_irq_line(&self, gsi: u32, high: bool) -> io::Result<()>;
    /// Deliver a message-signalled interrupt.
    fn signal_msi(&self, address: u64, data: u32) -> io::Result<()>;
    /// Make ISA IRQ `irq` (0-15) level or edge triggered at the 8259 PICs, as their edge/level
    /// control registers (ELCR, ports 0x4D0/0x4D1) would say.
    fn set_isa_irq_trigger(&self, irq: u8, level: bool) -> io::Result<()>;
}

/// One source asserting (`high`) or letting go of a line shared by several: the level to drive
/// when the line's count of asserting sources leaves or reaches zero, `None` otherwise. A let-go
/// with no source asserting changes nothing.
pub fn counted_level(asserting: &mut u32, high: bool) -> Option<bool> {
    if high {
        *asserting += 1;
        (*asserting == 1).then_some(true)
    } else if *asserting > 0 {
        *asserting -= 1;
        (*asserting == 0).then_some(false)
    } else {
        None
    }
}

/// I/O APIC inputs from 16 up are shared by level-triggered sources (PCI INTx through the PIRQ
/// router, the HPET's timers): the line stays high while any source asserts it, as FreeBSD's
/// vioapic counts assertions per pin. Below 16 (ISA) and for MSIs every call passes through.
pub struct SharedLevelPins {
    sink: Arc<dyn InterruptSink>,
    /// Assertions per GSI at and above [`SharedLevelPins::FIRST_SHARED`].
    asserted: Mutex<Vec<u32>>,
}

impl SharedLevelPins {
    /// The first GSI counted: the I/O APIC inputs above the ISA IRQs.
    pub const FIRST_SHARED: u32 = 16;

    pub fn new(sink: Arc<dyn InterruptSink>) -> Self {
        Self {
            sink,
            asserted: Mutex::new(Vec::new()),
        }
    }
}

impl InterruptSink for SharedLevelPins {
    /// Each `high` from a source must be followed by one `low` from the same source.
    fn set_irq_line(&self, gsi: u32, high: bool) -> io::Result<()> {
        let Some(index) = gsi.checked_sub(Self::FIRST_SHARED) else {
            return self.sink.set_irq_line(gsi, high);
        };
        let index = index as usize;
        let mut asserted = self.asserted.lock().unwrap_or_else(|e| e.into_inner());
        if asserted.len() <= index {
            asserted.resize(index + 1, 0);
        }
        match counted_level(&mut asserted[index], high) {
            Some(level) => self.sink.set_irq_line(gsi, level),
            None => Ok(()),
        }
    }

    fn signal_msi(&self, address: u64, data: u32) -> io::Result<()> {
        self.sink.signal_msi(address, data)
    }

    fn set_isa_irq_trigger(&self, irq: u8, level: bool) -> io::Result<()> {
        self.sink.set_isa_irq_trigger(irq, level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Lines(Mutex<Vec<(u32, bool)>>);

    impl InterruptSink for Lines {
        fn set_irq_line(&self, gsi: u32, high: bool) -> io::Result<()> {
            self.0.lock().unwrap().push((gsi, high));
            Ok(())
        }
        fn signal_msi(&self, _address: u64, _data: u32) -> io::Result<()> {
            Ok(())
        }
        fn set_isa_irq_trigger(&self, _irq: u8, _level: bool) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_shared_pin_stays_high_until_its_last_source_lets_go() {
        let lines = Arc::new(Lines::default());
        let pins = SharedLevelPins::new(lines.clone());
        // A PCI function and an HPET timer on pin 20.
        pins.set_irq_line(20, true).unwrap();
        pins.set_irq_line(20, true).unwrap();
        pins.set_irq_line(20, false).unwrap();
        assert_eq!(*lines.0.lock().unwrap(), [(20, true)]);
        pins.set_irq_line(20, false).unwrap();
        pins.set_irq_line(20, false).unwrap();
        assert_eq!(*lines.0.lock().unwrap(), [(20, true), (20, false)]);
    }

    #[test]
    fn isa_irqs_pass_through_as_they_are_driven() {
        let lines = Arc::new(Lines::default());
        let pins = SharedLevelPins::new(lines.clone());
        pins.set_irq_line(4, true).unwrap();
        pins.set_irq_line(4, true).unwrap();
        pins.set_irq_line(4, false).unwrap();
        assert_eq!(*lines.0.lock().unwrap(), [(4, true), (4, true), (4, false)]);
    }
}
