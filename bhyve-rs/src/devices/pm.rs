//! ACPI fixed-hardware power management: the PM1a event and control blocks, the PM timer, the
//! GPE0 block, the SMI command port that switches ACPI mode on, and the 0xCF9 reset control
//! register.
//!
//! Ports (all port I/O), as FreeBSD's `usr.sbin/bhyve/acpi.h` and `amd64/pm.c` place them:
//!
//! | port          | width | register                                    |
//! |---------------|-------|---------------------------------------------|
//! | 0x400         | 2     | PM1a_STS (write 1 to clear)                 |
//! | 0x402         | 2     | PM1a_EN                                     |
//! | 0x404         | 2     | PM1a_CNT (SCI_EN, SLP_TYP, SLP_EN)          |
//! | 0x408         | 4     | PM timer, 32 bits, 3.579545 MHz, read only  |
//! | 0x40C         | 1     | GPE0_STS (write 1 to clear)                 |
//! | 0x40D         | 1     | GPE0_EN                                     |
//! | 0xB2          | 1     | SMI_CMD: 0xA0 enables ACPI, 0xA1 disables   |
//! | 0xCF9         | 1     | reset control: bit 2 set requests a reset   |
//!
//! Accesses of any other width are ignored (reads return all ones), as bhyve refuses them.
//! The SCI is level triggered on IRQ 9 ([`SCI_INT`]); it is driven high while any enabled
//! status bit is set. Writing SLP_EN with SLP_TYP = 5 (the `_S5` value in the DSDT) asks for a
//! power-off; a write with bit 2 set to 0xCF9 asks for a reset (bhyve treats hard and soft
//! resets alike). bhyve's timer lives in the kernel (`sys/amd64/vmm/io/vpmtmr.c`); this one
//! counts from the moment the device is created.
//!
//! SIGTERM: bhyve turns SIGTERM into a power-button press only once the guest has enabled ACPI
//! through SMI_CMD; before that SIGTERM ends bhyve. [`PowerManagement::acpi_enabled`] tells the
//! caller which of the two to do; [`PowerManagement::press_power_button`] presses the button.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bus::{Bus, BusDevice, BusError, SharedDevice};
use crate::devices::registry::{CreatePlatform, PlatformDevice, PlatformPlan};
use crate::devices::{DeviceError, StateId, Stateful};
use crate::interrupts::InterruptSink;
use crate::lifecycle::ExitReason;

/// PM1a event block (status at +0, enable at +2).
pub const PM1A_EVT_ADDR: u16 = 0x400;
/// PM1a control block.
pub const PM1A_CNT_ADDR: u16 = 0x404;
/// ACPI PM timer.
pub const IO_PMTMR: u16 = 0x408;
/// GPE0 block: status byte then enable byte.
pub const IO_GPE0_BLK: u16 = 0x40c;
/// Length of the GPE0 block in bytes.
pub const IO_GPE0_LEN: u16 = 2;
/// SMI command port through which the guest switches ACPI mode on or off.
pub const SMI_CMD: u16 = 0xb2;
/// Value written to [`SMI_CMD`] to enable ACPI.
pub const BHYVE_ACPI_ENABLE: u8 = 0xa0;
/// Value written to [`SMI_CMD`] to disable ACPI.
pub const BHYVE_ACPI_DISABLE: u8 = 0xa1;
/// Reset control register.
pub const RESET_CONTROL_PORT: u16 = 0xcf9;
/// Value the FADT tells the guest to write to [`RESET_CONTROL_PORT`].
pub const RESET_VALUE: u8 = 0x06;
/// The SCI's ISA IRQ and GSI.
pub const SCI_INT: u32 = 9;
/// SLP_TYP value of S5 (soft off), as the DSDT's `_S5` package says.
pub const SLP_TYP_S5: u16 = 5;
/// PM timer frequency in Hz.
pub const PMTMR_FREQ: u64 = 3_579_545;

/// PM1 status bits.
pub const PM1_TMR_STS: u16 = 0x0001;
pub const PM1_BM_STS: u16 = 0x0010;
pub const PM1_GBL_STS: u16 = 0x0020;
pub const PM1_PWRBTN_STS: u16 = 0x0100;
pub const PM1_SLPBTN_STS: u16 = 0x0200;
pub const PM1_RTC_STS: u16 = 0x0400;
pub const PM1_WAK_STS: u16 = 0x8000;
/// PM1 enable bits.
pub const PM1_TMR_EN: u16 = 0x0001;
pub const PM1_GBL_EN: u16 = 0x0020;
pub const PM1_PWRBTN_EN: u16 = 0x0100;
pub const PM1_SLPBTN_EN: u16 = 0x0200;
pub const PM1_RTC_EN: u16 = 0x0400;
/// PM1 control bits.
pub const PM1_SCI_EN: u16 = 0x0001;
pub const PM1_SLP_TYP: u16 = 0x1c00;
pub const PM1_SLP_EN: u16 = 0x2000;
const PM1_ALWAYS_ZERO: u16 = 0xc003;

/// GPE0 bits a device may raise (bit 0: VM generation counter, as bhyve allocates it).
pub const GPE_VMGENC: u32 = 0;
const GPE0_VALID: u8 = 1 << GPE_VMGENC;

/// What the guest asked the platform to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerEvent {
    /// S5 soft-off through PM1a_CNT.
    PowerOff,
    /// Reset through the 0xCF9 reset control register.
    Reset,
}

/// Called (from a vCPU thread, with the device lock held) when the guest requests a power-off
/// or reset; it should make the VM's run loop exit, not tear the VM down itself.
pub type PowerEventHandler = Arc<dyn Fn(PowerEvent) + Send + Sync>;

/// Registers that a snapshot must carry.
#[cfg(feature = "bhyve_snapshot")]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PmState {
    pub pm1_status: u16,
    pub pm1_enable: u16,
    pub pm1_control: u16,
    pub gpe0_active: u8,
    pub gpe0_enabled: u8,
    pub reset_control: u8,
    /// PM timer value at the time the state was taken.
    pub timer: u32,
}

/// The ACPI power-management register set of a bhyve VM.
pub struct PowerManagement {
    interrupts: Arc<dyn InterruptSink>,
    on_event: PowerEventHandler,
    pm1_status: u16,
    pm1_enable: u16,
    pm1_control: u16,
    gpe0_active: u8,
    gpe0_enabled: u8,
    reset_control: u8,
    sci_active: bool,
    timer_epoch: Instant,
    timer_base: u32,
}

impl PowerManagement {
    /// Port ranges (base, length) the device answers; register each on the port I/O bus, or use
    /// [`PowerManagement::register`].
    pub const IO_RANGES: [(u16, u16); 6] = [
        (PM1A_EVT_ADDR, 4),
        (PM1A_CNT_ADDR, 2),
        (IO_PMTMR, 4),
        (IO_GPE0_BLK, IO_GPE0_LEN),
        (SMI_CMD, 1),
        (RESET_CONTROL_PORT, 1),
    ];

    pub fn new(interrupts: Arc<dyn InterruptSink>, on_event: PowerEventHandler) -> Self {
        Self {
            interrupts,
            on_event,
            pm1_status: 0,
            pm1_enable: 0,
            pm1_control: 0,
            gpe0_active: 0,
            gpe0_enabled: 0,
            reset_control: 0,
            sci_active: false,
            timer_epoch: Instant::now(),
            timer_base: 0,
        }
    }

    /// Put `device` on every range of [`PowerManagement::IO_RANGES`], the PM timer's left out
    /// when the backend's kernel provides it (FreeBSD's vpmtmr). If the PCI code owns
    /// 0xCF8..0xD00 as one range, leave 0xCF9 out and forward single-byte accesses there.
    pub fn register(
        device: Arc<std::sync::Mutex<Self>>,
        pio: &Bus,
        kernel_pm_timer: bool,
    ) -> Result<(), BusError> {
        let shared: SharedDevice = device;
        for (base, len) in Self::IO_RANGES {
            if kernel_pm_timer && base == IO_PMTMR {
                continue;
            }
            pio.insert(u64::from(base), u64::from(len), shared.clone())?;
        }
        Ok(())
    }

    /// Whether the guest switched ACPI on (SCI_EN); until then bhyve lets SIGTERM end the VM
    /// instead of pressing the power button.
    pub fn acpi_enabled(&self) -> bool {
        self.pm1_control & PM1_SCI_EN != 0
    }

    /// Press the power button: set PWRBTN_STS and raise the SCI if the guest enabled it.
    pub fn press_power_button(&mut self) {
        if self.pm1_status & PM1_PWRBTN_STS == 0 {
            self.pm1_status |= PM1_PWRBTN_STS;
            self.sci_update();
        }
    }

    /// Raise general-purpose event `bit` (only [`GPE_VMGENC`] exists).
    pub fn raise_gpe(&mut self, bit: u32) {
        let mask = 1u32.checked_shl(bit).unwrap_or(0) as u8 & GPE0_VALID;
        if mask == 0 {
            log::warn!("pm: GPE bit {bit} is not allocated");
            return;
        }
        self.gpe0_active |= mask;
        self.sci_update();
    }

    /// Whether the SCI line is currently driven high.
    pub fn sci_asserted(&self) -> bool {
        self.sci_active
    }

    /// The PM timer's current 32-bit count.
    pub fn timer_value(&self) -> u32 {
        let ticks = elapsed_ticks(self.timer_epoch.elapsed());
        self.timer_base.wrapping_add(ticks as u32)
    }

    fn sci_needed(&self) -> bool {
        let pending = self.pm1_status
            & self.pm1_enable
            & (PM1_TMR_STS | PM1_GBL_STS | PM1_PWRBTN_STS | PM1_SLPBTN_STS | PM1_RTC_STS);
        pending != 0 || self.gpe0_active & self.gpe0_enabled != 0
    }

    fn sci_update(&mut self) {
        let need = self.sci_needed();
        if need == self.sci_active {
            return;
        }
        if let Err(e) = self.interrupts.set_irq_line(SCI_INT, need) {
            log::warn!("pm: cannot drive SCI (IRQ {SCI_INT}): {e}");
        }
        self.sci_active = need;
    }

    fn write_pm1_control(&mut self, value: u16) {
        // SLP_EN and the reserved bits read as zero; SCI_EN is owned by SMI_CMD, not the OS.
        self.pm1_control =
            (self.pm1_control & PM1_SCI_EN) | (value & !(PM1_SLP_EN | PM1_ALWAYS_ZERO));
        if value & PM1_SLP_EN != 0 && (self.pm1_control & PM1_SLP_TYP) >> 10 == SLP_TYP_S5 {
            (self.on_event)(PowerEvent::PowerOff);
        }
    }

    fn write_smi_cmd(&mut self, value: u8) {
        match value {
            BHYVE_ACPI_ENABLE => self.pm1_control |= PM1_SCI_EN,
            BHYVE_ACPI_DISABLE => self.pm1_control &= !PM1_SCI_EN,
            _ => {}
        }
    }

    fn write_reset_control(&mut self, value: u8) {
        self.reset_control = value;
        if value & 0x4 != 0 {
            (self.on_event)(PowerEvent::Reset);
        }
    }

    /// Read register `port` with access width `len`; `None` when bhyve would refuse it.
    fn read_port(&self, port: u16, len: usize) -> Option<u32> {
        match (port, len) {
            (PM1A_EVT_ADDR, 2) => Some(self.pm1_status.into()),
            (p, 2) if p == PM1A_EVT_ADDR + 2 => Some(self.pm1_enable.into()),
            (PM1A_CNT_ADDR, 2) => Some(self.pm1_control.into()),
            (IO_PMTMR, 4) => Some(self.timer_value()),
            (IO_GPE0_BLK, 1) => Some(self.gpe0_active.into()),
            (p, 1) if p == IO_GPE0_BLK + 1 => Some(self.gpe0_enabled.into()),
            (RESET_CONTROL_PORT, 1) => Some(self.reset_control.into()),
            _ => None,
        }
    }

    fn write_port(&mut self, port: u16, len: usize, value: u32) -> bool {
        match (port, len) {
            (PM1A_EVT_ADDR, 2) => {
                let clear = value as u16
                    & (PM1_WAK_STS | PM1_RTC_STS | PM1_SLPBTN_STS | PM1_PWRBTN_STS | PM1_BM_STS);
                self.pm1_status &= !clear;
                self.sci_update();
            }
            (p, 2) if p == PM1A_EVT_ADDR + 2 => {
                // ACPICA insists on setting GBL_EN although the global lock is never used.
                self.pm1_enable = value as u16 & (PM1_RTC_EN | PM1_PWRBTN_EN | PM1_GBL_EN);
                self.sci_update();
            }
            (PM1A_CNT_ADDR, 2) => self.write_pm1_control(value as u16),
            (IO_GPE0_BLK, 1) => {
                self.gpe0_active &= !(value as u8 & GPE0_VALID);
                self.sci_update();
            }
            (p, 1) if p == IO_GPE0_BLK + 1 => {
                self.gpe0_enabled = value as u8 & GPE0_VALID;
                self.sci_update();
            }
            (SMI_CMD, 1) => self.write_smi_cmd(value as u8),
            (RESET_CONTROL_PORT, 1) => self.write_reset_control(value as u8),
            _ => return false,
        }
        true
    }
}

#[cfg(feature = "bhyve_snapshot")]
impl PowerManagement {
    pub fn state(&self) -> PmState {
        PmState {
            pm1_status: self.pm1_status,
            pm1_enable: self.pm1_enable,
            pm1_control: self.pm1_control,
            gpe0_active: self.gpe0_active,
            gpe0_enabled: self.gpe0_enabled,
            reset_control: self.reset_control,
            timer: self.timer_value(),
        }
    }

    /// Load `state`; the timer continues from the saved count and the SCI line follows the
    /// restored registers.
    pub fn restore(&mut self, state: &PmState) {
        self.pm1_status = state.pm1_status;
        self.pm1_enable = state.pm1_enable;
        self.pm1_control = state.pm1_control;
        self.gpe0_active = state.gpe0_active & GPE0_VALID;
        self.gpe0_enabled = state.gpe0_enabled & GPE0_VALID;
        self.reset_control = state.reset_control;
        self.timer_epoch = Instant::now();
        self.timer_base = state.timer;
        // Force the line to be driven to the restored level.
        self.sci_active = !self.sci_needed();
        self.sci_update();
    }
}

pub const DEVICE: PlatformDevice = PlatformDevice { name: "pm", plan };

/// Every VM has the ACPI registers; power-off and reset end the VM.
fn plan(plan: &mut PlatformPlan<'_>) -> Result<Option<CreatePlatform>, DeviceError> {
    let kernel_pm_timer = plan.platform.kernel_pm_timer;
    Ok(Some(Box::new(move |create| {
        let control = create.control.clone();
        let on_event: PowerEventHandler = Arc::new(move |event| {
            control.request_exit(match event {
                PowerEvent::PowerOff => ExitReason::PowerOff,
                PowerEvent::Reset => ExitReason::Reset,
            })
        });
        // The SCI is level triggered (bhyve's sci_init marks it so in the ELCR).
        create
            .interrupts
            .set_isa_irq_trigger(SCI_INT as u8, true)
            .map_err(|e| {
                DeviceError::Platform(format!("pm: cannot make the SCI level triggered: {e}"))
            })?;
        let power = Arc::new(std::sync::Mutex::new(PowerManagement::new(
            create.interrupts.clone(),
            on_event,
        )));
        PowerManagement::register(power.clone(), &create.buses.pio, kernel_pm_timer).map_err(
            |source| DeviceError::Ports {
                device: "pm",
                base: u64::from(PM1A_EVT_ADDR),
                source,
            },
        )?;
        Ok(vec![power as Arc<dyn Stateful>])
    })))
}

/// The ACPI registers need no pause: their only writer besides the guest (SIGTERM's power
/// button) goes through the lock on the VM's devices that a save holds.
impl Stateful for std::sync::Mutex<PowerManagement> {
    fn id(&self) -> StateId {
        StateId::single("pm")
    }
}

#[cfg(feature = "bhyve_snapshot")]
impl crate::devices::Persist for std::sync::Mutex<PowerManagement> {
    fn state_version(&self) -> u32 {
        1
    }

    fn save(&self) -> Result<Vec<u8>, String> {
        let state = self.lock().unwrap_or_else(|e| e.into_inner()).state();
        crate::snapshot::encode_section(&state).map_err(|e| e.to_string())
    }

    fn restore(&self, section: &crate::snapshot::Section<'_>) -> Result<(), String> {
        let state: PmState = section.decode().map_err(|e| e.to_string())?;
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(&state);
        Ok(())
    }
}

fn elapsed_ticks(elapsed: Duration) -> u64 {
    (elapsed.as_nanos() * u128::from(PMTMR_FREQ) / 1_000_000_000) as u64
}

fn port_of(base: u64, offset: u64) -> Option<u16> {
    u16::try_from(base.checked_add(offset)?).ok()
}

impl BusDevice for PowerManagement {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let value = port_of(base, offset).and_then(|port| self.read_port(port, data.len()));
        match value {
            Some(v) => {
                let bytes = v.to_le_bytes();
                let n = data.len().min(4);
                data[..n].copy_from_slice(&bytes[..n]);
            }
            None => {
                log::debug!(
                    "pm: ignored {}-byte read at {:#x}",
                    data.len(),
                    base + offset
                );
                data.fill(0xff);
            }
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(bytes);
        let handled = data.len() <= 4
            && port_of(base, offset).is_some_and(|port| self.write_port(port, data.len(), value));
        if !handled {
            log::debug!(
                "pm: ignored {}-byte write at {:#x}",
                data.len(),
                base + offset
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Lines {
        changes: Mutex<Vec<(u32, bool)>>,
    }

    impl InterruptSink for Lines {
        fn set_irq_line(&self, gsi: u32, high: bool) -> io::Result<()> {
            self.changes.lock().unwrap().push((gsi, high));
            Ok(())
        }
        fn signal_msi(&self, _address: u64, _data: u32) -> io::Result<()> {
            Ok(())
        }
        fn set_isa_irq_trigger(&self, _irq: u8, _level: bool) -> io::Result<()> {
            Ok(())
        }
    }

    struct Fixture {
        pm: Arc<Mutex<PowerManagement>>,
        pio: Bus,
        lines: Arc<Lines>,
        events: Arc<Mutex<Vec<PowerEvent>>>,
    }

    fn fixture() -> Fixture {
        let lines = Arc::new(Lines::default());
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let pm = Arc::new(Mutex::new(PowerManagement::new(
            lines.clone(),
            Arc::new(move |e| sink.lock().unwrap().push(e)),
        )));
        let pio = Bus::new();
        PowerManagement::register(pm.clone(), &pio, false).unwrap();
        Fixture {
            pm,
            pio,
            lines,
            events,
        }
    }

    impl Fixture {
        fn inw(&self, port: u16) -> u16 {
            let mut b = [0u8; 2];
            assert!(self.pio.read(port.into(), &mut b));
            u16::from_le_bytes(b)
        }
        fn outw(&self, port: u16, v: u16) {
            assert!(self.pio.write(port.into(), &v.to_le_bytes()));
        }
        fn outb(&self, port: u16, v: u8) {
            assert!(self.pio.write(port.into(), &[v]));
        }
        fn inl(&self, port: u16) -> u32 {
            let mut b = [0u8; 4];
            assert!(self.pio.read(port.into(), &mut b));
            u32::from_le_bytes(b)
        }
        fn sci_changes(&self) -> Vec<(u32, bool)> {
            self.lines.changes.lock().unwrap().clone()
        }
    }

    #[test]
    fn pm_timer_counts_at_3_579545_mhz() {
        let f = fixture();
        let start_tick = f.inl(IO_PMTMR);
        let start = Instant::now();
        std::thread::sleep(Duration::from_millis(50));
        let ticks = f.inl(IO_PMTMR).wrapping_sub(start_tick);
        let elapsed = start.elapsed().as_secs_f64();
        let rate = f64::from(ticks) / elapsed;
        // Loose bounds: the two reads and the elapsed measurement are not simultaneous.
        assert!(
            (3_400_000.0..3_750_000.0).contains(&rate),
            "measured {rate} Hz"
        );
    }

    #[test]
    fn pm_timer_refuses_narrow_reads() {
        let f = fixture();
        let mut b = [0u8; 2];
        assert!(f.pio.read(IO_PMTMR.into(), &mut b));
        assert_eq!(b, [0xff, 0xff]);
    }

    #[test]
    fn writing_slp_en_with_s5_requests_power_off() {
        let f = fixture();
        // SLP_TYP = 1 with SLP_EN is some other sleep state: ignored.
        f.outw(PM1A_CNT_ADDR, (1 << 10) | PM1_SLP_EN);
        assert!(f.events.lock().unwrap().is_empty());
        // SLP_TYP = 5 without SLP_EN only stores the type.
        f.outw(PM1A_CNT_ADDR, SLP_TYP_S5 << 10);
        assert!(f.events.lock().unwrap().is_empty());
        assert_eq!(f.inw(PM1A_CNT_ADDR), SLP_TYP_S5 << 10);
        f.outw(PM1A_CNT_ADDR, (SLP_TYP_S5 << 10) | PM1_SLP_EN);
        assert_eq!(*f.events.lock().unwrap(), vec![PowerEvent::PowerOff]);
        // SLP_EN always reads back as zero.
        assert_eq!(f.inw(PM1A_CNT_ADDR) & PM1_SLP_EN, 0);
    }

    #[test]
    fn writing_the_reset_value_to_cf9_requests_reset() {
        let f = fixture();
        f.outb(RESET_CONTROL_PORT, 0x02);
        assert!(f.events.lock().unwrap().is_empty());
        f.outb(RESET_CONTROL_PORT, RESET_VALUE);
        assert_eq!(*f.events.lock().unwrap(), vec![PowerEvent::Reset]);
        let mut b = [0u8; 1];
        assert!(f.pio.read(RESET_CONTROL_PORT.into(), &mut b));
        assert_eq!(b[0], RESET_VALUE);
    }

    #[test]
    fn power_button_raises_sci_only_when_enabled() {
        let f = fixture();
        f.pm.lock().unwrap().press_power_button();
        assert_eq!(f.inw(PM1A_EVT_ADDR) & PM1_PWRBTN_STS, PM1_PWRBTN_STS);
        assert!(f.sci_changes().is_empty());
        // Enabling the event with the status pending raises the SCI.
        f.outw(PM1A_EVT_ADDR + 2, PM1_PWRBTN_EN);
        assert_eq!(f.sci_changes(), vec![(SCI_INT, true)]);
        // Clearing the status (write 1) lowers it.
        f.outw(PM1A_EVT_ADDR, PM1_PWRBTN_STS);
        assert_eq!(f.inw(PM1A_EVT_ADDR) & PM1_PWRBTN_STS, 0);
        assert_eq!(f.sci_changes(), vec![(SCI_INT, true), (SCI_INT, false)]);
        // A second press with the event enabled raises it at once.
        f.pm.lock().unwrap().press_power_button();
        assert_eq!(
            f.sci_changes(),
            vec![(SCI_INT, true), (SCI_INT, false), (SCI_INT, true)]
        );
    }

    #[test]
    fn status_bits_clear_only_where_one_is_written() {
        let f = fixture();
        f.pm.lock().unwrap().press_power_button();
        f.outw(PM1A_EVT_ADDR, 0);
        assert_eq!(f.inw(PM1A_EVT_ADDR), PM1_PWRBTN_STS);
        f.outw(PM1A_EVT_ADDR, !PM1_PWRBTN_STS);
        assert_eq!(f.inw(PM1A_EVT_ADDR), PM1_PWRBTN_STS);
        f.outw(PM1A_EVT_ADDR, 0xffff);
        assert_eq!(f.inw(PM1A_EVT_ADDR), 0);
    }

    #[test]
    fn enable_register_keeps_only_supported_bits() {
        let f = fixture();
        f.outw(PM1A_EVT_ADDR + 2, 0xffff);
        assert_eq!(
            f.inw(PM1A_EVT_ADDR + 2),
            PM1_RTC_EN | PM1_PWRBTN_EN | PM1_GBL_EN
        );
    }

    #[test]
    fn smi_command_switches_sci_en_which_the_os_cannot_change() {
        let f = fixture();
        assert!(!f.pm.lock().unwrap().acpi_enabled());
        f.outb(SMI_CMD, BHYVE_ACPI_ENABLE);
        assert!(f.pm.lock().unwrap().acpi_enabled());
        f.outw(PM1A_CNT_ADDR, 0);
        assert_eq!(f.inw(PM1A_CNT_ADDR) & PM1_SCI_EN, PM1_SCI_EN);
        f.outb(SMI_CMD, BHYVE_ACPI_DISABLE);
        assert!(!f.pm.lock().unwrap().acpi_enabled());
    }

    #[test]
    fn gpe_raises_sci_when_enabled_and_clears_on_write_one() {
        let f = fixture();
        f.pm.lock().unwrap().raise_gpe(GPE_VMGENC);
        assert!(f.sci_changes().is_empty());
        f.outb(IO_GPE0_BLK + 1, 1);
        assert_eq!(f.sci_changes(), vec![(SCI_INT, true)]);
        f.outb(IO_GPE0_BLK, 1);
        assert_eq!(f.sci_changes(), vec![(SCI_INT, true), (SCI_INT, false)]);
    }

    #[cfg(feature = "bhyve_snapshot")]
    #[test]
    fn state_round_trip_keeps_registers_and_timer() {
        let f = fixture();
        f.outb(SMI_CMD, BHYVE_ACPI_ENABLE);
        f.outw(PM1A_EVT_ADDR + 2, PM1_PWRBTN_EN);
        f.pm.lock().unwrap().press_power_button();
        let saved = f.pm.lock().unwrap().state();
        let g = fixture();
        g.pm.lock().unwrap().restore(&saved);
        let restored = g.pm.lock().unwrap().state();
        assert_eq!(restored.pm1_status, saved.pm1_status);
        assert_eq!(restored.pm1_enable, saved.pm1_enable);
        assert_eq!(restored.pm1_control, saved.pm1_control);
        assert!(restored.timer.wrapping_sub(saved.timer) < PMTMR_FREQ as u32);
        assert!(g.pm.lock().unwrap().sci_asserted());
        assert_eq!(g.sci_changes(), vec![(SCI_INT, true)]);
    }
}
