//! The emulation registry, as FreeBSD's `pci_devemu` linker set: one entry per emulation, read
//! by the command line (`-s` legacy syntax, `-s help`), the configuration check
//! ([`super::check_supported`]) and machine construction ([`super::attach`]).
//!
//! Two tables:
//! - [`PCI_EMULATIONS`]: what `pci.B.S.F.device` names. An entry has its name, the emulation it
//!   is a legacy alias of, its `-s` option parser, and, when this build implements it, a
//!   [`PlanPci`] that checks the slot's configuration and returns the constructor.
//! - [`PLATFORM_DEVICES`]: the devices outside PCI (COM ports, RTC, ACPI PM, pc-testdev, …).
//!   An entry's [`PlanPlatform`] decides from the configuration whether the device exists and
//!   returns its constructor.
//!
//! Planning never creates anything, so the configuration check and machine construction run
//! the same code. A constructor puts its device on the buses and returns the device's stateful
//! parts ([`Stateful`]), which the VM pauses, resumes, saves and restores without naming them.
//!
//! Adding a device: write its module with its entry (a `const` of [`PciEmulation`] or
//! [`PlatformDevice`]) and its [`Stateful`] implementation, and list the entry below.

use std::sync::Arc;

use super::pci::irq::PirqRouter;
use super::pci::{ConfigSpace, PciAddress, PciDevice};
use super::{DeviceError, Stateful};
use crate::bus::Buses;
use crate::config::legacy::LegacyParser;
use crate::config::Config;
use crate::interrupts::InterruptSink;
use crate::lifecycle::RequestExit;
use crate::memory::GuestMemory;
use crate::vmm::PlatformCaps;

/// What a PCI emulation's plan sees: the configuration, and what earlier slots planned.
pub struct PciPlan<'a> {
    pub config: &'a Config,
    /// The LPC bridge, once a slot planned one (there is at most one).
    pub lpc: Option<PciAddress>,
}

/// What a PCI constructor gets: the function's configuration space to fill in and the
/// interrupt paths.
pub struct PciCreate<'a> {
    pub slot: PciAddress,
    pub config_space: &'a mut ConfigSpace,
    pub interrupts: &'a Arc<dyn InterruptSink>,
    /// The PIRQ router INTx pins and the LPC bridge's PIRQ registers go through.
    pub router: &'a Arc<PirqRouter>,
    /// Guest RAM, for devices that move data to and from it (DMA).
    pub memory: &'a Arc<GuestMemory>,
}

/// Makes one PCI function's device model.
pub type CreatePci = Box<dyn FnOnce(PciCreate<'_>) -> Result<Box<dyn PciDevice>, DeviceError>>;

/// Checks the configuration of the function at a slot (its node is
/// [`PciAddress::config_node`]) and returns how to make it.
pub type PlanPci = fn(&mut PciPlan<'_>, PciAddress) -> Result<CreatePci, DeviceError>;

/// One PCI emulation FreeBSD's bhyve knows.
pub struct PciEmulation {
    pub name: &'static str,
    /// For a legacy name (`amd_hostbridge`, `ahci-hd`): the emulation `-s` stores as `device`
    /// instead (`pe_alias`). A configuration naming the legacy name itself is refused.
    pub alias_of: Option<&'static str>,
    /// Turns the `-s` option string into keys below the slot's node (`pe_legacy_config`).
    pub legacy_config: LegacyParser,
    /// `None` for an emulation this build does not implement (yet).
    pub plan: Option<PlanPci>,
}

impl PciEmulation {
    /// Whether this build can create it (for an alias: the emulation it stands for).
    pub fn implemented(&self) -> bool {
        match self.alias_of {
            Some(target) => pci_emulation(target).is_some_and(|e| e.plan.is_some()),
            None => self.plan.is_some(),
        }
    }
}

/// What a platform device's plan sees.
pub struct PlatformPlan<'a> {
    pub config: &'a Config,
    /// What the backend's kernel provides: a device it holds is not made here.
    pub platform: &'a PlatformCaps,
    /// The LPC bridge, if one is configured: the COM ports and pc-testdev hang off it.
    pub lpc: Option<PciAddress>,
    /// Settings that have no effect, for one warning each when the devices are made.
    pub ignored: &'a mut Vec<String>,
}

/// What a platform constructor gets.
pub struct PlatformCreate<'a> {
    pub config: &'a Config,
    pub buses: &'a Arc<Buses>,
    pub interrupts: &'a Arc<dyn InterruptSink>,
    /// To end the VM (power off, reset, debug exit).
    pub control: &'a Arc<dyn RequestExit>,
    pub memory: &'a GuestMemory,
}

/// Makes a platform device, puts it on the buses and returns its stateful parts, paused
/// (see [`Stateful::pause`]; background threads may start only once their part is paused).
pub type CreatePlatform =
    Box<dyn FnOnce(&PlatformCreate<'_>) -> Result<Vec<Arc<dyn Stateful>>, DeviceError>>;

/// Checks the configuration; `None` when the configuration leaves the device out.
pub type PlanPlatform = fn(&mut PlatformPlan<'_>) -> Result<Option<CreatePlatform>, DeviceError>;

/// One device outside PCI.
pub struct PlatformDevice {
    pub name: &'static str,
    pub plan: PlanPlatform,
}

/// Every PCI emulation of FreeBSD's bhyve (amd64), in the order `-s help` lists them, plus
/// `dummy`, the test device pci_emul.c has when built with PCI_EMUL_TEST.
pub const PCI_EMULATIONS: &[PciEmulation] = &[
    super::ahci::EMULATION,
    super::ahci::EMULATION_CD,
    super::ahci::EMULATION_HD,
    super::pci::hostbridge::AMD_EMULATION,
    super::pci::dummy::EMULATION,
    super::net::e1000::EMULATION,
    super::unimplemented::FBUF,
    super::unimplemented::HDA,
    super::pci::hostbridge::EMULATION,
    super::pci::lpc::EMULATION,
    super::nvme::EMULATION,
    super::unimplemented::PASSTHRU,
    super::unimplemented::UART,
    super::unimplemented::VIRTIO_9P,
    super::virtio::block::EMULATION,
    super::console::EMULATION,
    super::unimplemented::VIRTIO_INPUT,
    super::net::virtio_net::EMULATION,
    super::virtio::rnd::EMULATION,
    super::unimplemented::VIRTIO_SCSI,
    super::unimplemented::XHCI,
];

/// The devices outside PCI, in the order they are made, paused (in reverse), saved and
/// restored.
pub const PLATFORM_DEVICES: &[PlatformDevice] = &[
    super::uart::ports::COM_PORTS,
    super::rtc::DEVICE,
    super::hpet::DEVICE,
    super::pm::DEVICE,
    super::pctestdev::DEVICE,
];

/// The PCI emulation called `name`.
pub fn pci_emulation(name: &str) -> Option<&'static PciEmulation> {
    PCI_EMULATIONS.iter().find(|e| e.name == name)
}

/// The `-s help` listing: every emulation name this build implements, one per line, as
/// FreeBSD's `pci_print_supported_devices` prints the emulations built in.
pub fn supported_pci_emulations() -> String {
    PCI_EMULATIONS
        .iter()
        .filter(|e| e.implemented())
        .map(|e| format!("{}\n", e.name))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_aliases_point_at_entries() {
        for (i, e) in PCI_EMULATIONS.iter().enumerate() {
            assert!(
                PCI_EMULATIONS[i + 1..].iter().all(|o| o.name != e.name),
                "{} listed twice",
                e.name
            );
            if let Some(target) = e.alias_of {
                let target = pci_emulation(target).expect("alias of a listed emulation");
                assert!(target.alias_of.is_none(), "{} aliases an alias", e.name);
            }
        }
        for (i, d) in PLATFORM_DEVICES.iter().enumerate() {
            assert!(PLATFORM_DEVICES[i + 1..].iter().all(|o| o.name != d.name));
        }
    }

    #[test]
    fn help_lists_only_what_this_build_implements() {
        assert_eq!(
            supported_pci_emulations(),
            "ahci\nahci-cd\nahci-hd\namd_hostbridge\ndummy\ne1000\nhostbridge\nlpc\nnvme\n\
             virtio-blk\nvirtio-console\nvirtio-net\nvirtio-rnd\n"
        );
        for name in ["passthru", "xhci"] {
            let e = pci_emulation(name).unwrap();
            assert!(!e.implemented(), "{name}");
        }
    }
}
