//! bhyvectl(8): control and inspect bhyve virtual machines.

#[cfg(target_os = "freebsd")]
mod devvmm;
mod getopt_long;
mod options;
mod show;
#[cfg(not(target_os = "freebsd"))]
mod socket;
mod target;

use std::path::{Path, PathBuf};

use options::{option_table, parse_args, Args, Vendor};

/// The host CPU vendor, which decides the vendor-specific options (as on FreeBSD).
fn host_vendor() -> Result<Vendor, String> {
    #[cfg(target_arch = "x86_64")]
    {
        let leaf = std::arch::x86_64::__cpuid(0);
        let mut id = Vec::with_capacity(12);
        for reg in [leaf.ebx, leaf.edx, leaf.ecx] {
            id.extend_from_slice(&reg.to_le_bytes());
        }
        let id = String::from_utf8_lossy(&id).into_owned();
        match id.as_str() {
            "GenuineIntel" => Ok(Vendor::Intel),
            "AuthenticAMD" | "HygonGenuine" => Ok(Vendor::Amd),
            _ => Err(format!("Unknown cpu vendor \"{id}\"")),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Ok(Vendor::Intel)
    }
}

fn progname() -> String {
    std::env::args_os()
        .next()
        .map(|a| a.to_string_lossy().into_owned())
        .and_then(|a| a.rsplit('/').next().map(String::from))
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "bhyvectl".to_string())
}

fn main() {
    std::process::exit(run());
}

fn run() -> i32 {
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let progname = progname();
    let vendor = match host_vendor() {
        Ok(v) => v,
        Err(msg) => {
            eprintln!("{msg}");
            return 1;
        }
    };
    let table = option_table(vendor);
    let posixly_correct = std::env::var_os("POSIXLY_CORRECT").is_some();
    let parsed = match parse_args(&args, &table, &progname, posixly_correct) {
        Ok(a) => a,
        Err(e) => {
            eprint!("{}", e.text);
            return 1;
        }
    };
    act(&parsed, &progname)
}

/// What this platform says of a VM-level option it cannot carry out.
const UNSUPPORTED: &str = "is not supported on this platform";

/// Options this platform carries out beyond those a bhyve-rs control socket serves.
#[cfg(target_os = "freebsd")]
const PLATFORM_OPTIONS: &[&str] = target::DEV_VMM_OPTIONS;
#[cfg(not(target_os = "freebsd"))]
const PLATFORM_OPTIONS: &[&str] = &[];

fn act(a: &Args, progname: &str) -> i32 {
    if let Some(path) = &a.inspect_snapshot {
        return inspect_snapshot(path, progname);
    }
    if let Some(path) = &a.verify_snapshot {
        return verify_snapshot(path, progname);
    }
    let Some(vm) = a.vm.as_deref() else {
        return 1;
    };
    let rundir = a
        .rundir
        .clone()
        .unwrap_or_else(|| PathBuf::from(bhyve::control::client::DEFAULT_RUNDIR));
    let plan = match target::Plan::from_args(a, PLATFORM_OPTIONS) {
        Ok(plan) => plan,
        Err(option) => {
            eprintln!("{progname}: --{option} {UNSUPPORTED}");
            return 1;
        }
    };
    if !plan.is_empty() {
        let carried_out = open_target(&rundir, vm, &plan)
            .and_then(|mut target| plan.carry_out(target.as_mut(), &mut std::io::stdout()));
        if let Err(e) = carried_out {
            eprintln!("{progname}: {}", bhyve::logging::escape_controls(&e));
            return 1;
        }
    }
    match &a.checkpoint {
        Some(ck) => checkpoint(&rundir, vm, &ck.file, ck.suspend, progname),
        None if plan.is_empty() => vm_exists(&rundir, vm),
        None => 0,
    }
}

/// The VM as this platform reaches it: `/dev/vmm/NAME` on FreeBSD, whatever runs it; the
/// control socket of the bhyve-rs running it elsewhere.
#[cfg(target_os = "freebsd")]
fn open_target(
    _rundir: &Path,
    vm: &str,
    plan: &target::Plan,
) -> Result<Box<dyn target::Target>, String> {
    Ok(Box::new(devvmm::DevVmm::open(vm, plan.create)?))
}

#[cfg(not(target_os = "freebsd"))]
fn open_target(
    rundir: &Path,
    vm: &str,
    _plan: &target::Plan,
) -> Result<Box<dyn target::Target>, String> {
    Ok(Box::new(socket::ControlSocket::new(rundir, vm)))
}

/// `bhyvectl --vm=NAME` alone: FreeBSD opens the VM and exits 0 if it exists.
#[cfg(target_os = "freebsd")]
fn vm_exists(_rundir: &Path, vm: &str) -> i32 {
    match devvmm::DevVmm::open(vm, false) {
        Ok(_) => 0,
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

/// `bhyvectl --vm=NAME` alone: FreeBSD opens the VM and exits 0 if it exists. Here a VM exists
/// while its bhyve serves the control socket in the run directory.
#[cfg(not(target_os = "freebsd"))]
fn vm_exists(rundir: &Path, vm: &str) -> i32 {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(rundir.join(vm)) {
        Ok(m) if m.file_type().is_socket() => 0,
        _ => {
            eprintln!("vm_open: {vm} could not be opened: No such file or directory");
            1
        }
    }
}

fn checkpoint(rundir: &Path, vm: &str, file: &Path, suspend: bool, progname: &str) -> i32 {
    match bhyve::control::client::request_checkpoint(rundir, vm, file, suspend) {
        Ok(()) => 0,
        Err(e) => {
            // The message carries the file name and bhyve's words: one line whatever they hold.
            eprintln!(
                "{progname}: {}",
                bhyve::logging::escape_controls(&e.to_string())
            );
            1
        }
    }
}

#[cfg(feature = "bhyve_snapshot")]
fn inspect_snapshot(path: &Path, progname: &str) -> i32 {
    match bhyve::snapshot::inspect(path) {
        Ok(text) => {
            print!("{text}");
            0
        }
        Err(e) => {
            let message = format!("{}: {e}", path.display());
            eprintln!("{progname}: {}", bhyve::logging::escape_controls(&message));
            1
        }
    }
}

/// `--verify-snapshot`: one line on standard output when every checksum holds, else one line
/// naming the first damage on standard error and status 1.
#[cfg(feature = "bhyve_snapshot")]
fn verify_snapshot(path: &Path, progname: &str) -> i32 {
    let result = bhyve::snapshot::verify(path);
    let (line, status) = match &result {
        Ok(summary) => (format!("{}: {summary}", path.display()), 0),
        Err(e) => (format!("{}: {e}", path.display()), 1),
    };
    let line = bhyve::logging::escape_controls(&line);
    if status == 0 {
        println!("{line}");
    } else {
        eprintln!("{progname}: {line}");
    }
    status
}

#[cfg(not(feature = "bhyve_snapshot"))]
fn verify_snapshot(_path: &Path, progname: &str) -> i32 {
    // Unreachable: the option exists only with the feature.
    eprintln!("{progname}: snapshots are not supported by this build");
    1
}

#[cfg(not(feature = "bhyve_snapshot"))]
fn inspect_snapshot(_path: &Path, progname: &str) -> i32 {
    // Unreachable: the option exists only with the feature.
    eprintln!("{progname}: snapshots are not supported by this build");
    1
}
