//! The firmware tables a guest finds in memory, built from the machine's devices: ACPI (RSDP,
//! XSDT, FADT, MADT, HPET, MCFG, DSDT, …) and the MP table, as bhyve writes them before the
//! guest starts.

use crate::config::Config;
use crate::description::Topology;
use crate::devices::Devices;
use crate::memory::GuestMemory;

/// Why the tables could not be written; the text is the one-line message.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FirmwareError(String);

/// Write the firmware tables into guest memory (ACPI unless `acpi_tables=false`, the MP
/// table unless `x86.mptable=false`), describing the vCPUs and the devices as attached.
pub fn write_tables(
    config: &Config,
    topology: &Topology,
    memory: &GuestMemory,
    devices: &Devices,
) -> Result<(), FirmwareError> {
    let cpus = u32::from(topology.cpus);
    let lpc = devices.lpc();
    // Routed INTx pins, for the DSDT's _PRT and the MP table.
    let pci_intx: Vec<crate::mptable::PciIntxRoute> = devices
        .pci()
        .into_iter()
        .flat_map(|root| root.intx_routes())
        .map(|r| crate::mptable::PciIntxRoute {
            bus: r.bus,
            slot: r.slot,
            pin: r.pin,
            ioapic_irq: r.route.ioapic_irq,
            pirq_pin: r.route.pirq_pin,
        })
        .collect();
    if crate::acpi::acpi_tables_enabled(config).map_err(FirmwareError)? {
        let mut layout =
            crate::acpi::AcpiLayout::bhyve(cpus, memory.lowmem_end(), memory.highmem_size());
        layout.pci_intx = pci_intx.clone();
        layout.lpc = lpc.map(|address| crate::acpi::LpcLayout {
            slot: address.slot,
            func: address.function,
            com_ports: crate::acpi::ComPort::BHYVE.to_vec(),
        });
        // The windows bus 0 really decodes, as bhyve's pci_bus_write_dsdt writes them.
        if let Some(windows) = devices.pci().and_then(|root| root.bus_windows(0)) {
            layout.pci_io = crate::acpi::Window {
                base: windows.io.0 as u32,
                end: windows.io.1 as u32,
            };
            layout.pci_mmio32 = crate::acpi::Window {
                base: windows.mem32.0 as u32,
                end: windows.mem32.1 as u32,
            };
            layout.pci_mmio64 = crate::acpi::Window {
                base: windows.mem64.0,
                end: windows.mem64.1,
            };
        }
        let blob = crate::acpi::build_tables(&layout)
            .map_err(|e| FirmwareError(format!("ACPI tables: {e}")))?;
        memory
            .write(blob.gpa, &blob.bytes)
            .map_err(|e| FirmwareError(format!("ACPI tables: {e}")))?;
    }
    if crate::mptable::mptable_enabled(config).map_err(FirmwareError)? {
        let cpus =
            u16::try_from(cpus).map_err(|_| FirmwareError(format!("MP table: {cpus} vCPUs")))?;
        let mut layout = crate::mptable::MpTableLayout::new(cpus);
        layout.pci_intx = pci_intx;
        let table = crate::mptable::build_mptable(&layout, crate::mptable::MPTABLE_BASE as u32)
            .map_err(|e| FirmwareError(format!("MP table: {e}")))?;
        memory
            .write(crate::mptable::MPTABLE_BASE, &table)
            .map_err(|e| FirmwareError(format!("MP table: {e}")))?;
    }
    Ok(())
}
