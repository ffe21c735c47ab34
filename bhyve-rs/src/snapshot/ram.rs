//! Guest RAM helpers: zero-page detection and the data extents of a sparse file.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;

/// Guest memory moves to and from the file in pieces of at most this size: large enough that
/// the device streams, small enough that several writer threads share the work evenly.
pub const DIRECT_IO_MAX: usize = 8 << 20;

/// Shorter transfers of guest memory go through the page cache even where direct I/O is
/// offered: a few scattered pages (the last pass of a live checkpoint, with the guest stopped)
/// are copied in microseconds and written back after the guest runs again, where a direct
/// write would wait for the device each time.
pub const DIRECT_IO_MIN: usize = 64 << 10;

/// A second open file description of `file` for direct I/O (`O_DIRECT`), for writing or for
/// reading, where the system and file system offer it: guest memory then moves between its own
/// pages and the device, without a copy in the page cache, which on a host with a busy page
/// cache takes several times longer than the device itself (measurements in
/// bhyve_snapshot(5)).
#[cfg(target_os = "linux")]
pub fn open_direct(file: &File, write: bool) -> Option<File> {
    use nix::fcntl::{open, OFlag};
    use std::os::fd::AsRawFd;
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let access = if write {
        OFlag::O_WRONLY
    } else {
        OFlag::O_RDONLY
    };
    open(
        path.as_str(),
        access | OFlag::O_DIRECT | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .ok()
    .map(File::from)
}

#[cfg(not(target_os = "linux"))]
pub fn open_direct(_file: &File, _write: bool) -> Option<File> {
    None
}

/// Read `buf` (whole pages of guest memory) from `file` at `offset`, through `direct` (see
/// [`open_direct`]) in large aligned pieces where given, else through the page cache.
pub fn read_ram_at(
    file: &File,
    direct: Option<&File>,
    buf: &mut [u8],
    offset: u64,
) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let page = 4096;
    let aligned = buf.as_ptr() as usize % page == 0 && offset % page as u64 == 0;
    let Some(direct) = direct.filter(|_| aligned && buf.len() >= DIRECT_IO_MIN) else {
        return file.read_exact_at(buf, offset);
    };
    let mut done = 0;
    for piece in buf.chunks_mut(DIRECT_IO_MAX) {
        let at = offset + done as u64;
        let whole = piece.len() % page == 0;
        let result = if whole {
            direct.read_exact_at(piece, at)
        } else {
            file.read_exact_at(piece, at)
        };
        match result {
            // Stricter alignment than a page: the page cache takes it.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => file.read_exact_at(piece, at)?,
            other => other?,
        }
        done += piece.len();
    }
    Ok(())
}

/// True if every byte of `buf` is zero.
///
/// Works on 256-byte blocks OR-ed together as u128 words so the compiler can vectorise the inner
/// loop, and leaves at the first non-zero block: guest pages that hold data usually differ from
/// zero in their first bytes, so the scan costs little for them.
pub fn is_zero(buf: &[u8]) -> bool {
    const BLOCK: usize = 256;
    let mut blocks = buf.chunks_exact(BLOCK);
    for block in &mut blocks {
        let mut acc = 0u128;
        for word in block.chunks_exact(16) {
            let mut bytes = [0u8; 16];
            bytes.copy_from_slice(word);
            acc |= u128::from_ne_bytes(bytes);
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// Byte ranges `[start, end)` of `file` within `[start, end)` that may hold data; everything
/// else reads as zero. Uses SEEK_DATA/SEEK_HOLE; where the file system cannot tell, the whole
/// range is reported as data.
pub fn data_extents(file: &File, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut extents = Vec::new();
    let mut pos = start;
    while pos < end {
        let data = match seek(file, pos, Whence::Data) {
            Ok(offset) => offset,
            // No data at or after `pos`: the rest is a hole.
            Err(nix::errno::Errno::ENXIO) => break,
            // SEEK_DATA not supported here: treat everything as data.
            Err(nix::errno::Errno::EINVAL) => return Ok(vec![(start, end)]),
            Err(errno) => return Err(io::Error::from(errno)),
        };
        if data >= end {
            break;
        }
        let hole = match seek(file, data, Whence::Hole) {
            Ok(offset) => offset.min(end),
            Err(nix::errno::Errno::ENXIO) => end,
            Err(errno) => return Err(io::Error::from(errno)),
        };
        if hole <= data {
            // A file system that answers inconsistently: fall back to reading everything.
            return Ok(vec![(start, end)]);
        }
        extents.push((data, hole));
        pos = hole;
    }
    Ok(extents)
}

enum Whence {
    Data,
    Hole,
}

fn seek(file: &File, offset: u64, whence: Whence) -> Result<u64, nix::errno::Errno> {
    use nix::unistd::{lseek, Whence as W};
    let offset = i64::try_from(offset).map_err(|_| nix::errno::Errno::EOVERFLOW)?;
    let whence = match whence {
        Whence::Data => W::SeekData,
        Whence::Hole => W::SeekHole,
    };
    let result = lseek(file.as_fd(), offset, whence)?;
    u64::try_from(result).map_err(|_| nix::errno::Errno::EOVERFLOW)
}

/// Sum of the lengths of `extents`.
pub fn extents_len(extents: &[(u64, u64)]) -> u64 {
    extents.iter().map(|(start, end)| end - start).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn zero_pages_are_recognised() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero(&page));
        for at in [0, 15, 16, 255, 256, 2048, 4095] {
            page[at] = 1;
            assert!(!is_zero(&page), "byte {at} set");
            page[at] = 0;
        }
        assert!(is_zero(&[]));
        assert!(!is_zero(&[0, 0, 7]));
    }

    /// GiB/s of `is_zero` over `buf`, page by page, `rounds` times.
    fn scan_rate(buf: &[u8], rounds: usize) -> f64 {
        let start = Instant::now();
        for _ in 0..rounds {
            assert!(buf.chunks(4096).all(is_zero));
        }
        let bytes = rounds as f64 * buf.len() as f64;
        bytes / f64::from(1u32 << 30) / start.elapsed().as_secs_f64()
    }

    #[test]
    fn zero_scan_throughput_is_reported() {
        // Touch the buffers so the scan reads real memory, not the shared zero page.
        let mut cached = vec![1u8; 256 << 10];
        cached.fill(0);
        let mut large = vec![1u8; 64 << 20];
        large.fill(0);
        eprintln!(
            "zero-page scan ({} build): {:.1} GiB/s in cache, {:.1} GiB/s from memory",
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            scan_rate(&cached, 256),
            scan_rate(&large, 4)
        );
    }
}
