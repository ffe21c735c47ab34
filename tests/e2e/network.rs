//! virtio-net and virtio-console end to end: the test guest's drivers (tests/guests, `vnet`,
//! `vcon`) first against QEMU's legacy devices (`disable-modern=on`), the independent oracle,
//! then against `bhyve` with the same commands and the same expected answers. Frames go
//! through a tap interface the test creates and watches from the host side with a packet
//! socket, and through slirp (the gateway's ARP answer, a `hostfwd` connection); console bytes
//! go through a port's UNIX socket.

#[path = "common/mod.rs"]
mod common;

use common::control::Scratch;
use common::kvm_usable;
use common::net::{boot_bhyve, boot_qemu, free_port, slirp_usable};
use common::{vm_name, Console, COMMAND_TIMEOUT};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

const MAC: &str = "58:9c:fc:00:00:05";
/// What libslirp's gateway answers ARP with (its address 52:55 + the gateway's IPv4 address).
const SLIRP_GATEWAY_MAC: &str = "52:55:0a:00:02:02";

fn qemu_net(netdev: &str) -> Vec<String> {
    vec![
        "-netdev".into(),
        netdev.into(),
        "-device".into(),
        format!("virtio-net-pci,disable-modern=on,netdev=n0,mac={MAC}"),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The gateway's ARP answer, then a host connection to a forwarded port arriving as a SYN.
fn exercise_slirp(vm: &mut Console, port: u16) {
    assert_eq!(
        vm.command_line("vnet arp"),
        format!("vnet arp 10.0.2.2 is-at {SLIRP_GATEWAY_MAC}")
    );
    vm.send_line("vnet syn");
    let client = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        std::net::TcpStream::connect(("127.0.0.1", port)).map(|_| ())
    });
    vm.expect("\n", COMMAND_TIMEOUT); // the command as echoed
    let line = vm.expect("\n", COMMAND_TIMEOUT);
    assert_eq!(line.trim(), "vnet syn from 10.0.2.2 to port 7");
    vm.expect_prompt(COMMAND_TIMEOUT);
    client
        .join()
        .unwrap()
        .expect("host connection to the forwarded port");
}

#[test]
fn slirp_gateway_and_hostfwd_through_qemu() {
    if !slirp_usable() {
        return;
    }
    let port = free_port();
    let netdev = format!("user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:7");
    let args = qemu_net(&netdev);
    let Some(mut vm) = boot_qemu(&strs(&args)) else {
        return;
    };
    exercise_slirp(&mut vm, port);
}

#[test]
fn slirp_gateway_and_hostfwd_through_bhyve_as_through_qemu() {
    if !kvm_usable() || !slirp_usable() {
        return;
    }
    let scratch = Scratch::new("net-slirp");
    let name = vm_name();
    let port = free_port();
    let slot = format!("5,virtio-net,slirp,mac={MAC},hostfwd=tcp:127.0.0.1:{port}-:7");
    let mut vm = boot_bhyve(&scratch, &name, &["-s", &slot]);
    // bhyve's values: link up, MAC|STATUS|MRG_RXBUF accepted, 1024-entry queues.
    assert_eq!(
        vm.command_line("vnet info"),
        format!("vnet mac {MAC} status 1 features 0x00018020 queues 1024 1024")
    );
    exercise_slirp(&mut vm, port);
    vm.send_line("halt");
    assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
}

/// Frames through a tap interface, watched from the host with a packet socket (Linux).
#[cfg(target_os = "linux")]
mod tap {
    use super::*;
    use common::net::{self, fnv1a, Tap};

    const MAC_BYTES: [u8; 6] = [0x58, 0x9c, 0xfc, 0, 0, 5];

    fn guest_frame(len: usize, seed: u64) -> Vec<u8> {
        net::guest_frame(&MAC_BYTES, len, seed)
    }

    fn from_guest(frame: &[u8]) -> bool {
        net::is_test_frame_from(&MAC_BYTES, frame)
    }

    fn host_frame(seed: u64, len: usize) -> Vec<u8> {
        net::host_frame(&MAC_BYTES, seed, len)
    }

    /// A frame out of the guest lands on the host as sent; a frame from the host reaches the
    /// guest; the guest echoes a burst of frames, each intact.
    fn exercise_tap(vm: &mut Console, tap: &Tap) {
        let sent = guest_frame(300, 9);
        assert_eq!(
            vm.command_line("vnet send 300 9"),
            format!("vnet sent 300 ok fnv {:#018x}", fnv1a(&sent))
        );
        assert_eq!(
            tap.receive(COMMAND_TIMEOUT, from_guest).as_deref(),
            Some(&sent[..])
        );

        let to_guest = host_frame(1, 200);
        vm.send_line("vnet recv");
        std::thread::sleep(Duration::from_millis(300));
        tap.send(&to_guest);
        vm.expect("\n", COMMAND_TIMEOUT); // the command as echoed
        let line = vm.expect("\n", COMMAND_TIMEOUT);
        assert_eq!(
            line.trim(),
            format!(
                "vnet recv 200 from 02:00:00:00:00:77 fnv {:#018x}",
                fnv1a(&to_guest)
            )
        );
        vm.expect_prompt(COMMAND_TIMEOUT);

        net::echo_twenty(vm, tap, "vnet", &MAC_BYTES);
    }

    #[test]
    fn frames_through_a_tap_with_qemu() {
        let Some(tap) = Tap::create("q") else {
            return;
        };
        let args = qemu_net(&format!(
            "tap,id=n0,ifname={},script=no,downscript=no",
            tap.name
        ));
        let Some(mut vm) = boot_qemu(&strs(&args)) else {
            return;
        };
        exercise_tap(&mut vm, &tap);
    }

    #[test]
    fn frames_through_a_tap_with_bhyve_as_with_qemu() {
        if !kvm_usable() {
            return;
        }
        let Some(tap) = Tap::create("b") else {
            return;
        };
        let scratch = Scratch::new("net-tap");
        let name = vm_name();
        let slot = format!("5,virtio-net,{},mac={MAC}", tap.name);
        let mut vm = boot_bhyve(&scratch, &name, &["-s", &slot]);
        exercise_tap(&mut vm, &tap);
        vm.send_line("halt");
        assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
    }

    /// A checkpoint while the guest echoes a stream of frames: every frame sent before, during
    /// and after comes back intact, and the guest goes on.
    #[cfg(feature = "bhyve_snapshot")]
    #[test]
    fn a_checkpoint_while_frames_flow_leaves_the_card_working() {
        if !kvm_usable() {
            return;
        }
        let Some(tap) = Tap::create("s") else {
            return;
        };
        let scratch = Scratch::new("net-snap");
        let name = vm_name();
        let slot = format!("5,virtio-net,{},mac={MAC}", tap.name);
        let mut vm = boot_bhyve(&scratch, &name, &["-s", &slot]);
        vm.send_line("vnet echo");
        vm.expect("vnet echo started\n", COMMAND_TIMEOUT);
        net::checkpoint_while_echoing(&mut vm, &tap, &scratch, &name, "vnet", &MAC_BYTES);
        vm.send_line("halt");
        assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
    }

    /// A suspend while the guest echoes frames, then `bhyve -r`: the restored card attaches the
    /// same tap and the guest, still in its echo loop, answers the frames sent after.
    #[cfg(feature = "bhyve_snapshot")]
    #[test]
    fn a_card_restored_from_a_suspend_echoes_on() {
        use common::control::suspend;
        if !kvm_usable() {
            return;
        }
        let Some(tap) = Tap::create("r") else {
            return;
        };
        let scratch = Scratch::new("net-restore");
        let name = vm_name();
        let slot = format!("5,virtio-net,{},mac={MAC}", tap.name);
        let mut vm = boot_bhyve(&scratch, &name, &["-s", &slot]);
        vm.send_line("vnet echo");
        vm.expect("vnet echo started\n", COMMAND_TIMEOUT);
        for seed in 0..10u64 {
            let frame = host_frame(seed, 90);
            tap.send(&frame);
            assert_eq!(
                tap.receive(COMMAND_TIMEOUT, from_guest).expect("echo")[12..],
                frame[12..]
            );
        }
        let file = scratch.path("suspend.snap");
        suspend(&scratch, &name, &mut vm, &file);
        let mut cmd = common::bhyve();
        cmd.arg("-r").arg(&file);
        cmd.arg("-o").arg(format!("rundir={}", scratch.0.display()));
        let mut vm = Console::spawn("bhyve -r", cmd);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut first = None;
        // The restored process may take a moment to run the guest again: resend until echoed.
        while first.is_none() {
            assert!(Instant::now() < deadline, "no echo after the restore");
            let frame = host_frame(500, 90);
            tap.send(&frame);
            first = tap.receive(Duration::from_secs(1), from_guest);
        }
        for seed in 10..30u64 {
            let frame = host_frame(seed, 60 + seed as usize);
            tap.send(&frame);
            let back = tap
                .receive(COMMAND_TIMEOUT, from_guest)
                .expect("echo after restore");
            assert_eq!(back[12..], frame[12..], "frame {seed}");
        }
        vm.send("\n");
        let stopped = vm.expect("\n", COMMAND_TIMEOUT);
        assert!(
            !vm.transcript().contains(common::guest::READY),
            "the guest rebooted"
        );
        assert!(stopped.contains("vnet echo stopped"), "{stopped}");
        vm.expect_prompt(COMMAND_TIMEOUT);
        vm.send_line("halt");
        assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
    }
}

/// Bytes written to the port's socket come back from the guest's echo.
fn exercise_console(vm: &mut Console, socket: &Path) {
    vm.send_line("vcon echo");
    vm.expect("vcon echo started\n", COMMAND_TIMEOUT);
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let mut stream = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("connect {}: {e}", socket.display()),
        }
    };
    stream.set_read_timeout(Some(COMMAND_TIMEOUT)).unwrap();
    let message = b"through the virtio console and back\n";
    stream.write_all(message).unwrap();
    let mut back = vec![0u8; message.len()];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(back, message);
    vm.send("\n");
    vm.expect(
        &format!("vcon echo stopped {}\n", message.len()),
        COMMAND_TIMEOUT,
    );
    vm.expect_prompt(COMMAND_TIMEOUT);
}

#[test]
fn console_port_echo_through_qemu() {
    let scratch = Scratch::new("vtcon-qemu");
    let socket = scratch.path("port0.sock");
    let chardev = format!("socket,id=c0,path={},server=on,wait=off", socket.display());
    let args = [
        "-chardev",
        &chardev,
        "-device",
        "virtio-serial-pci,disable-modern=on",
        "-device",
        "virtconsole,chardev=c0,nr=0",
    ];
    let Some(mut vm) = boot_qemu(&args) else {
        return;
    };
    exercise_console(&mut vm, &socket);
}

#[test]
fn console_port_echo_through_bhyve_as_through_qemu() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("vtcon-bhyve");
    let socket = scratch.path("port0.sock");
    let name = vm_name();
    let slot = format!("6,virtio-console,org.test.echo={}", socket.display());
    let mut vm = boot_bhyve(&scratch, &name, &["-s", &slot]);
    assert_eq!(
        vm.command_line("vcon info"),
        "vcon cols 80 rows 25 max_ports 16 offered 0x00000003"
    );
    exercise_console(&mut vm, &socket);
    vm.send_line("halt");
    assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
    assert!(!socket.exists(), "the port's socket is removed at exit");
}

/// Multiport: with a client already on port 1's socket, the guest's DEVICE_READY brings
/// DEVICE_ADD, and its PORT_READY the port's name and PORT_OPEN, in that order; then bytes
/// echo through port 1's queues.
fn exercise_multiport(vm: &mut Console, socket: &Path) {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(COMMAND_TIMEOUT)).unwrap();
    // Let the device take the client before the driver starts.
    std::thread::sleep(Duration::from_millis(300));
    vm.send_line("vcon port1");
    vm.expect(
        "vcon event 1 add 1\nvcon event 1 name 1 org.test.one\nvcon event 1 open 1\n",
        COMMAND_TIMEOUT,
    );
    let message = b"port one, multiport\n";
    stream.write_all(message).unwrap();
    let mut back = vec![0u8; message.len()];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(back, message);
    vm.send("\n");
    vm.expect(
        &format!("vcon port1 stopped {}\n", message.len()),
        COMMAND_TIMEOUT,
    );
    vm.expect_prompt(COMMAND_TIMEOUT);
}

#[test]
fn console_multiport_through_qemu() {
    let scratch = Scratch::new("vtcon-mp-qemu");
    let socket = scratch.path("port1.sock");
    let chardev = format!("socket,id=c1,path={},server=on,wait=off", socket.display());
    let args = [
        "-chardev",
        &chardev,
        "-device",
        "virtio-serial-pci,disable-modern=on",
        "-device",
        "virtserialport,chardev=c1,nr=1,name=org.test.one",
    ];
    let Some(mut vm) = boot_qemu(&args) else {
        return;
    };
    exercise_multiport(&mut vm, &socket);
}

#[test]
fn console_multiport_through_bhyve_as_through_qemu() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("vtcon-mp-bhyve");
    let socket = scratch.path("port1.sock");
    let name = vm_name();
    let path = format!("pci.0.6.0.port.1.path={}", socket.display());
    let mut vm = boot_bhyve(
        &scratch,
        &name,
        &[
            "-s",
            "6,virtio-console",
            "-o",
            "pci.0.6.0.port.1.name=org.test.one",
            "-o",
            &path,
        ],
    );
    exercise_multiport(&mut vm, &socket);
    vm.send_line("halt");
    assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
}

/// A checkpoint while bytes go back and forth through a console port: the client stays
/// connected and the echo goes on.
#[cfg(feature = "bhyve_snapshot")]
#[test]
fn a_checkpoint_while_a_console_port_echoes() {
    use common::control::ctl;
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("vtcon-snap");
    let socket = scratch.path("port0.sock");
    let name = vm_name();
    let slot = format!("6,virtio-console,org.test.echo={}", socket.display());
    let mut vm = boot_bhyve(&scratch, &name, &["-s", &slot]);
    vm.send_line("vcon echo");
    vm.expect("vcon echo started\n", COMMAND_TIMEOUT);
    let mut stream = UnixStream::connect(&socket).unwrap();
    stream.set_read_timeout(Some(COMMAND_TIMEOUT)).unwrap();
    let mut total = 0usize;
    let round = |stream: &mut UnixStream, n: usize| {
        let message = format!("round {n} through the port\n");
        stream.write_all(message.as_bytes()).unwrap();
        let mut back = vec![0u8; message.len()];
        stream.read_exact(&mut back).unwrap();
        assert_eq!(back, message.as_bytes(), "round {n}");
        message.len()
    };
    for n in 0..10 {
        total += round(&mut stream, n);
    }
    let file = scratch.path("live.snap");
    let (code, err) = ctl(
        &scratch.0,
        &name,
        &[format!("--checkpoint={}", file.display())],
    );
    assert_eq!(code, 0, "bhyvectl --checkpoint failed: {err}");
    for n in 10..20 {
        total += round(&mut stream, n);
    }
    vm.send("\n");
    vm.expect(&format!("vcon echo stopped {total}\n"), COMMAND_TIMEOUT);
    vm.send_line("halt");
    assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
}
