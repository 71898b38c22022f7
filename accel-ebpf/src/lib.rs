//! accel-ebpf: watch KVM from the outside with BPF programs on its tracepoints.
//!
//! A process that does not own a VM gets `EIO` on every KVM ioctl, so it cannot harvest the
//! dirty ring. It can watch what KVM does for any VM through tracepoints:
//! - [`DirtyProbe`]: `kvm:kvm_dirty_ring_push` → a per-guest-page bitmap in a
//!   `BPF_F_MMAPABLE` array, harvested by atomic swaps on the mapping (no syscall);
//! - [`PageStateProbe`]: `kvm:kvm_hypercall` (`KVM_HC_MAP_GPA_RANGE`) and
//!   `kvm:kvm_vmgexit_enter` (SNP page-state change) → a BPF ring buffer drained
//!   concurrently into a [`PageStates`] map (shared vs private per page).
//!
//! The programs are C (`bpf/migaccel.bpf.c`), compiled by clang in `build.rs` and loaded with
//! aya. Everything is detached and freed when the probe is dropped, and by the kernel when
//! the process dies (no pinning).
#![deny(clippy::undocumented_unsafe_blocks)]

use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use aya::maps::{Array, Map, MapData, PerCpuArray, RingBuf};
use aya::programs::RawTracePoint;
use aya::{Ebpf, EbpfLoader, RawTracePointRunOptions, TestRun};
use memmap2::{MmapOptions, MmapRaw};

pub mod qemu;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/migaccel.bpf.o"));

/// Words in the dirty bitmap map (`MAX_WORDS` in the C source): 64 GiB of guest space.
pub const MAX_WORDS: usize = 1 << 18;
/// Memslots the dirty program can translate.
pub const MAX_SLOTS: u32 = 512;
const TRACEFS: &str = "/sys/kernel/tracing";

/// What went wrong while setting up or using a probe; each says which step and why.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("tracefs is not mounted at {TRACEFS} and mounting it failed ({0}); run as root or mount it")]
    Tracefs(String),
    #[error("tracepoint kvm:{0} does not exist on this kernel")]
    TracepointMissing(&'static str),
    #[error("loading the BPF object failed: {0} (needs root or CAP_BPF + CAP_PERFMON)")]
    Load(String),
    #[error("BPF program {program}: {step} failed: {msg}")]
    Program { program: &'static str, step: &'static str, msg: String },
    #[error("BPF map {map}: {msg}")]
    Map { map: &'static str, msg: String },
    #[error("guest layout: {0}")]
    Layout(String),
}

fn perr(program: &'static str, step: &'static str) -> impl Fn(aya::programs::ProgramError) -> EbpfError {
    move |e| {
        let mut msg = e.to_string();
        let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        EbpfError::Program { program, step, msg }
    }
}

/// Make sure tracefs is mounted and the KVM tracepoints we need exist.
pub fn ensure_tracepoints(names: &[&'static str]) -> Result<(), EbpfError> {
    let events = Path::new(TRACEFS).join("events");
    if !events.join("kvm").exists() {
        let src = std::ffi::CString::new("nodev").expect("no NUL");
        let dst = std::ffi::CString::new(TRACEFS).expect("no NUL");
        let fs = std::ffi::CString::new("tracefs").expect("no NUL");
        // SAFETY: all three are valid NUL-terminated strings; no data argument is passed.
        let r = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
        if r != 0 && !events.join("kvm").exists() {
            return Err(EbpfError::Tracefs(std::io::Error::last_os_error().to_string()));
        }
    }
    for n in names {
        if !events.join("kvm").join(n).exists() {
            return Err(EbpfError::TracepointMissing(n));
        }
    }
    Ok(())
}

/// Which threads' KVM activity a probe records.
#[derive(Debug, Clone)]
pub enum Target {
    /// Every thread of this process (a foreign VMM such as QEMU).
    Process(u32),
    /// Only these threads (the vCPU threads of a VM this process owns).
    Threads(Vec<u32>),
    /// Everything (synthetic test runs).
    Any,
}

/// Thread ids the filter bitmap covers (PID_MAX_LIMIT on 64-bit).
const TID_LIMIT: u32 = 1 << 22;

fn load(target: &Target) -> Result<Ebpf, EbpfError> {
    let (tgid, use_tids) = match target {
        Target::Process(p) => (*p, 0u32),
        Target::Threads(_) => (0, 1),
        Target::Any => (0, 0),
    };
    let mut ebpf = EbpfLoader::new()
        .override_global("target_tgid", &tgid, true)
        .override_global("use_tids", &use_tids, true)
        .load(OBJECT)
        .map_err(|e| EbpfError::Load(e.to_string()))?;
    if let Target::Threads(ts) = target {
        let merr = |e: String| EbpfError::Map { map: "tid_bits", msg: e };
        let mut m: Array<_, u64> = Array::try_from(ebpf.map_mut("tid_bits").ok_or_else(|| merr("missing".into()))?)
            .map_err(|e| merr(e.to_string()))?;
        let mut words: std::collections::BTreeMap<u32, u64> = std::collections::BTreeMap::new();
        for &t in ts {
            if t >= TID_LIMIT {
                return Err(merr(format!("thread id {t} is beyond the filter's {TID_LIMIT} ids")));
            }
            *words.entry(t / 64).or_default() |= 1 << (t % 64);
        }
        for (w, bits) in words {
            m.set(w, bits, 0).map_err(|e| merr(e.to_string()))?;
        }
    }
    Ok(ebpf)
}

/// Fill the program's memslot table: slot `i` covers `slots[i] = (first_gfn, pages)`.
fn set_slots(ebpf: &mut Ebpf, slots: &[(u64, u64)]) -> Result<(), EbpfError> {
    let merr = |e: String| EbpfError::Map { map: "slots", msg: e };
    let mut a: Array<_, Slot> = Array::try_from(ebpf.map_mut("slots").ok_or_else(|| merr("missing".into()))?)
        .map_err(|e| merr(e.to_string()))?;
    for (i, &(first_gfn, pages)) in slots.iter().enumerate() {
        a.set(i as u32, Slot { first_gfn, pages }, 0).map_err(|e| merr(e.to_string()))?;
    }
    Ok(())
}

fn raw_tp<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut RawTracePoint, EbpfError> {
    ebpf.program_mut(name)
        .ok_or(EbpfError::Program { program: name, step: "lookup", msg: "not in the object".into() })?
        .try_into()
        .map_err(perr(name, "type"))
}

/// Counters kept by the programs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProbeStats {
    pub pushes: u64,
    /// Unused since the program sets bits without fetching (kept for the counter layout).
    pub new_bits: u64,
    /// Pushes that could not be recorded: any loss means the bitmap is incomplete.
    pub lost: u64,
    pub page_state_events: u64,
    pub page_state_dropped: u64,
    pub ghcb_unreadable: u64,
}

fn read_stats(ebpf: &Ebpf) -> Result<ProbeStats, EbpfError> {
    let a: PerCpuArray<_, u64> =
        PerCpuArray::try_from(ebpf.map("stats").ok_or(EbpfError::Map { map: "stats", msg: "missing".into() })?)
            .map_err(|e| EbpfError::Map { map: "stats", msg: e.to_string() })?;
    let g = |i: u32| a.get(&i, 0).map(|v| v.iter().sum::<u64>()).unwrap_or(0);
    Ok(ProbeStats {
        pushes: g(0),
        new_bits: g(1),
        lost: g(2),
        page_state_events: g(3),
        page_state_dropped: g(4),
        ghcb_unreadable: g(5),
    })
}

/// One memslot as the dirty program sees it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    first_gfn: u64,
    pages: u64,
}
// SAFETY: repr(C), two u64 fields, no padding: every bit pattern is valid.
unsafe impl aya::Pod for Slot {}

/// Dirty pages of one VM, recorded by BPF on `kvm_dirty_ring_push` into an mmapped bitmap.
pub struct DirtyProbe {
    // Field order: the mapping goes before the object that owns the map fd.
    bitmap: MmapRaw,
    words: usize,
    ebpf: Ebpf,
}

impl DirtyProbe {
    /// Attach for `target`, translating memslot `i` (as KVM numbers it) by `slots[i] =
    /// (first_gfn, pages)`.
    pub fn attach(target: Target, slots: &[(u64, u64)]) -> Result<DirtyProbe, EbpfError> {
        ensure_tracepoints(&["kvm_dirty_ring_push"])?;
        if slots.len() > MAX_SLOTS as usize {
            return Err(EbpfError::Layout(format!("{} memslots, at most {MAX_SLOTS}", slots.len())));
        }
        let end = slots.iter().map(|&(g, p)| g + p).max().unwrap_or(0);
        let words = end.div_ceil(64) as usize;
        if words > MAX_WORDS {
            return Err(EbpfError::Layout(format!(
                "guest frames up to {end} exceed the bitmap's {} pages",
                MAX_WORDS * 64
            )));
        }
        let mut ebpf = load(&target)?;
        set_slots(&mut ebpf, slots)?;
        let bitmap = {
            let Some(Map::Array(md)) = ebpf.map("dirty_bitmap") else {
                return Err(EbpfError::Map { map: "dirty_bitmap", msg: "missing or not an array".into() });
            };
            map_bitmap(md)?
        };
        let p = raw_tp(&mut ebpf, "dirty_ring_push")?;
        p.load().map_err(perr("dirty_ring_push", "verifier load"))?;
        p.attach("kvm_dirty_ring_push").map_err(perr("dirty_ring_push", "attach to kvm:kvm_dirty_ring_push"))?;
        Ok(DirtyProbe { bitmap, words, ebpf })
    }

    /// Take every recorded page (atomic swap of each word to 0) and call `f(gfn)` for each.
    /// Returns the number of pages.
    pub fn harvest(&self, f: impl FnMut(u64)) -> u64 {
        harvest_bitmap(&self.bitmap, self.words, f)
    }

    pub fn stats(&self) -> Result<ProbeStats, EbpfError> {
        read_stats(&self.ebpf)
    }

    /// Kernel-counted runs and run time of the program (advances only while a
    /// [`RunTimeStats`] is held).
    pub fn run_time(&self) -> Result<RunTime, EbpfError> {
        run_time(&self.ebpf, "dirty_ring_push")
    }
}

impl kvm_hooks::dirty::ExternalDirtySource for DirtyProbe {
    fn harvest(&self, f: &mut dyn FnMut(u64)) -> Result<u64, String> {
        let before = self.stats().map_err(|e| e.to_string())?.lost;
        let n = DirtyProbe::harvest(self, f);
        let lost = self.stats().map_err(|e| e.to_string())?.lost;
        if lost != before {
            return Err(format!("the BPF program lost {} dirty-page records", lost - before));
        }
        Ok(n)
    }
    fn name(&self) -> &'static str {
        "ebpf kvm_dirty_ring_push bitmap"
    }
}

/// Dirty-ring pushes per memslot of a VM this process does not own (`migaccel watch`): its
/// memslot layout cannot be learned from outside, so pages are counted, not mapped.
pub struct DirtyCounter {
    ebpf: Ebpf,
}

/// Pushes seen for one memslot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotPushes {
    /// KVM address space (1 = SMM).
    pub address_space: u32,
    pub slot: u32,
    pub pushes: u64,
}

impl DirtyCounter {
    pub fn attach(target: Target) -> Result<DirtyCounter, EbpfError> {
        ensure_tracepoints(&["kvm_dirty_ring_push"])?;
        let mut ebpf = load(&target)?;
        let p = raw_tp(&mut ebpf, "dirty_count")?;
        p.load().map_err(perr("dirty_count", "verifier load"))?;
        p.attach("kvm_dirty_ring_push").map_err(perr("dirty_count", "attach to kvm:kvm_dirty_ring_push"))?;
        Ok(DirtyCounter { ebpf })
    }

    /// Memslots with at least one push so far (totals since attach).
    pub fn counts(&self) -> Result<Vec<SlotPushes>, EbpfError> {
        let merr = |e: String| EbpfError::Map { map: "slot_pushes", msg: e };
        let a: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("slot_pushes").ok_or_else(|| merr("missing".into()))?)
                .map_err(|e| merr(e.to_string()))?;
        let mut out = Vec::new();
        for key in 0..2 * MAX_SLOTS {
            let n: u64 = a.get(&key, 0).map_err(|e| merr(e.to_string()))?.iter().sum();
            if n > 0 {
                out.push(SlotPushes { address_space: key / MAX_SLOTS, slot: key % MAX_SLOTS, pushes: n });
            }
        }
        Ok(out)
    }

    pub fn stats(&self) -> Result<ProbeStats, EbpfError> {
        read_stats(&self.ebpf)
    }
}

/// An empty program on `kvm_dirty_ring_push` (benchmarks: the cost floor of any probe).
pub struct NoopProbe {
    ebpf: Ebpf,
}

/// How often a program ran and for how long, as the kernel counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunTime {
    pub runs: u64,
    pub time: Duration,
}

/// Kernel run-time accounting of BPF programs (`BPF_ENABLE_STATS`), on while this is held.
/// It adds two clock reads to every run, so never hold it while measuring a probe's overhead.
pub struct RunTimeStats {
    _fd: std::os::fd::OwnedFd,
}

impl RunTimeStats {
    pub fn enable() -> Result<RunTimeStats, EbpfError> {
        aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .map(|fd| RunTimeStats { _fd: fd })
            .map_err(|e| EbpfError::Load(format!("BPF_ENABLE_STATS: {e}")))
    }
}

fn run_time(ebpf: &Ebpf, name: &'static str) -> Result<RunTime, EbpfError> {
    let p = ebpf.program(name).ok_or(EbpfError::Program { program: name, step: "lookup", msg: "missing".into() })?;
    let info = p.info().map_err(perr(name, "BPF_OBJ_GET_INFO_BY_FD"))?;
    Ok(RunTime { runs: info.run_count(), time: info.run_time() })
}

impl NoopProbe {
    pub fn attach() -> Result<NoopProbe, EbpfError> {
        ensure_tracepoints(&["kvm_dirty_ring_push"])?;
        let mut ebpf = load(&Target::Any)?;
        let p = raw_tp(&mut ebpf, "dirty_noop")?;
        p.load().map_err(perr("dirty_noop", "verifier load"))?;
        p.attach("kvm_dirty_ring_push").map_err(perr("dirty_noop", "attach"))?;
        Ok(NoopProbe { ebpf })
    }

    pub fn run_time(&self) -> Result<RunTime, EbpfError> {
        run_time(&self.ebpf, "dirty_noop")
    }
}

/// Take every bit set in the first `words` words of a mapped BPF bitmap (an atomic swap of
/// each word to 0, as the programs set bits atomically) and call `f(bit)` for each.
/// Returns the number of bits.
fn harvest_bitmap(bitmap: &MmapRaw, words: usize, mut f: impl FnMut(u64)) -> u64 {
    assert!(words <= MAX_WORDS && bitmap.len() >= words * 8, "the bitmap mapping holds {words} words");
    let base = bitmap.as_mut_ptr().cast::<AtomicU64>();
    let mut n = 0;
    for i in 0..words {
        // SAFETY: i < words, and the mapping holds at least `words` u64 values (checked
        // above), 8-byte aligned (page-aligned mapping); the kernel updates them with
        // atomic ops, so we do too.
        let w = unsafe { &*base.add(i) };
        if w.load(Ordering::Relaxed) == 0 {
            continue;
        }
        let mut bits = w.swap(0, Ordering::AcqRel);
        while bits != 0 {
            f(i as u64 * 64 + u64::from(bits.trailing_zeros()));
            bits &= bits - 1;
            n += 1;
        }
    }
    n
}

fn map_bitmap(md: &MapData) -> Result<MmapRaw, EbpfError> {
    MmapOptions::new()
        .len(MAX_WORDS * 8)
        .map_raw(md.fd().as_fd().as_raw_fd())
        .map_err(|e| EbpfError::Map { map: "dirty_bitmap", msg: format!("mmap (BPF_F_MMAPABLE): {e}") })
}

// ---- page state ---------------------------------------------------------------------------

/// Kinds of page-state events (`PS_*` in the C source).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageStateKind {
    /// `KVM_HC_MAP_GPA_RANGE` hypercall.
    MapGpaRange,
    /// SNP page-state change VMGEXIT (the entries live in guest memory).
    SnpPsc,
    Unknown(u32),
}

/// Event flags set by the program: the event must not be applied as is.
pub const PSF_UNALIGNED: u32 = 1;
pub const PSF_ZERO_PAGES: u32 = 2;
pub const PSF_HUGE: u32 = 4;
pub const PSF_OVERFLOW: u32 = 8;
/// `KVM_MAP_GPA_RANGE_ENCRYPTED`.
pub const ATTR_ENCRYPTED: u64 = 1 << 4;

/// One page-state event as the program wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageStateEvent {
    pub kind: PageStateKind,
    pub flags: u32,
    pub gpa: u64,
    pub npages: u64,
    pub attrs: u64,
    pub tgid: u32,
    pub vcpu: u32,
}

impl PageStateEvent {
    /// Decode the program's 40-byte record; `None` for a malformed one.
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < 40 {
            return None;
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
        let kind = match u32_at(0) {
            1 => PageStateKind::MapGpaRange,
            2 => PageStateKind::SnpPsc,
            k => PageStateKind::Unknown(k),
        };
        Some(PageStateEvent {
            kind,
            flags: u32_at(4),
            gpa: u64_at(8),
            npages: u64_at(16),
            attrs: u64_at(24),
            tgid: u32_at(32),
            vcpu: u32_at(36),
        })
    }
}

/// Shared/private state of every guest page, as the guest last announced it. Pages start
/// private (the safe default for a confidential guest: never read by the host).
#[derive(Debug)]
pub struct PageStates {
    private: Vec<u64>,
    pages: u64,
    pub applied: u64,
    pub rejected: u64,
    /// SNP page-state changes seen (their entries are in guest memory; the engine must
    /// treat affected pages conservatively).
    pub snp_requests: u64,
}

impl PageStates {
    pub fn new(pages: u64) -> Self {
        PageStates {
            private: vec![u64::MAX; pages.div_ceil(64) as usize],
            pages,
            applied: 0,
            rejected: 0,
            snp_requests: 0,
        }
    }
    pub fn is_private(&self, gfn: u64) -> bool {
        self.private.get((gfn / 64) as usize).is_none_or(|w| w & (1 << (gfn % 64)) != 0)
    }
    /// One bit per page, set for a shared page.
    pub fn shared_bitmap(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.private.iter().map(|w| !w).collect();
        if !self.pages.is_multiple_of(64) {
            if let Some(last) = v.last_mut() {
                *last &= (1u64 << (self.pages % 64)) - 1;
            }
        }
        v
    }
    /// Apply one event; returns why it was rejected, if it was.
    pub fn apply(&mut self, e: &PageStateEvent) -> Result<(), String> {
        match e.kind {
            PageStateKind::MapGpaRange => {}
            PageStateKind::SnpPsc => {
                self.snp_requests += 1;
                return Ok(());
            }
            PageStateKind::Unknown(k) => {
                self.rejected += 1;
                return Err(format!("unknown event kind {k}"));
            }
        }
        if e.flags != 0 {
            self.rejected += 1;
            return Err(format!("MAP_GPA_RANGE gpa {:#x} npages {} rejected (flags {:#x})", e.gpa, e.npages, e.flags));
        }
        let first = e.gpa / 4096;
        match first.checked_add(e.npages) {
            Some(end) if end <= self.pages => {
                let private = e.attrs & ATTR_ENCRYPTED != 0;
                for g in first..end {
                    let (w, b) = ((g / 64) as usize, 1u64 << (g % 64));
                    if private {
                        self.private[w] |= b;
                    } else {
                        self.private[w] &= !b;
                    }
                }
                self.applied += 1;
                Ok(())
            }
            _ => {
                self.rejected += 1;
                Err(format!(
                    "MAP_GPA_RANGE gpa {:#x} npages {} is outside guest RAM ({} pages)",
                    e.gpa, e.npages, self.pages
                ))
            }
        }
    }
}

/// Page-state changes of one VM, drained concurrently from the BPF ring buffer.
pub struct PageStateProbe {
    states: Arc<Mutex<PageStates>>,
    /// Shared by the drain thread and [`PageStateProbe::sync`].
    rb: Arc<Mutex<RingBuf<MapData>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    ebpf: Arc<Mutex<Ebpf>>,
    /// The first request a replay could not feed through the program (the map then misses it).
    replay_failure: Mutex<Option<String>>,
}

impl PageStateProbe {
    /// Attach to `kvm_hypercall` and `kvm_vmgexit_enter` for `target`'s VM of `pages` pages.
    pub fn attach(target: Target, pages: u64) -> Result<PageStateProbe, EbpfError> {
        ensure_tracepoints(&["kvm_hypercall", "kvm_vmgexit_enter"])?;
        let mut ebpf = load(&target)?;
        for (prog, tp) in [("map_gpa_range", "kvm_hypercall"), ("vmgexit_psc", "kvm_vmgexit_enter")] {
            let name: &'static str = prog;
            let p = raw_tp(&mut ebpf, name)?;
            p.load().map_err(perr(name, "verifier load"))?;
            p.attach(tp).map_err(perr(name, "attach"))?;
        }
        let rb = RingBuf::try_from(
            ebpf.take_map("page_state_events")
                .ok_or(EbpfError::Map { map: "page_state_events", msg: "missing".into() })?,
        )
        .map_err(|e| EbpfError::Map { map: "page_state_events", msg: e.to_string() })?;
        let states = Arc::new(Mutex::new(PageStates::new(pages)));
        let rb = Arc::new(Mutex::new(rb));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s, st) = (rb.clone(), states.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("page-state".into())
            .spawn(move || drain(r, s, st))
            .map_err(|e| EbpfError::Load(format!("spawn drain thread: {e}")))?;
        Ok(PageStateProbe {
            states,
            rb,
            stop,
            thread: Some(thread),
            ebpf: Arc::new(Mutex::new(ebpf)),
            replay_failure: Mutex::new(None),
        })
    }

    /// Apply every event the programs have written so far, without waiting for the drain
    /// thread; returns how many were applied or rejected.
    pub fn sync(&self) -> usize {
        drain_pending(&self.rb, &self.states)
    }

    /// [`PageStateProbe::replay_map_gpa_range`] for a VMM's page-state hook: a failure is
    /// kept, and makes [`kvm_hooks::migratable::ExternalPageStates::shared_bitmap`] refuse.
    pub fn replay_request(&self, r: &kvm_hooks::migratable::PageStateRequest) {
        if let Err(e) = self.replay_map_gpa_range(r.gpa, r.npages, r.attrs) {
            let mut f = self.replay_failure.lock().unwrap_or_else(|e| e.into_inner());
            f.get_or_insert_with(|| format!("gpa {:#x} npages {} from vCPU {}: {e}", r.gpa, r.npages, r.vcpu));
        }
    }

    pub fn states(&self) -> &Arc<Mutex<PageStates>> {
        &self.states
    }

    /// Feed one `MAP_GPA_RANGE(gpa, npages, attrs)` through the attached `kvm_hypercall`
    /// program with `BPF_PROG_TEST_RUN` (for guests whose hypercalls the tracepoint does not
    /// see, like the embedded VMM's CPL 3 guests under PVM). The event takes the normal
    /// path: ring buffer, drain thread, page-state map.
    pub fn replay_map_gpa_range(&self, gpa: u64, npages: u64, attrs: u64) -> Result<(), EbpfError> {
        let mut g = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
        let p = raw_tp(&mut g, "map_gpa_range")?;
        let mut opts = RawTracePointRunOptions::new();
        opts.args[..4].copy_from_slice(&[12, gpa, npages, attrs]);
        p.test_run(opts).map_err(perr("map_gpa_range", "BPF_PROG_TEST_RUN"))?;
        Ok(())
    }

    pub fn stats(&self) -> Result<ProbeStats, EbpfError> {
        read_stats(&self.ebpf.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl kvm_hooks::migratable::ExternalPageStates for PageStateProbe {
    fn shared_bitmap(&self) -> Result<Vec<u64>, String> {
        self.sync();
        if let Some(f) = self.replay_failure.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            return Err(format!("a page-state request never reached the BPF map: {f}"));
        }
        let dropped = self.stats().map_err(|e| e.to_string())?.page_state_dropped;
        if dropped > 0 {
            return Err(format!("{dropped} page-state event(s) were dropped (BPF ring buffer full)"));
        }
        let s = self.states.lock().unwrap_or_else(|e| e.into_inner());
        if s.snp_requests > 0 {
            // Their entries are in guest memory: which pages changed is unknown here.
            return Err(format!(
                "{} SNP page-state change(s) seen; their entries are in guest memory, so the map cannot say \
                 which pages changed",
                s.snp_requests
            ));
        }
        Ok(s.shared_bitmap())
    }

    fn describe(&self) -> String {
        let s = self.states.lock().unwrap_or_else(|e| e.into_inner());
        format!("eBPF page-state map ({} events applied, {} rejected)", s.applied, s.rejected)
    }
}

impl Drop for PageStateProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Decode and apply every event in the ring buffer; returns how many there were.
fn drain_pending(rb: &Mutex<RingBuf<MapData>>, states: &Mutex<PageStates>) -> usize {
    let mut rb = rb.lock().unwrap_or_else(|e| e.into_inner());
    let mut n = 0;
    while let Some(item) = rb.next() {
        n += 1;
        let mut s = states.lock().unwrap_or_else(|e| e.into_inner());
        match PageStateEvent::decode(&item) {
            Some(e) => {
                if let Err(why) = s.apply(&e) {
                    tracing::warn!("page-state event ignored: {why}");
                }
            }
            None => {
                s.rejected += 1;
                tracing::warn!("page-state record of {} bytes ignored (40 expected)", item.len());
            }
        }
    }
    n
}

/// Drain the ring buffer whenever epoll says it is readable (and at most every 50 ms).
fn drain(rb: Arc<Mutex<RingBuf<MapData>>>, states: Arc<Mutex<PageStates>>, stop: Arc<AtomicBool>) {
    let fd = rb.lock().unwrap_or_else(|e| e.into_inner()).as_raw_fd();
    // SAFETY: epoll_create1 has no memory arguments.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: 0 };
    if ep >= 0 {
        // SAFETY: `ev` is a valid epoll_event for the duration of the call; fd is the ring
        // buffer's map fd, alive while `rb` is.
        unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) };
    }
    let mut out = [libc::epoll_event { events: 0, u64: 0 }; 1];
    while !stop.load(Ordering::Acquire) {
        if ep >= 0 {
            // SAFETY: `out` has room for one event; a timeout bounds the wait.
            unsafe { libc::epoll_wait(ep, out.as_mut_ptr(), 1, 50) };
        } else {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        drain_pending(&rb, &states);
    }
    if ep >= 0 {
        // SAFETY: `ep` is our epoll fd, closed once.
        unsafe { libc::close(ep) };
    }
}

/// Run a page-state program once through `BPF_PROG_TEST_RUN` with synthetic tracepoint
/// arguments and return the events it wrote (tests, and `doctor`).
pub fn test_run_page_state(
    program: &'static str,
    args: &[u64],
) -> Result<(Vec<PageStateEvent>, ProbeStats), EbpfError> {
    let mut ebpf = load(&Target::Any)?;
    let p = raw_tp(&mut ebpf, program)?;
    p.load().map_err(perr(program, "verifier load"))?;
    let mut opts = RawTracePointRunOptions::new();
    for (i, a) in args.iter().take(12).enumerate() {
        opts.args[i] = *a;
    }
    p.test_run(opts).map_err(perr(program, "BPF_PROG_TEST_RUN"))?;
    let stats = read_stats(&ebpf)?;
    let mut rb = RingBuf::try_from(
        ebpf.take_map("page_state_events").ok_or(EbpfError::Map { map: "page_state_events", msg: "missing".into() })?,
    )
    .map_err(|e| EbpfError::Map { map: "page_state_events", msg: e.to_string() })?;
    let mut events = Vec::new();
    while let Some(item) = rb.next() {
        if let Some(e) = PageStateEvent::decode(&item) {
            events.push(e);
        }
    }
    Ok((events, stats))
}

/// Run the dirty program once with synthetic `(slot, offset)` against `slots`; returns the
/// bitmap pages and the counters.
pub fn test_run_dirty(slots: &[(u64, u64)], slot: u32, offset: u64) -> Result<(Vec<u64>, ProbeStats), EbpfError> {
    let mut ebpf = load(&Target::Any)?;
    set_slots(&mut ebpf, slots)?;
    let p = raw_tp(&mut ebpf, "dirty_ring_push")?;
    p.load().map_err(perr("dirty_ring_push", "verifier load"))?;
    let mut opts = RawTracePointRunOptions::new();
    opts.args[1] = u64::from(slot);
    opts.args[2] = offset;
    p.test_run(opts).map_err(perr("dirty_ring_push", "BPF_PROG_TEST_RUN"))?;
    let stats = read_stats(&ebpf)?;
    let Some(Map::Array(md)) = ebpf.map("dirty_bitmap") else {
        return Err(EbpfError::Map { map: "dirty_bitmap", msg: "missing".into() });
    };
    let m = map_bitmap(md)?;
    let words = slots.iter().map(|&(g, p)| g + p).max().unwrap_or(0).div_ceil(64) as usize;
    let mut pages = Vec::new();
    for i in 0..words.min(MAX_WORDS) {
        // SAFETY: i < MAX_WORDS: inside the mapping, which lives until the end of this scope.
        let w = unsafe { m.as_ptr().cast::<u64>().add(i).read_volatile() };
        for b in 0..64 {
            if w & (1 << b) != 0 {
                pages.push(i as u64 * 64 + b);
            }
        }
    }
    drop(m);
    Ok((pages, stats))
}
