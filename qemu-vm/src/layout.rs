//! Guest RAM's layout as QEMU reports it: the flat view of the system address space
//! (`info mtree -f`), read for the memory regions of one RAM backend.
use kvm_hooks::layout::{Gpa, RamLayout, RamRegion};

/// The regions of guest-physical space that memory backend `backend` (its id, which names
/// its memory region) backs, from the text of `info mtree -f`, as a layout of a RAM file of
/// `size` bytes. Adjacent pieces that continue each other in both spaces are joined.
pub fn from_mtree(text: &str, backend: &str, size: u64) -> Result<RamLayout, String> {
    let block = memory_flat_view(text).ok_or("no flat view of address space \"memory\" in `info mtree -f`")?;
    let mut regions: Vec<RamRegion> = Vec::new();
    for line in block.lines() {
        let Some((range, rest)) = line.trim().split_once(' ') else { continue };
        let Some((a, b)) = range.split_once('-') else { continue };
        let (Ok(start), Ok(last)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else { continue };
        // "(prio 0, ram): ram0 @0000000000100000 KVM"
        let Some((attrs, what)) = rest.split_once("): ") else { continue };
        if !(attrs.ends_with("ram") || attrs.ends_with("rom")) {
            continue;
        }
        let mut words = what.split_whitespace();
        if words.next() != Some(backend) {
            continue;
        }
        let offset = match words.next().and_then(|w| w.strip_prefix('@')) {
            Some(h) => u64::from_str_radix(h, 16).map_err(|e| format!("offset in `{line}`: {e}"))?,
            None => 0,
        };
        let len = last.checked_sub(start).and_then(|d| d.checked_add(1)).ok_or(format!("bad range in `{line}`"))?;
        match regions.last_mut() {
            Some(r) if r.gpa.0 + r.len == start && r.offset + r.len == offset => r.len += len,
            _ => regions.push(RamRegion { gpa: Gpa(start), len, offset }),
        }
    }
    if regions.is_empty() {
        return Err(format!("memory backend \"{backend}\" backs no guest-physical memory"));
    }
    RamLayout::new(regions, size).map_err(|e| e.to_string())
}

/// The flat view used by address space "memory".
fn memory_flat_view(text: &str) -> Option<&str> {
    let mut rest = text;
    while let Some(i) = rest.find("FlatView #") {
        let block = &rest[i..];
        let end = block[1..].find("FlatView #").map_or(block.len(), |j| j + 1);
        let (this, next) = block.split_at(end);
        if this.contains("AS \"memory\"") {
            return Some(this);
        }
        rest = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_hooks::layout::Gfn;

    /// `info mtree -f` of Debian's QEMU 7.2, pc machine, 4 GiB from memory-backend-memfd
    /// "ram0" (abridged: the I/O view and some MMIO lines left out).
    const PC_4G: &str = "FlatView #0\r\n AS \"I/O\", root: io\r\n Root memory region: io\r\n  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan\r\n\r\nFlatView #1\r\n AS \"memory\", root: system\r\n AS \"cpu-memory-0\", root: system\r\n Root memory region: system\r\n  0000000000000000-000000000009ffff (prio 0, ram): ram0 KVM\r\n  00000000000a0000-00000000000bffff (prio 1, i/o): vga-lowmem\r\n  00000000000c0000-00000000000cafff (prio 0, rom): ram0 @00000000000c0000 KVM\r\n  00000000000cb000-00000000000cdfff (prio 0, ram): ram0 @00000000000cb000 KVM\r\n  00000000000ce000-00000000000e7fff (prio 0, rom): ram0 @00000000000ce000 KVM\r\n  00000000000e8000-00000000000effff (prio 0, ram): ram0 @00000000000e8000 KVM\r\n  00000000000f0000-00000000000fffff (prio 0, rom): ram0 @00000000000f0000 KVM\r\n  0000000000100000-00000000bfffffff (prio 0, ram): ram0 @0000000000100000 KVM\r\n  00000000fd000000-00000000fdffffff (prio 1, ram): vga.vram KVM\r\n  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios KVM\r\n  0000000100000000-000000013fffffff (prio 0, ram): ram0 @00000000c0000000 KVM\r\n\r\nFlatView #2\r\n AS \"vga.vram\", root: vga.vram\r\n  0000000000000000-0000000000ffffff (prio 1, ram): vga.vram KVM\r\n";

    #[test]
    fn reads_the_pc_machine_with_ram_above_the_pci_hole() {
        let l = from_mtree(PC_4G, "ram0", 4 << 30).unwrap();
        let r: Vec<(u64, u64, u64)> = l.regions().iter().map(|r| (r.gpa.0, r.len, r.offset)).collect();
        assert_eq!(r, vec![(0, 0xa0000, 0), (0xc0000, 0xbff40000, 0xc0000), (1 << 32, 1 << 30, 0xc000_0000)]);
        assert_eq!(l.page_of(Gfn(0x100000)).map(|p| p.0), Some(0xc0000));
        assert!(from_mtree(PC_4G, "pc.ram", 4 << 30).unwrap_err().contains("backs no guest-physical memory"));
        assert!(from_mtree("FlatView #0\r\n AS \"I/O\"", "ram0", 1 << 30).is_err());
        assert!(from_mtree(PC_4G, "ram0", 1 << 30).is_err(), "regions past a 1 GiB RAM file");
    }
}
