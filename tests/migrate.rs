//! Live migration of real guests over loopback: every workload, ring and bitmap.
use accel_user::app::config::{DirtySource, WorkloadKind};
use accel_user::app::session;
use migaccel_tests::{config, demo_with_guest_writes};

fn migrate(workload: WorkloadKind, dirty: DirtySource) {
    let mut c = config(workload, dirty);
    // At least three rounds, with the guest writing between them, so the test exercises
    // dirty tracking across rounds (a one-round migration proves nothing).
    if workload != WorkloadKind::Idle {
        c.migration.downtime_target_ms = 1;
        c.migration.min_rounds = 3;
        c.migration.max_rounds = 5;
    }
    let out = demo_with_guest_writes(&c).expect("migration succeeds");
    let r = &out.report;
    let v = &r.verification;
    assert_eq!(v.pages_compared, (128 << 20) / 4096);
    assert!(v.mismatched_pages.is_empty(), "destination RAM differs from source at pages {:?}", v.mismatched_pages);
    assert!(v.ab_invariant_error.is_none(), "{:?}", v.ab_invariant_error);
    assert!(
        v.guest_alive,
        "destination guest not running: {:?} -> {:?}",
        r.destination.progress_at_resume, r.destination.progress_after
    );
    assert_eq!(out.source_ram.len(), out.dest_ram.len());
    // The guest's heartbeat: silent at the source from the pause on, back at the destination
    // after the resume.
    let last = r.source.guest_last_report_unix_us.expect("the source guest reported");
    let first = r.destination.guest_first_report_unix_us.expect("every destination vCPU reported");
    assert!(first > last, "destination heartbeat at {first} µs, source's last at {last} µs");
    assert!(r.source.cpu > std::time::Duration::ZERO && r.destination.cpu > std::time::Duration::ZERO);
    let rounds = r.source.precopy_rounds.len();
    if workload != WorkloadKind::Idle {
        assert!(rounds >= 3, "only {rounds} precopy rounds");
        // Pages written between rounds were found and re-sent (round 1 carries what the
        // guest wrote during round 0, which a starved guest may not have done).
        let later = &r.source.precopy_rounds[2..];
        assert!(later.iter().all(|x| x.pages > 0), "{:?}", r.source.precopy_rounds);
        assert!(r.source.final_round.pages > 0, "{:?}", r.source.final_round);
        // The guest wrote between rounds, so the report counts writes during precopy.
        let w = r.source.guest_writes_per_s_precopy.expect("the embedded VMM counts guest writes");
        assert!(w > 0.0, "{w}");
    } else {
        assert_eq!(r.source.guest_writes_per_s_precopy, Some(0.0), "an idle guest writes nothing");
    }
    let mode = &r.source.dirty_mode;
    match dirty {
        DirtySource::Ring => assert!(mode.starts_with("ring"), "{mode}"),
        DirtySource::Bitmap => assert_eq!(mode, "bitmap"),
        DirtySource::Ebpf => assert!(mode.starts_with("ebpf"), "{mode}"),
    }
    // Round 0 sends all RAM; most of an idle guest's RAM goes as compact zero records.
    assert_eq!(r.source.precopy_rounds[0].pages, (128 << 20) / 4096);
    if workload == WorkloadKind::Idle {
        let r0 = &r.source.precopy_rounds[0];
        assert!(r0.zero_pages > r0.pages / 2, "{r0:?}");
        assert!(r0.bytes < (16 << 20), "zero pages must not travel as 4 KiB each: {r0:?}");
    }
}

#[test]
fn ab_ring() {
    migrate(WorkloadKind::Ab, DirtySource::Ring);
}
#[test]
fn ab_bitmap() {
    migrate(WorkloadKind::Ab, DirtySource::Bitmap);
}
#[test]
fn hot_ring() {
    migrate(WorkloadKind::Hot, DirtySource::Ring);
}
#[test]
fn hot_bitmap() {
    migrate(WorkloadKind::Hot, DirtySource::Bitmap);
}
#[test]
fn idle_ring() {
    migrate(WorkloadKind::Idle, DirtySource::Ring);
}
#[test]
fn idle_bitmap() {
    migrate(WorkloadKind::Idle, DirtySource::Bitmap);
}

/// The large guests below hold several GiB each (both VMs and both RAM snapshots): one at
/// a time.
static LARGE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn large() -> std::sync::MutexGuard<'static, ()> {
    LARGE.lock().unwrap_or_else(|e| e.into_inner())
}

/// A guest spanning two 1 GiB memslots, with 4 vCPUs. Also the regression test of data
/// streams that registered all of guest RAM after the handshake: the destination timed out
/// waiting for their Join while the source was still pinning pages.
#[test]
fn ab_multi_slot_four_vcpus() {
    let _g = large();
    let mut c = config(WorkloadKind::Ab, DirtySource::Ring);
    c.migration.fixed_buffers = true;
    c.guest.ram = accel_user::app::config::ByteSize(1536 << 20);
    c.guest.vcpus = 4;
    c.guest.warmup_ms = 300;
    let out = session::demo(&c, &mut |_| {}).expect("migration succeeds");
    let v = &out.report.verification;
    assert!(v.ok(), "{v:?}");
}

/// A guest that rewrites all of its RAM converges through auto-converge, and the
/// destination runs unthrottled.
#[test]
fn ab_all_ram_converges() {
    let mut c = config(WorkloadKind::Ab, DirtySource::Ring);
    c.guest.ram = accel_user::app::config::ByteSize(512 << 20);
    c.migration.max_rounds = 40;
    let out = session::demo(&c, &mut |_| {}).expect("migration succeeds");
    let r = &out.report.source;
    assert!(
        matches!(r.switchover, accel_user::policy::SwitchReason::Converged { .. }),
        "{:?} after {:?}",
        r.switchover,
        r.precopy_rounds
    );
    assert!(out.report.verification.ok(), "{:?}", out.report.verification);
}

/// Round 0 of a prefilled guest carries every data page as data, not as a zero record.
fn assert_prefilled_round_0(out: &session::DemoOutcome) {
    let r0 = &out.report.source.precopy_rounds[0];
    let outside_data = embedded_vmm::guest::DATA_START / 4096;
    assert!(r0.zero_pages <= outside_data, "a prefilled page went as a zero record: {r0:?}");
    assert!(r0.bytes >= (r0.pages - outside_data) * 4096, "{r0:?}");
}

/// A prefilled 4 GiB guest with every migration setting at its default (`auto` transport,
/// two data streams, the bitmap): all of its RAM moves, page for page.
#[test]
fn four_gib_prefilled_guest_with_default_settings() {
    let _g = large();
    let mut c = accel_user::app::config::Config::default();
    c.guest.ram = accel_user::app::config::ByteSize(4 << 30);
    c.guest.prefill = true;
    c.receiver.liveness_timeout_ms = migaccel_tests::HANG.as_millis() as u64;
    let out = session::demo(&c, &mut |_| {}).unwrap_or_else(|e| panic!("{e:#}"));
    let v = &out.report.verification;
    assert_eq!(v.pages_compared, (4 << 30) / 4096);
    assert!(v.ok(), "{v:?}");
    assert!(out.report.source.transport.contains("2 x"), "{}", out.report.source.transport);
    assert_prefilled_round_0(&out);
}

/// A prefilled 1 GiB guest with a full-speed writer over 256 MiB, as QEMU's migration tests
/// run theirs: page-for-page equal, the A/B invariant holds over the hot range.
#[test]
fn one_gib_prefilled_hot_guest() {
    let _g = large();
    let mut c = config(WorkloadKind::Hot, DirtySource::Ring);
    c.guest.ram = accel_user::app::config::ByteSize(1 << 30);
    c.guest.hot_working_set = accel_user::app::config::ByteSize(256 << 20);
    c.guest.prefill = true;
    let out = session::demo(&c, &mut |_| {}).unwrap_or_else(|e| panic!("{e:#}"));
    let v = &out.report.verification;
    assert_eq!(v.pages_compared, (1 << 30) / 4096);
    assert!(v.ok(), "{v:?}");
    assert_prefilled_round_0(&out);
}
