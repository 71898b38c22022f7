//! Dirty-tracking oracle in the style of Linux `dirty_log_test`.
//!
//! The guest writes the current iteration number into pseudo-random pages. At every
//! harvest the vCPUs are paused, so the check is exact: every page whose content changed
//! since the previous harvest must be reported dirty. A tiny ring forces ring-full exits.
use std::time::Duration;

use kvm_hooks::dirty::DirtySet;
use kvm_hooks::guest::DATA_START;
use kvm_hooks::vm::DirtyPreference;
use kvm_hooks::vmm::{GuestSpec, Machine, Workload};

const PAGES: u64 = 16384;
const WRITES_PER_REPORT: u64 = 1024;

fn oracle(pref: DirtyPreference) -> (u64, u64, u64) {
    let spec = GuestSpec { ram_bytes: 128 << 20, vcpus: 2, workload: Workload::Oracle { pages: PAGES } };
    let m = Machine::boot(spec, pref).unwrap();
    let mut shadow = vec![0u64; PAGES as usize];
    let mut iter = 1u64;
    m.set_oracle_iteration(iter).unwrap();
    m.dirty().reset().unwrap();
    let (mut missed, mut changed) = (0u64, 0u64);
    let writes = |m: &Machine| m.progress().iter().sum::<u64>() * WRITES_PER_REPORT;
    while (writes(&m) < 1_000_000 || iter < 20) && iter < 5000 {
        m.resume().unwrap();
        std::thread::sleep(Duration::from_millis(3));
        m.pause().unwrap();
        assert!(m.fault().is_none(), "{:?}", m.fault());
        let mut dirty = DirtySet::new(m.ram().pages());
        for g in m.dirty().take().unwrap() {
            dirty.insert(g);
        }
        for p in 0..PAGES {
            let gpa = DATA_START + p * 4096;
            let v = m.ram().read_u64(gpa).unwrap();
            assert!(v <= iter, "page {p} holds {v}, newer than iteration {iter}");
            if v != shadow[p as usize] {
                changed += 1;
                if !dirty.contains(gpa / 4096) {
                    missed += 1;
                }
                shadow[p as usize] = v;
            }
        }
        iter += 1;
        m.set_oracle_iteration(iter).unwrap();
    }
    let w = writes(&m);
    assert!(w >= 1_000_000, "only {w} guest writes in {iter} iterations");
    assert_eq!(missed, 0, "{missed} of {changed} changed pages were not reported dirty");
    assert!(changed > 10_000, "the guest changed only {changed} pages");
    (w, changed, m.dirty().stats.ring_full_exits.load(std::sync::atomic::Ordering::Relaxed))
}

#[test]
fn ring_reports_every_written_page_including_ring_full() {
    // 256 entries (one 4 KiB page): fills many times per iteration.
    let (w, changed, full) = oracle(DirtyPreference::Ring { bytes: 4096 });
    assert!(full > 0, "the ring never filled ({w} writes, {changed} changed pages)");
}

#[test]
fn bitmap_reports_every_written_page() {
    oracle(DirtyPreference::Bitmap);
}
