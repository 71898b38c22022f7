//! The embedded VMM behind the engine's VM boundary: a [`Machine`] is a [`Migratable`]
//! source and an [`Incoming`] destination, and [`EmbeddedVms`] creates destinations.
use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use kvm_hooks::memory::GuestRam;
use kvm_hooks::mh::{Launch, MhError, MhHost};
use kvm_hooks::migratable::{DirtyLog, ExternalPageStates, Incoming, Migratable, VmFactory, VmShape};
use kvm_hooks::state::VcpuState;
use kvm_hooks::vm::DirtyPreference;
use kvm_hooks::Result;

use crate::vmm::{GuestSpec, Machine};

impl Migratable for Machine {
    fn shape(&self) -> VmShape {
        Machine::spec(self).shape()
    }
    fn describe(&self) -> String {
        Machine::spec(self).workload.to_string()
    }
    fn ram(&self) -> &Arc<GuestRam> {
        Machine::ram(self)
    }
    fn dirty_log(&self) -> &dyn DirtyLog {
        &**Machine::dirty(self)
    }
    fn pause(&self) -> Result<()> {
        Machine::pause(self)
    }
    fn resume(&self) -> Result<()> {
        Machine::resume(self)
    }
    fn fault(&self) -> Option<String> {
        Machine::fault(self)
    }
    fn set_throttle(&self, percent: u8) {
        Machine::set_throttle(self, percent)
    }
    fn throttle(&self) -> u8 {
        Machine::throttle(self)
    }
    fn save_states(&self) -> Result<Vec<VcpuState>> {
        Machine::save_states(self)
    }
    fn mh(&self) -> MutexGuard<'_, Option<MhHost>> {
        Machine::mh(self)
    }
    fn external_page_states(&self) -> Option<Arc<dyn ExternalPageStates>> {
        Machine::external_page_states(self)
    }
    fn is_shared(&self, gfn: u64) -> bool {
        Machine::is_shared(self, gfn)
    }
    fn shared_bitmap(&self) -> Vec<u64> {
        Machine::shared_bitmap(self)
    }
    fn shared_ranges(&self) -> Vec<(u64, u64)> {
        Machine::shared_ranges(self)
    }
    fn page_writes(&self) -> Option<u64> {
        Some(Machine::page_writes(self))
    }
}

/// Destination VMs of the embedded VMM.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedVms {
    /// Dirty tracking of the new VM, so it can migrate on later (off until it does).
    pub dirty: DirtyPreference,
}

impl VmFactory for EmbeddedVms {
    type Vm = Machine;
    fn create(&self, shape: VmShape, ram: Option<GuestRam>) -> Result<Machine> {
        let spec = GuestSpec::restored(shape);
        spec.validate()?;
        match ram {
            Some(ram) => Machine::destination_in(spec, self.dirty, ram),
            None => Machine::destination(spec, self.dirty),
        }
    }
}

impl Incoming for Machine {
    fn shape(&self) -> VmShape {
        Machine::spec(self).shape()
    }
    fn ram(&self) -> &Arc<GuestRam> {
        Machine::ram(self)
    }
    fn launch_mh(&mut self, launch: &Launch, timeout: Duration) -> std::result::Result<(), MhError> {
        Machine::launch_mh(self, launch, timeout)
    }
    fn mh(&self) -> MutexGuard<'_, Option<MhHost>> {
        Machine::mh(self)
    }
    fn mark_shared(&self, gfn: u64, npages: u64) -> Result<()> {
        Machine::mark_shared(self, gfn, npages)
    }
    fn restore_states(&self, states: &[VcpuState]) -> Result<()> {
        Machine::restore_states(self, states)
    }
    fn resume(&self) -> Result<()> {
        Machine::resume(self)
    }
}
