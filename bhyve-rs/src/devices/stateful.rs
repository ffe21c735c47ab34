//! The one trait every stateful part of the VM's devices implements, PCI or not: a stable id,
//! pause (quiesce) and resume, and, with snapshots built in, a state version, save and restore
//! ([`Persist`]). [`super::Devices`] keeps the parts in a list; pausing, resuming, saving and
//! restoring walk that list and never name a device.

use std::any::Any;

/// Where a part's state goes in a snapshot: the section `name` and its `instance`, as
/// bhyve_snapshot(5) files name them (`pci`/`lpc@pci.0.31.0`, `uart`/`com1`, `rtc`/``).
/// Stable: a restore finds the state by it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateId {
    pub section: &'static str,
    pub instance: String,
}

impl StateId {
    /// A part of which a VM has at most one: its instance is empty.
    pub fn single(section: &'static str) -> Self {
        Self {
            section,
            instance: String::new(),
        }
    }

    /// The instance name, or the section name for a part of which a VM has one.
    pub fn name(&self) -> &str {
        if self.instance.is_empty() {
            self.section
        } else {
            &self.instance
        }
    }
}

/// A stateful part of the VM (a PCI function, a COM port, the RTC, …).
pub trait Stateful: AsAny + Persist + Send + Sync {
    fn id(&self) -> StateId;

    /// With the vCPUs stopped: finish in-flight work and keep background threads (timers,
    /// input, I/O) from changing the part's state or raising interrupts until
    /// [`Stateful::resume`]. Parts are paused in the reverse order of the list, so a PCI
    /// function is paused last and resumed first.
    fn pause(&self) {}

    /// Undo [`Stateful::pause`].
    fn resume(&self) {}

    /// The VM goes away: ask background threads to end. Every part is told before any is
    /// dropped, so no part waits for a thread another part could have stopped meanwhile.
    fn stop(&self) {}
}

/// The snapshot half of [`Stateful`].
#[cfg(feature = "bhyve_snapshot")]
pub trait Persist {
    /// The payload version of this part's section. A restore takes this version only: a newer
    /// one holds state this bhyve does not know, an older one lacks state.
    fn state_version(&self) -> u32;

    /// Whether a snapshot can hold this part; the error names it. Checked for every part
    /// before a checkpoint pauses anything.
    fn check_saveable(&self) -> Result<(), String> {
        Ok(())
    }

    /// The part's state as its section's payload (see [`crate::snapshot::encode_section`]).
    fn save(&self) -> Result<Vec<u8>, String>;

    /// Load the state [`Persist::save`] wrote into a part created from the same configuration.
    /// `section` decodes the payload with errors that name it.
    fn restore(&self, section: &crate::snapshot::Section<'_>) -> Result<(), String>;

    /// Whether a snapshot without this part's section restores, the part staying as created.
    /// For a device every VM gained after snapshots of VMs without it were written, whose
    /// guests never saw it (their firmware tables, in their RAM, do not list it). Otherwise a
    /// missing section fails the restore.
    fn accepts_missing_state(&self) -> bool {
        false
    }

    /// After a restore: the guest's TSC ran on by `by` past its saved value (see
    /// `vmm::Vcpu::tsc_ran_on`), so a clock the guest reads beside it moves on as much, or the
    /// guest would find its clocks disagreeing.
    fn guest_time_moved(&self, _by: std::time::Duration) {}
}

/// Without snapshots, nothing to implement.
#[cfg(not(feature = "bhyve_snapshot"))]
pub trait Persist {}

#[cfg(not(feature = "bhyve_snapshot"))]
impl<T: ?Sized> Persist for T {}

/// Reach the concrete part behind a `dyn Stateful` (tests, the SIGTERM handler's power button).
pub trait AsAny {
    fn as_any(&self) -> &dyn Any;
}

impl<T: Any> AsAny for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
}
