//! A bhyve-rs reached through its control socket: the [`Target`] bhyvectl uses where there is
//! no `/dev/vmm`.

use std::path::{Path, PathBuf};

use bhyve::control::nvlist::NvList;
use bhyve::control::vmstate::{self, RegisterWrites, VmState, CMD_VM_ACTION, CMD_VM_STATE};

use crate::show::RunExit;
use crate::target::Target;

/// A bhyve-rs reached through its control socket `<rundir>/<vm>`.
pub struct ControlSocket {
    rundir: PathBuf,
    vm: String,
}

impl ControlSocket {
    pub fn new(rundir: &Path, vm: &str) -> ControlSocket {
        ControlSocket {
            rundir: rundir.to_path_buf(),
            vm: vm.to_string(),
        }
    }

    fn send(&self, request: &NvList) -> Result<NvList, String> {
        bhyve::control::client::request(&self.rundir, &self.vm, request).map_err(|e| e.to_string())
    }
}

impl Target for ControlSocket {
    fn set_registers(&mut self, vcpu: u32, writes: &RegisterWrites) -> Result<(), String> {
        self.send(&writes.request(vcpu)).map(drop)
    }

    fn act(&mut self, vcpu: u32, action: &str) -> Result<(), String> {
        let mut request = vmstate::request(CMD_VM_ACTION, vcpu);
        request
            .add_string("action", action)
            .map_err(|e| e.to_string())?;
        self.send(&request).map(drop)
    }

    fn state(&mut self, vcpu: u32) -> Result<VmState, String> {
        let reply = self.send(&vmstate::request(CMD_VM_STATE, vcpu))?;
        let state = reply
            .get_nvlist("state")
            .ok_or("bhyve's reply lacks the VM state")?;
        VmState::decode(state).map_err(|why| format!("bhyve's reply: {why}"))
    }

    fn set_capability(&mut self, _vcpu: u32, _name: &str, _value: bool) -> Result<(), String> {
        Err("--setcap needs the VM's /dev/vmm device".into())
    }

    fn set_x2apic_state(&mut self, _vcpu: u32, _state: i64) -> Result<(), String> {
        Err("--set-x2apic-state needs the VM's /dev/vmm device".into())
    }

    fn run(&mut self, _vcpu: u32) -> Result<RunExit, String> {
        Err("--run needs the VM's /dev/vmm device: bhyve runs the vCPUs here".into())
    }
}
