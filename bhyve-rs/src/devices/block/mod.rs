//! The block backend every disk emulation shares, as FreeBSD's `block_if.c`: a raw file or disk
//! device, the options bhyve accepts below a disk's node (`path`, `ro`, `nocache`, `sync` or
//! `direct`, `sectorsize=logical[/physical]`, `nodelete`), and worker threads that run
//! requests (read and write into guest memory, flush, deallocate) and call each request's
//! completion.
//!
//! A device model opens the file when its slot is planned ([`BlockFile::open`]), so a path that
//! cannot be opened stops bhyve with one line before any VM exists, and starts the workers when
//! it is made ([`BlockBackend::start`]). It then [`BlockBackend::submit`]s [`BlockRequest`]s,
//! each with a [`Completion`] that the worker calls with the outcome; host I/O errors come
//! back there as an errno for the device to turn into its own error status. Before a snapshot
//! [`BlockBackend::pause`] returns once every submitted request has completed, and nothing
//! runs until [`BlockBackend::resume`].

mod sys;

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::config::legacy::{LegacyError, LegacyWriter};
use crate::config::Config;
use crate::devices::DeviceError;
use crate::memory::{GuestMemory, Segment};

/// Worker threads per disk (`BLOCKIF_NUMTHR`).
pub const WORKER_THREADS: usize = 8;
/// Most buffers one request may name (`BLOCKIF_IOV_MAX`).
pub const MAX_SEGMENTS: usize = 128;
/// The sector unit of the disk protocols (`DEV_BSIZE`).
pub const DEV_BSIZE: u32 = 512;

/// `-s` syntax of every disk emulation (block_if.c): the first token is `path`, the rest are
/// `key[=value]` options.
pub fn legacy_config(
    w: &mut LegacyWriter<'_>,
    node: &str,
    conf: Option<&str>,
) -> Result<(), LegacyError> {
    w.first_token_then_generic(node, "path", conf)
}

/// The serial number bhyve gives a disk that names none (virtio-blk, AHCI ports):
/// `BHYVE-XXXX-XXXX-XXXX` from the first six bytes of the MD5 digest of its path.
pub fn serial_from_path(path: &str) -> String {
    let d = md5::compute(path.as_bytes());
    format!(
        "BHYVE-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}",
        d[0], d[1], d[2], d[3], d[4], d[5]
    )
}

/// For a disk at `node` that is named after its path when it has no serial number (a
/// virtio-blk device or an AHCI port): the variables its emulation reads a serial from, in the
/// order it reads them.
fn path_serial_keys(config: &Config, node: &str) -> Option<&'static [&'static str]> {
    let parts: Vec<&str> = node.split('.').collect();
    match parts[..] {
        ["pci", _, _, _] if config.get(&format!("{node}.device")) == Some("virtio-blk") => {
            Some(&["serial", "ser"])
        }
        ["pci", bus, slot, function, "port", _]
            if config.get(&format!("pci.{bus}.{slot}.{function}.device")) == Some("ahci") =>
        {
            Some(&["ser"])
        }
        _ => None,
    }
}

/// For a restore from `saved` (the snapshot's configuration) with `given` (the command line):
/// a disk named after its path keeps the serial number the guest saw, even from another path
/// (Linux's libata, for one, detaches a disk whose serial changed when it identifies it
/// again). Where the command line names the disk, the serial the guest saw is made explicit
/// on both sides as needed: taken from the snapshot when the command line gives none, derived
/// from the saved path when the snapshot has none. The two then compare equal, and a serial
/// the command line gives must be the one the guest saw.
pub fn keep_disk_serials(saved: &mut Config, given: &mut Config) {
    let disks: Vec<(String, String, &[&str])> = saved
        .iter()
        .filter_map(|(key, path)| {
            let node = key.strip_suffix(".path")?;
            Some((
                node.to_string(),
                path.to_string(),
                path_serial_keys(saved, node)?,
            ))
        })
        .collect();
    for (node, path, keys) in disks {
        let serial_key = |config: &Config| {
            keys.iter()
                .map(|k| format!("{node}.{k}"))
                .find(|key| config.get(key).is_some())
        };
        let Some(given_path) = given.get(&format!("{node}.path")).map(str::to_string) else {
            continue;
        };
        match (serial_key(saved), serial_key(given)) {
            (Some(_), Some(_)) => {}
            (Some(key), None) => {
                let serial = saved.get(&key).unwrap_or_default().to_string();
                given.set(&key, &serial);
            }
            // The serial the guest saw, to compare with the one given.
            (None, Some(key)) => saved.set(&key, &serial_from_path(&path)),
            // The same path names the disk as before.
            (None, None) if given_path == path => {}
            (None, None) => {
                let (key, serial) = (format!("{node}.ser"), serial_from_path(&path));
                saved.set(&key, &serial);
                given.set(&key, &serial);
            }
        }
    }
}

/// The settings of one disk, read from its configuration node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockOptions {
    pub path: String,
    pub readonly: bool,
    /// `nocache`: bypass the host cache (`O_DIRECT`).
    pub nocache: bool,
    /// `sync` or `direct`: every write reaches stable storage (`O_SYNC`).
    pub sync: bool,
    /// `nodelete`: never deallocate.
    pub nodelete: bool,
    /// `sectorsize=logical[/physical]`.
    pub sector_size: Option<(u32, u32)>,
}

fn invalid(key: String, value: &str) -> DeviceError {
    DeviceError::InvalidValue {
        key,
        value: value.to_string(),
    }
}

impl BlockOptions {
    /// Read `node.path` and the options below `node`.
    pub fn from_config(config: &Config, node: &str) -> Result<Self, DeviceError> {
        let key = |name: &str| format!("{node}.{name}");
        let flag = |name: &str| -> Result<bool, DeviceError> {
            let k = key(name);
            config
                .get_bool(&k)
                .map(|v| v.unwrap_or(false))
                .map_err(|_| invalid(k.clone(), config.get(&k).unwrap_or_default()))
        };
        let path = config
            .get(&key("path"))
            .filter(|p| !p.is_empty())
            .ok_or_else(|| {
                DeviceError::Platform(format!("{node}: a backing file is required (path)"))
            })?
            .to_string();
        let sector_size = match config.get(&key("sectorsize")) {
            None => None,
            Some(value) => {
                Some(parse_sector_size(value).ok_or_else(|| invalid(key("sectorsize"), value))?)
            }
        };
        Ok(Self {
            path,
            readonly: flag("ro")?,
            nocache: flag("nocache")?,
            sync: flag("sync")? || flag("direct")?,
            nodelete: flag("nodelete")?,
            sector_size,
        })
    }
}

/// `logical[/physical]`: powers of two, logical at least 512 and not above physical.
fn parse_sector_size(value: &str) -> Option<(u32, u32)> {
    let (logical, physical) = match value.split_once('/') {
        Some((l, p)) => (l.parse::<u32>().ok()?, p.parse::<u32>().ok()?),
        None => {
            let l = value.parse::<u32>().ok()?;
            (l, l)
        }
    };
    (logical.is_power_of_two()
        && physical.is_power_of_two()
        && logical >= DEV_BSIZE
        && logical <= physical)
        .then_some((logical, physical))
}

/// What the guest is told about the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockInfo {
    /// Bytes.
    pub size: u64,
    /// Logical sector size.
    pub sector_size: u32,
    /// Physical sector size and the offset of the first aligned logical sector in it.
    pub physical_sector_size: u32,
    pub physical_sector_offset: u32,
    pub readonly: bool,
    /// Deallocation (TRIM, DISCARD) is offered.
    pub can_delete: bool,
    /// A disk device rather than a regular file.
    pub is_device: bool,
}

/// An opened disk, not yet serving requests.
pub struct BlockFile {
    file: File,
    info: BlockInfo,
    /// Opened with `O_DIRECT` (`nocache`).
    direct: bool,
}

/// A disk that cannot be used, in one line.
#[derive(Debug, thiserror::Error)]
pub enum BlockOpenError {
    #[error("Could not open backing file: {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("Could not stat backing file: {path}: {source}")]
    Stat { path: String, source: io::Error },
    #[error("Could not fetch dev blk/sector size: {path}: {source}")]
    Geometry { path: String, source: io::Error },
    #[error("{path}: not a regular file or a disk device")]
    Kind { path: String },
    #[error("Sector size {wanted} incompatible with underlying device sector size {device}")]
    SectorSize { wanted: u32, device: u32 },
}

impl BlockFile {
    /// Open the disk as bhyve does: read-write unless `ro`, falling back to read-only when
    /// read-write is refused.
    pub fn open(options: &BlockOptions) -> Result<Self, BlockOpenError> {
        let mut flags = 0;
        if options.nocache {
            flags |= sys::DIRECT;
        }
        if options.sync {
            flags |= libc::O_SYNC;
        }
        let open = |write: bool| {
            OpenOptions::new()
                .read(true)
                .write(write)
                .custom_flags(flags)
                .open(&options.path)
        };
        let mut readonly = options.readonly;
        let file = match open(!readonly) {
            Err(_) if !readonly => {
                readonly = true;
                open(false)
            }
            other => other,
        }
        .map_err(|source| BlockOpenError::Open {
            path: options.path.clone(),
            source,
        })?;
        let meta = file.metadata().map_err(|source| BlockOpenError::Stat {
            path: options.path.clone(),
            source,
        })?;
        let kind = meta.file_type();
        let is_device = kind.is_block_device() || kind.is_char_device();
        let (size, mut sector_size, mut physical, can_delete) = if is_device {
            let g = sys::device_geometry(&file).map_err(|source| BlockOpenError::Geometry {
                path: options.path.clone(),
                source,
            })?;
            (
                g.size,
                g.sector_size.max(1),
                g.physical_sector_size,
                g.can_delete,
            )
        } else if kind.is_file() {
            use std::os::unix::fs::MetadataExt;
            (meta.len(), DEV_BSIZE, meta.blksize() as u32, true)
        } else {
            return Err(BlockOpenError::Kind {
                path: options.path.clone(),
            });
        };
        let mut offset = 0;
        if let Some((logical, wanted_physical)) = options.sector_size {
            // Disk drivers want I/O in multiples of their own sector size.
            if is_device && (logical < sector_size || logical % sector_size != 0) {
                return Err(BlockOpenError::SectorSize {
                    wanted: logical,
                    device: sector_size,
                });
            }
            sector_size = logical;
            physical = wanted_physical;
            offset = 0;
        }
        Ok(Self {
            file,
            info: BlockInfo {
                size,
                sector_size,
                physical_sector_size: physical,
                physical_sector_offset: offset,
                readonly,
                can_delete: can_delete && !options.nodelete && !readonly,
                is_device,
            },
            direct: options.nocache,
        })
    }

    pub fn info(&self) -> BlockInfo {
        self.info
    }
}

/// What a request does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockOp {
    /// Fill the guest buffers from `offset`.
    Read { offset: u64, segments: Vec<Segment> },
    /// Write the guest buffers at `offset`.
    Write { offset: u64, segments: Vec<Segment> },
    /// Make every completed write durable.
    Flush,
    /// Deallocate `len` bytes at `offset`.
    Delete { offset: u64, len: u64 },
}

/// How a request ended: `Err` holds the host's errno (`EROFS`, `EOPNOTSUPP`, `EIO`, …).
pub type BlockResult = Result<(), i32>;

/// Called once per request, on a worker thread, with its outcome.
pub type Completion = Box<dyn FnOnce(BlockResult) + Send>;

/// One request with its completion.
pub struct BlockRequest {
    pub op: BlockOp,
    pub done: Completion,
}

#[derive(Default)]
struct Work {
    pending: VecDeque<BlockRequest>,
    busy: usize,
    paused: bool,
    closing: bool,
}

struct Inner {
    file: File,
    info: BlockInfo,
    direct: bool,
    memory: Arc<GuestMemory>,
    work: Mutex<Work>,
    /// Workers wait here for requests.
    more: Condvar,
    /// Pausers and drainers wait here for the workers to go idle.
    idle: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Work> {
        self.work.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self, op: &BlockOp) -> BlockResult {
        let info = &self.info;
        let in_range =
            |offset: u64, len: u64| offset.checked_add(len).is_some_and(|end| end <= info.size);
        let errno = |e: io::Error| e.raw_os_error().unwrap_or(libc::EIO);
        match op {
            BlockOp::Read { offset, segments } | BlockOp::Write { offset, segments } => {
                let write = matches!(op, BlockOp::Write { .. });
                if write && info.readonly {
                    return Err(libc::EROFS);
                }
                let len = segments.iter().map(|s| s.len).sum();
                if !in_range(*offset, len) {
                    return Err(libc::EINVAL);
                }
                // O_DIRECT wants aligned memory, which guest buffers need not be: go through an
                // aligned copy, as a host without that rule would. Buffers that are plainly
                // misaligned skip the direct attempt the kernel would refuse anyway.
                const DIRECT_ALIGN: u64 = 512;
                let misaligned = segments
                    .iter()
                    .any(|s| s.addr % DIRECT_ALIGN != 0 || s.len % DIRECT_ALIGN != 0);
                if self.direct && misaligned {
                    return sys::bounced(&self.file, &self.memory, segments, *offset, write)
                        .map_err(errno);
                }
                match sys::transfer(&self.file, &self.memory, segments, *offset, write) {
                    // Some devices want more than 512-byte alignment.
                    Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                        sys::bounced(&self.file, &self.memory, segments, *offset, write)
                            .map_err(errno)
                    }
                    other => other.map_err(errno),
                }
            }
            BlockOp::Flush => sys::flush(&self.file, info.is_device).map_err(errno),
            BlockOp::Delete { offset, len } => {
                if !info.can_delete {
                    return Err(libc::EOPNOTSUPP);
                }
                if info.readonly {
                    return Err(libc::EROFS);
                }
                if !in_range(*offset, *len) {
                    return Err(libc::EINVAL);
                }
                sys::delete(&self.file, info.is_device, *offset, *len).map_err(errno)
            }
        }
    }

    fn worker(&self) {
        let mut work = self.lock();
        loop {
            if work.closing {
                return;
            }
            let next = if work.paused {
                None
            } else {
                work.pending.pop_front()
            };
            let Some(request) = next else {
                work = self.more.wait(work).unwrap_or_else(|e| e.into_inner());
                continue;
            };
            work.busy += 1;
            drop(work);
            let result = self.run(&request.op);
            (request.done)(result);
            work = self.lock();
            work.busy -= 1;
            if work.busy == 0 && work.pending.is_empty() {
                self.idle.notify_all();
            }
        }
    }
}

/// A disk serving requests with its worker threads.
pub struct BlockBackend {
    inner: Arc<Inner>,
    workers: Vec<JoinHandle<()>>,
}

impl BlockBackend {
    /// Start the workers of `file`, moving data to and from `memory`; `name` names the threads
    /// (`blk-NAME-N`, as bhyve's).
    pub fn start(file: BlockFile, memory: Arc<GuestMemory>, name: &str) -> io::Result<Self> {
        let inner = Arc::new(Inner {
            file: file.file,
            info: file.info,
            direct: file.direct,
            memory,
            work: Mutex::new(Work::default()),
            more: Condvar::new(),
            idle: Condvar::new(),
        });
        let mut backend = Self {
            inner,
            workers: Vec::new(),
        };
        for i in 0..WORKER_THREADS {
            let inner = backend.inner.clone();
            let worker = std::thread::Builder::new()
                .name(format!("blk-{name}-{i}"))
                .spawn(move || inner.worker())?;
            backend.workers.push(worker);
        }
        Ok(backend)
    }

    pub fn info(&self) -> BlockInfo {
        self.inner.info
    }

    /// Queue a request; a worker runs it and calls its completion.
    pub fn submit(&self, request: BlockRequest) {
        let mut work = self.inner.lock();
        work.pending.push_back(request);
        self.inner.more.notify_one();
    }

    /// Wait until every submitted request has completed.
    pub fn drain(&self) {
        let mut work = self.inner.lock();
        while work.busy > 0 || (!work.pending.is_empty() && !work.paused) {
            work = self
                .inner
                .idle
                .wait(work)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Complete everything submitted, then run nothing more until [`BlockBackend::resume`].
    pub fn pause(&self) {
        self.drain();
        self.inner.lock().paused = true;
    }

    pub fn resume(&self) {
        self.inner.lock().paused = false;
        self.inner.more.notify_all();
    }
}

impl Drop for BlockBackend {
    fn drop(&mut self) {
        self.inner.lock().closing = true;
        self.inner.more.notify_all();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
mod tests;
