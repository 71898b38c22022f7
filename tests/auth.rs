//! The authenticated channel (on by default): a peer without the key gets no further than
//! the handshake and never causes a VM to be created; nothing recorded, edited or replayed
//! on the way makes a destination run a VM; a source that fails that way keeps running.
use std::io::{Read, Write};

use accel_user::config::{Config, DirtySource, WorkloadKind};
use accel_user::protocol::{FrameKind, Header, HEADER_LEN};
use accel_user::session;
use accel_user::source::SendError;
use migaccel_tests::{
    assert_ram_eq, assert_running, config, keyless_auth_init, record_migration, replay, spawn_receiver as receiver,
    Tamper, Tap,
};

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
    other.auth.key = Some(accel_user::auth::ephemeral_key().unwrap());
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
