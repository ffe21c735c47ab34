//! `dummy`: the test device bhyve builds into `pci_emul.c` (`PCI_EMUL_TEST`). An 8-byte I/O BAR
//! and two 4 KiB memory BARs that remember what is written, and MSI with four messages: a 32-bit
//! write of N to I/O offset 4 sends message N modulo the enabled count, and writing 0xABCDEF to
//! the I/O BAR sends every enabled message. Unlike bhyve's, it also has a legacy interrupt
//! (INTx), so the INTx routing has a user: a write starting at I/O offset 6 raises the line
//! when its first byte is non-zero and lowers it otherwise.

use std::sync::Arc;

use super::irq::IntxLine;
use super::{
    BarKind, ConfigSpace, PciAddress, PciDevice, PciError, PCIR_CLASS, PCIR_DEVICE, PCIR_VENDOR,
};
use crate::config::legacy::generic;
use crate::devices::registry::{CreatePci, PciEmulation, PciPlan};
use crate::devices::DeviceError;
use crate::interrupts::InterruptSink;

pub const EMULATION: PciEmulation = PciEmulation {
    name: "dummy",
    alias_of: None,
    legacy_config: generic,
    plan: Some(plan),
};

/// No settings.
fn plan(_plan: &mut PciPlan<'_>, _slot: PciAddress) -> Result<CreatePci, DeviceError> {
    Ok(Box::new(|create| {
        let dummy = Dummy::init(create.config_space, create.interrupts.clone())?;
        Ok(Box::new(dummy) as Box<dyn PciDevice>)
    }))
}

pub const DUMMY_VENDOR: u16 = 0x10dd;
pub const DUMMY_DEVICE: u16 = 0x0001;
const IO_SIZE: usize = 8;
const MEM_SIZE: usize = 4096;
const MSI_MESSAGES: u32 = 4;
/// The value that makes the device send all its messages.
const ALL_MESSAGES: u32 = 0xab_cdef;
/// I/O offset of the INTx level register.
pub const INTX_OFFSET: u64 = 6;

pub struct Dummy {
    io: [u8; IO_SIZE],
    mem: [Vec<u8>; 2],
    interrupts: Arc<dyn InterruptSink>,
    intx: Arc<IntxLine>,
}

impl Dummy {
    pub fn init(
        config: &mut ConfigSpace,
        interrupts: Arc<dyn InterruptSink>,
    ) -> Result<Self, PciError> {
        config.write16(PCIR_DEVICE, DUMMY_DEVICE);
        config.write16(PCIR_VENDOR, DUMMY_VENDOR);
        config.write8(PCIR_CLASS, 0x02);
        config.add_msi_capability(MSI_MESSAGES)?;
        config.request_bar(0, BarKind::Io, IO_SIZE as u64);
        config.request_bar(1, BarKind::Mem32, MEM_SIZE as u64);
        config.request_bar(2, BarKind::Mem32, MEM_SIZE as u64);
        let intx = config.request_intx();
        Ok(Self {
            io: [0; IO_SIZE],
            mem: [vec![0; MEM_SIZE], vec![0; MEM_SIZE]],
            interrupts,
            intx,
        })
    }

    fn registers(&mut self, bar: usize) -> Option<&mut [u8]> {
        match bar {
            0 => Some(&mut self.io[..]),
            1 | 2 => Some(&mut self.mem[bar - 1][..]),
            _ => None,
        }
    }

    fn send_msi(&self, config: &ConfigSpace, index: u32) {
        let Some((address, data, messages)) = config.msi() else {
            return;
        };
        if index < messages {
            let data = u32::from(data) + index;
            if let Err(e) = self.interrupts.signal_msi(address, data) {
                log::warn!("dummy: cannot send MSI: {e}");
            }
        }
    }
}

impl PciDevice for Dummy {
    /// The I/O BAR bytes, then both memory BARs.
    fn save_device_state(&self) -> Option<Vec<u8>> {
        let mut state = self.io.to_vec();
        for mem in &self.mem {
            state.extend_from_slice(mem);
        }
        Some(state)
    }

    fn restore_device_state(&mut self, state: &[u8]) -> Result<(), String> {
        if state.len() != IO_SIZE + 2 * MEM_SIZE {
            return Err(format!(
                "{} bytes of BAR contents, expected {}",
                state.len(),
                IO_SIZE + 2 * MEM_SIZE
            ));
        }
        let (io, mem) = state.split_at(IO_SIZE);
        self.io.copy_from_slice(io);
        for (dst, src) in self.mem.iter_mut().zip(mem.chunks_exact(MEM_SIZE)) {
            dst.copy_from_slice(src);
        }
        Ok(())
    }

    fn bar_read(&mut self, _config: &ConfigSpace, bar: usize, offset: u64, data: &mut [u8]) {
        let start = offset as usize;
        match self
            .registers(bar)
            .and_then(|r| r.get(start..start + data.len()))
        {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0),
        }
    }

    fn bar_write(&mut self, config: &ConfigSpace, bar: usize, offset: u64, data: &[u8]) {
        let start = offset as usize;
        let Some(dst) = self
            .registers(bar)
            .and_then(|r| r.get_mut(start..start + data.len()))
        else {
            return;
        };
        dst.copy_from_slice(data);
        if bar != 0 {
            return;
        }
        if offset == INTX_OFFSET {
            match data.first() {
                Some(0) => self.intx.deassert(),
                Some(_) => self.intx.assert(),
                None => {}
            }
        }
        let mut bytes = [0u8; 4];
        for (b, d) in bytes.iter_mut().zip(data) {
            *b = *d;
        }
        let value = u32::from_le_bytes(bytes);
        if let Some((_, _, messages)) = config.msi() {
            if offset == 4 && data.len() == 4 {
                self.send_msi(config, value % messages);
            }
            if value == ALL_MESSAGES {
                for index in 0..messages {
                    self.send_msi(config, index);
                }
            }
        }
    }
}
