//! Saving a running machine into a snapshot file and building a machine back from one.
//!
//! Checkpoint order ([`checkpoint`]): check every device can be saved (nothing is paused or
//! written otherwise) → for a live checkpoint, copy guest RAM while the guest runs (below) →
//! pause every vCPU → tell each vCPU's guest clock it was stopped → pause the devices
//! (background threads stop touching device state and interrupts) → VM (in-kernel devices,
//! clock) and each vCPU, read at once → configuration → guest RAM (all of it, or for a live
//! checkpoint the pages written since their last copy) → each device → resume the devices, then
//! the vCPUs → commit (fsync, rename); for a suspend, commit and stay stopped (resuming only if
//! the commit fails).
//!
//! A live checkpoint (`--checkpoint` where [`crate::vmm::PlatformCaps::dirty_log`]) turns on the
//! kernel's dirty page log, writes every populated page while the guest runs, then writes the
//! pages the guest dirtied meanwhile, again while the log keeps shrinking
//! ([`MAX_PRECOPY_PASSES`] at most); only the last dirty pages are written while the machine is
//! stopped, so the stop does not grow with the size of memory, only with how fast the guest
//! writes. The log sees every write to guest RAM made while the guest runs: the guest's own and
//! the kernel's (string I/O, in-kernel devices, kvm-clock pages). User space writes guest RAM
//! only before the first vCPU runs (the kernel loader, firmware tables), as no device model does
//! DMA; a device that does must mark what it writes before live checkpoints can cover it.
//! A suspend stops the guest first and writes everything once: the guest does not run on, so
//! copying while it runs would only write pages twice.
//! Restore mirrors it ([`Restore::apply`]): configuration → RAM mapped privately from the file
//! (lazy; the file leased first where the host allows, [`Restore::lease_file`]) → devices created paused → VM state → vCPU states → device states → starting the
//! machine resumes the devices, then starts the vCPUs last.

use std::os::fd::AsFd;
use std::path::Path;

use crate::config::Config;
use crate::devices::Devices;
use crate::memory::{GuestMemory, GuestRegion};
use crate::snapshot::backend_state::{BackendStatePayload, BACKEND_STATE_VERSION};
use crate::snapshot::cmdline::RestoreMode;
use crate::snapshot::{
    Arch, Backend, CopyOptions, HeaderInfo, Requirement, Section, SnapshotReader, SnapshotWriter,
    HEADER_FLAG_SUSPENDED,
};
use crate::vcpu::VcpuSet;
use crate::vmm::{BackendState, Vm};

/// What a save needs to reach in a running machine.
pub struct SaveTarget<'a> {
    pub config: &'a Config,
    pub memory: &'a GuestMemory,
    pub vm: &'a dyn Vm,
    pub vcpus: &'a VcpuSet,
    pub devices: &'a Devices,
}

/// A checkpoint whose state is all in the file: [`Written::commit`] makes it durable and gives
/// it its name. After a checkpoint the machine already runs again; after a suspend it stays
/// paused.
#[derive(Debug)]
pub struct Written {
    writer: SnapshotWriter,
    suspend: bool,
}

impl Written {
    /// fsync and rename. Needs no device: the caller may drop its locks first, so nothing waits
    /// on the disk. When a suspend cannot be committed, `resume` is called (see [`resume`]) and
    /// the machine runs on.
    pub fn commit(self, resume: impl FnOnce()) -> Result<(), String> {
        let result = self.writer.commit().map_err(|e| e.to_string());
        if self.suspend && result.is_err() {
            resume();
        }
        result
    }
}

/// Let a paused machine run again: devices first, then the vCPUs.
pub fn resume(target: &SaveTarget<'_>) {
    target.devices.resume();
    target.vcpus.resume_all();
}

/// Take a snapshot of a running machine into `name` in `dir`: see the module documentation
/// for the order. On failure, or unless `suspend`, the machine runs on; after a successful
/// suspend it stays paused for the caller to end it. The file is complete but not yet durable
/// or named until [`Written::commit`].
pub fn checkpoint(
    target: &SaveTarget<'_>,
    dir: impl AsFd,
    name: &str,
    suspend: bool,
) -> Result<Written, String> {
    target.devices.check_saveable()?;
    let info = header_info(suspend);
    let precopied = if !suspend && target.vm.platform().dirty_log {
        Some(precopy(target, &dir, name, info.clone())?)
    } else {
        None
    };
    let live = precopied.is_some();
    if let Err(e) = target.vcpus.pause_all() {
        if live {
            stop_dirty_log(target.vm);
        }
        return Err(format!("cannot pause the vCPUs: {e}"));
    }
    let paused = std::time::Instant::now();
    let written = notify_paused(target.vcpus).and_then(|()| {
        target.devices.pause();
        write_state(target, dir, name, info, precopied)
    });
    log::debug!(
        "checkpoint {}: state written {:.1} ms after the pause",
        name.escape_default(),
        paused.elapsed().as_secs_f64() * 1e3
    );
    let result = match written {
        Ok(writer) => {
            if !suspend {
                // Every byte of state is in the file already: the guest runs on while the file
                // is made durable and renamed, which is most of a checkpoint's time on a disk.
                resume(target);
                log::info!(
                    "checkpoint {name}: guest stopped for {:.1} ms{}",
                    paused.elapsed().as_secs_f64() * 1e3,
                    if live { " (live)" } else { "" }
                );
            }
            Ok(Written { writer, suspend })
        }
        Err(e) => {
            resume(target);
            Err(e)
        }
    };
    if live {
        // Only once the guest runs again: the file is complete, and turning the log off
        // rebuilds the kernel's mappings of all guest RAM, which takes time that grows with
        // memory size.
        stop_dirty_log(target.vm);
    }
    result
}

/// Most passes over the dirty log while the guest runs. A guest that rewrites its memory
/// faster than it can be written never lets the log shrink much; after this many passes the
/// rest is written with the guest stopped.
pub const MAX_PRECOPY_PASSES: usize = 8;

/// Dirty pages few enough to write with the guest stopped: 1 MiB, well under a millisecond.
const STOP_COPY_PAGES: usize = 256;

/// A snapshot whose RAM was written while the guest ran, with the dirty log still on.
struct Precopied {
    writer: SnapshotWriter,
    /// Writer region of each region of guest memory.
    regions: Vec<usize>,
}

impl Precopied {
    /// With the vCPUs paused: write the pages dirtied since the last pass, so the file holds
    /// RAM exactly as it is now.
    fn finish(mut self, target: &SaveTarget<'_>) -> Result<SnapshotWriter, String> {
        self.write_dirty(target)?;
        Ok(self.writer)
    }

    /// Write the pages the log has seen written since the previous call; how many there were.
    fn write_dirty(&mut self, target: &SaveTarget<'_>) -> Result<usize, String> {
        let dirty = target
            .vm
            .take_dirty_pages()
            .map_err(|e| format!("dirty page log: {e}"))?;
        let mut count = 0;
        for ((region, dirty), writer_region) in target
            .memory
            .regions()
            .iter()
            .zip(&dirty)
            .zip(&self.regions)
        {
            count += dirty.count();
            let data = target
                .memory
                .slice(region.gpa(), region.len())
                .map_err(|e| e.to_string())?;
            self.writer
                .write_ram_pages(*writer_region, data, |page| dirty.is_dirty(page))
                .map_err(|e| e.to_string())?;
        }
        Ok(count)
    }
}

/// Turn the dirty log on and write guest RAM while the guest runs: every populated page once,
/// then the pages dirtied meanwhile while their number keeps falling. On failure the log is off
/// again.
fn precopy(
    target: &SaveTarget<'_>,
    dir: impl AsFd,
    name: &str,
    info: HeaderInfo,
) -> Result<Precopied, String> {
    let writer = SnapshotWriter::create_in(dir, name, info).map_err(|e| e.to_string())?;
    target
        .vm
        .start_dirty_log()
        .map_err(|e| format!("dirty page log: {e}"))?;
    let mut precopied = Precopied {
        writer,
        regions: Vec::new(),
    };
    match precopy_passes(target, &mut precopied) {
        Ok(()) => Ok(precopied),
        Err(e) => {
            stop_dirty_log(target.vm);
            Err(e)
        }
    }
}

fn precopy_passes(target: &SaveTarget<'_>, precopied: &mut Precopied) -> Result<(), String> {
    let started = std::time::Instant::now();
    // The log is on before the first page is read: whatever the guest writes from here on is
    // written again later.
    for region in target.memory.regions() {
        let index = precopied
            .writer
            .begin_ram_region(region.gpa(), region.len())
            .map_err(|e| e.to_string())?;
        let data = target
            .memory
            .slice(region.gpa(), region.len())
            .map_err(|e| e.to_string())?;
        let populated = region.populated_pages();
        precopied
            .writer
            .write_ram_populated(index, data, populated.as_deref())
            .map_err(|e| e.to_string())?;
        precopied.regions.push(index);
    }
    let mut passes = 1;
    let mut previous = usize::MAX;
    let mut again = 0;
    while passes < MAX_PRECOPY_PASSES - 1 {
        let dirty = precopied.write_dirty(target)?;
        passes += 1;
        again += dirty;
        log::debug!("precopy pass {passes}: {dirty} dirty pages");
        if dirty <= STOP_COPY_PAGES || dirty >= previous {
            break;
        }
        previous = dirty;
    }
    // Written back while the guest still runs, the stop's own writes find a clean page cache
    // and are not throttled behind gigabytes of write-back; the fsync at commit then has
    // little left to do. What the guest wrote meanwhile goes in one more pass.
    precopied.writer.sync_data().map_err(|e| e.to_string())?;
    let dirty = precopied.write_dirty(target)?;
    passes += 1;
    again += dirty;
    log::debug!("precopy pass {passes}, after write-back: {dirty} dirty pages");
    log::info!(
        "precopy: {passes} passes over guest RAM in {:.1} ms, {again} dirty pages written again",
        started.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

fn stop_dirty_log(vm: &dyn Vm) {
    if let Err(e) = vm.stop_dirty_log() {
        // The guest keeps running, only slower while its writes fault into the log.
        log::warn!("cannot stop the dirty page log: {e}");
    }
}

/// The backend this build's snapshots come from and restore to.
fn host_backend() -> Backend {
    if cfg!(target_os = "linux") {
        Backend::Kvm
    } else {
        Backend::FreeBsdVmm
    }
}

fn header_info(suspended: bool) -> HeaderInfo {
    let mut info = HeaderInfo::this_build(host_backend());
    if suspended {
        info.flags |= HEADER_FLAG_SUSPENDED;
    }
    info
}

/// Tell each vCPU's guest that it was stopped (kvm-clock's flag, set at its next entry).
fn notify_paused(vcpus: &VcpuSet) -> Result<(), String> {
    for index in 0..vcpus.len() {
        vcpus
            .with_vcpu(index, |vcpu| vcpu.notify_paused())
            .map_err(|e| format!("vCPU {index}: {e}"))?
            .map_err(|e| format!("vCPU {index}: {e}"))?;
    }
    Ok(())
}

/// Write the machine's state into a new snapshot of `name` in `dir` described by `info`, or
/// for a live checkpoint into the snapshot that already holds RAM as it was copied while the
/// guest ran; to be committed by the caller. The vCPUs and devices must be paused until this
/// returns.
fn write_state(
    target: &SaveTarget<'_>,
    dir: impl AsFd,
    name: &str,
    info: HeaderInfo,
    precopied: Option<Precopied>,
) -> Result<SnapshotWriter, String> {
    // The hypervisor's state first, right after the pause: the in-kernel timer (PIT) keeps
    // running while the vCPUs are stopped, and every tick it raises during the RAM copy would
    // otherwise show up as a pending interrupt in the saved interrupt controllers.
    let vm_state = target
        .vm
        .save_state()
        .map_err(|e| format!("VM state: {e}"))?;
    let mut vcpu_states = Vec::with_capacity(target.vcpus.len());
    for index in 0..target.vcpus.len() {
        let state = target
            .vcpus
            .with_vcpu(index, |vcpu| vcpu.save_state())
            .map_err(|e| format!("vCPU {index}: {e}"))?
            .map_err(|e| format!("vCPU {index}: {e}"))?;
        vcpu_states.push(state);
    }
    let mut writer = match precopied {
        Some(precopied) => precopied.finish(target)?,
        None => SnapshotWriter::create_in(dir, name, info).map_err(|e| e.to_string())?,
    };
    writer
        .add_config(target.config.iter())
        .map_err(|e| e.to_string())?;
    if !writer.has_ram() {
        for region in target.memory.regions() {
            let data = target
                .memory
                .slice(region.gpa(), region.len())
                .map_err(|e| e.to_string())?;
            let started = std::time::Instant::now();
            let populated = region.populated_pages();
            let walked = started.elapsed();
            let stats = writer
                .add_ram_region_populated(region.gpa(), data, populated.as_deref())
                .map_err(|e| e.to_string())?;
            log::debug!(
                "RAM at {:#x}: page map read in {:.1} ms, {} MiB written in {:.1} ms",
                region.gpa(),
                walked.as_secs_f64() * 1e3,
                stats.written >> 20,
                (started.elapsed() - walked).as_secs_f64() * 1e3
            );
        }
    }
    add_backend_state(&mut writer, "vm", "", &vm_state)?;
    for (index, state) in vcpu_states.iter().enumerate() {
        add_backend_state(&mut writer, "vcpu", &index.to_string(), state)?;
    }
    add_device_states(&mut writer, target.devices)?;
    Ok(writer)
}

/// Each stateful part of the devices in a section of its own, named by its id and versioned by
/// the part, in the order of [`Devices::parts`].
pub(crate) fn add_device_states(
    writer: &mut SnapshotWriter,
    devices: &Devices,
) -> Result<(), String> {
    for part in devices.parts() {
        let id = part.id();
        let payload = part.save()?;
        writer
            .add_section(
                id.section,
                &id.instance,
                part.state_version(),
                Requirement::Mandatory,
                &payload,
            )
            .map_err(|e| format!("{} {}: {e}", id.section, id.instance))?;
    }
    Ok(())
}

fn add_backend_state(
    writer: &mut SnapshotWriter,
    name: &str,
    instance: &str,
    state: &BackendState,
) -> Result<(), String> {
    writer
        .add_encoded(
            name,
            instance,
            BACKEND_STATE_VERSION,
            Requirement::Mandatory,
            &BackendStatePayload::from(state),
        )
        .map_err(|e| format!("{name} {instance}: {e}"))
}

/// Copy every page of `source` that may hold data into the same guest-physical place of
/// `target` (pages an anonymous source never populated read as zero there already, in memory
/// the backend just made).
pub(crate) fn copy_populated(source: &GuestMemory, target: &GuestMemory) -> Result<(), String> {
    const PAGE: u64 = crate::memory::PAGE_SIZE;
    for region in source.regions() {
        let bytes = region.as_slice();
        let populated = region.populated_pages();
        for (page, chunk) in bytes.chunks(PAGE as usize).enumerate() {
            if populated
                .as_ref()
                .is_some_and(|p| !p.get(page).copied().unwrap_or(true))
            {
                continue;
            }
            let gpa = region.gpa() + page as u64 * PAGE;
            target
                .write(gpa, chunk)
                .map_err(|e| format!("restoring RAM at {gpa:#x}: {e}"))?;
        }
    }
    Ok(())
}

/// An open snapshot with its configuration, ready to build a machine from.
pub struct Restore {
    reader: SnapshotReader,
    path: std::path::PathBuf,
}

impl Restore {
    pub fn open(path: &Path) -> Result<Self, String> {
        let reader = SnapshotReader::open(path).map_err(|e| e.to_string())?;
        let header = reader.header();
        if header.arch != Arch::host() {
            return Err(format!(
                "snapshot was taken on {}; this host is {}",
                header.arch,
                Arch::host()
            ));
        }
        if header.backend != host_backend() {
            return Err(format!(
                "snapshot was written by the {} backend; this bhyve runs on {}",
                header.backend,
                host_backend()
            ));
        }
        Ok(Self {
            reader,
            path: path.to_path_buf(),
        })
    }

    /// The configuration the VM was saved with.
    pub fn config(&self) -> Config {
        self.reader.config_tree()
    }

    /// Guest RAM as `mode` asks: mapped copy-on-write from the file (nothing is read until the
    /// guest touches it), or read into fresh memory and checked against the `ram-index`.
    /// Where the saved RAM regions go: (guest-physical address, length) pairs.
    pub fn ram_layout(&self) -> Vec<(u64, u64)> {
        self.reader
            .ram_regions()
            .iter()
            .map(|r| (r.gpa, r.size))
            .collect()
    }

    /// Copy the saved RAM into `target`, guest memory the backend made (FreeBSD's memory
    /// segments, which cannot be replaced by a mapping of the file): each region is read and
    /// checked as [`RestoreMode::Copy`] reads it, then the pages it holds are written over.
    pub fn copy_memory_into(&self, target: &GuestMemory) -> Result<(), String> {
        let saved = self.memory(RestoreMode::Copy)?;
        copy_populated(&saved, target)
    }

    pub fn memory(&self, mode: RestoreMode) -> Result<GuestMemory, String> {
        let mut regions = Vec::new();
        for region in self.reader.ram_regions() {
            let guest_region = match mode {
                RestoreMode::Map => {
                    let mapping = self
                        .reader
                        .map_ram_private(region)
                        .map_err(|e| e.to_string())?;
                    GuestRegion::from_mapping(region.gpa, mapping)
                }
                RestoreMode::Copy => {
                    let mut fresh = GuestRegion::anonymous(region.gpa, region.size)
                        .map_err(|e| e.to_string())?;
                    self.reader
                        .restore_ram_copy(region, fresh.as_mut_slice(), CopyOptions::default())
                        .map_err(|e| e.to_string())?;
                    fresh
                }
            };
            regions.push(guest_region);
        }
        if mode == RestoreMode::Map {
            let needed = self
                .reader
                .ram_regions()
                .iter()
                .map(|r| r.file_offset + r.size)
                .max()
                .unwrap_or(0);
            let ranges = regions
                .iter()
                .map(|r| (r.host_address() as usize, r.len() as usize))
                .collect();
            crate::snapshot::mapped::watch(&self.path, self.reader.file(), needed, ranges);
        }
        GuestMemory::from_regions(regions).map_err(|e| e.to_string())
    }

    /// For a mapped restore: a read lease that keeps writers of the file from changing the
    /// guest's memory (see [`crate::snapshot::lease`]). Taken before the RAM is mapped. When the
    /// host refuses it, a warning says why and the guest runs without it, as the file then
    /// must stay unchanged.
    #[cfg(target_os = "linux")]
    pub fn lease_file(&self) -> Option<crate::snapshot::lease::Lease> {
        use crate::snapshot::lease::{Lease, MappedRegion};
        let regions = self
            .reader
            .ram_regions()
            .iter()
            .map(|r| MappedRegion {
                gpa: r.gpa,
                file_offset: r.file_offset,
                size: r.size,
            })
            .collect();
        match Lease::take(&self.path, self.reader.file(), regions) {
            Ok(lease) => Some(lease),
            Err(reason) => {
                log::warn!(
                    "cannot keep writers away from {} while guest memory is mapped from it \
                     ({reason}): it must stay unchanged while the guest runs",
                    crate::logging::escape_controls(&self.path.to_string_lossy())
                );
                None
            }
        }
    }

    fn backend_state(&self, name: &str, instance: &str) -> Result<BackendState, String> {
        let section = self.take(name, instance, BACKEND_STATE_VERSION)?;
        // The decoder's errors name the section already.
        let payload: BackendStatePayload = section.decode().map_err(|e| e.to_string())?;
        Ok(payload.into())
    }

    /// Take section `name`/`instance`, which must have `version`, the one this bhyve writes:
    /// a newer one holds state this bhyve does not know, an older one lacks state.
    fn take(&self, name: &str, instance: &str, version: u32) -> Result<Section<'_>, String> {
        self.take_if_present(name, instance, version)?
            .ok_or_else(|| {
                format!(
                    "section {} is missing",
                    crate::snapshot::section_label(name, instance)
                )
            })
    }

    /// [`Restore::take`], for a section the snapshot may not have.
    fn take_if_present(
        &self,
        name: &str,
        instance: &str,
        version: u32,
    ) -> Result<Option<Section<'_>>, String> {
        let what = crate::snapshot::section_label(name, instance);
        let Some(section) = self
            .reader
            .take_versioned(name, instance, version)
            .map_err(|e| e.to_string())?
        else {
            return Ok(None);
        };
        if section.version < version {
            return Err(format!(
                "section {what} has version {}, from an older bhyve; this one restores \
                 version {version}",
                section.version
            ));
        }
        Ok(Some(section))
    }

    /// Put the saved VM, vCPU and device state into a freshly built machine (not started).
    /// The devices stay paused, as they were created, so no input or timer reaches them
    /// before their state is loaded; starting the machine resumes them before the vCPUs.
    pub fn apply(&self, vm: &dyn Vm, vcpus: &VcpuSet, devices: &Devices) -> Result<(), String> {
        devices.pause();
        // The RAM sections were consumed by `memory`; the configuration by `config`.
        for region in self.reader.ram_regions() {
            self.reader.take("ram", &region.instance);
            self.reader.take("ram-index", &region.instance);
        }
        self.reader.take("config", "");
        vm.restore_state(&self.backend_state("vm", "")?)
            .map_err(|e| format!("VM state: {e}"))?;
        let mut tsc_ran_on = None;
        for index in 0..vcpus.len() {
            let state = self.backend_state("vcpu", &index.to_string())?;
            let ran_on = vcpus
                .with_vcpu(index, |vcpu| {
                    vcpu.restore_state(&state)?;
                    vcpu.tsc_ran_on(&state)
                })
                .map_err(|e| format!("vCPU {index}: {e}"))?
                .map_err(|e| format!("vCPU {index}: {e}"))?;
            tsc_ran_on = tsc_ran_on.or(ran_on);
        }
        self.restore_device_states(devices)?;
        if let Some(by) = tsc_ran_on {
            log::info!(
                "the guest's TSC ran on by {:.1} s while saved (this KVM cannot set it): the \
                 RTC follows it",
                by.as_secs_f64()
            );
            for part in devices.parts() {
                part.guest_time_moved(by);
            }
        }
        self.reader
            .finish_check_unconsumed()
            .map_err(|e| e.to_string())
    }

    /// Load each stateful part of `devices` from the section its id names, which must have the
    /// version the part writes. A part added to bhyve after the snapshot was written may accept
    /// that it has no section ([`crate::devices::Persist::accepts_missing_state`]) and stays as
    /// it was created.
    pub(crate) fn restore_device_states(&self, devices: &Devices) -> Result<(), String> {
        for part in devices.parts() {
            let id = part.id();
            match self.take_if_present(id.section, &id.instance, part.state_version())? {
                Some(section) => part.restore(&section)?,
                None if part.accepts_missing_state() => log::info!(
                    "snapshot has no section {}: {} starts as created",
                    crate::snapshot::section_label(id.section, &id.instance),
                    id.name()
                ),
                None => {
                    return Err(format!(
                        "section {} is missing",
                        crate::snapshot::section_label(id.section, &id.instance)
                    ))
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copying_saved_ram_into_backend_memory_writes_every_page_that_holds_data() {
        let size = 4 << 20;
        let saved = GuestMemory::new(size).unwrap();
        saved.write(0x1000, b"first page").unwrap();
        saved.write(0x3f_fff8, &[7; 8]).unwrap();
        let target = GuestMemory::new(size).unwrap();
        // A page the saved RAM never populated is left as the backend made it.
        target.write(0x2_0000, &[0xff; 4]).unwrap();
        copy_populated(&saved, &target).unwrap();
        assert_eq!(target.slice(0x1000, 10).unwrap(), b"first page");
        assert_eq!(target.slice(0x3f_fff8, 8).unwrap(), &[7; 8]);
        assert_eq!(target.slice(0x2_0000, 4).unwrap(), &[0xff; 4]);
        // Memory of another size is refused, not half written past its end.
        let small = GuestMemory::new(2 << 20).unwrap();
        let err = copy_populated(&saved, &small).unwrap_err();
        assert!(err.starts_with("restoring RAM at 0x3ff000"), "{err}");
    }
}
