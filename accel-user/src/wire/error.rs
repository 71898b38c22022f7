//! What can go wrong moving frames, for every transport and the layers over them.
use std::io;
use std::time::Duration;

use super::frame::ProtocolError;

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
    pub(crate) fn io(op: &'static str, e: io::Error, timeout: Duration) -> Self {
        match e.kind() {
            io::ErrorKind::UnexpectedEof => TransportError::Closed,
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => TransportError::Timeout(timeout),
            _ => TransportError::Io { op, source: e },
        }
    }
}
