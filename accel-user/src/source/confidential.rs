//! The confidential path: private pages and vCPU state leave the guest only as blobs the
//! source Migration Handler encrypted; the host moves them without reading them.
use super::*;

/// Export requests for `gfns` (ascending) into slots from `base` on: one per run.
fn export_requests(gfns: &[u64], base: u32, round: u32) -> Vec<Request> {
    let mut reqs: Vec<Request> = Vec::new();
    for (i, &gfn) in gfns.iter().enumerate() {
        match reqs.last_mut() {
            Some(r) if r.gfn + u64::from(r.count) == gfn => r.count += 1,
            _ => reqs.push(Request { op: Op::Export as u16, id: 0, count: 1, slot: base + i as u32, gfn, round }),
        }
    }
    reqs
}

/// Encrypt `gfns` (ascending) through the source MH, `mh_batch` pages per doorbell, and
/// send the blobs on the control stream. Pipelined: batch n+1 is exported into one half of
/// the data slots while batch n is copied out of the other and sent.
pub(super) fn send_private(c: &mut Ctx<'_>, round: u32, gfns: &[u64], st: &mut RoundStats) -> Result<(), PathError> {
    let r = send_batches(c, round, gfns, st);
    if let (Err(_), Some(mh)) = (&r, c.mh.as_mut()) {
        // An export may still be in flight: what it yields no longer matters, and must not
        // be taken for the outcome of whatever runs next (a retry's Begin).
        mh.abandon();
    }
    r
}

fn send_batches(c: &mut Ctx<'_>, round: u32, gfns: &[u64], st: &mut RoundStats) -> Result<(), PathError> {
    let cs = c.o.confidential.unwrap_or(ConfidentialSend { mh_batch: abi::NSLOTS / 2, pipeline: true });
    let half = abi::NSLOTS / 2;
    let batch = cs.mh_batch.clamp(1, if cs.pipeline { half } else { abi::NSLOTS }) as usize;
    // The export in flight: its first slot and its pages.
    let mut pending: Option<(u32, &[u64])> = None;
    for (i, chunk) in gfns.chunks(batch).enumerate() {
        gate(c, 0)?;
        let base = if cs.pipeline && i % 2 == 1 { half } else { 0 };
        let reqs = export_requests(chunk, base, round);
        // Two batches in flight share the rings too: a batch of many short runs, or one
        // whose share of a lane's ring is not free yet, goes alone.
        let fits = |c: &Ctx<'_>| c.mh.as_ref().map_or(Ok(false), |mh| mh.fits(&reqs));
        if !cs.pipeline || reqs.len() > abi::RING_ENTRIES as usize / 2 || !fits(c)? {
            finish_export(c, round, pending.take(), 0, st)?;
            let sent = export_and_send(c, round, base, &reqs, chunk.iter().map(|&g| (Kind::Page, g)))?;
            account(c, st, sent)?;
            continue;
        }
        c.mh.as_mut().ok_or_else(|| PathError::Other("no Migration Handler".into()))?.start(&reqs)?;
        // Each MH lane serves its ring in order: the previous batch is done once at most
        // this batch's requests are in flight.
        finish_export(c, round, pending.replace((base, chunk)), 1, st)?;
    }
    finish_export(c, round, pending, 0, st)
}

/// Count a sent Blobs frame into the round and pace by the bytes it really took (a zero
/// record is 40 of them).
fn account(c: &mut Ctx<'_>, st: &mut RoundStats, sent: BlobsSent) -> Result<(), PathError> {
    st.add_blobs(sent);
    gate(c, sent.bytes)
}

/// Wait for the export `pending` (its first slot and pages), if any, while the newest
/// `keep` submissions (those after it) may stay in flight, then send its blobs.
fn finish_export(
    c: &mut Ctx<'_>,
    round: u32,
    pending: Option<(u32, &[u64])>,
    keep: usize,
    st: &mut RoundStats,
) -> Result<(), PathError> {
    let Some((base, gfns)) = pending else { return Ok(()) };
    let mh = c.mh.as_mut().ok_or_else(|| PathError::Other("no Migration Handler".into()))?;
    let done = mh.wait_until(keep)?;
    MhHost::check(&done)?;
    let sent = send_slots(c, round, base, gfns.iter().map(|&g| (Kind::Page, g)))?;
    account(c, st, sent)
}

/// What one Blobs frame carried: bytes on the wire and zero records among its blobs.
#[derive(Debug, Clone, Copy)]
pub(super) struct BlobsSent {
    pub bytes: u64,
    pub zeros: u64,
}

impl RoundStats {
    fn add_blobs(&mut self, s: BlobsSent) {
        self.bytes += s.bytes;
        self.zero_pages += s.zeros;
    }
}

/// Run export requests into slots `base..`, then send the slots' blobs (checked against
/// `expect`) in one frame.
pub(super) fn export_and_send(
    c: &mut Ctx<'_>,
    round: u32,
    base: u32,
    reqs: &[Request],
    expect: impl ExactSizeIterator<Item = (Kind, u64)>,
) -> Result<BlobsSent, PathError> {
    let mh = c.mh.as_mut().ok_or_else(|| PathError::Other("no Migration Handler".into()))?;
    mh.run(reqs)?;
    send_slots(c, round, base, expect)
}

/// Send the exported blobs in slots `base..` (checked against `expect`) as one Blobs frame.
/// The slots are copied straight into the frame (one copy of the ciphertext); a zero record
/// takes its header alone.
fn send_slots(
    c: &mut Ctx<'_>,
    round: u32,
    base: u32,
    expect: impl ExactSizeIterator<Item = (Kind, u64)>,
) -> Result<BlobsSent, PathError> {
    let mh = c.mh.as_ref().ok_or_else(|| PathError::Other("no Migration Handler".into()))?;
    let n = expect.len();
    c.wire.clear();
    c.wire.resize(8 + n * payload::BLOB_LEN, 0);
    c.wire[..8].copy_from_slice(&payload::Blobs::prefix(round, n as u32));
    let (mut at, mut zeros) = (8usize, 0u64);
    for (i, (kind, gfn)) in expect.enumerate() {
        let (head, data) = c.wire[at..at + payload::BLOB_LEN].split_at_mut(payload::BLOB_HEADER);
        let d = mh.take_slot_into(base + i as u32, kind, gfn, data)?;
        payload::Blobs::put_header(&d, head);
        zeros += u64::from(d.kind == Kind::Zero as u32);
        at += payload::Blobs::wire_len(d.kind);
    }
    c.wire.truncate(at);
    c.t.send_frame(FrameKind::Blobs, &[Part::Buf(&c.wire)], None)?;
    Ok(BlobsSent { bytes: (HEADER_LEN + at) as u64, zeros })
}

/// Which MH lanes a marker frame is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lanes {
    /// Every lane, ascending (Begin: lane 0 draws the export's id the others carry).
    All,
    /// Lanes 1.. in descending order (their End markers, before lane 0 restores vCPU state).
    Others,
    /// Lane 0 alone (its End closes the import, once every other lane's did).
    First,
}

/// Begin / End marker blobs for `which` MH lanes (a marker's gfn names its lane), in one
/// frame; nothing when there are no such lanes.
pub(super) fn send_marker(c: &mut Ctx<'_>, op: Op, round: u32, which: Lanes) -> Result<(), PathError> {
    let kind = if op == Op::Begin { Kind::Begin } else { Kind::End };
    let n = c.mh.as_ref().ok_or_else(|| PathError::Other("no Migration Handler".into()))?.lanes();
    let lanes: Vec<u32> = match which {
        Lanes::All => (0..n).collect(),
        Lanes::Others => (1..n).rev().collect(),
        Lanes::First => vec![0],
    };
    if lanes.is_empty() {
        return Ok(());
    }
    let reqs: Vec<Request> = lanes
        .iter()
        .enumerate()
        .map(|(slot, &l)| Request { op: op as u16, id: 0, count: 1, slot: slot as u32, gfn: u64::from(l), round })
        .collect();
    export_and_send(c, round, 0, &reqs, lanes.iter().map(|&l| (kind, u64::from(l)))).map(|_| ())
}

/// SEV-ES style: the vCPU states are placed in the VMSA pages (as the hardware keeps a VMSA
/// in guest memory), encrypted by the MH and sent as Cpu blobs; no host-side copy travels.
/// VMSA area: `count u32`, `count` x `len u32`, then the encoded states.
pub(super) fn send_states_via_mh(c: &mut Ctx<'_>, state: &MachineState, round: u32) -> Result<u64, PathError> {
    let mut v = (state.sections.len() as u32).to_le_bytes().to_vec();
    let enc = &state.sections;
    for e in enc {
        v.extend_from_slice(&(e.len() as u32).to_le_bytes());
    }
    for e in enc {
        v.extend_from_slice(e);
    }
    let cap = (abi::VMSA_PAGES * abi::PAGE) as usize;
    if v.len() > cap {
        return Err(PathError::Other(format!(
            "{} machine-state sections take {} bytes, the MH's VMSA area holds {cap}",
            enc.len(),
            v.len()
        )));
    }
    v.resize(v.len().div_ceil(abi::PAGE as usize) * abi::PAGE as usize, 0);
    let pages = (v.len() as u64 / abi::PAGE) as u32;
    c.m.ram().write(abi::VMSA, &v).map_err(|e| PathError::Other(e.to_string()))?;
    let r = Request { op: Op::SaveCpu as u16, id: 0, count: pages, slot: 0, gfn: 0, round };
    let first = abi::VMSA / abi::PAGE;
    let res = export_and_send(c, round, 0, &[r], (0..pages as usize).map(|i| (Kind::Cpu, first + i as u64)));
    // The plaintext states must not outlive the export in guest memory the host can read.
    c.m.ram().zero(abi::VMSA, v.len() as u64).map_err(|e| PathError::Other(e.to_string()))?;
    Ok(res?.bytes)
}
