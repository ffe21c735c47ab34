//! The per-VM control socket and the libnv nvlist wire format it speaks.
//!
//! [`nvlist`] is the codec, [`transport`] moves lists over a stream socket, [`server`] is
//! bhyve's end, [`client`] is bhyvectl's, [`vmstate`] holds the register, statistics and memory
//! map messages behind `bhyvectl --get-*` / `--set-*`.

pub mod client;
pub mod nvlist;
pub mod server;
pub mod transport;
pub mod vmstate;
