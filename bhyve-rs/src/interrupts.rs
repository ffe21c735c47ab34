//! How devices raise interrupts without knowing the backend.

use std::io;

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
