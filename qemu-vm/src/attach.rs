//! Attaching to a QEMU process: the checks both ends make, and what they learn.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kvm_hooks::layout::RamLayout;
use kvm_hooks::memory::GuestRam;
use kvm_hooks::migratable::VmShape;
use kvm_hooks::process::Pidfd;
use serde_json::{json, Value};

use crate::error::QemuError;
use crate::qmp::Qmp;

/// A QEMU process as migaccel sees it after the checks of [`attach`].
pub struct Attached {
    pub pid: u32,
    pub pidfd: Pidfd,
    pub exe: PathBuf,
    pub qmp: Arc<Mutex<Qmp>>,
    /// Guest RAM: QEMU's RAM file, mapped here too.
    pub ram: Arc<GuestRam>,
    /// Where QEMU maps guest RAM in its own address space.
    pub ram_host: u64,
    pub shape: VmShape,
    /// The memory backend's id.
    pub backend: String,
    /// Its run state when attached.
    pub status: String,
}

impl Attached {
    pub fn layout(&self) -> &RamLayout {
        self.ram.layout()
    }

    pub fn qmp(&self) -> std::sync::MutexGuard<'_, Qmp> {
        self.qmp.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True once QEMU has exited.
    pub fn exited(&self) -> bool {
        self.pidfd.wait_exit(std::time::Duration::ZERO).unwrap_or(true)
    }

    /// `e`, or [`QemuError::Exited`] when QEMU is gone: a monitor connection that breaks is
    /// often the first sign of an exit the kernel has not finished yet.
    pub fn explain(&self, e: QemuError) -> QemuError {
        let gone = match &e {
            QemuError::Qmp { .. } => self.pidfd.wait_exit(std::time::Duration::from_secs(2)).unwrap_or(true),
            _ => self.exited(),
        };
        if gone {
            QemuError::Exited { pid: self.pid }
        } else {
            e
        }
    }
}

/// Attach to QEMU process `pid` through its QMP socket `qmp`: check that it is QEMU, that
/// the socket is its own, that guest RAM is one shared memory backend (and map it), and
/// learn the RAM layout and the vCPU count.
pub fn attach(pid: u32, qmp: &Path) -> Result<Attached, QemuError> {
    let (pidfd, exe) = crate::process::open(pid)?;
    let mut q = Qmp::connect(qmp, pid)?;
    let status = q.status()?;
    let err = |what, msg: String| QemuError::Attach { pid, what, msg };
    let memdevs = q.cmd("query-memdev", json!({}))?;
    let memdevs = memdevs.as_array().cloned().unwrap_or_default();
    let machine_backend = q
        .cmd("qom-get", json!({ "path": "/machine", "property": "memory-backend" }))
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .filter(|s| !s.is_empty());
    let id_of = |m: &Value| m.get("id").and_then(Value::as_str).unwrap_or_default().to_string();
    let dev = match (&machine_backend, memdevs.len()) {
        (Some(b), _) => memdevs.iter().find(|m| id_of(m) == *b || b.ends_with(&format!("/{}", id_of(m)))).cloned(),
        (None, 1) => memdevs.first().cloned(),
        _ => None,
    };
    let Some(dev) = dev else {
        return Err(QemuError::RamNotShared {
            pid,
            detail: format!(
                "{} memory backend(s) and none set as -machine memory-backend (QEMU's default RAM is private)",
                memdevs.len()
            ),
        });
    };
    let backend = id_of(&dev);
    if dev.get("share").and_then(Value::as_bool) != Some(true) {
        return Err(QemuError::RamNotShared { pid, detail: format!("memory backend \"{backend}\" has share=off") });
    }
    let size = dev.get("size").and_then(Value::as_u64).ok_or_else(|| err("query-memdev", format!("{dev}")))?;
    let ring = crate::process::dirty_ring_size(&crate::process::cmdline(pid)?);
    if ring == 0 {
        return Err(QemuError::NoDirtyRing { pid, detail: "no dirty-ring-size on its -accel kvm".into() });
    }
    let text = q.hmp("info mtree -f")?;
    let layout = crate::layout::from_mtree(&text, &backend, size).map_err(|m| err("RAM layout", m))?;
    let file = crate::process::ram_file(&pidfd, size)?;
    let ram = GuestRam::from_file(file.file, size, layout).map_err(|e| err("mapping guest RAM", e.to_string()))?;
    let cpus = q.cmd("query-cpus-fast", json!({}))?;
    let vcpus = cpus.as_array().map_or(0, Vec::len) as u32;
    let shape = VmShape { ram_bytes: size, vcpus };
    shape.validate().map_err(|e| err("VM shape", e.to_string()))?;
    Ok(Attached {
        pid,
        pidfd,
        exe,
        qmp: Arc::new(Mutex::new(q)),
        ram: Arc::new(ram),
        ram_host: file.host_addr,
        shape,
        backend,
        status,
    })
}

/// A private directory (mode 0700) for the Unix socket QEMU's device stream travels on.
pub fn private_dir(pid: u32) -> Result<PathBuf, QemuError> {
    use std::os::unix::fs::DirBuilderExt;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!("migaccel-qemu-{}-{pid}-{nanos}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(|e| QemuError::Attach {
        pid,
        what: "socket directory",
        msg: format!("{}: {e}", dir.display()),
    })?;
    Ok(dir)
}
