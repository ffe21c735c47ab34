//! vCPU threads: one per vCPU, each running the exit loop, and one mechanism to stop them.
//!
//! Stopping uses a kick: the controller sets a flag ("attention"), then kicks every vCPU through
//! the backend's [`VcpuKick`], which cuts the current or next `run` short (KVM: a signal and
//! `immediate_exit`), so there is no window in which a kick is lost and no polling. A kicked
//! thread sees the flag and either parks (pause) or leaves its loop (exit).
//!
//! Where the backend's kernel leaves AP start to user space, only vCPU 0 runs at first: the
//! other threads wait, counted as parked, until a vCPU reports [`VmExit::StartAp`] for them.
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::bus::Buses;
pub use crate::lifecycle::{ExitReason, RequestExit};
use crate::vmm::{
    AccessFault, BlockedProbe, ExitHandler, MpState, Statistic, StatisticsProbe, SuspendReason,
    Vcpu, VcpuKick, VmExit, VmmError, RFLAGS_IF,
};

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
    /// Which vCPUs may run: all of them where the kernel starts APs, else vCPU 0 and every AP
    /// a [`VmExit::StartAp`] named.
    started: Vec<bool>,
}

/// Shared stop/exit control of one VM; devices keep an `Arc<VmControl>` to end the VM.
#[derive(Default)]
pub struct VmControl {
    state: Mutex<ControlState>,
    changed: Condvar,
    /// Set whenever vCPU threads must look at `state` before entering the guest again.
    attention: AtomicBool,
    /// One per vCPU, from the backend.
    kickers: Mutex<Vec<Arc<dyn VcpuKick>>>,
}

thread_local! {
    static ON_VCPU_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl RequestExit for VmControl {
    fn request_exit(&self, reason: ExitReason) {
        VmControl::request_exit(self, reason);
    }
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
        self.kick_all();
        self.changed.notify_all();
    }

    fn kick_all(&self) {
        for kicker in self
            .kickers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            kicker.kick();
        }
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

/// What a vCPU thread needs to serve accesses: the buses and bhyve's strictness switches.
pub struct ExitContext {
    pub buses: Arc<Buses>,
    /// `x86.strictio`: an access to a port no device owns is fatal.
    pub strict_io: bool,
    /// `x86.strictmsr`: an access to an MSR nothing emulates raises #GP; otherwise reads give
    /// 0 and writes are dropped (bhyve's vmexit_rdmsr / vmexit_wrmsr).
    pub strict_msr: bool,
}

impl ExitHandler for ExitContext {
    fn port_read(&self, port: u16, data: &mut [u8]) -> Result<(), AccessFault> {
        io_in(&self.buses, self.strict_io, port, data)
    }

    fn port_write(&self, port: u16, data: &[u8]) -> Result<(), AccessFault> {
        io_out(&self.buses, self.strict_io, port, data)
    }

    fn mmio_read(&self, gpa: u64, data: &mut [u8]) -> Result<(), AccessFault> {
        if !self.buses.mmio.read(gpa, data) {
            log::debug!("unhandled MMIO read of {} bytes at {gpa:#x}", data.len());
            data.fill(0xff);
        }
        Ok(())
    }

    fn mmio_write(&self, gpa: u64, data: &[u8]) -> Result<(), AccessFault> {
        if !self.buses.mmio.write(gpa, data) {
            log::debug!("unhandled MMIO write of {} bytes at {gpa:#x}", data.len());
        }
        Ok(())
    }

    fn msr_read(&self, vcpu: u32, index: u32) -> Result<Option<u64>, AccessFault> {
        if self.strict_msr {
            log::debug!("vCPU {vcpu}: rdmsr of unknown MSR {index:#x}: #GP");
            return Ok(None);
        }
        log::debug!("vCPU {vcpu}: rdmsr of unknown MSR {index:#x} reads 0");
        Ok(Some(0))
    }

    fn msr_write(&self, vcpu: u32, index: u32, value: u64) -> Result<bool, AccessFault> {
        if self.strict_msr {
            log::debug!("vCPU {vcpu}: wrmsr of unknown MSR {index:#x}: #GP");
            return Ok(false);
        }
        log::debug!("vCPU {vcpu}: wrmsr {value:#x} to unknown MSR {index:#x} ignored");
        Ok(true)
    }
}

type SharedVcpu = Arc<Mutex<Box<dyn Vcpu>>>;

/// The vCPUs of one VM and their threads.
pub struct VcpuSet {
    control: Arc<VmControl>,
    vcpus: Arc<[SharedVcpu]>,
    /// The kernel starts APs itself (see the module documentation).
    kernel_ap_start: bool,
    handles: Mutex<Vec<JoinHandle<()>>>,
    started: AtomicBool,
    /// Opened before the threads start: a running thread holds its vCPU's lock.
    probes: Vec<Option<Box<dyn BlockedProbe>>>,
    /// Each vCPU's counters, opened before the threads start for the same reason.
    counters: Vec<Option<Box<dyn StatisticsProbe>>>,
    /// Host CPUs each vCPU thread restricts itself to when it starts (`None`: any).
    host_cpus: Mutex<Vec<Option<Vec<u32>>>>,
}

impl VcpuSet {
    /// The vCPUs of a VM; `kernel_ap_start` says whether the backend's kernel starts APs
    /// ([`crate::vmm::PlatformCaps::kernel_ap_start`]).
    pub fn new(vcpus: Vec<Box<dyn Vcpu>>, control: Arc<VmControl>, kernel_ap_start: bool) -> Self {
        *control.kickers.lock().unwrap_or_else(|e| e.into_inner()) =
            vcpus.iter().map(|v| v.kicker()).collect();
        Self {
            control,
            kernel_ap_start,
            probes: vcpus.iter().map(|v| v.blocked_probe()).collect(),
            counters: vcpus.iter().map(|v| v.statistics_probe()).collect(),
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

    /// Start one thread per vCPU (once). Where user space starts APs, the AP threads wait for
    /// their [`VmExit::StartAp`].
    pub fn start(&self, context: Arc<ExitContext>) -> Result<(), VcpuError> {
        if self.started.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        {
            let mut state = self.control.lock();
            state.started = (0..self.vcpus.len())
                .map(|index| index == 0 || self.kernel_ap_start)
                .collect();
        }
        for index in 0..self.vcpus.len() {
            let vcpus = self.vcpus.clone();
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
                .spawn(move || vcpu_thread(index, vcpus, control, context, host_cpus));
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
        self.control.kick_all();
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

    /// vCPU `index`'s counters, read without stopping it; `None` when the backend keeps none.
    pub fn statistics(&self, index: usize) -> Option<Vec<Statistic>> {
        self.counters.get(index)?.as_ref()?.read()
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
    vcpus: Arc<[SharedVcpu]>,
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
    let vcpu = &vcpus[index];
    if let Err(e) = vcpu
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .enter_thread()
    {
        control.request_exit(ExitReason::Error(format!("vCPU {index}: {e}")));
    }

    while wait_until_started(index, &control) {
        if control.attention.load(Ordering::SeqCst) && !park_if_needed(&control) {
            break;
        }
        let mut guard = vcpu.lock().unwrap_or_else(|e| e.into_inner());
        // Run until something needs the control state; the vCPU lock is dropped in between so
        // a paused set can hand the vCPU to `with_vcpu`.
        while !control.attention.load(Ordering::SeqCst) {
            if let Some(reason) = run_once(index, guard.as_mut(), &context, &vcpus, &control) {
                control.request_exit(reason);
            }
        }
        drop(guard);
    }

    vcpu.lock()
        .unwrap_or_else(|e| e.into_inner())
        .leave_thread();
    let mut state = control.lock();
    state.live -= 1;
    control.changed.notify_all();
}

/// Wait, counted as parked, until vCPU `index` may run; false when the VM ends first.
fn wait_until_started(index: usize, control: &VmControl) -> bool {
    park_while(control, |s| !s.started.get(index).copied().unwrap_or(true))
}

/// Park while a pause is outstanding; returns false when the thread must leave its loop.
fn park_if_needed(control: &VmControl) -> bool {
    park_while(control, |s| s.pause_depth > 0)
}

/// Wait, counted as parked (so a pause can see every vCPU out of the guest), while `waiting`
/// holds and the VM goes on; returns false when the VM ends.
fn park_while(control: &VmControl, waiting: impl Fn(&ControlState) -> bool) -> bool {
    let mut state = control.lock();
    if state.exit.is_none() && waiting(&state) {
        state.parked += 1;
        control.changed.notify_all();
        while state.exit.is_none() && waiting(&state) {
            state = control
                .changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
        state.parked -= 1;
    }
    state.exit.is_none()
}

/// Put AP `ap` at `rip` and let its thread run (user-space AP start).
fn start_ap(vcpus: &[SharedVcpu], control: &VmControl, ap: u32, rip: u64) -> Result<(), String> {
    let index = usize::try_from(ap).map_err(|_| format!("no vCPU {ap}"))?;
    let vcpu = vcpus.get(index).ok_or_else(|| format!("no vCPU {ap}"))?;
    let mut state = control.lock();
    if state.started.get(index).copied().unwrap_or(true) {
        // bhyve ignores a second SIPI to a running AP, as hardware does.
        log::debug!("vCPU {ap} is already running; start at {rip:#x} ignored");
        return Ok(());
    }
    // Its thread waits in `wait_until_started` without holding the vCPU's lock.
    vcpu.lock()
        .unwrap_or_else(|e| e.into_inner())
        .start_ap(rip)
        .map_err(|e| format!("vCPU {ap}: cannot start it at {rip:#x}: {e}"))?;
    state.started[index] = true;
    control.changed.notify_all();
    Ok(())
}

/// Enter the guest once and handle what ended the run; returns a reason when the VM must stop.
fn run_once(
    index: usize,
    vcpu: &mut dyn Vcpu,
    context: &ExitContext,
    vcpus: &[SharedVcpu],
    control: &VmControl,
) -> Option<ExitReason> {
    let exit = match vcpu.run(context) {
        Ok(exit) => exit,
        Err(e) => return Some(ExitReason::Error(format!("vCPU {index}: {e}"))),
    };
    match exit {
        // bhyve treats a HLT exit as a hint to yield; halting for good is detected elsewhere.
        VmExit::Halted | VmExit::Interrupted => None,
        VmExit::StartAp { vcpu: ap, rip } => start_ap(vcpus, control, ap, rip)
            .err()
            .map(ExitReason::Error),
        VmExit::Suspended(SuspendReason::Reset) => Some(ExitReason::Reset),
        VmExit::Suspended(SuspendReason::PowerOff) => Some(ExitReason::PowerOff),
        VmExit::Suspended(SuspendReason::Halt) => Some(ExitReason::Halt),
        VmExit::Suspended(SuspendReason::TripleFault) => Some(ExitReason::TripleFault),
        VmExit::GuestCrash => Some(ExitReason::Error(format!(
            "vCPU {index}: the guest reported a crash"
        ))),
        // Name the instruction's address, as bhyve does ("Unhandled outb 0x0080 at 0x...").
        VmExit::AccessFault(what) => {
            let rip = vcpu.regs().map(|r| r.rip).unwrap_or_default();
            Some(ExitReason::Error(format!("{what} at {rip:#x}")))
        }
        VmExit::Failed(why) => {
            let rip = vcpu.regs().map(|r| r.rip).unwrap_or_default();
            Some(ExitReason::Error(format!(
                "vCPU {index} at rip {rip:#x}: {why}"
            )))
        }
    }
}

fn access_name(input: bool, size: u8) -> String {
    let suffix = match size {
        1 => 'b',
        2 => 'w',
        _ => 'l',
    };
    format!("{}{suffix}", if input { "in" } else { "out" })
}

/// Port input of one access: the owning device fills `data`; an unowned port reads as
/// all-ones, or stops the VM under `x86.strictio` (bhyve's inout.c and vmexit_inout).
fn io_in(buses: &Buses, strict: bool, port: u16, data: &mut [u8]) -> Result<(), AccessFault> {
    if !buses.pio.read(u64::from(port), data) {
        if strict {
            return Err(AccessFault(format!(
                "Unhandled {} 0x{port:04x}",
                access_name(true, data.len() as u8)
            )));
        }
        data.fill(0xff);
    }
    Ok(())
}

fn io_out(buses: &Buses, strict: bool, port: u16, data: &[u8]) -> Result<(), AccessFault> {
    if !buses.pio.write(u64::from(port), data) && strict {
        return Err(AccessFault(format!(
            "Unhandled {} 0x{port:04x}",
            access_name(false, data.len() as u8)
        )));
    }
    Ok(())
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

    fn context(strict_io: bool, strict_msr: bool) -> ExitContext {
        ExitContext {
            buses: Arc::new(Buses::default()),
            strict_io,
            strict_msr,
        }
    }

    #[test]
    fn unhandled_port_reads_return_all_ones_and_writes_are_dropped() {
        let lax = context(false, true);
        let mut word = [0u8; 2];
        assert_eq!(lax.port_read(0x80, &mut word), Ok(()));
        assert_eq!(word, [0xff, 0xff]);
        assert_eq!(lax.port_write(0x80, &[1]), Ok(()));
    }

    #[test]
    fn strictio_makes_unhandled_ports_fatal_and_names_them() {
        let strict = context(true, true);
        let mut byte = [0u8; 1];
        assert_eq!(
            strict.port_read(0x2f8, &mut byte),
            Err(AccessFault("Unhandled inb 0x02f8".into()))
        );
        assert_eq!(
            strict.port_write(0x80, &[0; 4]),
            Err(AccessFault("Unhandled outl 0x0080".into()))
        );
    }

    #[test]
    fn each_access_reaches_the_device_that_owns_the_port() {
        let ctx = context(true, true);
        let latch = Arc::new(Mutex::new(Latch(Vec::new())));
        ctx.buses.pio.insert(0x3f8, 1, latch.clone()).unwrap();
        for byte in b"abc" {
            assert_eq!(ctx.port_write(0x3f8, &[*byte]), Ok(()));
        }
        assert_eq!(latch.lock().unwrap().0, b"abc");
        let mut one = [0u8; 1];
        assert_eq!(ctx.port_read(0x3f8, &mut one), Ok(()));
        assert_eq!(one, [0x5a]);
    }

    #[test]
    fn strictmsr_raises_gp_and_lax_mode_reads_zero_and_drops_writes() {
        let strict = context(false, true);
        assert_eq!(strict.msr_read(0, 0x1234_5678), Ok(None));
        assert_eq!(strict.msr_write(0, 0x1234_5678, 1), Ok(false));
        let lax = context(false, false);
        assert_eq!(lax.msr_read(0, 0x1234_5678), Ok(Some(0)));
        assert_eq!(lax.msr_write(0, 0x1234_5678, 1), Ok(true));
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

    /// A backend that plays back a list of exits, for the parts of the seam KVM never uses.
    mod fake {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};

        use crate::vmm::{
            BackendState, BlockedProbe, ExitHandler, MpState, Msr, Regs, Result, SpecialRegs, Vcpu,
            VcpuKick, VmExit, VmmError,
        };

        #[derive(Default)]
        pub struct Kick(AtomicBool);

        impl VcpuKick for Kick {
            fn kick(&self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }

        pub struct FakeVcpu {
            pub id: u32,
            pub script: Vec<VmExit>,
            pub kick: Arc<Kick>,
            /// `start_ap` calls, and whether `run` came before its vCPU was started.
            pub starts: Arc<Mutex<Vec<(u32, u64)>>>,
            pub ran_unstarted: Arc<AtomicBool>,
            pub started: bool,
        }

        impl Vcpu for FakeVcpu {
            fn id(&self) -> u32 {
                self.id
            }
            fn run(&mut self, _handler: &dyn ExitHandler) -> Result<VmExit> {
                if !self.started {
                    self.ran_unstarted.store(true, Ordering::SeqCst);
                }
                loop {
                    if self.kick.0.swap(false, Ordering::SeqCst) {
                        return Ok(VmExit::Interrupted);
                    }
                    if !self.script.is_empty() {
                        return Ok(self.script.remove(0));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            fn kicker(&self) -> Arc<dyn VcpuKick> {
                self.kick.clone()
            }
            fn enter_thread(&mut self) -> Result<()> {
                Ok(())
            }
            fn leave_thread(&mut self) {}
            fn start_ap(&mut self, rip: u64) -> Result<()> {
                self.started = true;
                self.starts.lock().unwrap().push((self.id, rip));
                Ok(())
            }
            fn inject_exception(&self, _vector: u8, _error_code: Option<u32>) -> Result<()> {
                Err(VmmError::Unsupported("exceptions in the fake backend"))
            }
            fn regs(&self) -> Result<Regs> {
                Ok(Regs::default())
            }
            fn set_regs(&self, _regs: &Regs) -> Result<()> {
                Ok(())
            }
            fn special_regs(&self) -> Result<SpecialRegs> {
                Ok(SpecialRegs::default())
            }
            fn set_special_regs(&self, _sregs: &SpecialRegs) -> Result<()> {
                Ok(())
            }
            fn msrs(&self, _indices: &[u32]) -> Result<Vec<Msr>> {
                Ok(Vec::new())
            }
            fn set_msrs(&self, _msrs: &[Msr]) -> Result<()> {
                Ok(())
            }
            fn mp_state(&self) -> Result<MpState> {
                Ok(MpState::Runnable)
            }
            fn set_mp_state(&self, _state: MpState) -> Result<()> {
                Ok(())
            }
            fn blocked_probe(&self) -> Option<Box<dyn BlockedProbe>> {
                None
            }
            fn save_state(&self) -> Result<BackendState> {
                Err(VmmError::Unsupported("snapshots of the fake backend"))
            }
            fn restore_state(&self, _state: &BackendState) -> Result<()> {
                Err(VmmError::Unsupported("snapshots of the fake backend"))
            }
            fn notify_paused(&self) -> Result<()> {
                Ok(())
            }
        }
    }

    #[test]
    fn where_user_space_starts_aps_an_ap_runs_only_after_its_start_exit() {
        use crate::vmm::{SuspendReason, VmExit};
        let starts = Arc::new(Mutex::new(Vec::new()));
        let ran_unstarted = Arc::new(AtomicBool::new(false));
        let vcpu = |id: u32, script: Vec<VmExit>| -> Box<dyn Vcpu> {
            Box::new(fake::FakeVcpu {
                id,
                script,
                kick: Arc::default(),
                starts: starts.clone(),
                ran_unstarted: ran_unstarted.clone(),
                started: id == 0,
            })
        };
        let bsp = vcpu(
            0,
            vec![
                VmExit::Halted,
                VmExit::StartAp {
                    vcpu: 1,
                    rip: 0x9000,
                },
            ],
        );
        let ap = vcpu(1, vec![VmExit::Suspended(SuspendReason::PowerOff)]);
        let control = VmControl::new();
        let set = VcpuSet::new(vec![bsp, ap], control.clone(), false);
        set.start(Arc::new(context(true, true))).unwrap();
        assert_eq!(
            control.wait_for_exit(Duration::from_secs(10)),
            Some(ExitReason::PowerOff)
        );
        set.join();
        assert_eq!(*starts.lock().unwrap(), vec![(1, 0x9000)]);
        assert!(
            !ran_unstarted.load(Ordering::SeqCst),
            "the AP ran before its start"
        );
    }

    #[test]
    fn a_paused_set_counts_aps_still_waiting_for_their_start() {
        let kick = Arc::new(fake::Kick::default());
        let vcpu = |id: u32| -> Box<dyn Vcpu> {
            Box::new(fake::FakeVcpu {
                id,
                script: Vec::new(),
                kick: kick.clone(),
                starts: Arc::default(),
                ran_unstarted: Arc::default(),
                started: id == 0,
            })
        };
        let control = VmControl::new();
        let set = VcpuSet::new(vec![vcpu(0), vcpu(1)], control.clone(), false);
        set.start(Arc::new(context(true, true))).unwrap();
        set.pause_all().unwrap();
        // Both paused: the AP's state can be read although it never ran.
        assert!(set.with_vcpu(1, |v| v.id()).is_ok());
        set.resume_all();
        control.request_exit(ExitReason::PowerOff);
        set.join();
    }
}
