//! Dirty page tracking: the KVM dirty ring (preferred) and the dirty bitmap (fallback).
//!
//! Harvested pages land in a `pending` set owned by the tracker. The engine takes pages
//! from it to send and puts them back if a send fails, so a failed migration never loses
//! a dirty bit. The ring may report a page twice; the set removes duplicates.
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
use kvm_ioctls::VmFd;
use memmap2::{MmapOptions, MmapRaw};

use crate::error::{errno_io, Error, Result};
use crate::memory::GuestRam;
use crate::sys;

const GFN_F_DIRTY: u32 = 1;
const GFN_F_RESET: u32 = 2;
/// Size of one `struct kvm_dirty_gfn`.
const ENTRY_SIZE: usize = 16;

/// Which kernel mechanism reports dirty pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyMode {
    /// Per-vCPU dirty ring (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`).
    Ring { bytes: u32 },
    /// `KVM_GET_DIRTY_LOG` + `KVM_CLEAR_DIRTY_LOG` with manual protect.
    Bitmap,
}

/// A set of guest frame numbers, one bit each.
#[derive(Debug, Clone, Default)]
pub struct DirtySet {
    words: Vec<u64>,
    count: u64,
}

impl DirtySet {
    pub fn new(pages: u64) -> Self {
        DirtySet { words: vec![0; pages.div_ceil(64) as usize], count: 0 }
    }
    pub fn capacity(&self) -> u64 {
        self.words.len() as u64 * 64
    }
    /// Insert `gfn`; returns false if it was already present or out of range.
    pub fn insert(&mut self, gfn: u64) -> bool {
        let Some(w) = self.words.get_mut((gfn / 64) as usize) else { return false };
        let bit = 1u64 << (gfn % 64);
        if *w & bit != 0 {
            return false;
        }
        *w |= bit;
        self.count += 1;
        true
    }
    pub fn contains(&self, gfn: u64) -> bool {
        self.words.get((gfn / 64) as usize).is_some_and(|w| w & (1 << (gfn % 64)) != 0)
    }
    pub fn len(&self) -> u64 {
        self.count
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    /// OR a slot's bitmap (bit i = page `first_gfn + i`) into the set.
    pub fn merge_words(&mut self, first_gfn: u64, bits: &[u64]) {
        if first_gfn.is_multiple_of(64) {
            let base = (first_gfn / 64) as usize;
            for (i, &b) in bits.iter().enumerate() {
                if let Some(w) = self.words.get_mut(base + i) {
                    let new = b & !*w;
                    self.count += u64::from(new.count_ones());
                    *w |= new;
                }
            }
        } else {
            for (i, &b) in bits.iter().enumerate() {
                let mut b = b;
                while b != 0 {
                    let t = b.trailing_zeros() as u64;
                    self.insert(first_gfn + i as u64 * 64 + t);
                    b &= b - 1;
                }
            }
        }
    }
    /// All members in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let t = w.trailing_zeros() as u64;
                w &= w - 1;
                Some(i as u64 * 64 + t)
            })
        })
    }
    /// Remove and return every member, ascending.
    pub fn drain(&mut self) -> Vec<u64> {
        let v: Vec<u64> = self.iter().collect();
        self.words.iter_mut().for_each(|w| *w = 0);
        self.count = 0;
        v
    }
}

/// One vCPU's mmap'd dirty ring. Unmapped on drop.
#[derive(Debug)]
pub struct DirtyRing {
    map: MmapRaw,
    entries: u32,
    /// Next entry to harvest (free-running).
    next: u32,
}

impl DirtyRing {
    /// Map the dirty ring of a vCPU fd (`bytes` as enabled on the VM).
    pub fn map(vcpu_fd: &impl AsRawFd, bytes: u32) -> Result<Self> {
        let entries = bytes / ENTRY_SIZE as u32;
        if !entries.is_power_of_two() {
            return Err(Error::Dirty(format!("ring of {bytes} bytes is not a power-of-two entry count")));
        }
        let map = MmapOptions::new()
            .offset(sys::DIRTY_LOG_PAGE_OFFSET * 4096)
            .len(bytes as usize)
            .map_raw(vcpu_fd.as_raw_fd())
            .map_err(|e| Error::Dirty(format!("mmap dirty ring: {e}")))?;
        Ok(DirtyRing { map, entries, next: 0 })
    }

    /// Harvest every published entry: call `f(slot, offset)` for each, mark it for reset.
    /// Returns the number of entries harvested.
    pub fn harvest(&mut self, mut f: impl FnMut(u32, u64)) -> u32 {
        let mut n = 0;
        loop {
            let idx = (self.next & (self.entries - 1)) as usize;
            // SAFETY: idx < entries, so the entry lies inside the mapping; the ring is shared
            // with the kernel, so flags are accessed atomically (u32 is naturally aligned).
            let base = unsafe { self.map.as_mut_ptr().add(idx * ENTRY_SIZE) };
            // SAFETY: `base` is 16-byte aligned inside the mapping and lives as long as `self`.
            let flags = unsafe { &*base.cast::<AtomicU32>() };
            if flags.load(Ordering::Acquire) & GFN_F_DIRTY == 0 {
                break;
            }
            // SAFETY: slot at +4 and offset at +8 are inside the entry; the kernel wrote them
            // before publishing DIRTY with release semantics, observed by the acquire above.
            let (slot, offset) = unsafe { (base.add(4).cast::<u32>().read(), base.add(8).cast::<u64>().read()) };
            f(slot, offset);
            flags.store(GFN_F_RESET, Ordering::Release);
            self.next = self.next.wrapping_add(1);
            n += 1;
        }
        n
    }
}

/// A dirty-page source outside KVM's own interfaces (the eBPF bitmap), harvested instead of
/// the ring. `harvest` takes every recorded page; an `Err` means records were lost, so the
/// caller must assume every page dirty.
pub trait ExternalDirtySource: Send + Sync {
    fn harvest(&self, f: &mut dyn FnMut(u64)) -> std::result::Result<u64, String>;
    fn name(&self) -> &'static str;
}

/// Counters about the tracker, for reports and tests.
#[derive(Debug, Default)]
pub struct DirtyStats {
    /// Entries (ring) or bits (bitmap) the kernel reported.
    pub reported: AtomicU64,
    /// Reports for a page already pending (the ring may push a page twice).
    pub duplicates: AtomicU64,
    /// `KVM_EXIT_DIRTY_RING_FULL` exits handled.
    pub ring_full_exits: AtomicU64,
    /// Ring entries naming a slot/offset outside guest RAM (should never happen).
    pub bad_entries: AtomicU64,
}

struct Inner {
    rings: Vec<DirtyRing>,
    pending: DirtySet,
    external: Option<Box<dyn ExternalDirtySource>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner").field("rings", &self.rings.len()).field("pending", &self.pending.len()).finish()
    }
}

/// Collects dirty pages of one VM from the kernel into a pending set.
///
/// Logging is off until [`DirtyTracker::start`] and off again after
/// [`DirtyTracker::stop`]. While it is off the kernel reports nothing, so the tracker counts
/// every page as dirty: nothing written then can be missed by a later migration.
#[derive(Debug)]
pub struct DirtyTracker {
    vm: Arc<VmFd>,
    mode: DirtyMode,
    /// The RAM whose memslots are tracked: logging re-registers them, and keeping it here
    /// keeps their host range mapped for as long as KVM may use it.
    ram: Arc<GuestRam>,
    logging: std::sync::atomic::AtomicBool,
    inner: Mutex<Inner>,
    pub stats: DirtyStats,
    /// A ring reset was interrupted: tracking can no longer be trusted, report all RAM.
    degraded: std::sync::atomic::AtomicBool,
}

impl DirtyTracker {
    pub(crate) fn new(vm: Arc<VmFd>, mode: DirtyMode, ram: Arc<GuestRam>) -> Self {
        let pages = ram.pages();
        let mut pending = DirtySet::new(pages);
        insert_all(&mut pending, pages);
        DirtyTracker {
            vm,
            mode,
            ram,
            logging: std::sync::atomic::AtomicBool::new(false),
            inner: Mutex::new(Inner { rings: Vec::new(), pending, external: None }),
            stats: DirtyStats::default(),
            degraded: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Turn dirty logging on for every memslot and drop everything pending: from now on
    /// exactly the pages written are reported (a migration's round 0 sends all RAM).
    pub fn start(&self) -> Result<()> {
        self.set_logging(true)?;
        self.reset()
    }

    /// Turn dirty logging off for every memslot (the guest writes at full speed again) and
    /// count every page as dirty, since writes from now on go unreported.
    pub fn stop(&self) -> Result<()> {
        let r = self.set_logging(false);
        // Entries pushed before the switch are of no use any more; an empty ring also keeps
        // a later start from meeting a nearly full one.
        let mut g = self.lock();
        let inner = &mut *g;
        let _ = self.harvest_rings(inner, false);
        insert_all(&mut inner.pending, self.total_pages());
        r
    }

    /// Whether the kernel is logging writes now.
    pub fn is_logging(&self) -> bool {
        self.logging.load(Ordering::Acquire)
    }

    fn set_logging(&self, on: bool) -> Result<()> {
        let _g = self.lock();
        for s in self.ram.slots() {
            let region = self.ram.kvm_region(s, if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 })?;
            // SAFETY: the same slot, guest range and host range as registered when the VM
            // was created (only the flags change); `self.ram` keeps the host range mapped.
            unsafe { self.vm.set_user_memory_region(region) }.map_err(|e| {
                Error::ioctl(
                    if on {
                        "KVM_SET_USER_MEMORY_REGION(+LOG_DIRTY_PAGES)"
                    } else {
                        "KVM_SET_USER_MEMORY_REGION(-LOG_DIRTY_PAGES)"
                    },
                    errno_io(e),
                )
            })?;
        }
        self.logging.store(on, Ordering::Release);
        Ok(())
    }

    pub fn mode(&self) -> DirtyMode {
        self.mode
    }

    pub(crate) fn add_ring(&self, ring: DirtyRing) {
        self.lock().rings.push(ring);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock only means another thread panicked mid-harvest; the set is still
        // a valid over-approximation, so keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take dirty pages from `src` instead of the ring's entries (the ring keeps running, so
    /// KVM still reports and re-protects pages; its entries are only counted).
    pub fn set_external(&self, src: Box<dyn ExternalDirtySource>) -> Result<()> {
        if !matches!(self.mode, DirtyMode::Ring { .. }) {
            return Err(Error::Dirty(
                "an external dirty source needs the dirty ring (KVM reports pages through it)".into(),
            ));
        }
        self.lock().external = Some(src);
        Ok(())
    }

    /// Name of the source dirty pages are taken from.
    pub fn source_name(&self) -> &'static str {
        match (&self.lock().external, self.mode) {
            (Some(e), _) => e.name(),
            (None, DirtyMode::Ring { .. }) => "KVM dirty ring",
            (None, DirtyMode::Bitmap) => "KVM dirty bitmap",
        }
    }

    /// Pull everything the kernel has reported into the pending set and re-arm tracking.
    pub fn collect(&self) -> Result<()> {
        let mut g = self.lock();
        let inner = &mut *g;
        if !self.is_logging() {
            // Nothing is reported, and every page already counts as dirty.
            return Ok(());
        }
        if let Some(ext) = inner.external.as_ref() {
            // Swap the external bitmap first, then reset the ring: a page written between
            // the two is recorded again for the next round.
            let pending = &mut inner.pending;
            if let Err(why) = ext.harvest(&mut |gfn| {
                pending.insert(gfn);
            }) {
                tracing::warn!("{}: {why}; sending all RAM again this round", ext.name());
                insert_all(pending, self.total_pages());
            }
            // The ring's entries are only counted: the pages are in the external bitmap.
            return self.harvest_rings(inner, false);
        }
        match self.mode {
            DirtyMode::Ring { .. } => self.harvest_rings(inner, true)?,
            DirtyMode::Bitmap => {
                for s in self.ram.slots() {
                    let mut bits = self
                        .vm
                        .get_dirty_log(s.id, s.size as usize)
                        .map_err(|e| Error::ioctl("KVM_GET_DIRTY_LOG", errno_io(e)))?;
                    let n: u64 = bits.iter().map(|w| u64::from(w.count_ones())).sum();
                    if n == 0 {
                        continue;
                    }
                    sys::clear_dirty_log(&*self.vm, s.id, 0, s.pages() as u32, &mut bits)
                        .map_err(|e| Error::ioctl("KVM_CLEAR_DIRTY_LOG", e))?;
                    let before = inner.pending.len();
                    inner.pending.merge_words(s.first_gfn(), &bits);
                    self.stats.reported.fetch_add(n, Ordering::Relaxed);
                    self.stats.duplicates.fetch_add(n - (inner.pending.len() - before), Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    /// Harvest every vCPU ring (into `pending` when `record`), then re-arm the harvested
    /// pages with `KVM_RESET_DIRTY_RINGS`.
    fn harvest_rings(&self, inner: &mut Inner, record: bool) -> Result<()> {
        let (mut total, mut dup, mut bad) = (0u64, 0u64, 0u64);
        for ring in inner.rings.iter_mut() {
            let pending = &mut inner.pending;
            total += u64::from(ring.harvest(|slot, offset| {
                if !record {
                    return;
                }
                match self.slot_gfn(slot, offset) {
                    Some(gfn) => {
                        if !pending.insert(gfn) {
                            dup += 1;
                        }
                    }
                    None => bad += 1,
                }
            }));
        }
        if total > 0 {
            match sys::reset_dirty_rings(&*self.vm) {
                Ok(_) => {}
                Err(e) if sys::is_reset_interrupted(&e) => {
                    // Some harvested pages may have stayed writable, so their next writes
                    // would go unreported: from now on every collect reports all RAM.
                    tracing::error!("{e}: dirty tracking degrades to sending all RAM every round");
                    self.degraded.store(true, Ordering::Release);
                }
                Err(e) => return Err(Error::ioctl("KVM_RESET_DIRTY_RINGS", e)),
            }
        }
        if self.degraded.load(Ordering::Acquire) {
            insert_all(&mut inner.pending, self.total_pages());
        }
        self.stats.reported.fetch_add(total, Ordering::Relaxed);
        self.stats.duplicates.fetch_add(dup, Ordering::Relaxed);
        self.stats.bad_entries.fetch_add(bad, Ordering::Relaxed);
        Ok(())
    }

    fn slot_gfn(&self, slot: u32, offset: u64) -> Option<u64> {
        // Address space id lives in the upper 16 bits; the embedded VMM uses only as_id 0.
        if slot >> 16 != 0 {
            return None;
        }
        let s = self.ram.slots().iter().find(|s| s.id == slot & 0xffff)?;
        (offset < s.pages()).then(|| s.first_gfn() + offset)
    }

    /// Handle `KVM_EXIT_DIRTY_RING_FULL` from a vCPU thread: harvest so the vCPU can go on.
    pub fn on_ring_full(&self) -> Result<()> {
        self.stats.ring_full_exits.fetch_add(1, Ordering::Relaxed);
        self.collect()
    }

    /// Collect, then take every pending page (ascending gfns).
    pub fn take(&self) -> Result<Vec<u64>> {
        self.collect()?;
        Ok(self.lock().pending.drain())
    }

    /// Put pages back (a send failed): they will be sent again.
    pub fn restore(&self, gfns: &[u64]) {
        let mut g = self.lock();
        for &gfn in gfns {
            g.pending.insert(gfn);
        }
    }

    /// Mark every page dirty (a full resend is needed).
    pub fn mark_all(&self) {
        insert_all(&mut self.lock().pending, self.total_pages());
    }

    fn total_pages(&self) -> u64 {
        self.ram.slots().iter().map(|s| s.pages()).sum()
    }

    /// Drop everything reported so far (start of a migration: round 0 sends all RAM).
    fn reset(&self) -> Result<()> {
        self.collect()?;
        self.lock().pending.drain();
        Ok(())
    }

    /// Pages pending right now (after a collect), without removing them.
    pub fn peek(&self) -> Result<DirtySet> {
        self.collect()?;
        Ok(self.lock().pending.clone())
    }
}

/// Every guest page dirty (a full resend).
fn insert_all(set: &mut DirtySet, pages: u64) {
    for gfn in 0..set.capacity().min(pages) {
        set.insert(gfn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_dedupes_and_drains_sorted() {
        let mut s = DirtySet::new(1000);
        assert!(s.insert(5));
        assert!(!s.insert(5));
        assert!(s.insert(999));
        assert!(!s.insert(100_000), "out of range is refused, not a panic");
        s.merge_words(64, &[0b101]);
        assert_eq!(s.len(), 4);
        assert_eq!(s.drain(), vec![5, 64, 66, 999]);
        assert!(s.is_empty());
    }

    #[test]
    fn merge_unaligned() {
        let mut s = DirtySet::new(300);
        s.merge_words(3, &[1 | 1 << 63]);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![3, 66]);
    }
}
