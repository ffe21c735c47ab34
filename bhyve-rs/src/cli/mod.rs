//! bhyve's command line: getopt-compatible parsing into the configuration tree.
//!
//! [`parse_bhyve_args`] does everything FreeBSD's `bhyve` does with its arguments before it
//! opens the VM: option parsing (in order, so `-o` can change a device a preceding `-s` created),
//! the operand, `config.dump`, and the checks of the machine description
//! ([`crate::description`]: topology, CPU pinning, memory size, switches). It never prints and
//! never starts anything: the `bhyve` binary's `main` prints and runs the machine.

mod getopt;
mod lpc;
mod pci;

use std::path::PathBuf;

use crate::config::cnum;
use crate::config::{default_config, Config, ConfigError};
use crate::description::{DescriptionError, MachineDescription, CPU_SETSIZE};
pub use getopt::{Getopt, GetoptItem};

/// sysexits(3) `EX_USAGE`.
pub const EX_USAGE: i32 = 64;
/// Bound on a `-k` file, far above any real configuration.
const MAX_CONFIG_FILE: u64 = 16 << 20;

#[cfg(feature = "bhyve_snapshot")]
const OPTSTRING: &str = "aehuwxACDHIMPSWYk:f:o:p:G:c:s:m:n:l:K:U:r:";
#[cfg(not(feature = "bhyve_snapshot"))]
const OPTSTRING: &str = "aehuwxACDHIMPSWYk:f:o:p:G:c:s:m:n:l:K:U:";

/// A failed invocation: the lines bhyve prints on stderr and its exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    /// Lines for stderr, without newlines (may be empty: FreeBSD is silent in a few places).
    pub lines: Vec<String>,
    /// Process exit status.
    pub status: i32,
}

impl CliError {
    pub fn new(status: i32, lines: Vec<String>) -> Self {
        CliError { lines, status }
    }

    /// The whole stderr text.
    pub fn text(&self) -> String {
        self.lines.iter().map(|l| format!("{l}\n")).collect()
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.lines.join("\n"))
    }
}

impl std::error::Error for CliError {}

/// A `-f name,string=…|file=…` firmware configuration item (not part of the tree on FreeBSD).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FwCfgItem {
    pub name: String,
    pub source: FwCfgSource,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FwCfgSource {
    String(String),
    File(PathBuf),
}

/// What a command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    /// Build and run the VM described by `config`.
    Run {
        config: Config,
        /// `-r FILE`: restore from this snapshot (feature `bhyve_snapshot`). Without an operand
        /// and without `name` in the tree, the VM name comes from the snapshot.
        restore: Option<PathBuf>,
        /// `-f` items in command-line order.
        fwcfg: Vec<FwCfgItem>,
    },
    /// Print and exit without running anything (`-h`, `-s help`, `-l help`, `config.dump`).
    Exit {
        stdout: String,
        stderr: String,
        status: i32,
    },
}

/// The usage text bhyve prints on stderr (`-h`, bad options, wrong operands).
pub fn usage_text(progname: &str) -> String {
    let pad = " ".repeat(progname.len());
    let mut s = format!(
        "Usage: {progname} [-aCDeHhPSuWwxY]\n\
         \x20      {pad} [-c [[cpus=]numcpus][,sockets=n][,cores=n][,threads=n]]\n\
         \x20      {pad} [-G port] [-k config_file] [-l lpc] [-m mem] [-o var=value]\n\
         \x20      {pad} [-p vcpu:hostcpu] [-r file] [-s pci] [-U uuid] vmname\n\
         \x20      -a: local apic is in xAPIC mode (deprecated)\n\
         \x20      -C: include guest memory in core file\n\
         \x20      -c: number of CPUs and/or topology specification\n\
         \x20      -D: destroy on power-off\n\
         \x20      -e: exit on unhandled I/O access\n\
         \x20      -G: start a debug server\n\
         \x20      -H: vmexit from the guest on HLT\n\
         \x20      -h: help\n\
         \x20      -k: key=value flat config file\n\
         \x20      -K: PS2 keyboard layout\n\
         \x20      -l: LPC device configuration\n\
         \x20      -M: monitor mode\n\
         \x20      -m: memory size\n\
         \x20      -n: NUMA domain specification\n\
         \x20      -o: set config 'var' to 'value'\n\
         \x20      -P: vmexit from the guest on pause\n\
         \x20      -p: pin 'vcpu' to 'hostcpu'\n"
    );
    if cfg!(feature = "bhyve_snapshot") {
        s.push_str("       -r: path to checkpoint file\n");
    }
    s.push_str(
        "       -S: guest memory cannot be swapped\n\
         \x20      -s: <slot,driver,configinfo> PCI slot config\n\
         \x20      -U: UUID\n\
         \x20      -u: RTC keeps UTC time\n\
         \x20      -W: force virtio to use single-vector MSI\n\
         \x20      -w: ignore unimplemented MSRs\n\
         \x20      -x: local APIC is in x2APIC mode\n\
         \x20      -Y: disable MPtable generation\n",
    );
    s
}

/// The program name as FreeBSD's `getprogname()` reports it: the basename of `argv[0]`.
pub fn progname(args: &[String]) -> String {
    args.first()
        .map(|a| a.rsplit('/').next().unwrap_or(a))
        .filter(|n| !n.is_empty())
        .unwrap_or("bhyve")
        .to_string()
}

/// `bhyve: <tree refusal>` lines, exit 4.
pub(crate) fn config_error(progname: &str, e: &ConfigError) -> CliError {
    CliError::new(
        4,
        e.lines()
            .into_iter()
            .map(|l| format!("{progname}: {l}"))
            .collect(),
    )
}

struct Parser<'a> {
    config: Config,
    progname: &'a str,
    restore: Option<PathBuf>,
    fwcfg: Vec<FwCfgItem>,
}

impl Parser<'_> {
    fn err(&self, status: i32, msg: impl Into<String>) -> CliError {
        CliError::new(status, vec![format!("{}: {}", self.progname, msg.into())])
    }

    fn usage(&self, status: i32, mut lines: Vec<String>) -> CliError {
        lines.extend(usage_text(self.progname).lines().map(String::from));
        CliError::new(status, lines)
    }

    fn set(&mut self, key: &str, value: &str) -> Result<(), CliError> {
        self.config
            .try_set(key, value)
            .map_err(|e| config_error(self.progname, &e))
    }

    fn set_bool(&mut self, key: &str, value: bool) -> Result<(), CliError> {
        self.set(key, if value { "true" } else { "false" })
    }

    /// `-o var=value` and one `-k` line: everything up to the first `=` is the path.
    fn config_option(&mut self, option: &str) -> Result<bool, CliError> {
        match option.split_once('=') {
            Some((path, value)) if !value.is_empty() => {
                self.set(path, value)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn config_file(&mut self, path: &str) -> Result<(), CliError> {
        use std::io::Read;
        let read = std::fs::File::open(path).and_then(|f| {
            let mut data = Vec::new();
            f.take(MAX_CONFIG_FILE + 1).read_to_end(&mut data)?;
            Ok(data)
        });
        let data = match read {
            Ok(d) if d.len() as u64 > MAX_CONFIG_FILE => {
                return Err(self.err(4, format!("{path}: configuration file too large")))
            }
            Ok(d) => d,
            Err(e) => {
                let why = strerror(&e);
                return Err(self.err(
                    4,
                    format!("Failed to open configuration file {path}: {why}"),
                ));
            }
        };
        let text = String::from_utf8_lossy(&data);
        for (index, raw) in text.split_inclusive('\n').enumerate() {
            if raw.starts_with('#') || raw == "\n" {
                continue;
            }
            let line = raw.split('\n').next().unwrap_or("");
            if !self.config_option(line)? {
                return Err(self.err(
                    4,
                    format!("{path} line {}: invalid config option '{line}'", index + 1),
                ));
            }
        }
        Ok(())
    }

    fn topology_option(&mut self, opt: &str) -> Result<bool, CliError> {
        if opt.is_empty() {
            for key in ["sockets", "cores", "threads", "cpus"] {
                self.set(key, "1")?;
            }
            return Ok(true);
        }
        for token in opt.split(',') {
            let known = ["cpus", "sockets", "cores", "threads"]
                .into_iter()
                .find_map(|k| token.strip_prefix(k)?.strip_prefix('=').map(|v| (k, v)));
            match known {
                Some((key, value)) => self.set(key, value)?,
                None if token.contains('=') => return Ok(false),
                None => self.set("cpus", token)?,
            }
        }
        Ok(true)
    }

    fn pin_option(&mut self, opt: &str) -> Result<(), CliError> {
        let invalid = |p: &Self, first: String| {
            CliError::new(
                EX_USAGE,
                vec![
                    first,
                    format!("{}: invalid vcpu pinning configuration '{opt}'", p.progname),
                ],
            )
        };
        let v = cnum::scan_ints(opt, "%d:%d");
        if v.len() != 2 {
            return Err(invalid(self, format!("invalid format: {opt}")));
        }
        let (vcpu, pcpu) = (v[0], v[1]);
        if vcpu < 0 {
            return Err(invalid(self, format!("invalid vcpu '{vcpu}'")));
        }
        if pcpu < 0 || i64::from(pcpu) >= CPU_SETSIZE {
            return Err(invalid(
                self,
                format!(
                    "hostcpu '{pcpu}' outside valid range from 0 to {}",
                    CPU_SETSIZE - 1
                ),
            ));
        }
        // FreeBSD formats the key into a 16-byte buffer; longer keys are cut short.
        let mut key = format!("vcpu.{vcpu}.cpuset");
        key.truncate(15);
        let value = match self.config.get(&key) {
            Some(old) => format!("{old},{pcpu}"),
            None => pcpu.to_string(),
        };
        self.set(&key, &value)
    }

    fn gdb_option(&mut self, opt: &str) -> Result<(), CliError> {
        let opt = match opt.strip_prefix('w') {
            Some(rest) => {
                self.set_bool("gdb.wait", true)?;
                rest
            }
            None => opt,
        };
        let port = match opt.rsplit_once(':') {
            Some((address, port)) => {
                self.set("gdb.address", address)?;
                port
            }
            None => opt,
        };
        self.set("gdb.port", port)
    }

    fn numa_option(&mut self, opt: &str) -> Result<(), CliError> {
        let invalid = |p: &Self, mut lines: Vec<String>| {
            lines.push(format!(
                "{}: invalid NUMA configuration '{opt}'",
                p.progname
            ));
            CliError::new(EX_USAGE, lines)
        };
        if opt.is_empty() {
            return Err(invalid(self, Vec::new()));
        }
        let mut id = None;
        let (mut size, mut policy, mut cpus) = (None, None, None);
        for token in opt.split(',') {
            if let Some(v) = token.strip_prefix("id=") {
                match cnum::strtol_whole(v).filter(|n| (0..=255).contains(n)) {
                    Some(n) => id = Some(n),
                    None => return Err(self.err(4, format!("Invalid value for id: '{v}'"))),
                }
            } else if let Some(v) = token.strip_prefix("size=") {
                size = Some(v);
            } else if let Some(v) = token.strip_prefix("domain_policy=") {
                policy = Some(v);
            } else if let Some(v) = token.strip_prefix("cpus=") {
                cpus = Some(v);
            }
        }
        let Some(id) = id else {
            return Err(invalid(
                self,
                vec![format!("Missing NUMA domain ID in '{opt}'")],
            ));
        };
        let node = format!("domains.{id}");
        self.config
            .create_node(&node)
            .map_err(|e| config_error(self.progname, &e))?;
        for (key, value) in [("size", size), ("domain_policy", policy), ("cpus", cpus)] {
            if let Some(value) = value {
                self.set(&format!("{node}.{key}"), value)?;
            }
        }
        if !self.get_bool("acpi_tables", None)? {
            return Err(self.err(EX_USAGE, "NUMA emulation requires ACPI"));
        }
        Ok(())
    }

    /// `-f [name=]NAME,string=VALUE|file=PATH` (qemu_fwcfg.c); the error holds the warnings.
    fn fwcfg_option(&mut self, opt: &str) -> Result<(), Vec<String>> {
        // QEMU_FWCFG_MAX_NAME: names must be shorter than this.
        const MAX_NAME: usize = 56;
        let usage = || {
            vec![
                format!("{}: Invalid fw_cfg option \"{opt}\"", self.progname),
                format!("{}: -f [name=]<name>,(string|file)=<value>", self.progname),
            ]
        };
        let body = opt.strip_prefix("name=").unwrap_or(opt);
        let Some((name, source)) = body.split_once(',') else {
            return Err(usage());
        };
        if name.len() >= MAX_NAME {
            return Err(vec![format!(
                "{}: fw_cfg name too long: \"{opt}\"",
                self.progname
            )]);
        }
        let source = if let Some(s) = source.strip_prefix("string=") {
            FwCfgSource::String(s.to_string())
        } else if let Some(f) = source.strip_prefix("file=") {
            FwCfgSource::File(PathBuf::from(f))
        } else {
            return Err(usage());
        };
        self.fwcfg.push(FwCfgItem {
            name: name.to_string(),
            source,
        });
        Ok(())
    }

    /// `get_config_bool[_default]`: a value that is not a boolean is fatal (exit 4).
    fn get_bool(&self, key: &str, default: Option<bool>) -> Result<bool, CliError> {
        match self.config.get_expanded(key) {
            None => default
                .ok_or_else(|| self.err(4, format!("Failed to fetch boolean variable {key}"))),
            Some(v) => crate::config::parse_bool(&v).ok_or_else(|| {
                self.err(4, format!("Invalid value {v} for boolean variable {key}"))
            }),
        }
    }

    /// One option; `Ok(Some(_))` ends parsing early with output (help texts).
    fn option(&mut self, letter: char, arg: Option<&str>) -> Result<Option<Invocation>, CliError> {
        let arg = arg.unwrap_or("");
        match letter {
            'a' => self.set_bool("x86.x2apic", false)?,
            // -A (ACPI tables) and -I (I/O APIC) are always on now; accepted for old scripts.
            'A' | 'I' => {}
            'D' => self.set_bool("destroy_on_poweroff", true)?,
            'p' => self.pin_option(arg)?,
            'c' => {
                if !self.topology_option(arg)? {
                    return Err(self.err(EX_USAGE, format!("invalid cpu topology '{arg}'")));
                }
            }
            'C' => self.set_bool("memory.guest_in_core", true)?,
            'f' => {
                if let Err(mut lines) = self.fwcfg_option(arg) {
                    lines.push(format!("{}: invalid fwcfg item '{arg}'", self.progname));
                    return Err(CliError::new(EX_USAGE, lines));
                }
            }
            'G' => self.gdb_option(arg)?,
            'k' => self.config_file(arg)?,
            'K' => self.set("keyboard.layout", arg)?,
            'l' => {
                if "help".starts_with(arg) {
                    return Ok(Some(exit_stdout(lpc::supported_devices(), 0)));
                }
                lpc::parse_device(&mut self.config, arg, self.progname)?;
            }
            'n' => self.numa_option(arg)?,
            'r' => self.restore = Some(PathBuf::from(arg)),
            's' => {
                if "help".starts_with(arg) {
                    return Ok(Some(exit_stdout(pci::supported_devices(), 0)));
                }
                pci::parse_slot(&mut self.config, arg, self.progname)?;
            }
            'S' => self.set_bool("memory.wired", true)?,
            'm' => self.set("memory.size", arg)?,
            'M' => self.set_bool("monitor", true)?,
            'o' => {
                if !self.config_option(arg)? {
                    return Err(self.err(EX_USAGE, format!("invalid configuration option '{arg}'")));
                }
            }
            'H' => self.set_bool("x86.vmexit_on_hlt", true)?,
            'P' => self.set_bool("x86.vmexit_on_pause", true)?,
            'e' => self.set_bool("x86.strictio", true)?,
            'u' => self.set_bool("rtc.use_localtime", false)?,
            'U' => self.set("uuid", arg)?,
            'w' => self.set_bool("x86.strictmsr", false)?,
            'W' => self.set_bool("virtio_msix", false)?,
            'x' => self.set_bool("x86.x2apic", true)?,
            'Y' => self.set_bool("x86.mptable", false)?,
            'h' => {
                return Ok(Some(Invocation::Exit {
                    stdout: String::new(),
                    stderr: usage_text(self.progname),
                    status: 0,
                }))
            }
            _ => return Err(self.usage(1, Vec::new())),
        }
        Ok(None)
    }
}

fn exit_stdout(stdout: String, status: i32) -> Invocation {
    Invocation::Exit {
        stdout,
        stderr: String::new(),
        status,
    }
}

/// The C library's text for an I/O error (without Rust's " (os error N)" suffix).
fn strerror(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Parse a bhyve command line (`args[0]` is the program name) exactly as FreeBSD's bhyve does,
/// up to the point where it would open the VM.
pub fn parse_bhyve_args(args: &[String]) -> Result<Invocation, CliError> {
    let progname = progname(args);
    let mut p = Parser {
        config: default_config(),
        progname: &progname,
        restore: None,
        fwcfg: Vec::new(),
    };
    let mut opts = Getopt::new(args, OPTSTRING, &progname);
    for item in opts.by_ref() {
        match item {
            GetoptItem::Opt(letter, arg) => {
                if let Some(done) = p.option(letter, arg)? {
                    return Ok(done);
                }
            }
            GetoptItem::Illegal(_, msg) | GetoptItem::MissingArgument(_, msg) => {
                return Err(p.usage(1, vec![msg]));
            }
        }
    }
    let operands = &args[opts.optind()..];
    if operands.len() > 1 {
        return Err(p.usage(1, Vec::new()));
    }
    if let Some(name) = operands.first() {
        p.set("name", name)?;
    }
    // With -r the name may come from the snapshot, which the machine reads.
    if p.config.get("name").is_none() && p.restore.is_none() {
        return Err(p.usage(1, Vec::new()));
    }
    if p.get_bool("config.dump", Some(false))? {
        return Ok(exit_stdout(p.config.dump(), 1));
    }
    // The machine is described once here and again, from the same tree, when it is built.
    MachineDescription::from_config(&p.config).map_err(|e| {
        let status = match e {
            DescriptionError::MemorySize(_) => EX_USAGE,
            DescriptionError::Topology(_) | DescriptionError::Setting(_) => 4,
        };
        p.err(status, e.to_string())
    })?;
    Ok(Invocation::Run {
        config: p.config,
        restore: p.restore,
        fwcfg: p.fwcfg,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::description::{topology as cpu_topology, vcpu_cpusets};

    fn args(line: &[&str]) -> Vec<String> {
        std::iter::once("bhyve")
            .chain(line.iter().copied())
            .map(String::from)
            .collect()
    }

    fn run(line: &[&str]) -> Config {
        match parse_bhyve_args(&args(line)) {
            Ok(Invocation::Run { config, .. }) => config,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn fail(line: &[&str]) -> CliError {
        match parse_bhyve_args(&args(line)) {
            Err(e) => e,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn defaults_match_freebsd_amd64() {
        let c = run(&["vm"]);
        assert_eq!(c.get("acpi_tables"), Some("true"));
        assert_eq!(c.get("acpi_tables_in_memory"), Some("true"));
        assert_eq!(c.get("memory.size"), Some("256M"));
        assert_eq!(c.get("x86.strictmsr"), Some("true"));
        assert_eq!(c.get("lpc.fwcfg"), Some("bhyve"));
        assert_eq!(c.get("name"), Some("vm"));
    }

    #[test]
    fn flags_map_to_keys() {
        let c = run(&["-aCDeHPSuWwYI", "-A", "-K", "fr", "-U", "u-1", "vm"]);
        for (k, v) in [
            ("x86.x2apic", "false"),
            ("memory.guest_in_core", "true"),
            ("destroy_on_poweroff", "true"),
            ("x86.strictio", "true"),
            ("x86.vmexit_on_hlt", "true"),
            ("x86.vmexit_on_pause", "true"),
            ("memory.wired", "true"),
            ("rtc.use_localtime", "false"),
            ("virtio_msix", "false"),
            ("x86.strictmsr", "false"),
            ("x86.mptable", "false"),
            ("keyboard.layout", "fr"),
            ("uuid", "u-1"),
        ] {
            assert_eq!(c.get(k), Some(v), "{k}");
        }
        assert_eq!(run(&["-x", "vm"]).get("x86.x2apic"), Some("true"));
    }

    #[test]
    fn help_and_bad_option() {
        match parse_bhyve_args(&args(&["-h"])) {
            Ok(Invocation::Exit { stderr, status, .. }) => {
                assert_eq!(status, 0);
                assert!(stderr.contains("-u: RTC keeps UTC time"));
                assert!(!stderr.contains("-c vcpus"));
            }
            other => panic!("{other:?}"),
        }
        let e = fail(&["-Q", "vm"]);
        assert_eq!(e.status, 1);
        assert_eq!(e.lines[0], "bhyve: illegal option -- Q");
        assert_eq!(e.lines[1], "Usage: bhyve [-aCDeHhPSuWwxY]");
    }

    #[test]
    fn empty_argv_is_a_usage_error_not_a_panic() {
        assert_eq!(parse_bhyve_args(&[]).unwrap_err().status, 1);
    }

    #[test]
    fn operands() {
        assert_eq!(fail(&[]).status, 1);
        assert_eq!(fail(&["a", "b"]).status, 1);
        // Options after the operand are operands (POSIX), so this is two operands.
        assert_eq!(fail(&["vm", "-H"]).status, 1);
        assert_eq!(run(&["--", "-vm"]).get("name"), Some("-vm"));
    }

    #[test]
    fn memsize_errors_are_usage_errors() {
        let e = fail(&["-m", "12Q", "vm"]);
        assert_eq!(e.status, 64);
        assert_eq!(e.lines, vec!["bhyve: invalid memsize '12Q'"]);
        assert_eq!(
            run(&["-m", "2147483648", "vm"]).get("memory.size"),
            Some("2147483648")
        );
    }

    #[test]
    fn topology_forms_and_errors() {
        let t = |line: &[&str]| cpu_topology(&run(line)).unwrap();
        assert_eq!(t(&["-c", "4", "vm"]).sockets, 4);
        let x = t(&["-c", "sockets=2,cores=2", "vm"]);
        assert_eq!((x.cpus, x.sockets, x.cores, x.threads), (4, 2, 2, 1));
        let x = t(&["-c", "4,sockets=1,cores=2,threads=2", "vm"]);
        assert_eq!(x.cpus, 4);
        let x = t(&["-c", "", "vm"]);
        assert_eq!((x.cpus, x.sockets), (1, 1));
        let e = fail(&["-c", "cpus=3,sockets=2", "vm"]);
        assert_eq!(e.status, 4);
        assert_eq!(
            e.lines,
            vec!["bhyve: Topology (2 sockets, 1 cores, 1 threads) does not match 3 vCPUs"]
        );
        let e = fail(&["-c", "foo=1", "vm"]);
        assert_eq!(
            (e.status, e.lines[0].as_str()),
            (64, "bhyve: invalid cpu topology 'foo=1'")
        );
        let e = fail(&["-c", "0", "vm"]);
        assert_eq!(e.lines, vec!["bhyve: Invalid value for cpus: '0'"]);
        // strtol takes a sign, so FreeBSD's bhyve runs two vCPUs for `cpus=+2`.
        assert_eq!(t(&["-o", "cpus=+2", "vm"]).cpus, 2);
        let e = fail(&["-o", "cpus=-2", "vm"]);
        assert_eq!(e.lines, vec!["bhyve: Invalid value for cpus: '-2'"]);
    }

    #[test]
    fn pinning_appends_and_reads_first_pair_only() {
        let c = run(&["-c", "2", "-p", "0:1", "-p", "0:3", "-p 1:5 -p 1:6", "vm"]);
        assert_eq!(c.get("vcpu.0.cpuset"), Some("1,3"));
        assert_eq!(c.get("vcpu.1.cpuset"), Some("5"));
        assert_eq!(
            vcpu_cpusets(&c, 2).unwrap(),
            vec![Some(vec![1, 3]), Some(vec![5])]
        );
        let e = fail(&["-p", "x", "vm"]);
        assert_eq!(e.status, 64);
        assert_eq!(
            e.lines,
            vec![
                "invalid format: x",
                "bhyve: invalid vcpu pinning configuration 'x'"
            ]
        );
    }

    #[test]
    fn cpuset_ranges() {
        let mut c = Config::new();
        c.set("vcpu.0.cpuset", "0-3,8");
        assert_eq!(
            vcpu_cpusets(&c, 1).unwrap(),
            vec![Some(vec![0, 1, 2, 3, 8])]
        );
        c.set("vcpu.0.cpuset", "3-1");
        assert_eq!(
            vcpu_cpusets(&c, 1).unwrap_err(),
            "Invalid hostcpu range 3-1"
        );
    }

    #[test]
    fn config_option_order_and_errors() {
        let c = run(&[
            "-s",
            "4,virtio-blk,/d",
            "-o",
            "pci.0.4.0.ro=true",
            "-o",
            "board.version=0B98401 Pro",
            "vm",
        ]);
        assert_eq!(c.get("pci.0.4.0.ro"), Some("true"));
        assert_eq!(c.get("board.version"), Some("0B98401 Pro"));
        assert_eq!(run(&["-o", "a=b=c", "vm"]).get("a"), Some("b=c"));
        let e = fail(&["-o", "x=", "vm"]);
        assert_eq!(
            (e.status, e.lines[0].as_str()),
            (64, "bhyve: invalid configuration option 'x='")
        );
        assert_eq!(fail(&["-o", "noequals", "vm"]).status, 64);
        let e = fail(&["-o", "pci.0.4.0.device=x", "-s", "4,virtio-rnd", "vm"]);
        assert_eq!(e.lines, vec!["pci slot 0:4:0 already occupied!"]);
        assert_eq!(run(&["-o", "name=fromopt"]).get("name"), Some("fromopt"));
    }

    #[test]
    fn config_dump_prints_tree_and_exits_1() {
        match parse_bhyve_args(&args(&["-m", "1G", "-o", "config.dump=1", "vm"])) {
            Ok(Invocation::Exit { stdout, status, .. }) => {
                assert_eq!(status, 1);
                assert_eq!(
                    stdout,
                    "acpi_tables=true\nacpi_tables_in_memory=true\nmemory.size=1G\n\
                     x86.strictmsr=true\nlpc.fwcfg=bhyve\nconfig.dump=1\nname=vm\n"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn help_listings_accept_any_prefix_of_help() {
        for a in ["help", "he", ""] {
            match parse_bhyve_args(&args(&["-s", a])) {
                Ok(Invocation::Exit { stdout, status, .. }) => {
                    assert_eq!(status, 0);
                    // Only what this build implements, as FreeBSD lists what it has built in.
                    assert_eq!(
                        stdout,
                        "ahci\nahci-cd\nahci-hd\namd_hostbridge\ndummy\ne1000\nhostbridge\nlpc\nnvme\nvirtio-blk\n\
                         virtio-console\nvirtio-net\nvirtio-rnd\n"
                    );
                }
                other => panic!("{other:?}"),
            }
        }
        match parse_bhyve_args(&args(&["-l", "help"])) {
            Ok(Invocation::Exit { stdout, .. }) => {
                assert_eq!(stdout, "bootrom\ncom1\ncom2\ncom3\ncom4\ntpm\npc-testdev\n")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn gdb_forms() {
        let c = run(&["-G", "w1234", "vm"]);
        assert_eq!(
            (c.get("gdb.wait"), c.get("gdb.port")),
            (Some("true"), Some("1234"))
        );
        let c = run(&["-G", ":1234", "vm"]);
        assert_eq!(
            (c.get("gdb.address"), c.get("gdb.port")),
            (Some(""), Some("1234"))
        );
        let c = run(&["-G", "w[::1]:99", "vm"]);
        assert_eq!(c.get("gdb.address"), Some("[::1]"));
    }

    #[test]
    fn numa_domains() {
        let c = run(&["-n", "id=0,size=107,cpus=0-3", "vm"]);
        assert_eq!(c.get("domains.0.size"), Some("107"));
        assert_eq!(c.get("domains.0.cpus"), Some("0-3"));
        let e = fail(&["-n", "size=1", "vm"]);
        assert_eq!(e.status, 64);
        assert_eq!(e.lines[0], "Missing NUMA domain ID in 'size=1'");
        assert_eq!(
            fail(&["-o", "acpi_tables=false", "-n", "id=0", "vm"]).lines,
            vec!["bhyve: NUMA emulation requires ACPI"]
        );
    }

    #[test]
    fn config_file_rules() {
        let dir = std::env::temp_dir().join(format!("bhyve-cli-k-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.conf");
        std::fs::write(&good, "# comment\n\nname=fromfile\nmemory.size=1G\ncpus=2").unwrap();
        let p = good.to_string_lossy().into_owned();
        let c = run(&["-k", &p]);
        assert_eq!(c.get("name"), Some("fromfile"));
        assert_eq!(c.get("cpus"), Some("2"));
        let bad = dir.join("bad.conf");
        std::fs::write(&bad, "# c\nname=x\n bad line\n").unwrap();
        let b = bad.to_string_lossy().into_owned();
        let e = fail(&["-k", &b, "vm"]);
        assert_eq!(e.status, 4);
        assert_eq!(
            e.lines,
            vec![format!(
                "bhyve: {b} line 3: invalid config option ' bad line'"
            )]
        );
        let e = fail(&["-k", "/nonexistent/x.conf", "vm"]);
        assert_eq!(e.lines, vec!["bhyve: Failed to open configuration file /nonexistent/x.conf: No such file or directory"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
