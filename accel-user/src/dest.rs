//! The receiving side: an explicit state machine.
//!
//! ```text
//! AwaitHello --Hello(ok)--> Precopy{round} --Pages(round)--> Precopy{round}
//!                                        --EndOfRound(round)--> Precopy{round+1}
//!                                        --VcpuState--> States --VcpuState--> States
//!                                                              --Complete(verified)--> Resumed
//! any state --Abort / bad frame / EOF / timeout--> Failed (the VM is never resumed)
//! ```
//! Every length and gfn from the peer is checked against caps and guest RAM before any
//! allocation or write. The VM resumes only if every page arrived, each round's page count
//! matches the source's, and every vCPU's state decoded and restored.
use std::time::{Duration, Instant};

use kvm_hooks::dirty::DirtySet;
use kvm_hooks::memory::PAGE_SIZE;
use kvm_hooks::state::VcpuState;
use kvm_hooks::vm::DirtyPreference;
use kvm_hooks::vmm::{GuestSpec, Machine};

use crate::protocol::{self, FrameKind, Header, ProtocolError, MAX_RUNS};
use crate::transport::{Part, Transport, TransportError};

/// Receiver limits and behaviour.
#[derive(Debug, Clone)]
pub struct RecvOptions {
    /// Largest VM accepted.
    pub max_ram: u64,
    pub max_vcpus: u32,
    /// Dirty tracking for the destination VM (so it can migrate on later).
    pub dirty: DirtyPreference,
    /// Snapshot guest RAM just before resuming (verification, `--dump-memory`). The time it
    /// takes is reported to the source and excluded from downtime.
    pub capture: bool,
    /// How long to wait for the next frame.
    pub io_timeout: Duration,
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
            RecvState::States => write!(f, "vCPU state transfer"),
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
    #[error("receive failed in {state}: source aborted: {reason}")]
    SourceAborted { state: RecvState, reason: String },
    #[error("receive failed in {state}: {msg}")]
    Incomplete { state: RecvState, msg: String },
    #[error("receive failed in {state}: KVM: {source}")]
    Kvm {
        state: RecvState,
        #[source]
        source: kvm_hooks::Error,
    },
}

/// What a successful receive leaves behind.
#[derive(Debug)]
pub struct Received {
    pub spec: GuestSpec,
    pub rounds: u32,
    pub pages: u64,
    pub bytes: u64,
    /// Guest RAM just before resume, when `capture` was on.
    pub snapshot: Option<Vec<u8>>,
    pub capture_time: Duration,
    pub total_time: Duration,
}

pub struct Receiver {
    o: RecvOptions,
    state: RecvState,
    machine: Option<Machine>,
    received: DirtySet,
    round_pages: u64,
    total_pages: u64,
    bytes: u64,
    states: Vec<Option<VcpuState>>,
}

impl Receiver {
    pub fn new(o: RecvOptions) -> Self {
        Receiver {
            o,
            state: RecvState::AwaitHello,
            machine: None,
            received: DirtySet::default(),
            round_pages: 0,
            total_pages: 0,
            bytes: 0,
            states: Vec::new(),
        }
    }

    pub fn state(&self) -> RecvState {
        self.state
    }
    /// The destination VM (running after success; created but never resumed after failure).
    pub fn machine(&self) -> Option<&Machine> {
        self.machine.as_ref()
    }
    pub fn into_machine(self) -> Option<Machine> {
        self.machine
    }

    /// Drive one incoming migration to the end.
    pub fn run(&mut self, t: &mut dyn Transport) -> Result<Received, RecvError> {
        let t0 = Instant::now();
        t.set_recv_timeout(self.o.io_timeout);
        let r = self.drive(t, t0);
        if let Err(e) = &r {
            tracing::warn!("{e}");
            if !matches!(e, RecvError::SourceAborted { .. } | RecvError::Transport { .. }) {
                let _ = t.send_frame(FrameKind::Abort, &[Part::Buf(&protocol::encode_abort(&e.to_string()))], None);
            }
            t.shutdown();
            self.state = RecvState::Failed;
        }
        r
    }

    fn drive(&mut self, t: &mut dyn Transport, t0: Instant) -> Result<Received, RecvError> {
        loop {
            let st = self.state;
            let h = t.recv_header().map_err(|e| self.terr(e))?;
            self.bytes += protocol::HEADER_LEN as u64 + u64::from(h.len);
            match (st, h.kind) {
                (RecvState::AwaitHello, FrameKind::Hello) => self.on_hello(t, &h)?,
                (RecvState::Precopy { round }, FrameKind::Pages) => self.on_pages(t, &h, round)?,
                (RecvState::Precopy { round }, FrameKind::EndOfRound) => {
                    let p = self.small(t, &h)?;
                    let (r, pages) = protocol::decode_end_of_round(&p).map_err(|e| self.perr(e))?;
                    if r != round {
                        return Err(self.incomplete(format!("end of round {r} while in round {round}")));
                    }
                    if pages != self.round_pages {
                        return Err(self.incomplete(format!("source sent {pages} pages in round {r}, {} arrived", self.round_pages)));
                    }
                    self.round_pages = 0;
                    self.state = RecvState::Precopy { round: round + 1 };
                }
                (RecvState::Precopy { round }, FrameKind::VcpuState) if round > 0 => {
                    self.state = RecvState::States;
                    self.on_state(t, &h)?;
                }
                (RecvState::States, FrameKind::VcpuState) => self.on_state(t, &h)?,
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
    fn small(&self, t: &mut dyn Transport, h: &Header) -> Result<Vec<u8>, RecvError> {
        debug_assert!(h.kind != FrameKind::Pages);
        let mut p = vec![0u8; h.len as usize];
        t.recv_exact(&mut p).map_err(|e| self.terr(e))?;
        Ok(p)
    }

    fn on_hello(&mut self, t: &mut dyn Transport, h: &Header) -> Result<(), RecvError> {
        let p = self.small(t, h)?;
        let spec = protocol::decode_hello(&p).map_err(|e| self.perr(e))?;
        let refuse = if spec.ram_bytes > self.o.max_ram {
            Some(format!("guest RAM {} bytes exceeds this receiver's limit of {} bytes", spec.ram_bytes, self.o.max_ram))
        } else if spec.vcpus > self.o.max_vcpus {
            Some(format!("{} vCPUs exceeds this receiver's limit of {}", spec.vcpus, self.o.max_vcpus))
        } else {
            spec.validate().err().map(|e| format!("invalid VM shape: {e}"))
        };
        let machine = match refuse {
            Some(r) => Err(r),
            None => Machine::destination(spec, self.o.dirty).map_err(|e| format!("cannot create the VM here: {e}")),
        };
        match machine {
            Ok(m) => {
                self.received = DirtySet::new(m.ram().pages());
                self.states = vec![None; spec.vcpus as usize];
                self.machine = Some(m);
                t.send_frame(FrameKind::HelloAck, &[Part::Buf(&protocol::encode_status(0, "accepted"))], None)
                    .map_err(|e| self.terr(e))?;
                self.state = RecvState::Precopy { round: 0 };
                Ok(())
            }
            Err(reason) => {
                let _ = t.send_frame(FrameKind::HelloAck, &[Part::Buf(&protocol::encode_status(1, &reason))], None);
                Err(RecvError::Refused(reason))
            }
        }
    }

    fn on_pages(&mut self, t: &mut dyn Transport, h: &Header, round: u32) -> Result<(), RecvError> {
        let m = self.machine.as_ref().ok_or_else(|| self.incomplete("pages before a VM exists".into()))?;
        let ram = m.ram().clone();
        let k = FrameKind::Pages;
        let mut pre = [0u8; 8];
        if h.len < 8 {
            return Err(self.perr(ProtocolError::Payload { kind: k, msg: format!("{} bytes is shorter than the 8-byte prefix", h.len) }));
        }
        t.recv_exact(&mut pre).map_err(|e| self.terr(e))?;
        let r = u32::from_le_bytes(pre[0..4].try_into().expect("4"));
        let nruns = u32::from_le_bytes(pre[4..8].try_into().expect("4"));
        if r != round {
            return Err(self.incomplete(format!("pages for round {r} arrived in round {round}")));
        }
        if nruns == 0 || nruns > MAX_RUNS {
            return Err(self.perr(ProtocolError::Payload { kind: k, msg: format!("{nruns} runs (must be 1..={MAX_RUNS})") }));
        }
        let table_len = 16 * nruns as usize;
        if (h.len as usize) < 8 + table_len {
            return Err(self.perr(ProtocolError::Payload { kind: k, msg: format!("{nruns} runs do not fit in {} bytes", h.len) }));
        }
        let mut table = vec![0u8; table_len]; // at most 64 KiB (MAX_RUNS)
        t.recv_exact(&mut table).map_err(|e| self.terr(e))?;
        let runs = protocol::decode_runs(&table);
        let data_len = u64::from(h.len) - 8 - table_len as u64;
        protocol::check_runs(&runs, ram.pages(), data_len).map_err(|e| self.perr(e))?;
        for run in &runs {
            let gpa = run.gfn * PAGE_SIZE;
            let len = u64::from(run.npages) * PAGE_SIZE;
            if run.is_zero() {
                // Fresh guest RAM is already zero (a new memfd): only pages that an earlier
                // round filled need clearing. Touching the rest would allocate them.
                let end = run.gfn + u64::from(run.npages);
                let mut g = run.gfn;
                while g < end {
                    if !self.received.contains(g) {
                        g += 1;
                        continue;
                    }
                    let start = g;
                    while g < end && self.received.contains(g) {
                        g += 1;
                    }
                    ram.zero(start * PAGE_SIZE, (g - start) * PAGE_SIZE).map_err(|e| self.incomplete(e.to_string()))?;
                }
                let _ = (gpa, len);
            } else {
                t.recv_into_guest(&ram, gpa, len).map_err(|e| self.terr(e))?;
            }
            for g in run.gfn..run.gfn + u64::from(run.npages) {
                self.received.insert(g);
            }
            self.round_pages += u64::from(run.npages);
            self.total_pages += u64::from(run.npages);
        }
        Ok(())
    }

    fn on_state(&mut self, t: &mut dyn Transport, h: &Header) -> Result<(), RecvError> {
        let p = self.small(t, h)?;
        let (i, blob) = protocol::decode_vcpu_state(&p).map_err(|e| self.perr(e))?;
        let n = self.states.len();
        let slot = self.states.get_mut(i as usize).ok_or_else(|| RecvError::Incomplete {
            state: RecvState::States,
            msg: format!("state for vCPU {i}, VM has {n}"),
        })?;
        if slot.is_some() {
            return Err(self.incomplete(format!("state for vCPU {i} sent twice")));
        }
        let s = VcpuState::decode(blob).map_err(|e| RecvError::Kvm { state: RecvState::States, source: e })?;
        *slot = Some(s);
        Ok(())
    }

    fn on_complete(&mut self, t: &mut dyn Transport, h: &Header, t0: Instant) -> Result<Received, RecvError> {
        let p = self.small(t, h)?;
        let (rounds, vcpus, pages_sent) = protocol::decode_complete(&p).map_err(|e| self.perr(e))?;
        let m = self.machine.as_ref().ok_or_else(|| self.incomplete("complete before a VM exists".into()))?;
        let total = m.ram().pages();
        if self.received.len() != total {
            return Err(self.incomplete(format!("only {} of {total} pages ever arrived", self.received.len())));
        }
        if pages_sent != self.total_pages {
            return Err(self.incomplete(format!("source sent {pages_sent} pages, {} arrived", self.total_pages)));
        }
        if vcpus as usize != self.states.len() {
            return Err(self.incomplete(format!("source has {vcpus} vCPUs, VM has {}", self.states.len())));
        }
        let states: Vec<VcpuState> = match self.states.iter().cloned().collect::<Option<Vec<_>>>() {
            Some(s) => s,
            None => {
                let missing = self.states.iter().position(Option::is_none).unwrap_or(0);
                return Err(self.incomplete(format!("no state for vCPU {missing}")));
            }
        };
        let kvm = |source| RecvError::Kvm { state: RecvState::States, source };
        m.restore_states(&states).map_err(kvm)?;
        let c0 = Instant::now();
        let snapshot = self.o.capture.then(|| m.ram().snapshot());
        let capture_time = c0.elapsed();
        m.resume().map_err(kvm)?;
        self.state = RecvState::Resumed;
        let ack = protocol::encode_resumed(capture_time.as_micros() as u64);
        if let Err(e) = t.send_frame(FrameKind::Resumed, &[Part::Buf(&ack)], None) {
            // The VM runs here now; the source learns of it by timeout and must not resume.
            tracing::error!("VM resumed but the acknowledgement could not be sent: {e}");
        }
        Ok(Received {
            spec: *m.spec(),
            rounds,
            pages: self.total_pages,
            bytes: self.bytes,
            snapshot,
            capture_time,
            total_time: t0.elapsed(),
        })
    }
}
