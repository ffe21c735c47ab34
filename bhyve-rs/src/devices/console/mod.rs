//! virtio-console (pci_virtio_console.c): up to 16 ports, each a UNIX socket on the host.
//!
//! As bhyve's: 34 queues of 64 entries (port 0 on queues 0 and 1, the control queues 2 and 3,
//! port N on 2N+2 and 2N+3), the configuration 80 columns by 25 rows with 16 ports at most,
//! and the size and multiport features (bhyve's feature mask offers exactly these two). The
//! control protocol follows the virtio specification's order, which QEMU's virtio-serial also
//! keeps: `DEVICE_ADD` for each port when the driver says `DEVICE_READY`; the port's
//! `PORT_NAME`, and `PORT_OPEN` while a host client is connected, once the driver answers
//! `PORT_READY`. Control messages wait when the driver has no control buffer posted instead
//! of being lost.
//!
//! [`socket`] holds the host side of a port. One worker thread per device accepts clients,
//! moves bytes both ways and sends the control messages, all under one lock, so pausing for
//! a snapshot leaves nothing half-done. Client connections do not survive a snapshot: after a
//! restore the ports are closed, and the driver is told so.

pub mod socket;

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use crate::config::legacy::{LegacyError, LegacyWriter};
use crate::devices::pci::{PciAddress, PciDevice, PCIC_SIMPLECOMM};
use crate::devices::registry::{CreatePci, PciEmulation, PciPlan};
use crate::devices::virtio::pci::{use_msix, VirtioPci};
use crate::devices::virtio::{
    VirtQueue, VirtioDevice, VirtioIdentity, VirtioShared, VIRTIO_DEV_CONSOLE,
};
use crate::devices::worker::{Work, Worker};
use crate::devices::DeviceError;
use socket::{ports_from_config, PortSpec, Received, SocketPort, MAX_PENDING, MAX_PORTS};

pub const EMULATION: PciEmulation = PciEmulation {
    name: "virtio-console",
    alias_of: None,
    legacy_config,
    plan: Some(plan),
};

/// Entries per queue (`VTCON_RINGSZ`).
pub const QUEUE_SIZE: u16 = 64;
/// Two queues per port and the two control queues (`VTCON_MAXQ`).
pub const QUEUES: usize = MAX_PORTS * 2 + 2;
pub const CONTROL_RX_QUEUE: usize = 2;
pub const CONTROL_TX_QUEUE: usize = 3;
/// Feature bits (virtio specification 5.3.3).
pub const F_SIZE: u32 = 0;
pub const F_MULTIPORT: u32 = 1;
/// Control events (`VTCON_*`, specification 5.3.6.2).
pub const DEVICE_READY: u16 = 0;
pub const DEVICE_ADD: u16 = 1;
pub const PORT_READY: u16 = 3;
pub const CONSOLE_PORT: u16 = 4;
pub const PORT_OPEN: u16 = 6;
pub const PORT_NAME: u16 = 7;
/// cols, rows, max_nr_ports, emerg_wr.
pub const CONFIG_SIZE: usize = 12;
const VIRTIO_ID_CONSOLE: u16 = 3;
const STATE_VERSION: u8 = 1;

/// The receive queue (host to guest) and transmit queue of port `id`.
pub fn port_queues(id: usize) -> (usize, usize) {
    if id == 0 {
        (0, 1)
    } else {
        ((id + 1) * 2, (id + 1) * 2 + 1)
    }
}

/// pci_virtio_console.c's `name=path,…` (the registry's legacy parser for this emulation).
fn legacy_config(
    w: &mut LegacyWriter<'_>,
    node: &str,
    conf: Option<&str>,
) -> Result<(), LegacyError> {
    let Some(conf) = conf else {
        return Ok(());
    };
    let ports = format!("{node}.port");
    w.create(&ports)?;
    for (port, opt) in conf.split(',').enumerate() {
        let Some((name, path)) = opt.split_once('=') else {
            return Err(LegacyError::Invalid(format!(
                "vtcon: port {opt} requires a path"
            )));
        };
        if port >= MAX_PORTS {
            return Err(LegacyError::Invalid("vtcon: too many ports".to_string()));
        }
        let port_node = format!("{ports}.{port}");
        w.create(&port_node)?;
        w.set(&port_node, "name", name)?;
        w.set(&port_node, "path", path)?;
    }
    Ok(())
}

fn plan(plan: &mut PciPlan<'_>, slot: PciAddress) -> Result<CreatePci, DeviceError> {
    let ports = ports_from_config(plan.config, &slot.config_node())
        .map_err(|e| DeviceError::Platform(format!("pci slot {slot}: {e}")))?;
    let msix = use_msix(plan.config)?;
    Ok(Box::new(move |create| {
        let sockets = ports
            .iter()
            .map(SocketPort::bind)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| DeviceError::Platform(format!("pci slot {slot}: {e}")))?;
        let name = format!("vtcon-{}:{}", slot.slot, slot.function);
        let device = VirtioConsole::new(sockets, &name)
            .map_err(|e| DeviceError::Platform(format!("pci slot {slot}: {e}")))?;
        let pci = VirtioPci::new(Box::new(device), create, msix)?;
        Ok(Box::new(pci) as Box<dyn PciDevice>)
    }))
}

/// One port as the device tracks it.
struct Port {
    socket: SocketPort,
    /// The driver acknowledged the port (`PORT_READY`): name and open state may be sent.
    guest_ready: bool,
    /// Whether the driver was last told the port is open.
    told_open: bool,
}

struct Engine {
    ports: Vec<Port>,
    queues: Vec<Arc<VirtQueue>>,
    shared: Option<Arc<VirtioShared>>,
    multiport: bool,
    /// The driver sent `DEVICE_READY`.
    ready: bool,
    /// Control messages for the driver, waiting for control receive buffers.
    control_out: VecDeque<Vec<u8>>,
}

fn control_message(id: u32, event: u16, value: u16, payload: &[u8]) -> Vec<u8> {
    let mut message = id.to_le_bytes().to_vec();
    message.extend_from_slice(&event.to_le_bytes());
    message.extend_from_slice(&value.to_le_bytes());
    message.extend_from_slice(payload);
    message
}

impl Engine {
    fn port_index(&self, id: usize) -> Option<usize> {
        self.ports.iter().position(|p| p.socket.spec().id == id)
    }

    fn queue(&self, index: usize) -> Option<Arc<VirtQueue>> {
        self.queues.get(index).cloned()
    }

    fn broken(&self, why: &str) {
        if let Some(shared) = &self.shared {
            shared.mark_broken(why);
        }
    }

    /// Queue a control message for the driver (sent by [`Engine::flush_control`]).
    fn control(&mut self, id: usize, event: u16, value: u16, payload: &[u8]) {
        if self.multiport {
            self.control_out
                .push_back(control_message(id as u32, event, value, payload));
        }
    }

    /// Tell the driver about port `index`'s host side if it changed and the driver listens.
    fn announce_open_state(&mut self, index: usize) {
        let port = &self.ports[index];
        let open = port.socket.is_open();
        if self.ready && port.guest_ready && port.told_open != open {
            let id = port.socket.spec().id;
            self.ports[index].told_open = open;
            self.control(id, PORT_OPEN, u16::from(open), &[]);
        }
    }

    /// Put waiting control messages into the driver's control receive buffers.
    fn flush_control(&mut self) {
        let Some(queue) = self.queue(CONTROL_RX_QUEUE) else {
            return;
        };
        let mut any = false;
        while let Some(message) = self.control_out.front() {
            let Some(chain) = queue.pop() else {
                break;
            };
            any = true;
            if chain.writable_len() < message.len() as u64 {
                // Too small for the message: returned empty, the message waits for the next.
                queue.add_used(chain.head, 0);
                continue;
            }
            if let Err(e) = chain.write(queue.memory(), 0, message) {
                self.broken(&format!("control buffer: {e}"));
                return;
            }
            queue.add_used(chain.head, message.len() as u32);
            self.control_out.pop_front();
        }
        if any {
            queue.end_chains(false);
        }
    }

    /// A control message from the driver.
    fn handle_control(&mut self, message: &[u8]) {
        let [a, b, c, d, e, f, g, h, ..] = *message else {
            log::debug!("vtcon: short control message");
            return;
        };
        let id = u32::from_le_bytes([a, b, c, d]) as usize;
        let event = u16::from_le_bytes([e, f]);
        let value = u16::from_le_bytes([g, h]);
        match event {
            DEVICE_READY if value == 1 => {
                self.ready = true;
                for index in 0..self.ports.len() {
                    let id = self.ports[index].socket.spec().id;
                    self.control(id, DEVICE_ADD, 1, &[]);
                }
            }
            DEVICE_READY => self.ready = false,
            PORT_READY => {
                let Some(index) = self.port_index(id) else {
                    log::debug!("vtcon: PORT_READY for unknown port {id}");
                    return;
                };
                if value != 1 {
                    self.ports[index].guest_ready = false;
                    return;
                }
                self.ports[index].guest_ready = true;
                self.ports[index].told_open = false;
                let name = self.ports[index].socket.spec().name.clone();
                self.control(id, PORT_NAME, 1, name.as_bytes());
                self.announce_open_state(index);
            }
            // PORT_OPEN from the driver (a guest program opened the port) and the rest:
            // nothing to do on the host side.
            _ => {}
        }
    }

    /// Everything the driver queued on the control transmit queue.
    fn drain_control_tx(&mut self) {
        let Some(queue) = self.queue(CONTROL_TX_QUEUE) else {
            return;
        };
        let mut any = false;
        while let Some(chain) = queue.pop() {
            any = true;
            let length = chain.readable_len().min(4096) as usize;
            let mut message = vec![0u8; length];
            if let Err(e) = chain.read(queue.memory(), 0, &mut message) {
                self.broken(&format!("control message: {e}"));
                return;
            }
            queue.add_used(chain.head, 0);
            self.handle_control(&message);
        }
        if any {
            queue.end_chains(true);
        }
    }

    /// Guest output on every port's transmit queue, to the port's client.
    fn transmit(&mut self) {
        for index in 0..self.ports.len() {
            let id = self.ports[index].socket.spec().id;
            if id != 0 && !self.multiport {
                continue;
            }
            let Some(queue) = self.queue(port_queues(id).1) else {
                continue;
            };
            let mut any = false;
            while let Some(chain) = queue.pop() {
                any = true;
                // The guest picks the chain's length; more than MAX_PENDING bytes would be
                // dropped or end the client anyway, so no more than that is read.
                let length = chain.readable_len().min(MAX_PENDING as u64 + 1);
                let mut data = vec![0u8; length as usize];
                if let Err(e) = chain.read(queue.memory(), 0, &mut data) {
                    self.broken(&format!("port {id} output: {e}"));
                    return;
                }
                self.ports[index].socket.send(&data);
                queue.add_used(chain.head, 0);
            }
            if any {
                queue.end_chains(true);
            }
            self.announce_open_state(index);
        }
    }

    /// New clients, client input into the ports' receive buffers, queued output.
    fn serve_clients(&mut self) {
        for index in 0..self.ports.len() {
            let id = self.ports[index].socket.spec().id;
            self.ports[index].socket.accept();
            if self.ports[index].socket.has_pending_output() {
                self.ports[index].socket.flush();
            }
            let active = id == 0 || self.multiport;
            if let (true, Some(queue)) = (active, self.queue(port_queues(id).0)) {
                let mut any = false;
                while self.ports[index].socket.is_open() {
                    let Some(chain) = queue.pop() else {
                        break;
                    };
                    let mut data = vec![0u8; chain.writable_len().min(65536) as usize];
                    match self.ports[index].socket.receive(&mut data) {
                        Received::Data(n) => {
                            if let Err(e) = chain.write(queue.memory(), 0, &data[..n]) {
                                self.broken(&format!("port {id} input: {e}"));
                                return;
                            }
                            queue.add_used(chain.head, n as u32);
                            any = true;
                        }
                        Received::Nothing | Received::Closed => {
                            queue.unpop();
                            break;
                        }
                    }
                }
                if any {
                    queue.end_chains(false);
                }
            }
            self.announce_open_state(index);
        }
    }
}

impl Work for Engine {
    fn work(&mut self) {
        self.drain_control_tx();
        self.transmit();
        self.serve_clients();
        self.flush_control();
    }

    /// What the worker waits for: new clients always; a client's input (or departure) while
    /// its port's receive queue has buffers; room for queued output.
    fn poll_set(&self) -> Vec<libc::pollfd> {
        let mut fds = Vec::new();
        for port in &self.ports {
            fds.push(libc::pollfd {
                fd: port.socket.listener_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            let Some(client) = port.socket.client_fd() else {
                continue;
            };
            let id = port.socket.spec().id;
            let mut events = 0;
            let receiving = (id == 0 || self.multiport)
                && self
                    .queues
                    .get(port_queues(id).0)
                    .is_some_and(|q| q.has_available());
            if receiving {
                events |= libc::POLLIN;
            }
            if port.socket.has_pending_output() {
                events |= libc::POLLOUT;
            }
            // Not watched otherwise: poll would report a hang-up at once and keep reporting
            // it. A client that leaves is noticed at the next read, when the driver has
            // receive buffers posted (drivers keep them posted) or output is on its way.
            if events == 0 {
                continue;
            }
            fds.push(libc::pollfd {
                fd: client.as_raw_fd(),
                events,
                revents: 0,
            });
        }
        fds
    }
}

/// The virtio-console device model.
pub struct VirtioConsole {
    config: [u8; CONFIG_SIZE],
    worker: Worker<Engine>,
    thread_name: String,
}

impl VirtioConsole {
    /// A console with `ports` (bound sockets, at most [`MAX_PORTS`], distinct numbers).
    pub fn new(ports: Vec<SocketPort>, thread_name: &str) -> std::io::Result<Self> {
        let mut config = [0u8; CONFIG_SIZE];
        config[0..2].copy_from_slice(&80u16.to_le_bytes());
        config[2..4].copy_from_slice(&25u16.to_le_bytes());
        config[4..8].copy_from_slice(&(MAX_PORTS as u32).to_le_bytes());
        let ports = ports
            .into_iter()
            .map(|socket| Port {
                socket,
                guest_ready: false,
                told_open: false,
            })
            .collect();
        Ok(Self {
            config,
            worker: Worker::new(Engine {
                ports,
                queues: Vec::new(),
                shared: None,
                multiport: false,
                ready: false,
                control_out: VecDeque::new(),
            })?,
            thread_name: thread_name.to_string(),
        })
    }

    /// The ports' specifications, in port order.
    pub fn ports(&self) -> Vec<PortSpec> {
        self.worker
            .lock()
            .work
            .ports
            .iter()
            .map(|p| p.socket.spec().clone())
            .collect()
    }
}

impl VirtioDevice for VirtioConsole {
    fn name(&self) -> &'static str {
        "vtcon"
    }

    fn identity(&self) -> VirtioIdentity {
        VirtioIdentity {
            pci_device_id: VIRTIO_DEV_CONSOLE,
            device_type: VIRTIO_ID_CONSOLE,
            class: PCIC_SIMPLECOMM,
            subclass: 0,
        }
    }

    fn queue_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; QUEUES]
    }

    fn host_features(&self) -> u64 {
        (1 << F_SIZE) | (1 << F_MULTIPORT)
    }

    fn config_size(&self) -> usize {
        CONFIG_SIZE
    }

    fn read_config(&self, offset: usize, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.config.get(offset + i).copied().unwrap_or(0);
        }
    }

    fn attach(&mut self, queues: &[Arc<VirtQueue>], shared: &Arc<VirtioShared>) {
        {
            let engine = &mut self.worker.lock().work;
            engine.queues = queues.to_vec();
            engine.shared = Some(shared.clone());
        }
        if let Err(e) = self.worker.start(&self.thread_name) {
            shared.mark_broken(&format!("cannot start the worker thread: {e}"));
        }
    }

    fn features_negotiated(&mut self, features: u64) {
        self.worker.lock().work.multiport = features & (1 << F_MULTIPORT) != 0;
        self.worker.wake();
    }

    fn queue_notify(&mut self, _queue: usize) {
        self.worker.wake();
    }

    fn reset(&mut self) {
        let engine = &mut self.worker.lock().work;
        engine.multiport = false;
        engine.ready = false;
        engine.control_out.clear();
        for port in &mut engine.ports {
            port.guest_ready = false;
            port.told_open = false;
        }
    }

    fn pause(&mut self) {
        self.worker.pause();
    }

    fn resume(&mut self) {
        self.worker.resume();
    }

    /// Version, ready, then per port: number, driver-ready, told-open; then the waiting
    /// control messages (length-prefixed).
    fn save_state(&self) -> Option<Vec<u8>> {
        let state = self.worker.lock();
        let engine = &state.work;
        let mut state = vec![
            STATE_VERSION,
            u8::from(engine.ready),
            engine.ports.len() as u8,
        ];
        for port in &engine.ports {
            state.push(port.socket.spec().id as u8);
            state.push(u8::from(port.guest_ready));
            state.push(u8::from(port.told_open));
        }
        for message in &engine.control_out {
            state.extend_from_slice(&(message.len() as u16).to_le_bytes());
            state.extend_from_slice(message);
        }
        Some(state)
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), String> {
        let bad = || format!("vtcon: {} bytes of state in an unknown format", state.len());
        let [STATE_VERSION, ready, count, rest @ ..] = state else {
            return Err(bad());
        };
        let count = usize::from(*count);
        let mut state_guard = self.worker.lock();
        let engine = &mut state_guard.work;
        if count != engine.ports.len() || rest.len() < 3 * count {
            return Err(format!(
                "vtcon: {count} ports saved, the device has {}",
                engine.ports.len()
            ));
        }
        let (ports, mut messages) = rest.split_at(3 * count);
        let mut restored = VecDeque::new();
        while let [lo, hi, tail @ ..] = messages {
            let length = usize::from(u16::from_le_bytes([*lo, *hi]));
            if tail.len() < length {
                return Err(bad());
            }
            restored.push_back(tail[..length].to_vec());
            messages = &tail[length..];
        }
        if !messages.is_empty() {
            return Err(bad());
        }
        engine.ready = *ready != 0;
        engine.control_out = restored;
        for (index, saved) in ports.chunks_exact(3).enumerate() {
            if usize::from(saved[0]) != engine.ports[index].socket.spec().id {
                return Err(format!(
                    "vtcon: port {} saved where port {} is",
                    saved[0],
                    engine.ports[index].socket.spec().id
                ));
            }
            engine.ports[index].guest_ready = saved[1] != 0;
            // Clients are not carried over: the driver hears the port closed if it was open.
            engine.ports[index].told_open = saved[2] != 0;
            engine.ports[index].socket.disconnect();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
