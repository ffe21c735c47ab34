//! PCI configuration space through either access method: mechanism #1 (ports 0xCF8/0xCFC, via
//! ring-0 service calls) or ECAM (memory mapped, read straight from ring 3). `pci` and `ecam`
//! print the bus-0 listing in the same format so the two can be compared; `bars` sizes every
//! BAR with the standard all-ones protocol.

use crate::acpi::Acpi;
use crate::bootinfo::readable;
use crate::svc;

const PCIR_COMMAND: u32 = 0x04;
const PCIR_HDRTYPE: u32 = 0x0c; // dword holding the header type in bits 16-23
const PCIR_BAR0: u32 = 0x10;
const PCIM_CMD_PORTEN: u32 = 0x1;
const PCIM_CMD_MEMEN: u32 = 0x2;
const PCIM_MFDEV: u32 = 0x80;

#[derive(Clone, Copy)]
pub enum Access {
    /// Configuration mechanism #1.
    Conf1,
    /// Enhanced configuration access at this base (bus 0 at the base).
    Ecam(u64),
}

impl Access {
    pub fn read(self, dev: u32, func: u32, reg: u32) -> u32 {
        match self {
            Access::Conf1 => {
                svc::outl(0xcf8, 0x8000_0000 | (dev << 11) | (func << 8) | reg);
                svc::inl(0xcfc)
            }
            Access::Ecam(base) => {
                let addr = base + u64::from((dev << 15) | (func << 12) | (reg & 0xffc));
                // SAFETY: `ecam` only builds this variant for a base whose 256 MiB window lies
                // in the identity map (uncached, user accessible); dev < 32, func < 8,
                // reg < 4096, so `addr` stays inside bus 0's megabyte of it.
                unsafe { (addr as *const u32).read_volatile() }
            }
        }
    }

    pub fn write(self, dev: u32, func: u32, reg: u32, value: u32) {
        match self {
            Access::Conf1 => {
                svc::outl(0xcf8, 0x8000_0000 | (dev << 11) | (func << 8) | reg);
                svc::outl(0xcfc, value);
            }
            Access::Ecam(base) => {
                let addr = base + u64::from((dev << 15) | (func << 12) | (reg & 0xffc));
                // SAFETY: as in `read`.
                unsafe { (addr as *mut u32).write_volatile(value) }
            }
        }
    }

    /// Every present function on bus 0, as (device, function, id dword), in order.
    fn functions(self, mut visit: impl FnMut(u32, u32, u32)) {
        for dev in 0..32 {
            let functions = if self.read(dev, 0, 0) & 0xffff == 0xffff {
                0
            } else if (self.read(dev, 0, PCIR_HDRTYPE) >> 16) & PCIM_MFDEV != 0 {
                8
            } else {
                1
            };
            for func in 0..functions {
                let id = self.read(dev, func, 0);
                if id & 0xffff != 0xffff {
                    visit(dev, func, id);
                }
            }
        }
    }
}

/// Lists bus 0: "pci 00:DD.F VVVV:DDDD class CCSSPP".
pub fn list(access: Access) {
    access.functions(|dev, func, id| {
        let class = access.read(dev, func, 0x08) >> 8;
        println!(
            "pci 00:{dev:02x}.{func} {:04x}:{:04x} class {class:06x}",
            id & 0xffff,
            id >> 16
        );
    });
}

/// `ecam`: the same listing as `pci`, read through the ECAM window the MCFG describes.
pub fn ecam() {
    let Some((base, segment, first_bus, _)) = Acpi::discover().and_then(|a| a.mcfg()) else {
        println!("ecam: no MCFG table");
        return;
    };
    if segment != 0 || first_bus != 0 || !readable(base, 256 << 20) {
        println!("ecam: cannot use {base:#x} segment {segment} first bus {first_bus}");
        return;
    }
    list(Access::Ecam(base));
}

/// `bars`: per function "bars 00:DD.F VVVV:DDDD header HH", then one line per implemented BAR,
/// "bar 00:DD.F <index> io|mem32|mem64[ prefetch] <address> size <size>", sized through
/// mechanism #1 with decoding off while the all-ones pattern is in place.
pub fn bars() {
    let access = Access::Conf1;
    access.functions(|dev, func, id| {
        let header = (access.read(dev, func, PCIR_HDRTYPE) >> 16) & 0xff;
        println!(
            "bars 00:{dev:02x}.{func} {:04x}:{:04x} header {header:02x}",
            id & 0xffff,
            id >> 16
        );
        let count = match header & 0x7f {
            0 => 6,
            1 => 2,
            _ => 0,
        };
        let command = access.read(dev, func, PCIR_COMMAND);
        access.write(
            dev,
            func,
            PCIR_COMMAND,
            command & 0xffff & !(PCIM_CMD_PORTEN | PCIM_CMD_MEMEN),
        );
        let mut index = 0;
        while index < count {
            index += size_bar(access, dev, func, index, count);
        }
        access.write(dev, func, PCIR_COMMAND, command & 0xffff);
    });
}

/// Sizes BAR `index` (write all ones, read back, restore) and prints it if implemented; returns
/// how many BAR registers it used (2 for a 64-bit memory BAR).
fn size_bar(access: Access, dev: u32, func: u32, index: u32, count: u32) -> u32 {
    let reg = PCIR_BAR0 + 4 * index;
    let probe = |reg: u32| {
        let original = access.read(dev, func, reg);
        access.write(dev, func, reg, 0xffff_ffff);
        let mask = access.read(dev, func, reg);
        access.write(dev, func, reg, original);
        (original, mask)
    };
    let (low, low_mask) = probe(reg);
    if low & 1 != 0 {
        let mask = low_mask & !0x3 & 0xffff;
        if mask != 0 {
            let size = (!mask & 0xffff) + 1;
            println!(
                "bar 00:{dev:02x}.{func} {index} io {:#x} size {size:#x}",
                low & !0x3
            );
        }
        return 1;
    }
    let prefetch = if low & 0x8 != 0 { " prefetch" } else { "" };
    if (low >> 1) & 0x3 == 0x2 && index + 1 < count {
        let (high, high_mask) = probe(reg + 4);
        let mask = (u64::from(high_mask) << 32) | u64::from(low_mask & !0xf);
        if mask != 0 {
            let address = (u64::from(high) << 32) | u64::from(low & !0xf);
            println!(
                "bar 00:{dev:02x}.{func} {index} mem64{prefetch} {address:#x} size {:#x}",
                (!mask).wrapping_add(1)
            );
        }
        return 2;
    }
    let mask = low_mask & !0xf;
    if mask != 0 {
        println!(
            "bar 00:{dev:02x}.{func} {index} mem32{prefetch} {:#x} size {:#x}",
            low & !0xf,
            (!mask).wrapping_add(1)
        );
    }
    1
}
