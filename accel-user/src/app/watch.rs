//! `migaccel watch`: the eBPF probes on a VM this process does not own (QEMU, another
//! migaccel). KVM answers EIO to a non-owner's ioctls, so tracepoints are the only view:
//! dirty-ring pushes per memslot, and the guest's page-state requests.
use std::time::{Duration, Instant};

use accel_ebpf::{DirtyCounter, EbpfError, PageStateProbe, SlotPushes, Target};
use kvm_hooks::process::Pidfd;
use serde::Serialize;

/// Page-state map size for a foreign VM, whose RAM size is unknown here: 64 GiB of
/// guest-physical space (a 2 MiB bitmap); ranges beyond it are rejected and counted.
const FOREIGN_PAGES: u64 = 1 << 24;

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("process {pid}: {source}")]
    Process {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("process {pid} holds no KVM VM (no anon_inode:kvm-vm file descriptor): nothing to watch")]
    NotAVmm { pid: u32 },
    #[error("watching process {pid}: {source}")]
    Probe {
        pid: u32,
        #[source]
        source: EbpfError,
    },
}

/// One interval.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub at_ms: u64,
    /// Dirty-ring pushes in the interval: pages the guest wrote for the first time since its
    /// VMM last re-armed them.
    pub pushes: u64,
    pub pushes_per_s: f64,
    pub page_state_events: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct WatchReport {
    pub pid: u32,
    pub vms: usize,
    pub samples: Vec<Sample>,
    /// Totals per memslot with any push.
    pub slots: Vec<SlotTotal>,
    pub pushes: u64,
    /// Pushes the program could not attribute to a memslot.
    pub lost: u64,
    pub page_states_applied: u64,
    pub page_states_rejected: u64,
    pub snp_page_state_changes: u64,
    /// Pages the guest announced shared, as far as the events said.
    pub shared_pages: u64,
    /// The process exited while watched.
    pub exited: bool,
    pub watched_ms: u64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct SlotTotal {
    pub address_space: u32,
    pub slot: u32,
    pub pushes: u64,
}

impl From<SlotPushes> for SlotTotal {
    fn from(s: SlotPushes) -> Self {
        SlotTotal { address_space: s.address_space, slot: s.slot, pushes: s.pushes }
    }
}

/// Watch `pid` for `duration` (or until it exits), calling `on` after every `interval`.
pub fn watch(
    pid: u32,
    duration: Duration,
    interval: Duration,
    on: &mut dyn FnMut(&Sample),
) -> Result<WatchReport, WatchError> {
    let perr = |source| WatchError::Process { pid, source };
    // The pidfd first: from here on a recycled pid cannot stand in for the process.
    let pidfd = Pidfd::open(pid).map_err(perr)?;
    let vms = kvm_hooks::process::kvm_vms(pid).map_err(perr)?;
    if vms == 0 {
        return Err(WatchError::NotAVmm { pid });
    }
    let probe = |source| WatchError::Probe { pid, source };
    let dirty = DirtyCounter::attach(Target::Process(pid)).map_err(probe)?;
    let states = PageStateProbe::attach(Target::Process(pid), FOREIGN_PAGES).map_err(probe)?;
    let t0 = Instant::now();
    let mut samples = Vec::new();
    let (mut last_pushes, mut last_events, mut last_t) = (0u64, 0u64, t0);
    let mut exited = false;
    while t0.elapsed() < duration {
        let step = interval.min(duration.saturating_sub(t0.elapsed()));
        exited = pidfd.wait_exit(step).map_err(perr)?;
        let now = Instant::now();
        let pushes = dirty.stats().map_err(probe)?.pushes;
        let events = states.stats().map_err(probe)?.page_state_events;
        let dt = now.duration_since(last_t).as_secs_f64();
        let s = Sample {
            at_ms: now.duration_since(t0).as_millis() as u64,
            pushes: pushes - last_pushes,
            pushes_per_s: if dt > 0.0 { (pushes - last_pushes) as f64 / dt } else { 0.0 },
            page_state_events: events - last_events,
        };
        on(&s);
        samples.push(s);
        (last_pushes, last_events, last_t) = (pushes, events, now);
        if exited {
            break;
        }
    }
    states.sync();
    let slots: Vec<SlotTotal> = dirty.counts().map_err(probe)?.into_iter().map(Into::into).collect();
    let st = dirty.stats().map_err(probe)?;
    let ps = states.states().lock().unwrap_or_else(|e| e.into_inner());
    let shared = ps.shared_bitmap().iter().map(|w| u64::from(w.count_ones())).sum();
    Ok(WatchReport {
        pid,
        vms,
        samples,
        // From the per-slot totals, so that the lines add up (the counters keep moving).
        pushes: slots.iter().map(|t| t.pushes).sum::<u64>() + st.lost,
        slots,
        lost: st.lost,
        page_states_applied: ps.applied,
        page_states_rejected: ps.rejected,
        snp_page_state_changes: ps.snp_requests,
        shared_pages: shared,
        exited,
        watched_ms: t0.elapsed().as_millis() as u64,
    })
}

impl WatchReport {
    pub fn text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let secs = self.watched_ms as f64 / 1e3;
        let _ = writeln!(
            s,
            "process {}: {} KVM VM(s) watched for {secs:.1} s{}",
            self.pid,
            self.vms,
            if self.exited { " (it exited)" } else { "" }
        );
        let rate = if secs > 0.0 { self.pushes as f64 / secs } else { 0.0 };
        let _ = writeln!(s, "dirty-ring pushes: {} ({rate:.0} pages/s), lost: {}", self.pushes, self.lost);
        for t in &self.slots {
            let _ = writeln!(s, "  address space {} slot {}: {} pushes", t.address_space, t.slot, t.pushes);
        }
        let _ = writeln!(
            s,
            "page-state events: {} applied, {} rejected, {} SNP page-state changes; {} pages shared",
            self.page_states_applied, self.page_states_rejected, self.snp_page_state_changes, self.shared_pages
        );
        s
    }
}
