//! The data streams: each one read by a worker thread that writes pages straight into
//! guest RAM, rounds kept in order across streams; the control thread joins them and
//! judges their silence.
use super::*;

/// State shared by the control thread and the data-stream workers.
pub(super) struct Shared {
    pub(super) received: Mutex<DirtySet>,
    /// Per data stream: rounds it has completed (EndOfRound seen). In confidential mode one
    /// more entry, last, is the control stream's (its blobs of the round are imported), so
    /// a page's shared copy of round n+1 never lands before its private copy of round n.
    pub(super) completed: Mutex<Vec<u32>>,
    pub(super) cv: Condvar,
    /// Pages that arrived per round over all data streams.
    pub(super) round_pages: Mutex<HashMap<u32, u64>>,
    pub(super) total_pages: AtomicU64,
    pub(super) error: Mutex<Option<String>>,
    pub(super) stop: AtomicBool,
    /// Shut these down to unblock every reader after an error.
    pub(super) sockets: Mutex<Vec<TcpStream>>,
    /// When any stream last received a frame (nanoseconds after `epoch`): the source is
    /// silent only when all of its streams are.
    pub(super) epoch: Instant,
    pub(super) activity: AtomicU64,
    /// Set when the receive is over (either way): the deadline watchdog stops.
    pub(super) finished: Mutex<bool>,
    pub(super) finished_cv: Condvar,
}

impl Shared {
    /// Record the first error and unblock every reader. The control socket (index 0) is
    /// only shut for reading, so the control thread can still send Abort with the reason.
    pub(super) fn fail(&self, msg: String) {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(msg);
        self.cv.notify_all();
        for (i, s) in self.sockets.lock().unwrap_or_else(|e| e.into_inner()).iter().enumerate() {
            let _ = s.shutdown(if i == 0 { std::net::Shutdown::Read } else { std::net::Shutdown::Both });
        }
    }
    pub(super) fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    /// Fail the receive with `msg` unless it finished within `limit` of now, and with the
    /// cancel's reason once `cancel` is set, unless the VM runs here already (the handover
    /// then decides: a VM that runs is never discarded).
    pub(super) fn watch(&self, limit: Duration, msg: String, cancel: &crate::cancel::Cancel, handover: &Handover) {
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
    pub(super) fn finish(&self) {
        *self.finished.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.finished_cv.notify_all();
    }
    /// The source was heard from just now.
    pub(super) fn touch(&self) {
        self.activity.store(self.epoch.elapsed().as_nanos() as u64, Ordering::Release);
    }
    /// How long no stream of this migration has received a frame.
    pub(super) fn silent_for(&self) -> Duration {
        self.epoch.elapsed().saturating_sub(Duration::from_nanos(self.activity.load(Ordering::Acquire)))
    }
    /// Wait until the next frame starts arriving on `t`. Fails only when the whole source
    /// has been silent for `timeout`: a data stream idles while a round's pages all go
    /// through the Migration Handler, the control stream while data streams carry pages, and
    /// neither is a dead peer.
    pub(super) fn await_frame(&self, t: &dyn Transport, timeout: Duration) -> Result<(), TransportError> {
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
    pub(super) fn wait_rounds(&self, rounds: u32, n: Option<usize>, timeout: Duration) -> Result<(), String> {
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
pub(super) enum PageError {
    Transport(TransportError),
    Protocol(ProtocolError),
    Order(String),
}

/// Receive one Pages frame of round `round` (header already read) into `ram`, validating
/// the run table before any data is read. Returns the runs received.
pub(super) fn recv_pages(
    t: &mut dyn Transport,
    h: &Header,
    round: u32,
    ram: &GuestRam,
    received: &Mutex<DirtySet>,
) -> Result<u64, PageError> {
    PagesHead::check_len(h.len).map_err(PageError::Protocol)?;
    let mut pre = [0u8; PagesHead::PREFIX];
    t.recv_exact(&mut pre).map_err(PageError::Transport)?;
    let head = PagesHead::decode(&pre, h.len).map_err(PageError::Protocol)?;
    if head.round != round {
        return Err(PageError::Order(format!("pages for round {} arrived in round {round}", head.round)));
    }
    let mut table = vec![0u8; head.table_len()]; // at most 64 KiB (MAX_RUNS)
    t.recv_exact(&mut table).map_err(PageError::Transport)?;
    let runs = head.runs(&table, ram.pages()).map_err(PageError::Protocol)?;
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
pub(super) fn data_worker(i: usize, mut t: Box<dyn Transport>, sh: Arc<Shared>, ram: Arc<GuestRam>, timeout: Duration) {
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
                match payload::EndOfRound::decode(&p) {
                    Ok(payload::EndOfRound { round: r, pages: n }) if r == round && n == pages => {
                        *sh.round_pages.lock().unwrap_or_else(|e| e.into_inner()).entry(r).or_default() += n;
                        sh.total_pages.fetch_add(n, Ordering::AcqRel);
                        sh.completed.lock().unwrap_or_else(|e| e.into_inner())[i] = r + 1;
                        sh.cv.notify_all();
                        round += 1;
                        pages = 0;
                    }
                    Ok(payload::EndOfRound { round: r, pages: n }) => {
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

impl<F: VmFactory> Receiver<F> {
    /// Accept the source's data streams; each must first say Join with this migration's session id.
    pub(super) fn join_streams(
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
    pub(super) fn read_join(
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
        let payload::Join { session: s, stream: i } = payload::Join::decode(&p).map_err(|e| e.to_string())?;
        if s != session {
            return Err(format!("joined session {s:#x}, this is {session:#x}"));
        }
        match slots.get(i as usize) {
            None => Err(format!("joined as data stream {i} of {}", slots.len())),
            Some(Some(_)) => Err(format!("joined as data stream {i}, which has joined already")),
            Some(None) => Ok(i as usize),
        }
    }

    /// Every round is over: stop the data-stream workers (their silence from now on is not
    /// the source's).
    pub(super) fn end_data_streams(&mut self) {
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
}
