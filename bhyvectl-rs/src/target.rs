//! What a bhyvectl command line asks of a VM ([`Plan`]), carried out in FreeBSD's order against
//! a [`Target`]: a running bhyve-rs through its control socket (`socket`), or on FreeBSD the
//! kernel's `/dev/vmm` directly (`devvmm`).

use std::io::Write;

use bhyve::control::vmstate::{self, Descriptor, RegisterWrites, VmState, REGISTERS};

use crate::options::{strtoul_lenient, Args};
use crate::show::{render, run_exit, RunExit, Selection, GET_OPTIONS};

/// A VM bhyvectl can inspect and act on.
pub trait Target {
    fn set_registers(&mut self, vcpu: u32, writes: &RegisterWrites) -> Result<(), String>;
    /// One of [`vmstate::ACTIONS`].
    fn act(&mut self, vcpu: u32, action: &str) -> Result<(), String>;
    fn state(&mut self, vcpu: u32) -> Result<VmState, String>;
    /// One `VM_RUN` of `vcpu` (`--run`).
    fn run(&mut self, vcpu: u32) -> Result<RunExit, String>;
    /// `--setcap`: set capability `name` (one of [`vmstate::CAPABILITIES`] or not) of `vcpu`.
    fn set_capability(&mut self, vcpu: u32, name: &str, value: bool) -> Result<(), String>;
    /// `--set-x2apic-state` (`enum x2apic_state`).
    fn set_x2apic_state(&mut self, vcpu: u32, state: i64) -> Result<(), String>;
}

/// Options only `/dev/vmm` can carry out: a bhyve-rs owns its VM's vCPUs and memory, and KVM
/// has no counterpart of the kernel's pending event information.
pub const DEV_VMM_OPTIONS: &[&str] = &[
    "create",
    "run",
    "get-intinfo",
    "get-debug-cpus",
    "setcap",
    "set-x2apic-state",
];

/// Registers FreeBSD's bhyvectl can write with `--set-<name>=VALUE`.
const SETTABLE: [&str; 15] = [
    "efer", "cr0", "cr2", "cr3", "cr4", "dr0", "dr1", "dr2", "dr3", "dr6", "dr7", "rsp", "rip",
    "rax", "rflags",
];

/// A command line's requests, checked before anything is done.
#[derive(Debug, Default)]
pub struct Plan {
    vcpu: u32,
    writes: RegisterWrites,
    inject_nmi: bool,
    selection: Selection,
    force_reset: bool,
    force_poweroff: bool,
    destroy: bool,
    /// `--create`: make the VM before anything else.
    pub create: bool,
    run: bool,
    /// `--setcap` value for `--capname`.
    setcap: Option<(String, bool)>,
    set_x2apic_state: Option<i64>,
}

impl Plan {
    /// The plan for `a`, or the first option this platform cannot carry out; `platform` lists
    /// the options beyond the control socket's that it can ([`DEV_VMM_OPTIONS`]).
    pub fn from_args(a: &Args, platform: &[&str]) -> Result<Plan, &'static str> {
        if a.set_mem != 0 {
            return Err("set-mem");
        }
        if a.setcap.is_some() && !platform.contains(&"setcap") {
            return Err("setcap");
        }
        let mut plan = Plan {
            // FreeBSD takes --cpu with atoi and does not check it; bhyve refuses a bad one.
            vcpu: u32::try_from(a.cpu).unwrap_or(u32::MAX),
            ..Plan::default()
        };
        plan.selection.capname = a.capname.clone();
        // FreeBSD keeps the value in an int; the kernel reads any non-zero one as set.
        plan.setcap = a.setcap.map(|value| {
            (
                a.capname.clone().unwrap_or_default(),
                value as u32 as i32 != 0,
            )
        });
        let value_of = |name: &str| {
            a.options
                .iter()
                .rev()
                .find(|(n, _)| *n == name)
                .and_then(|(_, v)| v.as_deref())
                .map_or(0, strtoul_lenient)
        };
        let descriptor = Descriptor {
            base: value_of("desc-base"),
            // FreeBSD keeps these in uint32_t.
            limit: value_of("desc-limit") as u32,
            access: value_of("desc-access") as u32,
        };
        let mut set_registers = Vec::new();
        let mut set_descs = Vec::new();
        let mut set_selectors = Vec::new();
        for (name, value) in &a.options {
            let name: &'static str = name;
            if DEV_VMM_OPTIONS.contains(&name) && !platform.contains(&name) {
                return Err(name);
            }
            let value = value.as_deref().map_or(0, strtoul_lenient);
            match name {
                "vm" | "cpu" | "capname" | "desc-base" | "desc-limit" | "desc-access"
                | "rundir" => {}
                "get-all" => plan.selection.all = true,
                "inject-nmi" => plan.inject_nmi = true,
                "force-reset" => plan.force_reset = true,
                "force-poweroff" => plan.force_poweroff = true,
                "destroy" => plan.destroy = true,
                "create" => plan.create = true,
                "run" => plan.run = true,
                // strtol(…, 0): any value outside 0 and 1 is refused by the kernel anyway.
                "set-x2apic-state" => plan.set_x2apic_state = Some(value as i64),
                _ if GET_OPTIONS.contains(&name) => {
                    plan.selection.options.insert(name);
                }
                _ => {
                    if let Some(reg) = name.strip_prefix("set-desc-") {
                        set_descs.push(reg);
                    } else if let Some(reg) =
                        name.strip_prefix("set-").filter(|r| SETTABLE.contains(r))
                    {
                        set_registers.push((reg, value));
                    } else if let Some(seg) = name
                        .strip_prefix("set-")
                        .filter(|s| vmstate::SELECTOR_WRITE_ORDER.contains(s))
                    {
                        set_selectors.push((seg, value));
                    } else {
                        return Err(name);
                    }
                }
            }
        }
        // FreeBSD writes each register once, the last value given, in its own order.
        for reg in REGISTERS {
            if let Some(&(_, value)) = set_registers.iter().rev().find(|(r, _)| *r == reg) {
                plan.writes.registers.push((reg.into(), value));
            }
        }
        for seg in vmstate::DESCRIPTOR_WRITE_ORDER {
            if set_descs.contains(&seg) {
                // GDTR and IDTR take no access rights.
                let access = if seg.ends_with("dtr") && seg != "ldtr" {
                    0
                } else {
                    descriptor.access
                };
                let d = Descriptor {
                    access,
                    ..descriptor
                };
                plan.writes.descriptors.push((seg.into(), d));
            }
        }
        for seg in vmstate::SELECTOR_WRITE_ORDER {
            if let Some(&(_, value)) = set_selectors.iter().rev().find(|(s, _)| *s == seg) {
                plan.writes.selectors.push((seg.into(), value));
            }
        }
        Ok(plan)
    }

    /// Nothing asked of the VM but that it exists.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
            && !self.inject_nmi
            && !self.selection.all
            && self.selection.options.is_empty()
            && !self.force_reset
            && !self.force_poweroff
            && !self.destroy
            && !self.create
            && !self.run
            && self.setcap.is_none()
            && self.set_x2apic_state.is_none()
    }

    /// Carry the plan out in FreeBSD's order: register writes, NMI, the `--get-*` output,
    /// `--run`, forced reset or power-off, destroy.
    pub fn carry_out(&self, vm: &mut dyn Target, out: &mut dyn Write) -> Result<(), String> {
        if !self.writes.is_empty() {
            vm.set_registers(self.vcpu, &self.writes)?;
        }
        if let Some(state) = self.set_x2apic_state {
            vm.set_x2apic_state(self.vcpu, state)?;
        }
        if self.inject_nmi {
            vm.act(self.vcpu, "inject_nmi")?;
        }
        // FreeBSD sets the capability after printing the registers and before --getcap: no
        // register line depends on it.
        if let Some((name, value)) = &self.setcap {
            vm.set_capability(self.vcpu, name, *value)?;
        }
        if self.selection.all || !self.selection.options.is_empty() {
            let state = vm.state(self.vcpu)?;
            out.write_all(render(&state, &self.selection).as_bytes())
                .and_then(|()| out.flush())
                .map_err(|e| format!("writing the output: {e}"))?;
        }
        if self.run {
            let exit = vm.run(self.vcpu)?;
            out.write_all(run_exit(self.vcpu, &exit).as_bytes())
                .and_then(|()| out.flush())
                .map_err(|e| format!("writing the output: {e}"))?;
        }
        if self.force_reset {
            vm.act(self.vcpu, "force_reset")?;
        }
        if self.force_poweroff {
            vm.act(self.vcpu, "force_poweroff")?;
        }
        if self.destroy {
            vm.act(self.vcpu, "destroy")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::{option_table, parse_args, Vendor};

    fn plan(words: &[&str]) -> Result<Plan, &'static str> {
        let args: Vec<String> = std::iter::once("bhyvectl")
            .chain(words.iter().copied())
            .map(String::from)
            .collect();
        let a = parse_args(&args, &option_table(Vendor::Amd), "bhyvectl", false).unwrap();
        Plan::from_args(&a, &[])
    }

    /// Records what a plan asks, in order.
    #[derive(Default)]
    struct Recorder(Vec<String>);

    impl Target for Recorder {
        fn set_registers(&mut self, vcpu: u32, w: &RegisterWrites) -> Result<(), String> {
            self.0.push(format!("set {vcpu} {w:?}"));
            Ok(())
        }
        fn act(&mut self, vcpu: u32, action: &str) -> Result<(), String> {
            self.0.push(format!("{action} {vcpu}"));
            Ok(())
        }
        fn state(&mut self, vcpu: u32) -> Result<VmState, String> {
            self.0.push(format!("state {vcpu}"));
            Ok(VmState {
                vcpu,
                ..Default::default()
            })
        }
        fn set_capability(&mut self, vcpu: u32, name: &str, value: bool) -> Result<(), String> {
            self.0.push(format!("setcap {vcpu} {name} {value}"));
            Ok(())
        }
        fn set_x2apic_state(&mut self, vcpu: u32, state: i64) -> Result<(), String> {
            self.0.push(format!("x2apic {vcpu} {state}"));
            Ok(())
        }
        fn run(&mut self, vcpu: u32) -> Result<RunExit, String> {
            self.0.push(format!("run {vcpu}"));
            Ok(RunExit {
                rip: 0,
                inst_length: 0,
                kind: crate::show::RunExitKind::Other(0),
            })
        }
    }

    #[test]
    fn sets_follow_freebsd_order_and_values() {
        let p = plan(&[
            "--vm=x",
            "--set-rax=0x10",
            "--set-cr0=7",
            "--set-rax=0x20",
            "--desc-base=0x1000",
            "--desc-limit=0xff",
            "--desc-access=0x93",
            "--set-desc-gdtr",
            "--set-desc-ds",
            "--set-ss=0x10",
        ])
        .unwrap();
        assert_eq!(
            p.writes.registers,
            vec![("cr0".into(), 7), ("rax".into(), 0x20)]
        );
        assert_eq!(p.writes.descriptors[0].0, "ds");
        assert_eq!(p.writes.descriptors[0].1.access, 0x93);
        assert_eq!(p.writes.descriptors[1].0, "gdtr");
        assert_eq!(p.writes.descriptors[1].1.access, 0);
        assert_eq!(p.writes.selectors, vec![("ss".into(), 0x10)]);
    }

    #[test]
    fn unsupported_options_are_named() {
        assert_eq!(
            plan(&["--vm=x", "--get-vmcb-asid"]).unwrap_err(),
            "get-vmcb-asid"
        );
        assert_eq!(plan(&["--vm=x", "--set-mem=64"]).unwrap_err(), "set-mem");
        assert_eq!(plan(&["--vm=x", "--run"]).unwrap_err(), "run");
        assert_eq!(plan(&["--vm=x", "--create"]).unwrap_err(), "create");
        assert_eq!(
            plan(&["--vm=x", "--get-intinfo"]).unwrap_err(),
            "get-intinfo"
        );
        assert_eq!(plan(&["--vm=x", "--setcap=1"]).unwrap_err(), "setcap");
        assert_eq!(
            plan(&["--vm=x", "--set-x2apic-state=1"]).unwrap_err(),
            "set-x2apic-state"
        );
        assert!(plan(&["--vm=x"]).unwrap().is_empty());
        assert!(plan(&["--vm=x", "--cpu=1"]).unwrap().is_empty());
    }

    #[test]
    fn actions_come_in_freebsd_order() {
        let p = plan(&[
            "--destroy",
            "--vm=x",
            "--cpu=1",
            "--force-poweroff",
            "--get-rip",
            "--inject-nmi",
            "--set-rip=5",
        ])
        .unwrap();
        let mut r = Recorder::default();
        p.carry_out(&mut r, &mut Vec::new()).unwrap();
        let steps: Vec<&str> = r.0.iter().map(|s| s.split(' ').next().unwrap()).collect();
        assert_eq!(
            steps,
            ["set", "inject_nmi", "state", "force_poweroff", "destroy"]
        );
        assert!(r.0.iter().all(|s| s.split(' ').nth(1) == Some("1")));
    }

    #[test]
    fn dev_vmm_runs_after_the_output_and_before_the_reset() {
        let args: Vec<String> = [
            "bhyvectl",
            "--vm=x",
            "--create",
            "--force-reset",
            "--run",
            "--get-rip",
            "--capname=pause_exit",
            "--setcap=0x100000000",
            "--set-x2apic-state=0x1",
        ]
        .map(String::from)
        .to_vec();
        let a = parse_args(&args, &option_table(Vendor::Intel), "bhyvectl", false).unwrap();
        let p = Plan::from_args(&a, DEV_VMM_OPTIONS).unwrap();
        assert!(p.create);
        let mut r = Recorder::default();
        let mut out = Vec::new();
        p.carry_out(&mut r, &mut out).unwrap();
        let steps: Vec<&str> = r.0.iter().map(|s| s.split(' ').next().unwrap()).collect();
        assert_eq!(steps, ["x2apic", "setcap", "state", "run", "force_reset"]);
        // 2^32 is 0 once in FreeBSD's int.
        assert_eq!(r.0[1], "setcap 0 pause_exit false");
        assert_eq!(r.0[0], "x2apic 0 1");
        assert!(String::from_utf8_lossy(&out).contains("*** unknown vm run exitcode 0\n"));
    }
}
