//! e1000 end to end: the test guest's driver (tests/guests, `e1000`) first against QEMU's
//! `e1000-82545em` (the same chip as bhyve's e1000; QEMU's plain `e1000` is an 82540EM), the
//! independent oracle, then against `bhyve -s N,e1000` with the same commands and the same expected
//! answers. Frames go through a tap interface watched from the host with a packet socket:
//! plain frames both ways, a UDP packet whose checksums the card inserts, a TCP send the card
//! segments (TSO); through slirp the gateway's ARP answer; and a checkpoint while the guest
//! echoes frames.

#[path = "common/mod.rs"]
mod common;

use common::control::Scratch;
use common::kvm_usable;
use common::net::{boot_bhyve, boot_qemu, slirp_usable};
use common::{vm_name, Console, COMMAND_TIMEOUT};

const MAC: &str = "58:9c:fc:00:00:06";
/// What libslirp's gateway answers ARP with (52:55 and the gateway's IPv4 address).
const SLIRP_GATEWAY_MAC: &str = "52:55:0a:00:02:02";

fn qemu_e1000(netdev: &str) -> Vec<String> {
    vec![
        "-netdev".into(),
        netdev.into(),
        "-device".into(),
        format!("e1000-82545em,netdev=n0,mac={MAC}"),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The MAC address (read from the EEPROM), the EEPROM checksum rule, the link.
fn check_info(vm: &mut Console) {
    assert_eq!(
        vm.command_line("e1000 info"),
        format!("e1000 mac {MAC} eeprom-sum 0xbaba link up")
    );
}

#[test]
fn slirp_gateway_answers_through_qemu() {
    if !slirp_usable() {
        return;
    }
    let args = qemu_e1000("user,id=n0,restrict=on");
    let Some(mut vm) = boot_qemu(&strs(&args)) else {
        return;
    };
    check_info(&mut vm);
    assert_eq!(
        vm.command_line("e1000 arp"),
        format!("e1000 arp 10.0.2.2 is-at {SLIRP_GATEWAY_MAC}")
    );
}

#[test]
fn slirp_gateway_answers_through_bhyve_as_through_qemu() {
    if !kvm_usable() || !slirp_usable() {
        return;
    }
    let scratch = Scratch::new("e1000-slirp");
    let name = vm_name();
    let slot = format!("5,e1000,slirp,mac={MAC}");
    let mut vm = boot_bhyve(&scratch, &name, &["-s", &slot]);
    check_info(&mut vm);
    assert_eq!(
        vm.command_line("e1000 arp"),
        format!("e1000 arp 10.0.2.2 is-at {SLIRP_GATEWAY_MAC}")
    );
    vm.send_line("halt");
    assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
}

#[cfg(target_os = "linux")]
mod tap {
    use super::*;
    use common::net::{self, fnv1a, Tap};

    const MAC_BYTES: [u8; 6] = [0x58, 0x9c, 0xfc, 0, 0, 6];

    /// The ones'-complement sum of big-endian words (RFC 1071), folded.
    fn internet_sum(data: &[u8], mut sum: u32) -> u16 {
        for pair in data.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    /// IPv4 header and the TCP or UDP checksum over the pseudo-header both verify.
    fn checksums_verify(frame: &[u8]) -> bool {
        let ip = &frame[14..];
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        let l4 = &ip[20..total];
        let pseudo: u32 = ip[12..20]
            .chunks(2)
            .map(|p| u32::from(u16::from_be_bytes([p[0], p[1]])))
            .sum::<u32>()
            + u32::from(ip[9])
            + l4.len() as u32;
        internet_sum(&ip[..20], 0) == 0xffff && internet_sum(l4, pseudo) == 0xffff
    }

    fn guest_frame(len: usize, seed: u64) -> Vec<u8> {
        net::guest_frame(&MAC_BYTES, len, seed)
    }

    fn from_guest(frame: &[u8]) -> bool {
        net::is_test_frame_from(&MAC_BYTES, frame)
    }

    fn ipv4_from_guest(frame: &[u8]) -> bool {
        frame.len() >= 34 && frame[12..14] == [0x08, 0x00] && frame[6..12] == MAC_BYTES
    }

    fn host_frame(seed: u64, len: usize) -> Vec<u8> {
        net::host_frame(&MAC_BYTES, seed, len)
    }

    /// What the oracle and bhyve must both do.
    fn exercise_tap(vm: &mut Console, tap: &Tap) {
        check_info(vm);
        let sent = guest_frame(300, 9);
        assert_eq!(
            vm.command_line("e1000 send 300 9"),
            format!("e1000 sent 300 ok fnv {:#018x}", fnv1a(&sent))
        );
        assert_eq!(
            tap.receive(COMMAND_TIMEOUT, from_guest).as_deref(),
            Some(&sent[..])
        );

        // Checksum offload: the card fills in the IPv4 and UDP checksums.
        assert_eq!(vm.command_line("e1000 offload 7"), "e1000 offload ok");
        let packet = tap
            .receive(COMMAND_TIMEOUT, ipv4_from_guest)
            .expect("the UDP packet");
        assert_eq!(packet.len(), 14 + 20 + 200);
        assert_eq!(packet[23], 17);
        assert!(checksums_verify(&packet), "offloaded checksums");

        // TSO: 2500 bytes of TCP in segments of 1000, each a complete packet.
        assert_eq!(vm.command_line("e1000 tso 77"), "e1000 tso ok");
        let mut payload = Vec::new();
        for n in 0..3u32 {
            let segment = tap
                .receive(COMMAND_TIMEOUT, ipv4_from_guest)
                .unwrap_or_else(|| panic!("TSO segment {n}"));
            let length = if n < 2 { 1000 } else { 500 };
            assert_eq!(segment.len(), 54 + length, "segment {n}");
            assert!(checksums_verify(&segment), "checksums of segment {n}");
            let ip = &segment[14..];
            assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 77 + n as u16, "IP id");
            let seq = u32::from_be_bytes(ip[24..28].try_into().unwrap());
            assert_eq!(seq, 77 + n * 1000, "sequence of segment {n}");
            let push = ip[33] & 0x08 != 0;
            assert_eq!(push, n == 2, "PSH only on the last segment");
            payload.extend_from_slice(&segment[54..]);
        }
        let expected = guest_frame(54 + 2500, 77);
        assert_eq!(payload, expected[54..], "the payload, in order");

        let to_guest = host_frame(1, 200);
        vm.send_line("e1000 recv");
        vm.expect("e1000 recv waiting\n", COMMAND_TIMEOUT);
        tap.send(&to_guest);
        let line = vm.expect("\n", COMMAND_TIMEOUT);
        assert_eq!(
            line.trim(),
            format!(
                "e1000 recv 200 from 02:00:00:00:00:77 fnv {:#018x}",
                fnv1a(&to_guest)
            )
        );
        vm.expect_prompt(COMMAND_TIMEOUT);

        net::echo_twenty(vm, tap, "e1000", &MAC_BYTES);
    }

    #[test]
    fn frames_offloads_and_tso_through_a_tap_with_qemu() {
        let Some(tap) = Tap::create("eq") else {
            return;
        };
        let args = qemu_e1000(&format!(
            "tap,id=n0,ifname={},script=no,downscript=no",
            tap.name
        ));
        let Some(mut vm) = boot_qemu(&strs(&args)) else {
            return;
        };
        exercise_tap(&mut vm, &tap);
    }

    #[test]
    fn frames_offloads_and_tso_through_a_tap_with_bhyve_as_with_qemu() {
        if !kvm_usable() {
            return;
        }
        let Some(tap) = Tap::create("eb") else {
            return;
        };
        let scratch = Scratch::new("e1000-tap");
        let name = vm_name();
        let slot = format!("5,e1000,{},mac={MAC}", tap.name);
        let mut vm = boot_bhyve(&scratch, &name, &["-s", &slot]);
        exercise_tap(&mut vm, &tap);
        vm.send_line("halt");
        assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
    }

    /// Without `mac=` the card has bhyve's derived address: the OUI, then the first three
    /// bytes of MD5("5-0-<vm name>").
    #[test]
    fn the_derived_mac_address_is_in_the_eeprom() {
        if !kvm_usable() {
            return;
        }
        let scratch = Scratch::new("e1000-genmac");
        let name = vm_name();
        let mut vm = boot_bhyve(&scratch, &name, &["-s", "5,e1000"]);
        let digest = md5_prefix(&format!("5-0-{name}"));
        assert_eq!(
            vm.command_line("e1000 info"),
            format!(
                "e1000 mac 58:9c:fc:{:02x}:{:02x}:{:02x} eeprom-sum 0xbaba link up",
                digest[0], digest[1], digest[2]
            )
        );
        vm.send_line("halt");
        assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
    }

    /// MD5 from the host's md5sum, an oracle independent of the project's own.
    fn md5_prefix(text: &str) -> [u8; 3] {
        use std::io::Write;
        let mut child = std::process::Command::new("md5sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("md5sum");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let hex = String::from_utf8_lossy(&out.stdout);
        let byte = |i: usize| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
        [byte(0), byte(1), byte(2)]
    }

    /// A checkpoint while the guest echoes a stream of frames: every frame sent before, during
    /// and after comes back intact, once, and the guest goes on.
    #[cfg(feature = "bhyve_snapshot")]
    #[test]
    fn a_checkpoint_while_frames_flow_through_the_e1000() {
        if !kvm_usable() {
            return;
        }
        let Some(tap) = Tap::create("es") else {
            return;
        };
        let scratch = Scratch::new("e1000-snap");
        let name = vm_name();
        let slot = format!("5,e1000,{},mac={MAC}", tap.name);
        let mut vm = boot_bhyve(&scratch, &name, &["-s", &slot]);
        vm.send_line("e1000 echo");
        vm.expect("e1000 echo started\n", COMMAND_TIMEOUT);
        net::checkpoint_while_echoing(&mut vm, &tap, &scratch, &name, "e1000", &MAC_BYTES);
        vm.send_line("halt");
        assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
    }

    /// A suspend while the guest echoes frames, then `bhyve -r`: the restored card has its
    /// rings where the guest left them and echoes on, each frame once.
    #[cfg(feature = "bhyve_snapshot")]
    #[test]
    fn an_e1000_restored_from_a_suspend_echoes_on() {
        use common::control::suspend;
        use std::time::{Duration, Instant};
        if !kvm_usable() {
            return;
        }
        let Some(tap) = Tap::create("er") else {
            return;
        };
        let scratch = Scratch::new("e1000-restore");
        let name = vm_name();
        let slot = format!("5,e1000,{},mac={MAC}", tap.name);
        let mut vm = boot_bhyve(&scratch, &name, &["-s", &slot]);
        vm.send_line("e1000 echo");
        vm.expect("e1000 echo started\n", COMMAND_TIMEOUT);
        for seed in 0..10u64 {
            let frame = host_frame(seed, 90);
            tap.send(&frame);
            let back = tap.receive(COMMAND_TIMEOUT, from_guest).expect("echo");
            assert_eq!(back[12..], frame[12..]);
        }
        let file = scratch.path("suspend.snap");
        suspend(&scratch, &name, &mut vm, &file);
        let mut cmd = common::bhyve();
        cmd.arg("-r").arg(&file);
        cmd.arg("-o").arg(format!("rundir={}", scratch.0.display()));
        let mut vm = Console::spawn("bhyve -r", cmd);
        // The restored process may take a moment to run the guest again: resend until echoed.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut sent = 10u64;
        loop {
            assert!(Instant::now() < deadline, "no echo after the restore");
            let frame = host_frame(500, 90);
            tap.send(&frame);
            sent += 1;
            if tap.receive(Duration::from_secs(1), from_guest).is_some() {
                break;
            }
        }
        for seed in 10..30u64 {
            let frame = host_frame(seed, 60 + seed as usize);
            tap.send(&frame);
            let back = tap
                .receive(COMMAND_TIMEOUT, from_guest)
                .expect("echo after restore");
            assert_eq!(back[12..], frame[12..], "frame {seed}");
            sent += 1;
        }
        vm.send("\n");
        let stopped = vm.expect("\n", COMMAND_TIMEOUT);
        assert!(
            !vm.transcript().contains(common::guest::READY),
            "the guest rebooted"
        );
        // Frames resent while the restored guest was not running yet may have been dropped
        // (as a wire drops them), never echoed twice.
        let count: u64 = stopped
            .trim()
            .strip_prefix("e1000 echo stopped ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{stopped}"));
        assert!(
            (30..=sent).contains(&count),
            "{count} echoed of {sent} sent"
        );
        vm.expect_prompt(COMMAND_TIMEOUT);
        vm.send_line("halt");
        assert_eq!(vm.wait_exit(COMMAND_TIMEOUT).code(), Some(2));
    }
}
