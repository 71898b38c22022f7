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

/// A bidirectional frame stream.
pub trait Transport: Send {
    /// Send one frame made of `parts`; guest parts are read from `ram` without staging.
    fn send_frame(&mut self, kind: FrameKind, parts: &[Part<'_>], ram: Option<&GuestRam>) -> Result<(), TransportError>;
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
    /// Bytes sent so far (headers included).
    fn bytes_sent(&self) -> u64;
}

/// Blocking TCP transport (v1).
#[derive(Debug)]
pub struct TcpTransport {
    stream: TcpStream,
    send_seq: u64,
    recv_seq: u64,
    timeout: Duration,
    sent: u64,
}

impl TcpTransport {
    pub fn new(stream: TcpStream, timeout: Duration) -> io::Result<Self> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(TcpTransport { stream, send_seq: 0, recv_seq: 0, timeout, sent: 0 })
    }

    pub fn connect(addr: &str, timeout: Duration) -> Result<Self, TransportError> {
        use std::net::ToSocketAddrs;
        let mut last = None;
        let addrs = addr.to_socket_addrs().map_err(|e| TransportError::Io { op: "resolve address", source: e })?;
        for a in addrs {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(s) => return TcpTransport::new(s, timeout).map_err(|e| TransportError::Io { op: "configure socket", source: e }),
                Err(e) => last = Some(e),
            }
        }
        Err(TransportError::Io {
            op: "connect",
            source: last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{addr} resolves to nothing"))),
        })
    }
}

impl Transport for TcpTransport {
    fn send_frame(&mut self, kind: FrameKind, parts: &[Part<'_>], ram: Option<&GuestRam>) -> Result<(), TransportError> {
        let len: u64 = parts
            .iter()
            .map(|p| match p {
                Part::Buf(b) => b.len() as u64,
                Part::Guest { len, .. } => *len,
            })
            .sum();
        let hdr = Header { kind, len: u32::try_from(len).map_err(|_| TransportError::Guest(format!("frame of {len} bytes")))?, seq: self.send_seq }
            .encode();
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(parts.len() + 1);
        iov.push(libc::iovec { iov_base: hdr.as_ptr() as *mut _, iov_len: HEADER_LEN });
        for p in parts {
            match *p {
                Part::Buf(b) if !b.is_empty() => iov.push(libc::iovec { iov_base: b.as_ptr() as *mut _, iov_len: b.len() }),
                Part::Buf(_) => {}
                Part::Guest { gpa, len } => {
                    let ram = ram.ok_or_else(|| TransportError::Guest("guest part without guest RAM".into()))?;
                    iov.push(ram.iovec(gpa, len).map_err(|e| TransportError::Guest(e.to_string()))?);
                }
            }
        }
        let mut idx = 0;
        while idx < iov.len() {
            let n = match kvm_hooks::writev_raw(self.stream.as_fd(), &iov[idx..]) {
                Ok(0) => return Err(TransportError::Closed),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(TransportError::io("send", e, self.timeout)),
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
        self.send_seq += 1;
        Ok(())
    }

    fn recv_header(&mut self) -> Result<Header, TransportError> {
        let mut b = [0u8; HEADER_LEN];
        self.recv_exact(&mut b)?;
        let h = Header::decode(&b)?;
        if h.seq != self.recv_seq {
            return Err(ProtocolError::Sequence { got: h.seq, want: self.recv_seq }.into());
        }
        self.recv_seq += 1;
        Ok(h)
    }

    fn recv_exact(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        self.stream.read_exact(buf).map_err(|e| TransportError::io("receive", e, self.timeout))
    }

    fn recv_into_guest(&mut self, ram: &GuestRam, gpa: u64, len: u64) -> Result<(), TransportError> {
        // Check the whole target range before the first byte is read.
        ram.iovec(gpa, len).map_err(|e| TransportError::Guest(e.to_string()))?;
        let mut done = 0u64;
        while done < len {
            match kvm_hooks::read_into_guest(self.stream.as_fd(), ram, gpa + done, len - done) {
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

    fn bytes_sent(&self) -> u64 {
        self.sent
    }
}
