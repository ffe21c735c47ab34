//! FreeBSD's own bit-set and time types as the vmm interface sees them.
//!
//! The `libc` crate's FreeBSD `cpuset_t` follows the FreeBSD 12 ABI (256 bits) unless built with
//! a special cfg, so these are defined here with the sizes of FreeBSD 14/15 userland.

/// Bits in a userland `cpuset_t` on FreeBSD 14 and 15 (`CPU_SETSIZE`).
pub const CPU_SETSIZE: usize = 1024;
/// Largest `cpuset_t` the kernel accepts (`CPU_MAXSIZE`); `VM_GET_CPUS` takes 1..=128 bytes.
pub const CPU_MAXSIZE: usize = 1024;
/// Bits in a `cpuset_t` on FreeBSD 13.
pub const CPU_SETSIZE_13: usize = 256;
/// Bits in a userland `domainset_t` (`DOMAINSET_MAXSIZE`, also `DOMAINSET_SETSIZE`).
pub const DOMAINSET_MAXSIZE: usize = 256;
/// Bits in the amd64 kernel's `domainset_t` (`MAXMEMDOM`).
pub const DOMAINSET_SETSIZE_KERNEL: usize = 64;

const LONG_BITS: usize = 64;

/// FreeBSD 14/15 `cpuset_t`: 1024 bits stored in C `long`s, bit `n` is vCPU/CPU `n`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct cpuset_t {
    /// The bits, least significant bit of word 0 first.
    pub __bits: [u64; CPU_SETSIZE / LONG_BITS],
}

/// FreeBSD 13 `cpuset_t`: 256 bits (also the `libc` crate's default `cpuset_t`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct cpuset_t_13 {
    /// The bits, least significant bit of word 0 first.
    pub __bits: [u64; CPU_SETSIZE_13 / LONG_BITS],
}

/// Userland `domainset_t`: 256 NUMA domain bits (pointed to by [`crate::vm_memseg::ds_mask`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct domainset_t {
    /// The bits, least significant bit of word 0 first.
    pub __bits: [u64; DOMAINSET_MAXSIZE / LONG_BITS],
}

/// The amd64 kernel's `domainset_t` (8 domains, one `long`); the smallest mask `VM_ALLOC_MEMSEG`
/// accepts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct domainset_t_kernel {
    /// The bits.
    pub __bits: [u64; DOMAINSET_SETSIZE_KERNEL / LONG_BITS],
}

/// FreeBSD amd64 `struct timeval`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct timeval {
    /// Seconds.
    pub tv_sec: crate::time_t,
    /// Microseconds (`suseconds_t`, a `long`).
    pub tv_usec: i64,
}

zeroed_default!(cpuset_t, cpuset_t_13, domainset_t, domainset_t_kernel);

assert_layout!(cpuset_t, size 128, align 8);
assert_layout!(cpuset_t_13, size 32, align 8);
assert_layout!(domainset_t, size 32, align 8);
assert_layout!(domainset_t_kernel, size 8, align 8);
assert_layout!(timeval, size 16, align 8, { tv_sec: 0, tv_usec: 8 });
