//! `regspin`: leave known values in every general-purpose register and spin in ring 3 until
//! something outside the guest changes RAX, so a host tool can read the registers of a running
//! vCPU and write one (`bhyvectl --get-all`, `--set-rax`).

use core::arch::global_asm;

/// What RAX holds while the guest spins. Register number n (RCX 1, RDX 2, RBX 3, RBP 5,
/// RSI 6, RDI 7, R8-R15 8-15) holds 0x5eed_0000_0000_0000 | n << 8 | n.
#[no_mangle]
static REGSPIN_MARK: u64 = 0x5eed_0000_0000_a0a0;
#[no_mangle]
static mut REGSPIN_RSP: u64 = 0;

// regspin_asm() -> u64: saves the callee-saved registers, loads pattern(n) into each register,
// RAX = MARK, and loops between regspin_loop and regspin_loop_end while RAX is unchanged;
// returns the new RAX.
global_asm!(
    r#"
    .section .text, "ax"
    .global regspin_asm, regspin_loop, regspin_loop_end
regspin_asm:
    pushq %rbx
    pushq %rbp
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, REGSPIN_RSP(%rip)
    movabsq $0x5eed000000000101, %rcx
    movabsq $0x5eed000000000202, %rdx
    movabsq $0x5eed000000000303, %rbx
    movabsq $0x5eed000000000505, %rbp
    movabsq $0x5eed000000000606, %rsi
    movabsq $0x5eed000000000707, %rdi
    movabsq $0x5eed000000000808, %r8
    movabsq $0x5eed000000000909, %r9
    movabsq $0x5eed000000000a0a, %r10
    movabsq $0x5eed000000000b0b, %r11
    movabsq $0x5eed000000000c0c, %r12
    movabsq $0x5eed000000000d0d, %r13
    movabsq $0x5eed000000000e0e, %r14
    movabsq $0x5eed000000000f0f, %r15
    movabsq $0x5eed00000000a0a0, %rax
regspin_loop:
    cmpq REGSPIN_MARK(%rip), %rax
    je regspin_loop
regspin_loop_end:
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    popq %rbx
    retq
    "#,
    options(att_syntax)
);

extern "C" {
    fn regspin_asm() -> u64;
    static regspin_loop: u8;
    static regspin_loop_end: u8;
}

/// Print where the loop is and the stack pointer it runs with, spin, then print the RAX that
/// ended it.
pub fn run() {
    let (start, end) = (
        core::ptr::addr_of!(regspin_loop) as u64,
        core::ptr::addr_of!(regspin_loop_end) as u64,
    );
    println!("regspin loop={start:#x}-{end:#x} spinning");
    // SAFETY: regspin_asm follows the C calling convention and restores what it saves.
    let rax = unsafe { regspin_asm() };
    // SAFETY: written once by regspin_asm before it spun; read after it returned.
    let rsp = unsafe { core::ptr::addr_of!(REGSPIN_RSP).read_volatile() };
    println!("regspin rax={rax:#018x} rsp={rsp:#018x}");
}
