//! How a VM ends: the reasons and bhyve's exit status for each, and the one call devices and
//! control threads use to end a VM without knowing about vCPU threads.

/// Why the VM stopped, and so bhyve's exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset itself (bhyve exits 0).
    Reset,
    /// The guest powered off (exit 1).
    PowerOff,
    /// Every started vCPU halted with interrupts disabled (exit 2).
    Halt,
    /// A vCPU triple-faulted (exit 3).
    TripleFault,
    /// The VM was saved and stopped on request (`bhyvectl --suspend`); bhyve exits 0.
    Suspended,
    /// Anything fatal; the message is printed as `bhyve: <message>` (exit 4).
    Error(String),
    /// The guest wrote V to pc-testdev's `isa-debug-exit` port; bhyve and QEMU exit with
    /// `(V << 1) | 1`, carried here.
    DebugExit(i32),
    /// A signal ended the VM before the guest could be asked to shut down; bhyve tears the VM
    /// down and then dies of the same signal, as a process killed by it would.
    Signalled(i32),
}

impl ExitReason {
    /// bhyve(8)'s exit status for this reason.
    pub fn status(&self) -> i32 {
        match self {
            ExitReason::Reset | ExitReason::Suspended => 0,
            ExitReason::PowerOff => 1,
            ExitReason::Halt => 2,
            ExitReason::TripleFault => 3,
            ExitReason::Error(_) => 4,
            ExitReason::DebugExit(status) => *status,
            ExitReason::Signalled(signal) => 128 + signal,
        }
    }
}

/// Ends the VM: implemented by the machine's vCPU control, held by devices (the power button,
/// the reset register, pc-testdev) and the control socket.
pub trait RequestExit: Send + Sync {
    /// End the VM with `reason`; the first request wins. Callable from any thread.
    fn request_exit(&self, reason: ExitReason);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_follow_bhyve() {
        assert_eq!(ExitReason::Reset.status(), 0);
        assert_eq!(ExitReason::PowerOff.status(), 1);
        assert_eq!(ExitReason::Halt.status(), 2);
        assert_eq!(ExitReason::TripleFault.status(), 3);
        assert_eq!(ExitReason::Error("x".into()).status(), 4);
    }
}
