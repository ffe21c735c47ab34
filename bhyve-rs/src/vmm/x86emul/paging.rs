//! Guest linear-to-physical translation: the walk a FreeBSD backend needs for `PAGING` exits,
//! for the RAM side of MOVS/PUSH/POP and for fetching instruction bytes (FreeBSD's
//! `vm_gla2gpa`). No paging, 32-bit (4 KiB and 4 MiB pages), PAE, and 4- and 5-level long
//! mode (4 KiB, 2 MiB and 1 GiB pages). Accessed bits are set on every level and the dirty bit
//! on the last level for writes, as the MMU does.
//!
//! As FreeBSD's walk: CR0.WP, CR4.PSE and the NX bit are not looked at (a supervisor write to
//! a read-only page faults; large pages are honoured whenever PS is set).

use super::{CpuMode, Exception, GuestBus, Paging, PagingMode};

const PG_V: u64 = 1 << 0;
const PG_RW: u64 = 1 << 1;
const PG_U: u64 = 1 << 2;
const PG_A: u64 = 1 << 5;
const PG_M: u64 = 1 << 6;
const PG_PS: u64 = 1 << 7;

/// Page-fault error code bits.
const PGEX_P: u32 = 1 << 0;
const PGEX_W: u32 = 1 << 1;
const PGEX_U: u32 = 1 << 2;
const PGEX_RSV: u32 = 1 << 3;
const PGEX_I: u32 = 1 << 4;

/// What the access wants to do with the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    /// An instruction fetch (a read that sets the I/D bit of a page fault's error code).
    Fetch,
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::Fetch => "instruction fetch",
        })
    }
}

/// Why a linear address could not be translated. All but [`TranslateError::TableNotInRam`]
/// are the guest's own faults, delivered as [`TranslateError::exception`] says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    #[error("linear address {gla:#x} is not canonical")]
    NonCanonical { gla: u64 },
    #[error("linear address {gla:#x} is not mapped: the level-{level} entry is not present")]
    NotPresent {
        gla: u64,
        level: u8,
        error_code: u32,
    },
    #[error("linear address {gla:#x}: the level-{level} entry forbids this {access}")]
    Protection {
        gla: u64,
        level: u8,
        access: Access,
        error_code: u32,
    },
    #[error("linear address {gla:#x}: the level-{level} entry sets a reserved bit")]
    Reserved {
        gla: u64,
        level: u8,
        error_code: u32,
    },
    #[error("the guest page table at {gpa:#x} is not in guest RAM")]
    TableNotInRam { gpa: u64 },
}

impl TranslateError {
    /// The exception the guest takes for this fault (`None`: the fault is the host's).
    pub fn exception(&self) -> Option<Exception> {
        match *self {
            TranslateError::NonCanonical { .. } => Some(Exception::gp()),
            TranslateError::NotPresent {
                gla, error_code, ..
            }
            | TranslateError::Protection {
                gla, error_code, ..
            }
            | TranslateError::Reserved {
                gla, error_code, ..
            } => Some(Exception::page_fault(error_code, gla)),
            TranslateError::TableNotInRam { .. } => None,
        }
    }
}

/// Whether `gla` is canonical for `cpu_mode` (only 64-bit mode has non-canonical addresses;
/// 48-bit linear addresses as FreeBSD checks them).
pub fn is_canonical(cpu_mode: CpuMode, gla: u64) -> bool {
    if cpu_mode != CpuMode::Long64 {
        return true;
    }
    let top = gla >> 47;
    top == 0 || top == (1 << 17) - 1
}

fn error_code(usermode: bool, access: Access, reserved: bool, entry: u64) -> u32 {
    let mut code = 0;
    if entry & PG_V != 0 {
        code |= PGEX_P;
    }
    if access == Access::Write {
        code |= PGEX_W;
    }
    if usermode {
        code |= PGEX_U;
    }
    if reserved {
        code |= PGEX_RSV;
    }
    if access == Access::Fetch {
        code |= PGEX_I;
    }
    code
}

fn read_entry(
    bus: &mut (impl GuestBus + ?Sized),
    gpa: u64,
    wide: bool,
) -> Result<u64, TranslateError> {
    let mut buf = [0u8; 8];
    let len = if wide { 8 } else { 4 };
    if !bus.ram_read(gpa, &mut buf[..len]) {
        return Err(TranslateError::TableNotInRam { gpa });
    }
    Ok(u64::from_le_bytes(buf))
}

fn write_entry(
    bus: &mut (impl GuestBus + ?Sized),
    gpa: u64,
    value: u64,
    wide: bool,
) -> Result<(), TranslateError> {
    let len = if wide { 8 } else { 4 };
    if !bus.ram_write(gpa, &value.to_le_bytes()[..len]) {
        return Err(TranslateError::TableNotInRam { gpa });
    }
    Ok(())
}

/// Translate `gla` for `access` through the guest's page tables, setting accessed and dirty
/// bits as the MMU would.
pub fn translate(
    paging: &Paging,
    gla: u64,
    access: Access,
    bus: &mut (impl GuestBus + ?Sized),
) -> Result<u64, TranslateError> {
    if !is_canonical(paging.cpu_mode, gla) {
        return Err(TranslateError::NonCanonical { gla });
    }
    let usermode = paging.cpl == 3;
    let writing = access == Access::Write;
    // (levels below the top, bits per level, entry width, table address)
    let (mut levels, bits, wide, mut table) = match paging.paging_mode {
        PagingMode::Flat => return Ok(gla),
        PagingMode::Bits32 => (2u32, 10u32, false, paging.cr3 & 0xffff_f000),
        PagingMode::Pae => {
            // The four PDPTEs, 32-byte aligned below 4 GiB.
            let pdpte_addr = (paging.cr3 & 0xffff_ffe0) + ((gla >> 30) & 3) * 8;
            let pdpte = read_entry(bus, pdpte_addr, true)?;
            if pdpte & PG_V == 0 {
                return Err(TranslateError::NotPresent {
                    gla,
                    level: 3,
                    error_code: error_code(usermode, access, false, pdpte),
                });
            }
            (2, 9, true, pdpte & 0x000f_ffff_ffff_f000)
        }
        PagingMode::Long4 => (4, 9, true, paging.cr3 & 0x000f_ffff_ffff_f000),
        PagingMode::Long5 => (5, 9, true, paging.cr3 & 0x000f_ffff_ffff_f000),
    };
    let address_mask: u64 = if wide {
        0x000f_ffff_ffff_f000
    } else {
        0xffff_f000
    };
    loop {
        levels -= 1;
        let shift = 12 + levels * bits;
        let index = (gla >> shift) & ((1 << bits) - 1);
        let entry_addr = table + index * if wide { 8 } else { 4 };
        let entry = read_entry(bus, entry_addr, wide)?;
        let level = (levels + 1) as u8;
        if entry & PG_V == 0 {
            return Err(TranslateError::NotPresent {
                gla,
                level,
                error_code: error_code(usermode, access, false, entry),
            });
        }
        if (usermode && entry & PG_U == 0) || (writing && entry & PG_RW == 0) {
            return Err(TranslateError::Protection {
                gla,
                level,
                access,
                error_code: error_code(usermode, access, false, entry),
            });
        }
        let mut updated = entry | PG_A;
        let large = levels > 0 && entry & PG_PS != 0;
        if large && wide && shift > 30 {
            // Pages larger than 1 GiB do not exist: PS is reserved at the PML4/PML5 level.
            return Err(TranslateError::Reserved {
                gla,
                level,
                error_code: error_code(usermode, access, true, entry),
            });
        }
        let last = levels == 0 || large;
        if last && writing {
            updated |= PG_M;
        }
        if updated != entry {
            write_entry(bus, entry_addr, updated, wide)?;
        }
        if last {
            let page_mask = (1u64 << shift) - 1;
            let frame = entry & address_mask & !page_mask;
            return Ok(frame | (gla & page_mask));
        }
        table = entry & address_mask;
    }
}

/// Fetch up to 15 instruction bytes at linear address `rip`, page by page. Fewer come back
/// when a later page cannot be translated (the instruction may still fit); a fault on the
/// first byte is an error.
pub fn fetch_instruction(
    paging: &Paging,
    rip: u64,
    bus: &mut (impl GuestBus + ?Sized),
) -> Result<([u8; 15], usize), TranslateError> {
    let mut bytes = [0u8; 15];
    let mut have = 0;
    while have < bytes.len() {
        let gla = rip.wrapping_add(have as u64);
        let gpa = match translate(paging, gla, Access::Fetch, bus) {
            Ok(gpa) => gpa,
            Err(e) if have == 0 => return Err(e),
            Err(_) => break,
        };
        let in_page = (0x1000 - (gla & 0xfff)) as usize;
        let n = in_page.min(bytes.len() - have);
        if !bus.ram_read(gpa, &mut bytes[have..have + n]) {
            if have == 0 {
                return Err(TranslateError::TableNotInRam { gpa });
            }
            break;
        }
        have += n;
    }
    Ok((bytes, have))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::AccessFault;

    /// 8 MiB of RAM; nothing else.
    struct Ram(Vec<u8>);

    impl Ram {
        fn new() -> Ram {
            Ram(vec![0; 8 << 20])
        }
        fn put(&mut self, gpa: u64, value: u64) {
            self.0[gpa as usize..gpa as usize + 8].copy_from_slice(&value.to_le_bytes());
        }
        fn put32(&mut self, gpa: u64, value: u32) {
            self.0[gpa as usize..gpa as usize + 4].copy_from_slice(&value.to_le_bytes());
        }
        fn get(&self, gpa: u64) -> u64 {
            let mut b = [0u8; 8];
            b.copy_from_slice(&self.0[gpa as usize..gpa as usize + 8]);
            u64::from_le_bytes(b)
        }
    }

    impl GuestBus for Ram {
        fn mmio_read(&mut self, gpa: u64, _: &mut [u8]) -> Result<(), AccessFault> {
            Err(AccessFault(format!("mmio read {gpa:#x}")))
        }
        fn mmio_write(&mut self, gpa: u64, _: &[u8]) -> Result<(), AccessFault> {
            Err(AccessFault(format!("mmio write {gpa:#x}")))
        }
        fn ram_read(&mut self, gpa: u64, data: &mut [u8]) -> bool {
            super::super::test_ram::read(&self.0, gpa, data)
        }
        fn ram_write(&mut self, gpa: u64, data: &[u8]) -> bool {
            super::super::test_ram::write(&mut self.0, gpa, data)
        }
    }

    const P: u64 = 1;
    const RW: u64 = 2;
    const US: u64 = 4;
    const PS: u64 = 0x80;

    fn long(cr3: u64, cpl: u8) -> Paging {
        Paging {
            cr3,
            cpl,
            cpu_mode: CpuMode::Long64,
            paging_mode: PagingMode::Long4,
        }
    }

    /// PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000, plus a 1 GiB page
    /// at 2 GiB (PDPT[1]), a read-only supervisor 2 MiB page (PD[1]) and a 4 KiB page (PT[5]).
    fn long_tables() -> Ram {
        let mut ram = Ram::new();
        ram.put(0x1000, 0x2000 | P | RW | US);
        ram.put(0x2000, 0x3000 | P | RW | US);
        ram.put(0x2008, 0x8000_0000 | PS | P | RW | US);
        ram.put(0x3000, 0x4000 | P | RW | US);
        ram.put(0x3008, 0x60_0000 | PS | P);
        ram.put(0x4000 + 5 * 8, 0x7000 | P | RW | US | (1 << 63));
        ram
    }

    #[test]
    fn long_mode_walk_finds_4k_2m_and_1g_pages_and_sets_accessed_and_dirty() {
        let mut ram = long_tables();
        let paging = long(0x1000, 0);
        assert_eq!(
            translate(&paging, 0x5123, Access::Read, &mut ram),
            Ok(0x7123)
        );
        // Accessed on every level, dirty only after a write and only on the last level.
        for entry in [0x1000, 0x2000, 0x3000, 0x4028] {
            assert_ne!(ram.get(entry) & PG_A, 0, "{entry:#x}");
            assert_eq!(ram.get(entry) & PG_M, 0, "{entry:#x}");
        }
        assert_eq!(
            translate(&paging, 0x5ff8, Access::Write, &mut ram),
            Ok(0x7ff8)
        );
        assert_ne!(ram.get(0x4028) & PG_M, 0);
        assert_eq!(ram.get(0x3000) & PG_M, 0);
        assert_eq!(
            translate(&paging, 0x20_1234, Access::Read, &mut ram),
            Ok(0x60_1234)
        );
        assert_eq!(
            translate(&paging, 0x7654_3210, Access::Read, &mut ram),
            Ok(0xb654_3210)
        );
    }

    #[test]
    fn long_mode_faults_say_why_and_give_the_page_fault_error_code() {
        let mut ram = long_tables();
        let kernel = long(0x1000, 0);
        let user = long(0x1000, 3);
        let not_present = translate(&kernel, 0x6000, Access::Write, &mut ram).unwrap_err();
        assert_eq!(
            not_present,
            TranslateError::NotPresent {
                gla: 0x6000,
                level: 1,
                error_code: 2
            }
        );
        assert_eq!(
            not_present.exception(),
            Some(Exception::page_fault(2, 0x6000))
        );
        // A write to the read-only 2 MiB page; a user read of the supervisor page.
        assert!(matches!(
            translate(&kernel, 0x20_0000, Access::Write, &mut ram),
            Err(TranslateError::Protection {
                level: 2,
                error_code: 3,
                ..
            })
        ));
        assert!(matches!(
            translate(&user, 0x20_0000, Access::Read, &mut ram),
            Err(TranslateError::Protection {
                level: 2,
                error_code: 5,
                ..
            })
        ));
        assert!(matches!(
            translate(&user, 0x20_0000, Access::Fetch, &mut ram),
            Err(TranslateError::Protection {
                error_code: 0x15,
                ..
            })
        ));
        assert_eq!(
            translate(&kernel, 0x0000_8000_0000_0000, Access::Read, &mut ram),
            Err(TranslateError::NonCanonical {
                gla: 0x0000_8000_0000_0000
            })
        );
        // PS in a PML4 entry is reserved.
        ram.put(0x1008, 0x8000_0000 | PS | P | RW);
        assert!(matches!(
            translate(&kernel, 0x80_0000_0000, Access::Read, &mut ram),
            Err(TranslateError::Reserved {
                level: 4,
                error_code: 9,
                ..
            })
        ));
        // A table outside RAM is the host's problem, not a guest fault.
        ram.put(0x1010, 0x4000_0000 | P | RW);
        let e = translate(&kernel, 0x100_0000_0000, Access::Read, &mut ram).unwrap_err();
        assert_eq!(e, TranslateError::TableNotInRam { gpa: 0x4000_0000 });
        assert_eq!(e.exception(), None);
    }

    #[test]
    fn pae_and_32_bit_walks() {
        let mut ram = Ram::new();
        // PAE: CR3 points at four PDPTEs (32-byte aligned).
        ram.put(0x5020 + 8, 0x6000 | P);
        ram.put(0x6000, 0x8000 | P | RW);
        ram.put(0x6008, 0x40_0000 | PS | P | RW);
        ram.put(0x8000 + 3 * 8, 0x12_3000 | P | RW);
        let pae = Paging {
            cr3: 0x5020,
            cpl: 0,
            cpu_mode: CpuMode::Protected,
            paging_mode: PagingMode::Pae,
        };
        assert_eq!(
            translate(&pae, 0x4000_3abc, Access::Read, &mut ram),
            Ok(0x12_3abc)
        );
        assert_eq!(
            translate(&pae, 0x4020_0010, Access::Read, &mut ram),
            Ok(0x40_0010)
        );
        assert!(matches!(
            translate(&pae, 0x3abc, Access::Read, &mut ram),
            Err(TranslateError::NotPresent { level: 3, .. })
        ));
        // 32-bit: a 4 MiB page and a 4 KiB page, 4-byte entries.
        ram.put32(0x9000 + 4, 0x80_0000 | (PS | P | RW) as u32);
        ram.put32(0x9000, 0xa000 | (P | RW) as u32);
        ram.put32(0xa000 + 2 * 4, 0x5_5000 | P as u32);
        let bits32 = Paging {
            cr3: 0x9000,
            cpl: 0,
            cpu_mode: CpuMode::Protected,
            paging_mode: PagingMode::Bits32,
        };
        assert_eq!(
            translate(&bits32, 0x41_2345, Access::Read, &mut ram),
            Ok(0x81_2345)
        );
        assert_eq!(
            translate(&bits32, 0x2010, Access::Read, &mut ram),
            Ok(0x5_5010)
        );
        assert!(matches!(
            translate(&bits32, 0x2010, Access::Write, &mut ram),
            Err(TranslateError::Protection { level: 1, .. })
        ));
        let flat = Paging {
            paging_mode: PagingMode::Flat,
            ..bits32
        };
        assert_eq!(
            translate(&flat, 0xdead_beef, Access::Write, &mut ram),
            Ok(0xdead_beef)
        );
    }

    #[test]
    fn fetch_stops_at_an_unmapped_page_but_needs_the_first_byte() {
        let mut ram = long_tables();
        // PT[5] maps 0x5000 -> 0x7000; PT[6] is empty.
        ram.0[0x7ffd..0x8000].copy_from_slice(&[0x8b, 0x03, 0x90]);
        let paging = long(0x1000, 0);
        let (bytes, len) = fetch_instruction(&paging, 0x5ffd, &mut ram).unwrap();
        assert_eq!(len, 3);
        assert_eq!(&bytes[..3], &[0x8b, 0x03, 0x90]);
        assert!(matches!(
            fetch_instruction(&paging, 0x6000, &mut ram),
            Err(TranslateError::NotPresent {
                error_code: 0x10,
                ..
            })
        ));
    }
}
