//! Data streams on the sending side: one worker thread per TCP stream, fed page batches
//! by the engine in round-robin. Each stream carries its own EndOfRound marker after the
//! round's batches, so the receiver can order rounds across streams.
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam::channel::{bounded, Receiver, RecvTimeoutError, Sender};
use kvm_hooks::memory::{GuestRam, PAGE_SIZE};
use kvm_hooks::uring::ZcStats;

use crate::wire::frame::FrameKind;
use crate::wire::payload::{self, Run};
use crate::wire::transport::{Part, Transport, TransportError};

enum Job {
    Pages { round: u32, runs: Vec<Run> },
    End { round: u32 },
    Flush,
}

/// What a stream reports when flushed.
#[derive(Debug, Clone, Default)]
pub struct StreamReport {
    pub bytes: u64,
    pub zc: Option<ZcStats>,
    /// The transport's mode as it stands (auto may have switched).
    pub describe: String,
}

pub struct DataStreams {
    txs: Vec<Sender<Job>>,
    results: Receiver<(usize, Result<StreamReport, TransportError>)>,
    handles: Vec<JoinHandle<()>>,
    next: usize,
    timeout: Duration,
    pub last: Vec<StreamReport>,
    describe: String,
}

impl DataStreams {
    /// Start one worker per transport (already joined to the session).
    pub fn start(streams: Vec<Box<dyn Transport>>, ram: Arc<GuestRam>, timeout: Duration) -> DataStreams {
        let (rtx, results) = bounded(streams.len() * 4);
        let describe = streams.first().map(|t| t.describe()).unwrap_or_default();
        let mut txs = Vec::new();
        let mut handles = Vec::new();
        for (i, t) in streams.into_iter().enumerate() {
            let (tx, rx) = bounded::<Job>(4);
            let (rtx, ram) = (rtx.clone(), ram.clone());
            handles.push(
                std::thread::Builder::new()
                    .name(format!("stream{i}"))
                    .spawn(move || worker(i, t, rx, rtx, ram))
                    .expect("spawn stream worker"),
            );
            txs.push(tx);
        }
        let n = txs.len();
        DataStreams { txs, results, handles, next: 0, timeout, last: vec![StreamReport::default(); n], describe }
    }

    pub fn len(&self) -> usize {
        self.txs.len()
    }
    pub fn is_empty(&self) -> bool {
        self.txs.is_empty()
    }
    pub fn describe(&self) -> &str {
        match self.last.first() {
            Some(r) if !r.describe.is_empty() => &r.describe,
            _ => &self.describe,
        }
    }

    fn push(&mut self, i: usize, job: Job) -> Result<(), TransportError> {
        if self.txs[i].send(job).is_err() {
            // The worker stopped: it reported why.
            return Err(self.worker_error(i));
        }
        Ok(())
    }

    fn worker_error(&self, i: usize) -> TransportError {
        while let Ok((_, r)) = self.results.recv_timeout(Duration::from_millis(200)) {
            if let Err(e) = r {
                return e;
            }
        }
        TransportError::Guest(format!("data stream {i} stopped"))
    }

    /// Queue a batch on the next stream.
    pub fn send_pages(&mut self, round: u32, runs: Vec<Run>) -> Result<(), TransportError> {
        let i = self.next;
        self.next = (self.next + 1) % self.txs.len();
        self.push(i, Job::Pages { round, runs })
    }

    /// Close round `round` on every stream and wait until each has sent everything and the
    /// kernel released every zero-copy buffer. The wait has no deadline of its own: every
    /// send and flush of a worker is bounded by the I/O timeout (a stalled peer fails the
    /// worker, which reports why), so a slow round that keeps moving is never cut short.
    pub fn end_round(&mut self, round: u32) -> Result<(), TransportError> {
        for i in 0..self.txs.len() {
            self.push(i, Job::End { round })?;
            self.push(i, Job::Flush)?;
        }
        let mut left = self.txs.len();
        while left > 0 {
            match self.results.recv_timeout(self.timeout) {
                Ok((i, Ok(r))) => {
                    self.last[i] = r;
                    left -= 1;
                }
                Ok((_, Err(e))) => return Err(e),
                Err(RecvTimeoutError::Timeout) => {
                    if let Some(i) = self.handles.iter().position(|h| h.is_finished()) {
                        return Err(self.worker_error(i));
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return Err(TransportError::Closed),
            }
        }
        Ok(())
    }

    pub fn bytes(&self) -> u64 {
        self.last.iter().map(|r| r.bytes).sum()
    }

    pub fn zc(&self) -> Option<ZcStats> {
        let mut any = false;
        let mut t = ZcStats::default();
        for z in self.last.iter().filter_map(|r| r.zc) {
            any = true;
            t.sends += z.sends;
            t.notifs += z.notifs;
            t.zerocopy += z.zerocopy;
            t.copied += z.copied;
        }
        any.then_some(t)
    }
}

impl Drop for DataStreams {
    fn drop(&mut self) {
        self.txs.clear(); // workers see the channel close and exit, closing their sockets
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

fn worker(
    i: usize,
    mut t: Box<dyn Transport>,
    rx: Receiver<Job>,
    out: Sender<(usize, Result<StreamReport, TransportError>)>,
    ram: Arc<GuestRam>,
) {
    let mut meta = Vec::with_capacity(64 << 10);
    let mut pages = 0u64;
    let report = |t: &dyn Transport| StreamReport { bytes: t.bytes_sent(), zc: t.zc_stats(), describe: t.describe() };
    for job in rx {
        let r = match job {
            Job::Pages { round, runs } => {
                payload::PagesHead::encode(round, &runs, &mut meta);
                let mut parts = Vec::with_capacity(runs.len() + 1);
                parts.push(Part::Buf(&meta));
                for r in runs.iter().filter(|r| !r.is_zero()) {
                    parts.push(Part::Guest { gpa: r.gfn * PAGE_SIZE, len: r.data_bytes() });
                }
                pages += runs.iter().map(|r| u64::from(r.npages)).sum::<u64>();
                t.send_frame(FrameKind::Pages, &parts, Some(&ram))
            }
            Job::End { round } => {
                let r = t.send_frame(
                    FrameKind::EndOfRound,
                    &[Part::Buf(&payload::EndOfRound { round, pages }.encode())],
                    None,
                );
                pages = 0;
                r
            }
            Job::Flush => t.flush().map(|()| {
                let _ = out.send((i, Ok(report(&*t))));
            }),
        };
        if let Err(e) = r {
            t.shutdown();
            let _ = out.send((i, Err(e)));
            return;
        }
    }
    t.shutdown();
}
