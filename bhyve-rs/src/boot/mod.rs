//! Direct kernel boot: bhyve-rs's stand-in for bhyveload on Linux hosts.
//!
//! Configuration keys: `boot.kernel` (a bzImage or an ELF64 `vmlinux`-style image),
//! `boot.initrd`, `boot.cmdline`. The kernel is entered through the Linux x86 64-bit boot
//! protocol (Documentation/arch/x86/boot.rst), which is also what the test guests rely on.
//!
//! # Guest physical layout at entry
//!
//! | GPA | contents |
//! |---|---|
//! | `0x0500..0x0530` | GDT: null, null, `0x10` 64-bit code (`__BOOT_CS`), `0x18` data (`__BOOT_DS`), `0x20` 64-bit TSS |
//! | `0x7000..0x8000` | `boot_params` (the "zero page"); `rsi` points here |
//! | `0x8000..0x8ff0` | initial stack; `rsp` = `0x8ff0` |
//! | `0x9000` | PML4 |
//! | `0xa000` | PDPT |
//! | `0xb000..0xf000` | four page directories: 2 MiB pages identity-mapping 0..4 GiB |
//! | `0x20000` | kernel command line, NUL-terminated |
//! | `0x100000` or `pref_address` | bzImage protected-mode kernel (entry = load address + `0x200`) |
//! | ELF `p_paddr` | each `PT_LOAD` segment of an ELF kernel (entry = `e_entry`) |
//! | top of low memory, page aligned | initrd (below `initrd_addr_max` for a bzImage) |
//!
//! All of these lie in RAM the E820 map reports as usable (except the initrd, also usable):
//! the kernel owns them after entry.
//!
//! # Registers at entry (vCPU 0)
//!
//! Long mode with paging: CR0 = PE|ET|NE|PG, CR4 = PAE, EFER = LME|LMA, CR3 = `0x9000`;
//! CS = `0x10`, DS/ES/FS/GS/SS = `0x18`; `rsi` = `0x7000`, `rsp` = `0x8ff0`, RFLAGS = `0x2`
//! (interrupts disabled), IDT empty. Other vCPUs wait for INIT/SIPI.
//!
//! # `boot_params` fields a guest can rely on
//!
//! `e820_entries` (offset `0x1e8`, u8), `e820_table` (offset `0x2d0`, 20-byte entries: u64 address,
//! u64 size, u32 type), `hdr.cmd_line_ptr` (offset `0x228`, u32), `hdr.ramdisk_image` /
//! `hdr.ramdisk_size` (offsets `0x218` / `0x21c`, with the high halves at `0x0c0` / `0x0c4`),
//! `hdr.type_of_loader` = `0xff` (offset `0x210`).

pub(crate) mod linux;

use std::path::{Path, PathBuf};

pub use linux::{
    build_e820, page_tables, E820Entry, KernelFormat, KernelImage, E820_RAM, E820_RESERVED,
};

use crate::config::Config;
use crate::memory::{GuestMemory, MemoryError};
use crate::vmm::{describe_io_error, DescriptorTable, Regs, Segment, SpecialRegs};

pub const GDT_ADDR: u64 = 0x500;
pub const BOOT_PARAMS_ADDR: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Room reserved for the command line at [`CMDLINE_ADDR`], NUL included.
pub const CMDLINE_MAX: usize = 0x10000;
/// Where a bzImage's protected-mode part goes unless it prefers (and may take) another place.
pub const KERNEL_LOAD_ADDR: u64 = 0x100000;
/// Base of the EBDA / legacy BIOS area the E820 map reserves up to 1 MiB.
pub const EBDA_START: u64 = 0x9fc00;

pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;
pub const BOOT_TSS: u16 = 0x20;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("{key}: {path}: {reason}")]
    File {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("boot.kernel: {path}: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("boot.cmdline: longer than {0} bytes")]
    CmdlineTooLong(usize),
    #[error("{what} does not fit in guest memory: {source}")]
    Placement {
        what: &'static str,
        #[source]
        source: MemoryError,
    },
    #[error("{0}")]
    Layout(String),
}

/// The kernel, initrd and command line named by the configuration, read before any VM exists.
pub struct BootFiles {
    pub kernel_path: PathBuf,
    pub kernel: KernelImage,
    pub initrd: Option<Vec<u8>>,
    pub cmdline: String,
}

/// What [`load`] put where, for the vCPU setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootInfo {
    pub entry: u64,
    pub boot_params: u64,
    pub initrd: Option<(u64, u64)>,
}

fn read_bounded(key: &'static str, path: &Path, limit: u64) -> Result<Vec<u8>, BootError> {
    let fail = |reason: String| BootError::File {
        key,
        path: path.to_path_buf(),
        reason,
    };
    let metadata = std::fs::metadata(path).map_err(|e| fail(describe_io_error(&e)))?;
    if !metadata.is_file() {
        return Err(fail("not a regular file".into()));
    }
    if metadata.len() > limit {
        return Err(fail(format!(
            "{} bytes is larger than guest memory",
            metadata.len()
        )));
    }
    std::fs::read(path).map_err(|e| fail(describe_io_error(&e)))
}

/// Read and check the boot files the configuration names. `Ok(None)` when `boot.kernel` is
/// not set. `memory_size` bounds how much is read.
pub fn read_boot_files(config: &Config, memory_size: u64) -> Result<Option<BootFiles>, BootError> {
    let Some(kernel_path) = config.get("boot.kernel") else {
        return Ok(None);
    };
    let kernel_path = PathBuf::from(kernel_path);
    let data = read_bounded("boot.kernel", &kernel_path, memory_size)?;
    let kernel = KernelImage::parse(data).map_err(|reason| BootError::Format {
        path: kernel_path.clone(),
        reason,
    })?;
    let initrd = config
        .get("boot.initrd")
        .map(|p| read_bounded("boot.initrd", Path::new(p), memory_size))
        .transpose()?;
    let cmdline = config.get("boot.cmdline").unwrap_or_default().to_string();
    if cmdline.len() + 1 > CMDLINE_MAX.min(kernel.cmdline_limit()) {
        return Err(BootError::CmdlineTooLong(
            CMDLINE_MAX.min(kernel.cmdline_limit()) - 1,
        ));
    }
    Ok(Some(BootFiles {
        kernel_path,
        kernel,
        initrd,
        cmdline,
    }))
}

/// Put the kernel, initrd, command line, `boot_params`, GDT and page tables into guest memory.
pub fn load(memory: &GuestMemory, files: &BootFiles) -> Result<BootInfo, BootError> {
    if memory.lowmem_end() < 0x200000 {
        return Err(BootError::Layout(
            "direct kernel boot needs at least 2 MiB of guest memory".into(),
        ));
    }
    let lowmem_end = memory.lowmem_end();
    let placement = |what| move |source| BootError::Placement { what, source };

    // The boot structures below are written after the kernel; refuse to overwrite it.
    let boot_area = (GDT_ADDR, CMDLINE_ADDR + CMDLINE_MAX as u64);
    if let Some((start, end)) = files
        .kernel
        .ranges(lowmem_end)
        .into_iter()
        .find(|&(start, end)| start < boot_area.1 && end > boot_area.0)
    {
        return Err(BootError::Format {
            path: files.kernel_path.clone(),
            reason: format!(
                "segment {start:#x}-{end:#x} overlaps the boot area {:#x}-{:#x}",
                boot_area.0, boot_area.1
            ),
        });
    }
    let entry = files
        .kernel
        .load(memory, lowmem_end)
        .map_err(|reason| BootError::Format {
            path: files.kernel_path.clone(),
            reason,
        })?;

    let mut cmdline = files.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    memory
        .write(CMDLINE_ADDR, &cmdline)
        .map_err(placement("the command line"))?;

    let initrd = match &files.initrd {
        Some(image) => {
            let limit = files.kernel.initrd_addr_max().min(lowmem_end);
            let size = image.len() as u64;
            let start = limit
                .checked_sub(size)
                .map(|s| s & !0xfff)
                .filter(|&s| s >= files.kernel.end(lowmem_end))
                .ok_or_else(|| {
                    BootError::Layout(format!(
                        "the initrd ({size} bytes) does not fit below {limit:#x} above the kernel"
                    ))
                })?;
            memory
                .write(start, image)
                .map_err(placement("the initrd"))?;
            Some((start, size))
        }
        None => None,
    };

    let e820 = build_e820(memory.lowmem_end(), memory.highmem_size());
    let params = files.kernel.boot_params(entry, CMDLINE_ADDR, initrd, &e820);
    memory
        .write(BOOT_PARAMS_ADDR, &params)
        .map_err(placement("boot_params"))?;

    let mut gdt = Vec::with_capacity(48);
    for descriptor in gdt_entries() {
        gdt.extend_from_slice(&descriptor.to_le_bytes());
    }
    memory.write(GDT_ADDR, &gdt).map_err(placement("the GDT"))?;
    memory
        .write(PML4_ADDR, &page_tables(PML4_ADDR, PDPT_ADDR, PD_ADDR))
        .map_err(placement("the page tables"))?;

    Ok(BootInfo {
        entry,
        boot_params: BOOT_PARAMS_ADDR,
        initrd,
    })
}

/// The boot GDT: flat 64-bit code at 0x10, flat data at 0x18, a 64-bit TSS at 0x20.
pub fn gdt_entries() -> [u64; 6] {
    [
        0,
        0,
        0x00af_9b00_0000_ffff, // code: P, DPL 0, exec/read, accessed, L, G
        0x00cf_9300_0000_ffff, // data: P, DPL 0, read/write, accessed, D/B, G
        0x0000_8b00_0000_0067, // TSS (busy), base 0, limit 0x67
        0,                     // TSS descriptor, upper half
    ]
}

fn flat_segment(selector: u16, code: bool) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: true,
        dpl: 0,
        db: !code,
        s: true,
        l: code,
        g: true,
        avl: false,
        unusable: false,
    }
}

/// Registers for entering a 64-bit kernel at `entry` with `boot_params` in `rsi`.
pub fn boot_regs(info: &BootInfo) -> Regs {
    Regs {
        rip: info.entry,
        rsi: info.boot_params,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rflags: 0x2,
        ..Default::default()
    }
}

/// Segment and control registers for 64-bit entry; `current` supplies what the protocol does
/// not define (e.g. the APIC base).
pub fn boot_special_regs(current: &SpecialRegs) -> SpecialRegs {
    let code = flat_segment(BOOT_CS, true);
    let data = flat_segment(BOOT_DS, false);
    SpecialRegs {
        cs: code,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: Segment {
            base: 0,
            limit: 0x67,
            selector: BOOT_TSS,
            type_: 0xb,
            present: true,
            s: false,
            ..Default::default()
        },
        ldt: Segment {
            selector: 0,
            type_: 0x2,
            present: true,
            limit: 0xffff,
            ..Default::default()
        },
        gdt: DescriptorTable {
            base: GDT_ADDR,
            limit: (gdt_entries().len() * 8 - 1) as u16,
        },
        idt: DescriptorTable { base: 0, limit: 0 },
        cr0: CR0_PE | CR0_ET | CR0_NE | CR0_PG,
        cr2: 0,
        cr3: PML4_ADDR,
        cr4: CR4_PAE,
        cr8: 0,
        efer: EFER_LME | EFER_LMA,
        apic_base: current.apic_base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_structures_do_not_overlap() {
        let ranges = [
            (GDT_ADDR, GDT_ADDR + 48),
            (BOOT_PARAMS_ADDR, BOOT_PARAMS_ADDR + 0x1000),
            (0x8000, BOOT_STACK_POINTER),
            (PML4_ADDR, PML4_ADDR + 0x1000),
            (PDPT_ADDR, PDPT_ADDR + 0x1000),
            (PD_ADDR, PD_ADDR + 0x4000),
            (CMDLINE_ADDR, CMDLINE_ADDR + CMDLINE_MAX as u64),
        ];
        for (i, a) in ranges.iter().enumerate() {
            for b in &ranges[i + 1..] {
                assert!(a.1 <= b.0 || b.1 <= a.0, "{a:x?} overlaps {b:x?}");
            }
            assert!(a.1 <= EBDA_START);
        }
    }

    #[test]
    fn entry_state_is_long_mode_with_linux_selectors() {
        let info = BootInfo {
            entry: 0x1000000,
            boot_params: BOOT_PARAMS_ADDR,
            initrd: None,
        };
        let regs = boot_regs(&info);
        assert_eq!((regs.rip, regs.rsi, regs.rflags), (0x1000000, 0x7000, 2));
        let current = SpecialRegs {
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        let s = boot_special_regs(&current);
        assert_eq!(
            (s.cs.selector, s.ds.selector, s.ss.selector),
            (0x10, 0x18, 0x18)
        );
        assert!(s.cs.l && !s.cs.db);
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_ADDR);
        assert_eq!(s.apic_base, 0xfee0_0900);
        // The GDT entries the selectors name are the code and data descriptors.
        let gdt = gdt_entries();
        assert_eq!(gdt[usize::from(BOOT_CS) / 8] >> 53 & 1, 1, "L bit of code");
        assert_eq!(gdt[usize::from(BOOT_DS) / 8] >> 40 & 0xff, 0x93);
    }

    #[test]
    fn io_errors_read_like_strerror() {
        let e = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(describe_io_error(&e), "No such file or directory");
    }

    #[test]
    fn a_missing_kernel_is_a_one_line_error_naming_key_and_path() {
        let mut config = Config::new();
        config.set("boot.kernel", "/nonexistent/vmlinuz");
        let err = read_boot_files(&config, 256 << 20).err().unwrap();
        assert_eq!(
            err.to_string(),
            "boot.kernel: /nonexistent/vmlinuz: No such file or directory"
        );
        assert!(read_boot_files(&Config::new(), 1 << 20).unwrap().is_none());
    }

    #[test]
    fn a_kernel_overlapping_the_boot_structures_is_refused() {
        let files = |paddr| BootFiles {
            kernel_path: PathBuf::from("k"),
            kernel: KernelImage::parse(linux::tests::synthetic_elf(paddr, &[0x90; 16], 0)).unwrap(),
            initrd: None,
            cmdline: String::new(),
        };
        let memory = GuestMemory::new(4 << 20).unwrap();
        let err = load(&memory, &files(0x7000)).unwrap_err().to_string();
        assert!(err.contains("overlaps the boot area"), "{err}");
        let info = load(&memory, &files(0x10_0000)).unwrap();
        assert_eq!(info.entry, 0x10_0000);
        assert_eq!(memory.slice(0x10_0000, 1).unwrap(), &[0x90]);
    }

    #[test]
    fn the_initrd_goes_page_aligned_to_the_top_of_low_memory() {
        let files = BootFiles {
            kernel_path: PathBuf::from("k"),
            kernel: KernelImage::parse(linux::tests::synthetic_elf(0x10_0000, &[0x90; 16], 0))
                .unwrap(),
            initrd: Some(vec![7u8; 0x1800]),
            cmdline: "console=ttyS0".into(),
        };
        let memory = GuestMemory::new(8 << 20).unwrap();
        let info = load(&memory, &files).unwrap();
        assert_eq!(info.initrd, Some(((8 << 20) - 0x2000, 0x1800)));
        assert_eq!(memory.slice((8 << 20) - 0x2000, 1).unwrap(), &[7]);
        let params = memory.slice(BOOT_PARAMS_ADDR, 0x1000).unwrap();
        assert_eq!(
            &params[0x218..0x21c],
            &(((8u32 << 20) - 0x2000).to_le_bytes())
        );
        assert_eq!(params[0x1e8], 3, "three E820 entries");
        assert_eq!(memory.slice(CMDLINE_ADDR, 14).unwrap(), b"console=ttyS0\0");
        let too_big = BootFiles {
            initrd: Some(vec![0; 8 << 20]),
            ..files
        };
        assert!(load(&memory, &too_big).is_err());
    }
}
