//! FreeBSD's ioctl request encoding (`<sys/ioccom.h>`).
//!
//! These are FreeBSD's rules, not the host's: Linux packs direction and size differently, so the
//! codes are computed here rather than with `nix`/`libc` helpers.

use crate::c_ulong;

/// Number of bits of the parameter length (`IOCPARM_SHIFT`).
pub const IOCPARM_SHIFT: u32 = 13;
/// Mask of the parameter length.
pub const IOCPARM_MASK: u32 = (1 << IOCPARM_SHIFT) - 1;
/// Largest parameter the kernel copies in or out for an ioctl.
pub const IOCPARM_MAX: u32 = 1 << IOCPARM_SHIFT;
/// No parameters.
pub const IOC_VOID: u32 = 0x2000_0000;
/// The kernel copies the parameter out to the caller.
pub const IOC_OUT: u32 = 0x4000_0000;
/// The kernel copies the parameter in from the caller.
pub const IOC_IN: u32 = 0x8000_0000;
/// Copy in and out.
pub const IOC_INOUT: u32 = IOC_IN | IOC_OUT;

/// Encodes a request: `inout | ((len & IOCPARM_MASK) << 16) | (group << 8) | num`.
///
/// Fails to compile (when used in a constant) if `len` does not fit the 13-bit length field.
pub const fn _IOC(inout: u32, group: u8, num: u8, len: usize) -> c_ulong {
    assert!(len <= IOCPARM_MASK as usize, "ioctl parameter too large");
    (inout | ((len as u32 & IOCPARM_MASK) << 16) | ((group as u32) << 8) | num as u32) as c_ulong
}

/// A request without a parameter.
pub const fn _IO(group: u8, num: u8) -> c_ulong {
    _IOC(IOC_VOID, group, num, 0)
}

/// A request whose parameter of `len` bytes the kernel writes (copy-out).
pub const fn _IOR(group: u8, num: u8, len: usize) -> c_ulong {
    _IOC(IOC_OUT, group, num, len)
}

/// A request whose parameter of `len` bytes the kernel reads (copy-in).
pub const fn _IOW(group: u8, num: u8, len: usize) -> c_ulong {
    _IOC(IOC_IN, group, num, len)
}

/// A request whose parameter of `len` bytes is copied in and back out.
pub const fn _IOWR(group: u8, num: u8, len: usize) -> c_ulong {
    _IOC(IOC_INOUT, group, num, len)
}

/// Direction bits of a request (`IOC_DIRMASK` applied).
pub const fn IOC_DIR(request: c_ulong) -> u32 {
    request as u32 & (IOC_VOID | IOC_OUT | IOC_IN)
}

/// Parameter length of a request (`IOCPARM_LEN`).
pub const fn IOCPARM_LEN(request: c_ulong) -> usize {
    ((request as u32 >> 16) & IOCPARM_MASK) as usize
}

/// Group byte of a request (`IOCGROUP`).
pub const fn IOCGROUP(request: c_ulong) -> u8 {
    (request >> 8) as u8
}

/// Ordinal within the group (the low byte).
pub const fn IOCBASECMD_NUM(request: c_ulong) -> u8 {
    request as u8
}

// The host's own encoding must agree where the host is FreeBSD.
#[cfg(target_os = "freebsd")]
const _: () = assert!(_IOR(b'f', 127, core::mem::size_of::<crate::c_int>()) == libc::FIONREAD);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{c_int, vm_register};
    use core::mem::size_of;

    #[test]
    fn ioc_macros_reproduce_known_freebsd_request_codes() {
        assert_eq!(_IOR(b'f', 127, size_of::<c_int>()), 0x4004_667f); // FIONREAD
        assert_eq!(_IOW(b'f', 126, size_of::<c_int>()), 0x8004_667e); // FIONBIO
        assert_eq!(_IO(b'f', 1), 0x2000_6601); // FIOCLEX
        assert_eq!(_IOWR(b'v', 21, size_of::<vm_register>()), 0xc010_7615); // VM_GET_REGISTER
        assert_eq!(_IOW(b'v', 20, size_of::<vm_register>()), 0x8010_7614); // VM_SET_REGISTER
        assert_eq!(_IO(b'v', 5), 0x2000_7605); // VM_REINIT
    }

    #[test]
    fn request_fields_decode_back_to_their_parts() {
        let request = _IOWR(b'v', 50, 544);
        assert_eq!(IOC_DIR(request), IOC_INOUT);
        assert_eq!(IOCPARM_LEN(request), 544);
        assert_eq!(IOCGROUP(request), b'v');
        assert_eq!(IOCBASECMD_NUM(request), 50);
    }

    #[test]
    fn parameter_longer_than_thirteen_bits_is_refused() {
        // C would silently mask the length and produce a request the kernel misreads.
        let result = std::panic::catch_unwind(|| _IOW(b'v', 1, IOCPARM_MAX as usize));
        assert!(result.is_err());
        assert_eq!(_IOW(b'v', 1, IOCPARM_MASK as usize), 0x9fff_7601);
    }
}
