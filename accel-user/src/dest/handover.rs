//! The handover query after the commit point: the source's question ([`ask`]) and the
//! destination's answer ([`serve`]), serialised with its resume ([`Handover`]).
//!
//! Once `Complete` is out the source may not resume its copy unless it knows the destination
//! never will run the VM. When its link fails in that window, the source asks on a new
//! connection (`Query`, sealed with a query key of the session, so only the source that
//! authenticated this migration can ask). The destination's answer and its own resume are
//! serialised here: the resume happens only while the outcome is open, and a query settles
//! an open outcome to "never runs". Either answer then holds for good, so the source acts
//! on it safely: it stays paused when the VM runs here, and resumes when it never will.
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::wire::accept::{Incoming, JoinKeys};
use crate::wire::auth::{Conn, SessionKeys, MAX_QUERIES};
use crate::wire::connect;
use crate::wire::frame::FrameKind;
use crate::wire::payload::{self, Answer, Ask};
use crate::wire::seal::Sealed;
use crate::wire::transport::{Part, Transport, TransportError, TransportMode};

/// How long one wait for a query connection lasts before `serve` looks at its flags again.
const TURN: Duration = Duration::from_millis(20);

/// Where the VM of a migration is, as far as this destination decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Outcome {
    /// Not resumed yet, and no query came: the receiver may still resume it.
    #[default]
    Open,
    /// Resumed here.
    Runs,
    /// A query came before the resume: this destination never resumes it.
    NeverRuns,
}

#[derive(Default)]
struct Inner {
    outcome: Outcome,
    /// The session whose queries are answered (set once its connections all joined).
    session: Option<u64>,
    /// Query attempts already answered (bit `i`: attempt `i`).
    used: u64,
    /// The source said `Done`, or a query was answered: no (further) query is needed.
    settled: bool,
    /// The receive is over: `serve` returns.
    closed: bool,
}

/// One migration's handover, shared by its receiver and the thread answering queries.
#[derive(Default)]
pub struct Handover {
    inner: Mutex<Inner>,
    cv: Condvar,
}

impl Handover {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `resume` unless a query already settled the outcome: `Ok(true)` once it ran and
    /// the VM runs here, `Ok(false)` when this destination must never resume it. A failed
    /// `resume` leaves the outcome open (a later query settles it to "never runs").
    pub fn resume<E>(&self, resume: impl FnOnce() -> Result<(), E>) -> Result<bool, E> {
        let mut g = self.lock();
        if g.outcome == Outcome::NeverRuns {
            return Ok(false);
        }
        resume()?;
        g.outcome = Outcome::Runs;
        Ok(true)
    }

    /// What a query is told; an open outcome becomes "never runs" for good.
    pub fn settle(&self, ask: Ask) -> Answer {
        let mut g = self.lock();
        let a = match g.outcome {
            Outcome::Runs => {
                if ask == Ask::Withdraw {
                    tracing::error!("the source withdrew a VM that already runs here (it had sent Complete)");
                }
                Answer::Runs
            }
            Outcome::Open | Outcome::NeverRuns => {
                g.outcome = Outcome::NeverRuns;
                Answer::NeverRuns
            }
        };
        g.settled = true;
        self.cv.notify_all();
        a
    }

    /// Make sure this destination never resumes the VM (an operator's cancel): true unless
    /// it already runs here.
    pub fn fence(&self) -> bool {
        let mut g = self.lock();
        if g.outcome == Outcome::Runs {
            return false;
        }
        g.outcome = Outcome::NeverRuns;
        true
    }

    pub fn outcome(&self) -> Outcome {
        self.lock().outcome
    }

    /// Queries for `session` are answered from now on.
    pub fn open(&self, session: u64) {
        self.lock().session = Some(session);
        self.cv.notify_all();
    }

    /// The source said `Done`: it knows the VM runs here and asks nothing more.
    pub fn done(&self) {
        self.lock().settled = true;
        self.cv.notify_all();
    }

    /// Whether queries are answered (the session's connections all joined).
    pub fn is_open(&self) -> bool {
        self.lock().session.is_some()
    }

    /// Wait until a query was answered or the source said `Done`, for at most `limit`.
    /// True when settled.
    pub fn wait_settled(&self, limit: Duration) -> bool {
        let t0 = Instant::now();
        let mut g = self.lock();
        while !g.settled {
            let Some(left) = limit.checked_sub(t0.elapsed()) else { return false };
            g = self.cv.wait_timeout(g, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        true
    }

    /// The receive is over: stop answering.
    pub fn close(&self) {
        self.lock().closed = true;
        self.cv.notify_all();
    }

    /// Wait until queries are answered (`Some(session)`) or the receive is over (`None`).
    fn wait_open(&self) -> Option<u64> {
        let mut g = self.lock();
        loop {
            if g.closed {
                return None;
            }
            if let Some(s) = g.session {
                return Some(s);
            }
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Claim query attempt `i` (each is answered once: a replayed query is refused).
    fn claim(&self, i: u32) -> bool {
        let mut g = self.lock();
        let bit = 1u64 << i.min(63);
        let fresh = i < MAX_QUERIES && g.used & bit == 0;
        g.used |= bit;
        fresh
    }

    fn closed(&self) -> bool {
        self.lock().closed
    }
}

/// Answer the handover queries of `h`'s session that arrive on `inc` until the receive is
/// over. Connections that are no query of this session are dropped with their reason.
pub fn serve(h: &Handover, inc: Incoming<'_>, keys: &JoinKeys, io_timeout: Duration) {
    let Some(session) = h.wait_open() else { return };
    while !h.closed() {
        match inc.query(keys, TURN) {
            Ok((mut t, attempt)) => {
                t.set_recv_timeout(io_timeout);
                match answer(h, &mut *t, session, attempt) {
                    Ok(a) => tracing::info!("handover query {attempt} answered: {a:?}"),
                    Err(e) => tracing::warn!("handover query {attempt} not answered: {e}"),
                }
                t.shutdown();
            }
            Err(TransportError::Timeout(_)) => {}
            Err(e) => {
                tracing::warn!("waiting for handover queries: {e}");
                std::thread::sleep(TURN);
            }
        }
    }
}

/// Read one query of attempt `attempt` from `t` (opened under that attempt's key) and
/// answer it for `session`; the error says why a connection got no answer.
pub fn answer(h: &Handover, t: &mut dyn Transport, session: u64, attempt: u32) -> Result<Answer, String> {
    let hd = t.recv_header().map_err(|e| e.to_string())?;
    if hd.kind != FrameKind::Query {
        return Err(format!("sent {:?} where Query was expected", hd.kind));
    }
    let mut p = vec![0u8; hd.len as usize]; // bounded by the kind's cap in Header::decode
    t.recv_exact(&mut p).map_err(|e| e.to_string())?;
    let payload::Query { session: s, ask } = payload::Query::decode(&p).map_err(|e| e.to_string())?;
    if s != session {
        return Err(format!("it asks about session {s:#x}, this migration is session {session:#x}"));
    }
    if !h.claim(attempt) {
        return Err(format!("attempt {attempt} was answered before (a replay)"));
    }
    let a = h.settle(ask);
    t.send_frame(FrameKind::Answer, &[Part::Buf(&a.encode())], None).map_err(|e| e.to_string())?;
    Ok(a)
}

/// Ask the destination at `to`, on a new connection sealed with the keys of query attempt
/// `attempt` of the authenticated session `keys`, about the handover of `session`.
pub fn ask(
    to: &str,
    keys: &SessionKeys,
    attempt: u32,
    session: u64,
    what: Ask,
    connect_timeout: Duration,
    io_timeout: Duration,
) -> Result<Answer, TransportError> {
    let k = keys.keys(Conn::Query(attempt)).map_err(|e| TransportError::Guest(e.to_string()))?;
    let p = connect::prepare(TransportMode::Blocking, None, false, io_timeout)?;
    let mut t = Sealed::new(connect::connect(to, p, connect_timeout)?, k);
    t.set_recv_timeout(io_timeout);
    t.send_frame(FrameKind::Query, &[Part::Buf(&payload::Query { session, ask: what }.encode())], None)?;
    let h = t.recv_header()?;
    if h.kind != FrameKind::Answer {
        return Err(TransportError::Guest(format!("the destination sent {:?} where Answer was expected", h.kind)));
    }
    let mut a = vec![0u8; h.len as usize]; // bounded by the kind's cap in Header::decode
    t.recv_exact(&mut a)?;
    Ok(payload::Answer::decode(&a)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_before_the_resume_fences_it_for_good() {
        let h = Handover::default();
        assert_eq!(h.settle(Ask::Runs), Answer::NeverRuns);
        let ran = std::cell::Cell::new(false);
        let r: Result<bool, ()> = h.resume(|| {
            ran.set(true);
            Ok(())
        });
        assert_eq!(r, Ok(false));
        assert!(!ran.get(), "a fenced VM is never resumed");
        assert_eq!(h.settle(Ask::Runs), Answer::NeverRuns, "the answer never changes");
        assert_eq!(h.outcome(), Outcome::NeverRuns);
    }

    #[test]
    fn a_query_after_the_resume_says_it_runs() {
        let h = Handover::default();
        assert_eq!(h.resume(|| Ok::<(), ()>(())), Ok(true));
        assert_eq!(h.settle(Ask::Runs), Answer::Runs);
        assert_eq!(h.settle(Ask::Withdraw), Answer::Runs, "a VM that runs is never withdrawn");
        assert_eq!(h.outcome(), Outcome::Runs);
    }

    #[test]
    fn a_cancel_fences_a_vm_that_does_not_run_yet() {
        let h = Handover::default();
        assert!(h.fence());
        assert_eq!(h.resume(|| Ok::<(), ()>(())), Ok(false));
        let running = Handover::default();
        assert_eq!(running.resume(|| Ok::<(), ()>(())), Ok(true));
        assert!(!running.fence(), "a VM that runs is never discarded");
        assert_eq!(running.settle(Ask::Runs), Answer::Runs);
    }

    #[test]
    fn a_failed_resume_leaves_the_outcome_to_the_query() {
        let h = Handover::default();
        assert_eq!(h.resume(|| Err("KVM_RUN failed")), Err("KVM_RUN failed"));
        assert_eq!(h.outcome(), Outcome::Open);
        assert_eq!(h.settle(Ask::Runs), Answer::NeverRuns);
    }

    #[test]
    fn each_attempt_is_answered_once() {
        let h = Handover::default();
        assert!(h.claim(0));
        assert!(!h.claim(0), "replayed");
        assert!(h.claim(MAX_QUERIES - 1));
        assert!(!h.claim(MAX_QUERIES), "beyond the session's attempts");
    }

    #[test]
    fn a_query_and_a_resume_racing_agree() {
        // Whichever takes the outcome first, the VM runs here exactly when the answer says so.
        for _ in 0..200 {
            let h = std::sync::Arc::new(Handover::default());
            let h2 = h.clone();
            let q = std::thread::spawn(move || h2.settle(Ask::Runs));
            let resumed = h.resume(|| Ok::<(), ()>(())).unwrap();
            let a = q.join().unwrap();
            assert_eq!(resumed, a == Answer::Runs);
        }
    }

    #[test]
    fn waiting_ends_when_settled_or_at_the_limit() {
        let h = std::sync::Arc::new(Handover::default());
        assert!(!h.wait_settled(Duration::from_millis(1)));
        let h2 = h.clone();
        let t = std::thread::spawn(move || h2.wait_settled(Duration::from_secs(600)));
        h.done();
        assert!(t.join().unwrap());
    }
}
