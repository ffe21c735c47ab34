//! An e1000 (82545EM, 8086:100f) driver for the test guest, polled: one transmit and one
//! receive ring of 8 legacy descriptors. Registers are reached through memory BAR 0, which
//! lies in the uncached, user-accessible top GiB of the identity map (QEMU's I/O BAR of this
//! card is a stub, so IOADDR/IODATA would not do for the oracle). The MAC
//! address is read from the EEPROM by clocking EECD (Microwire), as the drivers of this card
//! do. See ../README.md for the commands and their output.

use core::ptr::{addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{compiler_fence, Ordering};

use crate::pcicfg::Access;
use crate::virtq::fnv1a;
use crate::vnet::{arp, bench, echo, mac_text, recv, Link, BUFFER, TEST_TYPE};
use crate::{parse_u64, splitmix64};

const VENDOR_INTEL: u32 = 0x8086;
const DEVICE_82545EM: u32 = 0x100f;

const CTRL: u32 = 0x0000;
const STATUS: u32 = 0x0008;
const EECD: u32 = 0x0010;
const RCTL: u32 = 0x0100;
const TCTL: u32 = 0x0400;
const IMC: u32 = 0x00d8;
const RDBAL: u32 = 0x2800;
const RDBAH: u32 = 0x2804;
const RDLEN: u32 = 0x2808;
const RDH: u32 = 0x2810;
const RDT: u32 = 0x2818;
const TDBAL: u32 = 0x3800;
const TDBAH: u32 = 0x3804;
const TDLEN: u32 = 0x3808;
const TDH: u32 = 0x3810;
const TDT: u32 = 0x3818;
const RAL0: u32 = 0x5400;
const RAH0: u32 = 0x5404;

const CTRL_SLU: u32 = 0x40;
const STATUS_LU: u32 = 0x02;
const EECD_SK: u32 = 0x01;
const EECD_CS: u32 = 0x02;
const EECD_DI: u32 = 0x04;
const EECD_DO: u32 = 0x08;
const EECD_REQ: u32 = 0x40;
const EECD_GNT: u32 = 0x80;
const RCTL_EN: u32 = 0x02;
const RCTL_UPE: u32 = 0x08;
const RCTL_BAM: u32 = 0x8000;
const RCTL_SECRC: u32 = 0x0400_0000;
const TCTL_EN: u32 = 0x02;
const TCTL_PSP: u32 = 0x08;
const RAH_AV: u32 = 0x8000_0000;

const TXD_EOP: u32 = 0x0100_0000;
const TXD_IFCS: u32 = 0x0200_0000;
const TXD_RS: u32 = 0x0800_0000;
const TXD_DEXT: u32 = 0x2000_0000;
const TXD_DTYP_D: u32 = 0x0010_0000;
const TXD_TSE: u32 = 0x0400_0000;
const TXD_TCP: u32 = 0x0100_0000;
const TXD_IP: u32 = 0x0200_0000;
const POPTS_IXSM: u32 = 0x01 << 8;
const POPTS_TXSM: u32 = 0x02 << 8;
const DD: u8 = 0x01;
const EOP: u8 = 0x02;

const EEPROM_READ: u32 = 0x6 << 6;

const RING: usize = 8;
/// The TSO test's payload and segment size.
const TSO_PAYLOAD: usize = 2500;
const TSO_MSS: usize = 1000;

#[repr(C, align(4096))]
struct Area {
    tx_ring: [[u8; 16]; RING],
    rx_ring: [[u8; 16]; RING],
    rx: [[u8; BUFFER]; RING],
    tx: [u8; 4096],
}

static mut AREA: Area = Area {
    tx_ring: [[0; 16]; RING],
    rx_ring: [[0; 16]; RING],
    rx: [[0; BUFFER]; RING],
    tx: [0; 4096],
};

struct Nic {
    /// Physical (= virtual) address of the register BAR.
    registers: u64,
    area: *mut Area,
    mac: [u8; 6],
    eeprom_sum: u16,
    tx_next: usize,
    rx_next: usize,
}

fn find() -> Option<(u32, u32)> {
    let access = Access::Conf1;
    (0..32).find_map(|dev| {
        let id = access.read(dev, 0, 0);
        (id & 0xffff == VENDOR_INTEL && id >> 16 == DEVICE_82545EM).then_some((dev, 0))
    })
}

impl Nic {
    fn write(&self, register: u32, value: u32) {
        // SAFETY: a register of BAR 0, checked at open to lie in the uncached top GiB of the
        // identity map.
        unsafe { write_volatile((self.registers + u64::from(register)) as *mut u32, value) }
    }

    fn read(&self, register: u32) -> u32 {
        // SAFETY: as in `write`.
        unsafe { read_volatile((self.registers + u64::from(register)) as *const u32) }
    }

    fn area(&self) -> &mut Area {
        // SAFETY: the static area this driver owns; single-threaded shell.
        unsafe { &mut *self.area }
    }

    /// One EEPROM word, clocked out bit by bit.
    fn eeprom_word(&self, address: u32) -> u16 {
        let set = |value: u32| self.write(EECD, value);
        let mut eecd = EECD_REQ;
        set(eecd);
        for _ in 0..1000 {
            if self.read(EECD) & EECD_GNT != 0 {
                break;
            }
        }
        eecd |= EECD_CS;
        set(eecd);
        let command = EEPROM_READ | (address & 0x3f);
        for bit in (0..9).rev() {
            eecd = if command & (1 << bit) != 0 {
                eecd | EECD_DI
            } else {
                eecd & !EECD_DI
            };
            set(eecd);
            set(eecd | EECD_SK);
            set(eecd);
        }
        eecd &= !EECD_DI;
        let mut word = 0u16;
        for _ in 0..16 {
            set(eecd | EECD_SK);
            word = word << 1 | u16::from(self.read(EECD) & EECD_DO != 0);
            set(eecd);
        }
        set(0);
        word
    }

    /// Find the card, switch on memory decoding and bus mastering, read the EEPROM, set up
    /// both rings and start them.
    fn open() -> Option<Nic> {
        let (dev, func) = find()?;
        let access = Access::Conf1;
        let command = access.read(dev, func, 0x04) & 0xffff;
        access.write(dev, func, 0x04, command | 0x2 | 0x4);
        let bar0 = access.read(dev, func, 0x10);
        let registers = u64::from(bar0 & !0xf);
        // Memory, 32-bit, inside the uncached top GiB of the identity map.
        if bar0 & 0x7 != 0 || !(0xc000_0000..=0xffff_0000 - 0x2_0000).contains(&registers) {
            println!("e1000: BAR 0 {bar0:#x} is not a 32-bit memory BAR in the top GiB");
            return None;
        }
        let mut nic = Nic {
            registers,
            area: addr_of_mut!(AREA),
            mac: [0; 6],
            eeprom_sum: 0,
            tx_next: 0,
            rx_next: 0,
        };
        nic.write(RCTL, 0);
        nic.write(TCTL, 0);
        nic.write(IMC, !0);
        let mut sum = 0u16;
        for address in 0..64 {
            let word = nic.eeprom_word(address);
            if address < 3 {
                let [low, high] = word.to_le_bytes();
                nic.mac[2 * address as usize] = low;
                nic.mac[2 * address as usize + 1] = high;
            }
            sum = sum.wrapping_add(word);
        }
        nic.eeprom_sum = sum;
        nic.write(CTRL, nic.read(CTRL) | CTRL_SLU);
        let mac = nic.mac;
        nic.write(RAL0, u32::from_le_bytes([mac[0], mac[1], mac[2], mac[3]]));
        nic.write(RAH0, RAH_AV | u32::from(mac[5]) << 8 | u32::from(mac[4]));
        let area = nic.area();
        let tx_ring = area.tx_ring.as_ptr() as u64;
        let rx_ring = area.rx_ring.as_ptr() as u64;
        area.tx_ring = [[0; 16]; RING];
        for i in 0..RING {
            let address = area.rx[i].as_ptr() as u64;
            area.rx_ring[i] = [0; 16];
            area.rx_ring[i][..8].copy_from_slice(&address.to_le_bytes());
        }
        compiler_fence(Ordering::SeqCst);
        nic.write(TDBAL, tx_ring as u32);
        nic.write(TDBAH, (tx_ring >> 32) as u32);
        nic.write(TDLEN, (RING * 16) as u32);
        nic.write(TDH, 0);
        nic.write(TDT, 0);
        nic.write(TCTL, TCTL_EN | TCTL_PSP);
        nic.write(RDBAL, rx_ring as u32);
        nic.write(RDBAH, (rx_ring >> 32) as u32);
        nic.write(RDLEN, (RING * 16) as u32);
        nic.write(RDH, 0);
        nic.write(RDT, (RING - 1) as u32);
        nic.write(RCTL, RCTL_EN | RCTL_UPE | RCTL_BAM | RCTL_SECRC);
        Some(nic)
    }

    /// Queue one descriptor; with `wait`, send it and wait until the card reports it done.
    fn descriptor(&mut self, address: u64, lower: u32, upper: u32, wait: bool) -> bool {
        let index = self.tx_next;
        let descriptor = &mut self.area().tx_ring[index];
        descriptor[..8].copy_from_slice(&address.to_le_bytes());
        descriptor[8..12].copy_from_slice(&lower.to_le_bytes());
        descriptor[12..16].copy_from_slice(&upper.to_le_bytes());
        self.tx_next = (index + 1) % RING;
        if !wait {
            return true;
        }
        compiler_fence(Ordering::SeqCst);
        self.write(TDT, self.tx_next as u32);
        let status = addr_of_mut!(self.area().tx_ring[index][12]);
        for _ in 0..200_000_000u64 {
            // SAFETY: a byte of the static ring, which the card writes by DMA.
            if unsafe { read_volatile(status) } & DD != 0 {
                return true;
            }
            core::hint::spin_loop();
        }
        false
    }
}

impl Link for Nic {
    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Send `frame` with one legacy descriptor.
    fn send(&mut self, frame: &[u8]) -> bool {
        let area = self.area();
        area.tx[..frame.len()].copy_from_slice(frame);
        let address = area.tx.as_ptr() as u64;
        self.descriptor(
            address,
            frame.len() as u32 | TXD_EOP | TXD_IFCS | TXD_RS,
            0,
            true,
        )
    }

    /// The next received frame, copied to `out`; the descriptor goes back to the card.
    fn receive(&mut self, out: &mut [u8; BUFFER]) -> Option<usize> {
        let index = self.rx_next;
        let status = addr_of_mut!(self.area().rx_ring[index][12]);
        // SAFETY: a byte of the static ring, which the card writes by DMA.
        let done = unsafe { read_volatile(status) };
        if done & DD == 0 {
            return None;
        }
        compiler_fence(Ordering::SeqCst);
        let descriptor = self.area().rx_ring[index];
        let length = usize::from(u16::from_le_bytes([descriptor[8], descriptor[9]])).min(BUFFER);
        out[..length].copy_from_slice(&self.area().rx[index][..length]);
        // SAFETY: as above.
        unsafe { write_volatile(status, 0) };
        compiler_fence(Ordering::SeqCst);
        self.write(RDT, index as u32);
        self.rx_next = (index + 1) % RING;
        // One buffer per frame here: a frame spanning two would not be a test frame.
        (done & EOP != 0).then_some(length)
    }
}

/// The test frame `send` and `vnet send` build: broadcast, from `mac`, type 0x88b5, then
/// splitmix64 words from `seed`.
fn test_frame(frame: &mut [u8], mac: &[u8; 6], seed: u64) {
    frame[..6].fill(0xff);
    frame[6..12].copy_from_slice(mac);
    frame[12..14].copy_from_slice(&TEST_TYPE);
    let mut state = seed;
    for chunk in frame[14..].chunks_mut(8) {
        let word = splitmix64(&mut state).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
}

/// A broadcast IPv4 packet from 10.0.2.15 to 10.0.2.255 of `l4_len` bytes of protocol
/// `protocol` after a 20-byte header whose checksum is left zero (the card fills it in), the
/// L4 header zeroed but for ports and the pseudo-header sum the card's offload expects.
fn ip_packet(frame: &mut [u8], mac: &[u8; 6], protocol: u8, l4_len: usize, seed: u64) {
    test_frame(frame, mac, seed);
    frame[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut frame[14..34];
    ip.fill(0);
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&(seed as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = protocol;
    ip[12..16].copy_from_slice(&[10, 0, 2, 15]);
    ip[16..20].copy_from_slice(&[10, 0, 2, 255]);
}

/// The ones'-complement sum of big-endian words, folded.
fn internet_sum(data: &[u8], mut sum: u32) -> u16 {
    let mut chunks = data.chunks_exact(2);
    for pair in &mut chunks {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Pseudo-header sum (addresses and protocol; the length when `length` is given).
fn pseudo_sum(frame: &[u8], protocol: u8, length: Option<u16>) -> u16 {
    let mut sum = u32::from(protocol) + u32::from(length.unwrap_or(0));
    for pair in frame[26..34].chunks_exact(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    internet_sum(&[], sum)
}

/// A context descriptor: IP checksum over 14..33 stored at 24, L4 checksum from 34 stored at
/// `l4_offset`; `command` and `seg` (header length, MSS) for segmentation.
fn context(nic: &mut Nic, l4_offset: u32, command: u32, seg: u32) {
    let ip: u32 = 14 | 24 << 8 | 33 << 16;
    let l4 = 34 | l4_offset << 8;
    nic.descriptor(
        u64::from(ip) | u64::from(l4) << 32,
        command | TXD_DEXT,
        seg,
        false,
    );
}

/// A UDP packet whose IP and UDP checksums the card computes.
fn offload(nic: &mut Nic, seed: u64) -> bool {
    let length = 200usize;
    let mac = nic.mac;
    let area = nic.area();
    let frame = &mut area.tx[..14 + 20 + length];
    ip_packet(frame, &mac, 17, length, seed);
    frame[34..36].copy_from_slice(&1234u16.to_be_bytes());
    frame[36..38].copy_from_slice(&5678u16.to_be_bytes());
    frame[38..40].copy_from_slice(&(length as u16).to_be_bytes());
    let pseudo = pseudo_sum(frame, 17, Some(length as u16));
    frame[40..42].copy_from_slice(&pseudo.to_be_bytes());
    let address = area.tx.as_ptr() as u64;
    let total = (14 + 20 + length) as u32;
    context(nic, 40, 0, 0);
    nic.descriptor(
        address,
        total | TXD_DEXT | TXD_DTYP_D | TXD_EOP | TXD_IFCS | TXD_RS,
        POPTS_IXSM | POPTS_TXSM,
        true,
    )
}

/// A TCP segment of `TSO_PAYLOAD` bytes the card cuts into `TSO_MSS`-byte segments.
fn tso(nic: &mut Nic, seed: u64) -> bool {
    let header = 54usize;
    let mac = nic.mac;
    let area = nic.area();
    let frame = &mut area.tx[..header + TSO_PAYLOAD];
    ip_packet(frame, &mac, 6, 20 + TSO_PAYLOAD, seed);
    let tcp = &mut frame[34..54];
    tcp.fill(0);
    tcp[0..2].copy_from_slice(&1234u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&(seed as u32).to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // PSH, ACK
    tcp[14..16].copy_from_slice(&1024u16.to_be_bytes());
    // With TSO the driver leaves the pseudo-header sum without the length.
    let pseudo = pseudo_sum(frame, 6, None);
    frame[50..52].copy_from_slice(&pseudo.to_be_bytes());
    let address = area.tx.as_ptr() as u64;
    context(
        nic,
        50,
        TSO_PAYLOAD as u32 | TXD_TSE | TXD_TCP | TXD_IP,
        (header as u32) << 8 | (TSO_MSS as u32) << 16,
    );
    let data = TXD_DEXT | TXD_DTYP_D | TXD_TSE | TXD_IFCS;
    nic.descriptor(
        address,
        header as u32 | data,
        POPTS_IXSM | POPTS_TXSM,
        false,
    );
    nic.descriptor(
        address + header as u64,
        TSO_PAYLOAD as u32 | data | TXD_EOP | TXD_RS,
        POPTS_IXSM | POPTS_TXSM,
        true,
    )
}

pub fn run(command: &str, line: &str) -> bool {
    if command != "e1000" {
        return false;
    }
    let mut words = line.split_ascii_whitespace().skip(1);
    let sub = words.next();
    let (word1, word2, word3) = (words.next(), words.next(), words.next());
    let arg1 = word1.and_then(parse_u64);
    let arg2 = word2.and_then(parse_u64);
    let Some(mut nic) = Nic::open() else {
        println!("e1000: no 82545EM card");
        return true;
    };
    let mut frame = [0u8; BUFFER];
    match (sub, arg1, arg2) {
        (Some("bench"), _, _) => bench(&mut nic, &mut frame, "e1000", word1, word2, word3),
        (Some("info"), _, _) => {
            let mut up = false;
            for _ in 0..100_000 {
                if nic.read(STATUS) & STATUS_LU != 0 {
                    up = true;
                    break;
                }
            }
            println!(
                "e1000 mac {} eeprom-sum 0x{:04x} link {}",
                mac_text(&nic.mac),
                nic.eeprom_sum,
                if up { "up" } else { "down" }
            );
        }
        (Some("send"), Some(len), Some(seed)) if (60..=1514).contains(&len) => {
            let len = len as usize;
            test_frame(&mut frame[..len], &nic.mac, seed);
            let ok = nic.send(&frame[..len]);
            println!(
                "e1000 sent {len} {} fnv 0x{:016x}",
                if ok { "ok" } else { "timeout" },
                fnv1a(&frame[..len])
            );
        }
        (Some("offload"), Some(seed), _) => {
            let ok = offload(&mut nic, seed);
            println!("e1000 offload {}", if ok { "ok" } else { "timeout" });
        }
        (Some("tso"), Some(seed), _) => {
            let ok = tso(&mut nic, seed);
            println!("e1000 tso {}", if ok { "ok" } else { "timeout" });
        }
        (Some("recv"), _, _) => {
            // Setting the card up takes a while where each register access is emulated: say
            // when a frame sent now will be taken.
            println!("e1000 recv waiting");
            recv(&mut nic, &mut frame, "e1000");
        }
        (Some("echo"), _, _) => echo(&mut nic, &mut frame, "e1000"),
        (Some("arp"), _, _) => arp(&mut nic, &mut frame, "e1000"),
        _ => {
            println!(
                "usage: e1000 info|send <len> <seed>|offload <seed>|tso <seed>|recv|echo|arp|bench"
            )
        }
    }
    // Leave the card quiet: no DMA into the rings once the command is over.
    nic.write(RCTL, 0);
    nic.write(TCTL, 0);
    true
}

pub fn help() {
    println!(
        "  e1000 info            find the e1000, print MAC (from the EEPROM), EEPROM sum, link"
    );
    println!("  e1000 send <len> <seed>  send a broadcast test frame (type 0x88b5)");
    println!("  e1000 offload <seed>  send a UDP packet whose IP and UDP checksums the card fills");
    println!("  e1000 tso <seed>      send 2500 TCP bytes the card cuts into 1000-byte segments");
    println!("  e1000 recv            wait for a test frame, print its length and checksum");
    println!("  e1000 echo            return test frames to their sender until input");
    println!("  e1000 bench send <len> <ms> | e1000 bench recv  as vnet bench");
    println!("  e1000 arp             ARP for 10.0.2.2 from 10.0.2.15, print the answer");
}
