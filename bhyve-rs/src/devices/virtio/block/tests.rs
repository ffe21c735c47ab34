//! virtio-blk through the transport, against a real file checked from the host side.

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

use super::*;
use crate::devices::tests::{block_options, TempDir};
use crate::devices::virtio::tests::{Machine, DATA, RING};

const HEADER: u64 = DATA;
const STATUS: u64 = DATA + 0x100;
const BUFFER: u64 = DATA + 0x1000;

struct Disk {
    _dir: TempDir,
    path: std::path::PathBuf,
    m: Machine,
}

fn disk(tag: &str, edit: impl FnOnce(&mut BlockOptions)) -> Disk {
    let dir = TempDir::new(&format!("vtblk-{tag}"));
    let path = dir.0.join("disk.img");
    let data: Vec<u8> = (0..256 << 10).map(|i: u32| (i / 512) as u8).collect();
    std::fs::write(&path, data).unwrap();
    let mut o = block_options(&path);
    edit(&mut o);
    let file = BlockFile::open(&o).unwrap();
    // The machine's memory is made inside; the backend gets it through a device made there.
    let m = Machine::with_device_factory(
        Box::new(move |memory| {
            let backend = BlockBackend::start(file, memory, "t").unwrap();
            Box::new(VirtioBlock::new(backend, b"SERIAL-1".to_vec()))
        }),
        false,
    );
    Disk { _dir: dir, path, m }
}

impl Disk {
    /// Run one request (header, `data` bytes at BUFFER read or written by the device, status)
    /// and return its status.
    fn request(&mut self, kind: u32, sector: u64, data: u32, device_writes: bool) -> u8 {
        let m = &mut self.m;
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&kind.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        m.memory.write(HEADER, &header).unwrap();
        m.memory.write(STATUS, &[0xaa]).unwrap();
        let data_flags = if device_writes { VRING_DESC_F_WRITE } else { 0 };
        m.descriptor(RING, HEADER, 16, VRING_DESC_F_NEXT, 1);
        if data > 0 {
            m.descriptor(RING + 16, BUFFER, data, data_flags | VRING_DESC_F_NEXT, 2);
            m.descriptor(RING + 32, STATUS, 1, VRING_DESC_F_WRITE, 0);
        } else {
            m.descriptor(RING + 16, STATUS, 1, VRING_DESC_F_WRITE, 0);
        }
        let before = m.used_idx();
        m.submit(0);
        m.wait_used(before.wrapping_add(1));
        let mut status = [0u8; 1];
        m.memory.read(STATUS, &mut status).unwrap();
        status[0]
    }

    fn host(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

#[test]
fn configuration_features_and_identity_as_bhyve() {
    let info = BlockInfo {
        size: 1 << 30,
        sector_size: 512,
        physical_sector_size: 4096,
        physical_sector_offset: 0,
        readonly: false,
        can_delete: true,
        is_device: false,
    };
    let c = config_bytes(&info);
    assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2 << 20);
    assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 126);
    assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
    assert_eq!(c[24], 3, "4096-byte physical sectors: exponent 3");
    assert_eq!(c[32], 0, "write-through, as bhyve reports");
    assert_eq!(u32::from_le_bytes(c[36..40].try_into().unwrap()), 32768);
    assert_eq!(u32::from_le_bytes(c[40..44].try_into().unwrap()), 1);
    assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);

    let cfg = Config::from_pairs(&[("pci.0.4.0.ser", "0123456789abcdefghijKLMN")]);
    assert_eq!(identifier(&cfg, "pci.0.4.0", "/x"), b"0123456789abcdefghij");
    let cfg = Config::from_pairs(&[]);
    // Python's hashlib.md5(b"/vm/disk.img") gives the digest these bytes come from.
    let ident = identifier(&cfg, "pci.0.4.0", "/vm/disk.img");
    assert_eq!(ident, b"BHYVE-FC3C-A324-E502");
}

#[test]
fn write_read_flush_and_identify_through_the_ring() {
    let mut d = disk("rw", |_| {});
    d.m.setup(0);
    let features =
        d.m.read(crate::devices::virtio::VIRTIO_PCI_HOST_FEATURES, 4);
    assert_eq!(
        features,
        (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_TOPOLOGY)
            | (1 << VIRTIO_BLK_F_DISCARD)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    );
    // Capacity through the I/O BAR: 256 KiB = 512 sectors.
    assert_eq!(d.m.read(0x14, 4), 512);

    let pattern: Vec<u8> = (0..2048u32).map(|i| (i * 13 % 251) as u8).collect();
    d.m.memory.write(BUFFER, &pattern).unwrap();
    assert_eq!(d.request(VIRTIO_BLK_T_OUT, 10, 2048, false), 0);
    assert_eq!(&d.host()[5120..7168], &pattern[..]);

    d.m.memory.write(BUFFER, &[0u8; 2048]).unwrap();
    assert_eq!(d.request(VIRTIO_BLK_T_IN, 10, 2048, true), 0);
    let mut back = vec![0u8; 2048];
    d.m.memory.read(BUFFER, &mut back).unwrap();
    assert_eq!(back, pattern);
    // The used length counts the data and the status byte.
    assert_eq!(d.m.used_entry(1), (0, 2049));

    assert_eq!(d.request(VIRTIO_BLK_T_FLUSH, 0, 0, false), 0);

    assert_eq!(d.request(VIRTIO_BLK_T_GET_ID, 0, 20, true), 0);
    let mut id = [0u8; 20];
    d.m.memory.read(BUFFER, &mut id).unwrap();
    assert_eq!(&id[..8], b"SERIAL-1");
    assert!(id[8..].iter().all(|&b| b == 0));

    // Past the end of the disk, and an unknown request type.
    assert_eq!(
        d.request(VIRTIO_BLK_T_IN, 511, 1024, true),
        VIRTIO_BLK_S_IOERR as u8
    );
    assert_eq!(d.request(99, 0, 0, false), VIRTIO_BLK_S_UNSUPP as u8);
    assert_eq!(d.m.read(crate::devices::virtio::VIRTIO_PCI_STATUS, 1), 7);
}

#[test]
fn discard_zeroes_the_range_on_the_host() {
    let mut d = disk("discard", |_| {});
    d.m.setup(0);
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&16u64.to_le_bytes());
    seg[8..12].copy_from_slice(&16u32.to_le_bytes());
    d.m.memory.write(BUFFER, &seg).unwrap();
    let status = d.request(VIRTIO_BLK_T_DISCARD, 0, 16, false);
    let host = d.host();
    if status == VIRTIO_BLK_S_OK as u8 {
        assert!(host[8192..16384].iter().all(|&b| b == 0));
    } else {
        // A host file system without hole punching.
        assert_eq!(status, VIRTIO_BLK_S_UNSUPP as u8);
    }
    assert_eq!(host[16384], 32, "the sector after the range is untouched");
    // Flags are refused.
    seg[12] = 1;
    d.m.memory.write(BUFFER, &seg).unwrap();
    assert_eq!(
        d.request(VIRTIO_BLK_T_DISCARD, 0, 16, false),
        VIRTIO_BLK_S_UNSUPP as u8
    );
}

#[test]
fn a_read_only_disk_refuses_writes_and_offers_no_discard() {
    let mut d = disk("ro", |o| o.readonly = true);
    d.m.setup(0);
    let features =
        d.m.read(crate::devices::virtio::VIRTIO_PCI_HOST_FEATURES, 4);
    assert_eq!(features & (1 << VIRTIO_BLK_F_DISCARD), 0);
    let before = d.host();
    d.m.memory.write(BUFFER, &[0x5a; 512]).unwrap();
    assert_eq!(
        d.request(VIRTIO_BLK_T_OUT, 0, 512, false),
        VIRTIO_BLK_S_IOERR as u8
    );
    assert_eq!(d.host(), before);
    assert_eq!(d.request(VIRTIO_BLK_T_IN, 0, 512, true), 0);
}

#[test]
fn pause_waits_for_every_request_in_flight() {
    let mut d = disk("pause", |_| {});
    d.m.setup(0);
    // 40 writes of 4 KiB made available at once, each its own chain of three descriptors.
    let requests = 40u16;
    for i in 0..requests {
        let base = u64::from(i) * 3;
        let header = HEADER + u64::from(i) * 16;
        let status = DATA + 0x800 + u64::from(i);
        let buffer = 0x80000 + u64::from(i) * 4096;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        h[8..16].copy_from_slice(&(u64::from(i) * 8).to_le_bytes());
        d.m.memory.write(header, &h).unwrap();
        d.m.memory.write(buffer, &[i as u8 + 1; 4096]).unwrap();
        d.m.descriptor(
            RING + 16 * base,
            header,
            16,
            VRING_DESC_F_NEXT,
            (base + 1) as u16,
        );
        d.m.descriptor(
            RING + 16 * (base + 1),
            buffer,
            4096,
            VRING_DESC_F_NEXT,
            (base + 2) as u16,
        );
        d.m.descriptor(RING + 16 * (base + 2), status, 1, VRING_DESC_F_WRITE, 0);
    }
    d.m.submit_many(&(0..requests).map(|i| i * 3).collect::<Vec<_>>());
    {
        let function =
            d.m.root
                .function(crate::devices::virtio::tests::SLOT)
                .unwrap();
        function.lock().unwrap().pause();
        // Nothing is left in flight once pause returns.
        assert_eq!(d.m.used_idx(), requests);
        function.lock().unwrap().resume();
    }
    let host = d.host();
    for i in 0..usize::from(requests) {
        assert!(
            host[i * 4096..(i + 1) * 4096]
                .iter()
                .all(|&b| b == i as u8 + 1),
            "{i}"
        );
    }
}

/// Random guest register accesses and ring contents on virtio-blk: nothing panics, and after
/// a reset the device and its I/O worker still read a sector.
#[test]
fn random_guest_input_never_panics() {
    use crate::devices::virtio_test_driver::Driver;
    use crate::memory::GuestMemory;
    let dir = TempDir::new("vtblk-fuzz");
    let path = dir.0.join("disk.img");
    let data: Vec<u8> = (0..256 << 10).map(|i: u32| (i / 512) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let file = BlockFile::open(&block_options(&path)).unwrap();
    let memory = std::sync::Arc::new(GuestMemory::new(8 << 20).unwrap());
    let backend = BlockBackend::start(file, memory.clone(), "t").unwrap();
    let device = VirtioBlock::new(backend, b"SERIAL-1".to_vec());
    let mut driver = Driver::with_memory(Box::new(device), memory);
    let features = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
    let mut rng = crate::test_rng::Rng(0x5eed_b10c);
    driver.setup(features);
    driver.random_guest_input(&mut || rng.next(), 5000);
    driver.setup(features);
    let mut header = [0u8; 16];
    header[8..16].copy_from_slice(&5u64.to_le_bytes());
    let buffers = driver.post_chain_quietly(0, &[(Some(&header), 0), (None, 512), (None, 1)]);
    driver.write(crate::devices::virtio::VIRTIO_PCI_QUEUE_NOTIFY, 2, 0);
    assert_eq!(driver.used_entries(0, 1), [(0, 513)]);
    assert_eq!(driver.buffer(buffers[2], 1), [VIRTIO_BLK_S_OK as u8]);
    assert_eq!(driver.buffer(buffers[1], 512), [5u8; 512]);
}

/// GET_ID with a chain whose writable buffers add up to far more than the host holds (the
/// identifier's 20 bytes, then 120 buffers of 1 GiB over the same RAM): as bhyve, the first
/// buffer gets the identifier and the rest is left alone, with nothing of the chain's size
/// allocated.
#[test]
fn get_id_with_a_huge_chain_fills_the_first_buffer_only() {
    use crate::devices::virtio_test_driver::Driver;
    use crate::memory::GuestMemory;
    let dir = TempDir::new("vtblk-huge-id");
    let path = dir.0.join("disk.img");
    std::fs::write(&path, vec![0u8; 64 << 10]).unwrap();
    let file = BlockFile::open(&block_options(&path)).unwrap();
    let memory = std::sync::Arc::new(GuestMemory::new(2 << 30).unwrap());
    let backend = BlockBackend::start(file, memory.clone(), "t").unwrap();
    let device = VirtioBlock::new(backend, b"SERIAL-1".to_vec());
    let mut driver = Driver::with_memory(Box::new(device), memory.clone());
    driver.setup(0);
    const HEADER: u64 = 0x40_0000;
    const ID: u64 = 0x40_1000;
    const STATUS: u64 = 0x40_2000;
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&VIRTIO_BLK_T_GET_ID.to_le_bytes());
    memory.write(HEADER, &header).unwrap();
    memory.write(ID, &[0xaa; 24]).unwrap();
    let mut chain = vec![(HEADER, 16, 0), (ID, 20, 2)];
    chain.extend(std::iter::repeat_n((1u64 << 30, 1u32 << 30, 2u16), 120));
    chain.push((STATUS, 1, 2));
    driver.post_descriptors_quietly(0, &chain);
    driver.write(crate::devices::virtio::VIRTIO_PCI_QUEUE_NOTIFY, 2, 0);
    assert_eq!(driver.used_entries(0, 1), [(0, 21)]);
    assert_eq!(driver.buffer(STATUS, 1), [VIRTIO_BLK_S_OK as u8]);
    let mut id = b"SERIAL-1".to_vec();
    id.resize(20, 0);
    id.extend([0xaa; 4]);
    assert_eq!(driver.buffer(ID, 24), id);
}
