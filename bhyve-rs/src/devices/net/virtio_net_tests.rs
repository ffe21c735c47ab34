//! virtio-net against a legacy driver written here from the virtio specification (0.9.5 /
//! 1.x legacy interface), with a backend whose other end the test holds.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use super::*;
use crate::devices::pci::irq::PirqRouter;
use crate::devices::pci::ConfigSpace;
use crate::devices::registry::PciCreate;
use crate::devices::virtio::pci::IO_BAR;
use crate::devices::virtio::{
    VIRTIO_PCI_CONFIG_NO_MSIX, VIRTIO_PCI_GUEST_FEATURES, VIRTIO_PCI_HOST_FEATURES,
    VIRTIO_PCI_QUEUE_NOTIFY, VIRTIO_PCI_QUEUE_PFN, VIRTIO_PCI_QUEUE_SEL, VIRTIO_PCI_STATUS,
};
use crate::interrupts::InterruptSink;
use crate::memory::GuestMemory;

struct NoInterrupts;

impl InterruptSink for NoInterrupts {
    fn set_irq_line(&self, _gsi: u32, _high: bool) -> std::io::Result<()> {
        Ok(())
    }
    fn signal_msi(&self, _address: u64, _data: u32) -> std::io::Result<()> {
        Ok(())
    }
    fn set_isa_irq_trigger(&self, _irq: u8, _level: bool) -> std::io::Result<()> {
        Ok(())
    }
}

/// A backend over a datagram socket pair: one datagram, one frame.
struct PairBackend {
    socket: UnixDatagram,
}

impl NetBackend for PairBackend {
    fn name(&self) -> &str {
        "pair"
    }
    fn send(&mut self, frame: &[IoSlice<'_>]) -> std::io::Result<usize> {
        let bytes: Vec<u8> = frame.iter().flat_map(|s| s.iter().copied()).collect();
        self.socket.send(&bytes)
    }
    fn peek_recv_len(&mut self) -> std::io::Result<usize> {
        let mut buffer = vec![0u8; MAX_FRAME_LEN];
        match nix::sys::socket::recv(
            self.socket.as_raw_fd(),
            &mut buffer,
            nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(n) => Ok(n),
            Err(nix::errno::Errno::EAGAIN) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }
    fn recv(&mut self, buffers: &mut [IoSliceMut<'_>]) -> std::io::Result<usize> {
        match nix::sys::uio::readv(&self.socket, buffers) {
            Ok(n) => Ok(n),
            Err(nix::errno::Errno::EAGAIN) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }
    fn ready_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.socket)
    }
}

const RING: [u64; 2] = [0x10000, 0x20000];
const BUFFERS: u64 = 0x40000;
const MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];

/// The guest side: the device through its I/O BAR, rings and buffers in guest memory.
struct Driver {
    device: VirtioPci,
    config: ConfigSpace,
    memory: Arc<GuestMemory>,
    /// The host end of the backend.
    host: UnixDatagram,
    next_avail: [u16; 2],
    next_descriptor: [u16; 2],
    seen_used: [u16; 2],
    next_buffer: u64,
}

impl Driver {
    fn new(mtu: Option<u16>) -> Self {
        let (host, device_end) = UnixDatagram::pair().unwrap();
        device_end.set_nonblocking(true).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let backend: Box<dyn NetBackend> = Box::new(PairBackend { socket: device_end });
        let net = VirtioNet::new(MAC, mtu, Some(backend), "vtnet test").unwrap();
        let sink: Arc<dyn InterruptSink> = Arc::new(NoInterrupts);
        let router = Arc::new(PirqRouter::new(sink.clone(), false));
        let memory = Arc::new(GuestMemory::new(4 << 20).unwrap());
        let mut config = ConfigSpace::new(true);
        let device = VirtioPci::new(
            Box::new(net),
            PciCreate {
                slot: PciAddress::new(0, 2, 0).unwrap(),
                config_space: &mut config,
                interrupts: &sink,
                router: &router,
                memory: &memory,
            },
            false,
        )
        .unwrap();
        Driver {
            device,
            config,
            memory,
            host,
            next_avail: [0; 2],
            next_descriptor: [0; 2],
            seen_used: [0; 2],
            next_buffer: BUFFERS,
        }
    }

    fn read(&mut self, offset: u64, size: usize) -> u32 {
        let mut data = [0u8; 4];
        self.device
            .bar_read(&self.config, IO_BAR, offset, &mut data[..size]);
        u32::from_le_bytes(data)
    }

    fn write(&mut self, offset: u64, size: usize, value: u32) {
        self.device
            .bar_write(&self.config, IO_BAR, offset, &value.to_le_bytes()[..size]);
    }

    /// Reset, negotiate `features`, place both rings, driver OK.
    fn setup(&mut self, features: u32) {
        self.write(VIRTIO_PCI_STATUS, 1, 0);
        self.write(VIRTIO_PCI_STATUS, 1, 1 | 2);
        self.write(VIRTIO_PCI_GUEST_FEATURES, 4, features);
        for (queue, ring) in RING.iter().enumerate() {
            self.write(VIRTIO_PCI_QUEUE_SEL, 2, queue as u32);
            self.write(VIRTIO_PCI_QUEUE_PFN, 4, (ring >> 12) as u32);
        }
        self.write(VIRTIO_PCI_STATUS, 1, 1 | 2 | 4);
    }

    fn avail(&self, queue: usize) -> u64 {
        RING[queue] + 16 * u64::from(QUEUE_SIZE)
    }

    fn used(&self, queue: usize) -> u64 {
        (self.avail(queue) + 2 * (3 + u64::from(QUEUE_SIZE))).next_multiple_of(4096)
    }

    /// Put one buffer of `data` (or `len` device-writable bytes) on `queue` and notify.
    fn post(&mut self, queue: usize, data: Option<&[u8]>, len: u32) -> u64 {
        let address = self.next_buffer;
        self.next_buffer += u64::from(len).next_multiple_of(64);
        let (length, flags) = match data {
            Some(bytes) => {
                self.memory.write(address, bytes).unwrap();
                (bytes.len() as u32, 0u16)
            }
            None => (len, 2u16), // VRING_DESC_F_WRITE
        };
        let index = self.next_descriptor[queue];
        self.next_descriptor[queue] = (index + 1) % QUEUE_SIZE;
        let descriptor = RING[queue] + 16 * u64::from(index);
        let mut entry = address.to_le_bytes().to_vec();
        entry.extend_from_slice(&length.to_le_bytes());
        entry.extend_from_slice(&flags.to_le_bytes());
        entry.extend_from_slice(&0u16.to_le_bytes());
        self.memory.write(descriptor, &entry).unwrap();
        let avail = self.avail(queue);
        let slot = u64::from(self.next_avail[queue] % QUEUE_SIZE);
        self.memory.store_u16(avail + 4 + 2 * slot, index).unwrap();
        self.next_avail[queue] = self.next_avail[queue].wrapping_add(1);
        self.memory
            .store_u16(avail + 2, self.next_avail[queue])
            .unwrap();
        self.write(VIRTIO_PCI_QUEUE_NOTIFY, 2, queue as u32);
        address
    }

    /// The next `count` used entries of `queue` (descriptor id, length), waiting up to 2 s.
    fn used_entries(&mut self, queue: usize, count: usize) -> Vec<(u32, u32)> {
        let used = self.used(queue);
        let deadline = Instant::now() + Duration::from_secs(2);
        while self
            .memory
            .load_u16(used + 2)
            .unwrap()
            .wrapping_sub(self.seen_used[queue])
            < count as u16
        {
            assert!(
                Instant::now() < deadline,
                "no used entries on queue {queue}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        (0..count)
            .map(|_| {
                let slot = u64::from(self.seen_used[queue] % QUEUE_SIZE);
                self.seen_used[queue] = self.seen_used[queue].wrapping_add(1);
                let mut entry = [0u8; 8];
                self.memory.read(used + 4 + 8 * slot, &mut entry).unwrap();
                (
                    u32::from_le_bytes(entry[..4].try_into().unwrap()),
                    u32::from_le_bytes(entry[4..].try_into().unwrap()),
                )
            })
            .collect()
    }

    fn used_count(&self, queue: usize) -> u16 {
        self.memory.load_u16(self.used(queue) + 2).unwrap()
    }
}

fn frame(length: usize, seed: u8) -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&MAC);
    frame.extend_from_slice(&[0x88, 0xb5]);
    frame.extend((0..length - 14).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    frame
}

const MRG_RXBUF: u32 = 1 << VIRTIO_NET_F_MRG_RXBUF;

#[test]
fn identity_configuration_and_features_as_bhyve() {
    let mut driver = Driver::new(None);
    let config: Vec<u8> = (0..CONFIG_SIZE as u64)
        .map(|i| driver.read(VIRTIO_PCI_CONFIG_NO_MSIX + i, 1) as u8)
        .collect();
    assert_eq!(config[..6], MAC);
    assert_eq!(config[6..8], [1, 0], "link up");
    assert_eq!(config[8..10], [1, 0], "one queue pair");
    assert_eq!(config[10..12], 1500u16.to_le_bytes());
    let features = driver.read(VIRTIO_PCI_HOST_FEATURES, 4);
    let expected = (1 << VIRTIO_NET_F_MAC)
        | (1 << VIRTIO_NET_F_STATUS)
        | (1 << VIRTIO_F_NOTIFY_ON_EMPTY)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | (1 << VIRTIO_NET_F_MRG_RXBUF);
    assert_eq!(features, expected);
    let identity = driver.device.device().identity();
    assert_eq!(identity.pci_device_id, 0x1000);
    assert_eq!(identity.device_type, 1);
    assert_eq!(identity.class, 2);
    assert_eq!(driver.device.device().queue_sizes(), [1024, 1024]);

    let mut with_mtu = Driver::new(Some(9000));
    assert_ne!(
        with_mtu.read(VIRTIO_PCI_HOST_FEATURES, 4) & (1 << VIRTIO_NET_F_MTU),
        0
    );
    let mtu = with_mtu.read(VIRTIO_PCI_CONFIG_NO_MSIX + 10, 2);
    assert_eq!(mtu, 9000);

    // The driver may set the MAC address, nothing else.
    driver.write(VIRTIO_PCI_CONFIG_NO_MSIX + 4, 2, 0xbbaa);
    driver.write(VIRTIO_PCI_CONFIG_NO_MSIX + 6, 2, 0);
    assert_eq!(driver.read(VIRTIO_PCI_CONFIG_NO_MSIX + 4, 2), 0xbbaa);
    assert_eq!(driver.read(VIRTIO_PCI_CONFIG_NO_MSIX + 6, 2), 1);
}

#[test]
fn transmit_strips_the_header_and_sends_one_frame_per_chain() {
    for (features, header) in [(0, HEADER_LEN), (MRG_RXBUF, MERGEABLE_HEADER_LEN)] {
        let mut driver = Driver::new(None);
        driver.setup(features);
        let sent = frame(200, 1);
        let mut chain = vec![0u8; header];
        chain.extend_from_slice(&sent);
        driver.post(TX_QUEUE, Some(&chain), 0);
        let mut received = vec![0u8; 4096];
        let n = driver.host.recv(&mut received).unwrap();
        assert_eq!(received[..n], sent[..], "header {header}");
        let used = driver.used_entries(TX_QUEUE, 1);
        assert_eq!(used, [(0, sent.len() as u32)]);
    }
}

#[test]
fn receive_prepends_a_zero_header_without_mergeable_buffers() {
    let mut driver = Driver::new(None);
    driver.setup(0);
    let buffer = driver.post(RX_QUEUE, None, 2048);
    let sent = frame(300, 2);
    driver.host.send(&sent).unwrap();
    let used = driver.used_entries(RX_QUEUE, 1);
    assert_eq!(used, [(0, (HEADER_LEN + sent.len()) as u32)]);
    let mut data = vec![0u8; HEADER_LEN + sent.len()];
    driver.memory.read(buffer, &mut data).unwrap();
    assert_eq!(data[..HEADER_LEN], [0; HEADER_LEN]);
    assert_eq!(data[HEADER_LEN..], sent[..]);
}

#[test]
fn mergeable_buffers_spread_a_frame_and_count_them() {
    let mut driver = Driver::new(None);
    driver.setup(MRG_RXBUF);
    let buffers: Vec<u64> = (0..5).map(|_| driver.post(RX_QUEUE, None, 100)).collect();
    let sent = frame(250, 3);
    driver.host.send(&sent).unwrap();
    // 12 + 250 bytes: three buffers of 100, the last holding 62.
    let used = driver.used_entries(RX_QUEUE, 3);
    assert_eq!(used, [(0, 100), (1, 100), (2, 62)]);
    let mut data = Vec::new();
    for (buffer, (_, length)) in buffers.iter().zip(&used) {
        let mut part = vec![0u8; *length as usize];
        driver.memory.read(*buffer, &mut part).unwrap();
        data.extend_from_slice(&part);
    }
    assert_eq!(data[..10], [0; 10]);
    assert_eq!(data[10..12], 3u16.to_le_bytes(), "num_buffers");
    assert_eq!(data[12..], sent[..]);

    // The next frame starts in the next free buffer.
    let second = frame(60, 4);
    driver.host.send(&second).unwrap();
    assert_eq!(driver.used_entries(RX_QUEUE, 1), [(3, 72)]);
}

#[test]
fn frames_wait_in_the_backend_until_the_driver_posts_buffers() {
    let mut driver = Driver::new(None);
    driver.setup(MRG_RXBUF);
    let sent = frame(100, 5);
    driver.host.send(&sent).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(driver.used_count(RX_QUEUE), 0);
    let buffer = driver.post(RX_QUEUE, None, 2048);
    assert_eq!(driver.used_entries(RX_QUEUE, 1), [(0, 112)]);
    let mut data = vec![0u8; 112];
    driver.memory.read(buffer, &mut data).unwrap();
    assert_eq!(data[12..], sent[..]);
}

#[test]
fn a_paused_card_moves_no_frame_until_resumed() {
    let mut driver = Driver::new(None);
    driver.setup(0);
    driver.post(RX_QUEUE, None, 2048);
    driver.device.pause();
    let out = frame(80, 6);
    let mut chain = vec![0u8; HEADER_LEN];
    chain.extend_from_slice(&out);
    driver.post(TX_QUEUE, Some(&chain), 0);
    driver.host.send(&frame(90, 7)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(driver.used_count(TX_QUEUE), 0, "sent while paused");
    assert_eq!(driver.used_count(RX_QUEUE), 0, "received while paused");
    driver.device.resume();
    assert_eq!(driver.used_entries(TX_QUEUE, 1), [(0, 80)]);
    assert_eq!(driver.used_entries(RX_QUEUE, 1), [(0, 100)]);
    let mut received = vec![0u8; 4096];
    let n = driver.host.recv(&mut received).unwrap();
    assert_eq!(received[..n], out[..]);
}

#[test]
fn saved_state_carries_the_mac_and_the_rings() {
    let mut driver = Driver::new(None);
    driver.setup(MRG_RXBUF);
    driver.write(VIRTIO_PCI_CONFIG_NO_MSIX, 2, 0x6602);
    driver.post(RX_QUEUE, None, 2048);
    driver.host.send(&frame(64, 8)).unwrap();
    driver.used_entries(RX_QUEUE, 1);
    driver.device.pause();
    let state = driver.device.save().unwrap();

    let mut restored = Driver::new(None);
    restored.device.pause();
    restored.device.restore(&state).unwrap();
    assert_eq!(restored.read(VIRTIO_PCI_CONFIG_NO_MSIX, 2), 0x6602);
    assert_eq!(
        restored.device.queues()[RX_QUEUE].state(),
        state.queues[RX_QUEUE]
    );
    assert_eq!(state.queues[RX_QUEUE].next_used, 1);
    assert!(restored
        .device
        .restore(&crate::devices::virtio::pci::TransportState {
            device: vec![9, 9],
            ..state
        })
        .is_err());
}

type Attached = (crate::devices::Devices, Arc<crate::bus::Buses>);

fn attach_config(pairs: &[(&str, &str)]) -> Result<Attached, String> {
    let config = crate::config::Config::from_pairs(pairs);
    crate::devices::check_supported(&config, &crate::vmm::PlatformCaps::KVM)
        .map_err(|e| e.to_string())?;
    let buses = Arc::new(crate::bus::Buses::default());
    let memory = Arc::new(GuestMemory::new(16 << 20).unwrap());
    crate::devices::attach(
        &config,
        &crate::vmm::PlatformCaps::KVM,
        &buses,
        Arc::new(NoInterrupts),
        crate::vcpu::VmControl::new(),
        memory,
    )
    .map(|devices| (devices, buses))
    .map_err(|e| e.to_string())
}

/// The MAC a card gets from the registry's plan, read back through the device model.
fn planned_mac(pairs: &[(&str, &str)]) -> [u8; 6] {
    let (devices, buses) = attach_config(pairs).unwrap();
    let slot = PciAddress::new(0, 5, 0).unwrap();
    let bar = crate::devices::pci::PCIR_BAR0 + 4 * IO_BAR;
    let io = u64::from(devices.pci().unwrap().config_read(slot, bar, 4) & !3);
    let mut mac = [0u8; 6];
    for (i, byte) in mac.iter_mut().enumerate() {
        buses.pio.read(
            io + VIRTIO_PCI_CONFIG_NO_MSIX + i as u64,
            std::slice::from_mut(byte),
        );
    }
    mac
}

#[test]
fn the_plan_derives_the_mac_from_name_and_slot_or_takes_mac() {
    let base = [
        ("name", "guest"),
        ("virtio_msix", "false"),
        ("pci.0.5.0.device", "virtio-net"),
    ];
    assert_eq!(planned_mac(&base), generate_mac("guest", 5, 0));
    let mut with_mac = base.to_vec();
    with_mac.push(("pci.0.5.0.mac", "00:a0:98:01:02:03"));
    assert_eq!(planned_mac(&with_mac), [0x00, 0xa0, 0x98, 1, 2, 3]);
}

#[test]
fn bad_settings_are_refused_before_the_vm_is_built() {
    for (key, value, expected) in [
        (
            "mac",
            "01:00:5e:00:00:01",
            "invalid value \"01:00:5e:00:00:01\" for \"pci.0.5.0.mac\"",
        ),
        (
            "mac",
            "nonsense",
            "invalid value \"nonsense\" for \"pci.0.5.0.mac\"",
        ),
        ("mtu", "45", "invalid value \"45\" for \"pci.0.5.0.mtu\""),
        (
            "mtu",
            "65536",
            "invalid value \"65536\" for \"pci.0.5.0.mtu\"",
        ),
        ("backend", "netgraph", "netgraph(4)"),
        ("backend", "vale0:1", "netmap(4)"),
        ("backend", "wlan0", "network backend \"wlan0\" is unknown"),
    ] {
        let node_key = format!("pci.0.5.0.{key}");
        let error = match attach_config(&[("pci.0.5.0.device", "virtio-net"), (&node_key, value)]) {
            Err(e) => e,
            Ok(_) => panic!("{key}={value} accepted"),
        };
        assert!(error.contains(expected), "{error} lacks {expected}");
    }
    // In range: accepted.
    attach_config(&[("pci.0.5.0.device", "virtio-net"), ("pci.0.5.0.mtu", "46")]).unwrap();
}
