//! ACPI tables as a guest OS finds them: the RSDP (from the boot protocol or by scanning the BIOS
//! area), the XSDT (or RSDT), the FADT with its fixed-hardware registers, the DSDT's `\_S5`
//! package, the MADT and the MCFG. Everything runs in ring 3 reading physical memory through the
//! identity map; every address and length comes from the tables, so each read is bounds checked.

use crate::boot::{BOOT_INFO, BOOT_KIND, BOOT_LINUX, BOOT_PVH};
use crate::bootinfo::{read, readable};
use core::sync::atomic::Ordering;

const SDT_HEADER_LEN: u32 = 36;
/// Tables longer than this are treated as corrupt (bhyve's and QEMU's are a few KiB).
const MAX_TABLE_LEN: u32 = 1 << 20;
const MAX_TABLES: usize = 32;
const PVH_MAGIC: u32 = 0x336e_c578;
/// `boot_params.acpi_rsdp_addr`.
const BOOT_PARAMS_RSDP: u64 = 0x70;
/// `hvm_start_info.rsdp_paddr`.
const PVH_RSDP: u64 = 32;
/// FADT flag: the reset register is valid.
const FADT_RESET_REG_SUP: u32 = 1 << 10;
/// FADT flag: the PM timer counts 32 bits (24 otherwise).
const FADT_TMR_VAL_EXT: u32 = 1 << 8;
const GAS_SYSTEM_IO: u8 = 1;

/// Reads a `T` at physical address `addr` if it lies in the identity map.
fn phys<T: Copy>(addr: u64) -> Option<T> {
    readable(addr, core::mem::size_of::<T>() as u64).then(|| read(addr))
}

/// Byte sum of `len` bytes at `addr` (zero for a valid ACPI checksum).
fn byte_sum(addr: u64, len: u32) -> Option<u8> {
    if !readable(addr, len.into()) {
        return None;
    }
    Some((0..u64::from(len)).fold(0u8, |sum, i| sum.wrapping_add(read::<u8>(addr + i))))
}

fn ok(good: bool) -> &'static str {
    if good {
        "ok"
    } else {
        "BAD"
    }
}

/// A signature or OEM id as text (non-printable bytes shown as '?', trailing blanks dropped).
pub struct Sig<const N: usize>(pub [u8; N]);

impl<const N: usize> core::fmt::Display for Sig<N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let used = self.0.iter().rposition(|&b| b != b' ').map_or(0, |i| i + 1);
        for &b in &self.0[..used] {
            let c = if b.is_ascii_graphic() || b == b' ' {
                char::from(b)
            } else {
                '?'
            };
            core::fmt::Write::write_char(f, c)?;
        }
        Ok(())
    }
}

/// One system description table: where it is, how long, and whether its checksum holds.
#[derive(Clone, Copy)]
pub struct Table {
    pub addr: u64,
    pub signature: [u8; 4],
    pub len: u32,
    pub checksum_ok: bool,
}

impl Table {
    fn at(addr: u64) -> Option<Table> {
        let signature: [u8; 4] = phys(addr)?;
        let len: u32 = phys(addr + 4)?;
        if !(SDT_HEADER_LEN..=MAX_TABLE_LEN).contains(&len) || !readable(addr, len.into()) {
            return None;
        }
        Some(Table {
            addr,
            signature,
            len,
            checksum_ok: byte_sum(addr, len) == Some(0),
        })
    }

    fn u8_at(&self, offset: u32) -> Option<u8> {
        (offset < self.len).then(|| read(self.addr + u64::from(offset)))
    }

    fn u16_at(&self, offset: u32) -> Option<u16> {
        (offset + 2 <= self.len).then(|| read(self.addr + u64::from(offset)))
    }

    fn u32_at(&self, offset: u32) -> Option<u32> {
        (offset + 4 <= self.len).then(|| read(self.addr + u64::from(offset)))
    }

    fn u64_at(&self, offset: u32) -> Option<u64> {
        (offset + 8 <= self.len).then(|| read(self.addr + u64::from(offset)))
    }
}

/// A generic address structure reduced to what the guest uses: I/O port or memory address.
#[derive(Clone, Copy)]
pub struct Gas {
    pub space: u8,
    pub address: u64,
}

/// The FADT fields this guest uses.
#[derive(Clone, Copy, Default)]
pub struct Fadt {
    pub sci_int: u16,
    pub smi_cmd: u32,
    pub acpi_enable: u8,
    pub pm1a_evt: u32,
    pub pm1a_cnt: u32,
    pub pm_tmr: u32,
    pub timer_32bit: bool,
    pub reset: Option<(Gas, u8)>,
    pub dsdt: u64,
}

impl Fadt {
    fn parse(t: &Table) -> Fadt {
        let flags = t.u32_at(112).unwrap_or(0);
        let reset = (flags & FADT_RESET_REG_SUP != 0)
            .then(|| {
                let space = t.u8_at(116)?;
                let address = t.u64_at(120)?;
                Some((Gas { space, address }, t.u8_at(128)?))
            })
            .flatten();
        // X_DSDT wins over DSDT when present (ACPI 2.0+).
        let dsdt = t
            .u64_at(140)
            .filter(|&x| x != 0)
            .or_else(|| t.u32_at(40).map(u64::from))
            .unwrap_or(0);
        Fadt {
            sci_int: t.u16_at(46).unwrap_or(0),
            smi_cmd: t.u32_at(48).unwrap_or(0),
            acpi_enable: t.u8_at(52).unwrap_or(0),
            pm1a_evt: t.u32_at(56).unwrap_or(0),
            pm1a_cnt: t.u32_at(64).unwrap_or(0),
            pm_tmr: t.u32_at(76).unwrap_or(0),
            timer_32bit: flags & FADT_TMR_VAL_EXT != 0,
            reset,
            dsdt,
        }
    }

    /// PM1a event block as an I/O port (status at +0, enable at +len/2 = +2).
    pub fn pm1a_evt_port(&self) -> Option<u16> {
        u16::try_from(self.pm1a_evt).ok().filter(|&p| p != 0)
    }

    pub fn pm1a_cnt_port(&self) -> Option<u16> {
        u16::try_from(self.pm1a_cnt).ok().filter(|&p| p != 0)
    }

    pub fn pm_tmr_port(&self) -> Option<u16> {
        u16::try_from(self.pm_tmr).ok().filter(|&p| p != 0)
    }

    pub fn smi_cmd_port(&self) -> Option<u16> {
        u16::try_from(self.smi_cmd).ok().filter(|&p| p != 0)
    }
}

/// Where the RSDP was found.
#[derive(Clone, Copy)]
pub enum RsdpSource {
    BootParams,
    Pvh,
    Scan,
}

impl RsdpSource {
    fn name(self) -> &'static str {
        match self {
            RsdpSource::BootParams => "boot_params",
            RsdpSource::Pvh => "pvh",
            RsdpSource::Scan => "scan",
        }
    }
}

/// Everything discovered from the tables.
pub struct Acpi {
    pub rsdp: u64,
    pub source: RsdpSource,
    pub revision: u8,
    pub checksum_ok: bool,
    /// `None` for a revision 0 RSDP, which has no extended checksum.
    pub ext_checksum_ok: Option<bool>,
    /// The root table walked (XSDT, or RSDT when there is no usable XSDT).
    pub root: Option<Table>,
    pub tables: [Option<Table>; MAX_TABLES],
    /// Entries in the root table that did not point at a readable table.
    pub unreadable: usize,
    pub fadt: Option<Fadt>,
    pub dsdt: Option<Table>,
}

fn rsdp_valid(addr: u64) -> bool {
    phys::<[u8; 8]>(addr) == Some(*b"RSD PTR ") && byte_sum(addr, 20) == Some(0)
}

/// The RSDP: the boot protocol's pointer if it has one, else the first valid signature on a
/// 16-byte boundary in 0xE0000-0xFFFFF.
fn find_rsdp() -> Option<(u64, RsdpSource)> {
    let info = BOOT_INFO.load(Ordering::Relaxed);
    let handed = match BOOT_KIND.load(Ordering::Relaxed) {
        BOOT_LINUX => phys::<u64>(info + BOOT_PARAMS_RSDP).map(|a| (a, RsdpSource::BootParams)),
        BOOT_PVH if phys::<u32>(info) == Some(PVH_MAGIC) => {
            phys::<u64>(info + PVH_RSDP).map(|a| (a, RsdpSource::Pvh))
        }
        _ => None,
    };
    if let Some((addr, source)) = handed.filter(|&(a, _)| a != 0 && rsdp_valid(a)) {
        return Some((addr, source));
    }
    (0xe_0000u64..0x10_0000)
        .step_by(16)
        .find(|&a| rsdp_valid(a))
        .map(|a| (a, RsdpSource::Scan))
}

impl Acpi {
    pub fn discover() -> Option<Acpi> {
        let (rsdp, source) = find_rsdp()?;
        let revision: u8 = phys(rsdp + 15)?;
        let ext_checksum_ok = (revision >= 2).then(|| {
            let len: u32 = phys(rsdp + 20).unwrap_or(0);
            (20..=4096).contains(&len) && byte_sum(rsdp, len) == Some(0)
        });
        let mut acpi = Acpi {
            rsdp,
            source,
            revision,
            checksum_ok: byte_sum(rsdp, 20) == Some(0),
            ext_checksum_ok,
            root: None,
            tables: [None; MAX_TABLES],
            unreadable: 0,
            fadt: None,
            dsdt: None,
        };
        let xsdt = if revision >= 2 {
            phys::<u64>(rsdp + 24).filter(|&a| a != 0)
        } else {
            None
        };
        let (root, entry_size) = match xsdt.and_then(Table::at) {
            Some(t) if &t.signature == b"XSDT" => (t, 8),
            _ => {
                let rsdt = u64::from(phys::<u32>(rsdp + 16)?);
                (Table::at(rsdt).filter(|t| &t.signature == b"RSDT")?, 4)
            }
        };
        acpi.root = Some(root);
        let entries = ((root.len - SDT_HEADER_LEN) / entry_size) as usize;
        let mut count = 0;
        for i in 0..entries as u32 {
            let offset = SDT_HEADER_LEN + i * entry_size;
            let addr = if entry_size == 8 {
                root.u64_at(offset)
            } else {
                root.u32_at(offset).map(u64::from)
            };
            match addr.and_then(Table::at) {
                Some(t) if count < MAX_TABLES => {
                    acpi.tables[count] = Some(t);
                    count += 1;
                }
                _ => acpi.unreadable += 1,
            }
        }
        if let Some(fadt) = acpi.table(b"FACP") {
            let parsed = Fadt::parse(&fadt);
            acpi.dsdt = Table::at(parsed.dsdt).filter(|t| &t.signature == b"DSDT");
            acpi.fadt = Some(parsed);
        }
        Some(acpi)
    }

    pub fn tables(&self) -> impl Iterator<Item = &Table> {
        self.tables.iter().flatten()
    }

    pub fn table(&self, signature: &[u8; 4]) -> Option<Table> {
        self.tables().find(|t| &t.signature == signature).copied()
    }

    /// ECAM base, segment and bus range of the first MCFG allocation.
    pub fn mcfg(&self) -> Option<(u64, u16, u8, u8)> {
        let t = self.table(b"MCFG")?;
        // Header, 8 reserved bytes, then 16-byte allocations.
        Some((t.u64_at(44)?, t.u16_at(52)?, t.u8_at(54)?, t.u8_at(55)?))
    }

    /// The HPET table: hardware block id, the register block's address space and address,
    /// and the page-protection flags.
    pub fn hpet(&self) -> Option<(u32, Gas, u8)> {
        let t = self.table(b"HPET")?;
        let block = Gas {
            space: t.u8_at(40)?,
            address: t.u64_at(44)?,
        };
        Some((t.u32_at(36)?, block, t.u8_at(55)?))
    }

    /// SLP_TYPa for S5 from the DSDT's `\_S5` package.
    pub fn s5_slp_typ(&self) -> Option<u8> {
        s5_from_dsdt(&self.dsdt?)
    }
}

/// Finds `Name (_S5, Package () { a, ... })` in the DSDT's AML and returns `a`. The package may
/// be written with or without a root prefix; its first element is a ZeroOp, OneOp or an integer
/// with a byte, word or dword prefix.
fn s5_from_dsdt(dsdt: &Table) -> Option<u8> {
    let len = u64::from(dsdt.len);
    let body = dsdt.addr + u64::from(SDT_HEADER_LEN);
    let end = dsdt.addr + len;
    let byte = |a: u64| (a < end).then(|| read::<u8>(a));
    let mut at = body;
    while at + 4 <= end {
        if read::<[u8; 4]>(at) != *b"_S5_" {
            at += 1;
            continue;
        }
        let name_op = match byte(at - 1)? {
            b'\\' => byte(at - 2)?,
            b => b,
        };
        let mut p = at + 4;
        if name_op != 0x08 || byte(p)? != 0x12 {
            at += 1;
            continue;
        }
        // PkgLength: the top two bits of the lead byte count the extra length bytes.
        let lead = byte(p + 1)?;
        p += 2 + u64::from(lead >> 6);
        p += 1; // NumElements
        return match byte(p)? {
            0x00 => Some(0),
            0x01 => Some(1),
            // Byte, word or dword prefix: SLP_TYP fits in the low byte.
            0x0a..=0x0c => byte(p + 1),
            _ => None,
        };
    }
    None
}

/// `acpi`: the RSDP, every table with its checksum, then the FADT, DSDT, MADT and MCFG.
pub fn command() {
    let Some(acpi) = Acpi::discover() else {
        println!("acpi: no RSDP found");
        return;
    };
    println!(
        "rsdp {:#x} from {} revision {} checksum {} extended {}",
        acpi.rsdp,
        acpi.source.name(),
        acpi.revision,
        ok(acpi.checksum_ok),
        match acpi.ext_checksum_ok {
            Some(good) => ok(good),
            None => "n/a",
        }
    );
    for t in acpi
        .root
        .iter()
        .chain(acpi.tables())
        .chain(acpi.dsdt.iter())
    {
        println!(
            "table {} at {:#x} length {} checksum {}",
            Sig(t.signature),
            t.addr,
            t.len,
            ok(t.checksum_ok)
        );
    }
    if acpi.unreadable > 0 {
        println!("tables unreadable {}", acpi.unreadable);
    }
    if let Some(f) = &acpi.fadt {
        println!(
            "fadt pm1a_evt {:#x} pm1a_cnt {:#x} pm_tmr {:#x} {} smi_cmd {:#x} acpi_enable {:#x} sci {}",
            f.pm1a_evt,
            f.pm1a_cnt,
            f.pm_tmr,
            if f.timer_32bit { "32-bit" } else { "24-bit" },
            f.smi_cmd,
            f.acpi_enable,
            f.sci_int
        );
        match f.reset {
            Some((gas, value)) => println!(
                "fadt reset {} {:#x} value {:#x}",
                if gas.space == GAS_SYSTEM_IO {
                    "io"
                } else {
                    "mem"
                },
                gas.address,
                value
            ),
            None => println!("fadt reset none"),
        }
    }
    if let Some(d) = &acpi.dsdt {
        let revision: u8 = read(d.addr + 8);
        let oem: [u8; 6] = read(d.addr + 10);
        print!(
            "dsdt at {:#x} length {} revision {revision} oem {} checksum {}",
            d.addr,
            d.len,
            Sig(oem),
            ok(d.checksum_ok)
        );
        match acpi.s5_slp_typ() {
            Some(s5) => println!(" s5 {s5}"),
            None => println!(" s5 none"),
        }
    }
    if let Some(madt) = acpi.table(b"APIC") {
        print_madt(&madt);
    }
    if let Some((base, segment, first, last)) = acpi.mcfg() {
        println!("mcfg base {base:#x} segment {segment} bus {first}-{last}");
    }
}

/// The MADT's interrupt controller structures as (type, offset in the table, length); a
/// malformed length ends the walk and is yielded as the last item with type `None`.
fn madt_entries(t: &Table) -> impl Iterator<Item = (Option<u8>, u32, u8)> + '_ {
    let mut at = 44u32;
    let mut done = false;
    core::iter::from_fn(move || {
        if done || at + 2 > t.len {
            return None;
        }
        let (kind, len) = (t.u8_at(at)?, t.u8_at(at + 1)?);
        let here = at;
        if len < 2 || at + u32::from(len) > t.len {
            done = true;
            return Some((None, here, len));
        }
        at += u32::from(len);
        Some((Some(kind), here, len))
    })
}

impl Acpi {
    /// Enabled processors (local APIC and x2APIC entries) in the MADT.
    pub fn enabled_cpus(&self) -> Option<u32> {
        let t = self.table(b"APIC")?;
        let count = madt_entries(&t)
            .filter(|&(kind, at, len)| match (kind, len) {
                (Some(0), 8) => t.u32_at(at + 4).unwrap_or(0) & 1 != 0,
                (Some(9), 16) => t.u32_at(at + 8).unwrap_or(0) & 1 != 0,
                _ => false,
            })
            .count();
        u32::try_from(count).ok().filter(|&n| n > 0)
    }
}

fn print_madt(t: &Table) {
    println!(
        "madt lapic_addr {:#x} flags {:#x}",
        t.u32_at(36).unwrap_or(0),
        t.u32_at(40).unwrap_or(0)
    );
    let enabled = |flags: u32| {
        if flags & 1 != 0 {
            "enabled"
        } else {
            "disabled"
        }
    };
    for (kind, at, len) in madt_entries(t) {
        let Some(kind) = kind else {
            println!("madt entry at {at} has bad length {len}");
            break;
        };
        match (kind, len) {
            (0, 8) => println!(
                "madt lapic uid {} apic {} {}",
                t.u8_at(at + 2).unwrap_or(0),
                t.u8_at(at + 3).unwrap_or(0),
                enabled(t.u32_at(at + 4).unwrap_or(0))
            ),
            (1, 12) => println!(
                "madt ioapic id {} address {:#x} gsi_base {}",
                t.u8_at(at + 2).unwrap_or(0),
                t.u32_at(at + 4).unwrap_or(0),
                t.u32_at(at + 8).unwrap_or(0)
            ),
            (2, 10) => println!(
                "madt override bus {} irq {} gsi {} flags {:#x}",
                t.u8_at(at + 2).unwrap_or(0),
                t.u8_at(at + 3).unwrap_or(0),
                t.u32_at(at + 4).unwrap_or(0),
                t.u16_at(at + 8).unwrap_or(0)
            ),
            (9, 16) => println!(
                "madt x2apic uid {} apic {} {}",
                t.u32_at(at + 12).unwrap_or(0),
                t.u32_at(at + 4).unwrap_or(0),
                enabled(t.u32_at(at + 8).unwrap_or(0))
            ),
            (4, 6) => println!(
                "madt nmi uid {:#x} lint {}",
                t.u8_at(at + 2).unwrap_or(0),
                t.u8_at(at + 5).unwrap_or(0)
            ),
            _ => println!("madt type {kind} length {len}"),
        }
    }
}
