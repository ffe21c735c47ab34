//! The command lines management tools generate (tests/cli/corpus: libvirt's golden files, vm-bhyve,
//! CBSD, TrueNAS) start real VMs whenever every device they name is implemented here.
//!
//! Each line goes through bhyve's own parser to the configuration FreeBSD's bhyve builds from it
//! (the corpus test checks that tree key by key); the host resources the line names are then
//! swapped for ones that exist on this machine: disk images become fresh files, tap interfaces
//! get names of their own (bhyve creates them), console sockets move into a scratch directory,
//! nmdm consoles and UEFI firmware (absent here) give way to COM1 on stdio and the test guest as
//! kernel (with an LPC bridge in slot 31 when the line has none, for COM1). The guest then lists the PCI functions it finds, and every slot of the command line
//! must answer with the vendor and device FreeBSD's emulation presents.

#[path = "common/mod.rs"]
mod common;
#[path = "../cli/corpus_cases.rs"]
mod corpus_cases;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use bhyve::cli::{parse_bhyve_args, Invocation};
use common::control::Scratch;
use common::{bhyve, guest, kvm_usable, notice, vm_name, Console, BOOT_TIMEOUT, COMMAND_TIMEOUT};
use corpus_cases::{parse_corpus, shell_words};

/// PCI vendor and device of each emulation, as FreeBSD's sources set them (pci_hostbridge.c,
/// pci_lpc.c, virtio.h's VIRTIO_DEV_*, pci_ahci.c, pci_nvme.c, pci_e82545.c).
fn pci_id(emulation: &str) -> Option<&'static str> {
    Some(match emulation {
        "hostbridge" => "1275:1275",
        "amd_hostbridge" => "1022:7432",
        "lpc" => "8086:7000",
        "virtio-net" => "1af4:1000",
        "virtio-blk" => "1af4:1001",
        "virtio-console" => "1af4:1003",
        "virtio-rnd" => "1af4:1005",
        "ahci" | "ahci-hd" | "ahci-cd" => "8086:2821",
        "nvme" => "fb5d:0a0a",
        "e1000" => "8086:100f",
        _ => return None,
    })
}

/// Lines FreeBSD's bhyve accepts on its command line but whose device refuses to start, with
/// the configuration key the error names (the title fragment of the corpus case first).
const REFUSED_AT_DEVICE_START: &[(&str, &str)] = &[
    // net_parsemac: ether_aton fails, "Invalid MAC", device initialization error.
    ("argv2xml virtio-net4 ", "pci.0.1.1.mac"),
];

/// The emulations this build implements, as `bhyve -s help` lists them.
fn implemented() -> BTreeSet<String> {
    let out = bhyve()
        .args(["-s", "help"])
        .output()
        .expect("run bhyve -s help");
    assert!(out.status.success(), "bhyve -s help failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// One runnable corpus line: its title and the configuration FreeBSD's bhyve builds from it.
struct Line {
    title: String,
    config: BTreeMap<String, String>,
}

fn runnable_lines() -> Vec<Line> {
    let dir = common::repo_root().join("tests/cli/corpus");
    let mut lines = Vec::new();
    for file in ["libvirt.txt", "clients.txt"] {
        let text = std::fs::read_to_string(dir.join(file)).expect("read corpus");
        for case in parse_corpus(file, &text) {
            // Lines that need files of their own or a feature are the parser's business.
            if case.status.as_deref().is_some_and(|s| s != "run")
                || !case.files.is_empty()
                || case.feature.is_some()
            {
                continue;
            }
            if let Ok(Invocation::Run { config, .. }) =
                parse_bhyve_args(&shell_words(&case.command))
            {
                let config = config
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                lines.push(Line {
                    title: case.title,
                    config,
                });
            }
        }
    }
    lines
}

/// `pci.B.S.F` -> emulation name, for every slot of a configuration.
fn slots(config: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    config
        .iter()
        .filter_map(|(k, v)| {
            let slot = k.strip_prefix("pci.")?.strip_suffix(".device")?;
            (slot.split('.').count() == 3).then(|| (slot.to_string(), v.clone()))
        })
        .collect()
}

/// Whether this process may create tap interfaces.
fn taps_usable() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && Path::new("/dev/net/tun").exists()
}

/// The configuration `line` runs with here: host resources swapped as the module says.
fn localize(
    line: &Line,
    index: usize,
    scratch: &Scratch,
    kernel: &Path,
    taps: bool,
) -> BTreeMap<String, String> {
    let slots = slots(&line.config);
    let emulation_of = |key: &str| -> Option<&str> {
        let mut parts = key.strip_prefix("pci.")?.splitn(4, '.');
        let slot = format!("{}.{}.{}", parts.next()?, parts.next()?, parts.next()?);
        slots.get(&slot).map(String::as_str)
    };
    let mut out = BTreeMap::new();
    let mut files = 0;
    for (key, value) in &line.config {
        if key == "lpc.bootrom" || key == "lpc.bootvars" {
            continue;
        }
        if let Some(port) = key
            .strip_prefix("lpc.")
            .and_then(|k| k.strip_suffix(".path"))
        {
            if port.starts_with("com") && port != "com1" {
                continue;
            }
        }
        let mut value = value.clone();
        if key.starts_with("vcpu.") && key.ends_with(".cpuset") {
            // Host CPU numbers of the tool's machine: this one may have only CPU 0 and 1.
            value = "0".to_string();
        }
        if key.starts_with("pci.") && key.ends_with(".path") {
            files += 1;
            let path = scratch.path(&format!("r{index}-{files}"));
            if emulation_of(key) != Some("virtio-console") {
                let file = std::fs::File::create(&path).expect("create disk image");
                file.set_len(16 << 20).expect("size disk image");
            }
            value = path.display().to_string();
        }
        if key.starts_with("pci.") && key.ends_with(".backend") {
            value = if taps && (value.starts_with("tap") || value.starts_with("vmnet")) {
                // IFNAMSIZ: at most 15 characters.
                format!(
                    "tap{}x{files}",
                    (std::process::id() % 10000) * 1000 + index as u32
                )
            } else {
                "slirp".to_string()
            };
            files += 1;
        }
        out.insert(key.clone(), value);
    }
    // COM1 lives in the LPC bridge: a line without one gets it in slot 31, where bhyve users put it.
    if !slots.values().any(|e| e == "lpc") {
        assert!(
            !slots.contains_key("0.31.0"),
            "{}: slot 31 taken",
            line.title
        );
        out.insert("pci.0.31.0.device".into(), "lpc".into());
    }
    out.insert("lpc.com1.path".into(), "stdio".into());
    out.insert("boot.kernel".into(), kernel.display().to_string());
    out
}

#[test]
fn client_command_lines_with_implemented_devices_start_and_show_their_pci_functions() {
    if !kvm_usable() {
        return;
    }
    let implemented = implemented();
    let taps = taps_usable();
    if !taps {
        notice("taps cannot be created here: network cards run on slirp instead");
    }
    let kernel = guest::console_guest();
    let scratch = Scratch::new("clients");
    let mut started = 0;
    let mut left_out: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut refused = 0;
    for (index, line) in runnable_lines().iter().enumerate() {
        let slots = slots(&line.config);
        let missing: Vec<&String> = slots
            .values()
            .filter(|e| !implemented.contains(*e))
            .collect();
        if !missing.is_empty() {
            for m in missing {
                *left_out.entry(m.clone()).or_default() += 1;
            }
            continue;
        }
        let config = localize(line, index, &scratch, kernel, taps);
        let slots = self::slots(&config);
        let file = scratch.path(&format!("r{index}.conf"));
        let text: String = config.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        std::fs::write(&file, text).expect("write configuration");
        let mut cmd = bhyve();
        cmd.arg("-k").arg(&file).arg(vm_name());
        let mut vm = Console::spawn("bhyve", cmd);
        let refusal = REFUSED_AT_DEVICE_START
            .iter()
            .find(|(title, _)| line.title.contains(title));
        if let Some((_, error)) = refusal {
            let status = vm.wait_exit(COMMAND_TIMEOUT);
            let stderr = vm.stderr();
            assert!(
                !status.success() && stderr.lines().count() == 1 && stderr.contains(error),
                "{}: want one line naming {error:?} and a failure, got {status:?}: {stderr}",
                line.title
            );
            refused += 1;
            continue;
        }
        if let Err(why) = vm.try_expect(guest::READY, BOOT_TIMEOUT) {
            let _ = vm.kill();
            failures.push(format!(
                "{}: the VM did not start: {why}\nconfiguration:\n{}\nstderr: {}",
                line.title,
                std::fs::read_to_string(&file).unwrap_or_default(),
                vm.stderr()
            ));
            continue;
        }
        vm.expect_prompt(COMMAND_TIMEOUT);
        let seen: BTreeMap<String, String> = vm
            .command("pci", COMMAND_TIMEOUT)
            .iter()
            .filter_map(|l| {
                // "pci BB:SS.F vvvv:dddd class cccccc"
                let mut words = l.split_whitespace().skip(1);
                let at = words.next()?;
                let id = words.next()?;
                let (bus, rest) = at.split_once(':')?;
                let (slot, func) = rest.split_once('.')?;
                let slot = format!(
                    "{}.{}.{}",
                    u8::from_str_radix(bus, 16).ok()?,
                    u8::from_str_radix(slot, 16).ok()?,
                    func
                );
                Some((slot, id.to_string()))
            })
            .collect();
        // A function in a slot without function 0 is invisible to a scan as operating systems do
        // it (pci_emul.c presents it the same way); it still had to start for the VM to boot.
        let visible: BTreeMap<&String, &String> = slots
            .iter()
            .filter(|(slot, _)| {
                let (bus_slot, _) = slot.rsplit_once('.').unwrap_or((slot, ""));
                slots.contains_key(&format!("{bus_slot}.0"))
            })
            .collect();
        for (slot, emulation) in &visible {
            let want = pci_id(emulation)
                .unwrap_or_else(|| panic!("no PCI id known for {emulation}: add it to pci_id"));
            assert_eq!(
                seen.get(*slot).map(String::as_str),
                Some(want),
                "{}: slot {slot} ({emulation}); the guest saw {seen:?}",
                line.title
            );
        }
        assert_eq!(
            seen.len(),
            visible.len(),
            "{}: the guest saw functions the command line did not ask for: {seen:?}",
            line.title
        );
        vm.send_line("poweroff");
        let status = vm.wait_exit(COMMAND_TIMEOUT);
        assert_eq!(status.code(), Some(1), "{}: poweroff status", line.title);
        started += 1;
    }
    eprintln!(
        "{started} client command lines started, {refused} refused as FreeBSD refuses them; left out for devices not implemented here: {left_out:?}"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(started > 0, "no corpus line uses only implemented devices");
    assert_eq!(
        refused,
        REFUSED_AT_DEVICE_START.len(),
        "a refusal case did not run"
    );
}
