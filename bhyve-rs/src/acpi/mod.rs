//! ACPI tables of a bhyve VM, as FreeBSD's `usr.sbin/bhyve/acpi.c` (with `basl.c`) builds
//! them, laid out in one blob for guest memory.
//!
//! Placement: bhyve writes the tables at [`BHYVE_ACPI_BASE`] (0xF2400, `basl.h`), each table
//! aligned to 16 bytes and the FACS to 64, in bhyve's order: RSDP, RSDT, XSDT, FADT, MADT,
//! HPET, MCFG, FACS, SPCR, DSDT. The RSDP comes first, so a guest that scans 0xE0000–0xFFFFF on
//! 16-byte boundaries for `RSD PTR ` finds it. The caller copies [`AcpiBlob::bytes`] to
//! [`AcpiBlob::gpa`] and keeps that range out of usable RAM in the e820 map. When
//! `acpi_tables` is false bhyve builds none of this.
//!
//! Contents, all following `acpi.c`:
//! * RSDT and XSDT list FADT, MADT, HPET, MCFG and SPCR (FADT first, as UEFI wants).
//! * FADT revision 5.1: SCI on IRQ 9, SMI_CMD 0xB2 with enable 0xA0 / disable 0xA1, PM1a event
//!   block 0x400 (4 bytes), PM1a control 0x404 (2), PM timer 0x408 (4, 32 bits), GPE0 0x40C
//!   (2), century at CMOS 0x32, boot flags "no VGA" and "no ASPM", flags WBINVD, C1, sleep
//!   button as control method, 32-bit timer, reset register, headless, APIC physical mode;
//!   reset register 0xCF9 (I/O, 8 bits) with value 6. The power button is the fixed-feature
//!   one. Not hardware-reduced.
//! * MADT: local APIC at 0xFEE00000, PC-AT compatible; one enabled local APIC per vCPU, one
//!   I/O APIC, overrides ISA IRQ 0 → GSI 2 (edge, high) and SCI 9 → GSI 9 (level, low), and
//!   a local APIC NMI on LINT1 of every processor.
//! * HPET (revision 1, as `build_hpet`): the hardware block id (the low half of the HPET's
//!   capabilities register, as `vm_get_hpet_capabilities` reports it), the register block at
//!   0xFED00000 in system memory (GAS width, offset and access size 0), sequence number 0,
//!   minimum tick 0, page protection "4 KiB protected".
//! * MCFG: one ECAM range for segment 0.
//! * FACS version 2; SPCR for the first serial port (16550, 115200 8N1, RTS/CTS, VT-UTF8).
//! * DSDT: `\_SB.PC00` (PNP0A03) with its bus range and windows, `_PRT`, the LPC devices
//!   (COM ports, RTC, PIC, PIT, motherboard resources), the HPET (PNP0103) and `_S5` = 5 (see
//!   `dsdt.rs`).
//!
//! Construction: the FADT, MCFG, XSDT and FACS come from the typed builders of rust-vmm's
//! `acpi_tables`, the MADT's local APIC and I/O APIC entries from its structures, the DSDT
//! from its AML types. Where the crate has no builder, or its builder cannot express what bhyve
//! writes (RSDT, RSDP, SPCR, HPET, the MADT header and its override/NMI entries), the table is
//! assembled on the crate's [`Sdt`] header, which still keeps length and checksum.

mod dsdt;

use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags as FadtFlags, FADT};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::mcfg::MCFG;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

use crate::config::Config;
use crate::devices::pm;

/// `acpi_tables` (default true in current bhyve, where `-A` is a no-op): whether to build them.
pub fn acpi_tables_enabled(config: &Config) -> Result<bool, String> {
    Ok(config.get_bool("acpi_tables")?.unwrap_or(true))
}

/// Where bhyve puts the tables.
pub const BHYVE_ACPI_BASE: u64 = 0xf2400;
/// Local APIC base.
pub const BHYVE_ADDRESS_LAPIC: u32 = 0xfee0_0000;
/// I/O APIC base.
pub const BHYVE_ADDRESS_IOAPIC: u32 = 0xfec0_0000;
/// HPET register block (the size is [`crate::devices::hpet::HPET_SIZE`]).
pub const BHYVE_ADDRESS_HPET: u32 = crate::devices::hpet::HPET_BASE as u32;
/// PCI resources as `pci_emul.c` lays them out: I/O BARs from 0x2000, 32-bit BARs in
/// 0xC0000000..0xE0000000, ECAM at 0xE0000000 (256 buses, 256 MiB), 64-bit BARs in 32 GiB
/// above high memory.
pub const PCI_EMUL_IOBASE: u16 = 0x2000;
pub const PCI_EMUL_IOLIMIT: u32 = 0x10000;
pub const PCI_EMUL_MEMBASE32: u32 = 0xc000_0000;
pub const PCI_EMUL_ECFG_BASE: u64 = 0xe000_0000;
pub const PCI_EMUL_ECFG_SIZE: u64 = 256 << 20;
pub const PCI_EMUL_MEMSIZE64: u64 = 32 << 30;

const OEM_ID: [u8; 6] = *b"BHYVE ";
const OEM_REVISION: u32 = 1;
const TABLE_ALIGNMENT: usize = 0x10;
const FACS_ALIGNMENT: usize = 0x40;
const HEADER_LEN: usize = 36;
const RSDP_LEN: usize = 36;
const BIOS_AREA_END: u64 = 0x10_0000;

/// A half-open address window `base..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window<T> {
    pub base: T,
    /// One past the last address.
    pub end: T,
}

macro_rules! window_last {
    ($t:ty) => {
        impl Window<$t> {
            /// The last address inside the window.
            pub fn last(&self) -> $t {
                self.end.saturating_sub(1)
            }
            fn is_valid(&self) -> bool {
                self.end > self.base
            }
        }
    };
}
window_last!(u32);
window_last!(u64);

/// An LPC serial port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ComPort {
    /// 1 for COM1 … 4 for COM4.
    pub unit: u8,
    pub io_base: u16,
    pub irq: u8,
}

impl ComPort {
    /// bhyve's four LPC UARTs (`uart_legacy_alloc`): 0x3F8/4, 0x2F8/3, 0x3E8/4, 0x2E8/3.
    pub const BHYVE: [ComPort; 4] = [
        ComPort {
            unit: 1,
            io_base: 0x3f8,
            irq: 4,
        },
        ComPort {
            unit: 2,
            io_base: 0x2f8,
            irq: 3,
        },
        ComPort {
            unit: 3,
            io_base: 0x3e8,
            irq: 4,
        },
        ComPort {
            unit: 4,
            io_base: 0x2e8,
            irq: 3,
        },
    ];
}

/// The LPC bridge and what hangs off it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LpcLayout {
    /// PCI slot and function of the bridge on bus 0 (bhyve users put it at 31.0).
    pub slot: u8,
    pub func: u8,
    /// bhyve declares all four UARTs whenever the LPC bridge exists.
    pub com_ports: Vec<ComPort>,
}

/// One routed PCI INTx pin (for the DSDT's `_PRT`).
pub use crate::mptable::PciIntxRoute;

/// Everything the tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiLayout {
    /// Local APIC id of each vCPU, in vCPU order (bhyve: 0..N).
    pub apic_ids: Vec<u32>,
    pub ioapic_address: u32,
    /// bhyve: 0.
    pub ioapic_id: u8,
    pub ioapic_gsi_base: u32,
    /// Guest RAM below 4 GiB and above it (informational; windows are given explicitly).
    pub lowmem_top: u64,
    pub highmem_size: u64,
    /// PCI bus numbers decoded by the root bridge `PC00` (bhyve: 0..=0).
    pub pci_bus_range: (u8, u8),
    /// I/O window, `end` at most 0x10000.
    pub pci_io: Window<u32>,
    pub pci_mmio32: Window<u32>,
    pub pci_mmio64: Window<u64>,
    pub ecam_base: u64,
    pub ecam_bus_range: (u8, u8),
    /// The LPC bridge, if configured; it carries the COM ports, RTC, PIC and PIT devices.
    pub lpc: Option<LpcLayout>,
    /// Port ranges declared as motherboard resources (PNP0C02) under the LPC bridge.
    pub reserved_io: Vec<(u16, u8)>,
    /// Serial port described by the SPCR table, if any.
    pub spcr: Option<ComPort>,
    pub pci_intx: Vec<PciIntxRoute>,
    /// The HPET's hardware block id (low half of its capabilities register), when the VM has
    /// one at [`BHYVE_ADDRESS_HPET`]: it gets an HPET table and a DSDT device.
    pub hpet_id: Option<u32>,
    pub sci_irq: u8,
    pub smi_cmd: u16,
    pub acpi_enable: u8,
    pub acpi_disable: u8,
    pub pm1a_evt: u16,
    pub pm1a_cnt: u16,
    pub pm_timer: u16,
    pub gpe0: u16,
    pub gpe0_len: u8,
    pub reset_port: u16,
    pub reset_value: u8,
    /// CMOS index of the century byte.
    pub rtc_century: u8,
    /// Guest-physical address of the first byte (the RSDP); 16-byte aligned.
    pub base: u64,
}

impl AcpiLayout {
    /// The layout bhyve produces for `cpus` vCPUs, `lowmem` bytes below 4 GiB and `highmem`
    /// above, PCI bus 0 with bhyve's base windows, and an LPC bridge at 31.0 with four UARTs.
    /// The PCI code adjusts the windows and INTx routes to what it really allocated.
    pub fn bhyve(cpus: u32, lowmem: u64, highmem: u64) -> Self {
        let mmio64_base = (4u64 << 30)
            .saturating_add(highmem)
            .next_multiple_of(PCI_EMUL_MEMSIZE64);
        Self {
            apic_ids: (0..cpus).collect(),
            ioapic_address: BHYVE_ADDRESS_IOAPIC,
            ioapic_id: 0,
            ioapic_gsi_base: 0,
            lowmem_top: lowmem,
            highmem_size: highmem,
            pci_bus_range: (0, 0),
            pci_io: Window {
                base: PCI_EMUL_IOBASE.into(),
                end: PCI_EMUL_IOLIMIT,
            },
            pci_mmio32: Window {
                base: PCI_EMUL_MEMBASE32,
                end: PCI_EMUL_ECFG_BASE as u32,
            },
            pci_mmio64: Window {
                base: mmio64_base,
                end: mmio64_base.saturating_add(PCI_EMUL_MEMSIZE64),
            },
            ecam_base: PCI_EMUL_ECFG_BASE,
            ecam_bus_range: (0, 255),
            lpc: Some(LpcLayout {
                slot: 31,
                func: 0,
                com_ports: ComPort::BHYVE.to_vec(),
            }),
            // ELCR, NMI status/control, PM1 blocks and timer, GPE0, SMI_CMD, extended RTC
            // bank: the ports bhyve declares with SYSRES_IO.
            reserved_io: vec![
                (0x4d0, 2),
                (0x61, 1),
                (pm::PM1A_EVT_ADDR, 8),
                (pm::IO_GPE0_BLK, pm::IO_GPE0_LEN as u8),
                (pm::SMI_CMD, 1),
                (0x72, 6),
            ],
            spcr: Some(ComPort::BHYVE[0]),
            pci_intx: Vec::new(),
            hpet_id: Some(crate::devices::hpet::capabilities() as u32),
            sci_irq: pm::SCI_INT as u8,
            smi_cmd: pm::SMI_CMD,
            acpi_enable: pm::BHYVE_ACPI_ENABLE,
            acpi_disable: pm::BHYVE_ACPI_DISABLE,
            pm1a_evt: pm::PM1A_EVT_ADDR,
            pm1a_cnt: pm::PM1A_CNT_ADDR,
            pm_timer: pm::IO_PMTMR,
            gpe0: pm::IO_GPE0_BLK,
            gpe0_len: pm::IO_GPE0_LEN as u8,
            reset_port: pm::RESET_CONTROL_PORT,
            reset_value: pm::RESET_VALUE,
            rtc_century: crate::devices::rtc::RTC_CENTURY,
            base: BHYVE_ACPI_BASE,
        }
    }
}

/// The tables, ready to copy into guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiBlob {
    /// Guest-physical address of `bytes[0]` (the RSDP).
    pub gpa: u64,
    pub bytes: Vec<u8>,
    /// Offset and length of each table in `bytes`, by signature, in placement order.
    pub tables: Vec<([u8; 4], usize, usize)>,
}

impl AcpiBlob {
    /// The bytes of the table with `signature` (e.g. `b"DSDT"`).
    pub fn table(&self, signature: &[u8; 4]) -> Option<&[u8]> {
        self.tables
            .iter()
            .find(|(s, _, _)| s == signature)
            .and_then(|&(_, off, len)| self.bytes.get(off..off + len))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    #[error("ACPI tables need at least one vCPU")]
    NoCpus,
    #[error("local APIC id {0} does not fit an xAPIC MADT entry")]
    ApicId(u32),
    #[error("ACPI base {0:#x} is not 16-byte aligned")]
    Unaligned(u64),
    #[error("ACPI tables ({len} bytes at {base:#x}) run past the BIOS area at 1 MiB")]
    TooLarge { base: u64, len: usize },
    #[error("ACPI tables do not fit below 4 GiB at {0:#x}")]
    Above4G(u64),
    #[error("empty or inverted {0} window")]
    Window(&'static str),
    #[error("COM port unit {0} is not between 1 and 4")]
    ComUnit(u8),
    #[error("PCI INTx pin {0} is not between 1 and 4")]
    InvalidPin(u8),
}

fn oem_table_id(signature: &[u8; 4]) -> [u8; 8] {
    let mut id = *b"BV      ";
    id[2..6].copy_from_slice(signature);
    id
}

/// A bhyve table header on the crate's [`Sdt`], for the tables without a fitting typed builder.
fn new_sdt(signature: &[u8; 4], revision: u8) -> Sdt {
    Sdt::new(
        *signature,
        HEADER_LEN as u32,
        revision,
        OEM_ID,
        oem_table_id(signature),
        OEM_REVISION,
    )
}

/// The bytes a crate structure serializes to.
fn aml_bytes(item: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    item.to_aml_bytes(&mut bytes);
    bytes
}

fn gas_io(bit_width: u8, access_size: AccessSize, port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        bit_width,
        0,
        access_size,
        port.into(),
    )
}

fn build_fadt(layout: &AcpiLayout, facs: u64, dsdt: u64) -> FADT {
    let mut f = FADTBuilder::new(OEM_ID, oem_table_id(b"FACP"), OEM_REVISION)
        .flag(FadtFlags::Wbinvd)
        .flag(FadtFlags::ProcC1)
        .flag(FadtFlags::SlpButton)
        .flag(FadtFlags::TmrValExt)
        .flag(FadtFlags::ResetRegSup)
        .flag(FadtFlags::Headless)
        .flag(FadtFlags::ForceApicPhysicalDestinationMode)
        .gpe_info(layout.gpe0.into(), 0, layout.gpe0_len, 0, 0);
    // Revision 5.1, as bhyve; the builder defaults to 6.5.
    f.major_version = 5;
    f.fadt_minor_version = 1;
    // bhyve fills both the 32- and the 64-bit pointers; the builder's setters keep only one.
    f.firmware_ctrl = (facs as u32).into();
    f.x_firmware_ctrl = facs.into();
    f.dsdt = (dsdt as u32).into();
    f.x_dsdt = dsdt.into();
    f.sci_int = u16::from(layout.sci_irq).into();
    f.smi_cmd = u32::from(layout.smi_cmd).into();
    // The builder's acpi_enable()/acpi_disable() write 1/0; bhyve's SMI values differ.
    f.acpi_enable = layout.acpi_enable;
    f.acpi_disable = layout.acpi_disable;
    f.pm1a_evt_blk = u32::from(layout.pm1a_evt).into();
    f.pm1a_cnt_blk = u32::from(layout.pm1a_cnt).into();
    f.pm_tmr_blk = u32::from(layout.pm_timer).into();
    f.pm1_evt_len = 4;
    f.pm1_cnt_len = 2;
    f.pm_tmr_len = 4;
    f.century = layout.rtc_century;
    f.iapc_boot_arch = (IAPC_BOOT_NO_VGA | IAPC_BOOT_NO_ASPM).into();
    f.reset_reg = gas_io(8, AccessSize::ByteAccess, layout.reset_port);
    f.reset_value = layout.reset_value;
    f.x_pm1a_evt_blk = gas_io(32, AccessSize::WordAccess, layout.pm1a_evt);
    f.x_pm1b_evt_blk = gas_io(0, AccessSize::Undefined, 0);
    f.x_pm1a_cnt_blk = gas_io(16, AccessSize::WordAccess, layout.pm1a_cnt);
    f.x_pm1b_cnt_blk = gas_io(0, AccessSize::Undefined, 0);
    f.x_pm2_cnt_blk = gas_io(8, AccessSize::Undefined, 0);
    f.x_pm_tmr_blk = gas_io(32, AccessSize::DwordAccess, layout.pm_timer);
    f.x_gpe0_blk = gas_io(layout.gpe0_len * 8, AccessSize::ByteAccess, layout.gpe0);
    f.x_gpe1_blk = gas_io(0, AccessSize::Undefined, 0);
    f.sleep_control_reg = gas_io(8, AccessSize::ByteAccess, 0);
    f.sleep_status_reg = gas_io(8, AccessSize::ByteAccess, 0);
    f.finalize()
}

const IAPC_BOOT_NO_VGA: u16 = 1 << 2;
const IAPC_BOOT_NO_ASPM: u16 = 1 << 4;

const MADT_TYPE_INTERRUPT_OVERRIDE: u8 = 2;
const MADT_TYPE_LOCAL_APIC_NMI: u8 = 4;
const MADT_PCAT_COMPAT: u32 = 1;
const MPS_ACTIVE_HIGH_EDGE: u16 = 0x1 | (0x1 << 2);
const MPS_ACTIVE_LOW_LEVEL: u16 = 0x3 | (0x3 << 2);

/// The MADT's header stays on [`Sdt`]: the crate's `madt::MADT` always writes 0 in the flags
/// field, and bhyve sets PC-AT compatible there (the guest has 8259 PICs to mask). The crate
/// has no interrupt source override or local APIC NMI structure either, so those two are
/// written here; the local APIC and I/O APIC entries are the crate's.
fn build_madt(layout: &AcpiLayout) -> Result<Sdt, AcpiError> {
    let mut t = new_sdt(b"APIC", 1);
    let mut body = Vec::new();
    body.extend_from_slice(&BHYVE_ADDRESS_LAPIC.to_le_bytes());
    body.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for (uid, &apic_id) in layout.apic_ids.iter().enumerate() {
        let id = u8::try_from(apic_id)
            .ok()
            .filter(|&id| id != 0xff)
            .ok_or(AcpiError::ApicId(apic_id))?;
        let lapic = ProcessorLocalApic::new(uid as u8, id, EnabledStatus::Enabled);
        body.extend(aml_bytes(&lapic));
    }
    let ioapic = IoApic::new(
        layout.ioapic_id,
        layout.ioapic_address,
        layout.ioapic_gsi_base,
    );
    body.extend(aml_bytes(&ioapic));
    for (source, gsi, flags) in [
        (0u8, 2u32, MPS_ACTIVE_HIGH_EDGE),
        (
            layout.sci_irq,
            u32::from(layout.sci_irq),
            MPS_ACTIVE_LOW_LEVEL,
        ),
    ] {
        // Bus 0 (ISA), source IRQ, GSI, MPS INTI flags.
        body.extend_from_slice(&[MADT_TYPE_INTERRUPT_OVERRIDE, 10, 0, source]);
        body.extend_from_slice(&gsi.to_le_bytes());
        body.extend_from_slice(&flags.to_le_bytes());
    }
    // LINT1 of every processor (0xFF) is the NMI input.
    body.extend_from_slice(&[MADT_TYPE_LOCAL_APIC_NMI, 6, 0xff]);
    body.extend_from_slice(&MPS_ACTIVE_HIGH_EDGE.to_le_bytes());
    body.push(1);
    t.append_slice(&body);
    Ok(t)
}

/// ACPI_HPET_PAGE_PROTECT4: no other registers in the HPET's 4 KiB page.
const HPET_PAGE_PROTECT4: u8 = 1;

/// Hand-built on [`Sdt`]: the crate has no HPET table. The GAS is the crate's.
fn build_hpet(hardware_id: u32) -> Sdt {
    let mut t = new_sdt(b"HPET", 1);
    t.append_slice(&hardware_id.to_le_bytes());
    let block = GAS::new(
        AddressSpace::SystemMemory,
        0,
        0,
        AccessSize::Undefined,
        BHYVE_ADDRESS_HPET.into(),
    );
    t.append_slice(&aml_bytes(&block));
    t.append_slice(&[0]); // HPET sequence number
    t.append_slice(&0u16.to_le_bytes()); // minimum clock tick in periodic mode
    t.append_slice(&[HPET_PAGE_PROTECT4]);
    t
}

fn build_mcfg(layout: &AcpiLayout) -> MCFG {
    let mut t = MCFG::new(OEM_ID, oem_table_id(b"MCFG"), OEM_REVISION);
    let (start_bus, end_bus) = layout.ecam_bus_range;
    t.add_ecam(layout.ecam_base, 0, start_bus, end_bus);
    t
}

/// Hand-built on [`Sdt`]: the crate's `spcr::SPCR` only describes a RISC-V SBI console
/// (revision 4, no base address, IRQ or line settings), not bhyve's 16550 in I/O space.
fn build_spcr(com: &ComPort) -> Sdt {
    let mut t = new_sdt(b"SPCR", 1);
    let mut body = vec![0u8; 80 - HEADER_LEN];
    body[0] = 0; // 16550 compatible
    body[4..16].copy_from_slice(&aml_bytes(&gas_io(8, AccessSize::Undefined, com.io_base)));
    body[16] = 1; // interrupt type: 8259
    body[17] = com.irq;
    body[22] = 7; // 115200 baud
    body[23] = 0; // no parity
    body[24] = 1; // one stop bit
    body[25] = 3; // DCD and RTS/CTS flow control
    body[26] = 2; // VT-UTF8
    t.append_slice(&body);
    t
}

fn build_facs() -> Vec<u8> {
    let mut facs = FACS::new();
    facs.version = 2;
    aml_bytes(&facs)
}

fn build_dsdt(layout: &AcpiLayout) -> Sdt {
    let mut t = new_sdt(b"DSDT", 2);
    t.append_slice(&dsdt::dsdt_body(layout));
    t
}

/// The crate has no RSDT builder; bhyve still lists every table there for ACPI 1.0 guests.
fn build_rsdt(pointed: &[u64]) -> Sdt {
    let mut t = new_sdt(b"RSDT", 1);
    for &p in pointed {
        t.append_slice(&(p as u32).to_le_bytes());
    }
    t
}

fn build_xsdt(pointed: &[u64]) -> XSDT {
    let mut t = XSDT::new(OEM_ID, oem_table_id(b"XSDT"), OEM_REVISION);
    for &p in pointed {
        t.add_entry(p);
    }
    t
}

/// Hand-built: the crate's `rsdp::Rsdp` always leaves the RSDT address 0, and bhyve points
/// it at the RSDT as well as at the XSDT.
fn build_rsdp(rsdt: u64, xsdt: u64) -> [u8; RSDP_LEN] {
    let mut r = [0u8; RSDP_LEN];
    r[..8].copy_from_slice(b"RSD PTR ");
    r[9..15].copy_from_slice(&OEM_ID);
    r[15] = 2;
    r[16..20].copy_from_slice(&(rsdt as u32).to_le_bytes());
    r[20..24].copy_from_slice(&(RSDP_LEN as u32).to_le_bytes());
    r[24..32].copy_from_slice(&xsdt.to_le_bytes());
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

fn validate(layout: &AcpiLayout) -> Result<(), AcpiError> {
    if layout.apic_ids.is_empty() {
        return Err(AcpiError::NoCpus);
    }
    if layout.base % TABLE_ALIGNMENT as u64 != 0 {
        return Err(AcpiError::Unaligned(layout.base));
    }
    if !layout.pci_io.is_valid() || layout.pci_io.base <= 0xd00 || layout.pci_io.end > 0x10000 {
        return Err(AcpiError::Window("PCI I/O"));
    }
    if !layout.pci_mmio32.is_valid() {
        return Err(AcpiError::Window("32-bit PCI memory"));
    }
    if !layout.pci_mmio64.is_valid() {
        return Err(AcpiError::Window("64-bit PCI memory"));
    }
    if layout.pci_bus_range.0 > layout.pci_bus_range.1
        || layout.ecam_bus_range.0 > layout.ecam_bus_range.1
    {
        return Err(AcpiError::Window("PCI bus"));
    }
    if let Some(lpc) = &layout.lpc {
        if let Some(com) = lpc.com_ports.iter().find(|c| !(1..=4).contains(&c.unit)) {
            return Err(AcpiError::ComUnit(com.unit));
        }
    }
    if let Some(route) = layout.pci_intx.iter().find(|r| !(1..=4).contains(&r.pin)) {
        return Err(AcpiError::InvalidPin(route.pin));
    }
    Ok(())
}

/// Build every table for `layout` into one blob placed at `layout.base`.
pub fn build_tables(layout: &AcpiLayout) -> Result<AcpiBlob, AcpiError> {
    validate(layout)?;

    let madt = build_madt(layout)?;
    let hpet = layout.hpet_id.map(build_hpet);
    let mcfg = aml_bytes(&build_mcfg(layout));
    let spcr = layout.spcr.as_ref().map(build_spcr);
    let facs = build_facs();
    let dsdt = build_dsdt(layout);

    // Offsets in bhyve's order; every size is known before any pointer is written.
    let align = |at: usize, to: usize| at.next_multiple_of(to);
    let listed = 3 + usize::from(hpet.is_some()) + usize::from(spcr.is_some());
    let rsdp_off = 0;
    let rsdt_off = align(rsdp_off + RSDP_LEN, TABLE_ALIGNMENT);
    let rsdt_len = HEADER_LEN + 4 * listed;
    let xsdt_off = align(rsdt_off + rsdt_len, TABLE_ALIGNMENT);
    let xsdt_len = HEADER_LEN + 8 * listed;
    let fadt_off = align(xsdt_off + xsdt_len, TABLE_ALIGNMENT);
    let madt_off = align(fadt_off + FADT::len(), TABLE_ALIGNMENT);
    let hpet_off = align(madt_off + madt.len(), TABLE_ALIGNMENT);
    let mcfg_off = align(
        hpet_off + hpet.as_ref().map_or(0, Sdt::len),
        TABLE_ALIGNMENT,
    );
    let facs_off = align(mcfg_off + mcfg.len(), FACS_ALIGNMENT);
    let spcr_off = align(facs_off + facs.len(), TABLE_ALIGNMENT);
    let dsdt_off = align(
        spcr_off + spcr.as_ref().map_or(0, Sdt::len),
        TABLE_ALIGNMENT,
    );
    let total = dsdt_off + dsdt.len();

    let base = layout.base;
    if base < BIOS_AREA_END && base + total as u64 > BIOS_AREA_END {
        return Err(AcpiError::TooLarge { base, len: total });
    }
    if base + total as u64 > 1 << 32 {
        return Err(AcpiError::Above4G(base));
    }
    let gpa = |off: usize| base + off as u64;

    let fadt = aml_bytes(&build_fadt(layout, gpa(facs_off), gpa(dsdt_off)));

    let mut pointed = vec![gpa(fadt_off), gpa(madt_off)];
    if hpet.is_some() {
        pointed.push(gpa(hpet_off));
    }
    pointed.push(gpa(mcfg_off));
    if spcr.is_some() {
        pointed.push(gpa(spcr_off));
    }
    let rsdt = build_rsdt(&pointed);
    let xsdt = aml_bytes(&build_xsdt(&pointed));
    let rsdp = build_rsdp(gpa(rsdt_off), gpa(xsdt_off));

    let mut bytes = vec![0u8; total];
    let mut tables = Vec::new();
    let mut place = |sig: [u8; 4], off: usize, data: &[u8]| {
        bytes[off..off + data.len()].copy_from_slice(data);
        tables.push((sig, off, data.len()));
    };
    place(*b"RSD ", rsdp_off, &rsdp);
    place(*b"RSDT", rsdt_off, rsdt.as_slice());
    place(*b"XSDT", xsdt_off, &xsdt);
    place(*b"FACP", fadt_off, &fadt);
    place(*b"APIC", madt_off, madt.as_slice());
    if let Some(hpet) = &hpet {
        place(*b"HPET", hpet_off, hpet.as_slice());
    }
    place(*b"MCFG", mcfg_off, &mcfg);
    place(*b"FACS", facs_off, &facs);
    if let Some(spcr) = &spcr {
        place(*b"SPCR", spcr_off, spcr.as_slice());
    }
    place(*b"DSDT", dsdt_off, dsdt.as_slice());
    debug_assert_eq!(
        (rsdt.len(), xsdt.len()),
        (rsdt_len, xsdt_len),
        "root tables laid out at their real size"
    );

    Ok(AcpiBlob {
        gpa: base,
        bytes,
        tables,
    })
}

#[cfg(test)]
mod tests;
