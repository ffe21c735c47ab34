//! A virtio-console driver for the test guest (legacy interface, polled, no multiport): port
//! 0's receive queue (0) and transmit queue (1). `vcon echo` sends back what the host side
//! writes to the port. See ../README.md.

use core::ptr::addr_of_mut;

use crate::virtio::{CONFIG, DESC_WRITE};
use crate::virtq::{Device, Queue, RING_AREA};
use crate::svc;

const DEVICE_CONSOLE: u32 = 0x1003;
const RX_BUFFERS: usize = 8;
const BUFFER: usize = 512;

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

pub fn run(command: &str, line: &str) -> bool {
    if command != "vcon" {
        return false;
    }
    let sub = line.split_ascii_whitespace().nth(1);
    // SAFETY: the one static area of this driver; the shell is single-threaded.
    let area = unsafe { &mut *addr_of_mut!(AREA) };
    let rings = [
        area.rx_ring.as_ptr() as u64,
        area.tx_ring.as_ptr() as u64,
    ];
    let mut queues = [None, None];
    // No features: port 0 only, no control queue.
    let Some(device) = Device::open(DEVICE_CONSOLE, 0, &rings, &mut queues) else {
        println!("vcon: no virtio-console device");
        return true;
    };
    let [Some(mut rx), Some(mut tx)] = queues else {
        return true;
    };
    match sub {
        Some("info") => {
            let cols = svc::inw(device.io + CONFIG);
            let rows = svc::inw(device.io + CONFIG + 2);
            let ports = svc::inl(device.io + CONFIG + 4);
            let offered = svc::inl(device.io);
            println!("vcon cols {cols} rows {rows} max_ports {ports} offered 0x{offered:08x}");
        }
        Some("echo") => echo(&device, &mut rx, &mut tx, area),
        _ => println!("usage: vcon info|echo"),
    }
    true
}

fn post(rx: &mut Queue, area: &Area, index: u16) {
    let address = area.rx[usize::from(index)].as_ptr() as u64;
    rx.descriptor(index, address, BUFFER as u32, DESC_WRITE);
    rx.publish(index);
}

/// Send back what arrives on port 0, until one serial input byte.
fn echo(device: &Device, rx: &mut Queue, tx: &mut Queue, area: &mut Area) {
    for index in 0..RX_BUFFERS as u16 {
        post(rx, area, index);
    }
    device.notify(rx);
    println!("vcon echo started");
    let mut bytes = 0u64;
    while crate::console::try_read_byte().is_none() {
        if let Some((index, length)) = rx.take_used() {
            let index = index % RX_BUFFERS as u16;
            let length = (length as usize).min(BUFFER);
            area.tx[..length].copy_from_slice(&area.rx[usize::from(index)][..length]);
            post(rx, area, index);
            device.notify(rx);
            tx.descriptor(0, area.tx.as_ptr() as u64, length as u32, 0);
            tx.publish(0);
            device.notify(tx);
            while tx.take_used().is_none() {
                core::hint::spin_loop();
            }
            bytes += length as u64;
        }
        svc::rx_poll();
    }
    println!("vcon echo stopped {bytes}");
}

pub fn help() {
    println!("  vcon info             find virtio-console, print its configuration");
    println!("  vcon echo             send back what port 0 receives, until input");
}
