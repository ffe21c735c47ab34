//! bhyvectl's `--get-*` output, byte for byte as FreeBSD's `bhyvectl.c` and
//! `amd64/bhyvectl_machdep.c` print it, from a [`VmState`] whatever produced it (a bhyve-rs
//! control socket on Linux, `/dev/vmm` ioctls on FreeBSD).

use std::collections::HashSet;
use std::fmt::Write;

use bhyve::control::vmstate::{VmState, REGISTERS, SEGMENTS};

/// Which `--get-*` options were given (`all` for `--get-all`), and `--capname`.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub all: bool,
    pub options: HashSet<&'static str>,
    pub capname: Option<String>,
}

impl Selection {
    fn wants(&self, option: &str) -> bool {
        self.all || self.options.contains(option)
    }
}

/// Every option this module prints, for [`Selection`] and for telling what a platform
/// supports.
pub const GET_OPTIONS: &[&str] = &[
    "get-memseg",
    "get-memmap",
    "get-efer",
    "get-cr0",
    "get-cr2",
    "get-cr3",
    "get-cr4",
    "get-dr0",
    "get-dr1",
    "get-dr2",
    "get-dr3",
    "get-dr6",
    "get-dr7",
    "get-rsp",
    "get-rip",
    "get-rax",
    "get-rbx",
    "get-rcx",
    "get-rdx",
    "get-rsi",
    "get-rdi",
    "get-rbp",
    "get-r8",
    "get-r9",
    "get-r10",
    "get-r11",
    "get-r12",
    "get-r13",
    "get-r14",
    "get-r15",
    "get-rflags",
    "get-desc-ds",
    "get-desc-es",
    "get-desc-fs",
    "get-desc-gs",
    "get-desc-ss",
    "get-desc-cs",
    "get-desc-tr",
    "get-desc-ldtr",
    "get-desc-gdtr",
    "get-desc-idtr",
    "get-cs",
    "get-ds",
    "get-es",
    "get-fs",
    "get-gs",
    "get-ss",
    "get-tr",
    "get-ldtr",
    "get-x2apic-state",
    "get-intinfo",
    "getcap",
    "get-active-cpus",
    "get-debug-cpus",
    "get-suspended-cpus",
    "get-stats",
    "get-cpu-topology",
];

/// FreeBSD's `humanize_number(buf, 8, n, "B", HN_AUTOSCALE, HN_NOSPACE)`: divide by 1024 until
/// the number fits five digits, round the last division to nearest, add K/M/G/T/P/E and "B".
pub fn humanize(n: u64) -> String {
    const PREFIXES: [&str; 7] = ["", "K", "M", "G", "T", "P", "E"];
    // An 8-byte buffer less the digit/NUL base and the one-letter suffix: five columns.
    const MAX: u64 = 100_000;
    let (mut quotient, mut remainder, mut scale) = (n, 0, 0);
    while (quotient >= MAX || (quotient == MAX - 1 && remainder >= 512)) && scale < 6 {
        remainder = quotient % 1024;
        quotient /= 1024;
        scale += 1;
    }
    let value = quotient + (remainder + 512) / 1024;
    format!("{value}{}B", PREFIXES[scale])
}

/// `--get-memseg` (`show_memseg`).
fn memsegs(state: &VmState, out: &mut String) {
    out.push_str("ID  Length      Name\n");
    for seg in state.memory_segments.iter().filter(|s| s.len != 0) {
        let name = if seg.name.is_empty() {
            "sysmem"
        } else {
            &seg.name
        };
        let _ = writeln!(out, "{:<4}{:<12}{name}", seg.id, humanize(seg.len));
    }
}

/// `--get-memmap` (`show_memmap`).
fn memmap(state: &VmState, out: &mut String) {
    out.push_str("Address     Length      Segment     Offset      Prot  Flags\n");
    for m in &state.memory_map {
        let name = state
            .memory_segments
            .iter()
            .find(|s| s.id == m.segment)
            .map_or("", |s| s.name.as_str());
        let name = if name.is_empty() { "sysmem" } else { name };
        let prot = |bit: u32, c: char| if m.prot & bit != 0 { c } else { '-' };
        let _ = write!(
            out,
            "{:<12X}{:<12}{:<12}{:<12X}{}{}{}   ",
            m.gpa,
            humanize(m.len),
            name,
            m.offset,
            prot(1, 'R'),
            prot(2, 'W'),
            prot(4, 'X')
        );
        // FreeBSD starts the list with a NUL delimiter, which printf writes as a byte.
        let mut delim = '\0';
        for (bit, word) in [(1, "wired"), (2, "iommu")] {
            if m.flags & bit != 0 {
                let _ = write!(out, "{delim}{word}");
                delim = '/';
            }
        }
        out.push('\n');
    }
}

/// `get_all_registers`, `get_all_segments`, x2APIC state and intinfo of `bhyvectl_md_main`.
fn registers(state: &VmState, sel: &Selection, out: &mut String) {
    let cpu = state.vcpu;
    if let Some(regs) = &state.registers {
        for (name, value) in REGISTERS.iter().zip(regs.values) {
            if sel.wants(&format!("get-{name}")) {
                // rflags is one tab short, as in FreeBSD.
                let tabs = if *name == "rflags" { "\t" } else { "\t\t" };
                let _ = writeln!(out, "{name}[{cpu}]{tabs}0x{value:016x}");
            }
        }
        for (name, (_, d)) in SEGMENTS.iter().zip(regs.segments) {
            if sel.wants(&format!("get-desc-{name}")) {
                let _ = writeln!(
                    out,
                    "{name} desc[{cpu}]\t0x{:016x}/0x{:08x}/0x{:08x}",
                    d.base, d.limit, d.access
                );
            }
        }
        for (name, d) in [("gdtr", regs.gdtr), ("idtr", regs.idtr)] {
            if sel.wants(&format!("get-desc-{name}")) {
                let _ = writeln!(out, "{name}[{cpu}]\t\t0x{:016x}/0x{:08x}", d.base, d.limit);
            }
        }
        for name in ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldtr"] {
            if let (true, Some((selector, _))) =
                (sel.wants(&format!("get-{name}")), regs.segment(name))
            {
                let _ = writeln!(out, "{name}[{cpu}]\t\t0x{selector:04x}");
            }
        }
    }
    if let (true, Some(x2apic)) = (sel.wants("get-x2apic-state"), state.x2apic_state) {
        let _ = writeln!(out, "x2apic_state[{cpu}]\t{x2apic}");
    }
    if let (true, Some((pending, current))) = (sel.wants("get-intinfo"), state.intinfo) {
        intinfo("pending", pending, out);
        intinfo("current", current, out);
    }
}

/// `print_intinfo`.
fn intinfo(banner: &str, info: u64, out: &mut String) {
    const VALID: u64 = 1 << 31;
    const DEL_ERRCODE: u64 = 1 << 11;
    let _ = write!(out, "{banner}:\t");
    if info & VALID != 0 {
        let kind = match info & (7 << 8) {
            0 => "extint",
            0x200 => "nmi",
            0x400 => "swint",
            _ => "exception",
        };
        let _ = write!(out, "{kind} vector {}", info & 0xff);
        if info & DEL_ERRCODE != 0 {
            let _ = write!(out, " errcode {:#x}", info >> 32);
        }
    } else {
        out.push_str("n/a");
    }
    out.push('\n');
}

/// `print_cpus`.
fn cpus(banner: &str, set: &[u32], out: &mut String) {
    let _ = write!(out, "{banner}:\t");
    if set.is_empty() {
        out.push_str(" (none)");
    }
    for (i, cpu) in set.iter().enumerate() {
        let _ = write!(out, "{}{cpu}", if i == 0 { " " } else { ", " });
    }
    out.push('\n');
}

/// The VM-wide part of FreeBSD's `main` after the machine-dependent one: capabilities, CPU
/// sets, statistics, topology.
fn vm_wide(state: &VmState, sel: &Selection, out: &mut String) {
    let cpu = state.vcpu;
    if sel.wants("getcap") {
        // Only `--getcap` honours `--capname`, and a name libvmmapi does not know shows all.
        let only = sel
            .options
            .contains("getcap")
            .then_some(sel.capname.as_deref())
            .flatten()
            .filter(|name| state.capabilities.iter().any(|(n, _)| n == name));
        for (name, value) in &state.capabilities {
            if only.is_some_and(|only| only != name) {
                continue;
            }
            match value {
                Some(set) => {
                    let set = if *set { "set" } else { "not set" };
                    let _ = writeln!(out, "Capability \"{name}\" is {set} on vcpu {cpu}");
                }
                None => {
                    let _ = writeln!(out, "Capability \"{name}\" is not available");
                }
            }
        }
    }
    if sel.wants("get-active-cpus") {
        cpus("active cpus", &state.active_cpus, out);
    }
    if let (true, Some(debug)) = (sel.wants("get-debug-cpus"), &state.debug_cpus) {
        cpus("debug cpus", debug, out);
    }
    if sel.wants("get-suspended-cpus") {
        cpus("suspended cpus", &state.suspended_cpus, out);
    }
    if sel.wants("get-stats") {
        let _ = writeln!(out, "vcpu{cpu} stats:");
        for (description, value) in &state.statistics {
            // %ld of a uint64_t.
            let _ = writeln!(out, "{description:<40}\t{}", *value as i64);
        }
    }
    if sel.wants("get-cpu-topology") {
        let (s, c, t, m) = state.topology;
        let _ = writeln!(
            out,
            "cpu_topology:\tsockets={s}, cores={c}, threads={t}, maxcpus={m}"
        );
    }
}

/// Everything `sel` asks for, in FreeBSD's order. `--get-all` is `render` with `all` set.
pub fn render(state: &VmState, sel: &Selection) -> String {
    let mut out = String::new();
    if sel.wants("get-memseg") {
        memsegs(state, &mut out);
    }
    if sel.wants("get-memmap") {
        memmap(state, &mut out);
    }
    registers(state, sel, &mut out);
    vm_wide(state, sel, &mut out);
    out
}

/// What one `VM_RUN` came back with, as `--run` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunExit {
    pub rip: u64,
    pub inst_length: i32,
    pub kind: RunExitKind,
}

// Built from `/dev/vmm` exits on FreeBSD only; the formatting is tested everywhere.
#[cfg_attr(not(target_os = "freebsd"), allow(dead_code))]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunExitKind {
    Inout {
        input: bool,
        bytes: u16,
        string: bool,
        rep: bool,
        port: u16,
        eax: u32,
    },
    Vmx {
        status: i32,
        exit_reason: u32,
        qualification: u64,
        inst_type: i32,
        inst_error: i32,
    },
    Svm {
        exitcode: u64,
        exitinfo1: u64,
        exitinfo2: u64,
    },
    /// Any other `VM_EXITCODE_*`.
    Other(i32),
}

/// C's `%#lx`: `0` alone for zero, else `0x` and the digits.
fn alt_hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// `bhyvectl_dump_vm_run_exitcode`.
pub fn run_exit(vcpu: u32, exit: &RunExit) -> String {
    let mut out = format!(
        "vm exit[{vcpu}]\n\trip\t\t0x{:016x}\n\tinst_length\t{}\n",
        exit.rip, exit.inst_length
    );
    match &exit.kind {
        RunExitKind::Inout {
            input,
            bytes,
            string,
            rep,
            port,
            eax,
        } => {
            let _ = write!(
                out,
                "\treason\t\tINOUT\n\tdirection\t{}\n\tbytes\t\t{bytes}\n\tflags\t\t{}{}\n\
                 \tport\t\t0x{port:04x}\n\teax\t\t0x{eax:08x}\n",
                if *input { "IN" } else { "OUT" },
                if *string { "STRING " } else { "" },
                if *rep { "REP " } else { "" },
            );
        }
        RunExitKind::Vmx {
            status,
            exit_reason,
            qualification,
            inst_type,
            inst_error,
        } => {
            let _ = write!(
                out,
                "\treason\t\tVMX\n\tstatus\t\t{status}\n\texit_reason\t0x{exit_reason:08x} \
                 ({exit_reason})\n\tqualification\t0x{qualification:016x}\n\
                 \tinst_type\t\t{inst_type}\n\tinst_error\t\t{inst_error}\n"
            );
        }
        RunExitKind::Svm {
            exitcode,
            exitinfo1,
            exitinfo2,
        } => {
            let _ = write!(
                out,
                "\treason\t\tSVM\n\texit_reason\t\t{}\n\texitinfo1\t\t{}\n\texitinfo2\t\t{}\n",
                alt_hex(*exitcode),
                alt_hex(*exitinfo1),
                alt_hex(*exitinfo2)
            );
        }
        RunExitKind::Other(code) => {
            let _ = writeln!(out, "*** unknown vm run exitcode {code}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bhyve::control::vmstate::{Descriptor, MemoryMapping, MemorySegment, VcpuRegisters};

    #[test]
    fn humanize_matches_freebsd() {
        // humanize_number(3) with a 8-byte buffer, "B", HN_AUTOSCALE | HN_NOSPACE.
        assert_eq!(humanize(0), "0B");
        assert_eq!(humanize(99_999), "99999B");
        assert_eq!(humanize(100_000), "98KB");
        assert_eq!(humanize(2 << 20), "2048KB");
        assert_eq!(humanize(1 << 30), "1024MB");
        assert_eq!(humanize(3 << 30), "3072MB");
        assert_eq!(humanize(128 << 30), "128GB");
    }

    fn state() -> VmState {
        let mut registers = VcpuRegisters::default();
        registers.values[12] = 0xffff_fff0; // rip
        registers.values[28] = 2; // rflags
        registers.segments[5] = (
            0xf000,
            Descriptor {
                base: 0xffff_0000,
                limit: 0xffff,
                access: 0x93,
            },
        );
        VmState {
            vcpu: 0,
            registers: Some(registers),
            x2apic_state: Some(0),
            intinfo: Some((0, (1 << 31) | (1 << 11) | (3 << 8) | 13 | (0x18 << 32))),
            capabilities: vec![
                ("hlt_exit".into(), Some(false)),
                ("mtrap_exit".into(), None),
            ],
            active_cpus: vec![0, 1],
            debug_cpus: Some(vec![]),
            suspended_cpus: vec![],
            statistics: vec![("Resident memory".into(), 8192)],
            topology: (1, 2, 1, 2),
            memory_segments: vec![
                MemorySegment {
                    id: 0,
                    len: 1 << 30,
                    name: String::new(),
                },
                MemorySegment {
                    id: 1,
                    len: 1 << 20,
                    name: "bootrom".into(),
                },
            ],
            memory_map: vec![
                MemoryMapping {
                    gpa: 0,
                    len: 1 << 30,
                    segment: 0,
                    offset: 0,
                    prot: 7,
                    flags: 1,
                },
                MemoryMapping {
                    gpa: 0xfff0_0000,
                    len: 1 << 20,
                    segment: 1,
                    offset: 0,
                    prot: 5,
                    flags: 0,
                },
            ],
        }
    }

    #[test]
    fn each_line_is_freebsds() {
        let all = render(
            &state(),
            &Selection {
                all: true,
                ..Default::default()
            },
        );
        for line in [
            "ID  Length      Name\n0   1024MB      sysmem\n1   1024KB      bootrom\n",
            "0           1024MB      sysmem      0           RWX   \0wired\n",
            "FFF00000    1024KB      bootrom     0           R-X   \n",
            "rip[0]\t\t0x00000000fffffff0\n",
            "rflags[0]\t0x0000000000000002\n",
            "cs desc[0]\t0x00000000ffff0000/0x0000ffff/0x00000093\n",
            "gdtr[0]\t\t0x0000000000000000/0x00000000\n",
            "cs[0]\t\t0xf000\n",
            "x2apic_state[0]\t0\n",
            "pending:\tn/a\ncurrent:\texception vector 13 errcode 0x18\n",
            "Capability \"hlt_exit\" is not set on vcpu 0\n",
            "Capability \"mtrap_exit\" is not available\n",
            "active cpus:\t 0, 1\ndebug cpus:\t (none)\nsuspended cpus:\t (none)\n",
            "vcpu0 stats:\nResident memory                         \t8192\n",
            "cpu_topology:\tsockets=1, cores=2, threads=1, maxcpus=2\n",
        ] {
            assert!(all.contains(line), "{line:?} not in\n{all}");
        }
    }

    #[test]
    fn run_exits_print_as_freebsd() {
        let exit = RunExit {
            rip: 0xfff0,
            inst_length: 1,
            kind: RunExitKind::Inout {
                input: false,
                bytes: 1,
                string: false,
                rep: true,
                port: 0x3f8,
                eax: 0x41,
            },
        };
        assert_eq!(
            run_exit(0, &exit),
            "vm exit[0]\n\trip\t\t0x000000000000fff0\n\tinst_length\t1\n\treason\t\tINOUT\n\
             \tdirection\tOUT\n\tbytes\t\t1\n\tflags\t\tREP \n\tport\t\t0x03f8\n\teax\t\t0x00000041\n"
        );
        let svm = RunExit {
            rip: 0,
            inst_length: 0,
            kind: RunExitKind::Svm {
                exitcode: 0x400,
                exitinfo1: 0,
                exitinfo2: 7,
            },
        };
        assert!(run_exit(1, &svm).ends_with(
            "\treason\t\tSVM\n\texit_reason\t\t0x400\n\texitinfo1\t\t0\n\texitinfo2\t\t0x7\n"
        ));
        let other = RunExit {
            rip: 0,
            inst_length: 0,
            kind: RunExitKind::Other(12),
        };
        assert!(run_exit(0, &other).ends_with("*** unknown vm run exitcode 12\n"));
    }

    #[test]
    fn only_what_is_asked_is_printed() {
        let mut sel = Selection::default();
        sel.options.insert("get-rip");
        sel.options.insert("getcap");
        sel.capname = Some("mtrap_exit".into());
        assert_eq!(
            render(&state(), &sel),
            "rip[0]\t\t0x00000000fffffff0\nCapability \"mtrap_exit\" is not available\n"
        );
    }
}
