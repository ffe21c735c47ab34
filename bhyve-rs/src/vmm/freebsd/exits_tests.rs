//! Exit records built field by field from FreeBSD's `struct vm_exit` (as `vmm-sys` lays it
//! out, checked against the headers), fed to the exit logic with a simulated vCPU and bus.

use std::sync::Mutex;

use super::sim::SimVcpu;
use super::*;
use crate::vmm::x86emul::CpuState;

/// Ports and MSRs: reads answer from a table, writes are logged. Port 0x99 and MSR 0x99 are
/// refused (as with strictio); MSRs above 0x1000 are unknown (as with strictmsr).
#[derive(Default)]
pub(super) struct Devices {
    pub log: Mutex<Vec<String>>,
}

impl ExitHandler for Devices {
    fn port_read(&self, port: u16, data: &mut [u8]) -> Result<(), AccessFault> {
        if port == 0x99 {
            return Err(AccessFault(format!("Unhandled in {port:#06x}")));
        }
        for (i, d) in data.iter_mut().enumerate() {
            *d = 0xa0 + i as u8;
        }
        self.log
            .lock()
            .unwrap()
            .push(format!("in {port:#x} {data:02x?}"));
        Ok(())
    }
    fn port_write(&self, port: u16, data: &[u8]) -> Result<(), AccessFault> {
        if port == 0x99 {
            return Err(AccessFault(format!("Unhandled out {port:#06x}")));
        }
        self.log
            .lock()
            .unwrap()
            .push(format!("out {port:#x} {data:02x?}"));
        Ok(())
    }
    fn mmio_read(&self, gpa: u64, _: &mut [u8]) -> Result<(), AccessFault> {
        Err(AccessFault(format!("mmio {gpa:#x}")))
    }
    fn mmio_write(&self, gpa: u64, _: &[u8]) -> Result<(), AccessFault> {
        Err(AccessFault(format!("mmio {gpa:#x}")))
    }
    fn msr_read(&self, vcpu: u32, index: u32) -> Result<Option<u64>, AccessFault> {
        self.log
            .lock()
            .unwrap()
            .push(format!("rdmsr {vcpu} {index:#x}"));
        Ok((index < 0x1000).then_some(0x1122_3344_5566_7788))
    }
    fn msr_write(&self, vcpu: u32, index: u32, value: u64) -> Result<bool, AccessFault> {
        self.log
            .lock()
            .unwrap()
            .push(format!("wrmsr {vcpu} {index:#x} {value:#x}"));
        Ok(index < 0x1000)
    }
}

/// Flat guest RAM from 0; nothing else.
pub(super) struct Ram(pub Vec<u8>);

impl GuestBus for Ram {
    fn mmio_read(&mut self, gpa: u64, _: &mut [u8]) -> Result<(), AccessFault> {
        Err(AccessFault(format!("mmio {gpa:#x}")))
    }
    fn mmio_write(&mut self, gpa: u64, _: &[u8]) -> Result<(), AccessFault> {
        Err(AccessFault(format!("mmio {gpa:#x}")))
    }
    fn ram_read(&mut self, gpa: u64, data: &mut [u8]) -> bool {
        crate::vmm::x86emul::test_ram::read(&self.0, gpa, data)
    }
    fn ram_write(&mut self, gpa: u64, data: &[u8]) -> bool {
        crate::vmm::x86emul::test_ram::write(&mut self.0, gpa, data)
    }
}

fn record(exitcode: vm_exitcode, inst_length: i32) -> vm_exit {
    vm_exit {
        exitcode,
        inst_length,
        rip: 0x1000,
        ..Default::default()
    }
}

fn run(exit: &vm_exit, vcpu: &mut SimVcpu, devices: &Devices) -> ExitAction {
    let mut ram = Ram(vec![0; 0x10000]);
    handle_exit(exit, vcpu, &mut ram, devices)
}

#[test]
fn suspended_exits_give_bhyves_reasons() {
    let devices = Devices::default();
    for (how, reason) in [
        (VM_SUSPEND_RESET, SuspendReason::Reset),
        (VM_SUSPEND_POWEROFF, SuspendReason::PowerOff),
        (VM_SUSPEND_HALT, SuspendReason::Halt),
        (VM_SUSPEND_TRIPLEFAULT, SuspendReason::TripleFault),
    ] {
        let mut exit = record(VM_EXITCODE_SUSPENDED, 0);
        exit.u.suspended = vm_exit_suspended { how };
        let mut vcpu = SimVcpu::default();
        assert_eq!(
            run(&exit, &mut vcpu, &devices),
            ExitAction::Exit(VmExit::Suspended(reason))
        );
    }
    let mut exit = record(VM_EXITCODE_SUSPENDED, 0);
    exit.u.suspended = vm_exit_suspended {
        how: VM_SUSPEND_DESTROY,
    };
    assert_eq!(
        run(&exit, &mut SimVcpu::default(), &devices),
        ExitAction::Exit(VmExit::Failed("vmexit_suspend: invalid reason 5".into()))
    );
}

#[test]
fn spinup_ap_asks_user_space_to_start_the_ap() {
    let mut exit = record(VM_EXITCODE_SPINUP_AP, 0);
    exit.u.spinup_ap = vm_exit_spinup_ap {
        vcpu: 3,
        rip: 0x9f000,
    };
    assert_eq!(
        run(&exit, &mut SimVcpu::default(), &Devices::default()),
        ExitAction::Exit(VmExit::StartAp {
            vcpu: 3,
            rip: 0x9f000
        })
    );
    exit.u.spinup_ap.vcpu = -1;
    assert!(matches!(
        run(&exit, &mut SimVcpu::default(), &Devices::default()),
        ExitAction::Exit(VmExit::Failed(_))
    ));
}

#[test]
fn rdmsr_sets_edx_eax_or_raises_gp_at_the_instruction() {
    let devices = Devices::default();
    let mut exit = record(VM_EXITCODE_RDMSR, 2);
    exit.u.msr = vm_exit_msr {
        code: 0x3a,
        wval: 0,
    };
    let mut vcpu = SimVcpu {
        id: 1,
        ..Default::default()
    };
    vcpu.state.regs.rax = u64::MAX;
    vcpu.state.regs.rdx = u64::MAX;
    assert_eq!(run(&exit, &mut vcpu, &devices), ExitAction::Continue);
    assert_eq!(
        (vcpu.state.regs.rax, vcpu.state.regs.rdx),
        (0x5566_7788, 0x1122_3344)
    );
    assert_eq!(vcpu.resume_rip(&exit), 0x1002);

    exit.u.msr.code = 0x4000_0000;
    let mut vcpu = SimVcpu::default();
    assert_eq!(run(&exit, &mut vcpu, &devices), ExitAction::Continue);
    assert_eq!(vcpu.injected, vec![Exception::gp()]);
    assert_eq!(vcpu.state.regs.rax, 0, "a refused RDMSR leaves EAX alone");
    assert_eq!(vcpu.resume_rip(&exit), 0x1000, "#GP at the RDMSR");
    assert_eq!(
        *devices.log.lock().unwrap(),
        ["rdmsr 1 0x3a", "rdmsr 0 0x40000000"]
    );
}

#[test]
fn wrmsr_passes_the_value_and_a_refusal_raises_gp() {
    let devices = Devices::default();
    let mut exit = record(VM_EXITCODE_WRMSR, 2);
    exit.u.msr = vm_exit_msr {
        code: 0x10,
        wval: 0xdead_beef_0000_0001,
    };
    let mut vcpu = SimVcpu::default();
    assert_eq!(run(&exit, &mut vcpu, &devices), ExitAction::Continue);
    assert!(vcpu.injected.is_empty());
    assert_eq!(vcpu.resume_rip(&exit), 0x1002);
    exit.u.msr.code = 0x2000;
    let mut vcpu = SimVcpu::default();
    run(&exit, &mut vcpu, &devices);
    assert_eq!(vcpu.injected, vec![Exception::gp()]);
    assert_eq!(
        *devices.log.lock().unwrap(),
        [
            "wrmsr 0 0x10 0xdeadbeef00000001",
            "wrmsr 0 0x2000 0xdeadbeef00000001"
        ]
    );
}

#[test]
fn breakpoint_goes_back_to_the_guest_after_the_instruction() {
    let mut exit = record(VM_EXITCODE_BPT, 1);
    exit.u.bpt = vm_exit_bpt { inst_length: 1 };
    let mut vcpu = SimVcpu::default();
    assert_eq!(
        run(&exit, &mut vcpu, &Devices::default()),
        ExitAction::Continue
    );
    assert_eq!(vcpu.breakpoints, vec![1]);
}

#[test]
fn vmx_and_svm_errors_stop_the_vm_with_bhyves_fields() {
    let mut exit = record(VM_EXITCODE_VMX, 0);
    exit.u.vmx = vm_exit_vmx {
        status: 0,
        exit_reason: 0x8000_0021,
        exit_qualification: 0,
        inst_type: 0,
        inst_error: 0,
    };
    let ExitAction::Exit(VmExit::Failed(text)) =
        run(&exit, &mut SimVcpu::default(), &Devices::default())
    else {
        panic!("a VMX exit must stop the VM");
    };
    assert_eq!(
        text,
        "VMX exit at rip 0x0000000000001000: inst_length 0, status 0, exit_reason 2147483681 \
         (VM-entry failure due to invalid guest state), qualification 0x0000000000000000, \
         inst_type 0, inst_error 0"
    );
    let mut exit = record(VM_EXITCODE_SVM, 0);
    exit.u.svm = vm_exit_svm {
        exitcode: 0x400,
        exitinfo1: 0x1,
        exitinfo2: 0xfee0_0000,
    };
    assert_eq!(
        run(&exit, &mut SimVcpu::default(), &Devices::default()),
        ExitAction::Exit(VmExit::Failed(
            "SVM exit at rip 0x0000000000001000: inst_length 0, exitcode 0x400, exitinfo1 0x1, \
             exitinfo2 0xfee00000"
                .into()
        ))
    );
}

#[test]
fn lifecycle_exits_map_to_the_seam() {
    let devices = Devices::default();
    let cases = [
        (VM_EXITCODE_HLT, ExitAction::Exit(VmExit::Halted)),
        (VM_EXITCODE_DEBUG, ExitAction::Exit(VmExit::Interrupted)),
        (VM_EXITCODE_BOGUS, ExitAction::Continue),
        (VM_EXITCODE_REQIDLE, ExitAction::Continue),
        (VM_EXITCODE_RENDEZVOUS, ExitAction::Continue),
        (VM_EXITCODE_PAUSE, ExitAction::Continue),
        (VM_EXITCODE_IOAPIC_EOI, ExitAction::Continue),
        (VM_EXITCODE_MTRAP, ExitAction::Continue),
    ];
    for (code, action) in cases {
        let mut vcpu = SimVcpu::default();
        assert_eq!(run(&record(code, 0), &mut vcpu, &devices), action, "{code}");
        assert!(vcpu.injected.is_empty() && !vcpu.restarted);
    }
    let mut vcpu = SimVcpu::default();
    assert_eq!(
        run(&record(VM_EXITCODE_MWAIT, 3), &mut vcpu, &devices),
        ExitAction::Continue
    );
    assert_eq!(vcpu.injected[0].vector, 6, "#UD");
    assert!(matches!(
        run(&record(VM_EXITCODE_TASK_SWITCH, 0), &mut vcpu, &devices),
        ExitAction::Exit(VmExit::Failed(_))
    ));
    assert_eq!(
        run(&record(77, 0), &mut vcpu, &devices),
        ExitAction::Exit(VmExit::Failed(
            "unexpected exit code 77 at rip 0x1000".into()
        ))
    );
}

fn inout(port: u16, bytes: u16, input: bool, eax: u32) -> vm_exit {
    let mut exit = record(VM_EXITCODE_INOUT, 1);
    let mut io = vm_inout {
        port,
        eax,
        ..Default::default()
    };
    io.set_bytes(bytes);
    io.set_in(u16::from(input));
    exit.u.inout = io;
    exit
}

#[test]
fn port_io_merges_in_data_as_the_processor_does() {
    let devices = Devices::default();
    let mut vcpu = SimVcpu::default();
    vcpu.state.regs.rax = 0x1234_5678_9abc_def0;
    run(&inout(0x60, 1, true, 0x9abc_def0), &mut vcpu, &devices);
    assert_eq!(vcpu.state.regs.rax, 0x1234_5678_9abc_dea0);
    run(&inout(0x60, 2, true, 0x9abc_dea0), &mut vcpu, &devices);
    assert_eq!(vcpu.state.regs.rax, 0x1234_5678_9abc_a1a0);
    run(&inout(0x60, 4, true, 0x9abc_a1a0), &mut vcpu, &devices);
    assert_eq!(vcpu.state.regs.rax, 0xa3a2_a1a0, "32-bit IN zero-extends");
    run(&inout(0x3f8, 2, false, 0x4142_4344), &mut vcpu, &devices);
    assert_eq!(vcpu.resume_rip(&inout(0x3f8, 2, false, 0)), 0x1001);
    assert_eq!(
        *devices.log.lock().unwrap(),
        [
            "in 0x60 [a0]",
            "in 0x60 [a0, a1]",
            "in 0x60 [a0, a1, a2, a3]",
            "out 0x3f8 [44, 43]"
        ]
    );
    assert_eq!(
        run(&inout(0x99, 1, false, 0), &mut vcpu, &devices),
        ExitAction::Exit(VmExit::AccessFault("Unhandled out 0x0099".into()))
    );
}

fn flat_data() -> seg_desc {
    seg_desc {
        base: 0,
        limit: 0xffff_ffff,
        access: 0xc093,
    }
}

/// `rep outsb` of `count` bytes from DS:RSI in 64-bit mode without paging tricks.
fn rep_outs(count: u64, rsi: u64) -> vm_exit {
    let mut exit = record(VM_EXITCODE_INOUT_STR, 2);
    let mut io = vm_inout {
        port: 0x3f8,
        ..Default::default()
    };
    io.set_bytes(1);
    io.set_string(1);
    io.set_rep(1);
    exit.u.inout_str = vm_inout_str {
        inout: io,
        paging: vm_guest_paging {
            cr3: 0,
            cpl: 0,
            cpu_mode: CPU_MODE_64BIT,
            paging_mode: PAGING_MODE_FLAT,
        },
        rflags: 0x2,
        cr0: 0x1,
        index: rsi,
        count,
        addrsize: 8,
        seg_name: VM_REG_GUEST_DS,
        seg_desc: flat_data(),
        cs_d: 0,
        cs_base: 0,
    };
    exit
}

#[test]
fn rep_outs_runs_sixteen_elements_per_exit_then_restarts() {
    let devices = Devices::default();
    let mut ram = Ram((0..=255u8).cycle().take(0x10000).collect());
    let mut vcpu = SimVcpu::new(CpuState::default());
    vcpu.state.regs.rsi = 0x100;
    vcpu.state.regs.rcx = 20;
    let exit = rep_outs(20, 0x100);
    assert_eq!(
        handle_exit(&exit, &mut vcpu, &mut ram, &devices),
        ExitAction::Continue
    );
    assert_eq!(vcpu.state.regs.rsi, 0x110);
    assert_eq!(vcpu.state.regs.rcx, 4);
    assert!(
        vcpu.restarted,
        "elements remain: the instruction runs again"
    );
    let mut vcpu2 = SimVcpu::new(vcpu.state);
    let exit = rep_outs(4, 0x110);
    handle_exit(&exit, &mut vcpu2, &mut ram, &devices);
    assert_eq!((vcpu2.state.regs.rsi, vcpu2.state.regs.rcx), (0x114, 0));
    assert!(!vcpu2.restarted);
    assert_eq!(vcpu2.resume_rip(&exit), 0x1002);
    let log = devices.log.lock().unwrap();
    let expected: Vec<String> = (0..20).map(|i| format!("out 0x3f8 [{:02x}]", i)).collect();
    assert_eq!(*log, expected);
}

#[test]
fn string_io_outside_its_segment_raises_gp() {
    let devices = Devices::default();
    let mut ram = Ram(vec![0; 0x10000]);
    let mut exit = rep_outs(1, 0x10);
    // SAFETY: the record was built as INOUT_STR.
    let vis = unsafe { &mut exit.u.inout_str };
    vis.paging.cpu_mode = CPU_MODE_PROTECTED;
    vis.addrsize = 4;
    vis.seg_desc.limit = 0xf;
    let mut vcpu = SimVcpu::default();
    handle_exit(&exit, &mut vcpu, &mut ram, &devices);
    assert_eq!(vcpu.injected, vec![Exception::gp()]);
    assert_eq!(vcpu.resume_rip(&exit), 0x1000);
    assert!(devices.log.lock().unwrap().is_empty());
}

#[test]
fn records_from_older_kernels_read_as_the_current_layout() {
    let mut old = vm_exit_14 {
        exitcode: VM_EXITCODE_INOUT_STR,
        inst_length: 2,
        rip: 0x1234,
        ..Default::default()
    };
    old.u.inout_str = vm_inout_str_14 {
        index: 0x55,
        count: 3,
        addrsize: 4,
        seg_name: VM_REG_GUEST_ES,
        seg_desc: flat_data(),
        ..Default::default()
    };
    let exit = exit_from_14(&old);
    // SAFETY: converted as INOUT_STR.
    let vis = unsafe { exit.u.inout_str };
    assert_eq!((exit.rip, exit.inst_length), (0x1234, 2));
    assert_eq!((vis.index, vis.count, vis.addrsize), (0x55, 3, 4));
    assert_eq!((vis.seg_name, vis.seg_desc), (VM_REG_GUEST_ES, flat_data()));
    assert_eq!((vis.cs_d, vis.cs_base), (0, 0));

    let mut old = vm_exit_13 {
        exitcode: VM_EXITCODE_INST_EMUL,
        rip: 0x42,
        ..Default::default()
    };
    let mut ie = vm_exit_inst_emul {
        gpa: 0xfee0_0030,
        ..Default::default()
    };
    ie.vie.num_valid = 2;
    ie.vie.inst[..2].copy_from_slice(&[0x89, 0x03]);
    old.u.inst_emul = ie;
    let exit = exit_from_13(&old);
    // SAFETY: converted as INST_EMUL.
    let ie = unsafe { exit.u.inst_emul };
    assert_eq!(ie.gpa, 0xfee0_0030);
    assert_eq!(&ie.vie.inst[..2], &[0x89, 0x03]);
}

/// RAM from 0 with a recorded MMIO window at 0xfee0_0000.
struct RamAndMmio {
    ram: Ram,
    mmio: Vec<(u64, Vec<u8>)>,
}

impl GuestBus for RamAndMmio {
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) -> Result<(), AccessFault> {
        data.fill(0x5a);
        self.mmio.push((gpa, data.to_vec()));
        Ok(())
    }
    fn mmio_write(&mut self, gpa: u64, data: &[u8]) -> Result<(), AccessFault> {
        self.mmio.push((gpa, data.to_vec()));
        Ok(())
    }
    fn ram_read(&mut self, gpa: u64, data: &mut [u8]) -> bool {
        self.ram.ram_read(gpa, data)
    }
    fn ram_write(&mut self, gpa: u64, data: &[u8]) -> bool {
        self.ram.ram_write(gpa, data)
    }
}

/// A 64-bit vCPU whose page tables (at 0x1000) map linear 0x4000_0000 onto guest-physical
/// 0x20_0000 with a 2 MiB page, and `code` there; nothing else is mapped.
fn long_mode_with_code(code: &[u8]) -> (SimVcpu, RamAndMmio) {
    let mut ram = vec![0u8; 4 << 20];
    let mut put = |at: usize, v: u64| ram[at..at + 8].copy_from_slice(&v.to_le_bytes());
    put(0x1000, 0x2000 | 3); // PML4[0]
    put(0x2000 + 8, 0x3000 | 3); // PDPT[1]: 1 GiB
    put(0x3000, 0x20_0000 | 0x83); // PD[0]: 2 MiB page at 2 MiB
    ram[0x20_0000..0x20_0000 + code.len()].copy_from_slice(code);
    let mut state = CpuState::default();
    state.sregs.cr0 = 0x8000_0011;
    state.sregs.cr3 = 0x1000;
    state.sregs.cr4 = 0x20;
    state.sregs.efer = 0x500;
    state.sregs.cs = Segment {
        type_: 0xb,
        present: true,
        s: true,
        l: true,
        ..Default::default()
    };
    state.sregs.ds = Segment {
        type_: 0x3,
        present: true,
        s: true,
        ..Default::default()
    };
    state.regs.rip = 0x4000_0000;
    state.regs.rax = 0x1122_3344;
    state.regs.rbx = 0xfee0_0030;
    (
        SimVcpu::new(state),
        RamAndMmio {
            ram: Ram(ram),
            mmio: Vec::new(),
        },
    )
}

#[test]
fn paging_exit_fetches_the_instruction_through_the_guest_page_tables() {
    // mov [rbx], eax
    let (mut vcpu, mut bus) = long_mode_with_code(&[0x89, 0x03]);
    let mut exit = record(VM_EXITCODE_PAGING, 0);
    exit.rip = 0x4000_0000;
    exit.u.paging = vm_exit_paging {
        gpa: 0xfee0_0030,
        fault_type: 2,
    };
    let devices = Devices::default();
    assert_eq!(
        handle_exit(&exit, &mut vcpu, &mut bus, &devices),
        ExitAction::Continue
    );
    assert_eq!(bus.mmio, vec![(0xfee0_0030, vec![0x44, 0x33, 0x22, 0x11])]);
    assert_eq!(vcpu.resume_rip(&exit), 0x4000_0002);

    // RIP on an unmapped page: the guest takes the page fault for the fetch.
    let (mut vcpu, mut bus) = long_mode_with_code(&[0x89, 0x03]);
    exit.rip = 0x8000_0000;
    assert_eq!(
        handle_exit(&exit, &mut vcpu, &mut bus, &devices),
        ExitAction::Continue
    );
    assert_eq!(vcpu.injected.len(), 1);
    assert_eq!(vcpu.injected[0].vector, Exception::PF);
    assert_eq!(vcpu.injected[0].cr2, Some(0x8000_0000));
    assert_eq!(vcpu.resume_rip(&exit), 0x8000_0000);
    assert!(bus.mmio.is_empty());
}

#[test]
fn inst_emul_without_instruction_bytes_fetches_them_and_a_bad_instruction_stops_the_vm() {
    // mov eax, [rbx]
    let (mut vcpu, mut bus) = long_mode_with_code(&[0x8b, 0x03]);
    let mut exit = record(VM_EXITCODE_INST_EMUL, 2);
    exit.rip = 0x4000_0000;
    exit.u.inst_emul = vm_exit_inst_emul {
        gpa: 0xfee0_0030,
        gla: 0xfee0_0030,
        paging: vm_guest_paging {
            cr3: 0x1000,
            cpl: 0,
            cpu_mode: CPU_MODE_64BIT,
            paging_mode: PAGING_MODE_64,
        },
        ..Default::default()
    };
    let devices = Devices::default();
    assert_eq!(
        handle_exit(&exit, &mut vcpu, &mut bus, &devices),
        ExitAction::Continue
    );
    assert_eq!(vcpu.state.regs.rax, 0x5a5a_5a5a);
    assert_eq!(bus.mmio, vec![(0xfee0_0030, vec![0x5a; 4])]);
    assert_eq!(vcpu.resume_rip(&exit), 0x4000_0002);

    // syscall is no MMIO instruction: the VM stops, naming the bytes as bhyve does.
    let (mut vcpu, mut bus) = long_mode_with_code(&[]);
    // SAFETY: the record was built as INST_EMUL.
    let ie = unsafe { &mut exit.u.inst_emul };
    ie.vie.inst[..2].copy_from_slice(&[0x0f, 0x05]);
    ie.vie.num_valid = 2;
    let ExitAction::Exit(VmExit::Failed(text)) = handle_exit(&exit, &mut vcpu, &mut bus, &devices)
    else {
        panic!("an instruction the emulator lacks must stop the VM");
    };
    assert!(
        text.starts_with("Failed to emulate instruction sequence [ 0f05 ] at 0x40000000"),
        "{text}"
    );
}
