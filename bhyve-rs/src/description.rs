//! The machine a configuration tree describes, parsed once: topology, memory, host CPU pinning
//! and the run-time switches every layer below reads. The command line checks a tree by building
//! this description, and the machine is built from the same value, so an option cannot pass one
//! check and fail another (`-o cpus=+2` is two vCPUs for both, as FreeBSD's strtol says).

use crate::config::cnum;
use crate::config::Config;
use crate::memory::DEFAULT_MEMSIZE;

/// FreeBSD's `CPU_SETSIZE` (amd64), the bound of host CPU numbers.
pub const CPU_SETSIZE: i64 = 1024;

/// Everything about the VM the rest of the program needs from the tree, beyond the devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineDescription {
    /// The VM name (`name`); absent only while a restore has not read it from its snapshot.
    pub name: Option<String>,
    pub topology: Topology,
    /// Guest RAM in bytes.
    pub memory_size: u64,
    /// Host CPUs for each vCPU thread (`vcpu.N.cpuset`), by vCPU index; `None`: not pinned.
    pub vcpu_host_cpus: Vec<Option<Vec<u32>>>,
    /// `memory.wired` (`-S`): wire guest memory before the guest runs.
    pub memory_wired: bool,
    /// `memory.guest_in_core` (`-C`): include guest memory in core dumps.
    pub guest_in_core: bool,
    /// `x86.strictio` (`-e`): an access to a port no device owns stops the VM.
    pub strict_io: bool,
    /// `x86.strictmsr` (on unless `-w`): an access to an MSR nothing emulates raises #GP.
    pub strict_msr: bool,
    /// `x86.vmexit_on_hlt` (`-H`): HLT leaves the guest to yield the host CPU.
    pub exit_on_hlt: bool,
    /// `x86.vmexit_on_pause` (`-P`): PAUSE leaves the guest.
    pub exit_on_pause: bool,
    /// `x86.x2apic` (`-x`; `-a` turns it off): local APICs start in x2APIC mode.
    pub x2apic: bool,
}

impl MachineDescription {
    /// Parse the tree. The error is the message FreeBSD's bhyve gives for the same mistake.
    pub fn from_config(config: &Config) -> Result<Self, DescriptionError> {
        let topology = topology(config).map_err(DescriptionError::Topology)?;
        let vcpu_host_cpus =
            vcpu_cpusets(config, topology.cpus).map_err(DescriptionError::Topology)?;
        let memory_size = memory_size(config).map_err(DescriptionError::MemorySize)?;
        let flag = |key: &str, default: bool| {
            config
                .get_bool(key)
                .map(|v| v.unwrap_or(default))
                .map_err(DescriptionError::Setting)
        };
        Ok(Self {
            name: config.get("name").map(str::to_string),
            topology,
            memory_size,
            vcpu_host_cpus,
            memory_wired: flag("memory.wired", false)?,
            guest_in_core: flag("memory.guest_in_core", false)?,
            strict_io: flag("x86.strictio", false)?,
            strict_msr: flag("x86.strictmsr", true)?,
            exit_on_hlt: flag("x86.vmexit_on_hlt", false)?,
            exit_on_pause: flag("x86.vmexit_on_pause", false)?,
            x2apic: flag("x86.x2apic", false)?,
        })
    }
}

/// Why a tree does not describe a machine; the text is the one-line message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptionError {
    /// `cpus`, `sockets`, `cores`, `threads` or a `vcpu.N.cpuset` (bhyve exits 4).
    #[error("{0}")]
    Topology(String),
    /// `memory.size` (bhyve exits with EX_USAGE).
    #[error("{0}")]
    MemorySize(String),
    /// Any other setting.
    #[error("{0}")]
    Setting(String),
}

/// The CPU topology bhyve derives from `cpus`, `sockets`, `cores` and `threads`. vCPU `i` has
/// APIC id `i`, as in bhyve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    pub cpus: u16,
    pub sockets: u16,
    pub cores: u16,
    pub threads: u16,
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            cpus: 1,
            sockets: 1,
            cores: 1,
            threads: 1,
        }
    }
}

/// The topology from the tree with FreeBSD's checks (`calc_topology`); the error is the message.
pub fn topology(config: &Config) -> Result<Topology, String> {
    let int = |key: &str| -> Result<Option<u16>, String> {
        match config.get_expanded(key) {
            None => Ok(None),
            Some(v) => cnum::strtol_whole(&v)
                .filter(|n| (1..=i64::from(u16::MAX)).contains(n))
                .map(|n| Some(n as u16))
                .ok_or_else(|| format!("Invalid value for {key}: '{v}'")),
        }
    };
    let explicit = int("cpus")?;
    let cores = int("cores")?.unwrap_or(1);
    let threads = int("threads")?.unwrap_or(1);
    let sockets = int("sockets")?.unwrap_or(explicit.unwrap_or(1));
    let product = u64::from(sockets) * u64::from(cores) * u64::from(threads);
    if product > u64::from(u16::MAX) {
        return Err(format!("Computed number of vCPUs too high: {product}"));
    }
    let cpus = match explicit {
        Some(n) if u64::from(n) != product => {
            return Err(format!(
                "Topology ({sockets} sockets, {cores} cores, {threads} threads) does not match {n} vCPUs"
            ))
        }
        Some(n) => n,
        None => product as u16,
    };
    Ok(Topology {
        cpus,
        sockets,
        cores,
        threads,
    })
}

/// Host CPUs each vCPU below `ncpus` is pinned to (`vcpu.N.cpuset`, lists and `a-b` ranges),
/// with FreeBSD's checks (`build_vcpumaps`); `None` for an unpinned vCPU.
pub fn vcpu_cpusets(config: &Config, ncpus: u16) -> Result<Vec<Option<Vec<u32>>>, String> {
    (0..ncpus)
        .map(|vcpu| {
            let mut key = format!("vcpu.{vcpu}.cpuset");
            key.truncate(15);
            config
                .get_expanded(&key)
                .map(|list| parse_cpuset(vcpu, &list))
                .transpose()
        })
        .collect()
}

fn parse_cpuset(vcpu: u16, list: &str) -> Result<Vec<u32>, String> {
    let invalid = || format!("invalid cpuset for vcpu {vcpu}: '{list}'");
    let mut set = std::collections::BTreeSet::new();
    let mut start: Option<i64> = None;
    let mut token = list;
    loop {
        let (pcpu, rest) = strtoul_prefix(token).ok_or_else(invalid)?;
        if !(0..CPU_SETSIZE).contains(&pcpu) {
            return Err(format!(
                "hostcpu '{pcpu}' outside valid range from 0 to {}",
                CPU_SETSIZE - 1
            ));
        }
        match rest.as_bytes().first() {
            None | Some(b',') => {
                if let Some(s) = start.take() {
                    if s > pcpu {
                        return Err(format!("Invalid hostcpu range {s}-{pcpu}"));
                    }
                    set.extend((s..pcpu).map(|c| c as u32));
                }
                set.insert(pcpu as u32);
            }
            Some(b'-') => {
                if start.is_some() {
                    return Err(invalid());
                }
                start = Some(pcpu);
            }
            Some(_) => return Err(invalid()),
        }
        if rest.is_empty() {
            break;
        }
        token = &rest[1..];
    }
    Ok(set.into_iter().collect())
}

/// `strtoul(token, &end, 0)` assigned to an `int`: the value (negative for `-N` or wrapped huge
/// numbers) and the rest, or `None` when nothing converts.
fn strtoul_prefix(token: &str) -> Option<(i64, &str)> {
    cnum::strtoul(token).map(|(value, rest)| (i64::from(value as i32), rest))
}

/// Guest memory size in bytes from `memory.size` (256 MiB when unset); the error is FreeBSD's
/// message.
pub fn memory_size(config: &Config) -> Result<u64, String> {
    let Some(value) = config.get_expanded("memory.size") else {
        return Ok(DEFAULT_MEMSIZE);
    };
    crate::config::parse_memsize(&value)
        .filter(|&size| size > 0)
        .ok_or_else(|| format!("invalid memsize '{value}'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_size_defaults_to_256m_and_rejects_garbage() {
        assert_eq!(memory_size(&Config::new()).unwrap(), 256 << 20);
        assert_eq!(
            memory_size(&Config::from_pairs(&[("memory.size", "5G")])).unwrap(),
            5 << 30
        );
        let err = memory_size(&Config::from_pairs(&[("memory.size", "lots")])).unwrap_err();
        assert_eq!(err.to_string(), "invalid memsize 'lots'");
        assert!(memory_size(&Config::from_pairs(&[("memory.size", "0")])).is_err());
    }

    #[test]
    fn topology_follows_bhyve_defaults_and_checks() {
        assert_eq!(topology(&Config::new()).unwrap(), Topology::default());
        let t = topology(&Config::from_pairs(&[("cpus", "4")])).unwrap();
        assert_eq!((t.cpus, t.sockets, t.cores, t.threads), (4, 4, 1, 1));
        let t = topology(&Config::from_pairs(&[
            ("sockets", "2"),
            ("cores", "2"),
            ("threads", "2"),
        ]))
        .unwrap();
        assert_eq!(t.cpus, 8);
        let err = topology(&Config::from_pairs(&[("cpus", "3"), ("cores", "2")])).unwrap_err();
        assert!(err.to_string().contains("does not match 3 vCPUs"), "{err}");
        assert!(topology(&Config::from_pairs(&[("cpus", "0")])).is_err());
        assert!(topology(&Config::from_pairs(&[("cpus", "x")])).is_err());
        assert!(topology(&Config::from_pairs(&[("sockets", "300"), ("cores", "300")])).is_err());
    }

    #[test]
    fn the_description_reads_every_switch_once_with_bhyve_defaults() {
        let d = MachineDescription::from_config(&Config::new()).unwrap();
        assert_eq!(d.topology, Topology::default());
        assert_eq!(d.memory_size, DEFAULT_MEMSIZE);
        assert!(d.strict_msr && !d.strict_io && !d.memory_wired && !d.x2apic);
        let d = MachineDescription::from_config(&Config::from_pairs(&[
            ("cpus", "+2"),
            ("vcpu.1.cpuset", "0"),
            ("x86.strictmsr", "false"),
            ("memory.wired", "true"),
        ]))
        .unwrap();
        assert_eq!(d.topology.cpus, 2);
        assert_eq!(d.vcpu_host_cpus, vec![None, Some(vec![0])]);
        assert!(!d.strict_msr && d.memory_wired);
        let err =
            MachineDescription::from_config(&Config::from_pairs(&[("x86.strictio", "maybe")]))
                .unwrap_err();
        assert_eq!(
            err,
            DescriptionError::Setting("invalid boolean value 'maybe' for 'x86.strictio'".into())
        );
    }
}
