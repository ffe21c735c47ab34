use super::*;
use crate::vcpu::{ExitReason, VmControl};
use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use uart::LEGACY_PORTS;

/// Records every IRQ line change.
#[derive(Default)]
struct FakeSink {
    lines: Mutex<Vec<(u32, bool)>>,
    /// ISA IRQs made level triggered.
    level_triggered: Mutex<Vec<u8>>,
}

impl InterruptSink for FakeSink {
    fn set_irq_line(&self, gsi: u32, high: bool) -> std::io::Result<()> {
        self.lines.lock().unwrap().push((gsi, high));
        Ok(())
    }
    fn signal_msi(&self, _address: u64, _data: u32) -> std::io::Result<()> {
        Ok(())
    }
    fn set_isa_irq_trigger(&self, irq: u8, level: bool) -> std::io::Result<()> {
        let mut levels = self.level_triggered.lock().unwrap();
        levels.retain(|&i| i != irq);
        if level {
            levels.push(irq);
        }
        Ok(())
    }
}

/// MSIs and line changes as the machine would deliver them, for device tests.
#[derive(Default)]
pub(crate) struct Recorder {
    pub(crate) msis: Mutex<Vec<(u64, u32)>>,
    pub(crate) lines: Mutex<Vec<(u32, bool)>>,
}

impl InterruptSink for Recorder {
    fn set_irq_line(&self, gsi: u32, high: bool) -> std::io::Result<()> {
        self.lines.lock().unwrap().push((gsi, high));
        Ok(())
    }
    fn signal_msi(&self, address: u64, data: u32) -> std::io::Result<()> {
        self.msis.lock().unwrap().push((address, data));
        Ok(())
    }
    fn set_isa_irq_trigger(&self, _irq: u8, _level: bool) -> std::io::Result<()> {
        Ok(())
    }
}

/// A read-write disk at `path` with every block option off.
pub(crate) fn block_options(path: &std::path::Path) -> block::BlockOptions {
    block::BlockOptions {
        path: path.to_string_lossy().into_owned(),
        readonly: false,
        nocache: false,
        sync: false,
        nodelete: false,
        sector_size: None,
    }
}

/// A directory under the system's temporary directory, removed when dropped.
pub(crate) struct TempDir(pub(crate) std::path::PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("bhyve-dev-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pci_read32(buses: &Buses, slot: u8, offset: u8) -> u32 {
    let address = 0x8000_0000u32 | (u32::from(slot) << 11) | u32::from(offset);
    assert!(buses.pio.write(0xcf8, &address.to_le_bytes()));
    let mut data = [0u8; 4];
    assert!(buses.pio.read(0xcfc, &mut data));
    u32::from_le_bytes(data)
}

#[test]
fn attach_builds_hostbridge_lpc_and_com_ports() {
    let dir = TempDir::new("attach");
    let log = dir.0.join("com1.log");
    std::fs::write(&log, b"").unwrap();
    let cfg = Config::from_pairs(&[
        ("pci.0.0.0.device", "hostbridge"),
        ("pci.0.31.0.device", "lpc"),
        ("lpc.com1.path", log.to_str().unwrap()),
    ]);
    let buses = Arc::new(Buses::default());
    let sink = Arc::new(FakeSink::default());
    let devices = attach_for_test(&cfg, &buses, sink.clone()).unwrap();

    assert_eq!(pci_read32(&buses, 0, 0), 0x1275_1275);
    assert_eq!(pci_read32(&buses, 31, 0), 0x7000_8086);
    assert_eq!(pci_read32(&buses, 2, 0), 0xffff_ffff);

    let names: Vec<String> = devices.instances().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "hostbridge@pci.0.0.0",
            "lpc@pci.0.31.0",
            "com1",
            "com2",
            "com3",
            "com4",
            "rtc",
            "hpet",
            "pm"
        ]
    );

    for b in b"boot\r\n" {
        assert!(buses.pio.write(0x3f8, &[*b]));
    }
    assert_eq!(std::fs::read(&log).unwrap(), b"boot\r\n");

    // Every COM port answers at its legacy address; the scratch register proves which is which.
    for (i, base) in [0x3f8u64, 0x2f8, 0x3e8, 0x2e8].into_iter().enumerate() {
        assert!(buses.pio.write(base + 7, &[i as u8 + 1]));
    }
    for (name, _, _) in LEGACY_PORTS.iter() {
        assert!(devices.uart(name).is_some());
    }
    let mut scr = [0u8];
    assert!(buses.pio.read(0x3e8 + 7, &mut scr));
    assert_eq!(scr, [3]);

    // Enabling the THRE interrupt on com2 pulses IRQ 3.
    assert!(buses.pio.write(0x2f9, &[0x02]));
    assert_eq!(
        sink.lines.lock().unwrap().as_slice(),
        &[(3, true), (3, false)]
    );
}

#[test]
fn input_from_a_fifo_raises_the_com_irq_and_reaches_the_guest() {
    let dir = TempDir::new("fifo");
    let fifo = dir.0.join("com2.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let cfg = Config::from_pairs(&[
        ("pci.0.31.0.device", "lpc"),
        ("lpc.com2.path", fifo.to_str().unwrap()),
    ]);
    let buses = Arc::new(Buses::default());
    let sink = Arc::new(FakeSink::default());
    let _devices = attach_for_test(&cfg, &buses, sink.clone()).unwrap();
    assert!(buses.pio.write(0x2f9, &[uart::IER_ERXRDY]));

    let mut writer = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    writer.write_all(b"k").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sink.lines.lock().unwrap().contains(&(3, true)) {
        assert!(Instant::now() < deadline, "no interrupt for received data");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut byte = [0u8];
    assert!(buses.pio.read(0x2fa, &mut byte));
    assert_eq!(byte[0], uart::IIR_RXTOUT);
    assert!(buses.pio.read(0x2f8, &mut byte));
    assert_eq!(byte, *b"k");
}

#[test]
fn without_lpc_there_are_no_com_ports() {
    let cfg = Config::from_pairs(&[
        ("pci.0.0.0.device", "hostbridge"),
        ("lpc.com1.path", "stdio"),
    ]);
    let buses = Arc::new(Buses::default());
    let devices = attach_for_test(&cfg, &buses, Arc::new(FakeSink::default())).unwrap();
    let mut byte = [0u8];
    assert!(!buses.pio.read(0x3fd, &mut byte));
    assert!(devices.uart("com1").is_none());
}

#[test]
fn the_sci_is_made_level_triggered_as_bhyve_does() {
    let buses = Arc::new(Buses::default());
    let sink = Arc::new(FakeSink::default());
    let _devices = attach_for_test(&Config::new(), &buses, sink.clone()).unwrap();
    assert_eq!(
        *sink.level_triggered.lock().unwrap(),
        vec![pm::SCI_INT as u8]
    );
}

#[test]
fn an_empty_configuration_creates_nothing() {
    let buses = Arc::new(Buses::default());
    let devices = attach_for_test(&Config::new(), &buses, Arc::new(FakeSink::default())).unwrap();
    // Only the devices every VM has.
    let names: Vec<String> = devices.instances().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["rtc", "hpet", "pm"]);
    let mut data = [0u8; 4];
    assert!(!buses.pio.read(0xcf8, &mut data));
}

#[test]
fn hostbridge_takes_vendor_and_devid_from_its_node() {
    let cfg = Config::from_pairs(&[
        ("pci.0.0.0.device", "hostbridge"),
        ("pci.0.0.0.vendor", "0x1022"),
        ("pci.0.0.0.devid", "0x7432"),
    ]);
    let buses = Arc::new(Buses::default());
    let _devices = attach_for_test(&cfg, &buses, Arc::new(FakeSink::default())).unwrap();
    assert_eq!(pci_read32(&buses, 0, 0), 0x7432_1022);
}

#[test]
fn lpc_identity_can_be_overridden_with_pcireg() {
    let cfg = Config::from_pairs(&[
        ("pci.0.31.0.device", "lpc"),
        ("pci.0.31.0.pcireg.vendor", "1af4"),
        ("pci.0.31.0.pcireg.revid", "0x03"),
    ]);
    let buses = Arc::new(Buses::default());
    let _devices = attach_for_test(&cfg, &buses, Arc::new(FakeSink::default())).unwrap();
    assert_eq!(pci_read32(&buses, 31, 0), 0x7000_1af4);
    assert_eq!(pci_read32(&buses, 31, 8) & 0xff, 0x03);
}

fn check_error(pairs: &[(&str, &str)]) -> String {
    let cfg = Config::from_pairs(pairs);
    let err = check_supported(&cfg, &crate::vmm::PlatformCaps::KVM)
        .unwrap_err()
        .to_string();
    // attach refuses the same configuration with the same message.
    let buses = Arc::new(Buses::default());
    let attach_err = attach_for_test(&cfg, &buses, Arc::new(FakeSink::default()))
        .err()
        .unwrap()
        .to_string();
    assert_eq!(err, attach_err);
    err
}

#[test]
fn unsupported_emulation_is_named_with_its_slot() {
    let err = check_error(&[
        ("pci.0.0.0.device", "hostbridge"),
        ("pci.0.2.0.device", "xhci"),
        ("pci.0.2.0.slot.1.device", "tablet"),
    ]);
    assert_eq!(
        err,
        "pci slot 0:2:0: device emulation \"xhci\" is not supported yet"
    );
}

#[test]
fn every_emulation_not_implemented_yet_is_named_one_per_line() {
    let err = check_error(&[
        ("pci.0.0.0.device", "hostbridge"),
        ("pci.0.2.0.device", "xhci"),
        ("pci.0.3.0.device", "hda"),
        // An implemented device whose file is missing does not hide the others.
        ("pci.0.4.0.device", "virtio-blk"),
        ("pci.0.4.0.path", "/nonexistent/disk.img"),
        ("pci.0.31.0.device", "lpc"),
        ("pci.1.0.0.device", "xhci"),
    ]);
    assert_eq!(
        err,
        "pci slot 0:2:0: device emulation \"xhci\" is not supported yet\n\
         pci slot 0:3:0: device emulation \"hda\" is not supported yet\n\
         pci slot 1:0:0: device emulation \"xhci\" is not supported yet"
    );
    // A legacy name of an emulation not implemented is pointed at its new name first.
    assert_eq!(
        check_error(&[("pci.0.4.0.device", "ahci-hd")]),
        "pci slot 0:4:0: legacy device \"ahci-hd\", use \"ahci\" instead"
    );
}

#[test]
fn configuration_mistakes_get_bhyve_style_messages() {
    assert_eq!(
        check_error(&[("pci.0.3.0.device", "frobnicator")]),
        "pci slot 0:3:0: unknown device \"frobnicator\""
    );
    assert_eq!(
        check_error(&[("pci.0.3.0.path", "/x")]),
        "pci slot 0:3:0: missing \"device\" value"
    );
    assert_eq!(
        check_error(&[("pci.0.0.0.device", "amd_hostbridge")]),
        "pci slot 0:0:0: legacy device \"amd_hostbridge\", use \"hostbridge\" instead"
    );
    assert_eq!(
        check_error(&[("pci.0.30.0.device", "lpc"), ("pci.0.31.0.device", "lpc")]),
        "pci slot 0:31:0: only one LPC bridge is allowed"
    );
    assert_eq!(
        check_error(&[("pci.1.31.0.device", "lpc")]),
        "pci slot 1:31:0: the LPC bridge can be present only on bus 0"
    );
    assert_eq!(
        check_error(&[("pci.0.32.0.device", "hostbridge")]),
        "invalid PCI slot \"pci.0.32.0\""
    );
    assert_eq!(
        check_error(&[
            ("pci.0.0.0.device", "hostbridge"),
            ("pci.0.0.0.vendor", "AMD")
        ]),
        "invalid value \"AMD\" for \"pci.0.0.0.vendor\""
    );
    assert_eq!(
        check_error(&[
            ("pci.0.31.0.device", "lpc"),
            ("lpc.com1.path", "tcp=localhost:4444")
        ]),
        "unable to initialize backend \"tcp=localhost:4444\" for LPC device com1: \
         Invalid address localhost:4444"
    );
    assert_eq!(
        check_error(&[
            ("pci.0.31.0.device", "lpc"),
            ("lpc.com1.path", "stdio"),
            ("lpc.com2.path", "stdio")
        ]),
        "unable to initialize backend \"stdio\" for LPC device com2: \
         stdio is already used by another device"
    );
}

#[test]
fn check_supported_accepts_what_attach_builds() {
    let cfg = Config::from_pairs(&[
        ("pci.0.0.0.device", "hostbridge"),
        ("pci.0.31.0.device", "lpc"),
        ("pci.enable_bars", "true"),
        ("lpc.com1.path", "/nonexistent/tty"),
        ("memory.size", "4G"),
    ]);
    // Only emulations are checked: a backend path is opened by attach, not here.
    check_supported(&cfg, &crate::vmm::PlatformCaps::KVM).unwrap();
    let err = attach_for_test(
        &cfg,
        &Arc::new(Buses::default()),
        Arc::new(FakeSink::default()),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.starts_with("unable to initialize backend \"/nonexistent/tty\" for LPC device com1: "),
        "{err}"
    );
}

#[test]
fn pc_testdev_exits_drives_irq_lines_and_keeps_scratch_data() {
    let cfg = Config::from_pairs(&[("pci.0.31.0.device", "lpc"), ("lpc.pc-testdev", "true")]);
    let buses = Arc::new(Buses::default());
    let sink = Arc::new(FakeSink::default());
    let control = VmControl::new();
    let _devices = attach_with_control(&cfg, &buses, sink.clone(), control.clone()).unwrap();

    assert!(buses.pio.write(0xe1, &[0xab, 0xcd]));
    let mut dword = [0u8; 4];
    assert!(buses.pio.read(0xe0, &mut dword));
    assert_eq!(u32::from_le_bytes(dword), 0x00cd_ab00);

    assert!(buses.pio.write(0x2005, &[1]));
    assert!(buses.pio.write(0x2011, &[1]));
    assert!(buses.pio.write(0x2011, &[0]));
    // I/O APIC inputs from 16 up count assertions, as FreeBSD's vioapic does: a deassert
    // without an assert changes nothing.
    assert!(buses.pio.write(0x2011, &[0]));
    assert_eq!(
        sink.lines.lock().unwrap().as_slice(),
        &[(5, true), (17, true), (17, false)]
    );

    assert!(buses.mmio.write(0xff00_fff0, &[1, 2, 3, 4, 5, 6, 7, 8]));
    let mut qword = [0u8; 8];
    assert!(buses.mmio.read(0xff00_fff0, &mut qword));
    assert_eq!(qword, [1, 2, 3, 4, 5, 6, 7, 8]);

    assert_eq!(control.exit_reason(), None);
    assert!(buses.pio.write(0xf4, &[0x10]));
    assert_eq!(control.exit_reason(), Some(ExitReason::DebugExit(0x21)));
    assert_eq!(ExitReason::DebugExit(0x21).status(), 0x21);
    // The first request stands.
    assert!(buses.pio.write(0xf4, &[0x00]));
    assert_eq!(control.exit_reason(), Some(ExitReason::DebugExit(0x21)));
}

#[cfg(feature = "bhyve_snapshot")]
fn pctestdev_of(devices: &Devices) -> &pctestdev::PcTestDev {
    devices.find::<pctestdev::PcTestDev>().next().unwrap()
}

#[cfg(feature = "bhyve_snapshot")]
#[test]
fn pc_testdev_scratch_register_and_memory_survive_a_snapshot() {
    let cfg = Config::from_pairs(&[("pci.0.31.0.device", "lpc"), ("lpc.pc-testdev", "true")]);
    let buses = Arc::new(Buses::default());
    let devices = attach_for_test(&cfg, &buses, Arc::new(FakeSink::default())).unwrap();
    assert!(buses.pio.write(0xe0, &0x1234_5678u32.to_le_bytes()));
    assert!(buses.mmio.write(0xff00_8000, &[9, 8, 7]));
    let saved = pctestdev_of(&devices).state();

    let buses2 = Arc::new(Buses::default());
    let devices2 = attach_for_test(&cfg, &buses2, Arc::new(FakeSink::default())).unwrap();
    pctestdev_of(&devices2).restore(&saved).unwrap();
    let mut dword = [0u8; 4];
    assert!(buses2.pio.read(0xe0, &mut dword));
    assert_eq!(u32::from_le_bytes(dword), 0x1234_5678);
    let mut bytes = [0u8; 3];
    assert!(buses2.mmio.read(0xff00_8000, &mut bytes));
    assert_eq!(bytes, [9, 8, 7]);

    let mut torn = saved;
    torn.memory.pop();
    assert!(pctestdev_of(&devices2).restore(&torn).is_err());
}

#[cfg(feature = "bhyve_snapshot")]
#[test]
fn dummy_bar_contents_survive_a_snapshot() {
    let cfg = Config::from_pairs(&[
        ("pci.0.0.0.device", "hostbridge"),
        ("pci.0.4.0.device", "dummy"),
    ]);
    let buses = Arc::new(Buses::default());
    let devices = attach_for_test(&cfg, &buses, Arc::new(Recorder::default())).unwrap();
    assert!(devices.check_saveable().is_ok());
    assert!(buses.pio.write(0x2000, &[0x5a]));
    assert!(buses.mmio.write(0xc000_0010, &[1, 2]));
    assert!(buses.mmio.write(0xc000_1ffc, &[3, 4, 5, 6]));
    let slot = pci::PciAddress::new(0, 4, 0).unwrap();
    let saved = devices
        .pci()
        .unwrap()
        .function(slot)
        .unwrap()
        .lock()
        .unwrap()
        .save_state()
        .unwrap();

    let buses2 = Arc::new(Buses::default());
    let devices2 = attach_for_test(&cfg, &buses2, Arc::new(Recorder::default())).unwrap();
    let function = devices2.pci().unwrap().function(slot).unwrap();
    function.lock().unwrap().restore_state(&saved).unwrap();
    let mut byte = [0u8; 1];
    assert!(buses2.pio.read(0x2000, &mut byte));
    assert_eq!(byte, [0x5a]);
    let mut two = [0u8; 2];
    assert!(buses2.mmio.read(0xc000_0010, &mut two));
    assert_eq!(two, [1, 2]);
    let mut four = [0u8; 4];
    assert!(buses2.mmio.read(0xc000_1ffc, &mut four));
    assert_eq!(four, [3, 4, 5, 6]);

    let mut torn = saved;
    torn.device.truncate(100);
    assert!(function.lock().unwrap().restore_state(&torn).is_err());
}

#[test]
fn pc_testdev_is_absent_unless_configured() {
    let cfg = Config::from_pairs(&[("pci.0.31.0.device", "lpc")]);
    let buses = Arc::new(Buses::default());
    let _devices = attach_for_test(&cfg, &buses, Arc::new(FakeSink::default())).unwrap();
    assert!(!buses.pio.write(0xf4, &[1]));
}

#[test]
fn dummy_device_has_bhyve_bars_and_sends_programmed_msis() {
    let cfg = Config::from_pairs(&[
        ("pci.0.0.0.device", "hostbridge"),
        ("pci.0.4.0.device", "dummy"),
    ]);
    let buses = Arc::new(Buses::default());
    let sink = Arc::new(Recorder::default());
    let devices = attach_for_test(&cfg, &buses, sink.clone()).unwrap();
    assert!(devices
        .instances()
        .iter()
        .any(|(n, _)| n == "dummy@pci.0.4.0"));
    assert_eq!(pci_read32(&buses, 4, 0), 0x0001_10dd);
    // Without a boot ROM, BARs are placed and decoding: I/O at 0x2000, memory in the hole.
    assert_eq!(pci_read32(&buses, 4, 0x10), 0x2001);
    assert_eq!(pci_read32(&buses, 4, 0x14), 0xc000_0000);
    assert_eq!(pci_read32(&buses, 4, 0x18), 0xc000_1000);
    assert!(buses.mmio.write(0xc000_1ffc, &[1, 2, 3, 4]));
    let mut data = [0u8; 4];
    assert!(buses.mmio.read(0xc000_1ffc, &mut data));
    assert_eq!(data, [1, 2, 3, 4]);

    // MSI capability at 0x40: program address and data, enable two messages.
    let select = |offset: u32| {
        assert!(buses
            .pio
            .write(0xcf8, &(0x8000_0000u32 | (4 << 11) | offset).to_le_bytes()));
    };
    select(0x44);
    assert!(buses.pio.write(0xcfc, &0xfee0_0000u32.to_le_bytes()));
    select(0x4c);
    assert!(buses.pio.write(0xcfc, &0x0030u16.to_le_bytes()));
    // Nothing is sent while MSI is disabled.
    assert!(buses.pio.write(0x2004, &1u32.to_le_bytes()));
    assert!(sink.msis.lock().unwrap().is_empty());
    select(0x40);
    assert!(buses.pio.write(0xcfe, &0x0011u16.to_le_bytes()));
    assert!(buses.pio.write(0x2004, &3u32.to_le_bytes()));
    assert!(buses.pio.write(0x2000, &0x00ab_cdefu32.to_le_bytes()));
    assert_eq!(
        sink.msis.lock().unwrap().as_slice(),
        &[
            (0xfee0_0000, 0x31),
            (0xfee0_0000, 0x30),
            (0xfee0_0000, 0x31)
        ]
    );
}

#[test]
fn where_the_kernel_holds_the_rtc_pm_timer_and_hpet_userland_makes_none_of_them() {
    let buses = Arc::new(Buses::default());
    let memory = Arc::new(crate::memory::GuestMemory::new(16 << 20).unwrap());
    let devices = attach(
        &Config::new(),
        &crate::vmm::PlatformCaps::FREEBSD,
        &buses,
        Arc::new(FakeSink::default()),
        VmControl::new(),
        memory,
    )
    .unwrap();
    let names: Vec<String> = devices.instances().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["pm"]);
    let mut data = [0u8; 4];
    assert!(!buses.pio.read(0x70, &mut data[..1]), "RTC index port");
    assert!(
        !buses.pio.read(u64::from(pm::IO_PMTMR), &mut data),
        "PM timer"
    );
    assert!(!buses.mmio.read(hpet::HPET_BASE, &mut data), "HPET");
    assert!(
        buses.pio.read(u64::from(pm::PM1A_EVT_ADDR), &mut data[..2]),
        "PM1 events"
    );
    // On KVM all of them are user space's.
    let buses = Arc::new(Buses::default());
    attach_for_test(&Config::new(), &buses, Arc::new(FakeSink::default())).unwrap();
    assert!(buses.pio.read(0x70, &mut data[..1]));
    assert!(buses.pio.read(u64::from(pm::IO_PMTMR), &mut data));
    assert!(buses.mmio.read(hpet::HPET_BASE, &mut data));
}

/// `attach` with the machine-side arguments a unit test does not care about.
fn attach_for_test(
    config: &Config,
    buses: &Arc<crate::bus::Buses>,
    interrupts: Arc<dyn crate::interrupts::InterruptSink>,
) -> Result<Devices, DeviceError> {
    attach_with_control(config, buses, interrupts, VmControl::new())
}

/// [`attach_for_test`] with the VM control the devices end the VM through.
fn attach_with_control(
    config: &Config,
    buses: &Arc<crate::bus::Buses>,
    interrupts: Arc<dyn crate::interrupts::InterruptSink>,
    control: Arc<VmControl>,
) -> Result<Devices, DeviceError> {
    let memory = Arc::new(crate::memory::GuestMemory::new(16 << 20).unwrap());
    let devices = attach(
        config,
        &crate::vmm::PlatformCaps::KVM,
        buses,
        interrupts,
        control,
        memory,
    )?;
    devices.resume();
    Ok(devices)
}

#[test]
fn the_mp_table_lists_the_routed_intx_pins_and_the_dummy_drives_its_line() {
    let cfg = Config::from_pairs(&[
        ("pci.0.0.0.device", "hostbridge"),
        ("pci.0.5.0.device", "dummy"),
        ("pci.0.31.0.device", "lpc"),
    ]);
    let buses = Arc::new(Buses::default());
    let sink = Arc::new(FakeSink::default());
    let memory = Arc::new(crate::memory::GuestMemory::new(16 << 20).unwrap());
    let devices = attach(
        &cfg,
        &crate::vmm::PlatformCaps::KVM,
        &buses,
        sink.clone(),
        crate::vcpu::VmControl::new(),
        memory.clone(),
    )
    .unwrap();
    let topology = crate::description::topology(&cfg).unwrap();
    crate::firmware::write_tables(&cfg, &topology, &memory, &devices).unwrap();
    // Slot 5 INTA: pin register 1, line register IRQ 5 (PIRQ A).
    assert_eq!(pci_read32(&buses, 5, 0x3c) & 0xffff, 0x0105);

    // The MP table's configuration table follows its 16-byte floating pointer.
    let mut table = vec![0u8; 4096];
    memory
        .read(crate::mptable::MPTABLE_BASE + 16, &mut table)
        .unwrap();
    assert_eq!(&table[..4], b"PCMP");
    let count = u16::from_le_bytes([table[34], table[35]]) as usize;
    // Walk the entries (processor entries are 20 bytes, the others 8) to the interrupt ones.
    let mut at = 44;
    let mut interrupts = Vec::new();
    for _ in 0..count {
        if table[at] == 3 {
            interrupts.push(table[at..at + 8].to_vec());
        }
        at += if table[at] == 0 { 20 } else { 8 };
    }
    assert_eq!(
        interrupts.len(),
        17,
        "16 ISA entries and one for the INTx pin"
    );
    let pci = &interrupts[16];
    // Source bus 0 (PCI), IRQ = slot << 2 | (pin - 1), destination input 16.
    assert_eq!((pci[4], pci[5], pci[7]), (0, 5 << 2, 16));

    // The dummy's INTx register raises and lowers PIRQ A's IRQ and input 16.
    sink.lines.lock().unwrap().clear();
    let intx_port = 0x2000 + pci::dummy::INTX_OFFSET;
    assert!(buses.pio.write(intx_port, &[1]));
    assert!(buses.pio.write(intx_port, &[0]));
    assert_eq!(
        *sink.lines.lock().unwrap(),
        [(5, true), (16, true), (5, false), (16, false)]
    );
}

/// Records what the device list asks of it.
struct RecordingPart {
    name: &'static str,
    events: Arc<Mutex<Vec<String>>>,
}

impl RecordingPart {
    fn record(&self, what: &str) {
        self.events
            .lock()
            .unwrap()
            .push(format!("{what} {}", self.name));
    }
}

impl Drop for RecordingPart {
    fn drop(&mut self) {
        self.record("drop");
    }
}

impl Stateful for RecordingPart {
    fn id(&self) -> StateId {
        StateId {
            section: "recording",
            instance: self.name.to_string(),
        }
    }
    fn pause(&self) {
        self.record("pause");
    }
    fn resume(&self) {
        self.record("resume");
    }
    fn stop(&self) {
        self.record("stop");
    }
}

#[cfg(feature = "bhyve_snapshot")]
impl Persist for RecordingPart {
    fn state_version(&self) -> u32 {
        1
    }
    fn save(&self) -> Result<Vec<u8>, String> {
        Ok(Vec::new())
    }
    fn restore(&self, _section: &crate::snapshot::Section<'_>) -> Result<(), String> {
        Ok(())
    }
}

#[test]
fn parts_are_paused_in_reverse_resumed_in_order_and_all_stopped_before_any_is_dropped() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let part = |name| -> Arc<dyn Stateful> {
        Arc::new(RecordingPart {
            name,
            events: events.clone(),
        })
    };
    let devices = Devices::from_parts(vec![part("pci"), part("com1"), part("rtc")]);
    devices.pause();
    devices.resume();
    drop(devices);
    assert_eq!(
        *events.lock().unwrap(),
        [
            "pause rtc",
            "pause com1",
            "pause pci",
            "resume pci",
            "resume com1",
            "resume rtc",
            "stop pci",
            "stop com1",
            "stop rtc",
            "drop pci",
            "drop com1",
            "drop rtc"
        ]
    );
}
