//! Opening transports: a sending transport prepared before its peer is known, then bound
//! to a connected socket (blocking TCP or io_uring), continuing the handshake's sequence
//! numbers.
use std::io;
use std::net::TcpStream;
use std::time::Duration;

use kvm_hooks::memory::GuestRam;

use super::error::TransportError;
use super::framer::Framer;
use super::transport::{TcpTransport, Transport, TransportMode};
use super::uring::UringTransport;

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
                t.resume(Framer::resume(sent, received));
                Box::new(t)
            }
            Some(tx) => {
                Box::new(UringTransport::bind(stream, self.mode, tx, self.timeout, Framer::resume(sent, received))?)
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
