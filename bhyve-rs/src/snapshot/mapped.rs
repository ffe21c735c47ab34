//! A mapped restore (`snapshot.restore=map`, the default) runs the guest on memory mapped
//! copy-on-write from the snapshot file: pages the guest has not written are still the file's.
//! If the file is cut short while the guest runs, touching such a page fails: bhyve's own
//! access raises SIGBUS, the guest's ends the VM (as a shutdown or a failed `KVM_RUN`). Either
//! way bhyve says in one line what happened and exits with status 4, instead of dying of the
//! signal or reporting a triple fault. Where the file could be leased, [`super::lease`] moves
//! guest memory out of it before a writer gets it, and the watch ends ([`unwatch`]).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};

/// The file guest memory is mapped from, as it was when mapped.
struct Watched {
    path: PathBuf,
    file: File,
    needed: u64,
    changed: (i64, i64),
}

static WATCHED: Mutex<Option<Watched>> = Mutex::new(None);
/// Host address ranges of the mapped guest memory, for the SIGBUS handler.
static RANGES: OnceLock<Vec<(usize, usize)>> = OnceLock::new();
/// The handler's line, formatted beforehand: a signal handler may not allocate.
static SIGBUS_LINE: OnceLock<Vec<u8>> = OnceLock::new();
/// The damage was reported: a vCPU and a bhyve thread may both run into it, one line is told.
static REPORTED: AtomicBool = AtomicBool::new(false);
/// Guest memory is still mapped from the file (not moved out of it, see [`super::lease`]).
static WATCHING: AtomicBool = AtomicBool::new(false);

fn change_time(file: &File) -> (i64, i64) {
    file.metadata()
        .map(|m| (m.ctime(), m.ctime_nsec()))
        .unwrap_or((0, 0))
}

/// Watch `file` (at `path`, of which the first `needed` bytes are mapped) for the rest of the
/// process, with guest memory at the host address ranges `ranges`.
pub fn watch(path: &Path, file: &File, needed: u64, ranges: Vec<(usize, usize)>) {
    let Ok(file) = file.try_clone() else { return };
    let changed = change_time(&file);
    let line = format!(
        "bhyve: {}\n",
        crate::logging::escape_controls(&cut_short_message(path, None, needed))
    );
    if SIGBUS_LINE.set(line.into_bytes()).is_err() || RANGES.set(ranges).is_err() {
        // A process restores once; a second watch keeps the first.
        return;
    }
    *WATCHED.lock().unwrap_or_else(|e| e.into_inner()) = Some(Watched {
        path: path.to_path_buf(),
        file,
        needed,
        changed,
    });
    WATCHING.store(true, Ordering::SeqCst);
    let action = SigAction::new(
        SigHandler::SigAction(on_sigbus),
        SaFlags::SA_SIGINFO,
        SigSet::empty(),
    );
    // SAFETY: the handler only reads statics set before it is installed, and calls write(2)
    // and _exit(2), which are async-signal-safe (or restores the default and returns).
    if let Err(e) = unsafe { signal::sigaction(Signal::SIGBUS, &action) } {
        log::warn!("cannot watch the mapped snapshot for SIGBUS: {e}");
    }
}

/// Guest memory no longer comes from the file: what happens to it concerns the guest no more.
pub fn unwatch() {
    WATCHING.store(false, Ordering::SeqCst);
    *WATCHED.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

fn cut_short_message(path: &Path, length: Option<u64>, needed: u64) -> String {
    let now = match length {
        Some(length) => format!(" to {length} of the {needed} bytes"),
        None => String::new(),
    };
    format!(
        "guest memory is mapped from {}, which was cut short{now} while the guest ran \
         (a mapped restore needs the file unchanged; -o snapshot.restore=copy does not)",
        path.display()
    )
}

/// If the mapped file was damaged, say so on stderr (once per process) and return true.
pub fn report_damage() -> bool {
    let Some(message) = damage() else {
        return false;
    };
    if !REPORTED.swap(true, Ordering::SeqCst) {
        eprintln!("bhyve: {}", crate::logging::escape_controls(&message));
    }
    true
}

/// What happened to the mapped file, if anything: it is shorter than the mapped memory, or
/// it was changed since it was mapped.
fn damage() -> Option<String> {
    let watched = WATCHED.lock().unwrap_or_else(|e| e.into_inner());
    let watched = watched.as_ref()?;
    let length = watched.file.metadata().ok()?.len();
    if length < watched.needed {
        return Some(cut_short_message(
            &watched.path,
            Some(length),
            watched.needed,
        ));
    }
    (change_time(&watched.file) != watched.changed).then(|| {
        format!(
            "guest memory is mapped from {}, which was changed while the guest ran \
             (a mapped restore needs the file unchanged; -o snapshot.restore=copy does not)",
            watched.path.display()
        )
    })
}

extern "C" fn on_sigbus(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler; for SIGBUS it holds
    // the faulting address.
    let address = unsafe { (*info).si_addr() } as usize;
    let in_guest_memory = WATCHING.load(Ordering::SeqCst)
        && RANGES.get().is_some_and(|r| {
            r.iter()
                .any(|&(start, len)| address >= start && address - start < len)
        });
    if !in_guest_memory {
        // Not ours: the default action, when the access is retried.
        // SAFETY: installing the default disposition runs no code of ours.
        let _ = unsafe { signal::signal(Signal::SIGBUS, SigHandler::SigDfl) };
        return;
    }
    if REPORTED.swap(true, Ordering::SeqCst) {
        // SAFETY: as below.
        unsafe { libc::_exit(4) };
    }
    if let Some(line) = SIGBUS_LINE.get() {
        // SAFETY: write(2) on stderr from a buffer that lives for the whole process.
        let _ = unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
    }
    // SAFETY: _exit(2) ends the process at once, as a signal handler may.
    unsafe { libc::_exit(4) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_says_what_the_file_became_and_what_to_do() {
        assert_eq!(
            cut_short_message(Path::new("/vm/a.snap"), Some(4096), 1 << 30),
            "guest memory is mapped from /vm/a.snap, which was cut short to 4096 of the \
             1073741824 bytes while the guest ran (a mapped restore needs the file unchanged; \
             -o snapshot.restore=copy does not)"
        );
    }
}
