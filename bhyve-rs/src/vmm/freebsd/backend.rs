//! The seam's [`Hypervisor`], [`Vm`] and [`Vcpu`] over [`VmmDev`], in the order bhyve and
//! libvmmapi use the requests (vm_create, vm_set_topology, vm_setup_memory, per-vCPU
//! capabilities, vm_activate_cpu, then `VM_RUN` loops).

use std::cell::RefCell;
use std::io;
use std::sync::Arc;

use memmap2::MmapOptions;
use vmm_sys::*;

use super::exits::{handle_exit, ExitAction, ExitVcpu, VECTOR_BP};
use super::regs::{
    regs_from_values, regs_to_values, segment_from_desc, segment_to_desc, table_from_desc,
    table_to_desc, GPR_SET,
};
use super::snapshot::{KERNEL_STRUCTS, KERNEL_STRUCT_BUFFER};
use super::vmmapi::{self, KernelAbi, VmmDev};
use crate::interrupts::InterruptSink;
use crate::memory::{layout, GuestMemory, GuestRegion};
use crate::vmm::x86emul::{Exception, ExitBus, Paging, Registers, SegReg};
use crate::vmm::{
    BackendState, BlockedProbe, DirtyPages, ExitHandler, Hypervisor, MpState, Msr, PlatformCaps,
    Regs, Result, RtcSeed, Segment, SpecialRegs, StateSection, Topology, Vcpu, VcpuKick, Vm,
    VmExit, VmSpec, VmmError,
};

const BACKEND: &str = "freebsd-vmm";

/// `PROT_READ | PROT_WRITE | PROT_EXEC` for guest mappings (libvmmapi's `PROT_ALL`).
const PROT_ALL: i32 = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;

fn ioctl(what: &'static str) -> impl FnOnce(io::Error) -> VmmError {
    move |e| VmmError::ioctl(what, e)
}

pub struct FreeBsdHypervisor;

impl FreeBsdHypervisor {
    /// Check that vmm.ko is there: its sysctls answer once it is loaded.
    pub fn open() -> Result<Self> {
        KernelAbi::running().map_err(ioctl("sysctl kern.osreldate"))?;
        if !std::path::Path::new("/dev/vmmctl").exists() && !sysctl_exists("hw.vmm.create") {
            return Err(VmmError::Unsupported(
                "this kernel without vmm.ko (kldload vmm)",
            ));
        }
        Ok(FreeBsdHypervisor)
    }
}

fn sysctl_exists(name: &str) -> bool {
    let Ok(cname) = std::ffi::CString::new(name) else {
        return false;
    };
    let mut len = 0usize;
    // SAFETY: only the size of the value is asked for (null old pointer); the name is
    // NUL-terminated.
    let rc = unsafe {
        libc::sysctlbyname(
            cname.as_ptr(),
            std::ptr::null_mut(),
            &mut len,
            std::ptr::null(),
            0,
        )
    };
    rc == 0
}

impl Hypervisor for FreeBsdHypervisor {
    fn platform(&self) -> PlatformCaps {
        PlatformCaps::FREEBSD
    }

    fn create_vm(&self, spec: VmSpec) -> Result<Arc<dyn Vm>> {
        if spec.memory.prebuilt.is_some() {
            return Err(VmmError::Unsupported("prebuilt guest RAM"));
        }
        super::check_vm_name(&spec.name).map_err(|e| VmmError::Invalid(e.to_string()))?;
        let mut dev =
            vmmapi::create(&spec.name, spec.destroy_on_close).map_err(|e| VmmError::Open {
                path: format!("/dev/vmm/{}", spec.name),
                source: e,
            })?;
        // 13 and 14 have no destroy-on-close: the VM goes when this process drops it.
        dev.set_destroy_on_drop(spec.destroy_on_close);
        let topology = spec.topology;
        // FreeBSD takes no maxcpus yet (EINVAL unless 0): the vCPU limit is hw.vmm.maxcpu.
        dev.set_topology(topology.sockets, topology.cores, topology.threads, 0)
            .map_err(ioctl("VM_SET_TOPOLOGY"))?;
        let dev = Arc::new(dev);
        let memory = setup_memory(
            &dev,
            spec.memory.size,
            spec.memory.wired,
            spec.memory.guest_in_core,
        )?;
        Ok(Arc::new(FreeBsdVm {
            dev,
            memory: Arc::new(memory),
            topology,
            capabilities: spec.capabilities,
        }))
    }
}

/// libvmmapi's `vm_setup_memory`: one system memory segment covering low RAM, the hole below
/// 4 GiB and high RAM, mapped into the guest at 0 and 4 GiB, and into this process from
/// `/dev/vmm/NAME` at offset = guest-physical address. libvmmapi puts both host mappings in
/// one reserved range between guard pages; here each RAM region is its own mapping, as
/// [`GuestMemory`] holds them, and its bounds checks keep accesses inside them.
fn setup_memory(dev: &VmmDev, size: u64, wired: bool, in_core: bool) -> Result<GuestMemory> {
    let pieces = layout(size).map_err(|e| VmmError::Invalid(format!("guest memory: {e}")))?;
    let objsize = pieces.iter().map(|(gpa, len)| gpa + len).max().unwrap_or(0);
    dev.alloc_memseg(VM_SYSMEM, objsize, None)
        .map_err(ioctl("VM_ALLOC_MEMSEG"))?;
    let flags = if wired { VM_MEMMAP_F_WIRED } else { 0 };
    let mut regions = Vec::new();
    for (gpa, len) in pieces {
        dev.mmap_memseg(gpa, VM_SYSMEM, gpa as i64, len, PROT_ALL, flags)
            .map_err(ioctl("VM_MMAP_MEMSEG"))?;
        // SAFETY: a shared mapping of the VM's system memory at offset = gpa, which the
        // kernel backs with the segment mapped just above for as long as the VM exists; the
        // VM owns both, and the guest changing the bytes under us is what guest RAM is.
        let mapping = unsafe {
            MmapOptions::new()
                .offset(gpa)
                .len(len as usize)
                .map_mut(dev.file())
        }
        .map_err(|e| VmmError::Invalid(format!("mapping guest memory at {gpa:#x}: {e}")))?;
        if !in_core {
            // SAFETY: advice on exactly one live mapping we own; it only keeps the pages out
            // of core dumps (libvmmapi maps with MAP_NOCORE).
            unsafe {
                libc::madvise(
                    mapping.as_ptr() as *mut libc::c_void,
                    mapping.len(),
                    libc::MADV_NOCORE,
                )
            };
        }
        regions.push(GuestRegion::from_mapping(gpa, mapping));
    }
    GuestMemory::from_regions(regions).map_err(|e| VmmError::Invalid(format!("guest memory: {e}")))
}

pub struct FreeBsdVm {
    dev: Arc<VmmDev>,
    memory: Arc<GuestMemory>,
    topology: Topology,
    capabilities: crate::vmm::VmCapabilities,
}

impl InterruptSink for FreeBsdVm {
    fn set_irq_line(&self, gsi: u32, high: bool) -> io::Result<()> {
        // ISA lines reach the 8259 pair and the same I/O APIC pin, as bhyve's ISA devices
        // assert them; the others are I/O APIC pins only.
        if let Ok(irq) = u8::try_from(gsi) {
            if irq < 16 {
                return if high {
                    self.dev.isa_assert_irq(Some(irq), Some(irq))
                } else {
                    self.dev.isa_deassert_irq(Some(irq), Some(irq))
                };
            }
        }
        if high {
            self.dev.ioapic_assert_irq(gsi)
        } else {
            self.dev.ioapic_deassert_irq(gsi)
        }
    }

    fn signal_msi(&self, address: u64, data: u32) -> io::Result<()> {
        self.dev.lapic_msi(address, u64::from(data))
    }

    fn set_isa_irq_trigger(&self, irq: u8, level: bool) -> io::Result<()> {
        self.dev.isa_set_irq_trigger(irq, level)
    }
}

impl Vm for FreeBsdVm {
    fn platform(&self) -> &PlatformCaps {
        const FREEBSD: &PlatformCaps = &PlatformCaps::FREEBSD;
        FREEBSD
    }

    fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// bhyve's bootrom_alloc: a device memory segment named "bootrom", filled through
    /// `/dev/vmm.io/NAME.bootrom` and mapped read and execute only.
    fn map_rom(&self, rom: &GuestRegion) -> Result<()> {
        let segid = if self.dev.abi() >= KernelAbi::V15 {
            VM_BOOTROM
        } else {
            VM_BOOTROM_14
        };
        self.dev
            .alloc_memseg(segid, rom.len(), Some("bootrom"))
            .map_err(ioctl("VM_ALLOC_MEMSEG"))?;
        let path = format!("/dev/vmm.io/{}.bootrom", self.dev.name());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| VmmError::Open {
                path: path.clone(),
                source: e,
            })?;
        // SAFETY: a shared mapping of the boot ROM segment just created, of its length; only
        // this function uses it, to copy the image in.
        let mut mapping = unsafe { MmapOptions::new().len(rom.len() as usize).map_mut(&file) }
            .map_err(|e| VmmError::Invalid(format!("{path}: {e}")))?;
        mapping.copy_from_slice(rom.as_slice());
        drop(mapping);
        self.dev
            .mmap_memseg(
                rom.gpa(),
                segid,
                0,
                rom.len(),
                libc::PROT_READ | libc::PROT_EXEC,
                0,
            )
            .map_err(ioctl("VM_MMAP_MEMSEG"))
    }

    fn seed_rtc(&self, seed: &RtcSeed) -> Result<()> {
        for &(offset, value) in &seed.nvram {
            self.dev
                .rtc_write(offset, value)
                .map_err(ioctl("VM_RTC_WRITE"))?;
        }
        self.dev
            .rtc_settime(seed.time)
            .map_err(ioctl("VM_RTC_SETTIME"))
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>> {
        if id >= u32::from(self.topology.cpus) {
            return Err(VmmError::Invalid(format!(
                "vCPU {id} is beyond the topology"
            )));
        }
        let caps = self.capabilities;
        // bhyve's fbsdrun_set_capabilities.
        if caps.exit_on_hlt {
            self.dev
                .set_capability(id, VM_CAP_HALT_EXIT, true)
                .map_err(|_| VmmError::MissingCapability("VM_CAP_HALT_EXIT"))?;
        }
        if caps.exit_on_pause {
            self.dev
                .set_capability(id, VM_CAP_PAUSE_EXIT, true)
                .map_err(|_| VmmError::MissingCapability("VM_CAP_PAUSE_EXIT"))?;
        }
        self.dev
            .set_x2apic_state(id, caps.x2apic)
            .map_err(ioctl("VM_SET_X2APIC_STATE"))?;
        // Real mode for the boot ROM and for APs (spinup_ap); SVM runs real mode anyway.
        if let Err(e) = self.dev.set_capability(id, VM_CAP_UNRESTRICTED_GUEST, true) {
            log::debug!("VM_CAP_UNRESTRICTED_GUEST on vCPU {id}: {e}");
        }
        if let Err(e) = self.dev.set_capability(id, VM_CAP_ENABLE_INVPCID, true) {
            log::debug!("VM_CAP_ENABLE_INVPCID on vCPU {id}: {e}");
        }
        // APs are activated when the guest starts them (SPINUP_AP), as bhyve does.
        if id == 0 {
            self.dev
                .activate_cpu(id)
                .map_err(ioctl("VM_ACTIVATE_CPU"))?;
        }
        Ok(Box::new(FreeBsdVcpu {
            dev: self.dev.clone(),
            memory: self.memory.clone(),
            id,
            kick: Arc::new(FreeBsdKick {
                dev: self.dev.clone(),
                id,
            }),
        }))
    }

    fn interrupt_sink(self: Arc<Self>) -> Arc<dyn InterruptSink> {
        self
    }

    /// The kernel's devices through `VM_SNAPSHOT_REQ`, in bhyve's order.
    fn save_state(&self) -> Result<BackendState> {
        let mut sections = Vec::new();
        for (name, req) in KERNEL_STRUCTS {
            let mut buf = vec![0u8; KERNEL_STRUCT_BUFFER];
            let n = self
                .dev
                .snapshot_save(req, &mut buf)
                .map_err(ioctl("VM_SNAPSHOT_REQ"))?;
            buf.truncate(n);
            sections.push(StateSection {
                name: name.to_string(),
                bytes: buf,
            });
        }
        Ok(BackendState {
            backend: BACKEND.into(),
            sections,
        })
    }

    fn restore_state(&self, state: &BackendState) -> Result<()> {
        check_backend(state)?;
        for (name, req) in KERNEL_STRUCTS {
            let bytes = state
                .section(name)
                .ok_or_else(|| VmmError::Invalid(format!("saved VM state lacks {name}")))?;
            self.dev
                .snapshot_restore(req, bytes)
                .map_err(ioctl("VM_SNAPSHOT_REQ"))?;
        }
        Ok(())
    }

    fn finish_restore(&self) -> Result<()> {
        self.dev.restore_time().map_err(ioctl("VM_RESTORE_TIME"))
    }

    fn start_dirty_log(&self) -> Result<()> {
        Err(VmmError::Unsupported("dirty page logging"))
    }

    fn take_dirty_pages(&self) -> Result<Vec<DirtyPages>> {
        Err(VmmError::Unsupported("dirty page logging"))
    }

    fn stop_dirty_log(&self) -> Result<()> {
        Err(VmmError::Unsupported("dirty page logging"))
    }
}

fn check_backend(state: &BackendState) -> Result<()> {
    if state.backend != BACKEND {
        return Err(VmmError::Invalid(format!(
            "the saved state is from the {} backend, not {BACKEND}",
            state.backend
        )));
    }
    Ok(())
}

/// Kicks with `VM_SUSPEND_CPU`: the vCPU leaves `VM_RUN` with `VM_EXITCODE_DEBUG` now or at
/// its next entry, and the run loop resumes it before reporting the kick.
struct FreeBsdKick {
    dev: Arc<VmmDev>,
    id: u32,
}

impl VcpuKick for FreeBsdKick {
    fn kick(&self) {
        // An AP not started yet is not in VM_RUN and the kernel refuses it (EINVAL).
        if let Err(e) = self.dev.suspend_cpu(Some(self.id)) {
            log::debug!("VM_SUSPEND_CPU of vCPU {}: {e}", self.id);
        }
    }
}

pub struct FreeBsdVcpu {
    dev: Arc<VmmDev>,
    memory: Arc<GuestMemory>,
    id: u32,
    kick: Arc<FreeBsdKick>,
}

const CONTROL_SET: [vm_reg_name; 11] = [
    VM_REG_GUEST_CR0,
    VM_REG_GUEST_CR2,
    VM_REG_GUEST_CR3,
    VM_REG_GUEST_CR4,
    VM_REG_GUEST_EFER,
    VM_REG_GUEST_CS,
    VM_REG_GUEST_DS,
    VM_REG_GUEST_ES,
    VM_REG_GUEST_FS,
    VM_REG_GUEST_GS,
    VM_REG_GUEST_SS,
];

impl FreeBsdVcpu {
    /// `VM_ACTIVATE_CPU`; a vCPU already active (started before a reset) is fine.
    fn activate(&self) -> Result<()> {
        match self.dev.activate_cpu(self.id) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
            Err(e) => Err(VmmError::ioctl("VM_ACTIVATE_CPU", e)),
        }
    }

    fn read_regs(&self) -> io::Result<Regs> {
        let values = self.dev.registers(self.id, &GPR_SET)?;
        let values: [u64; 18] = values
            .try_into()
            .map_err(|_| io::Error::from_raw_os_error(libc::EIO))?;
        Ok(regs_from_values(&values))
    }

    fn read_special(&self) -> io::Result<SpecialRegs> {
        let c = self.dev.registers(self.id, &CONTROL_SET)?;
        let seg = |reg: vm_reg_name, selector: u64| -> io::Result<Segment> {
            Ok(segment_from_desc(
                &self.dev.descriptor(self.id, reg)?,
                selector as u16,
            ))
        };
        Ok(SpecialRegs {
            cr0: c[0],
            cr2: c[1],
            cr3: c[2],
            cr4: c[3],
            efer: c[4],
            cs: seg(VM_REG_GUEST_CS, c[5])?,
            ds: seg(VM_REG_GUEST_DS, c[6])?,
            es: seg(VM_REG_GUEST_ES, c[7])?,
            fs: seg(VM_REG_GUEST_FS, c[8])?,
            gs: seg(VM_REG_GUEST_GS, c[9])?,
            ss: seg(VM_REG_GUEST_SS, c[10])?,
            tr: seg(
                VM_REG_GUEST_TR,
                self.dev.register(self.id, VM_REG_GUEST_TR)?,
            )?,
            ldt: seg(
                VM_REG_GUEST_LDTR,
                self.dev.register(self.id, VM_REG_GUEST_LDTR)?,
            )?,
            gdt: table_from_desc(&self.dev.descriptor(self.id, VM_REG_GUEST_GDTR)?),
            idt: table_from_desc(&self.dev.descriptor(self.id, VM_REG_GUEST_IDTR)?),
            cr8: 0,
            apic_base: 0,
        })
    }

    fn write_special(&self, s: &SpecialRegs) -> io::Result<()> {
        let segments = [
            (VM_REG_GUEST_CS, &s.cs),
            (VM_REG_GUEST_DS, &s.ds),
            (VM_REG_GUEST_ES, &s.es),
            (VM_REG_GUEST_FS, &s.fs),
            (VM_REG_GUEST_GS, &s.gs),
            (VM_REG_GUEST_SS, &s.ss),
            (VM_REG_GUEST_TR, &s.tr),
            (VM_REG_GUEST_LDTR, &s.ldt),
        ];
        for (reg, seg) in segments {
            self.dev
                .set_descriptor(self.id, reg, segment_to_desc(seg))?;
            self.dev
                .set_register(self.id, reg, u64::from(seg.selector))?;
        }
        self.dev
            .set_descriptor(self.id, VM_REG_GUEST_GDTR, table_to_desc(&s.gdt))?;
        self.dev
            .set_descriptor(self.id, VM_REG_GUEST_IDTR, table_to_desc(&s.idt))?;
        self.dev.set_registers(
            self.id,
            &CONTROL_SET[..5],
            &[s.cr0, s.cr2, s.cr3, s.cr4, s.efer],
        )
    }
}

/// The vCPU's registers during one exit: read from the kernel when first needed, written
/// back when changed (RIP only when set, since writing it also decides where the guest
/// resumes).
struct KernelRegisters<'a> {
    vcpu: &'a FreeBsdVcpu,
    regs: RefCell<Option<Regs>>,
    sregs: RefCell<Option<SpecialRegs>>,
    gprs_changed: bool,
    rip_set: bool,
    error: RefCell<Option<io::Error>>,
}

impl<'a> KernelRegisters<'a> {
    fn new(vcpu: &'a FreeBsdVcpu) -> Self {
        KernelRegisters {
            vcpu,
            regs: RefCell::new(None),
            sregs: RefCell::new(None),
            gprs_changed: false,
            rip_set: false,
            error: RefCell::new(None),
        }
    }

    fn note(&self, e: io::Error) {
        self.error.borrow_mut().get_or_insert(e);
    }

    fn regs(&self) -> Regs {
        if let Some(r) = *self.regs.borrow() {
            return r;
        }
        let r = self.vcpu.read_regs().unwrap_or_else(|e| {
            self.note(e);
            Regs::default()
        });
        *self.regs.borrow_mut() = Some(r);
        r
    }

    fn sregs(&self) -> SpecialRegs {
        if let Some(s) = *self.sregs.borrow() {
            return s;
        }
        let s = self.vcpu.read_special().unwrap_or_else(|e| {
            self.note(e);
            SpecialRegs::default()
        });
        *self.sregs.borrow_mut() = Some(s);
        s
    }

    fn update(&mut self, f: impl FnOnce(&mut Regs)) {
        let mut r = self.regs();
        f(&mut r);
        *self.regs.borrow_mut() = Some(r);
    }

    /// Write back what changed; the first error of the whole exit, if any.
    fn finish(self) -> io::Result<()> {
        if let Some(e) = self.error.into_inner() {
            return Err(e);
        }
        let Some(r) = self.regs.into_inner() else {
            return Ok(());
        };
        let values = regs_to_values(&r);
        if self.gprs_changed {
            // Everything but RIP (index 16).
            let regs: Vec<vm_reg_name> = GPR_SET
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != 16)
                .map(|(_, r)| *r)
                .collect();
            let vals: Vec<u64> = values
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != 16)
                .map(|(_, v)| *v)
                .collect();
            self.vcpu.dev.set_registers(self.vcpu.id, &regs, &vals)?;
        }
        if self.rip_set {
            self.vcpu
                .dev
                .set_register(self.vcpu.id, VM_REG_GUEST_RIP, r.rip)?;
        }
        Ok(())
    }
}

impl Registers for KernelRegisters<'_> {
    fn gpr(&self, reg: u8) -> u64 {
        crate::vmm::x86emul::CpuState {
            regs: self.regs(),
            sregs: SpecialRegs::default(),
        }
        .gpr(reg)
    }
    fn set_gpr(&mut self, reg: u8, value: u64) {
        self.gprs_changed = true;
        self.update(|r| {
            let mut state = crate::vmm::x86emul::CpuState {
                regs: *r,
                sregs: SpecialRegs::default(),
            };
            state.set_gpr(reg, value);
            *r = state.regs;
        });
    }
    fn rip(&self) -> u64 {
        self.regs().rip
    }
    fn set_rip(&mut self, value: u64) {
        self.rip_set = true;
        self.update(|r| r.rip = value);
    }
    fn rflags(&self) -> u64 {
        self.regs().rflags
    }
    fn set_rflags(&mut self, value: u64) {
        self.gprs_changed = true;
        self.update(|r| r.rflags = value);
    }
    fn segment(&self, seg: SegReg) -> Segment {
        crate::vmm::x86emul::CpuState {
            regs: Regs::default(),
            sregs: self.sregs(),
        }
        .segment(seg)
    }
    fn cr0(&self) -> u64 {
        self.sregs().cr0
    }
}

impl ExitVcpu for KernelRegisters<'_> {
    fn vcpu_id(&self) -> u32 {
        self.vcpu.id
    }
    fn paging(&self) -> Paging {
        Paging::from_special_regs(&self.sregs())
    }
    fn inject_exception(&mut self, e: Exception) {
        let result = (|| {
            if let Some(cr2) = e.cr2 {
                self.vcpu
                    .dev
                    .set_register(self.vcpu.id, VM_REG_GUEST_CR2, cr2)?;
            }
            self.vcpu
                .dev
                .inject_exception(self.vcpu.id, e.vector, e.error_code, true)
        })();
        if let Err(err) = result {
            self.note(err);
        }
    }
    fn inject_breakpoint(&mut self, inst_length: u32) {
        let result = self
            .vcpu
            .dev
            .set_register(
                self.vcpu.id,
                VM_REG_GUEST_ENTRY_INST_LENGTH,
                u64::from(inst_length),
            )
            .and_then(|()| {
                self.vcpu
                    .dev
                    .inject_exception(self.vcpu.id, VECTOR_BP, None, false)
            });
        if let Err(err) = result {
            self.note(err);
        }
    }
    fn restart_instruction(&mut self) {
        if let Err(err) = self.vcpu.dev.restart_instruction(self.vcpu.id) {
            self.note(err);
        }
    }
}

impl Vcpu for FreeBsdVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    fn run(&mut self, handler: &dyn ExitHandler) -> Result<VmExit> {
        loop {
            let exit = match self.dev.run(self.id) {
                Ok(exit) => exit,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => return Ok(VmExit::Interrupted),
                Err(e) => return Err(VmmError::ioctl("VM_RUN", e)),
            };
            let mut bus = ExitBus {
                memory: &self.memory,
                handler,
            };
            let mut registers = KernelRegisters::new(self);
            let action = handle_exit(&exit, &mut registers, &mut bus, handler);
            registers.finish().map_err(ioctl("register access"))?;
            match action {
                ExitAction::Continue => {}
                ExitAction::Exit(VmExit::Interrupted) => {
                    // The kick suspended this vCPU; let it run at its next entry.
                    self.dev
                        .resume_cpu(Some(self.id))
                        .map_err(ioctl("VM_RESUME_CPU"))?;
                    return Ok(VmExit::Interrupted);
                }
                ExitAction::Exit(event) => return Ok(event),
            }
        }
    }

    fn kicker(&self) -> Arc<dyn VcpuKick> {
        self.kick.clone()
    }

    fn enter_thread(&mut self) -> Result<()> {
        Ok(())
    }

    fn leave_thread(&mut self) {}

    /// bhyve's spinup_ap: real mode with CS at the SIPI vector's page, RIP 0, then activate.
    fn start_ap(&mut self, rip: u64) -> Result<()> {
        let id = self.id;
        let page = rip & !0xfff;
        let mut cs = self
            .dev
            .descriptor(id, VM_REG_GUEST_CS)
            .map_err(ioctl("VM_GET_SEGMENT_DESCRIPTOR"))?;
        cs.base = page;
        self.dev
            .set_descriptor(id, VM_REG_GUEST_CS, cs)
            .map_err(ioctl("VM_SET_SEGMENT_DESCRIPTOR"))?;
        self.dev
            .set_registers(
                id,
                &[VM_REG_GUEST_CS, VM_REG_GUEST_RIP],
                &[page >> 4, rip & 0xfff],
            )
            .map_err(ioctl("VM_SET_REGISTER_SET"))?;
        self.activate()
    }

    fn inject_exception(&self, vector: u8, error_code: Option<u32>) -> Result<()> {
        self.dev
            .inject_exception(self.id, vector, error_code, false)
            .map_err(ioctl("VM_INJECT_EXCEPTION"))
    }

    fn regs(&self) -> Result<Regs> {
        self.read_regs().map_err(ioctl("VM_GET_REGISTER_SET"))
    }

    fn set_regs(&self, regs: &Regs) -> Result<()> {
        self.dev
            .set_registers(self.id, &GPR_SET, &regs_to_values(regs))
            .map_err(ioctl("VM_SET_REGISTER_SET"))
    }

    fn special_regs(&self) -> Result<SpecialRegs> {
        self.read_special()
            .map_err(ioctl("VM_GET_SEGMENT_DESCRIPTOR"))
    }

    fn set_special_regs(&self, sregs: &SpecialRegs) -> Result<()> {
        self.write_special(sregs)
            .map_err(ioctl("VM_SET_SEGMENT_DESCRIPTOR"))
    }

    fn msrs(&self, _indices: &[u32]) -> Result<Vec<Msr>> {
        Err(VmmError::Unsupported(
            "reading MSRs (vmm has no MSR request)",
        ))
    }

    fn set_msrs(&self, _msrs: &[Msr]) -> Result<()> {
        Err(VmmError::Unsupported(
            "writing MSRs (vmm has no MSR request)",
        ))
    }

    fn mp_state(&self) -> Result<MpState> {
        let active = self
            .dev
            .cpus(VM_ACTIVE_CPUS)
            .map_err(ioctl("VM_GET_CPUS"))?;
        Ok(if active.contains(&self.id) {
            MpState::Runnable
        } else {
            MpState::WaitForSipi
        })
    }

    fn set_mp_state(&self, state: MpState) -> Result<()> {
        match state {
            MpState::Runnable => self.activate(),
            _ => Err(VmmError::Unsupported("setting this MP state")),
        }
    }

    fn blocked_probe(&self) -> Option<Box<dyn BlockedProbe>> {
        // The kernel detects an all-halted VM itself (VM_SUSPEND_HALT).
        None
    }

    /// Registers, segment descriptors and pending events through the register requests; the
    /// rest of the vCPU (local APIC, VMCS/VMCB) is saved with the VM's kernel structures.
    fn save_state(&self) -> Result<BackendState> {
        let regs = self.regs()?;
        let sregs = self.special_regs()?;
        let (info1, _) = self.dev.intinfo(self.id).map_err(ioctl("VM_GET_INTINFO"))?;
        let mut sections = vec![
            StateSection {
                name: "registers".into(),
                bytes: regs_to_values(&regs)
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            },
            StateSection {
                name: "intinfo".into(),
                bytes: info1.to_le_bytes().to_vec(),
            },
        ];
        sections.push(StateSection {
            name: "segments".into(),
            bytes: super::snapshot::special_regs_to_bytes(&sregs),
        });
        Ok(BackendState {
            backend: BACKEND.into(),
            sections,
        })
    }

    fn restore_state(&self, state: &BackendState) -> Result<()> {
        check_backend(state)?;
        let section = |name: &str| {
            state
                .section(name)
                .ok_or_else(|| VmmError::Invalid(format!("saved vCPU state lacks {name}")))
        };
        let sregs = super::snapshot::special_regs_from_bytes(section("segments")?)
            .map_err(VmmError::Invalid)?;
        self.set_special_regs(&sregs)?;
        let values = super::snapshot::u64s(section("registers")?, 18).map_err(VmmError::Invalid)?;
        let values: [u64; 18] = values
            .try_into()
            .map_err(|_| VmmError::Invalid("saved registers are torn".into()))?;
        self.set_regs(&regs_from_values(&values))?;
        let info = super::snapshot::u64s(section("intinfo")?, 1).map_err(VmmError::Invalid)?;
        self.dev
            .set_intinfo(self.id, info[0])
            .map_err(ioctl("VM_SET_INTINFO"))
    }

    fn notify_paused(&self) -> Result<()> {
        Ok(())
    }
}
