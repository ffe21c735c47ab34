//! `-l lpcdev[,conf]`: FreeBSD's `lpc_device_parse` (amd64/pci_lpc.c).

use super::pci::NodeWriter;
use super::CliError;
use crate::config::Config;

/// The LPC UARTs, as named in configuration keys.
const UART_NAMES: [&str; 4] = ["com1", "com2", "com3", "com4"];
/// The name of the PC test device.
const PCTESTDEV: &str = "pc-testdev";

/// The `-l help` listing.
pub fn supported_devices() -> String {
    let mut out = String::from("bootrom\n");
    for name in UART_NAMES {
        out.push_str(name);
        out.push('\n');
    }
    out.push_str("tpm\n");
    out.push_str(PCTESTDEV);
    out.push('\n');
    out
}

/// Parse one `-l` value into `config`.
pub fn parse_device(config: &mut Config, opts: &str, progname: &str) -> Result<(), CliError> {
    let mut w = NodeWriter { config, progname };
    let (dev, rest) = match opts.split_once(',') {
        Some((d, r)) => (d, Some(r)),
        None => (opts, None),
    };
    let fatal =
        |status: i32, msg: String| CliError::new(status, vec![format!("{progname}: {msg}")]);

    if dev.eq_ignore_ascii_case("bootrom") {
        let Some(rest) = rest else {
            return Err(fatal(4, format!("invalid bootrom option \"{opts}\"")));
        };
        let (romfile, rest) = split_first(rest);
        w.set("lpc", "bootrom", romfile)?;
        let Some(rest) = rest else {
            return Ok(());
        };
        let (varfile, rest) = split_first(rest);
        if varfile.contains('=') {
            // Not a variables file but the first `name=value` option (e.g. `fwcfg=qemu`).
            w.generic("lpc", Some(varfile))?;
        } else {
            w.set("lpc", "bootvars", varfile)?;
        }
        return w.generic("lpc", rest);
    }
    if dev.eq_ignore_ascii_case("tpm") {
        w.create("tpm")?;
        let Some(rest) = rest else {
            return Err(fatal(4, format!("invalid tpm type \"{opts}\"")));
        };
        let (tpm_type, rest) = split_first(rest);
        w.set("tpm", "type", tpm_type)?;
        let Some(rest) = rest else {
            return Err(fatal(4, format!("invalid tpm path \"{opts}\"")));
        };
        let (path, rest) = split_first(rest);
        w.set("tpm", "path", path)?;
        w.generic("tpm", rest)?;
        if w.config.get("tpm.version").is_none() {
            w.set("tpm", "version", "2.0")?;
        }
        return Ok(());
    }
    if let Some(name) = UART_NAMES.iter().find(|n| dev.eq_ignore_ascii_case(n)) {
        let node = format!("lpc.{name}");
        match rest {
            Some(path) => w.set(&node, "path", path)?,
            // FreeBSD's nvlist refuses a NULL value and leaves an empty node behind.
            None => w.create(&node)?,
        }
        return Ok(());
    }
    if dev.eq_ignore_ascii_case(PCTESTDEV) {
        return w.set("lpc", PCTESTDEV, "true");
    }
    Err(fatal(
        super::EX_USAGE,
        format!("invalid lpc device configuration '{opts}'"),
    ))
}

/// `strsep(&s, ",")`: the first token and what follows the comma, if any.
fn split_first(s: &str) -> (&str, Option<&str>) {
    match s.split_once(',') {
        Some((a, b)) => (a, Some(b)),
        None => (s, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(opts: &str) -> Result<Config, CliError> {
        let mut c = Config::new();
        parse_device(&mut c, opts, "bhyve")?;
        Ok(c)
    }

    #[test]
    fn com_ports_any_case() {
        assert_eq!(
            parse("com1,/dev/nmdm0A").unwrap().get("lpc.com1.path"),
            Some("/dev/nmdm0A")
        );
        assert_eq!(
            parse("COM2,stdio").unwrap().get("lpc.com2.path"),
            Some("stdio")
        );
        assert_eq!(
            parse("com3,tcp=127.0.0.1:12345")
                .unwrap()
                .get("lpc.com3.path"),
            Some("tcp=127.0.0.1:12345")
        );
        let c = parse("com4").unwrap();
        assert!(c.node_exists("lpc.com4"));
        assert_eq!(c.get("lpc.com4.path"), None);
    }

    #[test]
    fn bootrom_with_vars_and_options() {
        let c = parse("bootrom,/code.fd,/vars.fd,fwcfg=qemu").unwrap();
        assert_eq!(c.get("lpc.bootrom"), Some("/code.fd"));
        assert_eq!(c.get("lpc.bootvars"), Some("/vars.fd"));
        assert_eq!(c.get("lpc.fwcfg"), Some("qemu"));
        let c = parse("bootrom,/code.fd,fwcfg=qemu").unwrap();
        assert_eq!(c.get("lpc.bootvars"), None);
        assert_eq!(c.get("lpc.fwcfg"), Some("qemu"));
        let e = parse("bootrom").unwrap_err();
        assert_eq!(e.status, 4);
        assert_eq!(e.lines, vec!["bhyve: invalid bootrom option \"bootrom\""]);
    }

    #[test]
    fn tpm_defaults_version() {
        let c = parse("tpm,swtpm,/run/tpm.sock").unwrap();
        assert_eq!(c.get("tpm.type"), Some("swtpm"));
        assert_eq!(c.get("tpm.path"), Some("/run/tpm.sock"));
        assert_eq!(c.get("tpm.version"), Some("2.0"));
        let c = parse("tpm,passthru,/dev/tpm0,version=1.2").unwrap();
        assert_eq!(c.get("tpm.version"), Some("1.2"));
        assert_eq!(
            parse("tpm,swtpm").unwrap_err().lines,
            vec!["bhyve: invalid tpm path \"tpm,swtpm\""]
        );
    }

    #[test]
    fn unknown_device_and_leading_blank_are_usage_errors() {
        let e = parse(" tpm,swtpm,/x").unwrap_err();
        assert_eq!(e.status, 64);
        assert_eq!(
            e.lines,
            vec!["bhyve: invalid lpc device configuration ' tpm,swtpm,/x'"]
        );
        assert!(parse("pc-testdev")
            .unwrap()
            .get_bool("lpc.pc-testdev")
            .unwrap()
            .unwrap());
    }
}
