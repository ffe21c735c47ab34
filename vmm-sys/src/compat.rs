//! Layouts of FreeBSD 12, 13 and 14 that differ from 15/main, under the kernel's compat names.
//!
//! In the 13.x/14.x headers these carry the plain names (`struct vm_run`, `VM_RUN`, …). A 15
//! kernel still accepts them only when built with the matching `COMPAT_FREEBSD*` option.

use core::mem::size_of;

use crate::{
    c_char, c_int, c_ulong, c_void, cpuset_t_13, seg_desc, snapshot_req, timeval, vm_exit_bpt,
    vm_exit_dbg, vm_exit_hlt, vm_exit_inst_emul, vm_exit_ioapic_eoi, vm_exit_ipi, vm_exit_msr,
    vm_exit_paging, vm_exit_spinup_ap, vm_exit_suspended, vm_exit_svm, vm_exit_vmx, vm_exitcode,
    vm_guest_paging, vm_inout, vm_reg_name, vm_snapshot_buffer, vm_snapshot_op, vm_task_switch,
    VMM_IOC_GROUP_v, _IOW, _IOWR, IOCNUM_ALLOC_MEMSEG, IOCNUM_GET_MEMSEG, IOCNUM_RUN,
    IOCNUM_SNAPSHOT_REQ, IOCNUM_VM_STATS, MAX_VM_STATS, VM_MAX_SUFFIXLEN,
};

/// `struct vm_memseg` of FreeBSD 13 and 14 (no NUMA policy).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_memseg_14 {
    /// Segment id (`VM_SYSMEM`, `VM_BOOTROM_14`, …).
    pub segid: c_int,
    /// Length in bytes.
    pub len: usize,
    /// Empty for system memory, else the device-memory name.
    pub name: [c_char; VM_MAX_SUFFIXLEN + 1],
}

/// `struct vm_memseg_fbsd12`: FreeBSD 12's memory segment with a 64-byte name.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct vm_memseg_12 {
    /// Segment id.
    pub segid: c_int,
    /// Length in bytes.
    pub len: usize,
    /// Device-memory name.
    pub name: [c_char; 64],
}

/// `struct vm_inout_str` of FreeBSD 13 and 14 (no `cs_d`/`cs_base`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_inout_str_14 {
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
    /// Repeat count.
    pub count: u64,
    /// Address size.
    pub addrsize: c_int,
    /// Segment register of the memory operand.
    pub seg_name: vm_reg_name,
    /// That segment's descriptor.
    pub seg_desc: seg_desc,
}

/// Exit details of [`vm_exit_14`].
#[repr(C)]
#[derive(Clone, Copy)]
pub union vm_exit_u_14 {
    /// `VM_EXITCODE_INOUT`.
    pub inout: vm_inout,
    /// `VM_EXITCODE_INOUT_STR`.
    pub inout_str: vm_inout_str_14,
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

/// `struct vm_exit` of FreeBSD 14: as [`crate::vm_exit`] but with the shorter `inout_str`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct vm_exit_14 {
    /// One of the `VM_EXITCODE_*` values.
    pub exitcode: vm_exitcode,
    /// Length of the exiting instruction, 0 if unknown.
    pub inst_length: c_int,
    /// Guest RIP of the exit.
    pub rip: u64,
    /// Exit details.
    pub u: vm_exit_u_14,
}

/// Exit details of [`vm_exit_13`] (no `dbg`, no `ipi`).
#[repr(C)]
#[derive(Clone, Copy)]
pub union vm_exit_u_13 {
    /// `VM_EXITCODE_INOUT`.
    pub inout: vm_inout,
    /// `VM_EXITCODE_INOUT_STR`.
    pub inout_str: vm_inout_str_14,
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
    /// `VM_EXITCODE_TASK_SWITCH`.
    pub task_switch: vm_task_switch,
    /// What a 14/15 kernel's compat path writes for `VM_EXITCODE_IPI`.
    pub ipi: vm_exit_ipi_13,
}

/// `struct vm_exit` of FreeBSD 13.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct vm_exit_13 {
    /// One of the `VM_EXITCODE_*` values (below `VM_EXITCODE_MAX_13`).
    pub exitcode: vm_exitcode,
    /// Length of the exiting instruction, 0 if unknown.
    pub inst_length: c_int,
    /// Guest RIP of the exit.
    pub rip: u64,
    /// Exit details.
    pub u: vm_exit_u_13,
}

/// The IPI exit as the kernel's `COMPAT_FREEBSD13` path writes it into [`vm_exit_13::u`], with the
/// destination set embedded (binaries built from early-2023 main; 13.x releases have no IPI exit).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_exit_ipi_13 {
    /// Delivery mode.
    pub mode: u32,
    /// Vector.
    pub vector: u8,
    /// Destination vCPUs.
    pub dmask: cpuset_t_13,
}

/// The kernel's `COMPAT_FREEBSD13` view of [`vm_exit_13`]: the union as raw words.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_exit_kcompat13 {
    /// Exit code.
    pub exitcode: u32,
    /// Instruction length.
    pub inst_length: i32,
    /// Guest RIP.
    pub rip: u64,
    /// Exit details as words.
    pub u: [u64; 15],
}

/// `struct vm_run` of FreeBSD 13: the exit record is embedded.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct vm_run_13 {
    /// vCPU id.
    pub cpuid: c_int,
    /// Exit record, filled by the kernel.
    pub vm_exit: vm_exit_13,
}

/// The kernel's `COMPAT_FREEBSD13` view of [`vm_run_13`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_run_kcompat13 {
    /// vCPU id.
    pub cpuid: c_int,
    /// Exit record.
    pub vm_exit: vm_exit_kcompat13,
}

/// `struct vm_stats` of FreeBSD 13 (no `index`: at most the first 64 counters).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct vm_stats_13 {
    /// vCPU id.
    pub cpuid: c_int,
    /// Counters returned.
    pub num_entries: c_int,
    /// When they were sampled.
    pub tv: timeval,
    /// The counters.
    pub statbuf: [u64; MAX_VM_STATS],
}

/// `struct vm_snapshot_meta` of FreeBSD 13 (with the unused leading `ctx` pointer).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct vm_snapshot_meta_13 {
    /// Ignored (`struct vmctx *`).
    pub ctx: *mut c_void,
    /// Device cookie.
    pub dev_data: *mut c_void,
    /// Device name.
    pub dev_name: *const c_char,
    /// Which kernel structure.
    pub dev_req: snapshot_req,
    /// Data buffer.
    pub buffer: vm_snapshot_buffer,
    /// `VM_SNAPSHOT_SAVE` or `VM_SNAPSHOT_RESTORE`.
    pub op: vm_snapshot_op,
}

opaque_union_debug!(vm_exit_u_14, vm_exit_u_13);
zeroed_default!(
    vm_memseg_12,
    vm_exit_u_14,
    vm_exit_14,
    vm_exit_u_13,
    vm_exit_13,
    vm_run_13,
    vm_stats_13,
    vm_snapshot_meta_13,
);

const v: u8 = VMM_IOC_GROUP_v;

/// FreeBSD 13 `VM_RUN` (arg [`vm_run_13`]).
pub const VM_RUN_13: c_ulong = _IOWR(v, IOCNUM_RUN, size_of::<vm_run_13>());
/// FreeBSD 13 `VM_STATS` (arg [`vm_stats_13`]).
pub const VM_STATS_13: c_ulong = _IOWR(v, IOCNUM_VM_STATS, size_of::<vm_stats_13>());
/// FreeBSD 13 `VM_SNAPSHOT_REQ` (arg [`vm_snapshot_meta_13`]).
pub const VM_SNAPSHOT_REQ_13: c_ulong =
    _IOWR(v, IOCNUM_SNAPSHOT_REQ, size_of::<vm_snapshot_meta_13>());
/// FreeBSD 13/14 `VM_ALLOC_MEMSEG` (arg [`vm_memseg_14`]); a 15 kernel adds 7 to any segid != 0.
pub const VM_ALLOC_MEMSEG_14: c_ulong = _IOW(v, IOCNUM_ALLOC_MEMSEG, size_of::<vm_memseg_14>());
/// FreeBSD 13/14 `VM_GET_MEMSEG` (arg [`vm_memseg_14`]).
pub const VM_GET_MEMSEG_14: c_ulong = _IOWR(v, IOCNUM_GET_MEMSEG, size_of::<vm_memseg_14>());
/// `VM_ALLOC_MEMSEG_FBSD12` (arg [`vm_memseg_12`]).
pub const VM_ALLOC_MEMSEG_12: c_ulong = _IOW(v, IOCNUM_ALLOC_MEMSEG, size_of::<vm_memseg_12>());
/// `VM_GET_MEMSEG_FBSD12` (arg [`vm_memseg_12`]).
pub const VM_GET_MEMSEG_12: c_ulong = _IOWR(v, IOCNUM_GET_MEMSEG, size_of::<vm_memseg_12>());

assert_layout!(vm_memseg_14, size 32, align 8, { segid: 0, len: 8, name: 16 });
assert_layout!(vm_memseg_12, size 80, align 8, { segid: 0, len: 8, name: 16 });
assert_layout!(vm_inout_str_14, size 88, align 8, { inout: 0, paging: 8, seg_desc: 72 });
assert_layout!(vm_exit_u_14, size 120, align 8);
assert_layout!(vm_exit_14, size 136, align 8, { u: 16, u.inout_str: 16 });
assert_layout!(vm_exit_u_13, size 120, align 8);
assert_layout!(vm_exit_13, size 136, align 8, { u: 16, u.inst_emul.vie: 72, u.ipi.dmask: 24 });
assert_layout!(vm_exit_ipi_13, size 40, align 8, { mode: 0, vector: 4, dmask: 8 });
assert_layout!(vm_exit_kcompat13, size 136, align 8, { u: 16 });
assert_layout!(vm_run_13, size 144, align 8, { cpuid: 0, vm_exit: 8 });
assert_layout!(vm_run_kcompat13, size 144, align 8, { cpuid: 0, vm_exit: 8 });
assert_layout!(vm_stats_13, size 536, align 8, { cpuid: 0, num_entries: 4, tv: 8, statbuf: 24 });
assert_layout!(vm_snapshot_meta_13, size 72, align 8, {
    ctx: 0, dev_data: 8, dev_name: 16, dev_req: 24, buffer: 32, op: 64,
});
