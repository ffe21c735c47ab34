//! How devices raise interrupts without knowing the backend.

use std::io;

/// Interrupt delivery into the guest, implemented by the backend's VM.
pub trait InterruptSink: Send + Sync {
    /// Drive an IOAPIC/PIC input line (a GSI) high or low.
    fn set_irq_line(&self, gsi: u32, high: bool) -> io::Result<()>;
    /// Deliver a message-signalled interrupt.
    fn signal_msi(&self, address: u64, data: u32) -> io::Result<()>;
}
