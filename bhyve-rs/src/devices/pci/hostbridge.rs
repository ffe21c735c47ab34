//! `hostbridge`: the PCI host bridge at 0:0:0 (`pci_hostbridge.c`). NetApp's IDs by default;
//! `amd_hostbridge` is an alias the command line turns into `device=hostbridge` with AMD's
//! vendor ID and a made-up device ID.

use super::{
    ConfigSpace, PciAddress, PciDevice, PciError, PCIC_BRIDGE, PCIEM_TYPE_ROOT_PORT,
    PCIM_HDRTYPE_NORMAL, PCIR_CLASS, PCIR_DEVICE, PCIR_HDRTYPE, PCIR_SUBCLASS, PCIR_VENDOR,
    PCIS_BRIDGE_HOST,
};
use crate::config::legacy::{generic, LegacyError, LegacyWriter};
use crate::devices::registry::{CreatePci, PciEmulation, PciPlan};
use crate::devices::{parse_u16, DeviceError};

pub const HOSTBRIDGE_VENDOR: u16 = 0x1275; // NetApp
pub const HOSTBRIDGE_DEVICE: u16 = 0x1275;
/// What `amd_hostbridge` stores as `vendor` and `devid`.
pub const AMD_HOSTBRIDGE_VENDOR: u16 = 0x1022;
pub const AMD_HOSTBRIDGE_DEVICE: u16 = 0x7432;

pub const EMULATION: PciEmulation = PciEmulation {
    name: "hostbridge",
    alias_of: None,
    legacy_config: generic,
    plan: Some(plan),
};

/// `amd_hostbridge`: `-s` stores a `hostbridge` with AMD's IDs.
pub const AMD_EMULATION: PciEmulation = PciEmulation {
    name: "amd_hostbridge",
    alias_of: Some("hostbridge"),
    legacy_config: amd_legacy_config,
    plan: None,
};

/// The option string is ignored, as in pci_hostbridge.c.
fn amd_legacy_config(
    w: &mut LegacyWriter<'_>,
    node: &str,
    _conf: Option<&str>,
) -> Result<(), LegacyError> {
    w.set(node, "vendor", &format!("{AMD_HOSTBRIDGE_VENDOR:#06x}"))?;
    w.set(node, "devid", &format!("{AMD_HOSTBRIDGE_DEVICE:#06x}"))
}

/// `vendor` and `devid` from the slot's node.
fn plan(plan: &mut PciPlan<'_>, slot: PciAddress) -> Result<CreatePci, DeviceError> {
    let node = slot.config_node();
    let get = |name: &str, default: u16| match plan.config.get(&format!("{node}.{name}")) {
        Some(v) => parse_u16(&format!("{node}.{name}"), v, false),
        None => Ok(default),
    };
    let vendor = get("vendor", HOSTBRIDGE_VENDOR)?;
    let device = get("devid", HOSTBRIDGE_DEVICE)?;
    Ok(Box::new(move |create| {
        let bridge = HostBridge::init(create.config_space, create.slot.bus, vendor, device)?;
        Ok(Box::new(bridge) as Box<dyn PciDevice>)
    }))
}

/// The host bridge has no registers of its own beyond its header.
pub struct HostBridge;

impl HostBridge {
    /// Fill in the header of a host bridge at bus `bus` with the given IDs.
    pub fn init(
        config: &mut ConfigSpace,
        bus: u8,
        vendor: u16,
        device: u16,
    ) -> Result<Self, PciError> {
        config.write16(PCIR_VENDOR, vendor);
        config.write16(PCIR_DEVICE, device);
        config.write8(PCIR_HDRTYPE, PCIM_HDRTYPE_NORMAL);
        config.write8(PCIR_CLASS, PCIC_BRIDGE);
        config.write8(PCIR_SUBCLASS, PCIS_BRIDGE_HOST);
        config.add_pcie_capability(bus, PCIEM_TYPE_ROOT_PORT)?;
        Ok(Self)
    }
}

/// Configuration space is all a host bridge has.
impl PciDevice for HostBridge {
    fn save_device_state(&self) -> Option<Vec<u8>> {
        Some(Vec::new())
    }
}
