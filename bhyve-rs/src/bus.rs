//! Address-range dispatch: a bus maps non-overlapping ranges (port I/O or MMIO) to the device
//! that owns each one. vCPU threads look up ranges concurrently; PCI BAR programming may move a
//! range at run time, hence the lock around the map.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device as a bus sees it: reads and writes at an offset inside one of its ranges.
pub trait BusDevice: Send {
    /// Fill `data` with the bytes at `offset` in the range that starts at `base`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// Take the bytes written at `offset` in the range that starts at `base`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("range {base:#x}+{len:#x} is empty or wraps around")]
    InvalidRange { base: u64, len: u64 },
    #[error("range {base:#x}+{len:#x} overlaps {other_base:#x}+{other_len:#x}")]
    Overlap {
        base: u64,
        len: u64,
        other_base: u64,
        other_len: u64,
    },
    #[error("no range starts at {0:#x}")]
    NotFound(u64),
}

#[derive(Clone)]
struct Range {
    len: u64,
    device: SharedDevice,
}

/// The two address spaces a vCPU exit can target.
pub struct Buses {
    /// x86 port I/O, 0..0x10000.
    pub pio: Bus,
    /// Guest-physical MMIO.
    pub mmio: Bus,
}

impl Default for Buses {
    fn default() -> Self {
        Self {
            pio: Bus::port_io(),
            mmio: Bus::new(),
        }
    }
}

/// One address space (port I/O or MMIO).
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Range>>,
    /// As bhyve's port handlers: an access belongs to the range holding its first address,
    /// whatever its width (a 32-bit access at 0xCF8 reaches the PCI address register while
    /// 0xCF9 can belong to the reset register).
    dispatch_by_first_address: bool,
}

impl Bus {
    /// An MMIO bus: every access must lie wholly inside one range.
    pub fn new() -> Self {
        Self::default()
    }

    /// A port I/O bus, dispatching by the first port of an access.
    pub fn port_io() -> Self {
        Self {
            dispatch_by_first_address: true,
            ..Self::default()
        }
    }

    /// Give `device` the addresses `base..base+len`.
    pub fn insert(&self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        // The only candidates for overlap are the nearest range below `end` and any range that
        // starts inside the new one.
        if let Some((&other_base, other)) = ranges.range(..end).next_back() {
            if other_base + other.len > base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other_base,
                    other_len: other.len,
                });
            }
        }
        ranges.insert(base, Range { len, device });
        Ok(())
    }

    /// Take back the range that starts at `base`, returning its device.
    pub fn remove(&self, base: u64) -> Result<SharedDevice, BusError> {
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        ranges
            .remove(&base)
            .map(|r| r.device)
            .ok_or(BusError::NotFound(base))
    }

    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, u64, SharedDevice)> {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        let (&base, range) = ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = if self.dispatch_by_first_address {
            offset.checked_add(1)?
        } else {
            offset.checked_add(size as u64)?
        };
        if end > range.len {
            return None;
        }
        Some((base, offset, range.device.clone()))
    }

    /// Route a read; returns false when no device owns the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((base, offset, device)) => {
                device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(base, offset, data);
                true
            }
            None => false,
        }
    }

    /// Route a write; returns false when no device owns the whole access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((base, offset, device)) => {
                device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(base, offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.last_write = Some((base, offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_accesses_to_the_owning_range_with_its_offset() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut byte = [0u8; 1];
        assert!(bus.read(0x3fd, &mut byte));
        assert_eq!(byte, [5]);
        assert!(bus.write(0x3f9, &[0xaa]));
        assert_eq!(dev.lock().unwrap().last_write, Some((0x3f8, 1, vec![0xaa])));
    }

    #[test]
    fn accesses_outside_or_straddling_a_range_are_unclaimed() {
        let bus = Bus::new();
        bus.insert(0x100, 4, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        let mut word = [0u8; 4];
        assert!(!bus.read(0xff, &mut word[..1]));
        assert!(!bus.read(0x104, &mut word[..1]));
        assert!(!bus.read(0x102, &mut word));
        assert!(bus.read(0x100, &mut word));
    }

    #[test]
    fn port_io_accesses_belong_to_the_range_of_their_first_port() {
        let bus = Bus::port_io();
        bus.insert(0xcf8, 1, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        bus.insert(0xcf9, 1, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        let mut word = [0u8; 4];
        assert!(bus.read(0xcf8, &mut word));
        assert!(bus.read(0xcf9, &mut word[..1]));
        assert!(!bus.read(0xcfa, &mut word[..1]));
    }

    #[test]
    fn overlapping_and_empty_ranges_are_refused() {
        let bus = Bus::new();
        let dev: SharedDevice = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x100, 0x10, dev.clone()).unwrap();
        assert!(matches!(
            bus.insert(0x10f, 1, dev.clone()),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0xf0, 0x11, dev.clone()),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0x200, 0, dev.clone()),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, dev.clone()),
            Err(BusError::InvalidRange { .. })
        ));
        bus.insert(0x110, 0x10, dev.clone()).unwrap();
        bus.insert(0xf0, 0x10, dev).unwrap();
    }

    #[test]
    fn a_removed_range_can_be_placed_elsewhere() {
        let bus = Bus::new();
        let dev: SharedDevice = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x1000, 0x100, dev).unwrap();
        let dev = bus.remove(0x1000).unwrap();
        assert!(!bus.write(0x1000, &[1]));
        bus.insert(0x2000, 0x100, dev).unwrap();
        assert!(bus.write(0x2080, &[1]));
        assert_eq!(bus.remove(0x1000).err(), Some(BusError::NotFound(0x1000)));
    }
}
