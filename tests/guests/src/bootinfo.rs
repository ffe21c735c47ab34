//! Reads what the loader handed over (Linux `boot_params` or PVH `hvm_start_info`): the memory
//! map and the command line. Runs in ring 3, which can read all of low memory (identity mapped,
//! user accessible). Every count and length read here is bounded.

use crate::boot::{BOOT_INFO, BOOT_KIND, BOOT_LINUX, BOOT_PVH};
use core::sync::atomic::Ordering;

pub const E820_USABLE: u32 = 1;
const MAX_ENTRIES: usize = 32;
const MAX_CMDLINE: usize = 256;
/// Everything we read must lie in the identity-mapped first 4 GiB.
const MAPPED_LIMIT: u64 = 1 << 32;
const PVH_MAGIC: u32 = 0x336e_c578;

#[derive(Clone, Copy, Default)]
pub struct MemRange {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

pub struct BootInfo {
    pub protocol: &'static str,
    pub entries: [MemRange; MAX_ENTRIES],
    pub entry_count: usize,
    pub cmdline: [u8; MAX_CMDLINE],
    pub cmdline_len: usize,
}

/// Whether `len` bytes at `addr` lie in the identity-mapped first 4 GiB (and `addr` is not 0).
pub fn readable(addr: u64, len: u64) -> bool {
    addr != 0 && addr.checked_add(len).is_some_and(|end| end <= MAPPED_LIMIT)
}

/// Reads a plain integer at a physical address that `readable` accepted.
pub fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: callers check `readable(addr, size_of::<T>())`; the first 4 GiB are identity
    // mapped and user accessible, and T is a plain integer type.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

impl BootInfo {
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("<not UTF-8>")
    }

    pub fn entries(&self) -> &[MemRange] {
        &self.entries[..self.entry_count]
    }

    /// Value of `key=value` on the command line.
    pub fn option(&self, key: &str) -> Option<&str> {
        self.cmdline().split_ascii_whitespace().find_map(|word| {
            let (k, v) = word.split_once('=')?;
            (k == key).then_some(v)
        })
    }

    fn push(&mut self, addr: u64, size: u64, kind: u32) {
        if self.entry_count < MAX_ENTRIES {
            self.entries[self.entry_count] = MemRange { addr, size, kind };
            self.entry_count += 1;
        }
    }

    fn read_cmdline(&mut self, addr: u64) {
        if !readable(addr, 1) {
            return;
        }
        while self.cmdline_len < MAX_CMDLINE && readable(addr + self.cmdline_len as u64, 1) {
            let b: u8 = read(addr + self.cmdline_len as u64);
            if b == 0 {
                break;
            }
            self.cmdline[self.cmdline_len] = if b.is_ascii() { b } else { b'?' };
            self.cmdline_len += 1;
        }
    }

    pub fn load() -> BootInfo {
        let mut info = BootInfo {
            protocol: "unknown",
            entries: [MemRange::default(); MAX_ENTRIES],
            entry_count: 0,
            cmdline: [0; MAX_CMDLINE],
            cmdline_len: 0,
        };
        let base = BOOT_INFO.load(Ordering::Relaxed);
        match BOOT_KIND.load(Ordering::Relaxed) {
            BOOT_LINUX if readable(base, 4096) => {
                info.protocol = "linux";
                let count = usize::from(read::<u8>(base + 0x1e8)).min(128);
                for i in 0..count as u64 {
                    let entry = base + 0x2d0 + 20 * i;
                    info.push(read(entry), read(entry + 8), read(entry + 16));
                }
                let cmdline = u64::from(read::<u32>(base + 0x228))
                    | (u64::from(read::<u32>(base + 0xc8)) << 32);
                info.read_cmdline(cmdline);
            }
            BOOT_PVH if readable(base, 56) && read::<u32>(base) == PVH_MAGIC => {
                info.protocol = "pvh";
                info.read_cmdline(read(base + 24));
                let version: u32 = read(base + 4);
                let memmap: u64 = read(base + 40);
                let count = if version >= 1 {
                    read::<u32>(base + 48).min(128)
                } else {
                    0
                };
                if readable(memmap, 24 * u64::from(count)) {
                    for i in 0..u64::from(count) {
                        let entry = memmap + 24 * i;
                        info.push(read(entry), read(entry + 8), read(entry + 16));
                    }
                }
            }
            _ => {}
        }
        info
    }

    /// Largest usable range above `floor` (and below 4 GiB), as (start, end).
    pub fn largest_free(&self, floor: u64) -> Option<(u64, u64)> {
        self.entries()
            .iter()
            .filter(|e| e.kind == E820_USABLE)
            .filter_map(|e| {
                let start = e.addr.max(floor).next_multiple_of(4096);
                let end = e.addr.saturating_add(e.size).min(MAPPED_LIMIT) & !0xfff;
                (start < end).then_some((start, end))
            })
            .max_by_key(|(start, end)| end - start)
    }
}

pub fn kind_name(kind: u32) -> &'static str {
    match kind {
        1 => "usable",
        2 => "reserved",
        3 => "acpi",
        4 => "nvs",
        5 => "unusable",
        7 => "pmem",
        _ => "other",
    }
}
