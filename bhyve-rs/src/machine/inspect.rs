//! `bhyvectl --get-*` / `--set-*` against a running machine: vCPU registers read and written
//! with every vCPU paused, statistics, the memory map, and the VM-wide actions
//! (`--force-reset`, `--force-poweroff`, `--destroy`, `--inject-nmi`).

use crate::control::vmstate::{
    Descriptor, MemoryMapping, MemorySegment, RegisterWrites, VcpuRegisters, VmState, CAPABILITIES,
    SEGMENTS,
};
use crate::vcpu::{ExitReason, VcpuSet};
use crate::vmm::{DebugRegs, Regs, Segment, SpecialRegs, Vcpu, VmmError};

use std::sync::Arc;

use crate::vcpu::VmControl;
use crate::vmm::{Topology, Vm, VmCapabilities};

use super::Machine;

/// The parts of a running machine `bhyvectl` looks at, shareable with the control thread.
pub struct Inspector {
    vcpus: Arc<VcpuSet>,
    vm: Arc<dyn Vm>,
    control: Arc<VmControl>,
    topology: Topology,
    capabilities: VmCapabilities,
    wired: bool,
    /// Guest physical address and length of the boot ROM, if any.
    bootrom: Option<(u64, u64)>,
}

impl Machine {
    pub fn inspector(&self) -> Inspector {
        Inspector {
            vcpus: self.vcpus.clone(),
            vm: self.vm.clone(),
            control: self.control.clone(),
            topology: self.topology,
            capabilities: self.capabilities,
            wired: self.wired,
            bootrom: self
                .bootrom
                .as_ref()
                .map(|rom| (rom.code().gpa(), rom.code().len())),
        }
    }
}

/// FreeBSD's memory segment ids (`enum vm_mem_segid`... bhyve's `VM_SYSMEM`, `VM_BOOTROM`).
const SYSMEM: u32 = 0;
const BOOTROM: u32 = 1;
const PROT_ALL: u32 = 7;
const PROT_READ_EXEC: u32 = 5;
const VM_MEMMAP_F_WIRED: u32 = 1;

/// The registers of `vcpu`, read with every vCPU paused.
fn read_registers(vcpus: &VcpuSet, vcpu: usize) -> Result<VcpuRegisters, String> {
    let read = |v: &mut dyn Vcpu| -> Result<VcpuRegisters, VmmError> {
        let (r, s, d) = (v.regs()?, v.special_regs()?, v.debug_regs()?);
        Ok(registers_of(&r, &s, &d))
    };
    paused(vcpus, |vcpus| vcpus.with_vcpu(vcpu, read))
}

/// Run `f` with every vCPU paused, and resume them whatever it returns.
fn paused<T, E: std::fmt::Display>(
    vcpus: &VcpuSet,
    f: impl FnOnce(&VcpuSet) -> Result<Result<T, VmmError>, E>,
) -> Result<T, String> {
    vcpus
        .pause_all()
        .map_err(|e| format!("cannot pause the vCPUs: {e}"))?;
    let result = f(vcpus);
    vcpus.resume_all();
    match result {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

fn segments(s: &SpecialRegs) -> [&Segment; 8] {
    [&s.ds, &s.es, &s.fs, &s.gs, &s.ss, &s.cs, &s.tr, &s.ldt]
}

fn segments_mut(s: &mut SpecialRegs) -> [&mut Segment; 8] {
    [
        &mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss, &mut s.cs, &mut s.tr, &mut s.ldt,
    ]
}

/// FreeBSD's view of the backend-neutral registers.
pub fn registers_of(r: &Regs, s: &SpecialRegs, d: &DebugRegs) -> VcpuRegisters {
    let values = [
        s.efer, s.cr0, s.cr2, s.cr3, s.cr4, d.dr[0], d.dr[1], d.dr[2], d.dr[3], d.dr6, d.dr7,
        r.rsp, r.rip, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9, r.r10, r.r11,
        r.r12, r.r13, r.r14, r.r15, r.rflags,
    ];
    let mut segs = [(0u16, Descriptor::default()); SEGMENTS.len()];
    for (slot, seg) in segs.iter_mut().zip(segments(s)) {
        *slot = (seg.selector, Descriptor::from_segment(seg));
    }
    let table = |t: &crate::vmm::DescriptorTable| Descriptor {
        base: t.base,
        limit: u32::from(t.limit),
        access: 0,
    };
    VcpuRegisters {
        values,
        segments: segs,
        gdtr: table(&s.gdt),
        idtr: table(&s.idt),
    }
}

/// Apply `writes` to the registers, in FreeBSD's order.
pub fn apply_writes(
    writes: &RegisterWrites,
    r: &mut Regs,
    s: &mut SpecialRegs,
    d: &mut DebugRegs,
) -> Result<(), String> {
    for (name, value) in &writes.registers {
        let value = *value;
        let slot: &mut u64 = match name.as_str() {
            "efer" => &mut s.efer,
            "cr0" => &mut s.cr0,
            "cr2" => &mut s.cr2,
            "cr3" => &mut s.cr3,
            "cr4" => &mut s.cr4,
            "dr0" => &mut d.dr[0],
            "dr1" => &mut d.dr[1],
            "dr2" => &mut d.dr[2],
            "dr3" => &mut d.dr[3],
            "dr6" => &mut d.dr6,
            "dr7" => &mut d.dr7,
            "rsp" => &mut r.rsp,
            "rip" => &mut r.rip,
            "rax" => &mut r.rax,
            "rbx" => &mut r.rbx,
            "rcx" => &mut r.rcx,
            "rdx" => &mut r.rdx,
            "rsi" => &mut r.rsi,
            "rdi" => &mut r.rdi,
            "rbp" => &mut r.rbp,
            "r8" => &mut r.r8,
            "r9" => &mut r.r9,
            "r10" => &mut r.r10,
            "r11" => &mut r.r11,
            "r12" => &mut r.r12,
            "r13" => &mut r.r13,
            "r14" => &mut r.r14,
            "r15" => &mut r.r15,
            "rflags" => &mut r.rflags,
            other => return Err(format!("unknown register '{other}'")),
        };
        *slot = value;
    }
    for (name, desc) in &writes.descriptors {
        match name.as_str() {
            "gdtr" | "idtr" => {
                let table = if name == "gdtr" {
                    &mut s.gdt
                } else {
                    &mut s.idt
                };
                table.base = desc.base;
                table.limit = u16::try_from(desc.limit)
                    .map_err(|_| format!("{name} limit {:#x} exceeds 16 bits", desc.limit))?;
            }
            _ => {
                let index = SEGMENTS
                    .iter()
                    .position(|s| s == name)
                    .ok_or_else(|| format!("unknown segment '{name}'"))?;
                desc.apply_to(segments_mut(s)[index]);
            }
        }
    }
    for (name, selector) in &writes.selectors {
        let index = SEGMENTS
            .iter()
            .position(|s| s == name)
            .ok_or_else(|| format!("unknown segment '{name}'"))?;
        segments_mut(s)[index].selector = *selector as u16;
    }
    Ok(())
}

impl Inspector {
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// What `bhyvectl --get-*` shows, for `vcpu`.
    pub fn inspect(&self, vcpu: u32) -> Result<VmState, String> {
        let index = vcpu as usize;
        let registers = read_registers(&self.vcpus, index)?;
        let mut statistics: Vec<(String, u64)> = self
            .vcpus
            .statistics(index)
            .unwrap_or_default()
            .into_iter()
            .map(|s| (s.description, s.value))
            .collect();
        // FreeBSD counts the VM's memory on vCPU 0 only; the others show 0.
        let memory = self.vm.memory();
        let resident = memory
            .regions()
            .iter()
            .map(|r| r.resident_bytes())
            .sum::<Option<u64>>();
        if let Some(resident) = resident {
            statistics.push((
                "Resident memory".into(),
                if vcpu == 0 { resident } else { 0 },
            ));
        }
        let wired = if vcpu == 0 && self.wired {
            memory.size()
        } else {
            0
        };
        statistics.push(("Wired memory".into(), wired));
        let caps = self.capabilities;
        let capabilities = CAPABILITIES
            .iter()
            .map(|&name| {
                let value = match name {
                    "hlt_exit" => Some(caps.exit_on_hlt),
                    "pause_exit" => Some(caps.exit_on_pause),
                    _ => None,
                };
                (name.to_string(), value)
            })
            .collect();
        let t = self.topology;
        let (memory_segments, memory_map) = self.memory_layout();
        Ok(VmState {
            vcpu,
            registers: Some(registers),
            x2apic_state: Some(u64::from(caps.x2apic)),
            intinfo: None,
            capabilities,
            active_cpus: (0..u32::from(t.cpus)).collect(),
            debug_cpus: None,
            suspended_cpus: Vec::new(),
            statistics,
            topology: (t.sockets, t.cores, t.threads, t.cpus),
            memory_segments,
            memory_map,
        })
    }

    /// Guest RAM as FreeBSD's bhyve lays it out: one system memory segment mapped below 4 GiB
    /// and above it, and the boot ROM's segment read-only below 4 GiB.
    fn memory_layout(&self) -> (Vec<MemorySegment>, Vec<MemoryMapping>) {
        let memory = self.vm.memory();
        let mut segments = vec![MemorySegment {
            id: SYSMEM,
            len: memory.size(),
            name: String::new(),
        }];
        let flags = if self.wired { VM_MEMMAP_F_WIRED } else { 0 };
        let mut offset = 0;
        let mut map: Vec<MemoryMapping> = memory
            .regions()
            .iter()
            .map(|region| {
                let mapping = MemoryMapping {
                    gpa: region.gpa(),
                    len: region.len(),
                    segment: SYSMEM,
                    offset,
                    prot: PROT_ALL,
                    flags,
                };
                offset += region.len();
                mapping
            })
            .collect();
        if let Some((gpa, len)) = self.bootrom {
            segments.push(MemorySegment {
                id: BOOTROM,
                len,
                name: "bootrom".into(),
            });
            map.push(MemoryMapping {
                gpa,
                len,
                segment: BOOTROM,
                offset: 0,
                prot: PROT_READ_EXEC,
                flags: 0,
            });
        }
        map.sort_by_key(|m| m.gpa);
        (segments, map)
    }

    /// `bhyvectl --set-*`: write `writes` to `vcpu`'s registers with every vCPU paused.
    pub fn write_registers(&self, vcpu: u32, writes: &RegisterWrites) -> Result<(), String> {
        let write = |v: &mut dyn Vcpu| -> Result<Result<(), String>, VmmError> {
            let (mut r, mut s, mut d) = (v.regs()?, v.special_regs()?, v.debug_regs()?);
            let (r0, s0, d0) = (r, s, d);
            if let Err(why) = apply_writes(writes, &mut r, &mut s, &mut d) {
                return Ok(Err(why));
            }
            // Only what changed is written back: a backend may refuse a write it need not see.
            if s != s0 {
                v.set_special_regs(&s)?;
            }
            if d != d0 {
                v.set_debug_regs(&d)?;
            }
            if r != r0 {
                v.set_regs(&r)?;
            }
            Ok(Ok(()))
        };
        paused(&self.vcpus, |vcpus| vcpus.with_vcpu(vcpu as usize, write))?
    }

    /// `bhyvectl --force-reset`, `--force-poweroff`, `--destroy`, `--inject-nmi`.
    pub fn act(&self, action: &str, vcpu: u32) -> Result<(), String> {
        match action {
            // vm_suspend(VM_SUSPEND_RESET / POWEROFF): bhyve exits as if the guest had asked.
            "force_reset" => self.control.request_exit(ExitReason::Reset),
            "force_poweroff" => self.control.request_exit(ExitReason::PowerOff),
            // A destroyed VM fails bhyve's next VM_RUN: bhyve reports it and exits 4.
            "destroy" => self
                .control
                .request_exit(ExitReason::Error("the VM was destroyed".into())),
            "inject_nmi" => paused(&self.vcpus, |vcpus| {
                vcpus.with_vcpu(vcpu as usize, |v| v.inject_nmi())
            })?,
            other => return Err(format!("unknown action '{other}'")),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::vmstate::REGISTERS;

    #[test]
    fn register_names_follow_the_values_order() {
        let r = Regs {
            rip: 0x1234,
            r15: 15,
            rflags: 2,
            ..Default::default()
        };
        let s = SpecialRegs {
            efer: 0x500,
            cr3: 0x9000,
            ..Default::default()
        };
        let d = DebugRegs {
            dr: [1, 2, 3, 4],
            dr6: 0xffff_0ff0,
            dr7: 0x400,
        };
        let v = registers_of(&r, &s, &d);
        assert_eq!(v.get("rip"), Some(0x1234));
        assert_eq!(v.get("r15"), Some(15));
        assert_eq!(v.get("rflags"), Some(2));
        assert_eq!(v.get("efer"), Some(0x500));
        assert_eq!(v.get("cr3"), Some(0x9000));
        assert_eq!(v.get("dr3"), Some(4));
        assert_eq!(v.get("dr6"), Some(0xffff_0ff0));
        assert_eq!(REGISTERS.len(), v.values.len());
    }

    #[test]
    fn writes_land_in_the_named_registers() {
        let (mut r, mut s, mut d) = Default::default();
        let writes = RegisterWrites {
            registers: vec![("rax".into(), 7), ("cr4".into(), 0x20), ("dr0".into(), 9)],
            descriptors: vec![(
                "gdtr".into(),
                Descriptor {
                    base: 0x5000,
                    limit: 0x3f,
                    access: 0,
                },
            )],
            selectors: vec![("ss".into(), 0x23)],
        };
        apply_writes(&writes, &mut r, &mut s, &mut d).unwrap();
        assert_eq!((r.rax, s.cr4, d.dr[0]), (7, 0x20, 9));
        assert_eq!(
            (s.gdt.base, s.gdt.limit, s.ss.selector),
            (0x5000, 0x3f, 0x23)
        );
        let too_wide = RegisterWrites {
            descriptors: vec![(
                "idtr".into(),
                Descriptor {
                    base: 0,
                    limit: 0x1_0000,
                    access: 0,
                },
            )],
            ..Default::default()
        };
        assert!(apply_writes(&too_wide, &mut r, &mut s, &mut d).is_err());
    }
}
