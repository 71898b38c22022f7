//! Guest RAM: one memfd (or another process's RAM file), mapped once, split into KVM
//! memslots, with the table of where the guest sees it ([`RamLayout`]).
//!
//! The memfd lets another process (a helper, a test, a foreign VMM) map the same RAM, and
//! [`GuestRam::from_file`] maps a foreign VMM's RAM file (QEMU's `memory-backend-memfd`).
//! Addresses passed to the methods below are offsets into the RAM file (for RAM at GPA 0,
//! the guest-physical address).
//! Guest RAM is shared with running vCPUs, so it is never handed out as `&[u8]`: reads and
//! writes go through the copy helpers below, which tolerate concurrent guest writes.
use std::fs::File;
use std::os::fd::AsFd;

use memmap2::{MmapOptions, MmapRaw};

use crate::error::{Error, Result};
use crate::layout::RamLayout;
use crate::sys;

pub use crate::layout::PAGE_SIZE;
/// Smallest guest RAM the embedded VMM accepts.
pub const MIN_RAM: u64 = 64 << 20;
/// Largest guest RAM the embedded VMM accepts (page tables cover 64 GiB).
pub const MAX_RAM: u64 = 64 << 30;
/// Guest RAM is split into memslots of at most this size.
pub const SLOT_SIZE: u64 = 1 << 30;

/// One KVM memslot: a contiguous range of guest-physical memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memslot {
    pub id: u32,
    pub gpa: u64,
    pub size: u64,
}

impl Memslot {
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }
    pub fn first_gfn(&self) -> u64 {
        self.gpa / PAGE_SIZE
    }
}

/// Guest RAM backed by a memfd and mapped into this process.
#[derive(Debug)]
pub struct GuestRam {
    file: File,
    map: MmapRaw,
    size: u64,
    slots: Vec<Memslot>,
    layout: RamLayout,
}

impl GuestRam {
    /// Create `size` bytes of zeroed guest RAM (a multiple of 2 MiB, within limits).
    pub fn new(size: u64) -> Result<Self> {
        validate_ram_size(size)?;
        let fd = sys::memfd_create("migaccel-guest-ram").map_err(|e| Error::Memory(format!("memfd_create: {e}")))?;
        let file = File::from(fd);
        file.set_len(size).map_err(|e| Error::Memory(format!("ftruncate to {size}: {e}")))?;
        GuestRam::from_file(file, size, RamLayout::linear(size))
    }

    /// Map `size` bytes of an existing RAM file shared with its owner (another process's
    /// guest RAM, obtained through `pidfd_getfd`), seen by the guest as `layout` says.
    /// Writes go to the file: the owner sees them.
    pub fn from_file(file: File, size: u64, layout: RamLayout) -> Result<Self> {
        validate_ram_size(size)?;
        let have = file.metadata().map_err(|e| Error::Memory(format!("fstat of the RAM file: {e}")))?.len();
        if have < size {
            return Err(Error::Memory(format!("the RAM file holds {have} bytes, fewer than the {size} of guest RAM")));
        }
        RamLayout::new(layout.regions().to_vec(), size)?;
        let map = MmapOptions::new()
            .len(size as usize)
            .map_raw(&file)
            .map_err(|e| Error::Memory(format!("mmap {size} bytes: {e}")))?;
        let slots = (0..size.div_ceil(SLOT_SIZE))
            .map(|i| Memslot { id: i as u32, gpa: i * SLOT_SIZE, size: SLOT_SIZE.min(size - i * SLOT_SIZE) })
            .collect();
        Ok(GuestRam { file, map, size, slots, layout })
    }

    /// Where the guest sees this RAM.
    pub fn layout(&self) -> &RamLayout {
        &self.layout
    }

    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }
    pub fn slots(&self) -> &[Memslot] {
        &self.slots
    }
    /// Each memslot as `(first_gfn, pages)`, indexed by slot id (what the BPF probe takes).
    pub fn slot_ranges(&self) -> Vec<(u64, u64)> {
        self.slots.iter().map(|s| (s.first_gfn(), s.pages())).collect()
    }
    /// The memfd, for sharing with another process.
    pub fn memfd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
    /// The KVM memslot for `slot` of this RAM with `flags` (`KVM_MEM_LOG_DIRTY_PAGES` or 0):
    /// what the VM registers at creation and what dirty logging re-registers.
    pub fn kvm_region(&self, slot: &Memslot, flags: u32) -> Result<kvm_bindings::kvm_userspace_memory_region> {
        Ok(kvm_bindings::kvm_userspace_memory_region {
            slot: slot.id,
            flags,
            guest_phys_addr: slot.gpa,
            memory_size: slot.size,
            userspace_addr: self.host_addr(slot.gpa)? as u64,
        })
    }

    /// Host virtual address of guest-physical `gpa` (for KVM memslot registration and I/O).
    pub fn host_addr(&self, gpa: u64) -> Result<*mut u8> {
        self.check(gpa, 0)?;
        // SAFETY: `gpa <= size` was checked, so the result stays within (or one past) the map.
        Ok(unsafe { self.map.as_mut_ptr().add(gpa as usize) })
    }

    /// Translate a slot-relative page into a guest frame number.
    pub fn slot_gfn(&self, slot: u32, offset: u64) -> Option<u64> {
        let s = self.slots.get(slot as usize)?;
        (offset < s.pages()).then(|| s.first_gfn() + offset)
    }

    fn check(&self, gpa: u64, len: u64) -> Result<()> {
        match gpa.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::OutOfRange { gpa, len, ram: self.size }),
        }
    }

    /// Copy guest memory at `gpa` into `dst`.
    pub fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<()> {
        self.check(gpa, dst.len() as u64)?;
        // SAFETY: the source range is inside the mapping (checked above) and `dst` is a
        // distinct host buffer. The guest may write concurrently; the copy is then torn, which
        // dirty tracking repairs by sending the page again.
        unsafe { std::ptr::copy_nonoverlapping(self.map.as_ptr().add(gpa as usize), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Copy `src` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, src: &[u8]) -> Result<()> {
        self.check(gpa, src.len() as u64)?;
        // SAFETY: destination range is inside the mapping (checked above); `src` is a host
        // buffer that cannot alias guest RAM handed out by this type.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.map.as_mut_ptr().add(gpa as usize), src.len()) };
        Ok(())
    }

    /// Fill `len` bytes at `gpa` with zeroes.
    pub fn zero(&self, gpa: u64, len: u64) -> Result<()> {
        self.check(gpa, len)?;
        // SAFETY: range checked above.
        unsafe { std::ptr::write_bytes(self.map.as_mut_ptr().add(gpa as usize), 0, len as usize) };
        Ok(())
    }

    /// True if the page at `gfn` is all zeroes right now.
    pub fn page_is_zero(&self, gfn: u64) -> Result<bool> {
        let gpa = gfn * PAGE_SIZE;
        self.check(gpa, PAGE_SIZE)?;
        // SAFETY: range checked above; the mapping lives as long as `self`.
        Ok(unsafe { sys::is_zero(self.map.as_ptr().add(gpa as usize), PAGE_SIZE as usize) })
    }

    /// Pages that have never been written (memfd holes) read as zero; this returns the
    /// sorted byte ranges that may hold data, without touching (and so allocating) the rest.
    pub fn data_extents(&self) -> Result<Vec<(u64, u64)>> {
        sys::data_extents(&self.file, self.size).map_err(|e| Error::Memory(format!("SEEK_DATA on guest RAM: {e}")))
    }

    /// Allocate and map every page now (a destination about to receive all of RAM), so
    /// receiving does not pay a page fault per page.
    pub fn populate(&self) -> Result<()> {
        sys::populate(&self.file, self.map.as_mut_ptr(), self.size)
            .map_err(|e| Error::Memory(format!("pre-allocating guest RAM: {e}")))
    }

    /// Make all of guest RAM zero by freeing its pages (a destination whose RAM file held
    /// something before: pages the source sends as zero runs are not written).
    pub fn discard(&self) -> Result<()> {
        sys::punch_hole(&self.file, self.size).map_err(|e| Error::Memory(format!("freeing guest RAM: {e}")))
    }

    /// Map every page that holds data (never the holes, which would allocate them) into this
    /// process for reading: a source reading another process's RAM file then takes no page
    /// fault per page during the migration.
    pub fn populate_read(&self) -> Result<()> {
        for (start, end) in self.data_extents()? {
            let (start, end) = (start.min(self.size), end.min(self.size));
            if end > start {
                sys::populate_read(self.host_addr(start)?, end - start)
                    .map_err(|e| Error::Memory(format!("mapping guest RAM for reading: {e}")))?;
            }
        }
        Ok(())
    }

    pub fn read_u64(&self, gpa: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    pub fn write_u64(&self, gpa: u64, v: u64) -> Result<()> {
        self.write(gpa, &v.to_le_bytes())
    }

    /// A raw I/O vector over guest memory, for `writev`/`readv`/io_uring. The bytes may change
    /// underneath while the guest runs; the caller only passes the pointer to the kernel.
    pub fn iovec(&self, gpa: u64, len: u64) -> Result<libc::iovec> {
        self.check(gpa, len)?;
        Ok(libc::iovec { iov_base: self.host_addr(gpa)?.cast(), iov_len: len as usize })
    }

    /// Lend the guest bytes at `gpa..gpa + len` to `f`, for a consumer that loads each byte
    /// once and needs no stable copy (a cipher sealing from RAM into its own buffer). The
    /// guest may change the bytes while `f` runs; `f` then sees one of their values.
    pub fn with_bytes<R>(&self, gpa: u64, len: u64, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        self.check(gpa, len)?;
        // SAFETY: the range is inside the mapping (checked above), which lives as long as
        // `self` and so outlives the borrow handed to `f`. Bytes a running guest changes
        // meanwhile are read as either value by consumers that load each byte once.
        let bytes = unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(gpa as usize), len as usize) };
        Ok(f(bytes))
    }

    /// Snapshot all of guest RAM (tests and `--dump-memory`).
    pub fn snapshot(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.size as usize];
        self.read(0, &mut v).expect("whole RAM is in range");
        v
    }
}

/// Check a requested RAM size and say what is wrong with it.
pub fn validate_ram_size(size: u64) -> Result<()> {
    if size < MIN_RAM {
        return Err(Error::BadRamSize(size, "below the 64 MiB minimum"));
    }
    if size > MAX_RAM {
        return Err(Error::BadRamSize(size, "above the 64 GiB maximum"));
    }
    if !size.is_multiple_of(2 << 20) {
        return Err(Error::BadRamSize(size, "not a multiple of 2 MiB"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_nonzero_byte_anywhere_makes_a_page_nonzero() {
        let ram = GuestRam::new(64 << 20).unwrap();
        assert!(ram.page_is_zero(3).unwrap(), "untouched page");
        // Every cache-line boundary the early exits depend on, and both ends of the page.
        for off in [0u64, 7, 8, 63, 64, 511, 512, 513, 2048, 4088, 4095] {
            let gpa = 3 * PAGE_SIZE + off;
            ram.write(gpa, &[0x80]).unwrap();
            assert!(!ram.page_is_zero(3).unwrap(), "byte at offset {off}");
            assert!(ram.page_is_zero(2).unwrap() && ram.page_is_zero(4).unwrap(), "neighbours of offset {off}");
            ram.write(gpa, &[0]).unwrap();
            assert!(ram.page_is_zero(3).unwrap(), "cleared offset {off}");
        }
        assert!(ram.page_is_zero(16384).is_err(), "a page beyond RAM is an error, not a read");
    }
}
