//! bhyve-rs: the library behind the `bhyve` and `bhyvectl` commands.
//!
//! Data flows one way: the command line becomes a configuration tree ([`config`]), the tree
//! builds a machine (memory, vCPUs, devices on buses), vCPU threads run, and each exit is routed
//! by a [`bus`] to the device that owns the address. Only [`vmm`] talks to the hypervisor.

pub mod acpi;
pub mod affinity;
pub mod boot;
pub mod bootrom;
pub mod bus;
pub mod cli;
pub mod cnum;
pub mod config;
pub mod control;
pub mod description;
pub mod devices;
pub mod interrupts;
pub mod lifecycle;
pub mod logging;
pub mod machine;
pub mod memory;
pub mod mptable;
pub mod proctitle;
#[cfg(feature = "bhyve_snapshot")]
pub mod snapshot;
pub mod vcpu;
pub mod vmm;
