//! Ring-0 side of the guest: the two entry points, the static page tables and GDT, the IDT and
//! TSS set-up, the interrupt handlers and the service calls ring 3 uses for port I/O.
//!
//! Everything here runs at CPL 0, which on software-only KVM is emulated one instruction at a
//! time, so each path is kept to a few dozen instructions and all real work happens in ring 3.
//!
//! Entry contract:
//! - `linux_entry64` (ELF e_entry): Linux x86 64-bit boot protocol. Long mode, paging on with an
//!   identity map, interrupts off, RSI = physical address of `boot_params`.
//! - `pvh_entry32` (Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY): 32-bit protected mode, paging off,
//!   EBX = physical address of `hvm_start_info`.
//!
//! Both load our own page tables (first 4 GiB identity mapped with 2 MiB pages, user accessible)
//! and GDT, then call [`kernel_main`], which installs the IDT and TSS and drops to ring 3 at
//! `user_main` with interrupts still disabled (ring 3 turns them on with [`Svc::EnableIrq`] once
//! it has programmed the PIC).

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

/// Boot protocol the guest was entered through (value of [`BOOT_KIND`]).
pub const BOOT_LINUX: u32 = 1;
/// See [`BOOT_LINUX`].
pub const BOOT_PVH: u32 = 2;

/// Which entry point ran.
pub static BOOT_KIND: AtomicU32 = AtomicU32::new(0);
/// Physical address of `boot_params` (Linux) or `hvm_start_info` (PVH).
pub static BOOT_INFO: AtomicU64 = AtomicU64::new(0);

/// Timer interrupts (IRQ 0) taken since boot; incremented by the ring-0 handler.
#[no_mangle]
pub static TICKS: AtomicU64 = AtomicU64::new(0);
/// COM1 interrupts (IRQ 4) taken since boot.
#[no_mangle]
pub static IRQ_COM1: AtomicU64 = AtomicU64::new(0);
/// Receive ring filled by ring 0 from the UART: `RX_HEAD` is written by ring 0, `RX_TAIL` by
/// ring 3; both count bytes modulo 2^32, the slot is the count modulo 256.
#[no_mangle]
pub static RX_HEAD: AtomicU32 = AtomicU32::new(0);
#[no_mangle]
pub static RX_TAIL: AtomicU32 = AtomicU32::new(0);
/// Bytes dropped because the ring was full.
#[no_mangle]
pub static RX_DROPPED: AtomicU32 = AtomicU32::new(0);
#[no_mangle]
pub static RX_BUF: [AtomicU8; 256] = [const { AtomicU8::new(0) }; 256];

/// Selectors of our GDT. 0x10/0x18 match what the Linux boot protocol hands over, and the
/// 0x18/0x20/0x28 order is the one SYSCALL/SYSRET expect.
pub const KERNEL_CS: u16 = 0x10;
pub const USER_DS: u16 = 0x20 | 3;
pub const USER_CS: u16 = 0x28 | 3;
const TSS_SEL: u16 = 0x30;

/// Ring-0 service numbers, passed in RAX; arguments in RDI, RSI; result in RAX.
/// The numbering must match `svc_table` in the assembly below.
#[repr(u64)]
#[derive(Clone, Copy)]
pub enum Svc {
    Outb = 0,
    Inb = 1,
    Outl = 2,
    Inl = 3,
    EnableIrq = 4,
    Wait = 5,
    Halt = 6,
    TripleFault = 7,
    Write = 8,
    RxPoll = 9,
    Outw = 10,
    Inw = 11,
}

global_asm!(
    r#"
    .section .text.boot, "ax"

    /* PVH entry: 32-bit protected mode, paging off, EBX = hvm_start_info. */
    .code32
    .global pvh_entry32
pvh_entry32:
    cli
    movl %ebx, %edi
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x20, %eax               /* PAE */
    movl %eax, %cr4
    movl $0xC0000080, %ecx        /* EFER */
    rdmsr
    orl $0x100, %eax              /* LME */
    wrmsr
    lgdt boot_gdtr
    movl %cr0, %eax
    orl $0x80000001, %eax         /* PG | PE */
    movl %eax, %cr0
    ljmp $0x10, $pvh_entry64

    .code64
pvh_entry64:
    movl %edi, %edi
    movl $2, %esi
    jmp common_entry64

    /* Linux x86 64-bit boot protocol entry (ELF e_entry): RSI = boot_params. */
    .global linux_entry64
linux_entry64:
    cli
    movq %rsi, %rdi
    movl $1, %esi

common_entry64:
    movl $boot_pml4, %eax
    movq %rax, %cr3
    lgdt boot_gdtr(%rip)
    movl $0x18, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    xorl %eax, %eax
    movl %eax, %fs
    movl %eax, %gs
    leaq kernel_stack_top(%rip), %rsp
    /* CS is left as handed over: its cached descriptor is 64-bit code either way, and the
       first interrupt loads our 0x10 from the IDT. */
    call kernel_main
1:  cli
    hlt
    jmp 1b

    /* Exceptions 0-31: 16-byte stubs pushing (error code, vector) for fault_common. */
    .balign 16
    .global fault_stubs
fault_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 16
    .if (\v == 8) || ((\v >= 10) && (\v <= 14)) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
    .else
    pushq $0
    .endif
    pushq $\v
    jmp fault_common
    .endr

fault_common:
    /* Stack: vector, error, RIP, CS, RFLAGS, RSP, SS. */
    movq %rsp, %rdi
    andq $-16, %rsp
    call fault_handler
2:  cli
    hlt
    jmp 2b

    /* #UD: a ud2 from ring 3 is a service call (the alternative to int 0x80). */
    .global ud_entry
ud_entry:
    testb $3, 8(%rsp)
    jz 1f
    addq $2, (%rsp)
    jmp svc_entry
1:  pushq $0
    pushq $6
    jmp fault_common

    /* int 0x80: service call, RAX = number, RDI/RSI = arguments, RAX = result. */
    .global svc_entry
svc_entry:
    cmpq $12, %rax
    jae svc_bad
    jmpq *svc_table(,%rax,8)
svc_bad:
    movq $-1, %rax
    iretq

svc_outb:
    movl %edi, %edx
    movl %esi, %eax
    outb %al, %dx
    iretq
svc_inb:
    movl %edi, %edx
    xorl %eax, %eax
    inb %dx, %al
    iretq
svc_outw:
    movl %edi, %edx
    movl %esi, %eax
    outw %ax, %dx
    iretq
svc_inw:
    movl %edi, %edx
    xorl %eax, %eax
    inw %dx, %ax
    iretq
svc_outl:
    movl %edi, %edx
    movl %esi, %eax
    outl %eax, %dx
    iretq
svc_inl:
    movl %edi, %edx
    inl %dx, %eax
    iretq
svc_enable_irq:
    orq $0x200, 16(%rsp)          /* IF in the RFLAGS that iretq restores */
    iretq
svc_wait:
    sti
    hlt
    cli
    iretq
svc_halt:
    cli
1:  hlt
    jmp 1b
svc_triple:
    lidt null_idtr(%rip)
    ud2
svc_write:                        /* RDI = buffer, RSI = length: polled COM1 output */
    testq %rsi, %rsi
    jz 3f
1:  movl $0x3FD, %edx
    movl $100000, %ecx
2:  inb %dx, %al
    testb $0x20, %al              /* THRE */
    jnz 4f
    decl %ecx
    jnz 2b
4:  movb (%rdi), %al
    movl $0x3F8, %edx
    outb %al, %dx
    incq %rdi
    decq %rsi
    jnz 1b
3:  iretq
svc_rx_poll:
    call rx_drain
    iretq

    /* Moves received bytes from COM1 into RX_BUF; at most 64 per call so that a missing
       UART (reads 0xFF) cannot keep ring 0 busy. Clobbers RAX, RCX, RDX. */
rx_drain:
    movl $64, %ecx
1:  movl $0x3FD, %edx
    inb %dx, %al
    testb $1, %al                 /* data ready */
    jz 3f
    movl $0x3F8, %edx
    inb %dx, %al
    movl RX_HEAD(%rip), %edx
    subl RX_TAIL(%rip), %edx
    cmpl $256, %edx
    jae 2f
    movl RX_HEAD(%rip), %edx
    andl $255, %edx
    movb %al, RX_BUF(%rdx)
    incl RX_HEAD(%rip)
    decl %ecx
    jnz 1b
    ret
2:  incl RX_DROPPED(%rip)
    decl %ecx
    jnz 1b
3:  ret

    .global irq_timer
irq_timer:
    incq TICKS(%rip)
    pushq %rax
    movb $0x20, %al
    outb %al, $0x20               /* EOI to the master PIC */
    popq %rax
    iretq

    .global irq_com1
irq_com1:
    pushq %rax
    pushq %rcx
    pushq %rdx
    incq IRQ_COM1(%rip)
    call rx_drain
    movb $0x20, %al
    outb %al, $0x20
    popq %rdx
    popq %rcx
    popq %rax
    iretq

    .global irq_ignore
irq_ignore:
    iretq

    .section .rodata.svc_table, "a"
    .balign 8
svc_table:
    .quad svc_outb, svc_inb, svc_outl, svc_inl, svc_enable_irq, svc_wait
    .quad svc_halt, svc_triple, svc_write, svc_rx_poll, svc_outw, svc_inw

    .section .note.Xen, "a"
    .balign 4
    .long 4                       /* name size */
    .long 8                       /* descriptor size */
    .long 18                      /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad pvh_entry32

    /* Identity map of the first 4 GiB with 2 MiB pages, present|writable|user; the top GiB
       (MMIO: IOAPIC, LAPIC) uncached. */
    .section .data.pagetables, "aw"
    .balign 4096
    .global boot_pml4
boot_pml4:
    .quad boot_pdpt + 0x7
    .fill 511, 8, 0
boot_pdpt:
    .quad boot_pd + 0x0000 + 0x7
    .quad boot_pd + 0x1000 + 0x7
    .quad boot_pd + 0x2000 + 0x7
    .quad boot_pd + 0x3000 + 0x7
    .fill 508, 8, 0
boot_pd:
    .set pde, 0x87
    .rept 1536
    .quad pde
    .set pde, pde + 0x200000
    .endr
    .rept 512
    .quad pde | 0x18
    .set pde, pde + 0x200000
    .endr

    .section .data.gdt, "aw"
    .balign 16
    .global boot_gdt
boot_gdt:
    .quad 0                       /* 0x00 null */
    .quad 0x00cf9a000000ffff      /* 0x08 32-bit code (unused) */
    .quad 0x00af9a000000ffff      /* 0x10 64-bit code, DPL 0 */
    .quad 0x00cf92000000ffff      /* 0x18 data, DPL 0 */
    .quad 0x00cff2000000ffff      /* 0x20 data, DPL 3 */
    .quad 0x00affa000000ffff      /* 0x28 64-bit code, DPL 3 */
    .global boot_gdt_tss
boot_gdt_tss:
    .quad 0, 0                    /* 0x30 TSS, filled in by kernel_main */
boot_gdt_end:
    .balign 8
boot_gdtr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt
null_idtr:
    .word 0
    .quad 0

    .section .bss.stacks, "aw", @nobits
    .balign 4096
    .space 16384
    .global kernel_stack_top
kernel_stack_top:
    .space 65536
    .global user_stack_top
user_stack_top:
    "#,
    options(att_syntax)
);

extern "C" {
    static fault_stubs: u8;
    static ud_entry: u8;
    static svc_entry: u8;
    static irq_timer: u8;
    static irq_com1: u8;
    static irq_ignore: u8;
    static irq_sci: u8;
    static irq_hpet: u8;
    static mut boot_gdt_tss: [u64; 2];
    static kernel_stack_top: u8;
    static user_stack_top: u8;
    static __image_end: u8;
}

/// Vectors the PIC is programmed to (IRQ n → `PIC_VECTOR_BASE + n`).
pub const PIC_VECTOR_BASE: u8 = 0x20;
const SVC_VECTOR: usize = 0x80;

#[repr(C, align(16))]
struct Idt([[u64; 2]; 256]);

#[repr(C, align(16))]
struct Tss([u32; 26]);

static mut IDT: Idt = Idt([[0; 2]; 256]);
static mut TSS: Tss = Tss([0; 26]);

/// Base and limit of the IDT, which every CPU shares.
pub fn idt_region() -> (u64, u16) {
    (
        core::ptr::addr_of!(IDT) as u64,
        (core::mem::size_of::<Idt>() - 1) as u16,
    )
}

/// End of the loaded image (page aligned): memory below it is not free.
pub fn image_end() -> u64 {
    core::ptr::addr_of!(__image_end) as u64
}

fn gate(handler: u64, dpl: u64) -> [u64; 2] {
    let low = (handler & 0xffff)
        | (u64::from(KERNEL_CS) << 16)
        | ((0x8e | (dpl << 5)) << 40)
        | (((handler >> 16) & 0xffff) << 48);
    [low, handler >> 32]
}

/// Ring-0 set-up called by the entry code: IDT, TSS, then `iretq` to ring 3.
#[no_mangle]
extern "C" fn kernel_main(info: u64, kind: u32) -> ! {
    BOOT_INFO.store(info, Ordering::Relaxed);
    BOOT_KIND.store(kind, Ordering::Relaxed);
    // SAFETY: single CPU, interrupts off: nothing else touches IDT, TSS or the GDT while they are
    // built; the addresses come from symbols defined in the asm above.
    unsafe {
        let idt = &mut *core::ptr::addr_of_mut!(IDT);
        let stubs = core::ptr::addr_of!(fault_stubs) as u64;
        let ignore = gate(core::ptr::addr_of!(irq_ignore) as u64, 0);
        for (vector, entry) in idt.0.iter_mut().enumerate() {
            *entry = if vector < 32 {
                gate(stubs + 16 * vector as u64, 0)
            } else {
                ignore
            };
        }
        idt.0[6] = gate(core::ptr::addr_of!(ud_entry) as u64, 0);
        idt.0[usize::from(PIC_VECTOR_BASE)] = gate(core::ptr::addr_of!(irq_timer) as u64, 0);
        idt.0[usize::from(PIC_VECTOR_BASE) + 4] = gate(core::ptr::addr_of!(irq_com1) as u64, 0);
        idt.0[usize::from(PIC_VECTOR_BASE + crate::power::SCI_IRQ)] =
            gate(core::ptr::addr_of!(irq_sci) as u64, 0);
        idt.0[usize::from(crate::hpet::HPET_VECTOR)] =
            gate(core::ptr::addr_of!(irq_hpet) as u64, 0);
        idt.0[SVC_VECTOR] = gate(core::ptr::addr_of!(svc_entry) as u64, 3);
        let idtr: [u16; 5] = {
            let base = core::ptr::addr_of!(IDT) as u64;
            [
                (core::mem::size_of::<Idt>() - 1) as u16,
                base as u16,
                (base >> 16) as u16,
                (base >> 32) as u16,
                (base >> 48) as u16,
            ]
        };
        asm!("lidt [{}]", in(reg) idtr.as_ptr(), options(nostack));

        // TSS: RSP0 = kernel stack, I/O bitmap offset past the limit (no bitmap).
        let tss = &mut *core::ptr::addr_of_mut!(TSS);
        let rsp0 = core::ptr::addr_of!(kernel_stack_top) as u64;
        tss.0[1] = rsp0 as u32;
        tss.0[2] = (rsp0 >> 32) as u32;
        tss.0[25] = 104 << 16;
        let base = core::ptr::addr_of!(TSS) as u64;
        let limit = 103u64;
        let low = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89 << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        *core::ptr::addr_of_mut!(boot_gdt_tss) = [low, base >> 32];
        asm!("ltr {0:x}", in(reg) TSS_SEL, options(nostack));

        let user_rsp = core::ptr::addr_of!(user_stack_top) as u64 - 8;
        asm!(
            "push {ss}",
            "push {rsp}",
            "push 0x2",
            "push {cs}",
            "push {rip}",
            "iretq",
            ss = in(reg) u64::from(USER_DS),
            rsp = in(reg) user_rsp,
            cs = in(reg) u64::from(USER_CS),
            rip = in(reg) crate::user_main as *const () as u64,
            options(noreturn)
        );
    }
}

/// Frame built by `fault_common`.
#[repr(C)]
pub struct FaultFrame {
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

/// Unexpected exception: report it on COM1 straight from ring 0, then halt.
#[no_mangle]
extern "C" fn fault_handler(frame: &FaultFrame) -> ! {
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
    let mut out = crate::console::RawWriter;
    let _ = core::fmt::write(
        &mut out,
        format_args!(
            "\r\nFAULT vector={} error={:#x} rip={:#x} cs={:#x} rflags={:#x} rsp={:#x} ss={:#x} cr2={:#x}\r\n",
            frame.vector, frame.error, frame.rip, frame.cs, frame.rflags, frame.rsp, frame.ss, cr2
        ),
    );
    loop {
        // SAFETY: stopping the CPU is the intent.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}
