//! Raw bindings to FreeBSD's amd64 `/dev/vmm` interface (the kernel side of bhyve).
//!
//! Everything here is data: request codes computed with FreeBSD's `_IOC` encoding (independent of
//! the host OS), `#[repr(C)]` argument structs with compile-time layout assertions, and the enums
//! and constants of `<machine/vmm.h>`, `<machine/vmm_dev.h>`, `<machine/vmm_snapshot.h>` and
//! `<dev/vmm/*.h>`. The thin ioctl wrappers in the `ioctls` module exist only when building for FreeBSD;
//! everything else compiles (and is layout-checked) on any 64-bit host.
//!
//! # Which FreeBSD
//!
//! Plain names (`vm_run`, `VM_RUN`, `vm_memseg`, `VM_ALLOC_MEMSEG`, …) follow **FreeBSD 15 /
//! main**. Where an older release used a different layout for the same name, that layout is kept
//! under the kernel's own compat suffix:
//!
//! | 15 / main | 14.x | 13.x |
//! |---|---|---|
//! | [`vm_run`] / [`VM_RUN`] | same | [`vm_run_13`] / [`VM_RUN_13`] |
//! | [`vm_stats`] / [`VM_STATS`] | same | [`vm_stats_13`] / [`VM_STATS_13`] |
//! | [`vm_snapshot_meta`] / [`VM_SNAPSHOT_REQ`] | same | [`vm_snapshot_meta_13`] / [`VM_SNAPSHOT_REQ_13`] |
//! | [`vm_memseg`] / [`VM_ALLOC_MEMSEG`], [`VM_GET_MEMSEG`] | [`vm_memseg_14`] / [`VM_ALLOC_MEMSEG_14`], [`VM_GET_MEMSEG_14`] | as 14 |
//! | [`vm_inout_str`], [`vm_exit`] | [`vm_inout_str_14`], [`vm_exit_14`] | [`vm_inout_str_14`], [`vm_exit_13`] |
//! | [`cpuset_t`] (1024 bits) | same | [`cpuset_t_13`] (256 bits) |
//! | [`VM_BOOTROM`] = 8, … | [`VM_BOOTROM_14`] = 1, … | as 14 |
//!
//! Enums only grew at their end between releases, so one set of values serves all three; the
//! `*_LAST`/`*_MAX` sentinels that moved have `_13`/`_14` variants.
//!
//! FreeBSD's C enums are `int`-sized; they are modelled as a `c_int` type alias plus one constant
//! per value, so a value the kernel adds later can never make a Rust value invalid. C bitfields are
//! stored as plain integers (fields named `_bitfield_<byte offset>`) with getter/setter methods.
//!
//! The layout facts (sizes, offsets, request codes, enum values) are checked against a table
//! measured from the C headers: `tests/data/vmm-abi.tsv`, see `tests/abi_table.rs`.

#![allow(non_camel_case_types, non_upper_case_globals, non_snake_case)]
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(not(target_pointer_width = "64"))]
compile_error!("vmm-sys describes the FreeBSD amd64 (LP64) ABI and needs a 64-bit host");

#[macro_use]
mod macros;

mod compat;
mod cpuset;
mod ioccom;
mod vmm;
mod vmm_dev;
mod vmm_snapshot;
mod vmmctl;

#[cfg(target_os = "freebsd")]
pub mod ioctls;

pub use compat::*;
pub use cpuset::*;
pub use ioccom::*;
pub use vmm::*;
pub use vmm_dev::*;
pub use vmm_snapshot::*;
pub use vmmctl::*;

pub use core::ffi::{c_char, c_int, c_uint, c_void};
pub use libc::c_ulong;

/// Guest-physical address (`vm_paddr_t`, 64 bits on amd64).
pub type vm_paddr_t = u64;
/// Offset into a VM object (`vm_ooffset_t`, signed 64 bits).
pub type vm_ooffset_t = i64;
/// FreeBSD amd64 `time_t` (signed 64 bits).
pub type time_t = i64;
