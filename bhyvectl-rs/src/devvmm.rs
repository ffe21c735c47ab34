//! bhyvectl on FreeBSD: the VM's `/dev/vmm/NAME` device, through bhyve-rs's libvmmapi-like
//! layer, as FreeBSD's bhyvectl uses libvmmapi (whatever bhyve runs the VM).

use std::io;

use bhyve::control::vmstate::{
    Descriptor, MemoryMapping, MemorySegment, RegisterWrites, VcpuRegisters, VmState, CAPABILITIES,
    REGISTERS, SEGMENTS,
};
use bhyve::vmm::freebsd::vmmapi::{self, VmmDev};
use vmm_sys::*;

use crate::show::{RunExit, RunExitKind};
use crate::target::Target;

/// The kernel's number for each of [`REGISTERS`].
const REGISTER_NUMBERS: [vm_reg_name; REGISTERS.len()] = [
    VM_REG_GUEST_EFER,
    VM_REG_GUEST_CR0,
    VM_REG_GUEST_CR2,
    VM_REG_GUEST_CR3,
    VM_REG_GUEST_CR4,
    VM_REG_GUEST_DR0,
    VM_REG_GUEST_DR1,
    VM_REG_GUEST_DR2,
    VM_REG_GUEST_DR3,
    VM_REG_GUEST_DR6,
    VM_REG_GUEST_DR7,
    VM_REG_GUEST_RSP,
    VM_REG_GUEST_RIP,
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
    VM_REG_GUEST_RFLAGS,
];

/// The kernel's number for each of [`SEGMENTS`].
const SEGMENT_NUMBERS: [vm_reg_name; SEGMENTS.len()] = [
    VM_REG_GUEST_DS,
    VM_REG_GUEST_ES,
    VM_REG_GUEST_FS,
    VM_REG_GUEST_GS,
    VM_REG_GUEST_SS,
    VM_REG_GUEST_CS,
    VM_REG_GUEST_TR,
    VM_REG_GUEST_LDTR,
];

/// The kernel's number for a register, segment or descriptor table named as in
/// [`bhyve::control::vmstate`].
fn number(name: &str) -> Option<vm_reg_name> {
    if let Some(i) = REGISTERS.iter().position(|r| *r == name) {
        return Some(REGISTER_NUMBERS[i]);
    }
    if let Some(i) = SEGMENTS.iter().position(|s| *s == name) {
        return Some(SEGMENT_NUMBERS[i]);
    }
    match name {
        "gdtr" => Some(VM_REG_GUEST_GDTR),
        "idtr" => Some(VM_REG_GUEST_IDTR),
        _ => None,
    }
}

/// `what: strerror(errno)`.
fn failed(what: &str) -> impl FnOnce(io::Error) -> String + '_ {
    move |e| format!("{what}: {}", bhyve::vmm::describe_io_error(&e))
}

/// An open `/dev/vmm/NAME`.
pub struct DevVmm {
    dev: VmmDev,
}

impl DevVmm {
    /// Open VM `name`, creating it first with `create` (`--create`).
    pub fn open(name: &str, create: bool) -> Result<DevVmm, String> {
        let opened = if create {
            match vmmapi::create(name, false) {
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => VmmDev::open(name),
                other => other,
            }
        } else {
            VmmDev::open(name)
        };
        opened.map(|dev| DevVmm { dev }).map_err(|e| {
            format!(
                "vm_open: {name} could not be opened: {}",
                bhyve::vmm::describe_io_error(&e)
            )
        })
    }

    fn registers(&self, vcpu: u32) -> io::Result<VcpuRegisters> {
        let mut r = VcpuRegisters::default();
        for (slot, reg) in r.values.iter_mut().zip(REGISTER_NUMBERS) {
            *slot = self.dev.register(vcpu, reg)?;
        }
        for (slot, reg) in r.segments.iter_mut().zip(SEGMENT_NUMBERS) {
            let d = self.dev.descriptor(vcpu, reg)?;
            // The selector is the register's value.
            let selector = self.dev.register(vcpu, reg)? as u16;
            *slot = (
                selector,
                Descriptor {
                    base: d.base,
                    limit: d.limit,
                    access: d.access,
                },
            );
        }
        for (slot, reg) in [
            (&mut r.gdtr, VM_REG_GUEST_GDTR),
            (&mut r.idtr, VM_REG_GUEST_IDTR),
        ] {
            let d = self.dev.descriptor(vcpu, reg)?;
            *slot = Descriptor {
                base: d.base,
                limit: d.limit,
                access: 0,
            };
        }
        Ok(r)
    }

    /// `show_memseg`'s walk: segment ids from 0 until the kernel says EINVAL.
    fn memory_segments(&self) -> io::Result<Vec<MemorySegment>> {
        let mut segments = Vec::new();
        for id in 0.. {
            match self.dev.memseg(id) {
                Ok((len, name)) => segments.push(MemorySegment {
                    id: id as u32,
                    len,
                    name,
                }),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(segments)
    }

    /// `VM_RUN` once on `vcpu` (`--run`).
    pub fn run_once(&self, vcpu: u32) -> Result<RunExit, String> {
        let exit = self.dev.run(vcpu).map_err(failed("vm_run"))?;
        let kind = match exit.exitcode {
            VM_EXITCODE_INOUT => {
                // SAFETY: the kernel filled the union member its exit code names.
                let inout = unsafe { exit.u.inout };
                RunExitKind::Inout {
                    input: inout.r#in() != 0,
                    bytes: inout.bytes(),
                    string: inout.string() != 0,
                    rep: inout.rep() != 0,
                    port: inout.port,
                    eax: inout.eax,
                }
            }
            VM_EXITCODE_VMX => {
                // SAFETY: as above.
                let vmx = unsafe { exit.u.vmx };
                RunExitKind::Vmx {
                    status: vmx.status,
                    exit_reason: vmx.exit_reason,
                    qualification: vmx.exit_qualification,
                    inst_type: vmx.inst_type,
                    inst_error: vmx.inst_error,
                }
            }
            VM_EXITCODE_SVM => {
                // SAFETY: as above.
                let svm = unsafe { exit.u.svm };
                RunExitKind::Svm {
                    exitcode: svm.exitcode,
                    exitinfo1: svm.exitinfo1,
                    exitinfo2: svm.exitinfo2,
                }
            }
            code => RunExitKind::Other(code),
        };
        Ok(RunExit {
            rip: exit.rip,
            inst_length: exit.inst_length,
            kind,
        })
    }
}

impl Target for DevVmm {
    fn set_registers(&mut self, vcpu: u32, writes: &RegisterWrites) -> Result<(), String> {
        for (name, value) in &writes.registers {
            let reg = number(name).ok_or_else(|| format!("unknown register '{name}'"))?;
            self.dev
                .set_register(vcpu, reg, *value)
                .map_err(failed("vm_set_register"))?;
        }
        for (name, d) in &writes.descriptors {
            let reg = number(name).ok_or_else(|| format!("unknown segment '{name}'"))?;
            let desc = seg_desc {
                base: d.base,
                limit: d.limit,
                access: d.access,
            };
            self.dev
                .set_descriptor(vcpu, reg, desc)
                .map_err(failed("vm_set_desc"))?;
        }
        for (name, value) in &writes.selectors {
            let reg = number(name).ok_or_else(|| format!("unknown segment '{name}'"))?;
            self.dev
                .set_register(vcpu, reg, *value)
                .map_err(failed("vm_set_register"))?;
        }
        Ok(())
    }

    fn act(&mut self, vcpu: u32, action: &str) -> Result<(), String> {
        match action {
            "force_reset" => self
                .dev
                .suspend(VM_SUSPEND_RESET)
                .map_err(failed("vm_suspend")),
            "force_poweroff" => self
                .dev
                .suspend(VM_SUSPEND_POWEROFF)
                .map_err(failed("vm_suspend")),
            // FreeBSD ignores what vm_destroy returns.
            "destroy" => {
                let _ = vmmapi::destroy(self.dev.name());
                Ok(())
            }
            "inject_nmi" => self.dev.inject_nmi(vcpu).map_err(failed("vm_inject_nmi")),
            other => Err(format!("unknown action '{other}'")),
        }
    }

    fn state(&mut self, vcpu: u32) -> Result<VmState, String> {
        let registers = self.registers(vcpu).map_err(failed("vm_get_register"))?;
        let x2apic = self
            .dev
            .x2apic_state(vcpu)
            .map_err(failed("vm_get_x2apic_state"))?;
        let intinfo = self.dev.intinfo(vcpu).map_err(failed("vm_get_intinfo"))?;
        let mut capabilities = Vec::new();
        for (captype, name) in CAPABILITIES.iter().enumerate() {
            let value = match self.dev.capability(vcpu, captype as vm_cap_type) {
                Ok(value) => Some(value != 0),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
                Err(e) => return Err(failed("vm_get_capability")(e)),
            };
            capabilities.push((name.to_string(), value));
        }
        let cpus = |which| self.dev.cpus(which).map_err(failed("vm_get_cpus"));
        let (active_cpus, debug_cpus, suspended_cpus) = (
            cpus(VM_ACTIVE_CPUS)?,
            cpus(VM_DEBUG_CPUS)?,
            cpus(VM_SUSPENDED_CPUS)?,
        );
        let stats = self.dev.all_stats(vcpu).map_err(failed("vm_get_stats"))?;
        let mut statistics = Vec::new();
        for (index, value) in stats.values.into_iter().enumerate() {
            let description = self
                .dev
                .stat_desc(index as u32)
                .map_err(failed("vm_get_stat_desc"))?
                .unwrap_or_default();
            statistics.push((description, value));
        }
        let topology = self.dev.topology().map_err(failed("vm_get_topology"))?;
        let memory_segments = self.memory_segments().map_err(failed("vm_get_memseg"))?;
        let memory_map = self
            .dev
            .memmaps()
            .map_err(failed("vm_mmap_getnext"))?
            .into_iter()
            .map(|m| MemoryMapping {
                gpa: m.gpa,
                len: m.len,
                segment: m.segid as u32,
                offset: m.segoff as u64,
                prot: m.prot as u32,
                flags: m.flags as u32,
            })
            .collect();
        Ok(VmState {
            vcpu,
            registers: Some(registers),
            x2apic_state: Some(x2apic as u64),
            intinfo: Some(intinfo),
            capabilities,
            active_cpus,
            debug_cpus: Some(debug_cpus),
            suspended_cpus,
            statistics,
            topology,
            memory_segments,
            memory_map,
        })
    }

    fn run(&mut self, vcpu: u32) -> Result<RunExit, String> {
        self.run_once(vcpu)
    }

    fn set_capability(&mut self, vcpu: u32, name: &str, value: bool) -> Result<(), String> {
        // libvmmapi's name2type gives -1 for a name it does not know; the kernel refuses it.
        let captype = CAPABILITIES
            .iter()
            .position(|c| *c == name)
            .map_or(-1, |i| i as vm_cap_type);
        match self.dev.set_capability(vcpu, captype, value) {
            Ok(()) => Ok(()),
            Err(e) => {
                if e.raw_os_error() == Some(libc::ENOENT) {
                    println!("Capability \"{name}\" is not available");
                }
                Err(failed("vm_set_capability")(e))
            }
        }
    }

    fn set_x2apic_state(&mut self, vcpu: u32, state: i64) -> Result<(), String> {
        let enabled = match state {
            0 => false,
            1 => true,
            // What the kernel answers an enum value it does not have.
            _ => {
                let invalid = io::Error::from_raw_os_error(libc::EINVAL);
                return Err(failed("vm_set_x2apic_state")(invalid));
            }
        };
        self.dev
            .set_x2apic_state(vcpu, enabled)
            .map_err(failed("vm_set_x2apic_state"))
    }
}
