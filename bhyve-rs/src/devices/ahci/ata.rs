//! ATA and ATAPI constants (FreeBSD's `sys/ata.h`) and the IDENTIFY data bhyve's
//! `ata_identify_init` builds.

use crate::devices::block::BlockInfo;

// Status register bits.
pub const S_ERROR: u32 = 0x01;
pub const S_DRQ: u32 = 0x08;
pub const S_DSC: u32 = 0x10;
pub const S_DMA: u32 = 0x20;
pub const S_READY: u32 = 0x40;
pub const S_BUSY: u32 = 0x80;
/// Error register: command aborted.
pub const E_ABORT: u32 = 0x04;
/// ATAPI sense key: illegal request.
pub const SENSE_ILLEGAL_REQUEST: u8 = 0x05;
/// ATAPI interrupt reason: command, to host.
pub const I_CMD: u8 = 0x01;
pub const I_IN: u8 = 0x02;

/// The status of a command that ended well.
pub const OK: u32 = S_READY | S_DSC;
/// The status of a command the device refused.
pub const ABORTED: u32 = (E_ABORT << 8) | S_READY | S_ERROR;

// SStatus / SControl.
pub const SS_DET_PHY_ONLINE: u32 = 0x03;
pub const SS_SPD_GEN3: u32 = 0x30;
pub const SS_IPM_ACTIVE: u32 = 0x100;
pub const SC_SPD_MASK: u32 = 0xf0;
pub const SC_DET_RESET: u32 = 0x01;

// Commands.
pub const NOP: u8 = 0x00;
pub const DATA_SET_MANAGEMENT: u8 = 0x06;
pub const DSM_TRIM: u8 = 0x01;
pub const READ: u8 = 0x20;
pub const READ48: u8 = 0x24;
pub const READ_DMA48: u8 = 0x25;
pub const READ_MUL48: u8 = 0x29;
pub const READ_LOG_EXT: u8 = 0x2f;
pub const WRITE: u8 = 0x30;
pub const WRITE48: u8 = 0x34;
pub const WRITE_DMA48: u8 = 0x35;
pub const WRITE_MUL48: u8 = 0x39;
pub const READ_VERIFY: u8 = 0x40;
pub const READ_VERIFY48: u8 = 0x42;
pub const READ_LOG_DMA_EXT: u8 = 0x47;
pub const READ_FPDMA_QUEUED: u8 = 0x60;
pub const WRITE_FPDMA_QUEUED: u8 = 0x61;
pub const SEND_FPDMA_QUEUED: u8 = 0x64;
pub const SFPDMA_DSM: u8 = 0x00;
pub const PACKET_CMD: u8 = 0xa0;
pub const ATAPI_IDENTIFY: u8 = 0xa1;
pub const SMART_CMD: u8 = 0xb0;
pub const READ_MUL: u8 = 0xc4;
pub const WRITE_MUL: u8 = 0xc5;
pub const SET_MULTI: u8 = 0xc6;
pub const READ_DMA: u8 = 0xc8;
pub const WRITE_DMA: u8 = 0xca;
pub const STANDBY_IMMEDIATE: u8 = 0xe0;
pub const IDLE_IMMEDIATE: u8 = 0xe1;
pub const STANDBY_CMD: u8 = 0xe2;
pub const IDLE_CMD: u8 = 0xe3;
pub const CHECK_POWER_MODE: u8 = 0xe5;
pub const SLEEP: u8 = 0xe6;
pub const FLUSHCACHE: u8 = 0xe7;
pub const FLUSHCACHE48: u8 = 0xea;
pub const ATA_IDENTIFY: u8 = 0xec;
pub const SETFEATURES: u8 = 0xef;
pub const SECURITY_FREEZE_LOCK: u8 = 0xf5;

// SET FEATURES subcommands.
pub const SF_ENAB_WCACHE: u8 = 0x02;
pub const SF_SETXFER: u8 = 0x03;
pub const SF_ENAB_SATA_SF: u8 = 0x10;
pub const SF_DIS_RCACHE: u8 = 0x55;
pub const SF_DIS_WCACHE: u8 = 0x82;
pub const SF_ENAB_RCACHE: u8 = 0xaa;
pub const SATA_SF_AN: u8 = 0x05;

// Transfer modes.
pub const WDMA0: u8 = 0x20;
pub const UDMA0: u8 = 0x40;
pub const UDMA6: u8 = 0x46;

// SCSI (ATAPI) opcodes.
pub const TEST_UNIT_READY: u8 = 0x00;
pub const REQUEST_SENSE: u8 = 0x03;
pub const INQUIRY: u8 = 0x12;
pub const START_STOP_UNIT: u8 = 0x1b;
pub const PREVENT_ALLOW: u8 = 0x1e;
pub const READ_CAPACITY: u8 = 0x25;
pub const READ_10: u8 = 0x28;
pub const READ_TOC: u8 = 0x43;
pub const GET_EVENT_STATUS_NOTIFICATION: u8 = 0x4a;
pub const MODE_SENSE_10: u8 = 0x5a;
pub const REPORT_LUNS: u8 = 0xa0;
pub const READ_12: u8 = 0xa8;
pub const MODEPAGE_RW_ERROR_RECOVERY: u8 = 0x01;
pub const MODEPAGE_CD_CAPABILITIES: u8 = 0x2a;

/// CD sector size.
pub const CD_SECTOR: u64 = 2048;

/// Words of IDENTIFY (`struct ata_params`).
pub const IDENTIFY_WORDS: usize = 256;

/// What one port's IDENTIFY says beyond the disk itself.
pub struct IdentityStrings<'a> {
    pub serial: &'a str,
    pub revision: &'a str,
    pub model: &'a str,
    pub rotation_rate: u16,
}

/// `ata_string`: ASCII padded with spaces, bytes swapped within each word.
fn put_string(words: &mut [u16], first_word: usize, len: usize, text: &str) {
    let mut bytes = text.bytes();
    for i in 0..len {
        let b = bytes.next().unwrap_or(b' ');
        let at = i ^ 1;
        let w = &mut words[first_word + at / 2];
        if at % 2 == 0 {
            *w = (*w & 0xff00) | u16::from(b);
        } else {
            *w = (*w & 0x00ff) | (u16::from(b) << 8);
        }
    }
}

/// CHS geometry as block_if.c's `blockif_chs` derives it from the size.
pub fn chs(size: u64, sector_size: u32) -> (u16, u8, u8) {
    let mut sectors = size / u64::from(sector_size.max(1));
    sectors = sectors.min(65535 * 16 * 255);
    let (secpt, heads, hcyl);
    if sectors >= 65536 * 16 * 63 {
        secpt = 255;
        heads = 16;
        hcyl = sectors / secpt;
    } else {
        let mut s = 17;
        let mut c = sectors / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = sectors / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = sectors / s;
        }
        secpt = s;
        heads = h;
        hcyl = c;
    }
    ((hcyl / heads) as u16, heads as u8, secpt as u8)
}

/// The IDENTIFY (DEVICE or PACKET DEVICE) words of a port, checksum included. bhyve builds
/// them once, before the port's first reset: no transfer mode selected, multiple-sector
/// count 0 and link speed 0, whatever SET FEATURES and SET MULTIPLE later change.
pub fn identify(
    atapi: bool,
    info: &BlockInfo,
    strings: &IdentityStrings<'_>,
) -> [u16; IDENTIFY_WORDS] {
    let mut w = [0u16; IDENTIFY_WORDS];
    put_string(&mut w, 10, 20, strings.serial);
    put_string(&mut w, 23, 8, strings.revision);
    put_string(&mut w, 27, 40, strings.model);
    w[217] = strings.rotation_rate;
    w[63] = 0x7;
    w[64] = 0x3;
    w[65] = 0x78;
    w[66] = 0x78;
    w[67] = 0x78;
    w[68] = 0x78;
    w[80] = 0x3f0;
    w[84] = 1 << 14;
    w[87] = 1 << 14;
    w[88] = 0x7f;
    w[222] = 0x1020;
    if atapi {
        // Packet protocol, CD-ROM, removable, DRQ fast.
        w[0] = 0x8000 | 0x0500 | 0x0080 | 0x0040;
        w[49] = 0x0200 | 0x0100;
        w[50] = (1 << 14) | 1;
        w[53] = 0x0002 | 0x0004;
        w[62] = 0x3f;
        w[76] = 0x0002 | 0x0004 | 0x0008;
        w[78] = 0x0010;
        // Power management, packet, device reset, NOP.
        w[82] = 0x0008 | 0x0010 | 0x0200 | 0x4000;
        w[83] = 1 << 14;
        w[85] = w[82];
    } else {
        let sector_size = info.sector_size.max(1);
        let sectors = info.size / u64::from(sector_size);
        let (cyl, heads, sech) = chs(info.size, sector_size);
        w[0] = 0x0040;
        w[1] = cyl;
        w[3] = u16::from(heads);
        w[6] = u16::from(sech);
        w[47] = 0x8000 | 128;
        // DMA, LBA, IORDY.
        w[49] = 0x0100 | 0x0200 | 0x0800;
        w[50] = 1 << 14;
        w[53] = 0x0002 | 0x0004;
        if sectors <= 0x0fff_ffff {
            w[60] = sectors as u16;
            w[61] = (sectors >> 16) as u16;
        } else {
            w[60] = 0xffff;
            w[61] = 0x0fff;
        }
        w[75] = 31;
        // SATA generations 1-3 and NCQ; receive/send FPDMA queued.
        w[76] = 0x0002 | 0x0004 | 0x0008 | 0x0100;
        w[77] = 0x0040;
        w[81] = 0x28;
        // Power management, write cache, look-ahead, NOP.
        w[82] = 0x0008 | 0x0020 | 0x0040 | 0x4000;
        // 48-bit addresses, FLUSH CACHE (EXT).
        w[83] = 0x0400 | 0x1000 | 0x2000 | (1 << 14);
        w[85] = w[82];
        w[86] = 0x0400 | 0x1000 | 0x2000 | (1 << 15);
        w[100] = sectors as u16;
        w[101] = (sectors >> 16) as u16;
        w[102] = (sectors >> 32) as u16;
        w[103] = (sectors >> 48) as u16;
        if info.can_delete && !info.readonly {
            // Deterministic zeroes after TRIM; one block of ranges; TRIM.
            w[69] |= 0x0020 | 0x4000;
            w[105] = 1;
            w[169] = 0x0001;
        }
        w[106] = 0x4000;
        w[209] = 0x4000;
        let physical = info.physical_sector_size;
        if physical > sector_size {
            w[106] |= 0x2000;
            w[106] |= (physical / sector_size).trailing_zeros() as u16;
            w[209] |= (info.physical_sector_offset / sector_size) as u16;
        }
        if sector_size > 512 {
            w[106] |= 0x1000;
            w[117] = (sector_size / 2) as u16;
            w[118] = ((sector_size / 2) >> 16) as u16;
        }
        // READ/WRITE LOG DMA EXT.
        w[119] = 0x0008 | (1 << 14);
        w[120] = 0x0008 | (1 << 14);
    }
    w[255] = 0x00a5;
    let bytes = words_to_bytes(&w);
    let sum = bytes[..511].iter().fold(0u8, |a, b| a.wrapping_add(*b));
    w[255] = 0x00a5 | (u16::from(0u8.wrapping_sub(sum)) << 8);
    w
}

pub fn words_to_bytes(words: &[u16; IDENTIFY_WORDS]) -> [u8; IDENTIFY_WORDS * 2] {
    let mut b = [0u8; IDENTIFY_WORDS * 2];
    for (i, w) in words.iter().enumerate() {
        b[2 * i..2 * i + 2].copy_from_slice(&w.to_le_bytes());
    }
    b
}

/// `lba_to_msf`: minutes, seconds, frames of a CD address (150 frames of lead-in).
pub fn lba_to_msf(lba: u64) -> [u8; 3] {
    let lba = lba + 150;
    [
        ((lba / 75) / 60) as u8,
        ((lba / 75) % 60) as u8,
        (lba % 75) as u8,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_byte_swapped_and_padded() {
        let mut w = [0u16; IDENTIFY_WORDS];
        put_string(&mut w, 10, 4, "ABC");
        assert_eq!(w[10], u16::from_le_bytes([b'B', b'A']));
        assert_eq!(w[11], u16::from_le_bytes([b' ', b'C']));
    }

    #[test]
    fn geometry_matches_block_if() {
        // 1 MiB: 2048 sectors, 17 sectors a track, 4 heads.
        assert_eq!(chs(1 << 20, 512), (30, 4, 17));
        // 8 GiB: 63 sectors a track, 16 heads.
        assert_eq!(chs(8 << 30, 512), (16644, 16, 63));
        // 64 GiB is beyond 16 heads of 63 sectors a track: 255 sectors a track.
        assert_eq!(chs(64 << 30, 512), (32896, 16, 255));
    }

    #[test]
    fn identify_checksum_sums_to_zero() {
        let info = BlockInfo {
            size: 1 << 20,
            sector_size: 512,
            physical_sector_size: 4096,
            physical_sector_offset: 0,
            readonly: false,
            can_delete: true,
            is_device: false,
        };
        let s = IdentityStrings {
            serial: "S",
            revision: "001",
            model: "M",
            rotation_rate: 1,
        };
        for atapi in [false, true] {
            let w = identify(atapi, &info, &s);
            let b = words_to_bytes(&w);
            assert_eq!(b.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
            assert_eq!(b[510], 0xa5);
        }
        let w = identify(false, &info, &s);
        assert_eq!(w[106], 0x4000 | 0x2000 | 3);
        assert_eq!(w[169], 1);
        assert_eq!((w[59], w[77], w[88]), (0, 0x40, 0x7f));
    }
}
