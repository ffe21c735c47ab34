//! Several vCPUs end to end: the console guest starts every AP with INIT + STARTUP IPIs at boot,
//! each CPU reports its APIC id and the topology CPUID describes, and every CPU runs a counting
//! loop in ring 3 on `work on`. Also `-p` pinning of the vCPU threads, and the same guest under
//! QEMU with `-smp 4` as an independent reference.

#[path = "common/mod.rs"]
mod common;

use common::{
    bhyve_command_with, boot_bhyve_with, guest, qemu_binary, qemu_command, run_to_exit,
    work_counts, Console, BOOT_TIMEOUT, COMMAND_TIMEOUT,
};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// One line of `cpus`: `cpu <n> apic <id> package <p> core <c> thread <t> (leaf 1 apic <id>
/// logical <n>, leaf 4 cores <n>, [leaf 0x80000008 nc <n> idsize <n>, ][leaf 0x8000001e extapic
/// <id> unit <n> threads <n>, ]<source>)`; the AMD leaves only where leaf 0 names AMD.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CpuReport {
    slot: u32,
    apic: u32,
    package: u32,
    core: u32,
    thread: u32,
    leaf1_apic: u32,
    leaf1_logical: u32,
    leaf4_cores: u32,
    /// 0x8000_0008 ECX: NC and ApicIdCoreIdSize.
    amd_nc: Option<(u32, u32)>,
    /// 0x8000_001E: extended APIC id, compute unit id, threads per compute unit.
    amd_unit: Option<(u32, u32, u32)>,
    /// The leaves the guest took package, core and thread from: `leaf 0xb`, `leaf 0x8000001e`
    /// or `leaf 1/4`.
    source: String,
}

fn parse_cpu_line(line: &str) -> Option<CpuReport> {
    let words: Vec<&str> = line
        .split(|c: char| c.is_whitespace() || c == '(' || c == ',' || c == ')')
        .filter(|w| !w.is_empty())
        .collect();
    let after = |key: &str, nth: usize| -> Option<u32> {
        let at = words
            .iter()
            .enumerate()
            .filter(|(_, w)| **w == key)
            .nth(nth)?
            .0;
        words.get(at + 1)?.parse().ok()
    };
    (words.first() == Some(&"cpu")).then_some(())?;
    Some(CpuReport {
        slot: after("cpu", 0)?,
        apic: after("apic", 0)?,
        package: after("package", 0)?,
        core: after("core", 0)?,
        thread: after("thread", 0)?,
        leaf1_apic: after("apic", 1)?,
        leaf1_logical: after("logical", 0)?,
        leaf4_cores: after("cores", 0)?,
        amd_nc: after("nc", 0).zip(after("idsize", 0)),
        amd_unit: after("extapic", 0)
            .zip(after("unit", 0))
            .zip(after("threads", 0))
            .map(|((a, u), t)| (a, u, t)),
        source: line
            .trim_end()
            .strip_suffix(')')?
            .rsplit(", ")
            .next()?
            .to_string(),
    })
}

/// Runs `cpus` and returns one report per CPU, checking the summary line.
fn cpus(vm: &mut Console, expected: usize) -> Vec<CpuReport> {
    let lines = vm.command("cpus", COMMAND_TIMEOUT);
    assert_eq!(
        lines.last().map(String::as_str),
        Some(format!("cpus {expected} online").as_str()),
        "{lines:?}"
    );
    let reports: Vec<CpuReport> = lines[..lines.len() - 1]
        .iter()
        .map(|l| parse_cpu_line(l).unwrap_or_else(|| panic!("bad cpus line {l:?}")))
        .collect();
    assert_eq!(reports.len(), expected, "{lines:?}");
    reports
}

/// Boot lines `cpu <n> apic <id> online` and `cpus <N> online`: every CPU reported in, each
/// with its own APIC id.
fn check_boot_report(transcript: &str, expected: usize) -> BTreeSet<u32> {
    assert!(
        transcript.contains(&format!("\ncpus {expected} online\n")),
        "{transcript}"
    );
    let mut apic_ids = BTreeSet::new();
    let mut slots = BTreeSet::new();
    for line in transcript.lines().filter(|l| l.ends_with(" online")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let ["cpu", slot, "apic", apic, "online"] = words[..] {
            assert!(slots.insert(slot.to_string()), "slot twice: {transcript}");
            let apic: u32 = apic.parse().expect("numeric APIC id");
            assert!(apic_ids.insert(apic), "APIC id {apic} twice: {transcript}");
        }
    }
    assert_eq!(apic_ids.len(), expected, "{transcript}");
    apic_ids
}

/// Boots under bhyve with `-c <topology>`, prints how long the APs took to come online (from the
/// banner to the summary line) and checks the boot report.
fn boot_smp(topology: &str, expected: usize) -> Option<Console> {
    if !common::kvm_usable() {
        return None;
    }
    let kernel = guest::console_guest();
    let mut vm = Console::spawn("bhyve", bhyve_command_with(kernel, "", &["-c", topology]));
    vm.expect("bhyve-rs test guest (", BOOT_TIMEOUT);
    let banner = Instant::now();
    vm.expect(&format!("cpus {expected} online\n"), BOOT_TIMEOUT);
    eprintln!(
        "-c {topology}: {expected} CPUs online {} ms after the banner",
        banner.elapsed().as_millis()
    );
    vm.expect(guest::READY, BOOT_TIMEOUT);
    vm.expect_prompt(COMMAND_TIMEOUT);
    check_boot_report(&vm.transcript(), expected);
    Some(vm)
}

/// bhyve's model: vCPU i has APIC id i; its thread, core and package numbers are the APIC id's
/// fields (each log2 wide, so exact when `threads` and `cores` are powers of two).
fn expected_topology(cpus: u32, cores: u32, threads: u32) -> BTreeSet<(u32, u32, u32, u32)> {
    (0..cpus)
        .map(|apic| {
            (
                apic,
                apic / (cores * threads),
                (apic / threads) % cores,
                apic % threads,
            )
        })
        .collect()
}

/// The host's CPU, whose vendor the guest sees (KVM passes leaf 0 through).
struct HostCpu {
    amd: bool,
    /// AMD's TopoExt (0x8000_0001 ECX bit 22) from family 16h on: bhyve fills 0x8000_001E.
    amd_topology: bool,
}

fn host_cpu() -> HostCpu {
    use std::arch::x86_64::{__cpuid, CpuidResult};
    #[allow(unused_unsafe)] // `__cpuid` is safe in newer compilers
    // SAFETY: CPUID exists on every x86-64 CPU; leaves above the maximum read as another leaf,
    // so each is asked only when the maximum allows it.
    let cpuid = |leaf: u32| -> CpuidResult { unsafe { __cpuid(leaf) } };
    let leaf0 = cpuid(0);
    let amd = [*b"Auth", *b"Hygo"].contains(&leaf0.ebx.to_le_bytes());
    let eax = cpuid(1).eax;
    let family = ((eax >> 8) & 0xf)
        + if (eax >> 8) & 0xf == 0xf {
            (eax >> 20) & 0xff
        } else {
            0
        };
    let topoext = cpuid(0x8000_0000).eax >= 0x8000_001e && cpuid(0x8000_0001).ecx & (1 << 22) != 0;
    HostCpu {
        amd,
        amd_topology: amd && topoext && family >= 0x16,
    }
}

fn log2_ceil(x: u32) -> u32 {
    x.next_power_of_two().trailing_zeros()
}

/// The topology the guest derived from CPUID is bhyve's, and each leaf the host's vendor
/// defines says so: leaf 4 and 0xB on Intel, 0x8000_0008 and 0x8000_001E on AMD.
fn check_topology(reports: &[CpuReport], cpus: u32, cores: u32, threads: u32) {
    let seen: BTreeSet<_> = reports
        .iter()
        .map(|r| (r.apic, r.package, r.core, r.thread))
        .collect();
    assert_eq!(seen, expected_topology(cpus, cores, threads), "{reports:?}");
    let host = host_cpu();
    let per_package = cores * threads;
    for r in reports {
        assert_eq!(r.leaf1_apic, r.apic, "initial APIC id in leaf 1: {r:?}");
        assert_eq!(r.leaf1_logical, per_package, "leaf 1 count: {r:?}");
        if host.amd {
            let core_id_size = Some(log2_ceil(per_package)).filter(|&w| w >= 4);
            assert_eq!(
                r.amd_nc,
                Some((per_package - 1, core_id_size.unwrap_or(0))),
                "0x8000_0008 NC and ApicIdCoreIdSize: {r:?}"
            );
            if host.amd_topology {
                assert_eq!(
                    r.amd_unit,
                    Some((r.apic, r.apic >> log2_ceil(threads), threads)),
                    "0x8000_001E: {r:?}"
                );
                // bhyve leaves leaf 0xB empty on AMD, so the guest used AMD's leaves.
                assert_eq!(r.source, "leaf 0x8000001e", "{r:?}");
            }
        } else {
            assert_eq!(r.leaf4_cores, cores, "leaf 4 cores: {r:?}");
            assert_eq!(r.amd_nc, None, "{r:?}");
            assert_eq!(r.source, "leaf 0xb", "{r:?}");
        }
    }
}

#[test]
fn two_vcpus_come_online() {
    let Some(mut vm) = boot_smp("2", 2) else {
        return;
    };
    let reports = cpus(&mut vm, 2);
    assert_eq!(
        reports.iter().map(|r| r.apic).collect::<BTreeSet<_>>(),
        BTreeSet::from([0, 1])
    );
}

#[test]
fn four_vcpus_come_online_with_distinct_apic_ids() {
    let Some(mut vm) = boot_smp("4", 4) else {
        return;
    };
    let reports = cpus(&mut vm, 4);
    assert_eq!(reports[0].slot, 0, "the boot CPU is cpu 0");
    assert_eq!(reports[0].apic, 0, "vCPU 0 boots");
    // -c 4 alone means four sockets of one core each.
    check_topology(&reports, 4, 1, 1);
}

#[test]
fn two_sockets_of_two_cores_reach_cpuid() {
    let Some(mut vm) = boot_smp("cpus=4,sockets=2,cores=2,threads=1", 4) else {
        return;
    };
    check_topology(&cpus(&mut vm, 4), 4, 2, 1);
}

#[test]
fn two_threads_per_core_reach_cpuid() {
    let Some(mut vm) = boot_smp("cpus=4,sockets=1,cores=2,threads=2", 4) else {
        return;
    };
    check_topology(&cpus(&mut vm, 4), 4, 2, 2);
}

fn every_cpu_advances(vm: &mut Console, cpus: usize) {
    assert_eq!(vm.command_line("work on"), "work on");
    let first = work_counts(vm);
    assert_eq!(first.len(), cpus, "{first:?}");
    std::thread::sleep(Duration::from_millis(300));
    let second = work_counts(vm);
    for ((apic, before), (apic_again, after)) in first.iter().zip(&second) {
        assert_eq!(apic, apic_again);
        assert!(
            after > before,
            "CPU with APIC id {apic} stalled at {before}"
        );
    }
}

#[test]
fn every_vcpu_makes_progress_and_halt_stops_them_all() {
    let Some(mut vm) = boot_smp("4", 4) else {
        return;
    };
    let idle = work_counts(&mut vm);
    assert!(idle.iter().all(|&(_, n)| n == 0), "{idle:?}");
    every_cpu_advances(&mut vm, 4);
    assert_eq!(vm.command_line("work off"), "work off");
    let stopped = work_counts(&mut vm);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(work_counts(&mut vm), stopped, "counts move after work off");
    every_cpu_advances(&mut vm, 4);
    // bhyve exits 2 only once every vCPU sits in HLT with interrupts off: the APs as well.
    vm.send_line("halt");
    vm.expect("halting\n", COMMAND_TIMEOUT);
    assert_eq!(vm.wait_exit(Duration::from_secs(30)).code(), Some(2));
}

#[test]
fn the_same_guest_brings_up_four_cpus_under_qemu() {
    let Some(qemu) = qemu_binary() else {
        return;
    };
    let mut cmd = qemu_command(&qemu, guest::console_guest(), "");
    cmd.args(["-smp", "4"]);
    let mut vm = Console::spawn("qemu", cmd);
    vm.expect(guest::READY, BOOT_TIMEOUT);
    vm.expect_prompt(COMMAND_TIMEOUT);
    let apic_ids = check_boot_report(&vm.transcript(), 4);
    let reports = cpus(&mut vm, 4);
    assert_eq!(
        reports.iter().map(|r| r.apic).collect::<BTreeSet<_>>(),
        apic_ids
    );
    every_cpu_advances(&mut vm, 4);
}

/// Host CPUs this process may run on, from /proc/self/status.
fn allowed_host_cpus(status: &str) -> BTreeSet<u32> {
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap_or("")
        .trim();
    let mut cpus = BTreeSet::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>()) {
            cpus.extend(a..=b);
        }
    }
    cpus
}

#[test]
fn vcpu_threads_are_pinned_to_their_host_cpus() {
    let own = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if !allowed_host_cpus(&own).is_superset(&BTreeSet::from([0, 1])) {
        common::notice("needs host CPUs 0 and 1");
        return;
    }
    let Some(mut vm) = boot_bhyve_with(&["-c", "2", "-p", "0:1", "-p", "1:0"], "") else {
        return;
    };
    let mut pinned = Vec::new();
    let tasks = format!("/proc/{}/task", vm.pid());
    for task in std::fs::read_dir(&tasks).expect("task list") {
        let dir = task.expect("task entry").path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if let Some(vcpu) = name.trim().strip_prefix("vcpu ") {
            let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
            pinned.push((vcpu.to_string(), allowed_host_cpus(&status)));
        }
    }
    pinned.sort();
    assert_eq!(
        pinned,
        vec![
            ("0".to_string(), BTreeSet::from([1])),
            ("1".to_string(), BTreeSet::from([0]))
        ]
    );
    // Pinned or not, both vCPUs run the guest.
    every_cpu_advances(&mut vm, 2);
}

#[test]
fn pinning_to_a_missing_host_cpu_is_refused_before_the_guest_runs() {
    let cmd = bhyve_command_with(guest::console_guest(), "", &["-c", "2", "-p", "1:1000"]);
    let (status, stdout, stderr) = run_to_exit(cmd, Duration::from_secs(30));
    assert_eq!(status.code(), Some(4), "{stderr}");
    assert!(stdout.is_empty(), "the guest ran: {stdout}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("bhyve: vcpu 1: host CPU 1000 does not exist or is not available"),
        "{stderr}"
    );
}

#[test]
fn cpu_lines_parse() {
    let line = "cpu 3 apic 5 package 1 core 0 thread 1 (leaf 1 apic 5 logical 4, \
                leaf 4 cores 2, leaf 0xb)";
    assert_eq!(
        parse_cpu_line(line),
        Some(CpuReport {
            slot: 3,
            apic: 5,
            package: 1,
            core: 0,
            thread: 1,
            leaf1_apic: 5,
            leaf1_logical: 4,
            leaf4_cores: 2,
            amd_nc: None,
            amd_unit: None,
            source: "leaf 0xb".to_string(),
        })
    );
    let amd = "cpu 1 apic 1 package 0 core 0 thread 1 (leaf 1 apic 1 logical 4, \
               leaf 4 cores 1, leaf 0x80000008 nc 3 idsize 0, \
               leaf 0x8000001e extapic 1 unit 0 threads 2, leaf 0x8000001e)";
    let report = parse_cpu_line(amd).expect("AMD line");
    assert_eq!(report.amd_nc, Some((3, 0)));
    assert_eq!(report.amd_unit, Some((1, 0, 2)));
    assert_eq!(report.source, "leaf 0x8000001e");
    assert_eq!(parse_cpu_line("cpus 4 online"), None);
}

/// Runs the console guest under QEMU with CPU model `cpu` and `-smp smp`, returning `cpus`.
fn qemu_cpus(cpu: &str, smp: &str, expected: usize) -> Option<Vec<CpuReport>> {
    let qemu = qemu_binary()?;
    let mut cmd = qemu_command(&qemu, guest::console_guest(), "");
    cmd.args(["-cpu", cpu, "-smp", smp]);
    let mut vm = Console::spawn("qemu", cmd);
    vm.expect(guest::READY, BOOT_TIMEOUT);
    vm.expect_prompt(COMMAND_TIMEOUT);
    Some(cpus(&mut vm, expected))
}

/// QEMU as the reference for the guest's reading of AMD's topology leaves, whatever this host's
/// vendor is: an EPYC with leaf 0xB turned off, so the guest must take the cores from NC of
/// 0x8000_0008. (QEMU's TCG offers no TopoExt, so 0x8000_001E is checked on AMD hosts only.)
#[test]
fn qemu_amd_topology_leaves_read_as_qemu_defines_them() {
    let Some(reports) = qemu_cpus("EPYC,cpuid-0xb=off", "4,sockets=2,cores=2,threads=1", 4) else {
        return;
    };
    let seen: BTreeSet<_> = reports
        .iter()
        .map(|r| (r.apic, r.package, r.core, r.thread))
        .collect();
    assert_eq!(seen, expected_topology(4, 2, 1), "{reports:?}");
    for r in &reports {
        assert_eq!(r.source, "leaf 0x80000008", "{r:?}");
        assert_eq!(r.amd_nc.map(|(nc, _)| nc), Some(1), "{r:?}");
        assert_eq!(r.leaf1_logical, 2, "{r:?}");
    }
}

/// The same for Intel's leaves: 0xB for the ids, leaf 4 for the cores.
#[test]
fn qemu_intel_topology_leaves_read_as_qemu_defines_them() {
    let Some(reports) = qemu_cpus("Skylake-Client", "4,sockets=1,cores=2,threads=2", 4) else {
        return;
    };
    let seen: BTreeSet<_> = reports
        .iter()
        .map(|r| (r.apic, r.package, r.core, r.thread))
        .collect();
    assert_eq!(seen, expected_topology(4, 2, 2), "{reports:?}");
    for r in &reports {
        assert_eq!(r.source, "leaf 0xb", "{r:?}");
        assert_eq!((r.leaf4_cores, r.leaf1_logical), (2, 4), "{r:?}");
        assert_eq!(r.amd_nc, None, "{r:?}");
    }
}
