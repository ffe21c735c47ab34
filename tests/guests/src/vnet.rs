//! A virtio-net driver for the test guest (legacy interface, polled): receive buffers posted on
//! queue 0, frames sent one at a time on queue 1. It negotiates MAC, STATUS and mergeable
//! receive buffers (so the header is 12 bytes, as a Linux driver sees it). See ../README.md.

use core::ptr::addr_of_mut;

use crate::virtio::{CONFIG, DESC_WRITE};
use crate::virtq::{fnv1a, Device, Queue, RING_AREA};
use crate::{parse_u64, splitmix64, svc};

const DEVICE_NET: u32 = 0x1000;
const F_MAC: u32 = 1 << 5;
const F_MRG_RXBUF: u32 = 1 << 15;
const F_STATUS: u32 = 1 << 16;
const RX_BUFFERS: usize = 16;
pub(crate) const BUFFER: usize = 2048;
/// The ethertype of the test frames (IEEE local experimental 1).
pub(crate) const TEST_TYPE: [u8; 2] = [0x88, 0xb5];
const GUEST_IP: [u8; 4] = [10, 0, 2, 15];
const GATEWAY_IP: [u8; 4] = [10, 0, 2, 2];

#[repr(C, align(4096))]
struct Area {
    rx_ring: [u8; RING_AREA],
    tx_ring: [u8; RING_AREA],
    rx: [[u8; BUFFER]; RX_BUFFERS],
    tx: [u8; BUFFER],
}

static mut AREA: Area = Area {
    rx_ring: [0; RING_AREA],
    tx_ring: [0; RING_AREA],
    rx: [[0; BUFFER]; RX_BUFFERS],
    tx: [0; BUFFER],
};

/// A network card driver as the frame commands (`recv`, `echo`, `arp`) use it.
pub(crate) trait Link {
    /// The card's MAC address.
    fn mac(&self) -> [u8; 6];

    /// Send one frame; false when the card did not take it in time.
    fn send(&mut self, frame: &[u8]) -> bool;

    /// The next received frame, copied to `out`; its buffer goes back to the card.
    fn receive(&mut self, out: &mut [u8; BUFFER]) -> Option<usize>;

    /// Wait for a frame `accept` takes, until serial input.
    fn wait_for(
        &mut self,
        out: &mut [u8; BUFFER],
        accept: impl Fn(&[u8]) -> bool,
    ) -> Option<usize> {
        for spin in 0u64.. {
            if let Some(n) = self.receive(out) {
                if accept(&out[..n]) {
                    return Some(n);
                }
                continue;
            }
            // Looking at the serial port is a service call: not on every spin.
            if spin % 4096 == 0 && crate::console::input_pending() {
                return None;
            }
            core::hint::spin_loop();
        }
        None
    }
}

struct Net {
    device: Device,
    rx: Queue,
    tx: Queue,
    area: *mut Area,
    header: usize,
    mac: [u8; 6],
}

impl Net {
    fn open() -> Option<Net> {
        let area = addr_of_mut!(AREA);
        // SAFETY: addresses of fields of the static area (virtual = physical).
        let rings = unsafe {
            [
                addr_of_mut!((*area).rx_ring) as u64,
                addr_of_mut!((*area).tx_ring) as u64,
            ]
        };
        let mut queues = [None, None];
        let device = Device::open(
            DEVICE_NET,
            F_MAC | F_STATUS | F_MRG_RXBUF,
            &rings,
            &mut queues,
        )?;
        let [Some(rx), Some(tx)] = queues else {
            return None;
        };
        let mut mac = [0u8; 6];
        for (i, byte) in mac.iter_mut().enumerate() {
            *byte = svc::inb(device.io + CONFIG + i as u16);
        }
        let header = if device.features & F_MRG_RXBUF != 0 {
            12
        } else {
            10
        };
        let mut net = Net {
            device,
            rx,
            tx,
            area,
            header,
            mac,
        };
        for index in 0..RX_BUFFERS {
            net.post_rx(index as u16);
        }
        net.device.notify(&net.rx);
        Some(net)
    }

    fn area(&self) -> &mut Area {
        // SAFETY: the static area this driver owns; single-threaded.
        unsafe { &mut *self.area }
    }

    fn post_rx(&mut self, index: u16) {
        let address = self.area().rx[usize::from(index)].as_ptr() as u64;
        self.rx
            .descriptor(index, address, BUFFER as u32, DESC_WRITE);
        self.rx.publish(index);
    }
}

impl Link for Net {
    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Send one frame (header added here); waits for the device to take it.
    fn send(&mut self, frame: &[u8]) -> bool {
        let header = self.header;
        let area = self.area();
        area.tx[..header].fill(0);
        area.tx[header..header + frame.len()].copy_from_slice(frame);
        let address = area.tx.as_ptr() as u64;
        self.tx
            .descriptor(0, address, (header + frame.len()) as u32, 0);
        self.tx.publish(0);
        self.device.notify(&self.tx);
        for _ in 0..200_000_000u64 {
            if self.tx.take_used().is_some() {
                return true;
            }
            core::hint::spin_loop();
        }
        false
    }

    /// The next received frame, copied to `out` (without header); the buffer goes back to
    /// the device.
    fn receive(&mut self, out: &mut [u8; BUFFER]) -> Option<usize> {
        let (index, length) = self.rx.take_used()?;
        let header = self.header;
        let index = index % RX_BUFFERS as u16;
        let length = (length as usize).clamp(header, BUFFER);
        let frame_len = length - header;
        out[..frame_len].copy_from_slice(&self.area().rx[usize::from(index)][header..length]);
        self.post_rx(index);
        self.device.notify(&self.rx);
        Some(frame_len)
    }
}

pub(crate) fn is_test_frame(frame: &[u8]) -> bool {
    frame.len() >= 14 && frame[12..14] == TEST_TYPE
}

fn hex_mac(mac: &[u8]) -> [u8; 17] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = [b':'; 17];
    for (i, b) in mac.iter().take(6).enumerate() {
        text[3 * i] = DIGITS[usize::from(b >> 4)];
        text[3 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
    text
}

pub(crate) fn mac_text(mac: &[u8]) -> &'static str {
    static mut TEXT: [u8; 17] = [0; 17];
    // SAFETY: single-threaded shell; the text is used before the next call.
    unsafe {
        let text = &mut *addr_of_mut!(TEXT);
        *text = hex_mac(mac);
        core::str::from_utf8(&text[..]).unwrap_or("?")
    }
}

pub fn run(command: &str, line: &str) -> bool {
    if command != "vnet" {
        return false;
    }
    let mut words = line.split_ascii_whitespace().skip(1);
    let sub = words.next();
    let arg1 = words.next();
    let arg2 = words.next();
    let Some(mut net) = Net::open() else {
        println!("vnet: no virtio-net device");
        return true;
    };
    let mut frame = [0u8; BUFFER];
    match sub {
        Some("info") => {
            let status = svc::inw(net.device.io + CONFIG + 6);
            println!(
                "vnet mac {} status {status} features 0x{:08x} queues {} {}",
                mac_text(&net.mac),
                net.device.features,
                net.rx.size,
                net.tx.size
            );
        }
        Some("send") => match (arg1.and_then(parse_u64), arg2.and_then(parse_u64)) {
            (Some(len), Some(seed)) if (60..=1514).contains(&len) => {
                let len = len as usize;
                frame[..6].fill(0xff);
                frame[6..12].copy_from_slice(&net.mac);
                frame[12..14].copy_from_slice(&TEST_TYPE);
                let mut state = seed;
                for chunk in frame[14..len].chunks_mut(8) {
                    let word = splitmix64(&mut state).to_le_bytes();
                    chunk.copy_from_slice(&word[..chunk.len()]);
                }
                let ok = net.send(&frame[..len]);
                println!(
                    "vnet sent {len} {} fnv 0x{:016x}",
                    if ok { "ok" } else { "timeout" },
                    fnv1a(&frame[..len])
                );
            }
            _ => println!("usage: vnet send <len 60..1514> <seed>"),
        },
        Some("recv") => recv(&mut net, &mut frame, "vnet"),
        Some("echo") => echo(&mut net, &mut frame, "vnet"),
        Some("bench") => bench(&mut net, &mut frame, "vnet", arg1, arg2, words.next()),
        Some("arp") => arp(&mut net, &mut frame, "vnet"),
        Some("syn") => syn(&mut net, &mut frame),
        _ => println!("usage: vnet info|send <len> <seed>|recv|echo|arp|syn"),
    }
    true
}

/// `<name> bench send <len> <ms>`: broadcast test frames of `len` bytes, one after the other
/// (each waits until the card took it), for `ms` of guest time: `<name> bench send <len>
/// requests <frames> bytes <n> ns <n> errors <timeouts>`. `<name> bench recv`: counts received
/// test frames until one input byte, timing from the first to the last: `<name> bench recv
/// frames <n> bytes <n> ns <n>`.
pub(crate) fn bench(
    link: &mut impl Link,
    frame: &mut [u8; BUFFER],
    name: &str,
    op: Option<&str>,
    len: Option<&str>,
    ms: Option<&str>,
) {
    match (op, len.and_then(parse_u64), ms.and_then(parse_u64)) {
        (Some("send"), Some(len), Some(ms))
            if (60..=1514).contains(&len) && (1..=60_000).contains(&ms) =>
        {
            let len = len as usize;
            frame[..6].fill(0xff);
            frame[6..12].copy_from_slice(&link.mac());
            frame[12..14].copy_from_slice(&TEST_TYPE);
            let mut state = 1;
            for chunk in frame[14..len].chunks_mut(8) {
                let word = splitmix64(&mut state).to_le_bytes();
                chunk.copy_from_slice(&word[..chunk.len()]);
            }
            crate::clock::run_for(
                format_args!("{name} bench send {len}"),
                ms,
                len as u64,
                || link.send(&frame[..len]),
            );
        }
        (Some("recv"), None, None) => bench_recv(link, frame, name),
        _ => println!("usage: {name} bench send <len 60..1514> <ms 1..60000> | {name} bench recv"),
    }
}

fn bench_recv(link: &mut impl Link, frame: &mut [u8; BUFFER], name: &str) {
    let Some(hz) = crate::clock::tsc_hz() else {
        println!("{name} bench: no PM timer to calibrate the TSC against");
        return;
    };
    println!("{name} bench recv started");
    let (mut frames, mut bytes, mut first, mut last) = (0u64, 0u64, 0u64, 0u64);
    for spin in 0u64.. {
        if let Some(n) = link.receive(frame) {
            if is_test_frame(&frame[..n]) {
                last = crate::clock::tsc();
                if frames == 0 {
                    first = last;
                }
                frames += 1;
                bytes += n as u64;
            }
            continue;
        }
        // Looking at the serial port is a service call: not on every spin.
        if spin % 4096 == 0 && crate::console::try_read_byte().is_some() {
            break;
        }
        core::hint::spin_loop();
    }
    let ns = (u128::from(last - first) * 1_000_000_000 / u128::from(hz)) as u64;
    println!("{name} bench recv frames {frames} bytes {bytes} ns {ns}");
}

/// Send every test frame back to its sender, until one input byte; `name` starts each line.
pub(crate) fn echo(link: &mut impl Link, frame: &mut [u8; BUFFER], name: &str) {
    let mut count = 0u64;
    println!("{name} echo started");
    while crate::console::try_read_byte().is_none() {
        if let Some(n) = link.receive(frame) {
            if is_test_frame(&frame[..n]) {
                let mut source = [0u8; 6];
                source.copy_from_slice(&frame[6..12]);
                frame[..6].copy_from_slice(&source);
                frame[6..12].copy_from_slice(&link.mac());
                link.send(&frame[..n]);
                count += 1;
                if count % 100 == 0 {
                    println!("{name} echo {count}");
                }
            }
        }
        svc::rx_poll();
    }
    println!("{name} echo stopped {count}");
}

/// Wait for a test frame until serial input; print its length, source and checksum.
pub(crate) fn recv(link: &mut impl Link, frame: &mut [u8; BUFFER], name: &str) {
    match link.wait_for(frame, is_test_frame) {
        Some(n) => println!(
            "{name} recv {n} from {} fnv 0x{:016x}",
            mac_text(&frame[6..12]),
            fnv1a(&frame[..n])
        ),
        None => println!("{name} recv none"),
    }
}

/// An ARP request for the slirp gateway (10.0.2.2) from 10.0.2.15 at `mac`.
fn arp_request(mac: &[u8; 6]) -> [u8; 60] {
    let mut request = [0u8; 60];
    request[..6].fill(0xff);
    request[6..12].copy_from_slice(mac);
    request[12..14].copy_from_slice(&[0x08, 0x06]);
    request[14..22].copy_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    request[22..28].copy_from_slice(mac);
    request[28..32].copy_from_slice(&GUEST_IP);
    request[38..42].copy_from_slice(&GATEWAY_IP);
    request
}

/// The gateway's answer to [`arp_request`].
fn is_gateway_arp_reply(f: &[u8]) -> bool {
    f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] && f[28..32] == GATEWAY_IP
}

/// ARP for the slirp gateway (10.0.2.2) from 10.0.2.15; print who answered.
pub(crate) fn arp(link: &mut impl Link, frame: &mut [u8; BUFFER], name: &str) {
    link.send(&arp_request(&link.mac()));
    match link.wait_for(frame, is_gateway_arp_reply) {
        Some(_) => println!("{name} arp 10.0.2.2 is-at {}", mac_text(&frame[22..28])),
        None => println!("{name} arp no reply"),
    }
}

/// Wait for a TCP SYN to 10.0.2.15 (a slirp `hostfwd` connection), answering ARP requests for
/// 10.0.2.15 meanwhile; print where it came from and its port.
fn syn(net: &mut Net, frame: &mut [u8; BUFFER]) {
    loop {
        let Some(n) = net.wait_for(frame, |_| true) else {
            println!("vnet syn none");
            return;
        };
        let f = &frame[..n];
        if n >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 1] && f[38..42] == GUEST_IP {
            let mut reply = [0u8; 60];
            reply[..6].copy_from_slice(&f[6..12]);
            reply[6..12].copy_from_slice(&net.mac);
            reply[12..14].copy_from_slice(&[0x08, 0x06]);
            reply[14..22].copy_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 2]);
            reply[22..28].copy_from_slice(&net.mac);
            reply[28..32].copy_from_slice(&GUEST_IP);
            reply[32..42].copy_from_slice(&f[22..32]);
            net.send(&reply);
            continue;
        }
        let ihl = usize::from(f.get(14).copied().unwrap_or(0) & 0xf) * 4;
        let tcp = 14 + ihl;
        let is_syn = n >= tcp + 14
            && f[12..14] == [0x08, 0x00]
            && f[23] == 6
            && f[30..34] == GUEST_IP
            && f[tcp + 13] & 0x12 == 0x02;
        if is_syn {
            let port = u16::from_be_bytes([f[tcp + 2], f[tcp + 3]]);
            println!(
                "vnet syn from {}.{}.{}.{} to port {port}",
                f[26], f[27], f[28], f[29]
            );
            return;
        }
    }
}

pub fn help() {
    println!("  vnet info             find virtio-net, print MAC, link status, features");
    println!("  vnet send <len> <seed>  send a broadcast test frame (type 0x88b5)");
    println!("  vnet recv             wait for a test frame, print its length and checksum");
    println!("  vnet echo             return test frames to their sender until input");
    println!("  vnet bench send <len> <ms>  send test frames in a row for ms, timed");
    println!("  vnet bench recv       count test frames until input, timed first to last");
    println!("  vnet arp              ARP for 10.0.2.2 from 10.0.2.15, print the answer");
    println!("  vnet syn              wait for a TCP SYN to 10.0.2.15, print its source and port");
}
