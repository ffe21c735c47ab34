//! What user space does with the exit records `VM_RUN` hands back.

use vmm_sys::*;

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
    // SAFETY: the 13 and 14 unions have the same size and, for every exit code 13 reports,
    // the same member layout; both are plain data.
    let as_14 = vm_exit_14 {
        exitcode: old.exitcode,
        inst_length: old.inst_length,
        rip: old.rip,
        u: unsafe { std::mem::transmute::<vm_exit_u_13, vm_exit_u_14>(old.u) },
    };
    exit_from_14(&as_14)
}
