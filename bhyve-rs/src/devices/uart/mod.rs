//! 16550A UART with the behaviour of bhyve's `uart_emul.c`: a receive FIFO of 16 bytes (one byte
//! until the guest enables the FIFO), a transmitter that is always ready, THRE / receive-data /
//! line-status / modem-status interrupts with bhyve's priorities, and loopback.
//!
//! [`Uart`] knows nothing about buses, threads or files: it takes register reads and writes,
//! sends transmitted bytes to a [`UartOutput`], and reports its interrupt condition to an
//! [`IrqLine`]. [`LegacyUart`] puts one on the port-I/O bus at a COM port address, and
//! [`backend`] connects it to stdio, a terminal, a FIFO or a file.

pub mod backend;
pub mod ports;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::bus::BusDevice;
use crate::interrupts::InterruptSink;

/// Register offsets (`dev/ic/ns16550.h`).
pub const REG_DATA: u8 = 0; // RBR on read, THR on write; DLL with DLAB
pub const REG_IER: u8 = 1; // DLH with DLAB
pub const REG_IIR: u8 = 2; // FCR on write
pub const REG_LCR: u8 = 3;
pub const REG_MCR: u8 = 4;
pub const REG_LSR: u8 = 5;
pub const REG_MSR: u8 = 6;
pub const REG_SCR: u8 = 7;

/// Number of port addresses a 16550 decodes.
pub const UART_IO_SIZE: u64 = 8;
/// Depth of the receive FIFO once the guest enables it (bhyve's `FIFOSZ`).
pub const FIFO_SIZE: usize = 16;

pub const IER_ERXRDY: u8 = 0x01;
pub const IER_ETXRDY: u8 = 0x02;
pub const IER_ERLS: u8 = 0x04;
pub const IER_EMSC: u8 = 0x08;

pub const IIR_NOPEND: u8 = 0x01;
pub const IIR_MLSC: u8 = 0x00;
pub const IIR_TXRDY: u8 = 0x02;
pub const IIR_RXTOUT: u8 = 0x0c;
pub const IIR_RLS: u8 = 0x06;
pub const IIR_FIFO_MASK: u8 = 0xc0;

pub const FCR_ENABLE: u8 = 0x01;
pub const FCR_RCV_RST: u8 = 0x02;
pub const FCR_DMA: u8 = 0x08;
const FCR_RX_MASK: u8 = 0xc0;

pub const LCR_DLAB: u8 = 0x80;

pub const MCR_DTR: u8 = 0x01;
pub const MCR_RTS: u8 = 0x02;
pub const MCR_OUT1: u8 = 0x04;
pub const MCR_OUT2: u8 = 0x08;
pub const MCR_LOOPBACK: u8 = 0x10;

pub const LSR_RXRDY: u8 = 0x01;
pub const LSR_OE: u8 = 0x02;
pub const LSR_THRE: u8 = 0x20;
pub const LSR_TEMT: u8 = 0x40;

pub const MSR_DCTS: u8 = 0x01;
pub const MSR_DDSR: u8 = 0x02;
pub const MSR_TERI: u8 = 0x04;
pub const MSR_DDCD: u8 = 0x08;
pub const MSR_CTS: u8 = 0x10;
pub const MSR_DSR: u8 = 0x20;
pub const MSR_RI: u8 = 0x40;
pub const MSR_DCD: u8 = 0x80;
const MSR_DELTA_MASK: u8 = 0x0f;

/// Reset divisor: 1.8432 MHz clock, 9600 baud.
const DEFAULT_DIVISOR: u16 = (1_843_200 / 9600 / 16) as u16;

/// Where transmitted bytes go.
pub trait UartOutput: Send {
    fn write_byte(&mut self, byte: u8);
}

/// How the UART signals its interrupt condition.
pub trait IrqLine: Send {
    /// An interrupt condition exists (called on every register access while it does).
    fn assert(&self);
    /// No interrupt condition exists.
    fn deassert(&self);
}

/// The ISA IRQ of a COM port behind the LPC bridge. bhyve pulses the line on assert and does
/// nothing on deassert, because the LPC COM ports raise edge-triggered interrupts.
pub struct IsaIrq {
    sink: Arc<dyn InterruptSink>,
    irq: u32,
    warned: AtomicBool,
}

impl IsaIrq {
    pub fn new(sink: Arc<dyn InterruptSink>, irq: u32) -> Self {
        Self {
            sink,
            irq,
            warned: AtomicBool::new(false),
        }
    }
}

impl IrqLine for IsaIrq {
    fn assert(&self) {
        let pulse = self
            .sink
            .set_irq_line(self.irq, true)
            .and_then(|()| self.sink.set_irq_line(self.irq, false));
        // Every register access can pulse; say once that it fails, not each time.
        if let Err(e) = pulse {
            if !self.warned.swap(true, Ordering::Relaxed) {
                log::warn!("uart: cannot pulse IRQ {}: {e}", self.irq);
            }
        }
    }

    fn deassert(&self) {}
}

/// Everything a snapshot needs to recreate a UART: all registers and the receive FIFO.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UartState {
    pub ier: u8,
    pub lcr: u8,
    pub mcr: u8,
    pub lsr: u8,
    pub msr: u8,
    pub fcr: u8,
    pub scr: u8,
    pub dll: u8,
    pub dlh: u8,
    pub thre_int_pending: bool,
    /// Capacity of the receive FIFO: 1 before the guest enables the FIFO, 16 after.
    pub rx_fifo_size: u8,
    /// Bytes waiting in the receive FIFO, oldest first.
    pub rx_fifo: Vec<u8>,
}

/// A 16550A register file.
pub struct Uart {
    ier: u8,
    lcr: u8,
    mcr: u8,
    lsr: u8,
    msr: u8,
    fcr: u8,
    scr: u8,
    dll: u8,
    dlh: u8,
    thre_int_pending: bool,
    rx_fifo: VecDeque<u8>,
    rx_fifo_size: usize,
    output: Option<Box<dyn UartOutput>>,
    irq: Box<dyn IrqLine>,
    /// Woken whenever room appears in the receive FIFO, for an input thread holding bytes.
    rx_space: Arc<Condvar>,
    /// While set, line input is held back (snapshots): the FIFO and interrupt do not change.
    input_paused: bool,
}

/// MSR as bhyve computes it from MCR: in loopback the modem outputs feed the inputs; otherwise
/// DCD and DSR are always on so that opening the tty in the guest never blocks.
fn modem_status(mcr: u8) -> u8 {
    if mcr & MCR_LOOPBACK != 0 {
        let mut msr = 0;
        if mcr & MCR_RTS != 0 {
            msr |= MSR_CTS;
        }
        if mcr & MCR_DTR != 0 {
            msr |= MSR_DSR;
        }
        if mcr & MCR_OUT1 != 0 {
            msr |= MSR_RI;
        }
        if mcr & MCR_OUT2 != 0 {
            msr |= MSR_DCD;
        }
        msr
    } else {
        MSR_DCD | MSR_DSR
    }
}

impl Uart {
    /// A UART in its reset state; `output` is `None` when no backend is configured (transmitted
    /// bytes are dropped, as bhyve does).
    pub fn new(output: Option<Box<dyn UartOutput>>, irq: Box<dyn IrqLine>) -> Self {
        Self {
            ier: 0,
            lcr: 0,
            mcr: 0,
            lsr: 0,
            msr: modem_status(0),
            fcr: 0,
            scr: 0,
            dll: DEFAULT_DIVISOR as u8,
            dlh: (DEFAULT_DIVISOR >> 8) as u8,
            thre_int_pending: false,
            rx_fifo: VecDeque::with_capacity(FIFO_SIZE),
            // No FIFO until the guest enables it.
            rx_fifo_size: 1,
            output,
            irq,
            rx_space: Arc::new(Condvar::new()),
            input_paused: false,
        }
    }

    /// Hold back line input until [`Uart::resume_input`]; an input thread keeps its bytes and
    /// waits, as it does when the FIFO is full.
    pub fn pause_input(&mut self) {
        self.input_paused = true;
    }

    pub fn resume_input(&mut self) {
        self.input_paused = false;
        self.rx_space.notify_all();
    }

    /// True while line input may be delivered with [`Uart::receive`].
    pub fn accepts_input(&self) -> bool {
        !self.input_paused && (self.rx_room() || self.loopback())
    }

    /// The condition variable notified when the receive FIFO gains room.
    pub fn rx_space(&self) -> Arc<Condvar> {
        self.rx_space.clone()
    }

    /// True while the receive FIFO can take another byte.
    pub fn rx_room(&self) -> bool {
        self.rx_fifo.len() < self.rx_fifo_size
    }

    /// True in loopback mode, where the line input is disconnected.
    pub fn loopback(&self) -> bool {
        self.mcr & MCR_LOOPBACK != 0
    }

    /// Bytes arriving from the line. Returns how many were taken; the rest did not fit the FIFO
    /// and must be offered again later. In loopback mode input is discarded (all are taken).
    pub fn receive(&mut self, bytes: &[u8]) -> usize {
        if self.input_paused {
            return 0;
        }
        if self.loopback() {
            return bytes.len();
        }
        let mut taken = 0;
        for &byte in bytes {
            if !self.rx_room() {
                break;
            }
            self.rx_fifo.push_back(byte);
            taken += 1;
        }
        self.toggle_intr();
        taken
    }

    fn rx_reset(&mut self, size: usize) {
        self.rx_fifo.clear();
        self.rx_fifo_size = size;
        self.rx_space.notify_all();
    }

    fn rx_pop(&mut self) -> Option<u8> {
        let byte = self.rx_fifo.pop_front()?;
        self.rx_space.notify_all();
        Some(byte)
    }

    /// bhyve's priority order: line status, received data, THRE, modem status.
    fn intr_reason(&self) -> u8 {
        if self.lsr & LSR_OE != 0 && self.ier & IER_ERLS != 0 {
            IIR_RLS
        } else if !self.rx_fifo.is_empty() && self.ier & IER_ERXRDY != 0 {
            IIR_RXTOUT
        } else if self.thre_int_pending && self.ier & IER_ETXRDY != 0 {
            IIR_TXRDY
        } else if self.msr & MSR_DELTA_MASK != 0 && self.ier & IER_EMSC != 0 {
            IIR_MLSC
        } else {
            IIR_NOPEND
        }
    }

    fn toggle_intr(&self) {
        if self.intr_reason() == IIR_NOPEND {
            self.irq.deassert();
        } else {
            self.irq.assert();
        }
    }

    /// A guest write of `value` to register `offset` (0..8).
    pub fn write(&mut self, offset: u8, value: u8) {
        self.write_register(offset, value);
        self.toggle_intr();
    }

    fn write_register(&mut self, offset: u8, value: u8) {
        if self.lcr & LCR_DLAB != 0 {
            match offset {
                REG_DATA => {
                    self.dll = value;
                    return;
                }
                REG_IER => {
                    self.dlh = value;
                    return;
                }
                _ => {}
            }
        }
        match offset {
            REG_DATA => {
                if self.loopback() {
                    if self.rx_room() {
                        self.rx_fifo.push_back(value);
                    } else {
                        self.lsr |= LSR_OE;
                    }
                } else if let Some(output) = self.output.as_mut() {
                    output.write_byte(value);
                }
                self.thre_int_pending = true;
            }
            REG_IER => {
                // THRE is always reported in LSR, so re-enabling its interrupt raises one.
                if self.ier & IER_ETXRDY == 0 && value & IER_ETXRDY != 0 {
                    self.thre_int_pending = true;
                }
                self.ier = value & 0x0f;
            }
            REG_IIR => {
                // FCR: switching between 16450 and FIFO mode empties the FIFO.
                if (self.fcr ^ value) & FCR_ENABLE != 0 {
                    let size = if value & FCR_ENABLE != 0 {
                        FIFO_SIZE
                    } else {
                        1
                    };
                    self.rx_reset(size);
                }
                if value & FCR_ENABLE == 0 {
                    self.fcr = 0;
                } else {
                    if value & FCR_RCV_RST != 0 {
                        self.rx_reset(FIFO_SIZE);
                    }
                    self.fcr = value & (FCR_ENABLE | FCR_DMA | FCR_RX_MASK);
                }
            }
            REG_LCR => self.lcr = value,
            REG_MCR => {
                self.mcr = value & 0x1f;
                let msr = modem_status(self.mcr);
                if (msr ^ self.msr) & MSR_CTS != 0 {
                    self.msr |= MSR_DCTS;
                }
                if (msr ^ self.msr) & MSR_DSR != 0 {
                    self.msr |= MSR_DDSR;
                }
                if (msr ^ self.msr) & MSR_DCD != 0 {
                    self.msr |= MSR_DDCD;
                }
                if self.msr & MSR_RI != 0 && msr & MSR_RI == 0 {
                    self.msr |= MSR_TERI;
                }
                self.msr = (self.msr & MSR_DELTA_MASK) | msr;
            }
            // LSR and MSR are read-only.
            REG_LSR | REG_MSR => {}
            REG_SCR => self.scr = value,
            _ => {}
        }
    }

    /// A guest read of register `offset` (0..8).
    pub fn read(&mut self, offset: u8) -> u8 {
        let value = self.read_register(offset);
        self.toggle_intr();
        value
    }

    fn read_register(&mut self, offset: u8) -> u8 {
        if self.lcr & LCR_DLAB != 0 {
            match offset {
                REG_DATA => return self.dll,
                REG_IER => return self.dlh,
                _ => {}
            }
        }
        match offset {
            // bhyve returns the -1 of an empty FIFO truncated to a byte.
            REG_DATA => self.rx_pop().unwrap_or(0xff),
            REG_IER => self.ier,
            REG_IIR => {
                let fifo = if self.fcr & FCR_ENABLE != 0 {
                    IIR_FIFO_MASK
                } else {
                    0
                };
                let reason = self.intr_reason();
                // Reading IIR acknowledges a THRE interrupt.
                if reason == IIR_TXRDY {
                    self.thre_int_pending = false;
                }
                fifo | reason
            }
            REG_LCR => self.lcr,
            REG_MCR => self.mcr,
            REG_LSR => {
                // The transmitter is always ready.
                self.lsr |= LSR_TEMT | LSR_THRE;
                if self.rx_fifo.is_empty() {
                    self.lsr &= !LSR_RXRDY;
                } else {
                    self.lsr |= LSR_RXRDY;
                }
                let value = self.lsr;
                // Overrun is cleared by reading LSR.
                self.lsr &= !LSR_OE;
                value
            }
            REG_MSR => {
                // Delta bits are cleared by reading MSR.
                let value = self.msr;
                self.msr &= !MSR_DELTA_MASK;
                value
            }
            REG_SCR => self.scr,
            _ => 0xff,
        }
    }

    /// All guest-visible state.
    pub fn state(&self) -> UartState {
        UartState {
            ier: self.ier,
            lcr: self.lcr,
            mcr: self.mcr,
            lsr: self.lsr,
            msr: self.msr,
            fcr: self.fcr,
            scr: self.scr,
            dll: self.dll,
            dlh: self.dlh,
            thre_int_pending: self.thre_int_pending,
            rx_fifo_size: self.rx_fifo_size as u8,
            rx_fifo: self.rx_fifo.iter().copied().collect(),
        }
    }

    /// Load state saved by [`Uart::state`]; refuses a FIFO that does not fit its own size.
    pub fn set_state(&mut self, state: &UartState) -> Result<(), String> {
        let size = state.rx_fifo_size as usize;
        if size != 1 && size != FIFO_SIZE {
            return Err(format!("invalid receive FIFO size {size}"));
        }
        if state.rx_fifo.len() > size {
            return Err(format!(
                "receive FIFO holds {} bytes but its size is {size}",
                state.rx_fifo.len()
            ));
        }
        self.ier = state.ier & 0x0f;
        self.lcr = state.lcr;
        self.mcr = state.mcr & 0x1f;
        self.lsr = state.lsr;
        self.msr = state.msr;
        self.fcr = state.fcr;
        self.scr = state.scr;
        self.dll = state.dll;
        self.dlh = state.dlh;
        self.thre_int_pending = state.thre_int_pending;
        self.rx_fifo_size = size;
        // Input that reached this UART while the VM was being rebuilt came after the moment
        // the state was saved: queue it behind the saved bytes instead of dropping it.
        let arrived: Vec<u8> = self.rx_fifo.drain(..).collect();
        self.rx_fifo = state.rx_fifo.iter().copied().collect();
        self.receive(&arrived);
        self.rx_space.notify_all();
        Ok(())
    }
}

/// Legacy COM port resources: (name, I/O base, ISA IRQ), in bhyve's order.
pub const LEGACY_PORTS: [(&str, u16, u32); 4] = [
    ("com1", 0x3f8, 4),
    ("com2", 0x2f8, 3),
    ("com3", 0x3e8, 4),
    ("com4", 0x2e8, 3),
];

/// A UART on the port-I/O bus at a legacy COM address.
pub struct LegacyUart {
    pub uart: Uart,
}

impl BusDevice for LegacyUart {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        // bhyve's LPC handler splits 16-bit accesses into two byte accesses and rejects wider
        // ones; a rejected read floats high.
        match data.len() {
            1 | 2 => {
                for (i, byte) in data.iter_mut().enumerate() {
                    *byte = self.uart.read((offset as u8).wrapping_add(i as u8));
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if matches!(data.len(), 1 | 2) {
            for (i, &byte) in data.iter().enumerate() {
                self.uart.write((offset as u8).wrapping_add(i as u8), byte);
            }
        }
    }
}

/// A UART shared between the bus (vCPU threads) and its input thread.
pub type SharedUart = Arc<Mutex<LegacyUart>>;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Records transmitted bytes.
    #[derive(Clone, Default)]
    pub struct Capture(pub Arc<Mutex<Vec<u8>>>);
    impl UartOutput for Capture {
        fn write_byte(&mut self, byte: u8) {
            self.0.lock().unwrap().push(byte);
        }
    }

    /// Counts asserts; remembers whether the last call was an assert.
    #[derive(Clone, Default)]
    pub struct Line {
        pub asserts: Arc<AtomicUsize>,
        pub high: Arc<Mutex<bool>>,
    }
    impl IrqLine for Line {
        fn assert(&self) {
            self.asserts.fetch_add(1, Ordering::SeqCst);
            *self.high.lock().unwrap() = true;
        }
        fn deassert(&self) {
            *self.high.lock().unwrap() = false;
        }
    }

    fn uart() -> (Uart, Capture, Line) {
        let out = Capture::default();
        let line = Line::default();
        let uart = Uart::new(Some(Box::new(out.clone())), Box::new(line.clone()));
        (uart, out, line)
    }

    #[test]
    fn input_received_before_a_restore_is_kept_behind_the_saved_fifo() {
        let (mut saved, _, _) = uart();
        saved.write(REG_IIR, FCR_ENABLE);
        saved.receive(b"ab");
        let state = saved.state();
        let (mut restored, _, _) = uart();
        restored.receive(b"c");
        restored.set_state(&state).unwrap();
        let mut read = Vec::new();
        while restored.read(REG_LSR) & LSR_RXRDY != 0 {
            read.push(restored.read(REG_DATA));
        }
        assert_eq!(read, b"abc");
    }

    #[test]
    fn transmitted_bytes_reach_the_backend() {
        let (mut uart, out, _) = uart();
        for b in b"hi\n" {
            uart.write(REG_DATA, *b);
        }
        assert_eq!(*out.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn received_byte_raises_the_interrupt_and_iir_reports_it() {
        let (mut uart, _, line) = uart();
        uart.write(REG_IER, IER_ERXRDY);
        assert!(!*line.high.lock().unwrap());
        assert_eq!(uart.read(REG_IIR), IIR_NOPEND);
        assert_eq!(uart.receive(b"x"), 1);
        assert!(*line.high.lock().unwrap());
        assert_eq!(uart.read(REG_IIR), IIR_RXTOUT);
        assert_eq!(uart.read(REG_LSR) & LSR_RXRDY, LSR_RXRDY);
        assert_eq!(uart.read(REG_DATA), b'x');
        assert!(!*line.high.lock().unwrap());
        assert_eq!(uart.read(REG_LSR) & LSR_RXRDY, 0);
        assert_eq!(uart.read(REG_IIR), IIR_NOPEND);
    }

    #[test]
    fn thre_interrupt_fires_on_enable_and_is_acknowledged_by_reading_iir() {
        let (mut uart, _, line) = uart();
        uart.write(REG_IER, IER_ETXRDY);
        assert!(*line.high.lock().unwrap());
        assert_eq!(uart.read(REG_IIR), IIR_TXRDY);
        assert!(!*line.high.lock().unwrap());
        assert_eq!(uart.read(REG_IIR), IIR_NOPEND);
        uart.write(REG_DATA, b'a');
        assert_eq!(uart.read(REG_IIR), IIR_TXRDY);
    }

    #[test]
    fn lsr_reports_an_idle_transmitter() {
        let (mut uart, _, _) = uart();
        assert_eq!(uart.read(REG_LSR), LSR_TEMT | LSR_THRE);
    }

    #[test]
    fn divisor_latch_is_reached_through_dlab_and_resets_to_9600_baud() {
        let (mut uart, _, _) = uart();
        uart.write(REG_LCR, LCR_DLAB | 0x03);
        assert_eq!(uart.read(REG_DATA), 12);
        assert_eq!(uart.read(REG_IER), 0);
        uart.write(REG_DATA, 0x01);
        uart.write(REG_IER, 0x02);
        assert_eq!(uart.read(REG_DATA), 0x01);
        assert_eq!(uart.read(REG_IER), 0x02);
        uart.write(REG_LCR, 0x03);
        // Without DLAB the same offsets are the data and interrupt-enable registers again.
        assert_eq!(uart.read(REG_IER), 0);
        assert_eq!(uart.read(REG_LCR), 0x03);
        let state = uart.state();
        assert_eq!((state.dll, state.dlh), (0x01, 0x02));
    }

    #[test]
    fn fifo_holds_one_byte_until_enabled_then_sixteen() {
        let (mut uart, _, _) = uart();
        assert_eq!(uart.receive(b"ab"), 1);
        uart.write(REG_IIR, FCR_ENABLE);
        assert_eq!(uart.read(REG_IIR) & IIR_FIFO_MASK, IIR_FIFO_MASK);
        // Enabling the FIFO emptied it.
        assert_eq!(uart.read(REG_LSR) & LSR_RXRDY, 0);
        let data: Vec<u8> = (0..20).collect();
        assert_eq!(uart.receive(&data), FIFO_SIZE);
        assert!(!uart.rx_room());
        let got: Vec<u8> = (0..FIFO_SIZE).map(|_| uart.read(REG_DATA)).collect();
        assert_eq!(got, data[..FIFO_SIZE]);
        assert!(uart.rx_room());
        uart.receive(b"z");
        uart.write(REG_IIR, FCR_ENABLE | FCR_RCV_RST);
        assert_eq!(uart.read(REG_LSR) & LSR_RXRDY, 0);
    }

    #[test]
    fn scratch_register_keeps_its_value() {
        let (mut uart, _, _) = uart();
        uart.write(REG_SCR, 0x5a);
        assert_eq!(uart.read(REG_SCR), 0x5a);
    }

    #[test]
    fn loopback_returns_transmitted_bytes_and_mirrors_modem_lines() {
        let (mut uart, out, _) = uart();
        assert_eq!(uart.read(REG_MSR), MSR_DCD | MSR_DSR);
        uart.write(REG_MCR, MCR_LOOPBACK | MCR_RTS | MCR_OUT2);
        let msr = uart.read(REG_MSR);
        assert_eq!(msr & (MSR_CTS | MSR_DCD | MSR_DSR), MSR_CTS | MSR_DCD);
        // CTS rose and DSR fell: their delta bits are set once, then cleared by the read.
        assert_eq!(msr & (MSR_DCTS | MSR_DDSR), MSR_DCTS | MSR_DDSR);
        assert_eq!(uart.read(REG_MSR) & MSR_DELTA_MASK, 0);
        uart.write(REG_DATA, b'q');
        assert!(out.0.lock().unwrap().is_empty());
        assert_eq!(uart.read(REG_DATA), b'q');
        // Line input is ignored while looping back.
        assert_eq!(uart.receive(b"x"), 1);
        assert_eq!(uart.read(REG_LSR) & LSR_RXRDY, 0);
        // A second byte into the one-byte FIFO overruns.
        uart.write(REG_DATA, b'1');
        uart.write(REG_DATA, b'2');
        assert_eq!(uart.read(REG_LSR) & LSR_OE, LSR_OE);
        assert_eq!(uart.read(REG_LSR) & LSR_OE, 0);
    }

    #[test]
    fn state_round_trips_and_bad_state_is_refused() {
        let (mut uart, _, _) = uart();
        uart.write(REG_IIR, FCR_ENABLE);
        uart.receive(b"abc");
        uart.write(REG_SCR, 7);
        let state = uart.state();
        let (mut other, _, _) = self::uart();
        other.set_state(&state).unwrap();
        assert_eq!(other.state(), state);
        assert_eq!(other.read(REG_DATA), b'a');
        let mut bad = state.clone();
        bad.rx_fifo_size = 1;
        assert!(other.set_state(&bad).is_err());
    }

    #[test]
    fn legacy_port_splits_word_accesses_and_rejects_wider_ones() {
        let (uart, _, _) = uart();
        let mut port = LegacyUart { uart };
        port.write(0x3f8, 6, &[0x00, 0x42]); // MSR ignored, SCR = 0x42
        let mut word = [0u8; 2];
        port.read(0x3f8, 6, &mut word);
        assert_eq!(word[1], 0x42);
        let mut dword = [0u8; 4];
        port.read(0x3f8, 4, &mut dword);
        assert_eq!(dword, [0xff; 4]);
    }
}
