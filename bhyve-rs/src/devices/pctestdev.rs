//! `pc-testdev` (`-l pc-testdev`, key `lpc.pc-testdev`): the legacy test interfaces
//! kvm-unit-tests expects, as bhyve's `pctestdev.c` provides them:
//!
//! - `isa-debug-exit` at ports 0xF4-0xF7: writing V ends the VM with exit status `(V << 1) | 1`
//!   (read: 0), as QEMU's `isa-debug-exit` does. bhyve calls `exit()` from the device; here the
//!   device asks the VM to end ([`ExitReason::DebugExit`]), so the machine is torn down first.
//! - a 32-bit scratch register at ports 0xE0-0xE3, accessible at any width and offset;
//! - IRQ lines at ports 0x2000 + N (one per I/O APIC pin): a byte write drives line N;
//! - 64 KiB of scratch memory at 0xFF00_0000.

use std::sync::{Arc, Mutex};

use crate::bus::{BusDevice, BusError, Buses};
use crate::devices::registry::{CreatePlatform, PlatformDevice, PlatformPlan};
use crate::devices::{DeviceError, StateId, Stateful};
use crate::interrupts::InterruptSink;
use crate::lifecycle::{ExitReason, RequestExit};

pub const DEVICE: PlatformDevice = PlatformDevice {
    name: "pc-testdev",
    plan,
};

/// `lpc.pc-testdev`, behind an LPC bridge.
fn plan(plan: &mut PlatformPlan<'_>) -> Result<Option<CreatePlatform>, DeviceError> {
    const KEY: &str = "lpc.pc-testdev";
    let wanted = plan
        .config
        .get_bool(KEY)
        .map_err(|_| DeviceError::InvalidValue {
            key: KEY.into(),
            value: plan.config.get(KEY).unwrap_or_default().into(),
        })?
        .unwrap_or(false);
    if !wanted {
        return Ok(None);
    }
    if plan.lpc.is_none() {
        plan.ignored
            .push(format!("{KEY} ignored: no lpc device is configured"));
        return Ok(None);
    }
    Ok(Some(Box::new(|create| {
        let testdev = attach(
            create.buses,
            create.interrupts.clone(),
            create.control.clone(),
        )
        .map_err(|(base, source)| DeviceError::PcTestDev { base, source })?;
        Ok(vec![Arc::new(testdev) as Arc<dyn Stateful>])
    })))
}

pub const DEBUGEXIT_BASE: u64 = 0xf4;
pub const DEBUGEXIT_LEN: u64 = 4;
pub const IOPORT_BASE: u64 = 0xe0;
pub const IOPORT_LEN: u64 = 4;
pub const IRQ_BASE: u64 = 0x2000;
/// I/O APIC pins of the KVM and bhyve interrupt controllers.
pub const IOAPIC_PINS: u64 = 24;
pub const IOMEM_BASE: u64 = 0xff00_0000;
pub const IOMEM_LEN: u64 = 0x10000;

fn read_le(data: &[u8]) -> u32 {
    let mut bytes = [0u8; 4];
    for (dst, src) in bytes.iter_mut().zip(data) {
        *dst = *src;
    }
    u32::from_le_bytes(bytes)
}

struct DebugExit {
    control: Arc<dyn RequestExit>,
}

impl BusDevice for DebugExit {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        let value = read_le(data);
        log::info!("pc-testdev: guest requested exit with value {value:#x}");
        // The status wraps as QEMU's `exit((val << 1) | 1)` does; the OS keeps its low byte.
        let status = (value << 1) | 1;
        self.control
            .request_exit(ExitReason::DebugExit(status as i32));
    }
}

/// The 32-bit scratch register.
struct IoPort {
    data: u32,
}

impl BusDevice for IoPort {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let bytes = self.data.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(offset as usize + i).copied().unwrap_or(0xff);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let mut bytes = self.data.to_le_bytes();
        for (i, b) in data.iter().enumerate() {
            if let Some(dst) = bytes.get_mut(offset as usize + i) {
                *dst = *b;
            }
        }
        self.data = u32::from_le_bytes(bytes);
    }
}

struct IrqLines {
    sink: Arc<dyn InterruptSink>,
}

impl BusDevice for IrqLines {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        // Only byte writes drive a line, as in bhyve.
        if let [level] = data {
            let gsi = offset as u32;
            if let Err(e) = self.sink.set_irq_line(gsi, *level != 0) {
                log::warn!("pc-testdev: cannot set IRQ {gsi}: {e}");
            }
        }
    }
}

struct IoMem {
    buffer: Vec<u8>,
}

impl BusDevice for IoMem {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let start = offset as usize;
        match self.buffer.get(start..start + data.len()) {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let start = offset as usize;
        if let Some(dst) = self.buffer.get_mut(start..start + data.len()) {
            dst.copy_from_slice(data);
        }
    }
}

/// The parts of pc-testdev that remember what the guest wrote: the scratch register and the
/// scratch memory. (The debug exit ends the VM; the IRQ lines keep no state of their own,
/// their level lives in the interrupt controllers.)
#[cfg_attr(not(feature = "bhyve_snapshot"), allow(dead_code))] // read by snapshots only
pub struct PcTestDev {
    scratch: Arc<Mutex<IoPort>>,
    memory: Arc<Mutex<IoMem>>,
}

#[cfg(feature = "bhyve_snapshot")]
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PcTestDevState {
    pub scratch: u32,
    /// The 64 KiB at [`IOMEM_BASE`].
    pub memory: Vec<u8>,
}

#[cfg(feature = "bhyve_snapshot")]
impl PcTestDev {
    pub fn state(&self) -> PcTestDevState {
        PcTestDevState {
            scratch: self.scratch.lock().unwrap_or_else(|e| e.into_inner()).data,
            memory: self
                .memory
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .buffer
                .clone(),
        }
    }

    pub fn restore(&self, state: &PcTestDevState) -> Result<(), String> {
        if state.memory.len() != IOMEM_LEN as usize {
            return Err(format!(
                "pc-testdev: {} bytes of scratch memory, expected {IOMEM_LEN}",
                state.memory.len()
            ));
        }
        self.scratch.lock().unwrap_or_else(|e| e.into_inner()).data = state.scratch;
        self.memory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .buffer
            .copy_from_slice(&state.memory);
        Ok(())
    }
}

/// Its ranges need no pause: only the guest writes them.
impl Stateful for PcTestDev {
    fn id(&self) -> StateId {
        StateId::single("pctestdev")
    }
}

#[cfg(feature = "bhyve_snapshot")]
impl crate::devices::Persist for PcTestDev {
    fn state_version(&self) -> u32 {
        1
    }

    fn save(&self) -> Result<Vec<u8>, String> {
        crate::snapshot::encode_section(&self.state()).map_err(|e| e.to_string())
    }

    fn restore(&self, section: &crate::snapshot::Section<'_>) -> Result<(), String> {
        PcTestDev::restore(self, &section.decode().map_err(|e| e.to_string())?)
    }
}

/// Put the pc-testdev ranges on `buses`.
pub fn attach(
    buses: &Buses,
    interrupts: Arc<dyn InterruptSink>,
    control: Arc<dyn RequestExit>,
) -> Result<PcTestDev, (u64, BusError)> {
    let scratch = Arc::new(Mutex::new(IoPort { data: 0 }));
    let memory = Arc::new(Mutex::new(IoMem {
        buffer: vec![0; IOMEM_LEN as usize],
    }));
    let at = |base: u64| move |e| (base, e);
    buses
        .pio
        .insert(
            DEBUGEXIT_BASE,
            DEBUGEXIT_LEN,
            Arc::new(Mutex::new(DebugExit { control })),
        )
        .map_err(at(DEBUGEXIT_BASE))?;
    buses
        .pio
        .insert(IOPORT_BASE, IOPORT_LEN, scratch.clone())
        .map_err(at(IOPORT_BASE))?;
    buses
        .pio
        .insert(
            IRQ_BASE,
            IOAPIC_PINS,
            Arc::new(Mutex::new(IrqLines { sink: interrupts })),
        )
        .map_err(at(IRQ_BASE))?;
    buses
        .mmio
        .insert(IOMEM_BASE, IOMEM_LEN, memory.clone())
        .map_err(at(IOMEM_BASE))?;
    Ok(PcTestDev { scratch, memory })
}
