//! Host side of the in-guest Migration Handler (MH): installs the reference MH image into
//! the MH region of guest RAM, runs it on an extra vCPU, and drives its request and
//! completion rings (ABI in `mh-abi`, specified in `docs/mh-protocol.md`).
//!
//! Everything in the shared region is written by the guest too, so every value read back
//! (ring indices, completion ids, counts, slot descriptors) is checked before use; a
//! misbehaving MH yields an [`MhError`], never a host write outside guest RAM.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use mh_abi::{self as abi, CompStatus, Completion, Desc, Kind, Op, Request};

use crate::memory::GuestRam;

/// The reference MH, built from `mh-guest/` by this crate's build script.
pub static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/mh.bin"));

/// Errors of the MH path; each names what the MH or its rings did wrong.
#[derive(Debug, thiserror::Error)]
pub enum MhError {
    #[error("MH image is {0} bytes, the image area holds {max}", max = abi::IMAGE_MAX)]
    ImageTooLarge(usize),
    #[error("guest RAM is too small for the MH region ({0} bytes)")]
    RamTooSmall(u64),
    #[error("guest RAM: {0}")]
    Ram(#[from] crate::Error),
    #[error("the Migration Handler did not report ready within {0:?}")]
    NotReady(Duration),
    #[error("the Migration Handler faulted: {0}")]
    Faulted(String),
    #[error("the Migration Handler stopped answering: {pending} request(s) outstanding after {waited:?}")]
    Timeout { pending: usize, waited: Duration },
    #[error("MH completion ring is corrupt: {0}")]
    BadCompletion(String),
    #[error("MH refused {op:?} of {count} page(s) at gfn {gfn:#x}: {} ({done} done)", status.describe())]
    Refused { op: Op, gfn: u64, count: u32, status: CompStatus, done: u32 },
    #[error("MH slot {slot} holds a {kind:?} blob for gfn {gfn:#x}; expected {want_kind:?} for gfn {want_gfn:#x}")]
    BadSlot { slot: u32, kind: Kind, gfn: u64, want_kind: Kind, want_gfn: u64 },
    #[error("MH request invalid on the host side: {0}")]
    BadRequest(String),
    #[error("the MH speaks ABI version {got}, this host version {want}")]
    Version { got: u32, want: u32 },
}

pub type Result<T> = std::result::Result<T, MhError>;

/// What the host hands the MH at launch: on SEV this is the launch secret (see
/// `docs/mh-protocol.md`); here the VMM writes it into the secret page.
#[derive(Clone)]
pub struct Launch {
    pub key: [u8; 32],
    pub vm_id: u32,
    /// Empty-ring polls before the MH blocks on the doorbell (0: block at once).
    pub spin: u64,
    /// Let the MH export all-zero pages as zero records (which shows the host which
    /// private pages are zero).
    pub zero_records: bool,
}

impl std::fmt::Debug for Launch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Launch")
            .field("vm_id", &self.vm_id)
            .field("spin", &self.spin)
            .field("zero_records", &self.zero_records)
            .finish_non_exhaustive()
    }
}

impl Drop for Launch {
    fn drop(&mut self) {
        // Best effort: do not leave the transport key in freed memory.
        for b in self.key.iter_mut() {
            // SAFETY: `b` is a valid, aligned &mut u8; a volatile write keeps the store.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

/// Write the MH region: page tables, GDT, image, secret; header and rings zeroed.
pub fn install(ram: &GuestRam, launch: &Launch) -> Result<()> {
    if ram.size() < abi::REGION + abi::REGION_SIZE + (2 << 20) {
        return Err(MhError::RamTooSmall(ram.size()));
    }
    if IMAGE.len() as u64 > abi::IMAGE_MAX {
        return Err(MhError::ImageTooLarge(IMAGE.len()));
    }
    ram.zero(abi::REGION, abi::REGION_SIZE)?;
    // The MH's own identity map and GDT, so it never depends on pages that migrate.
    let pt = abi::PAGE_TABLES;
    crate::boot::write_identity_map(ram, pt, pt + 0x1000, pt + 0x2000)?;
    crate::boot::write_gdt(ram, abi::GDT)?;
    ram.write(abi::IMAGE, IMAGE)?;
    ram.write(abi::SECRET + abi::secret::KEY, &launch.key)?;
    ram.write(abi::SECRET + abi::secret::VM_ID, &launch.vm_id.to_le_bytes())?;
    ram.write_u64(abi::SECRET + abi::secret::RAM_SIZE, ram.size())?;
    ram.write_u64(abi::SECRET + abi::secret::ZERO_RECORDS, u64::from(launch.zero_records))?;
    ram.write_u64(abi::SECRET + abi::secret::VALID, 1)?;
    ram.write_u64(abi::HEADER + abi::header::SPIN, launch.spin)?;
    Ok(())
}

/// Doorbells between the host end ([`MhHost`]) and the VMM thread that runs the MH vCPU.
#[derive(Debug, Default)]
pub struct Bell {
    st: Mutex<BellState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
pub struct BellState {
    /// Host -> MH doorbells rung, and the last one the MH thread saw.
    pub rung: u64,
    pub seen: u64,
    /// MH -> host `Done` kicks.
    pub done: u64,
    pub ready: bool,
    pub fault: Option<String>,
    pub exit: bool,
    /// Test hook: the MH vCPU is held off the CPU (an MH that stops answering).
    pub frozen: bool,
    /// The MH thread is parked (frozen or faulted), out of `KVM_RUN`.
    pub parked: bool,
}

impl Bell {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, BellState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub fn notify(&self) {
        self.cv.notify_all();
    }
    /// MH thread: block until the host rings (or `limit` passes, so the MH re-polls).
    pub fn wait_ring(&self, limit: Duration) {
        let mut g = self.lock();
        let until = Instant::now() + limit;
        while g.rung == g.seen && !g.exit && !g.frozen {
            let now = Instant::now();
            if now >= until {
                break;
            }
            g = self.cv.wait_timeout(g, until - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        g.seen = g.rung;
    }
    /// MH thread: park while frozen.
    pub fn wait_thawed(&self) {
        let mut g = self.lock();
        g.parked = true;
        self.cv.notify_all();
        while g.frozen && !g.exit {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.parked = false;
    }
}

/// MH counters from its header page (written by the guest: informational, not trusted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MhCounters {
    pub exported: u64,
    pub imported: u64,
    pub refused: u64,
    pub waits: u64,
    pub requests: u64,
    /// Zero records exported or imported (pages that travelled as a tag alone).
    pub zeros: u64,
    pub complete: bool,
}

/// One encrypted page as it travels: the slot descriptor's fields and the ciphertext.
#[derive(Clone, PartialEq, Eq)]
pub struct Blob {
    pub gfn: u64,
    pub seq: u64,
    pub round: u32,
    pub kind: u32,
    pub tag: [u8; 16],
    pub data: Box<[u8; 4096]>,
}

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Blob(kind {}, gfn {:#x}, round {}, seq {:#x})", self.kind, self.gfn, self.round, self.seq)
    }
}

impl Blob {
    pub fn zeroed() -> Blob {
        Blob { gfn: 0, seq: 0, round: 0, kind: 0, tag: [0; 16], data: Box::new([0; 4096]) }
    }
    /// The slot-descriptor fields.
    pub fn desc(&self) -> Desc {
        Desc { gfn: self.gfn, seq: self.seq, round: self.round, kind: self.kind, tag: self.tag }
    }
}

/// The host's end of the rings of one running MH.
#[derive(Debug)]
pub struct MhHost {
    ram: Arc<GuestRam>,
    bell: Arc<Bell>,
    req_prod: u32,
    comp_cons: u32,
    next_id: u32,
    inflight: VecDeque<Request>,
    /// The oldest this many requests in flight were abandoned: their completions are
    /// still checked for ring integrity, then dropped.
    abandoned: usize,
    /// Completion-ring polls before sleeping on the MH's Done kick.
    pub spin: u32,
    /// How long the MH may take to answer before it is declared dead.
    pub timeout: Duration,
    /// The VM id this MH binds into its blobs.
    pub vm_id: u32,
}

impl MhHost {
    pub fn new(ram: Arc<GuestRam>, bell: Arc<Bell>, timeout: Duration, vm_id: u32) -> MhHost {
        MhHost {
            ram,
            bell,
            req_prod: 0,
            comp_cons: 0,
            next_id: 1,
            inflight: VecDeque::new(),
            abandoned: 0,
            spin: 0,
            timeout,
            vm_id,
        }
    }

    fn atomic(&self, gpa: u64) -> Result<&AtomicU32> {
        let p = self.ram.host_addr(gpa)?;
        debug_assert!(gpa.is_multiple_of(4) && gpa + 4 <= self.ram.size());
        // SAFETY: `gpa` is one of the ring index fields (4-aligned, inside the MH region,
        // checked by host_addr); the mapping lives as long as `self.ram`, which outlives the
        // returned reference. The guest accesses the same word with 32-bit loads and stores.
        Ok(unsafe { &*(p as *const AtomicU32) })
    }

    /// Wait for the MH to report ready (or fault).
    pub fn wait_ready(&self, limit: Duration) -> Result<()> {
        let t0 = Instant::now();
        let mut g = self.bell.lock();
        loop {
            if let Some(f) = &g.fault {
                return Err(MhError::Faulted(f.clone()));
            }
            if g.ready {
                drop(g);
                let mut v = [0u8; 4];
                self.ram.read(abi::HEADER + abi::header::VERSION, &mut v)?;
                let got = u32::from_le_bytes(v);
                if got != abi::VERSION {
                    return Err(MhError::Version { got, want: abi::VERSION });
                }
                return Ok(());
            }
            let left = limit.checked_sub(t0.elapsed()).ok_or(MhError::NotReady(limit))?;
            g = self.bell.cv.wait_timeout(g, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// This MH's challenge: as an importer it opens only blobs bound to it.
    pub fn challenge(&self) -> Result<u64> {
        Ok(self.ram.read_u64(abi::HEADER + abi::header::CHALLENGE)?)
    }

    /// Bind the next export (from its Begin on) to the importing MH's `challenge`.
    pub fn bind_export(&self, challenge: u64) -> Result<()> {
        Ok(self.ram.write_u64(abi::HEADER + abi::header::PEER_CHALLENGE, challenge)?)
    }

    /// Requests posted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Queue a request (the ring must have room: at most [`abi::RING_ENTRIES`] in flight).
    /// Returns the id the completion will carry.
    pub fn submit(&mut self, mut r: Request) -> Result<u32> {
        if self.inflight.len() >= abi::RING_ENTRIES as usize {
            return Err(MhError::BadRequest(format!("{} requests already in flight", self.inflight.len())));
        }
        r.id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let at = abi::REQ_RING + abi::RING_BASE + u64::from(self.req_prod % abi::RING_ENTRIES) * abi::REQ_SIZE;
        self.ram.write(at, &r.encode())?;
        self.req_prod = self.req_prod.wrapping_add(1);
        self.atomic(abi::REQ_RING + abi::RING_PROD)?.store(self.req_prod, Ordering::Release);
        self.inflight.push_back(r);
        Ok(r.id)
    }

    /// Ring the host -> MH doorbell (one per batch of requests).
    pub fn doorbell(&self) {
        self.bell.lock().rung += 1;
        self.bell.notify();
    }

    fn check_fault(&self) -> Result<()> {
        match &self.bell.lock().fault {
            Some(f) => Err(MhError::Faulted(f.clone())),
            None => Ok(()),
        }
    }

    /// Give up on every request in flight: a migration that failed no longer cares how they
    /// end. They still occupy the ring until the MH completes them; their completions are
    /// checked and dropped, so no later caller sees them.
    pub fn abandon(&mut self) {
        self.abandoned = self.inflight.len();
    }

    /// Take the completions posted so far, in request order, each checked against its
    /// request. Does not wait.
    pub fn poll(&mut self) -> Result<Vec<(Request, Completion)>> {
        Ok(self.take_completions()?.1)
    }

    /// [`MhHost::poll`], also counting the completions of abandoned requests it dropped.
    fn take_completions(&mut self) -> Result<(usize, Vec<(Request, Completion)>)> {
        let prod = self.atomic(abi::COMP_RING + abi::RING_PROD)?.load(Ordering::Acquire);
        let avail = prod.wrapping_sub(self.comp_cons);
        if avail as usize > self.inflight.len() {
            return Err(MhError::BadCompletion(format!(
                "producer index {prod} claims {avail} completions, only {} requests are in flight",
                self.inflight.len()
            )));
        }
        let mut out = Vec::with_capacity(avail as usize);
        for _ in 0..avail {
            let at = abi::COMP_RING + abi::RING_BASE + u64::from(self.comp_cons % abi::RING_ENTRIES) * abi::COMP_SIZE;
            let mut raw = [0u8; abi::COMP_SIZE as usize];
            self.ram.read(at, &mut raw)?;
            let c = Completion::decode(&raw);
            let r = self.inflight.pop_front().expect("avail <= inflight");
            if c.id != r.id {
                return Err(MhError::BadCompletion(format!("completion for id {} where id {} was next", c.id, r.id)));
            }
            if CompStatus::from_u32(c.status) == CompStatus::Invalid {
                return Err(MhError::BadCompletion(format!("unknown status {} for request {}", c.status, r.id)));
            }
            if c.done > r.count {
                return Err(MhError::BadCompletion(format!("{} pages done of a {}-page request", c.done, r.count)));
            }
            self.comp_cons = self.comp_cons.wrapping_add(1);
            if self.abandoned > 0 {
                self.abandoned -= 1;
            } else {
                out.push((r, c));
            }
        }
        self.atomic(abi::COMP_RING + abi::RING_CONS)?.store(self.comp_cons, Ordering::Release);
        Ok((avail as usize, out))
    }

    /// Wait until every request in flight completed (or the MH faults / times out).
    pub fn wait_all(&mut self) -> Result<Vec<(Request, Completion)>> {
        self.wait_until(0)
    }

    /// Wait until at most `left` requests are in flight: the oldest ones completed (the MH
    /// serves its ring in order), so a caller can use their slots while the MH works on
    /// the newer ones. Fails if the MH faults or takes longer than `timeout`.
    pub fn wait_until(&mut self, left: usize) -> Result<Vec<(Request, Completion)>> {
        let t0 = Instant::now();
        let mut out = Vec::new();
        let mut spins = 0u32;
        while self.inflight.len() > left {
            let seen = self.bell.lock().done;
            let (n, got) = self.take_completions()?;
            if n > 0 {
                out.extend(got);
                spins = 0;
                continue;
            }
            self.check_fault()?;
            if t0.elapsed() > self.timeout {
                return Err(MhError::Timeout { pending: self.inflight.len(), waited: t0.elapsed() });
            }
            if spins < self.spin {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            // Sleep until the MH kicks Done (bounded, so a lost kick only delays).
            let mut g = self.bell.lock();
            if g.done == seen && g.fault.is_none() {
                g = self.bell.cv.wait_timeout(g, Duration::from_millis(5)).unwrap_or_else(|e| e.into_inner()).0;
            }
            drop(g);
        }
        Ok(out)
    }

    /// The first refusal among `done`, as an error.
    pub fn check(done: &[(Request, Completion)]) -> Result<()> {
        for (r, c) in done {
            let status = CompStatus::from_u32(c.status);
            if status != CompStatus::Ok {
                return Err(MhError::Refused {
                    op: Op::from_u16(r.op),
                    gfn: r.gfn,
                    count: r.count,
                    status,
                    done: c.done,
                });
            }
        }
        Ok(())
    }

    /// Submit `reqs` without waiting and ring the doorbell (at most the ring's room).
    pub fn start(&mut self, reqs: &[Request]) -> Result<()> {
        if reqs.len() + self.inflight.len() > abi::RING_ENTRIES as usize {
            return Err(MhError::BadRequest(format!(
                "{} requests with {} in flight overflow the {}-entry ring",
                reqs.len(),
                self.inflight.len(),
                abi::RING_ENTRIES
            )));
        }
        for r in reqs {
            self.submit(*r)?;
        }
        self.doorbell();
        Ok(())
    }

    /// Submit `reqs` (ringing once per ring-full of requests), wait for all, and fail with
    /// the first refusal. Nothing may be in flight before (the ring's room is counted from
    /// empty); use [`MhHost::start`] and [`MhHost::wait_until`] to keep requests in flight.
    pub fn run(&mut self, reqs: &[Request]) -> Result<()> {
        for chunk in reqs.chunks(abi::RING_ENTRIES as usize) {
            self.start(chunk)?;
            let done = self.wait_all()?;
            Self::check(&done)?;
        }
        Ok(())
    }

    fn check_slot(slot: u32) -> Result<()> {
        if slot >= abi::NSLOTS {
            return Err(MhError::BadRequest(format!("slot {slot} is outside the {} data slots", abi::NSLOTS)));
        }
        Ok(())
    }

    /// A slot's data area is one page.
    fn check_page_buf(data: &[u8]) -> Result<()> {
        if data.len() as u64 != abi::PAGE {
            return Err(MhError::BadRequest(format!("a slot holds 4096 bytes, not {}", data.len())));
        }
        Ok(())
    }

    /// Slot `slot`'s descriptor.
    pub fn read_desc(&self, slot: u32) -> Result<Desc> {
        Self::check_slot(slot)?;
        let mut raw = [0u8; 40];
        self.ram.read(abi::SLOT_DESC + u64::from(slot) * abi::DESC_SIZE, &mut raw)?;
        Ok(Desc::decode(&raw))
    }

    /// Read slot `slot`'s descriptor and copy its data area (4096 bytes) into `data`.
    pub fn read_slot_into(&self, slot: u32, data: &mut [u8]) -> Result<Desc> {
        Self::check_page_buf(data)?;
        let d = self.read_desc(slot)?;
        self.ram.read(abi::SLOTS + u64::from(slot) * abi::PAGE, data)?;
        Ok(d)
    }

    /// An exported blob, checked that the MH labelled it as asked (a Page export may answer
    /// with a zero record). Its ciphertext is copied into `data` (4096 bytes) unless it is a
    /// zero record, which has none.
    pub fn take_slot_into(&self, slot: u32, want_kind: Kind, want_gfn: u64, data: &mut [u8]) -> Result<Desc> {
        Self::check_page_buf(data)?;
        let d = self.read_desc(slot)?;
        let got = Kind::from_u32(d.kind);
        if !got.answers(want_kind) || d.gfn != want_gfn {
            return Err(MhError::BadSlot { slot, kind: got, gfn: d.gfn, want_kind, want_gfn });
        }
        if got.has_data() {
            self.ram.read(abi::SLOTS + u64::from(slot) * abi::PAGE, data)?;
        }
        Ok(d)
    }

    /// Place a blob into slot `slot`: its descriptor and its 4096 bytes of ciphertext, or
    /// no data (a zero record; the MH does not read the data area for one).
    pub fn write_slot_parts(&self, slot: u32, d: &Desc, data: &[u8]) -> Result<()> {
        Self::check_slot(slot)?;
        if !data.is_empty() {
            Self::check_page_buf(data)?;
        }
        self.ram.write(abi::SLOT_DESC + u64::from(slot) * abi::DESC_SIZE, &d.encode())?;
        if !data.is_empty() {
            self.ram.write(abi::SLOTS + u64::from(slot) * abi::PAGE, data)?;
        }
        Ok(())
    }

    /// Copy slot `slot` (descriptor and ciphertext) into `b`.
    pub fn read_slot(&self, slot: u32, b: &mut Blob) -> Result<()> {
        let d = self.read_slot_into(slot, &mut b.data[..])?;
        (b.gfn, b.seq, b.round, b.kind, b.tag) = (d.gfn, d.seq, d.round, d.kind, d.tag);
        Ok(())
    }

    /// Copy an exported slot out and check the MH labelled it as asked (a zero record
    /// leaves `b.data` zero).
    pub fn take_slot(&self, slot: u32, want_kind: Kind, want_gfn: u64, b: &mut Blob) -> Result<()> {
        b.data.fill(0);
        let d = self.take_slot_into(slot, want_kind, want_gfn, &mut b.data[..])?;
        (b.gfn, b.seq, b.round, b.kind, b.tag) = (d.gfn, d.seq, d.round, d.kind, d.tag);
        Ok(())
    }

    /// Place a received blob into slot `slot` for an import.
    pub fn write_slot(&self, slot: u32, b: &Blob) -> Result<()> {
        self.write_slot_parts(slot, &b.desc(), &b.data[..])
    }

    /// The MH's counters (guest-written).
    pub fn counters(&self) -> Result<MhCounters> {
        let h = |f: u64| self.ram.read_u64(abi::HEADER + f);
        Ok(MhCounters {
            exported: h(abi::header::EXPORTED)?,
            imported: h(abi::header::IMPORTED)?,
            refused: h(abi::header::REFUSED)?,
            waits: h(abi::header::WAITS)?,
            requests: h(abi::header::REQUESTS)?,
            zeros: h(abi::header::ZEROS)?,
            complete: h(abi::header::COMPLETE)? == 1,
        })
    }

    /// Test hook: hold the MH vCPU off the CPU (or let it run again), as if the MH hung.
    /// Freezing waits (up to a second) until the MH vCPU is out of `KVM_RUN`: the idle MH
    /// exits on its own within one doorbell wait.
    pub fn set_frozen(&self, frozen: bool) {
        let mut g = self.bell.lock();
        g.frozen = frozen;
        self.bell.notify();
        let until = Instant::now() + Duration::from_secs(1);
        while frozen && !g.parked && Instant::now() < until {
            g = self.bell.cv.wait_timeout(g, Duration::from_millis(10)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Test hook: raw access to guest RAM, e.g. to corrupt the completion ring.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }
}
