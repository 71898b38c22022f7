//! The confidential import: blobs from the source's Migration Handler go to the
//! destination's, which checks and decrypts them inside the guest; the page-state record
//! and the vCPU state that arrives in the VMSA pages.
use super::*;
use kvm_hooks::mh::{MhError, MhHost};

/// A page import the destination MH works on: its slots and its pages.
#[derive(Debug)]
pub(super) struct Importing {
    base: u32,
    count: u32,
    gfns: Vec<u64>,
}

/// Run `f` on the destination MH's host end, locked; its errors become the receiver's.
fn with_mh<V: Incoming, T>(
    machine: &Option<V>,
    state: RecvState,
    f: impl FnOnce(&mut MhHost) -> Result<T, MhError>,
) -> Result<T, RecvError> {
    let mut g = machine.as_ref().and_then(|m| m.confidential()).map(|c| c.mh());
    let mh = g
        .as_mut()
        .and_then(|g| g.as_mut())
        .ok_or_else(|| RecvError::Incomplete { state, msg: "no Migration Handler runs here".into() })?;
    f(mh).map_err(|source| RecvError::Mh { state, source })
}

impl<F: VmFactory> Receiver<F> {
    /// MH blobs, imported in order through the destination MH. Pages count toward the
    /// round once their import checked out (for a frame imported while the next arrives,
    /// when that frame or any other is handled); Cpu blobs move the receiver to States.
    pub(super) fn on_blobs(&mut self, t: &mut dyn Transport, h: &Header, round: Option<u32>) -> Result<(), RecvError> {
        // One reused buffer per receiver (up to ~1 MiB): the ciphertext is then copied once,
        // from it into the MH's slots.
        let mut p = std::mem::take(&mut self.blob_buf);
        p.resize(h.len as usize, 0);
        t.recv_exact(&mut p).map_err(|e| self.terr(e))?;
        let r = self.import_blobs(&p, round);
        self.blob_buf = p;
        r
    }

    pub(super) fn import_blobs(&mut self, p: &[u8], round: Option<u32>) -> Result<(), RecvError> {
        let st = self.state;
        let m = self.machine.as_ref().ok_or_else(|| self.incomplete("blobs before a VM exists".into()))?;
        let payload::Blobs { round: frame_round, blobs } =
            payload::Blobs::decode(p, m.ram().pages()).map_err(|e| self.perr(e))?;
        let kinds: Vec<Kind> = blobs.iter().map(|b| Kind::from_u32(b.desc.kind)).collect();
        let pages = kinds.iter().filter(|k| k.is_page()).count();
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
                Kind::Page | Kind::Zero => match reqs.last_mut() {
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
                // A marker's gfn names its MH lane (the lane checks it is its own).
                Kind::Begin | Kind::End => {
                    reqs.push(Request { op: Op::Marker as u16, id: 0, count: 1, slot, gfn, round: 0 })
                }
                Kind::Invalid => unreachable!("Blobs::decode refuses unknown kinds"),
            }
        }
        // A frame of pages only is imported while the next frame is received, into the half
        // of the data slots (and of the ring) the import in flight does not use; anything
        // else waits for it.
        let n = blobs.len() as u32;
        let half = mh_abi::NSLOTS / 2;
        // Split between the MH's lanes, the frame's requests must also find room beside the
        // import in flight.
        let overlap = pages == blobs.len()
            && n <= half
            && reqs.len() <= mh_abi::RING_ENTRIES as usize / 2
            && with_mh(&self.machine, st, |mh| mh.fits(&reqs))?;
        let base = match &self.importing {
            Some(i) if overlap && i.base + i.count <= half => half,
            Some(i) if overlap && i.base >= half => 0,
            Some(_) => {
                self.finish_import()?;
                0
            }
            None => 0,
        };
        for r in &mut reqs {
            r.slot += base;
        }
        let gfns: Vec<u64> = blobs.iter().zip(&kinds).filter(|(_, k)| k.is_page()).map(|(b, _)| b.desc.gfn).collect();
        let importing = &mut self.importing;
        let (previous, now) = with_mh(&self.machine, st, |mh| {
            for (i, b) in blobs.iter().enumerate() {
                mh.write_slot_parts(base + i as u32, &b.desc, b.data)?;
            }
            if !overlap {
                mh.run(&reqs)?;
                return Ok((None, gfns));
            }
            mh.start(&reqs)?;
            // This frame is in flight from here on, whatever the previous one's verdict.
            let prev = importing.replace(Importing { base, count: n, gfns });
            if prev.is_some() {
                // The previous frame's import is done once at most this frame's requests
                // are in flight (each MH lane serves its ring in order).
                MhHost::check(&mh.wait_until(1)?)?;
            }
            Ok((prev, Vec::new()))
        })?;
        if let Some(prev) = previous {
            self.imported(&prev.gfns);
        }
        self.imported(&now);
        if cpu > 0 {
            self.state = RecvState::States;
        }
        // The MH imported everything up to lane 0's End marker, the last (`run` waits for
        // it): RAM is final, so a snapshot taken here costs the handover nothing.
        if blobs.iter().any(|b| Kind::from_u32(b.desc.kind) == Kind::End && b.desc.gfn == 0) {
            self.capture_now();
        }
        Ok(())
    }

    /// Wait for the page import in flight, if any, and count its pages.
    pub(super) fn finish_import(&mut self) -> Result<(), RecvError> {
        let Some(cur) = self.importing.take() else { return Ok(()) };
        with_mh(&self.machine, self.state, |mh| MhHost::check(&mh.wait_all()?))?;
        self.imported(&cur.gfns);
        Ok(())
    }

    /// After a failed receive: whatever the destination MH still has in flight no longer
    /// matters (the VM never resumes), whether a frame's import the receiver was waiting
    /// for or one it had just submitted when the previous one failed; its completions are
    /// dropped, so whoever uses the MH next (a reset) sees only its own.
    pub(super) fn abandon_import(&mut self) {
        self.importing = None;
        // A VM without an MH has nothing to abandon.
        let _ = with_mh(&self.machine, self.state, |mh| {
            mh.abandon();
            Ok(())
        });
    }

    /// Pages the destination MH imported: received, and counted toward the round.
    fn imported(&mut self, gfns: &[u64]) {
        if gfns.is_empty() {
            return;
        }
        let mut rec = self.shared.received.lock().unwrap_or_else(|e| e.into_inner());
        for &g in gfns {
            rec.insert(g);
        }
        drop(rec);
        self.round_pages += gfns.len() as u64;
        self.total_pages += gfns.len() as u64;
    }

    /// Confidential: the machine state the destination MH decrypted into the VMSA pages,
    /// `sections` of it.
    pub(super) fn states_from_vmsa(&self, m: &F::Vm, sections: u32) -> Result<MachineState, RecvError> {
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
    pub(super) fn on_page_states(&mut self, t: &mut dyn Transport, h: &Header) -> Result<(), RecvError> {
        let p = self.small(t, h)?;
        let payload::PageStates { ranges, last } = payload::PageStates::decode(&p).map_err(|e| self.perr(e))?;
        if self.states_done {
            return Err(self.incomplete("page states after the last PageStates frame".into()));
        }
        let m = self.machine.as_ref().ok_or_else(|| self.incomplete("page states before a VM exists".into()))?;
        let pages = m.ram().pages();
        let region = mh_abi::REGION_GFNS;
        for &(g, n) in &ranges {
            let end = g + n; // PageStates::decode checked the sum
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
}
