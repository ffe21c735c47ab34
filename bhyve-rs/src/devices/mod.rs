//! Device models: PCI, LPC, UART, RTC, …
//!
//! [`attach`] reads the configuration tree and puts every configured device on the buses.

pub mod pm;
pub mod rtc;

use std::sync::Arc;

use crate::bus::Buses;
use crate::config::Config;
use crate::interrupts::InterruptSink;
use crate::memory::GuestMemory;
use crate::vcpu::VmControl;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{0}")]
    Unsupported(String),
}

/// The devices of one VM, kept alive for its lifetime.
#[derive(Default)]
pub struct Devices {}

/// Create every device the configuration names and register its ranges on `buses`.
/// `control` lets a device end the VM (`request_exit(ExitReason::PowerOff)` for ACPI S5,
/// `Reset` for 0xcf9); `memory` is guest RAM (DMA, firmware tables).
pub fn attach(
    _config: &Config,
    _buses: &Buses,
    _interrupts: Arc<dyn InterruptSink>,
    _control: Arc<VmControl>,
    _memory: Arc<GuestMemory>,
) -> Result<Devices, DeviceError> {
    Ok(Devices::default())
}
