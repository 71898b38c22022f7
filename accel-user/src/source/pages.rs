//! Page routing: which pages go where each round (direct Pages frames over the control or
//! data streams, private pages through the Migration Handler, zero runs as compact
//! records), the page-state record of a confidential VM, and the end of a round.
use super::*;

/// Close a round: every stream sent everything and the kernel released every buffer (only
/// then are the round's pages "sent"), then the control stream announces the round's total.
pub(super) fn end_round(c: &mut Ctx<'_>, round: u32, st: &mut RoundStats) -> Result<(), TransportError> {
    if let Some(d) = c.data.as_mut() {
        d.end_round(round)?;
        st.bytes += (HEADER_LEN as u64 + 16) * d.len() as u64;
    }
    c.t.send_frame(
        FrameKind::EndOfRound,
        &[Part::Buf(&payload::EndOfRound { round, pages: st.pages }.encode())],
        None,
    )?;
    c.t.flush()?;
    st.bytes += HEADER_LEN as u64 + 16;
    Ok(())
}

/// Round 0: all pages, with pages outside `extents` (memfd holes) known to be zero.
pub(super) fn send_pages_with_holes(
    c: &mut Ctx<'_>,
    round: u32,
    pages: u64,
    extents: &[(u64, u64)],
    st: &mut RoundStats,
) -> Result<(), PathError> {
    let mut ext = extents.iter().peekable();
    let mut in_data = move |gfn: u64| {
        let gpa = gfn * PAGE_SIZE;
        while let Some(&&(_, end)) = ext.peek() {
            if end <= gpa {
                ext.next();
            } else {
                break;
            }
        }
        matches!(ext.peek(), Some(&&(start, _)) if start < gpa + PAGE_SIZE)
    };
    send_pages(c, round, 0..pages, st, Some(&mut in_data))
}

/// Send `gfns` (ascending) as Pages frames of consecutive runs. `may_hold_data(gfn)`, when
/// given, says false for pages known to be zero without reading them.
pub(super) fn send_pages(
    c: &mut Ctx<'_>,
    round: u32,
    gfns: impl Iterator<Item = u64>,
    st: &mut RoundStats,
    mut may_hold_data: Option<&mut dyn FnMut(u64) -> bool>,
) -> Result<(), PathError> {
    let ram = c.m.ram().clone();
    let max_data = u64::from(c.o.batch_pages);
    let mut runs: Vec<Run> = Vec::with_capacity(256);
    let mut data_pages = 0u64;
    let confidential = c.mh.is_some();
    let mut private: Vec<u64> = Vec::new();
    // Classification by an external record (the eBPF page-state map), brought up to date
    // now; pages on which it and the VMM disagree are not read. Once the guest is paused,
    // `check_page_states` has found the two equal, so the VMM's record stands for both.
    let m = c.m;
    let cs = m.confidential();
    let external = match cs.and_then(|x| x.external_page_states()).filter(|_| confidential && !c.paused) {
        Some(x) => Some(x.shared_bitmap().map_err(|e| PathError::Other(format!("page-state map: {e}")))?),
        None => None,
    };
    let mut disagree: Vec<u64> = Vec::new();
    for gfn in gfns {
        let hole = may_hold_data.as_mut().is_some_and(|f| !f(gfn));
        if confidential && abi::in_region(gfn) {
            // The MH region is each side's own (the destination runs its own MH there).
            continue;
        }
        if confidential && !hole {
            // A hole is zero and sent as such whatever its state; any other page by its state.
            let vmm = cs.is_some_and(|x| x.is_shared(gfn));
            let shared = match &external {
                Some(bits) => bits.get((gfn / 64) as usize).is_some_and(|w| w & (1 << (gfn % 64)) != 0),
                None => vmm,
            };
            if shared != vmm {
                disagree.push(gfn);
                continue;
            }
            if !shared {
                // Private: the host never reads it; it goes through the MH below.
                st.pages += 1;
                private.push(gfn);
                continue;
            }
        }
        let zero = hole || (c.o.zero_detect && ram.page_is_zero(gfn).unwrap_or(false));
        let flags = if zero { RUN_ZERO } else { 0 };
        st.pages += 1;
        st.zero_pages += u64::from(zero);
        match runs.last_mut() {
            Some(r) if r.gfn + u64::from(r.npages) == gfn && r.flags == flags && r.npages < u32::MAX => r.npages += 1,
            _ => {
                if runs.len() as u32 == MAX_RUNS {
                    flush(c, round, &mut runs, st)?;
                    data_pages = 0;
                }
                runs.push(Run { gfn, npages: 1, flags });
            }
        }
        if !zero {
            data_pages += 1;
            if data_pages == max_data {
                flush(c, round, &mut runs, st)?;
                data_pages = 0;
            }
        }
    }
    if !disagree.is_empty() {
        // A conversion in flight: one record has it, the other not yet. Send the pages in a
        // later round, when the records agree.
        tracing::debug!(round, pages = disagree.len(), "page states in flux: pages deferred");
        st.deferred += disagree.len() as u64;
        c.m.dirty_log().restore(&disagree);
    }
    if !runs.is_empty() {
        flush(c, round, &mut runs, st)?;
    }
    if !private.is_empty() {
        send_private(c, round, &private, st)?;
    }
    Ok(())
}

/// With an external page-state record, check all of it against the VMM's once the guest is
/// paused (both are final then): the record the destination gets must be the one pages were
/// classified by.
pub(super) fn check_page_states(c: &Ctx<'_>) -> Result<(), PathError> {
    let Some(cs) = c.m.confidential() else { return Ok(()) };
    let Some(x) = cs.external_page_states() else { return Ok(()) };
    let ext = x.shared_bitmap().map_err(|e| PathError::Other(format!("page-state map: {e}")))?;
    let vmm = cs.shared_bitmap();
    let differ = |i: usize| vmm[i] ^ ext.get(i).copied().unwrap_or(0);
    let n: u64 = (0..vmm.len()).map(|i| u64::from(differ(i).count_ones())).sum();
    let Some(i) = (0..vmm.len()).find(|&i| differ(i) != 0) else { return Ok(()) };
    // The guest is stopped, so both records are final: one of them is wrong.
    let first = i as u64 * 64 + u64::from(differ(i).trailing_zeros());
    Err(PathError::Other(format!(
        "the eBPF page-state map and the VMM disagree on {n} page(s) at switchover (first: gfn {first:#x}, \
         VMM says {}); none of them was read",
        if cs.is_shared(first) { "shared" } else { "private" },
    )))
}

/// Confidential: the guest's shared ranges (outside the MH region, which is each side's
/// own), so the destination VMM's record matches.
pub(super) fn send_page_states(c: &mut Ctx<'_>) -> Result<(), TransportError> {
    let (rs, re) = (abi::REGION_GFNS.start, abi::REGION_GFNS.end);
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let shared = c.m.confidential().map(|cs| cs.shared_ranges()).unwrap_or_default();
    for (g, n) in shared {
        // Cut the MH region out of the range.
        let end = g + n;
        if g < rs {
            ranges.push((g, end.min(rs) - g));
        }
        if end > re {
            let s = g.max(re);
            ranges.push((s, end - s));
        }
    }
    let mut chunks = ranges.chunks(frame::MAX_STATE_RANGES as usize).peekable();
    loop {
        let chunk = chunks.next().unwrap_or(&[]);
        let last = chunks.peek().is_none();
        let p = payload::PageStates::encode(chunk, last);
        c.t.send_frame(FrameKind::PageStates, &[Part::Buf(&p)], None)?;
        if last {
            return Ok(());
        }
    }
}

pub(super) fn flush(c: &mut Ctx<'_>, round: u32, runs: &mut Vec<Run>, st: &mut RoundStats) -> Result<(), PathError> {
    let frame = (HEADER_LEN + 8 + 16 * runs.len()) as u64 + runs.iter().map(Run::data_bytes).sum::<u64>();
    gate(c, frame)?;
    if let Some(d) = c.data.as_mut() {
        st.bytes += frame;
        return Ok(d.send_pages(round, std::mem::take(runs))?);
    }
    payload::PagesHead::encode(round, runs, &mut c.meta);
    let mut parts: Vec<Part<'_>> = Vec::with_capacity(runs.len() + 1);
    parts.push(Part::Buf(&c.meta));
    for r in runs.iter().filter(|r| !r.is_zero()) {
        parts.push(Part::Guest { gpa: r.gfn * PAGE_SIZE, len: r.data_bytes() });
    }
    c.t.send_frame(FrameKind::Pages, &parts, Some(c.m.ram()))?;
    st.bytes += frame;
    runs.clear();
    Ok(())
}
