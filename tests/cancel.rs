//! Cancel and limits. An operator's cancel (SIGINT/SIGTERM) in any phase before the commit
//! point leaves the source running with its dirty pages and the destination discarding its
//! copy, and the next migration succeeds; after the commit point the handover goes on. The
//! time limit cancels or forces a switchover; the bandwidth cap holds precopy to its rate.
//!
//! Where a test needs a migration to last, it caps the bandwidth: a prefilled 128 MiB guest
//! at a few MiB/s takes seconds by construction, however fast the host, so nothing here
//! depends on outrunning a timer.
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

use accel_user::app::config::{ByteSize, Config, DirtySource, WorkloadKind};
use accel_user::app::session;
use accel_user::cancel::Cancel;
use accel_user::dest::RecvError;
use accel_user::policy::{LimitAction, SwitchReason};
use accel_user::source::{Event, Phase, SendError};
use embedded_vmm::vmm::Machine;
use migaccel_tests::{
    assert_ram_eq, assert_running, config, migaccel_bin, spawn_receiver as receiver, test_key_file, RecvThread,
};

/// 8 MiB/s: 16 s for a prefilled 128 MiB guest's round 0.
const CRAWL: u64 = 8 << 20;

fn cfg() -> Config {
    let mut c = config(WorkloadKind::Ab, DirtySource::Bitmap);
    c.guest.prefill = true;
    c
}

/// The destination's config: its own cancel flag (a clone would share the source's).
fn dest(c: &Config) -> Config {
    let mut d = c.clone();
    d.cancel = Cancel::new();
    d
}

/// The migration stopped before the commit point: the source runs, the destination never
/// resumed (its error is returned), and a retry to a fresh destination succeeds.
fn stopped_before_commit(c: &Config, src: &Machine, t: RecvThread) -> RecvError {
    assert_running(src);
    assert_eq!(src.throttle(), 0);
    let (r, res) = t.join().unwrap();
    let e = res.expect_err("the destination must not resume a cancelled migration");
    if let Some(m) = r.machine() {
        assert!(!m.is_running(), "the destination never resumes: {e}");
    }
    let mut again = c.clone();
    again.cancel = Cancel::new();
    again.migration.max_bandwidth = ByteSize(0);
    again.migration.time_limit_ms = 0;
    let (addr, t) = receiver(&dest(&again));
    let rep = session::send(&again, src, &addr, &mut |_| {}).expect("the next migration succeeds");
    assert_eq!(rep.precopy_rounds[0].pages, src.ram().pages(), "it starts again with all of RAM");
    let (r, res) = t.join().unwrap();
    assert_ram_eq(&src.ram().snapshot(), &res.expect("received").snapshot.unwrap_or_default(), &"after a cancel");
    assert_running(r.machine().unwrap());
    e
}

/// Cancel the source when `at` says, and check where it stopped.
fn cancel_source(at: fn(&Event) -> bool, expect: fn(Phase) -> bool) {
    let mut c = cfg();
    c.migration.min_rounds = 2; // a precopy round after round 0, and a switchover after it
    let src = session::boot_source(&c).unwrap();
    let (addr, t) = receiver(&dest(&c));
    let cancel = c.cancel.clone();
    let mut on = |e: Event| {
        if at(&e) {
            cancel.cancel("test cancel");
        }
    };
    let err = session::send(&c, &src, &addr, &mut on).expect_err("cancelled");
    assert!(matches!(err, SendError::Cancelled { .. }), "{err}");
    assert!(expect(err.phase()), "stopped in {}: {err}", err.phase());
    assert!(err.to_string().contains("test cancel") && err.to_string().contains("keeps running"), "{err}");
    let e = stopped_before_commit(&c, &src, t);
    assert!(e.to_string().contains("test cancel"), "the destination hears why: {e}");
}

#[test]
fn cancel_in_setup_leaves_the_source_running() {
    cancel_source(|e| matches!(e, Event::Accepted), |p| p == Phase::Handshake);
}

#[test]
fn cancel_in_precopy_leaves_the_source_running() {
    cancel_source(|e| matches!(e, Event::Round(r) if r.round == 0), |p| p == Phase::Precopy { round: 0 });
}

#[test]
fn cancel_at_switchover_resumes_the_paused_source() {
    // Cancelled as the vCPUs stop: the source pauses, sees the cancel before `Complete`
    // (in the final round, or at the last check before the commit point) and runs again.
    cancel_source(|e| matches!(e, Event::Switchover(_)), |p| matches!(p, Phase::StopAndCopy | Phase::MachineState));
}

#[test]
fn cancel_after_the_commit_point_hands_over() {
    let c = cfg();
    let src = session::boot_source(&c).unwrap();
    let (addr, t) = receiver(&dest(&c));
    let cancel = c.cancel.clone();
    let mut on = |e: Event| {
        if matches!(e, Event::Final(_)) {
            cancel.cancel("late cancel");
        }
    };
    let rep = session::send(&c, &src, &addr, &mut on).expect("past the commit point the handover goes on");
    assert_eq!(rep.cancelled_after_commit.as_deref(), Some("late cancel"));
    assert!(rep.text().contains("came after the commit point"), "{}", rep.text());
    let (r, res) = t.join().unwrap();
    res.expect("received");
    assert_running(r.machine().unwrap());
    assert!(!src.is_running(), "exactly one copy runs");
}

/// A destination cancelled mid-migration discards its copy and tells the source, which runs on.
#[test]
fn a_cancelled_destination_discards_the_vm() {
    let mut c = cfg();
    c.migration.max_bandwidth = ByteSize(CRAWL);
    let src = session::boot_source(&c).unwrap();
    let d = dest(&c);
    let (addr, t) = receiver(&d);
    let dcancel = d.cancel.clone();
    let mut on = |e: Event| {
        if matches!(e, Event::Accepted) {
            dcancel.cancel("destination cancel");
        }
    };
    let err = session::send(&c, &src, &addr, &mut on).expect_err("the destination gave up");
    assert!(matches!(err, SendError::PeerAborted { .. }), "{err}");
    assert!(err.to_string().contains("destination cancel"), "the source hears why: {err}");
    let e = stopped_before_commit(&c, &src, t);
    assert!(matches!(e, RecvError::Cancelled(_)), "{e}");
    assert!(e.to_string().contains("discarded"), "{e}");
}

/// A source whose round 0 crawls far past a 300 ms time limit with `action`, and its
/// destination.
fn past_the_limit(action: LimitAction) -> (Config, Machine, String, RecvThread) {
    let mut c = cfg();
    c.migration.max_bandwidth = ByteSize(CRAWL);
    c.migration.time_limit_ms = 300;
    c.migration.time_limit_action = action;
    let src = session::boot_source(&c).unwrap();
    let (addr, t) = receiver(&dest(&c));
    (c, src, addr, t)
}

#[test]
fn time_limit_with_cancel_stops_the_migration() {
    let (c, src, addr, t) = past_the_limit(LimitAction::Cancel);
    let err = session::send(&c, &src, &addr, &mut |_| {}).expect_err("round 0 alone outlasts the limit");
    assert!(matches!(err, SendError::Cancelled { phase: Phase::Precopy { round: 0 }, .. }), "{err}");
    assert!(err.to_string().contains("time limit"), "{err}");
    stopped_before_commit(&c, &src, t);
}

#[test]
fn time_limit_with_force_switches_over_and_reports_the_downtime() {
    let (c, src, addr, t) = past_the_limit(LimitAction::Force);
    let rep = session::send(&c, &src, &addr, &mut |_| {}).expect("forced through");
    assert!(matches!(rep.switchover, SwitchReason::TimeLimit { .. }), "{:?}", rep.switchover);
    assert_eq!(rep.precopy_rounds.len(), 1, "round 0 outlasted the limit; the switchover followed it");
    assert!(rep.downtime > std::time::Duration::ZERO);
    let (r, res) = t.join().unwrap();
    let got = res.expect("received");
    assert_ram_eq(&src.ram().snapshot(), &got.snapshot.unwrap_or_default(), &"forced switchover");
    assert_running(r.machine().unwrap());
}

#[test]
fn max_bandwidth_holds_precopy_to_its_rate() {
    let mut c = cfg();
    let cap = 256u64 << 20;
    c.migration.max_bandwidth = ByteSize(cap);
    let src = session::boot_source(&c).unwrap();
    let (addr, t) = receiver(&dest(&c));
    let rep = session::send(&c, &src, &addr, &mut |_| {}).expect("migrated");
    t.join().unwrap().1.expect("received");
    for r in &rep.precopy_rounds {
        let rate = r.bytes as f64 / r.elapsed.as_secs_f64();
        assert!(rate <= cap as f64, "round {} moved {rate:.0} B/s, above the cap of {cap}", r.round);
    }
    assert!(rep.precopy_rounds[0].bytes > 64 << 20, "the prefilled guest's data went through");
}

/// `migaccel send` and `migaccel receive` cancelled by SIGTERM: each exits with 4 and says
/// so; the other end learns why.
#[test]
fn sigterm_cancels_send_and_receive_processes() {
    // The sender is a process: SIGTERM once the destination accepted its VM.
    let c = cfg();
    let (addr, t) = receiver(&dest(&c));
    let mut child = Command::new(migaccel_bin())
        .args(["send", "--to", &addr, "--ram", "128MiB", "--prefill", "--max-bandwidth", "8MiB"])
        .args(["--progress", "json", "--auth-key"])
        .arg(test_key_file())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let mut line = String::new();
    while err.read_line(&mut line).unwrap() > 0 {
        seen += &line;
        if line.starts_with('{') {
            let v: serde_json::Value = serde_json::from_str(&line).expect("progress lines are JSON");
            if v["status"] == "setup" {
                Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
                break;
            }
        }
        line.clear();
    }
    err.read_to_string(&mut seen).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(4), "{seen}");
    assert!(seen.contains("cancelled") && seen.contains("SIGTERM"), "{seen}");
    let (_, res) = t.join().unwrap();
    let e = res.expect_err("the source withdrew");
    assert!(e.to_string().contains("SIGTERM"), "the destination hears why: {e}");

    // The receiver is a process: SIGTERM once the source's first round is under way.
    let mut r = Command::new(migaccel_bin())
        .args(["receive", "--listen", "127.0.0.1:0", "--auth-key"])
        .arg(test_key_file())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut rerr = BufReader::new(r.stderr.take().unwrap());
    let mut first = String::new();
    rerr.read_line(&mut first).unwrap();
    let raddr = first.split_whitespace().find(|w| w.starts_with("127.0.0.1:")).expect(&first).to_string();
    let mut sc = cfg();
    sc.migration.max_bandwidth = ByteSize(CRAWL);
    let src = session::boot_source(&sc).unwrap();
    let pid = r.id().to_string();
    let mut on = |e: Event| {
        if matches!(e, Event::Accepted) {
            Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        }
    };
    let err = session::send(&sc, &src, &raddr, &mut on).expect_err("the destination was cancelled");
    let mut rest = String::new();
    rerr.read_to_string(&mut rest).unwrap();
    assert_eq!(r.wait().unwrap().code(), Some(4), "{rest}");
    assert!(rest.contains("cancelled") && rest.contains("discarded"), "{rest}");
    assert!(err.to_string().contains("SIGTERM"), "the source hears why: {err}");
    assert_running(&src);
}
