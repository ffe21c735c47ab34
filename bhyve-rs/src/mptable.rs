//! Intel MultiProcessor Specification 1.4 table, laid out as FreeBSD's
//! `usr.sbin/bhyve/amd64/mptbl.c` builds it.
//!
//! The blob goes at [`MPTABLE_BASE`] (0xF0000, in the BIOS area a guest scans for `_MP_`): a
//! 16-byte floating pointer followed by the configuration table with, in this order, one
//! processor entry per vCPU (APIC id = vCPU index, vCPU 0 the bootstrap processor), the bus
//! entries PCI (id 0) and ISA (id 1), the I/O APIC, 16 I/O interrupt entries for the ISA IRQs
//! (pin 0 ExtINT, IRQ 0 on pin 2, the SCI on pin 9 active-low level, the rest identity-mapped),
//! one entry per routed PCI INTx pin, and the two local interrupt entries (LINT0 ExtINT, LINT1
//! NMI on every CPU).
//!
//! bhyve builds the table unless `x86.mptable` is false (`-Y`); that choice is the caller's.
//! Like bhyve, a machine with PCI devices on a bus other than 0 cannot be described: pass
//! only bus-0 routes, or skip the table.

use crate::config::Config;
use crate::devices::pm::SCI_INT;

/// `x86.mptable` (default true; `-Y` sets it false): whether to build the table at all.
pub fn mptable_enabled(config: &Config) -> Result<bool, String> {
    Ok(config.get_bool("x86.mptable")?.unwrap_or(true))
}

/// Guest-physical address of the floating pointer.
pub const MPTABLE_BASE: u64 = 0xF0000;
/// Room bhyve reserves: the floating pointer plus the largest configuration table.
pub const MPTABLE_MAX_LENGTH: usize = 65536 + 16;

const LAPIC_PADDR: u32 = 0xFEE0_0000;
const LAPIC_VERSION: u8 = 16;
const IOAPIC_VERSION: u8 = 0x11;
const MP_SPECREV: u8 = 4;
const MPCH_OEMID: &[u8; 8] = b"BHyVe   ";
const MPCH_PRODID: &[u8; 12] = b"Hypervisor  ";
/// Family 6, model 26, stepping 5, as bhyve reports.
const MPEP_SIG: u32 = (6 << 8) | (26 << 4) | 5;
const MPEP_FEATURES: u32 = 0xBFEB_FBFF;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INT: u8 = 3;
const ENTRY_LOCAL_INT: u8 = 4;

const PROCENTRY_FLAG_EN: u8 = 0x01;
const PROCENTRY_FLAG_BP: u8 = 0x02;
const IOAPICENTRY_FLAG_EN: u8 = 0x01;

const INTENTRY_TYPE_INT: u8 = 0;
const INTENTRY_TYPE_NMI: u8 = 1;
const INTENTRY_TYPE_EXTINT: u8 = 3;
const INTENTRY_FLAGS_POLARITY_ACTIVELO: u16 = 0x3;
const INTENTRY_FLAGS_TRIGGER_LEVEL: u16 = 0xc;

const PCI_BUS_ID: u8 = 0;
const ISA_BUS_ID: u8 = 1;

/// Sizes of the structures, fixed by the specification.
pub const FLOATING_POINTER_LEN: usize = 16;
pub const CONFIG_HEADER_LEN: usize = 44;
pub const PROCESSOR_ENTRY_LEN: usize = 20;
pub const SMALL_ENTRY_LEN: usize = 8;

/// One PCI INTx pin that has an I/O APIC input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIntxRoute {
    pub bus: u8,
    /// Slot (device) number, 0..32.
    pub slot: u8,
    /// INTA# = 1 … INTD# = 4.
    pub pin: u8,
    /// I/O APIC input the pin is wired to.
    pub ioapic_irq: u8,
    /// PIRQ link (1 = A … 8 = H) the pin reaches the 8259s through.
    pub pirq_pin: u8,
}

/// What the MP table describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MpTableLayout {
    /// Number of vCPUs; APIC ids are 0..cpus.
    pub cpus: u16,
    /// bhyve uses 0.
    pub ioapic_id: u8,
    /// bhyve uses 0xFEC00000.
    pub ioapic_address: u32,
    /// Routed PCI INTx pins, in bus/slot/pin order.
    pub pci_intx: Vec<PciIntxRoute>,
}

impl MpTableLayout {
    /// bhyve's machine: one I/O APIC with id 0 at 0xFEC00000.
    pub fn new(cpus: u16) -> Self {
        Self {
            cpus,
            ioapic_id: 0,
            ioapic_address: 0xFEC0_0000,
            pci_intx: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MpTableError {
    #[error("an MP table needs between 1 and 255 vCPUs, not {0}")]
    CpuCount(u16),
    #[error(
        "MP table is incompatible with multiple PCI hierarchies (PCI bus {0}); \
         disable it with -Y"
    )]
    MultiplePciBuses(u8),
    #[error("PCI INTx pin {0} is not between 1 and 4")]
    InvalidPin(u8),
    #[error("MP table would be {0} bytes, more than bhyve reserves")]
    TooLarge(usize),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

fn interrupt_entry(
    kind: u8,
    int_type: u8,
    flags: u16,
    src_bus: u8,
    src_irq: u8,
    dst_apic: u8,
    dst_int: u8,
) -> [u8; SMALL_ENTRY_LEN] {
    let f = flags.to_le_bytes();
    [
        kind, int_type, f[0], f[1], src_bus, src_irq, dst_apic, dst_int,
    ]
}

/// Build the floating pointer and configuration table for a table placed at `gpa` (normally
/// [`MPTABLE_BASE`]); the result is copied to guest memory at `gpa` as is.
pub fn build_mptable(layout: &MpTableLayout, gpa: u32) -> Result<Vec<u8>, MpTableError> {
    if layout.cpus == 0 || layout.cpus > 255 {
        return Err(MpTableError::CpuCount(layout.cpus));
    }
    if let Some(route) = layout.pci_intx.iter().find(|r| r.bus != 0) {
        return Err(MpTableError::MultiplePciBuses(route.bus));
    }
    if let Some(route) = layout.pci_intx.iter().find(|r| !(1..=4).contains(&r.pin)) {
        return Err(MpTableError::InvalidPin(route.pin));
    }

    let mut entries: Vec<u8> = Vec::new();
    let mut entry_count: u16 = 0;

    for cpu in 0..layout.cpus {
        let mut flags = PROCENTRY_FLAG_EN;
        if cpu == 0 {
            flags |= PROCENTRY_FLAG_BP;
        }
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu as u8, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&MPEP_SIG.to_le_bytes());
        entries.extend_from_slice(&MPEP_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        entry_count += 1;
    }

    for (id, name) in [(PCI_BUS_ID, b"PCI   "), (ISA_BUS_ID, b"ISA   ")] {
        entries.extend_from_slice(&[ENTRY_BUS, id]);
        entries.extend_from_slice(name);
        entry_count += 1;
    }

    entries.extend_from_slice(&[
        ENTRY_IOAPIC,
        layout.ioapic_id,
        IOAPIC_VERSION,
        IOAPICENTRY_FLAG_EN,
    ]);
    entries.extend_from_slice(&layout.ioapic_address.to_le_bytes());
    entry_count += 1;

    for pin in 0u8..16 {
        let (int_type, flags, src_irq) = match pin {
            0 => (INTENTRY_TYPE_EXTINT, 0, 0),
            2 => (INTENTRY_TYPE_INT, 0, 0),
            p if u32::from(p) == SCI_INT => (
                INTENTRY_TYPE_INT,
                INTENTRY_FLAGS_POLARITY_ACTIVELO | INTENTRY_FLAGS_TRIGGER_LEVEL,
                p,
            ),
            p => (INTENTRY_TYPE_INT, 0, p),
        };
        entries.extend_from_slice(&interrupt_entry(
            ENTRY_INT,
            int_type,
            flags,
            ISA_BUS_ID,
            src_irq,
            layout.ioapic_id,
            pin,
        ));
        entry_count += 1;
    }

    for route in &layout.pci_intx {
        entries.extend_from_slice(&interrupt_entry(
            ENTRY_INT,
            INTENTRY_TYPE_INT,
            0,
            route.bus,
            (route.slot << 2) | (route.pin - 1),
            layout.ioapic_id,
            route.ioapic_irq,
        ));
        entry_count += 1;
    }

    for (int_type, lint) in [(INTENTRY_TYPE_EXTINT, 0u8), (INTENTRY_TYPE_NMI, 1u8)] {
        entries.extend_from_slice(&interrupt_entry(
            ENTRY_LOCAL_INT,
            int_type,
            0,
            0,
            0,
            0xff,
            lint,
        ));
        entry_count += 1;
    }

    let base_table_length = CONFIG_HEADER_LEN + entries.len();
    if FLOATING_POINTER_LEN + base_table_length > MPTABLE_MAX_LENGTH {
        return Err(MpTableError::TooLarge(
            FLOATING_POINTER_LEN + base_table_length,
        ));
    }

    let mut out = Vec::with_capacity(FLOATING_POINTER_LEN + base_table_length);

    // Floating pointer: "_MP_", config table address, length in 16-byte units, revision,
    // checksum, five feature bytes (0: a configuration table is present).
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&gpa.wrapping_add(FLOATING_POINTER_LEN as u32).to_le_bytes());
    out.extend_from_slice(&[1, MP_SPECREV, 0, 0, 0, 0, 0, 0]);
    out[10] = checksum(&out[..FLOATING_POINTER_LEN]);

    let header_start = out.len();
    out.extend_from_slice(b"PCMP");
    out.extend_from_slice(&(base_table_length as u16).to_le_bytes());
    out.extend_from_slice(&[MP_SPECREV, 0]);
    out.extend_from_slice(MPCH_OEMID);
    out.extend_from_slice(MPCH_PRODID);
    out.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    out.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    out.extend_from_slice(&entry_count.to_le_bytes());
    out.extend_from_slice(&LAPIC_PADDR.to_le_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    out.extend_from_slice(&entries);
    out[header_start + 7] = checksum(&out[header_start..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn parse(blob: &[u8], gpa: u32) -> (u16, Vec<u8>) {
        assert_eq!(&blob[..4], b"_MP_");
        assert_eq!(sum(&blob[..16]), 0, "floating pointer checksum");
        let pap = u32::from_le_bytes(blob[4..8].try_into().unwrap());
        let config = &blob[(pap - gpa) as usize..];
        assert_eq!(&config[..4], b"PCMP");
        let len = u16::from_le_bytes([config[4], config[5]]) as usize;
        assert_eq!(len, config.len());
        assert_eq!(sum(&config[..len]), 0, "configuration table checksum");
        let count = u16::from_le_bytes([config[34], config[35]]);
        // Walk the entries by their type to find each one's length.
        let mut types = Vec::new();
        let mut at = CONFIG_HEADER_LEN;
        while at < len {
            types.push(config[at]);
            at += if config[at] == ENTRY_PROCESSOR {
                PROCESSOR_ENTRY_LEN
            } else {
                SMALL_ENTRY_LEN
            };
        }
        assert_eq!(at, len);
        (count, types)
    }

    #[test]
    fn checksums_are_valid_and_entries_match_the_count() {
        for cpus in [1u16, 4, 255] {
            let blob = build_mptable(&MpTableLayout::new(cpus), MPTABLE_BASE as u32).unwrap();
            let (count, types) = parse(&blob, MPTABLE_BASE as u32);
            assert_eq!(count as usize, types.len());
            let n = |t| types.iter().filter(|&&x| x == t).count();
            assert_eq!(n(ENTRY_PROCESSOR), cpus as usize);
            assert_eq!(n(ENTRY_BUS), 2);
            assert_eq!(n(ENTRY_IOAPIC), 1);
            assert_eq!(n(ENTRY_INT), 16);
            assert_eq!(n(ENTRY_LOCAL_INT), 2);
        }
    }

    #[test]
    fn only_the_first_processor_is_the_bootstrap_processor() {
        let blob = build_mptable(&MpTableLayout::new(3), MPTABLE_BASE as u32).unwrap();
        let first = FLOATING_POINTER_LEN + CONFIG_HEADER_LEN;
        for cpu in 0..3 {
            let e = &blob[first + cpu * PROCESSOR_ENTRY_LEN..];
            assert_eq!(e[1], cpu as u8, "APIC id");
            let bp = e[3] & PROCENTRY_FLAG_BP != 0;
            assert_eq!(bp, cpu == 0);
            assert_ne!(e[3] & PROCENTRY_FLAG_EN, 0);
        }
    }

    #[test]
    fn pci_routes_add_interrupt_entries_and_sci_is_level_low() {
        let mut layout = MpTableLayout::new(2);
        layout.pci_intx.push(PciIntxRoute {
            bus: 0,
            slot: 3,
            pin: 2,
            ioapic_irq: 17,
            pirq_pin: 2,
        });
        let blob = build_mptable(&layout, MPTABLE_BASE as u32).unwrap();
        let (count, types) = parse(&blob, MPTABLE_BASE as u32);
        assert_eq!(types.iter().filter(|&&t| t == ENTRY_INT).count(), 17);
        assert_eq!(count as usize, 2 + 2 + 1 + 17 + 2);
        let ints = FLOATING_POINTER_LEN + CONFIG_HEADER_LEN + 2 * PROCESSOR_ENTRY_LEN + 3 * 8;
        let sci = &blob[ints + 9 * 8..ints + 10 * 8];
        assert_eq!(u16::from_le_bytes([sci[2], sci[3]]), 0xf);
        assert_eq!((sci[5], sci[7]), (9, 9));
        let pci = &blob[ints + 16 * 8..ints + 17 * 8];
        assert_eq!((pci[4], pci[5], pci[7]), (0, (3 << 2) | 1, 17));
    }

    #[test]
    fn minus_y_turns_the_table_off() {
        let mut config = Config::new();
        assert_eq!(mptable_enabled(&config), Ok(true));
        config.set("x86.mptable", "false");
        assert_eq!(mptable_enabled(&config), Ok(false));
    }

    #[test]
    fn unsupported_machines_are_refused() {
        let mut layout = MpTableLayout::new(1);
        layout.pci_intx.push(PciIntxRoute {
            bus: 1,
            slot: 0,
            pin: 1,
            ioapic_irq: 16,
            pirq_pin: 1,
        });
        assert_eq!(
            build_mptable(&layout, 0xF0000),
            Err(MpTableError::MultiplePciBuses(1))
        );
        assert_eq!(
            build_mptable(&MpTableLayout::new(0), 0xF0000),
            Err(MpTableError::CpuCount(0))
        );
    }
}
