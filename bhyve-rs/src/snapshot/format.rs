//! The on-disk layout of a snapshot file: fixed-width header, section table, limits.
//!
//! Everything here is little-endian and independent of the payload encoding, so any later
//! bhyve can at least read the header and the table of a file it cannot restore.
//! `man/bhyve_snapshot.5` documents the same layout for other tools.

use std::fmt;

use super::SnapshotError;

/// First eight bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"BHYVSNAP";
/// Format version this code writes. A reader accepts any minor of its own major.
pub const FORMAT_MAJOR: u16 = 1;
pub const FORMAT_MINOR: u16 = 0;

/// Size of the header written by format 1.0; later minors may write a larger one.
pub const HEADER_SIZE: usize = 256;
/// Upper bound on the header size a reader accepts (the first page holds the header).
pub const HEADER_MAX_SIZE: u32 = 4096;
/// Size of one section table entry written by format 1.0.
pub const ENTRY_SIZE: usize = 128;
pub const ENTRY_MAX_SIZE: u32 = 1024;
/// Width of the name and instance fields of a table entry.
pub const NAME_LEN: usize = 32;

/// Bounds a reader enforces before it allocates or reads anything.
pub const MAX_SECTIONS: u32 = 4096;
pub const MAX_DATA_SECTION_LEN: u64 = 256 << 20;
pub const MAX_DATA_TOTAL: u64 = 1 << 30;
pub const MAX_RAM_REGIONS: usize = 256;

/// Granularity of the zero-page scan and of RAM region addresses and sizes.
pub const FORMAT_PAGE_SIZE: u32 = 4096;
/// Largest page size a reader accepts in the header.
pub const MAX_PAGE_SIZE: u32 = 2 << 20;
/// Data sections start after the first page, which holds only the header.
pub const DATA_START: u64 = 4096;
/// RAM regions start at a multiple of 2 MiB in the file, so a mapping of the file can use the
/// same large-page alignment as guest memory.
pub const RAM_FILE_ALIGN: u64 = 2 << 20;
/// Guest RAM is checksummed in chunks of this size (the `ram-index` section).
pub const RAM_CHUNK_SIZE: u32 = 2 << 20;
/// Largest chunk size a reader accepts in a `ram-index` section.
pub const MAX_RAM_CHUNK_SIZE: u32 = 1 << 30;

/// Section names the format itself uses; callers cannot add sections with these names.
pub const CONFIG_SECTION: &str = "config";
pub const RAM_SECTION: &str = "ram";
pub const RAM_INDEX_SECTION: &str = "ram-index";
pub const CONFIG_VERSION: u32 = 1;
pub const RAM_VERSION: u32 = 1;
pub const RAM_INDEX_VERSION: u32 = 1;

/// Header flags 0-15 change how the file must be read: a reader refuses bits it does not know.
/// Flags 16-31 are informational and ignored when unknown.
pub const HEADER_INCOMPATIBLE_MASK: u32 = 0x0000_ffff;
pub const HEADER_KNOWN_INCOMPATIBLE: u32 = 0;
/// Informational: the VM was stopped after the save (`bhyvectl --suspend`), not left running.
pub const HEADER_FLAG_SUSPENDED: u32 = 1 << 16;

/// Section flag: a reader that does not know the section must refuse the file.
pub const SECTION_FLAG_MANDATORY: u32 = 1;

// Byte offsets of the 1.0 header fields.
const H_MAGIC: usize = 0;
const H_MAJOR: usize = 8;
const H_MINOR: usize = 10;
const H_HEADER_SIZE: usize = 12;
const H_HEADER_CHECKSUM: usize = 16;
const H_FLAGS: usize = 20;
const H_ARCH: usize = 24;
const H_BACKEND: usize = 28;
const H_PAGE_SIZE: usize = 32;
const H_ENTRY_SIZE: usize = 36;
const H_TABLE_OFFSET: usize = 40;
const H_TABLE_COUNT: usize = 48;
const H_TABLE_CHECKSUM: usize = 52;
const H_CREATED: usize = 56;
const H_PRODUCER_NAME: usize = 64;
const H_PRODUCER_VERSION: usize = 96;
/// Bytes a reader needs to see the magic, version and header size.
pub const HEADER_PREFIX: usize = 16;

// Byte offsets of the 1.0 table entry fields.
const E_NAME: usize = 0;
const E_INSTANCE: usize = 32;
const E_VERSION: usize = 64;
const E_KIND: usize = 68;
const E_FLAGS: usize = 72;
const E_CHECKSUM: usize = 76;
const E_OFFSET: usize = 80;
const E_LENGTH: usize = 88;
const E_GPA: usize = 96;

/// Machine architecture the snapshot was taken on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    X86_64,
    Aarch64,
    Unknown(u32),
}

impl Arch {
    pub fn code(self) -> u32 {
        match self {
            Arch::X86_64 => 1,
            Arch::Aarch64 => 2,
            Arch::Unknown(code) => code,
        }
    }

    pub fn from_code(code: u32) -> Self {
        match code {
            1 => Arch::X86_64,
            2 => Arch::Aarch64,
            other => Arch::Unknown(other),
        }
    }

    /// The architecture this bhyve was built for.
    pub fn host() -> Self {
        if cfg!(target_arch = "x86_64") {
            Arch::X86_64
        } else if cfg!(target_arch = "aarch64") {
            Arch::Aarch64
        } else {
            Arch::Unknown(0)
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Arch::X86_64 => f.write_str("x86_64"),
            Arch::Aarch64 => f.write_str("aarch64"),
            Arch::Unknown(code) => write!(f, "unknown ({code})"),
        }
    }
}

/// Hypervisor backend whose in-kernel state the snapshot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Kvm,
    FreeBsdVmm,
    Unknown(u32),
}

impl Backend {
    pub fn code(self) -> u32 {
        match self {
            Backend::Kvm => 1,
            Backend::FreeBsdVmm => 2,
            Backend::Unknown(code) => code,
        }
    }

    pub fn from_code(code: u32) -> Self {
        match code {
            1 => Backend::Kvm,
            2 => Backend::FreeBsdVmm,
            other => Backend::Unknown(other),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Kvm => f.write_str("kvm"),
            Backend::FreeBsdVmm => f.write_str("freebsd-vmm"),
            Backend::Unknown(code) => write!(f, "unknown ({code})"),
        }
    }
}

/// What a section's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionKind {
    /// A payload read into memory and checked against the entry's CRC-32C.
    Data,
    /// Guest RAM: page-aligned, possibly sparse, checked through its `ram-index` section.
    Ram,
    Unknown(u32),
}

impl SectionKind {
    pub fn code(self) -> u32 {
        match self {
            SectionKind::Data => 1,
            SectionKind::Ram => 2,
            SectionKind::Unknown(code) => code,
        }
    }

    pub fn from_code(code: u32) -> Self {
        match code {
            1 => SectionKind::Data,
            2 => SectionKind::Ram,
            other => SectionKind::Unknown(other),
        }
    }
}

impl fmt::Display for SectionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SectionKind::Data => f.write_str("data"),
            SectionKind::Ram => f.write_str("ram"),
            SectionKind::Unknown(code) => write!(f, "kind{code}"),
        }
    }
}

/// Whether a reader that does not know a section may ignore it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement {
    /// The restore must fail if nobody consumes the section.
    Mandatory,
    /// Additive state an older bhyve may skip.
    Optional,
}

/// The decoded fixed-width header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub major: u16,
    pub minor: u16,
    pub header_size: u32,
    pub flags: u32,
    pub arch: Arch,
    pub backend: Backend,
    pub page_size: u32,
    pub table_entry_size: u32,
    pub table_offset: u64,
    pub table_count: u32,
    pub table_checksum: u32,
    /// Seconds since the Unix epoch when the snapshot was written.
    pub created: u64,
    pub producer_name: String,
    pub producer_version: String,
}

/// One decoded section table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionEntry {
    pub name: String,
    /// Which one of several sections with the same name (`3` for a vCPU, `pci.0.31.0` for a
    /// device); empty for singletons.
    pub instance: String,
    /// Version of this section's payload, chosen by its producer.
    pub version: u32,
    pub kind: SectionKind,
    pub flags: u32,
    /// CRC-32C of the payload for data sections; zero for RAM.
    pub checksum: u32,
    pub offset: u64,
    pub length: u64,
    /// Guest-physical base address for RAM sections; zero otherwise.
    pub gpa: u64,
}

impl SectionEntry {
    pub fn mandatory(&self) -> bool {
        self.flags & SECTION_FLAG_MANDATORY != 0
    }

    /// `name` or `name/instance`, the way messages and `inspect` show a section.
    pub fn label(&self) -> String {
        label(&self.name, &self.instance)
    }
}

pub(crate) fn label(name: &str, instance: &str) -> String {
    if instance.is_empty() {
        name.to_string()
    } else {
        format!("{name}/{instance}")
    }
}

pub(crate) fn get_u16(buf: &[u8], at: usize) -> u16 {
    let mut bytes = [0u8; 2];
    if let Some(src) = buf.get(at..at + 2) {
        bytes.copy_from_slice(src);
    }
    u16::from_le_bytes(bytes)
}

pub(crate) fn get_u32(buf: &[u8], at: usize) -> u32 {
    let mut bytes = [0u8; 4];
    if let Some(src) = buf.get(at..at + 4) {
        bytes.copy_from_slice(src);
    }
    u32::from_le_bytes(bytes)
}

pub(crate) fn get_u64(buf: &[u8], at: usize) -> u64 {
    let mut bytes = [0u8; 8];
    if let Some(src) = buf.get(at..at + 8) {
        bytes.copy_from_slice(src);
    }
    u64::from_le_bytes(bytes)
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(dst) = buf.get_mut(at..at + bytes.len()) {
        dst.copy_from_slice(bytes);
    }
}

/// Characters allowed in section names, instances and producer fields: printable ASCII
/// without spaces, so every name prints unambiguously.
fn name_char_ok(byte: u8) -> bool {
    byte.is_ascii_graphic()
}

/// Check a name before it is written: `what` says which field for the message.
pub(crate) fn check_name(what: &str, value: &str, allow_empty: bool) -> Result<(), SnapshotError> {
    if value.is_empty() && !allow_empty {
        return Err(SnapshotError::InvalidArgument(format!("{what} is empty")));
    }
    if value.len() > NAME_LEN {
        return Err(SnapshotError::InvalidArgument(format!(
            "{what} '{value}' is longer than {NAME_LEN} bytes"
        )));
    }
    if !value.bytes().all(name_char_ok) {
        return Err(SnapshotError::InvalidArgument(format!(
            "{what} '{}' has characters other than printable ASCII",
            value.escape_default()
        )));
    }
    Ok(())
}

fn put_name(buf: &mut [u8], at: usize, value: &str) {
    // Callers validated the length; the rest of the field stays NUL.
    let bytes = value.as_bytes();
    let len = bytes.len().min(NAME_LEN);
    put(buf, at, &bytes[..len]);
}

/// Decode a NUL-padded name field: printable ASCII, then only NUL bytes.
fn parse_name(field: &[u8], what: &str) -> Result<String, SnapshotError> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    let (text, padding) = field.split_at(end);
    if padding.iter().any(|&b| b != 0) {
        return Err(SnapshotError::Corrupt(format!(
            "{what} has bytes after its terminating NUL"
        )));
    }
    if !text.iter().copied().all(name_char_ok) {
        return Err(SnapshotError::Corrupt(format!(
            "{what} is not printable ASCII"
        )));
    }
    Ok(text.iter().map(|&b| char::from(b)).collect())
}

/// Fields the writer fills into the header besides the table location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderInfo {
    pub arch: Arch,
    pub backend: Backend,
    /// Producer name and version, at most 32 printable ASCII bytes each.
    pub producer_name: String,
    pub producer_version: String,
    /// Informational flags (bits 16-31), e.g. [`HEADER_FLAG_SUSPENDED`].
    pub flags: u32,
}

impl HeaderInfo {
    /// This build of bhyve-rs on the host architecture, for `backend`.
    pub fn this_build(backend: Backend) -> Self {
        HeaderInfo {
            arch: Arch::host(),
            backend,
            producer_name: "bhyve-rs".to_string(),
            producer_version: env!("CARGO_PKG_VERSION").to_string(),
            flags: 0,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), SnapshotError> {
        check_name("producer name", &self.producer_name, false)?;
        check_name("producer version", &self.producer_version, true)?;
        if self.flags & HEADER_INCOMPATIBLE_MASK & !HEADER_KNOWN_INCOMPATIBLE != 0 {
            return Err(SnapshotError::InvalidArgument(format!(
                "header flags {:#x} use reserved bits",
                self.flags
            )));
        }
        Ok(())
    }
}

/// Encode a 1.0 header; the checksum covers all `HEADER_SIZE` bytes with its own field zero.
pub(crate) fn encode_header(
    info: &HeaderInfo,
    created: u64,
    table_offset: u64,
    table_count: u32,
    table_checksum: u32,
) -> [u8; HEADER_SIZE] {
    let mut buf = [0u8; HEADER_SIZE];
    put(&mut buf, H_MAGIC, &MAGIC);
    put(&mut buf, H_MAJOR, &FORMAT_MAJOR.to_le_bytes());
    put(&mut buf, H_MINOR, &FORMAT_MINOR.to_le_bytes());
    put(&mut buf, H_HEADER_SIZE, &(HEADER_SIZE as u32).to_le_bytes());
    put(&mut buf, H_FLAGS, &info.flags.to_le_bytes());
    put(&mut buf, H_ARCH, &info.arch.code().to_le_bytes());
    put(&mut buf, H_BACKEND, &info.backend.code().to_le_bytes());
    put(&mut buf, H_PAGE_SIZE, &FORMAT_PAGE_SIZE.to_le_bytes());
    put(&mut buf, H_ENTRY_SIZE, &(ENTRY_SIZE as u32).to_le_bytes());
    put(&mut buf, H_TABLE_OFFSET, &table_offset.to_le_bytes());
    put(&mut buf, H_TABLE_COUNT, &table_count.to_le_bytes());
    put(&mut buf, H_TABLE_CHECKSUM, &table_checksum.to_le_bytes());
    put(&mut buf, H_CREATED, &created.to_le_bytes());
    put_name(&mut buf, H_PRODUCER_NAME, &info.producer_name);
    put_name(&mut buf, H_PRODUCER_VERSION, &info.producer_version);
    let checksum = header_checksum(&buf);
    put(&mut buf, H_HEADER_CHECKSUM, &checksum.to_le_bytes());
    buf
}

/// CRC-32C of a header with its checksum field taken as zero.
pub(crate) fn header_checksum(header: &[u8]) -> u32 {
    let before = header.get(..H_HEADER_CHECKSUM).unwrap_or(&[]);
    let after = header.get(H_HEADER_CHECKSUM + 4..).unwrap_or(&[]);
    let crc = crc32c::crc32c(before);
    let crc = crc32c::crc32c_append(crc, &[0u8; 4]);
    crc32c::crc32c_append(crc, after)
}

/// What the first 16 bytes say: checked before anything else is read.
pub(crate) struct HeaderPrefix {
    pub major: u16,
    pub minor: u16,
    pub header_size: u32,
}

pub(crate) fn parse_prefix(prefix: &[u8]) -> Result<HeaderPrefix, SnapshotError> {
    if prefix.len() < HEADER_PREFIX {
        return Err(SnapshotError::Truncated(format!(
            "{} bytes is too short for a snapshot header",
            prefix.len()
        )));
    }
    if prefix.get(..8) != Some(&MAGIC[..]) {
        return Err(SnapshotError::BadMagic);
    }
    let major = get_u16(prefix, H_MAJOR);
    let minor = get_u16(prefix, H_MINOR);
    if major > FORMAT_MAJOR {
        return Err(SnapshotError::NewerFormat { major, minor });
    }
    if major < FORMAT_MAJOR {
        return Err(SnapshotError::Corrupt(format!(
            "snapshot format {major}.{minor} is not supported (this bhyve reads {FORMAT_MAJOR}.x)"
        )));
    }
    let header_size = get_u32(prefix, H_HEADER_SIZE);
    if header_size < HEADER_SIZE as u32 || header_size > HEADER_MAX_SIZE || header_size % 8 != 0 {
        return Err(SnapshotError::Corrupt(format!(
            "header size {header_size} is out of range"
        )));
    }
    Ok(HeaderPrefix {
        major,
        minor,
        header_size,
    })
}

/// Decode and check a whole header of `prefix.header_size` bytes.
pub(crate) fn parse_header(buf: &[u8], prefix: &HeaderPrefix) -> Result<Header, SnapshotError> {
    let stored = get_u32(buf, H_HEADER_CHECKSUM);
    if header_checksum(buf) != stored {
        return Err(SnapshotError::Checksum("header".to_string()));
    }
    let flags = get_u32(buf, H_FLAGS);
    let unknown = flags & HEADER_INCOMPATIBLE_MASK & !HEADER_KNOWN_INCOMPATIBLE;
    if unknown != 0 {
        return Err(SnapshotError::Corrupt(format!(
            "snapshot needs features unknown to this bhyve (header flags {unknown:#x})"
        )));
    }
    let page_size = get_u32(buf, H_PAGE_SIZE);
    if !page_size.is_power_of_two() || !(FORMAT_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
        return Err(SnapshotError::Corrupt(format!(
            "page size {page_size} is out of range"
        )));
    }
    let table_entry_size = get_u32(buf, H_ENTRY_SIZE);
    if table_entry_size < ENTRY_SIZE as u32
        || table_entry_size > ENTRY_MAX_SIZE
        || table_entry_size % 8 != 0
    {
        return Err(SnapshotError::Corrupt(format!(
            "section table entry size {table_entry_size} is out of range"
        )));
    }
    let table_count = get_u32(buf, H_TABLE_COUNT);
    if table_count > MAX_SECTIONS {
        return Err(SnapshotError::Corrupt(format!(
            "{table_count} sections is more than the limit of {MAX_SECTIONS}"
        )));
    }
    let field = |at: usize| buf.get(at..at + NAME_LEN).unwrap_or(&[]);
    Ok(Header {
        major: prefix.major,
        minor: prefix.minor,
        header_size: prefix.header_size,
        flags,
        arch: Arch::from_code(get_u32(buf, H_ARCH)),
        backend: Backend::from_code(get_u32(buf, H_BACKEND)),
        page_size,
        table_entry_size,
        table_offset: get_u64(buf, H_TABLE_OFFSET),
        table_count,
        table_checksum: get_u32(buf, H_TABLE_CHECKSUM),
        created: get_u64(buf, H_CREATED),
        producer_name: parse_name(field(H_PRODUCER_NAME), "producer name")?,
        producer_version: parse_name(field(H_PRODUCER_VERSION), "producer version")?,
    })
}

pub(crate) fn encode_entry(entry: &SectionEntry) -> [u8; ENTRY_SIZE] {
    let mut buf = [0u8; ENTRY_SIZE];
    put_name(&mut buf, E_NAME, &entry.name);
    put_name(&mut buf, E_INSTANCE, &entry.instance);
    put(&mut buf, E_VERSION, &entry.version.to_le_bytes());
    put(&mut buf, E_KIND, &entry.kind.code().to_le_bytes());
    put(&mut buf, E_FLAGS, &entry.flags.to_le_bytes());
    put(&mut buf, E_CHECKSUM, &entry.checksum.to_le_bytes());
    put(&mut buf, E_OFFSET, &entry.offset.to_le_bytes());
    put(&mut buf, E_LENGTH, &entry.length.to_le_bytes());
    put(&mut buf, E_GPA, &entry.gpa.to_le_bytes());
    buf
}

/// Decode one table entry; `index` only names it in messages.
pub(crate) fn parse_entry(buf: &[u8], index: usize) -> Result<SectionEntry, SnapshotError> {
    let field = |at: usize| buf.get(at..at + NAME_LEN).unwrap_or(&[]);
    let name = parse_name(field(E_NAME), &format!("section {index} name"))?;
    if name.is_empty() {
        return Err(SnapshotError::Corrupt(format!(
            "section {index} has an empty name"
        )));
    }
    let instance = parse_name(field(E_INSTANCE), &format!("section {index} instance"))?;
    Ok(SectionEntry {
        name,
        instance,
        version: get_u32(buf, E_VERSION),
        kind: SectionKind::from_code(get_u32(buf, E_KIND)),
        flags: get_u32(buf, E_FLAGS),
        checksum: get_u32(buf, E_CHECKSUM),
        offset: get_u64(buf, E_OFFSET),
        length: get_u64(buf, E_LENGTH),
        gpa: get_u64(buf, E_GPA),
    })
}

/// The `ram-index` payload: chunk size, then one CRC-32C per chunk of the region.
pub(crate) fn encode_ram_index(chunk_size: u32, crcs: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + crcs.len() * 4);
    out.extend_from_slice(&chunk_size.to_le_bytes());
    out.extend_from_slice(&(crcs.len() as u32).to_le_bytes());
    for crc in crcs {
        out.extend_from_slice(&crc.to_le_bytes());
    }
    out
}

/// Decode a `ram-index` payload for a region of `region_size` bytes and `page_size` pages.
pub(crate) fn parse_ram_index(
    payload: &[u8],
    region_size: u64,
    page_size: u32,
    label: &str,
) -> Result<(u32, Vec<u32>), SnapshotError> {
    let bad = |why: &str| SnapshotError::Corrupt(format!("section {label}: {why}"));
    if payload.len() < 8 {
        return Err(bad("too short"));
    }
    let chunk_size = get_u32(payload, 0);
    let count = get_u32(payload, 4);
    if !chunk_size.is_power_of_two() || chunk_size < page_size || chunk_size > MAX_RAM_CHUNK_SIZE {
        return Err(bad(&format!("chunk size {chunk_size} is out of range")));
    }
    if u64::from(count) != region_size.div_ceil(u64::from(chunk_size)) {
        return Err(bad(&format!(
            "{count} chunks do not cover a region of {region_size} bytes"
        )));
    }
    if payload.len() as u64 != 8 + 4 * u64::from(count) {
        return Err(bad("length does not match its chunk count"));
    }
    let crcs = payload
        .get(8..)
        .unwrap_or(&[])
        .chunks_exact(4)
        .map(|c| get_u32(c, 0))
        .collect();
    Ok((chunk_size, crcs))
}

/// Make a snapshot held in memory (`image`, the whole file) pass every integrity check again
/// after a deliberate edit: `entries` replace its section table, then each `ram-index` section
/// gets the CRC-32C of its region's chunks, each data section the CRC-32C of its bytes, the
/// table its checksum and the header its own. Nothing else is checked: sections may point
/// anywhere (those outside `image` keep the checksum given), so a forged but well-sealed file
/// reaches the reader's structural checks and the decoders. For tools and tests that edit
/// snapshots; saving never needs it.
pub fn reseal(image: &mut [u8], entries: &[SectionEntry]) -> Result<(), SnapshotError> {
    let prefix = parse_prefix(image)?;
    let header_size = prefix.header_size as usize;
    if image.len() < header_size {
        return Err(SnapshotError::Truncated(
            "image is shorter than its header".to_string(),
        ));
    }
    let entry_size = get_u32(image, H_ENTRY_SIZE) as usize;
    let table_count = get_u32(image, H_TABLE_COUNT) as usize;
    if entry_size < ENTRY_SIZE || entries.len() != table_count {
        return Err(SnapshotError::InvalidArgument(format!(
            "the image's table holds {table_count} entries of {entry_size} bytes; \
             {} entries of {ENTRY_SIZE} bytes were given",
            entries.len()
        )));
    }
    let table_start = usize::try_from(get_u64(image, H_TABLE_OFFSET)).unwrap_or(usize::MAX);
    let table_end = table_count
        .checked_mul(entry_size)
        .and_then(|len| table_start.checked_add(len))
        .filter(|&end| end <= image.len())
        .ok_or_else(|| {
            SnapshotError::Truncated("the section table ends past the image".to_string())
        })?;

    let bytes_of = |image: &[u8], offset: u64, length: u64| -> Option<std::ops::Range<usize>> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(usize::try_from(length).ok()?)?;
        (end <= image.len()).then_some(start..end)
    };
    for entry in entries {
        if entry.kind != SectionKind::Data || entry.name != RAM_INDEX_SECTION {
            continue;
        }
        let region = entries
            .iter()
            .find(|e| e.kind == SectionKind::Ram && e.instance == entry.instance);
        let (Some(region), Some(index_bytes)) =
            (region, bytes_of(image, entry.offset, entry.length))
        else {
            continue;
        };
        let Some(region_bytes) = bytes_of(image, region.offset, region.length) else {
            continue;
        };
        let page_size = get_u32(image, H_PAGE_SIZE);
        let Ok((chunk_size, _)) =
            parse_ram_index(&image[index_bytes.clone()], region.length, page_size, "")
        else {
            continue;
        };
        let crcs: Vec<u32> = image[region_bytes]
            .chunks(chunk_size as usize)
            .map(crc32c::crc32c)
            .collect();
        image[index_bytes].copy_from_slice(&encode_ram_index(chunk_size, &crcs));
    }
    for (index, entry) in entries.iter().enumerate() {
        let mut entry = entry.clone();
        if entry.kind == SectionKind::Data {
            if let Some(range) = bytes_of(image, entry.offset, entry.length) {
                entry.checksum = crc32c::crc32c(&image[range]);
            }
        }
        put(
            image,
            table_start + index * entry_size,
            &encode_entry(&entry),
        );
    }
    let table_checksum = crc32c::crc32c(&image[table_start..table_end]);
    put(image, H_TABLE_CHECKSUM, &table_checksum.to_le_bytes());
    let header_checksum = header_checksum(&image[..header_size]);
    put(image, H_HEADER_CHECKSUM, &header_checksum.to_le_bytes());
    Ok(())
}

/// Round `value` up to a multiple of the power of two `align`, or `None` on overflow.
pub(crate) fn align_up(value: u64, align: u64) -> Option<u64> {
    let mask = align - 1;
    value.checked_add(mask).map(|v| v & !mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> HeaderInfo {
        HeaderInfo::this_build(Backend::Kvm)
    }

    #[test]
    fn header_round_trips_with_valid_checksum() {
        let buf = encode_header(&info(), 1234, 8192, 3, 0xdead_beef);
        let prefix = parse_prefix(&buf).expect("prefix");
        let header = parse_header(&buf, &prefix).expect("header");
        assert_eq!(header.major, FORMAT_MAJOR);
        assert_eq!(header.minor, FORMAT_MINOR);
        assert_eq!(header.arch, Arch::host());
        assert_eq!(header.backend, Backend::Kvm);
        assert_eq!(header.producer_name, "bhyve-rs");
        assert_eq!(header.table_offset, 8192);
        assert_eq!(header.table_count, 3);
        assert_eq!(header.table_checksum, 0xdead_beef);
        assert_eq!(header.created, 1234);
        assert_eq!(header.page_size, FORMAT_PAGE_SIZE);
    }

    #[test]
    fn header_field_offsets_match_the_manual_page() {
        let buf = encode_header(&info(), 0x0102, 0x1122_3344, 7, 9);
        assert_eq!(&buf[0..8], b"BHYVSNAP");
        assert_eq!(get_u16(&buf, 8), 1);
        assert_eq!(get_u16(&buf, 10), 0);
        assert_eq!(get_u32(&buf, 12), 256);
        assert_eq!(get_u32(&buf, 24), 1);
        assert_eq!(get_u32(&buf, 28), 1);
        assert_eq!(get_u32(&buf, 32), 4096);
        assert_eq!(get_u32(&buf, 36), 128);
        assert_eq!(get_u64(&buf, 40), 0x1122_3344);
        assert_eq!(get_u32(&buf, 48), 7);
        assert_eq!(get_u32(&buf, 52), 9);
        assert_eq!(get_u64(&buf, 56), 0x0102);
        assert_eq!(&buf[64..72], b"bhyve-rs");
        assert!(buf[128..].iter().all(|&b| b == 0));
    }

    #[test]
    fn checksums_are_standard_crc32c() {
        // The check value of CRC-32C (RFC 3720), as the manual page promises.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn entry_round_trips() {
        let entry = SectionEntry {
            name: "lpc".into(),
            instance: "pci.0.31.0".into(),
            version: 3,
            kind: SectionKind::Data,
            flags: SECTION_FLAG_MANDATORY,
            checksum: 42,
            offset: 4096,
            length: 17,
            gpa: 0,
        };
        let buf = encode_entry(&entry);
        assert_eq!(parse_entry(&buf, 0).expect("entry"), entry);
    }

    #[test]
    fn name_with_garbage_after_nul_is_refused() {
        let mut field = [0u8; NAME_LEN];
        field[..3].copy_from_slice(b"abc");
        field[10] = b'x';
        assert!(parse_name(&field, "name").is_err());
        field[10] = 0;
        assert_eq!(parse_name(&field, "name").expect("name"), "abc");
        field[1] = 0xc3;
        assert!(parse_name(&field, "name").is_err());
    }

    #[test]
    fn names_are_checked_before_writing() {
        assert!(check_name("name", "vcpu", false).is_ok());
        assert!(check_name("name", "", false).is_err());
        assert!(check_name("instance", "", true).is_ok());
        assert!(check_name("name", "has space", false).is_err());
        assert!(check_name("name", &"x".repeat(33), false).is_err());
        assert!(check_name("name", &"x".repeat(32), false).is_ok());
    }
}
