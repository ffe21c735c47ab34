//! `<machine/vmm_dev.h>`: the argument structs and request codes of `/dev/vmm/NAME`.

use core::mem::size_of;

use crate::{
    c_char, c_int, c_uint, c_ulong, cpuset_t, domainset_t, seg_desc, timeval, vm_cap_type, vm_exit,
    vm_guest_paging, vm_intr_trigger, vm_ooffset_t, vm_paddr_t, vm_reg_name, vm_snapshot_meta,
    vm_suspend_how, x2apic_state, _IO, _IOR, _IOW, _IOWR, VM_MAX_SUFFIXLEN,
};

/// Group byte of every `/dev/vmm/NAME` request (`'v'`).
pub const VMM_IOC_GROUP_v: u8 = b'v';

/// `vm_memmap.flags`: wire the mapping.
pub const VM_MEMMAP_F_WIRED: c_int = 0x01;
/// `vm_memmap.flags`: the range is mapped in the passthrough IOMMU domain.
pub const VM_MEMMAP_F_IOMMU: c_int = 0x02;

/// `vm_cpuset.which`: vCPUs activated with `VM_ACTIVATE_CPU`.
pub const VM_ACTIVE_CPUS: c_int = 0;
/// `vm_cpuset.which`: vCPUs suspended with `VM_SUSPEND_CPU`.
pub const VM_SUSPENDED_CPUS: c_int = 1;
/// `vm_cpuset.which`: vCPUs stopped by the debugger.
pub const VM_DEBUG_CPUS: c_int = 2;

/// Counters returned by one `VM_STATS` call.
pub const MAX_VM_STATS: usize = 64;

/// Map part of a memory segment into guest-physical space (`VM_MMAP_MEMSEG`, `VM_MMAP_GETNEXT`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_memmap {
    /// Guest-physical start.
    pub gpa: vm_paddr_t,
    /// Memory segment id.
    pub segid: c_int,
    /// Offset into the segment.
    pub segoff: vm_ooffset_t,
    /// Length.
    pub len: usize,
    /// `PROT_*`.
    pub prot: c_int,
    /// `VM_MEMMAP_F_*`.
    pub flags: c_int,
}

/// Unmap a guest-physical range (`VM_MUNMAP_MEMSEG`, FreeBSD 14+).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_munmap {
    /// Guest-physical start.
    pub gpa: vm_paddr_t,
    /// Length.
    pub len: usize,
}

/// Create or query a memory segment (`VM_ALLOC_MEMSEG`, `VM_GET_MEMSEG`), FreeBSD 15 layout with
/// the guest NUMA policy.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct vm_memseg {
    /// Segment id (`VM_SYSMEM`+domain, `VM_BOOTROM`, …).
    pub segid: c_int,
    /// Length in bytes.
    pub len: usize,
    /// Empty for system memory, else the device-memory name (NUL-terminated).
    pub name: [c_char; VM_MAX_SUFFIXLEN + 1],
    /// Host domains to allocate from, or null for no policy.
    pub ds_mask: *mut domainset_t,
    /// Size of `*ds_mask` in bytes (8..=32).
    pub ds_mask_size: usize,
    /// `DOMAINSET_POLICY_*`; 0 means no policy.
    pub ds_policy: c_int,
}

/// Set or get one register (`VM_SET_REGISTER`, `VM_GET_REGISTER`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_register {
    /// vCPU id.
    pub cpuid: c_int,
    /// `VM_REG_GUEST_*`.
    pub regnum: vm_reg_name,
    /// Value.
    pub regval: u64,
}

/// Set or get a segment descriptor (`VM_SET_SEGMENT_DESCRIPTOR`, `VM_GET_SEGMENT_DESCRIPTOR`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_seg_desc {
    /// vCPU id.
    pub cpuid: c_int,
    /// `VM_REG_GUEST_ES` … `VM_REG_GUEST_GDTR`.
    pub regnum: vm_reg_name,
    /// The descriptor.
    pub desc: seg_desc,
}

/// Set or get several registers (`VM_SET_REGISTER_SET`, `VM_GET_REGISTER_SET`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct vm_register_set {
    /// vCPU id.
    pub cpuid: c_int,
    /// Entries in both arrays (at most `VM_REG_LAST`).
    pub count: c_uint,
    /// `count` register names.
    pub regnums: *const c_int,
    /// `count` values.
    pub regvals: *mut u64,
}

/// Run a vCPU (`VM_RUN`, FreeBSD 14+): the kernel writes the exit record and, for an IPI exit, the
/// destination set through the pointers.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct vm_run {
    /// vCPU id.
    pub cpuid: c_int,
    /// Buffer for the IPI destination set.
    pub cpuset: *mut cpuset_t,
    /// Size of `*cpuset` in bytes.
    pub cpusetsize: usize,
    /// Buffer for the exit record.
    pub vm_exit: *mut vm_exit,
}

/// Queue an exception (`VM_INJECT_EXCEPTION`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_exception {
    /// vCPU id.
    pub cpuid: c_int,
    /// Exception vector.
    pub vector: c_int,
    /// Error code.
    pub error_code: u32,
    /// Whether `error_code` is delivered.
    pub error_code_valid: c_int,
    /// Restart the current instruction after delivery.
    pub restart_instruction: c_int,
}

/// Deliver an MSI (`VM_LAPIC_MSI`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_lapic_msi {
    /// MSI data.
    pub msg: u64,
    /// MSI address.
    pub addr: u64,
}

/// Raise a vector on a local APIC (`VM_LAPIC_IRQ`, `VM_LAPIC_LOCAL_IRQ`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_lapic_irq {
    /// vCPU id (-1 for all with `VM_LAPIC_LOCAL_IRQ`).
    pub cpuid: c_int,
    /// Vector or LVT index.
    pub vector: c_int,
}

/// A vIOAPIC pin (`VM_IOAPIC_ASSERT_IRQ`, `_DEASSERT_IRQ`, `_PULSE_IRQ`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_ioapic_irq {
    /// Pin.
    pub irq: c_int,
}

/// An ISA IRQ on the vATPIC and its vIOAPIC pin (`VM_ISA_ASSERT_IRQ`, …).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_isa_irq {
    /// 8259 IRQ.
    pub atpic_irq: c_int,
    /// vIOAPIC pin, -1 for none.
    pub ioapic_irq: c_int,
}

/// Set an ISA IRQ's trigger mode (`VM_ISA_SET_IRQ_TRIGGER`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_isa_irq_trigger {
    /// 8259 IRQ.
    pub atpic_irq: c_int,
    /// `EDGE_TRIGGER` or `LEVEL_TRIGGER`.
    pub trigger: vm_intr_trigger,
}

/// Set or get a capability (`VM_SET_CAPABILITY`, `VM_GET_CAPABILITY`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_capability {
    /// vCPU id.
    pub cpuid: c_int,
    /// `VM_CAP_*`.
    pub captype: vm_cap_type,
    /// Value.
    pub capval: c_int,
    /// Apply to all vCPUs.
    pub allcpus: c_int,
}

/// A host PCI device for passthrough (`VM_BIND_PPTDEV`, …).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_pptdev {
    /// Bus.
    pub bus: c_int,
    /// Slot.
    pub slot: c_int,
    /// Function.
    pub func: c_int,
}

/// Map a passthrough device's MMIO range (`VM_MAP_PPTDEV_MMIO`, `VM_UNMAP_PPTDEV_MMIO`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_pptdev_mmio {
    /// Bus.
    pub bus: c_int,
    /// Slot.
    pub slot: c_int,
    /// Function.
    pub func: c_int,
    /// Guest-physical address.
    pub gpa: vm_paddr_t,
    /// Host-physical address.
    pub hpa: vm_paddr_t,
    /// Length.
    pub len: usize,
}

/// Configure a passthrough device's MSI (`VM_PPTDEV_MSI`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_pptdev_msi {
    /// Unused.
    pub vcpu: c_int,
    /// Bus.
    pub bus: c_int,
    /// Slot.
    pub slot: c_int,
    /// Function.
    pub func: c_int,
    /// Vectors; 0 disables MSI.
    pub numvec: c_int,
    /// MSI data.
    pub msg: u64,
    /// MSI address.
    pub addr: u64,
}

/// Configure one MSI-X entry of a passthrough device (`VM_PPTDEV_MSIX`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_pptdev_msix {
    /// Unused.
    pub vcpu: c_int,
    /// Bus.
    pub bus: c_int,
    /// Slot.
    pub slot: c_int,
    /// Function.
    pub func: c_int,
    /// Table index.
    pub idx: c_int,
    /// MSI data.
    pub msg: u64,
    /// Vector control word.
    pub vector_control: u32,
    /// MSI address.
    pub addr: u64,
}

/// Inject an NMI (`VM_INJECT_NMI`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_nmi {
    /// vCPU id.
    pub cpuid: c_int,
}

/// Read a page of a vCPU's statistics counters (`VM_STATS`, FreeBSD 14+).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct vm_stats {
    /// vCPU id.
    pub cpuid: c_int,
    /// First counter to return.
    pub index: c_int,
    /// Counters returned.
    pub num_entries: c_int,
    /// When they were sampled.
    pub tv: timeval,
    /// The counters.
    pub statbuf: [u64; MAX_VM_STATS],
}

/// Describe one statistics counter (`VM_STAT_DESC`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct vm_stat_desc {
    /// Counter index.
    pub index: c_int,
    /// Description (NUL-terminated).
    pub desc: [c_char; 128],
}

/// Set or get x2APIC mode (`VM_SET_X2APIC_STATE`, `VM_GET_X2APIC_STATE`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_x2apic {
    /// vCPU id.
    pub cpuid: c_int,
    /// `X2APIC_*`.
    pub state: x2apic_state,
}

/// Host page-table entries for a guest-physical address (`VM_GET_GPA_PMAP`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_gpa_pte {
    /// Guest-physical address.
    pub gpa: u64,
    /// Entries, top level first.
    pub pte: [u64; 4],
    /// Valid entries.
    pub ptenum: c_int,
}

/// vHPET capabilities (`VM_GET_HPET_CAPABILITIES`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_hpet_cap {
    /// Low 32 bits of the HPET capabilities register.
    pub capabilities: u32,
}

/// Suspend the VM (`VM_SUSPEND`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_suspend {
    /// `VM_SUSPEND_*`.
    pub how: vm_suspend_how,
}

/// Translate a guest-linear address (`VM_GLA2GPA`, `VM_GLA2GPA_NOFAULT`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_gla2gpa {
    /// vCPU id.
    pub vcpuid: c_int,
    /// `PROT_READ` or `PROT_WRITE`.
    pub prot: c_int,
    /// Guest-linear address.
    pub gla: u64,
    /// Paging state to walk.
    pub paging: vm_guest_paging,
    /// Out: 1 if translation faulted.
    pub fault: c_int,
    /// Out: guest-physical address.
    pub gpa: u64,
}

/// A vCPU id (`VM_ACTIVATE_CPU`, `VM_SUSPEND_CPU`, `VM_RESUME_CPU`; -1 means all for the last two).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_activate_cpu {
    /// vCPU id.
    pub vcpuid: c_int,
}

/// Read one of the VM's vCPU sets (`VM_GET_CPUS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct vm_cpuset {
    /// `VM_ACTIVE_CPUS`, `VM_SUSPENDED_CPUS` or `VM_DEBUG_CPUS`.
    pub which: c_int,
    /// Size of `*cpus` in bytes (1..=128).
    pub cpusetsize: c_int,
    /// Buffer the kernel fills.
    pub cpus: *mut cpuset_t,
}

/// Pending event state (`VM_GET_INTINFO`, `VM_SET_INTINFO`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_intinfo {
    /// vCPU id.
    pub vcpuid: c_int,
    /// Event being delivered when the exit happened (`VM_INTINFO_*`).
    pub info1: u64,
    /// Event pending injection.
    pub info2: u64,
}

/// RTC time in seconds since the epoch (`VM_RTC_SETTIME`, `VM_RTC_GETTIME`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_rtc_time {
    /// Seconds.
    pub secs: crate::time_t,
}

/// One RTC NVRAM byte (`VM_RTC_READ`, `VM_RTC_WRITE`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_rtc_data {
    /// Register offset.
    pub offset: c_int,
    /// Value.
    pub value: u8,
}

/// vCPU topology (`VM_SET_TOPOLOGY`, `VM_GET_TOPOLOGY`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_cpu_topology {
    /// Sockets.
    pub sockets: u16,
    /// Cores per socket.
    pub cores: u16,
    /// Threads per core.
    pub threads: u16,
    /// Highest vCPU count; bounds the vCPU ids later requests may create.
    pub maxcpus: u16,
}

/// Access a register of a kernel-emulated device (`VM_GET_KERNEMU_DEV`, `VM_SET_KERNEMU_DEV`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct vm_readwrite_kernemu_device {
    /// vCPU id.
    pub vcpuid: c_int,
    /// Bitfields `access_width:3, _unused:29`; use the accessors.
    pub _bitfield_4: u32,
    /// Guest-physical address of the register.
    pub gpa: u64,
    /// Value.
    pub value: u64,
}

impl vm_readwrite_kernemu_device {
    bitfield!(
        /// log2 of the access size in bytes (0 = 1 … 3 = 8).
        access_width, set_access_width: u32 = _bitfield_4, shift 0, width 3
    );
    bitfield!(
        /// Unused bits.
        _unused, set__unused: u32 = _bitfield_4, shift 3, width 29
    );
}

zeroed_default!(
    vm_memseg,
    vm_register_set,
    vm_run,
    vm_stats,
    vm_stat_desc,
    vm_cpuset
);

// Request ordinals (the `IOCNUM_*` enum of the header).
/// Reserved ordinal; no request uses it.
pub const IOCNUM_ABIVERS: u8 = 0;
/// Ordinal of `VM_RUN`.
pub const IOCNUM_RUN: u8 = 1;
/// Ordinal of `VM_SET_CAPABILITY`.
pub const IOCNUM_SET_CAPABILITY: u8 = 2;
/// Ordinal of `VM_GET_CAPABILITY`.
pub const IOCNUM_GET_CAPABILITY: u8 = 3;
/// Ordinal of `VM_SUSPEND`.
pub const IOCNUM_SUSPEND: u8 = 4;
/// Ordinal of `VM_REINIT`.
pub const IOCNUM_REINIT: u8 = 5;
/// Deprecated ordinal; no request uses it.
pub const IOCNUM_MAP_MEMORY: u8 = 10;
/// Deprecated ordinal; no request uses it.
pub const IOCNUM_GET_MEMORY_SEG: u8 = 11;
/// Ordinal of `VM_GET_GPA_PMAP`.
pub const IOCNUM_GET_GPA_PMAP: u8 = 12;
/// Ordinal of `VM_GLA2GPA`.
pub const IOCNUM_GLA2GPA: u8 = 13;
/// Ordinal of `VM_ALLOC_MEMSEG`.
pub const IOCNUM_ALLOC_MEMSEG: u8 = 14;
/// Ordinal of `VM_GET_MEMSEG`.
pub const IOCNUM_GET_MEMSEG: u8 = 15;
/// Ordinal of `VM_MMAP_MEMSEG`.
pub const IOCNUM_MMAP_MEMSEG: u8 = 16;
/// Ordinal of `VM_MMAP_GETNEXT`.
pub const IOCNUM_MMAP_GETNEXT: u8 = 17;
/// Ordinal of `VM_GLA2GPA_NOFAULT`.
pub const IOCNUM_GLA2GPA_NOFAULT: u8 = 18;
/// Ordinal of `VM_MUNMAP_MEMSEG`.
pub const IOCNUM_MUNMAP_MEMSEG: u8 = 19;
/// Ordinal of `VM_SET_REGISTER`.
pub const IOCNUM_SET_REGISTER: u8 = 20;
/// Ordinal of `VM_GET_REGISTER`.
pub const IOCNUM_GET_REGISTER: u8 = 21;
/// Ordinal of `VM_SET_SEGMENT_DESCRIPTOR`.
pub const IOCNUM_SET_SEGMENT_DESCRIPTOR: u8 = 22;
/// Ordinal of `VM_GET_SEGMENT_DESCRIPTOR`.
pub const IOCNUM_GET_SEGMENT_DESCRIPTOR: u8 = 23;
/// Ordinal of `VM_SET_REGISTER_SET`.
pub const IOCNUM_SET_REGISTER_SET: u8 = 24;
/// Ordinal of `VM_GET_REGISTER_SET`.
pub const IOCNUM_GET_REGISTER_SET: u8 = 25;
/// Ordinal of `VM_GET_KERNEMU_DEV`.
pub const IOCNUM_GET_KERNEMU_DEV: u8 = 26;
/// Ordinal of `VM_SET_KERNEMU_DEV`.
pub const IOCNUM_SET_KERNEMU_DEV: u8 = 27;
/// Ordinal of `VM_GET_INTINFO`.
pub const IOCNUM_GET_INTINFO: u8 = 28;
/// Ordinal of `VM_SET_INTINFO`.
pub const IOCNUM_SET_INTINFO: u8 = 29;
/// Ordinal of `VM_INJECT_EXCEPTION`.
pub const IOCNUM_INJECT_EXCEPTION: u8 = 30;
/// Ordinal of `VM_LAPIC_IRQ`.
pub const IOCNUM_LAPIC_IRQ: u8 = 31;
/// Ordinal of `VM_INJECT_NMI`.
pub const IOCNUM_INJECT_NMI: u8 = 32;
/// Ordinal of `VM_IOAPIC_ASSERT_IRQ`.
pub const IOCNUM_IOAPIC_ASSERT_IRQ: u8 = 33;
/// Ordinal of `VM_IOAPIC_DEASSERT_IRQ`.
pub const IOCNUM_IOAPIC_DEASSERT_IRQ: u8 = 34;
/// Ordinal of `VM_IOAPIC_PULSE_IRQ`.
pub const IOCNUM_IOAPIC_PULSE_IRQ: u8 = 35;
/// Ordinal of `VM_LAPIC_MSI`.
pub const IOCNUM_LAPIC_MSI: u8 = 36;
/// Ordinal of `VM_LAPIC_LOCAL_IRQ`.
pub const IOCNUM_LAPIC_LOCAL_IRQ: u8 = 37;
/// Ordinal of `VM_IOAPIC_PINCOUNT`.
pub const IOCNUM_IOAPIC_PINCOUNT: u8 = 38;
/// Ordinal of `VM_RESTART_INSTRUCTION`.
pub const IOCNUM_RESTART_INSTRUCTION: u8 = 39;
/// Ordinal of `VM_BIND_PPTDEV`.
pub const IOCNUM_BIND_PPTDEV: u8 = 40;
/// Ordinal of `VM_UNBIND_PPTDEV`.
pub const IOCNUM_UNBIND_PPTDEV: u8 = 41;
/// Ordinal of `VM_MAP_PPTDEV_MMIO`.
pub const IOCNUM_MAP_PPTDEV_MMIO: u8 = 42;
/// Ordinal of `VM_PPTDEV_MSI`.
pub const IOCNUM_PPTDEV_MSI: u8 = 43;
/// Ordinal of `VM_PPTDEV_MSIX`.
pub const IOCNUM_PPTDEV_MSIX: u8 = 44;
/// Ordinal of `VM_PPTDEV_DISABLE_MSIX`.
pub const IOCNUM_PPTDEV_DISABLE_MSIX: u8 = 45;
/// Ordinal of `VM_UNMAP_PPTDEV_MMIO`.
pub const IOCNUM_UNMAP_PPTDEV_MMIO: u8 = 46;
/// Ordinal of `VM_STATS`.
pub const IOCNUM_VM_STATS: u8 = 50;
/// Ordinal of `VM_STAT_DESC`.
pub const IOCNUM_VM_STAT_DESC: u8 = 51;
/// Ordinal of `VM_SET_X2APIC_STATE`.
pub const IOCNUM_SET_X2APIC_STATE: u8 = 60;
/// Ordinal of `VM_GET_X2APIC_STATE`.
pub const IOCNUM_GET_X2APIC_STATE: u8 = 61;
/// Ordinal of `VM_GET_HPET_CAPABILITIES`.
pub const IOCNUM_GET_HPET_CAPABILITIES: u8 = 62;
/// Ordinal of `VM_SET_TOPOLOGY`.
pub const IOCNUM_SET_TOPOLOGY: u8 = 63;
/// Ordinal of `VM_GET_TOPOLOGY`.
pub const IOCNUM_GET_TOPOLOGY: u8 = 64;
/// Ordinal of `VM_ISA_ASSERT_IRQ`.
pub const IOCNUM_ISA_ASSERT_IRQ: u8 = 80;
/// Ordinal of `VM_ISA_DEASSERT_IRQ`.
pub const IOCNUM_ISA_DEASSERT_IRQ: u8 = 81;
/// Ordinal of `VM_ISA_PULSE_IRQ`.
pub const IOCNUM_ISA_PULSE_IRQ: u8 = 82;
/// Ordinal of `VM_ISA_SET_IRQ_TRIGGER`.
pub const IOCNUM_ISA_SET_IRQ_TRIGGER: u8 = 83;
/// Ordinal of `VM_ACTIVATE_CPU`.
pub const IOCNUM_ACTIVATE_CPU: u8 = 90;
/// Ordinal of `VM_GET_CPUS`.
pub const IOCNUM_GET_CPUSET: u8 = 91;
/// Ordinal of `VM_SUSPEND_CPU`.
pub const IOCNUM_SUSPEND_CPU: u8 = 92;
/// Ordinal of `VM_RESUME_CPU`.
pub const IOCNUM_RESUME_CPU: u8 = 93;
/// Ordinal of `VM_RTC_READ`.
pub const IOCNUM_RTC_READ: u8 = 100;
/// Ordinal of `VM_RTC_WRITE`.
pub const IOCNUM_RTC_WRITE: u8 = 101;
/// Ordinal of `VM_RTC_SETTIME`.
pub const IOCNUM_RTC_SETTIME: u8 = 102;
/// Ordinal of `VM_RTC_GETTIME`.
pub const IOCNUM_RTC_GETTIME: u8 = 103;
/// Ordinal of `VM_SNAPSHOT_REQ`.
pub const IOCNUM_SNAPSHOT_REQ: u8 = 113;
/// Ordinal of `VM_RESTORE_TIME`.
pub const IOCNUM_RESTORE_TIME: u8 = 115;

const v: u8 = VMM_IOC_GROUP_v;
const INT: usize = size_of::<c_int>();

/// Run a vCPU until it exits (arg [`vm_run`]; `_IOW` although results come back through its
/// pointers).
pub const VM_RUN: c_ulong = _IOW(v, IOCNUM_RUN, size_of::<vm_run>());
/// Set a capability (arg [`vm_capability`]).
pub const VM_SET_CAPABILITY: c_ulong = _IOW(v, IOCNUM_SET_CAPABILITY, size_of::<vm_capability>());
/// Get a capability (arg [`vm_capability`]).
pub const VM_GET_CAPABILITY: c_ulong = _IOWR(v, IOCNUM_GET_CAPABILITY, size_of::<vm_capability>());
/// Suspend the VM (arg [`vm_suspend`]).
pub const VM_SUSPEND: c_ulong = _IOW(v, IOCNUM_SUSPEND, size_of::<vm_suspend>());
/// Reset the VM to its power-on state (no arg).
pub const VM_REINIT: c_ulong = _IO(v, IOCNUM_REINIT);
/// Create a memory segment (arg [`vm_memseg`]).
pub const VM_ALLOC_MEMSEG: c_ulong = _IOW(v, IOCNUM_ALLOC_MEMSEG, size_of::<vm_memseg>());
/// Query a memory segment (arg [`vm_memseg`]).
pub const VM_GET_MEMSEG: c_ulong = _IOWR(v, IOCNUM_GET_MEMSEG, size_of::<vm_memseg>());
/// Map a segment range into guest-physical space (arg [`vm_memmap`]).
pub const VM_MMAP_MEMSEG: c_ulong = _IOW(v, IOCNUM_MMAP_MEMSEG, size_of::<vm_memmap>());
/// Next guest mapping at or above `gpa` (arg [`vm_memmap`]).
pub const VM_MMAP_GETNEXT: c_ulong = _IOWR(v, IOCNUM_MMAP_GETNEXT, size_of::<vm_memmap>());
/// Unmap a guest-physical range (arg [`vm_munmap`], FreeBSD 14+).
pub const VM_MUNMAP_MEMSEG: c_ulong = _IOW(v, IOCNUM_MUNMAP_MEMSEG, size_of::<vm_munmap>());
/// Set a register (arg [`vm_register`]).
pub const VM_SET_REGISTER: c_ulong = _IOW(v, IOCNUM_SET_REGISTER, size_of::<vm_register>());
/// Get a register (arg [`vm_register`]).
pub const VM_GET_REGISTER: c_ulong = _IOWR(v, IOCNUM_GET_REGISTER, size_of::<vm_register>());
/// Set a segment descriptor (arg [`vm_seg_desc`]).
pub const VM_SET_SEGMENT_DESCRIPTOR: c_ulong =
    _IOW(v, IOCNUM_SET_SEGMENT_DESCRIPTOR, size_of::<vm_seg_desc>());
/// Get a segment descriptor (arg [`vm_seg_desc`]).
pub const VM_GET_SEGMENT_DESCRIPTOR: c_ulong =
    _IOWR(v, IOCNUM_GET_SEGMENT_DESCRIPTOR, size_of::<vm_seg_desc>());
/// Set several registers (arg [`vm_register_set`]).
pub const VM_SET_REGISTER_SET: c_ulong =
    _IOW(v, IOCNUM_SET_REGISTER_SET, size_of::<vm_register_set>());
/// Get several registers (arg [`vm_register_set`]).
pub const VM_GET_REGISTER_SET: c_ulong =
    _IOWR(v, IOCNUM_GET_REGISTER_SET, size_of::<vm_register_set>());
/// Read a kernel-emulated device register (arg [`vm_readwrite_kernemu_device`]).
pub const VM_GET_KERNEMU_DEV: c_ulong = _IOWR(
    v,
    IOCNUM_GET_KERNEMU_DEV,
    size_of::<vm_readwrite_kernemu_device>(),
);
/// Write a kernel-emulated device register (arg [`vm_readwrite_kernemu_device`]).
pub const VM_SET_KERNEMU_DEV: c_ulong = _IOW(
    v,
    IOCNUM_SET_KERNEMU_DEV,
    size_of::<vm_readwrite_kernemu_device>(),
);
/// Get pending event state (arg [`vm_intinfo`]).
pub const VM_GET_INTINFO: c_ulong = _IOWR(v, IOCNUM_GET_INTINFO, size_of::<vm_intinfo>());
/// Set pending event state (arg [`vm_intinfo`]).
pub const VM_SET_INTINFO: c_ulong = _IOW(v, IOCNUM_SET_INTINFO, size_of::<vm_intinfo>());
/// Queue an exception (arg [`vm_exception`]).
pub const VM_INJECT_EXCEPTION: c_ulong =
    _IOW(v, IOCNUM_INJECT_EXCEPTION, size_of::<vm_exception>());
/// Raise a vector on a local APIC (arg [`vm_lapic_irq`]).
pub const VM_LAPIC_IRQ: c_ulong = _IOW(v, IOCNUM_LAPIC_IRQ, size_of::<vm_lapic_irq>());
/// Inject an NMI (arg [`vm_nmi`]).
pub const VM_INJECT_NMI: c_ulong = _IOW(v, IOCNUM_INJECT_NMI, size_of::<vm_nmi>());
/// Assert a vIOAPIC pin (arg [`vm_ioapic_irq`]).
pub const VM_IOAPIC_ASSERT_IRQ: c_ulong =
    _IOW(v, IOCNUM_IOAPIC_ASSERT_IRQ, size_of::<vm_ioapic_irq>());
/// Deassert a vIOAPIC pin (arg [`vm_ioapic_irq`]).
pub const VM_IOAPIC_DEASSERT_IRQ: c_ulong =
    _IOW(v, IOCNUM_IOAPIC_DEASSERT_IRQ, size_of::<vm_ioapic_irq>());
/// Pulse a vIOAPIC pin (arg [`vm_ioapic_irq`]).
pub const VM_IOAPIC_PULSE_IRQ: c_ulong =
    _IOW(v, IOCNUM_IOAPIC_PULSE_IRQ, size_of::<vm_ioapic_irq>());
/// Deliver an MSI (arg [`vm_lapic_msi`]).
pub const VM_LAPIC_MSI: c_ulong = _IOW(v, IOCNUM_LAPIC_MSI, size_of::<vm_lapic_msi>());
/// Trigger a local APIC LVT entry (arg [`vm_lapic_irq`]).
pub const VM_LAPIC_LOCAL_IRQ: c_ulong = _IOW(v, IOCNUM_LAPIC_LOCAL_IRQ, size_of::<vm_lapic_irq>());
/// Number of vIOAPIC pins (arg `c_int`, out).
pub const VM_IOAPIC_PINCOUNT: c_ulong = _IOR(v, IOCNUM_IOAPIC_PINCOUNT, INT);
/// Restart the current instruction (arg `c_int`: the vCPU id).
pub const VM_RESTART_INSTRUCTION: c_ulong = _IOW(v, IOCNUM_RESTART_INSTRUCTION, INT);
/// Attach a passthrough device (arg [`vm_pptdev`]).
pub const VM_BIND_PPTDEV: c_ulong = _IOW(v, IOCNUM_BIND_PPTDEV, size_of::<vm_pptdev>());
/// Detach a passthrough device (arg [`vm_pptdev`]).
pub const VM_UNBIND_PPTDEV: c_ulong = _IOW(v, IOCNUM_UNBIND_PPTDEV, size_of::<vm_pptdev>());
/// Map a passthrough MMIO range (arg [`vm_pptdev_mmio`]).
pub const VM_MAP_PPTDEV_MMIO: c_ulong =
    _IOW(v, IOCNUM_MAP_PPTDEV_MMIO, size_of::<vm_pptdev_mmio>());
/// Configure passthrough MSI (arg [`vm_pptdev_msi`]).
pub const VM_PPTDEV_MSI: c_ulong = _IOW(v, IOCNUM_PPTDEV_MSI, size_of::<vm_pptdev_msi>());
/// Configure a passthrough MSI-X entry (arg [`vm_pptdev_msix`]).
pub const VM_PPTDEV_MSIX: c_ulong = _IOW(v, IOCNUM_PPTDEV_MSIX, size_of::<vm_pptdev_msix>());
/// Disable passthrough MSI-X (arg [`vm_pptdev`]).
pub const VM_PPTDEV_DISABLE_MSIX: c_ulong =
    _IOW(v, IOCNUM_PPTDEV_DISABLE_MSIX, size_of::<vm_pptdev>());
/// Unmap a passthrough MMIO range (arg [`vm_pptdev_mmio`], FreeBSD 14+).
pub const VM_UNMAP_PPTDEV_MMIO: c_ulong =
    _IOW(v, IOCNUM_UNMAP_PPTDEV_MMIO, size_of::<vm_pptdev_mmio>());
/// Read statistics counters (arg [`vm_stats`]).
pub const VM_STATS: c_ulong = _IOWR(v, IOCNUM_VM_STATS, size_of::<vm_stats>());
/// Describe a statistics counter (arg [`vm_stat_desc`]).
pub const VM_STAT_DESC: c_ulong = _IOWR(v, IOCNUM_VM_STAT_DESC, size_of::<vm_stat_desc>());
/// Set x2APIC mode (arg [`vm_x2apic`]).
pub const VM_SET_X2APIC_STATE: c_ulong = _IOW(v, IOCNUM_SET_X2APIC_STATE, size_of::<vm_x2apic>());
/// Get x2APIC mode (arg [`vm_x2apic`]).
pub const VM_GET_X2APIC_STATE: c_ulong = _IOWR(v, IOCNUM_GET_X2APIC_STATE, size_of::<vm_x2apic>());
/// vHPET capabilities (arg [`vm_hpet_cap`], out).
pub const VM_GET_HPET_CAPABILITIES: c_ulong =
    _IOR(v, IOCNUM_GET_HPET_CAPABILITIES, size_of::<vm_hpet_cap>());
/// Set the vCPU topology (arg [`vm_cpu_topology`]).
pub const VM_SET_TOPOLOGY: c_ulong = _IOW(v, IOCNUM_SET_TOPOLOGY, size_of::<vm_cpu_topology>());
/// Get the vCPU topology (arg [`vm_cpu_topology`], out).
pub const VM_GET_TOPOLOGY: c_ulong = _IOR(v, IOCNUM_GET_TOPOLOGY, size_of::<vm_cpu_topology>());
/// Host page-table entries for a guest-physical address (arg [`vm_gpa_pte`]).
pub const VM_GET_GPA_PMAP: c_ulong = _IOWR(v, IOCNUM_GET_GPA_PMAP, size_of::<vm_gpa_pte>());
/// Translate a guest-linear address, injecting faults (arg [`vm_gla2gpa`]).
pub const VM_GLA2GPA: c_ulong = _IOWR(v, IOCNUM_GLA2GPA, size_of::<vm_gla2gpa>());
/// Translate a guest-linear address without injecting faults (arg [`vm_gla2gpa`]).
pub const VM_GLA2GPA_NOFAULT: c_ulong = _IOWR(v, IOCNUM_GLA2GPA_NOFAULT, size_of::<vm_gla2gpa>());
/// Assert an ISA IRQ (arg [`vm_isa_irq`]).
pub const VM_ISA_ASSERT_IRQ: c_ulong = _IOW(v, IOCNUM_ISA_ASSERT_IRQ, size_of::<vm_isa_irq>());
/// Deassert an ISA IRQ (arg [`vm_isa_irq`]).
pub const VM_ISA_DEASSERT_IRQ: c_ulong = _IOW(v, IOCNUM_ISA_DEASSERT_IRQ, size_of::<vm_isa_irq>());
/// Pulse an ISA IRQ (arg [`vm_isa_irq`]).
pub const VM_ISA_PULSE_IRQ: c_ulong = _IOW(v, IOCNUM_ISA_PULSE_IRQ, size_of::<vm_isa_irq>());
/// Set an ISA IRQ's trigger mode (arg [`vm_isa_irq_trigger`]).
pub const VM_ISA_SET_IRQ_TRIGGER: c_ulong = _IOW(
    v,
    IOCNUM_ISA_SET_IRQ_TRIGGER,
    size_of::<vm_isa_irq_trigger>(),
);
/// Make a vCPU runnable (arg [`vm_activate_cpu`]).
pub const VM_ACTIVATE_CPU: c_ulong = _IOW(v, IOCNUM_ACTIVATE_CPU, size_of::<vm_activate_cpu>());
/// Read a vCPU set (arg [`vm_cpuset`]; `_IOW` although the set comes back through its pointer).
pub const VM_GET_CPUS: c_ulong = _IOW(v, IOCNUM_GET_CPUSET, size_of::<vm_cpuset>());
/// Pause a vCPU or all (-1) (arg [`vm_activate_cpu`]).
pub const VM_SUSPEND_CPU: c_ulong = _IOW(v, IOCNUM_SUSPEND_CPU, size_of::<vm_activate_cpu>());
/// Resume a vCPU or all (-1) (arg [`vm_activate_cpu`]).
pub const VM_RESUME_CPU: c_ulong = _IOW(v, IOCNUM_RESUME_CPU, size_of::<vm_activate_cpu>());
/// Read an RTC NVRAM byte (arg [`vm_rtc_data`]).
pub const VM_RTC_READ: c_ulong = _IOWR(v, IOCNUM_RTC_READ, size_of::<vm_rtc_data>());
/// Write an RTC NVRAM byte (arg [`vm_rtc_data`]).
pub const VM_RTC_WRITE: c_ulong = _IOW(v, IOCNUM_RTC_WRITE, size_of::<vm_rtc_data>());
/// Set the RTC time (arg [`vm_rtc_time`]).
pub const VM_RTC_SETTIME: c_ulong = _IOW(v, IOCNUM_RTC_SETTIME, size_of::<vm_rtc_time>());
/// Get the RTC time (arg [`vm_rtc_time`], out).
pub const VM_RTC_GETTIME: c_ulong = _IOR(v, IOCNUM_RTC_GETTIME, size_of::<vm_rtc_time>());
/// Save or restore one kernel device's state (arg [`vm_snapshot_meta`]; kernels built with
/// `options BHYVE_SNAPSHOT` only).
pub const VM_SNAPSHOT_REQ: c_ulong = _IOWR(v, IOCNUM_SNAPSHOT_REQ, size_of::<vm_snapshot_meta>());
/// Resynchronise guest time after a restore (arg `c_int`; `BHYVE_SNAPSHOT` kernels only).
pub const VM_RESTORE_TIME: c_ulong = _IOWR(v, IOCNUM_RESTORE_TIME, INT);

assert_layout!(vm_memmap, size 40, align 8, {
    gpa: 0, segid: 8, segoff: 16, len: 24, prot: 32, flags: 36,
});
assert_layout!(vm_munmap, size 16, align 8, { gpa: 0, len: 8 });
assert_layout!(vm_memseg, size 56, align 8, {
    segid: 0, len: 8, name: 16, ds_mask: 32, ds_mask_size: 40, ds_policy: 48,
});
assert_layout!(vm_register, size 16, align 8, { cpuid: 0, regnum: 4, regval: 8 });
assert_layout!(vm_seg_desc, size 24, align 8, {
    cpuid: 0, regnum: 4, desc: 8, desc.base: 8, desc.limit: 16, desc.access: 20,
});
assert_layout!(vm_register_set, size 24, align 8, { cpuid: 0, count: 4, regnums: 8, regvals: 16 });
assert_layout!(vm_run, size 32, align 8, { cpuid: 0, cpuset: 8, cpusetsize: 16, vm_exit: 24 });
assert_layout!(vm_exception, size 20, align 4, {
    cpuid: 0, vector: 4, error_code: 8, error_code_valid: 12, restart_instruction: 16,
});
assert_layout!(vm_lapic_msi, size 16, align 8, { msg: 0, addr: 8 });
assert_layout!(vm_lapic_irq, size 8, align 4, { cpuid: 0, vector: 4 });
assert_layout!(vm_ioapic_irq, size 4, align 4, { irq: 0 });
assert_layout!(vm_isa_irq, size 8, align 4, { atpic_irq: 0, ioapic_irq: 4 });
assert_layout!(vm_isa_irq_trigger, size 8, align 4, { atpic_irq: 0, trigger: 4 });
assert_layout!(vm_capability, size 16, align 4, { cpuid: 0, captype: 4, capval: 8, allcpus: 12 });
assert_layout!(vm_pptdev, size 12, align 4, { bus: 0, slot: 4, func: 8 });
assert_layout!(vm_pptdev_mmio, size 40, align 8, {
    bus: 0, slot: 4, func: 8, gpa: 16, hpa: 24, len: 32,
});
assert_layout!(vm_pptdev_msi, size 40, align 8, {
    vcpu: 0, bus: 4, slot: 8, func: 12, numvec: 16, msg: 24, addr: 32,
});
assert_layout!(vm_pptdev_msix, size 48, align 8, {
    vcpu: 0, bus: 4, slot: 8, func: 12, idx: 16, msg: 24, vector_control: 32, addr: 40,
});
assert_layout!(vm_nmi, size 4, align 4, { cpuid: 0 });
assert_layout!(vm_stats, size 544, align 8, {
    cpuid: 0, index: 4, num_entries: 8, tv: 16, statbuf: 32,
});
assert_layout!(vm_stat_desc, size 132, align 4, { index: 0, desc: 4 });
assert_layout!(vm_x2apic, size 8, align 4, { cpuid: 0, state: 4 });
assert_layout!(vm_gpa_pte, size 48, align 8, { gpa: 0, pte: 8, ptenum: 40 });
assert_layout!(vm_hpet_cap, size 4, align 4, { capabilities: 0 });
assert_layout!(vm_suspend, size 4, align 4, { how: 0 });
assert_layout!(vm_gla2gpa, size 56, align 8, {
    vcpuid: 0, prot: 4, gla: 8, paging: 16, fault: 40, gpa: 48,
});
assert_layout!(vm_activate_cpu, size 4, align 4, { vcpuid: 0 });
assert_layout!(vm_cpuset, size 16, align 8, { which: 0, cpusetsize: 4, cpus: 8 });
assert_layout!(vm_intinfo, size 24, align 8, { vcpuid: 0, info1: 8, info2: 16 });
assert_layout!(vm_rtc_time, size 8, align 8, { secs: 0 });
assert_layout!(vm_rtc_data, size 8, align 4, { offset: 0, value: 4 });
assert_layout!(vm_cpu_topology, size 8, align 2, { sockets: 0, cores: 2, threads: 4, maxcpus: 6 });
assert_layout!(vm_readwrite_kernemu_device, size 24, align 8, {
    vcpuid: 0, _bitfield_4: 4, gpa: 8, value: 16,
});
