//! The boundary between the migration engine and a VM: what the sending side needs
//! ([`Migratable`]) and what the receiving side needs ([`VmFactory`], [`Incoming`]), and
//! nothing about how the VM is run. The embedded VMM implements it, so do the fake VM of
//! the engine's unit tests and a QEMU process migaccel attaches to (`qemu-vm`), so no
//! method assumes the caller owns the VM's file descriptors: RAM is a file with a region
//! table, the machine state is opaque, confidential support is optional, and the dirty log
//! hands out only pages that are safe to copy.
use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use crate::dirty::{DirtyMode, DirtyTracker};
use crate::error::{Error, Result};
use crate::layout::RamLayout;
use crate::memory::{validate_ram_size, GuestRam};
use crate::mh::{Launch, MhError, MhHost};

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
/// `stop`; while it is off every page counts as dirty. Pages are RAM pages (offsets in the
/// RAM file, [`crate::layout::RamPage`]), which for RAM at GPA 0 are guest frames.
///
/// The harvest rule: [`DirtyLog::take`] hands out only pages that are **safe to copy
/// now**, pages whose next write will be reported again. KVM's dirty ring reports a page
/// once and leaves it writable until the ring entry is reset; a tracker that cannot reset
/// the ring itself (a VM another process owns) keeps such pages back until the owner's
/// reset re-protects them, and counts them in [`DirtyLog::pending`].
pub trait DirtyLog: Send + Sync {
    /// Turn logging on and drop everything pending (round 0 sends all RAM).
    fn start(&self) -> Result<()>;
    /// Turn logging off; from now on every page counts as dirty.
    fn stop(&self) -> Result<()>;
    /// Remove and return every page reported dirty so far that is safe to copy, ascending.
    fn take(&self) -> Result<Vec<u64>>;
    /// With every vCPU paused: remove and return every page reported dirty, whether or not
    /// its report was re-protected (no vCPU can write it any more).
    fn take_final(&self) -> Result<Vec<u64>> {
        self.take()
    }
    /// Pages reported dirty but held back by `take` until they are safe to copy.
    fn pending(&self) -> u64 {
        0
    }
    /// Put pages back: a send of them failed.
    fn restore(&self, gfns: &[u64]);
    /// Count every page as dirty (a full resend is needed).
    fn mark_all(&self);
    /// What reports the pages ("ring(4096 entries/vCPU)", "bitmap", "ebpf (…)").
    fn describe(&self) -> String;
    fn counters(&self) -> DirtyCounters;
}

/// Which kind of VM produced a machine state: a destination of another kind cannot read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum VmKind {
    /// migaccel's embedded VMM: the state is each vCPU's KVM state ([`VcpuState`]).
    Embedded = 1,
    /// A QEMU process: the state is QEMU's own migration stream of its devices.
    Qemu = 2,
}

impl VmKind {
    pub fn from_u32(v: u32) -> Option<VmKind> {
        match v {
            1 => Some(VmKind::Embedded),
            2 => Some(VmKind::Qemu),
            _ => None,
        }
    }
}

impl std::fmt::Display for VmKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmKind::Embedded => "an embedded-VMM VM",
            VmKind::Qemu => "a QEMU VM",
        })
    }
}

/// Largest section of machine state.
pub const MAX_SECTION: usize = 1 << 20;
/// Largest machine state (all sections together).
pub const MAX_MACHINE_STATE: usize = 256 << 20;

/// Everything of a VM that is not RAM, as sections only the same kind of VM reads back:
/// the embedded VM's vCPU registers (one section per vCPU), QEMU's device stream (cut
/// into sections). The engine carries it and never looks inside.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineState {
    pub sections: Vec<Vec<u8>>,
}

impl MachineState {
    /// Cut `bytes` into sections of at most [`MAX_SECTION`].
    pub fn from_stream(bytes: &[u8]) -> MachineState {
        MachineState { sections: bytes.chunks(MAX_SECTION).map(<[u8]>::to_vec).collect() }
    }
    /// The sections joined again.
    pub fn stream(&self) -> Vec<u8> {
        self.sections.concat()
    }
    pub fn bytes(&self) -> usize {
        self.sections.iter().map(Vec::len).sum()
    }
}

/// What can go wrong between the engine and a VM: the KVM layer, or the VMM that owns the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Kvm(#[from] Error),
    /// The owning VMM (QEMU) refused or failed a step; the text names the VMM and the step.
    #[error("{0}")]
    Vmm(String),
    /// A machine state this VM cannot take.
    #[error("machine state: {0}")]
    State(String),
    /// The VM cannot do this at all (a confidential step on a VM without a Migration Handler).
    #[error("{0}")]
    Unsupported(String),
}

pub type VmResult<T> = std::result::Result<T, VmError>;

/// The confidential side of a source VM: an in-guest Migration Handler and the guest's
/// shared/private page record. Optional: only VMs that run a Migration Handler have it.
pub trait ConfidentialSource {
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
}

/// A VM as the sending side of a migration sees it.
pub trait Migratable {
    fn kind(&self) -> VmKind;
    fn shape(&self) -> VmShape;
    /// What runs in the VM, for reports ("idle", "qemu pid 1234").
    fn describe(&self) -> String;
    /// Guest RAM, with its layout ([`GuestRam::layout`]).
    fn ram(&self) -> &Arc<GuestRam>;
    fn dirty_log(&self) -> &dyn DirtyLog;
    /// Stop every vCPU and wait until none runs guest code.
    fn pause(&self) -> VmResult<()>;
    fn resume(&self) -> VmResult<()>;
    /// Why the VM stopped on its own, if it did.
    fn fault(&self) -> Option<String>;
    /// Hold vCPUs off the CPU this percent of the time (auto-converge); 0 = full speed.
    /// A VM that cannot be throttled ignores it and keeps reporting 0.
    fn set_throttle(&self, percent: u8);
    fn throttle(&self) -> u8;
    /// Everything but RAM (the VM must be paused and its last dirty pages taken).
    fn save_machine_state(&self) -> VmResult<MachineState>;
    /// What the switchover costs besides the final pages (saving, sending and loading the
    /// machine state), so the downtime estimate counts it.
    fn switchover_cost(&self) -> Duration {
        Duration::ZERO
    }
    /// The Migration Handler and page-state record, for VMs that can run one (its `mh()`
    /// says whether one runs now).
    fn confidential(&self) -> Option<&dyn ConfidentialSource> {
        None
    }
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

/// The confidential side of a destination VM, for VMs that can run a Migration Handler.
pub trait ConfidentialIncoming {
    fn mh(&self) -> MutexGuard<'_, Option<MhHost>>;
    /// Record `npages` pages from `gfn` as shared (the source VM's page-state record).
    fn mark_shared(&self, gfn: u64, npages: u64) -> Result<()>;
}

/// A VM as the receiving side of a migration fills and starts it: created before any page
/// arrives, resumed only once it is complete.
pub trait Incoming: Send {
    fn shape(&self) -> VmShape;
    fn ram(&self) -> &Arc<GuestRam>;
    /// Start the in-guest Migration Handler (confidential VMs), before any page arrives.
    fn launch_mh(&mut self, _launch: &Launch, _timeout: Duration) -> std::result::Result<(), MhError> {
        Err(MhError::BadRequest("this kind of VM cannot run a Migration Handler".into()))
    }
    /// The Migration Handler and page-state record, once `launch_mh` started one.
    fn confidential(&self) -> Option<&dyn ConfidentialIncoming> {
        None
    }
    /// Take the source's machine state (the VM has not run yet). RAM is complete by now.
    fn restore_machine_state(&mut self, state: &MachineState) -> VmResult<()>;
    fn resume(&self) -> VmResult<()>;
}

/// Creates the VMs migrations arrive into.
pub trait VmFactory: Send {
    type Vm: Incoming;
    /// The kind of VM this factory creates (a source of another kind is refused).
    fn kind(&self) -> VmKind;
    /// The VM's RAM exists already (a QEMU waiting for the migration holds it): the
    /// receiver does not check the host's free memory for it.
    fn has_ram(&self) -> bool {
        false
    }
    /// A paused VM of `shape` whose RAM the guest sees as `layout`, over `ram` when the
    /// destination allocated it ahead. A layout it cannot give the guest is refused.
    fn create(&self, shape: VmShape, layout: &RamLayout, ram: Option<GuestRam>) -> VmResult<Self::Vm>;
}
