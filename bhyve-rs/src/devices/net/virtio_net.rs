//! virtio-net (pci_virtio_net.c): a network card on a [`NetBackend`].
//!
//! As bhyve's: two queues of 1024 entries (receive 0, transmit 1; no control queue), the MAC
//! address from `mac=` or derived from the VM name and slot ([`super::generate_mac`]), the link
//! always up, `mtu=` offered with `VIRTIO_NET_F_MTU` when set, and mergeable receive buffers.
//! Without a `backend` the card exists and its frames go nowhere.
//!
//! One worker thread per card moves frames: it sends what the driver queued for transmission
//! when notified, and receives from the backend while the driver has receive buffers posted
//! (it stops watching the backend when they run out, until the driver posts more). All of it
//! happens under one lock, so pausing (for a snapshot) is taking that lock and setting a flag:
//! no frame is ever half-way between the backend and the guest.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_NOTIFY_ON_EMPTY;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;

use super::{generate_mac, parse_mac, parse_mtu, BackendSpec, NetBackend, MAX_FRAME_LEN};
use crate::devices::pci::{PciAddress, PciDevice};
use crate::devices::registry::{CreatePci, PciEmulation, PciPlan};
use crate::devices::virtio::pci::{use_msix, VirtioPci};
use crate::devices::virtio::{
    Chain, VirtQueue, VirtioDevice, VirtioIdentity, VirtioShared, VIRTIO_DEV_NET,
};
use crate::devices::worker::{Work, Worker};
use crate::devices::DeviceError;

pub const EMULATION: PciEmulation = PciEmulation {
    name: "virtio-net",
    alias_of: None,
    legacy_config: super::legacy_config,
    plan: Some(plan),
};

/// Entries per queue (`VTNET_RINGSZ`).
pub const QUEUE_SIZE: u16 = 1024;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
/// `mtu=` bounds (`VTNET_MIN_MTU` = ETHERMIN, `VTNET_MAX_MTU`).
pub const MIN_MTU: u64 = 46;
pub const MAX_MTU: u64 = 65535;
/// ETHERMTU, what the configuration shows without `mtu=`.
pub const DEFAULT_MTU: u16 = 1500;
/// The virtio-net header without and with `num_buffers`.
pub const HEADER_LEN: usize = 10;
pub const MERGEABLE_HEADER_LEN: usize = 12;
/// Bytes of device configuration: mac[6], status, max_virtqueue_pairs, mtu.
pub const CONFIG_SIZE: usize = 12;
const PCI_CLASS_NETWORK: u8 = 0x02;
/// State format of [`VirtioDevice::save_state`].
const STATE_VERSION: u8 = 1;

/// What a slot's configuration asks of the card.
struct NetPlan {
    mac: [u8; 6],
    mtu: Option<u16>,
    backend: Option<BackendSpec>,
    msix: bool,
}

fn plan(plan: &mut PciPlan<'_>, slot: PciAddress) -> Result<CreatePci, DeviceError> {
    let config = plan.config;
    let node = slot.config_node();
    let invalid = |key: &str, value: &str| DeviceError::InvalidValue {
        key: key.to_string(),
        value: value.to_string(),
    };
    let mac_key = format!("{node}.mac");
    let mac = match config.get(&mac_key) {
        Some(value) => parse_mac(value).ok_or_else(|| invalid(&mac_key, value))?,
        None => generate_mac(
            config.get("name").unwrap_or_default(),
            slot.slot,
            slot.function,
        ),
    };
    let mtu_key = format!("{node}.mtu");
    let mtu = match config.get(&mtu_key) {
        Some(value) => Some(
            parse_mtu(value)
                .filter(|mtu| (MIN_MTU..=MAX_MTU).contains(mtu))
                .and_then(|mtu| u16::try_from(mtu).ok())
                .ok_or_else(|| invalid(&mtu_key, value))?,
        ),
        None => None,
    };
    let backend = BackendSpec::from_config(config, &node)
        .map_err(|e| DeviceError::Platform(format!("pci slot {slot}: {e}")))?;
    let settings = NetPlan {
        mac,
        mtu,
        backend,
        msix: use_msix(config)?,
    };
    Ok(Box::new(move |create| {
        let backend = match &settings.backend {
            Some(spec) => Some(
                spec.open()
                    .map_err(|e| DeviceError::Platform(format!("pci slot {slot}: {e}")))?,
            ),
            None => None,
        };
        let name = format!("vtnet-{}:{} rx/tx", slot.slot, slot.function);
        let device = VirtioNet::new(settings.mac, settings.mtu, backend, &name)
            .map_err(|e| DeviceError::Platform(format!("pci slot {slot}: {e}")))?;
        let pci = VirtioPci::new(Box::new(device), create, settings.msix)?;
        Ok(Box::new(pci) as Box<dyn PciDevice>)
    }))
}

/// What the worker and the device share; the worker does everything with it locked.
struct Engine {
    backend: Option<Box<dyn NetBackend>>,
    rx: Option<Arc<VirtQueue>>,
    tx: Option<Arc<VirtQueue>>,
    shared: Option<Arc<VirtioShared>>,
    /// The driver has negotiated features since the last reset: receiving may start.
    negotiated: bool,
    /// Mergeable receive buffers negotiated (and so the 12-byte header).
    merge: bool,
    /// One frame with its header, on its way.
    buffer: Vec<u8>,
}

impl Engine {
    fn header_len(&self) -> usize {
        if self.merge {
            MERGEABLE_HEADER_LEN
        } else {
            HEADER_LEN
        }
    }

    /// Send every frame the driver queued (`pci_vtnet_proctx`).
    fn transmit(&mut self) {
        let Some(tx) = self.tx.clone() else {
            return;
        };
        let header = self.header_len();
        let mut any = false;
        while let Some(chain) = tx.pop() {
            any = true;
            let length = chain
                .readable_len()
                .min(MAX_FRAME_LEN as u64 + header as u64) as usize;
            self.buffer.resize(length, 0);
            let sent = match chain.read(tx.memory(), 0, &mut self.buffer) {
                // Shorter than its header: nonsense, dropped (bhyve does the same).
                Ok(()) if length <= header => 0,
                Ok(()) => match self.backend.as_mut() {
                    Some(backend) => backend
                        .send(&[IoSlice::new(&self.buffer[header..])])
                        .unwrap_or(0),
                    None => length - header,
                },
                Err(e) => {
                    if let Some(shared) = &self.shared {
                        shared.mark_broken(&format!("transmit buffer: {e}"));
                    }
                    return;
                }
            };
            tx.add_used(chain.head, u32::try_from(sent).unwrap_or(u32::MAX));
        }
        if any {
            tx.end_chains(true);
        }
    }

    /// Move frames from the backend into the driver's receive buffers (`pci_vtnet_rx`).
    fn receive(&mut self) {
        if !self.negotiated {
            return;
        }
        let (Some(rx), Some(backend)) = (self.rx.clone(), self.backend.as_mut()) else {
            return;
        };
        let header = if self.merge {
            MERGEABLE_HEADER_LEN
        } else {
            HEADER_LEN
        };
        let mut delivered = false;
        let mut ran_out = false;
        loop {
            let length = match backend.peek_recv_len() {
                Ok(0) | Err(_) => break,
                Ok(n) => n.min(MAX_FRAME_LEN),
            };
            let total = header + length;
            // Buffers for the frame: one chain, or with mergeable buffers as many as it takes.
            let mut chains: Vec<Chain> = Vec::new();
            let mut room = 0u64;
            while room < total as u64 {
                let Some(chain) = rx.pop() else {
                    break;
                };
                room += chain.writable_len();
                chains.push(chain);
                if !self.merge {
                    break;
                }
            }
            if room < total as u64 {
                if !self.merge && !chains.is_empty() {
                    // The driver's buffer cannot hold this frame: the frame is dropped, the
                    // buffer kept for the next.
                    log::debug!("vtnet: {length}-byte frame dropped, receive buffer of {room}");
                    let _ = backend.discard();
                    rx.unpop();
                    continue;
                }
                for _ in &chains {
                    rx.unpop();
                }
                ran_out = true;
                break;
            }
            self.buffer.clear();
            self.buffer.resize(total, 0);
            let received = match backend.recv(&mut [IoSliceMut::new(&mut self.buffer[header..])]) {
                Ok(n) if n > 0 => n,
                // The frame went away between peek and receive: give the buffers back.
                _ => {
                    for _ in &chains {
                        rx.unpop();
                    }
                    break;
                }
            };
            let total = header + received;
            if self.merge {
                let count = u16::try_from(chains.len()).unwrap_or(u16::MAX);
                self.buffer[10..12].copy_from_slice(&count.to_le_bytes());
            }
            let mut offset = 0usize;
            for chain in &chains {
                let part = (chain.writable_len() as usize).min(total - offset);
                if let Err(e) = chain.write(rx.memory(), 0, &self.buffer[offset..offset + part]) {
                    if let Some(shared) = &self.shared {
                        shared.mark_broken(&format!("receive buffer: {e}"));
                    }
                    return;
                }
                rx.add_used(chain.head, part as u32);
                offset += part;
            }
            delivered = true;
        }
        if delivered || ran_out {
            rx.end_chains(ran_out);
        }
    }
}

impl Work for Engine {
    /// The backend, while the driver has receive buffers posted.
    fn poll_set(&self) -> Vec<libc::pollfd> {
        let receiving = self.negotiated && self.rx.as_ref().is_some_and(|rx| rx.has_available());
        match &self.backend {
            Some(backend) if receiving => vec![libc::pollfd {
                fd: backend.ready_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }],
            _ => Vec::new(),
        }
    }

    fn work(&mut self) {
        self.transmit();
        self.receive();
    }
}

/// The virtio-net device model.
pub struct VirtioNet {
    config: [u8; CONFIG_SIZE],
    host_features: u64,
    worker: Worker<Engine>,
    thread_name: String,
}

impl VirtioNet {
    /// A card with address `mac`, `mtu` (offered to the driver when set) and `backend`.
    pub fn new(
        mac: [u8; 6],
        mtu: Option<u16>,
        backend: Option<Box<dyn NetBackend>>,
        thread_name: &str,
    ) -> std::io::Result<Self> {
        let mut config = [0u8; CONFIG_SIZE];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&mtu.unwrap_or(DEFAULT_MTU).to_le_bytes());
        let mut host_features = (1u64 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_F_NOTIFY_ON_EMPTY)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_NET_F_MRG_RXBUF);
        if mtu.is_some() {
            host_features |= 1 << VIRTIO_NET_F_MTU;
        }
        // bhyve also offers the backend's offloads (netbe_get_cap); they need the backend to
        // take the virtio-net header (NetBackend::set_capabilities), which none here does, so
        // frames always cross without it and nothing more is offered.
        Ok(Self {
            config,
            host_features,
            worker: Worker::new(Engine {
                backend,
                rx: None,
                tx: None,
                shared: None,
                negotiated: false,
                merge: false,
                buffer: Vec::with_capacity(MAX_FRAME_LEN + MERGEABLE_HEADER_LEN),
            })?,
            thread_name: thread_name.to_string(),
        })
    }

    /// The MAC address the driver sees (it may have changed it).
    pub fn mac(&self) -> [u8; 6] {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&self.config[..6]);
        mac
    }
}

impl VirtioDevice for VirtioNet {
    fn name(&self) -> &'static str {
        "vtnet"
    }

    fn identity(&self) -> VirtioIdentity {
        VirtioIdentity {
            pci_device_id: VIRTIO_DEV_NET,
            device_type: virtio_bindings::virtio_ids::VIRTIO_ID_NET as u16,
            class: PCI_CLASS_NETWORK,
            subclass: 0,
        }
    }

    fn queue_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn host_features(&self) -> u64 {
        self.host_features
    }

    fn config_size(&self) -> usize {
        CONFIG_SIZE
    }

    fn read_config(&self, offset: usize, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.config.get(offset + i).copied().unwrap_or(0);
        }
    }

    /// The driver may change the MAC address; the rest is read-only.
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        for (i, &byte) in data.iter().enumerate() {
            if offset + i < 6 {
                self.config[offset + i] = byte;
            }
        }
    }

    fn attach(&mut self, queues: &[Arc<VirtQueue>], shared: &Arc<VirtioShared>) {
        {
            let engine = &mut self.worker.lock().work;
            engine.rx = queues.get(RX_QUEUE).cloned();
            engine.tx = queues.get(TX_QUEUE).cloned();
            engine.shared = Some(shared.clone());
        }
        if let Err(e) = self.worker.start(&self.thread_name) {
            shared.mark_broken(&format!("cannot start the worker thread: {e}"));
        }
    }

    fn features_negotiated(&mut self, features: u64) {
        {
            let engine = &mut self.worker.lock().work;
            engine.merge = features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
            engine.negotiated = true;
        }
        self.worker.wake();
    }

    fn queue_notify(&mut self, _queue: usize) {
        self.worker.wake();
    }

    fn reset(&mut self) {
        // Taking the lock waits for the worker to finish what it was doing with the queues.
        let engine = &mut self.worker.lock().work;
        engine.negotiated = false;
        engine.merge = false;
    }

    fn pause(&mut self) {
        self.worker.pause();
    }

    fn resume(&mut self) {
        self.worker.resume();
    }

    fn save_state(&self) -> Option<Vec<u8>> {
        // The MAC address (the driver may have set it); the rest follows from the
        // configuration and the negotiated features the transport saves.
        let mut state = vec![STATE_VERSION];
        state.extend_from_slice(&self.config[..6]);
        Some(state)
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), String> {
        match state {
            [STATE_VERSION, mac @ ..] if mac.len() == 6 => {
                self.config[..6].copy_from_slice(mac);
                Ok(())
            }
            _ => Err(format!(
                "vtnet: {} bytes of state in an unknown format",
                state.len()
            )),
        }
    }
}

#[cfg(test)]
#[path = "virtio_net_tests.rs"]
mod tests;
