//! The background thread that drives a device's time-based events (the RTC's periodic, alarm
//! and update interrupts, the HPET's comparators): it calls the device's [`Ticking::poll`],
//! which delivers what is due and says how long until the next event, and sleeps that long.
//! A device whose deadlines the guest can move earlier holds a [`TickerWake`] and calls
//! [`TickerWake::wake`] so the thread re-polls at once instead of finishing an old sleep.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Longest sleep: also how soon the thread notices its stop flag without a wake-up.
pub const IDLE: Duration = Duration::from_millis(100);
/// Shortest sleep: bounds the thread's rate when a device asks for very frequent events.
const MIN_SLEEP: Duration = Duration::from_micros(100);

/// A device with time-driven work.
pub trait Ticking: Send + 'static {
    /// Deliver the events that are due; return how long until the next one, or `None` when
    /// none is scheduled (or the device is paused).
    fn poll(&mut self) -> Option<Duration>;
}

/// Cuts a ticker thread's sleep short.
#[derive(Clone, Default)]
pub struct TickerWake(Arc<(Mutex<bool>, Condvar)>);

impl TickerWake {
    /// Make the thread poll again now.
    pub fn wake(&self) {
        let (pending, condvar) = &*self.0;
        *pending.lock().unwrap_or_else(|e| e.into_inner()) = true;
        condvar.notify_one();
    }

    /// Sleep for `timeout` or until [`TickerWake::wake`], whichever comes first.
    fn sleep(&self, timeout: Duration) {
        let (pending, condvar) = &*self.0;
        let guard = pending.lock().unwrap_or_else(|e| e.into_inner());
        let (mut guard, _) = condvar
            .wait_timeout_while(guard, timeout, |pending| !*pending)
            .unwrap_or_else(|e| e.into_inner());
        *guard = false;
    }
}

/// Start the thread `name` polling `device` until `stop` is set; `wake` interrupts its sleeps.
pub fn spawn<D: Ticking>(
    name: &str,
    device: Arc<Mutex<D>>,
    wake: TickerWake,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let wait = device.lock().unwrap_or_else(|e| e.into_inner()).poll();
                wake.sleep(wait.unwrap_or(IDLE).clamp(MIN_SLEEP, IDLE));
            }
        })
}

/// A ticker thread that stops when this handle is dropped.
pub struct Ticker {
    stop: Arc<AtomicBool>,
    wake: TickerWake,
}

impl Ticker {
    /// [`spawn`] with a stop flag of its own, set on drop.
    pub fn start<D: Ticking>(
        name: &str,
        device: Arc<Mutex<D>>,
        wake: TickerWake,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        spawn(name, device, wake.clone(), stop.clone())?;
        Ok(Self { stop, wake })
    }

    /// Make the thread poll again now.
    pub fn wake(&self) {
        self.wake.wake();
    }
}

impl Ticker {
    /// Make the thread end at its next wake-up (which this causes).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.wake.wake();
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    struct Counting {
        polls: u32,
        next: Option<Duration>,
    }

    impl Ticking for Counting {
        fn poll(&mut self) -> Option<Duration> {
            self.polls += 1;
            self.next
        }
    }

    fn polls(device: &Arc<Mutex<Counting>>) -> u32 {
        device.lock().unwrap().polls
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_wake_cuts_an_idle_sleep_short_and_dropping_the_handle_stops_the_thread() {
        let device = Arc::new(Mutex::new(Counting {
            polls: 0,
            next: None,
        }));
        let wake = TickerWake::default();
        let ticker = Ticker::start("test-ticker", device.clone(), wake).unwrap();
        wait_for("the first poll", || polls(&device) >= 1);
        // Idle: the next poll is 100 ms away; a wake brings it forward.
        let before = polls(&device);
        let start = Instant::now();
        ticker.wake();
        wait_for("the woken poll", || polls(&device) > before);
        assert!(start.elapsed() < IDLE, "woken after {:?}", start.elapsed());
        drop(ticker);
        std::thread::sleep(Duration::from_millis(20));
        let stopped_at = polls(&device);
        std::thread::sleep(IDLE * 2);
        assert_eq!(polls(&device), stopped_at, "thread kept polling after drop");
    }

    #[test]
    fn the_thread_sleeps_as_long_as_poll_asks() {
        let device = Arc::new(Mutex::new(Counting {
            polls: 0,
            next: Some(Duration::from_millis(1)),
        }));
        let _ticker = Ticker::start("test-ticker", device.clone(), TickerWake::default()).unwrap();
        let start = Instant::now();
        // 1 ms sleeps: 20 polls take far less than 20 idle sleeps (2 s).
        wait_for("20 polls", || polls(&device) >= 20);
        assert!(start.elapsed() < IDLE * 10, "{:?}", start.elapsed());
    }
}
