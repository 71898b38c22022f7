//! The confidential path: private pages and vCPU state leave the guest only as blobs the
//! source Migration Handler encrypted; the host moves them without reading them.
use super::*;

/// Encrypt `gfns` (ascending) through the source MH, `mh_batch` pages per doorbell, and
/// send the blobs on the control stream.
pub(super) fn send_private(c: &mut Ctx<'_>, round: u32, gfns: &[u64], st: &mut RoundStats) -> Result<(), PathError> {
    let batch = c.o.confidential.map_or(abi::NSLOTS, |x| x.mh_batch.clamp(1, abi::NSLOTS)) as usize;
    for chunk in gfns.chunks(batch) {
        let mut reqs: Vec<Request> = Vec::new();
        for (slot, &gfn) in chunk.iter().enumerate() {
            match reqs.last_mut() {
                Some(r) if r.gfn + u64::from(r.count) == gfn => r.count += 1,
                _ => reqs.push(Request { op: Op::Export as u16, id: 0, count: 1, slot: slot as u32, gfn, round }),
            }
        }
        let frame = (HEADER_LEN + 8 + chunk.len() * payload::BLOB_LEN) as u64;
        gate(c, frame)?;
        export_and_send(c, round, &reqs, chunk.iter().map(|&g| (Kind::Page, g)))?;
        st.bytes += frame;
    }
    Ok(())
}

/// Run export requests, then send the slots' blobs (checked against `expect`) in one frame.
pub(super) fn export_and_send(
    c: &mut Ctx<'_>,
    round: u32,
    reqs: &[Request],
    expect: impl ExactSizeIterator<Item = (Kind, u64)>,
) -> Result<(), PathError> {
    let mh = c.mh.as_mut().ok_or_else(|| PathError::Other("no Migration Handler".into()))?;
    mh.run(reqs)?;
    // Slots are copied straight into the frame: one copy of the ciphertext.
    let n = expect.len();
    c.wire.clear();
    c.wire.resize(8 + n * payload::BLOB_LEN, 0);
    c.wire[..8].copy_from_slice(&payload::Blobs::prefix(round, n as u32));
    for (slot, (kind, gfn)) in expect.enumerate() {
        let b = &mut c.wire[8 + slot * payload::BLOB_LEN..8 + (slot + 1) * payload::BLOB_LEN];
        let (head, data) = b.split_at_mut(40);
        let d = mh.take_slot_into(slot as u32, kind, gfn, data)?;
        payload::Blobs::put_header(&d, head);
    }
    c.t.send_frame(FrameKind::Blobs, &[Part::Buf(&c.wire)], None)?;
    Ok(())
}

/// Begin / End marker blob.
pub(super) fn send_marker(c: &mut Ctx<'_>, op: Op, round: u32) -> Result<(), PathError> {
    let kind = if op == Op::Begin { Kind::Begin } else { Kind::End };
    let r = Request { op: op as u16, id: 0, count: 1, slot: 0, gfn: 0, round };
    export_and_send(c, round, &[r], std::iter::once((kind, 0)))
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
    let res = export_and_send(c, round, &[r], (0..pages as usize).map(|i| (Kind::Cpu, first + i as u64)));
    // The plaintext states must not outlive the export in guest memory the host can read.
    c.m.ram().zero(abi::VMSA, v.len() as u64).map_err(|e| PathError::Other(e.to_string()))?;
    res?;
    Ok((HEADER_LEN + 8 + pages as usize * payload::BLOB_LEN) as u64)
}
