//! kvm-hooks: everything that talks to KVM.
//!
//! One owning type per kernel object ([`vm::Vm`], [`dirty::DirtyRing`], [`memory::GuestRam`]),
//! vCPU state encoding ([`state`]), the host end of the Migration Handler ([`mh`]) and the
//! engine's VM boundary ([`migratable`]). The embedded test VMM that runs VMs on these
//! parts is its own crate (`embedded-vmm`). Syscalls go through the private `sys` module;
//! every `unsafe` block carries a `SAFETY:` comment.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod boot;
pub mod conformance;
pub mod dirty;
pub mod error;
pub mod layout;
pub mod memory;
pub mod mh;
pub mod migratable;
pub mod process;
pub mod sev;
pub mod state;
mod sys;
pub mod uring;
pub mod vm;

pub use error::{Error, Result};
pub use sys::{wait_readable, EXIT_DIRTY_RING_FULL};

/// Threads as the VMM's vCPU loops need them: their kernel ids and a signal to one.
pub mod thread {
    pub use crate::sys::{gettid, pthread_kill};
}

/// Write a raw iovec list to a file descriptor (guest RAM goes straight to the socket).
/// Returns bytes written; short writes are the caller's to resume.
pub fn writev_raw(fd: std::os::fd::BorrowedFd<'_>, iov: &[libc::iovec]) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let n = iov.len().min(1024);
    // SAFETY: each iovec points into memory that outlives the call (guest RAM mapping or a
    // caller's buffer); the kernel only reads from it.
    let r = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), n as i32) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Read from a file descriptor straight into guest RAM at `gpa` (bounds checked).
/// `wait_all` (sockets only) receives with `MSG_WAITALL`: one wakeup per call instead of one
/// per arriving segment, and fewer bytes only at end of stream, on a signal or a timeout.
pub fn read_into_guest(
    fd: std::os::fd::BorrowedFd<'_>,
    ram: &memory::GuestRam,
    gpa: u64,
    len: u64,
    wait_all: bool,
) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let iov = ram.iovec(gpa, len).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    // SAFETY: `iov` covers `len` bytes inside the guest RAM mapping (checked by `iovec`),
    // which lives as long as `ram`; the kernel writes only within it.
    let r = unsafe {
        if wait_all {
            libc::recv(fd.as_raw_fd(), iov.iov_base, iov.iov_len, libc::MSG_WAITALL)
        } else {
            libc::readv(fd.as_raw_fd(), &iov, 1)
        }
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// CPU time (user + system) and context switches (voluntary + involuntary) of this
/// process so far, all threads: a transport that sleeps and wakes per chunk shows here.
pub fn process_usage() -> (std::time::Duration, u64) {
    // SAFETY: rusage is plain data; getrusage fills it completely for RUSAGE_SELF.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return (std::time::Duration::ZERO, 0);
    }
    let tv = |t: libc::timeval| std::time::Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (tv(u.ru_utime) + tv(u.ru_stime), (u.ru_nvcsw + u.ru_nivcsw) as u64)
}
