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
//!     Name (PPRT…) Name (APRT…) Method (_PRT…)   // only with routed INTx pins: PICM
//!                                       // picks APRT (I/O APIC inputs) or PPRT (PIRQ links)
//!     Device (ISA) {                    // only with an LPC bridge; _ADR = slot << 16 | func
//!       OperationRegion/Field PIRA-PIRH // the bridge's PIRQ registers
//!       Device (SIO)  PNP0C02           // reserved ports
//!       Device (COMn) PNP0501           // each LPC UART
//!       Device (RTC)  PNP0B00
//!       Method (PIRV), Device (LNKA…LNKH) PNP0C0F   // PIRQ links over PIRA-PIRH
//!       Device (PIC)  PNP0000
//!       Device (TIMR) PNP0100
//!     }
//!   }
//! }
//! Scope (_SB.PC00) {                    // only with an HPET (basl_fwrite_dsdt)
//!   Device (HPET) PNP0103, _UID 0, _CRS: Memory32Fixed 0xFED00000/0x400
//! }
//! ```
//!
//! Not included: a PNP0C0C device: bhyve's power
//! button is the ACPI fixed-feature button (PWRBTN_STS in PM1), which is what
//! `PowerManagement::press_power_button` drives.

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, And, Arg, Device, EISAName, Else, Equal, Field,
    FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If, LessThan, Local,
    Memory32Fixed, Method, Name, OpRegion, OpRegionSpace, Package, Path, ResourceTemplate, Return,
    Scope, ShiftLeft, Store, IO, ONE, ZERO,
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

/// ASL `IRQ (Level, ActiveLow, Shared, ) {irqs}`, as PIRQ links describe their IRQs.
struct SharedLevelIrq(u16);

impl Aml for SharedLevelIrq {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        const ACTIVE_LOW: u8 = 0x08;
        const SHARED: u8 = 0x10;
        sink.byte(0x23);
        sink.word(self.0);
        sink.byte(ACTIVE_LOW | SHARED);
    }
}

/// An AML operator the builder lacks: its opcode followed by its operands in order.
struct Op<'a>(u8, Vec<&'a dyn Aml>);

impl Aml for Op<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(self.0);
        for operand in &self.1 {
            operand.to_aml_bytes(sink);
        }
    }
}

const CREATE_WORD_FIELD_OP: u8 = 0x8b;
const FIND_SET_RIGHT_BIT_OP: u8 = 0x82;
const DECREMENT_OP: u8 = 0x76;

/// The PIRQ register fields of the LPC bridge's configuration space.
fn pirq_fields() -> Vec<u8> {
    let mut out = Vec::new();
    let (offset, length) = (ZERO, 0x100u32);
    OpRegion::new("LPCR".into(), OpRegionSpace::PCIConfig, &offset, &length).to_aml_bytes(&mut out);
    let named = |letter: u8| FieldEntry::Named([b'P', b'I', b'R', letter], 8);
    let mut fields = vec![FieldEntry::Reserved(0x60 * 8)];
    fields.extend((b'A'..=b'D').map(named));
    fields.push(FieldEntry::Reserved(4 * 8));
    fields.extend((b'E'..=b'H').map(named));
    Field::new(
        "LPCR".into(),
        FieldAccessType::Any,
        FieldLockRule::NoLock,
        FieldUpdateRule::Preserve,
        fields,
    )
    .to_aml_bytes(&mut out);
    out
}

/// `PIRV`: whether a PIRQ register value names a usable IRQ (mirrors `irq::pirq_valid`), and
/// the eight PNP0C0F link devices over PIRA-PIRH (bhyve's `pirq_dsdt`).
fn pirq_links() -> Vec<u8> {
    use crate::devices::pci::irq::{irq_permitted, NPIRQS, PIRQ_DIS, PIRQ_IRQ};
    let mut out = Vec::new();
    let (arg, local) = (Arg(0), Local(0));
    let (dis, mask) = (PIRQ_DIS, PIRQ_IRQ);
    let (three, eight, thirteen) = (3u8, 8u8, 13u8);
    let disabled = And::new(&ZERO, &arg, &dis);
    let irq = And::new(&local, &arg, &mask);
    let below_three = LessThan::new(&local, &three);
    let is_eight = Equal::new(&local, &eight);
    let is_thirteen = Equal::new(&local, &thirteen);
    let no = Return::new(&ZERO);
    let yes = Return::new(&ONE);
    Method::new(
        "PIRV".into(),
        1,
        false,
        vec![
            &If::new(&disabled, vec![&no]),
            &irq,
            &If::new(&below_three, vec![&no]),
            &If::new(&is_eight, vec![&no]),
            &If::new(&is_thirteen, vec![&no]),
            &yes,
        ],
    )
    .to_aml_bytes(&mut out);

    let permitted: u16 = (0..16u8)
        .filter(|&irq| irq_permitted(irq))
        .fold(0, |mask, irq| mask | (1 << irq));
    for index in 0..NPIRQS as u8 {
        let letter = (b'A' + index) as char;
        let uid = index + 1;
        let register = Path::new(&format!("PIR{letter}"));
        let buffer = Path::new(&format!("CB{uid:02X}"));
        let current = Path::new(&format!("CIR{letter}"));
        let hid = EISAName::new("PNP0C0F");
        let hid = Name::new("_HID".into(), &hid);
        let uid_name = Name::new("_UID".into(), &uid);

        let pirv_register = MethodCall1("PIRV", &register);
        let (present, absent) = (0x0bu8, 0x09u8);
        let ret_present = Return::new(&present);
        let ret_absent = Return::new(&absent);
        let sta_if = If::new(&pirv_register, vec![&ret_present]);
        let sta_else = Else::new(vec![&ret_absent]);
        let sta = Method::new("_STA".into(), 0, false, vec![&sta_if, &sta_else]);
        let possible = SharedLevelIrq(permitted);
        let prs = ResourceTemplate::new(vec![&possible]);
        let prs = Name::new("_PRS".into(), &prs);
        let none = SharedLevelIrq(0);
        let cb = ResourceTemplate::new(vec![&none]);
        let cb = Name::new(format!("CB{uid:02X}").as_str().into(), &cb);
        let one_byte = ONE;
        let cir = Op(CREATE_WORD_FIELD_OP, vec![&buffer, &one_byte, &current]);

        let both = PIRQ_DIS | PIRQ_IRQ;
        let read = And::new(&local, &register, &both);
        let pirv_local = MethodCall1("PIRV", &local);
        let shifted = ShiftLeft::new(&current, &ONE, &local);
        let cleared = Store::new(&current, &ZERO);
        let ret_buffer = Return::new(&buffer);
        let crs_if = If::new(&pirv_local, vec![&shifted]);
        let crs_else = Else::new(vec![&cleared]);
        let crs = Method::new(
            "_CRS".into(),
            0,
            false,
            vec![&read, &crs_if, &crs_else, &ret_buffer],
        );
        let disable = Store::new(&register, &dis);
        let dis_method = Method::new("_DIS".into(), 0, false, vec![&disable]);
        let setting = Path::new(&format!("SIR{letter}"));
        let create = Op(CREATE_WORD_FIELD_OP, vec![&arg, &one_byte, &setting]);
        let lowest = Op(FIND_SET_RIGHT_BIT_OP, vec![&setting, &local]);
        let decrement = Op(DECREMENT_OP, vec![&local]);
        let set = Store::new(&register, &decrement);
        let srs = Method::new("_SRS".into(), 1, false, vec![&create, &lowest, &set]);
        Device::new(
            Path::new(&format!("LNK{letter}")),
            vec![
                &hid,
                &uid_name,
                &sta,
                &prs,
                &cb,
                &cir,
                &crs,
                &dis_method,
                &srs,
            ],
        )
        .to_aml_bytes(&mut out);
    }
    out
}

/// A call of a one-argument method by name.
struct MethodCall1<'a>(&'a str, &'a dyn Aml);

impl Aml for MethodCall1<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        Path::new(self.0).to_aml_bytes(sink);
        self.1.to_aml_bytes(sink);
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
    // The ECAM window is a motherboard resource, as bhyve declares it (SYSRES_MEM in
    // pci_emul.c): an OS only trusts MMCONFIG space that the firmware reserves.
    let ecam = Memory32Fixed::new(
        true,
        crate::devices::pci::PCI_EMUL_ECFG_BASE as u32,
        crate::devices::pci::PCI_EMUL_ECFG_SIZE as u32,
    );
    let mut sysres: Vec<&dyn Aml> = sysres_io.iter().map(|r| r as &dyn Aml).collect();
    sysres.push(&ecam);
    let sio = Raw(isa_device("SIO", "PNP0C02", None, sysres));

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

    let fields = Raw(pirq_fields());
    let links = Raw(pirq_links());
    let mut children: Vec<&dyn Aml> = vec![&adr, &fields, &sio];
    children.extend(coms.iter().map(|c| c as &dyn Aml));
    children.push(&rtc);
    children.push(&links);
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
    // PIC mode: each pin through its PIRQ link, which exists only with an LPC bridge.
    let links: Vec<Path> = layout
        .pci_intx
        .iter()
        .map(|r| {
            let letter = (b'A' + r.pirq_pin.saturating_sub(1)) as char;
            Path::new(&format!("\\_SB_.PC00.ISA_.LNK{letter}"))
        })
        .collect();
    let pic_entries: Vec<Package> = if layout.lpc.is_some() {
        (0..layout.pci_intx.len())
            .map(|i| Package::new(vec![&addresses[i], &pins[i], &links[i], &ZERO]))
            .collect()
    } else {
        Vec::new()
    };
    let pprt = Package::new(pic_entries.iter().map(|p| p as &dyn Aml).collect());
    Name::new("PPRT".into(), &pprt).to_aml_bytes(&mut out);
    let entries: Vec<Package> = (0..layout.pci_intx.len())
        .map(|i| Package::new(vec![&addresses[i], &pins[i], &ZERO, &irqs[i]]))
        .collect();
    let aprt = Package::new(entries.iter().map(|p| p as &dyn Aml).collect());
    Name::new("APRT".into(), &aprt).to_aml_bytes(&mut out);
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
    if layout.hpet_id.is_some() {
        let block = Memory32Fixed::new(
            true,
            super::BHYVE_ADDRESS_HPET,
            crate::devices::hpet::HPET_SIZE as u32,
        );
        let hpet = Raw(isa_device("HPET", "PNP0103", Some(0), vec![&block]));
        Scope::new("_SB_.PC00".into(), vec![&hpet]).to_aml_bytes(&mut out);
    }
    out
}
