//! The real `bhyvectl` against a running bhyve-rs on KVM: `--get-all` and `--get-stats` print
//! FreeBSD's lines (each checked against the printf format bhyvectl.c / bhyvectl_machdep.c
//! uses for it, written below as data) with the values the guest left in its registers;
//! `--set-*` writes are seen by the guest and read back; malformed control requests are
//! refused with a reason while the VM runs on; `--force-poweroff` ends bhyve with status 1.
//! Needs /dev/kvm (skips with a message without it, fails if BHYVE_RS_REQUIRE_KVM=1).

#[path = "common/mod.rs"]
mod common;

#[path = "../../bhyve-rs/tests/support/nvlist_mutations.rs"]
mod mutations;

use std::path::Path;
use std::time::Duration;

use bhyve::control::nvlist::{NvList, NvValue};
use bhyve::control::vmstate::{self, CMD_SET_REGISTERS, CMD_VM_STATE};
use common::control::{boot, ctl_output, Scratch};
use common::{kvm_usable, vm_name, Console, COMMAND_TIMEOUT};
use mutations::{mutate, seeds, Seed, SplitMix64};

/// FreeBSD's formats for the lines of `--get-all`, in the order it prints them
/// (`show_memseg`, `show_memmap`, `get_all_registers`, `get_all_segments`, the x2APIC state,
/// then the capabilities, CPU sets, statistics and topology of `main`). A `*` after a format
/// means "zero or more lines of this format".
const GET_ALL_FORMATS: &[&str] = &[
    "ID  Length      Name",
    "%-4d%-12s%s*",
    "Address     Length      Segment     Offset      Prot  Flags",
    "%-12lX%-12s%-12s%-12lX%c%c%c   %s*",
    "efer[%d]\t\t0x%016lx",
    "cr0[%d]\t\t0x%016lx",
    "cr2[%d]\t\t0x%016lx",
    "cr3[%d]\t\t0x%016lx",
    "cr4[%d]\t\t0x%016lx",
    "dr0[%d]\t\t0x%016lx",
    "dr1[%d]\t\t0x%016lx",
    "dr2[%d]\t\t0x%016lx",
    "dr3[%d]\t\t0x%016lx",
    "dr6[%d]\t\t0x%016lx",
    "dr7[%d]\t\t0x%016lx",
    "rsp[%d]\t\t0x%016lx",
    "rip[%d]\t\t0x%016lx",
    "rax[%d]\t\t0x%016lx",
    "rbx[%d]\t\t0x%016lx",
    "rcx[%d]\t\t0x%016lx",
    "rdx[%d]\t\t0x%016lx",
    "rsi[%d]\t\t0x%016lx",
    "rdi[%d]\t\t0x%016lx",
    "rbp[%d]\t\t0x%016lx",
    "r8[%d]\t\t0x%016lx",
    "r9[%d]\t\t0x%016lx",
    "r10[%d]\t\t0x%016lx",
    "r11[%d]\t\t0x%016lx",
    "r12[%d]\t\t0x%016lx",
    "r13[%d]\t\t0x%016lx",
    "r14[%d]\t\t0x%016lx",
    "r15[%d]\t\t0x%016lx",
    "rflags[%d]\t0x%016lx",
    "ds desc[%d]\t0x%016lx/0x%08x/0x%08x",
    "es desc[%d]\t0x%016lx/0x%08x/0x%08x",
    "fs desc[%d]\t0x%016lx/0x%08x/0x%08x",
    "gs desc[%d]\t0x%016lx/0x%08x/0x%08x",
    "ss desc[%d]\t0x%016lx/0x%08x/0x%08x",
    "cs desc[%d]\t0x%016lx/0x%08x/0x%08x",
    "tr desc[%d]\t0x%016lx/0x%08x/0x%08x",
    "ldtr desc[%d]\t0x%016lx/0x%08x/0x%08x",
    "gdtr[%d]\t\t0x%016lx/0x%08x",
    "idtr[%d]\t\t0x%016lx/0x%08x",
    "cs[%d]\t\t0x%04lx",
    "ds[%d]\t\t0x%04lx",
    "es[%d]\t\t0x%04lx",
    "fs[%d]\t\t0x%04lx",
    "gs[%d]\t\t0x%04lx",
    "ss[%d]\t\t0x%04lx",
    "tr[%d]\t\t0x%04lx",
    "ldtr[%d]\t\t0x%04lx",
    "x2apic_state[%d]\t%d",
    "Capability \"%s\" is %s on vcpu %d|Capability \"%s\" is not available*",
    "active cpus:\t %d",
    "suspended cpus:\t (none)",
    "vcpu%d stats:",
    "%-40s\t%ld*",
    "cpu_topology:\tsockets=%hu, cores=%hu, threads=%hu, maxcpus=%hu",
];

/// `line` against one printf `format` (the conversions bhyvectl uses: `%d %ld %hu %s %c %x %lX`
/// with the `-` and `0` flags and widths); the converted fields, or `None` when printf could not
/// have printed `line` from `format`.
fn scan(format: &str, line: &str) -> Option<Vec<String>> {
    let mut fields = Vec::new();
    scan_from(format.as_bytes(), line.as_bytes(), &mut fields).then_some(fields)
}

/// One conversion: flags, width, the conversion letter, and what follows it.
struct Conversion<'f> {
    left: bool,
    zero: bool,
    width: usize,
    letter: u8,
    rest: &'f [u8],
}

fn conversion(f: &[u8]) -> Option<Conversion<'_>> {
    let mut i = 0;
    let left = f.first() == Some(&b'-');
    if left {
        i += 1;
    }
    let zero = f.get(i) == Some(&b'0');
    let mut width = 0;
    while let Some(d) = f.get(i).filter(|b| b.is_ascii_digit()) {
        width = width * 10 + usize::from(d - b'0');
        i += 1;
    }
    while matches!(f.get(i), Some(b'l' | b'h')) {
        i += 1;
    }
    Some(Conversion {
        left,
        zero,
        width,
        letter: *f.get(i)?,
        rest: &f[i + 1..],
    })
}

/// Whether byte `b` can be part of a value printed by conversion `letter`.
fn allowed(letter: u8, b: u8) -> bool {
    match letter {
        b'd' => b.is_ascii_digit(),
        b'x' => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        b'X' => b.is_ascii_digit() || (b'A'..=b'F').contains(&b),
        _ => true,
    }
}

fn scan_from(f: &[u8], l: &[u8], fields: &mut Vec<String>) -> bool {
    let Some((&first, f_rest)) = f.split_first() else {
        return l.is_empty();
    };
    if first != b'%' {
        return l.first() == Some(&first) && scan_from(f_rest, &l[1..], fields);
    }
    let Some(c) = conversion(f_rest) else {
        return false;
    };
    // Every length the value could have: numbers longest first, strings (which may be
    // empty) shortest first so that padding is not taken for part of them.
    let run = l.iter().take_while(|&&b| allowed(c.letter, b)).count();
    let lengths: Vec<usize> = match c.letter {
        b'c' => vec![1].into_iter().filter(|&n| n <= l.len()).collect(),
        b's' => (0..=run).collect(),
        _ => (1..=run).rev().collect(),
    };
    for n in lengths {
        let consumed = if c.left { n.max(c.width) } else { n };
        if c.zero && n != c.width.max(1) && n < c.width {
            continue;
        }
        if consumed > l.len() || l[n..consumed].iter().any(|&b| b != b' ') {
            continue;
        }
        let mark = fields.len();
        fields.push(String::from_utf8_lossy(&l[..n]).into_owned());
        if scan_from(c.rest, &l[consumed..], fields) {
            return true;
        }
        fields.truncate(mark);
    }
    false
}

/// Match each line of `output` to [`GET_ALL_FORMATS`] in order; returns the fields of each
/// line with the format it matched.
fn parse_get_all(output: &str) -> Vec<(&'static str, Vec<String>)> {
    let mut lines = output.split('\n').peekable();
    let mut parsed = Vec::new();
    for entry in GET_ALL_FORMATS {
        let (alternatives, repeated) = match entry.strip_suffix('*') {
            Some(f) => (f, true),
            None => (*entry, false),
        };
        loop {
            let Some(line) = lines.peek() else {
                assert!(repeated, "output ends before {entry:?}:\n{output}");
                break;
            };
            let matched = alternatives
                .split('|')
                .find_map(|f| scan(f, line).map(|fields| (f, fields)));
            match matched {
                Some((format, fields)) => {
                    parsed.push((format, fields));
                    lines.next();
                    if !repeated {
                        break;
                    }
                }
                None if repeated => break,
                None => panic!("line {line:?} is not {entry:?}:\n{output}"),
            }
        }
    }
    let rest: Vec<&str> = lines.filter(|l| !l.is_empty()).collect();
    assert!(rest.is_empty(), "lines left over: {rest:?}\n{output}");
    parsed
}

fn hex(field: &str) -> u64 {
    u64::from_str_radix(field, 16).unwrap_or_else(|_| panic!("not hex: {field:?}"))
}

/// The value printed on the line of `format`'s first conversion after the vCPU number.
fn value(parsed: &[(&str, Vec<String>)], format: &str) -> Vec<String> {
    parsed
        .iter()
        .find(|(f, _)| *f == format)
        .map(|(_, fields)| fields.clone())
        .unwrap_or_else(|| panic!("no line of format {format:?}"))
}

fn run_ctl(rundir: &Path, name: &str, args: &[&str]) -> (i32, String, String) {
    ctl_output(rundir, name, args)
}

/// Start `regspin` and return the guest's loop bounds.
fn start_regspin(vm: &mut Console) -> (u64, u64) {
    vm.send_line("regspin");
    let text = vm.expect(" spinning", COMMAND_TIMEOUT);
    let bounds = text
        .rsplit("loop=")
        .next()
        .and_then(|rest| rest.split(' ').next())
        .expect("regspin line");
    let (start, end) = bounds.split_once('-').expect("loop bounds");
    (
        hex(start.trim_start_matches("0x")),
        hex(end.trim_start_matches("0x")),
    )
}

/// `--get-all` taken while the guest was in its loop (a timer interrupt may catch it in the
/// ring-0 handler now and then: then it is taken again).
fn get_all_in_loop(
    rundir: &Path,
    name: &str,
    bounds: (u64, u64),
) -> (String, Vec<(&'static str, Vec<String>)>) {
    for _ in 0..50 {
        let (status, stdout, stderr) = run_ctl(rundir, name, &["--get-all"]);
        assert_eq!(status, 0, "bhyvectl --get-all: {stderr}");
        assert_eq!(stderr, "");
        let parsed = parse_get_all(&stdout);
        let rip = hex(&value(&parsed, "rip[%d]\t\t0x%016lx")[1]);
        let cs = hex(&value(&parsed, "cs[%d]\t\t0x%04lx")[1]);
        if cs == 0x2b && (bounds.0..bounds.1).contains(&rip) {
            return (stdout, parsed);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the guest was never seen in its loop");
}

#[test]
fn get_all_prints_freebsds_lines_with_the_guests_registers() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("ctl");
    let name = vm_name();
    let mut vm = boot(&scratch.0, &name, "256M");
    let bounds = start_regspin(&mut vm);
    let (stdout, parsed) = get_all_in_loop(&scratch.0, &name, bounds);

    // Every line carries vCPU 0.
    for (format, fields) in &parsed {
        if format.contains("[%d]") {
            assert_eq!(fields[0], "0", "{format:?} {fields:?}");
        }
    }
    // The registers regspin loaded: number n holds 0x5eed_0000_0000_0000 | n << 8 | n.
    for (reg, n) in [
        ("rcx", 1u64),
        ("rdx", 2),
        ("rbx", 3),
        ("rbp", 5),
        ("rsi", 6),
        ("rdi", 7),
        ("r8", 8),
        ("r9", 9),
        ("r10", 10),
        ("r11", 11),
        ("r12", 12),
        ("r13", 13),
        ("r14", 14),
        ("r15", 15),
    ] {
        let format: &str = GET_ALL_FORMATS
            .iter()
            .find(|f| f.starts_with(&format!("{reg}[")))
            .unwrap();
        assert_eq!(
            hex(&value(&parsed, format)[1]),
            0x5eed_0000_0000_0000 | n << 8 | n,
            "{reg}"
        );
    }
    assert_eq!(
        hex(&value(&parsed, "rax[%d]\t\t0x%016lx")[1]),
        0x5eed_0000_0000_a0a0
    );
    // Long mode with paging, interrupts on, in ring 3 on the guest's user segments.
    let efer = hex(&value(&parsed, "efer[%d]\t\t0x%016lx")[1]);
    assert_eq!(efer & 0x500, 0x500, "EFER.LME|LMA: {efer:#x}");
    let cr0 = hex(&value(&parsed, "cr0[%d]\t\t0x%016lx")[1]);
    assert_eq!(cr0 & 0x8000_0001, 0x8000_0001, "CR0.PG|PE: {cr0:#x}");
    let cr4 = hex(&value(&parsed, "cr4[%d]\t\t0x%016lx")[1]);
    assert_ne!(cr4 & 0x20, 0, "CR4.PAE: {cr4:#x}");
    let rflags = hex(&value(&parsed, "rflags[%d]\t0x%016lx")[1]);
    assert_ne!(rflags & 0x200, 0, "RFLAGS.IF: {rflags:#x}");
    assert_eq!(hex(&value(&parsed, "ss[%d]\t\t0x%04lx")[1]), 0x23);
    let cs_access = hex(&value(&parsed, "cs desc[%d]\t0x%016lx/0x%08x/0x%08x")[3]);
    // Present, DPL 3, code, 64-bit (VMX access rights).
    assert_eq!(cs_access & 0x20f8, 0x20f8, "cs access {cs_access:#x}");
    let tr = value(&parsed, "tr desc[%d]\t0x%016lx/0x%08x/0x%08x");
    assert_eq!(hex(&tr[3]) & 0x8f, 0x8b, "a busy 64-bit TSS: {tr:?}");
    assert_eq!(hex(&value(&parsed, "tr[%d]\t\t0x%04lx")[1]), 0x30);
    let gdtr = value(&parsed, "gdtr[%d]\t\t0x%016lx/0x%08x");
    assert!(hex(&gdtr[2]) >= 0x37, "GDT limit covers the TSS: {gdtr:?}");
    let idtr = value(&parsed, "idtr[%d]\t\t0x%016lx/0x%08x");
    assert_eq!(hex(&idtr[2]), 0xfff, "256 16-byte gates: {idtr:?}");

    // Memory: 256 MiB of RAM at 0 in one segment.
    assert!(
        stdout.contains("ID  Length      Name\n0   256MB       sysmem\n"),
        "{stdout}"
    );
    let row = parsed
        .iter()
        .find(|(f, _)| f.starts_with("%-12lX"))
        .expect("a memory map row");
    assert_eq!(
        row.1[..7],
        ["0", "256MB", "sysmem", "0", "R", "W", "X"].map(String::from)
    );
    // One vCPU, active; statistics with the guest's resident memory.
    assert_eq!(
        value(
            &parsed,
            "cpu_topology:\tsockets=%hu, cores=%hu, threads=%hu, maxcpus=%hu"
        ),
        ["1", "1", "1", "1"].map(String::from)
    );
    assert_eq!(value(&parsed, "active cpus:\t %d"), ["0".to_string()]);
    let stats: Vec<&Vec<String>> = parsed
        .iter()
        .filter(|(f, _)| *f == "%-40s\t%ld")
        .map(|(_, fields)| fields)
        .collect();
    let resident = stats
        .iter()
        .find(|f| f[0] == "Resident memory")
        .map(|f| f[1].parse::<u64>().unwrap())
        .expect("Resident memory");
    assert!(resident > 1 << 20 && resident <= 256 << 20, "{resident}");
    assert!(stats.iter().any(|f| f[0] == "Wired memory" && f[1] == "0"));

    // A write the guest sees: RAX ends its loop, and it reports the stack pointer it spun
    // with, which --get-all showed.
    let rsp = hex(&value(&parsed, "rsp[%d]\t\t0x%016lx")[1]);
    let (status, _, stderr) = run_ctl(&scratch.0, &name, &["--set-rax=0x1234abcd"]);
    assert_eq!(status, 0, "{stderr}");
    vm.expect(
        &format!("regspin rax=0x000000001234abcd rsp={rsp:#018x}"),
        COMMAND_TIMEOUT,
    );
    vm.expect_prompt(COMMAND_TIMEOUT);
    assert!(vm.running());
}

#[test]
fn stats_set_get_round_trips_and_bad_requests() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("ctl-stats");
    let name = vm_name();
    let mut vm = boot(&scratch.0, &name, "128M");

    // --get-stats alone: the header and counters, nothing else.
    let stats = |ctl_args: &[&str]| {
        let (status, stdout, stderr) = run_ctl(&scratch.0, &name, ctl_args);
        assert_eq!(status, 0, "{stderr}");
        let mut lines = stdout.lines();
        assert_eq!(lines.next(), Some("vcpu0 stats:"), "{stdout}");
        lines
            .map(|l| {
                let fields = scan("%-40s\t%ld", l).unwrap_or_else(|| panic!("{l:?}"));
                (fields[0].clone(), fields[1].parse::<i64>().unwrap())
            })
            .collect::<Vec<_>>()
    };
    let before = stats(&["--get-stats"]);
    assert!(before.iter().any(|(d, v)| d == "Resident memory" && *v > 0));
    vm.command_line("counter");
    let after = stats(&["--get-stats"]);
    for (description, value) in &before {
        if let Some((_, later)) = after.iter().find(|(d, _)| d == description) {
            if description.contains("number") || description.contains("exits") {
                assert!(
                    later >= value,
                    "{description} went back: {value} -> {later}"
                );
            }
        }
    }
    if let Some((_, exits)) = after.iter().find(|(d, _)| d == "total number of vm exits") {
        assert!(*exits > 0);
    }

    // A debug register written, then read back, in FreeBSD's format.
    let (status, stdout, stderr) = run_ctl(
        &scratch.0,
        &name,
        &["--set-dr0=0xdead0000", "--get-dr0", "--get-dr7"],
    );
    assert_eq!(status, 0, "{stderr}");
    assert!(
        stdout.starts_with("dr0[0]\t\t0x00000000dead0000\ndr7[0]\t\t0x"),
        "{stdout:?}"
    );
    // Descriptor writes: GDTR base/limit through --desc-base/--desc-limit, read back.
    let (_, before, _) = run_ctl(&scratch.0, &name, &["--get-desc-gdtr"]);
    let fields = scan("gdtr[%d]\t\t0x%016lx/0x%08x", before.trim_end()).expect("gdtr line");
    let (status, stdout, stderr) = run_ctl(
        &scratch.0,
        &name,
        &[
            &format!("--desc-base=0x{}", fields[1]),
            &format!("--desc-limit=0x{}", fields[2]),
            "--set-desc-gdtr",
            "--get-desc-gdtr",
        ],
    );
    assert_eq!((status, stderr.as_str()), (0, ""));
    assert_eq!(stdout, before);

    // Refused with a reason; the VM runs on.
    let (status, stdout, stderr) = run_ctl(&scratch.0, &name, &["--cpu=3", "--get-rip"]);
    assert_eq!(status, 1);
    assert_eq!(stdout, "");
    assert_eq!(
        stderr.trim_end(),
        "bhyvectl: vcpu 3 does not exist (the VM has 1)"
    );
    let (status, _, stderr) = run_ctl(&scratch.0, &name, &["--get-vmcs-link"]);
    assert_ne!(status, 0);
    assert!(!stderr.is_empty());
    let socket = scratch.0.join(&name);
    let refused =
        |request: NvList| match bhyve::control::client::request(&scratch.0, &name, &request) {
            Err(bhyve::control::client::ClientError::Failed(why)) => why,
            other => panic!("{other:?}"),
        };
    let mut wrong_version = vmstate::request(CMD_VM_STATE, 0);
    wrong_version.take("version");
    wrong_version.add_number("version", 99).unwrap();
    assert!(refused(wrong_version).contains("version 99"));
    let mut no_vcpu = vmstate::request(CMD_VM_STATE, 0);
    no_vcpu.take("vcpu");
    assert!(refused(no_vcpu).contains("'vcpu'"));
    let mut unknown = vmstate::request(CMD_SET_REGISTERS, 0);
    unknown.add_number("rzz", 1).unwrap();
    assert_eq!(refused(unknown), "unknown register 'rzz'");
    let mut bad_type = vmstate::request(CMD_SET_REGISTERS, 0);
    bad_type.add("rip", NvValue::String(b"0".to_vec())).unwrap();
    assert!(refused(bad_type).contains("'rip'"));
    let mut bad_action = vmstate::request(vmstate::CMD_VM_ACTION, 0);
    bad_action.add_string("action", "explode").unwrap();
    assert_eq!(refused(bad_action), "unknown action 'explode'");
    assert!(socket.exists());
    vm.command_line("counter");

    // --force-poweroff: bhyve stops as on a guest power-off (status 1), the socket goes.
    let (status, _, stderr) = run_ctl(&scratch.0, &name, &["--force-poweroff"]);
    assert_eq!(status, 0, "{stderr}");
    let exit = vm.wait_exit(COMMAND_TIMEOUT);
    assert_eq!(exit.code(), Some(1), "{}", vm.stderr());
    assert!(!socket.exists());
    let (status, _, stderr) = run_ctl(&scratch.0, &name, &[]);
    assert_eq!(status, 1);
    assert!(stderr.contains("could not be opened"), "{stderr}");
}

#[test]
fn the_format_scanner_rejects_what_freebsd_would_not_print() {
    assert_eq!(
        scan("rip[%d]\t\t0x%016lx", "rip[0]\t\t0x00000000fffffff0"),
        Some(vec!["0".into(), "00000000fffffff0".into()])
    );
    assert!(scan("rip[%d]\t\t0x%016lx", "rip[0]\t0x00000000fffffff0").is_none());
    assert!(scan("rip[%d]\t\t0x%016lx", "rip[0]\t\t0xfffffff0").is_none());
    assert!(scan("rip[%d]\t\t0x%016lx", "rip[0]\t\t0x00000000FFFFFFF0").is_none());
    assert!(scan("cs[%d]\t\t0x%04lx", "cs[0]\t\t0x002b").is_some());
    assert_eq!(
        scan("%-40s\t%ld", &format!("{:<40}\t12", "Resident memory")),
        Some(vec!["Resident memory".into(), "12".into()])
    );
    assert!(scan("%-40s\t%ld", "Resident memory\t12").is_none());
    assert_eq!(
        scan("%-4d%-12s%s", "0   256MB       sysmem"),
        Some(vec!["0".into(), "256MB".into(), "sysmem".into()])
    );
}

#[test]
fn inject_nmi_reaches_the_guest() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("ctl-nmi");
    let name = vm_name();
    let mut vm = boot(&scratch.0, &name, "128M");
    let (status, stdout, stderr) = run_ctl(&scratch.0, &name, &["--inject-nmi"]);
    assert_eq!((status, stdout.as_str(), stderr.as_str()), (0, "", ""));
    // The guest takes no NMI on purpose: its handler reports vector 2 and stops.
    vm.expect("FAULT vector=2 ", COMMAND_TIMEOUT);
}

#[test]
fn mutated_inspection_requests_are_refused_and_the_vm_runs_on() {
    if !kvm_usable() {
        return;
    }
    let scratch = Scratch::new("ctl-fuzz");
    let name = vm_name();
    let mut vm = boot(&scratch.0, &name, "128M");
    let socket = scratch.0.join(&name);
    // The new requests as seeds: a state read, a write of nothing, an action no one has.
    let mut action = vmstate::request(vmstate::CMD_VM_ACTION, 0);
    action.add_string("action", "no_such_action").unwrap();
    let ours: Vec<Seed> = [
        ("vm_state", vmstate::request(CMD_VM_STATE, 0)),
        ("set_registers", vmstate::request(CMD_SET_REGISTERS, 0)),
        ("vm_action", action),
    ]
    .into_iter()
    .map(|(name, list)| Seed {
        name: name.into(),
        bytes: list.pack().0,
        nfds: 0,
    })
    .collect();
    let mut all = seeds();
    all.extend(ours.iter().map(|s| Seed {
        name: s.name.clone(),
        bytes: s.bytes.clone(),
        nfds: 0,
    }));
    let (mut errors, mut states, mut closed) = (0, 0, 0);
    for case in 0..300u64 {
        let mut rng = SplitMix64(case);
        let seed = &ours[rng.below(ours.len())];
        let mut bytes = seed.bytes.clone();
        for _ in 0..1 + rng.below(3) {
            mutate(&mut rng, &mut bytes, &all);
        }
        let reply = common::control::send_with_fds(&socket, &bytes, &[]).reply;
        if reply.is_empty() {
            closed += 1;
            continue;
        }
        let reply = NvList::unpack(&reply, Vec::new()).expect("a reply that decodes");
        match reply.get_string("error") {
            Some(error) => {
                assert!(!error.is_empty() && !error.contains('\n'), "{error:?}");
                errors += 1;
            }
            // A request the mutations left intact: a state read, or a write of nothing.
            None => states += 1,
        }
    }
    eprintln!("mutated requests: {errors} refused, {states} carried out, {closed} closed");
    assert!(errors > 100, "{errors} refused");
    assert!(vm.running(), "bhyve exited:\n{}", vm.stderr());
    vm.command_line("counter");
    let (status, stdout, stderr) = run_ctl(&scratch.0, &name, &["--get-cs"]);
    assert_eq!(status, 0, "{stderr}");
    assert!(
        scan("cs[%d]\t\t0x%04lx", stdout.trim_end()).is_some(),
        "{stdout}"
    );
}
