//! `<machine/vmm.h>`: register names, capabilities, exit codes and the `vm_exit` record.

use crate::c_int;

c_enum! {
    /// How a VM is suspended (`enum vm_suspend_how`, argument of `VM_SUSPEND`).
    vm_suspend_how {
        VM_SUSPEND_NONE = 0,
        VM_SUSPEND_RESET = 1,
        VM_SUSPEND_POWEROFF = 2,
        VM_SUSPEND_HALT = 3,
        VM_SUSPEND_TRIPLEFAULT = 4,
        VM_SUSPEND_DESTROY = 5,
        VM_SUSPEND_LAST = 6,
    }
}
/// `VM_SUSPEND_LAST` on FreeBSD 13 and 14, which have no `VM_SUSPEND_DESTROY`.
pub const VM_SUSPEND_LAST_14: vm_suspend_how = VM_SUSPEND_DESTROY;

c_enum! {
    /// Guest register identifiers (`enum vm_reg_name`).
    vm_reg_name {
        VM_REG_GUEST_RAX = 0,
        VM_REG_GUEST_RBX = 1,
        VM_REG_GUEST_RCX = 2,
        VM_REG_GUEST_RDX = 3,
        VM_REG_GUEST_RSI = 4,
        VM_REG_GUEST_RDI = 5,
        VM_REG_GUEST_RBP = 6,
        VM_REG_GUEST_R8 = 7,
        VM_REG_GUEST_R9 = 8,
        VM_REG_GUEST_R10 = 9,
        VM_REG_GUEST_R11 = 10,
        VM_REG_GUEST_R12 = 11,
        VM_REG_GUEST_R13 = 12,
        VM_REG_GUEST_R14 = 13,
        VM_REG_GUEST_R15 = 14,
        VM_REG_GUEST_CR0 = 15,
        VM_REG_GUEST_CR3 = 16,
        VM_REG_GUEST_CR4 = 17,
        VM_REG_GUEST_DR7 = 18,
        VM_REG_GUEST_RSP = 19,
        VM_REG_GUEST_RIP = 20,
        VM_REG_GUEST_RFLAGS = 21,
        VM_REG_GUEST_ES = 22,
        VM_REG_GUEST_CS = 23,
        VM_REG_GUEST_SS = 24,
        VM_REG_GUEST_DS = 25,
        VM_REG_GUEST_FS = 26,
        VM_REG_GUEST_GS = 27,
        VM_REG_GUEST_LDTR = 28,
        VM_REG_GUEST_TR = 29,
        VM_REG_GUEST_IDTR = 30,
        VM_REG_GUEST_GDTR = 31,
        VM_REG_GUEST_EFER = 32,
        VM_REG_GUEST_CR2 = 33,
        VM_REG_GUEST_PDPTE0 = 34,
        VM_REG_GUEST_PDPTE1 = 35,
        VM_REG_GUEST_PDPTE2 = 36,
        VM_REG_GUEST_PDPTE3 = 37,
        VM_REG_GUEST_INTR_SHADOW = 38,
        VM_REG_GUEST_DR0 = 39,
        VM_REG_GUEST_DR1 = 40,
        VM_REG_GUEST_DR2 = 41,
        VM_REG_GUEST_DR3 = 42,
        VM_REG_GUEST_DR6 = 43,
        VM_REG_GUEST_ENTRY_INST_LENGTH = 44,
        VM_REG_GUEST_FS_BASE = 45,
        VM_REG_GUEST_GS_BASE = 46,
        VM_REG_GUEST_KGS_BASE = 47,
        VM_REG_GUEST_TPR = 48,
        VM_REG_LAST = 49,
    }
}
/// `VM_REG_LAST` on FreeBSD 13 (no FS_BASE/GS_BASE/KGS_BASE/TPR).
pub const VM_REG_LAST_13: vm_reg_name = VM_REG_GUEST_FS_BASE;

c_enum! {
    /// Local APIC x2APIC mode (`enum x2apic_state`).
    x2apic_state {
        X2APIC_DISABLED = 0,
        X2APIC_ENABLED = 1,
        X2APIC_STATE_LAST = 2,
    }
}

c_enum! {
    /// Optional per-vCPU capabilities (`enum vm_cap_type`).
    vm_cap_type {
        VM_CAP_HALT_EXIT = 0,
        VM_CAP_MTRAP_EXIT = 1,
        VM_CAP_PAUSE_EXIT = 2,
        VM_CAP_UNRESTRICTED_GUEST = 3,
        VM_CAP_ENABLE_INVPCID = 4,
        VM_CAP_BPT_EXIT = 5,
        VM_CAP_RDPID = 6,
        VM_CAP_RDTSCP = 7,
        VM_CAP_IPI_EXIT = 8,
        VM_CAP_MASK_HWINTR = 9,
        VM_CAP_RFLAGS_TF = 10,
        VM_CAP_MAX = 11,
    }
}
/// `VM_CAP_MAX` on FreeBSD 13 (capabilities stop at RDTSCP).
pub const VM_CAP_MAX_13: vm_cap_type = VM_CAP_IPI_EXIT;

c_enum! {
    /// Interrupt trigger mode of an ISA IRQ (`enum vm_intr_trigger`).
    vm_intr_trigger {
        EDGE_TRIGGER = 0,
        LEVEL_TRIGGER = 1,
    }
}

c_enum! {
    /// Guest CPU mode (`enum vm_cpu_mode`).
    vm_cpu_mode {
        CPU_MODE_REAL = 0,
        CPU_MODE_PROTECTED = 1,
        CPU_MODE_COMPATIBILITY = 2,
        CPU_MODE_64BIT = 3,
    }
}

c_enum! {
    /// Guest paging mode (`enum vm_paging_mode`).
    vm_paging_mode {
        PAGING_MODE_FLAT = 0,
        PAGING_MODE_32 = 1,
        PAGING_MODE_PAE = 2,
        PAGING_MODE_64 = 3,
        PAGING_MODE_64_LA57 = 4,
    }
}

c_enum! {
    /// Why `VM_RUN` returned (`enum vm_exitcode`, [`vm_exit::exitcode`]).
    vm_exitcode {
        VM_EXITCODE_INOUT = 0,
        VM_EXITCODE_VMX = 1,
        VM_EXITCODE_BOGUS = 2,
        VM_EXITCODE_RDMSR = 3,
        VM_EXITCODE_WRMSR = 4,
        VM_EXITCODE_HLT = 5,
        VM_EXITCODE_MTRAP = 6,
        VM_EXITCODE_PAUSE = 7,
        VM_EXITCODE_PAGING = 8,
        VM_EXITCODE_INST_EMUL = 9,
        VM_EXITCODE_SPINUP_AP = 10,
        VM_EXITCODE_DEPRECATED1 = 11,
        VM_EXITCODE_RENDEZVOUS = 12,
        VM_EXITCODE_IOAPIC_EOI = 13,
        VM_EXITCODE_SUSPENDED = 14,
        VM_EXITCODE_INOUT_STR = 15,
        VM_EXITCODE_TASK_SWITCH = 16,
        VM_EXITCODE_MONITOR = 17,
        VM_EXITCODE_MWAIT = 18,
        VM_EXITCODE_SVM = 19,
        VM_EXITCODE_REQIDLE = 20,
        VM_EXITCODE_DEBUG = 21,
        VM_EXITCODE_VMINSN = 22,
        VM_EXITCODE_BPT = 23,
        VM_EXITCODE_IPI = 24,
        VM_EXITCODE_DB = 25,
        VM_EXITCODE_MAX = 26,
    }
}
/// `VM_EXITCODE_MAX` on FreeBSD 13 (exit codes stop at BPT).
pub const VM_EXITCODE_MAX_13: vm_exitcode = VM_EXITCODE_IPI;

c_enum! {
    /// Cause of a task switch exit (`enum task_switch_reason`).
    task_switch_reason {
        TSR_CALL = 0,
        TSR_IRET = 1,
        TSR_JMP = 2,
        TSR_IDT_GATE = 3,
    }
}

/// `vm_intinfo.info1`: an event is pending.
pub const VM_INTINFO_VALID: u64 = 0x8000_0000;
/// `vm_intinfo.info1`: the event delivers an error code.
pub const VM_INTINFO_DEL_ERRCODE: u64 = 0x800;
/// `vm_intinfo.info1`: reserved bits.
pub const VM_INTINFO_RSVD: u64 = 0x7fff_f000;
/// `vm_intinfo.info1`: mask of the event type.
pub const VM_INTINFO_TYPE: u64 = 0x700;
/// Event type: external interrupt.
pub const VM_INTINFO_HWINTR: u64 = 0 << 8;
/// Event type: NMI.
pub const VM_INTINFO_NMI: u64 = 2 << 8;
/// Event type: hardware exception.
pub const VM_INTINFO_HWEXCEPTION: u64 = 3 << 8;
/// Event type: software interrupt.
pub const VM_INTINFO_SWINTR: u64 = 4 << 8;

/// Longest device name below `/dev` (`SPECNAMELEN`, FreeBSD 13 and later).
pub const SPECNAMELEN: usize = 255;
/// Room reserved for the `vmm/` or `vmm.io/` prefix of a VM's device path.
pub const VM_MAX_PREFIXLEN: usize = 10;
/// Longest memory segment name suffix (`/dev/vmm.io/NAME.SUFFIX`).
pub const VM_MAX_SUFFIXLEN: usize = 15;
/// Shortest VM name limit the kernel guarantees.
pub const VM_MIN_NAMELEN: usize = 6;
/// Longest VM name (229), not counting the NUL.
pub const VM_MAX_NAMELEN: usize = SPECNAMELEN - VM_MAX_PREFIXLEN - VM_MAX_SUFFIXLEN - 1;
/// Instruction bytes held in [`vie::inst`].
pub const VIE_INST_SIZE: usize = 15;
/// `VM_MAXCPU` as FreeBSD 13's header gives it to userland.
pub const VM_MAXCPU_13: usize = 16;
/// The kernel's vCPU limit on FreeBSD 14/15 (`MIN(0xffff - 1, CPU_SETSIZE)`); the boot tunable
/// `hw.vmm.maxcpu` sets the real limit.
pub const VM_MAXCPU_KERNEL: usize = 1024;

/// A segment register's hidden part (`struct seg_desc`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct seg_desc {
    /// Base address.
    pub base: u64,
    /// Limit.
    pub limit: u32,
    /// VMX access-rights format; bit 16 means "unusable".
    pub access: u32,
}

/// Guest paging state needed to walk its page tables (`struct vm_guest_paging`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_guest_paging {
    /// Guest CR3.
    pub cr3: u64,
    /// Current privilege level.
    pub cpl: c_int,
    /// One of the `CPU_MODE_*` values.
    pub cpu_mode: vm_cpu_mode,
    /// One of the `PAGING_MODE_*` values.
    pub paging_mode: vm_paging_mode,
}

/// Decoded opcode description inside [`vie`] (`struct vie_op`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vie_op {
    /// The opcode byte.
    pub op_byte: u8,
    /// The kernel's operation type.
    pub op_type: u8,
    /// The kernel's operation flags.
    pub op_flags: u16,
}

/// The kernel's instruction decoder state, reported with `VM_EXITCODE_INST_EMUL` (`struct vie`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vie {
    /// Instruction bytes.
    pub inst: [u8; VIE_INST_SIZE],
    /// Number of valid bytes in `inst`.
    pub num_valid: u8,
    /// Bytes consumed by the decoder.
    pub num_processed: u8,
    /// Bitfields in bytes 17..=21 (address/operand size, prefixes, ModRM, SIB); use the accessors.
    pub _bitfield_17: [u8; 5],
    /// Displacement size in bytes.
    pub disp_bytes: u8,
    /// Immediate size in bytes.
    pub imm_bytes: u8,
    /// SIB scale factor.
    pub scale: u8,
    /// Bitfields in byte 25 (VEX vvvv and pp); use the accessors.
    pub _bitfield_25: u8,
    /// Padding.
    pub _sparebytes: [u8; 2],
    /// Base register (`VM_REG_GUEST_*`).
    pub base_register: c_int,
    /// Index register (`VM_REG_GUEST_*`).
    pub index_register: c_int,
    /// Segment register (`VM_REG_GUEST_*`).
    pub segment_register: c_int,
    /// Address displacement.
    pub displacement: i64,
    /// Immediate operand.
    pub immediate: i64,
    /// 1 once decoding succeeded.
    pub decoded: u8,
    /// Padding.
    pub _sparebyte: u8,
    /// Opcode description.
    pub op: vie_op,
}

impl vie {
    bitfield!(
        /// Address size in bytes.
        addrsize, set_addrsize: u8 = _bitfield_17[0], shift 0, width 4
    );
    bitfield!(
        /// Operand size in bytes.
        opsize, set_opsize: u8 = _bitfield_17[0], shift 4, width 4
    );
    bitfield!(
        /// REX.W.
        rex_w, set_rex_w: u8 = _bitfield_17[1], shift 0, width 1
    );
    bitfield!(
        /// REX.R.
        rex_r, set_rex_r: u8 = _bitfield_17[1], shift 1, width 1
    );
    bitfield!(
        /// REX.X.
        rex_x, set_rex_x: u8 = _bitfield_17[1], shift 2, width 1
    );
    bitfield!(
        /// REX.B.
        rex_b, set_rex_b: u8 = _bitfield_17[1], shift 3, width 1
    );
    bitfield!(
        /// A REX prefix was present.
        rex_present, set_rex_present: u8 = _bitfield_17[1], shift 4, width 1
    );
    bitfield!(
        /// A REP/REPE/REPZ prefix was present.
        repz_present, set_repz_present: u8 = _bitfield_17[1], shift 5, width 1
    );
    bitfield!(
        /// A REPNE/REPNZ prefix was present.
        repnz_present, set_repnz_present: u8 = _bitfield_17[1], shift 6, width 1
    );
    bitfield!(
        /// Operand size override prefix.
        opsize_override, set_opsize_override: u8 = _bitfield_17[1], shift 7, width 1
    );
    bitfield!(
        /// Address size override prefix.
        addrsize_override, set_addrsize_override: u8 = _bitfield_17[2], shift 0, width 1
    );
    bitfield!(
        /// Segment override prefix.
        segment_override, set_segment_override: u8 = _bitfield_17[2], shift 1, width 1
    );
    bitfield!(
        /// ModRM.mod.
        r#mod, set_mod: u8 = _bitfield_17[2], shift 2, width 2
    );
    bitfield!(
        /// ModRM.reg (with REX.R).
        reg, set_reg: u8 = _bitfield_17[2], shift 4, width 4
    );
    bitfield!(
        /// ModRM.rm (with REX.B).
        rm, set_rm: u8 = _bitfield_17[3], shift 0, width 4
    );
    bitfield!(
        /// SIB.ss.
        ss, set_ss: u8 = _bitfield_17[3], shift 4, width 2
    );
    bitfield!(
        /// A VEX prefix was present.
        vex_present, set_vex_present: u8 = _bitfield_17[3], shift 6, width 1
    );
    bitfield!(
        /// VEX.L.
        vex_l, set_vex_l: u8 = _bitfield_17[3], shift 7, width 1
    );
    bitfield!(
        /// SIB.index (with REX.X).
        index, set_index: u8 = _bitfield_17[4], shift 0, width 4
    );
    bitfield!(
        /// SIB.base (with REX.B).
        base, set_base: u8 = _bitfield_17[4], shift 4, width 4
    );
    bitfield!(
        /// VEX.vvvv.
        vex_reg, set_vex_reg: u8 = _bitfield_25, shift 0, width 4
    );
    bitfield!(
        /// VEX.pp.
        vex_pp, set_vex_pp: u8 = _bitfield_25, shift 4, width 2
    );
    bitfield!(
        /// Unused bits.
        _sparebits, set__sparebits: u8 = _bitfield_25, shift 6, width 2
    );
}

/// Port I/O exit details (`struct vm_inout`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_inout {
    /// Bitfields `bytes:3, in:1, string:1, rep:1`; use the accessors.
    pub _bitfield_0: u16,
    /// I/O port.
    pub port: u16,
    /// Value written (for OUT) or to be returned (for IN).
    pub eax: u32,
}

impl vm_inout {
    bitfield!(
        /// Access size: 1, 2 or 4.
        bytes, set_bytes: u16 = _bitfield_0, shift 0, width 3
    );
    bitfield!(
        /// 1 for IN, 0 for OUT.
        r#in, set_in: u16 = _bitfield_0, shift 3, width 1
    );
    bitfield!(
        /// 1 for INS/OUTS.
        string, set_string: u16 = _bitfield_0, shift 4, width 1
    );
    bitfield!(
        /// 1 if REP-prefixed.
        rep, set_rep: u16 = _bitfield_0, shift 5, width 1
    );
}

/// String port I/O exit details (`struct vm_inout_str`), FreeBSD 15 layout with `cs_d`/`cs_base`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_inout_str {
    /// The port access; must be first.
    pub inout: vm_inout,
    /// Paging state to translate `index`.
    pub paging: vm_guest_paging,
    /// Guest RFLAGS.
    pub rflags: u64,
    /// Guest CR0.
    pub cr0: u64,
    /// RSI or RDI.
    pub index: u64,
    /// Repeat count (RCX if REP, else 1).
    pub count: u64,
    /// Address size.
    pub addrsize: c_int,
    /// Segment register of the memory operand.
    pub seg_name: vm_reg_name,
    /// That segment's descriptor.
    pub seg_desc: seg_desc,
    /// CS.D.
    pub cs_d: c_int,
    /// CS base.
    pub cs_base: u64,
}

/// Task switch exit details (`struct vm_task_switch`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_task_switch {
    /// New TSS selector.
    pub tsssel: u16,
    /// Caused by an external event.
    pub ext: c_int,
    /// Error code to push.
    pub errcode: u32,
    /// Whether `errcode` is pushed on the new stack.
    pub errcode_valid: c_int,
    /// One of the `TSR_*` values.
    pub reason: task_switch_reason,
    /// Paging state.
    pub paging: vm_guest_paging,
}

/// `vm_exit.u.paging`: nested page fault.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_exit_paging {
    /// Faulting guest-physical address.
    pub gpa: u64,
    /// `VM_PROT_*` of the access.
    pub fault_type: c_int,
}

/// `vm_exit.u.inst_emul`: an MMIO access to emulate.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_exit_inst_emul {
    /// Guest-physical address accessed.
    pub gpa: u64,
    /// Guest-linear address accessed.
    pub gla: u64,
    /// CS base.
    pub cs_base: u64,
    /// CS.D.
    pub cs_d: c_int,
    /// Paging state.
    pub paging: vm_guest_paging,
    /// Decoder state.
    pub vie: vie,
}

/// `vm_exit.u.vmx`: VMX exit with no better exit code.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_exit_vmx {
    /// VMX instruction status; the next two fields are valid only when 0.
    pub status: c_int,
    /// VMCS exit reason.
    pub exit_reason: u32,
    /// VMCS exit qualification.
    pub exit_qualification: u64,
    /// Failing VMX instruction (status != 0).
    pub inst_type: c_int,
    /// VM-instruction error (status != 0).
    pub inst_error: c_int,
}

/// `vm_exit.u.svm`: SVM exit with no better exit code.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_exit_svm {
    /// VMCB exit code.
    pub exitcode: u64,
    /// EXITINFO1.
    pub exitinfo1: u64,
    /// EXITINFO2.
    pub exitinfo2: u64,
}

/// `vm_exit.u.bpt`: breakpoint exit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_exit_bpt {
    /// Length of the breakpoint instruction.
    pub inst_length: c_int,
}

/// `vm_exit.u.dbg`: debug exception exit (FreeBSD 14+).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_exit_dbg {
    /// Single-step trap.
    pub trace_trap: c_int,
    /// PUSHF was intercepted.
    pub pushf_intercept: c_int,
    /// Shadowed value of RFLAGS.TF.
    pub tf_shadow_val: c_int,
    /// Paging state.
    pub paging: vm_guest_paging,
}

/// `vm_exit.u.msr`: RDMSR/WRMSR exit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_exit_msr {
    /// MSR number (ECX).
    pub code: u32,
    /// Value written (WRMSR).
    pub wval: u64,
}

/// `vm_exit.u.spinup_ap`: a vCPU sent INIT/SIPI to start another.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_exit_spinup_ap {
    /// vCPU to start.
    pub vcpu: c_int,
    /// Its start address.
    pub rip: u64,
}

/// `vm_exit.u.hlt`: HLT exit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_exit_hlt {
    /// Guest RFLAGS.
    pub rflags: u64,
    /// Interrupt status.
    pub intr_status: u64,
}

/// `vm_exit.u.ioapic_eoi`: EOI for a level-triggered vIOAPIC vector.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_exit_ioapic_eoi {
    /// The vector.
    pub vector: c_int,
}

/// `vm_exit.u.suspended`: the VM was suspended.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_exit_suspended {
    /// One of the `VM_SUSPEND_*` values.
    pub how: vm_suspend_how,
}

/// `vm_exit.u.ipi` (FreeBSD 14+): the destination set is returned through [`crate::vm_run::cpuset`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_exit_ipi {
    /// Delivery mode.
    pub mode: u32,
    /// Vector.
    pub vector: u8,
}

/// The exit-specific part of [`vm_exit`]; which member is valid depends on `exitcode`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union vm_exit_u {
    /// `VM_EXITCODE_INOUT`.
    pub inout: vm_inout,
    /// `VM_EXITCODE_INOUT_STR`.
    pub inout_str: vm_inout_str,
    /// `VM_EXITCODE_PAGING`.
    pub paging: vm_exit_paging,
    /// `VM_EXITCODE_INST_EMUL`.
    pub inst_emul: vm_exit_inst_emul,
    /// `VM_EXITCODE_VMX`.
    pub vmx: vm_exit_vmx,
    /// `VM_EXITCODE_SVM`.
    pub svm: vm_exit_svm,
    /// `VM_EXITCODE_BPT`.
    pub bpt: vm_exit_bpt,
    /// `VM_EXITCODE_DB`.
    pub dbg: vm_exit_dbg,
    /// `VM_EXITCODE_RDMSR` / `VM_EXITCODE_WRMSR`.
    pub msr: vm_exit_msr,
    /// `VM_EXITCODE_SPINUP_AP`.
    pub spinup_ap: vm_exit_spinup_ap,
    /// `VM_EXITCODE_HLT`.
    pub hlt: vm_exit_hlt,
    /// `VM_EXITCODE_IOAPIC_EOI`.
    pub ioapic_eoi: vm_exit_ioapic_eoi,
    /// `VM_EXITCODE_SUSPENDED`.
    pub suspended: vm_exit_suspended,
    /// `VM_EXITCODE_IPI`.
    pub ipi: vm_exit_ipi,
    /// `VM_EXITCODE_TASK_SWITCH`.
    pub task_switch: vm_task_switch,
}

/// Why and where a vCPU left `VM_RUN` (`struct vm_exit`, FreeBSD 15 layout).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct vm_exit {
    /// One of the `VM_EXITCODE_*` values.
    pub exitcode: vm_exitcode,
    /// Length of the exiting instruction, 0 if unknown.
    pub inst_length: c_int,
    /// Guest RIP of the exit.
    pub rip: u64,
    /// Exit details.
    pub u: vm_exit_u,
}

opaque_union_debug!(vm_exit_u);
zeroed_default!(vm_exit_u, vm_exit);

assert_layout!(seg_desc, size 16, align 8, { base: 0, limit: 8, access: 12 });
assert_layout!(vm_guest_paging, size 24, align 8, { cr3: 0, cpl: 8, cpu_mode: 12, paging_mode: 16 });
assert_layout!(vie_op, size 4, align 2, { op_byte: 0, op_type: 1, op_flags: 2 });
assert_layout!(vie, size 64, align 8, {
    inst: 0, num_valid: 15, num_processed: 16, _bitfield_17: 17, disp_bytes: 22, imm_bytes: 23,
    scale: 24, _bitfield_25: 25, _sparebytes: 26, base_register: 28, index_register: 32,
    segment_register: 36, displacement: 40, immediate: 48, decoded: 56, _sparebyte: 57, op: 58,
});
assert_layout!(vm_inout, size 8, align 4, { _bitfield_0: 0, port: 2, eax: 4 });
assert_layout!(vm_inout_str, size 104, align 8, {
    inout: 0, paging: 8, rflags: 32, cr0: 40, index: 48, count: 56, addrsize: 64, seg_name: 68,
    seg_desc: 72, cs_d: 88, cs_base: 96,
});
assert_layout!(vm_task_switch, size 48, align 8, {
    tsssel: 0, ext: 4, errcode: 8, errcode_valid: 12, reason: 16, paging: 24,
});
assert_layout!(vm_exit_u, size 120, align 8);
assert_layout!(vm_exit, size 136, align 8, {
    exitcode: 0, inst_length: 4, rip: 8, u: 16,
    u.inout: 16, u.inout_str: 16, u.paging.gpa: 16, u.paging.fault_type: 24,
    u.inst_emul.gpa: 16, u.inst_emul.gla: 24, u.inst_emul.cs_base: 32, u.inst_emul.cs_d: 40,
    u.inst_emul.paging: 48, u.inst_emul.vie: 72,
    u.vmx.status: 16, u.vmx.exit_reason: 20, u.vmx.exit_qualification: 24, u.vmx.inst_type: 32,
    u.vmx.inst_error: 36, u.svm.exitcode: 16, u.svm.exitinfo1: 24, u.svm.exitinfo2: 32,
    u.bpt.inst_length: 16, u.dbg.trace_trap: 16, u.dbg.pushf_intercept: 20,
    u.dbg.tf_shadow_val: 24, u.dbg.paging: 32, u.msr.code: 16, u.msr.wval: 24,
    u.spinup_ap.vcpu: 16, u.spinup_ap.rip: 24, u.hlt.rflags: 16, u.hlt.intr_status: 24,
    u.ioapic_eoi.vector: 16, u.suspended.how: 16, u.ipi.mode: 16, u.ipi.vector: 20,
    u.task_switch: 16,
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vie_bitfield_setter_changes_only_its_own_bits() {
        let mut decoded = vie::default();
        decoded.set_reg(0xff);
        assert_eq!(decoded.reg(), 0xf);
        assert_eq!(decoded._bitfield_17, [0, 0, 0xf0, 0, 0]);
        decoded.set_mod(3);
        decoded.set_reg(0x5);
        assert_eq!(decoded.r#mod(), 3);
        assert_eq!(decoded.reg(), 5);
        assert_eq!(decoded._bitfield_17[2], 0x5c);
    }

    #[test]
    fn inout_bitfields_decode_an_in_byte_access() {
        let access = vm_inout {
            _bitfield_0: 0b0000_1001,
            port: 0x3f8,
            eax: 0,
        };
        assert_eq!(access.bytes(), 1);
        assert_eq!(access.r#in(), 1);
        assert_eq!(access.string(), 0);
        assert_eq!(access.rep(), 0);
    }
}
