//! Dirty-tracking oracle in the style of Linux `dirty_log_test`.
//!
//! The guest writes the current iteration number into pseudo-random pages. At every
//! harvest the vCPUs are paused, so the check is exact: every page whose content changed
//! since the previous harvest must be reported dirty. A tiny ring forces ring-full exits.
use std::time::Duration;

use embedded_vmm::guest::DATA_START;
use embedded_vmm::vmm::{GuestSpec, Machine, Workload};
use kvm_hooks::dirty::DirtySet;
use kvm_hooks::vm::DirtyPreference;
use migaccel_tests::wait_for_reports;

const PAGES: u64 = 16384;
const WRITES_PER_REPORT: u64 = 1024;

fn oracle(pref: DirtyPreference) -> (u64, u64, u64) {
    let spec = GuestSpec { ram_bytes: 128 << 20, vcpus: 2, workload: Workload::Oracle { pages: PAGES } };
    let m = Machine::boot(spec, pref).unwrap();
    let mut shadow = vec![0u64; PAGES as usize];
    let mut iter = 1u64;
    m.set_oracle_iteration(iter).unwrap();
    m.dirty().start().unwrap();
    let (mut missed, mut changed) = (0u64, 0u64);
    let writes = |m: &Machine| m.progress().iter().sum::<u64>() * WRITES_PER_REPORT;
    // Each iteration lets every vCPU write one batch of WRITES_PER_REPORT pages (more than a
    // 256-entry ring holds), however slowly the host runs the guest.
    while writes(&m) < 1_000_000 || iter < 20 {
        m.resume().unwrap();
        wait_for_reports(&m, 1);
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

/// The migration invariant without a network: harvest while the vCPUs keep running, copy
/// each harvested page into a shadow (as a send would), repeat; then pause, harvest once
/// more and copy. The shadow must equal guest RAM exactly, or a write escaped tracking
/// while tracking was re-armed under running vCPUs.
fn running_harvest(pref: DirtyPreference, workload: Workload) -> (u64, u32) {
    let spec = GuestSpec { ram_bytes: 128 << 20, vcpus: 2, workload };
    let m = Machine::boot(spec, pref).unwrap();
    m.set_oracle_iteration(1).unwrap();
    m.resume().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    // Round 0: start tracking, then copy all RAM.
    m.dirty().start().unwrap();
    let mut shadow = m.ram().snapshot();
    let mut page = vec![0u8; 4096];
    let mut copied = 0u64;
    for round in 0..200u32 {
        m.set_oracle_iteration(u64::from(round) + 2).unwrap();
        std::thread::sleep(Duration::from_micros(500));
        for g in m.dirty().take().unwrap() {
            m.ram().read(g * 4096, &mut page).unwrap();
            shadow[(g * 4096) as usize..((g + 1) * 4096) as usize].copy_from_slice(&page);
            copied += 1;
        }
    }
    m.pause().unwrap();
    for g in m.dirty().take().unwrap() {
        m.ram().read(g * 4096, &mut page).unwrap();
        shadow[(g * 4096) as usize..((g + 1) * 4096) as usize].copy_from_slice(&page);
    }
    let now = m.ram().snapshot();
    // The parameter page is written by the host (the iteration number), which KVM does not
    // track by design; every other page is written only by the guest.
    let param = (embedded_vmm::guest::PARAM / 4096) as usize;
    let diff: Vec<usize> = (0..now.len() / 4096)
        .filter(|&p| p != param && now[p * 4096..(p + 1) * 4096] != shadow[p * 4096..(p + 1) * 4096])
        .take(8)
        .collect();
    assert!(diff.is_empty(), "{pref:?} {workload:?}: pages written without being reported while tracking re-armed under running vCPUs: {diff:?}");
    (copied, diff.len() as u32)
}

#[test]
fn harvesting_under_running_vcpus_loses_no_write() {
    for _ in 0..2 {
        for pref in
            [DirtyPreference::Ring { bytes: 4096 }, DirtyPreference::Ring { bytes: 64 << 10 }, DirtyPreference::Bitmap]
        {
            for w in [Workload::Oracle { pages: 16384 }, Workload::Ab] {
                let (copied, _) = running_harvest(pref, w);
                assert!(copied > 10_000, "{pref:?} {w:?}: only {copied} pages re-copied");
            }
        }
    }
}
