//! A VM without KVM for the engine's unit tests: guest RAM is a real memfd mapping, "guest
//! writes" are made by the test (so which pages change in which round is exact), and dirty
//! logging is a set that records those writes while logging is on.
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_hooks::layout::RamLayout;
use kvm_hooks::memory::{GuestRam, PAGE_SIZE};
use kvm_hooks::mh::{Launch, MhError, MhHost};
use kvm_hooks::migratable::{
    ConfidentialIncoming, ConfidentialSource, DirtyCounters, DirtyLog, ExternalPageStates, Incoming, MachineState,
    Migratable, VmError, VmFactory, VmKind, VmResult, VmShape,
};

#[derive(Debug, Default)]
pub struct FakeDirty {
    pages: u64,
    logging: AtomicBool,
    pending: Mutex<BTreeSet<u64>>,
    pub starts: AtomicU32,
    pub stops: AtomicU32,
}

impl FakeDirty {
    pub fn is_logging(&self) -> bool {
        self.logging.load(Ordering::Acquire)
    }
    pub fn pending(&self) -> BTreeSet<u64> {
        self.pending.lock().unwrap().clone()
    }
    fn all(&self) -> BTreeSet<u64> {
        (0..self.pages).collect()
    }
}

impl DirtyLog for FakeDirty {
    fn start(&self) -> kvm_hooks::Result<()> {
        self.starts.fetch_add(1, Ordering::Relaxed);
        self.logging.store(true, Ordering::Release);
        self.pending.lock().unwrap().clear();
        Ok(())
    }
    fn stop(&self) -> kvm_hooks::Result<()> {
        self.stops.fetch_add(1, Ordering::Relaxed);
        self.logging.store(false, Ordering::Release);
        *self.pending.lock().unwrap() = self.all();
        Ok(())
    }
    fn take(&self) -> kvm_hooks::Result<Vec<u64>> {
        Ok(std::mem::take(&mut *self.pending.lock().unwrap()).into_iter().collect())
    }
    fn restore(&self, gfns: &[u64]) {
        self.pending.lock().unwrap().extend(gfns);
    }
    fn mark_all(&self) {
        *self.pending.lock().unwrap() = self.all();
    }
    fn describe(&self) -> String {
        "fake".into()
    }
    fn counters(&self) -> DirtyCounters {
        DirtyCounters::default()
    }
}

pub struct FakeVm {
    shape: VmShape,
    ram: Arc<GuestRam>,
    pub dirty: FakeDirty,
    running: AtomicBool,
    throttle: AtomicU8,
    mh: Mutex<Option<MhHost>>,
    /// What the fake says its machine state costs at switchover.
    pub switchover_cost: std::time::Duration,
}

impl Default for FakeVm {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeVm {
    /// A running 64 MiB, one-vCPU VM whose RAM is all zero.
    pub fn new() -> Self {
        let shape = VmShape { ram_bytes: 64 << 20, vcpus: 1 };
        let ram = Arc::new(GuestRam::new(shape.ram_bytes).expect("memfd guest RAM"));
        let pages = ram.pages();
        let dirty = FakeDirty { pages, ..Default::default() };
        dirty.mark_all();
        FakeVm {
            shape,
            ram,
            dirty,
            running: AtomicBool::new(true),
            throttle: AtomicU8::new(0),
            mh: Mutex::new(None),
            switchover_cost: std::time::Duration::ZERO,
        }
    }

    /// A guest write: `byte` at the start of page `gfn`, seen by dirty logging if it is on.
    pub fn write(&self, gfn: u64, byte: u8) {
        assert!(self.is_running(), "a paused guest writes nothing");
        self.ram.write(gfn * PAGE_SIZE, &[byte]).unwrap();
        if self.dirty.is_logging() {
            self.dirty.pending.lock().unwrap().insert(gfn);
        }
    }

    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }
}

/// The fake's machine state: one section per vCPU, naming it.
pub fn fake_state(vcpus: u32) -> MachineState {
    MachineState { sections: (0..vcpus).map(|i| format!("fake vCPU {i}").into_bytes()).collect() }
}

impl Migratable for FakeVm {
    fn kind(&self) -> VmKind {
        VmKind::Embedded
    }
    fn shape(&self) -> VmShape {
        self.shape
    }
    fn describe(&self) -> String {
        "fake".into()
    }
    fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }
    fn dirty_log(&self) -> &dyn DirtyLog {
        &self.dirty
    }
    fn pause(&self) -> VmResult<()> {
        self.running.store(false, Ordering::Release);
        Ok(())
    }
    fn resume(&self) -> VmResult<()> {
        self.running.store(true, Ordering::Release);
        Ok(())
    }
    fn fault(&self) -> Option<String> {
        None
    }
    fn set_throttle(&self, percent: u8) {
        self.throttle.store(percent, Ordering::Relaxed);
    }
    fn throttle(&self) -> u8 {
        self.throttle.load(Ordering::Relaxed)
    }
    fn save_machine_state(&self) -> VmResult<MachineState> {
        if self.is_running() {
            return Err(VmError::State("the fake VM saves its state only while paused".into()));
        }
        Ok(fake_state(self.shape.vcpus))
    }
    fn confidential(&self) -> Option<&dyn ConfidentialSource> {
        Some(self)
    }
    fn switchover_cost(&self) -> std::time::Duration {
        self.switchover_cost
    }
}

impl ConfidentialSource for FakeVm {
    fn mh(&self) -> MutexGuard<'_, Option<MhHost>> {
        self.mh.lock().unwrap()
    }
    fn external_page_states(&self) -> Option<Arc<dyn ExternalPageStates>> {
        None
    }
    fn is_shared(&self, _gfn: u64) -> bool {
        false
    }
    fn shared_bitmap(&self) -> Vec<u64> {
        vec![0; self.ram.pages().div_ceil(64) as usize]
    }
    fn shared_ranges(&self) -> Vec<(u64, u64)> {
        Vec::new()
    }
}

/// Destination VMs without KVM: RAM is a memfd mapping; restore and resume are recorded.
/// `has_ram`: the factory stands for a VMM whose RAM exists before the migration.
#[derive(Default)]
pub struct FakeVms {
    pub has_ram: bool,
}

pub struct FakeIncoming {
    shape: VmShape,
    ram: Arc<GuestRam>,
    mh: Mutex<Option<MhHost>>,
    pub restored: Mutex<Option<MachineState>>,
    pub resumed: AtomicBool,
}

impl ConfidentialIncoming for FakeIncoming {
    fn mh(&self) -> MutexGuard<'_, Option<MhHost>> {
        self.mh.lock().unwrap()
    }
    fn mark_shared(&self, _gfn: u64, _npages: u64) -> kvm_hooks::Result<()> {
        Ok(())
    }
}

impl VmFactory for FakeVms {
    type Vm = FakeIncoming;
    fn kind(&self) -> VmKind {
        VmKind::Embedded
    }
    fn has_ram(&self) -> bool {
        self.has_ram
    }
    fn create(&self, shape: VmShape, layout: &RamLayout, ram: Option<GuestRam>) -> VmResult<FakeIncoming> {
        if !layout.is_linear() {
            return Err(VmError::Unsupported("the fake VM keeps RAM at GPA 0 only".into()));
        }
        let ram = match ram {
            Some(r) => r,
            None => GuestRam::new(shape.ram_bytes)?,
        };
        Ok(FakeIncoming {
            shape,
            ram: Arc::new(ram),
            mh: Mutex::new(None),
            restored: Mutex::new(None),
            resumed: AtomicBool::new(false),
        })
    }
}

impl Incoming for FakeIncoming {
    fn shape(&self) -> VmShape {
        self.shape
    }
    fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }
    fn launch_mh(&mut self, _launch: &Launch, _timeout: std::time::Duration) -> Result<(), MhError> {
        Err(MhError::Faulted("the fake VM runs no Migration Handler".into()))
    }
    fn confidential(&self) -> Option<&dyn ConfidentialIncoming> {
        Some(self)
    }
    fn restore_machine_state(&mut self, state: &MachineState) -> VmResult<()> {
        // The fake's own state, or an embedded VM's (one encoded vCPU state per vCPU, as
        // the embedded VM decodes it): the fuzz targets replay recorded real migrations.
        if *state != fake_state(self.shape.vcpus) {
            if state.sections.len() != self.shape.vcpus as usize {
                return Err(VmError::State(format!(
                    "{} sections for a VM of {} vCPUs",
                    state.sections.len(),
                    self.shape.vcpus
                )));
            }
            for (i, s) in state.sections.iter().enumerate() {
                kvm_hooks::state::VcpuState::decode(s).map_err(|e| VmError::State(format!("vCPU {i}: {e}")))?;
            }
        }
        *self.restored.lock().unwrap() = Some(state.clone());
        Ok(())
    }
    fn resume(&self) -> VmResult<()> {
        self.resumed.store(true, Ordering::Release);
        Ok(())
    }
}
