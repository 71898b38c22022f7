//! VM and vCPU handles on kvm-ioctls: one owning type per kernel object.
use std::sync::Arc;

use kvm_bindings::{kvm_enable_cap, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::dirty::{DirtyMode, DirtyRing, DirtyTracker};
use crate::error::{errno_io, Error, Result};
use crate::memory::GuestRam;
use crate::sys;

/// How the caller wants dirty pages tracked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyPreference {
    /// Ring of this many bytes per vCPU; fall back to the bitmap if unsupported.
    RingOrBitmap {
        bytes: u32,
    },
    /// Ring only: fail if the kernel lacks it.
    Ring {
        bytes: u32,
    },
    Bitmap,
}

/// What the host's KVM supports, for `doctor` and for choosing modes.
#[derive(Debug, Clone, Default)]
pub struct KvmCaps {
    pub api_version: i32,
    /// Largest dirty ring per vCPU in bytes (0 = unsupported).
    pub dirty_ring_max_bytes: u32,
    pub manual_dirty_log_protect: i32,
    pub nr_vcpus: i32,
    pub max_vcpus: i32,
}

static KVM_DEVICE: std::sync::Mutex<Option<std::path::PathBuf>> = std::sync::Mutex::new(None);

/// Use `path` instead of `/dev/kvm` for every VM created from now on.
pub fn set_kvm_device(path: impl Into<std::path::PathBuf>) {
    *KVM_DEVICE.lock().unwrap_or_else(|e| e.into_inner()) = Some(path.into());
}

/// The KVM device path in use.
pub fn kvm_device() -> std::path::PathBuf {
    KVM_DEVICE.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_else(|| "/dev/kvm".into())
}

fn open_kvm() -> Result<Kvm> {
    let path = kvm_device();
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::KvmUnavailable { path: path.clone(), source: std::io::ErrorKind::InvalidInput.into() })?;
    Kvm::new_with_path(c).map_err(|e| Error::KvmUnavailable { path, source: errno_io(e) })
}

/// Retry an ioctl that a signal interrupted (seen for KVM_CREATE_VM while other VMs of the
/// process were being torn down); other errors are returned at once.
fn retry_eintr<T>(
    mut f: impl FnMut() -> std::result::Result<T, vmm_sys_util::errno::Error>,
) -> std::result::Result<T, vmm_sys_util::errno::Error> {
    let mut tries = 0;
    loop {
        match f() {
            Err(e) if e.errno() == libc::EINTR && tries < 8 => tries += 1,
            r => return r,
        }
    }
}

/// Open the KVM device and read capabilities.
pub fn probe() -> Result<KvmCaps> {
    let kvm = open_kvm()?;
    Ok(KvmCaps {
        api_version: kvm.get_api_version(),
        dirty_ring_max_bytes: kvm.check_extension_raw(sys::CAP_DIRTY_LOG_RING_ACQ_REL.into()).max(0) as u32,
        manual_dirty_log_protect: kvm.check_extension_raw(sys::CAP_MANUAL_DIRTY_LOG_PROTECT2.into()),
        nr_vcpus: kvm.get_nr_vcpus() as i32,
        max_vcpus: kvm.get_max_vcpus() as i32,
    })
}

/// A VM with its guest RAM registered; dirty logging is off until a migration starts it.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    ram: Arc<GuestRam>,
    dirty: Arc<DirtyTracker>,
    cpuid: kvm_bindings::CpuId,
}

impl Vm {
    /// Create a VM over `ram`, choosing the dirty mode per `pref`.
    pub fn new(ram: GuestRam, pref: DirtyPreference) -> Result<Self> {
        let kvm = open_kvm()?;
        let fd = retry_eintr(|| kvm.create_vm()).map_err(|e| Error::ioctl("KVM_CREATE_VM", errno_io(e)))?;
        let max_ring = fd.check_extension_raw(sys::CAP_DIRTY_LOG_RING_ACQ_REL.into()).max(0) as u32;
        let mode = match pref {
            DirtyPreference::Bitmap => DirtyMode::Bitmap,
            DirtyPreference::Ring { bytes } | DirtyPreference::RingOrBitmap { bytes }
                if max_ring >= bytes && bytes > 0 =>
            {
                DirtyMode::Ring { bytes }
            }
            DirtyPreference::Ring { bytes } => {
                return Err(Error::Dirty(format!(
                    "dirty ring of {bytes} bytes requested, kernel supports at most {max_ring} bytes"
                )))
            }
            DirtyPreference::RingOrBitmap { bytes } => {
                tracing::warn!(bytes, max_ring, "dirty ring unavailable at this size, using the dirty bitmap");
                DirtyMode::Bitmap
            }
        };
        match mode {
            DirtyMode::Ring { bytes } => {
                let cap = kvm_enable_cap {
                    cap: sys::CAP_DIRTY_LOG_RING_ACQ_REL,
                    args: [bytes.into(), 0, 0, 0],
                    ..Default::default()
                };
                fd.enable_cap(&cap).map_err(|e| Error::ioctl("KVM_ENABLE_CAP(DIRTY_LOG_RING_ACQ_REL)", errno_io(e)))?;
            }
            DirtyMode::Bitmap => {
                let cap = kvm_enable_cap {
                    cap: sys::CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    args: [1, 0, 0, 0],
                    ..Default::default()
                };
                fd.enable_cap(&cap)
                    .map_err(|e| Error::ioctl("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)", errno_io(e)))?;
            }
        }
        // An in-kernel LAPIC/IOAPIC/PIC, as production VMMs have, so LAPIC state is part of
        // what migrates.
        fd.create_irq_chip().map_err(|e| Error::ioctl("KVM_CREATE_IRQCHIP", errno_io(e)))?;
        // Memslots start without dirty logging: a logged page costs the guest a
        // write-protect fault on its first write after every harvest, so logging is on only
        // while a migration runs (`DirtyTracker::start` / `stop`).
        for s in ram.slots() {
            let region = ram.kvm_region(s, 0)?;
            // SAFETY: the host range belongs to `ram`, which the VM and its dirty tracker
            // keep alive (Arc) for as long as the VM fd exists, and slots do not overlap.
            unsafe { fd.set_user_memory_region(region) }
                .map_err(|e| Error::ioctl("KVM_SET_USER_MEMORY_REGION", errno_io(e)))?;
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::ioctl("KVM_GET_SUPPORTED_CPUID", errno_io(e)))?;
        let fd = Arc::new(fd);
        let ram = Arc::new(ram);
        let dirty = Arc::new(DirtyTracker::new(fd.clone(), mode, ram.clone()));
        Ok(Vm { kvm, fd, ram, dirty, cpuid })
    }

    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }
    pub fn dirty(&self) -> &Arc<DirtyTracker> {
        &self.dirty
    }
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Create vCPU `id`, set its CPUID and map its dirty ring (if the ring is in use).
    pub fn create_vcpu(&self, id: u64) -> Result<VcpuFd> {
        let vcpu = retry_eintr(|| self.fd.create_vcpu(id)).map_err(|e| Error::ioctl("KVM_CREATE_VCPU", errno_io(e)))?;
        vcpu.set_cpuid2(&self.cpuid).map_err(|e| Error::ioctl("KVM_SET_CPUID2", errno_io(e)))?;
        if let DirtyMode::Ring { bytes } = self.dirty.mode() {
            self.dirty.add_ring(DirtyRing::map(&vcpu, bytes)?);
        }
        Ok(vcpu)
    }
}
