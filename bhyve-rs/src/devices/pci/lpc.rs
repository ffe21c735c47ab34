//! `lpc`: the PCI-ISA bridge (`pci_lpc.c`) behind which the legacy devices live: the COM ports
//! now; bootrom, fwcfg, TPM and pc-testdev belong here too. Its own configuration space holds
//! the eight PIRQ routing registers (0x60-0x63, 0x68-0x6b) of the ICH10-style interrupt router
//! in [`super::irq`].

use std::sync::Arc;

use super::irq::{PirqRouter, NPIRQS, PIRQ_DIS, PIRQ_IRQ};
use super::{
    ConfigSpace, PciAddress, PciDevice, PCIC_BRIDGE, PCIR_CLASS, PCIR_DEVICE, PCIR_REVID,
    PCIR_SUBCLASS, PCIR_SUBDEV_0, PCIR_SUBVEND_0, PCIR_VENDOR, PCIS_BRIDGE_ISA,
};
use crate::config::legacy::generic;
use crate::devices::registry::{CreatePci, PciEmulation, PciPlan};
use crate::devices::{pcireg, DeviceError};

pub const EMULATION: PciEmulation = PciEmulation {
    name: "lpc",
    alias_of: None,
    legacy_config: generic,
    plan: Some(plan),
};

/// One bridge, on bus 0; its identity from `pcireg.*`.
fn plan(plan: &mut PciPlan<'_>, slot: PciAddress) -> Result<CreatePci, DeviceError> {
    if plan.lpc.is_some() {
        return Err(DeviceError::SecondLpc(slot));
    }
    if slot.bus != 0 {
        return Err(DeviceError::LpcNotOnBusZero(slot));
    }
    plan.lpc = Some(slot);
    let node = slot.config_node();
    let config = plan.config;
    let d = LpcIds::default();
    let ids = LpcIds {
        vendor: pcireg(config, &node, "vendor", d.vendor, u16::MAX)?,
        device: pcireg(config, &node, "device", d.device, u16::MAX)?,
        revid: pcireg(config, &node, "revid", d.revid.into(), 0xff)? as u8,
        subvendor: pcireg(config, &node, "subvendor", d.subvendor, u16::MAX)?,
        subdevice: pcireg(config, &node, "subdevice", d.subdevice, u16::MAX)?,
    };
    Ok(Box::new(move |create| {
        let bridge = LpcBridge::init(create.config_space, ids, create.router.clone());
        Ok(Box::new(bridge) as Box<dyn PciDevice>)
    }))
}

pub const LPC_VENDOR: u16 = 0x8086;
pub const LPC_DEVICE: u16 = 0x7000;
pub const LPC_REVID: u8 = 0x00;
pub const LPC_SUBVENDOR: u16 = 0x0000;
pub const LPC_SUBDEVICE: u16 = 0x0000;

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
    router: Arc<PirqRouter>,
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
    /// The bridge in front of `router`, which the PCI bus routes INTx through.
    pub fn init(config: &mut ConfigSpace, ids: LpcIds, router: Arc<PirqRouter>) -> Self {
        config.write16(PCIR_VENDOR, ids.vendor);
        config.write16(PCIR_DEVICE, ids.device);
        config.write8(PCIR_CLASS, PCIC_BRIDGE);
        config.write8(PCIR_SUBCLASS, PCIS_BRIDGE_ISA);
        config.write8(PCIR_REVID, ids.revid);
        config.write16(PCIR_SUBVEND_0, ids.subvendor);
        config.write16(PCIR_SUBDEV_0, ids.subdevice);
        // The COM ports' IRQs are theirs alone (bhyve's lpc_init reserves them).
        for (_, _, irq) in crate::devices::uart::LEGACY_PORTS {
            router.reserve_irq(irq as u8);
        }
        let bridge = Self { router };
        bridge.show_pirqs(config);
        bridge
    }

    /// The PIRQ routing register of `pin` (1..=8).
    pub fn pirq(&self, pin: usize) -> Option<u8> {
        self.router.pirq(pin)
    }

    fn show_pirqs(&self, config: &mut ConfigSpace) {
        for pin in 1..=NPIRQS {
            config.write8(pirq_offset(pin), self.pirq(pin).unwrap_or(PIRQ_DIS));
        }
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
        self.router.set_pirq(pin, value as u8);
        config.write8(offset, self.pirq(pin).unwrap_or(PIRQ_DIS));
        true
    }

    fn config_restored(&mut self, config: &ConfigSpace) {
        for pin in 1..=NPIRQS {
            self.router
                .set_pirq(pin, config.read8(pirq_offset(pin)) & (PIRQ_DIS | PIRQ_IRQ));
        }
    }

    fn intx_routed(&mut self, config: &mut ConfigSpace) {
        self.show_pirqs(config);
    }

    /// The PIRQ routing is kept in configuration space, and reloaded from it.
    fn save_device_state(&self) -> Option<Vec<u8>> {
        Some(Vec::new())
    }
}
