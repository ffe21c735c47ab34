//! Linux's own drivers as the oracle for bhyve-rs' devices: virtio-blk, virtio-net (slirp and
//! tap), virtio-rnd, virtio-console, AHCI, NVMe and e1000, all in one machine.
//!
//! Linux does not find PCI devices added after its boot here, so this machine boots once with
//! every device, like the base guest, and is suspended at its prompt. Each test restores it
//! with the whole command line again, naming its own host side: disk images it filled with a
//! known pattern, a console socket, a tap interface. The restore keeps each disk's serial
//! number (devices/block), so the guest's view of its disks holds.
//!
//! The oracles are the host's: the pattern and checksum of tests/e2e/common/disk.rs computed
//! here against what Linux read and wrote through its drivers (initramfs/blk.c, O_DIRECT),
//! the disk image files themselves, files served by a host TCP port and their sha256sum(1),
//! and a host process at the other end of the console port.

use super::*;
use common::disk::{fnv, pattern};
use common::net::{slirp_usable, Tap};
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;

const DEVICES_VM: &str = "linux-devices";
/// Sectors of each disk image (4 MiB): the size a restored disk must keep.
const DISK_SECTORS: u64 = 8192;

/// A disk emulation, the node Linux gives it and the fill pattern of its image.
#[derive(Clone, Copy)]
struct Disk {
    slot: u8,
    /// What follows the slot on the command line, before the image's path.
    emulation: &'static str,
    file: &'static str,
    dev: &'static str,
    seed: u64,
}

const VIRTIO_BLK: Disk = Disk {
    slot: 3,
    emulation: "virtio-blk,",
    file: "virtio-blk.img",
    dev: "/dev/vda",
    seed: 3,
};
const AHCI: Disk = Disk {
    slot: 8,
    emulation: "ahci,hd:",
    file: "ahci.img",
    dev: "/dev/sda",
    seed: 8,
};
const NVME: Disk = Disk {
    slot: 9,
    emulation: "nvme,",
    file: "nvme.img",
    dev: "/dev/nvme0n1",
    seed: 9,
};
const DISKS: [Disk; 3] = [VIRTIO_BLK, AHCI, NVME];

/// The network cards, by the MAC address the guest finds each by.
const VIRTIO_NET_SLIRP_MAC: &str = "58:9c:fc:00:00:04";
const VIRTIO_NET_TAP_MAC: &str = "58:9c:fc:00:00:05";
const E1000_SLIRP_MAC: &str = "58:9c:fc:00:00:0a";
/// The name of the virtio-console port.
const PORT: &str = "port1";

/// Where the devices' host sides are: the disk images and the console socket in `dir`; the
/// backend of the second virtio-net card, slirp or a tap (`tap` names it).
struct DeviceHost {
    dir: PathBuf,
    tap: Option<String>,
}

impl DeviceHost {
    fn image(&self, disk: Disk) -> PathBuf {
        self.dir.join(disk.file)
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("port1.sock")
    }

    /// The `-s` options of the devices.
    fn args(&self) -> Vec<String> {
        let mut slots: Vec<String> = DISKS
            .iter()
            .map(|d| format!("{},{}{}", d.slot, d.emulation, self.image(*d).display()))
            .collect();
        slots.extend([
            format!("4,virtio-net,slirp,open,mac={VIRTIO_NET_SLIRP_MAC}"),
            format!(
                "5,virtio-net,{},mac={VIRTIO_NET_TAP_MAC}",
                self.tap.as_deref().unwrap_or("slirp")
            ),
            "6,virtio-rnd".to_string(),
            format!("7,virtio-console,{PORT}={}", self.socket().display()),
            format!("10,e1000,slirp,open,mac={E1000_SLIRP_MAC}"),
        ]);
        slots
            .into_iter()
            .flat_map(|s| ["-s".to_string(), s])
            .collect()
    }
}

/// The device machine booted once and suspended at its prompt, with what the guest found.
struct DevicesBooted {
    snapshot: PathBuf,
    record: BTreeMap<String, String>,
}

/// Skips (with the notice already given) where something the device machine needs is missing,
/// unless BHYVE_RS_REQUIRE_LINUX_GUEST=1 asks for the Linux tests to run.
fn required(available: bool, what: &str) -> bool {
    if !available && env_set("BHYVE_RS_REQUIRE_LINUX_GUEST") {
        panic!("{what} is missing and BHYVE_RS_REQUIRE_LINUX_GUEST=1");
    }
    available
}

fn devices_booted() -> Option<&'static DevicesBooted> {
    static BOOTED: OnceLock<Result<DevicesBooted, String>> = OnceLock::new();
    if !kvm_usable() || !required(slirp_usable(), "libslirp") {
        return None;
    }
    let image = image()?;
    let booted = BOOTED.get_or_init(|| {
        once(|| {
            // The second card boots on slirp: only the test of a tap needs one.
            let placeholder = DeviceHost {
                dir: PathBuf::from("RUNDIR"),
                tap: None,
            };
            let placeholder =
                boot_command(image, &placeholder.dir, DEVICES_VM, &placeholder.args());
            let command = |dir: &Path| {
                let host = DeviceHost {
                    dir: dir.to_path_buf(),
                    tap: None,
                };
                for disk in DISKS {
                    let file = std::fs::File::create(host.image(disk)).expect("create an image");
                    file.set_len(DISK_SECTORS * 512).expect("size an image");
                }
                boot_command(image, dir, DEVICES_VM, &host.args())
            };
            let dir = boot_and_suspend(DEVICES_VM, &placeholder, command, found_devices);
            let text = std::fs::read_to_string(dir.join("boot.txt")).expect("the boot record");
            let record = text
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            DevicesBooted {
                snapshot: dir.join("linux.snap"),
                record,
            }
        })
    });
    match booted {
        Ok(booted) => Some(booted),
        Err(why) => panic!("the Linux guest with devices did not boot: {why}"),
    }
}

/// What Linux found at boot, as `key=value` lines: disks and their sizes, network cards and
/// their addresses, the hardware RNG, the console ports, the virtio-blk serial, and which
/// interrupts each driver took.
fn found_devices(vm: &mut Console) -> String {
    let found = sh(
        vm,
        "cd /sys/block; set -- *; echo \"blocks=$*\"; \
         for b in *; do read -r s <$b/size; echo \"size_$b=$s\"; done; \
         read -r s </sys/block/vda/serial; echo \"vda_serial=$s\"; \
         read -r s </sys/block/sda/device/model; echo \"sda_model=$s\"; \
         read -r s </sys/class/nvme/nvme0/model; echo \"nvme_model=$s\"; \
         cd /sys/class/net; set -- *; echo \"nets=$*\"; \
         for i in eth*; do read -r a <$i/address; echo \"mac_$a=$i\"; done; \
         read -r s </sys/class/misc/hw_random/rng_current; echo \"rng=$s\"; \
         for p in /sys/class/virtio-ports/*; do read -r n <$p/name; echo \"port_$n=${p##*/}\"; done; \
         cd /",
    );
    let interrupts = sh(vm, "cat /proc/interrupts");
    // "  24:  1234  PCI-MSIX-0000:00:03.0  0-edge  virtio0-req.0": the chip and the name.
    let irqs: Vec<String> = interrupts
        .lines()
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let chip = words
                .iter()
                .find(|w| w.starts_with("PCI-") || w.starts_with("IO-APIC"))?;
            Some(format!("{}@{chip}", words.last()?))
        })
        .collect();
    let mut record: String = found
        .lines()
        .filter(|l| l.contains('='))
        .map(|l| format!("{}\n", l.trim()))
        .collect();
    record.push_str(&format!("irqs={}\n", irqs.join(",")));
    record
}

fn found<'a>(booted: &'a DevicesBooted, key: &str) -> &'a str {
    booted
        .record
        .get(key)
        .unwrap_or_else(|| panic!("Linux did not report {key}: {:?}", booted.record))
}

/// A restored copy of the device machine with its own host side: disks filled with their
/// patterns, a console socket, and a tap behind the second virtio-net card when given one.
struct Devices {
    linux: Linux,
    host: DeviceHost,
    tap: Option<Tap>,
}

fn restore_devices(tag: &str) -> Option<(Devices, &'static DevicesBooted)> {
    restore_devices_with(tag, None)
}

fn restore_devices_with(tag: &str, tap: Option<Tap>) -> Option<(Devices, &'static DevicesBooted)> {
    let booted = devices_booted()?;
    let scratch = Scratch::new(&format!("linux-{tag}"));
    let host = DeviceHost {
        dir: scratch.0.clone(),
        tap: tap.as_ref().map(|t| t.name.clone()),
    };
    for disk in DISKS {
        std::fs::write(host.image(disk), pattern(disk.seed, DISK_SECTORS)).expect("fill a disk");
    }
    let linux = restore_devices_from(&booted.snapshot, &host, scratch);
    Some((Devices { linux, host, tap }, booted))
}

/// `bhyve -r file` with the whole command line, naming `host`'s resources.
fn restore_devices_from(file: &Path, host: &DeviceHost, scratch: Scratch) -> Linux {
    let image = image().expect("the image the snapshot booted");
    let mut args = vec!["-r".to_string(), file.display().to_string()];
    args.extend(host.args());
    let cmd = boot_command(image, &host.dir, DEVICES_VM, &args);
    restore_with(cmd, file, scratch, DEVICES_VM)
}

/// `expected` as blk(1) of the guest prints it.
fn blk_line(what: &str, data: &[u8]) -> String {
    format!("blk {what} fnv {:#018x}", fnv(data))
}

fn blk(vm: &mut Console, command: &str) -> String {
    let out = sh(vm, &format!("blk {command}"));
    out.lines()
        .find(|l| l.starts_with("blk "))
        .unwrap_or_else(|| panic!("blk {command}: {out:?}"))
        .trim()
        .to_string()
}

/// Linux reads what the host wrote, writes what the host then finds in the file, and reads it
/// back, through its driver for `disk`; the rest of the disk is untouched.
fn disk_round_trip(disk: Disk, tag: &str) {
    let Some((mut d, booted)) = restore_devices(tag) else {
        return;
    };
    assert_eq!(
        found(
            booted,
            &format!("size_{}", disk.dev.trim_start_matches("/dev/"))
        ),
        DISK_SECTORS.to_string()
    );
    let vm = &mut d.linux.vm;
    let original = pattern(disk.seed, DISK_SECTORS);
    let half = DISK_SECTORS / 2;
    assert_eq!(
        blk(vm, &format!("sum {} 0 {half}", disk.dev)),
        blk_line("sum", &original[..(half * 512) as usize]),
        "{}: reading what the host wrote",
        disk.dev
    );
    // 512 KiB in one write: more than one request and many segments for every driver.
    let (first, count, seed) = (half, 1024, 0x5eed_0000 + u64::from(disk.slot));
    let written = pattern(seed, count);
    assert_eq!(
        blk(vm, &format!("fill {} {first} {count} {seed}", disk.dev)),
        blk_line("fill", &written)
    );
    let file = std::fs::read(d.host.image(disk)).expect("read the image");
    let (at, end) = ((first * 512) as usize, ((first + count) * 512) as usize);
    assert!(
        file[at..end] == written[..],
        "{}: the image lacks the write",
        disk.dev
    );
    assert!(
        file[..at] == original[..at] && file[end..] == original[end..],
        "{}: the write reached beyond its sectors",
        disk.dev
    );
    assert_eq!(
        blk(vm, &format!("sum {} {first} {count}", disk.dev)),
        blk_line("sum", &written),
        "{}: reading the write back",
        disk.dev
    );
}

#[test]
fn linux_reads_and_writes_a_virtio_blk_disk() {
    disk_round_trip(VIRTIO_BLK, "lv");
}

#[test]
fn linux_reads_and_writes_an_ahci_disk() {
    disk_round_trip(AHCI, "la");
}

#[test]
fn linux_reads_and_writes_an_nvme_namespace() {
    disk_round_trip(NVME, "ln");
}

#[test]
fn linux_finds_every_device_and_restored_disks_keep_their_identity() {
    let Some((mut d, booted)) = restore_devices("li") else {
        return;
    };
    assert_eq!(found(booted, "blocks"), "nvme0n1 sda vda");
    assert_eq!(found(booted, "nets"), "eth0 eth1 eth2 lo");
    for mac in [VIRTIO_NET_SLIRP_MAC, VIRTIO_NET_TAP_MAC, E1000_SLIRP_MAC] {
        found(booted, &format!("mac_{mac}"));
    }
    assert_eq!(found(booted, "rng"), "virtio_rng.0");
    assert!(found(booted, &format!("port_{PORT}")).starts_with("vport"));
    // The names FreeBSD's bhyve gives its disks (pci_ahci.c, pci_nvme.c).
    assert_eq!(found(booted, "sda_model"), "BHYVE SATA DISK");
    assert_eq!(found(booted, "nvme_model"), "bhyve-NVMe");
    // Linux's virtio, NVMe and AHCI drivers take MSI-X or MSI where the device offers it.
    let irqs = found(booted, "irqs");
    for (name, chip) in [
        ("virtio0-req.0", "PCI-MSIX-0000:00:03.0"),
        ("nvme0q0", "PCI-MSIX-0000:00:09.0"),
        ("ahci[0000:00:08.0]", "PCI-MSI-0000:00:08.0"),
    ] {
        assert!(
            irqs.split(',').any(|i| i == format!("{name}@{chip}")),
            "no {name} on {chip} in {irqs}"
        );
    }
    // The serial the guest read at boot, from a disk at another path now: the same.
    let serial = sh(
        &mut d.linux.vm,
        "read -r s </sys/block/vda/serial; echo \"serial=$s\"",
    );
    assert!(
        serial.contains(&format!("serial={}\n", found(booted, "vda_serial"))),
        "{serial:?} after the restore, {} at boot",
        found(booted, "vda_serial")
    );
    assert!(found(booted, "vda_serial").starts_with("BHYVE-"));
}

/// Serves `body` once over HTTP/1.0 on `listener`.
fn serve_once(listener: TcpListener, body: Vec<u8>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let Ok((mut stream, _)) = listener.accept() else {
            return;
        };
        let mut reader = BufReader::new(stream.try_clone().expect("clone the stream"));
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
            line.clear();
        }
        let header = format!(
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
            body.len()
        );
        let _ = stream.write_all(header.as_bytes());
        let _ = stream.write_all(&body);
    })
}

/// Linux brings up the card with `mac` at `address`/24 and fetches a file from `server` (a
/// host port), whose sha256 must be the host's. (Debian's static busybox 1.35 wget crashes
/// with `-T`, on the host too: the shell's limit stands in for a timeout.)
fn fetch(vm: &mut Console, mac: &str, address: &str, server: TcpListener, url_host: &str) {
    let port = server.local_addr().expect("the server's port").port();
    let body = pattern(u64::from(port), 512);
    let expected = sha256(&body);
    let serving = serve_once(server, body);
    let out = sh(
        vm,
        &format!(
            "for i in /sys/class/net/eth*; do read -r a <$i/address; [ \"$a\" = {mac} ] && n=${{i##*/}}; done; \
             ifconfig $n {address} netmask 255.255.255.0 up && \
             wget -q -O - http://{url_host}:{port}/file | sha256sum"
        ),
    );
    assert!(
        out.lines().any(|l| l.starts_with(&format!("{expected} "))),
        "the guest's sha256 of the file: {out:?}, the host's {expected}"
    );
    serving.join().expect("the server thread");
}

/// Through slirp (`open`, so the guest may connect out) the host is the gateway, 10.0.2.2,
/// and its loopback answers.
fn fetch_through_slirp(mac: &str, tag: &str) {
    let Some((mut d, _)) = restore_devices(tag) else {
        return;
    };
    let server = TcpListener::bind("127.0.0.1:0").expect("bind a host port");
    fetch(&mut d.linux.vm, mac, "10.0.2.15", server, "10.0.2.2");
}

#[test]
fn linux_fetches_a_file_through_virtio_net_and_slirp() {
    fetch_through_slirp(VIRTIO_NET_SLIRP_MAC, "ls");
}

#[test]
fn linux_fetches_a_file_through_e1000_and_slirp() {
    fetch_through_slirp(E1000_SLIRP_MAC, "le");
}

#[test]
fn linux_fetches_a_file_through_virtio_net_and_a_tap() {
    // The card booted on slirp; this copy is restored onto a tap.
    if !kvm_usable() || image().is_none() {
        return;
    }
    let tap = Tap::create("lt");
    if !required(tap.is_some(), "a tap interface (root and /dev/net/tun)") {
        return;
    }
    let Some((mut d, _)) = restore_devices_with("lt", tap) else {
        return;
    };
    let tap = d.tap.as_ref().map(|t| t.name.clone()).unwrap_or_default();
    // A subnet of this process's own on its tap, in the range set aside for benchmarks
    // (198.18.0.0/15, RFC 2544), which no real network uses.
    let pid = std::process::id();
    let net = format!("198.{}.{}", 18 + (pid / 250) % 2, pid % 250);
    let added = Command::new("ip")
        .args(["addr", "add", &format!("{net}.1/24"), "dev", &tap])
        .status()
        .is_ok_and(|s| s.success());
    assert!(added, "ip addr add on {tap}");
    let server = TcpListener::bind(format!("{net}.1:0")).expect("bind on the tap's address");
    fetch(
        &mut d.linux.vm,
        VIRTIO_NET_TAP_MAC,
        &format!("{net}.2"),
        server,
        &format!("{net}.1"),
    );
}

#[test]
fn linux_reads_entropy_from_virtio_rnd() {
    let Some((mut d, _)) = restore_devices("lr") else {
        return;
    };
    let out = sh(
        &mut d.linux.vm,
        "read -r r </sys/class/misc/hw_random/rng_current; echo \"rng=$r\"; \
         dd if=/dev/hwrng bs=64 count=4 2>/dev/null | hexdump -v -e '64/1 \"%02x\" \"\\n\"'",
    );
    assert!(out.contains("rng=virtio_rng.0\n"), "{out:?}");
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.len() == 128 && l.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    assert_eq!(lines.len(), 4, "256 bytes from /dev/hwrng: {out:?}");
    let bytes: std::collections::BTreeSet<&str> = lines
        .iter()
        .flat_map(|l| (0..64).map(move |i| &l[2 * i..2 * i + 2]))
        .collect();
    // 256 random bytes take about 162 distinct values; a stuck or repeating source far fewer.
    assert!(
        bytes.len() > 100,
        "{} distinct byte values in {lines:?}",
        bytes.len()
    );
}

#[test]
fn linux_echoes_through_a_virtio_console_port() {
    let Some((mut d, _)) = restore_devices("lc") else {
        return;
    };
    let socket = UnixStream::connect(d.host.socket()).expect("connect to the console port");
    socket
        .set_read_timeout(Some(SHELL_LIMIT))
        .expect("set a read timeout");
    let vm = &mut d.linux.vm;
    // The guest opens its port and says so first: Linux drops what arrives on a closed port.
    vm.send_line(&format!(
        "x 'for p in /sys/class/virtio-ports/*; do read -r n <$p/name; [ \"$n\" = {PORT} ] && d=${{p##*/}}; done; \
         exec 3<>/dev/$d; echo ready >&3; read -r l <&3; echo \"echo $l\" >&3; exec 3>&-'"
    ));
    let mut from_guest = BufReader::new(socket.try_clone().expect("clone the socket"));
    let mut line = String::new();
    from_guest
        .read_line(&mut line)
        .expect("the guest's first line");
    assert_eq!(line, "ready\n");
    (&socket)
        .write_all(b"hello from the host\n")
        .expect("write to the port");
    line.clear();
    from_guest.read_line(&mut line).expect("the guest's echo");
    assert_eq!(line, "echo hello from the host\n");
    vm.expect("x-end-42\n", SHELL_LIMIT);
    // Nothing more came.
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("set a read timeout");
    let mut rest = Vec::new();
    let _ = from_guest.read_to_end(&mut rest);
    assert!(rest.is_empty(), "more from the guest: {rest:?}");
}

/// Slots of 64 KiB the guest's stream cycles through: the first 2048 sectors.
const STREAM_SLOTS: u64 = 16;
const STREAM_SECTORS: u64 = 128;

/// The file the stream keeps its latest line in.
const STREAM_NOW: &str = "/tmp/stream.now";

/// Linux streams writes to `disk` through a live checkpoint and a suspend: after the restore
/// the stream goes on, its log has every round once, and the disk holds the last round of
/// each slot, in the image and as the guest reads it.
fn writes_in_flight_survive_a_checkpoint_and_a_suspend(disk: Disk, tag: &str) {
    let Some((d, _)) = restore_devices(tag) else {
        return;
    };
    let Devices {
        mut linux, host, ..
    } = d;
    let files = Scratch::new(&format!("linux-inflight-{tag}"));
    let pid = sh(
        &mut linux.vm,
        &format!(
            "blk stream {} {STREAM_SLOTS} {STREAM_NOW} >/tmp/stream.log 2>&1 & echo pid=$!",
            disk.dev
        ),
    );
    let pid = pid
        .lines()
        .find_map(|l| l.trim().strip_prefix("pid="))
        .unwrap_or_else(|| panic!("no pid from {pid:?}"))
        .to_string();
    let before = latest_beyond(&mut linux.vm, STREAM_NOW, 4, "before the checkpoint");
    linux.checkpoint(&files.path("live.snap"));
    let at_suspend = latest_beyond(
        &mut linux.vm,
        STREAM_NOW,
        before + 4,
        "after the checkpoint",
    );
    // Requests the guest has in flight now complete before the save; the restored guest
    // sees them done.
    let suspended = files.path("suspended.snap");
    let scratch = linux.suspend(&suspended);
    let mut resumed = restore_devices_from(&suspended, &host, scratch);
    // One round more, then stop: most slots still hold what was written before the suspend,
    // so a write lost at the suspend shows as a slot behind the log.
    latest_beyond(&mut resumed.vm, STREAM_NOW, at_suspend, "after the restore");
    let log = sh(
        &mut resumed.vm,
        &format!("kill {pid}; while [ -d /proc/{pid} ]; do sleep 1; done; cat /tmp/stream.log"),
    );
    let rounds: Vec<u64> = log
        .lines()
        .filter_map(|l| l.strip_prefix("stream ")?.trim().parse().ok())
        .collect();
    let last = *rounds.last().unwrap_or(&0);
    assert_eq!(
        rounds,
        (1..=last).collect::<Vec<_>>(),
        "the stream's rounds: {log:?}"
    );
    assert!(log.contains(&format!("stream done {last}\n")), "{log:?}");
    // Each slot holds the last round written to it, in the image and as the guest reads it.
    let file = std::fs::read(host.image(disk)).expect("read the image");
    let slot_bytes = (STREAM_SECTORS * 512) as usize;
    for slot in 0..STREAM_SLOTS {
        let round = (1..=last)
            .rev()
            .find(|r| r % STREAM_SLOTS == slot)
            .expect("a round");
        let at = slot as usize * slot_bytes;
        assert!(
            file[at..at + slot_bytes] == pattern(round, STREAM_SECTORS)[..],
            "{}: slot {slot} does not hold round {round} (last {last})",
            disk.dev
        );
    }
    let all = (STREAM_SLOTS * STREAM_SECTORS) as usize * 512;
    assert_eq!(
        blk(
            &mut resumed.vm,
            &format!("sum {} 0 {}", disk.dev, STREAM_SLOTS * STREAM_SECTORS)
        ),
        blk_line("sum", &file[..all])
    );
}

#[test]
fn virtio_blk_writes_in_flight_survive_a_checkpoint_and_a_suspend() {
    writes_in_flight_survive_a_checkpoint_and_a_suspend(VIRTIO_BLK, "fv");
}

#[test]
fn ahci_writes_in_flight_survive_a_checkpoint_and_a_suspend() {
    writes_in_flight_survive_a_checkpoint_and_a_suspend(AHCI, "fa");
}

#[test]
fn nvme_writes_in_flight_survive_a_checkpoint_and_a_suspend() {
    writes_in_flight_survive_a_checkpoint_and_a_suspend(NVME, "fn");
}
