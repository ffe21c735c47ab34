//! The KVM backend (Linux), on kvm-ioctls.
//!
//! A VM gets KVM's in-kernel irqchip (8259 PIC pair, IOAPIC, one local APIC per vCPU) and the
//! in-kernel 8254 PIT, the counterparts of bhyve's vatpic, vioapic, vlapic and vatpit. CPUID is
//! KVM's supported set with the configured topology applied ([`super::cpuid`]); KVM's own
//! hypervisor leaves (0x4000_0000 "KVMKVMKVM", 0x4000_0001 features) are kept, so the guest can use
//! kvm-clock. The TSC frequency is left as KVM sets it (no TSC scaling is needed or assumed).
//!
//! Kicking a vCPU: the thread running it registers its `kvm_run.immediate_exit` byte and its
//! thread id (`Vcpu::enter_thread`); the kick signals that thread, whose handler sets the byte.
//! A signal that arrives while the thread is inside `KVM_RUN` makes it return `EINTR`; one that
//! arrives just before makes the next `KVM_RUN` return at once. Either way the vCPU reports
//! [`VmExit::Interrupted`] and the flag is cleared again.
//!
//! Port I/O, MMIO and unknown MSRs (`KVM_CAP_X86_USER_SPACE_MSR`) are served inside
//! `Vcpu::run`, which enters the guest again until a lifecycle event or a kick.

use std::cell::Cell;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, Once};

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_dtable, kvm_enable_cap, kvm_irqchip,
    kvm_lapic_state, kvm_mp_state, kvm_msi, kvm_msr_entry, kvm_pit_config, kvm_pit_state2,
    kvm_regs, kvm_run, kvm_segment, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave, CpuId, Msrs, Xsave, KVM_CAP_X86_USER_SPACE_MSR, KVM_CLOCK_TSC_STABLE,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
    KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_RUNNABLE,
    KVM_MP_STATE_SIPI_RECEIVED, KVM_MP_STATE_UNINITIALIZED, KVM_PIT_SPEAKER_DUMMY,
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Cap, Kvm, MsrExitReason, VcpuExit, VcpuFd, VmFd};

use super::cpuid::{apply_topology, check_features_available, CpuidEntry};
use super::{
    AccessFault, BackendState, BlockedProbe, DebugRegs, DescriptorTable, DirtyPages, ExitHandler,
    Hypervisor, MpState, Msr, PlatformCaps, Regs, Result, RtcSeed, Segment, SpecialRegs,
    StateSection, Statistic, StatisticsProbe, SuspendReason, Topology, Vcpu, VcpuKick, VmExit,
    VmSpec, VmmError,
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
    fn platform(&self) -> PlatformCaps {
        PlatformCaps::KVM
    }

    fn create_vm(&self, spec: VmSpec) -> Result<Arc<dyn super::Vm>> {
        install_kick_handler()?;
        let memory = match spec.memory.prebuilt {
            Some(memory) => memory,
            None => GuestMemory::new(spec.memory.size)
                .map_err(|e| VmmError::Invalid(format!("guest memory: {e}")))?,
        };
        if !spec.memory.guest_in_core {
            memory.advise_dontdump();
        }
        if spec.memory.wired {
            memory
                .wire()
                .map_err(|e| VmmError::Invalid(format!("guest memory: {e}")))?;
        }
        // HLT and PAUSE are handled in the kernel (the in-kernel local APIC blocks a halted
        // vCPU; PAUSE-loop exits are KVM's own), and x2APIC mode is the guest's choice through
        // CPUID, so `spec.capabilities` asks for nothing KVM does not already do.
        log::debug!(
            "creating VM {:?} ({:?}, {:?})",
            spec.name,
            spec.topology,
            spec.capabilities
        );
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
        // MSRs KVM does not know leave to user space, which applies x86.strictmsr as bhyve
        // does; without the capability KVM raises #GP itself, which is the strict behaviour.
        let user_space_msrs = fd.check_extension(Cap::X86UserSpaceMsr)
            && fd
                .enable_cap(&kvm_enable_cap {
                    cap: KVM_CAP_X86_USER_SPACE_MSR,
                    args: [u64::from(MsrExitReason::Unknown.bits()), 0, 0, 0],
                    ..Default::default()
                })
                .is_ok();
        if !user_space_msrs {
            log::debug!("KVM_CAP_X86_USER_SPACE_MSR unavailable: unknown MSRs always raise #GP");
        }
        let supported = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmmError::ioctl("KVM_GET_SUPPORTED_CPUID", e))?;
        let cpuid = cpuid_entries(supported.as_slice());
        let msr_indices: Arc<[u32]> = self
            .kvm
            .get_msr_index_list()
            .map_err(|e| VmmError::ioctl("KVM_GET_MSR_INDEX_LIST", e))?
            .as_slice()
            .into();
        let xsave_size = fd.check_extension_int(Cap::Xsave2).max(0) as usize;
        let mut vm = KvmVm {
            fd,
            memory: Arc::new(memory),
            topology: spec.topology,
            cpuid,
            msr_indices,
            xsave_size,
            next_slot: std::sync::atomic::AtomicU32::new(0),
            tsc_warned: Arc::new(AtomicBool::new(false)),
            ram_slots: Vec::new(),
            dirty_log: std::sync::Mutex::new(false),
        };
        for index in 0..vm.memory.regions().len() {
            let slot = vm.add_slot(&vm.memory.regions()[index], 0)?;
            vm.ram_slots.push(slot);
        }
        Ok(Arc::new(vm))
    }
}

pub struct KvmVm {
    fd: VmFd,
    /// Guest RAM, registered as memory slots for the VM's whole life.
    memory: Arc<GuestMemory>,
    topology: Topology,
    cpuid: Vec<CpuidEntry>,
    /// Every MSR KVM can save and restore.
    msr_indices: Arc<[u32]>,
    /// KVM_CAP_XSAVE2: bytes of XSAVE state (0 when only the 4 KiB legacy area exists).
    xsave_size: usize,
    /// The next free memory slot.
    next_slot: std::sync::atomic::AtomicU32,
    /// Set once a restore warned that the TSC frequency differs, so the warning is given once
    /// per VM rather than once per vCPU.
    tsc_warned: Arc<AtomicBool>,
    /// The memory slot of each region of `memory`, in its order.
    ram_slots: Vec<u32>,
    /// Whether the RAM slots log dirty pages; the lock also keeps two callers from changing
    /// the slots' flags at once.
    dirty_log: std::sync::Mutex<bool>,
}

impl KvmVm {
    /// The raw VM descriptor, for backend-specific state (snapshots of irqchip, PIT, clock).
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Register `region` in a new memory slot, whose number is returned.
    fn add_slot(&self, region: &GuestRegion, flags: u32) -> Result<u32> {
        let slot = self
            .next_slot
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.set_slot(slot, region, flags)?;
        Ok(slot)
    }

    /// Register `region` in memory slot `slot` with `flags`; for an existing slot with the
    /// same region, KVM changes only the flags.
    fn set_slot(&self, slot: u32, region: &GuestRegion, flags: u32) -> Result<()> {
        let description = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: region.gpa(),
            memory_size: region.len(),
            userspace_addr: region.host_address() as u64,
        };
        // SAFETY: the region is a live mapping of exactly `memory_size` bytes that stays alive
        // while the VM exists: guest RAM is owned by the VM, a ROM by the caller (documented on
        // `Vm::map_rom`).
        unsafe { self.fd.set_user_memory_region(description) }
            .map_err(|e| VmmError::ioctl("KVM_SET_USER_MEMORY_REGION", e))
    }
}

impl super::Vm for KvmVm {
    fn platform(&self) -> &PlatformCaps {
        const KVM: &PlatformCaps = &PlatformCaps::KVM;
        KVM
    }

    fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    fn map_rom(&self, rom: &GuestRegion) -> Result<()> {
        if !self.fd.check_extension(Cap::ReadonlyMem) {
            return Err(VmmError::MissingCapability(
                "read-only memory (KVM_CAP_READONLY_MEM)",
            ));
        }
        self.add_slot(rom, KVM_MEM_READONLY).map(|_| ())
    }

    fn seed_rtc(&self, _seed: &RtcSeed) -> Result<()> {
        // KVM has no RTC: user space emulates it (PlatformCaps::KVM.kernel_rtc is false).
        Err(VmmError::Unsupported("an in-kernel RTC"))
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>> {
        let mut fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|e| VmmError::ioctl("KVM_CREATE_VCPU", e))?;
        let mut entries = self.cpuid.clone();
        apply_topology(&mut entries, id, &self.topology);
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
            .map_err(|_| VmmError::Invalid("CPUID table: larger than KVM allows".into()))?;
        fd.set_cpuid2(&cpuid)
            .map_err(|e| VmmError::ioctl("KVM_SET_CPUID2", e))?;
        let run: *mut kvm_run = fd.get_kvm_run();
        let vcpu = KvmVcpu {
            id,
            fd,
            run,
            kick: Arc::new(KvmKick::default()),
            msr_indices: self.msr_indices.clone(),
            xsave_size: self.xsave_size,
            tsc_warned: self.tsc_warned.clone(),
        };
        vcpu.set_msrs(&reset_msrs())?;
        // KVM makes every vCPU runnable; an AP waits for the BSP's INIT/SIPI, as on hardware.
        if id > 0 {
            vcpu.set_mp_state(MpState::WaitForSipi)?;
        }
        Ok(Box::new(vcpu))
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
        let saved: kvm_clock_data = from_section(state, "clock")?;
        // Only the clock value goes back, so kvm-clock continues from where it stood at the save
        // and the time the VM spent saved does not pass for the guest (as with FreeBSD's
        // VM_RESTORE_TIME). The saved flags describe the saving host: KVM_CLOCK_TSC_STABLE
        // (its master clock was in use), KVM_CLOCK_REALTIME and KVM_CLOCK_HOST_TSC (with the
        // realtime and host_tsc fields) are outputs of KVM_GET_CLOCK; given back, REALTIME would
        // make the clock jump by the wall-clock time since the save, so none is passed on.
        let clock = kvm_clock_data {
            clock: saved.clock,
            ..Default::default()
        };
        self.fd
            .set_clock(&clock)
            .map_err(|e| VmmError::ioctl("KVM_SET_CLOCK", e))?;
        // Guest time must never go backwards: KVM offsets kvm-clock so that it reads the
        // given value now and counts up from there.
        let now = self
            .fd
            .get_clock()
            .map_err(|e| VmmError::ioctl("KVM_GET_CLOCK", e))?;
        if now.clock < saved.clock {
            return Err(VmmError::Invalid(format!(
                "kvm-clock reads {} ns after being set to {} ns",
                now.clock, saved.clock
            )));
        }
        if saved.flags & KVM_CLOCK_TSC_STABLE != 0 && now.flags & KVM_CLOCK_TSC_STABLE == 0 {
            log::info!("kvm-clock was TSC-stable when saved but is not on this host");
        }
        Ok(())
    }

    fn finish_restore(&self) -> Result<()> {
        // kvm-clock went back with the VM state; the PIT and the local APIC timers count from
        // their restored state on their own.
        Ok(())
    }

    fn start_dirty_log(&self) -> Result<()> {
        let mut logging = self.dirty_log.lock().unwrap_or_else(|e| e.into_inner());
        if !self.fd.check_extension(Cap::SyncMmu) {
            // Not expected on any KVM that runs guests, but without it the log is not sound.
            return Err(VmmError::MissingCapability("KVM_CAP_SYNC_MMU"));
        }
        self.set_ram_flags(KVM_MEM_LOG_DIRTY_PAGES)?;
        *logging = true;
        Ok(())
    }

    fn take_dirty_pages(&self) -> Result<Vec<DirtyPages>> {
        let logging = self.dirty_log.lock().unwrap_or_else(|e| e.into_inner());
        if !*logging {
            return Err(VmmError::Invalid("dirty logging is not on".into()));
        }
        // Without KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled, KVM_GET_DIRTY_LOG returns the
        // bitmap and write-protects the pages again in one step: no write falls between.
        self.ram_slots
            .iter()
            .zip(self.memory.regions())
            .map(|(slot, region)| {
                self.fd
                    .get_dirty_log(*slot, region.len() as usize)
                    .map(|bitmap| DirtyPages { bitmap })
                    .map_err(|e| VmmError::ioctl("KVM_GET_DIRTY_LOG", e))
            })
            .collect()
    }

    fn stop_dirty_log(&self) -> Result<()> {
        let mut logging = self.dirty_log.lock().unwrap_or_else(|e| e.into_inner());
        self.set_ram_flags(0)?;
        *logging = false;
        Ok(())
    }
}

impl KvmVm {
    /// Give every RAM slot `flags` (KVM changes a slot's flags in place).
    fn set_ram_flags(&self, flags: u32) -> Result<()> {
        for (slot, region) in self.ram_slots.iter().zip(self.memory.regions()) {
            self.set_slot(*slot, region, flags)?;
        }
        Ok(())
    }
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// MSR values every vCPU starts with: syscall MSRs clear, fast strings on, MTRRs enabled with
/// write-back as the default type (what firmware leaves behind; FreeBSD's vmm sets its own on
/// vCPU reset).
fn reset_msrs() -> Vec<Msr> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_LSTAR, 0),
        (MSR_CSTAR, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, 1),
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
    .into_iter()
    .map(|(index, value)| Msr { index, value })
    .collect()
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
// SAFETY: as above.
unsafe impl Pod for kvm_cpuid_entry2 {}

fn pod_bytes<T: Pod>(value: &T) -> &[u8] {
    // SAFETY: T is plain old data (see `Pod`), so all size_of::<T>() bytes may be read.
    unsafe {
        std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
    }
}

fn section<T: Pod>(name: &str, value: &T) -> StateSection {
    StateSection {
        name: name.into(),
        bytes: pod_bytes(value).to_vec(),
    }
}

fn required<'a>(state: &'a BackendState, name: &str) -> Result<&'a [u8]> {
    state
        .section(name)
        .ok_or_else(|| VmmError::Invalid(format!("saved KVM state lacks '{name}'")))
}

fn from_section<T: Pod>(state: &BackendState, name: &str) -> Result<T> {
    pod_from_bytes(required(state, name)?, name)
}

fn pod_from_bytes<T: Pod>(bytes: &[u8], name: &str) -> Result<T> {
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

fn cpuid_to_bytes(entries: &[kvm_cpuid_entry2]) -> Vec<u8> {
    entries.iter().flat_map(|e| pod_bytes(e).to_vec()).collect()
}

fn cpuid_from_bytes(bytes: &[u8]) -> Result<Vec<kvm_cpuid_entry2>> {
    let size = std::mem::size_of::<kvm_cpuid_entry2>();
    if bytes.is_empty() || bytes.len() % size != 0 || bytes.len() / size > KVM_MAX_CPUID_ENTRIES {
        return Err(VmmError::Invalid("saved CPUID table is malformed".into()));
    }
    bytes
        .chunks_exact(size)
        .map(|chunk| pod_from_bytes(chunk, "cpuid"))
        .collect()
}

fn cpuid_entries(entries: &[kvm_cpuid_entry2]) -> Vec<CpuidEntry> {
    entries
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
        .collect()
}

/// The 12-byte vendor string of CPUID leaf 0.
fn cpu_vendor(entries: &[kvm_cpuid_entry2]) -> Option<String> {
    let leaf = entries.iter().find(|e| e.function == 0)?;
    let bytes: Vec<u8> = [leaf.ebx, leaf.edx, leaf.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

fn u32s_to_bytes(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
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

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

/// Runs on the signalled thread. Async-signal-safe: it touches only a const-initialised
/// thread-local and one byte of the kvm_run page.
extern "C" fn on_kick_signal(_signal: libc::c_int) {
    let target = KICK_TARGET.with(Cell::get);
    if !target.is_null() {
        // SAFETY: a non-null target was registered by `enter_thread` on this thread and is
        // cleared by `leave_thread` before the vCPU (and its kvm_run mapping) leaves the thread.
        unsafe { std::ptr::write_volatile(target, 1) };
    }
}

/// Install the kick handler once per process, without SA_RESTART so a blocking `KVM_RUN`
/// returns.
fn install_kick_handler() -> Result<()> {
    static INSTALL: Once = Once::new();
    static ERRNO: AtomicI32 = AtomicI32::new(0);
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid starting point and the handler is an
        // async-signal-safe extern "C" function.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_kick_signal as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = 0;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(kick_signal(), &action, std::ptr::null_mut())
        };
        if rc != 0 {
            let errno = io::Error::last_os_error().raw_os_error();
            ERRNO.store(errno.unwrap_or(libc::EINVAL), Ordering::SeqCst);
        }
    });
    match ERRNO.load(Ordering::SeqCst) {
        0 => Ok(()),
        errno => Err(VmmError::Ioctl {
            what: "sigaction (vCPU kick signal)",
            source: io::Error::from_raw_os_error(errno),
        }),
    }
}

/// Kicks one vCPU: signals the thread that runs it, whose handler sets its `immediate_exit`.
/// A signal that arrives while the thread is inside `KVM_RUN` makes it return `EINTR`; one that
/// arrives just before makes the next `KVM_RUN` return at once.
#[derive(Default)]
struct KvmKick {
    /// The thread running the vCPU; set and cleared under the lock, so a listed thread is live
    /// while a kick signals it.
    thread: Mutex<Option<libc::pthread_t>>,
}

impl VcpuKick for KvmKick {
    fn kick(&self) {
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(thread) = *thread {
            // SAFETY: the thread id is listed only between `enter_thread` and `leave_thread`,
            // both on that thread and under this lock, so the thread is alive here.
            let rc = unsafe { libc::pthread_kill(thread, kick_signal()) };
            if rc != 0 {
                log::warn!(
                    "cannot kick a vCPU thread: {}",
                    io::Error::from_raw_os_error(rc)
                );
            }
        }
    }
}

pub struct KvmVcpu {
    id: u32,
    fd: VcpuFd,
    /// The vCPU's kvm_run page, mapped by `fd` for its whole life.
    run: *mut kvm_run,
    kick: Arc<KvmKick>,
    msr_indices: Arc<[u32]>,
    xsave_size: usize,
    tsc_warned: Arc<AtomicBool>,
}

/// IA32_TIME_STAMP_COUNTER and IA32_TSC_DEADLINE.
pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// Offset of the LVT timer register in the LAPIC register page, and its timer-mode field.
const APIC_LVTT: usize = 0x320;
const APIC_LVT_TIMER_MODE_MASK: u32 = 3 << 17;
const APIC_LVT_TIMER_TSC_DEADLINE: u32 = 2 << 17;
/// A TSC frequency within this many parts per million of the saved one needs no adjustment
/// (KVM's own tolerance, `tsc_tolerance_ppm`).
const TSC_TOLERANCE_PPM: u64 = 250;
/// Most MSRs one KVM_GET_MSRS / KVM_SET_MSRS takes: KVM refuses a list of MAX_IO_MSRS (256,
/// kvm-bindings' KVM_MAX_MSR_ENTRIES) or more with E2BIG.
const MSRS_PER_IOCTL: usize = KVM_MAX_MSR_ENTRIES - 1;

/// Why an MSR of KVM's save list was left out of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkippedMsr {
    pub index: u32,
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

    /// Bytes of XSAVE state KVM exchanges for this vCPU: the 4 KiB `kvm_xsave`, or more with
    /// KVM_CAP_XSAVE2 when dynamically enabled components (AMX) do not fit.
    fn xsave_len(&self) -> usize {
        self.xsave_size.max(std::mem::size_of::<kvm_xsave>())
    }

    /// The XSAVE area as bytes: `kvm_xsave` followed, with XSAVE2, by the rest of the area.
    fn save_xsave(&self) -> Result<Vec<u8>> {
        let legacy = std::mem::size_of::<kvm_xsave>();
        if self.xsave_len() == legacy {
            let xsave = self
                .fd
                .get_xsave()
                .map_err(|e| VmmError::ioctl("KVM_GET_XSAVE", e))?;
            return Ok(pod_bytes(&xsave).to_vec());
        }
        let mut xsave = Xsave::new((self.xsave_len() - legacy).div_ceil(4))
            .map_err(|_| VmmError::Invalid("XSAVE area: larger than KVM allows".into()))?;
        // SAFETY: the area was allocated with the size KVM_CAP_XSAVE2 reported for this VM.
        unsafe { self.fd.get_xsave2(&mut xsave) }
            .map_err(|e| VmmError::ioctl("KVM_GET_XSAVE2", e))?;
        let mut bytes = pod_bytes(&xsave.as_fam_struct_ref().xsave).to_vec();
        bytes.extend(u32s_to_bytes(xsave.as_slice()));
        Ok(bytes)
    }

    /// Put back what [`KvmVcpu::save_xsave`] returned. A shorter area than this host uses is
    /// padded with zeros (the XSAVE header says which components hold state); a longer one
    /// holds components this host cannot give the guest.
    fn restore_xsave(&self, bytes: &[u8]) -> Result<()> {
        let legacy = std::mem::size_of::<kvm_xsave>();
        let host = self.xsave_len();
        if bytes.len() < legacy || bytes.len() % 4 != 0 {
            return Err(VmmError::Invalid(format!(
                "saved XSAVE area of {} bytes is malformed",
                bytes.len()
            )));
        }
        if bytes.len() > host {
            return Err(VmmError::Invalid(format!(
                "the snapshot's XSAVE area is {} bytes but KVM on this host holds {host}: \
                 the guest used extended state (e.g. AMX) this host cannot provide",
                bytes.len()
            )));
        }
        let header: kvm_xsave = pod_from_bytes(&bytes[..legacy], "xsave")?;
        if host == legacy {
            // SAFETY: KVM needs no more than the 4 KiB kvm_xsave holds (no XSAVE2 size above it).
            return unsafe { self.fd.set_xsave(&header) }
                .map_err(|e| VmmError::ioctl("KVM_SET_XSAVE", e));
        }
        let mut xsave = Xsave::new((host - legacy).div_ceil(4))
            .map_err(|_| VmmError::Invalid("XSAVE area: larger than KVM allows".into()))?;
        // SAFETY: only the fixed-size header is replaced; the length of the trailing array is
        // left as allocated.
        unsafe { xsave.as_mut_fam_struct() }.xsave = header;
        for (word, chunk) in xsave
            .as_mut_slice()
            .iter_mut()
            .zip(bytes[legacy..].chunks_exact(4))
        {
            *word = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        // SAFETY: the area has the size KVM_CAP_XSAVE2 reported for this VM.
        unsafe { self.fd.set_xsave2(&xsave) }.map_err(|e| VmmError::ioctl("KVM_SET_XSAVE2", e))
    }

    /// Every MSR of KVM's save list that this vCPU can read, with its value, and those it could
    /// not. KVM_GET_MSRS stops at the first MSR it refuses, so that one is recorded as skipped
    /// and the rest read again. KVM lists every MSR it knows; it refuses those of features the
    /// vCPU's CPUID does not offer, whose value the guest can then neither read nor set.
    fn readable_msrs(&self) -> Result<(Vec<Msr>, Vec<SkippedMsr>)> {
        let mut skipped = Vec::new();
        let mut result = Vec::with_capacity(self.msr_indices.len());
        let mut rest: &[u32] = &self.msr_indices;
        while !rest.is_empty() {
            let batch = &rest[..rest.len().min(MSRS_PER_IOCTL)];
            let entries: Vec<kvm_msr_entry> = batch
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries)
                .map_err(|_| VmmError::Invalid("MSR list: larger than KVM allows".into()))?;
            let read = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(|e| VmmError::ioctl("KVM_GET_MSRS", e))?;
            result.extend(msrs.as_slice()[..read].iter().map(|e| Msr {
                index: e.index,
                value: e.data,
            }));
            // Skip the unreadable one (if the batch stopped early).
            let consumed = if read < batch.len() {
                skipped.push(SkippedMsr { index: batch[read] });
                read + 1
            } else {
                read
            };
            rest = &rest[consumed..];
        }
        if !skipped.is_empty() {
            let list: Vec<String> = skipped.iter().map(|m| format!("{:#x}", m.index)).collect();
            log::info!(
                "vCPU {}: {} of {} MSRs not saved, KVM refused to read them for this vCPU: {}",
                self.id,
                skipped.len(),
                self.msr_indices.len(),
                list.join(" ")
            );
        }
        Ok((result, skipped))
    }

    /// Set `msrs` in batches KVM accepts.
    fn set_msr_batches(&self, msrs: &[Msr]) -> Result<()> {
        for batch in msrs.chunks(MSRS_PER_IOCTL) {
            self.set_msrs(batch)?;
        }
        Ok(())
    }

    /// Put back the saved CPUID instead of the one built from this host at creation, after
    /// checking this host can provide every feature it lists.
    fn restore_cpuid(&self, bytes: &[u8]) -> Result<()> {
        let saved = cpuid_from_bytes(bytes)?;
        let fresh = self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmmError::ioctl("KVM_GET_CPUID2", e))?;
        let (saved_vendor, host_vendor) = (cpu_vendor(&saved), cpu_vendor(fresh.as_slice()));
        if saved_vendor != host_vendor {
            return Err(VmmError::Invalid(format!(
                "the snapshot was taken on a {} CPU, this host has a {} CPU",
                saved_vendor.unwrap_or_default(),
                host_vendor.unwrap_or_default()
            )));
        }
        check_features_available(&cpuid_entries(&saved), &cpuid_entries(fresh.as_slice()))
            .map_err(VmmError::Invalid)?;
        let cpuid = CpuId::from_entries(&saved)
            .map_err(|_| VmmError::Invalid("CPUID table: larger than KVM allows".into()))?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| VmmError::ioctl("KVM_SET_CPUID2", e))
    }

    /// Give the vCPU the saved TSC frequency. Without TSC scaling (KVM_CAP_TSC_CONTROL) KVM
    /// cannot run the guest's TSC at another rate than the host's: the restore then goes on at
    /// this host's rate with a warning, because kvm-clock (which KVM recomputes for the new
    /// rate) keeps the guest's time right and only a guest that calibrated the TSC itself
    /// drifts; refusing would make a snapshot unusable on any other machine.
    fn restore_tsc_khz(&self, bytes: &[u8]) -> Result<()> {
        let saved = u32::from_le_bytes(
            bytes
                .try_into()
                .map_err(|_| VmmError::Invalid("saved TSC frequency is malformed".into()))?,
        );
        let current = self
            .fd
            .get_tsc_khz()
            .map_err(|e| VmmError::ioctl("KVM_GET_TSC_KHZ", e))?;
        if saved == 0 || tsc_within_tolerance(saved, current) {
            return Ok(());
        }
        if let Err(e) = self.fd.set_tsc_khz(saved) {
            if !self.tsc_warned.swap(true, Ordering::Relaxed) {
                eprintln!(
                    "bhyve: warning: the snapshot's TSC runs at {saved} kHz, this host's at \
                     {current} kHz and KVM cannot scale it ({}); the guest's TSC now runs at \
                     the host's rate",
                    super::describe_io_error(&e.into())
                );
            }
        }
        Ok(())
    }

    /// Put back the MSRs. The TSC goes first and the TSC deadline last: KVM keeps the deadline
    /// as an absolute TSC value, and accepts it only once the LAPIC (restored before) is in
    /// TSC-deadline mode.
    fn restore_msrs(&self, bytes: &[u8], lapic: &kvm_lapic_state) -> Result<()> {
        let msrs = msrs_from_bytes(bytes)?;
        let tsc: Vec<Msr> = msrs
            .iter()
            .filter(|m| m.index == MSR_IA32_TSC)
            .copied()
            .collect();
        let others: Vec<Msr> = msrs
            .iter()
            .filter(|m| m.index != MSR_IA32_TSC && m.index != MSR_IA32_TSC_DEADLINE)
            .copied()
            .collect();
        self.set_msr_batches(&tsc)?;
        self.set_msr_batches(&others)?;
        if let Some(deadline) = msrs.iter().find(|m| m.index == MSR_IA32_TSC_DEADLINE) {
            let value = tsc_deadline_to_restore(deadline.value, lapic, tsc.first());
            self.set_msrs(&[Msr {
                index: MSR_IA32_TSC_DEADLINE,
                value,
            }])?;
        }
        Ok(())
    }

    /// Enter the guest once. Accesses are served through `handler` and give `None`, so the
    /// caller enters again; anything else is the lifecycle event to report.
    fn run_once(&mut self, handler: &dyn ExitHandler) -> Result<Option<VmExit>> {
        let run = self.run;
        let immediate_exit = self.immediate_exit();
        let id = self.id;
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // SAFETY: the byte belongs to this vCPU's kvm_run page (see `immediate_exit`).
                unsafe { std::ptr::write_volatile(immediate_exit, 0) };
                return Ok(Some(VmExit::Interrupted));
            }
            Err(e) => return Err(VmmError::ioctl("KVM_RUN", e)),
        };
        let served = match exit {
            VcpuExit::IoIn(port, data) => {
                let size = usize::from(Self::io_shape(run).0.max(1));
                // String I/O arrives as `count` accesses in one buffer.
                data.chunks_mut(size)
                    .try_for_each(|access| handler.port_read(port, access))
            }
            VcpuExit::IoOut(port, data) => {
                let size = usize::from(Self::io_shape(run).0.max(1));
                data.chunks(size)
                    .try_for_each(|access| handler.port_write(port, access))
            }
            VcpuExit::MmioRead(gpa, data) => handler.mmio_read(gpa, data),
            VcpuExit::MmioWrite(gpa, data) => handler.mmio_write(gpa, data),
            VcpuExit::X86Rdmsr(exit) => handler.msr_read(id, exit.index).map(|value| match value {
                Some(value) => *exit.data = value,
                None => *exit.error = 1,
            }),
            VcpuExit::X86Wrmsr(exit) => handler
                .msr_write(id, exit.index, exit.data)
                .map(|taken| *exit.error = u8::from(!taken)),
            VcpuExit::Hlt => return Ok(Some(VmExit::Halted)),
            VcpuExit::Intr => return Ok(Some(VmExit::Interrupted)),
            VcpuExit::Shutdown => return Ok(Some(VmExit::Suspended(SuspendReason::TripleFault))),
            VcpuExit::SystemEvent(kind, _) => {
                return Ok(Some(match kind {
                    KVM_SYSTEM_EVENT_RESET => VmExit::Suspended(SuspendReason::Reset),
                    KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::Suspended(SuspendReason::PowerOff),
                    KVM_SYSTEM_EVENT_CRASH => VmExit::GuestCrash,
                    other => VmExit::Failed(format!("unknown KVM system event {other}")),
                }))
            }
            VcpuExit::InternalError => {
                let (suberror, detail) = Self::internal_error(run);
                return Ok(Some(VmExit::Failed(describe_internal_error(
                    suberror,
                    &detail,
                    host_has_hardware_virtualization(),
                ))));
            }
            VcpuExit::FailEntry(reason, _) => {
                return Ok(Some(VmExit::Failed(format!(
                    "the hardware refused to enter the guest (invalid guest state, reason \
                     {reason:#x})"
                ))))
            }
            other => {
                return Ok(Some(VmExit::Failed(format!(
                    "unexpected KVM exit {other:?}"
                ))))
            }
        };
        Ok(served
            .err()
            .map(|AccessFault(what)| VmExit::AccessFault(what)))
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

    fn run(&mut self, handler: &dyn ExitHandler) -> Result<VmExit> {
        loop {
            if let Some(exit) = self.run_once(handler)? {
                return Ok(exit);
            }
        }
    }

    fn kicker(&self) -> Arc<dyn VcpuKick> {
        self.kick.clone()
    }

    fn enter_thread(&mut self) -> Result<()> {
        let target = self.immediate_exit();
        KICK_TARGET.with(|t| t.set(target));
        // SAFETY: pthread_self has no preconditions.
        *self.kick.thread.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(unsafe { libc::pthread_self() });
        Ok(())
    }

    fn leave_thread(&mut self) {
        *self.kick.thread.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let target = self.immediate_exit();
        KICK_TARGET.with(|t| {
            if t.get() == target {
                t.set(std::ptr::null_mut());
            }
        });
    }

    fn start_ap(&mut self, _rip: u64) -> Result<()> {
        // The in-kernel local APIC starts APs on INIT/SIPI; no AP start reaches user space.
        Err(VmmError::Unsupported("starting an AP from user space"))
    }

    fn inject_exception(&self, vector: u8, error_code: Option<u32>) -> Result<()> {
        let mut events = self
            .fd
            .get_vcpu_events()
            .map_err(|e| VmmError::ioctl("KVM_GET_VCPU_EVENTS", e))?;
        events.exception.injected = 1;
        events.exception.nr = vector;
        events.exception.has_error_code = u8::from(error_code.is_some());
        events.exception.error_code = error_code.unwrap_or(0);
        self.fd
            .set_vcpu_events(&events)
            .map_err(|e| VmmError::ioctl("KVM_SET_VCPU_EVENTS", e))
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
            .map_err(|_| VmmError::Invalid("MSR list: larger than KVM allows".into()))?;
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
            .map_err(|_| VmmError::Invalid("MSR list: larger than KVM allows".into()))?;
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
        let fd = &self.fd;
        let ioctl = VmmError::ioctl;
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| ioctl("KVM_GET_CPUID2", e))?;
        let tsc_khz = fd.get_tsc_khz().map_err(|e| ioctl("KVM_GET_TSC_KHZ", e))?;
        // CPUID and TSC frequency do not change while the vCPU is paused. Then MP state first:
        // reading it makes KVM process pending INIT/SIPI events, so the registers read after
        // it are the ones that go with it. Pending events last, after everything they refer to.
        let mut sections = vec![
            StateSection {
                name: "cpuid".into(),
                bytes: cpuid_to_bytes(cpuid.as_slice()),
            },
            StateSection {
                name: "tsc_khz".into(),
                bytes: tsc_khz.to_le_bytes().to_vec(),
            },
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
            StateSection {
                name: "xsave".into(),
                bytes: self.save_xsave()?,
            },
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
        ];
        let (msrs, skipped) = self.readable_msrs()?;
        sections.push(StateSection {
            name: "msrs".into(),
            bytes: msrs_to_bytes(&msrs),
        });
        // Kept for inspection only: which MSRs KVM listed but would not read.
        let skipped: Vec<u32> = skipped.iter().map(|m| m.index).collect();
        sections.push(StateSection {
            name: "msrs_skipped".into(),
            bytes: u32s_to_bytes(&skipped),
        });
        sections.push(section(
            "vcpu_events",
            &fd.get_vcpu_events()
                .map_err(|e| ioctl("KVM_GET_VCPU_EVENTS", e))?,
        ));
        Ok(BackendState {
            backend: BACKEND.into(),
            sections,
        })
    }

    fn restore_state(&self, state: &BackendState) -> Result<()> {
        check_backend(state)?;
        let fd = &self.fd;
        let ioctl = VmmError::ioctl;
        // The order, and why (bhyve_snapshot(5) lists it too):
        // 1. CPUID: which MSRs and XSAVE components KVM accepts depends on it.
        // 2. TSC frequency: before the TSC value, which KVM converts at the vCPU's rate.
        // 3. MP state, then registers: setting MP state may reset pending INIT/SIPI handling.
        // 4. SREGS before the LAPIC: the APIC base (and x2APIC mode) decides how the LAPIC
        //    state is read.
        // 5. XSAVE after SREGS (CR4.OSXSAVE), then XCRs, debug registers.
        // 6. LAPIC before MSRs: the TSC-deadline MSR is dropped unless the timer is already in
        //    TSC-deadline mode.
        // 7. MSRs, the TSC before the TSC deadline (an absolute TSC value).
        // 8. Pending events last: setting registers clears pending exceptions.
        // 9. Tell the guest it was stopped (kvm-clock), so its watchdogs do not fire.
        self.restore_cpuid(required(state, "cpuid")?)?;
        self.restore_tsc_khz(required(state, "tsc_khz")?)?;
        fd.set_mp_state(from_section(state, "mp_state")?)
            .map_err(|e| ioctl("KVM_SET_MP_STATE", e))?;
        fd.set_regs(&from_section(state, "regs")?)
            .map_err(|e| ioctl("KVM_SET_REGS", e))?;
        fd.set_sregs(&from_section(state, "sregs")?)
            .map_err(|e| ioctl("KVM_SET_SREGS", e))?;
        self.restore_xsave(required(state, "xsave")?)?;
        fd.set_xcrs(&from_section(state, "xcrs")?)
            .map_err(|e| ioctl("KVM_SET_XCRS", e))?;
        fd.set_debug_regs(&from_section(state, "debugregs")?)
            .map_err(|e| ioctl("KVM_SET_DEBUGREGS", e))?;
        let lapic: kvm_lapic_state = from_section(state, "lapic")?;
        fd.set_lapic(&lapic)
            .map_err(|e| ioctl("KVM_SET_LAPIC", e))?;
        self.restore_msrs(required(state, "msrs")?, &lapic)?;
        fd.set_vcpu_events(&from_section(state, "vcpu_events")?)
            .map_err(|e| ioctl("KVM_SET_VCPU_EVENTS", e))?;
        self.notify_paused()
    }

    fn tsc_ran_on(&self, state: &BackendState) -> Result<Option<std::time::Duration>> {
        let saved = msrs_from_bytes(required(state, "msrs")?)?
            .into_iter()
            .find(|m| m.index == MSR_IA32_TSC);
        let Some(saved) = saved else {
            return Ok(None);
        };
        let now = self.msrs(&[MSR_IA32_TSC])?;
        let khz = self
            .fd
            .get_tsc_khz()
            .map_err(|e| VmmError::ioctl("KVM_GET_TSC_KHZ", e))?;
        let Some(now) = now.first().filter(|_| khz > 0) else {
            return Ok(None);
        };
        Ok(tsc_run(saved.value, now.value, khz))
    }

    fn notify_paused(&self) -> Result<()> {
        match self.fd.kvmclock_ctrl() {
            Ok(()) => Ok(()),
            // The guest has not enabled kvm-clock: there is nobody to tell.
            Err(e) if e.errno() == libc::EINVAL => Ok(()),
            Err(e) => Err(VmmError::ioctl("KVM_KVMCLOCK_CTRL", e)),
        }
    }

    fn debug_regs(&self) -> Result<DebugRegs> {
        let d = self
            .fd
            .get_debug_regs()
            .map_err(|e| VmmError::ioctl("KVM_GET_DEBUGREGS", e))?;
        Ok(DebugRegs {
            dr: d.db,
            dr6: d.dr6,
            dr7: d.dr7,
        })
    }

    fn set_debug_regs(&self, regs: &DebugRegs) -> Result<()> {
        let mut d = self
            .fd
            .get_debug_regs()
            .map_err(|e| VmmError::ioctl("KVM_GET_DEBUGREGS", e))?;
        d.db = regs.dr;
        d.dr6 = regs.dr6;
        d.dr7 = regs.dr7;
        self.fd
            .set_debug_regs(&d)
            .map_err(|e| VmmError::ioctl("KVM_SET_DEBUGREGS", e))
    }

    fn inject_nmi(&self) -> Result<()> {
        self.fd.nmi().map_err(|e| VmmError::ioctl("KVM_NMI", e))
    }

    fn statistics_probe(&self) -> Option<Box<dyn StatisticsProbe>> {
        match VcpuCounters::open(&self.fd) {
            Ok(counters) => Some(Box::new(counters)),
            Err(e) => {
                log::debug!("vCPU {}: no binary statistics: {e}", self.id);
                None
            }
        }
    }
}

/// A KVM internal error in words. On a host without VT-x/AMD-V, KVM emulates guest kernel code
/// and real mode instruction by instruction and stops on instructions its emulator lacks
/// (`xrstor`, `int3`, `cmpxchg16b`): the reason every UEFI firmware stops early there.
fn describe_internal_error(suberror: u32, detail: &[u64], hardware_virtualization: bool) -> String {
    let what = match suberror {
        1 => "the hypervisor cannot emulate the instruction the guest stopped on",
        2 => "an exception occurred while the hypervisor delivered another one",
        3 => "the hypervisor could not deliver an event to the guest",
        4 => "the hardware left the guest for a reason the hypervisor does not know",
        _ => "the hypervisor stopped the guest on an internal error",
    };
    let mut text = format!("{what} (KVM internal error {suberror}, data {detail:x?})");
    if suberror == 1 && !hardware_virtualization {
        text.push_str(
            "; this host has no hardware virtualization (no vmx or svm flag in /proc/cpuinfo), \
             so KVM emulates guest kernel code and cannot run every instruction: firmware and \
             unmodified kernels need a host with VT-x or AMD-V",
        );
    }
    text
}

/// Whether the host CPU offers VT-x or AMD-V (`vmx` or `svm` in /proc/cpuinfo's flags).
fn host_has_hardware_virtualization() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| {
        info.lines()
            .filter(|line| line.starts_with("flags"))
            .flat_map(str::split_whitespace)
            .any(|flag| flag == "vmx" || flag == "svm")
    })
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

/// The time a TSC at `khz` took from `saved` to `now`, when that is more than a second (a
/// restored TSC reads the saved value plus the moments the restore took); a TSC that went
/// back (a host rebooted since the save, on a KVM that cannot set it) is left to the guest.
fn tsc_run(saved: u64, now: u64, khz: u32) -> Option<std::time::Duration> {
    let nanos = u128::from(now.checked_sub(saved)?) * 1_000_000 / u128::from(khz);
    let ran = std::time::Duration::from_nanos(u64::try_from(nanos).ok()?);
    (ran > std::time::Duration::from_secs(1)).then_some(ran)
}

fn tsc_within_tolerance(saved_khz: u32, current_khz: u32) -> bool {
    let difference = u64::from(saved_khz.abs_diff(current_khz));
    difference * 1_000_000 <= u64::from(saved_khz) * TSC_TOLERANCE_PPM
}

/// The TSC deadline to write back. A deadline of 0 disarms the timer; KVM reports 0 once an
/// armed deadline has passed, so a vCPU saved in TSC-deadline mode with 0 may be waiting for
/// a timer interrupt whose deadline just expired. Restoring 0 would leave it waiting for good;
/// the saved TSC value instead makes the timer fire as soon as the vCPU runs (at worst one
/// extra timer interrupt).
fn tsc_deadline_to_restore(saved: u64, lapic: &kvm_lapic_state, tsc: Option<&Msr>) -> u64 {
    let lvtt = lapic
        .regs
        .get(APIC_LVTT..APIC_LVTT + 4)
        .map(|b| u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8]))
        .unwrap_or(0);
    match tsc {
        Some(tsc)
            if saved == 0 && lvtt & APIC_LVT_TIMER_MODE_MASK == APIC_LVT_TIMER_TSC_DEADLINE =>
        {
            tsc.value
        }
        _ => saved,
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
        let (file, offsets) = open_stats(vcpu)?;
        let at = |wanted: &[u8]| {
            offsets
                .iter()
                .find(|(name, _)| name.as_slice() == wanted)
                .map(|&(_, at)| at)
        };
        let blocking = at(b"blocking")
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no 'blocking' statistic"))?;
        let wakeups = at(b"halt_wakeup");
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

/// Each statistic's name and the offset of its first value in the statistics file.
type StatOffsets = Vec<(Vec<u8>, u64)>;

/// The vCPU's binary statistics file and where each statistic's first value lies in it.
fn open_stats(vcpu: &VcpuFd) -> io::Result<(File, StatOffsets)> {
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
    let (name_size, num_desc, desc_offset, data_offset) = (word(4), word(8), word(16), word(20));
    if name_size == 0 || name_size > 1024 || num_desc > 4096 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "implausible stats header",
        ));
    }
    let desc_size = 16 + name_size as usize;
    let mut descriptors = vec![0u8; desc_size * num_desc as usize];
    file.read_exact_at(&mut descriptors, u64::from(desc_offset))?;
    let offsets = descriptors
        .chunks_exact(desc_size)
        .map(|desc| {
            let offset = u32::from_le_bytes([desc[8], desc[9], desc[10], desc[11]]);
            let name = &desc[16..];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            (name.to_vec(), u64::from(data_offset) + u64::from(offset))
        })
        .collect();
    Ok((file, offsets))
}

/// KVM's per-vCPU counters whose meaning matches a FreeBSD vmm statistic, with that
/// statistic's description, in FreeBSD's order. KVM's `insn_emulation` and `mmio_exits` are left
/// out: the first counts every emulated instruction (all of guest ring 0 on a host without
/// hardware virtualization), the second only the accesses user space serves, neither of them
/// FreeBSD's "vm exits for instruction emulation".
const KVM_STATISTICS: &[(&[u8], &str)] = &[
    (b"exits", "total number of vm exits"),
    (b"irq_exits", "vm exits due to external interrupt"),
    (b"halt_exits", "number of times hlt was intercepted"),
    (
        b"irq_window_exits",
        "vm exits due to interrupt window opening",
    ),
    (b"nmi_window_exits", "vm exits due to nmi window opening"),
    (b"io_exits", "number of times in/out was intercepted"),
];

/// The counters of [`KVM_STATISTICS`] this kernel has.
struct VcpuCounters {
    file: File,
    counters: Vec<(&'static str, u64)>,
}

impl VcpuCounters {
    fn open(vcpu: &VcpuFd) -> io::Result<Self> {
        let (file, offsets) = open_stats(vcpu)?;
        let counters = KVM_STATISTICS
            .iter()
            .filter_map(|&(kvm_name, description)| {
                offsets
                    .iter()
                    .find(|(name, _)| name.as_slice() == kvm_name)
                    .map(|&(_, at)| (description, at))
            })
            .collect();
        Ok(Self { file, counters })
    }
}

impl StatisticsProbe for VcpuCounters {
    fn read(&self) -> Option<Vec<Statistic>> {
        self.counters
            .iter()
            .map(|&(description, at)| {
                let mut value = [0u8; 8];
                self.file.read_exact_at(&mut value, at).ok()?;
                Some(Statistic {
                    description: description.to_string(),
                    value: u64::from_le_bytes(value),
                })
            })
            .collect()
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

    /// The KVM backend, or `None` (with a message) where /dev/kvm cannot be used.
    /// One vCPU and 2 MiB of RAM.
    fn small_vm() -> VmSpec {
        VmSpec {
            name: "test".into(),
            topology: Topology::default(),
            memory: super::super::MemorySpec {
                size: 2 << 20,
                wired: false,
                guest_in_core: false,
                prebuilt: None,
            },
            capabilities: Default::default(),
            destroy_on_close: true,
        }
    }

    fn kvm_or_skip() -> Option<KvmHypervisor> {
        match KvmHypervisor::open() {
            Ok(hv) => Some(hv),
            Err(e) => {
                if std::env::var("BHYVE_RS_REQUIRE_KVM").as_deref() == Ok("1") {
                    panic!("BHYVE_RS_REQUIRE_KVM=1 but /dev/kvm is unusable: {e}");
                }
                eprintln!("skipped: /dev/kvm is unusable here: {e}");
                None
            }
        }
    }

    fn saved_msr_indices(state: &BackendState) -> Vec<u32> {
        msrs_from_bytes(state.section("msrs").unwrap())
            .unwrap()
            .iter()
            .map(|m| m.index)
            .collect()
    }

    #[test]
    fn saved_vcpu_state_holds_cpuid_tsc_rate_and_paravirtual_and_deadline_msrs() {
        let Some(hv) = kvm_or_skip() else { return };
        let supported = hv.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let leaf = |function: u32| {
            supported
                .as_slice()
                .iter()
                .find(|e| e.function == function)
                .copied()
                .unwrap_or_default()
        };
        let vm = hv.create_vm(small_vm()).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let state = vcpu.save_state().unwrap();

        let cpuid = cpuid_from_bytes(state.section("cpuid").unwrap()).unwrap();
        assert!(cpuid.iter().any(|e| e.function == 0x4000_0000));
        let khz = u32::from_le_bytes(state.section("tsc_khz").unwrap().try_into().unwrap());
        assert!(khz > 100_000, "TSC at {khz} kHz");

        let saved = saved_msr_indices(&state);
        // KVM's paravirtual MSRs, each present when KVM offers its feature (CPUID 0x40000001).
        let kvm_features = leaf(0x4000_0001).eax;
        let paravirtual = [
            (3, 0x4b56_4d00), // kvmclock2: wall clock
            (3, 0x4b56_4d01), // kvmclock2: system time
            (4, 0x4b56_4d02), // async page faults
            (5, 0x4b56_4d03), // steal time
            (6, 0x4b56_4d04), // PV end of interrupt
        ];
        let mut expected: Vec<u32> = paravirtual
            .iter()
            .filter(|(bit, _)| kvm_features & (1 << bit) != 0)
            .map(|&(_, msr)| msr)
            .collect();
        assert!(
            !expected.is_empty(),
            "KVM offers no kvm-clock ({kvm_features:#x})"
        );
        if leaf(1).ecx & (1 << 24) != 0 {
            expected.push(MSR_IA32_TSC_DEADLINE);
        }
        expected.push(MSR_IA32_TSC);
        for msr in expected {
            assert!(saved.contains(&msr), "MSR {msr:#x} missing from {saved:x?}");
        }
        // Whatever KVM listed is either saved or recorded as skipped.
        let skipped: Vec<u32> = state
            .section("msrs_skipped")
            .unwrap()
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let listed = hv.kvm.get_msr_index_list().unwrap();
        assert_eq!(saved.len() + skipped.len(), listed.as_slice().len());
    }

    #[test]
    fn a_long_msr_list_is_restored_in_batches_kvm_accepts() {
        let Some(hv) = kvm_or_skip() else { return };
        let vm = hv.create_vm(small_vm()).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut state = vcpu.save_state().unwrap();
        let saved = msrs_from_bytes(state.section("msrs").unwrap()).unwrap();
        // A snapshot may list more MSRs than KVM takes in one call (a forged one, any number);
        // a batch of exactly KVM_MAX_MSR_ENTRIES is already one too many.
        let sysenter_cs = 0x174;
        for extra in [
            KVM_MAX_MSR_ENTRIES - saved.len() % KVM_MAX_MSR_ENTRIES,
            1000,
        ] {
            let mut msrs = saved.clone();
            msrs.extend((0..extra).map(|i| Msr {
                index: sysenter_cs,
                value: i as u64,
            }));
            for s in &mut state.sections {
                if s.name == "msrs" {
                    s.bytes = msrs_to_bytes(&msrs);
                }
            }
            vcpu.restore_state(&state).unwrap();
            assert_eq!(
                vcpu.msrs(&[sysenter_cs]).unwrap()[0].value,
                extra as u64 - 1
            );
        }
    }

    #[test]
    fn a_tsc_that_ran_on_is_measured_in_its_own_ticks() {
        // 2.5 GHz: 2.5e9 ticks are one second, not more than one: the TSC held.
        assert_eq!(tsc_run(1_000, 1_000 + 2_500_000_000, 2_500_000), None);
        assert_eq!(
            tsc_run(1_000, 1_000 + 300 * 2_500_000_000, 2_500_000),
            Some(std::time::Duration::from_secs(300))
        );
        // Backwards (another host boot): not a run.
        assert_eq!(tsc_run(5_000_000_000_000, 1_000, 2_500_000), None);
        // A year at 1 kHz does not overflow.
        assert_eq!(
            tsc_run(0, 365 * 86_400 * 1_000, 1),
            Some(std::time::Duration::from_secs(365 * 86_400))
        );
    }

    #[test]
    fn an_armed_tsc_deadline_survives_save_and_restore() {
        let Some(hv) = kvm_or_skip() else { return };
        let supported = hv.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let has_deadline = supported
            .as_slice()
            .iter()
            .any(|e| e.function == 1 && e.ecx & (1 << 24) != 0);
        if !has_deadline {
            eprintln!("skipped: KVM offers no TSC-deadline timer");
            return;
        }
        let vm = hv.create_vm(small_vm()).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut state = vcpu.save_state().unwrap();
        // Edit the saved state: LAPIC timer in TSC-deadline mode, a deadline far ahead.
        let mut lapic: kvm_lapic_state = from_section(&state, "lapic").unwrap();
        let lvtt = (APIC_LVT_TIMER_TSC_DEADLINE | 0xec).to_le_bytes();
        for (i, b) in lvtt.iter().enumerate() {
            lapic.regs[APIC_LVTT + i] = *b as _;
        }
        let mut msrs = msrs_from_bytes(state.section("msrs").unwrap()).unwrap();
        let tsc = msrs.iter().find(|m| m.index == MSR_IA32_TSC).unwrap().value;
        let deadline = tsc + (1 << 40);
        msrs.retain(|m| m.index != MSR_IA32_TSC_DEADLINE);
        // KVM drops the deadline unless the LAPIC is already in TSC-deadline mode: this fails
        // if the MSRs are restored before the LAPIC.
        msrs.insert(
            0,
            Msr {
                index: MSR_IA32_TSC_DEADLINE,
                value: deadline,
            },
        );
        for s in &mut state.sections {
            match s.name.as_str() {
                "lapic" => s.bytes = pod_bytes(&lapic).to_vec(),
                "msrs" => s.bytes = msrs_to_bytes(&msrs),
                _ => {}
            }
        }

        let other = hv.create_vm(small_vm()).unwrap();
        let restored = other.create_vcpu(0).unwrap();
        other.restore_state(&vm.save_state().unwrap()).unwrap();
        restored.restore_state(&state).unwrap();
        assert_eq!(
            restored.msrs(&[MSR_IA32_TSC_DEADLINE]).unwrap()[0].value,
            deadline
        );
        assert!(restored.msrs(&[MSR_IA32_TSC]).unwrap()[0].value >= tsc);
    }

    #[test]
    fn an_expired_deadline_in_deadline_mode_is_restored_as_the_tsc() {
        let mut lapic = kvm_lapic_state::default();
        let tsc = Msr {
            index: MSR_IA32_TSC,
            value: 5000,
        };
        assert_eq!(tsc_deadline_to_restore(0, &lapic, Some(&tsc)), 0);
        for (i, b) in APIC_LVT_TIMER_TSC_DEADLINE.to_le_bytes().iter().enumerate() {
            lapic.regs[APIC_LVTT + i] = *b as _;
        }
        assert_eq!(tsc_deadline_to_restore(0, &lapic, Some(&tsc)), 5000);
        assert_eq!(tsc_deadline_to_restore(7000, &lapic, Some(&tsc)), 7000);
        assert_eq!(tsc_deadline_to_restore(0, &lapic, None), 0);
    }

    #[test]
    fn the_platform_checked_before_a_vm_exists_is_the_one_kvm_gives() {
        let Some(hv) = kvm_or_skip() else { return };
        assert_eq!(hv.platform(), super::super::host_platform());
        let vm = hv.create_vm(small_vm()).unwrap();
        assert_eq!(*vm.platform(), hv.platform());
        assert!(matches!(
            vm.seed_rtc(&RtcSeed {
                nvram: Vec::new(),
                time: 0
            }),
            Err(VmmError::Unsupported(_))
        ));
    }

    #[test]
    fn an_emulation_failure_says_what_happened_and_blames_missing_vtx_or_amdv_only_then() {
        let without = describe_internal_error(1, &[0x0f, 0xae], false);
        assert!(
            without.starts_with("the hypervisor cannot emulate the instruction"),
            "{without}"
        );
        assert!(without.contains("no hardware virtualization"), "{without}");
        let with = describe_internal_error(1, &[], true);
        assert!(!with.contains("hardware virtualization"), "{with}");
        let delivery = describe_internal_error(3, &[], false);
        assert!(
            delivery.contains("could not deliver an event"),
            "{delivery}"
        );
        assert!(!delivery.contains("hardware virtualization"), "{delivery}");
    }

    #[test]
    fn tsc_rates_within_250_ppm_need_no_change() {
        assert!(tsc_within_tolerance(2_000_000, 2_000_500));
        assert!(!tsc_within_tolerance(2_000_000, 2_000_501));
        assert!(!tsc_within_tolerance(2_000_000, 3_000_000));
    }

    #[test]
    fn cpuid_tables_round_trip_and_reject_torn_input() {
        let entries = vec![kvm_cpuid_entry2 {
            function: 7,
            ebx: 0x20,
            ..Default::default()
        }];
        let bytes = cpuid_to_bytes(&entries);
        assert_eq!(cpuid_from_bytes(&bytes).unwrap()[0].ebx, 0x20);
        assert!(cpuid_from_bytes(&bytes[1..]).is_err());
        assert!(cpuid_from_bytes(&[]).is_err());
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
