//! libnv's packed nvlist: the byte format bhyve and bhyvectl exchange on the control socket.
//!
//! The layout follows FreeBSD's `sys/contrib/libnv` (nvlist.c, nvpair.c): a 19-byte list
//! header, then the pairs in insertion order, each a 19-byte pair header, the NUL-terminated
//! name and the payload. Nested lists are flattened in pre-order and closed by marker pairs.
//! Integers are in the writer's byte order; bit 0x80 of every list header marks big-endian.
//!
//! [`NvList::pack`] produces exactly the bytes libnv produces for the same list;
//! [`NvList::unpack`] performs every check libnv's unpack performs and refuses everything it
//! refuses, with a few deliberate differences, all towards safety or tolerance:
//! * nesting is limited to [`MAX_NESTING_DEPTH`] levels and a list to [`MAX_PACKED_SIZE`] bytes;
//! * the array item count of a big-endian list is byte-swapped (libnv forgets to, and so
//!   refuses every foreign-endian array);
//! * a received descriptor may be referenced by one pair only (libnv hands the same fd number
//!   to every pair naming it, which ends in a double close);
//! * bool-array bytes other than 0 and 1 are read as `true` (libnv keeps the raw byte);
//! * all list arrays together may announce no more elements than the buffer has room for
//!   element headers (libnv creates the missing elements empty, so nested arrays in a few
//!   kilobytes could make it build millions of lists).

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

/// Names compare case-insensitively (ASCII, as `strcasecmp` in the C locale).
pub const NV_FLAG_IGNORE_CASE: u8 = 0x01;
/// Duplicate names are allowed; lookups return the first match.
pub const NV_FLAG_NO_UNIQUE: u8 = 0x02;
const NV_FLAG_PUBLIC_MASK: u8 = NV_FLAG_IGNORE_CASE | NV_FLAG_NO_UNIQUE;
const NV_FLAG_BIG_ENDIAN: u8 = 0x80;
const NV_FLAG_ALL_MASK: u8 = NV_FLAG_PUBLIC_MASK | NV_FLAG_BIG_ENDIAN;

/// Longest name on the wire, counting its terminating NUL (`NV_NAME_MAX`).
pub const NV_NAME_MAX: usize = 2048;
/// Largest packed list [`NvList::unpack`] accepts. libnv has no limit; a control request is
/// a few hundred bytes.
pub const MAX_PACKED_SIZE: usize = 64 << 20;
/// Deepest nesting of lists (nested lists and list-array elements) accepted or built.
/// libnv has no limit; this one is above the 1000 levels libnv is known to produce in tests.
pub const MAX_NESTING_DEPTH: usize = 1024;

/// Size of the list header and of the pair header on the wire.
pub const HEADER_SIZE: usize = 19;
const PAIR_HEADER_SIZE: usize = 19;
/// A marker pair: header plus the empty name.
const MARKER_SIZE: usize = PAIR_HEADER_SIZE + 1;
const NVLIST_MAGIC: u8 = 0x6c;
const NVLIST_VERSION: u8 = 0;
const HOST_IS_BIG_ENDIAN: bool = cfg!(target_endian = "big");

const TYPE_NULL: u8 = 1;
const TYPE_BOOL: u8 = 2;
const TYPE_NUMBER: u8 = 3;
const TYPE_STRING: u8 = 4;
const TYPE_NVLIST: u8 = 5;
const TYPE_DESCRIPTOR: u8 = 6;
const TYPE_BINARY: u8 = 7;
const TYPE_BOOL_ARRAY: u8 = 8;
const TYPE_NUMBER_ARRAY: u8 = 9;
const TYPE_STRING_ARRAY: u8 = 10;
const TYPE_NVLIST_ARRAY: u8 = 11;
const TYPE_DESCRIPTOR_ARRAY: u8 = 12;
const TYPE_NVLIST_ARRAY_NEXT: u8 = 254;
const TYPE_NVLIST_UP: u8 = 255;

/// Why a list could not be built or decoded. [`NvError::errno`] gives the errno libnv reports
/// for the same input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NvError {
    /// The bytes break a rule of the format (libnv: EINVAL).
    #[error("malformed nvlist: {0}")]
    Invalid(&'static str),
    /// The top-level flags differ from what the receiver expects (libnv: EILSEQ).
    #[error("nvlist flags {found:#04x} differ from the expected {expected:#04x}")]
    FlagsMismatch { found: u8, expected: u8 },
    /// A name occurs twice in a list that requires unique names (libnv: EEXIST).
    #[error("duplicate name '{0}' in nvlist")]
    Duplicate(String),
    /// A close-list marker with no open list to close (libnv fails without setting errno).
    #[error("malformed nvlist: nesting marker without an open nested list")]
    UnbalancedMarker,
    /// Nested deeper than [`MAX_NESTING_DEPTH`].
    #[error("nvlist nested deeper than {MAX_NESTING_DEPTH} levels")]
    TooDeep,
    /// Larger than [`MAX_PACKED_SIZE`] or the caller's limit.
    #[error("nvlist of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: u64, limit: usize },
    /// A name longer than [`NV_NAME_MAX`] − 1 bytes (libnv: ENAMETOOLONG).
    #[error("nvlist name of {0} bytes is too long")]
    NameTooLong(usize),
    /// A value libnv cannot represent: embedded NUL, empty binary or array, bad flags.
    #[error("invalid nvlist value: {0}")]
    InvalidValue(&'static str),
}

impl NvError {
    /// The errno libnv would leave for the same failure (0 where libnv sets none).
    pub fn errno(&self) -> i32 {
        match self {
            NvError::Invalid(_) | NvError::InvalidValue(_) => libc::EINVAL,
            NvError::FlagsMismatch { .. } => libc::EILSEQ,
            NvError::Duplicate(_) => libc::EEXIST,
            NvError::UnbalancedMarker => 0,
            NvError::TooDeep | NvError::TooLarge { .. } => libc::E2BIG,
            NvError::NameTooLong(_) => libc::ENAMETOOLONG,
        }
    }
}

/// One value of a pair.
#[derive(Debug)]
pub enum NvValue {
    Null,
    Bool(bool),
    Number(u64),
    /// Bytes without NUL; usually UTF-8 but libnv does not require it.
    String(Vec<u8>),
    NvList(NvList),
    /// An open descriptor; travels out of band (SCM_RIGHTS), the bytes hold its index.
    Descriptor(OwnedFd),
    /// At least one byte.
    Binary(Vec<u8>),
    BoolArray(Vec<bool>),
    NumberArray(Vec<u64>),
    StringArray(Vec<Vec<u8>>),
    NvListArray(Vec<NvList>),
    DescriptorArray(Vec<OwnedFd>),
}

impl NvValue {
    /// A string value from text.
    pub fn string(value: &str) -> NvValue {
        NvValue::String(value.as_bytes().to_vec())
    }

    fn type_code(&self) -> u8 {
        match self {
            NvValue::Null => TYPE_NULL,
            NvValue::Bool(_) => TYPE_BOOL,
            NvValue::Number(_) => TYPE_NUMBER,
            NvValue::String(_) => TYPE_STRING,
            NvValue::NvList(_) => TYPE_NVLIST,
            NvValue::Descriptor(_) => TYPE_DESCRIPTOR,
            NvValue::Binary(_) => TYPE_BINARY,
            NvValue::BoolArray(_) => TYPE_BOOL_ARRAY,
            NvValue::NumberArray(_) => TYPE_NUMBER_ARRAY,
            NvValue::StringArray(_) => TYPE_STRING_ARRAY,
            NvValue::NvListArray(_) => TYPE_NVLIST_ARRAY,
            NvValue::DescriptorArray(_) => TYPE_DESCRIPTOR_ARRAY,
        }
    }

    /// libnv's name for the type, as in `nvpair_type_string`.
    pub fn type_name(&self) -> &'static str {
        match self {
            NvValue::Null => "NULL",
            NvValue::Bool(_) => "BOOL",
            NvValue::Number(_) => "NUMBER",
            NvValue::String(_) => "STRING",
            NvValue::NvList(_) => "NVLIST",
            NvValue::Descriptor(_) => "DESCRIPTOR",
            NvValue::Binary(_) => "BINARY",
            NvValue::BoolArray(_) => "BOOL ARRAY",
            NvValue::NumberArray(_) => "NUMBER ARRAY",
            NvValue::StringArray(_) => "STRING ARRAY",
            NvValue::NvListArray(_) => "NVLIST ARRAY",
            NvValue::DescriptorArray(_) => "DESCRIPTOR ARRAY",
        }
    }

    /// Check what libnv checks when such a value is created.
    fn validate(&self) -> Result<(), NvError> {
        let no_nul = |bytes: &[u8]| {
            if bytes.contains(&0) {
                Err(NvError::InvalidValue("string contains a NUL byte"))
            } else {
                Ok(())
            }
        };
        match self {
            NvValue::String(s) => no_nul(s),
            NvValue::Binary(b) if b.is_empty() => Err(NvError::InvalidValue("empty binary")),
            NvValue::BoolArray(v) if v.is_empty() => Err(NvError::InvalidValue("empty array")),
            NvValue::NumberArray(v) if v.is_empty() => Err(NvError::InvalidValue("empty array")),
            NvValue::NvListArray(v) if v.is_empty() => Err(NvError::InvalidValue("empty array")),
            NvValue::DescriptorArray(v) if v.is_empty() => {
                Err(NvError::InvalidValue("empty array"))
            }
            NvValue::StringArray(v) => {
                if v.is_empty() {
                    return Err(NvError::InvalidValue("empty array"));
                }
                v.iter().try_for_each(|s| no_nul(s))
            }
            _ => Ok(()),
        }
    }

    /// Nesting depth this value adds below its list (0 for scalars).
    fn depth(&self) -> usize {
        match self {
            NvValue::NvList(l) => l.depth + 1,
            NvValue::NvListArray(v) => v.iter().map(|l| l.depth + 1).max().unwrap_or(1),
            _ => 0,
        }
    }

    fn descriptor_count(&self) -> usize {
        match self {
            NvValue::Descriptor(_) => 1,
            NvValue::DescriptorArray(v) => v.len(),
            NvValue::NvList(l) => l.descriptor_count(),
            NvValue::NvListArray(v) => v.iter().map(NvList::descriptor_count).sum(),
            _ => 0,
        }
    }
}

/// A name and its value.
#[derive(Debug)]
pub struct NvPair {
    name: Vec<u8>,
    value: NvValue,
}

impl NvPair {
    /// The name's bytes (no NUL).
    pub fn name(&self) -> &[u8] {
        &self.name
    }

    pub fn value(&self) -> &NvValue {
        &self.value
    }
}

/// An ordered list of named values, as libnv's `nvlist_t`.
///
/// Every list that exists satisfies libnv's creation rules (names ≤ 2047 bytes without NUL,
/// unique unless [`NV_FLAG_NO_UNIQUE`], no empty arrays or binaries, no NUL inside strings,
/// nesting ≤ [`MAX_NESTING_DEPTH`]), so [`NvList::pack`] cannot fail.
#[derive(Debug, Default)]
pub struct NvList {
    flags: u8,
    pairs: Vec<NvPair>,
    /// Levels of lists below this one (an upper bound after `take`).
    depth: usize,
}

impl NvList {
    /// An empty list with flags 0, the kind bhyve and bhyvectl exchange.
    pub fn new() -> NvList {
        NvList::default()
    }

    /// An empty list with public flags ([`NV_FLAG_IGNORE_CASE`], [`NV_FLAG_NO_UNIQUE`]).
    pub fn with_flags(flags: u8) -> Result<NvList, NvError> {
        if flags & !NV_FLAG_PUBLIC_MASK != 0 {
            return Err(NvError::InvalidValue("unknown nvlist flags"));
        }
        Ok(NvList {
            flags,
            ..NvList::default()
        })
    }

    pub fn flags(&self) -> u8 {
        self.flags
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// The pairs in order.
    pub fn pairs(&self) -> &[NvPair] {
        &self.pairs
    }

    /// Append a pair, refusing what libnv refuses (ENAMETOOLONG, EEXIST, EINVAL).
    pub fn add(&mut self, name: impl AsRef<[u8]>, value: NvValue) -> Result<(), NvError> {
        let name = name.as_ref();
        if name.len() >= NV_NAME_MAX {
            return Err(NvError::NameTooLong(name.len()));
        }
        if name.contains(&0) {
            return Err(NvError::InvalidValue("name contains a NUL byte"));
        }
        value.validate()?;
        let depth = value.depth();
        if depth > MAX_NESTING_DEPTH {
            return Err(NvError::TooDeep);
        }
        if self.flags & NV_FLAG_NO_UNIQUE == 0 && self.position(name, None).is_some() {
            return Err(NvError::Duplicate(
                String::from_utf8_lossy(name).into_owned(),
            ));
        }
        self.depth = self.depth.max(depth);
        self.pairs.push(NvPair {
            name: name.to_vec(),
            value,
        });
        Ok(())
    }

    pub fn add_null(&mut self, name: &str) -> Result<(), NvError> {
        self.add(name, NvValue::Null)
    }

    pub fn add_bool(&mut self, name: &str, value: bool) -> Result<(), NvError> {
        self.add(name, NvValue::Bool(value))
    }

    pub fn add_number(&mut self, name: &str, value: u64) -> Result<(), NvError> {
        self.add(name, NvValue::Number(value))
    }

    pub fn add_string(&mut self, name: &str, value: &str) -> Result<(), NvError> {
        self.add(name, NvValue::string(value))
    }

    pub fn add_nvlist(&mut self, name: &str, value: NvList) -> Result<(), NvError> {
        self.add(name, NvValue::NvList(value))
    }

    /// Move a descriptor into the list (as `nvlist_move_descriptor`).
    pub fn add_descriptor(&mut self, name: &str, fd: OwnedFd) -> Result<(), NvError> {
        self.add(name, NvValue::Descriptor(fd))
    }

    fn names_equal(&self, a: &[u8], b: &[u8]) -> bool {
        if self.flags & NV_FLAG_IGNORE_CASE != 0 {
            a.eq_ignore_ascii_case(b)
        } else {
            a == b
        }
    }

    /// Index of the first pair named `name` (of type `type_code` if given), as `nvlist_find`.
    fn position(&self, name: &[u8], type_code: Option<u8>) -> Option<usize> {
        self.pairs.iter().position(|p| {
            type_code.is_none_or(|t| p.value.type_code() == t) && self.names_equal(&p.name, name)
        })
    }

    /// The first value named `name`, whatever its type.
    pub fn get(&self, name: &str) -> Option<&NvValue> {
        self.position(name.as_bytes(), None)
            .map(|i| &self.pairs[i].value)
    }

    fn get_typed(&self, name: &str, type_code: u8) -> Option<&NvValue> {
        self.position(name.as_bytes(), Some(type_code))
            .map(|i| &self.pairs[i].value)
    }

    /// Whether a pair of that name exists, whatever its type (`nvlist_exists`).
    pub fn exists(&self, name: &str) -> bool {
        self.position(name.as_bytes(), None).is_some()
    }

    pub fn get_bool(&self, name: &str) -> Option<bool> {
        match self.get_typed(name, TYPE_BOOL) {
            Some(NvValue::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    pub fn get_number(&self, name: &str) -> Option<u64> {
        match self.get_typed(name, TYPE_NUMBER) {
            Some(NvValue::Number(n)) => Some(*n),
            _ => None,
        }
    }

    /// The raw bytes of a string value.
    pub fn get_string_bytes(&self, name: &str) -> Option<&[u8]> {
        match self.get_typed(name, TYPE_STRING) {
            Some(NvValue::String(s)) => Some(s),
            _ => None,
        }
    }

    /// A string value that is valid UTF-8.
    pub fn get_string(&self, name: &str) -> Option<&str> {
        self.get_string_bytes(name)
            .and_then(|s| std::str::from_utf8(s).ok())
    }

    pub fn get_nvlist(&self, name: &str) -> Option<&NvList> {
        match self.get_typed(name, TYPE_NVLIST) {
            Some(NvValue::NvList(l)) => Some(l),
            _ => None,
        }
    }

    pub fn get_descriptor(&self, name: &str) -> Option<BorrowedFd<'_>> {
        match self.get_typed(name, TYPE_DESCRIPTOR) {
            Some(NvValue::Descriptor(fd)) => Some(fd.as_fd()),
            _ => None,
        }
    }

    /// Remove the first pair named `name` and return its value.
    pub fn take(&mut self, name: &str) -> Option<NvValue> {
        let index = self.position(name.as_bytes(), None)?;
        Some(self.pairs.remove(index).value)
    }

    /// Remove the first descriptor named `name` and hand over its ownership.
    pub fn take_descriptor(&mut self, name: &str) -> Option<OwnedFd> {
        let index = self.position(name.as_bytes(), Some(TYPE_DESCRIPTOR))?;
        match self.pairs.remove(index).value {
            NvValue::Descriptor(fd) => Some(fd),
            _ => None,
        }
    }

    /// Descriptors in this list and every list below it (the header's descriptor count).
    pub fn descriptor_count(&self) -> usize {
        self.pairs.iter().map(|p| p.value.descriptor_count()).sum()
    }

    /// Bytes this list occupies when packed: its header and pairs, nested lists with their
    /// closing markers. For a nested list this is also the `datasize` libnv writes.
    pub fn packed_size(&self) -> usize {
        HEADER_SIZE
            + self
                .pairs
                .iter()
                .map(|p| {
                    PAIR_HEADER_SIZE
                        + p.name.len()
                        + 1
                        + match &p.value {
                            NvValue::NvList(l) => l.packed_size() + MARKER_SIZE,
                            NvValue::NvListArray(v) => {
                                v.iter().map(|l| l.packed_size() + MARKER_SIZE).sum()
                            }
                            other => payload_size(other),
                        }
                })
                .sum::<usize>()
    }

    /// Pack as libnv's `nvlist_send` does: host byte order, descriptors numbered 0, 1, …
    /// in pre-order. Returns the bytes and the descriptors to pass, in index order; the
    /// descriptors stay owned by the list.
    pub fn pack(&self) -> (Vec<u8>, Vec<RawFd>) {
        let total = self.packed_size();
        let mut writer = Writer {
            out: Vec::with_capacity(total),
            total,
            fds: Vec::new(),
        };
        writer.list(self);
        debug_assert_eq!(writer.out.len(), total);
        (writer.out, writer.fds)
    }

    /// Unpack a list packed with flags 0 (as bhyve's `nvlist_recv(fd, 0)`), taking
    /// ownership of the received descriptors; those no pair refers to are closed.
    pub fn unpack(bytes: &[u8], fds: Vec<OwnedFd>) -> Result<NvList, NvError> {
        NvList::unpack_with_flags(bytes, fds, 0)
    }

    /// Unpack, requiring the top-level public flags to equal `flags` (libnv: EILSEQ).
    pub fn unpack_with_flags(
        bytes: &[u8],
        fds: Vec<OwnedFd>,
        flags: u8,
    ) -> Result<NvList, NvError> {
        Reader::new(bytes, fds).run(flags)
    }
}

/// What a list header announces, as a stream receiver needs it before reading the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListHeader {
    /// Bytes that follow the header.
    pub size: u64,
    /// Descriptors that follow the bytes, out of band.
    pub descriptors: u64,
    /// Public flags.
    pub flags: u8,
}

impl ListHeader {
    /// Check a top-level header the way `nvlist_recv` does before reading the rest
    /// (magic, flag bits, size overflow) and decode it in its own byte order.
    pub fn parse(raw: &[u8; HEADER_SIZE]) -> Result<ListHeader, NvError> {
        let flags = raw[2];
        let big_endian = flags & NV_FLAG_BIG_ENDIAN != 0;
        let size = Reader::u64_at(&raw[11..], big_endian);
        if raw[0] != NVLIST_MAGIC {
            return Err(NvError::Invalid("bad nvlist magic"));
        }
        if flags & !NV_FLAG_ALL_MASK != 0 {
            return Err(NvError::Invalid("unknown nvlist header flags"));
        }
        if size > (usize::MAX - HEADER_SIZE) as u64 {
            return Err(NvError::Invalid("nvlist size overflows"));
        }
        Ok(ListHeader {
            size,
            descriptors: Reader::u64_at(&raw[3..], big_endian),
            flags: flags & NV_FLAG_PUBLIC_MASK,
        })
    }
}

fn payload_size(value: &NvValue) -> usize {
    match value {
        NvValue::Null => 0,
        NvValue::Bool(_) => 1,
        NvValue::Number(_) | NvValue::Descriptor(_) => 8,
        NvValue::String(s) => s.len() + 1,
        NvValue::Binary(b) => b.len(),
        NvValue::BoolArray(v) => v.len(),
        NvValue::NumberArray(v) => 8 * v.len(),
        NvValue::DescriptorArray(v) => 8 * v.len(),
        NvValue::StringArray(v) => v.iter().map(|s| s.len() + 1).sum(),
        NvValue::NvList(_) | NvValue::NvListArray(_) => 0,
    }
}

fn host_u16(v: u16) -> [u8; 2] {
    if HOST_IS_BIG_ENDIAN {
        v.to_be_bytes()
    } else {
        v.to_le_bytes()
    }
}

fn host_u64(v: u64) -> [u8; 8] {
    if HOST_IS_BIG_ENDIAN {
        v.to_be_bytes()
    } else {
        v.to_le_bytes()
    }
}

struct Writer {
    out: Vec<u8>,
    total: usize,
    fds: Vec<RawFd>,
}

impl Writer {
    fn header(&mut self, list: &NvList) {
        let mut flags = list.flags;
        if HOST_IS_BIG_ENDIAN {
            flags |= NV_FLAG_BIG_ENDIAN;
        }
        // Every header's size runs to the end of the whole buffer, nested ones included.
        let remaining = self.total - self.out.len() - HEADER_SIZE;
        self.out
            .extend_from_slice(&[NVLIST_MAGIC, NVLIST_VERSION, flags]);
        self.out
            .extend_from_slice(&host_u64(list.descriptor_count() as u64));
        self.out.extend_from_slice(&host_u64(remaining as u64));
    }

    fn pair_header(&mut self, type_code: u8, name: &[u8], datasize: usize, nitems: usize) {
        self.out.push(type_code);
        // add() keeps names below NV_NAME_MAX, so namesize fits 16 bits.
        self.out
            .extend_from_slice(&host_u16((name.len() + 1) as u16));
        self.out.extend_from_slice(&host_u64(datasize as u64));
        self.out.extend_from_slice(&host_u64(nitems as u64));
        self.out.extend_from_slice(name);
        self.out.push(0);
    }

    fn marker(&mut self, type_code: u8) {
        self.pair_header(type_code, b"", 0, 0);
    }

    fn descriptor(&mut self, fd: &OwnedFd) {
        let index = self.fds.len() as u64;
        self.fds.push(fd.as_raw_fd());
        self.out.extend_from_slice(&host_u64(index));
    }

    fn list(&mut self, list: &NvList) {
        self.header(list);
        for pair in &list.pairs {
            let value = &pair.value;
            let nitems = match value {
                NvValue::BoolArray(v) => v.len(),
                NvValue::NumberArray(v) => v.len(),
                NvValue::StringArray(v) => v.len(),
                NvValue::NvListArray(v) => v.len(),
                NvValue::DescriptorArray(v) => v.len(),
                _ => 0,
            };
            let datasize = match value {
                NvValue::NvList(l) => l.packed_size(),
                other => payload_size(other),
            };
            self.pair_header(value.type_code(), &pair.name, datasize, nitems);
            match value {
                NvValue::Null => {}
                NvValue::Bool(b) => self.out.push(u8::from(*b)),
                NvValue::Number(n) => self.out.extend_from_slice(&host_u64(*n)),
                NvValue::String(s) => {
                    self.out.extend_from_slice(s);
                    self.out.push(0);
                }
                NvValue::NvList(l) => {
                    self.list(l);
                    self.marker(TYPE_NVLIST_UP);
                }
                NvValue::Descriptor(fd) => self.descriptor(fd),
                NvValue::Binary(b) => self.out.extend_from_slice(b),
                NvValue::BoolArray(v) => self.out.extend(v.iter().map(|b| u8::from(*b))),
                NvValue::NumberArray(v) => {
                    for n in v {
                        self.out.extend_from_slice(&host_u64(*n));
                    }
                }
                NvValue::StringArray(v) => {
                    for s in v {
                        self.out.extend_from_slice(s);
                        self.out.push(0);
                    }
                }
                NvValue::NvListArray(v) => {
                    for l in v {
                        self.list(l);
                        self.marker(TYPE_NVLIST_ARRAY_NEXT);
                    }
                }
                NvValue::DescriptorArray(v) => {
                    for fd in v {
                        self.descriptor(fd);
                    }
                }
            }
        }
    }
}

/// Where a list being decoded goes once it is complete.
enum Slot {
    Top,
    /// The value of the parent's last pair.
    Child,
    /// Element `index` of the parent's last pair, an NVLIST_ARRAY.
    ArrayElement {
        index: usize,
    },
}

struct Frame<'a> {
    list: NvList,
    slot: Slot,
    /// Names in `list` so far, for the uniqueness check: a scan per pair would make a
    /// list of n pairs cost n² comparisons (hours for a list of `MAX_PACKED_SIZE`).
    names: HashSet<NameKey<'a>>,
}

impl<'a> Frame<'a> {
    fn new(list: NvList, slot: Slot) -> Frame<'a> {
        Frame {
            list,
            slot,
            names: HashSet::new(),
        }
    }
}

/// A decoded name as its list compares names: ASCII case folded under
/// [`NV_FLAG_IGNORE_CASE`].
struct NameKey<'a> {
    name: &'a [u8],
    fold_case: bool,
}

impl Hash for NameKey<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_usize(self.name.len());
        if self.fold_case {
            self.name
                .iter()
                .for_each(|b| state.write_u8(b.to_ascii_lowercase()));
        } else {
            state.write(self.name);
        }
    }
}

impl PartialEq for NameKey<'_> {
    fn eq(&self, other: &Self) -> bool {
        if self.fold_case {
            self.name.eq_ignore_ascii_case(other.name)
        } else {
            self.name == other.name
        }
    }
}

impl Eq for NameKey<'_> {}

struct PairHeader<'a> {
    type_code: u8,
    name: &'a [u8],
    datasize: u64,
    nitems: u64,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Byte order of pair fields, set by the top header and each array element header.
    big_endian: bool,
    fds: Vec<Option<OwnedFd>>,
    /// Elements all NVLIST_ARRAY pairs so far have announced; each needs a header of its own.
    array_elements: u64,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], fds: Vec<OwnedFd>) -> Reader<'a> {
        Reader {
            buf,
            pos: 0,
            big_endian: HOST_IS_BIG_ENDIAN,
            fds: fds.into_iter().map(Some).collect(),
            array_elements: 0,
        }
    }

    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Take `len` bytes; callers have checked `len <= left()`, the check here only guards.
    fn bytes(&mut self, len: usize) -> Result<&'a [u8], NvError> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|end| *end <= self.buf.len())
            .ok_or(NvError::Invalid("value runs past the end of the buffer"))?;
        let slice = &self.buf[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn u64_at(bytes: &[u8], big_endian: bool) -> u64 {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&bytes[..8]);
        if big_endian {
            u64::from_be_bytes(raw)
        } else {
            u64::from_le_bytes(raw)
        }
    }

    /// Read and check a list header (`nvlist_check_header` + `nvlist_unpack_header`).
    /// Returns the list's public flags and whether the header says big-endian.
    fn list_header(&mut self) -> Result<(u8, bool), NvError> {
        if self.left() < HEADER_SIZE {
            return Err(NvError::Invalid("truncated nvlist header"));
        }
        let raw = self.bytes(HEADER_SIZE)?;
        let (magic, flags) = (raw[0], raw[2]);
        // The version byte (raw[1]) is not checked, as in libnv.
        let big_endian = flags & NV_FLAG_BIG_ENDIAN != 0;
        let descriptors = Self::u64_at(&raw[3..], big_endian);
        let size = Self::u64_at(&raw[11..], big_endian);
        if magic != NVLIST_MAGIC {
            return Err(NvError::Invalid("bad nvlist magic"));
        }
        if flags & !NV_FLAG_ALL_MASK != 0 {
            return Err(NvError::Invalid("unknown nvlist header flags"));
        }
        if size != self.left() as u64 {
            return Err(NvError::Invalid(
                "nvlist header size does not match the data",
            ));
        }
        if descriptors > self.fds.len() as u64 {
            return Err(NvError::Invalid(
                "nvlist header counts more descriptors than were received",
            ));
        }
        Ok((flags & NV_FLAG_PUBLIC_MASK, big_endian))
    }

    /// Read and check a pair header and name (`nvpair_unpack_header`).
    fn pair_header(&mut self) -> Result<PairHeader<'a>, NvError> {
        if self.left() < PAIR_HEADER_SIZE {
            return Err(NvError::Invalid("truncated pair header"));
        }
        let raw = self.bytes(PAIR_HEADER_SIZE)?;
        let type_code = raw[0];
        let namesize_raw = [raw[1], raw[2]];
        let namesize = if self.big_endian {
            u16::from_be_bytes(namesize_raw)
        } else {
            u16::from_le_bytes(namesize_raw)
        } as usize;
        let datasize = Self::u64_at(&raw[3..], self.big_endian);
        let nitems = Self::u64_at(&raw[11..], self.big_endian);
        let known = matches!(
            type_code,
            TYPE_NULL..=TYPE_DESCRIPTOR_ARRAY | TYPE_NVLIST_ARRAY_NEXT | TYPE_NVLIST_UP
        );
        if !known {
            return Err(NvError::Invalid("unknown pair type"));
        }
        if namesize == 0 || namesize > NV_NAME_MAX || namesize > self.left() {
            return Err(NvError::Invalid("bad pair name size"));
        }
        let name = self.bytes(namesize)?;
        if name.iter().position(|b| *b == 0) != Some(namesize - 1) {
            return Err(NvError::Invalid("pair name not terminated by its only NUL"));
        }
        if datasize > self.left() as u64 {
            return Err(NvError::Invalid(
                "pair data runs past the end of the buffer",
            ));
        }
        Ok(PairHeader {
            type_code,
            name: &name[..namesize - 1],
            datasize,
            nitems,
        })
    }

    /// `datasize` of a pair, known to be ≤ left() by `pair_header`.
    fn data(&mut self, header: &PairHeader<'_>) -> Result<&'a [u8], NvError> {
        self.bytes(header.datasize as usize)
    }

    fn descriptor(&mut self, raw: &[u8]) -> Result<OwnedFd, NvError> {
        let index = Self::u64_at(raw, self.big_endian) as i64;
        if index < 0 || index as u64 >= self.fds.len() as u64 {
            return Err(NvError::Invalid("descriptor index out of range"));
        }
        self.fds[index as usize]
            .take()
            .ok_or(NvError::Invalid("descriptor index used twice"))
    }

    /// Decode a pair's payload; nested lists are only announced (their contents follow).
    fn scalar(&mut self, header: &PairHeader<'_>) -> Result<NvValue, NvError> {
        let datasize = header.datasize;
        let nitems = header.nitems;
        let value = match header.type_code {
            TYPE_NULL => {
                if datasize != 0 {
                    return Err(NvError::Invalid("NULL with data"));
                }
                NvValue::Null
            }
            TYPE_BOOL => {
                if datasize != 1 {
                    return Err(NvError::Invalid("BOOL data size is not 1"));
                }
                match self.data(header)?[0] {
                    0 => NvValue::Bool(false),
                    1 => NvValue::Bool(true),
                    _ => return Err(NvError::Invalid("BOOL value is neither 0 nor 1")),
                }
            }
            TYPE_NUMBER => {
                if datasize != 8 {
                    return Err(NvError::Invalid("NUMBER data size is not 8"));
                }
                let raw = self.data(header)?;
                NvValue::Number(Self::u64_at(raw, self.big_endian))
            }
            TYPE_STRING => {
                if datasize == 0 {
                    return Err(NvError::Invalid("STRING without data"));
                }
                let raw = self.data(header)?;
                if raw.iter().position(|b| *b == 0) != Some(raw.len() - 1) {
                    return Err(NvError::Invalid("STRING not terminated by its only NUL"));
                }
                NvValue::String(raw[..raw.len() - 1].to_vec())
            }
            TYPE_DESCRIPTOR => {
                if datasize != 8 {
                    return Err(NvError::Invalid("DESCRIPTOR data size is not 8"));
                }
                let raw = self.data(header)?;
                NvValue::Descriptor(self.descriptor(raw)?)
            }
            TYPE_BINARY => {
                if datasize == 0 {
                    return Err(NvError::Invalid("BINARY without data"));
                }
                NvValue::Binary(self.data(header)?.to_vec())
            }
            TYPE_BOOL_ARRAY => {
                if nitems == 0 || datasize != nitems {
                    return Err(NvError::Invalid("BOOL ARRAY size does not match its count"));
                }
                // libnv does not check the element bytes.
                NvValue::BoolArray(self.data(header)?.iter().map(|b| *b != 0).collect())
            }
            TYPE_NUMBER_ARRAY => {
                if nitems == 0 || nitems.checked_mul(8) != Some(datasize) {
                    return Err(NvError::Invalid(
                        "NUMBER ARRAY size does not match its count",
                    ));
                }
                let big_endian = self.big_endian;
                let raw = self.data(header)?;
                NvValue::NumberArray(
                    raw.chunks_exact(8)
                        .map(|c| Self::u64_at(c, big_endian))
                        .collect(),
                )
            }
            TYPE_STRING_ARRAY => {
                if datasize == 0 || nitems == 0 {
                    return Err(NvError::Invalid("empty STRING ARRAY"));
                }
                let mut rest = self.data(header)?;
                let mut items = Vec::new();
                for _ in 0..nitems {
                    let end = rest
                        .iter()
                        .position(|b| *b == 0)
                        .ok_or(NvError::Invalid("STRING ARRAY element not terminated"))?;
                    items.push(rest[..end].to_vec());
                    rest = &rest[end + 1..];
                }
                if !rest.is_empty() {
                    return Err(NvError::Invalid(
                        "STRING ARRAY count does not match its data",
                    ));
                }
                NvValue::StringArray(items)
            }
            TYPE_DESCRIPTOR_ARRAY => {
                if nitems == 0 || nitems.checked_mul(8) != Some(datasize) {
                    return Err(NvError::Invalid(
                        "DESCRIPTOR ARRAY size does not match its count",
                    ));
                }
                let raw = self.data(header)?;
                let mut fds = Vec::new();
                for chunk in raw.chunks_exact(8) {
                    fds.push(self.descriptor(chunk)?);
                }
                NvValue::DescriptorArray(fds)
            }
            _ => return Err(NvError::Invalid("unknown pair type")),
        };
        Ok(value)
    }

    fn run(mut self, expected_flags: u8) -> Result<NvList, NvError> {
        if self.buf.len() > MAX_PACKED_SIZE {
            return Err(NvError::TooLarge {
                size: self.buf.len() as u64,
                limit: MAX_PACKED_SIZE,
            });
        }
        let (flags, big_endian) = self.list_header()?;
        self.big_endian = big_endian;
        if flags != expected_flags {
            return Err(NvError::FlagsMismatch {
                found: flags,
                expected: expected_flags,
            });
        }
        let mut stack = vec![Frame::new(
            NvList {
                flags,
                ..NvList::default()
            },
            Slot::Top,
        )];

        while self.left() > 0 {
            let header = self.pair_header()?;
            let value = match header.type_code {
                TYPE_NVLIST_UP => {
                    close_frame(&mut stack)?;
                    continue;
                }
                TYPE_NVLIST_ARRAY_NEXT => {
                    // Outside an array, or after its last element, this closes the list
                    // like NVLIST_UP (libnv treats both alike there).
                    let next = match stack.last() {
                        Some(Frame {
                            slot: Slot::ArrayElement { index },
                            ..
                        }) => Some(index + 1),
                        _ => None,
                    };
                    close_frame(&mut stack)?;
                    let more = next.filter(|next| {
                        matches!(
                            stack.last().and_then(|f| f.list.pairs.last()),
                            Some(NvPair { value: NvValue::NvListArray(v), .. }) if *next < v.len()
                        )
                    });
                    if let Some(index) = more {
                        let (flags, big_endian) = self.list_header()?;
                        self.big_endian = big_endian;
                        stack.push(Frame::new(
                            NvList {
                                flags,
                                ..NvList::default()
                            },
                            Slot::ArrayElement { index },
                        ));
                    }
                    continue;
                }
                TYPE_NVLIST => {
                    if header.datasize == 0 {
                        return Err(NvError::Invalid("NVLIST without data"));
                    }
                    let (flags, _) = self.list_header()?;
                    let child = NvList {
                        flags,
                        ..NvList::default()
                    };
                    add_decoded(&mut stack, header.name, NvValue::NvList(NvList::default()))?;
                    push_frame(&mut stack, child, Slot::Child)?;
                    continue;
                }
                TYPE_NVLIST_ARRAY => {
                    let count = header.nitems;
                    let fits = count
                        .checked_mul(HEADER_SIZE as u64)
                        .is_some_and(|need| need <= self.left() as u64);
                    if count == 0 || !fits {
                        return Err(NvError::Invalid("bad NVLIST ARRAY count"));
                    }
                    // Each array's count is checked against the bytes left, but those bytes
                    // are shared by the arrays nested in its first element: without a total,
                    // nested arrays would allocate quadratically in the buffer's size.
                    self.array_elements = self.array_elements.saturating_add(count);
                    if self.array_elements > (self.buf.len() / HEADER_SIZE) as u64 {
                        return Err(NvError::Invalid(
                            "NVLIST ARRAY elements do not fit in the buffer",
                        ));
                    }
                    let elements = (0..count).map(|_| NvList::default()).collect();
                    let (flags, big_endian) = self.list_header()?;
                    self.big_endian = big_endian;
                    add_decoded(&mut stack, header.name, NvValue::NvListArray(elements))?;
                    let first = NvList {
                        flags,
                        ..NvList::default()
                    };
                    push_frame(&mut stack, first, Slot::ArrayElement { index: 0 })?;
                    continue;
                }
                _ => self.scalar(&header)?,
            };
            add_decoded(&mut stack, header.name, value)?;
        }

        // A list may end without its closing markers; libnv accepts that.
        while stack.len() > 1 {
            close_frame(&mut stack)?;
        }
        stack
            .pop()
            .map(|frame| frame.list)
            .ok_or(NvError::UnbalancedMarker)
    }
}

/// Append a decoded pair to the list being filled, with libnv's uniqueness rule.
fn add_decoded<'a>(stack: &mut [Frame<'a>], name: &'a [u8], value: NvValue) -> Result<(), NvError> {
    let frame = stack.last_mut().ok_or(NvError::UnbalancedMarker)?;
    let list = &mut frame.list;
    if list.flags & NV_FLAG_NO_UNIQUE == 0 {
        let key = NameKey {
            name,
            fold_case: list.flags & NV_FLAG_IGNORE_CASE != 0,
        };
        if !frame.names.insert(key) {
            return Err(NvError::Duplicate(
                String::from_utf8_lossy(name).into_owned(),
            ));
        }
    }
    list.pairs.push(NvPair {
        name: name.to_vec(),
        value,
    });
    Ok(())
}

fn push_frame(stack: &mut Vec<Frame<'_>>, list: NvList, slot: Slot) -> Result<(), NvError> {
    // The top frame is level 0.
    if stack.len() > MAX_NESTING_DEPTH {
        return Err(NvError::TooDeep);
    }
    stack.push(Frame::new(list, slot));
    Ok(())
}

/// Finish the innermost open list and store it in its parent's last pair.
fn close_frame(stack: &mut Vec<Frame<'_>>) -> Result<(), NvError> {
    if stack.len() < 2 {
        return Err(NvError::UnbalancedMarker);
    }
    let frame = stack.pop().ok_or(NvError::UnbalancedMarker)?;
    let parent = stack
        .last_mut()
        .map(|f| &mut f.list)
        .ok_or(NvError::UnbalancedMarker)?;
    let child_depth = frame.list.depth + 1;
    let slot = parent
        .pairs
        .last_mut()
        .map(|p| &mut p.value)
        .ok_or(NvError::UnbalancedMarker)?;
    match (frame.slot, slot) {
        (Slot::Child, NvValue::NvList(target)) => *target = frame.list,
        (Slot::ArrayElement { index }, NvValue::NvListArray(items)) if index < items.len() => {
            items[index] = frame.list
        }
        _ => return Err(NvError::UnbalancedMarker),
    }
    parent.depth = parent.depth.max(child_depth);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_bhyvectl_checkpoint_request_exactly_like_libnv() {
        let dir = std::fs::File::open("/").expect("open /");
        let mut req = NvList::new();
        req.add_string("cmd", "checkpoint").unwrap();
        req.add_string("filename", "snap").unwrap();
        req.add_bool("suspend", false).unwrap();
        req.add_descriptor("fddir", OwnedFd::from(dir)).unwrap();
        let (bytes, fds) = req.pack();
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/nvlist/bhyvectl-checkpoint.bin"
        );
        assert_eq!(bytes, std::fs::read(path).expect("vector"));
        assert_eq!(fds, vec![req.get_descriptor("fddir").unwrap().as_raw_fd()]);
    }

    #[test]
    fn nested_datasize_counts_child_without_its_closing_marker() {
        let mut inner = NvList::new();
        inner.add_bool("b", true).unwrap();
        let mut outer = NvList::new();
        outer.add_number("a", 1).unwrap();
        outer.add_nvlist("inner", inner).unwrap();
        assert_eq!(outer.packed_size(), 134);
    }

    #[test]
    fn add_refuses_what_libnv_refuses() {
        let mut l = NvList::new();
        l.add_null("k").unwrap();
        assert!(matches!(l.add_null("k"), Err(NvError::Duplicate(_))));
        let long = "a".repeat(NV_NAME_MAX);
        assert!(matches!(l.add_null(&long), Err(NvError::NameTooLong(_))));
        assert!(l.add_null(&long[..NV_NAME_MAX - 1]).is_ok());
        assert!(l.add("s", NvValue::String(b"a\0b".to_vec())).is_err());
        assert!(l.add("b", NvValue::Binary(Vec::new())).is_err());
        assert!(l.add("n", NvValue::NumberArray(Vec::new())).is_err());
        let mut ci = NvList::with_flags(NV_FLAG_IGNORE_CASE).unwrap();
        ci.add_null("Key").unwrap();
        assert!(ci.add_null("kEY").is_err());
        assert!(ci.exists("KEY"));
    }

    #[test]
    fn building_deeper_than_the_limit_is_refused() {
        let mut list = NvList::new();
        for _ in 0..MAX_NESTING_DEPTH {
            let mut parent = NvList::new();
            parent.add_nvlist("n", list).unwrap();
            list = parent;
        }
        let mut parent = NvList::new();
        assert_eq!(parent.add_nvlist("n", list), Err(NvError::TooDeep));
    }

    /// A little-endian list header announcing `size` bytes and `descriptors` descriptors.
    fn raw_header(size: u64, descriptors: u64) -> Vec<u8> {
        let mut out = vec![NVLIST_MAGIC, NVLIST_VERSION, 0];
        out.extend_from_slice(&descriptors.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out
    }

    /// A little-endian pair header and name.
    fn raw_pair(type_code: u8, name: &str, datasize: u64, nitems: u64) -> Vec<u8> {
        let mut out = vec![type_code];
        out.extend_from_slice(&((name.len() + 1) as u16).to_le_bytes());
        out.extend_from_slice(&datasize.to_le_bytes());
        out.extend_from_slice(&nitems.to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out
    }

    /// A top-level list of `body` with a header whose size matches it.
    fn raw_list(body: &[u8], descriptors: u64) -> Vec<u8> {
        let mut out = raw_header(body.len() as u64, descriptors);
        out.extend_from_slice(body);
        out
    }

    fn null_fds(n: usize) -> Vec<OwnedFd> {
        (0..n)
            .map(|_| OwnedFd::from(std::fs::File::open("/dev/null").expect("/dev/null")))
            .collect()
    }

    #[test]
    fn sizes_and_counts_beyond_the_message_are_refused_before_allocating() {
        // Each of these would ask for gigabytes or more if believed.
        for size in [u64::MAX, u64::MAX - 18, 1 << 63, 1 << 32, 20] {
            let mut bytes = raw_header(size, 0);
            bytes.push(0);
            assert!(
                NvList::unpack(&bytes, Vec::new()).is_err(),
                "size {size:#x}"
            );
        }
        let header: [u8; HEADER_SIZE] = raw_header(u64::MAX, 0).try_into().unwrap();
        assert!(ListHeader::parse(&header).is_err());
        let header: [u8; HEADER_SIZE] = raw_header(0, 1 << 32).try_into().unwrap();
        assert_eq!(ListHeader::parse(&header).unwrap().descriptors, 1 << 32);
        assert!(NvList::unpack(&header, null_fds(1)).is_err());

        let huge = 1u64 << 32;
        let mut cases = Vec::new();
        for (type_code, payload) in [
            (TYPE_BOOL_ARRAY, vec![1u8; 8]),
            (TYPE_NUMBER_ARRAY, vec![7u8; 8]),
            (TYPE_STRING_ARRAY, b"a\0b\0".to_vec()),
            (TYPE_DESCRIPTOR_ARRAY, vec![0u8; 8]),
            (TYPE_NVLIST_ARRAY, raw_header(0, 0)),
        ] {
            for (datasize, nitems) in [
                (payload.len() as u64, huge),
                (payload.len() as u64, u64::MAX),
                (huge * 8, huge),
                (u64::MAX, 1),
            ] {
                // An NVLIST ARRAY has no data of its own: only its count can lie.
                if type_code == TYPE_NVLIST_ARRAY && nitems == 1 {
                    continue;
                }
                let datasize = if type_code == TYPE_NVLIST_ARRAY {
                    0
                } else {
                    datasize
                };
                let mut body = raw_pair(type_code, "v", datasize, nitems);
                body.extend_from_slice(&payload);
                cases.push((type_code, datasize, nitems, raw_list(&body, 0)));
            }
        }
        // A string whose datasize claims far more than the message holds.
        let mut body = raw_pair(TYPE_STRING, "s", u64::MAX, 0);
        body.extend_from_slice(b"abc");
        cases.push((TYPE_STRING, u64::MAX, 0, raw_list(&body, 0)));
        for (type_code, datasize, nitems, bytes) in cases {
            assert!(
                NvList::unpack(&bytes, null_fds(1)).is_err(),
                "type {type_code} datasize {datasize:#x} nitems {nitems:#x} accepted"
            );
        }
    }

    #[test]
    fn uniqueness_holds_across_a_list_of_many_names() {
        // 100 000 distinct names, then one repeated in another case: checking each name
        // against all earlier ones would take minutes here.
        let mut body = Vec::new();
        for i in 0..100_000u32 {
            body.extend_from_slice(&raw_pair(TYPE_NULL, &format!("k{i:x}"), 0, 0));
        }
        let bytes = raw_list(&body, 0);
        assert_eq!(NvList::unpack(&bytes, Vec::new()).unwrap().len(), 100_000);
        body.extend_from_slice(&raw_pair(TYPE_NULL, "K1A2B", 0, 0));
        let bytes = raw_list(&body, 0);
        assert_eq!(NvList::unpack(&bytes, Vec::new()).unwrap().len(), 100_001);
        let mut ignore_case = bytes.clone();
        ignore_case[2] = NV_FLAG_IGNORE_CASE;
        assert_eq!(
            NvList::unpack_with_flags(&ignore_case, Vec::new(), NV_FLAG_IGNORE_CASE).err(),
            Some(NvError::Duplicate("K1A2B".into()))
        );
        body.extend_from_slice(&raw_pair(TYPE_NULL, "k0", 0, 0));
        assert_eq!(
            NvList::unpack(&raw_list(&body, 0), Vec::new()).err(),
            Some(NvError::Duplicate("k0".into()))
        );
    }

    #[test]
    fn nested_list_arrays_cannot_announce_more_elements_than_fit() {
        // Arrays nested in each other's first element, each announcing as many elements as
        // the bytes after it could hold: every one passes the per-array check, yet together
        // 1000 levels in 40 KB would announce about a million lists.
        let mut body = Vec::new();
        let mut element_headers = Vec::new();
        for _ in 0..1000 {
            body.extend_from_slice(&raw_pair(TYPE_NVLIST_ARRAY, "a", 0, 0));
            element_headers.push(HEADER_SIZE + body.len());
            body.extend_from_slice(&raw_header(0, 0));
        }
        let mut bytes = raw_list(&body, 0);
        let len = bytes.len();
        for at in element_headers {
            let left = (len - at) as u64;
            bytes[at + 11..at + 19].copy_from_slice(&(left - HEADER_SIZE as u64).to_le_bytes());
            // The pair's nitems, just before its two-byte name.
            let nitems = at - 2 - 8;
            bytes[nitems..nitems + 8].copy_from_slice(&(left / HEADER_SIZE as u64).to_le_bytes());
        }
        assert_eq!(
            NvList::unpack(&bytes, Vec::new()).err(),
            Some(NvError::Invalid(
                "NVLIST ARRAY elements do not fit in the buffer"
            ))
        );
        // Arrays whose elements are all there still decode, however they nest.
        let mut inner = NvList::new();
        inner.add_number("n", 1).unwrap();
        let mut element = NvList::new();
        element
            .add("inner", NvValue::NvListArray(vec![inner, NvList::new()]))
            .unwrap();
        let mut list = NvList::new();
        list.add("outer", NvValue::NvListArray(vec![element, NvList::new()]))
            .unwrap();
        let (bytes, _) = list.pack();
        assert!(NvList::unpack(&bytes, Vec::new()).is_ok());
    }

    #[test]
    fn unpacking_deeper_than_the_limit_is_refused() {
        let mut list = NvList::new();
        for _ in 0..MAX_NESTING_DEPTH {
            let mut parent = NvList::new();
            parent.add_nvlist("n", list).unwrap();
            list = parent;
        }
        let (bytes, _) = list.pack();
        assert!(NvList::unpack(&bytes, Vec::new()).is_ok());
        // One more level; add() would refuse it, so assemble it directly.
        let mut wrapper = NvList::new();
        wrapper.pairs.push(NvPair {
            name: b"n".to_vec(),
            value: NvValue::NvList(list),
        });
        wrapper.depth = MAX_NESTING_DEPTH + 1;
        let (bytes, _) = wrapper.pack();
        assert_eq!(
            NvList::unpack(&bytes, Vec::new()).err(),
            Some(NvError::TooDeep)
        );
    }
}
