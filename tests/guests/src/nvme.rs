//! An NVMe driver (NVMe 1.4, 4 KiB pages): the controller found by class (mass storage,
//! NVM, NVMHCI) on bus 0, its registers reached from ring 3 through BAR 0 in the uncached top
//! GiB of the identity map. Each command resets and enables the controller with a 16-entry
//! admin queue pair, IDENTIFYs it, sets the number of queues and creates one I/O queue pair of
//! 16 entries, all in a static area of the image (its address is physical). Completions are
//! polled by their phase bit; interrupts stay off. See ../README.md for the commands.

use core::ptr::{addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{compiler_fence, Ordering};

use crate::pcicfg::Access;
use crate::{fnv1a_words, parse_u64, splitmix64, svc};

const CLASS_NVME: u32 = 0x01_08_02;
const CAP: u64 = 0x00;
const VS: u64 = 0x08;
const CC: u64 = 0x14;
const CSTS: u64 = 0x1c;
const AQA: u64 = 0x24;
const ASQ: u64 = 0x28;
const ACQ: u64 = 0x30;
const DOORBELLS: u64 = 0x1000;

const ENTRIES: u16 = 16;
const PAGE: u64 = 4096;
/// Largest transfer: 16 pages (PRP1 and a PRP list).
const MAX_BYTES: u64 = 16 * PAGE;
const SPINS: u64 = 2_000_000_000;

const OPC_FLUSH: u8 = 0x00;
const OPC_WRITE: u8 = 0x01;
const OPC_READ: u8 = 0x02;
const OPC_CREATE_SQ: u8 = 0x01;
const OPC_CREATE_CQ: u8 = 0x05;
const OPC_IDENTIFY: u8 = 0x06;
const OPC_SET_FEATURES: u8 = 0x09;
/// A status the device never gave: no completion came.
const NO_ANSWER: u16 = 0xffff;

#[repr(C, align(4096))]
struct Area {
    asq: [u8; PAGE as usize],
    acq: [u8; PAGE as usize],
    iosq: [u8; PAGE as usize],
    iocq: [u8; PAGE as usize],
    identify: [u8; PAGE as usize],
    prp_list: [u8; PAGE as usize],
    data: [u8; MAX_BYTES as usize],
}

static mut AREA: Area = Area {
    asq: [0; PAGE as usize],
    acq: [0; PAGE as usize],
    iosq: [0; PAGE as usize],
    iocq: [0; PAGE as usize],
    identify: [0; PAGE as usize],
    prp_list: [0; PAGE as usize],
    data: [0; MAX_BYTES as usize],
};

fn area() -> &'static mut Area {
    // SAFETY: the single-threaded shell is the only user of the static area.
    unsafe { &mut *addr_of_mut!(AREA) }
}

/// One queue pair: submission tail, completion head and phase.
struct Pair {
    sq: u64,
    cq: u64,
    qid: u64,
    tail: u16,
    head: u16,
    phase: u16,
}

/// An enabled controller with queue pair 1.
struct Nvme {
    base: u64,
    admin: Pair,
    io: Pair,
    next_cid: u16,
    /// Namespace 1: blocks and block size.
    blocks: u64,
    block_size: u64,
    serial: [u8; 20],
}

fn find() -> Option<(u32, u32)> {
    let access = Access::Conf1;
    for dev in 0..32 {
        if access.read(dev, 0, 0) & 0xffff == 0xffff {
            continue;
        }
        if access.read(dev, 0, 0x08) >> 8 == CLASS_NVME {
            return Some((dev, 0));
        }
    }
    None
}

impl Nvme {
    fn read32(&self, offset: u64) -> u32 {
        // SAFETY: `base` was checked to lie in the uncached, user-accessible top GiB of the
        // identity map, and the registers span less than the BAR.
        unsafe { read_volatile((self.base + offset) as *const u32) }
    }

    fn write32(&self, offset: u64, value: u32) {
        // SAFETY: as in `read32`.
        unsafe { write_volatile((self.base + offset) as *mut u32, value) }
    }

    fn write64(&self, offset: u64, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }

    fn wait_ready(&self, ready: bool) -> bool {
        for _ in 0..SPINS / 1000 {
            let csts = self.read32(CSTS);
            if csts & 2 != 0 {
                return false;
            }
            if (csts & 1 != 0) == ready {
                return true;
            }
            core::hint::spin_loop();
        }
        false
    }

    /// Find, reset and enable the controller, identify it, create I/O queue pair 1.
    fn open() -> Result<Nvme, &'static str> {
        let (dev, func) = find().ok_or("no NVMe controller")?;
        let access = Access::Conf1;
        let command = access.read(dev, func, 0x04) & 0xffff;
        access.write(dev, func, 0x04, command | 0x2 | 0x4);
        let low = access.read(dev, func, 0x10);
        let high = if low & 0x6 == 0x4 {
            access.read(dev, func, 0x14)
        } else {
            0
        };
        let base = (u64::from(high) << 32) | u64::from(low & !0xf);
        if !(0xc000_0000..0x1_0000_0000).contains(&base) {
            return Err("BAR 0 outside the top GiB below 4 GiB");
        }
        let a = area();
        let mut n = Nvme {
            base,
            admin: Pair {
                sq: a.asq.as_ptr() as u64,
                cq: a.acq.as_ptr() as u64,
                qid: 0,
                tail: 0,
                head: 0,
                phase: 1,
            },
            io: Pair {
                sq: a.iosq.as_ptr() as u64,
                cq: a.iocq.as_ptr() as u64,
                qid: 1,
                tail: 0,
                head: 0,
                phase: 1,
            },
            next_cid: 1,
            blocks: 0,
            block_size: 0,
            serial: [0; 20],
        };
        n.write32(CC, 0);
        if !n.wait_ready(false) {
            return Err("controller does not reset");
        }
        a.asq.fill(0);
        a.acq.fill(0);
        a.iosq.fill(0);
        a.iocq.fill(0);
        let size = u32::from(ENTRIES - 1);
        n.write32(AQA, (size << 16) | size);
        n.write64(ASQ, n.admin.sq);
        n.write64(ACQ, n.admin.cq);
        // 64-byte SQ entries, 16-byte CQ entries, 4 KiB pages, NVM command set.
        n.write32(CC, (6 << 16) | (4 << 20) | 1);
        if !n.wait_ready(true) {
            return Err("controller not ready");
        }
        let identify = a.identify.as_ptr() as u64;
        a.identify.fill(0);
        if n.admin_command(OPC_IDENTIFY, 0, identify, 1, 0) != 0 {
            return Err("IDENTIFY controller failed");
        }
        n.serial.copy_from_slice(&a.identify[4..24]);
        a.identify.fill(0);
        if n.admin_command(OPC_IDENTIFY, 1, identify, 0, 0) != 0 {
            return Err("IDENTIFY namespace failed");
        }
        n.blocks = u64::from_le_bytes(a.identify[0..8].try_into().unwrap_or_default());
        let format = usize::from(a.identify[26] & 0xf);
        let lbads = a.identify[128 + 4 * format + 2];
        n.block_size = 1 << lbads;
        if n.admin_command(OPC_SET_FEATURES, 0, 0, 7, 0) != 0 {
            return Err("SET FEATURES number of queues failed");
        }
        let entries = u32::from(ENTRIES - 1) << 16;
        if n.admin_command(OPC_CREATE_CQ, 0, n.io.cq, entries | 1, 1) != 0 {
            return Err("CREATE I/O CQ failed");
        }
        if n.admin_command(OPC_CREATE_SQ, 0, n.io.sq, entries | 1, (1 << 16) | 1) != 0 {
            return Err("CREATE I/O SQ failed");
        }
        Ok(n)
    }

    fn admin_command(&mut self, opcode: u8, nsid: u32, prp1: u64, cdw10: u32, cdw11: u32) -> u16 {
        let mut c = [0u32; 16];
        c[1] = nsid;
        c[6] = prp1 as u32;
        c[7] = (prp1 >> 32) as u32;
        c[10] = cdw10;
        c[11] = cdw11;
        self.submit(true, opcode, c)
    }

    /// Queue one command (dwords; opcode and command id filled in), ring, poll the completion
    /// queue's phase bit: the status (without phase), or [`NO_ANSWER`].
    fn submit(&mut self, admin: bool, opcode: u8, mut c: [u32; 16]) -> u16 {
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1).max(1);
        c[0] = u32::from(opcode) | (u32::from(cid) << 16);
        let base = self.base;
        let pair = if admin { &mut self.admin } else { &mut self.io };
        let at = pair.sq + 64 * u64::from(pair.tail);
        for (i, dword) in c.iter().enumerate() {
            // SAFETY: entry `tail` (< ENTRIES) of the static queue page.
            unsafe { write_volatile((at + 4 * i as u64) as *mut u32, *dword) };
        }
        compiler_fence(Ordering::SeqCst);
        pair.tail = (pair.tail + 1) % ENTRIES;
        let doorbell = base + DOORBELLS + 8 * pair.qid;
        // SAFETY: the SQ tail doorbell of this pair, inside BAR 0 (see `read32`).
        unsafe { write_volatile(doorbell as *mut u32, u32::from(pair.tail)) };
        let entry = pair.cq + 16 * u64::from(pair.head);
        for _ in 0..SPINS {
            // SAFETY: entry `head` of the static completion queue page.
            let word = unsafe { read_volatile((entry + 12) as *const u32) };
            let status = (word >> 16) as u16;
            if status & 1 == pair.phase {
                compiler_fence(Ordering::SeqCst);
                pair.head = (pair.head + 1) % ENTRIES;
                if pair.head == 0 {
                    pair.phase ^= 1;
                }
                // SAFETY: the CQ head doorbell, as above.
                unsafe { write_volatile((doorbell + 4) as *mut u32, u32::from(pair.head)) };
                if word as u16 != cid {
                    println!("nvme: completion for command {} not {cid}", word as u16);
                }
                return status >> 1;
            }
            core::hint::spin_loop();
        }
        NO_ANSWER
    }

    /// READ or WRITE of `count` blocks at `lba` through the data buffer: PRP1 its first page,
    /// PRP2 the second page or the PRP list of the others.
    fn transfer(&mut self, opcode: u8, nsid: u32, lba: u64, count: u64) -> u16 {
        let a = area();
        let data = a.data.as_ptr() as u64;
        let bytes = count * self.block_size;
        let pages = bytes.div_ceil(PAGE);
        let prp2 = if pages <= 1 {
            0
        } else if pages == 2 {
            data + PAGE
        } else {
            for i in 1..pages {
                let at = 8 * (i as usize - 1);
                a.prp_list[at..at + 8].copy_from_slice(&(data + i * PAGE).to_le_bytes());
            }
            a.prp_list.as_ptr() as u64
        };
        self.io_command(opcode, nsid, data, prp2, lba, count)
    }

    fn io_command(
        &mut self,
        opcode: u8,
        nsid: u32,
        prp1: u64,
        prp2: u64,
        lba: u64,
        count: u64,
    ) -> u16 {
        let mut c = [0u32; 16];
        c[1] = nsid;
        c[6] = prp1 as u32;
        c[7] = (prp1 >> 32) as u32;
        c[8] = prp2 as u32;
        c[9] = (prp2 >> 32) as u32;
        c[10] = lba as u32;
        c[11] = (lba >> 32) as u32;
        c[12] = (count.max(1) - 1) as u32 & 0xffff;
        self.submit(false, opcode, c)
    }

    fn max_blocks(&self) -> u64 {
        MAX_BYTES / self.block_size.max(1)
    }
}

fn fill(bytes: u64, seed: u64) {
    let mut state = seed;
    for chunk in area().data[..bytes as usize].chunks_exact_mut(8) {
        chunk.copy_from_slice(&splitmix64(&mut state).to_le_bytes());
    }
}

fn checksum(bytes: u64) -> u64 {
    fnv1a_words(area().data.as_ptr().cast(), bytes / 8)
}

/// The nvme commands; false for any other command.
pub fn run(command: &str, line: &str) -> bool {
    if command != "nvme" {
        return false;
    }
    let (args, n) = crate::arguments(line);
    nvme(&args[..n]);
    true
}

pub fn help() {
    println!("  nvme info             enable the NVMe controller, IDENTIFY, print namespace 1");
    println!("  nvme write <lba> <n> <seed>  write n blocks of pattern <seed> at lba");
    println!("  nvme read <lba> <n>   read n blocks at lba, print their checksum");
    println!("  nvme flush            FLUSH namespace 1");
    println!("  nvme bad              malformed commands, print their statuses");
    println!("  nvme stream <n>       rewrite and check blocks 0..n until input");
    println!("  nvme bench read|write <n> <ms>  n-block commands in a row for ms, timed");
}

fn nvme(args: &[&str]) {
    let mut d = match Nvme::open() {
        Ok(d) => d,
        Err(why) => {
            println!("nvme: {why}");
            return;
        }
    };
    let count_arg =
        |text: &str, d: &Nvme| parse_u64(text).filter(|n| (1..=d.max_blocks()).contains(n));
    match args {
        ["info"] => {
            let len = d
                .serial
                .iter()
                .rposition(|&b| b != b' ' && b != 0)
                .map_or(0, |p| p + 1);
            let serial = core::str::from_utf8(&d.serial[..len]).unwrap_or("?");
            let cap = u64::from(d.read32(CAP)) | (u64::from(d.read32(CAP + 4)) << 32);
            println!(
                "nvme blocks {} block_size {} serial '{serial}' vs 0x{:08x} mqes {}",
                d.blocks,
                d.block_size,
                d.read32(VS),
                (cap & 0xffff) + 1
            );
        }
        ["write", lba, count, seed] => {
            match (parse_u64(lba), count_arg(count, &d), parse_u64(seed)) {
                (Some(lba), Some(count), Some(seed)) => {
                    let bytes = count * d.block_size;
                    fill(bytes, seed);
                    let sum = checksum(bytes);
                    let status = d.transfer(OPC_WRITE, 1, lba, count);
                    println!("nvme write {lba} {count} status 0x{status:x} fnv 0x{sum:016x}");
                }
                _ => println!(
                    "usage: nvme write <lba> <count 1..{}> <seed>",
                    d.max_blocks()
                ),
            }
        }
        ["read", lba, count] => match (parse_u64(lba), count_arg(count, &d)) {
            (Some(lba), Some(count)) => {
                let bytes = count * d.block_size;
                area().data[..bytes as usize].fill(0);
                let status = d.transfer(OPC_READ, 1, lba, count);
                let sum = checksum(bytes);
                println!("nvme read {lba} {count} status 0x{status:x} fnv 0x{sum:016x}");
            }
            _ => println!("usage: nvme read <lba> <count 1..{}>", d.max_blocks()),
        },
        ["flush"] => {
            let status = d.io_command(OPC_FLUSH, 1, 0, 0, 0, 0);
            println!("nvme flush status 0x{status:x}");
        }
        ["bad"] => bad(&mut d),
        ["stream", count] => match count_arg(count, &d) {
            Some(count) => stream(&mut d, count),
            None => println!("usage: nvme stream <count 1..{}>", d.max_blocks()),
        },
        ["bench", op @ ("read" | "write"), count, ms] => {
            match (count_arg(count, &d), parse_u64(ms)) {
                (Some(count), Some(ms)) if (1..=60_000).contains(&ms) => {
                    bench(&mut d, op, count, ms)
                }
                _ => println!(
                    "usage: nvme bench read|write <count 1..{}> <ms 1..60000>",
                    d.max_blocks()
                ),
            }
        }
        _ => println!("usage: nvme info|write|read|flush|bad|stream|bench"),
    }
}

/// Sequential commands of `count` blocks from block 0 on, wrapping at the end of the
/// namespace, back to back for `ms` of guest time: `nvme bench <op> <count> requests <n> bytes
/// <n> ns <n> errors <n>`. Writes send the pattern of seed 1 over and over.
fn bench(d: &mut Nvme, op: &str, count: u64, ms: u64) {
    if d.blocks < count {
        println!("nvme bench: the namespace has {} blocks", d.blocks);
        return;
    }
    let bytes = count * d.block_size;
    let opcode = if op == "write" {
        fill(bytes, 1);
        OPC_WRITE
    } else {
        OPC_READ
    };
    let mut lba = 0;
    crate::clock::run_for(format_args!("nvme bench {op} {count}"), ms, bytes, || {
        if lba + count > d.blocks {
            lba = 0;
        }
        let status = d.transfer(opcode, 1, lba, count);
        lba += count;
        status == 0
    });
}

/// Malformed commands the controller must refuse with a status: an unknown I/O opcode, an
/// absent namespace, data outside guest RAM (first page, second page), a block past the end,
/// an unknown admin opcode, an I/O queue with a bad id. The queues go on working after them.
fn bad(d: &mut Nvme) {
    let data = area().data.as_ptr() as u64;
    // Far above any RAM these guests get and below the 52-bit physical limit.
    let nowhere = 1u64 << 44;
    let opcode = d.io_command(0x7e, 1, data, 0, 0, 1);
    let nsid = d.io_command(OPC_READ, 2, data, 0, 0, 1);
    let prp1 = d.io_command(OPC_READ, 1, nowhere, 0, 0, 1);
    let pages = (2 * PAGE / d.block_size.max(1)).max(2);
    let prp2 = d.io_command(OPC_READ, 1, data, nowhere, 0, pages);
    let lba = d.io_command(OPC_READ, 1, data, 0, d.blocks, 1);
    let admin = d.admin_command(0x7f, 0, 0, 0, 0);
    let qid = d.admin_command(
        OPC_CREATE_CQ,
        0,
        d.io.cq,
        (u32::from(ENTRIES - 1) << 16) | 0x7fff,
        1,
    );
    let after = d.transfer(OPC_READ, 1, 0, 1);
    println!(
        "nvme bad opcode 0x{opcode:x} nsid 0x{nsid:x} prp1 0x{prp1:x} prp2 0x{prp2:x} lba 0x{lba:x} admin 0x{admin:x} qid 0x{qid:x} after 0x{after:x}"
    );
}

/// Rewrite blocks 0..count with seed = round, round after round, reading each round back;
/// one input byte ends it.
fn stream(d: &mut Nvme, count: u64) {
    let bytes = count * d.block_size;
    let mut round = 0u64;
    let mut errors = 0u64;
    println!("nvme stream started");
    while crate::console::try_read_byte().is_none() {
        round += 1;
        fill(bytes, round);
        let expected = checksum(bytes);
        let written = d.transfer(OPC_WRITE, 1, 0, count);
        area().data[..bytes as usize].fill(0);
        let read = d.transfer(OPC_READ, 1, 0, count);
        if written != 0 || read != 0 || checksum(bytes) != expected {
            errors += 1;
            if errors <= 4 {
                println!("nvme stream error round {round} status 0x{written:x}/0x{read:x}");
            }
        }
        if round.is_multiple_of(100) {
            println!("nvme stream round {round}");
        }
        svc::rx_poll();
    }
    println!("nvme stream stopped round {round} errors {errors}");
}
