//! Device models: PCI, LPC, UART, RTC, …
//!
//! [`attach`] reads the configuration tree and puts every configured device on the buses.

pub mod pm;
pub mod rtc;

use std::sync::Arc;

use crate::bus::Buses;
use crate::config::Config;
use crate::interrupts::InterruptSink;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{0}")]
    Unsupported(String),
}

/// The devices of one VM, kept alive for its lifetime.
#[derive(Default)]
pub struct Devices {}

/// Create every device the configuration names and register its ranges on `buses`.
pub fn attach(
    _config: &Config,
    _buses: &Buses,
    _interrupts: Arc<dyn InterruptSink>,
) -> Result<Devices, DeviceError> {
    Ok(Devices::default())
}
