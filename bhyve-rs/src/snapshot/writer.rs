//! Writing a snapshot file: sections, sparse RAM, then table and header, atomically.
//!
//! The file is written without a name (`O_TMPFILE`) where the file system allows it, so a writer
//! killed part way leaves nothing behind; elsewhere under a hidden temporary name, which a later
//! writer of the same target removes once its process is gone. Only when complete and fsynced
//! does the file get a temporary name and is renamed to its final one; the directory is fsynced
//! after the rename. Until then an existing file with the final name is untouched, and on any
//! error (or if the writer is dropped without `commit`) the temporary file is removed. The rename only ever replaces a regular file:
//! a device node, FIFO, socket, directory or symbolic link under the final name is refused.
//!
//! Guest memory goes straight from its pages to the device where the system allows (direct
//! I/O), by several threads for a large region: on a host whose page cache is busy, copying
//! into it and writing it back takes several times longer than the device needs.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::fcntl::AtFlags;
use nix::fcntl::{open, openat, renameat, OFlag};
use nix::sys::stat::{fstatat, Mode, SFlag};
use nix::unistd::{fsync, unlinkat, UnlinkatFlags};
use serde::Serialize;

use super::format::{
    align_up, check_name, encode_entry, encode_header, encode_ram_index, label, HeaderInfo,
    Requirement, SectionEntry, SectionKind, CONFIG_SECTION, CONFIG_VERSION, DATA_START, ENTRY_SIZE,
    FORMAT_PAGE_SIZE, MAX_DATA_SECTION_LEN, MAX_RAM_REGIONS, MAX_SECTIONS, RAM_CHUNK_SIZE,
    RAM_FILE_ALIGN, RAM_INDEX_SECTION, RAM_INDEX_VERSION, RAM_SECTION, RAM_VERSION,
    SECTION_FLAG_MANDATORY,
};
use super::ram::{is_zero, open_direct, DIRECT_IO_MAX, DIRECT_IO_MIN};
use super::{encode_section, SnapshotError};

/// What an untouched page of guest memory reads as.
static ZERO_PAGE: [u8; FORMAT_PAGE_SIZE as usize] = [0; FORMAT_PAGE_SIZE as usize];

/// Longest file name most file systems accept (NAME_MAX).
const NAME_MAX: usize = 255;

/// Distinguishes temporary files of several writers in one process.
static TEMP_COUNTER: AtomicU32 = AtomicU32::new(0);

/// How much of a RAM region reached the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamWriteStats {
    /// Size of the region.
    pub logical: u64,
    /// Bytes actually written: the pages that were not all zero.
    pub written: u64,
}

/// Failure points a test can force, to prove the cleanup paths.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailPoint {
    BeforeRename,
}

/// Builds one snapshot file. Add sections and RAM regions in any order, then [`commit`].
///
/// [`commit`]: SnapshotWriter::commit
pub struct SnapshotWriter {
    dir: OwnedFd,
    name: String,
    temp_name: String,
    file: File,
    /// `file` opened again for direct I/O, for guest memory; `None` where that is not offered.
    ram_file: Option<File>,
    info: HeaderInfo,
    entries: Vec<SectionEntry>,
    /// Per RAM region: instance and one CRC-32C per chunk, written as `ram-index` at commit.
    ram_index: Vec<(String, Vec<u32>)>,
    /// Per RAM region, per 4 KiB page: the file holds data for it (it is not a hole).
    ram_in_file: Vec<Vec<bool>>,
    /// Next free byte in the file.
    cursor: u64,
    has_config: bool,
    /// A write failed part way: the file may hold bytes no section accounts for.
    poisoned: bool,
    /// The temporary file no longer exists under `temp_name` (renamed or removed), or never
    /// had that name.
    temp_gone: bool,
    /// The file has no name yet (`O_TMPFILE`): commit links it in under `temp_name` first.
    unnamed: bool,
    /// CRC-32C of an all-zero chunk, by chunk length.
    zero_chunk_crc: HashMap<usize, u32>,
    #[cfg(test)]
    pub(crate) fail_at: Option<FailPoint>,
}

impl SnapshotWriter {
    /// Start a snapshot named `name` in the directory open as `dir` (the control socket's
    /// `fddir`). `name` is a plain file name, not a path.
    pub fn create_in<D: AsFd>(
        dir: D,
        name: &str,
        info: HeaderInfo,
    ) -> Result<SnapshotWriter, SnapshotError> {
        SnapshotWriter::create_in_with(dir, name, info, true)
    }

    /// [`create_in`](SnapshotWriter::create_in); `allow_unnamed: false` takes the named
    /// temporary file even where `O_TMPFILE` works (for tests of that path).
    pub(crate) fn create_in_with<D: AsFd>(
        dir: D,
        name: &str,
        info: HeaderInfo,
        allow_unnamed: bool,
    ) -> Result<SnapshotWriter, SnapshotError> {
        check_file_name(name)?;
        info.validate()?;
        let dir = dir
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| SnapshotError::io("duplicate directory descriptor", e))?;
        check_target(&dir, name)?;
        remove_dead_writers_files(&dir, name);
        let (file, temp_name, unnamed) = match create_unnamed(&dir).filter(|_| allow_unnamed) {
            Some(file) => (file, String::new(), true),
            None => {
                let (file, temp_name) = create_named(&dir, name)?;
                (file, temp_name, false)
            }
        };
        let file = File::from(file);
        Ok(SnapshotWriter {
            dir,
            name: name.to_string(),
            temp_name,
            ram_file: open_direct(&file, true),
            file,
            info,
            entries: Vec::new(),
            ram_index: Vec::new(),
            ram_in_file: Vec::new(),
            cursor: DATA_START,
            has_config: false,
            poisoned: false,
            temp_gone: unnamed,
            unnamed,
            zero_chunk_crc: HashMap::new(),
            #[cfg(test)]
            fail_at: None,
        })
    }

    /// Convenience for callers with a path: opens the parent directory and calls
    /// [`create_in`](SnapshotWriter::create_in).
    pub fn create(path: &Path, info: HeaderInfo) -> Result<SnapshotWriter, SnapshotError> {
        let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
            SnapshotError::InvalidArgument(format!(
                "'{}' does not end in a UTF-8 file name",
                path.display()
            ))
        })?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir = open(
            parent,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| SnapshotError::io(&format!("open {}", parent.display()), e.into()))?;
        SnapshotWriter::create_in(&dir, name, info)
    }

    /// Add a data section. `name` and `instance` are printable ASCII of at most 32 bytes
    /// (`instance` may be empty); `version` is the payload's own version.
    pub fn add_section(
        &mut self,
        name: &str,
        instance: &str,
        version: u32,
        requirement: Requirement,
        payload: &[u8],
    ) -> Result<(), SnapshotError> {
        if [CONFIG_SECTION, RAM_SECTION, RAM_INDEX_SECTION].contains(&name) {
            return Err(SnapshotError::InvalidArgument(format!(
                "section name '{name}' is reserved for the file format"
            )));
        }
        self.push_data(name, instance, version, requirement, payload)
    }

    /// Encode `value` with [`encode_section`] and add it as a data section.
    pub fn add_encoded<T: Serialize>(
        &mut self,
        name: &str,
        instance: &str,
        version: u32,
        requirement: Requirement,
        value: &T,
    ) -> Result<(), SnapshotError> {
        let payload = encode_section(value)?;
        self.add_section(name, instance, version, requirement, &payload)
    }

    /// Record the VM configuration (bhyve_config(5) keys and values), so that `bhyve -r FILE`
    /// needs no other arguments. Required once per snapshot.
    pub fn add_config<'a, I>(&mut self, pairs: I) -> Result<(), SnapshotError>
    where
        I: IntoIterator<Item = (&'a str, &'a str)>,
    {
        let pairs: Vec<(&str, &str)> = pairs.into_iter().collect();
        let payload = encode_section(&pairs)?;
        self.push_data(
            CONFIG_SECTION,
            "",
            CONFIG_VERSION,
            Requirement::Mandatory,
            &payload,
        )?;
        self.has_config = true;
        Ok(())
    }

    /// Write one guest memory segment based at guest-physical `gpa`. Pages that are all zero are
    /// not written: they stay holes in the file. `data.len()` and `gpa` must be multiples of
    /// 4096. Regions are numbered `0`, `1`, … in the order they are added.
    pub fn add_ram_region(
        &mut self,
        gpa: u64,
        data: &[u8],
    ) -> Result<RamWriteStats, SnapshotError> {
        self.add_ram_region_populated(gpa, data, None)
    }

    /// [`SnapshotWriter::add_ram_region`], told which pages may hold data (one flag per 4 KiB
    /// page, see [`crate::memory::GuestRegion::populated_pages`]): the others are taken as zero
    /// without being read, so saving a large guest that touched little memory neither scans
    /// nor populates the rest.
    pub fn add_ram_region_populated(
        &mut self,
        gpa: u64,
        data: &[u8],
        populated: Option<&[bool]>,
    ) -> Result<RamWriteStats, SnapshotError> {
        let page_count = data.len() / FORMAT_PAGE_SIZE as usize;
        if populated.is_some_and(|p| p.len() != page_count) {
            return Err(SnapshotError::InvalidArgument(format!(
                "RAM region at {gpa:#x}: page map does not cover its {page_count} pages"
            )));
        }
        let region = self.begin_ram_region(gpa, data.len() as u64)?;
        let written = self.write_ram_populated(region, data, populated)?;
        Ok(RamWriteStats {
            logical: data.len() as u64,
            written,
        })
    }

    /// Wait until what was written so far is on stable storage. A live checkpoint does this
    /// before stopping the guest: otherwise the kernel, with much of the file still dirty in
    /// the page cache, may hold up the few writes made while the guest is stopped until its
    /// write-back catches up.
    pub fn sync_data(&mut self) -> Result<(), SnapshotError> {
        self.check_not_poisoned()?;
        self.file
            .sync_data()
            .map_err(|e| SnapshotError::io("write back snapshot", e))
    }

    /// Whether a RAM region was added.
    pub fn has_ram(&self) -> bool {
        !self.ram_index.is_empty()
    }

    /// Reserve the file space of a guest memory segment based at guest-physical `gpa`, whose
    /// pages [`SnapshotWriter::write_ram_pages`] writes later, as often as needed (a live
    /// checkpoint writes a page again each time the guest changed it). Until a page is written
    /// it is a hole and reads as zero. `size` and `gpa` must be multiples of 4096. Regions are
    /// numbered `0`, `1`, … in the order they are added; the number is returned.
    pub fn begin_ram_region(&mut self, gpa: u64, size: u64) -> Result<usize, SnapshotError> {
        self.check_not_poisoned()?;
        let page = u64::from(FORMAT_PAGE_SIZE);
        if size == 0 || size % page != 0 || gpa % page != 0 {
            return Err(SnapshotError::InvalidArgument(format!(
                "RAM region at {gpa:#x} of {size:#x} bytes is not a non-empty whole number of pages"
            )));
        }
        let gpa_end = gpa.checked_add(size).ok_or_else(|| {
            SnapshotError::InvalidArgument(format!("RAM region at {gpa:#x} wraps around"))
        })?;
        if self.ram_index.len() >= MAX_RAM_REGIONS {
            return Err(SnapshotError::InvalidArgument(format!(
                "more than {MAX_RAM_REGIONS} RAM regions"
            )));
        }
        for other in self.entries.iter().filter(|e| e.kind == SectionKind::Ram) {
            if gpa < other.gpa + other.length && other.gpa < gpa_end {
                return Err(SnapshotError::InvalidArgument(format!(
                    "RAM region at {gpa:#x} overlaps region {} at {:#x}",
                    other.instance, other.gpa
                )));
            }
        }
        let offset = align_up(self.cursor, RAM_FILE_ALIGN).ok_or(SnapshotError::TooLarge)?;
        let end = offset.checked_add(size).ok_or(SnapshotError::TooLarge)?;
        let instance = self.ram_index.len().to_string();
        let chunks = size.div_ceil(u64::from(RAM_CHUNK_SIZE));
        let mut crcs = Vec::with_capacity(chunks as usize);
        for index in 0..chunks {
            let len = (size - index * u64::from(RAM_CHUNK_SIZE)).min(u64::from(RAM_CHUNK_SIZE));
            crcs.push(self.zero_crc(len as usize));
        }
        self.entries.push(SectionEntry {
            name: RAM_SECTION.to_string(),
            instance: instance.clone(),
            version: RAM_VERSION,
            kind: SectionKind::Ram,
            flags: SECTION_FLAG_MANDATORY,
            checksum: 0,
            offset,
            length: size,
            gpa,
        });
        self.ram_index.push((instance, crcs));
        self.ram_in_file.push(vec![false; (size / page) as usize]);
        self.cursor = end;
        Ok(self.ram_index.len() - 1)
    }

    /// [`SnapshotWriter::write_ram_pages`] of every page that `populated` (one flag per page,
    /// see [`crate::memory::GuestRegion::populated_pages`]; `None`: all) says may hold data.
    pub fn write_ram_populated(
        &mut self,
        region: usize,
        data: &[u8],
        populated: Option<&[bool]>,
    ) -> Result<u64, SnapshotError> {
        self.write_ram_pages(region, data, |page| {
            populated.is_none_or(|p| p.get(page).copied().unwrap_or(true))
        })
    }

    /// Write the pages of RAM region `region` (see [`SnapshotWriter::begin_ram_region`]) that
    /// `selected` names, from `data`, the region's memory as it is now. A selected page that is
    /// all zero is skipped if the file holds no data for it yet, and written otherwise (it
    /// replaces older data). The `ram-index` CRC of every chunk with a selected page is
    /// recomputed from `data`: pages written at some point are read there, the others count as
    /// the zeros the file holds. So once the last call saw `data` unchanged since each page's
    /// last write, the index describes the file exactly. Returns the bytes written.
    pub fn write_ram_pages(
        &mut self,
        region: usize,
        data: &[u8],
        selected: impl Fn(usize) -> bool + Sync,
    ) -> Result<u64, SnapshotError> {
        self.check_not_poisoned()?;
        let entry = self
            .entries
            .iter()
            .filter(|e| e.kind == SectionKind::Ram)
            .nth(region)
            .ok_or_else(|| SnapshotError::InvalidArgument(format!("no RAM region {region}")))?;
        if data.len() as u64 != entry.length {
            return Err(SnapshotError::InvalidArgument(format!(
                "RAM region {region} has {:#x} bytes, not {:#x}",
                entry.length,
                data.len()
            )));
        }
        let offset = entry.offset;
        let chunk_size = RAM_CHUNK_SIZE as usize;
        let chunks = data.len().div_ceil(chunk_size);
        let zero_crcs = ZeroCrcs {
            full: self.zero_crc(chunk_size),
            last: self.zero_crc(data.len() - (chunks - 1) * chunk_size),
            last_chunk: chunks - 1,
        };
        let writers = if data.len() >= PARALLEL_RAM_MIN {
            RAM_WRITERS
        } else {
            1
        };
        let chunks_per_writer = chunks.div_ceil(writers);
        let pages_per_chunk = chunk_size / FORMAT_PAGE_SIZE as usize;
        let sink = RamSink {
            direct: self.ram_file.as_ref(),
            buffered: &self.file,
        };
        let in_file = &mut self.ram_in_file[region];
        let crcs = &mut self.ram_index[region].1;
        let parts = in_file
            .chunks_mut(chunks_per_writer * pages_per_chunk)
            .zip(crcs.chunks_mut(chunks_per_writer))
            .enumerate()
            .map(|(index, (in_file, crcs))| RamPart {
                first_chunk: index * chunks_per_writer,
                in_file,
                crcs,
            });
        let selected = &selected;
        let results: Vec<std::io::Result<u64>> = if writers == 1 {
            parts
                .map(|part| part.write(&sink, offset, data, selected, &zero_crcs))
                .collect()
        } else {
            // Disjoint ranges of the region, each with its own writes in flight: the device
            // sees several requests at once, and the checksums are spread over the cores.
            std::thread::scope(|scope| {
                let handles: Vec<_> = parts
                    .map(|part| {
                        let (sink, zero_crcs) = (&sink, &zero_crcs);
                        scope.spawn(move || part.write(sink, offset, data, selected, zero_crcs))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(std::io::Error::other("snapshot writer thread failed"))
                        })
                    })
                    .collect()
            })
        };
        let mut written = 0;
        for result in results {
            match result {
                Ok(bytes) => written += bytes,
                Err(e) => {
                    self.poisoned = true;
                    return Err(SnapshotError::io(&format!("write RAM region {region}"), e));
                }
            }
        }
        Ok(written)
    }

    /// Write the `ram-index` sections, the section table and the header, fsync, rename to the
    /// final name and fsync the directory. On error nothing is left under the final name.
    pub fn commit(mut self) -> Result<(), SnapshotError> {
        self.check_not_poisoned()?;
        if !self.has_config {
            return Err(SnapshotError::InvalidArgument(
                "snapshot has no configuration section".to_string(),
            ));
        }
        let ram_index = std::mem::take(&mut self.ram_index);
        for (instance, crcs) in &ram_index {
            let payload = encode_ram_index(RAM_CHUNK_SIZE, crcs);
            self.push_data(
                RAM_INDEX_SECTION,
                instance,
                RAM_INDEX_VERSION,
                Requirement::Mandatory,
                &payload,
            )?;
        }

        let table_offset = align_up(self.cursor, 8).ok_or(SnapshotError::TooLarge)?;
        let mut table = Vec::with_capacity(self.entries.len() * ENTRY_SIZE);
        for entry in &self.entries {
            table.extend_from_slice(&encode_entry(entry));
        }
        let table_end = table_offset
            .checked_add(table.len() as u64)
            .ok_or(SnapshotError::TooLarge)?;
        self.file
            .write_all_at(&table, table_offset)
            .map_err(|e| SnapshotError::io("write section table", e))?;
        // Trailing zero pages of the last region are holes; the length must still cover them.
        self.file
            .set_len(table_end)
            .map_err(|e| SnapshotError::io("set file length", e))?;

        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let header = encode_header(
            &self.info,
            created,
            table_offset,
            self.entries.len() as u32,
            crc32c::crc32c(&table),
        );
        // The header goes last, so a file cut short anywhere before has no valid magic.
        self.file
            .write_all_at(&header, 0)
            .map_err(|e| SnapshotError::io("write header", e))?;
        let syncing = std::time::Instant::now();
        self.file
            .sync_all()
            .map_err(|e| SnapshotError::io("fsync snapshot", e))?;
        let synced = syncing.elapsed();

        #[cfg(test)]
        if self.fail_at == Some(FailPoint::BeforeRename) {
            return Err(SnapshotError::io(
                "rename snapshot",
                std::io::Error::other("injected failure"),
            ));
        }

        // Checked again: the target may have appeared while the file was written.
        check_target(&self.dir, &self.name)?;
        if self.unnamed {
            self.link_unnamed()?;
        }
        renameat(
            &self.dir,
            self.temp_name.as_str(),
            &self.dir,
            self.name.as_str(),
        )
        .map_err(|e| SnapshotError::io(&format!("rename to {}", self.name), e.into()))?;
        self.temp_gone = true;
        if let Err(errno) = fsync(&self.dir) {
            // Without the directory on disk the rename may not survive a crash; report failure
            // and leave nothing that a later restore could mistake for a durable snapshot.
            let _ = unlinkat(&self.dir, self.name.as_str(), UnlinkatFlags::NoRemoveDir);
            return Err(SnapshotError::io("fsync directory", errno.into()));
        }
        log::debug!(
            "snapshot {}: fsync {:.1} ms, link, rename and directory fsync {:.1} ms",
            self.name.escape_default(),
            synced.as_secs_f64() * 1e3,
            (syncing.elapsed() - synced).as_secs_f64() * 1e3
        );
        Ok(())
    }

    fn push_data(
        &mut self,
        name: &str,
        instance: &str,
        version: u32,
        requirement: Requirement,
        payload: &[u8],
    ) -> Result<(), SnapshotError> {
        check_name("section name", name, false)?;
        check_name("section instance", instance, true)?;
        if self
            .entries
            .iter()
            .any(|e| e.name == name && e.instance == instance)
        {
            return Err(SnapshotError::InvalidArgument(format!(
                "section {} added twice",
                label(name, instance)
            )));
        }
        // Leave room for the `ram-index` sections added at commit.
        if self.entries.len() + self.ram_index.len() >= MAX_SECTIONS as usize {
            return Err(SnapshotError::InvalidArgument(format!(
                "more than {MAX_SECTIONS} sections"
            )));
        }
        let length = payload.len() as u64;
        if length > MAX_DATA_SECTION_LEN {
            return Err(SnapshotError::InvalidArgument(format!(
                "section {} is {length} bytes, more than the limit of {MAX_DATA_SECTION_LEN}",
                label(name, instance)
            )));
        }
        self.check_not_poisoned()?;
        let offset = align_up(self.cursor, 8).ok_or(SnapshotError::TooLarge)?;
        if let Err(e) = self.file.write_all_at(payload, offset) {
            self.poisoned = true;
            return Err(SnapshotError::io(
                &format!("write section {}", label(name, instance)),
                e,
            ));
        }
        self.entries.push(SectionEntry {
            name: name.to_string(),
            instance: instance.to_string(),
            version,
            kind: SectionKind::Data,
            flags: match requirement {
                Requirement::Mandatory => SECTION_FLAG_MANDATORY,
                Requirement::Optional => 0,
            },
            checksum: crc32c::crc32c(payload),
            offset,
            length,
            gpa: 0,
        });
        self.cursor = offset + length;
        Ok(())
    }

    /// Give the complete unnamed file a temporary name, for the rename into place.
    fn link_unnamed(&mut self) -> Result<(), SnapshotError> {
        let pid = std::process::id();
        let mut result = Err(nix::errno::Errno::EEXIST);
        for _ in 0..16 {
            let serial = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            let temp_name = temp_name_for(&self.name, pid, serial);
            result = link_unnamed(&self.file, &self.dir, &temp_name);
            if result.is_ok() {
                self.temp_name = temp_name;
                self.temp_gone = false;
                self.unnamed = false;
                break;
            }
            if result != Err(nix::errno::Errno::EEXIST) {
                break;
            }
        }
        result.map_err(|errno| SnapshotError::io(&format!("link {}", self.name), errno.into()))
    }

    fn check_not_poisoned(&self) -> Result<(), SnapshotError> {
        if self.poisoned {
            return Err(SnapshotError::InvalidArgument(
                "an earlier write to this snapshot failed".to_string(),
            ));
        }
        Ok(())
    }

    fn zero_crc(&mut self, len: usize) -> u32 {
        *self
            .zero_chunk_crc
            .entry(len)
            .or_insert_with(|| crc32c::crc32c(&vec![0u8; len]))
    }
}

/// RAM regions at least this large are written by [`RAM_WRITERS`] threads.
const PARALLEL_RAM_MIN: usize = 64 << 20;

/// Writer threads per large RAM region.
const RAM_WRITERS: usize = 4;

/// CRC-32C of all-zero chunks: every chunk is `full` long but the region's `last_chunk`.
struct ZeroCrcs {
    full: u32,
    last: u32,
    last_chunk: usize,
}

/// Where guest memory is written: the file opened for direct I/O where the system allows it
/// (see [`open_direct`]), else through the page cache.
struct RamSink<'a> {
    direct: Option<&'a File>,
    buffered: &'a File,
}

impl RamSink<'_> {
    /// Write `bytes` (whole pages of guest memory) at `at`.
    fn write_at(&self, bytes: &[u8], at: u64) -> std::io::Result<()> {
        let large = bytes.len() >= DIRECT_IO_MIN;
        if let Some(direct) = self.direct.filter(|_| large) {
            match direct.write_all_at(bytes, at) {
                // A file system or device with stricter alignment than a page: the page
                // cache takes it.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                other => return other,
            }
        }
        self.buffered.write_all_at(bytes, at)?;
        if large {
            start_write_back(self.buffered, at, bytes.len());
        }
        Ok(())
    }
}

/// A range of whole chunks of one RAM region, written by one thread.
struct RamPart<'a> {
    first_chunk: usize,
    /// Per page of these chunks: the file holds data for it.
    in_file: &'a mut [bool],
    /// The `ram-index` CRC of each of these chunks.
    crcs: &'a mut [u32],
}

impl RamPart<'_> {
    /// [`SnapshotWriter::write_ram_pages`] over this part's chunks of `data`, the region that
    /// starts at file offset `offset`. Returns the bytes written.
    fn write(
        self,
        sink: &RamSink<'_>,
        offset: u64,
        data: &[u8],
        selected: &(impl Fn(usize) -> bool + Sync),
        zero_crcs: &ZeroCrcs,
    ) -> std::io::Result<u64> {
        let page_size = FORMAT_PAGE_SIZE as usize;
        let chunk_size = RAM_CHUNK_SIZE as usize;
        let pages_per_chunk = chunk_size / page_size;
        let first_page = self.first_chunk * pages_per_chunk;
        let mut written = 0u64;
        // Pages to write next, by index in this part: consecutive selected pages go out in one
        // call, across chunk boundaries.
        let mut run: Option<(usize, usize)> = None;
        let mut flush = |run: &mut Option<(usize, usize)>| -> std::io::Result<()> {
            if let Some((start, end)) = run.take() {
                let bytes = &data[(first_page + start) * page_size..(first_page + end) * page_size];
                sink.write_at(bytes, offset + ((first_page + start) * page_size) as u64)?;
                written += bytes.len() as u64;
            }
            Ok(())
        };
        for (index, crc) in self.crcs.iter_mut().enumerate() {
            let chunk_index = self.first_chunk + index;
            let chunk_start = chunk_index * chunk_size;
            let chunk = &data[chunk_start..(chunk_start + chunk_size).min(data.len())];
            let pages = chunk.len() / page_size;
            let part_page = index * pages_per_chunk;
            let global_page = first_page + part_page;
            if !(global_page..global_page + pages).any(selected) {
                flush(&mut run)?;
                continue;
            }
            for page in 0..pages {
                let at = part_page + page;
                let write = selected(global_page + page)
                    && (self.in_file[at]
                        || !is_zero(&chunk[page * page_size..(page + 1) * page_size]));
                if !write {
                    flush(&mut run)?;
                    continue;
                }
                self.in_file[at] = true;
                run = match run {
                    Some((start, end))
                        if end == at && (end - start) * page_size < DIRECT_IO_MAX =>
                    {
                        Some((start, at + 1))
                    }
                    _ => {
                        flush(&mut run)?;
                        Some((at, at + 1))
                    }
                };
            }
            let in_file = &self.in_file[part_page..part_page + pages];
            *crc = if in_file.iter().any(|&p| p) {
                // Holes count as the zeros they read as, without reading guest memory there.
                chunk
                    .chunks(page_size)
                    .zip(in_file)
                    .fold(0, |crc, (page, &in_file)| {
                        if in_file {
                            crc32c::crc32c_append(crc, page)
                        } else {
                            crc32c::crc32c_append(crc, &ZERO_PAGE[..page.len()])
                        }
                    })
            } else if chunk_index == zero_crcs.last_chunk {
                zero_crcs.last
            } else {
                zero_crcs.full
            };
        }
        flush(&mut run)?;
        Ok(written)
    }
}

/// Start writing `len` bytes at `at` back to the device now, without waiting for it, so the
/// fsync at commit finds little left to do.
#[cfg(target_os = "linux")]
fn start_write_back(file: &File, at: u64, len: usize) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range only reads its arguments; a failure only means write-back
    // starts later, at the fsync.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            at as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn start_write_back(_file: &File, _at: u64, _len: usize) {}

impl std::fmt::Debug for SnapshotWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotWriter")
            .field("name", &self.name)
            .field("temp_name", &self.temp_name)
            .field("sections", &self.entries.len())
            .finish_non_exhaustive()
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if !self.temp_gone {
            if let Err(errno) = unlinkat(
                &self.dir,
                self.temp_name.as_str(),
                UnlinkatFlags::NoRemoveDir,
            ) {
                log::warn!(
                    "cannot remove temporary snapshot {}: {errno}",
                    self.temp_name
                );
            }
        }
    }
}

/// A new file in `dir` under a fresh temporary name for `name`, and that name.
fn create_named(dir: &OwnedFd, name: &str) -> Result<(OwnedFd, String), SnapshotError> {
    let pid = std::process::id();
    let mut last_error = None;
    // A stale temporary file of an earlier process with the same pid is not ours to remove;
    // pick another name instead.
    for _ in 0..16 {
        let serial = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp_name = temp_name_for(name, pid, serial);
        match openat(
            dir,
            temp_name.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC,
            // Guest memory can hold secrets: owner only.
            Mode::from_bits_truncate(0o600),
        ) {
            Ok(fd) => return Ok((fd, temp_name)),
            Err(nix::errno::Errno::EEXIST) => continue,
            Err(errno) => {
                last_error = Some(errno);
                break;
            }
        }
    }
    let errno = last_error.unwrap_or(nix::errno::Errno::EEXIST);
    Err(SnapshotError::io(
        &format!("create temporary file for {name}"),
        errno.into(),
    ))
}

/// A new file without a name in `dir`, where the system and file system offer `O_TMPFILE`.
#[cfg(target_os = "linux")]
fn create_unnamed(dir: &OwnedFd) -> Option<OwnedFd> {
    // Guest memory can hold secrets: owner only.
    openat(
        dir,
        ".",
        OFlag::O_TMPFILE | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .ok()
}

#[cfg(not(target_os = "linux"))]
fn create_unnamed(_dir: &OwnedFd) -> Option<OwnedFd> {
    None
}

/// Link the unnamed `file` into `dir` as `name`: through /proc (no privilege needed), or by
/// the descriptor itself where /proc is missing (which needs CAP_DAC_READ_SEARCH).
#[cfg(target_os = "linux")]
fn link_unnamed(file: &File, dir: &OwnedFd, name: &str) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    let by_proc = format!("/proc/self/fd/{}", file.as_raw_fd());
    match nix::unistd::linkat(
        nix::fcntl::AT_FDCWD,
        by_proc.as_str(),
        dir,
        name,
        AtFlags::AT_SYMLINK_FOLLOW,
    ) {
        Err(nix::errno::Errno::ENOENT) => {
            nix::unistd::linkat(file, "", dir, name, AtFlags::AT_EMPTY_PATH)
        }
        other => other,
    }
}

#[cfg(not(target_os = "linux"))]
fn link_unnamed(_file: &File, _dir: &OwnedFd, _name: &str) -> nix::Result<()> {
    Err(nix::errno::Errno::EOPNOTSUPP)
}

/// Remove the temporary files of earlier writers of `name` in `dir` whose process is gone (a
/// save killed part way where no unnamed file could be used). A file of a live process, of
/// another user, or of a pid this process cannot probe is left alone.
fn remove_dead_writers_files(dir: &OwnedFd, name: &str) {
    let Ok(dup) = dir.try_clone() else { return };
    let Ok(mut listing) = nix::dir::Dir::from_fd(dup) else {
        return;
    };
    let user = nix::unistd::geteuid().as_raw();
    let own = std::process::id();
    let stale: Vec<String> = listing
        .iter()
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str().ok().map(str::to_string))
        .filter(|entry| {
            writer_pid(entry, name).is_some_and(|pid| {
                pid != own
                    && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None)
                        == Err(nix::errno::Errno::ESRCH)
            })
        })
        .collect();
    for entry in stale {
        let owned_regular_file = fstatat(dir, entry.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
            .is_ok_and(|st| {
                st.st_uid == user
                    && SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG
            });
        if owned_regular_file && unlinkat(dir, entry.as_str(), UnlinkatFlags::NoRemoveDir).is_ok() {
            log::info!(
                "removed {}, left by a writer that is gone",
                entry.escape_default()
            );
        }
    }
}

/// The pid in `entry` if it is a temporary file name of a writer of `name` (see
/// [`temp_name_for`]).
fn writer_pid(entry: &str, name: &str) -> Option<u32> {
    let mut fields = entry.rsplitn(3, '.');
    let serial: u32 = fields.next()?.parse().ok()?;
    let pid: u32 = fields.next()?.parse().ok()?;
    (temp_name_for(name, pid, serial) == entry).then_some(pid)
}

/// The file `name` in `dir` must be absent or a regular file, looked at without following a
/// final symbolic link: renaming the snapshot over anything else would replace a device node,
/// FIFO, socket or link (or fail on a directory) instead of writing a snapshot.
fn check_target(dir: &OwnedFd, name: &str) -> Result<(), SnapshotError> {
    let stat = match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(stat) => stat,
        Err(nix::errno::Errno::ENOENT) => return Ok(()),
        Err(errno) => {
            return Err(SnapshotError::io(
                &format!("look at '{}'", name.escape_default()),
                errno.into(),
            ))
        }
    };
    let kind = match SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT {
        SFlag::S_IFREG => return Ok(()),
        SFlag::S_IFCHR => "a character device",
        SFlag::S_IFBLK => "a block device",
        SFlag::S_IFIFO => "a FIFO",
        SFlag::S_IFSOCK => "a socket",
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFLNK => "a symbolic link",
        _ => "not a regular file",
    };
    Err(SnapshotError::InvalidArgument(format!(
        "'{}' exists and is {kind}; a snapshot only replaces a regular file",
        name.escape_default()
    )))
}

/// A snapshot name must be a single path component.
fn check_file_name(name: &str) -> Result<(), SnapshotError> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.contains('\0')
        || name.len() > NAME_MAX
    {
        return Err(SnapshotError::InvalidArgument(format!(
            "'{}' is not a valid snapshot file name",
            name.escape_default()
        )));
    }
    Ok(())
}

/// `.NAME.tmp.PID.N`, with NAME shortened if the whole would not fit in NAME_MAX.
fn temp_name_for(name: &str, pid: u32, serial: u32) -> String {
    let suffix = format!(".tmp.{pid}.{serial}");
    let room = NAME_MAX - 1 - suffix.len();
    let mut cut = name.len().min(room);
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!(".{}{}", &name[..cut], suffix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_are_hidden_and_fit_name_max() {
        assert_eq!(temp_name_for("vm1.snap", 42, 7), ".vm1.snap.tmp.42.7");
        let long = "é".repeat(200);
        let temp = temp_name_for(&long, u32::MAX, u32::MAX);
        assert!(temp.len() <= NAME_MAX);
        assert!(temp.starts_with('.'));
    }

    /// A directory under /tmp for one test, removed when it ends.
    struct Scratch(std::path::PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let path =
                std::env::temp_dir().join(format!("bhyve-rs-writer-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).expect("scratch directory");
            Scratch(path)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn info() -> HeaderInfo {
        HeaderInfo::this_build(super::super::Backend::Kvm)
    }

    /// A character device with /dev/null's numbers (Linux's 1, 3) at `path`.
    #[cfg(target_os = "linux")]
    fn make_null_device(path: &Path) -> nix::Result<()> {
        let null = nix::sys::stat::makedev(1, 3);
        nix::sys::stat::mknod(path, SFlag::S_IFCHR, Mode::from_bits_truncate(0o600), null)
    }

    #[cfg(not(target_os = "linux"))]
    fn make_null_device(_path: &Path) -> nix::Result<()> {
        Err(nix::errno::Errno::EOPNOTSUPP)
    }

    fn finish(mut writer: SnapshotWriter) -> Result<(), SnapshotError> {
        writer.add_config([("name", "vm1")]).expect("config");
        writer.commit()
    }

    #[test]
    fn only_a_regular_file_or_nothing_is_replaced() {
        use std::os::unix::fs::FileTypeExt;
        let scratch = Scratch::new("targets");
        let at = |name: &str| scratch.0.join(name);
        nix::unistd::mkfifo(&at("fifo"), Mode::from_bits_truncate(0o600)).expect("mkfifo");
        std::fs::create_dir(at("dir")).expect("mkdir");
        std::fs::write(at("notes.txt"), "notes").expect("regular file");
        std::os::unix::fs::symlink(at("notes.txt"), at("link")).expect("symlink");
        let mut refused = vec![
            ("fifo", "a FIFO"),
            ("dir", "a directory"),
            ("link", "a symbolic link"),
        ];
        // The node of the report, where this process may make one.
        let char_device = make_null_device(&at("null"));
        if char_device.is_ok() {
            refused.push(("null", "a character device"));
        }
        for &(name, kind) in &refused {
            let err = SnapshotWriter::create(&at(name), info()).expect_err(name);
            assert_eq!(
                err.to_string(),
                format!("'{name}' exists and is {kind}; a snapshot only replaces a regular file")
            );
        }
        let meta = std::fs::symlink_metadata(at("fifo")).expect("FIFO still there");
        assert!(meta.file_type().is_fifo());
        assert!(std::fs::symlink_metadata(at("link")).unwrap().is_symlink());
        if char_device.is_ok() {
            let meta = std::fs::symlink_metadata(at("null")).unwrap();
            assert!(meta.file_type().is_char_device());
            assert_eq!(meta.len(), 0);
        }
        assert_eq!(std::fs::read_to_string(at("notes.txt")).unwrap(), "notes");
        // Absent, or a regular file: written.
        finish(SnapshotWriter::create(&at("new.snap"), info()).unwrap()).expect("absent target");
        finish(SnapshotWriter::create(&at("notes.txt"), info()).unwrap()).expect("regular file");
        assert!(std::fs::read(at("notes.txt"))
            .unwrap()
            .starts_with(b"BHYVSNAP"));
    }

    #[test]
    fn a_node_that_appears_while_writing_is_not_replaced() {
        use std::os::unix::fs::FileTypeExt;
        let scratch = Scratch::new("race");
        let target = scratch.0.join("vm.snap");
        let writer = SnapshotWriter::create(&target, info()).unwrap();
        nix::unistd::mkfifo(&target, Mode::from_bits_truncate(0o600)).expect("mkfifo");
        let err = finish(writer).expect_err("FIFO replaced");
        assert!(err.to_string().contains("is a FIFO"), "{err}");
        assert!(std::fs::symlink_metadata(&target)
            .unwrap()
            .file_type()
            .is_fifo());
        // The temporary file went with the failed commit.
        assert_eq!(std::fs::read_dir(&scratch.0).unwrap().count(), 1);
    }

    #[test]
    fn a_snapshot_being_written_has_no_name_until_it_is_complete() {
        let scratch = Scratch::new("unnamed");
        let dir = std::fs::File::open(&scratch.0).unwrap();
        if create_unnamed(&OwnedFd::from(dir.try_clone().unwrap())).is_none() {
            eprintln!(
                "NOTICE: no O_TMPFILE on {}: case skipped",
                scratch.0.display()
            );
            return;
        }
        let listing = || std::fs::read_dir(&scratch.0).unwrap().count();
        let mut writer = SnapshotWriter::create_in(&dir, "vm.snap", info()).unwrap();
        writer.add_config([("name", "vm1")]).unwrap();
        assert_eq!(listing(), 0, "a killed writer would leave this behind");
        drop(writer);
        assert_eq!(listing(), 0);
        finish(SnapshotWriter::create_in(&dir, "vm.snap", info()).unwrap()).unwrap();
        let names: Vec<_> = std::fs::read_dir(&scratch.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["vm.snap"]);
        let meta = std::fs::metadata(scratch.0.join("vm.snap")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn temporary_files_of_writers_that_are_gone_are_removed() {
        let scratch = Scratch::new("dead");
        let gone = std::process::Command::new("true").spawn().unwrap();
        let gone_pid = gone.id();
        let mut gone = gone;
        gone.wait().unwrap();
        let mut alive = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let files = [
            temp_name_for("vm.snap", gone_pid, 3),
            temp_name_for("vm.snap", alive.id(), 1),
            temp_name_for("other.snap", gone_pid, 1),
            format!(".vm.snap.tmp.{gone_pid}"),
        ];
        for file in &files {
            std::fs::write(scratch.0.join(file), "part of a snapshot").unwrap();
        }
        let dir = std::fs::File::open(&scratch.0).unwrap();
        let writer = SnapshotWriter::create_in_with(&dir, "vm.snap", info(), false).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&scratch.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| *n != writer.temp_name)
            .collect();
        left.sort();
        let mut expected = files[1..].to_vec();
        expected.sort();
        assert_eq!(
            left, expected,
            "only the dead writer's file of vm.snap goes"
        );
        let _ = alive.kill();
        let _ = alive.wait();
    }

    #[test]
    fn writer_pids_are_read_back_from_temporary_names() {
        assert_eq!(
            writer_pid(&temp_name_for("vm.snap", 42, 7), "vm.snap"),
            Some(42)
        );
        assert_eq!(writer_pid(".vm.snap.tmp.42.7", "other"), None);
        assert_eq!(writer_pid("vm.snap", "vm.snap"), None);
        let long = "é".repeat(200);
        assert_eq!(writer_pid(&temp_name_for(&long, 9, 1), &long), Some(9));
    }

    #[test]
    fn file_names_with_slashes_are_refused() {
        assert!(check_file_name("a/b").is_err());
        assert!(check_file_name("..").is_err());
        assert!(check_file_name("").is_err());
        assert!(check_file_name("vm.ckp").is_ok());
    }
}
