//! The authenticated channel (on by default): a peer without the key gets no further than
//! the handshake and never causes a VM to be created; nothing recorded, edited or replayed
//! on the way makes a destination run a VM; a source that fails that way keeps running.
use std::io::{Read, Write};

use accel_user::app::config::{Config, DirtySource, WorkloadKind};
use accel_user::app::session;
use accel_user::source::SendError;
use accel_user::wire::frame::{FrameKind, Header, HEADER_LEN};
use migaccel_tests::{
    assert_ram_eq, assert_running, config, keyless_auth_init, migaccel_bin, record_migration, replay,
    spawn_receiver as receiver, test_key_file, try_keyless_auth_init, StallProxy, Tamper, Tap,
};
use std::time::Duration;

/// One connection (a tap sees everything), a few rounds.
fn cfg() -> Config {
    let mut c = config(WorkloadKind::Ab, DirtySource::Ring);
    c.migration.streams = 1;
    c.migration.downtime_target_ms = 1;
    c.migration.min_rounds = 2;
    c.migration.max_rounds = 3;
    c.migration.io_timeout_ms = 3000;
    c
}

/// A receiver that gives up waiting for a source after a few seconds.
fn impatient(c: &Config) -> Config {
    let mut c = c.clone();
    c.receiver.wait_ms = 6000;
    c
}

/// Migrate `src` through a tap that edits frames with `tamper`: the destination refuses
/// the edited frame by its seal and never resumes; the source keeps running and, on a retry
/// to a fresh destination, nothing is lost.
fn edited(kind: FrameKind, tamper: Tamper) {
    let c = cfg();
    let src = session::boot_source(&c).unwrap();
    let (addr, t) = receiver(&c);
    let tap = Tap::start(addr, Some(tamper));
    let err = session::send(&c, &src, &tap.addr, &mut |_| {}).expect_err("an edited frame must fail the migration");
    drop(tap);
    let (r, res) = t.join().unwrap();
    let e = res.expect_err("the destination must refuse").to_string();
    assert!(e.contains(&format!("{kind:?} frame")) && e.contains("failed authentication"), "{e}");
    assert!(!r.machine().is_some_and(|m| m.is_running()), "a VM built from an edited stream must never run");
    assert!(!matches!(err, SendError::HandoverUnknown { .. }), "{err}");
    assert!(src.is_running(), "the source keeps running: {err}");
    let (addr, t) = receiver(&c);
    session::send(&c, &src, &addr, &mut |_| {}).expect("retry");
    let (r, res) = t.join().unwrap();
    let got = res.expect("the retry is received");
    assert_ram_eq(&src.ram().snapshot(), &got.snapshot.unwrap_or_default(), &"retry after an edited frame");
    assert_running(r.machine().unwrap());
}

/// Flip one byte in the middle of the payload of the first frame of `kind`.
fn flip(kind: FrameKind) -> Tamper {
    Box::new(move |k, n, p: &mut [u8]| {
        if k == kind && n == 0 {
            let i = p.len() / 2;
            p[i] ^= 0x41;
        }
    })
}

#[test]
fn edited_guest_ram_is_refused() {
    edited(FrameKind::Pages, flip(FrameKind::Pages));
}

#[test]
fn edited_vcpu_state_is_refused() {
    edited(FrameKind::State, flip(FrameKind::State));
}

/// A recording of a whole successful migration, replayed byte for byte to a receiver with
/// the same key: the receiver's fresh nonce makes the recorded proof worthless; no VM is
/// even created.
#[test]
fn a_recorded_migration_never_runs_again() {
    let c = cfg();
    let src = session::boot_source(&c).unwrap();
    let recording = record_migration(&c, &src);
    assert!(recording.len() as u64 > c.guest.ram.0 / 8, "the recording holds the migration");
    let (addr, t) = receiver(&impatient(&c));
    let replay = replay(addr, recording);
    let (r, res) = t.join().unwrap();
    let e = res.expect_err("a replay must not be received").to_string();
    assert!(r.machine().is_none(), "a replay must not even create a VM");
    assert!(e.contains("authentication failed: the source does not hold the same key"), "{e}");
    drop(r);
    replay.join().unwrap();
}

/// Source and destination hold different keys: the source finds out from the destination's
/// proof before it sends anything of the VM, and the destination creates nothing.
#[test]
fn a_different_key_is_refused_before_anything_is_sent() {
    let c = cfg();
    let src = session::boot_source(&c).unwrap();
    let mut other = impatient(&c);
    other.auth.key = Some(accel_user::wire::auth::ephemeral_key().unwrap());
    let (addr, t) = receiver(&other);
    let err = session::send(&c, &src, &addr, &mut |_| {}).expect_err("different keys");
    let e = err.to_string();
    assert!(e.contains("authentication failed: the destination does not hold the same key"), "{e}");
    assert!(src.is_running());
    let (r, res) = t.join().unwrap();
    let e = res.expect_err("nothing is received").to_string();
    assert!(r.machine().is_none(), "no VM is created for an unauthenticated peer");
    assert!(e.contains("no source connected") && e.contains("authentication handshake"), "{e}");
}

/// A source without authentication (`auth.insecure`) is turned away by a receiver that
/// requires it (the default), and told nothing but a closed connection.
#[test]
fn an_unauthenticated_source_is_turned_away() {
    let mut plain = cfg();
    plain.auth.insecure = true;
    plain.auth.key = None;
    let src = session::boot_source(&plain).unwrap();
    let (addr, t) = receiver(&impatient(&cfg()));
    session::send(&plain, &src, &addr, &mut |_| {}).expect_err("refused");
    assert!(src.is_running());
    let (r, res) = t.join().unwrap();
    let e = res.expect_err("nothing is received").to_string();
    assert!(r.machine().is_none());
    assert!(e.contains("sent Hello without authenticating"), "{e}");
}

/// A peer that starts the handshake first but cannot finish it is dropped; the real source,
/// queued behind it, migrates.
#[test]
fn a_peer_without_the_key_does_not_keep_the_source_out() {
    let c = cfg();
    let src = session::boot_source(&c).unwrap();
    let (addr, t) = receiver(&c);
    let mut s = keyless_auth_init(&addr);
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    let h = Header::decode(&h).unwrap();
    assert_eq!(h.kind, FrameKind::AuthReply, "the receiver answers the first AuthInit");
    let mut reply = vec![0u8; h.len as usize];
    s.read_exact(&mut reply).unwrap();
    let mut confirm = Header { kind: FrameKind::AuthConfirm, len: 32, seq: 1 }.encode().to_vec();
    confirm.extend_from_slice(&[0x22; 32]); // a proof made up without the key
    s.write_all(&confirm).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(String::from_utf8_lossy(&rest).contains("authentication failed"), "the peer is told and dropped");
    session::send(&c, &src, &addr, &mut |_| {}).expect("the real source migrates");
    let (r, res) = t.join().unwrap();
    let got = res.expect("received");
    assert_ram_eq(&src.ram().snapshot(), &got.snapshot.unwrap_or_default(), &"migration after a failed peer");
    assert_running(r.machine().unwrap());
}

/// A link that stalls during a `Pages` send: the send times out and the source gives up,
/// its VM running. No two frames on the wire carry one sequence number (one nonce under one
/// key), and the frame that timed out never arrives whole — not even when the link moves
/// again after the source gave up: the destination fails and never resumes.
#[test]
fn a_stalled_send_never_lands_later_nor_shares_a_nonce() {
    use accel_user::wire::transport::TransportMode;
    use std::sync::atomic::Ordering::SeqCst;
    for mode in [TransportMode::Auto, TransportMode::Blocking] {
        let mut c = cfg();
        c.migration.transport = mode;
        // The source gives up on a send that makes no progress for 1 s; the destination
        // waits out the stall (a test that hangs fails after its own limit).
        c.migration.io_timeout_ms = 1000;
        let mut dc = c.clone();
        dc.migration.io_timeout_ms = 600_000;
        // The source's queries cannot pass this proxy (it relays one connection): the
        // destination need not wait for them once its receive failed.
        dc.receiver.handover_window_ms = 0;
        let src = session::boot_source(&c).unwrap();
        let (addr, t) = receiver(&dc);
        // The 4th Pages frame of round 0: the socket buffers fill behind the stall.
        let proxy = StallProxy::start(addr, FrameKind::Pages, 3);
        let err = session::send(&c, &src, &proxy.addr, &mut |_| {}).expect_err("the stalled send fails the migration");
        assert!(proxy.stalled.load(SeqCst), "{mode:?}: the link never stalled: {err}");
        assert!(err.to_string().contains("timed out"), "{mode:?}: {err}");
        assert_running(&src);
        // The link moves again, after the source gave up.
        proxy.release();
        let (r, res) = t.join().unwrap();
        assert!(res.is_err(), "{mode:?}: the destination must fail");
        assert!(r.machine().is_none_or(|m| !m.is_running()), "{mode:?}: the destination resumed");
        let frames = proxy.frames.clone();
        drop(proxy);
        let frames = frames.lock().unwrap().clone();
        let mut seqs: Vec<u64> = frames.iter().map(|f| f.seq).collect();
        seqs.dedup();
        assert_eq!(seqs.len(), frames.len(), "{mode:?}: two frames with one sequence number: {frames:?}");
        // The source says which frames it counts as not sent: none of them arrives whole
        // (a frame whose bytes all reached the kernel before the stall counts as sent).
        let unsent = err
            .to_string()
            .split("frames from sequence number ")
            .nth(1)
            .and_then(|r| r.split(' ').next()?.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{mode:?}: the error does not say which frames were not sent: {err}"));
        for f in &frames {
            assert!(
                !(f.whole && f.seq >= unsent),
                "{mode:?}: frame {f:?} arrived whole although the source counted it as not sent ({err}); {frames:?}"
            );
        }
        let last = frames.last().expect("frames were relayed");
        assert_eq!(last.kind, Some(FrameKind::Pages), "{mode:?}: something followed the stalled frames: {frames:?}");
    }
}

/// Keyless peers that start handshakes they cannot finish — a flood of `AuthInit`s, and
/// eight peers trickling their `AuthConfirm` a byte at a time — while the real source
/// connects: the source migrates, within its own default timeouts (the receiver answers
/// each handshake at once and keeps at most 64 waiting, oldest dropped first; see
/// docs/security.md).
#[test]
fn a_flood_and_trickling_handshakes_do_not_keep_the_source_out() {
    use accel_user::wire::transport::TransportMode;
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use std::sync::Arc;
    let mut c = cfg();
    c.migration.transport = TransportMode::Blocking;
    // Long deadlines, as on a real host: a trickler may hold its handshake for a minute.
    c.migration.io_timeout_ms = 60_000;
    let src = session::boot_source(&c).unwrap();
    let (addr, t) = receiver(&c);
    let stop = Arc::new(AtomicBool::new(false));
    let mut helpers = Vec::new();
    for _ in 0..8 {
        let (addr, stop) = (addr.clone(), stop.clone());
        helpers.push(std::thread::spawn(move || {
            let Ok(mut s) = try_keyless_auth_init(&addr) else { return };
            let mut h = [0u8; HEADER_LEN];
            if s.read_exact(&mut h).is_err() {
                return;
            }
            let confirm = Header { kind: FrameKind::AuthConfirm, len: 32, seq: 1 }.encode();
            for b in confirm {
                if stop.load(SeqCst) || s.write_all(&[b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        }));
    }
    let flooded = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        let (addr, stop, flooded) = (addr.clone(), stop.clone(), flooded.clone());
        helpers.push(std::thread::spawn(move || {
            // Keep the latest 200 open, as a flooding peer would.
            let mut open = std::collections::VecDeque::new();
            while !stop.load(SeqCst) {
                // Refused once the receiver has taken its migration and closed.
                if let Ok(s) = try_keyless_auth_init(&addr) {
                    open.push_back(s);
                    if open.len() > 200 {
                        open.pop_front();
                    }
                    flooded.fetch_add(1, SeqCst);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }));
    }
    // The flood is under way before the source connects.
    while flooded.load(SeqCst) < 100 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let res = session::send(&c, &src, &addr, &mut |_| {});
    stop.store(true, SeqCst);
    for h in helpers {
        h.join().unwrap();
    }
    res.expect("the real source migrates");
    let (r, res) = t.join().unwrap();
    let got = res.expect("received");
    assert_ram_eq(&src.ram().snapshot(), &got.snapshot.unwrap_or_default(), &"migration through a flood");
    assert_running(r.machine().unwrap());
    assert!(flooded.load(SeqCst) >= 100);
}

/// 2,000 silent connections against a `migaccel receive` process whose open-file limit is
/// far lower: it runs out of descriptors, drops the oldest waiting connections and goes on;
/// then a real source migrates to it.
#[test]
fn two_thousand_silent_connections_do_not_stop_the_receiver() {
    use std::process::{Command, Stdio};
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let log = std::env::temp_dir().join(format!("migaccel-test-silent-{}.log", std::process::id()));
    // A soft and hard limit of 128 descriptors: `receive` cannot raise it.
    let mut child = Command::new("prlimit")
        .arg("--nofile=128:128")
        .arg(migaccel_bin())
        .args(["receive", "--listen", &addr, "--auth-key"])
        .arg(test_key_file())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("listening") {
        assert!(t0.elapsed() < migaccel_tests::HANG, "the receiver never listened");
        assert!(child.try_wait().unwrap().is_none(), "{}", std::fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(10));
    }
    accel_user::host::raise_open_files().unwrap();
    let mut silent = Vec::new();
    for _ in 0..2000 {
        if let Ok(s) = std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5)) {
            silent.push(s);
        }
    }
    assert!(child.try_wait().unwrap().is_none(), "the receiver exited: {}", std::fs::read_to_string(&log).unwrap());
    let connected = silent.len();
    drop(silent);
    let out = Command::new(migaccel_bin())
        .args(["send", "--to", &addr, "--ram", "128MiB", "--workload", "idle", "--auth-key"])
        .arg(test_key_file())
        .output()
        .unwrap();
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert!(out.status.success(), "send: {}", String::from_utf8_lossy(&out.stderr));
    assert!(status.success(), "receive: {text}");
    assert!(connected > 1000, "only {connected} of 2000 connections were made");
    assert!(text.contains("Too many open files"), "the receiver never ran out of descriptors: {text}");
}

/// `auth.destination_id` binds the destination's identity into the handshake: a source
/// that means another host than the receiver's own stops at the destination's proof, before
/// sending anything, and no VM is created; naming the right host migrates.
#[test]
fn a_migration_meant_for_another_host_never_runs_here() {
    let mut c = cfg();
    c.auth.destination_id = Some("host-b".into());
    let src = session::boot_source(&c).unwrap();
    let mut here = impatient(&c);
    here.auth.destination_id = Some("host-a".into());
    let (addr, t) = receiver(&here);
    let e = session::send(&c, &src, &addr, &mut |_| {}).expect_err("meant for host-b").to_string();
    assert!(e.contains("authentication failed") && e.contains("destination_id"), "{e}");
    assert_running(&src);
    let (r, res) = t.join().unwrap();
    assert!(res.is_err() && r.machine().is_none(), "no VM is created for a migration meant elsewhere");
    // Named right, and with the same key file, it migrates.
    c.auth.destination_id = Some("host-a".into());
    let (addr, t) = receiver(&here);
    session::send(&c, &src, &addr, &mut |_| {}).expect("meant for host-a");
    let (r, res) = t.join().unwrap();
    assert_ram_eq(&src.ram().snapshot(), &res.expect("received").snapshot.unwrap_or_default(), &"host-a");
    assert_running(r.machine().unwrap());
}

/// A handover query from a peer without the session's keys (here: sealed under keys of its
/// own, mid-migration, when the destination answers queries) is dropped unanswered: it
/// neither learns anything nor fences the VM, whose handover then goes through.
#[test]
fn a_handover_query_without_the_sessions_keys_is_dropped_unanswered() {
    use accel_user::source::Event;
    use accel_user::wire::connect;
    use accel_user::wire::payload::{self, Ask};
    use accel_user::wire::seal::{FrameKey, Sealed};
    use accel_user::wire::transport::{Part, Transport, TransportMode};
    let c = cfg();
    let src = session::boot_source(&c).unwrap();
    let (addr, t) = receiver(&c);
    let mut heard: Option<Vec<u8>> = None;
    let mut on = |e: Event| {
        if matches!(&e, Event::Round(r) if r.round == 0) && heard.is_none() {
            let s = std::net::TcpStream::connect(&addr).unwrap();
            let mut raw = s.try_clone().unwrap();
            let w = connect::wrap(s, TransportMode::Blocking, None, false, Duration::from_secs(5)).unwrap();
            let mut q = Sealed::new(w, (FrameKey::new([0x33; 32]), FrameKey::new([0x44; 32])));
            q.send_frame(FrameKind::Query, &[Part::Buf(&payload::Query { session: 1, ask: Ask::Runs }.encode())], None)
                .unwrap();
            // Bounded only against a hang: the destination drops the connection at once.
            raw.set_read_timeout(Some(migaccel_tests::HANG)).unwrap();
            let mut got = Vec::new();
            let _ = raw.read_to_end(&mut got);
            heard = Some(got);
        }
    };
    session::send(&c, &src, &addr, &mut on).expect("a forged query does not stop the handover");
    assert_eq!(heard.as_deref(), Some(&[][..]), "the forged query got no answer");
    let (r, res) = t.join().unwrap();
    res.expect("received");
    assert_running(r.machine().unwrap());
    assert!(!src.is_running());
}
