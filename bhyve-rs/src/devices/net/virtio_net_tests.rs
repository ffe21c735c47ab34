//! virtio-net against a legacy driver written here from the virtio specification (0.9.5 /
//! 1.x legacy interface), with a backend whose other end the test holds.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use super::*;
use crate::devices::net::pair_backend::socket_pair_backend;
use crate::devices::virtio::pci::IO_BAR;
use crate::devices::virtio::{VIRTIO_PCI_CONFIG_NO_MSIX, VIRTIO_PCI_HOST_FEATURES};
use crate::devices::virtio_test_driver::{Driver, NoInterrupts};
use crate::memory::GuestMemory;

const MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];

/// A card with the test's backend; the second value is the host end of it.
fn card(mtu: Option<u16>) -> (Driver, UnixDatagram) {
    let (backend, host) = socket_pair_backend();
    let net = VirtioNet::new(MAC, mtu, Some(backend), "vtnet test").unwrap();
    (Driver::new(Box::new(net)), host)
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
    let (mut driver, _host) = card(None);
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

    let (mut with_mtu, _host) = card(Some(9000));
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
        let (mut driver, host) = card(None);
        driver.setup(features);
        let sent = frame(200, 1);
        let mut chain = vec![0u8; header];
        chain.extend_from_slice(&sent);
        driver.post(TX_QUEUE, Some(&chain), 0);
        let mut received = vec![0u8; 4096];
        let n = host.recv(&mut received).unwrap();
        assert_eq!(received[..n], sent[..], "header {header}");
        let used = driver.used_entries(TX_QUEUE, 1);
        assert_eq!(used, [(0, sent.len() as u32)]);
    }
}

#[test]
fn receive_prepends_a_zero_header_without_mergeable_buffers() {
    let (mut driver, host) = card(None);
    driver.setup(0);
    let buffer = driver.post(RX_QUEUE, None, 2048);
    let sent = frame(300, 2);
    host.send(&sent).unwrap();
    let used = driver.used_entries(RX_QUEUE, 1);
    assert_eq!(used, [(0, (HEADER_LEN + sent.len()) as u32)]);
    let mut data = vec![0u8; HEADER_LEN + sent.len()];
    data = driver.buffer(buffer, data.len() as u32);
    assert_eq!(data[..HEADER_LEN], [0; HEADER_LEN]);
    assert_eq!(data[HEADER_LEN..], sent[..]);
}

#[test]
fn mergeable_buffers_spread_a_frame_and_count_them() {
    let (mut driver, host) = card(None);
    driver.setup(MRG_RXBUF);
    let buffers: Vec<u64> = (0..5).map(|_| driver.post(RX_QUEUE, None, 100)).collect();
    let sent = frame(250, 3);
    host.send(&sent).unwrap();
    // 12 + 250 bytes: three buffers of 100, the last holding 62.
    let used = driver.used_entries(RX_QUEUE, 3);
    assert_eq!(used, [(0, 100), (1, 100), (2, 62)]);
    let mut data = Vec::new();
    for (buffer, (_, length)) in buffers.iter().zip(&used) {
        data.extend_from_slice(&driver.buffer(*buffer, *length));
    }
    assert_eq!(data[..10], [0; 10]);
    assert_eq!(data[10..12], 3u16.to_le_bytes(), "num_buffers");
    assert_eq!(data[12..], sent[..]);

    // The next frame starts in the next free buffer.
    let second = frame(60, 4);
    host.send(&second).unwrap();
    assert_eq!(driver.used_entries(RX_QUEUE, 1), [(3, 72)]);
}

#[test]
fn frames_wait_in_the_backend_until_the_driver_posts_buffers() {
    let (mut driver, host) = card(None);
    driver.setup(MRG_RXBUF);
    let sent = frame(100, 5);
    host.send(&sent).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(driver.used_count(RX_QUEUE), 0);
    let buffer = driver.post(RX_QUEUE, None, 2048);
    assert_eq!(driver.used_entries(RX_QUEUE, 1), [(0, 112)]);
    let mut data = vec![0u8; 112];
    data = driver.buffer(buffer, data.len() as u32);
    assert_eq!(data[12..], sent[..]);
}

#[test]
fn a_paused_card_moves_no_frame_until_resumed() {
    let (mut driver, host) = card(None);
    driver.setup(0);
    driver.post(RX_QUEUE, None, 2048);
    driver.device.pause();
    let out = frame(80, 6);
    let mut chain = vec![0u8; HEADER_LEN];
    chain.extend_from_slice(&out);
    driver.post(TX_QUEUE, Some(&chain), 0);
    host.send(&frame(90, 7)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(driver.used_count(TX_QUEUE), 0, "sent while paused");
    assert_eq!(driver.used_count(RX_QUEUE), 0, "received while paused");
    driver.device.resume();
    assert_eq!(driver.used_entries(TX_QUEUE, 1), [(0, 80)]);
    assert_eq!(driver.used_entries(RX_QUEUE, 1), [(0, 100)]);
    let mut received = vec![0u8; 4096];
    let n = host.recv(&mut received).unwrap();
    assert_eq!(received[..n], out[..]);
}

#[test]
fn saved_state_carries_the_mac_and_the_rings() {
    let (mut driver, host) = card(None);
    driver.setup(MRG_RXBUF);
    driver.write(VIRTIO_PCI_CONFIG_NO_MSIX, 2, 0x6602);
    driver.post(RX_QUEUE, None, 2048);
    host.send(&frame(64, 8)).unwrap();
    driver.used_entries(RX_QUEUE, 1);
    driver.device.pause();
    let state = driver.device.save().unwrap();

    let (mut restored, _host) = card(None);
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
