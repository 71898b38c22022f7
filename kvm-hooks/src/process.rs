//! Another process: a foreign VMM (QEMU, or another migaccel) that this process watches but
//! does not own. A pidfd pins the process's identity, so a recycled pid is never mistaken
//! for it, and becomes readable when it exits.
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// A process handle (`pidfd_open`).
#[derive(Debug)]
pub struct Pidfd {
    fd: OwnedFd,
    pid: u32,
}

impl Pidfd {
    pub fn open(pid: u32) -> io::Result<Pidfd> {
        let p = libc::pid_t::try_from(pid)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{pid} is not a process id")))?;
        if p <= 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{pid} is not a process id")));
        }
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory.
        let r = unsafe { libc::syscall(libc::SYS_pidfd_open, p, 0) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `r` is a file descriptor the kernel just created for us alone.
        Ok(Pidfd { fd: unsafe { OwnedFd::from_raw_fd(r as i32) }, pid })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Wait up to `timeout` for the process to exit; true once it has.
    pub fn wait_exit(&self, timeout: Duration) -> io::Result<bool> {
        let mut p = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // Rounded up: a sub-millisecond wait must not turn into a busy poll.
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        loop {
            // SAFETY: `p` is one valid pollfd for the duration of the call.
            let r = unsafe { libc::poll(&mut p, 1, ms) };
            if r >= 0 {
                return Ok(r > 0);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// How many KVM VMs `pid` holds (its `anon_inode:kvm-vm` file descriptors).
pub fn kvm_vms(pid: u32) -> io::Result<usize> {
    let mut n = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        // A descriptor closed between listing and reading is skipped.
        if let Ok(t) = std::fs::read_link(e?.path()) {
            n += usize::from(t.as_os_str() == "anon_inode:kvm-vm");
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pidfd_sees_a_child_exit_and_refuses_bad_pids() {
        let mut c = std::process::Command::new("sleep").arg("1").spawn().unwrap();
        let p = Pidfd::open(c.id()).unwrap();
        assert!(!p.wait_exit(Duration::ZERO).unwrap(), "still running");
        assert_eq!(kvm_vms(c.id()).unwrap(), 0, "sleep holds no VM");
        assert!(p.wait_exit(Duration::from_secs(10)).unwrap(), "exited");
        c.wait().unwrap();
        assert_eq!(Pidfd::open(0).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(Pidfd::open(u32::MAX).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        // A pid beyond pid_max names no process.
        assert_eq!(Pidfd::open(1 << 22).unwrap_err().raw_os_error(), Some(libc::ESRCH));
        assert!(kvm_vms(1 << 22).is_err());
    }
}
