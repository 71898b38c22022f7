//! Dirty logging is on only while a migration runs: a guest writes as fast after a failed or
//! a successful migration as one that was never migrated.
use std::time::Instant;

use accel_user::app::config::{ByteSize, DirtySource, WorkloadKind};
use accel_user::app::session;
use accel_user::wire::frame::FrameKind;
use embedded_vmm::vmm::Machine;
use migaccel_tests::{config, spawn_receiver, wait_for_reports, Cut, Proxy};

/// Passes per second over the guest's pages (one report = one pass of 4096 page writes per
/// vCPU), measured once every vCPU has made a full pass since `m` (re)started: KVM hands back
/// write access one fault per page after logging stops, so the first pass is not counted.
fn pass_rate(m: &Machine) -> f64 {
    wait_for_reports(m, 2);
    const PASSES: u64 = 200;
    let t0 = Instant::now();
    wait_for_reports(m, PASSES);
    PASSES as f64 / t0.elapsed().as_secs_f64()
}

/// With logging left on, a pass here runs ~100x (ring) to ~1000x slower than without; a
/// guest within 20x of its never-migrated rate is running unlogged even on a busy host.
const BOUND: f64 = 0.05;

#[test]
fn guest_runs_unlogged_before_after_a_failed_and_after_a_successful_migration() {
    for dirty in [DirtySource::Ring, DirtySource::Bitmap] {
        let mut c = config(WorkloadKind::Hot, dirty);
        c.guest.vcpus = 2;
        c.guest.hot_working_set = ByteSize(32 << 20);
        c.migration.streams = 1; // the cutting proxy relays one connection
        let src = session::boot_source(&c).unwrap();
        assert!(!src.dirty().is_logging(), "{dirty:?}: a booted VM is not dirty-logged");
        let fresh = pass_rate(&src);

        // While logging is on (as during precopy), for the record.
        src.dirty().start().unwrap();
        let logged = pass_rate(&src);
        src.dirty().stop().unwrap();

        // A migration cut as round 1 ends: the source runs on, unlogged.
        let (addr, t) = spawn_receiver(&c);
        let proxy = Proxy::start(addr, Cut::AtFrame(FrameKind::EndOfRound, 1));
        let err = session::send(&c, &src, &proxy.addr, &mut |_| {}).expect_err("the cut fails the migration");
        // The cut came before `Complete` got through: the destination never resumed.
        migaccel_tests::resume_if_fenced(&err, &src);
        drop(proxy);
        let _ = t.join().unwrap();
        assert!(!src.dirty().is_logging(), "{dirty:?}: logging stays on after a failed migration");
        let failed = pass_rate(&src);

        // A successful migration: the destination VM was never logged, the source stops.
        let (addr, t) = spawn_receiver(&c);
        session::send(&c, &src, &addr, &mut |_| {}).expect("migration");
        let (r, res) = t.join().unwrap();
        res.expect("destination");
        assert!(!src.dirty().is_logging(), "{dirty:?}: logging stays on after a successful migration");
        let dst = r.machine().unwrap();
        assert!(!dst.dirty().is_logging(), "{dirty:?}: the destination VM is dirty-logged");
        let migrated = pass_rate(dst);

        let rates = format!(
            "{dirty:?}: passes/s never migrated {fresh:.0}, logged {logged:.0}, after a failed migration {failed:.0}, \
             migrated {migrated:.0}"
        );
        eprintln!("{rates}");
        assert!(failed >= BOUND * fresh, "{rates}");
        assert!(migrated >= BOUND * fresh, "{rates}");
    }
}
