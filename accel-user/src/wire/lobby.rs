//! Where a receiver's incoming connections wait until they show what they are. The receiver
//! asks for the first connection whose whole first frame has arrived and is the kind it
//! expects (`Hello`, then `Join`); a connection that sends something else, or not all of its
//! first frame within `silence`, is dropped with its reason. A port scanner, a stray or a
//! silent peer cannot take a migration's place, and the receiver never blocks on one of them.
use std::io;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::wire::frame::{FrameKind, Header, HEADER_LEN};
use crate::wire::transport::TransportError;

/// How often pending connections are looked at.
const POLL: Duration = Duration::from_millis(2);

/// Connections kept waiting for their first frame. A new one beyond this evicts the
/// oldest: a flood of silent connections then holds at most this many descriptors, and a
/// real peer, which sends its first frame at once, is never the one evicted for long.
pub const MAX_PENDING: usize = 256;

/// Drop reasons kept for the final error message; later ones are only counted.
const MAX_REASONS: usize = 64;

/// Largest first frame waited for whole (`Hello` and `Join` are far smaller): a connection
/// is handed over only once its whole first frame has arrived, so a peer that stalls
/// halfway through it stalls in the lobby, never in the receiver.
const FIRST_FRAME_MAX: usize = 1024;

pub struct Lobby<'a> {
    l: &'a TcpListener,
    /// Oldest first.
    pending: std::collections::VecDeque<(TcpStream, Instant)>,
    silence: Duration,
    dropped: Vec<String>,
    /// Drops beyond the reasons kept.
    more: usize,
    /// When `accept` last failed for want of descriptors (logged once per episode).
    starved: bool,
}

impl<'a> Lobby<'a> {
    /// A lobby over `l` that drops a connection whose first frame is not complete within
    /// `silence` of its connect.
    pub fn new(l: &'a TcpListener, silence: Duration) -> io::Result<Self> {
        l.set_nonblocking(true)?;
        Ok(Lobby { l, pending: Default::default(), silence, dropped: Vec::new(), more: 0, starved: false })
    }

    /// Why dropped connections were dropped ("127.0.0.1:4711: bad magic …"): the first
    /// [`MAX_REASONS`], then a count of the rest.
    pub fn dropped(&self) -> Vec<String> {
        let mut v = self.dropped.clone();
        if self.more > 0 {
            v.push(format!("and {} more", self.more));
        }
        v
    }

    /// Record that the receiver dropped `peer`'s connection, and why.
    pub fn dropped_peer(&mut self, peer: &str, why: &str) {
        if self.dropped.len() < MAX_REASONS {
            tracing::warn!("dropped a connection from {peer}: {why}");
            self.dropped.push(format!("{peer}: {why}"));
        } else {
            tracing::debug!("dropped a connection from {peer}: {why}");
            self.more += 1;
        }
    }

    /// Drop the connection that has waited longest, to make room.
    fn evict_oldest(&mut self, why: &str) -> bool {
        match self.pending.pop_front() {
            Some((s, _)) => {
                self.dropped_peer(&peer(&s), why);
                true
            }
            None => false,
        }
    }

    /// The next connection whose whole first frame arrived, well formed and of `kind`, in
    /// blocking mode with that frame still unread; waits at most `timeout` (`None`: for
    /// ever). `trailer` bytes follow the frame's payload (a sealed frame's tag).
    pub fn next(
        &mut self,
        kind: FrameKind,
        trailer: usize,
        timeout: Option<Duration>,
    ) -> Result<(TcpStream, Instant), TransportError> {
        let t0 = Instant::now();
        loop {
            self.accept_all()?;
            if let Some((s, since)) = self.take_ready(kind, trailer) {
                s.set_nonblocking(false).map_err(|source| TransportError::Io { op: "accept", source })?;
                return Ok((s, since));
            }
            if let Some(limit) = timeout.filter(|&l| t0.elapsed() >= l) {
                return Err(TransportError::Timeout(limit));
            }
            std::thread::sleep(POLL);
        }
    }

    fn accept_all(&mut self) -> Result<(), TransportError> {
        loop {
            match self.l.accept() {
                Ok((s, _)) => {
                    self.starved = false;
                    if s.set_nonblocking(true).is_err() {
                        continue; // already gone
                    }
                    if self.pending.len() >= MAX_PENDING {
                        let why = format!("evicted: {MAX_PENDING} connections were waiting for their first frame");
                        self.evict_oldest(&why);
                    }
                    self.pending.push_back((s, Instant::now()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                // A connection reset before it was accepted is its own business.
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                // Out of descriptors or buffers: a flood of connections, not a reason to
                // stop. Free the oldest waiting one and accept again; with nothing to free,
                // look again at the next poll (the kernel keeps the rest queued).
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)) =>
                {
                    if !self.starved {
                        tracing::warn!("accept: {e}; dropping the oldest waiting connection and going on");
                        self.starved = true;
                    }
                    if !self.evict_oldest(&format!("evicted: accept failed ({e})")) {
                        return Ok(());
                    }
                }
                Err(source) => return Err(TransportError::Io { op: "accept", source }),
            }
        }
    }

    /// Remove and return the first pending connection that sent a whole first frame of
    /// `kind`; drop those that sent anything else, closed, or stalled too long.
    fn take_ready(&mut self, kind: FrameKind, trailer: usize) -> Option<(TcpStream, Instant)> {
        let mut i = 0;
        while i < self.pending.len() {
            let (s, since) = &self.pending[i];
            let mut buf = [0u8; HEADER_LEN + FIRST_FRAME_MAX];
            let verdict = match s.peek(&mut buf) {
                Ok(0) => Err("closed before its first frame".to_string()),
                Ok(n) if n < HEADER_LEN => Ok(false),
                Ok(n) => match Header::decode(&header_of(&buf)) {
                    Ok(h) if h.kind == FrameKind::Hello && kind == FrameKind::AuthInit => Err(
                        "sent Hello without authenticating (a source with auth.insecure?); this receiver requires authentication"
                            .to_string(),
                    ),
                    Ok(h) if h.kind != kind => Err(format!("sent {:?} where {kind:?} was expected", h.kind)),
                    Ok(h) if h.len as usize + trailer > FIRST_FRAME_MAX => {
                        Err(format!("its first frame of {} bytes is larger than a {kind:?}", h.len))
                    }
                    Ok(h) => Ok(n >= HEADER_LEN + h.len as usize + trailer),
                    Err(e) => Err(e.to_string()),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
                Err(e) => Err(e.to_string()),
            };
            let verdict = match verdict {
                Ok(false) if since.elapsed() >= self.silence => {
                    Err(format!("sent no complete first frame within {:?}", self.silence))
                }
                v => v,
            };
            match verdict {
                Ok(true) => return self.pending.remove(i),
                Ok(false) => i += 1,
                Err(why) => {
                    if let Some((s, _)) = self.pending.remove(i) {
                        self.dropped_peer(&peer(&s), &why);
                    }
                }
            }
        }
        None
    }
}

/// The address of `s`'s peer, for messages.
pub fn peer(s: &TcpStream) -> String {
    s.peer_addr().map_or_else(|_| "a peer".to_string(), |a| a.to_string())
}

/// The frame header at the start of `buf`.
fn header_of(buf: &[u8; HEADER_LEN + FIRST_FRAME_MAX]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(&buf[..HEADER_LEN]);
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn header(kind: FrameKind) -> [u8; HEADER_LEN] {
        Header { kind, len: 0, seq: 0 }.encode()
    }

    #[test]
    fn takes_the_first_connection_of_the_expected_kind_and_drops_the_rest() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut lobby = Lobby::new(&l, Duration::from_millis(300)).unwrap();
        let mut garbage = TcpStream::connect(addr).unwrap();
        garbage.write_all(&[0xab; HEADER_LEN]).unwrap();
        let mut join = TcpStream::connect(addr).unwrap();
        join.write_all(&header(FrameKind::Join)).unwrap();
        let _silent = TcpStream::connect(addr).unwrap();
        let mut partial = TcpStream::connect(addr).unwrap();
        partial.write_all(&header(FrameKind::Hello)[..5]).unwrap();
        // A whole header that announces a payload which never comes.
        let mut stalled = TcpStream::connect(addr).unwrap();
        stalled.write_all(&Header { kind: FrameKind::Hello, len: 8, seq: 0 }.encode()).unwrap();
        let mut hello = TcpStream::connect(addr).unwrap();
        hello.write_all(&header(FrameKind::Hello)).unwrap();
        let (got, _) = lobby.next(FrameKind::Hello, 0, Some(Duration::from_secs(60))).unwrap();
        assert_eq!(got.peer_addr().unwrap(), hello.local_addr().unwrap());
        // Nothing else qualifies; the silent, the half-sent and the stalled connection are
        // dropped once silent for 300 ms.
        let e = lobby.next(FrameKind::Hello, 0, Some(Duration::from_millis(600))).unwrap_err();
        assert!(matches!(e, TransportError::Timeout(_)), "{e}");
        let d = lobby.dropped();
        assert_eq!(d.len(), 5, "{d:?}");
        let all = d.join("; ");
        assert!(all.contains("bad magic") && all.contains("sent Join where Hello was expected"), "{all}");
        assert_eq!(d.iter().filter(|w| w.contains("no complete first frame")).count(), 3, "{d:?}");
    }
}
