//! The receiving side: an explicit state machine.
//!
//! ```text
//! AwaitHello --Hello(ok)--> Precopy{round} --Pages(round)--> Precopy{round}
//!                                        --EndOfRound(round)--> Precopy{round+1}
//!                                        --State--> States --State--> States
//!                                                              --Complete(verified)--> Resumed
//! any state --Abort / bad frame / EOF / timeout--> Failed (the VM is never resumed)
//! ```
//! Every length and gfn from the peer is checked against caps and guest RAM before any
//! allocation or write. The VM resumes only if every page arrived, each round's page count
//! matches the source's, and the VM took the machine state (every section, in order).
use std::collections::HashMap;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_hooks::dirty::DirtySet;
use kvm_hooks::memory::GuestRam;
use kvm_hooks::memory::PAGE_SIZE;
use kvm_hooks::migratable::{Incoming, MachineState, VmError, VmFactory, VmShape, MAX_MACHINE_STATE};

use mh_abi::{Kind, Op, Request};

use crate::handover::{Handover, Outcome};
use crate::protocol::{self, FrameKind, Header, ProtocolError, MAX_RUNS};
use crate::transport::{Part, Transport, TransportError};

/// Receiver limits and behaviour.
#[derive(Debug, Clone)]
pub struct RecvOptions {
    /// Largest VM accepted.
    pub max_ram: u64,
    pub max_vcpus: u32,
    /// Snapshot guest RAM once every page has arrived (verification, `--dump-memory`): at the
    /// first machine-state section, or for confidential VMs (whose MH writes RAM until its
    /// End marker) once the MH imported that marker, so nothing but the resume runs between
    /// `Complete` and `Resumed`. The time it takes is reported to the source and excluded
    /// from downtime.
    pub capture: bool,
    /// How long to wait for the next frame.
    pub io_timeout: Duration,
    /// Allocate and map all guest RAM when the VM is created (before HelloAck).
    pub prefault: bool,
    /// Confidential VMs: launch an MH with this key and import private pages through it.
    pub confidential: Option<ConfidentialRecv>,
    /// Most precopy rounds accepted.
    pub max_rounds: u32,
    /// Longest a migration may take, first frame to resume.
    pub deadline: Duration,
    /// Refuse a VM larger than the memory this host has available at the handshake.
    pub check_host_memory: bool,
    /// Set by the operator (a signal): discard the VM unless it already runs here.
    pub cancel: crate::cancel::Cancel,
}

/// Receiver side of confidential mode.
#[derive(Debug, Clone)]
pub struct ConfidentialRecv {
    pub key: crate::keys::TransportKey,
    pub mh_spin: u64,
    pub host_spin: u32,
    pub mh_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvState {
    AwaitHello,
    Precopy { round: u32 },
    States,
    Resumed,
    Failed,
}

impl std::fmt::Display for RecvState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecvState::AwaitHello => write!(f, "handshake"),
            RecvState::Precopy { round } => write!(f, "precopy round {round}"),
            RecvState::States => write!(f, "machine state transfer"),
            RecvState::Resumed => write!(f, "resumed"),
            RecvState::Failed => write!(f, "failed"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("receive failed in {state}: {source}")]
    Transport {
        state: RecvState,
        #[source]
        source: TransportError,
    },
    #[error("receive failed in {state}: {source}")]
    Protocol {
        state: RecvState,
        #[source]
        source: ProtocolError,
    },
    #[error("receive failed in {state}: {kind:?} frame not allowed here")]
    Unexpected { state: RecvState, kind: FrameKind },
    #[error("refused the VM: {0}")]
    Refused(String),
    #[error("cannot prepare the destination: {0}")]
    Prepare(String),
    #[error("receive failed in {state}: source aborted: {reason}")]
    SourceAborted { state: RecvState, reason: String },
    #[error("receive failed in {state}: {msg}")]
    Incomplete { state: RecvState, msg: String },
    #[error("no source connected within {waited:?}{}", dropped_list(dropped))]
    NoSource { waited: Duration, dropped: Vec<String> },
    #[error("cancelled: {0}")]
    Cancelled(String),
    #[error("receive failed in {state}: VM: {source}")]
    Vm {
        state: RecvState,
        #[source]
        source: VmError,
    },
    #[error("receive failed in {state}: Migration Handler: {source}")]
    Mh {
        state: RecvState,
        #[source]
        source: kvm_hooks::mh::MhError,
    },
}

/// What a successful receive leaves behind.
#[derive(Debug)]
pub struct Received {
    pub shape: VmShape,
    pub rounds: u32,
    pub pages: u64,
    pub bytes: u64,
    /// Guest RAM just before resume, when `capture` was on.
    pub snapshot: Option<Vec<u8>>,
    pub capture_time: Duration,
    pub total_time: Duration,
    /// CPU time of this process (every thread) from the connection to the resume.
    pub cpu: Duration,
    /// Guest RAM was allocated before the migration started ([`Receiver::prepare`]), and
    /// how long that took (not part of the migration).
    pub prepared: Option<Duration>,
}

fn dropped_list(dropped: &[String]) -> String {
    if dropped.is_empty() {
        String::new()
    } else {
        format!("; dropped {} connection(s): {}", dropped.len(), dropped.join("; "))
    }
}

/// How often a running receive looks at its cancel flag.
const CANCEL_POLL: Duration = Duration::from_millis(50);

/// State shared by the control thread and the data-stream workers.
struct Shared {
    received: Mutex<DirtySet>,
    /// Per data stream: rounds it has completed (EndOfRound seen). In confidential mode one
    /// more entry, last, is the control stream's (its blobs of the round are imported), so
    /// a page's shared copy of round n+1 never lands before its private copy of round n.
    completed: Mutex<Vec<u32>>,
    cv: Condvar,
    /// Pages that arrived per round over all data streams.
    round_pages: Mutex<HashMap<u32, u64>>,
    total_pages: AtomicU64,
    error: Mutex<Option<String>>,
    stop: AtomicBool,
    /// Shut these down to unblock every reader after an error.
    sockets: Mutex<Vec<TcpStream>>,
    /// When any stream last received a frame (nanoseconds after `epoch`): the source is
    /// silent only when all of its streams are.
    epoch: Instant,
    activity: AtomicU64,
    /// Set when the receive is over (either way): the deadline watchdog stops.
    finished: Mutex<bool>,
    finished_cv: Condvar,
}

impl Shared {
    /// Record the first error and unblock every reader. The control socket (index 0) is
    /// only shut for reading, so the control thread can still send Abort with the reason.
    fn fail(&self, msg: String) {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(msg);
        self.cv.notify_all();
        for (i, s) in self.sockets.lock().unwrap_or_else(|e| e.into_inner()).iter().enumerate() {
            let _ = s.shutdown(if i == 0 { std::net::Shutdown::Read } else { std::net::Shutdown::Both });
        }
    }
    fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    /// Fail the receive with `msg` unless it finished within `limit` of now, and with the
    /// cancel's reason once `cancel` is set, unless the VM runs here already (the handover
    /// then decides: a VM that runs is never discarded).
    fn watch(&self, limit: Duration, msg: String, cancel: &crate::cancel::Cancel, handover: &Handover) {
        let t0 = Instant::now();
        let mut g = self.finished.lock().unwrap_or_else(|e| e.into_inner());
        while !*g {
            if let Some(why) = cancel.reason() {
                if handover.fence() {
                    drop(g);
                    self.fail(format!("cancelled ({why}); the VM is discarded here"));
                } else {
                    tracing::warn!("cancel ({why}) came after the VM resumed here: it runs on");
                }
                return;
            }
            let Some(left) = limit.checked_sub(t0.elapsed()) else {
                drop(g);
                self.fail(msg);
                return;
            };
            g = self.finished_cv.wait_timeout(g, left.min(CANCEL_POLL)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
    fn finish(&self) {
        *self.finished.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.finished_cv.notify_all();
    }
    /// The source was heard from just now.
    fn touch(&self) {
        self.activity.store(self.epoch.elapsed().as_nanos() as u64, Ordering::Release);
    }
    /// How long no stream of this migration has received a frame.
    fn silent_for(&self) -> Duration {
        self.epoch.elapsed().saturating_sub(Duration::from_nanos(self.activity.load(Ordering::Acquire)))
    }
    /// Wait until the next frame starts arriving on `t`. Fails only when the whole source
    /// has been silent for `timeout`: a data stream idles while a round's pages all go
    /// through the Migration Handler, the control stream while data streams carry pages, and
    /// neither is a dead peer.
    fn await_frame(&self, t: &dyn Transport, timeout: Duration) -> Result<(), TransportError> {
        loop {
            if t.wait_readable(timeout.min(Duration::from_millis(100)))? {
                return Ok(());
            }
            if self.silent_for() >= timeout {
                return Err(TransportError::Timeout(timeout));
            }
        }
    }
    /// Wait until every participant (the first `n` entries, or all with `None`) completed at
    /// least `rounds` rounds; fails when no stream received anything for `timeout`.
    fn wait_rounds(&self, rounds: u32, n: Option<usize>, timeout: Duration) -> Result<(), String> {
        let mut g = self.completed.lock().unwrap_or_else(|e| e.into_inner());
        while g.iter().take(n.unwrap_or(usize::MAX)).copied().min().unwrap_or(u32::MAX) < rounds {
            if let Some(e) = self.error() {
                return Err(e);
            }
            if self.silent_for() > timeout {
                return Err(format!(
                    "round {} is unfinished and the source sent nothing for {timeout:?} (rounds completed per stream: {g:?})",
                    rounds - 1
                ));
            }
            g = self.cv.wait_timeout(g, Duration::from_millis(50)).unwrap_or_else(|e| e.into_inner()).0;
        }
        Ok(())
    }
}

/// Why receiving one Pages frame failed.
enum PageError {
    Transport(TransportError),
    Protocol(ProtocolError),
    Order(String),
}

/// Receive one Pages frame of round `round` (header already read) into `ram`, validating
/// the run table before any data is read. Returns the runs received.
fn recv_pages(
    t: &mut dyn Transport,
    h: &Header,
    round: u32,
    ram: &GuestRam,
    received: &Mutex<DirtySet>,
) -> Result<u64, PageError> {
    let k = FrameKind::Pages;
    let perr = |msg: String| PageError::Protocol(ProtocolError::Payload { kind: k, msg });
    if h.len < 8 {
        return Err(perr(format!("{} bytes is shorter than the 8-byte prefix", h.len)));
    }
    let mut pre = [0u8; 8];
    t.recv_exact(&mut pre).map_err(PageError::Transport)?;
    let r = u32::from_le_bytes(pre[0..4].try_into().expect("4"));
    let nruns = u32::from_le_bytes(pre[4..8].try_into().expect("4"));
    if r != round {
        return Err(PageError::Order(format!("pages for round {r} arrived in round {round}")));
    }
    if nruns == 0 || nruns > MAX_RUNS {
        return Err(perr(format!("{nruns} runs (must be 1..={MAX_RUNS})")));
    }
    let table_len = 16 * nruns as usize;
    if (h.len as usize) < 8 + table_len {
        return Err(perr(format!("{nruns} runs do not fit in {} bytes", h.len)));
    }
    let mut table = vec![0u8; table_len]; // at most 64 KiB (MAX_RUNS)
    t.recv_exact(&mut table).map_err(PageError::Transport)?;
    let runs = protocol::decode_runs(&table);
    let data_len = u64::from(h.len) - 8 - table_len as u64;
    protocol::check_runs(&runs, ram.pages(), data_len).map_err(PageError::Protocol)?;
    let mut pages = 0u64;
    for run in &runs {
        let end = run.gfn + u64::from(run.npages);
        if run.is_zero() {
            // Fresh guest RAM is already zero (a new memfd): only pages that an earlier
            // round filled need clearing. Touching the rest would allocate them.
            let rec = received.lock().unwrap_or_else(|e| e.into_inner());
            let mut g = run.gfn;
            while g < end {
                if !rec.contains(g) {
                    g += 1;
                    continue;
                }
                let start = g;
                while g < end && rec.contains(g) {
                    g += 1;
                }
                ram.zero(start * PAGE_SIZE, (g - start) * PAGE_SIZE).map_err(|e| PageError::Order(e.to_string()))?;
            }
        } else {
            t.recv_into_guest(ram, run.gfn * PAGE_SIZE, u64::from(run.npages) * PAGE_SIZE)
                .map_err(PageError::Transport)?;
        }
        let mut rec = received.lock().unwrap_or_else(|e| e.into_inner());
        for g in run.gfn..end {
            rec.insert(g);
        }
        pages += u64::from(run.npages);
    }
    Ok(pages)
}

/// A data stream: Pages and EndOfRound only, rounds in order, each round's data written
/// only after every stream finished the previous round (so older data never lands on top
/// of newer data that came over another stream).
fn data_worker(i: usize, mut t: Box<dyn Transport>, sh: Arc<Shared>, ram: Arc<GuestRam>, timeout: Duration) {
    let mut round = 0u32;
    let mut pages = 0u64;
    let mut barrier_done = u32::MAX;
    let res: Result<(), String> = loop {
        let h = match sh.await_frame(&*t, timeout).and_then(|()| t.recv_header()) {
            Ok(h) => h,
            Err(_) if sh.stop.load(Ordering::Acquire) => break Ok(()),
            Err(e) => break Err(format!("data stream {i}: {e}")),
        };
        sh.touch();
        match h.kind {
            FrameKind::Pages => {
                if barrier_done != round {
                    if let Err(e) = sh.wait_rounds(round, None, timeout) {
                        break Err(format!("data stream {i}: {e}"));
                    }
                    barrier_done = round;
                }
                match recv_pages(&mut *t, &h, round, &ram, &sh.received) {
                    Ok(n) => {
                        pages += n;
                        sh.touch();
                    }
                    Err(PageError::Transport(e)) => break Err(format!("data stream {i}: {e}")),
                    Err(PageError::Protocol(e)) => break Err(format!("data stream {i}: bad frame from peer: {e}")),
                    Err(PageError::Order(e)) => break Err(format!("data stream {i}: {e}")),
                }
            }
            FrameKind::EndOfRound => {
                let mut p = vec![0u8; h.len as usize];
                if let Err(e) = t.recv_exact(&mut p) {
                    break Err(format!("data stream {i}: {e}"));
                }
                match protocol::decode_end_of_round(&p) {
                    Ok((r, n)) if r == round && n == pages => {
                        *sh.round_pages.lock().unwrap_or_else(|e| e.into_inner()).entry(r).or_default() += n;
                        sh.total_pages.fetch_add(n, Ordering::AcqRel);
                        sh.completed.lock().unwrap_or_else(|e| e.into_inner())[i] = r + 1;
                        sh.cv.notify_all();
                        round += 1;
                        pages = 0;
                    }
                    Ok((r, n)) => {
                        break Err(format!(
                            "data stream {i}: end of round {r} ({n} pages) while in round {round} with {pages} pages"
                        ))
                    }
                    Err(e) => break Err(format!("data stream {i}: bad frame from peer: {e}")),
                }
            }
            k => break Err(format!("data stream {i}: {k:?} frame not allowed on a data stream")),
        }
    };
    if let Err(e) = res {
        sh.fail(e);
    }
}

pub struct Receiver<F: VmFactory> {
    factory: F,
    o: RecvOptions,
    state: RecvState,
    machine: Option<F::Vm>,
    round_pages: u64,
    total_pages: u64,
    bytes: u64,
    /// Guest RAM as it stood when the last page arrived (with `capture`), and what taking it
    /// cost.
    snapshot: Option<(Vec<u8>, Duration)>,
    /// Machine-state sections received so far, in order, and their bytes.
    sections: Vec<Vec<u8>>,
    section_bytes: usize,
    shared: Arc<Shared>,
    streams: u32,
    workers: Vec<JoinHandle<()>>,
    /// The source is confidential: pages and vCPU state arrive as MH blobs.
    confidential: bool,
    /// Reused buffer for Blobs payloads.
    blob_buf: Vec<u8>,
    /// Confidential: end of the last shared range received (ranges ascend across frames),
    /// and whether the last PageStates frame arrived.
    states_end: u64,
    states_done: bool,
    /// Guest RAM allocated ahead by [`Receiver::prepare`], taken by the Hello that fits it.
    prepared: Option<GuestRam>,
    /// Set by [`Receiver::prepare`]; a Hello either uses that RAM or is refused.
    prepare_time: Option<Duration>,
    /// The resume, serialised with the source's handover queries.
    handover: Arc<Handover>,
}

/// Accepts the next data-stream connection.
pub type Acceptor<'a> = &'a mut dyn FnMut() -> Result<Box<dyn Transport>, TransportError>;

impl<F: VmFactory> Receiver<F> {
    /// A receiver that creates its VM through `factory` when a source says Hello.
    pub fn new(o: RecvOptions, factory: F) -> Self {
        Receiver {
            factory,
            o,
            state: RecvState::AwaitHello,
            machine: None,
            round_pages: 0,
            total_pages: 0,
            bytes: 0,
            snapshot: None,
            sections: Vec::new(),
            section_bytes: 0,
            shared: Arc::new(Shared {
                received: Mutex::new(DirtySet::default()),
                completed: Mutex::new(Vec::new()),
                cv: Condvar::new(),
                round_pages: Mutex::new(HashMap::new()),
                total_pages: AtomicU64::new(0),
                error: Mutex::new(None),
                stop: AtomicBool::new(false),
                sockets: Mutex::new(Vec::new()),
                epoch: Instant::now(),
                activity: AtomicU64::new(0),
                finished: Mutex::new(false),
                finished_cv: Condvar::new(),
            }),
            streams: 0,
            workers: Vec::new(),
            confidential: false,
            blob_buf: Vec::new(),
            states_end: 0,
            states_done: false,
            prepared: None,
            prepare_time: None,
            handover: Arc::default(),
        }
    }

    /// The handover this receiver resumes through; answer the source's queries with it
    /// (`handover::serve`).
    pub fn handover(&self) -> Arc<Handover> {
        self.handover.clone()
    }

    /// Allocate and pre-fault `ram_bytes` of guest RAM now, before any source connects, as a
    /// destination started ahead of the migration would (QEMU's `-incoming` with
    /// `-mem-prealloc`). Fresh memory is slow to touch on some hosts; done here, that cost is
    /// paid before the source's clock starts. A Hello for a VM of another size is refused.
    pub fn prepare(&mut self, ram_bytes: u64) -> Result<Duration, RecvError> {
        let t = Instant::now();
        if ram_bytes > self.o.max_ram {
            return Err(RecvError::Prepare(format!(
                "prepared RAM of {ram_bytes} bytes exceeds this receiver's limit of {} bytes",
                self.o.max_ram
            )));
        }
        let ram = GuestRam::new(ram_bytes).map_err(|e| RecvError::Prepare(e.to_string()))?;
        ram.populate().map_err(|e| RecvError::Prepare(e.to_string()))?;
        self.prepared = Some(ram);
        let d = t.elapsed();
        self.prepare_time = Some(d);
        Ok(d)
    }

    pub fn state(&self) -> RecvState {
        self.state
    }
    /// The destination VM (running after success; created but never resumed after failure).
    pub fn machine(&self) -> Option<&F::Vm> {
        self.machine.as_ref()
    }
    pub fn into_machine(self) -> Option<F::Vm> {
        self.machine
    }

    /// Drive one incoming migration (single stream) to the end.
    pub fn run(&mut self, t: &mut dyn Transport) -> Result<Received, RecvError> {
        let mut none = || Err(TransportError::Guest("this receiver accepts no data streams".into()));
        self.run_streams(t, &mut none)
    }

    /// Drive one incoming migration; data streams (if the source asks for them) are
    /// accepted through `accept`.
    pub fn run_streams(&mut self, t: &mut dyn Transport, accept: Acceptor<'_>) -> Result<Received, RecvError> {
        let t0 = Instant::now();
        let cpu0 = kvm_hooks::process_usage().0;
        t.set_recv_timeout(self.o.io_timeout);
        if let Some(h) = t.shutdown_handle() {
            self.shared.sockets.lock().unwrap_or_else(|e| e.into_inner()).push(h);
        }
        // A peer that keeps every stream barely alive is still cut off at the deadline; an
        // operator's cancel discards the VM unless it runs here already.
        let (sh, limit) = (self.shared.clone(), self.o.deadline);
        let (cancel, handover) = (self.o.cancel.clone(), self.handover.clone());
        let msg =
            format!("the migration did not finish within this receiver's deadline of {limit:?} (receiver.deadline_ms)");
        let watchdog = std::thread::Builder::new()
            .name("recv-deadline".into())
            .spawn(move || sh.watch(limit, msg, &cancel, &handover))
            .ok();
        let mut r = self.drive(t, accept, t0);
        self.shared.finish();
        if let Some(w) = watchdog {
            let _ = w.join();
        }
        // A failing data stream shuts the control stream down; report its cause instead.
        if let (Err(_), Some(msg)) = (&r, self.shared.error()) {
            r = Err(RecvError::Incomplete { state: self.state, msg });
        }
        // An operator's cancel fenced the VM: say so rather than what it cut short.
        if let (Err(_), Some(why), Outcome::NeverRuns) = (&r, self.o.cancel.reason(), self.handover.outcome()) {
            r = Err(RecvError::Cancelled(format!("{why}, in {}: the VM is discarded here", self.state)));
        }
        self.shared.stop.store(true, Ordering::Release);
        if let Err(e) = &r {
            tracing::warn!("{e}");
            if !matches!(e, RecvError::SourceAborted { .. }) {
                // Best effort: the source learns why instead of seeing a reset.
                let _ = t.send_frame(FrameKind::Abort, &[Part::Buf(&protocol::encode_abort(&e.to_string()))], None);
            }
            self.shared.fail("receive aborted".into());
            t.shutdown();
            self.state = RecvState::Failed;
        } else {
            for s in self.shared.sockets.lock().unwrap_or_else(|e| e.into_inner()).iter().skip(1) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        if let Ok(got) = &mut r {
            got.cpu = kvm_hooks::process_usage().0.saturating_sub(cpu0);
        }
        r
    }

    fn drive(&mut self, t: &mut dyn Transport, accept: Acceptor<'_>, t0: Instant) -> Result<Received, RecvError> {
        loop {
            let st = self.state;
            if st != RecvState::AwaitHello {
                // The last frame is handled: its processing is not the source's silence.
                self.shared.touch();
                self.shared.await_frame(t, self.o.io_timeout).map_err(|e| self.terr(e))?;
            }
            let h = t.recv_header().map_err(|e| self.terr(e))?;
            self.shared.touch();
            self.bytes += protocol::HEADER_LEN as u64 + u64::from(h.len);
            match (st, h.kind) {
                (RecvState::AwaitHello, FrameKind::Hello) => self.on_hello(t, &h, accept)?,
                (RecvState::Precopy { round }, FrameKind::Pages) if self.streams == 0 => self.on_pages(t, &h, round)?,
                (RecvState::Precopy { round }, FrameKind::EndOfRound) => {
                    let p = self.small(t, &h)?;
                    let (r, pages) = protocol::decode_end_of_round(&p).map_err(|e| self.perr(e))?;
                    if r != round {
                        return Err(self.incomplete(format!("end of round {r} while in round {round}")));
                    }
                    if self.streams > 0 {
                        // The round is over when every data stream finished it.
                        let n = Some(self.streams as usize);
                        self.shared.wait_rounds(round + 1, n, self.o.io_timeout).map_err(|m| self.incomplete(m))?;
                        self.round_pages += self
                            .shared
                            .round_pages
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get(&r)
                            .copied()
                            .unwrap_or(0);
                    }
                    if pages != self.round_pages {
                        return Err(self.incomplete(format!(
                            "source sent {pages} pages in round {r}, {} arrived",
                            self.round_pages
                        )));
                    }
                    self.round_pages = 0;
                    if self.confidential && self.streams > 0 {
                        // This round's private pages are in: data streams may write round+1.
                        if let Some(c) = self.shared.completed.lock().unwrap_or_else(|e| e.into_inner()).last_mut() {
                            *c = round + 1;
                        }
                        self.shared.cv.notify_all();
                    }
                    if round + 1 >= self.o.max_rounds {
                        return Err(self.incomplete(format!(
                            "the source went on to round {}; this receiver takes at most {} precopy rounds (receiver.max_rounds)",
                            round + 1,
                            self.o.max_rounds
                        )));
                    }
                    self.state = RecvState::Precopy { round: round + 1 };
                }
                (RecvState::Precopy { round }, FrameKind::Blobs) if self.confidential => {
                    self.on_blobs(t, &h, Some(round))?
                }
                (RecvState::States, FrameKind::Blobs) if self.confidential => self.on_blobs(t, &h, None)?,
                (RecvState::States, FrameKind::PageStates) if self.confidential => self.on_page_states(t, &h)?,
                (RecvState::Precopy { round }, FrameKind::State) if round > 0 && !self.confidential => {
                    self.state = RecvState::States;
                    // Every page is in: the data streams are done, and RAM is final now, so a
                    // snapshot taken here costs the handover nothing (between Complete and
                    // Resumed only the resume runs).
                    self.end_data_streams();
                    self.capture_now();
                    self.on_state(t, &h)?;
                }
                (RecvState::States, FrameKind::State) if !self.confidential => self.on_state(t, &h)?,
                (RecvState::States, FrameKind::Complete) => return self.on_complete(t, &h, t0),
                (_, FrameKind::Abort) => {
                    let p = self.small(t, &h)?;
                    let reason = protocol::decode_abort(&p).unwrap_or_else(|e| format!("(unreadable reason: {e})"));
                    return Err(RecvError::SourceAborted { state: st, reason });
                }
                (s, k) => return Err(RecvError::Unexpected { state: s, kind: k }),
            }
        }
    }

    fn terr(&self, source: TransportError) -> RecvError {
        match source {
            TransportError::Protocol(p) => RecvError::Protocol { state: self.state, source: p },
            source => RecvError::Transport { state: self.state, source },
        }
    }
    fn perr(&self, source: ProtocolError) -> RecvError {
        RecvError::Protocol { state: self.state, source }
    }
    fn incomplete(&self, msg: String) -> RecvError {
        RecvError::Incomplete { state: self.state, msg }
    }

    /// Read a payload whose cap is small (checked by `Header::decode`).
    /// The memory this host has available, when a VM of `ram` bytes would not fit in it
    /// (prepared RAM, and a VM whose RAM exists already, count as fitting).
    fn host_memory_short(&self, ram: u64) -> Option<u64> {
        if !self.o.check_host_memory || self.prepared.is_some() || self.factory.has_ram() {
            return None;
        }
        crate::host::mem_available().filter(|&avail| ram > avail)
    }

    fn small(&self, t: &mut dyn Transport, h: &Header) -> Result<Vec<u8>, RecvError> {
        debug_assert!(h.kind != FrameKind::Pages);
        let mut p = vec![0u8; h.len as usize];
        t.recv_exact(&mut p).map_err(|e| self.terr(e))?;
        Ok(p)
    }

    fn on_hello(&mut self, t: &mut dyn Transport, h: &Header, accept: Acceptor<'_>) -> Result<(), RecvError> {
        let p = self.small(t, h)?;
        let hello = protocol::decode_hello_full(&p).map_err(|e| self.perr(e))?;
        let spec = hello.shape;
        let refuse = if spec.ram_bytes > self.o.max_ram {
            Some(format!(
                "guest RAM {} bytes exceeds this receiver's limit of {} bytes",
                spec.ram_bytes, self.o.max_ram
            ))
        } else if let Some(avail) = self.host_memory_short(spec.ram_bytes) {
            Some(format!(
                "guest RAM {} bytes exceeds the {avail} bytes this host has available (MemAvailable)",
                spec.ram_bytes
            ))
        } else if spec.vcpus > self.o.max_vcpus {
            Some(format!("{} vCPUs exceeds this receiver's limit of {}", spec.vcpus, self.o.max_vcpus))
        } else if hello.kind != self.factory.kind() {
            Some(format!("the source sends {}; this receiver creates {}", hello.kind, self.factory.kind()))
        } else if hello.confidential && self.o.confidential.is_none() {
            Some("the source VM is confidential, but this receiver has no transport key (confidential.key_file)".into())
        } else if !hello.confidential && self.o.confidential.is_some() {
            Some("this receiver only takes confidential migrations; the source sends the VM in clear".into())
        } else {
            spec.validate().err().map(|e| format!("invalid VM shape: {e}"))
        };
        let machine = match (refuse, self.prepared.take()) {
            (Some(r), _) => Err(r),
            (None, Some(ram)) if ram.size() != spec.ram_bytes => Err(format!(
                "this destination was prepared for {} MiB of guest RAM; the source VM has {} MiB",
                ram.size() >> 20,
                spec.ram_bytes >> 20
            )),
            (None, ram) => {
                self.factory.create(spec, &hello.layout, ram).map_err(|e| format!("cannot create the VM here: {e}"))
            }
        };
        // Confidential: the VM starts now, before any page arrives, with its MH running.
        let machine = machine.and_then(|mut m| {
            if let Some(c) = &self.o.confidential {
                let launch = kvm_hooks::mh::Launch { key: c.key.0, vm_id: hello.vm_id, spin: c.mh_spin };
                m.launch_mh(&launch, c.mh_timeout).map_err(|e| format!("cannot start the Migration Handler: {e}"))?;
                let conf = m.confidential().ok_or("the VM runs no Migration Handler after its launch")?;
                if let Some(h) = conf.mh().as_mut() {
                    h.spin = c.host_spin;
                }
            }
            Ok(m)
        });
        let machine = machine.and_then(|m| {
            // Confidential: the MH writes every private page from inside the guest, where the
            // first touch of fresh host memory costs a guest page fault each (tens of µs on a
            // nested host): allocating all of RAM first is several times faster
            // (docs/benchmarks.md, "A confidential destination allocates its RAM first").
            if (self.o.prefault || hello.confidential) && self.prepare_time.is_none() {
                let t = Instant::now();
                m.ram().populate().map_err(|e| format!("cannot pre-allocate guest RAM: {e}"))?;
                tracing::info!("pre-allocated {} MiB of guest RAM in {:?}", spec.ram_bytes >> 20, t.elapsed());
            }
            Ok(m)
        });
        match machine {
            Ok(m) => {
                let mut received = DirtySet::new(m.ram().pages());
                if hello.confidential {
                    // The MH region is this VM's own; it never travels.
                    for gfn in mh_abi::REGION_GFNS {
                        received.insert(gfn);
                    }
                }
                self.confidential = hello.confidential;
                *self.shared.received.lock().unwrap_or_else(|e| e.into_inner()) = received;
                self.sections.clear();
                self.section_bytes = 0;
                let ram = m.ram().clone();
                // Confidential: the source MH binds its blobs to this MH's challenge.
                let challenge = match m.confidential().map(|c| c.mh()).as_ref().and_then(|g| g.as_ref()) {
                    Some(h) => h.challenge().map_err(|source| RecvError::Mh { state: self.state, source })?,
                    None => 0,
                };
                self.machine = Some(m);
                let ack = protocol::encode_hello_ack(0, challenge, "accepted");
                t.send_frame(FrameKind::HelloAck, &[Part::Buf(&ack)], None).map_err(|e| self.terr(e))?;
                self.join_streams(hello.streams, hello.session, ram, accept)?;
                // Every connection of the session is in: any later one may be a query.
                self.handover.open(hello.session);
                self.state = RecvState::Precopy { round: 0 };
                Ok(())
            }
            Err(reason) => {
                let _ =
                    t.send_frame(FrameKind::HelloAck, &[Part::Buf(&protocol::encode_hello_ack(1, 0, &reason))], None);
                Err(RecvError::Refused(reason))
            }
        }
    }

    /// Accept the source's data streams; each must first say Join with this migration's session id.
    fn join_streams(
        &mut self,
        n: u32,
        session: u64,
        ram: Arc<GuestRam>,
        accept: Acceptor<'_>,
    ) -> Result<(), RecvError> {
        if n == 0 {
            return Ok(());
        }
        // Confidential: the control stream (blob imports) takes part in the round barrier.
        let parts = n as usize + usize::from(self.confidential);
        *self.shared.completed.lock().unwrap_or_else(|e| e.into_inner()) = vec![0; parts];
        let mut slots: Vec<Option<Box<dyn Transport>>> = (0..n).map(|_| None).collect();
        // A connection that joins wrongly (another session, a stream index out of range or
        // taken, a bad frame) is dropped and the next one taken: a stray peer cannot break
        // the migration. All streams must have joined within one I/O timeout.
        let t0 = Instant::now();
        let mut refused = Vec::new();
        while slots.iter().any(Option::is_none) {
            if t0.elapsed() >= self.o.io_timeout {
                return Err(self.incomplete(format!(
                    "not every data stream joined within {:?}{}",
                    self.o.io_timeout,
                    dropped_list(&refused)
                )));
            }
            let mut d = accept().map_err(|e| self.terr(e))?;
            d.set_recv_timeout(self.o.io_timeout);
            match self.read_join(&mut *d, session, &slots) {
                Ok(i) => {
                    if let Some(hd) = d.shutdown_handle() {
                        self.shared.sockets.lock().unwrap_or_else(|e| e.into_inner()).push(hd);
                    }
                    slots[i] = Some(d);
                }
                Err(why) => {
                    tracing::warn!("dropped a data stream connection: {why}");
                    d.shutdown();
                    refused.push(why);
                }
            }
        }
        for (i, d) in slots.into_iter().enumerate() {
            let d = d.expect("every slot filled above");
            let (sh, ram, to) = (self.shared.clone(), ram.clone(), self.o.io_timeout);
            self.workers.push(
                std::thread::Builder::new()
                    .name(format!("recv-stream{i}"))
                    .spawn(move || data_worker(i, d, sh, ram, to))
                    .map_err(|e| self.incomplete(format!("spawn stream worker: {e}")))?,
            );
        }
        self.streams = n;
        Ok(())
    }

    /// The stream index a connection's Join claims, if it is a free slot of `session`.
    fn read_join(
        &self,
        d: &mut dyn Transport,
        session: u64,
        slots: &[Option<Box<dyn Transport>>],
    ) -> Result<usize, String> {
        let h = d.recv_header().map_err(|e| e.to_string())?;
        if h.kind != FrameKind::Join {
            return Err(format!("sent {:?} where Join was expected", h.kind));
        }
        let p = self.small(d, &h).map_err(|e| e.to_string())?;
        let (s, i) = protocol::decode_join(&p).map_err(|e| e.to_string())?;
        if s != session {
            return Err(format!("joined session {s:#x}, this is {session:#x}"));
        }
        match slots.get(i as usize) {
            None => Err(format!("joined as data stream {i} of {}", slots.len())),
            Some(Some(_)) => Err(format!("joined as data stream {i}, which has joined already")),
            Some(None) => Ok(i as usize),
        }
    }

    fn on_pages(&mut self, t: &mut dyn Transport, h: &Header, round: u32) -> Result<(), RecvError> {
        let m = self.machine.as_ref().ok_or_else(|| self.incomplete("pages before a VM exists".into()))?;
        let ram = m.ram().clone();
        match recv_pages(t, h, round, &ram, &self.shared.received) {
            Ok(n) => {
                self.round_pages += n;
                self.total_pages += n;
                Ok(())
            }
            Err(PageError::Transport(e)) => Err(self.terr(e)),
            Err(PageError::Protocol(e)) => Err(self.perr(e)),
            Err(PageError::Order(m)) => Err(self.incomplete(m)),
        }
    }

    /// MH blobs, imported in order through the destination MH. Pages count toward the
    /// round; Cpu blobs move the receiver to States.
    fn on_blobs(&mut self, t: &mut dyn Transport, h: &Header, round: Option<u32>) -> Result<(), RecvError> {
        // One reused buffer per receiver (up to ~1 MiB): the ciphertext is then copied once,
        // from it into the MH's slots.
        let mut p = std::mem::take(&mut self.blob_buf);
        p.resize(h.len as usize, 0);
        t.recv_exact(&mut p).map_err(|e| self.terr(e))?;
        let r = self.import_blobs(&p, round);
        self.blob_buf = p;
        r
    }

    fn import_blobs(&mut self, p: &[u8], round: Option<u32>) -> Result<(), RecvError> {
        let st = self.state;
        let m = self.machine.as_ref().ok_or_else(|| self.incomplete("blobs before a VM exists".into()))?;
        let (frame_round, blobs) = protocol::decode_blobs(p, m.ram().pages()).map_err(|e| self.perr(e))?;
        let kinds: Vec<Kind> = blobs.iter().map(|b| Kind::from_u32(b.desc.kind)).collect();
        let pages = kinds.iter().filter(|k| **k == Kind::Page).count() as u64;
        let cpu = kinds.iter().filter(|k| **k == Kind::Cpu).count();
        if pages > 0 && round != Some(frame_round) {
            return Err(self.incomplete(format!("page blobs of round {frame_round} in {st}")));
        }
        if cpu > 0 && cpu != blobs.len() {
            return Err(self.incomplete("vCPU-state blobs mixed with other blobs".into()));
        }
        let vmsa = mh_abi::VMSA / PAGE_SIZE;
        let mut reqs: Vec<Request> = Vec::new();
        for (i, (b, k)) in blobs.iter().zip(&kinds).enumerate() {
            let slot = i as u32;
            let gfn = b.desc.gfn;
            match k {
                Kind::Page => match reqs.last_mut() {
                    Some(r) if r.op == Op::Import as u16 && r.gfn + u64::from(r.count) == gfn => r.count += 1,
                    _ => reqs.push(Request { op: Op::Import as u16, id: 0, count: 1, slot, gfn, round: 0 }),
                },
                Kind::Cpu => {
                    if gfn != vmsa + i as u64 {
                        return Err(self.incomplete(format!("vCPU-state blob {i} labelled gfn {gfn:#x}")));
                    }
                    match reqs.last_mut() {
                        Some(r) => r.count += 1,
                        None => {
                            reqs.push(Request { op: Op::RestoreCpu as u16, id: 0, count: 1, slot, gfn: 0, round: 0 })
                        }
                    }
                }
                Kind::Begin | Kind::End => {
                    reqs.push(Request { op: Op::Marker as u16, id: 0, count: 1, slot, gfn: 0, round: 0 })
                }
                Kind::Invalid => unreachable!("decode_blobs refuses unknown kinds"),
            }
        }
        let mhe = |source| RecvError::Mh { state: st, source };
        {
            let mut g = m.confidential().map(|c| c.mh());
            let mh = g
                .as_mut()
                .and_then(|g| g.as_mut())
                .ok_or_else(|| self.incomplete("no Migration Handler runs here".into()))?;
            for (i, b) in blobs.iter().enumerate() {
                mh.write_slot_parts(i as u32, &b.desc, b.data).map_err(mhe)?;
            }
            mh.run(&reqs).map_err(mhe)?;
        }
        if pages > 0 {
            let mut rec = self.shared.received.lock().unwrap_or_else(|e| e.into_inner());
            for (b, _) in blobs.iter().zip(&kinds).filter(|(_, k)| **k == Kind::Page) {
                rec.insert(b.desc.gfn);
            }
        }
        self.round_pages += pages;
        self.total_pages += pages;
        if cpu > 0 {
            self.state = RecvState::States;
        }
        // The MH imported everything up to its End marker (`run` waits for it): RAM is
        // final, so a snapshot taken here costs the handover nothing.
        if kinds.contains(&Kind::End) {
            self.capture_now();
        }
        Ok(())
    }

    /// Confidential: the machine state the destination MH decrypted into the VMSA pages,
    /// `sections` of it.
    fn states_from_vmsa(&self, m: &F::Vm, sections: u32) -> Result<MachineState, RecvError> {
        let cap = (mh_abi::VMSA_PAGES * mh_abi::PAGE) as usize;
        let mut v = vec![0u8; cap];
        m.ram().read(mh_abi::VMSA, &mut v).map_err(|e| RecvError::Vm { state: self.state, source: e.into() })?;
        let n = u32::from_le_bytes(v[0..4].try_into().expect("4")) as usize;
        if n != sections as usize || 4 + 4 * n > cap {
            return Err(self.incomplete(format!("VMSA area holds {n} state sections, the source sent {sections}")));
        }
        let mut off = 4 + 4 * n;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let len = u32::from_le_bytes(v[4 + 4 * i..8 + 4 * i].try_into().expect("4")) as usize;
            let end = off.checked_add(len).filter(|&e| e <= cap);
            let end =
                end.ok_or_else(|| self.incomplete(format!("state section {i} of {len} bytes overruns the VMSA area")))?;
            out.push(v[off..end].to_vec());
            off = end;
        }
        Ok(MachineState { sections: out })
    }

    /// Confidential: the source's shared ranges, into this VM's page-state record. Checked
    /// against guest RAM and the MH region (each side's own) before any is applied.
    fn on_page_states(&mut self, t: &mut dyn Transport, h: &Header) -> Result<(), RecvError> {
        let p = self.small(t, h)?;
        let (ranges, last) = protocol::decode_page_states(&p).map_err(|e| self.perr(e))?;
        if self.states_done {
            return Err(self.incomplete("page states after the last PageStates frame".into()));
        }
        let m = self.machine.as_ref().ok_or_else(|| self.incomplete("page states before a VM exists".into()))?;
        let pages = m.ram().pages();
        let region = mh_abi::REGION_GFNS;
        for &(g, n) in &ranges {
            let end = g + n; // decode_page_states checked the sum
            if g < self.states_end {
                return Err(self.incomplete(format!("shared range at gfn {g:#x} is not after the previous one")));
            }
            if end > pages {
                return Err(
                    self.incomplete(format!("shared range gfn {g:#x}+{n} is outside guest RAM ({pages} pages)"))
                );
            }
            if g < region.end && end > region.start {
                return Err(self.incomplete(format!("shared range gfn {g:#x}+{n} is inside the MH region")));
            }
            self.states_end = end;
        }
        for &(g, n) in &ranges {
            let conf = m.confidential().ok_or_else(|| self.incomplete("no Migration Handler runs here".into()))?;
            conf.mark_shared(g, n).map_err(|e| RecvError::Vm { state: self.state, source: e.into() })?;
        }
        self.states_done = last;
        Ok(())
    }

    /// Every round is over: stop the data-stream workers (their silence from now on is not
    /// the source's).
    fn end_data_streams(&mut self) {
        if self.workers.is_empty() {
            return;
        }
        self.shared.stop.store(true, Ordering::Release);
        for s in self.shared.sockets.lock().unwrap_or_else(|e| e.into_inner()).iter().skip(1) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }

    /// With `capture`, snapshot guest RAM now (every page has arrived).
    fn capture_now(&mut self) {
        if let (true, Some(m)) = (self.o.capture, self.machine.as_ref()) {
            let t = Instant::now();
            let s = m.ram().snapshot();
            self.snapshot = Some((s, t.elapsed()));
        }
    }

    fn on_state(&mut self, t: &mut dyn Transport, h: &Header) -> Result<(), RecvError> {
        let p = self.small(t, h)?;
        let (i, blob) = protocol::decode_state(&p).map_err(|e| self.perr(e))?;
        if i as usize != self.sections.len() {
            return Err(self.incomplete(format!(
                "machine-state section {i} arrived where section {} was due",
                self.sections.len()
            )));
        }
        if self.section_bytes + blob.len() > MAX_MACHINE_STATE {
            return Err(self.incomplete(format!("machine state beyond the cap of {MAX_MACHINE_STATE} bytes")));
        }
        self.section_bytes += blob.len();
        self.sections.push(blob.to_vec());
        Ok(())
    }

    fn on_complete(&mut self, t: &mut dyn Transport, h: &Header, t0: Instant) -> Result<Received, RecvError> {
        let p = self.small(t, h)?;
        let (rounds, sections, pages_sent) = protocol::decode_complete(&p).map_err(|e| self.perr(e))?;
        let m = self.machine.as_ref().ok_or_else(|| self.incomplete("complete before a VM exists".into()))?;
        let total = m.ram().pages();
        self.total_pages += self.shared.total_pages.load(Ordering::Acquire);
        let got = self.shared.received.lock().unwrap_or_else(|e| e.into_inner()).len();
        if got != total {
            return Err(self.incomplete(format!("only {got} of {total} pages ever arrived")));
        }
        if pages_sent != self.total_pages {
            return Err(self.incomplete(format!("source sent {pages_sent} pages, {} arrived", self.total_pages)));
        }
        let state = if self.confidential {
            let done = m
                .confidential()
                .and_then(|c| c.mh().as_ref().and_then(|h| h.counters().ok()))
                .is_some_and(|c| c.complete);
            if !done {
                return Err(
                    self.incomplete("the MH did not confirm a complete blob stream (no valid End marker)".into())
                );
            }
            if !self.states_done {
                return Err(self.incomplete("the source's page states never arrived".into()));
            }
            self.states_from_vmsa(m, sections)?
        } else {
            if sections as usize != self.sections.len() {
                return Err(self.incomplete(format!(
                    "the source sent a machine state of {sections} sections, {} arrived",
                    self.sections.len()
                )));
            }
            MachineState { sections: std::mem::take(&mut self.sections) }
        };
        let kvm = |source| RecvError::Vm { state: RecvState::States, source };
        // Past the deadline (or after any stream failed) nothing resumes, however complete.
        if let Some(e) = self.shared.error() {
            return Err(self.incomplete(e));
        }
        let m = self.machine.as_mut().ok_or_else(|| RecvError::Incomplete {
            state: RecvState::States,
            msg: "complete before a VM exists".into(),
        })?;
        m.restore_machine_state(&state).map_err(kvm)?;
        let m = self.machine.as_ref().expect("checked above");
        let c0 = Instant::now();
        // Taken when RAM became final (the first machine-state section, or the MH's End
        // marker); a VM that got here without either is captured now.
        let (snapshot, capture_time) = match self.snapshot.take() {
            Some(s) => (Some(s.0), s.1),
            None => (self.o.capture.then(|| m.ram().snapshot()), c0.elapsed()),
        };
        // A source that asked, on another connection, whether the VM runs here before this
        // point was told it never will, and runs it again: this copy must stay paused.
        if !self.handover.resume(|| m.resume()).map_err(kvm)? {
            return Err(self.incomplete(match self.o.cancel.reason() {
                Some(why) => format!("cancelled ({why}) before the VM resumed; the VM is discarded here"),
                None => {
                    "the source asked whether the VM runs here before it resumed, and was told it never will".into()
                }
            }));
        }
        self.state = RecvState::Resumed;
        let ack = protocol::encode_resumed(capture_time.as_micros() as u64);
        if let Err(e) = t.send_frame(FrameKind::Resumed, &[Part::Buf(&ack)], None) {
            // The VM runs here now. The source, having sent Complete, stays paused without
            // this acknowledgement (the commit point, docs/architecture.md).
            tracing::error!("VM resumed but the acknowledgement could not be sent: {e}");
        }
        Ok(Received {
            shape: m.shape(),
            rounds,
            pages: self.total_pages,
            bytes: self.bytes,
            snapshot,
            capture_time,
            total_time: t0.elapsed(),
            cpu: Duration::ZERO,
            prepared: self.prepare_time,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Preparation needs no VM: a factory that is never asked.
    fn no_vms() -> crate::fake_vm::FakeVms {
        crate::fake_vm::FakeVms::default()
    }

    #[test]
    fn prepare_allocates_every_page_ahead() {
        let mut r = Receiver::new(crate::config::Config::default().recv_options(false), no_vms());
        r.prepare(64 << 20).unwrap();
        let ram = r.prepared.as_ref().expect("prepared RAM");
        // Every page of the memfd is allocated: one data extent over all of it.
        assert_eq!(ram.data_extents().unwrap(), vec![(0, 64 << 20)]);
    }

    /// A VM whose RAM exists already (a QEMU destination holds it) is not measured against
    /// the host's free memory; any other VM is.
    #[test]
    fn existing_ram_is_not_checked_against_free_memory() {
        let Some(avail) = crate::host::mem_available() else { return };
        let huge = (avail + (2 << 30)).next_multiple_of(2 << 20);
        let mut o = crate::config::Config::default().recv_options(false);
        o.check_host_memory = true;
        let fresh = Receiver::new(o.clone(), crate::fake_vm::FakeVms { has_ram: false });
        assert!(fresh.host_memory_short(huge).is_some());
        let existing = Receiver::new(o, crate::fake_vm::FakeVms { has_ram: true });
        assert_eq!(existing.host_memory_short(huge), None);
    }

    #[test]
    fn prepare_checks_limits() {
        let mut o = crate::config::Config::default().recv_options(false);
        o.max_ram = 64 << 20;
        let mut r = Receiver::new(o, no_vms());
        let e = r.prepare(128 << 20).unwrap_err().to_string();
        assert!(e.contains("prepare") && e.contains("limit"), "{e}");
        let e = r.prepare(3 << 20).unwrap_err().to_string();
        assert!(e.contains("prepare") && e.contains("3145728"), "{e}");
        assert!(r.prepared.is_none());
    }
}
