//! Behaviour of the snapshot file as a whole: writer and reader together.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::format::{get_u32, header_checksum};
use super::ram::data_extents;
use super::writer::FailPoint;
use super::*;
use crate::test_rng::Rng;

const MIB: usize = 1 << 20;

/// A directory under /tmp removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static SERIAL: AtomicU32 = AtomicU32::new(0);
        let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "bhyve-rs-snapshot-{}-{serial}-{tag}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create test directory");
        TempDir(path)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&self.0)
            .expect("read test directory")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn info() -> HeaderInfo {
    HeaderInfo::this_build(Backend::Kvm)
}

const CONFIG: [(&str, &str); 3] = [
    ("name", "vm1"),
    ("memory.size", "64M"),
    ("pci.0.31.0.device", "lpc"),
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct UartState {
    ier: u8,
    lcr: u8,
    fifo: Vec<u8>,
    divisor: u16,
}

fn uart() -> UartState {
    UartState {
        ier: 0x0f,
        lcr: 0x03,
        fifo: b"login: ".to_vec(),
        divisor: 12,
    }
}

/// Guest memory of `size` bytes with a recognisable non-zero byte in each listed page.
fn guest_ram(size: usize, touched_pages: &[usize]) -> Vec<u8> {
    let mut ram = vec![0u8; size];
    for &page in touched_pages {
        let at = page * 4096;
        for (i, byte) in ram[at..at + 4096].iter_mut().enumerate() {
            *byte = (page as u8) ^ (i as u8) | 1;
        }
    }
    ram
}

/// A small snapshot with every kind of content: config, typed and raw sections of both
/// requirements, a RAM region with data and an all-zero one.
fn write_small(path: &Path) -> (Vec<u8>, Vec<u8>) {
    let low = guest_ram(64 * 1024, &[0, 3, 4, 15]);
    let high = vec![0u8; 16 * 1024];
    let mut writer = SnapshotWriter::create(path, info()).expect("create");
    writer.add_config(CONFIG).expect("config");
    writer
        .add_encoded("uart", "com1", 2, Requirement::Mandatory, &uart())
        .expect("uart");
    writer
        .add_section("vcpu", "0", 1, Requirement::Mandatory, &[1u8; 100])
        .expect("vcpu 0");
    writer
        .add_section("vcpu", "1", 1, Requirement::Mandatory, &[2u8; 100])
        .expect("vcpu 1");
    writer
        .add_section("hint", "", 1, Requirement::Optional, b"optional state")
        .expect("hint");
    writer.add_ram_region(0, &low).expect("low RAM");
    writer.add_ram_region(0x10_0000, &high).expect("high RAM");
    writer.commit().expect("commit");
    (low, high)
}

/// Consume every section `write_small` adds, as a restore that knows them all would.
fn take_known(reader: &SnapshotReader) {
    assert!(reader.take("uart", "com1").is_some());
    assert!(reader.take("vcpu", "0").is_some());
    assert!(reader.take("vcpu", "1").is_some());
}

/// Byte ranges a checksum covers: the header, every data section, the table.
fn covered_ranges(path: &Path) -> Vec<(u64, u64)> {
    let reader = SnapshotReader::open(path).expect("open");
    let header = reader.header();
    let mut ranges = vec![(0, u64::from(header.header_size))];
    ranges.push((
        header.table_offset,
        header.table_offset + u64::from(header.table_count) * u64::from(header.table_entry_size),
    ));
    for section in reader.sections() {
        if section.kind == SectionKind::Data && section.length > 0 {
            ranges.push((section.offset, section.offset + section.length));
        }
    }
    ranges
}

/// Rewrite the header with `patch` applied and its checksum made valid again.
fn patch_header(path: &Path, patch: impl FnOnce(&mut Vec<u8>)) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open for patch");
    let mut header = vec![0u8; 4096];
    file.read_exact_at(&mut header, 0).expect("read header");
    patch(&mut header);
    let size = get_u32(&header, 12) as usize;
    let size = size.clamp(16, 4096);
    header[16..20].fill(0);
    let checksum = header_checksum(&header[..size]);
    header[16..20].copy_from_slice(&checksum.to_le_bytes());
    file.write_all_at(&header, 0).expect("write header");
}

/// Rewrite the section table with `patch` applied and both checksums made valid again.
fn patch_table(path: &Path, patch: impl FnOnce(&mut Vec<u8>)) {
    let (offset, len) = {
        let reader = SnapshotReader::open(path).expect("open");
        let header = reader.header();
        (
            header.table_offset,
            header.table_count as usize * header.table_entry_size as usize,
        )
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open for patch");
    let mut table = vec![0u8; len];
    file.read_exact_at(&mut table, offset).expect("read table");
    patch(&mut table);
    file.write_all_at(&table, offset).expect("write table");
    let checksum = crc32c::crc32c(&table);
    patch_header(path, |h| h[52..56].copy_from_slice(&checksum.to_le_bytes()));
}

/// Copy a file keeping its holes.
fn sparse_copy(from: &Path, to: &Path) {
    let src = File::open(from).expect("open source");
    let len = src.metadata().expect("stat").len();
    let dst = File::create(to).expect("create copy");
    dst.set_len(len).expect("size copy");
    for (start, end) in data_extents(&src, 0, len).expect("extents") {
        let mut buf = vec![0u8; (end - start) as usize];
        src.read_exact_at(&mut buf, start).expect("read");
        dst.write_all_at(&buf, start).expect("write");
    }
}

fn one_line(error: &SnapshotError) -> String {
    let text = error.to_string();
    assert!(!text.is_empty() && !text.contains('\n'), "message {text:?}");
    text
}

#[test]
fn round_trip_preserves_header_config_sections_and_ram() {
    let dir = TempDir::new("round-trip");
    let path = dir.path("vm1.ckp");
    let (low, high) = write_small(&path);

    let reader = SnapshotReader::open(&path).expect("open");
    let header = reader.header();
    assert_eq!((header.major, header.minor), (FORMAT_MAJOR, FORMAT_MINOR));
    assert_eq!(header.arch, Arch::host());
    assert_eq!(header.backend, Backend::Kvm);
    assert_eq!(header.producer_name, "bhyve-rs");
    assert_eq!(header.producer_version, env!("CARGO_PKG_VERSION"));

    let config: Vec<(&str, &str)> = reader
        .config()
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(config, CONFIG);

    let uart_section = reader.take("uart", "com1").expect("uart section");
    assert_eq!(uart_section.version, 2);
    assert_eq!(uart_section.decode::<UartState>().expect("decode"), uart());
    assert_eq!(reader.instances("vcpu"), ["0", "1"]);
    assert_eq!(
        reader.take("vcpu", "1").expect("vcpu 1").payload,
        &[2u8; 100]
    );
    assert_eq!(
        reader.take("vcpu", "0").expect("vcpu 0").payload,
        &[1u8; 100]
    );
    assert!(reader.take("vcpu", "2").is_none());
    reader
        .finish_check_unconsumed()
        .expect("all mandatory taken");

    let regions = reader.ram_regions();
    assert_eq!(regions.len(), 2);
    assert_eq!((regions[0].gpa, regions[0].size), (0, low.len() as u64));
    assert_eq!(
        (regions[1].gpa, regions[1].size),
        (0x10_0000, high.len() as u64)
    );
    for region in regions {
        assert_eq!(region.file_offset % 4096, 0);
    }
    let mut restored = vec![0u8; low.len()];
    let read = reader
        .restore_ram_copy(&regions[0], &mut restored, CopyOptions::default())
        .expect("restore low");
    assert_eq!(restored, low);
    assert!(read < low.len() as u64, "holes were read: {read} bytes");
    let mut restored = vec![0u8; high.len()];
    reader
        .restore_ram_copy(&regions[1], &mut restored, CopyOptions::default())
        .expect("restore high");
    assert_eq!(restored, high);
    reader.verify_ram(&regions[0]).expect("verify low");
    let tree = reader.config_tree();
    assert_eq!(tree.get("memory.size"), Some("64M"));
    assert_eq!(tree.iter().count(), CONFIG.len());
    reader.verify_ram(&regions[1]).expect("verify high");
}

#[test]
fn saving_a_restored_snapshot_gives_the_same_file() {
    let dir = TempDir::new("resave");
    let first = dir.path("first");
    write_small(&first);

    let reader = SnapshotReader::open(&first).expect("open");
    let mut writer = SnapshotWriter::create(&dir.path("second"), info()).expect("create");
    let config: Vec<(&str, &str)> = reader
        .config()
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    writer.add_config(config).expect("config");
    for entry in reader.sections() {
        if entry.kind == SectionKind::Data && entry.name != "config" && entry.name != "ram-index" {
            let section = reader.take(&entry.name, &entry.instance).expect("section");
            let requirement = if entry.mandatory() {
                Requirement::Mandatory
            } else {
                Requirement::Optional
            };
            writer
                .add_section(
                    &entry.name,
                    &entry.instance,
                    section.version,
                    requirement,
                    section.payload,
                )
                .expect("add");
        }
    }
    for region in reader.ram_regions() {
        let mut ram = vec![0u8; region.size as usize];
        reader
            .restore_ram_copy(region, &mut ram, CopyOptions::default())
            .expect("restore");
        writer.add_ram_region(region.gpa, &ram).expect("ram");
    }
    writer.commit().expect("commit");

    let mut a = fs::read(&first).expect("read first");
    let mut b = fs::read(dir.path("second")).expect("read second");
    // Only the creation time and the header checksum that covers it may differ.
    for bytes in [&mut a, &mut b] {
        bytes[16..20].fill(0);
        bytes[56..64].fill(0);
    }
    assert!(a == b, "files differ");
}

#[test]
fn sparse_file_allocates_only_touched_pages() {
    let dir = TempDir::new("sparse");
    let path = dir.path("big");
    let size = 256 * MIB;
    // 8 MiB touched, spread over the region: every 32nd page.
    let touched: Vec<usize> = (0..size / 4096).step_by(32).collect();
    let ram = guest_ram(size, &touched);
    let mut writer = SnapshotWriter::create(&path, info()).expect("create");
    writer.add_config(CONFIG).expect("config");
    let start = Instant::now();
    let stats = writer.add_ram_region(0, &ram).expect("ram");
    writer.commit().expect("commit");
    eprintln!(
        "sparse write: 256 MiB region, 8 MiB touched, {:.1} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(stats.logical, size as u64);
    assert_eq!(stats.written, (touched.len() * 4096) as u64);

    let meta = fs::metadata(&path).expect("stat");
    let allocated = meta.blocks() * 512;
    assert!(meta.len() > size as u64);
    assert!(
        allocated < 16 * MIB as u64,
        "allocated {allocated} bytes for 8 MiB of data"
    );

    let reader = SnapshotReader::open(&path).expect("open");
    let region = &reader.ram_regions()[0];
    let mut restored = vec![0u8; size];
    let start = Instant::now();
    let read = reader
        .restore_ram_copy(region, &mut restored, CopyOptions::default())
        .expect("restore");
    eprintln!(
        "sparse copy restore: read {} MiB in {:.1} ms",
        read >> 20,
        start.elapsed().as_secs_f64() * 1e3
    );
    assert!(read < 16 * MIB as u64);
    assert!(restored == ram, "restored RAM differs");
}

#[test]
fn pages_written_again_leave_the_file_and_its_index_as_the_last_write_saw_them() {
    let dir = TempDir::new("rewrite");
    let path = dir.path("live");
    let size = 6 * MIB;
    let mut ram = guest_ram(size, &[0, 1, 600, 1200]);
    let mut writer = SnapshotWriter::create(&path, info()).expect("create");
    let region = writer
        .begin_ram_region(0x10_0000, size as u64)
        .expect("begin");
    assert_eq!(
        writer
            .write_ram_pages(region, &ram, |_| true)
            .expect("first"),
        4 * 4096
    );
    // Since then: page 1 cleared, page 600 changed, page 900 (a hole so far) and page 1201
    // (same chunk as 1200) written, page 1300 written and cleared again.
    ram[4096..2 * 4096].fill(0);
    ram[600 * 4096 + 17] ^= 0xff;
    let changed = guest_ram(size, &[900, 1201]);
    ram[900 * 4096..901 * 4096].copy_from_slice(&changed[900 * 4096..901 * 4096]);
    ram[1201 * 4096..1202 * 4096].copy_from_slice(&changed[1201 * 4096..1202 * 4096]);
    let dirty = [1, 600, 900, 1201, 1300];
    let written = writer
        .write_ram_pages(region, &ram, |page| dirty.contains(&page))
        .expect("second");
    // Page 1 goes out as zeros over its old data; page 1300 stays a hole.
    assert_eq!(written, 4 * 4096);
    writer.add_config(CONFIG).expect("config");
    writer.commit().expect("commit");

    let reader = SnapshotReader::open(&path).expect("open");
    let region = &reader.ram_regions()[0];
    let mut restored = vec![0u8; size];
    // The copy checks every chunk against the ram-index.
    reader
        .restore_ram_copy(region, &mut restored, CopyOptions::default())
        .expect("restore");
    assert!(restored == ram, "restored RAM differs from the last writes");
    let page = |n: u64| region.file_offset + n * 4096;
    let file = File::open(&path).expect("open");
    let extents = data_extents(&file, page(1300), page(1301)).expect("extents");
    assert!(
        extents.is_empty(),
        "a page that was zero whenever it was written got allocated: {extents:?}"
    );
}

#[test]
fn a_large_region_written_by_several_threads_and_read_back_directly_restores_byte_for_byte() {
    let dir = TempDir::new("parallel");
    let path = dir.path("large");
    // Large enough for several writer threads, with a last chunk shorter than the others;
    // page aligned like guest memory, so the writes can go straight from it to the device.
    let size = 66 * MIB + 3 * 4096;
    let pages = size / 4096;
    let mut ram = memmap2::MmapMut::map_anon(size).expect("anonymous memory");
    let fill = |ram: &mut [u8], page: usize, tag: u8| {
        for (i, byte) in ram[page * 4096..(page + 1) * 4096].iter_mut().enumerate() {
            *byte = (page as u8) ^ (i as u8) ^ tag | 1;
        }
    };
    // A 20 MiB run over the boundaries of chunks and of the threads' ranges, longer than one
    // write; single pages here and there; the very last page.
    let mut touched: Vec<usize> = (3000..3000 + 5120).collect();
    touched.extend([0, 1, 2, 511, 512, 9000, 12_000, 15_000, pages - 1]);
    for &page in &touched {
        fill(&mut ram, page, 0);
    }
    let mut writer = SnapshotWriter::create(&path, info()).expect("create");
    let region = writer.begin_ram_region(0, size as u64).expect("begin");
    let written = writer
        .write_ram_pages(region, &ram, |_| true)
        .expect("first pass");
    assert_eq!(written, (touched.len() * 4096) as u64);
    // Written again: changed, cleared, and newly touched pages in several threads' ranges.
    let again = [1, 4000, 8119, 9000, 14_000, pages - 1];
    fill(&mut ram, 1, 7);
    fill(&mut ram, 4000, 7);
    ram[8119 * 4096..8120 * 4096].fill(0);
    ram[9000 * 4096..9001 * 4096].fill(0);
    fill(&mut ram, 14_000, 7);
    fill(&mut ram, pages - 1, 7);
    writer
        .write_ram_pages(region, &ram, |page| again.contains(&page))
        .expect("second pass");
    writer.add_config(CONFIG).expect("config");
    writer.commit().expect("commit");

    let reader = SnapshotReader::open(&path).expect("open");
    let region = &reader.ram_regions()[0];
    reader
        .verify_ram(region)
        .expect("every chunk checksum matches");
    // Page aligned as guest memory is, so the reads too can bypass the page cache.
    let mut restored = memmap2::MmapMut::map_anon(size).expect("anonymous memory");
    reader
        .restore_ram_copy(region, &mut restored, CopyOptions::default())
        .expect("restore");
    let first_bad = restored
        .chunks(4096)
        .zip(ram.chunks(4096))
        .position(|(a, b)| a != b);
    assert_eq!(first_bad, None, "restored page differs");
    // Pages never written with data stay holes.
    let file = File::open(&path).expect("open");
    let page = |n: usize| region.file_offset + (n * 4096) as u64;
    assert!(data_extents(&file, page(20_000), page(20_001))
        .expect("extents")
        .is_empty());
}

#[test]
fn pages_marked_untouched_are_saved_as_zero_without_being_read() {
    let dir = TempDir::new("populated");
    let path = dir.path("snap");
    let size = 4 * MIB;
    let pages = size / 4096;
    // Data everywhere, but only every 4th page is marked as possibly holding data: the others
    // must be stored as holes, proving they were not read.
    let ram: Vec<u8> = (0..size).map(|i| (i % 251) as u8 | 1).collect();
    let populated: Vec<bool> = (0..pages).map(|p| p % 4 == 0).collect();
    let mut writer = SnapshotWriter::create(&path, info()).expect("create");
    writer.add_config(CONFIG).expect("config");
    let stats = writer
        .add_ram_region_populated(0, &ram, Some(&populated))
        .expect("ram");
    writer.commit().expect("commit");
    assert_eq!(stats.written, (pages / 4 * 4096) as u64);

    let reader = SnapshotReader::open(&path).expect("open");
    let region = &reader.ram_regions()[0];
    // The chunk checksums describe what was stored (zeros for the skipped pages).
    reader
        .verify_ram(region)
        .expect("checksums match the stored pages");
    let mut restored = vec![0u8; size];
    reader
        .restore_ram_copy(region, &mut restored, CopyOptions::default())
        .expect("restore");
    for (page, bytes) in restored.chunks(4096).enumerate() {
        if populated[page] {
            assert_eq!(bytes, &ram[page * 4096..(page + 1) * 4096], "page {page}");
        } else {
            assert!(bytes.iter().all(|&b| b == 0), "page {page} not zero");
        }
    }

    let short = vec![true; pages - 1];
    let mut writer = SnapshotWriter::create(&dir.path("short"), info()).expect("create");
    assert!(writer
        .add_ram_region_populated(0, &ram, Some(&short))
        .is_err());
}

#[test]
fn mapped_restore_returns_saved_bytes_and_does_not_read_the_region() {
    let dir = TempDir::new("mmap");
    let path = dir.path("huge");
    let size = 1024 * MIB;
    // Untouched pages of a fresh allocation read as zero without being backed by memory.
    let mut ram = vec![0u8; size];
    let marks = [0usize, 12_345 * 4096 + 17, size / 2, size - 1];
    for (i, &at) in marks.iter().enumerate() {
        ram[at] = 0xa0 + i as u8;
    }
    let mut writer = SnapshotWriter::create(&path, info()).expect("create");
    writer.add_config(CONFIG).expect("config");
    writer.add_ram_region(0x1_0000_0000, &ram).expect("ram");
    writer.commit().expect("commit");
    drop(ram);

    let reader = SnapshotReader::open(&path).expect("open");
    let region = &reader.ram_regions()[0];
    let start = Instant::now();
    let mut map = reader.map_ram_private(region).expect("map");
    let elapsed = start.elapsed();
    eprintln!(
        "mapped restore of a 1 GiB region: {:.3} ms",
        elapsed.as_secs_f64() * 1e3
    );
    assert_eq!(map.len(), size);
    #[cfg(target_os = "linux")]
    {
        let resident = resident_pages(&map);
        eprintln!("resident pages right after mapping: {resident}");
        assert!(
            resident < 1024,
            "{resident} pages resident before any access"
        );
    }
    for (i, &at) in marks.iter().enumerate() {
        assert_eq!(map[at], 0xa0 + i as u8);
    }
    assert_eq!(map[4096], 0);
    // Guest writes stay private to the mapping.
    map[0] = 0x55;
    drop(map);
    let mut first = [0u8; 1];
    File::open(&path)
        .expect("open")
        .read_exact_at(&mut first, region.file_offset)
        .expect("read");
    assert_eq!(first[0], 0xa0);
}

/// Pages of `map` in memory, from mincore(2).
#[cfg(target_os = "linux")]
fn resident_pages(map: &[u8]) -> usize {
    let pages = map.len().div_ceil(4096);
    let mut vec = vec![0u8; pages];
    // SAFETY: `map` is a live mapping of `map.len()` bytes starting at a page boundary, and
    // `vec` has one byte per page of it, as mincore requires.
    let rc = unsafe {
        libc::mincore(
            map.as_ptr() as *mut libc::c_void,
            map.len(),
            vec.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "mincore failed");
    vec.iter().filter(|&&b| b & 1 != 0).count()
}

#[test]
fn newer_major_is_refused_with_version_message() {
    let dir = TempDir::new("major");
    let path = dir.path("snap");
    write_small(&path);
    patch_header(&path, |h| {
        h[8..10].copy_from_slice(&2u16.to_le_bytes());
        h[10..12].copy_from_slice(&0u16.to_le_bytes());
    });
    let error = SnapshotReader::open(&path).expect_err("refused");
    assert_eq!(
        one_line(&error),
        "snapshot format 2.0 is newer than this bhyve supports (1.x)"
    );
    // Even a newer major with a garbled rest of the header gives the version message.
    patch_header(&path, |h| h[12..16].copy_from_slice(&[0xff; 4]));
    let error = SnapshotReader::open(&path).expect_err("refused");
    assert!(one_line(&error).contains("newer than this bhyve supports"));
}

#[test]
fn newer_minor_with_larger_header_is_accepted() {
    let dir = TempDir::new("minor");
    let path = dir.path("snap");
    write_small(&path);
    patch_header(&path, |h| {
        h[10..12].copy_from_slice(&3u16.to_le_bytes());
        h[12..16].copy_from_slice(&512u32.to_le_bytes());
        // A field this reader does not know, inside the larger header.
        h[300..308].copy_from_slice(b"newfield");
        // An informational flag this reader does not know.
        h[20..24].copy_from_slice(&(1u32 << 30).to_le_bytes());
    });
    let reader = SnapshotReader::open(&path).expect("newer minor accepted");
    assert_eq!((reader.header().major, reader.header().minor), (1, 3));
    assert_eq!(reader.header().header_size, 512);
    take_known(&reader);
    reader.finish_check_unconsumed().expect("consumed");
}

#[test]
fn unknown_incompatible_header_flag_is_refused() {
    let dir = TempDir::new("flags");
    let path = dir.path("snap");
    write_small(&path);
    patch_header(&path, |h| h[20..24].copy_from_slice(&4u32.to_le_bytes()));
    let error = SnapshotReader::open(&path).expect_err("refused");
    assert!(one_line(&error).contains("flags 0x4"), "{error}");
}

#[test]
fn unknown_mandatory_section_is_refused_by_name() {
    let dir = TempDir::new("mandatory");
    let path = dir.path("snap");
    let mut writer = SnapshotWriter::create(&path, info()).expect("create");
    writer.add_config(CONFIG).expect("config");
    writer
        .add_section("vcpu", "0", 1, Requirement::Mandatory, b"regs")
        .expect("vcpu");
    writer
        .add_section("virtio-gpu", "pci.0.5.0", 4, Requirement::Mandatory, b"?")
        .expect("unknown");
    writer.commit().expect("commit");

    let reader = SnapshotReader::open(&path).expect("open");
    assert!(reader.take("vcpu", "0").is_some());
    let error = reader.finish_check_unconsumed().expect_err("refused");
    assert_eq!(
        one_line(&error),
        "snapshot has mandatory section virtio-gpu/pci.0.5.0 (version 4) that this bhyve cannot \
         restore"
    );
}

#[test]
fn unknown_optional_section_is_skipped() {
    let dir = TempDir::new("optional");
    let path = dir.path("snap");
    write_small(&path);
    let reader = SnapshotReader::open(&path).expect("open");
    take_known(&reader);
    // `hint` is optional and never taken.
    reader.finish_check_unconsumed().expect("optional ignored");
}

#[test]
fn section_newer_than_supported_is_refused_by_take_versioned() {
    let dir = TempDir::new("section-version");
    let path = dir.path("snap");
    write_small(&path);
    let reader = SnapshotReader::open(&path).expect("open");
    assert!(reader
        .take_versioned("uart", "com1", 2)
        .expect("v2 ok")
        .is_some());
    let error = reader
        .take_versioned("uart", "com1", 1)
        .expect_err("v2 > v1");
    assert_eq!(
        one_line(&error),
        "section uart/com1 has version 2, newer than this bhyve supports (1)"
    );
}

#[test]
fn decode_refuses_trailing_bytes_and_forged_lengths() {
    let mut payload = encode_section(&uart()).expect("encode");
    assert_eq!(
        decode_section::<UartState>(&payload).expect("decode"),
        uart()
    );
    payload.push(0);
    assert!(decode_section::<UartState>(&payload).is_err());
    // A Vec<u8> claiming 2^60 elements in a few bytes.
    let forged = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0x10];
    assert!(decode_section::<Vec<u8>>(&forged).is_err());
}

#[test]
fn truncation_anywhere_is_an_error_not_a_panic() {
    let dir = TempDir::new("truncate");
    let original = dir.path("snap");
    write_small(&original);
    let work = dir.path("work");
    sparse_copy(&original, &work);
    let full = fs::metadata(&original).expect("stat").len();
    let table_start = SnapshotReader::open(&original)
        .expect("open")
        .header()
        .table_offset;

    // Every byte of the table and the first page, a coarse stride elsewhere; shrinking only.
    let mut cuts: Vec<u64> = (0..4096).chain(table_start..full).collect();
    cuts.extend((4096..table_start).step_by(1021));
    cuts.sort_unstable();
    cuts.dedup();
    let file = OpenOptions::new().write(true).open(&work).expect("open");
    let mut messages = std::collections::BTreeSet::new();
    for &cut in cuts.iter().rev() {
        file.set_len(cut).expect("truncate");
        let error = SnapshotReader::open(&work)
            .err()
            .unwrap_or_else(|| panic!("file cut at {cut} of {full} accepted"));
        messages.insert(one_line(&error).split(':').next().unwrap_or("").to_string());
    }
    eprintln!("{} cuts, error kinds: {messages:?}", cuts.len());
}

#[test]
fn corruption_of_header_table_or_sections_is_detected() {
    let dir = TempDir::new("corrupt");
    let path = dir.path("snap");
    write_small(&path);
    let ranges = covered_ranges(&path);
    let total: u64 = ranges.iter().map(|(s, e)| e - s).sum();
    let pick = |rng: &mut Rng| {
        let mut n = rng.below(total);
        for &(start, end) in &ranges {
            if n < end - start {
                return start + n;
            }
            n -= end - start;
        }
        unreachable!("position within the covered total")
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open");
    let mut rng = Rng(0x5eed_cafe_f00d_0001);
    for round in 0..3000 {
        let count = 1 + rng.below(4) as usize;
        let mut saved = Vec::new();
        for _ in 0..count {
            let at = pick(&mut rng);
            let mut byte = [0u8; 1];
            file.read_exact_at(&mut byte, at).expect("read");
            saved.push((at, byte[0]));
            let flip = 1 + rng.below(255) as u8;
            file.write_all_at(&[byte[0] ^ flip], at).expect("write");
        }
        let result = SnapshotReader::open(&path);
        let changed = saved.iter().any(|&(at, old)| {
            let mut now = [0u8; 1];
            file.read_exact_at(&mut now, at).expect("read");
            now[0] != old
        });
        if changed {
            let error = result
                .err()
                .unwrap_or_else(|| panic!("round {round}: corruption at {saved:?} not detected"));
            one_line(&error);
        }
        for &(at, old) in saved.iter().rev() {
            file.write_all_at(&[old], at).expect("restore byte");
        }
    }
    SnapshotReader::open(&path).expect("original intact after the test");
}

#[test]
fn forged_tables_with_valid_checksums_never_panic() {
    let dir = TempDir::new("forged");
    let original = dir.path("snap");
    write_small(&original);
    let work = dir.path("work");
    let mut rng = Rng(0x0bad_5eed_1234_5678);
    let mut accepted = 0;
    for _ in 0..400 {
        sparse_copy(&original, &work);
        let edits = 1 + rng.below(6);
        let header_edit = rng.below(4) == 0;
        let mut values = Vec::new();
        for _ in 0..edits {
            values.push((rng.next(), rng.next()));
        }
        let interesting = [0u64, 1, 4096, 0x20_0000, u64::MAX, u64::MAX - 4095, 1 << 40];
        patch_table(&work, |table| {
            for &(where_, what) in &values {
                let at = (where_ % table.len() as u64) as usize & !7;
                let value = if what % 3 == 0 {
                    interesting[(what >> 8) as usize % interesting.len()]
                } else {
                    what
                };
                let end = (at + 8).min(table.len());
                table[at..end].copy_from_slice(&value.to_le_bytes()[..end - at]);
            }
        });
        if header_edit {
            let (where_, what) = (rng.next(), rng.next());
            patch_header(&work, |h| {
                let at = 20 + (where_ % 40) as usize;
                h[at..at + 4].copy_from_slice(&(what as u32).to_le_bytes());
            });
        }
        if let Ok(reader) = SnapshotReader::open(&work) {
            accepted += 1;
            for region in reader.ram_regions() {
                assert!(region.file_offset + region.size <= reader.file_len());
                let _ = reader.verify_ram(region);
                let mut buf = vec![0u8; region.size as usize];
                let _ = reader.restore_ram_copy(region, &mut buf, CopyOptions::default());
            }
            let _ = reader.finish_check_unconsumed();
            let _ = inspect(&work);
        }
    }
    eprintln!("forged tables accepted: {accepted} of 400");
}

#[test]
fn ram_corruption_is_detected_by_verification() {
    let dir = TempDir::new("ram-corrupt");
    let path = dir.path("snap");
    write_small(&path);
    let reader = SnapshotReader::open(&path).expect("open");
    let low = reader.ram_regions()[0].clone();
    let high = reader.ram_regions()[1].clone();
    drop(reader);
    let file = OpenOptions::new().write(true).open(&path).expect("open");
    // A flipped byte in a page with data, and data appearing in a hole.
    file.write_all_at(&[0xee], low.file_offset + 3 * 4096 + 100)
        .expect("write");
    file.write_all_at(&[0x01], high.file_offset + 5000)
        .expect("write");

    let reader = SnapshotReader::open(&path).expect("metadata is intact");
    for region in [&low, &high] {
        let error = reader.verify_ram(region).expect_err("verify fails");
        assert!(one_line(&error).contains("checksum mismatch in RAM region"));
        let mut dst = vec![0u8; region.size as usize];
        let error = reader
            .restore_ram_copy(region, &mut dst, CopyOptions::default())
            .expect_err("verified copy fails");
        assert!(one_line(&error).contains(&format!("RAM region {}", region.instance)));
        let unverified = CopyOptions {
            verify: false,
            ..CopyOptions::default()
        };
        reader
            .restore_ram_copy(region, &mut dst, unverified)
            .expect("unverified copy succeeds");
    }
}

#[test]
fn regions_of_another_snapshot_are_refused() {
    let dir = TempDir::new("foreign");
    write_small(&dir.path("small"));
    let mut writer = SnapshotWriter::create(&dir.path("big"), info()).expect("create");
    writer.add_config(CONFIG).expect("config");
    writer
        .add_ram_region(0, &guest_ram(8 * MIB, &[2000]))
        .expect("ram");
    writer.commit().expect("commit");
    let small = SnapshotReader::open(&dir.path("small")).expect("open small");
    let big = SnapshotReader::open(&dir.path("big")).expect("open big");
    let foreign = &big.ram_regions()[0];
    let error = small.map_ram_private(foreign).expect_err("refused");
    assert_eq!(
        one_line(&error),
        "RAM region 0 is not a region of this snapshot"
    );
    assert!(small.verify_ram(foreign).is_err());
    let mut dst = vec![0u8; foreign.size as usize];
    assert!(small
        .restore_ram_copy(foreign, &mut dst, CopyOptions::default())
        .is_err());
}

#[test]
fn reader_can_restore_regions_from_several_threads() {
    fn assert_sync<T: Sync>(_: &T) {}
    let dir = TempDir::new("threads");
    let path = dir.path("snap");
    let (low, high) = write_small(&path);
    let reader = SnapshotReader::open(&path).expect("open");
    assert_sync(&reader);
    let regions = reader.ram_regions();
    let (a, b) = std::thread::scope(|scope| {
        let restore = |region: &RamRegion| -> Vec<u8> {
            let mut dst = vec![0u8; region.size as usize];
            reader
                .restore_ram_copy(region, &mut dst, CopyOptions::default())
                .expect("restore");
            dst
        };
        let a = scope.spawn(move || restore(&regions[0]));
        let b = scope.spawn(move || restore(&regions[1]));
        (a.join().expect("thread"), b.join().expect("thread"))
    });
    assert!(a == low && b == high);
}

#[test]
fn copy_with_zero_holes_clears_old_destination_contents() {
    let dir = TempDir::new("zero-holes");
    let path = dir.path("snap");
    let (low, _) = write_small(&path);
    let reader = SnapshotReader::open(&path).expect("open");
    let region = &reader.ram_regions()[0];
    let mut dst = vec![0xffu8; low.len()];
    let error = reader
        .restore_ram_copy(region, &mut dst, CopyOptions::default())
        .expect_err("dirty destination fails verification");
    one_line(&error);
    let options = CopyOptions {
        verify: true,
        zero_holes: true,
    };
    reader
        .restore_ram_copy(region, &mut dst, options)
        .expect("zeroing copy");
    assert!(dst == low);
}

#[test]
fn failed_commit_leaves_existing_file_untouched_and_no_temporary_file() {
    let dir = TempDir::new("atomic");
    let path = dir.path("vm.ckp");
    fs::write(&path, b"previous snapshot").expect("seed");

    let mut writer = SnapshotWriter::create(&path, info()).expect("create");
    writer.add_config(CONFIG).expect("config");
    writer
        .add_ram_region(0, &guest_ram(64 * 1024, &[1]))
        .expect("ram");
    writer.fail_at = Some(FailPoint::BeforeRename);
    let error = writer.commit().expect_err("injected failure");
    assert!(one_line(&error).contains("injected failure"));
    assert_eq!(fs::read(&path).expect("read"), b"previous snapshot");
    assert_eq!(dir.entries(), ["vm.ckp"]);

    // A commit refused before writing anything behaves the same.
    let writer = SnapshotWriter::create(&path, info()).expect("create");
    let error = writer.commit().expect_err("no config");
    assert_eq!(one_line(&error), "snapshot has no configuration section");
    assert_eq!(fs::read(&path).expect("read"), b"previous snapshot");
    assert_eq!(dir.entries(), ["vm.ckp"]);
}

#[test]
fn abandoned_writer_removes_its_temporary_file() {
    let dir = TempDir::new("abandon");
    // The named temporary file of systems without O_TMPFILE.
    let dir_file = File::open(&dir.0).expect("open directory");
    let mut writer =
        SnapshotWriter::create_in_with(&dir_file, "vm.ckp", info(), false).expect("create");
    writer.add_config(CONFIG).expect("config");
    assert_eq!(
        dir.entries().len(),
        1,
        "temporary file exists while writing"
    );
    assert!(dir.entries()[0].starts_with(".vm.ckp.tmp."));
    drop(writer);
    assert!(dir.entries().is_empty(), "left behind: {:?}", dir.entries());
}

#[test]
fn commit_replaces_existing_file_from_a_directory_descriptor() {
    let dir = TempDir::new("fddir");
    fs::write(dir.path("vm.ckp"), b"old").expect("seed");
    let dir_file = File::open(&dir.0).expect("open directory");
    let mut writer = SnapshotWriter::create_in(&dir_file, "vm.ckp", info()).expect("create");
    writer.add_config(CONFIG).expect("config");
    writer.commit().expect("commit");
    assert_eq!(dir.entries(), ["vm.ckp"]);
    let reader = SnapshotReader::open(&dir.path("vm.ckp")).expect("open new file");
    assert_eq!(reader.config().len(), CONFIG.len());
    assert!(SnapshotWriter::create_in(&dir_file, "../escape", info()).is_err());
}

#[test]
fn writer_refuses_bad_names_regions_and_duplicates() {
    let dir = TempDir::new("refuse");
    let mut writer = SnapshotWriter::create(&dir.path("s"), info()).expect("create");
    assert!(writer
        .add_section("config", "", 1, Requirement::Optional, b"")
        .is_err());
    assert!(writer
        .add_section("bad name", "", 1, Requirement::Optional, b"")
        .is_err());
    writer
        .add_section("lpc", "pci.0.31.0", 1, Requirement::Mandatory, b"x")
        .expect("first");
    assert!(writer
        .add_section("lpc", "pci.0.31.0", 1, Requirement::Mandatory, b"x")
        .is_err());
    assert!(writer.add_ram_region(0, &[0u8; 100]).is_err());
    assert!(writer.add_ram_region(1, &[0u8; 4096]).is_err());
    writer.add_ram_region(0, &[0u8; 8192]).expect("region");
    assert!(
        writer.add_ram_region(4096, &[0u8; 4096]).is_err(),
        "overlap"
    );
}

#[test]
fn bad_magic_is_reported_and_freebsd_checkpoints_are_recognised() {
    let dir = TempDir::new("magic");
    let path = dir.path("vm.ckp");
    fs::write(&path, vec![0u8; 8192]).expect("raw RAM");
    let error = SnapshotReader::open(&path).expect_err("refused");
    assert_eq!(one_line(&error), "not a bhyve-rs snapshot (bad magic)");
    fs::write(dir.path("vm.ckp.meta"), b"{}").expect("meta");
    let error = SnapshotReader::open(&path).expect_err("refused");
    assert!(one_line(&error).contains("FreeBSD bhyve's three-file checkpoint"));
    fs::write(&path, b"").expect("empty");
    let error = SnapshotReader::open(&path).expect_err("refused");
    assert!(one_line(&error).starts_with("truncated snapshot"));
}

#[test]
fn inspect_shows_header_config_sections_and_ram_usage() {
    let dir = TempDir::new("inspect");
    let path = dir.path("vm1.ckp");
    write_small(&path);
    let text = inspect(&path).expect("inspect");
    eprintln!("{text}");
    for expected in [
        "format:       1.0",
        "architecture: x86_64",
        "backend:      kvm",
        &format!("producer:     bhyve-rs {}", env!("CARGO_PKG_VERSION")),
        "memory.size=64M",
        "pci.0.31.0.device=lpc",
        "uart",
        "com1",
        "optional",
        "ram-index",
        "ram regions (2):",
    ] {
        assert!(text.contains(expected), "missing {expected:?}");
    }
    // The low region holds 4 of its 16 pages; the high region none.
    assert!(text.contains("16.0 KiB of 64.0 KiB"), "{text}");
    assert!(text.contains("0 bytes of 16.0 KiB"), "{text}");
    let error = inspect(&dir.path("missing")).expect_err("missing file");
    assert!(error.starts_with("open: "), "{error}");
}

/// Throughput of a dense 256 MiB region; run with
/// `cargo test --release --features bhyve_snapshot --lib snapshot::tests::throughput -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark; prints numbers"]
fn throughput_of_dense_256_mib_region() {
    let dir = TempDir::new("bench");
    let path = dir.path("dense");
    let size = 256 * MIB;
    let ram: Vec<u8> = (0..size).map(|i| (i as u8) | 1).collect();
    let gib = size as f64 / f64::from(1u32 << 30);

    // Guest memory has been touched: scan real zero pages, not the shared zero page.
    let mut zeros = vec![1u8; size];
    zeros.fill(0);
    let start = Instant::now();
    assert!(zeros.chunks(4096).all(is_zero));
    eprintln!(
        "zero scan: {:.1} GiB/s",
        gib / start.elapsed().as_secs_f64()
    );
    drop(zeros);

    let start = Instant::now();
    let mut writer = SnapshotWriter::create(&path, info()).expect("create");
    writer.add_config(CONFIG).expect("config");
    writer.add_ram_region(0, &ram).expect("ram");
    let before_commit = start.elapsed();
    writer.commit().expect("commit");
    let total = start.elapsed();
    eprintln!(
        "write: {:.2} GiB/s to page cache, {:.2} GiB/s including fsync",
        gib / before_commit.as_secs_f64(),
        gib / total.as_secs_f64()
    );

    let reader = SnapshotReader::open(&path).expect("open");
    let region = &reader.ram_regions()[0];
    let unverified = CopyOptions {
        verify: false,
        zero_holes: false,
    };
    let mut dst = vec![0u8; size];
    let start = Instant::now();
    reader
        .restore_ram_copy(region, &mut dst, unverified)
        .expect("copy");
    eprintln!(
        "copy restore into fresh memory (page faults included): {:.2} GiB/s",
        gib / start.elapsed().as_secs_f64()
    );
    let start = Instant::now();
    reader
        .restore_ram_copy(region, &mut dst, unverified)
        .expect("copy");
    eprintln!(
        "copy restore into touched memory: {:.2} GiB/s",
        gib / start.elapsed().as_secs_f64()
    );
    let start = Instant::now();
    reader
        .restore_ram_copy(region, &mut dst, CopyOptions::default())
        .expect("copy");
    eprintln!(
        "verified copy restore: {:.2} GiB/s",
        gib / start.elapsed().as_secs_f64()
    );
    let start = Instant::now();
    reader.verify_ram(region).expect("verify");
    eprintln!(
        "verify_ram: {:.2} GiB/s",
        gib / start.elapsed().as_secs_f64()
    );
    assert!(dst == ram);
}

#[test]
fn resealed_edits_pass_every_checksum_and_read_back_as_edited() {
    let dir = TempDir::new("reseal");
    let path = dir.path("snap");
    write_small(&path);
    let reader = SnapshotReader::open(&path).expect("open");
    let mut entries = reader.sections().to_vec();
    let low = reader.ram_regions()[0].clone();
    drop(reader);
    let mut image = fs::read(&path).expect("read");

    // Move uart/com1 to the end of the file with another value, and change a RAM byte.
    let edited = UartState {
        fifo: b"forged".to_vec(),
        ..uart()
    };
    let payload = encode_section(&edited).expect("encode");
    let moved = entries
        .iter_mut()
        .find(|e| e.name == "uart")
        .expect("uart entry");
    moved.offset = image.len() as u64;
    moved.length = payload.len() as u64;
    image.extend_from_slice(&payload);
    image[(low.file_offset + 3 * 4096 + 7) as usize] ^= 0x40;

    fs::write(&path, &image).expect("write unsealed");
    let reader = SnapshotReader::open(&path).expect("the table is untouched so far");
    let section = reader.take("uart", "com1").expect("uart section");
    assert_eq!(section.decode::<UartState>().expect("decode"), uart());
    let error = reader
        .verify_ram(&low)
        .expect_err("the RAM edit is not sealed yet");
    assert!(one_line(&error).contains("checksum mismatch"));
    drop(reader);

    reseal(&mut image, &entries).expect("reseal");
    fs::write(&path, &image).expect("write sealed");
    let reader = SnapshotReader::open(&path).expect("sealed edit opens");
    let section = reader.take("uart", "com1").expect("uart section");
    assert_eq!(section.decode::<UartState>().expect("decode"), edited);
    let low = reader.ram_regions()[0].clone();
    reader
        .verify_ram(&low)
        .expect("RAM chunk checksums were renewed");

    assert!(reseal(&mut image, &entries[1..]).is_err());
    assert!(reseal(&mut image[..100], &entries).is_err());
}

#[test]
fn payload_errors_are_told_in_words() {
    let short = encode_section(&7u8).expect("encode");
    let err = decode_section::<(u8, String)>(&short)
        .unwrap_err()
        .to_string();
    assert!(err.contains("ends") && err.contains("too early"), "{err}");
    let not_bool = encode_section(&5u8).expect("encode");
    let err = decode_section::<bool>(&not_bool).unwrap_err().to_string();
    assert!(err.contains("not a truth value"), "{err}");
}

/// A device part the snapshot code has never heard of: a counter.
struct CounterPart {
    instance: &'static str,
    version: u32,
    /// Restores from a snapshot written before it existed.
    added_later: bool,
    value: std::sync::Mutex<u64>,
    events: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl CounterPart {
    fn new(
        instance: &'static str,
        value: u64,
        events: &std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    ) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            instance,
            version: 3,
            added_later: false,
            value: std::sync::Mutex::new(value),
            events: events.clone(),
        })
    }
}

impl crate::devices::Stateful for CounterPart {
    fn id(&self) -> crate::devices::StateId {
        crate::devices::StateId {
            section: "counter",
            instance: self.instance.to_string(),
        }
    }

    fn pause(&self) {
        self.events
            .lock()
            .unwrap()
            .push(format!("pause {}", self.instance));
    }

    fn resume(&self) {
        self.events
            .lock()
            .unwrap()
            .push(format!("resume {}", self.instance));
    }
}

impl crate::devices::Persist for CounterPart {
    fn state_version(&self) -> u32 {
        self.version
    }

    fn save(&self) -> Result<Vec<u8>, String> {
        encode_section(&*self.value.lock().unwrap()).map_err(|e| e.to_string())
    }

    fn restore(&self, section: &Section<'_>) -> Result<(), String> {
        *self.value.lock().unwrap() = section.decode().map_err(|e| e.to_string())?;
        Ok(())
    }

    fn accepts_missing_state(&self) -> bool {
        self.added_later
    }
}

#[test]
fn a_new_device_part_is_saved_and_restored_without_the_snapshot_code_naming_it() {
    use crate::devices::{Devices, Stateful};
    use std::sync::{Arc, Mutex};

    let dir = TempDir::new("parts");
    let events = Arc::new(Mutex::new(Vec::new()));
    let parts: Vec<Arc<dyn Stateful>> = vec![
        CounterPart::new("a", 7, &events),
        CounterPart::new("b", 9, &events),
    ];
    let devices = Devices::from_parts(parts);

    let dir_fd = File::open(&dir.0).unwrap();
    let mut writer = SnapshotWriter::create_in(&dir_fd, "parts.snap", info()).unwrap();
    writer.add_config([("name", "vm")]).unwrap();
    crate::machine::checkpoint::add_device_states(&mut writer, &devices).unwrap();
    writer.commit().unwrap();

    let restore = crate::machine::checkpoint::Restore::open(&dir.path("parts.snap")).unwrap();
    let fresh_a = CounterPart::new("a", 0, &events);
    let fresh_b = CounterPart::new("b", 0, &events);
    let fresh = Devices::from_parts(vec![fresh_a.clone(), fresh_b.clone()]);
    restore.restore_device_states(&fresh).unwrap();
    assert_eq!(*fresh_a.value.lock().unwrap(), 7);
    assert_eq!(*fresh_b.value.lock().unwrap(), 9);

    // A part that writes a newer version than the file holds is refused by name; one the file
    // lacks is missing.
    let restore = crate::machine::checkpoint::Restore::open(&dir.path("parts.snap")).unwrap();
    let newer = Arc::new(CounterPart {
        version: 4,
        ..Arc::into_inner(CounterPart::new("a", 0, &events)).unwrap()
    });
    let err = restore
        .restore_device_states(&Devices::from_parts(vec![newer]))
        .unwrap_err();
    assert!(
        err.contains("counter/a") && err.contains("older bhyve"),
        "{err}"
    );
    let restore = crate::machine::checkpoint::Restore::open(&dir.path("parts.snap")).unwrap();
    let err = restore
        .restore_device_states(&Devices::from_parts(vec![CounterPart::new(
            "c", 0, &events,
        )]))
        .unwrap_err();
    assert_eq!(err, "section counter/c is missing");
}

#[test]
fn every_damaged_payload_is_told_in_words_without_type_names() {
    // The case of the report: the marker byte 255 where a 32-bit integer belongs.
    let err = decode_section::<u32>(&[255]).unwrap_err().to_string();
    assert_eq!(
        err,
        "cannot decode section payload: a reserved integer marker where a 32-bit unsigned \
         integer belongs"
    );
    // Every single-byte change and every cut of a real device state: whatever fails, fails
    // in words, never in the decoder's Debug text.
    let payload = encode_section(&uart()).expect("encode");
    let mut damaged: Vec<Vec<u8>> = (0..payload.len()).map(|n| payload[..n].to_vec()).collect();
    for at in 0..payload.len() {
        for byte in [0, 1, 0x7f, 0x80, 0xfb, 0xfc, 0xfd, 0xfe, 0xff] {
            let mut copy = payload.clone();
            copy[at] = byte;
            damaged.push(copy);
        }
    }
    let mut errors = 0;
    for bytes in &damaged {
        if let Err(e) = decode_section::<UartState>(bytes) {
            errors += 1;
            let text = e.to_string();
            assert!(
                !text.contains(['{', '}', '(', ')']) && !text.contains("::"),
                "{bytes:?}: {text}"
            );
        }
    }
    assert!(errors > payload.len(), "only {errors} errors");
}

#[test]
fn verify_reads_every_ram_chunk_and_names_the_first_damage() {
    let dir = TempDir::new("verify");
    let path = dir.path("vm.ckp");
    write_small(&path);
    assert_eq!(
        verify(&path).expect("intact"),
        "intact: 9 sections, 2 RAM regions (80 KiB of guest memory) checked"
    );
    // One byte of guest memory in the page at 0x3000: opening (what a mapped restore and
    // inspect do) does not notice, verify does and names the address.
    let region_offset = {
        let reader = SnapshotReader::open(&path).expect("open");
        reader.ram_regions()[0].file_offset
    };
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&[0xee], region_offset + 0x3000 + 17)
        .unwrap();
    assert!(SnapshotReader::open(&path).is_ok());
    assert!(inspect(&path).is_ok());
    let err = verify(&path).unwrap_err().to_string();
    assert_eq!(
        err,
        "corrupt snapshot: checksum mismatch in RAM region 0 at guest addresses 0x0-0xffff"
    );
    // A damaged data section is named as such.
    write_small(&path);
    let uart = {
        let reader = SnapshotReader::open(&path).expect("open");
        let entry = reader.sections().iter().find(|e| e.name == "uart").cloned();
        entry.expect("uart section").offset
    };
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&[0xff], uart).unwrap();
    let err = verify(&path).unwrap_err().to_string();
    assert_eq!(
        err,
        "corrupt snapshot: checksum mismatch in section uart/com1"
    );
}
