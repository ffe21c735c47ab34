//! `-s slot,emulation[,conf]`: FreeBSD's `pci_parse_slot` and the per-emulation "legacy config"
//! parsers that turn the `conf` string into keys under `pci.B.S.F`.

use super::{config_error, CliError};
use crate::cnum::scan_ints;
use crate::config::Config;

/// PCI limits of FreeBSD's pci_emul.c.
const MAXBUSES: i32 = 256;
const MAXSLOTS: i32 = 32;
const MAXFUNCS: i32 = 8;
/// AHCI ports per controller (pci_ahci.c `MAX_PORTS`).
const AHCI_MAX_PORTS: usize = 32;
/// virtio-console ports per controller (`VTCON_MAXPORTS`).
const VTCON_MAXPORTS: usize = 16;

/// How an emulation turns its configuration string into keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConfigSyntax {
    /// Comma-separated `name[=value]`; a bare name becomes `true`.
    Generic,
    /// First token is `path`, the rest generic (block_if.c).
    Block,
    /// `ram=N` or a block device (pci_nvme.c).
    Nvme,
    /// First token is `backend`, the rest generic (net_backends.c).
    Net,
    /// `hd:PATH[,opts],cd:PATH[,opts]…` ports (pci_ahci.c).
    Ahci,
    /// One port of the given type, block syntax (`ahci-hd`, `ahci-cd`).
    AhciPort(&'static str),
    /// Fixed AMD vendor/device ids; the string is ignored.
    AmdHostbridge,
    /// `name=path` ports (pci_virtio_console.c).
    Console,
    /// `sharename=path` plus flags (pci_virtio_9p.c).
    NineP,
    /// First token is `dev`, the rest generic (pci_virtio_scsi.c).
    Scsi,
    /// First token is `path`, the rest generic; required (pci_virtio_input.c).
    Input,
    /// `pptN`, `pci0:B:S:F`, `pciB:S:F` or `B/S/F`, then generic (pci_passthru.c).
    Passthru,
    /// The whole string is `path` (pci_uart.c).
    Uart,
    /// USB devices, one per slot starting at 1 (pci_xhci.c).
    Xhci,
}

/// One `-s` emulation name FreeBSD ships, with the device name it stores.
struct Emulation {
    name: &'static str,
    alias: Option<&'static str>,
    syntax: ConfigSyntax,
}

const fn emu(name: &'static str, syntax: ConfigSyntax) -> Emulation {
    Emulation {
        name,
        alias: None,
        syntax,
    }
}

const fn alias(name: &'static str, target: &'static str, syntax: ConfigSyntax) -> Emulation {
    Emulation {
        name,
        alias: Some(target),
        syntax,
    }
}

/// Every PCI emulation of FreeBSD's bhyve (amd64), as `-s help` lists them, plus `dummy`, the
/// test device pci_emul.c registers when built with PCI_EMUL_TEST.
const EMULATIONS: &[Emulation] = &[
    emu("ahci", ConfigSyntax::Ahci),
    alias("ahci-cd", "ahci", ConfigSyntax::AhciPort("cd")),
    alias("ahci-hd", "ahci", ConfigSyntax::AhciPort("hd")),
    alias("amd_hostbridge", "hostbridge", ConfigSyntax::AmdHostbridge),
    emu("dummy", ConfigSyntax::Generic),
    emu("e1000", ConfigSyntax::Net),
    emu("fbuf", ConfigSyntax::Generic),
    emu("hda", ConfigSyntax::Generic),
    emu("hostbridge", ConfigSyntax::Generic),
    emu("lpc", ConfigSyntax::Generic),
    emu("nvme", ConfigSyntax::Nvme),
    emu("passthru", ConfigSyntax::Passthru),
    emu("uart", ConfigSyntax::Uart),
    emu("virtio-9p", ConfigSyntax::NineP),
    emu("virtio-blk", ConfigSyntax::Block),
    emu("virtio-console", ConfigSyntax::Console),
    emu("virtio-input", ConfigSyntax::Input),
    emu("virtio-net", ConfigSyntax::Net),
    emu("virtio-rnd", ConfigSyntax::Generic),
    emu("virtio-scsi", ConfigSyntax::Scsi),
    emu("xhci", ConfigSyntax::Xhci),
];

/// The `-s help` listing: one emulation name per line.
pub fn supported_devices() -> String {
    EMULATIONS.iter().map(|e| format!("{}\n", e.name)).collect()
}

/// Every emulation name `-s` accepts.
pub fn emulation_names() -> impl Iterator<Item = &'static str> {
    EMULATIONS.iter().map(|e| e.name)
}

fn fail(line: String) -> CliError {
    CliError::new(4, vec![line])
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

    let Some(emulation) = EMULATIONS.iter().find(|e| e.name == emul) else {
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
    cfg(config.set_in_node(&node, "device", emulation.alias.unwrap_or(emulation.name)))?;
    parse_device_config(config, &node, emulation.syntax, conf, progname)
}

fn parse_device_config(
    config: &mut Config,
    node: &str,
    syntax: ConfigSyntax,
    conf: Option<&str>,
    progname: &str,
) -> Result<(), CliError> {
    let mut ctx = NodeWriter { config, progname };
    match syntax {
        ConfigSyntax::Generic => ctx.generic(node, conf),
        ConfigSyntax::Block => ctx.first_token_then_generic(node, "path", conf),
        ConfigSyntax::Net => ctx.first_token_then_generic(node, "backend", conf),
        ConfigSyntax::Scsi => ctx.first_token_then_generic(node, "dev", conf),
        ConfigSyntax::Input => match conf {
            // FreeBSD refuses a missing device path without printing anything.
            None => Err(CliError::new(4, Vec::new())),
            Some(_) => ctx.first_token_then_generic(node, "path", conf),
        },
        ConfigSyntax::Uart => match conf {
            Some(path) => ctx.set(node, "path", path),
            None => Ok(()),
        },
        ConfigSyntax::Nvme => match conf {
            Some(c) if c.starts_with("ram=") => {
                let (ram, rest) = match c.split_once(',') {
                    Some((r, rest)) => (r, Some(rest)),
                    None => (c, None),
                };
                ctx.set(node, "ram", &ram[4..])?;
                ctx.generic(node, rest)
            }
            _ => ctx.first_token_then_generic(node, "path", conf),
        },
        ConfigSyntax::AmdHostbridge => {
            ctx.set(node, "vendor", "0x1022")?;
            ctx.set(node, "devid", "0x7432")
        }
        ConfigSyntax::Ahci => ctx.ahci(node, conf),
        ConfigSyntax::AhciPort(kind) => {
            let ports = format!("{node}.port");
            ctx.create(&ports)?;
            ctx.ahci_port(&ports, 0, kind, conf)
        }
        ConfigSyntax::Console => ctx.console(node, conf),
        ConfigSyntax::NineP => ctx.nine_p(node, conf),
        ConfigSyntax::Passthru => ctx.passthru(node, conf),
        ConfigSyntax::Xhci => ctx.xhci(node, conf),
    }
}

/// Writes keys below one node, turning tree refusals into FreeBSD's exit-4 errors.
pub(super) struct NodeWriter<'a> {
    pub(super) config: &'a mut Config,
    pub(super) progname: &'a str,
}

impl NodeWriter<'_> {
    pub(super) fn set(&mut self, node: &str, name: &str, value: &str) -> Result<(), CliError> {
        self.config
            .set_in_node(node, name, value)
            .map_err(|e| config_error(self.progname, &e))
    }

    pub(super) fn create(&mut self, node: &str) -> Result<(), CliError> {
        self.config
            .create_node(node)
            .map_err(|e| config_error(self.progname, &e))
    }

    /// `pci_parse_legacy_config`: `name=value` pairs, bare names become `true`.
    pub(super) fn generic(&mut self, node: &str, conf: Option<&str>) -> Result<(), CliError> {
        let Some(conf) = conf else {
            return Ok(());
        };
        for token in conf.split(',') {
            match token.split_once('=') {
                Some((name, value)) => self.set(node, name, value)?,
                None => self.set(node, token, "true")?,
            }
        }
        Ok(())
    }

    fn first_token_then_generic(
        &mut self,
        node: &str,
        key: &str,
        conf: Option<&str>,
    ) -> Result<(), CliError> {
        let Some(conf) = conf else {
            return Ok(());
        };
        match conf.split_once(',') {
            None => self.set(node, key, conf),
            Some((first, rest)) => {
                self.set(node, key, first)?;
                self.generic(node, Some(rest))
            }
        }
    }

    fn ahci_port(
        &mut self,
        ports: &str,
        port: usize,
        kind: &str,
        conf: Option<&str>,
    ) -> Result<(), CliError> {
        let port_node = format!("{ports}.{port}");
        self.create(&port_node)?;
        self.set(&port_node, "type", kind)?;
        self.first_token_then_generic(&port_node, "path", conf)
    }

    fn ahci(&mut self, node: &str, conf: Option<&str>) -> Result<(), CliError> {
        let Some(conf) = conf else {
            return Ok(());
        };
        let ports = format!("{node}.port");
        self.create(&ports)?;
        let mut rest = Some(conf);
        let mut port = 0;
        while port < AHCI_MAX_PORTS {
            let Some(mut s) = rest else {
                break;
            };
            let kind = if let Some(p) = s.strip_prefix("hd:") {
                s = p;
                Some("hd")
            } else if let Some(p) = s.strip_prefix("cd:") {
                s = p;
                Some("cd")
            } else {
                None
            };
            // The port's options end where the next ",hd:" or ",cd:" begins.
            let next = [s.find(",hd:"), s.find(",cd:")].into_iter().flatten().min();
            let current = match next {
                Some(i) => {
                    rest = Some(&s[i + 1..]);
                    &s[..i]
                }
                None => {
                    rest = None;
                    s
                }
            };
            if !current.is_empty() {
                let Some(kind) = kind else {
                    return Err(fail(format!(
                        "Missing or invalid type for port {port}: \"{current}\""
                    )));
                };
                self.ahci_port(&ports, port, kind, Some(current))?;
            }
            port += 1;
        }
        Ok(())
    }

    fn console(&mut self, node: &str, conf: Option<&str>) -> Result<(), CliError> {
        let Some(conf) = conf else {
            return Ok(());
        };
        let ports = format!("{node}.port");
        self.create(&ports)?;
        for (port, opt) in conf.split(',').enumerate() {
            let Some((name, path)) = opt.split_once('=') else {
                return Err(fail(format!("vtcon: port {opt} requires a path")));
            };
            if port >= VTCON_MAXPORTS {
                return Err(fail("vtcon: too many ports".to_string()));
            }
            let port_node = format!("{ports}.{port}");
            self.create(&port_node)?;
            self.set(&port_node, "name", name)?;
            self.set(&port_node, "path", path)?;
        }
        Ok(())
    }

    fn nine_p(&mut self, node: &str, conf: Option<&str>) -> Result<(), CliError> {
        let Some(conf) = conf else {
            return Ok(());
        };
        let mut have_share = false;
        for token in conf.split(',') {
            match token.split_once('=') {
                Some((share, path)) => {
                    if have_share {
                        return Err(fail(
                            "virtio-9p: more than one share name given".to_string(),
                        ));
                    }
                    have_share = true;
                    self.set(node, "sharename", share)?;
                    self.set(node, "path", path)?;
                }
                None => self.set(node, token, "true")?,
            }
        }
        Ok(())
    }

    fn passthru(&mut self, node: &str, conf: Option<&str>) -> Result<(), CliError> {
        let Some(conf) = conf else {
            return Ok(());
        };
        let (first, rest) = match conf.split_once(',') {
            Some((f, r)) => (f, Some(r)),
            None => (conf, None),
        };
        if conf.starts_with("ppt") {
            self.set(node, "pptdev", first)?;
        } else {
            // sscanf reads the whole string; trailing options after the three numbers are fine.
            let bsf = [
                scan_ints(conf, "pci0:%d:%d:%d"),
                scan_ints(conf, "pci%d:%d:%d"),
                scan_ints(conf, "%d/%d/%d"),
            ]
            .into_iter()
            .find(|v| v.len() == 3);
            let Some(bsf) = bsf else {
                return Err(fail(format!("passthru: invalid options \"{conf}\"")));
            };
            self.set(node, "bus", &bsf[0].to_string())?;
            self.set(node, "slot", &bsf[1].to_string())?;
            self.set(node, "func", &bsf[2].to_string())?;
        }
        self.generic(node, rest)
    }

    fn xhci(&mut self, node: &str, conf: Option<&str>) -> Result<(), CliError> {
        let Some(conf) = conf else {
            return Ok(());
        };
        let slots = format!("{node}.slot");
        self.create(&slots)?;
        for (i, opt) in conf.split(',').enumerate() {
            let (device, dev_conf) = match opt.split_once('=') {
                Some((d, c)) => (d, Some(c)),
                None => (opt, None),
            };
            let slot_node = format!("{slots}.{}", i + 1);
            self.create(&slot_node)?;
            self.set(&slot_node, "device", device)?;
            if let Some(c) = dev_conf.filter(|c| !c.is_empty()) {
                self.generic(&slot_node, Some(c))?;
            }
        }
        Ok(())
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
        assert_eq!(parse("5,virtio-input").unwrap_err().status, 4);
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
