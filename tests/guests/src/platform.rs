//! The platform commands: ACPI tables, PCI through ECAM and BAR sizing, the PM timer and the
//! power controls. `run` returns false for a command that is not one of them.

use crate::pcicfg::{self, Access};
use crate::{acpi, parse_u64, power};

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
    println!("  poweroff              ACPI S5 soft-off");
    println!("  reset                 reset through the FADT reset register");
    println!("  powerbutton           wait for an ACPI power-button press, then power off");
    println!("  sci                   SCIs and power-button presses taken");
    println!("  debugexit <value>     write <value> to the isa-debug-exit port 0xf4");
}
