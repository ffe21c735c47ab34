//! The legacy virtio-PCI transport (bhyve's `vi_pci_read`, `vi_pci_write`, `vi_intr_init`,
//! `vi_set_io_bar`, `vi_reset_dev`): a [`PciDevice`] around a [`VirtioDevice`].

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::queue::QueueState;
use super::{
    VirtQueue, VirtioDevice, VirtioShared, VIRTIO_MSI_CONFIG_VECTOR, VIRTIO_MSI_NO_VECTOR,
    VIRTIO_MSI_QUEUE_VECTOR, VIRTIO_PCI_CONFIG_MSIX, VIRTIO_PCI_CONFIG_NO_MSIX,
    VIRTIO_PCI_GUEST_FEATURES, VIRTIO_PCI_HOST_FEATURES, VIRTIO_PCI_ISR, VIRTIO_PCI_QUEUE_NOTIFY,
    VIRTIO_PCI_QUEUE_NUM, VIRTIO_PCI_QUEUE_PFN, VIRTIO_PCI_QUEUE_SEL, VIRTIO_PCI_STATUS,
    VIRTIO_VENDOR,
};
use crate::config::Config;
use crate::devices::pci::msix::MsixTable;
use crate::devices::pci::{
    BarKind, ConfigSpace, PciDevice, PciError, PCIR_CLASS, PCIR_DEVICE, PCIR_SUBCLASS,
    PCIR_SUBDEV_0, PCIR_SUBVEND_0, PCIR_VENDOR,
};
use crate::devices::registry::PciCreate;
use crate::devices::DeviceError;

/// The I/O BAR with the registers, and the memory BAR with the MSI-X table (as bhyve's
/// devices place them).
pub const IO_BAR: usize = 0;
pub const MSIX_BAR: usize = 1;

/// Whether virtio devices get MSI-X: `virtio_msix`, true unless `-W` set it false.
pub fn use_msix(config: &Config) -> Result<bool, DeviceError> {
    config
        .get_bool("virtio_msix")
        .map(|v| v.unwrap_or(true))
        .map_err(|_| DeviceError::InvalidValue {
            key: "virtio_msix".to_string(),
            value: config.get("virtio_msix").unwrap_or_default().to_string(),
        })
}

/// A register of the common header: offset, size, read-only, name (bhyve's `config_regs`).
struct Register {
    offset: u64,
    size: usize,
    read_only: bool,
    name: &'static str,
}

const REGISTERS: &[Register] = &[
    reg(VIRTIO_PCI_HOST_FEATURES, 4, true, "HOSTCAP"),
    reg(VIRTIO_PCI_GUEST_FEATURES, 4, false, "GUESTCAP"),
    reg(VIRTIO_PCI_QUEUE_PFN, 4, false, "PFN"),
    reg(VIRTIO_PCI_QUEUE_NUM, 2, true, "QNUM"),
    reg(VIRTIO_PCI_QUEUE_SEL, 2, false, "QSEL"),
    reg(VIRTIO_PCI_QUEUE_NOTIFY, 2, false, "QNOTIFY"),
    reg(VIRTIO_PCI_STATUS, 1, false, "STATUS"),
    reg(VIRTIO_PCI_ISR, 1, false, "ISR"),
    reg(VIRTIO_MSI_CONFIG_VECTOR, 2, false, "CFGVEC"),
    reg(VIRTIO_MSI_QUEUE_VECTOR, 2, false, "QVEC"),
];

const fn reg(offset: u64, size: usize, read_only: bool, name: &'static str) -> Register {
    Register {
        offset,
        size,
        read_only,
        name,
    }
}

/// A virtio device on PCI.
pub struct VirtioPci {
    device: Box<dyn VirtioDevice>,
    shared: Arc<VirtioShared>,
    queues: Vec<Arc<VirtQueue>>,
    /// Queue the driver selected; may name no queue.
    selected: u16,
    config_size: usize,
}

/// Everything a snapshot keeps of the transport, then the device's own state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    pub negotiated: u64,
    pub selected: u16,
    pub status: u8,
    pub broken: bool,
    pub isr: u8,
    pub config_vector: u16,
    pub queues: Vec<QueueState>,
    pub device: Vec<u8>,
}

impl VirtioPci {
    /// Set up the function's header, MSI-X (when `msix`), MSI and INTx, and the register BAR,
    /// then hand the queues to the device.
    pub fn new(
        mut device: Box<dyn VirtioDevice>,
        create: PciCreate<'_>,
        msix: bool,
    ) -> Result<Self, PciError> {
        let config = create.config_space;
        let identity = device.identity();
        config.write16(PCIR_DEVICE, identity.pci_device_id);
        config.write16(PCIR_VENDOR, VIRTIO_VENDOR);
        config.write8(PCIR_CLASS, identity.class);
        config.write8(PCIR_SUBCLASS, identity.subclass);
        config.write16(PCIR_SUBDEV_0, identity.device_type);
        config.write16(PCIR_SUBVEND_0, VIRTIO_VENDOR);
        let sizes = device.queue_sizes();
        let table = if msix {
            // One vector per queue and one for configuration changes.
            let table = MsixTable::new(sizes.len() as u16 + 1, create.interrupts.clone());
            config.add_msix_capability(table.clone(), MSIX_BAR)?;
            Some(table)
        } else {
            None
        };
        config.add_msi_capability(1)?;
        let intx = config.request_intx();
        let config_size = device.config_size();
        config.request_bar(
            IO_BAR,
            BarKind::Io,
            VIRTIO_PCI_CONFIG_MSIX + config_size as u64,
        );
        let shared = Arc::new(VirtioShared::new(
            device.name(),
            intx,
            table,
            create.interrupts.clone(),
        ));
        let queues: Vec<Arc<VirtQueue>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                Arc::new(VirtQueue::new(
                    i as u16,
                    size,
                    create.memory.clone(),
                    shared.clone(),
                ))
            })
            .collect();
        device.attach(&queues, &shared);
        Ok(Self {
            device,
            shared,
            queues,
            selected: 0,
            config_size,
        })
    }

    /// The device model.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn shared(&self) -> &Arc<VirtioShared> {
        &self.shared
    }

    pub fn queues(&self) -> &[Arc<VirtQueue>] {
        &self.queues
    }

    fn selected_queue(&self) -> Option<&Arc<VirtQueue>> {
        self.queues.get(usize::from(self.selected))
    }

    /// Where the device configuration starts: after the MSI-X vector registers while the
    /// guest has MSI-X enabled.
    fn config_start(&self) -> u64 {
        if self.shared.msix_enabled() {
            VIRTIO_PCI_CONFIG_MSIX
        } else {
            VIRTIO_PCI_CONFIG_NO_MSIX
        }
    }

    /// The device's part of an access at `offset`, if it falls inside its configuration.
    fn device_config_offset(&self, offset: u64, size: usize) -> Option<usize> {
        let inner = offset.checked_sub(self.config_start())?;
        (inner + size as u64 <= self.config_size as u64).then_some(inner as usize)
    }

    fn register(&self, offset: u64, size: usize, write: bool) -> Option<&'static Register> {
        let found = REGISTERS.iter().find(|r| r.offset == offset);
        match found {
            Some(r) if r.size == size && !(write && r.read_only) => Some(r),
            Some(r) => {
                log::debug!(
                    "{}: {} {}: bad size {size} or read-only",
                    self.device.name(),
                    if write { "write to" } else { "read from" },
                    r.name
                );
                None
            }
            None => {
                log::debug!(
                    "{}: access to bad offset/size {offset}/{size}",
                    self.device.name()
                );
                None
            }
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        for queue in &self.queues {
            queue.reset();
        }
        self.shared.reset();
        self.selected = 0;
    }

    fn read_register(&mut self, offset: u64, size: usize) -> u32 {
        let all_ones = u32::MAX >> (32 - 8 * size as u32);
        if self.register(offset, size, false).is_none() {
            return all_ones;
        }
        let queue = self.selected_queue().map(|q| q.state());
        match offset {
            VIRTIO_PCI_HOST_FEATURES => self.device.host_features() as u32,
            VIRTIO_PCI_GUEST_FEATURES => self.shared.negotiated() as u32,
            VIRTIO_PCI_QUEUE_PFN => queue.map_or(all_ones, |q| q.pfn),
            VIRTIO_PCI_QUEUE_NUM => queue.map_or(0, |q| u32::from(q.size)),
            VIRTIO_PCI_QUEUE_SEL => u32::from(self.selected),
            VIRTIO_PCI_QUEUE_NOTIFY => 0,
            VIRTIO_PCI_STATUS => u32::from(self.shared.status()),
            VIRTIO_PCI_ISR => u32::from(self.shared.take_isr()),
            VIRTIO_MSI_CONFIG_VECTOR => u32::from(self.shared.config_vector.load(Ordering::SeqCst)),
            VIRTIO_MSI_QUEUE_VECTOR => {
                u32::from(queue.map_or(VIRTIO_MSI_NO_VECTOR, |q| q.msix_vector))
            }
            _ => all_ones,
        }
    }

    fn write_register(&mut self, offset: u64, size: usize, value: u32) {
        let Some(register) = self.register(offset, size, true) else {
            return;
        };
        let name = self.device.name();
        match offset {
            VIRTIO_PCI_GUEST_FEATURES => {
                let features = u64::from(value) & self.device.host_features();
                self.shared.negotiated.store(features, Ordering::SeqCst);
                self.device.features_negotiated(features);
            }
            VIRTIO_PCI_QUEUE_PFN => match self.selected_queue() {
                Some(queue) => {
                    if let Err(e) = queue.set_pfn(value) {
                        self.shared
                            .mark_broken(&format!("queue {}: {e}", queue.index()));
                    }
                }
                None => log::debug!(
                    "{name}: {} of absent queue {}",
                    register.name,
                    self.selected
                ),
            },
            VIRTIO_PCI_QUEUE_SEL => self.selected = value as u16,
            VIRTIO_PCI_QUEUE_NOTIFY => {
                let index = value as usize;
                if index < self.queues.len() {
                    self.device.queue_notify(index);
                } else {
                    log::debug!("{name}: notify of absent queue {index}");
                }
            }
            VIRTIO_PCI_STATUS => {
                self.shared.status.store(value as u8, Ordering::SeqCst);
                if value == 0 {
                    self.reset();
                }
                self.device.status_changed(value as u8);
            }
            VIRTIO_MSI_CONFIG_VECTOR => self
                .shared
                .config_vector
                .store(value as u16, Ordering::SeqCst),
            VIRTIO_MSI_QUEUE_VECTOR => match self.selected_queue() {
                Some(queue) => queue.set_msix_vector(value as u16),
                None => log::debug!(
                    "{name}: {} of absent queue {}",
                    register.name,
                    self.selected
                ),
            },
            // ISR: writes are ignored.
            _ => {}
        }
    }

    fn mirror_msi(&self, config: &ConfigSpace) {
        self.shared.set_msi(
            config
                .msi()
                .map(|(address, data, _)| (address, u32::from(data))),
        );
    }

    /// The transport's state and the device's, for a snapshot.
    pub fn save(&self) -> Option<TransportState> {
        Some(TransportState {
            negotiated: self.shared.negotiated(),
            selected: self.selected,
            status: self.shared.status.load(Ordering::SeqCst),
            broken: self.shared.broken(),
            isr: self.shared.isr(),
            config_vector: self.shared.config_vector.load(Ordering::SeqCst),
            queues: self.queues.iter().map(|q| q.state()).collect(),
            device: self.device.save_state()?,
        })
    }

    /// Load a saved state into a transport made from the same configuration.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), String> {
        if state.queues.len() != self.queues.len() {
            return Err(format!(
                "{} queues saved, the device has {}",
                state.queues.len(),
                self.queues.len()
            ));
        }
        for (queue, saved) in self.queues.iter().zip(&state.queues) {
            if saved.size != queue.size() {
                return Err(format!(
                    "queue {} of {} entries saved, the device has {}",
                    queue.index(),
                    saved.size,
                    queue.size()
                ));
            }
        }
        if state.negotiated & !self.device.host_features() != 0 {
            return Err(format!(
                "negotiated features {:#x} beyond those offered {:#x}",
                state.negotiated,
                self.device.host_features()
            ));
        }
        self.device.restore_state(&state.device)?;
        for (queue, saved) in self.queues.iter().zip(&state.queues) {
            queue.set_state(*saved);
        }
        self.shared
            .negotiated
            .store(state.negotiated, Ordering::SeqCst);
        self.device.features_negotiated(state.negotiated);
        self.shared.status.store(state.status, Ordering::SeqCst);
        self.shared.broken.store(state.broken, Ordering::SeqCst);
        *self.shared.isr.lock().unwrap_or_else(|e| e.into_inner()) = state.isr;
        self.shared
            .config_vector
            .store(state.config_vector, Ordering::SeqCst);
        self.selected = state.selected;
        Ok(())
    }
}

impl PciDevice for VirtioPci {
    fn bar_read(&mut self, _config: &ConfigSpace, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let size = data.len();
        if bar != IO_BAR || !matches!(size, 1 | 2 | 4) {
            return;
        }
        if let Some(inner) = self.device_config_offset(offset, size) {
            self.device.read_config(inner, data);
            return;
        }
        let value = self.read_register(offset, size);
        data.copy_from_slice(&value.to_le_bytes()[..size]);
    }

    fn bar_write(&mut self, _config: &ConfigSpace, bar: usize, offset: u64, data: &[u8]) {
        let size = data.len();
        if bar != IO_BAR || !matches!(size, 1 | 2 | 4) {
            return;
        }
        if let Some(inner) = self.device_config_offset(offset, size) {
            self.device.write_config(inner, data);
            return;
        }
        let mut bytes = [0u8; 4];
        bytes[..size].copy_from_slice(data);
        self.write_register(offset, size, u32::from_le_bytes(bytes));
    }

    fn config_written(&mut self, config: &ConfigSpace) {
        self.mirror_msi(config);
    }

    fn config_restored(&mut self, config: &ConfigSpace) {
        self.mirror_msi(config);
    }

    fn pause(&mut self) {
        self.device.pause();
    }

    fn resume(&mut self) {
        self.device.resume();
    }

    #[cfg(feature = "bhyve_snapshot")]
    fn save_device_state(&self) -> Option<Vec<u8>> {
        let state = self.save()?;
        crate::snapshot::encode_section(&state).ok()
    }

    #[cfg(feature = "bhyve_snapshot")]
    fn restore_device_state(&mut self, state: &[u8]) -> Result<(), String> {
        let state: TransportState =
            crate::snapshot::decode_section(state).map_err(|e| e.to_string())?;
        self.restore(&state)
    }
}
