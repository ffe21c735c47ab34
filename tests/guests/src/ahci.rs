//! An AHCI driver: finds every SATA AHCI controller (class 01.06.01) on bus 0, uses the first
//! port with a disk (signature 0x101) and the first with an ATAPI device (0xeb140101), and runs
//! one command at a time in slot 0, polling PxCI instead of taking interrupts (GHC.IE stays
//! off). Registers are read straight from ring 3 through the identity map; command list,
//! received FISes, command table and buffers are statics of the image, whose virtual address is
//! its physical one. See ../README.md for the commands and their output.

use core::ptr::{addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{compiler_fence, Ordering};

use crate::pcicfg::Access;
use crate::{fnv1a_words, parse_u64, splitmix64, svc};

const CLASS_AHCI: u32 = 0x01_06_01;

const GHC: u64 = 0x04;
const PI: u64 = 0x0c;
const GHC_AE: u32 = 1 << 31;
const PORT_BASE: u64 = 0x100;
const PORT_STEP: u64 = 0x80;
const P_CLB: u64 = 0x00;
const P_CLBU: u64 = 0x04;
const P_FB: u64 = 0x08;
const P_FBU: u64 = 0x0c;
const P_IS: u64 = 0x10;
const P_IE: u64 = 0x14;
const P_CMD: u64 = 0x18;
const P_TFD: u64 = 0x20;
const P_SIG: u64 = 0x24;
const P_SSTS: u64 = 0x28;
const P_SERR: u64 = 0x30;
const P_SACT: u64 = 0x34;
const P_CI: u64 = 0x38;
const CMD_ST: u32 = 1 << 0;
const CMD_FRE: u32 = 1 << 4;
const CMD_FR: u32 = 1 << 14;
const CMD_CR: u32 = 1 << 15;
const IS_TFE: u32 = 1 << 30;
const SIG_ATA: u32 = 0x0000_0101;
const SIG_ATAPI: u32 = 0xeb14_0101;

const ATA_IDENTIFY: u8 = 0xec;
const READ_DMA_EXT: u8 = 0x25;
const WRITE_DMA_EXT: u8 = 0x35;
const READ_FPDMA_QUEUED: u8 = 0x60;
const WRITE_FPDMA_QUEUED: u8 = 0x61;
const FLUSH_CACHE_EXT: u8 = 0xea;
const PACKET: u8 = 0xa0;
const SCSI_READ_CAPACITY: u8 = 0x25;
const SCSI_READ_10: u8 = 0x28;
const SCSI_REQUEST_SENSE: u8 = 0x03;

const SECTOR: u64 = 512;
const CD_SECTOR: u64 = 2048;
const DATA_BYTES: usize = 64 << 10;
/// Bytes of one PRDT entry's buffer here: the data area in 4 KiB pieces, so a transfer uses
/// several entries.
const PRD_BYTES: u64 = 4096;
const PRDT_ENTRIES: usize = DATA_BYTES / PRD_BYTES as usize;

#[repr(C, align(4096))]
struct Area {
    /// 32 command headers of 32 bytes (slot 0 used).
    list: [u8; 1024],
    _pad: [u8; 1024],
    /// Received FIS area.
    fis: [u8; 256],
    _pad2: [u8; 1792],
    /// Command table: FIS at 0, ATAPI command at 0x40, PRDT at 0x80.
    table: [u8; 0x80 + 16 * PRDT_ENTRIES],
    data: [u8; DATA_BYTES],
}

static mut AREA: Area = Area {
    list: [0; 1024],
    _pad: [0; 1024],
    fis: [0; 256],
    _pad2: [0; 1792],
    table: [0; 0x80 + 16 * PRDT_ENTRIES],
    data: [0; DATA_BYTES],
};

fn area() -> &'static mut Area {
    // SAFETY: the single-threaded shell is the only user of the static.
    unsafe { &mut *addr_of_mut!(AREA) }
}

/// One port of a controller.
#[derive(Clone, Copy)]
struct Port {
    abar: u64,
    index: u64,
}

/// The controllers' base addresses (BAR 5) on bus 0, memory decoding and bus mastering on.
fn controllers(mut visit: impl FnMut(u64) -> bool) {
    let access = Access::Conf1;
    for dev in 0..32 {
        for func in 0..8 {
            let id = access.read(dev, func, 0);
            if id & 0xffff == 0xffff {
                if func == 0 {
                    break;
                }
                continue;
            }
            if access.read(dev, func, 0x08) >> 8 != CLASS_AHCI {
                continue;
            }
            let command = access.read(dev, func, 0x04) & 0xffff;
            access.write(dev, func, 0x04, command | 0x2 | 0x4);
            let abar = u64::from(access.read(dev, func, 0x24) & !0xf);
            if abar != 0 && visit(abar) {
                return;
            }
        }
    }
}

fn mmio_read(addr: u64) -> u32 {
    // SAFETY: an AHCI register inside the BAR the firmware or bhyve assigned, identity mapped
    // uncached and user accessible.
    unsafe { read_volatile(addr as *const u32) }
}

fn mmio_write(addr: u64, value: u32) {
    // SAFETY: as `mmio_read`.
    unsafe { write_volatile(addr as *mut u32, value) }
}

impl Port {
    /// The first port, over every controller, with a device of signature `sig` online.
    fn find(sig: u32) -> Option<Port> {
        let mut found = None;
        controllers(|abar| {
            mmio_write(abar + GHC, GHC_AE);
            let implemented = mmio_read(abar + PI);
            for index in 0..32 {
                let port = Port { abar, index };
                if implemented & (1 << index) != 0
                    && port.read(P_SSTS) & 0xf == 3
                    && port.read(P_SIG) == sig
                {
                    found = Some(port);
                    return true;
                }
            }
            false
        });
        found
    }

    fn reg(&self, offset: u64) -> u64 {
        self.abar + PORT_BASE + self.index * PORT_STEP + offset
    }

    fn read(&self, offset: u64) -> u32 {
        mmio_read(self.reg(offset))
    }

    fn write(&self, offset: u64, value: u32) {
        mmio_write(self.reg(offset), value)
    }

    /// Stop the port, point it at the static areas, clear its errors and start it.
    fn start(&self) -> bool {
        self.write(P_CMD, self.read(P_CMD) & !(CMD_ST | CMD_FRE));
        let mut spins = 0;
        while self.read(P_CMD) & (CMD_CR | CMD_FR) != 0 {
            spins += 1;
            if spins > 1_000_000 {
                return false;
            }
        }
        let a = area();
        self.write(P_CLB, a.list.as_ptr() as u32);
        self.write(P_CLBU, 0);
        self.write(P_FB, a.fis.as_ptr() as u32);
        self.write(P_FBU, 0);
        self.write(P_SERR, u32::MAX);
        self.write(P_IS, u32::MAX);
        self.write(P_IE, 0);
        self.write(P_CMD, self.read(P_CMD) | CMD_FRE);
        self.write(P_CMD, self.read(P_CMD) | CMD_ST);
        true
    }

    /// Run the command in slot 0: `fis` (command, LBA, count), optional ATAPI command,
    /// `bytes` of data at the start of the data area. Returns PxTFD, or None on a timeout.
    fn run(
        &self,
        command: u8,
        lba: u64,
        count: u16,
        packet: Option<&[u8]>,
        bytes: u64,
        write: bool,
    ) -> Option<u32> {
        self.prepare(command, lba, count, packet, bytes, write);
        self.write(P_IS, u32::MAX);
        self.write(P_CI, 1);
        self.wait(P_CI)
    }

    /// READ or WRITE FPDMA QUEUED with tag 0 in slot 0: the count goes in the features field,
    /// the tag in the count field, and the command completes when its PxSACT bit clears.
    fn queued(&self, write: bool, lba: u64, count: u16) -> Option<u32> {
        let command = if write {
            WRITE_FPDMA_QUEUED
        } else {
            READ_FPDMA_QUEUED
        };
        let bytes = u64::from(count) * SECTOR;
        self.prepare(command, lba, 0, None, bytes, write);
        let fis = &mut area().table;
        fis[3] = count as u8;
        fis[11] = (count >> 8) as u8;
        compiler_fence(Ordering::SeqCst);
        self.write(P_IS, u32::MAX);
        self.write(P_SACT, 1);
        self.write(P_CI, 1);
        self.wait(P_SACT)
    }

    /// READ/WRITE DMA EXT, or their queued forms, of `count` sectors at `lba`.
    fn transfer(&self, queued: bool, write: bool, lba: u64, count: u64) -> Option<u32> {
        if queued {
            self.queued(write, lba, count as u16)
        } else {
            let command = if write { WRITE_DMA_EXT } else { READ_DMA_EXT };
            self.run(command, lba, count as u16, None, count * SECTOR, write)
        }
    }

    /// Poll until bit 0 of `reg` clears or a task-file error is posted; PxTFD then.
    fn wait(&self, reg: u64) -> Option<u32> {
        for _ in 0..2_000_000_000u64 {
            if self.read(reg) & 1 == 0 || self.read(P_IS) & IS_TFE != 0 {
                compiler_fence(Ordering::SeqCst);
                return Some(self.read(P_TFD));
            }
            core::hint::spin_loop();
        }
        None
    }

    /// Write the command header, command FIS, ATAPI command and PRDT of slot 0.
    fn prepare(
        &self,
        command: u8,
        lba: u64,
        count: u16,
        packet: Option<&[u8]>,
        bytes: u64,
        write: bool,
    ) {
        let a = area();
        let entries = bytes.div_ceil(PRD_BYTES) as usize;
        let mut flags: u16 = 5;
        if write {
            flags |= 1 << 6;
        }
        if packet.is_some() {
            flags |= 1 << 5;
        }
        a.list[..32].fill(0);
        a.list[0..2].copy_from_slice(&flags.to_le_bytes());
        a.list[2..4].copy_from_slice(&(entries as u16).to_le_bytes());
        a.list[8..16].copy_from_slice(&(a.table.as_ptr() as u64).to_le_bytes());
        a.table.fill(0);
        let fis = &mut a.table[..20];
        fis[0] = 0x27;
        fis[1] = 0x80;
        fis[2] = command;
        fis[4] = lba as u8;
        fis[5] = (lba >> 8) as u8;
        fis[6] = (lba >> 16) as u8;
        fis[7] = 0x40;
        fis[8] = (lba >> 24) as u8;
        fis[9] = (lba >> 32) as u8;
        fis[10] = (lba >> 40) as u8;
        fis[12] = count as u8;
        fis[13] = (count >> 8) as u8;
        if let Some(p) = packet {
            // DMA for the data of the packet command.
            a.table[3] = 1;
            a.table[0x40..0x40 + p.len()].copy_from_slice(p);
        }
        let data = a.data.as_ptr() as u64;
        for i in 0..entries {
            let len = (bytes - i as u64 * PRD_BYTES).min(PRD_BYTES);
            let e = &mut a.table[0x80 + 16 * i..0x80 + 16 * (i + 1)];
            e[0..8].copy_from_slice(&(data + i as u64 * PRD_BYTES).to_le_bytes());
            e[12..16].copy_from_slice(&(len as u32 - 1).to_le_bytes());
        }
        compiler_fence(Ordering::SeqCst);
    }

    /// An ATAPI command; after a CHECK CONDITION (unit attention after power-on, say) the
    /// port restarts, REQUEST SENSE clears the condition and the command runs again, up to
    /// three times. Returns PxTFD of the last try.
    fn packet(&self, cdb: &[u8], bytes: u64) -> Option<u32> {
        let mut tfd = None;
        for _ in 0..3 {
            tfd = self.run(PACKET, 0, 0, Some(cdb), bytes, false);
            match tfd {
                Some(t) if t & 1 != 0 => {
                    self.start();
                    self.run(
                        PACKET,
                        0,
                        0,
                        Some(&[SCSI_REQUEST_SENSE, 0, 0, 0, 18]),
                        18,
                        false,
                    );
                }
                _ => return tfd,
            }
        }
        tfd
    }
}

/// "ok" when the status shows no error, else the TFD in hex.
fn status(tfd: Option<u32>) -> Status {
    Status(tfd)
}

struct Status(Option<u32>);

impl core::fmt::Display for Status {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(t) if t & 0x89 == 0 => f.write_str("ok"),
            Some(t) => write!(f, "error tfd 0x{t:x}"),
            None => f.write_str("timeout"),
        }
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

/// An ATA string: bytes swapped in each word, trailing spaces dropped.
fn ata_string(words: &[u8]) -> ([u8; 40], usize) {
    let mut s = [0u8; 40];
    let n = words.len().min(40);
    for i in 0..n {
        s[i] = words[i ^ 1];
    }
    let mut len = n;
    while len > 0 && s[len - 1] == b' ' {
        len -= 1;
    }
    (s, len)
}

/// The AHCI commands; false for any other command.
pub fn run(command: &str, line: &str) -> bool {
    if command != "ahci" {
        return false;
    }
    let (args, n) = crate::arguments(line);
    ahci(&args[..n]);
    true
}

pub fn help() {
    println!("  ahci info             IDENTIFY the first AHCI disk, READ CAPACITY of the first CD");
    println!("  ahci write <s> <n> <seed>  WRITE DMA EXT of n sectors of pattern <seed> at s");
    println!("  ahci read <s> <n>     READ DMA EXT of n sectors at s, print their checksum");
    println!("  ahci qwrite|qread ... as write and read, with WRITE/READ FPDMA QUEUED (NCQ)");
    println!("  ahci flush            FLUSH CACHE EXT");
    println!("  ahci cdread <f> <n>   ATAPI READ(10) of n 2048-byte frames at f, checksum");
    println!("  ahci stream <n>       rewrite and check sectors 0..n until input");
    println!("  ahci bench read|write <n> <ms>  n-sector DMA commands in a row for ms, timed");
}

fn sectors_arg(arg: &str, unit: u64) -> Option<u64> {
    parse_u64(arg).filter(|n| *n >= 1 && n * unit <= DATA_BYTES as u64)
}

fn disk() -> Option<Port> {
    let port = Port::find(SIG_ATA);
    match port {
        Some(p) if p.start() => Some(p),
        _ => {
            println!("ahci: no disk");
            None
        }
    }
}

fn ahci(args: &[&str]) {
    match args {
        ["info"] => info(),
        [op @ ("write" | "qwrite"), s, n, seed] => {
            let (Some(s), Some(n), Some(seed)) =
                (parse_u64(s), sectors_arg(n, SECTOR), parse_u64(seed))
            else {
                println!("usage: ahci {op} <sector> <count 1..128> <seed>");
                return;
            };
            let Some(p) = disk() else { return };
            fill(n * SECTOR, seed);
            let sum = checksum(n * SECTOR);
            let tfd = p.transfer(*op == "qwrite", true, s, n);
            println!("ahci {op} {s} {n} {} fnv 0x{sum:016x}", status(tfd));
        }
        [op @ ("read" | "qread"), s, n] => {
            let (Some(s), Some(n)) = (parse_u64(s), sectors_arg(n, SECTOR)) else {
                println!("usage: ahci {op} <sector> <count 1..128>");
                return;
            };
            let Some(p) = disk() else { return };
            area().data.fill(0);
            let tfd = p.transfer(*op == "qread", false, s, n);
            println!(
                "ahci {op} {s} {n} {} fnv 0x{:016x}",
                status(tfd),
                checksum(n * SECTOR)
            );
        }
        ["flush"] => {
            let Some(p) = disk() else { return };
            let tfd = p.run(FLUSH_CACHE_EXT, 0, 0, None, 0, false);
            println!("ahci flush {}", status(tfd));
        }
        ["cdread", f, n] => {
            let (Some(f), Some(n)) = (parse_u64(f), sectors_arg(n, CD_SECTOR)) else {
                println!("usage: ahci cdread <frame> <count 1..32>");
                return;
            };
            let Some(p) = Port::find(SIG_ATAPI).filter(|p| p.start()) else {
                println!("ahci: no cd");
                return;
            };
            area().data.fill(0);
            let lba = (f as u32).to_be_bytes();
            let count = (n as u16).to_be_bytes();
            let cdb = [
                SCSI_READ_10,
                0,
                lba[0],
                lba[1],
                lba[2],
                lba[3],
                0,
                count[0],
                count[1],
                0,
                0,
                0,
            ];
            let tfd = p.packet(&cdb, n * CD_SECTOR);
            println!(
                "ahci cdread {f} {n} {} fnv 0x{:016x}",
                status(tfd),
                checksum(n * CD_SECTOR)
            );
        }
        ["stream", n] => match sectors_arg(n, SECTOR) {
            Some(n) => {
                if let Some(p) = disk() {
                    stream(&p, n);
                }
            }
            None => println!("usage: ahci stream <count 1..128>"),
        },
        ["bench", op @ ("read" | "write"), n, ms] => {
            match (sectors_arg(n, SECTOR), parse_u64(ms)) {
                (Some(n), Some(ms)) if (1..=60_000).contains(&ms) => {
                    if let Some(p) = disk() {
                        bench(&p, *op == "write", n, ms);
                    }
                }
                _ => println!("usage: ahci bench read|write <count 1..128> <ms 1..60000>"),
            }
        }
        _ => println!("usage: ahci info|write|read|qwrite|qread|flush|cdread|stream|bench"),
    }
}

/// IDENTIFY DEVICE into the data area: its status and the 48-bit sector count.
fn identify(p: &Port) -> (Option<u32>, u64) {
    area().data[..512].fill(0);
    let tfd = p.run(ATA_IDENTIFY, 0, 0, None, 512, false);
    let d = &area().data;
    let word = |w: usize| u64::from(u16::from_le_bytes([d[2 * w], d[2 * w + 1]]));
    let sectors = word(100) | (word(101) << 16) | (word(102) << 32) | (word(103) << 48);
    (tfd, sectors)
}

fn info() {
    if let Some(p) = disk() {
        let (tfd, sectors) = identify(&p);
        let d = &area().data;
        let (model, len) = ata_string(&d[54..94]);
        let model = core::str::from_utf8(&model[..len]).unwrap_or("?");
        println!("ahci hd {} sectors {sectors} model '{model}'", status(tfd));
    }
    match Port::find(SIG_ATAPI).filter(|p| p.start()) {
        Some(p) => {
            area().data[..8].fill(0);
            let tfd = p.packet(&[SCSI_READ_CAPACITY, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
            let d = &area().data;
            let last = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
            let size = u32::from_be_bytes([d[4], d[5], d[6], d[7]]);
            println!("ahci cd {} last {last} block {size}", status(tfd));
        }
        None => println!("ahci: no cd"),
    }
}

/// Sequential READ/WRITE DMA EXT of `count` sectors from sector 0 on, wrapping at the end of
/// the disk, back to back for `ms` of guest time: `ahci bench <op> <count> requests <n> bytes
/// <n> ns <n> errors <n>`. Writes send the pattern of seed 1 over and over.
fn bench(p: &Port, write: bool, count: u64, ms: u64) {
    let (_, sectors) = identify(p);
    if sectors < count {
        println!("ahci bench: the disk has {sectors} sectors");
        return;
    }
    if write {
        fill(count * SECTOR, 1);
    }
    let op = if write { "write" } else { "read" };
    let mut lba = 0;
    crate::clock::run_for(
        format_args!("ahci bench {op} {count}"),
        ms,
        count * SECTOR,
        || {
            if lba + count > sectors {
                lba = 0;
            }
            let tfd = p.transfer(false, write, lba, count);
            lba += count;
            matches!(tfd, Some(t) if t & 0x89 == 0)
        },
    );
}

/// Rewrite sectors 0..count with seed = round, round after round, reading each round back;
/// one input byte ends it.
fn stream(p: &Port, count: u64) {
    let bytes = count * SECTOR;
    let mut round = 0u64;
    let mut errors = 0u64;
    println!("ahci stream started");
    while crate::console::try_read_byte().is_none() {
        round += 1;
        fill(bytes, round);
        let expected = checksum(bytes);
        let written = status(p.run(WRITE_DMA_EXT, 0, count as u16, None, bytes, true));
        area().data[..bytes as usize].fill(0);
        let read = status(p.run(READ_DMA_EXT, 0, count as u16, None, bytes, false));
        let good = |s: &Status| matches!(s.0, Some(t) if t & 0x89 == 0);
        if !good(&written) || !good(&read) || checksum(bytes) != expected {
            errors += 1;
            if errors <= 4 {
                println!("ahci stream error round {round} {written}/{read}");
                p.start();
            }
        }
        if round.is_multiple_of(100) {
            println!("ahci stream round {round}");
        }
        svc::rx_poll();
    }
    println!("ahci stream stopped round {round} errors {errors}");
}
