//! Device models: PCI, LPC, UART, …
//!
//! [`attach`] reads the configuration tree and puts every configured device on the buses;
//! [`check_supported`] performs the same validation without creating anything, so a VM is never
//! built for a configuration that names a device this program cannot emulate.
//!
//! As in bhyve, PCI functions come from `pci.B.S.F.device`; the COM ports hang off the LPC
//! bridge and exist only when an `lpc` function is configured. All four exist then (the guest
//! sees four 16550s, as with bhyve); `lpc.comN.path` connects one to a backend.

pub mod hpet;
pub mod pci;
pub mod pctestdev;
pub mod pm;
pub mod rtc;
pub mod ticker;
pub mod uart;

use std::sync::{Arc, Mutex};

use crate::bus::{BusError, Buses};
use crate::config::{parse_c_unsigned, parse_memsize, Config};
use crate::interrupts::InterruptSink;
use crate::memory::GuestMemory;
use crate::vcpu::{ExitReason, VmControl};

use pci::dummy::Dummy;
use pci::hostbridge::{HostBridge, HOSTBRIDGE_DEVICE, HOSTBRIDGE_VENDOR};
use pci::irq::{PirqRouter, IOAPIC_PINS};
use pci::lpc::{LpcBridge, LpcIds};
use pci::{ConfigSpace, PciAddress, PciError, PciFunction, PciRoot, PciRootBuilder};
use pctestdev::ExitRequest;
use uart::backend::{Backend, BackendError, BackendSpec};
use uart::{IsaIrq, LegacyUart, SharedUart, Uart, LEGACY_PORTS, UART_IO_SIZE};

pub use uart::backend::restore_terminal;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("pci slot {slot}: device emulation \"{emulation}\" is not supported yet")]
    Unsupported { slot: PciAddress, emulation: String },
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
    #[error(transparent)]
    Pci(#[from] PciError),
    #[error("{0}")]
    Platform(String),
}

/// One emulation bhyve knows, as far as this program implements it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Emulation {
    HostBridge { vendor: u16, device: u16 },
    Lpc(LpcIds),
    Dummy,
}

/// Emulations bhyve offers that are not implemented here (yet).
const NOT_YET_SUPPORTED: &[&str] = &[
    "ahci",
    "ahci-cd",
    "ahci-hd",
    "e1000",
    "fbuf",
    "hda",
    "nvme",
    "passthru",
    "uart",
    "virtio-9p",
    "virtio-blk",
    "virtio-console",
    "virtio-input",
    "virtio-net",
    "virtio-rnd",
    "virtio-scsi",
    "xhci",
];

/// Everything [`attach`] will create, worked out from the configuration alone.
#[derive(Debug)]
struct Plan {
    functions: Vec<(PciAddress, Emulation)>,
    /// One entry per COM port when an LPC bridge exists.
    uarts: Vec<(usize, Option<BackendSpec>)>,
    pctestdev: bool,
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

fn parse_u16(key: &str, value: &str, hex_only: bool) -> Result<u16, DeviceError> {
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
fn pcireg(
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

fn plan(config: &Config) -> Result<Plan, DeviceError> {
    let mut functions = Vec::new();
    let mut lpc_seen = false;
    for (slot, device) in pci_nodes(config)? {
        let node = slot.config_node();
        let emulation = device.ok_or(DeviceError::MissingDevice(slot))?;
        let planned = match emulation.as_str() {
            "hostbridge" => {
                let get = |name: &str, default: u16| match config.get(&format!("{node}.{name}")) {
                    Some(v) => parse_u16(&format!("{node}.{name}"), v, false),
                    None => Ok(default),
                };
                Emulation::HostBridge {
                    vendor: get("vendor", HOSTBRIDGE_VENDOR)?,
                    device: get("devid", HOSTBRIDGE_DEVICE)?,
                }
            }
            "amd_hostbridge" => {
                return Err(DeviceError::Legacy {
                    slot,
                    emulation,
                    alias: "hostbridge",
                })
            }
            "lpc" => {
                if lpc_seen {
                    return Err(DeviceError::SecondLpc(slot));
                }
                if slot.bus != 0 {
                    return Err(DeviceError::LpcNotOnBusZero(slot));
                }
                lpc_seen = true;
                let d = LpcIds::default();
                Emulation::Lpc(LpcIds {
                    vendor: pcireg(config, &node, "vendor", d.vendor, u16::MAX)?,
                    device: pcireg(config, &node, "device", d.device, u16::MAX)?,
                    revid: pcireg(config, &node, "revid", d.revid.into(), 0xff)? as u8,
                    subvendor: pcireg(config, &node, "subvendor", d.subvendor, u16::MAX)?,
                    subdevice: pcireg(config, &node, "subdevice", d.subdevice, u16::MAX)?,
                })
            }
            "dummy" => Emulation::Dummy,
            other if NOT_YET_SUPPORTED.contains(&other) => {
                return Err(DeviceError::Unsupported { slot, emulation })
            }
            _ => return Err(DeviceError::Unknown { slot, emulation }),
        };
        functions.push((slot, planned));
    }

    let mut ignored = Vec::new();
    let mut uarts = Vec::new();
    let mut stdio_user: Option<&'static str> = None;
    for (index, (name, _, _)) in LEGACY_PORTS.iter().enumerate() {
        let path = config.get(&format!("lpc.{name}.path"));
        if !lpc_seen {
            if let Some(path) = path {
                ignored.push(format!(
                    "lpc.{name}.path={path} ignored: no lpc device is configured"
                ));
            }
            continue;
        }
        let spec = path.map(BackendSpec::parse);
        if let Some(spec) = &spec {
            let fail = |source| DeviceError::Backend {
                device: name,
                path: path.unwrap_or_default().to_string(),
                source,
            };
            spec.check_supported().map_err(fail)?;
            if *spec == BackendSpec::Stdio {
                if stdio_user.is_some() {
                    return Err(fail(BackendError::StdioInUse));
                }
                stdio_user = Some(name);
            }
        }
        uarts.push((index, spec));
    }

    let invalid = |key: &str| DeviceError::InvalidValue {
        key: key.into(),
        value: config.get(key).unwrap_or_default().into(),
    };
    let pctestdev = config
        .get_bool("lpc.pc-testdev")
        .map_err(|_| invalid("lpc.pc-testdev"))?
        .unwrap_or(false);
    if pctestdev && !lpc_seen {
        ignored.push("lpc.pc-testdev ignored: no lpc device is configured".to_string());
    }
    let pctestdev = pctestdev && lpc_seen;

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
        uarts,
        pctestdev,
        enable_bars,
        bootrom,
        highmem_end,
        ignored,
    })
}

/// Check that every device the configuration names can be created, without creating any.
pub fn check_supported(config: &Config) -> Result<(), DeviceError> {
    plan(config).map(|_| ())
}

/// A COM port and what keeps its backend alive.
struct UartInstance {
    name: &'static str,
    uart: SharedUart,
    /// Dropped after nothing else needs it: stops the input thread, restores the terminal.
    _backend: Option<Backend>,
}

impl Drop for Devices {
    fn drop(&mut self) {
        self.rtc_stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
        // Tell every input thread to stop before any backend waits for its own thread.
        for u in &self.uarts {
            if let Some(backend) = &u._backend {
                backend.request_stop();
            }
        }
    }
}

/// A device as the snapshot code and tests reach it.
pub enum DeviceRef<'a> {
    Pci(&'a Arc<Mutex<PciFunction>>),
    Uart(&'a SharedUart),
}

/// The devices of one VM, kept alive for its lifetime.
#[derive(Default)]
pub struct Devices {
    pci: Option<Arc<PciRoot>>,
    uarts: Vec<UartInstance>,
    exit: Arc<ExitRequest>,
    rtc: Option<Arc<Mutex<rtc::Rtc>>>,
    pm: Option<Arc<Mutex<pm::PowerManagement>>>,
    hpet: Option<hpet::HpetDevice>,
    pctestdev: Option<pctestdev::PcTestDev>,
    /// Tells the RTC's interrupt thread to stop when the devices go away.
    rtc_stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Devices {
    /// Every device with its stable instance name, in a fixed order: PCI functions by address
    /// (`hostbridge@pci.0.0.0`, `lpc@pci.0.31.0`, …), then the COM ports (`com1`…`com4`).
    pub fn instances(&self) -> Vec<(String, DeviceRef<'_>)> {
        let mut all = Vec::new();
        if let Some(root) = &self.pci {
            for (_, function) in root.functions() {
                let name = function
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .name()
                    .to_string();
                all.push((name, DeviceRef::Pci(function)));
            }
        }
        for u in &self.uarts {
            all.push((u.name.to_string(), DeviceRef::Uart(&u.uart)));
        }
        all
    }

    /// The COM port called `name` (`com1`…`com4`), if it exists.
    pub fn uart(&self, name: &str) -> Option<&SharedUart> {
        self.uarts.iter().find(|u| u.name == name).map(|u| &u.uart)
    }

    /// The PCI functions, if any are configured.
    pub fn pci(&self) -> Option<&Arc<PciRoot>> {
        self.pci.as_ref()
    }

    /// The RTC/CMOS device.
    pub fn rtc(&self) -> Option<&Arc<Mutex<rtc::Rtc>>> {
        self.rtc.as_ref()
    }

    /// The ACPI power-management registers (power button, S5, reset).
    pub fn power_management(&self) -> Option<&Arc<Mutex<pm::PowerManagement>>> {
        self.pm.as_ref()
    }

    /// The HPET.
    pub fn hpet(&self) -> Option<&hpet::HpetDevice> {
        self.hpet.as_ref()
    }

    /// Whether a snapshot can hold every device; the error names the first that cannot.
    #[cfg(feature = "bhyve_snapshot")]
    pub fn check_saveable(&self) -> Result<(), String> {
        if let Some(root) = &self.pci {
            for (_, function) in root.functions() {
                function
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .check_saveable()?;
            }
        }
        Ok(())
    }

    /// Devices holding only the PCI functions of `root`, for tests of PCI models.
    #[cfg(all(test, feature = "bhyve_snapshot", target_os = "linux"))]
    pub(crate) fn with_pci_root(root: Arc<PciRoot>) -> Self {
        let mut devices = Devices::default();
        devices.pci = Some(root);
        devices
    }

    /// pc-testdev's stateful parts, when `lpc.pc-testdev` is on.
    pub fn pctestdev(&self) -> Option<&pctestdev::PcTestDev> {
        self.pctestdev.as_ref()
    }

    /// Before a snapshot, with the vCPUs paused: stop every device's background work (the
    /// RTC's and HPET's timer threads, the COM ports' input threads, PCI devices' I/O) from
    /// changing device state or raising interrupts, so the state saved is the state the guest
    /// left. The ACPI registers need nothing: their only writer besides the guest (SIGTERM's
    /// power button) goes through the lock on these devices that a save holds.
    pub fn pause(&self) {
        if let Some(rtc) = &self.rtc {
            rtc.lock().unwrap_or_else(|e| e.into_inner()).pause();
        }
        self.hpet.iter().for_each(hpet::HpetDevice::pause);
        for u in &self.uarts {
            u.uart
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .uart
                .pause_input();
        }
        if let Some(root) = &self.pci {
            for (_, function) in root.functions() {
                function.lock().unwrap_or_else(|e| e.into_inner()).pause();
            }
        }
    }

    /// Undo [`Devices::pause`], before the vCPUs run (again).
    pub fn resume(&self) {
        if let Some(root) = &self.pci {
            for (_, function) in root.functions() {
                function.lock().unwrap_or_else(|e| e.into_inner()).resume();
            }
        }
        for u in &self.uarts {
            u.uart
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .uart
                .resume_input();
        }
        if let Some(rtc) = &self.rtc {
            rtc.lock().unwrap_or_else(|e| e.into_inner()).resume();
        }
        self.hpet.iter().for_each(hpet::HpetDevice::resume);
    }

    /// Set when a device (pc-testdev's `isa-debug-exit`) asks for the VM to end; the run loop
    /// should check it after port-I/O exits and stop the VM with that exit status.
    pub fn exit_request(&self) -> &Arc<ExitRequest> {
        &self.exit
    }
}

/// Create every device the configuration names and register its ranges on `buses`. The
/// devices come back paused ([`Devices::pause`]); [`Devices::resume`] them when the VM starts.
///
/// `buses` is shared because the PCI layer moves BAR ranges when the guest reprograms a BAR.
pub fn attach(
    config: &Config,
    buses: &Arc<Buses>,
    interrupts: Arc<dyn InterruptSink>,
    control: Arc<VmControl>,
    memory: Arc<GuestMemory>,
) -> Result<Devices, DeviceError> {
    let plan = plan(config)?;
    for warning in &plan.ignored {
        log::warn!("{warning}");
    }
    let mut devices = Devices::default();

    let router = Arc::new(PirqRouter::new(interrupts.clone(), plan.bootrom));
    // The SCI shares IRQ 9 with whatever else lands there (bhyve's sci_init).
    router.use_irq(pm::SCI_INT as u8);
    if !plan.functions.is_empty() {
        let mut builder = PciRootBuilder::new(plan.highmem_end);
        builder.set_intx_router(router.clone());
        for (slot, emulation) in &plan.functions {
            let mut cfg = ConfigSpace::new(plan.enable_bars);
            match emulation {
                Emulation::HostBridge { vendor, device } => {
                    let bridge = HostBridge::init(&mut cfg, slot.bus, *vendor, *device)?;
                    builder.add(*slot, "hostbridge", cfg, Box::new(bridge))?;
                }
                Emulation::Lpc(ids) => {
                    let bridge = LpcBridge::init(&mut cfg, *ids, router.clone());
                    builder.add(*slot, "lpc", cfg, Box::new(bridge))?;
                }
                Emulation::Dummy => {
                    let dummy = Dummy::init(&mut cfg, interrupts.clone())?;
                    builder.add(*slot, "dummy", cfg, Box::new(dummy))?;
                }
            }
        }
        devices.pci = Some(builder.build(buses)?);
    }

    for (index, spec) in plan.uarts {
        let (name, base, irq) = LEGACY_PORTS[index];
        let mut backend = match &spec {
            Some(spec) => Some(Backend::open(spec).map_err(|source| {
                DeviceError::Backend {
                    device: name,
                    path: config
                        .get(&format!("lpc.{name}.path"))
                        .unwrap_or_default()
                        .to_string(),
                    source,
                }
            })?),
            None => None,
        };
        let output = backend.as_mut().and_then(Backend::take_output);
        let mut uart = Uart::new(output, Box::new(IsaIrq::new(interrupts.clone(), irq)));
        // Paused before its input thread exists (see the end of `attach`).
        uart.pause_input();
        let shared: SharedUart = Arc::new(Mutex::new(LegacyUart { uart }));
        buses
            .pio
            .insert(u64::from(base), UART_IO_SIZE, shared.clone())
            .map_err(|source| DeviceError::Ports {
                device: name,
                base: u64::from(base),
                source,
            })?;
        if let Some(backend) = backend.as_mut() {
            backend
                .start_input(name, shared.clone())
                .map_err(|e| DeviceError::Backend {
                    device: name,
                    path: config
                        .get(&format!("lpc.{name}.path"))
                        .unwrap_or_default()
                        .to_string(),
                    source: e.into(),
                })?;
        }
        devices.uarts.push(UartInstance {
            name,
            uart: shared,
            _backend: backend,
        });
    }

    if plan.pctestdev {
        let testdev = pctestdev::attach(buses, interrupts.clone(), devices.exit.clone())
            .map_err(|(base, source)| DeviceError::PcTestDev { base, source })?;
        devices.pctestdev = Some(testdev);
    }

    let lpc = plan
        .functions
        .iter()
        .find(|(_, emulation)| matches!(emulation, Emulation::Lpc(_)))
        .map(|(address, _)| *address);
    attach_platform(
        config,
        buses,
        interrupts,
        control,
        &memory,
        lpc,
        &mut devices,
    )?;
    // Nothing reaches device state from outside before the machine starts (or, for a
    // restore, before the saved state is loaded over it): see `Devices::resume`.
    devices.pause();
    Ok(devices)
}

/// The devices every bhyve VM has whatever its command line: the RTC/CMOS, the HPET, the ACPI
/// PM registers with the reset register, and the firmware tables in guest memory.
fn attach_platform(
    config: &Config,
    buses: &Arc<Buses>,
    interrupts: Arc<dyn InterruptSink>,
    control: Arc<VmControl>,
    memory: &GuestMemory,
    lpc: Option<PciAddress>,
    devices: &mut Devices,
) -> Result<(), DeviceError> {
    let use_localtime = rtc::use_localtime(config).map_err(DeviceError::Platform)?;
    let mut clock = rtc::Rtc::new(
        Box::new(rtc::HostClock::new()),
        use_localtime,
        memory.lowmem_end(),
        memory.highmem_size(),
        interrupts.clone(),
    );
    // Paused before its timer thread exists (see the end of `attach`).
    clock.pause();
    let clock = Arc::new(Mutex::new(clock));
    buses
        .pio
        .insert(
            u64::from(rtc::IO_RTC),
            u64::from(rtc::IO_RTC_LEN),
            clock.clone(),
        )
        .map_err(|source| DeviceError::Ports {
            device: "rtc",
            base: u64::from(rtc::IO_RTC),
            source,
        })?;
    rtc::spawn_ticker(clock.clone(), devices.rtc_stop.clone())
        .map_err(|e| DeviceError::Platform(format!("rtc: cannot start its timer thread: {e}")))?;
    devices.rtc = Some(clock);
    devices.hpet = Some(
        hpet::HpetDevice::attach(&buses.mmio, interrupts.clone(), IOAPIC_PINS.into())
            .map_err(DeviceError::Platform)?,
    );

    let on_event: pm::PowerEventHandler = Arc::new(move |event| {
        control.request_exit(match event {
            pm::PowerEvent::PowerOff => ExitReason::PowerOff,
            pm::PowerEvent::Reset => ExitReason::Reset,
        })
    });
    // The SCI is level triggered (bhyve's sci_init marks it so in the ELCR).
    interrupts
        .set_isa_irq_trigger(pm::SCI_INT as u8, true)
        .map_err(|e| {
            DeviceError::Platform(format!("pm: cannot make the SCI level triggered: {e}"))
        })?;
    let power = Arc::new(Mutex::new(pm::PowerManagement::new(interrupts, on_event)));
    pm::PowerManagement::register(power.clone(), &buses.pio).map_err(|source| {
        DeviceError::Ports {
            device: "pm",
            base: u64::from(pm::PM1A_EVT_ADDR),
            source,
        }
    })?;
    devices.pm = Some(power);

    let cpus = u32::from(
        crate::cli::cpu_topology(config)
            .map_err(DeviceError::Platform)?
            .cpus,
    );
    // Routed INTx pins, for the DSDT's _PRT and the MP table.
    let pci_intx: Vec<crate::mptable::PciIntxRoute> = devices
        .pci
        .iter()
        .flat_map(|root| root.intx_routes())
        .map(|r| crate::mptable::PciIntxRoute {
            bus: r.bus,
            slot: r.slot,
            pin: r.pin,
            ioapic_irq: r.route.ioapic_irq,
            pirq_pin: r.route.pirq_pin,
        })
        .collect();
    if crate::acpi::acpi_tables_enabled(config).map_err(DeviceError::Platform)? {
        let mut layout =
            crate::acpi::AcpiLayout::bhyve(cpus, memory.lowmem_end(), memory.highmem_size());
        layout.pci_intx = pci_intx.clone();
        layout.lpc = lpc.map(|address| crate::acpi::LpcLayout {
            slot: address.slot,
            func: address.function,
            com_ports: crate::acpi::ComPort::BHYVE.to_vec(),
        });
        // The windows bus 0 really decodes, as bhyve's pci_bus_write_dsdt writes them.
        if let Some(windows) = devices.pci.as_ref().and_then(|root| root.bus_windows(0)) {
            layout.pci_io = crate::acpi::Window {
                base: windows.io.0 as u32,
                end: windows.io.1 as u32,
            };
            layout.pci_mmio32 = crate::acpi::Window {
                base: windows.mem32.0 as u32,
                end: windows.mem32.1 as u32,
            };
            layout.pci_mmio64 = crate::acpi::Window {
                base: windows.mem64.0,
                end: windows.mem64.1,
            };
        }
        let blob = crate::acpi::build_tables(&layout)
            .map_err(|e| DeviceError::Platform(format!("ACPI tables: {e}")))?;
        memory
            .write(blob.gpa, &blob.bytes)
            .map_err(|e| DeviceError::Platform(format!("ACPI tables: {e}")))?;
    }
    if crate::mptable::mptable_enabled(config).map_err(DeviceError::Platform)? {
        let cpus = u16::try_from(cpus)
            .map_err(|_| DeviceError::Platform(format!("MP table: {cpus} vCPUs")))?;
        let mut layout = crate::mptable::MpTableLayout::new(cpus);
        layout.pci_intx = pci_intx;
        let table = crate::mptable::build_mptable(&layout, crate::mptable::MPTABLE_BASE as u32)
            .map_err(|e| DeviceError::Platform(format!("MP table: {e}")))?;
        memory
            .write(crate::mptable::MPTABLE_BASE, &table)
            .map_err(|e| DeviceError::Platform(format!("MP table: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
