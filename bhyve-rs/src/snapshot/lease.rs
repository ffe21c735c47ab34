//! Keeping writers of a snapshot file from damaging the guest whose memory is mapped from it
//! (Linux). A read lease (`F_SETLEASE`, `F_RDLCK`) is held on the file while guest memory is
//! mapped from it. When another process opens the file for writing or truncates it, the kernel
//! holds that writer back (for at most `/proc/sys/fs/lease-break-time` seconds) and tells the
//! lease holder with a signal. Meanwhile bhyve reads the file's data into fresh memory as the
//! guest runs, then stops the guest only to copy the pages it wrote since the restore and to
//! put the fresh memory at the same addresses, lets the guest run again and gives the lease
//! up: the writer proceeds, and the guest no longer depends on the file.
//!
//! A lease needs the file's owner or CAP_LEASE, a file nobody has open for writing, and a file
//! system that supports leases. Without one, the guest runs as before: the file must then stay
//! unchanged (see [`super::mapped`]).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

use nix::sys::pthread::pthread_kill;
use nix::sys::signal::{SigSet, Signal};

use super::ram::data_extents;
use crate::memory::{GuestMemory, Replacement};

/// The signal a lease break is told with. Every bhyve thread has it blocked (see
/// [`block_break_signal`]); the lease thread takes it with sigwait.
const BREAK_SIGNAL: Signal = Signal::SIGIO;

// From <linux/fcntl.h> (asm-generic): the libc crate does not define them for every target.
const F_SETSIG: libc::c_int = 10;
const F_SETOWN_EX: libc::c_int = 15;
const F_OWNER_TID: libc::c_int = 0;

/// `struct f_owner_ex`.
#[repr(C)]
struct OwnerEx {
    kind: libc::c_int,
    pid: libc::pid_t,
}

/// One RAM region mapped from the file: where it is in the guest and in the file.
#[derive(Debug, Clone, Copy)]
pub struct MappedRegion {
    pub gpa: u64,
    pub file_offset: u64,
    pub size: u64,
}

/// Runs the work it is given with the guest stopped (every vCPU paused) and returns once the
/// guest runs again. Provided by the machine, which owns the vCPUs.
pub type WithGuestStopped = Box<dyn FnOnce(&mut dyn FnMut()) -> Result<(), String> + Send>;

/// What the lease thread needs to take guest memory out of the file.
struct Detach {
    memory: Weak<GuestMemory>,
    with_guest_stopped: WithGuestStopped,
}

/// A read lease held on the snapshot file by a thread of its own, for as long as this lives.
pub struct Lease {
    stop: Arc<AtomicBool>,
    detach: Option<Sender<Detach>>,
    thread: Option<JoinHandle<()>>,
}

/// Block the lease-break signal (SIGIO) in the calling thread and every thread it starts
/// afterwards, so a notice sent to the whole process (before the lease thread directs them to
/// itself) waits for the lease thread instead of ending bhyve.
pub fn block_break_signal() -> nix::Result<()> {
    break_signal().thread_block()
}

fn break_signal() -> SigSet {
    let mut set = SigSet::empty();
    set.add(BREAK_SIGNAL);
    set
}

impl Lease {
    /// Take a read lease on `file` (named `path`), whose `regions` are mapped as guest memory.
    /// The error says in words why the host refused it.
    pub fn take(path: &Path, file: &File, regions: Vec<MappedRegion>) -> Result<Self, String> {
        let file = file.try_clone().map_err(|e| e.to_string())?;
        let stop = Arc::new(AtomicBool::new(false));
        let (taken_tx, taken_rx) = mpsc::channel();
        let (detach_tx, detach_rx) = mpsc::channel();
        let holder = Holder {
            path: path.to_path_buf(),
            file,
            regions,
            stop: stop.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("snapshot lease".into())
            .spawn(move || holder.run(&taken_tx, &detach_rx))
            .map_err(|e| format!("cannot start its thread: {e}"))?;
        match taken_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                stop,
                detach: Some(detach_tx),
                thread: Some(thread),
            }),
            Ok(Err(reason)) => {
                let _ = thread.join();
                Err(reason)
            }
            Err(_) => {
                let _ = thread.join();
                Err("its thread ended".into())
            }
        }
    }

    /// When a writer comes, move guest `memory` out of the file with the guest stopped by
    /// `with_guest_stopped`. Until this is called, a writer waits.
    pub fn on_break(&mut self, memory: Weak<GuestMemory>, with_guest_stopped: WithGuestStopped) {
        if let Some(detach) = &self.detach {
            let _ = detach.send(Detach {
                memory,
                with_guest_stopped,
            });
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // A thread waiting for `on_break` learns that it will not come.
        self.detach = None;
        if let Some(thread) = self.thread.take() {
            // Wakes a thread waiting for the signal; until joined, the thread id stays valid.
            let _ = pthread_kill(thread.as_pthread_t(), BREAK_SIGNAL);
            let _ = thread.join();
        }
    }
}

/// The lease thread's state.
struct Holder {
    path: PathBuf,
    file: File,
    regions: Vec<MappedRegion>,
    stop: Arc<AtomicBool>,
}

impl Holder {
    fn run(self, taken: &Sender<Result<(), String>>, detach: &Receiver<Detach>) {
        let signal = break_signal();
        if let Err(e) = signal.thread_block() {
            let _ = taken.send(Err(format!("cannot block {BREAK_SIGNAL}: {e}")));
            return;
        }
        if let Err(e) = self.take() {
            let _ = taken.send(Err(refusal(&e)));
            return;
        }
        let _ = taken.send(Ok(()));
        loop {
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            // Checked before every wait: a notice sent before it was directed here (or lost)
            // still shows as a lease being broken.
            if self.breaking() {
                self.detach(detach);
                break;
            }
            let _ = signal.wait();
        }
        let _ = fcntl(&self.file, libc::F_SETLEASE, libc::F_UNLCK);
    }

    fn take(&self) -> io::Result<()> {
        fcntl(&self.file, F_SETSIG, BREAK_SIGNAL as libc::c_int)?;
        // A process that forked between another program's write and close holds the file open
        // for writing until it execs, a few milliseconds: only a writer that stays is refused.
        let mut tries = 0;
        while let Err(e) = fcntl(&self.file, libc::F_SETLEASE, libc::F_RDLCK) {
            tries += 1;
            if e.raw_os_error() != Some(libc::EAGAIN) || tries == LEASE_TRIES {
                return Err(e);
            }
            std::thread::sleep(LEASE_RETRY);
        }
        // Taking the lease made the whole process its notices' target; this thread alone
        // waits for them.
        let owner = OwnerEx {
            kind: F_OWNER_TID,
            pid: nix::unistd::gettid().as_raw(),
        };
        // SAFETY: F_SETOWN_EX reads one `struct f_owner_ex` from the pointer, which is valid for
        // the call; the descriptor is this thread's own.
        if unsafe { libc::fcntl(self.file.as_raw_fd(), F_SETOWN_EX, &owner) } < 0 {
            // Notices then go to the process, where every thread but this one blocks them and
            // this one takes them all the same.
            log::debug!(
                "lease notices to this thread: {}",
                io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// Someone wants the file: the lease is being broken (or was, if its time ran out).
    fn breaking(&self) -> bool {
        fcntl(&self.file, libc::F_GETLEASE, 0).map_or(true, |kind| kind != libc::F_RDLCK)
    }

    /// Move guest memory out of the file while the writer waits.
    fn detach(&self, detach: &Receiver<Detach>) {
        // Until the machine is built and can stop the guest, the writer waits.
        let Ok(Detach {
            memory,
            with_guest_stopped,
        }) = detach.recv()
        else {
            return;
        };
        let Some(memory) = memory.upgrade() else {
            return;
        };
        let path = crate::logging::escape_controls(&self.path.to_string_lossy()).into_owned();
        match self.move_out(&memory, with_guest_stopped) {
            Ok(how) => {
                super::mapped::unwatch();
                log::info!(
                    "{path} is wanted by a writer: guest memory moved out of it ({how}), \
                     the file is free"
                );
            }
            Err(e) => log::warn!(
                "{path} is wanted by a writer, but guest memory cannot be moved out of it \
                 ({e}): the guest may see what the writer does"
            ),
        }
    }

    /// Fill fresh memory with the file's data while the guest runs (the writer waits, so the
    /// data is what the guest mapped), then stop the guest only to copy the pages it wrote
    /// since and to put the fresh memory in place. Says in words what it took.
    fn move_out(
        &self,
        memory: &GuestMemory,
        with_guest_stopped: WithGuestStopped,
    ) -> Result<String, String> {
        let started = Instant::now();
        let mut replacements = Vec::with_capacity(self.regions.len());
        let mut read = 0u64;
        for region in &self.regions {
            let (replacement, bytes) = self.read_region(memory, region)?;
            replacements.push(replacement);
            read += bytes;
        }
        let reading = started.elapsed();
        let mut installed = Ok(0u64);
        let mut paused = std::time::Duration::ZERO;
        with_guest_stopped(&mut || {
            let stopped = Instant::now();
            installed = replacements
                .drain(..)
                .try_fold(0u64, |copied, replacement| {
                    Ok::<u64, String>(
                        copied + memory.install(replacement).map_err(|e| e.to_string())?,
                    )
                });
            paused = stopped.elapsed();
        })?;
        let copied = installed?;
        Ok(format!(
            "{} MiB read in {} ms, then the guest paused {} ms to copy {} KiB it wrote",
            read >> 20,
            reading.as_millis(),
            paused.as_millis(),
            copied >> 10
        ))
    }

    /// Fresh memory for `region` holding what the file holds for it, and the bytes read.
    fn read_region(
        &self,
        memory: &GuestMemory,
        region: &MappedRegion,
    ) -> Result<(Replacement, u64), String> {
        use std::os::unix::fs::FileExt;
        let mut replacement = memory
            .new_replacement(region.gpa)
            .map_err(|e| e.to_string())?;
        let end = region.file_offset + region.size;
        let extents = data_extents(&self.file, region.file_offset, end)
            .unwrap_or_else(|_| vec![(region.file_offset, end)]);
        let bytes = replacement.as_mut_slice();
        for &(start, end) in &extents {
            let from = (start - region.file_offset) as usize;
            let to = (end - region.file_offset) as usize;
            self.file
                .read_exact_at(&mut bytes[from..to], start)
                .map_err(|e| format!("read the file: {e}"))?;
        }
        Ok((replacement, super::ram::extents_len(&extents)))
    }
}

/// `fcntl(2)` with an integer argument.
fn fcntl(file: &File, command: libc::c_int, argument: libc::c_int) -> io::Result<libc::c_int> {
    // SAFETY: every command used here takes an integer argument; the descriptor is open for
    // as long as `file` lives.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), command, argument) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// How often, and how far apart, a lease refused because of a writer is asked for again.
const LEASE_TRIES: u32 = 20;
const LEASE_RETRY: std::time::Duration = std::time::Duration::from_millis(10);

/// Why the host refused the lease, in words.
fn refusal(error: &io::Error) -> String {
    match error.raw_os_error() {
        Some(libc::EAGAIN) => "it is open for writing".into(),
        Some(libc::EACCES | libc::EPERM) => "bhyve neither owns it nor has CAP_LEASE".into(),
        Some(libc::EINVAL) => {
            "its file system does not support leases, or leases are off (fs.leases-enable)".into()
        }
        _ => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRegion;
    use memmap2::MmapOptions;
    use std::io::Write;
    use std::time::Duration;

    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, data: &[u8]) -> Self {
            let path = std::env::temp_dir()
                .join(format!("bhyve-rs-lease-{name}-{}.img", std::process::id()));
            std::fs::write(&path, data).unwrap();
            Self(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    const LEN: usize = 64 * 4096;

    fn pattern() -> Vec<u8> {
        (0..LEN).map(|i| (i / 4096 * 7 + i % 251) as u8).collect()
    }

    /// `file` mapped copy-on-write as guest memory at GPA 0.
    fn mapped(file: &File) -> Arc<GuestMemory> {
        // SAFETY: the test's own file; a writer changes it only after the lease moved the
        // memory out of it.
        let map = unsafe { MmapOptions::new().map_copy(file) }.unwrap();
        Arc::new(GuestMemory::from_regions(vec![GuestRegion::from_mapping(0, map)]).unwrap())
    }

    fn whole_file() -> Vec<MappedRegion> {
        vec![MappedRegion {
            gpa: 0,
            file_offset: 0,
            size: LEN as u64,
        }]
    }

    /// Opening `path` for writing goes through at once: nobody holds a lease on it.
    fn assert_no_writer_held_back(path: &Path) {
        let started = Instant::now();
        drop(std::fs::OpenOptions::new().write(true).open(path).unwrap());
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_writer_waits_only_until_guest_memory_has_left_the_file() {
        let temp = TempFile::new("writer", &pattern());
        let file = File::open(&temp.0).unwrap();
        let memory = mapped(&file);
        memory.write(5 * 4096, b"guest").unwrap();
        let mut lease = Lease::take(&temp.0, &file, whole_file()).unwrap();
        let stops = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = stops.clone();
        lease.on_break(
            Arc::downgrade(&memory),
            Box::new(move |work| {
                counted.fetch_add(1, Ordering::SeqCst);
                work();
                Ok(())
            }),
        );
        let started = Instant::now();
        let mut writer = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&temp.0)
            .unwrap();
        let waited = started.elapsed();
        writer.write_all(&[0xee; 4096]).unwrap();
        drop(writer);
        assert_eq!(stops.load(Ordering::SeqCst), 1);
        assert!(
            waited < Duration::from_secs(5),
            "the writer waited {waited:?}"
        );
        let mut expected = pattern();
        expected[5 * 4096..5 * 4096 + 5].copy_from_slice(b"guest");
        assert!(memory.slice(0, LEN as u64).unwrap() == expected.as_slice());
        // The lease is gone with the break: a second writer is not held back.
        assert_no_writer_held_back(&temp.0);
        drop(lease);
    }

    #[test]
    fn a_file_open_for_writing_cannot_be_leased_and_says_so() {
        let temp = TempFile::new("open", &pattern());
        let _writer = std::fs::OpenOptions::new()
            .write(true)
            .open(&temp.0)
            .unwrap();
        let file = File::open(&temp.0).unwrap();
        let refused = Lease::take(&temp.0, &file, whole_file()).err();
        assert_eq!(refused.as_deref(), Some("it is open for writing"));
    }

    #[test]
    fn a_writer_that_closes_within_milliseconds_does_not_refuse_the_lease() {
        let temp = TempFile::new("transient", &pattern());
        let writer = std::fs::OpenOptions::new()
            .write(true)
            .open(&temp.0)
            .unwrap();
        // As a child forked while the file was open holds it until it execs.
        let closer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(30));
            drop(writer);
        });
        let file = File::open(&temp.0).unwrap();
        let lease = Lease::take(&temp.0, &file, whole_file());
        closer.join().unwrap();
        assert!(lease.is_ok(), "{:?}", lease.err());
    }

    #[test]
    fn a_dropped_lease_holds_no_writer_back() {
        let temp = TempFile::new("dropped", &pattern());
        let file = File::open(&temp.0).unwrap();
        let lease = Lease::take(&temp.0, &file, whole_file()).unwrap();
        drop(lease);
        assert_no_writer_held_back(&temp.0);
    }
}
