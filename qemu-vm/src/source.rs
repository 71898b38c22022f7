//! A running QEMU VM as a migration source: RAM read from QEMU's RAM file, dirty pages from
//! the eBPF probes, pause and resume over QMP, and the machine state from QEMU's own
//! migration of its devices only (`x-ignore-shared`: shared RAM is left out of it).
use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use accel_ebpf::qemu::{QemuProbe, QemuTarget};
use kvm_hooks::memory::GuestRam;
use kvm_hooks::migratable::{
    DirtyLog, MachineState, Migratable, VmError, VmKind, VmResult, VmShape, MAX_MACHINE_STATE,
};
use serde_json::{json, Value};

use crate::attach::{attach, private_dir, Attached};
use crate::dirty::QemuDirtyLog;
use crate::error::QemuError;
use crate::qmp::Migration;

/// Longest QEMU may take to save its device state (a few milliseconds normally): only a
/// hung QEMU reaches it.
const SAVE_TIMEOUT: Duration = Duration::from_secs(120);

/// What QEMU's device state costs at switchover (saved by the source QEMU, carried, loaded
/// by the destination), measured here for the pc machine: 5 ms to save and 10 ms to load
/// 0.9 MB.
pub const DEVICE_STATE_COST: Duration = Duration::from_millis(15);

pub struct QemuVm {
    a: Attached,
    dirty: QemuDirtyLog,
    /// The VM was paused when migaccel attached: a failed migration leaves it paused.
    was_paused: bool,
    /// `x-ignore-shared` as it was before attaching, put back on drop.
    ignore_shared_before: bool,
}

impl QemuVm {
    /// Attach to running QEMU process `pid` through its QMP socket: checks as [`attach`],
    /// plus a VM that runs (or is paused), no dirty-rate limit set by someone else, and the
    /// eBPF probes loaded for this process.
    pub fn attach(pid: u32, qmp: &Path) -> Result<QemuVm, QemuError> {
        let a = attach(pid, qmp)?;
        let err = |what, msg: String| QemuError::Attach { pid, what, msg };
        if !matches!(a.status.as_str(), "running" | "paused") {
            return Err(err(
                "run state",
                format!("the VM is {}; migaccel sends a VM that runs or is paused", a.status),
            ));
        }
        let (ignore_shared_before, limits, mig) = {
            let mut q = a.qmp();
            (
                q.capability("x-ignore-shared")?,
                q.cmd("query-vcpu-dirty-limit", json!({}))?,
                q.cmd("query-migrate", json!({}))?,
            )
        };
        if limits.as_array().is_some_and(|l| !l.is_empty()) {
            return Err(err(
                "dirty limit",
                format!(
                    "a vCPU dirty-rate limit is set ({limits}); migaccel switches dirty logging with one. If it is \
                     left over from a migaccel that was killed, clear it with QMP cancel-vcpu-dirty-limit"
                ),
            ));
        }
        if let Some(s) = mig
            .get("status")
            .and_then(Value::as_str)
            .filter(|s| !matches!(*s, "none" | "completed" | "failed" | "cancelled"))
        {
            return Err(err("migration", format!("QEMU is migrating already (status {s})")));
        }
        let target = QemuTarget {
            pid,
            exe: a.exe.clone(),
            io_as: 0,
            ram_host: a.ram_host,
            ram_len: a.shape.ram_bytes,
            gfn_end: a.layout().gfn_end(),
        };
        let probe = QemuProbe::attach(&target).map_err(|source| QemuError::Ebpf { pid, source })?;
        // Our mapping of QEMU's RAM starts empty: map it now, not one fault per page in round 0.
        let t = Instant::now();
        match a.ram.populate_read() {
            Ok(()) => tracing::info!("QEMU process {pid}: guest RAM mapped for reading in {:?}", t.elapsed()),
            // Only slower: round 0 then faults each page in.
            Err(e) => tracing::warn!("QEMU process {pid}: {e}"),
        }
        let dirty = QemuDirtyLog::new(probe, a.qmp.clone(), a.layout().clone(), a.ram.pages());
        let was_paused = a.status == "paused";
        Ok(QemuVm { a, dirty, was_paused, ignore_shared_before })
    }

    pub fn pid(&self) -> u32 {
        self.a.pid
    }

    fn vmm(&self, e: QemuError) -> VmError {
        self.a.explain(e).into()
    }

    /// Run QEMU's migration of its devices into a socket of ours and return the stream.
    fn save_devices(&self) -> Result<Vec<u8>, QemuError> {
        let pid = self.a.pid;
        let derr = |msg: String| QemuError::DeviceState { pid, msg };
        let dir = private_dir(pid)?;
        let sock = dir.join("devices.sock");
        let mut started = false;
        let res = (|| {
            let l = UnixListener::bind(&sock).map_err(|e| derr(format!("bind {}: {e}", sock.display())))?;
            l.set_nonblocking(true).map_err(|e| derr(e.to_string()))?;
            {
                let mut q = self.a.qmp();
                q.set_capabilities(&[("x-ignore-shared", true)])?;
                q.cmd("migrate", json!({ "uri": format!("unix:{}", sock.display()) }))?;
                started = true;
            }
            let t0 = Instant::now();
            let mut conn = loop {
                match l.accept() {
                    Ok((c, _)) => break c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if let Migration::Failed(f) = self.a.qmp().migration()? {
                            return Err(derr(format!("QEMU's migration failed before connecting: {f}")));
                        }
                        if t0.elapsed() > SAVE_TIMEOUT {
                            return Err(derr(format!("QEMU did not connect within {SAVE_TIMEOUT:?}")));
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => return Err(derr(format!("accept: {e}"))),
                }
            };
            let peer = kvm_hooks::process::peer_pid(&conn).map_err(|e| derr(e.to_string()))?;
            if peer != pid {
                return Err(derr(format!("process {peer}, not QEMU, connected to the device-state socket")));
            }
            conn.set_nonblocking(false).map_err(|e| derr(e.to_string()))?;
            conn.set_read_timeout(Some(SAVE_TIMEOUT)).map_err(|e| derr(e.to_string()))?;
            let mut stream = Vec::new();
            (&mut conn)
                .take(MAX_MACHINE_STATE as u64 + 1)
                .read_to_end(&mut stream)
                .map_err(|e| derr(format!("reading QEMU's device stream: {e}")))?;
            if stream.len() > MAX_MACHINE_STATE {
                return Err(derr(format!("QEMU's device stream exceeds {MAX_MACHINE_STATE} bytes")));
            }
            // QEMU closes the stream before it calls the migration complete.
            loop {
                match self.a.qmp().migration()? {
                    Migration::Completed => break,
                    Migration::Failed(why) => {
                        return Err(derr(format!("QEMU's migration of its devices failed: {why}")))
                    }
                    m if t0.elapsed() > SAVE_TIMEOUT => {
                        return Err(derr(format!("QEMU's migration did not complete within {SAVE_TIMEOUT:?}: {m:?}")))
                    }
                    _ => std::thread::sleep(Duration::from_millis(1)),
                }
            }
            Ok(stream)
        })();
        let _ = std::fs::remove_dir_all(&dir);
        if res.is_err() && started && !self.a.exited() {
            // QEMU's migration must be over before the source resumes the guest.
            self.cancel_migration();
        }
        res
    }

    /// Cancel QEMU's migration and wait until it has ended (bounded).
    fn cancel_migration(&self) {
        let _ = self.a.qmp().cmd("migrate_cancel", json!({}));
        let t0 = Instant::now();
        while t0.elapsed() < SAVE_TIMEOUT {
            match self.a.qmp().migration() {
                Ok(Migration::Active(_)) => std::thread::sleep(Duration::from_millis(1)),
                _ => return,
            }
        }
        tracing::error!("QEMU process {}: its migration did not end after migrate_cancel", self.a.pid);
    }
}

impl Migratable for QemuVm {
    fn kind(&self) -> VmKind {
        VmKind::Qemu
    }
    fn shape(&self) -> VmShape {
        self.a.shape
    }
    fn describe(&self) -> String {
        format!("QEMU process {} ({}, memory backend \"{}\")", self.a.pid, self.a.exe.display(), self.a.backend)
    }
    fn ram(&self) -> &Arc<GuestRam> {
        &self.a.ram
    }
    fn dirty_log(&self) -> &dyn DirtyLog {
        &self.dirty
    }
    fn pause(&self) -> VmResult<()> {
        self.a.qmp().cmd("stop", json!({})).map(|_| ()).map_err(|e| self.vmm(e))
    }
    fn resume(&self) -> VmResult<()> {
        if self.was_paused {
            return Ok(());
        }
        self.a.qmp().cmd("cont", json!({})).map(|_| ()).map_err(|e| self.vmm(e))
    }
    fn fault(&self) -> Option<String> {
        if self.a.exited() {
            return Some(format!("QEMU process {} exited", self.a.pid));
        }
        match self.a.qmp().status() {
            Ok(s) if matches!(s.as_str(), "internal-error" | "guest-panicked" | "shutdown" | "io-error") => {
                Some(format!("QEMU reports the VM {s}"))
            }
            Ok(_) => None,
            Err(e) => Some(self.a.explain(e).to_string()),
        }
    }
    fn set_throttle(&self, _percent: u8) {}
    fn throttle(&self) -> u8 {
        0
    }
    fn switchover_cost(&self) -> Duration {
        DEVICE_STATE_COST
    }
    fn save_machine_state(&self) -> VmResult<MachineState> {
        let t = Instant::now();
        let stream = self.save_devices().map_err(|e| self.vmm(e))?;
        tracing::info!(bytes = stream.len(), ms = t.elapsed().as_secs_f64() * 1e3, "QEMU's device state saved");
        Ok(MachineState::from_stream(&stream))
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if self.a.exited() {
            return;
        }
        if let Err(e) = self.dirty.stop() {
            tracing::warn!("QEMU process {}: {e}; run QMP cancel-vcpu-dirty-limit", self.a.pid);
        }
        if !self.ignore_shared_before {
            let _ = self.a.qmp().set_capabilities(&[("x-ignore-shared", false)]);
        }
    }
}
