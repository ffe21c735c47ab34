//! MSI-X as bhyve's `pci_emul.c` provides it: a table of 16-byte entries at the start of a
//! memory BAR, the pending-bit array (PBA, always read as zero) on the next 4 KiB boundary, and
//! the enable and function-mask bits in the capability's message control word.
//!
//! The table is shared: the PCI layer serves the guest's table accesses and capability writes,
//! and the device model keeps an `Arc<MsixTable>` to send vectors from any thread without
//! touching the function's lock.

use std::sync::{Arc, Mutex};

use crate::interrupts::InterruptSink;

pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;
/// Largest table the capability can describe.
pub const MAX_MSIX_TABLE_ENTRIES: u16 = 2048;
pub const PCIM_MSIXCTRL_MSIX_ENABLE: u16 = 0x8000;
pub const PCIM_MSIXCTRL_FUNCTION_MASK: u16 = 0x4000;
pub const PCIM_MSIX_VCTRL_MASK: u32 = 0x1;

/// One table entry as the guest programmed it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixEntry {
    pub addr: u64,
    pub data: u32,
    pub vector_control: u32,
}

/// Everything a snapshot needs of a function's MSI-X.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixState {
    pub enabled: bool,
    pub function_mask: bool,
    pub entries: Vec<MsixEntry>,
}

/// A function's MSI-X table and control bits.
pub struct MsixTable {
    state: Mutex<MsixState>,
    sink: Arc<dyn InterruptSink>,
}

impl MsixTable {
    /// A table of `vectors` entries (1..=2048), every entry masked, MSI-X disabled.
    pub fn new(vectors: u16, sink: Arc<dyn InterruptSink>) -> Arc<Self> {
        let vectors = vectors.clamp(1, MAX_MSIX_TABLE_ENTRIES);
        let entries = vec![
            MsixEntry {
                vector_control: PCIM_MSIX_VCTRL_MASK,
                ..MsixEntry::default()
            };
            usize::from(vectors)
        ];
        Arc::new(Self {
            state: Mutex::new(MsixState {
                enabled: false,
                function_mask: false,
                entries,
            }),
            sink,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MsixState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn vectors(&self) -> usize {
        self.lock().entries.len()
    }

    /// Bytes of table, rounded up to 4 KiB: the PBA starts here.
    pub fn table_size(&self) -> u64 {
        (self.vectors() as u64 * MSIX_TABLE_ENTRY_SIZE).next_multiple_of(4096)
    }

    /// Bytes of the pending-bit array: one bit per vector in 64-bit words.
    pub fn pba_size(&self) -> u64 {
        (self.vectors() as u64).div_ceil(64) * 8
    }

    /// True when the guest enabled MSI-X.
    pub fn enabled(&self) -> bool {
        self.lock().enabled
    }

    /// Send vector `index` if MSI-X is enabled and neither the function nor the vector is
    /// masked; returns whether a message went out. (As in bhyve, a masked vector is not
    /// remembered as pending.)
    pub fn notify(&self, index: usize) -> bool {
        let entry = {
            let state = self.lock();
            if !state.enabled || state.function_mask {
                return false;
            }
            match state.entries.get(index) {
                Some(e) if e.vector_control & PCIM_MSIX_VCTRL_MASK == 0 => *e,
                _ => return false,
            }
        };
        if let Err(e) = self.sink.signal_msi(entry.addr, entry.data) {
            log::warn!("MSI-X vector {index}: {e}");
            return false;
        }
        true
    }

    pub(super) fn set_control(&self, control: u16) {
        let mut state = self.lock();
        state.enabled = control & PCIM_MSIXCTRL_MSIX_ENABLE != 0;
        state.function_mask = control & PCIM_MSIXCTRL_FUNCTION_MASK != 0;
    }

    /// Size of the BAR region the table and PBA occupy.
    pub fn region_size(&self) -> u64 {
        self.table_size() + self.pba_size()
    }

    /// A guest read at `offset` in the table BAR: 1, 4 or 8 aligned bytes of an entry, zero in
    /// the PBA, all ones otherwise.
    pub(super) fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let size = data.len() as u64;
        if !matches!(size, 1 | 4 | 8) || (offset % MSIX_TABLE_ENTRY_SIZE) % size != 0 {
            return;
        }
        let state = self.lock();
        let index = (offset / MSIX_TABLE_ENTRY_SIZE) as usize;
        if let Some(entry) = state.entries.get(index) {
            let bytes = entry_bytes(entry);
            let start = (offset % MSIX_TABLE_ENTRY_SIZE) as usize;
            data.copy_from_slice(&bytes[start..start + data.len()]);
        } else {
            let table = (state.entries.len() as u64 * MSIX_TABLE_ENTRY_SIZE).next_multiple_of(4096);
            let pba = (state.entries.len() as u64).div_ceil(64) * 8;
            if offset >= table && offset + size <= table + pba {
                data.fill(0);
            }
        }
    }

    /// A guest write in the table BAR: 4 or 8 aligned bytes inside an entry.
    pub(super) fn write(&self, offset: u64, data: &[u8]) {
        let size = data.len() as u64;
        if !matches!(size, 4 | 8) || (offset % MSIX_TABLE_ENTRY_SIZE) % size != 0 {
            return;
        }
        let mut state = self.lock();
        let index = (offset / MSIX_TABLE_ENTRY_SIZE) as usize;
        let Some(entry) = state.entries.get_mut(index) else {
            return;
        };
        let mut bytes = entry_bytes(entry);
        let start = (offset % MSIX_TABLE_ENTRY_SIZE) as usize;
        bytes[start..start + data.len()].copy_from_slice(data);
        *entry = MsixEntry {
            addr: u64::from_le_bytes(bytes[0..8].try_into().unwrap_or_default()),
            data: u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default()),
            vector_control: u32::from_le_bytes(bytes[12..16].try_into().unwrap_or_default()),
        };
    }

    pub fn state(&self) -> MsixState {
        self.lock().clone()
    }

    /// Load saved state; the number of vectors must match.
    pub fn set_state(&self, saved: &MsixState) -> Result<(), String> {
        let mut state = self.lock();
        if saved.entries.len() != state.entries.len() {
            return Err(format!(
                "MSI-X table of {} vectors saved, device has {}",
                saved.entries.len(),
                state.entries.len()
            ));
        }
        *state = saved.clone();
        Ok(())
    }
}

fn entry_bytes(entry: &MsixEntry) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    bytes[0..8].copy_from_slice(&entry.addr.to_le_bytes());
    bytes[8..12].copy_from_slice(&entry.data.to_le_bytes());
    bytes[12..16].copy_from_slice(&entry.vector_control.to_le_bytes());
    bytes
}
