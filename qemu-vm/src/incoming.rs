//! A QEMU process waiting for a migration (`-incoming defer`) as a destination: migaccel
//! writes guest RAM straight into QEMU's RAM file; on resume QEMU loads the source's device
//! stream (`x-ignore-shared`: RAM is already in place) and the VM runs.
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_hooks::layout::RamLayout;
use kvm_hooks::memory::GuestRam;
use kvm_hooks::migratable::{Incoming, MachineState, VmError, VmFactory, VmKind, VmResult, VmShape};
use serde_json::json;

use crate::attach::{attach, private_dir, Attached};
use crate::error::QemuError;
use crate::qmp::Migration;

/// Longest QEMU may take to load the device stream: only a hung QEMU reaches it.
const LOAD_TIMEOUT: Duration = Duration::from_secs(120);

/// The QEMU destination a receiver fills: the one QEMU process it was attached to.
pub struct QemuVms {
    a: Mutex<Option<Attached>>,
    /// Leave the VM paused after loading (QEMU started with `-S`): an operator resumes it.
    pub leave_paused: bool,
}

impl QemuVms {
    /// Attach to QEMU process `pid` (started with `-incoming defer`) through its QMP socket.
    /// With `populate`, allocate every page of QEMU's RAM file now, before any source
    /// connects (as QEMU's `-mem-prealloc` would): a first write to a fresh shared-memory
    /// page costs microseconds, and paid during the migration it bounds how fast RAM arrives.
    pub fn attach(pid: u32, qmp: &Path, leave_paused: bool, populate: bool) -> Result<QemuVms, QemuError> {
        let a = attach(pid, qmp)?;
        if a.status != "inmigrate" {
            return Err(QemuError::Attach {
                pid,
                what: "run state",
                msg: format!(
                    "the VM is {}, not waiting for a migration; start the destination QEMU with -incoming defer \
                     (and -S to keep it paused until migaccel resumes it)",
                    a.status
                ),
            });
        }
        // Whatever QEMU (or an earlier, failed receive) put in its RAM is not the source's:
        // pages the source sends as zero runs are not written, so RAM starts zero.
        a.ram.discard().map_err(|e| QemuError::Attach { pid, what: "clearing guest RAM", msg: e.to_string() })?;
        if populate {
            let t = Instant::now();
            a.ram.populate().map_err(|e| QemuError::Attach {
                pid,
                what: "allocating guest RAM",
                msg: e.to_string(),
            })?;
            tracing::info!(
                "QEMU process {pid}: {} MiB of guest RAM allocated in {:?}",
                a.shape.ram_bytes >> 20,
                t.elapsed()
            );
        }
        Ok(QemuVms { a: Mutex::new(Some(a)), leave_paused })
    }
}

impl VmFactory for QemuVms {
    type Vm = QemuIncoming;
    fn kind(&self) -> VmKind {
        VmKind::Qemu
    }
    fn has_ram(&self) -> bool {
        true
    }
    fn create(&self, shape: VmShape, layout: &RamLayout, ram: Option<GuestRam>) -> VmResult<QemuIncoming> {
        if ram.is_some() {
            return Err(VmError::Unsupported(
                "a QEMU destination receives into QEMU's own RAM: do not prepare RAM".into(),
            ));
        }
        let mut g = self.a.lock().unwrap_or_else(|e| e.into_inner());
        let a = g.as_ref().ok_or_else(|| VmError::Unsupported("this QEMU destination was used already".into()))?;
        if a.exited() {
            return Err(QemuError::Exited { pid: a.pid }.into());
        }
        if a.shape != shape || above_legacy(a.layout()) != above_legacy(layout) {
            return Err(VmError::Unsupported(format!(
                "the destination QEMU (process {}) cannot take this VM: it has {} MiB of RAM, {} vCPU(s), RAM at {}; \
                 the source has {} MiB, {} vCPU(s), RAM at {} (start it with the same -m, -smp and -machine)",
                a.pid,
                a.shape.ram_bytes >> 20,
                a.shape.vcpus,
                regions(a.layout()),
                shape.ram_bytes >> 20,
                shape.vcpus,
                regions(layout),
            )));
        }
        let a = g.take().expect("checked above");
        Ok(QemuIncoming { a, state: Mutex::new(None), leave_paused: self.leave_paused })
    }
}

fn regions(l: &RamLayout) -> String {
    let r: Vec<String> = above_legacy(l).iter().map(|(g, n, _)| format!("{g:#x}+{n:#x}")).collect();
    r.join(", ")
}

/// Below 1 MiB the guest itself decides what is RAM (the chipset's PAM registers, which
/// travel in the device state): two layouts match when they agree above it.
const LEGACY_END: u64 = 1 << 20;

fn above_legacy(l: &RamLayout) -> Vec<(u64, u64, u64)> {
    l.regions()
        .iter()
        .filter(|r| r.gpa.0 + r.len > LEGACY_END)
        .map(|r| {
            let cut = LEGACY_END.saturating_sub(r.gpa.0);
            (r.gpa.0 + cut, r.len - cut, r.offset + cut)
        })
        .collect()
}

/// A destination QEMU being filled.
pub struct QemuIncoming {
    a: Attached,
    state: Mutex<Option<MachineState>>,
    leave_paused: bool,
}

impl QemuIncoming {
    pub fn pid(&self) -> u32 {
        self.a.pid
    }

    /// QEMU's run state now.
    pub fn status(&self) -> Result<String, QemuError> {
        self.a.qmp().status()
    }

    fn load(&self, stream: &[u8]) -> Result<(), QemuError> {
        let pid = self.a.pid;
        let derr = |msg: String| QemuError::DeviceState { pid, msg };
        let dir = private_dir(pid)?;
        let sock = dir.join("devices.sock");
        let res = (|| {
            {
                let mut q = self.a.qmp();
                q.set_capabilities(&[("x-ignore-shared", true)])?;
                q.cmd("migrate-incoming", json!({ "uri": format!("unix:{}", sock.display()) }))?;
            }
            let t0 = Instant::now();
            let mut conn = loop {
                match UnixStream::connect(&sock) {
                    Ok(c) => break c,
                    Err(_) if t0.elapsed() < LOAD_TIMEOUT && !self.a.exited() => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    Err(e) => return Err(derr(format!("QEMU does not listen on {}: {e}", sock.display()))),
                }
            };
            let peer = kvm_hooks::process::peer_pid(&conn).map_err(|e| derr(e.to_string()))?;
            if peer != pid {
                return Err(derr(format!("process {peer}, not QEMU, listens on the device-state socket")));
            }
            conn.set_write_timeout(Some(LOAD_TIMEOUT)).map_err(|e| derr(e.to_string()))?;
            conn.write_all(stream).map_err(|e| derr(format!("writing the device stream: {e}")))?;
            conn.shutdown(std::net::Shutdown::Write).map_err(|e| derr(e.to_string()))?;
            loop {
                if self.a.exited() {
                    return Err(derr("QEMU exited while loading the device stream (its log says why)".into()));
                }
                match self.a.qmp().migration()? {
                    Migration::Completed => return Ok(()),
                    Migration::Failed(why) => return Err(derr(format!("QEMU refused the device stream: {why}"))),
                    _ if t0.elapsed() > LOAD_TIMEOUT => {
                        return Err(derr(format!("QEMU did not load the device stream within {LOAD_TIMEOUT:?}")))
                    }
                    _ => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        })();
        let _ = std::fs::remove_dir_all(&dir);
        res
    }
}

impl Incoming for QemuIncoming {
    fn shape(&self) -> VmShape {
        self.a.shape
    }
    fn ram(&self) -> &Arc<GuestRam> {
        &self.a.ram
    }
    fn restore_machine_state(&mut self, state: &MachineState) -> VmResult<()> {
        if state.sections.is_empty() {
            return Err(VmError::State("the source sent no device state".into()));
        }
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Some(state.clone());
        Ok(())
    }
    /// Load the device stream (QEMU reads RAM while loading, so only now, with RAM
    /// complete), then run the VM.
    fn resume(&self) -> VmResult<()> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner()).take();
        let state = state.ok_or_else(|| VmError::State("resume before the device state arrived".into()))?;
        let run = || -> Result<(), QemuError> {
            let t = Instant::now();
            self.load(&state.stream())?;
            tracing::info!(ms = t.elapsed().as_secs_f64() * 1e3, "QEMU loaded the device state");
            let status = self.a.qmp().status()?;
            if status == "paused" && !self.leave_paused {
                self.a.qmp().cmd("cont", json!({}))?;
            }
            Ok(())
        };
        run().map_err(|e| {
            // Whether QEMU runs the VM is unknown after a failed load or resume: it must not,
            // since the source will resume its own copy.
            let e = self.a.explain(e);
            match self.a.pidfd.kill(Duration::from_secs(30)) {
                Ok(true) => tracing::warn!("QEMU process {} killed: {e}", self.a.pid),
                r => tracing::error!("QEMU process {} could not be killed ({r:?}) after: {e}", self.a.pid),
            }
            e.into()
        })
    }
}
