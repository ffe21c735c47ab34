//! `lpc`: the PCI-ISA bridge (`pci_lpc.c`) behind which the legacy devices live: the COM ports
//! now; bootrom, fwcfg, TPM and pc-testdev belong here too. Its own configuration space holds
//! the eight PIRQ routing registers (0x60-0x63, 0x68-0x6b) of an ICH10-style interrupt router.

use super::{
    ConfigSpace, PciDevice, PCIC_BRIDGE, PCIR_CLASS, PCIR_DEVICE, PCIR_REVID, PCIR_SUBCLASS,
    PCIR_SUBDEV_0, PCIR_SUBVEND_0, PCIR_VENDOR, PCIS_BRIDGE_ISA,
};

pub const LPC_VENDOR: u16 = 0x8086;
pub const LPC_DEVICE: u16 = 0x7000;
pub const LPC_REVID: u8 = 0x00;
pub const LPC_SUBVENDOR: u16 = 0x0000;
pub const LPC_SUBDEVICE: u16 = 0x0000;

/// A PIRQ register: bit 7 disables the pin, bits 0-3 name the ISA IRQ.
const PIRQ_DIS: u8 = 0x80;
const PIRQ_IRQ: u8 = 0x0f;
const NPIRQS: usize = 8;

/// Identity of the bridge as configured through `pcireg.*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LpcIds {
    pub vendor: u16,
    pub device: u16,
    pub revid: u8,
    pub subvendor: u16,
    pub subdevice: u16,
}

impl Default for LpcIds {
    fn default() -> Self {
        Self {
            vendor: LPC_VENDOR,
            device: LPC_DEVICE,
            revid: LPC_REVID,
            subvendor: LPC_SUBVENDOR,
            subdevice: LPC_SUBDEVICE,
        }
    }
}

/// The LPC bridge function.
pub struct LpcBridge {
    pirqs: [u8; NPIRQS],
}

/// PIRQ pin (1..=8) for a byte offset in configuration space.
fn pirq_pin(offset: usize) -> Option<usize> {
    match offset {
        0x60..=0x63 => Some(offset - 0x60 + 1),
        0x68..=0x6b => Some(offset - 0x68 + 5),
        _ => None,
    }
}

fn pirq_offset(pin: usize) -> usize {
    if pin <= 4 {
        0x60 + pin - 1
    } else {
        0x68 + pin - 5
    }
}

impl LpcBridge {
    pub fn init(config: &mut ConfigSpace, ids: LpcIds) -> Self {
        config.write16(PCIR_VENDOR, ids.vendor);
        config.write16(PCIR_DEVICE, ids.device);
        config.write8(PCIR_CLASS, PCIC_BRIDGE);
        config.write8(PCIR_SUBCLASS, PCIS_BRIDGE_ISA);
        config.write8(PCIR_REVID, ids.revid);
        config.write16(PCIR_SUBVEND_0, ids.subvendor);
        config.write16(PCIR_SUBDEV_0, ids.subdevice);
        // All pins start disabled; INTx routing will assign IRQs.
        let bridge = Self {
            pirqs: [PIRQ_DIS; NPIRQS],
        };
        for pin in 1..=NPIRQS {
            config.write8(pirq_offset(pin), bridge.pirqs[pin - 1]);
        }
        bridge
    }

    /// The PIRQ routing register of `pin` (1..=8).
    pub fn pirq(&self, pin: usize) -> Option<u8> {
        self.pirqs.get(pin.checked_sub(1)?).copied()
    }
}

impl PciDevice for LpcBridge {
    fn config_write(
        &mut self,
        config: &mut ConfigSpace,
        offset: usize,
        size: usize,
        value: u32,
    ) -> bool {
        if size != 1 {
            return false;
        }
        let Some(pin) = pirq_pin(offset) else {
            return false;
        };
        self.pirqs[pin - 1] = (value as u8) & (PIRQ_DIS | PIRQ_IRQ);
        config.write8(offset, self.pirqs[pin - 1]);
        true
    }

    fn config_restored(&mut self, config: &ConfigSpace) {
        for pin in 1..=NPIRQS {
            self.pirqs[pin - 1] = config.read8(pirq_offset(pin)) & (PIRQ_DIS | PIRQ_IRQ);
        }
    }

    /// The PIRQ routing is kept in configuration space, and reloaded from it.
    fn save_device_state(&self) -> Option<Vec<u8>> {
        Some(Vec::new())
    }
}
