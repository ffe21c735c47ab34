//! Checks vmm-sys against FreeBSD's own C headers as the zig wheel (PyPI `ziglang`) ships them
//! (`lib/libc/include/x86_64-freebsd-none/machine/vmm.h`, `vmm_dev.h`, `vmm_snapshot.h`,
//! `generic-freebsd/sys/ioccom.h`, …): a source independent of the measured table that
//! `abi_table.rs` checks.
//!
//! The test writes a C probe listing every checked item as an expression (`sizeof`, `_Alignof`,
//! `offsetof`, field sizes, request macros, enum values and constants), compiles it with
//! `zig cc -target x86_64-freebsd -c`, so the values come from FreeBSD's headers and clang's
//! FreeBSD/amd64 layout rules, and reads the records back from the object file's section. C
//! bitfields cannot be measured with `offsetof`: the probe sets each one to all ones in an
//! otherwise zero struct and the test compares the bits that became set.
//!
//! The wheel carries one set of headers for every FreeBSD version zig targets, and the vmm headers
//! in it are FreeBSD 15's (NUMA `vm_memseg`, `VM_SUSPEND_DESTROY`, `vm_inout_str.cs_d`), without
//! `dev/vmm/` (`/dev/vmmctl`, memory segment ids). The crate's plain names follow FreeBSD 15, so
//! they are checked; the 13/14 layouts, libvmmapi's values and `/dev/vmmctl` are not in these
//! headers and are listed in [`NOT_IN_THE_WHEEL_HEADERS`] with the reason. Every public item of
//! the crate is either checked or listed there (`every_crate_item_is_checked_or_listed`), and a
//! listed name that shows up in the headers fails the check, so the list cannot hide anything.
//!
//! Without zig the comparison is skipped with a message, unless `BHYVE_RS_REQUIRE_ZIG=1` (set by
//! CI; `tests/install-deps.sh` installs zig) makes it fail.

#![allow(non_camel_case_types)]

#[macro_use]
#[path = "common/abi_check.rs"]
mod abi_check;
#[path = "common/elf.rs"]
mod elf;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::mem::{align_of, offset_of, size_of, MaybeUninit};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use abi_check::{set_bits, StorageBytes};
use vmm_sys::*;

/// Must match `probe.h`.
const PROBE_SECTION: &str = ".bhyve_rs_abi_probe";
const PROBE_MAGIC: u64 = 0x6268_7976_6572_7301;
/// Offset of `bits` in the C `struct probe_record { uint64_t index; uint64_t value; union … }`.
const RECORD_BITS_OFFSET: usize = 16;

/// One number the C headers and the crate must agree on.
struct Check {
    /// The crate item: a type, `type.field.path`, or a constant.
    item: String,
    /// How C computes the number.
    c_expr: String,
    rust: u64,
}

/// One C bitfield: the bits (counted from the start of the struct) that setting it to all ones
/// sets, as the crate's setter does it.
struct BitfieldCheck {
    rust_type: &'static str,
    c_type: String,
    field: String,
    rust_bits: Vec<usize>,
}

/// The C type for a crate type: `struct NAME` unless the crate names something C leaves anonymous
/// or a typedef.
fn c_type(rust_name: &str, spelled: Option<&str>) -> String {
    spelled.map_or_else(|| format!("struct {rust_name}"), str::to_string)
}

fn size_of_pointee<T>(_: *const T) -> usize {
    size_of::<T>()
}

/// Size, alignment, and offset and size of the listed fields (dotted paths into nested structs and
/// unions), for each type.
macro_rules! layouts {
    ($($ty:ident $(= $c:literal)? { $($($field:ident).+),* $(,)? })+) => {{
        let mut checks = Vec::new();
        $(
            let c = c_type(stringify!($ty), None $(.or(Some($c)))?);
            let item = stringify!($ty).to_string();
            checks.push(Check {
                item: item.clone(),
                c_expr: format!("sizeof({c})"),
                rust: size_of::<$ty>() as u64,
            });
            checks.push(Check {
                item: item.clone(),
                c_expr: format!("_Alignof({c})"),
                rust: align_of::<$ty>() as u64,
            });
            $(
                let path = [$(stringify!($field)),+].join(".");
                checks.push(Check {
                    item: format!("{item}.{path}"),
                    c_expr: format!("offsetof({c}, {path})"),
                    rust: offset_of!($ty, $($field).+) as u64,
                });
                let place = MaybeUninit::<$ty>::uninit();
                let base = place.as_ptr();
                // SAFETY: only the address of a field inside the allocated (uninitialised) value
                // is formed; nothing is read, so no union member needs to be valid.
                let size = size_of_pointee(unsafe { &raw const (*base).$($field).+ });
                checks.push(Check {
                    item: format!("{item}.{path}"),
                    c_expr: format!("sizeof((({c} *)0)->{path})"),
                    rust: size as u64,
                });
            )*
        )+
        checks
    }};
}

/// The types and fields checked: every struct and union of the crate that the headers define.
fn layout_checks() -> Vec<Check> {
    let mut checks = vmm_struct_fields!(layouts);
    checks.extend(layouts! {
        vie {
            inst, num_valid, num_processed, disp_bytes, imm_bytes, scale, _sparebytes,
            base_register, index_register, segment_register, displacement, immediate, decoded,
            _sparebyte, op, op.op_byte, op.op_type, op.op_flags,
        }
        vm_exit_paging = "__typeof__(((struct vm_exit *)0)->u.paging)" { gpa, fault_type }
        vm_exit_inst_emul = "__typeof__(((struct vm_exit *)0)->u.inst_emul)" {
            gpa, gla, cs_base, cs_d, paging, vie,
        }
        vm_exit_vmx = "__typeof__(((struct vm_exit *)0)->u.vmx)" {
            status, exit_reason, exit_qualification, inst_type, inst_error,
        }
        vm_exit_svm = "__typeof__(((struct vm_exit *)0)->u.svm)" { exitcode, exitinfo1, exitinfo2 }
        vm_exit_bpt = "__typeof__(((struct vm_exit *)0)->u.bpt)" { inst_length }
        vm_exit_dbg = "__typeof__(((struct vm_exit *)0)->u.dbg)" {
            trace_trap, pushf_intercept, tf_shadow_val, paging,
        }
        vm_exit_msr = "__typeof__(((struct vm_exit *)0)->u.msr)" { code, wval }
        vm_exit_spinup_ap = "__typeof__(((struct vm_exit *)0)->u.spinup_ap)" { vcpu, rip }
        vm_exit_hlt = "__typeof__(((struct vm_exit *)0)->u.hlt)" { rflags, intr_status }
        vm_exit_ioapic_eoi = "__typeof__(((struct vm_exit *)0)->u.ioapic_eoi)" { vector }
        vm_exit_suspended = "__typeof__(((struct vm_exit *)0)->u.suspended)" { how }
        vm_exit_ipi = "__typeof__(((struct vm_exit *)0)->u.ipi)" { mode, vector }
        vm_exit_u = "__typeof__(((struct vm_exit *)0)->u)" {
            inout, inout_str, paging, inst_emul, vmx, svm, bpt, dbg, msr, spinup_ap, hlt,
            ioapic_eoi, suspended, ipi, task_switch,
        }
        vm_exit {
            exitcode, inst_length, rip, u, u.inout, u.inout_str, u.paging.gpa, u.paging.fault_type,
            u.inst_emul.gpa, u.inst_emul.gla, u.inst_emul.cs_base, u.inst_emul.cs_d,
            u.inst_emul.paging, u.inst_emul.vie, u.inst_emul.vie.displacement, u.vmx.status,
            u.vmx.exit_reason, u.vmx.exit_qualification, u.vmx.inst_type, u.vmx.inst_error,
            u.svm.exitcode, u.svm.exitinfo1, u.svm.exitinfo2, u.bpt.inst_length,
            u.dbg.trace_trap, u.dbg.pushf_intercept, u.dbg.tf_shadow_val, u.dbg.paging,
            u.msr.code, u.msr.wval, u.spinup_ap.vcpu, u.spinup_ap.rip, u.hlt.rflags,
            u.hlt.intr_status, u.ioapic_eoi.vector, u.suspended.how, u.ipi.mode, u.ipi.vector,
            u.task_switch, u.task_switch.paging,
        }
        cpuset_t = "cpuset_t" { __bits }
        domainset_t = "domainset_t" { __bits }
        timeval { tv_sec, tv_usec }
    });
    checks
}

macro_rules! bitfields {
    ($($ty:ident . $storage:ident { $($get:ident : $set:ident),+ $(,)? })+) => {{
        let mut checks = Vec::new();
        $($(
            let mut value = $ty::default();
            value.$set(!0);
            checks.push(BitfieldCheck {
                rust_type: stringify!($ty),
                c_type: c_type(stringify!($ty), None),
                field: stringify!($get).trim_start_matches("r#").to_string(),
                rust_bits: set_bits(&value.$storage.storage_bytes(), offset_of!($ty, $storage) * 8),
            });
        )+)+
        checks
    }};
}

/// Every C bitfield of the crate's types.
fn bitfield_checks() -> Vec<BitfieldCheck> {
    bitfields! {
        vm_readwrite_kernemu_device._bitfield_4 { access_width: set_access_width, _unused: set__unused }
        vie._bitfield_17 {
            addrsize: set_addrsize, opsize: set_opsize, rex_w: set_rex_w, rex_r: set_rex_r,
            rex_x: set_rex_x, rex_b: set_rex_b, rex_present: set_rex_present,
            repz_present: set_repz_present, repnz_present: set_repnz_present,
            opsize_override: set_opsize_override, addrsize_override: set_addrsize_override,
            segment_override: set_segment_override, r#mod: set_mod, reg: set_reg, rm: set_rm,
            ss: set_ss, vex_present: set_vex_present, vex_l: set_vex_l, index: set_index,
            base: set_base,
        }
        vie._bitfield_25 { vex_reg: set_vex_reg, vex_pp: set_vex_pp, _sparebits: set__sparebits }
        vm_inout._bitfield_0 { bytes: set_bytes, r#in: set_in, string: set_string, rep: set_rep }
    }
}

/// Request codes, enum values and constants under their C names, and the few crate constants
/// C spells as an expression.
macro_rules! values {
    ($($name:ident $(= $c:literal)?),+ $(,)?) => {
        vec![$(
            Check {
                item: stringify!($name).to_string(),
                c_expr: None $(.or(Some($c)))?.unwrap_or(stringify!($name)).to_string(),
                rust: $name as u64,
            }
        ),+]
    };
}

/// Every request code of `/dev/vmm/NAME` and their group.
fn request_checks() -> Vec<Check> {
    values![
        VM_RUN,
        VM_SET_CAPABILITY,
        VM_GET_CAPABILITY,
        VM_SUSPEND,
        VM_REINIT,
        VM_ALLOC_MEMSEG,
        VM_GET_MEMSEG,
        VM_MMAP_MEMSEG,
        VM_MMAP_GETNEXT,
        VM_MUNMAP_MEMSEG,
        VM_SET_REGISTER,
        VM_GET_REGISTER,
        VM_SET_SEGMENT_DESCRIPTOR,
        VM_GET_SEGMENT_DESCRIPTOR,
        VM_SET_REGISTER_SET,
        VM_GET_REGISTER_SET,
        VM_GET_KERNEMU_DEV,
        VM_SET_KERNEMU_DEV,
        VM_GET_INTINFO,
        VM_SET_INTINFO,
        VM_INJECT_EXCEPTION,
        VM_LAPIC_IRQ,
        VM_INJECT_NMI,
        VM_IOAPIC_ASSERT_IRQ,
        VM_IOAPIC_DEASSERT_IRQ,
        VM_IOAPIC_PULSE_IRQ,
        VM_LAPIC_MSI,
        VM_LAPIC_LOCAL_IRQ,
        VM_IOAPIC_PINCOUNT,
        VM_RESTART_INSTRUCTION,
        VM_BIND_PPTDEV,
        VM_UNBIND_PPTDEV,
        VM_MAP_PPTDEV_MMIO,
        VM_PPTDEV_MSI,
        VM_PPTDEV_MSIX,
        VM_PPTDEV_DISABLE_MSIX,
        VM_UNMAP_PPTDEV_MMIO,
        VM_STATS,
        VM_STAT_DESC,
        VM_SET_X2APIC_STATE,
        VM_GET_X2APIC_STATE,
        VM_GET_HPET_CAPABILITIES,
        VM_SET_TOPOLOGY,
        VM_GET_TOPOLOGY,
        VM_GET_GPA_PMAP,
        VM_GLA2GPA,
        VM_GLA2GPA_NOFAULT,
        VM_ISA_ASSERT_IRQ,
        VM_ISA_DEASSERT_IRQ,
        VM_ISA_PULSE_IRQ,
        VM_ISA_SET_IRQ_TRIGGER,
        VM_ACTIVATE_CPU,
        VM_GET_CPUS,
        VM_SUSPEND_CPU,
        VM_RESUME_CPU,
        VM_RTC_READ,
        VM_RTC_WRITE,
        VM_RTC_SETTIME,
        VM_RTC_GETTIME,
        VM_SNAPSHOT_REQ,
        VM_RESTORE_TIME,
        VMM_IOC_GROUP_v = "IOCGROUP(VM_RUN)",
    ]
}

/// Request ordinals, enum values and constants.
fn constant_checks() -> Vec<Check> {
    let mut checks = vmm_enum_values!(values);
    checks.extend(values![
        IOCNUM_ABIVERS,
        IOCNUM_RUN,
        IOCNUM_SET_CAPABILITY,
        IOCNUM_GET_CAPABILITY,
        IOCNUM_SUSPEND,
        IOCNUM_REINIT,
        IOCNUM_MAP_MEMORY,
        IOCNUM_GET_MEMORY_SEG,
        IOCNUM_GET_GPA_PMAP,
        IOCNUM_GLA2GPA,
        IOCNUM_ALLOC_MEMSEG,
        IOCNUM_GET_MEMSEG,
        IOCNUM_MMAP_MEMSEG,
        IOCNUM_MMAP_GETNEXT,
        IOCNUM_GLA2GPA_NOFAULT,
        IOCNUM_MUNMAP_MEMSEG,
        IOCNUM_SET_REGISTER,
        IOCNUM_GET_REGISTER,
        IOCNUM_SET_SEGMENT_DESCRIPTOR,
        IOCNUM_GET_SEGMENT_DESCRIPTOR,
        IOCNUM_SET_REGISTER_SET,
        IOCNUM_GET_REGISTER_SET,
        IOCNUM_GET_KERNEMU_DEV,
        IOCNUM_SET_KERNEMU_DEV,
        IOCNUM_GET_INTINFO,
        IOCNUM_SET_INTINFO,
        IOCNUM_INJECT_EXCEPTION,
        IOCNUM_LAPIC_IRQ,
        IOCNUM_INJECT_NMI,
        IOCNUM_IOAPIC_ASSERT_IRQ,
        IOCNUM_IOAPIC_DEASSERT_IRQ,
        IOCNUM_IOAPIC_PULSE_IRQ,
        IOCNUM_LAPIC_MSI,
        IOCNUM_LAPIC_LOCAL_IRQ,
        IOCNUM_IOAPIC_PINCOUNT,
        IOCNUM_RESTART_INSTRUCTION,
        IOCNUM_BIND_PPTDEV,
        IOCNUM_UNBIND_PPTDEV,
        IOCNUM_MAP_PPTDEV_MMIO,
        IOCNUM_PPTDEV_MSI,
        IOCNUM_PPTDEV_MSIX,
        IOCNUM_PPTDEV_DISABLE_MSIX,
        IOCNUM_UNMAP_PPTDEV_MMIO,
        IOCNUM_VM_STATS,
        IOCNUM_VM_STAT_DESC,
        IOCNUM_SET_X2APIC_STATE,
        IOCNUM_GET_X2APIC_STATE,
        IOCNUM_GET_HPET_CAPABILITIES,
        IOCNUM_SET_TOPOLOGY,
        IOCNUM_GET_TOPOLOGY,
        IOCNUM_ISA_ASSERT_IRQ,
        IOCNUM_ISA_DEASSERT_IRQ,
        IOCNUM_ISA_PULSE_IRQ,
        IOCNUM_ISA_SET_IRQ_TRIGGER,
        IOCNUM_ACTIVATE_CPU,
        IOCNUM_GET_CPUSET,
        IOCNUM_SUSPEND_CPU,
        IOCNUM_RESUME_CPU,
        IOCNUM_RTC_READ,
        IOCNUM_RTC_WRITE,
        IOCNUM_RTC_SETTIME,
        IOCNUM_RTC_GETTIME,
        IOCNUM_SNAPSHOT_REQ,
        IOCNUM_RESTORE_TIME,
        // <sys/ioccom.h>.
        IOCPARM_SHIFT,
        IOCPARM_MASK,
        IOCPARM_MAX,
        IOC_VOID,
        IOC_OUT,
        IOC_IN,
        IOC_INOUT,
        // <machine/vmm_dev.h> constants.
        VM_MEMMAP_F_WIRED,
        VM_MEMMAP_F_IOMMU,
        VM_ACTIVE_CPUS,
        VM_SUSPENDED_CPUS,
        VM_DEBUG_CPUS,
        MAX_VM_STATS,
        // <machine/vmm.h> constants.
        VM_INTINFO_VALID,
        VM_INTINFO_DEL_ERRCODE,
        VM_INTINFO_RSVD,
        VM_INTINFO_TYPE,
        VM_INTINFO_HWINTR,
        VM_INTINFO_NMI,
        VM_INTINFO_HWEXCEPTION,
        VM_INTINFO_SWINTR,
        SPECNAMELEN,
        VM_MAX_PREFIXLEN,
        VM_MAX_SUFFIXLEN,
        VM_MIN_NAMELEN,
        VM_MAX_NAMELEN,
        VIE_INST_SIZE,
        // <sys/_cpuset.h>, <sys/_domainset.h>, <sys/domainset.h>.
        CPU_SETSIZE,
        CPU_MAXSIZE,
        DOMAINSET_MAXSIZE,
        DOMAINSET_POLICY_INVALID,
        DOMAINSET_POLICY_ROUNDROBIN,
        DOMAINSET_POLICY_FIRSTTOUCH,
        DOMAINSET_POLICY_PREFER,
        DOMAINSET_POLICY_INTERLEAVE,
    ]);
    checks
}

const OLDER_RELEASE: &str =
    "an older release's layout or the kernel's compat view; the wheel has FreeBSD 15's headers";
const VMMCTL: &str = "/dev/vmmctl: dev/vmm/vmm_dev.h is not in the wheel";
const VMM_MEM: &str = "memory segment ids: dev/vmm/vmm_mem.h is not in the wheel";
const LIBVMMAPI: &str = "a libvmmapi value (vmmapi.c/vmmapi.h), not in the wheel";
const KERNEL_ONLY: &str = "kernel-only (_KERNEL), not in userland headers";

/// Crate items the wheel's headers do not define, and why.
const NOT_IN_THE_WHEEL_HEADERS: &[(&str, &str)] = &[
    ("vm_memseg_14", OLDER_RELEASE),
    ("vm_memseg_12", OLDER_RELEASE),
    ("vm_inout_str_14", OLDER_RELEASE),
    ("vm_exit_u_14", OLDER_RELEASE),
    ("vm_exit_14", OLDER_RELEASE),
    ("vm_exit_u_13", OLDER_RELEASE),
    ("vm_exit_13", OLDER_RELEASE),
    ("vm_exit_ipi_13", OLDER_RELEASE),
    ("vm_exit_kcompat13", OLDER_RELEASE),
    ("vm_run_13", OLDER_RELEASE),
    ("vm_run_kcompat13", OLDER_RELEASE),
    ("vm_stats_13", OLDER_RELEASE),
    ("vm_snapshot_meta_13", OLDER_RELEASE),
    ("cpuset_t_13", OLDER_RELEASE),
    ("CPU_SETSIZE_13", OLDER_RELEASE),
    ("VM_RUN_13", OLDER_RELEASE),
    ("VM_STATS_13", OLDER_RELEASE),
    ("VM_SNAPSHOT_REQ_13", OLDER_RELEASE),
    ("VM_ALLOC_MEMSEG_14", OLDER_RELEASE),
    ("VM_GET_MEMSEG_14", OLDER_RELEASE),
    ("VM_ALLOC_MEMSEG_12", OLDER_RELEASE),
    ("VM_GET_MEMSEG_12", OLDER_RELEASE),
    ("VM_SUSPEND_LAST_14", OLDER_RELEASE),
    ("VM_REG_LAST_13", OLDER_RELEASE),
    ("VM_CAP_MAX_13", OLDER_RELEASE),
    ("VM_EXITCODE_MAX_13", OLDER_RELEASE),
    ("VM_MAXCPU_13", OLDER_RELEASE),
    ("STRUCT_VMX", OLDER_RELEASE),
    ("vmmctl_vm_create", VMMCTL),
    ("vmmctl_vm_create_v0", VMMCTL),
    ("vmmctl_vm_destroy", VMMCTL),
    ("VMMCTL_IOC_GROUP_V", VMMCTL),
    ("VMMCTL_CREATE_DESTROY_ON_CLOSE", VMMCTL),
    ("VMMCTL_FLAGS_MASK", VMMCTL),
    ("VMMCTL_VM_CREATE", VMMCTL),
    ("VMMCTL_VM_DESTROY", VMMCTL),
    ("VM_MAXMEMDOM", VMM_MEM),
    ("VM_MAXSYSMEM", VMM_MEM),
    ("VM_MAX_MEMSEGS", VMM_MEM),
    ("VM_MAX_MEMMAPS", VMM_MEM),
    ("VM_SYSMEM", VMM_MEM),
    ("VM_BOOTROM", VMM_MEM),
    ("VM_FRAMEBUFFER", VMM_MEM),
    ("VM_PCIROM", VMM_MEM),
    ("VM_MEMSEG_END", VMM_MEM),
    ("VM_BOOTROM_14", LIBVMMAPI),
    ("VM_FRAMEBUFFER_14", LIBVMMAPI),
    ("VM_PCIROM_14", LIBVMMAPI),
    ("VM_LOWMEM_LIMIT", LIBVMMAPI),
    ("VM_HIGHMEM_BASE", LIBVMMAPI),
    ("VM_MMAP_GUARD_SIZE", LIBVMMAPI),
    ("VM_MEM_F_INCORE", LIBVMMAPI),
    ("VM_MEM_F_WIRED", LIBVMMAPI),
    ("VM_MAXCPU_KERNEL", KERNEL_ONLY),
    ("domainset_t_kernel", KERNEL_ONLY),
    ("DOMAINSET_SETSIZE_KERNEL", KERNEL_ONLY),
];

/// The C source of the probe: `probe.h`, the bitfield union, one record per check.
fn probe_source(checks: &[Check], bitfields: &[BitfieldCheck]) -> String {
    let mut types: Vec<&str> = bitfields.iter().map(|b| b.rust_type).collect();
    types.dedup();
    let mut c = String::from("#include \"probe.h\"\n\nunion probe_bits {\n\tunsigned char none;\n");
    for ty in &types {
        let _ = writeln!(c, "\tstruct {ty} b_{ty};");
    }
    c.push_str(
        "};\n\nstruct probe_record {\n\tuint64_t index;\n\tuint64_t value;\n\
         \tunion probe_bits bits;\n};\n\n\
         __attribute__((used, section(PROBE_SECTION)))\n\
         const struct probe_record probe_records[] = {\n\
         \t{ PROBE_MAGIC, sizeof(struct probe_record), { 0 } },\n",
    );
    for (index, check) in checks.iter().enumerate() {
        let _ = writeln!(
            c,
            "\t{{ {}, (uint64_t)({}), {{ 0 }} }},",
            index + 1,
            check.c_expr
        );
    }
    for (index, bitfield) in bitfields.iter().enumerate() {
        // All ones: the compiler truncates the constant to the field's width.
        let _ = writeln!(
            c,
            "\t{{ {}, 0, {{ .b_{} = {{ .{} = ~0ull }} }} }},",
            checks.len() + index + 1,
            bitfield.rust_type,
            bitfield.field
        );
    }
    c.push_str("};\n");
    c
}

/// The compiled probe: its records' values and bitfield bytes, and the headers it read.
struct Probe {
    values: Vec<u64>,
    bits: Vec<Vec<u8>>,
    headers: Vec<PathBuf>,
    zig_version: String,
}

fn env_set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty() && v != "0")
}

/// How to run zig: `$ZIG`, `zig` on PATH, or the PyPI wheel's `python3 -m ziglang`.
fn zig_command() -> Option<(Vec<String>, String)> {
    let mut candidates = Vec::new();
    if let Some(zig) = std::env::var_os("ZIG").and_then(|z| z.into_string().ok()) {
        candidates.push(vec![zig]);
    }
    candidates.push(vec!["zig".to_string()]);
    candidates.push(vec!["python3".into(), "-m".into(), "ziglang".into()]);
    candidates.into_iter().find_map(|command| {
        let output = Command::new(&command[0])
            .args(&command[1..])
            .arg("version")
            .output()
            .ok()?;
        let version = String::from_utf8_lossy(&output.stdout).trim().to_string();
        (output.status.success() && !version.is_empty()).then_some((command, version))
    })
}

/// Compiles the probe once per test binary; `None` when zig is missing and not required.
fn probe() -> Option<&'static Probe> {
    static PROBE: OnceLock<Option<Probe>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            let Some((zig, zig_version)) = zig_command() else {
                if env_set("BHYVE_RS_REQUIRE_ZIG") {
                    panic!("BHYVE_RS_REQUIRE_ZIG=1 but zig is missing (run tests/install-deps.sh)");
                }
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIP zig_headers: zig not found ($ZIG, zig, python3 -m ziglang); \
                     tests/install-deps.sh installs it"
                );
                return None;
            };
            Some(compile_probe(&zig, zig_version))
        })
        .as_ref()
}

fn compile_probe(zig: &[String], zig_version: String) -> Probe {
    let checks = all_checks();
    let bitfields = bitfield_checks();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("zig_headers");
    std::fs::create_dir_all(&dir).expect("create probe directory");
    let source = dir.join("probe.c");
    let object = dir.join("probe.o");
    let deps = dir.join("probe.d");
    std::fs::write(&source, probe_source(&checks, &bitfields)).expect("write probe.c");
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/zig_headers");
    let output = Command::new(&zig[0])
        .args(&zig[1..])
        .args(["cc", "-target", "x86_64-freebsd", "-std=gnu11", "-c"])
        .arg("-I")
        .arg(&include)
        .args([
            "-Wno-constant-conversion",
            "-Wno-bitfield-constant-conversion",
        ])
        .arg("-MD")
        .arg("-MF")
        .arg(&deps)
        .arg("-o")
        .arg(&object)
        .arg(&source)
        .output()
        .expect("run zig cc");
    assert!(
        output.status.success(),
        "zig cc could not compile {} (a crate item the headers do not define shows up as an \
         undeclared identifier):\n{}",
        source.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let bytes = std::fs::read(&object).expect("read probe.o");
    let (values, bits) = read_records(&bytes, checks.len(), bitfields.len())
        .unwrap_or_else(|e| panic!("{}: {e}", object.display()));
    let deps = std::fs::read_to_string(&deps).expect("read probe.d");
    let headers = deps
        .split_whitespace()
        .filter(|word| word.ends_with(".h"))
        .map(PathBuf::from)
        .collect();
    Probe {
        values,
        bits,
        headers,
        zig_version,
    }
}

/// Reads the probe records back: the values of the `checks` records, then the bitfield bytes.
fn read_records(
    object: &[u8],
    checks: usize,
    bitfields: usize,
) -> Result<(Vec<u64>, Vec<Vec<u8>>), String> {
    let elf = elf::Elf::parse(object)?;
    if elf.file_type != elf::ET_REL || elf.machine != elf::EM_X86_64 {
        return Err(format!(
            "not an x86-64 object file (type {}, machine {})",
            elf.file_type, elf.machine
        ));
    }
    let section = elf.section(PROBE_SECTION)?;
    if elf::u64_at(section, 0)? != PROBE_MAGIC {
        return Err("the probe section does not start with the magic record".into());
    }
    let stride = elf::u64_at(section, 8)? as usize;
    let count = checks + bitfields + 1;
    if stride < RECORD_BITS_OFFSET || section.len() != stride * count {
        return Err(format!(
            "probe section is {} bytes, expected {count} records of {stride}",
            section.len()
        ));
    }
    let mut values = Vec::new();
    let mut bits = Vec::new();
    for index in 1..count {
        let record = &section[index * stride..(index + 1) * stride];
        if elf::u64_at(record, 0)? != index as u64 {
            return Err(format!("record {index} carries another index"));
        }
        if index <= checks {
            values.push(elf::u64_at(record, 8)?);
        } else {
            bits.push(record[RECORD_BITS_OFFSET..].to_vec());
        }
    }
    Ok((values, bits))
}

fn all_checks() -> Vec<Check> {
    let mut checks = layout_checks();
    checks.extend(request_checks());
    checks.extend(constant_checks());
    checks
}

/// Every disagreement, one line each, naming the C expression and both values.
fn mismatches(checks: &[Check], bitfields: &[BitfieldCheck], probe: &Probe) -> Vec<String> {
    let mut problems = Vec::new();
    for (check, &c_value) in checks.iter().zip(&probe.values) {
        if check.rust != c_value {
            problems.push(format!(
                "{}: FreeBSD headers {c_value:#x} ({c_value}), vmm-sys {:#x} ({})",
                check.c_expr, check.rust, check.rust
            ));
        }
    }
    for (bitfield, c_bytes) in bitfields.iter().zip(&probe.bits) {
        let c_bits = set_bits(c_bytes, 0);
        if bitfield.rust_bits != c_bits || c_bits.is_empty() {
            problems.push(format!(
                "{}.{} (bitfield): FreeBSD headers set bits {c_bits:?}, vmm-sys {:?}",
                bitfield.c_type, bitfield.field, bitfield.rust_bits
            ));
        }
    }
    problems
}

#[test]
fn vmm_sys_agrees_with_the_freebsd_headers_in_the_zig_wheel() {
    let Some(probe) = probe() else { return };
    let checks = all_checks();
    let bitfields = bitfield_checks();
    let problems = mismatches(&checks, &bitfields, probe);
    assert!(
        problems.is_empty(),
        "{} mismatch(es) between vmm-sys and FreeBSD's headers (zig {}):\n{}",
        problems.len(),
        probe.zig_version,
        problems.join("\n")
    );
    let vmm_headers: Vec<String> = probe
        .headers
        .iter()
        .filter(|path| path.to_string_lossy().contains("/machine/vmm"))
        .map(|path| path.display().to_string())
        .collect();
    assert!(
        vmm_headers
            .iter()
            .any(|path| path.ends_with("machine/vmm_dev.h")),
        "the probe did not read machine/vmm_dev.h: {:?}",
        probe.headers
    );
    let layouts = layout_checks();
    let types: BTreeSet<&str> = layouts
        .iter()
        .filter(|c| !c.item.contains('.'))
        .map(|c| c.item.as_str())
        .collect();
    let _ = writeln!(
        std::io::stderr(),
        "zig {} headers agree with vmm-sys: {} types (size, alignment), {} fields (offset, \
         size), {} bitfields, {} request codes, {} enum values and constants; read {}",
        probe.zig_version,
        types.len(),
        layouts
            .iter()
            .filter(|c| c.c_expr.starts_with("offsetof"))
            .count(),
        bitfields.len(),
        request_checks().len(),
        constant_checks().len(),
        vmm_headers.join(", ")
    );
}

#[test]
fn items_said_to_be_missing_from_the_headers_really_are() {
    let Some(probe) = probe() else { return };
    let mut found = Vec::new();
    for header in &probe.headers {
        let text =
            std::fs::read_to_string(header).unwrap_or_else(|e| panic!("{}: {e}", header.display()));
        let words: BTreeSet<&str> = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .collect();
        for (name, _) in NOT_IN_THE_WHEEL_HEADERS {
            if words.contains(name) {
                found.push(format!(
                    "{name} is defined in {}: check it instead of listing it",
                    header.display()
                ));
            }
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn a_wrong_crate_value_is_reported_by_name() {
    let Some(probe) = probe() else { return };
    let mut checks = all_checks();
    let run = checks
        .iter_mut()
        .find(|check| check.c_expr == "VM_RUN")
        .expect("VM_RUN is checked");
    run.rust ^= 1 << 16;
    let mut bitfields = bitfield_checks();
    bitfields[0].rust_bits[0] += 1;
    let problems = mismatches(&checks, &bitfields, probe);
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(problems[0].starts_with("VM_RUN: FreeBSD headers 0x80207601"));
    assert!(problems[1].starts_with("struct vm_readwrite_kernemu_device.access_width"));
}

/// Public item names of the crate's sources.
struct CrateItems {
    /// Structs and unions.
    types: BTreeSet<String>,
    /// Constants and enum values.
    values: BTreeSet<String>,
    /// Each struct's or union's fields.
    fields: Vec<(String, Vec<String>)>,
}

fn crate_items() -> CrateItems {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut types = BTreeSet::new();
    let mut values = BTreeSet::new();
    let mut fields = Vec::new();
    for entry in std::fs::read_dir(&src).expect("read src") {
        let path = entry.expect("src entry").path();
        let text = std::fs::read_to_string(&path).expect("read source");
        let mut in_enum = false;
        let mut current: Option<(String, Vec<String>)> = None;
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["pub", "struct" | "union", name, "{"] => {
                    types.insert(name.to_string());
                    current = Some((name.to_string(), Vec::new()));
                }
                // `$name` lines are the declaring macros themselves.
                ["pub", "const", name, ..] if *name != "fn" && !name.starts_with('$') => {
                    values.insert(name.trim_end_matches(':').to_string());
                }
                ["c_enum!", "{"] => in_enum = true,
                [name, "=", _] if in_enum => {
                    values.insert(name.to_string());
                }
                ["pub", field, _] if current.is_some() && line.starts_with("    pub ") => {
                    if let Some((_, list)) = current.as_mut() {
                        list.push(field.trim_end_matches(':').to_string());
                    }
                }
                ["}"] if line == "}" => {
                    in_enum = false;
                    fields.extend(current.take());
                }
                _ => {}
            }
        }
    }
    CrateItems {
        types,
        values,
        fields,
    }
}

#[test]
fn every_crate_item_is_checked_or_listed() {
    let checks = all_checks();
    let bitfields = bitfield_checks();
    let listed: BTreeSet<&str> = NOT_IN_THE_WHEEL_HEADERS.iter().map(|(n, _)| *n).collect();
    let checked: BTreeSet<&str> = checks.iter().map(|c| c.item.as_str()).collect();
    let CrateItems {
        types,
        values,
        fields,
    } = crate_items();
    assert!(
        types.len() > 50 && values.len() > 250,
        "source scan found too little"
    );
    let mut problems = Vec::new();
    for name in types.iter().chain(&values) {
        let is_listed = listed.contains(name.as_str());
        if is_listed == checked.contains(name.as_str()) {
            problems.push(format!(
                "{name}: {}",
                if is_listed {
                    "both checked and listed"
                } else {
                    "neither checked nor listed"
                }
            ));
        }
    }
    for (ty, names) in &fields {
        if !checked.contains(ty.as_str()) {
            continue;
        }
        for field in names {
            let covered = if field.starts_with("_bitfield_") {
                bitfields.iter().any(|b| b.rust_type == ty)
            } else {
                checked.contains(format!("{ty}.{field}").as_str())
            };
            if !covered {
                problems.push(format!("{ty}.{field}: not checked"));
            }
        }
    }
    for name in &listed {
        if !types.contains(*name) && !values.contains(*name) {
            problems.push(format!("{name} is listed but the crate has no such item"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
