//! e1000 (pci_e82545.c): an Intel 82545EM gigabit card on a [`NetBackend`].
//!
//! As bhyve's: BAR 0 holds the registers (128 KiB), BAR 1 a flash window that reads as zero,
//! BAR 2 eight I/O ports giving indirect access to the registers (IOADDR, IODATA). The MAC
//! address comes from `mac=` or is derived from the VM name and slot; the 64-word EEPROM the
//! driver reads bit by bit through EECD (Microwire) holds it, the PCI IDs and the checksum
//! that makes the words add up to 0xBABA. The PHY answers MDIC reads with a link that is up
//! at 1000 Mb/s full duplex. Interrupts are INTx only, as bhyve's (its note: the FreeBSD
//! driver for this card does not use MSI), throttled by ITR as bhyve throttles them: after the
//! line is raised, new causes wait for the end of the interval.
//!
//! One receive and one transmit ring of 16-byte descriptors. Transmit takes legacy
//! descriptors and the context/data pairs of the extended format, with IP and TCP/UDP
//! checksum insertion, TCP/UDP segmentation (TSO) and VLAN tag insertion. Receive fills legacy
//! descriptors with buffers of the size RCTL selects, several for one frame when needed.
//!
//! A worker thread does both directions with the card's state locked; the vCPU side takes the
//! same lock for register accesses, so pausing for a snapshot is taking that lock: no frame is
//! ever half-way between the backend and the rings.
//!
//! Where bhyve's code has faults a guest could trigger (descriptor types changing inside a
//! frame, a zero TSO segment size, rings outside guest memory), the frame is dropped and the
//! card goes on; guest memory is only ever touched through the bounds-checked accessors.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{generate_mac, parse_mac, BackendSpec, NetBackend, MAX_FRAME_LEN};
use crate::devices::pci::irq::IntxLine;
use crate::devices::pci::{
    BarKind, ConfigSpace, PciAddress, PciDevice, PCIM_HDRTYPE_NORMAL, PCIR_CLASS, PCIR_DEVICE,
    PCIR_HDRTYPE, PCIR_SUBCLASS, PCIR_SUBDEV_0, PCIR_SUBVEND_0, PCIR_VENDOR,
};
use crate::devices::registry::{CreatePci, PciEmulation, PciPlan};
use crate::devices::worker::{Work, Worker};
use crate::devices::DeviceError;
use crate::memory::GuestMemory;

pub const EMULATION: PciEmulation = PciEmulation {
    name: "e1000",
    alias_of: None,
    legacy_config: super::legacy_config,
    plan: Some(plan),
};

pub const VENDOR_INTEL: u16 = 0x8086;
pub const DEVICE_82545EM_COPPER: u16 = 0x100f;
pub const SUBSYSTEM_ID: u16 = 0x1008;
const PCI_CLASS_NETWORK: u8 = 0x02;
const PCI_SUBCLASS_ETHERNET: u8 = 0x00;

pub const REGISTER_BAR: usize = 0;
pub const REGISTER_BAR_SIZE: u64 = 128 * 1024;
pub const FLASH_BAR: usize = 1;
pub const FLASH_BAR_SIZE: u64 = 64 * 1024;
pub const IO_BAR: usize = 2;
pub const IO_BAR_SIZE: u64 = 8;
/// I/O BAR: the register offset, then the register's value.
pub const IOADDR: u64 = 0;
pub const IODATA: u64 = 4;
/// The highest register offset IODATA reaches.
const IO_REGISTER_MAX: u32 = 0x1_ffff;

/// Register offsets (e1000_regs.h).
pub mod reg {
    pub const CTRL: u32 = 0x0000;
    pub const CTRL_DUP: u32 = 0x0004;
    pub const STATUS: u32 = 0x0008;
    pub const EECD: u32 = 0x0010;
    pub const EERD: u32 = 0x0014;
    pub const MDIC: u32 = 0x0020;
    pub const FCAL: u32 = 0x0028;
    pub const FCAH: u32 = 0x002c;
    pub const FCT: u32 = 0x0030;
    pub const VET: u32 = 0x0038;
    pub const ICR: u32 = 0x00c0;
    pub const ITR: u32 = 0x00c4;
    pub const ICS: u32 = 0x00c8;
    pub const IMS: u32 = 0x00d0;
    pub const IMC: u32 = 0x00d8;
    pub const RCTL: u32 = 0x0100;
    pub const FCTTV: u32 = 0x0170;
    pub const TXCW: u32 = 0x0178;
    pub const TCTL: u32 = 0x0400;
    pub const TIPG: u32 = 0x0410;
    pub const AIT: u32 = 0x0458;
    pub const LEDCTL: u32 = 0x0e00;
    pub const PBA: u32 = 0x1000;
    pub const FCRTL: u32 = 0x2160;
    pub const FCRTH: u32 = 0x2168;
    pub const RDBAL: u32 = 0x2800;
    pub const RDBAH: u32 = 0x2804;
    pub const RDLEN: u32 = 0x2808;
    pub const RDH: u32 = 0x2810;
    pub const RDT: u32 = 0x2818;
    pub const RDTR: u32 = 0x2820;
    pub const RXDCTL: u32 = 0x2828;
    pub const RADV: u32 = 0x282c;
    pub const RSRPD: u32 = 0x2c00;
    pub const TDBAL: u32 = 0x3800;
    pub const TDBAH: u32 = 0x3804;
    pub const TDLEN: u32 = 0x3808;
    pub const TDH: u32 = 0x3810;
    pub const TDT: u32 = 0x3818;
    pub const TIDV: u32 = 0x3820;
    pub const TXDCTL: u32 = 0x3828;
    pub const TADV: u32 = 0x382c;
    pub const RXCSUM: u32 = 0x5000;
    pub const MTA: u32 = 0x5200;
    pub const RAL0: u32 = 0x5400;
    pub const RAH15: u32 = 0x547c;
    pub const VFTA: u32 = 0x5600;
    pub const MANC: u32 = 0x5820;
    // Statistics.
    pub const MPC: u32 = 0x4010;
    pub const PRC64: u32 = 0x405c;
    pub const GPRC: u32 = 0x4074;
    pub const BPRC: u32 = 0x4078;
    pub const MPRC: u32 = 0x407c;
    pub const GPTC: u32 = 0x4080;
    pub const GORCL: u32 = 0x4088;
    pub const GORCH: u32 = 0x408c;
    pub const GOTCL: u32 = 0x4090;
    pub const GOTCH: u32 = 0x4094;
    pub const ROC: u32 = 0x40ac;
    pub const TORL: u32 = 0x40c0;
    pub const TORH: u32 = 0x40c4;
    pub const TOTL: u32 = 0x40c8;
    pub const TOTH: u32 = 0x40cc;
    pub const TPR: u32 = 0x40d0;
    pub const TPT: u32 = 0x40d4;
    pub const PTC64: u32 = 0x40d8;
    pub const MPTC: u32 = 0x40f0;
    pub const BPTC: u32 = 0x40f4;
    pub const TSCTC: u32 = 0x40f8;
}

pub const CTRL_RST: u32 = 1 << 26;
pub const CTRL_VME: u32 = 1 << 30;
pub const STATUS_FD: u32 = 0x01;
pub const STATUS_LU: u32 = 0x02;
pub const STATUS_SPEED_1000: u32 = 0x80;

pub const EECD_SK: u32 = 0x01;
pub const EECD_CS: u32 = 0x02;
pub const EECD_DI: u32 = 0x04;
pub const EECD_DO: u32 = 0x08;
pub const EECD_REQ: u32 = 0x40;
pub const EECD_GNT: u32 = 0x80;
pub const EECD_PRES: u32 = 0x100;
/// Flash writes enabled.
const EECD_FWE_EN: u32 = 0x20;

pub const MDIC_REG_SHIFT: u32 = 16;
pub const MDIC_PHY_SHIFT: u32 = 21;
pub const MDIC_OP_WRITE: u32 = 0x0400_0000;
pub const MDIC_OP_READ: u32 = 0x0800_0000;
pub const MDIC_READY: u32 = 0x1000_0000;
const MDIC_OP_MASK: u32 = 0x0c00_0000;
const MDIC_ERROR: u32 = 0x4000_0000;
const MDIC_DEST: u32 = 0x8000_0000;

pub const PHY_STATUS: u32 = 1;
pub const PHY_ID1: u32 = 2;
pub const PHY_ID2: u32 = 3;
const PHY_AUTONEG_ADV: u32 = 4;
const PHY_LP_ABILITY: u32 = 5;
const PHY_1000T_STATUS: u32 = 10;
/// The Marvell 88E1011 PHY, revision 4.
const M88E1011_PHY_ID: u32 = 0x0141_0c20;
const PHY_REVISION: u32 = 4;

pub const ICR_TXDW: u32 = 0x01;
pub const ICR_TXQE: u32 = 0x02;
pub const ICR_RXDMT0: u32 = 0x10;
pub const ICR_RXT0: u32 = 0x80;
pub const ICR_SRPD: u32 = 0x1_0000;

pub const RCTL_EN: u32 = 0x02;
pub const RCTL_LPE: u32 = 0x20;
const RCTL_LBM_TCVR: u32 = 0xc0;
pub const RCTL_VFE: u32 = 0x4_0000;
pub const RCTL_BSEX: u32 = 0x0200_0000;
pub const RCTL_SECRC: u32 = 0x0400_0000;
pub const RCTL_SZ_MASK: u32 = 0x3_0000;
pub const TCTL_EN: u32 = 0x02;
pub const RAH_AV: u32 = 0x8000_0000;

/// Transmit descriptor command bits (in the dword at offset 8).
pub const TXD_CMD_EOP: u32 = 0x0100_0000;
pub const TXD_CMD_IFCS: u32 = 0x0200_0000;
pub const TXD_CMD_IC: u32 = 0x0400_0000;
pub const TXD_CMD_RS: u32 = 0x0800_0000;
pub const TXD_CMD_DEXT: u32 = 0x2000_0000;
pub const TXD_CMD_VLE: u32 = 0x4000_0000;
/// In a data descriptor: segment this frame. In a context descriptor: TCP (else UDP), IPv4
/// (else IPv6).
pub const TXD_CMD_TSE: u32 = 0x0400_0000;
pub const TXD_CMD_TCP: u32 = 0x0100_0000;
pub const TXD_CMD_IP: u32 = 0x0200_0000;
pub const TXD_DTYP_D: u32 = 0x0010_0000;
const TXD_TYPE_MASK: u32 = TXD_CMD_DEXT | 0x00f0_0000;
const TXD_TYPE_CONTEXT: u32 = TXD_CMD_DEXT;
const TXD_TYPE_DATA: u32 = TXD_CMD_DEXT | TXD_DTYP_D;
pub const TXD_STAT_DD: u32 = 0x01;
pub const TXD_POPTS_IXSM: u8 = 0x01;
pub const TXD_POPTS_TXSM: u8 = 0x02;

pub const RXD_STAT_DD: u8 = 0x01;
pub const RXD_STAT_EOP: u8 = 0x02;
pub const RXD_STAT_IXSM: u8 = 0x04;
pub const RXD_STAT_PIF: u8 = 0x80;

/// EEPROM words.
pub const EEPROM_WORDS: usize = 64;
pub const NVM_SUB_DEV_ID: usize = 0x0b;
pub const NVM_SUB_VEN_ID: usize = 0x0c;
pub const NVM_DEV_ID: usize = 0x0d;
pub const NVM_VEN_ID: usize = 0x0e;
pub const NVM_CHECKSUM: usize = 0x3f;
/// What the EEPROM words, checksum included, add up to.
pub const NVM_SUM: u16 = 0xbaba;
/// Microwire: 3 opcode bits, 6 address bits, 16 data bits.
const NVM_OPCODE_BITS: u8 = 3;
const NVM_ADDR_BITS: u8 = 6;
const NVM_DATA_BITS: u8 = 16;
const NVM_OPADDR_BITS: u8 = NVM_OPCODE_BITS + NVM_ADDR_BITS;
const NVM_ADDR_MASK: u16 = (1 << NVM_ADDR_BITS) - 1;
const NVM_OPCODE_MASK: u16 = ((1 << NVM_OPCODE_BITS) - 1) << NVM_ADDR_BITS;
pub const NVM_OPCODE_READ: u16 = 0x6 << NVM_ADDR_BITS;
const NVM_OPCODE_WRITE: u16 = 0x5 << NVM_ADDR_BITS;

/// Descriptor size, both rings.
pub const DESCRIPTOR_SIZE: u64 = 16;
/// Buffers one transmitted frame may span (bhyve's arbitrary limit).
pub const MAX_TX_SEGMENTS: usize = 64;
/// The longest TSO header (82576 datasheet 7.2.4.5, which bhyve applies).
pub const MAX_TSO_HEADER: usize = 240;
const ETHER_ADDR_LEN: usize = 6;
const ETHER_VLAN_ENCAP_LEN: usize = 4;
/// The shortest frame without its CRC.
const ETHER_MIN_NOCRC: usize = 60;
const ETHER_CRC_LEN: usize = 4;
const TH_FIN: u8 = 0x01;
const TH_PUSH: u8 = 0x08;
/// State format of [`PciDevice::save_device_state`].
#[cfg(feature = "bhyve_snapshot")]
const STATE_VERSION: u32 = 1;

fn plan(plan: &mut PciPlan<'_>, slot: PciAddress) -> Result<CreatePci, DeviceError> {
    let config = plan.config;
    let node = slot.config_node();
    let mac_key = format!("{node}.mac");
    let mac = match config.get(&mac_key) {
        Some(value) => parse_mac(value).ok_or_else(|| DeviceError::InvalidValue {
            key: mac_key.clone(),
            value: value.to_string(),
        })?,
        None => generate_mac(
            config.get("name").unwrap_or_default(),
            slot.slot,
            slot.function,
        ),
    };
    let backend = BackendSpec::from_config(config, &node)
        .map_err(|e| DeviceError::Platform(format!("pci slot {slot}: {e}")))?;
    Ok(Box::new(move |create| {
        let backend = match &backend {
            Some(spec) => Some(
                spec.open()
                    .map_err(|e| DeviceError::Platform(format!("pci slot {slot}: {e}")))?,
            ),
            None => None,
        };
        let config = create.config_space;
        config.write16(PCIR_DEVICE, DEVICE_82545EM_COPPER);
        config.write16(PCIR_VENDOR, VENDOR_INTEL);
        config.write8(PCIR_CLASS, PCI_CLASS_NETWORK);
        config.write8(PCIR_SUBCLASS, PCI_SUBCLASS_ETHERNET);
        config.write16(PCIR_SUBDEV_0, SUBSYSTEM_ID);
        config.write16(PCIR_SUBVEND_0, VENDOR_INTEL);
        config.write8(PCIR_HDRTYPE, PCIM_HDRTYPE_NORMAL);
        let intx = config.request_intx();
        config.request_bar(REGISTER_BAR, BarKind::Mem32, REGISTER_BAR_SIZE);
        config.request_bar(FLASH_BAR, BarKind::Mem32, FLASH_BAR_SIZE);
        config.request_bar(IO_BAR, BarKind::Io, IO_BAR_SIZE);
        let name = format!("e82545-{}:{} tx", slot.slot, slot.function);
        let card = E1000::new(mac, backend, create.memory.clone(), intx, &name)
            .map_err(|e| DeviceError::Platform(format!("pci slot {slot}: {e}")))?;
        Ok(Box::new(card) as Box<dyn PciDevice>)
    }))
}

/// One receive-address register pair (RAL/RAH).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReceiveAddress {
    pub valid: bool,
    pub select: u8,
    pub mac: [u8; 6],
}

/// The transmit context a context descriptor sets (`struct e1000_context_desc`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TxContext {
    pub ip_config: u32,
    pub tcp_config: u32,
    pub cmd_and_length: u32,
    pub tcp_seg_setup: u32,
}

impl TxContext {
    fn from_descriptor(d: &[u8; 16]) -> Self {
        let word = |i: usize| u32::from_le_bytes([d[i], d[i + 1], d[i + 2], d[i + 3]]);
        TxContext {
            ip_config: word(0),
            tcp_config: word(4),
            cmd_and_length: word(8),
            tcp_seg_setup: word(12),
        }
    }
    fn header_len(&self) -> usize {
        ((self.tcp_seg_setup >> 8) & 0xff) as usize
    }
    fn mss(&self) -> usize {
        (self.tcp_seg_setup >> 16) as usize
    }
    fn ip_checksum(&self) -> Checksum {
        Checksum::from_config(self.ip_config)
    }
    fn l4_checksum(&self) -> Checksum {
        Checksum::from_config(self.tcp_config)
    }
}

/// Where one checksum goes (`struct ck_info`): summed from `start` to `end` inclusive (0: to
/// the end of the frame), stored at `offset`.
#[derive(Debug, Clone, Copy, Default)]
struct Checksum {
    valid: bool,
    start: usize,
    offset: usize,
    end: usize,
}

impl Checksum {
    /// From a context descriptor's start, offset, end bytes.
    fn from_config(config: u32) -> Self {
        Checksum {
            valid: false,
            start: (config & 0xff) as usize,
            offset: ((config >> 8) & 0xff) as usize,
            end: (config >> 16) as usize,
        }
    }

    fn shift(&mut self, by: usize) {
        self.start += by;
        self.offset += by;
        if self.end != 0 {
            self.end += by;
        }
    }

    /// Store the complemented sum in `frame`; a checksum outside the frame is left out.
    fn insert(&self, frame: &mut [u8]) {
        if self.offset + 2 > frame.len() {
            return;
        }
        let stop = if self.end == 0 {
            frame.len()
        } else {
            (self.end + 1).min(frame.len())
        };
        let sum = internet_sum(frame.get(self.start..stop).unwrap_or(&[]));
        frame[self.offset..self.offset + 2].copy_from_slice(&(!sum).to_be_bytes());
    }
}

/// The ones'-complement sum of `data` as big-endian 16-bit words, folded (RFC 1071).
pub fn internet_sum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for pair in &mut chunks {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    fold(sum)
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The card's registers and internal state: what a snapshot saves.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Registers {
    pub mac: [u8; 6],
    pub ctrl: u32,
    pub fcal: u32,
    pub fcah: u32,
    pub fct: u32,
    pub vet: u32,
    pub fcttv: u32,
    pub ledctl: u32,
    pub pba: u32,
    pub irq_asserted: bool,
    pub icr: u32,
    pub itr: u32,
    pub ics: u32,
    pub ims: u32,
    pub imc: u32,
    pub tx_context: TxContext,
    pub tx_enabled: bool,
    pub txcw: u32,
    pub tctl: u32,
    pub tipg: u32,
    pub ait: u32,
    pub tdbal: u32,
    pub tdbah: u32,
    pub tdlen: u32,
    pub tdh: u16,
    pub tdt: u16,
    pub tidv: u32,
    pub txdctl: u32,
    pub tadv: u32,
    pub receive_addresses: [ReceiveAddress; 16],
    pub multicast: Vec<u32>,
    pub vlan_filter: Vec<u32>,
    pub rx_enabled: bool,
    pub rx_loopback: bool,
    pub rctl: u32,
    pub fcrtl: u32,
    pub fcrth: u32,
    pub rdbal: u32,
    pub rdbah: u32,
    pub rdlen: u32,
    pub rdh: u16,
    pub rdt: u16,
    pub rdtr: u32,
    pub rxdctl: u32,
    pub radv: u32,
    pub rsrpd: u32,
    pub rxcsum: u32,
    pub io_addr: u32,
    pub mdi_control: u32,
    pub eeprom_control: u32,
    pub nvm_data: u16,
    pub nvm_opaddr: u16,
    pub nvm_bits: u8,
    pub nvm_mode: NvmMode,
    pub eeprom: Vec<u16>,
    pub stats: Statistics,
}

/// What the Microwire state machine is shifting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum NvmMode {
    OpcodeAndAddress,
    DataIn,
    DataOut,
}

/// The statistics counters the card keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Statistics {
    pub missed_packets: u32,
    pub rx_by_size: [u32; 6],
    pub tx_by_size: [u32; 6],
    pub good_rx: u32,
    pub broadcast_rx: u32,
    pub multicast_rx: u32,
    pub good_tx: u32,
    pub broadcast_tx: u32,
    pub multicast_tx: u32,
    pub oversize_rx: u32,
    pub tso_tx: u32,
    pub good_octets_rx: u64,
    pub good_octets_tx: u64,
    pub missed_octets: u64,
}

/// The size bucket of PRC64..PRC1522 / PTC64..PTC1522: up to 64, 127, 255, 511, 1023, more.
fn size_bucket(size: usize) -> usize {
    match size {
        0..=64 => 0,
        65..=127 => 1,
        128..=255 => 2,
        256..=511 => 3,
        512..=1023 => 4,
        _ => 5,
    }
}

impl Registers {
    fn new(mac: [u8; 6]) -> Self {
        let mut registers = Registers {
            mac,
            ctrl: 0,
            fcal: 0,
            fcah: 0,
            fct: 0,
            vet: 0,
            fcttv: 0,
            ledctl: 0,
            pba: 0,
            irq_asserted: false,
            icr: 0,
            itr: 0,
            ics: 0,
            ims: 0,
            imc: 0,
            tx_context: TxContext::default(),
            tx_enabled: false,
            txcw: 0,
            tctl: 0,
            tipg: 0,
            ait: 0,
            tdbal: 0,
            tdbah: 0,
            tdlen: 0,
            tdh: 0,
            tdt: 0,
            tidv: 0,
            txdctl: 0,
            tadv: 0,
            receive_addresses: [ReceiveAddress::default(); 16],
            multicast: vec![0; 128],
            vlan_filter: vec![0; 128],
            rx_enabled: false,
            rx_loopback: false,
            rctl: 0,
            fcrtl: 0,
            fcrth: 0,
            rdbal: 0,
            rdbah: 0,
            rdlen: 0,
            rdh: 0,
            rdt: 0,
            rdtr: 0,
            rxdctl: 0,
            radv: 0,
            rsrpd: 0,
            rxcsum: 0,
            io_addr: 0,
            mdi_control: 0,
            eeprom_control: 0,
            nvm_data: 0,
            nvm_opaddr: 0,
            nvm_bits: 0,
            nvm_mode: NvmMode::OpcodeAndAddress,
            eeprom: vec![0; EEPROM_WORDS],
            stats: Statistics::default(),
        };
        registers.reset(false);
        registers
    }

    /// The EEPROM contents bhyve builds: MAC address, PCI IDs, checksum.
    fn init_eeprom(&mut self) {
        let m = self.mac;
        self.eeprom[0] = u16::from_le_bytes([m[0], m[1]]);
        self.eeprom[1] = u16::from_le_bytes([m[2], m[3]]);
        self.eeprom[2] = u16::from_le_bytes([m[4], m[5]]);
        self.eeprom[NVM_SUB_DEV_ID] = SUBSYSTEM_ID;
        self.eeprom[NVM_SUB_VEN_ID] = VENDOR_INTEL;
        self.eeprom[NVM_DEV_ID] = DEVICE_82545EM_COPPER;
        self.eeprom[NVM_VEN_ID] = VENDOR_INTEL;
        let sum = self.eeprom[..NVM_CHECKSUM]
            .iter()
            .fold(0u16, |a, &w| a.wrapping_add(w));
        self.eeprom[NVM_CHECKSUM] = NVM_SUM.wrapping_sub(sum);
    }

    /// Power-on (`by_driver` false) or software reset (`e82545_reset`). The interrupt line is
    /// the caller's business.
    fn reset(&mut self, by_driver: bool) {
        self.rx_enabled = false;
        self.tx_enabled = false;
        self.irq_asserted = false;
        if !by_driver {
            self.fcal = 0;
            self.fcah = 0;
            self.fct = 0;
            self.vet = 0;
            self.fcttv = 0;
        }
        self.ledctl = 0x0706_1302;
        self.pba = 0x0010_0030;
        self.nvm_opaddr = 0;
        self.nvm_mode = NvmMode::OpcodeAndAddress;
        self.nvm_bits = NVM_OPADDR_BITS;
        self.eeprom_control = EECD_PRES | EECD_FWE_EN;
        self.init_eeprom();
        self.icr = 0;
        self.itr = 250;
        self.ics = 0;
        self.ims = 0;
        self.imc = 0;
        if !by_driver {
            self.vlan_filter.fill(0);
            self.multicast.fill(0);
            self.receive_addresses = [ReceiveAddress::default(); 16];
            self.receive_addresses[0] = ReceiveAddress {
                valid: true,
                select: 0,
                mac: self.mac,
            };
        } else {
            for address in &mut self.receive_addresses {
                address.valid = false;
            }
        }
        if !by_driver {
            self.rdbal = 0;
            self.rdbah = 0;
        }
        self.rctl = 0;
        self.rx_loopback = false;
        self.fcrtl = 0;
        self.fcrth = 0;
        self.rdlen = 0;
        self.rdh = 0;
        self.rdt = 0;
        self.rdtr = 0;
        self.rxdctl = (1 << 24) | (1 << 16);
        self.radv = 0;
        self.rxcsum = 0;
        if !by_driver {
            self.tdbal = 0;
            self.tdbah = 0;
            self.tipg = 0;
            self.ait = 0;
            self.tidv = 0;
            self.tadv = 0;
        }
        self.txcw = 0;
        self.tctl = 0;
        self.tdlen = 0;
        self.tdt = 0;
        self.tdh = 0;
        self.txdctl = 0;
    }

    fn rx_ring(&self) -> (u64, u16) {
        (
            u64::from(self.rdbah) << 32 | u64::from(self.rdbal),
            (self.rdlen / DESCRIPTOR_SIZE as u32) as u16,
        )
    }

    fn tx_ring(&self) -> (u64, u16) {
        (
            u64::from(self.tdbah) << 32 | u64::from(self.tdbal),
            (self.tdlen / DESCRIPTOR_SIZE as u32) as u16,
        )
    }

    /// Receive buffer size from RCTL (`e82545_bufsz`).
    fn rx_buffer_size(&self) -> usize {
        match (self.rctl & RCTL_BSEX != 0, (self.rctl & RCTL_SZ_MASK) >> 16) {
            (false, 0) => 2048,
            (false, 1) => 1024,
            (false, 2) => 512,
            (true, 1) => 16384,
            (true, 2) => 8192,
            (true, 3) => 4096,
            // 256, and the forbidden BSEX with size 0.
            _ => 256,
        }
    }

    fn read_phy(register: u32) -> u32 {
        match register {
            PHY_STATUS => 0x0004 | 0x0008 | 0x0020, // link, autoneg able, autoneg complete
            PHY_AUTONEG_ADV => 0x0001,              // selector: IEEE 802.3
            PHY_LP_ABILITY => 0,
            PHY_1000T_STATUS => 0x0800 | 0x1000 | 0x2000, // partner FD, remote and local RX ok
            PHY_ID1 => (M88E1011_PHY_ID >> 16) & 0xffff,
            PHY_ID2 => (M88E1011_PHY_ID | PHY_REVISION) & 0xffff,
            _ => 0,
        }
    }

    /// One rising clock edge with the EEPROM selected (`e82545_eecd_strobe`).
    fn eeprom_strobe(&mut self) {
        if self.nvm_bits == 0 {
            return;
        }
        self.nvm_bits -= 1;
        let back_to_opcode = |r: &mut Registers| {
            r.nvm_opaddr = 0;
            r.nvm_mode = NvmMode::OpcodeAndAddress;
            r.nvm_bits = NVM_OPADDR_BITS;
        };
        let bit_in = u16::from(self.eeprom_control & EECD_DI != 0);
        match self.nvm_mode {
            NvmMode::DataOut => {
                if self.nvm_data & 0x8000 != 0 {
                    self.eeprom_control |= EECD_DO;
                } else {
                    self.eeprom_control &= !EECD_DO;
                }
                self.nvm_data <<= 1;
                if self.nvm_bits == 0 {
                    back_to_opcode(self);
                }
            }
            NvmMode::DataIn => {
                self.nvm_data = self.nvm_data << 1 | bit_in;
                if self.nvm_bits == 0 {
                    let address = usize::from(self.nvm_opaddr & NVM_ADDR_MASK);
                    if self.nvm_opaddr & NVM_OPCODE_MASK == NVM_OPCODE_WRITE {
                        if let Some(word) = self.eeprom.get_mut(address) {
                            *word = self.nvm_data;
                        }
                    }
                    back_to_opcode(self);
                }
            }
            NvmMode::OpcodeAndAddress => {
                self.nvm_opaddr = self.nvm_opaddr << 1 | bit_in;
                if self.nvm_bits == 0 {
                    match self.nvm_opaddr & NVM_OPCODE_MASK {
                        NVM_OPCODE_READ => {
                            let address = usize::from(self.nvm_opaddr & NVM_ADDR_MASK);
                            self.nvm_mode = NvmMode::DataOut;
                            self.nvm_bits = NVM_DATA_BITS;
                            self.nvm_data = self.eeprom.get(address).copied().unwrap_or(0);
                        }
                        NVM_OPCODE_WRITE => {
                            self.nvm_mode = NvmMode::DataIn;
                            self.nvm_bits = NVM_DATA_BITS;
                            self.nvm_data = 0;
                        }
                        // Write enable (writes need no enabling here), and anything
                        // unknown: back to the start.
                        _ => back_to_opcode(self),
                    }
                }
            }
        }
    }

    fn read_receive_address(&self, index: usize) -> u32 {
        let Some(entry) = self.receive_addresses.get(index / 2) else {
            return 0;
        };
        let m = entry.mac;
        if index % 2 == 1 {
            u32::from(entry.valid) << 31
                | u32::from(entry.select) << 16
                | u32::from(m[5]) << 8
                | u32::from(m[4])
        } else {
            u32::from_le_bytes([m[0], m[1], m[2], m[3]])
        }
    }

    fn write_receive_address(&mut self, index: usize, value: u32) {
        let Some(entry) = self.receive_addresses.get_mut(index / 2) else {
            return;
        };
        if index % 2 == 1 {
            entry.valid = value & RAH_AV != 0;
            entry.select = ((value >> 16) & 3) as u8;
            entry.mac[4] = value as u8;
            entry.mac[5] = (value >> 8) as u8;
        } else {
            entry.mac[..4].copy_from_slice(&value.to_le_bytes());
        }
    }

    /// A register read without side effects other than ICR's clear-on-read (done by the
    /// caller); unknown registers read as zero.
    fn read(&self, offset: u32) -> u32 {
        use reg::*;
        let s = &self.stats;
        match offset {
            CTRL => self.ctrl,
            STATUS => STATUS_FD | STATUS_LU | STATUS_SPEED_1000,
            FCAL => self.fcal,
            FCAH => self.fcah,
            FCT => self.fct,
            VET => self.vet,
            FCTTV => self.fcttv,
            LEDCTL => self.ledctl,
            PBA => self.pba,
            ICR => self.icr,
            ITR => self.itr,
            IMS => self.ims,
            RCTL => self.rctl,
            FCRTL => self.fcrtl,
            FCRTH => self.fcrth,
            RDBAL => self.rdbal,
            RDBAH => self.rdbah,
            RDLEN => self.rdlen,
            RDH => u32::from(self.rdh),
            RDT => u32::from(self.rdt),
            RDTR => self.rdtr,
            RXDCTL => self.rxdctl,
            RADV => self.radv,
            RSRPD => self.rsrpd,
            RXCSUM => self.rxcsum,
            TXCW => self.txcw,
            TCTL => self.tctl,
            TIPG => self.tipg,
            AIT => self.ait,
            TDBAL => self.tdbal,
            TDBAH => self.tdbah,
            TDLEN => self.tdlen,
            TDH => u32::from(self.tdh),
            TDT => u32::from(self.tdt),
            TIDV => self.tidv,
            TXDCTL => self.txdctl,
            TADV => self.tadv,
            RAL0..=RAH15 => self.read_receive_address(((offset - RAL0) >> 2) as usize),
            MTA..=0x53fc => self.multicast[((offset - MTA) >> 2) as usize],
            VFTA..=0x57fc => self.vlan_filter[((offset - VFTA) >> 2) as usize],
            EECD => self.eeprom_control,
            MDIC => self.mdi_control,
            MPC => s.missed_packets,
            PRC64..=0x4070 => s.rx_by_size[((offset - PRC64) >> 2) as usize],
            GPRC => s.good_rx,
            BPRC => s.broadcast_rx,
            MPRC => s.multicast_rx,
            GPTC | TPT => s.good_tx,
            GORCL => s.good_octets_rx as u32,
            GORCH => (s.good_octets_rx >> 32) as u32,
            TOTL | GOTCL => s.good_octets_tx as u32,
            TOTH | GOTCH => (s.good_octets_tx >> 32) as u32,
            ROC => s.oversize_rx,
            TORL => (s.good_octets_rx + s.missed_octets) as u32,
            TORH => ((s.good_octets_rx + s.missed_octets) >> 32) as u32,
            TPR => s
                .good_rx
                .wrapping_add(s.missed_packets)
                .wrapping_add(s.oversize_rx),
            PTC64..=0x40ec => s.tx_by_size[((offset - PTC64) >> 2) as usize],
            MPTC => s.multicast_tx,
            BPTC => s.broadcast_tx,
            TSCTC => s.tso_tx,
            // ICS and IMC are write-only; EERD, MANC and the error counters read as zero.
            _ => 0,
        }
    }
}

/// What the worker and the register accesses share.
struct Engine {
    regs: Registers,
    memory: Arc<GuestMemory>,
    backend: Option<Box<dyn NetBackend>>,
    intx: Arc<IntxLine>,
    /// One frame on its way, either direction.
    buffer: Vec<u8>,
    /// Transmit work was asked for (TDT written) and not done yet.
    tx_pending: bool,
    /// Interrupt throttling (ITR): until then, new causes do not raise the line.
    throttle_until: Option<Instant>,
    /// The throttle was armed by a register access: the worker must look at its timeout.
    throttle_armed: bool,
}

/// One transmit descriptor as read from the ring.
struct TxDescriptor {
    address: u64,
    lower: u32,
    upper: u32,
    raw: [u8; 16],
}

impl TxDescriptor {
    fn kind(&self) -> u32 {
        if self.lower & TXD_CMD_DEXT != 0 {
            self.lower & TXD_TYPE_MASK
        } else {
            0
        }
    }
    fn length(&self) -> usize {
        if self.kind() == 0 {
            (self.lower & 0xffff) as usize
        } else {
            (self.lower & 0xf_ffff) as usize
        }
    }
}

impl Engine {
    fn set_irq(&mut self, high: bool) {
        if high {
            self.intx.assert();
        } else {
            self.intx.deassert();
        }
    }

    /// Raise `bits` in ICR, interrupting when a newly set one is unmasked
    /// (`e82545_icr_assert`).
    fn icr_assert(&mut self, bits: u32) {
        let new = bits & !self.regs.icr & self.regs.ims;
        self.regs.icr |= bits;
        if new != 0 {
            self.raise();
        }
    }

    /// Raise the line for a new unmasked cause, unless throttled or already raised; a raise
    /// starts the throttle interval ITR sets (in 256 ns units; bhyve rounds it up to whole
    /// milliseconds).
    fn raise(&mut self) {
        if self.throttle_until.is_some() || self.regs.irq_asserted {
            return;
        }
        self.regs.irq_asserted = true;
        self.set_irq(true);
        self.arm_throttle();
    }

    fn arm_throttle(&mut self) {
        if self.regs.itr != 0 {
            let ms = u64::from(self.regs.itr).div_ceil(3906);
            self.throttle_until = Some(Instant::now() + Duration::from_millis(ms));
            self.throttle_armed = true;
        }
    }

    /// The throttle interval ended (`e82545_itr_callback`): causes that came meanwhile raise
    /// the line now and start another interval; with none, throttling stops.
    fn throttle_tick(&mut self) {
        let Some(until) = self.throttle_until else {
            return;
        };
        if Instant::now() < until {
            return;
        }
        self.throttle_until = None;
        if self.regs.icr & self.regs.ims != 0 && !self.regs.irq_asserted {
            self.regs.irq_asserted = true;
            self.set_irq(true);
            self.arm_throttle();
        }
    }

    fn icr_deassert(&mut self, bits: u32) {
        self.regs.icr &= !bits;
        if self.regs.irq_asserted && self.regs.icr & self.regs.ims == 0 {
            self.regs.irq_asserted = false;
            self.set_irq(false);
        }
    }

    fn ims_set(&mut self, bits: u32) {
        let new = bits & self.regs.icr & !self.regs.ims;
        self.regs.ims |= bits;
        if new != 0 {
            self.raise();
        }
    }

    fn read_register(&mut self, offset: u32) -> u32 {
        if offset & 3 != 0 {
            return 0;
        }
        let value = self.regs.read(offset);
        if offset == reg::ICR {
            self.icr_deassert(!0);
        }
        value
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        use reg::*;
        if offset & 3 != 0 {
            return;
        }
        let r = &mut self.regs;
        match offset {
            CTRL | CTRL_DUP => {
                r.ctrl = value & !CTRL_RST;
                if value & CTRL_RST != 0 {
                    self.reset(true);
                }
            }
            FCAL => r.fcal = value,
            FCAH => r.fcah = value & 0xffff,
            FCT => r.fct = value & 0xffff,
            VET => r.vet = value & 0xffff,
            FCTTV => r.fcttv = value & 0xffff,
            LEDCTL => r.ledctl = value & !0x3030_3000,
            PBA => r.pba = value & 0xff80,
            ICR => self.icr_deassert(value),
            ITR => r.itr = value,
            ICS => {
                r.ics = value;
                self.icr_assert(value);
            }
            IMS => self.ims_set(value),
            IMC => {
                r.imc = value;
                r.ims &= !value;
            }
            RCTL => {
                let on = value & RCTL_EN != 0;
                r.rctl = value & !0xf920_4c01;
                if on != r.rx_enabled {
                    r.rx_enabled = on;
                    r.rx_loopback = on && r.rctl & RCTL_LBM_TCVR == RCTL_LBM_TCVR;
                }
            }
            FCRTL => r.fcrtl = value & !0xffff_0007,
            FCRTH => r.fcrth = value & !0xffff_0007,
            RDBAL => r.rdbal = value & !0xf,
            RDBAH => r.rdbah = value,
            RDLEN => r.rdlen = value & !0xfff0_007f,
            RDH => r.rdh = value as u16,
            RDT => r.rdt = value as u16,
            RDTR => r.rdtr = value & 0xffff,
            RXDCTL => r.rxdctl = value & !0xfec0_c0c0,
            RADV => r.radv = value & 0xffff,
            RSRPD => r.rsrpd = value & 0xfff,
            RXCSUM => r.rxcsum = value & 0x7ff,
            TXCW => r.txcw = value & !0x3fff_0000,
            TCTL => {
                // As bhyve: a write that leaves TCTL.EN as it was is ignored entirely.
                let on = value & TCTL_EN != 0;
                if on != r.tx_enabled {
                    r.tx_enabled = on;
                    r.tctl = value & !0xfe80_0005;
                }
            }
            TIPG => r.tipg = value,
            AIT => r.ait = value,
            TDBAL => r.tdbal = value & !0xf,
            TDBAH => r.tdbah = value,
            TDLEN => r.tdlen = value & !0xfff0_007f,
            TDH => r.tdh = value as u16,
            TDT => {
                r.tdt = value as u16;
                self.tx_pending = true;
            }
            TIDV => r.tidv = value & 0xffff,
            TXDCTL => r.txdctl = value & !0x00c0_c0c0,
            TADV => r.tadv = value & 0xffff,
            RAL0..=RAH15 => r.write_receive_address(((offset - RAL0) >> 2) as usize, value),
            MTA..=0x53fc => r.multicast[((offset - MTA) >> 2) as usize] = value,
            VFTA..=0x57fc => r.vlan_filter[((offset - VFTA) >> 2) as usize] = value,
            EECD => {
                // Bits are clocked on the rising edge of SK.
                let rising = r.eeprom_control & EECD_SK == 0 && value & EECD_SK != 0;
                let mask = EECD_SK | EECD_CS | EECD_DI | EECD_REQ;
                r.eeprom_control = (r.eeprom_control & !mask) | (value & mask);
                // Access is granted at once.
                if value & EECD_REQ != 0 {
                    r.eeprom_control |= EECD_GNT;
                } else {
                    r.eeprom_control &= !EECD_GNT;
                }
                if rising && r.eeprom_control & EECD_CS != 0 {
                    r.eeprom_strobe();
                }
            }
            MDIC => {
                let register = (value >> MDIC_REG_SHIFT) & 0x1f;
                r.mdi_control = value & !(MDIC_ERROR | MDIC_DEST);
                if value & MDIC_READY != 0 {
                    return;
                }
                match value & MDIC_OP_MASK {
                    MDIC_OP_READ => {
                        r.mdi_control = (r.mdi_control & !0xffff) | Registers::read_phy(register);
                    }
                    // PHY writes change nothing this model shows.
                    MDIC_OP_WRITE => {}
                    _ => return,
                }
                r.mdi_control |= MDIC_READY;
            }
            _ => {}
        }
    }

    /// Software reset (CTRL.RST): also lets go of the interrupt line.
    fn reset(&mut self, by_driver: bool) {
        if self.regs.irq_asserted {
            self.set_irq(false);
        }
        self.regs.reset(by_driver);
        self.tx_pending = false;
    }

    fn read_tx_descriptor(&self, base: u64, index: u16) -> Option<TxDescriptor> {
        let mut raw = [0u8; 16];
        let gpa = base.checked_add(u64::from(index) * DESCRIPTOR_SIZE)?;
        self.memory.read(gpa, &mut raw).ok()?;
        let word = |i: usize| u32::from_le_bytes([raw[i], raw[i + 1], raw[i + 2], raw[i + 3]]);
        Some(TxDescriptor {
            address: u64::from_le_bytes(raw[..8].try_into().unwrap_or_default()),
            lower: word(8),
            upper: word(12),
            raw,
        })
    }

    /// Send every frame the driver queued (`e82545_tx_run`), then interrupt.
    fn transmit(&mut self) {
        self.tx_pending = false;
        if !self.regs.tx_enabled {
            return;
        }
        let (base, size) = self.regs.tx_ring();
        if size == 0 {
            return;
        }
        let mut head = self.regs.tdh % size;
        let tail = self.regs.tdt;
        let mut done_any = false;
        let mut written_back = false;
        // At most one lap: a tail outside the ring is never reached.
        let mut budget = usize::from(size);
        while budget > 0 {
            let Some((consumed, next)) = self.transmit_one(base, head, tail, size) else {
                break;
            };
            budget = budget.saturating_sub(consumed);
            // Report completion on the descriptors that ask for it.
            let mut index = head;
            while index != next {
                if let Some(d) = self.read_tx_descriptor(base, index) {
                    if d.lower & TXD_CMD_RS != 0 {
                        let gpa = base + u64::from(index) * DESCRIPTOR_SIZE + 12;
                        let _ = self
                            .memory
                            .write(gpa, &(d.upper | TXD_STAT_DD).to_le_bytes());
                        written_back = true;
                    }
                }
                index = (index + 1) % size;
            }
            head = next;
            done_any = true;
        }
        self.regs.tdh = head;
        let mut cause = 0;
        if written_back {
            cause |= ICR_TXDW;
        }
        if done_any && self.regs.tdh == self.regs.tdt {
            cause |= ICR_TXQE;
        }
        if cause != 0 {
            self.icr_assert(cause);
        }
    }

    /// Take the descriptors of one frame (or one context descriptor) from `head` and send the
    /// frame. `None` when the ring holds no complete frame (or its descriptors cannot be
    /// read); else how many descriptors were used and the next head.
    fn transmit_one(&mut self, base: u64, head: u16, tail: u16, size: u16) -> Option<(usize, u16)> {
        let mut index = head;
        let mut count = 0usize;
        let mut segments: Vec<(u64, usize)> = Vec::new();
        let mut kind = None;
        let mut consistent = true;
        let mut legacy_css = 0usize;
        let last = loop {
            if index == tail {
                return None;
            }
            let d = self.read_tx_descriptor(base, index)?;
            count += 1;
            index = (index + 1) % size;
            let this_kind = d.kind();
            match kind {
                None if this_kind == TXD_TYPE_CONTEXT => {
                    self.regs.tx_context = TxContext::from_descriptor(&d.raw);
                    return Some((count, index));
                }
                None => {
                    legacy_css = ((d.upper >> 8) & 0xff) as usize;
                    kind = Some(this_kind);
                }
                // bhyve asserts here; a guest mixing types in one frame gets it dropped.
                Some(k) if k != this_kind => consistent = false,
                Some(_) => {}
            }
            let mut length = d.length();
            if length > 0 {
                // bhyve drops two bytes from a frame whose last descriptor does not ask for
                // the FCS to be inserted.
                if d.lower & TXD_CMD_EOP != 0 && d.lower & TXD_CMD_IFCS == 0 {
                    length = length.saturating_sub(2);
                }
                segments.push((d.address, length));
            }
            if d.lower & TXD_CMD_EOP != 0 {
                break d;
            }
            // A ring of descriptors none of which ends a frame.
            if count >= usize::from(size) {
                return Some((count, index));
            }
        };
        if !consistent || segments.len() > MAX_TX_SEGMENTS {
            log::debug!("e82545: transmit frame dropped (bad descriptors)");
            return Some((count, index));
        }
        let total: usize = segments.iter().map(|&(_, l)| l).sum();
        if total > MAX_FRAME_LEN * 16 {
            return Some((count, index));
        }
        let mut frame = std::mem::take(&mut self.buffer);
        frame.clear();
        frame.resize(total, 0);
        let mut at = 0;
        let mut readable = true;
        for &(address, length) in &segments {
            if self
                .memory
                .read(address, &mut frame[at..at + length])
                .is_err()
            {
                readable = false;
                break;
            }
            at += length;
        }
        if readable {
            self.send_frame(&mut frame, &last, legacy_css, kind == Some(TXD_TYPE_DATA));
        } else {
            log::debug!("e82545: transmit buffer outside guest memory, frame dropped");
        }
        self.buffer = frame;
        Some((count, index))
    }

    /// Checksums, VLAN tag, segmentation; then out to the backend (`e82545_transmit`).
    fn send_frame(&mut self, frame: &mut Vec<u8>, last: &TxDescriptor, css: usize, data: bool) {
        let context = self.regs.tx_context;
        let mut ip = Checksum::default();
        let mut l4 = Checksum::default();
        let mut tso = false;
        if !data {
            ip.start = css;
            if last.lower & TXD_CMD_IC != 0 {
                ip.valid = true;
                ip.offset = ((last.lower >> 16) & 0xff) as usize;
                ip.end = 0;
            }
        } else {
            tso = last.lower & TXD_CMD_TSE != 0;
            let popts = (last.upper >> 8) as u8;
            if popts & TXD_POPTS_IXSM != 0 || tso {
                ip = context.ip_checksum();
            }
            ip.valid = popts & TXD_POPTS_IXSM != 0;
            if popts & TXD_POPTS_TXSM != 0 || tso {
                l4 = context.l4_checksum();
            }
            l4.valid = popts & TXD_POPTS_TXSM != 0;
        }
        let vlan = self.regs.ctrl & CTRL_VME != 0 && last.lower & TXD_CMD_VLE != 0;
        let tcp = context.cmd_and_length & TXD_CMD_TCP != 0;
        let mut header_len = context.header_len();
        if tso {
            let too_small = header_len > MAX_TSO_HEADER
                || header_len > frame.len()
                || (vlan && header_len < ETHER_ADDR_LEN * 2)
                || header_len < ip.start + 6
                || header_len < ip.offset + 2
                || (tcp && header_len < l4.start + 14)
                || (!tcp && header_len < l4.start + 8)
                || (l4.valid && header_len < l4.offset + 2)
                || context.mss() == 0;
            if too_small {
                log::debug!("e82545: TSO header of {header_len} bytes unusable, frame dropped");
                return;
            }
        }
        if vlan {
            if frame.len() < ETHER_ADDR_LEN * 2 {
                return;
            }
            let special = (last.upper >> 16) as u16;
            let mut tag = [0u8; ETHER_VLAN_ENCAP_LEN];
            tag[..2].copy_from_slice(&(self.regs.vet as u16).to_be_bytes());
            tag[2..].copy_from_slice(&special.to_be_bytes());
            let at = ETHER_ADDR_LEN * 2;
            frame.splice(at..at, tag);
            ip.shift(ETHER_VLAN_ENCAP_LEN);
            l4.shift(ETHER_VLAN_ENCAP_LEN);
            header_len += ETHER_VLAN_ENCAP_LEN;
        }
        if !tso {
            if ip.valid {
                ip.insert(frame);
            }
            if l4.valid {
                l4.insert(frame);
            }
            self.send_to_backend(frame);
            return;
        }
        self.regs.stats.tso_tx = self.regs.stats.tso_tx.wrapping_add(1);
        let mss = context.mss();
        let payload_len =
            ((context.cmd_and_length & 0xf_ffff) as usize).min(frame.len() - header_len);
        let ipv4 = context.cmd_and_length & TXD_CMD_IP != 0;
        let (header, payload) = frame.split_at(header_len);
        let mut header = header.to_vec();
        let payload = &payload[..payload_len];
        let ip_id = u16::from_be_bytes([header[ip.start + 4], header[ip.start + 5]]);
        let sequence = if tcp {
            u32::from_be_bytes(
                header[l4.start + 4..l4.start + 8]
                    .try_into()
                    .unwrap_or_default(),
            )
        } else {
            0
        };
        let tcp_flags = if tcp { header[l4.start + 13] } else { 0 };
        let ip_sum_field = [header[ip.offset], header[ip.offset + 1]];
        // The driver leaves the pseudo-header sum (without the length) in the L4 checksum.
        let pseudo = if l4.valid && l4.offset + 2 <= header.len() {
            u16::from_be_bytes([header[l4.offset], header[l4.offset + 1]])
        } else {
            0
        };
        let mut segment = Vec::with_capacity(header_len + mss);
        for (number, chunk) in payload.chunks(mss).enumerate() {
            let sent_before = number * mss;
            let last_segment = sent_before + chunk.len() >= payload_len;
            let ip_len = (header_len - ip.start + chunk.len()) as u16;
            if ipv4 {
                header[ip.start + 2..ip.start + 4].copy_from_slice(&ip_len.to_be_bytes());
                let id = ip_id.wrapping_add(number as u16);
                header[ip.start + 4..ip.start + 6].copy_from_slice(&id.to_be_bytes());
            } else {
                let v6_len = ip_len.wrapping_sub(40);
                header[ip.start + 4..ip.start + 6].copy_from_slice(&v6_len.to_be_bytes());
            }
            let l4_len = (header_len - l4.start + chunk.len()) as u16;
            if tcp {
                let seq = sequence.wrapping_add(sent_before as u32);
                header[l4.start + 4..l4.start + 8].copy_from_slice(&seq.to_be_bytes());
                // FIN and PSH only on the last segment (bhyve clears them in its one header
                // copy and so drops them from the last segment too; the hardware does not).
                header[l4.start + 13] = if last_segment {
                    tcp_flags
                } else {
                    tcp_flags & !(TH_FIN | TH_PUSH)
                };
            } else {
                header[l4.start + 4..l4.start + 6].copy_from_slice(&l4_len.to_be_bytes());
            }
            if ip.valid {
                header[ip.offset..ip.offset + 2].copy_from_slice(&ip_sum_field);
            }
            if l4.valid {
                let sum = fold(u32::from(pseudo) + u32::from(l4_len));
                header[l4.offset..l4.offset + 2].copy_from_slice(&sum.to_be_bytes());
            }
            segment.clear();
            segment.extend_from_slice(&header);
            segment.extend_from_slice(chunk);
            if ip.valid {
                ip.insert(&mut segment);
            }
            if l4.valid {
                l4.insert(&mut segment);
            }
            self.send_to_backend(&segment);
        }
    }

    fn send_to_backend(&mut self, frame: &[u8]) {
        let stats = &mut self.regs.stats;
        stats.good_tx = stats.good_tx.wrapping_add(1);
        stats.good_octets_tx = stats.good_octets_tx.wrapping_add(frame.len() as u64);
        stats.tx_by_size[size_bucket(frame.len() + ETHER_CRC_LEN)] += 1;
        if frame.first().is_some_and(|b| b & 1 != 0) {
            if frame.get(..6) == Some(&[0xff; 6]) {
                stats.broadcast_tx = stats.broadcast_tx.wrapping_add(1);
            } else {
                stats.multicast_tx = stats.multicast_tx.wrapping_add(1);
            }
        }
        if let Some(backend) = self.backend.as_mut() {
            let _ = backend.send(&[IoSlice::new(frame)]);
        }
    }

    fn discard_all(&mut self) {
        let Some(backend) = self.backend.as_mut() else {
            return;
        };
        while let Ok(n) = backend.discard() {
            if n == 0 {
                break;
            }
            self.regs.stats.missed_packets = self.regs.stats.missed_packets.wrapping_add(1);
            self.regs.stats.missed_octets = self.regs.stats.missed_octets.wrapping_add(n as u64);
        }
    }

    /// Move waiting frames into the receive ring (`e82545_rx_callback`).
    fn receive(&mut self) {
        if self.backend.is_none() {
            return;
        }
        if !self.regs.rx_enabled || self.regs.rx_loopback {
            self.discard_all();
            return;
        }
        let (base, size) = self.regs.rx_ring();
        let buffer_size = self.regs.rx_buffer_size();
        let max_frame: usize = if self.regs.rctl & RCTL_LPE != 0 {
            16384
        } else {
            1522
        };
        let per_frame = max_frame.div_ceil(buffer_size);
        if size == 0 {
            self.discard_all();
            return;
        }
        let size_usize = usize::from(size);
        let mut head = self.regs.rdh % size;
        let mut left = (size_usize + usize::from(self.regs.rdt) - usize::from(head)) % size_usize;
        if left < per_frame {
            // No room for a frame of the longest length: what waits is lost, as bhyve does.
            self.discard_all();
            return;
        }
        let mut cause = 0;
        let mut frame = std::mem::take(&mut self.buffer);
        while left >= per_frame {
            frame.clear();
            frame.resize(per_frame * buffer_size, 0);
            let Some(backend) = self.backend.as_mut() else {
                break;
            };
            let received = match backend.recv(&mut [IoSliceMut::new(&mut frame)]) {
                Ok(n) if n > 0 => n,
                _ => break,
            };
            // Short frames are padded; the CRC is counted unless the driver has it stripped.
            let mut length = received.max(ETHER_MIN_NOCRC);
            if self.regs.rctl & RCTL_SECRC == 0 {
                length += ETHER_CRC_LEN;
            }
            length = length.min(per_frame * buffer_size);
            frame[received..length].fill(0);
            if self.regs.rctl & RCTL_VFE != 0
                && received >= 16
                && u32::from(u16::from_be_bytes([frame[12], frame[13]])) == self.regs.vet
            {
                let tag = usize::from(u16::from_be_bytes([frame[14], frame[15]]) & 0xfff);
                if self.regs.vlan_filter[tag >> 5] & (1 << (tag & 31)) == 0 {
                    continue;
                }
            }
            let used = length.div_ceil(buffer_size);
            if !self.store_received(base, head, size, &frame[..length], buffer_size) {
                log::debug!("e82545: receive ring or buffer outside guest memory");
                self.regs.stats.missed_packets = self.regs.stats.missed_packets.wrapping_add(1);
                continue;
            }
            self.count_received(&frame[..received.max(ETHER_MIN_NOCRC)]);
            cause |= if length <= self.regs.rsrpd as usize {
                ICR_SRPD | ICR_RXT0
            } else {
                ICR_RXT0
            };
            head = ((usize::from(head) + used) % size_usize) as u16;
            left -= used;
        }
        self.buffer = frame;
        self.regs.rdh = head;
        let left = (size_usize + usize::from(self.regs.rdt) - usize::from(head)) % size_usize;
        // RXDMT0: free descriptors fell below the RCTL.RDMTS fraction of the ring.
        if left < size_usize >> (((self.regs.rctl >> 8) & 3) + 1) {
            cause |= ICR_RXDMT0;
        }
        if cause != 0 {
            self.icr_assert(cause);
        }
    }

    /// Write one frame into the buffers of the descriptors from `head`, then the descriptors.
    fn store_received(
        &self,
        base: u64,
        head: u16,
        size: u16,
        frame: &[u8],
        buffer_size: usize,
    ) -> bool {
        let chunks: Vec<&[u8]> = frame.chunks(buffer_size).collect();
        let descriptor = |i: usize| {
            base + ((usize::from(head) + i) % usize::from(size)) as u64 * DESCRIPTOR_SIZE
        };
        // Data first, so the guest never sees DD before the frame is there.
        for (i, chunk) in chunks.iter().enumerate() {
            let Ok(address) = self.memory.read_u64(descriptor(i)) else {
                return false;
            };
            if self.memory.write(address, chunk).is_err() {
                return false;
            }
        }
        for (i, chunk) in chunks.iter().enumerate() {
            let status = if i + 1 == chunks.len() {
                RXD_STAT_PIF | RXD_STAT_IXSM | RXD_STAT_EOP | RXD_STAT_DD
            } else {
                RXD_STAT_DD
            };
            // length, checksum, status, errors, special.
            let mut tail = [0u8; 8];
            tail[..2].copy_from_slice(&(chunk.len() as u16).to_le_bytes());
            tail[4] = status;
            if self.memory.write(descriptor(i) + 8, &tail).is_err() {
                return false;
            }
        }
        true
    }

    fn count_received(&mut self, frame: &[u8]) {
        let stats = &mut self.regs.stats;
        stats.good_rx = stats.good_rx.wrapping_add(1);
        stats.good_octets_rx = stats.good_octets_rx.wrapping_add(frame.len() as u64);
        stats.rx_by_size[size_bucket(frame.len() + ETHER_CRC_LEN)] += 1;
        if frame.first().is_some_and(|b| b & 1 != 0) {
            if frame.get(..6) == Some(&[0xff; 6]) {
                stats.broadcast_rx = stats.broadcast_rx.wrapping_add(1);
            } else {
                stats.multicast_rx = stats.multicast_rx.wrapping_add(1);
            }
        }
    }
}

impl Work for Engine {
    /// The backend always (bhyve keeps receiving and drops what the ring cannot take).
    fn poll_set(&self) -> Vec<libc::pollfd> {
        match &self.backend {
            Some(backend) => vec![libc::pollfd {
                fd: backend.ready_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }],
            None => Vec::new(),
        }
    }

    fn timeout(&self) -> Option<Duration> {
        self.throttle_until
            .map(|until| until.saturating_duration_since(Instant::now()))
    }

    fn work(&mut self) {
        self.throttle_tick();
        if self.tx_pending {
            self.transmit();
        }
        self.receive();
    }
}

/// The e1000 device model.
pub struct E1000 {
    worker: Worker<Engine>,
}

impl E1000 {
    /// A card with address `mac` on `backend`, raising `intx`; its worker thread runs.
    pub fn new(
        mac: [u8; 6],
        backend: Option<Box<dyn NetBackend>>,
        memory: Arc<GuestMemory>,
        intx: Arc<IntxLine>,
        thread_name: &str,
    ) -> std::io::Result<Self> {
        let mut worker = Worker::new(Engine {
            regs: Registers::new(mac),
            memory,
            backend,
            intx,
            buffer: Vec::with_capacity(MAX_FRAME_LEN),
            tx_pending: false,
            throttle_until: None,
            throttle_armed: false,
        })?;
        worker.start(thread_name)?;
        Ok(Self { worker })
    }

    /// A copy of the registers (for tests and inspection).
    pub fn registers(&self) -> Registers {
        self.worker.lock().work.regs.clone()
    }

    fn access(&mut self, offset: u32, write: Option<u32>) -> u32 {
        let mut state = self.worker.lock();
        let engine = &mut state.work;
        let value = match write {
            Some(value) => {
                engine.write_register(offset, value);
                0
            }
            None => engine.read_register(offset),
        };
        let wake = engine.tx_pending || std::mem::take(&mut engine.throttle_armed);
        drop(state);
        if wake {
            self.worker.wake();
        }
        value
    }
}

impl PciDevice for E1000 {
    fn bar_read(&mut self, _config: &ConfigSpace, bar: usize, offset: u64, data: &mut [u8]) {
        let value = match (bar, offset, data.len()) {
            (REGISTER_BAR, _, 4) => self.access(offset as u32, None),
            (IO_BAR, IOADDR, 4) => self.worker.lock().work.regs.io_addr,
            (IO_BAR, IODATA, _) => {
                let address = self.worker.lock().work.regs.io_addr;
                if address > IO_REGISTER_MAX {
                    0
                } else {
                    self.access(address, None)
                }
            }
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn bar_write(&mut self, _config: &ConfigSpace, bar: usize, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            // Registers take 32-bit accesses only.
            return;
        };
        let value = u32::from_le_bytes(bytes);
        match (bar, offset) {
            (REGISTER_BAR, _) => {
                self.access(offset as u32, Some(value));
            }
            (IO_BAR, IOADDR) => self.worker.lock().work.regs.io_addr = value,
            (IO_BAR, IODATA) => {
                let address = self.worker.lock().work.regs.io_addr;
                if address <= IO_REGISTER_MAX {
                    self.access(address, Some(value));
                }
            }
            _ => {}
        }
    }

    fn pause(&mut self) {
        self.worker.pause();
    }

    fn resume(&mut self) {
        // Transmit what the driver queued while the card was paused (or before a restore).
        self.worker.lock().work.tx_pending = true;
        self.worker.resume();
    }

    #[cfg(feature = "bhyve_snapshot")]
    fn save_device_state(&self) -> Option<Vec<u8>> {
        let state = self.worker.lock();
        crate::snapshot::encode_section(&(STATE_VERSION, &state.work.regs)).ok()
    }

    #[cfg(feature = "bhyve_snapshot")]
    fn restore_device_state(&mut self, state: &[u8]) -> Result<(), String> {
        let (version, regs): (u32, Registers) =
            crate::snapshot::decode_section(state).map_err(|e| e.to_string())?;
        if version != STATE_VERSION {
            return Err(format!(
                "e1000: state version {version}, expected {STATE_VERSION}"
            ));
        }
        if regs.multicast.len() != 128
            || regs.vlan_filter.len() != 128
            || regs.eeprom.len() != EEPROM_WORDS
        {
            return Err("e1000: saved filter tables or EEPROM of the wrong size".to_string());
        }
        // The INTx line's state is restored by the PCI layer; the card only remembers it.
        self.worker.lock().work.regs = regs;
        Ok(())
    }
}

#[cfg(test)]
#[path = "e1000_tests.rs"]
mod tests;
