//! The embedded VMM behind the engine's VM boundary: a [`Machine`] is a [`Migratable`]
//! source and an [`Incoming`] destination, and [`EmbeddedVms`] creates destinations.
use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use kvm_hooks::layout::RamLayout;
use kvm_hooks::memory::GuestRam;
use kvm_hooks::mh::{Launch, MhError, MhHost};
use kvm_hooks::migratable::{
    ConfidentialIncoming, ConfidentialSource, DirtyLog, ExternalPageStates, Incoming, MachineState, Migratable,
    VmError, VmFactory, VmKind, VmResult, VmShape,
};
use kvm_hooks::state::VcpuState;
use kvm_hooks::vm::DirtyPreference;
use kvm_hooks::Result;

use crate::vmm::{GuestSpec, Machine};

/// The embedded VM's machine state: one section per vCPU, its encoded KVM state.
fn encode_states(states: &[VcpuState]) -> MachineState {
    MachineState { sections: states.iter().map(VcpuState::encode).collect() }
}

/// Decode one vCPU state per section, for a VM of `vcpus` vCPUs.
fn decode_states(state: &MachineState, vcpus: u32) -> VmResult<Vec<VcpuState>> {
    if state.sections.len() != vcpus as usize {
        return Err(VmError::State(format!("{} vCPU states for a VM of {vcpus} vCPUs", state.sections.len())));
    }
    let decode = |(i, s): (usize, &Vec<u8>)| VcpuState::decode(s).map_err(|e| VmError::State(format!("vCPU {i}: {e}")));
    state.sections.iter().enumerate().map(decode).collect()
}

impl Migratable for Machine {
    fn kind(&self) -> VmKind {
        VmKind::Embedded
    }
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
    fn pause(&self) -> VmResult<()> {
        Ok(Machine::pause(self)?)
    }
    fn resume(&self) -> VmResult<()> {
        Ok(Machine::resume(self)?)
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
    fn save_machine_state(&self) -> VmResult<MachineState> {
        Ok(encode_states(&Machine::save_states(self)?))
    }
    fn confidential(&self) -> Option<&dyn ConfidentialSource> {
        // Every embedded VM can run a Migration Handler; `mh()` says whether one runs.
        Some(self)
    }
    fn page_writes(&self) -> Option<u64> {
        Some(Machine::page_writes(self))
    }
}

impl ConfidentialSource for Machine {
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
}

/// Destination VMs of the embedded VMM.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedVms {
    /// Dirty tracking of the new VM, so it can migrate on later (off until it does).
    pub dirty: DirtyPreference,
}

impl VmFactory for EmbeddedVms {
    type Vm = Machine;
    fn kind(&self) -> VmKind {
        VmKind::Embedded
    }
    fn create(&self, shape: VmShape, layout: &RamLayout, ram: Option<GuestRam>) -> VmResult<Machine> {
        if !layout.is_linear() {
            return Err(VmError::Unsupported(format!(
                "the embedded VMM keeps guest RAM in one region at GPA 0; the source's RAM has {} regions",
                layout.regions().len()
            )));
        }
        let spec = GuestSpec::restored(shape);
        spec.validate()?;
        Ok(match ram {
            Some(ram) => Machine::destination_in(spec, self.dirty, ram)?,
            None => Machine::destination(spec, self.dirty)?,
        })
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
    fn confidential(&self) -> Option<&dyn ConfidentialIncoming> {
        Some(self)
    }
    fn restore_machine_state(&mut self, state: &MachineState) -> VmResult<()> {
        let states = decode_states(state, Machine::spec(self).vcpus)?;
        Ok(Machine::restore_states(self, &states)?)
    }
    fn resume(&self) -> VmResult<()> {
        Ok(Machine::resume(self)?)
    }
}

impl ConfidentialIncoming for Machine {
    fn mh(&self) -> MutexGuard<'_, Option<MhHost>> {
        Machine::mh(self)
    }
    fn mark_shared(&self, gfn: u64, npages: u64) -> Result<()> {
        Machine::mark_shared(self, gfn, npages)
    }
}
