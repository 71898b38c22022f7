//! Failure handling: every failure names its phase, leaves the source VM running with its
//! dirty pages intact, never resumes the destination, and a retry succeeds.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use accel_user::app::config::{ByteSize, Config, DirtySource, WorkloadKind};
use accel_user::app::session;
use accel_user::dest::RecvError;
use accel_user::source::{Event, Phase, SendError};
use accel_user::wire::frame::{self, FrameKind, Header, HEADER_LEN};
use accel_user::wire::payload::{self, Run};
use embedded_vmm::vmm::{GuestSpec, Machine, Workload};
use migaccel_tests::{
    assert_ram_eq, assert_running, config, migaccel_bin, resume_if_fenced, spawn_receive_process, test_key_file, Cut,
    Later, Proxy,
};

use migaccel_tests::spawn_receiver as receiver;

/// Every page on which the (failed) destination differs from the paused source must be
/// pending in the source's dirty tracker: nothing the peer lacks is forgotten.
fn assert_dirty_covers(src: &Machine, dst: &Machine) {
    src.pause().unwrap();
    let pending = src.dirty().peek().unwrap();
    let (a, b) = (src.ram().snapshot(), dst.ram().snapshot());
    let diff = accel_user::app::verify::diff_pages(&a, &b, usize::MAX);
    assert!(!diff.is_empty(), "the failed destination should lack something");
    let lost: Vec<u64> = diff.iter().copied().filter(|g| !pending.contains(*g)).take(10).collect();
    assert!(lost.is_empty(), "{} differing pages, not dirty at the source: {lost:?}", diff.len());
    src.resume().unwrap();
}

/// A fresh destination receives the same source VM correctly.
fn retry_succeeds(cfg: &Config, src: &Machine) {
    let (addr, t) = receiver(cfg);
    let rep = session::send(cfg, src, &addr, &mut |_| {}).expect("retry to a fresh destination");
    let (r, res) = t.join().unwrap();
    let got = res.expect("destination of the retry");
    assert!(rep.precopy_rounds[0].pages == src.ram().pages(), "a retry starts with all RAM");
    let context = ("retry", &rep.precopy_rounds, &rep.final_round);
    assert_ram_eq(&src.ram().snapshot(), &got.snapshot.unwrap_or_default(), &context);
    assert_running(r.machine().unwrap());
}

fn cut_test(cut: Cut, expect_phase: fn(Phase) -> bool) {
    let mut cfg = config(WorkloadKind::Ab, DirtySource::Ring);
    // The cutting proxy relays one connection: pages on the control stream.
    cfg.migration.streams = 1;
    let src = session::boot_source(&cfg).unwrap();
    let (addr, t) = receiver(&cfg);
    let proxy = Proxy::start(addr, cut);
    let err = session::send(&cfg, &src, &proxy.addr, &mut |_| {}).expect_err("the cut must fail the migration");
    assert!(proxy.cut_happened.load(std::sync::atomic::Ordering::SeqCst), "proxy never cut: {err}");
    assert!(expect_phase(err.phase()), "wrong phase: {err}");
    assert!(err.to_string().contains(&err.phase().to_string()), "error names the phase: {err}");
    drop(proxy);
    let (r, res) = t.join().unwrap();
    assert!(res.is_err(), "destination must fail too");
    let dm = r.machine().expect("destination VM was created");
    assert!(!dm.is_running(), "destination must never resume");
    assert_eq!(dm.reports().iter().sum::<u64>(), 0, "destination guest never ran");
    // The proxy cut before `Complete` got through: the destination never resumed, and a
    // source that had sent `Complete` learnt so by asking (the proxy relays new connections).
    assert!(!matches!(err, SendError::HandoverUnknown { .. }), "the source could ask: {err}");
    assert_running(&src);
    assert_eq!(src.throttle(), 0, "a failed migration must not leave the guest throttled");
    assert_dirty_covers(&src, dm);
    retry_succeeds(&cfg, &src);
}

#[test]
fn connection_cut_mid_precopy() {
    // Cut as round 1 ends: round 0 arrived whole, round 1 in part. Socket buffers let the
    // source write on, so it may notice in any later phase, up to waiting for `Resumed`.
    cut_test(Cut::AtFrame(FrameKind::EndOfRound, 1), |p| {
        matches!(p, Phase::Precopy { round } if round >= 1)
            || matches!(p, Phase::StopAndCopy | Phase::MachineState | Phase::AwaitResume)
    });
}

#[test]
fn connection_cut_during_stop_and_copy() {
    // Cut when the first vCPU state is due: the source had stopped its vCPUs and sent the
    // final pages; it must resume and keep those pages dirty.
    cut_test(Cut::AtFrame(FrameKind::State, 0), |p| {
        matches!(p, Phase::MachineState | Phase::StopAndCopy | Phase::AwaitResume)
    });
}

/// `Resumed` is lost and the source's connection reset: the source asks the destination on
/// a new connection, learns that it runs the VM, and reports the migration as handed over.
/// Exactly one copy runs.
#[test]
fn lost_resumed_is_settled_by_asking_the_destination() {
    let mut cfg = config(WorkloadKind::Ab, DirtySource::Bitmap);
    cfg.migration.streams = 1;
    let src = session::boot_source(&cfg).unwrap();
    let (addr, t) = receiver(&cfg);
    let proxy = Proxy::start(addr, Cut::SwallowResumed);
    let rep = session::send(&cfg, &src, &proxy.addr, &mut |_| {}).expect("the destination says it runs the VM");
    assert!(proxy.cut_happened.load(std::sync::atomic::Ordering::SeqCst), "proxy never swallowed Resumed");
    let why = rep.handover_query.as_deref().expect("the report says the handover was settled by a query");
    assert!(why.contains("waiting for the destination to resume"), "{why}");
    drop(proxy);
    let (r, res) = t.join().unwrap();
    res.expect("the destination resumed");
    assert_running(r.machine().unwrap());
    assert!(!src.is_running(), "two copies must never run");
    assert_eq!(src.throttle(), 0);
}

/// `Resumed` is lost and the destination cannot be reached any more: the source cannot
/// know whether it runs the VM and stays paused (`HandoverUnknown`), naming why it could
/// not ask.
#[test]
fn lost_resumed_and_unreachable_destination_leaves_the_source_paused() {
    let mut cfg = config(WorkloadKind::Ab, DirtySource::Bitmap);
    cfg.migration.streams = 1;
    // Bounds on waits for what cannot come (the proxy refuses every later connection).
    cfg.migration.handover_query_ms = 1_000;
    cfg.receiver.handover_window_ms = 1_000;
    let src = session::boot_source(&cfg).unwrap();
    let (addr, t) = receiver(&cfg);
    let proxy = Proxy::start_with(addr, Cut::SwallowResumed, Later::Refuse);
    let err = session::send(&cfg, &src, &proxy.addr, &mut |_| {}).expect_err("the source never learns of the resume");
    assert!(matches!(err, SendError::HandoverUnknown { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("stays paused") && msg.contains("could not be asked"), "{msg}");
    drop(proxy);
    let (r, res) = t.join().unwrap();
    res.expect("the destination resumed");
    assert_running(r.machine().unwrap());
    assert!(!src.is_running(), "two copies must never run");
}

/// The whole `Complete` left the source and never reached the destination: the source
/// asks, the destination (which never resumed) says it never will, and the source runs
/// again with its dirty bits; the destination stays paused for good.
#[test]
fn lost_complete_is_settled_by_asking_the_destination() {
    let mut cfg = config(WorkloadKind::Ab, DirtySource::Ring);
    cfg.migration.streams = 1;
    let src = session::boot_source(&cfg).unwrap();
    let (addr, t) = receiver(&cfg);
    let proxy = Proxy::start(addr, Cut::SwallowComplete);
    let err = session::send(&cfg, &src, &proxy.addr, &mut |_| {}).expect_err("Complete never arrived");
    assert!(proxy.cut_happened.load(std::sync::atomic::Ordering::SeqCst), "proxy never took Complete: {err}");
    assert!(matches!(err, SendError::NotResumed { .. }), "{err}");
    assert!(err.to_string().contains("never resumed the VM"), "{err}");
    drop(proxy);
    let (r, res) = t.join().unwrap();
    assert!(res.is_err(), "the destination never got Complete");
    let dm = r.machine().expect("destination VM was created");
    assert!(!dm.is_running(), "destination must never resume");
    assert_running(&src);
    assert_dirty_covers(&src, dm);
    retry_succeeds(&cfg, &src);
}

/// The same lost acknowledgement between two `migaccel` processes: `send` asks, learns that
/// the destination runs the VM and exits 0 saying so; `receive` resumed the VM and exits 0.
#[test]
fn lost_resumed_between_processes_is_settled_by_asking() {
    let mut r = spawn_receive_process(&[]);
    let proxy = Proxy::start(r.addr.clone(), Cut::SwallowResumed);
    let out = Command::new(migaccel_bin())
        .args(["send", "--to", &proxy.addr, "--ram", "128MiB", "--workload", "idle", "--streams", "1"])
        .arg("--auth-key")
        .arg(test_key_file())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("Resumed was lost"), "{stdout}\n{stderr}");
    drop(proxy);
    assert!(r.child.wait().unwrap().success(), "the destination resumed the VM");
}

#[test]
fn connection_cut_before_complete() {
    cut_test(Cut::AtFrame(FrameKind::Complete, 0), |p| matches!(p, Phase::MachineState | Phase::AwaitResume));
}

#[test]
fn receiver_process_killed_mid_precopy() {
    let mut cfg = config(WorkloadKind::Ab, DirtySource::Ring);
    // The receiver is dead: asking it about the handover cannot succeed; do not wait long.
    cfg.migration.handover_query_ms = 500;
    let r = spawn_receive_process(&[]);
    let src = session::boot_source(&cfg).unwrap();
    let pid = r.child.id();
    let mut on = |e: Event| {
        if let Event::Round(r) = e {
            if r.round == 0 {
                let _ = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    };
    let err = session::send(&cfg, &src, &r.addr, &mut on).expect_err("the peer died");
    // Killed after round 0: socket buffers may carry the source further before it notices.
    assert!(err.phase() != Phase::Handshake, "{err}");
    assert!(err.to_string().contains(&err.phase().to_string()), "error names the phase: {err}");
    resume_if_fenced(&err, &src);
    assert_running(&src);
    retry_succeeds(&cfg, &src);
}

#[test]
fn destination_refuses_vm_shape() {
    let cfg = config(WorkloadKind::Idle, DirtySource::Ring);
    let mut small = cfg.clone();
    small.receiver.max_ram = ByteSize(64 << 20);
    let (addr, t) = receiver(&small);
    let src = session::boot_source(&cfg).unwrap();
    let err = session::send(&cfg, &src, &addr, &mut |_| {}).expect_err("refused");
    assert!(matches!(err, SendError::Refused { phase: Phase::Handshake, .. }), "{err}");
    assert!(err.to_string().contains("exceeds this receiver's limit"), "{err}");
    let (r, res) = t.join().unwrap();
    assert!(matches!(res, Err(RecvError::Refused(_))));
    assert!(r.machine().is_none(), "no VM created for a refused shape");
    assert_running(&src);
    retry_succeeds(&cfg, &src);
}

/// A destination that answers Hello with garbage: the source fails in the handshake and runs on.
#[test]
fn garbage_from_destination() {
    let cfg = config(WorkloadKind::Idle, DirtySource::Bitmap);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut b = [0u8; 64];
        let _ = s.read(&mut b);
        let _ = s.write_all(&[0x5a; 64]);
        std::thread::sleep(Duration::from_millis(200));
    });
    let src = session::boot_source(&cfg).unwrap();
    let err = session::send(&cfg, &src, &addr, &mut |_| {}).expect_err("garbage");
    assert!(err.to_string().contains("handshake") && err.to_string().contains("bad magic"), "{err}");
    t.join().unwrap();
    assert_running(&src);
    retry_succeeds(&cfg, &src);
}

// ---- hostile input to the receiver -------------------------------------------------------

const SPEC: GuestSpec = GuestSpec { ram_bytes: 64 << 20, vcpus: 1, workload: Workload::Idle };

fn frame(kind: FrameKind, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = Header { kind, len: payload.len() as u32, seq }.encode().to_vec();
    v.extend_from_slice(payload);
    v
}

/// Run a receiver against raw bytes from `client`; return its error and whether a VM was
/// ever resumed.
fn hostile(client: impl FnOnce(&mut TcpStream) + Send + 'static) -> (RecvError, bool) {
    hostile_with(&hostile_config(), client)
}

/// The receiver's config for hostile peers: short I/O timeout and wait for a source. These
/// peers speak the plain protocol to reach the decoders and state machine behind the
/// authentication (a peer with the key, or `auth.insecure`); `tests/auth.rs` shows that
/// without the key they get no further than the handshake.
fn hostile_config() -> Config {
    let mut cfg = Config::default();
    cfg.auth.insecure = true;
    cfg.migration.io_timeout_ms = 3000;
    // Longer than the I/O timeout, after which the receiver drops a silent connection.
    cfg.receiver.wait_ms = 6000;
    cfg
}

/// [`hostile`] against a receiver configured by `cfg`.
fn hostile_with(cfg: &Config, client: impl FnOnce(&mut TcpStream) + Send + 'static) -> (RecvError, bool) {
    let (addr, t) = receiver(cfg);
    let c = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        client(&mut s);
        std::thread::sleep(Duration::from_millis(100));
    });
    let (r, res) = t.join().unwrap();
    c.join().unwrap();
    let resumed = r.machine().is_some_and(|m| m.is_running());
    (res.expect_err("hostile input must fail"), resumed)
}

fn hello(s: &mut TcpStream) {
    s.write_all(&frame(FrameKind::Hello, 0, &payload::Hello::embedded(&SPEC.shape()).encode())).unwrap();
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    let h = Header::decode(&h).unwrap();
    assert_eq!(h.kind, FrameKind::HelloAck);
    let mut p = vec![0u8; h.len as usize];
    s.read_exact(&mut p).unwrap();
    assert_eq!(payload::HelloAck::decode(&p).unwrap().status, 0);
}

#[test]
fn receiver_rejects_garbage() {
    // The garbage is dropped with its reason; the receiver waits on for a real source.
    let (e, resumed) = hostile(|s| s.write_all(&[0xab; 200]).unwrap());
    assert!(!resumed);
    let e = e.to_string();
    assert!(e.contains("no source connected within 6s") && e.contains("bad magic"), "{e}");
}

#[test]
fn receiver_rejects_unknown_version() {
    let (e, _) = hostile(|s| {
        let mut f = frame(FrameKind::Hello, 0, &payload::Hello::embedded(&SPEC.shape()).encode());
        f[4..6].copy_from_slice(&(frame::PROTOCOL_VERSION + 1).to_le_bytes());
        s.write_all(&f).unwrap();
    });
    assert!(e.to_string().contains(&format!("unsupported protocol version {}", frame::PROTOCOL_VERSION + 1)), "{e}");
}

#[test]
fn receiver_rejects_oversized_frame_before_allocating() {
    let (e, resumed) = hostile(|s| {
        hello(s);
        let mut h = Header { kind: FrameKind::Pages, len: 0, seq: 1 }.encode();
        h[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        s.write_all(&h).unwrap();
    });
    assert!(!resumed);
    assert!(e.to_string().contains("exceeds its") && e.to_string().contains("precopy round 0"), "{e}");
}

#[test]
fn receiver_rejects_truncated_frame() {
    // A truncated first frame never leaves the lobby (its unit test); one after the
    // handshake fails the receive.
    let (e, resumed) = hostile(|s| {
        hello(s);
        let f = frame(FrameKind::EndOfRound, 1, &payload::EndOfRound { round: 0, pages: 0 }.encode());
        s.write_all(&f[..HEADER_LEN + 4]).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
    });
    assert!(!resumed);
    assert!(e.to_string().contains("precopy round 0") && e.to_string().contains("closed"), "{e}");
}

#[test]
fn receiver_rejects_gfn_outside_ram() {
    let (e, resumed) = hostile(|s| {
        hello(s);
        let pages = SPEC.ram_bytes / 4096;
        let mut p = Vec::new();
        payload::PagesHead::encode(0, &[Run { gfn: pages, npages: 1, flags: 0 }], &mut p);
        p.extend_from_slice(&[0x41; 4096]);
        let _ = s.write_all(&frame(FrameKind::Pages, 1, &p));
    });
    assert!(!resumed);
    assert!(e.to_string().contains("outside guest RAM"), "{e}");
}

#[test]
fn receiver_never_resumes_incomplete_memory() {
    let (e, resumed) = hostile(|s| {
        hello(s);
        let mut p = Vec::new();
        payload::PagesHead::encode(0, &[Run { gfn: 0, npages: 16, flags: frame::RUN_ZERO }], &mut p);
        s.write_all(&frame(FrameKind::Pages, 1, &p)).unwrap();
        s.write_all(&frame(FrameKind::EndOfRound, 2, &payload::EndOfRound { round: 0, pages: 16 }.encode())).unwrap();
        let st = kvm_hooks::state::VcpuState::default().encode();
        let mut sp = payload::State::prefix(0, st.len() as u32).to_vec();
        sp.extend_from_slice(&st);
        s.write_all(&frame(FrameKind::State, 3, &sp)).unwrap();
        s.write_all(&frame(
            FrameKind::Complete,
            4,
            &payload::Complete { rounds: 1, sections: 1, pages_sent: 16 }.encode(),
        ))
        .unwrap();
    });
    assert!(!resumed, "a VM with missing pages must never resume");
    assert!(e.to_string().contains("only 16 of 16384 pages"), "{e}");
}

/// A source that goes silent after the handshake: the receiver gives up after
/// `io_timeout_ms` of silence on every connection, names the state, and resumes nothing.
#[test]
fn receiver_gives_up_on_a_silent_source() {
    let (e, resumed) = hostile(|s| {
        hello(s);
        std::thread::sleep(Duration::from_secs(5));
    });
    assert!(!resumed);
    let e = e.to_string();
    assert!(e.contains("timed out after 3s") && e.contains("precopy round 0"), "{e}");
}

#[test]
fn receiver_checks_round_page_counts() {
    let (e, resumed) = hostile(|s| {
        hello(s);
        s.write_all(&frame(FrameKind::EndOfRound, 1, &payload::EndOfRound { round: 0, pages: 5 }.encode())).unwrap();
    });
    assert!(!resumed);
    assert!(e.to_string().contains("source sent 5 pages in round 0, 0 arrived"), "{e}");
}

#[test]
fn receiver_rejects_out_of_sequence_frame() {
    let (e, _) = hostile(|s| {
        hello(s);
        s.write_all(&frame(FrameKind::EndOfRound, 9, &payload::EndOfRound { round: 0, pages: 0 }.encode())).unwrap();
    });
    assert!(e.to_string().contains("sequence 9, expected 1"), "{e}");
}

#[test]
fn receiver_rejects_bad_vcpu_state() {
    let (e, resumed) = hostile(|s| {
        hello(s);
        // Every page (as one zero run), so the receiver gets as far as the machine state.
        let pages = SPEC.shape().ram_bytes / 4096;
        let mut p = Vec::new();
        payload::PagesHead::encode(0, &[payload::Run { gfn: 0, npages: pages as u32, flags: frame::RUN_ZERO }], &mut p);
        s.write_all(&frame(FrameKind::Pages, 1, &p)).unwrap();
        s.write_all(&frame(FrameKind::EndOfRound, 2, &payload::EndOfRound { round: 0, pages }.encode())).unwrap();
        s.write_all(&frame(FrameKind::EndOfRound, 3, &payload::EndOfRound { round: 1, pages: 0 }.encode())).unwrap();
        let mut sp = payload::State::prefix(0, 8).to_vec();
        sp.extend_from_slice(b"NOTVCPU!");
        s.write_all(&frame(FrameKind::State, 4, &sp)).unwrap();
        s.write_all(&frame(
            FrameKind::Complete,
            5,
            &payload::Complete { rounds: 2, sections: 1, pages_sent: pages }.encode(),
        ))
        .unwrap();
    });
    assert!(!resumed);
    assert!(e.to_string().contains("machine state: vCPU 0"), "{e}");
}

/// A VM bigger than this host can hold is refused at the handshake, before anything is
/// allocated for it (the default `max_ram` alone would let 64 GiB in).
#[test]
fn receiver_refuses_a_vm_larger_than_the_host_can_hold() {
    let avail = accel_user::host::mem_available().expect("MemAvailable");
    let ram = (avail + (2 << 30)).next_multiple_of(2 << 20);
    let (e, resumed) = hostile(move |s| {
        let shape = kvm_hooks::migratable::VmShape { ram_bytes: ram, vcpus: 1 };
        s.write_all(&frame(FrameKind::Hello, 0, &payload::Hello::embedded(&shape).encode())).unwrap();
    });
    assert!(!resumed);
    let e = e.to_string();
    if ram <= Config::default().receiver.max_ram.0 {
        assert!(e.contains("this host has available") && e.contains(&ram.to_string()), "{e}");
    } else {
        assert!(e.contains("exceeds this receiver's limit"), "{e}");
    }
}

/// A source that never stops sending rounds is cut off at `receiver.max_rounds`.
#[test]
fn receiver_caps_precopy_rounds() {
    let mut cfg = hostile_config();
    cfg.receiver.max_rounds = 3;
    let (e, resumed) = hostile_with(&cfg, |s| {
        hello(s);
        for round in 0..10 {
            if s.write_all(&frame(
                FrameKind::EndOfRound,
                1 + round as u64,
                &payload::EndOfRound { round, pages: 0 }.encode(),
            ))
            .is_err()
            {
                break;
            }
        }
    });
    assert!(!resumed);
    assert!(e.to_string().contains("at most 3 precopy rounds (receiver.max_rounds)"), "{e}");
}

/// A peer that sends a byte now and then, never silent for the I/O timeout, is cut off at
/// the receiver's overall deadline.
#[test]
fn receiver_cuts_off_a_slow_peer_at_its_deadline() {
    let mut cfg = hostile_config();
    cfg.receiver.deadline_ms = 1000;
    let (e, resumed) = hostile_with(&cfg, |s| {
        hello(s);
        // One valid EndOfRound frame, a byte every 300 ms: 7 s in all, and the receiver
        // would otherwise wait for more frames until its I/O timeout after that.
        let f = frame(FrameKind::EndOfRound, 1, &payload::EndOfRound { round: 0, pages: 0 }.encode());
        for b in f {
            if s.write_all(&[b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    assert!(!resumed);
    assert!(e.to_string().contains("deadline of 1s (receiver.deadline_ms)"), "{e}");
}

/// Relay every connection to `upstream`; before relaying the second one (the first data
/// stream), open a stray connection that joins another session and a silent one to
/// `upstream`, so they wait in the receiver's queue ahead of the real data streams.
fn meddling_proxy(upstream: String) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut keep = Vec::new();
        for (i, c) in l.incoming().enumerate() {
            let Ok(c) = c else { break };
            if i == 1 {
                let mut stray = TcpStream::connect(&upstream).unwrap();
                // Shaped like a sealed Join (payload and tag), sealed with no key of this session.
                let mut join = frame(FrameKind::Join, 0, &payload::Join { session: 0x5eed_5eed, stream: 0 }.encode());
                join.extend_from_slice(&[0x77; accel_user::wire::seal::TAG_LEN]);
                let _ = stray.write_all(&join);
                keep.push(stray);
                keep.push(TcpStream::connect(&upstream).unwrap());
            }
            let up = TcpStream::connect(&upstream).unwrap();
            for (mut from, mut to) in [(c.try_clone().unwrap(), up.try_clone().unwrap()), (up, c)] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    addr
}

/// Garbage, silent and stray connections (before the source and between its control and
/// data connections) are dropped; the real two-stream migration completes page for page.
#[test]
fn stray_and_silent_connections_do_not_disturb_a_migration() {
    let mut cfg = config(WorkloadKind::Ab, DirtySource::Bitmap);
    cfg.migration.streams = 2;
    let src = session::boot_source(&cfg).unwrap();
    let (addr, t) = receiver(&cfg);
    let _silent = TcpStream::connect(&addr).unwrap();
    let mut garbage = TcpStream::connect(&addr).unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let proxy = meddling_proxy(addr);
    let rep = session::send(&cfg, &src, &proxy, &mut |_| {}).expect("the migration succeeds");
    assert!(rep.transport.starts_with("2 x"), "{}", rep.transport);
    let (r, res) = t.join().unwrap();
    let got = res.expect("destination");
    let dst = r.machine().unwrap();
    assert_ram_eq(&src.ram().snapshot(), &got.snapshot.unwrap_or_default(), &"meddled migration");
    assert_running(dst);
}
