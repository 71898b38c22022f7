//! Boot state shared by every program the project starts in a guest (the Migration
//! Handler and the embedded test guests): an identity map with 2 MiB user pages, a GDT,
//! and long-mode segment state at CPL 3.
//!
//! This host's KVM (PVM) emulates ring 0 but runs 64-bit CPL 3 code natively, so guests
//! start directly at CPL 3 with page tables and segments the host wrote.
use kvm_bindings::{kvm_segment, kvm_sregs};

use crate::error::Result;
use crate::memory::GuestRam;

/// Where the test guests keep their page tables and GDT (guest-physical).
pub const PML4: u64 = 0x1000;
pub const PDPT: u64 = 0x2000;
pub const GDT: u64 = 0x3000;
/// First page directory (one per GiB of RAM).
pub const PD_BASE: u64 = 0x10000;

/// Write an identity map of all of `ram` with 2 MiB user pages: a PML4 at `pml4`, a PDPT at
/// `pdpt`, and one page directory per GiB from `pd_base` on.
pub fn write_identity_map(ram: &GuestRam, pml4: u64, pdpt: u64, pd_base: u64) -> Result<()> {
    let size = ram.size();
    ram.write_u64(pml4, pdpt | 0x7)?;
    for i in 0..size.div_ceil(1 << 30) {
        let pd = pd_base + i * 0x1000;
        ram.write_u64(pdpt + i * 8, pd | 0x7)?;
        for j in 0..512u64 {
            let addr = (i << 30) + (j << 21);
            if addr >= size {
                break;
            }
            ram.write_u64(pd + j * 8, addr | 0x87)?;
        }
    }
    Ok(())
}

/// Write the GDT every vCPU uses at `base`: null, kernel code, kernel data, (unused),
/// (unused), user data (0x2b), user code64 (0x33).
pub fn write_gdt(ram: &GuestRam, base: u64) -> Result<()> {
    let gdt: [u64; 7] =
        [0, 0x00AF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF, 0, 0, 0x00CF_F200_0000_FFFF, 0x00AF_FA00_0000_FFFF];
    for (i, d) in gdt.iter().enumerate() {
        ram.write_u64(base + i as u64 * 8, *d)?;
    }
    Ok(())
}

fn seg(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 3,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Long mode, paging, CPL 3 segment state.
pub fn initial_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    sregs.cr0 = 0x8005_0033;
    sregs.cr3 = PML4;
    sregs.cr4 = 0x20;
    sregs.efer = 0x500;
    sregs.cs = seg(0x33, true);
    let d = seg(0x2b, false);
    sregs.ds = d;
    sregs.es = d;
    sregs.fs = d;
    sregs.gs = d;
    sregs.ss = d;
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 7 * 8 - 1;
    sregs
}
