//! Symmetric multiprocessing: the boot CPU starts every other CPU (application processor, AP)
//! with a broadcast INIT + STARTUP IPI, each AP registers itself in [`CPUS`], reports its
//! topology as CPUID describes it, and then runs a worker loop in ring 3.
//!
//! AP start-up path (ring 0 and real mode are emulated one instruction at a time on software-only
//! KVM, so everything the boot CPU can prepare from ring 3 is prepared there):
//! 1. The boot CPU, in ring 3, copies the real-mode trampoline to [`TRAMPOLINE`] (below 1 MiB,
//!    where a STARTUP IPI can point), builds a GDT for the APs (our selectors plus one TSS
//!    descriptor per slot) and one TSS per slot, and stores the IDT pointer.
//! 2. An AP starts in real mode at the trampoline, loads that GDT and our page tables, turns on
//!    PAE, long mode and paging in one go and jumps straight to 64-bit code.
//! 3. In 64-bit ring 0 it takes a slot number with `lock xadd`, switches to the slot's kernel
//!    stack, loads the IDT and its TSS, and `iretq`s to [`ap_main`] in ring 3 with interrupts off.
//! 4. In ring 3 it enables its local APIC, records CPUID, marks itself online and loops: counting
//!    while work is on, otherwise sleeping (`sti; hlt`) until the boot CPU sends [`WAKE_VECTOR`].

use crate::{boot, svc};
use core::arch::global_asm;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// CPUs the guest can run, the boot CPU included; later APs park in ring 0.
pub const MAX_CPUS: usize = 32;
/// Physical address of the real-mode trampoline (a STARTUP IPI vector is a page number below
/// 1 MiB). The memory map's free range starts far above it, so nothing else uses this page.
const TRAMPOLINE: u64 = 0x8000;
const KERNEL_STACK_SIZE: usize = 8192;
const USER_STACK_SIZE: usize = 16384;
/// Wakes a sleeping AP; its IDT entry is the shared "ignore" handler and ring 3 sends the EOI.
const WAKE_VECTOR: u32 = 0xf0;
/// First TSS selector of the AP GDT; slot n uses `AP_TSS_BASE + 16 * n`.
const AP_TSS_BASE: usize = 0x30;
const AP_GDT_SIZE: usize = AP_TSS_BASE + 16 * MAX_CPUS;

const LAPIC_BASE: u64 = 0xfee0_0000;
const LAPIC_ID: u64 = 0x20;
const LAPIC_EOI: u64 = 0xb0;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_ICR_LOW: u64 = 0x300;
const LAPIC_ICR_HIGH: u64 = 0x310;
const LAPIC_LINT0: u64 = 0x350;
const LAPIC_LINT1: u64 = 0x360;
/// ICR: destination shorthand "all excluding self", level assert.
const ICR_ALL_BUT_SELF: u32 = (0b11 << 18) | (1 << 14);
const ICR_INIT: u32 = 0b101 << 8;
const ICR_STARTUP: u32 = 0b110 << 8;
const ICR_PENDING: u32 = 1 << 12;

global_asm!(
    r#"
    /* Real-mode trampoline, copied to {trampoline} and entered at CS:IP = {trampoline}>>4:0.
       Straight from real mode to long mode: CR0.PE and CR0.PG are set together. */
    .section .rodata.ap_trampoline, "a"
    .code16
    .global ap_trampoline_start
    .global ap_trampoline_end
ap_trampoline_start:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl {trampoline} + (ap_trampoline_gdtr - ap_trampoline_start)
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x20, %eax                   /* PAE */
    movl %eax, %cr4
    movl $0xC0000080, %ecx            /* EFER */
    rdmsr
    orl $0x100, %eax                  /* LME */
    wrmsr
    movl %cr0, %eax
    andl $0x9fffffff, %eax            /* caches on: clear CD and NW left by INIT */
    orl $0x80000001, %eax             /* PG | PE */
    movl %eax, %cr0
    ljmpl $0x10, $ap_entry64
    .balign 4
ap_trampoline_gdtr:
    .word {gdt_size} - 1
    .long ap_gdt
ap_trampoline_end:
    .code64

    .section .text.ap, "ax"
ap_entry64:
    movl $0x18, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    xorl %eax, %eax
    movl %eax, %fs
    movl %eax, %gs
    movl $1, %edi
    lock xaddl %edi, ap_next_slot(%rip)
    cmpl ${max_cpus}, %edi
    jae ap_park
    leal 1(%rdi), %eax                /* stacks grow down from the end of slot's area */
    imull ${kstack}, %eax
    leaq ap_kernel_stacks(%rip), %rsp
    addq %rax, %rsp
    lidt ap_idtr(%rip)
    movl %edi, %eax
    shll $4, %eax
    addl ${tss_base}, %eax
    ltr %ax
    pushq ${user_ds}
    leal 1(%rdi), %eax
    imull ${ustack}, %eax
    leaq ap_user_stacks - 8(%rip), %rcx
    addq %rcx, %rax
    pushq %rax
    pushq $2                          /* RFLAGS: interrupts off */
    pushq ${user_cs}
    leaq ap_main(%rip), %rax
    pushq %rax
    iretq                             /* to ap_main(slot) in ring 3 */
ap_park:
    cli
    hlt
    jmp ap_park

    .section .data.ap, "aw"
    .balign 4
    .global ap_next_slot
ap_next_slot:
    .long 1
    .balign 16
    .global ap_idtr
ap_idtr:
    .fill 10, 1, 0
    .balign 16
    .global ap_gdt
ap_gdt:
    .fill {gdt_size}, 1, 0

    .section .bss.ap_stacks, "aw", @nobits
    .balign 4096
ap_kernel_stacks:
    .space {kstack} * {max_cpus}
ap_user_stacks:
    .space {ustack} * {max_cpus}
    "#,
    trampoline = const TRAMPOLINE,
    gdt_size = const AP_GDT_SIZE,
    max_cpus = const MAX_CPUS,
    kstack = const KERNEL_STACK_SIZE,
    ustack = const USER_STACK_SIZE,
    tss_base = const AP_TSS_BASE,
    user_ds = const boot::USER_DS,
    user_cs = const boot::USER_CS,
    options(att_syntax)
);

extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
    static ap_next_slot: AtomicU32;
    static mut ap_idtr: [u16; 5];
    static mut ap_gdt: [u64; AP_GDT_SIZE / 8];
    static boot_gdt: [u64; AP_TSS_BASE / 8];
    static ap_kernel_stacks: u8;
}

#[repr(C, align(16))]
struct Tss([u32; 26]);

static mut AP_TSS: [Tss; MAX_CPUS] = [const { Tss([0; 26]) }; MAX_CPUS];

/// What one CPU reported about itself, written by that CPU before it sets `online`.
pub struct Cpu {
    online: AtomicBool,
    /// Local APIC id register (bits 31:24 in xAPIC mode).
    apic_id: AtomicU32,
    /// CPUID leaf 1 EBX (initial APIC id, logical processors per package) and EDX (HTT).
    leaf1_ebx: AtomicU32,
    leaf1_edx: AtomicU32,
    /// CPUID leaf 4 subleaf 0 EAX (cores per package in 31:26); 0 without leaf 4.
    leaf4_eax: AtomicU32,
    /// Leaf 0xB: x2APIC id and the shifts to the core and package fields; `has_leaf_b` says
    /// whether the leaf describes a topology at all.
    has_leaf_b: AtomicBool,
    x2apic_id: AtomicU32,
    smt_shift: AtomicU32,
    package_shift: AtomicU32,
    /// Whether leaf 0 names AMD (or Hygon), whose topology leaves are 0x8000_0008 and
    /// 0x8000_001E; `has_amd_topology` says whether 0x8000_001E exists (TopoExt).
    amd: AtomicBool,
    has_amd_topology: AtomicBool,
    /// 0x8000_0008 ECX: NC (logical CPUs per package - 1) and ApicIdCoreIdSize.
    amd_ecx_8: AtomicU32,
    /// 0x8000_001E EAX (extended APIC id) and EBX (threads per compute unit, compute unit id).
    amd_eax_1e: AtomicU32,
    amd_ebx_1e: AtomicU32,
    /// Iterations of the worker loop; lives in guest RAM, so it survives a snapshot.
    work: AtomicU64,
    /// Set while the CPU is in its counting loop, so `work off` can wait until all have left.
    counting: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)] // only used to initialise `CPUS`
const OFFLINE: Cpu = Cpu {
    online: AtomicBool::new(false),
    apic_id: AtomicU32::new(0),
    leaf1_ebx: AtomicU32::new(0),
    leaf1_edx: AtomicU32::new(0),
    leaf4_eax: AtomicU32::new(0),
    has_leaf_b: AtomicBool::new(false),
    x2apic_id: AtomicU32::new(0),
    smt_shift: AtomicU32::new(0),
    package_shift: AtomicU32::new(0),
    amd: AtomicBool::new(false),
    has_amd_topology: AtomicBool::new(false),
    amd_ecx_8: AtomicU32::new(0),
    amd_eax_1e: AtomicU32::new(0),
    amd_ebx_1e: AtomicU32::new(0),
    work: AtomicU64::new(0),
    counting: AtomicBool::new(false),
};

/// Slot 0 is the boot CPU; APs take slots in the order they arrive.
pub static CPUS: [Cpu; MAX_CPUS] = [OFFLINE; MAX_CPUS];
/// CPUs online (boot CPU included).
static ONLINE: AtomicU32 = AtomicU32::new(0);
/// Every CPU counts in its worker loop while this is set (`work on`).
static WORK: AtomicBool = AtomicBool::new(false);
/// APs halt (`cli; hlt`) when they see this: the `halt` command stops every CPU.
static STOP: AtomicBool = AtomicBool::new(false);

pub fn lapic_read(reg: u64) -> u32 {
    // SAFETY: the LAPIC page is identity mapped, user accessible and uncached; `reg` is an
    // architectural register offset. Each CPU sees its own LAPIC at this address.
    unsafe { ((LAPIC_BASE + reg) as *const u32).read_volatile() }
}

fn lapic_write(reg: u64, value: u32) {
    // SAFETY: as in `lapic_read`.
    unsafe { ((LAPIC_BASE + reg) as *mut u32).write_volatile(value) }
}

/// Sends an IPI to every CPU but this one and waits (bounded) until the LAPIC has sent it.
fn send_ipi_to_others(command: u32) {
    lapic_write(LAPIC_ICR_HIGH, 0);
    lapic_write(LAPIC_ICR_LOW, ICR_ALL_BUT_SELF | command);
    for _ in 0..100_000 {
        if lapic_read(LAPIC_ICR_LOW) & ICR_PENDING == 0 {
            break;
        }
        core::hint::spin_loop();
    }
}

fn cpuid(leaf: u32, subleaf: u32) -> core::arch::x86_64::CpuidResult {
    #[allow(unused_unsafe)] // `__cpuid_count` is safe in newer compilers
    // SAFETY: CPUID exists on every x86-64 CPU.
    let result = unsafe { core::arch::x86_64::__cpuid_count(leaf, subleaf) };
    result
}

/// Records the calling CPU's APIC id and CPUID topology in `cpu` and marks it online.
fn register(cpu: &Cpu) {
    let leaf0 = cpuid(0, 0);
    let max_leaf = leaf0.eax;
    let leaf1 = cpuid(1, 0);
    cpu.apic_id
        .store(lapic_read(LAPIC_ID) >> 24, Ordering::Relaxed);
    cpu.leaf1_ebx.store(leaf1.ebx, Ordering::Relaxed);
    cpu.leaf1_edx.store(leaf1.edx, Ordering::Relaxed);
    if max_leaf >= 4 {
        cpu.leaf4_eax.store(cpuid(4, 0).eax, Ordering::Relaxed);
    }
    if max_leaf >= 0xb && cpuid(0xb, 0).ebx != 0 {
        // Walk the levels: the SMT level's shift gives the core field, the core level's the
        // package field. A missing core level means one core per package.
        let mut smt_shift = 0;
        let mut package_shift = None;
        for subleaf in 0..8 {
            let level = cpuid(0xb, subleaf);
            match (level.ecx >> 8) & 0xff {
                0 => break,
                1 => smt_shift = level.eax & 0x1f,
                2 => package_shift = Some(level.eax & 0x1f),
                _ => {}
            }
        }
        cpu.x2apic_id.store(cpuid(0xb, 0).edx, Ordering::Relaxed);
        cpu.smt_shift.store(smt_shift, Ordering::Relaxed);
        cpu.package_shift
            .store(package_shift.unwrap_or(smt_shift), Ordering::Relaxed);
        cpu.has_leaf_b.store(true, Ordering::Relaxed);
    }
    // "AuthenticAMD" or "HygonGenuine": EBX holds the first four letters.
    if leaf0.ebx == u32::from_le_bytes(*b"Auth") || leaf0.ebx == u32::from_le_bytes(*b"Hygo") {
        cpu.amd.store(true, Ordering::Relaxed);
        let max_extended = cpuid(0x8000_0000, 0).eax;
        if max_extended >= 0x8000_0008 {
            cpu.amd_ecx_8
                .store(cpuid(0x8000_0008, 0).ecx, Ordering::Relaxed);
        }
        const TOPOEXT: u32 = 1 << 22;
        if max_extended >= 0x8000_001e && cpuid(0x8000_0001, 0).ecx & TOPOEXT != 0 {
            let leaf = cpuid(0x8000_001e, 0);
            cpu.amd_eax_1e.store(leaf.eax, Ordering::Relaxed);
            cpu.amd_ebx_1e.store(leaf.ebx, Ordering::Relaxed);
            cpu.has_amd_topology.store(true, Ordering::Relaxed);
        }
    }
    cpu.online.store(true, Ordering::Release);
    ONLINE.fetch_add(1, Ordering::AcqRel);
}

/// Ring-3 entry of every AP (from `ap_entry64`), interrupts off.
#[no_mangle]
extern "C" fn ap_main(slot: u64) -> ! {
    // Software enable (spurious vector 0xff); the 8259's LINT0 belongs to the boot CPU alone.
    lapic_write(LAPIC_SVR, 0x1ff);
    lapic_write(LAPIC_LINT0, 1 << 16);
    lapic_write(LAPIC_LINT1, 0x400);
    let cpu = &CPUS[slot as usize];
    register(cpu);
    loop {
        if STOP.load(Ordering::Acquire) {
            svc::halt();
        }
        if WORK.load(Ordering::Relaxed) {
            // SeqCst pairs with `work off`: either it sees `counting` set, or this CPU's next
            // look at WORK sees it cleared.
            cpu.counting.store(true, Ordering::SeqCst);
            let mut n = cpu.work.load(Ordering::Relaxed);
            while WORK.load(Ordering::SeqCst) && !STOP.load(Ordering::Relaxed) {
                n += 1;
                cpu.work.store(n, Ordering::Relaxed);
            }
            cpu.counting.store(false, Ordering::SeqCst);
        } else {
            svc::wait_for_interrupt();
            lapic_write(LAPIC_EOI, 0);
        }
    }
}

fn ticks() -> u64 {
    boot::TICKS.load(Ordering::Relaxed)
}

/// Prepares the trampoline, the APs' GDT, TSSs and IDT pointer. Ring 3: the whole image and low
/// memory are mapped user writable.
fn prepare_trampoline() {
    // SAFETY: nothing runs on the APs yet, so the boot CPU is the only user of the trampoline
    // page, `ap_gdt`, `ap_idtr` and `AP_TSS`; all lie in identity-mapped, user-writable RAM,
    // and the copy stays within the trampoline's own bytes.
    unsafe {
        let start = core::ptr::addr_of!(ap_trampoline_start);
        let len = core::ptr::addr_of!(ap_trampoline_end) as usize - start as usize;
        core::ptr::copy_nonoverlapping(start, TRAMPOLINE as *mut u8, len);

        let gdt = &mut *core::ptr::addr_of_mut!(ap_gdt);
        gdt[..AP_TSS_BASE / 8].copy_from_slice(&*core::ptr::addr_of!(boot_gdt));
        let tss = &mut *core::ptr::addr_of_mut!(AP_TSS);
        let stacks = core::ptr::addr_of!(ap_kernel_stacks) as u64;
        for (slot, tss) in tss.iter_mut().enumerate().skip(1) {
            let rsp0 = stacks + ((slot + 1) * KERNEL_STACK_SIZE) as u64;
            tss.0[1] = rsp0 as u32;
            tss.0[2] = (rsp0 >> 32) as u32;
            tss.0[25] = 104 << 16; // I/O bitmap offset past the limit: no bitmap
            let base = tss as *const Tss as u64;
            let limit = 103u64;
            let low = limit
                | ((base & 0xff_ffff) << 16)
                | (0x89 << 40) // present, 64-bit TSS (available)
                | (((base >> 24) & 0xff) << 56);
            let index = (AP_TSS_BASE + 16 * slot) / 8;
            gdt[index] = low;
            gdt[index + 1] = base >> 32;
        }
        let (base, limit) = boot::idt_region();
        *core::ptr::addr_of_mut!(ap_idtr) = [
            limit,
            base as u16,
            (base >> 16) as u16,
            (base >> 32) as u16,
            (base >> 48) as u16,
        ];
    }
}

/// Starts every AP and prints `cpu <n> apic <id> online` for each CPU and `cpus <N> online`.
/// Interrupts must be on (the waits count timer ticks).
pub fn start(hz: u64) {
    register(&CPUS[0]);
    let expected = madt_cpu_count();
    if expected != Some(1) {
        prepare_trampoline();
        send_ipi_to_others(ICR_INIT);
        // INIT wants some 10 ms before the STARTUP IPIs; the second STARTUP covers a lost
        // first one and is ignored by a CPU already running.
        let edge = ticks();
        while ticks() < edge + 1 + hz / 100 {
            svc::wait_for_interrupt();
        }
        let vector = (TRAMPOLINE >> 12) as u32;
        send_ipi_to_others(ICR_STARTUP | vector);
        send_ipi_to_others(ICR_STARTUP | vector);
        wait_for_aps(expected, hz);
    }
    let arrived = arrivals();
    for (n, cpu) in CPUS.iter().enumerate() {
        if cpu.online.load(Ordering::Acquire) {
            println!(
                "cpu {n} apic {} online",
                cpu.apic_id.load(Ordering::Relaxed)
            );
        }
    }
    let online = ONLINE.load(Ordering::Acquire);
    match expected {
        Some(want) if want != online => println!("cpus {online} online, {want} expected"),
        _ => println!("cpus {online} online"),
    }
    if arrived > MAX_CPUS as u32 {
        println!(
            "cpus: {} CPUs beyond the first {MAX_CPUS} parked",
            arrived - MAX_CPUS as u32
        );
    }
}

/// CPUs that entered 64-bit mode, the boot CPU included (parked ones too).
fn arrivals() -> u32 {
    // SAFETY: `ap_next_slot` is a 4-byte aligned counter in .data, only changed atomically.
    unsafe { &*core::ptr::addr_of!(ap_next_slot) }.load(Ordering::Acquire)
}

/// Waits until the MADT's count of CPUs is online (10 s at most); without a MADT, until no AP
/// has arrived for 200 ms (2 s at most).
fn wait_for_aps(expected: Option<u32>, hz: u64) {
    let start = ticks();
    let (limit, settle) = match expected {
        Some(_) => (10 * hz, 0),
        None => (2 * hz, (hz / 5).max(1)),
    };
    let mut seen = (arrivals(), ONLINE.load(Ordering::Acquire));
    let mut last_change = start;
    loop {
        let now_seen = (arrivals(), ONLINE.load(Ordering::Acquire));
        let everyone = match expected {
            Some(want) => now_seen.1 >= want.min(MAX_CPUS as u32),
            None => now_seen.1 >= now_seen.0.min(MAX_CPUS as u32),
        };
        if now_seen != seen {
            seen = now_seen;
            last_change = ticks();
        }
        if (everyone && ticks() - last_change >= settle) || ticks() - start >= limit {
            return;
        }
        svc::wait_for_interrupt();
    }
}

/// Number of enabled processors in the ACPI MADT, if the firmware tables can be found.
fn madt_cpu_count() -> Option<u32> {
    crate::acpi::Acpi::discover()?.enabled_cpus()
}

/// Topology ids of one CPU: (package, core, thread) and where the shifts came from.
fn topology(cpu: &Cpu) -> (u32, u32, u32, &'static str) {
    let (id, smt_shift, package_shift, source) = if cpu.has_leaf_b.load(Ordering::Relaxed) {
        (
            cpu.x2apic_id.load(Ordering::Relaxed),
            cpu.smt_shift.load(Ordering::Relaxed),
            cpu.package_shift.load(Ordering::Relaxed),
            "leaf 0xb",
        )
    } else if cpu.has_amd_topology.load(Ordering::Relaxed) {
        // AMD: threads per compute unit from 0x8000_001E; the package field starts at
        // ApicIdCoreIdSize, or, where that is 0, at the bits NC + 1 CPUs need.
        let ecx = cpu.amd_ecx_8.load(Ordering::Relaxed);
        let threads = ((cpu.amd_ebx_1e.load(Ordering::Relaxed) >> 8) & 0xff) + 1;
        let package_shift = match (ecx >> 12) & 0xf {
            0 => log2_ceil((ecx & 0xff) + 1),
            size => size,
        };
        (
            cpu.amd_eax_1e.load(Ordering::Relaxed),
            log2_ceil(threads),
            package_shift,
            "leaf 0x8000001e",
        )
    } else if cpu.amd.load(Ordering::Relaxed) {
        // AMD without TopoExt: NC + 1 cores per package, each of them one logical CPU.
        let ecx = cpu.amd_ecx_8.load(Ordering::Relaxed);
        let package_shift = match (ecx >> 12) & 0xf {
            0 => log2_ceil((ecx & 0xff) + 1),
            size => size,
        };
        (
            cpu.leaf1_ebx.load(Ordering::Relaxed) >> 24,
            0,
            package_shift,
            "leaf 0x80000008",
        )
    } else {
        // Leaf 1 gives the logical processors per package (with HTT), leaf 4 the cores.
        let ebx = cpu.leaf1_ebx.load(Ordering::Relaxed);
        let htt = cpu.leaf1_edx.load(Ordering::Relaxed) & (1 << 28) != 0;
        let logical = if htt { (ebx >> 16) & 0xff } else { 1 }.max(1);
        let cores = (cpu.leaf4_eax.load(Ordering::Relaxed) >> 26) + 1;
        let package_shift = log2_ceil(logical);
        (
            ebx >> 24,
            package_shift.saturating_sub(log2_ceil(cores)),
            package_shift,
            "leaf 1/4",
        )
    };
    let core_bits = package_shift.saturating_sub(smt_shift);
    (
        id.checked_shr(package_shift).unwrap_or(0),
        (id >> smt_shift.min(31)) & mask(core_bits),
        id & mask(smt_shift),
        source,
    )
}

fn mask(bits: u32) -> u32 {
    1u32.checked_shl(bits).map_or(u32::MAX, |b| b - 1)
}

fn log2_ceil(x: u32) -> u32 {
    if x <= 1 {
        0
    } else {
        32 - (x - 1).leading_zeros()
    }
}

/// `cpus`: one line per online CPU with its APIC id and CPUID-derived topology ids.
pub fn print_cpus() {
    for (n, cpu) in CPUS.iter().enumerate() {
        if !cpu.online.load(Ordering::Acquire) {
            continue;
        }
        let (package, core, thread, source) = topology(cpu);
        let ebx = cpu.leaf1_ebx.load(Ordering::Relaxed);
        print!(
            "cpu {n} apic {} package {package} core {core} thread {thread} \
             (leaf 1 apic {} logical {}, leaf 4 cores {}, ",
            cpu.apic_id.load(Ordering::Relaxed),
            ebx >> 24,
            (ebx >> 16) & 0xff,
            (cpu.leaf4_eax.load(Ordering::Relaxed) >> 26) + 1,
        );
        if cpu.amd.load(Ordering::Relaxed) {
            let ecx = cpu.amd_ecx_8.load(Ordering::Relaxed);
            print!(
                "leaf 0x80000008 nc {} idsize {}, ",
                ecx & 0xff,
                (ecx >> 12) & 0xf
            );
        }
        if cpu.has_amd_topology.load(Ordering::Relaxed) {
            let ebx = cpu.amd_ebx_1e.load(Ordering::Relaxed);
            print!(
                "leaf 0x8000001e extapic {} unit {} threads {}, ",
                cpu.amd_eax_1e.load(Ordering::Relaxed),
                ebx & 0xff,
                ((ebx >> 8) & 0xff) + 1,
            );
        }
        println!("{source})");
    }
    println!("cpus {} online", ONLINE.load(Ordering::Acquire));
}

/// `work [on|off]`: switches the worker loops, or prints every CPU's count.
pub fn work_command(arg: Option<&str>, hz: u64) {
    match arg {
        Some("on") => {
            WORK.store(true, Ordering::Release);
            send_ipi_to_others(WAKE_VECTOR);
            println!("work on");
        }
        Some("off") => {
            // Counts stand still once this answers: wait (5 s at most) for every AP to leave
            // its loop; an AP's vCPU may not be running on the host right now.
            WORK.store(false, Ordering::SeqCst);
            let busy = || {
                CPUS.iter()
                    .filter(|c| c.counting.load(Ordering::SeqCst))
                    .count()
            };
            let start = ticks();
            while busy() > 0 && ticks() - start < 5 * hz {
                svc::wait_for_interrupt();
            }
            match busy() {
                0 => println!("work off"),
                n => println!("work off, {n} cpus still counting"),
            }
        }
        None => {
            let state = if WORK.load(Ordering::Relaxed) {
                "on"
            } else {
                "off"
            };
            println!("work {state}");
            for (n, cpu) in CPUS.iter().enumerate() {
                if cpu.online.load(Ordering::Acquire) {
                    println!(
                        "cpu {n} apic {} work {}",
                        cpu.apic_id.load(Ordering::Relaxed),
                        cpu.work.load(Ordering::Relaxed)
                    );
                }
            }
        }
        Some(_) => println!("usage: work [on|off]"),
    }
}

/// What the shell does while it waits for input: sleep until the next interrupt, or, while
/// work is on, count on the boot CPU's worker counter until a tick or input arrives.
pub fn idle() {
    if !WORK.load(Ordering::Relaxed) {
        svc::wait_for_interrupt();
        return;
    }
    let counter = &CPUS[0].work;
    let mut n = counter.load(Ordering::Relaxed);
    let tick = ticks();
    while ticks() == tick
        && boot::RX_HEAD.load(Ordering::Relaxed) == boot::RX_TAIL.load(Ordering::Relaxed)
    {
        n += 1;
        counter.store(n, Ordering::Relaxed);
    }
}

/// Makes every AP halt with interrupts off (before the boot CPU does the same).
pub fn stop_others() {
    STOP.store(true, Ordering::Release);
    if ONLINE.load(Ordering::Acquire) > 1 {
        send_ipi_to_others(WAKE_VECTOR);
    }
}
