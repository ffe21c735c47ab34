//! ACPI fixed hardware from the guest's side: the PM timer, switching ACPI mode on through
//! SMI_CMD, S5 soft-off through PM1a control, reset through the FADT's reset register, and the
//! power button, whose SCI is taken by a short ring-0 handler (below) on the 8259 PICs.

use crate::acpi::{Acpi, Fadt};
use crate::boot::TICKS;
use crate::{console, svc};
use core::arch::global_asm;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const PM1_PWRBTN_STS: u16 = 0x0100;
const PM1_PWRBTN_EN: u16 = 0x0100;
const PM1_SCI_EN: u16 = 0x0001;
const PM1_SLP_TYP: u16 = 0x1c00;
const PM1_SLP_EN: u16 = 0x2000;
/// The PICs' edge/level control registers (one bit per IRQ).
const ELCR_PORTS: [u16; 2] = [0x4d0, 0x4d1];
/// The only IRQ whose vector the guest routes to [`irq_sci`] (the SCI on bhyve and QEMU).
pub const SCI_IRQ: u8 = 9;

/// PM1a status port the SCI handler reads and clears; 0 until `powerbutton` arms it.
#[no_mangle]
pub static SCI_PM1_STS_PORT: AtomicU32 = AtomicU32::new(0);
/// SCIs taken.
#[no_mangle]
pub static SCI_COUNT: AtomicU64 = AtomicU64::new(0);
/// SCIs that found PWRBTN_STS set (and cleared it).
#[no_mangle]
pub static SCI_PWRBTN: AtomicU64 = AtomicU64::new(0);

// The SCI (IRQ 9 on the slave PIC): read PM1 status, clear PWRBTN_STS by writing it back as 1
// and count it, so the level-triggered line drops before the EOIs.
global_asm!(
    r#"
    .section .text, "ax"
    .global irq_sci
irq_sci:
    pushq %rax
    pushq %rdx
    incq SCI_COUNT(%rip)
    movl SCI_PM1_STS_PORT(%rip), %edx
    testl %edx, %edx
    jz 1f
    inw %dx, %ax
    testw $0x100, %ax
    jz 1f
    movw $0x100, %ax
    outw %ax, %dx
    incq SCI_PWRBTN(%rip)
1:  movb $0x20, %al
    outb %al, $0xa0
    outb %al, $0x20
    popq %rdx
    popq %rax
    iretq
    "#,
    options(att_syntax)
);

fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}

/// Sleeps until `n` more timer ticks have passed.
fn sleep_ticks(n: u64) {
    let start = ticks();
    while ticks() - start < n {
        svc::wait_for_interrupt();
    }
}

fn fadt() -> Option<Fadt> {
    let fadt = Acpi::discover().and_then(|a| a.fadt);
    if fadt.is_none() {
        println!("no FADT");
    }
    fadt
}

/// `pmtimer [ms]`: counts PM timer ticks across ceil(ms*hz/1000) PIT ticks and prints
/// "pmtimer <Hz> Hz over <n> ticks of <hz> Hz"; the PIT period is the divisor `pit_init`
/// programmed over the PIT's 1193182 Hz input.
pub fn pmtimer(hz: u64, ms: u64) {
    let Some(fadt) = fadt() else { return };
    let Some(port) = fadt.pm_tmr_port() else {
        println!("pmtimer: no PM timer block");
        return;
    };
    let mask: u32 = if fadt.timer_32bit {
        u32::MAX
    } else {
        0xff_ffff
    };
    let n = (ms * hz).div_ceil(1000).max(1);
    let edge = ticks();
    while ticks() == edge {
        svc::wait_for_interrupt();
    }
    let start = ticks();
    let mut last = svc::inl(port) & mask;
    let mut counted = 0u64;
    // Read at every tick so that a 24-bit counter (4.7 s period) cannot wrap unnoticed.
    while ticks() - start < n {
        svc::wait_for_interrupt();
        let now = svc::inl(port) & mask;
        counted += u64::from(now.wrapping_sub(last) & mask);
        last = now;
    }
    let divisor = ((crate::PIT_INPUT_HZ + hz / 2) / hz).clamp(1, 65535);
    let measured = counted * crate::PIT_INPUT_HZ / (divisor * n);
    println!("pmtimer {measured} Hz over {n} ticks of {hz} Hz");
}

/// Switches ACPI mode on (ACPI_ENABLE to SMI_CMD, then waits for SCI_EN) unless it is on;
/// prints what it did. Returns whether SCI_EN is set.
fn acpi_enable(fadt: &Fadt, cnt: u16) -> bool {
    if svc::inw(cnt) & PM1_SCI_EN != 0 {
        println!("acpi mode already on");
        return true;
    }
    let Some(smi) = fadt.smi_cmd_port().filter(|_| fadt.acpi_enable != 0) else {
        println!("acpi mode off and no SMI_CMD to switch it on");
        return false;
    };
    svc::outb(smi, fadt.acpi_enable);
    for _ in 0..1000 {
        if svc::inw(cnt) & PM1_SCI_EN != 0 {
            println!("acpi mode on (smi_cmd {smi:#x} <- {:#x})", fadt.acpi_enable);
            return true;
        }
    }
    println!("acpi mode: SCI_EN still clear after writing SMI_CMD");
    false
}

/// S5 through PM1a control with SLP_TYP from the DSDT's `\_S5`: SLP_TYP first, then SLP_EN, as
/// ACPICA does. Returns only if the platform ignored it.
fn enter_s5(acpi: &Acpi, cnt: u16) {
    let Some(slp_typ) = acpi.s5_slp_typ() else {
        println!("poweroff: no \\_S5 in the DSDT");
        return;
    };
    println!("poweroff slp_typ {slp_typ}");
    let value = (svc::inw(cnt) & !(PM1_SLP_TYP | PM1_SLP_EN)) | (u16::from(slp_typ & 7) << 10);
    svc::outw(cnt, value);
    svc::outw(cnt, value | PM1_SLP_EN);
    sleep_ticks(100);
    println!("poweroff: still running");
}

fn acpi_with_pm1() -> Option<(Acpi, Fadt, u16)> {
    let Some(acpi) = Acpi::discover() else {
        println!("no RSDP");
        return None;
    };
    let Some(fadt) = acpi.fadt else {
        println!("no FADT");
        return None;
    };
    let Some(cnt) = fadt.pm1a_cnt_port() else {
        println!("no PM1a control block");
        return None;
    };
    Some((acpi, fadt, cnt))
}

/// `poweroff`: ACPI mode on if needed, then S5.
pub fn poweroff() {
    let Some((acpi, fadt, cnt)) = acpi_with_pm1() else {
        return;
    };
    if acpi_enable(&fadt, cnt) {
        enter_s5(&acpi, cnt);
    }
}

/// `reset`: the FADT's reset register (0xCF9 / 0x06 if the FADT has none).
pub fn reset() {
    let (port, value) = match fadt().and_then(|f| f.reset) {
        Some((gas, value)) if gas.space == 1 && gas.address <= 0xffff => {
            (gas.address as u16, value)
        }
        _ => (0xcf9, 0x06),
    };
    println!("reset port {port:#x} value {value:#x}");
    svc::outb(port, value);
    sleep_ticks(100);
    println!("reset: still running");
}

/// `debugexit <value>`: a 32-bit write of `value` to the isa-debug-exit port (pc-testdev under
/// bhyve, `-device isa-debug-exit,iobase=0xf4,iosize=0x04` under QEMU), which ends the VM with
/// exit status `(value << 1) | 1`.
pub fn debug_exit(value: u32) {
    const DEBUG_EXIT_PORT: u16 = 0xf4;
    println!("debugexit port {DEBUG_EXIT_PORT:#x} value {value:#x}");
    svc::outl(DEBUG_EXIT_PORT, value);
    sleep_ticks(100);
    println!("debugexit: still running");
}

/// `sci`: "sci <n> pwrbtn <m>", the SCIs taken and how many found the power button pressed.
pub fn sci_counts() {
    println!(
        "sci {} pwrbtn {}",
        SCI_COUNT.load(Ordering::Relaxed),
        SCI_PWRBTN.load(Ordering::Relaxed)
    );
}

/// `powerbutton`: ACPI mode on, PWRBTN_EN set, the SCI unmasked (level triggered), then waits
/// for a press (a key cancels the wait); on one prints "sci pwrbtn", lets half a second pass as an OS shutting down would
/// (reporting any further press), and powers off through S5.
pub fn powerbutton(hz: u64) {
    let Some((acpi, fadt, cnt)) = acpi_with_pm1() else {
        return;
    };
    let Some(evt) = fadt.pm1a_evt_port() else {
        println!("no PM1a event block");
        return;
    };
    if fadt.sci_int != u16::from(SCI_IRQ) {
        println!(
            "powerbutton: SCI on IRQ {}, only IRQ {SCI_IRQ} is wired",
            fadt.sci_int
        );
        return;
    }
    if !acpi_enable(&fadt, cnt) {
        return;
    }
    let enable = evt + 2;
    // Count presses from before the button is armed: one can arrive while "armed" is printed.
    let mut seen = SCI_PWRBTN.load(Ordering::Relaxed);
    svc::outw(evt, PM1_PWRBTN_STS);
    SCI_PM1_STS_PORT.store(evt.into(), Ordering::Relaxed);
    svc::outw(enable, svc::inw(enable) | PM1_PWRBTN_EN);

    let (elcr, bit) = (ELCR_PORTS[usize::from(SCI_IRQ / 8)], SCI_IRQ % 8);
    let trigger = svc::inb(elcr);
    println!(
        "sci irq {SCI_IRQ} found {} triggered",
        if trigger & (1 << bit) != 0 {
            "level"
        } else {
            "edge"
        }
    );
    svc::outb(elcr, trigger | (1 << bit));
    // Unmask IRQ 9 on the slave and the cascade (IRQ 2) on the master.
    svc::outb(0xa1, svc::inb(0xa1) & !(1 << (SCI_IRQ - 8)));
    svc::outb(0x21, svc::inb(0x21) & !(1 << 2));
    println!("powerbutton armed");

    while SCI_PWRBTN.load(Ordering::Relaxed) == seen {
        if console::input_pending() {
            // Any key gives up waiting; the button stays armed, presses are only counted.
            let _ = console::try_read_byte();
            println!("powerbutton cancelled");
            return;
        }
        svc::wait_for_interrupt();
    }
    let report = |seen: &mut u64| {
        while *seen < SCI_PWRBTN.load(Ordering::Relaxed) {
            *seen += 1;
            println!("sci pwrbtn");
        }
    };
    report(&mut seen);
    println!("shutting down");
    let start = ticks();
    while ticks() - start < (hz / 2).max(1) {
        svc::wait_for_interrupt();
        report(&mut seen);
    }
    enter_s5(&acpi, cnt);
}
