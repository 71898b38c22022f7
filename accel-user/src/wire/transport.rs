//! Transports move frames. The engine sees only the [`Transport`] trait; v1 is blocking TCP
//! with `writev` straight from the guest RAM mapping and `readv` straight into it.
use std::io::{self, Read};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::time::Duration;

use kvm_hooks::memory::GuestRam;

pub use super::error::TransportError;
pub use super::frame::Part;
use super::frame::{FrameKind, Header, HEADER_LEN};
use super::framer::{Framer, SHUT_FOR_SENDING};

/// A bidirectional frame stream.
pub trait Transport: Send {
    /// Send one frame made of `parts`; guest parts are read from `ram` without staging.
    fn send_frame(&mut self, kind: FrameKind, parts: &[Part<'_>], ram: Option<&GuestRam>)
        -> Result<(), TransportError>;
    /// Send a piece of a frame built elsewhere (a sealed one). The first piece brings the
    /// header, which must carry [`Transport::send_seq`]; the frame counts as sent once its
    /// `last` piece is out. `body` may be reused once this returns.
    fn send_raw(&mut self, hdr: Option<&[u8; HEADER_LEN]>, body: &[u8], last: bool) -> Result<(), TransportError>;
    /// The connection's frame layer: sequence numbers, header checks, the send fence.
    fn framer(&self) -> &Framer;
    fn framer_mut(&mut self) -> &mut Framer;
    /// Sequence number of the next frame sent.
    fn send_seq(&self) -> u64 {
        self.framer().send_seq()
    }
    /// After a send failed: the sequence number of the first frame that does not count as
    /// sent (that frame and every later one never reach the peer whole), and why. A frame
    /// whose bytes all reached the kernel counts as sent, even if the connection failed
    /// afterwards.
    fn unsent(&self) -> Option<(u64, String)> {
        self.framer().unsent()
    }
    /// Receive and validate the next frame header (magic, version, caps, sequence).
    fn recv_header(&mut self) -> Result<Header, TransportError> {
        let mut b = [0u8; HEADER_LEN];
        self.recv_exact(&mut b)?;
        self.framer_mut().received(&b)
    }
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
pub(crate) fn stream_readable(stream: &TcpStream, timeout: Duration) -> Result<bool, TransportError> {
    kvm_hooks::wait_readable(stream.as_fd(), timeout).map_err(|source| TransportError::Io { op: "poll", source })
}

/// Blocking TCP transport (v1).
#[derive(Debug)]
pub struct TcpTransport {
    stream: TcpStream,
    /// Sequence numbers and the send fence: once a send failed, the write side is shut and
    /// stays unused.
    framer: Framer,
    timeout: Duration,
    sent: u64,
    /// How long a send may make no progress (receives have their own, changeable limit).
    send_timeout: Duration,
}

impl TcpTransport {
    pub fn new(stream: TcpStream, timeout: Duration) -> io::Result<Self> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(TcpTransport { stream, framer: Framer::default(), timeout, sent: 0, send_timeout: timeout })
    }

    /// Continue a connection whose frames so far another transport carried.
    pub(crate) fn resume(&mut self, framer: Framer) {
        self.framer = framer;
    }

    /// The socket, to look at what waits in it.
    pub fn socket(&self) -> &TcpStream {
        &self.stream
    }

    /// The socket back, with the sequence numbers the connection reached (sent,
    /// received), for a transport that continues it ([`Prepared::bind_after`]).
    pub fn into_parts(self) -> (TcpStream, u64, u64) {
        (self.stream, self.framer.send_seq(), self.framer.recv_seq())
    }

    /// Write every byte `iov` points at, resuming after short writes. On failure the
    /// write side is shut down: bytes already queued go out as a frame cut short, which
    /// no peer accepts, and nothing else follows.
    fn write_all(&mut self, iov: &mut [libc::iovec]) -> Result<(), TransportError> {
        self.framer.check_open()?;
        let r = self.write_iov(iov);
        if let Err(e) = &r {
            self.framer.close(e);
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
        let hdr = self.framer.header(kind, parts)?.encode();
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
        self.framer.sent();
        Ok(())
    }

    fn send_raw(&mut self, hdr: Option<&[u8; HEADER_LEN]>, body: &[u8], last: bool) -> Result<(), TransportError> {
        self.framer.check_piece(hdr)?;
        let mut iov = Vec::with_capacity(2);
        if let Some(hdr) = hdr {
            iov.push(libc::iovec { iov_base: hdr.as_ptr() as *mut _, iov_len: HEADER_LEN });
        }
        iov.push(libc::iovec { iov_base: body.as_ptr() as *mut _, iov_len: body.len() });
        self.write_all(&mut iov)?;
        self.framer.piece_sent(last);
        Ok(())
    }

    fn framer(&self) -> &Framer {
        &self.framer
    }

    fn framer_mut(&mut self) -> &mut Framer {
        &mut self.framer
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
        self.framer.close(SHUT_FOR_SENDING);
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
