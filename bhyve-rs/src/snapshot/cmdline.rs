//! What `bhyve -r FILE [options] [vmname]` does with the options: the configuration comes from
//! the snapshot; options that only say how this bhyve process runs on the host take the given
//! value; every option that defines the machine the guest sees must match the snapshot.
//!
//! FreeBSD's bhyve rebuilds the machine from the command line at restore and expects the same
//! command line as at boot, without checking it (a different device list surfaces later as a
//! missing section or garbage). Here the snapshot carries its configuration, so no option is
//! needed; when some are given, they are checked against the snapshot instead, and a difference
//! names the option that set the variable. Host-side settings alone (`-l com1,/dev/nmdm1A`,
//! `-p`, `-o rundir=`) apply on top of the stored configuration. With the whole command line,
//! devices may also be given other host resources than at boot: disk images, console sockets,
//! tap interfaces, slirp forwards.

use crate::config::{parse_memsize, Config};

/// How guest memory is loaded at restore (`snapshot.restore`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreMode {
    /// Map each RAM region copy-on-write from the file; pages are read when first touched.
    Map,
    /// Read every stored page into fresh memory before the guest runs, checking each chunk.
    Copy,
}

/// The configuration variable choosing [`RestoreMode`].
pub const RESTORE_MODE_KEY: &str = "snapshot.restore";

impl RestoreMode {
    pub fn from_config(config: &Config) -> Result<RestoreMode, String> {
        match config.get(RESTORE_MODE_KEY) {
            None | Some("map") => Ok(RestoreMode::Map),
            Some("copy") => Ok(RestoreMode::Copy),
            Some(other) => Err(format!(
                "invalid {RESTORE_MODE_KEY} '{other}' (expected map or copy)"
            )),
        }
    }
}

/// Variables that only concern the bhyve process on the host, not the machine the guest sees:
/// the given value wins at restore, the saved one is kept when none is given.
fn host_only(key: &str) -> bool {
    matches!(
        key,
        "name"
            | "rundir"
            | "config.dump"
            | "destroy_on_poweroff"
            | "memory.wired"
            | "memory.guest_in_core"
            | RESTORE_MODE_KEY
    ) || key.starts_with("gdb.")
        // Read only at a cold boot: the kernel is already in the restored memory.
        || key.starts_with("boot.")
        // Host CPU pinning.
        || (key.starts_with("vcpu.") && key.ends_with(".cpuset"))
        // Host ports forwarded into a slirp network, and whether it lets the guest out.
        || (key.starts_with("pci.") && (key.ends_with(".hostfwd") || key.ends_with(".open")))
}

/// Variables whose presence the guest sees (a COM port exists) while the value only picks the
/// host side (a terminal, an nmdm device): they must be set on both sides, with any value.
fn host_backend(key: &str) -> bool {
    matches!(
        key,
        "lpc.com1.path" | "lpc.com2.path" | "lpc.com3.path" | "lpc.com4.path"
    ) || device_backend(key)
}

/// Device variables of the same kind: the image or disk behind an emulated disk and a console
/// port's socket (`path`), a network card's tap interface or slirp (`backend`). A VM restored
/// on another host, or from copies of its disks, names its own.
fn device_backend(key: &str) -> bool {
    key.starts_with("pci.") && (key.ends_with(".path") || key.ends_with(".backend"))
}

/// Whether two values of `key` mean the same thing.
fn same_value(key: &str, a: &str, b: &str) -> bool {
    if host_backend(key) || a == b {
        return true;
    }
    key == "memory.size" && parse_memsize(a).is_some() && parse_memsize(a) == parse_memsize(b)
}

/// The variables of `config` that define the machine.
fn machine_keys(config: &Config) -> impl Iterator<Item = (&str, &str)> {
    config.iter().filter(|(key, _)| !host_only(key))
}

/// The option of the command line that sets `key`, as an error names it: `-c`, `-m`,
/// `-s 3`, `-l com1`, `-o key`.
fn option_for(key: &str) -> String {
    let flag = match key {
        "cpus" | "sockets" | "cores" | "threads" => "-c",
        "memory.size" => "-m",
        "keyboard.layout" => "-K",
        "x86.x2apic" => "-x",
        "x86.vmexit_on_hlt" => "-H",
        "x86.vmexit_on_pause" => "-P",
        "x86.strictio" => "-e",
        "x86.strictmsr" => "-w",
        "x86.mptable" => "-Y",
        "rtc.use_localtime" => "-u",
        "uuid" => "-U",
        "virtio_msix" => "-W",
        "monitor" => "-M",
        _ => "",
    };
    if !flag.is_empty() {
        return flag.to_string();
    }
    let parts: Vec<&str> = key.split('.').collect();
    match parts[..] {
        ["pci", bus, slot, function, ..] => match (bus, function) {
            ("0", "0") => format!("-s {slot}"),
            ("0", _) => format!("-s {slot}:{function}"),
            _ => format!("-s {bus}:{slot}:{function}"),
        },
        ["lpc", device, ..] => format!("-l {device}"),
        _ => format!("-o {key}"),
    }
}

/// The configuration to restore with: `saved` (from the snapshot) with the host-only variables
/// and console backends of `given` (the command line) applied. `defaults` is the tree bhyve
/// starts from before reading options; when the command line sets no machine variable beyond
/// those and the backends, nothing else is compared. Otherwise every machine variable must be
/// present on both sides with the same value, and the first difference is the error.
pub fn restore_config(saved: &Config, given: &Config, defaults: &Config) -> Result<Config, String> {
    let options_given = machine_keys(given)
        .any(|(key, value)| !host_backend(key) && defaults.get(key) != Some(value));
    let difference = if options_given {
        first_difference(saved, given)
    } else {
        // A backend alone may only point a port the guest has somewhere else.
        given
            .iter()
            .find(|(key, _)| host_backend(key) && saved.get(key).is_none())
            .map(|(key, value)| mismatch(key, None, Some(value)))
    };
    if let Some(difference) = difference {
        return Err(difference);
    }
    let mut config = saved.clone();
    for (key, value) in given.iter().filter(|(key, _)| host_only(key)) {
        config.set(key, value);
    }
    for (key, value) in given.iter().filter(|(key, _)| host_backend(key)) {
        config.set(key, value);
    }
    Ok(config)
}

/// `key` differs between the snapshot and the command line, in words that name the option.
fn mismatch(key: &str, saved: Option<&str>, given: Option<&str>) -> String {
    let option = option_for(key);
    let saved = match saved {
        Some(value) => format!("'{value}'"),
        None => "unset".to_string(),
    };
    let given = match given {
        Some(value) => format!("'{value}' on the command line ({option})"),
        None => format!("not set on the command line (no {option})"),
    };
    format!("the command line does not match the snapshot: {key} is {saved} in the snapshot but {given}")
}

fn first_difference(saved: &Config, given: &Config) -> Option<String> {
    // A value that differs says more than a variable missing on one side (a lone `-c 2` is
    // about the CPU count, not about the devices it did not repeat), so it is reported first.
    for (key, saved_value) in machine_keys(saved) {
        if let Some(given_value) = given.get(key) {
            if !same_value(key, saved_value, given_value) {
                return Some(mismatch(key, Some(saved_value), Some(given_value)));
            }
        }
    }
    if let Some((key, value)) = machine_keys(saved).find(|(key, _)| given.get(key).is_none()) {
        return Some(mismatch(key, Some(value), None));
    }
    machine_keys(given)
        .find(|(key, _)| saved.get(key).is_none())
        .map(|(key, value)| mismatch(key, None, Some(value)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(pairs: &[(&str, &str)]) -> Config {
        let mut c = crate::config::default_config();
        for (k, v) in pairs {
            c.set(k, v);
        }
        c
    }

    fn saved() -> Config {
        tree(&[
            ("lpc.com1.path", "stdio"),
            ("cpus", "1"),
            ("pci.0.0.0.device", "hostbridge"),
            ("pci.0.31.0.device", "lpc"),
            ("boot.kernel", "/boot/guest"),
            ("rundir", "/var/run/bhyve"),
            ("name", "vm0"),
        ])
    }

    #[test]
    fn no_machine_option_takes_the_snapshot_and_the_given_host_options() {
        let given = tree(&[("rundir", "/tmp/run"), ("name", "vm1")]);
        let config = restore_config(&saved(), &given, &crate::config::default_config()).unwrap();
        assert_eq!(config.get("rundir"), Some("/tmp/run"));
        assert_eq!(config.get("name"), Some("vm1"));
        assert_eq!(config.get("pci.0.31.0.device"), Some("lpc"));
        assert_eq!(config.get("boot.kernel"), Some("/boot/guest"));
    }

    #[test]
    fn the_same_command_line_is_accepted_and_backends_may_change() {
        let given = tree(&[
            ("lpc.com1.path", "/dev/nmdm0A"),
            ("cpus", "1"),
            ("memory.size", "268435456"),
            ("pci.0.0.0.device", "hostbridge"),
            ("pci.0.31.0.device", "lpc"),
            ("snapshot.restore", "copy"),
        ]);
        let config = restore_config(&saved(), &given, &crate::config::default_config()).unwrap();
        assert_eq!(config.get("lpc.com1.path"), Some("/dev/nmdm0A"));
        assert_eq!(config.get("snapshot.restore"), Some("copy"));
        assert_eq!(config.get("boot.kernel"), Some("/boot/guest"));
    }

    #[test]
    fn the_first_difference_is_named_with_both_values() {
        let defaults = crate::config::default_config();
        let base = [
            ("lpc.com1.path", "stdio"),
            ("cpus", "1"),
            ("pci.0.0.0.device", "hostbridge"),
            ("pci.0.31.0.device", "lpc"),
        ];
        let with = |extra: &[(&str, &str)]| {
            let mut pairs = base.to_vec();
            pairs.extend_from_slice(extra);
            tree(&pairs)
        };
        let err = restore_config(
            &saved(),
            &with(&[("pci.0.3.0.device", "virtio-rnd")]),
            &defaults,
        )
        .unwrap_err();
        assert!(
            err.ends_with(
                "pci.0.3.0.device is unset in the snapshot but 'virtio-rnd' on the command \
                 line (-s 3)"
            ),
            "{err}"
        );
        let err =
            restore_config(&saved(), &with(&[("memory.size", "512M")]), &defaults).unwrap_err();
        assert!(
            err.ends_with(
                "memory.size is '256M' in the snapshot but '512M' on the command line (-m)"
            ),
            "{err}"
        );
        let mut no_lpc = with(&[]);
        no_lpc = {
            let mut c = Config::new();
            for (k, v) in no_lpc.iter().filter(|(k, _)| !k.starts_with("pci.0.31")) {
                c.set(k, v);
            }
            c
        };
        let err = restore_config(&saved(), &no_lpc, &defaults).unwrap_err();
        assert!(
            err.ends_with(
                "pci.0.31.0.device is 'lpc' in the snapshot but not set on the command line \
                 (no -s 31)"
            ),
            "{err}"
        );
        // A COM port must exist on both sides, whatever its backend.
        let mut no_com = Config::new();
        for (k, v) in with(&[]).iter().filter(|(k, _)| !k.starts_with("lpc.com1")) {
            no_com.set(k, v);
        }
        let err = restore_config(&saved(), &no_com, &defaults).unwrap_err();
        assert!(
            err.contains(
                "lpc.com1.path is 'stdio' in the snapshot but not set on the command \
                          line (no -l com1)"
            ),
            "{err}"
        );
        // A lone -c 2 is refused for its CPU count; a lone -c 1 for what it leaves out.
        let err = restore_config(&saved(), &tree(&[("cpus", "2")]), &defaults).unwrap_err();
        assert!(
            err.ends_with("cpus is '1' in the snapshot but '2' on the command line (-c)"),
            "{err}"
        );
        let err = restore_config(&saved(), &tree(&[("cpus", "1")]), &defaults).unwrap_err();
        assert!(
            err.contains("lpc.com1.path is 'stdio' in the snapshot but not set"),
            "{err}"
        );
    }

    #[test]
    fn devices_may_be_given_other_host_resources() {
        let defaults = crate::config::default_config();
        let machine = |disk: &str, tap: &str, sock: &str, hostfwd: Option<&str>| {
            let mut pairs = vec![
                ("lpc.com1.path", "stdio"),
                ("cpus", "1"),
                ("pci.0.0.0.device", "hostbridge"),
                ("pci.0.31.0.device", "lpc"),
                ("pci.0.3.0.device", "virtio-blk"),
                ("pci.0.3.0.path", disk),
                ("pci.0.4.0.device", "ahci"),
                ("pci.0.4.0.port.0.type", "hd"),
                ("pci.0.4.0.port.0.path", disk),
                ("pci.0.5.0.device", "nvme"),
                ("pci.0.5.0.path", disk),
                ("pci.0.6.0.device", "virtio-net"),
                ("pci.0.6.0.backend", tap),
                ("pci.0.6.0.mac", "58:9c:fc:00:00:01"),
                ("pci.0.7.0.device", "virtio-console"),
                ("pci.0.7.0.port.0.name", "port1"),
                ("pci.0.7.0.port.0.path", sock),
                ("pci.0.8.0.device", "e1000"),
                ("pci.0.8.0.backend", "slirp"),
            ];
            if let Some(rules) = hostfwd {
                pairs.push(("pci.0.8.0.hostfwd", rules));
            }
            tree(&pairs)
        };
        let saved = machine("/vm/disk.img", "tap0", "/run/a.sock", Some("tcp::8022-:22"));
        let given = machine(
            "/copy/disk.img",
            "tap7",
            "/tmp/b.sock",
            Some("tcp::9022-:22"),
        );
        let config = restore_config(&saved, &given, &defaults).unwrap();
        for (key, value) in [
            ("pci.0.3.0.path", "/copy/disk.img"),
            ("pci.0.4.0.port.0.path", "/copy/disk.img"),
            ("pci.0.5.0.path", "/copy/disk.img"),
            ("pci.0.6.0.backend", "tap7"),
            ("pci.0.7.0.port.0.path", "/tmp/b.sock"),
            ("pci.0.8.0.hostfwd", "tcp::9022-:22"),
        ] {
            assert_eq!(config.get(key), Some(value), "{key}");
        }
        // Whether slirp lets the guest out is the host's business too.
        let mut open = saved.clone();
        open.set("pci.0.8.0.open", "true");
        let config = restore_config(&open, &given, &defaults).unwrap();
        assert_eq!(config.get("pci.0.8.0.open"), Some("true"));
        // Forwards are the host's business: without them on the command line, the saved ones stay.
        let config = restore_config(&saved, &machine("/d", "tap0", "/s", None), &defaults).unwrap();
        assert_eq!(config.get("pci.0.8.0.hostfwd"), Some("tcp::8022-:22"));
        // What the guest sees still has to match: the MAC address, the kind of disk.
        let mut other_mac = given.clone();
        other_mac.set("pci.0.6.0.mac", "58:9c:fc:00:00:02");
        let err = restore_config(&saved, &other_mac, &defaults).unwrap_err();
        assert!(
            err.contains("pci.0.6.0.mac is '58:9c:fc:00:00:01' in the snapshot"),
            "{err}"
        );
        let mut cd = given.clone();
        cd.set("pci.0.4.0.port.0.type", "cd");
        let err = restore_config(&saved, &cd, &defaults).unwrap_err();
        assert!(err.contains("pci.0.4.0.port.0.type is 'hd'"), "{err}");
        // A disk needs its image on both sides.
        let mut no_path = Config::new();
        for (k, v) in given.iter().filter(|(k, _)| *k != "pci.0.5.0.path") {
            no_path.set(k, v);
        }
        let err = restore_config(&saved, &no_path, &defaults).unwrap_err();
        assert!(
            err.ends_with("pci.0.5.0.path is '/vm/disk.img' in the snapshot but not set on the command line (no -s 5)"),
            "{err}"
        );
    }

    #[test]
    fn host_side_options_alone_change_only_the_host_side() {
        let defaults = crate::config::default_config();
        // bhyve -r FILE -l com1,/dev/nmdm1A -p 0:3 -o rundir=/tmp/run vm1
        let given = tree(&[
            ("lpc.com1.path", "/dev/nmdm1A"),
            ("vcpu.0.cpuset", "3"),
            ("rundir", "/tmp/run"),
            ("name", "vm1"),
        ]);
        let config = restore_config(&saved(), &given, &defaults).unwrap();
        assert_eq!(config.get("lpc.com1.path"), Some("/dev/nmdm1A"));
        assert_eq!(config.get("vcpu.0.cpuset"), Some("3"));
        assert_eq!(config.get("cpus"), Some("1"));
        assert_eq!(config.get("pci.0.31.0.device"), Some("lpc"));
        // A console the guest never had is not a host-side setting.
        let err = restore_config(
            &saved(),
            &tree(&[("lpc.com2.path", "/dev/nmdm2A")]),
            &defaults,
        )
        .unwrap_err();
        assert_eq!(
            err,
            "the command line does not match the snapshot: lpc.com2.path is unset in the \
             snapshot but '/dev/nmdm2A' on the command line (-l com2)"
        );
    }

    #[test]
    fn a_difference_names_the_option_that_set_it() {
        assert_eq!(option_for("sockets"), "-c");
        assert_eq!(option_for("memory.size"), "-m");
        assert_eq!(option_for("pci.0.4.0.device"), "-s 4");
        assert_eq!(option_for("pci.0.4.2.path"), "-s 4:2");
        assert_eq!(option_for("pci.1.4.0.device"), "-s 1:4:0");
        assert_eq!(option_for("lpc.bootrom"), "-l bootrom");
        assert_eq!(option_for("x86.x2apic"), "-x");
        assert_eq!(option_for("hostbridge.vendor"), "-o hostbridge.vendor");
    }

    #[test]
    fn restore_mode_is_map_unless_copy_is_asked_for() {
        assert_eq!(
            RestoreMode::from_config(&Config::new()),
            Ok(RestoreMode::Map)
        );
        assert_eq!(
            RestoreMode::from_config(&tree(&[("snapshot.restore", "copy")])),
            Ok(RestoreMode::Copy)
        );
        let err = RestoreMode::from_config(&tree(&[("snapshot.restore", "fast")])).unwrap_err();
        assert_eq!(
            err,
            "invalid snapshot.restore 'fast' (expected map or copy)"
        );
    }
}
