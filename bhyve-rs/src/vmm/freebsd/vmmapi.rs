//! A safe, typed layer over FreeBSD's `/dev/vmm` interface, in the spirit of libvmmapi: one
//! method per request, plain Rust values in and out, `io::Error` (errno) on failure.
//!
//! Requests whose argument changed between releases (`VM_ALLOC_MEMSEG`/`VM_GET_MEMSEG` in 15,
//! `VM_RUN` and `VM_STATS` before 14) are issued in the form the running kernel understands,
//! chosen from `kern.osreldate` and, for memory segments, by the kernel's answer (early
//! 15-CURRENT kernels still take the 14 form). [`VmmDev::run`] always hands back a record in
//! the 15 layout ([`super::exits::exit_from_14`] and [`super::exits::exit_from_13`] convert).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use vmm_sys::ioctls;
use vmm_sys::*;

use super::exits;

pub use super::KernelAbi;

impl KernelAbi {
    /// The running kernel's.
    pub fn running() -> io::Result<KernelAbi> {
        Ok(KernelAbi::from_osreldate(sysctl_u32("kern.osreldate")?))
    }
}

fn sysctl_u32(name: &str) -> io::Result<u32> {
    let cname = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>();
    // SAFETY: `cname` is NUL-terminated; `value` and `len` describe a writable int-sized buffer
    // for the old value; no new value is passed.
    let rc = unsafe {
        libc::sysctlbyname(
            cname.as_ptr(),
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
            std::ptr::null(),
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value as u32)
}

/// Write `name` (a VM name) to the string sysctl `oid` (`hw.vmm.create`, `hw.vmm.destroy`).
fn sysctl_write_name(oid: &str, name: &str) -> io::Result<()> {
    let coid = CString::new(oid).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let cname = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let bytes = cname.as_bytes();
    // SAFETY: both strings are NUL-terminated and live for the call; the new value is
    // `bytes.len()` readable bytes; no old value is asked for.
    let rc = unsafe {
        libc::sysctlbyname(
            coid.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            bytes.as_ptr().cast(),
            bytes.len(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

const VMMCTL_PATH: &str = "/dev/vmmctl";

fn name_buffer<const N: usize>(name: &str) -> io::Result<[c_char; N]> {
    super::name_buffer(name).map_err(io::Error::from_raw_os_error)
}

/// How a VM was created, which decides how it goes away.
#[derive(Debug)]
enum Creator {
    /// `/dev/vmmctl` (FreeBSD 15); with destroy-on-close the VM dies when this closes.
    Vmmctl {
        ctl: OwnedFd,
        destroy_on_close: bool,
    },
    /// The `hw.vmm.create` sysctl (FreeBSD 13, 14).
    Sysctl,
}

/// Create VM `name`: through `/dev/vmmctl` where it exists (FreeBSD 15), else through the
/// `hw.vmm.create` sysctl. With `destroy_on_close` on FreeBSD 15 the returned [`VmmDev`] keeps
/// the control descriptor open so the kernel destroys the VM when the process ends, however it
/// ends; elsewhere [`VmmDev`] destroys it when dropped.
pub fn create(name: &str, destroy_on_close: bool) -> io::Result<VmmDev> {
    let creator = match OpenOptions::new().read(true).write(true).open(VMMCTL_PATH) {
        Ok(ctl) => {
            let mut req = vmmctl_vm_create {
                name: name_buffer(name)?,
                flags: if destroy_on_close {
                    VMMCTL_CREATE_DESTROY_ON_CLOSE
                } else {
                    0
                },
                ..Default::default()
            };
            // SAFETY: `req` is a complete vmmctl_vm_create without pointers, issued on the
            // /dev/vmmctl descriptor we own.
            unsafe { ioctls::vmmctl_vm_create(ctl.as_raw_fd(), &mut req) }?;
            Creator::Vmmctl {
                ctl: OwnedFd::from(ctl),
                destroy_on_close,
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            sysctl_write_name("hw.vmm.create", name)?;
            Creator::Sysctl
        }
        Err(e) => return Err(e),
    };
    let mut dev = match VmmDev::open(name) {
        Ok(dev) => dev,
        Err(e) => {
            let _ = destroy_with(&creator, name);
            return Err(e);
        }
    };
    dev.destroy_when_dropped = destroy_on_close;
    dev.creator = Some(creator);
    Ok(dev)
}

fn destroy_with(creator: &Creator, name: &str) -> io::Result<()> {
    match creator {
        Creator::Vmmctl { ctl, .. } => destroy_through(ctl.as_raw_fd(), name),
        Creator::Sysctl => sysctl_write_name("hw.vmm.destroy", name),
    }
}

fn destroy_through(ctl: RawFd, name: &str) -> io::Result<()> {
    let mut req = vmmctl_vm_destroy {
        name: name_buffer(name)?,
        ..Default::default()
    };
    // SAFETY: `req` is a complete vmmctl_vm_destroy without pointers, issued on a /dev/vmmctl
    // descriptor the caller owns.
    unsafe { ioctls::vmmctl_vm_destroy(ctl, &mut req) }?;
    Ok(())
}

/// Destroy VM `name` (bhyvectl --destroy): `/dev/vmmctl` where it exists, else the sysctl.
pub fn destroy(name: &str) -> io::Result<()> {
    match OpenOptions::new().read(true).write(true).open(VMMCTL_PATH) {
        Ok(ctl) => destroy_through(ctl.as_raw_fd(), name),
        Err(e) if e.kind() == io::ErrorKind::NotFound => sysctl_write_name("hw.vmm.destroy", name),
        Err(e) => Err(e),
    }
}

/// An open `/dev/vmm/NAME`.
#[derive(Debug)]
pub struct VmmDev {
    name: String,
    file: File,
    abi: KernelAbi,
    /// The kernel refused the 15 form of the memory segment requests (early 15-CURRENT).
    memseg_14: AtomicBool,
    creator: Option<Creator>,
    destroy_when_dropped: bool,
}

impl Drop for VmmDev {
    fn drop(&mut self) {
        if !self.destroy_when_dropped {
            return;
        }
        match &self.creator {
            // Closing the control descriptor destroys the VM.
            Some(Creator::Vmmctl {
                destroy_on_close: true,
                ..
            }) => {}
            Some(creator) => {
                let _ = destroy_with(creator, &self.name);
            }
            None => {}
        }
    }
}

/// A guest memory mapping as `VM_MMAP_GETNEXT` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemMapping {
    pub gpa: u64,
    pub segid: i32,
    pub segoff: i64,
    pub len: u64,
    pub prot: i32,
    pub flags: i32,
}

/// One vCPU statistics read (`VM_STATS`): the values from `index` on and when they were taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    pub values: Vec<u64>,
    pub tv_sec: i64,
    pub tv_usec: i64,
}

fn check_len(len: usize, have: usize) -> io::Result<()> {
    if len > have {
        Err(io::Error::from_raw_os_error(libc::EINVAL))
    } else {
        Ok(())
    }
}

fn int(value: u32) -> io::Result<c_int> {
    c_int::try_from(value).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

impl VmmDev {
    /// Open an existing VM's device.
    pub fn open(name: &str) -> io::Result<VmmDev> {
        super::check_vm_name(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/dev/vmm/{name}"))?;
        Ok(VmmDev {
            name: name.to_string(),
            file,
            abi: KernelAbi::running()?,
            memseg_14: AtomicBool::new(false),
            creator: None,
            destroy_when_dropped: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn abi(&self) -> KernelAbi {
        self.abi
    }

    /// The device file, for `mmap(2)` of guest RAM at offset = guest-physical address.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Destroy the VM when this is dropped (when it was not created with destroy-on-close).
    pub fn set_destroy_on_drop(&mut self, destroy: bool) {
        self.destroy_when_dropped = destroy;
    }

    // ---- VM-wide state ----

    /// `VM_SET_TOPOLOGY`.
    pub fn set_topology(
        &self,
        sockets: u16,
        cores: u16,
        threads: u16,
        maxcpus: u16,
    ) -> io::Result<()> {
        let arg = vm_cpu_topology {
            sockets,
            cores,
            threads,
            maxcpus,
        };
        // SAFETY: a plain struct without pointers.
        unsafe { ioctls::vm_set_topology(self.fd(), &arg) }?;
        Ok(())
    }

    /// `VM_GET_TOPOLOGY`: `(sockets, cores, threads, maxcpus)`.
    pub fn topology(&self) -> io::Result<(u16, u16, u16, u16)> {
        let mut arg = vm_cpu_topology::default();
        // SAFETY: a plain struct without pointers, written by the kernel.
        unsafe { ioctls::vm_get_topology(self.fd(), &mut arg) }?;
        Ok((arg.sockets, arg.cores, arg.threads, arg.maxcpus))
    }

    /// `VM_SUSPEND` with `how` (`VM_SUSPEND_RESET`, …).
    pub fn suspend(&self, how: vm_suspend_how) -> io::Result<()> {
        let arg = vm_suspend { how };
        // SAFETY: a plain struct without pointers.
        unsafe { ioctls::vm_suspend(self.fd(), &arg) }?;
        Ok(())
    }

    /// `VM_REINIT`: reset the VM for a reboot.
    pub fn reinit(&self) -> io::Result<()> {
        // SAFETY: the request has no argument.
        unsafe { ioctls::vm_reinit(self.fd()) }?;
        Ok(())
    }

    // ---- memory ----

    fn use_memseg_14(&self) -> bool {
        self.abi < KernelAbi::V15 || self.memseg_14.load(Ordering::Relaxed)
    }

    /// `VM_ALLOC_MEMSEG`: system memory when `name` is `None`, a device memory segment
    /// (`/dev/vmm.io/NAME.SEGNAME`) otherwise.
    pub fn alloc_memseg(&self, segid: i32, len: u64, name: Option<&str>) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let seg_name: [c_char; VM_MAX_SUFFIXLEN + 1] = match name {
            Some(n) => name_buffer(n)?,
            None => [0; VM_MAX_SUFFIXLEN + 1],
        };
        if !self.use_memseg_14() {
            let arg = vm_memseg {
                segid,
                len,
                name: seg_name,
                ..Default::default()
            };
            // SAFETY: no domain mask is passed (null pointer, zero size), so the kernel follows
            // no pointer.
            match unsafe { ioctls::vm_alloc_memseg(self.fd(), &arg) } {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => {
                    self.memseg_14.store(true, Ordering::Relaxed)
                }
                Err(e) => return Err(e),
            }
        }
        let arg = vm_memseg_14 {
            segid,
            len,
            name: seg_name,
        };
        // SAFETY: a plain struct without pointers.
        unsafe { ioctls::vm_alloc_memseg_14(self.fd(), &arg) }?;
        Ok(())
    }

    /// `VM_GET_MEMSEG`: `(len, name)`; a length of 0 means the segment does not exist.
    pub fn memseg(&self, segid: i32) -> io::Result<(u64, String)> {
        let text = |name: &[c_char]| -> String {
            let bytes: Vec<u8> = name
                .iter()
                .take_while(|c| **c != 0)
                .map(|c| *c as u8)
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        };
        if !self.use_memseg_14() {
            let mut arg = vm_memseg {
                segid,
                ..Default::default()
            };
            // SAFETY: no domain mask pointer is passed; the kernel writes len and name.
            match unsafe { ioctls::vm_get_memseg(self.fd(), &mut arg) } {
                Ok(_) => return Ok((arg.len as u64, text(&arg.name))),
                Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => {
                    self.memseg_14.store(true, Ordering::Relaxed)
                }
                Err(e) => return Err(e),
            }
        }
        let mut arg = vm_memseg_14 {
            segid,
            ..Default::default()
        };
        // SAFETY: a plain struct without pointers, written by the kernel.
        unsafe { ioctls::vm_get_memseg_14(self.fd(), &mut arg) }?;
        Ok((arg.len as u64, text(&arg.name)))
    }

    /// `VM_MMAP_MEMSEG`: map `len` bytes of segment `segid` from `segoff` at guest `gpa`.
    pub fn mmap_memseg(
        &self,
        gpa: u64,
        segid: i32,
        segoff: i64,
        len: u64,
        prot: i32,
        flags: i32,
    ) -> io::Result<()> {
        let arg = vm_memmap {
            gpa,
            segid,
            segoff,
            len: usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
            prot,
            flags,
        };
        // SAFETY: a plain struct without pointers.
        unsafe { ioctls::vm_mmap_memseg(self.fd(), &arg) }?;
        Ok(())
    }

    /// `VM_MUNMAP_MEMSEG`.
    pub fn munmap_memseg(&self, gpa: u64, len: u64) -> io::Result<()> {
        let arg = vm_munmap {
            gpa,
            len: usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
        };
        // SAFETY: a plain struct without pointers.
        unsafe { ioctls::vm_munmap_memseg(self.fd(), &arg) }?;
        Ok(())
    }

    /// `VM_MMAP_GETNEXT`: the first guest mapping at or above `gpa`, `None` past the last.
    pub fn mmap_getnext(&self, gpa: u64) -> io::Result<Option<MemMapping>> {
        let mut arg = vm_memmap {
            gpa,
            ..Default::default()
        };
        // SAFETY: a plain struct without pointers, written by the kernel.
        match unsafe { ioctls::vm_mmap_getnext(self.fd(), &mut arg) } {
            Ok(_) => Ok(Some(MemMapping {
                gpa: arg.gpa,
                segid: arg.segid,
                segoff: arg.segoff,
                len: arg.len as u64,
                prot: arg.prot,
                flags: arg.flags,
            })),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every guest mapping, in address order (bhyvectl --get-memmap).
    pub fn memmaps(&self) -> io::Result<Vec<MemMapping>> {
        let mut out = Vec::new();
        let mut gpa = 0;
        while let Some(m) = self.mmap_getnext(gpa)? {
            gpa = m.gpa.saturating_add(m.len);
            out.push(m);
            if m.len == 0 || gpa == u64::MAX {
                break;
            }
        }
        Ok(out)
    }

    // ---- vCPUs ----

    /// `VM_SET_CAPABILITY` for `vcpu`.
    pub fn set_capability(&self, vcpu: u32, cap: vm_cap_type, value: bool) -> io::Result<()> {
        let arg = vm_capability {
            cpuid: int(vcpu)?,
            captype: cap,
            capval: c_int::from(value),
            allcpus: 0,
        };
        // SAFETY: a plain struct without pointers.
        unsafe { ioctls::vm_set_capability(self.fd(), &arg) }?;
        Ok(())
    }

    /// `VM_GET_CAPABILITY` for `vcpu`.
    pub fn capability(&self, vcpu: u32, cap: vm_cap_type) -> io::Result<i32> {
        let mut arg = vm_capability {
            cpuid: int(vcpu)?,
            captype: cap,
            ..Default::default()
        };
        // SAFETY: a plain struct without pointers, written by the kernel.
        unsafe { ioctls::vm_get_capability(self.fd(), &mut arg) }?;
        Ok(arg.capval)
    }

    /// `VM_SET_X2APIC_STATE`.
    pub fn set_x2apic_state(&self, vcpu: u32, enabled: bool) -> io::Result<()> {
        let arg = vm_x2apic {
            cpuid: int(vcpu)?,
            state: if enabled {
                X2APIC_ENABLED
            } else {
                X2APIC_DISABLED
            },
        };
        // SAFETY: a plain struct without pointers.
        unsafe { ioctls::vm_set_x2apic_state(self.fd(), &arg) }?;
        Ok(())
    }

    /// `VM_GET_X2APIC_STATE`: `X2APIC_ENABLED` or `X2APIC_DISABLED`.
    pub fn x2apic_state(&self, vcpu: u32) -> io::Result<x2apic_state> {
        let mut arg = vm_x2apic {
            cpuid: int(vcpu)?,
            ..Default::default()
        };
        // SAFETY: a plain struct without pointers, written by the kernel.
        unsafe { ioctls::vm_get_x2apic_state(self.fd(), &mut arg) }?;
        Ok(arg.state)
    }

    fn cpu_request(&self, vcpu: Option<u32>) -> io::Result<vm_activate_cpu> {
        Ok(vm_activate_cpu {
            vcpuid: match vcpu {
                Some(v) => int(v)?,
                None => -1,
            },
        })
    }

    /// `VM_ACTIVATE_CPU`.
    pub fn activate_cpu(&self, vcpu: u32) -> io::Result<()> {
        let arg = self.cpu_request(Some(vcpu))?;
        // SAFETY: a plain struct without pointers.
        unsafe { ioctls::vm_activate_cpu(self.fd(), &arg) }?;
        Ok(())
    }

    /// `VM_SUSPEND_CPU` for one vCPU, or all (`None`): it leaves `VM_RUN` and stays out until
    /// resumed.
    pub fn suspend_cpu(&self, vcpu: Option<u32>) -> io::Result<()> {
        let arg = self.cpu_request(vcpu)?;
        // SAFETY: a plain struct without pointers.
        unsafe { ioctls::vm_suspend_cpu(self.fd(), &arg) }?;
        Ok(())
    }

    /// `VM_RESUME_CPU` for one vCPU, or all (`None`).
    pub fn resume_cpu(&self, vcpu: Option<u32>) -> io::Result<()> {
        let arg = self.cpu_request(vcpu)?;
        // SAFETY: a plain struct without pointers.
        unsafe { ioctls::vm_resume_cpu(self.fd(), &arg) }?;
        Ok(())
    }

    /// `VM_GET_CPUS` for `which` (`VM_ACTIVE_CPUS`, `VM_SUSPENDED_CPUS`, `VM_DEBUG_CPUS`): the
    /// vCPU ids in the set.
    pub fn cpus(&self, which: c_int) -> io::Result<Vec<u32>> {
        let mut set = cpuset_t {
            __bits: [0; CPU_SETSIZE / 64],
        };
        let arg = vm_cpuset {
            which,
            cpusetsize: std::mem::size_of::<cpuset_t>() as c_int,
            cpus: &mut set,
        };
        // SAFETY: `cpus` points at a live cpuset_t of exactly `cpusetsize` bytes, which the
        // kernel fills during the call.
        unsafe { ioctls::vm_get_cpus(self.fd(), &arg) }?;
        Ok((0..CPU_SETSIZE as u32)
            .filter(|&i| set.__bits[(i / 64) as usize] & (1 << (i % 64)) != 0)
            .collect())
    }

    /// `VM_RUN`: enter vCPU `vcpu` until the kernel hands control back; the exit record in
    /// the 15 layout.
    pub fn run(&self, vcpu: u32) -> io::Result<vm_exit> {
        if self.abi == KernelAbi::V13 {
            let mut arg = vm_run_13 {
                cpuid: int(vcpu)?,
                ..Default::default()
            };
            // SAFETY: the 13 form embeds the exit record; no pointers.
            unsafe { ioctls::vm_run_13(self.fd(), &mut arg) }?;
            return Ok(exits::exit_from_13(&arg.vm_exit));
        }
        let mut set = cpuset_t {
            __bits: [0; CPU_SETSIZE / 64],
        };
        if self.abi == KernelAbi::V14 {
            let mut exit = vm_exit_14::default();
            let arg = vm_run {
                cpuid: int(vcpu)?,
                cpuset: &mut set,
                cpusetsize: std::mem::size_of::<cpuset_t>(),
                vm_exit: (&mut exit as *mut vm_exit_14).cast(),
            };
            // SAFETY: `vm_exit` points at a live 136-byte record (14's layout, the size the
            // kernel copies out) and `cpuset` at a live cpuset_t of `cpusetsize` bytes; both
            // outlive the call.
            unsafe { ioctls::vm_run(self.fd(), &arg) }?;
            return Ok(exits::exit_from_14(&exit));
        }
        let mut exit = vm_exit::default();
        let arg = vm_run {
            cpuid: int(vcpu)?,
            cpuset: &mut set,
            cpusetsize: std::mem::size_of::<cpuset_t>(),
            vm_exit: &mut exit,
        };
        // SAFETY: `vm_exit` and `cpuset` point at live buffers of the sizes the kernel copies
        // out; both outlive the call.
        unsafe { ioctls::vm_run(self.fd(), &arg) }?;
        Ok(exit)
    }

    /// `VM_RESTART_INSTRUCTION`: the next `VM_RUN` of `vcpu` re-executes the instruction at
    /// its RIP.
    pub fn restart_instruction(&self, vcpu: u32) -> io::Result<()> {
        let arg = int(vcpu)?;
        // SAFETY: the argument is a plain int.
        unsafe { ioctls::vm_restart_instruction(self.fd(), &arg) }?;
        Ok(())
    }

    // ---- registers ----

    /// `VM_SET_REGISTER`.
    pub fn set_register(&self, vcpu: u32, reg: vm_reg_name, value: u64) -> io::Result<()> {
        let arg = vm_register {
            cpuid: int(vcpu)?,
            regnum: reg,
            regval: value,
        };
        // SAFETY: a plain struct without pointers.
        unsafe { ioctls::vm_set_register(self.fd(), &arg) }?;
        Ok(())
    }

    /// `VM_GET_REGISTER`.
    pub fn register(&self, vcpu: u32, reg: vm_reg_name) -> io::Result<u64> {
        let mut arg = vm_register {
            cpuid: int(vcpu)?,
            regnum: reg,
            regval: 0,
        };
        // SAFETY: a plain struct without pointers, written by the kernel.
        unsafe { ioctls::vm_get_register(self.fd(), &mut arg) }?;
        Ok(arg.regval)
    }

    /// `VM_SET_REGISTER_SET`: `regs[i]` gets `values[i]`.
    pub fn set_registers(&self, vcpu: u32, regs: &[vm_reg_name], values: &[u64]) -> io::Result<()> {
        check_len(regs.len(), values.len())?;
        check_len(values.len(), regs.len())?;
        let mut values = values.to_vec();
        let arg = vm_register_set {
            cpuid: int(vcpu)?,
            count: regs.len() as c_uint,
            regnums: regs.as_ptr(),
            regvals: values.as_mut_ptr(),
        };
        // SAFETY: `regnums` and `regvals` point at `count` live elements each for the call;
        // the kernel only reads them for a set.
        unsafe { ioctls::vm_set_register_set(self.fd(), &arg) }?;
        Ok(())
    }

    /// `VM_GET_REGISTER_SET`: the values of `regs`, in order.
    pub fn registers(&self, vcpu: u32, regs: &[vm_reg_name]) -> io::Result<Vec<u64>> {
        let mut values = vec![0u64; regs.len()];
        let mut arg = vm_register_set {
            cpuid: int(vcpu)?,
            count: regs.len() as c_uint,
            regnums: regs.as_ptr(),
            regvals: values.as_mut_ptr(),
        };
        // SAFETY: `regnums` and `regvals` point at `count` live elements each, the latter
        // writable, for the duration of the call.
        unsafe { ioctls::vm_get_register_set(self.fd(), &mut arg) }?;
        Ok(values)
    }

    /// `VM_SET_SEGMENT_DESCRIPTOR` (segment registers, GDTR, IDTR, LDTR, TR).
    pub fn set_descriptor(&self, vcpu: u32, reg: vm_reg_name, desc: seg_desc) -> io::Result<()> {
        let arg = vm_seg_desc {
            cpuid: int(vcpu)?,
            regnum: reg,
            desc,
        };
        // SAFETY: a plain struct without pointers.
        unsafe { ioctls::vm_set_segment_descriptor(self.fd(), &arg) }?;
        Ok(())
    }

    /// `VM_GET_SEGMENT_DESCRIPTOR`.
    pub fn descriptor(&self, vcpu: u32, reg: vm_reg_name) -> io::Result<seg_desc> {
        let mut arg = vm_seg_desc {
            cpuid: int(vcpu)?,
            regnum: reg,
            desc: seg_desc::default(),
        };
        // SAFETY: a plain struct without pointers, written by the kernel.
        unsafe { ioctls::vm_get_segment_descriptor(self.fd(), &mut arg) }?;
        Ok(arg.desc)
    }

    /// `VM_GET_INTINFO`: `(info1, info2)`.
    pub fn intinfo(&self, vcpu: u32) -> io::Result<(u64, u64)> {
        let mut arg = vm_intinfo {
            vcpuid: int(vcpu)?,
            ..Default::default()
        };
        // SAFETY: a plain struct without pointers, written by the kernel.
        unsafe { ioctls::vm_get_intinfo(self.fd(), &mut arg) }?;
        Ok((arg.info1, arg.info2))
    }

    /// `VM_SET_INTINFO`: the event to deliver at the next entry (`info1`).
    pub fn set_intinfo(&self, vcpu: u32, info1: u64) -> io::Result<()> {
        let arg = vm_intinfo {
            vcpuid: int(vcpu)?,
            info1,
            info2: 0,
        };
        // SAFETY: a plain struct without pointers.
        unsafe { ioctls::vm_set_intinfo(self.fd(), &arg) }?;
        Ok(())
    }

    /// `VM_GLA2GPA_NOFAULT`: translate `gla` through `paging`; `None` when it faults.
    pub fn gla2gpa_nofault(
        &self,
        vcpu: u32,
        paging: vm_guest_paging,
        gla: u64,
        prot: i32,
    ) -> io::Result<Option<u64>> {
        let mut arg = vm_gla2gpa {
            vcpuid: int(vcpu)?,
            prot,
            gla,
            paging,
            ..Default::default()
        };
        // SAFETY: a plain struct without pointers, written by the kernel.
        unsafe { ioctls::vm_gla2gpa_nofault(self.fd(), &mut arg) }?;
        Ok((arg.fault == 0).then_some(arg.gpa))
    }

    // ---- events and interrupts ----

    /// `VM_INJECT_EXCEPTION`.
    pub fn inject_exception(
        &self,
        vcpu: u32,
        vector: u8,
        error_code: Option<u32>,
        restart: bool,
    ) -> io::Result<()> {
        let arg = vm_exception {
            cpuid: int(vcpu)?,
            vector: c_int::from(vector),
            error_code: error_code.unwrap_or(0),
            error_code_valid: c_int::from(error_code.is_some()),
            restart_instruction: c_int::from(restart),
        };
        // SAFETY: a plain struct without pointers.
        unsafe { ioctls::vm_inject_exception(self.fd(), &arg) }?;
        Ok(())
    }

    /// `VM_INJECT_NMI`.
    pub fn inject_nmi(&self, vcpu: u32) -> io::Result<()> {
        let arg = vm_nmi { cpuid: int(vcpu)? };
        // SAFETY: a plain struct without pointers.
        unsafe { ioctls::vm_inject_nmi(self.fd(), &arg) }?;
        Ok(())
    }

    /// `VM_LAPIC_IRQ`: interrupt `vector` at `vcpu`'s local APIC.
    pub fn lapic_irq(&self, vcpu: u32, vector: u8) -> io::Result<()> {
        let arg = vm_lapic_irq {
            cpuid: int(vcpu)?,
            vector: c_int::from(vector),
        };
        // SAFETY: a plain struct without pointers.
        unsafe { ioctls::vm_lapic_irq(self.fd(), &arg) }?;
        Ok(())
    }

    /// `VM_LAPIC_MSI`: a message-signalled interrupt.
    pub fn lapic_msi(&self, addr: u64, msg: u64) -> io::Result<()> {
        let arg = vm_lapic_msi { msg, addr };
        // SAFETY: a plain struct without pointers.
        unsafe { ioctls::vm_lapic_msi(self.fd(), &arg) }?;
        Ok(())
    }

    /// `VM_IOAPIC_ASSERT_IRQ`.
    pub fn ioapic_assert_irq(&self, irq: u32) -> io::Result<()> {
        let arg = vm_ioapic_irq { irq: int(irq)? };
        // SAFETY: a plain struct without pointers.
        unsafe { ioctls::vm_ioapic_assert_irq(self.fd(), &arg) }?;
        Ok(())
    }

    /// `VM_IOAPIC_DEASSERT_IRQ`.
    pub fn ioapic_deassert_irq(&self, irq: u32) -> io::Result<()> {
        let arg = vm_ioapic_irq { irq: int(irq)? };
        // SAFETY: a plain struct without pointers.
        unsafe { ioctls::vm_ioapic_deassert_irq(self.fd(), &arg) }?;
        Ok(())
    }

    /// `VM_IOAPIC_PULSE_IRQ`.
    pub fn ioapic_pulse_irq(&self, irq: u32) -> io::Result<()> {
        let arg = vm_ioapic_irq { irq: int(irq)? };
        // SAFETY: a plain struct without pointers.
        unsafe { ioctls::vm_ioapic_pulse_irq(self.fd(), &arg) }?;
        Ok(())
    }

    /// `VM_IOAPIC_PINCOUNT`.
    pub fn ioapic_pincount(&self) -> io::Result<u32> {
        let mut count: c_int = 0;
        // SAFETY: the argument is a plain int the kernel writes.
        unsafe { ioctls::vm_ioapic_pincount(self.fd(), &mut count) }?;
        Ok(count.max(0) as u32)
    }

    fn isa_irq(atpic_irq: Option<u8>, ioapic_irq: Option<u8>) -> vm_isa_irq {
        vm_isa_irq {
            atpic_irq: atpic_irq.map_or(-1, c_int::from),
            ioapic_irq: ioapic_irq.map_or(-1, c_int::from),
        }
    }

    /// `VM_ISA_ASSERT_IRQ` on the 8259 input and/or the I/O APIC pin (`None`: not that one).
    pub fn isa_assert_irq(&self, atpic_irq: Option<u8>, ioapic_irq: Option<u8>) -> io::Result<()> {
        let arg = Self::isa_irq(atpic_irq, ioapic_irq);
        // SAFETY: a plain struct without pointers.
        unsafe { ioctls::vm_isa_assert_irq(self.fd(), &arg) }?;
        Ok(())
    }

    /// `VM_ISA_DEASSERT_IRQ`.
    pub fn isa_deassert_irq(
        &self,
        atpic_irq: Option<u8>,
        ioapic_irq: Option<u8>,
    ) -> io::Result<()> {
        let arg = Self::isa_irq(atpic_irq, ioapic_irq);
        // SAFETY: a plain struct without pointers.
        unsafe { ioctls::vm_isa_deassert_irq(self.fd(), &arg) }?;
        Ok(())
    }

    /// `VM_ISA_PULSE_IRQ`.
    pub fn isa_pulse_irq(&self, atpic_irq: Option<u8>, ioapic_irq: Option<u8>) -> io::Result<()> {
        let arg = Self::isa_irq(atpic_irq, ioapic_irq);
        // SAFETY: a plain struct without pointers.
        unsafe { ioctls::vm_isa_pulse_irq(self.fd(), &arg) }?;
        Ok(())
    }

    /// `VM_ISA_SET_IRQ_TRIGGER`: edge or level for an 8259 input (ELCR).
    pub fn isa_set_irq_trigger(&self, atpic_irq: u8, level: bool) -> io::Result<()> {
        let arg = vm_isa_irq_trigger {
            atpic_irq: c_int::from(atpic_irq),
            trigger: if level { LEVEL_TRIGGER } else { EDGE_TRIGGER },
        };
        // SAFETY: a plain struct without pointers.
        unsafe { ioctls::vm_isa_set_irq_trigger(self.fd(), &arg) }?;
        Ok(())
    }

    // ---- kernel devices ----

    /// `VM_RTC_WRITE`: one byte of the RTC's NVRAM.
    pub fn rtc_write(&self, offset: u8, value: u8) -> io::Result<()> {
        let arg = vm_rtc_data {
            offset: c_int::from(offset),
            value,
        };
        // SAFETY: a plain struct without pointers.
        unsafe { ioctls::vm_rtc_write(self.fd(), &arg) }?;
        Ok(())
    }

    /// `VM_RTC_READ`.
    pub fn rtc_read(&self, offset: u8) -> io::Result<u8> {
        let mut arg = vm_rtc_data {
            offset: c_int::from(offset),
            value: 0,
        };
        // SAFETY: a plain struct without pointers, written by the kernel.
        unsafe { ioctls::vm_rtc_read(self.fd(), &mut arg) }?;
        Ok(arg.value)
    }

    /// `VM_RTC_SETTIME`.
    pub fn rtc_settime(&self, secs: i64) -> io::Result<()> {
        let arg = vm_rtc_time { secs };
        // SAFETY: a plain struct without pointers.
        unsafe { ioctls::vm_rtc_settime(self.fd(), &arg) }?;
        Ok(())
    }

    /// `VM_RTC_GETTIME`.
    pub fn rtc_gettime(&self) -> io::Result<i64> {
        let mut arg = vm_rtc_time::default();
        // SAFETY: a plain struct without pointers, written by the kernel.
        unsafe { ioctls::vm_rtc_gettime(self.fd(), &mut arg) }?;
        Ok(arg.secs)
    }

    /// `VM_GET_HPET_CAPABILITIES`.
    pub fn hpet_capabilities(&self) -> io::Result<u32> {
        let mut arg = vm_hpet_cap::default();
        // SAFETY: a plain struct without pointers, written by the kernel.
        unsafe { ioctls::vm_get_hpet_capabilities(self.fd(), &mut arg) }?;
        Ok(arg.capabilities)
    }

    // ---- statistics ----

    /// `VM_STATS` for `vcpu` from entry `index` on (at most 64 values per call).
    pub fn stats(&self, vcpu: u32, index: u32) -> io::Result<Stats> {
        if self.abi == KernelAbi::V13 {
            // FreeBSD 13 has no index: all entries in one call.
            let mut arg = vm_stats_13 {
                cpuid: int(vcpu)?,
                ..Default::default()
            };
            // SAFETY: a plain struct without pointers, written by the kernel.
            unsafe { ioctls::vm_stats_13(self.fd(), &mut arg) }?;
            let n = (arg.num_entries.max(0) as usize).min(arg.statbuf.len());
            let skip = (index as usize).min(n);
            return Ok(Stats {
                values: arg.statbuf[skip..n].to_vec(),
                tv_sec: arg.tv.tv_sec,
                tv_usec: arg.tv.tv_usec,
            });
        }
        let mut arg = vm_stats {
            cpuid: int(vcpu)?,
            index: int(index)?,
            ..Default::default()
        };
        // SAFETY: a plain struct without pointers, written by the kernel.
        unsafe { ioctls::vm_stats(self.fd(), &mut arg) }?;
        let n = (arg.num_entries.max(0) as usize).min(arg.statbuf.len());
        Ok(Stats {
            values: arg.statbuf[..n].to_vec(),
            tv_sec: arg.tv.tv_sec,
            tv_usec: arg.tv.tv_usec,
        })
    }

    /// Every statistic of `vcpu`, as libvmmapi's `vm_get_stats` gathers them.
    pub fn all_stats(&self, vcpu: u32) -> io::Result<Stats> {
        let mut all = self.stats(vcpu, 0)?;
        if self.abi == KernelAbi::V13 {
            return Ok(all);
        }
        while all.values.len() % MAX_VM_STATS == 0 && !all.values.is_empty() {
            let more = self.stats(vcpu, all.values.len() as u32)?;
            if more.values.is_empty() {
                break;
            }
            all.values.extend(more.values);
            all.tv_sec = more.tv_sec;
            all.tv_usec = more.tv_usec;
        }
        Ok(all)
    }

    /// `VM_STAT_DESC`: the description of statistic `index`, `None` past the last.
    pub fn stat_desc(&self, index: u32) -> io::Result<Option<String>> {
        let mut arg = vm_stat_desc {
            index: int(index)?,
            ..Default::default()
        };
        // SAFETY: a plain struct without pointers, written by the kernel.
        match unsafe { ioctls::vm_stat_desc(self.fd(), &mut arg) } {
            Ok(_) => {
                let bytes: Vec<u8> = arg
                    .desc
                    .iter()
                    .take_while(|c| **c != 0)
                    .map(|c| *c as u8)
                    .collect();
                Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
            Err(e) => Err(e),
        }
    }

    // ---- snapshots ----

    /// `VM_SNAPSHOT_REQ` saving kernel structure `req` into `buf`: the bytes written.
    pub fn snapshot_save(&self, req: snapshot_req, buf: &mut [u8]) -> io::Result<usize> {
        let mut meta = vm_snapshot_meta {
            dev_req: req,
            op: VM_SNAPSHOT_SAVE,
            ..Default::default()
        };
        meta.buffer = vm_snapshot_buffer {
            buf_start: buf.as_mut_ptr(),
            buf_size: buf.len(),
            buf: buf.as_mut_ptr(),
            buf_rem: buf.len(),
        };
        // SAFETY: the buffer pointers describe `buf`, live and writable for `buf.len()` bytes
        // during the call; the kernel copies out at most `buf_rem` bytes and advances `buf`.
        unsafe { ioctls::vm_snapshot_req(self.fd(), &mut meta) }?;
        Ok(buf.len() - meta.buffer.buf_rem)
    }

    /// `VM_SNAPSHOT_REQ` restoring kernel structure `req` from `data`: the bytes consumed.
    pub fn snapshot_restore(&self, req: snapshot_req, data: &[u8]) -> io::Result<usize> {
        // The kernel takes a mutable buffer for both directions; give it a copy.
        let mut copy = data.to_vec();
        let mut meta = vm_snapshot_meta {
            dev_req: req,
            op: VM_SNAPSHOT_RESTORE,
            ..Default::default()
        };
        meta.buffer = vm_snapshot_buffer {
            buf_start: copy.as_mut_ptr(),
            buf_size: copy.len(),
            buf: copy.as_mut_ptr(),
            buf_rem: copy.len(),
        };
        // SAFETY: the buffer pointers describe `copy`, live for `copy.len()` bytes during the
        // call; the kernel copies in at most `buf_rem` bytes.
        unsafe { ioctls::vm_snapshot_req(self.fd(), &mut meta) }?;
        Ok(copy.len() - meta.buffer.buf_rem)
    }

    /// `VM_RESTORE_TIME`: restart the kernel's timers after a restore.
    pub fn restore_time(&self) -> io::Result<()> {
        let mut dummy: c_int = 0;
        // SAFETY: the argument is a plain int.
        unsafe { ioctls::vm_restore_time(self.fd(), &mut dummy) }?;
        Ok(())
    }
}
