//! A legacy virtio-PCI driver for unit tests of device models, written from the virtio
//! specification (0.9.5 / 1.x legacy interface): the registers through the I/O BAR, split
//! rings in guest memory, one buffer per descriptor.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::pci::irq::PirqRouter;
use super::pci::{ConfigSpace, PciAddress, PciDevice};
use super::registry::PciCreate;
use super::virtio::pci::{VirtioPci, IO_BAR};
use super::virtio::{
    VirtioDevice, VIRTIO_PCI_CONFIG_NO_MSIX, VIRTIO_PCI_GUEST_FEATURES, VIRTIO_PCI_QUEUE_NOTIFY,
    VIRTIO_PCI_QUEUE_PFN, VIRTIO_PCI_QUEUE_SEL, VIRTIO_PCI_STATUS,
};
use crate::interrupts::InterruptSink;
use crate::memory::GuestMemory;

pub struct NoInterrupts;

impl InterruptSink for NoInterrupts {
    fn set_irq_line(&self, _gsi: u32, _high: bool) -> std::io::Result<()> {
        Ok(())
    }
    fn signal_msi(&self, _address: u64, _data: u32) -> std::io::Result<()> {
        Ok(())
    }
    fn set_isa_irq_trigger(&self, _irq: u8, _level: bool) -> std::io::Result<()> {
        Ok(())
    }
}

/// Ring `n` lives at `RINGS + n * RING_STRIDE` (room for 1024 entries); buffers above.
const RINGS: u64 = 0x10000;
const RING_STRIDE: u64 = 0x8000;
const BUFFERS: u64 = 0x200000;
const MEMORY: u64 = 8 << 20;

/// The guest side of one device.
pub struct Driver {
    pub device: VirtioPci,
    pub config: ConfigSpace,
    pub memory: Arc<GuestMemory>,
    sizes: Vec<u16>,
    config_size: usize,
    next_avail: Vec<u16>,
    next_descriptor: Vec<u16>,
    seen_used: Vec<u16>,
    next_buffer: u64,
}

impl Driver {
    /// `device` on the transport, without MSI-X (the device configuration starts at 0x14).
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        Self::with_memory(device, Arc::new(GuestMemory::new(MEMORY).unwrap()))
    }

    /// [`Driver::new`] over existing guest memory (a restore into a new device).
    pub fn with_memory(device: Box<dyn VirtioDevice>, memory: Arc<GuestMemory>) -> Self {
        let sink: Arc<dyn InterruptSink> = Arc::new(NoInterrupts);
        let router = Arc::new(PirqRouter::new(sink.clone(), false));
        let mut config = ConfigSpace::new(true);
        let sizes = device.queue_sizes();
        let config_size = device.config_size();
        let device = VirtioPci::new(
            device,
            PciCreate {
                slot: PciAddress::new(0, 2, 0).unwrap(),
                config_space: &mut config,
                interrupts: &sink,
                router: &router,
                memory: &memory,
            },
            false,
        )
        .unwrap();
        let queues = sizes.len();
        Driver {
            device,
            config,
            memory,
            sizes,
            config_size,
            next_avail: vec![0; queues],
            next_descriptor: vec![0; queues],
            seen_used: vec![0; queues],
            next_buffer: BUFFERS,
        }
    }

    pub fn read(&mut self, offset: u64, size: usize) -> u32 {
        let mut data = [0u8; 4];
        self.device
            .bar_read(&self.config, IO_BAR, offset, &mut data[..size]);
        u32::from_le_bytes(data)
    }

    pub fn write(&mut self, offset: u64, size: usize, value: u32) {
        self.device
            .bar_write(&self.config, IO_BAR, offset, &value.to_le_bytes()[..size]);
    }

    /// Bytes of the device configuration.
    pub fn read_config(&mut self, offset: u64, len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| self.read(VIRTIO_PCI_CONFIG_NO_MSIX + offset + i, 1) as u8)
            .collect()
    }

    fn ring(queue: usize) -> u64 {
        RINGS + queue as u64 * RING_STRIDE
    }

    /// Reset, negotiate `features`, place every ring, driver OK.
    pub fn setup(&mut self, features: u32) {
        self.write(VIRTIO_PCI_STATUS, 1, 0);
        self.write(VIRTIO_PCI_STATUS, 1, 1 | 2);
        self.write(VIRTIO_PCI_GUEST_FEATURES, 4, features);
        for queue in 0..self.sizes.len() {
            // A fresh ring, as a driver allocates one, whatever was left in the old.
            self.memory
                .write(Self::ring(queue), &[0u8; RING_STRIDE as usize])
                .unwrap();
            self.write(VIRTIO_PCI_QUEUE_SEL, 2, queue as u32);
            self.write(VIRTIO_PCI_QUEUE_PFN, 4, (Self::ring(queue) >> 12) as u32);
        }
        self.write(VIRTIO_PCI_STATUS, 1, 1 | 2 | 4);
        let queues = self.sizes.len();
        self.next_avail = vec![0; queues];
        self.next_descriptor = vec![0; queues];
        self.seen_used = vec![0; queues];
    }

    fn avail(&self, queue: usize) -> u64 {
        Self::ring(queue) + 16 * u64::from(self.sizes[queue])
    }

    fn used(&self, queue: usize) -> u64 {
        (self.avail(queue) + 2 * (3 + u64::from(self.sizes[queue]))).next_multiple_of(4096)
    }

    /// Put one buffer on `queue` and notify: `data` for the device to read, or (`None`) `len`
    /// bytes for it to write. Returns the buffer's guest address.
    pub fn post(&mut self, queue: usize, data: Option<&[u8]>, len: u32) -> u64 {
        let address = self.post_quietly(queue, data, len);
        self.write(VIRTIO_PCI_QUEUE_NOTIFY, 2, queue as u32);
        address
    }

    /// [`Driver::post`] without the notification.
    pub fn post_quietly(&mut self, queue: usize, data: Option<&[u8]>, len: u32) -> u64 {
        self.post_chain_quietly(queue, &[(data, len)])[0]
    }

    /// Put one chain on `queue` without notifying: per buffer, `data` for the device to read,
    /// or (`None`) `len` bytes for it to write. Returns the buffers' guest addresses.
    pub fn post_chain_quietly(
        &mut self,
        queue: usize,
        buffers: &[(Option<&[u8]>, u32)],
    ) -> Vec<u64> {
        let mut descriptors = Vec::new();
        for &(data, len) in buffers {
            let address = self.next_buffer;
            let (length, flags) = match data {
                Some(bytes) => {
                    self.memory.write(address, bytes).unwrap();
                    (bytes.len() as u32, 0u16)
                }
                None => (len, 2u16), // VRING_DESC_F_WRITE
            };
            self.next_buffer += u64::from(length.max(1)).next_multiple_of(64);
            descriptors.push((address, length, flags));
        }
        self.post_descriptors_quietly(queue, &descriptors);
        descriptors.iter().map(|&(address, _, _)| address).collect()
    }

    /// Put one chain of the given (address, length, flags) descriptors on `queue` without
    /// notifying; NEXT is set here.
    pub fn post_descriptors_quietly(&mut self, queue: usize, descriptors: &[(u64, u32, u16)]) {
        let size = self.sizes[queue];
        let head = self.next_descriptor[queue];
        for (i, &(address, length, mut flags)) in descriptors.iter().enumerate() {
            let index = self.next_descriptor[queue];
            self.next_descriptor[queue] = (index + 1) % size;
            if i + 1 < descriptors.len() {
                flags |= 1; // VRING_DESC_F_NEXT
            }
            let descriptor = Self::ring(queue) + 16 * u64::from(index);
            let mut entry = address.to_le_bytes().to_vec();
            entry.extend_from_slice(&length.to_le_bytes());
            entry.extend_from_slice(&flags.to_le_bytes());
            entry.extend_from_slice(&self.next_descriptor[queue].to_le_bytes());
            self.memory.write(descriptor, &entry).unwrap();
        }
        let avail = self.avail(queue);
        let slot = u64::from(self.next_avail[queue] % size);
        self.memory.store_u16(avail + 4 + 2 * slot, head).unwrap();
        self.next_avail[queue] = self.next_avail[queue].wrapping_add(1);
        self.memory
            .store_u16(avail + 2, self.next_avail[queue])
            .unwrap();
    }

    /// The next `count` used entries of `queue` (descriptor id, length), waiting up to 2 s.
    pub fn used_entries(&mut self, queue: usize, count: usize) -> Vec<(u32, u32)> {
        let used = self.used(queue);
        let deadline = Instant::now() + Duration::from_secs(2);
        while self
            .memory
            .load_u16(used + 2)
            .unwrap()
            .wrapping_sub(self.seen_used[queue])
            < count as u16
        {
            assert!(
                Instant::now() < deadline,
                "no used entries on queue {queue}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let size = self.sizes[queue];
        (0..count)
            .map(|_| {
                let slot = u64::from(self.seen_used[queue] % size);
                self.seen_used[queue] = self.seen_used[queue].wrapping_add(1);
                let mut entry = [0u8; 8];
                self.memory.read(used + 4 + 8 * slot, &mut entry).unwrap();
                (
                    u32::from_le_bytes(entry[..4].try_into().unwrap()),
                    u32::from_le_bytes(entry[4..].try_into().unwrap()),
                )
            })
            .collect()
    }

    /// The used index of `queue` as the device last wrote it.
    pub fn used_count(&self, queue: usize) -> u16 {
        self.memory.load_u16(self.used(queue) + 2).unwrap()
    }

    /// The bytes of a device-written buffer.
    pub fn buffer(&self, address: u64, len: u32) -> Vec<u8> {
        let mut data = vec![0u8; len as usize];
        self.memory.read(address, &mut data).unwrap();
        data
    }
}

impl Driver {
    /// `rounds` random guest actions, from the values `random` draws, on the device: register writes and reads anywhere in the
    /// legacy header and the device configuration, garbage and plausible descriptors in every
    /// ring, available entries pointing anywhere, and notifications of any queue. A panic on
    /// the test thread fails the test; callers check afterwards that the device (and any
    /// worker behind it) still answers a proper request.
    pub fn random_guest_input(&mut self, random: &mut dyn FnMut() -> u64, rounds: usize) {
        let mut rng = Random(random);
        let queues = self.sizes.len() as u64;
        let config_end = VIRTIO_PCI_CONFIG_NO_MSIX + self.config_size as u64;
        for _ in 0..rounds {
            let queue = rng.below(queues) as usize;
            let size = u64::from(self.sizes[queue]);
            match rng.below(7) {
                0 => {
                    let at = Self::ring(queue) + rng.below(RING_STRIDE);
                    let bytes: Vec<u8> = (0..rng.below(32) + 1).map(|_| rng.byte()).collect();
                    let _ = self.memory.write(at, &bytes);
                }
                1 | 2 => {
                    let addr = match rng.below(4) {
                        0 => rng.next(),
                        1 => rng.below(MEMORY),
                        _ => BUFFERS + rng.below(0x10000),
                    };
                    let len = match rng.below(4) {
                        0 => rng.next() as u32,
                        _ => rng.below(0x2000) as u32,
                    };
                    // NEXT, WRITE and INDIRECT in any combination.
                    let flags = rng.below(8) as u16;
                    let next = rng.below(size + 2) as u16;
                    let mut entry = addr.to_le_bytes().to_vec();
                    entry.extend_from_slice(&len.to_le_bytes());
                    entry.extend_from_slice(&flags.to_le_bytes());
                    entry.extend_from_slice(&next.to_le_bytes());
                    let index = rng.below(size);
                    let _ = self.memory.write(Self::ring(queue) + 16 * index, &entry);
                }
                3 => {
                    let avail = self.avail(queue);
                    let head = rng.below(size + 2) as u16;
                    let slot = u64::from(self.next_avail[queue]) % size;
                    let _ = self.memory.store_u16(avail + 4 + 2 * slot, head);
                    let step = if rng.below(8) == 0 {
                        rng.next() as u16
                    } else {
                        1
                    };
                    self.next_avail[queue] = self.next_avail[queue].wrapping_add(step);
                    let _ = self.memory.store_u16(avail + 2, self.next_avail[queue]);
                    self.write(VIRTIO_PCI_QUEUE_NOTIFY, 2, queue as u32);
                }
                4 => {
                    let width = *rng.pick(&[1usize, 2, 4]);
                    let offset = rng.below(config_end - width as u64 + 1);
                    let value = match offset {
                        VIRTIO_PCI_QUEUE_PFN if rng.below(2) == 0 => {
                            (Self::ring(queue) >> 12) as u32
                        }
                        VIRTIO_PCI_QUEUE_SEL => rng.below(queues + 2) as u32,
                        VIRTIO_PCI_STATUS => {
                            let any = u32::from(rng.byte());
                            *rng.pick(&[0, 1 | 2, 1 | 2 | 4, 0x80, any])
                        }
                        _ => rng.next() as u32,
                    };
                    self.write(offset, width, value);
                }
                5 => {
                    let width = *rng.pick(&[1usize, 2, 4]);
                    let offset = rng.below(config_end - width as u64 + 1);
                    self.read(offset, width);
                }
                _ => {
                    let target = rng.below(queues + 2) as u32;
                    self.write(VIRTIO_PCI_QUEUE_NOTIFY, 2, target);
                }
            }
        }
    }
}

/// Draws from a caller's generator (the tests' seeded one), so failures reproduce.
struct Random<'a>(&'a mut dyn FnMut() -> u64);

impl Random<'_> {
    fn next(&mut self) -> u64 {
        (self.0)()
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn byte(&mut self) -> u8 {
        (self.next() >> 32) as u8
    }

    fn pick<'b, T>(&mut self, items: &'b [T]) -> &'b T {
        &items[self.below(items.len() as u64) as usize]
    }
}
