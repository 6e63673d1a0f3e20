//! Where a raw guest starts, as `guest-conventions.md` fixes it: long mode
//! with identity paging for ELF images, 32-bit protected mode (paging off)
//! at the PVH entry for ELF images with a PVH note, real mode at 0x1000 for
//! flat ones.
//!
//! The host's own boot structures live below 1 MiB (ELF segments may not go
//! there) and the vCPU stacks at the top of guest memory.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Lowest physical address an ELF segment may use.
pub const ELF_MIN_ADDR: u64 = 0x10_0000;
/// Load address and entry point of flat binaries.
pub const FLAT_LOAD_ADDR: u64 = 0x1000;
/// Size of each vCPU's private stack (the spec promises at least 64 KiB).
pub const STACK_SIZE: u64 = 64 * 1024;

const GDT_ADDR: u64 = 0x500;
/// Where PVH guests find their `hvm_start_info` (EBX points here), as on
/// Firecracker; its memory map follows it.
pub const PVH_INFO_ADDR: u64 = 0x6000;
const PVH_MEMMAP_ADDR: u64 = PVH_INFO_ADDR + 0x40;
/// `hvm_start_info.magic`: "xEn3" with the top bit set.
pub const PVH_MAGIC: u32 = 0x336e_c578;
const PML4_ADDR: u64 = 0x1_0000;
const PDPT_ADDR: u64 = 0x1_1000;
const PD_ADDR: u64 = 0x1_2000;
/// Page directories fit between `PD_ADDR` and the end of conventional memory;
/// each maps 1 GiB with 2 MiB pages.
pub const MAX_MAPPED_GIB: u64 = (0x9_f000 - PD_ADDR) / 0x1000;
const GIB: u64 = 1 << 30;

const CODE64_SELECTOR: u16 = 0x08;
const CODE32_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const PTE_PRESENT_RW: u64 = 0x3;
const PTE_HUGE: u64 = 0x80;

/// Writes the GDT and the identity-mapping page tables for long-mode guests.
/// Maps all of guest memory and at least the first 4 GiB of address space.
pub fn write_long_mode_tables(mem: &GuestMemoryMmap, mem_size: u64) -> Result<(), vm_memory::GuestMemoryError> {
    let gdt: [u64; 5] = [
        0,
        0x00af_9b00_0000_ffff, // 64-bit code, DPL 0
        0x00cf_9300_0000_ffff, // flat data
        0x0000_8b00_0000_0067, // 64-bit TSS (busy), low half
        0,                     // TSS, high half
    ];
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))?;
    }

    let gib = mapped_gib(mem_size);
    mem.write_obj(PDPT_ADDR | PTE_PRESENT_RW, GuestAddress(PML4_ADDR))?;
    for g in 0..gib {
        let pd = PD_ADDR + g * 0x1000;
        mem.write_obj(pd | PTE_PRESENT_RW, GuestAddress(PDPT_ADDR + g * 8))?;
        for e in 0..512u64 {
            let phys = g * GIB + e * 0x20_0000;
            mem.write_obj(phys | PTE_PRESENT_RW | PTE_HUGE, GuestAddress(pd + e * 8))?;
        }
    }
    Ok(())
}

/// Writes what a PVH guest starts with: a GDT (flat 32-bit code 0x08,
/// flat data 0x10, a 32-bit TSS 0x18) and a version 1 `hvm_start_info`
/// at [`PVH_INFO_ADDR`] with no modules, no command line, no RSDP, and a
/// two-entry memory map: the first MiB reserved (the host's boot
/// structures), the rest of guest memory RAM.
pub fn write_pvh_boot(mem: &GuestMemoryMmap, mem_size: u64) -> Result<(), vm_memory::GuestMemoryError> {
    let gdt: [u64; 4] = [
        0,
        0x00cf_9b00_0000_ffff, // 32-bit code, base 0, limit 4 GiB
        0x00cf_9300_0000_ffff, // data, base 0, limit 4 GiB
        0x0000_8b00_0000_0067, // 32-bit TSS (busy), base 0, limit 0x67
    ];
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))?;
    }
    // struct hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h).
    let mut info = [0u8; 56];
    info[0..4].copy_from_slice(&PVH_MAGIC.to_le_bytes()); // magic
    info[4..8].copy_from_slice(&1u32.to_le_bytes()); // version
    info[40..48].copy_from_slice(&PVH_MEMMAP_ADDR.to_le_bytes()); // memmap_paddr
    info[48..52].copy_from_slice(&2u32.to_le_bytes()); // memmap_entries
    mem.write_slice(&info, GuestAddress(PVH_INFO_ADDR))?;
    // struct hvm_memmap_table_entry: addr, size, type (1 RAM, 2 reserved).
    for (i, (addr, size, kind)) in [(0, ELF_MIN_ADDR, 2u32), (ELF_MIN_ADDR, mem_size - ELF_MIN_ADDR, 1)]
        .into_iter()
        .enumerate()
    {
        let mut entry = [0u8; 24];
        entry[0..8].copy_from_slice(&addr.to_le_bytes());
        entry[8..16].copy_from_slice(&size.to_le_bytes());
        entry[16..20].copy_from_slice(&kind.to_le_bytes());
        mem.write_slice(&entry, GuestAddress(PVH_MEMMAP_ADDR + 24 * i as u64))?;
    }
    Ok(())
}

/// Number of GiB the identity map covers for a guest of `mem_size` bytes.
pub fn mapped_gib(mem_size: u64) -> u64 {
    mem_size.div_ceil(GIB).max(4)
}

/// The private stack `[bottom, top)` of vCPU `index`, at the top of memory.
pub fn stack_range(mem_size: u64, index: u64) -> (u64, u64) {
    let top = (mem_size - index * STACK_SIZE) & !0xf;
    (top - STACK_SIZE, top)
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Flat segments from the GDT at [`GDT_ADDR`] (`gdt_entries` of them):
/// code segment `cs`, flat data everywhere else, a busy TSS, no IDT.
fn flat(mut sregs: kvm_sregs, cs: kvm_segment, gdt_entries: u16) -> kvm_sregs {
    sregs.cs = cs;
    let data = segment(DATA_SELECTOR, 0x3, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.ss = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.tr = kvm_segment {
        limit: 0x67,
        type_: 0xb,
        s: 0,
        db: 0,
        g: 0,
        ..segment(TSS_SELECTOR, 0xb, false)
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = gdt_entries * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs
}

/// Special registers of a vCPU entering an ELF guest in 64-bit long mode.
pub fn long_mode_sregs(sregs: kvm_sregs) -> kvm_sregs {
    let mut sregs = flat(sregs, segment(CODE64_SELECTOR, 0xb, true), 5);
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers of vCPU `index` of `count` entering an ELF guest.
pub fn long_mode_regs(entry: u64, mem_size: u64, index: u64, count: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: stack_range(mem_size, index).1,
        rdi: index,
        rsi: count,
        rflags: 0x2,
        ..Default::default()
    }
}

/// Special registers of a vCPU entering a PVH guest, as the PVH boot ABI
/// asks: CR0.PE (paging off), CR4 and EFER clear, CS a flat 32-bit code
/// segment, DS/ES/SS/FS/GS flat data, TR a busy 32-bit TSS (base 0, limit
/// 0x67), no IDT.
pub fn pvh_sregs(sregs: kvm_sregs) -> kvm_sregs {
    let mut sregs = flat(sregs, segment(CODE32_SELECTOR, 0xb, false), 4);
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs
}

/// General registers of vCPU `index` of `count` entering a PVH guest:
/// EIP = the PVH entry, EBX = the `hvm_start_info`; beyond the PVH ABI (a
/// guest that also runs elsewhere must not rely on them) ESP = the top of
/// this vCPU's stack, EDI = its index, ESI = the vCPU count.
pub fn pvh_regs(entry: u64, mem_size: u64, index: u64, count: u64) -> kvm_regs {
    kvm_regs {
        rbx: PVH_INFO_ADDR,
        ..long_mode_regs(entry, mem_size, index, count)
    }
}

/// Special registers for a flat binary: real mode, all bases and selectors 0.
pub fn real_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    for seg in [
        &mut sregs.cs,
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.ss,
        &mut sregs.fs,
        &mut sregs.gs,
    ] {
        seg.base = 0;
        seg.selector = 0;
    }
    sregs
}

/// General registers for a flat binary.
pub fn real_mode_regs() -> kvm_regs {
    kvm_regs {
        rip: FLAT_LOAD_ADDR,
        rflags: 0x2,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacks_are_private_aligned_and_at_least_64k() {
        let mem = 256 << 20;
        let (b0, t0) = stack_range(mem, 0);
        let (b1, t1) = stack_range(mem, 1);
        assert_eq!(t0, mem);
        assert_eq!(t1, b0);
        assert!(t0 - b0 >= 64 * 1024 && t1 - b1 >= 64 * 1024);
        assert_eq!(t1 % 16, 0);
    }

    #[test]
    fn identity_map_covers_at_least_4g() {
        assert_eq!(mapped_gib(256 << 20), 4);
        assert_eq!(mapped_gib(5 * GIB + 1), 6);
    }

    #[test]
    fn pvh_start_info_and_registers() {
        let size = 64 << 20;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        write_pvh_boot(&mem, size).unwrap();
        let magic: u32 = mem.read_obj(GuestAddress(PVH_INFO_ADDR)).unwrap();
        let version: u32 = mem.read_obj(GuestAddress(PVH_INFO_ADDR + 4)).unwrap();
        assert_eq!((magic, version), (0x336e_c578, 1));
        let memmap: u64 = mem.read_obj(GuestAddress(PVH_INFO_ADDR + 40)).unwrap();
        let ram_size: u64 = mem.read_obj(GuestAddress(memmap + 24 + 8)).unwrap();
        assert_eq!(ram_size, size - ELF_MIN_ADDR);
        let regs = pvh_regs(0x20_0000, size, 0, 1);
        assert_eq!((regs.rip, regs.rbx), (0x20_0000, PVH_INFO_ADDR));
        let sregs = pvh_sregs(kvm_sregs::default());
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE);
        assert_eq!((sregs.cs.db, sregs.cs.l, sregs.cs.limit), (1, 0, 0xffff_ffff));
        assert_eq!((sregs.cr4, sregs.efer), (0, 0));
    }

    #[test]
    fn page_tables_identity_map_high_addresses() {
        let size = 64 << 20;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        write_long_mode_tables(&mem, size).unwrap();
        // The PD entry for 3 GiB + 2 MiB maps exactly that physical address.
        let pd3: u64 = mem.read_obj(GuestAddress(PDPT_ADDR + 3 * 8)).unwrap();
        let pte: u64 = mem.read_obj(GuestAddress((pd3 & !0xfff) + 8)).unwrap();
        assert_eq!(pte & !0xfff, 3 * GIB + 0x20_0000);
        assert_eq!(pte & 0xff, PTE_PRESENT_RW | PTE_HUGE);
    }
}
