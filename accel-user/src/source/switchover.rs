//! Switchover: pause the guest, send what changed since the last round and what the VMM
//! wrote while it was paused, the machine state, then `Complete`, the commit point; then
//! learn whether the destination runs the VM (its `Resumed`, or a handover query).
use super::*;

/// What stop-and-copy sent, and when the guest was paused.
pub(super) struct Stopped {
    /// The final round, with the pages the VMM wrote while the guest was paused.
    pub(super) fin: RoundStats,
    /// Bytes of machine state sent.
    pub(super) state_bytes: u64,
    /// When the guest was paused: downtime counts from here.
    pub(super) t_stop: Instant,
    /// The guest's page writes when it was paused.
    pub(super) writes_stop: Option<u64>,
}

/// Pause the guest, send the final pages and the machine state, and commit (`Complete`).
/// `round` is the last precopy round, `rounds` the precopy rounds' stats.
pub(super) fn stop_and_copy(
    c: &mut Ctx<'_>,
    mut round: u32,
    rounds: &[RoundStats],
    on: &mut dyn FnMut(Event),
) -> Result<Stopped, SendError> {
    let ph = Phase::StopAndCopy;
    let t_stop = Instant::now();
    let writes_stop = c.m.page_writes();
    c.m.pause().map_err(vm(ph))?;
    c.paused = true;
    c.m.set_throttle(0);
    if c.mh.is_some() {
        check_page_states(c).map_err(|e| e.at(ph, c.t))?;
    }
    round += 1;
    let final_gfns = c.m.dirty_log().take_final().map_err(kvm(ph))?;
    c.inflight = InFlight::Pages(final_gfns.clone());
    let start = Instant::now();
    let mut fin = RoundStats { round, ..Default::default() };
    send_pages(c, round, final_gfns.iter().copied(), &mut fin, None).map_err(|e| e.at(ph, c.t))?;
    end_round(c, round, &mut fin).map_err(|e| peer_error(c.t, ph, e))?;

    let ph = Phase::MachineState;
    let state = c.m.save_machine_state().map_err(vm(ph))?;
    // Pages the VMM wrote itself while the guest was paused (QEMU's device models or its
    // debugger write guest RAM; no vCPU did): they go in one more round, and a VMM that
    // keeps writing is refused rather than handed over with RAM that may differ.
    let mut extra = 0;
    loop {
        let mut late = c.m.dirty_log().take_final().map_err(kvm(ph))?;
        if c.mh.is_some() {
            late.retain(|&g| !abi::in_region(g)); // the MH's own pages never travel
        }
        if late.is_empty() {
            break;
        }
        c.inflight = InFlight::Pages(late.clone());
        if extra == MAX_LATE_ROUNDS {
            return Err(SendError::Vm {
                phase: ph,
                source: VmError::State(format!(
                    "the VMM kept writing guest RAM while the VM was paused: {} page(s) changed after {extra} extra \
                     rounds (first: page {:#x})",
                    late.len(),
                    late[0]
                )),
            });
        }
        extra += 1;
        round += 1;
        let mut st = RoundStats { round, ..Default::default() };
        send_pages(c, round, late.iter().copied(), &mut st, None).map_err(|e| e.at(ph, c.t))?;
        end_round(c, round, &mut st).map_err(|e| peer_error(c.t, ph, e))?;
        tracing::info!(round, pages = st.pages, "pages written by the VMM while paused sent");
        fin.pages += st.pages;
        fin.zero_pages += st.zero_pages;
        fin.bytes += st.bytes;
    }
    let mut state_bytes = 0u64;
    if c.mh.is_some() {
        // Every other lane's import ends before lane 0 restores the vCPU state, and lane 0
        // closes last (the destination MH refuses any other order).
        send_marker(c, Op::End, round, Lanes::Others).map_err(|e| e.at(ph, c.t))?;
        state_bytes = send_states_via_mh(c, &state, round).map_err(|e| e.at(ph, c.t))?;
        send_page_states(c).map_err(|e| peer_error(c.t, ph, e))?;
        send_marker(c, Op::End, round, Lanes::First).map_err(|e| e.at(ph, c.t))?;
    }
    for (i, s) in state.sections.iter().enumerate().filter(|_| c.mh.is_none()) {
        let pre = payload::State::prefix(i as u32, s.len() as u32);
        c.t.send_frame(FrameKind::State, &[Part::Buf(&pre), Part::Buf(s)], None).map_err(|e| peer_error(c.t, ph, e))?;
        state_bytes += (HEADER_LEN + pre.len() + s.len()) as u64;
    }
    let pages_sent: u64 = rounds.iter().map(|r| r.pages).sum::<u64>() + fin.pages;
    // Last check before the commit point: an operator's cancel still stops it here, and a
    // destination that already gave up (closed its end, or said Abort) will never resume,
    // so the source still may.
    if let Some(why) = c.o.cancel.reason() {
        return Err(SendError::Cancelled { phase: ph, reason: why });
    }
    if c.t.wait_readable(Duration::ZERO).map_err(|e| tx(ph, e))? {
        return Err(match recv_small(c.t) {
            Ok((FrameKind::Abort, p)) => aborted(ph, &p),
            Ok((k, _)) => SendError::Unexpected { phase: ph, kind: k },
            Err(e) => tx(ph, e),
        });
    }
    c.t.send_frame(
        FrameKind::Complete,
        &[Part::Buf(
            &payload::Complete { rounds: round + 1, sections: state.sections.len() as u32, pages_sent }.encode(),
        )],
        None,
    )
    .map_err(|e| peer_error(c.t, ph, e))?;
    c.committed = true;
    fin.elapsed = start.elapsed();
    on(Event::Final(fin));
    Ok(Stopped { fin, state_bytes, t_stop, writes_stop })
}

/// After the commit point: the destination's `Resumed` hands the VM over and says how long
/// its verification capture took (µs); its `Abort` proves it did not resume; anything else
/// is settled by asking it on a new connection. Returns the capture time and, when a query
/// settled it, why `Resumed` was lost.
pub(super) fn await_resume(c: &mut Ctx<'_>) -> Result<(u64, Option<String>), SendError> {
    // The commit point: once `Complete` is out, the destination may resume at any moment.
    // Its `Resumed` hands the VM over; its `Abort` proves it did not resume; anything else
    // (a lost link, a bad answer) is settled by asking it on a new connection, and the
    // source stays paused when even that gets no answer.
    let ph = Phase::AwaitResume;
    let lost = match recv_small(c.t) {
        Ok((FrameKind::Resumed, p)) => payload::Resumed::decode(&p).map(|r| r.capture_us).map_err(|e| tx(ph, e.into())),
        Ok((FrameKind::Abort, p)) => return Err(aborted(ph, &p)),
        Ok((k, _)) => Err(SendError::Unexpected { phase: ph, kind: k }),
        Err(e) => Err(tx(ph, e)),
    };
    let (capture_us, handover_query) = match lost {
        Ok(capture_us) => {
            // The source asks nothing more: the destination need not wait for its queries.
            if c.o.queries {
                if let Err(e) = c.t.send_frame(FrameKind::Done, &[], None) {
                    tracing::debug!("Done not sent ({e}); the destination keeps answering queries a while");
                }
            }
            (capture_us, None)
        }
        Err(lost) => match ask_destination(c, &lost) {
            Ok(Answer::Runs) => {
                tracing::warn!("{lost}; the destination, asked on a new connection, runs the VM");
                (0, Some(lost.to_string()))
            }
            Ok(Answer::NeverRuns) => return Err(SendError::NotResumed { source: Box::new(lost) }),
            Err(query) => return Err(SendError::HandoverUnknown { source: Box::new(lost), query }),
        },
    };
    Ok((capture_us, handover_query))
}
