//! A device's background thread (virtio-net, virtio-console): it waits on the descriptors the
//! device's [`Work`] names and on a wake socket, then does what is ready, always with the
//! device's state locked. The device model (on vCPU threads) takes the same lock, so it never
//! sees work half-done, and pausing for a snapshot is taking the lock and setting a flag.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// What a worker thread does for its device.
pub trait Work: Send + 'static {
    /// Descriptors to wait on (besides the wake socket), while not paused. Valid until the
    /// next call: the state that owns them is locked whenever they are used.
    fn poll_set(&self) -> Vec<libc::pollfd>;

    /// Do what is ready (called after the wait, not while paused).
    fn work(&mut self);

    /// The longest the thread may wait before calling [`Work::work`] with nothing ready: a
    /// device's timer. `None`: until a descriptor is ready or a wake.
    fn timeout(&self) -> Option<std::time::Duration> {
        None
    }
}

/// The state behind the lock: the device's work and the worker's flags.
pub struct State<W> {
    pub work: W,
    paused: bool,
    stop: bool,
}

struct Shared<W> {
    state: Mutex<State<W>>,
    wake: UnixDatagram,
}

/// A device's worker: its state, and its thread once started.
pub struct Worker<W: Work> {
    shared: Arc<Shared<W>>,
    /// The thread's end of the wake socket, until the thread starts.
    waiter: Option<UnixDatagram>,
    thread: Option<JoinHandle<()>>,
}

impl<W: Work> Worker<W> {
    pub fn new(work: W) -> io::Result<Self> {
        let (wake, waiter) = UnixDatagram::pair()?;
        wake.set_nonblocking(true)?;
        waiter.set_nonblocking(true)?;
        Ok(Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    work,
                    paused: false,
                    stop: false,
                }),
                wake,
            }),
            waiter: Some(waiter),
            thread: None,
        })
    }

    /// Start the thread (once; later calls do nothing).
    pub fn start(&mut self, name: &str) -> io::Result<()> {
        let Some(waiter) = self.waiter.take() else {
            return Ok(());
        };
        let shared = self.shared.clone();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || run(&shared, &waiter))?;
        self.thread = Some(thread);
        Ok(())
    }

    /// The state, locked: the thread is between two rounds while this is held.
    pub fn lock(&self) -> MutexGuard<'_, State<W>> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Make the thread look again (something changed: a notification, new features).
    pub fn wake(&self) {
        let _ = self.shared.wake.send(&[0]);
    }

    /// No more work until [`Worker::resume`]; when this returns, none is in progress.
    pub fn pause(&self) {
        self.lock().paused = true;
    }

    pub fn resume(&self) {
        self.lock().paused = false;
        self.wake();
    }
}

impl<W: Work> Drop for Worker<W> {
    fn drop(&mut self) {
        self.lock().stop = true;
        self.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run<W: Work>(shared: &Shared<W>, waiter: &UnixDatagram) {
    let lock = || shared.state.lock().unwrap_or_else(|e| e.into_inner());
    let mut drain = [0u8; 64];
    loop {
        let mut fds = vec![libc::pollfd {
            fd: waiter.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let mut timeout_ms: libc::c_int = -1;
        {
            let state = lock();
            if state.stop {
                return;
            }
            if !state.paused {
                fds.extend(state.work.poll_set());
                if let Some(timeout) = state.work.timeout() {
                    // Rounded up: waking early would find the timer not yet due.
                    let ms = timeout.as_nanos().div_ceil(1_000_000);
                    timeout_ms = libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX);
                }
            }
        }
        // SAFETY: `fds` is an array of fds.len() pollfd structures. A descriptor closed
        // meanwhile only makes poll report it; the set is built again each round.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        while waiter.recv(&mut drain).is_ok() {}
        let mut state = lock();
        if state.stop {
            return;
        }
        if !state.paused {
            state.work.work();
        }
    }
}
