//! Saving a running machine into a snapshot file and building a machine back from one.
//!
//! Save order: pause every vCPU → configuration → guest RAM → VM (in-kernel devices, clock) →
//! each vCPU → each device → commit (fsync, rename) → resume, or stop for a suspend.
//! Restore mirrors it: configuration → RAM mapped privately from the file (lazy) → VM state →
//! vCPU states → device states → start the vCPUs last.

use std::os::fd::AsFd;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::cmdline::RestoreMode;
use super::{Backend, CopyOptions, HeaderInfo, Requirement, SnapshotReader, SnapshotWriter};
use crate::config::Config;
use crate::devices::{DeviceRef, Devices};
use crate::memory::{GuestMemory, GuestRegion};
use crate::vcpu::VcpuSet;
use crate::vmm::{BackendState, StateSection, Vm};

/// Payload versions of the sections this module writes.
const BACKEND_STATE_VERSION: u32 = 1;
const DEVICE_STATE_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct BackendStatePayload {
    backend: String,
    sections: Vec<(String, Vec<u8>)>,
}

impl From<&BackendState> for BackendStatePayload {
    fn from(state: &BackendState) -> Self {
        Self {
            backend: state.backend.clone(),
            sections: state
                .sections
                .iter()
                .map(|s| (s.name.clone(), s.bytes.clone()))
                .collect(),
        }
    }
}

impl From<BackendStatePayload> for BackendState {
    fn from(payload: BackendStatePayload) -> Self {
        Self {
            backend: payload.backend,
            sections: payload
                .sections
                .into_iter()
                .map(|(name, bytes)| StateSection { name, bytes })
                .collect(),
        }
    }
}

/// What a save needs to reach in a running machine.
pub struct SaveTarget<'a> {
    pub config: &'a Config,
    pub memory: &'a GuestMemory,
    pub vm: &'a dyn Vm,
    pub vcpus: &'a VcpuSet,
    pub devices: &'a Devices,
}

/// Write the machine's state to `name` in `dir`. The vCPUs must be paused.
pub fn save(target: &SaveTarget<'_>, dir: impl AsFd, name: &str) -> Result<(), String> {
    let mut writer = SnapshotWriter::create_in(dir, name, HeaderInfo::this_build(Backend::Kvm))
        .map_err(|e| e.to_string())?;
    writer
        .add_config(target.config.iter())
        .map_err(|e| e.to_string())?;
    for region in target.memory.regions() {
        let data = target
            .memory
            .slice(region.gpa(), region.len())
            .map_err(|e| e.to_string())?;
        writer
            .add_ram_region(region.gpa(), data)
            .map_err(|e| e.to_string())?;
    }
    let vm_state = target
        .vm
        .save_state()
        .map_err(|e| format!("VM state: {e}"))?;
    add_state(&mut writer, "vm", "", &BackendStatePayload::from(&vm_state))?;
    for index in 0..target.vcpus.len() {
        let state = target
            .vcpus
            .with_vcpu(index, |vcpu| vcpu.save_state())
            .map_err(|e| format!("vCPU {index}: {e}"))?
            .map_err(|e| format!("vCPU {index}: {e}"))?;
        add_state(
            &mut writer,
            "vcpu",
            &index.to_string(),
            &BackendStatePayload::from(&state),
        )?;
    }
    for (instance, device) in target.devices.instances() {
        match device {
            DeviceRef::Pci(function) => {
                let state = function
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .save_state();
                add_state(&mut writer, "pci", &instance, &state)?;
            }
            DeviceRef::Uart(uart) => {
                let state = uart.lock().unwrap_or_else(|e| e.into_inner()).uart.state();
                add_state(&mut writer, "uart", &instance, &state)?;
            }
        }
    }
    if let Some(rtc) = target.devices.rtc() {
        let state = rtc.lock().unwrap_or_else(|e| e.into_inner()).state();
        add_state(&mut writer, "rtc", "", &state)?;
    }
    if let Some(pm) = target.devices.power_management() {
        let state = pm.lock().unwrap_or_else(|e| e.into_inner()).state();
        add_state(&mut writer, "pm", "", &state)?;
    }
    writer.commit().map_err(|e| e.to_string())
}

fn add_state<T: Serialize>(
    writer: &mut SnapshotWriter,
    name: &str,
    instance: &str,
    value: &T,
) -> Result<(), String> {
    let version = if matches!(name, "vm" | "vcpu") {
        BACKEND_STATE_VERSION
    } else {
        DEVICE_STATE_VERSION
    };
    writer
        .add_encoded(name, instance, version, Requirement::Mandatory, value)
        .map_err(|e| format!("{name} {instance}: {e}"))
}

/// An open snapshot with its configuration, ready to build a machine from.
pub struct Restore {
    reader: SnapshotReader,
}

impl Restore {
    pub fn open(path: &Path) -> Result<Self, String> {
        let reader = SnapshotReader::open(path).map_err(|e| e.to_string())?;
        if reader.header().backend != Backend::Kvm {
            return Err(format!(
                "snapshot was written by the {:?} backend; this bhyve runs on KVM",
                reader.header().backend
            ));
        }
        Ok(Self { reader })
    }

    /// The configuration the VM was saved with.
    pub fn config(&self) -> Config {
        self.reader.config_tree()
    }

    /// Guest RAM as `mode` asks: mapped copy-on-write from the file (nothing is read until the
    /// guest touches it), or read into fresh memory and checked against the `ram-index`.
    pub fn memory(&self, mode: RestoreMode) -> Result<GuestMemory, String> {
        let mut regions = Vec::new();
        for region in self.reader.ram_regions() {
            let guest_region = match mode {
                RestoreMode::Map => {
                    let mapping = self
                        .reader
                        .map_ram_private(region)
                        .map_err(|e| e.to_string())?;
                    GuestRegion::from_mapping(region.gpa, mapping)
                }
                RestoreMode::Copy => {
                    let mut fresh = GuestRegion::anonymous(region.gpa, region.size)
                        .map_err(|e| e.to_string())?;
                    self.reader
                        .restore_ram_copy(region, fresh.as_mut_slice(), CopyOptions::default())
                        .map_err(|e| e.to_string())?;
                    fresh
                }
            };
            regions.push(guest_region);
        }
        GuestMemory::from_regions(regions).map_err(|e| e.to_string())
    }

    fn backend_state(&self, name: &str, instance: &str) -> Result<BackendState, String> {
        let payload: BackendStatePayload = self.decode(name, instance, BACKEND_STATE_VERSION)?;
        Ok(payload.into())
    }

    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
        instance: &str,
        version: u32,
    ) -> Result<T, String> {
        let section = self
            .reader
            .take_versioned(name, instance, version)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("section {name} {instance} is missing"))?;
        section
            .decode()
            .map_err(|e| format!("section {name} {instance}: {e}"))
    }

    /// Put the saved VM, vCPU and device state into a freshly built machine (not started).
    pub fn apply(&self, vm: &dyn Vm, vcpus: &VcpuSet, devices: &Devices) -> Result<(), String> {
        // The RAM sections were consumed by `memory`; the configuration by `config`.
        for region in self.reader.ram_regions() {
            self.reader.take("ram", &region.instance);
            self.reader.take("ram-index", &region.instance);
        }
        self.reader.take("config", "");
        vm.restore_state(&self.backend_state("vm", "")?)
            .map_err(|e| format!("VM state: {e}"))?;
        for index in 0..vcpus.len() {
            let state = self.backend_state("vcpu", &index.to_string())?;
            vcpus
                .with_vcpu(index, |vcpu| vcpu.restore_state(&state))
                .map_err(|e| format!("vCPU {index}: {e}"))?
                .map_err(|e| format!("vCPU {index}: {e}"))?;
        }
        for (instance, device) in devices.instances() {
            match device {
                DeviceRef::Pci(function) => {
                    let state = self.decode("pci", &instance, DEVICE_STATE_VERSION)?;
                    function
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .restore_state(&state)
                        .map_err(|e| format!("{instance}: {e}"))?;
                }
                DeviceRef::Uart(uart) => {
                    let state = self.decode("uart", &instance, DEVICE_STATE_VERSION)?;
                    uart.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .uart
                        .set_state(&state)
                        .map_err(|e| format!("{instance}: {e}"))?;
                }
            }
        }
        if let Some(rtc) = devices.rtc() {
            let state = self.decode("rtc", "", DEVICE_STATE_VERSION)?;
            rtc.lock()
                .unwrap_or_else(|e| e.into_inner())
                .restore(&state);
        }
        if let Some(pm) = devices.power_management() {
            let state = self.decode("pm", "", DEVICE_STATE_VERSION)?;
            pm.lock().unwrap_or_else(|e| e.into_inner()).restore(&state);
        }
        self.reader
            .finish_check_unconsumed()
            .map_err(|e| e.to_string())
    }
}
