//! The backend seam: one trait family, implemented by KVM (Linux) and, later, vmm (FreeBSD).
//!
//! - [`Hypervisor`] opens the facility and creates a VM with its in-kernel interrupt controllers
//!   and timer (KVM: PIC + IOAPIC + LAPIC and PIT; FreeBSD: vatpic, vioapic, vlapic, vatpit).
//! - [`Vm`] registers guest memory, creates vCPUs and raises interrupts (it is the
//!   [`InterruptSink`] devices use).
//! - [`Vcpu`] runs until the next exit and reads or writes registers.
//!
//! Nothing outside this module names `kvm_ioctls`; exits and registers cross the seam in the
//! backend-neutral types below. For snapshots, [`Vm::save_state`] and [`Vcpu::save_state`] hand
//! out the hypervisor-held state as [`BackendState`]: named byte sections tagged with the
//! backend, listed in restore order, restored by the matching `restore_state`.

use std::io;
use std::sync::Arc;

use crate::interrupts::InterruptSink;
use crate::memory::{GuestMemory, GuestRegion};

pub mod cpuid;
#[cfg(target_os = "linux")]
pub mod kvm;

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

/// CPU topology as `-c cpus=N,sockets=S,cores=C,threads=T` describes it. vCPU `i` has APIC id `i`,
/// as in bhyve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    pub cpus: u16,
    pub sockets: u16,
    pub cores: u16,
    pub threads: u16,
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            cpus: 1,
            sockets: 1,
            cores: 1,
            threads: 1,
        }
    }
}

/// What made a vCPU leave the guest. Data slices point into the vCPU's exit area: fill an
/// `IoIn`/`MmioRead` buffer before the next [`Vcpu::run`].
#[derive(Debug)]
pub enum VmExit<'a> {
    /// `in` from `port`: `data` holds `count` accesses of `size` bytes each (string I/O gives
    /// `count > 1`).
    IoIn {
        port: u16,
        size: u8,
        data: &'a mut [u8],
    },
    /// `out` to `port`, laid out like `IoIn`.
    IoOut {
        port: u16,
        size: u8,
        data: &'a [u8],
    },
    MmioRead {
        gpa: u64,
        data: &'a mut [u8],
    },
    MmioWrite {
        gpa: u64,
        data: &'a [u8],
    },
    /// HLT reached user space (only without an in-kernel local APIC).
    Halt,
    /// The vCPU shut down: a triple fault.
    Shutdown,
    /// The hypervisor reports a platform event (reset, power-off, crash).
    SystemEvent(SystemEvent),
    /// The run was cut short by a kick (signal or immediate-exit request); nothing happened.
    Interrupted,
    /// The hypervisor could not continue (e.g. an instruction it cannot emulate).
    InternalError {
        suberror: u32,
        detail: Vec<u64>,
    },
    /// Entering the guest failed (invalid guest state).
    FailEntry {
        reason: u64,
    },
    /// Anything else, named for the log.
    Unknown(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemEvent {
    Reset,
    Shutdown,
    Crash,
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

/// Cheap look at whether a vCPU sits blocked in the hypervisor (halted or waiting for SIPI),
/// readable from any thread without stopping the vCPU.
pub trait BlockedProbe: Send + Sync {
    /// `(blocked now, number of wake-ups so far)`, or `None` when it cannot be read.
    fn sample(&self) -> Option<(bool, u64)>;
}

/// The virtualization facility.
pub trait Hypervisor: Send + Sync {
    /// Create a VM with its in-kernel interrupt controllers and timer.
    fn create_vm(&self) -> Result<Arc<dyn Vm>>;
}

/// One VM.
pub trait Vm: InterruptSink + Send + Sync {
    /// Make every region of `memory` guest RAM. The caller keeps `memory` alive (and unmoved)
    /// for as long as the VM exists.
    fn map_memory(&self, memory: &GuestMemory) -> Result<()>;
    /// Make `rom` read-only guest memory (a boot ROM): the guest reads and executes it, its
    /// writes leave as MMIO exits. The caller keeps `rom` alive for as long as the VM exists.
    fn map_rom(&self, rom: &GuestRegion) -> Result<()>;
    /// Create vCPU `id` (its APIC id) with CPUID describing `topology`.
    fn create_vcpu(&self, id: u32, topology: &Topology) -> Result<Box<dyn Vcpu>>;
    /// Upcast to the interrupt interface devices use.
    fn interrupt_sink(self: Arc<Self>) -> Arc<dyn InterruptSink>;
    /// In-kernel device and clock state (KVM: PIC pair, IOAPIC, PIT, kvm-clock). Take it with
    /// every vCPU paused.
    fn save_state(&self) -> Result<BackendState>;
    /// Put back what [`Vm::save_state`] returned; before restoring any vCPU.
    fn restore_state(&self, state: &BackendState) -> Result<()>;
}

/// One virtual CPU. Owned by one thread at a time; the run loop and the state accessors must
/// not overlap (the [`crate::vcpu::VcpuSet`] guarantees that).
pub trait Vcpu: Send {
    fn id(&self) -> u32;
    /// Enter the guest until the next exit.
    fn run(&mut self) -> Result<VmExit<'_>>;
    /// Let a kick signal delivered to the calling thread end this vCPU's current or next
    /// [`Vcpu::run`] with [`VmExit::Interrupted`]. Call on the thread that runs the vCPU.
    fn arm_kick(&mut self);
    /// Undo [`Vcpu::arm_kick`] before the vCPU leaves the thread.
    fn disarm_kick(&mut self);
    fn regs(&self) -> Result<Regs>;
    fn set_regs(&self, regs: &Regs) -> Result<()>;
    fn special_regs(&self) -> Result<SpecialRegs>;
    fn set_special_regs(&self, sregs: &SpecialRegs) -> Result<()>;
    /// Read the MSRs named by `indices` (values are filled in).
    fn msrs(&self, indices: &[u32]) -> Result<Vec<Msr>>;
    fn set_msrs(&self, msrs: &[Msr]) -> Result<()>;
    fn mp_state(&self) -> Result<MpState>;
    fn set_mp_state(&self, state: MpState) -> Result<()>;
    /// See [`BlockedProbe`]; `None` when the backend has no such view.
    fn blocked_probe(&self) -> Option<Box<dyn BlockedProbe>>;
    /// The complete vCPU state (CPUID, TSC frequency, registers, FPU/XSAVE, local APIC, MSRs,
    /// pending events, MP state). The vCPU must not be running.
    fn save_state(&self) -> Result<BackendState>;
    /// Put back what [`Vcpu::save_state`] returned (after the VM state).
    fn restore_state(&self, state: &BackendState) -> Result<()>;
    /// Tell the guest it was stopped for a while (KVM: KVM_KVMCLOCK_CTRL sets kvm-clock's
    /// "guest stopped" flag at the next entry), so its soft-lockup and clocksource watchdogs
    /// do not take the gap for a hang. Call while the vCPU is paused; a guest without such a
    /// clock is not an error.
    fn notify_paused(&self) -> Result<()>;
}

/// Open the backend for this host.
#[cfg(target_os = "linux")]
pub fn open_hypervisor() -> Result<Box<dyn Hypervisor>> {
    Ok(Box::new(kvm::KvmHypervisor::open()?))
}

/// Open the backend for this host.
#[cfg(not(target_os = "linux"))]
pub fn open_hypervisor() -> Result<Box<dyn Hypervisor>> {
    Err(VmmError::Unsupported(
        "the vmm backend (not implemented yet)",
    ))
}
