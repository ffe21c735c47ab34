//! vCPU threads: one per vCPU, each running the exit loop, and one mechanism to stop them.
//!
//! Stopping uses a kick: the controller sets a flag ("attention"), then sends [`kick_signal`] to
//! every vCPU thread. The signal handler does nothing but ask the backend to cut the current or
//! next `run` short ([`crate::vmm::Vcpu::arm_kick`]; KVM: `immediate_exit`), so there is no
//! window in which a kick is lost and no polling. A kicked thread sees the flag and either parks
//! (pause) or leaves its loop (exit).
//!
//! [`VmControl`] is the handle devices and the control socket hold: `request_exit` ends the VM
//! with a bhyve exit status. [`VcpuSet`] (shared as `Arc<VcpuSet>`, so a control thread can
//! pause while the main thread waits) owns the threads: `pause_all` returns once every vCPU
//! is parked outside the hypervisor, after which `with_vcpu` may read or write vCPU state;
//! `resume_all` lets them run again. Pauses nest (each `pause_all` needs one `resume_all`).
//!
//! A vCPU parks only between exits, so `pause_all` waits for any device access in progress to
//! finish: do not call it while holding a lock a device handler may need, and never from a
//! vCPU thread (that is refused).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::bus::Buses;
use crate::vmm::{BlockedProbe, MpState, Vcpu, VmExit, VmmError, RFLAGS_IF};

/// Why the VM stopped, and so bhyve's exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset itself (bhyve exits 0).
    Reset,
    /// The guest powered off (exit 1).
    PowerOff,
    /// Every started vCPU halted with interrupts disabled (exit 2).
    Halt,
    /// A vCPU triple-faulted (exit 3).
    TripleFault,
    /// The VM was saved and stopped on request (`bhyvectl --suspend`); bhyve exits 0.
    Suspended,
    /// Anything fatal; the message is printed as `bhyve: <message>` (exit 4).
    Error(String),
    /// The guest wrote V to pc-testdev's `isa-debug-exit` port; bhyve and QEMU exit with
    /// `(V << 1) | 1`, carried here.
    DebugExit(i32),
    /// A signal ended the VM before the guest could be asked to shut down; bhyve tears the VM
    /// down and then dies of the same signal, as a process killed by it would.
    Signalled(i32),
}

impl ExitReason {
    /// bhyve(8)'s exit status for this reason.
    pub fn status(&self) -> i32 {
        match self {
            ExitReason::Reset | ExitReason::Suspended => 0,
            ExitReason::PowerOff => 1,
            ExitReason::Halt => 2,
            ExitReason::TripleFault => 3,
            ExitReason::Error(_) => 4,
            ExitReason::DebugExit(status) => *status,
            ExitReason::Signalled(signal) => 128 + signal,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU state can only be changed while all vCPUs are paused")]
    NotPaused,
    #[error("a vCPU thread cannot pause the vCPUs")]
    CalledFromVcpu,
    #[error("no vCPU {0}")]
    NoSuchVcpu(usize),
    #[error("cannot start vCPU thread: {0}")]
    Spawn(io::Error),
    #[error(transparent)]
    Vmm(#[from] VmmError),
}

#[derive(Default)]
struct ControlState {
    exit: Option<ExitReason>,
    /// Outstanding `pause_all` calls.
    pause_depth: u32,
    /// vCPU threads parked because of a pause.
    parked: usize,
    /// vCPU threads started and not yet finished.
    live: usize,
    /// Each running vCPU thread, by vCPU index, for kicks.
    threads: Vec<Option<libc::pthread_t>>,
}

/// Shared stop/exit control of one VM; devices keep an `Arc<VmControl>` to end the VM.
#[derive(Default)]
pub struct VmControl {
    state: Mutex<ControlState>,
    changed: Condvar,
    /// Set whenever vCPU threads must look at `state` before entering the guest again.
    attention: AtomicBool,
}

thread_local! {
    static ON_VCPU_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl VmControl {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// End the VM with `reason`. The first request wins; later ones are logged and dropped.
    /// Safe to call from any thread, including vCPU threads and device threads.
    pub fn request_exit(&self, reason: ExitReason) {
        let mut state = self.lock();
        if let Some(first) = &state.exit {
            log::debug!("exit {reason:?} requested after {first:?}; ignored");
            return;
        }
        log::debug!("exit requested: {reason:?}");
        state.exit = Some(reason);
        self.attention.store(true, Ordering::SeqCst);
        kick_all(&state);
        self.changed.notify_all();
    }

    /// The exit requested so far, if any.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.lock().exit.clone()
    }

    /// Wait up to `timeout` for an exit request.
    pub fn wait_for_exit(&self, timeout: Duration) -> Option<ExitReason> {
        let state = self.lock();
        let (state, _) = self
            .changed
            .wait_timeout_while(state, timeout, |s| s.exit.is_none())
            .unwrap_or_else(|e| e.into_inner());
        state.exit.clone()
    }
}

fn kick_all(state: &ControlState) {
    for thread in state.threads.iter().flatten() {
        // SAFETY: a thread id is listed only while its thread runs the vCPU loop; it removes
        // itself under the same lock before it ends, so the id is live here.
        let rc = unsafe { libc::pthread_kill(*thread, kick_signal()) };
        if rc != 0 {
            log::warn!(
                "cannot kick a vCPU thread: {}",
                io::Error::from_raw_os_error(rc)
            );
        }
    }
}

/// The signal used to kick vCPU threads out of the hypervisor.
pub fn kick_signal() -> libc::c_int {
    #[cfg(target_os = "linux")]
    {
        libc::SIGRTMIN()
    }
    #[cfg(not(target_os = "linux"))]
    {
        libc::SIGUSR2
    }
}

extern "C" fn on_kick(_signal: libc::c_int) {
    #[cfg(target_os = "linux")]
    crate::vmm::kvm::on_kick_signal();
}

/// Install the kick handler once per process, without SA_RESTART so a blocking `run` returns.
fn install_kick_handler() -> io::Result<()> {
    static INSTALL: Once = Once::new();
    static ERRNO: AtomicI32 = AtomicI32::new(0);
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid starting point and the handler is an
        // async-signal-safe extern "C" function.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_kick as extern "C" fn(libc::c_int) as usize;
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
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// What a vCPU thread needs to handle exits.
pub struct ExitContext {
    pub buses: Arc<Buses>,
    /// `x86.strictio`: an access to a port no device owns is fatal.
    pub strict_io: bool,
}

type SharedVcpu = Arc<Mutex<Box<dyn Vcpu>>>;

/// The vCPUs of one VM and their threads.
pub struct VcpuSet {
    control: Arc<VmControl>,
    vcpus: Vec<SharedVcpu>,
    handles: Mutex<Vec<JoinHandle<()>>>,
    started: AtomicBool,
    /// Opened before the threads start: a running thread holds its vCPU's lock.
    probes: Vec<Option<Box<dyn BlockedProbe>>>,
    /// Host CPUs each vCPU thread restricts itself to when it starts (`None`: any).
    host_cpus: Mutex<Vec<Option<Vec<u32>>>>,
}

impl VcpuSet {
    pub fn new(vcpus: Vec<Box<dyn Vcpu>>, control: Arc<VmControl>) -> Self {
        Self {
            control,
            probes: vcpus.iter().map(|v| v.blocked_probe()).collect(),
            vcpus: vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect(),
            handles: Mutex::new(Vec::new()),
            started: AtomicBool::new(false),
            host_cpus: Mutex::new(Vec::new()),
        }
    }

    /// Host CPUs for each vCPU's thread, by vCPU index; takes effect when the threads start.
    pub fn pin_to_host_cpus(&self, host_cpus: Vec<Option<Vec<u32>>>) {
        *self.host_cpus.lock().unwrap_or_else(|e| e.into_inner()) = host_cpus;
    }

    pub fn control(&self) -> &Arc<VmControl> {
        &self.control
    }

    pub fn len(&self) -> usize {
        self.vcpus.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vcpus.is_empty()
    }

    /// Start one thread per vCPU (once).
    pub fn start(&self, context: Arc<ExitContext>) -> Result<(), VcpuError> {
        install_kick_handler().map_err(VcpuError::Spawn)?;
        if self.started.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        {
            let mut state = self.control.lock();
            state.threads = vec![None; self.vcpus.len()];
        }
        for (index, vcpu) in self.vcpus.iter().enumerate() {
            let vcpu = vcpu.clone();
            let control = self.control.clone();
            let context = context.clone();
            let host_cpus = self
                .host_cpus
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(index)
                .cloned()
                .flatten();
            control.lock().live += 1;
            // The name shows in ps and top (Linux keeps its first 15 bytes).
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu {index}"))
                .spawn(move || vcpu_thread(index, vcpu, control, context, host_cpus));
            match spawned {
                Ok(handle) => self.lock_handles().push(handle),
                Err(e) => {
                    self.control.lock().live -= 1;
                    self.control
                        .request_exit(ExitReason::Error(format!("vCPU {index}: {e}")));
                    return Err(VcpuError::Spawn(e));
                }
            }
        }
        Ok(())
    }

    /// Stop every vCPU outside the hypervisor; returns once all of them are parked (or gone).
    pub fn pause_all(&self) -> Result<(), VcpuError> {
        if ON_VCPU_THREAD.with(|f| f.get()) {
            return Err(VcpuError::CalledFromVcpu);
        }
        let mut state = self.control.lock();
        state.pause_depth += 1;
        self.control.attention.store(true, Ordering::SeqCst);
        kick_all(&state);
        while state.parked < state.live {
            state = self
                .control
                .changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
        Ok(())
    }

    /// Undo one `pause_all`; the vCPUs run again when none is outstanding.
    pub fn resume_all(&self) {
        let mut state = self.control.lock();
        state.pause_depth = state.pause_depth.saturating_sub(1);
        if state.pause_depth == 0 && state.exit.is_none() {
            self.control.attention.store(false, Ordering::SeqCst);
        }
        self.control.changed.notify_all();
    }

    fn paused(&self) -> bool {
        let state = self.control.lock();
        state.pause_depth > 0 && state.parked == state.live
    }

    /// Run `f` on vCPU `index` while the vCPUs are paused (or not started yet).
    pub fn with_vcpu<T>(
        &self,
        index: usize,
        f: impl FnOnce(&mut dyn Vcpu) -> T,
    ) -> Result<T, VcpuError> {
        let vcpu = self.vcpus.get(index).ok_or(VcpuError::NoSuchVcpu(index))?;
        if self.started.load(Ordering::SeqCst) && !self.paused() {
            return Err(VcpuError::NotPaused);
        }
        let mut guard = vcpu.lock().unwrap_or_else(|e| e.into_inner());
        Ok(f(guard.as_mut()))
    }

    /// Whether every started vCPU sits in HLT with interrupts disabled (bhyve's
    /// VM_SUSPEND_HALT condition). vCPUs still waiting for INIT/SIPI have not been started and
    /// do not count; at least one vCPU must be halted. The vCPUs must be paused.
    pub fn all_halted_with_interrupts_disabled(&self) -> Result<bool, VcpuError> {
        let mut halted = 0;
        for index in 0..self.vcpus.len() {
            let verdict = self.with_vcpu(index, |vcpu| -> Result<Option<bool>, VmmError> {
                match vcpu.mp_state()? {
                    MpState::WaitForSipi => Ok(None),
                    MpState::Halted => Ok(Some(vcpu.regs()?.rflags & RFLAGS_IF == 0)),
                    _ => Ok(Some(false)),
                }
            })??;
            match verdict {
                Some(false) => return Ok(false),
                Some(true) => halted += 1,
                None => {}
            }
        }
        Ok(halted > 0)
    }

    /// For each vCPU, `(blocked in the hypervisor, wake-ups so far)`, read without stopping
    /// the vCPUs; `None` when the backend cannot tell.
    pub fn blocked_samples(&self) -> Option<Vec<(bool, u64)>> {
        self.probes
            .iter()
            .map(|p| p.as_ref().and_then(|p| p.sample()))
            .collect()
    }

    fn lock_handles(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.handles.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait for every vCPU thread to finish (after an exit request).
    pub fn join(&self) {
        let handles: Vec<_> = self.lock_handles().drain(..).collect();
        for handle in handles {
            if handle.join().is_err() {
                log::error!("a vCPU thread panicked");
            }
        }
    }
}

impl Drop for VcpuSet {
    fn drop(&mut self) {
        if !self.lock_handles().is_empty() {
            self.control
                .request_exit(ExitReason::Error("VM torn down".into()));
            self.join();
        }
    }
}

fn vcpu_thread(
    index: usize,
    vcpu: SharedVcpu,
    control: Arc<VmControl>,
    context: Arc<ExitContext>,
    host_cpus: Option<Vec<u32>>,
) {
    ON_VCPU_THREAD.with(|f| f.set(true));
    if let Some(cpus) = host_cpus {
        if let Err(e) = crate::affinity::pin_current_thread(&cpus) {
            control.request_exit(ExitReason::Error(format!(
                "vCPU {index}: cannot pin to host CPUs {cpus:?}: {e}"
            )));
        }
    }
    {
        let mut state = control.lock();
        // SAFETY: pthread_self has no preconditions.
        state.threads[index] = Some(unsafe { libc::pthread_self() });
    }
    vcpu.lock().unwrap_or_else(|e| e.into_inner()).arm_kick();

    loop {
        if control.attention.load(Ordering::SeqCst) && !park_if_needed(&control) {
            break;
        }
        let mut guard = vcpu.lock().unwrap_or_else(|e| e.into_inner());
        // Run until something needs the control state; the vCPU lock is dropped in between so
        // a paused set can hand the vCPU to `with_vcpu`.
        while !control.attention.load(Ordering::SeqCst) {
            if let Some(reason) = run_once(index, guard.as_mut(), &context) {
                control.request_exit(reason);
            }
        }
        drop(guard);
    }

    let mut guard = vcpu.lock().unwrap_or_else(|e| e.into_inner());
    guard.disarm_kick();
    drop(guard);
    let mut state = control.lock();
    state.threads[index] = None;
    state.live -= 1;
    control.changed.notify_all();
}

/// Park while a pause is outstanding; returns false when the thread must leave its loop.
fn park_if_needed(control: &VmControl) -> bool {
    let mut state = control.lock();
    if state.exit.is_some() {
        return false;
    }
    if state.pause_depth == 0 {
        return true;
    }
    state.parked += 1;
    control.changed.notify_all();
    while state.pause_depth > 0 && state.exit.is_none() {
        state = control
            .changed
            .wait(state)
            .unwrap_or_else(|e| e.into_inner());
    }
    state.parked -= 1;
    state.exit.is_none()
}

/// Enter the guest once and handle the exit; returns a reason when the VM must stop.
fn run_once(index: usize, vcpu: &mut dyn Vcpu, context: &ExitContext) -> Option<ExitReason> {
    let exit = match vcpu.run() {
        Ok(exit) => exit,
        Err(e) => return Some(ExitReason::Error(format!("vCPU {index}: {e}"))),
    };
    let unhandled_port = match exit {
        VmExit::IoIn { port, size, data } => {
            io_in(&context.buses, context.strict_io, port, size, data)
        }
        VmExit::IoOut { port, size, data } => {
            io_out(&context.buses, context.strict_io, port, size, data)
        }
        VmExit::MmioRead { gpa, data } => {
            if !context.buses.mmio.read(gpa, data) {
                log::debug!("unhandled MMIO read of {} bytes at {gpa:#x}", data.len());
                data.fill(0xff);
            }
            None
        }
        VmExit::MmioWrite { gpa, data } => {
            if !context.buses.mmio.write(gpa, data) {
                log::debug!("unhandled MMIO write of {} bytes at {gpa:#x}", data.len());
            }
            None
        }
        // bhyve treats a HLT exit as a hint to yield; halting for good is detected elsewhere.
        VmExit::Halt | VmExit::Interrupted => None,
        VmExit::Shutdown => return Some(ExitReason::TripleFault),
        VmExit::SystemEvent(crate::vmm::SystemEvent::Reset) => return Some(ExitReason::Reset),
        VmExit::SystemEvent(crate::vmm::SystemEvent::Shutdown) => {
            return Some(ExitReason::PowerOff)
        }
        VmExit::SystemEvent(crate::vmm::SystemEvent::Crash) => {
            return Some(ExitReason::Error(format!(
                "vCPU {index}: the guest reported a crash"
            )))
        }
        VmExit::InternalError { suberror, detail } => {
            let rip = vcpu.regs().map(|r| r.rip).unwrap_or_default();
            return Some(ExitReason::Error(format!(
                "vCPU {index}: the hypervisor cannot continue (internal error {suberror}, \
                 data {detail:x?}) at rip {rip:#x}"
            )));
        }
        VmExit::FailEntry { reason } => {
            return Some(ExitReason::Error(format!(
                "vCPU {index}: entering the guest failed (reason {reason:#x})"
            )))
        }
        VmExit::Unknown(what) => {
            return Some(ExitReason::Error(format!(
                "vCPU {index}: unexpected exit {what}"
            )))
        }
    };
    // Name the instruction's address, as bhyve does ("Unhandled outb 0x0080 at 0x...").
    unhandled_port.map(|reason| match reason {
        ExitReason::Error(message) => {
            let rip = vcpu.regs().map(|r| r.rip).unwrap_or_default();
            ExitReason::Error(format!("{message} at {rip:#x}"))
        }
        other => other,
    })
}

fn access_name(input: bool, size: u8) -> String {
    let suffix = match size {
        1 => 'b',
        2 => 'w',
        _ => 'l',
    };
    format!("{}{suffix}", if input { "in" } else { "out" })
}

/// Port input: each access of `size` bytes goes to the owning device; unowned ports read as
/// all-ones, or stop the VM under `x86.strictio` (bhyve's inout.c and vmexit_inout).
fn io_in(buses: &Buses, strict: bool, port: u16, size: u8, data: &mut [u8]) -> Option<ExitReason> {
    let size = usize::from(size.max(1));
    for chunk in data.chunks_mut(size) {
        if !buses.pio.read(u64::from(port), chunk) {
            if strict {
                return Some(ExitReason::Error(format!(
                    "Unhandled {} 0x{port:04x}",
                    access_name(true, size as u8)
                )));
            }
            chunk.fill(0xff);
        }
    }
    None
}

fn io_out(buses: &Buses, strict: bool, port: u16, size: u8, data: &[u8]) -> Option<ExitReason> {
    let size = usize::from(size.max(1));
    for chunk in data.chunks(size) {
        if !buses.pio.write(u64::from(port), chunk) && strict {
            return Some(ExitReason::Error(format!(
                "Unhandled {} 0x{port:04x}",
                access_name(false, size as u8)
            )));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;

    struct Latch(Vec<u8>);
    impl BusDevice for Latch {
        fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
            data.fill(0x5a);
        }
        fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
            self.0.extend_from_slice(data);
        }
    }

    #[test]
    fn unhandled_port_reads_return_all_ones_and_writes_are_dropped() {
        let buses = Buses::default();
        let mut word = [0u8; 2];
        assert_eq!(io_in(&buses, false, 0x80, 2, &mut word), None);
        assert_eq!(word, [0xff, 0xff]);
        assert_eq!(io_out(&buses, false, 0x80, 1, &[1]), None);
    }

    #[test]
    fn strictio_makes_unhandled_ports_fatal_and_names_them() {
        let buses = Buses::default();
        let mut byte = [0u8; 1];
        assert_eq!(
            io_in(&buses, true, 0x2f8, 1, &mut byte),
            Some(ExitReason::Error("Unhandled inb 0x02f8".into()))
        );
        assert_eq!(
            io_out(&buses, true, 0x80, 4, &[0; 4]),
            Some(ExitReason::Error("Unhandled outl 0x0080".into()))
        );
    }

    #[test]
    fn string_io_is_split_into_single_accesses() {
        let buses = Buses::default();
        let latch = Arc::new(Mutex::new(Latch(Vec::new())));
        buses.pio.insert(0x3f8, 1, latch.clone()).unwrap();
        assert_eq!(io_out(&buses, true, 0x3f8, 1, b"abc"), None);
        assert_eq!(latch.lock().unwrap().0, b"abc");
        let mut three = [0u8; 3];
        assert_eq!(io_in(&buses, true, 0x3f8, 1, &mut three), None);
        assert_eq!(three, [0x5a; 3]);
    }

    #[test]
    fn exit_statuses_follow_bhyve() {
        assert_eq!(ExitReason::Reset.status(), 0);
        assert_eq!(ExitReason::PowerOff.status(), 1);
        assert_eq!(ExitReason::Halt.status(), 2);
        assert_eq!(ExitReason::TripleFault.status(), 3);
        assert_eq!(ExitReason::Error("x".into()).status(), 4);
    }

    #[test]
    fn the_first_exit_request_wins() {
        let control = VmControl::new();
        assert_eq!(control.wait_for_exit(Duration::from_millis(1)), None);
        control.request_exit(ExitReason::PowerOff);
        control.request_exit(ExitReason::Reset);
        assert_eq!(control.exit_reason(), Some(ExitReason::PowerOff));
        assert_eq!(
            control.wait_for_exit(Duration::from_secs(1)),
            Some(ExitReason::PowerOff)
        );
    }
}
