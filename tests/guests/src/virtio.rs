//! A legacy virtio-PCI driver (virtio 0.9.5 layout: registers in I/O BAR 0, the split ring at a
//! page frame) for virtio-blk and virtio-rng, polling the used ring instead of taking
//! interrupts (the driver sets VRING_AVAIL_F_NO_INTERRUPT). One request at a time, descriptors
//! 0-2; rings and buffers are statics of the image, whose virtual address is its physical one.
//! See ../README.md for the commands and their output.

use core::ptr::{addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{compiler_fence, Ordering};

use crate::pcicfg::Access;
use crate::{fnv1a_words, parse_u64, splitmix64, svc};

const VIRTIO_VENDOR: u32 = 0x1af4;
const DEVICE_BLOCK: u32 = 0x1001;
const DEVICE_RNG: u32 = 0x1005;

pub(crate) const HOST_FEATURES: u16 = 0x00;
pub(crate) const GUEST_FEATURES: u16 = 0x04;
pub(crate) const QUEUE_PFN: u16 = 0x08;
pub(crate) const QUEUE_NUM: u16 = 0x0c;
pub(crate) const QUEUE_SEL: u16 = 0x0e;
pub(crate) const QUEUE_NOTIFY: u16 = 0x10;
pub(crate) const STATUS: u16 = 0x12;
const ISR: u16 = 0x13;
/// Device configuration without MSI-X enabled (this driver never enables it).
pub(crate) const CONFIG: u16 = 0x14;

pub(crate) const STATUS_ACK: u8 = 1;
pub(crate) const STATUS_DRIVER: u8 = 2;
pub(crate) const STATUS_DRIVER_OK: u8 = 4;

const DESC_NEXT: u16 = 1;
pub(crate) const DESC_WRITE: u16 = 2;
pub(crate) const AVAIL_NO_INTERRUPT: u16 = 1;

const BLK_T_IN: u32 = 0;
const BLK_T_OUT: u32 = 1;
const BLK_T_FLUSH: u32 = 4;
const BLK_T_GET_ID: u32 = 8;
/// virtio-blk features this driver accepts: FLUSH (9), BLK_SIZE (6), SEG_MAX (2), TOPOLOGY (10).
const BLK_ACCEPTED: u32 = (1 << 9) | (1 << 6) | (1 << 2) | (1 << 10);

const RING_BYTES: usize = 64 << 10;
/// Largest transfer of one request: 64 KiB, 128 sectors.
const MAX_SECTORS: u64 = 128;
const SECTOR: u64 = 512;

#[repr(C, align(4096))]
struct Area {
    ring: [u8; RING_BYTES],
    header: [u8; 16],
    status: [u8; 16],
    data: [u8; (MAX_SECTORS * SECTOR) as usize],
}

/// One area per device kind (block, rng), so both can be set up at once.
static mut AREAS: [Area; 2] = [const {
    Area {
        ring: [0; RING_BYTES],
        header: [0; 16],
        status: [0; 16],
        data: [0; (MAX_SECTORS * SECTOR) as usize],
    }
}; 2];

/// A legacy virtio function with queue 0 set up.
struct Device {
    io: u16,
    size: u16,
    area: *mut Area,
    next_avail: u16,
    features: u32,
}

pub(crate) fn find(device_id: u32) -> Option<(u32, u32)> {
    let access = Access::Conf1;
    for dev in 0..32 {
        let id = access.read(dev, 0, 0);
        if id & 0xffff == VIRTIO_VENDOR && id >> 16 == device_id {
            return Some((dev, 0));
        }
    }
    None
}

impl Device {
    /// Find the function, switch on I/O decoding and bus mastering, reset it, negotiate
    /// `accepted` features and set up queue 0.
    fn open(device_id: u32, accepted: u32, area: usize) -> Option<Device> {
        let (dev, func) = find(device_id)?;
        let access = Access::Conf1;
        let command = access.read(dev, func, 0x04) & 0xffff;
        access.write(dev, func, 0x04, command | 0x1 | 0x4);
        let bar0 = access.read(dev, func, 0x10);
        if bar0 & 1 == 0 {
            println!("virtio: BAR 0 of 00:{dev:02x}.{func} is not I/O");
            return None;
        }
        let io = (bar0 & 0xfffc) as u16;
        svc::outb(io + STATUS, 0);
        svc::outb(io + STATUS, STATUS_ACK);
        svc::outb(io + STATUS, STATUS_ACK | STATUS_DRIVER);
        let offered = svc::inl(io + HOST_FEATURES);
        let features = offered & accepted;
        svc::outl(io + GUEST_FEATURES, features);
        svc::outw(io + QUEUE_SEL, 0);
        let size = svc::inw(io + QUEUE_NUM);
        // SAFETY: `area` is 0 or 1, one static per device kind; only this single-threaded shell
        // touches it.
        let area = unsafe { addr_of_mut!(AREAS[area]) };
        if size == 0 || !size.is_power_of_two() || ring_bytes(size) > RING_BYTES {
            println!("virtio: queue size {size} not usable");
            return None;
        }
        // SAFETY: the ring lies inside the static area.
        unsafe { (*area).ring.fill(0) };
        let device = Device {
            io,
            size,
            area,
            next_avail: 0,
            features,
        };
        device.write16(device.avail(), AVAIL_NO_INTERRUPT);
        svc::outl(io + QUEUE_PFN, (device.ring() >> 12) as u32);
        svc::outb(io + STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_DRIVER_OK);
        Some(device)
    }

    fn ring(&self) -> u64 {
        // SAFETY: address of a field of the static area.
        unsafe { addr_of_mut!((*self.area).ring) as u64 }
    }

    fn avail(&self) -> u64 {
        self.ring() + 16 * u64::from(self.size)
    }

    fn used(&self) -> u64 {
        (self.avail() + 2 * (3 + u64::from(self.size))).next_multiple_of(4096)
    }

    fn write16(&self, addr: u64, value: u16) {
        // SAFETY: `addr` is inside the static ring (callers compute it from `ring`).
        unsafe { write_volatile(addr as *mut u16, value) }
    }

    fn read16(&self, addr: u64) -> u16 {
        // SAFETY: as `write16`.
        unsafe { read_volatile(addr as *const u16) }
    }

    fn descriptor(&self, index: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.ring() + 16 * index;
        // SAFETY: descriptor `index` (< 3 <= size) of the table at the start of the ring.
        unsafe {
            write_volatile(at as *mut u64, addr);
            write_volatile((at + 8) as *mut u32, len);
            write_volatile((at + 12) as *mut u16, flags);
            write_volatile((at + 14) as *mut u16, next);
        }
    }

    /// Make the chain at descriptor 0 available, notify, and wait for it to be used; returns
    /// the used length, or None after `spins` polls.
    fn run_chain(&mut self) -> Option<u32> {
        let slot = u64::from(self.next_avail % self.size);
        self.write16(self.avail() + 4 + 2 * slot, 0);
        compiler_fence(Ordering::SeqCst);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.write16(self.avail() + 2, self.next_avail);
        compiler_fence(Ordering::SeqCst);
        svc::outw(self.io + QUEUE_NOTIFY, 0);
        for _ in 0..2_000_000_000u64 {
            if self.read16(self.used() + 2) == self.next_avail {
                compiler_fence(Ordering::SeqCst);
                let entry = self.used() + 4 + 8 * slot;
                // SAFETY: the used element just published, inside the ring.
                return Some(unsafe { read_volatile((entry + 4) as *const u32) });
            }
            core::hint::spin_loop();
        }
        None
    }

    fn config32(&self, offset: u16) -> u32 {
        svc::inl(self.io + CONFIG + offset)
    }

    fn area(&self) -> &mut Area {
        // SAFETY: the static area this device owns; the shell is single-threaded.
        unsafe { &mut *self.area }
    }

    /// One virtio-blk request: header, `len` data bytes (device-written for reads), status.
    fn blk_request(&mut self, kind: u32, sector: u64, len: u32, device_writes: bool) -> u8 {
        let area = self.area();
        area.header[0..4].copy_from_slice(&kind.to_le_bytes());
        area.header[4..8].fill(0);
        area.header[8..16].copy_from_slice(&sector.to_le_bytes());
        area.status[0] = 0xff;
        let header = area.header.as_ptr() as u64;
        let status = area.status.as_ptr() as u64;
        let data = area.data.as_ptr() as u64;
        self.descriptor(0, header, 16, DESC_NEXT, 1);
        if len > 0 {
            let flags = if device_writes { DESC_WRITE } else { 0 };
            self.descriptor(1, data, len, flags | DESC_NEXT, 2);
            self.descriptor(2, status, 1, DESC_WRITE, 0);
        } else {
            self.descriptor(1, status, 1, DESC_WRITE, 0);
        }
        match self.run_chain() {
            // SAFETY: the status byte the device wrote.
            Some(_) => unsafe { read_volatile(status as *const u8) },
            None => 0xfe,
        }
    }
}

pub(crate) fn ring_bytes(size: u16) -> usize {
    let n = usize::from(size);
    (16 * n + 2 * (3 + n)).next_multiple_of(4096) + 6 + 8 * n
}

/// Fill `sectors` sectors of the data buffer with splitmix64 words from `seed`.
fn fill(area: &mut Area, sectors: u64, seed: u64) {
    let mut state = seed;
    for chunk in area.data[..(sectors * SECTOR) as usize].chunks_exact_mut(8) {
        chunk.copy_from_slice(&splitmix64(&mut state).to_le_bytes());
    }
}

fn checksum(area: &Area, sectors: u64) -> u64 {
    fnv1a_words(area.data.as_ptr().cast(), sectors * SECTOR / 8)
}

fn sectors_arg(arg: Option<&str>) -> Option<u64> {
    arg.and_then(parse_u64)
        .filter(|n| (1..=MAX_SECTORS).contains(n))
}

/// The virtio commands; false for any other command.
pub fn run(command: &str, line: &str) -> bool {
    let (args, n) = crate::arguments(line);
    match command {
        "vblk" => vblk(&args[..n]),
        "vrnd" => vrnd(args[..n].first().copied()),
        _ => return false,
    }
    true
}

pub fn help() {
    println!("  vblk info             find virtio-blk, set it up, print its configuration");
    println!("  vblk write <s> <n> <seed>  write n sectors of pattern <seed> at sector s");
    println!("  vblk read <s> <n>     read n sectors at s, print their checksum");
    println!("  vblk flush|id         FLUSH, GET_ID");
    println!("  vblk stream <n>       rewrite and check sectors 0..n until input");
    println!("  vblk bench read|write <n> <ms>  n-sector requests in a row for ms, timed");
    println!("  vrnd [bytes]          read entropy from virtio-rng");
}

/// `vblk ...` commands.
fn vblk(args: &[&str]) {
    let Some(mut d) = Device::open(DEVICE_BLOCK, BLK_ACCEPTED, 0) else {
        println!("vblk: no virtio-blk device");
        return;
    };
    match args {
        ["info"] => {
            let capacity = u64::from(d.config32(0)) | (u64::from(d.config32(4)) << 32);
            println!(
                "vblk capacity {capacity} seg_max {} blk_size {} features 0x{:08x} queue {} isr {}",
                d.config32(12),
                d.config32(20),
                d.features,
                d.size,
                svc::inb(d.io + ISR)
            );
        }
        ["write", sector, count, seed] => {
            match (parse_u64(sector), sectors_arg(Some(count)), parse_u64(seed)) {
                (Some(sector), Some(count), Some(seed)) => {
                    fill(d.area(), count, seed);
                    let sum = checksum(d.area(), count);
                    let status = d.blk_request(BLK_T_OUT, sector, (count * SECTOR) as u32, false);
                    println!("vblk write {sector} {count} status {status} fnv 0x{sum:016x}");
                }
                _ => println!("usage: vblk write <sector> <count 1..128> <seed>"),
            }
        }
        ["read", sector, count] => match (parse_u64(sector), sectors_arg(Some(count))) {
            (Some(sector), Some(count)) => {
                d.area().data.fill(0);
                let status = d.blk_request(BLK_T_IN, sector, (count * SECTOR) as u32, true);
                let sum = checksum(d.area(), count);
                println!("vblk read {sector} {count} status {status} fnv 0x{sum:016x}");
            }
            _ => println!("usage: vblk read <sector> <count 1..128>"),
        },
        ["flush"] => {
            let status = d.blk_request(BLK_T_FLUSH, 0, 0, false);
            println!("vblk flush status {status}");
        }
        ["id"] => {
            d.area().data[..20].fill(0);
            let status = d.blk_request(BLK_T_GET_ID, 0, 20, true);
            let id = &d.area().data[..20];
            let len = id.iter().position(|&b| b == 0).unwrap_or(20);
            let text = core::str::from_utf8(&id[..len]).unwrap_or("?");
            println!("vblk id status {status} '{text}'");
        }
        ["stream", count] => match sectors_arg(Some(count)) {
            Some(count) => stream(&mut d, count),
            None => println!("usage: vblk stream <count 1..128>"),
        },
        ["bench", op @ ("read" | "write"), count, ms] => {
            match (sectors_arg(Some(count)), parse_u64(ms)) {
                (Some(count), Some(ms)) if (1..=60_000).contains(&ms) => {
                    bench(&mut d, op, count, ms)
                }
                _ => println!("usage: vblk bench read|write <count 1..128> <ms 1..60000>"),
            }
        }
        _ => println!("usage: vblk info|write|read|flush|id|stream|bench"),
    }
}

/// Rewrite sectors 0..count with seed = round, round after round, reading each round back;
/// one input byte ends it.
fn stream(d: &mut Device, count: u64) {
    let mut round = 0u64;
    let mut errors = 0u64;
    println!("vblk stream started");
    while crate::console::try_read_byte().is_none() {
        round += 1;
        fill(d.area(), count, round);
        let expected = checksum(d.area(), count);
        let written = d.blk_request(BLK_T_OUT, 0, (count * SECTOR) as u32, false);
        d.area().data.fill(0);
        let read = d.blk_request(BLK_T_IN, 0, (count * SECTOR) as u32, true);
        if written != 0 || read != 0 || checksum(d.area(), count) != expected {
            errors += 1;
            if errors <= 4 {
                println!("vblk stream error round {round} status {written}/{read}");
            }
        }
        if round % 100 == 0 {
            println!("vblk stream round {round}");
        }
        svc::rx_poll();
    }
    println!("vblk stream stopped round {round} errors {errors}");
}

/// Sequential requests of `count` sectors from sector 0 on, wrapping at the end of the disk,
/// back to back for `ms` of guest time: `vblk bench <op> <count> requests <n> bytes <n> ns <n>
/// errors <n>`. Writes send the pattern of seed 1 over and over.
fn bench(d: &mut Device, op: &str, count: u64, ms: u64) {
    let capacity = u64::from(d.config32(0)) | (u64::from(d.config32(4)) << 32);
    if capacity < count {
        println!("vblk bench: the disk has {capacity} sectors");
        return;
    }
    let (kind, device_writes) = if op == "write" {
        fill(d.area(), count, 1);
        (BLK_T_OUT, false)
    } else {
        (BLK_T_IN, true)
    };
    let len = (count * SECTOR) as u32;
    let mut sector = 0;
    crate::clock::run_for(
        format_args!("vblk bench {op} {count}"),
        ms,
        u64::from(len),
        || {
            if sector + count > capacity {
                sector = 0;
            }
            let status = d.blk_request(kind, sector, len, device_writes);
            sector += count;
            status == 0
        },
    );
}

/// `vrnd [bytes]`: read entropy from virtio-rng and print it in hex.
fn vrnd(arg: Option<&str>) {
    let len = arg
        .map_or(Some(32), parse_u64)
        .filter(|n| (1..=64).contains(n));
    let Some(len) = len else {
        println!("usage: vrnd [bytes 1..64]");
        return;
    };
    let Some(mut d) = Device::open(DEVICE_RNG, 0, 1) else {
        println!("vrnd: no virtio-rng device");
        return;
    };
    let data = d.area().data.as_ptr() as u64;
    d.area().data[..64].fill(0);
    d.descriptor(0, data, len as u32, DESC_WRITE, 0);
    let Some(used) = d.run_chain() else {
        println!("vrnd: no answer");
        return;
    };
    let mut hex = [0u8; 128];
    let bytes = &d.area().data[..used.min(64) as usize];
    for (pair, b) in hex.chunks_exact_mut(2).zip(bytes) {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
    let text = core::str::from_utf8(&hex[..2 * bytes.len()]).unwrap_or("");
    println!("vrnd {used} bytes {text}");
}
