//! The controller's state as registers, queues and features: what a reset sets, what the
//! register BAR shows, and what a snapshot keeps.

use super::fid;
#[cfg(feature = "bhyve_snapshot")]
use super::{Controller, Stats, Store, CC_EN, CSTS_RDY};

/// The registers the host writes or reads back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Registers {
    pub cap: u64,
    pub vs: u32,
    pub cc: u32,
    pub csts: u32,
    pub aqa: u32,
    pub asq: u64,
    pub acq: u64,
}

/// A submission queue; `size` 0 means it does not exist.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SqState {
    pub base: u64,
    pub size: u32,
    /// Next entry the controller reads.
    pub head: u16,
    /// Entry after the last the host queued.
    pub tail: u16,
    pub cqid: u16,
}

/// A completion queue; `size` 0 means it does not exist. The phase is read back from the
/// entry being replaced, so it needs no state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CqState {
    pub base: u64,
    pub size: u32,
    /// Entry after the last the host consumed.
    pub head: u16,
    /// Next entry the controller writes.
    pub tail: u16,
    pub vector: u16,
    pub interrupts: bool,
}

/// Registers, queues (index 0 is the admin pair) and features.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ControllerState {
    pub regs: Registers,
    pub sq: Vec<SqState>,
    pub cq: Vec<CqState>,
    /// I/O queues the host may create (SET FEATURES, Number of Queues).
    pub num_sq: u32,
    pub num_cq: u32,
    pub num_queues_set: bool,
    /// Each feature's value (cdw11) by identifier.
    pub features: Vec<u32>,
}

impl ControllerState {
    /// The state after reset, as bhyve's `pci_nvme_reset_locked`.
    pub fn reset(max_queues: u32, queue_entries: u32) -> Self {
        // CAP: MQES (0-based), contiguous queues required, 30 s timeout, NVM command set.
        let cap = u64::from((queue_entries - 1) & 0xffff) | (1 << 16) | (60 << 24) | (1 << 37);
        let mut features = vec![0u32; fid::MAX];
        // Every asynchronous event enabled.
        features[fid::ASYNC_EVENT_CONFIGURATION] = 0x31f;
        Self {
            regs: Registers {
                cap,
                vs: super::VERSION_1_4,
                ..Registers::default()
            },
            sq: vec![SqState::default(); max_queues as usize + 1],
            cq: vec![CqState::default(); max_queues as usize + 1],
            num_sq: max_queues,
            num_cq: max_queues,
            num_queues_set: false,
            features,
        }
    }

    /// The first 0x40 bytes of the register BAR.
    pub fn register_bytes(&self) -> [u8; 0x40] {
        let r = &self.regs;
        let mut b = [0u8; 0x40];
        b[0x00..0x08].copy_from_slice(&r.cap.to_le_bytes());
        b[0x08..0x0c].copy_from_slice(&r.vs.to_le_bytes());
        b[0x14..0x18].copy_from_slice(&r.cc.to_le_bytes());
        b[0x1c..0x20].copy_from_slice(&r.csts.to_le_bytes());
        b[0x24..0x28].copy_from_slice(&r.aqa.to_le_bytes());
        b[0x28..0x30].copy_from_slice(&r.asq.to_le_bytes());
        b[0x30..0x38].copy_from_slice(&r.acq.to_le_bytes());
        b
    }
}

/// Everything a snapshot keeps of a controller, taken with no command on the backend.
#[cfg(feature = "bhyve_snapshot")]
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Saved {
    pub state: ControllerState,
    pub aers: Vec<u16>,
    pub stats: Stats,
    pub critical_warning: u8,
    /// A health event not yet delivered: (type, information, log page).
    pub event: Option<(u32, u32, u32)>,
    /// The blocks of a RAM namespace.
    pub ram: Option<Vec<u8>>,
}

#[cfg(feature = "bhyve_snapshot")]
impl Controller {
    pub(super) fn save(&self) -> Saved {
        let inner = self.lock();
        let ram = match &self.store {
            Store::Ram(data) => Some(data.lock().unwrap_or_else(|e| e.into_inner()).clone()),
            Store::Block(_) => None,
        };
        Saved {
            state: inner.state.clone(),
            aers: inner.aers.clone(),
            stats: inner.stats,
            critical_warning: inner.critical_warning,
            event: inner.event,
            ram,
        }
    }

    /// Load a saved state into a controller made from the same configuration.
    pub(super) fn restore(&self, saved: Saved) -> Result<(), String> {
        let queues = self.max_queues as usize + 1;
        let s = &saved.state;
        if s.sq.len() != queues || s.cq.len() != queues || s.features.len() != fid::MAX {
            return Err(format!(
                "{} submission and {} completion queues saved, the controller has {queues}",
                s.sq.len(),
                s.cq.len()
            ));
        }
        if s.num_sq > self.max_queues || s.num_cq > self.max_queues {
            return Err("more I/O queues saved than the controller offers".to_string());
        }
        let ready = s.regs.cc & CC_EN != 0 && s.regs.csts & CSTS_RDY != 0;
        for (i, q) in s.sq.iter().enumerate().filter(|(_, q)| q.size != 0) {
            let fits = q.size >= 2
                && q.size <= self.queue_entries.max(4096)
                && u32::from(q.head) < q.size
                && u32::from(q.tail) < q.size
                && usize::from(q.cqid) < queues
                && s.cq[usize::from(q.cqid)].size != 0
                && self.queue_in_ram(q.base, q.size, 64);
            if !fits || !ready {
                return Err(format!("submission queue {i} saved in an invalid state"));
            }
        }
        for (i, q) in s.cq.iter().enumerate().filter(|(_, q)| q.size != 0) {
            let fits = q.size >= 2
                && u32::from(q.head) < q.size
                && u32::from(q.tail) < q.size
                && self.queue_in_ram(q.base, q.size, 16);
            if !fits || !ready {
                return Err(format!("completion queue {i} saved in an invalid state"));
            }
        }
        match (&self.store, saved.ram) {
            (Store::Ram(data), Some(ram)) => {
                let mut data = data.lock().unwrap_or_else(|e| e.into_inner());
                if ram.len() != data.len() {
                    return Err(format!(
                        "RAM namespace of {} bytes saved, this one has {}",
                        ram.len(),
                        data.len()
                    ));
                }
                *data = ram;
            }
            (Store::Block(_), None) => {}
            _ => return Err("namespace saved with a different backing".to_string()),
        }
        let mut inner = self.lock();
        inner.state = saved.state;
        inner.aers = saved.aers;
        inner.stats = saved.stats;
        inner.critical_warning = saved.critical_warning;
        inner.event = saved.event;
        inner.in_flight = 0;
        Ok(())
    }
}
