//! Where guest RAM sits in the guest-physical address space: a table of regions, each a
//! range of guest-physical addresses backed by a range of the RAM file.
//!
//! The engine numbers pages by their offset in the RAM file (a [`RamPage`]): that is what
//! it reads, sends and writes. A VM whose RAM is one region at address 0 (the embedded VMM)
//! has `RamPage(n) == Gfn(n)`; QEMU's pc machine puts RAM beyond 3 GiB at 4 GiB, so there
//! GPA 4 GiB is file offset 3 GiB. Dirty trackers report guest frames ([`Gfn`]) and
//! translate them here.
use crate::error::{Error, Result};

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 4096;

/// A guest-physical address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Gpa(pub u64);

/// A guest frame number: a guest-physical address divided by the page size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Gfn(pub u64);

/// A page of the RAM file: its byte offset divided by the page size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct RamPage(pub u64);

impl Gpa {
    pub fn gfn(self) -> Gfn {
        Gfn(self.0 / PAGE_SIZE)
    }
}

impl Gfn {
    pub fn gpa(self) -> Gpa {
        Gpa(self.0 * PAGE_SIZE)
    }
}

/// Most regions a layout may have (QEMU's pc machine uses two; the wire carries the table).
pub const MAX_REGIONS: usize = 32;

/// `len` bytes of guest-physical space from `gpa`, backed by the RAM file from `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    pub gpa: Gpa,
    pub len: u64,
    pub offset: u64,
}

impl RamRegion {
    fn gfns(&self) -> std::ops::Range<u64> {
        self.gpa.0 / PAGE_SIZE..(self.gpa.0 + self.len) / PAGE_SIZE
    }
    fn pages(&self) -> std::ops::Range<u64> {
        self.offset / PAGE_SIZE..(self.offset + self.len) / PAGE_SIZE
    }
}

/// The region table of one VM's RAM, ascending by guest-physical address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamLayout {
    regions: Vec<RamRegion>,
}

impl RamLayout {
    /// All of `size` bytes of RAM at guest-physical address 0.
    pub fn linear(size: u64) -> RamLayout {
        RamLayout { regions: vec![RamRegion { gpa: Gpa(0), len: size, offset: 0 }] }
    }

    /// A table of `regions` over a RAM file of `size` bytes. Regions must be page-aligned,
    /// ascending and disjoint in both spaces, and inside the file; pages of the file that no
    /// region maps are still RAM (they migrate like the rest), just not visible to the guest.
    pub fn new(mut regions: Vec<RamRegion>, size: u64) -> Result<RamLayout> {
        let bad = |m: String| Err(Error::Memory(format!("RAM layout: {m}")));
        if regions.is_empty() || regions.len() > MAX_REGIONS {
            return bad(format!("{} regions, expected 1..={MAX_REGIONS}", regions.len()));
        }
        regions.sort_by_key(|r| r.gpa);
        for r in &regions {
            if r.len == 0 || !(r.gpa.0 | r.len | r.offset).is_multiple_of(PAGE_SIZE) {
                return bad(format!("region {r:?} is empty or not page-aligned"));
            }
            match (r.gpa.0.checked_add(r.len), r.offset.checked_add(r.len)) {
                (Some(_), Some(end)) if end <= size => {}
                _ => return bad(format!("region {r:?} reaches past the {size}-byte RAM file")),
            }
        }
        for w in regions.windows(2) {
            if w[0].gpa.0 + w[0].len > w[1].gpa.0 {
                return bad(format!("regions {:?} and {:?} overlap in guest-physical space", w[0], w[1]));
            }
        }
        let mut by_off = regions.clone();
        by_off.sort_by_key(|r| r.offset);
        for w in by_off.windows(2) {
            if w[0].offset + w[0].len > w[1].offset {
                return bad(format!("regions {:?} and {:?} share bytes of the RAM file", w[0], w[1]));
            }
        }
        Ok(RamLayout { regions })
    }

    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// True when RAM is one region at address 0 (guest frame = RAM page).
    pub fn is_linear(&self) -> bool {
        matches!(self.regions[..], [RamRegion { gpa: Gpa(0), offset: 0, .. }])
    }

    /// The RAM page behind guest frame `gfn`, if RAM backs it.
    pub fn page_of(&self, gfn: Gfn) -> Option<RamPage> {
        let i = self.regions.partition_point(|r| r.gfns().end <= gfn.0);
        let r = self.regions.get(i)?;
        r.gfns().contains(&gfn.0).then(|| RamPage(r.offset / PAGE_SIZE + gfn.0 - r.gfns().start))
    }

    /// The guest frame at which the guest sees RAM page `page`, if any region maps it.
    pub fn gfn_of(&self, page: RamPage) -> Option<Gfn> {
        self.regions
            .iter()
            .find(|r| r.pages().contains(&page.0))
            .map(|r| Gfn(r.gfns().start + page.0 - r.pages().start))
    }

    /// Guest frames past the highest one RAM backs (the size of a GPA-indexed bitmap).
    pub fn gfn_end(&self) -> u64 {
        self.regions.iter().map(|r| r.gfns().end).max().unwrap_or(0)
    }

    /// Wire form: `count u32, reserved u32`, then per region `gpa u64, len u64, offset u64`.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(8 + 24 * self.regions.len());
        v.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        for r in &self.regions {
            v.extend_from_slice(&r.gpa.0.to_le_bytes());
            v.extend_from_slice(&r.len.to_le_bytes());
            v.extend_from_slice(&r.offset.to_le_bytes());
        }
        v
    }

    /// Decode the wire form for a RAM file of `size` bytes; returns the layout and the bytes
    /// it took. The count is checked before anything is read.
    pub fn decode(b: &[u8], size: u64) -> Result<(RamLayout, usize)> {
        let bad = |m: String| Error::Memory(format!("RAM layout on the wire: {m}"));
        let word = |i: usize| -> Result<u64> {
            b.get(i..i + 8)
                .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
                .ok_or_else(|| bad(format!("{} bytes end before byte {}", b.len(), i + 8)))
        };
        let head = word(0)?;
        let (count, reserved) = (head as u32 as usize, (head >> 32) as u32);
        if count == 0 || count > MAX_REGIONS || reserved != 0 {
            return Err(bad(format!("{count} regions (reserved {reserved:#x}); expected 1..={MAX_REGIONS}")));
        }
        let mut regions = Vec::with_capacity(count);
        for i in 0..count {
            let at = 8 + 24 * i;
            regions.push(RamRegion { gpa: Gpa(word(at)?), len: word(at + 8)?, offset: word(at + 16)? });
        }
        Ok((RamLayout::new(regions, size)?, 8 + 24 * count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    fn pc_4g() -> RamLayout {
        // QEMU's pc machine with 4 GiB: 3 GiB below the PCI hole, 1 GiB at 4 GiB.
        RamLayout::new(
            vec![
                RamRegion { gpa: Gpa(4 * G), len: G, offset: 3 * G },
                RamRegion { gpa: Gpa(0), len: 3 * G, offset: 0 },
            ],
            4 * G,
        )
        .unwrap()
    }

    #[test]
    fn translates_both_ways_across_the_pci_hole() {
        let l = pc_4g();
        assert!(!l.is_linear());
        assert!(RamLayout::linear(G).is_linear());
        assert_eq!(l.page_of(Gfn(5)), Some(RamPage(5)));
        assert_eq!(l.page_of(Gpa(4 * G).gfn()), Some(RamPage(3 * G / PAGE_SIZE)));
        assert_eq!(l.page_of(Gpa(3 * G).gfn()), None, "the PCI hole is not RAM");
        assert_eq!(l.page_of(Gpa(5 * G).gfn()), None, "past the last region");
        assert_eq!(l.gfn_of(RamPage(3 * G / PAGE_SIZE + 1)), Some(Gfn(4 * G / PAGE_SIZE + 1)));
        assert_eq!(l.gfn_of(RamPage(4 * G / PAGE_SIZE)), None);
        assert_eq!(l.gfn_end(), 5 * G / PAGE_SIZE);
        let (back, n) = RamLayout::decode(&l.encode(), 4 * G).unwrap();
        assert_eq!((back, n), (l.clone(), 8 + 48));
    }

    #[test]
    fn refuses_bad_tables() {
        let r = |gpa: u64, len: u64, offset: u64| RamRegion { gpa: Gpa(gpa), len, offset };
        for (regions, what) in [
            (vec![], "no region"),
            (vec![r(0, 4096, 0), r(0, 4096, 4096)], "overlap in guest-physical space"),
            (vec![r(0, 4096, 0), r(8192, 4096, 0)], "same file bytes twice"),
            (vec![r(0, 100, 0)], "not page-aligned"),
            (vec![r(0, 2 * G, 0)], "past the file"),
            (vec![r(u64::MAX - 4095, 8192, 0)], "address overflow"),
        ] {
            assert!(RamLayout::new(regions, G).is_err(), "{what}");
        }
        let mut wire = pc_4g().encode();
        wire[0] = 200;
        assert!(RamLayout::decode(&wire, 4 * G).is_err(), "count beyond the cap");
        assert!(RamLayout::decode(&wire[..20], 4 * G).is_err(), "truncated");
        assert!(RamLayout::decode(&pc_4g().encode(), 2 * G).is_err(), "a smaller RAM file");
    }
}
