//! Guest physical memory, laid out as bhyve lays it out.
//!
//! bhyve maps guest RAM as at most two segments: low memory from GPA 0 up to the low-memory
//! limit (3 GiB, the bottom of the 32-bit PCI hole), and whatever is left above 4 GiB. Each
//! segment here is one host mapping ([`GuestRegion`]); the backend registers each one with the
//! hypervisor. A region can be built from any writable mapping, so snapshot restore can hand in
//! a private (copy-on-write) mapping of a saved file instead of anonymous memory.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

use memmap2::{MmapMut, MmapOptions};

/// Guest RAM below this address is "low memory"; the PCI hole sits above it up to 4 GiB.
pub const LOWMEM_LIMIT: u64 = 3 << 30;
/// Where RAM beyond [`LOWMEM_LIMIT`] continues.
pub const HIGHMEM_BASE: u64 = 4 << 30;
/// `memory.size` when the configuration does not name one (bhyve's default).
pub const DEFAULT_MEMSIZE: u64 = 256 << 20;
/// Guest memory is handled in pages of this size (sizes are rounded up to it).
pub const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemoryError {
    #[error("guest memory size {0:#x} is invalid")]
    InvalidSize(u64),
    #[error("cannot map {size:#x} bytes of guest memory: {reason}")]
    Map { size: u64, reason: String },
    #[error("guest physical range {gpa:#x}+{len:#x} is not RAM")]
    OutOfRange { gpa: u64, len: u64 },
    #[error("region at {gpa:#x} of {len:#x} bytes does not match the memory layout")]
    LayoutMismatch { gpa: u64, len: u64 },
    #[error("cannot wire {size:#x} bytes of guest memory: {reason}")]
    Wire { size: u64, reason: String },
    #[error("cannot move guest memory at {gpa:#x} into fresh memory: {reason}")]
    Move { gpa: u64, reason: String },
}

/// Where each RAM segment of a VM with `size` bytes of memory goes: `(gpa, length)` pairs,
/// low memory first.
pub fn layout(size: u64) -> Result<Vec<(u64, u64)>, MemoryError> {
    if size == 0 {
        return Err(MemoryError::InvalidSize(size));
    }
    // bhyve rounds the size to whole pages.
    let size = size
        .checked_add(PAGE_SIZE - 1)
        .map(|s| s & !(PAGE_SIZE - 1))
        .ok_or(MemoryError::InvalidSize(size))?;
    let lowmem = size.min(LOWMEM_LIMIT);
    let mut regions = vec![(0, lowmem)];
    if size > LOWMEM_LIMIT {
        let highmem = size - LOWMEM_LIMIT;
        HIGHMEM_BASE
            .checked_add(highmem)
            .ok_or(MemoryError::InvalidSize(size))?;
        regions.push((HIGHMEM_BASE, highmem));
    }
    Ok(regions)
}

/// One contiguous piece of guest RAM backed by one host mapping.
pub struct GuestRegion {
    gpa: u64,
    mapping: MmapMut,
    /// Fresh anonymous memory: a page the host never populated reads as zero. Set once a
    /// file-backed region is moved into anonymous memory.
    anonymous: AtomicBool,
}

impl GuestRegion {
    /// Fresh zero-filled anonymous memory for `len` bytes at `gpa` (pages are reserved lazily).
    pub fn anonymous(gpa: u64, len: u64) -> Result<Self, MemoryError> {
        let size = usize::try_from(len).map_err(|_| MemoryError::InvalidSize(len))?;
        // No swap reservation: like bhyve's guest memory, pages are only committed when the
        // guest touches them, so a large VM does not need the host's RAM up front.
        let mapping = MmapOptions::new()
            .len(size)
            .no_reserve_swap()
            .map_anon()
            .map_err(|e| MemoryError::Map {
                size: len,
                reason: e.to_string(),
            })?;
        Ok(Self {
            gpa,
            mapping,
            anonymous: AtomicBool::new(true),
        })
    }

    /// A region backed by a mapping made elsewhere, e.g. `MmapOptions::map_copy` of a saved RAM
    /// image for a restore.
    pub fn from_mapping(gpa: u64, mapping: MmapMut) -> Self {
        Self {
            gpa,
            mapping,
            anonymous: AtomicBool::new(false),
        }
    }

    /// Which 4 KiB pages of the region may hold data, so a reader can skip the others without
    /// touching them (reading an untouched page would make the host populate it). `None` when
    /// that is not known: every page must then be read. Only anonymous memory can say: a page
    /// that is neither present nor swapped out was never written and reads as zero. Pages of a
    /// file mapping hold file data whether present or not.
    pub fn populated_pages(&self) -> Option<Vec<bool>> {
        if !self.anonymous.load(Ordering::SeqCst) {
            return None;
        }
        populated_pages(self.host_address(), self.mapping.len())
    }

    /// Bytes of the region in host memory now (FreeBSD's "Resident memory" statistic), or
    /// `None` when the host does not say.
    pub fn resident_bytes(&self) -> Option<u64> {
        resident_pages(self.host_address(), self.mapping.len())
            .map(|pages| pages.iter().filter(|&&present| present).count() as u64 * 4096)
    }

    /// First guest physical address of the region.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.mapping.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.mapping.is_empty()
    }

    /// Host virtual address of the region's first byte (what the hypervisor is told).
    pub fn host_address(&self) -> *mut u8 {
        self.mapping.as_ptr() as *mut u8
    }

    /// The region's bytes. They change under the reader while vCPUs run; pause them first when
    /// a consistent copy matters (snapshots).
    pub fn as_slice(&self) -> &[u8] {
        &self.mapping
    }

    /// The region's bytes for filling before any vCPU can see them (a restore by copy).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.mapping
    }

    /// Put `replacement` (fresh anonymous memory, as long as the region, that holds what the
    /// region's file holds) in place of the region's mapping, at the same host address, so
    /// the hypervisor's view of guest memory stays where it is and the file is no longer used.
    /// The pages the process holds as private copies (written since the file was mapped) are
    /// copied over first; nothing may write the region meanwhile (pause the vCPUs). Returns the
    /// bytes copied.
    #[cfg(target_os = "linux")]
    fn install(&self, mut replacement: Replacement) -> Result<u64, MemoryError> {
        let len = self.mapping.len();
        let old = self.host_address();
        if replacement.len != len {
            return Err(MemoryError::LayoutMismatch {
                gpa: self.gpa,
                len: replacement.len as u64,
            });
        }
        let page = PAGE_SIZE as usize;
        let pages = len.div_ceil(page);
        let copy = private_pages(old, len).unwrap_or_else(|| vec![true; pages]);
        let fresh = replacement.address;
        let mut copied = 0u64;
        let mut index = 0;
        while index < pages {
            if !copy[index] {
                index += 1;
                continue;
            }
            let run = copy[index..].iter().take_while(|&&c| c).count();
            let offset = index * page;
            let bytes = (run * page).min(len - offset);
            // SAFETY: both ranges lie inside mappings of `len` bytes, which are distinct.
            unsafe { std::ptr::copy_nonoverlapping(old.add(offset), fresh.add(offset), bytes) };
            copied += bytes as u64;
            index += run;
        }
        // SAFETY: moves the replacement onto the region's range, replacing the old mapping in
        // one step (a concurrent reader sees either, with the same bytes). `self.mapping` still
        // describes that range, address and length unchanged, and unmaps it when dropped.
        let moved = unsafe {
            libc::mremap(
                fresh.cast(),
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                old.cast::<libc::c_void>(),
            )
        };
        if moved == libc::MAP_FAILED {
            return Err(MemoryError::Move {
                gpa: self.gpa,
                reason: std::io::Error::last_os_error().to_string(),
            });
        }
        // The replacement's own range is gone with the move.
        replacement.address = std::ptr::null_mut();
        self.anonymous.store(true, Ordering::SeqCst);
        Ok(copied)
    }

    fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa >= self.gpa
            && gpa
                .checked_add(len)
                .is_some_and(|end| end <= self.gpa + self.len())
    }
}

/// Bits of a `/proc/self/pagemap` entry (see the kernel's admin-guide/mm/pagemap).
#[cfg(target_os = "linux")]
const PAGEMAP_PRESENT: u64 = 1 << 63;
#[cfg(target_os = "linux")]
const PAGEMAP_SWAPPED: u64 = 1 << 62;
/// The page is a file's (page cache) or shared memory, not a private copy.
#[cfg(target_os = "linux")]
const PAGEMAP_FILE_OR_SHARED: u64 = 1 << 61;

/// Which pages at `address` (page aligned, `len` bytes) the process has: present or swapped
/// out. `None` when the kernel does not say.
#[cfg(target_os = "linux")]
fn populated_pages(address: *mut u8, len: usize) -> Option<Vec<bool>> {
    pagemap(address, len, |entry| {
        entry & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED) != 0
    })
}

/// Which pages at `address` (page aligned, `len` bytes) are in memory.
#[cfg(target_os = "linux")]
fn resident_pages(address: *mut u8, len: usize) -> Option<Vec<bool>> {
    pagemap(address, len, |entry| entry & PAGEMAP_PRESENT != 0)
}

/// Which pages at `address` (page aligned, `len` bytes) are the process's private copies: in a
/// private file mapping, the pages written since it was mapped (present but not the file's,
/// or swapped out). `None` when the kernel does not say.
#[cfg(target_os = "linux")]
fn private_pages(address: *mut u8, len: usize) -> Option<Vec<bool>> {
    pagemap(address, len, |entry| {
        entry & PAGEMAP_SWAPPED != 0
            || (entry & PAGEMAP_PRESENT != 0 && entry & PAGEMAP_FILE_OR_SHARED == 0)
    })
}

/// `/proc/self/pagemap` entries of the pages at `address`, each turned into a flag by `test`.
#[cfg(target_os = "linux")]
fn pagemap(address: *mut u8, len: usize, test: impl Fn(u64) -> bool) -> Option<Vec<bool>> {
    use std::os::unix::fs::FileExt;
    const PAGE: usize = 4096;
    if address as usize % PAGE != 0 || len % PAGE != 0 {
        return None;
    }
    let pagemap = std::fs::File::open("/proc/self/pagemap").ok()?;
    let pages = len / PAGE;
    let mut flags = Vec::with_capacity(pages);
    let mut entries = vec![0u8; 8 * 4096];
    let first = (address as usize / PAGE) as u64;
    let mut done = 0usize;
    while done < pages {
        let count = (pages - done).min(entries.len() / 8);
        let buf = &mut entries[..count * 8];
        pagemap.read_exact_at(buf, (first + done as u64) * 8).ok()?;
        flags.extend(buf.chunks_exact(8).map(|e| {
            let mut word = [0u8; 8];
            word.copy_from_slice(e);
            test(u64::from_ne_bytes(word))
        }));
        done += count;
    }
    Some(flags)
}

#[cfg(not(target_os = "linux"))]
fn populated_pages(_address: *mut u8, _len: usize) -> Option<Vec<bool>> {
    None
}

#[cfg(not(target_os = "linux"))]
fn resident_pages(_address: *mut u8, _len: usize) -> Option<Vec<bool>> {
    None
}

/// Fresh anonymous memory made ready, while the guest runs, to take a file-backed region's
/// place ([`GuestMemory::new_replacement`], [`GuestMemory::install`]).
#[cfg(target_os = "linux")]
pub struct Replacement {
    gpa: u64,
    /// Null once installed.
    address: *mut u8,
    len: usize,
}

#[cfg(target_os = "linux")]
impl Replacement {
    /// Guest physical address of the region it replaces.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Its bytes, for filling with what the region's file holds.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: a live private mapping of `len` bytes that nothing else can reach before
        // it is installed; the borrow of `self` keeps it alive and unshared.
        unsafe { std::slice::from_raw_parts_mut(self.address, self.len) }
    }
}

#[cfg(target_os = "linux")]
impl Drop for Replacement {
    fn drop(&mut self) {
        if !self.address.is_null() {
            // SAFETY: the mapping made by `new_replacement`, never installed: nobody else has it.
            unsafe { libc::munmap(self.address.cast(), self.len) };
        }
    }
}

/// A piece of guest memory a device reads or writes (a DMA buffer): guest-physical address and
/// length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: u64,
    pub len: u64,
}

/// All RAM of one VM.
pub struct GuestMemory {
    regions: Vec<GuestRegion>,
    /// [`GuestMemory::wire`] and [`GuestMemory::advise_dontdump`] were applied: memory moved
    /// into a new mapping gets them again.
    wired: AtomicBool,
    /// Held shared by every write of guest memory from outside the vCPUs (device worker
    /// threads) and exclusively while a region moves to a new mapping, so no write lands in
    /// the old mapping after its pages were copied.
    writers: RwLock<()>,
    #[cfg(target_os = "linux")]
    dontdump: AtomicBool,
}

// SAFETY: the mappings live as long as `GuestMemory`; every access through the API copies bytes
// with raw pointers inside bounds-checked ranges, exactly like the guest's own concurrent
// accesses to the same memory, so sharing between threads adds no new hazard.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Anonymous RAM of `size` bytes laid out as [`layout`] says.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        let regions = layout(size)?
            .into_iter()
            .map(|(gpa, len)| GuestRegion::anonymous(gpa, len))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::with_regions(regions))
    }

    /// RAM assembled from existing regions (e.g. restored from a snapshot). The regions must be
    /// exactly the ones [`layout`] gives for their total size.
    pub fn from_regions(regions: Vec<GuestRegion>) -> Result<Self, MemoryError> {
        let total: u64 = regions.iter().map(GuestRegion::len).sum();
        let expected = layout(total)?;
        if expected.len() != regions.len() {
            let first = regions.first().map_or((0, 0), |r| (r.gpa, r.len()));
            return Err(MemoryError::LayoutMismatch {
                gpa: first.0,
                len: first.1,
            });
        }
        for (region, (gpa, len)) in regions.iter().zip(expected) {
            if region.gpa != gpa || region.len() != len {
                return Err(MemoryError::LayoutMismatch {
                    gpa: region.gpa,
                    len: region.len(),
                });
            }
        }
        Ok(Self::with_regions(regions))
    }

    fn with_regions(regions: Vec<GuestRegion>) -> Self {
        Self {
            regions,
            wired: AtomicBool::new(false),
            writers: RwLock::new(()),
            #[cfg(target_os = "linux")]
            dontdump: AtomicBool::new(false),
        }
    }

    /// Fresh zero-filled anonymous memory for the region at `gpa`, to fill and [`install`] in
    /// its place.
    ///
    /// [`install`]: GuestMemory::install
    #[cfg(target_os = "linux")]
    pub fn new_replacement(&self, gpa: u64) -> Result<Replacement, MemoryError> {
        let region = self.region_at(gpa)?;
        let len = region.mapping.len();
        // SAFETY: a new private anonymous mapping at an address of the kernel's choosing; no
        // existing memory is affected.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(MemoryError::Map {
                size: len as u64,
                reason: std::io::Error::last_os_error().to_string(),
            });
        }
        Ok(Replacement {
            gpa,
            address: address.cast(),
            len,
        })
    }

    /// Put `replacement`, filled with what the region's file holds, in place of the region's
    /// file-backed mapping at the same host address; the pages the guest wrote since the file
    /// was mapped are copied over first. The vCPUs must be paused meanwhile; device threads
    /// wait (see [`GuestMemory::writing`]). Returns the bytes copied from the old mapping.
    #[cfg(target_os = "linux")]
    pub fn install(&self, replacement: Replacement) -> Result<u64, MemoryError> {
        let region = self.region_at(replacement.gpa)?;
        let _moving = self.writers.write().unwrap_or_else(|e| e.into_inner());
        let copied = region.install(replacement)?;
        // The new mapping has none of the old one's attributes.
        if self.dontdump.load(Ordering::SeqCst) {
            advise_dontdump(region);
        }
        if self.wired.load(Ordering::SeqCst) {
            wire(region)?;
        }
        Ok(copied)
    }

    #[cfg(target_os = "linux")]
    fn region_at(&self, gpa: u64) -> Result<&GuestRegion, MemoryError> {
        self.regions
            .iter()
            .find(|r| r.gpa == gpa)
            .ok_or(MemoryError::OutOfRange { gpa, len: 0 })
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(GuestRegion::len).sum()
    }

    /// End of low memory (the first address above the low RAM segment).
    pub fn lowmem_end(&self) -> u64 {
        self.regions.first().map_or(0, |r| r.gpa + r.len())
    }

    /// Size of RAM above 4 GiB (0 when there is none).
    pub fn highmem_size(&self) -> u64 {
        self.regions.get(1).map_or(0, GuestRegion::len)
    }

    pub fn regions(&self) -> &[GuestRegion] {
        &self.regions
    }

    fn find(&self, gpa: u64, len: u64) -> Result<(&GuestRegion, usize), MemoryError> {
        self.regions
            .iter()
            .find(|r| r.contains(gpa, len))
            .map(|r| (r, (gpa - r.gpa) as usize))
            .ok_or(MemoryError::OutOfRange { gpa, len })
    }

    /// Host address of `len` bytes at `gpa`, which must lie inside one region.
    pub fn host_address(&self, gpa: u64, len: u64) -> Result<*mut u8, MemoryError> {
        let (region, offset) = self.find(gpa, len)?;
        // SAFETY: `find` checked that offset+len lies inside the region's mapping.
        Ok(unsafe { region.host_address().add(offset) })
    }

    /// Keep guest memory where it is while the guard lives: for a device that writes guest
    /// memory through [`GuestMemory::host_address`] (DMA), for the length of the transfer.
    pub fn writing(&self) -> RwLockReadGuard<'_, ()> {
        self.writers.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Copy `data` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        let _writing = self.writing();
        let dst = self.host_address(gpa, data.len() as u64)?;
        // SAFETY: `dst` is valid for data.len() bytes (bounds checked above) and cannot overlap
        // `data`, which Rust guarantees is not aliased mutably.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Ok(())
    }

    /// Copy guest memory at `gpa` into `data`.
    pub fn read(&self, gpa: u64, data: &mut [u8]) -> Result<(), MemoryError> {
        let src = self.host_address(gpa, data.len() as u64)?;
        // SAFETY: `src` is valid for data.len() bytes (bounds checked above); `data` is an
        // exclusive borrow distinct from guest memory.
        unsafe { std::ptr::copy_nonoverlapping(src, data.as_mut_ptr(), data.len()) };
        Ok(())
    }

    /// Zero `len` bytes at `gpa`.
    pub fn fill_zero(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        let _writing = self.writing();
        let dst = self.host_address(gpa, len)?;
        // SAFETY: `dst` is valid for `len` bytes (bounds checked above).
        unsafe { std::ptr::write_bytes(dst, 0, len as usize) };
        Ok(())
    }

    /// A view of `len` bytes at `gpa`. The guest may change them while vCPUs run.
    pub fn slice(&self, gpa: u64, len: u64) -> Result<&[u8], MemoryError> {
        let (region, offset) = self.find(gpa, len)?;
        Ok(&region.as_slice()[offset..offset + len as usize])
    }

    /// One volatile load of a naturally aligned `u16` (shared ring indexes the guest updates
    /// concurrently); a misaligned one is copied byte by byte.
    pub fn load_u16(&self, gpa: u64) -> Result<u16, MemoryError> {
        let src = self.host_address(gpa, 2)?;
        if src as usize % 2 != 0 {
            let mut bytes = [0u8; 2];
            self.read(gpa, &mut bytes)?;
            return Ok(u16::from_le_bytes(bytes));
        }
        // SAFETY: `src` is valid for 2 bytes (bounds checked above) and aligned (checked).
        Ok(u16::from_le(unsafe {
            std::ptr::read_volatile(src.cast::<u16>())
        }))
    }

    /// One volatile store of a naturally aligned `u16`, so the guest never sees half of it.
    pub fn store_u16(&self, gpa: u64, value: u16) -> Result<(), MemoryError> {
        let _writing = self.writing();
        let dst = self.host_address(gpa, 2)?;
        if dst as usize % 2 != 0 {
            return self.write(gpa, &value.to_le_bytes());
        }
        // SAFETY: `dst` is valid for 2 bytes (bounds checked above) and aligned (checked).
        unsafe { std::ptr::write_volatile(dst.cast::<u16>(), value.to_le()) };
        Ok(())
    }

    pub fn read_u64(&self, gpa: u64) -> Result<u64, MemoryError> {
        let mut bytes = [0u8; 8];
        self.read(gpa, &mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    }

    pub fn write_u64(&self, gpa: u64, value: u64) -> Result<(), MemoryError> {
        self.write(gpa, &value.to_le_bytes())
    }

    /// Keep all guest memory resident (`-S`, `memory.wired`), as bhyve wires it.
    pub fn wire(&self) -> Result<(), MemoryError> {
        self.wired.store(true, Ordering::SeqCst);
        self.regions.iter().try_for_each(wire)
    }

    /// Mark the memory as not wanted in core dumps and merge-able as the host sees fit; failures
    /// are harmless.
    #[cfg(target_os = "linux")]
    pub fn advise_dontdump(&self) {
        self.dontdump.store(true, Ordering::SeqCst);
        self.regions.iter().for_each(advise_dontdump);
    }
}

fn wire(region: &GuestRegion) -> Result<(), MemoryError> {
    // SAFETY: the range is exactly one live mapping owned by `region`; mlock only changes how
    // the kernel pages it.
    let rc = unsafe { libc::mlock(region.host_address().cast(), region.len() as usize) };
    if rc != 0 {
        return Err(MemoryError::Wire {
            size: region.len(),
            reason: std::io::Error::last_os_error().to_string(),
        });
    }
    Ok(())
}

/// MADV_DONTDUMP is Linux's; on FreeBSD guest memory belongs to the kernel's memory segments.
#[cfg(target_os = "linux")]
fn advise_dontdump(region: &GuestRegion) {
    // SAFETY: the range is exactly one live mapping owned by `region`.
    unsafe {
        libc::madvise(
            region.host_address().cast(),
            region.len() as usize,
            libc::MADV_DONTDUMP,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn fresh_anonymous_memory_reports_only_the_pages_written() {
        let mut region = GuestRegion::anonymous(0, 64 * 4096).unwrap();
        assert_eq!(region.populated_pages(), Some(vec![false; 64]));
        region.as_mut_slice()[5 * 4096 + 17] = 1;
        region.as_mut_slice()[40 * 4096] = 2;
        let populated = region.populated_pages().unwrap();
        let written: Vec<usize> = (0..64).filter(|&p| populated[p]).collect();
        assert_eq!(written, [5, 40]);
        // A file mapping cannot tell: its absent pages still hold file data.
        let file = GuestRegion::from_mapping(0, MmapOptions::new().len(4096).map_anon().unwrap());
        assert_eq!(file.populated_pages(), None);
    }

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn small_memory_is_one_low_segment() {
        assert_eq!(layout(256 * MIB).unwrap(), vec![(0, 256 * MIB)]);
    }

    #[test]
    fn three_gib_fills_low_memory_exactly() {
        assert_eq!(layout(3 * GIB).unwrap(), vec![(0, 3 * GIB)]);
    }

    #[test]
    fn memory_beyond_three_gib_continues_at_four_gib() {
        assert_eq!(
            layout(5 * GIB).unwrap(),
            vec![(0, 3 * GIB), (4 * GIB, 2 * GIB)]
        );
    }

    #[test]
    fn sizes_round_up_to_pages_and_zero_is_refused() {
        assert_eq!(layout(MIB + 1).unwrap(), vec![(0, MIB + PAGE_SIZE)]);
        assert_eq!(layout(0), Err(MemoryError::InvalidSize(0)));
        assert!(layout(u64::MAX).is_err());
    }

    #[test]
    fn reads_and_writes_are_bounds_checked() {
        let mem = GuestMemory::new(2 * MIB).unwrap();
        mem.write(0x1000, b"bhyve").unwrap();
        let mut back = [0u8; 5];
        mem.read(0x1000, &mut back).unwrap();
        assert_eq!(&back, b"bhyve");
        assert_eq!(mem.slice(0x1000, 5).unwrap(), b"bhyve");
        assert_eq!(
            mem.write(2 * MIB - 2, b"abc"),
            Err(MemoryError::OutOfRange {
                gpa: 2 * MIB - 2,
                len: 3
            })
        );
        assert!(mem.read(u64::MAX, &mut back).is_err());
        assert!(mem.slice(2 * MIB, 1).is_err());
        mem.write_u64(8, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(mem.read_u64(8).unwrap(), 0x1122_3344_5566_7788);
    }

    #[test]
    fn accesses_reach_high_memory_but_not_the_pci_hole() {
        let regions = vec![
            GuestRegion::anonymous(0, 3 * GIB).unwrap(),
            GuestRegion::anonymous(4 * GIB, 16 * MIB).unwrap(),
        ];
        let mem = GuestMemory::from_regions(regions).unwrap();
        assert_eq!(mem.lowmem_end(), 3 * GIB);
        assert_eq!(mem.highmem_size(), 16 * MIB);
        mem.write(4 * GIB + 5, &[7]).unwrap();
        assert_eq!(mem.slice(4 * GIB + 5, 1).unwrap(), &[7]);
        assert!(mem.write(3 * GIB, &[1]).is_err());
        assert!(mem.write(3 * GIB - 1, &[1, 2]).is_err());
    }

    #[test]
    fn regions_from_elsewhere_must_match_the_layout() {
        let wrong = vec![GuestRegion::anonymous(0x1000, MIB).unwrap()];
        assert!(matches!(
            GuestMemory::from_regions(wrong),
            Err(MemoryError::LayoutMismatch { .. })
        ));
        let map = MmapOptions::new().len(MIB as usize).map_anon().unwrap();
        let mem = GuestMemory::from_regions(vec![GuestRegion::from_mapping(0, map)]).unwrap();
        assert_eq!(mem.size(), MIB);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_file_mapping_replaced_by_anonymous_memory_keeps_its_bytes_and_address_without_the_file() {
        use std::io::Write;
        let path = std::env::temp_dir().join(format!("bhyve-rs-move-{}.img", std::process::id()));
        // Data in pages 0..4 and 8..9; the rest of the 16 pages is a hole.
        let mut data = vec![0u8; 16 * 4096];
        data[..4 * 4096].fill(0x5a);
        data[8 * 4096..9 * 4096].fill(0x6b);
        std::fs::write(&path, &data).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: the file is private to this test; it is cut short only after the move.
        let map = unsafe { MmapOptions::new().map_copy(&file) }.unwrap();
        let mem = GuestMemory::from_regions(vec![GuestRegion::from_mapping(0, map)]).unwrap();
        let address = mem.regions()[0].host_address();
        // The guest read a page and wrote into the hole and over file data.
        assert_eq!(mem.slice(8 * 4096, 1).unwrap(), &[0x6b]);
        mem.write(12 * 4096 + 3, b"hole").unwrap();
        mem.write(2 * 4096, b"over").unwrap();
        // Filled from the file (as the guest runs), then installed (with the guest stopped).
        let mut replacement = mem.new_replacement(0).unwrap();
        for (start, end) in [(0, 4 * 4096), (8 * 4096, 9 * 4096)] {
            replacement.as_mut_slice()[start..end].copy_from_slice(&data[start..end]);
        }
        let copied = mem.install(replacement).unwrap();
        // Only the pages the guest wrote came from the old mapping.
        assert_eq!(copied, 2 * 4096);
        assert_eq!(mem.regions()[0].host_address(), address);
        // Anonymous now: untouched pages are known to read as zero.
        let populated = mem.regions()[0].populated_pages().unwrap();
        assert!(populated[0] && populated[2] && populated[12] && !populated[14]);
        // The file no longer matters: cut short and rewritten, nothing changes and nothing
        // faults.
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap()
            .write_all(&[0xffu8; 4096])
            .unwrap();
        let mut expected = data;
        expected[12 * 4096 + 3..12 * 4096 + 7].copy_from_slice(b"hole");
        expected[2 * 4096..2 * 4096 + 4].copy_from_slice(b"over");
        assert!(mem.slice(0, 16 * 4096).unwrap() == expected.as_slice());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_private_file_mapping_serves_as_ram_without_touching_the_file() {
        let path = std::env::temp_dir().join(format!("bhyve-rs-mem-{}.img", std::process::id()));
        std::fs::write(&path, vec![0xabu8; MIB as usize]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: the file is private to this test and not modified while mapped.
        let map = unsafe { MmapOptions::new().map_copy(&file) }.unwrap();
        let mem = GuestMemory::from_regions(vec![GuestRegion::from_mapping(0, map)]).unwrap();
        assert_eq!(mem.slice(0x100, 2).unwrap(), &[0xab, 0xab]);
        mem.write(0x100, &[1, 2]).unwrap();
        assert_eq!(mem.slice(0x100, 2).unwrap(), &[1, 2]);
        let on_disk = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(&on_disk[0x100..0x102], &[0xab, 0xab]);
    }
}
