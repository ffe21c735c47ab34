//! Thin `ioctl(2)` wrappers, one per request (FreeBSD only).
//!
//! Each function issues exactly one request on `fd` and turns `-1` into the `errno` error. They are
//! `unsafe` because the kernel follows the pointers inside some arguments ([`crate::vm_run`],
//! [`crate::vm_register_set`], [`crate::vm_cpuset`], [`crate::vm_memseg`],
//! [`crate::vm_snapshot_meta`], …): the caller must make those point to memory of the stated size
//! that stays valid for the call. Arguments without pointers are still passed by reference only.

use std::io;
use std::os::fd::RawFd;

use crate::*;

/// Issues `request` with `arg` and maps the C convention (`-1` + `errno`) to `io::Result`.
///
/// # Safety
/// `arg` must be valid for reads (and writes, if the request copies out) of the size encoded in
/// `request`, and any pointers inside it must satisfy that request's contract.
unsafe fn ioctl_raw(fd: RawFd, request: c_ulong, arg: *mut c_void) -> io::Result<c_int> {
    // SAFETY: the caller guarantees `arg` is valid for this request; `ioctl` with a bad `fd`
    // only fails with EBADF.
    let rc = unsafe { libc::ioctl(fd, request, arg) };
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

macro_rules! ioctl_fns {
    ($($(#[$meta:meta])* $name:ident => $request:ident, $dir:ident $($arg:ty)?;)+) => {
        $( ioctl_fns!(@one $(#[$meta])* $name, $request, $dir $($arg)?); )+
    };
    (@one $(#[$meta:meta])* $name:ident, $request:ident, none) => {
        $(#[$meta])*
        #[doc = concat!("Issues `", stringify!($request), "` on `fd`.")]
        ///
        /// # Safety
        /// `fd` must be a descriptor the caller owns; the request has no argument.
        pub unsafe fn $name(fd: RawFd) -> io::Result<c_int> {
            // SAFETY: the request encodes no parameter, so the kernel reads no argument.
            unsafe { ioctl_raw(fd, $request, core::ptr::null_mut()) }
        }
    };
    (@one $(#[$meta:meta])* $name:ident, $request:ident, in $arg:ty) => {
        $(#[$meta])*
        #[doc = concat!("Issues `", stringify!($request), "` on `fd`; the kernel reads `arg`.")]
        ///
        /// # Safety
        /// Any pointers inside `arg` must be valid for what the kernel does with them for this
        /// request (see the module documentation).
        pub unsafe fn $name(fd: RawFd, arg: &$arg) -> io::Result<c_int> {
            const _: () = assert!(IOCPARM_LEN($request) == core::mem::size_of::<$arg>());
            // SAFETY: `arg` is a live reference of exactly the encoded size (asserted above); the
            // request only copies in, so the kernel does not write through the pointer. The caller
            // vouches for pointers inside `arg`.
            unsafe { ioctl_raw(fd, $request, arg as *const $arg as *mut c_void) }
        }
    };
    (@one $(#[$meta:meta])* $name:ident, $request:ident, inout $arg:ty) => {
        $(#[$meta])*
        #[doc = concat!("Issues `", stringify!($request), "` on `fd`; the kernel reads and writes `arg`.")]
        ///
        /// # Safety
        /// Any pointers inside `arg` must be valid for what the kernel does with them for this
        /// request (see the module documentation).
        pub unsafe fn $name(fd: RawFd, arg: &mut $arg) -> io::Result<c_int> {
            const _: () = assert!(IOCPARM_LEN($request) == core::mem::size_of::<$arg>());
            // SAFETY: `arg` is a live exclusive reference of exactly the encoded size (asserted
            // above), valid for the kernel's copy-in and copy-out. The caller vouches for pointers
            // inside `arg`.
            unsafe { ioctl_raw(fd, $request, arg as *mut $arg as *mut c_void) }
        }
    };
}

ioctl_fns! {
    vm_run => VM_RUN, in vm_run;
    vm_run_13 => VM_RUN_13, inout vm_run_13;
    vm_suspend => VM_SUSPEND, in vm_suspend;
    vm_reinit => VM_REINIT, none;
    vm_set_capability => VM_SET_CAPABILITY, in vm_capability;
    vm_get_capability => VM_GET_CAPABILITY, inout vm_capability;
    vm_alloc_memseg => VM_ALLOC_MEMSEG, in vm_memseg;
    vm_alloc_memseg_14 => VM_ALLOC_MEMSEG_14, in vm_memseg_14;
    vm_alloc_memseg_12 => VM_ALLOC_MEMSEG_12, in vm_memseg_12;
    vm_get_memseg => VM_GET_MEMSEG, inout vm_memseg;
    vm_get_memseg_14 => VM_GET_MEMSEG_14, inout vm_memseg_14;
    vm_get_memseg_12 => VM_GET_MEMSEG_12, inout vm_memseg_12;
    vm_mmap_memseg => VM_MMAP_MEMSEG, in vm_memmap;
    vm_mmap_getnext => VM_MMAP_GETNEXT, inout vm_memmap;
    vm_munmap_memseg => VM_MUNMAP_MEMSEG, in vm_munmap;
    vm_set_register => VM_SET_REGISTER, in vm_register;
    vm_get_register => VM_GET_REGISTER, inout vm_register;
    vm_set_segment_descriptor => VM_SET_SEGMENT_DESCRIPTOR, in vm_seg_desc;
    vm_get_segment_descriptor => VM_GET_SEGMENT_DESCRIPTOR, inout vm_seg_desc;
    vm_set_register_set => VM_SET_REGISTER_SET, in vm_register_set;
    vm_get_register_set => VM_GET_REGISTER_SET, inout vm_register_set;
    vm_get_kernemu_dev => VM_GET_KERNEMU_DEV, inout vm_readwrite_kernemu_device;
    vm_set_kernemu_dev => VM_SET_KERNEMU_DEV, in vm_readwrite_kernemu_device;
    vm_get_intinfo => VM_GET_INTINFO, inout vm_intinfo;
    vm_set_intinfo => VM_SET_INTINFO, in vm_intinfo;
    vm_inject_exception => VM_INJECT_EXCEPTION, in vm_exception;
    vm_lapic_irq => VM_LAPIC_IRQ, in vm_lapic_irq;
    vm_inject_nmi => VM_INJECT_NMI, in vm_nmi;
    vm_ioapic_assert_irq => VM_IOAPIC_ASSERT_IRQ, in vm_ioapic_irq;
    vm_ioapic_deassert_irq => VM_IOAPIC_DEASSERT_IRQ, in vm_ioapic_irq;
    vm_ioapic_pulse_irq => VM_IOAPIC_PULSE_IRQ, in vm_ioapic_irq;
    vm_lapic_msi => VM_LAPIC_MSI, in vm_lapic_msi;
    vm_lapic_local_irq => VM_LAPIC_LOCAL_IRQ, in vm_lapic_irq;
    /// The kernel writes the pin count to `arg`.
    vm_ioapic_pincount => VM_IOAPIC_PINCOUNT, inout c_int;
    /// `arg` is the vCPU id.
    vm_restart_instruction => VM_RESTART_INSTRUCTION, in c_int;
    vm_bind_pptdev => VM_BIND_PPTDEV, in vm_pptdev;
    vm_unbind_pptdev => VM_UNBIND_PPTDEV, in vm_pptdev;
    vm_map_pptdev_mmio => VM_MAP_PPTDEV_MMIO, in vm_pptdev_mmio;
    vm_pptdev_msi => VM_PPTDEV_MSI, in vm_pptdev_msi;
    vm_pptdev_msix => VM_PPTDEV_MSIX, in vm_pptdev_msix;
    vm_pptdev_disable_msix => VM_PPTDEV_DISABLE_MSIX, in vm_pptdev;
    vm_unmap_pptdev_mmio => VM_UNMAP_PPTDEV_MMIO, in vm_pptdev_mmio;
    vm_stats => VM_STATS, inout vm_stats;
    vm_stats_13 => VM_STATS_13, inout vm_stats_13;
    vm_stat_desc => VM_STAT_DESC, inout vm_stat_desc;
    vm_set_x2apic_state => VM_SET_X2APIC_STATE, in vm_x2apic;
    vm_get_x2apic_state => VM_GET_X2APIC_STATE, inout vm_x2apic;
    vm_get_hpet_capabilities => VM_GET_HPET_CAPABILITIES, inout vm_hpet_cap;
    vm_set_topology => VM_SET_TOPOLOGY, in vm_cpu_topology;
    vm_get_topology => VM_GET_TOPOLOGY, inout vm_cpu_topology;
    vm_get_gpa_pmap => VM_GET_GPA_PMAP, inout vm_gpa_pte;
    vm_gla2gpa => VM_GLA2GPA, inout vm_gla2gpa;
    vm_gla2gpa_nofault => VM_GLA2GPA_NOFAULT, inout vm_gla2gpa;
    vm_isa_assert_irq => VM_ISA_ASSERT_IRQ, in vm_isa_irq;
    vm_isa_deassert_irq => VM_ISA_DEASSERT_IRQ, in vm_isa_irq;
    vm_isa_pulse_irq => VM_ISA_PULSE_IRQ, in vm_isa_irq;
    vm_isa_set_irq_trigger => VM_ISA_SET_IRQ_TRIGGER, in vm_isa_irq_trigger;
    vm_activate_cpu => VM_ACTIVATE_CPU, in vm_activate_cpu;
    vm_get_cpus => VM_GET_CPUS, in vm_cpuset;
    vm_suspend_cpu => VM_SUSPEND_CPU, in vm_activate_cpu;
    vm_resume_cpu => VM_RESUME_CPU, in vm_activate_cpu;
    vm_rtc_read => VM_RTC_READ, inout vm_rtc_data;
    vm_rtc_write => VM_RTC_WRITE, in vm_rtc_data;
    vm_rtc_settime => VM_RTC_SETTIME, in vm_rtc_time;
    vm_rtc_gettime => VM_RTC_GETTIME, inout vm_rtc_time;
    vm_snapshot_req => VM_SNAPSHOT_REQ, inout vm_snapshot_meta;
    vm_snapshot_req_13 => VM_SNAPSHOT_REQ_13, inout vm_snapshot_meta_13;
    vm_restore_time => VM_RESTORE_TIME, inout c_int;
    /// On `/dev/vmmctl`.
    vmmctl_vm_create => VMMCTL_VM_CREATE, inout vmmctl_vm_create;
    /// On `/dev/vmmctl`.
    vmmctl_vm_destroy => VMMCTL_VM_DESTROY, inout vmmctl_vm_destroy;
}
