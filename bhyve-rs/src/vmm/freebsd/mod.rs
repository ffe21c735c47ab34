//! The FreeBSD backend: bhyve-rs over `/dev/vmm` through `vmm-sys`.
//!
//! - [`vmmapi`] (FreeBSD only): a safe, typed layer over the `/dev/vmm` requests, like
//!   libvmmapi: create and destroy (`/dev/vmmctl` on 15, the `hw.vmm.*` sysctls on 13 and 14),
//!   memory segments, registers, capabilities, `VM_RUN`, interrupts, the kernel RTC,
//!   statistics and snapshots.
//! - [`exits`]: what user space does with each `VM_RUN` exit record, as a pure function of the
//!   record, a register file, the guest bus and the [`crate::vmm::ExitHandler`]; it runs and
//!   is tested on every host.
//! - [`regs`]: the seam's register types to and from the kernel's register numbers and
//!   segment access rights.

#[cfg(target_os = "freebsd")]
pub mod backend;
pub mod exits;
pub mod regs;
pub mod snapshot;
#[cfg(target_os = "freebsd")]
pub mod vmmapi;

/// Why a VM name cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmNameError {
    #[error("the VM name is empty")]
    Empty,
    #[error("the VM name is longer than {} bytes", vmm_sys::VM_MAX_NAMELEN)]
    TooLong,
    #[error("the VM name may not contain '/' or NUL")]
    BadCharacter,
}

/// A VM name the kernel takes: 1 to `VM_MAX_NAMELEN` bytes, no slash (it names a device
/// below `/dev/vmm/`) and no NUL.
pub fn check_vm_name(name: &str) -> Result<(), VmNameError> {
    if name.is_empty() {
        return Err(VmNameError::Empty);
    }
    if name.len() > vmm_sys::VM_MAX_NAMELEN {
        return Err(VmNameError::TooLong);
    }
    if name.bytes().any(|b| b == b'/' || b == 0) {
        return Err(VmNameError::BadCharacter);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names_follow_the_kernels_limits() {
        assert_eq!(check_vm_name(""), Err(VmNameError::Empty));
        assert_eq!(check_vm_name("a/b"), Err(VmNameError::BadCharacter));
        assert_eq!(check_vm_name("a\0b"), Err(VmNameError::BadCharacter));
        // SPECNAMELEN 255 - prefix 10 - suffix 15 - 1 = 229 bytes.
        assert_eq!(check_vm_name(&"x".repeat(229)), Ok(()));
        assert_eq!(check_vm_name(&"x".repeat(230)), Err(VmNameError::TooLong));
        assert_eq!(check_vm_name("guest0"), Ok(()));
    }
}
