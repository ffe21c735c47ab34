//! CPUID as the guest sees it: the host's supported leaves, adjusted for the configured topology
//! the way bhyve's vmm (sys/amd64/vmm/x86.c) does it.
//!
//! bhyve's model: vCPU `i` has APIC id `i`; a package holds `cores * threads` logical CPUs; the
//! APIC id fields for threads and cores are `log2` (rounded up) wide; L1/L2 caches are shared by
//! the threads of one core, L3 by the whole package.

use super::Topology;

/// One CPUID leaf/subleaf.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    /// Backend flags (KVM: `KVM_CPUID_FLAG_SIGNIFCANT_INDEX` when `index` matters).
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// KVM's "index is significant" flag, kept here so the topology code can add subleaves.
pub const FLAG_SIGNIFICANT_INDEX: u32 = 1;

const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_ECX_VMX: u32 = 1 << 5;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

/// `log2(x)` rounded up; 0 for 0 and 1.
fn log2_ceil(x: u32) -> u32 {
    if x <= 1 {
        0
    } else {
        32 - (x - 1).leading_zeros()
    }
}

/// The CPU vendor, from CPUID leaf 0: it decides which leaves describe the topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    /// AMD, and Hygon (an AMD design): bhyve's vmm treats both as SVM hosts.
    Amd,
    Other,
}

impl Vendor {
    /// The vendor named by leaf 0 of `entries`.
    pub fn of(entries: &[CpuidEntry]) -> Vendor {
        let Some(leaf0) = entries.iter().find(|e| e.function == 0) else {
            return Vendor::Other;
        };
        let mut name = [0u8; 12];
        name[..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
        name[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
        name[8..].copy_from_slice(&leaf0.ecx.to_le_bytes());
        match &name {
            b"GenuineIntel" => Vendor::Intel,
            b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
            _ => Vendor::Other,
        }
    }
}

/// The display family of leaf 1 EAX (base family, plus the extended family when the base is 0xf).
fn family(leaf1_eax: u32) -> u32 {
    let base = (leaf1_eax >> 8) & 0xf;
    if base == 0xf {
        base + ((leaf1_eax >> 20) & 0xff)
    } else {
        base
    }
}

/// Rewrite `entries` (the host's supported CPUID) for vCPU `apic_id` of a VM with `topology`.
///
/// Like bhyve's vmm, only the leaves of the host's vendor describe the topology: leaf 4 (when
/// the host fills it) and the x2APIC leaves on Intel; on AMD leaves 0x8000_0008 (NC),
/// 0x8000_001D (cache sharing) and 0x8000_001E (compute unit and threads), while leaf 0xB reads
/// as zero there. Leaf 1 is the same for both.
pub fn apply_topology(entries: &mut Vec<CpuidEntry>, apic_id: u32, topology: &Topology) {
    let threads = u32::from(topology.threads.max(1));
    let cores = u32::from(topology.cores.max(1));
    let per_package = threads * cores;
    let vendor = Vendor::of(entries);
    let leaf1_eax = entries
        .iter()
        .find(|e| e.function == 1)
        .map_or(0, |e| e.eax);
    // bhyve describes 0x8000_001E only from family 16h on, where AMD defines it.
    let amd_extended_topology = vendor == Vendor::Amd && family(leaf1_eax) >= 0x16;
    // L1 and L2 belong to one core, L3 and beyond to the whole package.
    let cache_sharing = |level: u32| if level >= 3 { per_package } else { threads };

    for entry in entries.iter_mut() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x0000_ffff)
                    | ((per_package & 0xff) << 16)
                    | ((apic_id & 0xff) << 24);
                entry.ecx = (entry.ecx | LEAF1_ECX_HYPERVISOR) & !LEAF1_ECX_VMX;
                entry.edx |= LEAF1_EDX_HTT;
            }
            // Cache leaves; a zero type field ends the list and stays as it is. AMD hosts leave
            // leaf 4 empty, so this only ever changes an Intel table.
            4 if entry.eax & 0x1f != 0 => {
                let level = (entry.eax >> 5) & 0x7;
                entry.eax = (entry.eax & 0x3ff)
                    | ((cache_sharing(level) - 1).min(0xfff) << 14)
                    | ((cores - 1).min(0x3f) << 26);
            }
            // bhyve answers 0xB only on Intel. It passes 0x1F through from the host, which
            // would show the host's topology; it is described like 0xB here instead.
            0xb | 0x1f if vendor == Vendor::Intel => {
                *entry = topology_leaf(entry.function, entry.index, apic_id, threads, cores);
            }
            0xb | 0x1f => {
                (entry.eax, entry.ebx, entry.ecx, entry.edx) = (0, 0, 0, 0);
            }
            0x8000_0008 if vendor == Vendor::Amd => {
                // ApicIdCoreIdSize is left 0 below 4 bits: guests then use NC alone.
                let width = log2_ceil(per_package).min(0xf);
                let width = if width < 4 { 0 } else { width };
                entry.ecx = (width << 12) | (per_package - 1).min(0xff);
            }
            // AMD's cache leaf, laid out like leaf 4's EAX. bhyve makes up the caches entirely;
            // the host's sizes are kept here, as for leaf 4, and only the sharing changes.
            0x8000_001d if vendor == Vendor::Amd && entry.eax & 0x1f != 0 => {
                let level = (entry.eax >> 5) & 0x7;
                entry.eax =
                    (entry.eax & !(0xfff << 14)) | ((cache_sharing(level) - 1).min(0xfff) << 14);
            }
            0x8000_001e if amd_extended_topology => {
                *entry = amd_topology_leaf(apic_id, threads);
            }
            _ => {}
        }
    }

    let max_basic = entries
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);
    let max_extended = entries
        .iter()
        .find(|e| e.function == 0x8000_0000)
        .map_or(0, |e| e.eax);
    // Make sure the x2APIC topology leaf answers for its first three subleaves even when the
    // host listed fewer.
    if vendor == Vendor::Intel && max_basic >= 0xb {
        for index in 0..3 {
            if !entries
                .iter()
                .any(|e| e.function == 0xb && e.index == index)
            {
                entries.push(topology_leaf(0xb, index, apic_id, threads, cores));
            }
        }
    }
    if amd_extended_topology
        && max_extended >= 0x8000_001e
        && !entries.iter().any(|e| e.function == 0x8000_001e)
    {
        entries.push(amd_topology_leaf(apic_id, threads));
    }
}

/// Leaf 0x8000_001E as bhyve describes it: the extended APIC id, the threads per compute unit
/// and the compute unit (core) id; one node per package.
fn amd_topology_leaf(apic_id: u32, threads: u32) -> CpuidEntry {
    CpuidEntry {
        function: 0x8000_001e,
        index: 0,
        flags: 0,
        eax: apic_id,
        ebx: ((threads - 1).min(0xff) << 8) | ((apic_id >> log2_ceil(threads)) & 0xff),
        ecx: 0,
        edx: 0,
    }
}

fn topology_leaf(function: u32, index: u32, apic_id: u32, threads: u32, cores: u32) -> CpuidEntry {
    let (width, logical, level) = match index {
        0 => (log2_ceil(threads), threads, TOPOLOGY_LEVEL_SMT),
        1 => (
            log2_ceil(threads * cores),
            threads * cores,
            TOPOLOGY_LEVEL_CORE,
        ),
        _ => (0, 0, 0),
    };
    CpuidEntry {
        function,
        index,
        flags: FLAG_SIGNIFICANT_INDEX,
        eax: width & 0x1f,
        ebx: logical & 0xffff,
        ecx: (level << 8) | (index & 0xff),
        edx: apic_id,
    }
}

/// A CPUID register holding feature flags, checked when a vCPU's saved CPUID is put back.
struct FeatureRegister {
    function: u32,
    index: u32,
    register: Register,
    /// Names of the flags, by bit; `""` where no name is given.
    names: &'static [(u32, &'static str)],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Register {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl Register {
    fn of(self, entry: &CpuidEntry) -> u32 {
        match self {
            Register::Eax => entry.eax,
            Register::Ebx => entry.ebx,
            Register::Ecx => entry.ecx,
            Register::Edx => entry.edx,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Register::Eax => "EAX",
            Register::Ebx => "EBX",
            Register::Ecx => "ECX",
            Register::Edx => "EDX",
        }
    }
}

/// Flags the hypervisor changes while the guest runs (they mirror CR4.OSXSAVE and CR4.PKE), so
/// a saved CPUID may have them where a fresh vCPU does not.
const RUNTIME_FLAGS: [(u32, u32, Register, u32); 2] = [
    (1, 0, Register::Ecx, 1 << 27),
    (7, 0, Register::Ecx, 1 << 4),
];

const FEATURE_REGISTERS: &[FeatureRegister] = &[
    FeatureRegister {
        function: 1,
        index: 0,
        register: Register::Ecx,
        names: &[
            (0, "sse3"),
            (1, "pclmulqdq"),
            (3, "monitor"),
            (9, "ssse3"),
            (12, "fma"),
            (13, "cx16"),
            (19, "sse4.1"),
            (20, "sse4.2"),
            (21, "x2apic"),
            (22, "movbe"),
            (23, "popcnt"),
            (24, "tsc-deadline"),
            (25, "aes"),
            (26, "xsave"),
            (28, "avx"),
            (29, "f16c"),
            (30, "rdrand"),
        ],
    },
    FeatureRegister {
        function: 1,
        index: 0,
        register: Register::Edx,
        names: &[
            (0, "fpu"),
            (4, "tsc"),
            (5, "msr"),
            (8, "cx8"),
            (9, "apic"),
            (15, "cmov"),
            (19, "clflush"),
            (23, "mmx"),
            (24, "fxsr"),
            (25, "sse"),
            (26, "sse2"),
        ],
    },
    FeatureRegister {
        function: 7,
        index: 0,
        register: Register::Ebx,
        names: &[
            (0, "fsgsbase"),
            (3, "bmi1"),
            (4, "hle"),
            (5, "avx2"),
            (8, "bmi2"),
            (9, "erms"),
            (10, "invpcid"),
            (11, "rtm"),
            (16, "avx512f"),
            (18, "rdseed"),
            (19, "adx"),
            (20, "smap"),
            (23, "clflushopt"),
            (24, "clwb"),
            (29, "sha"),
        ],
    },
    FeatureRegister {
        function: 7,
        index: 0,
        register: Register::Ecx,
        names: &[
            (2, "umip"),
            (3, "pku"),
            (8, "gfni"),
            (9, "vaes"),
            (10, "vpclmulqdq"),
            (22, "rdpid"),
        ],
    },
    FeatureRegister {
        function: 7,
        index: 0,
        register: Register::Edx,
        names: &[
            (10, "md-clear"),
            (24, "amx-tile"),
            (26, "ibrs"),
            (29, "arch-capabilities"),
        ],
    },
    FeatureRegister {
        function: 7,
        index: 1,
        register: Register::Eax,
        names: &[(4, "avx-vnni"), (5, "avx512-bf16")],
    },
    FeatureRegister {
        function: 0xd,
        index: 1,
        register: Register::Eax,
        names: &[
            (0, "xsaveopt"),
            (1, "xsavec"),
            (2, "xgetbv1"),
            (3, "xsaves"),
        ],
    },
    FeatureRegister {
        function: 0x4000_0001,
        index: 0,
        register: Register::Eax,
        names: &[
            (0, "kvmclock"),
            (3, "kvmclock2"),
            (4, "kvm-async-pf"),
            (5, "kvm-steal-time"),
            (6, "kvm-pv-eoi"),
            (24, "kvmclock-stable"),
        ],
    },
    FeatureRegister {
        function: 0x8000_0001,
        index: 0,
        register: Register::Ecx,
        names: &[(0, "lahf-lm"), (5, "abm"), (6, "sse4a"), (8, "prefetchw")],
    },
    FeatureRegister {
        function: 0x8000_0001,
        index: 0,
        register: Register::Edx,
        names: &[
            (11, "syscall"),
            (20, "nx"),
            (26, "pdpe1gb"),
            (27, "rdtscp"),
            (29, "lm"),
        ],
    },
    FeatureRegister {
        function: 0x8000_0008,
        index: 0,
        register: Register::Ebx,
        names: &[(0, "clzero"), (9, "wbnoinvd"), (12, "ibpb")],
    },
];

fn find(entries: &[CpuidEntry], function: u32, index: u32) -> Option<&CpuidEntry> {
    entries.iter().find(|e| {
        e.function == function && (e.index == index || e.flags & FLAG_SIGNIFICANT_INDEX == 0)
    })
}

/// Check that `available` (the CPUID this host gives a new vCPU of the same VM) offers every
/// feature flag `saved` (a vCPU's CPUID from a snapshot) has; the error names the first
/// missing one, e.g. `CPUID.(EAX=7,ECX=0):EBX bit 5 (avx2)`. A guest that found a feature at
/// boot keeps using it after a restore, so a missing one would fault or misbehave later.
pub fn check_features_available(
    saved: &[CpuidEntry],
    available: &[CpuidEntry],
) -> Result<(), String> {
    for reg in FEATURE_REGISTERS {
        let Some(saved_entry) = find(saved, reg.function, reg.index) else {
            continue;
        };
        let mut wanted = reg.register.of(saved_entry);
        for (function, index, register, bits) in RUNTIME_FLAGS {
            if (function, index, register) == (reg.function, reg.index, reg.register) {
                wanted &= !bits;
            }
        }
        let offered = find(available, reg.function, reg.index).map_or(0, |e| reg.register.of(e));
        let missing = wanted & !offered;
        if missing != 0 {
            let bit = missing.trailing_zeros();
            let name = reg
                .names
                .iter()
                .find(|(b, _)| *b == bit)
                .map_or(String::new(), |(_, n)| format!(" ({n})"));
            return Err(format!(
                "the snapshot's vCPU has CPUID.(EAX={:#x},ECX={}):{} bit {bit}{name}, \
                 which this host cannot provide",
                reg.function,
                reg.index,
                reg.register.name()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CPUID with just the vendor and leaf 1, for the feature checks.
    fn host_like() -> Vec<CpuidEntry> {
        vec![
            CpuidEntry {
                function: 0,
                eax: 0xd,
                ebx: 0x756e_6547, // "GenuineIntel"
                edx: 0x4965_6e69,
                ecx: 0x6c65_746e,
                ..Default::default()
            },
            CpuidEntry {
                function: 1,
                ebx: 0xff01_0800,
                ecx: LEAF1_ECX_VMX,
                ..Default::default()
            },
        ]
    }

    fn leaf(entries: &[CpuidEntry], function: u32, index: u32) -> CpuidEntry {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn leaf_1_carries_apic_id_and_logical_count() {
        for intel in INTEL_TABLES {
            let mut e = recorded(intel.table);
            let topo = Topology {
                cpus: 8,
                sockets: 2,
                cores: 2,
                threads: 2,
            };
            apply_topology(&mut e, 5, &topo);
            let l1 = leaf(&e, 1, 0);
            let cpu = intel.cpu;
            assert_eq!(l1.ebx >> 24, 5, "{cpu}");
            assert_eq!((l1.ebx >> 16) & 0xff, 4, "{cpu}");
            assert_eq!(l1.ebx & 0xffff, 0x0800, "{cpu}: CLFLUSH size kept");
            assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0, "{cpu}");
            assert_eq!(l1.ecx & LEAF1_ECX_VMX, 0, "{cpu}");
        }
    }

    #[test]
    fn x2apic_leaf_describes_threads_then_cores() {
        for intel in INTEL_TABLES {
            let mut e = recorded(intel.table);
            let topo = Topology {
                cpus: 12,
                sockets: 2,
                cores: 3,
                threads: 2,
            };
            apply_topology(&mut e, 7, &topo);
            let cpu = intel.cpu;
            let smt = leaf(&e, 0xb, 0);
            assert_eq!(
                (smt.eax, smt.ebx, smt.ecx >> 8, smt.edx),
                (1, 2, 1, 7),
                "{cpu}"
            );
            let core = leaf(&e, 0xb, 1);
            // 6 logical CPUs per package need 3 bits of APIC id.
            assert_eq!(
                (core.eax, core.ebx, core.ecx >> 8, core.edx),
                (3, 6, 2, 7),
                "{cpu}"
            );
            let end = leaf(&e, 0xb, 2);
            assert_eq!((end.eax, end.ebx, end.ecx), (0, 0, 2), "{cpu}");
        }
    }

    #[test]
    fn cache_leaf_shares_l1_per_core_and_l3_per_package() {
        for intel in INTEL_TABLES {
            let mut e = recorded(intel.table);
            let topo = Topology {
                cpus: 4,
                sockets: 1,
                cores: 2,
                threads: 2,
            };
            apply_topology(&mut e, 0, &topo);
            let cpu = intel.cpu;
            let l1 = leaf(&e, 4, 0);
            assert_eq!((l1.eax >> 14) & 0xfff, 1, "{cpu}");
            assert_eq!(l1.eax >> 26, 1, "{cpu}");
            assert_eq!(l1.eax & 0x3ff, 0x121, "{cpu}");
            let l3 = leaf(&e, 4, 3);
            assert_eq!((l3.eax >> 14) & 0xfff, 3, "{cpu}");
        }
    }

    #[test]
    fn flat_default_topology_is_one_cpu_per_package() {
        for intel in INTEL_TABLES {
            let mut e = recorded(intel.table);
            apply_topology(&mut e, 3, &Topology::default());
            let cpu = intel.cpu;
            assert_eq!((leaf(&e, 1, 0).ebx >> 16) & 0xff, 1, "{cpu}");
            assert_eq!(leaf(&e, 0xb, 1).eax, 0, "{cpu}");
            assert_eq!(leaf(&e, 0xb, 1).ebx, 1, "{cpu}");
            assert_eq!(leaf(&e, 0xb, 1).edx, 3, "{cpu}");
            assert_eq!(
                leaf(&e, 4, 3).eax >> 14,
                0,
                "{cpu}: one core, L3 not shared"
            );
        }
    }

    #[test]
    fn saved_features_must_be_available_except_runtime_flags() {
        let mut available = host_like();
        available.iter_mut().find(|e| e.function == 1).unwrap().ecx |= 1 << 28;
        let mut saved = available.clone();
        assert_eq!(check_features_available(&saved, &available), Ok(()));
        // OSXSAVE follows the guest's CR4: present in the saved CPUID only.
        saved.iter_mut().find(|e| e.function == 1).unwrap().ecx |= 1 << 27;
        assert_eq!(check_features_available(&saved, &available), Ok(()));
        let mut without_avx = available.clone();
        without_avx
            .iter_mut()
            .find(|e| e.function == 1)
            .unwrap()
            .ecx &= !(1 << 28);
        let err = check_features_available(&saved, &without_avx).unwrap_err();
        assert_eq!(
            err,
            "the snapshot's vCPU has CPUID.(EAX=0x1,ECX=0):ECX bit 28 (avx), \
             which this host cannot provide"
        );
        // A whole leaf missing on the host counts as all its flags missing.
        let mut saved = available.clone();
        saved.push(CpuidEntry {
            function: 0x4000_0001,
            eax: 1 << 3,
            ..Default::default()
        });
        let err = check_features_available(&saved, &available).unwrap_err();
        assert!(err.contains("bit 3 (kvmclock2)"), "{err}");
    }

    /// A CPUID table in the text form of `cpuid_tables/*.txt`.
    fn recorded(table: &str) -> Vec<CpuidEntry> {
        table
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let v: Vec<u32> = l
                    .split_whitespace()
                    .map(|w| u32::from_str_radix(w.trim_start_matches("0x"), 16).unwrap())
                    .collect();
                CpuidEntry {
                    function: v[0],
                    index: v[1],
                    flags: v[2],
                    eax: v[3],
                    ebx: v[4],
                    ecx: v[5],
                    edx: v[6],
                }
            })
            .collect()
    }

    const AMD_EPYC: &str = include_str!("cpuid_tables/amd-epyc.txt");

    /// A bare-metal CPUID recording of an Intel part, with what the recording says about it.
    struct IntelTable {
        cpu: &'static str,
        table: &'static str,
        /// Leaf 1 EAX.
        signature: u32,
        /// Logical CPUs per package, from leaf 0xB subleaf 1.
        logical_per_package: u32,
        /// Whether the part has leaf 0x1F (V2 extended topology).
        has_leaf_1f: bool,
    }

    const INTEL_TABLES: [IntelTable; 2] = [
        IntelTable {
            cpu: "Xeon Platinum 8160",
            table: include_str!("cpuid_tables/intel-xeon-platinum-8160.txt"),
            signature: 0x0005_0654,
            logical_per_package: 48,
            has_leaf_1f: false,
        },
        IntelTable {
            cpu: "Xeon Gold 5520+",
            table: include_str!("cpuid_tables/intel-xeon-gold-5520plus.txt"),
            signature: 0x000c_06f2,
            logical_per_package: 56,
            has_leaf_1f: true,
        },
    ];

    fn two_packages_of_two_cores_of_two_threads() -> Topology {
        Topology {
            cpus: 8,
            sockets: 2,
            cores: 2,
            threads: 2,
        }
    }

    #[test]
    fn vendor_comes_from_leaf_0() {
        assert_eq!(Vendor::of(&recorded(AMD_EPYC)), Vendor::Amd);
        assert_eq!(family(leaf(&recorded(AMD_EPYC), 1, 0).eax), 0x19);
        for intel in INTEL_TABLES {
            let e = recorded(intel.table);
            assert_eq!(Vendor::of(&e), Vendor::Intel, "{}", intel.cpu);
            assert_eq!(leaf(&e, 1, 0).eax, intel.signature, "{}", intel.cpu);
            assert_eq!(family(intel.signature), 6, "{}", intel.cpu);
        }
        assert_eq!(Vendor::of(&[]), Vendor::Other);
    }

    #[test]
    fn amd_topology_is_in_the_amd_leaves() {
        let mut e = recorded(AMD_EPYC);
        let host = e.clone();
        apply_topology(&mut e, 5, &two_packages_of_two_cores_of_two_threads());
        let l1 = leaf(&e, 1, 0);
        assert_eq!((l1.ebx >> 24, (l1.ebx >> 16) & 0xff), (5, 4));
        // Leaf 4 is Intel's: empty on AMD and left so.
        assert_eq!(leaf(&e, 4, 0), leaf(&host, 4, 0));
        // bhyve answers leaf 0xB only on Intel.
        let x2apic = leaf(&e, 0xb, 0);
        assert_eq!(
            (x2apic.eax, x2apic.ebx, x2apic.ecx, x2apic.edx),
            (0, 0, 0, 0)
        );
        assert!(!e.iter().any(|x| x.function == 0xb && x.index == 1));
        // NC = logical CPUs per package - 1; ApicIdCoreIdSize 0 below 4 bits.
        assert_eq!(leaf(&e, 0x8000_0008, 0).ecx, 3);
        assert_eq!(
            leaf(&e, 0x8000_0008, 0).eax,
            leaf(&host, 0x8000_0008, 0).eax
        );
        // Extended APIC id, threads per compute unit - 1, compute unit id = APIC id >> 1.
        let ext = leaf(&e, 0x8000_001e, 0);
        assert_eq!((ext.eax, ext.ebx, ext.ecx, ext.edx), (5, 0x102, 0, 0));
        // Cache sharing: L1 (subleaves 0, 1) and L2 per core, L3 per package; sizes kept.
        for (index, sharing) in [(0, 2), (1, 2), (2, 2), (3, 4)] {
            let cache = leaf(&e, 0x8000_001d, index);
            assert_eq!((cache.eax >> 14) & 0xfff, sharing - 1, "subleaf {index}");
            let was = leaf(&host, 0x8000_001d, index);
            assert_eq!(cache.eax & 0x3fff, was.eax & 0x3fff);
            assert_eq!((cache.ebx, cache.ecx), (was.ebx, was.ecx));
        }
        assert_eq!(leaf(&e, 0x8000_001d, 4), leaf(&host, 0x8000_001d, 4));
    }

    #[test]
    fn amd_core_id_size_counts_package_bits_from_sixteen_cpus() {
        let mut e = recorded(AMD_EPYC);
        let topology = Topology {
            cpus: 32,
            sockets: 1,
            cores: 16,
            threads: 2,
        };
        apply_topology(&mut e, 31, &topology);
        assert_eq!(leaf(&e, 0x8000_0008, 0).ecx, (5 << 12) | 31);
        assert_eq!(leaf(&e, 0x8000_001e, 0).ebx, 0x100 | 15);
    }

    #[test]
    fn amd_topology_leaf_is_added_when_the_host_omits_it_and_skipped_before_family_16h() {
        let mut e = recorded(AMD_EPYC);
        e.retain(|x| x.function != 0x8000_001e);
        apply_topology(&mut e, 3, &Topology::default());
        let ext = leaf(&e, 0x8000_001e, 0);
        assert_eq!((ext.eax, ext.ebx), (3, 3));

        let mut old = recorded(AMD_EPYC);
        // Family 15h (Bulldozer): no 0x8000_001E in bhyve.
        old.iter_mut().find(|x| x.function == 1).unwrap().eax = 0x0060_0f12;
        let host = old.clone();
        apply_topology(&mut old, 3, &Topology::default());
        assert_eq!(leaf(&old, 0x8000_001e, 0), leaf(&host, 0x8000_001e, 0));
    }

    #[test]
    fn intel_topology_is_in_the_intel_leaves() {
        for intel in INTEL_TABLES {
            let cpu = intel.cpu;
            let mut e = recorded(intel.table);
            // KVM lists the all-zero subleaf that ends leaf 4; the bare-metal dump does not.
            assert!(!e.iter().any(|x| x.function == 4 && x.index == 4), "{cpu}");
            e.push(CpuidEntry {
                function: 4,
                index: 4,
                flags: FLAG_SIGNIFICANT_INDEX,
                ..Default::default()
            });
            let host = e.clone();
            // The host's own topology, which the guest must not see.
            assert_eq!(leaf(&host, 0xb, 1).ebx, intel.logical_per_package, "{cpu}");
            apply_topology(&mut e, 5, &two_packages_of_two_cores_of_two_threads());

            // APIC id 5, 4 logical CPUs per package; brand index and CLFLUSH size kept.
            assert_eq!(leaf(&host, 1, 0).ebx & 0xffff, 0x0800, "{cpu}");
            assert_eq!(leaf(&e, 1, 0).ebx, 0x0504_0800, "{cpu}");
            // x86.c keeps EAX bits 0-9 (type, level, self-initialising, fully associative) and
            // puts cores - 1 in bits 26-31 and the sharing CPUs - 1 in bits 14-25: 2 threads
            // share L1 and L2, the 4 CPUs of a package L3. Both parts have the same four caches.
            for (index, eax) in [
                (0, 0x0400_4121),
                (1, 0x0400_4122),
                (2, 0x0400_4143),
                (3, 0x0400_c163),
            ] {
                let cache = leaf(&e, 4, index);
                let was = leaf(&host, 4, index);
                assert_eq!(cache.eax, eax, "{cpu}: leaf 4 subleaf {index}");
                assert_ne!(was.eax, eax, "{cpu}: the host's sharing differs");
                // Sizes, ways and inclusiveness are the host's.
                assert_eq!(
                    (cache.ebx, cache.ecx, cache.edx),
                    (was.ebx, was.ecx, was.edx),
                    "{cpu}: leaf 4 subleaf {index}"
                );
            }
            assert_eq!(leaf(&e, 4, 4), leaf(&host, 4, 4), "{cpu}");

            let smt = leaf(&e, 0xb, 0);
            assert_eq!(
                (smt.eax, smt.ebx, smt.ecx, smt.edx),
                (1, 2, 0x100, 5),
                "{cpu}"
            );
            let core = leaf(&e, 0xb, 1);
            assert_eq!(
                (core.eax, core.ebx, core.ecx, core.edx),
                (2, 4, 0x201, 5),
                "{cpu}"
            );
            // The dump has no subleaf 2; the guest still finds the end of the list. EDX is the
            // x2APIC id at every subleaf, as the SDM and KVM have it (FreeBSD's vmm gives 0).
            let end = leaf(&e, 0xb, 2);
            assert_eq!((end.eax, end.ebx, end.ecx, end.edx), (0, 0, 2, 5), "{cpu}");

            // Leaf 0x1F tells the same as 0xB where the part has it, and is not made up where
            // it does not.
            assert_eq!(
                host.iter().any(|x| x.function == 0x1f),
                intel.has_leaf_1f,
                "{cpu}"
            );
            if intel.has_leaf_1f {
                assert_eq!(leaf(&host, 0x1f, 1).ebx, intel.logical_per_package, "{cpu}");
                for index in 0..2 {
                    let v2 = leaf(&e, 0x1f, index);
                    let v1 = leaf(&e, 0xb, index);
                    assert_eq!(
                        (v2.eax, v2.ebx, v2.ecx, v2.edx),
                        (v1.eax, v1.ebx, v1.ecx, v1.edx),
                        "{cpu}: leaf 0x1f subleaf {index}"
                    );
                }
            } else {
                assert!(!e.iter().any(|x| x.function == 0x1f), "{cpu}");
            }

            // AMD's leaves stay as the host has them: 0x8000_0008 ECX is reserved on Intel.
            assert_eq!(
                leaf(&e, 0x8000_0008, 0),
                leaf(&host, 0x8000_0008, 0),
                "{cpu}"
            );
            assert_eq!(
                leaf(&e, 0x8000_0001, 0),
                leaf(&host, 0x8000_0001, 0),
                "{cpu}"
            );
            assert!(!e.iter().any(|x| x.function == 0x8000_001e), "{cpu}");
            // The topology touches no other leaf on Intel.
            for (after, before) in e.iter().zip(&host) {
                if ![1, 4, 0xb, 0x1f].contains(&before.function) {
                    assert_eq!(after, before, "{cpu}");
                }
            }
        }
    }

    #[test]
    fn log2_rounds_up() {
        assert_eq!(
            [0, 1, 2, 3, 4, 5, 8, 9].map(log2_ceil),
            [0, 0, 1, 2, 2, 3, 3, 4]
        );
    }
}
