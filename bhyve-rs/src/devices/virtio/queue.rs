//! The split virtqueue in its legacy layout (virtio 0.9.5 / 1.x "legacy interface"): a
//! descriptor table, the available ring right after it, and the used ring on the next 4 KiB
//! boundary, all at the page frame the driver writes to `QUEUE_PFN`.
//!
//! Every access goes through [`GuestMemory`]'s bounds-checked accessors: ring indexes with
//! single volatile loads and stores, descriptors copied once before they are checked (so the
//! guest cannot change one between check and use). A chain the guest got wrong (an index out
//! of range, a loop, a buffer outside RAM, a misused indirect table) never reaches the device:
//! the transport is marked broken (`DEVICE_NEEDS_RESET`) and the queue stops until the driver
//! resets the device.

use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_bindings::virtio_config::VIRTIO_F_NOTIFY_ON_EMPTY;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};

use super::{VirtioShared, VIRTIO_MSI_NO_VECTOR, VIRTIO_PCI_ISR_INTR};
use crate::memory::{GuestMemory, MemoryError};

/// Alignment of the used ring in the legacy layout.
pub const VRING_ALIGN: u64 = 4096;
/// `QUEUE_PFN` holds the ring address shifted right by this.
pub const VRING_PFN_SHIFT: u32 = 12;
/// Most buffers one chain may name, indirect ones included (bhyve's `VQ_MAX_DESCRIPTORS`).
pub const MAX_CHAIN_DESCRIPTORS: usize = 512;
const DESCRIPTOR_SIZE: u64 = 16;

/// Bytes a legacy ring of `size` entries occupies (`vring_size`).
pub fn vring_size(size: u16) -> u64 {
    let n = u64::from(size);
    let avail_end = DESCRIPTOR_SIZE * n + 2 * (3 + n);
    avail_end.next_multiple_of(VRING_ALIGN) + 2 * 3 + 8 * n
}

/// One guest buffer of a chain, checked to lie inside guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub addr: u64,
    pub len: u32,
    /// The device writes it (`VRING_DESC_F_WRITE`); otherwise the device reads it.
    pub writable: bool,
}

pub use crate::memory::Segment;

/// One request taken from the available ring: its head index (what [`VirtQueue::add_used`]
/// returns to the guest) and its buffers in order, readable ones first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub head: u16,
    pub descriptors: Vec<Descriptor>,
}

impl Chain {
    /// The buffers the device reads, in order.
    pub fn readable(&self) -> impl Iterator<Item = &Descriptor> {
        self.descriptors.iter().filter(|d| !d.writable)
    }

    /// The buffers the device writes, in order.
    pub fn writable(&self) -> impl Iterator<Item = &Descriptor> {
        self.descriptors.iter().filter(|d| d.writable)
    }

    pub fn readable_len(&self) -> u64 {
        self.readable().map(|d| u64::from(d.len)).sum()
    }

    pub fn writable_len(&self) -> u64 {
        self.writable().map(|d| u64::from(d.len)).sum()
    }

    /// The guest memory of bytes `offset..offset + len` of the readable (or writable) part,
    /// as if its buffers were one; `None` when the part is shorter.
    pub fn segments(&self, writable: bool, offset: u64, len: u64) -> Option<Vec<Segment>> {
        let mut skip = offset;
        let mut left = len;
        let mut out = Vec::new();
        for d in self.descriptors.iter().filter(|d| d.writable == writable) {
            if left == 0 {
                break;
            }
            let dlen = u64::from(d.len);
            if skip >= dlen {
                skip -= dlen;
                continue;
            }
            let take = (dlen - skip).min(left);
            out.push(Segment {
                addr: d.addr + skip,
                len: take,
            });
            left -= take;
            skip = 0;
        }
        (left == 0).then_some(out)
    }

    /// Copy `out.len()` bytes from offset `offset` of the readable part.
    pub fn read(&self, memory: &GuestMemory, offset: u64, out: &mut [u8]) -> Result<(), ChainIo> {
        let segments = self
            .segments(false, offset, out.len() as u64)
            .ok_or(ChainIo::Short)?;
        let mut at = 0usize;
        for s in segments {
            let end = at + s.len as usize;
            memory.read(s.addr, &mut out[at..end])?;
            at = end;
        }
        Ok(())
    }

    /// Copy `data` to offset `offset` of the writable part.
    pub fn write(&self, memory: &GuestMemory, offset: u64, data: &[u8]) -> Result<(), ChainIo> {
        let segments = self
            .segments(true, offset, data.len() as u64)
            .ok_or(ChainIo::Short)?;
        let mut at = 0usize;
        for s in segments {
            let end = at + s.len as usize;
            memory.write(s.addr, &data[at..end])?;
            at = end;
        }
        Ok(())
    }
}

/// Why bytes could not be moved through a chain.
#[derive(Debug, thiserror::Error)]
pub enum ChainIo {
    #[error("the chain's buffers are shorter than the request")]
    Short,
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// What the guest got wrong in a ring or chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("{0} descriptors made available at once, more than the queue holds")]
    TooManyAvailable(u16),
    #[error("descriptor index {0} out of range")]
    IndexOutOfRange(u32),
    #[error("descriptor loop or chain longer than {MAX_CHAIN_DESCRIPTORS} buffers")]
    TooLong,
    #[error("indirect descriptor without the feature negotiated")]
    IndirectNotNegotiated,
    #[error("indirect table of {0} bytes")]
    IndirectLength(u32),
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    #[error("buffer {addr:#x}+{len:#x} is not guest RAM")]
    OutsideRam { addr: u64, len: u64 },
    #[error("a device-readable buffer follows a device-writable one")]
    ReadableAfterWritable,
    #[error("ring at {0:#x} is not guest RAM")]
    RingOutsideRam(u64),
}

/// The device-side state of one queue, as a snapshot saves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct QueueState {
    /// Entries (set by the device; legacy drivers cannot change it).
    pub size: u16,
    /// Page frame of the ring, 0 when the driver has not set it up.
    pub pfn: u32,
    /// Next available-ring slot to take.
    pub last_avail: u16,
    /// Next used-ring slot to fill.
    pub next_used: u16,
    /// Used index when the device last decided about an interrupt.
    pub saved_used: u16,
    /// MSI-X vector of the queue.
    pub msix_vector: u16,
}

impl QueueState {
    fn ready(&self) -> bool {
        self.pfn != 0
    }

    fn desc(&self) -> u64 {
        u64::from(self.pfn) << VRING_PFN_SHIFT
    }

    fn avail(&self) -> u64 {
        self.desc() + DESCRIPTOR_SIZE * u64::from(self.size)
    }

    fn used(&self) -> u64 {
        (self.avail() + 2 * (3 + u64::from(self.size))).next_multiple_of(VRING_ALIGN)
    }
}

/// One virtqueue. Shared (`Arc`) between the transport, which sets it up from the guest's
/// register writes, and the device, which takes requests and returns them from any thread.
pub struct VirtQueue {
    index: u16,
    state: Mutex<QueueState>,
    memory: Arc<GuestMemory>,
    shared: Arc<VirtioShared>,
}

impl VirtQueue {
    pub(super) fn new(
        index: u16,
        size: u16,
        memory: Arc<GuestMemory>,
        shared: Arc<VirtioShared>,
    ) -> Self {
        Self {
            index,
            state: Mutex::new(QueueState {
                size,
                msix_vector: VIRTIO_MSI_NO_VECTOR,
                ..QueueState::default()
            }),
            memory,
            shared,
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The queue's number.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Guest RAM, to move a chain's data.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// Entries in the ring.
    pub fn size(&self) -> u16 {
        self.lock().size
    }

    /// The driver has given the ring's address and the device is not broken.
    pub fn ready(&self) -> bool {
        self.lock().ready() && !self.shared.broken()
    }

    pub fn state(&self) -> QueueState {
        *self.lock()
    }

    pub(super) fn set_state(&self, state: QueueState) {
        *self.lock() = state;
    }

    pub(super) fn reset(&self) {
        let mut state = self.lock();
        *state = QueueState {
            size: state.size,
            msix_vector: VIRTIO_MSI_NO_VECTOR,
            ..QueueState::default()
        };
    }

    pub(super) fn set_msix_vector(&self, vector: u16) {
        self.lock().msix_vector = vector;
    }

    /// The driver wrote `QUEUE_PFN`: 0 takes the ring away, anything else places it (and it
    /// must lie in RAM).
    pub(super) fn set_pfn(&self, pfn: u32) -> Result<(), RingError> {
        let mut state = self.lock();
        state.pfn = pfn;
        state.last_avail = 0;
        state.next_used = 0;
        state.saved_used = 0;
        if pfn == 0 {
            return Ok(());
        }
        let base = state.desc();
        if self
            .memory
            .host_address(base, vring_size(state.size))
            .is_err()
        {
            state.pfn = 0;
            return Err(RingError::RingOutsideRam(base));
        }
        Ok(())
    }

    /// Whether the driver has made requests available that were not taken yet.
    pub fn has_available(&self) -> bool {
        let state = self.lock();
        if !state.ready() || self.shared.broken() {
            return false;
        }
        self.memory
            .load_u16(state.avail() + 2)
            .is_ok_and(|idx| idx != state.last_avail)
    }

    /// Take the next available request. `None` when there is none, the queue is not set up,
    /// or the device is broken; a malformed chain breaks the device (see the module docs).
    pub fn pop(&self) -> Option<Chain> {
        let mut state = self.lock();
        if !state.ready() || self.shared.broken() {
            return None;
        }
        match self.take(&mut state) {
            Ok(chain) => chain,
            Err(e) => {
                drop(state);
                self.shared
                    .mark_broken(&format!("queue {}: {e}", self.index));
                None
            }
        }
    }

    /// Give back the request [`VirtQueue::pop`] just returned, to take again later (bhyve's
    /// `vq_retchain`).
    pub fn unpop(&self) {
        let mut state = self.lock();
        state.last_avail = state.last_avail.wrapping_sub(1);
    }

    fn take(&self, state: &mut QueueState) -> Result<Option<Chain>, RingError> {
        let memory = &*self.memory;
        let bad_ring = |_| RingError::RingOutsideRam(state.desc());
        let avail_idx = memory.load_u16(state.avail() + 2).map_err(bad_ring)?;
        let pending = avail_idx.wrapping_sub(state.last_avail);
        if pending == 0 {
            return Ok(None);
        }
        if pending > state.size {
            return Err(RingError::TooManyAvailable(pending));
        }
        // The ring entries and descriptors are read after the index that published them.
        fence(Ordering::Acquire);
        let slot = u64::from(state.last_avail % state.size);
        let head = memory
            .load_u16(state.avail() + 4 + 2 * slot)
            .map_err(bad_ring)?;
        state.last_avail = state.last_avail.wrapping_add(1);
        let indirect_ok = self.shared.negotiated() & (1 << VIRTIO_RING_F_INDIRECT_DESC) != 0;
        let descriptors = walk_chain(memory, state.desc(), state.size, head, indirect_ok)?;
        Ok(Some(Chain { head, descriptors }))
    }

    /// Return request `head` to the guest with `len` bytes written into its buffers (bhyve's
    /// `vq_relchain`). Ignored while the queue is not set up (the device was reset meanwhile).
    pub fn add_used(&self, head: u16, len: u32) {
        let mut state = self.lock();
        if !state.ready() {
            return;
        }
        let slot = u64::from(state.next_used % state.size);
        let entry = state.used() + 4 + 8 * slot;
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        bytes[4..].copy_from_slice(&len.to_le_bytes());
        let written = self.memory.write(entry, &bytes);
        state.next_used = state.next_used.wrapping_add(1);
        // The entry is visible before the index that publishes it.
        fence(Ordering::Release);
        let published =
            written.and_then(|_| self.memory.store_u16(state.used() + 2, state.next_used));
        if published.is_err() {
            let at = state.used();
            drop(state);
            self.shared.mark_broken(&format!(
                "queue {}: used ring at {at:#x} is not RAM",
                self.index
            ));
        }
    }

    /// After returning requests: interrupt the guest if it wants to hear about them (bhyve's
    /// `vq_endchains`). `used_all_avail` says the device emptied the available ring.
    pub fn end_chains(&self, used_all_avail: bool) {
        let (interrupt, vector) = {
            let mut state = self.lock();
            if !state.ready() {
                return;
            }
            let old = state.saved_used;
            let new = state.next_used;
            state.saved_used = new;
            // Read the driver's suppression flags after the used index it will see.
            fence(Ordering::SeqCst);
            let features = self.shared.negotiated();
            let interrupt = if used_all_avail && features & (1 << VIRTIO_F_NOTIFY_ON_EMPTY) != 0 {
                true
            } else if features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0 {
                let used_event_at = state.avail() + 4 + 2 * u64::from(state.size);
                let event = self.memory.load_u16(used_event_at).unwrap_or(new);
                new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
            } else {
                let flags = self.memory.load_u16(state.avail()).unwrap_or(0);
                new != old && u32::from(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0
            };
            (interrupt, state.msix_vector)
        };
        if interrupt {
            self.shared.interrupt(VIRTIO_PCI_ISR_INTR, vector);
        }
    }

    /// [`VirtQueue::add_used`] then [`VirtQueue::end_chains`], for one request at a time.
    pub fn complete(&self, head: u16, len: u32) {
        self.add_used(head, len);
        let used_all = !self.has_available();
        self.end_chains(used_all);
    }
}

fn read_descriptor(memory: &GuestMemory, at: u64) -> Result<(u64, u32, u16, u16), RingError> {
    let mut raw = [0u8; DESCRIPTOR_SIZE as usize];
    memory
        .read(at, &mut raw)
        .map_err(|_| RingError::OutsideRam {
            addr: at,
            len: DESCRIPTOR_SIZE,
        })?;
    let addr = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
    let len = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
    let flags = u16::from_le_bytes([raw[12], raw[13]]);
    let next = u16::from_le_bytes([raw[14], raw[15]]);
    Ok((addr, len, flags, next))
}

fn record(
    memory: &GuestMemory,
    out: &mut Vec<Descriptor>,
    addr: u64,
    len: u32,
    flags: u16,
) -> Result<(), RingError> {
    if out.len() >= MAX_CHAIN_DESCRIPTORS {
        return Err(RingError::TooLong);
    }
    let writable = u32::from(flags) & VRING_DESC_F_WRITE != 0;
    if len != 0 && memory.host_address(addr, u64::from(len)).is_err() {
        return Err(RingError::OutsideRam {
            addr,
            len: u64::from(len),
        });
    }
    if !writable && out.last().is_some_and(|d| d.writable) {
        return Err(RingError::ReadableAfterWritable);
    }
    out.push(Descriptor {
        addr,
        len,
        writable,
    });
    Ok(())
}

/// Follow the chain starting at `head` of the table at `table` (`size` entries), through
/// indirect tables when `indirect_ok`, checking every step.
pub fn walk_chain(
    memory: &GuestMemory,
    table: u64,
    size: u16,
    head: u16,
    indirect_ok: bool,
) -> Result<Vec<Descriptor>, RingError> {
    let mut out = Vec::new();
    let mut next = u32::from(head);
    // A direct chain visits each entry at most once, so more steps than entries is a loop.
    for _ in 0..size {
        if next >= u32::from(size) {
            return Err(RingError::IndexOutOfRange(next));
        }
        let (addr, len, flags, link) =
            read_descriptor(memory, table + DESCRIPTOR_SIZE * u64::from(next))?;
        if u32::from(flags) & VRING_DESC_F_INDIRECT == 0 {
            record(memory, &mut out, addr, len, flags)?;
        } else {
            if !indirect_ok {
                return Err(RingError::IndirectNotNegotiated);
            }
            let entries = len / DESCRIPTOR_SIZE as u32;
            if len % DESCRIPTOR_SIZE as u32 != 0 || entries == 0 {
                return Err(RingError::IndirectLength(len));
            }
            if memory.host_address(addr, u64::from(len)).is_err() {
                return Err(RingError::OutsideRam {
                    addr,
                    len: u64::from(len),
                });
            }
            let mut inner = 0u32;
            let mut steps = 0u32;
            loop {
                steps += 1;
                if steps > entries {
                    return Err(RingError::TooLong);
                }
                let (iaddr, ilen, iflags, ilink) =
                    read_descriptor(memory, addr + DESCRIPTOR_SIZE * u64::from(inner))?;
                if u32::from(iflags) & VRING_DESC_F_INDIRECT != 0 {
                    return Err(RingError::NestedIndirect);
                }
                record(memory, &mut out, iaddr, ilen, iflags)?;
                if u32::from(iflags) & VRING_DESC_F_NEXT == 0 {
                    break;
                }
                inner = u32::from(ilink);
                if inner >= entries {
                    return Err(RingError::IndexOutOfRange(inner));
                }
            }
        }
        if u32::from(flags) & VRING_DESC_F_NEXT == 0 {
            return Ok(out);
        }
        next = u32::from(link);
    }
    Err(RingError::TooLong)
}
