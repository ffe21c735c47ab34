//! Virtio devices over PCI, as FreeBSD's bhyve presents them (`virtio.c`, `virtio.h`).
//!
//! The transport ([`pci::VirtioPci`]) is the legacy virtio-PCI interface: every register in I/O
//! BAR 0 (features, queue selection and page frame, notify, status, ISR, then the device's own
//! configuration), MSI-X in memory BAR 1 with one vector per queue plus one for configuration
//! changes unless `virtio_msix=false` (`-W`), an MSI capability with one message, and INTx with
//! the ISR register, which a read clears. Queues are split rings in the legacy layout
//! ([`queue`]), of a size the device fixes.
//!
//! A device model implements [`VirtioDevice`]: its identity, features, configuration space
//! and queue sizes, and what to do when the driver notifies a queue. It gets its queues once,
//! in [`VirtioDevice::attach`], as shared [`VirtQueue`] handles it may keep and use from any
//! thread: [`VirtQueue::pop`] takes a request, [`VirtQueue::add_used`] and
//! [`VirtQueue::end_chains`] (or [`VirtQueue::complete`]) give it back and interrupt the guest
//! as it asked.
//!
//! # What comes from rust-vmm, and what is written here
//! Constants (feature bits, status bits, ring flags, device IDs, virtio-blk's request types)
//! come from `virtio-bindings`, the Linux headers as Rust. The ring is written here rather than
//! taken from `virtio-queue`: that crate reads guest memory through vm-memory's `GuestMemory`
//! trait, whose mmap backend does not build for FreeBSD, so using it would mean a second
//! memory abstraction over [`crate::memory::GuestMemory`] (bounds-checked copies, volatile
//! index accesses) for about as much code as the split ring itself. The ring code (queue.rs)
//! follows bhyve's `vq_getchain`,
//! `vq_relchain` and `vq_endchains`, with stricter checks: a malformed chain sets
//! `DEVICE_NEEDS_RESET` in the status register, raises a configuration interrupt and stops
//! the device until the driver resets it, as the virtio specification asks (bhyve only prints
//! a warning).

pub mod block;
pub mod pci;
pub mod queue;
pub mod rnd;

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;

use super::pci::irq::IntxLine;
use super::pci::msix::MsixTable;
use crate::interrupts::InterruptSink;

pub use queue::{Chain, ChainIo, Descriptor, QueueState, RingError, Segment, VirtQueue};

/// PCI vendor ID of every virtio device.
pub const VIRTIO_VENDOR: u16 = 0x1af4;
/// Legacy PCI device IDs (`VIRTIO_DEV_*`): 0x1000 + the virtio device type - 1.
pub const VIRTIO_DEV_NET: u16 = 0x1000;
pub const VIRTIO_DEV_BLOCK: u16 = 0x1001;
pub const VIRTIO_DEV_CONSOLE: u16 = 0x1003;
pub const VIRTIO_DEV_RANDOM: u16 = 0x1005;

/// Legacy register offsets in the I/O BAR (bhyve's `VTCFG_R_*`).
pub const VIRTIO_PCI_HOST_FEATURES: u64 = 0x00;
pub const VIRTIO_PCI_GUEST_FEATURES: u64 = 0x04;
pub const VIRTIO_PCI_QUEUE_PFN: u64 = 0x08;
pub const VIRTIO_PCI_QUEUE_NUM: u64 = 0x0c;
pub const VIRTIO_PCI_QUEUE_SEL: u64 = 0x0e;
pub const VIRTIO_PCI_QUEUE_NOTIFY: u64 = 0x10;
pub const VIRTIO_PCI_STATUS: u64 = 0x12;
pub const VIRTIO_PCI_ISR: u64 = 0x13;
pub const VIRTIO_MSI_CONFIG_VECTOR: u64 = 0x14;
pub const VIRTIO_MSI_QUEUE_VECTOR: u64 = 0x16;
/// Where the device configuration starts without MSI-X enabled (`VTCFG_R_CFG0`) and with it
/// (`VTCFG_R_CFG1`).
pub const VIRTIO_PCI_CONFIG_NO_MSIX: u64 = 0x14;
pub const VIRTIO_PCI_CONFIG_MSIX: u64 = 0x18;
/// ISR bits: a queue interrupt, a configuration change.
pub const VIRTIO_PCI_ISR_INTR: u8 = 0x1;
pub const VIRTIO_PCI_ISR_CONFIG: u8 = 0x2;
/// An MSI-X vector register that names no vector.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// How the device looks on the PCI bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioIdentity {
    /// Legacy PCI device ID ([`VIRTIO_DEV_BLOCK`], …).
    pub pci_device_id: u16,
    /// Virtio device type, the subsystem device ID (`VIRTIO_ID_BLOCK`, …).
    pub device_type: u16,
    pub class: u8,
    pub subclass: u8,
}

/// A virtio device model behind the PCI transport. Called with the PCI function's lock held
/// (from vCPU threads and the snapshot code), never concurrently.
pub trait VirtioDevice: Send {
    /// Short name for messages (`vtblk`, `vtrnd`, as bhyve's `vc_name`).
    fn name(&self) -> &'static str;

    fn identity(&self) -> VirtioIdentity;

    /// The size of each queue, a power of two; the number of entries is the number of queues.
    fn queue_sizes(&self) -> Vec<u16>;

    /// Feature bits the device offers (`vc_hv_caps`); the legacy interface shows the low 32.
    fn host_features(&self) -> u64;

    /// Bytes of device configuration after the transport's registers.
    fn config_size(&self) -> usize;

    /// Read `data.len()` bytes at `offset` of the device configuration (inside
    /// [`VirtioDevice::config_size`]).
    fn read_config(&self, offset: usize, data: &mut [u8]);

    /// A driver write to the device configuration; ignored unless the device takes it.
    fn write_config(&mut self, _offset: usize, _data: &[u8]) {}

    /// The queues, once, when the transport is made: keep them to serve requests.
    fn attach(&mut self, queues: &[Arc<VirtQueue>], shared: &Arc<VirtioShared>);

    /// The driver wrote the features it accepts (already limited to what the device offers).
    fn features_negotiated(&mut self, _features: u64) {}

    /// The driver wrote `status` to the status register (after a reset when it is 0): a device
    /// that works on its own (receives frames, reads sockets) starts once DRIVER_OK is set.
    fn status_changed(&mut self, _status: u8) {}

    /// The driver notified queue `queue`.
    fn queue_notify(&mut self, queue: usize);

    /// The driver wrote 0 to the status register. Finish or drop in-flight requests first:
    /// the transport forgets the queues after this returns.
    fn reset(&mut self);

    /// Before a snapshot: finish in-flight requests and take no new ones until
    /// [`VirtioDevice::resume`].
    fn pause(&mut self) {}

    fn resume(&mut self) {}

    /// The device's own state for a snapshot; `None` when it cannot be saved.
    fn save_state(&self) -> Option<Vec<u8>> {
        None
    }

    /// Load what [`VirtioDevice::save_state`] wrote.
    fn restore_state(&mut self, state: &[u8]) -> Result<(), String> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} bytes of device state, expected none",
                state.len()
            ))
        }
    }
}

/// What the transport and the device's queues share: negotiated features, the broken flag
/// and the interrupt paths. Devices use it to raise configuration interrupts
/// ([`VirtioShared::config_changed`]).
pub struct VirtioShared {
    name: &'static str,
    negotiated: AtomicU64,
    /// Status register as the driver wrote it.
    status: AtomicU8,
    broken: AtomicBool,
    isr: Mutex<u8>,
    config_vector: AtomicU16,
    intx: Arc<IntxLine>,
    msix: Option<Arc<MsixTable>>,
    /// MSI address and data while the guest has MSI enabled, mirrored from configuration space.
    msi: Mutex<Option<(u64, u32)>>,
    sink: Arc<dyn InterruptSink>,
}

impl VirtioShared {
    pub(crate) fn new(
        name: &'static str,
        intx: Arc<IntxLine>,
        msix: Option<Arc<MsixTable>>,
        sink: Arc<dyn InterruptSink>,
    ) -> Self {
        Self {
            name,
            negotiated: AtomicU64::new(0),
            status: AtomicU8::new(0),
            broken: AtomicBool::new(false),
            isr: Mutex::new(0),
            config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            intx,
            msix,
            msi: Mutex::new(None),
            sink,
        }
    }

    /// Features the driver accepted.
    pub fn negotiated(&self) -> u64 {
        self.negotiated.load(Ordering::SeqCst)
    }

    /// A chain or ring was malformed: the device stops until reset.
    pub fn broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    /// The status register as the driver reads it.
    pub fn status(&self) -> u8 {
        let status = self.status.load(Ordering::SeqCst);
        if self.broken() {
            status | VIRTIO_CONFIG_S_NEEDS_RESET as u8
        } else {
            status
        }
    }

    /// Mark the device broken (`DEVICE_NEEDS_RESET`) and tell the driver; `why` goes to the log
    /// once.
    pub fn mark_broken(&self, why: &str) {
        if !self.broken.swap(true, Ordering::SeqCst) {
            log::warn!("{}: {why}; the device needs a reset", self.name);
            self.config_changed();
        }
    }

    /// Raise a configuration-change interrupt.
    pub fn config_changed(&self) {
        self.interrupt(
            VIRTIO_PCI_ISR_CONFIG,
            self.config_vector.load(Ordering::SeqCst),
        );
    }

    fn msix_enabled(&self) -> bool {
        self.msix.as_ref().is_some_and(|t| t.enabled())
    }

    /// Signal `vector` with MSI-X enabled; otherwise set `isr` bits, send MSI if enabled and
    /// raise INTx (bhyve's `vi_interrupt`).
    pub(crate) fn interrupt(&self, isr: u8, vector: u16) {
        if let Some(table) = self.msix.as_ref().filter(|t| t.enabled()) {
            if vector != VIRTIO_MSI_NO_VECTOR {
                table.notify(usize::from(vector));
            }
            return;
        }
        let mut bits = self.isr.lock().unwrap_or_else(|e| e.into_inner());
        *bits |= isr;
        if let Some((address, data)) = *self.msi.lock().unwrap_or_else(|e| e.into_inner()) {
            if let Err(e) = self.sink.signal_msi(address, data) {
                log::warn!("{}: cannot send MSI: {e}", self.name);
            }
        }
        self.intx.assert();
    }

    /// The driver read the ISR: it clears, and INTx drops.
    fn take_isr(&self) -> u8 {
        let mut bits = self.isr.lock().unwrap_or_else(|e| e.into_inner());
        let value = std::mem::take(&mut *bits);
        if value != 0 {
            self.intx.deassert();
        }
        value
    }

    fn isr(&self) -> u8 {
        *self.isr.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_msi(&self, msi: Option<(u64, u32)>) {
        *self.msi.lock().unwrap_or_else(|e| e.into_inner()) = msi;
    }

    fn reset(&self) {
        self.negotiated.store(0, Ordering::SeqCst);
        self.broken.store(false, Ordering::SeqCst);
        self.config_vector
            .store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
        let mut bits = self.isr.lock().unwrap_or_else(|e| e.into_inner());
        if *bits != 0 {
            self.intx.deassert();
        }
        *bits = 0;
    }
}

#[cfg(test)]
mod tests;
