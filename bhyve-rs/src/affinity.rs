//! Host CPU pinning of vCPU threads (`-p vcpu:hostcpu`, config `vcpu.N.cpuset`): as in bhyve,
//! each vCPU thread restricts itself to its host CPUs when it starts. The host CPUs are checked
//! before the VM runs, so a CPU that does not exist is an error, not a failed thread.

use crate::config::Config;

/// Host CPUs of each vCPU below `ncpus` (`None`: not pinned), checked against the CPUs this
/// process may run on.
pub fn vcpu_host_cpus(config: &Config, ncpus: u16) -> Result<Vec<Option<Vec<u32>>>, String> {
    check_host_cpus(&crate::description::vcpu_cpusets(config, ncpus)?)
}

/// `cpusets` (host CPUs by vCPU, as [`crate::description::MachineDescription`] holds them)
/// checked against the CPUs this process may run on.
pub fn check_host_cpus(cpusets: &[Option<Vec<u32>>]) -> Result<Vec<Option<Vec<u32>>>, String> {
    let cpusets = cpusets.to_vec();
    if cpusets.iter().all(Option::is_none) {
        return Ok(cpusets);
    }
    let available = available_host_cpus()?;
    for (vcpu, cpus) in cpusets.iter().enumerate() {
        if let Some(missing) = cpus.iter().flatten().find(|c| !available.contains(c)) {
            return Err(format!(
                "vcpu {vcpu}: host CPU {missing} does not exist or is not available \
                 (available: {})",
                cpu_list(&available)
            ));
        }
    }
    Ok(cpusets)
}

/// `0-3,6` style list of sorted CPU numbers.
fn cpu_list(cpus: &[u32]) -> String {
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    for &cpu in cpus {
        match ranges.last_mut() {
            Some((_, end)) if *end + 1 == cpu => *end = cpu,
            _ => ranges.push((cpu, cpu)),
        }
    }
    ranges
        .iter()
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(any(target_os = "linux", target_os = "freebsd"))]
mod host {
    use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
    use nix::unistd::Pid;

    /// The host CPUs the calling thread may run on (sorted).
    pub fn available_host_cpus() -> Result<Vec<u32>, String> {
        let set = sched_getaffinity(Pid::from_raw(0))
            .map_err(|e| format!("cannot read the host CPU affinity: {e}"))?;
        Ok((0..CpuSet::count())
            .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
            .map(|cpu| cpu as u32)
            .collect())
    }

    /// Restricts the calling thread to `cpus`.
    pub fn pin_current_thread(cpus: &[u32]) -> std::io::Result<()> {
        let mut set = CpuSet::new();
        for &cpu in cpus {
            set.set(cpu as usize)?;
        }
        sched_setaffinity(Pid::from_raw(0), &set)?;
        Ok(())
    }
}

#[cfg(not(any(target_os = "linux", target_os = "freebsd")))]
mod host {
    pub fn available_host_cpus() -> Result<Vec<u32>, String> {
        Err("pinning vCPUs to host CPUs is not supported on this host".into())
    }

    pub fn pin_current_thread(_cpus: &[u32]) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

pub use host::{available_host_cpus, pin_current_thread};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_collapse_runs() {
        assert_eq!(cpu_list(&[0, 1, 2, 3, 6, 8, 9]), "0-3,6,8-9");
        assert_eq!(cpu_list(&[5]), "5");
        assert_eq!(cpu_list(&[]), "");
    }

    #[test]
    fn unpinned_vcpus_need_no_host_lookup() {
        assert_eq!(vcpu_host_cpus(&Config::new(), 2).unwrap(), vec![None, None]);
    }

    #[test]
    fn a_host_cpu_outside_the_affinity_mask_is_refused() {
        let available = available_host_cpus().unwrap();
        let mut config = Config::new();
        config.set("vcpu.0.cpuset", &available[0].to_string());
        assert_eq!(
            vcpu_host_cpus(&config, 1).unwrap(),
            vec![Some(vec![available[0]])]
        );
        config.set("vcpu.1.cpuset", "1023");
        let err = vcpu_host_cpus(&config, 2).unwrap_err();
        assert!(
            err.starts_with("vcpu 1: host CPU 1023 does not exist or is not available"),
            "{err}"
        );
    }

    #[test]
    fn the_calling_thread_can_be_pinned() {
        let available = available_host_cpus().unwrap();
        let last = *available.last().unwrap();
        std::thread::spawn(move || {
            pin_current_thread(&[last]).unwrap();
            assert_eq!(available_host_cpus().unwrap(), vec![last]);
        })
        .join()
        .unwrap();
    }
}
