//! Snapshot save and restore (feature `bhyve_snapshot`): the single-file format of
//! bhyve_snapshot(5).
//!
//! A file is a fixed-width header, data sections (each versioned by its producer and checked by
//! CRC-32C), guest RAM regions at page-aligned offsets written sparsely, and a section table.
//! [`SnapshotWriter`] builds one atomically; [`SnapshotReader`] validates one and hands out its
//! sections and RAM.

pub mod backend_state;
pub mod cmdline;
mod format;
mod inspect;
#[cfg(target_os = "linux")]
pub mod lease;
pub mod mapped;
mod ram;
mod reader;
mod writer;

#[cfg(test)]
mod tests;

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

pub(crate) use format::label as section_label;
pub use format::{
    reseal, Arch, Backend, Header, HeaderInfo, Requirement, SectionEntry, SectionKind,
    FORMAT_MAJOR, FORMAT_MINOR, FORMAT_PAGE_SIZE, HEADER_FLAG_SUSPENDED, MAGIC,
    MAX_DATA_SECTION_LEN, MAX_SECTIONS, RAM_CHUNK_SIZE, SECTION_FLAG_MANDATORY,
};
pub use ram::is_zero;
pub use reader::{CopyOptions, RamRegion, Section, SnapshotReader};
pub use writer::{RamWriteStats, SnapshotWriter};

/// Why a snapshot could not be written or read. Messages are one line, fit for
/// `bhyve: restore FILE: <message>`.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not a bhyve-rs snapshot (bad magic)")]
    BadMagic,
    #[error(
        "snapshot format {major}.{minor} is newer than this bhyve supports ({}.x)",
        FORMAT_MAJOR
    )]
    NewerFormat { major: u16, minor: u16 },
    #[error("truncated snapshot: {0}")]
    Truncated(String),
    #[error("corrupt snapshot: checksum mismatch in {0}")]
    Checksum(String),
    #[error("corrupt snapshot: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Unsupported(String),
    #[error(
        "snapshot has mandatory section {label} (version {version}) that this bhyve cannot restore"
    )]
    UnknownMandatory { label: String, version: u32 },
    #[error("section {label} has version {version}, newer than this bhyve supports ({supported})")]
    SectionVersion {
        label: String,
        version: u32,
        supported: u32,
    },
    #[error("cannot encode section payload: {0}")]
    Encode(String),
    #[error("cannot decode section payload: {0}")]
    Decode(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("snapshot would be larger than the largest file offset")]
    TooLarge,
}

impl SnapshotError {
    pub(crate) fn io(context: &str, source: std::io::Error) -> Self {
        SnapshotError::Io {
            context: context.to_string(),
            source,
        }
    }
}

/// bincode 2 standard configuration (little-endian, variable-length integers), with a decode
/// limit so a forged length cannot make the reader allocate more than a section may hold.
fn payload_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ MAX_DATA_SECTION_LEN as usize }>()
}

/// Encode a section payload: serde + bincode 2.0.1, standard configuration.
pub fn encode_section<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, SnapshotError> {
    bincode::serde::encode_to_vec(value, payload_config())
        .map_err(|e| SnapshotError::Encode(e.to_string()))
}

/// Decode a payload made by [`encode_section`]. The whole payload must be used: trailing bytes
/// mean the producer wrote a different structure than the one asked for.
pub fn decode_section<T: DeserializeOwned>(payload: &[u8]) -> Result<T, SnapshotError> {
    let (value, used) = bincode::serde::decode_from_slice(payload, payload_config())
        .map_err(|e| SnapshotError::Decode(describe_decode_error(&e)))?;
    if used != payload.len() {
        return Err(SnapshotError::Decode(format!(
            "{} trailing bytes",
            payload.len() - used
        )));
    }
    Ok(value)
}

/// What is wrong with a payload, in words rather than the decoder's type names (bincode's own
/// text for its errors is their `Debug` form).
fn describe_decode_error(error: &bincode::error::DecodeError) -> String {
    use bincode::error::DecodeError;
    match error {
        DecodeError::UnexpectedEnd { additional } => {
            format!("it ends {additional} bytes too early")
        }
        DecodeError::LimitExceeded => "it announces more data than a section may hold".into(),
        DecodeError::InvalidIntegerType { expected, found } => format!(
            "{} where {} belongs",
            integer_in_words(found),
            integer_in_words(expected)
        ),
        DecodeError::NonZeroTypeIsZero { .. } => "a zero where zero is not allowed".into(),
        DecodeError::UnexpectedVariant {
            type_name, found, ..
        } => {
            format!("unknown kind {found} of {type_name}")
        }
        DecodeError::EmptyEnum { type_name } => format!("a value of {type_name}, which has none"),
        DecodeError::InvalidBooleanValue(value) => format!("{value} is not a truth value"),
        DecodeError::Utf8 { .. } | DecodeError::InvalidCharEncoding(_) => {
            "it holds text that is not UTF-8".into()
        }
        DecodeError::CStringNulError { .. } => "it holds text with a NUL byte inside".into(),
        DecodeError::ArrayLengthMismatch { required, found } => {
            format!("a list of {found} entries where {required} are required")
        }
        DecodeError::OutsideUsizeRange(value) => format!("a size of {value} is out of range"),
        DecodeError::InvalidDuration { .. } | DecodeError::InvalidSystemTime { .. } => {
            "a time that cannot be represented".into()
        }
        DecodeError::Io { inner, .. } => format!("reading it failed: {inner}"),
        // Messages of the state types' own checks, already in words.
        DecodeError::Other(message) => (*message).into(),
        DecodeError::OtherString(message) => message.clone(),
        DecodeError::Serde(_) => "it holds a kind of value this format does not store".into(),
        _ => "it does not decode".into(),
    }
}

/// An integer kind of the encoding, in words; `Reserved` is the marker byte 255, which no
/// integer uses.
fn integer_in_words(kind: &bincode::error::IntegerType) -> &'static str {
    use bincode::error::IntegerType;
    match kind {
        IntegerType::U8 => "an 8-bit unsigned integer",
        IntegerType::U16 => "a 16-bit unsigned integer",
        IntegerType::U32 => "a 32-bit unsigned integer",
        IntegerType::U64 => "a 64-bit unsigned integer",
        IntegerType::U128 => "a 128-bit unsigned integer",
        IntegerType::Usize => "an unsigned size",
        IntegerType::I8 => "an 8-bit signed integer",
        IntegerType::I16 => "a 16-bit signed integer",
        IntegerType::I32 => "a 32-bit signed integer",
        IntegerType::I64 => "a 64-bit signed integer",
        IntegerType::I128 => "a 128-bit signed integer",
        IntegerType::Isize => "a signed size",
        IntegerType::Reserved => "a reserved integer marker",
        _ => "an integer of unknown width",
    }
}

/// Check a snapshot file completely: header, section table and every data section (as any
/// open does), then every RAM chunk against its `ram-index` checksum (which a mapped restore
/// and `inspect` do not read). The summary when all is intact; the first damage otherwise,
/// naming its section or guest address.
pub fn verify(path: &Path) -> Result<String, SnapshotError> {
    let reader = SnapshotReader::open(path)?;
    let mut bytes = 0u64;
    for region in reader.ram_regions() {
        reader.verify_ram(region)?;
        bytes += region.size;
    }
    let memory = if bytes >= 1 << 20 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    };
    Ok(format!(
        "intact: {} sections, {} RAM regions ({memory} of guest memory) checked",
        reader.sections().len(),
        reader.ram_regions().len(),
    ))
}

/// A readable description of a snapshot file: header, configuration, section table and RAM
/// regions with the space they take on disk.
pub fn inspect(path: &Path) -> Result<String, String> {
    inspect::describe(path).map_err(|e| e.to_string())
}
