//! The per-VM control socket and the libnv nvlist wire format it speaks.

pub mod client;
pub mod nvlist;
pub mod transport;
