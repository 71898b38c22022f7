//! The boundary between the migration engine and a VM: what the sending side needs
//! ([`Migratable`]) and what the receiving side needs ([`VmFactory`], [`Incoming`]), and
//! nothing about how the VM is run. The embedded VMM implements it; so does the fake VM
//! of the engine's unit tests; a VM whose KVM handles belong to another process (QEMU,
//! followed through the eBPF probe) is meant to implement it too, so no method assumes the
//! caller owns the VM's file descriptors.
use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use crate::dirty::{DirtyMode, DirtyTracker};
use crate::error::{Error, Result};
use crate::memory::{validate_ram_size, GuestRam};
use crate::mh::{Launch, MhError, MhHost};
use crate::state::VcpuState;

/// Most vCPUs a VM shape may have: the limit KVM and the wire format share.
pub const MAX_VCPUS: u32 = 64;

/// What a destination must recreate before any page arrives: the VM's shape, nothing about
/// what runs in it (that travels in its RAM and vCPU state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmShape {
    pub ram_bytes: u64,
    pub vcpus: u32,
}

impl VmShape {
    /// Check the shape and say which field is wrong.
    pub fn validate(&self) -> Result<()> {
        validate_ram_size(self.ram_bytes)?;
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(Error::Vcpu { vcpu: self.vcpus as usize, msg: format!("vCPU count must be 1..={MAX_VCPUS}") });
        }
        Ok(())
    }
}

/// A guest's page-state announcement (the arguments of `KVM_HC_MAP_GPA_RANGE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageStateRequest {
    pub vcpu: u32,
    pub gpa: u64,
    pub npages: u64,
    pub attrs: u64,
}

/// A record of page states kept outside the VMM: the eBPF page-state map, the only record a
/// migrator has for a VM it does not own. The engine classifies pages by it; for a VM it
/// owns it checks it against the VMM's own record ([`Migratable::is_shared`]).
pub trait ExternalPageStates: Send + Sync {
    /// Apply every change reported so far, then return one bit per guest page, set for a
    /// shared page. An error means the record cannot be trusted.
    fn shared_bitmap(&self) -> std::result::Result<Vec<u64>, String>;
    /// What the record is, for reports ("eBPF page-state map: 12 events applied").
    fn describe(&self) -> String;
}

/// Counters a dirty log keeps, for reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirtyCounters {
    /// Times a vCPU stopped because its dirty ring was full.
    pub ring_full_exits: u64,
    /// Reports for a page that was already pending.
    pub duplicates: u64,
}

/// Dirty-page tracking as the engine drives it. Logging is on only between `start` and
/// `stop`; while it is off every page counts as dirty.
pub trait DirtyLog: Send + Sync {
    /// Turn logging on and drop everything pending (round 0 sends all RAM).
    fn start(&self) -> Result<()>;
    /// Turn logging off; from now on every page counts as dirty.
    fn stop(&self) -> Result<()>;
    /// Remove and return every page reported dirty so far, ascending.
    fn take(&self) -> Result<Vec<u64>>;
    /// Put pages back: a send of them failed.
    fn restore(&self, gfns: &[u64]);
    /// Count every page as dirty (a full resend is needed).
    fn mark_all(&self);
    /// What reports the pages ("ring(4096 entries/vCPU)", "bitmap", "ebpf (…)").
    fn describe(&self) -> String;
    fn counters(&self) -> DirtyCounters;
}

/// A VM as the sending side of a migration sees it.
pub trait Migratable {
    fn shape(&self) -> VmShape;
    /// What runs in the VM, for reports ("idle", "qemu pid 1234").
    fn describe(&self) -> String;
    fn ram(&self) -> &Arc<GuestRam>;
    fn dirty_log(&self) -> &dyn DirtyLog;
    /// Stop every vCPU and wait until none runs guest code.
    fn pause(&self) -> Result<()>;
    fn resume(&self) -> Result<()>;
    /// Why the VM stopped on its own, if it did.
    fn fault(&self) -> Option<String>;
    /// Hold vCPUs off the CPU this percent of the time (auto-converge); 0 = full speed.
    fn set_throttle(&self, percent: u8);
    fn throttle(&self) -> u8;
    /// Every vCPU's state (the VM must be paused).
    fn save_states(&self) -> Result<Vec<VcpuState>>;
    /// The host end of the in-guest Migration Handler's rings, when one runs.
    fn mh(&self) -> MutexGuard<'_, Option<MhHost>>;
    /// Page states as an outside record (the eBPF map) sees them, when one is attached.
    fn external_page_states(&self) -> Option<Arc<dyn ExternalPageStates>>;
    /// The VMM's own record: whether `gfn` is shared (unencrypted).
    fn is_shared(&self, gfn: u64) -> bool;
    /// One bit per page, set for a shared page.
    fn shared_bitmap(&self) -> Vec<u64>;
    /// Shared pages as ascending `(first gfn, pages)` ranges.
    fn shared_ranges(&self) -> Vec<(u64, u64)>;
    /// Page writes the guest made so far, where the VMM can count them (reports show how
    /// much dirty logging slows the guest); `None` where it cannot.
    fn page_writes(&self) -> Option<u64> {
        None
    }
}

impl DirtyLog for DirtyTracker {
    fn start(&self) -> Result<()> {
        DirtyTracker::start(self)
    }
    fn stop(&self) -> Result<()> {
        DirtyTracker::stop(self)
    }
    fn take(&self) -> Result<Vec<u64>> {
        DirtyTracker::take(self)
    }
    fn restore(&self, gfns: &[u64]) {
        DirtyTracker::restore(self, gfns)
    }
    fn mark_all(&self) {
        DirtyTracker::mark_all(self)
    }
    fn describe(&self) -> String {
        match (self.mode(), self.source_name()) {
            (_, n) if n.starts_with("ebpf") => format!("ebpf ({n})"),
            (DirtyMode::Ring { bytes }, _) => format!("ring({} entries/vCPU)", bytes / 16),
            (DirtyMode::Bitmap, _) => "bitmap".into(),
        }
    }
    fn counters(&self) -> DirtyCounters {
        use std::sync::atomic::Ordering::Relaxed;
        DirtyCounters {
            ring_full_exits: self.stats.ring_full_exits.load(Relaxed),
            duplicates: self.stats.duplicates.load(Relaxed),
        }
    }
}

/// A VM as the receiving side of a migration fills and starts it: created before any page
/// arrives, resumed only once it is complete.
pub trait Incoming: Send {
    fn shape(&self) -> VmShape;
    fn ram(&self) -> &Arc<GuestRam>;
    /// Start the in-guest Migration Handler (confidential VMs), before any page arrives.
    fn launch_mh(&mut self, launch: &Launch, timeout: Duration) -> std::result::Result<(), MhError>;
    fn mh(&self) -> MutexGuard<'_, Option<MhHost>>;
    /// Record `npages` pages from `gfn` as shared (the source VM's page-state record).
    fn mark_shared(&self, gfn: u64, npages: u64) -> Result<()>;
    /// Set every vCPU's state (the VM has not run yet).
    fn restore_states(&self, states: &[VcpuState]) -> Result<()>;
    fn resume(&self) -> Result<()>;
}

/// Creates the VMs migrations arrive into.
pub trait VmFactory: Send {
    type Vm: Incoming;
    /// A paused VM of `shape`, over `ram` when the destination allocated it ahead.
    fn create(&self, shape: VmShape, ram: Option<GuestRam>) -> Result<Self::Vm>;
}
