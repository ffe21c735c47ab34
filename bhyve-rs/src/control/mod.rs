//! The per-VM control socket and the libnv nvlist wire format it speaks.
//!
//! [`nvlist`] is the codec, [`transport`] moves lists over a stream socket, [`server`] is
//! bhyve's end (started only by snapshot-enabled builds), [`client`] is bhyvectl's.

pub mod client;
pub mod nvlist;
pub mod server;
pub mod transport;
