//! Kernel image parsing (bzImage setup header, ELF64 program headers), `boot_params`, the E820
//! map and the boot page tables. Every size and offset read from a file is bounds-checked.

use crate::memory::{GuestMemory, HIGHMEM_BASE};

use super::{EBDA_START, KERNEL_LOAD_ADDR};

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// Offsets in `boot_params` (Documentation/arch/x86/zero-page.rst).
const BP_EXT_RAMDISK_IMAGE: usize = 0x0c0;
const BP_EXT_RAMDISK_SIZE: usize = 0x0c4;
const BP_EXT_CMD_LINE_PTR: usize = 0x0c8;
const BP_E820_ENTRIES: usize = 0x1e8;
const BP_SETUP_HEADER: usize = 0x1f1;
const BP_SETUP_HEADER_END: usize = 0x290;
const BP_E820_TABLE: usize = 0x2d0;
const BP_E820_MAX: usize = 128;
const BOOT_PARAMS_SIZE: usize = 4096;

/// Offsets of setup-header fields, both in the bzImage file and in `boot_params`.
const HDR_SETUP_SECTS: usize = 0x1f1;
const HDR_BOOT_FLAG: usize = 0x1fe;
const HDR_JUMP: usize = 0x200;
const HDR_MAGIC: usize = 0x202;
const HDR_VERSION: usize = 0x206;
const HDR_TYPE_OF_LOADER: usize = 0x210;
const HDR_LOADFLAGS: usize = 0x211;
const HDR_CODE32_START: usize = 0x214;
const HDR_RAMDISK_IMAGE: usize = 0x218;
const HDR_RAMDISK_SIZE: usize = 0x21c;
const HDR_CMD_LINE_PTR: usize = 0x228;
const HDR_INITRD_ADDR_MAX: usize = 0x22c;
const HDR_KERNEL_ALIGNMENT: usize = 0x230;
const HDR_RELOCATABLE: usize = 0x234;
const HDR_XLOADFLAGS: usize = 0x236;
const HDR_CMDLINE_SIZE: usize = 0x238;
const HDR_PREF_ADDRESS: usize = 0x258;
const HDR_INIT_SIZE: usize = 0x260;

const SETUP_MAGIC: &[u8; 4] = b"HdrS";
const LOADED_HIGH: u8 = 1;
const XLF_KERNEL_64: u16 = 1;
const TYPE_OF_LOADER_UNDEFINED: u8 = 0xff;
/// Where a 64-bit kernel's `startup_64` sits relative to the protected-mode load address.
const STARTUP_64_OFFSET: u64 = 0x200;

/// Largest command line a kernel without a setup header (ELF) gets (x86 COMMAND_LINE_SIZE).
const ELF_CMDLINE_SIZE: usize = 2048;
const MAX_PROGRAM_HEADERS: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LoadSegment {
    offset: usize,
    paddr: u64,
    filesz: usize,
    memsz: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Layout {
    Elf {
        entry: u64,
        segments: Vec<LoadSegment>,
    },
    BzImage {
        header_end: usize,
        kernel_offset: usize,
        version: u16,
        relocatable: bool,
        pref_address: u64,
        init_size: u64,
        initrd_addr_max: u64,
        cmdline_size: u32,
    },
}

/// A parsed kernel file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelImage {
    data: Vec<u8>,
    layout: Layout,
}

fn u16_at(data: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(data.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(data: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(data.get(at..at + 8)?.try_into().ok()?))
}

fn put_u16(buf: &mut [u8], at: usize, v: u16) {
    buf[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

impl KernelImage {
    /// Recognise an ELF64 x86-64 image or a bzImage.
    pub fn parse(data: Vec<u8>) -> Result<Self, String> {
        let layout = if data.starts_with(b"\x7fELF") {
            parse_elf(&data)?
        } else if data.get(HDR_MAGIC..HDR_MAGIC + 4) == Some(SETUP_MAGIC) {
            parse_bzimage(&data)?
        } else {
            return Err("not an ELF kernel or a bzImage".into());
        };
        Ok(Self { data, layout })
    }

    pub fn format(&self) -> KernelFormat {
        match self.layout {
            Layout::Elf { .. } => KernelFormat::Elf,
            Layout::BzImage { .. } => KernelFormat::BzImage,
        }
    }

    /// The boot protocol version of a bzImage (e.g. `0x020f`).
    pub fn protocol_version(&self) -> Option<u16> {
        match self.layout {
            Layout::BzImage { version, .. } => Some(version),
            Layout::Elf { .. } => None,
        }
    }

    /// Longest command line the kernel accepts, NUL included.
    pub fn cmdline_limit(&self) -> usize {
        match self.layout {
            Layout::BzImage { cmdline_size, .. } => cmdline_size as usize + 1,
            Layout::Elf { .. } => ELF_CMDLINE_SIZE,
        }
    }

    /// Highest address (exclusive) the initrd may end at.
    pub fn initrd_addr_max(&self) -> u64 {
        match self.layout {
            Layout::BzImage {
                initrd_addr_max, ..
            } => initrd_addr_max.saturating_add(1),
            Layout::Elf { .. } => HIGHMEM_BASE,
        }
    }

    /// Where a bzImage's protected-mode part goes in a VM whose low memory ends at
    /// `lowmem_end`.
    fn bzimage_load_address(&self, lowmem_end: u64) -> Option<u64> {
        let Layout::BzImage {
            relocatable,
            pref_address,
            init_size,
            ..
        } = self.layout
        else {
            return None;
        };
        let fits = |base: u64| base.checked_add(init_size).is_some_and(|e| e <= lowmem_end);
        if pref_address >= KERNEL_LOAD_ADDR && fits(pref_address) {
            Some(pref_address)
        } else if relocatable && fits(KERNEL_LOAD_ADDR) {
            Some(KERNEL_LOAD_ADDR)
        } else {
            None
        }
    }

    /// Guest-physical ranges `(start, end)` the kernel occupies once loaded.
    pub fn ranges(&self, lowmem_end: u64) -> Vec<(u64, u64)> {
        match &self.layout {
            Layout::Elf { segments, .. } => segments
                .iter()
                .map(|s| (s.paddr, s.paddr.saturating_add(s.memsz)))
                .collect(),
            Layout::BzImage { .. } => {
                let base = self.bzimage_load_address(lowmem_end).unwrap_or(0);
                vec![(base, self.end(lowmem_end))]
            }
        }
    }

    /// First address above everything the kernel occupies once loaded.
    pub fn end(&self, lowmem_end: u64) -> u64 {
        match &self.layout {
            Layout::Elf { segments, .. } => segments
                .iter()
                .map(|s| s.paddr.saturating_add(s.memsz))
                .max()
                .unwrap_or(0),
            Layout::BzImage {
                init_size,
                kernel_offset,
                ..
            } => {
                let base = self.bzimage_load_address(lowmem_end).unwrap_or(0);
                let payload = (self.data.len() - kernel_offset) as u64;
                base.saturating_add((*init_size).max(payload))
            }
        }
    }

    /// Copy the kernel into guest memory; returns the 64-bit entry point.
    pub fn load(&self, memory: &GuestMemory, lowmem_end: u64) -> Result<u64, String> {
        match &self.layout {
            Layout::Elf { entry, segments } => {
                for s in segments {
                    let bytes = &self.data[s.offset..s.offset + s.filesz];
                    memory.write(s.paddr, bytes).map_err(|e| {
                        format!(
                            "segment at {:#x} does not fit in guest memory ({e})",
                            s.paddr
                        )
                    })?;
                    let rest = s.memsz - s.filesz as u64;
                    if rest > 0 {
                        memory
                            .fill_zero(s.paddr + s.filesz as u64, rest)
                            .map_err(|e| {
                                format!(
                                    "segment at {:#x} does not fit in guest memory ({e})",
                                    s.paddr
                                )
                            })?;
                    }
                }
                Ok(*entry)
            }
            Layout::BzImage { kernel_offset, .. } => {
                let base = self.bzimage_load_address(lowmem_end).ok_or_else(|| {
                    format!("the kernel does not fit below {lowmem_end:#x} (needs more memory)")
                })?;
                memory
                    .write(base, &self.data[*kernel_offset..])
                    .map_err(|e| format!("kernel does not fit in guest memory ({e})"))?;
                Ok(base + STARTUP_64_OFFSET)
            }
        }
    }

    /// The zero page for this kernel, loaded with entry point `entry`.
    pub fn boot_params(
        &self,
        entry: u64,
        cmdline_addr: u64,
        initrd: Option<(u64, u64)>,
        e820: &[E820Entry],
    ) -> Vec<u8> {
        let mut params = vec![0u8; BOOT_PARAMS_SIZE];
        match &self.layout {
            Layout::BzImage { header_end, .. } => {
                let end = (*header_end).min(BP_SETUP_HEADER_END);
                params[BP_SETUP_HEADER..end].copy_from_slice(&self.data[BP_SETUP_HEADER..end]);
                // Where the protected-mode kernel went.
                let base = entry.saturating_sub(STARTUP_64_OFFSET);
                put_u32(&mut params, HDR_CODE32_START, base as u32);
            }
            Layout::Elf { .. } => {
                put_u16(&mut params, HDR_BOOT_FLAG, 0xaa55);
                params[HDR_MAGIC..HDR_MAGIC + 4].copy_from_slice(SETUP_MAGIC);
                put_u16(&mut params, HDR_VERSION, 0x020c);
                put_u32(&mut params, HDR_KERNEL_ALIGNMENT, 0x0100_0000);
                put_u32(&mut params, HDR_CMDLINE_SIZE, ELF_CMDLINE_SIZE as u32 - 1);
            }
        }
        params[HDR_TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED;
        params[HDR_LOADFLAGS] |= LOADED_HIGH;
        put_u32(&mut params, HDR_CMD_LINE_PTR, cmdline_addr as u32);
        put_u32(
            &mut params,
            BP_EXT_CMD_LINE_PTR,
            (cmdline_addr >> 32) as u32,
        );
        if let Some((start, size)) = initrd {
            put_u32(&mut params, HDR_RAMDISK_IMAGE, start as u32);
            put_u32(&mut params, HDR_RAMDISK_SIZE, size as u32);
            put_u32(&mut params, BP_EXT_RAMDISK_IMAGE, (start >> 32) as u32);
            put_u32(&mut params, BP_EXT_RAMDISK_SIZE, (size >> 32) as u32);
        }
        let count = e820.len().min(BP_E820_MAX);
        params[BP_E820_ENTRIES] = count as u8;
        for (i, entry) in e820.iter().take(count).enumerate() {
            let at = BP_E820_TABLE + i * 20;
            put_u64(&mut params, at, entry.addr);
            put_u64(&mut params, at + 8, entry.size);
            put_u32(&mut params, at + 16, entry.kind);
        }
        params
    }
}

fn parse_bzimage(data: &[u8]) -> Result<Layout, String> {
    let short = || "truncated setup header".to_string();
    let version = u16_at(data, HDR_VERSION).ok_or_else(short)?;
    if version < 0x020c {
        return Err(format!(
            "boot protocol {}.{:02} is older than 2.12, which 64-bit entry needs",
            version >> 8,
            version & 0xff
        ));
    }
    let xloadflags = u16_at(data, HDR_XLOADFLAGS).ok_or_else(short)?;
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err("the kernel has no 64-bit entry point (XLF_KERNEL_64 clear)".into());
    }
    let setup_sects = match *data.get(HDR_SETUP_SECTS).ok_or_else(short)? {
        0 => 4,
        n => usize::from(n),
    };
    let kernel_offset = (setup_sects + 1) * 512;
    if kernel_offset >= data.len() {
        return Err("no protected-mode kernel after the setup code".into());
    }
    let header_end = HDR_MAGIC + usize::from(*data.get(HDR_JUMP + 1).ok_or_else(short)?);
    if header_end > data.len() || header_end > kernel_offset {
        return Err(short());
    }
    let init_size = u64::from(u32_at(data, HDR_INIT_SIZE).ok_or_else(short)?);
    Ok(Layout::BzImage {
        header_end,
        kernel_offset,
        version,
        relocatable: *data.get(HDR_RELOCATABLE).ok_or_else(short)? != 0,
        pref_address: u64_at(data, HDR_PREF_ADDRESS).ok_or_else(short)?,
        init_size,
        initrd_addr_max: u64::from(u32_at(data, HDR_INITRD_ADDR_MAX).ok_or_else(short)?),
        cmdline_size: u32_at(data, HDR_CMDLINE_SIZE).ok_or_else(short)?,
    })
}

fn parse_elf(data: &[u8]) -> Result<Layout, String> {
    let short = || "truncated ELF header".to_string();
    if data.get(4) != Some(&2) || data.get(5) != Some(&1) {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    if u16_at(data, 0x12).ok_or_else(short)? != 0x3e {
        return Err("not an x86-64 ELF file".into());
    }
    let entry = u64_at(data, 0x18).ok_or_else(short)?;
    let phoff = usize::try_from(u64_at(data, 0x20).ok_or_else(short)?).map_err(|_| short())?;
    let phentsize = usize::from(u16_at(data, 0x36).ok_or_else(short)?);
    let phnum = usize::from(u16_at(data, 0x38).ok_or_else(short)?);
    if phentsize < 56 || phnum == 0 || phnum > MAX_PROGRAM_HEADERS {
        return Err(format!(
            "implausible program header table ({phnum} entries of {phentsize} bytes)"
        ));
    }
    let mut segments = Vec::new();
    for i in 0..phnum {
        let at = phoff
            .checked_add(i * phentsize)
            .filter(|at| at.checked_add(56).is_some_and(|end| end <= data.len()))
            .ok_or("program header table beyond the end of the file")?;
        if u32_at(data, at) != Some(1) {
            continue; // not PT_LOAD
        }
        let offset = u64_at(data, at + 0x08).ok_or_else(short)?;
        let paddr = u64_at(data, at + 0x18).ok_or_else(short)?;
        let filesz = u64_at(data, at + 0x20).ok_or_else(short)?;
        let memsz = u64_at(data, at + 0x28).ok_or_else(short)?;
        let in_file = offset
            .checked_add(filesz)
            .is_some_and(|end| end <= data.len() as u64);
        if !in_file || filesz > memsz || paddr.checked_add(memsz).is_none() {
            return Err(format!("segment {i} lies outside the file or is malformed"));
        }
        segments.push(LoadSegment {
            offset: offset as usize,
            paddr,
            filesz: filesz as usize,
            memsz,
        });
    }
    if segments.is_empty() {
        return Err("no loadable segments".into());
    }
    Ok(Layout::Elf { entry, segments })
}

/// One E820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The E820 map of the memory layout: RAM below the EBDA, the legacy area reserved up to
/// 1 MiB, RAM from 1 MiB to the end of low memory, and RAM above 4 GiB.
pub fn build_e820(lowmem_end: u64, highmem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![E820Entry {
        addr: 0,
        size: EBDA_START.min(lowmem_end),
        kind: E820_RAM,
    }];
    if lowmem_end > EBDA_START {
        map.push(E820Entry {
            addr: EBDA_START,
            size: 0x100000 - EBDA_START,
            kind: E820_RESERVED,
        });
    }
    if lowmem_end > 0x100000 {
        map.push(E820Entry {
            addr: 0x100000,
            size: lowmem_end - 0x100000,
            kind: E820_RAM,
        });
    }
    if highmem_size > 0 {
        map.push(E820Entry {
            addr: HIGHMEM_BASE,
            size: highmem_size,
            kind: E820_RAM,
        });
    }
    map
}

/// Page tables identity-mapping the first 4 GiB with 2 MiB pages, as one contiguous image to
/// be written at `pml4`: the PML4, then the PDPT at `pdpt`, then four page directories from
/// `pd` (the addresses must be consecutive pages, as in the boot layout).
pub fn page_tables(pml4: u64, pdpt: u64, pd: u64) -> Vec<u8> {
    const PRESENT_WRITABLE: u64 = 0x3;
    const LARGE_PAGE: u64 = 0x80;
    debug_assert_eq!(pdpt, pml4 + 0x1000);
    debug_assert_eq!(pd, pdpt + 0x1000);
    let mut image = vec![0u8; 6 * 0x1000];
    put_u64(&mut image, 0, pdpt | PRESENT_WRITABLE);
    for dir in 0..4u64 {
        put_u64(
            &mut image,
            0x1000 + dir as usize * 8,
            (pd + dir * 0x1000) | PRESENT_WRITABLE,
        );
        for entry in 0..512u64 {
            let address = (dir * 512 + entry) << 21;
            let at = 0x2000 + (dir as usize) * 0x1000 + entry as usize * 8;
            put_u64(&mut image, at, address | PRESENT_WRITABLE | LARGE_PAGE);
        }
    }
    image
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal bzImage: setup header fields as a 6.x kernel has them, then `payload`.
    pub(crate) fn synthetic_bzimage(payload: &[u8]) -> Vec<u8> {
        let setup_sects = 3u8;
        let mut image = vec![0u8; (usize::from(setup_sects) + 1) * 512];
        image[HDR_SETUP_SECTS] = setup_sects;
        put_u16(&mut image, HDR_BOOT_FLAG, 0xaa55);
        image[HDR_JUMP] = 0xeb;
        image[HDR_JUMP + 1] = 0x6a; // header ends at 0x26c
        image[HDR_MAGIC..HDR_MAGIC + 4].copy_from_slice(SETUP_MAGIC);
        put_u16(&mut image, HDR_VERSION, 0x020f);
        image[HDR_LOADFLAGS] = LOADED_HIGH;
        put_u32(&mut image, HDR_INITRD_ADDR_MAX, 0x7fff_ffff);
        put_u32(&mut image, HDR_KERNEL_ALIGNMENT, 0x20_0000);
        image[HDR_RELOCATABLE] = 1;
        put_u16(&mut image, HDR_XLOADFLAGS, XLF_KERNEL_64 | 2);
        put_u32(&mut image, HDR_CMDLINE_SIZE, 2047);
        put_u64(&mut image, HDR_PREF_ADDRESS, 0x100_0000);
        put_u32(&mut image, HDR_INIT_SIZE, 0x40_0000);
        image.extend_from_slice(payload);
        image
    }

    /// An ELF64 x86-64 executable with one PT_LOAD segment of `code` at `paddr` plus `bss`
    /// zero bytes.
    pub(crate) fn synthetic_elf(paddr: u64, code: &[u8], bss: u64) -> Vec<u8> {
        let mut elf = vec![0u8; 0x78];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[6] = 1;
        put_u16(&mut elf, 0x10, 2);
        put_u16(&mut elf, 0x12, 0x3e);
        put_u64(&mut elf, 0x18, paddr);
        put_u64(&mut elf, 0x20, 0x40);
        put_u16(&mut elf, 0x34, 0x40);
        put_u16(&mut elf, 0x36, 56);
        put_u16(&mut elf, 0x38, 1);
        let ph = 0x40;
        put_u32(&mut elf, ph, 1);
        put_u32(&mut elf, ph + 4, 7);
        put_u64(&mut elf, ph + 0x08, 0x78);
        put_u64(&mut elf, ph + 0x10, paddr);
        put_u64(&mut elf, ph + 0x18, paddr);
        put_u64(&mut elf, ph + 0x20, code.len() as u64);
        put_u64(&mut elf, ph + 0x28, code.len() as u64 + bss);
        elf.extend_from_slice(code);
        elf
    }

    #[test]
    fn bzimage_header_is_parsed_and_kernel_goes_to_pref_address() {
        let image = KernelImage::parse(synthetic_bzimage(&[0x90; 0x300])).unwrap();
        assert_eq!(image.format(), KernelFormat::BzImage);
        assert_eq!(image.protocol_version(), Some(0x020f));
        assert_eq!(image.cmdline_limit(), 2048);
        assert_eq!(image.initrd_addr_max(), 0x8000_0000);
        let mem = GuestMemory::new(64 << 20).unwrap();
        let entry = image.load(&mem, 64 << 20).unwrap();
        assert_eq!(entry, 0x100_0000 + 0x200);
        assert_eq!(mem.slice(0x100_0000, 4).unwrap(), &[0x90; 4]);
        assert_eq!(image.end(64 << 20), 0x140_0000);
    }

    #[test]
    fn bzimage_falls_back_to_one_mib_when_pref_address_does_not_fit() {
        let image = KernelImage::parse(synthetic_bzimage(&[0xcc; 16])).unwrap();
        let mem = GuestMemory::new(8 << 20).unwrap();
        assert_eq!(image.load(&mem, 8 << 20).unwrap(), 0x100000 + 0x200);
        let tiny = GuestMemory::new(4 << 20).unwrap();
        assert!(image.load(&tiny, 4 << 20).is_err());
    }

    #[test]
    fn old_or_32_bit_only_bzimages_are_refused() {
        let mut old = synthetic_bzimage(&[0; 16]);
        put_u16(&mut old, HDR_VERSION, 0x020b);
        assert!(KernelImage::parse(old).unwrap_err().contains("2.12"));
        let mut no64 = synthetic_bzimage(&[0; 16]);
        put_u16(&mut no64, HDR_XLOADFLAGS, 0);
        assert!(KernelImage::parse(no64).unwrap_err().contains("64-bit"));
        let truncated = synthetic_bzimage(&[])[..0x210].to_vec();
        assert!(KernelImage::parse(truncated).is_err());
        assert!(KernelImage::parse(b"MZ garbage".to_vec()).is_err());
    }

    #[test]
    fn boot_params_carry_header_cmdline_initrd_and_e820() {
        let image = KernelImage::parse(synthetic_bzimage(&[0; 16])).unwrap();
        let e820 = build_e820(256 << 20, 0);
        let p = image.boot_params(0x100_0200, 0x20000, Some((0x0ff0_0000, 0x1234)), &e820);
        assert_eq!(&p[HDR_MAGIC..HDR_MAGIC + 4], b"HdrS");
        assert_eq!(u16_at(&p, HDR_VERSION), Some(0x020f));
        assert_eq!(p[HDR_TYPE_OF_LOADER], 0xff);
        assert_eq!(u32_at(&p, HDR_CODE32_START), Some(0x100_0000));
        assert_eq!(u32_at(&p, HDR_CMD_LINE_PTR), Some(0x20000));
        assert_eq!(u32_at(&p, HDR_RAMDISK_IMAGE), Some(0x0ff0_0000));
        assert_eq!(u32_at(&p, HDR_RAMDISK_SIZE), Some(0x1234));
        assert_eq!(usize::from(p[BP_E820_ENTRIES]), e820.len());
        assert_eq!(u64_at(&p, BP_E820_TABLE + 20), Some(EBDA_START));
        assert_eq!(u32_at(&p, BP_E820_TABLE + 20 + 16), Some(E820_RESERVED));
        // Nothing past the setup header leaks from the file into the zero page.
        assert!(p[0x26c..BP_SETUP_HEADER_END].iter().all(|&b| b == 0));
    }

    #[test]
    fn elf_segments_load_at_their_physical_address_with_bss_zeroed() {
        let image = KernelImage::parse(synthetic_elf(0x20_0000, &[0xf4, 0xeb, 0xfd], 5)).unwrap();
        assert_eq!(image.format(), KernelFormat::Elf);
        let mem = GuestMemory::new(8 << 20).unwrap();
        mem.write(0x20_0003, &[0xaa; 5]).unwrap();
        assert_eq!(image.load(&mem, 8 << 20).unwrap(), 0x20_0000);
        assert_eq!(
            mem.slice(0x20_0000, 8).unwrap(),
            &[0xf4, 0xeb, 0xfd, 0, 0, 0, 0, 0]
        );
        assert_eq!(image.end(8 << 20), 0x20_0008);
        let p = image.boot_params(0x20_0000, 0x20000, None, &build_e820(8 << 20, 0));
        assert_eq!(u16_at(&p, HDR_BOOT_FLAG), Some(0xaa55));
        assert_eq!(&p[HDR_MAGIC..HDR_MAGIC + 4], b"HdrS");
    }

    #[test]
    fn malformed_elf_files_are_refused() {
        let good = synthetic_elf(0x20_0000, &[0x90; 8], 0);
        let mut beyond = good.clone();
        put_u64(&mut beyond, 0x40 + 0x20, 0x1000); // filesz past the end of the file
        assert!(KernelImage::parse(beyond).is_err());
        let mut too_many = good.clone();
        put_u16(&mut too_many, 0x38, 4000);
        assert!(KernelImage::parse(too_many).is_err());
        let mut table_outside = good.clone();
        put_u64(&mut table_outside, 0x20, u64::MAX - 8);
        assert!(KernelImage::parse(table_outside).is_err());
        let mut arm = good.clone();
        put_u16(&mut arm, 0x12, 0xb7);
        assert!(KernelImage::parse(arm).is_err());
        let mut bss_smaller = good;
        put_u64(&mut bss_smaller, 0x40 + 0x28, 1);
        assert!(KernelImage::parse(bss_smaller).is_err());
        // Too small for the guest: the load reports it instead of panicking.
        let high = KernelImage::parse(synthetic_elf(0x7fff_0000, &[0x90; 8], 0)).unwrap();
        assert!(high
            .load(&GuestMemory::new(8 << 20).unwrap(), 8 << 20)
            .is_err());
    }

    #[test]
    fn e820_matches_the_memory_layout() {
        let small = build_e820(256 << 20, 0);
        assert_eq!(
            small,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 0x9fc00,
                    size: 0x60400,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: 0x100000,
                    size: (256 << 20) - 0x100000,
                    kind: E820_RAM
                },
            ]
        );
        let big = build_e820(3 << 30, 2 << 30);
        assert_eq!(big.len(), 4);
        assert_eq!(
            big[3],
            E820Entry {
                addr: 4 << 30,
                size: 2 << 30,
                kind: E820_RAM
            }
        );
        assert_eq!(big[2].addr + big[2].size, 3 << 30);
    }

    #[test]
    fn page_tables_identity_map_four_gib_with_2mib_pages() {
        let image = page_tables(0x9000, 0xa000, 0xb000);
        assert_eq!(u64_at(&image, 0), Some(0xa003));
        for dir in 0..4 {
            assert_eq!(
                u64_at(&image, 0x1000 + dir * 8),
                Some(0xb003 + dir as u64 * 0x1000)
            );
        }
        assert_eq!(
            u64_at(&image, 0x1000 + 4 * 8),
            Some(0),
            "nothing above 4 GiB"
        );
        assert_eq!(u64_at(&image, 0x2000), Some(0x83));
        assert_eq!(u64_at(&image, 0x2008), Some(0x20_0083));
        // Last 2 MiB page below 4 GiB.
        assert_eq!(
            u64_at(&image, 0x2000 + 3 * 0x1000 + 511 * 8),
            Some(0xffe0_0083)
        );
    }

    /// The ELF loader against the real kernel of the Linux test guest, when tests/linux-guest
    /// has built and cached one (the cache layout is build.sh's).
    #[test]
    fn the_linux_test_guests_vmlinux_parses_when_built() {
        let cache = std::env::var_os("BHYVE_RS_LINUX_GUEST_CACHE")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                std::env::var_os("XDG_CACHE_HOME")
                    .map(std::path::PathBuf::from)
                    .or_else(|| {
                        std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache"))
                    })
                    .map(|c| c.join("bhyve-rs/linux-guest"))
            });
        let vmlinux = cache.and_then(|dir| {
            std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
                let path = e.path().join("vmlinux");
                let kernel_dir = e.file_name().to_string_lossy().starts_with("kernel-");
                (kernel_dir && path.is_file()).then_some(path)
            })
        });
        let Some(vmlinux) = vmlinux else {
            eprintln!("skipped: the Linux test guest is not built (tests/linux-guest/build.sh)");
            return;
        };
        let image = KernelImage::parse(std::fs::read(&vmlinux).unwrap()).unwrap();
        assert_eq!(image.format(), KernelFormat::Elf);
        // A 64-bit kernel linked at 16 MiB: its loadable ranges start there.
        let ranges = image.ranges(1 << 30);
        assert!(!ranges.is_empty());
        assert!(
            ranges.iter().all(|&(start, _)| start >= 1 << 20),
            "{ranges:x?}"
        );
    }
}
