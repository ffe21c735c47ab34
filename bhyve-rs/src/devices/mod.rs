//! Device models: PCI, LPC, UART, …
//!
//! [`attach`] reads the configuration tree and puts every configured device on the buses;
//! [`check_supported`] performs the same validation without creating anything, so a VM is never
//! built for a configuration that names a device this program cannot emulate. Both go through
//! the emulation [`registry`]: each device's module holds its entry, which plans the device
//! from the configuration and makes it.
//!
//! As in bhyve, PCI functions come from `pci.B.S.F.device`; the COM ports hang off the LPC
//! bridge and exist only when an `lpc` function is configured. All four exist then (the guest
//! sees four 16550s, as with bhyve); `lpc.comN.path` connects one to a backend.
//!
//! Every stateful part implements [`Stateful`]; [`Devices`] holds them in one list.

pub mod ahci;
pub mod block;
pub mod console;
pub mod hpet;
pub mod net;
pub mod nvme;
pub mod pci;
pub mod pctestdev;
pub mod pm;
pub mod registry;
pub mod rtc;
mod stateful;
pub mod ticker;
pub mod uart;
mod unimplemented;
pub mod virtio;
#[cfg(test)]
pub(crate) mod virtio_test_driver;
pub(crate) mod worker;

use std::sync::Arc;

use crate::bus::{BusError, Buses};
use crate::config::{parse_c_unsigned, parse_memsize, Config};
use crate::interrupts::{InterruptSink, SharedLevelPins};
use crate::lifecycle::RequestExit;
use crate::memory::GuestMemory;
use crate::vmm::PlatformCaps;

use pci::irq::PirqRouter;
use pci::{ConfigSpace, PciAddress, PciError, PciRoot, PciRootBuilder};
use registry::{
    pci_emulation, CreatePci, CreatePlatform, PciCreate, PciPlan, PlatformCreate, PlatformPlan,
    PLATFORM_DEVICES,
};
use uart::backend::BackendError;

#[cfg(feature = "bhyve_snapshot")]
pub use stateful::Persist;
pub use stateful::{AsAny, StateId, Stateful};
pub use uart::backend::restore_terminal;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Every slot whose emulation this build does not implement, one line each.
    #[error("{}", unsupported_lines(.0))]
    Unsupported(Vec<(PciAddress, String)>),
    #[error("pci slot {slot}: unknown device \"{emulation}\"")]
    Unknown { slot: PciAddress, emulation: String },
    #[error("pci slot {0}: missing \"device\" value")]
    MissingDevice(PciAddress),
    #[error("pci slot {slot}: legacy device \"{emulation}\", use \"{alias}\" instead")]
    Legacy {
        slot: PciAddress,
        emulation: String,
        alias: &'static str,
    },
    #[error("invalid PCI slot \"{0}\"")]
    InvalidSlot(String),
    #[error("pci slot {0}: only one LPC bridge is allowed")]
    SecondLpc(PciAddress),
    #[error("pci slot {0}: the LPC bridge can be present only on bus 0")]
    LpcNotOnBusZero(PciAddress),
    #[error("invalid value \"{value}\" for \"{key}\"")]
    InvalidValue { key: String, value: String },
    #[error("{key}=host needs access to the host's PCI devices, which is not supported")]
    HostRegister { key: String },
    #[error("unable to initialize backend \"{path}\" for LPC device {device}: {source}")]
    Backend {
        device: &'static str,
        path: String,
        source: BackendError,
    },
    #[error("{device}: cannot claim the ports at {base:#x}: {source}")]
    Ports {
        device: &'static str,
        base: u64,
        source: BusError,
    },
    #[error("pc-testdev: cannot claim the range at {base:#x}: {source}")]
    PcTestDev { base: u64, source: BusError },
    #[error("pci slot {slot}: {source}")]
    Block {
        slot: PciAddress,
        source: block::BlockOpenError,
    },
    #[error(transparent)]
    Pci(#[from] PciError),
    #[error("{0}")]
    Platform(String),
}

/// Everything [`attach`] will create, worked out from the configuration alone.
struct Plan {
    functions: Vec<(PciAddress, &'static str, CreatePci)>,
    platform: Vec<CreatePlatform>,
    lpc: Option<PciAddress>,
    enable_bars: bool,
    bootrom: bool,
    highmem_end: u64,
    /// Settings that have no effect, for one warning each when the devices are made.
    ignored: Vec<String>,
}

fn parse_slot(bus: &str, slot: &str, function: &str) -> Option<PciAddress> {
    let number = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u8>().ok())
            .flatten()
    };
    PciAddress::new(number(bus)?, number(slot)?, number(function)?)
}

/// Every configured `pci.B.S.F` node, with its `device` value if set.
fn pci_nodes(config: &Config) -> Result<Vec<(PciAddress, Option<String>)>, DeviceError> {
    let mut nodes: std::collections::BTreeMap<PciAddress, Option<String>> = Default::default();
    for (key, value) in config.iter() {
        let parts: Vec<&str> = key.splitn(5, '.').collect();
        if parts.len() < 5 || parts[0] != "pci" {
            continue;
        }
        // `pci.enable_bars` and similar bus-wide settings are not slots.
        if !parts[1].bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let address = parse_slot(parts[1], parts[2], parts[3])
            .ok_or_else(|| DeviceError::InvalidSlot(parts[..4].join(".")))?;
        let entry = nodes.entry(address).or_default();
        if parts[4] == "device" {
            // get() expands %(var) references, as bhyve's get_config_value does.
            *entry = Some(config.get(key).unwrap_or(value).to_string());
        }
    }
    Ok(nodes.into_iter().collect())
}

pub(crate) fn parse_u16(key: &str, value: &str, hex_only: bool) -> Result<u16, DeviceError> {
    let parsed = if hex_only {
        // bhyve reads pcireg.* with strtol base 16: "8086" and "0x8086" mean the same.
        let digits = value
            .strip_prefix("0x")
            .or_else(|| value.strip_prefix("0X"))
            .unwrap_or(value);
        u64::from_str_radix(digits, 16).ok()
    } else {
        parse_c_unsigned(value)
    };
    parsed
        .and_then(|v| u16::try_from(v).ok())
        .ok_or_else(|| DeviceError::InvalidValue {
            key: key.to_string(),
            value: value.to_string(),
        })
}

/// `pcireg.<name>` override of an LPC identity register.
pub(crate) fn pcireg(
    config: &Config,
    node: &str,
    name: &str,
    default: u16,
    max: u16,
) -> Result<u16, DeviceError> {
    let key = format!("{node}.pcireg.{name}");
    match config.get(&key) {
        None => Ok(default),
        Some("host") => Err(DeviceError::HostRegister { key }),
        Some(value) => {
            let v = parse_u16(&key, value, true)?;
            if v > max {
                return Err(DeviceError::InvalidValue {
                    key,
                    value: value.to_string(),
                });
            }
            Ok(v)
        }
    }
}

fn unsupported_lines(slots: &[(PciAddress, String)]) -> String {
    let lines: Vec<String> = slots
        .iter()
        .map(|(slot, emulation)| {
            format!("pci slot {slot}: device emulation \"{emulation}\" is not supported yet")
        })
        .collect();
    lines.join("\n")
}

/// Every device the configuration names, checked and ready to be made: the PCI functions
/// through the registry's emulations, then the platform devices in registry order. All the
/// emulations this build does not implement are named at once.
fn plan(config: &Config, platform: &PlatformCaps) -> Result<Plan, DeviceError> {
    let mut planned = Vec::new();
    let mut unsupported = Vec::new();
    for (slot, device) in pci_nodes(config)? {
        let emulation = device.ok_or(DeviceError::MissingDevice(slot))?;
        let Some(entry) = pci_emulation(&emulation) else {
            return Err(DeviceError::Unknown { slot, emulation });
        };
        if let Some(alias) = entry.alias_of {
            return Err(DeviceError::Legacy {
                slot,
                emulation,
                alias,
            });
        }
        match entry.plan {
            Some(plan) => planned.push((slot, entry.name, plan)),
            None => unsupported.push((slot, emulation)),
        }
    }
    // Every unsupported emulation is named before any implemented one looks at its settings
    // (and, say, opens its disk).
    if !unsupported.is_empty() {
        return Err(DeviceError::Unsupported(unsupported));
    }
    let mut pci_plan = PciPlan { config, lpc: None };
    let mut functions = Vec::new();
    for (slot, name, plan) in planned {
        functions.push((slot, name, plan(&mut pci_plan, slot)?));
    }
    let lpc = pci_plan.lpc;

    let mut ignored = Vec::new();
    let mut platform_devices = Vec::new();
    for device in PLATFORM_DEVICES {
        let mut plan = PlatformPlan {
            config,
            platform,
            lpc,
            ignored: &mut ignored,
        };
        if let Some(create) = (device.plan)(&mut plan)? {
            platform_devices.push(create);
        }
    }

    let invalid = |key: &str| DeviceError::InvalidValue {
        key: key.into(),
        value: config.get(key).unwrap_or_default().into(),
    };
    let bootrom = config.get("lpc.bootrom").is_some() || config.get("bootrom").is_some();
    let enable_bars = config
        .get_bool("pci.enable_bars")
        .map_err(|_| invalid("pci.enable_bars"))?
        .unwrap_or(!bootrom);

    // Guest RAM above 3 GiB is mapped from 4 GiB up; 64-bit BARs go above it.
    const LOWMEM_LIMIT: u64 = 3 << 30;
    let memory = config
        .get("memory.size")
        .map(|v| {
            parse_memsize(v).ok_or_else(|| DeviceError::InvalidValue {
                key: "memory.size".into(),
                value: v.into(),
            })
        })
        .transpose()?
        .unwrap_or(256 << 20);
    let highmem_end = (1u64 << 32).saturating_add(memory.saturating_sub(LOWMEM_LIMIT));

    Ok(Plan {
        functions,
        platform: platform_devices,
        lpc,
        enable_bars,
        bootrom,
        highmem_end,
        ignored,
    })
}

/// Check that every device the configuration names can be created, without creating any.
pub fn check_supported(config: &Config, platform: &PlatformCaps) -> Result<(), DeviceError> {
    plan(config, platform).map(|_| ())
}

/// The devices of one VM, kept alive for its lifetime.
#[derive(Default)]
pub struct Devices {
    pci: Option<Arc<PciRoot>>,
    /// Every stateful part: the PCI functions by address, then the platform devices in
    /// registry order.
    parts: Vec<Arc<dyn Stateful>>,
    /// Where the LPC bridge is, if there is one (the COM ports and the ACPI devices hang off it).
    lpc: Option<PciAddress>,
}

impl Drop for Devices {
    fn drop(&mut self) {
        // Tell every background thread to stop before any part waits for its own thread.
        for part in &self.parts {
            part.stop();
        }
    }
}

impl Devices {
    /// Every stateful part, in a fixed order: PCI functions by address
    /// (`hostbridge@pci.0.0.0`, `lpc@pci.0.31.0`, …), then the platform devices in the order
    /// of [`registry::PLATFORM_DEVICES`] (`com1`…`com4`, `rtc`, `pm`, …). Snapshots are
    /// written in this order.
    pub fn parts(&self) -> &[Arc<dyn Stateful>] {
        &self.parts
    }

    /// The parts' names ([`StateId::name`]), in [`Devices::parts`] order.
    pub fn instances(&self) -> Vec<(String, &Arc<dyn Stateful>)> {
        self.parts
            .iter()
            .map(|part| (part.id().name().to_string(), part))
            .collect()
    }

    /// The parts of concrete type `T`.
    pub fn find<T: Stateful + 'static>(&self) -> impl Iterator<Item = &T> {
        self.parts
            .iter()
            .filter_map(|part| part.as_ref().as_any().downcast_ref::<T>())
    }

    /// The COM port called `name` (`com1`…`com4`), if it exists.
    pub fn uart(&self, name: &str) -> Option<&uart::SharedUart> {
        self.find::<uart::ports::ComPort>()
            .find(|port| port.name() == name)
            .map(|port| port.uart())
    }

    /// The PCI functions, if any are configured.
    pub fn pci(&self) -> Option<&Arc<PciRoot>> {
        self.pci.as_ref()
    }

    /// The LPC bridge's address, if one is configured.
    pub fn lpc(&self) -> Option<PciAddress> {
        self.lpc
    }

    /// The ACPI power-management registers (power button, S5, reset).
    pub fn power_management(&self) -> Option<&std::sync::Mutex<pm::PowerManagement>> {
        self.find::<std::sync::Mutex<pm::PowerManagement>>().next()
    }

    /// Whether a snapshot can hold every part; the error names the first that cannot.
    #[cfg(feature = "bhyve_snapshot")]
    pub fn check_saveable(&self) -> Result<(), String> {
        self.parts.iter().try_for_each(|part| part.check_saveable())
    }

    /// Devices holding only the PCI functions of `root`, for tests of PCI models.
    #[cfg(all(test, feature = "bhyve_snapshot", target_os = "linux"))]
    pub(crate) fn with_pci_root(root: Arc<PciRoot>) -> Self {
        let mut devices = Devices::default();
        devices.add_pci(root);
        devices
    }

    /// Devices made of `parts` alone, for tests of the code that walks them.
    #[cfg(test)]
    pub(crate) fn from_parts(parts: Vec<Arc<dyn Stateful>>) -> Self {
        Self {
            pci: None,
            parts,
            lpc: None,
        }
    }

    fn add_pci(&mut self, root: Arc<PciRoot>) {
        for (_, function) in root.functions() {
            self.parts.push(function.clone());
        }
        self.pci = Some(root);
    }

    /// Before a snapshot, with the vCPUs paused: stop every part's background work (timer
    /// threads, input threads, device I/O) from changing device state or raising interrupts,
    /// so the state saved is the state the guest left. In reverse order: PCI functions last.
    pub fn pause(&self) {
        for part in self.parts.iter().rev() {
            part.pause();
        }
    }

    /// Undo [`Devices::pause`], before the vCPUs run (again).
    pub fn resume(&self) {
        for part in &self.parts {
            part.resume();
        }
    }
}

/// Create every device the configuration names and register its ranges on `buses`. The
/// devices come back paused ([`Devices::pause`]); [`Devices::resume`] them when the VM starts.
///
/// `buses` is shared because the PCI layer moves BAR ranges when the guest reprograms a BAR.
pub fn attach(
    config: &Config,
    platform: &PlatformCaps,
    buses: &Arc<Buses>,
    interrupts: Arc<dyn InterruptSink>,
    control: Arc<dyn RequestExit>,
    memory: Arc<GuestMemory>,
) -> Result<Devices, DeviceError> {
    let plan = plan(config, platform)?;
    for warning in &plan.ignored {
        log::warn!("{warning}");
    }
    let mut devices = Devices::default();
    // PCI INTx and the HPET may share I/O APIC pins 16 and up.
    let interrupts: Arc<dyn InterruptSink> = Arc::new(SharedLevelPins::new(interrupts));

    let router = Arc::new(PirqRouter::new(interrupts.clone(), plan.bootrom));
    // The SCI shares IRQ 9 with whatever else lands there (bhyve's sci_init).
    router.use_irq(pm::SCI_INT as u8);
    if !plan.functions.is_empty() {
        let mut builder = PciRootBuilder::new(plan.highmem_end);
        builder.set_intx_router(router.clone());
        for (slot, name, create) in plan.functions {
            let mut config_space = ConfigSpace::new(plan.enable_bars);
            let device = create(PciCreate {
                slot,
                config_space: &mut config_space,
                interrupts: &interrupts,
                router: &router,
                memory: &memory,
            })?;
            builder.add(slot, name, config_space, device)?;
        }
        devices.add_pci(builder.build(buses)?);
    }

    let create = PlatformCreate {
        config,
        buses,
        interrupts: &interrupts,
        control: &control,
        memory: &memory,
    };
    for make in plan.platform {
        // Pushed one by one, so the parts made so far are stopped if a later one fails.
        let parts = make(&create)?;
        devices.parts.extend(parts);
    }
    // Nothing reaches device state from outside before the machine starts (or, for a
    // restore, before the saved state is loaded over it): see `Devices::resume`.
    devices.pause();
    devices.lpc = plan.lpc;
    Ok(devices)
}

#[cfg(test)]
mod tests;
