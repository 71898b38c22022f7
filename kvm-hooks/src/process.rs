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

    /// Kill the process (`SIGKILL` through the pidfd: never another process that reused the
    /// pid) and wait up to `timeout` for it to exit; true once it has.
    pub fn kill(&self, timeout: Duration) -> io::Result<bool> {
        // SAFETY: pidfd_send_signal takes a pidfd, a signal number, a null siginfo and flags;
        // it touches no memory of ours.
        let r = unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, self.fd.as_raw_fd(), libc::SIGKILL, std::ptr::null::<u8>(), 0)
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e);
            }
        }
        self.wait_exit(timeout)
    }

    /// A duplicate of the process's file descriptor `fd` (`pidfd_getfd`): the same open
    /// file (a guest-RAM memfd), now also ours. Needs ptrace access to the process (root).
    pub fn get_fd(&self, fd: i32) -> io::Result<OwnedFd> {
        // SAFETY: pidfd_getfd takes a pidfd, a descriptor number and flags, and returns a
        // new descriptor or -1; it touches no memory of ours.
        let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, self.fd.as_raw_fd(), fd, 0) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `r` is a descriptor the kernel just installed for us alone.
        Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
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

/// The process at the other end of a connected Unix socket (`SO_PEERCRED`).
pub fn peer_pid(sock: &impl AsRawFd) -> io::Result<u32> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given; the kernel writes
    // at most `len` bytes into `cred`.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.pid as u32)
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
