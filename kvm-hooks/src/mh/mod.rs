//! Host side of the in-guest Migration Handler (MH): installs the reference MH image into
//! the MH region of guest RAM, runs it on one or more extra vCPUs (lanes), and drives their
//! request and completion rings (ABI in `mh-abi`, specified in `docs/mh-protocol.md`):
//! [`MhHost`] routes each request to the lane that owns its pages, [`lane`] drives one
//! lane's rings.
//!
//! Everything in the shared region is written by the guest too, so every value read back
//! (ring indices, completion ids, counts, slot descriptors) is checked before use; a
//! misbehaving MH yields an [`MhError`], never a host write outside guest RAM.
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use mh_abi::{self as abi, CompStatus, Completion, Desc, Kind, Op, Request};

use crate::memory::GuestRam;

mod lane;
use lane::Lane;

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
    #[error("{got} handler lanes asked for; an MH runs on 1 to {max}", max = abi::MAX_LANES)]
    Lanes { got: u32 },
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
    /// Handler vCPUs (lanes), 1 to [`abi::MAX_LANES`]. Source and destination run the same
    /// count: each blob is bound to it.
    pub lanes: u32,
}

impl std::fmt::Debug for Launch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Launch")
            .field("vm_id", &self.vm_id)
            .field("spin", &self.spin)
            .field("zero_records", &self.zero_records)
            .field("lanes", &self.lanes)
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
    if !(1..=abi::MAX_LANES).contains(&launch.lanes) {
        return Err(MhError::Lanes { got: launch.lanes });
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
    ram.write_u64(abi::SECRET + abi::secret::LANES, u64::from(launch.lanes))?;
    ram.write_u64(abi::SECRET + abi::secret::VALID, 1)?;
    for l in 0..launch.lanes {
        ram.write_u64(abi::lane_addrs(l).header + abi::header::SPIN, launch.spin)?;
    }
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

/// Wait until MH lane `lane`, which rings `bell`, reports ready (or faults), and check it
/// speaks this host's ABI version.
pub fn wait_lane_ready(ram: &GuestRam, bell: &Bell, lane: u32, limit: Duration) -> Result<()> {
    let t0 = Instant::now();
    let mut g = bell.lock();
    loop {
        if let Some(f) = &g.fault {
            return Err(MhError::Faulted(format!("lane {lane}: {f}")));
        }
        if g.ready {
            break;
        }
        let left = limit.checked_sub(t0.elapsed()).ok_or(MhError::NotReady(limit))?;
        g = bell.cv.wait_timeout(g, left).unwrap_or_else(|e| e.into_inner()).0;
    }
    drop(g);
    let mut v = [0u8; 4];
    ram.read(abi::lane_addrs(lane).header + abi::header::VERSION, &mut v)?;
    let got = u32::from_le_bytes(v);
    if got != abi::VERSION {
        return Err(MhError::Version { got, want: abi::VERSION });
    }
    Ok(())
}

/// The host's end of one running MH: its lanes' rings, and the data slots they share.
/// Requests go to the lane that owns their pages (a run that crosses into another lane's
/// granule is split); vCPU state goes through lane 0; a marker names its lane.
#[derive(Debug)]
pub struct MhHost {
    ram: Arc<GuestRam>,
    lanes: Vec<Lane>,
    /// The next [`MhHost::start`] call's number: requests in flight carry theirs.
    next_ticket: u64,
    /// Completion-ring polls before sleeping on the MH's Done kick.
    pub spin: u32,
    /// How long the MH may take to answer before it is declared dead.
    pub timeout: Duration,
    /// The VM id this MH binds into its blobs.
    pub vm_id: u32,
}

impl MhHost {
    /// The host end of an MH that runs one lane per bell (lane `i` on `bells[i]`).
    pub fn new(ram: Arc<GuestRam>, bells: Vec<Arc<Bell>>, timeout: Duration, vm_id: u32) -> MhHost {
        let lanes = bells.into_iter().enumerate().map(|(i, b)| Lane::new(i as u32, ram.clone(), b)).collect();
        MhHost { ram, lanes, next_ticket: 1, spin: 0, timeout, vm_id }
    }

    /// Lanes (handler vCPUs) this MH runs on.
    pub fn lanes(&self) -> u32 {
        self.lanes.len() as u32
    }

    /// Wait for every lane to report ready (or fault) and check it speaks this ABI.
    pub fn wait_ready(&self, limit: Duration) -> Result<()> {
        let t0 = Instant::now();
        for l in &self.lanes {
            wait_lane_ready(&self.ram, &l.bell, l.index, limit.saturating_sub(t0.elapsed()))?;
        }
        Ok(())
    }

    /// Each lane's challenge: as an importer, lane `i` opens only blobs bound to the `i`th.
    pub fn challenges(&self) -> Result<Vec<u64>> {
        self.lanes.iter().map(|l| Ok(self.ram.read_u64(l.addrs.header + abi::header::CHALLENGE)?)).collect()
    }

    /// Bind the next export (from its Begin on) to the importing MH's challenges, one per
    /// lane: the importer must run as many lanes as this MH.
    pub fn bind_export(&self, challenges: &[u64]) -> Result<()> {
        if challenges.len() != self.lanes.len() {
            return Err(MhError::BadRequest(format!(
                "the importing MH runs {} lane(s), this one {}: both must run the same count",
                challenges.len(),
                self.lanes.len()
            )));
        }
        for (l, c) in self.lanes.iter().zip(challenges) {
            self.ram.write_u64(l.addrs.header + abi::header::PEER_CHALLENGE, *c)?;
        }
        Ok(())
    }

    /// Requests posted and not yet completed, over all lanes.
    pub fn in_flight(&self) -> usize {
        self.lanes.iter().map(|l| l.inflight.len()).sum()
    }

    /// The lane requests `r` becomes: a page run per lane granule it touches (in order),
    /// vCPU state on lane 0, a marker on the lane it names, a Reset on every lane.
    fn route(&self, r: &Request) -> Result<Vec<(usize, Request)>> {
        let n = self.lanes.len() as u32;
        Ok(match Op::from_u16(r.op) {
            Op::Export | Op::Import if n > 1 => {
                let mut out = Vec::new();
                let (mut gfn, mut done) = (r.gfn, 0u32);
                while done < r.count {
                    let granule_end = (gfn / abi::GRANULE_PAGES + 1).saturating_mul(abi::GRANULE_PAGES);
                    let take = (granule_end - gfn).min(u64::from(r.count - done)) as u32;
                    let lane = abi::lane_of(gfn, n) as usize;
                    out.push((lane, Request { gfn, count: take, slot: r.slot + done, ..*r }));
                    done += take;
                    gfn += u64::from(take);
                }
                if out.is_empty() {
                    // count 0: the MH refuses it, with its own status.
                    out.push((abi::lane_of(r.gfn, n) as usize, *r));
                }
                out
            }
            Op::Begin | Op::End | Op::Marker => {
                if r.gfn >= u64::from(n) {
                    return Err(MhError::BadRequest(format!("a marker for lane {}; {n} lane(s) run here", r.gfn)));
                }
                vec![(r.gfn as usize, *r)]
            }
            Op::Reset => (0..n as usize).map(|l| (l, *r)).collect(),
            _ => vec![(0, *r)],
        })
    }

    /// Queue one request (routed to its lanes) as a submission of its own, without ringing
    /// a doorbell: the next [`MhHost::start`] or a spinning MH picks it up.
    pub fn submit(&mut self, r: Request) -> Result<()> {
        self.enqueue(std::slice::from_ref(&r), false)
    }

    /// Whether [`MhHost::start`] of `reqs` finds room now in the ring of every lane they go
    /// to (a run split between lanes takes an entry in each).
    pub fn fits(&self, reqs: &[Request]) -> Result<bool> {
        Ok(self.overflow(&self.route_all(reqs)?).is_none())
    }

    /// Submit `reqs` without waiting and ring the doorbells of the lanes they went to (each
    /// lane's ring must have room for its share: [`MhHost::fits`]). One submission:
    /// [`MhHost::wait_until`] counts them.
    pub fn start(&mut self, reqs: &[Request]) -> Result<()> {
        self.enqueue(reqs, true)
    }

    /// The lane requests `reqs` become, in order.
    fn route_all(&self, reqs: &[Request]) -> Result<Vec<(usize, Request)>> {
        let mut routed = Vec::with_capacity(reqs.len());
        for r in reqs {
            routed.extend(self.route(r)?);
        }
        Ok(routed)
    }

    /// The first lane whose ring has no room for its share of `routed`, and that share.
    fn overflow(&self, routed: &[(usize, Request)]) -> Option<(usize, usize)> {
        let mut share = vec![0; self.lanes.len()];
        for (l, _) in routed {
            share[*l] += 1;
        }
        share.into_iter().enumerate().find(|&(i, n)| n > self.lanes[i].room())
    }

    /// Queue `reqs` on their lanes as one submission (all or nothing), ringing the lanes'
    /// doorbells if `ring`.
    fn enqueue(&mut self, reqs: &[Request], ring: bool) -> Result<()> {
        let routed = self.route_all(reqs)?;
        if let Some((i, want)) = self.overflow(&routed) {
            return Err(MhError::BadRequest(format!(
                "{want} requests for lane {i} with {} in flight overflow its {}-entry ring",
                self.lanes[i].inflight.len(),
                abi::RING_ENTRIES
            )));
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let mut used = vec![false; self.lanes.len()];
        for (i, r) in routed {
            self.lanes[i].submit(r, ticket)?;
            used[i] = true;
        }
        for (l, _) in self.lanes.iter().zip(&used).filter(|(_, u)| ring && **u) {
            l.doorbell();
        }
        Ok(())
    }

    /// Give up on every request in flight: a migration that failed no longer cares how they
    /// end. They still occupy the rings until the MH completes them; their completions are
    /// checked and dropped, so no later caller sees them.
    pub fn abandon(&mut self) {
        for l in &mut self.lanes {
            l.abandon();
        }
    }

    /// Take the completions posted so far, lane by lane, each in request order and checked
    /// against its request. Does not wait.
    pub fn poll(&mut self) -> Result<Vec<(Request, Completion)>> {
        let mut out = Vec::new();
        for l in &mut self.lanes {
            out.extend(l.take_completions()?.1);
        }
        Ok(out)
    }

    /// Wait until every request in flight completed (or the MH faults / times out).
    pub fn wait_all(&mut self) -> Result<Vec<(Request, Completion)>> {
        self.wait_until(0)
    }

    /// Wait until only the requests of the newest `keep` submissions ([`MhHost::start`]
    /// calls) may still be in flight: the older ones completed (each lane serves its ring in
    /// order), so a caller can use their slots while the MH works on the newer ones. Fails
    /// if the MH faults or takes longer than `timeout`.
    pub fn wait_until(&mut self, keep: usize) -> Result<Vec<(Request, Completion)>> {
        let older_than = self.next_ticket.saturating_sub(keep as u64);
        let t0 = Instant::now();
        let mut out = Vec::new();
        let mut spins = 0u32;
        while let Some(i) = self.lanes.iter().position(|l| l.holds_older_than(older_than)) {
            let lane = &mut self.lanes[i];
            let seen = lane.bell.lock().done;
            let (n, got) = lane.take_completions()?;
            if n > 0 {
                out.extend(got);
                spins = 0;
                continue;
            }
            lane.check_fault()?;
            if t0.elapsed() > self.timeout {
                return Err(MhError::Timeout { pending: self.in_flight(), waited: t0.elapsed() });
            }
            if spins < self.spin {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            // Sleep until the lane kicks Done (bounded, so a lost kick only delays).
            let mut g = lane.bell.lock();
            if g.done == seen && g.fault.is_none() {
                g = lane.bell.cv.wait_timeout(g, Duration::from_millis(5)).unwrap_or_else(|e| e.into_inner()).0;
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

    /// Submit `reqs`, wait for all, and fail with the first refusal. Nothing may be in
    /// flight before (the rings' room is counted from empty); use [`MhHost::start`] and
    /// [`MhHost::wait_until`] to keep requests in flight. With several lanes, markers and
    /// resets run one at a time, in order: lanes do not wait for each other.
    pub fn run(&mut self, reqs: &[Request]) -> Result<()> {
        let ordered = |r: &Request| matches!(Op::from_u16(r.op), Op::Begin | Op::End | Op::Marker | Op::Reset);
        let mut rest = reqs;
        while !rest.is_empty() {
            let n = if self.lanes.len() > 1 && ordered(&rest[0]) {
                1
            } else {
                let mut cap = rest.len().min(abi::RING_ENTRIES as usize);
                if self.lanes.len() > 1 {
                    cap = rest[..cap].iter().position(ordered).unwrap_or(cap);
                    // As many as every lane's ring holds once split between lanes.
                    while cap > 1 && !self.fits(&rest[..cap])? {
                        cap -= 1;
                    }
                }
                cap
            };
            self.start(&rest[..n])?;
            let done = self.wait_all()?;
            Self::check(&done)?;
            rest = &rest[n..];
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

    /// The MH's counters (guest-written), summed over its lanes; complete once every lane
    /// reports its import complete.
    pub fn counters(&self) -> Result<MhCounters> {
        let mut c = MhCounters { complete: true, ..MhCounters::default() };
        for l in &self.lanes {
            let h = |f: u64| self.ram.read_u64(l.addrs.header + f);
            c.exported += h(abi::header::EXPORTED)?;
            c.imported += h(abi::header::IMPORTED)?;
            c.refused += h(abi::header::REFUSED)?;
            c.waits += h(abi::header::WAITS)?;
            c.requests += h(abi::header::REQUESTS)?;
            c.zeros += h(abi::header::ZEROS)?;
            c.complete &= h(abi::header::COMPLETE)? == 1;
        }
        Ok(c)
    }

    /// Test hook: hold the MH vCPU off the CPU (or let it run again), as if the MH hung.
    /// Freezing waits (up to a second) until the MH vCPU is out of `KVM_RUN`: the idle MH
    /// exits on its own within one doorbell wait.
    pub fn set_frozen(&self, frozen: bool) {
        for l in &self.lanes {
            let mut g = l.bell.lock();
            g.frozen = frozen;
            l.bell.notify();
            let until = Instant::now() + Duration::from_secs(1);
            while frozen && !g.parked && Instant::now() < until {
                g = l.bell.cv.wait_timeout(g, Duration::from_millis(10)).unwrap_or_else(|e| e.into_inner()).0;
            }
        }
    }

    /// Test hook: submit `reqs` to lane `lane` as they are, unrouted (a host that sends a
    /// lane pages or markers it does not own).
    pub fn start_on(&mut self, lane: u32, reqs: &[Request]) -> Result<()> {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let l = self.lanes.get_mut(lane as usize).ok_or_else(|| MhError::BadRequest(format!("no lane {lane}")))?;
        for r in reqs {
            l.submit(*r, ticket)?;
        }
        l.doorbell();
        Ok(())
    }

    /// Test hook: raw access to guest RAM, e.g. to corrupt the completion ring.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(lanes: usize) -> MhHost {
        let ram = Arc::new(GuestRam::new(64 << 20).unwrap());
        MhHost::new(ram, (0..lanes).map(|_| Arc::new(Bell::default())).collect(), Duration::ZERO, 1)
    }

    fn req(op: Op, gfn: u64, count: u32, slot: u32) -> Request {
        Request { op: op as u16, id: 0, count, slot, gfn, round: 1 }
    }

    #[test]
    fn requests_go_to_the_lanes_that_own_their_pages() {
        let g = abi::GRANULE_PAGES;
        // One lane: nothing is split.
        let one = host(1);
        assert_eq!(
            one.route(&req(Op::Export, 10 * g - 3, 100, 5)).unwrap(),
            [(0, req(Op::Export, 10 * g - 3, 100, 5))]
        );
        // Three lanes: a run is cut at granule boundaries, each piece keeps its slots.
        let three = host(3);
        let r = three.route(&req(Op::Import, 10 * g - 3, 3 + g as u32 + 2, 5)).unwrap();
        assert_eq!(
            r,
            [
                (0, req(Op::Import, 10 * g - 3, 3, 5)),
                (1, req(Op::Import, 10 * g, g as u32, 8)),
                (2, req(Op::Import, 11 * g, 2, 8 + g as u32)),
            ]
        );
        assert_eq!(three.route(&req(Op::Marker, 2, 1, 0)).unwrap(), [(2, req(Op::Marker, 2, 1, 0))]);
        assert!(matches!(three.route(&req(Op::End, 3, 1, 0)), Err(MhError::BadRequest(_))));
        assert_eq!(three.route(&req(Op::RestoreCpu, 0, 2, 0)).unwrap().len(), 1);
        assert_eq!(three.route(&req(Op::Reset, 0, 1, 0)).unwrap().iter().map(|x| x.0).collect::<Vec<_>>(), [0, 1, 2]);
        // A zero-page run still reaches a lane, which refuses it.
        assert_eq!(three.route(&req(Op::Export, 4 * g, 0, 0)).unwrap(), [(1, req(Op::Export, 4 * g, 0, 0))]);
    }

    #[test]
    fn a_submission_fits_only_where_every_lane_has_room() {
        let g = abi::GRANULE_PAGES;
        let mut h = host(2);
        // 40 two-page runs, each across a granule boundary: 40 entries in each lane's ring.
        let reqs: Vec<Request> = (0..40).map(|i| req(Op::Export, (2 * i + 1) * g - 1, 2, 2 * i as u32)).collect();
        assert!(h.fits(&reqs).unwrap());
        h.start(&reqs).unwrap();
        assert_eq!(h.in_flight(), 80);
        // 30 more would overflow both rings (64 entries each): refused whole, nothing queued.
        assert!(!h.fits(&reqs[..30]).unwrap());
        assert!(matches!(h.start(&reqs[..30]), Err(MhError::BadRequest(_))));
        assert_eq!(h.in_flight(), 80);
        assert!(h.fits(&reqs[..24]).unwrap());
    }
}
