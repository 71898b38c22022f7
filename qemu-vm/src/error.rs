//! What can go wrong with a QEMU VM: each error names the process, the step and what to do.
use std::path::PathBuf;

use kvm_hooks::migratable::VmError;

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("no process {pid}: {source}")]
    NoProcess {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("process {pid} is not QEMU (it runs {exe})")]
    NotQemu { pid: u32, exe: String },
    #[error("QMP socket {}: {msg}", .path.display())]
    Qmp { path: PathBuf, msg: String },
    #[error("QMP {command}: {msg}")]
    Command { command: String, msg: String },
    #[error(
        "QEMU process {pid}: guest RAM is not shared memory ({detail}); migaccel maps QEMU's RAM file, so \
         start QEMU with\n  -object memory-backend-memfd,id=ram0,size=<RAM>,share=on -machine memory-backend=ram0"
    )]
    RamNotShared { pid: u32, detail: String },
    #[error(
        "QEMU process {pid} runs without KVM's dirty ring ({detail}); migaccel follows dirty pages on the ring, \
         so start QEMU with\n  -accel kvm,dirty-ring-size=4096"
    )]
    NoDirtyRing { pid: u32, detail: String },
    #[error("QEMU process {pid}: {what}: {msg}")]
    Attach { pid: u32, what: &'static str, msg: String },
    #[error("QEMU process {pid}: eBPF probes: {source}")]
    Ebpf {
        pid: u32,
        #[source]
        source: accel_ebpf::EbpfError,
    },
    #[error("QEMU process {pid} exited")]
    Exited { pid: u32 },
    #[error("QEMU process {pid}: device state: {msg}")]
    DeviceState { pid: u32, msg: String },
}

impl From<QemuError> for VmError {
    fn from(e: QemuError) -> VmError {
        VmError::Vmm(e.to_string())
    }
}
