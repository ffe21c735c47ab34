//! The console test guest under bhyve: booted through the Linux 64-bit boot protocol, driven over
//! COM1 on stdio. Needs /dev/kvm (skips with a message without it, fails if
//! BHYVE_RS_REQUIRE_KVM=1).

#[path = "common/mod.rs"]
mod common;

use common::guest;
use common::{
    assert_within_ten_percent, boot_bhyve, timed_ticks, Console, BOOT_TIMEOUT, COMMAND_TIMEOUT,
};
use std::time::{Duration, Instant};

#[test]
fn guest_boots_to_ready_line_through_linux_boot_protocol() {
    let Some(mut vm) = boot_bhyve("e2e marker=42") else {
        return;
    };
    let banner = vm.transcript();
    assert!(
        banner.contains("bhyve-rs test guest (boot=linux svc=int80 hz=100)"),
        "{banner}"
    );
    let info = vm.command("info", COMMAND_TIMEOUT);
    assert!(info.contains(&"boot linux".to_string()), "{info:?}");
    assert!(
        info.contains(&"cmdline e2e marker=42".to_string()),
        "{info:?}"
    );
    // 256 MiB of RAM: the E820 map handed over must describe (almost) all of it as usable.
    let usable: u64 = info
        .iter()
        .filter(|l| l.starts_with("e820 ") && l.ends_with(" usable"))
        .filter_map(|l| {
            let range = l.split_whitespace().nth(1)?;
            let (a, b) = range.split_once('-')?;
            let a = u64::from_str_radix(a.trim_start_matches("0x"), 16).ok()?;
            let b = u64::from_str_radix(b.trim_start_matches("0x"), 16).ok()?;
            Some(b - a + 1)
        })
        .sum();
    assert!(
        (250 << 20..=256 << 20).contains(&usable),
        "usable RAM {usable:#x} in {info:?}"
    );
}

#[test]
fn counter_increments_once_per_command() {
    let Some(mut vm) = boot_bhyve("") else {
        return;
    };
    assert_eq!(vm.command_line("counter"), "counter 1");
    assert_eq!(vm.command_line("counter"), "counter 2");
    assert_eq!(vm.command_line("counter"), "counter 3");
}

#[test]
fn help_lists_every_command_and_unknown_commands_are_reported() {
    let Some(mut vm) = boot_bhyve("") else {
        return;
    };
    let help = vm.command("help", COMMAND_TIMEOUT);
    for command in guest::COMMANDS {
        assert!(
            help.iter().any(|l| l.trim_start().starts_with(command)),
            "{command} missing from {help:?}"
        );
    }
    assert_eq!(
        vm.command_line("frobnicate"),
        "unknown command 'frobnicate', try help"
    );
}

#[test]
fn memfill_checksum_matches_host_computation() {
    let Some(mut vm) = boot_bhyve("") else {
        return;
    };
    for (mib, seed) in [(16, 42), (64, 0x1234_5678_9abc_def0)] {
        let line = vm.command_line(&format!("memfill {mib} {seed}"));
        assert_eq!(line, guest::memfill_line(mib, seed));
        let fnv = line.rsplit(' ').next().unwrap_or_default();
        assert_eq!(
            vm.command_line(&format!("memsum {mib}")),
            format!("memsum {mib} MiB fnv {fnv}")
        );
    }
}

#[test]
fn cmos_clock_reads_the_host_time() {
    let Some(mut vm) = boot_bhyve("") else {
        return;
    };
    let line = vm.command_line("cmos");
    // bhyve's RTC runs in local time unless -u; either is the host's clock.
    let skew = guest::cmos_skew_seconds(&line);
    assert!(
        skew <= 5,
        "guest clock {line:?} is {skew} s off the host clock"
    );
}

#[test]
fn timer_ticks_at_the_programmed_100_hz() {
    let Some(mut vm) = boot_bhyve("") else {
        return;
    };
    assert_within_ten_percent(timed_ticks(&mut vm, 100, 3000), 3000);
}

#[test]
fn timer_ticks_at_a_programmed_1000_hz() {
    let Some(mut vm) = boot_bhyve("hz=1000") else {
        return;
    };
    assert_within_ten_percent(timed_ticks(&mut vm, 1000, 3000), 3000);
}

#[test]
fn count_prints_every_100_ms_until_a_key_and_resumes_where_it_stopped() {
    let Some(mut vm) = boot_bhyve("") else {
        return;
    };
    vm.send_line("count");
    vm.expect("count 1\n", COMMAND_TIMEOUT);
    let start = Instant::now();
    vm.expect("count 21\n", COMMAND_TIMEOUT);
    let elapsed = start.elapsed();
    assert_within_ten_percent(elapsed, 2000);
    vm.send("\n");
    let tail = vm.expect("count stopped\n", COMMAND_TIMEOUT);
    vm.expect_prompt(COMMAND_TIMEOUT);
    let last: u64 = tail
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("count ")?.parse().ok())
        .unwrap_or(21);
    vm.send_line("count");
    vm.expect(&format!("count {}\n", last + 1), COMMAND_TIMEOUT);
    vm.send("\n");
    vm.expect("count stopped\n", COMMAND_TIMEOUT);
}

#[test]
fn console_input_arrives_by_com1_interrupt() {
    let Some(mut vm) = boot_bhyve("") else {
        return;
    };
    vm.command_line("counter");
    let info = vm.command("info", COMMAND_TIMEOUT);
    let irqs: u64 = info
        .iter()
        .find_map(|l| {
            l.split("com1 irqs ")
                .nth(1)?
                .split(',')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no irq count in {info:?}"));
    assert!(irqs > 0, "typed input raised no COM1 interrupt: {info:?}");
}

#[test]
fn pci_bus_shows_the_configured_slots() {
    let Some(mut vm) = boot_bhyve("") else {
        return;
    };
    let pci = vm.command("pci", COMMAND_TIMEOUT);
    assert!(
        pci.iter()
            .any(|l| l.starts_with("pci 00:00.0 ") && l.ends_with(" class 060000")),
        "{pci:?}"
    );
    assert!(
        pci.iter()
            .any(|l| l.starts_with("pci 00:1f.0 ") && l.ends_with(" class 060100")),
        "{pci:?}"
    );
    assert_eq!(pci.len(), 2, "{pci:?}");
}

#[test]
fn service_calls_work_through_ud2_as_well_as_int_0x80() {
    let Some(mut vm) = boot_bhyve("svc=ud2") else {
        return;
    };
    assert!(vm.transcript().contains("svc=ud2"), "{}", vm.transcript());
    assert_eq!(vm.command_line("counter"), "counter 1");
    assert_eq!(vm.command_line("memfill 4 1"), guest::memfill_line(4, 1));
}

#[test]
fn guest_halt_with_interrupts_off_exits_2() {
    let Some(mut vm) = boot_bhyve("") else {
        return;
    };
    vm.send_line("halt");
    vm.expect("halting\n", COMMAND_TIMEOUT);
    let status = vm.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(2), "{status}: {}", vm.stderr());
}

#[test]
fn guest_triple_fault_exits_3() {
    let Some(mut vm) = boot_bhyve("") else {
        return;
    };
    vm.send_line("triple");
    vm.expect("triple fault\n", COMMAND_TIMEOUT);
    let status = vm.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(3), "{status}: {}", vm.stderr());
}

#[test]
fn sigterm_before_the_guest_enables_acpi_ends_the_vm_by_that_signal() {
    use std::os::unix::process::ExitStatusExt;
    let Some(mut vm) = boot_bhyve("") else {
        return;
    };
    // The test guest never switches ACPI on, so there is no power button to press: bhyve
    // tears the VM down and dies of SIGTERM, as FreeBSD's bhyve does in that state.
    assert!(vm.sigterm());
    let status = vm.wait_exit(COMMAND_TIMEOUT);
    assert_eq!(status.signal(), Some(15), "{status:?}");
}

#[test]
fn ps_shows_the_vm_as_bhyve_colon_name() {
    if !common::kvm_usable() {
        return;
    }
    let cmd = common::bhyve_command_with(guest::console_guest(), "", &[]);
    let name = common::vm_name_of(&cmd);
    let mut vm = Console::spawn("bhyve", cmd);
    vm.expect(guest::READY, BOOT_TIMEOUT);
    let out = std::process::Command::new("ps")
        .args(["-o", "args=", "-p", &vm.pid().to_string()])
        .output()
        .expect("run ps");
    let args = String::from_utf8_lossy(&out.stdout);
    assert_eq!(args.trim(), format!("bhyve: {name}"));
    // The command name stays bhyve, as pgrep and service scripts look for it.
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", vm.pid())).expect("comm");
    assert_eq!(comm.trim(), "bhyve");
}

#[test]
fn a_tcp_console_exchanges_lines_with_the_guest() {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    if !common::kvm_usable() {
        return;
    }
    let kernel = guest::console_guest();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = common::bhyve();
    cmd.args(common::CONSOLE_MACHINE);
    cmd.arg("-l").arg(format!("com1,tcp=127.0.0.1:{port}"));
    cmd.arg("-o")
        .arg(format!("boot.kernel={}", kernel.display()));
    cmd.arg(common::vm_name());
    let vm = common::Console::spawn("bhyve", cmd);

    let deadline = Instant::now() + common::BOOT_TIMEOUT;
    let mut stream = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(stream) => break stream,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("cannot connect to the console: {e}\n{}", vm.stderr()),
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // Whatever the guest printed before we connected is gone; ask until the shell answers.
    let mut transcript = Vec::new();
    let mut buf = [0u8; 256];
    let mut asked = Instant::now() - Duration::from_secs(10);
    let text = |t: &[u8]| String::from_utf8_lossy(t).replace("\r\n", "\n");
    while !text(&transcript).contains("counter\ncounter 1\n") {
        assert!(
            Instant::now() < deadline,
            "no answer over TCP: {:?}\n{}",
            text(&transcript),
            vm.stderr()
        );
        // The echo shows the guest got the line; ask again only if it never arrived.
        if !text(&transcript).contains("counter\n") && asked.elapsed() > Duration::from_secs(5) {
            stream.write_all(b"counter\n").unwrap();
            asked = Instant::now();
        }
        match stream.read(&mut buf) {
            Ok(0) => panic!("bhyve closed the console"),
            Ok(n) => transcript.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    // A second client is turned away while the first is connected.
    let mut second = TcpStream::connect(("127.0.0.1", port)).unwrap();
    second
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut refusal = String::new();
    let _ = second.read_to_string(&mut refusal);
    assert_eq!(refusal, "Socket already connected\n");
    assert_eq!(vm.transcript(), "", "nothing on stdout with a TCP console");
}

/// The `VmFlags` of the largest mapping of process `pid` (the guest's low memory).
fn largest_mapping_flags(pid: u32) -> String {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let mut best = (0u64, String::new());
    let mut size = 0u64;
    for line in smaps.lines() {
        if let Some(kib) = line.strip_prefix("Size:") {
            size = kib
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0);
        } else if let Some(flags) = line.strip_prefix("VmFlags:") {
            if size > best.0 {
                best = (size, flags.trim().to_string());
            }
        }
    }
    best.1
}

#[test]
fn dash_s_wires_guest_memory_and_dash_c_keeps_it_in_core_dumps() {
    let Some(plain) = boot_bhyve("") else {
        return;
    };
    let flags = largest_mapping_flags(plain.pid());
    assert!(flags.split(' ').any(|f| f == "dd"), "{flags}");
    assert!(!flags.split(' ').any(|f| f == "lo"), "{flags}");
    drop(plain);

    let Some(vm) = common::boot_bhyve_with(&["-S", "-C"], "") else {
        return;
    };
    let flags = largest_mapping_flags(vm.pid());
    assert!(
        flags.split(' ').any(|f| f == "lo"),
        "-S: not locked: {flags}"
    );
    assert!(
        !flags.split(' ').any(|f| f == "dd"),
        "-C: excluded from dumps: {flags}"
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.pid())).expect("status");
    let locked_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    assert!(
        locked_kib >= 256 * 1024,
        "VmLck {locked_kib} kB for 256 MiB of RAM"
    );
}
