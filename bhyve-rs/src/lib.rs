//! bhyve-rs: the library behind the `bhyve` and `bhyvectl` commands.
//!
//! Data flows one way: the command line ([`cli`]) becomes a configuration tree ([`config`]),
//! the tree is described once ([`description`]: topology, memory, pinning, switches) and
//! builds a machine ([`machine`]): a VM from the backend ([`vmm`]), devices on buses
//! ([`devices`]), firmware tables ([`firmware`]), vCPU threads ([`vcpu`]). While a vCPU runs,
//! the backend hands each port, MMIO or MSR access to a [`bus`] and the device that owns the
//! address. Only [`vmm`] talks to the hypervisor.
//!
//! # Layers
//!
//! Each module uses only the ones below it (checked by a test, `layering_tests`):
//!
//! 1. configuration and shared parts: [`config`] (the tree, C number parsing, the `-s` legacy
//!    option helpers, bhyve's defaults), [`memory`], [`description`], [`bus`], [`interrupts`],
//!    [`lifecycle`] (why a VM ends, and the one call that ends it), [`logging`], [`affinity`];
//! 2. the backend seam, [`vmm`], with KVM in `vmm::kvm` and the userland instruction emulator
//!    in [`vmm::x86emul`];
//! 3. the snapshot file format (`snapshot`, feature `bhyve_snapshot`) and the control protocol
//!    ([`control`]);
//! 4. [`devices`]: the emulation registry, the device models, their [`devices::Stateful`]
//!    state;
//! 5. firmware: [`mptable`], [`acpi`], [`boot`] (direct kernel boot), [`bootrom`], and
//!    [`firmware`], which writes the tables from the attached devices;
//! 6. running a machine: [`vcpu`] (threads, pause, kick), [`machine`] (build, run, halt
//!    detection, checkpoint and restore orchestration);
//! 7. [`cli`]: argv into a tree, reading the device registry for `-s`; then each binary's `main`.
//!
//! # The backend seam
//!
//! [`vmm::Hypervisor::create_vm`] takes a [`vmm::VmSpec`] (name, topology, memory, capabilities,
//! destroy-on-close) and returns a [`vmm::Vm`] that owns guest memory and reports
//! [`vmm::PlatformCaps`]: which platform devices its kernel holds (FreeBSD: RTC, PM timer, HPET;
//! KVM: none of them), its I/O APIC pins, whether it detects a halted VM or starts APs itself,
//! whether a snapshot's RAM can be mapped in. User space makes exactly the platform devices the
//! kernel lacks (the registry's plans read the caps), so a guest sees the same machine on
//! every backend. [`vmm::Vcpu::run`] serves accesses through a [`vmm::ExitHandler`] and returns
//! lifecycle events only ([`vmm::VmExit`]); the backend owns the kick ([`vmm::VcpuKick`]). The
//! `vmm` module documentation maps every FreeBSD exit code and ioctl group onto the seam.
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
#[cfg(test)]
mod test_rng;
