//! The sending engine on a fake VM (no KVM) against a scripted destination over loopback:
//! what it sends, when it logs, and what it leaves behind when the peer fails.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_hooks::memory::PAGE_SIZE;
use kvm_hooks::migratable::Migratable;

use crate::dest::Receiver;
use crate::fake_vm::{FakeVm, FakeVms};
use crate::policy::{AutoConverge, PolicyConfig};
use crate::source::{self, Event, Phase, SendError, SendOptions};
use crate::wire::frame::{self, FrameKind, Header, HEADER_LEN};
use crate::wire::payload;
use crate::wire::transport::TcpTransport;

/// What the scripted destination does.
#[derive(Clone, Copy)]
enum Script {
    /// Accept the VM and acknowledge `Complete` with `Resumed`.
    Accept,
    /// Refuse the VM at `Hello`.
    Refuse,
    /// Close the connection once `EndOfRound(round)` arrived.
    CloseAfterRound(u32),
}

fn options(min_rounds: u32) -> SendOptions {
    SendOptions {
        policy: PolicyConfig {
            downtime_target: Duration::from_millis(50),
            min_rounds,
            max_rounds: 10,
            auto_converge: AutoConverge { enabled: false, initial: 20, increment: 10, max: 99 },
        },
        batch_pages: 256,
        zero_detect: true,
        ack_timeout: Duration::from_secs(30),
        handover_query: Duration::ZERO,
        queries: false,
        time_limit: None,
        max_bandwidth: 0,
        cancel: crate::cancel::Cancel::new(),
        io_timeout: Duration::from_secs(30),
        streams: 0,
        confidential: None,
    }
}

fn read_frame(s: &mut TcpStream) -> Option<(Header, Vec<u8>)> {
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h).ok()?;
    let h = Header::decode(&h).expect("the engine sends valid headers");
    let mut p = vec![0u8; h.len as usize];
    s.read_exact(&mut p).ok()?;
    Some((h, p))
}

fn reply(s: &mut TcpStream, kind: FrameKind, seq: u64, p: &[u8]) {
    s.write_all(&Header { kind, len: p.len() as u32, seq }.encode()).unwrap();
    s.write_all(p).unwrap();
}

/// What the scripted destination ends with: its RAM image and the rounds it saw end.
type Outcome = JoinHandle<(Vec<u8>, Vec<u32>)>;

/// A destination that keeps guest RAM as a byte image, following `script`.
fn destination(script: Script, ram_bytes: u64) -> (String, Outcome) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut ram = vec![0u8; ram_bytes as usize];
        let mut ended = Vec::new();
        let mut seq = 0;
        while let Some((h, p)) = read_frame(&mut s) {
            match h.kind {
                FrameKind::Hello => {
                    let status = if matches!(script, Script::Refuse) { 1 } else { 0 };
                    reply(&mut s, FrameKind::HelloAck, seq, &payload::HelloAck::encode(status, &[], "scripted"));
                    seq += 1;
                    if status != 0 {
                        break;
                    }
                }
                FrameKind::Pages => {
                    let (_, runs, mut data) = payload::PagesHead::split(&p, ram.len() as u64 / PAGE_SIZE).unwrap();
                    for r in runs {
                        let at = (r.gfn * PAGE_SIZE) as usize;
                        let len = (u64::from(r.npages) * PAGE_SIZE) as usize;
                        if r.is_zero() {
                            ram[at..at + len].fill(0);
                        } else {
                            ram[at..at + len].copy_from_slice(&data[..len]);
                            data = &data[len..];
                        }
                    }
                }
                FrameKind::EndOfRound => {
                    let round = payload::EndOfRound::decode(&p).unwrap().round;
                    ended.push(round);
                    if matches!(script, Script::CloseAfterRound(n) if n == round) {
                        break;
                    }
                }
                FrameKind::Complete => {
                    reply(&mut s, FrameKind::Resumed, seq, &payload::Resumed { capture_us: 0 }.encode());
                    seq += 1;
                }
                _ => {}
            }
        }
        let _ = s.shutdown(std::net::Shutdown::Both);
        (ram, ended)
    });
    (addr, h)
}

fn send(vm: &FakeVm, addr: &str, min_rounds: u32, on: &mut dyn FnMut(Event)) -> Result<(), SendError> {
    let s = TcpStream::connect(addr).unwrap();
    let mut t = TcpTransport::new(s, Duration::from_secs(30)).unwrap();
    source::migrate(vm, &mut t, &options(min_rounds), on).map(|_| ())
}

/// Every page the guest wrote during precopy reaches the destination: pages written after
/// round 0 ride in later rounds or in stop-and-copy. Logging runs only during the migration.
#[test]
fn pages_written_between_rounds_are_sent_again() {
    let vm = FakeVm::new();
    for gfn in (0..vm.ram().pages()).step_by(7) {
        vm.write(gfn, 1);
    }
    assert!(!vm.dirty.is_logging());
    let (addr, dest) = destination(Script::Accept, vm.shape().ram_bytes);
    let mut next = 2u8;
    let mut on = |e: Event| {
        if let Event::Round(r) = e {
            // The guest writes between rounds: new pages and pages sent before.
            for gfn in (u64::from(r.round)..vm.ram().pages()).step_by(97) {
                vm.write(gfn, next);
            }
            next += 1;
        }
    };
    send(&vm, &addr, 3, &mut on).expect("migration");
    let (ram, ended) = dest.join().unwrap();
    assert!(ended.len() >= 4, "three precopy rounds and stop-and-copy: {ended:?}");
    let d = crate::app::verify::diff_pages(&vm.ram().snapshot(), &ram, 8);
    assert!(d.is_empty(), "pages differ: {d:?}");
    assert!(!vm.is_running(), "the destination owns the VM: the source stays paused");
    assert!(!vm.dirty.is_logging(), "logging ends with the migration");
    assert_eq!(vm.dirty.starts.load(Ordering::Relaxed), 1);
}

/// The destination goes away after round 0: the error names the phase, the VM runs on,
/// unthrottled and unlogged, with every page pending for the next attempt.
#[test]
fn a_peer_lost_mid_precopy_leaves_the_vm_running_with_every_page_dirty() {
    let vm = FakeVm::new();
    vm.write(5, 9);
    let (addr, dest) = destination(Script::CloseAfterRound(0), vm.shape().ram_bytes);
    let mut dest = Some(dest);
    let mut on = |e: Event| {
        if let Event::Round(_) = e {
            // The destination is gone before the source goes on: without this, a VM this
            // small is sent whole into socket buffers before the close shows, and the loss
            // surfaces only after the commit point (where the source stays paused).
            if let Some(d) = dest.take() {
                let _ = d.join().unwrap();
            }
            vm.set_throttle(40);
            vm.write(6, 3);
        }
    };
    let err = send(&vm, &addr, 5, &mut on).expect_err("the peer closed");
    assert!(!matches!(err.phase(), Phase::Handshake), "{err}");
    assert!(err.to_string().contains(&err.phase().to_string()), "{err}");
    assert!(vm.is_running(), "the source VM runs on");
    assert_eq!(vm.throttle(), 0, "no throttle left behind");
    assert!(!vm.dirty.is_logging(), "logging stops with a failed migration");
    assert_eq!(vm.dirty.pending().len() as u64, vm.ram().pages(), "every page pending");
}

/// A refused VM: no logging was ever started, the VM runs on.
#[test]
fn a_refused_vm_is_never_logged() {
    let vm = FakeVm::new();
    let (addr, dest) = destination(Script::Refuse, vm.shape().ram_bytes);
    let err = send(&vm, &addr, 1, &mut |_| {}).expect_err("refused");
    let _ = dest.join().unwrap();
    assert!(matches!(err, SendError::Refused { phase: Phase::Handshake, .. }), "{err}");
    assert_eq!(vm.dirty.starts.load(Ordering::Relaxed), 0);
    assert!(!vm.dirty.is_logging());
    assert!(vm.is_running());
}

/// A receiver with fake destination VMs, on a thread, for one migration over loopback.
type FakeReceive = JoinHandle<(Receiver<FakeVms>, Result<crate::dest::Received, crate::dest::RecvError>)>;

fn fake_receiver(capture: bool) -> (String, FakeReceive) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let h = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut t = TcpTransport::new(s, Duration::from_secs(30)).unwrap();
        let mut r = Receiver::new(crate::app::config::Config::default().recv_options(capture), FakeVms::default());
        let res = r.run(&mut t);
        (r, res)
    });
    (addr, h)
}

/// The receiving state machine on a fake VM, fed by the sending engine on another fake VM:
/// the destination resumes with the source's RAM and vCPU states.
#[test]
fn fake_vm_to_fake_vm() {
    let vm = FakeVm::new();
    for gfn in (0..vm.ram().pages()).step_by(3) {
        vm.write(gfn, 0x5a);
    }
    let (addr, dest) = fake_receiver(true);
    let mut on = |e: Event| {
        if let Event::Round(r) = e {
            vm.write(u64::from(r.round) + 11, 0xa5);
        }
    };
    send(&vm, &addr, 2, &mut on).expect("migration");
    let (r, res) = dest.join().unwrap();
    let got = res.expect("the destination receives the VM");
    let m = r.machine().expect("a VM was created");
    assert!(m.resumed.load(Ordering::Acquire));
    let restored = m.restored.lock().unwrap().clone();
    assert_eq!(restored, Some(crate::fake_vm::fake_state(1)), "the source's machine state restored");
    let d = crate::app::verify::diff_pages(&vm.ram().snapshot(), got.snapshot.as_deref().unwrap(), 8);
    assert!(d.is_empty(), "pages differ: {d:?}");
}

/// A source that vanishes after part of round 0: the fake destination is never resumed.
#[test]
fn a_vanished_source_is_never_resumed() {
    let (addr, dest) = fake_receiver(false);
    let mut s = TcpStream::connect(addr).unwrap();
    let spec = kvm_hooks::migratable::VmShape { ram_bytes: 64 << 20, vcpus: 1 };
    reply(&mut s, FrameKind::Hello, 0, &payload::Hello::embedded(&spec).encode());
    let (h, _) = read_frame(&mut s).expect("HelloAck");
    assert_eq!(h.kind, FrameKind::HelloAck);
    let mut p = Vec::new();
    payload::PagesHead::encode(0, &[payload::Run { gfn: 0, npages: 8, flags: frame::RUN_ZERO }], &mut p);
    reply(&mut s, FrameKind::Pages, 1, &p);
    drop(s);
    let (r, res) = dest.join().unwrap();
    let e = res.expect_err("an incomplete VM is refused").to_string();
    assert!(e.contains("precopy round 0"), "{e}");
    assert!(!r.machine().expect("the VM was created at Hello").resumed.load(Ordering::Acquire));
}

/// The fake VM meets the boundary's conformance suite (as the embedded VMM and QEMU do in
/// their own tests).
#[test]
fn fake_vm_conforms() {
    let vm = FakeVm::new();
    let mut n = 0u64;
    let mut poke = || {
        n += 1;
        let pages = vec![3 * n, 3 * n + 1];
        for &p in &pages {
            vm.write(p, n as u8);
        }
        Some(pages)
    };
    kvm_hooks::conformance::check_source(&vm, &mut poke).unwrap();
    assert!(vm.is_running());
}

/// The switchover estimate counts what the machine state costs: a VM whose state alone
/// takes the whole downtime target never converges and switches over at the round limit.
#[test]
fn the_machine_state_cost_counts_against_the_downtime_target() {
    use crate::policy::SwitchReason;
    for (cost, converges) in [(Duration::ZERO, true), (Duration::from_millis(50), false)] {
        let mut vm = FakeVm::new();
        vm.switchover_cost = cost;
        let (addr, dest) = fake_receiver(false);
        let mut reason = None;
        // Two rounds at least: from round 1 on, each round finds the page written after the
        // one before, so the final round is never empty.
        send(&vm, &addr, 2, &mut |e| match e {
            Event::Round(r) => vm.write(u64::from(r.round) + 5, 1),
            Event::Switchover(r) => reason = Some(r),
            _ => {}
        })
        .expect("migration");
        dest.join().unwrap().1.expect("received");
        match reason.expect("a switchover") {
            SwitchReason::Converged { .. } => assert!(converges, "cost {cost:?}"),
            SwitchReason::RoundLimit { .. } => assert!(!converges, "cost {cost:?}"),
            SwitchReason::TimeLimit { .. } => panic!("no time limit is set"),
        }
    }
}
