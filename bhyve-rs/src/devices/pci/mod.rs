//! PCI as bhyve's `pci_emul.c` presents it: a flat hierarchy of root buses, functions with a
//! 256-byte configuration header, BARs placed in bhyve's windows, configuration mechanism #1 on
//! ports 0xCF8/0xCFC and the extended configuration window (ECAM) at 0xE000_0000.
//!
//! The generic layer ([`PciFunction`]) owns what every function shares: the configuration space
//! bytes and their write rules (BARs, command register, capabilities), and the mapping of BARs
//! on the buses. A device model implements [`PciDevice`]: it fills in its header when created,
//! may override configuration accesses, and serves accesses to its BARs.

pub mod dummy;
pub mod hostbridge;
pub mod irq;
pub mod lpc;
pub mod msix;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, Weak};

use crate::bus::{BusDevice, Buses, SharedDevice};
use irq::{IntxLine, PirqRouter, SlotIntx, PIRQ_IRQ};
use msix::MsixTable;

pub const PCI_BUSMAX: u8 = 255;
pub const PCI_SLOTMAX: u8 = 31;
pub const PCI_FUNCMAX: u8 = 7;
/// Size of the configuration space a function keeps (bhyve's `PCI_REGMAX + 1`).
pub const CONFIG_SPACE_SIZE: usize = 256;

pub const PCIR_VENDOR: usize = 0x00;
pub const PCIR_DEVICE: usize = 0x02;
pub const PCIR_COMMAND: usize = 0x04;
pub const PCIR_STATUS: usize = 0x06;
pub const PCIR_REVID: usize = 0x08;
pub const PCIR_PROGIF: usize = 0x09;
pub const PCIR_SUBCLASS: usize = 0x0a;
pub const PCIR_CLASS: usize = 0x0b;
pub const PCIR_HDRTYPE: usize = 0x0e;
pub const PCIR_BAR0: usize = 0x10;
pub const PCIR_SUBVEND_0: usize = 0x2c;
pub const PCIR_SUBDEV_0: usize = 0x2e;
pub const PCIR_BIOS: usize = 0x30;
pub const PCIR_CAP_PTR: usize = 0x34;
pub const PCIR_INTLINE: usize = 0x3c;
pub const PCIR_INTPIN: usize = 0x3d;

pub const PCIM_CMD_PORTEN: u16 = 0x0001;
pub const PCIM_CMD_MEMEN: u16 = 0x0002;
pub const PCIM_CMD_BUSMASTEREN: u16 = 0x0004;
pub const PCIM_CMD_INTXDIS: u16 = 0x0400;
pub const PCIM_STATUS_CAPPRESENT: u16 = 0x0010;
pub const PCIM_HDRTYPE_NORMAL: u8 = 0x00;
pub const PCIM_MFDEV: u8 = 0x80;
pub const PCIM_BIOS_ENABLE: u32 = 0x01;

pub const PCIC_STORAGE: u8 = 0x01;
pub const PCIS_STORAGE_SATA: u8 = 0x06;
pub const PCIS_STORAGE_NVM: u8 = 0x08;
pub const PCIC_BRIDGE: u8 = 0x06;
pub const PCIS_BRIDGE_HOST: u8 = 0x00;
pub const PCIS_BRIDGE_ISA: u8 = 0x01;
pub const PCIC_SIMPLECOMM: u8 = 0x07;
pub const PCIC_CRYPTO: u8 = 0x10;

pub const PCIY_MSI: u8 = 0x05;
pub const PCIY_EXPRESS: u8 = 0x10;
pub const PCIY_MSIX: u8 = 0x11;

/// PCI Express capability device/port types (already shifted into bits 4-7).
pub const PCIEM_TYPE_ENDPOINT: u16 = 0x0000;
pub const PCIEM_TYPE_ROOT_PORT: u16 = 0x0040;
pub const PCIEM_TYPE_ROOT_INT_EP: u16 = 0x0090;

/// Number of BAR registers in a type-0 header; the expansion ROM is tracked as index 6.
pub const PCI_BARMAX: usize = 5;
pub const PCI_ROM_INDEX: usize = 6;

/// Where capabilities start in configuration space.
const CAP_START_OFFSET: usize = 0x40;

/// I/O port window for BARs (amd64).
pub const PCI_EMUL_IOBASE: u64 = 0x2000;
pub const PCI_EMUL_IOLIMIT: u64 = 0x10000;
/// 32-bit MMIO window; OVMF assumes this base.
pub const PCI_EMUL_MEMBASE32: u64 = 0xc000_0000;
/// Extended configuration window: 1 MiB per bus.
pub const PCI_EMUL_ECFG_BASE: u64 = 0xe000_0000;
pub const PCI_EMUL_ECFG_SIZE: u64 = 256 << 20;
pub const PCI_EMUL_MEMLIMIT32: u64 = PCI_EMUL_ECFG_BASE;
/// Size of the 64-bit MMIO window, placed above guest memory on a 32 GiB boundary.
pub const PCI_EMUL_MEMSIZE64: u64 = 32 << 30;
/// Configuration mechanism #1: address port, then four data ports.
pub const CONF1_ADDR_PORT: u64 = 0xcf8;
pub const CONF1_DATA_PORT: u64 = 0xcfc;
const CONF1_ENABLE: u32 = 0x8000_0000;

/// Slop added after each bus's allocations so a guest can move BARs a little.
const BUSIO_ROUNDUP: u64 = 32;
const BUSMEM32_ROUNDUP: u64 = 1 << 20;
const BUSMEM64_ROUNDUP: u64 = 512 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    #[error("no room left for a capability of {0} bytes in configuration space")]
    NoCapabilitySpace(usize),
    #[error("{name}: BAR {index}: no room for {size:#x} bytes in the {window} window")]
    NoBarSpace {
        name: String,
        index: usize,
        size: u64,
        window: &'static str,
    },
    #[error("{name}: BAR {index} cannot be placed at {base:#x}: {reason}")]
    BarMapping {
        name: String,
        index: usize,
        base: u64,
        reason: String,
    },
    #[error("pci slot {0} already occupied!")]
    Occupied(PciAddress),
    #[error("configuration ports: {0}")]
    ConfigPorts(String),
}

/// Bus, slot and function of a PCI function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    pub bus: u8,
    pub slot: u8,
    pub function: u8,
}

impl PciAddress {
    /// None when slot or function is out of range.
    pub fn new(bus: u8, slot: u8, function: u8) -> Option<Self> {
        (slot <= PCI_SLOTMAX && function <= PCI_FUNCMAX).then_some(Self {
            bus,
            slot,
            function,
        })
    }

    /// The configuration node, `pci.B.S.F`.
    pub fn config_node(&self) -> String {
        format!("pci.{}.{}.{}", self.bus, self.slot, self.function)
    }
}

/// `B:S:F`, as bhyve prints slots in its messages.
impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.bus, self.slot, self.function)
    }
}

/// What a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum BarKind {
    #[default]
    None,
    Io,
    Mem32,
    Mem64,
    /// Upper half of the 64-bit BAR in the register before it.
    Mem64High,
    Rom,
}

impl BarKind {
    /// The kind as an error message names it.
    pub fn in_words(self) -> &'static str {
        match self {
            BarKind::None => "unused",
            BarKind::Io => "I/O space",
            BarKind::Mem32 => "32-bit memory",
            BarKind::Mem64 => "64-bit memory",
            BarKind::Mem64High => "the upper half of a 64-bit memory BAR",
            BarKind::Rom => "an expansion ROM",
        }
    }
}

/// One BAR: its kind, guest address and size (a power of two).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Bar {
    pub kind: BarKind,
    pub addr: u64,
    pub size: u64,
    /// The low, read-only bits of the BAR register (space and type flags).
    pub lobits: u32,
}

/// A function's configuration space and BAR table.
#[derive(Clone)]
pub struct ConfigSpace {
    data: [u8; CONFIG_SPACE_SIZE],
    bars: [Bar; PCI_BARMAX + 2],
    /// Offsets of the last capability and of the last byte used by capabilities.
    cap_prev: usize,
    cap_end: usize,
    /// BARs asked for by the device, placed once every device on the bus exists.
    requests: Vec<(usize, BarKind, u64)>,
    enable_bars: bool,
    /// The MSI-X table and the BAR holding it, once the device adds the capability.
    msix: Option<(usize, Arc<MsixTable>)>,
    /// The INTx line, once the device asks for one.
    intx: Option<Arc<IntxLine>>,
}

impl ConfigSpace {
    /// An empty header as bhyve prepares it before a device's init: legacy interrupts off
    /// (line 255, no pin) and, when `enable_bars`, bus mastering on.
    pub fn new(enable_bars: bool) -> Self {
        let mut config = Self {
            data: [0; CONFIG_SPACE_SIZE],
            bars: [Bar::default(); PCI_BARMAX + 2],
            cap_prev: 0,
            cap_end: 0,
            requests: Vec::new(),
            enable_bars,
            msix: None,
            intx: None,
        };
        config.write8(PCIR_INTLINE, 255);
        config.write8(PCIR_INTPIN, 0);
        if enable_bars {
            config.write8(PCIR_COMMAND, PCIM_CMD_BUSMASTEREN as u8);
        }
        config
    }

    pub fn read8(&self, offset: usize) -> u8 {
        self.data.get(offset).copied().unwrap_or(0xff)
    }

    pub fn read16(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.read8(offset), self.read8(offset + 1)])
    }

    pub fn read32(&self, offset: usize) -> u32 {
        u32::from(self.read16(offset)) | (u32::from(self.read16(offset + 2)) << 16)
    }

    pub fn write8(&mut self, offset: usize, value: u8) {
        if let Some(byte) = self.data.get_mut(offset) {
            *byte = value;
        }
    }

    pub fn write16(&mut self, offset: usize, value: u16) {
        for (i, b) in value.to_le_bytes().into_iter().enumerate() {
            self.write8(offset + i, b);
        }
    }

    pub fn write32(&mut self, offset: usize, value: u32) {
        for (i, b) in value.to_le_bytes().into_iter().enumerate() {
            self.write8(offset + i, b);
        }
    }

    /// Read `size` (1, 2 or 4) bytes.
    pub fn read(&self, offset: usize, size: usize) -> u32 {
        match size {
            1 => self.read8(offset).into(),
            2 => self.read16(offset).into(),
            _ => self.read32(offset),
        }
    }

    /// Write the low `size` (1, 2 or 4) bytes of `value`.
    pub fn write(&mut self, offset: usize, size: usize, value: u32) {
        match size {
            1 => self.write8(offset, value as u8),
            2 => self.write16(offset, value as u16),
            _ => self.write32(offset, value),
        }
    }

    /// The whole 256-byte space.
    pub fn bytes(&self) -> &[u8; CONFIG_SPACE_SIZE] {
        &self.data
    }

    /// BAR `index` (0..=5, or [`PCI_ROM_INDEX`]).
    pub fn bar(&self, index: usize) -> Bar {
        self.bars.get(index).copied().unwrap_or_default()
    }

    /// Ask for BAR `index` of `kind` (`Io`, `Mem32` or `Mem64`) and at least `size` bytes. The
    /// size is rounded up to a power of two and to the minimum the PCI specification allows;
    /// the address is assigned when the bus is built, largest BARs first, as bhyve does.
    pub fn request_bar(&mut self, index: usize, kind: BarKind, size: u64) {
        let mut size = size.max(1).checked_next_power_of_two().unwrap_or(1 << 63);
        size = match kind {
            BarKind::Io => size.max(4),
            BarKind::Rom => size.max(2048),
            _ => size.max(16),
        };
        self.requests.push((index, kind, size));
        if self.enable_bars {
            let enable = match kind {
                BarKind::Io => PCIM_CMD_PORTEN,
                BarKind::Mem32 | BarKind::Mem64 => PCIM_CMD_MEMEN,
                _ => 0,
            };
            let command = self.read16(PCIR_COMMAND) | enable;
            self.write16(PCIR_COMMAND, command);
        }
    }

    /// Append a capability (its first byte is the capability ID; the next-pointer byte is
    /// filled in here) and return its offset.
    pub fn add_capability(&mut self, capability: &[u8]) -> Result<usize, PciError> {
        let length = capability.len();
        let padded = length.div_ceil(4) * 4;
        let status = self.read16(PCIR_STATUS);
        let offset = if status & PCIM_STATUS_CAPPRESENT == 0 {
            CAP_START_OFFSET
        } else {
            self.cap_end + 1
        };
        if length == 0 || offset + padded > CONFIG_SPACE_SIZE {
            return Err(PciError::NoCapabilitySpace(length));
        }
        if status & PCIM_STATUS_CAPPRESENT == 0 {
            self.write8(PCIR_CAP_PTR, offset as u8);
            self.write16(PCIR_STATUS, status | PCIM_STATUS_CAPPRESENT);
        } else {
            self.write8(self.cap_prev + 1, offset as u8);
        }
        for (i, &b) in capability.iter().enumerate() {
            self.write8(offset + i, b);
        }
        self.write8(offset + 1, 0);
        self.cap_prev = offset;
        self.cap_end = offset + padded - 1;
        Ok(offset)
    }

    /// Add a PCI Express capability (version 2) of `port_type`; an endpoint on bus 0 becomes a
    /// root-complex integrated endpoint, as in bhyve.
    pub fn add_pcie_capability(&mut self, bus: u8, port_type: u16) -> Result<usize, PciError> {
        let port_type = if port_type == PCIEM_TYPE_ENDPOINT && bus == 0 {
            PCIEM_TYPE_ROOT_INT_EP
        } else {
            port_type
        };
        // struct pciecap: 60 bytes.
        let mut cap = [0u8; 60];
        cap[0] = PCIY_EXPRESS;
        cap[2..4].copy_from_slice(&(0x2 | port_type).to_le_bytes());
        if port_type != PCIEM_TYPE_ROOT_INT_EP {
            // Link capabilities and status: gen1, x1.
            cap[12..16].copy_from_slice(&0x411u32.to_le_bytes());
            cap[18..20].copy_from_slice(&0x11u16.to_le_bytes());
        }
        self.add_capability(&cap)
    }

    fn is_capability(&self, offset: usize) -> bool {
        self.read16(PCIR_STATUS) & PCIM_STATUS_CAPPRESENT != 0
            && (CAP_START_OFFSET..=self.cap_end).contains(&offset)
    }

    /// A write inside the capability list: ID and next pointer are read-only.
    fn capability_write(&mut self, mut offset: usize, mut size: usize, mut value: u32) {
        if offset & (size - 1) != 0 {
            return;
        }
        // Find the capability holding `offset`.
        let mut cap = CAP_START_OFFSET;
        loop {
            let next = self.read8(cap + 1) as usize;
            if next == 0 || (offset >= cap && offset < next) {
                break;
            }
            cap = next;
        }
        if offset == cap || offset == cap + 1 {
            // Some systems write the whole first dword; keep only its upper half.
            if offset == cap && size == 4 {
                size = 2;
                offset += 2;
                value >>= 16;
            } else {
                return;
            }
        }
        match self.read8(cap) {
            PCIY_MSI => self.msi_write(cap, offset, size, value),
            PCIY_MSIX => self.msix_write(cap, offset, size, value),
            // PCI Express registers are stored as written, as in bhyve.
            _ => self.write(offset, size, value),
        }
    }

    fn msi_write(&mut self, cap: usize, offset: usize, size: usize, mut value: u32) {
        if offset - cap == 2 && size == 2 {
            // Message control: only MSI enable and multiple-message enable are writable.
            const MSI_ENABLE: u32 = 0x0001;
            const MME_MASK: u32 = 0x0070;
            let rw = MSI_ENABLE | MME_MASK;
            value = (u32::from(self.read16(offset)) & !rw) | (value & rw);
        }
        self.write(offset, size, value);
    }

    /// Message control of MSI-X: only enable and function mask are writable; the table and
    /// PBA location registers are read-only.
    fn msix_write(&mut self, cap: usize, offset: usize, size: usize, value: u32) {
        let control = cap + 2;
        if offset + size <= control || offset >= control + 2 {
            return;
        }
        let mut bytes = self.read16(control).to_le_bytes();
        for (i, b) in value.to_le_bytes().into_iter().take(size).enumerate() {
            if let Some(slot) = (offset + i)
                .checked_sub(control)
                .and_then(|j| bytes.get_mut(j))
            {
                *slot = b;
            }
        }
        let rw = msix::PCIM_MSIXCTRL_MSIX_ENABLE | msix::PCIM_MSIXCTRL_FUNCTION_MASK;
        let new = (self.read16(control) & !rw) | (u16::from_le_bytes(bytes) & rw);
        self.write16(control, new);
        if let Some((_, table)) = &self.msix {
            table.set_control(new);
        }
    }

    /// Add an MSI-X capability for `table`, with the table at offset 0 of BAR `bar` (a 32-bit
    /// memory BAR sized for table and PBA, requested here) and the PBA on the next 4 KiB
    /// boundary, as bhyve's `pci_emul_add_msixcap`.
    pub fn add_msix_capability(
        &mut self,
        table: Arc<MsixTable>,
        bar: usize,
    ) -> Result<usize, PciError> {
        let vectors = table.vectors() as u16;
        let bir = (bar & 0x7) as u32;
        // struct msixcap: ID, next, control (table size - 1), table offset/BIR, PBA offset/BIR.
        let mut cap = [0u8; 12];
        cap[0] = PCIY_MSIX;
        cap[2..4].copy_from_slice(&(vectors - 1).to_le_bytes());
        cap[4..8].copy_from_slice(&bir.to_le_bytes());
        cap[8..12].copy_from_slice(&(table.table_size() as u32 | bir).to_le_bytes());
        let offset = self.add_capability(&cap)?;
        self.request_bar(bar, BarKind::Mem32, table.region_size());
        self.msix = Some((bar, table));
        Ok(offset)
    }

    /// Ask for a legacy interrupt (bhyve's `pci_lintr_request`). The bus assigns the pin
    /// (INTA#..INTD#) and routes it when it is built; the device keeps the returned line to
    /// assert and deassert it.
    pub fn request_intx(&mut self) -> Arc<IntxLine> {
        self.intx
            .get_or_insert_with(|| Arc::new(IntxLine::default()))
            .clone()
    }

    /// The INTx line, if the device asked for one.
    pub fn intx(&self) -> Option<&Arc<IntxLine>> {
        self.intx.as_ref()
    }

    /// Offset of the first capability with `id`.
    fn find_capability(&self, id: u8) -> Option<usize> {
        if self.read16(PCIR_STATUS) & PCIM_STATUS_CAPPRESENT == 0 {
            return None;
        }
        let mut cap = self.read8(PCIR_CAP_PTR) as usize;
        // A loop in the list ends after as many steps as capabilities fit.
        for _ in 0..48 {
            if cap == 0 {
                return None;
            }
            if self.read8(cap) == id {
                return Some(cap);
            }
            cap = self.read8(cap + 1) as usize;
        }
        None
    }

    /// INTx may be signalled: not disabled in the command register, and neither MSI nor
    /// MSI-X enabled (bhyve's `pci_lintr_permitted`).
    fn intx_permitted(&self) -> bool {
        let msi = self
            .find_capability(PCIY_MSI)
            .is_some_and(|cap| self.read16(cap + 2) & 1 != 0);
        let msix = self
            .find_capability(PCIY_MSIX)
            .is_some_and(|cap| self.read16(cap + 2) & msix::PCIM_MSIXCTRL_MSIX_ENABLE != 0);
        !(msi || msix || self.read16(PCIR_COMMAND) & PCIM_CMD_INTXDIS != 0)
    }

    /// Mask or unmask INTx after a configuration change.
    fn update_intx(&self) {
        if let Some(line) = &self.intx {
            line.set_permitted(self.intx_permitted());
        }
    }

    /// The MSI-X table, if the device has one.
    pub fn msix(&self) -> Option<&Arc<MsixTable>> {
        self.msix.as_ref().map(|(_, t)| t)
    }

    /// The MSI-X table when `offset` in BAR `bar` falls inside its table or PBA.
    fn msix_region(&self, bar: usize, offset: u64) -> Option<&Arc<MsixTable>> {
        match &self.msix {
            Some((b, t)) if *b == bar && offset < t.region_size() => Some(t),
            _ => None,
        }
    }

    /// Add an MSI capability (64-bit addresses) for `messages` vectors, a power of two from 1
    /// to 32, as bhyve's `pci_emul_add_msicap`.
    pub fn add_msi_capability(&mut self, messages: u32) -> Result<usize, PciError> {
        let messages = messages.clamp(1, 32).next_power_of_two();
        let mmc = messages.trailing_zeros() as u16;
        // struct msicap: ID, next, control, address low, address high, data.
        let mut cap = [0u8; 14];
        cap[0] = PCIY_MSI;
        cap[2..4].copy_from_slice(&(0x0080 | (mmc << 1)).to_le_bytes());
        self.add_capability(&cap)
    }

    /// MSI as the guest programmed it, when enabled: (address, data, number of messages).
    pub fn msi(&self) -> Option<(u64, u16, u32)> {
        let mut cap = self.read8(PCIR_CAP_PTR) as usize;
        if self.read16(PCIR_STATUS) & PCIM_STATUS_CAPPRESENT == 0 {
            return None;
        }
        let mut guard = 0;
        while cap != 0 && guard < 48 {
            if self.read8(cap) == PCIY_MSI {
                let control = self.read16(cap + 2);
                if control & 1 == 0 {
                    return None;
                }
                let is64 = control & 0x80 != 0;
                let mut address = u64::from(self.read32(cap + 4));
                let data = if is64 {
                    address |= u64::from(self.read32(cap + 8)) << 32;
                    self.read16(cap + 12)
                } else {
                    self.read16(cap + 8)
                };
                let messages = 1u32 << ((control >> 4) & 0x7);
                return Some((address, data, messages));
            }
            cap = self.read8(cap + 1) as usize;
            guard += 1;
        }
        None
    }
}

/// A PCI device model. Every method has the default behaviour of bhyve's generic layer, so a
/// device only overrides what it emulates.
pub trait PciDevice: Send {
    /// Take over a configuration read of `size` bytes at `offset`; `None` reads the stored
    /// configuration space.
    fn config_read(&mut self, _config: &ConfigSpace, _offset: usize, _size: usize) -> Option<u32> {
        None
    }

    /// Take over a configuration write; return true when handled, false for the generic rules.
    fn config_write(
        &mut self,
        _config: &mut ConfigSpace,
        _offset: usize,
        _size: usize,
        _value: u32,
    ) -> bool {
        false
    }

    /// A read of `data.len()` bytes at `offset` inside BAR `bar`. `config` gives the current
    /// configuration space (MSI programming, command register).
    fn bar_read(&mut self, _config: &ConfigSpace, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    /// A write at `offset` inside BAR `bar`.
    fn bar_write(&mut self, _config: &ConfigSpace, _bar: usize, _offset: u64, _data: &[u8]) {}

    /// BAR `bar` was mapped at (`mapped`) or unmapped from `address`.
    fn bar_address_changed(&mut self, _bar: usize, _mapped: bool, _address: u64) {}

    /// The configuration space was just replaced by a restored one; reload anything the
    /// device mirrors from it.
    fn config_restored(&mut self, _config: &ConfigSpace) {}

    /// A guest configuration write was applied (by the device or the generic rules): a device
    /// that signals from other threads mirrors what it needs (the MSI address and data) here.
    fn config_written(&mut self, _config: &ConfigSpace) {}

    /// Every INTx pin of the machine has been routed (the LPC bridge shows its PIRQ
    /// registers from here on).
    fn intx_routed(&mut self, _config: &mut ConfigSpace) {}

    /// The model's own state for a snapshot, beyond the configuration space and BARs the
    /// generic layer saves: empty when those are all it has. `None` means the device cannot be
    /// saved, and a checkpoint of its VM fails naming it. That is the default, so a model is
    /// never left out of a snapshot by accident.
    fn save_device_state(&self) -> Option<Vec<u8>> {
        None
    }

    /// Load what [`PciDevice::save_device_state`] returned, after the configuration space.
    fn restore_device_state(&mut self, state: &[u8]) -> Result<(), String> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} bytes of device state, expected none",
                state.len()
            ))
        }
    }

    /// Before a snapshot: finish in-flight I/O and stop background work from touching the
    /// device's state or raising interrupts until [`PciDevice::resume`].
    fn pause(&mut self) {}

    /// Undo [`PciDevice::pause`].
    fn resume(&mut self) {}
}

/// One function on a PCI bus: its configuration space, its device model, and where its BARs
/// currently sit on the buses.
pub struct PciFunction {
    address: PciAddress,
    name: String,
    config: ConfigSpace,
    device: Box<dyn PciDevice>,
    /// Base address of each BAR currently on a bus.
    mapped: [Option<u64>; PCI_BARMAX + 2],
    buses: Weak<Buses>,
    this: Weak<Mutex<PciFunction>>,
}

/// Routes a BAR's bus range to its function.
struct BarRegion {
    function: Weak<Mutex<PciFunction>>,
    index: usize,
}

impl BusDevice for BarRegion {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match self.function.upgrade() {
            Some(f) => {
                let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
                let PciFunction { device, config, .. } = &mut *f;
                match config.msix_region(self.index, offset) {
                    Some(table) => table.read(offset, data),
                    None => device.bar_read(config, self.index, offset, data),
                }
            }
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let Some(f) = self.function.upgrade() {
            let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
            let PciFunction { device, config, .. } = &mut *f;
            match config.msix_region(self.index, offset) {
                Some(table) => table.write(offset, data),
                None => device.bar_write(config, self.index, offset, data),
            }
        }
    }
}

fn is_bar_register(offset: usize) -> bool {
    (PCIR_BAR0..PCIR_BAR0 + 4 * (PCI_BARMAX + 1)).contains(&offset)
}

fn is_rom_register(offset: usize) -> bool {
    (PCIR_BIOS..PCIR_BIOS + 4).contains(&offset)
}

/// Header bytes a guest cannot change: IDs, class, header type, subsystem IDs, capability
/// pointer and interrupt pin.
fn is_read_only_byte(offset: usize) -> bool {
    matches!(offset, 0x00..=0x03 | 0x08..=0x0b | 0x0e | 0x2c..=0x2f | 0x34 | 0x3d)
}

impl PciFunction {
    /// The instance name, `<emulation>@pci.B.S.F`.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn address(&self) -> PciAddress {
        self.address
    }

    pub fn config(&self) -> &ConfigSpace {
        &self.config
    }

    /// See [`PciDevice::pause`].
    pub fn pause(&mut self) {
        self.device.pause();
    }

    /// See [`PciDevice::resume`].
    pub fn resume(&mut self) {
        self.device.resume();
    }

    /// The device model.
    pub fn device(&mut self) -> &mut dyn PciDevice {
        self.device.as_mut()
    }

    fn porten(&self) -> bool {
        self.config.read16(PCIR_COMMAND) & PCIM_CMD_PORTEN != 0
    }

    fn memen(&self) -> bool {
        self.config.read16(PCIR_COMMAND) & PCIM_CMD_MEMEN != 0
    }

    fn romen(&self) -> bool {
        self.config.bars[PCI_ROM_INDEX].lobits & PCIM_BIOS_ENABLE != 0
    }

    /// Put BAR `index` on its bus at its current address.
    fn map_bar(&mut self, index: usize) -> Result<(), PciError> {
        let bar = self.config.bars[index];
        let Some(buses) = self.buses.upgrade() else {
            return Ok(());
        };
        let bus = match bar.kind {
            BarKind::Io => &buses.pio,
            BarKind::Mem32 | BarKind::Mem64 => &buses.mmio,
            // The ROM is left to the firmware, as bhyve does.
            _ => return Ok(()),
        };
        if self.mapped[index].is_some() {
            return Ok(());
        }
        let region: SharedDevice = Arc::new(Mutex::new(BarRegion {
            function: self.this.clone(),
            index,
        }));
        bus.insert(bar.addr, bar.size, region)
            .map_err(|e| PciError::BarMapping {
                name: self.name.clone(),
                index,
                base: bar.addr,
                reason: e.to_string(),
            })?;
        self.mapped[index] = Some(bar.addr);
        self.device.bar_address_changed(index, true, bar.addr);
        Ok(())
    }

    fn unmap_bar(&mut self, index: usize) {
        let Some(base) = self.mapped[index].take() else {
            return;
        };
        if let Some(buses) = self.buses.upgrade() {
            let bus = match self.config.bars[index].kind {
                BarKind::Io => &buses.pio,
                _ => &buses.mmio,
            };
            let _ = bus.remove(base);
        }
        self.device.bar_address_changed(index, false, base);
    }

    /// Map a BAR at run time; a guest that programs a clashing address gets a BAR that decodes
    /// nothing, and a warning in the log.
    fn map_bar_or_warn(&mut self, index: usize) {
        if let Err(e) = self.map_bar(index) {
            log::warn!("{e}");
        }
    }

    fn update_bar_address(&mut self, index: usize, addr: u64, kind: BarKind) {
        let decode = if self.config.bars[index].kind == BarKind::Io {
            self.porten()
        } else {
            self.memen()
        };
        if decode {
            self.unmap_bar(index);
        }
        let bar = &mut self.config.bars[index];
        bar.addr = match kind {
            BarKind::Mem64 => (bar.addr & !0xffff_ffff) | addr,
            BarKind::Mem64High => (bar.addr & 0xffff_ffff) | addr,
            _ => addr,
        };
        if decode {
            self.map_bar_or_warn(index);
        }
    }

    /// Map or unmap BARs after the command register changed from `old`.
    fn command_changed(&mut self, old: u16) {
        let new = self.config.read16(PCIR_COMMAND);
        let changed = old ^ new;
        for index in 0..=PCI_ROM_INDEX {
            let enable = match self.config.bars[index].kind {
                BarKind::None | BarKind::Mem64High => continue,
                BarKind::Io => PCIM_CMD_PORTEN,
                BarKind::Rom if !self.romen() => continue,
                BarKind::Rom | BarKind::Mem32 | BarKind::Mem64 => PCIM_CMD_MEMEN,
            };
            if changed & enable != 0 {
                if new & enable != 0 {
                    self.map_bar_or_warn(index);
                } else {
                    self.unmap_bar(index);
                }
            }
        }
    }

    fn bar_write(&mut self, offset: usize, value: u32) {
        let index = if is_bar_register(offset) {
            (offset - PCIR_BAR0) / 4
        } else {
            PCI_ROM_INDEX
        };
        let bar = self.config.bars[index];
        let mask = !(bar.size.wrapping_sub(1));
        let value = u64::from(value);
        let register = match bar.kind {
            BarKind::None => {
                self.config.bars[index].addr = 0;
                0
            }
            BarKind::Io => {
                let addr = value & mask & 0xffff;
                if addr != bar.addr {
                    self.update_bar_address(index, addr, BarKind::Io);
                }
                addr | u64::from(bar.lobits)
            }
            BarKind::Mem32 => {
                let addr = value & mask;
                if addr != bar.addr {
                    self.update_bar_address(index, addr, BarKind::Mem32);
                }
                addr | u64::from(bar.lobits)
            }
            BarKind::Mem64 => {
                let addr = value & mask;
                if addr != bar.addr & 0xffff_ffff {
                    self.update_bar_address(index, addr, BarKind::Mem64);
                }
                addr | u64::from(bar.lobits)
            }
            BarKind::Mem64High => {
                let low = self.config.bars[index - 1];
                let mask = !(low.size.wrapping_sub(1));
                let addr = (value << 32) & mask;
                if addr >> 32 != low.addr >> 32 {
                    self.update_bar_address(index - 1, addr, BarKind::Mem64High);
                }
                addr >> 32
            }
            BarKind::Rom => {
                let addr = value & mask;
                let decoding = self.memen() && self.romen();
                if decoding {
                    self.unmap_bar(index);
                }
                self.config.bars[index].addr = addr;
                self.config.bars[index].lobits = (value as u32) & PCIM_BIOS_ENABLE;
                if self.memen() && self.romen() {
                    self.map_bar_or_warn(index);
                }
                addr | u64::from(self.config.bars[index].lobits)
            }
        };
        self.config.write32(offset, register as u32);
    }

    fn command_status_write(&mut self, offset: usize, size: usize, value: u32) {
        let old_command = self.config.read16(PCIR_COMMAND);
        // Status bits and reserved command bits are read-only (bhyve treats the status
        // write-one-to-clear bits as read-only too, since no device sets them).
        let read_only = 0xffff_f880u32 >> ((offset & 3) * 8);
        let old = self.config.read(offset, size);
        let new = (value & !read_only) | (old & read_only);
        self.config.write(offset, size, new);
        self.command_changed(old_command);
    }

    /// A configuration read of `size` bytes at `offset`, already checked for size and alignment.
    fn config_read(&mut self, offset: usize, size: usize) -> u32 {
        if offset >= CONFIG_SPACE_SIZE {
            // No extended capabilities: an all-zero header at 0x100, all ones beyond.
            return if offset <= CONFIG_SPACE_SIZE + 4 {
                0
            } else {
                0xffff_ffff
            };
        }
        match self.device.config_read(&self.config, offset, size) {
            Some(value) => value,
            None => self.config.read(offset, size),
        }
    }

    /// A configuration write, already checked for size and alignment.
    fn config_write(&mut self, offset: usize, size: usize, value: u32) {
        if offset >= CONFIG_SPACE_SIZE {
            return;
        }
        if !self
            .device
            .config_write(&mut self.config, offset, size, value)
        {
            self.generic_config_write(offset, size, value);
        }
        // The command register and the MSI/MSI-X enables mask INTx.
        self.config.update_intx();
        self.device.config_written(&self.config);
    }

    fn generic_config_write(&mut self, offset: usize, size: usize, value: u32) {
        if is_bar_register(offset) || is_rom_register(offset) {
            // BARs take aligned 32-bit writes only.
            if size == 4 && offset & 3 == 0 {
                self.bar_write(offset, value);
            }
        } else if self.config.is_capability(offset) {
            self.config.capability_write(offset, size, value);
        } else if (PCIR_COMMAND..PCIR_REVID).contains(&offset) {
            self.command_status_write(offset, size, value);
        } else {
            for (i, byte) in value.to_le_bytes().into_iter().take(size).enumerate() {
                if !is_read_only_byte(offset + i) {
                    self.config.write8(offset + i, byte);
                }
            }
        }
    }
}

/// A PCI function in the VM's device list; the PCI layer saves its configuration space, BARs,
/// MSI-X and INTx, the device model the rest ([`PciDevice::save_device_state`]).
impl crate::devices::Stateful for Mutex<PciFunction> {
    fn id(&self) -> crate::devices::StateId {
        crate::devices::StateId {
            section: "pci",
            instance: self.lock().unwrap_or_else(|e| e.into_inner()).name.clone(),
        }
    }

    fn pause(&self) {
        self.lock().unwrap_or_else(|e| e.into_inner()).pause();
    }

    fn resume(&self) {
        self.lock().unwrap_or_else(|e| e.into_inner()).resume();
    }
}

/// Version 2 added the device model's own state.
#[cfg(feature = "bhyve_snapshot")]
impl crate::devices::Persist for Mutex<PciFunction> {
    fn state_version(&self) -> u32 {
        2
    }

    fn check_saveable(&self) -> Result<(), String> {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .check_saveable()
    }

    fn save(&self) -> Result<Vec<u8>, String> {
        let state = self
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .save_state()?;
        crate::snapshot::encode_section(&state).map_err(|e| e.to_string())
    }

    fn restore(&self, section: &crate::snapshot::Section<'_>) -> Result<(), String> {
        let state: PciFunctionState = section.decode().map_err(|e| e.to_string())?;
        // Its errors name the function.
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore_state(&state)
    }
}

/// The generic PCI state of a function: its configuration space and BAR table (bhyve's
/// `pci_snapshot_pci_dev` saves the same, plus MSI fields that live in the capability bytes here).
#[cfg(feature = "bhyve_snapshot")]
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PciFunctionState {
    /// All 256 bytes of configuration space.
    pub config: Vec<u8>,
    /// BARs 0-5 and the expansion ROM.
    pub bars: Vec<Bar>,
    /// The MSI-X table and control bits, for a function with MSI-X.
    #[serde(default)]
    pub msix: Option<msix::MsixState>,
    /// Whether the device holds its INTx line, for a function with one. The pin and its route
    /// are not saved: they follow from the configuration, which a restore shares.
    #[serde(default)]
    pub intx: Option<irq::IntxState>,
    /// The device model's own state ([`PciDevice::save_device_state`]).
    pub device: Vec<u8>,
}

#[cfg(feature = "bhyve_snapshot")]
impl PciFunction {
    /// Fails, naming the function, when its device model cannot be saved.
    pub fn save_state(&self) -> Result<PciFunctionState, String> {
        Ok(PciFunctionState {
            config: self.config.data.to_vec(),
            bars: self.config.bars.to_vec(),
            msix: self.config.msix().map(|t| t.state()),
            intx: self.config.intx().map(|line| line.state()),
            device: self.device_state()?,
        })
    }

    /// Whether a snapshot can hold this function, as an error naming it.
    pub fn check_saveable(&self) -> Result<(), String> {
        self.device_state().map(|_| ())
    }

    fn device_state(&self) -> Result<Vec<u8>, String> {
        self.device
            .save_device_state()
            .ok_or_else(|| format!("{}: this device cannot be saved", self.name))
    }

    /// Load saved state into a function created from the same configuration, and map its BARs
    /// where the saved guest had them. The BAR layout (kinds and sizes) must match.
    pub fn restore_state(&mut self, state: &PciFunctionState) -> Result<(), String> {
        let data: [u8; CONFIG_SPACE_SIZE] = state.config.as_slice().try_into().map_err(|_| {
            format!(
                "{}: configuration space of {} bytes, expected {CONFIG_SPACE_SIZE}",
                self.name,
                state.config.len()
            )
        })?;
        if state.bars.len() != self.config.bars.len() {
            return Err(format!("{}: {} BARs saved", self.name, state.bars.len()));
        }
        for (index, (saved, current)) in state.bars.iter().zip(&self.config.bars).enumerate() {
            if saved.kind != current.kind || saved.size != current.size {
                return Err(format!(
                    "{}: BAR {index} was {} of {:#x} bytes, is {} of {:#x} bytes",
                    self.name,
                    saved.kind.in_words(),
                    saved.size,
                    current.kind.in_words(),
                    current.size
                ));
            }
            if saved.size != 0 && saved.addr % saved.size != 0 {
                return Err(format!(
                    "{}: BAR {index} address {:#x} is not aligned to its size",
                    self.name, saved.addr
                ));
            }
        }
        match (self.config.msix(), &state.msix) {
            (Some(table), Some(saved)) => table
                .set_state(saved)
                .map_err(|e| format!("{}: {e}", self.name))?,
            (None, None) => {}
            _ => return Err(format!("{}: MSI-X presence differs", self.name)),
        }
        for index in 0..=PCI_ROM_INDEX {
            self.unmap_bar(index);
        }
        self.config.data = data;
        for (dst, src) in self.config.bars.iter_mut().zip(&state.bars) {
            *dst = *src;
        }
        self.device.config_restored(&self.config);
        match (self.config.intx(), state.intx) {
            (Some(line), saved) => {
                line.set_permitted(self.config.intx_permitted());
                line.restore(saved.unwrap_or_default());
            }
            (None, None) => {}
            (None, Some(_)) => {
                return Err(format!(
                    "{}: INTx saved for a function without it",
                    self.name
                ))
            }
        }
        self.device
            .restore_device_state(&state.device)
            .map_err(|e| format!("{}: {e}", self.name))?;
        for index in 0..=PCI_BARMAX {
            let decode = match self.config.bars[index].kind {
                BarKind::Io => self.porten(),
                BarKind::Mem32 | BarKind::Mem64 => self.memen(),
                _ => false,
            };
            if decode {
                self.map_bar(index).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }
}

/// Address windows a bus decodes, for firmware tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BusWindows {
    pub io: (u64, u64),
    pub mem32: (u64, u64),
    pub mem64: (u64, u64),
}

/// All PCI functions of the VM and the configuration mechanisms that reach them.
pub struct PciRoot {
    functions: BTreeMap<PciAddress, Arc<Mutex<PciFunction>>>,
    windows: BTreeMap<u8, BusWindows>,
    intx: Vec<SlotIntx>,
}

impl PciRoot {
    /// The function at `address`, if one exists.
    pub fn function(&self, address: PciAddress) -> Option<&Arc<Mutex<PciFunction>>> {
        self.functions.get(&address)
    }

    /// Every function in bus:slot:function order.
    pub fn functions(&self) -> impl Iterator<Item = (PciAddress, &Arc<Mutex<PciFunction>>)> {
        self.functions.iter().map(|(a, f)| (*a, f))
    }

    /// The I/O and memory windows of `bus`, if it has functions.
    pub fn bus_windows(&self, bus: u8) -> Option<BusWindows> {
        self.windows.get(&bus).copied()
    }

    /// Every routed slot pin, in bus, slot and pin order (bhyve's `pci_walk_lintr`).
    pub fn intx_routes(&self) -> &[SlotIntx] {
        &self.intx
    }

    fn is_multifunction(&self, bus: u8, slot: u8) -> bool {
        let first = PciAddress {
            bus,
            slot,
            function: 0,
        };
        let last = PciAddress {
            bus,
            slot,
            function: PCI_FUNCMAX,
        };
        self.functions.range(first..=last).count() > 1
    }

    /// A configuration read as bhyve's `pci_cfgrw`: absent functions and unaligned or odd-sized
    /// accesses read all ones; the multi-function bit of the header type reflects the slot.
    pub fn config_read(&self, address: PciAddress, offset: usize, size: usize) -> u32 {
        let Some(function) = self.functions.get(&address) else {
            return 0xffff_ffff;
        };
        if !matches!(size, 1 | 2 | 4) || offset & (size - 1) != 0 {
            return 0xffff_ffff;
        }
        let mut value = function
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .config_read(offset, size);
        if offset <= PCIR_HDRTYPE && offset + size > PCIR_HDRTYPE {
            let bit = u32::from(PCIM_MFDEV) << ((PCIR_HDRTYPE - offset) * 8);
            value &= !bit;
            if self.is_multifunction(address.bus, address.slot) {
                value |= bit;
            }
        }
        value
    }

    /// A configuration write; ignored for absent functions and bad sizes or alignment.
    pub fn config_write(&self, address: PciAddress, offset: usize, size: usize, value: u32) {
        let Some(function) = self.functions.get(&address) else {
            return;
        };
        if !matches!(size, 1 | 2 | 4) || offset & (size - 1) != 0 {
            return;
        }
        function
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .config_write(offset, size, value);
    }
}

/// Configuration mechanism #1: the address register at 0xCF8 and the data window at
/// 0xCFC-0xCFF. Port 0xCF9 is left to the reset control register, as in bhyve.
pub struct PciConfigIo {
    root: Arc<PciRoot>,
    enabled: bool,
    bus: u8,
    slot: u8,
    function: u8,
    offset: usize,
}

impl PciConfigIo {
    pub fn new(root: Arc<PciRoot>) -> Self {
        Self {
            root,
            enabled: false,
            bus: 0,
            slot: 0,
            function: 0,
            offset: 0,
        }
    }

    fn address_register(&self) -> u32 {
        let mut value = (u32::from(self.bus) << 16)
            | (u32::from(self.slot) << 11)
            | (u32::from(self.function) << 8)
            | self.offset as u32;
        if self.enabled {
            value |= CONF1_ENABLE;
        }
        value
    }

    fn target(&self) -> PciAddress {
        PciAddress {
            bus: self.bus,
            slot: self.slot,
            function: self.function,
        }
    }
}

fn fill_le(data: &mut [u8], value: u32) {
    let bytes = value.to_le_bytes();
    for (i, b) in data.iter_mut().enumerate() {
        *b = bytes.get(i).copied().unwrap_or(0xff);
    }
}

fn from_le(data: &[u8]) -> u32 {
    let mut bytes = [0u8; 4];
    for (i, b) in data.iter().take(4).enumerate() {
        bytes[i] = *b;
    }
    u32::from_le_bytes(bytes)
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let offset = base + offset - CONF1_ADDR_PORT;
        if offset < 4 {
            // The address register answers only whole 32-bit reads.
            if offset == 0 && data.len() == 4 {
                fill_le(data, self.address_register());
            } else {
                data.fill(0xff);
            }
            return;
        }
        let register = self.offset + (offset as usize - 4);
        if self.enabled {
            let value = self.root.config_read(self.target(), register, data.len());
            fill_le(data, value);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let offset = base + offset - CONF1_ADDR_PORT;
        if offset < 4 {
            if offset == 0 && data.len() == 4 {
                let value = from_le(data);
                self.enabled = value & CONF1_ENABLE != 0;
                self.offset = (value & 0xfc) as usize;
                self.function = ((value >> 8) & 0x7) as u8;
                self.slot = ((value >> 11) & 0x1f) as u8;
                self.bus = (value >> 16) as u8;
            }
            return;
        }
        if self.enabled {
            let register = self.offset + (offset as usize - 4);
            self.root
                .config_write(self.target(), register, data.len(), from_le(data));
        }
    }
}

/// The extended (memory-mapped) configuration window: 4 KiB per function.
pub struct PciConfigMmio {
    root: Arc<PciRoot>,
}

impl PciConfigMmio {
    fn decode(offset: u64) -> (PciAddress, usize) {
        let address = PciAddress {
            bus: ((offset >> 20) & 0xff) as u8,
            slot: ((offset >> 15) & 0x1f) as u8,
            function: ((offset >> 12) & 0x7) as u8,
        };
        (address, (offset & 0xfff) as usize)
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let (address, register) = Self::decode(offset);
        data.fill(0xff);
        if data.len() <= 4 {
            let value = self.root.config_read(address, register, data.len());
            fill_le(data, value);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let (address, register) = Self::decode(offset);
        if data.len() <= 4 {
            self.root
                .config_write(address, register, data.len(), from_le(data));
        }
    }
}

/// Bump allocator over one address window.
struct Window {
    next: u64,
    limit: u64,
    name: &'static str,
}

impl Window {
    fn alloc(&mut self, size: u64) -> Option<u64> {
        let base = self.next.checked_next_multiple_of(size)?;
        let end = base.checked_add(size)?;
        (end <= self.limit).then(|| {
            self.next = end;
            base
        })
    }

    /// Leave `slop` bytes after the last allocation and round up to it.
    fn close_bus(&mut self, slop: u64) -> u64 {
        self.next = self
            .next
            .saturating_add(slop)
            .checked_next_multiple_of(slop)
            .unwrap_or(u64::MAX);
        self.next
    }
}

struct Pending {
    name: String,
    config: ConfigSpace,
    device: Box<dyn PciDevice>,
}

/// Collects functions, then places their BARs, routes their interrupts and puts everything on
/// the buses.
pub struct PciRootBuilder {
    pending: BTreeMap<PciAddress, Pending>,
    mem64_base: u64,
    router: Option<Arc<PirqRouter>>,
}

impl PciRootBuilder {
    /// `highmem_end` is the first guest-physical address above guest RAM (4 GiB or more); the
    /// 64-bit BAR window starts at the next 32 GiB boundary, as in bhyve.
    pub fn new(highmem_end: u64) -> Self {
        let mem64_base = highmem_end
            .max(1 << 32)
            .checked_next_multiple_of(PCI_EMUL_MEMSIZE64)
            .unwrap_or(u64::MAX - PCI_EMUL_MEMSIZE64);
        Self {
            pending: BTreeMap::new(),
            mem64_base,
            router: None,
        }
    }

    /// Route INTx through `router`; without one, pins are assigned but never reach the guest.
    pub fn set_intx_router(&mut self, router: Arc<PirqRouter>) {
        self.router = Some(router);
    }

    /// Add the function at `address`, named `<emulation>@pci.B.S.F`.
    pub fn add(
        &mut self,
        address: PciAddress,
        emulation: &str,
        config: ConfigSpace,
        device: Box<dyn PciDevice>,
    ) -> Result<(), PciError> {
        if self.pending.contains_key(&address) {
            return Err(PciError::Occupied(address));
        }
        let name = format!(
            "{emulation}@pci.{}.{}.{}",
            address.bus, address.slot, address.function
        );
        self.pending.insert(
            address,
            Pending {
                name,
                config,
                device,
            },
        );
        Ok(())
    }

    /// Give each function that asked for INTx the least used pin of its slot, in bus, slot and
    /// function order as bhyve initialises them; then route each slot pin in use once, in the
    /// same order, and set the interrupt line registers.
    fn route_intx(
        pending: &mut BTreeMap<PciAddress, Pending>,
        router: Option<&Arc<PirqRouter>>,
    ) -> Vec<SlotIntx> {
        let mut pin_users: BTreeMap<(u8, u8), [u32; 4]> = BTreeMap::new();
        for (address, p) in pending.iter_mut() {
            let Some(line) = p.config.intx() else {
                continue;
            };
            let users = pin_users.entry((address.bus, address.slot)).or_default();
            let best = (0..4).min_by_key(|&i| users[i]).unwrap_or(0);
            users[best] += 1;
            let pin = best as u8 + 1;
            line.set_pin(pin);
            p.config.write8(PCIR_INTPIN, pin);
        }
        let mut routes: BTreeMap<(u8, u8, u8), irq::IntxRoute> = BTreeMap::new();
        if let Some(router) = router {
            for (address, p) in pending.iter_mut() {
                let Some(line) = p.config.intx().cloned() else {
                    continue;
                };
                let pin = line.pin();
                let route = *routes
                    .entry((address.bus, address.slot, pin))
                    .or_insert_with(|| router.route(address.slot, pin));
                line.connect(router.clone(), route);
                let irq = router.pirq(route.pirq_pin.into()).unwrap_or(0) & PIRQ_IRQ;
                p.config.write8(PCIR_INTLINE, irq);
            }
        }
        for p in pending.values_mut() {
            let Pending { config, device, .. } = p;
            device.intx_routed(config);
            config.update_intx();
        }
        routes
            .into_iter()
            .map(|((bus, slot, pin), route)| SlotIntx {
                bus,
                slot,
                pin,
                route,
            })
            .collect()
    }

    /// Place every BAR, map the enabled ones, and register the configuration mechanisms
    /// (ports 0xCF8-0xCFF and the extended window) on `buses`.
    pub fn build(self, buses: &Arc<Buses>) -> Result<Arc<PciRoot>, PciError> {
        let mut io = Window {
            next: PCI_EMUL_IOBASE,
            limit: PCI_EMUL_IOLIMIT,
            name: "I/O",
        };
        let mut mem32 = Window {
            next: PCI_EMUL_MEMBASE32,
            limit: PCI_EMUL_MEMLIMIT32,
            name: "32-bit memory",
        };
        let mut mem64 = Window {
            next: self.mem64_base,
            limit: self.mem64_base.saturating_add(PCI_EMUL_MEMSIZE64),
            name: "64-bit memory",
        };
        let mut pending = self.pending;
        let mut windows = BTreeMap::new();
        let bus_numbers: Vec<u8> = {
            let mut b: Vec<u8> = pending.keys().map(|a| a.bus).collect();
            b.dedup();
            b
        };
        for bus in bus_numbers {
            let start = BusWindows {
                io: (io.next, 0),
                mem32: (mem32.next, 0),
                mem64: (mem64.next, 0),
            };
            // Largest first to limit fragmentation; ties keep slot order (stable sort).
            let mut requests: Vec<(PciAddress, usize, BarKind, u64)> = pending
                .iter_mut()
                .filter(|(a, _)| a.bus == bus)
                .flat_map(|(a, p)| {
                    std::mem::take(&mut p.config.requests)
                        .into_iter()
                        .map(move |(i, k, s)| (*a, i, k, s))
                })
                .collect();
            requests.sort_by_key(|r| std::cmp::Reverse(r.3));
            for (address, index, kind, size) in requests {
                let Some(p) = pending.get_mut(&address) else {
                    continue;
                };
                let (window, lobits) = match kind {
                    BarKind::Io => (&mut io, 0x1),
                    BarKind::Mem32 => (&mut mem32, 0x0),
                    // Small 64-bit BARs go below 4 GiB: some drivers mishandle high ones.
                    BarKind::Mem64 if size <= 128 << 20 => (&mut mem32, 0x4),
                    BarKind::Mem64 => (&mut mem64, 0x4),
                    _ => continue,
                };
                let addr = window.alloc(size).ok_or_else(|| PciError::NoBarSpace {
                    name: p.name.clone(),
                    index,
                    size,
                    window: window.name,
                })?;
                let register = addr | lobits;
                p.config.bars[index] = Bar {
                    kind,
                    addr,
                    size,
                    lobits: lobits as u32,
                };
                p.config.write32(PCIR_BAR0 + 4 * index, register as u32);
                if kind == BarKind::Mem64 && index < PCI_BARMAX {
                    p.config.bars[index + 1] = Bar {
                        kind: BarKind::Mem64High,
                        ..Bar::default()
                    };
                    p.config
                        .write32(PCIR_BAR0 + 4 * (index + 1), (register >> 32) as u32);
                }
            }
            windows.insert(
                bus,
                BusWindows {
                    io: (start.io.0, io.close_bus(BUSIO_ROUNDUP)),
                    mem32: (start.mem32.0, mem32.close_bus(BUSMEM32_ROUNDUP)),
                    mem64: (start.mem64.0, mem64.close_bus(BUSMEM64_ROUNDUP)),
                },
            );
        }

        let intx = Self::route_intx(&mut pending, self.router.as_ref());

        let weak_buses = Arc::downgrade(buses);
        let mut functions = BTreeMap::new();
        for (address, p) in pending {
            let function = Arc::new_cyclic(|this| {
                Mutex::new(PciFunction {
                    address,
                    name: p.name,
                    config: p.config,
                    device: p.device,
                    mapped: [None; PCI_BARMAX + 2],
                    buses: weak_buses.clone(),
                    this: this.clone(),
                })
            });
            {
                let mut f = function.lock().unwrap_or_else(|e| e.into_inner());
                for index in 0..=PCI_BARMAX {
                    let decode = match f.config.bars[index].kind {
                        BarKind::Io => f.porten(),
                        BarKind::Mem32 | BarKind::Mem64 => f.memen(),
                        _ => false,
                    };
                    if decode {
                        f.map_bar(index)?;
                    }
                }
            }
            functions.insert(address, function);
        }
        let root = Arc::new(PciRoot {
            functions,
            windows,
            intx,
        });
        let config_io: SharedDevice = Arc::new(Mutex::new(PciConfigIo::new(root.clone())));
        for (base, len) in [(CONF1_ADDR_PORT, 1), (CONF1_DATA_PORT, 4)] {
            buses
                .pio
                .insert(base, len, config_io.clone())
                .map_err(|e| PciError::ConfigPorts(e.to_string()))?;
        }
        buses
            .mmio
            .insert(
                PCI_EMUL_ECFG_BASE,
                PCI_EMUL_ECFG_SIZE,
                Arc::new(Mutex::new(PciConfigMmio { root: root.clone() })),
            )
            .map_err(|e| PciError::ConfigPorts(e.to_string()))?;
        Ok(root)
    }
}

#[cfg(test)]
mod tests;
