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
mod confidential;
pub mod handover;
mod streams;

use streams::*;

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

use crate::dest::handover::{Handover, Outcome};
use crate::wire::frame::{self, FrameKind, Header, ProtocolError};
use crate::wire::payload;
use crate::wire::payload::PagesHead;
use crate::wire::transport::{Part, Transport, TransportError};

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
    pub key: crate::wire::keys::TransportKey,
    pub mh_spin: u64,
    pub host_spin: u32,
    pub mh_timeout: Duration,
    /// The VM's MH, should it migrate on from here, may send zero records.
    pub zero_records: bool,
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
    /// Confidential: the page import the destination MH works on while the next frame is
    /// received (finished before any other frame is handled).
    importing: Option<confidential::Importing>,
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
            importing: None,
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
            self.abandon_import();
            if !matches!(e, RecvError::SourceAborted { .. }) {
                // Best effort: the source learns why instead of seeing a reset.
                let _ = t.send_frame(FrameKind::Abort, &[Part::Buf(&payload::Abort::encode(&e.to_string()))], None);
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
            self.bytes += frame::HEADER_LEN as u64 + u64::from(h.len);
            if !matches!(h.kind, FrameKind::Blobs | FrameKind::Abort) {
                // Every frame but the next blobs waits for the page import in flight (an
                // Abort ends the receive whatever the import says).
                self.finish_import()?;
            }
            match (st, h.kind) {
                (RecvState::AwaitHello, FrameKind::Hello) => self.on_hello(t, &h, accept)?,
                (RecvState::Precopy { round }, FrameKind::Pages) if self.streams == 0 => self.on_pages(t, &h, round)?,
                (RecvState::Precopy { round }, FrameKind::EndOfRound) => {
                    let p = self.small(t, &h)?;
                    let payload::EndOfRound { round: r, pages } =
                        payload::EndOfRound::decode(&p).map_err(|e| self.perr(e))?;
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
                    let reason = payload::Abort::decode(&p)
                        .map(|a| a.reason)
                        .unwrap_or_else(|e| format!("(unreadable reason: {e})"));
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
        let hello = payload::Hello::decode(&p).map_err(|e| self.perr(e))?;
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
                let launch = kvm_hooks::mh::Launch {
                    key: c.key.0,
                    vm_id: hello.vm_id,
                    spin: c.mh_spin,
                    zero_records: c.zero_records,
                    // As many lanes as the source's MH: each blob is bound to the count.
                    lanes: hello.mh_lanes,
                };
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
            // (docs/performance.md, "Confidential migration: the Migration Handler's import").
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
                // Confidential: each lane of the source MH binds its blobs to the challenge of
                // the same lane here.
                let challenges = match m.confidential().map(|c| c.mh()).as_ref().and_then(|g| g.as_ref()) {
                    Some(h) => h.challenges().map_err(|source| RecvError::Mh { state: self.state, source })?,
                    None => Vec::new(),
                };
                self.machine = Some(m);
                let ack = payload::HelloAck::encode(payload::HelloAck::ACCEPTED, &challenges, "accepted");
                t.send_frame(FrameKind::HelloAck, &[Part::Buf(&ack)], None).map_err(|e| self.terr(e))?;
                self.join_streams(hello.streams, hello.session, ram, accept)?;
                // Every connection of the session is in: any later one may be a query.
                self.handover.open(hello.session);
                self.state = RecvState::Precopy { round: 0 };
                Ok(())
            }
            Err(reason) => {
                let _ = t.send_frame(
                    FrameKind::HelloAck,
                    &[Part::Buf(&payload::HelloAck::encode(payload::HelloAck::REFUSED, &[], &reason))],
                    None,
                );
                Err(RecvError::Refused(reason))
            }
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
        let payload::State { index: i, bytes: blob } = payload::State::decode(&p).map_err(|e| self.perr(e))?;
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
        let payload::Complete { rounds, sections, pages_sent } =
            payload::Complete::decode(&p).map_err(|e| self.perr(e))?;
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
        let ack = payload::Resumed { capture_us: capture_time.as_micros() as u64 }.encode();
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
        let mut r = Receiver::new(crate::app::config::Config::default().recv_options(false), no_vms());
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
        let mut o = crate::app::config::Config::default().recv_options(false);
        o.check_host_memory = true;
        let fresh = Receiver::new(o.clone(), crate::fake_vm::FakeVms { has_ram: false });
        assert!(fresh.host_memory_short(huge).is_some());
        let existing = Receiver::new(o, crate::fake_vm::FakeVms { has_ram: true });
        assert_eq!(existing.host_memory_short(huge), None);
    }

    #[test]
    fn prepare_checks_limits() {
        let mut o = crate::app::config::Config::default().recv_options(false);
        o.max_ram = 64 << 20;
        let mut r = Receiver::new(o, no_vms());
        let e = r.prepare(128 << 20).unwrap_err().to_string();
        assert!(e.contains("prepare") && e.contains("limit"), "{e}");
        let e = r.prepare(3 << 20).unwrap_err().to_string();
        assert!(e.contains("prepare") && e.contains("3145728"), "{e}");
        assert!(r.prepared.is_none());
    }
}
