//! The decoder against iced-x86 on generated encodings of every covered form: each ModRM
//! mode and register, SIB bytes, 8/16/32-bit displacements, legacy prefixes (66h, 67h,
//! segment overrides, LOCK, REP/REPNE), REX combinations, in 64-, 32- and 16-bit modes.
//! Length, access size, register operand, memory operand (base, index, scale, displacement,
//! segment), immediate and prefixes must agree; what iced-x86 calls invalid must be refused.

use std::collections::BTreeMap;

use iced_x86::{Decoder, DecoderOptions, Instruction as Iced, Mnemonic, OpKind, Register};

use super::decode::{decode, Base, DecodeMode, Instruction, Operation, Rep};
use super::exec::size_mask;
use super::{CpuMode, EmulError, SegReg};
use crate::test_rng::Rng;

/// An opcode to generate: its bytes, the fixed ModRM.reg extension (if any), whether it has
/// a ModRM byte, and whether it is a string instruction.
struct Form {
    opcode: Vec<u8>,
    ext: Option<u8>,
    modrm: bool,
    string: bool,
    long_only: bool,
    /// A VEX form: `opcode` is the opcode byte after a generated three-byte VEX prefix.
    vex: bool,
}

fn forms() -> Vec<Form> {
    let form = |opcode: &[u8], ext: Option<u8>| Form {
        opcode: opcode.to_vec(),
        ext,
        modrm: true,
        string: false,
        long_only: false,
        vex: false,
    };
    let mut forms = Vec::new();
    for op in 0..8u8 {
        for low in 0..4u8 {
            forms.push(form(&[(op << 3) | low], None));
        }
        for group1 in [0x80, 0x81, 0x83] {
            forms.push(form(&[group1], Some(op)));
        }
    }
    for op in [0x84, 0x85, 0x88, 0x89, 0x8a, 0x8b] {
        forms.push(form(&[op], None));
    }
    forms.push(form(&[0x8f], Some(0)));
    forms.push(form(&[0xc6], Some(0)));
    forms.push(form(&[0xc7], Some(0)));
    forms.push(form(&[0xf6], Some(0)));
    forms.push(form(&[0xf7], Some(0)));
    forms.push(form(&[0xff], Some(6)));
    for op in [0xb6, 0xb7, 0xbe, 0xbf] {
        forms.push(form(&[0x0f, op], None));
    }
    forms.push(form(&[0x0f, 0xba], Some(4)));
    forms.push(form(&[0x0f, 0xae], Some(7)));
    forms.push(Form {
        long_only: true,
        ..form(&[0x63], None)
    });
    forms.push(Form {
        vex: true,
        ..form(&[0xf7], None)
    });
    for op in [0xa0, 0xa1, 0xa2, 0xa3] {
        forms.push(Form {
            modrm: false,
            ..form(&[op], None)
        });
    }
    for op in [0xa4, 0xa5, 0xaa, 0xab] {
        forms.push(Form {
            modrm: false,
            string: true,
            ..form(&[op], None)
        });
    }
    forms
}

const SEGMENT_PREFIXES: [u8; 6] = [0x26, 0x2e, 0x36, 0x3e, 0x64, 0x65];

/// Legacy prefix sets to put in front.
fn prefixes(rng: &mut Rng, form: &Form, variant: usize) -> Vec<u8> {
    match variant % 8 {
        0 => vec![],
        1 => vec![0x66],
        2 => vec![0x67],
        3 => vec![*rng.pick(&SEGMENT_PREFIXES)],
        4 => vec![0x66, 0x67],
        5 if form.string => vec![*rng.pick(&[0xf3, 0xf2])],
        5 => vec![0xf0],
        6 => vec![*rng.pick(&SEGMENT_PREFIXES), 0x66],
        _ => {
            let all = [
                0x66, 0x67, 0xf0, 0xf2, 0xf3, 0x26, 0x2e, 0x36, 0x3e, 0x64, 0x65,
            ];
            (0..2).map(|_| *rng.pick(&all)).collect()
        }
    }
}

fn segment_register(seg: SegReg) -> Register {
    match seg {
        SegReg::Es => Register::ES,
        SegReg::Cs => Register::CS,
        SegReg::Ss => Register::SS,
        SegReg::Ds => Register::DS,
        SegReg::Fs => Register::FS,
        SegReg::Gs => Register::GS,
    }
}

fn is_high_byte(reg: Register) -> bool {
    matches!(
        reg,
        Register::AH | Register::CH | Register::DH | Register::BH
    )
}

/// The mnemonics this decoder covers: iced-x86 accepting one of them where this decoder
/// refuses is a gap.
fn covered(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Add | Or
            | Adc
            | Sbb
            | And
            | Sub
            | Xor
            | Cmp
            | Test
            | Mov
            | Movzx
            | Movsx
            | Movsxd
            | Movsb
            | Movsw
            | Movsd
            | Movsq
            | Stosb
            | Stosw
            | Stosd
            | Stosq
            | Push
            | Pop
            | Bt
            | Clflush
            | Clflushopt
            | Bextr
    )
}

/// Compare one decoding; `Err` says what differs.
fn compare(ours: &Instruction, iced: &Iced) -> Result<(), String> {
    if usize::from(ours.length) != iced.len() {
        return Err(format!("length {} vs {}", ours.length, iced.len()));
    }
    let size = iced.memory_size().size();
    if usize::from(ours.access_size()) != size {
        return Err(format!("access size {} vs {size}", ours.access_size()));
    }
    let amask = size_mask(ours.address_size);
    if let Some(mem) = ours.memory {
        let base = iced.memory_base();
        match mem.base {
            None if base != Register::None => return Err(format!("base none vs {base:?}")),
            Some(Base::Rip) if !matches!(base, Register::RIP | Register::EIP) => {
                return Err(format!("base RIP vs {base:?}"))
            }
            Some(Base::Gpr(n)) if base.full_register().number() != usize::from(n) => {
                return Err(format!("base {n} vs {base:?}"))
            }
            _ => {}
        }
        let gpr_base = !matches!(base, Register::None | Register::RIP | Register::EIP);
        if gpr_base && base.size() != usize::from(ours.address_size) {
            return Err(format!("base width {} vs {base:?}", ours.address_size));
        }
        let index = iced.memory_index();
        match mem.index {
            None if index != Register::None => return Err(format!("index none vs {index:?}")),
            Some(n) if index.full_register().number() != usize::from(n) => {
                return Err(format!("index {n} vs {index:?}"))
            }
            _ => {}
        }
        if mem.index.is_some() && u32::from(mem.scale) != iced.memory_index_scale() {
            return Err(format!(
                "scale {} vs {}",
                mem.scale,
                iced.memory_index_scale()
            ));
        }
        // iced gives RIP-relative operands as the absolute address (decoded at IP 0).
        let ours_disp = match mem.base {
            Some(Base::Rip) => (mem.displacement as u64).wrapping_add(u64::from(ours.length)),
            _ => mem.displacement as u64,
        };
        if ours_disp & amask != iced.memory_displacement64() & amask {
            return Err(format!(
                "displacement {:#x} vs {:#x}",
                ours_disp,
                iced.memory_displacement64()
            ));
        }
        if segment_register(mem.segment) != iced.memory_segment() {
            return Err(format!(
                "segment {:?} vs {:?}",
                mem.segment,
                iced.memory_segment()
            ));
        }
    }
    // The register operand, where the form has one.
    let has_reg = matches!(
        ours.operation,
        Operation::AluMemReg(_)
            | Operation::AluRegMem(_)
            | Operation::TestMemReg
            | Operation::MovToMem
            | Operation::MovFromMem
            | Operation::Movzx { .. }
            | Operation::Movsx { .. }
            | Operation::Movsxd
            | Operation::Bextr
    );
    if ours.operation == Operation::Bextr {
        let vreg = iced.op_register(2);
        if vreg.full_register().number() != usize::from(ours.vex_reg)
            || vreg.size() != usize::from(ours.operand_size)
        {
            return Err(format!("VEX register {} vs {vreg:?}", ours.vex_reg));
        }
    }
    if has_reg {
        let reg = (0..iced.op_count())
            .find(|&i| iced.op_kind(i) == OpKind::Register)
            .map(|i| iced.op_register(i))
            .ok_or("no register operand")?;
        let high = ours.operand_size == 1 && !ours.rex && (4..8).contains(&ours.reg);
        let number = if high { ours.reg - 4 } else { ours.reg };
        if high != is_high_byte(reg)
            || reg.full_register().number() != usize::from(number)
            || reg.size() != usize::from(ours.operand_size)
        {
            return Err(format!(
                "register {} (size {}, rex {}) vs {reg:?}",
                ours.reg, ours.operand_size, ours.rex
            ));
        }
    }
    if let Some(i) = (0..iced.op_count()).find(|&i| {
        matches!(
            iced.op_kind(i),
            OpKind::Immediate8
                | OpKind::Immediate16
                | OpKind::Immediate32
                | OpKind::Immediate8to16
                | OpKind::Immediate8to32
                | OpKind::Immediate8to64
                | OpKind::Immediate32to64
        )
    }) {
        let mask = if ours.operation == Operation::BtImm {
            0xff
        } else {
            size_mask(ours.operand_size)
        };
        if ours.immediate as u64 & mask != iced.immediate(i) & mask {
            return Err(format!(
                "immediate {:#x} vs {:#x}",
                ours.immediate,
                iced.immediate(i)
            ));
        }
    }
    let string = matches!(ours.operation, Operation::Movs | Operation::Stos);
    if string {
        let rep = if iced.has_rep_prefix() {
            Some(Rep::Rep)
        } else if iced.has_repne_prefix() {
            Some(Rep::Repne)
        } else {
            None
        };
        if ours.rep != rep {
            return Err(format!("rep {:?} vs {rep:?}", ours.rep));
        }
    }
    if ours.lock != iced.has_lock_prefix() {
        return Err(format!("lock {} vs {}", ours.lock, iced.has_lock_prefix()));
    }
    Ok(())
}

#[test]
fn decoder_agrees_with_iced_x86_on_generated_encodings() {
    let modes = [
        (64u32, DecodeMode::LONG64),
        (
            32,
            DecodeMode {
                cpu_mode: CpuMode::Protected,
                cs_d: true,
            },
        ),
        // 16-bit protected mode: iced-x86's 16-bit decoding takes VEX, which real mode
        // does not have (otherwise the two decode alike).
        (
            16,
            DecodeMode {
                cpu_mode: CpuMode::Protected,
                cs_d: false,
            },
        ),
    ];
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let mut checked = 0usize;
    let mut refused_invalid = 0usize;
    let mut refused_uncovered = BTreeMap::<String, usize>::new();
    let mut failures = Vec::new();
    for form in forms() {
        for &(bitness, mode) in &modes {
            if form.long_only && bitness != 64 {
                continue;
            }
            let modrms: Vec<Option<u8>> = if form.modrm {
                (0..3u8)
                    .flat_map(|md| (0..8u8).map(move |rm| (md, rm)))
                    .map(|(md, rm)| Some((md << 6) | rm))
                    .collect()
            } else {
                vec![None; 12]
            };
            for (k, modrm) in modrms.into_iter().enumerate() {
                for variant in 0..4 {
                    let mut bytes = prefixes(&mut rng, &form, k * 4 + variant);
                    // A REX before VEX is #UD: only now and then for the VEX form.
                    let with_rex = if form.vex {
                        rng.next() % 8 == 0
                    } else {
                        rng.next() % 3 != 0
                    };
                    if bitness == 64 && with_rex {
                        bytes.push(0x40 | (rng.byte() & 0xf));
                    }
                    if form.vex {
                        // Mostly map 0F38 with pp = 0 and L = 0 (BEXTR), sometimes not.
                        let odd = rng.next() % 8 == 0;
                        let map = if odd { rng.byte() & 0x1f } else { 2 };
                        let b2 = rng.byte() & if odd { 0xff } else { 0xf8 };
                        bytes.extend([0xc4, (rng.byte() & 0xe0) | map, b2]);
                    }
                    bytes.extend(&form.opcode);
                    if let Some(modrm) = modrm {
                        let reg = form.ext.unwrap_or(rng.byte() & 7);
                        bytes.push(modrm | (reg << 3));
                    }
                    // SIB, displacement, immediate or offset bytes: whatever the decoders take.
                    for _ in 0..10 {
                        bytes.push(rng.byte());
                    }
                    let mut decoder = Decoder::with_ip(bitness, &bytes, 0, DecoderOptions::NONE);
                    let iced = decoder.decode();
                    let what = format!("{bitness}-bit {:02x?}", &bytes[..bytes.len().min(15)]);
                    match decode(&bytes, mode) {
                        Ok(ours) => {
                            if iced.is_invalid() {
                                failures.push(format!(
                                    "{what}: iced-x86 says invalid, decoded {ours:?}"
                                ));
                            } else if let Err(e) = compare(&ours, &iced) {
                                failures.push(format!("{what} ({:?}): {e}", iced.mnemonic()));
                            } else {
                                checked += 1;
                            }
                        }
                        Err(e) => {
                            let explained = matches!(&e, EmulError::Unsupported { what, .. }
                                if what.contains("MOVSXD"));
                            if !iced.is_invalid() && covered(iced.mnemonic()) && !explained {
                                failures
                                    .push(format!("{what} ({:?}): refused: {e}", iced.mnemonic()));
                            } else if iced.is_invalid() {
                                refused_invalid += 1;
                            } else {
                                *refused_uncovered
                                    .entry(format!("{:?}", iced.mnemonic()))
                                    .or_default() += 1;
                            }
                        }
                    }
                }
            }
        }
    }
    println!(
        "decoder cross-check: {checked} encodings agree with iced-x86; refused as iced-x86 \
         does: {refused_invalid} invalid; refused as not covered: {refused_uncovered:?}; {} \
         failures",
        failures.len()
    );
    for f in failures.iter().take(40) {
        println!("{f}");
    }
    assert!(failures.is_empty(), "{} disagreements", failures.len());
    assert!(checked >= 5000, "only {checked} encodings checked");
}

/// Guest-controlled bytes and state must give a result or an error, never a panic: random
/// instruction bytes (half of them starting with a covered opcode) decoded and executed in
/// every mode, over random registers and random page tables.
#[test]
fn random_bytes_and_state_never_panic() {
    use super::exec::{effective_address, execute, linear_address};
    use super::paging::fetch_instruction;
    use super::{CpuState, GuestBus, Paging, PagingMode, Registers};
    use crate::vmm::{AccessFault, Segment};

    struct AnyBus(Vec<u8>);
    impl GuestBus for AnyBus {
        fn mmio_read(&mut self, _: u64, data: &mut [u8]) -> Result<(), AccessFault> {
            data.fill(0xa5);
            Ok(())
        }
        fn mmio_write(&mut self, gpa: u64, _: &[u8]) -> Result<(), AccessFault> {
            if gpa % 7 == 0 {
                return Err(AccessFault(format!("refused write at {gpa:#x}")));
            }
            Ok(())
        }
        fn ram_read(&mut self, gpa: u64, data: &mut [u8]) -> bool {
            super::test_ram::read(&self.0, gpa, data)
        }
        fn ram_write(&mut self, gpa: u64, data: &[u8]) -> bool {
            super::test_ram::write(&mut self.0, gpa, data)
        }
    }

    let mut rng = Rng(0x005e_ed0f_0ddb_17e5);
    let mut bus = AnyBus((0..1 << 20).map(|_| rng.byte()).collect());
    let openers: Vec<Vec<u8>> = forms().into_iter().map(|f| f.opcode).collect();
    let modes = [
        (CpuMode::Real, PagingMode::Flat, false),
        (CpuMode::Protected, PagingMode::Bits32, true),
        (CpuMode::Protected, PagingMode::Pae, false),
        (CpuMode::Compatibility, PagingMode::Long4, true),
        (CpuMode::Long64, PagingMode::Long4, false),
        (CpuMode::Long64, PagingMode::Long5, false),
    ];
    let (mut decoded, mut executed) = (0, 0);
    for _ in 0..60_000 {
        let &(cpu_mode, paging_mode, cs_d) = rng.pick(&modes);
        let mut bytes: Vec<u8> = Vec::new();
        if rng.next() % 2 == 0 {
            bytes.extend(rng.pick(&openers));
        }
        while bytes.len() < 15 {
            bytes.push(rng.byte());
        }
        let cut = (rng.next() % 16) as usize;
        let bytes = &bytes[..cut.max(1)];
        let Ok(inst) = decode(bytes, DecodeMode { cpu_mode, cs_d }) else {
            continue;
        };
        decoded += 1;
        let mut segment = |n: u64| Segment {
            base: rng.next() >> (n % 64),
            limit: (rng.next() >> 32) as u32,
            type_: rng.byte() & 0xf,
            present: rng.next() % 4 != 0,
            db: rng.next() % 2 == 0,
            unusable: rng.next() % 8 == 0,
            ..Default::default()
        };
        let mut state = CpuState::default();
        state.sregs.cs = segment(1);
        state.sregs.ds = segment(2);
        state.sregs.es = segment(3);
        state.sregs.ss = segment(4);
        state.sregs.fs = segment(5);
        state.sregs.gs = segment(6);
        state.sregs.cr0 = rng.next();
        for r in 0..16 {
            let value = match rng.next() % 3 {
                0 => rng.next(),
                1 => rng.next() % (1 << 20),
                _ => rng.next() % 8,
            };
            state.set_gpr(r, value);
        }
        state.regs.rflags = rng.next();
        let paging = Paging {
            cr3: rng.next() % (1 << 21),
            cpl: rng.byte() & 3,
            cpu_mode,
            paging_mode,
        };
        let gpa = rng.next() % (1 << 21);
        if let Some(mem) = inst.memory {
            let ea = effective_address(&inst, &mem, &state, rng.next());
            let size = inst.operand_size;
            let _ = linear_address(
                &paging,
                &state,
                mem.segment,
                ea,
                size,
                inst.address_size,
                true,
            );
        }
        let _ = fetch_instruction(&paging, rng.next() >> (rng.next() % 64), &mut bus);
        let _ = execute(&inst, gpa, &paging, &mut state, &mut bus);
        executed += 1;
    }
    println!("robustness: {decoded} decoded, {executed} executed without a panic");
    assert!(executed > 10_000);
}
