//! What the FreeBSD backend saves of the kernel for a snapshot, and the byte forms of the
//! vCPU state it reads through the register requests.

use vmm_sys::*;

use super::regs::{segment_from_desc, segment_to_desc, table_from_desc, table_to_desc};
use crate::vmm::SpecialRegs;

/// The kernel structures bhyve saves with `VM_SNAPSHOT_REQ`, in its order (`snapshot.c`);
/// a restore replays them in the same order, then `VM_RESTORE_TIME`.
pub const KERNEL_STRUCTS: [(&str, snapshot_req); 9] = [
    ("vhpet", STRUCT_VHPET),
    ("vm", STRUCT_VM),
    ("vioapic", STRUCT_VIOAPIC),
    ("vlapic", STRUCT_VLAPIC),
    ("vmcx", STRUCT_VMCX),
    ("vatpit", STRUCT_VATPIT),
    ("vatpic", STRUCT_VATPIC),
    ("vpmtmr", STRUCT_VPMTMR),
    ("vrtc", STRUCT_VRTC),
];

/// Room given to the kernel for one structure: the per-vCPU ones (vlapic, vmcx) grow with
/// the vCPU count; the kernel says how much it wrote.
pub const KERNEL_STRUCT_BUFFER: usize = 16 << 20;

/// Little-endian u64s of `bytes`, which must hold exactly `count` of them.
pub fn u64s(bytes: &[u8], count: usize) -> Result<Vec<u64>, String> {
    if bytes.len() != count * 8 {
        return Err(format!(
            "saved vCPU state has {} bytes where {} are expected",
            bytes.len(),
            count * 8
        ));
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect())
}

/// Segment order in [`special_regs_to_bytes`].
const SEGMENT_COUNT: usize = 8;
/// Words: per segment base, limit, access, selector; GDTR and IDTR base and limit; CR0, CR2,
/// CR3, CR4, EFER.
const SPECIAL_WORDS: usize = SEGMENT_COUNT * 4 + 4 + 5;

fn segments(s: &SpecialRegs) -> [crate::vmm::Segment; SEGMENT_COUNT] {
    [s.cs, s.ds, s.es, s.fs, s.gs, s.ss, s.tr, s.ldt]
}

/// The vCPU's segment and control registers in the kernel's terms (descriptors with VMX
/// access rights), as words.
pub fn special_regs_to_bytes(s: &SpecialRegs) -> Vec<u8> {
    let mut words = Vec::with_capacity(SPECIAL_WORDS);
    for seg in segments(s) {
        let d = segment_to_desc(&seg);
        words.extend([
            d.base,
            u64::from(d.limit),
            u64::from(d.access),
            u64::from(seg.selector),
        ]);
    }
    for t in [s.gdt, s.idt] {
        let d = table_to_desc(&t);
        words.extend([d.base, u64::from(d.limit)]);
    }
    words.extend([s.cr0, s.cr2, s.cr3, s.cr4, s.efer]);
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

pub fn special_regs_from_bytes(bytes: &[u8]) -> Result<SpecialRegs, String> {
    let w = u64s(bytes, SPECIAL_WORDS)?;
    let seg = |i: usize| {
        let d = seg_desc {
            base: w[i * 4],
            limit: w[i * 4 + 1] as u32,
            access: w[i * 4 + 2] as u32,
        };
        segment_from_desc(&d, w[i * 4 + 3] as u16)
    };
    let table = |i: usize| {
        table_from_desc(&seg_desc {
            base: w[SEGMENT_COUNT * 4 + i * 2],
            limit: w[SEGMENT_COUNT * 4 + i * 2 + 1] as u32,
            access: 0,
        })
    };
    let c = SEGMENT_COUNT * 4 + 4;
    Ok(SpecialRegs {
        cs: seg(0),
        ds: seg(1),
        es: seg(2),
        fs: seg(3),
        gs: seg(4),
        ss: seg(5),
        tr: seg(6),
        ldt: seg(7),
        gdt: table(0),
        idt: table(1),
        cr0: w[c],
        cr2: w[c + 1],
        cr3: w[c + 2],
        cr4: w[c + 3],
        efer: w[c + 4],
        cr8: 0,
        apic_base: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::{DescriptorTable, Segment};

    #[test]
    fn segment_and_control_registers_round_trip_and_torn_input_is_refused() {
        let code = Segment {
            base: 0x1000,
            limit: 0xffff,
            selector: 0x08,
            type_: 0xb,
            present: true,
            s: true,
            l: true,
            ..Default::default()
        };
        let s = SpecialRegs {
            cs: code,
            ss: Segment {
                selector: 0x10,
                type_: 3,
                ..code
            },
            tr: Segment {
                type_: 0xb,
                present: true,
                ..Default::default()
            },
            gdt: DescriptorTable {
                base: 0x5000,
                limit: 0x27,
            },
            cr0: 0x8000_0011,
            cr3: 0x9000,
            cr4: 0x20,
            efer: 0x500,
            ..Default::default()
        };
        let bytes = special_regs_to_bytes(&s);
        assert_eq!(bytes.len(), SPECIAL_WORDS * 8);
        assert_eq!(special_regs_from_bytes(&bytes), Ok(s));
        assert!(special_regs_from_bytes(&bytes[1..]).is_err());
    }

    #[test]
    fn kernel_structures_are_the_ones_freebsd_saves_each_once() {
        let mut reqs: Vec<snapshot_req> = KERNEL_STRUCTS.iter().map(|(_, r)| *r).collect();
        reqs.sort();
        reqs.dedup();
        assert_eq!(reqs.len(), KERNEL_STRUCTS.len());
        // STRUCT_VMX (13 only) and VM_MEM (RAM, copied by bhyve itself) are not kernel
        // device state requests on 14 and later.
        assert!(!reqs.contains(&STRUCT_VMX) && !reqs.contains(&VM_MEM));
    }
}
