//! Network backends, as FreeBSD's net_backends.c: what a network device model (virtio-net,
//! e1000) sends its guest's frames to and receives frames from.
//!
//! A device's configuration node names its backend with `backend` (`tap0`, `vmnet1`, `slirp`,
//! …) and optionally `type`; as in bhyve the backend is the first one whose prefix starts the
//! `type` value, or the `backend` value when there is no `type`, and the `backend` value is
//! the device (interface) name. So `backend=tap0` attaches the tap interface `tap0`, and
//! `backend=mynet,type=tap` the tap interface `mynet`.
//!
//! Frames cross the [`NetBackend`] trait without a virtio-net header unless the device asked
//! for one through [`NetBackend::set_capabilities`] and the backend accepted it; none of the
//! backends here offers offloads, so device models add and strip the header themselves.
//!
//! The MAC address helpers ([`generate_mac`], [`parse_mac`], [`parse_mtu`]) follow net_utils.c.

pub mod e1000;
#[cfg(test)]
pub(crate) mod pair_backend;
#[cfg(any(target_os = "linux", target_os = "freebsd"))]
pub mod slirp;
pub mod tap;
pub mod virtio_net;

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::BorrowedFd;

use crate::config::legacy::{LegacyError, LegacyWriter};
use crate::config::Config;

/// The `-s` option string of a network device (`netbe_legacy_config`): the first token is
/// `backend`, the rest `key=value` settings.
pub fn legacy_config(
    w: &mut LegacyWriter<'_>,
    node: &str,
    conf: Option<&str>,
) -> Result<(), LegacyError> {
    w.first_token_then_generic(node, "backend", conf)
}

/// Length of the virtio-net header with `num_buffers` (mergeable receive buffers, or any
/// modern device); without the field it is two bytes shorter. These are the only lengths a
/// header may have (`netbe_set_cap`).
pub const VNET_HDR_LEN: usize = 12;

/// The largest frame a backend hands over: a 64 KiB TSO segment plus headers. Receive buffers
/// of this size never truncate a frame.
pub const MAX_FRAME_LEN: usize = 65536 + 64;

/// Why a network backend cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("network backend \"{0}\" is unknown (known: tapN, vmnetN, slirp, and on FreeBSD netgraph, netmap:IF, valeX:Y)")]
    Unknown(String),
    /// netgraph, netmap and vale: FreeBSD kernel facilities.
    #[error("network backend \"{name}\" needs {facility}, {why}")]
    FreeBsdOnly {
        name: String,
        facility: &'static str,
        why: &'static str,
    },
    #[error("network backend \"{name}\" is not available on this platform")]
    Unavailable { name: String },
    #[error("cannot open tap interface \"{name}\": {source}")]
    Tap { name: String, source: io::Error },
    #[error("slirp: {0}")]
    Slirp(String),
    #[error("invalid hostfwd rule \"{rule}\": {reason}")]
    HostForward { rule: String, reason: String },
    #[error("invalid value \"{value}\" for {key} (expected true or false)")]
    Flag { key: String, value: String },
    #[error("network backend \"{name}\" offers no offloads or virtio-net header")]
    Capabilities { name: String },
}

/// A network backend: frames out to the host side, frames in for the guest.
///
/// All calls are non-blocking. A device model waits for [`NetBackend::ready_fd`] to become
/// readable, then takes frames with [`NetBackend::recv`] until it returns 0; it stops polling
/// the descriptor while it has no receive buffers (bhyve's `netbe_rx_disable`).
pub trait NetBackend: Send {
    /// The backend's name as configured (`tap0`, `slirp`), for messages.
    fn name(&self) -> &str;

    /// Send one frame gathered from `frame`. Returns the bytes taken; a frame the host side
    /// cannot take now is dropped, as a wire would.
    fn send(&mut self, frame: &[IoSlice<'_>]) -> io::Result<usize>;

    /// The length of the next frame waiting, or 0 when none is.
    fn peek_recv_len(&mut self) -> io::Result<usize>;

    /// Receive the next frame into `buffers`; 0 when none is waiting. A frame longer than
    /// the buffers is truncated to them.
    fn recv(&mut self, buffers: &mut [IoSliceMut<'_>]) -> io::Result<usize>;

    /// Readable when a frame may be waiting.
    fn ready_fd(&self) -> BorrowedFd<'_>;

    /// The virtio-net feature bits (offloads) the backend supports (`netbe_get_cap`).
    fn capabilities(&self) -> u64 {
        0
    }

    /// Enable `features` (a subset of [`NetBackend::capabilities`]) with frames carrying a
    /// virtio-net header of `vnet_hdr_len` bytes (0, 10 or 12) on both paths
    /// (`netbe_set_cap`). Backends without offloads accept only nothing.
    fn set_capabilities(&mut self, features: u64, vnet_hdr_len: usize) -> Result<(), NetError> {
        if features != 0 || vnet_hdr_len != 0 {
            return Err(NetError::Capabilities {
                name: self.name().to_string(),
            });
        }
        Ok(())
    }

    /// The header length [`NetBackend::set_capabilities`] enabled (0: plain frames).
    fn vnet_hdr_len(&self) -> usize {
        0
    }

    /// Drop the next frame (the guest has no buffer for it). Returns its length, 0 if none.
    fn discard(&mut self) -> io::Result<usize> {
        let mut sink = vec![0u8; MAX_FRAME_LEN];
        self.recv(&mut [IoSliceMut::new(&mut sink)])
    }
}

/// The backend kinds bhyve knows, by prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tap,
    Slirp,
    Netgraph,
    Netmap,
}

/// bhyve's backend table: a prefix and the kind it selects (`vmnet` is a tap clone, `vale` a
/// netmap clone).
const PREFIXES: &[(&str, Kind)] = &[
    ("tap", Kind::Tap),
    ("vmnet", Kind::Tap),
    ("netgraph", Kind::Netgraph),
    ("netmap", Kind::Netmap),
    ("vale", Kind::Netmap),
    ("slirp", Kind::Slirp),
];

/// Why netgraph and netmap backends are refused here.
#[cfg(target_os = "freebsd")]
const FREEBSD_ONLY: &str = "which this program does not support yet";
#[cfg(not(target_os = "freebsd"))]
const FREEBSD_ONLY: &str = "a FreeBSD kernel facility this platform does not have";

/// What a device node's backend keys ask for, checked without opening anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    /// A tap interface (`tapN`, `vmnetN`, or any name with `type=tap`).
    Tap { name: String },
    /// User-mode networking through libslirp; `hostfwd` rules separated by `;`. `open` (as
    /// FreeBSD 15's slirp-helper) lets the guest connect out through the host; otherwise it
    /// reaches only the gateway and what `hostfwd` forwards.
    Slirp {
        hostfwd: Vec<HostForward>,
        open: bool,
    },
}

impl BackendSpec {
    /// The backend `node` (a device's configuration node) names, if any. netgraph, netmap
    /// and vale are refused by name on platforms that lack them.
    pub fn from_config(config: &Config, node: &str) -> Result<Option<Self>, NetError> {
        let Some(name) = config.get(&format!("{node}.backend")) else {
            return Ok(None);
        };
        let kind_name = config.get(&format!("{node}.type")).unwrap_or(name);
        let Some(&(_, kind)) = PREFIXES
            .iter()
            .find(|(prefix, _)| kind_name.starts_with(prefix))
        else {
            return Err(NetError::Unknown(kind_name.to_string()));
        };
        match kind {
            Kind::Tap => Ok(Some(BackendSpec::Tap {
                name: name.to_string(),
            })),
            Kind::Slirp => {
                let hostfwd = match config.get(&format!("{node}.hostfwd")) {
                    Some(rules) => rules
                        .split(';')
                        .map(HostForward::parse)
                        .collect::<Result<_, _>>()?,
                    None => Vec::new(),
                };
                let open_key = format!("{node}.open");
                let open = config.get_bool(&open_key).map_err(|_| NetError::Flag {
                    value: config.get(&open_key).unwrap_or_default().to_string(),
                    key: open_key,
                })?;
                Ok(Some(BackendSpec::Slirp {
                    hostfwd,
                    open: open.unwrap_or(false),
                }))
            }
            Kind::Netgraph => Err(NetError::FreeBsdOnly {
                name: name.to_string(),
                facility: "netgraph(4)",
                why: FREEBSD_ONLY,
            }),
            Kind::Netmap => Err(NetError::FreeBsdOnly {
                name: name.to_string(),
                facility: "netmap(4)",
                why: FREEBSD_ONLY,
            }),
        }
    }

    /// Open the backend.
    pub fn open(&self) -> Result<Box<dyn NetBackend>, NetError> {
        match self {
            BackendSpec::Tap { name } => Ok(Box::new(tap::Tap::open(name)?)),
            #[cfg(any(target_os = "linux", target_os = "freebsd"))]
            BackendSpec::Slirp { hostfwd, open } => {
                Ok(Box::new(slirp::Slirp::open(hostfwd, *open)?))
            }
            #[cfg(not(any(target_os = "linux", target_os = "freebsd")))]
            BackendSpec::Slirp { .. } => Err(NetError::Unavailable {
                name: "slirp".into(),
            }),
        }
    }
}

/// One `hostfwd` rule, `[tcp|udp]:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT`, as
/// net_backend_slirp.c parses it: an empty address is "any" (for the guest side, libslirp's
/// first DHCP address), a protocol other than `udp` means TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostForward {
    pub udp: bool,
    pub host: std::net::SocketAddrV4,
    pub guest: std::net::SocketAddrV4,
}

impl HostForward {
    pub fn parse(rule: &str) -> Result<Self, NetError> {
        let invalid = |reason: &str| NetError::HostForward {
            rule: rule.to_string(),
            reason: reason.to_string(),
        };
        let (protocol, addresses) = rule
            .split_once(':')
            .ok_or_else(|| invalid("expected PROTOCOL:HOST-GUEST"))?;
        let (host, guest) = addresses
            .split_once('-')
            .ok_or_else(|| invalid("expected HOSTADDR:PORT-GUESTADDR:PORT"))?;
        let address = |part: &str| -> Result<std::net::SocketAddrV4, NetError> {
            let (ip, port) = part
                .split_once(':')
                .ok_or_else(|| invalid("an address needs a :PORT"))?;
            let ip = if ip.is_empty() {
                std::net::Ipv4Addr::UNSPECIFIED
            } else {
                ip.parse().map_err(|_| invalid("not an IPv4 address"))?
            };
            let port = if port.is_empty() {
                0
            } else {
                port.parse::<u16>()
                    .map_err(|_| invalid("port out of range"))?
            };
            Ok(std::net::SocketAddrV4::new(ip, port))
        };
        Ok(HostForward {
            udp: protocol == "udp",
            host: address(host)?,
            guest: address(guest)?,
        })
    }
}

/// bhyve's OUI for generated addresses: the FreeBSD Foundation's.
pub const GENERATED_MAC_OUI: [u8; 3] = [0x58, 0x9c, 0xfc];

/// The MAC address bhyve gives a network device with no `mac=` (`net_genmac`): the OUI, then
/// the first three bytes of the MD5 of "SLOT-FUNCTION-VMNAME" (the bus is not part of it).
pub fn generate_mac(vm_name: &str, slot: u8, function: u8) -> [u8; 6] {
    let digest = md5::compute(format!("{slot}-{function}-{vm_name}").as_bytes());
    let [a, b, c] = GENERATED_MAC_OUI;
    [a, b, c, digest[0], digest[1], digest[2]]
}

/// A `mac=` value (`net_parsemac`): six colon-separated hexadecimal bytes, as ether_aton(3)
/// reads them; multicast and all-zero addresses are refused.
pub fn parse_mac(value: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = value.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    if parts.next().is_some() || mac[0] & 1 != 0 || mac == [0; 6] {
        return None;
    }
    Some(mac)
}

/// A MAC address as `58:9c:fc:01:02:03`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// An `mtu=` value (`net_parsemtu`): an unsigned C number (decimal, 0x hex, 0 octal).
/// The device model checks the range.
pub fn parse_mtu(value: &str) -> Option<u64> {
    crate::config::parse_c_unsigned(value)
}

#[cfg(test)]
mod tests;
