//! The DSDT, in the shape bhyve's ASL takes (`acpi.c` `basl_fwrite_dsdt`, `pci_emul.c`
//! `pci_write_dsdt`, `amd64/pci_lpc.c` `pci_lpc_write_dsdt`, `amd64/rtc.c` `rtc_dsdt`), built
//! with the AML builder of the `acpi_tables` crate:
//!
//! ```text
//! Name (_S5, Package () { 0x05, Zero })
//! Name (PICM, 0) ; Method (_PIC, 1) { Store (Arg0, PICM) }
//! Scope (_SB) {
//!   Device (PC00) {                     // PNP0A03, _BBN, _CRS: bus range, 0xCF8/8,
//!     …                                 // legacy I/O, the I/O, MMIO32 and MMIO64 windows
//!     Name (APRT…) Name (PPRT…) Method (_PRT…)   // only with routed INTx pins
//!     Device (ISA) {                    // only with an LPC bridge; _ADR = slot << 16 | func
//!       Device (SIO)  PNP0C02           // reserved ports
//!       Device (COMn) PNP0501           // each LPC UART
//!       Device (RTC)  PNP0B00
//!       Device (PIC)  PNP0000
//!       Device (TIMR) PNP0100
//!     }
//!   }
//! }
//! ```
//!
//! Not included: the HPET device (no HPET is emulated), the PIRQ link devices (so the PIC-mode
//! routing table is empty; guests in APIC mode use `APRT`), and a PNP0C0C device: bhyve's power
//! button is the ACPI fixed-feature button (PWRBTN_STS in PM1), which is what
//! `PowerManagement::press_power_button` drives.

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, Arg, Device, EISAName, Else, If, Method, Name, Package,
    Path, ResourceTemplate, Return, Scope, Store, IO, ZERO,
};
use acpi_tables::{Aml, AmlSink};

use super::{AcpiLayout, LpcLayout};

/// Small IRQ descriptor without flags (ASL `IRQNoFlags () {n}`), as bhyve writes for ISA
/// devices; the crate only offers the extended form.
struct IrqNoFlags(u8);

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let mask = 1u16 << (self.0 & 0xf);
        sink.byte(0x22);
        sink.word(mask);
    }
}

/// ASL `IO (Decode16, base, base, 1, len)`.
fn fixed_io(base: u16, len: u8) -> IO {
    IO::new(base, base, 1, len)
}

fn isa_device(name: &str, hid: &str, uid: Option<u8>, resources: Vec<&dyn Aml>) -> Vec<u8> {
    let hid = EISAName::new(hid);
    let hid = Name::new("_HID".into(), &hid);
    let crs = ResourceTemplate::new(resources);
    let crs = Name::new("_CRS".into(), &crs);
    let uid_value = uid.unwrap_or(0);
    let uid = uid.map(|_| Name::new("_UID".into(), &uid_value));
    let mut children: Vec<&dyn Aml> = vec![&hid];
    if let Some(uid) = &uid {
        children.push(uid);
    }
    children.push(&crs);
    let mut out = Vec::new();
    Device::new(Path::new(&padded(name)), children).to_aml_bytes(&mut out);
    out
}

/// ASL pads name segments shorter than four characters with underscores.
fn padded(name: &str) -> String {
    format!("{name:_<4}")
}

/// Pre-serialised AML bytes used as a child.
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

fn lpc_device(layout: &AcpiLayout, lpc: &LpcLayout) -> Vec<u8> {
    let adr = (u32::from(lpc.slot) << 16) | u32::from(lpc.func);
    let adr = Name::new("_ADR".into(), &adr);

    let sysres_io: Vec<IO> = layout
        .reserved_io
        .iter()
        .map(|&(base, len)| fixed_io(base, len))
        .collect();
    let sio = Raw(isa_device(
        "SIO",
        "PNP0C02",
        None,
        sysres_io.iter().map(|r| r as &dyn Aml).collect(),
    ));

    let mut coms = Vec::new();
    for com in &lpc.com_ports {
        let io = fixed_io(com.io_base, 8);
        let irq = IrqNoFlags(com.irq);
        coms.push(Raw(isa_device(
            &format!("COM{}", com.unit),
            "PNP0501",
            Some(com.unit),
            vec![&io, &irq],
        )));
    }

    let rtc_io = fixed_io(crate::devices::rtc::IO_RTC, 2);
    let rtc_irq = IrqNoFlags(crate::devices::rtc::RTC_IRQ as u8);
    let rtc = Raw(isa_device("RTC", "PNP0B00", None, vec![&rtc_io, &rtc_irq]));

    let pic1 = fixed_io(0x20, 2);
    let pic2 = fixed_io(0xa0, 2);
    let pic_irq = IrqNoFlags(2);
    let pic = Raw(isa_device(
        "PIC",
        "PNP0000",
        None,
        vec![&pic1, &pic2, &pic_irq],
    ));

    let timer_io = fixed_io(0x40, 4);
    let timer_irq = IrqNoFlags(0);
    let timer = Raw(isa_device(
        "TIMR",
        "PNP0100",
        None,
        vec![&timer_io, &timer_irq],
    ));

    let mut children: Vec<&dyn Aml> = vec![&adr, &sio];
    children.extend(coms.iter().map(|c| c as &dyn Aml));
    children.push(&rtc);
    children.push(&pic);
    children.push(&timer);
    let mut out = Vec::new();
    Device::new(Path::new(&padded("ISA")), children).to_aml_bytes(&mut out);
    out
}

fn routing_tables(layout: &AcpiLayout) -> Vec<u8> {
    let mut out = Vec::new();
    if layout.pci_intx.is_empty() {
        return out;
    }
    let addresses: Vec<u32> = layout
        .pci_intx
        .iter()
        .map(|r| (u32::from(r.slot) << 16) | 0xffff)
        .collect();
    let pins: Vec<u8> = layout.pci_intx.iter().map(|r| r.pin - 1).collect();
    let irqs: Vec<u32> = layout
        .pci_intx
        .iter()
        .map(|r| u32::from(r.ioapic_irq))
        .collect();
    let entries: Vec<Package> = (0..layout.pci_intx.len())
        .map(|i| Package::new(vec![&addresses[i], &pins[i], &ZERO, &irqs[i]]))
        .collect();
    let aprt = Package::new(entries.iter().map(|p| p as &dyn Aml).collect());
    Name::new("APRT".into(), &aprt).to_aml_bytes(&mut out);
    // The PIC-mode table would name PIRQ link devices, which are not provided.
    Name::new("PPRT".into(), &Package::new(vec![])).to_aml_bytes(&mut out);
    let picm = Path::new("PICM");
    let aprt_path = Path::new("APRT");
    let pprt_path = Path::new("PPRT");
    let ret_a = Return::new(&aprt_path);
    let ret_p = Return::new(&pprt_path);
    Method::new(
        "_PRT".into(),
        0,
        false,
        vec![&If::new(&picm, vec![&ret_a]), &Else::new(vec![&ret_p])],
    )
    .to_aml_bytes(&mut out);
    out
}

fn pci_root(layout: &AcpiLayout) -> Vec<u8> {
    let hid = EISAName::new("PNP0A03");
    let hid = Name::new("_HID".into(), &hid);
    let bbn_value = u32::from(layout.pci_bus_range.0);
    let bbn_ret = Return::new(&bbn_value);
    let bbn = Method::new("_BBN".into(), 0, false, vec![&bbn_ret]);

    let bus = AddressSpace::<u16>::new_bus_number(
        layout.pci_bus_range.0.into(),
        layout.pci_bus_range.1.into(),
    );
    let cfg_ports = fixed_io(0xcf8, 8);
    let legacy_low = AddressSpace::<u16>::new_io(0, 0xcf7, None);
    // The window was checked to lie in 0xD01..=0x10000.
    let io_base = layout.pci_io.base as u16;
    let io_last = layout.pci_io.last() as u16;
    let legacy_high = AddressSpace::<u16>::new_io(0xd00, io_base - 1, None);
    let io = AddressSpace::<u16>::new_io(io_base, io_last, None);
    let mmio32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        layout.pci_mmio32.base,
        layout.pci_mmio32.last(),
        None,
    );
    let mmio64 = AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        layout.pci_mmio64.base,
        layout.pci_mmio64.last(),
        None,
    );
    let crs = ResourceTemplate::new(vec![
        &bus,
        &cfg_ports,
        &legacy_low,
        &legacy_high,
        &io,
        &mmio32,
        &mmio64,
    ]);
    let crs = Name::new("_CRS".into(), &crs);
    let prt = Raw(routing_tables(layout));
    let isa = layout.lpc.as_ref().map(|lpc| Raw(lpc_device(layout, lpc)));

    let mut children: Vec<&dyn Aml> = vec![&hid, &bbn, &crs, &prt];
    if let Some(isa) = &isa {
        children.push(isa);
    }
    let mut out = Vec::new();
    Device::new("PC00".into(), children).to_aml_bytes(&mut out);
    out
}

/// The AML body of the DSDT (everything after the 36-byte header).
pub(super) fn dsdt_body(layout: &AcpiLayout) -> Vec<u8> {
    let mut out = Vec::new();
    let s5_type = u8::try_from(crate::devices::pm::SLP_TYP_S5).unwrap_or(5);
    Name::new("_S5_".into(), &Package::new(vec![&s5_type, &ZERO])).to_aml_bytes(&mut out);
    Name::new("PICM".into(), &ZERO).to_aml_bytes(&mut out);
    let picm = Path::new("PICM");
    Method::new("_PIC".into(), 1, false, vec![&Store::new(&picm, &Arg(0))]).to_aml_bytes(&mut out);
    let root = Raw(pci_root(layout));
    Scope::new("_SB_".into(), vec![&root]).to_aml_bytes(&mut out);
    out
}
