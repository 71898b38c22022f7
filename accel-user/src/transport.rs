//! Transports move frames. The engine sees only the [`Transport`] trait; v1 is blocking TCP
//! with `writev` straight from the guest RAM mapping and `readv` straight into it.
use std::io::{self, Read};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::time::Duration;

use kvm_hooks::memory::GuestRam;

use crate::protocol::{FrameKind, Header, ProtocolError, HEADER_LEN};

/// A piece of a frame's payload.
#[derive(Debug, Clone, Copy)]
pub enum Part<'a> {
    /// Host memory.
    Buf(&'a [u8]),
    /// Guest RAM, sent straight from the mapping.
    Guest { gpa: u64, len: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("peer closed the connection")]
    Closed,
    #[error("timed out after {0:?} waiting for the peer")]
    Timeout(Duration),
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("bad frame from peer: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("guest RAM: {0}")]
    Guest(String),
    /// A send on this connection failed or timed out earlier. The connection was shut
    /// down for writing then, and nothing is ever sent on it again: a frame sealed for a
    /// failed send must not be followed by another under the same nonce, and a frame
    /// counted as not sent must not arrive later.
    #[error("not sent: an earlier send on this connection failed ({0}); nothing more is sent on it")]
    Broken(String),
    /// The operator cancelled while this waited for a connection.
    #[error("cancelled ({0})")]
    Cancelled(String),
}

impl TransportError {
    fn io(op: &'static str, e: io::Error, timeout: Duration) -> Self {
        match e.kind() {
            io::ErrorKind::UnexpectedEof => TransportError::Closed,
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => TransportError::Timeout(timeout),
            _ => TransportError::Io { op, source: e },
        }
    }
}

/// The sending side of a connection once a send failed: nothing is sent on it again. Holds
/// why, and the sequence number of the first frame that does not count as sent; the first
/// failure is kept.
#[derive(Debug, Default)]
pub(crate) struct SendFence(Option<(String, u64)>);

impl SendFence {
    /// `Broken` once closed.
    pub(crate) fn check(&self) -> Result<(), TransportError> {
        match &self.0 {
            Some((why, _)) => Err(TransportError::Broken(why.clone())),
            None => Ok(()),
        }
    }

    /// Close for good: frames from `unsent` on do not count as sent (a later call keeps
    /// the first failure).
    pub(crate) fn close(&mut self, why: impl std::fmt::Display, unsent: u64) {
        self.0.get_or_insert_with(|| (why.to_string(), unsent));
    }

    /// See [`Transport::unsent`].
    pub(crate) fn unsent(&self) -> Option<(u64, String)> {
        self.0.as_ref().map(|(why, seq)| (*seq, why.clone()))
    }
}

/// Why a connection closed by `shutdown_write` sends no more.
pub(crate) const SHUT_FOR_SENDING: &str = "the connection was shut down for sending";

/// The payload length of a frame made of `parts`.
pub(crate) fn payload_len(parts: &[Part<'_>]) -> Result<u32, TransportError> {
    let len: u64 = parts
        .iter()
        .map(|p| match p {
            Part::Buf(b) => b.len() as u64,
            Part::Guest { len, .. } => *len,
        })
        .sum();
    u32::try_from(len).map_err(|_| TransportError::Guest(format!("frame of {len} bytes")))
}

/// The header for a frame of `parts`.
fn frame_header(kind: FrameKind, parts: &[Part<'_>], seq: u64) -> Result<[u8; HEADER_LEN], TransportError> {
    Ok(Header { kind, len: payload_len(parts)?, seq }.encode())
}

/// Where a frame built elsewhere (a sealed one) and sent in pieces has got to: its first
/// piece brings the header, and it counts as sent once its last piece is out.
#[derive(Debug, Default)]
struct RawFrame {
    /// The first pieces went out, the last has not.
    open: bool,
}

impl RawFrame {
    /// Check a piece before it is sent: the header comes with the first piece only and
    /// continues this stream's sequence (`send_seq`).
    fn check(&self, hdr: Option<&[u8; HEADER_LEN]>, send_seq: u64) -> Result<(), TransportError> {
        match (hdr, self.open) {
            (Some(hdr), false) => {
                let h = Header::decode(hdr)?;
                if h.seq != send_seq {
                    return Err(TransportError::Guest(format!(
                        "raw frame with sequence {}, expected {send_seq}",
                        h.seq
                    )));
                }
                Ok(())
            }
            (None, true) => Ok(()),
            (Some(_), true) => Err(TransportError::Guest(format!("a header inside raw frame {send_seq}"))),
            (None, false) => Err(TransportError::Guest("a raw frame's piece without its header".into())),
        }
    }

    /// A piece went out: after the `last` one the frame is sent and the sequence advances.
    fn sent(&mut self, last: bool, send_seq: &mut u64) {
        self.open = !last;
        *send_seq += u64::from(last);
    }
}

/// Decode a received header and check it continues this stream's sequence (`recv_seq`,
/// advanced on success). Every transport's `recv_header` ends here.
pub fn check_header(b: &[u8; HEADER_LEN], recv_seq: &mut u64) -> Result<Header, TransportError> {
    let h = Header::decode(b)?;
    if h.seq != *recv_seq {
        return Err(ProtocolError::Sequence { got: h.seq, want: *recv_seq }.into());
    }
    *recv_seq += 1;
    Ok(h)
}

/// A bidirectional frame stream.
pub trait Transport: Send {
    /// Send one frame made of `parts`; guest parts are read from `ram` without staging.
    fn send_frame(&mut self, kind: FrameKind, parts: &[Part<'_>], ram: Option<&GuestRam>)
        -> Result<(), TransportError>;
    /// Send a piece of a frame built elsewhere (a sealed one). The first piece brings the
    /// header, which must carry [`Transport::send_seq`]; the frame counts as sent once its
    /// `last` piece is out. `body` may be reused once this returns.
    fn send_raw(&mut self, hdr: Option<&[u8; HEADER_LEN]>, body: &[u8], last: bool) -> Result<(), TransportError>;
    /// Sequence number of the next frame sent.
    fn send_seq(&self) -> u64;
    /// After a send failed: the sequence number of the first frame that does not count as
    /// sent (that frame and every later one never reach the peer whole), and why. A frame
    /// whose bytes all reached the kernel counts as sent, even if the connection failed
    /// afterwards.
    fn unsent(&self) -> Option<(u64, String)> {
        None
    }
    /// Receive and validate the next frame header (magic, version, caps, sequence).
    fn recv_header(&mut self) -> Result<Header, TransportError>;
    /// Receive exactly `buf.len()` payload bytes.
    fn recv_exact(&mut self, buf: &mut [u8]) -> Result<(), TransportError>;
    /// Receive `len` payload bytes straight into guest RAM at `gpa` (bounds-checked first).
    fn recv_into_guest(&mut self, ram: &GuestRam, gpa: u64, len: u64) -> Result<(), TransportError>;
    /// Change how long a receive may wait.
    fn set_recv_timeout(&mut self, t: Duration);
    /// Tear the connection down (both directions).
    fn shutdown(&mut self);
    /// Stop sending for good (the peer sees the end of the stream after what was queued);
    /// receiving goes on, so the peer's `Abort` can still be read.
    fn shutdown_write(&mut self);
    /// Bytes sent so far (headers included).
    fn bytes_sent(&self) -> u64;
    /// Wait until everything sent so far no longer references guest RAM or send buffers
    /// (zero-copy notifications). Pages count as sent only after this.
    fn flush(&mut self) -> Result<(), TransportError> {
        Ok(())
    }
    /// Zero-copy counters, for transports that have them.
    fn zc_stats(&self) -> Option<kvm_hooks::uring::ZcStats> {
        None
    }
    /// Short name of the transport and mode, for reports.
    fn describe(&self) -> String {
        "blocking".into()
    }
    /// A handle another thread can use to shut the connection down (to unblock a reader).
    fn shutdown_handle(&self) -> Option<TcpStream> {
        None
    }
    /// Wait at most `timeout` for the next frame to start arriving (or the peer to close).
    /// `false`: nothing yet. Lets a receiver judge the peer's silence across all of its
    /// streams instead of each stream's alone.
    fn wait_readable(&self, timeout: Duration) -> Result<bool, TransportError> {
        let _ = timeout;
        Ok(true)
    }
}

/// [`Transport::wait_readable`] for a transport over `stream`.
fn stream_readable(stream: &TcpStream, timeout: Duration) -> Result<bool, TransportError> {
    kvm_hooks::wait_readable(stream.as_fd(), timeout).map_err(|source| TransportError::Io { op: "poll", source })
}

/// Blocking TCP transport (v1).
#[derive(Debug)]
pub struct TcpTransport {
    stream: TcpStream,
    send_seq: u64,
    recv_seq: u64,
    timeout: Duration,
    sent: u64,
    /// How long a send may make no progress (receives have their own, changeable limit).
    send_timeout: Duration,
    /// A send failed: the write side is shut and stays unused.
    fence: SendFence,
    raw: RawFrame,
}

impl TcpTransport {
    pub fn new(stream: TcpStream, timeout: Duration) -> io::Result<Self> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(TcpTransport {
            stream,
            send_seq: 0,
            recv_seq: 0,
            timeout,
            sent: 0,
            send_timeout: timeout,
            fence: SendFence::default(),
            raw: RawFrame::default(),
        })
    }

    /// The socket, to look at what waits in it.
    pub fn socket(&self) -> &TcpStream {
        &self.stream
    }

    /// The socket back, with the sequence numbers the connection reached (sent,
    /// received), for a transport that continues it ([`Prepared::bind_after`]).
    pub fn into_parts(self) -> (TcpStream, u64, u64) {
        (self.stream, self.send_seq, self.recv_seq)
    }

    /// Write every byte `iov` points at, resuming after short writes. On failure the
    /// write side is shut down: bytes already queued go out as a frame cut short, which
    /// no peer accepts, and nothing else follows.
    fn write_all(&mut self, iov: &mut [libc::iovec]) -> Result<(), TransportError> {
        self.fence.check()?;
        let r = self.write_iov(iov);
        if let Err(e) = &r {
            self.fence.close(e, self.send_seq);
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        r
    }

    fn write_iov(&mut self, iov: &mut [libc::iovec]) -> Result<(), TransportError> {
        let mut idx = 0;
        while idx < iov.len() {
            let n = match kvm_hooks::writev_raw(self.stream.as_fd(), &iov[idx..]) {
                Ok(0) => return Err(TransportError::Closed),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(TransportError::io("send", e, self.send_timeout)),
            };
            self.sent += n as u64;
            let mut n = n;
            while n > 0 && idx < iov.len() {
                if n >= iov[idx].iov_len {
                    n -= iov[idx].iov_len;
                    idx += 1;
                } else {
                    // Short write: resume inside this iovec.
                    // Pointer arithmetic only; the kernel reads the memory later.
                    iov[idx].iov_base = (iov[idx].iov_base as usize + n) as *mut _;
                    iov[idx].iov_len -= n;
                    n = 0;
                }
            }
        }
        Ok(())
    }
}

impl Transport for TcpTransport {
    fn send_frame(
        &mut self,
        kind: FrameKind,
        parts: &[Part<'_>],
        ram: Option<&GuestRam>,
    ) -> Result<(), TransportError> {
        let hdr = frame_header(kind, parts, self.send_seq)?;
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(parts.len() + 1);
        iov.push(libc::iovec { iov_base: hdr.as_ptr() as *mut _, iov_len: HEADER_LEN });
        for p in parts {
            match *p {
                Part::Buf(b) if !b.is_empty() => {
                    iov.push(libc::iovec { iov_base: b.as_ptr() as *mut _, iov_len: b.len() })
                }
                Part::Buf(_) => {}
                Part::Guest { gpa, len } => {
                    let ram = ram.ok_or_else(|| TransportError::Guest("guest part without guest RAM".into()))?;
                    iov.push(ram.iovec(gpa, len).map_err(|e| TransportError::Guest(e.to_string()))?);
                }
            }
        }
        self.write_all(&mut iov)?;
        self.send_seq += 1;
        Ok(())
    }

    fn send_raw(&mut self, hdr: Option<&[u8; HEADER_LEN]>, body: &[u8], last: bool) -> Result<(), TransportError> {
        self.raw.check(hdr, self.send_seq)?;
        let mut iov = Vec::with_capacity(2);
        if let Some(hdr) = hdr {
            iov.push(libc::iovec { iov_base: hdr.as_ptr() as *mut _, iov_len: HEADER_LEN });
        }
        iov.push(libc::iovec { iov_base: body.as_ptr() as *mut _, iov_len: body.len() });
        self.write_all(&mut iov)?;
        self.raw.sent(last, &mut self.send_seq);
        Ok(())
    }

    fn send_seq(&self) -> u64 {
        self.send_seq
    }

    fn unsent(&self) -> Option<(u64, String)> {
        self.fence.unsent()
    }

    fn recv_header(&mut self) -> Result<Header, TransportError> {
        let mut b = [0u8; HEADER_LEN];
        self.recv_exact(&mut b)?;
        check_header(&b, &mut self.recv_seq)
    }

    fn recv_exact(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        self.stream.read_exact(buf).map_err(|e| TransportError::io("receive", e, self.timeout))
    }

    fn recv_into_guest(&mut self, ram: &GuestRam, gpa: u64, len: u64) -> Result<(), TransportError> {
        // Check the whole target range before the first byte is read.
        ram.iovec(gpa, len).map_err(|e| TransportError::Guest(e.to_string()))?;
        let mut done = 0u64;
        while done < len {
            match kvm_hooks::read_into_guest(self.stream.as_fd(), ram, gpa + done, len - done, false) {
                Ok(0) => return Err(TransportError::Closed),
                Ok(n) => done += n as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(TransportError::io("receive pages", e, self.timeout)),
            }
        }
        Ok(())
    }

    fn set_recv_timeout(&mut self, t: Duration) {
        self.timeout = t;
        let _ = self.stream.set_read_timeout(Some(t));
    }

    fn shutdown(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    fn shutdown_write(&mut self) {
        self.fence.close(SHUT_FOR_SENDING, self.send_seq);
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }

    fn bytes_sent(&self) -> u64 {
        self.sent
    }

    fn shutdown_handle(&self) -> Option<TcpStream> {
        self.stream.try_clone().ok()
    }

    fn wait_readable(&self, timeout: Duration) -> Result<bool, TransportError> {
        stream_readable(&self.stream, timeout)
    }
}

/// How pages are sent (`[migration] transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TransportMode {
    /// Plain blocking `writev`/`readv` (the baseline).
    Blocking,
    /// io_uring `SENDMSG` (the kernel copies), io_uring `RECV`.
    Copy,
    /// io_uring `SENDMSG_ZC`/`SEND_ZC`, guest RAM as fixed buffers where allowed.
    Zerocopy,
    /// Zero-copy while the kernel really avoids the copy; io_uring copy mode once the first
    /// notifications all report "copied" (loopback, veth).
    Auto,
}

/// Notifications after which `auto` decides.
const AUTO_DECIDE_AFTER: u64 = 16;

/// io_uring transport over one TCP connection.
pub struct UringTransport {
    stream: TcpStream,
    tx: kvm_hooks::uring::UringSender,
    rx: kvm_hooks::uring::UringReceiver,
    mode: TransportMode,
    decided: bool,
    send_seq: u64,
    recv_seq: u64,
    timeout: Duration,
    sent: u64,
    /// How long a send may make no progress (receives have their own, changeable limit).
    send_timeout: Duration,
    /// A send failed or timed out: the sender shut the write side (see `UringSender`'s
    /// timeout handling) and nothing more is sent.
    fence: SendFence,
    raw: RawFrame,
}

impl UringTransport {
    /// The sending ring for `mode`, not yet tied to a socket (see [`prepare`]).
    fn sender(
        mode: TransportMode,
        ram: Option<&GuestRam>,
        fixed: bool,
        timeout: Duration,
    ) -> Result<kvm_hooks::uring::UringSender, TransportError> {
        use kvm_hooks::uring::SendMode;
        let io = |op: &'static str| move |source| TransportError::Io { op, source };
        let mut send_mode = match mode {
            TransportMode::Zerocopy | TransportMode::Auto => SendMode::ZeroCopy,
            _ => SendMode::Copy,
        };
        if send_mode == SendMode::ZeroCopy {
            let sup = kvm_hooks::uring::probe().map_err(io("probe io_uring"))?;
            if !(sup.send_zc && sup.sendmsg_zc) {
                tracing::warn!("kernel lacks IORING_OP_SEND_ZC/SENDMSG_ZC: using io_uring copy sends");
                send_mode = SendMode::Copy;
            }
        }
        let (tx, note) =
            kvm_hooks::uring::UringSender::unbound(send_mode, ram, fixed, timeout).map_err(io("create io_uring"))?;
        if let Some(n) = note {
            tracing::warn!("{n}");
        }
        Ok(tx)
    }

    fn bind(
        stream: TcpStream,
        mode: TransportMode,
        mut tx: kvm_hooks::uring::UringSender,
        timeout: Duration,
    ) -> Result<Self, TransportError> {
        use std::os::fd::AsRawFd;
        let io = |op: &'static str| move |source| TransportError::Io { op, source };
        stream.set_nodelay(true).map_err(io("configure socket"))?;
        let fd = stream.as_raw_fd();
        tx.bind(fd);
        let rx = kvm_hooks::uring::UringReceiver::new(fd, timeout).map_err(io("create io_uring"))?;
        Ok(UringTransport {
            stream,
            tx,
            rx,
            mode,
            decided: mode != TransportMode::Auto,
            send_seq: 0,
            recv_seq: 0,
            timeout,
            sent: 0,
            send_timeout: timeout,
            fence: SendFence::default(),
            raw: RawFrame::default(),
        })
    }

    /// Send one frame's pieces; any failure leaves the connection broken for sending.
    fn send_pieces(
        &mut self,
        pieces: &[kvm_hooks::uring::Piece<'_>],
        ram: Option<&GuestRam>,
    ) -> Result<usize, TransportError> {
        self.fence.check()?;
        match self.tx.send(pieces, ram) {
            Ok(n) => Ok(n),
            Err(e) => {
                let e = TransportError::io("io_uring send", e, self.send_timeout);
                self.break_off(&e, self.send_seq);
                Err(e)
            }
        }
    }

    /// Nothing is sent on this connection again; frames from `unsent` on do not count as
    /// sent. The sender already shut the socket after a timeout; any other failure shuts it
    /// here, so a later send cannot slip out either.
    fn break_off(&mut self, why: &TransportError, unsent: u64) {
        self.fence.close(why, unsent);
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }

    /// A frame reached the kernel whole (it counts as sent), but what followed its send
    /// failed (waiting for zero-copy notifications): the frame stays sent, the connection
    /// sends nothing more.
    fn after_send(&mut self, r: Result<(), TransportError>) -> Result<(), TransportError> {
        if let Err(e) = r {
            tracing::warn!("{e} after frame {} was sent: the connection sends nothing more", self.send_seq - 1);
            let seq = self.send_seq;
            self.break_off(&e, seq);
        }
        Ok(())
    }

    fn map(&self, op: &'static str, e: io::Error) -> TransportError {
        TransportError::io(op, e, self.timeout)
    }

    /// `auto`: once enough notifications came back, keep zero-copy only if the kernel
    /// really avoided the copy.
    fn decide(&mut self) -> Result<(), TransportError> {
        if !self.decided && self.tx.stats.notifs >= AUTO_DECIDE_AFTER {
            self.decided = true;
            let st = self.tx.stats;
            if st.zerocopy == 0 {
                tracing::info!(
                    copied = st.copied,
                    "auto: the kernel copied every zero-copy send (loopback/veth): switching to io_uring copy sends"
                );
                self.tx.flush().map_err(|e| TransportError::io("io_uring flush", e, self.send_timeout))?;
                self.tx.set_mode(kvm_hooks::uring::SendMode::Copy);
            } else {
                tracing::info!(
                    zerocopy = st.zerocopy,
                    copied = st.copied,
                    "auto: zero-copy works on this path: keeping it"
                );
            }
        }
        Ok(())
    }
}

impl Transport for UringTransport {
    fn send_frame(
        &mut self,
        kind: FrameKind,
        parts: &[Part<'_>],
        ram: Option<&GuestRam>,
    ) -> Result<(), TransportError> {
        use kvm_hooks::uring::Piece;
        let hdr = frame_header(kind, parts, self.send_seq)?;
        let mut pieces = Vec::with_capacity(parts.len() + 1);
        pieces.push(Piece::Host(&hdr));
        let mut seen_guest = false;
        for p in parts {
            match *p {
                Part::Buf(b) if seen_guest => {
                    return Err(TransportError::Guest(format!(
                        "{kind:?}: host bytes after guest bytes ({} bytes)",
                        b.len()
                    )))
                }
                Part::Buf(b) => pieces.push(Piece::Host(b)),
                Part::Guest { gpa, len } => {
                    seen_guest = true;
                    pieces.push(Piece::Guest { gpa, len });
                }
            }
        }
        let n = self.send_pieces(&pieces, ram)?;
        self.sent += n as u64;
        self.send_seq += 1;
        let r = self.decide();
        self.after_send(r)
    }

    fn send_raw(&mut self, hdr: Option<&[u8; HEADER_LEN]>, body: &[u8], last: bool) -> Result<(), TransportError> {
        use kvm_hooks::uring::Piece;
        self.raw.check(hdr, self.send_seq)?;
        let n = match hdr {
            Some(hdr) => self.send_pieces(&[Piece::Host(hdr), Piece::Bytes(body)], None)?,
            None => self.send_pieces(&[Piece::Bytes(body)], None)?,
        };
        self.sent += n as u64;
        self.raw.sent(last, &mut self.send_seq);
        // A zero-copy send still reads `body` after it returns: the caller reuses it next.
        // If the notifications do not come, the frame is in the kernel all the same.
        let mut r = Ok(());
        if self.tx.mode() == kvm_hooks::uring::SendMode::ZeroCopy {
            r = self
                .tx
                .flush()
                .map_err(|e| TransportError::io("waiting for zero-copy completions", e, self.send_timeout));
        }
        let r = r.and_then(|()| self.decide());
        if last {
            return self.after_send(r);
        }
        // A frame cut short does not count as sent.
        r.inspect_err(|e| self.break_off(e, self.send_seq))
    }

    fn send_seq(&self) -> u64 {
        self.send_seq
    }

    fn unsent(&self) -> Option<(u64, String)> {
        self.fence.unsent()
    }

    fn recv_header(&mut self) -> Result<Header, TransportError> {
        let mut b = [0u8; HEADER_LEN];
        self.recv_exact(&mut b)?;
        check_header(&b, &mut self.recv_seq)
    }

    fn recv_exact(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        self.rx.recv_exact(buf).map_err(|e| self.map("io_uring receive", e))
    }

    fn recv_into_guest(&mut self, ram: &GuestRam, gpa: u64, len: u64) -> Result<(), TransportError> {
        ram.iovec(gpa, len).map_err(|e| TransportError::Guest(e.to_string()))?;
        self.rx.recv_into_guest(ram, gpa, len).map_err(|e| self.map("io_uring receive pages", e))
    }

    fn set_recv_timeout(&mut self, t: Duration) {
        self.timeout = t;
        self.rx.set_timeout(t);
    }

    fn shutdown(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    fn shutdown_write(&mut self) {
        self.fence.close(SHUT_FOR_SENDING, self.send_seq);
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }

    fn bytes_sent(&self) -> u64 {
        self.sent
    }

    fn flush(&mut self) -> Result<(), TransportError> {
        self.tx.flush().map_err(|e| TransportError::io("waiting for zero-copy completions", e, self.send_timeout))
    }

    fn zc_stats(&self) -> Option<kvm_hooks::uring::ZcStats> {
        (self.mode != TransportMode::Copy).then_some(self.tx.stats)
    }

    fn shutdown_handle(&self) -> Option<TcpStream> {
        self.stream.try_clone().ok()
    }

    fn wait_readable(&self, timeout: Duration) -> Result<bool, TransportError> {
        stream_readable(&self.stream, timeout)
    }

    fn describe(&self) -> String {
        let m = match self.tx.mode() {
            kvm_hooks::uring::SendMode::Copy => "io_uring copy",
            kvm_hooks::uring::SendMode::ZeroCopy if self.tx.fixed_buffers() => "io_uring zero-copy, fixed buffers",
            kvm_hooks::uring::SendMode::ZeroCopy => "io_uring zero-copy",
        };
        format!("{m} ({:?} requested)", self.mode).to_lowercase()
    }
}

/// Wrap a connected stream in the transport `mode` asks for.
pub fn wrap(
    stream: TcpStream,
    mode: TransportMode,
    ram: Option<&GuestRam>,
    fixed: bool,
    timeout: Duration,
) -> Result<Box<dyn Transport>, TransportError> {
    prepare(mode, ram, fixed, timeout)?.bind(stream)
}

/// A sending transport with everything done that does not need the peer. For io_uring
/// zero-copy with fixed buffers that includes registering guest RAM, which pins every page
/// and so takes time proportional to RAM: a source prepares its transports before it
/// connects, so that no peer waits while it runs.
pub struct Prepared {
    mode: TransportMode,
    uring: Option<kvm_hooks::uring::UringSender>,
    timeout: Duration,
}

/// Prepare a sending transport of `mode` (see [`Prepared`]).
pub fn prepare(
    mode: TransportMode,
    ram: Option<&GuestRam>,
    fixed: bool,
    timeout: Duration,
) -> Result<Prepared, TransportError> {
    let uring = match mode {
        TransportMode::Blocking => None,
        m => Some(UringTransport::sender(m, ram, fixed, timeout)?),
    };
    Ok(Prepared { mode, uring, timeout })
}

impl Prepared {
    /// The transport over the connected `stream`.
    pub fn bind(self, stream: TcpStream) -> Result<Box<dyn Transport>, TransportError> {
        self.bind_after(stream, 0, 0)
    }

    /// The transport over `stream`, continuing a connection that already carried `sent`
    /// and `received` frames (a handshake run over a [`TcpTransport`]): sequence numbers,
    /// and so nonces, go on from there and are never reused.
    pub fn bind_after(self, stream: TcpStream, sent: u64, received: u64) -> Result<Box<dyn Transport>, TransportError> {
        Ok(match self.uring {
            None => {
                let mut t = TcpTransport::new(stream, self.timeout)
                    .map_err(|source| TransportError::Io { op: "configure socket", source })?;
                (t.send_seq, t.recv_seq) = (sent, received);
                Box::new(t)
            }
            Some(tx) => {
                let mut t = UringTransport::bind(stream, self.mode, tx, self.timeout)?;
                (t.send_seq, t.recv_seq) = (sent, received);
                Box::new(t)
            }
        })
    }
}

/// Connect to `addr` and wrap the stream in the prepared transport.
pub fn connect(
    addr: &str,
    prepared: Prepared,
    connect_timeout: Duration,
) -> Result<Box<dyn Transport>, TransportError> {
    use std::net::ToSocketAddrs;
    let mut last = None;
    let addrs = addr.to_socket_addrs().map_err(|e| TransportError::Io { op: "resolve address", source: e })?;
    for a in addrs {
        match TcpStream::connect_timeout(&a, connect_timeout) {
            Ok(s) => return prepared.bind(s),
            Err(e) => last = Some(e),
        }
    }
    Err(TransportError::Io {
        op: "connect",
        source: last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{addr} resolves to nothing"))),
    })
}
