//! io_uring sends from guest RAM and receives into it.
//!
//! One [`UringSender`] or [`UringReceiver`] per socket (per stream). A frame goes out as
//! an ordered chain of operations:
//! - copy mode: one `SENDMSG` with the frame's iovecs;
//! - zero-copy: one `SENDMSG_ZC` with the frame's iovecs, or, with guest RAM registered
//!   as fixed buffers, a `SEND_ZC` for the header and run table linked to one
//!   `SENDMSG_ZC` per memslot group with that slot's buffer index.
//!
//! Short sends and links cancelled behind them are resubmitted from where they stopped.
//! Host bytes (header, run table) always go by a copying `SENDMSG` from one buffer, which is
//! free again once its chain completed; only guest pages are sent zero-copy.
//! [`UringSender::flush`] waits for every outstanding notification, so a caller can treat
//! pages as sent only after it returns.
use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};

use crate::memory::GuestRam;

/// `IORING_SEND_ZC_REPORT_USAGE`: the notification tells whether the kernel copied.
const ZC_REPORT_USAGE: u16 = 8;
/// `IORING_NOTIF_USAGE_ZC_COPIED`, in a notification's `res`.
const NOTIF_COPIED: u32 = 1 << 31;
/// Largest host part of a frame: a header and run table, or a frame of MH blobs (up to
/// `NSLOTS` encrypted pages with their descriptors, which are host bytes, not guest RAM).
pub const HOST_SLOT: usize = (80 << 10) + mh_abi::NSLOTS as usize * (4096 + 64);
const RING_ENTRIES: u32 = 256;
/// `UIO_MAXIOV`: most iovecs one sendmsg takes.
const MAX_IOV: usize = 1024;
/// Longest wait for a timed-out send's operations to complete once the socket is shut down.
const ABANDON_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendMode {
    /// `IORING_OP_SENDMSG`: the kernel copies from guest RAM into socket buffers.
    Copy,
    /// `IORING_OP_SENDMSG_ZC` / `SEND_ZC`: the kernel references guest pages.
    ZeroCopy,
}

/// What the kernel reported about zero-copy sends.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ZcStats {
    /// Zero-copy operations that completed.
    pub sends: u64,
    /// Notifications received.
    pub notifs: u64,
    /// Notifications that said the data went out without a copy.
    pub zerocopy: u64,
    /// Notifications that said the kernel copied after all (loopback, veth).
    pub copied: u64,
}

/// Which io_uring send opcodes this kernel has.
#[derive(Debug, Clone, Copy, Default)]
pub struct UringSupport {
    pub send_zc: bool,
    pub sendmsg_zc: bool,
    pub sendmsg: bool,
    pub recv: bool,
}

/// Probe the kernel's io_uring opcodes.
pub fn probe() -> io::Result<UringSupport> {
    let ring = IoUring::new(8)?;
    let mut p = Probe::new();
    ring.submitter().register_probe(&mut p)?;
    Ok(UringSupport {
        send_zc: p.is_supported(opcode::SendZc::CODE),
        sendmsg_zc: p.is_supported(opcode::SendMsgZc::CODE),
        sendmsg: p.is_supported(opcode::SendMsg::CODE),
        recv: p.is_supported(opcode::Recv::CODE),
    })
}

/// A piece of a frame.
#[derive(Debug, Clone, Copy)]
pub enum Piece<'a> {
    Host(&'a [u8]),
    /// `len` bytes of guest RAM at `gpa`.
    Guest {
        gpa: u64,
        len: u64,
    },
    /// Host memory sent like guest RAM (not staged): with zero-copy the caller keeps it
    /// unchanged until [`UringSender::flush`] returns.
    Bytes(&'a [u8]),
}

struct Segment {
    iov: Vec<libc::iovec>,
    fixed: Option<u16>,
    /// Send with `SEND_ZC` (single buffer) rather than `SENDMSG_ZC`.
    single: bool,
    /// Zero-copy (guest RAM) or a copying `SENDMSG` (host bytes, copy mode).
    zc: bool,
}

impl Segment {
    fn len(&self) -> usize {
        self.iov.iter().map(|v| v.iov_len).sum()
    }
    /// Drop the first `n` bytes (a short send).
    fn advance(&mut self, mut n: usize) {
        while n > 0 && !self.iov.is_empty() {
            if n >= self.iov[0].iov_len {
                n -= self.iov[0].iov_len;
                self.iov.remove(0);
            } else {
                self.iov[0].iov_base = (self.iov[0].iov_base as usize + n) as *mut _;
                self.iov[0].iov_len -= n;
                n = 0;
            }
        }
    }
}

/// Sends frames on one socket through io_uring.
pub struct UringSender {
    // Dropped first: the ring's teardown cancels in-flight requests before the buffers
    // they reference are freed.
    ring: IoUring,
    fd: RawFd,
    mode: SendMode,
    /// Registered guest regions: (gpa, len) at buffer index i.
    fixed: Vec<(u64, u64)>,
    /// Header and run table of the frame being sent.
    host: Box<[u8]>,
    /// Zero-copy ops whose notification is outstanding.
    pending_notif: HashSet<u64>,
    next_id: u64,
    timeout: Duration,
    pub stats: ZcStats,
}

// SAFETY: the raw pointers inside are only iovec bases into guest RAM or the owned host buffer,
// used by the thread that owns the sender.
unsafe impl Send for UringSender {}

impl UringSender {
    /// A sender for `fd`. With `register` and zero-copy mode, guest RAM is registered as
    /// fixed buffers (one per memslot); if the kernel refuses, unregistered buffers are used
    /// and the reason is returned alongside.
    pub fn new(
        fd: RawFd,
        mode: SendMode,
        ram: Option<&GuestRam>,
        register: bool,
        timeout: Duration,
    ) -> io::Result<(Self, Option<String>)> {
        let (mut tx, note) = Self::unbound(mode, ram, register, timeout)?;
        tx.bind(fd);
        Ok((tx, note))
    }

    /// A sender not yet tied to a socket: the ring, and guest RAM registered as fixed
    /// buffers when asked. Registration pins every page of guest RAM, so its cost grows with
    /// RAM; building the sender before connecting keeps that cost off a waiting peer.
    pub fn unbound(
        mode: SendMode,
        ram: Option<&GuestRam>,
        register: bool,
        timeout: Duration,
    ) -> io::Result<(Self, Option<String>)> {
        let ring = IoUring::builder().build(RING_ENTRIES)?;
        let mut fixed = Vec::new();
        let mut note = None;
        if let (SendMode::ZeroCopy, Some(ram), true) = (mode, ram, register) {
            let mut iovs = Vec::new();
            for s in ram.slots() {
                iovs.push(ram.iovec(s.gpa, s.size).map_err(|e| io::Error::other(e.to_string()))?);
                fixed.push((s.gpa, s.size));
            }
            // SAFETY: the iovecs cover guest RAM, which outlives this sender (the engine
            // keeps the VM alive for the whole migration); the kernel pins the pages.
            match unsafe { ring.submitter().register_buffers(&iovs) } {
                Ok(()) => {}
                Err(e) => {
                    note = Some(format!(
                        "registering guest RAM as fixed buffers failed ({e}); using unregistered buffers"
                    ));
                    fixed.clear();
                }
            }
        }
        Ok((
            UringSender {
                ring,
                fd: -1,
                mode,
                fixed,
                host: vec![0u8; HOST_SLOT].into_boxed_slice(),
                pending_notif: HashSet::new(),
                next_id: 1,
                timeout,
                stats: ZcStats::default(),
            },
            note,
        ))
    }

    /// Send on `fd` from now on (until bound, sends fail with `EBADF`).
    pub fn bind(&mut self, fd: RawFd) {
        self.fd = fd;
    }

    pub fn mode(&self) -> SendMode {
        self.mode
    }
    pub fn set_mode(&mut self, mode: SendMode) {
        self.mode = mode;
    }
    pub fn fixed_buffers(&self) -> bool {
        !self.fixed.is_empty()
    }

    fn fixed_index(&self, gpa: u64, len: u64) -> Option<u16> {
        self.fixed.iter().position(|&(g, l)| gpa >= g && gpa + len <= g + l).map(|i| i as u16)
    }

    /// Send one frame; returns the bytes sent. Host pieces must total at most [`HOST_SLOT`].
    pub fn send(&mut self, pieces: &[Piece<'_>], ram: Option<&GuestRam>) -> io::Result<usize> {
        let host_len: usize = pieces.iter().map(|p| if let Piece::Host(b) = p { b.len() } else { 0 }).sum();
        if host_len > HOST_SLOT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{host_len} host bytes exceed {HOST_SLOT}"),
            ));
        }
        // Host pieces are copied into the host buffer in order (segment 0); guest pieces
        // become iovecs into RAM, grouped by fixed-buffer index, at most UIO_MAXIOV per op.
        let mut off = 0;
        let mut seen_guest = false;
        // Segment 0 (header, run table) always goes as a copying SENDMSG: the kernel copies
        // it during the call, so the buffer is free once the chain completed. Zero-copy host
        // bytes on loopback are copied later, when the receiving socket takes them, and a
        // reused buffer then rewrote an earlier frame's header on the wire.
        let mut segs: Vec<Segment> = vec![Segment { iov: Vec::new(), fixed: None, single: false, zc: false }];
        for p in pieces {
            match *p {
                Piece::Host(b) => {
                    if seen_guest {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidInput,
                            "host bytes after guest bytes in a frame",
                        ));
                    }
                    self.host[off..off + b.len()].copy_from_slice(b);
                    let base = self.host[off..].as_mut_ptr();
                    segs[0].iov.push(libc::iovec { iov_base: base.cast(), iov_len: b.len() });
                    off += b.len();
                }
                Piece::Guest { .. } | Piece::Bytes(_) => {
                    seen_guest = true;
                    let (v, fx) = match *p {
                        Piece::Guest { gpa, len } => {
                            let ram = ram.ok_or_else(|| {
                                io::Error::new(io::ErrorKind::InvalidInput, "guest piece without RAM")
                            })?;
                            let v = ram
                                .iovec(gpa, len)
                                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
                            (v, if self.mode == SendMode::ZeroCopy { self.fixed_index(gpa, len) } else { None })
                        }
                        Piece::Bytes(b) => (libc::iovec { iov_base: b.as_ptr() as *mut _, iov_len: b.len() }, None),
                        Piece::Host(_) => unreachable!("matched above"),
                    };
                    let n = segs.len();
                    let last = segs.last_mut().expect("segment 0 exists");
                    if self.mode == SendMode::Copy && last.iov.len() < MAX_IOV {
                        // Copy mode: one SENDMSG for the whole frame.
                        last.iov.push(v);
                    } else if fx.is_some() {
                        // Fixed-buffer data: one SEND_ZC per contiguous run.
                        segs.push(Segment { iov: vec![v], fixed: fx, single: true, zc: true });
                    } else if n > 1 && last.zc && last.fixed.is_none() && last.iov.len() < MAX_IOV {
                        last.iov.push(v);
                    } else {
                        segs.push(Segment {
                            iov: vec![v],
                            fixed: None,
                            single: false,
                            zc: self.mode == SendMode::ZeroCopy,
                        });
                    }
                }
            }
        }
        if segs[0].iov.is_empty() {
            segs.remove(0);
        }
        let total: usize = segs.iter().map(Segment::len).sum();
        self.run_chain(&mut segs).map(|()| total)
    }

    /// Submit `segs` as a linked chain, resubmitting after short sends.
    fn run_chain(&mut self, segs: &mut [Segment]) -> io::Result<()> {
        let mut i = 0;
        let deadline = Instant::now() + self.timeout;
        let mut msgs: Vec<Box<libc::msghdr>> = Vec::new();
        while i < segs.len() {
            let mut ids = Vec::new();
            msgs.clear();
            for (k, seg) in segs.iter().enumerate().skip(i) {
                let id = self.next_id;
                self.next_id += 1;
                ids.push(id);
                // SAFETY: msghdr is plain data; zeroed is a valid empty header.
                let mut m: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
                m.msg_iov = seg.iov.as_ptr() as *mut _;
                m.msg_iovlen = seg.iov.len();
                let zc_flags = ZC_REPORT_USAGE;
                let sqe = match (seg.zc, seg.single) {
                    (false, _) => opcode::SendMsg::new(types::Fd(self.fd), &*m).flags(libc::MSG_WAITALL as u32).build(),
                    (true, true) => opcode::SendZc::new(
                        types::Fd(self.fd),
                        seg.iov[0].iov_base as *const u8,
                        seg.iov[0].iov_len as u32,
                    )
                    .flags(libc::MSG_WAITALL)
                    .zc_flags(zc_flags)
                    .buf_index(seg.fixed)
                    .build(),
                    (true, false) => {
                        let mut op = opcode::SendMsgZc::new(types::Fd(self.fd), &*m)
                            .flags(libc::MSG_WAITALL as u32)
                            .ioprio(zc_flags);
                        if let Some(ix) = seg.fixed {
                            op = op.buf_index(Some(ix));
                        }
                        op.build()
                    }
                };
                let sqe = if k + 1 < segs.len() { sqe.flags(squeue::Flags::IO_LINK) } else { sqe };
                msgs.push(m);
                // SAFETY: every buffer the entry references (iovecs, msghdr in `msgs`, the host
                // buffer, guest RAM) stays alive until its completion is reaped below; guest
                // RAM, which zero-copy ops keep using, outlives the sender.
                unsafe {
                    while self.ring.submission().push(&sqe.clone().user_data(id)).is_err() {
                        self.ring.submit()?;
                    }
                }
            }
            self.ring.submit()?;
            // Collect the first completion of each op in this chain.
            let mut results: HashMap<u64, i32> = HashMap::new();
            while ids.iter().any(|id| !results.contains_key(id)) {
                self.reap(&mut results);
                if ids.iter().all(|id| results.contains_key(id)) {
                    break;
                }
                match self.wait(1, deadline) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                        self.abandon(&ids, &mut results)?;
                        if Self::chain_done(&ids, &results, &segs[i..]) {
                            // The whole frame reached the kernel before the shutdown: it
                            // was sent, whatever happens to the connection next.
                            break;
                        }
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "io_uring send timed out after {:?}; the connection was shut down before the rest of the frame reached the kernel",
                                self.timeout
                            ),
                        ));
                    }
                    Err(e) => return Err(e),
                }
            }
            let mut restart = None;
            for (n, id) in ids.iter().enumerate() {
                let res = results[id];
                let seg_ix = i + n;
                if restart.is_some() {
                    continue;
                }
                if res == -libc::ECANCELED {
                    restart = Some(seg_ix);
                    continue;
                }
                if res < 0 {
                    // Outstanding notifications still reference buffers; they are reaped by
                    // flush or freed with the ring.
                    return Err(io::Error::from_raw_os_error(-res));
                }
                let want = segs[seg_ix].len();
                if (res as usize) < want {
                    segs[seg_ix].advance(res as usize);
                    restart = Some(seg_ix);
                }
            }
            match restart {
                Some(r) => i = r,
                None => break,
            }
        }
        Ok(())
    }

    /// A send timed out: make sure its operations can no longer deliver anything later.
    /// Shutting the socket down for writing fails every queued send (`EPIPE`) at once, and
    /// a send the kernel finishes afterwards cannot exist; the completions then say how much
    /// of the frame the kernel really took (a partial frame is never accepted by a peer: it
    /// ends before its length, or fails its tag). Without this, a send counted as not sent
    /// stayed queued and could reach the peer after the caller had decided it did not.
    fn abandon(&mut self, ids: &[u64], results: &mut HashMap<u64, i32>) -> io::Result<()> {
        crate::sys::shutdown_write(self.fd)?;
        // After the shutdown the kernel completes every queued send promptly; this bound
        // only guards against a kernel that does not.
        let deadline = Instant::now() + ABANDON_WAIT;
        while ids.iter().any(|id| !results.contains_key(id)) {
            self.reap(results);
            if ids.iter().all(|id| results.contains_key(id)) {
                break;
            }
            self.wait(1, deadline).map_err(|_| {
                io::Error::other(format!(
                    "io_uring send timed out and its operations did not complete within {ABANDON_WAIT:?} of shutting the socket down: the frame may still be sent"
                ))
            })?;
        }
        Ok(())
    }

    /// Whether every operation of a chain completed with all its bytes.
    fn chain_done(ids: &[u64], results: &HashMap<u64, i32>, segs: &[Segment]) -> bool {
        ids.iter().zip(segs).all(|(id, seg)| results.get(id).is_some_and(|&r| r >= 0 && r as usize >= seg.len()))
    }

    /// Drain completions: first completions go into `results`; notifications settle the
    /// outstanding set and update the counters.
    fn reap(&mut self, results: &mut HashMap<u64, i32>) {
        let mut cq = self.ring.completion();
        cq.sync();
        for cqe in &mut cq {
            let id = cqe.user_data();
            if cqueue::notif(cqe.flags()) {
                self.stats.notifs += 1;
                if cqe.result() as u32 & NOTIF_COPIED != 0 {
                    self.stats.copied += 1;
                } else {
                    self.stats.zerocopy += 1;
                }
                self.pending_notif.remove(&id);
            } else {
                if cqueue::more(cqe.flags()) {
                    // A notification follows (in CQ order, after this one).
                    self.stats.sends += 1;
                    self.pending_notif.insert(id);
                }
                results.insert(id, cqe.result());
            }
        }
    }

    fn wait(&mut self, want: usize, deadline: Instant) -> io::Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "io_uring send timed out"));
        }
        let ts = types::Timespec::new().sec(left.as_secs()).nsec(left.subsec_nanos());
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(want, &args) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ETIME) || e.raw_os_error() == Some(libc::EINTR) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Wait until the kernel released every zero-copy buffer (all notifications arrived):
    /// only then are the frames' pages "sent".
    pub fn flush(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + self.timeout;
        while !self.pending_notif.is_empty() {
            self.reap(&mut HashMap::new());
            if self.pending_notif.is_empty() {
                break;
            }
            self.wait(1, deadline)?;
            if Instant::now() > deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "zero-copy notifications did not arrive"));
            }
        }
        Ok(())
    }

    /// Zero-copy notifications still outstanding.
    pub fn outstanding(&self) -> usize {
        self.pending_notif.len()
    }
}

/// Receives on one socket through io_uring, straight into guest RAM when asked.
pub struct UringReceiver {
    ring: IoUring,
    fd: RawFd,
    timeout: Duration,
}

// SAFETY: only the owning thread submits; the ring holds no borrowed memory between calls.
unsafe impl Send for UringReceiver {}

impl UringReceiver {
    pub fn new(fd: RawFd, timeout: Duration) -> io::Result<Self> {
        Ok(UringReceiver { ring: IoUring::new(8)?, fd, timeout })
    }

    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    /// Fill `buf` completely (`UnexpectedEof` if the peer closes first).
    pub fn recv_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        // SAFETY: `buf` is a live, exclusively borrowed buffer for the whole call.
        unsafe { self.recv_raw(buf.as_mut_ptr(), buf.len()) }
    }

    /// Receive `len` bytes into guest RAM at `gpa`; the range is checked before the first
    /// receive is submitted.
    pub fn recv_into_guest(&mut self, ram: &GuestRam, gpa: u64, len: u64) -> io::Result<()> {
        let v = ram.iovec(gpa, len).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        // SAFETY: `v` lies inside the guest RAM mapping (checked by `iovec`), which `ram`
        // keeps mapped for the whole call; the guest of a destination VM is not running.
        unsafe { self.recv_raw(v.iov_base.cast(), v.iov_len) }
    }

    /// # Safety
    /// `ptr..ptr+len` must be valid for writes for the duration of the call.
    unsafe fn recv_raw(&mut self, ptr: *mut u8, len: usize) -> io::Result<()> {
        let deadline = Instant::now() + self.timeout;
        let mut done = 0usize;
        while done < len {
            let chunk = (len - done).min(1 << 30) as u32;
            // SAFETY: per the function contract, ptr+done..ptr+done+chunk is writable.
            let sqe = opcode::Recv::new(types::Fd(self.fd), unsafe { ptr.add(done) }, chunk)
                .flags(libc::MSG_WAITALL)
                .build()
                .user_data(1);
            // SAFETY: the buffer outlives the operation: we wait for its completion below
            // (or cancel it and wait for the cancellation) before returning.
            unsafe {
                self.ring.submission().push(&sqe).map_err(|_| io::Error::other("io_uring submission queue full"))?;
            }
            let res = loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    self.cancel_and_drain();
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "io_uring receive timed out"));
                }
                let ts = types::Timespec::new().sec(left.as_secs()).nsec(left.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&ts);
                match self.ring.submitter().submit_with_args(1, &args) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ETIME) || e.raw_os_error() == Some(libc::EINTR) => {}
                    Err(e) => return Err(e),
                }
                if let Some(c) = self.ring.completion().next() {
                    break c.result();
                }
            };
            if res < 0 {
                return Err(io::Error::from_raw_os_error(-res));
            }
            if res == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed the connection"));
            }
            done += res as usize;
        }
        Ok(())
    }

    fn cancel_and_drain(&mut self) {
        let sqe = opcode::AsyncCancel::new(1).build().user_data(2);
        // SAFETY: a cancel entry references no memory.
        if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
            let _ = self.ring.submit_and_wait(2);
        }
        self.ring.completion().for_each(drop);
    }
}
