//! virtio-console (pci_virtio_console.c): up to 16 ports, each a UNIX socket on the host.
//!
//! [`socket`] holds the host side of a port: the listening socket, the one client it serves
//! at a time, and the bytes on their way to it.

pub mod socket;

#[cfg(test)]
mod tests;
