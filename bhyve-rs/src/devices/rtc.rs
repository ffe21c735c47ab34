//! MC146818 real-time clock and CMOS NVRAM on ports 0x70 (index) and 0x71 (data).
//!
//! On FreeBSD the RTC lives in the kernel (`sys/amd64/vmm/io/vrtc.c`) and bhyve only seeds it
//! (`usr.sbin/bhyve/amd64/rtc.c`, `rtc_init`); this model follows both:
//!
//! * 128 bytes of registers: time and date at 0x00–0x09, registers A–D at 0x0A–0x0D, NVRAM
//!   from 0x0E, the century at 0x32 ([`RTC_CENTURY`]). The index port keeps the low 7 bits of a
//!   write (bit 7, the NMI mask, is ignored as bhyve ignores it) and reads as 0xFF. Only
//!   single-byte accesses are served. The extended bank at 0x72–0x77 is reserved by bhyve but
//!   not emulated, so it is not claimed here either.
//! * Time fields are BCD or binary as register B's DM bit says, 12- or 24-hour as its 24/12 bit
//!   says (bit 7 of the hour marks PM). The clock runs while the divider bits of register A are
//!   `010` and SET (register B bit 7) is clear; the guest sets the time by setting SET, writing
//!   the fields and clearing SET. Invalid fields stop the clock until the guest writes valid
//!   ones, as in vrtc. Register C holds the update-ended, alarm and periodic flags plus IRQF; a
//!   read returns it and clears it. Register D reads VRT (power good).
//! * Interrupts are pulsed on IRQ 8 through [`InterruptSink`]. Time-driven events (periodic,
//!   alarm, update-ended) are produced by [`Rtc::poll`], which a timer thread calls
//!   ([`spawn_ticker`]); reads of the clock also bring the alarm and update flags up to date.
//! * At creation the clock is set from the host: UTC, or local wall-clock time when
//!   `rtc.use_localtime` is true (bhyve's default; `-u` makes it false). The guest's changes
//!   move only the guest's clock, never the host's.
//! * Memory size bytes, as bhyve's `rtc_init` writes them for UEFI, little endian, in 64 KiB
//!   units: 0x34/0x35 = low memory above 16 MiB, 0x5B/0x5C/0x5D = memory above 4 GiB.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;
use crate::config::Config;
use crate::devices::registry::{CreatePlatform, PlatformDevice, PlatformPlan};
use crate::devices::{DeviceError, StateId, Stateful};
use crate::interrupts::InterruptSink;
use crate::memory::GuestMemory;
use crate::vmm::RtcSeed;

/// First port: the index register; the data register follows.
pub const IO_RTC: u16 = 0x70;
/// Number of ports claimed at [`IO_RTC`].
pub const IO_RTC_LEN: u16 = 2;
/// The RTC's ISA IRQ.
pub const RTC_IRQ: u32 = 8;
/// Offset of the century byte (also given to the guest in the FADT).
pub const RTC_CENTURY: u8 = 0x32;
/// CMOS offsets of the memory-size bytes bhyve fills in.
pub const RTC_LMEM_LSB: u8 = 0x34;
pub const RTC_LMEM_MSB: u8 = 0x35;
pub const RTC_HMEM_LSB: u8 = 0x5b;
pub const RTC_HMEM_SB: u8 = 0x5c;
pub const RTC_HMEM_MSB: u8 = 0x5d;

const RTC_SEC: usize = 0x00;
const RTC_ALARM_SEC: usize = 0x01;
const RTC_MIN: usize = 0x02;
const RTC_ALARM_MIN: usize = 0x03;
const RTC_HOUR: usize = 0x04;
const RTC_ALARM_HOUR: usize = 0x05;
const RTC_WDAY: usize = 0x06;
const RTC_DAY: usize = 0x07;
const RTC_MONTH: usize = 0x08;
const RTC_YEAR: usize = 0x09;
const RTC_STATUSA: usize = 0x0a;
const RTC_STATUSB: usize = 0x0b;
const RTC_INTR: usize = 0x0c;
const RTC_STATUSD: usize = 0x0d;
const RTC_NVRAM_START: usize = 0x0e;
const RTC_SIZE: usize = 128;

/// Register A: update in progress (never reported), divider bits.
pub const RTCSA_TUP: u8 = 0x80;
const RTCSA_DIVIDER: u8 = 0x70;
const RTCSA_DIVIDER_RUN: u8 = 0x20;
const RTCSA_RATE: u8 = 0x0f;
/// Register B bits.
pub const RTCSB_HALT: u8 = 0x80;
pub const RTCSB_PINTR: u8 = 0x40;
pub const RTCSB_AINTR: u8 = 0x20;
pub const RTCSB_UINTR: u8 = 0x10;
pub const RTCSB_SQWE: u8 = 0x08;
pub const RTCSB_BIN: u8 = 0x04;
pub const RTCSB_24HR: u8 = 0x02;
const RTCSB_ALL_INTRS: u8 = RTCSB_UINTR | RTCSB_AINTR | RTCSB_PINTR;
/// Register C bits.
pub const RTCIR_UPDATE: u8 = 0x10;
pub const RTCIR_ALARM: u8 = 0x20;
pub const RTCIR_PERIOD: u8 = 0x40;
pub const RTCIR_INT: u8 = 0x80;
/// Register D: valid RAM and time.
pub const RTCSD_PWR: u8 = 0x80;

const MIB_16: u64 = 16 << 20;
const KIB_64: u64 = 64 << 10;
const POSIX_BASE_YEAR: i64 = 1970;
/// Seconds the alarm check walks one by one before jumping straight to the new time.
const ALARM_WALK_LIMIT: i64 = 86_400;

/// Where the RTC gets the host's time.
pub trait RtcClock: Send {
    /// Host wall-clock time in seconds since 1970-01-01 00:00:00 UTC.
    fn unix_time(&self) -> i64;
    /// Monotonic time since a fixed, arbitrary point.
    fn uptime(&self) -> Duration;
}

/// The host's clocks.
#[derive(Debug)]
pub struct HostClock {
    start: Instant,
}

impl HostClock {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
        }
    }
}

impl Default for HostClock {
    fn default() -> Self {
        Self::new()
    }
}

impl RtcClock for HostClock {
    fn unix_time(&self) -> i64 {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        }
    }

    fn uptime(&self) -> Duration {
        self.start.elapsed()
    }
}

/// Offset of the host's local time zone from UTC at `t`, in seconds.
pub fn local_utc_offset(t: i64) -> i64 {
    let time = t as libc::time_t;
    // SAFETY: localtime_r only reads `time` and writes the zero-initialised `tm` we own; it is
    // the thread-safe variant.
    unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&time, &mut tm).is_null() {
            return 0;
        }
        tm.tm_gmtoff as i64
    }
}

/// The time the RTC shows at start-up: `unix_time`, moved to the host's local wall clock when
/// `use_localtime` (bhyve: `timegm(localtime(t))`).
pub fn host_rtc_time(unix_time: i64, use_localtime: bool) -> i64 {
    if use_localtime {
        unix_time + local_utc_offset(unix_time)
    } else {
        unix_time
    }
}

/// `rtc.use_localtime` (default true; `-u` sets it false).
pub fn use_localtime(config: &Config) -> Result<bool, String> {
    Ok(config.get_bool("rtc.use_localtime")?.unwrap_or(true))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RtcError {
    #[error("RTC offset {0:#x} is not writable NVRAM")]
    NvramOffset(usize),
    #[error("RTC time cannot be changed while the guest has halted updates")]
    Halted,
}

/// Everything a snapshot must carry.
#[cfg(feature = "bhyve_snapshot")]
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RtcState {
    /// The 128 register bytes.
    pub registers: Vec<u8>,
    /// Index register.
    pub addr: u8,
    /// Seconds since the epoch the clock showed when saved; `None` while stopped by invalid
    /// fields or the SET bit.
    pub rtc_time: Option<i64>,
}

/// Broken-down calendar time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ClockTime {
    year: i64,
    mon: u32,
    day: u32,
    hour: u32,
    min: u32,
    sec: u32,
    /// 0 = Sunday.
    dow: u32,
}

fn days_from_civil(year: i64, mon: u32, day: u32) -> i64 {
    let y = if mon <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(mon);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let mon = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(mon <= 2);
    (year, mon, day)
}

fn days_in_month(year: i64, mon: u32) -> u32 {
    match mon {
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

fn secs_to_clocktime(t: i64) -> ClockTime {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400) as u32;
    let (year, mon, day) = civil_from_days(days);
    ClockTime {
        year,
        mon,
        day,
        hour: secs / 3600,
        min: secs / 60 % 60,
        sec: secs % 60,
        dow: (days + 4).rem_euclid(7) as u32,
    }
}

fn clocktime_to_secs(ct: &ClockTime) -> Option<i64> {
    if !(1..=12).contains(&ct.mon)
        || ct.day < 1
        || ct.day > days_in_month(ct.year, ct.mon)
        || ct.hour > 23
        || ct.min > 59
        || ct.sec > 59
        || ct.year < POSIX_BASE_YEAR
    {
        return None;
    }
    let days = days_from_civil(ct.year, ct.mon, ct.day);
    Some(days * 86_400 + i64::from(ct.hour * 3600 + ct.min * 60 + ct.sec))
}

fn bin2bcd(v: u32) -> u8 {
    ((v / 10 % 10) << 4 | (v % 10)) as u8
}

/// The MC146818 of a bhyve VM.
pub struct Rtc {
    clock: Box<dyn RtcClock>,
    interrupts: Arc<dyn InterruptSink>,
    regs: [u8; RTC_SIZE],
    addr: u8,
    nmi_masked: bool,
    /// RTC seconds at `base_uptime`; `None` while the clock is stopped by invalid fields.
    base_rtctime: Option<i64>,
    base_uptime: Duration,
    next_periodic: Option<Duration>,
    /// While set, [`Rtc::poll`] leaves registers and the interrupt line alone (snapshots).
    paused: bool,
}

/// rtc_init: the CMOS bytes that give firmware (UEFI) the memory sizes, as `(offset, value)`:
/// low memory above 16 MiB and memory above 4 GiB, in 64 KiB units. bhyve's low memory is at
/// least 16 MiB in practice; a smaller one records zero rather than a wrapped value.
pub fn memory_size_nvram(lowmem: u64, highmem: u64) -> [(u8, u8); 5] {
    let lomem = lowmem.saturating_sub(MIB_16) / KIB_64;
    let himem = highmem / KIB_64;
    [
        (RTC_LMEM_LSB, lomem as u8),
        (RTC_LMEM_MSB, (lomem >> 8) as u8),
        (RTC_HMEM_LSB, himem as u8),
        (RTC_HMEM_SB, (himem >> 8) as u8),
        (RTC_HMEM_MSB, (himem >> 16) as u8),
    ]
}

/// What a kernel-held RTC (FreeBSD's vrtc) is told before the guest runs, as bhyve's rtc_init
/// tells it: the memory sizes in NVRAM and the host's time (local time unless
/// `rtc.use_localtime=false`).
pub fn kernel_seed(config: &Config, memory: &GuestMemory) -> Result<RtcSeed, DeviceError> {
    let use_localtime = use_localtime(config).map_err(DeviceError::Platform)?;
    Ok(RtcSeed {
        nvram: memory_size_nvram(memory.lowmem_end(), memory.highmem_size()).to_vec(),
        time: host_rtc_time(HostClock::new().unix_time(), use_localtime),
    })
}

impl Rtc {
    /// An RTC showing the host's time (local time when `use_localtime`), with `lowmem` bytes of
    /// guest memory below 4 GiB and `highmem` bytes above it recorded in CMOS.
    pub fn new(
        clock: Box<dyn RtcClock>,
        use_localtime: bool,
        lowmem: u64,
        highmem: u64,
        interrupts: Arc<dyn InterruptSink>,
    ) -> Self {
        let mut rtc = Self {
            clock,
            interrupts,
            regs: [0; RTC_SIZE],
            addr: RTC_STATUSD as u8,
            nmi_masked: false,
            base_rtctime: None,
            base_uptime: Duration::ZERO,
            next_periodic: None,
            paused: false,
        };
        // Dividers keep time, everything else off (vrtc_init).
        rtc.regs[RTC_STATUSA] = RTCSA_DIVIDER_RUN;
        rtc.regs[RTC_STATUSB] = RTCSB_24HR;
        rtc.regs[RTC_STATUSD] = RTCSD_PWR;
        // Not halted yet, so this cannot fail.
        rtc.base_rtctime = Some(0);
        rtc.base_uptime = rtc.clock.uptime();
        rtc.secs_to_rtc(0, false);

        for (offset, value) in memory_size_nvram(lowmem, highmem) {
            rtc.regs[usize::from(offset)] = value;
        }

        let t = host_rtc_time(rtc.clock.unix_time(), use_localtime);
        if let Err(e) = rtc.set_time(t) {
            log::warn!("rtc: cannot set the initial time: {e}");
        }
        rtc
    }

    /// Whether the guest last wrote the index port with bit 7 (NMI disable) set. bhyve does
    /// not act on it.
    pub fn nmi_masked(&self) -> bool {
        self.nmi_masked
    }

    /// Current RTC time in seconds since the epoch (as the guest's clock reads it), or `None`
    /// while the guest has stopped it (vrtc_get_time).
    pub fn time(&self) -> Option<i64> {
        self.curtime()
    }

    /// Set the RTC to `secs` since the epoch (vrtc_set_time, `bhyvectl --set-rtc-time`).
    pub fn set_time(&mut self, secs: i64) -> Result<(), RtcError> {
        let now = self.clock.uptime();
        self.time_update(Some(secs), now)
    }

    /// Read CMOS byte `offset` (any of the 128), time fields brought up to date first.
    pub fn nvram_read(&mut self, offset: usize) -> Option<u8> {
        if offset >= RTC_SIZE {
            return None;
        }
        if offset < 10 || offset == RTC_CENTURY as usize {
            if let Some(t) = self.curtime() {
                self.secs_to_rtc(t, false);
            }
        }
        Some(self.regs[offset])
    }

    /// Write CMOS byte `offset`; time, control registers and the century are refused
    /// (vrtc_nvram_write).
    pub fn nvram_write(&mut self, offset: usize, value: u8) -> Result<(), RtcError> {
        if offset < RTC_NVRAM_START || offset == RTC_CENTURY as usize || offset >= RTC_SIZE {
            return Err(RtcError::NvramOffset(offset));
        }
        self.regs[offset] = value;
        Ok(())
    }

    /// Deliver time-driven events that are due: the periodic flag at register A's rate, and
    /// the alarm and update-ended flags once per second. Returns how long until the next
    /// event, or `None` when no interrupt is enabled.
    pub fn poll(&mut self) -> Option<Duration> {
        if self.paused {
            return None;
        }
        let now = self.clock.uptime();
        let mut next: Option<Duration> = None;
        if let Some(period) = self.periodic_period() {
            let due = *self.next_periodic.get_or_insert(now + period);
            if now >= due {
                self.set_reg_c(self.regs[RTC_INTR] | RTCIR_PERIOD);
                // Missed periods collapse into one, as a late callout would.
                let mut following = due + period;
                if following <= now {
                    following = now + period;
                }
                self.next_periodic = Some(following);
            }
            next = self.next_periodic.map(|d| d.saturating_sub(now));
        } else {
            self.next_periodic = None;
        }
        let regb = self.regs[RTC_STATUSB];
        if regb & (RTCSB_AINTR | RTCSB_UINTR) != 0 && self.update_enabled() {
            self.advance();
            let into_second = (now.saturating_sub(self.base_uptime)).as_nanos() as u64;
            let to_next_second = Duration::from_nanos(1_000_000_000 - into_second % 1_000_000_000);
            next = Some(next.map_or(to_next_second, |n| n.min(to_next_second)));
        }
        next
    }

    fn periodic_period(&self) -> Option<Duration> {
        let rate = self.regs[RTC_STATUSA] & RTCSA_RATE;
        if self.regs[RTC_STATUSB] & RTCSB_PINTR == 0 || !self.divider_enabled() || rate == 0 {
            return None;
        }
        // Rates 1 and 2 alias 8 and 9 on the MC146818 (256 Hz and 128 Hz).
        let hz: u64 = match rate {
            1 => 256,
            2 => 128,
            r => 65_536 >> r,
        };
        Some(Duration::from_nanos(1_000_000_000 / hz))
    }

    fn divider_enabled(&self) -> bool {
        self.regs[RTC_STATUSA] & RTCSA_DIVIDER == RTCSA_DIVIDER_RUN
    }

    fn halted(&self) -> bool {
        self.regs[RTC_STATUSB] & RTCSB_HALT != 0
    }

    fn update_enabled(&self) -> bool {
        self.divider_enabled() && !self.halted() && self.base_rtctime.is_some()
    }

    fn elapsed_whole_seconds(&self) -> i64 {
        let now = self.clock.uptime();
        now.saturating_sub(self.base_uptime).as_secs() as i64
    }

    fn curtime(&self) -> Option<i64> {
        let base = self.base_rtctime?;
        if self.update_enabled() {
            // A restored time comes from a file: never let it overflow.
            base.checked_add(self.elapsed_whole_seconds())
        } else {
            Some(base)
        }
    }

    /// Move the base forward by the whole seconds elapsed, keeping the fraction so repeated
    /// reads do not lose time.
    fn advance(&mut self) {
        if !self.update_enabled() {
            return;
        }
        let whole = self.elapsed_whole_seconds();
        if whole > 0 {
            if let Some(base) = self.base_rtctime {
                let uptime = self.base_uptime + Duration::from_secs(whole as u64);
                let _ = self.time_update(base.checked_add(whole), uptime);
            }
        }
    }

    fn rtcset(&self, v: u32) -> u8 {
        if self.regs[RTC_STATUSB] & RTCSB_BIN != 0 {
            v as u8
        } else {
            bin2bcd(v)
        }
    }

    fn rtcget(&self, v: u8) -> Option<u32> {
        if self.regs[RTC_STATUSB] & RTCSB_BIN != 0 {
            return Some(u32::from(v));
        }
        let (upper, lower) = (u32::from(v >> 4), u32::from(v & 0xf));
        (upper <= 9 && lower <= 9).then_some(upper * 10 + lower)
    }

    fn secs_to_rtc(&mut self, t: i64, force: bool) {
        if t < 0 || (self.halted() && !force) {
            return;
        }
        let ct = secs_to_clocktime(t);
        let twenty_four = self.regs[RTC_STATUSB] & RTCSB_24HR != 0;
        let hour = if twenty_four {
            ct.hour
        } else {
            match ct.hour {
                0 | 12 => 12,
                h => h % 12,
            }
        };
        self.regs[RTC_SEC] = self.rtcset(ct.sec);
        self.regs[RTC_MIN] = self.rtcset(ct.min);
        self.regs[RTC_HOUR] = self.rtcset(hour);
        if !twenty_four && ct.hour >= 12 {
            self.regs[RTC_HOUR] |= 0x80;
        }
        self.regs[RTC_WDAY] = self.rtcset(ct.dow + 1);
        self.regs[RTC_DAY] = self.rtcset(ct.day);
        self.regs[RTC_MONTH] = self.rtcset(ct.mon);
        self.regs[RTC_YEAR] = self.rtcset((ct.year % 100) as u32);
        self.regs[RTC_CENTURY as usize] = self.rtcset((ct.year / 100 % 100) as u32);
    }

    /// The time the guest programmed into the fields, or `None` if they are invalid.
    fn rtc_to_secs(&self) -> Option<i64> {
        let sec = self.rtcget(self.regs[RTC_SEC]).filter(|&s| s <= 59)?;
        let min = self.rtcget(self.regs[RTC_MIN]).filter(|&m| m <= 59)?;
        let mut raw_hour = self.regs[RTC_HOUR];
        let twelve = self.regs[RTC_STATUSB] & RTCSB_24HR == 0;
        let mut pm = false;
        if twelve && raw_hour & 0x80 != 0 {
            raw_hour &= !0x80;
            pm = true;
        }
        let mut hour = self.rtcget(raw_hour)?;
        if twelve {
            if !(1..=12).contains(&hour) {
                return None;
            }
            if hour == 12 {
                hour = 0;
            }
            if pm {
                hour += 12;
            }
        }
        if hour > 23 {
            return None;
        }
        let day = self
            .rtcget(self.regs[RTC_DAY])
            .filter(|d| (1..=31).contains(d))?;
        let mon = self
            .rtcget(self.regs[RTC_MONTH])
            .filter(|m| (1..=12).contains(m))?;
        let year = self.rtcget(self.regs[RTC_YEAR]).filter(|&y| y <= 99)?;
        let century = self.rtcget(self.regs[RTC_CENTURY as usize])?;
        let ct = ClockTime {
            year: i64::from(century) * 100 + i64::from(year),
            mon,
            day,
            hour,
            min,
            sec,
            dow: 0,
        };
        clocktime_to_secs(&ct)
    }

    /// vrtc_time_update: move the clock to `newtime` (observed at `uptime`), walking the
    /// seconds in between for the alarm when it is enabled.
    fn time_update(&mut self, newtime: Option<i64>, uptime: Duration) -> Result<(), RtcError> {
        let oldtime = self.base_rtctime;
        if newtime == oldtime {
            return Ok(());
        }
        let Some(newtime) = newtime else {
            self.base_rtctime = None;
            return Ok(());
        };
        if self.halted() {
            return Err(RtcError::Halted);
        }
        let alarm = [
            self.regs[RTC_ALARM_SEC],
            self.regs[RTC_ALARM_MIN],
            self.regs[RTC_ALARM_HOUR],
        ];
        let aintr = self.regs[RTC_STATUSB] & RTCSB_AINTR != 0;
        let mut current = match oldtime {
            Some(old) if aintr && newtime > old && newtime - old <= ALARM_WALK_LIMIT => old,
            _ => newtime - 1,
        };
        while current != newtime {
            current += 1;
            self.base_rtctime = Some(current);
            if aintr {
                self.secs_to_rtc(current, false);
                let matches = |a: u8, v: u8| a >= 0xc0 || a == v;
                if matches(alarm[0], self.regs[RTC_SEC])
                    && matches(alarm[1], self.regs[RTC_MIN])
                    && matches(alarm[2], self.regs[RTC_HOUR])
                {
                    self.set_reg_c(self.regs[RTC_INTR] | RTCIR_ALARM);
                }
            }
        }
        if self.regs[RTC_STATUSB] & RTCSB_UINTR != 0 {
            self.set_reg_c(self.regs[RTC_INTR] | RTCIR_UPDATE);
        }
        self.base_uptime = uptime;
        Ok(())
    }

    fn set_reg_c(&mut self, newval: u8) {
        let newval = newval & (RTCIR_ALARM | RTCIR_PERIOD | RTCIR_UPDATE);
        let regb = self.regs[RTC_STATUSB];
        let old_irqf = self.regs[RTC_INTR] & RTCIR_INT != 0;
        let new_irqf = (regb & RTCSB_AINTR != 0 && newval & RTCIR_ALARM != 0)
            || (regb & RTCSB_PINTR != 0 && newval & RTCIR_PERIOD != 0)
            || (regb & RTCSB_UINTR != 0 && newval & RTCIR_UPDATE != 0);
        self.regs[RTC_INTR] = newval | if new_irqf { RTCIR_INT } else { 0 };
        if !old_irqf && new_irqf {
            self.pulse_irq();
        }
    }

    fn pulse_irq(&self) {
        let result = self
            .interrupts
            .set_irq_line(RTC_IRQ, true)
            .and_then(|()| self.interrupts.set_irq_line(RTC_IRQ, false));
        if let Err(e) = result {
            log::warn!("rtc: cannot pulse IRQ {RTC_IRQ}: {e}");
        }
    }

    fn set_reg_b(&mut self, newval: u8) {
        let oldval = self.regs[RTC_STATUSB];
        self.regs[RTC_STATUSB] = newval;
        let changed = oldval ^ newval;
        if changed & RTCSB_HALT != 0 {
            let rtctime = if newval & RTCSB_HALT == 0 {
                let t = self.rtc_to_secs();
                if t.is_none() {
                    log::warn!("rtc: guest programmed an invalid date/time; clock stopped");
                }
                t
            } else {
                // Freeze the fields at the time right before SET was written.
                if let Some(t) = self.base_rtctime {
                    self.secs_to_rtc(t, true);
                }
                self.regs[RTC_STATUSB] &= !RTCSB_UINTR;
                None
            };
            let now = self.clock.uptime();
            let _ = self.time_update(rtctime, now);
        }
        if changed & RTCSB_ALL_INTRS != 0 {
            self.set_reg_c(self.regs[RTC_INTR]);
        }
        if changed & RTCSB_PINTR != 0 {
            self.next_periodic = None;
        }
    }

    fn set_reg_a(&mut self, newval: u8) {
        let newval = newval & !RTCSA_TUP;
        let was_running = self.divider_enabled();
        self.regs[RTC_STATUSA] = newval;
        if !was_running && self.divider_enabled() {
            // Leaving reset: the time stood still while the dividers were held.
            self.base_uptime = self.clock.uptime();
        }
        self.next_periodic = None;
    }

    fn data_read(&mut self) -> u8 {
        let offset = usize::from(self.addr);
        self.advance();
        let curtime = self.curtime();
        if offset < 10 || offset == RTC_CENTURY as usize {
            if let Some(t) = curtime {
                self.secs_to_rtc(t, false);
            }
        }
        if offset == RTC_INTR {
            let value = self.regs[RTC_INTR];
            self.set_reg_c(0);
            value
        } else {
            self.regs[offset]
        }
    }

    fn data_write(&mut self, value: u8) {
        let offset = usize::from(self.addr);
        self.advance();
        if offset < 10 || offset == RTC_CENTURY as usize {
            if let Some(t) = self.curtime() {
                self.secs_to_rtc(t, false);
            }
        }
        match offset {
            RTC_STATUSA => self.set_reg_a(value),
            RTC_STATUSB => self.set_reg_b(value),
            RTC_INTR | RTC_STATUSD => {}
            // The top bit of the seconds is read only.
            RTC_SEC => self.regs[RTC_SEC] = value & 0x7f,
            _ => self.regs[offset] = value,
        }
        // Some guests (OpenBSD) write the century outside SET: take the new date at once.
        if offset == RTC_CENTURY as usize && !self.halted() {
            let t = self.rtc_to_secs();
            let now = self.clock.uptime();
            let _ = self.time_update(t, now);
        }
    }
}

impl Rtc {
    /// Stop the timer thread from raising flags and interrupts until [`Rtc::resume`]. The clock
    /// itself keeps time; a poll in progress has finished once this returns, since both hold
    /// the device's lock.
    pub fn pause(&mut self) {
        self.paused = true;
    }

    pub fn resume(&mut self) {
        self.paused = false;
    }
}

#[cfg(feature = "bhyve_snapshot")]
impl Rtc {
    pub fn state(&self) -> RtcState {
        RtcState {
            registers: self.regs.to_vec(),
            addr: self.addr,
            rtc_time: self.curtime(),
        }
    }

    /// Move a running clock forward by `by`, to the nearest second.
    pub fn skip_ahead(&mut self, by: Duration) {
        let seconds = (by + Duration::from_millis(500)).as_secs();
        if let (Some(base), Ok(seconds)) = (self.base_rtctime, i64::try_from(seconds)) {
            self.base_rtctime = Some(base.saturating_add(seconds));
        }
    }

    /// Load `state`; the clock continues from the saved time.
    pub fn restore(&mut self, state: &RtcState) {
        let n = state.registers.len().min(RTC_SIZE);
        self.regs[..n].copy_from_slice(&state.registers[..n]);
        self.addr = state.addr & 0x7f;
        self.base_rtctime = state.rtc_time;
        self.base_uptime = self.clock.uptime();
        self.next_periodic = None;
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        data[0] = match base + offset {
            p if p == u64::from(IO_RTC) => 0xff,
            _ => self.data_read(),
        };
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let [value] = data else {
            log::debug!("rtc: ignored {}-byte write", data.len());
            return;
        };
        if base + offset == u64::from(IO_RTC) {
            self.addr = value & 0x7f;
            self.nmi_masked = value & 0x80 != 0;
        } else {
            self.data_write(*value);
        }
    }
}

pub const DEVICE: PlatformDevice = PlatformDevice { name: "rtc", plan };

/// Every VM has one; it lives here unless the backend's kernel holds it (then the machine
/// seeds that one with [`kernel_seed`]). `rtc.use_localtime` must be a truth value.
fn plan(plan: &mut PlatformPlan<'_>) -> Result<Option<CreatePlatform>, DeviceError> {
    let use_localtime = use_localtime(plan.config).map_err(DeviceError::Platform)?;
    if plan.platform.kernel_rtc {
        return Ok(None);
    }
    Ok(Some(Box::new(move |create| {
        let memory = create.memory;
        let mut clock = Rtc::new(
            Box::new(HostClock::new()),
            use_localtime,
            memory.lowmem_end(),
            memory.highmem_size(),
            create.interrupts.clone(),
        );
        // Paused before its timer thread exists: parts come back from their constructor paused.
        clock.pause();
        let rtc = Arc::new(Mutex::new(clock));
        create
            .buses
            .pio
            .insert(u64::from(IO_RTC), u64::from(IO_RTC_LEN), rtc.clone())
            .map_err(|source| DeviceError::Ports {
                device: "rtc",
                base: u64::from(IO_RTC),
                source,
            })?;
        let stop = Arc::new(AtomicBool::new(false));
        spawn_ticker(rtc.clone(), stop.clone()).map_err(|e| {
            DeviceError::Platform(format!("rtc: cannot start its timer thread: {e}"))
        })?;
        Ok(vec![Arc::new(RtcDevice { rtc, stop }) as Arc<dyn Stateful>])
    })))
}

/// The RTC as the VM's device list holds it: the clock and its timer thread's stop flag.
pub struct RtcDevice {
    rtc: Arc<Mutex<Rtc>>,
    stop: Arc<AtomicBool>,
}

impl RtcDevice {
    pub fn rtc(&self) -> &Arc<Mutex<Rtc>> {
        &self.rtc
    }
}

impl Stateful for RtcDevice {
    fn id(&self) -> StateId {
        StateId::single("rtc")
    }

    fn pause(&self) {
        self.rtc.lock().unwrap_or_else(|e| e.into_inner()).pause();
    }

    fn resume(&self) {
        self.rtc.lock().unwrap_or_else(|e| e.into_inner()).resume();
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(feature = "bhyve_snapshot")]
impl crate::devices::Persist for RtcDevice {
    fn state_version(&self) -> u32 {
        1
    }

    fn save(&self) -> Result<Vec<u8>, String> {
        let state = self.rtc.lock().unwrap_or_else(|e| e.into_inner()).state();
        crate::snapshot::encode_section(&state).map_err(|e| e.to_string())
    }

    fn restore(&self, section: &crate::snapshot::Section<'_>) -> Result<(), String> {
        let state: RtcState = section.decode().map_err(|e| e.to_string())?;
        self.rtc
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(&state);
        Ok(())
    }

    fn guest_time_moved(&self, by: Duration) {
        self.rtc
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .skip_ahead(by);
    }
}

impl super::ticker::Ticking for Rtc {
    fn poll(&mut self) -> Option<Duration> {
        Rtc::poll(self)
    }
}

/// Run [`Rtc::poll`] on a thread until `stop` is set, so periodic, alarm and update
/// interrupts arrive without guest accesses.
pub fn spawn_ticker(
    rtc: Arc<Mutex<Rtc>>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    super::ticker::spawn("rtc", rtc, super::ticker::TickerWake::default(), stop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;
    use std::io;
    use std::sync::atomic::Ordering;

    #[derive(Default)]
    struct Pulses(Mutex<Vec<(u32, bool)>>);

    impl InterruptSink for Pulses {
        fn set_irq_line(&self, gsi: u32, high: bool) -> io::Result<()> {
            self.0.lock().unwrap().push((gsi, high));
            Ok(())
        }
        fn signal_msi(&self, _address: u64, _data: u32) -> io::Result<()> {
            Ok(())
        }
        fn set_isa_irq_trigger(&self, _irq: u8, _level: bool) -> io::Result<()> {
            Ok(())
        }
    }

    /// A clock the test moves by hand.
    struct FakeClock(Arc<Mutex<(i64, Duration)>>);

    impl RtcClock for FakeClock {
        fn unix_time(&self) -> i64 {
            self.0.lock().unwrap().0
        }
        fn uptime(&self) -> Duration {
            self.0.lock().unwrap().1
        }
    }

    struct Fixture {
        pio: Bus,
        rtc: Arc<Mutex<Rtc>>,
        pulses: Arc<Pulses>,
    }

    fn with_rtc(rtc: Rtc, pulses: Arc<Pulses>) -> Fixture {
        let rtc = Arc::new(Mutex::new(rtc));
        let pio = Bus::new();
        pio.insert(IO_RTC.into(), IO_RTC_LEN.into(), rtc.clone())
            .unwrap();
        Fixture { pio, rtc, pulses }
    }

    fn host_fixture(use_localtime: bool, lowmem: u64, highmem: u64) -> Fixture {
        let pulses = Arc::new(Pulses::default());
        let rtc = Rtc::new(
            Box::new(HostClock::new()),
            use_localtime,
            lowmem,
            highmem,
            pulses.clone(),
        );
        with_rtc(rtc, pulses)
    }

    fn fake_fixture(start: i64) -> (Fixture, Arc<Mutex<(i64, Duration)>>) {
        let clock = Arc::new(Mutex::new((start, Duration::from_secs(1000))));
        let pulses = Arc::new(Pulses::default());
        let rtc = Rtc::new(
            Box::new(FakeClock(clock.clone())),
            false,
            256 << 20,
            0,
            pulses.clone(),
        );
        (with_rtc(rtc, pulses), clock)
    }

    impl Fixture {
        fn read(&self, reg: u8) -> u8 {
            assert!(self.pio.write(IO_RTC.into(), &[reg]));
            let mut b = [0u8];
            assert!(self.pio.read(u64::from(IO_RTC) + 1, &mut b));
            b[0]
        }
        fn write(&self, reg: u8, value: u8) {
            assert!(self.pio.write(IO_RTC.into(), &[reg]));
            assert!(self.pio.write(u64::from(IO_RTC) + 1, &[value]));
        }
        fn decode(&self, v: u8) -> u32 {
            if self.read(RTC_STATUSB as u8) & RTCSB_BIN != 0 {
                u32::from(v)
            } else {
                u32::from(v >> 4) * 10 + u32::from(v & 0xf)
            }
        }
        /// The guest's view of the clock, as a guest OS would assemble it.
        fn guest_time(&self) -> i64 {
            let regb = self.read(RTC_STATUSB as u8);
            let mut hour_raw = self.read(RTC_HOUR as u8);
            let pm = regb & RTCSB_24HR == 0 && hour_raw & 0x80 != 0;
            hour_raw &= 0x7f;
            let mut hour = self.decode(hour_raw);
            if regb & RTCSB_24HR == 0 {
                hour %= 12;
                if pm {
                    hour += 12;
                }
            }
            let ct = ClockTime {
                year: i64::from(self.decode(self.read(RTC_CENTURY))) * 100
                    + i64::from(self.decode(self.read(RTC_YEAR as u8))),
                mon: self.decode(self.read(RTC_MONTH as u8)),
                day: self.decode(self.read(RTC_DAY as u8)),
                hour,
                min: self.decode(self.read(RTC_MIN as u8)),
                sec: self.decode(self.read(RTC_SEC as u8)),
                dow: 0,
            };
            clocktime_to_secs(&ct).expect("valid time in the registers")
        }
    }

    fn host_now() -> i64 {
        HostClock::new().unix_time()
    }

    #[test]
    fn clock_reads_host_utc_time_in_bcd_and_binary() {
        let f = host_fixture(false, 256 << 20, 0);
        assert!((f.guest_time() - host_now()).abs() <= 2);
        assert_eq!(f.read(RTC_STATUSB as u8) & RTCSB_BIN, 0, "BCD by default");
        f.write(RTC_STATUSB as u8, RTCSB_24HR | RTCSB_BIN);
        assert!((f.guest_time() - host_now()).abs() <= 2);
        f.write(RTC_STATUSB as u8, RTCSB_BIN);
        assert!((f.guest_time() - host_now()).abs() <= 2, "12-hour binary");
        f.write(RTC_STATUSB as u8, 0);
        assert!((f.guest_time() - host_now()).abs() <= 2, "12-hour BCD");
    }

    #[test]
    fn local_time_mode_shows_the_host_wall_clock() {
        let f = host_fixture(true, 256 << 20, 0);
        let now = host_now();
        let expected = now + local_utc_offset(now);
        assert!((f.guest_time() - expected).abs() <= 2);
    }

    #[test]
    fn setting_the_time_moves_the_clock_by_the_set_amount() {
        let f = host_fixture(false, 256 << 20, 0);
        let target = secs_to_clocktime(host_now() + 3 * 3600);
        f.write(RTC_STATUSB as u8, RTCSB_HALT | RTCSB_24HR);
        f.write(RTC_HOUR as u8, bin2bcd(target.hour));
        f.write(RTC_MIN as u8, bin2bcd(target.min));
        f.write(RTC_SEC as u8, bin2bcd(target.sec));
        f.write(RTC_DAY as u8, bin2bcd(target.day));
        f.write(RTC_MONTH as u8, bin2bcd(target.mon));
        f.write(RTC_YEAR as u8, bin2bcd((target.year % 100) as u32));
        f.write(RTC_CENTURY, bin2bcd((target.year / 100) as u32));
        f.write(RTC_STATUSB as u8, RTCSB_24HR);
        let offset = f.guest_time() - host_now();
        assert!((offset - 3 * 3600).abs() <= 2, "offset {offset}");
    }

    #[test]
    fn clock_advances_with_elapsed_time_and_stops_while_set() {
        let (f, clock) = fake_fixture(1_700_000_000);
        assert_eq!(f.guest_time(), 1_700_000_000);
        clock.lock().unwrap().1 += Duration::from_millis(2500);
        assert_eq!(f.guest_time(), 1_700_000_002);
        clock.lock().unwrap().1 += Duration::from_millis(600);
        // The half second left over from before is kept.
        assert_eq!(f.guest_time(), 1_700_000_003);
        f.write(RTC_STATUSB as u8, RTCSB_HALT | RTCSB_24HR);
        clock.lock().unwrap().1 += Duration::from_secs(10);
        assert_eq!(f.guest_time(), 1_700_000_003);
        f.write(RTC_STATUSB as u8, RTCSB_24HR);
        clock.lock().unwrap().1 += Duration::from_secs(1);
        assert_eq!(f.guest_time(), 1_700_000_004);
    }

    #[cfg(feature = "bhyve_snapshot")]
    #[test]
    fn a_clock_skips_ahead_to_the_nearest_second_unless_stopped() {
        let (f, _clock) = fake_fixture(1_700_000_000);
        f.rtc
            .lock()
            .unwrap()
            .skip_ahead(Duration::from_millis(299_600));
        assert_eq!(f.guest_time(), 1_700_000_300);
        f.rtc.lock().unwrap().skip_ahead(Duration::from_millis(400));
        assert_eq!(f.guest_time(), 1_700_000_300);
        // A clock stopped by invalid fields stays stopped.
        f.write(RTC_STATUSB as u8, RTCSB_HALT | RTCSB_24HR);
        f.write(RTC_MONTH as u8, 0x13);
        f.write(RTC_STATUSB as u8, RTCSB_24HR);
        f.rtc.lock().unwrap().skip_ahead(Duration::from_secs(60));
        assert_eq!(f.rtc.lock().unwrap().time(), None);
    }

    #[test]
    fn invalid_fields_stop_the_clock() {
        let (f, clock) = fake_fixture(1_700_000_000);
        f.write(RTC_STATUSB as u8, RTCSB_HALT | RTCSB_24HR);
        f.write(RTC_MONTH as u8, 0x13);
        f.write(RTC_STATUSB as u8, RTCSB_24HR);
        assert_eq!(f.rtc.lock().unwrap().time(), None);
        clock.lock().unwrap().1 += Duration::from_secs(5);
        assert_eq!(f.read(RTC_MONTH as u8), 0x13);
    }

    #[test]
    fn memory_size_bytes_match_bhyve() {
        const G: u64 = 1 << 30;
        // (lowmem, highmem) as bhyve splits 256M, 3G and 5G guests (low memory up to 3 GiB).
        for (low, high, lo_units, hi_units) in [
            (256u64 << 20, 0u64, 0x0f00u64, 0u64),
            (3 * G, 0, 0xbf00, 0),
            (3 * G, 2 * G, 0xbf00, 0x8000),
        ] {
            let f = host_fixture(false, low, high);
            let lo = u64::from(f.read(RTC_LMEM_LSB)) | u64::from(f.read(RTC_LMEM_MSB)) << 8;
            let hi = u64::from(f.read(RTC_HMEM_LSB))
                | u64::from(f.read(RTC_HMEM_SB)) << 8
                | u64::from(f.read(RTC_HMEM_MSB)) << 16;
            assert_eq!(
                (lo, hi),
                (lo_units, hi_units),
                "low {low:#x} high {high:#x}"
            );
        }
    }

    #[test]
    fn nvram_round_trips_through_ports_and_api() {
        let f = host_fixture(false, 256 << 20, 0);
        for (i, reg) in (0x0e..0x80u8).filter(|&r| r != RTC_CENTURY).enumerate() {
            f.write(reg, i as u8 ^ 0x5a);
        }
        for (i, reg) in (0x0e..0x80u8).filter(|&r| r != RTC_CENTURY).enumerate() {
            assert_eq!(f.read(reg), i as u8 ^ 0x5a, "register {reg:#x}");
        }
        let mut rtc = f.rtc.lock().unwrap();
        rtc.nvram_write(0x40, 0x99).unwrap();
        assert_eq!(rtc.nvram_read(0x40), Some(0x99));
        assert_eq!(rtc.nvram_write(0x05, 1), Err(RtcError::NvramOffset(5)));
        assert_eq!(
            rtc.nvram_write(RTC_CENTURY.into(), 1),
            Err(RtcError::NvramOffset(0x32))
        );
        assert_eq!(rtc.nvram_read(128), None);
    }

    #[test]
    fn index_port_masks_nmi_bit_and_reads_all_ones() {
        let f = host_fixture(false, 256 << 20, 0);
        f.write(0x80 | 0x40, 0x77);
        assert_eq!(f.read(0x40), 0x77);
        assert!(!f.rtc.lock().unwrap().nmi_masked());
        assert!(f.pio.write(IO_RTC.into(), &[0x8d]));
        assert!(f.rtc.lock().unwrap().nmi_masked());
        let mut b = [0u8];
        assert!(f.pio.read(IO_RTC.into(), &mut b));
        assert_eq!(b[0], 0xff);
        assert_eq!(f.read(RTC_STATUSD as u8), RTCSD_PWR);
    }

    #[test]
    fn register_c_clears_on_read_and_update_interrupt_pulses_irq8() {
        let (f, clock) = fake_fixture(1_700_000_000);
        f.write(RTC_STATUSB as u8, RTCSB_24HR | RTCSB_UINTR);
        clock.lock().unwrap().1 += Duration::from_secs(1);
        let wait = f.rtc.lock().unwrap().poll();
        assert!(wait.is_some());
        let c = f.read(RTC_INTR as u8);
        assert_eq!(c, RTCIR_INT | RTCIR_UPDATE);
        assert_eq!(f.read(RTC_INTR as u8), 0, "cleared by the first read");
        assert_eq!(
            *f.pulses.0.lock().unwrap(),
            vec![(RTC_IRQ, true), (RTC_IRQ, false)]
        );
    }

    #[test]
    fn periodic_interrupt_follows_the_rate_in_register_a() {
        let (f, clock) = fake_fixture(1_700_000_000);
        // Rate 6: 1024 Hz.
        f.write(RTC_STATUSA as u8, RTCSA_DIVIDER_RUN | 6);
        f.write(RTC_STATUSB as u8, RTCSB_24HR | RTCSB_PINTR);
        assert_eq!(
            f.rtc.lock().unwrap().poll(),
            Some(Duration::from_nanos(976_562))
        );
        assert_eq!(f.read(RTC_INTR as u8), 0);
        clock.lock().unwrap().1 += Duration::from_millis(1);
        f.rtc.lock().unwrap().poll();
        assert_eq!(f.read(RTC_INTR as u8), RTCIR_INT | RTCIR_PERIOD);
        assert_eq!(f.pulses.0.lock().unwrap().len(), 2);
    }

    #[test]
    fn alarm_fires_when_the_time_matches() {
        let (f, clock) = fake_fixture(1_700_000_000);
        f.write(RTC_STATUSB as u8, RTCSB_24HR | RTCSB_BIN);
        let target = secs_to_clocktime(1_700_000_003);
        f.write(RTC_ALARM_SEC as u8, target.sec as u8);
        f.write(RTC_ALARM_MIN as u8, 0xff);
        f.write(RTC_ALARM_HOUR as u8, 0xff);
        f.write(RTC_STATUSB as u8, RTCSB_24HR | RTCSB_BIN | RTCSB_AINTR);
        clock.lock().unwrap().1 += Duration::from_secs(2);
        f.rtc.lock().unwrap().poll();
        assert_eq!(f.read(RTC_INTR as u8), 0);
        clock.lock().unwrap().1 += Duration::from_secs(2);
        f.rtc.lock().unwrap().poll();
        assert_eq!(f.read(RTC_INTR as u8), RTCIR_INT | RTCIR_ALARM);
    }

    #[cfg(feature = "bhyve_snapshot")]
    #[test]
    fn state_round_trip_continues_the_clock() {
        let (f, _clock) = fake_fixture(1_700_000_000);
        f.write(0x20, 0xab);
        let saved = f.rtc.lock().unwrap().state();
        let (g, _) = fake_fixture(1_000_000_000);
        g.rtc.lock().unwrap().restore(&saved);
        assert_eq!(g.read(0x20), 0xab);
        assert_eq!(g.guest_time(), 1_700_000_000);
    }

    #[cfg(feature = "bhyve_snapshot")]
    #[test]
    fn a_forged_saved_time_at_the_edge_of_the_range_does_not_panic() {
        for forged in [i64::MAX, i64::MAX - 1, i64::MIN, -1] {
            let (f, _clock) = fake_fixture(1_700_000_000);
            // The clock runs, so time passes on the forged base.
            f.write(RTC_STATUSA as u8, RTCSA_DIVIDER_RUN | 6);
            f.write(RTC_STATUSB as u8, RTCSB_24HR);
            let mut saved = f.rtc.lock().unwrap().state();
            saved.rtc_time = Some(forged);
            let (g, clock) = fake_fixture(1_700_000_000);
            g.rtc.lock().unwrap().restore(&saved);
            clock.lock().unwrap().1 += Duration::from_secs(5);
            for reg in 0..RTC_SIZE as u8 {
                g.read(reg);
            }
            g.rtc.lock().unwrap().poll();
            let _ = g.rtc.lock().unwrap().state();
        }
    }

    #[test]
    fn localtime_is_the_default_and_u_turns_it_off() {
        let mut config = Config::new();
        assert_eq!(use_localtime(&config), Ok(true));
        config.set("rtc.use_localtime", "false");
        assert_eq!(use_localtime(&config), Ok(false));
        config.set("rtc.use_localtime", "maybe");
        assert!(use_localtime(&config).is_err());
    }

    #[test]
    fn a_paused_rtc_raises_nothing_until_resumed() {
        let (f, clock) = fake_fixture(1_700_000_000);
        f.write(RTC_STATUSA as u8, RTCSA_DIVIDER_RUN | 6);
        f.write(RTC_STATUSB as u8, RTCSB_24HR | RTCSB_PINTR);
        f.rtc.lock().unwrap().poll();
        f.rtc.lock().unwrap().pause();
        clock.lock().unwrap().1 += Duration::from_secs(1);
        assert_eq!(f.rtc.lock().unwrap().poll(), None);
        assert!(f.pulses.0.lock().unwrap().is_empty());
        f.rtc.lock().unwrap().resume();
        assert!(f.rtc.lock().unwrap().poll().is_some());
        assert!(f.pulses.0.lock().unwrap().contains(&(RTC_IRQ, true)));
    }

    #[test]
    fn ticker_thread_delivers_periodic_interrupts() {
        let f = host_fixture(false, 256 << 20, 0);
        f.write(RTC_STATUSA as u8, RTCSA_DIVIDER_RUN | 6);
        f.write(RTC_STATUSB as u8, RTCSB_24HR | RTCSB_PINTR);
        let stop = Arc::new(AtomicBool::new(false));
        let ticker = spawn_ticker(f.rtc.clone(), stop.clone()).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        stop.store(true, Ordering::Relaxed);
        ticker.join().unwrap();
        assert_eq!(f.read(RTC_INTR as u8), RTCIR_INT | RTCIR_PERIOD);
        assert!(f.pulses.0.lock().unwrap().contains(&(RTC_IRQ, true)));
    }

    #[test]
    fn calendar_conversion_round_trips() {
        for t in [
            0i64,
            951_782_400,
            1_700_000_000,
            4_102_444_800,
            4_107_542_399,
        ] {
            let ct = secs_to_clocktime(t);
            assert_eq!(clocktime_to_secs(&ct), Some(t), "{ct:?}");
        }
        let ct = secs_to_clocktime(951_782_400); // 2000-02-29 00:00:00, a Tuesday
        assert_eq!((ct.year, ct.mon, ct.day, ct.dow), (2000, 2, 29, 2));
    }

    #[test]
    fn a_kernel_rtc_is_seeded_with_the_memory_sizes_and_the_host_time() {
        let mut config = Config::new();
        config.set("rtc.use_localtime", "false");
        // rtc_init's units: 64 KiB above 16 MiB below 4 GiB, 64 KiB above 4 GiB.
        let small = kernel_seed(&config, &GuestMemory::new(256 << 20).unwrap()).unwrap();
        assert_eq!(
            small.nvram,
            [(0x34, 0x00), (0x35, 0x0f), (0x5b, 0), (0x5c, 0), (0x5d, 0)]
        );
        let large = kernel_seed(&config, &GuestMemory::new(5 << 30).unwrap()).unwrap();
        assert_eq!(
            large.nvram,
            [
                (0x34, 0x00),
                (0x35, 0xbf),
                (0x5b, 0x00),
                (0x5c, 0x80),
                (0x5d, 0x00)
            ]
        );
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!((small.time - now).abs() <= 2, "{} vs {now}", small.time);
        config.set("rtc.use_localtime", "maybe");
        assert!(kernel_seed(&config, &GuestMemory::new(256 << 20).unwrap()).is_err());
    }
}
