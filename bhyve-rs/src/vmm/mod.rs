//! The backend seam: one trait family, implemented by KVM (Linux) and vmm (FreeBSD).
