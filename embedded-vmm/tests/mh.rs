//! The reference Migration Handler on a real extra vCPU: export at one VM, import at another,
//! and every way a host (or a blob) can be hostile.
use std::time::Duration;

use embedded_vmm::guest::DATA_START;
use embedded_vmm::vmm::{GuestSpec, Machine, Workload};
use kvm_hooks::mh::{Blob, Launch, MhError, MhHost};
use kvm_hooks::vm::DirtyPreference;
use mh_abi::{self as abi, CompStatus, Kind, Op, Request};

const RING: DirtyPreference = DirtyPreference::Ring { bytes: 64 << 10 };
const KEY: [u8; 32] = [0x42; 32];

fn spec() -> GuestSpec {
    GuestSpec { ram_bytes: 64 << 20, vcpus: 1, workload: Workload::Idle }
}

fn launch(key: [u8; 32]) -> Launch {
    Launch { key, vm_id: 7, spin: 0, zero_records: true }
}

fn vm_with_mh(key: [u8; 32]) -> (Machine, MhHost) {
    let mut m = Machine::boot(spec(), RING).unwrap();
    m.launch_mh(&launch(key), Duration::from_secs(5)).unwrap();
    let h = m.take_mh().unwrap();
    (m, h)
}

fn req(op: Op, gfn: u64, count: u32, slot: u32, round: u32) -> Request {
    Request { op: op as u16, id: 0, count, slot, gfn, round }
}

/// Export `count` pages at `gfn` (round `round`) and take the blobs out of the slots.
fn export(h: &mut MhHost, gfn: u64, count: u32, round: u32) -> Vec<Blob> {
    h.run(&[req(Op::Export, gfn, count, 0, round)]).unwrap();
    (0..count)
        .map(|i| {
            let mut b = Blob::zeroed();
            h.take_slot(i, Kind::Page, gfn + u64::from(i), &mut b).unwrap();
            b
        })
        .collect()
}

fn marker(h: &mut MhHost, op: Op, round: u32) -> Blob {
    h.run(&[req(op, 0, 1, 0, round)]).unwrap();
    let mut b = Blob::zeroed();
    h.read_slot(0, &mut b).unwrap();
    b
}

/// Import `blobs` at `gfn..`; returns the MH's verdict.
fn import(h: &mut MhHost, gfn: u64, blobs: &[Blob]) -> Result<(), MhError> {
    for (i, b) in blobs.iter().enumerate() {
        h.write_slot(i as u32, b).unwrap();
    }
    h.run(&[req(Op::Import, gfn, blobs.len() as u32, 0, 0)])
}

fn open_stream(h: &mut MhHost, begin: &Blob) {
    h.write_slot(0, begin).unwrap();
    h.run(&[req(Op::Marker, 0, 1, 0, 0)]).unwrap();
}

fn fill(m: &Machine, gfn: u64, count: u64, tag: u8) {
    for p in 0..count {
        let page: Vec<u8> = (0..4096).map(|i| (i as u8) ^ tag ^ (p as u8)).collect();
        m.ram().write((gfn + p) * 4096, &page).unwrap();
    }
}

fn page(m: &Machine, gfn: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    m.ram().read(gfn * 4096, &mut b).unwrap();
    b
}

fn refused(r: Result<(), MhError>) -> CompStatus {
    match r {
        Err(MhError::Refused { status, .. }) => status,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn export_then_import_moves_pages_and_never_shows_plaintext() {
    let (src, mut sh) = vm_with_mh(KEY);
    let gfn = DATA_START / 4096 + 10;
    fill(&src, gfn, 64, 0x5a);
    // The importer starts first; the export is bound to its challenge.
    let mut dst = Machine::destination(spec(), RING).unwrap();
    dst.launch_mh(&launch(KEY), Duration::from_secs(5)).unwrap();
    let mut dh = dst.take_mh().unwrap();
    sh.bind_export(dh.challenge().unwrap()).unwrap();
    let begin = marker(&mut sh, Op::Begin, 0);
    let blobs = export(&mut sh, gfn, 64, 1);
    let end = marker(&mut sh, Op::End, 1);
    for (i, b) in blobs.iter().enumerate() {
        assert_ne!(&b.data[..], &page(&src, gfn + i as u64)[..], "slot {i} holds plaintext");
        assert_eq!(b.round, 1);
    }
    let seqs: Vec<u64> = blobs.iter().map(|b| b.seq).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "sequence numbers are contiguous");

    open_stream(&mut dh, &begin);
    import(&mut dh, gfn, &blobs).unwrap();
    assert!(!dh.counters().unwrap().complete, "not complete before End");
    dh.write_slot(0, &end).unwrap();
    dh.run(&[req(Op::Marker, 0, 1, 0, 0)]).unwrap();
    for p in 0..64 {
        assert_eq!(page(&dst, gfn + p), page(&src, gfn + p), "page {p} differs after import");
    }
    let c = dh.counters().unwrap();
    assert!(c.complete && c.imported == 64, "{c:?}");
    assert_eq!(sh.counters().unwrap().exported, 64);
}

/// A destination MH (with `key`) and, exported for it by `sh`, a Begin marker and two
/// rounds of 4 pages at `gfn`.
struct Fresh {
    d: Machine,
    h: MhHost,
    begin: Blob,
    r1: Vec<Blob>,
    r2: Vec<Blob>,
}

fn fresh(sh: &mut MhHost, key: [u8; 32], gfn: u64) -> Fresh {
    let mut d = Machine::destination(spec(), RING).unwrap();
    d.launch_mh(&launch(key), Duration::from_secs(5)).unwrap();
    let h = d.take_mh().unwrap();
    sh.bind_export(h.challenge().unwrap()).unwrap();
    let begin = marker(sh, Op::Begin, 0);
    let r1 = export(sh, gfn, 4, 1);
    let r2 = export(sh, gfn, 4, 2);
    Fresh { d, h, begin, r1, r2 }
}

#[test]
fn hostile_blobs_are_refused() {
    let (src, mut sh) = vm_with_mh(KEY);
    let gfn = DATA_START / 4096;
    fill(&src, gfn, 8, 0x11);
    let opened = |sh: &mut MhHost| {
        let mut f = fresh(sh, KEY, gfn);
        open_stream(&mut f.h, &f.begin);
        f
    };
    // Tampered ciphertext.
    let mut f = opened(&mut sh);
    let mut bad = f.r1.clone();
    bad[2].data[100] ^= 1;
    assert_eq!(refused(import(&mut f.h, gfn, &bad)), CompStatus::AuthFailed);
    assert_eq!(page(&f.d, gfn + 2), vec![0; 4096], "nothing written for the tampered page");
    // Tampered tag.
    let mut f = opened(&mut sh);
    let mut bad = f.r1.clone();
    bad[0].tag[0] ^= 0x80;
    assert_eq!(refused(import(&mut f.h, gfn, &bad)), CompStatus::AuthFailed);
    // Blob for gfn A presented as gfn B.
    let mut f = opened(&mut sh);
    assert_eq!(refused(import(&mut f.h, gfn + 1, &f.r1[..1])), CompStatus::AuthFailed);
    assert_eq!(page(&f.d, gfn + 1), vec![0; 4096]);
    // Round label rewritten.
    let mut f = opened(&mut sh);
    let mut bad = f.r1.clone();
    bad[0].round = 7;
    assert_eq!(refused(import(&mut f.h, gfn, &bad[..1])), CompStatus::AuthFailed);
    // Replay of an earlier round after a later one, and a duplicate within a stream.
    let mut f = opened(&mut sh);
    import(&mut f.h, gfn, &f.r1).unwrap();
    import(&mut f.h, gfn, &f.r2).unwrap();
    assert_eq!(refused(import(&mut f.h, gfn, &f.r1[..1])), CompStatus::BadSequence);
    assert_eq!(refused(import(&mut f.h, gfn + 3, &f.r2[3..])), CompStatus::BadSequence);
    // Reordered / missing blob.
    let mut f = opened(&mut sh);
    assert_eq!(refused(import(&mut f.h, gfn + 1, &f.r1[1..2])), CompStatus::BadSequence);
    // Import without a Begin.
    let mut f = fresh(&mut sh, KEY, gfn);
    assert_eq!(refused(import(&mut f.h, gfn, &f.r1)), CompStatus::NoStream);
    // Wrong key: even the Begin marker fails.
    let mut f = fresh(&mut sh, [0x43; 32], gfn);
    f.h.write_slot(0, &f.begin).unwrap();
    assert_eq!(refused(f.h.run(&[req(Op::Marker, 0, 1, 0, 0)])), CompStatus::AuthFailed);
    // Blobs bound to another importer (a migration recorded and replayed elsewhere): the
    // Begin marker fails already.
    let other = fresh(&mut sh, KEY, gfn);
    let mut f = fresh(&mut sh, KEY, gfn);
    f.h.write_slot(0, &other.begin).unwrap();
    assert_eq!(refused(f.h.run(&[req(Op::Marker, 0, 1, 0, 0)])), CompStatus::AuthFailed);
    open_stream(&mut f.h, &f.begin);
    import(&mut f.h, gfn, &f.r1).unwrap();
}

/// A page that is all zero inside the guest travels as a zero record (a tag, no
/// ciphertext) and is zero at the destination even where the destination page held data;
/// a forged, relabelled, relocated or replayed zero record is refused and writes nothing.
#[test]
fn zero_pages_travel_as_zero_records() {
    let (src, mut sh) = vm_with_mh(KEY);
    let gfn = DATA_START / 4096 + 40;
    fill(&src, gfn, 4, 0x21);
    src.ram().write((gfn + 1) * 4096, &[0u8; 4096]).unwrap();
    let zeros0 = sh.counters().unwrap().zeros;
    let mut f = fresh(&mut sh, KEY, gfn);
    assert_eq!(sh.counters().unwrap().zeros - zeros0, 2, "page 1 of both rounds is a zero record");
    let kinds: Vec<u32> = f.r1.iter().map(|b| b.kind).collect();
    let (page, zero) = (Kind::Page as u32, Kind::Zero as u32);
    assert_eq!(kinds, [page, zero, page, page]);
    // The destination's pages hold data: a zero record must clear its page.
    for p in 0..4 {
        f.d.ram().write((gfn + p) * 4096, &[0xee; 4096]).unwrap();
    }
    open_stream(&mut f.h, &f.begin);
    // Hostile forms of the zero record first (each refused before any sequence advances).
    let mut h2 = f.r1.clone();
    // A page blob relabelled as a zero record (would zero the page without its content).
    h2[0].kind = zero;
    assert_eq!(refused(import(&mut f.h, gfn, &h2[..1])), CompStatus::AuthFailed);
    assert_eq!(self::page(&f.d, gfn), vec![0xee; 4096], "a refused zero record wrote nothing");
    // A zero record forged by the host: right sequence, a tag it made up.
    let mut forged = f.r1[0].clone();
    (forged.kind, forged.tag) = (zero, [0x5a; 16]);
    assert_eq!(refused(import(&mut f.h, gfn, &[forged])), CompStatus::AuthFailed);
    // The zero record relabelled as a page of (zero) ciphertext.
    import(&mut f.h, gfn, &f.r1[..1]).unwrap();
    let mut as_page = f.r1[1].clone();
    as_page.kind = page;
    as_page.data.fill(0);
    assert_eq!(refused(import(&mut f.h, gfn + 1, &[as_page])), CompStatus::AuthFailed);
    // The zero record presented for another page, or as vCPU state.
    assert_eq!(refused(import(&mut f.h, gfn + 2, &f.r1[1..2])), CompStatus::AuthFailed);
    f.h.write_slot(0, &f.r1[1]).unwrap();
    assert_eq!(refused(f.h.run(&[req(Op::RestoreCpu, 0, 1, 0, 0)])), CompStatus::AuthFailed);
    assert_eq!(self::page(&f.d, gfn + 1), vec![0xee; 4096]);
    // The genuine record zeroes its page; replaying it is refused.
    import(&mut f.h, gfn + 1, &f.r1[1..]).unwrap();
    for p in 0..4 {
        assert_eq!(self::page(&f.d, gfn + p), self::page(&src, gfn + p), "page {p} after import");
    }
    assert_eq!(self::page(&f.d, gfn + 1), vec![0; 4096]);
    assert_eq!(refused(import(&mut f.h, gfn + 1, &f.r1[1..2])), CompStatus::BadSequence);
    let c = f.h.counters().unwrap();
    assert_eq!((c.imported, c.zeros), (4, 1), "{c:?}");

    // A guest owner who did not allow zero records at launch: the zero page travels as a
    // page of ciphertext like any other.
    let mut m = Machine::boot(spec(), RING).unwrap();
    m.launch_mh(&Launch { zero_records: false, ..launch(KEY) }, Duration::from_secs(5)).unwrap();
    let mut h = m.take_mh().unwrap();
    m.ram().write(gfn * 4096, &[0u8; 4096]).unwrap();
    h.bind_export(7).unwrap();
    marker(&mut h, Op::Begin, 0);
    let b = export(&mut h, gfn, 1, 1);
    assert_eq!((b[0].kind, h.counters().unwrap().zeros), (page, 0));
}

/// Requests abandoned after a failure (a refused import still in flight) never surface as
/// the outcome of what runs next; requests in flight still count against the ring.
#[test]
fn abandoned_requests_do_not_surface_later() {
    let (src, mut h) = vm_with_mh(KEY);
    let gfn = DATA_START / 4096;
    fill(&src, gfn, 4, 0x33);
    // An import with no stream open: refused (NoStream) once the MH gets to it.
    h.start(&[req(Op::Import, gfn, 4, 0, 0)]).unwrap();
    h.abandon();
    let full: Vec<Request> = (0..64).map(|i| req(Op::Export, gfn, 1, i, 1)).collect();
    assert!(h.start(&full).is_err(), "an abandoned request still holds its ring entry");
    // What runs next sees only its own completions.
    h.run(&[req(Op::Export, gfn, 4, 0, 1)]).unwrap();
    assert_eq!(h.in_flight(), 0);
    let c = h.counters().unwrap();
    assert_eq!((c.exported, c.refused), (4, 1), "{c:?}");
}

/// The host checks the MH's ABI version once it is ready: an MH of another version is
/// refused with both versions named.
#[test]
fn an_mh_of_another_abi_version_is_refused() {
    let (m, h) = vm_with_mh(KEY);
    h.wait_ready(Duration::from_secs(1)).unwrap();
    m.ram().write(abi::HEADER + abi::header::VERSION, &99u32.to_le_bytes()).unwrap();
    let e = h.wait_ready(Duration::from_secs(1)).unwrap_err().to_string();
    assert!(e.contains("version 99") && e.contains(&format!("version {}", abi::VERSION)), "{e}");
}

#[test]
fn hostile_requests_are_refused_and_touch_nothing() {
    let (m, mut h) = vm_with_mh(KEY);
    let ram_pages = m.ram().pages();
    let region = abi::REGION / 4096;
    let before = page(&m, abi::SECRET / 4096);
    let cases = [
        (req(Op::Invalid, DATA_START / 4096, 1, 0, 0), CompStatus::BadRequest),
        (Request { op: 99, ..req(Op::Export, DATA_START / 4096, 1, 0, 0) }, CompStatus::BadRequest),
        (req(Op::Export, DATA_START / 4096, 0, 0, 0), CompStatus::BadRequest),
        (req(Op::Export, DATA_START / 4096, abi::NSLOTS + 1, 0, 0), CompStatus::BadRequest),
        (req(Op::Export, DATA_START / 4096, 2, abi::NSLOTS - 1, 0), CompStatus::BadRequest),
        (req(Op::Export, DATA_START / 4096, 1, u32::MAX, 0), CompStatus::BadRequest),
        (req(Op::Export, ram_pages, 1, 0, 0), CompStatus::BadGfn),
        (req(Op::Export, ram_pages - 1, 2, 0, 0), CompStatus::BadGfn),
        (req(Op::Export, u64::MAX, 2, 0, 0), CompStatus::BadGfn),
        (req(Op::Export, region - 1, 2, 0, 0), CompStatus::BadGfn),
        (req(Op::Import, region + 1, 1, 0, 0), CompStatus::BadGfn),
        (req(Op::Import, abi::SECRET / 4096, 1, 0, 0), CompStatus::BadGfn),
        (req(Op::SaveCpu, 0, abi::VMSA_PAGES as u32 + 1, 0, 0), CompStatus::BadRequest),
        (req(Op::Begin, 0, 2, 0, 0), CompStatus::BadRequest),
    ];
    for (r, want) in cases {
        assert_eq!(refused(h.run(&[r])), want, "{r:?}");
    }
    assert_eq!(page(&m, abi::SECRET / 4096), before);
    // The MH still works afterwards.
    h.run(&[req(Op::Export, DATA_START / 4096, 1, 0, 0)]).unwrap();
}

#[test]
fn mh_that_stops_answering_or_lies_is_detected() {
    let (_m, mut h) = vm_with_mh(KEY);
    h.timeout = Duration::from_millis(300);
    h.set_frozen(true);
    match h.run(&[req(Op::Export, DATA_START / 4096, 1, 0, 0)]) {
        Err(MhError::Timeout { pending: 1, .. }) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    // A completion ring whose producer index runs far ahead of what was asked.
    let (_m2, mut h2) = vm_with_mh(KEY);
    h2.set_frozen(true);
    h2.submit(req(Op::Export, DATA_START / 4096, 1, 0, 0)).unwrap();
    h2.ram().write(abi::COMP_RING + abi::RING_PROD, &1000u32.to_le_bytes()).unwrap();
    assert!(matches!(h2.poll(), Err(MhError::BadCompletion(_))), "runaway producer index accepted");
    // A completion for a request that was never made.
    let (_m3, mut h3) = vm_with_mh(KEY);
    h3.set_frozen(true);
    h3.submit(req(Op::Export, DATA_START / 4096, 1, 0, 0)).unwrap();
    let c = abi::Completion { id: 999, status: 1, done: 1 };
    h3.ram().write(abi::COMP_RING + abi::RING_BASE, &c.encode()).unwrap();
    h3.ram().write(abi::COMP_RING + abi::RING_PROD, &1u32.to_le_bytes()).unwrap();
    assert!(matches!(h3.poll(), Err(MhError::BadCompletion(_))));
}
