//! Reading a snapshot file: a bounded, checked parse of header and table, data sections in
//! memory, guest RAM restored by copy or mapped copy-on-write.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use memmap2::{MmapMut, MmapOptions};
use serde::de::DeserializeOwned;

use super::format::{
    label, parse_entry, parse_header, parse_prefix, parse_ram_index, Header, SectionEntry,
    SectionKind, CONFIG_SECTION, CONFIG_VERSION, HEADER_PREFIX, MAX_DATA_SECTION_LEN,
    MAX_DATA_TOTAL, MAX_RAM_REGIONS, RAM_INDEX_SECTION, RAM_INDEX_VERSION, RAM_SECTION,
    RAM_VERSION,
};
use super::ram::{data_extents, extents_len, open_direct, read_ram_at};
use super::{decode_section, SnapshotError};

/// One guest memory segment stored in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamRegion {
    /// `0`, `1`, … in the order the regions were written.
    pub instance: String,
    /// Guest-physical base address.
    pub gpa: u64,
    pub size: u64,
    /// Page-aligned position of the region's first byte in the file.
    pub file_offset: u64,
    /// Bytes covered by each entry of `chunk_crcs`.
    pub chunk_size: u32,
    chunk_crcs: Vec<u32>,
}

/// A data section's payload and the version its producer gave it.
#[derive(Debug, Clone, Copy)]
pub struct Section<'a> {
    pub name: &'a str,
    pub instance: &'a str,
    pub version: u32,
    pub payload: &'a [u8],
}

impl Section<'_> {
    /// Decode the payload with [`decode_section`]; errors name the section.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, SnapshotError> {
        decode_section(self.payload).map_err(|e| match e {
            SnapshotError::Decode(reason) => SnapshotError::Corrupt(format!(
                "section {}: cannot decode payload: {reason}",
                label(self.name, self.instance)
            )),
            other => other,
        })
    }
}

/// How [`SnapshotReader::restore_ram_copy`] treats the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyOptions {
    /// Check every chunk against the `ram-index` CRC-32C after copying.
    pub verify: bool,
    /// Write zeros into the holes. Not needed when the destination is fresh anonymous memory,
    /// which already reads as zero; needed when it may hold old contents.
    pub zero_holes: bool,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            verify: true,
            zero_holes: false,
        }
    }
}

/// An opened, validated snapshot. Header, table and every data section's checksum are checked
/// by `open`; guest RAM is read only when restored.
pub struct SnapshotReader {
    file: File,
    file_len: u64,
    header: Header,
    entries: Vec<SectionEntry>,
    /// Payloads of data sections, by table index; `None` for RAM and unknown kinds.
    payloads: Vec<Option<Vec<u8>>>,
    /// Atomic so regions can be restored from several threads sharing the reader.
    consumed: Vec<AtomicBool>,
    config: Vec<(String, String)>,
    ram: Vec<RamRegion>,
}

impl SnapshotReader {
    /// Open and validate the snapshot at `path`.
    pub fn open(path: &Path) -> Result<SnapshotReader, SnapshotError> {
        let file = File::open(path).map_err(|e| SnapshotError::io("open", e))?;
        match SnapshotReader::from_file(file) {
            Err(SnapshotError::BadMagic) if has_suffix_file(path, ".meta") => {
                Err(SnapshotError::Unsupported(
                    "not a bhyve-rs snapshot: this looks like FreeBSD bhyve's three-file \
                     checkpoint (FILE.meta exists), which bhyve-rs does not read"
                        .to_string(),
                ))
            }
            other => other,
        }
    }

    /// Validate a snapshot from an open file (read access is enough).
    pub fn from_file(file: File) -> Result<SnapshotReader, SnapshotError> {
        let file_len = file
            .metadata()
            .map_err(|e| SnapshotError::io("stat", e))?
            .len();

        let mut prefix = [0u8; HEADER_PREFIX];
        let prefix_len = (HEADER_PREFIX as u64).min(file_len) as usize;
        read_exact_at(&file, &mut prefix[..prefix_len], 0, "header")?;
        let prefix = parse_prefix(&prefix[..prefix_len])?;
        if u64::from(prefix.header_size) > file_len {
            return Err(SnapshotError::Truncated(format!(
                "file is {file_len} bytes, the header alone needs {}",
                prefix.header_size
            )));
        }
        let mut header_buf = vec![0u8; prefix.header_size as usize];
        read_exact_at(&file, &mut header_buf, 0, "header")?;
        let header = parse_header(&header_buf, &prefix)?;

        let table_len = u64::from(header.table_count) * u64::from(header.table_entry_size);
        let table_end = header
            .table_offset
            .checked_add(table_len)
            .filter(|&end| end <= file_len)
            .ok_or_else(|| {
                SnapshotError::Truncated(format!(
                    "section table at {} ({table_len} bytes) ends past the end of the \
                     {file_len}-byte file",
                    header.table_offset
                ))
            })?;
        if header.table_offset < u64::from(header.header_size) {
            return Err(SnapshotError::Corrupt(
                "section table overlaps the header".to_string(),
            ));
        }
        let mut table = vec![0u8; table_len as usize];
        read_exact_at(&file, &mut table, header.table_offset, "section table")?;
        if crc32c::crc32c(&table) != header.table_checksum {
            return Err(SnapshotError::Checksum("section table".to_string()));
        }
        let entries = table
            .chunks_exact(header.table_entry_size as usize)
            .enumerate()
            .map(|(index, raw)| parse_entry(raw, index))
            .collect::<Result<Vec<_>, _>>()?;

        check_layout(&header, &entries, file_len, table_end)?;

        // Data sections are small: read and check them all now.
        let mut payloads = Vec::with_capacity(entries.len());
        let mut total = 0u64;
        for entry in &entries {
            match entry.kind {
                SectionKind::Data => {
                    if entry.length > MAX_DATA_SECTION_LEN {
                        return Err(SnapshotError::Corrupt(format!(
                            "section {} is {} bytes, more than the limit of {MAX_DATA_SECTION_LEN}",
                            entry.label(),
                            entry.length
                        )));
                    }
                    total += entry.length;
                    if total > MAX_DATA_TOTAL {
                        return Err(SnapshotError::Corrupt(format!(
                            "data sections exceed the limit of {MAX_DATA_TOTAL} bytes"
                        )));
                    }
                    let mut payload = vec![0u8; entry.length as usize];
                    read_exact_at(&file, &mut payload, entry.offset, &entry.label())?;
                    if crc32c::crc32c(&payload) != entry.checksum {
                        return Err(SnapshotError::Checksum(format!(
                            "section {}",
                            entry.label()
                        )));
                    }
                    payloads.push(Some(payload));
                }
                SectionKind::Ram => payloads.push(None),
                SectionKind::Unknown(code) => {
                    if entry.mandatory() {
                        return Err(SnapshotError::Unsupported(format!(
                            "mandatory section {} has kind {code}, unknown to this bhyve",
                            entry.label()
                        )));
                    }
                    payloads.push(None);
                }
            }
        }
        let consumed = entries.iter().map(|_| AtomicBool::new(false)).collect();

        let mut reader = SnapshotReader {
            file,
            file_len,
            header,
            entries,
            payloads,
            consumed,
            config: Vec::new(),
            ram: Vec::new(),
        };
        reader.ram = reader.load_ram_regions()?;
        reader.config = reader.load_config()?;
        Ok(reader)
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The VM configuration recorded at save time, in the order it was written.
    pub fn config(&self) -> &[(String, String)] {
        &self.config
    }

    /// Every entry of the section table, in file order.
    pub fn sections(&self) -> &[SectionEntry] {
        &self.entries
    }

    /// Instances present for data sections called `name`, in table order.
    pub fn instances(&self, name: &str) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|e| e.kind == SectionKind::Data && e.name == name)
            .map(|e| e.instance.as_str())
            .collect()
    }

    /// Look at a data section without marking it consumed.
    pub fn section(&self, name: &str, instance: &str) -> Option<Section<'_>> {
        self.find(name, instance)
            .map(|index| self.section_at(index))
    }

    /// Take a data section: marks it consumed for [`finish_check_unconsumed`].
    ///
    /// [`finish_check_unconsumed`]: SnapshotReader::finish_check_unconsumed
    pub fn take(&self, name: &str, instance: &str) -> Option<Section<'_>> {
        let index = self.find(name, instance)?;
        if let Some(flag) = self.consumed.get(index) {
            flag.store(true, Ordering::Relaxed);
        }
        Some(self.section_at(index))
    }

    /// [`take`](SnapshotReader::take), refusing a payload version above `supported`.
    pub fn take_versioned(
        &self,
        name: &str,
        instance: &str,
        supported: u32,
    ) -> Result<Option<Section<'_>>, SnapshotError> {
        match self.take(name, instance) {
            Some(section) if section.version > supported => Err(SnapshotError::SectionVersion {
                label: label(name, instance),
                version: section.version,
                supported,
            }),
            other => Ok(other),
        }
    }

    /// After a restore: fail if a mandatory section was never taken (this bhyve does not know
    /// it, so the restored VM would miss state). Optional sections left over are only logged.
    pub fn finish_check_unconsumed(&self) -> Result<(), SnapshotError> {
        for (entry, consumed) in self.entries.iter().zip(&self.consumed) {
            if entry.kind == SectionKind::Ram || consumed.load(Ordering::Relaxed) {
                continue;
            }
            if entry.mandatory() {
                return Err(SnapshotError::UnknownMandatory {
                    label: entry.label(),
                    version: entry.version,
                });
            }
            log::info!(
                "snapshot: ignoring optional section {} (version {})",
                entry.label(),
                entry.version
            );
        }
        Ok(())
    }

    /// Guest RAM regions in file order. A restore must load every one of them.
    pub fn ram_regions(&self) -> &[RamRegion] {
        &self.ram
    }

    /// Copy a RAM region into `dst` (exactly `region.size` bytes), reading only the parts of
    /// the file that hold data. Holes are left untouched unless `options.zero_holes`: the
    /// destination must already read as zero there, as fresh anonymous memory does.
    /// Returns the number of bytes read from the file.
    pub fn restore_ram_copy(
        &self,
        region: &RamRegion,
        dst: &mut [u8],
        options: CopyOptions,
    ) -> Result<u64, SnapshotError> {
        self.check_own(region)?;
        if dst.len() as u64 != region.size {
            return Err(SnapshotError::InvalidArgument(format!(
                "RAM region {} is {} bytes, destination is {}",
                region.instance,
                region.size,
                dst.len()
            )));
        }
        let extents = self.region_extents(region)?;
        let direct = open_direct(&self.file, false);
        let what = format!("RAM region {}", region.instance);
        let mut previous_end = 0usize;
        for &(start, end) in &extents {
            let from = (start - region.file_offset) as usize;
            let to = (end - region.file_offset) as usize;
            if options.zero_holes {
                dst[previous_end..from].fill(0);
            }
            read_ram_at(&self.file, direct.as_ref(), &mut dst[from..to], start)
                .map_err(|e| read_error(e, &what))?;
            previous_end = to;
        }
        if options.zero_holes {
            dst[previous_end..].fill(0);
        }
        if options.verify {
            let mut zero_crcs = HashMap::new();
            for_each_chunk(region, &extents, |index, range, has_data| {
                let expected = region.chunk_crcs.get(index).copied().unwrap_or(0);
                let actual = if has_data {
                    crc32c::crc32c(&dst[range.clone()])
                } else {
                    zero_crc(&mut zero_crcs, range.len())
                };
                check_chunk(region, index, expected, actual)
            })?;
        }
        Ok(extents_len(&extents))
    }

    /// Read a RAM region from the file and check it against its `ram-index` checksums, without
    /// restoring it (what a mapped restore skips).
    pub fn verify_ram(&self, region: &RamRegion) -> Result<(), SnapshotError> {
        self.check_own(region)?;
        let extents = self.region_extents(region)?;
        let mut buf = vec![0u8; region.chunk_size as usize];
        let mut zero_crcs = HashMap::new();
        for_each_chunk(region, &extents, |index, range, has_data| {
            let expected = region.chunk_crcs.get(index).copied().unwrap_or(0);
            let actual = if has_data {
                let chunk = &mut buf[..range.len()];
                chunk.fill(0);
                let chunk_start = region.file_offset + range.start as u64;
                let chunk_end = chunk_start + range.len() as u64;
                for &(start, end) in &extents {
                    let (start, end) = (start.max(chunk_start), end.min(chunk_end));
                    if start < end {
                        let from = (start - chunk_start) as usize;
                        let to = (end - chunk_start) as usize;
                        read_exact_at(
                            &self.file,
                            &mut chunk[from..to],
                            start,
                            &format!("RAM region {}", region.instance),
                        )?;
                    }
                }
                crc32c::crc32c(chunk)
            } else {
                zero_crc(&mut zero_crcs, range.len())
            };
            check_chunk(region, index, expected, actual)
        })
    }

    /// Map a RAM region copy-on-write (`MAP_PRIVATE`): pages are read from the file when the
    /// guest first touches them, writes stay private. Costs the same for any region size, but
    /// nothing is checked against the `ram-index` (see [`verify_ram`]), and the file must not
    /// change while mapped.
    ///
    /// [`verify_ram`]: SnapshotReader::verify_ram
    pub fn map_ram_private(&self, region: &RamRegion) -> Result<MmapMut, SnapshotError> {
        // A region of another file could lie past this file's end: touching it would SIGBUS.
        self.check_own(region)?;
        let len = usize::try_from(region.size).map_err(|_| SnapshotError::TooLarge)?;
        // SAFETY: a private mapping never writes to the file, and the bounds were checked
        // against the file size in `open`. Other processes changing the file while it is
        // mapped would change unmodified pages under us; the manual page requires the file to
        // stay unchanged during a mapped restore, as every mapped-restore VMM does.
        let map = unsafe {
            MmapOptions::new()
                .offset(region.file_offset)
                .len(len)
                .map_copy(&self.file)
        };
        map.map_err(|e| SnapshotError::io(&format!("map RAM region {}", region.instance), e))
    }

    /// Bytes of a RAM region that hold data in the file (the rest are holes).
    pub fn ram_data_bytes(&self, region: &RamRegion) -> Result<u64, SnapshotError> {
        Ok(extents_len(&self.region_extents(region)?))
    }

    /// Logical size of the file.
    /// The open snapshot file.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Disk space the file occupies (`st_blocks` × 512).
    pub fn allocated_bytes(&self) -> Result<u64, SnapshotError> {
        let meta = self
            .file
            .metadata()
            .map_err(|e| SnapshotError::io("stat", e))?;
        Ok(meta.blocks().saturating_mul(512))
    }

    /// The VM configuration as a configuration tree, ready for `bhyve -r`.
    pub fn config_tree(&self) -> crate::config::Config {
        let mut tree = crate::config::Config::new();
        for (key, value) in &self.config {
            tree.set(key, value);
        }
        tree
    }

    fn check_own(&self, region: &RamRegion) -> Result<(), SnapshotError> {
        if self.ram.contains(region) {
            Ok(())
        } else {
            Err(SnapshotError::InvalidArgument(format!(
                "RAM region {} is not a region of this snapshot",
                region.instance
            )))
        }
    }

    fn find(&self, name: &str, instance: &str) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| e.kind == SectionKind::Data && e.name == name && e.instance == instance)
    }

    fn section_at(&self, index: usize) -> Section<'_> {
        let entry = &self.entries[index];
        let payload = self
            .payloads
            .get(index)
            .and_then(|p| p.as_deref())
            .unwrap_or(&[]);
        Section {
            name: &entry.name,
            instance: &entry.instance,
            version: entry.version,
            payload,
        }
    }

    fn mark_consumed(&self, name: &str, instance: &str) {
        if let Some(flag) = self.find(name, instance).and_then(|i| self.consumed.get(i)) {
            flag.store(true, Ordering::Relaxed);
        }
    }

    fn load_config(&self) -> Result<Vec<(String, String)>, SnapshotError> {
        let section = self
            .section(CONFIG_SECTION, "")
            .ok_or_else(|| SnapshotError::Corrupt("snapshot has no config section".to_string()))?;
        if section.version > CONFIG_VERSION {
            return Err(SnapshotError::SectionVersion {
                label: CONFIG_SECTION.to_string(),
                version: section.version,
                supported: CONFIG_VERSION,
            });
        }
        let config: Vec<(String, String)> = section.decode()?;
        self.mark_consumed(CONFIG_SECTION, "");
        Ok(config)
    }

    fn load_ram_regions(&self) -> Result<Vec<RamRegion>, SnapshotError> {
        let mut regions = Vec::new();
        for entry in self.entries.iter().filter(|e| e.kind == SectionKind::Ram) {
            if entry.version > RAM_VERSION {
                return Err(SnapshotError::SectionVersion {
                    label: entry.label(),
                    version: entry.version,
                    supported: RAM_VERSION,
                });
            }
            let index = self
                .section(RAM_INDEX_SECTION, &entry.instance)
                .ok_or_else(|| {
                    SnapshotError::Corrupt(format!(
                        "RAM region {} has no {RAM_INDEX_SECTION} section",
                        entry.instance
                    ))
                })?;
            if index.version > RAM_INDEX_VERSION {
                return Err(SnapshotError::SectionVersion {
                    label: label(RAM_INDEX_SECTION, &entry.instance),
                    version: index.version,
                    supported: RAM_INDEX_VERSION,
                });
            }
            let (chunk_size, chunk_crcs) = parse_ram_index(
                index.payload,
                entry.length,
                self.header.page_size,
                &label(RAM_INDEX_SECTION, &entry.instance),
            )?;
            self.mark_consumed(RAM_INDEX_SECTION, &entry.instance);
            regions.push(RamRegion {
                instance: entry.instance.clone(),
                gpa: entry.gpa,
                size: entry.length,
                file_offset: entry.offset,
                chunk_size,
                chunk_crcs,
            });
        }
        for instance in self.instances(RAM_INDEX_SECTION) {
            if !regions.iter().any(|r| r.instance == instance) {
                return Err(SnapshotError::Corrupt(format!(
                    "section {} describes no RAM region",
                    label(RAM_INDEX_SECTION, instance)
                )));
            }
        }
        Ok(regions)
    }

    fn region_extents(&self, region: &RamRegion) -> Result<Vec<(u64, u64)>, SnapshotError> {
        data_extents(
            &self.file,
            region.file_offset,
            region.file_offset + region.size,
        )
        .map_err(|e| SnapshotError::io(&format!("find data in RAM region {}", region.instance), e))
    }
}

impl std::fmt::Debug for SnapshotReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotReader")
            .field("header", &self.header)
            .field("sections", &self.entries.len())
            .field("ram_regions", &self.ram.len())
            .finish_non_exhaustive()
    }
}

/// Structural checks on the table before anything it points at is read.
fn check_layout(
    header: &Header,
    entries: &[SectionEntry],
    file_len: u64,
    table_end: u64,
) -> Result<(), SnapshotError> {
    let page = u64::from(header.page_size);
    let mut ranges: Vec<(u64, u64, String)> = vec![
        (0, u64::from(header.header_size), "header".to_string()),
        (header.table_offset, table_end, "section table".to_string()),
    ];
    let mut seen = std::collections::HashSet::new();
    let mut ram: Vec<(u64, u64, &str)> = Vec::new();
    for entry in entries {
        let name = entry.label();
        if !seen.insert((entry.name.as_str(), entry.instance.as_str())) {
            return Err(SnapshotError::Corrupt(format!(
                "section {name} appears twice"
            )));
        }
        let end = entry
            .offset
            .checked_add(entry.length)
            .filter(|&end| end <= file_len)
            .ok_or_else(|| {
                SnapshotError::Truncated(format!(
                    "section {name} ({} bytes at {}) ends past the end of the {file_len}-byte file",
                    entry.length, entry.offset
                ))
            })?;
        if entry.kind == SectionKind::Ram {
            if entry.name != RAM_SECTION || entry.instance.is_empty() {
                return Err(SnapshotError::Corrupt(format!(
                    "RAM section has the name {name}"
                )));
            }
            if entry.length == 0
                || entry.offset % page != 0
                || entry.length % page != 0
                || entry.gpa % page != 0
            {
                return Err(SnapshotError::Corrupt(format!(
                    "RAM region {} is not page-aligned",
                    entry.instance
                )));
            }
            let gpa_end = entry.gpa.checked_add(entry.length).ok_or_else(|| {
                SnapshotError::Corrupt(format!(
                    "RAM region {} wraps around the guest address space",
                    entry.instance
                ))
            })?;
            ram.push((entry.gpa, gpa_end, &entry.instance));
            if ram.len() > MAX_RAM_REGIONS {
                return Err(SnapshotError::Corrupt(format!(
                    "more than {MAX_RAM_REGIONS} RAM regions"
                )));
            }
        }
        if entry.length > 0 {
            ranges.push((entry.offset, end, name));
        }
    }
    ranges.sort();
    for pair in ranges.windows(2) {
        if pair[1].0 < pair[0].1 {
            return Err(SnapshotError::Corrupt(format!(
                "{} overlaps {}",
                pair[1].2, pair[0].2
            )));
        }
    }
    ram.sort();
    for pair in ram.windows(2) {
        if pair[1].0 < pair[0].1 {
            return Err(SnapshotError::Corrupt(format!(
                "RAM regions {} and {} overlap in guest memory",
                pair[0].2, pair[1].2
            )));
        }
    }
    Ok(())
}

/// Call `check(index, byte range within the region, chunk overlaps data)` for every chunk.
fn for_each_chunk<F>(
    region: &RamRegion,
    extents: &[(u64, u64)],
    mut check: F,
) -> Result<(), SnapshotError>
where
    F: FnMut(usize, std::ops::Range<usize>, bool) -> Result<(), SnapshotError>,
{
    let chunk = region.chunk_size as u64;
    let mut next_extent = 0usize;
    let mut start = 0u64;
    let mut index = 0usize;
    while start < region.size {
        let end = (start + chunk).min(region.size);
        let (abs_start, abs_end) = (region.file_offset + start, region.file_offset + end);
        while next_extent < extents.len() && extents[next_extent].1 <= abs_start {
            next_extent += 1;
        }
        let has_data = extents
            .get(next_extent)
            .is_some_and(|&(extent_start, _)| extent_start < abs_end);
        check(index, start as usize..end as usize, has_data)?;
        start = end;
        index += 1;
    }
    Ok(())
}

fn zero_crc(cache: &mut HashMap<usize, u32>, len: usize) -> u32 {
    *cache
        .entry(len)
        .or_insert_with(|| crc32c::crc32c(&vec![0u8; len]))
}

fn check_chunk(
    region: &RamRegion,
    index: usize,
    expected: u32,
    actual: u32,
) -> Result<(), SnapshotError> {
    if expected == actual {
        return Ok(());
    }
    // A checksum covers one chunk: the damage is somewhere in its range.
    let start = region.gpa + index as u64 * u64::from(region.chunk_size);
    let end = (start + u64::from(region.chunk_size)).min(region.gpa + region.size) - 1;
    Err(SnapshotError::Checksum(format!(
        "RAM region {} at guest addresses {start:#x}-{end:#x}",
        region.instance
    )))
}

fn read_exact_at(
    file: &File,
    buf: &mut [u8],
    offset: u64,
    what: &str,
) -> Result<(), SnapshotError> {
    file.read_exact_at(buf, offset)
        .map_err(|e| read_error(e, what))
}

fn read_error(e: io::Error, what: &str) -> SnapshotError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        SnapshotError::Truncated(format!("{what} ends past the end of the file"))
    } else {
        SnapshotError::io(&format!("read {what}"), e)
    }
}

fn has_suffix_file(path: &Path, suffix: &str) -> bool {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    Path::new(&name).exists()
}
