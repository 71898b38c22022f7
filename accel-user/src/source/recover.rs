//! Recovery: when a migration fails, the source runs the VM again with every dirty bit
//! kept, and, when the destination may have it, asks the destination whether it runs it.
use super::*;

/// The migration ended: the guest no longer pays for dirty logging.
pub(super) fn stop_logging(m: &dyn Migratable) {
    if let Err(e) = m.dirty_log().stop() {
        tracing::warn!("cannot turn dirty logging off ({e}); the guest keeps running with logging on");
    }
}

pub(super) fn recover(mut c: Ctx<'_>, e: SendError) -> SendError {
    let fenced = matches!(e, SendError::HandoverUnknown { .. });
    if fenced {
        tracing::error!("{e}");
    } else {
        tracing::warn!("{e}; aborting, source VM keeps running");
    }
    match c.inflight {
        InFlight::Nothing => {}
        InFlight::All => c.m.dirty_log().mark_all(),
        InFlight::Pages(ref p) => c.m.dirty_log().restore(p),
    }
    c.m.set_throttle(0);
    stop_logging(c.m);
    // Dirty bits are kept either way: a source resumed later by hand migrates again whole.
    // Before the commit point the destination cannot resume, so the source runs first.
    let resumed = if c.paused && !fenced { c.m.resume() } else { Ok(()) };
    if !fenced {
        // The destination hears why on the control connection before the data streams
        // close under it (it would report their end instead), and closes its end once it
        // has read it.
        let abort = payload::Abort::encode(&e.to_string());
        if c.t.send_frame(FrameKind::Abort, &[Part::Buf(&abort)], None).is_ok() {
            let _ = c.t.wait_readable(c.o.io_timeout);
        }
    }
    drop(c.data.take()); // stops the workers and closes the data streams
    c.t.shutdown();
    // Before the commit point a lost link leaves the destination waiting for frames: tell
    // it, on a new connection, that the VM runs here again (it fences its copy at once).
    if let (Some(session), true, false, SendError::Transport { .. }) = (c.session, c.o.queries, c.committed, &e) {
        // Best effort, after the source already runs: a short wait, never the whole query time.
        match (c.ask)(c.queries, session, Ask::Withdraw, c.o.io_timeout.min(Duration::from_secs(5))) {
            Ok(a) => tracing::info!("withdrew the VM from the destination: {a:?}"),
            Err(w) => {
                tracing::info!("could not withdraw the VM from the destination ({w}); it never resumes it anyway")
            }
        }
    }
    match resumed {
        Ok(()) => e,
        Err(r) => SendError::ResumeFailed { first: Box::new(e), resume: r },
    }
}

/// Ask the destination, on new connections, whether it runs the VM, until it answers or
/// `handover_query` passes. `lost` is why the control connection gave no answer.
pub(super) fn ask_destination(c: &mut Ctx<'_>, lost: &SendError) -> Result<Answer, String> {
    let Some(session) = c.session.filter(|_| c.o.queries) else {
        return Err("an unauthenticated destination answers no handover query".into());
    };
    if c.o.handover_query.is_zero() {
        return Err("migration.handover_query_ms is 0".into());
    }
    let t0 = Instant::now();
    let mut pause = Duration::from_millis(100);
    let mut last = String::new();
    while c.queries < MAX_ASKS {
        let i = c.queries;
        c.queries += 1;
        tracing::warn!("{lost}; asking the destination whether it runs the VM (attempt {i})");
        let left = c.o.handover_query.saturating_sub(t0.elapsed()).max(Duration::from_millis(100));
        match (c.ask)(i, session, Ask::Runs, left) {
            Ok(a) => return Ok(a),
            Err(e) => last = format!("attempt {i}: {e}"),
        }
        if t0.elapsed() + pause > c.o.handover_query {
            return Err(format!("no answer within {:?}; last {last}", c.o.handover_query));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_secs(5));
    }
    Err(format!("no answer in {MAX_ASKS} attempts; last {last}"))
}
