//! A virtio-console driver for the test guest (legacy interface, polled). Without features:
//! port 0's receive queue (0) and transmit queue (1); `vcon echo` sends back what the host side
//! writes to the port. With MULTIPORT (`vcon port1`): the control queues (2, 3) and port 1's
//! queues (4, 5), the control messages printed as they come. See ../README.md.

use core::ptr::addr_of_mut;

use crate::virtio::{CONFIG, DESC_WRITE};
use crate::virtq::{Device, Queue, RING_AREA};
use crate::svc;

const DEVICE_CONSOLE: u32 = 0x1003;
const RX_BUFFERS: usize = 8;
const BUFFER: usize = 512;

const F_MULTIPORT: u32 = 1 << 1;
const QUEUES: usize = 6;
const DEVICE_READY: u16 = 0;
const DEVICE_ADD: u16 = 1;
const PORT_READY: u16 = 3;
const PORT_OPEN: u16 = 6;

#[repr(C, align(4096))]
struct Area {
    rings: [[u8; RING_AREA]; QUEUES],
    rx: [[u8; BUFFER]; RX_BUFFERS],
    control: [[u8; BUFFER]; RX_BUFFERS],
    tx: [u8; BUFFER],
}

static mut AREA: Area = Area {
    rings: [[0; RING_AREA]; QUEUES],
    rx: [[0; BUFFER]; RX_BUFFERS],
    control: [[0; BUFFER]; RX_BUFFERS],
    tx: [0; BUFFER],
};

pub fn run(command: &str, line: &str) -> bool {
    if command != "vcon" {
        return false;
    }
    let sub = line.split_ascii_whitespace().nth(1);
    // SAFETY: the one static area of this driver; the shell is single-threaded.
    let area = unsafe { &mut *addr_of_mut!(AREA) };
    if sub == Some("port1") {
        port1(area);
        return true;
    }
    let rings = [area.rings[0].as_ptr() as u64, area.rings[1].as_ptr() as u64];
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
        _ => println!("usage: vcon info|echo|port1"),
    }
    true
}

/// Send one buffer on `queue` and wait for the device to take it.
fn send(device: &Device, queue: &mut Queue, area: &mut Area, data: &[u8]) {
    area.tx[..data.len()].copy_from_slice(data);
    queue.descriptor(0, area.tx.as_ptr() as u64, data.len() as u32, 0);
    queue.publish(0);
    device.notify(queue);
    while queue.take_used().is_none() {
        core::hint::spin_loop();
    }
}

fn control_message(id: u32, event: u16, value: u16) -> [u8; 8] {
    let mut message = [0u8; 8];
    message[..4].copy_from_slice(&id.to_le_bytes());
    message[4..6].copy_from_slice(&event.to_le_bytes());
    message[6..8].copy_from_slice(&value.to_le_bytes());
    message
}

/// Multiport: DEVICE_READY, PORT_READY for every port added, each control message printed
/// (`vcon event <id> <event> <value> [name]`); once port 1 is open, its bytes are echoed until
/// one input byte.
fn port1(area: &mut Area) {
    let rings: [u64; QUEUES] = core::array::from_fn(|i| area.rings[i].as_ptr() as u64);
    let mut queues: [Option<Queue>; QUEUES] = Default::default();
    let Some(device) = Device::open(DEVICE_CONSOLE, F_MULTIPORT, &rings, &mut queues) else {
        println!("vcon: no virtio-console device");
        return;
    };
    if device.features & F_MULTIPORT == 0 {
        println!("vcon: no multiport");
        return;
    }
    let [_, _, Some(mut control_rx), Some(mut control_tx), Some(mut rx), Some(mut tx)] = queues
    else {
        return;
    };
    for index in 0..RX_BUFFERS as u16 {
        let address = area.control[usize::from(index)].as_ptr() as u64;
        control_rx.descriptor(index, address, BUFFER as u32, DESC_WRITE);
        control_rx.publish(index);
        post(&mut rx, area, index);
    }
    device.notify(&control_rx);
    device.notify(&rx);
    send(&device, &mut control_tx, area, &control_message(0, DEVICE_READY, 1));
    let mut open = false;
    let mut bytes = 0u64;
    while crate::console::try_read_byte().is_none() {
        if let Some((index, length)) = control_rx.take_used() {
            let index = usize::from(index) % RX_BUFFERS;
            let length = (length as usize).clamp(8, BUFFER);
            let message = area.control[index];
            let id = u32::from_le_bytes([message[0], message[1], message[2], message[3]]);
            let event = u16::from_le_bytes([message[4], message[5]]);
            let value = u16::from_le_bytes([message[6], message[7]]);
            let name = match event {
                1 => "add",
                2 => "remove",
                4 => "console",
                5 => "resize",
                6 => "open",
                7 => "name",
                _ => "other",
            };
            // QEMU ends a port name with a NUL, bhyve does not; drivers accept both.
            let mut payload = &message[8..length];
            while let [rest @ .., 0] = payload {
                payload = rest;
            }
            let payload = core::str::from_utf8(payload).unwrap_or("?");
            if payload.is_empty() {
                println!("vcon event {id} {name} {value}");
            } else {
                println!("vcon event {id} {name} {value} {payload}");
            }
            control_rx.publish(index as u16);
            device.notify(&control_rx);
            if event == DEVICE_ADD {
                send(&device, &mut control_tx, area, &control_message(id, PORT_READY, 1));
                // The port is opened at once, as a guest program opening it would (QEMU
                // passes no bytes to a port the guest has not opened).
                send(&device, &mut control_tx, area, &control_message(id, PORT_OPEN, 1));
            }
            if event == PORT_OPEN && id == 1 {
                open = value == 1;
            }
            continue;
        }
        if open {
            if let Some((index, length)) = rx.take_used() {
                let index = index % RX_BUFFERS as u16;
                let length = (length as usize).min(BUFFER);
                let data = area.rx[usize::from(index)];
                post(&mut rx, area, index);
                device.notify(&rx);
                send(&device, &mut tx, area, &data[..length]);
                bytes += length as u64;
            }
        }
        svc::rx_poll();
    }
    println!("vcon port1 stopped {bytes}");
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
            let data = area.rx[usize::from(index)];
            post(rx, area, index);
            device.notify(rx);
            send(device, tx, area, &data[..length]);
            bytes += length as u64;
        }
        svc::rx_poll();
    }
    println!("vcon echo stopped {bytes}");
}

pub fn help() {
    println!("  vcon info             find virtio-console, print its configuration");
    println!("  vcon echo             send back what port 0 receives, until input");
    println!("  vcon port1            multiport: print control events, echo port 1, until input");
}
