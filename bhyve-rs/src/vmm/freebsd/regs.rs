//! The seam's register types in the kernel's terms: `VM_REG_GUEST_*` numbers and segment
//! descriptors with VMX access rights (`struct seg_desc`), which FreeBSD uses on Intel and AMD.

use vmm_sys::*;

use crate::vmm::{DescriptorTable, Regs, Segment};

/// `seg_desc.access` bit 16: the segment register is unusable.
const ACCESS_UNUSABLE: u32 = 1 << 16;

/// The general-purpose registers, RIP and RFLAGS in [`Regs`] order, for one
/// `VM_{GET,SET}_REGISTER_SET`.
pub const GPR_SET: [vm_reg_name; 18] = [
    VM_REG_GUEST_RAX,
    VM_REG_GUEST_RBX,
    VM_REG_GUEST_RCX,
    VM_REG_GUEST_RDX,
    VM_REG_GUEST_RSI,
    VM_REG_GUEST_RDI,
    VM_REG_GUEST_RSP,
    VM_REG_GUEST_RBP,
    VM_REG_GUEST_R8,
    VM_REG_GUEST_R9,
    VM_REG_GUEST_R10,
    VM_REG_GUEST_R11,
    VM_REG_GUEST_R12,
    VM_REG_GUEST_R13,
    VM_REG_GUEST_R14,
    VM_REG_GUEST_R15,
    VM_REG_GUEST_RIP,
    VM_REG_GUEST_RFLAGS,
];

/// `values` read for [`GPR_SET`] as [`Regs`].
pub fn regs_from_values(v: &[u64; 18]) -> Regs {
    Regs {
        rax: v[0],
        rbx: v[1],
        rcx: v[2],
        rdx: v[3],
        rsi: v[4],
        rdi: v[5],
        rsp: v[6],
        rbp: v[7],
        r8: v[8],
        r9: v[9],
        r10: v[10],
        r11: v[11],
        r12: v[12],
        r13: v[13],
        r14: v[14],
        r15: v[15],
        rip: v[16],
        rflags: v[17],
    }
}

/// [`Regs`] as values for [`GPR_SET`].
pub fn regs_to_values(r: &Regs) -> [u64; 18] {
    [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, r.rip, r.rflags,
    ]
}

/// The x86 encoding number (0 = RAX, 1 = RCX, …) of a general-purpose `VM_REG_GUEST_*`.
pub fn gpr_encoding(reg: vm_reg_name) -> Option<u8> {
    Some(match reg {
        VM_REG_GUEST_RAX => 0,
        VM_REG_GUEST_RCX => 1,
        VM_REG_GUEST_RDX => 2,
        VM_REG_GUEST_RBX => 3,
        VM_REG_GUEST_RSP => 4,
        VM_REG_GUEST_RBP => 5,
        VM_REG_GUEST_RSI => 6,
        VM_REG_GUEST_RDI => 7,
        VM_REG_GUEST_R8 => 8,
        VM_REG_GUEST_R9 => 9,
        VM_REG_GUEST_R10 => 10,
        VM_REG_GUEST_R11 => 11,
        VM_REG_GUEST_R12 => 12,
        VM_REG_GUEST_R13 => 13,
        VM_REG_GUEST_R14 => 14,
        VM_REG_GUEST_R15 => 15,
        _ => return None,
    })
}

/// A segment register in the kernel's form (VMX access rights: type, S, DPL, P, AVL, L, D/B,
/// G, unusable).
pub fn segment_to_desc(s: &Segment) -> seg_desc {
    let access = u32::from(s.type_ & 0xf)
        | u32::from(s.s) << 4
        | u32::from(s.dpl & 3) << 5
        | u32::from(s.present) << 7
        | u32::from(s.avl) << 12
        | u32::from(s.l) << 13
        | u32::from(s.db) << 14
        | u32::from(s.g) << 15
        | if s.unusable { ACCESS_UNUSABLE } else { 0 };
    seg_desc {
        base: s.base,
        limit: s.limit,
        access,
    }
}

/// A segment register from the kernel's descriptor and the selector read separately.
pub fn segment_from_desc(d: &seg_desc, selector: u16) -> Segment {
    let a = d.access;
    Segment {
        base: d.base,
        limit: d.limit,
        selector,
        type_: (a & 0xf) as u8,
        s: a & (1 << 4) != 0,
        dpl: ((a >> 5) & 3) as u8,
        present: a & (1 << 7) != 0,
        avl: a & (1 << 12) != 0,
        l: a & (1 << 13) != 0,
        db: a & (1 << 14) != 0,
        g: a & (1 << 15) != 0,
        unusable: a & ACCESS_UNUSABLE != 0,
    }
}

/// GDTR or IDTR in the kernel's form (only base and limit count).
pub fn table_to_desc(t: &DescriptorTable) -> seg_desc {
    seg_desc {
        base: t.base,
        limit: u32::from(t.limit),
        access: 0,
    }
}

pub fn table_from_desc(d: &seg_desc) -> DescriptorTable {
    DescriptorTable {
        base: d.base,
        limit: d.limit as u16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_code_segment_has_the_access_rights_bhyve_sets() {
        // bhyve's vm_setup_freebsd_registers: 64-bit code 0x209B (P, S, type 0xb, L),
        // data 0x0093; these are the VMX encodings FreeBSD's kernel expects.
        let code = Segment {
            type_: 0xb,
            s: true,
            present: true,
            l: true,
            ..Default::default()
        };
        assert_eq!(segment_to_desc(&code).access, 0x209b);
        let data = Segment {
            type_: 0x3,
            s: true,
            present: true,
            ..Default::default()
        };
        assert_eq!(segment_to_desc(&data).access, 0x0093);
        let unusable = Segment {
            unusable: true,
            ..Default::default()
        };
        assert_eq!(segment_to_desc(&unusable).access, 0x1_0000);
    }

    #[test]
    fn segments_round_trip_through_the_kernel_form() {
        let s = Segment {
            base: 0x1234_0000,
            limit: 0xfffff,
            selector: 0x2b,
            type_: 0x3,
            present: true,
            dpl: 3,
            db: true,
            s: true,
            l: false,
            g: true,
            avl: true,
            unusable: false,
        };
        assert_eq!(segment_from_desc(&segment_to_desc(&s), 0x2b), s);
        let r = Regs {
            rax: 1,
            rbx: 2,
            rcx: 3,
            rdx: 4,
            rsi: 5,
            rdi: 6,
            rsp: 7,
            rbp: 8,
            r8: 9,
            r15: 16,
            rip: 17,
            rflags: 0x202,
            ..Default::default()
        };
        assert_eq!(regs_from_values(&regs_to_values(&r)), r);
        assert_eq!(gpr_encoding(VM_REG_GUEST_RBX), Some(3));
        assert_eq!(gpr_encoding(VM_REG_GUEST_RIP), None);
    }
}
