//! The four COM ports behind the LPC bridge (bhyve's `lpc_init`): they exist, all four, when an
//! `lpc` function is configured; `lpc.comN.path` connects one to a backend.

use std::sync::{Arc, Mutex};

use super::backend::{Backend, BackendError, BackendSpec};
use super::{IsaIrq, LegacyUart, SharedUart, Uart, LEGACY_PORTS, UART_IO_SIZE};
use crate::devices::registry::{CreatePlatform, PlatformCreate, PlatformDevice, PlatformPlan};
use crate::devices::{DeviceError, StateId, Stateful};

pub const COM_PORTS: PlatformDevice = PlatformDevice { name: "com", plan };

/// Snapshot section of a COM port; its instance is the port's name.
const SECTION: &str = "uart";

/// A COM port and what keeps its backend alive.
pub struct ComPort {
    name: &'static str,
    uart: SharedUart,
    /// Dropped after nothing else needs it: stops the input thread, restores the terminal.
    /// (Locked only to share the port: a backend is not `Sync`.)
    backend: Mutex<Option<Backend>>,
}

impl ComPort {
    /// `com1`…`com4`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn uart(&self) -> &SharedUart {
        &self.uart
    }
}

impl Stateful for ComPort {
    fn id(&self) -> StateId {
        StateId {
            section: SECTION,
            instance: self.name.to_string(),
        }
    }

    fn pause(&self) {
        self.uart
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .uart
            .pause_input();
    }

    fn resume(&self) {
        self.uart
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .uart
            .resume_input();
    }

    fn stop(&self) {
        let backend = self.backend.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(backend) = backend.as_ref() {
            backend.request_stop();
        }
    }
}

#[cfg(feature = "bhyve_snapshot")]
impl crate::devices::Persist for ComPort {
    fn state_version(&self) -> u32 {
        1
    }

    fn save(&self) -> Result<Vec<u8>, String> {
        let state = self
            .uart
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .uart
            .state();
        crate::snapshot::encode_section(&state).map_err(|e| e.to_string())
    }

    fn restore(&self, section: &crate::snapshot::Section<'_>) -> Result<(), String> {
        let state: super::UartState = section.decode().map_err(|e| e.to_string())?;
        self.uart
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .uart
            .set_state(&state)
            .map_err(|e| format!("{}: {e}", self.name))
    }
}

/// With an LPC bridge, every port and its backend, checked; without, a warning per path set.
fn plan(plan: &mut PlatformPlan<'_>) -> Result<Option<CreatePlatform>, DeviceError> {
    let config = plan.config;
    let mut ports = Vec::new();
    let mut stdio_user: Option<&'static str> = None;
    for (index, (name, _, _)) in LEGACY_PORTS.iter().enumerate() {
        let path = config.get(&format!("lpc.{name}.path"));
        if plan.lpc.is_none() {
            if let Some(path) = path {
                plan.ignored.push(format!(
                    "lpc.{name}.path={path} ignored: no lpc device is configured"
                ));
            }
            continue;
        }
        let spec = path.map(BackendSpec::parse);
        if let Some(spec) = &spec {
            let fail = |source| DeviceError::Backend {
                device: name,
                path: path.unwrap_or_default().to_string(),
                source,
            };
            spec.check_supported().map_err(fail)?;
            if *spec == BackendSpec::Stdio {
                if stdio_user.is_some() {
                    return Err(fail(BackendError::StdioInUse));
                }
                stdio_user = Some(name);
            }
        }
        ports.push((index, spec));
    }
    if ports.is_empty() {
        return Ok(None);
    }
    Ok(Some(Box::new(move |create| {
        let mut parts: Vec<Arc<dyn Stateful>> = Vec::new();
        for (index, spec) in ports {
            parts.push(Arc::new(attach_port(create, index, spec.as_ref())?));
        }
        Ok(parts)
    })))
}

fn attach_port(
    create: &PlatformCreate<'_>,
    index: usize,
    spec: Option<&BackendSpec>,
) -> Result<ComPort, DeviceError> {
    let (name, base, irq) = LEGACY_PORTS[index];
    let backend_error = |source| DeviceError::Backend {
        device: name,
        path: create
            .config
            .get(&format!("lpc.{name}.path"))
            .unwrap_or_default()
            .to_string(),
        source,
    };
    let mut backend = spec.map(Backend::open).transpose().map_err(backend_error)?;
    let output = backend.as_mut().and_then(Backend::take_output);
    let mut uart = Uart::new(
        output,
        Box::new(IsaIrq::new(create.interrupts.clone(), irq)),
    );
    // Paused before its input thread exists: parts come back from their constructor paused.
    uart.pause_input();
    let shared: SharedUart = Arc::new(Mutex::new(LegacyUart { uart }));
    create
        .buses
        .pio
        .insert(u64::from(base), UART_IO_SIZE, shared.clone())
        .map_err(|source| DeviceError::Ports {
            device: name,
            base: u64::from(base),
            source,
        })?;
    if let Some(backend) = backend.as_mut() {
        backend
            .start_input(name, shared.clone())
            .map_err(|e| backend_error(e.into()))?;
    }
    Ok(ComPort {
        name,
        uart: shared,
        backend: Mutex::new(backend),
    })
}
