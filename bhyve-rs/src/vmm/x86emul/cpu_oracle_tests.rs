//! The host processor as the oracle where KVM's emulator cannot be one: small programs
//! assembled with nasm run natively and report what the CPU did. They skip (with a message)
//! where nasm or ld is missing, or the CPU lacks the instruction.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::decode::{decode, DecodeMode, Operation};
use super::exec::{execute, Outcome, RFLAGS_CF, RFLAGS_OF, RFLAGS_STATUS, RFLAGS_ZF};
use super::{CpuMode, CpuState, GuestBus, Paging, PagingMode, Registers, SegReg};
use crate::vmm::AccessFault;

fn tools_present() -> bool {
    ["nasm", "ld"].iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    })
}

/// Assemble and link `program` in a fresh directory; the executable's path.
fn build(name: &str, program: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("bhyve-rs-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (source, object, binary) = (dir.join("t.asm"), dir.join("t.o"), dir.join("t"));
    std::fs::write(&source, program).unwrap();
    let run = |command: &mut Command| {
        let out = command.output().unwrap();
        assert!(
            out.status.success(),
            "{command:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new("nasm")
        .arg("-felf64")
        .arg(&source)
        .arg("-o")
        .arg(&object));
    run(Command::new("ld").arg(&object).arg("-o").arg(&binary));
    (dir, binary)
}

fn cleanup(dir: &Path) {
    std::fs::remove_dir_all(dir).ok();
}

fn cpu_has(flag: &str) -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|info| {
            info.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == flag))
        })
        .unwrap_or(false)
}

/// `64 26 8b 03` (`mov eax, fs:[rbx]` with a null ES prefix after FS): KVM's emulator and
/// FreeBSD's decoder let ES win, iced-x86 keeps FS. The CPU decides, with an FS base that
/// makes the two readings load different values.
#[test]
fn null_segment_prefix_leaves_fs_in_force_on_this_cpu() {
    if !tools_present() {
        eprintln!("skipped: nasm or ld is not installed");
        return;
    }
    const PROGRAM: &str = r#"
bits 64
global _start
section .data
flat: dd 0x11111111
      times 60 db 0
based: dd 0x22222222
section .text
_start:
    lea rsi, [rel based]      ; FS base = based - flat, so fs:[flat] reads `based`
    lea rax, [rel flat]
    sub rsi, rax
    mov edi, 0x1002           ; arch_prctl(ARCH_SET_FS, rsi)
    mov eax, 158
    syscall
    lea rbx, [rel flat]
    db 0x64, 0x26, 0x8b, 0x03 ; fs es mov eax, [rbx]
    mov edi, 1
    cmp eax, 0x22222222
    je .exit
    mov edi, 2
    cmp eax, 0x11111111
    je .exit
    mov edi, 3
.exit:
    mov eax, 60
    syscall
"#;
    let (dir, binary) = build("segprefix", PROGRAM);
    let status = Command::new(&binary).status().unwrap();
    cleanup(&dir);
    assert_eq!(
        status.code(),
        Some(1),
        "exit 1: the CPU used FS; 2: it used the flat ES view; 3: neither"
    );
    let ours = decode(&[0x64, 0x26, 0x8b, 0x03], DecodeMode::LONG64).unwrap();
    assert_eq!(ours.memory.unwrap().segment, SegReg::Fs);
}

/// A bus whose MMIO holds one value.
struct OneValue(u64);

impl GuestBus for OneValue {
    fn mmio_read(&mut self, _: u64, data: &mut [u8]) -> Result<(), AccessFault> {
        let bytes = self.0.to_le_bytes();
        data.copy_from_slice(&bytes[..data.len()]);
        Ok(())
    }
    fn mmio_write(&mut self, gpa: u64, _: &[u8]) -> Result<(), AccessFault> {
        Err(AccessFault(format!("unexpected write at {gpa:#x}")))
    }
    fn ram_read(&mut self, _: u64, _: &mut [u8]) -> bool {
        false
    }
    fn ram_write(&mut self, _: u64, _: &[u8]) -> bool {
        false
    }
}

/// BEXTR, FreeBSD's one VEX form, which KVM's emulator does not emulate: the CPU runs it on
/// a table of sources and controls (starts and lengths inside, at and beyond the operand
/// size), 32- and 64-bit, and reports each result and RFLAGS; the emulator must give the
/// same result, ZF, CF and OF (AF, SF and PF are undefined).
#[test]
fn bextr_matches_this_cpu() {
    if !tools_present() {
        eprintln!("skipped: nasm or ld is not installed");
        return;
    }
    if !cpu_has("bmi1") {
        eprintln!("skipped: this CPU has no BMI1 (BEXTR)");
        return;
    }
    const SOURCES: [u64; 4] = [
        0xfedc_ba98_7654_3210,
        0x8000_0000_0000_0001,
        0,
        0x0000_0000_ffff_0000,
    ];
    let starts = [0u64, 1, 4, 16, 31, 32, 33, 63, 64, 200];
    let lengths = [0u64, 1, 8, 16, 31, 32, 33, 64, 65, 255];
    let mut vectors = Vec::new();
    for (i, &source) in SOURCES.iter().enumerate() {
        for &start in &starts {
            for &len in &lengths {
                // Junk above bit 15 of the control must not matter.
                let control = start | (len << 8) | ((i as u64) << 40);
                for wide in [false, true] {
                    vectors.push((source, control, wide));
                }
            }
        }
    }
    let mut program = String::from("bits 64\nglobal _start\nsection .data\nsrc:\n");
    for (source, _, _) in &vectors {
        program += &format!("    dq {source:#x}\n");
    }
    program += &format!(
        "out: times {} db 0\nsection .text\n_start:\n",
        vectors.len() * 16
    );
    for (i, (_, control, wide)) in vectors.iter().enumerate() {
        let flags = if i % 2 == 0 { 0x2 } else { 0x8d7 };
        program += &format!(
            "    mov rcx, {control:#x}\n    mov rdx, 0x5555555555555555\n    push {flags}\n    popfq\n"
        );
        if *wide {
            program += &format!("    bextr rdx, [rel src + {}], rcx\n", 8 * i);
        } else {
            program += &format!("    bextr edx, [rel src + {}], ecx\n", 8 * i);
        }
        program += &format!(
            "    pushfq\n    pop rax\n    mov [rel out + {}], rdx\n    mov [rel out + {}], rax\n",
            16 * i,
            16 * i + 8
        );
    }
    program += &format!(
        "    mov eax, 1\n    mov edi, 1\n    lea rsi, [rel out]\n    mov edx, {}\n    syscall\n    mov eax, 60\n    xor edi, edi\n    syscall\n",
        vectors.len() * 16
    );
    let (dir, binary) = build("bextr", &program);
    let output = Command::new(&binary).output().unwrap();
    cleanup(&dir);
    assert!(output.status.success());
    assert_eq!(output.stdout.len(), vectors.len() * 16);

    let paging = Paging {
        cr3: 0,
        cpl: 0,
        cpu_mode: CpuMode::Long64,
        paging_mode: PagingMode::Flat,
    };
    let mut failures = Vec::new();
    let mut undefined_differ = 0;
    for (i, (source, control, wide)) in vectors.iter().enumerate() {
        let word = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&output.stdout[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let (cpu_result, cpu_flags) = (word(16 * i), word(16 * i + 8));
        // VEX.W1 or W0 bextr rdx/edx, [rbx], rcx/ecx: C4 E2 F0/70 F7 13.
        let bytes = [0xc4, 0xe2, if *wide { 0xf0 } else { 0x70 }, 0xf7, 0x13];
        let inst = decode(&bytes, DecodeMode::LONG64).unwrap();
        assert_eq!(inst.operation, Operation::Bextr);
        let mut state = CpuState::default();
        state.set_gpr(1, *control);
        state.set_gpr(2, 0x5555_5555_5555_5555);
        state.regs.rflags = if i % 2 == 0 { 0x2 } else { 0x8d7 };
        let outcome = execute(&inst, 0x1000, &paging, &mut state, &mut OneValue(*source));
        assert_eq!(outcome, Ok(Outcome::Completed));
        let defined = RFLAGS_ZF | RFLAGS_CF | RFLAGS_OF;
        let ours = (state.gpr(2), state.regs.rflags);
        // Only the status flags: user mode runs with IF set whatever POPFQ asked for.
        if ours.0 != cpu_result || ours.1 & defined != cpu_flags & defined {
            failures.push(format!(
                "bextr {} source {source:#x} control {control:#x}: emulator {:#x} flags {:#x}, CPU {cpu_result:#x} flags {cpu_flags:#x}",
                if *wide { 64 } else { 32 },
                ours.0,
                ours.1
            ));
        }
        if (ours.1 ^ cpu_flags) & RFLAGS_STATUS & !defined != 0 {
            undefined_differ += 1;
        }
    }
    println!(
        "BEXTR against this CPU: {} vectors, {} failures, undefined flags differ in {undefined_differ}",
        vectors.len(),
        failures.len()
    );
    for f in failures.iter().take(20) {
        println!("{f}");
    }
    assert!(failures.is_empty(), "{} mismatches", failures.len());
}
