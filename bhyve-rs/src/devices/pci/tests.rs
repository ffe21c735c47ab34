use super::hostbridge::HostBridge;
use super::irq::{IntxRoute, IntxState, PirqRouter};
use super::lpc::{LpcBridge, LpcIds};
use super::*;
use crate::interrupts::InterruptSink;

/// Interrupt lines as the router drives them.
#[derive(Default)]
struct Lines(Mutex<Vec<(u32, bool)>>);

impl InterruptSink for Lines {
    fn set_irq_line(&self, gsi: u32, high: bool) -> std::io::Result<()> {
        self.0.lock().unwrap().push((gsi, high));
        Ok(())
    }
    fn signal_msi(&self, _address: u64, _data: u32) -> std::io::Result<()> {
        Ok(())
    }
    fn set_isa_irq_trigger(&self, _irq: u8, _level: bool) -> std::io::Result<()> {
        Ok(())
    }
}

fn router() -> (Arc<Lines>, Arc<PirqRouter>) {
    let lines = Arc::new(Lines::default());
    let pins = Arc::new(crate::interrupts::SharedLevelPins::new(lines.clone()));
    (lines, Arc::new(PirqRouter::new(pins, false)))
}

/// BAR writes seen by a device: (BAR index, offset, bytes).
type Log = Arc<Mutex<Vec<(usize, u64, Vec<u8>)>>>;

/// A device that records the BAR writes reaching it.
#[derive(Default)]
struct Probe {
    accesses: Log,
}

impl PciDevice for Probe {
    fn save_device_state(&self) -> Option<Vec<u8>> {
        Some(Vec::new())
    }
    fn bar_read(&mut self, _config: &ConfigSpace, bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(bar as u8 + 0xa0);
    }
    fn bar_write(&mut self, _config: &ConfigSpace, bar: usize, offset: u64, data: &[u8]) {
        self.accesses
            .lock()
            .unwrap()
            .push((bar, offset, data.to_vec()));
    }
}

fn probe_config(enable_bars: bool) -> ConfigSpace {
    let mut cfg = ConfigSpace::new(enable_bars);
    cfg.write16(PCIR_VENDOR, 0x10dd);
    cfg.write16(PCIR_DEVICE, 0x0001);
    cfg.request_bar(0, BarKind::Io, 8);
    cfg.request_bar(1, BarKind::Mem32, 4096);
    cfg.request_bar(2, BarKind::Mem64, 0x4000);
    cfg
}

/// hostbridge at 0:0:0, lpc at 0:31:0, the probe at 0:3:0.
fn machine() -> (Arc<Buses>, Arc<PciRoot>, Log) {
    let buses = Arc::new(Buses::default());
    let mut builder = PciRootBuilder::new(1 << 32);
    let mut cfg = ConfigSpace::new(true);
    let hb = HostBridge::init(&mut cfg, 0, 0x1275, 0x1275).unwrap();
    builder
        .add(
            PciAddress::new(0, 0, 0).unwrap(),
            "hostbridge",
            cfg,
            Box::new(hb),
        )
        .unwrap();
    let mut cfg = ConfigSpace::new(true);
    let (_, router) = router();
    builder.set_intx_router(router.clone());
    let lpc = LpcBridge::init(&mut cfg, LpcIds::default(), router);
    builder
        .add(
            PciAddress::new(0, 31, 0).unwrap(),
            "lpc",
            cfg,
            Box::new(lpc),
        )
        .unwrap();
    let probe = Probe::default();
    let log = probe.accesses.clone();
    builder
        .add(
            PciAddress::new(0, 3, 0).unwrap(),
            "probe",
            probe_config(true),
            Box::new(probe),
        )
        .unwrap();
    let root = builder.build(&buses).unwrap();
    (buses, root, log)
}

fn select(buses: &Buses, bus: u8, slot: u8, function: u8, offset: u8) {
    let address = 0x8000_0000u32
        | (u32::from(bus) << 16)
        | (u32::from(slot) << 11)
        | (u32::from(function) << 8)
        | u32::from(offset);
    assert!(buses.pio.write(0xcf8, &address.to_le_bytes()));
}

fn cfg_read(buses: &Buses, slot: u8, function: u8, offset: u8, size: usize) -> u32 {
    select(buses, 0, slot, function, offset & !3);
    let mut data = vec![0u8; size];
    assert!(buses.pio.read(0xcfc + u64::from(offset & 3), &mut data));
    from_le(&data)
}

fn cfg_write(buses: &Buses, slot: u8, offset: u8, size: usize, value: u32) {
    select(buses, 0, slot, 0, offset & !3);
    let bytes = value.to_le_bytes();
    assert!(buses
        .pio
        .write(0xcfc + u64::from(offset & 3), &bytes[..size]));
}

#[test]
fn mechanism_one_enumerates_hostbridge_and_lpc() {
    let (buses, _, _) = machine();
    assert_eq!(cfg_read(&buses, 0, 0, 0, 4), 0x1275_1275);
    assert_eq!(cfg_read(&buses, 0, 0, 0x0b, 1), u32::from(PCIC_BRIDGE));
    assert_eq!(cfg_read(&buses, 0, 0, 0x0a, 1), u32::from(PCIS_BRIDGE_HOST));
    assert_eq!(cfg_read(&buses, 31, 0, 0, 2), 0x8086);
    assert_eq!(cfg_read(&buses, 31, 0, 2, 2), 0x7000);
    assert_eq!(cfg_read(&buses, 31, 0, 0x08, 4) >> 16, 0x0601);
    // Legacy interrupts are off: line 255, no pin.
    assert_eq!(cfg_read(&buses, 31, 0, 0x3c, 2), 0x00ff);
}

#[test]
fn absent_functions_and_bad_accesses_read_all_ones() {
    let (buses, _, _) = machine();
    assert_eq!(cfg_read(&buses, 5, 0, 0, 4), 0xffff_ffff);
    assert_eq!(cfg_read(&buses, 0, 1, 0, 4), 0xffff_ffff);
    assert_eq!(cfg_read(&buses, 0, 0, 0, 1), 0x75);
    // Another bus number: nothing there.
    select(&buses, 1, 0, 0, 0);
    let mut data = [0u8; 4];
    assert!(buses.pio.read(0xcfc, &mut data));
    assert_eq!(data, [0xff; 4]);
    // Unaligned word at 0xCFD.
    select(&buses, 0, 0, 0, 0);
    let mut word = [0u8; 2];
    assert!(buses.pio.read(0xcfd, &mut word));
    assert_eq!(word, [0xff; 2]);
}

#[test]
fn data_port_is_dead_until_the_enable_bit_is_set() {
    let (buses, _, _) = machine();
    assert!(buses.pio.write(0xcf8, &0x0000_0000u32.to_le_bytes()));
    let mut data = [0u8; 4];
    assert!(buses.pio.read(0xcfc, &mut data));
    assert_eq!(data, [0xff; 4]);
    assert!(buses.pio.read(0xcf8, &mut data));
    assert_eq!(u32::from_le_bytes(data), 0);
    // The address register keeps bus/slot/function/register and drops the low two bits.
    assert!(buses.pio.write(0xcf8, &0x8012_fbffu32.to_le_bytes()));
    assert!(buses.pio.read(0xcf8, &mut data));
    assert_eq!(u32::from_le_bytes(data), 0x8012_fbfc);
    // Only 32-bit accesses reach the address register.
    let mut byte = [0u8; 1];
    assert!(buses.pio.read(0xcf8, &mut byte));
    assert_eq!(byte, [0xff]);
    assert!(buses.pio.write(0xcf8, &[0]));
    assert!(buses.pio.read(0xcf8, &mut data));
    assert_eq!(u32::from_le_bytes(data), 0x8012_fbfc);
}

#[test]
fn identity_registers_ignore_guest_writes() {
    let (buses, _, _) = machine();
    cfg_write(&buses, 31, 0, 4, 0xdead_beef);
    assert_eq!(cfg_read(&buses, 31, 0, 0, 4), 0x7000_8086);
    // The scratch-like latency timer is writable.
    cfg_write(&buses, 31, 0x0d, 1, 0x40);
    assert_eq!(cfg_read(&buses, 31, 0, 0x0d, 1), 0x40);
}

#[test]
fn bars_are_placed_in_bhyve_windows_largest_first() {
    let (_, root, _) = machine();
    let f = root.function(PciAddress::new(0, 3, 0).unwrap()).unwrap();
    let f = f.lock().unwrap();
    assert_eq!(f.name(), "probe@pci.0.3.0");
    let io = f.config().bar(0);
    assert_eq!((io.kind, io.addr, io.size), (BarKind::Io, 0x2000, 8));
    let mem64 = f.config().bar(2);
    assert_eq!((mem64.kind, mem64.addr), (BarKind::Mem64, 0xc000_0000));
    assert_eq!(f.config().bar(3).kind, BarKind::Mem64High);
    let mem32 = f.config().bar(1);
    assert_eq!((mem32.addr, mem32.size), (0xc000_4000, 4096));
    assert_eq!(f.config().read32(PCIR_BAR0), 0x2001);
    assert_eq!(f.config().read32(PCIR_BAR0 + 8), 0xc000_0004);
    // enable_bars turned on decoding for the spaces the BARs use.
    let cmd = f.config().read16(PCIR_COMMAND);
    assert_eq!(cmd, PCIM_CMD_BUSMASTEREN | PCIM_CMD_PORTEN | PCIM_CMD_MEMEN);
}

#[test]
fn bar_regions_reach_the_device_with_bar_index_and_offset() {
    let (buses, _, log) = machine();
    let mut data = [0u8; 2];
    assert!(buses.pio.read(0x2004, &mut data));
    assert_eq!(data, [0xa0; 2]);
    assert!(buses.mmio.write(0xc000_4010, &[1, 2, 3, 4]));
    assert!(buses.mmio.write(0xc000_0008, &[9]));
    assert_eq!(
        *log.lock().unwrap(),
        vec![(1, 0x10, vec![1, 2, 3, 4]), (2, 8, vec![9])]
    );
}

#[test]
fn bar_sizing_with_all_ones_reports_the_size() {
    let (buses, _, _) = machine();
    // As a guest does: stop decoding, size, restore.
    cfg_write(&buses, 3, 0x04, 2, 0);
    for (offset, expected) in [
        (0x10, 0x0000_fff9u32), // 8 bytes of I/O (BARs decode 16 address bits)
        (0x14, 0xffff_f000),    // 4 KiB of 32-bit memory
        (0x18, 0xffff_c004),    // 16 KiB of 64-bit memory, low half
        (0x1c, 0xffff_ffff),    // high half
    ] {
        cfg_write(&buses, 3, offset, 4, 0xffff_ffff);
        assert_eq!(
            cfg_read(&buses, 3, 0, offset, 4),
            expected,
            "BAR at {offset:#x}"
        );
    }
    // A BAR register that is not implemented reads zero whatever is written.
    cfg_write(&buses, 3, 0x20, 4, 0xffff_ffff);
    assert_eq!(cfg_read(&buses, 3, 0, 0x20, 4), 0);
    // Partial writes to a BAR are ignored.
    cfg_write(&buses, 3, 0x14, 4, 0xc000_4000);
    cfg_write(&buses, 3, 0x14, 2, 0x1234);
    assert_eq!(cfg_read(&buses, 3, 0, 0x14, 4), 0xc000_4000);
}

#[test]
fn reprogramming_a_bar_moves_its_range_on_the_bus() {
    let (buses, root, log) = machine();
    cfg_write(&buses, 3, 0x14, 4, 0xd000_0000);
    assert_eq!(cfg_read(&buses, 3, 0, 0x14, 4), 0xd000_0000);
    assert!(!buses.mmio.write(0xc000_4000, &[1]));
    assert!(buses.mmio.write(0xd000_0ffc, &[7]));
    assert_eq!(log.lock().unwrap().last(), Some(&(1, 0xffc, vec![7])));
    // The I/O BAR keeps its low flag bit and moves too.
    cfg_write(&buses, 3, 0x10, 4, 0x3000);
    assert_eq!(cfg_read(&buses, 3, 0, 0x10, 4), 0x3001);
    let mut byte = [0u8];
    assert!(!buses.pio.read(0x2000, &mut byte));
    assert!(buses.pio.read(0x3007, &mut byte));
    // A 64-bit BAR moved above 4 GiB by writing both halves.
    cfg_write(&buses, 3, 0x18, 4, 0x0000_0000);
    cfg_write(&buses, 3, 0x1c, 4, 0x0000_0008);
    let f = root.function(PciAddress::new(0, 3, 0).unwrap()).unwrap();
    assert_eq!(f.lock().unwrap().config().bar(2).addr, 0x8_0000_0000);
    assert!(buses.mmio.write(0x8_0000_0010, &[5]));
    assert_eq!(log.lock().unwrap().last(), Some(&(2, 0x10, vec![5])));
}

#[test]
fn command_register_maps_and_unmaps_bars() {
    let (buses, _, _) = machine();
    let mut byte = [0u8];
    cfg_write(&buses, 3, 0x04, 2, u32::from(PCIM_CMD_PORTEN));
    assert!(buses.pio.read(0x2000, &mut byte));
    assert!(!buses.mmio.read(0xc000_4000, &mut byte));
    cfg_write(&buses, 3, 0x04, 2, u32::from(PCIM_CMD_MEMEN));
    assert!(!buses.pio.read(0x2000, &mut byte));
    assert!(buses.mmio.read(0xc000_4000, &mut byte));
    // Moving a BAR while decoding is off only takes effect once decoding is back on.
    cfg_write(&buses, 3, 0x10, 4, 0x4000);
    assert!(!buses.pio.read(0x4000, &mut byte));
    cfg_write(&buses, 3, 0x04, 2, u32::from(PCIM_CMD_PORTEN));
    assert!(buses.pio.read(0x4000, &mut byte));
    // Status bits are read-only.
    cfg_write(&buses, 3, 0x06, 2, 0xffff);
    assert_eq!(cfg_read(&buses, 3, 0, 0x06, 2), 0);
}

#[test]
fn hostbridge_exposes_a_pcie_root_port_capability() {
    let (buses, _, _) = machine();
    assert_eq!(
        cfg_read(&buses, 0, 0, 0x06, 2) & u32::from(PCIM_STATUS_CAPPRESENT),
        0x10
    );
    assert_eq!(cfg_read(&buses, 0, 0, 0x34, 1), 0x40);
    assert_eq!(cfg_read(&buses, 0, 0, 0x40, 4), 0x0042_0010);
    // Capability ID and next pointer stay put; a dword write keeps only its upper half.
    cfg_write(&buses, 0, 0x40, 4, 0x1234_5678);
    assert_eq!(cfg_read(&buses, 0, 0, 0x40, 4), 0x1234_0010);
    assert_eq!(cfg_read(&buses, 0, 0, 0x4c, 4), 0x411);
}

#[test]
fn header_type_shows_multifunction_slots() {
    let buses = Arc::new(Buses::default());
    let mut builder = PciRootBuilder::new(1 << 32);
    for (slot, function) in [(3, 0), (3, 2), (4, 0)] {
        let mut cfg = ConfigSpace::new(false);
        cfg.write16(PCIR_VENDOR, 0x1234);
        builder
            .add(
                PciAddress::new(0, slot, function).unwrap(),
                "probe",
                cfg,
                Box::new(Probe::default()),
            )
            .unwrap();
    }
    let _root = builder.build(&buses).unwrap();
    assert_eq!(cfg_read(&buses, 3, 0, 0x0e, 1), 0x80);
    assert_eq!(cfg_read(&buses, 3, 2, 0x0c, 4), 0x0080_0000);
    assert_eq!(cfg_read(&buses, 4, 0, 0x0e, 1), 0x00);
    assert_eq!(cfg_read(&buses, 3, 1, 0x00, 4), 0xffff_ffff);
}

#[test]
fn extended_configuration_window_reaches_functions() {
    let (buses, _, _) = machine();
    let lpc = PCI_EMUL_ECFG_BASE + (31 << 15);
    let mut data = [0u8; 4];
    assert!(buses.mmio.read(lpc, &mut data));
    assert_eq!(u32::from_le_bytes(data), 0x7000_8086);
    // Offset 0x100: an empty extended capability header.
    assert!(buses.mmio.read(lpc + 0x100, &mut data));
    assert_eq!(data, [0; 4]);
    assert!(buses.mmio.read(lpc + 0x200, &mut data));
    assert_eq!(data, [0xff; 4]);
    assert!(buses.mmio.read(PCI_EMUL_ECFG_BASE + (7 << 15), &mut data));
    assert_eq!(data, [0xff; 4]);
}

#[test]
fn lpc_pirq_registers_start_disabled_and_keep_irq_bits() {
    let (buses, root, _) = machine();
    assert_eq!(cfg_read(&buses, 31, 0, 0x60, 4), 0x8080_8080);
    cfg_write(&buses, 31, 0x61, 1, 0x7b);
    assert_eq!(cfg_read(&buses, 31, 0, 0x61, 1), 0x0b);
    cfg_write(&buses, 31, 0x6b, 1, 0x05);
    assert_eq!(cfg_read(&buses, 31, 0, 0x68, 4), 0x0580_8080);
    assert!(root.function(PciAddress::new(0, 31, 0).unwrap()).is_some());
}

/// Functions asking for INTx: 0:3:0, 0:3:1, 0:3:2, 0:4:0, 0:5:0, and the LPC bridge at 0:31:0.
fn intx_machine() -> (
    Arc<Buses>,
    Arc<PciRoot>,
    Arc<Lines>,
    Vec<Arc<irq::IntxLine>>,
) {
    let buses = Arc::new(Buses::default());
    let mut builder = PciRootBuilder::new(1 << 32);
    let (lines, router) = router();
    router.use_irq(9);
    builder.set_intx_router(router.clone());
    let mut cfg = ConfigSpace::new(true);
    let lpc = LpcBridge::init(&mut cfg, LpcIds::default(), router);
    builder
        .add(
            PciAddress::new(0, 31, 0).unwrap(),
            "lpc",
            cfg,
            Box::new(lpc),
        )
        .unwrap();
    let mut intx = Vec::new();
    for (slot, function) in [(3, 0), (3, 1), (3, 2), (4, 0), (5, 0)] {
        let mut cfg = ConfigSpace::new(true);
        cfg.write16(PCIR_VENDOR, 0x10dd);
        cfg.add_msi_capability(1).unwrap();
        intx.push(cfg.request_intx());
        builder
            .add(
                PciAddress::new(0, slot, function).unwrap(),
                "probe",
                cfg,
                Box::new(Probe::default()),
            )
            .unwrap();
    }
    let root = builder.build(&buses).unwrap();
    (buses, root, lines, intx)
}

#[test]
fn intx_pins_spread_over_a_slot_and_routes_follow_bhyve() {
    let (buses, root, _, _) = intx_machine();
    // Pin (0x3d) and line (0x3c) registers: functions of slot 3 take INTA, INTB, INTC.
    let pin_line = |slot, function| cfg_read(&buses, slot, function, 0x3c, 2);
    assert_eq!(pin_line(3, 0), 0x0105);
    assert_eq!(pin_line(3, 1), 0x0206);
    assert_eq!(pin_line(3, 2), 0x0307);
    assert_eq!(pin_line(4, 0), 0x010a);
    assert_eq!(pin_line(5, 0), 0x010b);
    // No INTx for the bridge itself.
    assert_eq!(pin_line(31, 0), 0x00ff);
    let routes: Vec<(u8, u8, u8, u8)> = root
        .intx_routes()
        .iter()
        .map(|r| (r.slot, r.pin, r.route.pirq_pin, r.route.ioapic_irq))
        .collect();
    assert_eq!(
        routes,
        [
            (3, 1, 1, 16),
            (3, 2, 2, 17),
            (3, 3, 3, 18),
            (4, 1, 4, 19),
            (5, 1, 5, 20)
        ]
    );
    // PIRQ A-E carry IRQs 5, 6, 7, 10, 11 (3/4 are the COM ports', 9 the SCI's); F-H are off.
    assert_eq!(cfg_read(&buses, 31, 0, 0x60, 4), 0x0a07_0605);
    assert_eq!(cfg_read(&buses, 31, 0, 0x68, 4), 0x8080_800b);
}

#[test]
fn intx_is_level_triggered_and_masked_by_intxdis_and_msi() {
    let (buses, _, lines, intx) = intx_machine();
    let events = || std::mem::take(&mut *lines.0.lock().unwrap());
    let line = &intx[3]; // 0:4:0: PIRQ D (IRQ 10), I/O APIC input 19
    assert_eq!(
        line.route(),
        Some(IntxRoute {
            pirq_pin: 4,
            ioapic_irq: 19
        })
    );
    line.assert();
    assert_eq!(events(), [(10, true), (19, true)]);
    // INTxDIS in the command register drops the line; clearing it raises it again.
    let command = cfg_read(&buses, 4, 0, 0x04, 2);
    cfg_write(&buses, 4, 0x04, 2, command | u32::from(PCIM_CMD_INTXDIS));
    assert_eq!(line.state(), IntxState::Pending);
    assert_eq!(events(), [(10, false), (19, false)]);
    cfg_write(&buses, 4, 0x04, 2, command);
    assert_eq!(events(), [(10, true), (19, true)]);
    // Enabling MSI masks it too (MSI control at 0x42).
    cfg_write(&buses, 4, 0x42, 2, 1);
    assert_eq!(events(), [(10, false), (19, false)]);
    line.deassert();
    cfg_write(&buses, 4, 0x42, 2, 0);
    assert!(events().is_empty(), "a line let go while masked stays down");
    // The guest reroutes PIRQ D to IRQ 12 through the LPC bridge while the line is up.
    line.assert();
    events();
    cfg_write(&buses, 31, 0x63, 1, 12);
    assert_eq!(cfg_read(&buses, 31, 0, 0x63, 1), 12);
    assert_eq!(events(), [(10, false), (12, true)]);
}

#[test]
fn a_second_function_at_the_same_address_is_refused() {
    let mut builder = PciRootBuilder::new(1 << 32);
    let a = PciAddress::new(0, 2, 0).unwrap();
    builder
        .add(
            a,
            "probe",
            ConfigSpace::new(false),
            Box::new(Probe::default()),
        )
        .unwrap();
    let err = builder
        .add(
            a,
            "probe",
            ConfigSpace::new(false),
            Box::new(Probe::default()),
        )
        .unwrap_err();
    assert_eq!(err.to_string(), "pci slot 0:2:0 already occupied!");
}

#[test]
fn bar_windows_run_out_with_an_error_naming_the_device() {
    let buses = Arc::new(Buses::default());
    let mut builder = PciRootBuilder::new(1 << 32);
    let mut cfg = ConfigSpace::new(false);
    cfg.request_bar(0, BarKind::Mem32, 1 << 30);
    builder
        .add(
            PciAddress::new(0, 2, 0).unwrap(),
            "big",
            cfg,
            Box::new(Probe::default()),
        )
        .unwrap();
    let err = builder.build(&buses).err().unwrap().to_string();
    assert!(err.starts_with("big@pci.0.2.0: BAR 0: no room"), "{err}");
}

#[test]
fn msi_capability_keeps_read_only_control_bits() {
    let mut cfg = ConfigSpace::new(false);
    // MSI, 64-bit capable, 4 messages capable.
    let offset = cfg
        .add_capability(&[PCIY_MSI, 0, 0x84, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        .unwrap();
    assert_eq!(offset, 0x40);
    cfg.capability_write(offset + 2, 2, 0x0021);
    assert_eq!(cfg.read16(offset + 2), 0x00a5);
    cfg.capability_write(offset + 4, 4, 0xfee0_0000);
    cfg.capability_write(offset + 12, 2, 0x0041);
    assert_eq!(cfg.msi(), Some((0xfee0_0000, 0x41, 4)));
}

#[cfg(feature = "bhyve_snapshot")]
#[test]
fn restored_function_state_maps_bars_where_the_saved_guest_had_them() {
    let (buses, root, log) = machine();
    cfg_write(&buses, 3, 0x14, 4, 0xd000_0000);
    cfg_write(&buses, 31, 0x62, 1, 0x0a);
    let probe = root.function(PciAddress::new(0, 3, 0).unwrap()).unwrap();
    let saved = probe.lock().unwrap().save_state().unwrap();
    let lpc_saved = root
        .function(PciAddress::new(0, 31, 0).unwrap())
        .unwrap()
        .lock()
        .unwrap()
        .save_state()
        .unwrap();

    let (buses2, root2, log2) = machine();
    let probe2 = root2.function(PciAddress::new(0, 3, 0).unwrap()).unwrap();
    probe2.lock().unwrap().restore_state(&saved).unwrap();
    assert_eq!(probe2.lock().unwrap().save_state().unwrap(), saved);
    assert!(!buses2.mmio.write(0xc000_4000, &[1]));
    assert!(buses2.mmio.write(0xd000_0004, &[2]));
    assert_eq!(log2.lock().unwrap().last(), Some(&(1, 4, vec![2])));
    assert!(log.lock().unwrap().is_empty());

    let lpc2 = root2.function(PciAddress::new(0, 31, 0).unwrap()).unwrap();
    lpc2.lock().unwrap().restore_state(&lpc_saved).unwrap();
    assert_eq!(cfg_read(&buses2, 31, 0, 0x62, 1), 0x0a);

    let mut bad = saved.clone();
    bad.bars[1].size = 8192;
    assert!(probe2.lock().unwrap().restore_state(&bad).is_err());
    // A BAR of another kind is told in words.
    bad = saved.clone();
    let (kind, size) = (bad.bars[1].kind, bad.bars[1].size);
    bad.bars[1].kind = BarKind::Io;
    let err = probe2.lock().unwrap().restore_state(&bad).unwrap_err();
    assert_eq!(
        err,
        format!(
            "{}: BAR 1 was I/O space of 0x{size:x} bytes, is {} of 0x{size:x} bytes",
            probe2.lock().unwrap().name,
            kind.in_words()
        )
    );
    assert!(!err.contains("Io") && !err.contains("Mem"), "{err}");
    bad = saved.clone();
    bad.config.truncate(64);
    assert!(probe2.lock().unwrap().restore_state(&bad).is_err());
    bad = saved;
    bad.device = vec![1];
    assert!(probe2.lock().unwrap().restore_state(&bad).is_err());
}

/// A device model that says nothing about snapshots.
#[cfg(feature = "bhyve_snapshot")]
struct Unsaveable;
#[cfg(feature = "bhyve_snapshot")]
impl PciDevice for Unsaveable {}

#[cfg(feature = "bhyve_snapshot")]
#[test]
fn a_device_model_without_snapshot_support_is_named_as_unsaveable() {
    let buses = Arc::new(Buses::default());
    let mut builder = PciRootBuilder::new(1 << 32);
    let slot = PciAddress::new(0, 5, 0).unwrap();
    builder
        .add(slot, "nosave", ConfigSpace::new(true), Box::new(Unsaveable))
        .unwrap();
    let root = builder.build(&buses).unwrap();
    let function = root.function(slot).unwrap();
    let function = function.lock().unwrap();
    assert_eq!(
        function.check_saveable(),
        Err("nosave@pci.0.5.0: this device cannot be saved".to_string())
    );
    assert!(function.save_state().is_err());
}

#[cfg(feature = "bhyve_snapshot")]
#[test]
fn an_asserted_intx_line_is_saved_and_driven_again_after_restore() {
    let (buses, root, _, intx) = intx_machine();
    // The guest moved PIRQ D (slot 4's INTA) to IRQ 12; the device holds its line.
    cfg_write(&buses, 31, 0x63, 1, 12);
    intx[3].assert();
    let at = |slot| PciAddress::new(0, slot, 0).unwrap();
    let saved_lpc = root
        .function(at(31))
        .unwrap()
        .lock()
        .unwrap()
        .save_state()
        .expect("the LPC bridge is saveable");
    let saved = root
        .function(at(4))
        .unwrap()
        .lock()
        .unwrap()
        .save_state()
        .expect("the device is saveable");
    assert_eq!(saved.intx, Some(IntxState::Asserted));

    let (buses2, root2, lines2, intx2) = intx_machine();
    root2
        .function(at(4))
        .unwrap()
        .lock()
        .unwrap()
        .restore_state(&saved)
        .unwrap();
    root2
        .function(at(31))
        .unwrap()
        .lock()
        .unwrap()
        .restore_state(&saved_lpc)
        .unwrap();
    assert_eq!(intx2[3].state(), IntxState::Asserted);
    assert_eq!(cfg_read(&buses2, 4, 0, 0x3c, 2), 0x010a);
    // Driven at its default IRQ first, then moved with the restored PIRQ register.
    assert_eq!(
        *lines2.0.lock().unwrap(),
        [(10, true), (19, true), (10, false), (12, true)]
    );
    lines2.0.lock().unwrap().clear();
    intx2[3].deassert();
    assert_eq!(*lines2.0.lock().unwrap(), [(12, false), (19, false)]);
}

/// Records MSIs.
#[derive(Default)]
struct MsiLog(Mutex<Vec<(u64, u32)>>);

impl crate::interrupts::InterruptSink for MsiLog {
    fn set_irq_line(&self, _gsi: u32, _high: bool) -> std::io::Result<()> {
        Ok(())
    }
    fn signal_msi(&self, address: u64, data: u32) -> std::io::Result<()> {
        self.0.lock().unwrap().push((address, data));
        Ok(())
    }
    fn set_isa_irq_trigger(&self, _irq: u8, _level: bool) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn msix_table_is_programmed_through_its_bar_and_gates_vectors() {
    let buses = Arc::new(Buses::default());
    let sink = Arc::new(MsiLog::default());
    let table = msix::MsixTable::new(3, sink.clone());
    let mut cfg = ConfigSpace::new(true);
    cfg.write16(PCIR_VENDOR, 0x1af4);
    assert_eq!(cfg.add_msix_capability(table.clone(), 1).unwrap(), 0x40);
    let probe = Probe::default();
    let log = probe.accesses.clone();
    let mut builder = PciRootBuilder::new(1 << 32);
    builder
        .add(
            PciAddress::new(0, 5, 0).unwrap(),
            "probe",
            cfg,
            Box::new(probe),
        )
        .unwrap();
    let _root = builder.build(&buses).unwrap();

    // Capability: 3 vectors, table in BAR 1 at 0, PBA in BAR 1 at 4 KiB.
    assert_eq!(cfg_read(&buses, 5, 0, 0x40, 4), 0x0002_0011);
    assert_eq!(cfg_read(&buses, 5, 0, 0x44, 4), 1);
    assert_eq!(cfg_read(&buses, 5, 0, 0x48, 4), 0x1001);
    // The BAR covers table and PBA: 4 KiB + 8 bytes, rounded to 8 KiB.
    let base = 0xc000_0000u64;
    assert_eq!(cfg_read(&buses, 5, 0, 0x14, 4), base as u32);

    // Entries start masked.
    let mut dword = [0u8; 4];
    assert!(buses.mmio.read(base + 12, &mut dword));
    assert_eq!(u32::from_le_bytes(dword), 1);
    assert!(buses.mmio.write(base + 16, &0xfee0_1000u64.to_le_bytes()));
    assert!(buses.mmio.write(base + 24, &0x45u32.to_le_bytes()));
    let mut qword = [0u8; 8];
    assert!(buses.mmio.read(base + 16, &mut qword));
    assert_eq!(u64::from_le_bytes(qword), 0xfee0_1000);
    // PBA reads zero; a 2-byte table read is refused with all ones.
    assert!(buses.mmio.read(base + 4096, &mut qword));
    assert_eq!(qword, [0; 8]);
    let mut word = [0u8; 2];
    assert!(buses.mmio.read(base, &mut word));
    assert_eq!(word, [0xff; 2]);

    assert!(!table.notify(1), "MSI-X not enabled yet");
    cfg_write(&buses, 5, 0x42, 2, 0x8000 | 0x07ff);
    // Only enable took; the table size bits are read-only.
    assert_eq!(cfg_read(&buses, 5, 0, 0x42, 2), 0x8002);
    assert!(!table.notify(1), "vector still masked");
    assert!(buses.mmio.write(base + 28, &0u32.to_le_bytes()));
    assert!(table.notify(1));
    cfg_write(&buses, 5, 0x40, 4, 0xc000_0000);
    assert!(!table.notify(1), "function masked");
    assert!(!table.notify(7), "no such vector");
    assert_eq!(sink.0.lock().unwrap().as_slice(), &[(0xfee0_1000, 0x45)]);
    // Beyond table and PBA the BAR belongs to the device.
    assert!(buses.mmio.write(base + 0x1800, &[1]));
    assert_eq!(log.lock().unwrap().as_slice(), &[(1, 0x1800, vec![1])]);
}

#[test]
fn large_64_bit_bars_go_above_guest_memory_and_small_ones_below_4_gib() {
    for (highmem_end, window) in [(6u64 << 30, 32u64 << 30), (40 << 30, 64 << 30)] {
        let buses = Arc::new(Buses::default());
        let mut builder = PciRootBuilder::new(highmem_end);
        let mut cfg = ConfigSpace::new(true);
        cfg.write16(PCIR_VENDOR, 0x10dd);
        cfg.request_bar(0, BarKind::Mem64, 256 << 20);
        cfg.request_bar(2, BarKind::Mem64, 64 << 20);
        cfg.request_bar(4, BarKind::Mem64, 512 << 20);
        builder
            .add(
                PciAddress::new(0, 5, 0).unwrap(),
                "wide",
                cfg,
                Box::new(Probe::default()),
            )
            .unwrap();
        let root = builder.build(&buses).unwrap();
        let f = root.function(PciAddress::new(0, 5, 0).unwrap()).unwrap();
        let f = f.lock().unwrap();
        let (big, small, bigger) = (f.config().bar(0), f.config().bar(2), f.config().bar(4));
        // Largest first, each aligned to its size, in the window at the next 32 GiB boundary.
        assert_eq!(bigger.addr, window, "512 MiB BAR");
        assert_eq!(big.addr, window + (512 << 20), "256 MiB BAR");
        // 128 MiB and less stays in the 32-bit window, as bhyve does for old drivers.
        assert!(
            (0xc000_0000..PCI_EMUL_ECFG_BASE).contains(&small.addr),
            "64 MiB BAR at {:#x}",
            small.addr
        );
        assert_eq!(small.addr % (64 << 20), 0);
        // The high half of each 64-bit BAR register holds the upper address bits.
        assert_eq!(
            u64::from(f.config().read32(PCIR_BAR0 + 4)) << 32
                | u64::from(f.config().read32(PCIR_BAR0) & !0xf),
            big.addr
        );
        let windows = root.bus_windows(0).expect("bus 0 has windows");
        assert_eq!(windows.mem64.0, window);
        assert!(windows.mem64.1 >= bigger.addr + (512 << 20) - 1);
    }
}
