//! The controller against a host driver written here from the NVMe 1.4 specification: the
//! registers, the admin and I/O queue round trips on a file (checked from the host side) and
//! on a RAM namespace, malformed commands and doorbells, and the saved state.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::devices::pci::irq::IntxState;
use crate::devices::tests::{block_options, Recorder, TempDir};
use crate::interrupts::InterruptSink;

const MEMORY: u64 = 1 << 20;
const ASQ: u64 = 0x10000;
const ACQ: u64 = 0x11000;
const IOSQ: u64 = 0x12000;
const IOCQ: u64 = 0x13000;
const PRP_LIST: u64 = 0x14000;
const IDENTIFY: u64 = 0x15000;
const DATA: u64 = 0x20000;
const ENTRIES: u16 = 16;

fn options() -> NvmeOptions {
    NvmeOptions {
        max_queues: 4,
        queue_entries: 64,
        ioslots: 8,
        sector_size: None,
        serial: *b"SERIAL-0123456789ABC",
        eui64: 0,
        dsm: Dsm::Auto,
        ram_mib: None,
    }
}

/// A host driving one controller, with one I/O queue pair once [`Host::create_io_queues`]
/// ran.
struct Host {
    nvme: Nvme,
    memory: Arc<GuestMemory>,
    config: ConfigSpace,
    tails: [u16; 2],
    heads: [u16; 2],
    phases: [bool; 2],
    _dir: Option<TempDir>,
    path: Option<std::path::PathBuf>,
}

impl Host {
    fn ram(mib: u64, edit: impl FnOnce(&mut NvmeOptions)) -> Self {
        let mut o = options();
        o.ram_mib = Some(mib);
        edit(&mut o);
        let size = mib << 20;
        let ns = Namespace {
            size,
            sector_bits: o.sector_size.unwrap_or(4096).trailing_zeros(),
            can_delete: false,
        };
        Self::new(
            o,
            ns,
            |_| Store::Ram(Mutex::new(vec![0u8; size as usize])),
            None,
        )
    }

    fn file(tag: &str, edit: impl FnOnce(&mut NvmeOptions)) -> Self {
        let dir = TempDir::new(&format!("nvme-{tag}"));
        let path = dir.0.join("disk.img");
        let data: Vec<u8> = (0..256u32 << 10).map(|i| (i / 512) as u8).collect();
        std::fs::write(&path, data).unwrap();
        let file = BlockFile::open(&block_options(&path)).unwrap();
        let info = file.info();
        let mut o = options();
        edit(&mut o);
        let ns = Namespace {
            size: info.size,
            sector_bits: o.sector_size.unwrap_or(info.sector_size).trailing_zeros(),
            can_delete: info.can_delete,
        };
        let mut host = Self::new(
            o,
            ns,
            move |memory| {
                Store::Block(Arc::new(BlockBackend::start(file, memory, "test").unwrap()))
            },
            Some(dir),
        );
        host.path = Some(path);
        host
    }

    fn new(
        o: NvmeOptions,
        ns: Namespace,
        store: impl FnOnce(Arc<GuestMemory>) -> Store,
        dir: Option<TempDir>,
    ) -> Self {
        let memory = Arc::new(GuestMemory::new(MEMORY).unwrap());
        let sink: Arc<dyn InterruptSink> = Arc::new(Recorder::default());
        let msix = MsixTable::new(o.max_queues as u16 + 1, sink);
        let intx = Arc::new(IntxLine::default());
        let slot = PciAddress::new(0, 4, 0).unwrap();
        let eui = eui64_bytes(o.eui64, "vm", slot);
        let controller = Controller::new(
            &o,
            ns,
            eui,
            store(memory.clone()),
            memory.clone(),
            msix,
            intx,
        );
        Self {
            nvme: Nvme {
                controller: Arc::new(controller),
            },
            memory,
            config: ConfigSpace::new(true),
            tails: [0; 2],
            heads: [0; 2],
            phases: [true; 2],
            _dir: dir,
            path: None,
        }
    }

    fn read32(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.nvme.bar_read(&self.config, REG_BAR, offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn write32(&mut self, offset: u64, value: u32) {
        let config = ConfigSpace::new(true);
        self.nvme
            .bar_write(&config, REG_BAR, offset, &value.to_le_bytes());
    }

    fn enable_with(&mut self, asq: u64, acq: u64) {
        self.write32(
            REG_AQA,
            (u32::from(ENTRIES - 1) << 16) | u32::from(ENTRIES - 1),
        );
        self.write32(REG_ASQ, asq as u32);
        self.write32(REG_ASQ + 4, (asq >> 32) as u32);
        self.write32(REG_ACQ, acq as u32);
        self.write32(REG_ACQ + 4, (acq >> 32) as u32);
        self.write32(REG_CC, CC_EN | (6 << 16) | (4 << 20));
    }

    fn enable(&mut self) {
        self.enable_with(ASQ, ACQ);
        assert_eq!(self.read32(REG_CSTS) & (CSTS_RDY | CSTS_CFS), CSTS_RDY);
    }

    /// Queue `command` on queue `q` (0 admin, 1 I/O) without ringing.
    fn queue(&mut self, q: usize, command: &[u8; 64]) {
        let base = [ASQ, IOSQ][q];
        let at = base + u64::from(self.tails[q]) * 64;
        self.memory.write(at, command).unwrap();
        self.tails[q] = (self.tails[q] + 1) % ENTRIES;
    }

    fn ring(&mut self, q: usize) {
        let tail = self.tails[q];
        self.write32(DOORBELL_BASE + 8 * q as u64, u32::from(tail));
    }

    /// The next completion of queue `q`: (cdw0, status without phase, cid, sq head).
    fn reap(&mut self, q: usize) -> Option<(u32, u16, u16, u16)> {
        let base = [ACQ, IOCQ][q];
        let at = base + u64::from(self.heads[q]) * 16;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut e = [0u8; 16];
            self.memory.read(at, &mut e).unwrap();
            let status = u16::from_le_bytes([e[14], e[15]]);
            if (status & 1 == 1) == self.phases[q] {
                self.heads[q] = (self.heads[q] + 1) % ENTRIES;
                if self.heads[q] == 0 {
                    self.phases[q] = !self.phases[q];
                }
                let head = self.heads[q];
                self.write32(DOORBELL_BASE + 8 * q as u64 + 4, u32::from(head));
                let cdw0 = u32::from_le_bytes(e[0..4].try_into().unwrap());
                let cid = u16::from_le_bytes([e[12], e[13]]);
                let sq_head = u16::from_le_bytes([e[8], e[9]]);
                return Some((cdw0, status & !1, cid, sq_head));
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Submit on queue `q` and wait for the completion: (cdw0, status).
    fn run(&mut self, q: usize, command: [u8; 64]) -> (u32, u16) {
        self.queue(q, &command);
        self.ring(q);
        let (cdw0, status, cid, _) = self.reap(q).expect("completion");
        assert_eq!(cid, u16::from_le_bytes([command[2], command[3]]));
        (cdw0, status)
    }

    fn admin(&mut self, command: [u8; 64]) -> (u32, u16) {
        self.run(0, command)
    }

    fn create_io_queues(&mut self) {
        let (_, s) = self.admin(cmd(opc::CREATE_IO_CQ, 1, 0, IOCQ, 0, 1 | (15 << 16), 3));
        assert_eq!(s, sc::SUCCESS);
        let (_, s) = self.admin(cmd(
            opc::CREATE_IO_SQ,
            2,
            0,
            IOSQ,
            0,
            1 | (15 << 16),
            1 | (1 << 16),
        ));
        assert_eq!(s, sc::SUCCESS);
    }

    fn rw(&mut self, write: bool, lba: u64, blocks: u16, prp1: u64, prp2: u64) -> u16 {
        let op = if write { opc::WRITE } else { opc::READ };
        let mut c = cmd(op, 7, 1, prp1, prp2, lba as u32, (lba >> 32) as u32);
        c[48..52].copy_from_slice(&u32::from(blocks - 1).to_le_bytes());
        self.run(1, c).1
    }
}

fn cmd(opcode: u8, cid: u16, nsid: u32, prp1: u64, prp2: u64, cdw10: u32, cdw11: u32) -> [u8; 64] {
    let mut c = [0u8; 64];
    c[0] = opcode;
    c[2..4].copy_from_slice(&cid.to_le_bytes());
    c[4..8].copy_from_slice(&nsid.to_le_bytes());
    c[24..32].copy_from_slice(&prp1.to_le_bytes());
    c[32..40].copy_from_slice(&prp2.to_le_bytes());
    c[40..44].copy_from_slice(&cdw10.to_le_bytes());
    c[44..48].copy_from_slice(&cdw11.to_le_bytes());
    c
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

#[test]
fn registers_after_reset_are_bhyves() {
    let mut h = Host::ram(1, |_| {});
    let cap = u64::from(h.read32(0)) | (u64::from(h.read32(4)) << 32);
    assert_eq!(cap & 0xffff, 63, "MQES is qsz - 1");
    assert_eq!((cap >> 16) & 1, 1, "contiguous queues required");
    assert_eq!((cap >> 24) & 0xff, 60, "timeout");
    assert_eq!((cap >> 37) & 1, 1, "NVM command set");
    assert_eq!((cap >> 48) & 0xf, 0, "4 KiB pages only");
    assert_eq!(h.read32(REG_VS), 0x0001_0400);
    assert_eq!(h.read32(REG_CSTS), 0);
    // Read-only registers keep their values.
    h.write32(REG_VS, 0);
    h.write32(REG_CAP, 0);
    assert_eq!(h.read32(REG_VS), 0x0001_0400);
    assert_eq!(h.read32(0) & 0xffff, 63);
    h.enable();
    assert_eq!(h.read32(REG_CC) & 1, 1);
    // Disabling resets: not ready, queues gone.
    h.write32(REG_CC, 0);
    assert_eq!(h.read32(REG_CSTS) & CSTS_RDY, 0);
    // Shutdown notification reports complete.
    h.write32(REG_CC, 1 << 14);
    assert_eq!((h.read32(REG_CSTS) >> 2) & 3, 2);
}

#[test]
fn identify_reports_the_controller_and_namespace() {
    let mut h = Host::ram(2, |_| {});
    h.enable();
    let (_, s) = h.admin(cmd(opc::IDENTIFY, 1, 0, IDENTIFY, IDENTIFY + 4096, 1, 0));
    assert_eq!(s, sc::SUCCESS);
    let mut d = [0u8; 4096];
    h.memory.read(IDENTIFY, &mut d).unwrap();
    assert_eq!(u16::from_le_bytes([d[0], d[1]]), 0xFB5D);
    assert_eq!(&d[4..24], b"SERIAL-0123456789ABC");
    assert_eq!(&d[24..40], b"bhyve-NVMe      ");
    assert_eq!(d[77], 9, "MDTS");
    assert_eq!(d[512], 0x66);
    assert_eq!(d[513], 0x44);
    assert_eq!(u32::from_le_bytes(d[516..520].try_into().unwrap()), 1);
    assert_eq!(d[520] & 4, 0, "a RAM namespace cannot deallocate");
    let (_, s) = h.admin(cmd(opc::IDENTIFY, 2, 1, IDENTIFY, 0, 0, 0));
    assert_eq!(s, sc::SUCCESS);
    h.memory.read(IDENTIFY, &mut d).unwrap();
    // 2 MiB of 4096-byte blocks.
    assert_eq!(u64::from_le_bytes(d[0..8].try_into().unwrap()), 512);
    assert_eq!(
        u32::from_le_bytes(d[128..132].try_into().unwrap()),
        12 << 16
    );
    let (_, s) = h.admin(cmd(opc::IDENTIFY, 3, 0, IDENTIFY, 0, 2, 0));
    assert_eq!(s, sc::SUCCESS);
    h.memory.read(IDENTIFY, &mut d).unwrap();
    assert_eq!(&d[0..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
    let (_, s) = h.admin(cmd(opc::IDENTIFY, 4, 2, IDENTIFY, 0, 3, 0));
    assert_eq!(s, sc::INVALID_NAMESPACE_OR_FORMAT);
    let (_, s) = h.admin(cmd(opc::IDENTIFY, 5, 0, IDENTIFY, 0, 0x10, 0));
    assert_eq!(s, sc::INVALID_FIELD);
}

#[test]
fn number_of_queues_is_set_once_and_clamped() {
    let mut h = Host::ram(1, |_| {});
    h.enable();
    let (cdw0, s) = h.admin(cmd(opc::SET_FEATURES, 1, 0, 0, 0, 7, 0x0010_0010));
    assert_eq!(s, sc::SUCCESS);
    // maxq=4: at most 4 of each, 0-based.
    assert_eq!(cdw0, 0x0003_0003);
    let (_, s) = h.admin(cmd(opc::SET_FEATURES, 2, 0, 0, 0, 7, 0));
    assert_eq!(s, sc::COMMAND_SEQUENCE_ERROR);
    let (cdw0, s) = h.admin(cmd(opc::GET_FEATURES, 3, 0, 0, 0, 7, 0));
    assert_eq!((cdw0, s), (0x0003_0003, sc::SUCCESS));
    let (_, s) = h.admin(cmd(opc::SET_FEATURES, 4, 0, 0, 0, 0x06, 1));
    assert_eq!(s, sc::INVALID_FIELD, "volatile write cache is refused");
    let (_, s) = h.admin(cmd(opc::SET_FEATURES, 5, 1, 0, 0, 0x02, 0));
    assert_eq!(s, sc::FEATURE_NOT_NS_SPECIFIC);
    let (cdw0, s) = h.admin(cmd(opc::GET_FEATURES, 6, 0, 0, 0, 0x0b, 0));
    assert_eq!((cdw0, s), (0x31f, sc::SUCCESS));
}

#[test]
fn file_write_read_flush_and_deallocate() {
    let mut h = Host::file("rw", |_| {});
    h.enable();
    h.create_io_queues();
    // Three pages through PRP1 + a PRP list; the host file sees the pattern.
    let data = pattern(3 * 4096, 0x5a);
    h.memory.write(DATA, &data).unwrap();
    h.memory.write_u64(PRP_LIST, DATA + 0x1000).unwrap();
    h.memory.write_u64(PRP_LIST + 8, DATA + 0x2000).unwrap();
    assert_eq!(h.rw(true, 8, 24, DATA, PRP_LIST), sc::SUCCESS);
    let file = std::fs::read(h.path.as_ref().unwrap()).unwrap();
    assert_eq!(&file[8 * 512..8 * 512 + data.len()], &data[..]);
    assert_eq!(file[0], 0, "blocks before are untouched");
    // Read back one unaligned-start transfer over two pages.
    h.memory.fill_zero(DATA + 0x8000, 0x3000).unwrap();
    assert_eq!(h.rw(false, 8, 8, DATA + 0x8800, DATA + 0xa000), sc::SUCCESS);
    let mut back = vec![0u8; 4096];
    h.memory.read(DATA + 0x8800, &mut back[..0x800]).unwrap();
    h.memory.read(DATA + 0xa000, &mut back[0x800..]).unwrap();
    assert_eq!(&back[..], &data[..4096]);
    let (_, s) = h.run(1, cmd(opc::FLUSH, 9, 1, 0, 0, 0, 0));
    assert_eq!(s, sc::SUCCESS);
    // Deallocate blocks 8..16: the file reads zeros there.
    let mut range = [0u8; 16];
    range[4..8].copy_from_slice(&8u32.to_le_bytes());
    range[8..16].copy_from_slice(&8u64.to_le_bytes());
    h.memory.write(DATA, &range).unwrap();
    let (_, s) = h.run(1, cmd(opc::DATASET_MANAGEMENT, 10, 1, DATA, 0, 0, 4));
    assert_eq!(s, sc::SUCCESS);
    let file = std::fs::read(h.path.as_ref().unwrap()).unwrap();
    assert!(file[8 * 512..16 * 512].iter().all(|&b| b == 0));
    assert_eq!(&file[16 * 512..17 * 512], &data[4096..4096 + 512]);
    // The health log counts the commands.
    let (_, s) = h.admin(cmd(
        opc::GET_LOG_PAGE,
        11,
        0,
        IDENTIFY,
        0,
        2 | (127 << 16),
        0,
    ));
    assert_eq!(s, sc::SUCCESS);
    let mut log = [0u8; 512];
    h.memory.read(IDENTIFY, &mut log).unwrap();
    assert_eq!(u16::from_le_bytes([log[1], log[2]]), 296);
    assert_eq!(log[64], 1, "read commands");
    assert_eq!(log[80], 1, "write commands");
}

#[test]
fn dsm_option_decides_the_oncs_bit() {
    for (dsm, offered) in [
        (Dsm::Auto, true),
        (Dsm::Enable, true),
        (Dsm::Disable, false),
    ] {
        let mut h = Host::file("dsm", |o| o.dsm = dsm);
        h.enable();
        h.admin(cmd(opc::IDENTIFY, 1, 0, IDENTIFY, 0, 1, 0));
        let mut d = [0u8; 4096];
        h.memory.read(IDENTIFY, &mut d).unwrap();
        assert_eq!(d[520] & 4 != 0, offered, "{dsm:?}");
        h.create_io_queues();
        let (_, s) = h.run(1, cmd(opc::DATASET_MANAGEMENT, 3, 1, DATA, 0, 0, 4));
        let want = if offered {
            sc::SUCCESS
        } else {
            sc::INVALID_OPCODE
        };
        assert_eq!(s, want, "{dsm:?}");
    }
}

#[test]
fn ram_namespace_keeps_data_and_phase_wraps() {
    let mut h = Host::ram(1, |_| {});
    h.enable();
    h.create_io_queues();
    // More commands than the queue has entries: the phase flips and completions go on.
    for i in 0..40u64 {
        let data = pattern(4096, i as u8);
        h.memory.write(DATA, &data).unwrap();
        assert_eq!(h.rw(true, i, 1, DATA, 0), sc::SUCCESS);
    }
    for i in (0..40u64).rev() {
        h.memory.fill_zero(DATA, 4096).unwrap();
        assert_eq!(h.rw(false, i, 1, DATA, 0), sc::SUCCESS);
        let mut back = vec![0u8; 4096];
        h.memory.read(DATA, &mut back).unwrap();
        assert_eq!(back, pattern(4096, i as u8), "block {i}");
    }
}

#[test]
fn malformed_commands_get_error_statuses() {
    let mut h = Host::file("bad", |_| {});
    h.enable();
    // Admin: unknown opcode, queues with bad ids, sizes, vectors, addresses.
    assert_eq!(h.admin(cmd(0x7f, 1, 0, 0, 0, 0, 0)).1, sc::INVALID_OPCODE);
    assert_eq!(
        h.admin(cmd(opc::CREATE_IO_CQ, 2, 0, IOCQ, 0, 9 | (15 << 16), 3))
            .1,
        sc::INVALID_QUEUE_IDENTIFIER
    );
    assert_eq!(
        h.admin(cmd(opc::CREATE_IO_CQ, 3, 0, IOCQ, 0, 1 | (15 << 16), 2))
            .1,
        sc::INVALID_FIELD,
        "not physically contiguous"
    );
    assert_eq!(
        h.admin(cmd(opc::CREATE_IO_CQ, 4, 0, IOCQ, 0, 1 | (999 << 16), 3))
            .1,
        sc::MAXIMUM_QUEUE_SIZE_EXCEEDED
    );
    assert_eq!(
        h.admin(cmd(
            opc::CREATE_IO_CQ,
            5,
            0,
            IOCQ,
            0,
            1 | (15 << 16),
            3 | (40 << 16)
        ))
        .1,
        sc::INVALID_INTERRUPT_VECTOR
    );
    assert_eq!(
        h.admin(cmd(
            opc::CREATE_IO_CQ,
            6,
            0,
            MEMORY - 16,
            0,
            1 | (15 << 16),
            3
        ))
        .1,
        sc::INVALID_FIELD,
        "queue outside RAM"
    );
    assert_eq!(
        h.admin(cmd(
            opc::CREATE_IO_SQ,
            7,
            0,
            IOSQ,
            0,
            1 | (15 << 16),
            1 | (1 << 16)
        ))
        .1,
        sc::COMPLETION_QUEUE_INVALID
    );
    assert_eq!(
        h.admin(cmd(opc::DELETE_IO_SQ, 8, 0, 0, 0, 1, 0)).1,
        sc::INVALID_QUEUE_IDENTIFIER
    );
    assert_eq!(
        h.admin(cmd(opc::DELETE_IO_CQ, 9, 0, 0, 0, 0, 0)).1,
        sc::INVALID_QUEUE_IDENTIFIER
    );
    assert_eq!(
        h.admin(cmd(opc::GET_LOG_PAGE, 10, 0, IDENTIFY, 0, 0x42, 0))
            .1,
        sc::INVALID_LOG_PAGE
    );
    assert_eq!(
        h.admin(cmd(opc::IDENTIFY, 11, 0, MEMORY + 0x1000, 0, 1, 0))
            .1,
        sc::DATA_TRANSFER_ERROR,
        "identify into memory the guest does not have"
    );
    h.create_io_queues();
    assert_eq!(
        h.admin(cmd(opc::DELETE_IO_CQ, 12, 0, 0, 0, 1, 0)).1,
        sc::INVALID_QUEUE_DELETION,
        "an SQ still uses it"
    );
    // I/O: bad namespace, opcode, LBA range, PRPs outside RAM (first page, second page, list
    // entry, list pointer), oversized transfer.
    assert_eq!(
        h.run(1, cmd(opc::READ, 1, 2, DATA, 0, 0, 0)).1,
        sc::INVALID_NAMESPACE_OR_FORMAT | sc::DNR
    );
    assert_eq!(
        h.run(1, cmd(0x7e, 2, 1, DATA, 0, 0, 0)).1,
        sc::INVALID_OPCODE
    );
    assert_eq!(h.rw(false, 512, 1, DATA, 0), sc::LBA_OUT_OF_RANGE);
    assert_eq!(h.rw(false, u64::MAX, 1, DATA, 0), sc::LBA_OUT_OF_RANGE);
    assert_eq!(h.rw(false, 0, 1, MEMORY, 0), sc::DATA_TRANSFER_ERROR);
    assert_eq!(h.rw(false, 0, 16, DATA, 1 << 40), sc::DATA_TRANSFER_ERROR);
    h.memory.write_u64(PRP_LIST, DATA + 0x1000).unwrap();
    h.memory.write_u64(PRP_LIST + 8, MEMORY + 0x1000).unwrap();
    assert_eq!(h.rw(true, 0, 24, DATA, PRP_LIST), sc::DATA_TRANSFER_ERROR);
    assert_eq!(h.rw(true, 0, 24, DATA, MEMORY - 4), sc::DATA_TRANSFER_ERROR);
    assert_eq!(h.rw(false, 0, 4096, DATA, PRP_LIST), sc::LBA_OUT_OF_RANGE);
    // Nothing was written by the refused commands.
    let file = std::fs::read(h.path.as_ref().unwrap()).unwrap();
    assert_eq!(file[0], 0);
    assert_eq!(file[512 * 23], 23);
    // The queues still work.
    assert_eq!(h.rw(false, 0, 1, DATA, 0), sc::SUCCESS);
}

#[test]
fn bad_doorbells_are_ignored() {
    let mut h = Host::ram(1, |_| {});
    // Before the controller is ready.
    h.write32(DOORBELL_BASE, 1);
    h.enable();
    h.create_io_queues();
    // Absent queues, past the last doorbell, tails beyond the queue, odd sizes.
    h.write32(DOORBELL_BASE + 8 * 3, 1);
    h.write32(DOORBELL_BASE + 8 * 3 + 4, 1);
    h.write32(DOORBELL_BASE + 8 * 100, 1);
    h.write32(DOORBELL_BASE + 8, u32::from(ENTRIES) + 5);
    h.write32(DOORBELL_BASE + 12, 0xffff);
    h.nvme
        .bar_write(&ConfigSpace::new(true), REG_BAR, DOORBELL_BASE + 8, &[1]);
    h.nvme.bar_write(
        &ConfigSpace::new(true),
        REG_BAR,
        DOORBELL_BASE + 2,
        &[1, 0, 0, 0],
    );
    // Nothing ran: the next command is the first to complete.
    assert_eq!(h.rw(false, 0, 1, DATA, 0), sc::SUCCESS);
    let (_, s) = h.admin(cmd(opc::GET_FEATURES, 1, 0, 0, 0, 0x0b, 0));
    assert_eq!(s, sc::SUCCESS);
}

#[test]
fn admin_queue_outside_ram_is_fatal_not_ready() {
    let mut h = Host::ram(1, |_| {});
    h.enable_with(MEMORY, ACQ);
    assert_eq!(h.read32(REG_CSTS) & (CSTS_RDY | CSTS_CFS), CSTS_CFS);
    // A doorbell now does nothing.
    h.write32(DOORBELL_BASE, 1);
    // Reset and enable properly.
    h.write32(REG_CC, 0);
    h.write32(REG_CC, 0);
    h.enable();
}

#[test]
fn async_event_requests_are_held_up_to_the_limit() {
    let mut h = Host::ram(1, |_| {});
    h.enable();
    for cid in 0..5 {
        h.queue(0, &cmd(opc::ASYNC_EVENT_REQUEST, 100 + cid, 0, 0, 0, 0, 0));
    }
    h.ring(0);
    // The sixth is over AERL + 1 = 5.
    let (_, s) = h.admin(cmd(opc::ASYNC_EVENT_REQUEST, 200, 0, 0, 0, 0, 0));
    assert_eq!(s, sc::ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED);
    // A temperature threshold below the reading raises a health event on the first.
    let (_, s) = h.admin(cmd(opc::SET_FEATURES, 201, 0, 0, 0, 4, 200));
    assert_eq!(s, sc::SUCCESS);
    let (cdw0, s, cid, _) = h.reap(0).unwrap();
    assert_eq!((cid, s), (100, sc::SUCCESS));
    assert_eq!(cdw0 & 0x7, 1, "SMART / health status");
    assert_eq!((cdw0 >> 16) & 0xff, 2, "health log page");
    // ABORT never finds the command.
    assert_eq!(
        h.admin(cmd(opc::ABORT, 202, 0, 0, 0, 0, 0)),
        (1, sc::SUCCESS)
    );
}

#[test]
fn commands_beyond_the_io_slots_wait_and_complete() {
    let mut h = Host::file("slots", |o| o.ioslots = 1);
    h.enable();
    h.create_io_queues();
    // Eight reads rung at once run one at a time and all complete, in order.
    for i in 0..8u16 {
        let mut c = cmd(
            opc::READ,
            50 + i,
            1,
            DATA + u64::from(i) * 4096,
            0,
            u32::from(i),
            0,
        );
        c[48..52].copy_from_slice(&7u32.to_le_bytes());
        h.queue(1, &c);
    }
    h.ring(1);
    for i in 0..8u16 {
        let (_, status, cid, _) = h.reap(1).expect("completion");
        assert_eq!((cid, status), (50 + i, sc::SUCCESS));
        let mut block = [0u8; 512];
        h.memory
            .read(DATA + u64::from(i) * 4096, &mut block)
            .unwrap();
        assert!(block.iter().all(|&b| b == i as u8), "block {i}");
    }
}

#[test]
fn intx_follows_unconsumed_completions_without_msix() {
    let mut h = Host::ram(1, |_| {});
    h.enable();
    let intx = h.nvme.controller.intx.clone();
    assert_eq!(intx.state(), IntxState::Idle);
    h.queue(0, &cmd(opc::GET_FEATURES, 1, 0, 0, 0, 0x0b, 0));
    h.ring(0);
    // Not routed in this test: the line is pending rather than asserted.
    assert_ne!(intx.state(), IntxState::Idle, "a completion raises INTx");
    h.reap(0).unwrap();
    assert_eq!(intx.state(), IntxState::Idle, "consuming it lowers INTx");
}

#[test]
fn crc16_is_the_arc_variant() {
    // The catalogued check value of CRC-16/ARC.
    assert_eq!(crc16(b"123456789"), 0xBB3D);
    let slot = PciAddress::new(0, 4, 0).unwrap();
    let eui = eui64_bytes(0, "vm", slot);
    assert_eq!(&eui[0..4], &[0x58, 0x9c, 0xfc, 0x20]);
    assert_eq!(&eui[6..8], &[0, 1]);
    assert_eq!(
        eui64_bytes(0x0102030405060708, "vm", slot),
        [8, 7, 6, 5, 4, 3, 2, 1]
    );
}

#[test]
fn options_are_read_as_bhyve_reads_them() {
    let slot = PciAddress::new(0, 4, 0).unwrap();
    let parse = |pairs: &[(&str, &str)]| {
        let mut config = Config::new();
        for (k, v) in pairs {
            config.set(&format!("pci.0.4.0.{k}"), v);
        }
        NvmeOptions::from_config(&config, "pci.0.4.0", slot)
    };
    let o = parse(&[]).unwrap();
    assert_eq!((o.max_queues, o.queue_entries, o.ioslots), (16, 2048, 8));
    assert_eq!(&o.serial[..9], b"NVME-4-0\0");
    let o = parse(&[
        ("maxq", "99"),
        ("qsz", "32"),
        ("ioslots", "4"),
        ("sectsz", "4096"),
        ("ser", "ABC"),
        ("eui64", "0x10"),
        ("dsm", "disable"),
        ("ram", "64"),
    ])
    .unwrap();
    assert_eq!(o.max_queues, 16, "out of range falls back");
    assert_eq!(
        (o.queue_entries, o.ioslots, o.sector_size),
        (32, 4, Some(4096))
    );
    assert_eq!(&o.serial, b"ABC                 ");
    assert_eq!((o.eui64, o.dsm, o.ram_mib), (16, Dsm::Disable, Some(64)));
    assert_eq!(parse(&[("sectsz", "1024")]).unwrap().sector_size, None);
    for (k, v) in [
        ("qsz", "0"),
        ("ioslots", "-1"),
        ("dsm", "maybe"),
        ("ram", "x"),
    ] {
        assert!(parse(&[(k, v)]).is_err(), "{k}={v}");
    }
}

#[cfg(feature = "bhyve_snapshot")]
#[test]
fn saved_state_restores_into_a_new_controller() {
    let mut h = Host::ram(1, |_| {});
    h.enable();
    h.create_io_queues();
    let data = pattern(4096, 3);
    h.memory.write(DATA, &data).unwrap();
    assert_eq!(h.rw(true, 5, 1, DATA, 0), sc::SUCCESS);
    let saved = h.nvme.save_device_state().unwrap();
    // A fresh controller on the same memory takes the state and goes on.
    let mut fresh = Host::ram(1, |_| {});
    fresh.memory = h.memory.clone();
    let o = options();
    let ns = h.nvme.controller.namespace;
    let sink: Arc<dyn InterruptSink> = Arc::new(Recorder::default());
    let controller = Controller::new(
        &NvmeOptions {
            ram_mib: Some(1),
            ..o
        },
        ns,
        [0; 8],
        Store::Ram(Mutex::new(vec![0u8; 1 << 20])),
        h.memory.clone(),
        MsixTable::new(5, sink),
        Arc::new(IntxLine::default()),
    );
    fresh.nvme = Nvme {
        controller: Arc::new(controller),
    };
    fresh.nvme.restore_device_state(&saved).unwrap();
    fresh.tails = h.tails;
    fresh.heads = h.heads;
    fresh.phases = h.phases;
    h.memory.fill_zero(DATA, 4096).unwrap();
    assert_eq!(fresh.rw(false, 5, 1, DATA, 0), sc::SUCCESS);
    let mut back = vec![0u8; 4096];
    fresh.memory.read(DATA, &mut back).unwrap();
    assert_eq!(back, data);
    // A state with a queue outside RAM is refused.
    let mut bad: state::Saved = crate::snapshot::decode_section(&saved).unwrap();
    bad.state.sq[1].base = MEMORY;
    let bad = crate::snapshot::encode_section(&bad).unwrap();
    assert!(fresh.nvme.restore_device_state(&bad).is_err());
    assert!(fresh.nvme.restore_device_state(&[1, 2, 3]).is_err());
}

#[test]
fn planned_from_the_configuration_it_is_bhyves_pci_function_with_msix() {
    use crate::bus::Buses;
    use crate::devices::pci::irq::PirqRouter;
    use crate::devices::pci::{
        PciRootBuilder, PCIR_BAR0, PCIR_CAP_PTR, PCIR_COMMAND, PCIY_EXPRESS, PCIY_MSIX,
    };
    use crate::devices::registry::PciCreate;

    let slot = PciAddress::new(0, 4, 0).unwrap();
    let mut config = Config::new();
    config.set("name", "vm");
    config.set("pci.0.4.0.device", "nvme");
    config.set("pci.0.4.0.ram", "1");
    config.set("pci.0.4.0.maxq", "2");
    let mut plan_ctx = PciPlan {
        config: &config,
        lpc: None,
    };
    let create = plan(&mut plan_ctx, slot).unwrap();
    let memory = Arc::new(GuestMemory::new(MEMORY).unwrap());
    let sink = Arc::new(Recorder::default());
    let sink_dyn: Arc<dyn InterruptSink> = sink.clone();
    let router = Arc::new(PirqRouter::new(sink_dyn.clone(), false));
    let mut space = ConfigSpace::new(true);
    let device = create(PciCreate {
        slot,
        config_space: &mut space,
        interrupts: &sink_dyn,
        router: &router,
        memory: &memory,
    })
    .unwrap();
    let buses = Arc::new(Buses::default());
    let mut builder = PciRootBuilder::new(1 << 32);
    builder.set_intx_router(router);
    builder.add(slot, "nvme", space, device).unwrap();
    let root = builder.build(&buses).unwrap();
    let cfg = |offset: usize, size: usize| root.config_read(slot, offset, size);
    assert_eq!(cfg(0, 4), 0x0A0A_FB5D);
    assert_eq!(
        cfg(0x08, 4) >> 8,
        0x01_08_02,
        "mass storage, NVM, NVMHCI 1.0"
    );
    assert_eq!(cfg(PCIR_BAR0, 4) & 0x7, 0x4, "BAR 0 is 64-bit memory");
    let mut caps = Vec::new();
    let mut cap = cfg(PCIR_CAP_PTR, 1) as usize;
    while cap != 0 {
        caps.push((cfg(cap, 1) as u8, cap));
        cap = cfg(cap + 1, 1) as usize;
    }
    let msix = caps.iter().find(|c| c.0 == PCIY_MSIX).unwrap().1;
    assert!(caps.iter().any(|c| c.0 == PCIY_EXPRESS));
    assert_eq!(cfg(msix + 2, 2) & 0x7ff, 2, "maxq + 1 vectors");
    assert_eq!(cfg(msix + 4, 4) & 7, MSIX_BAR as u32, "table in BAR 4");
    let bar0 = u64::from(cfg(PCIR_BAR0, 4) & !0xf) | (u64::from(cfg(PCIR_BAR0 + 4, 4)) << 32);
    let bar4 = u64::from(cfg(PCIR_BAR0 + 4 * MSIX_BAR, 4) & !0xf);
    root.config_write(slot, PCIR_COMMAND, 2, 0x6);
    root.config_write(slot, msix + 2, 2, 0x8000);
    let w32 = |addr: u64, v: u32| buses.mmio.write(addr, &v.to_le_bytes());
    // Vector 0: address, data, unmasked.
    w32(bar4, 0xfee0_0000);
    w32(bar4 + 4, 0);
    w32(bar4 + 8, 0x4242);
    w32(bar4 + 12, 0);
    w32(bar0 + REG_AQA, (15 << 16) | 15);
    w32(bar0 + REG_ASQ, ASQ as u32);
    w32(bar0 + REG_ACQ, ACQ as u32);
    w32(bar0 + REG_CC, CC_EN | (6 << 16) | (4 << 20));
    let mut csts = [0u8; 4];
    buses.mmio.read(bar0 + REG_CSTS, &mut csts);
    assert_eq!(u32::from_le_bytes(csts) & 3, CSTS_RDY);
    memory
        .write(ASQ, &cmd(opc::IDENTIFY, 9, 0, IDENTIFY, 0, 1, 0))
        .unwrap();
    w32(bar0 + DOORBELL_BASE, 1);
    assert_eq!(*sink.msis.lock().unwrap(), vec![(0xfee0_0000, 0x4242)]);
    let mut ident = [0u8; 24];
    memory.read(IDENTIFY, &mut ident).unwrap();
    assert_eq!(&ident[4..13], b"NVME-4-0\0", "default serial");
    // maxq=2: the doorbell of SQ 3 is past the BAR's doorbells and ignored.
    w32(bar0 + DOORBELL_BASE + 8 * 3, 1);
    assert_eq!(sink.msis.lock().unwrap().len(), 1);
}

/// Random register and doorbell writes, random commands with random fields and PRPs, and
/// garbage in the queues: the controller never panics and never touches memory outside the
/// guest's RAM (the accesses would fail and the test's memory reads would show it).
#[test]
fn random_guest_input_never_panics() {
    let mut rng = crate::test_rng::Rng(0x5eed_0e0e);
    let mut h = Host::ram(1, |_| {});
    let restart = |h: &mut Host| {
        h.write32(REG_CC, 0);
        h.tails = [0; 2];
        h.heads = [0; 2];
        h.phases = [true; 2];
        for base in [ACQ, IOCQ] {
            h.memory.write(base, &[0u8; 16 * ENTRIES as usize]).unwrap();
        }
        h.enable();
        h.create_io_queues();
    };
    restart(&mut h);
    let opcodes = [
        opc::DELETE_IO_SQ,
        opc::CREATE_IO_SQ,
        opc::GET_LOG_PAGE,
        opc::DELETE_IO_CQ,
        opc::CREATE_IO_CQ,
        opc::IDENTIFY,
        opc::ABORT,
        opc::SET_FEATURES,
        opc::GET_FEATURES,
        opc::ASYNC_EVENT_REQUEST,
        opc::FORMAT_NVM,
        opc::WRITE_ZEROES,
        opc::DATASET_MANAGEMENT,
        opc::READ,
        opc::WRITE,
    ];
    let registers = [
        REG_INTMS, REG_INTMC, REG_CC, REG_CSTS, REG_NSSR, REG_AQA, REG_ASQ, REG_ACQ,
    ];
    for round in 0..5000 {
        if round % 500 == 499 {
            // Whatever happened, a reset and a fresh start work.
            restart(&mut h);
        }
        match rng.below(8) {
            0 => {
                // Garbage in the queues, the PRP list and the data area.
                let at = ASQ + rng.below(DATA + 0x10000 - ASQ);
                let bytes: Vec<u8> = (0..rng.below(64) + 1).map(|_| rng.byte()).collect();
                let _ = h.memory.write(at, &bytes);
            }
            1 => {
                let offset = *rng.pick(&registers) + 4 * rng.below(2);
                let value = if rng.below(4) == 0 {
                    rng.next() as u32
                } else {
                    // Mostly a plausible enable with random queue sizes and addresses.
                    match offset {
                        REG_CC => CC_EN | (6 << 16) | (4 << 20),
                        _ => rng.below(0x10_0000) as u32,
                    }
                };
                h.write32(offset, value);
            }
            2 => {
                // Any doorbell, in range or not, with any value.
                let offset = DOORBELL_BASE + 4 * rng.below(24);
                h.write32(offset, rng.next() as u32 >> rng.below(32));
            }
            3 => {
                let mut data = vec![0u8; *rng.pick(&[1usize, 2, 4, 8])];
                let offset = rng.below(0x2000);
                h.nvme.bar_read(&h.config, REG_BAR, offset, &mut data);
                let value: Vec<u8> = (0..data.len()).map(|_| rng.byte()).collect();
                let config = ConfigSpace::new(true);
                h.nvme
                    .bar_write(&config, *rng.pick(&[REG_BAR, MSIX_BAR]), offset, &value);
            }
            _ => {
                // A plausible command with random fields on the admin or the I/O queue.
                let address = |rng: &mut crate::test_rng::Rng| {
                    if rng.below(4) == 0 {
                        rng.next()
                    } else {
                        DATA + rng.below(0x10000)
                    }
                };
                let prp1 = address(&mut rng);
                let prp2 = address(&mut rng);
                let mut c = cmd(
                    *rng.pick(&opcodes),
                    rng.next() as u16,
                    rng.below(3) as u32,
                    prp1,
                    prp2,
                    rng.next() as u32 >> rng.below(32),
                    rng.next() as u32 >> rng.below(32),
                );
                for byte in &mut c[48..64] {
                    *byte = rng.byte();
                }
                if rng.below(8) == 0 {
                    c[1] = rng.byte();
                }
                let q = rng.below(2) as usize;
                h.queue(q, &c);
                h.ring(q);
                // Take what completed, if the queues are still where the host put them.
                for q in 0..2 {
                    let base = [ACQ, IOCQ][q];
                    let mut e = [0u8; 16];
                    h.memory
                        .read(base + u64::from(h.heads[q]) * 16, &mut e)
                        .unwrap();
                    if (e[14] & 1 == 1) == h.phases[q] {
                        h.heads[q] = (h.heads[q] + 1) % ENTRIES;
                        if h.heads[q] == 0 {
                            h.phases[q] = !h.phases[q];
                        }
                        let head = h.heads[q];
                        h.write32(DOORBELL_BASE + 8 * q as u64 + 4, u32::from(head));
                    }
                }
            }
        }
    }
    restart(&mut h);
    let (_, status) = h.admin(cmd(opc::IDENTIFY, 9, 0, IDENTIFY, 0, 1, 0));
    assert_eq!(status, sc::SUCCESS);
}
