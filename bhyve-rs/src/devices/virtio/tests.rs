//! The transport and ring against a driver written here from the legacy virtio specification:
//! the registers, feature negotiation, a request round trip with INTx, MSI and MSI-X, the
//! checks on malformed chains, reset, and the saved state.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_INDIRECT_DESC, VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};

use super::pci::{VirtioPci, IO_BAR, MSIX_BAR};
use super::*;
use crate::bus::Buses;
use crate::devices::pci::irq::{IntxState, PirqRouter};
use crate::devices::pci::{
    ConfigSpace, PciAddress, PciRoot, PciRootBuilder, PCIR_BAR0, PCIR_CAP_PTR, PCIR_COMMAND,
    PCIR_DEVICE, PCIR_SUBDEV_0, PCIR_VENDOR, PCIY_MSI, PCIY_MSIX,
};
use crate::devices::registry::PciCreate;
use crate::devices::tests::Recorder;
use crate::interrupts::InterruptSink;
use crate::memory::GuestMemory;

const QUEUE_SIZE: u16 = 8;
const CONFIG: [u8; 6] = [0x11, 0x22, 0x33, 0x44, 0x55, 0x66];

/// Copies each request's readable bytes, reversed, into its writable buffers.
struct Reverser {
    queues: Vec<Arc<VirtQueue>>,
    resets: Arc<Mutex<u32>>,
    statuses: Arc<Mutex<Vec<u8>>>,
}

impl VirtioDevice for Reverser {
    fn name(&self) -> &'static str {
        "reverser"
    }
    fn identity(&self) -> VirtioIdentity {
        VirtioIdentity {
            pci_device_id: VIRTIO_DEV_RANDOM,
            device_type: 4,
            class: 0x10,
            subclass: 0x80,
        }
    }
    fn queue_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn host_features(&self) -> u64 {
        1 | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    }
    fn config_size(&self) -> usize {
        CONFIG.len()
    }
    fn read_config(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = CONFIG.get(offset + i).copied().unwrap_or(0);
        }
    }
    fn attach(&mut self, queues: &[Arc<VirtQueue>], _shared: &Arc<VirtioShared>) {
        self.queues = queues.to_vec();
    }
    fn queue_notify(&mut self, queue: usize) {
        let queue = &self.queues[queue];
        while let Some(chain) = queue.pop() {
            let mut data = vec![0u8; chain.readable_len() as usize];
            chain.read(queue.memory(), 0, &mut data).unwrap();
            data.reverse();
            data.truncate(chain.writable_len() as usize);
            chain.write(queue.memory(), 0, &data).unwrap();
            queue.add_used(chain.head, data.len() as u32);
        }
        queue.end_chains(true);
    }
    fn reset(&mut self) {
        *self.resets.lock().unwrap() += 1;
    }
    fn status_changed(&mut self, status: u8) {
        self.statuses.lock().unwrap().push(status);
    }
    fn save_state(&self) -> Option<Vec<u8>> {
        Some(vec![7])
    }
    fn restore_state(&mut self, state: &[u8]) -> Result<(), String> {
        (state == [7])
            .then_some(())
            .ok_or_else(|| "bad".to_string())
    }
}

pub(super) const SLOT: PciAddress = PciAddress {
    bus: 0,
    slot: 4,
    function: 0,
};
/// Where the test driver puts its ring, its indirect tables and its buffers.
pub(super) const RING: u64 = 0x10000;
const TABLE: u64 = 0x20000;
pub(super) const DATA: u64 = 0x30000;

/// One virtio function on a PCI bus, with 1 MiB of RAM, and a driver for its queue 0.
pub(super) struct Machine {
    pub(super) buses: Arc<Buses>,
    pub(super) root: Arc<PciRoot>,
    pub(super) memory: Arc<GuestMemory>,
    sink: Arc<Recorder>,
    resets: Arc<Mutex<u32>>,
    statuses: Arc<Mutex<Vec<u8>>>,
    io: u64,
    queue_size: u16,
    next_avail: u16,
}

impl Machine {
    fn new(msix: bool) -> Self {
        let resets = Arc::new(Mutex::new(0));
        let statuses = Arc::new(Mutex::new(Vec::new()));
        let device = Reverser {
            queues: Vec::new(),
            resets: resets.clone(),
            statuses: statuses.clone(),
        };
        let mut m = Self::with_device(Box::new(device), msix);
        m.resets = resets;
        m.statuses = statuses;
        m
    }

    fn with_device(device: Box<dyn VirtioDevice>, msix: bool) -> Self {
        Self::with_device_factory(Box::new(|_| device), msix)
    }

    /// The device `make` returns for the machine's memory, behind the transport.
    pub(super) fn with_device_factory(
        make: Box<dyn FnOnce(Arc<GuestMemory>) -> Box<dyn VirtioDevice>>,
        msix: bool,
    ) -> Self {
        let memory = Arc::new(GuestMemory::new(1 << 20).unwrap());
        let device = make(memory.clone());
        let queue_size = device.queue_sizes()[0];
        let sink = Arc::new(Recorder::default());
        let sink_dyn: Arc<dyn InterruptSink> = sink.clone();
        let router = Arc::new(PirqRouter::new(sink_dyn.clone(), false));
        let resets = Arc::new(Mutex::new(0));
        let mut config = ConfigSpace::new(true);
        let device = VirtioPci::new(
            device,
            PciCreate {
                slot: SLOT,
                config_space: &mut config,
                interrupts: &sink_dyn,
                router: &router,
                memory: &memory,
            },
            msix,
        )
        .unwrap();
        let buses = Arc::new(Buses::default());
        let mut builder = PciRootBuilder::new(1 << 32);
        builder.set_intx_router(router);
        builder
            .add(SLOT, "reverser", config, Box::new(device))
            .unwrap();
        let root = builder.build(&buses).unwrap();
        let io = u64::from(root.config_read(SLOT, PCIR_BAR0 + 4 * IO_BAR, 4) & !3);
        Self {
            buses,
            root,
            memory,
            sink,
            resets,
            statuses: Arc::new(Mutex::new(Vec::new())),
            io,
            queue_size,
            next_avail: 0,
        }
    }

    pub(super) fn read(&self, offset: u64, size: usize) -> u32 {
        let mut data = [0u8; 4];
        self.buses.pio.read(self.io + offset, &mut data[..size]);
        u32::from_le_bytes(data)
    }

    pub(super) fn write(&self, offset: u64, size: usize, value: u32) {
        self.buses
            .pio
            .write(self.io + offset, &value.to_le_bytes()[..size]);
    }

    fn capability(&self, id: u8) -> Option<usize> {
        let mut cap = self.root.config_read(SLOT, PCIR_CAP_PTR, 1) as usize;
        while cap != 0 {
            if self.root.config_read(SLOT, cap, 1) as u8 == id {
                return Some(cap);
            }
            cap = self.root.config_read(SLOT, cap + 1, 1) as usize;
        }
        None
    }

    fn enable_msix(&self) {
        let cap = self.capability(PCIY_MSIX).unwrap();
        let command = self.root.config_read(SLOT, PCIR_COMMAND, 2);
        self.root.config_write(SLOT, PCIR_COMMAND, 2, command | 2);
        self.root.config_write(SLOT, cap + 2, 2, 0x8000);
    }

    fn intx(&self) -> IntxState {
        let function = self.root.function(SLOT).unwrap().lock().unwrap();
        function.config().intx().unwrap().state()
    }

    /// Reset, acknowledge, negotiate `features`, place queue 0 at [`RING`], driver OK.
    pub(super) fn setup(&mut self, features: u32) {
        self.write(VIRTIO_PCI_STATUS, 1, 0);
        self.write(VIRTIO_PCI_STATUS, 1, 1 | 2);
        self.write(VIRTIO_PCI_GUEST_FEATURES, 4, features);
        self.write(VIRTIO_PCI_QUEUE_SEL, 2, 0);
        assert_eq!(
            self.read(VIRTIO_PCI_QUEUE_NUM, 2),
            u32::from(self.queue_size)
        );
        self.write(VIRTIO_PCI_QUEUE_PFN, 4, (RING >> 12) as u32);
        self.write(VIRTIO_PCI_STATUS, 1, 1 | 2 | 4);
        self.next_avail = 0;
    }

    pub(super) fn descriptor(&self, at: u64, addr: u64, len: u32, flags: u32, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&(flags as u16).to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.memory.write(at, &raw).unwrap();
    }

    fn avail(&self) -> u64 {
        RING + 16 * u64::from(self.queue_size)
    }

    fn used(&self) -> u64 {
        (self.avail() + 2 * (3 + u64::from(self.queue_size))).next_multiple_of(4096)
    }

    /// Make the chain at descriptor `head` available and notify.
    pub(super) fn submit(&mut self, head: u16) {
        self.submit_many(&[head]);
    }

    /// Make the chains at `heads` available at once, then notify.
    pub(super) fn submit_many(&mut self, heads: &[u16]) {
        for &head in heads {
            let slot = u64::from(self.next_avail % self.queue_size);
            self.memory
                .store_u16(self.avail() + 4 + 2 * slot, head)
                .unwrap();
            self.next_avail = self.next_avail.wrapping_add(1);
        }
        self.memory
            .store_u16(self.avail() + 2, self.next_avail)
            .unwrap();
        self.write(VIRTIO_PCI_QUEUE_NOTIFY, 2, 0);
    }

    pub(super) fn used_idx(&self) -> u16 {
        self.memory.load_u16(self.used() + 2).unwrap()
    }

    /// Wait (up to 10 s) for the used index to reach `n`, for devices that complete on
    /// worker threads.
    pub(super) fn wait_used(&self, n: u16) {
        let start = std::time::Instant::now();
        while self.used_idx() != n {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "used index {} never reached {n}",
                self.used_idx()
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    pub(super) fn used_entry(&self, slot: u64) -> (u32, u32) {
        let mut raw = [0u8; 8];
        self.memory
            .read(self.used() + 4 + 8 * slot, &mut raw)
            .unwrap();
        (
            u32::from_le_bytes(raw[..4].try_into().unwrap()),
            u32::from_le_bytes(raw[4..].try_into().unwrap()),
        )
    }

    /// Descriptor 0 reads "hello" at DATA, descriptor 1 takes 5 bytes at DATA + 0x100.
    fn hello_chain(&self) {
        self.memory.write(DATA, b"hello").unwrap();
        self.descriptor(RING, DATA, 5, VRING_DESC_F_NEXT, 1);
        self.descriptor(RING + 16, DATA + 0x100, 5, VRING_DESC_F_WRITE, 0);
    }
}

#[test]
fn header_bars_and_capabilities_as_bhyve() {
    let m = Machine::new(true);
    assert_eq!(m.root.config_read(SLOT, PCIR_VENDOR, 2), 0x1af4);
    assert_eq!(
        m.root.config_read(SLOT, PCIR_DEVICE, 2),
        u32::from(VIRTIO_DEV_RANDOM)
    );
    assert_eq!(m.root.config_read(SLOT, PCIR_SUBDEV_0, 2), 4);
    assert_eq!(m.root.config_read(SLOT, 0x08, 1), 0, "legacy revision 0");
    let bar0 = m.root.config_read(SLOT, PCIR_BAR0, 4);
    assert_eq!(bar0 & 1, 1, "BAR 0 is I/O");
    let bar1 = m.root.config_read(SLOT, PCIR_BAR0 + 4 * MSIX_BAR, 4);
    assert_eq!(bar1 & 1, 0, "BAR 1 is memory");
    assert!(m.capability(PCIY_MSIX).is_some());
    assert!(m.capability(PCIY_MSI).is_some());
    assert!(m.intx() == IntxState::Idle);
    // BAR 0 holds the registers and the configuration after the MSI-X registers.
    let io = m
        .root
        .function(SLOT)
        .unwrap()
        .lock()
        .unwrap()
        .config()
        .bar(IO_BAR);
    assert!(io.size >= VIRTIO_PCI_CONFIG_MSIX + CONFIG.len() as u64);

    let m = Machine::new(false);
    assert!(m.capability(PCIY_MSIX).is_none(), "-W: no MSI-X");
    assert!(m.capability(PCIY_MSI).is_some());
    let bar1 = m.root.config_read(SLOT, PCIR_BAR0 + 4 * MSIX_BAR, 4);
    assert_eq!(bar1, 0, "no MSI-X BAR");
}

#[test]
fn features_status_and_configuration() {
    let m = Machine::new(false);
    assert_eq!(
        m.read(VIRTIO_PCI_HOST_FEATURES, 4),
        1 | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    );
    // Bits the device does not offer are dropped.
    m.write(VIRTIO_PCI_GUEST_FEATURES, 4, 0xffff_ffff);
    assert_eq!(
        m.read(VIRTIO_PCI_GUEST_FEATURES, 4),
        1 | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    );
    m.write(VIRTIO_PCI_STATUS, 1, 3);
    assert_eq!(m.read(VIRTIO_PCI_STATUS, 1), 3);
    // Without MSI-X the configuration starts at 0x14, in any access size.
    assert_eq!(m.read(0x14, 4), 0x4433_2211);
    assert_eq!(m.read(0x18, 2), 0x6655);
    assert_eq!(m.read(0x15, 1), 0x22);
    // Beyond it, and at wrong sizes, all ones.
    assert_eq!(m.read(0x1a, 1), 0xff);
    assert_eq!(m.read(VIRTIO_PCI_HOST_FEATURES, 2), 0xffff);
    // A selected queue that does not exist has size 0.
    m.write(VIRTIO_PCI_QUEUE_SEL, 2, 5);
    assert_eq!(m.read(VIRTIO_PCI_QUEUE_NUM, 2), 0);
    // The read-only registers stay.
    m.write(VIRTIO_PCI_HOST_FEATURES, 4, 0);
    assert_ne!(m.read(VIRTIO_PCI_HOST_FEATURES, 4), 0);
}

#[test]
fn request_round_trip_with_intx_and_isr() {
    let mut m = Machine::new(false);
    m.setup(0);
    m.hello_chain();
    m.submit(0);
    assert_eq!(m.used_idx(), 1);
    assert_eq!(m.used_entry(0), (0, 5));
    let mut out = [0u8; 5];
    m.memory.read(DATA + 0x100, &mut out).unwrap();
    assert_eq!(&out, b"olleh");
    assert_eq!(m.intx(), IntxState::Asserted);
    assert!(m.sink.lines.lock().unwrap().iter().any(|&(_, high)| high));
    assert!(m.sink.msis.lock().unwrap().is_empty());
    // Reading the ISR returns the queue bit once and drops the line.
    assert_eq!(m.read(VIRTIO_PCI_ISR, 1), u32::from(VIRTIO_PCI_ISR_INTR));
    assert_eq!(m.intx(), IntxState::Idle);
    assert_eq!(m.read(VIRTIO_PCI_ISR, 1), 0);
    assert_eq!(m.read(VIRTIO_PCI_STATUS, 1), 7);
    // The device heard every status the driver wrote, the reset first.
    assert_eq!(*m.statuses.lock().unwrap(), vec![0, 3, 7]);
}

#[test]
fn no_interrupt_when_the_driver_suppresses_it() {
    let mut m = Machine::new(false);
    m.setup(0);
    m.memory
        .store_u16(m.avail(), VRING_AVAIL_F_NO_INTERRUPT as u16)
        .unwrap();
    m.hello_chain();
    m.submit(0);
    assert_eq!(m.used_idx(), 1);
    assert_eq!(m.intx(), IntxState::Idle);
    assert_eq!(m.read(VIRTIO_PCI_ISR, 1), 0);
}

#[test]
fn msi_when_enabled_and_msix_vectors() {
    // MSI (with -W): the one message goes out, and the ISR is set as well.
    let mut m = Machine::new(false);
    let msi = m.capability(PCIY_MSI).unwrap();
    m.root.config_write(SLOT, msi + 4, 4, 0xfee0_1000);
    m.root.config_write(SLOT, msi + 8, 4, 0);
    m.root.config_write(SLOT, msi + 12, 2, 0x4041);
    m.root.config_write(SLOT, msi + 2, 2, 1);
    m.setup(0);
    m.hello_chain();
    m.submit(0);
    assert_eq!(*m.sink.msis.lock().unwrap(), vec![(0xfee0_1000, 0x4041)]);
    assert_eq!(m.intx(), IntxState::Pending, "INTx masked while MSI is on");

    // MSI-X: the queue's vector, and the configuration moves to 0x18.
    let mut m = Machine::new(true);
    m.enable_msix();
    let table = u64::from(m.root.config_read(SLOT, PCIR_BAR0 + 4 * MSIX_BAR, 4) & !0xf);
    // Vector 1: address, data, unmasked.
    m.buses
        .mmio
        .write(table + 16, &0xfee0_2000u32.to_le_bytes());
    m.buses.mmio.write(table + 20, &0u32.to_le_bytes());
    m.buses.mmio.write(table + 24, &0x55u32.to_le_bytes());
    m.buses.mmio.write(table + 28, &0u32.to_le_bytes());
    m.setup(0);
    m.write(VIRTIO_MSI_QUEUE_VECTOR, 2, 1);
    assert_eq!(m.read(VIRTIO_MSI_QUEUE_VECTOR, 2), 1);
    assert_eq!(m.read(VIRTIO_MSI_CONFIG_VECTOR, 2), 0xffff);
    assert_eq!(m.read(0x18, 4), 0x4433_2211);
    m.hello_chain();
    m.submit(0);
    assert_eq!(*m.sink.msis.lock().unwrap(), vec![(0xfee0_2000, 0x55)]);
    assert_eq!(m.read(VIRTIO_PCI_ISR, 1), 0, "no ISR with MSI-X");
}

/// Submit a chain at descriptor 0 after `build` wrote it; the device must end up broken,
/// with no used entry, a configuration interrupt, and come back after a reset.
#[track_caller]
fn assert_breaks(features: u32, build: impl Fn(&Machine)) {
    let mut m = Machine::new(false);
    m.setup(features);
    build(&m);
    m.submit(0);
    assert_eq!(m.used_idx(), 0, "no request completed");
    let status = m.read(VIRTIO_PCI_STATUS, 1);
    assert_eq!(status & 0x40, 0x40, "DEVICE_NEEDS_RESET");
    assert_eq!(m.read(VIRTIO_PCI_ISR, 1), u32::from(VIRTIO_PCI_ISR_CONFIG));
    // A broken device takes no more requests...
    m.hello_chain();
    m.submit(0);
    assert_eq!(m.used_idx(), 0);
    // ...until the driver resets it.
    let resets = *m.resets.lock().unwrap();
    m.setup(0);
    assert_eq!(*m.resets.lock().unwrap(), resets + 1);
    assert_eq!(m.read(VIRTIO_PCI_STATUS, 1), 7);
    m.hello_chain();
    m.submit(0);
    assert_eq!(m.used_idx(), 1);
}

#[test]
fn malformed_chains_break_the_device_not_bhyve() {
    // A loop: 0 -> 1 -> 0.
    assert_breaks(0, |m| {
        m.descriptor(RING, DATA, 4, VRING_DESC_F_NEXT, 1);
        m.descriptor(RING + 16, DATA, 4, VRING_DESC_F_NEXT, 0);
    });
    // A next index beyond the table.
    assert_breaks(0, |m| m.descriptor(RING, DATA, 4, VRING_DESC_F_NEXT, 9));
    // A buffer beyond guest RAM, and one that wraps the address space.
    assert_breaks(0, |m| m.descriptor(RING, 1 << 20, 4, 0, 0));
    assert_breaks(0, |m| m.descriptor(RING, u64::MAX - 1, 4, 0, 0));
    // Readable after writable.
    assert_breaks(0, |m| {
        m.descriptor(RING, DATA, 4, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1);
        m.descriptor(RING + 16, DATA, 4, 0, 0);
    });
    // Indirect without the feature.
    assert_breaks(0, |m| {
        m.descriptor(RING, TABLE, 32, VRING_DESC_F_INDIRECT, 0)
    });
    let indirect = 1 << VIRTIO_RING_F_INDIRECT_DESC;
    // An indirect table of a length that is not a whole number of descriptors, or empty.
    assert_breaks(indirect, |m| {
        m.descriptor(RING, TABLE, 20, VRING_DESC_F_INDIRECT, 0)
    });
    assert_breaks(indirect, |m| {
        m.descriptor(RING, TABLE, 0, VRING_DESC_F_INDIRECT, 0)
    });
    // An indirect descriptor inside an indirect table.
    assert_breaks(indirect, |m| {
        m.descriptor(RING, TABLE, 32, VRING_DESC_F_INDIRECT, 0);
        m.descriptor(TABLE, TABLE, 16, VRING_DESC_F_INDIRECT, 0);
    });
    // A loop inside an indirect table.
    assert_breaks(indirect, |m| {
        m.descriptor(RING, TABLE, 32, VRING_DESC_F_INDIRECT, 0);
        m.descriptor(TABLE, DATA, 4, VRING_DESC_F_NEXT, 1);
        m.descriptor(TABLE + 16, DATA, 4, VRING_DESC_F_NEXT, 0);
    });
    // An indirect table outside RAM.
    assert_breaks(indirect, |m| {
        m.descriptor(RING, (1 << 20) - 16, 32, VRING_DESC_F_INDIRECT, 0)
    });
    // More available than the ring holds.
    let mut m = Machine::new(false);
    m.setup(0);
    m.memory.store_u16(m.avail() + 2, QUEUE_SIZE + 5).unwrap();
    m.write(VIRTIO_PCI_QUEUE_NOTIFY, 2, 0);
    assert_eq!(m.read(VIRTIO_PCI_STATUS, 1) & 0x40, 0x40);
    assert_eq!(m.used_idx(), 0);
}

#[test]
fn indirect_tables_work_when_negotiated() {
    let mut m = Machine::new(false);
    m.setup(1 << VIRTIO_RING_F_INDIRECT_DESC);
    m.memory.write(DATA, b"abc").unwrap();
    m.descriptor(RING, TABLE, 32, VRING_DESC_F_INDIRECT, 0);
    m.descriptor(TABLE, DATA, 3, VRING_DESC_F_NEXT, 1);
    m.descriptor(TABLE + 16, DATA + 0x100, 3, VRING_DESC_F_WRITE, 0);
    m.submit(0);
    assert_eq!(m.used_entry(0), (0, 3));
    let mut out = [0u8; 3];
    m.memory.read(DATA + 0x100, &mut out).unwrap();
    assert_eq!(&out, b"cba");
}

#[test]
fn a_ring_outside_ram_breaks_the_device() {
    let m = Machine::new(false);
    m.write(VIRTIO_PCI_QUEUE_PFN, 4, ((1u64 << 20) >> 12) as u32 - 1);
    assert_eq!(m.read(VIRTIO_PCI_STATUS, 1) & 0x40, 0x40);
    assert_eq!(m.read(VIRTIO_PCI_QUEUE_PFN, 4), 0);
}

#[test]
fn reset_forgets_queues_features_and_vectors() {
    let mut m = Machine::new(true);
    m.enable_msix();
    m.setup(1);
    m.write(VIRTIO_MSI_QUEUE_VECTOR, 2, 0);
    m.write(VIRTIO_MSI_CONFIG_VECTOR, 2, 1);
    m.write(VIRTIO_PCI_STATUS, 1, 0);
    assert_eq!(m.read(VIRTIO_PCI_QUEUE_PFN, 4), 0);
    assert_eq!(m.read(VIRTIO_PCI_GUEST_FEATURES, 4), 0);
    assert_eq!(m.read(VIRTIO_MSI_QUEUE_VECTOR, 2), 0xffff);
    assert_eq!(m.read(VIRTIO_MSI_CONFIG_VECTOR, 2), 0xffff);
    assert_eq!(m.read(VIRTIO_PCI_STATUS, 1), 0);
}

/// The transport's saved state, through the PCI device interface a snapshot uses.
#[cfg(feature = "bhyve_snapshot")]
#[test]
fn saved_state_restores_into_a_fresh_transport() {
    let mut m = Machine::new(false);
    m.setup(1);
    m.hello_chain();
    m.submit(0);
    let saved = with_device(&m, |d| d.save_device_state()).unwrap();
    let state: pci::TransportState = crate::snapshot::decode_section(&saved).unwrap();
    assert_eq!(state.queues[0].last_avail, 1);
    assert_eq!(state.queues[0].next_used, 1);
    assert_eq!(state.negotiated, 1);
    assert_eq!(state.device, vec![7]);

    // A second machine with the same guest memory contents picks up where the first stopped.
    let mut n = Machine::new(false);
    let mut ram = vec![0u8; 1 << 20];
    m.memory.read(0, &mut ram).unwrap();
    n.memory.write(0, &ram).unwrap();
    with_device(&n, |d| d.restore_device_state(&saved)).unwrap();
    n.next_avail = 1;
    assert_eq!(n.read(VIRTIO_PCI_GUEST_FEATURES, 4), 1);
    assert_eq!(n.read(VIRTIO_PCI_QUEUE_PFN, 4), (RING >> 12) as u32);
    n.memory.write(DATA, b"world").unwrap();
    n.submit(0);
    assert_eq!(n.used_idx(), 2, "the second request lands after the first");
    assert_eq!(n.used_entry(1), (0, 5));

    // A state with another number of queues is refused.
    let mut wrong = state.clone();
    wrong.queues.push(wrong.queues[0]);
    let wrong = crate::snapshot::encode_section(&wrong).unwrap();
    assert!(with_device(&n, |d| d.restore_device_state(&wrong)).is_err());
}

#[cfg(feature = "bhyve_snapshot")]
fn with_device<T>(m: &Machine, f: impl FnOnce(&mut dyn crate::devices::pci::PciDevice) -> T) -> T {
    let mut function = m.root.function(SLOT).unwrap().lock().unwrap();
    f(function.device())
}

/// Random guest register accesses and ring contents on virtio-rnd: nothing panics, and after
/// a reset the device fills a proper buffer.
#[test]
fn random_guest_input_never_panics_virtio_rnd() {
    use crate::devices::virtio_test_driver::Driver;
    let mut rng = crate::test_rng::Rng(0x5eed_7a4d);
    let mut driver = Driver::new(Box::new(super::rnd::VirtioRandom::default()));
    driver.setup(0);
    driver.random_guest_input(&mut || rng.next(), 5000);
    driver.setup(0);
    let buffer = driver.post(0, None, 32);
    assert_eq!(driver.used_entries(0, 1), [(0, 32)]);
    assert_ne!(driver.buffer(buffer, 32), [0u8; 32]);
}
