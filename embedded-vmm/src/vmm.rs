//! The embedded VMM: boots a test guest, runs one thread per vCPU, pauses and resumes them,
//! and hands state and RAM to the migration engine.
//!
//! Pausing: the controller sets the run state to `Paused` and kicks every vCPU thread with
//! a signal until each has parked; a signal interrupts `KVM_RUN` with `EINTR`. Guests also
//! exit on their own (progress reports), so a kick lost in a race only delays the park.
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};

use kvm_hooks::boot;
use kvm_hooks::dirty::DirtyTracker;
use kvm_hooks::error::errno_io;
use kvm_hooks::memory::{GuestRam, PAGE_SIZE};
use kvm_hooks::mh::{self, Bell, Launch, MhError, MhHost};
use kvm_hooks::state::{self, VcpuState};
use kvm_hooks::thread;
use kvm_hooks::vm::{DirtyPreference, Vm};
use kvm_hooks::{Error, Result, EXIT_DIRTY_RING_FULL};

use crate::guest::{self, Program, Start, DATA_START, PROGRESS_PORT};

pub use kvm_hooks::migratable::{ExternalPageStates, PageStateRequest, VmShape, MAX_VCPUS};

/// What the guest does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Increment the first byte of every data page in a loop (QEMU's migration-test).
    Ab,
    /// Dirty `working_set` bytes at `pages_per_sec` (0 = as fast as possible).
    Hot { working_set: u64, pages_per_sec: u64 },
    /// Touch nothing; report progress ~1000 times a second per vCPU (a heartbeat with
    /// millisecond resolution).
    Idle,
    /// Write the current iteration number into pseudo-random pages of a `pages`-page region
    /// (a power of two); the dirty-tracking oracle.
    Oracle { pages: u64 },
    /// Announce page-state changes (shared/private) through the page-state port, as a
    /// confidential guest does with `KVM_HC_MAP_GPA_RANGE` (4 MiB of data RAM is cycled).
    PageState,
    /// Each vCPU announces the first half of its range shared, then keeps rewriting
    /// [`guest::SHARED_CANARY`] / [`guest::PRIVATE_CANARY`] and a counter into every page.
    Canary,
    /// A migrated VM: it runs whatever its RAM and restored vCPU state run; the VMM starts
    /// no program of its own and paces nothing.
    Restored,
}

/// Called by a vCPU thread for each valid page-state request.
pub type PageStateHook = Arc<dyn Fn(&PageStateRequest) + Send + Sync>;

/// Shape of a guest: what a destination must recreate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestSpec {
    pub ram_bytes: u64,
    pub vcpus: u32,
    pub workload: Workload,
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Workload::Ab => f.write_str("ab"),
            Workload::Idle => f.write_str("idle"),
            Workload::Hot { working_set, pages_per_sec } => {
                write!(f, "hot(working_set={working_set},pages_per_sec={pages_per_sec})")
            }
            Workload::Oracle { pages } => write!(f, "oracle(pages={pages})"),
            Workload::PageState => f.write_str("pagestate"),
            Workload::Canary => f.write_str("canary"),
            Workload::Restored => f.write_str("restored"),
        }
    }
}

impl GuestSpec {
    /// A migrated VM of `shape`: it runs what its RAM and vCPU state run.
    pub fn restored(shape: VmShape) -> GuestSpec {
        GuestSpec { ram_bytes: shape.ram_bytes, vcpus: shape.vcpus, workload: Workload::Restored }
    }

    pub fn shape(&self) -> VmShape {
        VmShape { ram_bytes: self.ram_bytes, vcpus: self.vcpus }
    }

    /// Check the spec and say which field is wrong.
    pub fn validate(&self) -> Result<()> {
        self.shape().validate()?;
        let data = self.data_pages();
        if data < u64::from(self.vcpus) {
            return Err(Error::BadRamSize(self.ram_bytes, "too small for the number of vCPUs"));
        }
        match self.workload {
            Workload::Hot { working_set, .. } if working_set < PAGE_SIZE * u64::from(self.vcpus) => {
                Err(Error::Memory(format!("hot working set {working_set} bytes is below one page per vCPU")))
            }
            Workload::Hot { working_set, .. } if working_set > data * PAGE_SIZE => Err(Error::Memory(format!(
                "hot working set {working_set} bytes exceeds the {} bytes of guest data RAM",
                data * PAGE_SIZE
            ))),
            Workload::Oracle { pages } if !pages.is_power_of_two() || pages > data => {
                Err(Error::Memory(format!("oracle region of {pages} pages must be a power of two <= {data}")))
            }
            _ => Ok(()),
        }
    }

    /// Pages available to workloads.
    pub fn data_pages(&self) -> u64 {
        self.ram_bytes.saturating_sub(DATA_START) / PAGE_SIZE
    }

    /// Data range `[start, end)` that vCPU `i` walks (Ab/Hot).
    pub fn vcpu_range(&self, i: u32) -> (u64, u64) {
        let pages = match self.workload {
            Workload::Hot { working_set, .. } => (working_set / PAGE_SIZE).min(self.data_pages()),
            _ => self.data_pages(),
        };
        let per = pages / u64::from(self.vcpus);
        let start = DATA_START + u64::from(i) * per * PAGE_SIZE;
        (start, start + per * PAGE_SIZE)
    }

    fn start(&self, i: u32) -> Start {
        let (s, e) = self.vcpu_range(i);
        let per = (e - s) / PAGE_SIZE;
        match self.workload {
            Workload::Ab => Start { program: Program::Walk, rdi: s, rsi: e, r8: per.min(4096), r9: 0, r14: 0 },
            Workload::Hot { .. } => {
                Start { program: Program::Walk, rdi: s, rsi: e, r8: self.pace(i).batch, r9: 0, r14: 0 }
            }
            // A restored VM's registers are overwritten before it first runs.
            Workload::Idle | Workload::Restored => {
                Start { program: Program::Idle, rdi: 0, rsi: 0, r8: 1, r9: 0, r14: 0 }
            }
            Workload::PageState => Start {
                program: Program::PageState,
                rdi: guest::PARAM + 0x100 + u64::from(i) * 0x20,
                rsi: DATA_START,
                r8: 1,
                r9: 0,
                r14: 0,
            },
            Workload::Canary => Start {
                program: Program::Canary,
                rdi: s,
                rsi: e,
                r8: s + (per / 2) * PAGE_SIZE,
                r9: guest::PARAM + 0x100 + u64::from(i) * 0x20,
                r14: 0,
            },
            Workload::Oracle { pages } => Start {
                program: Program::Oracle,
                rdi: DATA_START,
                rsi: pages - 1,
                r8: 1024,
                r9: guest::PARAM,
                r14: 0x9E37_79B9_7F4A_7C15 ^ (u64::from(i) + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9),
            },
        }
    }

    /// Guest page writes behind one progress report of vCPU `i` (0 for workloads that
    /// write no memory, or whose program the VMM did not start).
    pub fn writes_per_report(&self, i: u32) -> u64 {
        let (s, e) = self.vcpu_range(i);
        match self.workload {
            Workload::Ab | Workload::Hot { .. } | Workload::Oracle { .. } => self.start(i).r8.max(1),
            Workload::Canary => (e - s) / PAGE_SIZE,
            Workload::Idle | Workload::PageState | Workload::Restored => 0,
        }
    }

    /// Host-side pacing of vCPU `i`: after each progress report covering `batch` pages, the
    /// vCPU thread sleeps so that the vCPU averages `per_sec` reports×batch per second.
    fn pace(&self, _i: u32) -> Pace {
        match self.workload {
            Workload::Hot { pages_per_sec, .. } if pages_per_sec > 0 => {
                let per_vcpu = (pages_per_sec / u64::from(self.vcpus)).max(1);
                let batch = (per_vcpu / 1000).max(1);
                Pace { batch, per_sec: per_vcpu }
            }
            Workload::Hot { .. } => Pace { batch: 4096, per_sec: 0 },
            Workload::Idle => Pace { batch: 1, per_sec: 1000 },
            _ => Pace { batch: 1, per_sec: 0 },
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Pace {
    batch: u64,
    /// Pages per second; 0 means unpaced.
    per_sec: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunState {
    Running,
    Paused,
    Exit,
}

struct Shared {
    state: Mutex<RunState>,
    cv: Condvar,
    parked: AtomicUsize,
    progress: Vec<AtomicU64>,
    reports: Vec<AtomicU64>,
    /// Wall-clock time (µs since the Unix epoch) of each vCPU's latest report, and of its
    /// first report since the last resume (0: none yet): the guest's heartbeat, which
    /// measures the blackout the guest sees across a migration (source and destination
    /// processes share the host's clock).
    last_report_us: Vec<AtomicU64>,
    first_report_us: Vec<AtomicU64>,
    fault: Mutex<Option<String>>,
    /// Percent of time vCPUs are held off the CPU (auto-converge), 0..=99.
    throttle: AtomicU64,
    page_state_hook: Mutex<Option<PageStateHook>>,
    external_states: Mutex<Option<Arc<dyn ExternalPageStates>>>,
    /// Page-state requests handled / refused (bad pointer or range).
    pub page_state_requests: AtomicU64,
    pub page_state_refused: AtomicU64,
    /// Kernel thread id of each vCPU thread (for per-thread BPF filters).
    tids: Vec<AtomicU64>,
    /// One bit per guest page: set = shared (the guest announced it unencrypted), clear =
    /// private. What KVM keeps as memory attributes for a confidential VM.
    shared_pages: Vec<AtomicU64>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("state", &self.state).field("parked", &self.parked).finish_non_exhaustive()
    }
}

impl Shared {
    /// State for `n` vCPUs, all paused.
    fn new(n: usize, pages: u64) -> Self {
        let counters = || (0..n).map(|_| AtomicU64::new(0)).collect();
        Shared {
            state: Mutex::new(RunState::Paused),
            cv: Condvar::new(),
            parked: AtomicUsize::new(0),
            progress: counters(),
            reports: counters(),
            last_report_us: counters(),
            first_report_us: counters(),
            fault: Mutex::new(None),
            throttle: AtomicU64::new(0),
            page_state_hook: Mutex::new(None),
            external_states: Mutex::new(None),
            page_state_requests: AtomicU64::new(0),
            page_state_refused: AtomicU64::new(0),
            tids: counters(),
            shared_pages: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// vCPU `id` reported progress.
    fn report(&self, id: usize) {
        self.reports[id].fetch_add(1, Ordering::Relaxed);
        let now = unix_us();
        self.last_report_us[id].store(now, Ordering::Relaxed);
        let _ = self.first_report_us[id].compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    }
}

fn unix_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// A running (or paused) embedded VM.
#[derive(Debug)]
pub struct Machine {
    vm: Vm,
    spec: GuestSpec,
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    threads: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
    msr_list: Vec<u32>,
    /// The MH's vCPUs, one per lane (empty without an MH).
    mh: Vec<MhVcpu>,
    /// The host end of the MH's rings, for the migration engine.
    mh_host: Mutex<Option<MhHost>>,
}

/// One of the Migration Handler's extra vCPUs (a lane): runs on its own thread, independent
/// of pause/resume (it serves its rings while the workload vCPUs are stopped at switchover).
#[derive(Debug)]
struct MhVcpu {
    bell: Arc<Bell>,
    thread: Option<JoinHandle<()>>,
}

static SIGNAL: Once = Once::new();

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN() + 1
}

impl Machine {
    /// Boot `spec` as a fresh guest: RAM, page tables, programs, vCPUs. The vCPUs start
    /// paused; call [`Machine::resume`] to run them.
    pub fn boot(spec: GuestSpec, dirty: DirtyPreference) -> Result<Machine> {
        spec.validate()?;
        let ram = GuestRam::new(spec.ram_bytes)?;
        guest::install(&ram)?;
        let m = Machine::create(spec, dirty, ram)?;
        for (i, v) in m.vcpus.iter().enumerate() {
            let v = v.lock().unwrap_or_else(|e| e.into_inner());
            let sregs = v.get_sregs().map_err(|e| Error::ioctl("KVM_GET_SREGS", errno_io(e)))?;
            v.set_sregs(&boot::initial_sregs(sregs)).map_err(|e| Error::ioctl("KVM_SET_SREGS", errno_io(e)))?;
            v.set_regs(&guest::initial_regs(i, &spec.start(i as u32)))
                .map_err(|e| Error::ioctl("KVM_SET_REGS", errno_io(e)))?;
            // With an in-kernel LAPIC, application processors wait for INIT/SIPI; the test
            // guests start every vCPU directly.
            v.set_mp_state(kvm_bindings::kvm_mp_state { mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE })
                .map_err(|e| Error::ioctl("KVM_SET_MP_STATE", errno_io(e)))?;
        }
        Ok(m)
    }

    /// Create an empty VM of `spec`'s shape to receive a migration into. vCPUs stay paused
    /// until their state is restored and [`Machine::resume`] is called.
    pub fn destination(spec: GuestSpec, dirty: DirtyPreference) -> Result<Machine> {
        spec.validate()?;
        let ram = GuestRam::new(spec.ram_bytes)?;
        Machine::create(spec, dirty, ram)
    }

    /// [`Machine::destination`] over RAM the caller allocated ahead (a destination prepared
    /// before the migration starts). `ram` must be untouched: the receiver relies on pages it
    /// was not sent being zero.
    pub fn destination_in(spec: GuestSpec, dirty: DirtyPreference, ram: GuestRam) -> Result<Machine> {
        spec.validate()?;
        if ram.size() != spec.ram_bytes {
            return Err(Error::BadRamSize(ram.size(), "prepared guest RAM differs from the VM's RAM size"));
        }
        Machine::create(spec, dirty, ram)
    }

    fn create(spec: GuestSpec, dirty: DirtyPreference, ram: GuestRam) -> Result<Machine> {
        SIGNAL.call_once(|| {
            if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler) {
                tracing::error!("cannot register the vCPU kick signal handler: {e}");
            }
        });
        let vm = Vm::new(ram, dirty)?;
        let msr_list = vm
            .kvm()
            .get_msr_index_list()
            .map_err(|e| Error::ioctl("KVM_GET_MSR_INDEX_LIST", errno_io(e)))?
            .as_slice()
            .to_vec();
        let n = spec.vcpus as usize;
        let shared = Arc::new(Shared::new(n, vm.ram().pages()));
        let mut vcpus = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let fd = Arc::new(Mutex::new(vm.create_vcpu(i as u64)?));
            let (f, sh, tr, pace, ram) =
                (fd.clone(), shared.clone(), vm.dirty().clone(), spec.pace(i as u32), vm.ram().clone());
            let t = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vcpu_loop(i, f, sh, tr, pace, ram))
                .map_err(|e| Error::Vcpu { vcpu: i, msg: format!("spawn thread: {e}") })?;
            vcpus.push(fd);
            threads.push(t);
        }
        let m = Machine { vm, spec, vcpus, threads, shared, msr_list, mh: Vec::new(), mh_host: Mutex::new(None) };
        m.wait_parked(Duration::from_secs(10))?;
        Ok(m)
    }

    pub fn spec(&self) -> &GuestSpec {
        &self.spec
    }
    pub fn ram(&self) -> &Arc<GuestRam> {
        self.vm.ram()
    }
    pub fn dirty(&self) -> &Arc<DirtyTracker> {
        self.vm.dirty()
    }
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Latest progress counter each vCPU reported.
    pub fn progress(&self) -> Vec<u64> {
        self.shared.progress.iter().map(|p| p.load(Ordering::Relaxed)).collect()
    }
    /// Page writes the guest reported so far, over all vCPUs (see
    /// [`GuestSpec::writes_per_report`]).
    pub fn page_writes(&self) -> u64 {
        let r = self.reports();
        (0..r.len()).map(|i| r[i] * self.spec.writes_per_report(i as u32)).sum()
    }

    /// When each vCPU last reported (µs since the Unix epoch; 0: never).
    pub fn last_report_unix_us(&self) -> Vec<u64> {
        self.shared.last_report_us.iter().map(|p| p.load(Ordering::Relaxed)).collect()
    }
    /// When each vCPU first reported after the latest resume (µs since the Unix epoch;
    /// 0: not yet).
    pub fn first_report_since_resume_unix_us(&self) -> Vec<u64> {
        self.shared.first_report_us.iter().map(|p| p.load(Ordering::Relaxed)).collect()
    }

    /// Wait until every vCPU of a page-walking workload wrote each page of its range once
    /// (its first pass maps the pages into the VM; host-side prefilled pages fault in on
    /// it), or `timeout` passes. Other workloads return at once.
    pub fn wait_first_pass(&self, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        let need: Vec<u64> = (0..self.spec.vcpus)
            .map(|i| {
                let (s, e) = self.spec.vcpu_range(i);
                let per = self.spec.writes_per_report(i);
                if per == 0 || !matches!(self.spec.workload, Workload::Ab | Workload::Hot { .. }) {
                    0
                } else {
                    ((e - s) / PAGE_SIZE).div_ceil(per)
                }
            })
            .collect();
        loop {
            let r = self.reports();
            if r.iter().zip(&need).all(|(have, need)| have >= need) {
                return Ok(());
            }
            if let Some(f) = self.fault() {
                return Err(Error::Vcpu { vcpu: 0, msg: f });
            }
            if t0.elapsed() > timeout {
                return Err(Error::Vcpu {
                    vcpu: 0,
                    msg: format!(
                        "the guest did not finish its first pass within {timeout:?} (reports {r:?} of {need:?})"
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Number of progress reports each vCPU made on this host.
    pub fn reports(&self) -> Vec<u64> {
        self.shared.reports.iter().map(|p| p.load(Ordering::Relaxed)).collect()
    }
    /// First unexpected guest exit, if any vCPU died.
    pub fn fault(&self) -> Option<String> {
        self.shared.fault.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn is_running(&self) -> bool {
        *self.shared.state() == RunState::Running
    }

    /// Let all vCPUs run.
    pub fn resume(&self) -> Result<()> {
        if let Some(f) = self.fault() {
            return Err(Error::Vcpu { vcpu: 0, msg: format!("cannot resume a faulted guest: {f}") });
        }
        let mut st = self.shared.state();
        for f in &self.shared.first_report_us {
            f.store(0, Ordering::Relaxed);
        }
        *st = RunState::Running;
        drop(st);
        self.shared.cv.notify_all();
        Ok(())
    }

    /// Stop all vCPUs and wait until each is out of `KVM_RUN`.
    pub fn pause(&self) -> Result<()> {
        *self.shared.state() = RunState::Paused;
        self.wait_parked(Duration::from_secs(10))
    }

    fn wait_parked(&self, limit: Duration) -> Result<()> {
        let t0 = Instant::now();
        while self.shared.parked.load(Ordering::Acquire) < self.threads.len() {
            if t0.elapsed() > limit {
                return Err(Error::Vcpu { vcpu: 0, msg: format!("vCPUs did not stop within {limit:?}") });
            }
            for t in &self.threads {
                // ESRCH (thread already gone) is fine: it parks or has exited.
                let _ = thread::pthread_kill(t.as_pthread_t(), kick_signal());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    fn check_paused(&self) -> Result<()> {
        if *self.shared.state() != RunState::Paused || self.shared.parked.load(Ordering::Acquire) < self.threads.len() {
            return Err(Error::Vcpu { vcpu: 0, msg: "vCPUs must be paused for state access".into() });
        }
        Ok(())
    }

    /// Save every vCPU's state (vCPUs must be paused).
    pub fn save_states(&self) -> Result<Vec<VcpuState>> {
        self.check_paused()?;
        self.vcpus.iter().map(|v| state::save(&v.lock().unwrap_or_else(|e| e.into_inner()), &self.msr_list)).collect()
    }

    /// Restore every vCPU's state (vCPUs must be paused).
    pub fn restore_states(&self, states: &[VcpuState]) -> Result<()> {
        self.check_paused()?;
        if states.len() != self.vcpus.len() {
            return Err(Error::Vcpu {
                vcpu: states.len(),
                msg: format!("got state for {} vCPUs, VM has {}", states.len(), self.vcpus.len()),
            });
        }
        for (i, (v, s)) in self.vcpus.iter().zip(states).enumerate() {
            state::restore(&v.lock().unwrap_or_else(|e| e.into_inner()), s)
                .map_err(|e| Error::Vcpu { vcpu: i, msg: e.to_string() })?;
        }
        Ok(())
    }

    /// Hold vCPUs off the CPU for `percent` of the time (0 = full speed, at most 99), so a
    /// guest that dirties memory faster than the link can converge (auto-converge).
    pub fn set_throttle(&self, percent: u8) {
        self.shared.throttle.store(u64::from(percent.min(99)), Ordering::Relaxed);
    }

    pub fn throttle(&self) -> u8 {
        self.shared.throttle.load(Ordering::Relaxed) as u8
    }

    /// Receive every valid page-state request the guest makes (set before resuming).
    pub fn set_page_state_hook(&self, hook: PageStateHook) {
        *self.shared.page_state_hook.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// Classify pages by `states` instead of the VMM's own record (which stays, for the
    /// cross-check).
    pub fn set_external_page_states(&self, states: Arc<dyn ExternalPageStates>) {
        *self.shared.external_states.lock().unwrap_or_else(|e| e.into_inner()) = Some(states);
    }

    pub fn external_page_states(&self) -> Option<Arc<dyn ExternalPageStates>> {
        self.shared.external_states.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// (handled, refused) page-state requests so far.
    pub fn page_state_counts(&self) -> (u64, u64) {
        (
            self.shared.page_state_requests.load(Ordering::Relaxed),
            self.shared.page_state_refused.load(Ordering::Relaxed),
        )
    }

    /// Kernel thread ids of the vCPU threads (they run KVM_RUN, so KVM's tracepoints for
    /// this VM fire in them).
    pub fn vcpu_tids(&self) -> Vec<u32> {
        self.shared.tids.iter().map(|t| t.load(Ordering::Acquire) as u32).collect()
    }

    /// Install the reference Migration Handler in the MH region and start it on
    /// `launch.lanes` extra vCPUs (ids from the number of workload vCPUs on), lane 0 first.
    /// Waits until every lane reports ready. On a destination this is called before any page
    /// arrives.
    pub fn launch_mh(&mut self, launch: &Launch, timeout: Duration) -> std::result::Result<(), MhError> {
        if !self.mh.is_empty() {
            return Err(MhError::BadRequest("this VM already runs a Migration Handler".into()));
        }
        let ram = self.ram().clone();
        mh::install(&ram, launch)?;
        let mut bells = Vec::new();
        for lane in 0..launch.lanes {
            // Lane 0 prepares the MH's private state the other lanes share: it runs first.
            let started = self
                .start_mh_lane(lane)
                .and_then(|bell| mh::wait_lane_ready(&ram, &bell, lane, Duration::from_secs(10)).map(|()| bell));
            match started {
                Ok(bell) => bells.push(bell),
                Err(e) => {
                    // No MH half-started: the lanes already running stop.
                    self.stop_mh();
                    return Err(e);
                }
            }
        }
        let host = MhHost::new(ram, bells, timeout, launch.vm_id);
        *self.mh_host.lock().unwrap_or_else(|e| e.into_inner()) = Some(host);
        Ok(())
    }

    /// Test hook: start one more vCPU on MH lane `lane`, as a hostile host might; returns
    /// its doorbell (the MH stops such a vCPU before it touches the lane's state).
    pub fn start_duplicate_mh_lane(&mut self, lane: u32) -> std::result::Result<Arc<Bell>, MhError> {
        self.start_mh_lane(lane)
    }

    /// Create and start the vCPU of MH lane `lane`, its lane in `r12`.
    fn start_mh_lane(&mut self, lane: u32) -> std::result::Result<Arc<Bell>, MhError> {
        let id = self.vcpus.len() + self.mh.len();
        let fd = self.vm.create_vcpu(id as u64)?;
        let sregs = fd.get_sregs().map_err(|e| Error::ioctl("KVM_GET_SREGS", errno_io(e)))?;
        let mut sregs = boot::initial_sregs(sregs);
        sregs.cr3 = mh_abi::PAGE_TABLES;
        sregs.gdt.base = mh_abi::GDT;
        // OSFXSR | OSXMMEXCPT | OSXSAVE: SSE/AVX for AES-GCM.
        sregs.cr4 |= 0x600 | 0x4_0000;
        fd.set_sregs(&sregs).map_err(|e| Error::ioctl("KVM_SET_SREGS", errno_io(e)))?;
        let mut xcrs = kvm_bindings::kvm_xcrs { nr_xcrs: 1, ..Default::default() };
        xcrs.xcrs[0].value = 0x7; // x87 | SSE | AVX
        if let Err(e) = fd.set_xcrs(&xcrs) {
            tracing::debug!("KVM_SET_XCRS for the MH vCPU: {e} (AVX state left as is)");
        }
        let addrs = mh_abi::lane_addrs(lane);
        let regs = kvm_bindings::kvm_regs {
            rip: mh_abi::IMAGE,
            rsp: addrs.stack_top,
            r12: u64::from(lane),
            rflags: 0x3002,
            ..Default::default()
        };
        fd.set_regs(&regs).map_err(|e| Error::ioctl("KVM_SET_REGS", errno_io(e)))?;
        fd.set_mp_state(kvm_bindings::kvm_mp_state { mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE })
            .map_err(|e| Error::ioctl("KVM_SET_MP_STATE", errno_io(e)))?;
        let bell = Arc::new(Bell::default());
        let (b, tr, r) = (bell.clone(), self.vm.dirty().clone(), self.ram().clone());
        let thread = std::thread::Builder::new()
            .name(format!("mh-vcpu-{lane}"))
            .spawn(move || mh_loop(fd, b, tr, r, addrs.header))
            .map_err(|e| Error::Vcpu { vcpu: id, msg: format!("spawn MH thread: {e}") })?;
        self.mh.push(MhVcpu { bell: bell.clone(), thread: Some(thread) });
        Ok(bell)
    }

    /// The host end of the MH's rings (None without an MH, or after [`Machine::take_mh`]).
    pub fn mh(&self) -> std::sync::MutexGuard<'_, Option<MhHost>> {
        self.mh_host.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take the host end of the MH's rings out of the machine (tests drive it directly).
    pub fn take_mh(&self) -> Option<MhHost> {
        self.mh().take()
    }

    /// Whether the guest last announced page `gfn` as shared (unencrypted). Pages start
    /// private. Out-of-range pages are private.
    pub fn is_shared(&self, gfn: u64) -> bool {
        self.shared
            .shared_pages
            .get((gfn / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (gfn % 64)) != 0)
    }

    /// The VMM's page-state record: one bit per page, set for a shared page.
    pub fn shared_bitmap(&self) -> Vec<u64> {
        self.shared.shared_pages.iter().map(|w| w.load(Ordering::Acquire)).collect()
    }

    /// The shared pages as ascending `(gfn, npages)` runs.
    pub fn shared_ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (i, w) in self.shared_bitmap().into_iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let b = u64::from(w.trailing_zeros());
                let gfn = i as u64 * 64 + b;
                match out.last_mut() {
                    Some((g, n)) if *g + *n == gfn => *n += 1,
                    _ => out.push((gfn, 1)),
                }
                w &= w - 1;
            }
        }
        out
    }

    /// Record `npages` pages from `gfn` as shared, as a migrated VM's source announced them
    /// (the destination's guest made those requests on the source).
    pub fn mark_shared(&self, gfn: u64, npages: u64) -> Result<()> {
        let ram = self.ram();
        if gfn.checked_add(npages).is_none_or(|end| end > ram.pages()) {
            return Err(Error::OutOfRange {
                gpa: gfn.saturating_mul(PAGE_SIZE),
                len: npages.saturating_mul(PAGE_SIZE),
                ram: ram.size(),
            });
        }
        set_shared(&self.shared, gfn..gfn + npages, true);
        Ok(())
    }

    /// Whether a Migration Handler runs in this VM.
    pub fn has_mh(&self) -> bool {
        !self.mh.is_empty()
    }

    /// Oracle workloads read the iteration number from the parameter page.
    pub fn set_oracle_iteration(&self, iter: u64) -> Result<()> {
        self.ram().write_u64(guest::PARAM, iter)
    }
}

impl Machine {
    /// Stop the MH's vCPU threads (their vCPUs stay created, and never run again).
    fn stop_mh(&mut self) {
        for mut m in self.mh.drain(..) {
            m.bell.lock().exit = true;
            m.bell.notify();
            if let Some(t) = m.thread.take() {
                let _ = thread::pthread_kill(t.as_pthread_t(), kick_signal());
                let _ = t.join();
            }
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.stop_mh();
        *self.shared.state() = RunState::Exit;
        self.shared.cv.notify_all();
        for t in &self.threads {
            let _ = thread::pthread_kill(t.as_pthread_t(), kick_signal());
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

enum Event {
    Progress(u32),
    PageState(u32),
    RingFull,
    Interrupted,
    Fault(String),
}

fn vcpu_loop(
    id: usize,
    fd: Arc<Mutex<VcpuFd>>,
    sh: Arc<Shared>,
    dirty: Arc<DirtyTracker>,
    pace: Pace,
    ram: Arc<GuestRam>,
) {
    // SAFETY: gettid has no arguments and cannot fail.
    sh.tids[id].store(thread::gettid(), Ordering::Release);
    let mut t0 = Instant::now();
    let mut paced = 0u64;
    loop {
        {
            let mut st = sh.state();
            if *st != RunState::Running {
                sh.parked.fetch_add(1, Ordering::AcqRel);
                while *st == RunState::Paused {
                    st = sh.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                sh.parked.fetch_sub(1, Ordering::AcqRel);
                if *st == RunState::Exit {
                    return;
                }
                t0 = Instant::now();
                paced = 0;
            }
        }
        let entered = Instant::now();
        let ev = {
            let mut v = fd.lock().unwrap_or_else(|e| e.into_inner());
            match v.run() {
                Ok(VcpuExit::IoOut(port, data)) if port == PROGRESS_PORT + id as u16 && data.len() == 4 => {
                    Event::Progress(u32::from_le_bytes([data[0], data[1], data[2], data[3]]))
                }
                Ok(VcpuExit::IoOut(port, data)) if port == guest::PAGE_STATE_PORT + id as u16 && data.len() == 4 => {
                    Event::PageState(u32::from_le_bytes([data[0], data[1], data[2], data[3]]))
                }
                Ok(VcpuExit::IoIn(_, data)) => {
                    data.fill(0);
                    Event::Interrupted
                }
                Ok(VcpuExit::Unsupported(r)) if r == EXIT_DIRTY_RING_FULL => Event::RingFull,
                Ok(VcpuExit::Intr) => Event::Interrupted,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Event::Interrupted,
                Ok(other) => Event::Fault(format!("vCPU {id}: unexpected exit {other:?}")),
                Err(e) => Event::Fault(format!("vCPU {id}: KVM_RUN failed: {e}")),
            }
        };
        throttle(&sh, entered.elapsed());
        match ev {
            Event::Progress(v) => {
                sh.progress[id].store(u64::from(v), Ordering::Relaxed);
                sh.report(id);
                if let Some(ns) = pace.batch.checked_add(paced).and_then(|p| {
                    paced = p;
                    p.saturating_mul(1_000_000_000).checked_div(pace.per_sec)
                }) {
                    let due = t0 + Duration::from_nanos(ns);
                    // Sleep in short steps so a pause request is honoured quickly.
                    while *sh.state() == RunState::Running {
                        let now = Instant::now();
                        if now >= due {
                            break;
                        }
                        std::thread::sleep((due - now).min(Duration::from_millis(1)));
                    }
                }
            }
            Event::PageState(ptr) => {
                sh.progress[id].fetch_add(1, Ordering::Relaxed);
                sh.report(id);
                page_state(&sh, &ram, id, u64::from(ptr));
            }
            Event::RingFull => {
                if let Err(e) = dirty.on_ring_full() {
                    fault(&sh, format!("vCPU {id}: harvesting a full dirty ring failed: {e}"));
                }
            }
            Event::Interrupted => {}
            Event::Fault(msg) => fault(&sh, msg),
        }
    }
}

/// The MH vCPU's thread: runs the MH and turns its port kicks into doorbell events.
fn mh_loop(mut fd: VcpuFd, bell: Arc<Bell>, dirty: Arc<DirtyTracker>, ram: Arc<GuestRam>, header: u64) {
    loop {
        {
            let mut g = bell.lock();
            if g.exit {
                return;
            }
            if g.fault.is_some() {
                // A faulted MH never runs again.
                g.frozen = true;
            }
            if g.frozen {
                drop(g);
                bell.wait_thawed();
                continue;
            }
        }
        let kick = match fd.run() {
            Ok(VcpuExit::IoOut(port, data)) if port == mh_abi::PORT && data.len() == 4 => {
                Ok(mh_abi::Kick::from_u32(u32::from_le_bytes([data[0], data[1], data[2], data[3]])))
            }
            Ok(VcpuExit::Unsupported(r)) if r == EXIT_DIRTY_RING_FULL => {
                if let Err(e) = dirty.on_ring_full() {
                    Err(format!("MH vCPU: harvesting a full dirty ring failed: {e}"))
                } else {
                    continue;
                }
            }
            Ok(VcpuExit::Intr) => continue,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Ok(other) => Err(format!("MH vCPU: unexpected exit {other:?}")),
            Err(e) => Err(format!("MH vCPU: KVM_RUN failed: {e}")),
        };
        let mut g = bell.lock();
        match kick {
            Ok(mh_abi::Kick::Ready) => g.ready = true,
            Ok(mh_abi::Kick::Done) => g.done += 1,
            Ok(mh_abi::Kick::Wait) => {
                drop(g);
                bell.wait_ring(Duration::from_millis(50));
                continue;
            }
            Ok(mh_abi::Kick::Fault) => {
                let code = ram.read_u64(header + mh_abi::header::FAULT).unwrap_or(0) as u32;
                g.fault = Some(format!("the MH reported fault code {code}"));
            }
            Ok(mh_abi::Kick::Invalid) => g.fault = Some("the MH sent an unknown kick".into()),
            Err(msg) => {
                tracing::error!("{msg}");
                g.fault = Some(msg);
            }
        }
        drop(g);
        bell.notify();
    }
}

/// `KVM_MAP_GPA_RANGE_ENCRYPTED`: the range becomes private.
pub const PAGE_ENCRYPTED: u64 = 1 << 4;

/// Record `gfns` as shared or private (the caller checked them against guest RAM).
fn set_shared(sh: &Shared, gfns: std::ops::Range<u64>, shared: bool) {
    for gfn in gfns {
        let (w, b) = ((gfn / 64) as usize, 1u64 << (gfn % 64));
        if shared {
            sh.shared_pages[w].fetch_or(b, Ordering::AcqRel);
        } else {
            sh.shared_pages[w].fetch_and(!b, Ordering::AcqRel);
        }
    }
}

/// Validate a guest page-state request and hand it to the hook. The request lives in guest
/// memory, so every field is checked: the pointer and the announced range must be inside
/// guest RAM, page-aligned and non-empty.
fn page_state(sh: &Shared, ram: &GuestRam, vcpu: usize, ptr: u64) {
    let mut b = [0u8; 24];
    let ok = ram.read(ptr, &mut b).is_ok();
    let f = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
    let (gpa, npages, attrs) = (f(0), f(8), f(16));
    let valid = ok
        && gpa % PAGE_SIZE == 0
        && npages > 0
        && gpa.checked_add(npages.saturating_mul(PAGE_SIZE)).is_some_and(|end| end <= ram.size());
    if !valid {
        sh.page_state_refused.fetch_add(1, Ordering::Relaxed);
        return;
    }
    sh.page_state_requests.fetch_add(1, Ordering::Relaxed);
    let shared = attrs & PAGE_ENCRYPTED == 0;
    set_shared(sh, gpa / PAGE_SIZE..gpa / PAGE_SIZE + npages, shared);
    let hook = sh.page_state_hook.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if let Some(h) = hook {
        h(&PageStateRequest { vcpu: vcpu as u32, gpa, npages, attrs });
    }
}

/// Auto-converge: after the guest ran for `ran`, sleep so that it gets `100 - pct` % of
/// the time. Sleeps in short steps so pause requests stay prompt.
fn throttle(sh: &Shared, ran: Duration) {
    let pct = sh.throttle.load(Ordering::Relaxed).min(99);
    if pct == 0 {
        return;
    }
    let until = Instant::now() + ran * pct as u32 / (100 - pct as u32);
    while *sh.state() == RunState::Running {
        let now = Instant::now();
        if now >= until {
            break;
        }
        std::thread::sleep((until - now).min(Duration::from_millis(1)));
    }
}

/// Record a guest fault and park this vCPU for good (until exit).
fn fault(sh: &Shared, msg: String) {
    tracing::error!("{msg}");
    sh.fault.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(msg);
    let mut st = sh.state();
    sh.parked.fetch_add(1, Ordering::AcqRel);
    while *st != RunState::Exit {
        st = sh.cv.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    // Leave `parked` incremented: the thread is gone for good.
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guest-written page-state requests are checked field by field; a hostile pointer or
    /// range is refused and never reaches the hook.
    #[test]
    fn hostile_page_state_requests_are_refused() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let sh = Shared::new(1, ram.pages());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        *sh.page_state_hook.lock().unwrap() = Some(Arc::new(move |r: &PageStateRequest| s2.lock().unwrap().push(*r)));
        let req = |gpa: u64, npages: u64, attrs: u64| {
            ram.write_u64(0x5100, gpa).unwrap();
            ram.write_u64(0x5108, npages).unwrap();
            ram.write_u64(0x5110, attrs).unwrap();
        };
        req(0x20_0000, 16, 1 << 4);
        page_state(&sh, &ram, 0, 0x5100);
        assert_eq!(seen.lock().unwrap().len(), 1, "a valid request reaches the hook");
        let size = ram.size();
        for (gpa, npages) in [(0x20_0010, 1), (0x20_0000, 0), (size - 4096, 2), (!0xfff, 1), (0, u64::MAX)] {
            req(gpa, npages, 0);
            page_state(&sh, &ram, 0, 0x5100);
        }
        // The request pointer itself outside guest RAM.
        page_state(&sh, &ram, 0, size - 8);
        page_state(&sh, &ram, 0, u64::from(u32::MAX));
        assert_eq!(seen.lock().unwrap().len(), 1, "no hostile request reached the hook");
        assert_eq!(sh.page_state_refused.load(Ordering::Relaxed), 7);
        assert_eq!(sh.page_state_requests.load(Ordering::Relaxed), 1);
    }
}
