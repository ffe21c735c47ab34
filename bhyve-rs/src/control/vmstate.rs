//! What `bhyvectl` reads from and writes to a running VM, in FreeBSD's terms (`VM_REG_GUEST_*`
//! registers, segment descriptors as `base/limit/access`, vmm statistics, memory segments), and
//! the control socket messages that carry it.
//!
//! Requests (each with a number `version` = [`VERSION`]; anything else is refused):
//! * `{cmd = "vm_state", version, vcpu}` → `{version, state = {...}}` ([`VmState`]);
//! * `{cmd = "set_registers", version, vcpu, <register> = number..., <segment>_desc =
//!   [base, limit, access]..., gdtr = [base, limit], idtr = [base, limit]}` → `{}`; the writes
//!   are made in FreeBSD's order ([`REGISTERS`], then descriptors, then selectors);
//! * `{cmd = "vm_action", version, vcpu, action}` with `action` one of [`ACTIONS`] → `{}`.
//!
//! Failures answer `{error = "<why>"}`. Every field is checked for presence, type and range
//! before anything is done.

use super::nvlist::{NvList, NvValue};

/// Version of the messages below; a request of another version is refused.
pub const VERSION: u64 = 1;

pub const CMD_VM_STATE: &str = "vm_state";
pub const CMD_SET_REGISTERS: &str = "set_registers";
pub const CMD_VM_ACTION: &str = "vm_action";

/// 64-bit registers in the order bhyvectl prints and writes them (FreeBSD's
/// `get_all_registers`; `set-*` use the same order).
pub const REGISTERS: [&str; 29] = [
    "efer", "cr0", "cr2", "cr3", "cr4", "dr0", "dr1", "dr2", "dr3", "dr6", "dr7", "rsp", "rip",
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
    "r15", "rflags",
];

/// Segment registers in the order bhyvectl prints their descriptors.
pub const SEGMENTS: [&str; 8] = ["ds", "es", "fs", "gs", "ss", "cs", "tr", "ldtr"];

/// Actions on the whole VM (or one vCPU, for `inject_nmi`).
pub const ACTIONS: [&str; 4] = ["force_reset", "force_poweroff", "destroy", "inject_nmi"];

/// The capabilities FreeBSD's libvmmapi names (`capstrmap`), in `VM_CAP_*` order.
pub const CAPABILITIES: [&str; 5] = [
    "hlt_exit",
    "mtrap_exit",
    "pause_exit",
    "unrestricted_guest",
    "enable_invpcid",
];

/// A segment descriptor as FreeBSD's `VM_GET_SEGMENT_DESCRIPTOR` gives it: `access` in the
/// VMX access-rights layout (type, S, DPL, P, AVL, L, D/B, G, bit 16 unusable).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Descriptor {
    pub base: u64,
    pub limit: u32,
    pub access: u32,
}

impl Descriptor {
    /// From the backend-neutral segment register (the access rights as FreeBSD's kernel
    /// encodes them, [`crate::vmm::freebsd::regs`]).
    pub fn from_segment(s: &crate::vmm::Segment) -> Descriptor {
        let d = crate::vmm::freebsd::regs::segment_to_desc(s);
        Descriptor {
            base: d.base,
            limit: d.limit,
            access: d.access,
        }
    }

    /// Write this descriptor into `s`, keeping its selector.
    pub fn apply_to(&self, s: &mut crate::vmm::Segment) {
        let d = vmm_sys::seg_desc {
            base: self.base,
            limit: self.limit,
            access: self.access,
        };
        *s = crate::vmm::freebsd::regs::segment_from_desc(&d, s.selector);
    }
}

/// One vCPU's registers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VcpuRegisters {
    /// Values in [`REGISTERS`] order.
    pub values: [u64; REGISTERS.len()],
    /// Selectors and descriptors in [`SEGMENTS`] order.
    pub segments: [(u16, Descriptor); SEGMENTS.len()],
    pub gdtr: Descriptor,
    pub idtr: Descriptor,
}

impl VcpuRegisters {
    pub fn get(&self, name: &str) -> Option<u64> {
        REGISTERS
            .iter()
            .position(|r| *r == name)
            .map(|i| self.values[i])
    }

    pub fn segment(&self, name: &str) -> Option<(u16, Descriptor)> {
        SEGMENTS
            .iter()
            .position(|s| *s == name)
            .map(|i| self.segments[i])
    }
}

/// A memory segment (`VM_GET_MEMSEG`): an id, a length, a name (empty: guest RAM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemorySegment {
    pub id: u32,
    pub len: u64,
    pub name: String,
}

/// A mapping of a segment into guest physical memory (`VM_MMAP_GETNEXT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryMapping {
    pub gpa: u64,
    pub len: u64,
    pub segment: u32,
    pub offset: u64,
    /// `PROT_READ` 1, `PROT_WRITE` 2, `PROT_EXEC` 4.
    pub prot: u32,
    /// `VM_MEMMAP_F_WIRED` 1, `VM_MEMMAP_F_IOMMU` 2.
    pub flags: u32,
}

/// Everything `bhyvectl`'s `--get-*` options show about a VM, from vCPU `vcpu`'s point of view.
/// A part the platform cannot tell is `None` (and left out of the output).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmState {
    pub vcpu: u32,
    pub registers: Option<VcpuRegisters>,
    /// `enum x2apic_state`: 0 disabled, 1 enabled.
    pub x2apic_state: Option<u64>,
    /// `(pending, current)` event information (`VM_GET_INTINFO`).
    pub intinfo: Option<(u64, u64)>,
    /// Each of [`CAPABILITIES`]: `Some(set)` or `None` (not available).
    pub capabilities: Vec<(String, Option<bool>)>,
    pub active_cpus: Vec<u32>,
    /// CPUs stopped for a debugger (`VM_DEBUG_CPUS`); only `/dev/vmm` tells, so it does not
    /// travel over the control socket.
    pub debug_cpus: Option<Vec<u32>>,
    pub suspended_cpus: Vec<u32>,
    /// vmm statistics of `vcpu`: description and value.
    pub statistics: Vec<(String, u64)>,
    /// sockets, cores, threads, maxcpus.
    pub topology: (u16, u16, u16, u16),
    pub memory_segments: Vec<MemorySegment>,
    pub memory_map: Vec<MemoryMapping>,
}

fn number(list: &NvList, name: &str) -> Result<u64, String> {
    list.get_number(name)
        .ok_or_else(|| format!("'{name}' is missing or not a number"))
}

fn numbers<'a>(list: &'a NvList, name: &str, len: usize) -> Result<&'a [u64], String> {
    match list.get(name) {
        Some(NvValue::NumberArray(values)) if values.len() == len => Ok(values),
        _ => Err(format!(
            "'{name}' is missing or not an array of {len} numbers"
        )),
    }
}

fn strings(list: &NvList, name: &str) -> Result<Vec<String>, String> {
    match list.get(name) {
        Some(NvValue::StringArray(values)) => Ok(values
            .iter()
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect()),
        // libnv cannot carry an empty array: an absent one is empty.
        None => Ok(Vec::new()),
        Some(_) => Err(format!("'{name}' is not an array of strings")),
    }
}

fn number_array(list: &NvList, name: &str) -> Result<Vec<u64>, String> {
    match list.get(name) {
        Some(NvValue::NumberArray(values)) => Ok(values.clone()),
        None => Ok(Vec::new()),
        Some(_) => Err(format!("'{name}' is not an array of numbers")),
    }
}

fn add(list: &mut NvList, name: &str, value: NvValue) {
    // Names are fixed and distinct, and arrays are only added when not empty: nothing to fail.
    let empty = matches!(&value, NvValue::NumberArray(v) if v.is_empty())
        || matches!(&value, NvValue::StringArray(v) if v.is_empty());
    if !empty {
        let _ = list.add(name, value);
    }
}

fn small<T: TryFrom<u64>>(value: u64, name: &str) -> Result<T, String> {
    T::try_from(value).map_err(|_| format!("'{name}' is out of range"))
}

/// Check the request's version.
pub fn check_version(request: &NvList) -> Result<(), String> {
    match request.get_number("version") {
        Some(VERSION) => Ok(()),
        Some(v) => Err(format!(
            "request version {v} is not supported (this bhyve speaks version {VERSION})"
        )),
        None => Err("request lacks a number 'version'".into()),
    }
}

/// The vCPU a request names, below `cpus`.
pub fn requested_vcpu(request: &NvList, cpus: usize) -> Result<u32, String> {
    let vcpu = number(request, "vcpu")?;
    if vcpu >= cpus as u64 {
        return Err(format!("vcpu {vcpu} does not exist (the VM has {cpus})"));
    }
    small(vcpu, "vcpu")
}

pub fn request(cmd: &str, vcpu: u32) -> NvList {
    let mut list = NvList::new();
    let _ = list.add_string("cmd", cmd);
    let _ = list.add_number("version", VERSION);
    let _ = list.add_number("vcpu", u64::from(vcpu));
    list
}

impl VcpuRegisters {
    pub fn encode(&self) -> NvList {
        let mut list = NvList::new();
        for (name, value) in REGISTERS.iter().zip(self.values) {
            add(&mut list, name, NvValue::Number(value));
        }
        for (name, (selector, d)) in SEGMENTS.iter().zip(self.segments) {
            let value = vec![
                u64::from(selector),
                d.base,
                u64::from(d.limit),
                u64::from(d.access),
            ];
            add(&mut list, name, NvValue::NumberArray(value));
        }
        for (name, d) in [("gdtr", self.gdtr), ("idtr", self.idtr)] {
            add(
                &mut list,
                name,
                NvValue::NumberArray(vec![d.base, u64::from(d.limit)]),
            );
        }
        list
    }

    pub fn decode(list: &NvList) -> Result<VcpuRegisters, String> {
        let mut r = VcpuRegisters::default();
        for (slot, name) in r.values.iter_mut().zip(REGISTERS) {
            *slot = number(list, name)?;
        }
        for (slot, name) in r.segments.iter_mut().zip(SEGMENTS) {
            let v = numbers(list, name, 4)?;
            *slot = (
                small(v[0], name)?,
                Descriptor {
                    base: v[1],
                    limit: small(v[2], name)?,
                    access: small(v[3], name)?,
                },
            );
        }
        for (slot, name) in [(&mut r.gdtr, "gdtr"), (&mut r.idtr, "idtr")] {
            let v = numbers(list, name, 2)?;
            *slot = Descriptor {
                base: v[0],
                limit: small(v[1], name)?,
                access: 0,
            };
        }
        Ok(r)
    }
}

impl VmState {
    pub fn encode(&self) -> NvList {
        let mut list = NvList::new();
        add(&mut list, "vcpu", NvValue::Number(u64::from(self.vcpu)));
        if let Some(registers) = &self.registers {
            let _ = list.add_nvlist("registers", registers.encode());
        }
        if let Some(state) = self.x2apic_state {
            add(&mut list, "x2apic_state", NvValue::Number(state));
        }
        if let Some((pending, current)) = self.intinfo {
            add(
                &mut list,
                "intinfo",
                NvValue::NumberArray(vec![pending, current]),
            );
        }
        let caps = |f: fn(&Option<bool>) -> u64| {
            NvValue::NumberArray(self.capabilities.iter().map(|(_, v)| f(v)).collect())
        };
        add(
            &mut list,
            "capability_names",
            NvValue::StringArray(
                self.capabilities
                    .iter()
                    .map(|(n, _)| n.as_bytes().to_vec())
                    .collect(),
            ),
        );
        // 0 not set, 1 set, 2 not available.
        add(
            &mut list,
            "capability_values",
            caps(|v| v.map_or(2, u64::from)),
        );
        let cpus = |set: &[u32]| NvValue::NumberArray(set.iter().map(|&c| u64::from(c)).collect());
        add(&mut list, "active_cpus", cpus(&self.active_cpus));
        add(&mut list, "suspended_cpus", cpus(&self.suspended_cpus));
        add(
            &mut list,
            "statistic_names",
            NvValue::StringArray(
                self.statistics
                    .iter()
                    .map(|(n, _)| n.as_bytes().to_vec())
                    .collect(),
            ),
        );
        add(
            &mut list,
            "statistic_values",
            NvValue::NumberArray(self.statistics.iter().map(|&(_, v)| v).collect()),
        );
        let (s, c, t, m) = self.topology;
        add(
            &mut list,
            "topology",
            NvValue::NumberArray(vec![s.into(), c.into(), t.into(), m.into()]),
        );
        add(
            &mut list,
            "memseg_names",
            NvValue::StringArray(
                self.memory_segments
                    .iter()
                    .map(|s| s.name.as_bytes().to_vec())
                    .collect(),
            ),
        );
        add(
            &mut list,
            "memsegs",
            NvValue::NumberArray(
                self.memory_segments
                    .iter()
                    .flat_map(|s| [u64::from(s.id), s.len])
                    .collect(),
            ),
        );
        add(
            &mut list,
            "memmap",
            NvValue::NumberArray(
                self.memory_map
                    .iter()
                    .flat_map(|m| {
                        [
                            m.gpa,
                            m.len,
                            u64::from(m.segment),
                            m.offset,
                            u64::from(m.prot),
                            u64::from(m.flags),
                        ]
                    })
                    .collect(),
            ),
        );
        list
    }

    pub fn decode(list: &NvList) -> Result<VmState, String> {
        let vcpu = small(number(list, "vcpu")?, "vcpu")?;
        let registers = match list.get("registers") {
            None => None,
            Some(NvValue::NvList(r)) => Some(VcpuRegisters::decode(r)?),
            Some(_) => return Err("'registers' is not a list".into()),
        };
        let x2apic_state = list.get_number("x2apic_state");
        let intinfo = match list.get("intinfo") {
            None => None,
            Some(_) => {
                let v = numbers(list, "intinfo", 2)?;
                Some((v[0], v[1]))
            }
        };
        let names = strings(list, "capability_names")?;
        let values = number_array(list, "capability_values")?;
        if names.len() != values.len() {
            return Err("capability names and values differ in number".into());
        }
        let capabilities = names
            .into_iter()
            .zip(values)
            .map(|(n, v)| (n, (v < 2).then_some(v == 1)))
            .collect();
        let cpus = |name: &str| -> Result<Vec<u32>, String> {
            number_array(list, name)?
                .into_iter()
                .map(|c| small(c, name))
                .collect()
        };
        let names = strings(list, "statistic_names")?;
        let values = number_array(list, "statistic_values")?;
        if names.len() != values.len() {
            return Err("statistic names and values differ in number".into());
        }
        let t = numbers(list, "topology", 4)?;
        let topology = (
            small(t[0], "topology")?,
            small(t[1], "topology")?,
            small(t[2], "topology")?,
            small(t[3], "topology")?,
        );
        let seg_names = strings(list, "memseg_names")?;
        let segs = number_array(list, "memsegs")?;
        if segs.len() != 2 * seg_names.len() {
            return Err("memory segment names and sizes differ in number".into());
        }
        let memory_segments = seg_names
            .into_iter()
            .zip(segs.chunks_exact(2))
            .map(|(name, v)| {
                Ok(MemorySegment {
                    id: small(v[0], "memsegs")?,
                    len: v[1],
                    name,
                })
            })
            .collect::<Result<_, String>>()?;
        let map = number_array(list, "memmap")?;
        if map.len() % 6 != 0 {
            return Err("'memmap' is not made of 6-number entries".into());
        }
        let memory_map = map
            .chunks_exact(6)
            .map(|v| {
                Ok(MemoryMapping {
                    gpa: v[0],
                    len: v[1],
                    segment: small(v[2], "memmap")?,
                    offset: v[3],
                    prot: small(v[4], "memmap")?,
                    flags: small(v[5], "memmap")?,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(VmState {
            vcpu,
            registers,
            x2apic_state,
            intinfo,
            capabilities,
            active_cpus: cpus("active_cpus")?,
            debug_cpus: None,
            suspended_cpus: cpus("suspended_cpus")?,
            statistics: strings(list, "statistic_names")?
                .into_iter()
                .zip(values)
                .collect(),
            topology,
            memory_segments,
            memory_map,
        })
    }
}

/// Register writes requested by `bhyvectl --set-*`, in the order FreeBSD makes them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegisterWrites {
    /// `(name from REGISTERS, value)`.
    pub registers: Vec<(String, u64)>,
    /// `(name from SEGMENTS or "gdtr"/"idtr", descriptor)`.
    pub descriptors: Vec<(String, Descriptor)>,
    /// `(name from SEGMENTS, selector)`.
    pub selectors: Vec<(String, u64)>,
}

/// Descriptor writes in FreeBSD's order (`bhyvectl_md_main`).
pub const DESCRIPTOR_WRITE_ORDER: [&str; 10] = [
    "ds", "es", "ss", "cs", "fs", "gs", "tr", "ldtr", "gdtr", "idtr",
];
/// Selector writes in FreeBSD's order.
pub const SELECTOR_WRITE_ORDER: [&str; 8] = ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldtr"];

impl RegisterWrites {
    pub fn is_empty(&self) -> bool {
        self.registers.is_empty() && self.descriptors.is_empty() && self.selectors.is_empty()
    }

    pub fn request(&self, vcpu: u32) -> NvList {
        let mut list = request(CMD_SET_REGISTERS, vcpu);
        for (name, value) in &self.registers {
            add(&mut list, name, NvValue::Number(*value));
        }
        for (name, d) in &self.descriptors {
            let value = vec![d.base, u64::from(d.limit), u64::from(d.access)];
            add(
                &mut list,
                &format!("{name}_desc"),
                NvValue::NumberArray(value),
            );
        }
        for (name, value) in &self.selectors {
            add(&mut list, &format!("{name}_sel"), NvValue::Number(*value));
        }
        list
    }

    /// The writes a `set_registers` request asks for; unknown or malformed fields are refused.
    pub fn from_request(request: &NvList) -> Result<RegisterWrites, String> {
        let known = |name: &str| {
            ["cmd", "version", "vcpu"].contains(&name)
                || REGISTERS.contains(&name)
                || name
                    .strip_suffix("_desc")
                    .is_some_and(|n| DESCRIPTOR_WRITE_ORDER.contains(&n))
                || name
                    .strip_suffix("_sel")
                    .is_some_and(|n| SELECTOR_WRITE_ORDER.contains(&n))
        };
        for pair in request.pairs() {
            let name = String::from_utf8_lossy(pair.name());
            if !known(&name) {
                return Err(format!("unknown register '{name}'"));
            }
        }
        let mut writes = RegisterWrites::default();
        for name in REGISTERS {
            if request.exists(name) {
                writes.registers.push((name.into(), number(request, name)?));
            }
        }
        for name in DESCRIPTOR_WRITE_ORDER {
            let key = format!("{name}_desc");
            if request.exists(&key) {
                let v = numbers(request, &key, 3)?;
                let d = Descriptor {
                    base: v[0],
                    limit: small(v[1], &key)?,
                    access: small(v[2], &key)?,
                };
                writes.descriptors.push((name.into(), d));
            }
        }
        for name in SELECTOR_WRITE_ORDER {
            let key = format!("{name}_sel");
            if request.exists(&key) {
                let value = number(request, &key)?;
                if value > 0xffff {
                    return Err(format!("selector '{name}' {value:#x} is out of range"));
                }
                writes.selectors.push((name.into(), value));
            }
        }
        Ok(writes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmState {
        let mut registers = VcpuRegisters::default();
        for (i, v) in registers.values.iter_mut().enumerate() {
            *v = 0x1111_0000_0000_0000 | i as u64;
        }
        registers.segments[5] = (
            0x2b,
            Descriptor {
                base: 0,
                limit: 0xffff_ffff,
                access: 0xa0fb,
            },
        );
        registers.gdtr = Descriptor {
            base: 0x1000,
            limit: 0x37,
            access: 0,
        };
        VmState {
            vcpu: 1,
            registers: Some(registers),
            x2apic_state: Some(0),
            intinfo: None,
            capabilities: vec![("hlt_exit".into(), Some(true)), ("mtrap_exit".into(), None)],
            active_cpus: vec![0, 1],
            debug_cpus: None,
            suspended_cpus: vec![],
            statistics: vec![("Resident memory".into(), 4096)],
            topology: (1, 2, 1, 2),
            memory_segments: vec![MemorySegment {
                id: 0,
                len: 1 << 30,
                name: String::new(),
            }],
            memory_map: vec![MemoryMapping {
                gpa: 0,
                len: 1 << 30,
                segment: 0,
                offset: 0,
                prot: 7,
                flags: 0,
            }],
        }
    }

    #[test]
    fn state_survives_the_wire() {
        let state = sample();
        let (bytes, _) = state.encode().pack();
        let back = NvList::unpack(&bytes, Vec::new()).unwrap();
        assert_eq!(VmState::decode(&back).unwrap(), state);
    }

    #[test]
    fn damaged_state_is_an_error_not_a_panic() {
        let mut list = sample().encode();
        list.take("topology");
        assert!(VmState::decode(&list).is_err());
        let mut list = sample().encode();
        list.take("memmap");
        list.add("memmap", NvValue::NumberArray(vec![1, 2, 3]))
            .unwrap();
        assert!(VmState::decode(&list).is_err());
        let mut list = sample().encode();
        let mut regs = list.take("registers");
        if let Some(NvValue::NvList(r)) = regs.as_mut() {
            r.take("rip");
        }
        list.add("registers", regs.unwrap()).unwrap();
        assert!(VmState::decode(&list).unwrap_err().contains("'rip'"));
    }

    #[test]
    fn register_writes_keep_freebsd_order_and_refuse_unknown_names() {
        let mut w = RegisterWrites::default();
        w.registers.push(("rax".into(), 5));
        w.registers.push(("cr0".into(), 0x11));
        w.descriptors.push(("gdtr".into(), Descriptor::default()));
        w.selectors.push(("ss".into(), 0x10));
        let back = RegisterWrites::from_request(&w.request(0)).unwrap();
        assert_eq!(
            back.registers,
            vec![("cr0".into(), 0x11), ("rax".into(), 5)]
        );
        assert_eq!(back.selectors, vec![("ss".into(), 0x10)]);
        let mut bad = w.request(0);
        bad.add_number("rzz", 1).unwrap();
        assert_eq!(
            RegisterWrites::from_request(&bad).unwrap_err(),
            "unknown register 'rzz'"
        );
        let mut bad = request(CMD_SET_REGISTERS, 0);
        bad.add_number("cs_sel", 0x1_0000).unwrap();
        assert!(RegisterWrites::from_request(&bad).is_err());
        let mut bad = request(CMD_SET_REGISTERS, 0);
        bad.add_string("rax", "1").unwrap();
        assert!(RegisterWrites::from_request(&bad).is_err());
    }

    #[test]
    fn versions_are_checked() {
        let mut r = NvList::new();
        assert!(check_version(&r).is_err());
        r.add_number("version", 2).unwrap();
        assert!(check_version(&r).unwrap_err().contains("version 2"));
        assert!(check_version(&request(CMD_VM_STATE, 0)).is_ok());
        assert!(requested_vcpu(&request(CMD_VM_STATE, 3), 2).is_err());
        assert_eq!(requested_vcpu(&request(CMD_VM_STATE, 1), 2), Ok(1));
    }

    #[test]
    fn access_rights_round_trip() {
        let s = crate::vmm::Segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x10,
            type_: 0xb,
            present: true,
            dpl: 0,
            db: false,
            s: true,
            l: true,
            g: true,
            avl: false,
            unusable: false,
        };
        let d = Descriptor::from_segment(&s);
        // A 64-bit ring-0 code segment as the VMX access rights encode it.
        assert_eq!(d.access, 0xa09b);
        let mut back = crate::vmm::Segment {
            selector: 0x10,
            ..Default::default()
        };
        d.apply_to(&mut back);
        assert_eq!(back, s);
    }
}
