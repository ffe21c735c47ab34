//! Split virtqueues for the drivers of devices with several queues (virtio-net, virtio-console):
//! a queue in a caller's static area, descriptors placed by the caller, the used ring polled.
//! The legacy transport's registers and constants come from `virtio.rs`.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{compiler_fence, Ordering};

use crate::pcicfg::Access;
use crate::svc;
use crate::virtio::{
    find, ring_bytes, AVAIL_NO_INTERRUPT, GUEST_FEATURES, HOST_FEATURES, QUEUE_NOTIFY, QUEUE_NUM,
    QUEUE_PFN, QUEUE_SEL, STATUS, STATUS_ACK, STATUS_DRIVER, STATUS_DRIVER_OK,
};

/// Room for one ring of up to 1024 entries.
pub const RING_AREA: usize = 32 << 10;

/// One queue: its ring at `base` (page aligned, `RING_AREA` bytes).
pub struct Queue {
    pub index: u16,
    pub size: u16,
    base: u64,
    next_avail: u16,
    last_used: u16,
}

impl Queue {
    fn avail(&self) -> u64 {
        self.base + 16 * u64::from(self.size)
    }

    fn used(&self) -> u64 {
        (self.avail() + 2 * (3 + u64::from(self.size))).next_multiple_of(4096)
    }

    /// Descriptor `index` (must be < size): one buffer, no chaining.
    pub fn descriptor(&self, index: u16, addr: u64, len: u32, flags: u16) {
        let at = self.base + 16 * u64::from(index % self.size);
        // SAFETY: descriptor `index` of the table at the start of the ring.
        unsafe {
            write_volatile(at as *mut u64, addr);
            write_volatile((at + 8) as *mut u32, len);
            write_volatile((at + 12) as *mut u16, flags);
            write_volatile((at + 14) as *mut u16, 0);
        }
    }

    /// Make descriptor `head` available (without notifying).
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.next_avail % self.size);
        // SAFETY: inside the available ring.
        unsafe { write_volatile((self.avail() + 4 + 2 * slot) as *mut u16, head) };
        compiler_fence(Ordering::SeqCst);
        self.next_avail = self.next_avail.wrapping_add(1);
        // SAFETY: the available ring's index.
        unsafe { write_volatile((self.avail() + 2) as *mut u16, self.next_avail) };
        compiler_fence(Ordering::SeqCst);
    }

    /// The next used entry (descriptor id, length), if the device returned one.
    pub fn take_used(&mut self) -> Option<(u16, u32)> {
        // SAFETY: the used ring's index.
        let index = unsafe { read_volatile((self.used() + 2) as *const u16) };
        if index == self.last_used {
            return None;
        }
        compiler_fence(Ordering::SeqCst);
        let entry = self.used() + 4 + 8 * u64::from(self.last_used % self.size);
        self.last_used = self.last_used.wrapping_add(1);
        // SAFETY: the used element the device published, inside the ring.
        unsafe {
            Some((
                read_volatile(entry as *const u32) as u16,
                read_volatile((entry + 4) as *const u32),
            ))
        }
    }
}

/// A legacy virtio function with its queues set up.
pub struct Device {
    pub io: u16,
    pub features: u32,
}

impl Device {
    /// Find the function, reset it, negotiate `accepted` features and place queue `i` at
    /// `rings[i]` (each `RING_AREA` bytes, page aligned). Driver OK follows.
    pub fn open(device_id: u32, accepted: u32, rings: &[u64], queues: &mut [Option<Queue>]) -> Option<Device> {
        let (dev, func) = find(device_id)?;
        let access = Access::Conf1;
        let command = access.read(dev, func, 0x04) & 0xffff;
        access.write(dev, func, 0x04, command | 0x1 | 0x4);
        let bar0 = access.read(dev, func, 0x10);
        if bar0 & 1 == 0 {
            return None;
        }
        let io = (bar0 & 0xfffc) as u16;
        svc::outb(io + STATUS, 0);
        svc::outb(io + STATUS, STATUS_ACK);
        svc::outb(io + STATUS, STATUS_ACK | STATUS_DRIVER);
        let features = svc::inl(io + HOST_FEATURES) & accepted;
        svc::outl(io + GUEST_FEATURES, features);
        for (index, (&base, slot)) in rings.iter().zip(queues.iter_mut()).enumerate() {
            svc::outw(io + QUEUE_SEL, index as u16);
            let size = svc::inw(io + QUEUE_NUM);
            if size == 0 || !size.is_power_of_two() || ring_bytes(size) > RING_AREA {
                println!("virtio: queue {index} size {size} not usable");
                return None;
            }
            // SAFETY: the caller's ring area, RING_AREA bytes.
            unsafe { core::ptr::write_bytes(base as *mut u8, 0, RING_AREA) };
            let queue = Queue {
                index: index as u16,
                size,
                base,
                next_avail: 0,
                last_used: 0,
            };
            // SAFETY: the available ring's flags.
            unsafe { write_volatile(queue.avail() as *mut u16, AVAIL_NO_INTERRUPT) };
            svc::outl(io + QUEUE_PFN, (base >> 12) as u32);
            *slot = Some(queue);
        }
        svc::outb(io + STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_DRIVER_OK);
        Some(Device { io, features })
    }

    pub fn notify(&self, queue: &Queue) {
        svc::outw(self.io + QUEUE_NOTIFY, queue.index);
    }
}

/// FNV-1a 64 over bytes (the host tests compute the same).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
