//! The decoder: legacy prefixes, REX, the one- and two-byte opcodes the emulator executes,
//! ModRM/SIB/displacement (16-, 32- and 64-bit addressing, RIP-relative), immediates and
//! memory offsets. Everything else is [`EmulError::Unsupported`].

use super::{CpuMode, EmulError, SegReg};

/// The longest x86 instruction, in bytes.
pub const MAX_INSTRUCTION_LEN: usize = 15;

/// The arithmetic and logic operations of the `00`–`3F` block and of group 1, in their
/// ModRM.reg / opcode-bits-5:3 order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AluOp {
    Add,
    Or,
    Adc,
    Sbb,
    And,
    Sub,
    Xor,
    Cmp,
}

impl AluOp {
    fn from_bits(bits: u8) -> AluOp {
        match bits & 7 {
            0 => AluOp::Add,
            1 => AluOp::Or,
            2 => AluOp::Adc,
            3 => AluOp::Sbb,
            4 => AluOp::And,
            5 => AluOp::Sub,
            6 => AluOp::Xor,
            _ => AluOp::Cmp,
        }
    }

    /// CMP only sets flags; the others write their result.
    pub fn writes_result(self) -> bool {
        self != AluOp::Cmp
    }
}

/// What an instruction does, with the direction of its memory operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// `op r/m, reg` (`00`, `01`, `08`, … `39`): the memory operand is the destination.
    AluMemReg(AluOp),
    /// `op reg, r/m` (`02`, `03`, … `3B`): the register is the destination.
    AluRegMem(AluOp),
    /// Group 1 (`80`, `81`, `83`): `op r/m, imm`.
    AluMemImm(AluOp),
    /// `TEST r/m, reg` (`84`, `85`).
    TestMemReg,
    /// `TEST r/m, imm` (`F6 /0`, `F7 /0`).
    TestMemImm,
    /// `MOV r/m, reg` (`88`, `89`).
    MovToMem,
    /// `MOV reg, r/m` (`8A`, `8B`).
    MovFromMem,
    /// `MOV r/m, imm` (group 11: `C6 /0`, `C7 /0`).
    MovImmToMem,
    /// `MOV AL/AX/EAX/RAX, moffs` (`A0`, `A1`).
    MovMoffsToAcc,
    /// `MOV moffs, AL/AX/EAX/RAX` (`A2`, `A3`).
    MovAccToMoffs,
    /// `MOVZX reg, r/m8` / `r/m16` (`0F B6`, `0F B7`); `source` is the source size in bytes.
    Movzx { source: u8 },
    /// `MOVSX reg, r/m8` / `r/m16` (`0F BE`, `0F BF`).
    Movsx { source: u8 },
    /// `MOVSXD reg, r/m32` (`63` in 64-bit mode).
    Movsxd,
    /// `MOVS` (`A4`, `A5`), optionally with REP.
    Movs,
    /// `STOS` (`AA`, `AB`), optionally with REP.
    Stos,
    /// `PUSH r/m` (`FF /6`).
    Push,
    /// `POP r/m` (`8F /0`).
    Pop,
    /// `BT r/m, imm8` (`0F BA /4`).
    BtImm,
    /// `CLFLUSH m8` / `CLFLUSHOPT m8` (`0F AE /7`).
    Clflush,
    /// `BEXTR reg, r/m, vreg` (`VEX.LZ.0F38.W0/W1 F7 /r`): bit field of the memory operand
    /// selected by start (bits 7:0) and length (bits 15:8) of [`Instruction::vex_reg`].
    Bextr,
}

/// A memory operand as encoded: `segment:[base + index * scale + displacement]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemOperand {
    /// The segment used: the override prefix if any, else the default (SS for RSP/RBP bases,
    /// DS otherwise).
    pub segment: SegReg,
    pub base: Option<Base>,
    /// Index register number (0–15); RSP is never an index.
    pub index: Option<u8>,
    /// 1, 2, 4 or 8 (1 when there is no index).
    pub scale: u8,
    /// Sign-extended displacement, or the zero-extended memory offset of `A0`–`A3`.
    pub displacement: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    /// A general-purpose register number (0–15).
    Gpr(u8),
    /// RIP-relative: the address of the next instruction.
    Rip,
}

/// REP / REPNE in front of a string instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rep {
    /// `F3`
    Rep,
    /// `F2` (FreeBSD guests use it for MOVS; it behaves as REP there).
    Repne,
}

/// A decoded instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    /// Bytes the instruction occupies: the resumed RIP is RIP + length.
    pub length: u8,
    pub operation: Operation,
    /// Operand size in bytes (1, 2, 4 or 8) after the byte form, prefixes and REX.W.
    pub operand_size: u8,
    /// Address size in bytes (2, 4 or 8).
    pub address_size: u8,
    /// ModRM.reg extended by REX.R (the register operand), 0 where there is none.
    pub reg: u8,
    /// A REX prefix is present: byte registers 4–7 are SPL..DIL, not AH..BH.
    pub rex: bool,
    /// The memory operand (`None` only for MOVS and STOS, whose operands are implicit).
    pub memory: Option<MemOperand>,
    /// The segment override prefix, if any.
    pub segment_override: Option<SegReg>,
    /// The immediate, sign-extended to 64 bits (0 where there is none).
    pub immediate: i64,
    pub rep: Option<Rep>,
    pub lock: bool,
    /// VEX.vvvv: the extra register operand of a VEX instruction (0 otherwise).
    pub vex_reg: u8,
}

impl Instruction {
    /// Bytes read or written at the memory operand (each element, for MOVS and STOS).
    pub fn access_size(&self) -> u8 {
        match self.operation {
            Operation::Movzx { source } | Operation::Movsx { source } => source,
            Operation::Movsxd => self.operand_size.min(4),
            Operation::Clflush => 1,
            _ => self.operand_size,
        }
    }
}

/// How the CPU decodes: its mode and, outside 64-bit mode, CS.D.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeMode {
    pub cpu_mode: CpuMode,
    /// CS.D: default operand and address size 32 bits (ignored in 64-bit mode).
    pub cs_d: bool,
}

impl DecodeMode {
    pub const LONG64: DecodeMode = DecodeMode {
        cpu_mode: CpuMode::Long64,
        cs_d: false,
    };
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn next(&mut self) -> Result<u8, EmulError> {
        if self.pos >= MAX_INSTRUCTION_LEN {
            return Err(EmulError::TooLong);
        }
        let byte = *self.bytes.get(self.pos).ok_or(EmulError::Truncated {
            available: self.bytes.len(),
        })?;
        self.pos += 1;
        Ok(byte)
    }

    fn peek(&self) -> Result<u8, EmulError> {
        if self.pos >= MAX_INSTRUCTION_LEN {
            return Err(EmulError::TooLong);
        }
        self.bytes
            .get(self.pos)
            .copied()
            .ok_or(EmulError::Truncated {
                available: self.bytes.len(),
            })
    }

    /// `n` bytes, little-endian, sign-extended from `n * 8` bits.
    fn signed(&mut self, n: usize) -> Result<i64, EmulError> {
        if n == 0 {
            return Ok(0);
        }
        let raw = self.unsigned(n)?;
        let shift = 64 - 8 * n as u32;
        Ok(((raw << shift) as i64) >> shift)
    }

    fn unsigned(&mut self, n: usize) -> Result<u64, EmulError> {
        let mut value = 0u64;
        for i in 0..n {
            value |= u64::from(self.next()?) << (8 * i);
        }
        Ok(value)
    }
}

fn segment_prefix(byte: u8) -> Option<SegReg> {
    Some(match byte {
        0x26 => SegReg::Es,
        0x2e => SegReg::Cs,
        0x36 => SegReg::Ss,
        0x3e => SegReg::Ds,
        0x64 => SegReg::Fs,
        0x65 => SegReg::Gs,
        _ => return None,
    })
}

/// What the opcode needs after it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Immediate {
    None,
    /// One byte, sign-extended.
    Byte,
    /// Two bytes with a 16-bit operand size, four otherwise, sign-extended.
    Full,
}

/// Decode the instruction at the start of `bytes` (up to 15 are looked at).
pub fn decode(bytes: &[u8], mode: DecodeMode) -> Result<Instruction, EmulError> {
    let long = mode.cpu_mode == CpuMode::Long64;
    let mut cur = Cursor { bytes, pos: 0 };
    let mut opsize_override = false;
    let mut addrsize_override = false;
    let mut segment_override = None;
    let mut rep = None;
    let mut lock = false;
    let mut rex = None;
    let opcode = loop {
        let byte = cur.next()?;
        // A REX prefix counts only right before the opcode; one followed by a legacy
        // prefix is ignored.
        let legacy = match byte {
            0x66 => {
                opsize_override = true;
                true
            }
            0x67 => {
                addrsize_override = true;
                true
            }
            0xf0 => {
                lock = true;
                true
            }
            0xf2 => {
                rep = Some(Rep::Repne);
                true
            }
            0xf3 => {
                rep = Some(Rep::Rep);
                true
            }
            _ => match segment_prefix(byte) {
                // In 64-bit mode ES, CS, SS and DS prefixes are null prefixes: they leave an
                // earlier FS or GS override in force.
                Some(SegReg::Es | SegReg::Cs | SegReg::Ss | SegReg::Ds)
                    if long && matches!(segment_override, Some(SegReg::Fs | SegReg::Gs)) =>
                {
                    true
                }
                Some(seg) => {
                    segment_override = Some(seg);
                    true
                }
                None => false,
            },
        };
        if legacy {
            rex = None;
            continue;
        }
        if long && (0x40..=0x4f).contains(&byte) {
            rex = Some(byte);
            continue;
        }
        break byte;
    };
    let rex_bits = rex.unwrap_or(0);
    let mut rex_w = rex_bits & 8 != 0;
    let mut rex_r = (rex_bits >> 2) & 1;
    let mut rex_x = (rex_bits >> 1) & 1;
    let mut rex_b = rex_bits & 1;

    let unsupported = |what: &str| {
        Err(EmulError::Unsupported {
            bytes: bytes[..bytes.len().min(MAX_INSTRUCTION_LEN)].to_vec(),
            what: what.to_string(),
        })
    };

    // The three-byte VEX prefix (C4). Outside 64-bit mode C4 is LES unless the next byte
    // looks like a register ModRM (its inverted R and X bits both set).
    let mut vex_reg = 0;
    let mut vex_op = None;
    if opcode == 0xc4 && mode.cpu_mode != CpuMode::Real && (long || cur.peek()? >> 6 == 3) {
        if rex.is_some() || opsize_override || rep.is_some() || lock {
            return unsupported("VEX after a 66h, F2h, F3h, LOCK or REX prefix");
        }
        let b1 = cur.next()?;
        let b2 = cur.next()?;
        let op = cur.next()?;
        let (map, pp, l) = (b1 & 0x1f, b2 & 3, (b2 >> 2) & 1);
        if map != 2 || op != 0xf7 || pp != 0 || l != 0 {
            return unsupported(&format!("VEX map {map}, pp {pp}, L {l}, opcode {op:02x}"));
        }
        // The register extensions exist in 64-bit mode only.
        if long {
            rex_r = (!b1 >> 7) & 1;
            rex_x = (!b1 >> 6) & 1;
            rex_b = (!b1 >> 5) & 1;
            rex_w = b2 & 0x80 != 0;
            vex_reg = (!b2 >> 3) & 0xf;
        } else {
            rex_w = false;
            vex_reg = (!b2 >> 3) & 0x7;
        }
        vex_op = Some(op);
    }

    let (full_size, address_size) = match (mode.cpu_mode, mode.cs_d) {
        (CpuMode::Long64, _) => (
            if rex_w {
                8
            } else if opsize_override {
                2
            } else {
                4
            },
            if addrsize_override { 4 } else { 8 },
        ),
        (CpuMode::Real, _) | (_, false) => (
            if opsize_override { 4 } else { 2 },
            if addrsize_override { 4 } else { 2 },
        ),
        (_, true) => (
            if opsize_override { 2 } else { 4 },
            if addrsize_override { 2 } else { 4 },
        ),
    };

    // (operation, byte form, immediate, has ModRM, required ModRM.reg)
    let (operation, byte_form, immediate, required_reg): (Operation, bool, Immediate, Option<u8>) =
        match opcode {
            0x00..=0x3f if opcode & 7 < 4 => {
                let alu = AluOp::from_bits(opcode >> 3);
                let op = if opcode & 2 == 0 {
                    Operation::AluMemReg(alu)
                } else {
                    Operation::AluRegMem(alu)
                };
                (op, opcode & 1 == 0, Immediate::None, None)
            }
            0xc4 if vex_op.is_some() => (Operation::Bextr, false, Immediate::None, None),
            0x63 if long => (Operation::Movsxd, false, Immediate::None, None),
            0x80 => (
                Operation::AluMemImm(AluOp::Add),
                true,
                Immediate::Byte,
                None,
            ),
            0x81 => (
                Operation::AluMemImm(AluOp::Add),
                false,
                Immediate::Full,
                None,
            ),
            0x83 => (
                Operation::AluMemImm(AluOp::Add),
                false,
                Immediate::Byte,
                None,
            ),
            0x84 | 0x85 => (Operation::TestMemReg, opcode == 0x84, Immediate::None, None),
            0x88 | 0x89 => (Operation::MovToMem, opcode == 0x88, Immediate::None, None),
            0x8a | 0x8b => (Operation::MovFromMem, opcode == 0x8a, Immediate::None, None),
            0x8f => (Operation::Pop, false, Immediate::None, Some(0)),
            0xa0 | 0xa1 => (
                Operation::MovMoffsToAcc,
                opcode == 0xa0,
                Immediate::None,
                None,
            ),
            0xa2 | 0xa3 => (
                Operation::MovAccToMoffs,
                opcode == 0xa2,
                Immediate::None,
                None,
            ),
            0xa4 | 0xa5 => (Operation::Movs, opcode == 0xa4, Immediate::None, None),
            0xaa | 0xab => (Operation::Stos, opcode == 0xaa, Immediate::None, None),
            0xc6 => (Operation::MovImmToMem, true, Immediate::Byte, Some(0)),
            0xc7 => (Operation::MovImmToMem, false, Immediate::Full, Some(0)),
            0xf6 => (Operation::TestMemImm, true, Immediate::Byte, Some(0)),
            0xf7 => (Operation::TestMemImm, false, Immediate::Full, Some(0)),
            0xff => (Operation::Push, false, Immediate::None, Some(6)),
            0x0f => match cur.next()? {
                0xb6 => (Operation::Movzx { source: 1 }, false, Immediate::None, None),
                0xb7 => (Operation::Movzx { source: 2 }, false, Immediate::None, None),
                0xbe => (Operation::Movsx { source: 1 }, false, Immediate::None, None),
                0xbf => (Operation::Movsx { source: 2 }, false, Immediate::None, None),
                0xba => (Operation::BtImm, false, Immediate::Byte, Some(4)),
                0xae => (Operation::Clflush, true, Immediate::None, Some(7)),
                other => return unsupported(&format!("opcode 0f {other:02x}")),
            },
            other => return unsupported(&format!("opcode {other:02x}")),
        };

    let operand_size = if byte_form {
        1
    } else {
        match operation {
            // PUSH and POP in 64-bit mode: 64 bits, or 16 with 66h; never 32.
            // BEXTR: 32 bits, or 64 with VEX.W in 64-bit mode.
            Operation::Bextr => {
                if rex_w {
                    8
                } else {
                    4
                }
            }
            Operation::Push | Operation::Pop if long => {
                if opsize_override && !rex_w {
                    2
                } else {
                    8
                }
            }
            _ => full_size,
        }
    };

    let mut reg = 0;
    let memory = match operation {
        Operation::Movs | Operation::Stos => None,
        Operation::MovMoffsToAcc | Operation::MovAccToMoffs => {
            let offset = cur.unsigned(usize::from(address_size))?;
            Some(MemOperand {
                segment: segment_override.unwrap_or(SegReg::Ds),
                base: None,
                index: None,
                scale: 1,
                displacement: offset as i64,
            })
        }
        _ => {
            let modrm = cur.next()?;
            let md = modrm >> 6;
            let reg_bits = (modrm >> 3) & 7;
            if let Some(required) = required_reg {
                if reg_bits != required {
                    return unsupported(&format!("opcode {opcode:02x} /{reg_bits}"));
                }
            }
            if md == 3 {
                return Err(EmulError::RegisterOperand);
            }
            reg = reg_bits | (rex_r << 3);
            let rm = modrm & 7;
            Some(if address_size == 2 {
                modrm16(&mut cur, md, rm, segment_override)?
            } else {
                modrm32(&mut cur, md, rm, rex_b, rex_x, long, segment_override)?
            })
        }
    };
    let operation = match operation {
        Operation::AluMemImm(_) => Operation::AluMemImm(AluOp::from_bits(reg)),
        other => other,
    };

    let immediate = match immediate {
        Immediate::None => 0,
        Immediate::Byte => cur.signed(1)?,
        Immediate::Full if operand_size == 2 => cur.signed(2)?,
        Immediate::Full => cur.signed(4)?,
    };

    // LOCK is valid only on read-modify-write memory destinations; elsewhere the CPU raises
    // #UD before any access, so such bytes never reach an emulator.
    if lock {
        let locks = matches!(operation,
            Operation::AluMemReg(op) | Operation::AluMemImm(op) if op.writes_result());
        if !locks {
            return unsupported("LOCK prefix on an instruction that cannot take it");
        }
    }
    if operation == Operation::Movsxd && operand_size == 2 {
        // 66 63: Intel's manual reads a 16-bit source, KVM's emulator 32 bits; a device
        // must not see an access width that depends on who emulates it.
        return unsupported("MOVSXD with a 16-bit operand size");
    }
    if let Operation::Clflush = operation {
        // 66 0F AE /7 is CLFLUSHOPT, the same access; F2/F3 forms are other instructions.
        if rep.is_some() {
            return unsupported("0f ae /7 with an F2/F3 prefix");
        }
    }

    Ok(Instruction {
        length: cur.pos as u8,
        operation,
        operand_size,
        address_size,
        reg,
        rex: rex.is_some(),
        memory,
        segment_override,
        immediate,
        rep: match operation {
            Operation::Movs | Operation::Stos => rep,
            _ => None,
        },
        lock,
        vex_reg,
    })
}

/// 16-bit addressing: `[bx+si]`, `[bp+di+disp]`, `[disp16]`, ...
fn modrm16(
    cur: &mut Cursor<'_>,
    md: u8,
    rm: u8,
    segment_override: Option<SegReg>,
) -> Result<MemOperand, EmulError> {
    const BX: u8 = 3;
    const BP: u8 = 5;
    const SI: u8 = 6;
    const DI: u8 = 7;
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
    let displacement = match md {
        0 if base.is_none() => cur.signed(2)?,
        0 => 0,
        1 => cur.signed(1)?,
        _ => cur.signed(2)?,
    };
    let default = if base == Some(BP) {
        SegReg::Ss
    } else {
        SegReg::Ds
    };
    Ok(MemOperand {
        segment: segment_override.unwrap_or(default),
        base: base.map(Base::Gpr),
        index,
        scale: 1,
        displacement,
    })
}

/// 32- and 64-bit addressing, with SIB and RIP-relative forms.
fn modrm32(
    cur: &mut Cursor<'_>,
    md: u8,
    rm: u8,
    rex_b: u8,
    rex_x: u8,
    long: bool,
    segment_override: Option<SegReg>,
) -> Result<MemOperand, EmulError> {
    const RSP: u8 = 4;
    const RBP: u8 = 5;
    let mut index = None;
    let mut scale = 1;
    let base;
    let mut disp_bytes = match md {
        1 => 1,
        2 => 4,
        _ => 0,
    };
    if rm == 4 {
        let sib = cur.next()?;
        scale = 1 << (sib >> 6);
        let idx = ((sib >> 3) & 7) | (rex_x << 3);
        if idx != RSP {
            index = Some(idx);
        } else {
            scale = 1;
        }
        let sib_base = sib & 7;
        if md == 0 && sib_base == RBP {
            base = None;
            disp_bytes = 4;
        } else {
            base = Some(Base::Gpr(sib_base | (rex_b << 3)));
        }
    } else if md == 0 && rm == RBP {
        disp_bytes = 4;
        base = if long { Some(Base::Rip) } else { None };
    } else {
        base = Some(Base::Gpr(rm | (rex_b << 3)));
    }
    let displacement = cur.signed(disp_bytes)?;
    // Only RSP and RBP themselves (not R12/R13) make SS the default segment.
    let default = match base {
        Some(Base::Gpr(RSP)) | Some(Base::Gpr(RBP)) => SegReg::Ss,
        _ => SegReg::Ds,
    };
    Ok(MemOperand {
        segment: segment_override.unwrap_or(default),
        base,
        index,
        scale,
        displacement,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn long(bytes: &[u8]) -> Instruction {
        decode(bytes, DecodeMode::LONG64).unwrap()
    }

    #[test]
    fn mov_store_with_sib_and_disp8() {
        // mov [rax + rcx*4 + 0x10], edx
        let i = long(&[0x89, 0x54, 0x88, 0x10]);
        assert_eq!(i.length, 4);
        assert_eq!(i.operation, Operation::MovToMem);
        assert_eq!(i.operand_size, 4);
        assert_eq!(i.reg, 2);
        let m = i.memory.unwrap();
        assert_eq!(m.base, Some(Base::Gpr(0)));
        assert_eq!(m.index, Some(1));
        assert_eq!(m.scale, 4);
        assert_eq!(m.displacement, 0x10);
    }

    #[test]
    fn rip_relative_and_rex() {
        // mov r9, [rip - 8]
        let i = long(&[0x4c, 0x8b, 0x0d, 0xf8, 0xff, 0xff, 0xff]);
        assert_eq!(i.length, 7);
        assert_eq!(i.operand_size, 8);
        assert_eq!(i.reg, 9);
        assert_eq!(i.memory.unwrap().base, Some(Base::Rip));
        assert_eq!(i.memory.unwrap().displacement, -8);
    }

    #[test]
    fn group1_reads_the_operation_from_modrm() {
        // 66 83 /7 ib: cmp word [rbx], -1
        let i = long(&[0x66, 0x83, 0x3b, 0xff]);
        assert_eq!(i.operation, Operation::AluMemImm(AluOp::Cmp));
        assert_eq!(i.operand_size, 2);
        assert_eq!(i.immediate, -1);
        assert_eq!(i.length, 4);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert!(matches!(
            decode(&[0x89], DecodeMode::LONG64),
            Err(EmulError::Truncated { available: 1 })
        ));
        assert!(matches!(
            decode(&[0x89, 0xc0], DecodeMode::LONG64),
            Err(EmulError::RegisterOperand)
        ));
        assert!(matches!(
            decode(&[0x90], DecodeMode::LONG64),
            Err(EmulError::Unsupported { .. })
        ));
        assert!(matches!(
            decode(&[0x66; 20], DecodeMode::LONG64),
            Err(EmulError::TooLong)
        ));
        assert!(matches!(
            decode(&[0xff, 0x00], DecodeMode::LONG64),
            Err(EmulError::Unsupported { .. })
        ));
    }

    #[test]
    fn sixteen_bit_addressing() {
        let real = DecodeMode {
            cpu_mode: CpuMode::Real,
            cs_d: false,
        };
        // mov [bp+di+0x1234], ax
        let i = decode(&[0x89, 0x83, 0x34, 0x12], real).unwrap();
        assert_eq!(i.operand_size, 2);
        assert_eq!(i.address_size, 2);
        let m = i.memory.unwrap();
        assert_eq!(m.segment, SegReg::Ss);
        assert_eq!(m.base, Some(Base::Gpr(5)));
        assert_eq!(m.index, Some(7));
        assert_eq!(m.displacement, 0x1234);
    }
}
