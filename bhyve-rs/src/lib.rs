//! bhyve-rs: the library behind the `bhyve` and `bhyvectl` commands.
//!
//! Data flows one way: the command line becomes a configuration tree ([`config`]), the tree
//! builds a machine (memory, vCPUs, devices on buses), vCPU threads run, and each exit is routed
//! by a [`bus`] to the device that owns the address. Only [`vmm`] talks to the hypervisor.
//!
//! # Devices: one registry
//!
//! Every device emulation is one entry of [`devices::registry`], as FreeBSD's `pci_devemu`
//! table: [`devices::registry::PCI_EMULATIONS`] for what `pci.B.S.F.device` names (name, the
//! emulation a legacy name stands for, the `-s` option parser, and, when this build implements
//! it, a plan that checks the slot's keys and returns a constructor), and
//! [`devices::registry::PLATFORM_DEVICES`] for the devices outside PCI (COM ports, RTC, ACPI
//! PM, pc-testdev: a plan that decides from the configuration whether the device exists, and a
//! constructor that puts it on the buses). The command line (`-s` parsing and `-s help`), the
//! configuration check ([`devices::check_supported`]) and machine construction
//! ([`devices::attach`]) all read the registry. Emulations FreeBSD has and this build does not
//! implement stay in it, marked so, for their option syntax and a "not supported yet" refusal.
//!
//! A new device is a module under `devices/` holding its device, its registry entry (a `const`
//! [`devices::registry::PciEmulation`] or [`devices::registry::PlatformDevice`]) and its
//! [`devices::Stateful`] implementation, plus one line listing the entry in its table. Nothing
//! else names it: not the command line, not [`devices::Devices`], not the snapshot code.
//!
//! # Device state: one trait
//!
//! Every stateful part of the devices, PCI or not, implements [`devices::Stateful`]: a stable
//! id ([`devices::StateId`], the snapshot section and instance), pause (quiesce background work
//! before a snapshot), resume, and stop (the VM goes away); with the `bhyve_snapshot` feature its
//! `Persist` half adds a state version, save and restore. A PCI function is one part (the PCI
//! layer saves configuration space, BARs, MSI-X and INTx; the model adds its own state through
//! [`devices::pci::PciDevice`]); a platform constructor returns its parts. [`devices::Devices`]
//! keeps them in one list that pausing, resuming, checkpoint and restore walk: PCI functions by
//! address, then the platform devices in registry order, paused in reverse. The hypervisor's
//! own state (VM and vCPUs) is saved by the `vm` and `vcpu` sections of [`vmm`].

pub mod acpi;
pub mod affinity;
pub mod boot;
pub mod bootrom;
pub mod bus;
pub mod cli;

pub mod config;
pub mod control;
pub mod description;
pub mod devices;
pub mod firmware;
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

#[cfg(test)]
mod layering_tests;
