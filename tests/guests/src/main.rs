//! The console test guest: a line-based command shell on COM1 running in ring 3.
//! The protocol (commands and exact output) is documented in ../README.md.
#![no_std]
#![no_main]

mod boot;
mod bootinfo;
#[macro_use]
mod console;
mod acpi;
mod ahci;
mod clock;
mod e1000;
mod hpet;
mod nvme;
mod pcicfg;
mod platform;
mod power;
mod regspin;
mod smp;
mod svc;
mod vcon;
mod virtio;
mod virtq;
mod vnet;

use bootinfo::BootInfo;
use core::sync::atomic::{AtomicU64, Ordering};

/// Timer rate unless the command line says `hz=N`.
const DEFAULT_HZ: u64 = 100;
const PIT_INPUT_HZ: u64 = 1_193_182;
const LINE_MAX: usize = 128;

static COUNTER: AtomicU64 = AtomicU64::new(0);
static COUNT: AtomicU64 = AtomicU64::new(0);

struct Shell {
    info: BootInfo,
    hz: u64,
    /// Start of the RAM `memfill` and `memsum` use.
    free_start: u64,
    free_end: u64,
    /// The last line ended with '\r': a '\n' right after it is part of the same line end.
    after_cr: bool,
}

fn ticks() -> u64 {
    boot::TICKS.load(Ordering::Relaxed)
}

fn pic_init() {
    for (port, value) in [
        (0x20, 0x11), // ICW1: edge, cascade, ICW4 follows
        (0xa0, 0x11),
        (0x21, boot::PIC_VECTOR_BASE), // ICW2: vectors
        (0xa1, boot::PIC_VECTOR_BASE + 8),
        (0x21, 0x04), // ICW3: slave on IRQ 2
        (0xa1, 0x02),
        (0x21, 0x01), // ICW4: 8086 mode
        (0xa1, 0x01),
        (0x21, !0x11), // unmask IRQ 0 (timer) and IRQ 4 (COM1)
        (0xa1, 0xff),
    ] {
        svc::outb(port, value);
    }
}

/// Local APIC at its reset address (mapped user accessible, uncached).
const LAPIC_BASE: u64 = 0xfee0_0000;

/// Lets the PIC's interrupts through the local APIC whatever state the loader left it in:
/// software enabled (spurious vector 0xff), LINT0 ExtINT, LINT1 NMI. Ring 3 MMIO.
fn lapic_init() {
    for (reg, value) in [(0xf0, 0x1ffu32), (0x350, 0x700), (0x360, 0x400)] {
        // SAFETY: the LAPIC page is identity mapped, user accessible and uncached; these are
        // architectural registers at their architectural offsets.
        unsafe { ((LAPIC_BASE + reg) as *mut u32).write_volatile(value) };
    }
}

fn pit_init(hz: u64) {
    let divisor = ((PIT_INPUT_HZ + hz / 2) / hz).clamp(1, 65535) as u16;
    svc::outb(0x43, 0x34); // channel 0, lobyte/hibyte, mode 2 (rate generator)
    svc::outb(0x40, divisor as u8);
    svc::outb(0x40, (divisor >> 8) as u8);
}

/// Ring 3 starts here (from `kernel_main`'s iretq), interrupts still off.
#[no_mangle]
pub extern "C" fn user_main() -> ! {
    let info = BootInfo::load();
    if info.option("svc") == Some("ud2") {
        svc::USE_UD2.store(true, Ordering::Relaxed);
    }
    let hz = info
        .option("hz")
        .and_then(parse_u64)
        .filter(|hz| (19..=10_000).contains(hz))
        .unwrap_or(DEFAULT_HZ);
    console::init();
    lapic_init();
    pic_init();
    pit_init(hz);
    svc::enable_interrupts();

    let floor = boot::image_end().next_multiple_of(2 << 20);
    let (free_start, free_end) = info.largest_free(floor).unwrap_or((floor, floor));
    let mut shell = Shell {
        info,
        hz,
        free_start,
        free_end,
        after_cr: false,
    };
    println!(
        "\nbhyve-rs test guest (boot={} svc={} hz={})",
        shell.info.protocol,
        if svc::USE_UD2.load(Ordering::Relaxed) {
            "ud2"
        } else {
            "int80"
        },
        hz
    );
    smp::start(hz);
    println!("bhyve-rs test guest ready");
    let mut line = [0u8; LINE_MAX];
    loop {
        print!("> ");
        let len = shell.read_line(&mut line);
        let text = core::str::from_utf8(&line[..len]).unwrap_or("");
        shell.run(text);
    }
}

impl Shell {
    /// Reads one line, echoing it; backspace and DEL erase. Input beyond `LINE_MAX` is dropped.
    fn read_line(&mut self, line: &mut [u8; LINE_MAX]) -> usize {
        let mut echo = console::Console::new();
        let mut len = 0;
        loop {
            let Some(b) = console::try_read_byte() else {
                echo.flush();
                if !console::input_pending() {
                    smp::idle();
                }
                continue;
            };
            let after_cr = core::mem::replace(&mut self.after_cr, false);
            match b {
                b'\n' if after_cr => {}
                b'\r' | b'\n' => {
                    self.after_cr = b == b'\r';
                    let _ = core::fmt::Write::write_str(&mut echo, "\n");
                    echo.flush();
                    return len;
                }
                0x08 | 0x7f if len > 0 => {
                    len -= 1;
                    let _ = core::fmt::Write::write_str(&mut echo, "\x08 \x08");
                }
                0x20..=0x7e if len < LINE_MAX => {
                    line[len] = b;
                    len += 1;
                    let _ = core::fmt::Write::write_char(&mut echo, char::from(b));
                }
                _ => {}
            }
        }
    }

    fn run(&mut self, line: &str) {
        let mut words = line.split_ascii_whitespace();
        let Some(command) = words.next() else {
            return;
        };
        let arg1 = words.next();
        let arg2 = words.next();
        match command {
            "help" => help(),
            "info" => self.info(),
            "counter" => {
                let n = COUNTER.fetch_add(1, Ordering::Relaxed) + 1;
                println!("counter {n}");
            }
            "count" => self.count(),
            "memfill" => match (arg1.and_then(parse_u64), arg2.and_then(parse_u64)) {
                (Some(mib), Some(seed)) => self.memfill(mib, seed),
                _ => println!("usage: memfill <MiB> <seed>"),
            },
            "memsum" => match arg1.and_then(parse_u64) {
                Some(mib) => self.memsum(mib),
                None => println!("usage: memsum <MiB>"),
            },
            "memchurn" => match arg1.and_then(parse_u64) {
                Some(mib) => self.memchurn(mib),
                None => println!("usage: memchurn <MiB>"),
            },
            "cmos" => cmos(),
            "ticks" => match arg1.and_then(parse_u64) {
                Some(ms) if (1..=600_000).contains(&ms) => self.ticks(ms),
                _ => println!("usage: ticks <ms>  (1..600000)"),
            },
            "cpus" => smp::print_cpus(),
            "regspin" => regspin::run(),
            "work" => smp::work_command(arg1, self.hz),
            "halt" => {
                smp::stop_others();
                println!("halting");
                svc::halt();
            }
            "triple" => {
                println!("triple fault");
                svc::triple_fault();
            }
            _ if platform::run(command, arg1, self.hz) => {}
            _ if virtio::run(command, line) => {}
            _ if vnet::run(command, line) => {}
            _ if e1000::run(command, line) => {}
            _ if vcon::run(command, line) => {}
            _ if nvme::run(command, line) => {}
            _ if ahci::run(command, line) => {}
            _ => println!("unknown command '{command}', try help"),
        }
    }

    fn info(&self) {
        println!("boot {}", self.info.protocol);
        println!("cmdline {}", self.info.cmdline());
        for e in self.info.entries() {
            println!(
                "e820 {:#018x}-{:#018x} {}",
                e.addr,
                e.addr.saturating_add(e.size).saturating_sub(1),
                bootinfo::kind_name(e.kind)
            );
        }
        println!(
            "free {:#x}-{:#x} {} MiB",
            self.free_start,
            self.free_end,
            (self.free_end - self.free_start) >> 20
        );
        println!(
            "timer {} Hz, ticks {}, com1 irqs {}, rx dropped {}",
            self.hz,
            ticks(),
            boot::IRQ_COM1.load(Ordering::Relaxed),
            boot::RX_DROPPED.load(Ordering::Relaxed)
        );
    }

    /// Prints "count N" every 100 ms (timer driven) until a byte arrives; N persists across
    /// runs of the command.
    fn count(&mut self) {
        let interval = (self.hz / 10).max(1);
        let mut next = ticks() + interval;
        loop {
            while ticks() < next {
                if console::input_pending() {
                    if console::try_read_byte() == Some(b'\r') {
                        self.after_cr = true;
                    }
                    println!("count stopped");
                    return;
                }
                svc::wait_for_interrupt();
            }
            let n = COUNT.fetch_add(1, Ordering::Relaxed) + 1;
            println!("count {n}");
            next += interval;
            // After a long stall (e.g. the VM was paused) restart the cadence instead of
            // printing a burst of catch-up lines.
            if ticks() > next + interval {
                next = ticks() + interval;
            }
        }
    }

    fn free_words(&self, mib: u64) -> Option<*mut u64> {
        let available = (self.free_end - self.free_start) >> 20;
        if mib == 0 || mib > available {
            println!("memfill: need {mib} MiB, {available} MiB free");
            return None;
        }
        Some(self.free_start as *mut u64)
    }

    fn memfill(&self, mib: u64, seed: u64) {
        let Some(base) = self.free_words(mib) else {
            return;
        };
        let words = (mib << 20) / 8;
        let mut state = seed;
        for i in 0..words as usize {
            // SAFETY: the range lies in a usable RAM range above our image, inside the identity
            // map, and nothing else uses it.
            unsafe { base.add(i).write_volatile(splitmix64(&mut state)) };
        }
        println!(
            "memfill {mib} MiB seed {seed} fnv {:#018x}",
            fnv1a_words(base, words)
        );
    }

    fn memsum(&self, mib: u64) {
        let Some(base) = self.free_words(mib) else {
            return;
        };
        println!(
            "memsum {mib} MiB fnv {:#018x}",
            fnv1a_words(base, (mib << 20) / 8)
        );
    }

    /// Rewrites the first `mib` MiB of free RAM round after round as fast as it can, until a
    /// byte arrives. Word `i` of round `r` is `churn_word(r, i)`; before overwriting a page in
    /// round `r` >= 2 it checks that the page still holds round `r - 1`, so memory that is not
    /// exactly the memory of one instant (a page older or newer than its neighbours say) is
    /// caught the next time the loop reaches it. Prints `memchurn round <r>` as each round
    /// starts and `memchurn stopped round <r> errors <n>` at the end.
    fn memchurn(&mut self, mib: u64) {
        let Some(base) = self.free_words(mib) else {
            return;
        };
        const PAGE_WORDS: usize = 512;
        let pages = ((mib << 20) / 4096) as usize;
        let mut errors = 0u64;
        let mut round = 1u64;
        loop {
            println!("memchurn round {round}");
            for page in 0..pages {
                let first = page * PAGE_WORDS;
                if round >= 2 {
                    let bad = (first..first + PAGE_WORDS).any(|i| {
                        // SAFETY: inside the free range `free_words` checked.
                        let word = unsafe { base.add(i).read_volatile() };
                        word != churn_word(round - 1, i)
                    });
                    if bad {
                        errors += 1;
                        if errors <= 8 {
                            println!("memchurn error round {round} page {page}");
                        }
                    }
                }
                for i in first..first + PAGE_WORDS {
                    // SAFETY: inside the free range `free_words` checked.
                    unsafe { base.add(i).write_volatile(churn_word(round, i)) };
                }
                if page % 256 == 0 && console::input_pending() {
                    if console::try_read_byte() == Some(b'\r') {
                        self.after_cr = true;
                    }
                    println!("memchurn stopped round {round} errors {errors}");
                    return;
                }
            }
            round += 1;
        }
    }

    /// Waits for a tick edge, prints "ticks start", lets `ms` worth of ticks pass, prints
    /// "ticks done": the host times the two lines against its own clock.
    fn ticks(&self, ms: u64) {
        let target = (ms * self.hz).div_ceil(1000);
        let edge = ticks();
        while ticks() == edge {
            svc::wait_for_interrupt();
        }
        let start = ticks();
        println!("ticks start hz={} ms={ms}", self.hz);
        while ticks() - start < target {
            svc::wait_for_interrupt();
        }
        println!("ticks done {target}");
    }
}

/// What `memchurn` writes to word `index` in round `round`.
fn churn_word(round: u64, index: usize) -> u64 {
    round.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (index as u64)
}

fn help() {
    println!("commands:");
    println!("  help                  this list");
    println!("  info                  boot protocol, command line, memory map, interrupt counts");
    println!("  counter               print the next value of a counter (1, 2, ...)");
    println!("  count                 print 'count N' every 100 ms until a key arrives");
    println!("  memfill <MiB> <seed>  fill free RAM with splitmix64(seed), print FNV-1a-64");
    println!("  memsum <MiB>          FNV-1a-64 of the first <MiB> of free RAM as it is");
    println!("  memchurn <MiB>        rewrite free RAM round after round, checking each page");
    println!("  cmos                  RTC date and time");
    println!("  ticks <ms>            let <ms> of timer ticks pass between two lines");
    platform::help();
    virtio::help();
    vnet::help();
    e1000::help();
    vcon::help();
    nvme::help();
    ahci::help();
    println!("  cpus                  online CPUs: APIC id, package/core/thread from CPUID");
    println!("  work [on|off]         start/stop a counting loop on every CPU, or print counts");
    println!("  regspin               known values in every register, spin until RAX changes");
    println!("  halt                  stop every CPU with interrupts off");
    println!("  triple                triple fault");
}

/// splitmix64 (Steele, Lea, Flood): the fill pattern of `memfill`.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a 64 over 64-bit words (each word folded in whole, not byte by byte).
fn fnv1a_words(base: *const u64, words: u64) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for i in 0..words as usize {
        // SAFETY: same range as `memfill` writes, checked by `free_words`.
        let w = unsafe { base.add(i).read_volatile() };
        hash = (hash ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The words of `line` after the command, at most four (the device commands take no more), and
/// how many there are.
fn arguments(line: &str) -> ([&str; 4], usize) {
    let mut args = [""; 4];
    let mut n = 0;
    for word in line.split_ascii_whitespace().skip(1).take(args.len()) {
        args[n] = word;
        n += 1;
    }
    (args, n)
}

fn parse_u64(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

fn cmos_read(reg: u8) -> u8 {
    svc::outb(0x70, reg);
    svc::inb(0x71)
}

/// Reads the RTC (waiting out update cycles, reading twice until stable) and prints
/// "cmos YYYY-MM-DD HH:MM:SS", honouring BCD/binary and 12/24-hour modes from register B.
fn cmos() {
    let snapshot = || {
        let mut spins = 0;
        while cmos_read(0x0a) & 0x80 != 0 && spins < 10_000 {
            spins += 1;
        }
        [0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32].map(cmos_read)
    };
    let mut regs = snapshot();
    for _ in 0..5 {
        let again = snapshot();
        if again == regs {
            break;
        }
        regs = again;
    }
    let status_b = cmos_read(0x0b);
    let binary = status_b & 0x04 != 0;
    let h24 = status_b & 0x02 != 0;
    let decode = |v: u8| {
        if binary {
            v
        } else {
            (v >> 4) * 10 + (v & 0x0f)
        }
    };
    let [sec, min, hour_raw, day, month, year, century] = regs;
    let pm = !h24 && hour_raw & 0x80 != 0;
    let mut hour = decode(hour_raw & 0x7f);
    if !h24 {
        hour %= 12;
        if pm {
            hour += 12;
        }
    }
    let century = match decode(century) {
        c @ 19..=99 => u32::from(c),
        _ => 20,
    };
    println!(
        "cmos {:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        century * 100 + u32::from(decode(year)),
        decode(month),
        decode(day),
        hour,
        decode(min),
        decode(sec)
    );
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("PANIC: {info}");
    svc::halt();
}
