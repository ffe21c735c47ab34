//! The backend seam: one trait family, shaped by FreeBSD's vmm and implemented by KVM (Linux)
//! and, on FreeBSD, by `/dev/vmm`.
//!
//! - [`Hypervisor`] opens the facility, says which platform its kernel provides
//!   ([`PlatformCaps`]) and creates a VM from a [`VmSpec`]: name, topology, memory and
//!   capabilities, everything both kernels need up front.
//! - [`Vm`] owns guest memory (FreeBSD allocates it in memory segments; KVM's backend maps it and
//!   registers it) and the boot ROM mapping, creates vCPUs, raises interrupts (it is the
//!   [`InterruptSink`] devices use) and saves the state its kernel holds.
//! - [`Vcpu`] runs the guest. Port I/O, MMIO and MSR accesses are served while it runs, through
//!   the [`ExitHandler`] it is given, so each backend decodes them its own way (KVM decodes MMIO
//!   itself; FreeBSD hands userland the instruction to emulate). What `run` returns is a
//!   lifecycle event only ([`VmExit`]). A vCPU is kicked out of the guest through the
//!   [`VcpuKick`] its backend provides.
//!
//! Nothing outside this module names `kvm_ioctls`; exits and registers cross the seam in the
//! backend-neutral types below. For snapshots, [`Vm::save_state`] and [`Vcpu::save_state`] hand
//! out the hypervisor-held state as [`BackendState`]: named byte sections tagged with the
//! backend, listed in restore order, restored by the matching `restore_state`, and
//! [`Vm::finish_restore`] ends a restore (FreeBSD's `VM_RESTORE_TIME`).
//!
//! # Where FreeBSD's vmm meets the seam
//!
//! | `VM_EXITCODE_*` | handled by |
//! |---|---|
//! | `INOUT`, `INOUT_STR` | [`ExitHandler::port_read`] / [`ExitHandler::port_write`], once per access (the backend walks string I/O through guest memory) |
//! | `INST_EMUL`, `PAGING` | the backend's instruction emulator, calling [`ExitHandler::mmio_read`] / [`ExitHandler::mmio_write`] per memory access; an unresolvable fault is [`VmExit::Failed`] |
//! | `RDMSR`, `WRMSR` | [`ExitHandler::msr_read`] / [`ExitHandler::msr_write`]; `None` / `false` raise #GP (`x86.strictmsr`) |
//! | `HLT` | [`VmExit::Halted`] (a hint to yield) |
//! | `SPINUP_AP`, `IPI` (INIT/SIPI) | [`VmExit::StartAp`], then [`Vcpu::start_ap`] |
//! | `SUSPENDED` | [`VmExit::Suspended`] with its [`SuspendReason`] (reset, power-off, halt, triple fault) |
//! | `VMX`, `SVM`, `TASK_SWITCH` | [`VmExit::Failed`], said in words |
//! | `MONITOR`, `MWAIT`, `VMINSN` | the backend raises #UD ([`Vcpu::inject_exception`]) and runs on |
//! | `BOGUS`, `PAUSE`, `RENDEZVOUS`, `REQIDLE`, `IOAPIC_EOI`, `MTRAP`, `DEBUG`, `BPT`, `DB` | inside the backend's run loop, which enters the guest again; a kick ends it with [`VmExit::Interrupted`] |
//!
//! | ioctl group | handled by |
//! |---|---|
//! | create, destroy (`VMMCTL_VM_*`, `hw.vmm.create`), `VM_REINIT` | [`Hypervisor::create_vm`] with [`VmSpec::name`] and [`VmSpec::destroy_on_close`]; dropping the [`Vm`] |
//! | memory (`VM_ALLOC_MEMSEG`, `VM_MMAP_MEMSEG`, `VM_MMAP_GETNEXT`, `VM_MUNMAP_MEMSEG`) | [`Hypervisor::create_vm`] ([`MemorySpec`], `-S` as `VM_MEMMAP_F_WIRED`), [`Vm::memory`], [`Vm::map_rom`] (the boot ROM memseg) |
//! | vCPU setup (`VM_SET_TOPOLOGY`, `VM_SET_CAPABILITY`, `VM_SET_X2APIC_STATE`, `VM_ACTIVATE_CPU`) | [`VmSpec::topology`], [`VmSpec::capabilities`], [`Vm::create_vcpu`], [`Vcpu::start_ap`] |
//! | registers (`VM_{GET,SET}_REGISTER{,_SET}`, `VM_{GET,SET}_SEGMENT_DESCRIPTOR`, `VM_{GET,SET}_INTINFO`, `VM_GLA2GPA`, `VM_RESTART_INSTRUCTION`) | [`Vcpu::regs`], [`Vcpu::special_regs`], [`Vcpu::save_state`] / [`Vcpu::restore_state`]; address translation stays inside the backend's emulator |
//! | run (`VM_RUN`, `VM_SUSPEND_CPU`, `VM_RESUME_CPU`, `VM_GET_CPUS`, `VM_SUSPEND`) | [`Vcpu::run`], [`VcpuKick`] |
//! | interrupts (`VM_LAPIC_MSI`, `VM_IOAPIC_{ASSERT,DEASSERT,PULSE}_IRQ`, `VM_ISA_*`, `VM_IOAPIC_PINCOUNT`, `VM_INJECT_EXCEPTION`) | [`InterruptSink`] (lines, MSI, ISA trigger mode), [`PlatformCaps::ioapic_pins`], [`Vcpu::inject_exception`] |
//! | platform (`VM_RTC_*`, `VM_GET_HPET_CAPABILITIES`) | [`PlatformCaps`] says what the kernel holds; [`Vm::seed_rtc`] seeds a kernel RTC |
//! | snapshots (`VM_SNAPSHOT_REQ`, `VM_RESTORE_TIME`) | [`Vm::save_state`] / [`Vm::restore_state`], [`Vm::finish_restore`] |
//! | statistics (`VM_STATS`, `VM_STAT_DESC`) | [`BlockedProbe`] (halt detection), [`StatisticsProbe`] (`bhyvectl --get-stats` through the control socket) |
//! | `VM_INJECT_NMI` | [`Vcpu::inject_nmi`] (`bhyvectl --inject-nmi`) |
//! | PCI passthrough (`VM_*_PPTDEV*`), `VM_LAPIC_IRQ`, `VM_*_KERNEMU_DEV` | not used by bhyve-rs yet: no passthrough device, and LAPIC interrupts come only from the guest |

use std::io;
use std::sync::Arc;

use crate::interrupts::InterruptSink;
use crate::memory::{GuestMemory, GuestRegion};

pub use crate::description::Topology;

pub mod cpuid;
pub mod freebsd;
#[cfg(target_os = "linux")]
pub mod kvm;
pub mod x86emul;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{path}: {}", describe_io_error(.source))]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{what}: {}", describe_io_error(.source))]
    Ioctl {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the hypervisor lacks {0}")]
    MissingCapability(&'static str),
    #[error("{0} is not supported by this backend")]
    Unsupported(&'static str),
    #[error("{0}")]
    Invalid(String),
}

impl VmmError {
    pub fn ioctl(what: &'static str, source: impl Into<io::Error>) -> Self {
        VmmError::Ioctl {
            what,
            source: source.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, VmmError>;

/// An I/O error as one line, like strerror(3): without Rust's "(os error N)" suffix.
pub fn describe_io_error(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(cut) => text[..cut].to_string(),
        None => text,
    }
}

/// What ended a [`Vcpu::run`]: lifecycle events only. Device accesses never come back here;
/// they are served through the [`ExitHandler`] while the vCPU runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The run was cut short by a kick ([`VcpuKick`]); nothing happened.
    Interrupted,
    /// HLT reached user space (FreeBSD with `-H`): a hint to yield the host CPU.
    Halted,
    /// The guest started application processor `vcpu` at `rip` with INIT/SIPI, on a backend
    /// whose kernel leaves AP start to user space (FreeBSD's `VM_EXITCODE_SPINUP_AP`).
    StartAp { vcpu: u32, rip: u64 },
    /// The VM is suspended: every vCPU stops, and bhyve exits with the reason's status.
    Suspended(SuspendReason),
    /// An access the [`ExitHandler`] refused to serve; the VM must stop. The text names it.
    AccessFault(String),
    /// The guest reported a crash through the hypervisor (KVM's crash system event).
    GuestCrash,
    /// The hypervisor cannot go on with this vCPU; the text says why in words.
    Failed(String),
}

/// Why a VM is suspended, as FreeBSD's `enum vm_suspend_how` lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuspendReason {
    Reset,
    PowerOff,
    /// Every vCPU halted with interrupts disabled.
    Halt,
    TripleFault,
}

/// An access the [`ExitHandler`] could not serve; the text names it ("Unhandled inb 0x02f8").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessFault(pub String);

/// Serves the guest's device and MSR accesses while a vCPU runs. A backend calls it once per
/// access of an instruction (string I/O arrives split into single accesses).
pub trait ExitHandler: Sync {
    /// `in` from `port`: fill `data` (1, 2 or 4 bytes).
    fn port_read(&self, port: u16, data: &mut [u8]) -> std::result::Result<(), AccessFault>;
    /// `out` to `port`.
    fn port_write(&self, port: u16, data: &[u8]) -> std::result::Result<(), AccessFault>;
    fn mmio_read(&self, gpa: u64, data: &mut [u8]) -> std::result::Result<(), AccessFault>;
    fn mmio_write(&self, gpa: u64, data: &[u8]) -> std::result::Result<(), AccessFault>;
    /// RDMSR of an MSR the hypervisor does not handle: `Some(value)`, or `None` to raise #GP.
    fn msr_read(&self, vcpu: u32, index: u32) -> std::result::Result<Option<u64>, AccessFault>;
    /// WRMSR of an MSR the hypervisor does not handle: `true` when taken, `false` to raise #GP.
    fn msr_write(
        &self,
        vcpu: u32,
        index: u32,
        value: u64,
    ) -> std::result::Result<bool, AccessFault>;
}

/// Makes a vCPU leave the guest soon: its current or next [`Vcpu::run`] returns
/// [`VmExit::Interrupted`]. Callable from any thread; never lost, whether the vCPU is inside
/// the guest or about to enter it (KVM: a signal and `immediate_exit`; FreeBSD:
/// `VM_SUSPEND_CPU`).
pub trait VcpuKick: Send + Sync {
    fn kick(&self);
}

/// What user space tells a kernel-held RTC before the guest runs (bhyve's `vrtc_init`): CMOS
/// NVRAM bytes (the memory sizes firmware reads) and the time of day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtcSeed {
    /// `(offset, value)` pairs for the NVRAM (`VM_RTC_WRITE`).
    pub nvram: Vec<(u8, u8)>,
    /// Seconds since the epoch in the RTC's time zone (`VM_RTC_SETTIME`).
    pub time: i64,
}

/// What a VM is, decided before it exists.
pub struct VmSpec {
    /// The VM's name (FreeBSD: `/dev/vmm/NAME`).
    pub name: String,
    pub topology: Topology,
    pub memory: MemorySpec,
    pub capabilities: VmCapabilities,
    /// The VM is destroyed when this process closes it, even if it dies (FreeBSD 15's
    /// `VMMCTL_CREATE_DESTROY_ON_CLOSE`; always so on KVM).
    pub destroy_on_close: bool,
}

/// Guest RAM of a new VM.
pub struct MemorySpec {
    /// Bytes of RAM, laid out as [`crate::memory::layout`] says.
    pub size: u64,
    /// `-S`: wire every page before the guest runs.
    pub wired: bool,
    /// `-C`: keep guest memory in core dumps (left out otherwise).
    pub guest_in_core: bool,
    /// RAM the caller built (a snapshot's RAM, mapped or copied), used instead of fresh memory;
    /// only where [`PlatformCaps::prebuilt_ram`] says the backend takes it.
    pub prebuilt: Option<GuestMemory>,
}

/// vmm capabilities bhyve sets per vCPU (`VM_CAP_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmCapabilities {
    /// `-H`: HLT exits to user space (`VM_CAP_HALT_EXIT`).
    pub exit_on_hlt: bool,
    /// `-P`: PAUSE exits (`VM_CAP_PAUSE_EXIT`).
    pub exit_on_pause: bool,
    /// `-x`: local APICs in x2APIC mode (`vm_set_x2apic_state`).
    pub x2apic: bool,
}

/// What the backend's kernel provides and how it behaves, so user space supplies exactly the
/// rest and a guest sees the same machine on every backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformCaps {
    /// The RTC/CMOS lives in the kernel (FreeBSD's vrtc); user space only seeds it.
    pub kernel_rtc: bool,
    /// The ACPI PM timer lives in the kernel (FreeBSD's vpmtmr).
    pub kernel_pm_timer: bool,
    /// The HPET lives in the kernel (FreeBSD's vhpet).
    pub kernel_hpet: bool,
    /// Input pins of the kernel's I/O APIC (FreeBSD 32, KVM 24).
    pub ioapic_pins: u8,
    /// The kernel suspends the VM itself when every vCPU halts with interrupts disabled
    /// (FreeBSD's `VM_SUSPEND_HALT`); otherwise user space watches for it.
    pub kernel_halt_detection: bool,
    /// The kernel starts APs on INIT/SIPI itself (KVM's local APIC); otherwise a vCPU reports
    /// [`VmExit::StartAp`] and user space starts the AP.
    pub kernel_ap_start: bool,
    /// [`MemorySpec::prebuilt`] is accepted, so a snapshot's RAM can be mapped copy-on-write.
    pub prebuilt_ram: bool,
    /// Snapshots of this backend's kernel state are supported.
    pub snapshots: bool,
    /// The kernel records which RAM pages the guest writes ([`Vm::start_dirty_log`]), so a
    /// checkpoint can copy memory while the guest runs.
    pub dirty_log: bool,
}

impl PlatformCaps {
    /// KVM's: the interrupt controllers and the PIT in the kernel, but not the RTC, the PM timer
    /// or the HPET, which user space emulates; a 24-pin I/O APIC; APs started by the in-kernel
    /// local APIC; halts seen only by watching the vCPUs.
    pub const KVM: PlatformCaps = PlatformCaps {
        kernel_rtc: false,
        kernel_pm_timer: false,
        kernel_hpet: false,
        ioapic_pins: 24,
        kernel_halt_detection: false,
        kernel_ap_start: true,
        prebuilt_ram: true,
        snapshots: true,
        dirty_log: true,
    };

    /// FreeBSD vmm's: RTC (vrtc), PM timer (vpmtmr) and HPET (vhpet) in the kernel besides the
    /// interrupt controllers and the PIT; a 32-pin I/O APIC; halts detected by the kernel
    /// (`VM_SUSPEND_HALT`); APs started by user space (`VM_EXITCODE_SPINUP_AP`); RAM in the
    /// kernel's memory segments, so a restore copies into them; snapshots where the kernel has
    /// `options BHYVE_SNAPSHOT`.
    pub const FREEBSD: PlatformCaps = PlatformCaps {
        kernel_rtc: true,
        kernel_pm_timer: true,
        kernel_hpet: true,
        ioapic_pins: 32,
        kernel_halt_detection: true,
        kernel_ap_start: false,
        prebuilt_ram: false,
        snapshots: true,
        dirty_log: false,
    };
}

/// What the backend this host uses gives every VM, known before any is created, so a
/// configuration is checked against it without opening the hypervisor.
pub fn host_platform() -> PlatformCaps {
    if cfg!(target_os = "linux") {
        PlatformCaps::KVM
    } else {
        PlatformCaps::FREEBSD
    }
}

/// General-purpose registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// RFLAGS.IF: maskable interrupts enabled.
pub const RFLAGS_IF: u64 = 1 << 9;

/// A segment register with its hidden descriptor part.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    pub db: bool,
    pub s: bool,
    pub l: bool,
    pub g: bool,
    pub avl: bool,
    pub unusable: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Segment, descriptor-table and control registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecialRegs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

/// Multiprocessor state of a vCPU (the local APIC's view).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MpState {
    Runnable,
    /// An AP waiting for INIT/SIPI: it has not been started.
    WaitForSipi,
    InitReceived,
    Halted,
    SipiReceived,
    Other(u32),
}

/// One model-specific register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msr {
    pub index: u32,
    pub value: u64,
}

/// Backend state the hypervisor keeps for a VM or a vCPU, as opaque named sections tagged with
/// the backend that produced them (a KVM blob cannot be given to FreeBSD's vmm). Sections are
/// listed in the order they must be restored; the byte layouts are the backend's own
/// (KVM: the kernel's structs, native byte order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendState {
    pub backend: String,
    pub sections: Vec<StateSection>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateSection {
    pub name: String,
    pub bytes: Vec<u8>,
}

impl BackendState {
    pub fn section(&self, name: &str) -> Option<&[u8]> {
        self.sections
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.bytes.as_slice())
    }
}

/// Debug registers: DR0-DR3, DR6 and DR7.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DebugRegs {
    pub dr: [u64; 4],
    pub dr6: u64,
    pub dr7: u64,
}

/// One per-vCPU counter kept by the hypervisor, named with the description FreeBSD's vmm gives
/// the counter of the same meaning (`vmm_stat.c`, `vmm.c`), so `bhyvectl --get-stats` reads
/// the same on every backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statistic {
    pub description: String,
    pub value: u64,
}

/// Reads a vCPU's counters from any thread without stopping it.
pub trait StatisticsProbe: Send + Sync {
    /// The counters in the backend's order, or `None` when they cannot be read.
    fn read(&self) -> Option<Vec<Statistic>>;
}

/// Cheap look at whether a vCPU sits blocked in the hypervisor (halted or waiting for SIPI),
/// readable from any thread without stopping the vCPU.
pub trait BlockedProbe: Send + Sync {
    /// `(blocked now, number of wake-ups so far)`, or `None` when it cannot be read.
    fn sample(&self) -> Option<(bool, u64)>;
}

/// The virtualization facility.
pub trait Hypervisor: Send + Sync {
    /// What every VM of this backend gets from the kernel.
    fn platform(&self) -> PlatformCaps;
    /// Create a VM with its guest memory, its in-kernel interrupt controllers and timers.
    fn create_vm(&self, spec: VmSpec) -> Result<Arc<dyn Vm>>;
}

/// One VM.
pub trait Vm: InterruptSink + Send + Sync {
    /// What the kernel provides for this VM (the [`Hypervisor::platform`] it was created with).
    fn platform(&self) -> &PlatformCaps;
    /// Guest RAM, owned by the VM for its whole life.
    fn memory(&self) -> &Arc<GuestMemory>;
    /// Make `rom` read-only guest memory (a boot ROM): the guest reads and executes it, its
    /// writes leave as MMIO accesses. The caller keeps `rom` alive for as long as the VM exists
    /// (a backend may map it, as KVM does, or copy it into a memory segment, as FreeBSD does).
    fn map_rom(&self, rom: &GuestRegion) -> Result<()>;
    /// Seed the kernel's RTC, where [`PlatformCaps::kernel_rtc`] says there is one; a backend
    /// without one says [`VmmError::Unsupported`].
    fn seed_rtc(&self, seed: &RtcSeed) -> Result<()>;
    /// Create vCPU `id` (its APIC id) in its reset state, with CPUID describing the VM's
    /// topology: vCPU 0 runnable, the others waiting for INIT/SIPI.
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>>;
    /// Upcast to the interrupt interface devices use.
    fn interrupt_sink(self: Arc<Self>) -> Arc<dyn InterruptSink>;
    /// In-kernel device and clock state (KVM: PIC pair, IOAPIC, PIT, kvm-clock). Take it with
    /// every vCPU paused.
    fn save_state(&self) -> Result<BackendState>;
    /// Put back what [`Vm::save_state`] returned; before restoring any vCPU.
    fn restore_state(&self, state: &BackendState) -> Result<()>;
    /// The last step of a restore, after every vCPU and device state is back and before any
    /// vCPU runs (FreeBSD: `VM_RESTORE_TIME` restarts the kernel's timers from the saved time).
    fn finish_restore(&self) -> Result<()>;
    /// Start recording which RAM pages the guest writes (KVM: `KVM_MEM_LOG_DIRTY_PAGES` on
    /// every RAM slot), where [`PlatformCaps::dirty_log`] says the kernel can;
    /// [`VmmError::Unsupported`] otherwise. Writes made by user space through [`Vm::memory`]
    /// are not recorded.
    fn start_dirty_log(&self) -> Result<()>;
    /// The pages the guest wrote since dirty logging started or since the last call, which
    /// forgets them: one [`DirtyPages`] per region of [`Vm::memory`], in its order.
    fn take_dirty_pages(&self) -> Result<Vec<DirtyPages>>;
    /// Stop recording (the guest runs at full speed again).
    fn stop_dirty_log(&self) -> Result<()>;
}

/// Which 4 KiB pages of one RAM region were written: bit `p % 64` of word `p / 64` for page `p`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DirtyPages {
    pub bitmap: Vec<u64>,
}

impl DirtyPages {
    pub fn is_dirty(&self, page: usize) -> bool {
        self.bitmap
            .get(page / 64)
            .is_some_and(|word| word & (1 << (page % 64)) != 0)
    }

    pub fn count(&self) -> usize {
        self.bitmap.iter().map(|w| w.count_ones() as usize).sum()
    }
}

/// One virtual CPU. Owned by one thread at a time; the run loop and the state accessors must
/// not overlap (the [`crate::vcpu::VcpuSet`] guarantees that).
pub trait Vcpu: Send {
    fn id(&self) -> u32;
    /// Enter the guest and stay there, serving accesses through `handler`, until a lifecycle
    /// event or a kick.
    fn run(&mut self, handler: &dyn ExitHandler) -> Result<VmExit>;
    /// The handle that kicks this vCPU out of [`Vcpu::run`] from any thread.
    fn kicker(&self) -> Arc<dyn VcpuKick>;
    /// Bind the vCPU to the calling thread, which will run it: kicks reach it from now on.
    fn enter_thread(&mut self) -> Result<()>;
    /// Undo [`Vcpu::enter_thread`] before the vCPU leaves the thread.
    fn leave_thread(&mut self);
    /// Put a waiting AP at `rip` in real mode and make it runnable, after
    /// [`VmExit::StartAp`] (only where the kernel leaves AP start to user space).
    fn start_ap(&mut self, rip: u64) -> Result<()>;
    /// Raise exception `vector` (with `error_code` where the exception has one) before the
    /// next guest instruction.
    fn inject_exception(&self, vector: u8, error_code: Option<u32>) -> Result<()>;
    fn regs(&self) -> Result<Regs>;
    fn set_regs(&self, regs: &Regs) -> Result<()>;
    fn special_regs(&self) -> Result<SpecialRegs>;
    fn set_special_regs(&self, sregs: &SpecialRegs) -> Result<()>;
    /// Read the MSRs named by `indices` (values are filled in).
    fn msrs(&self, indices: &[u32]) -> Result<Vec<Msr>>;
    fn set_msrs(&self, msrs: &[Msr]) -> Result<()>;
    fn mp_state(&self) -> Result<MpState>;
    fn set_mp_state(&self, state: MpState) -> Result<()>;
    /// See [`BlockedProbe`]; `None` when the backend has no such view (or needs none, because
    /// its kernel detects a halted VM itself).
    fn blocked_probe(&self) -> Option<Box<dyn BlockedProbe>>;
    /// The complete vCPU state (CPUID, TSC frequency, registers, FPU/XSAVE, local APIC, MSRs,
    /// pending events, MP state). The vCPU must not be running.
    fn save_state(&self) -> Result<BackendState>;
    /// Put back what [`Vcpu::save_state`] returned (after the VM state).
    fn restore_state(&self, state: &BackendState) -> Result<()>;
    /// After [`Vcpu::restore_state`]: how far the guest's TSC has run past the value `state`
    /// holds, when the backend could not put it back; `None` when the TSC continues from the
    /// saved value, as FreeBSD's VM_RESTORE_TIME and a KVM with TSC offsetting make it. On a
    /// KVM whose guests read the host's TSC (these machines' kvm_pvm ignores TSC writes), the
    /// guest's TSC clock moves on by the time the VM spent saved, and the clocks the guest
    /// reads beside it must follow (see `devices::Persist::guest_time_moved`).
    fn tsc_ran_on(&self, _state: &BackendState) -> Result<Option<std::time::Duration>> {
        Ok(None)
    }
    /// Tell the guest it was stopped for a while (KVM: KVM_KVMCLOCK_CTRL sets kvm-clock's
    /// "guest stopped" flag at the next entry), so its soft-lockup and clocksource watchdogs
    /// do not take the gap for a hang. Call while the vCPU is paused; a guest without such a
    /// clock is not an error.
    fn notify_paused(&self) -> Result<()>;
    /// DR0-DR3, DR6, DR7. The vCPU must not be running.
    fn debug_regs(&self) -> Result<DebugRegs> {
        Err(VmmError::Unsupported("reading debug registers"))
    }
    fn set_debug_regs(&self, _regs: &DebugRegs) -> Result<()> {
        Err(VmmError::Unsupported("writing debug registers"))
    }
    /// Make an NMI pending (FreeBSD's `VM_INJECT_NMI`). The vCPU must not be running.
    fn inject_nmi(&self) -> Result<()> {
        Err(VmmError::Unsupported("NMI injection"))
    }
    /// The vCPU's counters, readable while it runs (`bhyvectl --get-stats`); `None` where the
    /// backend keeps none.
    fn statistics_probe(&self) -> Option<Box<dyn StatisticsProbe>> {
        None
    }
}

/// Open the backend for this host.
#[cfg(target_os = "linux")]
pub fn open_hypervisor() -> Result<Box<dyn Hypervisor>> {
    Ok(Box::new(kvm::KvmHypervisor::open()?))
}

/// Open the backend for this host.
#[cfg(target_os = "freebsd")]
pub fn open_hypervisor() -> Result<Box<dyn Hypervisor>> {
    Ok(Box::new(freebsd::backend::FreeBsdHypervisor::open()?))
}

/// Open the backend for this host.
#[cfg(not(any(target_os = "linux", target_os = "freebsd")))]
pub fn open_hypervisor() -> Result<Box<dyn Hypervisor>> {
    Err(VmmError::Unsupported(
        "a hypervisor on this operating system",
    ))
}
