//! The KVM backend (Linux), on kvm-ioctls.
//!
//! A VM gets KVM's in-kernel irqchip (8259 PIC pair, IOAPIC, one local APIC per vCPU) and the
//! in-kernel 8254 PIT, the counterparts of bhyve's vatpic, vioapic, vlapic and vatpit. CPUID is
//! KVM's supported set with the configured topology applied ([`super::cpuid`]); KVM's own
//! hypervisor leaves (0x4000_0000 "KVMKVMKVM", 0x4000_0001 features) are kept, so the guest can use
//! kvm-clock. The TSC frequency is left as KVM sets it (no TSC scaling is needed or assumed).
//!
//! Kicking a vCPU: the thread running it registers its `kvm_run.immediate_exit` byte
//! ([`KvmVcpu::arm_kick`]); the kick signal handler sets that byte on the signalled thread.
//! A signal that arrives while the thread is inside `KVM_RUN` makes it return `EINTR`; one that
//! arrives just before makes the next `KVM_RUN` return at once. Either way the vCPU reports
//! [`VmExit::Interrupted`] and the flag is cleared again.

use std::cell::Cell;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_dtable, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msi, kvm_msr_entry, kvm_pit_config, kvm_pit_state2, kvm_regs, kvm_run,
    kvm_segment, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES, KVM_MEM_READONLY, KVM_MP_STATE_HALTED,
    KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_SIPI_RECEIVED,
    KVM_MP_STATE_UNINITIALIZED, KVM_PIT_SPEAKER_DUMMY, KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};

use super::cpuid::{apply_topology, CpuidEntry};
use super::{
    BackendState, BlockedProbe, DescriptorTable, Hypervisor, MpState, Msr, Regs, Result, Segment,
    SpecialRegs, StateSection, SystemEvent, Topology, Vcpu, VmExit, VmmError,
};
use crate::interrupts::InterruptSink;
use crate::memory::{GuestMemory, GuestRegion};

/// Where KVM may put the three pages it needs for real-mode emulation on Intel (the TSS), just
/// below the BIOS area at the top of the 32-bit space, as other VMMs do.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// The capabilities every VM relies on.
const REQUIRED_CAPS: [(Cap, &str); 5] = [
    (Cap::Irqchip, "an in-kernel irqchip (KVM_CAP_IRQCHIP)"),
    (Cap::Pit2, "an in-kernel PIT (KVM_CAP_PIT2)"),
    (Cap::UserMemory, "user memory regions (KVM_CAP_USER_MEMORY)"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
];

pub struct KvmHypervisor {
    kvm: Kvm,
}

impl KvmHypervisor {
    /// Open `/dev/kvm` and check the capabilities bhyve-rs relies on.
    pub fn open() -> Result<Self> {
        Self::open_at("/dev/kvm")
    }

    /// Like [`KvmHypervisor::open`] with another device node.
    pub fn open_at(path: &str) -> Result<Self> {
        let c_path = std::ffi::CString::new(path)
            .map_err(|_| VmmError::Invalid(format!("{path}: invalid path")))?;
        let kvm = Kvm::new_with_path(&c_path).map_err(|e| VmmError::Open {
            path: path.into(),
            source: e.into(),
        })?;
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(cap) {
                return Err(VmmError::MissingCapability(name));
            }
        }
        Ok(Self { kvm })
    }
}

impl Hypervisor for KvmHypervisor {
    fn create_vm(&self) -> Result<Arc<dyn super::Vm>> {
        let fd = self
            .kvm
            .create_vm()
            .map_err(|e| VmmError::ioctl("KVM_CREATE_VM", e))?;
        // Needed by VMX for real-mode guests; harmless elsewhere, and not every KVM flavour
        // accepts it, so a failure is only logged.
        if let Err(e) = fd.set_tss_address(KVM_TSS_ADDRESS) {
            log::debug!("KVM_SET_TSS_ADDR: {e}");
        }
        fd.create_irq_chip()
            .map_err(|e| VmmError::ioctl("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| VmmError::ioctl("KVM_CREATE_PIT2", e))?;
        let supported = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmmError::ioctl("KVM_GET_SUPPORTED_CPUID", e))?;
        let cpuid = supported
            .as_slice()
            .iter()
            .map(|e| CpuidEntry {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
            })
            .collect();
        let msr_indices: Arc<[u32]> = self
            .kvm
            .get_msr_index_list()
            .map_err(|e| VmmError::ioctl("KVM_GET_MSR_INDEX_LIST", e))?
            .as_slice()
            .into();
        let xsave_size = fd.check_extension_int(Cap::Xsave2).max(0) as usize;
        Ok(Arc::new(KvmVm {
            fd,
            cpuid,
            msr_indices,
            xsave_size,
            next_slot: std::sync::atomic::AtomicU32::new(0),
        }))
    }
}

pub struct KvmVm {
    fd: VmFd,
    cpuid: Vec<CpuidEntry>,
    /// Every MSR KVM can save and restore.
    msr_indices: Arc<[u32]>,
    /// KVM_CAP_XSAVE2: bytes of XSAVE state (0 when only the 4 KiB legacy area exists).
    xsave_size: usize,
    /// The next free memory slot.
    next_slot: std::sync::atomic::AtomicU32,
}

impl KvmVm {
    /// The raw VM descriptor, for backend-specific state (snapshots of irqchip, PIT, clock).
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    fn add_slot(&self, region: &GuestRegion, flags: u32) -> Result<()> {
        let slot = self
            .next_slot
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let description = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: region.gpa(),
            memory_size: region.len(),
            userspace_addr: region.host_address() as u64,
        };
        // SAFETY: the region is a live mapping of exactly `memory_size` bytes; the caller keeps
        // it alive while the VM exists (documented on the trait methods).
        unsafe { self.fd.set_user_memory_region(description) }
            .map_err(|e| VmmError::ioctl("KVM_SET_USER_MEMORY_REGION", e))
    }
}

impl super::Vm for KvmVm {
    fn map_memory(&self, memory: &GuestMemory) -> Result<()> {
        for region in memory.regions() {
            self.add_slot(region, 0)?;
        }
        Ok(())
    }

    fn map_rom(&self, rom: &GuestRegion) -> Result<()> {
        if !self.fd.check_extension(Cap::ReadonlyMem) {
            return Err(VmmError::MissingCapability(
                "read-only memory (KVM_CAP_READONLY_MEM)",
            ));
        }
        self.add_slot(rom, KVM_MEM_READONLY)
    }

    fn create_vcpu(&self, id: u32, topology: &Topology) -> Result<Box<dyn Vcpu>> {
        let mut fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|e| VmmError::ioctl("KVM_CREATE_VCPU", e))?;
        let mut entries = self.cpuid.clone();
        apply_topology(&mut entries, id, topology);
        let kvm_entries: Vec<kvm_cpuid_entry2> = entries
            .iter()
            .map(|e| kvm_cpuid_entry2 {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
                ..Default::default()
            })
            .collect();
        let cpuid = CpuId::from_entries(&kvm_entries)
            .map_err(|e| VmmError::Invalid(format!("CPUID table: {e:?}")))?;
        fd.set_cpuid2(&cpuid)
            .map_err(|e| VmmError::ioctl("KVM_SET_CPUID2", e))?;
        let run: *mut kvm_run = fd.get_kvm_run();
        Ok(Box::new(KvmVcpu {
            id,
            fd,
            run,
            msr_indices: self.msr_indices.clone(),
            xsave_size: self.xsave_size,
        }))
    }

    fn interrupt_sink(self: Arc<Self>) -> Arc<dyn InterruptSink> {
        self
    }

    fn save_state(&self) -> Result<BackendState> {
        let mut sections = Vec::new();
        for (chip_id, name) in IRQCHIPS {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut chip)
                .map_err(|e| VmmError::ioctl("KVM_GET_IRQCHIP", e))?;
            sections.push(section(name, &chip));
        }
        let pit = self
            .fd
            .get_pit2()
            .map_err(|e| VmmError::ioctl("KVM_GET_PIT2", e))?;
        sections.push(section("pit2", &pit));
        let clock = self
            .fd
            .get_clock()
            .map_err(|e| VmmError::ioctl("KVM_GET_CLOCK", e))?;
        sections.push(section("clock", &clock));
        Ok(BackendState {
            backend: BACKEND.into(),
            sections,
        })
    }

    fn restore_state(&self, state: &BackendState) -> Result<()> {
        check_backend(state)?;
        for (chip_id, name) in IRQCHIPS {
            let mut chip: kvm_irqchip = from_section(state, name)?;
            chip.chip_id = chip_id;
            self.fd
                .set_irqchip(&chip)
                .map_err(|e| VmmError::ioctl("KVM_SET_IRQCHIP", e))?;
        }
        let pit: kvm_pit_state2 = from_section(state, "pit2")?;
        self.fd
            .set_pit2(&pit)
            .map_err(|e| VmmError::ioctl("KVM_SET_PIT2", e))?;
        let mut clock: kvm_clock_data = from_section(state, "clock")?;
        // Only the clock value is restored: the guest sees no time pass while it was saved.
        clock.flags = 0;
        self.fd
            .set_clock(&clock)
            .map_err(|e| VmmError::ioctl("KVM_SET_CLOCK", e))
    }
}

const BACKEND: &str = "kvm";
const IRQCHIPS: [(u32, &str); 3] = [(0, "pic_master"), (1, "pic_slave"), (2, "ioapic")];

/// Marker for kernel ABI structs made only of integers (and unions/arrays of them), for which
/// every byte pattern is a valid value.
///
/// # Safety
/// Implement only for such plain-old-data `#[repr(C)]` types.
unsafe trait Pod: Default {}
// SAFETY: all are bindgen-generated #[repr(C)] structs of integers, arrays and unions of integers.
unsafe impl Pod for kvm_irqchip {}
// SAFETY: as above.
unsafe impl Pod for kvm_pit_state2 {}
// SAFETY: as above.
unsafe impl Pod for kvm_clock_data {}
// SAFETY: as above.
unsafe impl Pod for kvm_mp_state {}
// SAFETY: as above.
unsafe impl Pod for kvm_regs {}
// SAFETY: as above.
unsafe impl Pod for kvm_sregs {}
// SAFETY: as above.
unsafe impl Pod for kvm_xsave {}
// SAFETY: as above.
unsafe impl Pod for kvm_xcrs {}
// SAFETY: as above.
unsafe impl Pod for kvm_debugregs {}
// SAFETY: as above.
unsafe impl Pod for kvm_lapic_state {}
// SAFETY: as above.
unsafe impl Pod for kvm_vcpu_events {}

fn section<T: Pod>(name: &str, value: &T) -> StateSection {
    // SAFETY: T is plain old data (see `Pod`), so all size_of::<T>() bytes may be read.
    let bytes = unsafe {
        std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
    };
    StateSection {
        name: name.into(),
        bytes: bytes.to_vec(),
    }
}

fn from_section<T: Pod>(state: &BackendState, name: &str) -> Result<T> {
    let bytes = state
        .section(name)
        .ok_or_else(|| VmmError::Invalid(format!("saved KVM state lacks '{name}'")))?;
    if bytes.len() != std::mem::size_of::<T>() {
        return Err(VmmError::Invalid(format!(
            "saved KVM state '{name}' is {} bytes, expected {}",
            bytes.len(),
            std::mem::size_of::<T>()
        )));
    }
    let mut value = T::default();
    // SAFETY: T is plain old data, so any byte pattern of its size is a valid value; the
    // length was checked above and the two buffers do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            (&mut value as *mut T).cast::<u8>(),
            bytes.len(),
        )
    };
    Ok(value)
}

fn check_backend(state: &BackendState) -> Result<()> {
    if state.backend == BACKEND {
        Ok(())
    } else {
        Err(VmmError::Invalid(format!(
            "state was saved by the '{}' backend, not '{BACKEND}'",
            state.backend
        )))
    }
}

fn msrs_to_bytes(msrs: &[Msr]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(msrs.len() * 12);
    for m in msrs {
        bytes.extend_from_slice(&m.index.to_le_bytes());
        bytes.extend_from_slice(&m.value.to_le_bytes());
    }
    bytes
}

fn msrs_from_bytes(bytes: &[u8]) -> Result<Vec<Msr>> {
    if bytes.len() % 12 != 0 {
        return Err(VmmError::Invalid("saved MSR list is malformed".into()));
    }
    Ok(bytes
        .chunks_exact(12)
        .map(|c| Msr {
            index: u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            value: u64::from_le_bytes([c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11]]),
        })
        .collect())
}

impl InterruptSink for KvmVm {
    fn set_irq_line(&self, gsi: u32, high: bool) -> io::Result<()> {
        self.fd.set_irq_line(gsi, high).map_err(io::Error::from)
    }

    fn signal_msi(&self, address: u64, data: u32) -> io::Result<()> {
        let msi = kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        self.fd.signal_msi(msi).map(|_| ()).map_err(io::Error::from)
    }

    fn set_isa_irq_trigger(&self, irq: u8, level: bool) -> io::Result<()> {
        if irq >= 16 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("ISA IRQ {irq} does not exist"),
            ));
        }
        // The master PIC is chip 0 (IRQs 0-7), the slave chip 1 (IRQs 8-15).
        let mut chip = kvm_irqchip {
            chip_id: u32::from(irq / 8),
            ..Default::default()
        };
        self.fd.get_irqchip(&mut chip).map_err(io::Error::from)?;
        let bit = 1u8 << (irq % 8);
        // SAFETY: chip ids 0 and 1 are the PICs, for which KVM fills in the `pic` member of
        // the union; every byte pattern is a valid kvm_pic_state.
        let pic = unsafe { &mut chip.chip.pic };
        if pic.elcr_mask & bit == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("IRQ {irq} cannot be level triggered"),
            ));
        }
        if level {
            pic.elcr |= bit;
        } else {
            pic.elcr &= !bit;
        }
        self.fd.set_irqchip(&chip).map_err(io::Error::from)
    }
}

thread_local! {
    /// The `immediate_exit` byte of the vCPU the current thread runs, or null.
    static KICK_TARGET: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// Called from the kick signal handler on the signalled thread. Async-signal-safe: it touches
/// only a const-initialised thread-local and one byte of the kvm_run page.
pub(crate) fn on_kick_signal() {
    let target = KICK_TARGET.with(Cell::get);
    if !target.is_null() {
        // SAFETY: a non-null target was registered by `arm_kick` on this thread and is cleared
        // by `disarm_kick` before the vCPU (and its kvm_run mapping) leaves the thread.
        unsafe { std::ptr::write_volatile(target, 1) };
    }
}

pub struct KvmVcpu {
    id: u32,
    fd: VcpuFd,
    /// The vCPU's kvm_run page, mapped by `fd` for its whole life.
    run: *mut kvm_run,
    msr_indices: Arc<[u32]>,
    xsave_size: usize,
}

// SAFETY: `run` points into a mapping owned by `fd`, which moves with the vCPU; KVM allows a vCPU
// to be run from any one thread at a time, which `&mut self` on `run()` guarantees.
unsafe impl Send for KvmVcpu {}

impl KvmVcpu {
    /// The raw vCPU descriptor, for backend-specific state (snapshots: LAPIC, XSAVE, events).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    fn immediate_exit(&self) -> *mut u8 {
        // SAFETY: `run` is valid for the life of `fd`; only a field address is computed.
        unsafe { &raw mut (*self.run).immediate_exit }
    }

    fn check_xsave_size(&self) -> Result<()> {
        if self.xsave_size > std::mem::size_of::<kvm_xsave>() {
            return Err(VmmError::Unsupported(
                "XSAVE state larger than 4 KiB (e.g. AMX)",
            ));
        }
        Ok(())
    }

    /// Every MSR of KVM's save list that this vCPU can read, with its value. KVM_GET_MSRS stops
    /// at the first MSR it cannot read, so that one is skipped and the rest read again.
    fn readable_msrs(&self) -> Result<Vec<Msr>> {
        let mut result = Vec::with_capacity(self.msr_indices.len());
        let mut rest: &[u32] = &self.msr_indices;
        while !rest.is_empty() {
            let batch = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
            let entries: Vec<kvm_msr_entry> = batch
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries)
                .map_err(|e| VmmError::Invalid(format!("MSR list: {e:?}")))?;
            let read = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(|e| VmmError::ioctl("KVM_GET_MSRS", e))?;
            result.extend(msrs.as_slice()[..read].iter().map(|e| Msr {
                index: e.index,
                value: e.data,
            }));
            // Skip the unreadable one (if the batch stopped early).
            let consumed = if read < batch.len() { read + 1 } else { read };
            rest = &rest[consumed..];
        }
        Ok(result)
    }

    /// `(size, count)` of the port access the last exit describes.
    fn io_shape(run: *mut kvm_run) -> (u8, u32) {
        // SAFETY: called right after KVM_RUN reported KVM_EXIT_IO, so the `io` member of the
        // union is the valid one; the fields read do not overlap the data bytes handed out.
        let io = unsafe { (*run).__bindgen_anon_1.io };
        (io.size, io.count)
    }

    fn internal_error(run: *mut kvm_run) -> (u32, Vec<u64>) {
        // SAFETY: called right after KVM_EXIT_INTERNAL_ERROR, so `internal` is the valid member.
        let internal = unsafe { (*run).__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        (internal.suberror, internal.data[..n].to_vec())
    }
}

impl Vcpu for KvmVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    fn run(&mut self) -> Result<VmExit<'_>> {
        let run = self.run;
        let immediate_exit = self.immediate_exit();
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // SAFETY: the byte belongs to this vCPU's kvm_run page (see `immediate_exit`).
                unsafe { std::ptr::write_volatile(immediate_exit, 0) };
                return Ok(VmExit::Interrupted);
            }
            Err(e) => return Err(VmmError::ioctl("KVM_RUN", e)),
        };
        Ok(match exit {
            VcpuExit::IoIn(port, data) => VmExit::IoIn {
                port,
                size: Self::io_shape(run).0,
                data,
            },
            VcpuExit::IoOut(port, data) => VmExit::IoOut {
                port,
                size: Self::io_shape(run).0,
                data,
            },
            VcpuExit::MmioRead(gpa, data) => VmExit::MmioRead { gpa, data },
            VcpuExit::MmioWrite(gpa, data) => VmExit::MmioWrite { gpa, data },
            VcpuExit::Hlt => VmExit::Halt,
            VcpuExit::Shutdown => VmExit::Shutdown,
            VcpuExit::Intr => VmExit::Interrupted,
            VcpuExit::SystemEvent(kind, _) => match kind {
                KVM_SYSTEM_EVENT_RESET => VmExit::SystemEvent(SystemEvent::Reset),
                KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::SystemEvent(SystemEvent::Shutdown),
                KVM_SYSTEM_EVENT_CRASH => VmExit::SystemEvent(SystemEvent::Crash),
                other => VmExit::Unknown(format!("system event {other}")),
            },
            VcpuExit::InternalError => {
                let (suberror, detail) = Self::internal_error(run);
                VmExit::InternalError { suberror, detail }
            }
            VcpuExit::FailEntry(reason, _) => VmExit::FailEntry { reason },
            other => VmExit::Unknown(format!("{other:?}")),
        })
    }

    fn arm_kick(&mut self) {
        let target = self.immediate_exit();
        KICK_TARGET.with(|t| t.set(target));
    }

    fn disarm_kick(&mut self) {
        let target = self.immediate_exit();
        KICK_TARGET.with(|t| {
            if t.get() == target {
                t.set(std::ptr::null_mut());
            }
        });
    }

    fn regs(&self) -> Result<Regs> {
        let r = self
            .fd
            .get_regs()
            .map_err(|e| VmmError::ioctl("KVM_GET_REGS", e))?;
        Ok(Regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        })
    }

    fn set_regs(&self, r: &Regs) -> Result<()> {
        let regs = kvm_regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        };
        self.fd
            .set_regs(&regs)
            .map_err(|e| VmmError::ioctl("KVM_SET_REGS", e))
    }

    fn special_regs(&self) -> Result<SpecialRegs> {
        let s = self
            .fd
            .get_sregs()
            .map_err(|e| VmmError::ioctl("KVM_GET_SREGS", e))?;
        Ok(SpecialRegs {
            cs: segment_from_kvm(&s.cs),
            ds: segment_from_kvm(&s.ds),
            es: segment_from_kvm(&s.es),
            fs: segment_from_kvm(&s.fs),
            gs: segment_from_kvm(&s.gs),
            ss: segment_from_kvm(&s.ss),
            tr: segment_from_kvm(&s.tr),
            ldt: segment_from_kvm(&s.ldt),
            gdt: DescriptorTable {
                base: s.gdt.base,
                limit: s.gdt.limit,
            },
            idt: DescriptorTable {
                base: s.idt.base,
                limit: s.idt.limit,
            },
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
        })
    }

    fn set_special_regs(&self, r: &SpecialRegs) -> Result<()> {
        // Start from the current state so the pending-interrupt bitmap is kept.
        let mut s = self
            .fd
            .get_sregs()
            .map_err(|e| VmmError::ioctl("KVM_GET_SREGS", e))?;
        s.cs = segment_to_kvm(&r.cs);
        s.ds = segment_to_kvm(&r.ds);
        s.es = segment_to_kvm(&r.es);
        s.fs = segment_to_kvm(&r.fs);
        s.gs = segment_to_kvm(&r.gs);
        s.ss = segment_to_kvm(&r.ss);
        s.tr = segment_to_kvm(&r.tr);
        s.ldt = segment_to_kvm(&r.ldt);
        s.gdt = kvm_dtable {
            base: r.gdt.base,
            limit: r.gdt.limit,
            ..Default::default()
        };
        s.idt = kvm_dtable {
            base: r.idt.base,
            limit: r.idt.limit,
            ..Default::default()
        };
        s.cr0 = r.cr0;
        s.cr2 = r.cr2;
        s.cr3 = r.cr3;
        s.cr4 = r.cr4;
        s.cr8 = r.cr8;
        s.efer = r.efer;
        s.apic_base = r.apic_base;
        self.fd
            .set_sregs(&s)
            .map_err(|e| VmmError::ioctl("KVM_SET_SREGS", e))
    }

    fn msrs(&self, indices: &[u32]) -> Result<Vec<Msr>> {
        let entries: Vec<kvm_msr_entry> = indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| VmmError::Invalid(format!("MSR list: {e:?}")))?;
        let read = self
            .fd
            .get_msrs(&mut msrs)
            .map_err(|e| VmmError::ioctl("KVM_GET_MSRS", e))?;
        if read != indices.len() {
            let missing = indices.get(read).copied().unwrap_or_default();
            return Err(VmmError::Invalid(format!(
                "MSR {missing:#x} is not readable"
            )));
        }
        Ok(msrs
            .as_slice()
            .iter()
            .map(|e| Msr {
                index: e.index,
                value: e.data,
            })
            .collect())
    }

    fn set_msrs(&self, values: &[Msr]) -> Result<()> {
        let entries: Vec<kvm_msr_entry> = values
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.value,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries)
            .map_err(|e| VmmError::Invalid(format!("MSR list: {e:?}")))?;
        let written = self
            .fd
            .set_msrs(&msrs)
            .map_err(|e| VmmError::ioctl("KVM_SET_MSRS", e))?;
        if written != values.len() {
            let index = values.get(written).map_or(0, |m| m.index);
            return Err(VmmError::Invalid(format!("MSR {index:#x} is not writable")));
        }
        Ok(())
    }

    fn mp_state(&self) -> Result<MpState> {
        let state = self
            .fd
            .get_mp_state()
            .map_err(|e| VmmError::ioctl("KVM_GET_MP_STATE", e))?;
        Ok(match state.mp_state {
            KVM_MP_STATE_RUNNABLE => MpState::Runnable,
            KVM_MP_STATE_UNINITIALIZED => MpState::WaitForSipi,
            KVM_MP_STATE_INIT_RECEIVED => MpState::InitReceived,
            KVM_MP_STATE_HALTED => MpState::Halted,
            KVM_MP_STATE_SIPI_RECEIVED => MpState::SipiReceived,
            other => MpState::Other(other),
        })
    }

    fn set_mp_state(&self, state: MpState) -> Result<()> {
        let mp_state = match state {
            MpState::Runnable => KVM_MP_STATE_RUNNABLE,
            MpState::WaitForSipi => KVM_MP_STATE_UNINITIALIZED,
            MpState::InitReceived => KVM_MP_STATE_INIT_RECEIVED,
            MpState::Halted => KVM_MP_STATE_HALTED,
            MpState::SipiReceived => KVM_MP_STATE_SIPI_RECEIVED,
            MpState::Other(other) => other,
        };
        self.fd
            .set_mp_state(kvm_mp_state { mp_state })
            .map_err(|e| VmmError::ioctl("KVM_SET_MP_STATE", e))
    }

    fn blocked_probe(&self) -> Option<Box<dyn BlockedProbe>> {
        match VcpuStats::open(&self.fd) {
            Ok(stats) => Some(Box::new(stats)),
            Err(e) => {
                log::debug!("vCPU {}: no binary statistics: {e}", self.id);
                None
            }
        }
    }

    fn save_state(&self) -> Result<BackendState> {
        self.check_xsave_size()?;
        let fd = &self.fd;
        let ioctl = VmmError::ioctl;
        // MP state first: reading it makes KVM process pending INIT/SIPI events, so the
        // registers read after it are the ones that go with it.
        let sections = vec![
            section(
                "mp_state",
                &fd.get_mp_state()
                    .map_err(|e| ioctl("KVM_GET_MP_STATE", e))?,
            ),
            section(
                "regs",
                &fd.get_regs().map_err(|e| ioctl("KVM_GET_REGS", e))?,
            ),
            section(
                "sregs",
                &fd.get_sregs().map_err(|e| ioctl("KVM_GET_SREGS", e))?,
            ),
            section(
                "xsave",
                &fd.get_xsave().map_err(|e| ioctl("KVM_GET_XSAVE", e))?,
            ),
            section(
                "xcrs",
                &fd.get_xcrs().map_err(|e| ioctl("KVM_GET_XCRS", e))?,
            ),
            section(
                "debugregs",
                &fd.get_debug_regs()
                    .map_err(|e| ioctl("KVM_GET_DEBUGREGS", e))?,
            ),
            section(
                "lapic",
                &fd.get_lapic().map_err(|e| ioctl("KVM_GET_LAPIC", e))?,
            ),
            StateSection {
                name: "msrs".into(),
                bytes: msrs_to_bytes(&self.readable_msrs()?),
            },
            section(
                "vcpu_events",
                &fd.get_vcpu_events()
                    .map_err(|e| ioctl("KVM_GET_VCPU_EVENTS", e))?,
            ),
        ];
        Ok(BackendState {
            backend: BACKEND.into(),
            sections,
        })
    }

    fn restore_state(&self, state: &BackendState) -> Result<()> {
        check_backend(state)?;
        self.check_xsave_size()?;
        let fd = &self.fd;
        let ioctl = VmmError::ioctl;
        // Order matters: MP state before events; SREGS (APIC base) before the LAPIC; the LAPIC
        // before MSRs (the TSC-deadline MSR only sticks in TSC-deadline mode); pending events
        // last, on top of the registers they belong to.
        fd.set_mp_state(from_section(state, "mp_state")?)
            .map_err(|e| ioctl("KVM_SET_MP_STATE", e))?;
        fd.set_regs(&from_section(state, "regs")?)
            .map_err(|e| ioctl("KVM_SET_REGS", e))?;
        fd.set_sregs(&from_section(state, "sregs")?)
            .map_err(|e| ioctl("KVM_SET_SREGS", e))?;
        let xsave: kvm_xsave = from_section(state, "xsave")?;
        // SAFETY: check_xsave_size verified KVM needs no more than the 4 KiB kvm_xsave holds.
        unsafe { fd.set_xsave(&xsave) }.map_err(|e| ioctl("KVM_SET_XSAVE", e))?;
        fd.set_xcrs(&from_section(state, "xcrs")?)
            .map_err(|e| ioctl("KVM_SET_XCRS", e))?;
        fd.set_debug_regs(&from_section(state, "debugregs")?)
            .map_err(|e| ioctl("KVM_SET_DEBUGREGS", e))?;
        fd.set_lapic(&from_section(state, "lapic")?)
            .map_err(|e| ioctl("KVM_SET_LAPIC", e))?;
        let msrs = state
            .section("msrs")
            .ok_or_else(|| VmmError::Invalid("saved KVM state lacks 'msrs'".into()))?;
        self.set_msrs(&msrs_from_bytes(msrs)?)?;
        fd.set_vcpu_events(&from_section(state, "vcpu_events")?)
            .map_err(|e| ioctl("KVM_SET_VCPU_EVENTS", e))
    }
}

fn segment_from_kvm(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

fn segment_to_kvm(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: u8::from(s.present),
        dpl: s.dpl,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: u8::from(s.avl),
        unusable: u8::from(s.unusable),
        padding: 0,
    }
}

/// KVM_GET_STATS_FD = _IO(KVMIO, 0xce).
const KVM_GET_STATS_FD: libc::c_ulong = 0xae_ce;

/// The vCPU's binary statistics file (Documentation/virt/kvm/api.rst, KVM_GET_STATS_FD): only
/// the generic `blocking` flag and `halt_wakeup` counter are read.
struct VcpuStats {
    file: File,
    blocking: u64,
    wakeups: Option<u64>,
}

impl VcpuStats {
    fn open(vcpu: &VcpuFd) -> io::Result<Self> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new descriptor or -1.
        let fd = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_GET_STATS_FD as _) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut header = [0u8; 24];
        file.read_exact_at(&mut header, 0)?;
        let word =
            |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        let (name_size, num_desc, desc_offset, data_offset) =
            (word(4), word(8), word(16), word(20));
        if name_size == 0 || name_size > 1024 || num_desc > 4096 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "implausible stats header",
            ));
        }
        let desc_size = 16 + name_size as usize;
        let mut descriptors = vec![0u8; desc_size * num_desc as usize];
        file.read_exact_at(&mut descriptors, u64::from(desc_offset))?;
        let mut blocking = None;
        let mut wakeups = None;
        for desc in descriptors.chunks_exact(desc_size) {
            let offset = u32::from_le_bytes([desc[8], desc[9], desc[10], desc[11]]);
            let name = &desc[16..];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            let at = u64::from(data_offset) + u64::from(offset);
            match name {
                b"blocking" => blocking = Some(at),
                b"halt_wakeup" => wakeups = Some(at),
                _ => {}
            }
        }
        let blocking = blocking
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no 'blocking' statistic"))?;
        Ok(Self {
            file,
            blocking,
            wakeups,
        })
    }

    fn read_u64(&self, at: u64) -> Option<u64> {
        let mut value = [0u8; 8];
        self.file.read_exact_at(&mut value, at).ok()?;
        Some(u64::from_le_bytes(value))
    }
}

impl BlockedProbe for VcpuStats {
    fn sample(&self) -> Option<(bool, u64)> {
        let blocking = self.read_u64(self.blocking)? != 0;
        let wakeups = self.wakeups.and_then(|at| self.read_u64(at)).unwrap_or(0);
        Some((blocking, wakeups))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_device_node_is_named_in_a_one_line_error() {
        let err = KvmHypervisor::open_at("/nonexistent/kvm").err().unwrap();
        assert_eq!(
            err.to_string(),
            "/nonexistent/kvm: No such file or directory"
        );
    }

    #[test]
    fn saved_sections_must_have_the_exact_struct_size() {
        let state = BackendState {
            backend: BACKEND.into(),
            sections: vec![StateSection {
                name: "regs".into(),
                bytes: vec![0; 7],
            }],
        };
        assert!(from_section::<kvm_regs>(&state, "regs").is_err());
        assert!(from_section::<kvm_regs>(&state, "sregs").is_err());
        let regs = kvm_regs {
            rip: 0x1234,
            ..Default::default()
        };
        let state = BackendState {
            backend: BACKEND.into(),
            sections: vec![section("regs", &regs)],
        };
        assert_eq!(
            from_section::<kvm_regs>(&state, "regs").unwrap().rip,
            0x1234
        );
    }

    #[test]
    fn msr_lists_round_trip_and_reject_torn_input() {
        let msrs = vec![
            Msr {
                index: 0x10,
                value: 7,
            },
            Msr {
                index: 0xc000_0080,
                value: 0x500,
            },
        ];
        assert_eq!(msrs_from_bytes(&msrs_to_bytes(&msrs)).unwrap(), msrs);
        assert!(msrs_from_bytes(&[0; 13]).is_err());
    }
}
