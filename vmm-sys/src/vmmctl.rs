//! `<dev/vmm/vmm_dev.h>`, `<dev/vmm/vmm_mem.h>` (FreeBSD 15): `/dev/vmmctl` and memory segment
//! ids, plus the guest memory layout constants of libvmmapi.

use core::mem::size_of;

use crate::{c_char, c_int, c_ulong, _IOWR, VM_MAX_NAMELEN};

/// Group byte of the `/dev/vmmctl` requests (`'V'`).
pub const VMMCTL_IOC_GROUP_V: u8 = b'V';

/// `vmmctl_vm_create.flags`: destroy the VM when the creating `/dev/vmmctl` descriptor closes.
pub const VMMCTL_CREATE_DESTROY_ON_CLOSE: u32 = 0x1;
/// All flags `VMMCTL_VM_CREATE` accepts; others fail with `EINVAL`.
pub const VMMCTL_FLAGS_MASK: u32 = VMMCTL_CREATE_DESTROY_ON_CLOSE;

/// Create a VM (`VMMCTL_VM_CREATE`); `reserved` must be zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct vmmctl_vm_create {
    /// VM name, NUL-terminated.
    pub name: [c_char; VM_MAX_NAMELEN + 1],
    /// `VMMCTL_CREATE_*`.
    pub flags: u32,
    /// Must be zero.
    pub reserved: [c_int; 15],
}

/// The first FreeBSD 15 form of [`vmmctl_vm_create`], before `flags` existed (same size and
/// request; `flags == 0` is compatible with both).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct vmmctl_vm_create_v0 {
    /// VM name, NUL-terminated.
    pub name: [c_char; VM_MAX_NAMELEN + 1],
    /// Must be zero.
    pub reserved: [c_int; 16],
}

/// Destroy a VM (`VMMCTL_VM_DESTROY`); `reserved` must be zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct vmmctl_vm_destroy {
    /// VM name, NUL-terminated.
    pub name: [c_char; VM_MAX_NAMELEN + 1],
    /// Must be zero.
    pub reserved: [c_int; 16],
}

zeroed_default!(vmmctl_vm_create, vmmctl_vm_create_v0, vmmctl_vm_destroy);

/// Create a VM through `/dev/vmmctl` (arg [`vmmctl_vm_create`]; FreeBSD 15).
pub const VMMCTL_VM_CREATE: c_ulong = _IOWR(VMMCTL_IOC_GROUP_V, 0, size_of::<vmmctl_vm_create>());
/// Destroy a VM through `/dev/vmmctl` (arg [`vmmctl_vm_destroy`]; FreeBSD 15).
pub const VMMCTL_VM_DESTROY: c_ulong = _IOWR(VMMCTL_IOC_GROUP_V, 1, size_of::<vmmctl_vm_destroy>());

/// Guest NUMA domains (`VM_MAXMEMDOM`, FreeBSD 15).
pub const VM_MAXMEMDOM: usize = 8;
/// System memory segments, one per guest domain (`VM_MAXSYSMEM`).
pub const VM_MAXSYSMEM: usize = VM_MAXMEMDOM;

c_enum! {
    /// Memory segment ids on FreeBSD 15 (`dev/vmm/vmm_mem.h`): domain `i` uses `VM_SYSMEM + i`.
    vm_memseg_id {
        VM_SYSMEM = 0,
        VM_BOOTROM = 8,
        VM_FRAMEBUFFER = 9,
        VM_PCIROM = 10,
        VM_MEMSEG_END = 11,
    }
}
/// Number of memory segment ids (`VM_MAX_MEMSEGS`).
pub const VM_MAX_MEMSEGS: usize = VM_MEMSEG_END as usize;
/// Guest mappings a VM may have (`VM_MAX_MEMMAPS`).
pub const VM_MAX_MEMMAPS: usize = VM_MAX_MEMSEGS * 2;
/// `VM_BOOTROM` on FreeBSD 13 and 14 (a libvmmapi value).
pub const VM_BOOTROM_14: vm_memseg_id = 1;
/// `VM_FRAMEBUFFER` on FreeBSD 13 and 14.
pub const VM_FRAMEBUFFER_14: vm_memseg_id = 2;
/// `VM_PCIROM` on FreeBSD 13 and 14.
pub const VM_PCIROM_14: vm_memseg_id = 3;

c_enum! {
    /// NUMA allocation policy of [`crate::vm_memseg::ds_policy`] (`<sys/domainset.h>`).
    domainset_policy {
        DOMAINSET_POLICY_INVALID = 0,
        DOMAINSET_POLICY_ROUNDROBIN = 1,
        DOMAINSET_POLICY_FIRSTTOUCH = 2,
        DOMAINSET_POLICY_PREFER = 3,
        DOMAINSET_POLICY_INTERLEAVE = 4,
    }
}

/// libvmmapi: guest RAM below 4 GiB ends here (3 GiB).
pub const VM_LOWMEM_LIMIT: u64 = 0xc000_0000;
/// libvmmapi: guest RAM above [`VM_LOWMEM_LIMIT`] continues from 4 GiB.
pub const VM_HIGHMEM_BASE: u64 = 0x1_0000_0000;
/// libvmmapi: unmapped guard before and after the host mapping of guest RAM.
pub const VM_MMAP_GUARD_SIZE: usize = 0x40_0000;
/// libvmmapi memory flag: keep guest RAM in core.
pub const VM_MEM_F_INCORE: c_int = 0x01;
/// libvmmapi memory flag: wire guest RAM (maps with `VM_MEMMAP_F_WIRED`).
pub const VM_MEM_F_WIRED: c_int = 0x02;

assert_layout!(vmmctl_vm_create, size 296, align 4, { name: 0, flags: 232, reserved: 236 });
assert_layout!(vmmctl_vm_create_v0, size 296, align 4, { name: 0, reserved: 232 });
assert_layout!(vmmctl_vm_destroy, size 296, align 4, { name: 0, reserved: 232 });
