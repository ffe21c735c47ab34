//! Machines on the real KVM backend running tiny hand-assembled guests. They skip (with a
//! message) when /dev/kvm cannot be used, and fail instead when BHYVE_RS_REQUIRE_KVM=1.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::boot::linux::tests::synthetic_elf;
use crate::boot::{BootFiles, KernelImage};
use crate::bus::{BusDevice, SharedDevice};
use crate::devices::pci::PciAddress;
use crate::vmm::{MpState, Segment, Topology};

/// A VM of `size` bytes of fresh RAM with `topology`, as `bhyve` would ask for it.
fn spec(size: u64, topology: Topology, prebuilt: Option<GuestMemory>) -> crate::vmm::VmSpec {
    let description = MachineDescription {
        name: Some("test".into()),
        topology,
        memory_size: size,
        vcpu_host_cpus: vec![None; usize::from(topology.cpus)],
        memory_wired: false,
        guest_in_core: false,
        strict_io: false,
        strict_msr: true,
        exit_on_hlt: false,
        exit_on_pause: false,
        x2apic: false,
    };
    vm_spec(&description, prebuilt)
}

pub(crate) fn hypervisor() -> Option<Box<dyn Hypervisor>> {
    match crate::vmm::open_hypervisor() {
        Ok(h) => Some(h),
        Err(e) => {
            if std::env::var("BHYVE_RS_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("BHYVE_RS_REQUIRE_KVM=1 but /dev/kvm is unusable: {e}");
            }
            eprintln!("skipped: /dev/kvm is unusable here: {e}");
            None
        }
    }
}

#[derive(Default)]
struct Recorder {
    writes: Vec<(u64, Vec<u8>)>,
}

impl BusDevice for Recorder {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0x42);
    }
    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        self.writes.push((offset, data.to_vec()));
    }
}

fn recorder() -> (Arc<Mutex<Recorder>>, SharedDevice) {
    let r = Arc::new(Mutex::new(Recorder::default()));
    (r.clone(), r)
}

fn bytes_written(r: &Arc<Mutex<Recorder>>) -> Vec<u8> {
    r.lock()
        .unwrap()
        .writes
        .iter()
        .flat_map(|(_, d)| d.clone())
        .collect()
}

pub(crate) const GUEST_BASE: u64 = 0x20_0000;

/// A machine with `code` loaded as a 64-bit ELF kernel at 2 MiB, entered in long mode.
pub(crate) fn long_mode_machine(hv: &dyn Hypervisor, code: &[u8], cpus: u16) -> Machine {
    let topology = Topology {
        cpus,
        sockets: cpus,
        cores: 1,
        threads: 1,
    };
    long_mode_machine_with(hv, code, &topology)
}

fn long_mode_machine_with(hv: &dyn Hypervisor, code: &[u8], topology: &Topology) -> Machine {
    let machine = Machine::new(hv, spec(16 << 20, *topology, None)).unwrap();
    let files = BootFiles {
        kernel_path: PathBuf::from("test-guest"),
        kernel: KernelImage::parse(synthetic_elf(GUEST_BASE, code, 0)).unwrap(),
        initrd: None,
        cmdline: "console=ttyS0".into(),
    };
    machine.load_kernel(&files).unwrap();
    machine
}

/// A 1 MiB machine whose boot vCPU runs `code` in real mode at 0x1000, with CS and DS at 0.
fn real_mode_machine(hv: &dyn Hypervisor, code: &[u8]) -> Machine {
    let machine = Machine::new(hv, spec(1 << 20, Topology::default(), None)).unwrap();
    machine.memory().write(0x1000, code).unwrap();
    machine
        .vcpus()
        .with_vcpu(0, |vcpu| -> crate::vmm::Result<()> {
            let mut sregs = vcpu.special_regs()?;
            sregs.cs = Segment {
                base: 0,
                selector: 0,
                ..sregs.cs
            };
            sregs.ds = Segment {
                base: 0,
                selector: 0,
                ..sregs.ds
            };
            vcpu.set_special_regs(&sregs)?;
            vcpu.set_regs(&crate::vmm::Regs {
                rip: 0x1000,
                rflags: 2,
                ..Default::default()
            })
        })
        .unwrap()
        .unwrap();
    machine
}

/// Run until the VM stops, giving up after `limit`.
pub(crate) fn run_to_end(machine: &Machine, strict_io: bool, limit: Duration) -> ExitReason {
    machine.start(strict_io, true).unwrap();
    let control = machine.control().clone();
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        control.request_exit(ExitReason::Error("test timed out".into()));
    });
    machine.wait()
}

// Hand-assembled 64-bit instructions.
const MOV_DX_COM1: [u8; 4] = [0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
const OUT_DX_AL: u8 = 0xee;
const OUT_DX_EAX: u8 = 0xef;
const CLI_HLT: [u8; 2] = [0xfa, 0xf4];

#[test]
fn long_mode_guest_sees_boot_params_and_port_writes_reach_the_bus() {
    let Some(hv) = hypervisor() else { return };
    let mut code = vec![0xb0, b'K']; // mov al, 'K'
    code.extend(MOV_DX_COM1);
    code.push(OUT_DX_AL);
    code.extend([0x8a, 0x86, 0xe8, 0x01, 0x00, 0x00]); // mov al, [rsi + 0x1e8] (e820_entries)
    code.push(OUT_DX_AL);
    code.extend([0x8b, 0x86, 0x28, 0x02, 0x00, 0x00]); // mov eax, [rsi + 0x228] (cmd_line_ptr)
    code.push(OUT_DX_EAX);
    code.extend(CLI_HLT);
    let machine = long_mode_machine(hv.as_ref(), &code, 1);
    let (com1, device) = recorder();
    machine.buses().pio.insert(0x3f8, 8, device).unwrap();
    let reason = run_to_end(&machine, true, Duration::from_secs(30));
    assert_eq!(reason, ExitReason::Halt);
    assert_eq!(reason.status(), 2);
    let mut expected = vec![b'K', 3];
    expected.extend(0x20000u32.to_le_bytes());
    assert_eq!(bytes_written(&com1), expected);
    let mut cmdline = [0u8; 14];
    machine.memory().read(0x20000, &mut cmdline).unwrap();
    assert_eq!(&cmdline, b"console=ttyS0\0");
}

#[test]
fn guest_cpuid_reports_topology_and_kvm_signature() {
    let Some(hv) = hypervisor() else { return };
    // CPUID overwrites edx, so the port is loaded after each one.
    let mut code = vec![0xb8, 0x01, 0x00, 0x00, 0x00]; // mov eax, 1
    code.extend([0x0f, 0xa2, 0x89, 0xd8]); // cpuid; mov eax, ebx
    code.extend(MOV_DX_COM1);
    code.extend([0xc1, 0xe8, 0x10, OUT_DX_AL]); // shr eax, 16; out (logical CPUs per package)
    code.extend([0xc1, 0xe8, 0x08, OUT_DX_AL]); // shr eax, 8; out (APIC id)
                                                // The package's logical CPUs in the topology leaf of the host's vendor: leaf 0xB subleaf 1
                                                // EBX on Intel, 0x8000_0008 ECX (NC, one less) on AMD, where leaf 0xB reads as zero.
    let amd = host_is_amd();
    if amd {
        code.extend([0xb8, 0x08, 0x00, 0x00, 0x80]); // mov eax, 0x80000008
        code.extend([0x0f, 0xa2, 0x89, 0xc8]); // cpuid; mov eax, ecx
    } else {
        code.extend([0xb8, 0x0b, 0x00, 0x00, 0x00]); // mov eax, 0xb
        code.extend([0xb9, 0x01, 0x00, 0x00, 0x00]); // mov ecx, 1
        code.extend([0x0f, 0xa2, 0x89, 0xd8]); // cpuid; mov eax, ebx
    }
    code.extend(MOV_DX_COM1);
    code.push(OUT_DX_AL);
    code.extend([0xb8, 0x00, 0x00, 0x00, 0x40]); // mov eax, 0x40000000
    code.extend([0x0f, 0xa2, 0x89, 0xd8]); // cpuid; mov eax, ebx
    code.extend(MOV_DX_COM1);
    code.push(OUT_DX_EAX);
    code.extend(CLI_HLT);
    let topology = Topology {
        cpus: 4,
        sockets: 1,
        cores: 2,
        threads: 2,
    };
    let machine = long_mode_machine_with(hv.as_ref(), &code, &topology);
    let (com1, device) = recorder();
    machine.buses().pio.insert(0x3f8, 8, device).unwrap();
    assert_eq!(
        run_to_end(&machine, false, Duration::from_secs(30)),
        ExitReason::Halt
    );
    let package = if amd { 3 } else { 4 };
    assert_eq!(
        bytes_written(&com1),
        [4, 0, package, b'K', b'V', b'M', b'K']
    );
}

/// Whether this host's CPU is AMD's (or Hygon's): its topology leaves are AMD's.
fn host_is_amd() -> bool {
    #[allow(unused_unsafe)] // `__cpuid` is safe in newer compilers
    // SAFETY: CPUID exists on every x86-64 CPU.
    let leaf0 = unsafe { std::arch::x86_64::__cpuid(0) };
    [*b"Auth", *b"Hygo"].contains(&leaf0.ebx.to_le_bytes())
}

#[test]
fn mmio_goes_to_the_bus_and_unclaimed_mmio_reads_all_ones() {
    let Some(hv) = hypervisor() else { return };
    let mut code = vec![0xb8, 0x44, 0x33, 0x22, 0x11]; // mov eax, 0x11223344
    code.extend([0x48, 0xbb, 0, 0, 0, 0xd0, 0, 0, 0, 0]); // mov rbx, 0xd0000000
    code.extend([0x89, 0x03]); // mov [rbx], eax
    code.extend([0x8b, 0x83, 0x00, 0x10, 0x00, 0x00]); // mov eax, [rbx + 0x1000]
    code.extend(MOV_DX_COM1);
    code.push(OUT_DX_EAX);
    code.extend([0x8b, 0x43, 0x04]); // mov eax, [rbx + 4]
    code.push(OUT_DX_EAX);
    code.extend(CLI_HLT);
    let machine = long_mode_machine(hv.as_ref(), &code, 1);
    let (com1, device) = recorder();
    machine.buses().pio.insert(0x3f8, 8, device).unwrap();
    let (window, device) = recorder();
    machine
        .buses()
        .mmio
        .insert(0xd000_0000, 0x1000, device)
        .unwrap();
    let reason = run_to_end(&machine, false, Duration::from_secs(30));
    assert_eq!(reason, ExitReason::Halt);
    assert_eq!(
        window.lock().unwrap().writes,
        vec![(0, vec![0x44, 0x33, 0x22, 0x11])]
    );
    assert_eq!(
        bytes_written(&com1),
        [[0xff; 4], [0x42; 4]].concat(),
        "unclaimed MMIO reads all-ones, claimed MMIO reads the device"
    );
}

#[test]
fn strictio_stops_the_vm_on_an_unclaimed_port() {
    let Some(hv) = hypervisor() else { return };
    let code = [0xb0, 0x01, 0xe6, 0x80, 0xfa, 0xf4]; // mov al, 1; out 0x80, al; cli; hlt
    let machine = long_mode_machine(hv.as_ref(), &code, 1);
    let reason = run_to_end(&machine, true, Duration::from_secs(30));
    let ExitReason::Error(message) = &reason else {
        panic!("{reason:?}");
    };
    assert!(
        message.starts_with("Unhandled outb 0x0080 at 0x20000"),
        "{message}"
    );
    assert_eq!(reason.status(), 4);

    let lenient = long_mode_machine(hv.as_ref(), &code, 1);
    assert_eq!(
        run_to_end(&lenient, false, Duration::from_secs(30)),
        ExitReason::Halt
    );
}

#[test]
fn a_triple_fault_ends_with_status_3() {
    let Some(hv) = hypervisor() else { return };
    let machine = long_mode_machine(hv.as_ref(), &[0x0f, 0x0b], 1); // ud2, no IDT
    let reason = run_to_end(&machine, false, Duration::from_secs(30));
    assert_eq!(reason, ExitReason::TripleFault);
    assert_eq!(reason.status(), 3);
}

#[test]
fn halt_with_interrupts_enabled_keeps_the_vm_alive() {
    let Some(hv) = hypervisor() else { return };
    let machine = long_mode_machine(hv.as_ref(), &[0xfb, 0xf4, 0xeb, 0xfc], 1); // sti; hlt; jmp
    machine.start(false, true).unwrap();
    let control = machine.control().clone();
    let vcpus = machine.vcpus().clone();
    // Another thread pauses and inspects the vCPU while the main thread waits in `wait`.
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(600));
        let early = control.exit_reason();
        vcpus.pause_all().unwrap();
        let state = vcpus
            .with_vcpu(0, |v| (v.mp_state().unwrap(), v.regs().unwrap().rflags))
            .unwrap();
        vcpus.resume_all();
        control.request_exit(ExitReason::PowerOff);
        (early, state)
    });
    let reason = machine.wait();
    let (early, (mp_state, rflags)) = stopper.join().unwrap();
    assert_eq!(early, None, "no exit while IF=1");
    assert_eq!(mp_state, MpState::Halted);
    assert_ne!(rflags & crate::vmm::RFLAGS_IF, 0);
    assert_eq!(reason, ExitReason::PowerOff);
}

#[test]
fn real_mode_port_output_reaches_the_bus() {
    let Some(hv) = hypervisor() else { return };
    // mov dx, 0x3f8; mov al, 'A'; out dx, al; cli; hlt
    let machine = real_mode_machine(
        hv.as_ref(),
        &[0xba, 0xf8, 0x03, 0xb0, b'A', 0xee, 0xfa, 0xf4],
    );
    let (com1, device) = recorder();
    machine.buses().pio.insert(0x3f8, 8, device).unwrap();
    let reason = run_to_end(&machine, true, Duration::from_secs(30));
    assert_eq!(reason, ExitReason::Halt);
    assert_eq!(bytes_written(&com1), b"A");
}

#[test]
fn the_dirty_log_names_exactly_the_pages_the_guest_wrote_since_the_last_look() {
    let Some(hv) = hypervisor() else { return };
    // mov byte [0x5000], 1; mov byte [0x9123], 2; cli; hlt
    let code = [
        0xc6, 0x06, 0x00, 0x50, 0x01, 0xc6, 0x06, 0x23, 0x91, 0x02, 0xfa, 0xf4,
    ];
    let machine = real_mode_machine(hv.as_ref(), &code);
    assert!(machine.vm().platform().dirty_log);
    let vm = machine.vm();
    assert!(
        vm.take_dirty_pages().is_err(),
        "no log before it is started"
    );
    vm.start_dirty_log().unwrap();
    // User space's writes are not the guest's: the log does not see them.
    machine.memory().write(0x3000, &[7]).unwrap();
    let reason = run_to_end(&machine, true, Duration::from_secs(30));
    assert_eq!(reason, ExitReason::Halt);
    let dirty = vm.take_dirty_pages().unwrap();
    let pages: Vec<usize> = (0..256).filter(|&p| dirty[0].is_dirty(p)).collect();
    assert_eq!(pages, [0x5, 0x9]);
    assert_eq!(dirty[0].count(), 2);
    // Taking the log forgets what it held.
    assert_eq!(vm.take_dirty_pages().unwrap()[0].count(), 0);
    vm.stop_dirty_log().unwrap();
    assert!(vm.take_dirty_pages().is_err());
}

#[test]
fn pause_stops_spinning_vcpus_and_resume_restarts_them() {
    let Some(hv) = hypervisor() else { return };
    const COUNTER: u64 = 0x30_0000;
    // loop: inc qword [0x300000]; jmp loop
    let code = [0x48, 0xff, 0x04, 0x25, 0x00, 0x00, 0x30, 0x00, 0xeb, 0xf6];
    // Two vCPUs: vCPU 0 spins, vCPU 1 sits in wait-for-SIPI inside KVM_RUN; both must park.
    let machine = long_mode_machine(hv.as_ref(), &code, 2);
    machine.start(false, true).unwrap();
    let counter = || machine.memory().read_u64(COUNTER).unwrap();

    std::thread::sleep(Duration::from_millis(200));
    assert!(counter() > 0, "the guest runs");

    for _ in 0..3 {
        let asked = Instant::now();
        machine.vcpus().pause_all().unwrap();
        let latency = asked.elapsed();
        assert!(latency < Duration::from_secs(1), "pause took {latency:?}");
        let frozen = counter();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(counter(), frozen, "no progress while paused");
        let rip = machine
            .vcpus()
            .with_vcpu(0, |vcpu| vcpu.regs().map(|r| r.rip))
            .unwrap()
            .unwrap();
        assert!((GUEST_BASE..GUEST_BASE + code.len() as u64).contains(&rip));
        let ap_state = machine
            .vcpus()
            .with_vcpu(1, |vcpu| vcpu.mp_state())
            .unwrap()
            .unwrap();
        assert_eq!(ap_state, MpState::WaitForSipi);

        machine.vcpus().resume_all();
        assert!(matches!(
            machine.vcpus().with_vcpu(0, |_| ()),
            Err(VcpuError::NotPaused)
        ));
        let deadline = Instant::now() + Duration::from_secs(5);
        while counter() == frozen && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(counter() > frozen, "progress after resume");
    }

    machine.control().request_exit(ExitReason::PowerOff);
    assert_eq!(machine.wait(), ExitReason::PowerOff);
}

#[test]
fn run_boots_an_elf_kernel_file_and_returns_bhyve_status() {
    let Some(_hv) = hypervisor() else { return };
    let path = std::env::temp_dir().join(format!("bhyve-rs-test-{}.elf", std::process::id()));
    std::fs::write(&path, synthetic_elf(GUEST_BASE, &CLI_HLT, 0)).unwrap();
    let mut config = Config::new();
    config.set("boot.kernel", path.to_str().unwrap());
    config.set("memory.size", "5G"); // two RAM slots: below 3 GiB and from 4 GiB
    config.set("cpus", "2");
    // With snapshot support the VM listens on <rundir>/<name>.
    config.set("name", &format!("run-test-{}", std::process::id()));
    // A run directory of its own: never the host's /var/run/bhyve or a shared one.
    let rundir = std::env::temp_dir().join(format!("bhyve-rs-run-{}", std::process::id()));
    config.set("rundir", rundir.to_str().unwrap());
    let status = run(&config, None);
    std::fs::remove_file(&path).ok();
    std::fs::remove_dir_all(&rundir).ok();
    assert_eq!(status, 2);
}

#[test]
fn saved_vm_and_vcpu_state_resumes_in_a_new_vm() {
    let Some(hv) = hypervisor() else { return };
    const COUNTER: u64 = 0x30_0000;
    let code = [0x48, 0xff, 0x04, 0x25, 0x00, 0x00, 0x30, 0x00, 0xeb, 0xf6];
    let original = long_mode_machine(hv.as_ref(), &code, 2);
    original.start(false, true).unwrap();
    std::thread::sleep(Duration::from_millis(100));

    original.vcpus().pause_all().unwrap();
    let vm_state = original.vm().save_state().unwrap();
    let vcpu_states: Vec<_> = (0..2)
        .map(|i| {
            original
                .vcpus()
                .with_vcpu(i, |v| v.save_state())
                .unwrap()
                .unwrap()
        })
        .collect();
    let ram = original.memory().slice(0, 16 << 20).unwrap().to_vec();
    let saved_count = original.memory().read_u64(COUNTER).unwrap();
    original.control().request_exit(ExitReason::Suspended);
    assert_eq!(original.wait(), ExitReason::Suspended);
    assert!(saved_count > 0);
    assert_eq!(vm_state.backend, "kvm");
    assert!(vcpu_states[0].section("lapic").is_some());

    // RAM comes back the way a snapshot restore maps it: a private mapping of the saved image.
    let image = std::env::temp_dir().join(format!("bhyve-rs-ram-{}.img", std::process::id()));
    std::fs::write(&image, &ram).unwrap();
    let file = std::fs::File::open(&image).unwrap();
    // SAFETY: the file is private to this test and not changed while mapped.
    let mapping = unsafe { memmap2::MmapOptions::new().map_copy(&file) }.unwrap();
    std::fs::remove_file(&image).unwrap();
    let memory =
        GuestMemory::from_regions(vec![crate::memory::GuestRegion::from_mapping(0, mapping)])
            .unwrap();
    let topology = Topology {
        cpus: 2,
        sockets: 2,
        cores: 1,
        threads: 1,
    };
    let restored = Machine::new(hv.as_ref(), spec(16 << 20, topology, Some(memory))).unwrap();
    restored.vm().restore_state(&vm_state).unwrap();
    for (i, state) in vcpu_states.iter().enumerate() {
        restored
            .vcpus()
            .with_vcpu(i, |v| v.restore_state(state))
            .unwrap()
            .unwrap();
    }
    // Saving the restored vCPU again gives the same registers and MP state.
    let again = restored
        .vcpus()
        .with_vcpu(0, |v| v.save_state())
        .unwrap()
        .unwrap();
    for name in ["regs", "sregs", "mp_state"] {
        assert_eq!(again.section(name), vcpu_states[0].section(name), "{name}");
    }
    let ap = restored
        .vcpus()
        .with_vcpu(1, |v| v.mp_state())
        .unwrap()
        .unwrap();
    assert_eq!(ap, MpState::WaitForSipi);

    restored.start(false, true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while restored.memory().read_u64(COUNTER).unwrap() == saved_count && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(restored.memory().read_u64(COUNTER).unwrap() > saved_count);
    restored.control().request_exit(ExitReason::PowerOff);
    assert_eq!(restored.wait(), ExitReason::PowerOff);

    let mut foreign = vm_state.clone();
    foreign.backend = "vmm".into();
    assert!(restored.vm().restore_state(&foreign).is_err());
}

#[test]
fn the_boot_vcpu_starts_an_ap_with_init_and_sipi() {
    let Some(hv) = hypervisor() else { return };
    let mut bsp = vec![0x48, 0xbb, 0x00, 0x00, 0xe0, 0xfe, 0, 0, 0, 0]; // mov rbx, 0xfee00000
                                                                        // Software-enable the local APIC (SVR at offset 0xf0 = 0x1ff): KVM sends no IPI otherwise.
    bsp.extend([0xc7, 0x83, 0xf0, 0x00, 0x00, 0x00, 0xff, 0x01, 0x00, 0x00]);
    for low in [0x0000_4500u32, 0x0000_4610] {
        // ICR high: destination APIC id 1; ICR low: INIT, then STARTUP at vector 0x10
        bsp.extend([0xc7, 0x83, 0x10, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01]);
        bsp.extend([0xc7, 0x83, 0x00, 0x03, 0x00, 0x00]);
        bsp.extend(low.to_le_bytes());
    }
    bsp.extend(CLI_HLT);
    let machine = long_mode_machine(hv.as_ref(), &bsp, 2);
    // The AP starts in real mode at 0x10000: mov dx, 0x3f8; mov al, 'B'; out dx, al; cli; hlt
    let ap = [0xba, 0xf8, 0x03, 0xb0, b'B', 0xee, 0xfa, 0xf4];
    machine.memory().write(0x1_0000, &ap).unwrap();
    let (com1, device) = recorder();
    machine.buses().pio.insert(0x3f8, 8, device).unwrap();
    let reason = run_to_end(&machine, true, Duration::from_secs(30));
    assert_eq!(reason, ExitReason::Halt, "both vCPUs end halted");
    assert_eq!(bytes_written(&com1), b"B");
}

#[test]
fn msi_and_ioapic_lines_interrupt_a_halted_guest() {
    let Some(hv) = hypervisor() else { return };
    const IDT: u64 = 0x4_0000;
    const IDTR: u64 = 0x3_f000;
    // Mask both 8259s first: they reach the BSP's LINT0 too, with vectors nobody set up.
    let mut code = vec![0xb0, 0xff, 0xe6, 0x21, 0xe6, 0xa1]; // mov al, 0xff; out 0x21/0xa1, al
    code.extend([0x0f, 0x01, 0x1c, 0x25]); // lidt [IDTR]
    code.extend((IDTR as u32).to_le_bytes());
    code.extend([0x48, 0xbb, 0x00, 0x00, 0xe0, 0xfe, 0, 0, 0, 0]); // mov rbx, 0xfee00000
    code.extend([0xc7, 0x83, 0xf0, 0x00, 0x00, 0x00, 0xff, 0x01, 0x00, 0x00]); // SVR = 0x1ff
    code.extend([0x48, 0xb9, 0x00, 0x00, 0xc0, 0xfe, 0, 0, 0, 0]); // mov rcx, 0xfec00000
                                                                   // IOAPIC redirection entry 5: vector 0x41, fixed, edge, unmasked, to APIC 0.
    code.extend([0xc7, 0x01, 0x1a, 0x00, 0x00, 0x00]); // IOREGSEL = 0x1a
    code.extend([0xc7, 0x41, 0x10, 0x41, 0x00, 0x00, 0x00]); // IOWIN = 0x41
    code.extend([0xc7, 0x01, 0x1b, 0x00, 0x00, 0x00]); // IOREGSEL = 0x1b
    code.extend([0xc7, 0x41, 0x10, 0x00, 0x00, 0x00, 0x00]); // IOWIN = 0
    code.extend([0xfb, 0xf4, 0xeb, 0xfd]); // sti; idle: hlt; jmp idle
    let handler = |letter: u8, last: bool| {
        let mut h = vec![0x50, 0x52, 0xb0, letter]; // push rax; push rdx; mov al, letter
        h.extend(MOV_DX_COM1);
        h.push(OUT_DX_AL);
        h.extend([0x48, 0xb8, 0xb0, 0x00, 0xe0, 0xfe, 0, 0, 0, 0]); // mov rax, 0xfee000b0
        h.extend([0xc7, 0x00, 0x00, 0x00, 0x00, 0x00]); // EOI
        if last {
            h.extend(CLI_HLT);
        } else {
            h.extend([0x5a, 0x58, 0x48, 0xcf]); // pop rdx; pop rax; iretq
        }
        h
    };
    code.resize(0x100, 0x90);
    code.extend(handler(b'I', false));
    code.resize(0x180, 0x90);
    code.extend(handler(b'J', true));
    let machine = long_mode_machine(hv.as_ref(), &code, 1);
    for (vector, offset) in [(0x40u64, 0x100u64), (0x41, 0x180)] {
        let target = GUEST_BASE + offset;
        let mut gate = [0u8; 16];
        gate[0..2].copy_from_slice(&(target as u16).to_le_bytes());
        gate[2..4].copy_from_slice(&crate::boot::BOOT_CS.to_le_bytes());
        gate[5] = 0x8e; // present, DPL 0, 64-bit interrupt gate
        gate[6..8].copy_from_slice(&((target >> 16) as u16).to_le_bytes());
        gate[8..12].copy_from_slice(&((target >> 32) as u32).to_le_bytes());
        machine.memory().write(IDT + vector * 16, &gate).unwrap();
    }
    let mut idtr = vec![0xffu8, 0x0f];
    idtr.extend(IDT.to_le_bytes());
    machine.memory().write(IDTR, &idtr).unwrap();
    let (com1, device) = recorder();
    machine.buses().pio.insert(0x3f8, 8, device).unwrap();
    let vm = machine.vm().clone();
    machine.start(false, true).unwrap();

    let wait_for = |expected: &[u8]| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while bytes_written(&com1) != expected && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(bytes_written(&com1), expected);
    };
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(machine.control().exit_reason(), None, "idle with IF=1");
    vm.signal_msi(0xfee0_0000, 0x40).unwrap();
    wait_for(b"I");
    vm.set_irq_line(5, true).unwrap();
    vm.set_irq_line(5, false).unwrap();
    wait_for(b"IJ");
    let control = machine.control().clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(10));
        control.request_exit(ExitReason::Error("test timed out".into()));
    });
    assert_eq!(machine.wait(), ExitReason::Halt);
}

#[test]
fn a_pci_intx_assertion_reaches_its_ioapic_input_and_the_guest_vector() {
    let Some(hv) = hypervisor() else { return };
    const IDT: u64 = 0x4_0000;
    const IDTR: u64 = 0x3_f000;
    const VECTOR: u64 = 0x41;
    let mut config = Config::new();
    config.set("pci.0.0.0.device", "hostbridge");
    config.set("pci.0.3.0.device", "dummy");
    // The guest is only known once the bus has routed the pin, so build the devices on a
    // throw-away machine first to learn the dummy's I/O BAR and I/O APIC input.
    let (io_bar, ioapic_pin) = {
        let mut probe = long_mode_machine(hv.as_ref(), &CLI_HLT, 1);
        probe.attach_devices(&config).unwrap();
        let devices = probe.devices().unwrap().lock().unwrap();
        let root = devices.pci().unwrap();
        let dummy = root.function(PciAddress::new(0, 3, 0).unwrap()).unwrap();
        let io = dummy.lock().unwrap().config().bar(0).addr as u16;
        let routes = root.intx_routes();
        assert_eq!(routes.len(), 1);
        assert_eq!((routes[0].slot, routes[0].pin), (3, 1));
        (io, routes[0].route.ioapic_irq)
    };
    assert_eq!(
        ioapic_pin, 16,
        "the first routed pin gets I/O APIC input 16"
    );
    let intx_port = (io_bar + crate::devices::pci::dummy::INTX_OFFSET as u16).to_le_bytes();

    let mut code = vec![0xb0, 0xff, 0xe6, 0x21, 0xe6, 0xa1]; // mask both 8259s
    code.extend([0x0f, 0x01, 0x1c, 0x25]); // lidt [IDTR]
    code.extend((IDTR as u32).to_le_bytes());
    code.extend([0x48, 0xbb, 0x00, 0x00, 0xe0, 0xfe, 0, 0, 0, 0]); // mov rbx, 0xfee00000
    code.extend([0xc7, 0x83, 0xf0, 0x00, 0x00, 0x00, 0xff, 0x01, 0x00, 0x00]); // SVR = 0x1ff
    code.extend([0x48, 0xb9, 0x00, 0x00, 0xc0, 0xfe, 0, 0, 0, 0]); // mov rcx, 0xfec00000
                                                                   // Redirection entry of the routed input: the vector, fixed, level, active high, APIC 0.
    let entry = 0x10 + 2 * u32::from(ioapic_pin);
    code.extend([0xc7, 0x01]); // IOREGSEL = entry
    code.extend(entry.to_le_bytes());
    code.extend([0xc7, 0x41, 0x10]); // IOWIN = vector | level
    code.extend((VECTOR as u32 | 0x8000).to_le_bytes());
    code.extend([0xc7, 0x01]); // IOREGSEL = entry + 1
    code.extend((entry + 1).to_le_bytes());
    code.extend([0xc7, 0x41, 0x10, 0, 0, 0, 0]); // IOWIN = 0
    code.push(0xfb); // sti
    code.extend([0x66, 0xba, intx_port[0], intx_port[1]]); // mov dx, INTx register
    code.extend([0xb0, 0x01, OUT_DX_AL]); // assert INTx
    code.extend([0xf4, 0xeb, 0xfd]); // idle: hlt; jmp idle
    code.resize(0x100, 0x90);
    // Handler: report, lower the line at the device, EOI, stop.
    code.extend([0xb0, b'X']);
    code.extend(MOV_DX_COM1);
    code.push(OUT_DX_AL);
    code.extend([0x66, 0xba, intx_port[0], intx_port[1]]);
    code.extend([0xb0, 0x00, OUT_DX_AL]);
    code.extend([0x48, 0xb8, 0xb0, 0x00, 0xe0, 0xfe, 0, 0, 0, 0]); // mov rax, 0xfee000b0
    code.extend([0xc7, 0x00, 0x00, 0x00, 0x00, 0x00]); // EOI
    code.extend(CLI_HLT);

    let mut machine = long_mode_machine(hv.as_ref(), &code, 1);
    machine.attach_devices(&config).unwrap();
    let target = GUEST_BASE + 0x100;
    let mut gate = [0u8; 16];
    gate[0..2].copy_from_slice(&(target as u16).to_le_bytes());
    gate[2..4].copy_from_slice(&crate::boot::BOOT_CS.to_le_bytes());
    gate[5] = 0x8e;
    gate[6..8].copy_from_slice(&((target >> 16) as u16).to_le_bytes());
    machine.memory().write(IDT + VECTOR * 16, &gate).unwrap();
    let mut idtr = vec![0xffu8, 0x0f];
    idtr.extend(IDT.to_le_bytes());
    machine.memory().write(IDTR, &idtr).unwrap();
    let (com1, device) = recorder();
    machine.buses().pio.insert(0x3f8, 8, device).unwrap();
    let reason = run_to_end(&machine, false, Duration::from_secs(30));
    assert_eq!(reason, ExitReason::Halt);
    assert_eq!(
        bytes_written(&com1),
        b"X",
        "the handler of the vector ran once"
    );
    let devices = machine.devices().unwrap().lock().unwrap();
    let dummy = devices
        .pci()
        .unwrap()
        .function(PciAddress::new(0, 3, 0).unwrap())
        .unwrap()
        .clone();
    let line = dummy.lock().unwrap().config().intx().unwrap().clone();
    assert_eq!(line.state(), crate::devices::pci::irq::IntxState::Idle);
}

/// A PCI device model that does not implement snapshots.
#[cfg(feature = "bhyve_snapshot")]
struct Unsaveable;
#[cfg(feature = "bhyve_snapshot")]
impl crate::devices::pci::PciDevice for Unsaveable {}

#[cfg(feature = "bhyve_snapshot")]
#[test]
fn a_device_that_cannot_be_saved_fails_the_checkpoint_before_anything_is_written() {
    use crate::devices::pci::{ConfigSpace, PciAddress, PciRootBuilder};
    use crate::machine::checkpoint::{checkpoint, SaveTarget};

    let Some(hv) = hypervisor() else { return };
    const COUNTER: u64 = 0x30_0000;
    // inc qword [0x300000]; jmp back
    let code = [0x48, 0xff, 0x04, 0x25, 0x00, 0x00, 0x30, 0x00, 0xeb, 0xf6];
    let machine = long_mode_machine(hv.as_ref(), &code, 1);
    let mut builder = PciRootBuilder::new(1 << 32);
    let slot = PciAddress::new(0, 5, 0).unwrap();
    builder
        .add(slot, "nosave", ConfigSpace::new(true), Box::new(Unsaveable))
        .unwrap();
    let devices = Devices::with_pci_root(builder.build(machine.buses()).unwrap());
    machine.start(false, true).unwrap();

    let dir = std::env::temp_dir().join(format!("bhyve-rs-nosave-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dir_fd = std::fs::File::open(&dir).unwrap();
    let config = Config::new();
    let target = SaveTarget {
        config: &config,
        memory: machine.memory(),
        vm: machine.vm().as_ref(),
        vcpus: machine.vcpus(),
        devices: &devices,
    };
    let err = checkpoint(&target, &dir_fd, "vm.snap", false).unwrap_err();
    assert_eq!(err, "nosave@pci.0.5.0: this device cannot be saved");
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(left.is_empty(), "files written: {left:?}");

    // The guest was never stopped: it keeps counting.
    let before = machine.memory().read_u64(COUNTER).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while machine.memory().read_u64(COUNTER).unwrap() == before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(machine.memory().read_u64(COUNTER).unwrap() > before);
    machine.control().request_exit(ExitReason::PowerOff);
    assert_eq!(machine.wait(), ExitReason::PowerOff);
}

#[test]
fn string_port_io_reaches_the_device_one_access_at_a_time() {
    let Some(hv) = hypervisor() else { return };
    const INPUT: u32 = 0x30_0000;
    let mut code = vec![0x48, 0x8d, 0x35, 0, 0, 0, 0]; // lea rsi, [rip + text], patched below
    code.extend([0xb9, 0x03, 0x00, 0x00, 0x00]); // mov ecx, 3
    code.extend(MOV_DX_COM1);
    code.extend([0xf3, 0x6e]); // rep outsb
    code.push(0xbf); // mov edi, INPUT
    code.extend(INPUT.to_le_bytes());
    code.extend([0xb9, 0x03, 0x00, 0x00, 0x00]); // mov ecx, 3
    code.extend([0xf3, 0x6c]); // rep insb
    code.extend(CLI_HLT);
    let text_at = code.len();
    code.extend(b"abc");
    let lea_end = 7u32;
    code[3..7].copy_from_slice(&(text_at as u32 - lea_end).to_le_bytes());
    let machine = long_mode_machine(hv.as_ref(), &code, 1);
    let (com1, device) = recorder();
    machine.buses().pio.insert(0x3f8, 8, device).unwrap();
    assert_eq!(
        run_to_end(&machine, true, Duration::from_secs(30)),
        ExitReason::Halt
    );
    let writes = com1.lock().unwrap().writes.clone();
    assert_eq!(
        writes,
        vec![(0, b"a".to_vec()), (0, b"b".to_vec()), (0, b"c".to_vec())],
        "rep outsb: one single-byte write per element"
    );
    let mut input = [0u8; 4];
    machine.memory().read(u64::from(INPUT), &mut input).unwrap();
    assert_eq!(
        input,
        [0x42, 0x42, 0x42, 0],
        "rep insb: one read per element"
    );
}

/// wrmsr then rdmsr of an MSR nobody emulates (eax holds 'M' before the read), then 'Z'.
fn unknown_msr_guest() -> Vec<u8> {
    const UNKNOWN_MSR: [u8; 4] = [0x45, 0x23, 0x01, 0x00]; // 0x12345
    let mut code = vec![0xb9];
    code.extend(UNKNOWN_MSR); // mov ecx, 0x12345
    code.extend([0x31, 0xc0, 0x31, 0xd2, 0x0f, 0x30]); // xor eax, eax; xor edx, edx; wrmsr
    code.extend([0xb0, b'M', 0x0f, 0x32]); // mov al, 'M'; rdmsr
    code.extend(MOV_DX_COM1);
    code.push(OUT_DX_AL);
    code.extend([0xb0, b'Z', OUT_DX_AL]);
    code.extend(CLI_HLT);
    code
}

#[test]
fn an_unknown_msr_raises_gp_under_strictmsr() {
    let Some(hv) = hypervisor() else { return };
    let machine = long_mode_machine(hv.as_ref(), &unknown_msr_guest(), 1);
    let (com1, device) = recorder();
    machine.buses().pio.insert(0x3f8, 8, device).unwrap();
    machine.start(true, true).unwrap();
    // No IDT: the #GP becomes a triple fault before the guest writes anything.
    assert_eq!(machine.wait(), ExitReason::TripleFault);
    assert_eq!(bytes_written(&com1), b"");
}

#[test]
fn without_strictmsr_an_unknown_msr_reads_zero_and_takes_writes() {
    let Some(hv) = hypervisor() else { return };
    let machine = long_mode_machine(hv.as_ref(), &unknown_msr_guest(), 1);
    let (com1, device) = recorder();
    machine.buses().pio.insert(0x3f8, 8, device).unwrap();
    machine.start(true, false).unwrap();
    assert_eq!(machine.wait(), ExitReason::Halt);
    assert_eq!(bytes_written(&com1), [0, b'Z']);
}

#[test]
fn an_injected_exception_is_delivered_before_the_next_instruction() {
    let Some(hv) = hypervisor() else { return };
    let mut code = vec![0xb0, b'K'];
    code.extend(MOV_DX_COM1);
    code.push(OUT_DX_AL);
    code.extend(CLI_HLT);
    let machine = long_mode_machine(hv.as_ref(), &code, 1);
    let (com1, device) = recorder();
    machine.buses().pio.insert(0x3f8, 8, device).unwrap();
    machine
        .vcpus()
        .with_vcpu(0, |vcpu| vcpu.inject_exception(13, Some(0)))
        .unwrap()
        .unwrap();
    machine.start(true, true).unwrap();
    // The guest has no IDT, so the #GP is a triple fault before its first `out`.
    assert_eq!(machine.wait(), ExitReason::TripleFault);
    assert_eq!(bytes_written(&com1), b"");
}
