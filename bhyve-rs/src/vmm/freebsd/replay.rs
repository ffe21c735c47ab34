//! Replaying an instruction another hypervisor ran as FreeBSD's vmm would report it: the
//! exit records its kernel builds (from the VMX/SVM exit information and its own instruction
//! decoding), fed one by one to [`handle_exit`] with a simulated vCPU, as bhyve's run loop
//! does, until the instruction is done. The KVM oracle tests compare the outcome with what
//! KVM did.

use vmm_sys::*;

use super::exits::sim::SimVcpu;
use super::exits::{handle_exit, ExitAction};
use super::regs::segment_to_desc;
use crate::vmm::x86emul::exec::operand_linear_address;
use crate::vmm::x86emul::{
    decode, CpuMode, CpuState, GuestBus, Paging, PagingMode, Registers, SegReg,
};
use crate::vmm::ExitHandler;

/// How an instruction ends after its exits.
#[derive(Debug, Clone)]
pub(crate) struct Replayed {
    /// Registers after the instruction, RIP where the kernel resumes the guest.
    pub state: CpuState,
    /// Exit records it took.
    pub records: usize,
    /// Exceptions the exit logic raised.
    pub injected: Vec<crate::vmm::x86emul::Exception>,
}

/// `struct vm_guest_paging` of a vCPU in `paging`.
pub(crate) fn kernel_paging(p: &Paging) -> vm_guest_paging {
    vm_guest_paging {
        cr3: p.cr3,
        cpl: i32::from(p.cpl),
        cpu_mode: match p.cpu_mode {
            CpuMode::Real => CPU_MODE_REAL,
            CpuMode::Protected => CPU_MODE_PROTECTED,
            CpuMode::Compatibility => CPU_MODE_COMPATIBILITY,
            CpuMode::Long64 => CPU_MODE_64BIT,
        },
        paging_mode: match p.paging_mode {
            PagingMode::Flat => PAGING_MODE_FLAT,
            PagingMode::Bits32 => PAGING_MODE_32,
            PagingMode::Pae => PAGING_MODE_PAE,
            PagingMode::Long4 => PAGING_MODE_64,
            PagingMode::Long5 => PAGING_MODE_64_LA57,
        },
    }
}

/// A port I/O instruction as the hardware describes it to the kernel.
struct PortInstruction {
    port: Option<u16>,
    bytes: u16,
    input: bool,
    string: bool,
    rep: bool,
    address_size: u8,
    segment: SegReg,
}

/// Legacy prefixes, REX and the opcode of an IN, OUT, INS or OUTS; `None` for anything else.
fn port_instruction(bytes: &[u8], mode: CpuMode, cs_d: bool) -> Option<PortInstruction> {
    let default32 = mode == CpuMode::Long64 || cs_d;
    let (mut opsize16, mut addr_override, mut rep) = (false, false, false);
    let mut segment = SegReg::Ds;
    let mut at = 0;
    while let Some(&b) = bytes.get(at) {
        match b {
            0x66 => opsize16 = true,
            0x67 => addr_override = true,
            0xf2 | 0xf3 => rep = true,
            0x26 => segment = SegReg::Es,
            0x2e => segment = SegReg::Cs,
            0x36 => segment = SegReg::Ss,
            0x3e => segment = SegReg::Ds,
            0x64 => segment = SegReg::Fs,
            0x65 => segment = SegReg::Gs,
            0x40..=0x4f if mode == CpuMode::Long64 => {}
            _ => break,
        }
        at += 1;
    }
    let op = *bytes.get(at)?;
    let wide = if op & 1 == 0 {
        1
    } else if opsize16 == default32 {
        2
    } else {
        4
    };
    let address_size = match (mode, addr_override) {
        (CpuMode::Long64, false) => 8,
        (CpuMode::Long64, true) => 4,
        (_, o) => {
            if cs_d != o {
                4
            } else {
                2
            }
        }
    };
    let (port, input, string) = match op {
        0xe4 | 0xe5 => (Some(u16::from(*bytes.get(at + 1)?)), true, false),
        0xe6 | 0xe7 => (Some(u16::from(*bytes.get(at + 1)?)), false, false),
        0xec | 0xed => (None, true, false),
        0xee | 0xef => (None, false, false),
        0x6c | 0x6d => (None, true, true),
        0x6e | 0x6f => (None, false, true),
        _ => return None,
    };
    Some(PortInstruction {
        port,
        bytes: wide,
        input,
        string,
        rep: rep && string,
        address_size,
        // INS always writes ES:RDI.
        segment: if string && input { SegReg::Es } else { segment },
    })
}

fn vm_reg(seg: SegReg) -> vm_reg_name {
    match seg {
        SegReg::Es => VM_REG_GUEST_ES,
        SegReg::Cs => VM_REG_GUEST_CS,
        SegReg::Ss => VM_REG_GUEST_SS,
        SegReg::Ds => VM_REG_GUEST_DS,
        SegReg::Fs => VM_REG_GUEST_FS,
        SegReg::Gs => VM_REG_GUEST_GS,
    }
}

/// The exit record FreeBSD's kernel builds for the port instruction at the vCPU's RIP
/// (`vmx_exit_process` / `svm_vmexit` with `inout_str_*`).
fn port_record(state: &CpuState, p: &PortInstruction, len: usize) -> vm_exit {
    let paging = Paging::from_special_regs(&state.sregs);
    let mut io = vm_inout {
        port: p.port.unwrap_or(state.regs.rdx as u16),
        eax: state.regs.rax as u32,
        ..Default::default()
    };
    io.set_bytes(p.bytes);
    io.set_in(u16::from(p.input));
    io.set_string(u16::from(p.string));
    io.set_rep(u16::from(p.rep));
    let mut exit = vm_exit {
        exitcode: if p.string {
            VM_EXITCODE_INOUT_STR
        } else {
            VM_EXITCODE_INOUT
        },
        inst_length: len as i32,
        rip: state.regs.rip,
        ..Default::default()
    };
    if !p.string {
        exit.u.inout = io;
        return exit;
    }
    exit.u.inout_str = vm_inout_str {
        inout: io,
        paging: kernel_paging(&paging),
        rflags: state.regs.rflags,
        cr0: state.sregs.cr0,
        index: if p.input {
            state.regs.rdi
        } else {
            state.regs.rsi
        },
        count: if p.rep { state.regs.rcx } else { 1 },
        addrsize: i32::from(p.address_size),
        seg_name: vm_reg(p.segment),
        seg_desc: segment_to_desc(&state.segment(p.segment)),
        cs_d: i32::from(state.sregs.cs.db),
        cs_base: state.sregs.cs.base,
    };
    exit
}

/// The `VM_EXITCODE_INST_EMUL` record for the instruction `bytes` at the vCPU's RIP whose
/// access faulted at `gpa`: the instruction bytes, the linear address of its memory operand
/// (where it has a ModRM or moffs operand; string forms locate theirs themselves), the
/// paging state and CS.
fn inst_emul_record(state: &CpuState, bytes: &[u8], gpa: u64) -> vm_exit {
    let paging = Paging::from_special_regs(&state.sregs);
    let gla = decode(bytes, paging.decode_mode(&state.sregs.cs))
        .ok()
        .and_then(|inst| operand_linear_address(&inst, &paging, state))
        .and_then(|r| r.ok())
        .unwrap_or(0);
    let mut ie = vm_exit_inst_emul {
        gpa,
        gla,
        cs_base: state.sregs.cs.base,
        cs_d: i32::from(state.sregs.cs.db),
        paging: kernel_paging(&paging),
        ..Default::default()
    };
    let n = bytes.len().min(ie.vie.inst.len());
    ie.vie.inst[..n].copy_from_slice(&bytes[..n]);
    ie.vie.num_valid = n as u8;
    let mut exit = vm_exit {
        exitcode: VM_EXITCODE_INST_EMUL,
        inst_length: bytes.len() as i32,
        rip: state.regs.rip,
        ..Default::default()
    };
    exit.u.inst_emul = ie;
    exit
}

/// Run the instruction `bytes` at `start`'s RIP through FreeBSD's exit records: port I/O as
/// `INOUT`/`INOUT_STR`, anything else as `INST_EMUL` at `fault_gpa` (the first MMIO address
/// the instruction touched). Records repeat while the exit logic restarts the instruction.
pub(crate) fn replay_instruction(
    bytes: &[u8],
    start: &CpuState,
    fault_gpa: u64,
    bus: &mut (impl GuestBus + ?Sized),
    handler: &dyn ExitHandler,
) -> Result<Replayed, String> {
    let mut state = *start;
    let mut records = 0;
    let mut injected = Vec::new();
    let paging = Paging::from_special_regs(&state.sregs);
    let port = port_instruction(bytes, paging.cpu_mode, state.sregs.cs.db);
    loop {
        let exit = match &port {
            Some(p) => port_record(&state, p, bytes.len()),
            None => inst_emul_record(&state, bytes, fault_gpa),
        };
        records += 1;
        let mut vcpu = SimVcpu::new(state);
        match handle_exit(&exit, &mut vcpu, bus, handler) {
            ExitAction::Continue => {}
            ExitAction::Exit(event) => return Err(format!("the exit logic stopped: {event:?}")),
        }
        state = vcpu.state;
        state.regs.rip = vcpu.resume_rip(&exit);
        injected.extend(vcpu.injected.iter().copied());
        if !vcpu.restarted || !vcpu.injected.is_empty() {
            return Ok(Replayed {
                state,
                records,
                injected,
            });
        }
        if records > 4096 {
            return Err("the instruction never finished".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_instructions_decode_as_the_hardware_reports_them() {
        let p = port_instruction(&[0x66, 0xe5, 0x60], CpuMode::Long64, false).unwrap();
        assert_eq!(
            (p.port, p.bytes, p.input, p.string),
            (Some(0x60), 2, true, false)
        );
        let p = port_instruction(&[0xf3, 0x67, 0x6f], CpuMode::Long64, false).unwrap();
        assert_eq!(
            (p.bytes, p.input, p.rep, p.address_size),
            (4, false, true, 4)
        );
        assert_eq!(p.segment, SegReg::Ds);
        let p = port_instruction(&[0x64, 0x6c], CpuMode::Compatibility, true).unwrap();
        assert_eq!((p.bytes, p.segment, p.address_size), (1, SegReg::Es, 4));
        let p = port_instruction(&[0x64, 0x6e], CpuMode::Protected, false).unwrap();
        assert_eq!((p.segment, p.address_size), (SegReg::Fs, 2));
        assert!(port_instruction(&[0x89, 0x03], CpuMode::Long64, false).is_none());
    }
}
