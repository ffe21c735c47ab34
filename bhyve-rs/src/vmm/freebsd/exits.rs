//! What user space does with the exit records `VM_RUN` hands back, as bhyve's
//! `amd64/vmexit.c` and `inout.c` do, over abstract parts so it runs and is tested on any
//! host: the record ([`vm_exit`]), the vCPU's registers and the requests user space makes of
//! the kernel ([`ExitVcpu`]), guest memory and MMIO ([`GuestBus`]) and the devices
//! ([`ExitHandler`]).
//!
//! After an exit the kernel resumes the guest at `rip + inst_length` unless user space sets
//! RIP (`VM_SET_REGISTER`), restarts the instruction (`VM_RESTART_INSTRUCTION`) or injects an
//! exception with restart (bhyve's `vm_inject_fault`); [`ExitVcpu`] has exactly those.
//!
//! Where this differs from bhyve, on purpose:
//! - `IN AL`/`IN AX` keep RAX bits 63:8 / 63:16, as the processor (and KVM) does; bhyve
//!   writes back the record's 32-bit EAX and so clears RAX bits 63:32.
//! - Instructions are decoded by [`crate::vmm::x86emul`] from the record's bytes (or fetched
//!   through the guest page tables when the kernel gave none), never from the kernel's own
//!   decoding, so one decoder serves every kernel release.
//! - A breakpoint exit (only seen if `VM_CAP_BPT_EXIT` were on; no debugger here) goes back
//!   to the guest as its own #BP, as FreeBSD's gdb stub does for breakpoints it did not set.
//! - `MONITOR`, `MWAIT` and VMX/SVM instructions raise #UD in the guest (bhyve stops the VM
//!   with "unexpected exitcode").

use vmm_sys::*;

use crate::vmm::x86emul::exec::{linear_address, size_mask, RFLAGS_DF};
use crate::vmm::x86emul::paging::{fetch_instruction, translate, Access, TranslateError};
use crate::vmm::x86emul::{
    decode, execute, CpuMode, DecodeMode, EmulError, Exception, GuestBus, Outcome, Paging,
    PagingMode, Registers, SegReg,
};
use crate::vmm::{AccessFault, ExitHandler, Segment, SuspendReason, VmExit};

use super::regs::segment_from_desc;

/// bhyve handles at most this many iterations of a string I/O instruction per exit, then
/// lets the guest execute it again (`inout.c`).
pub const STRING_IO_BATCH: u64 = 16;

/// #UD.
const VECTOR_UD: u8 = 6;
/// #BP, which [`ExitVcpu::inject_breakpoint`] raises.
pub const VECTOR_BP: u8 = 3;

/// The vCPU an exit came from, as the exit logic sees it: its registers (read and written
/// through [`Registers`]) and the requests bhyve makes of the kernel for it.
pub trait ExitVcpu: Registers {
    fn vcpu_id(&self) -> u32;
    /// The paging state its control registers give (for exits whose record has none).
    fn paging(&self) -> Paging;
    /// Raise `exception`; the guest takes it at the exiting instruction (bhyve's
    /// `vm_inject_fault`: `VM_INJECT_EXCEPTION` with `restart_instruction`, CR2 set first for
    /// a page fault).
    fn inject_exception(&mut self, exception: Exception);
    /// Hand a breakpoint back to the guest: #BP after the `inst_length`-byte instruction.
    fn inject_breakpoint(&mut self, inst_length: u32);
    /// Execute the exiting instruction again (`VM_RESTART_INSTRUCTION`).
    fn restart_instruction(&mut self);
}

/// What the run loop does after an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitAction {
    /// Enter the guest again.
    Continue,
    /// Leave [`crate::vmm::Vcpu::run`] with this event.
    Exit(VmExit),
}

/// Handle one exit record. Device accesses go to `handler` (ports, MSRs) and `bus` (MMIO and
/// guest RAM for string I/O, page tables and instruction bytes).
pub fn handle_exit(
    exit: &vm_exit,
    vcpu: &mut (impl ExitVcpu + ?Sized),
    bus: &mut (impl GuestBus + ?Sized),
    handler: &dyn ExitHandler,
) -> ExitAction {
    // SAFETY (every union read below): the member read is the one `exitcode` names, and each
    // member is plain data valid for any bit pattern.
    match exit.exitcode {
        VM_EXITCODE_INOUT | VM_EXITCODE_INOUT_STR => {
            let inout = unsafe { exit.u.inout };
            if inout.string() != 0 {
                string_inout(exit, unsafe { &exit.u.inout_str }, vcpu, bus, handler)
            } else {
                port_inout(&inout, vcpu, handler)
            }
        }
        VM_EXITCODE_INST_EMUL => inst_emul(exit, unsafe { &exit.u.inst_emul }, vcpu, bus),
        VM_EXITCODE_PAGING => paging_fault(exit, unsafe { &exit.u.paging }, vcpu, bus),
        VM_EXITCODE_RDMSR => {
            let msr = unsafe { exit.u.msr };
            match handler.msr_read(vcpu.vcpu_id(), msr.code) {
                Ok(Some(value)) => {
                    // RDMSR writes EDX:EAX, clearing the upper halves.
                    vcpu.set_gpr(0, value & 0xffff_ffff);
                    vcpu.set_gpr(2, value >> 32);
                    ExitAction::Continue
                }
                Ok(None) => {
                    vcpu.inject_exception(Exception::gp());
                    ExitAction::Continue
                }
                Err(AccessFault(what)) => ExitAction::Exit(VmExit::AccessFault(what)),
            }
        }
        VM_EXITCODE_WRMSR => {
            let msr = unsafe { exit.u.msr };
            match handler.msr_write(vcpu.vcpu_id(), msr.code, msr.wval) {
                Ok(true) => ExitAction::Continue,
                Ok(false) => {
                    vcpu.inject_exception(Exception::gp());
                    ExitAction::Continue
                }
                Err(AccessFault(what)) => ExitAction::Exit(VmExit::AccessFault(what)),
            }
        }
        VM_EXITCODE_HLT => ExitAction::Exit(VmExit::Halted),
        VM_EXITCODE_SPINUP_AP => {
            let ap = unsafe { exit.u.spinup_ap };
            match u32::try_from(ap.vcpu) {
                Ok(id) => ExitAction::Exit(VmExit::StartAp {
                    vcpu: id,
                    rip: ap.rip,
                }),
                Err(_) => failed(format!("the kernel asked to start vCPU {}", ap.vcpu)),
            }
        }
        VM_EXITCODE_SUSPENDED => {
            let how = unsafe { exit.u.suspended.how };
            match suspend_reason(how) {
                Some(reason) => ExitAction::Exit(VmExit::Suspended(reason)),
                None => failed(format!("vmexit_suspend: invalid reason {how}")),
            }
        }
        // VM_SUSPEND_CPU (the backend's kick) makes VM_RUN return this.
        VM_EXITCODE_DEBUG => ExitAction::Exit(VmExit::Interrupted),
        VM_EXITCODE_BPT => {
            let bpt = unsafe { exit.u.bpt };
            vcpu.inject_breakpoint(bpt.inst_length.max(0) as u32);
            ExitAction::Continue
        }
        VM_EXITCODE_MONITOR | VM_EXITCODE_MWAIT | VM_EXITCODE_VMINSN => {
            vcpu.inject_exception(Exception {
                vector: VECTOR_UD,
                error_code: None,
                cr2: None,
            });
            ExitAction::Continue
        }
        VM_EXITCODE_BOGUS
        | VM_EXITCODE_PAUSE
        | VM_EXITCODE_RENDEZVOUS
        | VM_EXITCODE_REQIDLE
        | VM_EXITCODE_IOAPIC_EOI
        | VM_EXITCODE_MTRAP
        | VM_EXITCODE_DB => ExitAction::Continue,
        VM_EXITCODE_VMX => failed(describe_vmx(exit, unsafe { &exit.u.vmx })),
        VM_EXITCODE_SVM => failed(describe_svm(exit, unsafe { &exit.u.svm })),
        VM_EXITCODE_TASK_SWITCH => failed(format!(
            "the guest switched tasks at rip {:#x}, which is not emulated",
            exit.rip
        )),
        other => failed(format!(
            "unexpected exit code {other} at rip {:#x}",
            exit.rip
        )),
    }
}

fn failed(text: String) -> ExitAction {
    ExitAction::Exit(VmExit::Failed(text))
}

/// bhyve's exit status reasons for `VM_EXITCODE_SUSPENDED`.
pub fn suspend_reason(how: vm_suspend_how) -> Option<SuspendReason> {
    Some(match how {
        VM_SUSPEND_RESET => SuspendReason::Reset,
        VM_SUSPEND_POWEROFF => SuspendReason::PowerOff,
        VM_SUSPEND_HALT => SuspendReason::Halt,
        VM_SUSPEND_TRIPLEFAULT => SuspendReason::TripleFault,
        _ => return None,
    })
}

/// Write `value` to a register as an instruction with `size`-byte operands does: 1 and 2
/// bytes merge, 4 bytes zero-extend, 8 bytes replace (FreeBSD's `vie_update_register`).
fn update_register(regs: &mut (impl Registers + ?Sized), reg: u8, value: u64, size: u8) {
    let value = match size {
        1 | 2 => (regs.gpr(reg) & !size_mask(size)) | (value & size_mask(size)),
        4 => value & 0xffff_ffff,
        _ => value,
    };
    regs.set_gpr(reg, value);
}

fn port_inout(
    inout: &vm_inout,
    vcpu: &mut (impl ExitVcpu + ?Sized),
    handler: &dyn ExitHandler,
) -> ExitAction {
    let bytes = inout.bytes() as u8;
    if !matches!(bytes, 1 | 2 | 4) {
        return failed(format!("port access of {bytes} bytes"));
    }
    let len = usize::from(bytes);
    let result = if inout.r#in() != 0 {
        let mut data = [0u8; 4];
        handler.port_read(inout.port, &mut data[..len]).map(|()| {
            update_register(vcpu, 0, u64::from(u32::from_le_bytes(data)), bytes);
        })
    } else {
        handler.port_write(inout.port, &inout.eax.to_le_bytes()[..len])
    };
    match result {
        Ok(()) => ExitAction::Continue,
        Err(AccessFault(what)) => ExitAction::Exit(VmExit::AccessFault(what)),
    }
}

/// The segment registers by their `VM_REG_GUEST_*` numbers.
fn seg_reg(name: vm_reg_name) -> Option<SegReg> {
    Some(match name {
        VM_REG_GUEST_ES => SegReg::Es,
        VM_REG_GUEST_CS => SegReg::Cs,
        VM_REG_GUEST_SS => SegReg::Ss,
        VM_REG_GUEST_DS => SegReg::Ds,
        VM_REG_GUEST_FS => SegReg::Fs,
        VM_REG_GUEST_GS => SegReg::Gs,
        _ => return None,
    })
}

/// The kernel's paging description as the emulator's.
pub fn paging_from_kernel(p: &vm_guest_paging) -> Option<Paging> {
    Some(Paging {
        cr3: p.cr3,
        cpl: u8::try_from(p.cpl).ok().filter(|c| *c <= 3)?,
        cpu_mode: match p.cpu_mode {
            CPU_MODE_REAL => CpuMode::Real,
            CPU_MODE_PROTECTED => CpuMode::Protected,
            CPU_MODE_COMPATIBILITY => CpuMode::Compatibility,
            CPU_MODE_64BIT => CpuMode::Long64,
            _ => return None,
        },
        paging_mode: match p.paging_mode {
            PAGING_MODE_FLAT => PagingMode::Flat,
            PAGING_MODE_32 => PagingMode::Bits32,
            PAGING_MODE_PAE => PagingMode::Pae,
            PAGING_MODE_64 => PagingMode::Long4,
            PAGING_MODE_64_LA57 => PagingMode::Long5,
            _ => return None,
        },
    })
}

/// The vCPU's registers with the string I/O record's view of the memory operand's segment,
/// RFLAGS and CR0 (what the kernel captured at the exit).
struct StringIoView<'a, R: ?Sized> {
    vcpu: &'a R,
    seg: SegReg,
    desc: Segment,
    rflags: u64,
    cr0: u64,
}

impl<R: Registers + ?Sized> Registers for StringIoView<'_, R> {
    fn gpr(&self, reg: u8) -> u64 {
        self.vcpu.gpr(reg)
    }
    fn set_gpr(&mut self, _reg: u8, _value: u64) {}
    fn rip(&self) -> u64 {
        self.vcpu.rip()
    }
    fn set_rip(&mut self, _value: u64) {}
    fn rflags(&self) -> u64 {
        self.rflags
    }
    fn set_rflags(&mut self, _value: u64) {}
    fn segment(&self, seg: SegReg) -> Segment {
        if seg == self.seg {
            self.desc
        } else {
            self.vcpu.segment(seg)
        }
    }
    fn cr0(&self) -> u64 {
        self.cr0
    }
}

/// Guest-physical addresses of `len` bytes at `gla` (two pieces when they cross a page).
fn translate_range(
    paging: &Paging,
    gla: u64,
    len: u64,
    access: Access,
    bus: &mut (impl GuestBus + ?Sized),
) -> Result<Vec<(u64, usize)>, TranslateError> {
    let first = translate(paging, gla, access, bus)?;
    let in_page = 0x1000 - (gla & 0xfff);
    if len <= in_page {
        return Ok(vec![(first, len as usize)]);
    }
    let second = translate(paging, gla.wrapping_add(in_page), access, bus)?;
    Ok(vec![
        (first, in_page as usize),
        (second, (len - in_page) as usize),
    ])
}

/// INS/OUTS: each element through the page tables to RAM and to the port, up to
/// [`STRING_IO_BATCH`] per exit, as bhyve's `emulate_inout` does.
fn string_inout(
    exit: &vm_exit,
    vis: &vm_inout_str,
    vcpu: &mut (impl ExitVcpu + ?Sized),
    bus: &mut (impl GuestBus + ?Sized),
    handler: &dyn ExitHandler,
) -> ExitAction {
    let inout = vis.inout;
    let bytes = inout.bytes() as u8;
    let input = inout.r#in() != 0;
    let Ok(addrsize) = u8::try_from(vis.addrsize) else {
        return failed(format!("string I/O with address size {}", vis.addrsize));
    };
    if !matches!(bytes, 1 | 2 | 4) || !matches!(addrsize, 2 | 4 | 8) {
        return failed(format!(
            "string I/O of {bytes} bytes with address size {addrsize} at rip {:#x}",
            exit.rip
        ));
    }
    let (Some(paging), Some(seg)) = (paging_from_kernel(&vis.paging), seg_reg(vis.seg_name)) else {
        return failed(format!(
            "string I/O record at rip {:#x} is malformed",
            exit.rip
        ));
    };
    let index_reg = if input { 7 } else { 6 }; // RDI : RSI
    let mask = size_mask(addrsize);
    let mut index = vis.index & mask;
    let mut count = vis.count & mask;
    let mut iterations = count.min(STRING_IO_BATCH);
    let mut outcome = ExitAction::Continue;
    let mut faulted = false;
    while iterations > 0 {
        let view = StringIoView {
            vcpu: &*vcpu,
            seg,
            desc: segment_from_desc(&vis.seg_desc, 0),
            rflags: vis.rflags,
            cr0: vis.cr0,
        };
        let gla = match linear_address(&paging, &view, seg, index, bytes, addrsize, input) {
            Ok(gla) => gla,
            Err(exception) => {
                // bhyve raises #GP for any segmentation failure here.
                let exception = if exception.vector == Exception::AC {
                    exception
                } else {
                    Exception::gp()
                };
                vcpu.inject_exception(exception);
                faulted = true;
                break;
            }
        };
        let access = if input { Access::Write } else { Access::Read };
        let pieces = match translate_range(&paging, gla, u64::from(bytes), access, bus) {
            Ok(pieces) => pieces,
            Err(e) => match e.exception() {
                Some(exception) => {
                    vcpu.inject_exception(exception);
                    faulted = true;
                    break;
                }
                None => {
                    outcome = failed(format!("string I/O at rip {:#x}: {e}", exit.rip));
                    break;
                }
            },
        };
        let mut data = [0u8; 4];
        let data = &mut data[..usize::from(bytes)];
        let served = if input {
            handler
                .port_read(inout.port, data)
                .and_then(|()| copy_pieces(&pieces, data, |gpa, part| bus.ram_write(gpa, part)))
        } else {
            copy_pieces(&pieces, data, |gpa, part| bus.ram_read(gpa, part))
                .and_then(|()| handler.port_write(inout.port, data))
        };
        if let Err(AccessFault(what)) = served {
            outcome = ExitAction::Exit(VmExit::AccessFault(what));
            break;
        }
        index = if vis.rflags & RFLAGS_DF != 0 {
            index.wrapping_sub(u64::from(bytes))
        } else {
            index.wrapping_add(u64::from(bytes))
        };
        count -= 1;
        iterations -= 1;
    }
    update_register(vcpu, index_reg, index, addrsize);
    if inout.rep() != 0 {
        update_register(vcpu, 1, count, addrsize);
    }
    if outcome == ExitAction::Continue && count != 0 && !faulted {
        vcpu.restart_instruction();
    }
    outcome
}

/// Move `data` to or from guest RAM in `pieces`; a piece that is not RAM stops the VM.
fn copy_pieces(
    pieces: &[(u64, usize)],
    data: &mut [u8],
    mut copy: impl FnMut(u64, &mut [u8]) -> bool,
) -> Result<(), AccessFault> {
    let mut at = 0;
    for &(gpa, len) in pieces {
        if !copy(gpa, &mut data[at..at + len]) {
            return Err(AccessFault(format!(
                "string I/O buffer at guest-physical {gpa:#x} is not RAM"
            )));
        }
        at += len;
    }
    Ok(())
}

/// `VM_EXITCODE_INST_EMUL`: the instruction the kernel captured (or the one at RIP) against
/// the faulting address.
fn inst_emul(
    exit: &vm_exit,
    ie: &vm_exit_inst_emul,
    vcpu: &mut (impl ExitVcpu + ?Sized),
    bus: &mut (impl GuestBus + ?Sized),
) -> ExitAction {
    let Some(paging) = paging_from_kernel(&ie.paging) else {
        return failed(format!(
            "instruction emulation record at rip {:#x} is malformed",
            exit.rip
        ));
    };
    let mode = DecodeMode {
        cpu_mode: paging.cpu_mode,
        cs_d: ie.cs_d != 0,
    };
    let valid = usize::from(ie.vie.num_valid).min(ie.vie.inst.len());
    if valid > 0 {
        emulate_at(
            exit,
            &ie.vie.inst[..valid],
            mode,
            ie.gpa,
            &paging,
            vcpu,
            bus,
        )
    } else {
        fetch_and_emulate(exit, ie.cs_base, mode, ie.gpa, &paging, vcpu, bus)
    }
}

/// `VM_EXITCODE_PAGING` that reached user space: a nested fault on a guest-physical address
/// with no backing, to be emulated like MMIO from the instruction at RIP.
fn paging_fault(
    exit: &vm_exit,
    p: &vm_exit_paging,
    vcpu: &mut (impl ExitVcpu + ?Sized),
    bus: &mut (impl GuestBus + ?Sized),
) -> ExitAction {
    let paging = vcpu.paging();
    let cs = vcpu.segment(SegReg::Cs);
    let mode = paging.decode_mode(&cs);
    fetch_and_emulate(exit, cs.base, mode, p.gpa, &paging, vcpu, bus)
}

#[allow(clippy::too_many_arguments)]
fn fetch_and_emulate(
    exit: &vm_exit,
    cs_base: u64,
    mode: DecodeMode,
    gpa: u64,
    paging: &Paging,
    vcpu: &mut (impl ExitVcpu + ?Sized),
    bus: &mut (impl GuestBus + ?Sized),
) -> ExitAction {
    let linear_rip = if paging.cpu_mode == CpuMode::Long64 {
        exit.rip
    } else {
        cs_base.wrapping_add(exit.rip) & 0xffff_ffff
    };
    match fetch_instruction(paging, linear_rip, bus) {
        Ok((bytes, n)) => emulate_at(exit, &bytes[..n], mode, gpa, paging, vcpu, bus),
        Err(e) => match e.exception() {
            Some(exception) => {
                vcpu.inject_exception(exception);
                ExitAction::Continue
            }
            None => failed(format!(
                "cannot fetch the instruction at rip {:#x}: {e}",
                exit.rip
            )),
        },
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[allow(clippy::too_many_arguments)]
fn emulate_at(
    exit: &vm_exit,
    bytes: &[u8],
    mode: DecodeMode,
    gpa: u64,
    paging: &Paging,
    vcpu: &mut (impl ExitVcpu + ?Sized),
    bus: &mut (impl GuestBus + ?Sized),
) -> ExitAction {
    let result = decode(bytes, mode).and_then(|inst| execute(&inst, gpa, paging, vcpu, bus));
    match result {
        Ok(Outcome::Completed) => ExitAction::Continue,
        Ok(Outcome::Repeat) => {
            vcpu.restart_instruction();
            ExitAction::Continue
        }
        Ok(Outcome::Exception(exception)) => {
            vcpu.inject_exception(exception);
            ExitAction::Continue
        }
        Err(EmulError::Access(AccessFault(what))) => ExitAction::Exit(VmExit::AccessFault(what)),
        Err(e) => failed(format!(
            "Failed to emulate instruction sequence [ {} ] at {:#x}: {e}",
            hex(bytes),
            exit.rip
        )),
    }
}

/// Basic VMX exit reasons by number (Intel SDM appendix C), for the failure text.
fn vmx_exit_reason(reason: u32) -> &'static str {
    match reason {
        0 => "Exception or non-maskable interrupt (NMI)",
        1 => "External interrupt",
        2 => "Triple fault",
        3 => "INIT signal",
        4 => "Start-up IPI (SIPI)",
        5 => "I/O system-management interrupt (SMI)",
        6 => "Other SMI",
        7 => "Interrupt window",
        8 => "NMI window",
        9 => "Task switch",
        10 => "CPUID",
        11 => "GETSEC",
        12 => "HLT",
        13 => "INVD",
        14 => "INVLPG",
        15 => "RDPMC",
        16 => "RDTSC",
        17 => "RSM",
        18 => "VMCALL",
        19 => "VMCLEAR",
        20 => "VMLAUNCH",
        21 => "VMPTRLD",
        22 => "VMPTRST",
        23 => "VMREAD",
        24 => "VMRESUME",
        25 => "VMWRITE",
        26 => "VMXOFF",
        27 => "VMXON",
        28 => "Control-register accesses",
        29 => "MOV DR",
        30 => "I/O instruction",
        31 => "RDMSR",
        32 => "WRMSR",
        33 => "VM-entry failure due to invalid guest state",
        34 => "VM-entry failure due to MSR loading",
        36 => "MWAIT",
        37 => "Monitor trap flag",
        39 => "MONITOR",
        40 => "PAUSE",
        41 => "VM-entry failure due to machine-check event",
        43 => "TPR below threshold",
        44 => "APIC access",
        45 => "Virtualized EOI",
        46 => "Access to GDTR or IDTR",
        47 => "Access to LDTR or TR",
        48 => "EPT violation",
        49 => "EPT misconfiguration",
        50 => "INVEPT",
        51 => "RDTSCP",
        52 => "VMX-preemption timer expired",
        53 => "INVVPID",
        54 => "WBINVD",
        55 => "XSETBV",
        56 => "APIC write",
        57 => "RDRAND",
        58 => "INVPCID",
        59 => "VMFUNC",
        60 => "ENCLS",
        61 => "RDSEED",
        62 => "Page-modification log full",
        63 => "XSAVES",
        64 => "XRSTORS",
        _ => "Unknown",
    }
}

/// A VMX exit bhyve cannot handle, with the fields bhyve prints.
fn describe_vmx(exit: &vm_exit, vmx: &vm_exit_vmx) -> String {
    format!(
        "VMX exit at rip {:#018x}: inst_length {}, status {}, exit_reason {} ({}), \
         qualification {:#018x}, inst_type {}, inst_error {}",
        exit.rip,
        exit.inst_length,
        vmx.status,
        vmx.exit_reason,
        vmx_exit_reason(vmx.exit_reason & 0xffff),
        vmx.exit_qualification,
        vmx.inst_type,
        vmx.inst_error
    )
}

/// An SVM exit bhyve cannot handle, with the fields bhyve prints.
fn describe_svm(exit: &vm_exit, svm: &vm_exit_svm) -> String {
    format!(
        "SVM exit at rip {:#018x}: inst_length {}, exitcode {:#x}, exitinfo1 {:#x}, \
         exitinfo2 {:#x}",
        exit.rip, exit.inst_length, svm.exitcode, svm.exitinfo1, svm.exitinfo2
    )
}

/// A FreeBSD 14 exit record in the 15 layout: only `inout_str` grew (by `cs_d` and
/// `cs_base`, which 14 does not report: they read as zero).
pub fn exit_from_14(old: &vm_exit_14) -> vm_exit {
    let mut exit = vm_exit {
        exitcode: old.exitcode,
        inst_length: old.inst_length,
        rip: old.rip,
        ..Default::default()
    };
    // SAFETY: both unions are plain data of the same size whose members other than
    // `inout_str` have identical types; every bit pattern is a valid value of each.
    unsafe {
        if old.exitcode == VM_EXITCODE_INOUT_STR {
            let s = old.u.inout_str;
            exit.u.inout_str = vm_inout_str {
                inout: s.inout,
                paging: s.paging,
                rflags: s.rflags,
                cr0: s.cr0,
                index: s.index,
                count: s.count,
                addrsize: s.addrsize,
                seg_name: s.seg_name,
                seg_desc: s.seg_desc,
                cs_d: 0,
                cs_base: 0,
            };
        } else {
            exit.u = std::mem::transmute::<vm_exit_u_14, vm_exit_u>(old.u);
        }
    }
    exit
}

/// A FreeBSD 13 exit record in the 15 layout (13 has the 14 `inout_str` and no debug or
/// IPI exits).
pub fn exit_from_13(old: &vm_exit_13) -> vm_exit {
    let as_14 = vm_exit_14 {
        exitcode: old.exitcode,
        inst_length: old.inst_length,
        rip: old.rip,
        // SAFETY: the 13 and 14 unions have the same size and, for every exit code 13
        // reports, the same member layout; both are plain data.
        u: unsafe { std::mem::transmute::<vm_exit_u_13, vm_exit_u_14>(old.u) },
    };
    exit_from_14(&as_14)
}

/// A simulated vCPU for replaying exit records: a register file plus a log of what the exit
/// logic asked of the kernel, and the rule the kernel applies to RIP on the next entry.
#[cfg(test)]
pub(crate) mod sim {
    use super::*;
    use crate::vmm::x86emul::CpuState;

    #[derive(Debug, Clone, Default)]
    pub(crate) struct SimVcpu {
        pub id: u32,
        pub state: CpuState,
        pub injected: Vec<Exception>,
        pub breakpoints: Vec<u32>,
        pub restarted: bool,
        pub rip_written: bool,
    }

    impl SimVcpu {
        pub fn new(state: CpuState) -> SimVcpu {
            SimVcpu {
                state,
                ..Default::default()
            }
        }

        /// Where the kernel resumes the guest after `exit`: the exiting instruction again
        /// when restarted or faulted, RIP as user space set it, else past the instruction.
        pub fn resume_rip(&self, exit: &vm_exit) -> u64 {
            if self.restarted || !self.injected.is_empty() {
                exit.rip
            } else if self.rip_written {
                self.state.regs.rip
            } else {
                exit.rip.wrapping_add(exit.inst_length.max(0) as u64)
            }
        }
    }

    impl Registers for SimVcpu {
        fn gpr(&self, reg: u8) -> u64 {
            self.state.gpr(reg)
        }
        fn set_gpr(&mut self, reg: u8, value: u64) {
            self.state.set_gpr(reg, value)
        }
        fn rip(&self) -> u64 {
            self.state.rip()
        }
        fn set_rip(&mut self, value: u64) {
            self.rip_written = true;
            self.state.set_rip(value)
        }
        fn rflags(&self) -> u64 {
            self.state.rflags()
        }
        fn set_rflags(&mut self, value: u64) {
            self.state.set_rflags(value)
        }
        fn segment(&self, seg: SegReg) -> Segment {
            self.state.segment(seg)
        }
        fn cr0(&self) -> u64 {
            self.state.cr0()
        }
    }

    impl ExitVcpu for SimVcpu {
        fn vcpu_id(&self) -> u32 {
            self.id
        }
        fn paging(&self) -> Paging {
            Paging::from_special_regs(&self.state.sregs)
        }
        fn inject_exception(&mut self, exception: Exception) {
            self.injected.push(exception);
        }
        fn inject_breakpoint(&mut self, inst_length: u32) {
            self.breakpoints.push(inst_length);
        }
        fn restart_instruction(&mut self) {
            self.restarted = true;
        }
    }
}

#[cfg(test)]
#[path = "exits_tests.rs"]
mod tests;
