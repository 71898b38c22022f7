//! Raw system calls and ioctls that kvm-ioctls 0.25 does not wrap.
//!
//! Every syscall of this crate that is not a kvm-ioctls method goes through here, so the
//! rest of the crate stays free of raw `libc` calls.
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{mpsc, Mutex, OnceLock};

use kvm_bindings::kvm_clear_dirty_log;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::{ioctl_io_nr, ioctl_iowr_nr};

const KVMIO: u32 = 0xAE;
ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL`.
pub const CAP_DIRTY_LOG_RING_ACQ_REL: u32 = 223;
/// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`.
pub const CAP_MANUAL_DIRTY_LOG_PROTECT2: u32 = 168;
/// `KVM_DIRTY_LOG_PAGE_OFFSET`: the ring lives this many pages into the vCPU fd.
pub const DIRTY_LOG_PAGE_OFFSET: u64 = 64;
/// `KVM_EXIT_DIRTY_RING_FULL`.
pub const EXIT_DIRTY_RING_FULL: u32 = 31;

/// `KVM_RESET_DIRTY_RINGS` on a VM fd: returns how many entries were reset.
///
/// Since Linux 6.16 the reset stops with `EINTR` when `signal_pending()` is true for the
/// calling thread, and entries it already consumed but had not yet write-protected (its
/// current batch of up to 64 neighbouring pages) are dropped: those pages stay writable and
/// later writes to them go unreported. `signal_pending()` is also true for
/// `TIF_NOTIFY_SIGNAL`, which io_uring sets on the thread that submitted a request when its
/// completion needs task work (a send, a cancellation after a reset peer), and which no
/// signal mask blocks. So the ioctl runs on one dedicated thread that never touches io_uring
/// and blocks every signal. An `EINTR` there would still be reported as [`ResetInterrupted`],
/// never silently retried, so the caller can fall back to resending everything.
pub fn reset_dirty_rings(vm: &impl AsRawFd) -> io::Result<u32> {
    let (tx, rx) = mpsc::sync_channel(1);
    let req = ResetRequest { fd: vm.as_raw_fd(), reply: tx };
    resetter()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(req)
        .map_err(|_| io::Error::other("the dirty-ring reset thread is gone"))?;
    // The caller keeps `vm` (and so the fd) alive while it waits here.
    rx.recv().map_err(|_| io::Error::other("the dirty-ring reset thread dropped a request"))?
}

/// The error kind [`reset_dirty_rings`] returns when KVM was interrupted mid-reset.
pub fn is_reset_interrupted(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<ResetInterrupted>())
}

#[derive(Debug)]
pub struct ResetInterrupted;

impl std::fmt::Display for ResetInterrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KVM_RESET_DIRTY_RINGS was interrupted; some pages may no longer be write-protected")
    }
}

impl std::error::Error for ResetInterrupted {}

struct ResetRequest {
    fd: RawFd,
    reply: mpsc::SyncSender<io::Result<u32>>,
}

fn resetter() -> &'static Mutex<mpsc::Sender<ResetRequest>> {
    static R: OnceLock<Mutex<mpsc::Sender<ResetRequest>>> = OnceLock::new();
    R.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<ResetRequest>();
        let spawned = std::thread::Builder::new().name("kvm-dirty-reset".into()).spawn(move || {
            // Blocked for the thread's whole life; it never submits io_uring requests.
            let _mask = BlockSignals::new();
            for req in rx {
                // SAFETY: the ioctl takes no argument and only acts on the VM behind `fd`,
                // which the requester keeps open until it has our reply.
                let ret = unsafe { libc::ioctl(req.fd, KVM_RESET_DIRTY_RINGS() as _) };
                let res = if ret >= 0 {
                    Ok(ret as u32)
                } else {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() == Some(libc::EINTR) {
                        Err(io::Error::new(io::ErrorKind::Interrupted, ResetInterrupted))
                    } else {
                        Err(e)
                    }
                };
                let _ = req.reply.send(res);
            }
        });
        if let Err(e) = spawned {
            tracing::error!("cannot start the dirty-ring reset thread: {e}");
        }
        Mutex::new(tx)
    })
}

/// Blocks every signal in the calling thread until dropped.
struct BlockSignals {
    old: libc::sigset_t,
}

impl BlockSignals {
    fn new() -> io::Result<Self> {
        // SAFETY: sigset_t is plain data; sigfillset initialises it fully.
        let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `all` is a valid sigset_t we own.
        unsafe { libc::sigfillset(&mut all) };
        // SAFETY: both pointers refer to live sigset_t values owned by this frame.
        let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(BlockSignals { old })
    }
}

impl Drop for BlockSignals {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `new`; a pending kick is delivered now.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

/// `KVM_CLEAR_DIRTY_LOG`: clear (and re-protect) the pages set in `bitmap`, which covers
/// `num_pages` pages of `slot` starting at `first_page` (a multiple of 64).
pub fn clear_dirty_log(
    vm: &impl AsRawFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &mut [u64],
) -> io::Result<()> {
    if (num_pages as usize).div_ceil(64) > bitmap.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "bitmap shorter than num_pages"));
    }
    let mut arg = kvm_clear_dirty_log { slot, num_pages, first_page, ..Default::default() };
    arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
    // SAFETY: `arg` points at a bitmap of at least `num_pages` bits that outlives the call;
    // the kernel only reads it.
    let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `memfd_create` with close-on-exec, so guest RAM can be shared with another process later.
pub fn memfd_create(name: &str) -> io::Result<OwnedFd> {
    let cname = std::ffi::CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `cname` is a valid NUL-terminated string; the flags are valid.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Byte ranges of `fd` that hold data (everything else is a hole that reads as zero),
/// found with `lseek(SEEK_DATA/SEEK_HOLE)`.
pub fn data_extents(fd: &impl AsRawFd, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos = 0i64;
    while (pos as u64) < size {
        // SAFETY: lseek only reads the fd's extent map; no memory is passed.
        let data = unsafe { libc::lseek(fd.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        out.push((data as u64, (hole as u64).min(size)));
        pos = hole;
    }
    Ok(out)
}

/// Allocate the whole file (`fallocate`), then map every page writable into `addr..+len`
/// (`MADV_POPULATE_WRITE`), so later writes take no page faults.
pub fn populate(fd: &impl AsRawFd, addr: *mut u8, len: u64) -> io::Result<()> {
    // SAFETY: fallocate only changes the file's allocation; no memory is passed.
    if unsafe { libc::fallocate(fd.as_raw_fd(), 0, 0, len as i64) } != 0 {
        return Err(io::Error::last_os_error());
    }
    const MADV_POPULATE_WRITE: i32 = 23;
    // SAFETY: `addr..addr+len` is a shared mapping of `fd` owned by the caller; populating
    // it does not change its contents.
    if unsafe { libc::madvise(addr.cast(), len as usize, MADV_POPULATE_WRITE) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Free every page of the file's first `len` bytes (they read as zero again), keeping its
/// size.
pub fn punch_hole(fd: &impl AsRawFd, len: u64) -> io::Result<()> {
    // SAFETY: fallocate only changes the file's allocation; no memory is passed.
    let r = unsafe {
        libc::fallocate(fd.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 0, len as i64)
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Map the pages of `addr..+len` (a shared mapping of the caller's) into this process for
/// reading (`MADV_POPULATE_READ`), so later reads take no page faults.
pub fn populate_read(addr: *mut u8, len: u64) -> io::Result<()> {
    const MADV_POPULATE_READ: i32 = 22;
    // SAFETY: `addr..addr+len` lies inside a mapping the caller owns; populating page
    // tables for reading changes no memory.
    if unsafe { libc::madvise(addr.cast(), len as usize, MADV_POPULATE_READ) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Wait until `fd` is readable (data, end of stream or an error to report), at most
/// `timeout`. `Ok(false)`: nothing arrived in time. An interrupted wait counts as nothing.
pub fn wait_readable(fd: std::os::fd::BorrowedFd<'_>, timeout: std::time::Duration) -> io::Result<bool> {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `p` is one valid pollfd for the duration of the call, matching nfds = 1.
    let ret = unsafe { libc::poll(&mut p, 1, ms) };
    match ret {
        r if r > 0 => Ok(true),
        0 => Ok(false),
        _ => {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

/// Shut a socket down for writing: queued and later sends fail with `EPIPE`; what the
/// kernel already holds still goes out, followed by the end of the stream.
pub fn shutdown_write(fd: RawFd) -> io::Result<()> {
    // SAFETY: shutdown(2) on a descriptor the caller owns; no memory is passed.
    if unsafe { libc::shutdown(fd, libc::SHUT_WR) } != 0 {
        let e = io::Error::last_os_error();
        // Already disconnected: nothing can be sent on it either.
        if e.raw_os_error() != Some(libc::ENOTCONN) {
            return Err(e);
        }
    }
    Ok(())
}

/// The calling thread's kernel id.
pub fn gettid() -> u64 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() as u64 }
}

/// Send `sig` to one thread of this process.
pub fn pthread_kill(thread: libc::pthread_t, sig: i32) -> io::Result<()> {
    // SAFETY: pthread_kill does not touch memory; an exited thread yields ESRCH, not UB, as
    // long as the handle has not been joined (the caller keeps the JoinHandle alive).
    let ret = unsafe { libc::pthread_kill(thread, sig) };
    if ret != 0 {
        Err(io::Error::from_raw_os_error(ret))
    } else {
        Ok(())
    }
}

/// True if the bytes at `ptr..ptr+len` are 0.
///
/// # Safety
/// `ptr..ptr+len` must be mapped and readable for the duration of the call.
pub unsafe fn is_zero(ptr: *const u8, len: usize) -> bool {
    let words = len / 8;
    let p = ptr.cast::<u64>();
    let mut acc = 0u64;
    for i in 0..words {
        // SAFETY: within the mapped range per the function contract; volatile because the
        // guest may write concurrently (a torn answer is fine: such a page is dirty again).
        acc |= unsafe { std::ptr::read_volatile(p.add(i)) };
        // Decide per cache line: a page with data almost always shows it in its first line,
        // and every further line read is a memory access the send path then repeats.
        if i % 8 == 7 && acc != 0 {
            return false;
        }
    }
    acc == 0
}

#[cfg(test)]
mod reset_tests {
    use super::*;

    #[test]
    fn interrupted_reset_is_recognised_and_other_errors_are_not() {
        let e = io::Error::new(io::ErrorKind::Interrupted, ResetInterrupted);
        assert!(is_reset_interrupted(&e));
        assert!(!is_reset_interrupted(&io::Error::from_raw_os_error(libc::EINTR)));
        assert!(!is_reset_interrupted(&io::Error::other("x")));
    }

    /// The reset runs on the dedicated thread and reports the kernel's error for a bad fd.
    #[test]
    fn reset_goes_through_the_dedicated_thread() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let e = reset_dirty_rings(&f).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTTY), "{e}");
    }
}
