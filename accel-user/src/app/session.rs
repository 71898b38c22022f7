//! High-level flows shared by the CLI, the tests and the benches: boot a source guest, send
//! it, receive one, watch it run, and the all-in-one `demo`.
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use embedded_vmm::vmm::Machine;
use kvm_hooks::migratable::{Migratable, VmFactory};
use serde::Serialize;

use crate::app::config::Config;
use crate::app::verify;
use crate::dest::{Received, RecvError};
use crate::report::{DestReport, SourceReport};
use crate::source::{self, Event, Phase, SendError};
use crate::wire::accept::Incoming;
use crate::wire::auth::{self, Conn};
use crate::wire::connect;
use crate::wire::seal::Sealed;
use crate::wire::transport::TransportError;

/// A receiver whose VMs are the embedded VMM's.
pub type Receiver = crate::dest::Receiver<embedded_vmm::EmbeddedVms>;

/// The factory of the destination VMs `cfg` describes.
fn embedded_vms(cfg: &Config) -> embedded_vmm::EmbeddedVms {
    embedded_vmm::EmbeddedVms { dirty: cfg.dirty_preference() }
}

/// Boot the guest the config describes and let it run for the warm-up time (with `prefill`,
/// counted from the guest's first full pass over its pages).
pub fn boot_source(cfg: &Config) -> Result<Machine, kvm_hooks::Error> {
    kvm_hooks::vm::set_kvm_device(&cfg.host.kvm_device);
    let mut m = Machine::boot(cfg.guest_spec(), cfg.dirty_preference())?;
    if cfg.guest.prefill {
        embedded_vmm::guest::prefill(m.ram())?;
    }
    if cfg.migration.dirty_source == crate::app::config::DirtySource::Ebpf {
        attach_ebpf(&m)?;
    }
    if cfg.confidential.enabled && cfg.confidential.page_state_source == crate::app::config::PageStateSource::Ebpf {
        attach_page_states(&m)?;
    }
    if cfg.confidential.enabled {
        launch_mh(cfg, &mut m).map_err(|e| kvm_hooks::Error::Vcpu { vcpu: cfg.guest.vcpus as usize, msg: e })?;
    }
    m.resume()?;
    if cfg.guest.prefill {
        // Like QEMU's test guests, whose own prefill maps their pages: the warm-up starts
        // once the guest has written every page of its range.
        m.wait_first_pass(Duration::from_secs(600))?;
    }
    std::thread::sleep(Duration::from_millis(cfg.guest.warmup_ms));
    if let Some(f) = m.fault() {
        return Err(kvm_hooks::Error::Vcpu { vcpu: 0, msg: f });
    }
    Ok(m)
}

/// Start the reference Migration Handler in `m` on its extra vCPUs, with the configured
/// transport key and a fresh VM id. Refuses a SEV guest whose policy forbids migration.
pub fn launch_mh(cfg: &Config, m: &mut Machine) -> Result<(), String> {
    let c = &cfg.confidential;
    kvm_hooks::sev::check_send(c.sev_policy).map_err(|e| e.to_string())?;
    let key = c.key_file.as_deref().ok_or("confidential.key_file is not set")?;
    let key = crate::wire::keys::load(key).map_err(|e| e.to_string())?;
    let launch = kvm_hooks::mh::Launch {
        key: key.0,
        vm_id: crate::wire::keys::random_vm_id(),
        spin: c.mh_spin,
        zero_records: c.zero_records,
        lanes: c.mh_vcpus,
    };
    m.launch_mh(&launch, Duration::from_millis(c.mh_timeout_ms))
        .map_err(|e| format!("cannot start the Migration Handler: {e}"))?;
    if let Some(h) = m.mh().as_mut() {
        h.spin = c.host_spin;
    }
    Ok(())
}

/// Take `m`'s dirty pages from the eBPF probe on its vCPU threads. Refuses (an error, not
/// a silent fallback) when the programs cannot load or attach.
pub fn attach_ebpf(m: &Machine) -> Result<(), kvm_hooks::Error> {
    let slots: Vec<(u64, u64)> = m.ram().slot_ranges();
    let probe = accel_ebpf::DirtyProbe::attach(accel_ebpf::Target::Threads(m.vcpu_tids()), &slots)
        .map_err(|e| kvm_hooks::Error::Dirty(format!("dirty_source = \"ebpf\" refused: {e}")))?;
    m.dirty().set_external(Box::new(probe))
}

/// Classify `m`'s pages by the eBPF page-state map (set before resuming, so the map sees
/// every request). The embedded VMM's guests announce page states by port I/O, which no KVM
/// tracepoint sees, so the VMM feeds each request it handles through the attached
/// `kvm_hypercall` program (`BPF_PROG_TEST_RUN`): the map is built by the same program, ring
/// buffer and drain thread that watch a QEMU guest's `KVM_HC_MAP_GPA_RANGE` hypercalls.
/// Refuses (an error, not a fallback to the VMM's record) when the programs cannot load.
pub fn attach_page_states(m: &Machine) -> Result<Arc<accel_ebpf::PageStateProbe>, kvm_hooks::Error> {
    let probe = accel_ebpf::PageStateProbe::attach(accel_ebpf::Target::Threads(m.vcpu_tids()), m.ram().pages())
        .map_err(|e| kvm_hooks::Error::PageStates(format!("page_state_source = \"ebpf\" refused: {e}")))?;
    let probe = Arc::new(probe);
    let p = probe.clone();
    m.set_page_state_hook(Arc::new(move |r| p.replay_request(r)));
    m.set_external_page_states(probe.clone());
    Ok(probe)
}

/// Connect to `to` and migrate `m`. Every transport is prepared before the first connect
/// (see [`connect::Prepared`]): from the handshake on, the destination only waits for
/// bytes, never for work the source could have done before.
pub fn send(cfg: &Config, m: &Machine, to: &str, on: &mut dyn FnMut(Event)) -> Result<SourceReport, SendError> {
    let mut rep = send_vm(cfg, m, to, on)?;
    rep.guest_last_report_unix_us = m.last_report_unix_us().into_iter().filter(|&t| t > 0).min();
    Ok(rep)
}

/// [`send`] for any VM behind the engine's boundary (an embedded VM, an attached QEMU).
pub fn send_vm(
    cfg: &Config,
    m: &dyn Migratable,
    to: &str,
    on: &mut dyn FnMut(Event),
) -> Result<SourceReport, SendError> {
    let mc = &cfg.migration;
    let o = cfg.send_options();
    let psk = cfg.auth_key().map_err(SendError::Auth)?;
    if psk.is_none() {
        tracing::warn!("auth.insecure: this migration is neither authenticated nor protected from tampering");
    }
    let setup = |source| SendError::Transport { phase: Phase::Handshake, source, unsent: None };
    let t0 = Instant::now();
    // Sealed frames are sent from copies, never from guest RAM: registering RAM as fixed
    // buffers (which pins all of it) is for unauthenticated migrations only.
    let fixed = mc.fixed_buffers && psk.is_none();
    if mc.fixed_buffers && !fixed {
        tracing::info!("migration.fixed_buffers has no effect on an authenticated migration (pages are sealed copies)");
    }
    let prepare = |ram| connect::prepare(mc.transport, ram, fixed, cfg.io_timeout());
    // With data streams the control connection carries no pages: no RAM to register there.
    let control_ram = (o.streams == 0).then(|| m.ram().as_ref());
    let control = prepare(control_ram).map_err(setup)?;
    let mut streams =
        (0..o.streams).map(|_| prepare(Some(m.ram())).map(Some)).collect::<Result<Vec<_>, _>>().map_err(setup)?;
    let prepare_time = t0.elapsed();
    let mut t = connect::connect(to, control, cfg.connect_timeout()).map_err(setup)?;
    // Authenticate before anything of the VM leaves; from then on every frame is sealed.
    let keys = match &psk {
        Some(k) => Some(auth::source(&mut *t, k).map_err(|e| SendError::Auth(e.to_string()))?),
        None => None,
    };
    if let Some(k) = &keys {
        t = Box::new(Sealed::new(t, k.keys(Conn::Control).map_err(|e| SendError::Auth(e.to_string()))?));
    }
    let mut data = |i: u32| {
        let p = streams.get_mut(i as usize).and_then(Option::take);
        let p = p.ok_or_else(|| TransportError::Guest(format!("data stream {i} was not prepared")))?;
        let d = connect::connect(to, p, cfg.connect_timeout())?;
        Ok(match &keys {
            Some(k) => {
                Box::new(Sealed::new(d, k.keys(Conn::Data(i)).map_err(|e| TransportError::Guest(e.to_string()))?))
            }
            None => d,
        })
    };
    // An answer nobody authenticated could start a second copy: without a key, no query.
    let mut ask = |i: u32, session: u64, what: crate::wire::payload::Ask, limit: Duration| match &keys {
        Some(k) => crate::dest::handover::ask(
            to,
            k,
            i,
            session,
            what,
            cfg.connect_timeout().min(limit),
            cfg.io_timeout().min(limit),
        ),
        None => Err(TransportError::Guest("an unauthenticated migration (auth.insecure) cannot ask".into())),
    };
    let mut rep = source::migrate_streams(m, &mut *t, &o, &mut data, &mut ask, on)?;
    rep.prepare = prepare_time;
    Ok(rep)
}

/// Accept one connection on `l` and receive a VM. The receiver is returned either way so a
/// caller can inspect the (never resumed) VM after a failure.
pub fn receive(cfg: &Config, l: &TcpListener, capture: bool) -> (Receiver, Result<Received, RecvError>) {
    match receiver(cfg, capture) {
        Ok(r) => receive_with(cfg, l, r),
        // Nothing was created: a fresh receiver stands in for the one that refused.
        Err(e) => (Receiver::new(cfg.recv_options(capture), embedded_vms(cfg)), Err(e)),
    }
}

/// The receiver `cfg` describes: transport key loaded and, with `receiver.prepare_ram`,
/// guest RAM allocated ahead. Call it before listening so a source never waits for it.
pub fn receiver(cfg: &Config, capture: bool) -> Result<Receiver, RecvError> {
    receiver_for(cfg, capture, embedded_vms(cfg))
}

/// [`receiver`] whose VMs `factory` creates (embedded VMs, or an attached QEMU).
pub fn receiver_for<F: VmFactory>(
    cfg: &Config,
    capture: bool,
    factory: F,
) -> Result<crate::dest::Receiver<F>, RecvError> {
    kvm_hooks::vm::set_kvm_device(&cfg.host.kvm_device);
    cfg.auth_key().map_err(RecvError::Prepare)?;
    let mut opts = cfg.recv_options(capture);
    let mut key_error = None;
    if cfg.confidential.enabled {
        let c = &cfg.confidential;
        match c.key_file.as_deref().map(crate::wire::keys::load) {
            Some(Ok(key)) => {
                opts.confidential = Some(crate::dest::ConfidentialRecv {
                    key,
                    mh_spin: c.mh_spin,
                    host_spin: c.host_spin,
                    mh_timeout: Duration::from_millis(c.mh_timeout_ms),
                    zero_records: c.zero_records,
                })
            }
            Some(Err(e)) => key_error = Some(e.to_string()),
            None => key_error = Some("confidential.key_file is not set".into()),
        }
    }
    let mut r = crate::dest::Receiver::new(opts, factory);
    if let Some(e) = key_error {
        return Err(RecvError::Refused(e));
    }
    let ram = cfg.receiver.prepare_ram.0;
    if ram != 0 {
        let d = r.prepare(ram)?;
        tracing::info!("destination prepared: {} MiB of guest RAM pre-allocated in {d:?}", ram >> 20);
    }
    Ok(r)
}

/// Accept one connection on `l` and receive a VM into `r` (from [`receiver`]).
///
/// With authentication (the default) the receiver takes the first connection that
/// completes the handshake; one that fails it is dropped with its reason and the next one
/// taken, so a peer without the key neither gets in nor keeps the real source out.
pub fn receive_with<F: VmFactory>(
    cfg: &Config,
    l: &TcpListener,
    mut r: crate::dest::Receiver<F>,
) -> (crate::dest::Receiver<F>, Result<Received, RecvError>) {
    let timeout = cfg.io_timeout();
    let psk = match cfg.auth_key() {
        Ok(k) => k,
        Err(e) => return (r, Err(RecvError::Prepare(e))),
    };
    if let Err(e) = crate::host::raise_open_files() {
        tracing::warn!("cannot raise the open-file limit ({e}); a flood of connections reaches it sooner");
    }
    let incoming = match Incoming::new(l, cfg.migration.transport, timeout) {
        Ok(i) => i.with_cancel(cfg.cancel.clone()),
        Err(source) => {
            let state = r.state();
            return (r, Err(RecvError::Transport { state, source: TransportError::Io { op: "listen", source } }));
        }
    };
    let wait = (cfg.receiver.wait_ms > 0).then(|| Duration::from_millis(cfg.receiver.wait_ms));
    let t0 = Instant::now();
    let (mut t, joins) = match incoming.control(psk.as_ref(), wait) {
        Ok(c) => c,
        Err(TransportError::Timeout(_)) => {
            let waited = wait.unwrap_or_else(|| t0.elapsed());
            return (r, Err(RecvError::NoSource { waited, dropped: incoming.dropped() }));
        }
        Err(TransportError::Cancelled(why)) => {
            return (r, Err(RecvError::Cancelled(format!("{why}, before any source connected"))))
        }
        Err(source) => {
            let state = r.state();
            return (r, Err(RecvError::Transport { state, source }));
        }
    };
    let mut accept = || incoming.data(joins.as_ref());
    let handover = r.handover();
    let window = Duration::from_millis(cfg.receiver.handover_window_ms);
    let res = std::thread::scope(|s| {
        // Once every connection of the session joined, later ones may be handover queries.
        if let Some(keys) = joins.as_ref() {
            let h = &handover;
            let mode = cfg.migration.transport;
            let spawned = std::thread::Builder::new().name("handover".into()).spawn_scoped(s, move || {
                match Incoming::new(l, mode, timeout) {
                    Ok(inc) => crate::dest::handover::serve(h, inc, keys, timeout),
                    Err(e) => tracing::warn!("cannot answer handover queries: {e}"),
                }
            });
            if let Err(e) = spawned {
                tracing::warn!("cannot answer handover queries: {e}");
            }
        }
        let res = r.run_streams(&mut *t, &mut accept);
        if joins.is_some() && handover.is_open() {
            settle(&mut *t, &handover, &res, window);
        }
        handover.close();
        res
    });
    (r, res)
}

/// After the receive: wait, within `window`, until the source can no longer need an answer
/// to a handover query: it said `Done`, a query was answered, or (when the control link
/// still works) the outcome reached it there.
fn settle(
    t: &mut dyn crate::wire::transport::Transport,
    h: &crate::dest::handover::Handover,
    res: &Result<Received, RecvError>,
    window: Duration,
) {
    match res {
        Ok(_) => {
            // The source says Done once Resumed reached it; without it, it may ask.
            t.set_recv_timeout(window);
            match t.recv_header() {
                Ok(hd) if hd.kind == crate::wire::frame::FrameKind::Done => h.done(),
                Ok(hd) => tracing::warn!("the source sent {:?} after Resumed", hd.kind),
                Err(e) => {
                    tracing::warn!(
                        "no Done from the source ({e}); answering its handover queries for up to {window:?}"
                    );
                    h.wait_settled(window);
                }
            }
        }
        // The source said why it gave up: it asks nothing.
        Err(RecvError::SourceAborted { .. }) => {}
        // The control link failed: this receiver's Abort may not have reached the source,
        // which may have sent Complete and now asks.
        Err(RecvError::Transport { .. }) => {
            h.wait_settled(window);
        }
        // The source hears this receiver's Abort on the working control link.
        Err(_) => {}
    }
}

/// Watch a resumed destination VM until every vCPU has reported progress since the resume,
/// for at most `timeout`: a live guest answers within milliseconds, so the deadline is only
/// reached by a VM that does not run (or a host that starves it for that long).
pub fn observe(m: &Machine, got: &Received, timeout: Duration) -> DestReport {
    let at_resume = m.reports();
    let p0 = m.progress();
    let t0 = Instant::now();
    let all_reported = |now: &[u64]| now.iter().zip(&at_resume).all(|(a, b)| a > b);
    while !all_reported(&m.reports()) && m.fault().is_none() && t0.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(2));
    }
    let liveness = t0.elapsed();
    let after = m.reports();
    let p1 = m.progress();
    let alive = m.fault().is_none() && all_reported(&after) && p1.iter().zip(&p0).all(|(a, b)| a >= b);
    DestReport {
        guest: crate::report::GuestInfo::new(got.shape, m.spec().workload.to_string()),
        rounds: got.rounds,
        pages: got.pages,
        bytes: got.bytes,
        total: got.total_time,
        progress_at_resume: p0,
        progress_after: p1,
        guest_alive: alive,
        liveness,
        guest_first_report_unix_us: first_reports(m),
        cpu: got.cpu,
        prepared_ram: got.prepared.is_some(),
        prepare: got.prepared.unwrap_or_default(),
    }
}

/// When the last vCPU to do so first reported after the resume; `None` if one never did.
fn first_reports(m: &Machine) -> Option<u64> {
    let f = m.first_report_since_resume_unix_us();
    if f.contains(&0) {
        None
    } else {
        f.into_iter().max()
    }
}

/// Zero the MH region of a RAM image: each side's region is its own (rings, slots, MH
/// stack), not part of the VM, so comparisons of confidential migrations skip it.
pub fn blank_mh_region(ram: &mut [u8]) {
    let r = mh_abi::REGION as usize..(mh_abi::REGION + mh_abi::REGION_SIZE) as usize;
    if let Some(b) = ram.get_mut(r) {
        b.fill(0);
    }
}

/// Result of checking a migrated VM against its source.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    pub pages_compared: u64,
    /// First mismatching pages (empty when RAM matched).
    pub mismatched_pages: Vec<u64>,
    /// `None` = invariant holds (or does not apply); otherwise the violation.
    pub ab_invariant_error: Option<String>,
    pub guest_alive: bool,
}

impl Verification {
    pub fn ok(&self) -> bool {
        self.mismatched_pages.is_empty() && self.ab_invariant_error.is_none() && self.guest_alive
    }
}

pub fn verify(spec: &embedded_vmm::vmm::GuestSpec, src: &[u8], dst: &[u8], alive: bool) -> Verification {
    Verification {
        pages_compared: (src.len() / 4096) as u64,
        mismatched_pages: verify::diff_pages(src, dst, 16),
        ab_invariant_error: verify::check_ab(spec, dst).err(),
        guest_alive: alive,
    }
}

#[derive(Debug, Serialize)]
pub struct DemoReport {
    pub source: SourceReport,
    pub destination: DestReport,
    pub verification: Verification,
}

/// Everything a demo run produced (RAM images kept for `--dump-memory` and tests).
pub struct DemoOutcome {
    pub report: DemoReport,
    pub source_ram: Vec<u8>,
    pub dest_ram: Vec<u8>,
}

/// Boot the configured guest, migrate it live over loopback into a second VM in this
/// process, then verify RAM, the A/B invariant and that the destination keeps running.
pub fn demo(cfg: &Config, on: &mut dyn FnMut(Event)) -> anyhow::Result<DemoOutcome> {
    demo_with(cfg, &|_| Ok(()), on)
}

/// [`demo`] with a hook that runs on the booted source before migration starts (benches use
/// it to fill guest RAM).
pub fn demo_with(
    cfg: &Config,
    prepare: &dyn Fn(&Machine) -> anyhow::Result<()>,
    on: &mut dyn FnMut(Event),
) -> anyhow::Result<DemoOutcome> {
    demo_opts(cfg, prepare, true, &mut |_, e| on(e))
}

/// [`demo_with`]; `verify_ram = false` skips the RAM snapshots and page comparison (large
/// benchmark guests), keeping the liveness check. `on` sees the source VM with each event
/// (tests wait there for the guest to write between rounds).
pub fn demo_opts(
    cfg: &Config,
    prepare: &dyn Fn(&Machine) -> anyhow::Result<()>,
    verify_ram: bool,
    on: &mut dyn FnMut(&Machine, Event),
) -> anyhow::Result<DemoOutcome> {
    let t0 = Instant::now();
    // Both ends run here: without a key file they share a fresh key.
    let mut cfg = cfg.clone();
    if !cfg.auth.insecure && cfg.auth.key.is_none() && cfg.auth.key_file.is_none() {
        cfg.auth.key = Some(crate::wire::auth::ephemeral_key()?);
    }
    let cfg = &cfg;
    let src = boot_source(cfg)?;
    // The destination is ready (RAM prepared, if configured) before the source starts.
    let r = receiver(cfg, verify_ram)?;
    prepare(&src)?;
    tracing::info!("source guest booted in {:?}", t0.elapsed());
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?.to_string();
    let mut rcfg = cfg.clone();
    if rcfg.receiver.wait_ms == 0 {
        // A source that fails before it connects must not leave the receiver waiting; one
        // that registers guest RAM for zero-copy first (about 0.6 s per GiB) still connects.
        let prepare_ms = 1000 * cfg.guest.ram.0.div_ceil(1 << 30);
        rcfg.receiver.wait_ms = (cfg.connect_timeout() + cfg.io_timeout()).as_millis() as u64 + prepare_ms;
    }
    let liveness_timeout = Duration::from_millis(cfg.receiver.liveness_timeout_ms);
    let dest = std::thread::spawn(move || {
        let (r, res) = receive_with(&rcfg, &l, r);
        match res {
            Ok(got) => {
                let m = r.into_machine().expect("a resumed receiver has a VM");
                let rep = observe(&m, &got, liveness_timeout);
                Ok((got, rep, m))
            }
            Err(e) => Err(e),
        }
    });
    let sres = send(cfg, &src, &addr, &mut |e| on(&src, e));
    let dres = dest.join().map_err(|_| anyhow::anyhow!("receiver thread panicked"))?;
    // A failure names both sides' reasons: the source's alone often hides the cause (a
    // destination that gave up shows at the source only as a closed connection).
    let (srep, (got, drep, _dm)) = match (sres, dres) {
        (Ok(s), Ok(d)) => (s, d),
        (Err(s), Ok(_)) => anyhow::bail!("source: {s}; destination: received the VM"),
        (Ok(_), Err(d)) => anyhow::bail!("source: migration sent; destination: {d}"),
        (Err(s), Err(d)) => anyhow::bail!("source: {s}; destination: {d}"),
    };
    let (mut source_ram, mut dest_ram) = if verify_ram {
        (src.ram().snapshot(), got.snapshot.clone().unwrap_or_default())
    } else {
        (Vec::new(), Vec::new())
    };
    if cfg.confidential.enabled && verify_ram {
        blank_mh_region(&mut source_ram);
        blank_mh_region(&mut dest_ram);
    }
    // The source knows what its guest runs; the destination only got the VM's shape.
    let v = verify(src.spec(), &source_ram, &dest_ram, drep.guest_alive);
    Ok(DemoOutcome { report: DemoReport { source: srep, destination: drep, verification: v }, source_ram, dest_ram })
}
