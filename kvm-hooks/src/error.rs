//! Errors of the KVM layer: each names the operation that failed.
use std::io;

/// Everything that can go wrong while talking to KVM or managing guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KVM device {} is not available ({source}); is the kvm module loaded and are you root?", .path.display())]
    KvmUnavailable { path: std::path::PathBuf, source: io::Error },
    #[error("KVM ioctl {op} failed: {source}")]
    Ioctl {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("guest RAM: {0}")]
    Memory(String),
    #[error("guest RAM size {0} bytes is invalid: {1}")]
    BadRamSize(u64, &'static str),
    #[error("dirty tracking: {0}")]
    Dirty(String),
    #[error("page states: {0}")]
    PageStates(String),
    #[error("vCPU {vcpu}: {msg}")]
    Vcpu { vcpu: usize, msg: String },
    #[error("vCPU state encoding: {0}")]
    StateEncoding(String),
    #[error("guest address {gpa:#x}+{len:#x} is outside guest RAM ({ram:#x} bytes)")]
    OutOfRange { gpa: u64, len: u64, ram: u64 },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A failed ioctl, named by its request.
    pub fn ioctl(op: &'static str, e: impl Into<io::Error>) -> Self {
        Error::Ioctl { op, source: e.into() }
    }
}

/// Convert a kvm-ioctls / vmm-sys-util errno into `io::Error`.
pub fn errno_io(e: vmm_sys_util::errno::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}
