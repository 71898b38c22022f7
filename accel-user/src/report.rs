//! Migration reports: human-readable and JSON.
use std::time::Duration;

use kvm_hooks::migratable::VmShape;
use serde::Serialize;

use crate::policy::{RoundStats, SwitchReason};

pub use crate::policy::ser_ms;

#[derive(Debug, Clone, Serialize)]
pub struct GuestInfo {
    pub ram_bytes: u64,
    pub vcpus: u32,
    pub workload: String,
}

impl GuestInfo {
    /// A VM of `shape` running `workload` (its description, for reports).
    pub fn new(shape: VmShape, workload: String) -> Self {
        GuestInfo { ram_bytes: shape.ram_bytes, vcpus: shape.vcpus, workload }
    }
}

/// The source's view of a completed migration.
#[derive(Debug, Clone, Serialize)]
pub struct SourceReport {
    pub guest: GuestInfo,
    pub dirty_mode: String,
    #[serde(serialize_with = "ser_ms", rename = "total_ms")]
    pub total: Duration,
    /// Source vCPUs stopped → destination vCPUs running (acknowledged), excluding
    /// verification capture time on the destination.
    #[serde(serialize_with = "ser_ms", rename = "downtime_ms")]
    pub downtime: Duration,
    /// Connect + handshake (destination VM created).
    #[serde(serialize_with = "ser_ms", rename = "setup_ms")]
    pub setup: Duration,
    /// Guest page writes per second during setup (dirty logging off) and during precopy
    /// (logging on), where the VM counts its guest's writes.
    pub guest_writes_per_s_setup: Option<f64>,
    pub guest_writes_per_s_precopy: Option<f64>,
    /// Transports built before connecting (io_uring rings; with fixed buffers, guest RAM
    /// registered, which pins every page): before the migration's clock, not in `total`.
    #[serde(serialize_with = "ser_ms", rename = "prepare_ms")]
    pub prepare: Duration,
    #[serde(serialize_with = "ser_ms", rename = "capture_ms")]
    pub capture: Duration,
    /// CPU time of this process (every thread, the VM's vCPUs included) over `total`.
    #[serde(serialize_with = "ser_ms", rename = "cpu_ms")]
    pub cpu: Duration,
    /// Wall-clock time (µs since the Unix epoch) of the guest's last heartbeat before it
    /// was paused: the earliest any vCPU went silent. With the destination's
    /// `guest_first_report_unix_us` it gives the blackout the guest sees.
    pub guest_last_report_unix_us: Option<u64>,
    pub precopy_rounds: Vec<RoundStats>,
    pub final_round: RoundStats,
    pub switchover: SwitchReason,
    pub bytes_total: u64,
    pub vcpu_state_bytes: u64,
    /// Wire bytes / total time (verification capture excluded).
    pub throughput_mib_s: f64,
    /// Precopy throughput (bytes of rounds / their time), the link the engine saw.
    pub precopy_throughput_mib_s: f64,
    /// Pages dirtied per second while precopy ran (after round 0).
    pub dirty_rate_pages_s: f64,
    pub ring_full_exits: u64,
    pub duplicate_reports: u64,
    /// Transport and mode, e.g. "2 x io_uring zero-copy, fixed buffers".
    pub transport: String,
    pub streams: u32,
    /// What the kernel said about zero-copy sends, for io_uring zero-copy.
    pub zerocopy: Option<ZeroCopyReport>,
    /// Confidential mode: pages the source MH encrypted (private pages and VMSA pages).
    pub mh_exported: Option<u64>,
    /// Confidential mode: of those, pages the MH found all zero and sent as zero records.
    pub mh_zero_records: Option<u64>,
    /// Confidential mode with an external page-state record: what it was.
    pub page_states: Option<String>,
    /// Pages held back for a later round because the page-state records disagreed.
    pub pages_deferred: u64,
    /// The destination's `Resumed` was lost (why), and the destination, asked on a new
    /// connection, said it runs the VM: downtime then counts up to that answer.
    pub handover_query: Option<String>,
    /// A cancel that came after the commit point (why): the handover went on, since the
    /// destination may already run the VM.
    pub cancelled_after_commit: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct ZeroCopyReport {
    pub sends: u64,
    pub notifications: u64,
    /// Sends the kernel completed without copying.
    pub zerocopy: u64,
    /// Sends the kernel copied anyway (loopback and veth always copy).
    pub copied: u64,
}

impl From<kvm_hooks::uring::ZcStats> for ZeroCopyReport {
    fn from(z: kvm_hooks::uring::ZcStats) -> Self {
        ZeroCopyReport { sends: z.sends, notifications: z.notifs, zerocopy: z.zerocopy, copied: z.copied }
    }
}

impl SourceReport {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        m: &dyn kvm_hooks::migratable::Migratable,
        rounds: Vec<RoundStats>,
        fin: RoundStats,
        switchover: SwitchReason,
        setup: Duration,
        total: Duration,
        downtime: Duration,
        bytes_total: u64,
        vcpu_state_bytes: u64,
        capture: Duration,
    ) -> Self {
        let mib = |b: u64, d: Duration| if d.is_zero() { 0.0 } else { b as f64 / (1 << 20) as f64 / d.as_secs_f64() };
        let pre_bytes: u64 = rounds.iter().map(|r| r.bytes).sum();
        let pre_time: Duration = rounds.iter().map(|r| r.elapsed).sum();
        let dirty: u64 = rounds.iter().map(|r| r.dirty_after).sum();
        let dirty_rate = if pre_time.is_zero() { 0.0 } else { dirty as f64 / pre_time.as_secs_f64() };
        let counters = m.dirty_log().counters();
        SourceReport {
            guest: GuestInfo::new(m.shape(), m.describe()),
            dirty_mode: m.dirty_log().describe(),
            total,
            downtime,
            setup,
            prepare: Duration::ZERO,
            guest_writes_per_s_setup: None,
            guest_writes_per_s_precopy: None,
            capture,
            cpu: Duration::ZERO,
            guest_last_report_unix_us: None,
            throughput_mib_s: mib(bytes_total, total),
            precopy_throughput_mib_s: mib(pre_bytes, pre_time),
            precopy_rounds: rounds,
            final_round: fin,
            switchover,
            bytes_total,
            vcpu_state_bytes,
            dirty_rate_pages_s: dirty_rate,
            ring_full_exits: counters.ring_full_exits,
            duplicate_reports: counters.duplicates,
            transport: String::new(),
            streams: 1,
            zerocopy: None,
            mh_exported: None,
            mh_zero_records: None,
            page_states: None,
            pages_deferred: 0,
            handover_query: None,
            cancelled_after_commit: None,
        }
    }

    pub fn text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let g = &self.guest;
        let _ = writeln!(
            s,
            "guest: {} MiB, {} vCPUs, workload {}, dirty tracking {}",
            g.ram_bytes >> 20,
            g.vcpus,
            g.workload,
            self.dirty_mode
        );
        let _ = writeln!(
            s,
            "{:>6} {:>10} {:>10} {:>12} {:>10} {:>12} {:>9}",
            "round", "pages", "zero", "MiB", "ms", "dirty after", "throttle"
        );
        for r in self.precopy_rounds.iter().chain(std::iter::once(&self.final_round)) {
            let _ = writeln!(
                s,
                "{:>6} {:>10} {:>10} {:>12.1} {:>10.1} {:>12} {:>8}%",
                r.round,
                r.pages,
                r.zero_pages,
                r.bytes as f64 / (1 << 20) as f64,
                r.elapsed.as_secs_f64() * 1e3,
                r.dirty_after,
                r.throttle_pct
            );
        }
        let _ = writeln!(s, "switchover: {:?}", self.switchover);
        if let Some(why) = &self.cancelled_after_commit {
            let _ = writeln!(s, "cancel ({why}) came after the commit point: the handover went on");
        }
        if let Some(why) = &self.handover_query {
            let _ = writeln!(s, "handover: Resumed was lost ({why}); the destination, asked, runs the VM");
        }
        let _ = writeln!(
            s,
            "total {:.1} ms, setup {:.1} ms (after {:.1} ms preparing transports), downtime {:.1} ms, {:.1} MiB at {:.0} MiB/s (precopy {:.0} MiB/s), dirty rate {:.0} pages/s",
            self.total.as_secs_f64() * 1e3,
            self.setup.as_secs_f64() * 1e3,
            self.prepare.as_secs_f64() * 1e3,
            self.downtime.as_secs_f64() * 1e3,
            self.bytes_total as f64 / (1 << 20) as f64,
            self.throughput_mib_s,
            self.precopy_throughput_mib_s,
            self.dirty_rate_pages_s
        );
        if let (Some(a), Some(b)) = (self.guest_writes_per_s_setup, self.guest_writes_per_s_precopy) {
            let _ = writeln!(s, "guest page writes/s: {a:.0} during setup (unlogged), {b:.0} during precopy (logged)");
        }
        let _ = writeln!(
            s,
            "process CPU during the migration: {:.0} ms (vCPU threads included)",
            self.cpu.as_secs_f64() * 1e3
        );
        let _ = writeln!(s, "transport: {}", self.transport);
        if let Some(z) = &self.zerocopy {
            let _ = writeln!(
                s,
                "zero-copy: {} sends, {} notifications: {} without copy, {} copied by the kernel",
                z.sends, z.notifications, z.zerocopy, z.copied
            );
        }
        if let Some(n) = self.mh_exported {
            let _ = writeln!(
                s,
                "confidential: {n} pages encrypted by the in-guest Migration Handler (private pages and vCPU state), {} of them zero records; the host read none of them",
                self.mh_zero_records.unwrap_or(0)
            );
        }
        if let Some(p) = &self.page_states {
            let _ = writeln!(
                s,
                "page states: {p}, checked against the VMM's record; {} page(s) deferred while a conversion was in flight",
                self.pages_deferred
            );
        }
        if self.ring_full_exits > 0 {
            let _ = writeln!(s, "dirty ring full exits: {}", self.ring_full_exits);
        }
        s
    }
}

/// The destination's view.
#[derive(Debug, Clone, Serialize)]
pub struct DestReport {
    pub guest: GuestInfo,
    pub rounds: u32,
    pub pages: u64,
    pub bytes: u64,
    #[serde(serialize_with = "ser_ms", rename = "total_ms")]
    pub total: Duration,
    /// Progress counters when the VM resumed and once every vCPU had reported since.
    pub progress_at_resume: Vec<u64>,
    pub progress_after: Vec<u64>,
    pub guest_alive: bool,
    /// How long after the resume every vCPU had reported progress (or the liveness check
    /// gave up).
    #[serde(serialize_with = "ser_ms", rename = "liveness_ms")]
    pub liveness: Duration,
    /// When the last vCPU to do so first reported after the resume (µs since the Unix
    /// epoch); `None` if one never did.
    pub guest_first_report_unix_us: Option<u64>,
    /// CPU time of this process (every thread) from the source's connection to the resume.
    #[serde(serialize_with = "ser_ms", rename = "cpu_ms")]
    pub cpu: Duration,
    /// Guest RAM was allocated before the migration (`receiver.prepare_ram`).
    pub prepared_ram: bool,
    /// Time that preparation took, before the source connected.
    #[serde(serialize_with = "ser_ms", rename = "prepare_ms")]
    pub prepare: Duration,
}
