//! The transports: every mode with 1, 2 and 4 page streams, faults in zero-copy bursts,
//! short reads, and zero-copy sends racing guest writes.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use accel_user::app::config::{ByteSize, Config, DirtySource, WorkloadKind};
use accel_user::app::session;
use accel_user::source::{Event, Phase};
use accel_user::wire::frame::{FrameKind, Header, HEADER_LEN};
use accel_user::wire::payload;
use accel_user::wire::transport::TransportMode;
use embedded_vmm::guest::DATA_START;
use embedded_vmm::vmm::{GuestSpec, Machine, Workload};
use kvm_hooks::dirty::DirtySet;
use kvm_hooks::uring::{Piece, SendMode, UringSender};
use kvm_hooks::vm::DirtyPreference;
use migaccel_tests::{assert_ram_eq, assert_running, config, spawn_receiver, wait_for_reports, Cut, Proxy};

fn cfg(mode: TransportMode, streams: u32) -> Config {
    let mut c = config(WorkloadKind::Ab, DirtySource::Ring);
    c.migration.transport = mode;
    c.migration.streams = streams;
    // The zero-copy tests cover the registered-buffer path (off by default).
    c.migration.fixed_buffers = mode == TransportMode::Zerocopy;
    c.migration.downtime_target_ms = 1;
    c.migration.min_rounds = 3;
    c.migration.max_rounds = 4;
    c
}

fn matrix(mode: TransportMode) {
    for streams in [1, 2, 4] {
        let c = cfg(mode, streams);
        run_matrix_cell(&c, mode, streams);
    }
}

/// One migration of the matrix: verified page for page, on the transport asked for, sealed
/// unless the config says `auth.insecure`.
fn run_matrix_cell(c: &Config, mode: TransportMode, streams: u32) {
    let out = session::demo(c, &mut |_| {}).unwrap_or_else(|e| panic!("{mode:?} x {streams}: {e:#}"));
    let r = &out.report;
    assert!(r.verification.ok(), "{mode:?} x {streams}: {:?}", r.verification);
    assert!(r.source.precopy_rounds.len() >= 3, "{mode:?} x {streams}: {} rounds", r.source.precopy_rounds.len());
    assert_eq!(r.source.streams, streams);
    let t = &r.source.transport;
    assert_eq!(t.contains("sealed (AEGIS-256X4)"), !c.auth.insecure, "{t}");
    match mode {
        TransportMode::Blocking => assert!(t.contains("blocking"), "{t}"),
        TransportMode::Copy => assert!(t.contains("io_uring copy"), "{t}"),
        // Sealed frames go from copies; unauthenticated ones straight from guest RAM.
        TransportMode::Zerocopy if c.auth.insecure => {
            assert!(t.contains("zero-copy, fixed buffers"), "{t}");
            let z = r.source.zerocopy.expect("zero-copy counters");
            assert!(z.notifications > 0 && z.zerocopy + z.copied == z.notifications, "{z:?}");
        }
        TransportMode::Zerocopy => {
            assert!(t.contains("zero-copy") && !t.contains("fixed"), "{t}");
            let z = r.source.zerocopy.expect("zero-copy counters");
            assert!(z.notifications > 0 && z.zerocopy + z.copied == z.notifications, "{z:?}");
        }
        TransportMode::Auto => {
            let z = r.source.zerocopy.expect("zero-copy counters");
            // Loopback copies every send: auto must notice once it saw enough of them.
            if z.notifications >= 16 * u64::from(streams) {
                assert!(t.contains("io_uring copy"), "{t} after {z:?}");
            }
        }
    }
}

#[test]
fn blocking_1_2_4_streams() {
    matrix(TransportMode::Blocking);
}
#[test]
fn uring_copy_1_2_4_streams() {
    matrix(TransportMode::Copy);
}
#[test]
fn uring_zerocopy_1_2_4_streams() {
    matrix(TransportMode::Zerocopy);
}
#[test]
fn uring_auto_1_2_4_streams() {
    matrix(TransportMode::Auto);
}
/// Without authentication pages go zero-copy straight from guest RAM (fixed buffers).
#[test]
fn uring_zerocopy_from_guest_ram_unauthenticated() {
    for streams in [1, 2] {
        let mut c = cfg(TransportMode::Zerocopy, streams);
        c.auth.insecure = true;
        run_matrix_cell(&c, TransportMode::Zerocopy, streams);
    }
}

/// Regression: small Pages frames between large ones, zero-copy with fixed buffers on two
/// streams. Zero-copied header bytes were copied by loopback only when the peer's socket took
/// them, after the pool slot had been reused: a later header replaced an earlier one on the
/// wire ("frame sequence 6, expected 5"). Host bytes are now always sent by copy.
#[test]
fn zerocopy_small_frames_keep_framing() {
    for _ in 0..4 {
        let mut c = cfg(TransportMode::Zerocopy, 2);
        c.auth.insecure = true; // the guest-RAM zero-copy path
        c.guest.workload = WorkloadKind::Hot;
        c.guest.hot_working_set = ByteSize(32 << 20);
        c.guest.hot_rate = 100_000;
        let out = session::demo(&c, &mut |_| {}).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(out.report.verification.ok(), "{:?}", out.report.verification);
    }
}

#[test]
fn zerocopy_without_fixed_buffers() {
    let mut c = cfg(TransportMode::Zerocopy, 2);
    c.migration.fixed_buffers = false;
    let out = session::demo(&c, &mut |_| {}).unwrap();
    assert!(out.report.verification.ok());
    let t = &out.report.source.transport;
    assert!(t.contains("zero-copy") && !t.contains("fixed"), "{t}");
}

/// Short reads everywhere: a proxy forwards in writes of at most 1000 bytes.
#[test]
fn short_reads_through_a_chunking_proxy() {
    for mode in [TransportMode::Copy, TransportMode::Zerocopy] {
        let mut c = cfg(mode, 1);
        c.guest.workload = WorkloadKind::Hot;
        c.guest.hot_working_set = ByteSize(4 << 20);
        c.guest.hot_rate = 20_000;
        let (target, dest) = spawn_receiver(&c);
        let proxy = Proxy::start(target, Cut::Chunked(1000));
        let src = session::boot_source(&c).unwrap();
        session::send(&c, &src, &proxy.addr, &mut |_| {}).unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        let (r, res) = dest.join().unwrap();
        let got = res.unwrap();
        let d = accel_user::app::verify::diff_pages(&src.ram().snapshot(), got.snapshot.as_deref().unwrap(), 8);
        assert!(d.is_empty(), "{mode:?}: {d:?}");
        assert_running(r.machine().unwrap());
    }
}

fn read_frame(s: &mut TcpStream) -> (Header, Vec<u8>) {
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    let h = Header::decode(&h).unwrap();
    let mut p = vec![0u8; h.len as usize];
    s.read_exact(&mut p).unwrap();
    (h, p)
}

/// A destination that accepts the VM and its data streams, then drops one data stream in
/// the middle of the first zero-copy burst (the source's next sends meet a reset).
#[test]
fn peer_reset_mid_zero_copy_burst() {
    let mut c = cfg(TransportMode::Zerocopy, 2);
    // A plain peer, and zero-copy straight from guest RAM: the unauthenticated path
    // (sealed frames are sent from copies).
    c.auth.insecure = true;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let fake = std::thread::spawn(move || {
        let (mut ctl, _) = l.accept().unwrap();
        let (h, _) = read_frame(&mut ctl);
        assert_eq!(h.kind, FrameKind::Hello);
        let p = payload::HelloAck::encode(0, &[], "accepted");
        ctl.write_all(&Header { kind: FrameKind::HelloAck, len: p.len() as u32, seq: 0 }.encode()).unwrap();
        ctl.write_all(&p).unwrap();
        let mut data: Vec<TcpStream> = (0..2).map(|_| l.accept().unwrap().0).collect();
        let mut buf = vec![0u8; 1 << 20];
        let _ = data[1].read(&mut buf); // part of the burst, then gone
        drop(data.remove(1));
        std::thread::sleep(Duration::from_millis(500));
        drop(data);
        drop(ctl);
    });
    let src = session::boot_source(&c).unwrap();
    // Data in every page: round 0 is far more than socket buffers hold, whatever the guest
    // managed to write during its warm-up.
    for gfn in DATA_START / 4096..src.ram().pages() {
        src.ram().write(gfn * 4096 + 8, &[0xa5]).unwrap();
    }
    let err = session::send(&c, &src, &addr, &mut |_| {}).expect_err("the reset must fail the migration");
    fake.join().unwrap();
    assert_eq!(err.phase(), Phase::Precopy { round: 0 }, "{err}");
    assert_running(&src);
    // Round 0 was in flight: every page stays dirty.
    src.pause().unwrap();
    let pending = src.dirty().peek().unwrap();
    assert_eq!(pending.len(), src.ram().pages(), "all RAM must stay dirty after a failed round 0");
    src.resume().unwrap();
    retry(&c, &src);
}

fn retry(c: &Config, src: &Machine) {
    let (addr, dest) = spawn_receiver(c);
    let rep = session::send(c, src, &addr, &mut |_| {}).expect("retry");
    let (_r, res) = dest.join().unwrap();
    let got = res.unwrap();
    let context = ("retry", &rep.precopy_rounds, &rep.final_round);
    assert_ram_eq(&src.ram().snapshot(), &got.snapshot.unwrap_or_default(), &context);
}

#[test]
fn receiver_killed_during_zero_copy_streams() {
    let mut c = cfg(TransportMode::Zerocopy, 4);
    // The receiver is dead: asking it about the handover cannot succeed; do not wait long.
    c.migration.handover_query_ms = 500;
    let mut r = migaccel_tests::spawn_receive_process(&["--transport", "zerocopy"]);
    let src = session::boot_source(&c).unwrap();
    let pid = r.child.id().to_string();
    let mut on = |e: Event| {
        if matches!(e, Event::Round(x) if x.round == 0) {
            let _ = Command::new("kill").args(["-9", &pid]).status();
        }
    };
    let err = session::send(&c, &src, &r.addr, &mut on).expect_err("the receiver died");
    let _ = r.child.wait();
    // Socket buffers may carry the source past round 0 before it notices: any phase after
    // the kill is right.
    assert!(err.phase() != Phase::Handshake, "{err}");
    assert!(err.to_string().contains(&err.phase().to_string()), "error names the phase: {err}");
    migaccel_tests::resume_if_fenced(&err, &src);
    assert_running(&src);
    retry(&c, &src);
}

/// Pages a zero-copy send still references while the guest writes them: every page that
/// changed after its send was submitted is in the next harvest (the send never stands in
/// for a later write).
#[test]
fn pages_changed_during_zero_copy_sends_stay_dirty() {
    use std::os::fd::AsRawFd;
    let pages = 4096u64;
    let spec = GuestSpec { ram_bytes: 64 << 20, vcpus: 2, workload: Workload::Oracle { pages } };
    let m = Machine::boot(spec, DirtyPreference::Ring { bytes: 64 << 10 }).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let sink = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut b = vec![0u8; 1 << 20];
        let mut n = 0u64;
        while let Ok(k) = s.read(&mut b) {
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        n
    });
    let sock = TcpStream::connect(addr).unwrap();
    let (mut tx, note) =
        UringSender::new(sock.as_raw_fd(), SendMode::ZeroCopy, Some(m.ram()), true, Duration::from_secs(10)).unwrap();
    assert!(note.is_none(), "{note:?}");
    let value = |m: &Machine, p: u64| m.ram().read_u64(DATA_START + p * 4096).unwrap();
    let mut iter = 1u64;
    m.set_oracle_iteration(iter).unwrap();
    m.dirty().start().unwrap();
    m.resume().unwrap();
    std::thread::sleep(Duration::from_millis(5));
    m.pause().unwrap();
    let mut to_send = m.dirty().take().unwrap();
    let (mut changed, mut sent) = (0u64, 0u64);
    for _ in 0..20 {
        let before: Vec<u64> = (0..pages).map(|p| value(&m, p)).collect();
        iter += 1;
        m.set_oracle_iteration(iter).unwrap();
        m.resume().unwrap();
        // The guest writes while these zero-copy sends of the same pages are in flight, and
        // writes at least one batch per vCPU before the notifications are collected.
        for chunk in to_send.chunks(2000) {
            let pieces: Vec<Piece<'_>> = chunk.iter().map(|&g| Piece::Guest { gpa: g * 4096, len: 4096 }).collect();
            sent += tx.send(&pieces, Some(m.ram())).unwrap() as u64;
        }
        wait_for_reports(&m, 1);
        tx.flush().unwrap();
        m.pause().unwrap();
        let next = m.dirty().take().unwrap();
        let mut set = DirtySet::new(m.ram().pages());
        for &g in &next {
            set.insert(g);
        }
        for p in 0..pages {
            if value(&m, p) != before[p as usize] {
                changed += 1;
                assert!(
                    set.contains(DATA_START / 4096 + p),
                    "page {p} changed during a zero-copy send but is not dirty"
                );
            }
        }
        to_send = next;
    }
    assert_eq!(tx.outstanding(), 0, "every notification arrived before flush returned");
    assert!(tx.stats.notifs > 0 && tx.stats.sends > 0, "{:?}", tx.stats);
    assert!(changed > 1000, "the guest changed only {changed} pages during sends");
    drop(tx);
    drop(sock);
    assert_eq!(sink.join().unwrap(), sent, "the peer received every byte sent");
}

/// A destination prepared ahead (`receiver.prepare_ram`) creates the VM over the RAM it
/// pre-allocated before the source connected, and the migration passes every check.
#[test]
fn prepared_destination_receives_into_its_preallocated_ram() {
    for prepare in [false, true] {
        let mut c = cfg(TransportMode::Copy, 2);
        if prepare {
            c.receiver.prepare_ram = c.guest.ram;
        }
        let out = session::demo(&c, &mut |_| {}).unwrap_or_else(|e| panic!("prepare {prepare}: {e:#}"));
        let r = &out.report;
        assert!(r.verification.ok(), "prepare {prepare}: {:?}", r.verification);
        assert!(r.source.precopy_rounds.len() >= 3, "prepare {prepare}: {} rounds", r.source.precopy_rounds.len());
        assert_eq!(r.destination.prepared_ram, prepare);
    }
}

/// A source VM whose size differs from what the destination prepared is refused at the
/// handshake with both sizes named; the source keeps running and migrates elsewhere intact.
#[test]
fn prepared_destination_refuses_a_vm_of_another_size() {
    let c = cfg(TransportMode::Copy, 2);
    let src = session::boot_source(&c).unwrap();
    let mut rc = c.clone();
    rc.receiver.prepare_ram = ByteSize(c.guest.ram.0 * 2);
    let (addr, dest) = spawn_receiver(&rc);
    let e = session::send(&c, &src, &addr, &mut |_| {}).expect_err("size mismatch must be refused").to_string();
    assert!(e.contains("prepared for 256 MiB") && e.contains("has 128 MiB"), "{e}");
    let (r, res) = dest.join().unwrap();
    let e = res.expect_err("receiver must refuse").to_string();
    assert!(e.contains("prepared for 256 MiB"), "{e}");
    assert!(r.machine().is_none(), "no VM may be created for a refused source");
    assert_running(&src);
    retry(&c, &src);
}
