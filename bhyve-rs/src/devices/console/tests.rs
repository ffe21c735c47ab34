use super::socket::*;
use crate::config::Config;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("bhyve-vtcon-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config(pairs: &[(&str, &str)]) -> Config {
    let mut config = Config::new();
    for (key, value) in pairs {
        config.set(&format!("pci.0.3.0.{key}"), value);
    }
    config
}

#[test]
fn ports_come_from_port_nodes_in_number_order() {
    let config = config(&[
        ("port.2.name", "org.example.two"),
        ("port.2.path", "/tmp/two.sock"),
        ("port.0.name", "zero"),
        ("port.0.path", "/tmp/zero.sock"),
        ("port.15.name", "last"),
        ("port.15.path", "/tmp/last.sock"),
    ]);
    let ports = ports_from_config(&config, "pci.0.3.0").unwrap();
    let ids: Vec<_> = ports.iter().map(|p| (p.id, p.name.as_str())).collect();
    assert_eq!(ids, [(0, "zero"), (2, "org.example.two"), (15, "last")]);
    assert_eq!(ports[1].path, std::path::Path::new("/tmp/two.sock"));
    assert!(ports_from_config(&Config::new(), "pci.0.3.0")
        .unwrap()
        .is_empty());
}

#[test]
fn bad_port_nodes_are_one_clear_error_each() {
    for (pairs, expected) in [
        (
            &[("port.16.name", "n"), ("port.16.path", "/tmp/p")][..],
            "Invalid port 16",
        ),
        (
            &[("port.x.name", "n"), ("port.x.path", "/tmp/p")][..],
            "Invalid port x",
        ),
        (
            &[("port.-1.name", "n"), ("port.-1.path", "/tmp/p")][..],
            "Invalid port -1",
        ),
        (
            &[("port.0.name", "n")][..],
            "required path missing for port 0",
        ),
        (
            &[("port.3.path", "/tmp/p")][..],
            "required name missing for port 3",
        ),
        (
            &[
                ("port.0.name", "same"),
                ("port.0.path", "/tmp/a"),
                ("port.1.name", "same"),
                ("port.1.path", "/tmp/b"),
            ][..],
            "\"same\"",
        ),
    ] {
        let error = ports_from_config(&config(pairs), "pci.0.3.0")
            .unwrap_err()
            .to_string();
        assert!(error.contains(expected), "{error} lacks {expected}");
    }
}

/// The legacy `-s` syntax `name=path,…` becomes the port nodes these read.
#[test]
fn legacy_option_string_becomes_port_nodes() {
    let mut config = Config::new();
    let emulation = crate::devices::registry::pci_emulation("virtio-console").unwrap();
    let mut writer = crate::config::legacy::LegacyWriter {
        config: &mut config,
    };
    (emulation.legacy_config)(
        &mut writer,
        "pci.0.3.0",
        Some("com.a=/tmp/a.sock,com.b=/tmp/b.sock"),
    )
    .unwrap();
    let ports = ports_from_config(&config, "pci.0.3.0").unwrap();
    assert_eq!(
        ports,
        [
            PortSpec {
                id: 0,
                name: "com.a".into(),
                path: "/tmp/a.sock".into()
            },
            PortSpec {
                id: 1,
                name: "com.b".into(),
                path: "/tmp/b.sock".into()
            },
        ]
    );
}

fn wait_until(mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn receive_all(port: &mut SocketPort, want: usize) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buffer = [0u8; 7];
    wait_until(|| {
        if let Received::Data(n) = port.receive(&mut buffer) {
            got.extend_from_slice(&buffer[..n]);
        }
        got.len() >= want
    });
    got
}

#[test]
fn one_client_at_a_time_bytes_both_ways_and_reconnect() {
    let dir = temp_dir("echo");
    let spec = PortSpec {
        id: 0,
        name: "test".into(),
        path: dir.join("port.sock"),
    };
    let mut port = SocketPort::bind(&spec).unwrap();
    assert!(is_socket(&spec.path));
    assert!(!port.is_open());
    assert_eq!(port.receive(&mut [0; 4]), Received::Closed);
    assert!(port.send(b"lost: nobody listens"));

    let mut client = UnixStream::connect(&spec.path).unwrap();
    wait_until(|| port.accept());
    assert!(port.is_open());

    // A second client is turned away: it reads end-of-file.
    let mut second = UnixStream::connect(&spec.path).unwrap();
    assert!(!port.accept());
    second
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    assert_eq!(second.read(&mut [0; 4]).unwrap(), 0);

    client.write_all(b"host to guest").unwrap();
    assert_eq!(receive_all(&mut port, 13), b"host to guest");

    assert!(port.send(b"guest to host"));
    let mut reply = [0u8; 13];
    client.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"guest to host");

    drop(client);
    wait_until(|| port.receive(&mut [0; 4]) == Received::Closed);
    assert!(!port.is_open());

    // The port takes the next client.
    let mut again = UnixStream::connect(&spec.path).unwrap();
    wait_until(|| port.accept());
    again.write_all(b"x").unwrap();
    assert_eq!(receive_all(&mut port, 1), b"x");

    drop(port);
    assert!(!spec.path.exists(), "socket file left behind");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_client_that_does_not_read_is_queued_for_then_dropped() {
    let dir = temp_dir("slow");
    let spec = PortSpec {
        id: 1,
        name: "slow".into(),
        path: dir.join("slow.sock"),
    };
    let mut port = SocketPort::bind(&spec).unwrap();
    let mut client = UnixStream::connect(&spec.path).unwrap();
    wait_until(|| port.accept());
    let chunk = vec![0xa5u8; 64 * 1024];
    let mut sent = 0;
    while port.send(&chunk) {
        sent += chunk.len();
        assert!(sent <= 64 * MAX_PENDING, "never disconnected");
    }
    assert!(!port.is_open());
    assert!(sent >= MAX_PENDING, "disconnected after only {sent} bytes");
    // What was written before the cut arrives intact, then end-of-file.
    let mut received = Vec::new();
    client.read_to_end(&mut received).unwrap();
    assert!(received.iter().all(|&b| b == 0xa5));
    assert!(received.len() <= sent);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_existing_file_at_the_path_is_refused_and_left_alone() {
    let dir = temp_dir("exists");
    let path = dir.join("taken");
    std::fs::write(&path, b"keep me").unwrap();
    let spec = PortSpec {
        id: 0,
        name: "p".into(),
        path: path.clone(),
    };
    let error = match SocketPort::bind(&spec) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("bound over a file"),
    };
    assert!(error.contains("cannot create port p"), "{error}");
    assert!(error.contains("taken"), "{error}");
    assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    let error = match SocketPort::bind(&PortSpec {
        path: dir.join("no-such-dir/x.sock"),
        ..spec
    }) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("bound in a missing directory"),
    };
    assert!(error.contains("no-such-dir"), "{error}");
    let _ = std::fs::remove_dir_all(&dir);
}

mod device {
    use super::*;
    use crate::devices::console::*;
    use crate::devices::virtio::{
        VIRTIO_PCI_HOST_FEATURES, VIRTIO_PCI_QUEUE_NOTIFY, VIRTIO_PCI_STATUS,
    };
    use crate::devices::virtio_test_driver::Driver;

    const MULTIPORT: u32 = (1 << F_SIZE) | (1 << F_MULTIPORT);

    struct Console {
        driver: Driver,
        dir: std::path::PathBuf,
        /// Control receive buffers posted, by descriptor id.
        control_buffers: Vec<u64>,
    }

    impl Drop for Console {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A console with ports `ids` named `port<id>` in a fresh directory.
    fn console(tag: &str, ids: &[usize]) -> Console {
        console_over(tag, ids, None)
    }

    fn console_over(
        tag: &str,
        ids: &[usize],
        memory: Option<std::sync::Arc<crate::memory::GuestMemory>>,
    ) -> Console {
        let dir = temp_dir(tag);
        let sockets = ids
            .iter()
            .map(|&id| {
                SocketPort::bind(&PortSpec {
                    id,
                    name: format!("port{id}"),
                    path: dir.join(format!("p{id}.sock")),
                })
                .unwrap()
            })
            .collect();
        let device = VirtioConsole::new(sockets, "vtcon test").unwrap();
        let driver = match memory {
            Some(memory) => Driver::with_memory(Box::new(device), memory),
            None => Driver::new(Box::new(device)),
        };
        Console {
            driver,
            dir,
            control_buffers: Vec::new(),
        }
    }

    impl Console {
        fn path(&self, id: usize) -> std::path::PathBuf {
            self.dir.join(format!("p{id}.sock"))
        }

        fn post_control_buffers(&mut self, count: usize) {
            for _ in 0..count {
                let address = self.driver.post(CONTROL_RX_QUEUE, None, 64);
                self.control_buffers.push(address);
            }
        }

        fn send_control(&mut self, id: u32, event: u16, value: u16) {
            let mut message = id.to_le_bytes().to_vec();
            message.extend_from_slice(&event.to_le_bytes());
            message.extend_from_slice(&value.to_le_bytes());
            self.driver.post(CONTROL_TX_QUEUE, Some(&message), 0);
        }

        /// The next control messages to the driver: (id, event, value, payload).
        fn control_messages(&mut self, count: usize) -> Vec<(u32, u16, u16, Vec<u8>)> {
            self.driver
                .used_entries(CONTROL_RX_QUEUE, count)
                .into_iter()
                .map(|(descriptor, length)| {
                    let bytes = self
                        .driver
                        .buffer(self.control_buffers[descriptor as usize], length);
                    (
                        u32::from_le_bytes(bytes[0..4].try_into().unwrap()),
                        u16::from_le_bytes(bytes[4..6].try_into().unwrap()),
                        u16::from_le_bytes(bytes[6..8].try_into().unwrap()),
                        bytes[8..].to_vec(),
                    )
                })
                .collect()
        }

        /// DEVICE_READY, the DEVICE_ADDs, and PORT_READY for each port with its PORT_NAME.
        fn bring_up(&mut self, ids: &[usize]) {
            self.driver.setup(MULTIPORT);
            self.post_control_buffers(32);
            self.send_control(0, DEVICE_READY, 1);
            let added = self.control_messages(ids.len());
            let expected: Vec<_> = ids
                .iter()
                .map(|&id| (id as u32, DEVICE_ADD, 1, vec![]))
                .collect();
            assert_eq!(added, expected);
            for &id in ids {
                self.send_control(id as u32, PORT_READY, 1);
                let named = self.control_messages(1);
                assert_eq!(
                    named,
                    [(id as u32, PORT_NAME, 1, format!("port{id}").into_bytes())]
                );
            }
        }
    }

    #[test]
    fn identity_configuration_and_features_as_bhyve() {
        let mut console = console("identity", &[0]);
        let identity = console.driver.device.device().identity();
        assert_eq!(identity.pci_device_id, 0x1003);
        assert_eq!(identity.device_type, 3);
        assert_eq!(identity.class, 0x07);
        assert_eq!(console.driver.device.device().queue_sizes(), vec![64; 34]);
        assert_eq!(console.driver.read(VIRTIO_PCI_HOST_FEATURES, 4), 0x3);
        let config = console.driver.read_config(0, CONFIG_SIZE);
        assert_eq!(config, [80, 0, 25, 0, 16, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn ports_are_announced_named_opened_and_echo_through_their_sockets() {
        let mut console = console("echo", &[0, 3]);
        console.bring_up(&[0, 3]);

        // A client on port 3: the driver hears it open.
        let mut client = UnixStream::connect(console.path(3)).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        assert_eq!(console.control_messages(1), [(3, PORT_OPEN, 1, vec![])]);

        // Host to guest through port 3's receive queue (8).
        let (receive_queue, transmit_queue) = port_queues(3);
        assert_eq!((receive_queue, transmit_queue), (8, 9));
        let buffer = console.driver.post(receive_queue, None, 32);
        client.write_all(b"ping from host").unwrap();
        let used = console.driver.used_entries(receive_queue, 1);
        assert_eq!(used, [(0, 14)]);
        assert_eq!(console.driver.buffer(buffer, 14), b"ping from host");

        // Guest to host through its transmit queue (9).
        console
            .driver
            .post(transmit_queue, Some(b"pong from guest"), 0);
        let mut reply = [0u8; 15];
        client.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"pong from guest");
        assert_eq!(console.driver.used_entries(transmit_queue, 1), [(0, 0)]);

        // The client leaves: the driver, which keeps receive buffers posted, hears the port
        // close.
        console.driver.post(receive_queue, None, 32);
        drop(client);
        assert_eq!(console.control_messages(1), [(3, PORT_OPEN, 0, vec![])]);
    }

    #[test]
    fn a_client_before_the_driver_is_announced_once_the_port_is_ready() {
        let mut console = console("early", &[1]);
        let _client = UnixStream::connect(console.path(1)).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        console.driver.setup(MULTIPORT);
        console.post_control_buffers(8);
        console.send_control(0, DEVICE_READY, 1);
        assert_eq!(console.control_messages(1), [(1, DEVICE_ADD, 1, vec![])]);
        console.send_control(1, PORT_READY, 1);
        let messages = console.control_messages(2);
        assert_eq!(
            messages,
            [
                (1, PORT_NAME, 1, b"port1".to_vec()),
                (1, PORT_OPEN, 1, vec![])
            ]
        );
    }

    #[test]
    fn control_messages_wait_for_buffers() {
        let mut console = console("wait", &[0, 1]);
        console.driver.setup(MULTIPORT);
        console.send_control(0, DEVICE_READY, 1);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(console.driver.used_count(CONTROL_RX_QUEUE), 0);
        console.post_control_buffers(2);
        assert_eq!(
            console.control_messages(2),
            [(0, DEVICE_ADD, 1, vec![]), (1, DEVICE_ADD, 1, vec![])]
        );
    }

    #[test]
    fn without_multiport_port_zero_still_works_and_no_control_is_sent() {
        let mut console = console("single", &[0]);
        console.driver.setup(1 << F_SIZE);
        let mut client = UnixStream::connect(console.path(0)).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let buffer = console.driver.post(0, None, 16);
        client.write_all(b"abc").unwrap();
        assert_eq!(console.driver.used_entries(0, 1), [(0, 3)]);
        assert_eq!(console.driver.buffer(buffer, 3), b"abc");
        console.driver.post(1, Some(b"xyz"), 0);
        let mut reply = [0u8; 3];
        client.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"xyz");
        console.driver.post(CONTROL_RX_QUEUE, None, 64);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(console.driver.used_count(CONTROL_RX_QUEUE), 0);
    }

    /// Random guest register accesses and ring contents on every queue: nothing panics, and
    /// after a reset the console still brings its ports up.
    #[test]
    fn random_guest_input_never_panics() {
        let mut console = console("fuzz", &[0, 2]);
        let mut rng = crate::test_rng::Rng(0x5eed_c0de);
        console.driver.setup(MULTIPORT);
        let _client = UnixStream::connect(console.path(2)).unwrap();
        console.driver.random_guest_input(&mut || rng.next(), 5000);
        console.control_buffers.clear();
        console.bring_up(&[0, 2]);
    }

    /// A transmit chain whose buffers add up to far more than the host holds (64 buffers of
    /// 2 GiB each over the same RAM): the output is dropped without a client, as bhyve does,
    /// and nothing of that size is allocated.
    #[test]
    fn a_huge_transmit_chain_is_handled_without_a_huge_allocation() {
        let memory = std::sync::Arc::new(crate::memory::GuestMemory::new(3 << 30).unwrap());
        let mut console = console_over("huge", &[0], Some(memory));
        console.driver.setup(1 << F_SIZE);
        let chain = vec![(0u64, 1u32 << 31, 0u16); 64];
        console.driver.post_descriptors_quietly(1, &chain);
        console.driver.write(VIRTIO_PCI_QUEUE_NOTIFY, 2, 1);
        assert_eq!(console.driver.used_entries(1, 1), [(0, 0)]);
        assert_eq!(console.driver.read(VIRTIO_PCI_STATUS, 1), 7);
    }

    #[test]
    fn paused_console_moves_nothing_until_resumed() {
        let mut console = console("pause", &[0]);
        console.bring_up(&[0]);
        let mut client = UnixStream::connect(console.path(0)).unwrap();
        assert_eq!(console.control_messages(1), [(0, PORT_OPEN, 1, vec![])]);
        console.driver.device.pause();
        let buffer = console.driver.post(0, None, 16);
        client.write_all(b"held").unwrap();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(console.driver.used_count(0), 0);
        console.driver.device.resume();
        assert_eq!(console.driver.used_entries(0, 1), [(0, 4)]);
        assert_eq!(console.driver.buffer(buffer, 4), b"held");
    }

    #[test]
    fn after_a_restore_the_driver_hears_the_port_closed() {
        let mut first = console("save", &[2]);
        first.bring_up(&[2]);
        let _client = UnixStream::connect(first.path(2)).unwrap();
        assert_eq!(first.control_messages(1), [(2, PORT_OPEN, 1, vec![])]);
        first.driver.device.pause();
        let state = first.driver.device.save().unwrap();
        let memory = first.driver.memory.clone();
        drop(first);

        // The same configuration in a new process, over the same guest memory.
        let mut second = console_over("save2", &[2], Some(memory));
        second.driver.device.pause();
        second.driver.device.restore(&state).unwrap();
        second.driver.device.resume();
        // The driver's control buffers were posted before the save; the first 3 were used.
        let used = second.driver.used_count(CONTROL_RX_QUEUE);
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while second.driver.used_count(CONTROL_RX_QUEUE) == used {
            assert!(std::time::Instant::now() < deadline, "no PORT_OPEN 0");
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(second
            .driver
            .device
            .restore(&crate::devices::virtio::pci::TransportState {
                device: vec![1, 0, 5],
                ..state
            })
            .is_err());
    }
}

#[test]
fn the_registry_plans_and_makes_the_console_with_its_sockets() {
    let dir = temp_dir("plan");
    let a = dir.join("a.sock");
    let b = dir.join("b.sock");
    let config = Config::from_pairs(&[
        ("virtio_msix", "false"),
        ("pci.0.6.0.device", "virtio-console"),
        ("pci.0.6.0.port.0.name", "org.test.a"),
        ("pci.0.6.0.port.0.path", a.to_str().unwrap()),
        ("pci.0.6.0.port.5.name", "org.test.b"),
        ("pci.0.6.0.port.5.path", b.to_str().unwrap()),
    ]);
    let platform = crate::vmm::PlatformCaps::KVM;
    crate::devices::check_supported(&config, &platform).unwrap();
    // Checking creates nothing.
    assert!(!a.exists());
    let buses = std::sync::Arc::new(crate::bus::Buses::default());
    let devices = crate::devices::attach(
        &config,
        &platform,
        &buses,
        std::sync::Arc::new(crate::devices::virtio_test_driver::NoInterrupts),
        crate::vcpu::VmControl::new(),
        std::sync::Arc::new(crate::memory::GuestMemory::new(16 << 20).unwrap()),
    )
    .map_err(|e| e.to_string())
    .unwrap();
    assert!(is_socket(&a) && is_socket(&b));
    // The buses hold the PCI functions' ranges; the machine drops both.
    drop(devices);
    drop(buses);
    assert!(!a.exists() && !b.exists(), "sockets left behind");

    let bad = Config::from_pairs(&[
        ("pci.0.6.0.device", "virtio-console"),
        ("pci.0.6.0.port.16.name", "x"),
        ("pci.0.6.0.port.16.path", "/tmp/x"),
    ]);
    let error = crate::devices::check_supported(&bad, &platform)
        .unwrap_err()
        .to_string();
    assert_eq!(
        error,
        "pci slot 0:6:0: vtcon: Invalid port 16: not a number from 0 to 15"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
