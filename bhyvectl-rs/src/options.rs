//! bhyvectl's option table (FreeBSD's MI table, then the amd64 table, then the Intel or AMD one)
//! and the parsed invocation.

use std::path::PathBuf;

use crate::getopt_long::{self, HasArg, Item, LongOpt};

/// Which vendor-specific options exist: FreeBSD registers only the host CPU vendor's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    Amd,
}

const fn req(name: &'static str) -> LongOpt {
    LongOpt {
        name,
        has_arg: HasArg::Required,
        id: name,
        extension: false,
    }
}

/// A value-taking option of this implementation that FreeBSD's bhyvectl does not have.
const fn ext_req(name: &'static str) -> LongOpt {
    LongOpt {
        extension: true,
        ..req(name)
    }
}

const fn flag(name: &'static str) -> LongOpt {
    LongOpt {
        name,
        has_arg: HasArg::No,
        id: name,
        extension: false,
    }
}

/// An option whose effect is shared with another name (same flag variable on FreeBSD).
const fn flag_as(name: &'static str, id: &'static str) -> LongOpt {
    LongOpt {
        name,
        has_arg: HasArg::No,
        id,
        extension: false,
    }
}

const MI_OPTS: &[LongOpt] = &[
    req("vm"),
    req("cpu"),
    req("set-mem"),
    req("capname"),
    req("setcap"),
    flag("getcap"),
    flag("get-stats"),
    flag("get-memmap"),
    flag("get-memseg"),
    flag("get-all"),
    flag("run"),
    flag("create"),
    flag("destroy"),
    flag("force-reset"),
    flag("force-poweroff"),
    flag("get-active-cpus"),
    flag("get-debug-cpus"),
    flag("get-suspended-cpus"),
    flag("get-cpu-topology"),
];

#[cfg(feature = "bhyve_snapshot")]
const SNAPSHOT_OPTS: &[LongOpt] = &[req("checkpoint"), req("suspend")];
#[cfg(not(feature = "bhyve_snapshot"))]
const SNAPSHOT_OPTS: &[LongOpt] = &[];

/// Options of this implementation that FreeBSD's bhyvectl does not have.
#[cfg(feature = "bhyve_snapshot")]
const EXTENSION_OPTS: &[LongOpt] = &[
    ext_req("rundir"),
    ext_req("inspect-snapshot"),
    ext_req("verify-snapshot"),
];
#[cfg(not(feature = "bhyve_snapshot"))]
const EXTENSION_OPTS: &[LongOpt] = &[ext_req("rundir")];

const MD_COMMON_OPTS: &[LongOpt] = &[
    req("set-efer"),
    req("set-cr0"),
    req("set-cr2"),
    req("set-cr3"),
    req("set-cr4"),
    req("set-dr0"),
    req("set-dr1"),
    req("set-dr2"),
    req("set-dr3"),
    req("set-dr6"),
    req("set-dr7"),
    req("set-rsp"),
    req("set-rip"),
    req("set-rax"),
    req("set-rflags"),
    req("desc-base"),
    req("desc-limit"),
    req("desc-access"),
    req("set-cs"),
    req("set-ds"),
    req("set-es"),
    req("set-fs"),
    req("set-gs"),
    req("set-ss"),
    req("set-tr"),
    req("set-ldtr"),
    req("set-x2apic-state"),
    req("unassign-pptdev"),
    req("get-gpa-pmap"),
    req("assert-lapic-lvt"),
    flag("get-rtc-time"),
    req("set-rtc-time"),
    req("rtc-nvram-offset"),
    flag("get-rtc-nvram"),
    req("set-rtc-nvram"),
    flag("get-desc-ds"),
    flag("set-desc-ds"),
    flag("get-desc-es"),
    flag("set-desc-es"),
    flag("get-desc-ss"),
    flag("set-desc-ss"),
    flag("get-desc-cs"),
    flag("set-desc-cs"),
    flag("get-desc-fs"),
    flag("set-desc-fs"),
    flag("get-desc-gs"),
    flag("set-desc-gs"),
    flag("get-desc-tr"),
    flag("set-desc-tr"),
    flag("set-desc-ldtr"),
    flag("get-desc-ldtr"),
    flag("set-desc-gdtr"),
    flag("get-desc-gdtr"),
    flag("set-desc-idtr"),
    flag("get-desc-idtr"),
    flag("get-efer"),
    flag("get-cr0"),
    flag("get-cr2"),
    flag("get-cr3"),
    flag("get-cr4"),
    flag("get-dr0"),
    flag("get-dr1"),
    flag("get-dr2"),
    flag("get-dr3"),
    flag("get-dr6"),
    flag("get-dr7"),
    flag("get-rsp"),
    flag("get-rip"),
    flag("get-rax"),
    flag("get-rbx"),
    flag("get-rcx"),
    flag("get-rdx"),
    flag("get-rsi"),
    flag("get-rdi"),
    flag("get-rbp"),
    flag("get-r8"),
    flag("get-r9"),
    flag("get-r10"),
    flag("get-r11"),
    flag("get-r12"),
    flag("get-r13"),
    flag("get-r14"),
    flag("get-r15"),
    flag("get-rflags"),
    flag("get-cs"),
    flag("get-ds"),
    flag("get-es"),
    flag("get-fs"),
    flag("get-gs"),
    flag("get-ss"),
    flag("get-tr"),
    flag("get-ldtr"),
    flag("get-eptp"),
    flag("get-exception-bitmap"),
    flag("get-io-bitmap-address"),
    flag("get-tsc-offset"),
    flag("get-msr-bitmap"),
    flag("get-msr-bitmap-address"),
    flag("get-guest-pat"),
    flag("get-guest-sysenter"),
    flag("get-exit-reason"),
    flag("get-x2apic-state"),
    flag("inject-nmi"),
    flag("get-intinfo"),
];

const INTEL_OPTS: &[LongOpt] = &[
    flag("get-vmcs-pinbased-ctls"),
    flag("get-vmcs-procbased-ctls"),
    flag("get-vmcs-procbased-ctls2"),
    flag("get-vmcs-guest-linear-address"),
    flag("get-vmcs-guest-physical-address"),
    flag("get-vmcs-entry-interruption-info"),
    flag("get-vmcs-cr0-mask"),
    flag("get-vmcs-cr0-shadow"),
    flag("get-vmcs-cr4-mask"),
    flag("get-vmcs-cr4-shadow"),
    flag("get-vmcs-cr3-targets"),
    flag("get-vmcs-tpr-threshold"),
    flag_as("get-vmcs-vpid", "vpid-asid"),
    flag("get-vmcs-exit-ctls"),
    flag("get-vmcs-entry-ctls"),
    flag("get-vmcs-instruction-error"),
    flag("get-vmcs-host-pat"),
    flag("get-vmcs-host-cr0"),
    flag("get-vmcs-exit-qualification"),
    flag("get-vmcs-exit-inst-length"),
    flag("get-vmcs-interruptibility"),
    flag("get-vmcs-exit-interruption-error"),
    flag("get-vmcs-exit-interruption-info"),
    flag("get-vmcs-link"),
    flag("get-vmcs-host-cr3"),
    flag("get-vmcs-host-cr4"),
    flag("get-vmcs-host-rip"),
    flag("get-vmcs-host-rsp"),
    flag_as("get-apic-access-address", "apic-access-address"),
    flag_as("get-virtual-apic-address", "virtual-apic-address"),
];

const AMD_OPTS: &[LongOpt] = &[
    flag("get-vmcb-intercepts"),
    flag_as("get-vmcb-asid", "vpid-asid"),
    flag("get-vmcb-exit-details"),
    flag("get-vmcb-tlb-ctrl"),
    flag("get-vmcb-virq"),
    flag_as("get-avic-apic-bar", "apic-access-address"),
    flag_as("get-avic-backing-page", "virtual-apic-address"),
    flag("get-avic-table"),
];

/// Options that only qualify other options; alone they ask for nothing.
#[cfg(test)]
const PARAMETER_OPTS: &[&str] = &[
    "vm",
    "cpu",
    "capname",
    "desc-base",
    "desc-limit",
    "desc-access",
    "rtc-nvram-offset",
    "rundir",
];

/// The full option table in FreeBSD's order (MI, snapshot, extensions, amd64, vendor).
pub fn option_table(vendor: Vendor) -> Vec<LongOpt> {
    let vendor_opts = match vendor {
        Vendor::Intel => INTEL_OPTS,
        Vendor::Amd => AMD_OPTS,
    };
    [
        MI_OPTS,
        SNAPSHOT_OPTS,
        EXTENSION_OPTS,
        MD_COMMON_OPTS,
        vendor_opts,
    ]
    .concat()
}

/// The `<…>` text after a value-taking option in the usage text.
fn value_description(name: &str) -> &'static str {
    match name {
        "cpu" => "vcpu_number",
        "set-mem" => "memory in units of MB",
        "setcap" => "0|1",
        "capname" => "capname",
        "checkpoint" | "suspend" | "inspect-snapshot" | "verify-snapshot" => "filename",
        "rundir" => "directory",
        "desc-base" => "BASE",
        "desc-limit" => "LIMIT",
        "desc-access" => "ACCESS",
        "set-x2apic-state" => "state",
        "unassign-pptdev" => "bus/slot.func",
        "get-gpa-pmap" => "gpa",
        "assert-lapic-lvt" => "pin",
        "set-rtc-time" => "secs",
        "set-rtc-nvram" => "val",
        "rtc-nvram-offset" => "offset",
        _ => match name.strip_prefix("set-") {
            // Register names in capitals: set-cr0 → CR0, set-rflags → RFLAGS.
            Some(reg) => register_description(reg),
            None => "???",
        },
    }
}

fn register_description(reg: &str) -> &'static str {
    const REGS: &[(&str, &str)] = &[
        ("efer", "EFER"),
        ("cr0", "CR0"),
        ("cr2", "CR2"),
        ("cr3", "CR3"),
        ("cr4", "CR4"),
        ("dr0", "DR0"),
        ("dr1", "DR1"),
        ("dr2", "DR2"),
        ("dr3", "DR3"),
        ("dr6", "DR6"),
        ("dr7", "DR7"),
        ("rsp", "RSP"),
        ("rip", "RIP"),
        ("rax", "RAX"),
        ("rflags", "RFLAGS"),
        ("cs", "CS"),
        ("ds", "DS"),
        ("es", "ES"),
        ("fs", "FS"),
        ("gs", "GS"),
        ("ss", "SS"),
        ("tr", "TR"),
        ("ldtr", "LDTR"),
    ];
    REGS.iter()
        .find(|(r, _)| *r == reg)
        .map_or("???", |(_, d)| d)
}

/// FreeBSD's generated usage text.
pub fn usage_text(progname: &str, table: &[LongOpt]) -> String {
    let mut s = format!("Usage: {progname} --vm=<vmname>\n");
    for o in table.iter().filter(|o| o.name != "vm") {
        match o.has_arg {
            HasArg::Required => {
                s.push_str(&format!(
                    "       [--{}=<{}>]\n",
                    o.name,
                    value_description(o.name)
                ));
            }
            HasArg::No => s.push_str(&format!("       [--{}]\n", o.name)),
        }
    }
    s
}

/// A snapshot request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub file: PathBuf,
    /// `--suspend`: bhyve exits once the snapshot is written.
    pub suspend: bool,
}

/// A parsed bhyvectl command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Args {
    pub vm: Option<String>,
    /// `--cpu` (atoi), default 0.
    pub cpu: i32,
    /// `--set-mem` in bytes: MiB (atoi) rounded up to 2 MiB; 0 means not requested.
    pub set_mem: u64,
    pub capname: Option<String>,
    /// `--setcap` value (strtoul).
    pub setcap: Option<u64>,
    /// Every other option, in command-line order, with its value if it takes one.
    pub options: Vec<(&'static str, Option<String>)>,
    /// Snapshot request (feature `bhyve_snapshot`).
    pub checkpoint: Option<Checkpoint>,
    /// Control socket directory (extension).
    pub rundir: Option<PathBuf>,
    /// Describe a snapshot file and exit (extension, feature `bhyve_snapshot`).
    pub inspect_snapshot: Option<PathBuf>,
    /// Check every checksum of a snapshot file and exit (extension, feature `bhyve_snapshot`).
    pub verify_snapshot: Option<PathBuf>,
    /// Operands; bhyvectl ignores them.
    pub operands: Vec<String>,
}

impl Args {
    /// The first option that asks for an action on the VM other than a snapshot (what the
    /// tests check parsing by; `target::Plan` decides what is carried out).
    #[cfg(test)]
    pub fn first_vm_action(&self) -> Option<&'static str> {
        if self.set_mem != 0 {
            return Some("set-mem");
        }
        if self.setcap.is_some() {
            return Some("setcap");
        }
        self.options
            .iter()
            .map(|(name, _)| *name)
            .find(|name| !PARAMETER_OPTS.contains(name))
    }
}

/// A refused command line: diagnostic lines (usage text included) for stderr, exit status 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError {
    pub text: String,
}

/// `strtoul(s, NULL, 0)`: leading blanks, optional sign, base prefix; garbage ends the number.
pub fn strtoul_lenient(s: &str) -> u64 {
    bhyve::config::cnum::strtoul(s).map_or(0, |(value, _)| value)
}

/// Parse bhyvectl's arguments (`args[0]` is the program name) as FreeBSD does.
pub fn parse_args(
    args: &[String],
    table: &[LongOpt],
    progname: &str,
    posixly_correct: bool,
) -> Result<Args, UsageError> {
    let usage = |first: Option<String>| {
        let mut text = first.map(|l| format!("{l}\n")).unwrap_or_default();
        text.push_str(&usage_text(progname, table));
        UsageError { text }
    };
    let mut a = Args::default();
    for item in getopt_long::parse(args, table, progname, posixly_correct) {
        let (opt, value) = match item {
            Item::Error(msg) => return Err(usage(Some(msg))),
            Item::Operand(word) => {
                a.operands.push(word.to_string());
                continue;
            }
            Item::Opt(opt, value) => (opt, value.unwrap_or("")),
        };
        match opt.name {
            "vm" => a.vm = Some(value.to_string()),
            "cpu" => a.cpu = bhyve::config::cnum::atoi(value),
            "set-mem" => {
                const MB: u64 = 1 << 20;
                let mib = i64::from(bhyve::config::cnum::atoi(value));
                // atoi(…) * MB is computed in unsigned long arithmetic on FreeBSD.
                let bytes = (mib as u64).wrapping_mul(MB);
                a.set_mem = bytes.wrapping_add(2 * MB - 1) & !(2 * MB - 1);
            }
            "setcap" => a.setcap = Some(strtoul_lenient(value)),
            "capname" => a.capname = Some(value.to_string()),
            "checkpoint" | "suspend" => {
                if a.checkpoint.is_some() {
                    return Err(usage(None));
                }
                a.checkpoint = Some(Checkpoint {
                    file: PathBuf::from(value),
                    suspend: opt.name == "suspend",
                });
            }
            "rundir" => a.rundir = Some(PathBuf::from(value)),
            "inspect-snapshot" => a.inspect_snapshot = Some(PathBuf::from(value)),
            "verify-snapshot" => a.verify_snapshot = Some(PathBuf::from(value)),
            "unassign-pptdev" => {
                if bhyve::config::cnum::scan_ints(value, "%d/%d/%d").len() != 3 {
                    return Err(usage(None));
                }
                a.options.push((opt.name, Some(value.to_string())));
            }
            name => a.options.push((
                name,
                (opt.has_arg == HasArg::Required).then(|| value.to_string()),
            )),
        }
    }
    if a.vm.is_none() && a.inspect_snapshot.is_none() && a.verify_snapshot.is_none() {
        return Err(usage(None));
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(words: &[&str]) -> Result<Args, UsageError> {
        let args: Vec<String> = std::iter::once("bhyvectl")
            .chain(words.iter().copied())
            .map(String::from)
            .collect();
        parse_args(&args, &option_table(Vendor::Intel), "bhyvectl", false)
    }

    #[test]
    fn no_arguments_is_usage() {
        let e = parse(&[]).unwrap_err();
        assert!(e
            .text
            .starts_with("Usage: bhyvectl --vm=<vmname>\n       [--cpu=<vcpu_number>]\n"));
        assert!(e
            .text
            .contains("       [--set-mem=<memory in units of MB>]\n"));
        assert!(e.text.contains("       [--set-cr0=<CR0>]\n"));
        assert!(e
            .text
            .contains("       [--unassign-pptdev=<bus/slot.func>]\n"));
        assert!(e.text.contains("       [--get-vmcs-link]\n"));
        assert!(!e.text.contains("--vm=<vmname>]"));
    }

    #[cfg(feature = "bhyve_snapshot")]
    #[test]
    fn snapshot_options_in_usage_and_parsed() {
        let e = parse(&[]).unwrap_err();
        assert!(e.text.contains("       [--suspend=<filename>]\n"));
        let a = parse(&["--checkpoint", "f.ckp", "--vm=x"]).unwrap();
        assert_eq!(
            a.checkpoint,
            Some(Checkpoint {
                file: "f.ckp".into(),
                suspend: false
            })
        );
        let a = parse(&["--vm=x", "--susp=/vm/x.save"]).unwrap();
        assert_eq!(
            a.checkpoint,
            Some(Checkpoint {
                file: "/vm/x.save".into(),
                suspend: true
            })
        );
        assert!(parse(&["--vm=x", "--checkpoint=a", "--suspend=b"]).is_err());
        assert!(parse(&["--inspect-snapshot=/x"]).is_ok());
    }

    #[cfg(not(feature = "bhyve_snapshot"))]
    #[test]
    fn snapshot_options_absent_without_feature() {
        let e = parse(&["--vm=x", "--checkpoint=a"]).unwrap_err();
        assert!(e
            .text
            .starts_with("bhyvectl: unrecognized option `--checkpoint=a'\n"));
        assert!(!e.text.contains("--suspend"));
    }

    #[test]
    fn freebsd_prefixes_ignore_extension_options() {
        // FreeBSD reads --ru as --run and --in as --inject-nmi; the extensions --rundir and
        // --inspect-snapshot must not make them ambiguous.
        let a = parse(&["--vm=x", "--ru"]).unwrap();
        assert_eq!(a.options, vec![("run", None)]);
        let a = parse(&["--vm=x", "--in"]).unwrap();
        assert_eq!(a.options, vec![("inject-nmi", None)]);
        // "--run=1" is FreeBSD's --run with a value, not a prefix of --rundir.
        let e = parse(&["--vm=x", "--run=1"]).unwrap_err();
        assert!(e
            .text
            .starts_with("bhyvectl: option `--run' doesn't allow an argument\n"));
        // Names FreeBSD does not know still reach the extensions, whole or abbreviated.
        let a = parse(&["--vm=x", "--rundir=/r"]).unwrap();
        assert_eq!(a.rundir, Some(PathBuf::from("/r")));
        let a = parse(&["--vm=x", "--rund", "/s"]).unwrap();
        assert_eq!(a.rundir, Some(PathBuf::from("/s")));
        // A prefix FreeBSD finds ambiguous stays ambiguous.
        let e = parse(&["--vm=x", "--get-c"]).unwrap_err();
        assert!(e
            .text
            .starts_with("bhyvectl: option `--get-c' is ambiguous\n"));
    }

    #[cfg(feature = "bhyve_snapshot")]
    #[test]
    fn inspect_snapshot_prefix_after_freebsd_options() {
        let a = parse(&["--inspect-s=/snap"]).unwrap();
        assert_eq!(a.inspect_snapshot, Some(PathBuf::from("/snap")));
        let a = parse(&["--vm=x", "--in"]).unwrap();
        assert_eq!(a.options, vec![("inject-nmi", None)]);
    }

    #[cfg(feature = "bhyve_snapshot")]
    #[test]
    fn verify_snapshot_needs_no_vm_and_abbreviates() {
        let a = parse(&["--verify-snapshot=/snap"]).unwrap();
        assert_eq!(a.verify_snapshot, Some(PathBuf::from("/snap")));
        let a = parse(&["--verify", "/snap"]).unwrap();
        assert_eq!(a.verify_snapshot, Some(PathBuf::from("/snap")));
        // FreeBSD's --vm keeps its prefix.
        assert_eq!(parse(&["--v=x"]).unwrap().vm.as_deref(), Some("x"));
    }

    #[test]
    fn values_follow_freebsd_conversions() {
        let a = parse(&[
            "--vm=v",
            "--cpu=2x",
            "--set-mem=3",
            "--setcap=0x1",
            "--capname=hlt_exit",
        ])
        .unwrap();
        assert_eq!(a.cpu, 2);
        assert_eq!(a.set_mem, 4 << 20);
        assert_eq!(a.setcap, Some(1));
        assert_eq!(a.first_vm_action(), Some("set-mem"));
        let a = parse(&["--destroy", "--vm", "v"]).unwrap();
        assert_eq!(a.first_vm_action(), Some("destroy"));
        let a = parse(&["--vm=v", "--cpu=1", "junk"]).unwrap();
        assert_eq!(a.first_vm_action(), None);
        assert_eq!(a.operands, vec!["junk"]);
        assert!(parse(&["--vm=v", "--unassign-pptdev=1/2"]).is_err());
    }

    /// Every bhyvectl command line the management tools in clients.md send.
    #[test]
    fn client_command_lines_parse() {
        for (line, action) in [
            ("--destroy --vm=fbsd", Some("destroy")),
            ("--vm=fbsd --destroy", Some("destroy")),
            ("--force-reset --vm=x", Some("force-reset")),
            ("--force-poweroff --vm=chy-w", Some("force-poweroff")),
            ("--get-stats --vm=x", Some("get-stats")),
            ("--vm=x --get-rtc-time", Some("get-rtc-time")),
            ("--vm=1_gitlab", None),
        ] {
            let words: Vec<&str> = line.split(' ').collect();
            let a = parse(&words).unwrap_or_else(|e| panic!("{line}: {}", e.text));
            assert_eq!(a.first_vm_action(), action, "{line}");
        }
        let e = parse(&["--migrate=10.0.0.1,9000", "--vm=x"]).unwrap_err();
        assert!(e
            .text
            .starts_with("bhyvectl: unrecognized option `--migrate=10.0.0.1,9000'\n"));
    }

    #[cfg(feature = "bhyve_snapshot")]
    #[test]
    fn client_snapshot_lines_parse() {
        let a = parse(&["--suspend=/usr/jails/vm/x/checkpoints/x.ckp", "--vm=x"]).unwrap();
        assert!(a.checkpoint.as_ref().is_some_and(|c| c.suspend));
        let a = parse(&["--checkpoint", "/vm/x.ckp", "--vm=x"]).unwrap();
        assert_eq!(a.checkpoint.as_ref().map(|c| c.suspend), Some(false));
        assert_eq!(a.first_vm_action(), None);
        let a = parse(&["--vm=deb", "--suspend=/vm/deb/deb.save"]).unwrap();
        assert_eq!(a.vm.as_deref(), Some("deb"));
    }

    #[test]
    fn vendor_tables_differ() {
        let intel = option_table(Vendor::Intel);
        let amd = option_table(Vendor::Amd);
        assert!(intel.iter().any(|o| o.name == "get-vmcs-link"));
        assert!(!amd.iter().any(|o| o.name == "get-vmcs-link"));
        assert!(amd.iter().any(|o| o.name == "get-avic-table"));
        let args: Vec<String> = ["bhyvectl", "--vm=v", "--get-vmcb-asid"]
            .map(String::from)
            .to_vec();
        assert!(parse_args(&args, &intel, "bhyvectl", false).is_err());
        assert!(parse_args(&args, &amd, "bhyvectl", false).is_ok());
    }

    #[test]
    fn random_command_lines_never_panic() {
        let table = option_table(Vendor::Amd);
        let names: Vec<String> = table.iter().map(|o| o.name.to_string()).collect();
        let mut state: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        for _ in 0..20_000 {
            let mut args = vec!["bhyvectl".to_string()];
            for _ in 0..next(6) {
                let name = &names[next(names.len())];
                let cut = &name[..1 + next(name.len())];
                let word = match next(6) {
                    0 => format!("--{cut}"),
                    1 => format!("--{name}={}", ["", "x", "0x10", "1/2/3", "é"][next(5)]),
                    2 => ["--", "-", "-x", "vm", "", "--=", "---"][next(7)].to_string(),
                    _ => format!("--{name}"),
                };
                args.push(word);
            }
            let result = {
                let posix = next(2) == 0;
                std::panic::catch_unwind(|| parse_args(&args, &table, "bhyvectl", posix))
            };
            assert!(result.is_ok(), "panicked on {args:?}");
        }
    }

    #[test]
    fn strtoul_lenient_matches_c() {
        assert_eq!(strtoul_lenient("0x10"), 16);
        assert_eq!(strtoul_lenient("010"), 8);
        assert_eq!(strtoul_lenient("12abc"), 12);
        assert_eq!(strtoul_lenient("zz"), 0);
        assert_eq!(strtoul_lenient("-1"), u64::MAX);
    }
}
