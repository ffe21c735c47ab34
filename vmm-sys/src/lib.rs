//! Raw bindings to FreeBSD's amd64 `/dev/vmm` interface.
//!
//! Everything here is data: request codes computed with FreeBSD's `_IOC` encoding (independent of
//! the host OS), `#[repr(C)]` argument structs with compile-time layout assertions, and the enums
//! and constants of `<machine/vmm.h>` and `<machine/vmm_dev.h>`. The thin ioctl wrappers exist only
//! when building for FreeBSD.
