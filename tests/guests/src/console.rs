//! COM1 console: 115200 8N1, polled output through the `Write` service, input filled into a ring
//! by the IRQ 4 handler (and by `RxPoll` before sleeping, so a missed interrupt only costs a
//! timer tick of latency). Output lines end in "\r\n".

use crate::boot::{RX_BUF, RX_HEAD, RX_TAIL};
use crate::svc;
use core::arch::asm;
use core::fmt;
use core::sync::atomic::Ordering;

pub const COM1: u16 = 0x3f8;

/// Programs COM1: 115200 baud, 8N1, FIFO with a one-byte trigger, receive interrupt on.
pub fn init() {
    svc::outb(COM1 + 1, 0x00); // IER: nothing while programming
    svc::outb(COM1 + 3, 0x80); // LCR: DLAB
    svc::outb(COM1, 0x01); // DLL: 115200
    svc::outb(COM1 + 1, 0x00); // DLM
    svc::outb(COM1 + 3, 0x03); // LCR: 8N1
    svc::outb(COM1 + 2, 0x07); // FCR: FIFO on, both cleared, trigger at 1 byte
    svc::outb(COM1 + 4, 0x0b); // MCR: DTR, RTS, OUT2 (gates the IRQ line)
    svc::outb(COM1 + 1, 0x01); // IER: received data available
    let _ = svc::inb(COM1 + 5); // LSR
    let _ = svc::inb(COM1 + 2); // IIR
}

/// Formats into a small buffer and hands it to the `Write` service in chunks, turning "\n"
/// into "\r\n".
pub struct Console {
    buf: [u8; 128],
    len: usize,
}

impl Console {
    pub const fn new() -> Self {
        Console {
            buf: [0; 128],
            len: 0,
        }
    }

    fn push(&mut self, byte: u8) {
        if self.len == self.buf.len() {
            self.flush();
        }
        self.buf[self.len] = byte;
        self.len += 1;
    }

    pub fn flush(&mut self) {
        svc::write(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if b == b'\n' {
                self.push(b'\r');
            }
            self.push(b);
        }
        Ok(())
    }
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        let mut console = $crate::console::Console::new();
        let _ = core::fmt::Write::write_fmt(&mut console, format_args!($($arg)*));
        console.flush();
    }};
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        let mut console = $crate::console::Console::new();
        let _ = core::fmt::Write::write_fmt(&mut console, format_args!($($arg)*));
        let _ = core::fmt::Write::write_str(&mut console, "\n");
        console.flush();
    }};
}

/// Next received byte, if one is waiting in the ring.
pub fn try_read_byte() -> Option<u8> {
    let tail = RX_TAIL.load(Ordering::Relaxed);
    if RX_HEAD.load(Ordering::Acquire) == tail {
        return None;
    }
    let byte = RX_BUF[(tail % 256) as usize].load(Ordering::Relaxed);
    RX_TAIL.store(tail.wrapping_add(1), Ordering::Release);
    Some(byte)
}

/// Whether input is waiting (checks the UART too, so it works without the IRQ).
pub fn input_pending() -> bool {
    if RX_HEAD.load(Ordering::Acquire) != RX_TAIL.load(Ordering::Relaxed) {
        return true;
    }
    svc::rx_poll();
    RX_HEAD.load(Ordering::Acquire) != RX_TAIL.load(Ordering::Relaxed)
}

/// Direct COM1 output for ring 0 (fault reports); no service call.
pub struct RawWriter;

impl fmt::Write for RawWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            let mut spins = 100_000u32;
            loop {
                let lsr: u8;
                // SAFETY: ring-0 port read of the UART line status register.
                unsafe {
                    asm!("in al, dx", in("dx") COM1 + 5, out("al") lsr, options(nomem, nostack))
                };
                spins -= 1;
                if lsr & 0x20 != 0 || spins == 0 {
                    break;
                }
            }
            // SAFETY: ring-0 port write of the UART transmit register.
            unsafe { asm!("out dx, al", in("dx") COM1, in("al") b, options(nomem, nostack)) };
        }
        Ok(())
    }
}
