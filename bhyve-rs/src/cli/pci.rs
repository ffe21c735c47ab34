//! `-s slot,emulation[,conf]`: FreeBSD's `pci_parse_slot`. The emulation names and each one's
//! "legacy config" parser, which turns `conf` into keys under `pci.B.S.F`, come from the
//! emulation registry ([`crate::devices::registry`]).

use super::{config_error, CliError};
use crate::config::cnum::scan_ints;
use crate::config::legacy::{LegacyError, LegacyWriter};
use crate::config::Config;
use crate::devices::registry::{pci_emulation, supported_pci_emulations};

/// PCI limits of FreeBSD's pci_emul.c.
const MAXBUSES: i32 = 256;
const MAXSLOTS: i32 = 32;
const MAXFUNCS: i32 = 8;

/// The `-s help` listing: one emulation name per line, those this build implements.
pub fn supported_devices() -> String {
    supported_pci_emulations()
}

fn fail(line: String) -> CliError {
    CliError::new(4, vec![line])
}

/// A legacy parser's refusal as FreeBSD prints it (exit 4).
fn legacy_error(progname: &str, e: LegacyError) -> CliError {
    match e {
        LegacyError::Tree(e) => config_error(progname, &e),
        LegacyError::Invalid(line) => fail(line),
    }
}

/// Parse one `-s` value into `config`, as FreeBSD's `pci_parse_slot` does (failures exit 4).
pub fn parse_slot(config: &mut Config, opt: &str, progname: &str) -> Result<(), CliError> {
    let usage = || fail(format!("Invalid PCI slot info field \"{opt}\""));
    let Some((slot, rest)) = opt.split_once(',') else {
        return Err(usage());
    };
    let (emul, conf) = match rest.split_once(',') {
        Some((e, c)) => (e, Some(c)),
        None => (rest, None),
    };

    let (bus, slotnum, func) = {
        let v = scan_ints(slot, "%d:%d:%d");
        if v.len() == 3 {
            (v[0], v[1], v[2])
        } else {
            let v = scan_ints(slot, "%d:%d");
            if v.len() == 2 {
                (0, v[0], v[1])
            } else {
                let v = scan_ints(slot, "%d");
                (0, v.first().copied().unwrap_or(-1), 0)
            }
        }
    };
    if !(0..MAXBUSES).contains(&bus)
        || !(0..MAXSLOTS).contains(&slotnum)
        || !(0..MAXFUNCS).contains(&func)
    {
        return Err(usage());
    }

    let Some(emulation) = pci_emulation(emul) else {
        return Err(fail(format!(
            "pci slot {bus}:{slotnum}:{func}: unknown device \"{emul}\""
        )));
    };

    let node = format!("pci.{bus}.{slotnum}.{func}");
    if config.node_exists(&node) {
        return Err(fail(format!(
            "pci slot {bus}:{slotnum}:{func} already occupied!"
        )));
    }
    let cfg = |r: Result<(), crate::config::ConfigError>| r.map_err(|e| config_error(progname, &e));
    cfg(config.create_node(&node))?;
    cfg(config.set_in_node(
        &node,
        "device",
        emulation.alias_of.unwrap_or(emulation.name),
    ))?;
    let mut writer = LegacyWriter { config };
    (emulation.legacy_config)(&mut writer, &node, conf).map_err(|e| legacy_error(progname, e))
}

/// Writes keys below one node for `-l`, turning tree refusals into FreeBSD's exit-4 errors.
pub(super) struct NodeWriter<'a> {
    pub(super) config: &'a mut Config,
    pub(super) progname: &'a str,
}

impl NodeWriter<'_> {
    fn legacy<R>(
        &mut self,
        f: impl FnOnce(&mut LegacyWriter<'_>) -> Result<R, LegacyError>,
    ) -> Result<R, CliError> {
        let mut writer = LegacyWriter {
            config: self.config,
        };
        f(&mut writer).map_err(|e| legacy_error(self.progname, e))
    }

    pub(super) fn set(&mut self, node: &str, name: &str, value: &str) -> Result<(), CliError> {
        self.legacy(|w| w.set(node, name, value))
    }

    pub(super) fn create(&mut self, node: &str) -> Result<(), CliError> {
        self.legacy(|w| w.create(node))
    }

    /// `pci_parse_legacy_config`: `name=value` pairs, bare names become `true`.
    pub(super) fn generic(&mut self, node: &str, conf: Option<&str>) -> Result<(), CliError> {
        self.legacy(|w| w.generic(node, conf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(opt: &str) -> Result<Config, CliError> {
        let mut c = Config::new();
        parse_slot(&mut c, opt, "bhyve")?;
        Ok(c)
    }

    fn keys(c: &Config) -> Vec<(String, String)> {
        c.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut v: Vec<_> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn slot_forms_and_leading_blank() {
        assert!(parse("3,virtio-rnd").unwrap().node_exists("pci.0.3.0"));
        assert!(parse("3:2,virtio-rnd").unwrap().node_exists("pci.0.3.2"));
        assert!(parse("1:3:2,virtio-rnd").unwrap().node_exists("pci.1.3.2"));
        assert!(parse(" 29,virtio-rnd").unwrap().node_exists("pci.0.29.0"));
        assert!(parse("31abc,virtio-rnd").unwrap().node_exists("pci.0.31.0"));
    }

    #[test]
    fn bad_slots_are_refused_with_exit_4() {
        for opt in [
            "5:12,virtio-rnd",
            "32,virtio-rnd",
            "x,virtio-rnd",
            "256:0:0,lpc",
            "7",
        ] {
            let e = parse(opt).unwrap_err();
            assert_eq!(e.status, 4);
            assert_eq!(
                e.lines,
                vec![format!("Invalid PCI slot info field \"{opt}\"")]
            );
        }
    }

    #[test]
    fn unknown_emulation_names_the_full_slot() {
        let e = parse("0,ahcix").unwrap_err();
        assert_eq!(e.lines, vec!["pci slot 0:0:0: unknown device \"ahcix\""]);
        assert_eq!(e.status, 4);
    }

    #[test]
    fn dummy_test_device_is_selectable_per_function() {
        let mut c = Config::new();
        for opt in ["4:0,dummy", "4:1,dummy", "0:4:2,dummy"] {
            parse_slot(&mut c, opt, "bhyve").unwrap();
        }
        assert_eq!(
            keys(&c),
            kv(&[
                ("pci.0.4.0.device", "dummy"),
                ("pci.0.4.1.device", "dummy"),
                ("pci.0.4.2.device", "dummy"),
            ])
        );
        assert!(supported_devices().lines().any(|l| l == "dummy"));
    }

    #[test]
    fn occupied_slot_is_refused() {
        let mut c = Config::new();
        parse_slot(&mut c, "3,virtio-rnd", "bhyve").unwrap();
        let e = parse_slot(&mut c, "3:0,virtio-rnd", "bhyve").unwrap_err();
        assert_eq!(e.lines, vec!["pci slot 0:3:0 already occupied!"]);
    }

    #[test]
    fn block_device_takes_path_then_options() {
        let c = parse("4,virtio-blk,/vm/d.img,nocache,direct,sectorsize=512/4096,ser=X1").unwrap();
        assert_eq!(
            keys(&c),
            kv(&[
                ("pci.0.4.0.device", "virtio-blk"),
                ("pci.0.4.0.path", "/vm/d.img"),
                ("pci.0.4.0.nocache", "true"),
                ("pci.0.4.0.direct", "true"),
                ("pci.0.4.0.sectorsize", "512/4096"),
                ("pci.0.4.0.ser", "X1"),
            ])
        );
    }

    #[test]
    fn ahci_ports_bind_options_to_the_preceding_port() {
        let c = parse("3,ahci,hd:/a.img,bootindex=2,hd:/b.img,bootindex=1,cd:/c.iso").unwrap();
        assert_eq!(
            keys(&c),
            kv(&[
                ("pci.0.3.0.device", "ahci"),
                ("pci.0.3.0.port.0.type", "hd"),
                ("pci.0.3.0.port.0.path", "/a.img"),
                ("pci.0.3.0.port.0.bootindex", "2"),
                ("pci.0.3.0.port.1.type", "hd"),
                ("pci.0.3.0.port.1.path", "/b.img"),
                ("pci.0.3.0.port.1.bootindex", "1"),
                ("pci.0.3.0.port.2.type", "cd"),
                ("pci.0.3.0.port.2.path", "/c.iso"),
            ])
        );
        assert_eq!(
            keys(&parse("2:0,ahci").unwrap()),
            kv(&[("pci.0.2.0.device", "ahci")])
        );
        let e = parse("3,ahci,/a.img").unwrap_err();
        assert_eq!(
            e.lines,
            vec!["Missing or invalid type for port 0: \"/a.img\""]
        );
    }

    #[test]
    fn ahci_cd_alias_stores_ahci_with_port_zero() {
        let c = parse("31,ahci-cd,/iso,ro").unwrap();
        assert_eq!(
            keys(&c),
            kv(&[
                ("pci.0.31.0.device", "ahci"),
                ("pci.0.31.0.port.0.type", "cd"),
                ("pci.0.31.0.port.0.path", "/iso"),
                ("pci.0.31.0.port.0.ro", "true"),
            ])
        );
    }

    #[test]
    fn amd_hostbridge_is_a_hostbridge_with_amd_ids() {
        let c = parse("0,amd_hostbridge").unwrap();
        assert_eq!(
            keys(&c),
            kv(&[
                ("pci.0.0.0.device", "hostbridge"),
                ("pci.0.0.0.vendor", "0x1022"),
                ("pci.0.0.0.devid", "0x7432"),
            ])
        );
    }

    #[test]
    fn net_backend_is_the_first_token() {
        let c = parse("2:0,virtio-net,tap0,mac=52:54:00:00:00:01,mtu=9000").unwrap();
        assert_eq!(c.get("pci.0.2.0.backend"), Some("tap0"));
        assert_eq!(c.get("pci.0.2.0.mac"), Some("52:54:00:00:00:01"));
        assert_eq!(c.get("pci.0.2.0.mtu"), Some("9000"));
        let c = parse("5,e1000,netgraph,path=sw:,peerhook=link2,socket=s,hook=h").unwrap();
        assert_eq!(c.get("pci.0.5.0.backend"), Some("netgraph"));
        assert_eq!(c.get("pci.0.5.0.path"), Some("sw:"));
        assert_eq!(c.get("pci.0.5.0.peerhook"), Some("link2"));
    }

    #[test]
    fn fbuf_keeps_empty_fields_and_empty_password() {
        let c = parse("29,fbuf,vncserver,tcp=0.0.0.0:5900,w=800,h=600,password=,,").unwrap();
        assert_eq!(c.get("pci.0.29.0.vncserver"), Some("true"));
        assert_eq!(c.get("pci.0.29.0.tcp"), Some("0.0.0.0:5900"));
        assert_eq!(c.get("pci.0.29.0.password"), Some(""));
        assert_eq!(c.get("pci.0.29.0."), Some("true"));
    }

    #[test]
    fn console_ports_keep_dotted_names() {
        let c =
            parse("2,virtio-console,org.qemu.guest_agent.0=/run/a.sock,1=/vm/x/vtcon.1").unwrap();
        assert_eq!(
            c.get("pci.0.2.0.port.0.name"),
            Some("org.qemu.guest_agent.0")
        );
        assert_eq!(c.get("pci.0.2.0.port.0.path"), Some("/run/a.sock"));
        assert_eq!(c.get("pci.0.2.0.port.1.name"), Some("1"));
        let e = parse("2,virtio-console,nopath").unwrap_err();
        assert_eq!(e.lines, vec!["vtcon: port nopath requires a path"]);
        let many: Vec<String> = (0..17).map(|i| format!("p{i}=/s{i}")).collect();
        let e = parse(&format!("2,virtio-console,{}", many.join(","))).unwrap_err();
        assert_eq!(e.lines, vec!["vtcon: too many ports"]);
    }

    #[test]
    fn nine_p_share_and_flags() {
        let c = parse("6,virtio-9p,shared_dir=/shared/dir,ro").unwrap();
        assert_eq!(c.get("pci.0.6.0.sharename"), Some("shared_dir"));
        assert_eq!(c.get("pci.0.6.0.path"), Some("/shared/dir"));
        assert_eq!(c.get("pci.0.6.0.ro"), Some("true"));
        assert!(parse("6,virtio-9p,a=/x,b=/y").is_err());
    }

    #[test]
    fn passthru_forms() {
        let c = parse("7,passthru,3/0/0,rom=/r.bin").unwrap();
        assert_eq!(c.get("pci.0.7.0.bus"), Some("3"));
        assert_eq!(c.get("pci.0.7.0.slot"), Some("0"));
        assert_eq!(c.get("pci.0.7.0.func"), Some("0"));
        assert_eq!(c.get("pci.0.7.0.rom"), Some("/r.bin"));
        assert_eq!(
            parse("7,passthru,ppt0").unwrap().get("pci.0.7.0.pptdev"),
            Some("ppt0")
        );
        assert_eq!(
            parse("7,passthru,pci0:4:0:1")
                .unwrap()
                .get("pci.0.7.0.func"),
            Some("1")
        );
        let e = parse("7,passthru,bogus").unwrap_err();
        assert_eq!(e.lines, vec!["passthru: invalid options \"bogus\""]);
    }

    #[test]
    fn xhci_tablet_goes_to_usb_slot_one() {
        let c = parse("30,xhci,tablet").unwrap();
        assert_eq!(c.get("pci.0.30.0.slot.1.device"), Some("tablet"));
        assert_eq!(
            keys(&parse("30,xhci").unwrap()),
            kv(&[("pci.0.30.0.device", "xhci")])
        );
    }

    #[test]
    fn nvme_ram_or_path() {
        let c = parse("4,nvme,ram=1024,maxq=2").unwrap();
        assert_eq!(c.get("pci.0.4.0.ram"), Some("1024"));
        assert_eq!(c.get("pci.0.4.0.maxq"), Some("2"));
        let c = parse("4,nvme,/dev/zvol/x,ram=8").unwrap();
        assert_eq!(c.get("pci.0.4.0.path"), Some("/dev/zvol/x"));
        assert_eq!(c.get("pci.0.4.0.ram"), Some("8"));
    }

    #[test]
    fn scsi_input_uart() {
        assert_eq!(
            parse("5,virtio-scsi,/dev/cam/ctl,iid=3")
                .unwrap()
                .get("pci.0.5.0.dev"),
            Some("/dev/cam/ctl")
        );
        assert_eq!(
            parse("5,virtio-input,/dev/input/event0")
                .unwrap()
                .get("pci.0.5.0.path"),
            Some("/dev/input/event0")
        );
        let missing_path = parse("5,virtio-input").unwrap_err();
        assert_eq!(missing_path.status, 4);
        assert_eq!(
            missing_path.lines,
            ["virtio-input: a device path is required (-s SLOT,virtio-input,/dev/input/eventN)"]
        );
        assert_eq!(
            parse("5,uart,/dev/nmdm0A,x").unwrap().get("pci.0.5.0.path"),
            Some("/dev/nmdm0A,x")
        );
    }

    #[test]
    fn dotted_generic_name_is_refused() {
        let e = parse("5,hda,a.b=c").unwrap_err();
        assert_eq!(e.lines, vec!["bhyve: Invalid config node name a.b"]);
    }
}
