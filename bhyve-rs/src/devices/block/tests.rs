//! The backend against real files, checked through the host's own view of the file.

use std::os::unix::fs::MetadataExt;
use std::sync::mpsc;
use std::time::Duration;

use super::*;
use crate::devices::tests::{block_options, TempDir};

/// A file of `len` patterned bytes in its own temporary directory.
fn temp_file(name: &str, len: usize) -> (TempDir, std::path::PathBuf) {
    let dir = TempDir::new(&format!("block-{name}"));
    let path = dir.0.join("disk.img");
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 512) as u8).collect();
    std::fs::write(&path, data).unwrap();
    (dir, path)
}

fn backend(options: &BlockOptions) -> (BlockBackend, Arc<GuestMemory>) {
    let memory = Arc::new(GuestMemory::new(1 << 20).unwrap());
    let file = BlockFile::open(options).unwrap();
    (
        BlockBackend::start(file, memory.clone(), "test").unwrap(),
        memory,
    )
}

/// Submit `op` and wait for its outcome.
fn run(backend: &BlockBackend, op: BlockOp) -> BlockResult {
    let (tx, rx) = mpsc::channel();
    backend.submit(BlockRequest {
        op,
        done: Box::new(move |r| tx.send(r).unwrap()),
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap()
}

#[test]
fn options_as_block_if_reads_them() {
    let cfg = Config::from_pairs(&[
        ("pci.0.3.0.path", "/tmp/x.img"),
        ("pci.0.3.0.ro", "true"),
        ("pci.0.3.0.direct", "true"),
        ("pci.0.3.0.sectorsize", "512/4096"),
    ]);
    let o = BlockOptions::from_config(&cfg, "pci.0.3.0").unwrap();
    assert_eq!(o.path, "/tmp/x.img");
    assert!(o.readonly && o.sync && !o.nocache && !o.nodelete);
    assert_eq!(o.sector_size, Some((512, 4096)));
    assert_eq!(parse_sector_size("4096"), Some((4096, 4096)));
    for bad in ["256", "1000", "4096/512", "x", "512/", "512/3000"] {
        assert_eq!(parse_sector_size(bad), None, "{bad}");
    }
    let cfg = Config::from_pairs(&[("pci.0.3.0.sectorsize", "4096/512")]);
    assert!(
        BlockOptions::from_config(&cfg, "pci.0.3.0").is_err(),
        "no path"
    );
    let cfg = Config::from_pairs(&[("pci.0.3.0.path", "a"), ("pci.0.3.0.sectorsize", "1")]);
    let err = BlockOptions::from_config(&cfg, "pci.0.3.0").unwrap_err();
    assert!(err.to_string().contains("sectorsize"), "{err}");
}

#[test]
fn a_missing_file_is_one_clear_line() {
    let err = BlockFile::open(&block_options(std::path::Path::new(
        "/nonexistent/disk.img",
    )))
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("/nonexistent/disk.img"), "{err}");
    assert!(!err.contains('\n'), "{err}");
}

#[test]
fn geometry_of_a_file_and_the_sectorsize_option() {
    let (_dir, path) = temp_file("geometry", 8192);
    let info = BlockFile::open(&block_options(&path)).unwrap().info();
    let blksize = std::fs::metadata(&path).unwrap().blksize() as u32;
    assert_eq!(
        info,
        BlockInfo {
            size: 8192,
            sector_size: 512,
            physical_sector_size: blksize,
            physical_sector_offset: 0,
            readonly: false,
            can_delete: true,
            is_device: false,
        }
    );
    let mut o = block_options(&path);
    o.sector_size = Some((4096, 16384));
    o.nodelete = true;
    let info = BlockFile::open(&o).unwrap().info();
    assert_eq!((info.sector_size, info.physical_sector_size), (4096, 16384));
    assert!(!info.can_delete);
}

#[test]
fn reads_and_writes_move_guest_buffers_to_the_file() {
    let (_dir, path) = temp_file("rw", 64 << 10);
    let (backend, memory) = backend(&block_options(&path));
    // Three buffers, one crossing nothing in particular, written at sector 3.
    let pattern: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    memory.write(0x1000, &pattern[..1000]).unwrap();
    memory.write(0x8000, &pattern[1000..1024]).unwrap();
    memory.write(0x20000, &pattern[1024..]).unwrap();
    let segments = vec![
        Segment {
            addr: 0x1000,
            len: 1000,
        },
        Segment {
            addr: 0x8000,
            len: 24,
        },
        Segment {
            addr: 0x20000,
            len: 1976,
        },
    ];
    run(
        &backend,
        BlockOp::Write {
            offset: 1536,
            segments,
        },
    )
    .unwrap();
    let host = std::fs::read(&path).unwrap();
    assert_eq!(&host[1536..4536], &pattern[..]);
    assert_eq!(host.len(), 64 << 10);
    // And back, into other buffers.
    let segments = vec![
        Segment {
            addr: 0x40000,
            len: 7,
        },
        Segment {
            addr: 0x50000,
            len: 2993,
        },
    ];
    run(
        &backend,
        BlockOp::Read {
            offset: 1536,
            segments,
        },
    )
    .unwrap();
    let mut back = vec![0u8; 3000];
    memory.read(0x40000, &mut back[..7]).unwrap();
    memory.read(0x50000, &mut back[7..]).unwrap();
    assert_eq!(back, pattern);
    run(&backend, BlockOp::Flush).unwrap();
}

#[test]
fn errors_come_back_as_errno_not_crashes() {
    let (_dir, path) = temp_file("errors", 4096);
    let (backend, _memory) = backend(&block_options(&path));
    let past_end = BlockOp::Read {
        offset: 4096,
        segments: vec![Segment { addr: 0, len: 512 }],
    };
    assert_eq!(run(&backend, past_end), Err(libc::EINVAL));
    let outside_ram = BlockOp::Read {
        offset: 0,
        segments: vec![Segment {
            addr: 1 << 20,
            len: 512,
        }],
    };
    assert_eq!(run(&backend, outside_ram), Err(libc::EFAULT));

    let mut o = block_options(&path);
    o.readonly = true;
    let (ro, memory) = self::backend(&o);
    assert!(ro.info().readonly && !ro.info().can_delete);
    memory.write(0, &[0xee; 512]).unwrap();
    let write = BlockOp::Write {
        offset: 0,
        segments: vec![Segment { addr: 0, len: 512 }],
    };
    assert_eq!(run(&ro, write), Err(libc::EROFS));
    let delete = BlockOp::Delete {
        offset: 0,
        len: 512,
    };
    assert_eq!(run(&ro, delete), Err(libc::EOPNOTSUPP));
    assert_ne!(std::fs::read(&path).unwrap()[..512], [0xee; 512]);
}

#[test]
fn delete_punches_a_hole_and_nodelete_refuses() {
    let (_dir, path) = temp_file("delete", 64 << 10);
    let (backend, _memory) = backend(&block_options(&path));
    match run(
        &backend,
        BlockOp::Delete {
            offset: 8192,
            len: 16384,
        },
    ) {
        Ok(()) => {
            let host = std::fs::read(&path).unwrap();
            assert_eq!(host.len(), 64 << 10, "the size stays");
            assert!(host[8192..24576].iter().all(|&b| b == 0));
            assert_ne!(host[8191], 0);
        }
        // A file system without hole punching reports it as unsupported.
        Err(e) => assert_eq!(e, libc::EOPNOTSUPP),
    }
    let mut o = block_options(&path);
    o.nodelete = true;
    let (nodelete, _memory) = self::backend(&o);
    let delete = BlockOp::Delete {
        offset: 0,
        len: 512,
    };
    assert_eq!(run(&nodelete, delete), Err(libc::EOPNOTSUPP));
}

#[test]
fn pause_completes_every_request_and_holds_new_ones() {
    let (_dir, path) = temp_file("pause", 1 << 20);
    let (backend, _memory) = backend(&block_options(&path));
    let (tx, rx) = mpsc::channel();
    for i in 0..200u64 {
        let tx = tx.clone();
        backend.submit(BlockRequest {
            op: BlockOp::Read {
                offset: (i % 64) * 4096,
                segments: vec![Segment {
                    addr: i * 4096,
                    len: 4096,
                }],
            },
            done: Box::new(move |r| tx.send((i, r)).unwrap()),
        });
    }
    backend.pause();
    let done: Vec<_> = rx.try_iter().collect();
    assert_eq!(
        done.len(),
        200,
        "every request completed before pause returned"
    );
    assert!(done.iter().all(|(_, r)| r.is_ok()));
    // Submitted while paused: held until resume.
    let tx2 = tx.clone();
    backend.submit(BlockRequest {
        op: BlockOp::Flush,
        done: Box::new(move |r| tx2.send((1000, r)).unwrap()),
    });
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    backend.resume();
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        (1000, Ok(()))
    );
}

#[test]
fn nocache_moves_unaligned_guest_buffers_too() {
    let (_dir, path) = temp_file("nocache", 64 << 10);
    let mut o = block_options(&path);
    o.nocache = true;
    let (backend, memory) = match BlockFile::open(&o) {
        Ok(file) => {
            let memory = Arc::new(GuestMemory::new(1 << 20).unwrap());
            (
                BlockBackend::start(file, memory.clone(), "t").unwrap(),
                memory,
            )
        }
        // A file system without O_DIRECT (tmpfs) refuses the open: nothing more to check.
        Err(e) => {
            eprintln!("O_DIRECT not available here: {e}");
            return;
        }
    };
    // Buffers at odd addresses, as a guest may hand them.
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i % 253) as u8).collect();
    memory.write(0x1003, &pattern[..512]).unwrap();
    memory.write(0x3011, &pattern[512..]).unwrap();
    let segments = vec![
        Segment {
            addr: 0x1003,
            len: 512,
        },
        Segment {
            addr: 0x3011,
            len: 512,
        },
    ];
    run(
        &backend,
        BlockOp::Write {
            offset: 4096,
            segments,
        },
    )
    .unwrap();
    assert_eq!(&std::fs::read(&path).unwrap()[4096..5120], &pattern[..]);
    let segments = vec![Segment {
        addr: 0x5005,
        len: 1024,
    }];
    run(
        &backend,
        BlockOp::Read {
            offset: 4096,
            segments,
        },
    )
    .unwrap();
    let mut back = vec![0u8; 1024];
    memory.read(0x5005, &mut back).unwrap();
    assert_eq!(back, pattern);
}

/// A loop device over a file: a real block device, sized and accessed through its ioctls.
/// Needs root and losetup; skipped with a message otherwise.
#[cfg(target_os = "linux")]
#[test]
fn a_block_device_reports_its_geometry_and_moves_data() {
    struct Loop(String);
    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .status();
        }
    }
    let (_dir, path) = temp_file("loop", 1 << 20);
    let attach = std::process::Command::new("losetup")
        .args(["--find", "--show", "--sector-size", "4096"])
        .arg(&path)
        .output();
    let device = match attach {
        Ok(out) if out.status.success() => {
            Loop(String::from_utf8_lossy(&out.stdout).trim().to_string())
        }
        _ => {
            eprintln!("skipping: cannot attach a loop device (needs root and losetup)");
            return;
        }
    };
    let o = block_options(std::path::Path::new(&device.0));
    let file = BlockFile::open(&o).unwrap();
    let info = file.info();
    assert!(info.is_device);
    assert_eq!(info.size, 1 << 20);
    assert_eq!(info.sector_size, 4096);
    // sectorsize below the device's own is refused, as block_if does.
    let mut small = o.clone();
    small.sector_size = Some((512, 512));
    let err = BlockFile::open(&small).err().unwrap().to_string();
    assert!(err.contains("incompatible"), "{err}");

    let memory = Arc::new(GuestMemory::new(1 << 20).unwrap());
    let backend = BlockBackend::start(file, memory.clone(), "loop").unwrap();
    memory.write(0x2000, &[0x3c; 8192]).unwrap();
    let segments = vec![Segment {
        addr: 0x2000,
        len: 8192,
    }];
    run(
        &backend,
        BlockOp::Write {
            offset: 8192,
            segments,
        },
    )
    .unwrap();
    run(&backend, BlockOp::Flush).unwrap();
    assert!(std::fs::read(&path).unwrap()[8192..16384]
        .iter()
        .all(|&b| b == 0x3c));
    match run(
        &backend,
        BlockOp::Delete {
            offset: 8192,
            len: 4096,
        },
    ) {
        Ok(()) => {}
        Err(e) => assert_eq!(e, libc::EOPNOTSUPP, "discard of a loop device"),
    }
}

/// With `nocache`, unaligned requests larger than the bounce piece move piece by piece, and a
/// guest-made length far beyond guest RAM fails the request instead of allocating its size.
#[test]
fn nocache_bounces_long_unaligned_requests_a_piece_at_a_time() {
    let (_dir, path) = temp_file("nocache-long", 8 << 20);
    let mut o = block_options(&path);
    o.nocache = true;
    let (backend, memory) = match BlockFile::open(&o) {
        Ok(file) => {
            let memory = Arc::new(GuestMemory::new(16 << 20).unwrap());
            (
                BlockBackend::start(file, memory.clone(), "t").unwrap(),
                memory,
            )
        }
        Err(e) => {
            eprintln!("O_DIRECT not available here: {e}");
            return;
        }
    };
    let lens = [(3 << 20) + 512, 1536, (1 << 20) - 2048];
    let addrs = [0x1003, 0x50_0001, 0x60_0007];
    let total: usize = lens.iter().sum();
    let pattern: Vec<u8> = (0..total as u32).map(|i| (i % 251) as u8).collect();
    let mut at = 0;
    let segments: Vec<Segment> = addrs
        .iter()
        .zip(lens)
        .map(|(&addr, len)| {
            memory.write(addr, &pattern[at..at + len]).unwrap();
            at += len;
            Segment {
                addr,
                len: len as u64,
            }
        })
        .collect();
    run(
        &backend,
        BlockOp::Write {
            offset: 512,
            segments,
        },
    )
    .unwrap();
    assert!(std::fs::read(&path).unwrap()[512..512 + total] == pattern[..]);
    let segments = vec![Segment {
        addr: 0x80_0005,
        len: total as u64,
    }];
    run(
        &backend,
        BlockOp::Read {
            offset: 512,
            segments,
        },
    )
    .unwrap();
    let mut back = vec![0u8; total];
    memory.read(0x80_0005, &mut back).unwrap();
    assert!(back == pattern);
    // The backend refuses requests past the disk's end; the bounce path must not trust the
    // length either.
    let huge = [Segment {
        addr: 0x1001,
        len: 1 << 40,
    }];
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    assert!(super::sys::bounced(&file, &memory, &huge, 0, true).is_err());
}

/// The configuration of a virtio-blk disk at slot 3, AHCI ports at slot 4 (the second with a
/// serial of its own) and an NVMe namespace at slot 5, all on `disk`.
fn disks_on(disk: &str) -> Config {
    let mut config = Config::new();
    for (key, value) in [
        ("pci.0.3.0.device", "virtio-blk"),
        ("pci.0.3.0.path", disk),
        ("pci.0.4.0.device", "ahci"),
        ("pci.0.4.0.port.0.type", "hd"),
        ("pci.0.4.0.port.0.path", disk),
        ("pci.0.4.0.port.1.type", "hd"),
        ("pci.0.4.0.port.1.path", disk),
        ("pci.0.4.0.port.1.ser", "MYDISK"),
        ("pci.0.5.0.device", "nvme"),
        ("pci.0.5.0.path", disk),
    ] {
        config.set(key, value);
    }
    config
}

#[test]
fn restored_disks_keep_the_serial_the_guest_saw() {
    // BHYVE- and the MD5 of "/vm/disk.img" (Python's hashlib, as in the virtio-blk tests).
    let derived = "BHYVE-FC3C-A324-E502";
    assert_eq!(serial_from_path("/vm/disk.img"), derived);
    let (mut saved, mut given) = (disks_on("/vm/disk.img"), disks_on("/copy/disk.img"));
    keep_disk_serials(&mut saved, &mut given);
    for config in [&saved, &given] {
        assert_eq!(config.get("pci.0.3.0.ser"), Some(derived));
        assert_eq!(config.get("pci.0.4.0.port.0.ser"), Some(derived));
        assert_eq!(config.get("pci.0.4.0.port.1.ser"), Some("MYDISK"));
        // NVMe's serial does not come from the path.
        assert_eq!(config.get("pci.0.5.0.ser"), None);
    }
    assert_eq!(given.get("pci.0.3.0.path"), Some("/copy/disk.img"));
    // A serial on the command line stays, to be compared with the one the guest saw.
    let mut saved = disks_on("/vm/disk.img");
    let mut given = disks_on("/copy/disk.img");
    given.set("pci.0.3.0.ser", "OTHER");
    given.set("pci.0.4.0.port.0.ser", derived);
    keep_disk_serials(&mut saved, &mut given);
    assert_eq!(given.get("pci.0.3.0.ser"), Some("OTHER"));
    assert_eq!(saved.get("pci.0.3.0.ser"), Some(derived));
    assert_eq!(saved.get("pci.0.4.0.port.0.ser"), Some(derived));
    // The restored machine's own snapshot restores again with the same command line.
    let mut again = given.clone();
    again.set("pci.0.3.0.ser", derived);
    let mut same_line = disks_on("/copy/disk.img");
    keep_disk_serials(&mut again, &mut same_line);
    assert_eq!(same_line.get("pci.0.3.0.ser"), Some(derived));
    // A disk that did not move keeps its configuration as it was.
    let (mut saved, mut given) = (disks_on("/vm/disk.img"), disks_on("/vm/disk.img"));
    keep_disk_serials(&mut saved, &mut given);
    assert_eq!(saved, disks_on("/vm/disk.img"));
    assert_eq!(given, disks_on("/vm/disk.img"));
    // A command line without the disks (`-o rundir=` alone) gets none.
    let (mut saved, mut given) = (disks_on("/vm/disk.img"), Config::new());
    keep_disk_serials(&mut saved, &mut given);
    assert_eq!(given.iter().count(), 0);
    // AHCI reads no `serial`: a port given one is still named after its path.
    let mut saved = disks_on("/vm/disk.img");
    saved.set("pci.0.4.0.port.0.serial", "IGNORED");
    let mut given = disks_on("/copy/disk.img");
    given.set("pci.0.4.0.port.0.serial", "IGNORED");
    keep_disk_serials(&mut saved, &mut given);
    assert_eq!(given.get("pci.0.4.0.port.0.ser"), Some(derived));
    // virtio-blk's other spelling, `serial`, is kept as it was written.
    let mut saved = disks_on("/vm/disk.img");
    saved.set("pci.0.3.0.serial", "SPELLED");
    let mut given = disks_on("/vm/disk.img");
    keep_disk_serials(&mut saved, &mut given);
    assert_eq!(given.get("pci.0.3.0.serial"), Some("SPELLED"));
    assert_eq!(saved.get("pci.0.3.0.ser"), None);
}
