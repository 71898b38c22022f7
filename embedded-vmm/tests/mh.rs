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
    Launch { key, vm_id: 7, spin: 0, zero_records: true, lanes: 1 }
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
    sh.bind_export(&dh.challenges().unwrap()).unwrap();
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
    sh.bind_export(&h.challenges().unwrap()).unwrap();
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
    h.bind_export(&[7]).unwrap();
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

/// A source and a destination VM whose MHs run on `lanes` lanes (128 MiB: several granules).
fn lane_pair(lanes: u32, dest_lanes: u32) -> (Machine, MhHost, Machine, MhHost) {
    let spec = GuestSpec { ram_bytes: 128 << 20, vcpus: 1, workload: Workload::Idle };
    let mut s = Machine::boot(spec, RING).unwrap();
    s.launch_mh(&Launch { lanes, ..launch(KEY) }, Duration::from_secs(5)).unwrap();
    let sh = s.take_mh().unwrap();
    let mut d = Machine::destination(spec, RING).unwrap();
    d.launch_mh(&Launch { lanes: dest_lanes, ..launch(KEY) }, Duration::from_secs(5)).unwrap();
    let dh = d.take_mh().unwrap();
    (s, sh, d, dh)
}

/// Marker blobs for every lane (lanes in `order`), taken out of slots 0...
fn lane_markers(h: &mut MhHost, op: Op, order: &[u32], round: u32) -> Vec<Blob> {
    let reqs: Vec<Request> =
        order.iter().enumerate().map(|(s, &l)| req(op, u64::from(l), 1, s as u32, round)).collect();
    h.run(&reqs).unwrap();
    (0..order.len() as u32)
        .map(|s| {
            let mut b = Blob::zeroed();
            h.read_slot(s, &mut b).unwrap();
            b
        })
        .collect()
}

fn import_markers(h: &mut MhHost, blobs: &[Blob]) -> Result<(), MhError> {
    for (i, b) in blobs.iter().enumerate() {
        h.write_slot(i as u32, b).unwrap();
    }
    let reqs: Vec<Request> = blobs.iter().enumerate().map(|(s, b)| req(Op::Marker, b.gfn, 1, s as u32, 0)).collect();
    h.run(&reqs)
}

fn lane_header(lane: u32, field: u64, m: &Machine) -> u64 {
    m.ram().read_u64(abi::lane_addrs(lane).header + field).unwrap()
}

/// Three lanes each export and import the pages of their own granules (a run that
/// crosses a granule is split between lanes by the host), every lane in its own sequence,
/// and the destination holds the source's pages.
#[test]
fn lanes_move_the_pages_of_their_own_granules() {
    let (src, mut sh, dst, mut dh) = lane_pair(3, 3);
    assert_eq!((sh.lanes(), dh.lanes()), (3, 3));
    let first = DATA_START / 4096;
    // Forty granules' worth, starting mid-granule so runs cross granule boundaries.
    let (gfn, count) = (first + 100, 40 * abi::GRANULE_PAGES as u32);
    fill(&src, gfn, u64::from(count), 0x3c);
    sh.bind_export(&dh.challenges().unwrap()).unwrap();
    let begin = lane_markers(&mut sh, Op::Begin, &[0, 1, 2], 0);
    import_markers(&mut dh, &begin).unwrap();
    let mut at = 0;
    while at < count {
        let n = 200.min(count - at);
        let g = gfn + u64::from(at);
        let blobs = export(&mut sh, g, n, 1);
        import(&mut dh, g, &blobs).unwrap();
        at += n;
    }
    // Lane 0 closes last: its End is refused while lane 1 or 2 is still open.
    let end = lane_markers(&mut sh, Op::End, &[2, 1, 0], 1);
    assert_eq!(refused(import_markers(&mut dh, &end[2..])), CompStatus::LanesOpen);
    import_markers(&mut dh, &end[..1]).unwrap();
    assert_eq!(refused(import_markers(&mut dh, &end[2..])), CompStatus::LanesOpen, "lane 1 is still open");
    assert!(!dh.counters().unwrap().complete);
    import_markers(&mut dh, &end[1..]).unwrap();
    let c = dh.counters().unwrap();
    assert!(c.complete && c.imported == u64::from(count), "{c:?}");
    for p in 0..u64::from(count) {
        assert_eq!(page(&dst, gfn + p), page(&src, gfn + p), "page {p} differs after import");
    }
    // Every lane did its share: the pages of its own granules.
    for lane in 0..3 {
        let own = (gfn..gfn + u64::from(count)).filter(|&g| abi::lane_of(g, 3) == lane).count() as u64;
        assert_eq!(lane_header(lane, abi::header::EXPORTED, &src), own, "lane {lane} exported");
        assert_eq!(lane_header(lane, abi::header::IMPORTED, &dst), own, "lane {lane} imported");
    }
}

/// A lane refuses pages of another lane's granule and markers or vCPU state that are not
/// its own; a blob one lane exported does not open at another; an importer that runs
/// another lane count opens nothing; a launch asks for 1 to 4 lanes.
#[test]
fn lanes_keep_to_their_own_pages_streams_and_count() {
    let (src, mut sh, _dst, mut dh) = lane_pair(2, 2);
    let first = DATA_START / 4096;
    let g0 = first.next_multiple_of(abi::GRANULE_PAGES) + 2 * abi::GRANULE_PAGES; // lane 0's
    let g1 = g0 + abi::GRANULE_PAGES; // lane 1's
    assert_eq!((abi::lane_of(g0, 2), abi::lane_of(g1, 2)), (0, 1));
    let verdict = |h: &mut MhHost, lane: u32, r: Request| {
        h.start_on(lane, &[r]).unwrap();
        let done = h.wait_all().unwrap();
        CompStatus::from_u32(done[0].1.status)
    };
    assert_eq!(verdict(&mut sh, 1, req(Op::Export, g0, 1, 0, 1)), CompStatus::BadGfn, "lane 1 exports lane 0's page");
    assert_eq!(
        verdict(&mut sh, 0, req(Op::Export, g1 - 1, 2, 0, 1)),
        CompStatus::BadGfn,
        "a run into lane 1's granule"
    );
    assert_eq!(verdict(&mut sh, 1, req(Op::Begin, 0, 1, 0, 0)), CompStatus::BadRequest, "lane 1 makes lane 0's marker");
    assert_eq!(verdict(&mut sh, 1, req(Op::SaveCpu, 0, 1, 0, 0)), CompStatus::BadRequest, "vCPU state off lane 0");
    assert!(matches!(sh.run(&[req(Op::Begin, 2, 1, 0, 0)]), Err(MhError::BadRequest(_))), "a marker for lane 2");

    fill(&src, g0, 1, 1);
    fill(&src, g1, 1, 2);
    sh.bind_export(&dh.challenges().unwrap()).unwrap();
    let begin = lane_markers(&mut sh, Op::Begin, &[0, 1], 0);
    import_markers(&mut dh, &begin).unwrap();
    let b0 = export(&mut sh, g0, 1, 1);
    let b1 = export(&mut sh, g1, 1, 1);
    // Lane 1's blob, labelled and presented as lane 0's page, and handed to lane 0: lanes
    // number their blobs in spaces of their own, and with lane 0's next number it fails
    // authentication.
    let mut moved = b1[0].clone();
    moved.gfn = g0;
    dh.write_slot(0, &moved).unwrap();
    assert_eq!(verdict(&mut dh, 0, req(Op::Import, g0, 1, 0, 0)), CompStatus::BadSequence);
    moved.seq = b0[0].seq;
    dh.write_slot(0, &moved).unwrap();
    assert_eq!(verdict(&mut dh, 0, req(Op::Import, g0, 1, 0, 0)), CompStatus::AuthFailed);
    // Lane 0's blob handed to lane 1 for its own page: lane 1 refuses the page first.
    dh.write_slot(0, &b0[0]).unwrap();
    assert_eq!(verdict(&mut dh, 1, req(Op::Import, g0, 1, 0, 0)), CompStatus::BadGfn);
    // Lane 1's Begin marker replayed at lane 0 (relabelled): bound to lane 1.
    let mut stray = begin[1].clone();
    stray.gfn = 0;
    dh.write_slot(0, &stray).unwrap();
    assert_eq!(verdict(&mut dh, 0, req(Op::Marker, 0, 1, 0, 0)), CompStatus::NoStream, "lane 0 is open already");
    // The honest blobs still import.
    import(&mut dh, g0, &b0).unwrap();
    import(&mut dh, g1, &b1).unwrap();

    // An importer on one lane: the exporter's two-lane binding never opens there, and a
    // host cannot bind a two-lane export to one lane's challenge.
    let (_s2, mut sh2, _d2, mut dh1) = lane_pair(2, 1);
    assert!(matches!(sh2.bind_export(&dh1.challenges().unwrap()), Err(MhError::BadRequest(_))));
    let c = dh1.challenges().unwrap()[0];
    sh2.bind_export(&[c, c]).unwrap();
    let begin = lane_markers(&mut sh2, Op::Begin, &[0, 1], 0);
    dh1.write_slot(0, &begin[0]).unwrap();
    assert_eq!(refused(dh1.run(&[req(Op::Marker, 0, 1, 0, 0)])), CompStatus::AuthFailed, "lane count differs");

    for lanes in [0, abi::MAX_LANES + 1] {
        let mut m = Machine::boot(spec(), RING).unwrap();
        let r = m.launch_mh(&Launch { lanes, ..launch(KEY) }, Duration::from_secs(5));
        assert!(matches!(r, Err(MhError::Lanes { got }) if got == lanes), "{lanes} lanes: {r:?}");
    }
}

/// A lane that faults reports in its own header, and the host names the lane; the other
/// lanes are untouched.
#[test]
fn a_faulting_lane_reports_in_its_own_header() {
    let (_src, sh, _dst, _dh) = lane_pair(3, 1);
    let m = sh.ram().clone();
    // A request producer index far past the consumer: lane 2's MH stops with BadRing when
    // it next polls its ring (it re-polls on its own while idle).
    m.write(abi::lane_addrs(2).req + abi::RING_PROD, &1000u32.to_le_bytes()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let err = loop {
        if let Err(e) = sh.wait_ready(Duration::from_secs(1)) {
            break e;
        }
        assert!(std::time::Instant::now() < deadline, "lane 2 never reported the runaway ring");
        std::thread::sleep(Duration::from_millis(10));
    };
    let msg = err.to_string();
    assert!(matches!(err, MhError::Faulted(_)) && msg.contains("lane 2") && msg.contains("fault code 2"), "{msg}");
    let fault = |lane: u32| m.read_u64(abi::lane_addrs(lane).header + abi::header::FAULT).unwrap() as u32;
    assert_eq!((fault(0), fault(1), fault(2)), (0, 0, abi::Fault::BadRing as u32));
}

/// Lane 0 restores vCPU state, and closes its import, only once every other lane's import
/// ended: a host cannot start the vCPUs while another lane's pages can still arrive.
#[test]
fn vcpu_state_waits_for_every_other_lane() {
    let (src, mut sh, _dst, mut dh) = lane_pair(2, 2);
    let first = DATA_START / 4096;
    let g1 = first.next_multiple_of(abi::GRANULE_PAGES) + abi::GRANULE_PAGES; // lane 1's
    assert_eq!(abi::lane_of(g1, 2), 1);
    fill(&src, g1, 2, 7);
    src.ram().write(abi::VMSA, &[0x5a; 4096]).unwrap();
    sh.bind_export(&dh.challenges().unwrap()).unwrap();
    import_markers(&mut dh, &lane_markers(&mut sh, Op::Begin, &[0, 1], 0)).unwrap();
    import(&mut dh, g1, &export(&mut sh, g1, 2, 1)).unwrap();
    sh.run(&[req(Op::SaveCpu, 0, 1, 0, 1)]).unwrap();
    let mut cpu = Blob::zeroed();
    sh.take_slot(0, Kind::Cpu, abi::VMSA / 4096, &mut cpu).unwrap();
    let end = lane_markers(&mut sh, Op::End, &[1, 0], 1);
    // Lane 1 has not ended: the state is refused, and lane 0's End too.
    dh.write_slot(0, &cpu).unwrap();
    assert_eq!(refused(dh.run(&[req(Op::RestoreCpu, 0, 1, 0, 0)])), CompStatus::LanesOpen);
    assert_eq!(refused(import_markers(&mut dh, &end[1..])), CompStatus::LanesOpen);
    // Once lane 1 ended, in order: the state, then lane 0's End.
    import_markers(&mut dh, &end[..1]).unwrap();
    dh.write_slot(0, &cpu).unwrap();
    dh.run(&[req(Op::RestoreCpu, 0, 1, 0, 0)]).unwrap();
    import_markers(&mut dh, &end[1..]).unwrap();
    assert!(dh.counters().unwrap().complete);
}

/// The lanes of one import come from one export: a lane 0 stream of a later export does not
/// finish an import whose lane 1 came from an earlier one, and once any lane finished no
/// lane is reset.
#[test]
fn lanes_of_one_import_come_from_one_export() {
    let (_src, mut sh, _dst, mut dh) = lane_pair(2, 2);
    sh.bind_export(&dh.challenges().unwrap()).unwrap();
    let first = lane_markers(&mut sh, Op::Begin, &[0, 1], 0); // export 1
    let end1 = lane_markers(&mut sh, Op::End, &[1], 0);
    let second = lane_markers(&mut sh, Op::Begin, &[0], 0); // export 2, lane 0
    let end0 = lane_markers(&mut sh, Op::End, &[0], 0);
    import_markers(&mut dh, &first[1..]).unwrap();
    import_markers(&mut dh, &end1).unwrap();
    // Lane 1 finished: no lane starts over.
    dh.start_on(0, &[req(Op::Reset, 0, 1, 0, 0)]).unwrap();
    assert_eq!(CompStatus::from_u32(dh.wait_all().unwrap()[0].1.status), CompStatus::NoStream);
    import_markers(&mut dh, &second).unwrap();
    assert_eq!(refused(import_markers(&mut dh, &end0)), CompStatus::LanesOpen, "lanes of two exports");
    assert!(!dh.counters().unwrap().complete);
}

/// A second vCPU started on a lane that already runs stops before it touches the lane's
/// stack or state; the lanes keep serving.
#[test]
fn a_second_vcpu_on_a_running_lane_is_stopped() {
    let (mut src, mut sh, _dst, dh) = lane_pair(2, 2);
    for lane in [1, 0] {
        let bell = src.start_duplicate_mh_lane(lane).unwrap();
        let r = kvm_hooks::mh::wait_lane_ready(src.ram(), &bell, lane, Duration::from_secs(20));
        assert!(matches!(r, Err(MhError::Faulted(_))), "a duplicate lane {lane} ran: {r:?}");
    }
    let status = |lane: u32| src.ram().read_u64(abi::lane_addrs(lane).header + abi::header::STATUS).unwrap() as u32;
    assert_eq!((status(0), status(1)), (abi::Status::Ready as u32, abi::Status::Ready as u32));
    let first = DATA_START / 4096;
    let g1 = first.next_multiple_of(abi::GRANULE_PAGES) + abi::GRANULE_PAGES;
    sh.bind_export(&dh.challenges().unwrap()).unwrap();
    assert_eq!(export(&mut sh, g1 - 1, 2, 1).len(), 2, "both lanes still export");
}

/// Once the vCPU state is restored the guest may run: the MH takes nothing but the End
/// marker, so no page (nor a second state, a reset or a new stream) changes under it.
#[test]
fn nothing_but_the_end_after_the_vcpu_state() {
    let (src, mut sh) = vm_with_mh(KEY);
    let mut dst = Machine::destination(spec(), RING).unwrap();
    dst.launch_mh(&launch(KEY), Duration::from_secs(5)).unwrap();
    let mut dh = dst.take_mh().unwrap();
    let gfn = DATA_START / 4096 + 3;
    fill(&src, gfn, 2, 9);
    src.ram().write(abi::VMSA, &[0x77; 4096]).unwrap();
    sh.bind_export(&dh.challenges().unwrap()).unwrap();
    open_stream(&mut dh, &marker(&mut sh, Op::Begin, 0));
    import(&mut dh, gfn, &export(&mut sh, gfn, 1, 1)).unwrap();
    sh.run(&[req(Op::SaveCpu, 0, 1, 0, 1)]).unwrap();
    let mut cpu = Blob::zeroed();
    sh.take_slot(0, Kind::Cpu, abi::VMSA / 4096, &mut cpu).unwrap();
    // A page exported after the state (the source guest ran on): valid, in sequence.
    let late = export(&mut sh, gfn + 1, 1, 2);
    let end = marker(&mut sh, Op::End, 2);
    dh.write_slot(0, &cpu).unwrap();
    dh.run(&[req(Op::RestoreCpu, 0, 1, 0, 0)]).unwrap();
    let before = page(&dst, gfn + 1);
    assert_eq!(refused(import(&mut dh, gfn + 1, &late)), CompStatus::NoStream, "a page after the state");
    assert_eq!(page(&dst, gfn + 1), before, "the refused page was written");
    dh.write_slot(0, &cpu).unwrap();
    assert_eq!(refused(dh.run(&[req(Op::RestoreCpu, 0, 1, 0, 0)])), CompStatus::NoStream, "a second state");
    assert_eq!(refused(dh.run(&[req(Op::Reset, 0, 1, 0, 0)])), CompStatus::NoStream, "a reset after the state");
    // The End carries the exporter's count: with the late page skipped it is out of
    // sequence, so an import that took the state and was then cut short never completes.
    dh.write_slot(0, &end).unwrap();
    assert_eq!(refused(dh.run(&[req(Op::Marker, 0, 1, 0, 0)])), CompStatus::BadSequence);
    assert!(!dh.counters().unwrap().complete);
}

/// On the export side a lane other than 0 begins only under a new export id from lane 0,
/// so a lane's stream cannot be begun again and paired with lane 0's earlier one.
#[test]
fn a_lane_begins_only_under_a_new_export() {
    let (_src, mut sh, _dst, dh) = lane_pair(2, 2);
    sh.bind_export(&dh.challenges().unwrap()).unwrap();
    lane_markers(&mut sh, Op::Begin, &[0, 1], 0);
    assert_eq!(refused(sh.run(&[req(Op::Begin, 1, 1, 0, 0)])), CompStatus::NoStream, "lane 1 again");
    lane_markers(&mut sh, Op::Begin, &[0, 1], 0);
}
