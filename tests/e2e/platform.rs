//! The platform as the guest sees it, through the real `bhyve` binary: the ACPI tables (every
//! checksum, the FADT's registers, the MADT's CPUs, the MCFG), PCI through both configuration
//! mechanisms, BAR placement, the PM timer, the HPET, the RTC in UTC, and the power controls (S5, reset,
//! the power button bhyve presses on SIGTERM). Where QEMU (TCG, q35) implements the same
//! standard, the same guest-visible properties are checked there too.

#[path = "common/mod.rs"]
mod common;

use common::{boot_bhyve, boot_bhyve_with, boot_qemu_with, guest, Console, COMMAND_TIMEOUT};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// bhyve's BAR windows (usr.sbin/bhyve/pci_emul.c): I/O from 0x2000 below 64 KiB, 32-bit
/// memory from the 3 GiB low-memory limit up to the ECAM window at 0xE0000000, 64-bit memory
/// in a 32 GiB window on the first 32 GiB boundary above guest RAM (the tests' 256 MiB guest
/// has no RAM above 4 GiB, so that is 32 GiB).
const IO_WINDOW: (u64, u64) = (0x2000, 0x1_0000);
const MEM32_WINDOW: (u64, u64) = (0xc000_0000, 0xe000_0000);
const MEM64_WINDOW: (u64, u64) = (32 << 30, 64 << 30);
/// The ACPI PM timer's frequency.
const PMTMR_HZ: f64 = 3_579_545.0;
/// How long bhyve or QEMU may take to exit after the guest asked for it.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

fn hex(text: &str) -> Option<u64> {
    u64::from_str_radix(text.strip_prefix("0x")?, 16).ok()
}

/// The value after `key` in a line of "key value" pairs.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let mut words = line.split_whitespace();
    words.find(|w| *w == key)?;
    words.next()
}

/// What `acpi` printed, checked for what holds on any correct firmware: a valid RSDP, every
/// table's checksum ok, the tables an x86 OS needs present.
struct AcpiReport {
    lines: Vec<String>,
    signatures: Vec<String>,
}

impl AcpiReport {
    fn check(lines: Vec<String>) -> AcpiReport {
        let rsdp = lines
            .iter()
            .find(|l| l.starts_with("rsdp "))
            .unwrap_or_else(|| panic!("no RSDP: {lines:?}"));
        assert_eq!(field(rsdp, "checksum"), Some("ok"), "{rsdp}");
        assert_ne!(field(rsdp, "extended"), Some("BAD"), "{rsdp}");
        let tables: Vec<&String> = lines.iter().filter(|l| l.starts_with("table ")).collect();
        for table in &tables {
            assert!(table.ends_with(" checksum ok"), "{table} in {lines:?}");
        }
        assert!(
            !lines.iter().any(|l| l.starts_with("tables unreadable")),
            "{lines:?}"
        );
        let signatures: Vec<String> = tables
            .iter()
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
            .collect();
        for needed in ["FACP", "APIC", "HPET", "MCFG", "DSDT"] {
            assert!(
                signatures.iter().any(|s| s == needed),
                "{needed} missing: {lines:?}"
            );
        }
        let dsdt = lines
            .iter()
            .find(|l| l.starts_with("dsdt "))
            .unwrap_or_else(|| panic!("FADT names no DSDT: {lines:?}"));
        assert_eq!(field(dsdt, "checksum"), Some("ok"), "{dsdt}");
        AcpiReport { lines, signatures }
    }

    fn line(&self, prefix: &str) -> &str {
        self.lines
            .iter()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line: {:?}", self.lines))
    }

    /// (processor uid, APIC id) of every enabled local APIC in the MADT.
    fn enabled_cpus(&self) -> Vec<(u32, u32)> {
        self.lines
            .iter()
            .filter(|l| {
                (l.starts_with("madt lapic ") || l.starts_with("madt x2apic "))
                    && l.ends_with(" enabled")
            })
            .filter_map(|l| {
                let uid = field(l, "uid")?.parse().ok()?;
                let apic = field(l, "apic")?.parse().ok()?;
                Some((uid, apic))
            })
            .collect()
    }

    /// (ECAM base, first bus, last bus) from the MCFG line.
    fn mcfg(&self) -> (u64, String) {
        let line = self.line("mcfg ");
        let base = field(line, "base").and_then(hex);
        (
            base.unwrap_or_else(|| panic!("{line}")),
            field(line, "bus").unwrap_or_default().to_string(),
        )
    }
}

fn acpi(vm: &mut Console) -> AcpiReport {
    AcpiReport::check(vm.command("acpi", COMMAND_TIMEOUT))
}

fn assert_distinct_cpus(report: &AcpiReport, count: usize) {
    let cpus = report.enabled_cpus();
    assert_eq!(cpus.len(), count, "{:?}", report.lines);
    let mut ids: Vec<u32> = cpus.iter().map(|&(_, apic)| apic).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(
        ids.len(),
        count,
        "APIC ids not distinct: {:?}",
        report.lines
    );
    let mut uids: Vec<u32> = cpus.iter().map(|&(uid, _)| uid).collect();
    uids.sort_unstable();
    uids.dedup();
    assert_eq!(
        uids.len(),
        count,
        "processor uids not distinct: {:?}",
        report.lines
    );
}

#[test]
fn acpi_tables_are_valid_and_describe_bhyves_platform() {
    let Some(mut vm) = boot_bhyve("") else {
        return;
    };
    let report = acpi(&mut vm);
    assert_eq!(report.signatures.first().map(String::as_str), Some("XSDT"));
    // The fixed hardware of bhyve's acpi.h and pm.c.
    assert_eq!(
        report.line("fadt pm1a_evt"),
        "fadt pm1a_evt 0x400 pm1a_cnt 0x404 pm_tmr 0x408 32-bit smi_cmd 0xb2 acpi_enable 0xa0 sci 9"
    );
    assert_eq!(report.line("fadt reset"), "fadt reset io 0xcf9 value 0x6");
    assert!(
        report.line("dsdt ").ends_with(" s5 5"),
        "{:?}",
        report.lines
    );
    assert_eq!(report.mcfg(), (0xe000_0000, "0-255".to_string()));
    assert_distinct_cpus(&report, 1);
    assert!(
        report
            .lines
            .iter()
            .any(|l| l.starts_with("madt ioapic ") && l.contains(" address 0xfec00000 ")),
        "{:?}",
        report.lines
    );
    // The SCI: ISA IRQ 9, level triggered, active low (flags 0xf).
    assert!(
        report
            .lines
            .contains(&"madt override bus 0 irq 9 gsi 9 flags 0xf".to_string()),
        "{:?}",
        report.lines
    );
}

#[test]
fn madt_lists_one_enabled_local_apic_per_vcpu() {
    let Some(mut vm) = boot_bhyve_with(&["-c", "4"], "") else {
        return;
    };
    assert_distinct_cpus(&acpi(&mut vm), 4);
}

#[test]
fn madt_lists_every_vcpu_of_a_two_socket_topology() {
    let Some(mut vm) = boot_bhyve_with(&["-c", "cpus=4,sockets=2,cores=2,threads=1"], "") else {
        return;
    };
    assert_distinct_cpus(&acpi(&mut vm), 4);
}

/// Runs `pci` and `ecam` and checks they list the same functions; returns the listing.
fn pci_and_ecam_agree(vm: &mut Console) -> Vec<String> {
    let pci = vm.command("pci", COMMAND_TIMEOUT);
    let ecam = vm.command("ecam", COMMAND_TIMEOUT);
    assert!(!pci.is_empty() && pci.iter().all(|l| l.starts_with("pci 00:")));
    assert_eq!(ecam, pci, "ECAM and mechanism #1 disagree");
    pci
}

#[test]
fn ecam_and_port_configuration_access_show_the_same_bus() {
    let Some(mut vm) = boot_bhyve("") else {
        return;
    };
    let pci = pci_and_ecam_agree(&mut vm);
    // bhyve's ids: pci_hostbridge.c (1275:1275, NetApp's id) and pci_lpc.c (Intel 82371SB).
    assert!(
        pci.contains(&"pci 00:00.0 1275:1275 class 060000".to_string()),
        "{pci:?}"
    );
    assert!(
        pci.contains(&"pci 00:1f.0 8086:7000 class 060100".to_string()),
        "{pci:?}"
    );
}

/// One BAR from `bars`: function, index, space ("io", "mem32", "mem64"), address, size.
#[derive(Debug)]
struct Bar {
    function: String,
    space: String,
    address: u64,
    size: u64,
}

fn parse_bar(line: &str) -> Option<Bar> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let (function, space) = (words.get(1)?, words.get(3)?);
    let address = hex(words.get(words.len().checked_sub(3)?)?)?;
    let size = hex(words.last()?)?;
    (words.first() == Some(&"bar") && words.get(words.len() - 2) == Some(&"size")).then(|| Bar {
        function: function.to_string(),
        space: space.to_string(),
        address,
        size,
    })
}

#[test]
fn multifunction_dummy_devices_get_aligned_disjoint_bars_in_bhyves_windows() {
    let slots = ["-s", "4:0,dummy", "-s", "4:1,dummy", "-s", "4:2,dummy"];
    let Some(mut vm) = boot_bhyve_with(&slots, "") else {
        return;
    };
    let pci = pci_and_ecam_agree(&mut vm);
    for function in 0..3 {
        let id = format!("pci 00:04.{function} 10dd:0001 class 020000");
        assert!(pci.contains(&id), "{id} missing: {pci:?}");
    }
    let lines = vm.command("bars", COMMAND_TIMEOUT);
    let header = lines
        .iter()
        .find(|l| l.starts_with("bars 00:04.0 "))
        .and_then(|l| field(l, "header"))
        .and_then(|h| u8::from_str_radix(h, 16).ok())
        .unwrap_or_else(|| panic!("no header type for 00:04.0: {lines:?}"));
    assert_ne!(header & 0x80, 0, "multi-function bit clear: {lines:?}");

    let bars: Vec<Bar> = lines
        .iter()
        .filter(|l| l.starts_with("bar "))
        .map(|l| parse_bar(l).unwrap_or_else(|| panic!("cannot parse {l:?}")))
        .collect();
    // Each dummy function has an I/O BAR and two memory BARs.
    for function in ["00:04.0", "00:04.1", "00:04.2"] {
        let count = bars.iter().filter(|b| b.function == function).count();
        assert_eq!(count, 3, "{function}: {lines:?}");
    }
    for bar in &bars {
        assert!(bar.size.is_power_of_two(), "{bar:?}");
        assert_eq!(
            bar.address % bar.size,
            0,
            "not aligned to its size: {bar:?}"
        );
        let window = match bar.space.as_str() {
            "io" => IO_WINDOW,
            "mem32" => MEM32_WINDOW,
            "mem64" => MEM64_WINDOW,
            other => panic!("unknown BAR type {other}: {bar:?}"),
        };
        assert!(
            bar.address >= window.0 && bar.address + bar.size <= window.1,
            "outside the {} window {window:x?}: {bar:?}",
            bar.space
        );
    }
    for (i, a) in bars.iter().enumerate() {
        for b in &bars[i + 1..] {
            let same_space = (a.space == "io") == (b.space == "io");
            let disjoint = a.address + a.size <= b.address || b.address + b.size <= a.address;
            assert!(!same_space || disjoint, "{a:?} overlaps {b:?}");
        }
    }
}

#[test]
fn pm_timer_runs_at_3_579545_mhz() {
    let Some(mut vm) = boot_bhyve("") else {
        return;
    };
    let line = vm.command_line("pmtimer 2000");
    let hz: f64 = line
        .strip_prefix("pmtimer ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{line:?}"));
    assert!(
        (hz - PMTMR_HZ).abs() <= PMTMR_HZ * 0.05,
        "PM timer at {hz} Hz ({line})"
    );
}

/// The HPET a FreeBSD guest sees (vhpet): found through RSDP → XSDT → HPET table, with
/// vhpet's capabilities, and counting at the rate it advertises, measured against the PM timer
/// and the PIT.
#[test]
fn hpet_from_the_acpi_tables_counts_at_its_advertised_rate() {
    let Some(mut vm) = boot_bhyve("") else {
        return;
    };
    let lines = vm.command("hpet 2000", COMMAND_TIMEOUT);
    let report = guest::parse_hpet_report(&lines).unwrap_or_else(|| panic!("{lines:?}"));
    // vhpet_capabilities(): vendor 8086, 8 timers, revision 1, 32-bit counter, no legacy
    // replacement, period 10^15 / 2^24 fs; bhyve's table carries the low half at 0xFED00000.
    assert_eq!(report.table_id, 0x8086_0701, "{lines:?}");
    assert_eq!(report.base, 0xfed0_0000, "{lines:?}");
    assert_eq!(
        (
            report.vendor,
            report.timers,
            report.counter_bits,
            report.legacy
        ),
        (0x8086, 8, 32, false),
        "{lines:?}"
    );
    assert_eq!(report.period_fs, 59_604_644, "{lines:?}");
    assert_eq!(report.advertised_hz, 16_777_216.0, "{lines:?}");
    for (clock, hz) in [
        ("PM timer", report.by_pmtimer_hz),
        ("PIT", report.by_pit_hz),
    ] {
        assert!(
            (hz - report.advertised_hz).abs() <= report.advertised_hz * 0.10,
            "HPET at {hz} Hz against the {clock}, advertised {} Hz: {lines:?}",
            report.advertised_hz
        );
    }
    eprintln!(
        "bhyve HPET: advertised {} Hz, {} Hz by the PM timer, {} Hz by the PIT",
        report.advertised_hz, report.by_pmtimer_hz, report.by_pit_hz
    );
    let state = vm.command_line("hpet state");
    assert!(
        state.starts_with("hpet config 0x0000000000000001 "),
        "{state}"
    );
}

/// HPET timer 0 routed to the top I/O APIC input vhpet allows with 24 pins (23): a one-shot
/// comparator 10 ms ahead raises exactly one interrupt, a 10 ms period fifty in half a second.
#[test]
fn hpet_timer_interrupts_arrive_through_the_io_apic() {
    let Some(mut vm) = boot_bhyve("") else {
        return;
    };
    let line = vm.command_line("hpet irq");
    let (pin, one_shot, periodic, ticks, hz) =
        guest::parse_hpet_irq(&line).unwrap_or_else(|| panic!("{line:?}"));
    eprintln!("bhyve: {line}");
    assert_eq!(pin, 23, "{line}");
    assert_eq!(one_shot, 1, "{line}");
    let expected = (ticks * 100 / hz) as f64;
    assert!(
        (periodic as f64 - expected).abs() <= expected * 0.10,
        "{periodic} periodic interrupts, {expected} expected: {line}"
    );
}

#[test]
fn rtc_in_utc_with_dash_u_matches_the_host_clock() {
    // A zone 5:30 east of UTC (a POSIX TZ string: no time zone database needed), so UTC and
    // local time cannot be mistaken for each other.
    const ZONE: &str = "IST-5:30";
    const OFFSET: i64 = 5 * 3600 + 30 * 60;
    for (options, expected_offset) in [(&["-u"][..], 0), (&[][..], OFFSET)] {
        if !common::kvm_usable() {
            return;
        }
        let mut cmd = common::bhyve_command_with(guest::console_guest(), "", options);
        cmd.env("TZ", ZONE);
        let mut vm = common::Console::spawn("bhyve", cmd);
        vm.expect(guest::READY, common::BOOT_TIMEOUT);
        vm.expect_prompt(COMMAND_TIMEOUT);
        let line = vm.command_line("cmos");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let guest = guest::parse_cmos_line(&line).unwrap_or_else(|| panic!("{line:?}"));
        // The RTC counts whole seconds: up to one second behind, plus the command's round trip.
        let skew = guest - expected_offset - now;
        assert!(
            skew.abs() <= 2,
            "{options:?} with TZ={ZONE}: guest RTC {line:?} is {skew} s off the expected time"
        );
    }
}

/// Runs `command`, waits for the guest to print `line` and bhyve to exit; returns its status.
fn bhyve_exit_after(command: &str, line: &str) -> Option<i32> {
    let mut vm = boot_bhyve("")?;
    vm.send_line(command);
    vm.expect(line, COMMAND_TIMEOUT);
    let status = vm.wait_exit(EXIT_TIMEOUT);
    assert!(!vm.transcript().contains("still running"));
    assert!(status.code().is_some(), "{status}: {}", vm.stderr());
    status.code()
}

#[test]
fn acpi_poweroff_exits_1() {
    if let Some(status) = bhyve_exit_after("poweroff", "poweroff slp_typ 5\n") {
        assert_eq!(status, 1);
    }
}

#[test]
fn reset_through_0xcf9_exits_0() {
    if let Some(status) = bhyve_exit_after("reset", "reset port 0xcf9 value 0x6\n") {
        assert_eq!(status, 0);
    }
}

#[test]
fn sigterm_presses_the_power_button_and_the_guest_powers_off() {
    let Some(mut vm) = boot_bhyve("") else {
        return;
    };
    vm.send_line("powerbutton");
    // bhyve marks the SCI level triggered in the PIC's ELCR before the guest runs.
    vm.expect("sci irq 9 found level triggered\n", COMMAND_TIMEOUT);
    vm.expect("powerbutton armed\n", COMMAND_TIMEOUT);
    assert!(vm.sigterm());
    vm.expect("sci pwrbtn\n", COMMAND_TIMEOUT);
    vm.expect("shutting down\n", COMMAND_TIMEOUT);
    // A second press while the guest shuts down changes nothing.
    assert!(vm.sigterm());
    vm.expect("poweroff slp_typ 5\n", COMMAND_TIMEOUT);
    let status = vm.wait_exit(EXIT_TIMEOUT);
    assert_eq!(status.code(), Some(1), "{status:?}: {}", vm.stderr());
    let stderr = vm.stderr();
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn once_acpi_is_on_sigterm_only_presses_the_button_and_the_guest_decides() {
    let Some(mut vm) = boot_bhyve("") else {
        return;
    };
    vm.send_line("powerbutton");
    vm.expect("powerbutton armed\n", COMMAND_TIMEOUT);
    vm.send("\r");
    vm.expect("powerbutton cancelled\n", COMMAND_TIMEOUT);
    vm.expect_prompt(COMMAND_TIMEOUT);
    assert_eq!(vm.command_line("sci"), "sci 0 pwrbtn 0");
    // The guest ignores the button now: each SIGTERM is one more press it sees, and bhyve
    // neither exits nor stops the guest.
    for presses in 1..=2 {
        assert!(vm.sigterm());
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let line = vm.command_line("sci");
            if line.ends_with(&format!(" pwrbtn {presses}")) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "press {presses} never arrived: {line}"
            );
        }
    }
    assert_eq!(vm.command_line("counter"), "counter 1");
    assert!(vm.running(), "{}", vm.stderr());
}

/// QEMU's q35 machine: ECAM and an MCFG, like bhyve. QEMU restarts the guest on a reset (see
/// `common::qemu_command_with`).
const Q35: [&str; 2] = ["-machine", "q35"];

#[test]
fn acpi_tables_are_valid_under_qemu() {
    let Some(mut vm) = boot_qemu_with(&Q35, "") else {
        return;
    };
    let report = acpi(&mut vm);
    assert_distinct_cpus(&report, 1);
    let (base, buses) = report.mcfg();
    assert_ne!(base, 0);
    assert!(buses.starts_with("0-"), "{buses}");
    assert!(report
        .line("fadt reset")
        .starts_with("fadt reset io 0xcf9 "));
}

#[test]
fn ecam_and_port_configuration_access_agree_under_qemu() {
    let Some(mut vm) = boot_qemu_with(&Q35, "") else {
        return;
    };
    let pci = pci_and_ecam_agree(&mut vm);
    assert!(pci.iter().any(|l| l.starts_with("pci 00:00.0 ")), "{pci:?}");
    assert!(
        pci.iter()
            .any(|l| l.starts_with("pci 00:1f.0 ") && l.ends_with(" class 060100")),
        "{pci:?}"
    );
}

#[test]
fn acpi_poweroff_ends_qemu() {
    let Some(mut vm) = boot_qemu_with(&Q35, "") else {
        return;
    };
    vm.send_line("poweroff");
    vm.expect("poweroff slp_typ ", COMMAND_TIMEOUT);
    // Without -no-reboot only a power-off makes QEMU exit; a reset would restart the guest.
    let status = vm.wait_exit(EXIT_TIMEOUT);
    assert!(status.success(), "{status:?}: {}", vm.stderr());
    let transcript = vm.transcript();
    assert_eq!(transcript.matches(guest::READY).count(), 1, "{transcript}");
    assert!(!transcript.contains("still running"), "{transcript}");
}

#[test]
fn reset_restarts_the_guest_under_qemu() {
    let Some(mut vm) = boot_qemu_with(&Q35, "") else {
        return;
    };
    vm.send_line("reset");
    vm.expect("reset port 0xcf9 value ", COMMAND_TIMEOUT);
    vm.expect(guest::READY, common::BOOT_TIMEOUT);
    vm.expect_prompt(COMMAND_TIMEOUT);
    assert_eq!(vm.command_line("counter"), "counter 1");
    assert!(vm.running());
}

/// Has the guest write `value` to the isa-debug-exit port and returns the exit status.
fn debug_exit_status(mut vm: Console, value: u32) -> i32 {
    vm.send_line(&format!("debugexit {value:#x}"));
    vm.expect(
        &format!("debugexit port 0xf4 value {value:#x}\n"),
        COMMAND_TIMEOUT,
    );
    let status = vm.wait_exit(EXIT_TIMEOUT);
    assert!(
        !vm.transcript().contains("debugexit: still running"),
        "{}",
        vm.transcript()
    );
    status
        .code()
        .unwrap_or_else(|| panic!("ended by a signal: {status:?}: {}", vm.stderr()))
}

#[test]
fn isa_debug_exit_ends_bhyve_with_the_status_qemu_gives() {
    // (V << 1) | 1 keeps its low byte as the exit status: 0x21, 0xff, and 0x01 for a value
    // whose shifted form only fits in 32 bits.
    for value in [0x10, 0x7f, 0x1234_5680] {
        let Some(bhyve) = boot_bhyve_with(&["-l", "pc-testdev"], "") else {
            return;
        };
        let bhyve_status = debug_exit_status(bhyve, value);
        assert_eq!(
            bhyve_status,
            (((value << 1) | 1) & 0xff) as i32,
            "value {value:#x}"
        );
        let qemu_device = ["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"];
        if let Some(qemu) = boot_qemu_with(&qemu_device, "") {
            assert_eq!(
                debug_exit_status(qemu, value),
                bhyve_status,
                "value {value:#x}: QEMU and bhyve disagree"
            );
        }
    }
}

#[test]
fn without_pc_testdev_the_debug_exit_port_does_nothing() {
    let Some(mut vm) = boot_bhyve("") else {
        return;
    };
    let lines = vm.command("debugexit 0x10", COMMAND_TIMEOUT);
    assert_eq!(
        lines,
        ["debugexit port 0xf4 value 0x10", "debugexit: still running"]
    );
    vm.send_line("halt");
    assert_eq!(vm.wait_exit(EXIT_TIMEOUT).code(), Some(2));
}
