//! The controller driven through its registers as a guest driver would, against real files
//! checked from the host side.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::*;
use crate::devices::pci::irq::PirqRouter;
use crate::devices::pci::PCIR_CAP_PTR;
use crate::devices::tests::{block_options, Recorder, TempDir};

const SLOT: PciAddress = PciAddress {
    bus: 0,
    slot: 4,
    function: 0,
};
/// Guest layout: command list, received FISes, command tables (one per slot), data.
const CLB: u64 = 0x10000;
const FB: u64 = 0x11000;
const TABLES: u64 = 0x20000;
const TABLE_SIZE: u64 = 0x1000;
const DATA: u64 = 0x80000;
const MEMORY: u64 = 1 << 20;
const MSI_ADDRESS: u64 = 0xfee0_0000;
const MSI_DATA: u16 = 0x40;

struct Port {
    index: usize,
    atapi: bool,
    path: PathBuf,
    options: BlockOptions,
}

struct Hba {
    _dir: TempDir,
    ahci: Ahci,
    config: ConfigSpace,
    memory: Arc<GuestMemory>,
    sink: Arc<Recorder>,
    paths: Vec<PathBuf>,
}

/// A disk of 256 KiB on port 0 whose sector N holds the byte N, and a CD of 8 frames on port
/// 1 whose frame N holds the byte 0x80+N.
fn hba(tag: &str, edit: impl FnOnce(&mut Vec<Port>)) -> Hba {
    let dir = TempDir::new(&format!("ahci-{tag}"));
    let disk = dir.0.join("disk.img");
    let data: Vec<u8> = (0..256 << 10).map(|i: u32| (i / 512) as u8).collect();
    std::fs::write(&disk, data).unwrap();
    let cd = dir.0.join("cd.iso");
    let data: Vec<u8> = (0..8 * 2048)
        .map(|i: u32| 0x80 + (i / 2048) as u8)
        .collect();
    std::fs::write(&cd, data).unwrap();
    let mut ports = vec![
        Port {
            index: 0,
            atapi: false,
            options: block_options(&disk),
            path: disk,
        },
        Port {
            index: 1,
            atapi: true,
            options: BlockOptions {
                readonly: true,
                ..block_options(&cd)
            },
            path: cd,
        },
    ];
    edit(&mut ports);
    let memory = Arc::new(GuestMemory::new(MEMORY).unwrap());
    let sink = Arc::new(Recorder::default());
    let sink_dyn: Arc<dyn InterruptSink> = sink.clone();
    let router = Arc::new(PirqRouter::new(sink_dyn.clone(), false));
    let mut config = ConfigSpace::new(true);
    let paths = ports.iter().map(|p| p.path.clone()).collect();
    let attached = ports
        .into_iter()
        .map(|p| AttachedPort {
            index: p.index,
            atapi: p.atapi,
            backend: BlockBackend::start(BlockFile::open(&p.options).unwrap(), memory.clone(), "t")
                .unwrap(),
            serial: "SER-1".to_string(),
            revision: "R1".to_string(),
            model: "MODEL X".to_string(),
            rotation_rate: 1,
        })
        .collect();
    let ahci = Ahci::new(
        attached,
        PciCreate {
            slot: SLOT,
            config_space: &mut config,
            interrupts: &sink_dyn,
            router: &router,
            memory: &memory,
        },
    )
    .unwrap();
    Hba {
        _dir: dir,
        ahci,
        config,
        memory,
        sink,
        paths,
    }
}

/// A host-to-device register FIS.
fn fis(command: u8, lba: u64, count: u16, features: u16) -> [u8; 20] {
    let mut f = [0u8; 20];
    f[0] = FIS_REG_H2D;
    f[1] = 0x80;
    f[2] = command;
    f[3] = features as u8;
    f[4] = lba as u8;
    f[5] = (lba >> 8) as u8;
    f[6] = (lba >> 16) as u8;
    f[7] = 0x40;
    f[8] = (lba >> 24) as u8;
    f[9] = (lba >> 32) as u8;
    f[10] = (lba >> 40) as u8;
    f[11] = (features >> 8) as u8;
    f[12] = count as u8;
    f[13] = (count >> 8) as u8;
    f
}

fn port_reg(port: usize, reg: u64) -> u64 {
    PORT_OFFSET + port as u64 * PORT_STEP + reg
}

impl Hba {
    fn read(&mut self, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        self.ahci.bar_read(&self.config, ABAR, offset, &mut d);
        u32::from_le_bytes(d)
    }

    fn write(&mut self, offset: u64, value: u32) {
        self.ahci
            .bar_write(&self.config, ABAR, offset, &value.to_le_bytes());
    }

    fn preg(&mut self, port: usize, reg: u64) -> u32 {
        self.read(port_reg(port, reg))
    }

    fn set_preg(&mut self, port: usize, reg: u64, value: u32) {
        self.write(port_reg(port, reg), value)
    }

    fn clb(port: usize) -> u64 {
        CLB + port as u64 * 0x400
    }

    fn fb(port: usize) -> u64 {
        FB + port as u64 * 0x100
    }

    /// What a driver does to bring a port up: command list, FIS area, interrupts, start.
    fn start(&mut self, port: usize) {
        self.write(GHC, GHC_AE | GHC_IE);
        self.set_preg(port, P_CLB, Self::clb(port) as u32);
        self.set_preg(port, P_FB, Self::fb(port) as u32);
        self.set_preg(port, P_SERR, u32::MAX);
        self.set_preg(port, P_IS, u32::MAX);
        self.set_preg(port, P_IE, u32::MAX);
        self.set_preg(port, P_CMD, P_CMD_FRE | P_CMD_SUD | P_CMD_POD);
        self.set_preg(port, P_CMD, P_CMD_FRE | P_CMD_SUD | P_CMD_POD | P_CMD_ST);
    }

    /// Enable MSI with one message, as the guest would through configuration space.
    fn enable_msi(&mut self) {
        let cap = usize::from(self.config.read8(PCIR_CAP_PTR));
        self.config.write32(cap + 4, MSI_ADDRESS as u32);
        self.config.write32(cap + 8, 0);
        self.config.write16(cap + 12, MSI_DATA);
        let control = self.config.read16(cap + 2);
        self.config.write16(cap + 2, control | 1);
        self.ahci.config_written(&self.config);
    }

    /// Write the command of `slot`: header (`write` direction, `prdt` buffers), command FIS,
    /// ATAPI command.
    fn command(
        &mut self,
        port: usize,
        slot: usize,
        cfis: &[u8; 20],
        acmd: Option<&[u8]>,
        prdt: &[(u64, u32)],
        write: bool,
    ) {
        let table = TABLES + (port * MAX_SLOTS + slot) as u64 * TABLE_SIZE;
        let mut header = [0u8; 32];
        let mut flags: u16 = 5; // FIS length in dwords
        if write {
            flags |= 1 << 6;
        }
        if acmd.is_some() {
            flags |= 1 << 5;
        }
        header[0..2].copy_from_slice(&flags.to_le_bytes());
        header[2..4].copy_from_slice(&(prdt.len() as u16).to_le_bytes());
        header[8..16].copy_from_slice(&table.to_le_bytes());
        self.memory
            .write(Self::clb(port) + slot as u64 * 32, &header)
            .unwrap();
        self.memory.write(table, cfis).unwrap();
        let mut a = [0u8; 16];
        if let Some(acmd) = acmd {
            a[..acmd.len()].copy_from_slice(acmd);
        }
        self.memory.write(table + 0x40, &a).unwrap();
        for (i, &(addr, len)) in prdt.iter().enumerate() {
            let mut e = [0u8; 16];
            e[0..8].copy_from_slice(&addr.to_le_bytes());
            e[12..16].copy_from_slice(&(len - 1).to_le_bytes());
            self.memory.write(table + 0x80 + i as u64 * 16, &e).unwrap();
        }
    }

    /// Wait until the port's bits in `reg` under `mask` clear, or an error is posted.
    fn wait_clear(&mut self, port: usize, reg: u64, mask: u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.preg(port, reg) & mask != 0 && self.preg(port, P_IS) & P_IX_TFE == 0 {
            assert!(Instant::now() < deadline, "command did not complete");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Issue `slot` and wait for it; returns PxTFD.
    fn issue(&mut self, port: usize, slot: usize) -> u32 {
        self.set_preg(port, P_CI, 1 << slot);
        self.wait_clear(port, P_CI, 1 << slot);
        self.preg(port, P_TFD)
    }

    /// Run one non-queued command with its data in one buffer at DATA.
    fn run(&mut self, port: usize, cfis: [u8; 20], len: u32, write: bool) -> u32 {
        let prdt: &[(u64, u32)] = if len == 0 { &[] } else { &[(DATA, len)] };
        self.command(port, 0, &cfis, None, prdt, write);
        self.issue(port, 0)
    }

    fn packet(&mut self, port: usize, acmd: &[u8], len: u32) -> u32 {
        let prdt: &[(u64, u32)] = if len == 0 { &[] } else { &[(DATA, len)] };
        self.command(
            port,
            0,
            &fis(ata::PACKET_CMD, 0, 0, 0),
            Some(acmd),
            prdt,
            false,
        );
        self.issue(port, 0)
    }

    fn data(&self, len: usize) -> Vec<u8> {
        let mut d = vec![0u8; len];
        self.memory.read(DATA, &mut d).unwrap();
        d
    }

    fn received(&self, port: usize, offset: u64, len: usize) -> Vec<u8> {
        let mut d = vec![0u8; len];
        self.memory.read(Self::fb(port) + offset, &mut d).unwrap();
        d
    }

    fn prdbc(&self, port: usize, slot: usize) -> u32 {
        let mut d = [0u8; 4];
        self.memory
            .read(Self::clb(port) + slot as u64 * 32 + 4, &mut d)
            .unwrap();
        u32::from_le_bytes(d)
    }

    fn host(&self, port: usize) -> Vec<u8> {
        std::fs::read(&self.paths[port]).unwrap()
    }

    /// Clear an error so the port takes commands again: stop, clear, start (what drivers do).
    fn recover(&mut self, port: usize) {
        self.set_preg(port, P_CMD, P_CMD_FRE);
        self.set_preg(port, P_IS, u32::MAX);
        self.write(IS, u32::MAX);
        self.set_preg(port, P_CMD, P_CMD_FRE | P_CMD_ST);
    }
}

const GOOD: u32 = ata::S_READY | ata::S_DSC;

#[test]
fn registers_after_reset_are_bhyves() {
    let mut h = hba("regs", |_| {});
    assert_eq!(h.config.read16(PCIR_VENDOR), 0x8086);
    assert_eq!(h.config.read16(PCIR_DEVICE), 0x2821);
    assert_eq!(h.config.read8(PCIR_CLASS), 0x01);
    assert_eq!(h.config.read8(PCIR_SUBCLASS), 0x06);
    assert_eq!(h.config.read8(PCIR_PROGIF), 0x01);
    // 32 ports, 32 slots, NCQ, 64-bit, Gen3.
    assert_eq!(h.read(CAP), 0xff30_ff3f);
    assert_eq!(h.read(GHC), GHC_AE);
    assert_eq!(h.read(PI), 0b11);
    assert_eq!(h.read(VS), 0x10300);
    assert_eq!(h.read(CAP2), CAP2_APST);
    assert_eq!(h.preg(0, P_SIG), SIG_ATA);
    assert_eq!(h.preg(1, P_SIG), SIG_ATAPI);
    assert_eq!(h.preg(2, P_SIG), 0xffff_ffff);
    assert_eq!(h.preg(0, P_SSTS), 0x133);
    assert_eq!(h.preg(2, P_SSTS), 0);
    assert_eq!(h.preg(0, P_TFD), 0x150 | 0x20);
    assert_eq!(h.preg(1, P_TFD), 0x130);
    assert_eq!(h.preg(0, P_CMD), P_CMD_SUD | P_CMD_POD | P_CMD_CPS);
    assert_eq!(h.preg(2, P_CMD), P_CMD_SUD | P_CMD_POD);
    // Narrow reads see the bytes of the register.
    let mut b = [0u8; 2];
    h.ahci
        .bar_read(&h.config, ABAR, port_reg(1, P_SIG) + 2, &mut b);
    assert_eq!(u16::from_le_bytes(b), 0xeb14);
    // Read-only registers stay, writes narrower than 32 bits are ignored.
    h.set_preg(0, P_SIG, 0);
    assert_eq!(h.preg(0, P_SIG), SIG_ATA);
    h.ahci
        .bar_write(&h.config, ABAR, port_reg(0, P_CLB), &[1, 2]);
    assert_eq!(h.preg(0, P_CLB), 0);
    // Reads and writes past the ports do nothing.
    assert_eq!(h.read(0x2000 - 4), 0);
    h.write(0x1ffc, 5);
}

#[test]
fn identify_reports_the_configured_strings_and_size() {
    let mut h = hba("identify", |_| {});
    h.enable_msi();
    h.start(0);
    let tfd = h.run(0, fis(ata::ATA_IDENTIFY, 0, 0, 0), 512, false);
    assert_eq!(tfd & 0xff, GOOD);
    let d = h.data(512);
    let string = |from: usize, len: usize| -> String {
        (0..len).map(|i| d[from + (i ^ 1)] as char).collect()
    };
    assert_eq!(string(20, 20), "SER-1               ");
    assert_eq!(string(46, 8), "R1      ");
    assert_eq!(string(54, 40).trim_end(), "MODEL X");
    let word = |w: usize| u16::from_le_bytes([d[2 * w], d[2 * w + 1]]);
    assert_eq!(word(217), 1);
    // 512 sectors, in the 28-bit and 48-bit fields.
    assert_eq!(word(60), 512);
    assert_eq!(word(100), 512);
    assert_eq!(word(169), 1, "TRIM offered");
    assert_eq!(d.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    assert_eq!(h.prdbc(0, 0), 512);
    // A PIO setup FIS, then the D2H FIS with the status.
    assert_eq!(h.received(0, 0x20, 1)[0], FIS_PIO_SETUP);
    let d2h = h.received(0, 0x40, 4);
    assert_eq!(d2h[0], FIS_REG_D2H);
    assert_eq!(u32::from(d2h[2]), GOOD);
    assert_ne!(h.preg(0, P_IS) & P_IX_DHR, 0);
    assert_ne!(h.read(IS) & 1, 0);
    // MSI message 0 for port 0.
    assert!(h
        .sink
        .msis
        .lock()
        .unwrap()
        .contains(&(MSI_ADDRESS, u32::from(MSI_DATA))));
    // IDENTIFY DEVICE on the CD is aborted; IDENTIFY PACKET DEVICE answers.
    h.start(1);
    let tfd = h.run(1, fis(ata::ATA_IDENTIFY, 0, 0, 0), 512, false);
    assert_eq!(tfd, ABORTED);
    h.recover(1);
    let tfd = h.run(1, fis(ata::ATAPI_IDENTIFY, 0, 0, 0), 512, false);
    assert_eq!(tfd & 0xff, GOOD);
    assert_eq!(h.data(2)[1], 0x85, "packet device, CD-ROM");
}

#[test]
fn dma_write_and_read_back_reach_the_file() {
    let mut h = hba("dma", |_| {});
    h.start(0);
    let pattern: Vec<u8> = (0..2048u32).map(|i| (i * 7 + 3) as u8).collect();
    h.memory.write(DATA, &pattern).unwrap();
    // WRITE DMA EXT of 4 sectors at LBA 10, through two buffers.
    h.command(
        0,
        3,
        &fis(ata::WRITE_DMA48, 10, 4, 0),
        None,
        &[(DATA, 1024), (DATA + 1024, 1024)],
        true,
    );
    assert_eq!(h.issue(0, 3) & 0xff, GOOD);
    assert_eq!(h.prdbc(0, 3), 2048);
    assert_eq!(&h.host(0)[10 * 512..14 * 512], &pattern[..]);
    // READ DMA (28-bit) of sectors 9..15 into fresh memory.
    h.memory.fill_zero(DATA, 8192).unwrap();
    assert_eq!(
        h.run(0, fis(ata::READ_DMA, 9, 6, 0), 3072, false) & 0xff,
        GOOD
    );
    let d = h.data(3072);
    assert!(d[..512].iter().all(|&b| b == 9));
    assert_eq!(&d[512..2560], &pattern[..]);
    assert!(d[2560..].iter().all(|&b| b == 14));
    // FLUSH CACHE EXT.
    assert_eq!(
        h.run(0, fis(ata::FLUSHCACHE48, 0, 0, 0), 512, false) & 0xff,
        GOOD
    );
}

#[test]
fn ncq_commands_complete_with_set_device_bits() {
    let mut h = hba("ncq", |_| {});
    h.start(0);
    let pattern = vec![0x5au8; 1024];
    h.memory.write(DATA, &pattern).unwrap();
    // WRITE FPDMA QUEUED: count in the features field, tag in the count field.
    let mut write = fis(ata::WRITE_FPDMA_QUEUED, 20, 5 << 3, 2);
    write[3] = 2;
    h.command(0, 5, &write, None, &[(DATA, 1024)], true);
    let mut read = fis(ata::READ_FPDMA_QUEUED, 20, 6 << 3, 2);
    read[3] = 2;
    h.command(0, 6, &read, None, &[(DATA + 0x1000, 1024)], false);
    h.set_preg(0, P_SACT, 1 << 5);
    h.set_preg(0, P_CI, 1 << 5);
    h.wait_clear(0, P_SACT, 1 << 5);
    assert_eq!(&h.host(0)[20 * 512..22 * 512], &pattern[..]);
    h.set_preg(0, P_SACT, 1 << 6);
    h.set_preg(0, P_CI, 1 << 6);
    h.wait_clear(0, P_SACT, 1 << 6);
    let mut back = vec![0u8; 1024];
    h.memory.read(DATA + 0x1000, &mut back).unwrap();
    assert_eq!(back, pattern);
    assert_eq!(h.preg(0, P_CI), 0);
    let sdb = h.received(0, 0x58, 8);
    assert_eq!(sdb[0], FIS_SET_DEV_BITS);
    assert_eq!(u32::from_le_bytes(sdb[4..8].try_into().unwrap()), 1 << 6);
    assert_ne!(h.preg(0, P_IS) & P_IX_SDB, 0);
}

#[test]
fn trim_deallocates_and_nodelete_refuses() {
    let mut h = hba("trim", |_| {});
    h.start(0);
    let mut ranges = [0u8; 512];
    // Sectors 4..8, then an empty entry that ends nothing, then sector 100.
    ranges[0] = 4;
    ranges[6] = 4;
    ranges[16] = 100;
    ranges[22] = 1;
    h.memory.write(DATA, &ranges).unwrap();
    let tfd = h.run(0, fis(ata::DATA_SET_MANAGEMENT, 0, 1, 1), 512, true);
    assert_eq!(tfd & 0xff, GOOD);
    let host = h.host(0);
    assert!(host[4 * 512..8 * 512].iter().all(|&b| b == 0));
    assert!(host[100 * 512..101 * 512].iter().all(|&b| b == 0));
    assert!(host[8 * 512..9 * 512].iter().all(|&b| b == 8));

    let mut h = hba("nodelete", |p| p[0].options.nodelete = true);
    h.start(0);
    let tfd = h.run(0, fis(ata::ATA_IDENTIFY, 0, 0, 0), 512, false);
    assert_eq!(tfd & 0xff, GOOD);
    let d = h.data(512);
    assert_eq!(d[2 * 169], 0, "TRIM not offered");
    h.memory.write(DATA, &ranges).unwrap();
    let tfd = h.run(0, fis(ata::DATA_SET_MANAGEMENT, 0, 1, 1), 512, true);
    assert_eq!(tfd, ABORTED);
    for (i, sector) in h.host(0)[4 * 512..8 * 512].chunks(512).enumerate() {
        assert!(sector.iter().all(|&b| b == 4 + i as u8));
    }
}

#[test]
fn set_features_and_other_ata_commands() {
    let mut h = hba("features", |_| {});
    h.start(0);
    // SET FEATURES, transfer mode UDMA2.
    assert_eq!(
        h.run(0, fis(ata::SETFEATURES, 0, 0x42, 3), 0, false) & 0xff,
        GOOD
    );
    assert_eq!(h.ahci.state().ports[0].xfermode, 2);
    // SET MULTIPLE: a power of two up to 128, or 0.
    assert_eq!(
        h.run(0, fis(ata::SET_MULTI, 0, 16, 0), 0, false) & 0xff,
        GOOD
    );
    assert_eq!(h.ahci.state().ports[0].mult_sectors, 16);
    assert_eq!(h.run(0, fis(ata::SET_MULTI, 0, 3, 0), 0, false), ABORTED);
    h.recover(0);
    // Enable write cache: fine; an unknown subcommand: aborted.
    assert_eq!(
        h.run(0, fis(ata::SETFEATURES, 0, 0, 2), 0, false) & 0xff,
        GOOD
    );
    assert_eq!(
        h.run(0, fis(ata::SETFEATURES, 0, 0, 0x66), 0, false),
        ABORTED
    );
    h.recover(0);
    // CHECK POWER MODE answers "active" in the count field.
    assert_eq!(
        h.run(0, fis(ata::CHECK_POWER_MODE, 0, 0, 0), 0, false) & 0xff,
        GOOD
    );
    assert_eq!(h.received(0, 0x40, 13)[12], 0xff);
    // SMART is refused.
    assert_eq!(h.run(0, fis(ata::SMART_CMD, 0, 0, 0), 0, false), ABORTED);
    h.recover(0);
    // READ LOG EXT, log directory.
    let tfd = h.run(0, fis(ata::READ_LOG_EXT, 0, 1, 0), 512, false);
    assert_eq!(tfd & 0xff, GOOD);
    assert_eq!(&h.data(2), &[1, 0]);
}

#[test]
fn atapi_commands_read_the_image_as_a_cd() {
    let mut h = hba("atapi", |_| {});
    h.start(1);
    assert_eq!(h.packet(1, &[ata::TEST_UNIT_READY], 0) & 0xff, GOOD);
    assert_eq!(h.packet(1, &[ata::INQUIRY, 0, 0, 0, 36], 36) & 0xff, GOOD);
    let d = h.data(36);
    assert_eq!(d[0], 0x05);
    assert_eq!(&d[8..16], b"BHYVE   ");
    assert_eq!(&d[16..32], b"BHYVE DVD-ROM   ");
    assert_eq!(h.packet(1, &[ata::READ_CAPACITY], 8) & 0xff, GOOD);
    assert_eq!(h.data(8), [0, 0, 0, 7, 0, 0, 8, 0]);
    // READ(10) of frames 2 and 3, READ(12) of frame 7.
    let tfd = h.packet(1, &[ata::READ_10, 0, 0, 0, 0, 2, 0, 0, 2], 4096);
    assert_eq!(tfd & 0xff, GOOD);
    let d = h.data(4096);
    assert!(d[..2048].iter().all(|&b| b == 0x82));
    assert!(d[2048..].iter().all(|&b| b == 0x83));
    assert_eq!(h.prdbc(1, 0), 4096);
    let tfd = h.packet(1, &[ata::READ_12, 0, 0, 0, 0, 7, 0, 0, 0, 1], 2048);
    assert_eq!(tfd & 0xff, GOOD);
    assert!(h.data(2048).iter().all(|&b| b == 0x87));
    // READ TOC: one track, the lead-out after 8 frames.
    assert_eq!(
        h.packet(1, &[ata::READ_TOC, 0, 0, 0, 0, 0, 0, 0, 20], 20) & 0xff,
        GOOD
    );
    assert_eq!(
        h.data(20),
        [0, 18, 1, 1, 0, 0x14, 1, 0, 0, 0, 0, 0, 0, 0x14, 0xaa, 0, 0, 0, 0, 8]
    );
    let tfd = h.packet(
        1,
        &[ata::GET_EVENT_STATUS_NOTIFICATION, 1, 0, 0, 0, 0, 0, 0, 8],
        8,
    );
    assert_eq!(tfd & 0xff, GOOD);
    assert_eq!(h.data(8), [0, 6, 4, 0x10, 0, 2, 0, 0]);
    let tfd = h.packet(1, &[ata::MODE_SENSE_10, 0, 0x2a, 0, 0, 0, 0, 0, 30], 30);
    assert_eq!(tfd & 0xff, GOOD);
    assert_eq!(&h.data(10)[8..10], &[0x2a, 20]);
    // Reading past the end: ILLEGAL REQUEST, which REQUEST SENSE then reports.
    let tfd = h.packet(1, &[ata::READ_10, 0, 0, 0, 0, 7, 0, 0, 2], 4096);
    assert_eq!(tfd & 0xff, ata::S_READY | ata::S_ERROR);
    assert_eq!(tfd >> 12, 5);
    h.recover(1);
    assert_eq!(
        h.packet(1, &[ata::REQUEST_SENSE, 0, 0, 0, 18], 18) & 0xff,
        GOOD
    );
    let d = h.data(18);
    assert_eq!((d[0], d[2], d[12]), (0xf0, 5, 0x21));
    // An unknown opcode: invalid command operation code.
    let tfd = h.packet(1, &[0xff], 0);
    assert_eq!(tfd >> 12, 5);
    // Packet commands to the disk are aborted.
    h.start(0);
    assert_eq!(h.packet(0, &[ata::TEST_UNIT_READY], 0), ABORTED);
}

#[test]
fn malformed_commands_end_with_an_error_and_touch_nothing_outside_ram() {
    let mut h = hba("malformed", |_| {});
    h.start(0);
    let before = h.host(0);
    // A buffer outside guest memory.
    h.command(
        0,
        0,
        &fis(ata::READ_DMA48, 0, 1, 0),
        None,
        &[(MEMORY + 0x1000, 512)],
        false,
    );
    assert_eq!(h.issue(0, 0), ABORTED);
    assert_ne!(h.preg(0, P_IS) & P_IX_TFE, 0);
    // While the error stands, nothing else runs.
    h.command(
        0,
        1,
        &fis(ata::ATA_IDENTIFY, 0, 0, 0),
        None,
        &[(DATA, 512)],
        false,
    );
    h.set_preg(0, P_CI, 1 << 1);
    std::thread::sleep(Duration::from_millis(20));
    assert_ne!(h.preg(0, P_CI) & 2, 0);
    h.recover(0);
    assert_eq!(
        h.preg(0, P_CI),
        0,
        "stopping the port clears the issued commands"
    );
    // A buffer straddling the end of memory, for a write.
    h.command(
        0,
        0,
        &fis(ata::WRITE_DMA48, 0, 2, 0),
        None,
        &[(MEMORY - 512, 1024)],
        true,
    );
    assert_eq!(h.issue(0, 0), ABORTED);
    h.recover(0);
    // No buffers at all.
    h.command(0, 0, &fis(ata::READ_DMA48, 0, 1, 0), None, &[], false);
    assert_eq!(h.issue(0, 0), ABORTED);
    h.recover(0);
    // A command table outside memory.
    h.command(
        0,
        0,
        &fis(ata::READ_DMA48, 0, 1, 0),
        None,
        &[(DATA, 512)],
        false,
    );
    h.memory
        .write(Hba::clb(0) + 8, &(MEMORY * 4).to_le_bytes())
        .unwrap();
    assert_eq!(h.issue(0, 0), ABORTED);
    h.recover(0);
    // A command list outside memory: every slot there fails.
    h.set_preg(0, P_CMD, P_CMD_FRE);
    h.set_preg(0, P_CLBU, 0x10);
    h.set_preg(0, P_CMD, P_CMD_FRE | P_CMD_ST);
    assert_eq!(h.issue(0, 31), ABORTED);
    h.set_preg(0, P_CLBU, 0);
    h.recover(0);
    // A FIS that is not host-to-device, and a sector far past the end.
    let mut bad = fis(ata::READ_DMA48, 0, 1, 0);
    bad[0] = 0x34;
    h.command(0, 0, &bad, None, &[(DATA, 512)], false);
    assert_eq!(h.issue(0, 0), ABORTED);
    h.recover(0);
    assert_eq!(
        h.run(0, fis(ata::READ_DMA48, 1 << 40, 1, 0), 512, false),
        ABORTED
    );
    h.recover(0);
    // A received-FIS area outside memory: the command still completes.
    h.set_preg(0, P_CMD, 0);
    h.set_preg(0, P_FB, 0xffff_f000);
    h.set_preg(0, P_FBU, 0xffff_ffff);
    h.set_preg(0, P_CMD, P_CMD_FRE | P_CMD_ST);
    assert_eq!(
        h.run(0, fis(ata::READ_DMA48, 0, 1, 0), 512, false) & 0xff,
        GOOD
    );
    assert_eq!(h.host(0), before);
    // ATAPI READ into a buffer outside memory: ILLEGAL REQUEST.
    h.start(1);
    h.command(
        1,
        0,
        &fis(ata::PACKET_CMD, 0, 0, 0),
        Some(&[ata::READ_10, 0, 0, 0, 0, 0, 0, 0, 1]),
        &[(MEMORY, 2048)],
        false,
    );
    assert_eq!(h.issue(1, 0) >> 12, 5);
}

#[test]
fn a_failed_command_without_fis_receive_does_not_spin() {
    let mut h = hba("nofre", |_| {});
    h.start(0);
    // Command list running, FIS receive off: the error cannot be posted, the port still stops
    // taking commands until the guest clears it.
    h.set_preg(0, P_CMD, P_CMD_ST);
    let mut bad = fis(ata::READ_DMA48, 0, 1, 0);
    bad[0] = 0;
    h.command(0, 0, &bad, None, &[(DATA, 512)], false);
    h.set_preg(0, P_CI, 1);
    assert_eq!(h.preg(0, P_TFD), ABORTED);
    assert_eq!(h.preg(0, P_CI), 1);
    h.recover(0);
    assert_eq!(
        h.run(0, fis(ata::FLUSHCACHE, 0, 0, 0), 0, false) & 0xff,
        GOOD
    );
    // A port without a device whose busy status the guest overrode refuses commands.
    h.start(2);
    assert_eq!(h.preg(2, P_TFD), 0x7f);
    h.set_preg(2, P_CMD, P_CMD_ST | P_CMD_FRE | P_CMD_CLO);
    assert_eq!(h.run(2, fis(ata::FLUSHCACHE, 0, 0, 0), 0, false), ABORTED);
}

#[test]
fn long_prdt_is_split_into_backend_requests() {
    let mut h = hba("split", |_| {});
    h.start(0);
    // 200 buffers of 512 bytes: more than one request may name.
    let prdt: Vec<(u64, u32)> = (0..200).map(|i| (DATA + i * 512, 512)).collect();
    h.command(0, 0, &fis(ata::READ_DMA48, 0, 200, 0), None, &prdt, false);
    assert_eq!(h.issue(0, 0) & 0xff, GOOD);
    assert_eq!(h.prdbc(0, 0), 200 * 512);
    let d = h.data(200 * 512);
    for (i, sector) in d.chunks(512).enumerate() {
        assert!(sector.iter().all(|&b| b == i as u8), "sector {i}");
    }
}

#[test]
fn interrupts_follow_ghc_and_is_with_intx() {
    let mut h = hba("intx", |_| {});
    h.start(0);
    let line = h.config.intx().unwrap().clone();
    h.run(0, fis(ata::FLUSHCACHE, 0, 0, 0), 0, false);
    assert!(h.ahci.state().lintr);
    assert_ne!(line.state(), crate::devices::pci::irq::IntxState::Idle);
    // Clearing the port's IS then the HBA's IS lowers the line.
    h.set_preg(0, P_IS, u32::MAX);
    h.write(IS, u32::MAX);
    assert!(!h.ahci.state().lintr);
    assert_eq!(line.state(), crate::devices::pci::irq::IntxState::Idle);
    // With interrupts disabled in GHC, an event only sets the status bits.
    h.write(GHC, GHC_AE);
    h.run(0, fis(ata::FLUSHCACHE, 0, 0, 0), 0, false);
    assert!(!h.ahci.state().lintr);
    assert_ne!(h.read(IS) & 1, 0);
    // HBA reset brings every port back to its power-on registers.
    h.write(GHC, GHC_HR);
    assert_eq!(h.read(GHC), GHC_AE);
    assert_eq!(h.preg(0, P_IE), 0);
    assert_eq!(h.preg(0, P_CMD), P_CMD_SUD | P_CMD_POD | P_CMD_CPS);
}

#[test]
fn pause_completes_in_flight_io_and_the_state_restores() {
    let mut h = hba("snapshot", |_| {});
    h.start(0);
    let pattern: Vec<u8> = (0..32 * 512u32).map(|i| (i % 251) as u8).collect();
    h.memory.write(DATA, &pattern).unwrap();
    // Eight writes issued at once, then a pause straight away.
    for slot in 0..8 {
        let lba = 64 + slot as u64 * 4;
        h.command(
            0,
            slot,
            &fis(ata::WRITE_DMA48, lba, 4, 0),
            None,
            &[(DATA + slot as u64 * 2048, 2048)],
            true,
        );
    }
    h.set_preg(0, P_CI, 0xff);
    h.ahci.pause();
    let saved = h.ahci.state();
    assert_eq!(saved.ports[0].pending, 0, "paused with requests in flight");
    assert_eq!(saved.ports[0].ci, 0);
    assert_eq!(&h.host(0)[64 * 512..96 * 512], &pattern[..]);
    // A new controller on the same disk takes the state and goes on.
    let mut other = hba("snapshot-2", |p| {
        p[0].options = block_options(&h.paths[0]);
    });
    other.ahci.restore(&saved).unwrap();
    assert_eq!(other.ahci.state(), saved);
    other.ahci.resume();
    h.ahci.resume();
    other.memory.fill_zero(DATA, 2048).unwrap();
    let tfd = other.run(0, fis(ata::READ_DMA48, 64, 4, 0), 2048, false);
    assert_eq!(tfd & 0xff, GOOD);
    assert_eq!(other.data(2048), pattern[..2048]);
    // A state from another layout is refused.
    let mut wrong = saved.clone();
    wrong.pi = 1;
    assert!(other.ahci.restore(&wrong).is_err());
    let mut wrong = saved;
    wrong.ports[1].atapi = false;
    assert!(other.ahci.restore(&wrong).is_err());
}

#[test]
fn ports_are_read_from_the_configuration() {
    let dir = TempDir::new("ahci-config");
    let disk = dir.0.join("d.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let path = disk.to_string_lossy().into_owned();
    let mut config = Config::new();
    config.set("pci.0.4.0.port.0.type", "hd");
    config.set("pci.0.4.0.port.0.path", &path);
    config.set("pci.0.4.0.port.0.ser", "ABC");
    config.set("pci.0.4.0.port.0.nmrr", "7200rpm");
    config.set("pci.0.4.0.port.3.type", "cd");
    config.set("pci.0.4.0.port.3.path", &path);
    config.set("pci.0.4.0.port.3.model", "M");
    config.set("pci.0.4.0.port.3.rev", "9");
    let ports = plan_ports(&config, "pci.0.4.0", SLOT).unwrap();
    assert_eq!(ports.len(), 2);
    assert_eq!((ports[0].index, ports[0].atapi), (0, false));
    assert_eq!(ports[0].serial, "ABC");
    assert_eq!(ports[0].rotation_rate, 7200);
    assert_eq!(ports[0].model, "BHYVE SATA DISK");
    assert_eq!((ports[1].index, ports[1].atapi), (3, true));
    assert!(ports[1].serial.starts_with("BHYVE-"));
    assert_eq!(
        (ports[1].model.as_str(), ports[1].revision.as_str()),
        ("M", "9")
    );
    assert!(ports[1].file.info().readonly, "a CD is read-only");
    config.set("pci.0.4.0.port.5.type", "hd");
    config.set("pci.0.4.0.port.5.path", "/nonexistent/disk");
    let e = plan_ports(&config, "pci.0.4.0", SLOT).err().unwrap();
    assert!(e.to_string().contains("/nonexistent/disk"), "{e}");
    assert_eq!(atoi(" -3x"), (-3i16) as u16);
}

#[test]
fn queued_commands_in_many_slots_complete_together() {
    let mut h = hba("ncq-many", |_| {});
    h.start(0);
    let pattern: Vec<u8> = (0..16 * 1024u32).map(|i| (i * 13 % 253) as u8).collect();
    h.memory.write(DATA, &pattern).unwrap();
    // Sixteen 1 KiB queued writes, issued with one PxSACT and one PxCI write.
    for slot in 0..16 {
        let mut f = fis(
            ata::WRITE_FPDMA_QUEUED,
            200 + 2 * slot as u64,
            (slot as u16) << 3,
            2,
        );
        f[3] = 2;
        h.command(
            0,
            slot,
            &f,
            None,
            &[(DATA + slot as u64 * 1024, 1024)],
            true,
        );
    }
    h.set_preg(0, P_SACT, 0xffff);
    h.set_preg(0, P_CI, 0xffff);
    h.wait_clear(0, P_SACT, 0xffff);
    assert_eq!(h.preg(0, P_IS) & P_IX_TFE, 0);
    assert_eq!(h.preg(0, P_CI), 0);
    assert_eq!(&h.host(0)[200 * 512..232 * 512], &pattern[..]);
}

/// Random register accesses and random command structures, with saves and restores between:
/// the controller never panics and the read-only CD image is never written.
#[test]
fn random_guest_input_never_panics() {
    let mut rng = crate::test_rng::Rng(0x5eed_ac1d);
    let mut h = hba("fuzz", |_| {});
    let regs = [
        P_CLB, P_CLBU, P_FB, P_FBU, P_IS, P_IE, P_CMD, P_TFD, P_SIG, P_SCTL, P_SERR, P_SACT, P_CI,
    ];
    for round in 0..3000 {
        match rng.below(6) {
            0 => {
                // Garbage anywhere in the command lists and tables.
                let at = CLB + rng.below(TABLES + 64 * TABLE_SIZE - CLB);
                let bytes: Vec<u8> = (0..rng.below(64) + 1).map(|_| rng.byte()).collect();
                let _ = h.memory.write(at, &bytes);
            }
            1 => {
                // A plausible command with random fields and PRDT.
                let commands = [
                    ata::READ_DMA48,
                    ata::WRITE_DMA48,
                    ata::READ_FPDMA_QUEUED,
                    ata::DATA_SET_MANAGEMENT,
                    ata::SEND_FPDMA_QUEUED,
                    ata::PACKET_CMD,
                    ata::ATA_IDENTIFY,
                    ata::READ_LOG_EXT,
                    ata::FLUSHCACHE,
                    rng.byte(),
                ];
                let mut f = fis(
                    *rng.pick(&commands),
                    rng.next() >> rng.below(64),
                    rng.next() as u16,
                    rng.next() as u16,
                );
                f[1] = if rng.below(8) == 0 { rng.byte() } else { 0x80 };
                f[16] = rng.byte();
                let prdt: Vec<(u64, u32)> = (0..rng.below(4))
                    .map(|_| {
                        let addr = if rng.below(4) == 0 {
                            rng.next()
                        } else {
                            DATA + rng.below(0x10000)
                        };
                        (addr, (rng.below(0x40_0000) as u32).max(1))
                    })
                    .collect();
                let acmd: Vec<u8> = (0..16).map(|_| rng.byte()).collect();
                let port = rng.below(2) as usize;
                let slot = rng.below(32) as usize;
                // Only the data area may be written by the device: the PRDT stays there or
                // outside RAM.
                let prdt: Vec<(u64, u32)> = prdt
                    .into_iter()
                    .map(|(a, l)| {
                        if a < MEMORY {
                            (a, l.min((MEMORY - a) as u32))
                        } else {
                            (a, l)
                        }
                    })
                    .collect();
                h.command(port, slot, &f, Some(&acmd), &prdt, rng.below(2) == 0);
                h.set_preg(port, P_CI, 1 << slot);
            }
            2 => {
                let port = rng.below(3) as usize;
                let value = match rng.below(3) {
                    0 => rng.next() as u32,
                    1 => P_CMD_ST | P_CMD_FRE,
                    _ => 0,
                };
                let reg = *rng.pick(&regs);
                // Keep the command list and FIS areas where the test looks for them, mostly.
                if matches!(reg, P_CLB | P_FB | P_CLBU | P_FBU) && rng.below(4) != 0 {
                    continue;
                }
                h.set_preg(port, reg, value);
            }
            3 => {
                let reg = *rng.pick(&[GHC, IS, CAP, PI]);
                let value = if rng.below(20) == 0 {
                    GHC_HR
                } else {
                    rng.next() as u32 & !GHC_HR
                };
                h.write(reg, value);
            }
            4 => {
                // Odd sizes and offsets, past the registers too.
                let size = *rng.pick(&[1usize, 2, 4, 3, 8]);
                let offset = rng.below(0x2100);
                let mut buf = vec![0u8; size];
                h.ahci.bar_read(&h.config, ABAR, offset, &mut buf);
                let data: Vec<u8> = (0..size).map(|_| rng.byte()).collect();
                h.ahci.bar_write(&h.config, ABAR, offset, &data);
            }
            _ => {
                h.start(rng.below(2) as usize);
            }
        }
        if round % 500 == 0 {
            h.ahci.pause();
            let saved = h.ahci.state();
            h.ahci.restore(&saved).unwrap();
            h.ahci.resume();
        }
    }
    h.ahci.pause();
    h.ahci.resume();
    let cd: Vec<u8> = (0..8 * 2048)
        .map(|i: u32| 0x80 + (i / 2048) as u8)
        .collect();
    assert_eq!(h.host(1), cd, "the CD image is never written");
}

#[cfg(feature = "bhyve_snapshot")]
#[test]
fn device_state_round_trips_through_a_snapshot_section() {
    let mut h = hba("section", |_| {});
    h.start(0);
    h.start(1);
    h.run(0, fis(ata::SET_MULTI, 0, 32, 0), 0, false);
    h.packet(1, &[0xff], 0);
    h.ahci.pause();
    let section = h.ahci.save_device_state().expect("saveable");
    let mut other = hba("section-2", |_| {});
    other.ahci.restore_device_state(&section).unwrap();
    assert_eq!(other.ahci.state(), h.ahci.state());
    assert_eq!(other.ahci.state().ports[1].asc, 0x20);
    assert!(other.ahci.restore_device_state(&section[1..]).is_err());
    h.ahci.resume();
}
