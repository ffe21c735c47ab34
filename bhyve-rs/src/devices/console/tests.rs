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
