//! virtio-blk as bhyve's `pci_virtio_block.c`: one queue of 128 entries, the configuration
//! bhyve fills in (capacity in 512-byte units, segment limit, logical block size, topology,
//! write-back byte, discard limits), reads, writes, FLUSH, GET_ID (`ser=` or an identifier
//! derived from the path) and DISCARD when the backend can deallocate. Requests run on the
//! block backend's workers; each completes with the status byte and an interrupt.

use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;

use super::pci::{use_msix, VirtioPci};
use super::{Chain, VirtQueue, VirtioDevice, VirtioIdentity, VirtioShared, VIRTIO_DEV_BLOCK};
use crate::config::Config;
use crate::devices::block::{
    legacy_config, BlockBackend, BlockFile, BlockInfo, BlockOp, BlockOptions, BlockRequest,
    DEV_BSIZE, MAX_SEGMENTS,
};
use crate::devices::pci::{PciAddress, PciDevice, PCIC_STORAGE};
use crate::devices::registry::{CreatePci, PciEmulation, PciPlan};
use crate::devices::DeviceError;

pub const EMULATION: PciEmulation = PciEmulation {
    name: "virtio-blk",
    alias_of: None,
    legacy_config,
    plan: Some(plan),
};

/// Entries of the queue (`VTBLK_RINGSZ`).
pub const QUEUE_SIZE: u16 = 128;
/// Bytes of the configuration (`struct vtblk_config`).
pub const CONFIG_SIZE: usize = 60;
/// Largest DISCARD, in sectors: 16 MiB (`VTBLK_MAX_DISCARD_SECT`).
pub const MAX_DISCARD_SECTORS: u32 = (16 << 20) / DEV_BSIZE;
/// Request header: type, priority, sector.
const HEADER_SIZE: u64 = 16;
/// A DISCARD segment: sector, number of sectors, flags.
const DISCARD_SEGMENT_SIZE: u64 = 16;

/// Open the disk while planning, so a bad path is refused before the VM exists.
fn plan(plan: &mut PciPlan<'_>, slot: PciAddress) -> Result<CreatePci, DeviceError> {
    let node = slot.config_node();
    let options = BlockOptions::from_config(plan.config, &node)?;
    let ident = identifier(plan.config, &node, &options.path);
    let msix = use_msix(plan.config)?;
    let file = BlockFile::open(&options).map_err(|source| DeviceError::Block { slot, source })?;
    Ok(Box::new(move |create| {
        let name = format!("{}:{}", slot.slot, slot.function);
        let backend = BlockBackend::start(file, create.memory.clone(), &name).map_err(|e| {
            DeviceError::Platform(format!("{node}: cannot start disk workers: {e}"))
        })?;
        let device = VirtioBlock::new(backend, ident);
        Ok(Box::new(VirtioPci::new(Box::new(device), create, msix)?) as Box<dyn PciDevice>)
    }))
}

/// What GET_ID returns: `serial` or `ser` (at most 20 bytes), or `BHYVE-XXXX-XXXX-XXXX` from
/// the MD5 digest of the path, as bhyve makes it.
pub fn identifier(config: &Config, node: &str, path: &str) -> Vec<u8> {
    let given = config
        .get(&format!("{node}.serial"))
        .or_else(|| config.get(&format!("{node}.ser")));
    let mut ident = match given {
        Some(serial) => serial.as_bytes().to_vec(),
        None => crate::devices::block::serial_from_path(path).into_bytes(),
    };
    ident.truncate(VIRTIO_BLK_ID_BYTES as usize);
    ident
}

/// The configuration bytes for a disk described by `info`.
pub fn config_bytes(info: &BlockInfo) -> [u8; CONFIG_SIZE] {
    let mut c = [0u8; CONFIG_SIZE];
    let sector = info.sector_size.max(1);
    let physical = info.physical_sector_size;
    c[0..8].copy_from_slice(&(info.size / u64::from(DEV_BSIZE)).to_le_bytes());
    // size_max (8) is not offered; seg_max leaves room for header and status in the ring.
    let seg_max = (u32::from(QUEUE_SIZE) - 2).min(MAX_SEGMENTS as u32);
    c[12..16].copy_from_slice(&seg_max.to_le_bytes());
    // geometry (16..20) stays zero.
    c[20..24].copy_from_slice(&sector.to_le_bytes());
    c[24] = if physical > sector {
        (physical / sector).trailing_zeros() as u8
    } else {
        0
    };
    c[25] = if info.physical_sector_offset != 0 {
        ((physical - info.physical_sector_offset) / sector) as u8
    } else {
        0
    };
    // min_io_size, opt_io_size (26..32), writeback (32), num_queues (34) stay zero.
    c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
    c[40..44].copy_from_slice(&1u32.to_le_bytes());
    c[44..48].copy_from_slice(&(sector.max(physical) / DEV_BSIZE).to_le_bytes());
    c
}

/// A virtio-blk disk.
pub struct VirtioBlock {
    backend: Arc<BlockBackend>,
    ident: Vec<u8>,
    config: [u8; CONFIG_SIZE],
    features: u64,
    queue: Option<Arc<VirtQueue>>,
    shared: Option<Arc<VirtioShared>>,
}

impl VirtioBlock {
    pub fn new(backend: BlockBackend, ident: Vec<u8>) -> Self {
        let info = backend.info();
        let mut features = (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_TOPOLOGY)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1u64 << VIRTIO_F_VERSION_1);
        if info.can_delete {
            features |= 1 << VIRTIO_BLK_F_DISCARD;
        }
        Self {
            backend: Arc::new(backend),
            ident,
            config: config_bytes(&info),
            features,
            queue: None,
            shared: None,
        }
    }

    /// Start one request; it completes on a worker, or here when it needs no I/O.
    fn start(&self, queue: &Arc<VirtQueue>, chain: Chain) {
        let memory = queue.memory();
        let Some(status_at) = chain.writable_len().checked_sub(1) else {
            // Without a status byte nothing can be reported: the driver is broken.
            if let Some(shared) = &self.shared {
                shared.mark_broken("request without a status byte");
            }
            return;
        };
        let finish = {
            let queue = queue.clone();
            let chain_status = chain.segments(true, status_at, 1);
            let head = chain.head;
            move |status: u32, written: u64| {
                if let Some(status_seg) = chain_status.as_ref().and_then(|s| s.first()) {
                    let _ = queue.memory().write(status_seg.addr, &[status as u8]);
                }
                queue.add_used(head, (written + 1) as u32);
                queue.end_chains(false);
            }
        };
        let mut header = [0u8; HEADER_SIZE as usize];
        if chain.read(memory, 0, &mut header).is_err() {
            finish(VIRTIO_BLK_S_IOERR, 0);
            return;
        }
        let kind = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        let offset = sector.checked_mul(u64::from(DEV_BSIZE));
        let data_in = status_at; // bytes the device may write before the status
        let data_out = chain.readable_len().saturating_sub(HEADER_SIZE);
        // The guest should not set the barrier flag: it is not offered.
        let op = match kind & !0x8000_0000 {
            VIRTIO_BLK_T_IN => match (offset, chain.segments(true, 0, data_in)) {
                (Some(offset), Some(segments)) if segments.len() <= MAX_SEGMENTS => {
                    Some((BlockOp::Read { offset, segments }, data_in))
                }
                _ => None,
            },
            VIRTIO_BLK_T_OUT => match (offset, chain.segments(false, HEADER_SIZE, data_out)) {
                (Some(offset), Some(segments)) if segments.len() <= MAX_SEGMENTS => {
                    Some((BlockOp::Write { offset, segments }, 0))
                }
                _ => None,
            },
            VIRTIO_BLK_T_FLUSH => Some((BlockOp::Flush, 0)),
            VIRTIO_BLK_T_GET_ID => {
                // As bhyve: the first buffer after the header is zeroed and takes the
                // identifier, piece by piece; the guest sizes the chain (up to 512 buffers of
                // 4 GiB), so nothing its size is allocated and the buffers after are left.
                let first = chain
                    .writable()
                    .next()
                    .map_or(0, |d| u64::from(d.len))
                    .min(data_in);
                let mut status = VIRTIO_BLK_S_OK;
                let mut piece = [0u8; 4096];
                let mut at = 0u64;
                while at < first {
                    let n = (first - at).min(piece.len() as u64) as usize;
                    piece.fill(0);
                    for (dst, src) in piece.iter_mut().zip(self.ident.iter().skip(at as usize)) {
                        *dst = *src;
                    }
                    if chain.write(memory, at, &piece[..n]).is_err() {
                        status = VIRTIO_BLK_S_IOERR;
                        break;
                    }
                    at += n as u64;
                }
                finish(status, first);
                return;
            }
            VIRTIO_BLK_T_DISCARD => match self.discard(&chain, memory, data_out) {
                Ok(op) => Some((op, 0)),
                Err(status) => {
                    finish(status, 0);
                    return;
                }
            },
            _ => {
                finish(VIRTIO_BLK_S_UNSUPP, 0);
                return;
            }
        };
        let Some((op, written)) = op else {
            finish(VIRTIO_BLK_S_IOERR, 0);
            return;
        };
        self.backend.submit(BlockRequest {
            op,
            done: Box::new(move |result| {
                let status = match result {
                    Ok(()) => VIRTIO_BLK_S_OK,
                    Err(e) if e == libc::EOPNOTSUPP || e == libc::ENOSYS => VIRTIO_BLK_S_UNSUPP,
                    Err(_) => VIRTIO_BLK_S_IOERR,
                };
                finish(
                    status,
                    if status == VIRTIO_BLK_S_OK {
                        written
                    } else {
                        0
                    },
                );
            }),
        });
    }

    /// One DISCARD segment of at most 16 MiB, without flags (the only form bhyve takes).
    fn discard(
        &self,
        chain: &Chain,
        memory: &crate::memory::GuestMemory,
        len: u64,
    ) -> Result<BlockOp, u32> {
        if len != DISCARD_SEGMENT_SIZE {
            return Err(VIRTIO_BLK_S_IOERR);
        }
        let mut seg = [0u8; DISCARD_SEGMENT_SIZE as usize];
        chain
            .read(memory, HEADER_SIZE, &mut seg)
            .map_err(|_| VIRTIO_BLK_S_IOERR)?;
        let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
        let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
        if flags != 0 {
            return Err(VIRTIO_BLK_S_UNSUPP);
        }
        if sectors > MAX_DISCARD_SECTORS {
            return Err(VIRTIO_BLK_S_IOERR);
        }
        let offset = sector
            .checked_mul(u64::from(DEV_BSIZE))
            .ok_or(VIRTIO_BLK_S_IOERR)?;
        Ok(BlockOp::Delete {
            offset,
            len: u64::from(sectors) * u64::from(DEV_BSIZE),
        })
    }
}

impl VirtioDevice for VirtioBlock {
    fn name(&self) -> &'static str {
        "vtblk"
    }

    fn identity(&self) -> VirtioIdentity {
        VirtioIdentity {
            pci_device_id: VIRTIO_DEV_BLOCK,
            device_type: VIRTIO_ID_BLOCK as u16,
            class: PCIC_STORAGE,
            subclass: 0,
        }
    }

    fn queue_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn host_features(&self) -> u64 {
        self.features
    }

    fn config_size(&self) -> usize {
        CONFIG_SIZE
    }

    fn read_config(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.config.get(offset + i).copied().unwrap_or(0);
        }
    }

    fn attach(&mut self, queues: &[Arc<VirtQueue>], shared: &Arc<VirtioShared>) {
        self.queue = queues.first().cloned();
        self.shared = Some(shared.clone());
    }

    fn queue_notify(&mut self, _queue: usize) {
        let Some(queue) = self.queue.clone() else {
            return;
        };
        while let Some(chain) = queue.pop() {
            self.start(&queue, chain);
        }
    }

    fn reset(&mut self) {
        // Requests still running would complete into a ring the driver is taking away.
        self.backend.drain();
    }

    fn pause(&mut self) {
        self.backend.pause();
    }

    fn resume(&mut self) {
        self.backend.resume();
    }

    /// Everything lives in the transport's state: every request completed before the save.
    fn save_state(&self) -> Option<Vec<u8>> {
        Some(Vec::new())
    }
}

#[cfg(test)]
mod tests;
