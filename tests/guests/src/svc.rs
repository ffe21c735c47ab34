//! Ring-3 side of the service calls. Ring 3 cannot do port I/O on software-only KVM, so each
//! port access is a trip through a short ring-0 handler. The trap instruction is chosen at boot
//! (`svc=int80` or `svc=ud2` on the command line); both reach the same dispatcher.

use crate::boot::Svc;
use core::arch::asm;
use core::sync::atomic::{AtomicBool, Ordering};

/// Set when the command line asks for `ud2` instead of `int 0x80`.
pub static USE_UD2: AtomicBool = AtomicBool::new(false);

#[inline(always)]
fn call(number: Svc, a: u64, b: u64) -> u64 {
    let result: u64;
    // SAFETY: the ring-0 dispatcher preserves every register except RAX (result) and the
    // argument/scratch registers declared clobbered here; it does not touch the user stack.
    unsafe {
        if USE_UD2.load(Ordering::Relaxed) {
            asm!(
                "ud2",
                inout("rax") number as u64 => result,
                inout("rdi") a => _,
                inout("rsi") b => _,
                out("rcx") _,
                out("rdx") _,
                options(nostack)
            );
        } else {
            asm!(
                "int 0x80",
                inout("rax") number as u64 => result,
                inout("rdi") a => _,
                inout("rsi") b => _,
                out("rcx") _,
                out("rdx") _,
                options(nostack)
            );
        }
    }
    result
}

pub fn outb(port: u16, value: u8) {
    call(Svc::Outb, port.into(), value.into());
}

pub fn inb(port: u16) -> u8 {
    call(Svc::Inb, port.into(), 0) as u8
}

pub fn outl(port: u16, value: u32) {
    call(Svc::Outl, port.into(), value.into());
}

pub fn inl(port: u16) -> u32 {
    call(Svc::Inl, port.into(), 0) as u32
}

/// Sets IF in ring 3's RFLAGS: interrupts are delivered from now on.
pub fn enable_interrupts() {
    call(Svc::EnableIrq, 0, 0);
}

/// `sti; hlt` in ring 0: returns after the next interrupt has been handled.
pub fn wait_for_interrupt() {
    call(Svc::Wait, 0, 0);
}

/// `cli; hlt`: the guest stops for good (bhyve exits with status 2).
pub fn halt() -> ! {
    call(Svc::Halt, 0, 0);
    loop {
        core::hint::spin_loop();
    }
}

/// Loads an empty IDT and raises an exception: a triple fault (bhyve exits with status 3).
pub fn triple_fault() -> ! {
    call(Svc::TripleFault, 0, 0);
    loop {
        core::hint::spin_loop();
    }
}

/// Writes bytes to COM1 (polled transmitter).
pub fn write(bytes: &[u8]) {
    if !bytes.is_empty() {
        call(Svc::Write, bytes.as_ptr() as u64, bytes.len() as u64);
    }
}

/// Moves any bytes waiting in the UART into the receive ring.
pub fn rx_poll() {
    call(Svc::RxPoll, 0, 0);
}

pub fn outw(port: u16, value: u16) {
    call(Svc::Outw, port.into(), value.into());
}

pub fn inw(port: u16) -> u16 {
    call(Svc::Inw, port.into(), 0) as u16
}
