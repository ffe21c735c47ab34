//! The FreeBSD backend: bhyve-rs over `/dev/vmm` through `vmm-sys`.
//!
//! - `vmmapi` (FreeBSD only): a safe, typed layer over the `/dev/vmm` requests, like
//!   libvmmapi: create and destroy (`/dev/vmmctl` on 15, the `hw.vmm.*` sysctls on 13 and 14),
//!   memory segments, registers, capabilities, `VM_RUN`, interrupts, the kernel RTC,
//!   statistics and snapshots.
//! - [`exits`]: what user space does with each `VM_RUN` exit record, as a pure function of the
//!   record, a register file, the guest bus and the [`crate::vmm::ExitHandler`]; it runs and
//!   is tested on every host.
//! - [`regs`]: the seam's register types to and from the kernel's register numbers and
//!   segment access rights.
//! - [`snapshot`]: the kernel structures a snapshot saves and the vCPU state's byte form.
//! - `backend` (FreeBSD only): the seam's `Hypervisor`, `Vm` and `Vcpu` over `vmmapi`.
//!
//! # How it is proved
//!
//! No FreeBSD machine runs these tests. On Linux:
//! - the FreeBSD build compiles and links (`make link-freebsd`), and every layout, request
//!   code and constant in `vmm-sys` is checked against FreeBSD's headers;
//! - `exits_tests`: records built from FreeBSD's `struct vm_exit` for every exit code the
//!   run loop handles (suspension, AP start, MSRs, breakpoints, VMX/SVM errors, port and
//!   string I/O, records of 13 and 14);
//! - `x86emul::kvm_oracle_tests::every_emulated_form_matches_kvms_emulator`: each instruction
//!   KVM ran (every MMIO form of the emulator, IN/OUT/INS/OUTS) is replayed through
//!   [`exits::handle_exit`] as the `INST_EMUL`, `INOUT` and `INOUT_STR` records FreeBSD's
//!   kernel would give (`replay`), and the registers, flags, RAM and device accesses must be
//!   KVM's.
//!
//! What is not proved here: that the kernel accepts the requests in this order and answers
//! as its sources say; that needs a FreeBSD host.

#[cfg(target_os = "freebsd")]
pub mod backend;
pub mod exits;
pub mod regs;
// Its user, the KVM oracle test, runs on Linux only.
#[cfg(all(test, target_os = "linux"))]
pub(crate) mod replay;
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

/// The release family of a FreeBSD kernel, as far as the `/dev/vmm` ABI is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum KernelAbi {
    V13,
    V14,
    V15,
}

impl KernelAbi {
    /// From `kern.osreldate` (`__FreeBSD_version`).
    pub fn from_osreldate(osreldate: u32) -> KernelAbi {
        match osreldate {
            0..=1_399_999 => KernelAbi::V13,
            1_400_000..=1_499_999 => KernelAbi::V14,
            _ => KernelAbi::V15,
        }
    }
}

/// `name` NUL-terminated in a kernel name buffer of `N` bytes; the errno for a name that
/// cannot be one (ENAMETOOLONG when it does not fit, EINVAL when it is empty or holds a slash
/// or NUL).
pub fn name_buffer<const N: usize>(name: &str) -> Result<[vmm_sys::c_char; N], i32> {
    if name.len() >= N {
        return Err(libc::ENAMETOOLONG);
    }
    match check_vm_name(name) {
        Ok(()) => {}
        Err(VmNameError::TooLong) => return Err(libc::ENAMETOOLONG),
        Err(_) => return Err(libc::EINVAL),
    }
    let mut buf = [0 as vmm_sys::c_char; N];
    for (dst, src) in buf.iter_mut().zip(name.bytes()) {
        *dst = src as vmm_sys::c_char;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_abi_follows_osreldate() {
        assert_eq!(KernelAbi::from_osreldate(1_302_001), KernelAbi::V13);
        assert_eq!(KernelAbi::from_osreldate(1_399_999), KernelAbi::V13);
        assert_eq!(KernelAbi::from_osreldate(1_400_000), KernelAbi::V14);
        assert_eq!(KernelAbi::from_osreldate(1_403_000), KernelAbi::V14);
        assert_eq!(KernelAbi::from_osreldate(1_500_000), KernelAbi::V15);
    }

    #[test]
    fn names_fill_kernel_buffers_with_their_nul() {
        let buf: [vmm_sys::c_char; 8] = name_buffer("guest").unwrap();
        assert_eq!(&buf[..6], &[103, 117, 101, 115, 116, 0]);
        assert_eq!(
            name_buffer::<8>("1234567"),
            Ok([49, 50, 51, 52, 53, 54, 55, 0])
        );
        assert_eq!(name_buffer::<8>("12345678"), Err(libc::ENAMETOOLONG));
        assert_eq!(name_buffer::<8>("a/b"), Err(libc::EINVAL));
        assert_eq!(name_buffer::<8>(""), Err(libc::EINVAL));
        let long: Result<[vmm_sys::c_char; 300], i32> = name_buffer(&"x".repeat(230));
        assert_eq!(long, Err(libc::ENAMETOOLONG));
    }

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
