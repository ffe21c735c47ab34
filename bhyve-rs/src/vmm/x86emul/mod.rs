//! The x86 instruction emulator a backend needs when its kernel hands MMIO instructions to
//! user space (FreeBSD's `VM_EXITCODE_INST_EMUL` and `VM_EXITCODE_PAGING`): decode the
//! instruction bytes, carry out its memory accesses on the bus and update the registers and
//! flags as the processor would, then resume at RIP + length.
//!
//! - [`decode()`]: legacy prefixes (66, 67, segment overrides, F2/F3, LOCK), REX, ModRM, SIB,
//!   8/16/32-bit displacements, RIP-relative addressing, 16-, 32- and 64-bit modes, immediates
//!   and memory offsets; it gives the instruction length for the resumed RIP.
//! - [`execute()`]: the instruction against a [`Registers`] file and a [`GuestBus`]; the
//!   memory operand goes to MMIO at the exit's guest-physical address, once per access, and
//!   the implicit operands of MOVS, STOS, PUSH and POP go to RAM or MMIO wherever the page
//!   tables put them.
//! - [`paging`]: the guest page-table walk (none, 32-bit, PAE, 4- and 5-level), with the
//!   reason a translation failed and the exception the guest takes for it, and instruction
//!   fetch across pages.
//!
//! # Covered
//!
//! Every form FreeBSD's `vmm_instruction_emul.c` emulates, and the neighbours a compiler
//! emits for the same device accesses:
//!
//! | opcode | instruction | FreeBSD |
//! |---|---|---|
//! | `88`, `89`, `8A`, `8B` | MOV r/m, reg and reg, r/m | yes |
//! | `C6 /0`, `C7 /0` | MOV r/m, imm | yes |
//! | `A0`, `A1`, `A2`, `A3` | MOV acc, moffs and moffs, acc | `A1`, `A3` |
//! | `0F B6`, `0F B7`, `0F BE`, `0F BF` | MOVZX, MOVSX | not `0F BF` |
//! | `63` (64-bit mode, not with 66h) | MOVSXD | no |
//! | `00`–`3B` (`op r/m, reg`; `op reg, r/m`; byte and full size; LOCK) | ADD, OR, ADC, SBB, AND, SUB, XOR, CMP | `03`, `0B`, `23`, `2B`, `39`, `3B` |
//! | `80`, `81`, `83` /0–/7 | group 1 with an immediate | OR, AND, CMP of `81`/`83`; CMP of `80` |
//! | `84`, `85`, `F6 /0`, `F7 /0` | TEST | `F7 /0` |
//! | `0F BA /4` | BT r/m, imm8 | yes |
//! | `A4`, `A5`, `AA`, `AB` with or without REP/REPNE | MOVS, STOS | yes |
//! | `FF /6`, `8F /0` | PUSH r/m, POP r/m | yes |
//! | `0F AE /7` | CLFLUSH, CLFLUSHOPT (a one-byte read, as FreeBSD and KVM make) | yes |
//! | `VEX.LZ.0F38.W0/W1 F7` (pp = 0) | BEXTR | yes |
//!
//! LOCK is taken on the read-modify-write memory destinations (`00`–`31` r/m forms and group
//! 1 except CMP); a device sees the same read and write. Flags are computed for each
//! operation as the processor defines them (ADD, ADC, SUB, SBB, CMP: all six; AND, OR, XOR,
//! TEST: SF, ZF, PF set, CF and OF cleared, AF cleared as FreeBSD does and as KVM's emulator
//! leaves it; BT: CF only, the others untouched as FreeBSD leaves them; BEXTR: ZF from the
//! result, the others cleared as FreeBSD clears them).
//!
//! Where FreeBSD's decoder and this one part: in 64-bit mode an ES/CS/SS/DS prefix after FS
//! or GS leaves FS/GS in force (the processor's rule; FreeBSD and KVM let the last prefix
//! win); 16-bit addressing (`[bx+si]`) is decoded (FreeBSD reads every ModRM as 32/64-bit);
//! `C6`/`C7`/`F7` need their ModRM.reg extension (FreeBSD takes any); VEX `0F38 F7` is
//! BEXTR only with pp = 0 and L = 0 (FreeBSD also runs SHLX, SARX and SHRX as BEXTR);
//! LOCK is accepted (FreeBSD refuses it); instruction fetch stops at the first unmapped page
//! instead of failing when fewer than 15 bytes are mapped. MOVSXD with 66h is refused:
//! Intel's manual gives it a 16-bit source, KVM's emulator reads 32 bits.
//!
//! # How it is proved
//!
//! - `kvm_oracle_tests::every_emulated_form_matches_kvms_emulator`: every form above but
//!   BEXTR (84 forms) runs in a guest on KVM against an MMIO test device, in 64-bit code and
//!   in 32- and 16-bit code segments, with several operand sizes, registers (high-byte,
//!   REX-only), addressing modes (base, disp8/disp32, SIB, RIP-relative, absolute, moffs,
//!   every 16-bit form), LOCK, values and starting flags;
//!   operands also reach MMIO through the guest's own 4 KiB and 2 MiB pages (and 1 GiB
//!   pages where the guest's CPUID offers them) and through FS/GS bases. KVM's own emulator
//!   decides the registers, flags, RAM and MMIO accesses; the same bytes and starting
//!   registers run through this emulator with a simulated register file and a bus answering
//!   as the device did, the memory operand located by [`exec::effective_address`],
//!   [`exec::linear_address`] and [`paging::translate`] over the guest's page tables; every
//!   register, the flags the architecture defines, the RAM the instruction may touch, each
//!   MMIO access (direction, address, size, data) and the resumed RIP must match.
//!   The same test replays each instruction through the FreeBSD backend's exit handling
//!   as FreeBSD's `INST_EMUL` records (see [`crate::vmm::freebsd`]).
//! - `decode_crosscheck_tests::decoder_agrees_with_iced_x86_on_generated_encodings`: about
//!   20,000 generated encodings of the covered forms (every ModRM mode, SIB bytes,
//!   displacement sizes, legacy prefixes and REX combinations, in 64-, 32- and 16-bit modes)
//!   decoded by iced-x86 and by [`decode()`]: length, access size, register operand, memory
//!   operand (base, index, scale, displacement, segment), immediate and prefixes agree, and
//!   what iced-x86 calls invalid is refused.
//! - `cpu_oracle_tests::null_segment_prefix_leaves_fs_in_force_on_this_cpu`: the host
//!   processor settles the one rule where KVM and iced-x86 disagree.
//! - `cpu_oracle_tests::bextr_matches_this_cpu`: BEXTR, which KVM's emulator cannot run, on
//!   the host processor (800 sources and controls, 32 and 64 bits): result, ZF, CF, OF.
//! - `decode_crosscheck_tests::random_bytes_and_state_never_panic`: random bytes, registers,
//!   segments and page tables give a result or an error.
//! - `paging::tests`: the walk in every paging mode, with hand-computed expectations from
//!   the architecture manuals, accessed/dirty bits and the fault reasons and error codes.
//!
//! # Left out
//!
//! The other group 3/5/8 members (NOT, NEG, INC, DEC, BTS/BTR/BTC); XCHG, CMPXCHG;
//! LODS/SCAS/CMPS; CR0.WP, CR4.PSE and NX in the page walk (FreeBSD ignores them too).
//! Real mode and virtual-8086 mode are decoded as 16-bit code but not run on the KVM oracle
//! (its cases run in 16-bit protected-mode code segments).

pub mod decode;
pub mod exec;
pub mod paging;

#[cfg(all(test, target_os = "linux", target_arch = "x86_64"))]
mod cpu_oracle_tests;
#[cfg(test)]
mod decode_crosscheck_tests;
#[cfg(all(test, target_os = "linux"))]
mod kvm_oracle_tests;

/// A RAM image for tests' buses.
#[cfg(test)]
pub(crate) mod test_ram {
    /// Copy out of `ram`; `false` when the range is not inside it.
    pub fn read(ram: &[u8], gpa: u64, data: &mut [u8]) -> bool {
        let range = usize::try_from(gpa)
            .ok()
            .and_then(|start| Some(start..start.checked_add(data.len())?));
        match range.and_then(|r| ram.get(r)) {
            Some(src) => {
                data.copy_from_slice(src);
                true
            }
            None => false,
        }
    }

    /// Copy into `ram`; `false` when the range is not inside it.
    pub fn write(ram: &mut [u8], gpa: u64, data: &[u8]) -> bool {
        let range = usize::try_from(gpa)
            .ok()
            .and_then(|start| Some(start..start.checked_add(data.len())?));
        match range.and_then(|r| ram.get_mut(r)) {
            Some(dst) => {
                dst.copy_from_slice(data);
                true
            }
            None => false,
        }
    }
}

pub use decode::{decode, DecodeMode, Instruction, Operation};
pub use exec::{execute, Outcome};
pub use paging::{translate, Access, TranslateError};

use crate::vmm::{AccessFault, Regs, Segment, SpecialRegs};

/// The processor mode an instruction executes in (FreeBSD's `enum vm_cpu_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuMode {
    Real,
    Protected,
    /// IA-32e mode with CS.L = 0.
    Compatibility,
    /// IA-32e mode with CS.L = 1.
    Long64,
}

/// How linear addresses become physical (FreeBSD's `enum vm_paging_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagingMode {
    /// Paging off: linear = physical.
    Flat,
    /// 32-bit paging, two levels.
    Bits32,
    Pae,
    /// 4-level long-mode paging.
    Long4,
    /// 5-level long-mode paging (CR4.LA57).
    Long5,
}

/// What a page walk needs to know (FreeBSD's `struct vm_guest_paging`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paging {
    pub cr3: u64,
    pub cpl: u8,
    pub cpu_mode: CpuMode,
    pub paging_mode: PagingMode,
}

const CR0_PE: u64 = 1 << 0;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;

impl Paging {
    /// The mode of a vCPU with these control and segment registers.
    pub fn from_special_regs(sregs: &SpecialRegs) -> Paging {
        let cpu_mode = if sregs.cr0 & CR0_PE == 0 {
            CpuMode::Real
        } else if sregs.efer & EFER_LMA != 0 {
            if sregs.cs.l {
                CpuMode::Long64
            } else {
                CpuMode::Compatibility
            }
        } else {
            CpuMode::Protected
        };
        let paging_mode = if sregs.cr0 & CR0_PG == 0 {
            PagingMode::Flat
        } else if sregs.efer & EFER_LMA != 0 {
            if sregs.cr4 & CR4_LA57 != 0 {
                PagingMode::Long5
            } else {
                PagingMode::Long4
            }
        } else if sregs.cr4 & CR4_PAE != 0 {
            PagingMode::Pae
        } else {
            PagingMode::Bits32
        };
        Paging {
            cr3: sregs.cr3,
            // The CPL is SS.DPL (CS.DPL differs for conforming code segments).
            cpl: if cpu_mode == CpuMode::Real {
                0
            } else {
                sregs.ss.dpl
            },
            cpu_mode,
            paging_mode,
        }
    }

    /// How the decoder reads instructions in this mode.
    pub fn decode_mode(&self, cs: &Segment) -> DecodeMode {
        DecodeMode {
            cpu_mode: self.cpu_mode,
            cs_d: cs.db,
        }
    }
}

/// The segment registers, in encoding order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegReg {
    Es,
    Cs,
    Ss,
    Ds,
    Fs,
    Gs,
}

/// An exception the guest must take instead of the instruction completing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exception {
    pub vector: u8,
    pub error_code: Option<u32>,
    /// The faulting linear address, for a page fault.
    pub cr2: Option<u64>,
}

impl Exception {
    pub const SS: u8 = 12;
    pub const GP: u8 = 13;
    pub const PF: u8 = 14;
    pub const AC: u8 = 17;

    pub fn gp() -> Exception {
        Exception {
            vector: Self::GP,
            error_code: Some(0),
            cr2: None,
        }
    }

    pub fn ss() -> Exception {
        Exception {
            vector: Self::SS,
            error_code: Some(0),
            cr2: None,
        }
    }

    pub fn ac() -> Exception {
        Exception {
            vector: Self::AC,
            error_code: Some(0),
            cr2: None,
        }
    }

    pub fn page_fault(error_code: u32, gla: u64) -> Exception {
        Exception {
            vector: Self::PF,
            error_code: Some(error_code),
            cr2: Some(gla),
        }
    }
}

/// Why an instruction could not be emulated. The VM cannot go on with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmulError {
    #[error("the instruction bytes end after {available} bytes, inside the instruction")]
    Truncated { available: usize },
    #[error("the instruction is longer than 15 bytes")]
    TooLong,
    #[error("unsupported instruction ({what}): {}", hex(.bytes))]
    Unsupported { bytes: Vec<u8>, what: String },
    #[error("the instruction's operand is a register, so it cannot have accessed memory")]
    RegisterOperand,
    #[error("{}", .0 .0)]
    Access(AccessFault),
    #[error("{0}")]
    Translate(TranslateError),
    #[error("guest-physical address {gpa:#x} is not RAM")]
    NotRam { gpa: u64 },
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The vCPU registers the emulator reads and writes. General-purpose registers are numbered
/// as the instruction encoding numbers them (0 = RAX, 1 = RCX, … 4 = RSP, … 15 = R15).
pub trait Registers {
    fn gpr(&self, reg: u8) -> u64;
    fn set_gpr(&mut self, reg: u8, value: u64);
    fn rip(&self) -> u64;
    fn set_rip(&mut self, value: u64);
    fn rflags(&self) -> u64;
    fn set_rflags(&mut self, value: u64);
    /// A segment register with its descriptor (base, limit, type) for address checks.
    fn segment(&self, seg: SegReg) -> Segment;
    /// CR0, for alignment checking.
    fn cr0(&self) -> u64;
}

/// Where the emulator's memory accesses go: MMIO at a guest-physical address (one call per
/// access, with the access's size) and plain guest RAM for page tables, instruction bytes and
/// the RAM side of string and stack instructions.
pub trait GuestBus {
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) -> Result<(), AccessFault>;
    fn mmio_write(&mut self, gpa: u64, data: &[u8]) -> Result<(), AccessFault>;
    /// Read guest RAM; `false` when `[gpa, gpa + len)` is not all RAM.
    fn ram_read(&mut self, gpa: u64, data: &mut [u8]) -> bool;
    /// Write guest RAM; `false` when `[gpa, gpa + len)` is not all RAM.
    fn ram_write(&mut self, gpa: u64, data: &[u8]) -> bool;
}

/// A vCPU's registers held in the seam's types: read them with [`crate::vmm::Vcpu::regs`]
/// and [`crate::vmm::Vcpu::special_regs`], emulate, write `regs` back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuState {
    pub regs: Regs,
    pub sregs: SpecialRegs,
}

impl Registers for CpuState {
    fn gpr(&self, reg: u8) -> u64 {
        let r = &self.regs;
        match reg & 15 {
            0 => r.rax,
            1 => r.rcx,
            2 => r.rdx,
            3 => r.rbx,
            4 => r.rsp,
            5 => r.rbp,
            6 => r.rsi,
            7 => r.rdi,
            8 => r.r8,
            9 => r.r9,
            10 => r.r10,
            11 => r.r11,
            12 => r.r12,
            13 => r.r13,
            14 => r.r14,
            _ => r.r15,
        }
    }

    fn set_gpr(&mut self, reg: u8, value: u64) {
        let r = &mut self.regs;
        let slot = match reg & 15 {
            0 => &mut r.rax,
            1 => &mut r.rcx,
            2 => &mut r.rdx,
            3 => &mut r.rbx,
            4 => &mut r.rsp,
            5 => &mut r.rbp,
            6 => &mut r.rsi,
            7 => &mut r.rdi,
            8 => &mut r.r8,
            9 => &mut r.r9,
            10 => &mut r.r10,
            11 => &mut r.r11,
            12 => &mut r.r12,
            13 => &mut r.r13,
            14 => &mut r.r14,
            _ => &mut r.r15,
        };
        *slot = value;
    }

    fn rip(&self) -> u64 {
        self.regs.rip
    }

    fn set_rip(&mut self, value: u64) {
        self.regs.rip = value;
    }

    fn rflags(&self) -> u64 {
        self.regs.rflags
    }

    fn set_rflags(&mut self, value: u64) {
        self.regs.rflags = value;
    }

    fn segment(&self, seg: SegReg) -> Segment {
        let s = &self.sregs;
        match seg {
            SegReg::Es => s.es,
            SegReg::Cs => s.cs,
            SegReg::Ss => s.ss,
            SegReg::Ds => s.ds,
            SegReg::Fs => s.fs,
            SegReg::Gs => s.gs,
        }
    }

    fn cr0(&self) -> u64 {
        self.sregs.cr0
    }
}

/// The bus of a running VM: guest RAM plus the [`crate::vmm::ExitHandler`] serving MMIO.
pub struct ExitBus<'a> {
    pub memory: &'a crate::memory::GuestMemory,
    pub handler: &'a dyn crate::vmm::ExitHandler,
}

impl GuestBus for ExitBus<'_> {
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) -> Result<(), AccessFault> {
        self.handler.mmio_read(gpa, data)
    }

    fn mmio_write(&mut self, gpa: u64, data: &[u8]) -> Result<(), AccessFault> {
        self.handler.mmio_write(gpa, data)
    }

    fn ram_read(&mut self, gpa: u64, data: &mut [u8]) -> bool {
        self.memory.read(gpa, data).is_ok()
    }

    fn ram_write(&mut self, gpa: u64, data: &[u8]) -> bool {
        self.memory.write(gpa, data).is_ok()
    }
}

/// Decode and execute the instruction in `bytes` (what the exit gave, or what
/// [`paging::fetch_instruction`] read), whose memory operand faulted at `gpa`.
pub fn emulate(
    bytes: &[u8],
    gpa: u64,
    paging: &Paging,
    regs: &mut (impl Registers + ?Sized),
    bus: &mut (impl GuestBus + ?Sized),
) -> Result<Outcome, EmulError> {
    let cs = regs.segment(SegReg::Cs);
    let inst = decode(bytes, paging.decode_mode(&cs))?;
    execute(&inst, gpa, paging, regs, bus)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::memory::GuestMemory;
    use crate::vmm::ExitHandler;

    /// A device behind the exit handler: reads give 0x11, 0x22, ...; writes are recorded.
    #[derive(Default)]
    struct Device {
        writes: Mutex<Vec<(u64, Vec<u8>)>>,
    }

    impl ExitHandler for Device {
        fn port_read(&self, port: u16, _: &mut [u8]) -> Result<(), AccessFault> {
            Err(AccessFault(format!("port {port:#x}")))
        }
        fn port_write(&self, port: u16, _: &[u8]) -> Result<(), AccessFault> {
            Err(AccessFault(format!("port {port:#x}")))
        }
        fn mmio_read(&self, _: u64, data: &mut [u8]) -> Result<(), AccessFault> {
            for (i, d) in data.iter_mut().enumerate() {
                *d = 0x11 * (i as u8 + 1);
            }
            Ok(())
        }
        fn mmio_write(&self, gpa: u64, data: &[u8]) -> Result<(), AccessFault> {
            self.writes.lock().unwrap().push((gpa, data.to_vec()));
            Ok(())
        }
        fn msr_read(&self, _: u32, _: u32) -> Result<Option<u64>, AccessFault> {
            Ok(None)
        }
        fn msr_write(&self, _: u32, _: u32, _: u64) -> Result<bool, AccessFault> {
            Ok(false)
        }
    }

    fn flat(code: bool) -> Segment {
        Segment {
            limit: 0xffff_ffff,
            type_: if code { 0xb } else { 0x3 },
            present: true,
            db: true,
            s: true,
            g: true,
            ..Default::default()
        }
    }

    /// 32-bit protected mode without paging, flat segments.
    fn protected_cpu() -> CpuState {
        let mut cpu = CpuState::default();
        cpu.sregs.cr0 = CR0_PE;
        cpu.sregs.cs = flat(true);
        for seg in [
            &mut cpu.sregs.ds,
            &mut cpu.sregs.es,
            &mut cpu.sregs.ss,
            &mut cpu.sregs.fs,
            &mut cpu.sregs.gs,
        ] {
            *seg = flat(false);
        }
        cpu
    }

    #[test]
    fn emulate_drives_the_exit_handler_and_guest_ram() {
        let memory = GuestMemory::new(2 << 20).unwrap();
        let device = Device::default();
        let mut bus = ExitBus {
            memory: &memory,
            handler: &device,
        };
        let mut cpu = protected_cpu();
        let paging = Paging::from_special_regs(&cpu.sregs);
        assert_eq!(paging.cpu_mode, CpuMode::Protected);
        assert_eq!(paging.paging_mode, PagingMode::Flat);
        cpu.regs.rip = 0x1000;
        cpu.regs.rax = 0xdead_beef;
        cpu.regs.rbx = 0xfee0_0030;
        cpu.regs.rsp = 0x8000;

        // mov [ebx], eax
        let outcome = emulate(&[0x89, 0x03], 0xfee0_0030, &paging, &mut cpu, &mut bus);
        assert_eq!(outcome, Ok(Outcome::Completed));
        assert_eq!(cpu.regs.rip, 0x1002);
        assert_eq!(
            *device.writes.lock().unwrap(),
            vec![(0xfee0_0030, vec![0xef, 0xbe, 0xad, 0xde])]
        );

        // push dword [ebx]: the device's bytes land on the stack in RAM.
        let outcome = emulate(&[0xff, 0x33], 0xfee0_0030, &paging, &mut cpu, &mut bus);
        assert_eq!(outcome, Ok(Outcome::Completed));
        assert_eq!(cpu.regs.rsp, 0x7ffc);
        assert_eq!(memory.slice(0x7ffc, 4).unwrap(), &[0x11, 0x22, 0x33, 0x44]);

        // An instruction it does not cover is an error naming the bytes.
        let err = emulate(&[0x0f, 0x05], 0, &paging, &mut cpu, &mut bus).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unsupported instruction (opcode 0f 05): 0f 05"
        );
        // A device that refuses the access stops the instruction with its reason.
        let refusing = Refusing;
        let mut bus = ExitBus {
            memory: &memory,
            handler: &refusing,
        };
        let err = emulate(&[0x8b, 0x03], 0xfee0_0030, &paging, &mut cpu, &mut bus).unwrap_err();
        assert_eq!(err.to_string(), "Unhandled MMIO read at 0xfee00030");
        assert_eq!(cpu.regs.rip, 0x1004, "RIP stays on the failed instruction");
    }

    struct Refusing;

    impl ExitHandler for Refusing {
        fn port_read(&self, _: u16, _: &mut [u8]) -> Result<(), AccessFault> {
            Err(AccessFault("port".into()))
        }
        fn port_write(&self, _: u16, _: &[u8]) -> Result<(), AccessFault> {
            Err(AccessFault("port".into()))
        }
        fn mmio_read(&self, gpa: u64, _: &mut [u8]) -> Result<(), AccessFault> {
            Err(AccessFault(format!("Unhandled MMIO read at {gpa:#x}")))
        }
        fn mmio_write(&self, gpa: u64, _: &[u8]) -> Result<(), AccessFault> {
            Err(AccessFault(format!("Unhandled MMIO write at {gpa:#x}")))
        }
        fn msr_read(&self, _: u32, _: u32) -> Result<Option<u64>, AccessFault> {
            Ok(None)
        }
        fn msr_write(&self, _: u32, _: u32, _: u64) -> Result<bool, AccessFault> {
            Ok(false)
        }
    }

    #[test]
    fn paging_mode_follows_the_control_registers() {
        let mut sregs = SpecialRegs::default();
        assert_eq!(Paging::from_special_regs(&sregs).cpu_mode, CpuMode::Real);
        sregs.cr0 = CR0_PE | CR0_PG;
        sregs.ss.dpl = 3;
        let p = Paging::from_special_regs(&sregs);
        assert_eq!(
            (p.cpu_mode, p.paging_mode, p.cpl),
            (CpuMode::Protected, PagingMode::Bits32, 3)
        );
        sregs.cr4 = CR4_PAE;
        assert_eq!(
            Paging::from_special_regs(&sregs).paging_mode,
            PagingMode::Pae
        );
        sregs.efer = EFER_LMA;
        assert_eq!(
            Paging::from_special_regs(&sregs).cpu_mode,
            CpuMode::Compatibility
        );
        sregs.cs.l = true;
        sregs.cr4 |= CR4_LA57;
        let p = Paging::from_special_regs(&sregs);
        assert_eq!(
            (p.cpu_mode, p.paging_mode),
            (CpuMode::Long64, PagingMode::Long5)
        );
    }
}
