//! `<machine/vmm_snapshot.h>`: the `VM_SNAPSHOT_REQ` argument.

use crate::{c_char, c_void};

c_enum! {
    /// Which kernel device a `VM_SNAPSHOT_REQ` saves or restores (`enum snapshot_req`).
    /// `STRUCT_VMX` exists only on FreeBSD 13; later releases kept the other values.
    snapshot_req {
        STRUCT_VMX = 0,
        STRUCT_VIOAPIC = 1,
        STRUCT_VM = 2,
        STRUCT_VLAPIC = 3,
        VM_MEM = 4,
        STRUCT_VHPET = 5,
        STRUCT_VMCX = 6,
        STRUCT_VATPIC = 7,
        STRUCT_VATPIT = 8,
        STRUCT_VPMTMR = 9,
        STRUCT_VRTC = 10,
    }
}

c_enum! {
    /// Direction of a snapshot request (`enum vm_snapshot_op`).
    vm_snapshot_op {
        VM_SNAPSHOT_SAVE = 0,
        VM_SNAPSHOT_RESTORE = 1,
    }
}

/// The caller's buffer for one device's state (`struct vm_snapshot_buffer`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct vm_snapshot_buffer {
    /// Start of the buffer.
    pub buf_start: *mut u8,
    /// Its size.
    pub buf_size: usize,
    /// Current position; the kernel advances it.
    pub buf: *mut u8,
    /// Bytes left after `buf`.
    pub buf_rem: usize,
}

/// Save or restore one kernel device (`VM_SNAPSHOT_REQ`, FreeBSD 14+ layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct vm_snapshot_meta {
    /// Device cookie (userland devices only).
    pub dev_data: *mut c_void,
    /// Device name (userland devices only).
    pub dev_name: *const c_char,
    /// Which kernel structure (`STRUCT_*`, `VM_MEM`).
    pub dev_req: snapshot_req,
    /// Data buffer.
    pub buffer: vm_snapshot_buffer,
    /// `VM_SNAPSHOT_SAVE` or `VM_SNAPSHOT_RESTORE`.
    pub op: vm_snapshot_op,
}

zeroed_default!(vm_snapshot_buffer, vm_snapshot_meta);

assert_layout!(vm_snapshot_buffer, size 32, align 8, {
    buf_start: 0, buf_size: 8, buf: 16, buf_rem: 24,
});
assert_layout!(vm_snapshot_meta, size 64, align 8, {
    dev_data: 0, dev_name: 8, dev_req: 16, buffer: 24, buffer.buf_start: 24,
    buffer.buf_size: 32, buffer.buf: 40, buffer.buf_rem: 48, op: 56,
});
