use super::*;

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// A guest's view: find the RSDP by scanning, follow the XSDT, check every table.
struct Parsed<'a> {
    tables: Vec<(&'a [u8], u64)>,
}

fn parse(blob: &AcpiBlob) -> Parsed<'_> {
    let mem = |gpa: u64| -> &[u8] {
        let off = (gpa - blob.gpa) as usize;
        &blob.bytes[off..]
    };
    // Scan 0xE0000..0x100000 on 16-byte boundaries, as a BIOS-era guest does.
    let rsdp_gpa = (0xe0000u64..0x100000)
        .step_by(16)
        .find(|&a| {
            a >= blob.gpa
                && a + 8 <= blob.gpa + blob.bytes.len() as u64
                && &mem(a)[..8] == b"RSD PTR "
        })
        .expect("RSDP found by scanning the BIOS area");
    let rsdp = &mem(rsdp_gpa)[..36];
    assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
    assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
    assert_eq!(rsdp[15], 2, "RSDP revision");

    let check = |gpa: u64, sig: &[u8; 4]| -> &[u8] {
        let t = mem(gpa);
        assert_eq!(&t[..4], sig);
        let len = u32_at(t, 4) as usize;
        assert!(len >= 36 && len <= t.len(), "{sig:?} length {len}");
        let t = &t[..len];
        assert_eq!(sum(t), 0, "{} checksum", String::from_utf8_lossy(sig));
        t
    };
    let rsdt = check(u32_at(rsdp, 16).into(), b"RSDT");
    let xsdt = check(u64_at(rsdp, 24), b"XSDT");
    let xentries: Vec<u64> = (36..xsdt.len())
        .step_by(8)
        .map(|o| u64_at(xsdt, o))
        .collect();
    let rentries: Vec<u64> = (36..rsdt.len())
        .step_by(4)
        .map(|o| u64::from(u32_at(rsdt, o)))
        .collect();
    assert_eq!(xentries, rentries, "RSDT and XSDT list the same tables");
    let mut tables = Vec::new();
    for gpa in xentries {
        let sig: [u8; 4] = mem(gpa)[..4].try_into().unwrap();
        tables.push((check(gpa, &sig), gpa));
    }
    let fadt = tables[0].0;
    assert_eq!(&fadt[..4], b"FACP", "FADT is the first XSDT entry");
    let facs = mem(u64_at(fadt, 132));
    assert_eq!(&facs[..4], b"FACS");
    assert_eq!(u64_at(fadt, 132) % 64, 0, "FACS 64-byte aligned");
    let dsdt_gpa = u64_at(fadt, 140);
    assert_eq!(u64::from(u32_at(fadt, 40)), dsdt_gpa);
    tables.push((check(dsdt_gpa, b"DSDT"), dsdt_gpa));
    Parsed { tables }
}

impl Parsed<'_> {
    fn get(&self, sig: &[u8; 4]) -> &[u8] {
        self.tables
            .iter()
            .find(|(t, _)| &t[..4] == sig)
            .unwrap_or_else(|| panic!("{sig:?} present"))
            .0
    }
}

fn default_blob(cpus: u32) -> AcpiBlob {
    build_tables(&AcpiLayout::bhyve(cpus, 256 << 20, 0)).unwrap()
}

#[test]
fn guest_finds_every_table_with_valid_checksums() {
    let blob = default_blob(2);
    assert_eq!(blob.gpa, BHYVE_ACPI_BASE);
    let parsed = parse(&blob);
    let sigs: Vec<&[u8]> = parsed.tables.iter().map(|(t, _)| &t[..4]).collect();
    assert_eq!(
        sigs,
        vec![&b"FACP"[..], b"APIC", b"HPET", b"MCFG", b"SPCR", b"DSDT"]
    );
    for (_, gpa) in &parsed.tables {
        assert_eq!(gpa % 16, 0, "table at {gpa:#x} aligned");
    }
    assert!(blob.gpa + blob.bytes.len() as u64 <= 0x100000);
}

#[test]
fn madt_has_one_enabled_lapic_per_vcpu_and_bhyve_overrides() {
    for cpus in [1u32, 4, 16] {
        let blob = default_blob(cpus);
        let parsed = parse(&blob);
        let madt = parsed.get(b"APIC");
        assert_eq!(u32_at(madt, 36), 0xfee0_0000);
        let mut lapics = Vec::new();
        let mut ioapics = Vec::new();
        let mut overrides = Vec::new();
        let mut nmis = 0;
        let mut at = 44;
        while at < madt.len() {
            let (kind, len) = (madt[at], madt[at + 1] as usize);
            assert!(len >= 2 && at + len <= madt.len());
            let e = &madt[at..at + len];
            match kind {
                0 => lapics.push((e[2], e[3], u32_at(e, 4))),
                1 => ioapics.push((e[2], u32_at(e, 4), u32_at(e, 8))),
                2 => overrides.push((e[3], u32_at(e, 4), u16::from_le_bytes([e[8], e[9]]))),
                4 => {
                    assert_eq!((e[2], e[5]), (0xff, 1));
                    nmis += 1;
                }
                other => panic!("unexpected MADT entry {other}"),
            }
            at += len;
        }
        assert_eq!(lapics.len(), cpus as usize);
        for (i, (uid, id, flags)) in lapics.iter().enumerate() {
            assert_eq!((*uid as usize, *id as usize), (i, i));
            assert_eq!(flags & 1, 1, "enabled");
        }
        assert_eq!(ioapics, vec![(0, 0xfec0_0000, 0)]);
        assert_eq!(overrides, vec![(0, 2, 0x5), (9, 9, 0xf)]);
        assert_eq!(nmis, 1);
    }
}

#[test]
fn fadt_points_at_the_pm_registers_and_reset_register() {
    let blob = default_blob(1);
    let parsed = parse(&blob);
    let f = parsed.get(b"FACP");
    assert_eq!(f.len(), 276);
    assert_eq!((f[8], f[131]), (5, 1), "revision 5.1");
    assert_eq!(u16::from_le_bytes([f[46], f[47]]), 9, "SCI");
    assert_eq!(u32_at(f, 48), 0xb2);
    assert_eq!((f[52], f[53]), (0xa0, 0xa1));
    assert_eq!(u32_at(f, 56), 0x400);
    assert_eq!(u32_at(f, 64), 0x404);
    assert_eq!(u32_at(f, 76), 0x408);
    assert_eq!(u32_at(f, 80), 0x40c);
    assert_eq!((f[88], f[89], f[91], f[92]), (4, 2, 4, 2));
    assert_eq!(f[108], 0x32, "century index");
    let flags = u32_at(f, 112);
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    assert_ne!(flags & (1 << 8), 0, "32-bit PM timer");
    assert_eq!(flags & (1 << 20), 0, "not hardware reduced");
    assert_eq!(flags & (1 << 4), 0, "fixed-feature power button");
    assert_eq!(
        &f[116..120],
        &[1, 8, 0, 1],
        "reset register: I/O, 8 bits, byte"
    );
    assert_eq!(u64_at(f, 120), 0xcf9);
    assert_eq!(f[128], 6, "reset value");
    assert_eq!(u64_at(f, 148 + 4), 0x400);
    assert_eq!(u64_at(f, 172 + 4), 0x404);
    assert_eq!(u64_at(f, 208 + 4), 0x408);
}

#[test]
fn mcfg_describes_the_ecam_window() {
    let blob = default_blob(1);
    let parsed = parse(&blob);
    let m = parsed.get(b"MCFG");
    assert_eq!(m.len(), 36 + 8 + 16);
    assert_eq!(u64_at(m, 44), 0xe000_0000);
    assert_eq!((m[54], m[55]), (0, 255));
}

#[test]
fn bad_layouts_are_refused() {
    let mut l = AcpiLayout::bhyve(1, 256 << 20, 0);
    l.apic_ids.clear();
    assert_eq!(build_tables(&l), Err(AcpiError::NoCpus));
    let mut l = AcpiLayout::bhyve(1, 256 << 20, 0);
    l.apic_ids = vec![0, 300];
    assert_eq!(build_tables(&l), Err(AcpiError::ApicId(300)));
    let mut l = AcpiLayout::bhyve(1, 256 << 20, 0);
    l.base = 0xf2408;
    assert_eq!(build_tables(&l), Err(AcpiError::Unaligned(0xf2408)));
    let mut l = AcpiLayout::bhyve(1, 256 << 20, 0);
    l.base = 0xffff0;
    assert!(matches!(build_tables(&l), Err(AcpiError::TooLarge { .. })));
    let mut l = AcpiLayout::bhyve(1, 256 << 20, 0);
    l.pci_io.end = 0x10001;
    assert_eq!(build_tables(&l), Err(AcpiError::Window("PCI I/O")));
}

/// Whether a missing iasl fails the test instead of skipping it: under CI (`CI` set to anything
/// but "" or "0") and wherever `BHYVE_RS_REQUIRE_KVM=1` asks for the full test run.
fn iasl_required(ci: Option<&str>, require_kvm: Option<&str>) -> bool {
    ci.is_some_and(|v| !v.is_empty() && v != "0") || require_kvm == Some("1")
}

#[test]
fn a_missing_iasl_fails_under_ci_or_a_full_test_run() {
    assert!(!iasl_required(None, None));
    assert!(!iasl_required(Some(""), Some("0")));
    assert!(!iasl_required(Some("0"), None));
    assert!(iasl_required(Some("true"), None));
    assert!(iasl_required(None, Some("1")));
}

/// Disassemble `table` with iasl and return the .dsl text; `None` (with a message) when iasl
/// is missing and [`iasl_required`] says that may be skipped.
fn iasl_disassemble(name: &str, table: &[u8]) -> Option<String> {
    let dir = std::env::temp_dir().join(format!(
        "bhyve-acpi-{}-{}-{name}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let aml = dir.join(format!("{name}.dat"));
    std::fs::write(&aml, table).unwrap();
    let output = match std::process::Command::new("iasl")
        .arg("-d")
        .arg(&aml)
        .current_dir(&dir)
        .output()
    {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let _ = std::fs::remove_dir_all(&dir);
            let ci = std::env::var("CI").ok();
            let require_kvm = std::env::var("BHYVE_RS_REQUIRE_KVM").ok();
            if iasl_required(ci.as_deref(), require_kvm.as_deref()) {
                panic!(
                    "iasl not installed (acpica-tools) but CI or BHYVE_RS_REQUIRE_KVM=1 \
                     requires validating {name} with it"
                );
            }
            eprintln!("SKIP: iasl not installed (acpica-tools); not validating {name}");
            return None;
        }
        Err(e) => panic!("cannot run iasl: {e}"),
    };
    let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl")));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        output.status.success(),
        "iasl -d {name} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Some(dsl.expect("iasl wrote a .dsl file"))
}

#[test]
fn iasl_disassembles_the_dsdt_with_the_expected_devices() {
    let mut layout = AcpiLayout::bhyve(2, 256 << 20, 0);
    layout.pci_intx.push(PciIntxRoute {
        bus: 0,
        slot: 3,
        pin: 1,
        ioapic_irq: 16,
        pirq_pin: 1,
    });
    let blob = build_tables(&layout).unwrap();
    let Some(dsl) = iasl_disassemble("dsdt", blob.table(b"DSDT").unwrap()) else {
        return;
    };
    for needle in [
        "Name (_S5, Package",
        "Device (PC00)",
        "PNP0A03",
        "Method (_PRT",
        "Device (ISA)",
        "Device (COM1)",
        "Device (COM4)",
        "PNP0501",
        "0x03F8",
        "IRQNoFlags ()\n",
        "PNP0B00",
        "PNP0C02",
        // ECAM reserved as a motherboard resource: Memory32Fixed (ReadWrite, base, length).
        "Memory32Fixed (ReadWrite,\n                            0xE0000000,         // Address Base\n                            0x10000000,         // Address Length",
        "WordBusNumber",
        "QWordMemory",
        "0xC0000000",
    ] {
        assert!(dsl.contains(needle), "DSDT lacks {needle:?}:\n{dsl}");
    }
}

#[test]
fn iasl_accepts_every_other_table() {
    let blob = default_blob(4);
    for (sig, name) in [
        (b"FACP", "facp"),
        (b"APIC", "apic"),
        (b"HPET", "hpet"),
        (b"MCFG", "mcfg"),
        (b"SPCR", "spcr"),
        (b"FACS", "facs"),
        (b"XSDT", "xsdt"),
        (b"RSDT", "rsdt"),
    ] {
        let Some(dsl) = iasl_disassemble(name, blob.table(sig).unwrap()) else {
            return;
        };
        assert!(
            !dsl.contains("**** Unknown") && !dsl.contains("Invalid"),
            "{name}:\n{dsl}"
        );
    }
}

#[test]
fn tables_are_on_unless_configured_off() {
    let mut config = Config::new();
    assert_eq!(acpi_tables_enabled(&config), Ok(true));
    config.set("acpi_tables", "false");
    assert_eq!(acpi_tables_enabled(&config), Ok(false));
}

/// The DSDT a VM gets from `devices::attach` and `firmware::write_tables`, found in guest
/// memory as a guest would.
fn dsdt_of_attached_vm(pairs: &[(&str, &str)]) -> Vec<u8> {
    struct NoInterrupts;
    impl crate::interrupts::InterruptSink for NoInterrupts {
        fn set_irq_line(&self, _gsi: u32, _high: bool) -> std::io::Result<()> {
            Ok(())
        }
        fn signal_msi(&self, _address: u64, _data: u32) -> std::io::Result<()> {
            Ok(())
        }
        fn set_isa_irq_trigger(&self, _irq: u8, _level: bool) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut config = Config::new();
    for (k, v) in pairs {
        config.set(k, v);
    }
    let memory = std::sync::Arc::new(crate::memory::GuestMemory::new(16 << 20).unwrap());
    let buses = std::sync::Arc::new(crate::bus::Buses::default());
    let devices = crate::devices::attach(
        &config,
        &crate::vmm::PlatformCaps::KVM,
        &buses,
        std::sync::Arc::new(NoInterrupts),
        crate::vcpu::VmControl::new(),
        memory.clone(),
    )
    .unwrap();
    let topology = crate::description::topology(&config).unwrap();
    crate::firmware::write_tables(&config, &topology, &memory, &devices).unwrap();
    let mut area = vec![0u8; (BIOS_AREA_END - BHYVE_ACPI_BASE) as usize];
    memory.read(BHYVE_ACPI_BASE, &mut area).unwrap();
    let start = (0..area.len())
        .step_by(TABLE_ALIGNMENT)
        .find(|&at| area[at..].starts_with(b"DSDT"))
        .expect("a DSDT in the ACPI area");
    let length = u32_at(&area, start + 4) as usize;
    area[start..start + length].to_vec()
}

#[test]
fn the_dsdt_routes_the_pins_the_pci_bus_assigned_and_decodes_its_windows() {
    let dsdt = dsdt_of_attached_vm(&[
        ("pci.0.0.0.device", "hostbridge"),
        ("pci.0.3.0.device", "dummy"),
        ("pci.0.3.1.device", "dummy"),
        ("pci.0.4.0.device", "dummy"),
        ("pci.0.31.0.device", "lpc"),
    ]);
    let Some(dsl) = iasl_disassemble("dsdt", &dsdt) else {
        return;
    };
    let squeezed: String = dsl.split_whitespace().collect::<Vec<_>>().join(" ");
    for needle in [
        // APIC mode: slot 3 INTA/INTB and slot 4 INTA on inputs 16, 17, 18.
        "Name (APRT, Package (0x03) { Package (0x04) { 0x0003FFFF, Zero, Zero, 0x10 }, \
         Package (0x04) { 0x0003FFFF, One, Zero, 0x11 }, \
         Package (0x04) { 0x0004FFFF, Zero, Zero, 0x12 } })",
        // PIC mode: through links A, B, C.
        "Name (PPRT, Package (0x03) { Package (0x04) { 0x0003FFFF, Zero, \\_SB.PC00.ISA.LNKA, Zero }, \
         Package (0x04) { 0x0003FFFF, One, \\_SB.PC00.ISA.LNKB, Zero }, \
         Package (0x04) { 0x0004FFFF, Zero, \\_SB.PC00.ISA.LNKC, Zero } })",
        "If (PICM) { Return (APRT)",
        "Else { Return (PPRT)",
        "PIRA = Local0--",
        "Device (LNKH)",
        "PNP0C0F",
        "IRQ (Level, ActiveLow, Shared, ) {3,4,5,6,7,9,10,11,12,14,15}",
        "PIRA, 8",
        "PIRH, 8",
        // Windows as allocated: three 8-byte I/O BARs, six 4 KiB memory BARs, plus slop.
        "0x2000, // Range Minimum 0x203F, // Range Maximum",
        "0xC0000000, // Range Minimum 0xC01FFFFF, // Range Maximum",
    ] {
        assert!(squeezed.contains(needle), "DSDT lacks {needle:?}:\n{dsl}");
    }
}

#[test]
fn the_hpet_table_is_bhyves_and_iasl_reads_it() {
    let blob = default_blob(1);
    let hpet = blob.table(b"HPET").unwrap();
    // Header, hardware id, GAS, sequence, minimum tick, flags: 56 bytes, revision 1.
    assert_eq!(hpet.len(), 56);
    assert_eq!(u32_at(hpet, 4), 56);
    assert_eq!(hpet[8], 1);
    assert_eq!(&hpet[16..24], b"BVHPET  ");
    assert_eq!(sum(hpet), 0);
    // The low half of the capabilities register: vendor 8086, 8 timers, revision 1.
    assert_eq!(u32_at(hpet, 36), 0x8086_0701);
    assert_eq!(
        u32_at(hpet, 36),
        crate::devices::hpet::capabilities() as u32
    );
    assert_eq!(&hpet[40..44], &[0, 0, 0, 0], "system memory, widths 0");
    assert_eq!(u64_at(hpet, 44), 0xfed0_0000);
    assert_eq!(hpet[52], 0);
    assert_eq!(u16::from_le_bytes([hpet[53], hpet[54]]), 0);
    assert_eq!(hpet[55], 1, "4 KiB page protected");
    // Without an HPET there is neither table nor DSDT device.
    let mut layout = AcpiLayout::bhyve(1, 256 << 20, 0);
    layout.hpet_id = None;
    let without = build_tables(&layout).unwrap();
    assert!(without.table(b"HPET").is_none());
    assert_eq!(parse(&without).tables.len(), 5);

    let Some(dsl) = iasl_disassemble("hpet", hpet) else {
        return;
    };
    for needle in [
        "Signature : \"HPET\"",
        "Hardware Block ID : 80860701",
        "Address : 00000000FED00000",
        "Sequence Number : 00",
        "Minimum Clock Ticks : 0000",
        "Flags (decoded below) : 01",
        "4K Page Protect : 1",
    ] {
        assert!(
            dsl.split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .contains(needle),
            "HPET lacks {needle:?}:\n{dsl}"
        );
    }
}

#[test]
fn iasl_finds_the_hpet_device_in_the_dsdt() {
    let blob = default_blob(1);
    let Some(dsl) = iasl_disassemble("dsdt", blob.table(b"DSDT").unwrap()) else {
        return;
    };
    let flat = dsl.split_whitespace().collect::<Vec<_>>().join(" ");
    for needle in [
        "Scope (_SB.PC00) { Device (HPET) { Name (_HID, EisaId (\"PNP0103\")",
        "Name (_UID, Zero)",
        "Memory32Fixed (ReadWrite, 0xFED00000, // Address Base 0x00000400, // Address Length )",
    ] {
        assert!(flat.contains(needle), "DSDT lacks {needle:?}:\n{dsl}");
    }
}
