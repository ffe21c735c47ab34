//! NVMe as bhyve's `pci_nvme.c`: an NVMe 1.4 controller with one namespace, backed by the
//! shared block backend or by host RAM (`ram=MiB`). Registers (CAP, VS, CC, CSTS, AQA,
//! ASQ, ACQ) and doorbells sit in a 64-bit memory BAR; MSI-X (one vector per queue pair plus
//! the admin queue) sits in BAR 4, and INTx stands in while MSI-X is off.
//!
//! The admin commands are bhyve's: IDENTIFY (controller, namespace, active namespace list,
//! namespace descriptors), CREATE and DELETE of I/O queues, GET and SET FEATURES (with the
//! number of queues), GET LOG PAGE (error, health, firmware, changed namespaces), ABORT (never
//! aborts), ASYNC EVENT REQUEST (held until an event), FORMAT NVM. The I/O commands are READ,
//! WRITE, FLUSH, WRITE ZEROES (a no-op, as bhyve) and DATASET MANAGEMENT (deallocate, offered
//! per `dsm=`). Data moves through PRP1/PRP2 and PRP lists, every address checked against
//! guest RAM: an address outside it ends the command with an error status.
//!
//! Unlike bhyve, a snapshot saves the controller: pausing waits for every command on the
//! backend to complete, so the saved state is the registers, the queues and the features.

mod state;

use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::cnum::{atoi, strtoul};
use crate::config::legacy::{LegacyError, LegacyWriter};
use crate::config::Config;
use crate::devices::block::{self, BlockBackend, BlockFile, BlockOp, BlockOptions, BlockRequest};
use crate::devices::pci::irq::IntxLine;
use crate::devices::pci::msix::MsixTable;
use crate::devices::pci::{
    BarKind, ConfigSpace, PciAddress, PciDevice, PCIC_STORAGE, PCIEM_TYPE_ROOT_INT_EP, PCIR_CLASS,
    PCIR_DEVICE, PCIR_PROGIF, PCIR_SUBCLASS, PCIR_VENDOR, PCIS_STORAGE_NVM,
};
use crate::devices::registry::{CreatePci, PciEmulation, PciPlan};
use crate::devices::DeviceError;
use crate::memory::{GuestMemory, Segment};

pub use state::{ControllerState, CqState, SqState};

pub const EMULATION: PciEmulation = PciEmulation {
    name: "nvme",
    alias_of: None,
    legacy_config,
    plan: Some(plan),
};

/// The registers' BAR and the MSI-X BAR (`NVME_MSIX_BAR`).
pub const REG_BAR: usize = 0;
pub const MSIX_BAR: usize = 4;
pub const PCI_VENDOR: u16 = 0xFB5D;
pub const PCI_DEVICE: u16 = 0x0A0A;
const PCIP_STORAGE_NVM_ENTERPRISE_NVMHCI_1_0: u8 = 0x02;

/// Defaults of the options (`NVME_QUEUES`, `NVME_MAX_QENTRIES`, `NVME_IOSLOTS`).
pub const DEFAULT_QUEUES: u32 = 16;
pub const DEFAULT_QUEUE_ENTRIES: u32 = 2048;
pub const DEFAULT_IOSLOTS: u32 = 8;
/// The BAR is at least 16 KiB: the Windows driver refuses a smaller one.
const MMIO_SPACE_MIN: u64 = 1 << 14;
/// Memory page size: CAP.MPSMIN = CAP.MPSMAX = 0, 4 KiB.
pub const PAGE_SIZE: u64 = 4096;
/// Largest transfer: 2^MDTS pages.
const MDTS: u8 = 9;
const MAX_DATA_SIZE: u64 = (1 << MDTS) * PAGE_SIZE;
/// Room-temperature reading of the health log, in kelvin.
const TEMPERATURE: u16 = 296;
/// OUI_FREEBSD_NVME_LOW (sys/net/ieee_oui.h): default EUI-64s start here.
const OUI_FREEBSD_NVME_LOW: u64 = 0x589c_fc20_0000;
pub const VERSION_1_4: u32 = 0x0001_0400;

// Register offsets.
pub const REG_CAP: u64 = 0x00;
pub const REG_VS: u64 = 0x08;
pub const REG_INTMS: u64 = 0x0c;
pub const REG_INTMC: u64 = 0x10;
pub const REG_CC: u64 = 0x14;
pub const REG_CSTS: u64 = 0x1c;
pub const REG_NSSR: u64 = 0x20;
pub const REG_AQA: u64 = 0x24;
pub const REG_ASQ: u64 = 0x28;
pub const REG_ACQ: u64 = 0x30;
pub const DOORBELL_BASE: u64 = 0x1000;

pub const CC_EN: u32 = 1;
const CC_SHN_SHIFT: u32 = 14;
const CC_WRITE_MASK: u32 = CC_EN | (0xf << 16) | (0xf << 20);
const CC_NEN_WRITE_MASK: u32 = (0x7 << 4) | (0xf << 7) | (0x7 << 11);
pub const CSTS_RDY: u32 = 1;
pub const CSTS_CFS: u32 = 2;
const CSTS_SHST_COMPLETE: u32 = 2 << 2;

/// Opcodes.
pub mod opc {
    pub const DELETE_IO_SQ: u8 = 0x00;
    pub const CREATE_IO_SQ: u8 = 0x01;
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const DELETE_IO_CQ: u8 = 0x04;
    pub const CREATE_IO_CQ: u8 = 0x05;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0a;
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0c;
    pub const FIRMWARE_ACTIVATE: u8 = 0x10;
    pub const FORMAT_NVM: u8 = 0x80;
    pub const SECURITY_SEND: u8 = 0x81;
    pub const SECURITY_RECEIVE: u8 = 0x82;
    pub const SANITIZE: u8 = 0x84;
    pub const GET_LBA_STATUS: u8 = 0x86;

    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DATASET_MANAGEMENT: u8 = 0x09;
}

/// Status field of a completion (without the phase bit): code type, code, do-not-retry.
pub mod sc {
    const fn generic(code: u16) -> u16 {
        code << 1
    }
    const fn specific(code: u16) -> u16 {
        (1 << 9) | (code << 1)
    }
    pub const SUCCESS: u16 = 0;
    pub const INVALID_OPCODE: u16 = generic(0x01);
    pub const INVALID_FIELD: u16 = generic(0x02);
    pub const DATA_TRANSFER_ERROR: u16 = generic(0x04);
    pub const INTERNAL_DEVICE_ERROR: u16 = generic(0x06);
    pub const INVALID_NAMESPACE_OR_FORMAT: u16 = generic(0x0b);
    pub const COMMAND_SEQUENCE_ERROR: u16 = generic(0x0c);
    pub const LBA_OUT_OF_RANGE: u16 = generic(0x80);
    pub const COMPLETION_QUEUE_INVALID: u16 = specific(0x00);
    pub const INVALID_QUEUE_IDENTIFIER: u16 = specific(0x01);
    pub const MAXIMUM_QUEUE_SIZE_EXCEEDED: u16 = specific(0x02);
    pub const ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED: u16 = specific(0x05);
    pub const INVALID_FIRMWARE_SLOT: u16 = specific(0x06);
    pub const INVALID_INTERRUPT_VECTOR: u16 = specific(0x08);
    pub const INVALID_LOG_PAGE: u16 = specific(0x09);
    pub const INVALID_FORMAT: u16 = specific(0x0a);
    pub const INVALID_QUEUE_DELETION: u16 = specific(0x0c);
    pub const FEATURE_NOT_NS_SPECIFIC: u16 = specific(0x0f);
    pub const DNR: u16 = 1 << 15;
}

/// Feature identifiers with their own handling.
mod fid {
    pub const TEMPERATURE_THRESHOLD: usize = 0x04;
    pub const ERROR_RECOVERY: usize = 0x05;
    pub const NUMBER_OF_QUEUES: usize = 0x07;
    pub const INTERRUPT_VECTOR_CONFIGURATION: usize = 0x09;
    pub const ASYNC_EVENT_CONFIGURATION: usize = 0x0b;
    /// One past the last feature bhyve knows (Endurance Group Event Configuration).
    pub const MAX: usize = 0x19;
    /// Features bhyve handles (some with checks of their own); it refuses the others with
    /// Invalid Field.
    pub fn known(fid: usize) -> bool {
        matches!(
            fid,
            0x01 | 0x02 | 0x04 | 0x05 | 0x07 | 0x08 | 0x09 | 0x0a | 0x0b
        )
    }
}

/// Log pages and their sizes.
mod log_page {
    pub const ERROR: u8 = 0x01;
    pub const HEALTH: u8 = 0x02;
    pub const FIRMWARE: u8 = 0x03;
    pub const CHANGED_NAMESPACES: u8 = 0x04;
    pub const ERROR_SIZE: usize = 64;
    pub const HEALTH_SIZE: usize = 512;
    pub const FIRMWARE_SIZE: usize = 512;
    pub const CHANGED_NAMESPACES_SIZE: usize = 4096;
}

/// `-s SLOT,nvme,PATH[,opts]` or `-s SLOT,nvme,ram=MiB[,opts]`.
pub fn legacy_config(
    w: &mut LegacyWriter<'_>,
    node: &str,
    conf: Option<&str>,
) -> Result<(), LegacyError> {
    match conf {
        Some(c) if c.starts_with("ram=") => {
            let (ram, rest) = match c.split_once(',') {
                Some((r, rest)) => (r, Some(rest)),
                None => (c, None),
            };
            w.set(node, "ram", &ram[4..])?;
            w.generic(node, rest)
        }
        _ => block::legacy_config(w, node, conf),
    }
}

/// What `dsm=` asks of the DSM bit in ONCS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dsm {
    /// Offered when the backend can deallocate.
    Auto,
    Enable,
    Disable,
}

/// The settings of one controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmeOptions {
    pub max_queues: u32,
    pub queue_entries: u32,
    pub ioslots: u32,
    /// `sectsz`: 512, 4096 or 8192; anything else leaves the backend's.
    pub sector_size: Option<u32>,
    pub serial: [u8; 20],
    /// `eui64`, as bhyve stores it; 0 makes one from the VM name and the slot.
    pub eui64: u64,
    pub dsm: Dsm,
    /// `ram=MiB`: a namespace in host memory instead of a disk.
    pub ram_mib: Option<u64>,
}

fn invalid(node: &str, key: &str, value: &str) -> DeviceError {
    DeviceError::InvalidValue {
        key: format!("{node}.{key}"),
        value: value.to_string(),
    }
}

impl NvmeOptions {
    /// Read the options below `node` as bhyve's `pci_nvme_parse_config`.
    pub fn from_config(config: &Config, node: &str, slot: PciAddress) -> Result<Self, DeviceError> {
        let get = |key: &str| config.get(&format!("{node}.{key}"));
        let mut serial = [0u8; 20];
        let default_serial = format!("NVME-{}-{}", slot.slot, slot.function);
        serial[..default_serial.len()].copy_from_slice(default_serial.as_bytes());
        let mut options = Self {
            max_queues: DEFAULT_QUEUES,
            queue_entries: DEFAULT_QUEUE_ENTRIES,
            ioslots: DEFAULT_IOSLOTS,
            sector_size: None,
            serial,
            eui64: 0,
            dsm: Dsm::Auto,
            ram_mib: None,
        };
        if let Some(v) = get("maxq") {
            // Out of 1..=16 falls back to 16, as in bhyve.
            let n = atoi(v);
            options.max_queues = if n <= 0 || n as u32 > DEFAULT_QUEUES {
                DEFAULT_QUEUES
            } else {
                n as u32
            };
        }
        if let Some(v) = get("qsz") {
            let n = atoi(v);
            if !(2..=65536).contains(&n) {
                return Err(invalid(node, "qsz", v));
            }
            options.queue_entries = n as u32;
        }
        if let Some(v) = get("ioslots") {
            let n = atoi(v);
            if n <= 0 {
                return Err(invalid(node, "ioslots", v));
            }
            options.ioslots = n as u32;
        }
        if let Some(v) = get("sectsz") {
            let n = atoi(v);
            if matches!(n, 512 | 4096 | 8192) {
                options.sector_size = Some(n as u32);
            }
        }
        if let Some(v) = get("ser") {
            // Serial numbers are padded with spaces.
            options.serial = [b' '; 20];
            let len = v.len().min(20);
            options.serial[..len].copy_from_slice(&v.as_bytes()[..len]);
        }
        if let Some(v) = get("eui64") {
            options.eui64 = strtoul(v).map_or(0, |(n, _)| n);
        }
        if let Some(v) = get("dsm") {
            options.dsm = match v {
                "auto" => Dsm::Auto,
                "enable" => Dsm::Enable,
                "disable" => Dsm::Disable,
                _ => return Err(invalid(node, "dsm", v)),
            };
        }
        if let Some(v) = get("ram") {
            match strtoul(v) {
                Some((mib, "")) if mib <= (1 << 20) => options.ram_mib = Some(mib),
                _ => return Err(invalid(node, "ram", v)),
            }
        }
        Ok(options)
    }
}

/// Where the namespace's blocks live.
enum Store {
    Block(Arc<BlockBackend>),
    Ram(Mutex<Vec<u8>>),
}

/// The namespace as the guest sees it.
#[derive(Debug, Clone, Copy)]
struct Namespace {
    size: u64,
    sector_bits: u32,
    /// Deallocation reaches the backend.
    can_delete: bool,
}

/// Check the slot's configuration, open the disk (or size the RAM namespace) while planning.
fn plan(plan: &mut PciPlan<'_>, slot: PciAddress) -> Result<CreatePci, DeviceError> {
    let node = slot.config_node();
    let options = NvmeOptions::from_config(plan.config, &node, slot)?;
    let file = match options.ram_mib {
        Some(_) => None,
        None => {
            let block = BlockOptions::from_config(plan.config, &node)?;
            Some(BlockFile::open(&block).map_err(|source| DeviceError::Block { slot, source })?)
        }
    };
    let vm_name = plan.config.get("name").unwrap_or_default().to_string();
    Ok(Box::new(move |create| {
        let (store, size, sector_size, can_delete) = match file {
            None => {
                let size = options.ram_mib.unwrap_or(0) << 20;
                // Ask first, so a size the host cannot give is one line rather than an abort;
                // then take zeroed memory, which the host provides page by page as it is used.
                Vec::<u8>::new()
                    .try_reserve_exact(size as usize)
                    .map_err(|_| {
                        DeviceError::Platform(format!("{node}: nvme: Unable to allocate RAM"))
                    })?;
                let data = vec![0u8; size as usize];
                (Store::Ram(Mutex::new(data)), size, 4096, false)
            }
            Some(file) => {
                let info = file.info();
                let name = format!("{}:{}", slot.slot, slot.function);
                let backend =
                    BlockBackend::start(file, create.memory.clone(), &name).map_err(|e| {
                        DeviceError::Platform(format!("{node}: cannot start disk workers: {e}"))
                    })?;
                (
                    Store::Block(Arc::new(backend)),
                    info.size,
                    info.sector_size,
                    info.can_delete,
                )
            }
        };
        let sector_size = options.sector_size.unwrap_or(sector_size).max(512);
        let sector_bits = sector_size.next_power_of_two().trailing_zeros();
        let eui64 = eui64_bytes(options.eui64, &vm_name, slot);
        let namespace = Namespace {
            size,
            sector_bits,
            can_delete,
        };
        let config = create.config_space;
        config.write16(PCIR_DEVICE, PCI_DEVICE);
        config.write16(PCIR_VENDOR, PCI_VENDOR);
        config.write8(PCIR_CLASS, PCIC_STORAGE);
        config.write8(PCIR_SUBCLASS, PCIS_STORAGE_NVM);
        config.write8(PCIR_PROGIF, PCIP_STORAGE_NVM_ENTERPRISE_NVMHCI_1_0);
        let bar_size = (DOORBELL_BASE + 8 * u64::from(options.max_queues + 1)).max(MMIO_SPACE_MIN);
        config.request_bar(REG_BAR, BarKind::Mem64, bar_size.next_power_of_two());
        let msix = MsixTable::new(options.max_queues as u16 + 1, create.interrupts.clone());
        config.add_msix_capability(msix.clone(), MSIX_BAR)?;
        config.add_pcie_capability(slot.bus, PCIEM_TYPE_ROOT_INT_EP)?;
        let intx = config.request_intx();
        let controller = Controller::new(
            &options,
            namespace,
            eui64,
            store,
            create.memory.clone(),
            msix,
            intx,
        );
        Ok(Box::new(Nvme {
            controller: Arc::new(controller),
        }) as Box<dyn PciDevice>)
    }))
}

/// CRC-16 (polynomial 0x8005, reflected), the checksum bhyve names default EUI-64s with.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// The namespace's EUI-64 bytes. A given value is stored as bhyve stores it (byte-swapped
/// once, then written big-endian: its little-endian bytes); a default one is the FreeBSD NVMe
/// OUI with a checksum of the VM name and slot, and namespace id 1, big-endian.
pub fn eui64_bytes(given: u64, vm_name: &str, slot: PciAddress) -> [u8; 8] {
    if given != 0 {
        return given.to_le_bytes();
    }
    let id = format!("{vm_name}{}{}{}", slot.bus, slot.slot, slot.function);
    let eui = OUI_FREEBSD_NVME_LOW | u64::from(crc16(id.as_bytes()));
    ((eui << 16) | 1).to_be_bytes()
}

/// The controller's mutable state, under one lock.
struct Inner {
    state: ControllerState,
    /// Commands handed to the backend and not completed.
    in_flight: u32,
    /// Command ids of outstanding ASYNC EVENT REQUESTs.
    aers: Vec<u16>,
    /// Health log counters: data units (thousands of 512-byte blocks, rounded up) and commands.
    stats: Stats,
    critical_warning: u8,
    /// A health event waiting for an ASYNC EVENT REQUEST: (type, information, log page).
    event: Option<(u32, u32, u32)>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    read_units: u64,
    write_units: u64,
    read_commands: u64,
    write_commands: u64,
    read_remainder: u32,
    write_remainder: u32,
}

/// One controller: identify data, the namespace, and the queues under a lock shared with the
/// backend's completions.
pub struct Controller {
    memory: Arc<GuestMemory>,
    msix: Arc<MsixTable>,
    intx: Arc<IntxLine>,
    store: Store,
    namespace: Namespace,
    max_queues: u32,
    queue_entries: u32,
    ioslots: u32,
    controller_data: Box<[u8; 4096]>,
    namespace_data: Box<[u8; 4096]>,
    eui64: [u8; 8],
    inner: Mutex<Inner>,
}

/// The 64-byte submission queue entry's fields this emulation reads.
#[derive(Debug, Clone, Copy, Default)]
struct Command {
    opcode: u8,
    cid: u16,
    nsid: u32,
    prp1: u64,
    prp2: u64,
    cdw10: u32,
    cdw11: u32,
    cdw12: u32,
    cdw13: u32,
}

impl Command {
    fn parse(raw: &[u8; 64]) -> Self {
        let d = |i: usize| u32::from_le_bytes([raw[i], raw[i + 1], raw[i + 2], raw[i + 3]]);
        let q = |i: usize| u64::from(d(i)) | (u64::from(d(i + 4)) << 32);
        Self {
            opcode: raw[0],
            cid: u16::from_le_bytes([raw[2], raw[3]]),
            nsid: d(4),
            prp1: q(24),
            prp2: q(32),
            cdw10: d(40),
            cdw11: d(44),
            cdw12: d(48),
            cdw13: d(52),
        }
    }
}

/// A command's outcome: completion dword 0 and status; `None` when it completes later.
type Outcome = Option<(u32, u16)>;

fn done(status: u16) -> Outcome {
    Some((0, status))
}

fn put_padded(dst: &mut [u8], text: &str) {
    dst.fill(b' ');
    let len = text.len().min(dst.len());
    dst[..len].copy_from_slice(&text.as_bytes()[..len]);
}

impl Controller {
    fn new(
        options: &NvmeOptions,
        namespace: Namespace,
        eui64: [u8; 8],
        store: Store,
        memory: Arc<GuestMemory>,
        msix: Arc<MsixTable>,
        intx: Arc<IntxLine>,
    ) -> Self {
        let offers_dsm = match options.dsm {
            Dsm::Auto => namespace.can_delete,
            Dsm::Enable => true,
            Dsm::Disable => false,
        };
        let controller_data = Box::new(controller_data(options, offers_dsm));
        let namespace_data = Box::new(namespace_data(&namespace, &eui64));
        let state = ControllerState::reset(options.max_queues, options.queue_entries);
        Self {
            memory,
            msix,
            intx,
            store,
            namespace,
            max_queues: options.max_queues,
            queue_entries: options.queue_entries,
            ioslots: options.ioslots,
            controller_data,
            namespace_data,
            eui64,
            inner: Mutex::new(Inner {
                state,
                in_flight: 0,
                aers: Vec::new(),
                stats: Stats {
                    read_remainder: 999,
                    write_remainder: 999,
                    ..Stats::default()
                },
                critical_warning: 0,
                event: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn offers_dsm(&self) -> bool {
        self.controller_data[520] & 0x4 != 0
    }

    /// The register bytes at `offset` (the first 0x40 bytes hold registers; reserved space
    /// and the doorbells read as zero).
    fn read_registers(&self, offset: u64, data: &mut [u8]) {
        let regs = self.lock().state.register_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = regs.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn write_register(&self, offset: u64, value: u32) {
        let mut inner = self.lock();
        let regs = &mut inner.state.regs;
        match offset {
            REG_CC => {
                let old_en = regs.cc & CC_EN;
                let new_en = value & CC_EN;
                if (value >> CC_SHN_SHIFT) & 3 != 0 {
                    regs.csts = (regs.csts & !(3 << 2)) | CSTS_SHST_COMPLETE;
                }
                if old_en != new_en {
                    if new_en == 0 {
                        // Commands on the backend complete into the old queues first.
                        drop(inner);
                        if let Store::Block(b) = &self.store {
                            b.drain();
                        }
                        inner = self.lock();
                        self.reset(&mut inner);
                    } else {
                        self.enable(&mut inner);
                    }
                }
                let regs = &mut inner.state.regs;
                regs.cc = (regs.cc & !CC_WRITE_MASK) | (value & CC_WRITE_MASK);
                if new_en == 0 {
                    regs.cc = (regs.cc & !CC_NEN_WRITE_MASK) | (value & CC_NEN_WRITE_MASK);
                    regs.csts &= !CSTS_RDY;
                } else if regs.csts & CSTS_CFS == 0 && inner.in_flight == 0 {
                    inner.state.regs.csts |= CSTS_RDY;
                }
            }
            REG_AQA => regs.aqa = value,
            REG_ASQ => regs.asq = (regs.asq & !0xffff_ffff) | u64::from(value & 0xffff_f000),
            o if o == REG_ASQ + 4 => regs.asq = (regs.asq & 0xffff_ffff) | (u64::from(value) << 32),
            REG_ACQ => regs.acq = (regs.acq & !0xffff_ffff) | u64::from(value & 0xffff_f000),
            o if o == REG_ACQ + 4 => regs.acq = (regs.acq & 0xffff_ffff) | (u64::from(value) << 32),
            // CAP, VS, CSTS are read-only; INTMS/INTMC have no effect with MSI-X; NSSR
            // (subsystem reset) is not offered.
            _ => log::debug!("nvme: write {value:#x} to register {offset:#x} ignored"),
        }
    }

    /// CC.EN 1 -> 0: forget the queues, the features the host set and held event requests.
    fn reset(&self, inner: &mut Inner) {
        let cc = inner.state.regs.cc;
        let aqa = inner.state.regs.aqa;
        let (asq, acq) = (inner.state.regs.asq, inner.state.regs.acq);
        inner.state = ControllerState::reset(self.max_queues, self.queue_entries);
        // The admin queue registers and CC keep what the host wrote.
        inner.state.regs.cc = cc;
        inner.state.regs.aqa = aqa;
        inner.state.regs.asq = asq;
        inner.state.regs.acq = acq;
        inner.aers.clear();
        inner.event = None;
        self.intx.deassert();
    }

    /// CC.EN 0 -> 1: take the admin queues from AQA, ASQ and ACQ. Queues outside guest RAM
    /// make the controller fatal (CSTS.CFS) instead of ready.
    fn enable(&self, inner: &mut Inner) {
        let regs = inner.state.regs;
        let sq_size = (regs.aqa & 0xfff) + 1;
        let cq_size = ((regs.aqa >> 16) & 0xfff) + 1;
        let sq_ok = self.queue_in_ram(regs.asq, sq_size, 64);
        let cq_ok = self.queue_in_ram(regs.acq, cq_size, 16);
        if sq_size < 2 || cq_size < 2 || !sq_ok || !cq_ok {
            log::debug!("nvme: admin queues invalid (AQA {:#x})", regs.aqa);
            inner.state.regs.csts |= CSTS_CFS;
            return;
        }
        inner.state.sq[0] = SqState {
            base: regs.asq,
            size: sq_size,
            head: 0,
            tail: 0,
            cqid: 0,
        };
        inner.state.cq[0] = CqState {
            base: regs.acq,
            size: cq_size,
            head: 0,
            tail: 0,
            vector: 0,
            interrupts: true,
        };
    }

    fn queue_in_ram(&self, base: u64, entries: u32, entry_size: u64) -> bool {
        self.memory
            .host_address(base, u64::from(entries) * entry_size)
            .is_ok()
    }

    /// A doorbell write: `index` counts 4-byte doorbells from the first (SQ 0 tail, CQ 0 head,
    /// SQ 1 tail, …). Writes the controller cannot take are ignored.
    fn doorbell(self: &Arc<Self>, index: u64, value: u32) {
        let qid = (index / 2) as usize;
        let is_sq = index % 2 == 0;
        let value = value as u16;
        let mut inner = self.lock();
        if inner.state.regs.csts & CSTS_RDY == 0 {
            log::debug!("nvme: doorbell {index} while not ready");
            return;
        }
        if is_sq {
            let live = qid <= inner.state.num_sq as usize
                && inner.state.sq.get(qid).is_some_and(|q| q.size != 0);
            match inner.state.sq.get_mut(qid) {
                Some(sq) if live && u32::from(value) < sq.size => sq.tail = value,
                _ => {
                    log::debug!("nvme: bad SQ {qid} tail doorbell {value}");
                    return;
                }
            }
            self.process(&mut inner, qid);
        } else {
            let live = qid <= inner.state.num_cq as usize;
            match inner.state.cq.get_mut(qid) {
                Some(cq) if live && cq.size != 0 && u32::from(value) < cq.size => cq.head = value,
                _ => {
                    log::debug!("nvme: bad CQ {qid} head doorbell {value}");
                    return;
                }
            }
            if !inner
                .state
                .cq
                .iter()
                .any(|c| c.size != 0 && c.head != c.tail)
            {
                self.intx.deassert();
            }
        }
    }

    /// Run the commands of SQ `qid` up to its tail; I/O queues stop while every I/O slot is in
    /// use and go on as commands complete.
    fn process(self: &Arc<Self>, inner: &mut Inner, qid: usize) {
        loop {
            let sq = inner.state.sq[qid];
            if sq.size == 0 || sq.head == sq.tail {
                break;
            }
            if qid != 0 && inner.in_flight >= self.ioslots {
                break;
            }
            let mut raw = [0u8; 64];
            let at = sq.base + u64::from(sq.head) * 64;
            if self.memory.read(at, &mut raw).is_err() {
                // Checked when the queue was made; RAM does not shrink, but stay safe.
                inner.state.regs.csts |= CSTS_CFS;
                return;
            }
            inner.state.sq[qid].head = ((u32::from(sq.head) + 1) % sq.size) as u16;
            let command = Command::parse(&raw);
            let outcome = if qid == 0 {
                self.admin(inner, &command)
            } else {
                self.io(inner, qid, &command)
            };
            if let Some((cdw0, status)) = outcome {
                let cqid = inner.state.sq[qid].cqid as usize;
                self.post(inner, cqid, qid, command.cid, cdw0, status);
            }
            if qid == 0 {
                self.deliver_event(inner);
            }
        }
    }

    /// Every I/O queue with commands waiting (after a completion freed a slot).
    fn process_waiting(self: &Arc<Self>, inner: &mut Inner) {
        for qid in 1..inner.state.sq.len() {
            if inner.in_flight >= self.ioslots {
                return;
            }
            let sq = inner.state.sq[qid];
            if sq.size != 0 && sq.head != sq.tail {
                self.process(inner, qid);
            }
        }
    }

    /// Write a completion into CQ `cqid`, with the phase bit flipped from the entry it
    /// replaces (as bhyve reads it from guest memory), and interrupt.
    fn post(&self, inner: &mut Inner, cqid: usize, sqid: usize, cid: u16, cdw0: u32, status: u16) {
        let sq_head = inner.state.sq.get(sqid).map_or(0, |s| s.head);
        let Some(cq) = inner.state.cq.get_mut(cqid).filter(|c| c.size != 0) else {
            log::debug!("nvme: completion for absent CQ {cqid} dropped");
            return;
        };
        let at = cq.base + u64::from(cq.tail) * 16;
        let old = self.memory.load_u16(at + 14).unwrap_or(0);
        let status = (status & !1) | ((old & 1) ^ 1);
        let mut entry = [0u8; 12];
        entry[0..4].copy_from_slice(&cdw0.to_le_bytes());
        entry[8..10].copy_from_slice(&sq_head.to_le_bytes());
        entry[10..12].copy_from_slice(&(sqid as u16).to_le_bytes());
        // The status word with the phase bit goes last: it tells the host the entry is new.
        let written = self.memory.write(at, &entry).is_ok()
            && self.memory.write(at + 12, &cid.to_le_bytes()).is_ok()
            && self.memory.store_u16(at + 14, status).is_ok();
        if !written {
            inner.state.regs.csts |= CSTS_CFS;
            return;
        }
        cq.tail = ((u32::from(cq.tail) + 1) % cq.size) as u16;
        if cq.interrupts && cq.head != cq.tail {
            if self.msix.enabled() {
                self.msix.notify(usize::from(cq.vector));
            } else {
                self.intx.assert();
            }
        }
    }

    /// Copy `data` to or from the guest through PRP1/PRP2 (at most 8 KiB: two pages), as
    /// bhyve's `nvme_prp_memcpy`.
    fn prp_copy(&self, prp1: u64, prp2: u64, data: &mut [u8], to_guest: bool) -> bool {
        if data.len() > 2 * PAGE_SIZE as usize {
            return false;
        }
        let first = ((PAGE_SIZE - prp1 % PAGE_SIZE) as usize).min(data.len());
        let (a, b) = data.split_at_mut(first);
        let b_len = b.len().min(PAGE_SIZE as usize);
        let b = &mut b[..b_len];
        let copy = |gpa: u64, buf: &mut [u8]| {
            if buf.is_empty() {
                return true;
            }
            if to_guest {
                self.memory.write(gpa, buf).is_ok()
            } else {
                self.memory.read(gpa, buf).is_ok()
            }
        };
        copy(prp1, a) && copy(prp2, b)
    }

    fn admin(self: &Arc<Self>, inner: &mut Inner, c: &Command) -> Outcome {
        match c.opcode {
            opc::DELETE_IO_SQ => done(self.delete_sq(inner, c)),
            opc::CREATE_IO_SQ => done(self.create_sq(inner, c)),
            opc::DELETE_IO_CQ => done(self.delete_cq(inner, c)),
            opc::CREATE_IO_CQ => done(self.create_cq(inner, c)),
            opc::GET_LOG_PAGE => done(self.get_log_page(inner, c)),
            opc::IDENTIFY => done(self.identify(c)),
            // The command is never found: not aborted (cdw0 bit 0).
            opc::ABORT => Some((1, sc::SUCCESS)),
            opc::SET_FEATURES => self.set_features(inner, c),
            opc::GET_FEATURES => self.get_features(inner, c),
            opc::FIRMWARE_ACTIVATE => done(sc::INVALID_FIRMWARE_SLOT),
            opc::ASYNC_EVENT_REQUEST => {
                let limit = usize::from(self.controller_data[259]) + 1;
                if inner.aers.len() >= limit {
                    return done(sc::ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED);
                }
                inner.aers.push(c.cid);
                None
            }
            opc::FORMAT_NVM => self.format(inner, c),
            opc::SECURITY_SEND | opc::SECURITY_RECEIVE | opc::SANITIZE | opc::GET_LBA_STATUS => {
                done(sc::INVALID_FIELD)
            }
            _ => done(sc::INVALID_OPCODE),
        }
    }

    fn create_cq(&self, inner: &mut Inner, c: &Command) -> u16 {
        let qid = (c.cdw10 & 0xffff) as usize;
        if c.cdw11 & 1 == 0 {
            // Only physically contiguous queues.
            return sc::INVALID_FIELD;
        }
        let state = &mut inner.state;
        if qid == 0 || qid > state.num_cq as usize || state.cq[qid].size != 0 {
            return sc::INVALID_QUEUE_IDENTIFIER;
        }
        let vector = (c.cdw11 >> 16) as u16;
        if u32::from(vector) > self.max_queues + 1 {
            return sc::INVALID_INTERRUPT_VECTOR;
        }
        let size = (c.cdw10 >> 16) + 1;
        if size < 2 || size > self.queue_entries {
            return sc::MAXIMUM_QUEUE_SIZE_EXCEEDED;
        }
        if !self.queue_in_ram(c.prp1, size, 16) {
            return sc::INVALID_FIELD;
        }
        state.cq[qid] = CqState {
            base: c.prp1,
            size,
            head: 0,
            tail: 0,
            vector,
            interrupts: c.cdw11 & 2 != 0,
        };
        sc::SUCCESS
    }

    fn create_sq(&self, inner: &mut Inner, c: &Command) -> u16 {
        let qid = (c.cdw10 & 0xffff) as usize;
        if c.cdw11 & 1 == 0 {
            return sc::INVALID_FIELD;
        }
        let state = &mut inner.state;
        if qid == 0 || qid > state.num_sq as usize || state.sq[qid].size != 0 {
            return sc::INVALID_QUEUE_IDENTIFIER;
        }
        let size = (c.cdw10 >> 16) + 1;
        if size < 2 || size > self.queue_entries {
            return sc::MAXIMUM_QUEUE_SIZE_EXCEEDED;
        }
        let cqid = (c.cdw11 >> 16) as usize;
        if cqid == 0 || cqid > state.num_cq as usize {
            return sc::INVALID_QUEUE_IDENTIFIER;
        }
        if state.cq[cqid].size == 0 {
            return sc::COMPLETION_QUEUE_INVALID;
        }
        if !self.queue_in_ram(c.prp1, size, 64) {
            return sc::INVALID_FIELD;
        }
        state.sq[qid] = SqState {
            base: c.prp1,
            size,
            head: 0,
            tail: 0,
            cqid: cqid as u16,
        };
        sc::SUCCESS
    }

    fn delete_sq(&self, inner: &mut Inner, c: &Command) -> u16 {
        let qid = (c.cdw10 & 0xffff) as usize;
        let state = &mut inner.state;
        if qid == 0 || qid > state.num_sq as usize || state.sq[qid].size == 0 {
            return sc::INVALID_QUEUE_IDENTIFIER;
        }
        state.sq[qid] = SqState::default();
        sc::SUCCESS
    }

    fn delete_cq(&self, inner: &mut Inner, c: &Command) -> u16 {
        let qid = (c.cdw10 & 0xffff) as usize;
        let state = &mut inner.state;
        if qid == 0 || qid > state.num_cq as usize || state.cq[qid].size == 0 {
            return sc::INVALID_QUEUE_IDENTIFIER;
        }
        if state.sq[1..]
            .iter()
            .any(|s| s.size != 0 && usize::from(s.cqid) == qid)
        {
            return sc::INVALID_QUEUE_DELETION;
        }
        state.cq[qid] = CqState::default();
        sc::SUCCESS
    }

    fn identify(&self, c: &Command) -> u16 {
        let mut page = [0u8; 4096];
        match c.cdw10 & 0xff {
            0x00 => page.copy_from_slice(&self.namespace_data[..]),
            0x01 => page.copy_from_slice(&self.controller_data[..]),
            // Active namespaces: only namespace 1.
            0x02 => page[0..4].copy_from_slice(&1u32.to_le_bytes()),
            0x03 => {
                if c.nsid != 1 {
                    return sc::INVALID_NAMESPACE_OR_FORMAT;
                }
                // One descriptor: the EUI-64.
                page[0] = 1;
                page[1] = 8;
                page[4..12].copy_from_slice(&self.eui64);
            }
            _ => return sc::INVALID_FIELD,
        }
        if self.prp_copy(c.prp1, c.prp2, &mut page, true) {
            sc::SUCCESS
        } else {
            sc::DATA_TRANSFER_ERROR
        }
    }

    fn get_log_page(&self, inner: &mut Inner, c: &Command) -> u16 {
        let dwords = u64::from((c.cdw11 << 16) | (c.cdw10 >> 16)) + 1;
        let len = dwords * 4;
        let offset = (u64::from(c.cdw13) << 32) | u64::from(c.cdw12);
        let mut page = match (c.cdw10 & 0xff) as u8 {
            log_page::ERROR => vec![0u8; log_page::ERROR_SIZE],
            log_page::HEALTH => self.health_log(inner),
            log_page::FIRMWARE => vec![0u8; log_page::FIRMWARE_SIZE],
            log_page::CHANGED_NAMESPACES => vec![0u8; log_page::CHANGED_NAMESPACES_SIZE],
            _ => return sc::INVALID_LOG_PAGE,
        };
        if offset >= page.len() as u64 {
            return sc::INVALID_FIELD;
        }
        let end = (offset.saturating_add(len)).min(page.len() as u64) as usize;
        let part = &mut page[offset as usize..end];
        if self.prp_copy(c.prp1, c.prp2, part, true) {
            sc::SUCCESS
        } else {
            sc::DATA_TRANSFER_ERROR
        }
    }

    fn health_log(&self, inner: &Inner) -> Vec<u8> {
        let mut page = vec![0u8; log_page::HEALTH_SIZE];
        let s = &inner.stats;
        page[0] = inner.critical_warning;
        page[1..3].copy_from_slice(&TEMPERATURE.to_le_bytes());
        page[3] = 100; // available spare
        page[4] = 10; // available spare threshold
        page[32..48].copy_from_slice(&u128::from(s.read_units).to_le_bytes());
        page[48..64].copy_from_slice(&u128::from(s.write_units).to_le_bytes());
        page[64..80].copy_from_slice(&u128::from(s.read_commands).to_le_bytes());
        page[80..96].copy_from_slice(&u128::from(s.write_commands).to_le_bytes());
        page
    }

    fn feature_scope_error(&self, fid: usize, nsid: u32) -> Option<u16> {
        let namespace_specific = fid == fid::ERROR_RECOVERY;
        if namespace_specific && nsid == u32::MAX {
            return Some(sc::INVALID_FIELD);
        }
        if !namespace_specific && nsid != 0 && nsid != u32::MAX {
            return Some(sc::FEATURE_NOT_NS_SPECIFIC);
        }
        None
    }

    fn set_features(self: &Arc<Self>, inner: &mut Inner, c: &Command) -> Outcome {
        let fid = (c.cdw10 & 0xff) as usize;
        if fid >= fid::MAX {
            return done(sc::INVALID_FIELD);
        }
        if let Some(status) = self.feature_scope_error(fid, c.nsid) {
            return done(status);
        }
        if !fid::known(fid) {
            return done(sc::INVALID_FIELD);
        }
        let mut value = c.cdw11;
        let mut cdw0 = 0;
        match fid {
            fid::NUMBER_OF_QUEUES => {
                let state = &mut inner.state;
                if state.num_queues_set {
                    return done(sc::COMMAND_SEQUENCE_ERROR);
                }
                let (nsq, ncq) = (value & 0xffff, value >> 16);
                if nsq == 0xffff || ncq == 0xffff {
                    return done(sc::INVALID_FIELD);
                }
                state.num_sq = (nsq + 1).min(self.max_queues);
                state.num_cq = (ncq + 1).min(self.max_queues);
                value = (state.num_sq - 1) | ((state.num_cq - 1) << 16);
                cdw0 = value;
                state.num_queues_set = true;
            }
            fid::INTERRUPT_VECTOR_CONFIGURATION => {
                let vector = value & 0xffff;
                let coalescing_disable = value & (1 << 16) != 0;
                let used = inner.state.cq.iter().any(|q| u32::from(q.vector) == vector);
                if vector > self.max_queues + 1 || (vector == 0 && !coalescing_disable) || !used {
                    return done(sc::INVALID_FIELD);
                }
            }
            fid::TEMPERATURE_THRESHOLD => {
                let threshold = value & 0xffff;
                let select = (value >> 16) & 0xf;
                let kind = (value >> 20) & 0x3;
                if (select != 0 && select != 0xf) || kind > 1 {
                    return done(sc::INVALID_FIELD);
                }
                let t = u32::from(TEMPERATURE);
                let over = (kind == 0 && t >= threshold) || (kind == 1 && t <= threshold);
                if over {
                    inner.critical_warning |= 0x2;
                } else {
                    inner.critical_warning &= !0x2;
                }
                inner.state.features[fid] = value;
                if over {
                    inner.event = Some((1, u32::from(inner.critical_warning), 0x02));
                }
                return Some((cdw0, sc::SUCCESS));
            }
            _ => {}
        }
        inner.state.features[fid] = value;
        Some((cdw0, sc::SUCCESS))
    }

    /// Complete a held ASYNC EVENT REQUEST with the waiting event, if the host enabled its
    /// kind, after the command that raised it completed (as bhyve's event thread does).
    fn deliver_event(&self, inner: &mut Inner) {
        let Some((kind, info, log)) = inner.event else {
            return;
        };
        let mask = inner.state.features[fid::ASYNC_EVENT_CONFIGURATION] & 0xff;
        if kind == 1 && mask & info == 0 {
            inner.event = None;
            return;
        }
        if inner.aers.is_empty() {
            return;
        }
        inner.event = None;
        let cid = inner.aers.remove(0);
        let cdw0 = (log << 16) | (info << 8) | kind;
        self.post(inner, 0, 0, cid, cdw0, sc::SUCCESS);
    }

    fn get_features(&self, inner: &mut Inner, c: &Command) -> Outcome {
        let fid = (c.cdw10 & 0xff) as usize;
        if fid >= fid::MAX || !fid::known(fid) {
            return done(sc::INVALID_FIELD);
        }
        Some((inner.state.features[fid], sc::SUCCESS))
    }

    fn format(self: &Arc<Self>, inner: &mut Inner, c: &Command) -> Outcome {
        let secure_erase = (c.cdw10 >> 9) & 0x7;
        let format = c.cdw10 & 0xf;
        let protection = (c.cdw10 >> 5) & 0x7;
        if secure_erase > 1 || protection != 0 {
            return done(sc::INVALID_FIELD);
        }
        if format != 0 {
            return done(sc::INVALID_FORMAT);
        }
        match &self.store {
            Store::Ram(data) => {
                data.lock().unwrap_or_else(|e| e.into_inner()).fill(0);
                done(sc::SUCCESS)
            }
            Store::Block(backend) => {
                let op = BlockOp::Delete {
                    offset: 0,
                    len: self.namespace.size,
                };
                self.submit(inner, backend, op, 0, c.cid, None);
                None
            }
        }
    }

    /// Hand `op` to the backend; its completion posts to the queue of SQ `sqid`.
    fn submit(
        self: &Arc<Self>,
        inner: &mut Inner,
        backend: &Arc<BlockBackend>,
        op: BlockOp,
        sqid: usize,
        cid: u16,
        stats: Option<(u8, u64)>,
    ) {
        inner.in_flight += 1;
        let this = self.clone();
        backend.submit(BlockRequest {
            op,
            done: Box::new(move |result| {
                let status = match result {
                    Ok(()) => sc::SUCCESS,
                    Err(_) if sqid == 0 => sc::INTERNAL_DEVICE_ERROR,
                    Err(_) => sc::DATA_TRANSFER_ERROR,
                };
                this.complete(sqid, cid, status, stats);
            }),
        });
    }

    /// A backend request ended: post its completion, free its slot, run waiting commands.
    fn complete(self: &Arc<Self>, sqid: usize, cid: u16, status: u16, stats: Option<(u8, u64)>) {
        let mut inner = self.lock();
        inner.in_flight = inner.in_flight.saturating_sub(1);
        if let Some((opcode, bytes)) = stats {
            count(&mut inner.stats, opcode, bytes, status);
        }
        let cqid = inner.state.sq.get(sqid).map_or(0, |s| usize::from(s.cqid));
        if inner.state.sq.get(sqid).is_some_and(|s| s.size != 0) {
            self.post(&mut inner, cqid, sqid, cid, 0, status);
        }
        self.process_waiting(&mut inner);
    }

    fn io(self: &Arc<Self>, inner: &mut Inner, sqid: usize, c: &Command) -> Outcome {
        if c.nsid == 0 || c.nsid > 1 {
            return done(sc::INVALID_NAMESPACE_OR_FORMAT | sc::DNR);
        }
        match c.opcode {
            opc::FLUSH => match &self.store {
                Store::Ram(_) => done(sc::SUCCESS),
                Store::Block(backend) => {
                    self.submit(inner, backend, BlockOp::Flush, sqid, c.cid, None);
                    None
                }
            },
            opc::READ | opc::WRITE => self.read_write(inner, sqid, c),
            // bhyve completes WRITE ZEROES without writing.
            opc::WRITE_ZEROES => done(sc::SUCCESS),
            opc::DATASET_MANAGEMENT => self.dataset_management(inner, sqid, c),
            _ => done(sc::INVALID_OPCODE),
        }
    }

    /// Byte offset and length of `blocks` blocks at `lba`, if inside the namespace.
    fn range(&self, lba: u64, blocks: u64) -> Option<(u64, u64)> {
        let bits = self.namespace.sector_bits;
        let offset = lba.checked_mul(1 << bits)?;
        let len = blocks.checked_mul(1 << bits)?;
        (offset.checked_add(len)? <= self.namespace.size).then_some((offset, len))
    }

    fn read_write(self: &Arc<Self>, inner: &mut Inner, sqid: usize, c: &Command) -> Outcome {
        let write = c.opcode == opc::WRITE;
        let lba = (u64::from(c.cdw11) << 32) | u64::from(c.cdw10);
        let blocks = u64::from(c.cdw12 & 0xffff) + 1;
        let Some((offset, len)) = self.range(lba, blocks) else {
            count(&mut inner.stats, c.opcode, 0, sc::LBA_OUT_OF_RANGE);
            return done(sc::LBA_OUT_OF_RANGE);
        };
        if len > MAX_DATA_SIZE {
            count(&mut inner.stats, c.opcode, 0, sc::INVALID_FIELD);
            return done(sc::INVALID_FIELD);
        }
        // PRP bits 1:0 are reserved.
        let Some(segments) = self.prp_segments(c.prp1 & !3, c.prp2 & !3, len) else {
            count(&mut inner.stats, c.opcode, 0, sc::DATA_TRANSFER_ERROR);
            return done(sc::DATA_TRANSFER_ERROR);
        };
        match &self.store {
            Store::Ram(data) => {
                let mut data = data.lock().unwrap_or_else(|e| e.into_inner());
                let mut at = offset as usize;
                let mut ok = true;
                for s in &segments {
                    let part = &mut data[at..at + s.len as usize];
                    ok &= if write {
                        self.memory.read(s.addr, part).is_ok()
                    } else {
                        self.memory.write(s.addr, part).is_ok()
                    };
                    at += s.len as usize;
                }
                let status = if ok {
                    sc::SUCCESS
                } else {
                    sc::DATA_TRANSFER_ERROR
                };
                count(&mut inner.stats, c.opcode, len, status);
                done(status)
            }
            Store::Block(backend) => {
                let op = if write {
                    BlockOp::Write { offset, segments }
                } else {
                    BlockOp::Read { offset, segments }
                };
                self.submit(inner, backend, op, sqid, c.cid, Some((c.opcode, len)));
                None
            }
        }
    }

    /// The guest buffers PRP1 and PRP2 name for `len` bytes: PRP2 is the second page, or a
    /// list of pages (its last entry chaining to the next list) when more than two pages
    /// remain. Every piece must lie in guest RAM; contiguous pieces are merged.
    fn prp_segments(&self, prp1: u64, prp2: u64, len: u64) -> Option<Vec<Segment>> {
        let mut segments: Vec<Segment> = Vec::new();
        let mut push = |addr: u64, len: u64| -> Option<()> {
            self.memory.host_address(addr, len).ok()?;
            match segments.last_mut() {
                Some(last) if last.addr + last.len == addr => last.len += len,
                _ => segments.push(Segment { addr, len }),
            }
            Some(())
        };
        let first = (PAGE_SIZE - prp1 % PAGE_SIZE).min(len);
        push(prp1, first)?;
        let mut left = len - first;
        if left == 0 {
            return Some(segments);
        }
        if left <= PAGE_SIZE {
            push(prp2, left)?;
            return Some(segments);
        }
        let mut entry = prp2;
        while left > 0 {
            // The last slot of a list page chains to the next list page.
            let last_slot = (entry % PAGE_SIZE) == PAGE_SIZE - 8;
            let value = self.memory.read_u64(entry).ok()?;
            if last_slot && left > PAGE_SIZE {
                entry = value;
                continue;
            }
            let size = left.min(PAGE_SIZE);
            push(value, size)?;
            left -= size;
            entry += 8;
        }
        Some(segments)
    }

    fn dataset_management(
        self: &Arc<Self>,
        inner: &mut Inner,
        sqid: usize,
        c: &Command,
    ) -> Outcome {
        if !self.offers_dsm() {
            return done(sc::INVALID_OPCODE);
        }
        let count_ranges = (c.cdw10 & 0xff) as usize + 1;
        let mut raw = vec![0u8; count_ranges * 16];
        if !self.prp_copy(c.prp1, c.prp2, &mut raw, false) {
            return done(sc::DATA_TRANSFER_ERROR);
        }
        let mut ranges = Vec::new();
        for r in raw.chunks_exact(16) {
            let blocks = u64::from(u32::from_le_bytes([r[4], r[5], r[6], r[7]]));
            let lba = u64::from_le_bytes([r[8], r[9], r[10], r[11], r[12], r[13], r[14], r[15]]);
            let Some((offset, len)) = self.range(lba, blocks) else {
                return done(sc::LBA_OUT_OF_RANGE);
            };
            if len != 0 {
                ranges.push((offset, len));
            }
        }
        // Only deallocation does anything; it is advisory, so success without it.
        let deallocate = c.cdw11 & 0x4 != 0;
        let backend = match &self.store {
            Store::Block(b) if deallocate && self.namespace.can_delete && !ranges.is_empty() => {
                b.clone()
            }
            _ => return done(sc::SUCCESS),
        };
        inner.in_flight += 1;
        self.delete_ranges(backend, ranges, sqid, c.cid);
        None
    }

    /// Deallocate the ranges one after the other, then complete the command.
    fn delete_ranges(
        self: &Arc<Self>,
        backend: Arc<BlockBackend>,
        mut ranges: Vec<(u64, u64)>,
        sqid: usize,
        cid: u16,
    ) {
        let (offset, len) = ranges.remove(0);
        let this = self.clone();
        let next_backend = backend.clone();
        backend.submit(BlockRequest {
            op: BlockOp::Delete { offset, len },
            done: Box::new(move |result| match result {
                Ok(()) if !ranges.is_empty() => this.delete_ranges(next_backend, ranges, sqid, cid),
                Ok(()) => this.complete(sqid, cid, sc::SUCCESS, None),
                Err(_) => this.complete(sqid, cid, sc::INTERNAL_DEVICE_ERROR, None),
            }),
        });
    }

    fn signal_pending(&self, inner: &Inner) {
        if inner
            .state
            .cq
            .iter()
            .any(|c| c.size != 0 && c.interrupts && c.head != c.tail)
            && !self.msix.enabled()
        {
            self.intx.assert();
        }
    }
}

/// Health log accounting, as bhyve's `pci_nvme_stats_write_read_update`.
fn count(stats: &mut Stats, opcode: u8, bytes: u64, status: u16) {
    let (commands, units, remainder) = match opcode {
        opc::WRITE => (
            &mut stats.write_commands,
            &mut stats.write_units,
            &mut stats.write_remainder,
        ),
        opc::READ => (
            &mut stats.read_commands,
            &mut stats.read_units,
            &mut stats.read_remainder,
        ),
        _ => return,
    };
    *commands += 1;
    if status != sc::SUCCESS {
        return;
    }
    let total = u64::from(*remainder) + bytes / 512;
    *units += total / 1000;
    *remainder = (total % 1000) as u32;
}

/// Identify Controller data, as bhyve's `pci_nvme_init_ctrldata`.
fn controller_data(options: &NvmeOptions, offers_dsm: bool) -> [u8; 4096] {
    let mut d = [0u8; 4096];
    d[0..2].copy_from_slice(&PCI_VENDOR.to_le_bytes());
    d[4..24].copy_from_slice(&options.serial);
    put_padded(&mut d[24..64], "bhyve-NVMe");
    put_padded(&mut d[64..72], "1.0");
    d[72] = 4; // recommended arbitration burst
    d[73..76].copy_from_slice(&[0x58, 0x9c, 0xfc]); // FreeBSD OUI
    d[77] = MDTS;
    d[80..84].copy_from_slice(&VERSION_1_4.to_le_bytes());
    d[111] = 1; // I/O controller
    d[256..258].copy_from_slice(&(1u16 << 1).to_le_bytes()); // OACS: FORMAT NVM
    d[258] = 2; // abort command limit
    d[259] = 4; // asynchronous event request limit
    d[260] = 0x1 | (1 << 1); // one firmware slot, read-only
    d[263] = 1; // power states
    d[266..268].copy_from_slice(&0x0157u16.to_le_bytes()); // warning temperature
    d[268..270].copy_from_slice(&0x0157u16.to_le_bytes()); // critical temperature
    d[512] = (6 << 4) | 6; // SQ entries: 64 bytes
    d[513] = (4 << 4) | 4; // CQ entries: 16 bytes
    d[516..520].copy_from_slice(&1u32.to_le_bytes()); // namespaces
    if offers_dsm {
        d[520] |= 0x4;
    }
    d[524] = 1; // a format applies to all namespaces
    d[2048..2050].copy_from_slice(&10u16.to_le_bytes()); // power state 0: max power
    d
}

/// Identify Namespace data, as bhyve's `pci_nvme_init_nsdata`.
fn namespace_data(ns: &Namespace, eui64: &[u8; 8]) -> [u8; 4096] {
    let mut d = [0u8; 4096];
    let blocks = ns.size >> ns.sector_bits;
    d[0..8].copy_from_slice(&blocks.to_le_bytes());
    d[8..16].copy_from_slice(&blocks.to_le_bytes());
    d[16..24].copy_from_slice(&blocks.to_le_bytes());
    d[120..128].copy_from_slice(eui64);
    d[128..132].copy_from_slice(&(ns.sector_bits << 16).to_le_bytes());
    d
}

/// The PCI function.
pub struct Nvme {
    controller: Arc<Controller>,
}

impl Nvme {
    pub fn controller(&self) -> &Arc<Controller> {
        &self.controller
    }
}

impl PciDevice for Nvme {
    fn bar_read(&mut self, _config: &ConfigSpace, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar == REG_BAR && offset < DOORBELL_BASE {
            self.controller.read_registers(offset, data);
        }
    }

    fn bar_write(&mut self, _config: &ConfigSpace, bar: usize, offset: u64, data: &[u8]) {
        if bar != REG_BAR {
            return;
        }
        let c = &self.controller;
        if offset >= DOORBELL_BASE {
            let index = (offset - DOORBELL_BASE) / 4;
            let last = 2 * u64::from(c.max_queues + 1);
            if data.len() != 4 || offset % 4 != 0 || index >= last {
                log::debug!(
                    "nvme: doorbell write at {offset:#x} size {} ignored",
                    data.len()
                );
                return;
            }
            let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            c.doorbell(index, value);
            return;
        }
        match data.len() {
            4 => c.write_register(
                offset,
                u32::from_le_bytes([data[0], data[1], data[2], data[3]]),
            ),
            // A 64-bit write of ASQ or ACQ as its two halves.
            8 if offset == REG_ASQ || offset == REG_ACQ => {
                let v = u64::from_le_bytes(data.try_into().unwrap_or_default());
                c.write_register(offset, v as u32);
                c.write_register(offset + 4, (v >> 32) as u32);
            }
            n => log::debug!("nvme: {n}-byte register write at {offset:#x} ignored"),
        }
    }

    fn config_restored(&mut self, _config: &ConfigSpace) {
        let inner = self.controller.lock();
        self.controller.signal_pending(&inner);
    }

    fn pause(&mut self) {
        if let Store::Block(b) = &self.controller.store {
            b.pause();
        }
    }

    fn resume(&mut self) {
        if let Store::Block(b) = &self.controller.store {
            b.resume();
        }
    }

    #[cfg(feature = "bhyve_snapshot")]
    fn save_device_state(&self) -> Option<Vec<u8>> {
        let saved = self.controller.save();
        crate::snapshot::encode_section(&saved).ok()
    }

    #[cfg(feature = "bhyve_snapshot")]
    fn restore_device_state(&mut self, state: &[u8]) -> Result<(), String> {
        let saved: state::Saved =
            crate::snapshot::decode_section(state).map_err(|e| e.to_string())?;
        self.controller.restore(saved)
    }
}

#[cfg(test)]
mod tests;
