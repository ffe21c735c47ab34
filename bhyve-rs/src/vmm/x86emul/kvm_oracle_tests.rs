//! KVM's in-kernel instruction emulator as the oracle for this one. One guest runs every
//! case in turn: it loads known registers and flags, executes one instruction whose memory
//! operand lies in an MMIO window served by a recording test device, and stores its
//! registers and flags to RAM. The same bytes and starting state then run through
//! [`super::execute`] with a simulated register file and a bus that answers MMIO reads as the
//! device did; registers, flags, RAM, MMIO accesses (direction, address, size, data) and the
//! resumed RIP must match what KVM produced.
//!
//! Each instruction also runs through the FreeBSD backend's exit logic
//! ([`crate::vmm::freebsd::exits::handle_exit`]) as the exit records FreeBSD's kernel would
//! give for it (`INST_EMUL`, or `INOUT`/`INOUT_STR` for the port I/O cases, which only this
//! path runs; see [`crate::vmm::freebsd::replay`]), with the same comparisons.
//!
//! Cases run in 64-bit code, then in a 32-bit and a 16-bit code segment reached by far
//! jumps (the guest loads its own GDT); memory operands reach the window directly, through
//! page tables the test adds (4 KiB, 2 MiB and, where the guest's CPUID offers them, 1 GiB
//! pages), through FS/GS bases, and in 16-bit code through DS and ES based at the window.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::decode::{decode, AluOp};
use super::exec::{execute, operand_linear_address, Outcome, RFLAGS_STATUS};
use super::exec::{RFLAGS_AF, RFLAGS_CF, RFLAGS_DF, RFLAGS_OF, RFLAGS_PF, RFLAGS_SF, RFLAGS_ZF};
use super::paging::{translate, Access};
use super::{CpuState, GuestBus, Paging};
use crate::bus::BusDevice;
use crate::machine::kvm_tests::{hypervisor, long_mode_machine, run_to_end, GUEST_BASE};
use crate::vcpu::ExitReason;
use crate::vmm::freebsd::replay::replay_instruction;
use crate::vmm::{AccessFault, ExitHandler};

/// The MMIO window (reachable RIP-relative from the code at 2 MiB).
const MMIO_BASE: u64 = 0x4000_0000;
const MMIO_LEN: u64 = 0x1_0000;
/// The guest announces each case on this port.
const MARKER_PORT: u64 = 0xe0;
/// Ports of the test device for the port I/O cases (which only the FreeBSD replay runs).
const PORT_BASE: u64 = 0xe8;
const PORT_LEN: u64 = 8;
/// Per-case register dumps (17 quadwords: the 16 GPRs, then RFLAGS).
const DUMP_BASE: u64 = 0x60_0000;
const DUMP_STRIDE: u64 = 0x100;
/// Per-case RAM the instruction may touch (stack, MOVS buffers), filled with a pattern.
const SCRATCH_BASE: u64 = 0x80_0000;
const SCRATCH_LEN: u64 = 0x100;
/// Per-case stack for setting and reading RFLAGS, never compared.
const FLAGS_STACK_BASE: u64 = 0xc0_0000;

const RAM_SIZE: u64 = 16 << 20;

/// Linear windows above the boot identity map (PML4 entry 1 and up), mapped onto the MMIO
/// window by page tables the test writes: 4 KiB pages in shuffled order, a 2 MiB page, and a
/// 1 GiB page.
const LINEAR_4K: u64 = 0x80_0000_0000;
const LINEAR_2M: u64 = 0x80_0020_0000;
const LINEAR_1G: u64 = 0x80_4000_0000;
/// Where the test's page tables live (PDPT, PD, PT).
const TABLES: u64 = 0xd0_0000;
/// The 4 KiB page of the window that linear page `i` of `LINEAR_4K` maps to.
fn shuffled_page(i: u64) -> u64 {
    (i * 5 + 3) % 16
}

/// Page tables for the linear windows, hooked into the boot PML4 at `cr3`.
fn write_page_tables(memory: &crate::memory::GuestMemory, cr3: u64) {
    const P_RW: u64 = 0x3;
    const PS: u64 = 0x80;
    let (pdpt, pd, pt) = (TABLES, TABLES + 0x1000, TABLES + 0x2000);
    memory.write_u64(cr3 + 8, pdpt | P_RW).unwrap();
    memory.write_u64(pdpt, pd | P_RW).unwrap();
    memory.write_u64(pdpt + 8, MMIO_BASE | PS | P_RW).unwrap();
    memory.write_u64(pd, pt | P_RW).unwrap();
    memory.write_u64(pd + 8, MMIO_BASE | PS | P_RW).unwrap();
    for i in 0..16 {
        let frame = MMIO_BASE + 0x1000 * shuffled_page(i);
        memory.write_u64(pt + 8 * i, frame | P_RW).unwrap();
    }
}

/// What the test device answers at `gpa` for a read of `len` bytes in a case whose device
/// value is `value`: the value's bytes, rotated by the address.
fn device_bytes(value: u64, gpa: u64, len: usize) -> Vec<u8> {
    let v = value.to_le_bytes();
    (0..len).map(|i| v[((gpa as usize) + i) & 7]).collect()
}

fn scratch_byte(case: usize, offset: u64) -> u8 {
    (case as u64 * 7 + offset * 13 + 0x5a) as u8
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum MmioAccess {
    Read { gpa: u64, data: Vec<u8> },
    Write { gpa: u64, data: Vec<u8> },
    PortIn { port: u64, data: Vec<u8> },
    PortOut { port: u64, data: Vec<u8> },
}

/// The device on both buses: the marker port selects the case, the MMIO window answers and
/// records.
struct OracleDevice {
    values: Vec<u64>,
    case: usize,
    log: Vec<(usize, MmioAccess)>,
}

impl BusDevice for OracleDevice {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        if base == PORT_BASE {
            let port = base + offset;
            let value = self.values.get(self.case).copied().unwrap_or(0);
            data.copy_from_slice(&device_bytes(value, port, data.len()));
            self.log.push((
                self.case,
                MmioAccess::PortIn {
                    port,
                    data: data.to_vec(),
                },
            ));
            return;
        }
        if base != MMIO_BASE {
            data.fill(0xff);
            return;
        }
        let gpa = base + offset;
        let value = self.values.get(self.case).copied().unwrap_or(0);
        data.copy_from_slice(&device_bytes(value, gpa, data.len()));
        self.log.push((
            self.case,
            MmioAccess::Read {
                gpa,
                data: data.to_vec(),
            },
        ));
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        if base == MARKER_PORT {
            let mut raw = [0u8; 4];
            let n = data.len().min(4);
            raw[..n].copy_from_slice(&data[..n]);
            self.case = u32::from_le_bytes(raw) as usize;
            return;
        }
        if base == PORT_BASE {
            self.log.push((
                self.case,
                MmioAccess::PortOut {
                    port: base + offset,
                    data: data.to_vec(),
                },
            ));
            return;
        }
        self.log.push((
            self.case,
            MmioAccess::Write {
                gpa: base + offset,
                data: data.to_vec(),
            },
        ));
    }
}

/// One instruction to run on KVM and on the emulator.
#[derive(Debug, Clone)]
struct Case {
    /// The instruction form ("81 /7"), counted for coverage.
    form: String,
    bytes: Vec<u8>,
    /// `(offset of a RIP-relative disp32 in bytes, target address)`, patched at assembly.
    rip_patch: Option<(usize, u64)>,
    gprs: [u64; 16],
    rflags: u64,
    mmio_value: u64,
    /// Flags whose value after the instruction is architecturally defined.
    defined: u64,
    /// FS and GS bases the guest loads first (by WRMSR), if the case uses them.
    segment_bases: Option<(u64, u64)>,
    /// Where KVM's emulator is known to differ from the processor (and this emulator follows
    /// the processor): its results are reported, not compared.
    divergence: Option<&'static str>,
    /// The code segment the case runs in.
    code: Code,
    /// A port I/O instruction: run only through FreeBSD's exit records (the instruction
    /// emulator has no port forms; bhyve handles them from the exit record).
    port_io: bool,
}

/// Where a case runs: 64-bit code, or a 32-bit or 16-bit code segment (compatibility mode,
/// reached by far jumps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Code {
    Long,
    Bits32,
    /// With DS and ES based at the MMIO window, as 16-bit offsets cannot reach it.
    Bits16,
}

/// `64 26` / `65 26`: in 64-bit mode the processor ignores an ES, CS, SS or DS prefix, so an
/// earlier FS or GS override stays in force (iced-x86 decodes it so, and
/// `cpu_oracle_tests::null_segment_prefix_leaves_fs_in_force_on_this_cpu` shows the
/// host CPU doing it); KVM's emulator, like FreeBSD's decoder, lets the last prefix win and
/// addresses the operand without the FS/GS base.
const NULL_PREFIX_AFTER_FS: &str =
    "a null segment prefix after FS/GS: KVM drops the FS/GS base, the CPU keeps it";

/// How the memory operand is addressed.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Base(u8),
    BaseDisp8(u8, i8),
    BaseDisp32(u8, i32),
    Sib {
        base: u8,
        index: u8,
        scale_log: u8,
        disp: i32,
    },
    Rip,
    Abs32,
    /// `mod 00, r/m 101`: RIP-relative in 64-bit mode, an absolute disp32 outside it.
    Disp32,
    /// 16-bit addressing: `r/m` (BX+SI, BX+DI, BP+SI, BP+DI, SI, DI, BP or disp16, BX) with
    /// `mod` 0, 1 (disp8) or 2 (disp16).
    Addr16 {
        rm: u8,
        md: u8,
    },
}

/// ModRM (+SIB, displacement) for `reg` and a memory operand at `target` addressed by
/// `mode`, setting the addressing registers in `gprs`. Returns (REX bits X and B, bytes,
/// offset of a RIP disp32 within the returned bytes).
fn modrm(reg: u8, mode: Mode, target: u64, gprs: &mut [u64; 16]) -> (u8, Vec<u8>, Option<usize>) {
    let r = (reg & 7) << 3;
    let mut rex = 0;
    let mut out = Vec::new();
    let mut rip = None;
    let base_bits = |b: u8, rex: &mut u8| {
        if b >= 8 {
            *rex |= 1;
        }
        b & 7
    };
    match mode {
        Mode::Base(b) => {
            gprs[usize::from(b)] = target;
            let bb = base_bits(b, &mut rex);
            if bb == 4 {
                out.extend([r | 4, 0x24]);
            } else if bb == 5 {
                out.extend([0x40 | r | 5, 0]);
            } else {
                out.push(r | bb);
            }
        }
        Mode::BaseDisp8(b, d) => {
            gprs[usize::from(b)] = target.wrapping_sub(d as i64 as u64);
            let bb = base_bits(b, &mut rex);
            if bb == 4 {
                out.extend([0x40 | r | 4, 0x24, d as u8]);
            } else {
                out.extend([0x40 | r | bb, d as u8]);
            }
        }
        Mode::BaseDisp32(b, d) => {
            gprs[usize::from(b)] = target.wrapping_sub(d as i64 as u64);
            let bb = base_bits(b, &mut rex);
            if bb == 4 {
                out.extend([0x80 | r | 4, 0x24]);
            } else {
                out.push(0x80 | r | bb);
            }
            out.extend(d.to_le_bytes());
        }
        Mode::Sib {
            base,
            index,
            scale_log,
            disp,
        } => {
            let index_value = 0x30 + u64::from(index) * 8;
            gprs[usize::from(index)] = index_value;
            gprs[usize::from(base)] = target
                .wrapping_sub(index_value << scale_log)
                .wrapping_sub(disp as i64 as u64);
            if index >= 8 {
                rex |= 2;
            }
            let bb = base_bits(base, &mut rex);
            let sib = (scale_log << 6) | ((index & 7) << 3) | bb;
            if i8::try_from(disp).is_ok() {
                out.extend([0x40 | r | 4, sib, disp as u8]);
            } else {
                out.extend([0x80 | r | 4, sib]);
                out.extend(disp.to_le_bytes());
            }
        }
        Mode::Rip => {
            out.push(r | 5);
            rip = Some(out.len());
            out.extend([0; 4]);
        }
        Mode::Disp32 => {
            out.push(r | 5);
            out.extend((target as u32).to_le_bytes());
        }
        Mode::Addr16 { rm, md } => {
            const BX: usize = 3;
            const BP: usize = 5;
            const SI: usize = 6;
            const DI: usize = 7;
            let (base, index) = match rm {
                0 => (Some(BX), Some(SI)),
                1 => (Some(BX), Some(DI)),
                2 => (Some(BP), Some(SI)),
                3 => (Some(BP), Some(DI)),
                4 => (Some(SI), None),
                5 => (Some(DI), None),
                6 if md == 0 => (None, None),
                6 => (Some(BP), None),
                _ => (Some(BX), None),
            };
            let disp: u64 = match md {
                1 => (-0x10i64) as u64,
                2 => 0x1234,
                _ if base.is_none() => target,
                _ => 0,
            };
            // Only the low 16 bits address; the junk above them must not count.
            let mut rest = target.wrapping_sub(disp);
            if let Some(i) = index {
                let value = 0x30 + 4 * i as u64;
                gprs[i] = (gprs[i] & !0xffff) | value;
                rest = rest.wrapping_sub(value);
            }
            if let Some(b) = base {
                gprs[b] = (gprs[b] & !0xffff) | (rest & 0xffff);
            }
            out.push((md << 6) | r | rm);
            match md {
                1 => out.push(disp as u8),
                2 => out.extend((disp as u16).to_le_bytes()),
                _ if base.is_none() => out.extend((disp as u16).to_le_bytes()),
                _ => {}
            }
        }
        Mode::Abs32 => {
            out.extend([r | 4, 0x25]);
            out.extend((target as u32).to_le_bytes());
        }
    }
    (rex, out, rip)
}

/// Distinct starting register values, so a wrong register shows.
fn pattern_gprs(seed: usize) -> [u64; 16] {
    let mut gprs = [0u64; 16];
    for (i, g) in gprs.iter_mut().enumerate() {
        *g = 0x8877_6655_4433_2211u64
            .rotate_left((i as u32 * 8 + seed as u32 * 3) % 64)
            .wrapping_add((i as u64) << 56)
            ^ (seed as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    gprs
}

const ALL_STATUS: u64 = RFLAGS_STATUS;
const LOGIC_DEFINED: u64 = RFLAGS_CF | RFLAGS_OF | RFLAGS_SF | RFLAGS_ZF | RFLAGS_PF;

/// Values for the register operand and the device, chosen to give zero, sign, carry, overflow
/// and auxiliary-carry results.
const VALUES: [u64; 6] = [
    0x0000_0000_0000_0000,
    0xffff_ffff_ffff_ffff,
    0x8000_0000_8000_8080,
    0x7fff_ffff_7fff_7f7f,
    0x0123_4567_89ab_cdef,
    0x0000_0001_0000_0101,
];

/// Starting RFLAGS: all status flags clear, all set.
const START_FLAGS: [u64; 2] = [0x2, 0x2 | RFLAGS_STATUS];

/// Registers usable for addressing (RSP too: it is reloaded before RFLAGS are read back).
const ADDRESSING: [Mode; 8] = [
    Mode::Base(3),
    Mode::BaseDisp8(13, -0x10),
    Mode::BaseDisp32(4, 0x1234),
    Mode::Sib {
        base: 0,
        index: 9,
        scale_log: 3,
        disp: 0x40,
    },
    Mode::Sib {
        base: 12,
        index: 5,
        scale_log: 1,
        disp: -0x5678,
    },
    Mode::Rip,
    Mode::Abs32,
    Mode::BaseDisp8(5, 0x7f),
];

/// Register operands to try: legacy, high-byte (without REX), and REX-only ones.
const REG_OPERANDS: [u8; 5] = [1, 6, 7, 10, 4];
const COMPAT_REG_OPERANDS: [u8; 5] = [1, 6, 7, 2, 4];

/// Every 16-bit addressing form: r/m 0-7 with mod 0, 1 and 2.
const ADDRESSING_16: [Mode; 24] = {
    let mut modes = [Mode::Addr16 { rm: 0, md: 0 }; 24];
    let mut i = 0;
    while i < 24 {
        modes[i] = Mode::Addr16 {
            rm: (i % 8) as u8,
            md: (i / 8) as u8,
        };
        i += 1;
    }
    modes
};

/// Addressing in 32-bit code: no REX registers; `mod 00, r/m 101` is an absolute address.
const COMPAT_ADDRESSING: [Mode; 8] = [
    Mode::Base(3),
    Mode::BaseDisp8(5, -0x10),
    Mode::BaseDisp32(4, 0x1234),
    Mode::Sib {
        base: 0,
        index: 1,
        scale_log: 3,
        disp: 0x40,
    },
    Mode::Sib {
        base: 6,
        index: 5,
        scale_log: 1,
        disp: -0x5678,
    },
    Mode::Disp32,
    Mode::Abs32,
    Mode::BaseDisp8(7, 0x7f),
];

struct Builder {
    cases: Vec<Case>,
    seed: usize,
    /// The linear address of the MMIO window's first page, and how many 4 KiB pages of it
    /// the generated operands may spread over.
    window: u64,
    window_pages: u64,
    /// Addressing modes to draw from.
    modes: &'static [Mode],
    /// A segment prefix and the base it adds (FS or GS), for the next forms.
    segment: Option<(u8, u64)>,
    segment_bases: Option<(u64, u64)>,
    /// The code to generate (outside 64-bit code: no REX, registers 0-7, 32-bit values).
    code: Code,
}

impl Builder {
    /// Cases for a ModRM form: `opcode` after optional `prefix` and REX.W, with `ext` as the
    /// ModRM.reg extension or `None` for a register operand; `imm` bytes follow.
    #[allow(clippy::too_many_arguments)]
    fn modrm_form(
        &mut self,
        form: &str,
        prefix: Option<u8>,
        rex_w: bool,
        opcode: &[u8],
        ext: Option<u8>,
        imm_len: usize,
        defined: u64,
        count: usize,
    ) {
        for k in 0..count {
            self.seed += 1;
            let seed = self.seed;
            let mut gprs = pattern_gprs(seed);
            let mode = self.modes[seed % self.modes.len()];
            let reg = match ext {
                Some(e) => e,
                None if self.code != Code::Long => COMPAT_REG_OPERANDS[(seed / 3) % 5],
                None => REG_OPERANDS[(seed / 3) % REG_OPERANDS.len()],
            };
            let reg = {
                // Keep the register operand apart from the addressing registers.
                let busy = |r: u8| match mode {
                    Mode::Base(b) | Mode::BaseDisp8(b, _) | Mode::BaseDisp32(b, _) => r == b,
                    Mode::Sib { base, index, .. } => r == base || r == index,
                    // BX, BP, SI and DI may all address memory in 16-bit forms.
                    Mode::Addr16 { .. } => (3..8).contains(&r) && r != 4,
                    _ => false,
                };
                if ext.is_none() && busy(reg) {
                    [1, 2, 0][usize::from(reg) % 3]
                } else {
                    reg
                }
            };
            let offset =
                0x1000 * (seed as u64 % self.window_pages) + 0x100 + (seed as u64 * 0x18) % 0xe00;
            // The effective address leaves room for the segment base added to it.
            let segment_base = self.segment.map_or(0, |(_, base)| base);
            let target = if self.code == Code::Bits16 {
                // An offset in DS, which is based at the MMIO window.
                offset
            } else {
                (self.window + offset).wrapping_sub(segment_base)
            };
            let (rex_xb, mut m, rip) = modrm(reg, mode, target, &mut gprs);
            let value = VALUES[(seed + k) % VALUES.len()];
            if ext.is_none() {
                gprs[usize::from(reg)] =
                    VALUES[(seed * 5 + k + 1) % VALUES.len()] ^ (seed as u64 & 0x3);
            }
            // REX.R for registers 8-15; a bare REX (0x40) sometimes, so SPL..DIL are used.
            let mut rex = rex_xb | if reg >= 8 && ext.is_none() { 4 } else { 0 };
            if rex_w {
                rex |= 8;
            }
            let force_rex = seed % 4 == 0 && self.code == Code::Long;
            assert!(
                self.code == Code::Long || rex == 0,
                "no REX outside 64-bit code"
            );
            if self.code != Code::Long {
                for g in gprs.iter_mut() {
                    *g &= 0xffff_ffff;
                }
            }
            let mut bytes = Vec::new();
            let mut divergence = None;
            if let Some((p, _)) = self.segment {
                // A null segment prefix (ES) before the override, or after it, where it
                // must not cancel it.
                match seed % 3 {
                    0 => bytes.extend([0x26, p]),
                    1 => {
                        bytes.extend([p, 0x26]);
                        divergence = Some(NULL_PREFIX_AFTER_FS);
                    }
                    _ => bytes.push(p),
                }
            }
            if let Mode::Addr16 { rm, md } = mode {
                // BP-based 16-bit forms default to SS (flat RAM): point them at DS.
                if rm == 2 || rm == 3 || (rm == 6 && md != 0) {
                    bytes.push(0x3e);
                }
            }
            if let Some(p) = prefix {
                bytes.push(p);
            }
            if rex != 0 || force_rex {
                bytes.push(0x40 | rex);
            }
            bytes.extend(opcode);
            let modrm_at = bytes.len();
            bytes.append(&mut m);
            // A full-size immediate has 2 bytes with a 16-bit operand size.
            let sixteen = (self.code == Code::Bits16) != (prefix == Some(0x66));
            let imm_len = if sixteen { imm_len.min(2) } else { imm_len };
            for i in 0..imm_len {
                bytes.push(VALUES[(seed + 2) % VALUES.len()].to_le_bytes()[i] ^ (k as u8));
            }
            let rip_patch = rip.map(|at| (modrm_at + at, target));
            self.cases.push(Case {
                form: form.to_string(),
                bytes,
                rip_patch,
                gprs,
                rflags: START_FLAGS[(seed + k) % 2],
                mmio_value: value,
                defined,
                segment_bases: self.segment_bases,
                divergence,
                code: self.code,
                port_io: false,
            });
        }
    }

    /// A form in all its operand sizes: the byte opcode (if any) and the full-size opcode
    /// with 66h, none and REX.W.
    #[allow(clippy::too_many_arguments)]
    fn sized(
        &mut self,
        name: &str,
        byte_op: Option<&[u8]>,
        full_op: Option<&[u8]>,
        ext: Option<u8>,
        imm: (usize, usize),
        defined: u64,
        count: usize,
    ) {
        if let Some(op) = byte_op {
            let form = format!("{} {}", hex(op), name);
            self.modrm_form(&form, None, false, op, ext, imm.0, defined, count);
        }
        if let Some(op) = full_op {
            let form = format!("{} {}", hex(op), name);
            self.modrm_form(&form, Some(0x66), false, op, ext, imm.1, defined, count);
            self.modrm_form(&form, None, false, op, ext, imm.1, defined, count);
            if self.code == Code::Long {
                self.modrm_form(&form, None, true, op, ext, imm.1, defined, count);
            }
        }
    }

    /// Starting registers for a case: [`pattern_gprs`], cut to 32 bits for 32-bit code.
    fn start_gprs(&self, seed: usize) -> [u64; 16] {
        let mut gprs = pattern_gprs(seed);
        if self.code != Code::Long {
            for g in gprs.iter_mut() {
                *g &= 0xffff_ffff;
            }
        }
        gprs
    }

    /// A case with hand-made bytes and registers (string, moffs and stack forms).
    fn raw(&mut self, form: &str, bytes: Vec<u8>, gprs: [u64; 16], rflags: u64) {
        self.seed += 1;
        self.cases.push(Case {
            form: form.to_string(),
            bytes,
            rip_patch: None,
            gprs,
            rflags,
            mmio_value: VALUES[self.seed % VALUES.len()] ^ 0x0f0f,
            defined: ALL_STATUS,
            segment_bases: None,
            divergence: None,
            code: self.code,
            port_io: false,
        });
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether the guest's CPUID offers 1 GiB pages (CPUID 0x80000001 EDX bit 26), read from the
/// vCPU's saved CPUID table (KVM's `kvm_cpuid_entry2` records).
fn guest_has_1g_pages(machine: &crate::machine::Machine) -> bool {
    let entry_size = std::mem::size_of::<kvm_bindings::kvm_cpuid_entry2>();
    let Ok(Ok(state)) = machine.vcpus().with_vcpu(0, |v| v.save_state()) else {
        return false;
    };
    let Some(table) = state.section("cpuid") else {
        return false;
    };
    let word = |entry: &[u8], at: usize| {
        u32::from_le_bytes([entry[at], entry[at + 1], entry[at + 2], entry[at + 3]])
    };
    table
        .chunks_exact(entry_size)
        .any(|e| word(e, 0) == 0x8000_0001 && word(e, 24) & (1 << 26) != 0)
}

/// MOV to and from memory in all operand sizes, `n` cases per size.
fn mov_forms(b: &mut Builder, n: usize) {
    for (name, byte, full) in [("MOV r/m, reg", 0x88, 0x89), ("MOV reg, r/m", 0x8a, 0x8b)] {
        b.sized(
            name,
            Some(&[byte]),
            Some(&[full]),
            None,
            (0, 0),
            ALL_STATUS,
            n,
        );
    }
}

/// The ModRM forms, each in all its operand sizes, `n` cases per size.
fn modrm_forms(b: &mut Builder, n: usize) {
    #[allow(non_snake_case)]
    let N = n;
    let ops = [
        AluOp::Add,
        AluOp::Or,
        AluOp::Adc,
        AluOp::Sbb,
        AluOp::And,
        AluOp::Sub,
        AluOp::Xor,
        AluOp::Cmp,
    ];
    for (i, op) in ops.iter().enumerate() {
        let base = (i as u8) << 3;
        let defined = match op {
            AluOp::And | AluOp::Or | AluOp::Xor => LOGIC_DEFINED,
            _ => ALL_STATUS,
        };
        let name = format!("{op:?}").to_uppercase();
        b.sized(
            &format!("{name} r/m, reg"),
            Some(&[base]),
            Some(&[base + 1]),
            None,
            (0, 0),
            defined,
            N,
        );
        b.sized(
            &format!("{name} reg, r/m"),
            Some(&[base + 2]),
            Some(&[base + 3]),
            None,
            (0, 0),
            defined,
            N,
        );
        let ext = Some(i as u8);
        if op.writes_result() {
            // LOCK on the read-modify-write memory destinations.
            let locked = format!("{:02X} {name} r/m, reg", base + 1);
            b.modrm_form(&locked, Some(0xf0), false, &[base + 1], None, 0, defined, 2);
            if b.code == Code::Long {
                b.modrm_form(&locked, Some(0xf0), true, &[base + 1], None, 0, defined, 2);
            }
            let locked = format!("81 /{i} {name} r/m, imm");
            b.modrm_form(&locked, Some(0xf0), false, &[0x81], ext, 4, defined, 2);
            let locked = format!("80 /{i} {name} r/m, imm");
            b.modrm_form(&locked, Some(0xf0), false, &[0x80], ext, 1, defined, 2);
        }
        b.sized(
            &format!("/{i} {name} r/m, imm"),
            Some(&[0x80]),
            Some(&[0x81]),
            ext,
            (1, 4),
            defined,
            N,
        );
        b.sized(
            &format!("/{i} {name} r/m, imm8"),
            None,
            Some(&[0x83]),
            ext,
            (1, 1),
            defined,
            N,
        );
    }
    b.sized(
        "TEST r/m, reg",
        Some(&[0x84]),
        Some(&[0x85]),
        None,
        (0, 0),
        LOGIC_DEFINED,
        N,
    );
    b.sized(
        "/0 TEST r/m, imm",
        Some(&[0xf6]),
        Some(&[0xf7]),
        Some(0),
        (1, 4),
        LOGIC_DEFINED,
        N,
    );
    mov_forms(b, N);
    b.sized(
        "/0 MOV r/m, imm",
        Some(&[0xc6]),
        Some(&[0xc7]),
        Some(0),
        (1, 4),
        ALL_STATUS,
        N,
    );
    b.sized(
        "MOVZX reg, r/m8",
        None,
        Some(&[0x0f, 0xb6]),
        None,
        (0, 0),
        ALL_STATUS,
        N,
    );
    b.sized(
        "MOVZX reg, r/m16",
        None,
        Some(&[0x0f, 0xb7]),
        None,
        (0, 0),
        ALL_STATUS,
        N,
    );
    b.sized(
        "MOVSX reg, r/m8",
        None,
        Some(&[0x0f, 0xbe]),
        None,
        (0, 0),
        ALL_STATUS,
        N,
    );
    b.sized(
        "MOVSX reg, r/m16",
        None,
        Some(&[0x0f, 0xbf]),
        None,
        (0, 0),
        ALL_STATUS,
        N,
    );
    // MOVSXD without 66h (with it, the decoder refuses the instruction: see `decode`).
    if b.code == Code::Long {
        b.modrm_form(
            "63 MOVSXD reg, r/m32",
            None,
            false,
            &[0x63],
            None,
            0,
            ALL_STATUS,
            N,
        );
        b.modrm_form(
            "63 MOVSXD reg, r/m32",
            None,
            true,
            &[0x63],
            None,
            0,
            ALL_STATUS,
            N,
        );
    }
    b.modrm_form(
        "0F AE /7 CLFLUSH m8",
        None,
        false,
        &[0x0f, 0xae],
        Some(7),
        0,
        ALL_STATUS,
        N,
    );
    b.modrm_form(
        "0F AE /7 CLFLUSHOPT m8",
        Some(0x66),
        false,
        &[0x0f, 0xae],
        Some(7),
        0,
        ALL_STATUS,
        N,
    );
    b.sized(
        "/4 BT r/m, imm8",
        None,
        Some(&[0x0f, 0xba]),
        Some(4),
        (1, 1),
        RFLAGS_CF | RFLAGS_ZF,
        N,
    );
}

/// MOV between the accumulator and a memory offset: 8 offset bytes in 64-bit mode, 4 with
/// 67h or in 32-bit code.
fn moffs_cases(b: &mut Builder, prefix_sets: &[&[u8]]) {
    for (op, name) in [
        (0xa0u8, "A0 MOV AL, moffs"),
        (0xa1, "A1 MOV rAX, moffs"),
        (0xa2, "A2 MOV moffs, AL"),
        (0xa3, "A3 MOV moffs, rAX"),
    ] {
        for (k, prefixes) in prefix_sets.iter().enumerate() {
            let gprs = b.start_gprs(b.seed + 100);
            let offset = 0x200 + 8 * k as u64 + u64::from(op & 1);
            let mut bytes = prefixes.to_vec();
            bytes.push(op);
            match b.code {
                // 16-bit offsets into DS, based at the MMIO window.
                Code::Bits16 => bytes.extend((offset as u16).to_le_bytes()),
                Code::Bits32 => bytes.extend(((MMIO_BASE + offset) as u32).to_le_bytes()),
                Code::Long if prefixes.contains(&0x67) => {
                    bytes.extend(((MMIO_BASE + offset) as u32).to_le_bytes())
                }
                Code::Long => bytes.extend((MMIO_BASE + offset).to_le_bytes()),
            }
            b.raw(name, bytes, gprs, START_FLAGS[k % 2]);
        }
    }
}

/// MOVS and STOS with each prefix set, for each `(source in MMIO, destination in MMIO,
/// DF)` placement (the other side in the case's scratch RAM).
fn string_cases(b: &mut Builder, prefix_sets: &[&[u8]], placements: &[(bool, bool, bool)]) {
    for (op, name) in [
        (0xa4u8, "A4 MOVSB"),
        (0xa5, "A5 MOVS"),
        (0xaa, "AA STOSB"),
        (0xab, "AB STOS"),
    ] {
        let movs = op & 0xfe == 0xa4;
        for (k, prefixes) in prefix_sets.iter().enumerate() {
            for &(src_mmio, dst_mmio, df) in placements {
                if !movs && !dst_mmio {
                    continue;
                }
                let case = b.cases.len() as u64;
                let scratch = SCRATCH_BASE + case * SCRATCH_LEN;
                let mut gprs = b.start_gprs(b.seed + 7);
                // With 67h only ECX counts: keep junk in the upper half to show it.
                gprs[1] = if prefixes.contains(&0x67) {
                    (gprs[1] & !0xffff_ffff) | 3
                } else {
                    3
                };
                let span = if df { 0x30 } else { 0x8 };
                if b.code == Code::Bits16 {
                    // SI and DI are offsets in DS and ES, both based at the MMIO window;
                    // the junk above bit 15 must not count.
                    assert!(src_mmio && dst_mmio, "16-bit string cases are MMIO to MMIO");
                    gprs[6] = (gprs[6] & !0xffff) | (0x800 + span + 8 * k as u64);
                    gprs[7] = (gprs[7] & !0xffff) | (0xa00 + span + 4 * k as u64);
                    gprs[1] = (gprs[1] & !0xffff) | 3;
                    let mut bytes = prefixes.to_vec();
                    bytes.push(op);
                    let flags = if df { 0x2 | RFLAGS_DF } else { 0x2 };
                    b.raw(name, bytes, gprs, flags);
                    continue;
                }
                gprs[6] = if src_mmio {
                    MMIO_BASE + 0x800 + span + 8 * k as u64
                } else {
                    scratch + span
                };
                gprs[7] = if dst_mmio {
                    MMIO_BASE + 0xa00 + span + 4 * k as u64
                } else {
                    scratch + 0x80 + span
                };
                let mut bytes = prefixes.to_vec();
                bytes.push(op);
                let flags = if df { 0x2 | RFLAGS_DF } else { 0x2 };
                b.raw(name, bytes, gprs, flags | ((case & 1) * RFLAGS_ZF));
            }
        }
    }
}

/// PUSH and POP with a memory operand in MMIO addressed by each of `modes`, and the stack
/// in the case's scratch RAM.
fn stack_cases(b: &mut Builder, modes: &[Mode]) {
    for (op, ext, name) in [(0xffu8, 6u8, "FF /6 PUSH r/m"), (0x8f, 0, "8F /0 POP r/m")] {
        for (k, prefix) in [None, Some(0x66u8)].into_iter().enumerate() {
            for &mode in modes {
                let case = b.cases.len() as u64;
                let mut gprs = b.start_gprs(b.seed + 11);
                let offset = 0x600 + 16 * k as u64;
                let target = match b.code {
                    Code::Bits16 => offset,
                    _ => MMIO_BASE + offset,
                };
                let (rex, m, rip) = modrm(ext, mode, target, &mut gprs);
                gprs[4] = SCRATCH_BASE + case * SCRATCH_LEN + 0x80;
                let mut bytes = Vec::new();
                bytes.extend(prefix);
                if rex != 0 {
                    bytes.push(0x40 | rex);
                }
                bytes.push(op);
                let at = bytes.len();
                bytes.extend(m);
                b.seed += 1;
                b.cases.push(Case {
                    form: name.to_string(),
                    bytes,
                    rip_patch: rip.map(|r| (at + r, target)),
                    gprs,
                    rflags: 0x2,
                    mmio_value: VALUES[b.seed % VALUES.len()] ^ 0x5a5a,
                    defined: ALL_STATUS,
                    segment_bases: None,
                    divergence: None,
                    code: b.code,
                    port_io: false,
                });
            }
        }
    }
}

/// IN and OUT (imm8 and DX ports, every size) and INS and OUTS (every size, with and
/// without REP, both directions, a count above bhyve's 16 per exit, 67h), the string side in
/// the case's scratch RAM.
fn port_cases(b: &mut Builder) {
    let long = b.code == Code::Long;
    let port = |k: usize| PORT_BASE + (k as u64 % PORT_LEN);
    let mut forms: Vec<(&str, Vec<u8>)> = Vec::new();
    for (k, (name, ops)) in [
        ("E4/E5 IN acc, imm8", [0xe4u8, 0xe5]),
        ("E6/E7 OUT imm8, acc", [0xe6, 0xe7]),
    ]
    .into_iter()
    .enumerate()
    {
        let p = port(k * 3) as u8;
        forms.push((name, vec![ops[0], p]));
        forms.push((name, vec![ops[1], p + 1]));
        forms.push((name, vec![0x66, ops[1], p + 2]));
    }
    for (name, ops) in [
        ("EC/ED IN acc, DX", [0xecu8, 0xed]),
        ("EE/EF OUT DX, acc", [0xee, 0xef]),
    ] {
        forms.push((name, vec![ops[0]]));
        forms.push((name, vec![ops[1]]));
        forms.push((name, vec![0x66, ops[1]]));
    }
    for (name, ops) in [("6C/6D INS", [0x6cu8, 0x6d]), ("6E/6F OUTS", [0x6e, 0x6f])] {
        for prefixes in [&[][..], &[0xf3], &[0xf3, 0x67], &[0x66, 0xf3]] {
            if prefixes.contains(&0x67) && !long {
                continue;
            }
            for op in ops {
                let mut bytes = prefixes.to_vec();
                bytes.push(op);
                forms.push((name, bytes));
            }
        }
    }
    for (k, (name, bytes)) in forms.into_iter().enumerate() {
        let case = b.cases.len() as u64;
        let scratch = SCRATCH_BASE + case * SCRATCH_LEN;
        let mut gprs = b.start_gprs(b.seed + 13);
        gprs[2] = (gprs[2] & !0xffff) | port(k); // DX
        let df = k % 3 == 2;
        // 20 elements: more than bhyve handles per exit. With 67h in 64-bit code only ECX,
        // ESI and EDI count: junk above them shows it.
        let start = if df { scratch + 0xf0 } else { scratch + 0x10 };
        let junk = if long && bytes.contains(&0x67) {
            gprs[1] & !0xffff_ffff
        } else {
            0
        };
        gprs[1] = junk | 20;
        gprs[6] = junk | start;
        gprs[7] = junk | start;
        b.seed += 1;
        b.cases.push(Case {
            form: name.to_string(),
            bytes,
            rip_patch: None,
            gprs,
            rflags: if df { 0x2 | RFLAGS_DF } else { 0x2 },
            mmio_value: VALUES[b.seed % VALUES.len()] ^ 0x3c3c,
            defined: ALL_STATUS,
            segment_bases: None,
            divergence: None,
            code: b.code,
            port_io: true,
        });
    }
}

fn all_cases(with_1g_pages: bool) -> Vec<Case> {
    let mut b = Builder {
        cases: Vec::new(),
        seed: 0,
        window: MMIO_BASE,
        window_pages: 1,
        modes: &ADDRESSING,
        segment: None,
        segment_bases: None,
        code: Code::Long,
    };
    modrm_forms(&mut b, 6);
    // Operands reached through the guest's own page tables: linear windows mapped onto the
    // MMIO window by 4 KiB pages (shuffled), a 2 MiB page and a 1 GiB page.
    const PAGED_MODES: [Mode; 4] = [
        Mode::Base(3),
        Mode::BaseDisp8(13, -0x10),
        Mode::Sib {
            base: 0,
            index: 9,
            scale_log: 3,
            disp: 0x40,
        },
        Mode::BaseDisp32(4, 0x1234),
    ];
    b.modes = &PAGED_MODES;
    let mut windows = vec![(LINEAR_4K, 16), (LINEAR_2M, 16)];
    if with_1g_pages {
        windows.push((LINEAR_1G, 16));
    }
    for (window, pages) in windows {
        b.window = window;
        b.window_pages = pages;
        mov_forms(&mut b, 2);
        b.sized(
            "/7 CMP r/m, imm8",
            None,
            Some(&[0x83]),
            Some(7),
            (1, 1),
            ALL_STATUS,
            2,
        );
    }
    // FS and GS overrides add their base (also after a null ES prefix).
    b.window = MMIO_BASE;
    b.window_pages = 1;
    b.modes = &ADDRESSING;
    for (prefix, fs, gs) in [
        (0x64u8, 0x1000_0000u64, 0x2000_0000u64),
        (0x65, 0x1800_0000, 0x0800_0000),
    ] {
        b.segment = Some((prefix, if prefix == 0x64 { fs } else { gs }));
        b.segment_bases = Some((fs, gs));
        mov_forms(&mut b, 3);
        b.sized(
            "ADD reg, r/m",
            Some(&[0x02]),
            Some(&[0x03]),
            None,
            (0, 0),
            ALL_STATUS,
            2,
        );
    }
    b.segment = None;
    b.segment_bases = None;

    moffs_cases(&mut b, &[&[], &[0x66], &[0x48], &[0x67]]);
    string_cases(
        &mut b,
        &[
            &[],
            &[0xf3],
            &[0xf3, 0x48],
            &[0x66, 0xf3],
            &[0xf2],
            &[0x48],
            &[0xf3, 0x67],
        ],
        &[
            (true, false, false),
            (false, true, false),
            (true, true, true),
            (false, true, true),
        ],
    );
    stack_cases(
        &mut b,
        &[
            Mode::Base(3),
            Mode::Sib {
                base: 1,
                index: 2,
                scale_log: 2,
                disp: 8,
            },
            Mode::Rip,
        ],
    );
    port_cases(&mut b);

    // The same forms in a 32-bit code segment (compatibility mode): 32-bit operands and
    // addresses by default, 66h for 16-bit operands, no REX; string, moffs and stack forms
    // with ESI, EDI, ECX and ESP.
    b.code = Code::Bits32;
    b.modes = &COMPAT_ADDRESSING;
    modrm_forms(&mut b, 3);
    moffs_cases(&mut b, &[&[], &[0x66]]);
    string_cases(
        &mut b,
        &[&[], &[0xf3], &[0x66, 0xf3], &[0xf2]],
        &[
            (true, false, false),
            (false, true, true),
            (true, true, false),
        ],
    );
    stack_cases(&mut b, &[Mode::Base(3), Mode::Disp32]);
    port_cases(&mut b);

    // And in a 16-bit code segment: 16-bit operands and addresses by default, 66h and 67h
    // for 32-bit ones; every 16-bit addressing form. These come last: they leave DS and ES
    // based at the MMIO window (64-bit code ignores those bases).
    b.code = Code::Bits16;
    b.modes = &ADDRESSING_16;
    modrm_forms(&mut b, 2);
    moffs_cases(&mut b, &[&[], &[0x66]]);
    string_cases(
        &mut b,
        &[&[], &[0xf3], &[0x66, 0xf3], &[0xf2]],
        &[(true, true, false), (true, true, true)],
    );
    stack_cases(
        &mut b,
        &[Mode::Addr16 { rm: 7, md: 0 }, Mode::Addr16 { rm: 6, md: 0 }],
    );
    b.cases
}

/// The guest program: for each case, announce it, load RFLAGS and the GPRs, run the
/// instruction, dump the GPRs and RFLAGS. Returns the code and each instruction's address.
/// Where the guest's own GDT goes (the boot GDT plus a 32-bit code segment), its GDTR, and
/// the far pointers into 32-bit code.
const GDT_COPY: u64 = 0xd1_0000;
const GDTR: u64 = 0xd1_0100;
const FAR_POINTERS: u64 = 0xd2_0000;
/// The 32-bit code segment: base 0, 4 GiB, D = 1, L = 0, present, DPL 0, execute/read.
const COMPAT_CS: u16 = 0x30;
const COMPAT_CS_DESCRIPTOR: u64 = 0x00cf_9b00_0000_ffff;
/// The boot GDT's 64-bit code segment, to come back to.
const LONG_CS: u16 = 0x10;

/// A far pointer (m16:32) to write at an address: offset, then selector.
type FarPointer = (u64, [u8; 6]);

/// The assembled guest.
struct Program {
    code: Vec<u8>,
    /// Each case's instruction: its linear address, or its offset in the 16-bit code
    /// segment.
    addresses: Vec<u64>,
    far_pointers: Vec<FarPointer>,
    /// Where the 16-bit code segment starts, if there are 16-bit cases.
    code16_base: Option<u64>,
}

/// The 16-bit code segment (based where the first 16-bit case's code starts, 64 KiB) and
/// the 16-bit data segment based at the MMIO window, loaded into DS and ES there.
const CODE16_CS: u16 = 0x38;
const DATA16: u16 = 0x40;

/// A GDT descriptor: `access` is P, DPL, S and type; `flags` G, D/B and L (bits 3:0 of the
/// byte holding limit bits 19:16).
fn descriptor(base: u64, limit: u32, access: u8, flags: u8) -> u64 {
    let base = base & 0xffff_ffff;
    u64::from(limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | u64::from(access) << 40
        | u64::from((limit >> 16) & 0xf) << 48
        | u64::from(flags & 0xf) << 52
        | (base >> 24) << 56
}

/// A present DPL-0 segment as the vCPU holds it.
fn segment(selector: u16, base: u64, limit: u32, type_: u8, db: bool) -> crate::vmm::Segment {
    crate::vmm::Segment {
        base,
        limit,
        selector,
        type_,
        present: true,
        dpl: 0,
        db,
        s: true,
        l: false,
        g: limit > 0xf_ffff,
        avl: false,
        unusable: false,
    }
}

/// The descriptor of [`COMPAT_CS`] as the vCPU holds it.
fn compat_cs() -> crate::vmm::Segment {
    crate::vmm::Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: COMPAT_CS,
        type_: 0xb,
        present: true,
        dpl: 0,
        db: true,
        s: true,
        l: false,
        g: true,
        avl: false,
        unusable: false,
    }
}

/// The guest program: load the GDT; then for each case, announce it, load RFLAGS and the
/// GPRs, run the instruction, dump the GPRs and RFLAGS, in 64-bit mode or (far jumping
/// there and back) in 32-bit code. Returns the code, each instruction's address, and the
/// far pointers to write into RAM.
fn assemble(cases: &mut [Case]) -> Program {
    let mut code = vec![0x0f, 0x01, 0x14, 0x25]; // lgdt [GDTR]
    code.extend((GDTR as u32).to_le_bytes());
    let mut addresses = Vec::new();
    let mut far_pointers = Vec::new();
    let mut code16_base = None;
    for (i, case) in cases.iter_mut().enumerate() {
        let i64_ = i as u64;
        let flags_stack = FLAGS_STACK_BASE + i64_ * 0x40 + 0x40;
        code.push(0xb8); // mov eax, i
        code.extend((i as u32).to_le_bytes());
        code.extend([0xe7, MARKER_PORT as u8]); // out MARKER_PORT, eax
        if let Some((fs, gs)) = case.segment_bases {
            for (msr, base) in [(0xc000_0100u32, fs), (0xc000_0101, gs)] {
                code.push(0xb9); // mov ecx, msr
                code.extend(msr.to_le_bytes());
                code.push(0xb8); // mov eax, low half
                code.extend((base as u32).to_le_bytes());
                code.push(0xba); // mov edx, high half
                code.extend(((base >> 32) as u32).to_le_bytes());
                code.extend([0x0f, 0x30]); // wrmsr
            }
        }
        let dump = DUMP_BASE + i64_ * DUMP_STRIDE;
        if case.code == Code::Bits16 {
            let pointer = FAR_POINTERS + i64_ * 8;
            code.extend([0xff, 0x2c, 0x25]); // jmp far [pointer]
            code.extend((pointer as u32).to_le_bytes());
            let entry = GUEST_BASE + code.len() as u64;
            let base = *code16_base.get_or_insert(entry);
            let ip = |code: &Vec<u8>| GUEST_BASE + code.len() as u64 - base;
            let mut far = [0u8; 6];
            far[..4].copy_from_slice(&(ip(&code) as u32).to_le_bytes());
            far[4..].copy_from_slice(&CODE16_CS.to_le_bytes());
            far_pointers.push((pointer, far));
            code.extend([0x66, 0xbc]); // mov esp, flags_stack
            code.extend((flags_stack as u32).to_le_bytes());
            code.extend([0x66, 0x68]); // push dword
            code.extend((case.rflags as u32).to_le_bytes());
            code.extend([0x66, 0x9d]); // popfd
            code.push(0xb8); // mov ax, DATA16; mov ds, ax; mov es, ax
            code.extend(DATA16.to_le_bytes());
            code.extend([0x8e, 0xd8, 0x8e, 0xc0]);
            for (r, value) in case.gprs.iter().take(8).enumerate() {
                code.extend([0x66, 0xb8 + r as u8]); // mov r32, imm32
                code.extend((*value as u32).to_le_bytes());
            }
            addresses.push(ip(&code));
            code.extend(&case.bytes);
            for r in 0..8u8 {
                // mov ss:[dump + 8r], r32 (SS is flat)
                code.extend([0x36, 0x66, 0x67, 0x89, (r << 3) | 5]);
                code.extend(((dump + 8 * u64::from(r)) as u32).to_le_bytes());
            }
            code.extend([0x66, 0xbc]); // mov esp, flags_stack
            code.extend((flags_stack as u32).to_le_bytes());
            code.extend([0x66, 0x9c, 0x66, 0x58]); // pushfd; pop eax
            code.extend([0x36, 0x66, 0x67, 0x89, 0x05]); // mov ss:[dump + 128], eax
            code.extend(((dump + 128) as u32).to_le_bytes());
            let back = GUEST_BASE + code.len() as u64 + 8;
            code.extend([0x66, 0xea]); // jmp far LONG_CS:back (a 32-bit offset)
            code.extend((back as u32).to_le_bytes());
            code.extend(LONG_CS.to_le_bytes());
            assert!(
                ip(&code) <= 0xffff,
                "16-bit cases exceed their 64 KiB segment"
            );
            continue;
        }
        if case.code == Code::Bits32 {
            let pointer = FAR_POINTERS + i64_ * 8;
            code.extend([0xff, 0x2c, 0x25]); // jmp far [pointer]
            code.extend((pointer as u32).to_le_bytes());
            let entry = GUEST_BASE + code.len() as u64;
            let mut far = [0u8; 6];
            far[..4].copy_from_slice(&(entry as u32).to_le_bytes());
            far[4..].copy_from_slice(&COMPAT_CS.to_le_bytes());
            far_pointers.push((pointer, far));
            code.push(0xbc); // mov esp, flags_stack
            code.extend((flags_stack as u32).to_le_bytes());
            code.push(0x68); // push imm32
            code.extend((case.rflags as u32).to_le_bytes());
            code.push(0x9d); // popfd
            for (r, value) in case.gprs.iter().take(8).enumerate() {
                code.push(0xb8 + r as u8); // mov r32, imm32
                code.extend((*value as u32).to_le_bytes());
            }
            addresses.push(GUEST_BASE + code.len() as u64);
            code.extend(&case.bytes);
            for r in 0..8u8 {
                code.extend([0x89, (r << 3) | 5]); // mov [dump + 8r], r32
                code.extend(((dump + 8 * u64::from(r)) as u32).to_le_bytes());
            }
            code.push(0xbc); // mov esp, flags_stack
            code.extend((flags_stack as u32).to_le_bytes());
            code.extend([0x9c, 0x58]); // pushfd; pop eax
            code.extend([0x89, 0x05]); // mov [dump + 128], eax
            code.extend(((dump + 128) as u32).to_le_bytes());
            let back = GUEST_BASE + code.len() as u64 + 7;
            code.push(0xea); // jmp far LONG_CS:back
            code.extend((back as u32).to_le_bytes());
            code.extend(LONG_CS.to_le_bytes());
            continue;
        }
        code.extend([0x48, 0xbc]); // mov rsp, flags_stack
        code.extend(flags_stack.to_le_bytes());
        code.push(0x68); // push imm32
        code.extend((case.rflags as u32).to_le_bytes());
        code.push(0x9d); // popfq
        for (r, value) in case.gprs.iter().enumerate() {
            code.push(0x48 | if r >= 8 { 1 } else { 0 }); // mov r64, imm64
            code.push(0xb8 + (r as u8 & 7));
            code.extend(value.to_le_bytes());
        }
        let at = GUEST_BASE + code.len() as u64;
        if let Some((offset, target)) = case.rip_patch {
            let end = at + case.bytes.len() as u64;
            let disp = target.wrapping_sub(end) as i64;
            let disp = i32::try_from(disp).expect("RIP-relative target within 2 GiB");
            case.bytes[offset..offset + 4].copy_from_slice(&disp.to_le_bytes());
        }
        addresses.push(at);
        code.extend(&case.bytes);
        for r in 0..16u8 {
            // mov [dump + 8r], r64
            code.push(0x48 | if r >= 8 { 4 } else { 0 });
            code.extend([0x89, ((r & 7) << 3) | 4, 0x25]);
            code.extend(((dump + 8 * u64::from(r)) as u32).to_le_bytes());
        }
        code.extend([0x48, 0xbc]); // mov rsp, flags_stack
        code.extend(flags_stack.to_le_bytes());
        code.extend([0x9c, 0x58]); // pushfq; pop rax
        code.extend([0x48, 0x89, 0x04, 0x25]); // mov [dump + 128], rax
        code.extend(((dump + 128) as u32).to_le_bytes());
    }
    code.extend([0xfa, 0xf4]); // cli; hlt
    Program {
        code,
        addresses,
        far_pointers,
        code16_base,
    }
}

/// The emulator's view of the same machine: RAM as it was before the guest ran, with the
/// emulator's writes on top, and the test device's answers.
struct SimBus<'a> {
    ram: &'a [u8],
    written: HashMap<u64, u8>,
    value: u64,
    log: Vec<MmioAccess>,
}

impl GuestBus for SimBus<'_> {
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) -> Result<(), AccessFault> {
        if !(MMIO_BASE..MMIO_BASE + MMIO_LEN).contains(&gpa) {
            return Err(AccessFault(format!("unexpected MMIO read at {gpa:#x}")));
        }
        data.copy_from_slice(&device_bytes(self.value, gpa, data.len()));
        self.log.push(MmioAccess::Read {
            gpa,
            data: data.to_vec(),
        });
        Ok(())
    }

    fn mmio_write(&mut self, gpa: u64, data: &[u8]) -> Result<(), AccessFault> {
        self.log.push(MmioAccess::Write {
            gpa,
            data: data.to_vec(),
        });
        Ok(())
    }

    fn ram_read(&mut self, gpa: u64, data: &mut [u8]) -> bool {
        if gpa + data.len() as u64 > self.ram.len() as u64 {
            return false;
        }
        for (i, d) in data.iter_mut().enumerate() {
            let a = gpa + i as u64;
            *d = self
                .written
                .get(&a)
                .copied()
                .unwrap_or(self.ram[a as usize]);
        }
        true
    }

    fn ram_write(&mut self, gpa: u64, data: &[u8]) -> bool {
        if gpa + data.len() as u64 > self.ram.len() as u64 {
            return false;
        }
        for (i, d) in data.iter().enumerate() {
            self.written.insert(gpa + i as u64, *d);
        }
        true
    }
}

/// The test device's ports as the FreeBSD exit logic reaches them: the answers the device
/// gave KVM, logged the same way.
struct ReplayPorts {
    value: u64,
    log: Mutex<Vec<MmioAccess>>,
}

impl ExitHandler for ReplayPorts {
    fn port_read(&self, port: u16, data: &mut [u8]) -> Result<(), AccessFault> {
        let port = u64::from(port);
        if !(PORT_BASE..PORT_BASE + PORT_LEN).contains(&port) {
            return Err(AccessFault(format!("unexpected in from {port:#x}")));
        }
        data.copy_from_slice(&device_bytes(self.value, port, data.len()));
        self.log.lock().unwrap().push(MmioAccess::PortIn {
            port,
            data: data.to_vec(),
        });
        Ok(())
    }
    fn port_write(&self, port: u16, data: &[u8]) -> Result<(), AccessFault> {
        self.log.lock().unwrap().push(MmioAccess::PortOut {
            port: u64::from(port),
            data: data.to_vec(),
        });
        Ok(())
    }
    fn mmio_read(&self, gpa: u64, _: &mut [u8]) -> Result<(), AccessFault> {
        Err(AccessFault(format!("MMIO through the handler at {gpa:#x}")))
    }
    fn mmio_write(&self, gpa: u64, _: &[u8]) -> Result<(), AccessFault> {
        Err(AccessFault(format!("MMIO through the handler at {gpa:#x}")))
    }
    fn msr_read(&self, _: u32, _: u32) -> Result<Option<u64>, AccessFault> {
        Ok(None)
    }
    fn msr_write(&self, _: u32, _: u32, _: u64) -> Result<bool, AccessFault> {
        Ok(false)
    }
}

const FLAG_NAMES: [(u64, &str); 6] = [
    (RFLAGS_CF, "CF"),
    (RFLAGS_PF, "PF"),
    (RFLAGS_AF, "AF"),
    (RFLAGS_ZF, "ZF"),
    (RFLAGS_SF, "SF"),
    (RFLAGS_OF, "OF"),
];

fn flag_names(mask: u64) -> String {
    FLAG_NAMES
        .iter()
        .filter(|(bit, _)| mask & bit != 0)
        .map(|(_, name)| *name)
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn every_emulated_form_matches_kvms_emulator() {
    let Some(hv) = hypervisor() else { return };
    // A first machine only to learn what the guest's CPUID offers.
    let probe = long_mode_machine(hv.as_ref(), &[0xf4], 1);
    let with_1g_pages = guest_has_1g_pages(&probe);
    drop(probe);
    if !with_1g_pages {
        println!("the guest's CPUID has no 1 GiB pages: that window is left out");
    }
    let mut cases = all_cases(with_1g_pages);
    let Program {
        code,
        addresses,
        far_pointers,
        code16_base,
    } = assemble(&mut cases);
    let code16_base = code16_base.unwrap_or(0);
    assert!(
        GUEST_BASE + (code.len() as u64) < DUMP_BASE,
        "guest code overlaps the dump area"
    );
    let machine = long_mode_machine(hv.as_ref(), &code, 1);
    let device = Arc::new(Mutex::new(OracleDevice {
        values: cases.iter().map(|c| c.mmio_value).collect(),
        case: usize::MAX,
        log: Vec::new(),
    }));
    machine
        .buses()
        .mmio
        .insert(MMIO_BASE, MMIO_LEN, device.clone())
        .unwrap();
    machine
        .buses()
        .pio
        .insert(MARKER_PORT, 4, device.clone())
        .unwrap();
    machine
        .buses()
        .pio
        .insert(PORT_BASE, PORT_LEN, device.clone())
        .unwrap();
    for i in 0..cases.len() as u64 {
        let scratch: Vec<u8> = (0..SCRATCH_LEN)
            .map(|o| scratch_byte(i as usize, o))
            .collect();
        machine
            .memory()
            .write(SCRATCH_BASE + i * SCRATCH_LEN, &scratch)
            .unwrap();
    }
    let sregs = machine
        .vcpus()
        .with_vcpu(0, |v| v.special_regs())
        .unwrap()
        .unwrap();
    write_page_tables(machine.memory(), sregs.cr3);
    // The boot GDT plus the 32-bit code segment, and the far pointers into 32-bit code.
    let boot_gdt_len = u64::from(sregs.gdt.limit) + 1;
    let mut gdt = machine
        .memory()
        .slice(sregs.gdt.base, boot_gdt_len)
        .unwrap()
        .to_vec();
    gdt.resize(usize::from(DATA16) + 8, 0);
    for (selector, descriptor) in [
        (COMPAT_CS, COMPAT_CS_DESCRIPTOR),
        (CODE16_CS, descriptor(code16_base, 0xffff, 0x9b, 0)),
        (DATA16, descriptor(MMIO_BASE, 0xffff, 0x93, 0)),
    ] {
        let at = usize::from(selector);
        gdt[at..at + 8].copy_from_slice(&descriptor.to_le_bytes());
    }
    machine.memory().write(GDT_COPY, &gdt).unwrap();
    let mut gdtr = ((gdt.len() - 1) as u16).to_le_bytes().to_vec();
    gdtr.extend(GDT_COPY.to_le_bytes());
    machine.memory().write(GDTR, &gdtr).unwrap();
    for (address, pointer) in &far_pointers {
        machine.memory().write(*address, pointer).unwrap();
    }
    let ram_before = machine.memory().slice(0, RAM_SIZE).unwrap().to_vec();

    let reason = run_to_end(&machine, false, Duration::from_secs(120));
    let log = std::mem::take(&mut device.lock().unwrap().log);
    let last_case = device.lock().unwrap().case;
    assert_eq!(
        reason,
        ExitReason::Halt,
        "the guest stopped in case {last_case} ({:?})",
        cases.get(last_case)
    );
    let mut kvm_accesses: BTreeMap<usize, Vec<MmioAccess>> = BTreeMap::new();
    for (case, access) in log {
        kvm_accesses.entry(case).or_default().push(access);
    }

    let mut failures = Vec::new();
    let mut undefined_differences: BTreeMap<String, u64> = BTreeMap::new();
    let mut forms = BTreeSet::new();
    let mut known_divergences: BTreeMap<(&str, bool), usize> = BTreeMap::new();
    let (mut freebsd_replayed, mut freebsd_records) = (0usize, 0usize);
    let mut port_forms = BTreeSet::new();
    for (i, case) in cases.iter().enumerate() {
        forms.insert(case.form.clone());
        let dump = machine
            .memory()
            .slice(DUMP_BASE + i as u64 * DUMP_STRIDE, 17 * 8)
            .unwrap()
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect::<Vec<_>>();
        let mut state = CpuState {
            sregs,
            ..Default::default()
        };
        for (r, v) in case.gprs.iter().enumerate() {
            super::Registers::set_gpr(&mut state, r as u8, *v);
        }
        if let Some((fs, gs)) = case.segment_bases {
            state.sregs.fs.base = fs;
            state.sregs.gs.base = gs;
        }
        match case.code {
            Code::Long => {}
            Code::Bits32 => state.sregs.cs = compat_cs(),
            Code::Bits16 => {
                state.sregs.cs = segment(CODE16_CS, code16_base, 0xffff, 0xb, false);
                state.sregs.ds = segment(DATA16, MMIO_BASE, 0xffff, 0x3, false);
                state.sregs.es = state.sregs.ds;
            }
        }
        let paging = Paging::from_special_regs(&state.sregs);
        state.regs.rip = addresses[i];
        state.regs.rflags = case.rflags;
        let what = format!("case {i} {} [{}]", case.form, hex(&case.bytes));
        let failures_before = failures.len();
        let kvm = kvm_accesses.remove(&i).unwrap_or_default();
        // What one run (this emulator's or the FreeBSD exit logic's) must agree with KVM on.
        let mut check = |path: &str, state: &CpuState, log: &[MmioAccess], bus: &mut SimBus| {
            let mut found = Vec::new();
            let expected_rip = addresses[i] + case.bytes.len() as u64;
            if state.regs.rip != expected_rip {
                found.push(format!(
                    "{what}: {path}: RIP {:#x}, expected {expected_rip:#x}",
                    state.regs.rip
                ));
            }
            let dumped = if case.code == Code::Long { 16 } else { 8 };
            for r in 0..dumped {
                let ours = super::Registers::gpr(state, r);
                if ours != dump[usize::from(r)] {
                    found.push(format!(
                        "{what}: {path}: register {r}: {ours:#x}, KVM {:#x}",
                        dump[usize::from(r)]
                    ));
                }
            }
            let (ours, theirs) = (state.regs.rflags, dump[16]);
            let compared = !RFLAGS_STATUS | case.defined;
            if ours & compared != theirs & compared {
                found.push(format!(
                    "{what}: {path}: RFLAGS {ours:#x}, KVM {theirs:#x} (differ in {})",
                    flag_names((ours ^ theirs) & compared)
                ));
            }
            let undefined = (ours ^ theirs) & RFLAGS_STATUS & !case.defined;
            if undefined != 0 && path == "emulator" {
                *undefined_differences
                    .entry(format!("{}: {}", case.form, flag_names(undefined)))
                    .or_default() += 1;
            }
            if kvm != log {
                found.push(format!(
                    "{what}: {path}: device accesses {log:x?}, KVM {kvm:x?}"
                ));
            }
            let scratch = SCRATCH_BASE + i as u64 * SCRATCH_LEN;
            let actual = machine.memory().slice(scratch, SCRATCH_LEN).unwrap();
            let mut expected = vec![0u8; SCRATCH_LEN as usize];
            bus.ram_read(scratch, &mut expected);
            if actual != expected.as_slice() {
                found.push(format!(
                    "{what}: {path}: RAM {expected:02x?}, KVM {actual:02x?}"
                ));
            }
            found
        };
        let new_bus = || SimBus {
            ram: &ram_before,
            written: HashMap::new(),
            value: case.mmio_value,
            log: Vec::new(),
        };

        // This emulator on its own, as a backend would call it.
        if !case.port_io {
            let mut state = state;
            let mut bus = new_bus();
            let result = (|| -> Result<(), String> {
                let inst = decode(&case.bytes, paging.decode_mode(&state.sregs.cs))
                    .map_err(|e| e.to_string())?;
                if usize::from(inst.length) != case.bytes.len() {
                    return Err(format!("length {} != {}", inst.length, case.bytes.len()));
                }
                // Iterations of a REP instruction exit one by one, as on FreeBSD.
                for _ in 0..64 {
                    let gpa = match operand_linear_address(&inst, &paging, &state) {
                        Some(gla) => {
                            let gla = gla.map_err(|e| format!("{e:?}"))?;
                            translate(&paging, gla, Access::Read, &mut bus)
                                .map_err(|e| e.to_string())?
                        }
                        None => 0,
                    };
                    match execute(&inst, gpa, &paging, &mut state, &mut bus)
                        .map_err(|e| e.to_string())?
                    {
                        Outcome::Completed => return Ok(()),
                        Outcome::Repeat => continue,
                        Outcome::Exception(e) => return Err(format!("exception {e:?}")),
                    }
                }
                Err("REP never ended".into())
            })();
            match result {
                Err(e) => failures.push(format!("{what}: emulator: {e}")),
                Ok(()) => {
                    let log = std::mem::take(&mut bus.log);
                    failures.extend(check("emulator", &state, &log, &mut bus));
                }
            }
        }

        // The FreeBSD backend's exit logic fed the records FreeBSD's kernel would give.
        let mut bus = new_bus();
        let ports = ReplayPorts {
            value: case.mmio_value,
            log: Mutex::new(Vec::new()),
        };
        let fault_gpa = kvm
            .iter()
            .find_map(|a| match a {
                MmioAccess::Read { gpa, .. } | MmioAccess::Write { gpa, .. } => Some(*gpa),
                _ => None,
            })
            .unwrap_or(0);
        match replay_instruction(&case.bytes, &state, fault_gpa, &mut bus, &ports) {
            Err(e) => failures.push(format!("{what}: FreeBSD exits: {e}")),
            Ok(replayed) => {
                freebsd_records += replayed.records;
                if case.port_io {
                    port_forms.insert(case.form.clone());
                }
                let mut log = std::mem::take(&mut bus.log);
                log.extend(ports.log.into_inner().unwrap());
                if !replayed.injected.is_empty() {
                    failures.push(format!(
                        "{what}: FreeBSD exits raised {:?}",
                        replayed.injected
                    ));
                }
                failures.extend(check("FreeBSD exits", &replayed.state, &log, &mut bus));
            }
        }
        freebsd_replayed += 1;
        if let Some(divergence) = case.divergence {
            let differs = failures.len() > failures_before;
            failures.truncate(failures_before);
            *known_divergences.entry((divergence, differs)).or_default() += 1;
        }
    }
    println!(
        "FreeBSD exit records: {freebsd_replayed} instructions replayed in {freebsd_records} \
         records ({} port I/O forms)",
        port_forms.len()
    );
    println!(
        "KVM oracle: {} forms, {} cases ({} in 32-bit code, {} in 16-bit code), {} failures",
        forms.len(),
        cases.len(),
        cases.iter().filter(|c| c.code == Code::Bits32).count(),
        cases.iter().filter(|c| c.code == Code::Bits16).count(),
        failures.len()
    );
    for ((divergence, differs), count) in &known_divergences {
        let verdict = if *differs {
            "KVM differs"
        } else {
            "KVM now agrees"
        };
        println!("known difference, {verdict} in {count} cases: {divergence}");
    }
    for (form, count) in &undefined_differences {
        println!("undefined flags differ from KVM ({count} cases): {form}");
    }
    for f in failures.iter().take(40) {
        println!("{f}");
    }
    assert!(failures.is_empty(), "{} mismatches", failures.len());
    assert!(kvm_accesses.is_empty(), "accesses outside any case");
}
