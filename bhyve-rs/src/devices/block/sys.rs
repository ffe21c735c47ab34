//! The host calls of the block backend: vectored I/O into guest memory, the sizes of disk
//! devices, and deallocation (Linux: `fallocate` punch hole and `BLKDISCARD`; FreeBSD:
//! `fspacectl` and `DIOCGDELETE`, as `block_if.c`).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::memory::{GuestMemory, Segment};

/// Read (or write, when `write`) the guest buffers `segments` at `offset` of `file`, to the
/// end: short transfers go on where they stopped, and one that makes no progress is an error.
pub fn transfer(
    file: &File,
    memory: &GuestMemory,
    segments: &[Segment],
    mut offset: u64,
    write: bool,
) -> io::Result<()> {
    // A read writes guest memory behind its back: keep it from moving meanwhile.
    let _writing = (!write).then(|| memory.writing());
    let mut iovecs = Vec::with_capacity(segments.len());
    for s in segments {
        let base = memory
            .host_address(s.addr, s.len)
            .map_err(|_| io::Error::from_raw_os_error(libc::EFAULT))?;
        iovecs.push(libc::iovec {
            iov_base: base.cast(),
            iov_len: s.len as usize,
        });
    }
    let mut first = 0;
    while first < iovecs.len() {
        let batch = &iovecs[first..(first + 1024).min(iovecs.len())];
        let at = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: every iovec points into guest RAM, checked by `host_address` for its whole
        // length; the mappings outlive this call (the caller holds the memory).
        let done = unsafe {
            if write {
                libc::pwritev(file.as_raw_fd(), batch.as_ptr(), batch.len() as i32, at)
            } else {
                libc::preadv(file.as_raw_fd(), batch.as_ptr(), batch.len() as i32, at)
            }
        };
        if done < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if done == 0 {
            // The end of the file (a read) or of the device.
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        offset += done as u64;
        let mut left = done as usize;
        while left > 0 && first < iovecs.len() {
            let v = &mut iovecs[first];
            if left >= v.iov_len {
                left -= v.iov_len;
                first += 1;
            } else {
                // SAFETY: moves inside the same checked buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(left) }.cast();
                v.iov_len -= left;
                left = 0;
            }
        }
    }
    Ok(())
}

/// [`transfer`] through a bounce buffer aligned to 4 KiB, for files opened with `O_DIRECT`
/// when the guest's buffers are not aligned. The guest chooses the length, so the data moves a
/// bounded piece at a time; each piece but the last is a multiple of 4 KiB, which keeps the file
/// offsets as aligned as the request's own.
pub fn bounced(
    file: &File,
    memory: &GuestMemory,
    segments: &[Segment],
    offset: u64,
    write: bool,
) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    const ALIGN: usize = 4096;
    const PIECE: u64 = 1 << 20;
    let total = segments
        .iter()
        .try_fold(0u64, |sum, s| sum.checked_add(s.len))
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut storage = vec![0u8; total.min(PIECE) as usize + ALIGN];
    let start = storage.as_ptr().align_offset(ALIGN);
    let fault = |_| io::Error::from_raw_os_error(libc::EFAULT);
    let mut cursor = SegmentCursor::new(segments);
    let mut done = 0u64;
    while done < total {
        let n = (total - done).min(PIECE) as usize;
        let buffer = &mut storage[start..start + n];
        let at = offset
            .checked_add(done)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        if write {
            cursor.walk(n, |addr, range| {
                memory.read(addr, &mut buffer[range]).map_err(fault)
            })?;
            file.write_all_at(buffer, at)?;
        } else {
            file.read_exact_at(buffer, at)?;
            cursor.walk(n, |addr, range| {
                memory.write(addr, &buffer[range]).map_err(fault)
            })?;
        }
        done += n as u64;
    }
    Ok(())
}

/// A position in a list of guest memory segments, read as one stream of bytes.
struct SegmentCursor<'a> {
    segments: &'a [Segment],
    index: usize,
    within: u64,
}

impl<'a> SegmentCursor<'a> {
    fn new(segments: &'a [Segment]) -> Self {
        SegmentCursor {
            segments,
            index: 0,
            within: 0,
        }
    }

    /// Calls `f` with the guest address and buffer range of each stretch of the next `n` bytes.
    fn walk(
        &mut self,
        n: usize,
        mut f: impl FnMut(u64, std::ops::Range<usize>) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut at = 0;
        while at < n {
            let segment = self
                .segments
                .get(self.index)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
            let take = (segment.len - self.within).min((n - at) as u64) as usize;
            if take > 0 {
                f(segment.addr.wrapping_add(self.within), at..at + take)?;
            }
            at += take;
            self.within += take as u64;
            if self.within == segment.len {
                self.index += 1;
                self.within = 0;
            }
        }
        Ok(())
    }
}

/// What a disk device reports: size in bytes, logical and physical sector sizes, and whether it
/// can deallocate.
pub struct DeviceGeometry {
    pub size: u64,
    pub sector_size: u32,
    pub physical_sector_size: u32,
    pub can_delete: bool,
}

#[cfg(target_os = "linux")]
mod os {
    use super::*;

    /// `_IOR(0x12, 114, size_t)`.
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    /// `_IO(0x12, 119)`.
    const BLKDISCARD: libc::c_ulong = 0x1277;

    pub fn device_geometry(file: &File) -> io::Result<DeviceGeometry> {
        let fd = file.as_raw_fd();
        let mut size: u64 = 0;
        let mut sector: libc::c_int = 0;
        let mut physical: libc::c_uint = 0;
        // SAFETY: each ioctl writes one value of the type given to a local.
        unsafe {
            if libc::ioctl(fd, BLKGETSIZE64 as _, &mut size) < 0
                || libc::ioctl(fd, libc::BLKSSZGET as _, &mut sector) < 0
            {
                return Err(io::Error::last_os_error());
            }
            if libc::ioctl(fd, libc::BLKPBSZGET as _, &mut physical) < 0 {
                physical = 0;
            }
        }
        Ok(DeviceGeometry {
            size,
            sector_size: sector as u32,
            physical_sector_size: physical,
            can_delete: true,
        })
    }

    pub fn delete(file: &File, is_device: bool, offset: u64, len: u64) -> io::Result<()> {
        let fd = file.as_raw_fd();
        // SAFETY: plain syscalls on our descriptor; BLKDISCARD reads two u64 from a local.
        let rc = unsafe {
            if is_device {
                let range = [offset, len];
                libc::ioctl(fd, BLKDISCARD as _, range.as_ptr())
            } else {
                libc::fallocate(
                    fd,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            }
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn flush(file: &File, _is_device: bool) -> io::Result<()> {
        file.sync_all()
    }

    pub const DIRECT: libc::c_int = libc::O_DIRECT;
}

#[cfg(target_os = "freebsd")]
mod os {
    use super::*;

    /// `<sys/disk.h>`: `_IOR('d', 128, u_int)`, `_IOR('d', 129, off_t)`,
    /// `_IOR('d', 139, off_t)`, `_IO('d', 135)`, `_IOW('d', 136, off_t[2])`.
    const DIOCGSECTORSIZE: libc::c_ulong = 0x4004_6480;
    const DIOCGMEDIASIZE: libc::c_ulong = 0x4008_6481;
    const DIOCGSTRIPESIZE: libc::c_ulong = 0x4008_648b;
    const DIOCGFLUSH: libc::c_ulong = 0x2000_6487;
    const DIOCGDELETE: libc::c_ulong = 0x8010_6488;

    pub fn device_geometry(file: &File) -> io::Result<DeviceGeometry> {
        let fd = file.as_raw_fd();
        let mut size: libc::off_t = 0;
        let mut sector: libc::c_uint = 0;
        let mut stripe: libc::off_t = 0;
        // SAFETY: each ioctl writes one value of the type given to a local.
        unsafe {
            if libc::ioctl(fd, DIOCGMEDIASIZE, &mut size) < 0
                || libc::ioctl(fd, DIOCGSECTORSIZE, &mut sector) < 0
            {
                return Err(io::Error::last_os_error());
            }
            if libc::ioctl(fd, DIOCGSTRIPESIZE, &mut stripe) < 0 {
                stripe = 0;
            }
        }
        Ok(DeviceGeometry {
            size: size as u64,
            sector_size: sector,
            physical_sector_size: stripe as u32,
            can_delete: true,
        })
    }

    pub fn delete(file: &File, is_device: bool, offset: u64, len: u64) -> io::Result<()> {
        let fd = file.as_raw_fd();
        // SAFETY: plain syscalls on our descriptor, reading locals of the types they expect.
        let rc = unsafe {
            if is_device {
                let range: [libc::off_t; 2] = [offset as libc::off_t, len as libc::off_t];
                libc::ioctl(fd, DIOCGDELETE, range.as_ptr())
            } else {
                let range = libc::spacectl_range {
                    r_offset: offset as libc::off_t,
                    r_len: len as libc::off_t,
                };
                libc::fspacectl(fd, libc::SPACECTL_DEALLOC, &range, 0, std::ptr::null_mut())
            }
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn flush(file: &File, is_device: bool) -> io::Result<()> {
        if !is_device {
            return file.sync_all();
        }
        // SAFETY: an ioctl without argument on our descriptor.
        if unsafe { libc::ioctl(file.as_raw_fd(), DIOCGFLUSH) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub const DIRECT: libc::c_int = libc::O_DIRECT;
}

pub use os::{delete, device_geometry, flush, DIRECT};
