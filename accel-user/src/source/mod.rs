//! The sending side: the handshake and precopy rounds here; page routing (`pages`), the
//! Migration Handler path (`confidential`), switchover and the commit point
//! (`switchover`), recovery when anything fails (`recover`), data-stream workers
//! (`streams`).
//!
//! Invariant: until the destination reports `Resumed`, the source VM is the VM. On any error
//! the source tells the peer (Abort), puts the pages of the unfinished round back into the
//! dirty tracker, and resumes its vCPUs if it had paused them.
//!
//! Dirty logging is on only while a migration runs: round 0 starts it, and every end
//! (success or failure) stops it, so the guest writes at full speed outside migrations. A
//! stopped tracker counts every page as dirty, so nothing written afterwards is missed.
mod confidential;
mod pages;
mod recover;
pub mod streams;
mod switchover;

use confidential::*;
use pages::*;
use recover::*;
use switchover::*;

use std::time::{Duration, Instant};

use kvm_hooks::memory::PAGE_SIZE;
use kvm_hooks::mh::{MhError, MhHost};
use kvm_hooks::migratable::{MachineState, Migratable, VmError};
use mh_abi::{self as abi, Kind, Op, Request};

use crate::cancel::Cancel;
use crate::policy::{
    decide, forced, next_throttle, over_limit, pace, Decision, LimitAction, PolicyConfig, RoundStats, SwitchReason,
    TimeLimit,
};
use crate::report::SourceReport;
use crate::source::streams::DataStreams;
use crate::wire::frame::{self, FrameKind, HEADER_LEN, MAX_RUNS, RUN_ZERO};
use crate::wire::payload::{self, Answer, Ask, Run};
use crate::wire::transport::{Part, Transport, TransportError};

/// Sender settings (from the config file / CLI).
#[derive(Debug, Clone)]
pub struct SendOptions {
    pub policy: PolicyConfig,
    /// Most data pages per Pages frame.
    pub batch_pages: u32,
    /// Send all-zero pages as compact records.
    pub zero_detect: bool,
    /// How long to wait for the destination to accept the VM and to resume it.
    pub ack_timeout: Duration,
    /// After `Complete`, when `Resumed` never came: how long to keep asking the destination
    /// whether it runs the VM (zero: never ask).
    pub handover_query: Duration,
    /// The destination answers handover queries (an authenticated session): the source may
    /// ask it, and says `Done` once `Resumed` came.
    pub queries: bool,
    /// Longest the migration may run before the switchover, and what then.
    pub time_limit: Option<TimeLimit>,
    /// Most bytes per second a precopy round sends (0: no cap).
    pub max_bandwidth: u64,
    /// Set by the operator (a signal) to stop the migration where stopping is clean.
    pub cancel: Cancel,
    /// Longest wait for a stream to take or flush data.
    pub io_timeout: Duration,
    /// Data streams besides the control connection (0: pages go on the control stream).
    pub streams: u32,
    /// Confidential mode: private pages and vCPU state go only through the in-guest MH.
    pub confidential: Option<ConfidentialSend>,
}

/// Confidential-mode sender settings.
#[derive(Debug, Clone, Copy)]
pub struct ConfidentialSend {
    /// Private pages per MH doorbell (1..=256; at most half of that when pipelined).
    pub mh_batch: u32,
    /// Export the next batch while the last one is sent.
    pub pipeline: bool,
}

/// Where a migration was when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Handshake,
    Precopy { round: u32 },
    StopAndCopy,
    MachineState,
    AwaitResume,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Phase::Handshake => write!(f, "handshake"),
            Phase::Precopy { round } => write!(f, "precopy round {round}"),
            Phase::StopAndCopy => write!(f, "stop-and-copy"),
            Phase::MachineState => write!(f, "machine state transfer"),
            Phase::AwaitResume => write!(f, "waiting for the destination to resume"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("migration failed in {phase}: {source}{}", unsent_note(*unsent))]
    Transport {
        phase: Phase,
        #[source]
        source: TransportError,
        /// The first frame on the connection that does not count as sent, if a send failed.
        unsent: Option<u64>,
    },
    #[error("migration failed in {phase}: destination refused the VM: {reason}")]
    Refused { phase: Phase, reason: String },
    #[error("migration failed in {phase}: destination aborted: {reason}")]
    PeerAborted { phase: Phase, reason: String },
    #[error("migration failed in {phase}: unexpected {kind:?} frame from the destination")]
    Unexpected { phase: Phase, kind: FrameKind },
    #[error("migration failed in {phase}: VM: {source}")]
    Vm {
        phase: Phase,
        #[source]
        source: VmError,
    },
    #[error("migration failed in {phase}: Migration Handler: {source}")]
    Mh {
        phase: Phase,
        #[source]
        source: MhError,
    },
    #[error("migration failed in {phase}: {msg}")]
    Confidential { phase: Phase, msg: String },
    /// Cancelled before the commit point (a signal, or the time limit with `cancel`): the
    /// source VM runs on with every dirty bit kept, the destination discards its copy.
    #[error("migration cancelled in {phase}: {reason}; the source VM keeps running")]
    Cancelled { phase: Phase, reason: String },
    /// No authenticated channel: nothing of the VM was sent.
    #[error("migration failed in handshake: {0}")]
    Auth(String),
    #[error("{first}; and resuming the source VM failed too: {resume}")]
    ResumeFailed { first: Box<SendError>, resume: VmError },
    /// The whole VM was sent and `Complete` went out, then the destination's answer was
    /// lost and asking it on a new connection failed too: it may run the VM now. Only its
    /// word proves it does not, so the source stays paused rather than risk two running copies.
    #[error("{source}; the migration was complete when the link failed and the destination could not be asked ({query}), so it may be running the VM: the source VM stays paused (resume it only once the destination is known not to run it)")]
    HandoverUnknown {
        #[source]
        source: Box<SendError>,
        /// Why the handover query got no answer.
        query: String,
    },
    /// `Complete` went out and the destination's answer was lost; asked on a new
    /// connection, the destination said it had not resumed the VM and now never will.
    #[error("{source}; asked on a new connection, the destination said it never resumed the VM and never will: the source VM runs again")]
    NotResumed {
        #[source]
        source: Box<SendError>,
    },
}

impl SendError {
    pub fn phase(&self) -> Phase {
        match self {
            SendError::Transport { phase, .. }
            | SendError::Refused { phase, .. }
            | SendError::PeerAborted { phase, .. }
            | SendError::Unexpected { phase, .. }
            | SendError::Vm { phase, .. }
            | SendError::Mh { phase, .. }
            | SendError::Confidential { phase, .. }
            | SendError::Cancelled { phase, .. } => *phase,
            SendError::ResumeFailed { first, .. } => first.phase(),
            SendError::HandoverUnknown { .. } | SendError::NotResumed { .. } => Phase::AwaitResume,
            SendError::Auth(_) => Phase::Handshake,
        }
    }
}

/// Progress events for the CLI.
#[derive(Debug, Clone)]
pub enum Event {
    Accepted,
    Round(RoundStats),
    Switchover(SwitchReason),
    Final(RoundStats),
    Resumed { downtime: Duration },
}

enum InFlight {
    Nothing,
    All,
    Pages(Vec<u64>),
}

struct Ctx<'a> {
    m: &'a dyn Migratable,
    t: &'a mut dyn Transport,
    o: &'a SendOptions,
    inflight: InFlight,
    paused: bool,
    meta: Vec<u8>,
    data: Option<DataStreams>,
    /// Confidential mode: the source MH's rings and the frame buffer.
    mh: Option<&'a mut MhHost>,
    wire: Vec<u8>,
    ask: Asker<'a>,
    /// The session, once the destination accepted it and every stream joined.
    session: Option<u64>,
    /// Handover queries made (each uses the next attempt's keys).
    queries: u32,
    /// `Complete` went out whole: the destination may resume from now on.
    committed: bool,
    /// When the migration started (the time limit counts from here).
    t0: Instant,
    /// The time limit passed with `force`: switch over after this round, uncapped.
    force: bool,
    /// Bytes sent in this precopy round and when it started (the bandwidth cap).
    paced: (u64, Instant),
}

/// A failure on the confidential path: the transport or the MH.
#[derive(Debug)]
pub(crate) enum PathError {
    Tx(TransportError),
    Mh(MhError),
    Other(String),
    Cancelled(String),
}

impl From<TransportError> for PathError {
    fn from(e: TransportError) -> Self {
        PathError::Tx(e)
    }
}
impl From<MhError> for PathError {
    fn from(e: MhError) -> Self {
        PathError::Mh(e)
    }
}

impl PathError {
    fn at(self, phase: Phase, t: &mut dyn Transport) -> SendError {
        match self {
            PathError::Tx(e) => peer_error(t, phase, e),
            PathError::Mh(source) => SendError::Mh { phase, source },
            PathError::Other(msg) => SendError::Confidential { phase, msg },
            PathError::Cancelled(reason) => SendError::Cancelled { phase, reason },
        }
    }
}

/// Rounds after the final one for pages the VMM itself writes while the guest is paused.
const MAX_LATE_ROUNDS: u32 = 3;

/// Opens data stream `i` (a connected, wrapped transport).
pub type Connector<'a> = &'a mut dyn FnMut(u32) -> Result<Box<dyn Transport>, TransportError>;

/// Asks the destination, on a new connection, about the handover of `session`: query
/// attempt `i` (each attempt seals under keys of its own), for the reason `Ask`, waiting at
/// most the given time for the connection and for the answer each.
pub type Asker<'a> = &'a mut dyn FnMut(u32, u64, Ask, Duration) -> Result<Answer, TransportError>;

/// Most query attempts per migration (every attempt uses keys of its own).
const MAX_ASKS: u32 = crate::wire::auth::MAX_QUERIES;

/// Migrate `m` over `t`. On success the source vCPUs stay paused (the destination owns the
/// VM now); on failure they run again and no dirty page is lost.
pub fn migrate(
    m: &dyn Migratable,
    t: &mut dyn Transport,
    o: &SendOptions,
    on: &mut dyn FnMut(Event),
) -> Result<SourceReport, SendError> {
    let mut none = |_| Err(TransportError::Guest("no data streams configured".into()));
    let mut no_ask = |_, _, _, _| Err(TransportError::Guest("no handover query configured".into()));
    migrate_streams(m, t, o, &mut none, &mut no_ask, on)
}

/// [`migrate`] with `o.streams` data streams opened through `connect`, and handover
/// queries made through `ask`.
pub fn migrate_streams(
    m: &dyn Migratable,
    t: &mut dyn Transport,
    o: &SendOptions,
    connect: Connector<'_>,
    ask: Asker<'_>,
    on: &mut dyn FnMut(Event),
) -> Result<SourceReport, SendError> {
    let conf = m.confidential();
    let mut guard = conf.map(|c| c.mh());
    let mh = match (o.confidential, guard.as_mut().and_then(|g| g.as_mut())) {
        (Some(_), Some(h)) => Some(h),
        (Some(_), None) => {
            return Err(SendError::Confidential {
                phase: Phase::Handshake,
                msg: "confidential = true, but the VM runs no Migration Handler".into(),
            })
        }
        (None, _) => None,
    };
    let mut c = Ctx {
        m,
        t,
        o,
        inflight: InFlight::Nothing,
        paused: false,
        meta: Vec::with_capacity(64 << 10),
        data: None,
        mh,
        wire: Vec::new(),
        ask,
        session: None,
        queries: 0,
        committed: false,
        t0: Instant::now(),
        force: false,
        paced: (0, Instant::now()),
    };
    let r = run(&mut c, connect, on);
    if let Err(e) = r {
        return Err(recover(c, e));
    }
    stop_logging(m);
    r
}

/// Where stopping is clean (between frames, before the commit point): stop for a cancel or
/// a time limit that says so, note a forced switchover, and hold precopy to the bandwidth
/// cap before `bytes` more go out.
fn gate(c: &mut Ctx<'_>, bytes: u64) -> Result<(), PathError> {
    if c.committed {
        return Ok(());
    }
    if let Some(why) = c.o.cancel.reason() {
        return Err(PathError::Cancelled(why));
    }
    match over_limit(c.o.time_limit, c.t0.elapsed()) {
        Some(LimitAction::Cancel) => {
            let after = c.o.time_limit.map_or(Duration::ZERO, |l| l.after);
            return Err(PathError::Cancelled(format!("the time limit of {after:?} passed (migration.time_limit_ms)")));
        }
        Some(LimitAction::Force) if !c.force => {
            tracing::warn!("the time limit passed: switching over after this round, whatever the downtime");
            c.force = true;
        }
        _ => {}
    }
    if !c.paused && !c.force {
        c.paced.0 += bytes;
        let wait = pace(c.o.max_bandwidth, c.paced.0, c.paced.1.elapsed());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
    Ok(())
}

fn cancelled(c: &mut Ctx<'_>, phase: Phase) -> Result<(), SendError> {
    gate(c, 0).map_err(|e| e.at(phase, c.t))
}

fn run(c: &mut Ctx<'_>, connect: Connector<'_>, on: &mut dyn FnMut(Event)) -> Result<SourceReport, SendError> {
    let t0 = Instant::now();
    let cpu0 = kvm_hooks::process_usage().0;
    let writes0 = c.m.page_writes();
    let shape = c.m.shape();
    let total_pages = c.m.ram().pages();

    // Handshake: the destination creates the VM before any page is sent.
    let ph = Phase::Handshake;
    let session = session_id();
    let (confidential, vm_id, mh_lanes) =
        (c.mh.is_some(), c.mh.as_ref().map_or(0, |h| h.vm_id), c.mh.as_ref().map_or(0, |h| h.lanes()));
    let hello = payload::Hello {
        kind: c.m.kind(),
        layout: c.m.ram().layout().clone(),
        shape,
        streams: c.o.streams,
        session,
        confidential,
        vm_id,
        mh_lanes,
    };
    c.t.send_frame(FrameKind::Hello, &[Part::Buf(&hello.encode())], None).map_err(|e| tx(ph, e))?;
    c.t.set_recv_timeout(c.o.ack_timeout);
    let (h, p) = recv_small(c.t).map_err(|e| tx(ph, e))?;
    let challenges = match h {
        FrameKind::HelloAck => {
            let ack = payload::HelloAck::decode(&p).map_err(|e| tx(ph, e.into()))?;
            if ack.status != payload::HelloAck::ACCEPTED {
                return Err(SendError::Refused { phase: ph, reason: ack.text });
            }
            ack.challenges
        }
        FrameKind::Abort => return Err(aborted(ph, &p)),
        k => return Err(SendError::Unexpected { phase: ph, kind: k }),
    };
    if c.o.streams > 0 {
        let mut ts = Vec::with_capacity(c.o.streams as usize);
        for i in 0..c.o.streams {
            let mut d = connect(i).map_err(|e| tx(ph, e))?;
            d.send_frame(FrameKind::Join, &[Part::Buf(&payload::Join { session, stream: i }.encode())], None)
                .map_err(|e| tx(ph, e))?;
            ts.push(d);
        }
        c.data = Some(DataStreams::start(ts, c.m.ram().clone(), c.o.io_timeout));
    }
    c.session = Some(session);
    if let Some(h) = c.mh.as_ref() {
        // Every blob of this migration is bound to the destination MH's fresh challenge of
        // its lane, so no blob of it opens in any other migration or lane, and none recorded
        // earlier here.
        h.bind_export(&challenges).map_err(|source| SendError::Mh { phase: ph, source })?;
        // Opens the blob stream: the destination MH accepts nothing before it.
        send_marker(c, Op::Begin, 0, Lanes::All).map_err(|e| e.at(ph, c.t))?;
    }
    let setup = t0.elapsed();
    on(Event::Accepted);
    cancelled(c, ph)?;

    // Round 0: all of RAM. Tracking restarts now, so anything written from here on is seen.
    let (t_precopy, writes_precopy) = (Instant::now(), c.m.page_writes());
    c.m.dirty_log().start().map_err(kvm(Phase::Precopy { round: 0 }))?;
    c.inflight = InFlight::All;
    let mut rounds: Vec<RoundStats> = Vec::new();
    let mut round = 0u32;
    let mut gfns: Vec<u64> = Vec::new();
    let reason = loop {
        let ph = Phase::Precopy { round };
        let start = Instant::now();
        let mut st = RoundStats { round, throttle_pct: c.m.throttle(), ..Default::default() };
        c.paced = (0, start);
        if round == 0 {
            // Never-written RAM (memfd holes) is zero: known without reading it.
            let extents = c.m.ram().data_extents().map_err(kvm(ph))?;
            send_pages_with_holes(c, round, total_pages, &extents, &mut st).map_err(|e| e.at(ph, c.t))?;
        } else {
            send_pages(c, round, gfns.iter().copied(), &mut st, None).map_err(|e| e.at(ph, c.t))?;
        }
        end_round(c, round, &mut st).map_err(|e| peer_error(c.t, ph, e))?;
        st.elapsed = start.elapsed();
        gfns = c.m.dirty_log().take().map_err(kvm(ph))?;
        st.dirty_after = gfns.len() as u64;
        c.inflight = InFlight::Pages(gfns.clone());
        rounds.push(st);
        on(Event::Round(st));
        if let Some(f) = c.m.fault() {
            return Err(SendError::Vm { phase: ph, source: VmError::Kvm(kvm_hooks::Error::Vcpu { vcpu: 0, msg: f }) });
        }
        // Pages held back until they are safe to copy are still to send.
        let remaining = gfns.len() as u64 + c.m.dirty_log().pending();
        // The final pages get what the machine state leaves of the downtime target.
        let mut policy = c.o.policy;
        policy.downtime_target = policy.downtime_target.saturating_sub(c.m.switchover_cost());
        cancelled(c, ph)?;
        let decision = match c.force {
            true => Decision::Switchover(forced(&rounds, remaining)),
            false => decide(&policy, &rounds, remaining),
        };
        if let Decision::Switchover(r) = decision {
            // The final harvest after the pause picks these up again.
            c.m.dirty_log().restore(&gfns);
            c.inflight = InFlight::Nothing;
            break r;
        }
        let t = next_throttle(&c.o.policy.auto_converge, &rounds, c.m.throttle());
        if t != c.m.throttle() {
            tracing::info!(round, throttle_pct = t, "guest outruns the link: throttling vCPUs");
            c.m.set_throttle(t);
        }
        round += 1;
    };
    on(Event::Switchover(reason));

    let Stopped { fin, state_bytes, t_stop, writes_stop } = stop_and_copy(c, round, &rounds, on)?;
    let (capture_us, handover_query) = await_resume(c)?;
    // The destination owns the VM now; the source stays paused for good.
    c.inflight = InFlight::Nothing;
    let downtime = t_stop.elapsed().saturating_sub(Duration::from_micros(capture_us));
    on(Event::Resumed { downtime });
    // Verification capture on the destination is not part of the migration.
    let total = t0.elapsed().saturating_sub(Duration::from_micros(capture_us));
    let bytes = c.t.bytes_sent() + c.data.as_ref().map_or(0, |d| d.bytes());
    let mut rep = SourceReport::new(
        c.m,
        rounds,
        fin,
        reason,
        setup,
        total,
        downtime,
        bytes,
        state_bytes,
        Duration::from_micros(capture_us),
    );
    let (desc, zc) = match &c.data {
        Some(d) => (format!("{} x {}", d.len(), d.describe()), d.zc()),
        None => (c.t.describe(), c.t.zc_stats()),
    };
    let per_s = |a: Option<u64>, b: Option<u64>, d: Duration| match (a, b) {
        (Some(a), Some(b)) if !d.is_zero() => Some(b.saturating_sub(a) as f64 / d.as_secs_f64()),
        _ => None,
    };
    rep.guest_writes_per_s_setup = per_s(writes0, writes_precopy, t_precopy - t0);
    rep.guest_writes_per_s_precopy = per_s(writes_precopy, writes_stop, t_stop - t_precopy);
    rep.cpu = kvm_hooks::process_usage().0.saturating_sub(cpu0);
    rep.transport = desc;
    rep.streams = c.o.streams.max(1);
    rep.handover_query = handover_query;
    rep.cancelled_after_commit = c.o.cancel.reason();
    rep.zerocopy = zc.map(Into::into);
    let mh = c.mh.as_ref().and_then(|h| h.counters().ok());
    (rep.mh_exported, rep.mh_zero_records) = (mh.map(|x| x.exported), mh.map(|x| x.zeros));
    if c.mh.is_some() {
        rep.page_states = c.m.confidential().and_then(|x| x.external_page_states()).map(|x| x.describe());
        rep.pages_deferred = rep.precopy_rounds.iter().map(|r| r.deferred).sum::<u64>() + rep.final_round.deferred;
    }
    Ok(rep)
}

/// A failed KVM call at `phase`, for `map_err`.
fn kvm(phase: Phase) -> impl Fn(kvm_hooks::Error) -> SendError {
    move |source| SendError::Vm { phase, source: source.into() }
}

/// A failure of the VM at `phase`, for `map_err`.
fn vm(phase: Phase) -> impl Fn(VmError) -> SendError {
    move |source| SendError::Vm { phase, source }
}

fn tx(phase: Phase, source: TransportError) -> SendError {
    SendError::Transport { phase, source, unsent: None }
}

fn unsent_note(unsent: Option<u64>) -> String {
    unsent.map(|s| format!(" (frames from sequence number {s} on were not sent)")).unwrap_or_default()
}

fn aborted(phase: Phase, p: &[u8]) -> SendError {
    SendError::PeerAborted {
        phase,
        reason: payload::Abort::decode(p).map(|a| a.reason).unwrap_or_else(|e| format!("(unreadable reason: {e})")),
    }
}

/// A send failed: if the destination left an Abort frame explaining why, report that.
fn peer_error(t: &mut dyn Transport, phase: Phase, e: TransportError) -> SendError {
    if matches!(
        e,
        TransportError::Io { .. } | TransportError::Closed | TransportError::Timeout(_) | TransportError::Broken(_)
    ) {
        t.set_recv_timeout(Duration::from_millis(500));
        if let Ok((FrameKind::Abort, p)) = recv_small(t) {
            return aborted(phase, &p);
        }
    }
    SendError::Transport { phase, source: e, unsent: t.unsent().map(|u| u.0) }
}

/// Receive a frame whose payload is small (every kind the destination sends).
fn recv_small(t: &mut dyn Transport) -> Result<(FrameKind, Vec<u8>), TransportError> {
    let h = t.recv_header()?;
    if matches!(h.kind, FrameKind::Pages | FrameKind::State | FrameKind::Hello) {
        return Ok((h.kind, Vec::new()));
    }
    let mut p = vec![0u8; h.len as usize]; // bounded by the kind's cap in Header::decode
    t.recv_exact(&mut p)?;
    Ok((h.kind, p))
}

/// A session id data streams quote in Join (not a secret: it pairs connections).
fn session_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.write_u32(std::process::id());
    h.finish()
}
