//! Executing a decoded instruction against a register file and a bus.

use super::decode::{AluOp, Base, Instruction, MemOperand, Operation};
use super::paging::{is_canonical, translate, Access};
use super::{CpuMode, EmulError, Exception, GuestBus, Paging, Registers, SegReg};

pub const RFLAGS_CF: u64 = 1 << 0;
pub const RFLAGS_PF: u64 = 1 << 2;
pub const RFLAGS_AF: u64 = 1 << 4;
pub const RFLAGS_ZF: u64 = 1 << 6;
pub const RFLAGS_SF: u64 = 1 << 7;
pub const RFLAGS_DF: u64 = 1 << 10;
pub const RFLAGS_OF: u64 = 1 << 11;
pub const RFLAGS_AC: u64 = 1 << 18;
/// The six arithmetic status flags.
pub const RFLAGS_STATUS: u64 =
    RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF;

const CR0_AM: u64 = 1 << 18;

pub const RAX: u8 = 0;
pub const RCX: u8 = 1;
pub const RSP: u8 = 4;
pub const RSI: u8 = 6;
pub const RDI: u8 = 7;

/// How an emulated instruction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done; RIP points past the instruction.
    Completed,
    /// One iteration of a REP string instruction is done and more remain: RIP is unchanged,
    /// so the guest executes (and exits on) the instruction again, as FreeBSD's
    /// `vm_restart_instruction` does.
    Repeat,
    /// The guest takes this exception instead; no register changed and nothing was written.
    Exception(Exception),
}

/// Mask of the low `size` bytes.
pub fn size_mask(size: u8) -> u64 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

fn sign_bit(size: u8) -> u64 {
    1 << (u32::from(size) * 8 - 1)
}

fn sign_extend(value: u64, size: u8) -> u64 {
    let shift = 64 - u32::from(size) * 8;
    (((value << shift) as i64) >> shift) as u64
}

/// PF, ZF and SF of a `size`-byte result.
fn result_flags(result: u64, size: u8) -> u64 {
    let mut flags = 0;
    if (result as u8).count_ones() % 2 == 0 {
        flags |= RFLAGS_PF;
    }
    if result & size_mask(size) == 0 {
        flags |= RFLAGS_ZF;
    }
    if result & sign_bit(size) != 0 {
        flags |= RFLAGS_SF;
    }
    flags
}

/// `a op b` on `size` bytes with the carry flag `carry`: the result and the six status
/// flags, as the processor computes them. The logical operations clear CF, OF and AF (AF
/// is architecturally undefined there; FreeBSD clears it too).
pub fn alu(op: AluOp, a: u64, b: u64, carry: bool, size: u8) -> (u64, u64) {
    let mask = size_mask(size);
    let (a, b) = (a & mask, b & mask);
    let c = u64::from(carry);
    let sign = sign_bit(size);
    let (result, flags) = match op {
        AluOp::Add | AluOp::Adc => {
            let c = if op == AluOp::Adc { c } else { 0 };
            let wide = u128::from(a) + u128::from(b) + u128::from(c);
            let r = (wide as u64) & mask;
            let mut f = 0;
            if wide > u128::from(mask) {
                f |= RFLAGS_CF;
            }
            if (a ^ r) & (b ^ r) & sign != 0 {
                f |= RFLAGS_OF;
            }
            if (a ^ b ^ r) & 0x10 != 0 {
                f |= RFLAGS_AF;
            }
            (r, f)
        }
        AluOp::Sub | AluOp::Sbb | AluOp::Cmp => {
            let c = if op == AluOp::Sbb { c } else { 0 };
            let r = a.wrapping_sub(b).wrapping_sub(c) & mask;
            let mut f = 0;
            if u128::from(a) < u128::from(b) + u128::from(c) {
                f |= RFLAGS_CF;
            }
            if (a ^ b) & (a ^ r) & sign != 0 {
                f |= RFLAGS_OF;
            }
            if (a ^ b ^ r) & 0x10 != 0 {
                f |= RFLAGS_AF;
            }
            (r, f)
        }
        AluOp::And => (a & b, 0),
        AluOp::Or => (a | b, 0),
        AluOp::Xor => (a ^ b, 0),
    };
    (result, flags | result_flags(result, size))
}

/// Read general-purpose register `reg` at `size` bytes; without REX, byte registers 4–7 are
/// AH, CH, DH and BH.
fn read_reg(regs: &(impl Registers + ?Sized), reg: u8, size: u8, rex: bool) -> u64 {
    if size == 1 && !rex && (4..8).contains(&reg) {
        return (regs.gpr(reg - 4) >> 8) & 0xff;
    }
    regs.gpr(reg) & size_mask(size)
}

/// Write `size` bytes of `value` to register `reg`: 8- and 16-bit writes keep the other
/// bits, 32-bit writes clear the upper half, as the processor does.
fn write_reg(regs: &mut (impl Registers + ?Sized), reg: u8, value: u64, size: u8, rex: bool) {
    if size == 1 && !rex && (4..8).contains(&reg) {
        let full = regs.gpr(reg - 4);
        regs.set_gpr(reg - 4, (full & !0xff00) | ((value & 0xff) << 8));
        return;
    }
    let full = regs.gpr(reg);
    let new = match size {
        1 | 2 => (full & !size_mask(size)) | (value & size_mask(size)),
        4 => value & 0xffff_ffff,
        _ => value,
    };
    regs.set_gpr(reg, new);
}

fn set_status(regs: &mut (impl Registers + ?Sized), mask: u64, flags: u64) {
    let rflags = regs.rflags();
    regs.set_rflags((rflags & !mask) | (flags & mask));
}

fn mmio_read(bus: &mut (impl GuestBus + ?Sized), gpa: u64, size: u8) -> Result<u64, EmulError> {
    let mut buf = [0u8; 8];
    bus.mmio_read(gpa, &mut buf[..usize::from(size)])
        .map_err(EmulError::Access)?;
    Ok(u64::from_le_bytes(buf))
}

fn mmio_write(
    bus: &mut (impl GuestBus + ?Sized),
    gpa: u64,
    value: u64,
    size: u8,
) -> Result<(), EmulError> {
    bus.mmio_write(gpa, &value.to_le_bytes()[..usize::from(size)])
        .map_err(EmulError::Access)
}

/// The effective address (offset within the segment) of a ModRM or moffs memory operand,
/// truncated to the address size. `rip` is the instruction's own RIP.
pub fn effective_address(
    inst: &Instruction,
    mem: &MemOperand,
    regs: &(impl Registers + ?Sized),
    rip: u64,
) -> u64 {
    let mut ea = mem.displacement as u64;
    match mem.base {
        Some(Base::Rip) => ea = ea.wrapping_add(rip.wrapping_add(u64::from(inst.length))),
        Some(Base::Gpr(reg)) => {
            let mut base = regs.gpr(reg);
            // POP with an RSP-based destination addresses memory after RSP was incremented.
            if inst.operation == Operation::Pop && reg == RSP {
                base = base.wrapping_add(u64::from(inst.operand_size));
            }
            ea = ea.wrapping_add(base);
        }
        None => {}
    }
    if let Some(index) = mem.index {
        ea = ea.wrapping_add(regs.gpr(index).wrapping_mul(u64::from(mem.scale)));
    }
    ea & size_mask(inst.address_size)
}

/// The segmented address `seg:offset` checked and turned into a linear address, as FreeBSD's
/// `vie_calculate_gla` and its callers do: segment type and limit outside 64-bit mode, the
/// canonical form in 64-bit mode, and alignment checking for CPL 3.
#[allow(clippy::too_many_arguments)]
pub fn linear_address(
    paging: &Paging,
    regs: &(impl Registers + ?Sized),
    seg: SegReg,
    offset: u64,
    length: u8,
    address_size: u8,
    write: bool,
) -> Result<u64, Exception> {
    let fault = if seg == SegReg::Ss {
        Exception::ss()
    } else {
        Exception::gp()
    };
    let desc = regs.segment(seg);
    let long = paging.cpu_mode == CpuMode::Long64;
    if !long && paging.cpu_mode != CpuMode::Real {
        if desc.unusable || !desc.present {
            return Err(fault);
        }
        let code = desc.type_ & 0x8 != 0;
        let readable_or_writable = desc.type_ & 0x2 != 0;
        if !write && code && !readable_or_writable {
            return Err(fault); // execute-only code
        }
        if write && (code || !readable_or_writable) {
            return Err(fault); // code or read-only data
        }
        let (low, high) = if !code && desc.type_ & 0x4 != 0 {
            // Expand-down data segment.
            (
                u64::from(desc.limit) + 1,
                if desc.db { 0xffff_ffff } else { 0xffff },
            )
        } else {
            (0, u64::from(desc.limit))
        };
        for i in 0..u64::from(length) {
            let off = offset.wrapping_add(i) & size_mask(address_size);
            if off < low || off > high {
                return Err(fault);
            }
        }
    }
    let base = if long && seg != SegReg::Fs && seg != SegReg::Gs {
        0
    } else {
        desc.base
    };
    let gla_mask = if long { u64::MAX } else { 0xffff_ffff };
    let gla = base.wrapping_add(offset & size_mask(address_size)) & gla_mask;
    if !is_canonical(paging.cpu_mode, gla) {
        return Err(fault);
    }
    if paging.cpl == 3
        && regs.cr0() & CR0_AM != 0
        && regs.rflags() & RFLAGS_AC != 0
        && gla & (u64::from(length) - 1) != 0
    {
        return Err(Exception::ac());
    }
    Ok(gla)
}

/// The linear address of the instruction's ModRM or moffs memory operand, checked as the
/// processor checks it (`None` for MOVS and STOS, whose operands are implicit). A backend
/// compares it with the exit's guest-linear address, as FreeBSD's `verify_gla` does, or
/// translates it when the exit gave none.
pub fn operand_linear_address(
    inst: &Instruction,
    paging: &Paging,
    regs: &(impl Registers + ?Sized),
) -> Option<Result<u64, Exception>> {
    let mem = inst.memory?;
    let ea = effective_address(inst, &mem, regs, regs.rip());
    let write = matches!(
        inst.operation,
        Operation::AluMemReg(op) | Operation::AluMemImm(op) if op.writes_result()
    ) || matches!(
        inst.operation,
        Operation::MovToMem | Operation::MovImmToMem | Operation::MovAccToMoffs | Operation::Pop
    );
    Some(linear_address(
        paging,
        regs,
        mem.segment,
        ea,
        inst.access_size(),
        inst.address_size,
        write,
    ))
}

/// Where an implicit string or stack operand lives.
enum Place {
    Ram(u64),
    Mmio(u64),
}

/// Translate `seg:offset` and say whether the bytes are RAM or MMIO.
#[allow(clippy::too_many_arguments)]
fn locate(
    paging: &Paging,
    regs: &(impl Registers + ?Sized),
    bus: &mut (impl GuestBus + ?Sized),
    seg: SegReg,
    offset: u64,
    size: u8,
    address_size: u8,
    write: bool,
) -> Result<Result<Place, Exception>, EmulError> {
    let gla = match linear_address(paging, regs, seg, offset, size, address_size, write) {
        Ok(gla) => gla,
        Err(e) => return Ok(Err(e)),
    };
    let access = if write { Access::Write } else { Access::Read };
    let gpa = match translate(paging, gla, access, bus) {
        Ok(gpa) => gpa,
        Err(e) => {
            return match e.exception() {
                Some(exception) => Ok(Err(exception)),
                None => Err(EmulError::Translate(e)),
            }
        }
    };
    let mut probe = [0u8; 8];
    Ok(Ok(if bus.ram_read(gpa, &mut probe[..usize::from(size)]) {
        Place::Ram(gpa)
    } else {
        Place::Mmio(gpa)
    }))
}

fn load(bus: &mut (impl GuestBus + ?Sized), place: &Place, size: u8) -> Result<u64, EmulError> {
    match *place {
        Place::Mmio(gpa) => mmio_read(bus, gpa, size),
        Place::Ram(gpa) => {
            let mut buf = [0u8; 8];
            if !bus.ram_read(gpa, &mut buf[..usize::from(size)]) {
                return Err(EmulError::NotRam { gpa });
            }
            Ok(u64::from_le_bytes(buf))
        }
    }
}

fn store(
    bus: &mut (impl GuestBus + ?Sized),
    place: &Place,
    value: u64,
    size: u8,
) -> Result<(), EmulError> {
    match *place {
        Place::Mmio(gpa) => mmio_write(bus, gpa, value, size),
        Place::Ram(gpa) => {
            if !bus.ram_write(gpa, &value.to_le_bytes()[..usize::from(size)]) {
                return Err(EmulError::NotRam { gpa });
            }
            Ok(())
        }
    }
}

/// Execute `inst`, whose memory operand the hardware found at guest-physical `gpa` (the
/// faulting address of the exit). MOVS, STOS, PUSH and POP locate their implicit operands
/// themselves through the segment registers and the guest's page tables, as they may be
/// RAM or MMIO. RIP advances unless the outcome says otherwise.
pub fn execute(
    inst: &Instruction,
    gpa: u64,
    paging: &Paging,
    regs: &mut (impl Registers + ?Sized),
    bus: &mut (impl GuestBus + ?Sized),
) -> Result<Outcome, EmulError> {
    let size = inst.operand_size;
    let mask = size_mask(size);
    let rex = inst.rex;
    let carry = regs.rflags() & RFLAGS_CF != 0;
    match inst.operation {
        Operation::AluMemReg(op) => {
            let a = mmio_read(bus, gpa, size)?;
            let b = read_reg(regs, inst.reg, size, rex);
            let (r, flags) = alu(op, a, b, carry, size);
            if op.writes_result() {
                mmio_write(bus, gpa, r, size)?;
            }
            set_status(regs, RFLAGS_STATUS, flags);
        }
        Operation::AluRegMem(op) => {
            let b = mmio_read(bus, gpa, size)?;
            let a = read_reg(regs, inst.reg, size, rex);
            let (r, flags) = alu(op, a, b, carry, size);
            if op.writes_result() {
                write_reg(regs, inst.reg, r, size, rex);
            }
            set_status(regs, RFLAGS_STATUS, flags);
        }
        Operation::AluMemImm(op) => {
            let a = mmio_read(bus, gpa, size)?;
            let (r, flags) = alu(op, a, inst.immediate as u64, carry, size);
            if op.writes_result() {
                mmio_write(bus, gpa, r, size)?;
            }
            set_status(regs, RFLAGS_STATUS, flags);
        }
        Operation::TestMemReg => {
            let a = mmio_read(bus, gpa, size)?;
            let b = read_reg(regs, inst.reg, size, rex);
            set_status(regs, RFLAGS_STATUS, alu(AluOp::And, a, b, false, size).1);
        }
        Operation::TestMemImm => {
            let a = mmio_read(bus, gpa, size)?;
            let flags = alu(AluOp::And, a, inst.immediate as u64, false, size).1;
            set_status(regs, RFLAGS_STATUS, flags);
        }
        Operation::MovToMem => {
            let value = read_reg(regs, inst.reg, size, rex);
            mmio_write(bus, gpa, value, size)?;
        }
        Operation::MovFromMem => {
            let value = mmio_read(bus, gpa, size)?;
            write_reg(regs, inst.reg, value, size, rex);
        }
        Operation::MovImmToMem => mmio_write(bus, gpa, inst.immediate as u64 & mask, size)?,
        Operation::MovMoffsToAcc => {
            let value = mmio_read(bus, gpa, size)?;
            write_reg(regs, RAX, value, size, rex);
        }
        Operation::MovAccToMoffs => {
            let value = read_reg(regs, RAX, size, rex);
            mmio_write(bus, gpa, value, size)?;
        }
        Operation::Movzx { source } => {
            let value = mmio_read(bus, gpa, source)?;
            write_reg(regs, inst.reg, value, size, rex);
        }
        Operation::Movsx { source } => {
            let value = sign_extend(mmio_read(bus, gpa, source)?, source);
            write_reg(regs, inst.reg, value, size, rex);
        }
        Operation::Movsxd => {
            let source = size.min(4);
            let value = sign_extend(mmio_read(bus, gpa, source)?, source);
            write_reg(regs, inst.reg, value, size, rex);
        }
        Operation::BtImm => {
            let value = mmio_read(bus, gpa, size)?;
            let bit = (inst.immediate as u64) & (u64::from(size) * 8 - 1);
            // Only CF is defined; FreeBSD leaves the other flags alone.
            let cf = if value >> bit & 1 != 0 { RFLAGS_CF } else { 0 };
            set_status(regs, RFLAGS_CF, cf);
        }
        // The flush means nothing to an emulated device; it is carried out as the one-byte
        // read that FreeBSD and KVM both make of it.
        Operation::Clflush => {
            mmio_read(bus, gpa, 1)?;
        }
        Operation::Bextr => {
            let source = mmio_read(bus, gpa, size)?;
            let control = regs.gpr(inst.vex_reg);
            let (start, len) = (control & 0xff, (control >> 8) & 0xff);
            let shifted = if start >= u64::from(size) * 8 {
                0
            } else {
                source >> start
            };
            let value = if len >= 64 {
                shifted
            } else {
                shifted & ((1 << len) - 1)
            };
            write_reg(regs, inst.reg, value, size, true);
            // ZF from the result, CF and OF cleared; AF, SF and PF are undefined and cleared
            // as FreeBSD clears them.
            let zf = if value & mask == 0 { RFLAGS_ZF } else { 0 };
            set_status(regs, RFLAGS_STATUS, zf);
        }
        Operation::Push | Operation::Pop => return stack_op(inst, gpa, paging, regs, bus),
        Operation::Movs | Operation::Stos => return string_op(inst, paging, regs, bus),
    }
    regs.set_rip(regs.rip().wrapping_add(u64::from(inst.length)));
    Ok(Outcome::Completed)
}

/// PUSH r/m (memory operand read from MMIO, pushed to the stack) and POP r/m (popped from the
/// stack, written to MMIO).
fn stack_op(
    inst: &Instruction,
    gpa: u64,
    paging: &Paging,
    regs: &mut (impl Registers + ?Sized),
    bus: &mut (impl GuestBus + ?Sized),
) -> Result<Outcome, EmulError> {
    let size = inst.operand_size;
    let push = inst.operation == Operation::Push;
    // The stack pointer's width: 64 bits in 64-bit mode, else SS.B decides.
    let stack_size = match paging.cpu_mode {
        CpuMode::Long64 => 8,
        CpuMode::Real => 2,
        _ if regs.segment(SegReg::Ss).db => 4,
        _ => 2,
    };
    let mut rsp = regs.gpr(RSP);
    if push {
        rsp = rsp.wrapping_sub(u64::from(size));
    }
    let place = match locate(paging, regs, bus, SegReg::Ss, rsp, size, stack_size, push)? {
        Ok(place) => place,
        Err(exception) => return Ok(Outcome::Exception(exception)),
    };
    if push {
        let value = mmio_read(bus, gpa, size)?;
        store(bus, &place, value, size)?;
    } else {
        let value = load(bus, &place, size)?;
        mmio_write(bus, gpa, value, size)?;
        rsp = rsp.wrapping_add(u64::from(size));
    }
    write_reg(regs, RSP, rsp, stack_size, true);
    regs.set_rip(regs.rip().wrapping_add(u64::from(inst.length)));
    Ok(Outcome::Completed)
}

/// One iteration of MOVS or STOS. Either side may be RAM or MMIO (MOVS from RAM to RAM never
/// exits, but is carried out all the same).
fn string_op(
    inst: &Instruction,
    paging: &Paging,
    regs: &mut (impl Registers + ?Sized),
    bus: &mut (impl GuestBus + ?Sized),
) -> Result<Outcome, EmulError> {
    let size = inst.operand_size;
    let asize = inst.address_size;
    let amask = size_mask(asize);
    let rcx = regs.gpr(RCX);
    if inst.rep.is_some() && rcx & amask == 0 {
        regs.set_rip(regs.rip().wrapping_add(u64::from(inst.length)));
        return Ok(Outcome::Completed);
    }
    let rsi = regs.gpr(RSI);
    let rdi = regs.gpr(RDI);
    if inst.operation == Operation::Movs {
        let seg = inst.segment_override.unwrap_or(SegReg::Ds);
        let source = match locate(paging, regs, bus, seg, rsi, size, asize, false)? {
            Ok(place) => place,
            Err(exception) => return Ok(Outcome::Exception(exception)),
        };
        // Both addresses are checked before the read, whose side effects must not happen
        // twice if the write faults.
        let dest = match locate(paging, regs, bus, SegReg::Es, rdi, size, asize, true)? {
            Ok(place) => place,
            Err(exception) => return Ok(Outcome::Exception(exception)),
        };
        let value = load(bus, &source, size)?;
        store(bus, &dest, value, size)?;
    } else {
        let dest = match locate(paging, regs, bus, SegReg::Es, rdi, size, asize, true)? {
            Ok(place) => place,
            Err(exception) => return Ok(Outcome::Exception(exception)),
        };
        let value = read_reg(regs, RAX, size, true);
        store(bus, &dest, value, size)?;
    }
    let step = if regs.rflags() & RFLAGS_DF != 0 {
        u64::from(size).wrapping_neg()
    } else {
        u64::from(size)
    };
    if inst.operation == Operation::Movs {
        write_reg(regs, RSI, rsi.wrapping_add(step), asize, true);
    }
    write_reg(regs, RDI, rdi.wrapping_add(step), asize, true);
    if inst.rep.is_some() {
        let left = rcx.wrapping_sub(1);
        write_reg(regs, RCX, left, asize, true);
        if left & amask != 0 {
            return Ok(Outcome::Repeat);
        }
    }
    regs.set_rip(regs.rip().wrapping_add(u64::from(inst.length)));
    Ok(Outcome::Completed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_of_add_and_sub_match_the_manual() {
        // 0x7f + 1 overflows a signed byte; AF from bit 3.
        let (r, f) = alu(AluOp::Add, 0x7f, 1, false, 1);
        assert_eq!(r, 0x80);
        assert_eq!(f, RFLAGS_OF | RFLAGS_SF | RFLAGS_AF);
        // 0 - 1: borrow, result all ones (even parity), negative.
        let (r, f) = alu(AluOp::Sub, 0, 1, false, 4);
        assert_eq!(r, 0xffff_ffff);
        assert_eq!(f, RFLAGS_CF | RFLAGS_SF | RFLAGS_AF | RFLAGS_PF);
        // 64-bit carry out with a zero result.
        let (r, f) = alu(AluOp::Add, u64::MAX, 1, false, 8);
        assert_eq!(r, 0);
        assert_eq!(f, RFLAGS_CF | RFLAGS_ZF | RFLAGS_PF | RFLAGS_AF);
        // SBB with the borrow in: 5 - 5 - 1.
        let (r, f) = alu(AluOp::Sbb, 5, 5, true, 2);
        assert_eq!(r, 0xffff);
        assert_eq!(f & RFLAGS_CF, RFLAGS_CF);
    }
}
