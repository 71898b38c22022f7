//! Confidential migrations through the in-guest Migration Handler on an extra vCPU at both
//! ends: private pages and vCPU state travel only as MH-encrypted blobs.
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use accel_ebpf::{PageStateEvent, PageStateKind, PageStateProbe, ATTR_ENCRYPTED};
use accel_user::app::config::{Config, DirtySource, PageStateSource, WorkloadKind};
use accel_user::app::session;
use accel_user::dest::RecvState;
use accel_user::source::{Event, Phase};
use accel_user::wire::frame::FrameKind;
use accel_user::wire::payload::BLOB_LEN;
use embedded_vmm::guest::{PRIVATE_CANARY, SHARED_CANARY};
use embedded_vmm::vmm::Machine;
use migaccel_tests::{assert_ram_eq, assert_running, config, contains, RecvThread, Tamper, Tap};

/// A 0600 key file derived from `byte` (different bytes give different keys).
fn key_file(tag: &str, byte: u8) -> PathBuf {
    let p = std::env::temp_dir().join(format!("migaccel-test-{tag}-{}.key", std::process::id()));
    let key: [u8; 32] = std::array::from_fn(|i| byte ^ (i as u8).wrapping_mul(0x3b));
    std::fs::write(&p, key).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn confidential(workload: WorkloadKind, tag: &str) -> Config {
    let mut c = config(workload, DirtySource::Ring);
    c.confidential.enabled = true;
    c.confidential.key_file = Some(key_file(tag, 0x5c));
    c.migration.downtime_target_ms = 1;
    c.migration.min_rounds = 3;
    c.migration.max_rounds = 5;
    c
}

use migaccel_tests::spawn_receiver as receiver;

/// The host is the adversary of a confidential VM: it holds the channel's key and sees every
/// frame in clear. Tests that watch or edit the stream as the host would run the channel
/// without its own sealing, so what they check is the Migration Handler's protection alone
/// (the channel's is tested in `tests/auth.rs`).
fn host_view(c: &mut Config) {
    c.auth.insecure = true;
}

/// Source and destination RAM equal outside the MH region (each side's own).
fn assert_same_ram(src: &Machine, dst: &[u8]) {
    let mut a = src.ram().snapshot();
    let mut b = dst.to_vec();
    session::blank_mh_region(&mut a);
    session::blank_mh_region(&mut b);
    assert_ram_eq(&a, &b, &"confidential migration");
}

/// The migration failed: the destination reports an error and never resumed the VM, and
/// the source VM runs on.
fn assert_failed_cleanly(t: RecvThread, src: &Machine) {
    let (r, res) = t.join().unwrap();
    assert!(res.is_err(), "the destination must report the failure");
    assert!(r.machine().is_none_or(|m| !m.is_running()), "the destination must not resume");
    assert_running(src);
}

fn migrate(workload: WorkloadKind) {
    migrate_with(confidential(workload, &format!("{workload:?}")))
}

fn migrate_with(c: Config) {
    let out = session::demo(&c, &mut |_| {}).expect("confidential migration succeeds");
    let r = &out.report;
    let v = &r.verification;
    assert!(v.mismatched_pages.is_empty(), "destination RAM differs at pages {:?}", v.mismatched_pages);
    assert!(v.ab_invariant_error.is_none(), "{:?}", v.ab_invariant_error);
    assert!(v.guest_alive, "{:?} -> {:?}", r.destination.progress_at_resume, r.destination.progress_after);
    let rounds = r.source.precopy_rounds.len();
    assert!(rounds >= 3, "only {rounds} precopy rounds");
    let exported = r.source.mh_exported.expect("the report counts MH exports");
    let written: u64 = r.source.precopy_rounds.iter().map(|x| x.pages - x.zero_pages).sum();
    assert!(exported >= written, "{exported} pages through the MH, {written} data pages sent");
    // The guest zeroes pages it wrote: the MH sent them as zero records (counted with the
    // zero pages), and the destination holds zero there (the verification above). Without
    // zero records they travelled as ciphertext.
    let zeros = r.source.mh_zero_records.expect("the report counts zero records");
    let zero_pages: u64 =
        r.source.precopy_rounds.iter().chain(std::iter::once(&r.source.final_round)).map(|x| x.zero_pages).sum();
    if c.confidential.zero_records {
        assert!(zeros > 0 && zeros <= zero_pages && zeros <= exported, "{zeros} zero records, {zero_pages} zero pages");
    } else {
        assert_eq!(zeros, 0, "zero records were sent though the launch did not allow them");
    }
    // One Blobs frame (24-byte header, 8-byte prefix) of whole encrypted VMSA pages.
    let sb = r.source.vcpu_state_bytes;
    assert!(sb > 32 && (sb - 32).is_multiple_of(BLOB_LEN as u64), "vCPU state travelled as {sb} bytes, not as blobs");
}

#[test]
fn ab_confidential() {
    migrate(WorkloadKind::Ab);
}

#[test]
fn hot_confidential() {
    migrate(WorkloadKind::Hot);
}

/// One batch at a time, the whole slot area per doorbell: the unpipelined path; and no
/// zero records.
#[test]
fn confidential_without_the_pipeline_or_zero_records() {
    let mut c = confidential(WorkloadKind::Ab, "nopipe");
    (c.confidential.mh_pipeline, c.confidential.mh_batch) = (false, mh_abi::NSLOTS);
    c.confidential.zero_records = false;
    migrate_with(c);
}

/// The MH on three handler vCPUs at both ends (the destination runs as many as the source
/// announces): each lane moves the private pages of its own granules, lane 0 closes last,
/// and the destination holds the source's RAM and runs.
#[test]
fn confidential_on_several_handler_vcpus() {
    let mut c = confidential(WorkloadKind::Hot, "lanes");
    c.confidential.mh_vcpus = 3;
    migrate_with(c);
}

/// Private pages scattered over RAM (the oracle guest writes pseudo-random pages): a batch
/// is many short runs, more requests than a pipelined half of the MH ring holds, and the
/// migration still delivers identical RAM.
#[test]
fn scattered_private_pages_in_many_short_runs() {
    scattered(1, "scatter");
}

/// The same on four handler vCPUs: runs are split between lanes, and a batch whose share of
/// a lane's ring is not free while the previous batch is in flight waits for it.
#[test]
fn scattered_private_pages_on_four_handler_vcpus() {
    scattered(4, "scatter4");
}

fn scattered(lanes: u32, tag: &str) {
    use embedded_vmm::vmm::{GuestSpec, Workload};
    let mut c = confidential(WorkloadKind::Ab, tag);
    c.confidential.mh_vcpus = lanes;
    c.migration.min_rounds = 3;
    let spec = GuestSpec { ram_bytes: c.guest.ram.0, vcpus: 1, workload: Workload::Oracle { pages: 8192 } };
    let mut src = Machine::boot(spec, c.dirty_preference()).unwrap();
    session::launch_mh(&c, &mut src).unwrap();
    src.resume().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let (addr, t) = receiver(&c);
    let rep = session::send(&c, &src, &addr, &mut |_| {}).expect("migration of scattered private pages");
    let (r, res) = t.join().unwrap();
    assert_same_ram(&src, &res.expect("destination").snapshot.unwrap());
    assert_running(r.machine().unwrap());
    assert!(rep.precopy_rounds.len() >= 3);
}

/// A destination slower than the source's exports: the first 300 Blobs frames are held
/// back on the way, so the source's sends block while its MH has the next batch in flight, and the
/// destination imports frame by frame. Nothing is lost or reordered: RAM is identical and
/// the VM runs at the destination.
#[test]
fn pipelined_export_to_a_slow_destination() {
    let mut c = confidential(WorkloadKind::Ab, "slowdest");
    c.confidential.mh_batch = 32; // many frames: many batches in flight in turn
    c.migration.streams = 1;
    let src = session::boot_source(&c).unwrap();
    let (addr, t) = receiver(&c);
    let slow: Tamper = Box::new(|k, n, _| {
        if k == FrameKind::Blobs && n < 300 {
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    let tap = Tap::start(addr, Some(slow));
    let rep = session::send(&c, &src, &tap.addr, &mut |_| {}).expect("migration to a slow destination");
    let (r, res) = t.join().unwrap();
    let got = res.expect("destination");
    drop(tap);
    assert_same_ram(&src, &got.snapshot.unwrap());
    assert_running(r.machine().unwrap());
    let blobs = rep.mh_exported.unwrap();
    assert!(blobs > 3 * 32, "{blobs} pages through the MH: too few for the pipeline to turn");
}

/// A wire capture never holds the private canary; shared pages travel in clear.
#[test]
fn private_pages_never_cross_the_wire_in_clear() {
    let mut c = confidential(WorkloadKind::Canary, "canary");
    host_view(&mut c);
    c.migration.streams = 1; // one connection: the tap sees everything
    let src = session::boot_source(&c).unwrap();
    let (addr, t) = receiver(&c);
    let tap = Tap::start(addr, None);
    let rep = session::send(&c, &src, &tap.addr, &mut |_| {}).expect("migration");
    let (r, res) = t.join().unwrap();
    let got = res.expect("destination");
    let captured = tap.captured.clone();
    drop(tap);
    let wire = captured.lock().unwrap();
    assert!(rep.precopy_rounds.len() >= 2);
    let (private, shared) = (PRIVATE_CANARY.to_le_bytes(), SHARED_CANARY.to_le_bytes());
    let snap = got.snapshot.clone().unwrap();
    assert!(contains(&snap, &private), "private pages arrived (decrypted by the destination MH)");
    assert!(wire.len() as u64 > (c.guest.ram.0 / 4), "the capture holds the migration ({} bytes)", wire.len());
    assert!(!contains(&wire, &private), "a private canary crossed the wire in clear");
    assert!(contains(&wire, &shared), "shared pages travel on the direct path, in clear");
    assert_same_ram(&src, &snap);
    assert_running(r.machine().unwrap());
    let ranges = src.shared_ranges();
    assert_eq!(ranges.len(), c.guest.vcpus as usize, "each vCPU announced one shared range");
    assert_eq!(r.machine().unwrap().shared_ranges(), ranges, "the destination VMM knows the same shared pages");
}

/// The page-state record travels in a PageStates frame that the destination checks: a range
/// outside guest RAM or over the MH region, or a record that never ends, is refused.
#[test]
fn hostile_page_states_are_refused() {
    let on_states = |f: fn(&mut [u8])| -> Option<Tamper> {
        Some(Box::new(move |k, _n, p| {
            if k == FrameKind::PageStates {
                f(p)
            }
        }))
    };
    // Payload: count u32, flags u32, then {gfn u64, npages u64} per range.
    hostile_with(
        WorkloadKind::Canary,
        "ps-outside",
        on_states(|p| p[32..40].copy_from_slice(&(1u64 << 40).to_le_bytes())), // range 1's npages
        None,
        "outside guest RAM",
    );
    hostile_with(
        WorkloadKind::Canary,
        "ps-region",
        on_states(|p| {
            p[8..16].copy_from_slice(&(mh_abi::REGION / 4096).to_le_bytes());
            p[16..24].copy_from_slice(&1u64.to_le_bytes());
        }),
        None,
        "inside the MH region",
    );
    hostile_with(WorkloadKind::Canary, "ps-unended", on_states(|p| p[4] = 0), None, "page states never arrived");
}

/// Offsets inside a Blobs payload: 8-byte prefix, then blobs of
/// `kind u32, round u32, gfn u64, seq u64, tag [16], data [4096]`.
const B0: usize = 8;

/// The blobs of a Blobs payload as `(offset, kind)`: after the 8-byte prefix each blob is a
/// 40-byte header and, unless it is a zero record, 4096 bytes of ciphertext.
fn blobs_in(p: &[u8]) -> Vec<(usize, u32)> {
    let count = u32::from_le_bytes(p[4..8].try_into().unwrap()) as usize;
    let mut at = B0;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let kind = u32::from_le_bytes(p[at..at + 4].try_into().unwrap());
        out.push((at, kind));
        at += if kind == mh_abi::Kind::Zero as u32 { 40 } else { BLOB_LEN };
    }
    out
}

/// Run a confidential migration through a tampering proxy (or with the destination holding
/// `dest_key`): it must fail, the destination must never resume, the source must keep
/// running, and a clean retry must then deliver identical RAM (nothing was lost).
fn hostile(tag: &str, tamper: Option<Tamper>, dest_key: Option<u8>, want: &str) {
    hostile_with(WorkloadKind::Ab, tag, tamper, dest_key, want)
}

fn hostile_with(workload: WorkloadKind, tag: &str, tamper: Option<Tamper>, dest_key: Option<u8>, want: &str) {
    hostile_on(1, workload, tag, tamper, dest_key, want)
}

/// [`hostile_with`] with the MH on `lanes` handler vCPUs at both ends.
fn hostile_on(lanes: u32, workload: WorkloadKind, tag: &str, tamper: Option<Tamper>, dest_key: Option<u8>, want: &str) {
    let mut c = confidential(workload, tag);
    c.confidential.mh_vcpus = lanes;
    host_view(&mut c);
    c.migration.streams = 1;
    c.migration.max_rounds = 4;
    // The tap keeps the failed destination's socket half open: fail fast.
    c.migration.ack_timeout_ms = 3_000;
    let src = session::boot_source(&c).unwrap();
    let mut dc = c.clone();
    if let Some(k) = dest_key {
        dc.confidential.key_file = Some(key_file(&format!("{tag}-dest"), k));
    }
    let (addr, t) = receiver(&dc);
    let tap = Tap::start(addr, tamper);
    let err = session::send(&c, &src, &tap.addr, &mut |_| {}).expect_err("a hostile wire must fail the migration");
    let (r, res) = t.join().unwrap();
    let rerr = res.expect_err("the destination must refuse").to_string();
    assert!(rerr.contains(want), "destination error {rerr:?} does not say {want:?}");
    assert!(err.to_string().contains(want), "source error {err} does not carry the reason {want:?}");
    assert_eq!(r.state(), RecvState::Failed);
    if let Some(m) = r.machine() {
        assert!(!m.is_running(), "the destination resumed a VM with tampered memory");
    }
    drop(r); // closes the destination's sockets, so the tap drains
    drop(tap);
    assert_running(&src);
    // Nothing lost: a clean retry (new destination MH, new Begin) delivers identical RAM.
    let (addr, t) = receiver(&c);
    session::send(&c, &src, &addr, &mut |_| {}).expect("retry");
    let (r, res) = t.join().unwrap();
    assert_same_ram(&src, &res.expect("retry destination").snapshot.unwrap());
    assert_running(r.machine().unwrap());
}

fn on_blobs(mut f: impl FnMut(usize, &mut [u8]) + Send + 'static) -> Option<Tamper> {
    Some(Box::new(move |k, n, p| {
        if k == FrameKind::Blobs {
            f(n, p)
        }
    }))
}

/// On one handler vCPU and on two (the blobs then belong to two lanes).
#[test]
fn tampered_ciphertext_is_refused() {
    for lanes in [1, 2] {
        tampered_ciphertext(lanes);
    }
}

fn tampered_ciphertext(lanes: u32) {
    // Frame 0 is the Begin marker; later frames hold the blobs of round 0: flip one byte
    // of the first page of ciphertext.
    let mut done = false;
    let t = on_blobs(move |n, p| {
        let page = blobs_in(p).into_iter().find(|&(_, k)| k == mh_abi::Kind::Page as u32);
        if let (false, true, Some((at, _))) = (done, n >= 1, page) {
            p[at + 40 + 123] ^= 0x01;
            done = true;
        }
    });
    hostile_on(lanes, WorkloadKind::Ab, &format!("tamper{lanes}"), t, None, "failed authentication");
}

#[test]
fn relocated_blob_is_refused() {
    let t = on_blobs(|n, p| {
        if n == 2 {
            // Present the first blob's page as the next gfn.
            let g = u64::from_le_bytes(p[B0 + 8..B0 + 16].try_into().unwrap());
            p[B0 + 8..B0 + 16].copy_from_slice(&(g + 1).to_le_bytes());
        }
    });
    hostile("relocate", t, None, "failed authentication");
}

/// Several handler vCPUs: a page blob relabelled as a page of a granule of the other lane goes
/// to the other lane, which numbers its blobs in a space of its own and refuses it.
#[test]
fn a_blob_moved_to_another_lanes_page_is_refused() {
    let t = on_blobs(|n, p| {
        if n == 2 {
            let g = u64::from_le_bytes(p[B0 + 8..B0 + 16].try_into().unwrap());
            // An odd number of granules on (past the MH region): the other of two lanes.
            let to = g + mh_abi::GRANULE_PAGES;
            let to = if mh_abi::in_region(to) { to + 2 * mh_abi::GRANULE_PAGES } else { to };
            assert_ne!(mh_abi::lane_of(g, 2), mh_abi::lane_of(to, 2));
            p[B0 + 8..B0 + 16].copy_from_slice(&to.to_le_bytes());
        }
    });
    hostile_on(2, WorkloadKind::Ab, "lanemove", t, None, "out of sequence");
}

/// On one handler vCPU and on two (a replayed blob then goes to the lane of its page).
#[test]
fn replayed_blob_from_an_earlier_round_is_refused() {
    for lanes in [1, 2] {
        replayed_blob(lanes);
    }
}

fn replayed_blob(lanes: u32) {
    let mut saved: Option<Vec<u8>> = None;
    let t = on_blobs(move |n, p| {
        let round = u32::from_le_bytes(p[0..4].try_into().unwrap());
        let count = u32::from_le_bytes(p[4..8].try_into().unwrap()) as usize;
        let first_kind = u32::from_le_bytes(p[B0..B0 + 4].try_into().unwrap());
        if n >= 1 && round == 0 && first_kind == 1 && saved.is_none() {
            saved = Some(p[B0..B0 + BLOB_LEN].to_vec()); // a round-0 page blob
        } else if round >= 1 && first_kind == 1 && count >= 1 {
            if let Some(old) = &saved {
                p[B0..B0 + BLOB_LEN].copy_from_slice(old);
            }
        }
    });
    hostile_on(lanes, WorkloadKind::Ab, &format!("replay{lanes}"), t, None, "out of sequence");
}

#[test]
fn wrong_key_at_the_destination_is_refused() {
    for lanes in [1, 2] {
        hostile_on(lanes, WorkloadKind::Ab, &format!("wrongkey{lanes}"), None, Some(0x77), "failed authentication");
    }
}

/// An MH that stops answering: the migration fails with a timeout that says so, the source
/// keeps running, and once the MH answers again a retry succeeds.
#[test]
fn source_mh_that_stops_answering() {
    let mut c = confidential(WorkloadKind::Ab, "hang");
    c.confidential.mh_timeout_ms = 300;
    let src = session::boot_source(&c).unwrap();
    src.mh().as_ref().unwrap().set_frozen(true);
    let (addr, t) = receiver(&c);
    let err = session::send(&c, &src, &addr, &mut |_| {}).expect_err("a hung MH must fail the migration");
    assert!(err.to_string().contains("stopped answering"), "{err}");
    assert_failed_cleanly(t, &src);
    {
        let mut g = src.mh();
        let h = g.as_mut().unwrap();
        h.set_frozen(false);
        // The retry must not fail because a loaded host delays a batch past 300 ms: both
        // handlers get a limit only a real hang reaches.
        h.timeout = Duration::from_secs(60);
    }
    c.confidential.mh_timeout_ms = 60_000;
    let (addr, t) = receiver(&c);
    session::send(&c, &src, &addr, &mut |_| {}).expect("retry once the MH answers");
    let (_r, res) = t.join().unwrap();
    assert_same_ram(&src, &res.expect("retry destination").snapshot.unwrap());
}

#[test]
fn nosend_policy_and_missing_key_are_refused() {
    let mut c = confidential(WorkloadKind::Idle, "nosend");
    c.confidential.sev_policy = 0x8 | 0x4; // NOSEND | ES
    let e = session::boot_source(&c).expect_err("NOSEND").to_string();
    assert!(e.contains("NOSEND"), "{e}");
    // A receiver without a key refuses a confidential source, before any page moves.
    let c = confidential(WorkloadKind::Idle, "nokey");
    let src = session::boot_source(&c).unwrap();
    let mut plain = c.clone();
    plain.confidential.enabled = false;
    let (addr, t) = receiver(&plain);
    let err = session::send(&c, &src, &addr, &mut |_| {}).expect_err("refused");
    assert!(err.to_string().contains("no transport key"), "{err}");
    let _ = t.join();
    assert_running(&src);
}

#[test]
fn blob_aimed_at_the_mh_region_or_outside_ram_is_refused() {
    let region = mh_abi::REGION / 4096;
    let t = on_blobs(move |n, p| {
        if n == 2 {
            p[B0 + 8..B0 + 16].copy_from_slice(&(region + 3).to_le_bytes());
        }
    });
    hostile("region", t, None, "inside the MH region");
    let t = on_blobs(|n, p| {
        if n == 2 {
            p[B0 + 8..B0 + 16].copy_from_slice(&(1u64 << 40).to_le_bytes());
        }
    });
    hostile("outside", t, None, "outside guest RAM");
}

/// A source MH that corrupts its completion ring (here: a producer index far beyond what was
/// asked) fails the migration with a clear error; the source keeps running and the
/// destination never resumes.
#[test]
fn hostile_completion_ring_aborts_the_migration() {
    let c = confidential(WorkloadKind::Ab, "ring");
    let src = session::boot_source(&c).unwrap();
    {
        let g = src.mh();
        let h = g.as_ref().unwrap();
        h.set_frozen(true);
        h.ram().write(mh_abi::COMP_RING + mh_abi::RING_PROD, &4000u32.to_le_bytes()).unwrap();
    }
    let (addr, t) = receiver(&c);
    let err = session::send(&c, &src, &addr, &mut |_| {}).expect_err("a corrupt ring must fail the migration");
    assert!(err.to_string().contains("completion ring is corrupt"), "{err}");
    assert_failed_cleanly(t, &src);
}

/// `page_state_source = "ebpf"`: the engine classifies pages by the eBPF page-state map
/// (fed by the `kvm_hypercall` program), checked against the VMM's record. Private pages
/// still never cross the wire in clear, shared ones still do, and the map saw every request.
#[test]
fn ebpf_page_state_map_classifies_a_confidential_migration() {
    let mut c = confidential(WorkloadKind::Canary, "ps-ebpf");
    host_view(&mut c);
    c.confidential.page_state_source = PageStateSource::Ebpf;
    c.migration.streams = 1; // one connection: the tap sees everything
    let src = session::boot_source(&c).unwrap();
    let (addr, t) = receiver(&c);
    let tap = Tap::start(addr, None);
    let rep = session::send(&c, &src, &tap.addr, &mut |_| {}).expect("migration");
    let (r, res) = t.join().unwrap();
    let got = res.expect("destination");
    let captured = tap.captured.clone();
    drop(tap);
    let wire = captured.lock().unwrap();
    let (handled, refused) = src.page_state_counts();
    assert_eq!((handled, refused), (u64::from(c.guest.vcpus), 0), "each vCPU announces its shared half once");
    let desc = rep.page_states.clone().expect("the report names the page-state record");
    assert!(desc.contains(&format!("{handled} events applied, 0 rejected")), "{desc}");
    assert_eq!(rep.pages_deferred, 0, "no conversion was in flight");
    assert!(!contains(&wire, &PRIVATE_CANARY.to_le_bytes()), "a private canary crossed the wire in clear");
    assert!(contains(&wire, &SHARED_CANARY.to_le_bytes()), "shared pages travel on the direct path");
    assert_same_ram(&src, &got.snapshot.clone().unwrap());
    assert_running(r.machine().unwrap());
    assert_eq!(r.machine().unwrap().shared_ranges(), src.shared_ranges());
}

/// An idle source with 16 private pages of data written by the host, whose eBPF page-state
/// map says "shared" for them (a lost or forged event). Nothing rewrites those pages, so they
/// reach the destination only if the engine keeps them dirty. Returns the configuration
/// (page states from eBPF, one stream), the machine, the probe and the first page.
fn source_with_a_wrong_page_state_map(name: &str) -> (Config, Machine, Arc<PageStateProbe>, u64) {
    let mut c = confidential(WorkloadKind::Idle, name);
    host_view(&mut c);
    c.confidential.page_state_source = PageStateSource::Ebpf;
    c.migration.streams = 1;
    let mut src = Machine::boot(c.guest_spec(), c.dirty_preference()).unwrap();
    let probe = session::attach_page_states(&src).unwrap();
    session::launch_mh(&c, &mut src).unwrap();
    src.resume().unwrap();
    let first = c.guest_spec().vcpu_range(0).0 / 4096 + 64;
    for g in first..first + 16 {
        src.ram().write(g * 4096, &[PRIVATE_CANARY.to_le_bytes(), g.to_le_bytes()].concat()).unwrap();
    }
    assert!((first..first + 16).all(|g| !src.is_shared(g)), "the VMM knows them private");
    probe.states().lock().unwrap().apply(&map_gpa_range(first, 0)).unwrap();
    (c, src, probe, first)
}

fn map_gpa_range(gfn: u64, attrs: u64) -> PageStateEvent {
    PageStateEvent { kind: PageStateKind::MapGpaRange, flags: 0, gpa: gfn * 4096, npages: 16, attrs, tgid: 0, vcpu: 0 }
}

/// The records disagree until the end of round 0 (then the map is right again): the host
/// does not read the 16 pages in round 0, sends them through the MH in a later round, and
/// the migration completes with the same RAM.
#[test]
fn pages_the_records_disagree_on_wait_for_a_later_round() {
    let (c, src, probe, first) = source_with_a_wrong_page_state_map("ps-late");
    let (addr, t) = receiver(&c);
    let tap = Tap::start(addr, None);
    let mut on = |e| {
        if let Event::Round(st) = e {
            if st.round == 0 {
                assert_eq!(st.deferred, 16, "round 0 held back the 16 pages");
                probe.states().lock().unwrap().apply(&map_gpa_range(first, ATTR_ENCRYPTED)).unwrap();
            }
        }
    };
    let rep = session::send(&c, &src, &tap.addr, &mut on).expect("migration");
    let (r, res) = t.join().unwrap();
    let got = res.expect("destination");
    let captured = tap.captured.clone();
    drop(tap);
    assert_eq!(rep.pages_deferred, 16);
    assert!(!contains(&captured.lock().unwrap(), &PRIVATE_CANARY.to_le_bytes()), "a private page was read");
    assert_same_ram(&src, &got.snapshot.clone().unwrap());
    assert_running(r.machine().unwrap());
}

/// An SNP page-state change (its entries live in guest memory, out of the map's reach)
/// makes the map refuse to classify: the migration stops before any page is sent by it, and
/// the source keeps running.
#[test]
fn a_page_state_map_with_unknown_snp_changes_refuses_to_classify() {
    let (c, src, probe, _first) = source_with_a_wrong_page_state_map("ps-snp");
    let psc = PageStateEvent { kind: PageStateKind::SnpPsc, flags: 0, gpa: 0, npages: 0, attrs: 0, tgid: 0, vcpu: 0 };
    probe.states().lock().unwrap().apply(&psc).unwrap();
    let (addr, t) = receiver(&c);
    let err = session::send(&c, &src, &addr, &mut |_| {}).expect_err("the map cannot classify");
    let msg = err.to_string();
    assert!(matches!(err.phase(), Phase::Precopy { round: 0 }), "{msg}");
    assert!(msg.contains("1 SNP page-state change(s) seen"), "{msg}");
    assert_failed_cleanly(t, &src);
}

/// The records still disagree when the guest is paused: the host never reads those pages,
/// and the migration stops at switchover with an error that says so. The source keeps
/// running with the pages still dirty.
#[test]
fn a_page_state_map_that_disagrees_with_the_vmm_stops_the_migration() {
    let (c, src, _probe, first) = source_with_a_wrong_page_state_map("ps-wrong");
    let (addr, t) = receiver(&c);
    let tap = Tap::start(addr, None);
    let err = session::send(&c, &src, &tap.addr, &mut |_| {}).expect_err("the records disagree");
    assert_failed_cleanly(t, &src);
    let captured = tap.captured.clone();
    drop(tap);
    let msg = err.to_string();
    assert!(matches!(err.phase(), Phase::StopAndCopy), "{msg}");
    assert!(
        msg.contains("disagree on 16 page(s)")
            && msg.contains(&format!("gfn {first:#x}"))
            && msg.contains("VMM says private"),
        "{msg}"
    );
    assert!(!contains(&captured.lock().unwrap(), &PRIVATE_CANARY.to_le_bytes()), "a forged-shared page was read");
    let dirty = src.dirty().take().unwrap();
    assert!((first..first + 16).all(|g| dirty.contains(&g)), "the deferred pages stay dirty");
}

/// Page states changing all through the migration (the `pagestate` workload converts ranges
/// back and forth without writing them), classified by the eBPF map: pages caught mid-way are
/// deferred, the records agree once the guest is paused, and the destination gets the same
/// RAM and runs.
#[test]
fn ebpf_page_states_in_flux_during_a_confidential_migration() {
    let mut c = confidential(WorkloadKind::Pagestate, "ps-flux");
    c.confidential.page_state_source = PageStateSource::Ebpf;
    let out = session::demo(&c, &mut |_| {}).expect("confidential migration with conversions in flight");
    let r = &out.report;
    let v = &r.verification;
    assert!(v.mismatched_pages.is_empty(), "destination RAM differs at pages {:?}", v.mismatched_pages);
    assert!(v.guest_alive, "{:?} -> {:?}", r.destination.progress_at_resume, r.destination.progress_after);
    let s = &r.source;
    let desc = s.page_states.clone().expect("the report names the page-state record");
    assert!(desc.contains("0 rejected"), "{desc}");
    // The guest kept converting while precopy ran: far more requests than vCPUs.
    let applied: u64 =
        desc.split(" events applied").next().and_then(|x| x.rsplit('(').next()).unwrap().parse().unwrap();
    assert!(applied > 1000, "{desc}");
    eprintln!("{desc}; {} page(s) deferred", s.pages_deferred);
}

/// A recorded confidential migration replayed in full to a new destination holding the same
/// transport key, by someone who holds everything a host holds: the new destination MH's
/// challenge is not the one the recorded blobs are bound to, so it refuses the first blob
/// (the Begin marker) and nothing resumes.
#[test]
fn a_recorded_confidential_migration_never_resumes_again() {
    let mut c = confidential(WorkloadKind::Ab, "replay");
    host_view(&mut c);
    c.migration.streams = 1;
    let src = session::boot_source(&c).unwrap();
    let recording = migaccel_tests::record_migration(&c, &src);
    let mut rc = c.clone();
    rc.receiver.wait_ms = 10_000;
    let (addr, t) = receiver(&rc);
    let replay = migaccel_tests::replay(addr, recording);
    let (r, res) = t.join().unwrap();
    let e = res.expect_err("a replayed confidential migration must not be received").to_string();
    assert!(e.contains("MH refused Marker") && e.contains("bound to another migration"), "{e}");
    assert!(!r.machine().is_some_and(|m| m.is_running()), "the replayed VM must never run");
    drop(r); // closes the receiver's sockets: the replay stops writing
    replay.join().unwrap();
}

/// A blob as it travels (`kind u32, round u32, gfn u64, seq u64, tag [16], data [4096]`),
/// split into the slot descriptor and the ciphertext.
fn wire_blob(b: &[u8]) -> (mh_abi::Desc, Vec<u8>) {
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let d = mh_abi::Desc {
        kind: u32_at(0),
        round: u32_at(4),
        gfn: u64_at(8),
        seq: u64_at(16),
        tag: b[24..40].try_into().unwrap(),
    };
    (d, b[40..40 + 4096].to_vec())
}

/// The first Begin marker and the first page blob the source sent, as a recording host
/// keeps them.
type Recorded = Arc<std::sync::Mutex<(Option<Vec<u8>>, Option<Vec<u8>>)>>;

fn recorder(rec: &Recorded) -> Option<Tamper> {
    let rec = rec.clone();
    on_blobs(move |_, p| {
        let mut g = rec.lock().unwrap();
        for (at, kind) in blobs_in(p) {
            let b = &p[at..(at + BLOB_LEN).min(p.len())];
            match kind {
                k if k == mh_abi::Kind::Begin as u32 && g.0.is_none() => g.0 = Some(b.to_vec()),
                k if k == mh_abi::Kind::Page as u32 && g.1.is_none() => g.1 = Some(b.to_vec()),
                _ => {}
            }
        }
    })
}

/// Put a recorded blob in slot 0 and run `op` on it; the MH's answer.
fn replay(h: &mut kvm_hooks::mh::MhHost, blob: &[u8], op: mh_abi::Op) -> Result<(), kvm_hooks::mh::MhError> {
    let (d, data) = wire_blob(blob);
    h.write_slot_parts(0, &d, &data).unwrap();
    h.run(&[mh_abi::Request { op: op as u16, id: 0, count: 1, slot: 0, gfn: d.gfn, round: d.round }])
}

fn refused_with(r: Result<(), kvm_hooks::mh::MhError>, want: mh_abi::CompStatus, what: &str) {
    match r {
        Err(kvm_hooks::mh::MhError::Refused { status, .. }) if status == want => {}
        other => panic!("{what}: expected a refusal with {want:?}, got {other:?}"),
    }
}

/// The destination host is the adversary after an import too: with a finished import, a
/// `Reset`, the recorded Begin marker and an earlier blob are all refused and the page
/// keeps its migrated content (no rollback). An unfinished import may be reset, but the
/// reset draws a fresh challenge, so the recorded stream no longer verifies.
#[test]
fn recorded_stream_cannot_roll_back_the_destination() {
    use mh_abi::{CompStatus, Op};
    let mut c = confidential(WorkloadKind::Ab, "rollback");
    host_view(&mut c);
    c.migration.streams = 1;
    let src = session::boot_source(&c).unwrap();
    let rec: Recorded = Arc::default();
    let (addr, t) = receiver(&c);
    let tap = Tap::start(addr, recorder(&rec));
    session::send(&c, &src, &tap.addr, &mut |_| {}).expect("migration");
    let (r, res) = t.join().unwrap();
    res.expect("destination");
    drop(tap);
    let (begin, page) = rec.lock().unwrap().clone();
    let (begin, page) = (begin.expect("a Begin marker crossed the wire"), page.expect("a page blob crossed the wire"));
    let m = r.machine().expect("destination VM");
    let gfn = wire_blob(&page).0.gfn;
    let mut before = vec![0u8; 4096];
    m.ram().read(gfn * 4096, &mut before).unwrap();
    {
        let mut g = m.mh();
        let h = g.as_mut().expect("destination MH");
        let reset = [mh_abi::Request { op: Op::Reset as u16, id: 0, count: 1, slot: 0, gfn: 0, round: 0 }];
        refused_with(h.run(&reset), CompStatus::NoStream, "Reset after a finished import");
        refused_with(replay(h, &begin, Op::Marker), CompStatus::NoStream, "replayed Begin after a finished import");
        refused_with(replay(h, &page, Op::Import), CompStatus::NoStream, "replayed page after a finished import");
        // The header the host can write does not reopen it either.
        m.ram().write_u64(mh_abi::HEADER + mh_abi::header::COMPLETE, 0).unwrap();
        refused_with(replay(h, &begin, Op::Marker), CompStatus::NoStream, "Begin with COMPLETE cleared by the host");
    }
    let mut after = vec![0u8; 4096];
    m.ram().read(gfn * 4096, &mut after).unwrap();
    assert!(before == after, "page {gfn:#x} changed after the import finished");
    drop(r);
    drop(src);

    // An import cut short (tampered mid-stream) is unfinished: Reset is allowed, and
    // draws a fresh challenge, so the recorded Begin no longer opens. (A new source: the
    // first one handed its VM over.)
    let src = session::boot_source(&c).unwrap();
    let rec: Recorded = Arc::default();
    let rec2 = rec.clone();
    let mut record = recorder(&rec2).unwrap();
    let mut done = false;
    let tamper: Tamper = Box::new(move |k, n, p| {
        record(k, n, p);
        if k == FrameKind::Blobs && n >= 1 && !done {
            if let Some((at, _)) = blobs_in(p).into_iter().find(|&(_, k)| k == mh_abi::Kind::Page as u32) {
                p[at + 40 + 7] ^= 0x01;
                done = true;
            }
        }
    });
    let (addr, t) = receiver(&c);
    let tap = Tap::start(addr, Some(tamper));
    session::send(&c, &src, &tap.addr, &mut |_| {}).expect_err("the tampered blob fails the migration");
    let (r, res) = t.join().unwrap();
    assert!(res.is_err());
    drop(tap);
    let begin = rec.lock().unwrap().0.clone().expect("a Begin marker crossed the wire");
    let m = r.machine().expect("the failed destination's VM");
    let mut g = m.mh();
    let h = g.as_mut().expect("destination MH");
    let old = h.challenges().unwrap();
    h.run(&[mh_abi::Request { op: Op::Reset as u16, id: 0, count: 1, slot: 0, gfn: 0, round: 0 }])
        .expect("an unfinished import may be reset");
    assert_ne!(h.challenges().unwrap(), old, "a reset draws a fresh challenge");
    refused_with(replay(h, &begin, Op::Marker), CompStatus::AuthFailed, "recorded Begin after a reset");
    drop(g);
    assert_running(&src);
}
