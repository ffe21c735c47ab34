//! Pieces shared by the tests that check vmm-sys against FreeBSD's headers (`abi_table.rs`
//! against the measured table, `zig_headers.rs` against the headers zig ships).
#![allow(dead_code, unused_macros)]

/// Expands to `$then![NAME, …]` over every enum value of `<machine/vmm.h>` and
/// `<machine/vmm_snapshot.h>` that FreeBSD 15 defines (older releases define a prefix of each).
macro_rules! vmm_enum_values {
    ($then:ident) => {
        $then![
            VM_SUSPEND_NONE,
            VM_SUSPEND_RESET,
            VM_SUSPEND_POWEROFF,
            VM_SUSPEND_HALT,
            VM_SUSPEND_TRIPLEFAULT,
            VM_SUSPEND_DESTROY,
            VM_SUSPEND_LAST,
            VM_REG_GUEST_RAX,
            VM_REG_GUEST_RBX,
            VM_REG_GUEST_RCX,
            VM_REG_GUEST_RDX,
            VM_REG_GUEST_RSI,
            VM_REG_GUEST_RDI,
            VM_REG_GUEST_RBP,
            VM_REG_GUEST_R8,
            VM_REG_GUEST_R9,
            VM_REG_GUEST_R10,
            VM_REG_GUEST_R11,
            VM_REG_GUEST_R12,
            VM_REG_GUEST_R13,
            VM_REG_GUEST_R14,
            VM_REG_GUEST_R15,
            VM_REG_GUEST_CR0,
            VM_REG_GUEST_CR3,
            VM_REG_GUEST_CR4,
            VM_REG_GUEST_DR7,
            VM_REG_GUEST_RSP,
            VM_REG_GUEST_RIP,
            VM_REG_GUEST_RFLAGS,
            VM_REG_GUEST_ES,
            VM_REG_GUEST_CS,
            VM_REG_GUEST_SS,
            VM_REG_GUEST_DS,
            VM_REG_GUEST_FS,
            VM_REG_GUEST_GS,
            VM_REG_GUEST_LDTR,
            VM_REG_GUEST_TR,
            VM_REG_GUEST_IDTR,
            VM_REG_GUEST_GDTR,
            VM_REG_GUEST_EFER,
            VM_REG_GUEST_CR2,
            VM_REG_GUEST_PDPTE0,
            VM_REG_GUEST_PDPTE1,
            VM_REG_GUEST_PDPTE2,
            VM_REG_GUEST_PDPTE3,
            VM_REG_GUEST_INTR_SHADOW,
            VM_REG_GUEST_DR0,
            VM_REG_GUEST_DR1,
            VM_REG_GUEST_DR2,
            VM_REG_GUEST_DR3,
            VM_REG_GUEST_DR6,
            VM_REG_GUEST_ENTRY_INST_LENGTH,
            VM_REG_GUEST_FS_BASE,
            VM_REG_GUEST_GS_BASE,
            VM_REG_GUEST_KGS_BASE,
            VM_REG_GUEST_TPR,
            VM_REG_LAST,
            X2APIC_DISABLED,
            X2APIC_ENABLED,
            X2APIC_STATE_LAST,
            VM_CAP_HALT_EXIT,
            VM_CAP_MTRAP_EXIT,
            VM_CAP_PAUSE_EXIT,
            VM_CAP_UNRESTRICTED_GUEST,
            VM_CAP_ENABLE_INVPCID,
            VM_CAP_BPT_EXIT,
            VM_CAP_RDPID,
            VM_CAP_RDTSCP,
            VM_CAP_IPI_EXIT,
            VM_CAP_MASK_HWINTR,
            VM_CAP_RFLAGS_TF,
            VM_CAP_MAX,
            EDGE_TRIGGER,
            LEVEL_TRIGGER,
            CPU_MODE_REAL,
            CPU_MODE_PROTECTED,
            CPU_MODE_COMPATIBILITY,
            CPU_MODE_64BIT,
            PAGING_MODE_FLAT,
            PAGING_MODE_32,
            PAGING_MODE_PAE,
            PAGING_MODE_64,
            PAGING_MODE_64_LA57,
            VM_EXITCODE_INOUT,
            VM_EXITCODE_VMX,
            VM_EXITCODE_BOGUS,
            VM_EXITCODE_RDMSR,
            VM_EXITCODE_WRMSR,
            VM_EXITCODE_HLT,
            VM_EXITCODE_MTRAP,
            VM_EXITCODE_PAUSE,
            VM_EXITCODE_PAGING,
            VM_EXITCODE_INST_EMUL,
            VM_EXITCODE_SPINUP_AP,
            VM_EXITCODE_DEPRECATED1,
            VM_EXITCODE_RENDEZVOUS,
            VM_EXITCODE_IOAPIC_EOI,
            VM_EXITCODE_SUSPENDED,
            VM_EXITCODE_INOUT_STR,
            VM_EXITCODE_TASK_SWITCH,
            VM_EXITCODE_MONITOR,
            VM_EXITCODE_MWAIT,
            VM_EXITCODE_SVM,
            VM_EXITCODE_REQIDLE,
            VM_EXITCODE_DEBUG,
            VM_EXITCODE_VMINSN,
            VM_EXITCODE_BPT,
            VM_EXITCODE_IPI,
            VM_EXITCODE_DB,
            VM_EXITCODE_MAX,
            TSR_CALL,
            TSR_IRET,
            TSR_JMP,
            TSR_IDT_GATE,
            STRUCT_VIOAPIC,
            STRUCT_VM,
            STRUCT_VLAPIC,
            VM_MEM,
            STRUCT_VHPET,
            STRUCT_VMCX,
            STRUCT_VATPIC,
            STRUCT_VATPIT,
            STRUCT_VPMTMR,
            STRUCT_VRTC,
            VM_SNAPSHOT_SAVE,
            VM_SNAPSHOT_RESTORE,
        ]
    };
}

/// Expands to `$then! { TYPE { FIELD, … } … }` over the structs of the crate whose FreeBSD 15
/// layout both checks measure, with every field (dotted paths reach into nested structs).
macro_rules! vmm_struct_fields {
    ($then:ident) => {
        $then! {
            vm_memmap { gpa, segid, segoff, len, prot, flags }
            vm_munmap { gpa, len }
            vm_memseg { segid, len, name, ds_mask, ds_mask_size, ds_policy }
            vm_register { cpuid, regnum, regval }
            vm_seg_desc { cpuid, regnum, desc, desc.base, desc.limit, desc.access }
            seg_desc { base, limit, access }
            vm_register_set { cpuid, count, regnums, regvals }
            vm_run { cpuid, cpuset, cpusetsize, vm_exit }
            vm_exception { cpuid, vector, error_code, error_code_valid, restart_instruction }
            vm_lapic_msi { msg, addr }
            vm_lapic_irq { cpuid, vector }
            vm_ioapic_irq { irq }
            vm_isa_irq { atpic_irq, ioapic_irq }
            vm_isa_irq_trigger { atpic_irq, trigger }
            vm_capability { cpuid, captype, capval, allcpus }
            vm_pptdev { bus, slot, func }
            vm_pptdev_mmio { bus, slot, func, gpa, hpa, len }
            vm_pptdev_msi { vcpu, bus, slot, func, numvec, msg, addr }
            vm_pptdev_msix { vcpu, bus, slot, func, idx, msg, vector_control, addr }
            vm_nmi { cpuid }
            vm_stats { cpuid, index, num_entries, tv, statbuf }
            vm_stat_desc { index, desc }
            vm_x2apic { cpuid, state }
            vm_gpa_pte { gpa, pte, ptenum }
            vm_hpet_cap { capabilities }
            vm_suspend { how }
            vm_gla2gpa { vcpuid, prot, gla, paging, fault, gpa }
            vm_activate_cpu { vcpuid }
            vm_cpuset { which, cpusetsize, cpus }
            vm_intinfo { vcpuid, info1, info2 }
            vm_rtc_time { secs }
            vm_rtc_data { offset, value }
            vm_cpu_topology { sockets, cores, threads, maxcpus }
            vm_readwrite_kernemu_device { vcpuid, gpa, value }
            vm_guest_paging { cr3, cpl, cpu_mode, paging_mode }
            vie_op { op_byte, op_type, op_flags }
            vm_inout { port, eax }
            vm_inout_str {
                inout, paging, rflags, cr0, index, count, addrsize, seg_name, seg_desc, cs_d, cs_base,
            }
            vm_task_switch { tsssel, ext, errcode, errcode_valid, reason, paging }
            vm_snapshot_buffer { buf_start, buf_size, buf, buf_rem }
            vm_snapshot_meta {
                dev_data, dev_name, dev_req, buffer, buffer.buf_start, buffer.buf_size, buffer.buf,
                buffer.buf_rem, op,
            }
        }
    };
}

/// Little-endian bytes of a bitfield's storage field.
pub trait StorageBytes {
    fn storage_bytes(&self) -> Vec<u8>;
}

macro_rules! storage_bytes_of_integers {
    ($($int:ty),+) => {$(
        impl StorageBytes for $int {
            fn storage_bytes(&self) -> Vec<u8> {
                self.to_le_bytes().to_vec()
            }
        }
    )+};
}
storage_bytes_of_integers!(u8, u16, u32);

impl<const N: usize> StorageBytes for [u8; N] {
    fn storage_bytes(&self) -> Vec<u8> {
        self.to_vec()
    }
}

/// Bit numbers that are set in `bytes`, counted from bit 0 of byte 0 plus `base`.
pub fn set_bits(bytes: &[u8], base: usize) -> Vec<usize> {
    bytes
        .iter()
        .enumerate()
        .flat_map(|(byte, bits)| {
            (0..8)
                .filter(move |bit| bits & (1 << bit) != 0)
                .map(move |bit| base + byte * 8 + bit)
        })
        .collect()
}
