//! e1000 against a driver written here from the 82540/82545 software developer's manual, with
//! a backend whose other end the test holds. Checksums are checked against values computed
//! independently (published examples, and a sum over the pseudo-header built here).

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use super::*;
use crate::devices::net::pair_backend::socket_pair_backend;
use crate::devices::pci::irq::IntxState;

const MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
const MEMORY: u64 = 4 << 20;
const TX_RING: u64 = 0x10000;
const RX_RING: u64 = 0x20000;
const TX_BUFFERS: u64 = 0x40000;
const RX_BUFFERS: u64 = 0x100000;
const RING_SIZE: u16 = 8;

struct Rig {
    card: E1000,
    memory: Arc<GuestMemory>,
    intx: Arc<IntxLine>,
    host: UnixDatagram,
    config: ConfigSpace,
}

fn rig() -> Rig {
    let memory = Arc::new(GuestMemory::new(MEMORY).unwrap());
    rig_on(memory)
}

fn rig_on(memory: Arc<GuestMemory>) -> Rig {
    let (backend, host) = socket_pair_backend();
    let intx = Arc::new(IntxLine::default());
    let card = E1000::new(
        MAC,
        Some(backend),
        memory.clone(),
        intx.clone(),
        "e1000 test",
    )
    .unwrap();
    Rig {
        card,
        memory,
        intx,
        host,
        config: ConfigSpace::new(true),
    }
}

impl Rig {
    fn read(&mut self, offset: u32) -> u32 {
        let mut data = [0u8; 4];
        self.card
            .bar_read(&self.config, REGISTER_BAR, u64::from(offset), &mut data);
        u32::from_le_bytes(data)
    }

    fn write(&mut self, offset: u32, value: u32) {
        self.card.bar_write(
            &self.config,
            REGISTER_BAR,
            u64::from(offset),
            &value.to_le_bytes(),
        );
    }

    fn setup_tx(&mut self) {
        self.write(reg::TDBAL, TX_RING as u32);
        self.write(reg::TDBAH, 0);
        self.write(reg::TDLEN, u32::from(RING_SIZE) * 16);
        self.write(reg::TDH, 0);
        self.write(reg::TDT, 0);
        self.write(reg::TCTL, TCTL_EN);
    }

    /// Post `RING_SIZE - 1` receive buffers of 2048 bytes.
    fn setup_rx(&mut self, rctl: u32) {
        for i in 0..u64::from(RING_SIZE) {
            let d = RX_RING + i * 16;
            self.memory.write_u64(d, RX_BUFFERS + i * 0x4000).unwrap();
            self.memory.write(d + 8, &[0u8; 8]).unwrap();
        }
        self.write(reg::RDBAL, RX_RING as u32);
        self.write(reg::RDBAH, 0);
        self.write(reg::RDLEN, u32::from(RING_SIZE) * 16);
        self.write(reg::RDH, 0);
        self.write(reg::RDT, u32::from(RING_SIZE) - 1);
        self.write(reg::RCTL, RCTL_EN | rctl);
    }

    /// Write a descriptor at ring index `index`.
    fn tx_descriptor(&self, index: u16, address: u64, lower: u32, upper: u32) {
        let d = TX_RING + u64::from(index) * 16;
        self.memory.write_u64(d, address).unwrap();
        self.memory.write(d + 8, &lower.to_le_bytes()).unwrap();
        self.memory.write(d + 12, &upper.to_le_bytes()).unwrap();
    }

    /// A legacy descriptor for `frame` (copied to a buffer), ending the frame.
    fn legacy(&self, index: u16, frame: &[u8], extra: u32, upper: u32) {
        let buffer = TX_BUFFERS + u64::from(index) * 0x2000;
        self.memory.write(buffer, frame).unwrap();
        self.tx_descriptor(
            index,
            buffer,
            frame.len() as u32 | TXD_CMD_EOP | TXD_CMD_IFCS | TXD_CMD_RS | extra,
            upper,
        );
    }

    fn expect_frame(&self) -> Vec<u8> {
        let mut buffer = vec![0u8; 65536];
        let n = self.host.recv(&mut buffer).expect("a frame from the card");
        buffer.truncate(n);
        buffer
    }

    fn expect_nothing(&self) {
        self.host
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buffer = vec![0u8; 65536];
        assert!(self.host.recv(&mut buffer).is_err(), "no frame expected");
        self.host
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
    }

    fn wait_for(&mut self, what: &str, mut done: impl FnMut(&mut Rig) -> bool) {
        let start = Instant::now();
        while !done(self) {
            assert!(
                start.elapsed() < Duration::from_secs(3),
                "timed out: {what}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Read the EEPROM word at `address` by clocking EECD as the Microwire protocol says.
    fn eeprom_word(&mut self, address: u16) -> u16 {
        let mut eecd = EECD_REQ | EECD_CS;
        self.write(reg::EECD, eecd);
        assert_ne!(self.read(reg::EECD) & EECD_GNT, 0, "access granted");
        let command = NVM_OPCODE_READ | address;
        for bit in (0..9).rev() {
            eecd = if command & (1 << bit) != 0 {
                eecd | EECD_DI
            } else {
                eecd & !EECD_DI
            };
            self.write(reg::EECD, eecd);
            self.write(reg::EECD, eecd | EECD_SK);
            self.write(reg::EECD, eecd);
        }
        let mut word = 0u16;
        for _ in 0..16 {
            self.write(reg::EECD, eecd | EECD_SK);
            word = word << 1 | u16::from(self.read(reg::EECD) & EECD_DO != 0);
            self.write(reg::EECD, eecd);
        }
        self.write(reg::EECD, 0);
        word
    }
}

/// An IPv4 header whose checksum is published (Wikipedia's "IPv4 header checksum" example):
/// 0xb861.
const IPV4_EXAMPLE: [u8; 20] = [
    0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01,
    0xc0, 0xa8, 0x00, 0xc7,
];

fn ethernet(ethertype: u16) -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&MAC);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame
}

#[test]
fn eeprom_holds_the_mac_address_ids_and_checksum() {
    let mut rig = rig();
    let words: Vec<u16> = (0..EEPROM_WORDS as u16)
        .map(|a| rig.eeprom_word(a))
        .collect();
    assert_eq!(words[0].to_le_bytes(), [MAC[0], MAC[1]]);
    assert_eq!(words[1].to_le_bytes(), [MAC[2], MAC[3]]);
    assert_eq!(words[2].to_le_bytes(), [MAC[4], MAC[5]]);
    assert_eq!(words[NVM_DEV_ID], 0x100f);
    assert_eq!(words[NVM_VEN_ID], 0x8086);
    assert_eq!(words[NVM_SUB_DEV_ID], 0x1008);
    assert_eq!(
        words.iter().fold(0u16, |a, &w| a.wrapping_add(w)),
        0xbaba,
        "the e1000 drivers' EEPROM checksum rule"
    );
}

#[test]
fn registers_after_reset_phy_and_receive_address() {
    let mut rig = rig();
    assert_eq!(
        rig.read(reg::STATUS),
        STATUS_FD | STATUS_LU | STATUS_SPEED_1000
    );
    assert_eq!(rig.read(reg::EECD), EECD_PRES | 0x20);
    assert_eq!(rig.read(reg::LEDCTL), 0x0706_1302);
    assert_eq!(rig.read(reg::PBA), 0x0010_0030);
    assert_eq!(rig.read(reg::ITR), 250);
    assert_eq!(rig.read(reg::RXDCTL), 0x0101_0000);
    assert_eq!(
        rig.read(reg::RAL0),
        u32::from_le_bytes([MAC[0], MAC[1], MAC[2], MAC[3]])
    );
    assert_eq!(
        rig.read(reg::RAL0 + 4),
        RAH_AV | u32::from(MAC[5]) << 8 | u32::from(MAC[4])
    );
    // The PHY: an M88E1011 whose link is up.
    let mdic = |reg: u32| MDIC_OP_READ | reg << MDIC_REG_SHIFT | 1 << MDIC_PHY_SHIFT;
    rig.write(reg::MDIC, mdic(PHY_ID1));
    let id1 = rig.read(reg::MDIC);
    assert_ne!(id1 & MDIC_READY, 0);
    assert_eq!(id1 & 0xffff, 0x0141);
    rig.write(reg::MDIC, mdic(PHY_ID2));
    assert_eq!(rig.read(reg::MDIC) & 0xffff, 0x0c24);
    rig.write(reg::MDIC, mdic(PHY_STATUS));
    assert_ne!(rig.read(reg::MDIC) & 0x0004, 0, "link up");
    // Registers reach through the I/O BAR too.
    let config = ConfigSpace::new(true);
    rig.card
        .bar_write(&config, IO_BAR, IOADDR, &reg::MTA.to_le_bytes());
    rig.card
        .bar_write(&config, IO_BAR, IODATA, &0x1234_5678u32.to_le_bytes());
    assert_eq!(rig.read(reg::MTA), 0x1234_5678);
    // Accesses other than 32 bits do nothing.
    rig.card
        .bar_write(&config, REGISTER_BAR, u64::from(reg::MTA), &[0, 0]);
    assert_eq!(rig.read(reg::MTA), 0x1234_5678);
    // A software reset clears the interrupt mask and the receive address valid bits.
    rig.write(reg::IMS, 0xff);
    rig.write(reg::CTRL, CTRL_RST);
    assert_eq!(rig.read(reg::IMS), 0);
    assert_eq!(rig.read(reg::RAL0 + 4) & RAH_AV, 0);
    assert_eq!(rig.read(reg::CTRL) & CTRL_RST, 0);
}

#[test]
fn legacy_transmit_inserts_the_checksum_and_interrupts() {
    let mut rig = rig();
    rig.setup_tx();
    rig.write(reg::IMS, ICR_TXDW);
    let mut frame = ethernet(0x0800);
    frame.extend_from_slice(&IPV4_EXAMPLE);
    frame.extend_from_slice(&[0xab; 40]);
    // CSS 14 (IP header start), CSO 24 (its checksum), over the IP header only: the legacy
    // format sums to the end of the frame, so send the header alone.
    let header_only = &frame[..34];
    rig.legacy(0, header_only, TXD_CMD_IC | 24 << 16, 14 << 8);
    rig.write(reg::TDT, 1);
    let sent = rig.expect_frame();
    assert_eq!(sent.len(), 34);
    assert_eq!(sent[24..26], [0xb8, 0x61], "published checksum");
    rig.wait_for("TDH to advance", |r| r.read(reg::TDH) == 1);
    let status = rig.memory.slice(TX_RING + 12, 1).unwrap()[0];
    assert_eq!(u32::from(status) & TXD_STAT_DD, 1, "descriptor done");
    rig.wait_for("the interrupt", |r| r.intx.state() != IntxState::Idle);
    let icr = rig.read(reg::ICR);
    assert_eq!(icr & (ICR_TXDW | ICR_TXQE), ICR_TXDW | ICR_TXQE);
    assert_eq!(
        rig.intx.state(),
        IntxState::Idle,
        "ICR read lets go of INTx"
    );
    assert_eq!(rig.read(reg::ICR), 0, "ICR clears on read");
    assert_eq!(rig.read(reg::GPTC), 1);
    assert_eq!(rig.read(reg::BPTC), 1);
    // A frame without IFCS loses two bytes, as bhyve sends it.
    let buffer = TX_BUFFERS + 0x2000;
    rig.memory.write(buffer, &frame).unwrap();
    rig.tx_descriptor(1, buffer, frame.len() as u32 | TXD_CMD_EOP, 0);
    rig.write(reg::TDT, 2);
    assert_eq!(rig.expect_frame().len(), frame.len() - 2);
}

/// The TCP checksum of an IPv4 segment, pseudo-header included, computed here.
fn tcp_checksum_ok(packet: &[u8]) -> bool {
    let ihl = usize::from(packet[0] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    let segment = &packet[ihl..total];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&packet[12..20]);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(segment);
    internet_sum(&pseudo) == 0xffff
}

#[test]
fn tso_splits_tcp_into_segments_with_headers_fixed_up() {
    let mut rig = rig();
    rig.setup_tx();
    let mss = 1000u32;
    let payload: Vec<u8> = (0..2500u32).map(|i| (i * 7) as u8).collect();
    let mut header = ethernet(0x0800);
    let mut ip = IPV4_EXAMPLE;
    ip[9] = 6; // TCP
    ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    header.extend_from_slice(&ip);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&1000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1000_0000u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = TH_FIN | TH_PUSH | 0x10;
    // The driver puts the pseudo-header sum without the length in the TCP checksum field.
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&ip[12..20]);
    pseudo.extend_from_slice(&[0, 6]);
    tcp[16..18].copy_from_slice(&internet_sum(&pseudo).to_be_bytes());
    header.extend_from_slice(&tcp);
    let header_len = header.len() as u32; // 54
                                          // Context: IP checksum 14..33 at 24, TCP checksum from 34 at 50; TCP, IPv4, TSE.
    let context = [
        14 | 24 << 8 | 33 << 16,
        34 | 50 << 8,
        payload.len() as u32 | TXD_CMD_DEXT | TXD_CMD_TSE | TXD_CMD_TCP | TXD_CMD_IP,
        header_len << 8 | mss << 16,
    ];
    let d = TX_RING;
    rig.memory.write(d, &context[0].to_le_bytes()).unwrap();
    rig.memory.write(d + 4, &context[1].to_le_bytes()).unwrap();
    rig.memory.write(d + 8, &context[2].to_le_bytes()).unwrap();
    rig.memory.write(d + 12, &context[3].to_le_bytes()).unwrap();
    // Two data descriptors: the header, then the payload.
    let popts = u32::from(TXD_POPTS_IXSM | TXD_POPTS_TXSM) << 8;
    rig.memory.write(TX_BUFFERS, &header).unwrap();
    rig.memory.write(TX_BUFFERS + 0x1000, &payload).unwrap();
    let data = TXD_CMD_DEXT | TXD_DTYP_D | TXD_CMD_TSE;
    rig.tx_descriptor(1, TX_BUFFERS, header_len | data, popts);
    rig.tx_descriptor(
        2,
        TX_BUFFERS + 0x1000,
        payload.len() as u32 | data | TXD_CMD_EOP | TXD_CMD_IFCS | TXD_CMD_RS,
        popts,
    );
    rig.write(reg::TDT, 3);
    let mut received = Vec::new();
    for n in 0..3u32 {
        let segment = rig.expect_frame();
        let ip = &segment[14..];
        let length = if n < 2 { 1000 } else { 500 };
        assert_eq!(segment.len(), 54 + length);
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]) as usize, 40 + length);
        assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 0x1234 + n as u16);
        assert_eq!(
            internet_sum(&ip[..20]),
            0xffff,
            "IP checksum of segment {n}"
        );
        let seq = u32::from_be_bytes(ip[24..28].try_into().unwrap());
        assert_eq!(seq, 0x1000_0000 + n * mss);
        let flags = ip[33];
        if n < 2 {
            assert_eq!(flags & (TH_FIN | TH_PUSH), 0);
        } else {
            assert_eq!(flags & (TH_FIN | TH_PUSH), TH_FIN | TH_PUSH);
        }
        assert!(tcp_checksum_ok(ip), "TCP checksum of segment {n}");
        received.extend_from_slice(&segment[54..]);
    }
    assert_eq!(received, payload);
    rig.wait_for("TDH", |r| r.read(reg::TDH) == 3);
    assert_eq!(rig.read(reg::TSCTC), 1);
}

#[test]
fn receive_fills_descriptors_and_interrupts() {
    let mut rig = rig();
    rig.write(reg::IMS, ICR_RXT0);
    rig.setup_rx(RCTL_SECRC);
    let mut frame = ethernet(0x88b5);
    frame.extend((0..300u32).map(|i| i as u8));
    rig.host.send(&frame).unwrap();
    rig.wait_for("RDH", |r| r.read(reg::RDH) == 1);
    let d = rig.memory.slice(RX_RING, 16).unwrap().to_vec();
    assert_eq!(u16::from_le_bytes([d[8], d[9]]) as usize, frame.len());
    assert_eq!(
        d[12],
        RXD_STAT_DD | RXD_STAT_EOP | RXD_STAT_IXSM | RXD_STAT_PIF
    );
    assert_eq!(
        rig.memory.slice(RX_BUFFERS, frame.len() as u64).unwrap(),
        &frame[..]
    );
    rig.wait_for("INTx", |r| r.intx.state() != IntxState::Idle);
    assert_ne!(rig.read(reg::ICR) & ICR_RXT0, 0);
    assert_eq!(rig.read(reg::GPRC), 1);

    // Without SECRC the length counts the CRC; a short frame is padded to 60 bytes; a frame
    // longer than the buffer spans two descriptors.
    rig.write(reg::RCTL, RCTL_EN | 1 << 16); // 1024-byte buffers
    rig.host.send(&frame[..20]).unwrap();
    rig.wait_for("RDH", |r| r.read(reg::RDH) == 2);
    let d = rig.memory.slice(RX_RING + 16, 16).unwrap().to_vec();
    assert_eq!(u16::from_le_bytes([d[8], d[9]]), 64);
    let mut long = ethernet(0x88b5);
    long.extend((0..1400u32).map(|i| (i * 3) as u8));
    rig.host.send(&long).unwrap();
    rig.wait_for("RDH", |r| r.read(reg::RDH) == 4);
    let first = rig.memory.slice(RX_RING + 32, 16).unwrap().to_vec();
    let second = rig.memory.slice(RX_RING + 48, 16).unwrap().to_vec();
    assert_eq!(u16::from_le_bytes([first[8], first[9]]), 1024);
    assert_eq!(first[12], RXD_STAT_DD);
    assert_eq!(
        usize::from(u16::from_le_bytes([second[8], second[9]])),
        long.len() + 4 - 1024
    );
    assert_ne!(second[12] & RXD_STAT_EOP, 0);
    let mut got = rig
        .memory
        .slice(RX_BUFFERS + 2 * 0x4000, 1024)
        .unwrap()
        .to_vec();
    got.extend_from_slice(
        rig.memory
            .slice(RX_BUFFERS + 3 * 0x4000, (long.len() - 1024) as u64)
            .unwrap(),
    );
    assert_eq!(got, long);
}

#[test]
fn receive_without_room_drops_and_counts() {
    let mut rig = rig();
    rig.setup_rx(RCTL_SECRC);
    rig.write(reg::RDT, 0); // no descriptors for the card
    rig.host.send(&ethernet(0x88b5)).unwrap();
    rig.wait_for("MPC", |r| r.read(reg::MPC) == 1);
    assert_eq!(rig.read(reg::RDH), 0);
}

#[test]
fn malformed_rings_and_descriptors_are_survived() {
    let mut rig = rig();
    // A transmit ring outside guest memory.
    rig.write(reg::TDBAL, 0xfff0_0000);
    rig.write(reg::TDBAH, 0x7);
    rig.write(reg::TDLEN, 4096);
    rig.write(reg::TCTL, TCTL_EN);
    rig.write(reg::TDT, 5);
    // A receive ring outside guest memory, then one whose buffers are.
    rig.write(reg::RDBAL, 0xfff0_0000);
    rig.write(reg::RDBAH, 0x7);
    rig.write(reg::RDLEN, 4096);
    rig.write(reg::RDT, 100);
    rig.write(reg::RCTL, RCTL_EN);
    rig.host.send(&ethernet(0x88b5)).unwrap();
    rig.wait_for("the frame dropped", |r| r.read(reg::MPC) == 1);
    rig.write(reg::RCTL, 0);
    rig.setup_rx(0);
    rig.memory.write_u64(RX_RING, MEMORY - 8).unwrap();
    rig.host.send(&ethernet(0x88b5)).unwrap();
    rig.wait_for("the frame dropped", |r| r.read(reg::MPC) == 2);
    assert_eq!(rig.read(reg::RDH), 0);
    rig.expect_nothing();

    rig.write(reg::TCTL, 0);
    rig.setup_tx();
    let frame = ethernet(0x88b5);
    // A buffer outside memory; a length running past the end of memory.
    rig.tx_descriptor(0, MEMORY + 0x1000, 64 | TXD_CMD_EOP | TXD_CMD_RS, 0);
    rig.tx_descriptor(1, MEMORY - 16, 0xffff | TXD_CMD_EOP | TXD_CMD_RS, 0);
    // Types mixed inside one frame (bhyve asserts).
    rig.tx_descriptor(2, TX_BUFFERS, 14 | TXD_CMD_DEXT | TXD_DTYP_D, 0);
    rig.tx_descriptor(3, TX_BUFFERS, 14 | TXD_CMD_EOP | TXD_CMD_RS, 0);
    // TSO contexts with absurd headers: too long, shorter than the fields, zero MSS.
    let contexts = [
        (14u32 | 24 << 8, 34u32 | 50 << 8, 255u32 << 8 | 1000 << 16),
        (14 | 24 << 8, 34 | 50 << 8, 10u32 << 8 | 1000 << 16),
        (14 | 24 << 8, 34 | 50 << 8, 54u32 << 8),
        (200 | 230 << 8, 34 | 50 << 8, 54u32 << 8 | 1000 << 16),
    ];
    rig.memory.write(TX_BUFFERS, &[0u8; 256]).unwrap();
    rig.write(reg::TDT, 4);
    rig.wait_for("TDH", |r| r.read(reg::TDH) == 4);
    let mut index = 4u16;
    for (ip, tcp, seg) in contexts {
        let d = TX_RING + u64::from(index % RING_SIZE) * 16;
        rig.memory.write(d, &ip.to_le_bytes()).unwrap();
        rig.memory.write(d + 4, &tcp.to_le_bytes()).unwrap();
        let cmd = 100 | TXD_CMD_DEXT | TXD_CMD_TSE | TXD_CMD_TCP | TXD_CMD_IP;
        rig.memory.write(d + 8, &cmd.to_le_bytes()).unwrap();
        rig.memory.write(d + 12, &seg.to_le_bytes()).unwrap();
        let data = TXD_CMD_DEXT | TXD_DTYP_D | TXD_CMD_TSE | TXD_CMD_EOP | TXD_CMD_IFCS;
        rig.tx_descriptor((index + 1) % RING_SIZE, TX_BUFFERS, 154 | data, 3 << 8);
        index = (index + 2) % RING_SIZE;
        rig.write(reg::TDT, u32::from(index));
        rig.wait_for("TDH", |r| r.read(reg::TDH) == u32::from(index));
    }
    // A tail beyond the ring: one lap at most, then the card waits.
    rig.write(reg::TDT, 1000);
    std::thread::sleep(Duration::from_millis(50));
    rig.expect_nothing();
    // The card still works.
    rig.write(reg::TCTL, 0);
    rig.setup_tx();
    rig.legacy(0, &frame, 0, 0);
    rig.write(reg::TDT, 1);
    assert_eq!(rig.expect_frame(), frame);
}

#[cfg(feature = "bhyve_snapshot")]
#[test]
fn snapshot_with_frames_in_flight_loses_and_repeats_none() {
    let mut rig = rig();
    rig.setup_tx();
    rig.setup_rx(RCTL_SECRC);
    rig.write(reg::IMS, ICR_RXT0 | ICR_TXDW);
    rig.card.pause();
    // Work queued while paused: two frames to send, one to receive.
    let first = {
        let mut f = ethernet(0x88b5);
        f.push(1);
        f
    };
    let second = {
        let mut f = ethernet(0x88b5);
        f.push(2);
        f
    };
    rig.legacy(0, &first, 0, 0);
    rig.legacy(1, &second, 0, 0);
    rig.write(reg::TDT, 2);
    let incoming = ethernet(0x88b6);
    rig.host.send(&incoming).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    rig.expect_nothing();
    let saved = rig.card.save_device_state().unwrap();
    let registers = rig.card.registers();

    // Restore into a new card on the same memory, with the same backend's frames waiting.
    let mut restored = rig_on(rig.memory.clone());
    restored.card.pause();
    restored.card.restore_device_state(&saved).unwrap();
    assert_eq!(restored.card.registers(), registers);
    // The old card's backend end still holds the incoming frame; move it across, as the
    // host side of a real backend would still hold it.
    restored.host.send(&incoming).unwrap();
    drop(rig.card);
    restored.card.resume();
    assert_eq!(restored.expect_frame(), first);
    assert_eq!(restored.expect_frame(), second);
    restored.expect_nothing();
    restored.wait_for("RDH", |r| r.read(reg::RDH) == 1);
    let length = restored.memory.slice(RX_RING + 8, 2).unwrap().to_vec();
    assert_eq!(usize::from(u16::from_le_bytes([length[0], length[1]])), 60);
    assert_eq!(
        restored
            .memory
            .slice(RX_BUFFERS, incoming.len() as u64)
            .unwrap(),
        &incoming[..]
    );
    assert_eq!(restored.read(reg::TDH), 2);
    assert_eq!(restored.read(reg::GPTC), 2);

    // A state of another shape is refused.
    assert!(restored
        .card
        .restore_device_state(&saved[..saved.len() - 1])
        .is_err());
}

#[test]
fn vlan_tag_inserted_and_checksum_offsets_follow_it() {
    let mut rig = rig();
    rig.setup_tx();
    rig.write(reg::VET, 0x8100);
    rig.write(reg::CTRL, CTRL_VME);
    let mut frame = ethernet(0x0800);
    frame.extend_from_slice(&IPV4_EXAMPLE);
    // Special field: VLAN 42, priority 5.
    let special = (5u32 << 13 | 42) << 16;
    rig.legacy(
        0,
        &frame,
        TXD_CMD_IC | TXD_CMD_VLE | 24 << 16,
        special | 14 << 8,
    );
    rig.write(reg::TDT, 1);
    let sent = rig.expect_frame();
    assert_eq!(sent.len(), frame.len() + 4);
    assert_eq!(sent[..12], frame[..12]);
    assert_eq!(sent[12..16], [0x81, 0x00, 0xa0, 42], "802.1Q tag");
    assert_eq!(sent[16..18], [0x08, 0x00]);
    assert_eq!(sent[28..30], [0xb8, 0x61], "checksum where it moved to");
    // Without CTRL.VME the tag request is ignored.
    rig.write(reg::CTRL, 0);
    rig.legacy(1, &frame, TXD_CMD_VLE, special);
    rig.write(reg::TDT, 2);
    assert_eq!(rig.expect_frame(), frame);
}

#[test]
fn udp_segmentation_sets_each_datagram_length() {
    let mut rig = rig();
    rig.setup_tx();
    let payload: Vec<u8> = (0..700u32).map(|i| i as u8).collect();
    let mut header = ethernet(0x0800);
    let mut ip = IPV4_EXAMPLE;
    ip[4..6].copy_from_slice(&7u16.to_be_bytes());
    header.extend_from_slice(&ip);
    header.extend_from_slice(&[0x04, 0xd2, 0x16, 0x2e, 0, 0, 0, 0]);
    let header_len = header.len() as u32; // 42
    let d = TX_RING;
    let context = [
        14u32 | 24 << 8 | 33 << 16,
        34 | 40 << 8,
        payload.len() as u32 | TXD_CMD_DEXT | TXD_CMD_TSE | TXD_CMD_IP,
        header_len << 8 | 300 << 16,
    ];
    for (i, word) in context.iter().enumerate() {
        rig.memory
            .write(d + 4 * i as u64, &word.to_le_bytes())
            .unwrap();
    }
    let mut whole = header.clone();
    whole.extend_from_slice(&payload);
    rig.memory.write(TX_BUFFERS, &whole).unwrap();
    let data = TXD_CMD_DEXT | TXD_DTYP_D | TXD_CMD_TSE | TXD_CMD_EOP | TXD_CMD_IFCS;
    rig.tx_descriptor(1, TX_BUFFERS, whole.len() as u32 | data, 1 << 8);
    rig.write(reg::TDT, 2);
    for (n, length) in [300usize, 300, 100].into_iter().enumerate() {
        let segment = rig.expect_frame();
        assert_eq!(segment.len(), 42 + length);
        let ip = &segment[14..];
        assert_eq!(usize::from(u16::from_be_bytes([ip[2], ip[3]])), 28 + length);
        assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 7 + n as u16);
        assert_eq!(internet_sum(&ip[..20]), 0xffff, "IP checksum");
        assert_eq!(
            usize::from(u16::from_be_bytes([ip[24], ip[25]])),
            8 + length
        );
        assert_eq!(segment[42..], payload[300 * n..300 * n + length]);
    }
}

#[test]
fn vlan_filter_and_descriptor_minimum_threshold_on_receive() {
    let mut rig = rig();
    rig.write(reg::VET, 0x8100);
    // VLAN 5 accepted, the rest filtered; RDMTS = 1/2 of the ring.
    rig.write(reg::VFTA, 1 << 5);
    rig.setup_rx(RCTL_SECRC | RCTL_VFE);
    let tagged = |vlan: u8| {
        let mut f = ethernet(0x8100);
        f.extend_from_slice(&[0, vlan, 0x88, 0xb5]);
        f.extend_from_slice(&[0x5a; 50]);
        f
    };
    rig.host.send(&tagged(6)).unwrap();
    rig.host.send(&tagged(5)).unwrap();
    rig.wait_for("RDH", |r| r.read(reg::RDH) == 1);
    assert_eq!(rig.memory.slice(RX_BUFFERS + 15, 1).unwrap()[0], 5);
    assert_eq!(rig.read(reg::ICR) & ICR_RXDMT0, 0, "6 of 8 still free");
    // Down to 3 free descriptors: below half the ring.
    for _ in 0..3 {
        rig.host.send(&tagged(5)).unwrap();
    }
    rig.wait_for("RDH", |r| r.read(reg::RDH) == 4);
    assert_ne!(rig.read(reg::ICR) & ICR_RXDMT0, 0);
}

/// ITR as bhyve's e82545_icr_assert and e82545_itr_callback use it: after the line is
/// raised, causes within the interval (ITR in 256 ns units, rounded up to milliseconds) wait
/// for its end; with ITR 0 every cause raises the line at once.
#[test]
fn interrupts_are_throttled_by_itr() {
    let mut rig = rig();
    rig.write(reg::ITR, 3906 * 60); // 60 ms
    rig.write(reg::IMS, ICR_TXDW);
    rig.write(reg::ICS, ICR_TXDW);
    assert_eq!(rig.intx.state(), IntxState::Asserted);
    let raised = Instant::now();
    assert_eq!(rig.read(reg::ICR), ICR_TXDW);
    assert_eq!(rig.intx.state(), IntxState::Idle);
    rig.write(reg::ICS, ICR_TXDW);
    assert_eq!(rig.intx.state(), IntxState::Idle, "throttled");
    rig.wait_for("the throttled interrupt", |r| {
        r.intx.state() == IntxState::Asserted
    });
    assert!(raised.elapsed() >= Duration::from_millis(55));
    assert_eq!(rig.read(reg::ICR), ICR_TXDW);
    // Without throttling.
    rig.write(reg::ITR, 0);
    std::thread::sleep(Duration::from_millis(100));
    rig.write(reg::ICS, ICR_TXDW);
    assert_eq!(rig.intx.state(), IntxState::Asserted);
    rig.read(reg::ICR);
    rig.write(reg::ICS, ICR_TXDW);
    assert_eq!(rig.intx.state(), IntxState::Asserted);
}
