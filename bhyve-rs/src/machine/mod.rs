//! A VM built from the configuration tree: memory, vCPUs, devices; its run loop and exit status.
//!
//! # Halting with interrupts disabled (exit status 2)
//!
//! bhyve's vmm suspends the VM with `VM_SUSPEND_HALT` when every active vCPU executes HLT with
//! RFLAGS.IF clear, and a vCPU reports it as [`crate::vmm::SuspendReason::Halt`]. A backend
//! whose kernel does not ([`crate::vmm::PlatformCaps::kernel_halt_detection`]; KVM, whose
//! in-kernel local APIC blocks a halted vCPU inside `KVM_RUN`) is watched from here: the main
//! thread samples each vCPU's [`crate::vmm::BlockedProbe`] (KVM: the binary statistics'
//! `blocking` flag and `halt_wakeup` counter), which it can read without disturbing the vCPUs.
//! When every vCPU is blocked and something changed since the last look, it pauses them all,
//! reads MP state and RFLAGS, and stops the VM with status 2 when every started vCPU is HALTED
//! with IF clear (APs still waiting for SIPI do not count). Otherwise the vCPUs resume where
//! they were. Without probes it falls back to that check once a second.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[cfg(feature = "bhyve_snapshot")]
pub mod checkpoint;
mod inspect;

use crate::boot::{self, BootError, BootFiles};
use crate::bootrom::{BootRom, BootRomError};
use crate::bus::Buses;
use crate::config::Config;
use crate::description::MachineDescription;
use crate::devices::{self, Devices};
use crate::memory::{GuestMemory, MemoryError};
use crate::vcpu::{ExitContext, ExitReason, VcpuError, VcpuSet, VmControl};
use crate::vmm::{Hypervisor, MemorySpec, Vm, VmCapabilities, VmSpec, VmmError};

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    BootRom(#[from] BootRomError),
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("{0}")]
    Vmm(#[from] VmmError),
    #[error("{0}")]
    Vcpu(#[from] VcpuError),
    /// One `devices: ` line per problem (several emulations not supported yet, say).
    #[error("{}", prefixed_lines("devices: ", .0))]
    Devices(#[from] devices::DeviceError),
    #[error(transparent)]
    Firmware(#[from] crate::firmware::FirmwareError),
}

/// `error`'s text with `prefix` before each of its lines.
fn prefixed_lines(prefix: &str, error: &impl std::fmt::Display) -> String {
    let lines: Vec<String> = error
        .to_string()
        .lines()
        .map(|line| format!("{prefix}{line}"))
        .collect();
    lines.join("\n")
}

/// How often the halt check samples the vCPUs' statistics.
const HALT_SAMPLE_INTERVAL: Duration = Duration::from_millis(50);
/// How often the halt check stops the vCPUs when no statistics are available.
const HALT_FALLBACK_INTERVAL: Duration = Duration::from_secs(1);

/// The VM `description` asks for; RAM is fresh unless `prebuilt` (a restored snapshot's).
pub fn vm_spec(description: &MachineDescription, prebuilt: Option<GuestMemory>) -> VmSpec {
    VmSpec {
        name: description.name.clone().unwrap_or_default(),
        topology: description.topology,
        memory: MemorySpec {
            size: description.memory_size,
            wired: description.memory_wired,
            guest_in_core: description.guest_in_core,
            prebuilt,
        },
        capabilities: VmCapabilities {
            exit_on_hlt: description.exit_on_hlt,
            exit_on_pause: description.exit_on_pause,
            x2apic: description.x2apic,
        },
        // bhyve-rs never leaves a VM behind: it goes when the process does.
        destroy_on_close: true,
    }
}

/// The parts of a running VM.
pub struct Machine {
    // Field order is drop order: threads stop before devices, devices before the VM and RAM.
    /// The lease on the snapshot file guest memory is mapped from, if any.
    #[cfg(all(feature = "bhyve_snapshot", target_os = "linux"))]
    file_lease: Option<crate::snapshot::lease::Lease>,
    vcpus: Arc<VcpuSet>,
    devices: Option<Arc<Mutex<Devices>>>,
    control: Arc<VmControl>,
    buses: Arc<Buses>,
    vm: Arc<dyn Vm>,
    topology: crate::vmm::Topology,
    /// The vmm capabilities the VM was created with (`bhyvectl --getcap`).
    capabilities: VmCapabilities,
    /// Guest RAM is wired (`-S`).
    wired: bool,
    /// The boot ROM the VM reads from, mapped for as long as the VM exists.
    bootrom: Option<BootRom>,
}

impl Machine {
    /// Create the VM, its RAM and its vCPUs (not started), in the reset state the backend
    /// gives them: vCPU 0 runnable, the others waiting for INIT/SIPI.
    pub fn new(hypervisor: &dyn Hypervisor, spec: VmSpec) -> Result<Self, MachineError> {
        let topology = spec.topology;
        let (capabilities, wired) = (spec.capabilities, spec.memory.wired);
        let cpus = topology.cpus;
        let vm = hypervisor.create_vm(spec)?;
        let vcpus = (0..u32::from(cpus))
            .map(|id| vm.create_vcpu(id))
            .collect::<Result<Vec<_>, _>>()?;
        let control = VmControl::new();
        let kernel_ap_start = vm.platform().kernel_ap_start;
        Ok(Self {
            #[cfg(all(feature = "bhyve_snapshot", target_os = "linux"))]
            file_lease: None,
            vcpus: Arc::new(VcpuSet::new(vcpus, control.clone(), kernel_ap_start)),
            devices: None,
            control,
            buses: Arc::new(Buses::default()),
            vm,
            topology,
            capabilities,
            wired,
            bootrom: None,
        })
    }

    pub fn memory(&self) -> &Arc<GuestMemory> {
        self.vm.memory()
    }

    pub fn buses(&self) -> &Arc<Buses> {
        &self.buses
    }

    pub fn vm(&self) -> &Arc<dyn Vm> {
        &self.vm
    }

    /// The vCPUs; clone the `Arc` to pause and resume them from another thread.
    pub fn vcpus(&self) -> &Arc<VcpuSet> {
        &self.vcpus
    }

    /// The devices, once attached.
    pub fn devices(&self) -> Option<&Arc<Mutex<Devices>>> {
        self.devices.as_ref()
    }

    pub fn control(&self) -> &Arc<VmControl> {
        &self.control
    }

    /// Create the configured devices on this machine's buses, and the firmware tables that
    /// describe them in guest memory.
    pub fn attach_devices(&mut self, config: &Config) -> Result<(), MachineError> {
        let devices = devices::attach(
            config,
            self.vm.platform(),
            &self.buses,
            self.vm.clone().interrupt_sink(),
            self.control.clone(),
            self.vm.memory().clone(),
        )?;
        crate::firmware::write_tables(config, &self.topology, self.vm.memory(), &devices)?;
        if self.vm.platform().kernel_rtc {
            self.vm
                .seed_rtc(&devices::rtc::kernel_seed(config, self.vm.memory())?)?;
        }
        self.devices = Some(Arc::new(Mutex::new(devices)));
        Ok(())
    }

    /// Map a boot ROM below 4 GiB and its variable store below it. vCPU 0 is still in the
    /// state the hypervisor gives a new vCPU, the reset state, so it starts at the ROM's reset
    /// vector unless a kernel is loaded as well.
    pub fn map_bootrom(&mut self, rom: BootRom) -> Result<(), MachineError> {
        self.vm.map_rom(rom.code())?;
        rom.attach_vars(&self.buses)?;
        self.bootrom = Some(rom);
        Ok(())
    }

    /// Load the kernel and put vCPU 0 at its 64-bit entry point.
    pub fn load_kernel(&self, files: &BootFiles) -> Result<(), MachineError> {
        let info = boot::load(self.vm.memory(), files)?;
        self.vcpus.with_vcpu(0, |vcpu| -> Result<(), VmmError> {
            let current = vcpu.special_regs()?;
            vcpu.set_special_regs(&boot::boot_special_regs(&current))?;
            vcpu.set_regs(&boot::boot_regs(&info))
        })??;
        Ok(())
    }

    /// Keep `lease` on the snapshot file guest memory is mapped from: when a writer comes, the
    /// guest is stopped while its memory moves out of the file. Device threads that write guest
    /// memory (disk workers) wait on the memory's own lock while it moves.
    #[cfg(all(feature = "bhyve_snapshot", target_os = "linux"))]
    pub fn keep_file_lease(&mut self, mut lease: crate::snapshot::lease::Lease) {
        let vcpus = Arc::downgrade(&self.vcpus);
        lease.on_break(
            Arc::downgrade(self.vm.memory()),
            Box::new(move |work| {
                let vcpus = vcpus.upgrade().ok_or("the VM is gone")?;
                vcpus
                    .pause_all()
                    .map_err(|e| format!("cannot pause the vCPUs: {e}"))?;
                work();
                vcpus.resume_all();
                Ok(())
            }),
        );
        self.file_lease = Some(lease);
    }

    /// Start the vCPU threads, once the devices (created paused) are running. `strict_io` and
    /// `strict_msr` are bhyve's `x86.strictio` and `x86.strictmsr`.
    pub fn start(&self, strict_io: bool, strict_msr: bool) -> Result<(), MachineError> {
        let context = Arc::new(ExitContext {
            buses: self.buses.clone(),
            strict_io,
            strict_msr,
        });
        if let Some(devices) = &self.devices {
            devices.lock().unwrap_or_else(|e| e.into_inner()).resume();
        }
        self.vcpus.start(context)?;
        Ok(())
    }

    /// Wait until something ends the VM (a vCPU exit, a device, the halt check), stop every
    /// vCPU thread and return why.
    pub fn wait(&self) -> ExitReason {
        let mut monitor =
            (!self.vm.platform().kernel_halt_detection).then(|| HaltMonitor::new(&self.vcpus));
        let reason = loop {
            if let Some(reason) = self.control.wait_for_exit(HALT_SAMPLE_INTERVAL) {
                break reason;
            }
            let Some(monitor) = monitor.as_mut() else {
                continue;
            };
            match monitor.check(&self.vcpus) {
                Ok(true) => self.control.request_exit(ExitReason::Halt),
                Ok(false) => {}
                Err(e) => self
                    .control
                    .request_exit(ExitReason::Error(format!("halt check: {e}"))),
            }
        };
        self.vcpus.join();
        reason
    }
}

/// Detects "every started vCPU halted with interrupts disabled" (see the module docs).
struct HaltMonitor {
    /// Wake-up counters at the last check that found a vCPU still able to run.
    checked_at: Option<Vec<u64>>,
    last_fallback: Instant,
}

impl HaltMonitor {
    fn new(vcpus: &VcpuSet) -> Self {
        if vcpus.blocked_samples().is_none() {
            log::debug!("vCPU statistics unavailable; halt check falls back to polling");
        }
        Self {
            checked_at: None,
            last_fallback: Instant::now(),
        }
    }

    fn check(&mut self, vcpus: &VcpuSet) -> Result<bool, VcpuError> {
        match vcpus.blocked_samples() {
            Some(samples) => {
                if samples.iter().any(|&(blocked, _)| !blocked) {
                    return Ok(false);
                }
                let wakeups: Vec<u64> = samples.iter().map(|&(_, count)| count).collect();
                if self.checked_at.as_ref() == Some(&wakeups) {
                    return Ok(false);
                }
                let halted = Self::inspect(vcpus)?;
                self.checked_at = Some(wakeups);
                Ok(halted)
            }
            None => {
                if self.last_fallback.elapsed() < HALT_FALLBACK_INTERVAL {
                    return Ok(false);
                }
                self.last_fallback = Instant::now();
                Self::inspect(vcpus)
            }
        }
    }

    fn inspect(vcpus: &VcpuSet) -> Result<bool, VcpuError> {
        vcpus.pause_all()?;
        let verdict = vcpus.all_halted_with_interrupts_disabled();
        vcpus.resume_all();
        verdict
    }
}

fn build(config: &Config) -> Result<Machine, MachineError> {
    devices::check_supported(config, &crate::vmm::host_platform())?;
    let description =
        MachineDescription::from_config(config).map_err(|e| MachineError::Config(e.to_string()))?;
    // Read the kernel and the boot ROM before creating anything, so a bad path costs nothing.
    let files = boot::read_boot_files(config, description.memory_size)?;
    let bootrom = BootRom::load(config)?;
    if files.is_none() && bootrom.is_none() {
        return Err(MachineError::Config(
            "virtual machine cannot be booted: neither boot.kernel nor a bootrom \
             (-l bootrom,FILE) is configured"
                .into(),
        ));
    }
    let hypervisor = crate::vmm::open_hypervisor()?;
    let mut machine = Machine::new(hypervisor.as_ref(), vm_spec(&description, None))?;
    machine.attach_devices(config)?;
    if let Some(rom) = bootrom {
        machine.map_bootrom(rom)?;
    }
    if let Some(files) = &files {
        machine.load_kernel(files)?;
    }
    Ok(machine)
}

/// Build the VM `config` describes (or, with `restore`, the one saved in that snapshot file),
/// run it until it stops, and return bhyve's exit status (0 reset, 1 power-off, 2 halt,
/// 3 triple fault, 4 error).
pub fn run(config: &Config, restore: Option<&Path>) -> i32 {
    // SIGTERM is taken by one thread with sigwait; every thread started from here on inherits
    // the blocked mask, so the signal never interrupts a vCPU or device thread.
    if let Err(e) = termination::block() {
        eprintln!("bhyve: cannot block SIGTERM: {e}");
        return 4;
    }
    // Likewise for the notice that a writer wants a leased snapshot file.
    #[cfg(all(feature = "bhyve_snapshot", target_os = "linux"))]
    if let Err(e) = crate::snapshot::lease::block_break_signal() {
        eprintln!("bhyve: cannot block SIGIO: {e}");
        return 4;
    }
    let reason = run_until_stopped(config, restore);
    // The machine is gone by now: terminal restored, control socket removed.
    if let ExitReason::Signalled(signal) = reason {
        termination::die_of(signal);
    }
    reason.status()
}

/// A failure already reported on stderr.
const FAILED: ExitReason = ExitReason::Error(String::new());

fn run_until_stopped(config: &Config, restore: Option<&Path>) -> ExitReason {
    #[cfg(feature = "bhyve_snapshot")]
    let restored;
    #[cfg(feature = "bhyve_snapshot")]
    let config = match restore {
        Some(path) => match restore_machine(config, path) {
            Ok((config, machine)) => {
                restored = Some(machine);
                config
            }
            Err(e) => {
                eprintln!("bhyve: restore {}: {e}", path.display());
                return FAILED;
            }
        },
        None => {
            restored = None;
            config.clone()
        }
    };
    #[cfg(feature = "bhyve_snapshot")]
    let config = &config;
    #[cfg(not(feature = "bhyve_snapshot"))]
    if let Some(path) = restore {
        eprintln!(
            "bhyve: restore {}: this bhyve was built without snapshot support",
            path.display()
        );
        return FAILED;
    }
    if let Some(name) = config.get("name") {
        crate::proctitle::set(&format!("bhyve: {name}"));
    }
    let description = match MachineDescription::from_config(config) {
        Ok(description) => description,
        Err(e) => {
            eprintln!("bhyve: {e}");
            return FAILED;
        }
    };
    // Pinning is checked before the VM runs: a host CPU that does not exist is a usage error.
    let host_cpus = match crate::affinity::check_host_cpus(&description.vcpu_host_cpus) {
        Ok(host_cpus) => host_cpus,
        Err(e) => {
            eprintln!("bhyve: {e}");
            return FAILED;
        }
    };
    #[cfg(feature = "bhyve_snapshot")]
    let built = match restored {
        Some(machine) => Ok(machine),
        None => build(config),
    };
    #[cfg(not(feature = "bhyve_snapshot"))]
    let built = build(config);
    let machine = match built {
        Ok(machine) => machine,
        Err(e) => {
            for line in e.to_string().lines() {
                eprintln!("bhyve: {line}");
            }
            return FAILED;
        }
    };
    // Snapshot builds need the socket for their checkpoints; other builds serve bhyvectl's
    // inspection without it if it cannot be made.
    let _control_server = match control::start(config, &machine) {
        Ok(server) => Some(server),
        Err(e) if cfg!(feature = "bhyve_snapshot") => {
            eprintln!("bhyve: control socket: {e}");
            return ExitReason::Error(String::new());
        }
        Err(e) => {
            log::warn!("control socket: {e}; bhyvectl cannot reach this VM");
            None
        }
    };
    machine.vcpus().pin_to_host_cpus(host_cpus);
    if let Err(e) = machine.start(description.strict_io, description.strict_msr) {
        eprintln!("bhyve: {e}");
        return FAILED;
    }
    if let Some(devices) = machine.devices() {
        if let Err(e) = termination::watch(devices.clone(), machine.control().clone()) {
            eprintln!("bhyve: cannot watch for SIGTERM: {e}");
            return FAILED;
        }
    }
    let reason = machine.wait();
    // A guest whose mapped snapshot file was cut short under it stops on the first page it
    // cannot have: say so rather than report a triple fault.
    #[cfg(feature = "bhyve_snapshot")]
    if matches!(reason, ExitReason::TripleFault | ExitReason::Error(_))
        && crate::snapshot::mapped::report_damage()
    {
        return FAILED;
    }
    if let ExitReason::Error(message) = &reason {
        eprintln!("bhyve: {message}");
    }
    log::info!("guest stopped: {reason:?}");
    reason
}

/// SIGTERM as bhyve handles it: once the guest has switched ACPI on, it presses the power
/// button so the guest shuts down cleanly (and bhyve exits 1 when it powers off); before that,
/// it ends the VM. SIGINT and SIGHUP end bhyve as they end FreeBSD's, but only once the VM is
/// torn down, so the terminal and the control socket are not left behind.
mod termination {
    use std::sync::{Arc, Mutex};

    use nix::sys::signal::{self, SigHandler, SigSet, SigmaskHow, Signal};

    use crate::devices::Devices;
    use crate::vcpu::{ExitReason, VmControl};

    fn sigterm() -> SigSet {
        let mut set = SigSet::empty();
        set.add(Signal::SIGTERM);
        set.add(Signal::SIGINT);
        set.add(Signal::SIGHUP);
        set
    }

    pub(super) fn block() -> nix::Result<()> {
        signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&sigterm()), None)
    }

    pub(super) fn watch(
        devices: Arc<Mutex<Devices>>,
        control: Arc<VmControl>,
    ) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("sigterm".into())
            .spawn(move || {
                let set = sigterm();
                // Each SIGTERM is one press; repeated ones are harmless.
                while let Ok(signal) = set.wait() {
                    if signal != Signal::SIGTERM {
                        control.request_exit(ExitReason::Signalled(signal as i32));
                        continue;
                    }
                    let devices = devices.lock().unwrap_or_else(|e| e.into_inner());
                    match devices.power_management() {
                        Some(pm) => {
                            let mut pm = pm.lock().unwrap_or_else(|e| e.into_inner());
                            if pm.acpi_enabled() {
                                log::info!("SIGTERM: pressing the power button");
                                pm.press_power_button();
                                continue;
                            }
                            control.request_exit(ExitReason::Signalled(signal as i32));
                        }
                        None => control.request_exit(ExitReason::Signalled(signal as i32)),
                    }
                }
            })
            .map(|_| ())
    }

    /// Die of `signal` with its default action, after the VM has been torn down.
    pub(super) fn die_of(signal: i32) {
        crate::devices::restore_terminal();
        let Ok(signal) = Signal::try_from(signal) else {
            return;
        };
        // SAFETY: installing the default disposition has no handler code to be unsound.
        let _ = unsafe { signal::signal(signal, SigHandler::SigDfl) };
        let mut set = SigSet::empty();
        set.add(signal);
        let _ = signal::pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&set), None);
        let _ = signal::raise(signal);
    }
}

/// Build a machine from a snapshot file: its configuration, its RAM (mapped lazily, or copied
/// with `snapshot.restore=copy`), and every saved state put back. Options given on the command
/// line must describe the same machine (see [`crate::snapshot::cmdline`]).
#[cfg(feature = "bhyve_snapshot")]
fn restore_machine(cli: &Config, path: &Path) -> Result<(Config, Machine), String> {
    use crate::snapshot::cmdline::{restore_config, RestoreMode};
    let snapshot = checkpoint::Restore::open(path)?;
    let (mut saved, mut given) = (snapshot.config(), cli.clone());
    devices::block::keep_disk_serials(&mut saved, &mut given);
    let config = restore_config(&saved, &given, &crate::config::default_config())?;
    let mode = RestoreMode::from_config(&config)?;
    let description = MachineDescription::from_config(&config).map_err(|e| e.to_string())?;
    // Everything that can be refused from the configuration is, before any RAM is read. The ROM
    // is not guest RAM: it comes from its file again, as on the first boot.
    devices::check_supported(&config, &crate::vmm::host_platform()).map_err(|e| e.to_string())?;
    let bootrom = BootRom::load(&config).map_err(|e| e.to_string())?;
    // The devices and firmware tables are built from memory.size: it must describe the RAM the
    // file holds, which is checked before any of it is read.
    let configured = description.memory_size;
    let configured_layout = crate::memory::layout(configured).map_err(|e| e.to_string())?;
    let saved_layout = snapshot.ram_layout();
    if configured_layout != saved_layout {
        let saved: u64 = saved_layout.iter().map(|&(_, len)| len).sum();
        return Err(format!(
            "the snapshot holds {saved} bytes of RAM, but its memory.size is {configured}"
        ));
    }
    let hypervisor = crate::vmm::open_hypervisor().map_err(|e| e.to_string())?;
    #[cfg(target_os = "linux")]
    let lease = if mode == RestoreMode::Map && hypervisor.platform().prebuilt_ram {
        snapshot.lease_file()
    } else {
        None
    };
    let mut machine = if hypervisor.platform().prebuilt_ram {
        let memory = snapshot.memory(mode)?;
        Machine::new(hypervisor.as_ref(), vm_spec(&description, Some(memory)))
            .map_err(|e| e.to_string())?
    } else {
        // The kernel owns guest RAM (FreeBSD's memory segments): copy the saved RAM in.
        let machine = Machine::new(hypervisor.as_ref(), vm_spec(&description, None))
            .map_err(|e| e.to_string())?;
        snapshot.copy_memory_into(machine.memory())?;
        machine
    };
    #[cfg(target_os = "linux")]
    if let Some(lease) = lease {
        machine.keep_file_lease(lease);
    }
    machine.attach_devices(&config).map_err(|e| e.to_string())?;
    if let Some(rom) = bootrom {
        machine.map_bootrom(rom).map_err(|e| e.to_string())?;
    }
    let devices = machine
        .devices()
        .cloned()
        .ok_or_else(|| "no devices attached".to_string())?;
    snapshot.apply(
        machine.vm().as_ref(),
        machine.vcpus(),
        &devices.lock().unwrap_or_else(|e| e.into_inner()),
    )?;
    machine
        .vm()
        .finish_restore()
        .map_err(|e| format!("VM state: {e}"))?;
    Ok((config, machine))
}

/// The control socket of a running machine: `bhyvectl --checkpoint/--suspend` (snapshot
/// builds) and `bhyvectl --get-*/--set-*` and the VM actions.
mod control {
    use std::path::PathBuf;
    use std::sync::Arc;

    use super::inspect::Inspector;
    use super::Machine;
    use crate::config::Config;
    use crate::control::client::DEFAULT_RUNDIR;
    use crate::control::nvlist::NvList;
    use crate::control::server::{CheckpointRequest, ControlHandler, ControlServer};
    use crate::control::vmstate::{
        check_version, requested_vcpu, RegisterWrites, ACTIONS, CMD_SET_REGISTERS, CMD_VM_ACTION,
        CMD_VM_STATE, VERSION,
    };

    struct Handler {
        machine: Inspector,
        #[cfg(feature = "bhyve_snapshot")]
        checkpointer: snapshot::Checkpointer,
        /// The VM's name, for the refusal of a checkpoint.
        #[cfg(not(feature = "bhyve_snapshot"))]
        name: String,
    }

    fn reply_version() -> NvList {
        let mut reply = NvList::new();
        let _ = reply.add_number("version", VERSION);
        reply
    }

    /// Carry out one of the [`vmstate`] requests on `machine`.
    fn serve(machine: &Inspector, cmd: &str, request: &NvList) -> Option<Result<NvList, String>> {
        let cpus = machine.vcpu_count();
        let run = || -> Result<NvList, String> {
            check_version(request)?;
            let vcpu = requested_vcpu(request, cpus)?;
            let mut reply = reply_version();
            match cmd {
                CMD_VM_STATE => {
                    let state = machine.inspect(vcpu)?;
                    reply
                        .add_nvlist("state", state.encode())
                        .map_err(|e| e.to_string())?;
                }
                CMD_SET_REGISTERS => {
                    let writes = RegisterWrites::from_request(request)?;
                    machine.write_registers(vcpu, &writes)?;
                }
                _ => {
                    let action = request
                        .get_string("action")
                        .ok_or("request lacks a string 'action'")?;
                    if !ACTIONS.contains(&action) {
                        return Err(format!("unknown action '{action}'"));
                    }
                    machine.act(action, vcpu)?;
                }
            }
            Ok(reply)
        };
        match cmd {
            CMD_VM_STATE | CMD_SET_REGISTERS | CMD_VM_ACTION => Some(run()),
            _ => None,
        }
    }

    impl ControlHandler for Handler {
        fn checkpoint(&self, request: CheckpointRequest) -> Result<(), String> {
            #[cfg(feature = "bhyve_snapshot")]
            return self.checkpointer.checkpoint(request);
            #[cfg(not(feature = "bhyve_snapshot"))]
            {
                drop(request);
                Err(format!(
                    "VM '{}' runs a bhyve built without snapshot support",
                    self.name
                ))
            }
        }

        fn after_checkpoint_reply(&self, suspend: bool, result: &Result<(), String>) {
            #[cfg(feature = "bhyve_snapshot")]
            self.checkpointer.after_checkpoint_reply(suspend, result);
            #[cfg(not(feature = "bhyve_snapshot"))]
            let _ = (suspend, result);
        }

        fn request(&self, cmd: &str, request: &NvList) -> Option<Result<NvList, String>> {
            serve(&self.machine, cmd, request)
        }
    }

    #[cfg(feature = "bhyve_snapshot")]
    mod snapshot {
        use std::sync::{Arc, Mutex};

        use super::super::checkpoint::{checkpoint, resume, SaveTarget};
        use crate::config::Config;
        use crate::control::server::CheckpointRequest;
        use crate::devices::Devices;
        use crate::memory::GuestMemory;
        use crate::vcpu::{ExitReason, VcpuSet, VmControl};
        use crate::vmm::Vm;

        pub(super) struct Checkpointer {
            pub(super) config: Config,
            pub(super) memory: Arc<GuestMemory>,
            pub(super) vm: Arc<dyn Vm>,
            pub(super) vcpus: Arc<VcpuSet>,
            pub(super) devices: Arc<Mutex<Devices>>,
            pub(super) control: Arc<VmControl>,
        }

        impl Checkpointer {
            /// Run `f` on the machine with its devices locked.
            fn with_target<R>(&self, f: impl FnOnce(&SaveTarget<'_>) -> R) -> R {
                let devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
                f(&SaveTarget {
                    config: &self.config,
                    memory: &self.memory,
                    vm: self.vm.as_ref(),
                    vcpus: &self.vcpus,
                    devices: &devices,
                })
            }

            pub(super) fn checkpoint(&self, request: CheckpointRequest) -> Result<(), String> {
                let written = self.with_target(|target| {
                    checkpoint(target, &request.dir, &request.filename, request.suspend)
                })?;
                // The devices are unlocked while the file goes to disk, so a SIGTERM meanwhile
                // presses the power button at once. A suspended VM stays paused until bhyve
                // exits once the reply is out.
                written.commit(|| self.with_target(resume))
            }

            pub(super) fn after_checkpoint_reply(
                &self,
                suspend: bool,
                result: &Result<(), String>,
            ) {
                if suspend && result.is_ok() {
                    self.control.request_exit(ExitReason::Suspended);
                }
            }
        }
    }

    pub(super) fn start(config: &Config, machine: &Machine) -> Result<ControlServer, String> {
        let name = config
            .get("name")
            .ok_or_else(|| "the VM has no name".to_string())?;
        let rundir = PathBuf::from(config.get("rundir").unwrap_or(DEFAULT_RUNDIR));
        #[cfg(feature = "bhyve_snapshot")]
        let checkpointer = snapshot::Checkpointer {
            config: config.clone(),
            memory: machine.memory().clone(),
            vm: machine.vm().clone(),
            vcpus: machine.vcpus().clone(),
            devices: machine
                .devices()
                .cloned()
                .ok_or_else(|| "no devices attached".to_string())?,
            control: machine.control().clone(),
        };
        let handler = Arc::new(Handler {
            machine: machine.inspector(),
            #[cfg(feature = "bhyve_snapshot")]
            checkpointer,
            #[cfg(not(feature = "bhyve_snapshot"))]
            name: name.to_string(),
        });
        ControlServer::start(&rundir, name, handler).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_kernel_fails_before_any_vm_exists() {
        let c = Config::from_pairs(&[("boot.kernel", "/nonexistent/kernel")]);
        assert_eq!(run(&c, None), 4);
        let err = build(&c).err().unwrap();
        assert_eq!(
            err.to_string(),
            "boot.kernel: /nonexistent/kernel: No such file or directory"
        );
    }
}

#[cfg(all(test, target_os = "linux"))]
pub(crate) mod kvm_tests;
