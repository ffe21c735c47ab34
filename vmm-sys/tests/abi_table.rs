//! Checks every row of `data/vmm-abi.tsv` (sizes, offsets, bitfield positions, request codes and
//! enum values measured from the FreeBSD C headers) against this crate.
//!
//! Each kind of row has a lookup table below, listing the crate items by their FreeBSD names. A row
//! whose name is missing from the lookup fails, and so does a lookup entry that names no row, so
//! the crate, this file and the measured table cannot drift apart silently.

#![allow(non_camel_case_types)]

use std::collections::BTreeSet;
use std::mem::{align_of, offset_of, size_of, MaybeUninit};

use vmm_sys::*;

#[macro_use]
#[path = "common/abi_check.rs"]
mod abi_check;

use abi_check::{set_bits, StorageBytes};

const TABLE: &str = include_str!("data/vmm-abi.tsv");

/// Rows the crate deliberately does not model, with the reason. Keep this empty if possible.
const SKIPPED: &[(&str, &str)] = &[];

struct Row<'a> {
    line: usize,
    kind: &'a str,
    name: &'a str,
    value_or_size: &'a str,
    offset: &'a str,
    extra: &'a str,
}

impl Row<'_> {
    fn extra_key(&self, key: &str) -> Option<&str> {
        self.extra
            .split(';')
            .find_map(|item| item.strip_prefix(key)?.strip_prefix('='))
    }

    fn where_(&self) -> String {
        format!("vmm-abi.tsv:{} {} {}", self.line, self.kind, self.name)
    }
}

fn rows() -> Vec<Row<'static>> {
    let mut lines = TABLE.lines().enumerate();
    let (_, header) = lines.next().expect("table has a header");
    assert_eq!(header, "kind\tname\tvalue_or_size\toffset\textra");
    lines
        .filter(|(_, line)| !line.is_empty())
        .map(|(index, line)| {
            let cols: Vec<&str> = line.split('\t').collect();
            assert_eq!(
                cols.len(),
                5,
                "line {} has {} columns",
                index + 1,
                cols.len()
            );
            Row {
                line: index + 1,
                kind: cols[0],
                name: cols[1],
                value_or_size: cols[2],
                offset: cols[3],
                extra: cols[4],
            }
        })
        .collect()
}

fn number(text: &str) -> i128 {
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => i128::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.unwrap_or_else(|_| panic!("not a number: {text:?}"))
}

fn skipped(name: &str) -> bool {
    SKIPPED.iter().any(|(skip, _)| *skip == name)
}

/// Fails with every problem found, one per line.
fn report(what: &str, problems: Vec<String>) {
    assert!(
        problems.is_empty(),
        "{} {what} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// Lookup entries the table never asked for.
fn unused<'a>(
    entries: impl Iterator<Item = &'a str>,
    asked: &BTreeSet<&str>,
    what: &str,
) -> Vec<String> {
    entries
        .filter(|name| !asked.contains(name))
        .map(|name| format!("{what} lookup entry {name} matches no table row"))
        .collect()
}

// Cross-check requests of other groups, built with the crate's encoder from the values in
// FreeBSD's <sys/filio.h> and <sys/ttycom.h>.
const FIONREAD: c_ulong = _IOR(b'f', 127, size_of::<c_int>());
const FIONBIO: c_ulong = _IOW(b'f', 126, size_of::<c_int>());
const FIOCLEX: c_ulong = _IO(b'f', 1);
const FIONCLEX: c_ulong = _IO(b'f', 2);
const TIOCGWINSZ: c_ulong = _IOR(b't', 104, size_of::<winsize>());
const TIOCSWINSZ: c_ulong = _IOW(b't', 103, size_of::<winsize>());

/// FreeBSD's `struct winsize`, the argument of the TIOC*WINSZ cross-check rows.
#[repr(C)]
struct winsize {
    _ws_row: u16,
    _ws_col: u16,
    _ws_xpixel: u16,
    _ws_ypixel: u16,
}

type none = ();
type int = c_int;

macro_rules! ioctl_lookup {
    ($($name:ident : $arg:ty),+ $(,)?) => {
        vec![$((stringify!($name), $name as u64, size_of::<$arg>())),+]
    };
}

/// (request name, crate value, size of the crate's argument type)
fn ioctl_table() -> Vec<(&'static str, u64, usize)> {
    ioctl_lookup![
        VM_RUN: vm_run,
        VM_RUN_13: vm_run_13,
        VM_SUSPEND: vm_suspend,
        VM_SET_CAPABILITY: vm_capability,
        VM_GET_CAPABILITY: vm_capability,
        VM_REINIT: none,
        VM_ALLOC_MEMSEG: vm_memseg,
        VM_ALLOC_MEMSEG_14: vm_memseg_14,
        VM_ALLOC_MEMSEG_12: vm_memseg_12,
        VM_GET_MEMSEG: vm_memseg,
        VM_GET_MEMSEG_14: vm_memseg_14,
        VM_GET_MEMSEG_12: vm_memseg_12,
        VM_MMAP_MEMSEG: vm_memmap,
        VM_MMAP_GETNEXT: vm_memmap,
        VM_MUNMAP_MEMSEG: vm_munmap,
        VM_SET_REGISTER: vm_register,
        VM_GET_REGISTER: vm_register,
        VM_SET_SEGMENT_DESCRIPTOR: vm_seg_desc,
        VM_GET_SEGMENT_DESCRIPTOR: vm_seg_desc,
        VM_SET_REGISTER_SET: vm_register_set,
        VM_GET_REGISTER_SET: vm_register_set,
        VM_GET_KERNEMU_DEV: vm_readwrite_kernemu_device,
        VM_SET_KERNEMU_DEV: vm_readwrite_kernemu_device,
        VM_GET_INTINFO: vm_intinfo,
        VM_SET_INTINFO: vm_intinfo,
        VM_INJECT_EXCEPTION: vm_exception,
        VM_LAPIC_IRQ: vm_lapic_irq,
        VM_INJECT_NMI: vm_nmi,
        VM_IOAPIC_ASSERT_IRQ: vm_ioapic_irq,
        VM_IOAPIC_DEASSERT_IRQ: vm_ioapic_irq,
        VM_IOAPIC_PULSE_IRQ: vm_ioapic_irq,
        VM_LAPIC_MSI: vm_lapic_msi,
        VM_LAPIC_LOCAL_IRQ: vm_lapic_irq,
        VM_IOAPIC_PINCOUNT: int,
        VM_RESTART_INSTRUCTION: int,
        VM_BIND_PPTDEV: vm_pptdev,
        VM_UNBIND_PPTDEV: vm_pptdev,
        VM_MAP_PPTDEV_MMIO: vm_pptdev_mmio,
        VM_PPTDEV_MSI: vm_pptdev_msi,
        VM_PPTDEV_MSIX: vm_pptdev_msix,
        VM_PPTDEV_DISABLE_MSIX: vm_pptdev,
        VM_UNMAP_PPTDEV_MMIO: vm_pptdev_mmio,
        VM_STATS: vm_stats,
        VM_STATS_13: vm_stats_13,
        VM_STAT_DESC: vm_stat_desc,
        VM_SET_X2APIC_STATE: vm_x2apic,
        VM_GET_X2APIC_STATE: vm_x2apic,
        VM_GET_HPET_CAPABILITIES: vm_hpet_cap,
        VM_SET_TOPOLOGY: vm_cpu_topology,
        VM_GET_TOPOLOGY: vm_cpu_topology,
        VM_GET_GPA_PMAP: vm_gpa_pte,
        VM_GLA2GPA: vm_gla2gpa,
        VM_GLA2GPA_NOFAULT: vm_gla2gpa,
        VM_ISA_ASSERT_IRQ: vm_isa_irq,
        VM_ISA_DEASSERT_IRQ: vm_isa_irq,
        VM_ISA_PULSE_IRQ: vm_isa_irq,
        VM_ISA_SET_IRQ_TRIGGER: vm_isa_irq_trigger,
        VM_ACTIVATE_CPU: vm_activate_cpu,
        VM_GET_CPUS: vm_cpuset,
        VM_SUSPEND_CPU: vm_activate_cpu,
        VM_RESUME_CPU: vm_activate_cpu,
        VM_RTC_READ: vm_rtc_data,
        VM_RTC_WRITE: vm_rtc_data,
        VM_RTC_SETTIME: vm_rtc_time,
        VM_RTC_GETTIME: vm_rtc_time,
        VM_SNAPSHOT_REQ: vm_snapshot_meta,
        VM_SNAPSHOT_REQ_13: vm_snapshot_meta_13,
        VM_RESTORE_TIME: int,
        VMMCTL_VM_CREATE: vmmctl_vm_create,
        VMMCTL_VM_DESTROY: vmmctl_vm_destroy,
        FIONREAD: int,
        FIONBIO: int,
        FIOCLEX: none,
        FIONCLEX: none,
        TIOCGWINSZ: winsize,
        TIOCSWINSZ: winsize,
    ]
}

macro_rules! struct_lookup {
    ($($ty:ident),+ $(,)?) => {
        vec![$((stringify!($ty), size_of::<$ty>(), align_of::<$ty>())),+]
    };
}

/// (struct name, size, alignment)
fn struct_table() -> Vec<(&'static str, usize, usize)> {
    struct_lookup![
        vm_memmap,
        vm_munmap,
        vm_memseg,
        vm_memseg_14,
        vm_memseg_12,
        vm_register,
        vm_seg_desc,
        seg_desc,
        vm_register_set,
        vm_run,
        vm_run_13,
        vm_run_kcompat13,
        vm_exception,
        vm_lapic_msi,
        vm_lapic_irq,
        vm_ioapic_irq,
        vm_isa_irq,
        vm_isa_irq_trigger,
        vm_capability,
        vm_pptdev,
        vm_pptdev_mmio,
        vm_pptdev_msi,
        vm_pptdev_msix,
        vm_nmi,
        vm_stats,
        vm_stats_13,
        vm_stat_desc,
        vm_x2apic,
        vm_gpa_pte,
        vm_hpet_cap,
        vm_suspend,
        vm_gla2gpa,
        vm_activate_cpu,
        vm_cpuset,
        vm_intinfo,
        vm_rtc_time,
        vm_rtc_data,
        vm_cpu_topology,
        vm_readwrite_kernemu_device,
        vmmctl_vm_create,
        vmmctl_vm_create_v0,
        vmmctl_vm_destroy,
        vm_guest_paging,
        vie_op,
        vie,
        vm_inout,
        vm_inout_str,
        vm_inout_str_14,
        vm_task_switch,
        vm_exit,
        vm_exit_14,
        vm_exit_13,
        vm_exit_kcompat13,
        vm_exit_ipi_13,
        vm_snapshot_buffer,
        vm_snapshot_meta,
        vm_snapshot_meta_13,
        cpuset_t,
        cpuset_t_13,
        domainset_t,
        domainset_t_kernel,
        timeval,
        winsize,
    ]
}

fn size_of_pointee<T>(_: *const T) -> usize {
    size_of::<T>()
}

macro_rules! field_lookup {
    ($($ty:ident { $($($field:ident).+),+ $(,)? })+) => {
        vec![$($(
            (
                concat!(stringify!($ty) $(, ".", stringify!($field))+),
                offset_of!($ty, $($field).+),
                {
                    let place = MaybeUninit::<$ty>::uninit();
                    let base = place.as_ptr();
                    // SAFETY: only the address of a field inside the (uninitialised but allocated)
                    // value is formed; nothing is read, so no union member needs to be valid.
                    size_of_pointee(unsafe { &raw const (*base).$($field).+ })
                },
            ),
        )+)+]
    };
}

/// (dotted field path, offset, size) for every field row that is not a bitfield.
fn field_table() -> Vec<(&'static str, usize, usize)> {
    let mut table = vmm_struct_fields!(field_lookup);
    table.extend(field_lookup! {
        vm_memseg_14 { segid, len, name }
        vm_memseg_12 { segid, len, name }
        vm_run_13 { cpuid, vm_exit }
        vm_stats_13 { cpuid, num_entries, tv, statbuf }
        vmmctl_vm_create { name, flags, reserved }
        vmmctl_vm_destroy { name, reserved }
        vie {
            inst, num_valid, num_processed, disp_bytes, imm_bytes, scale, _sparebytes,
            base_register, index_register, segment_register, displacement, immediate, decoded,
            _sparebyte, op,
        }
        vm_inout_str_14 { seg_desc }
        vm_exit {
            exitcode, inst_length, rip, u, u.inout, u.inout_str, u.paging.gpa, u.paging.fault_type,
            u.inst_emul.gpa, u.inst_emul.gla, u.inst_emul.cs_base, u.inst_emul.cs_d,
            u.inst_emul.paging, u.inst_emul.vie, u.vmx.status, u.vmx.exit_reason,
            u.vmx.exit_qualification, u.vmx.inst_type, u.vmx.inst_error, u.svm.exitcode,
            u.svm.exitinfo1, u.svm.exitinfo2, u.bpt.inst_length, u.dbg.trace_trap,
            u.dbg.pushf_intercept, u.dbg.tf_shadow_val, u.dbg.paging, u.msr.code, u.msr.wval,
            u.spinup_ap.vcpu, u.spinup_ap.rip, u.hlt.rflags, u.hlt.intr_status,
            u.ioapic_eoi.vector, u.suspended.how, u.ipi.mode, u.ipi.vector, u.task_switch,
        }
        vm_snapshot_meta_13 { ctx, dev_data, dev_name, dev_req, buffer, op }
    });
    table
}

/// What setting one bitfield to all-ones in a zeroed struct did.
struct BitfieldProbe {
    /// Bit numbers (from the start of the struct) that became set.
    set_bits: Vec<usize>,
    /// What the getter then returned.
    read_back: u64,
}

macro_rules! bitfield_lookup {
    ($($name:literal => $ty:ident . $storage:ident, $set:ident, $get:ident;)+) => {
        vec![$((
            $name,
            (|| {
                let mut value = $ty::default();
                value.$set(!0);
                let set_bits = set_bits(
                    &value.$storage.storage_bytes(),
                    offset_of!($ty, $storage) * 8,
                );
                BitfieldProbe { set_bits, read_back: u64::from(value.$get()) }
            }) as Probe,
        )),+]
    };
}

/// Sets one bitfield to all ones in a zeroed struct and reports the effect.
type Probe = fn() -> BitfieldProbe;

/// (dotted field path, probe) for every bitfield row.
fn bitfield_table() -> Vec<(&'static str, Probe)> {
    bitfield_lookup! {
        "vm_readwrite_kernemu_device.access_width" => vm_readwrite_kernemu_device._bitfield_4, set_access_width, access_width;
        "vm_readwrite_kernemu_device._unused" => vm_readwrite_kernemu_device._bitfield_4, set__unused, _unused;
        "vie.addrsize" => vie._bitfield_17, set_addrsize, addrsize;
        "vie.opsize" => vie._bitfield_17, set_opsize, opsize;
        "vie.rex_w" => vie._bitfield_17, set_rex_w, rex_w;
        "vie.rex_r" => vie._bitfield_17, set_rex_r, rex_r;
        "vie.rex_x" => vie._bitfield_17, set_rex_x, rex_x;
        "vie.rex_b" => vie._bitfield_17, set_rex_b, rex_b;
        "vie.rex_present" => vie._bitfield_17, set_rex_present, rex_present;
        "vie.repz_present" => vie._bitfield_17, set_repz_present, repz_present;
        "vie.repnz_present" => vie._bitfield_17, set_repnz_present, repnz_present;
        "vie.opsize_override" => vie._bitfield_17, set_opsize_override, opsize_override;
        "vie.addrsize_override" => vie._bitfield_17, set_addrsize_override, addrsize_override;
        "vie.segment_override" => vie._bitfield_17, set_segment_override, segment_override;
        "vie.mod" => vie._bitfield_17, set_mod, r#mod;
        "vie.reg" => vie._bitfield_17, set_reg, reg;
        "vie.rm" => vie._bitfield_17, set_rm, rm;
        "vie.ss" => vie._bitfield_17, set_ss, ss;
        "vie.vex_present" => vie._bitfield_17, set_vex_present, vex_present;
        "vie.vex_l" => vie._bitfield_17, set_vex_l, vex_l;
        "vie.index" => vie._bitfield_17, set_index, index;
        "vie.base" => vie._bitfield_17, set_base, base;
        "vie.vex_reg" => vie._bitfield_25, set_vex_reg, vex_reg;
        "vie.vex_pp" => vie._bitfield_25, set_vex_pp, vex_pp;
        "vie._sparebits" => vie._bitfield_25, set__sparebits, _sparebits;
        "vm_inout.bytes" => vm_inout._bitfield_0, set_bytes, bytes;
        "vm_inout.in" => vm_inout._bitfield_0, set_in, r#in;
        "vm_inout.string" => vm_inout._bitfield_0, set_string, string;
        "vm_inout.rep" => vm_inout._bitfield_0, set_rep, rep;
    }
}

macro_rules! value_lookup {
    ($($name:ident),+ $(,)?) => {
        vec![$((stringify!($name), $name as i128)),+]
    };
}

/// (enum or constant name, value) for every `enum` and `const` row.
fn value_table() -> Vec<(&'static str, i128)> {
    let mut table = vmm_enum_values!(value_lookup);
    table.extend(value_lookup![
        VM_SUSPEND_LAST_14,
        STRUCT_VMX,
        VM_SYSMEM,
        VM_BOOTROM,
        VM_FRAMEBUFFER,
        VM_PCIROM,
        VM_MEMSEG_END,
        VM_BOOTROM_14,
        VM_FRAMEBUFFER_14,
        VM_PCIROM_14,
        DOMAINSET_POLICY_INVALID,
        DOMAINSET_POLICY_ROUNDROBIN,
        DOMAINSET_POLICY_FIRSTTOUCH,
        DOMAINSET_POLICY_PREFER,
        DOMAINSET_POLICY_INTERLEAVE,
        SPECNAMELEN,
        VM_MAX_PREFIXLEN,
        VM_MAX_SUFFIXLEN,
        VM_MIN_NAMELEN,
        VM_MAX_NAMELEN,
        MAX_VM_STATS,
        VIE_INST_SIZE,
        VM_MAXCPU_13,
        VM_MAXCPU_KERNEL,
        CPU_SETSIZE,
        CPU_MAXSIZE,
        DOMAINSET_MAXSIZE,
        VM_MAXMEMDOM,
        VM_MAXSYSMEM,
        VM_MAX_MEMSEGS,
        VM_MAX_MEMMAPS,
        VM_MEMMAP_F_WIRED,
        VM_MEMMAP_F_IOMMU,
        VM_ACTIVE_CPUS,
        VM_SUSPENDED_CPUS,
        VM_DEBUG_CPUS,
        VMMCTL_CREATE_DESTROY_ON_CLOSE,
        VMMCTL_FLAGS_MASK,
        VM_LOWMEM_LIMIT,
        VM_HIGHMEM_BASE,
        VM_MMAP_GUARD_SIZE,
        VM_MEM_F_INCORE,
        VM_MEM_F_WIRED,
        VM_INTINFO_VALID,
        VM_INTINFO_DEL_ERRCODE,
        VM_INTINFO_RSVD,
        VM_INTINFO_TYPE,
        VM_INTINFO_HWINTR,
        VM_INTINFO_NMI,
        VM_INTINFO_HWEXCEPTION,
        VM_INTINFO_SWINTR,
        IOC_VOID,
        IOC_OUT,
        IOC_IN,
        IOC_INOUT,
        IOCPARM_MASK,
        IOCPARM_MAX,
        IOCNUM_ABIVERS,
        IOCNUM_MAP_MEMORY,
        IOCNUM_GET_MEMORY_SEG,
        VMM_IOC_GROUP_v,
        VMMCTL_IOC_GROUP_V,
    ]);
    table
}

#[test]
fn table_has_the_documented_number_of_rows_of_each_kind() {
    let rows = rows();
    let count = |kind: &str| rows.iter().filter(|row| row.kind == kind).count();
    assert_eq!(rows.len(), 586);
    assert_eq!(count("ioctl"), 76);
    assert_eq!(count("struct"), 63);
    assert_eq!(count("field"), 259);
    assert_eq!(count("enum"), 141);
    assert_eq!(count("const"), 47);
}

#[test]
fn every_ioctl_row_matches_the_crate_request_code_and_argument_size() {
    let table = ioctl_table();
    let mut asked = BTreeSet::new();
    let mut problems = Vec::new();
    for row in rows().iter().filter(|row| row.kind == "ioctl") {
        asked.insert(row.name);
        if skipped(row.name) {
            continue;
        }
        let Some(&(_, value, arg_size)) = table.iter().find(|(name, ..)| *name == row.name) else {
            problems.push(format!("{}: not covered by the crate", row.where_()));
            continue;
        };
        let expected = number(row.value_or_size);
        if i128::from(value) != expected {
            problems.push(format!(
                "{}: crate request {value:#010x}, table {expected:#010x}",
                row.where_()
            ));
        }
        let expected_size = row.extra_key("argsize").map(number);
        if expected_size != Some(arg_size as i128) {
            problems.push(format!(
                "{}: crate argument is {arg_size} bytes, table argsize {expected_size:?}",
                row.where_()
            ));
        }
    }
    problems.extend(unused(table.iter().map(|entry| entry.0), &asked, "ioctl"));
    report("ioctl", problems);
}

#[test]
fn every_struct_row_matches_the_crate_size_and_alignment() {
    let table = struct_table();
    let mut asked = BTreeSet::new();
    let mut problems = Vec::new();
    for row in rows().iter().filter(|row| row.kind == "struct") {
        asked.insert(row.name);
        if skipped(row.name) {
            continue;
        }
        let Some(&(_, size, align)) = table.iter().find(|(name, ..)| *name == row.name) else {
            problems.push(format!("{}: not covered by the crate", row.where_()));
            continue;
        };
        let expected_size = number(row.value_or_size);
        if size as i128 != expected_size {
            problems.push(format!(
                "{}: crate size {size}, table {expected_size}",
                row.where_()
            ));
        }
        let expected_align = row.extra_key("align").map(number);
        if expected_align != Some(align as i128) {
            problems.push(format!(
                "{}: crate alignment {align}, table {expected_align:?}",
                row.where_()
            ));
        }
    }
    problems.extend(unused(table.iter().map(|entry| entry.0), &asked, "struct"));
    report("struct", problems);
}

#[test]
fn every_field_row_matches_the_crate_offset_and_size() {
    let fields = field_table();
    let bitfields = bitfield_table();
    let mut asked = BTreeSet::new();
    let mut problems = Vec::new();
    for row in rows().iter().filter(|row| row.kind == "field") {
        asked.insert(row.name);
        if skipped(row.name) {
            continue;
        }
        let expected_offset = number(row.offset);
        if row.value_or_size == "bitfield" {
            let Some((_, probe)) = bitfields.iter().find(|(name, _)| *name == row.name) else {
                problems.push(format!(
                    "{}: bitfield not covered by the crate",
                    row.where_()
                ));
                continue;
            };
            let probe = probe();
            let (Some(bit_offset), Some(bit_width)) = (
                row.extra_key("bit_offset").map(number),
                row.extra_key("bit_width").map(number),
            ) else {
                problems.push(format!(
                    "{}: bitfield row lacks bit_offset/bit_width",
                    row.where_()
                ));
                continue;
            };
            let expected_bits: Vec<usize> =
                (bit_offset as usize..(bit_offset + bit_width) as usize).collect();
            if probe.set_bits != expected_bits {
                problems.push(format!(
                    "{}: crate setter sets bits {:?}, table bits {bit_offset}..{}",
                    row.where_(),
                    probe.set_bits,
                    bit_offset + bit_width
                ));
            }
            if i128::from(probe.read_back) != (1i128 << bit_width) - 1 {
                problems.push(format!(
                    "{}: crate getter reads {:#x} after setting all ones, width {bit_width}",
                    row.where_(),
                    probe.read_back
                ));
            }
            if bit_offset / 8 != expected_offset {
                problems.push(format!(
                    "{}: table offset {expected_offset} disagrees with its bit_offset {bit_offset}",
                    row.where_()
                ));
            }
            continue;
        }
        let Some(&(_, offset, size)) = fields.iter().find(|(name, ..)| *name == row.name) else {
            problems.push(format!("{}: field not covered by the crate", row.where_()));
            continue;
        };
        if offset as i128 != expected_offset {
            problems.push(format!(
                "{}: crate offset {offset}, table {expected_offset}",
                row.where_()
            ));
        }
        let expected_size = number(row.value_or_size);
        if size as i128 != expected_size {
            problems.push(format!(
                "{}: crate size {size}, table {expected_size}",
                row.where_()
            ));
        }
    }
    problems.extend(unused(fields.iter().map(|entry| entry.0), &asked, "field"));
    problems.extend(unused(
        bitfields.iter().map(|entry| entry.0),
        &asked,
        "bitfield",
    ));
    report("field", problems);
}

#[test]
fn every_enum_and_const_row_matches_the_crate_value() {
    let table = value_table();
    let mut asked = BTreeSet::new();
    let mut problems = Vec::new();
    for row in rows()
        .iter()
        .filter(|row| row.kind == "enum" || row.kind == "const")
    {
        asked.insert(row.name);
        if skipped(row.name) {
            continue;
        }
        let Some(&(_, value)) = table.iter().find(|(name, _)| *name == row.name) else {
            problems.push(format!("{}: not covered by the crate", row.where_()));
            continue;
        };
        let expected = number(row.value_or_size);
        if value != expected {
            problems.push(format!(
                "{}: crate value {value:#x}, table {expected:#x}",
                row.where_()
            ));
        }
    }
    problems.extend(unused(table.iter().map(|entry| entry.0), &asked, "value"));
    report("enum/const", problems);
}

#[test]
fn every_row_has_a_known_kind_and_a_unique_name() {
    let mut seen = BTreeSet::new();
    for row in rows() {
        assert!(
            ["ioctl", "struct", "field", "enum", "const"].contains(&row.kind),
            "{}: unknown kind",
            row.where_()
        );
        assert!(
            seen.insert((row.kind, row.name)),
            "{}: duplicate row",
            row.where_()
        );
    }
}

#[test]
fn skip_list_names_only_rows_that_exist() {
    let rows = rows();
    for (name, reason) in SKIPPED {
        assert!(!reason.is_empty(), "skip of {name} needs a reason");
        assert!(
            rows.iter().any(|row| row.name == *name),
            "skip of {name}: no such row"
        );
    }
}
