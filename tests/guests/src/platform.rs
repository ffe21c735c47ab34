//! The platform commands: ACPI tables, PCI through ECAM and BAR sizing, the PM timer, the
//! HPET and the power controls. `run` returns false for a command that is not one of them.

use crate::pcicfg::{self, Access};
use crate::{acpi, hpet, parse_u64, power};

pub fn run(command: &str, arg: Option<&str>, hz: u64) -> bool {
    match command {
        "acpi" => acpi::command(),
        "pci" => pcicfg::list(Access::Conf1),
        "ecam" => pcicfg::ecam(),
        "bars" => pcicfg::bars(),
        "pmtimer" => match arg.map_or(Some(2000), parse_u64) {
            Some(ms) if (10..=60_000).contains(&ms) => power::pmtimer(hz, ms),
            _ => println!("usage: pmtimer [ms]  (10..60000, default 2000)"),
        },
        "hpet" => match arg {
            Some("state") => hpet::state(),
            Some("irq") => hpet::irq(hz),
            Some(word) if word.starts_with("comparator=") => {
                match parse_u64(&word["comparator=".len()..]).and_then(|v| u32::try_from(v).ok()) {
                    Some(value) => hpet::set_comparator(value),
                    None => println!("usage: hpet comparator=<u32>"),
                }
            }
            _ => match arg.map_or(Some(2000), parse_u64) {
                Some(ms) if (10..=60_000).contains(&ms) => hpet::measure(hz, ms),
                _ => println!("usage: hpet [ms] | hpet state | hpet irq | hpet comparator=<u32>"),
            },
        },
        "poweroff" => power::poweroff(),
        "reset" => power::reset(),
        "powerbutton" => power::powerbutton(hz),
        "sci" => power::sci_counts(),
        "debugexit" => match arg.and_then(parse_u64).and_then(|v| u32::try_from(v).ok()) {
            Some(value) => power::debug_exit(value),
            None => println!("usage: debugexit <value>  (32 bits)"),
        },
        _ => return false,
    }
    true
}

pub fn help() {
    println!("  pci                   list PCI functions on bus 0 (ports 0xcf8/0xcfc)");
    println!("  ecam                  the same list read through the MCFG's ECAM window");
    println!("  bars                  size every BAR of every function on bus 0");
    println!("  acpi                  ACPI tables, checksums, FADT, DSDT, MADT, MCFG");
    println!("  pmtimer [ms]          measure the ACPI PM timer against the PIT");
    println!("  hpet [ms]             enable the HPET and measure it against the PM timer");
    println!("  hpet state            HPET configuration, counter and timer 0");
    println!("  hpet irq              HPET timer 0 interrupts through the I/O APIC");
    println!("  hpet comparator=<n>   set HPET timer 0's comparator");
    println!("  poweroff              ACPI S5 soft-off");
    println!("  reset                 reset through the FADT reset register");
    println!("  powerbutton           wait for an ACPI power-button press, then power off");
    println!("  sci                   SCIs and power-button presses taken");
    println!("  debugexit <value>     write <value> to the isa-debug-exit port 0xf4");
}
