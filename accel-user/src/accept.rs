//! Which incoming connections become a migration's control connection and data streams.
//! With authentication the control connection is the first whose handshake completes
//! (handshakes run side by side, so a peer without the key that stalls never delays the
//! real source), and a data stream is a connection whose `Join` opens under one of the
//! session's stream keys. Everything else is dropped with its reason (see `lobby.rs`).
use std::cell::RefCell;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use crate::auth::{self, Conn};
use crate::keys::TransportKey;
use crate::lobby::{self, Lobby};
use crate::protocol::{FrameKind, HEADER_LEN, MAX_STREAMS};
use crate::seal::{self, FrameKey, Sealed, TAG_LEN};
use crate::transport::{self, Transport, TransportError, TransportMode};

/// Handshakes in progress at once: a peer that starts one and stalls holds only its own.
const MAX_HANDSHAKES: usize = 8;

/// Each data stream's (send, receive) keys, by stream index.
pub type StreamKeys = Vec<(FrameKey, FrameKey)>;

/// What a handshake thread hands back: the sealed control connection and the session's
/// stream keys, or why the peer was dropped.
type Handshake = Result<(Box<dyn Transport>, StreamKeys), String>;

/// A receiver's listening socket, seen through its lobby.
pub struct Incoming<'l> {
    lobby: RefCell<Lobby<'l>>,
    mode: TransportMode,
    timeout: Duration,
}

impl<'l> Incoming<'l> {
    /// Connections on `l`, wrapped in `mode` transports with I/O timeout `timeout` (which
    /// also bounds each handshake and a connection's silence in the lobby).
    pub fn new(l: &'l TcpListener, mode: TransportMode, timeout: Duration) -> std::io::Result<Self> {
        Ok(Incoming { lobby: RefCell::new(Lobby::new(l, timeout)?), mode, timeout })
    }

    /// Why each dropped connection was dropped.
    pub fn dropped(&self) -> Vec<String> {
        self.lobby.borrow().dropped().to_vec()
    }

    /// The control connection: the first whose handshake with `psk` completes, sealed, and
    /// the session's stream keys (insecure, `psk` `None`: the first that says `Hello`, and
    /// no keys). `Timeout`: nothing within `wait` (`None`: for ever).
    pub fn control(
        &self,
        psk: Option<&TransportKey>,
        wait: Option<Duration>,
    ) -> Result<(Box<dyn Transport>, Option<StreamKeys>), TransportError> {
        let t0 = Instant::now();
        let first = if psk.is_some() { FrameKind::AuthInit } else { FrameKind::Hello };
        let (tx, rx) = std::sync::mpsc::channel::<(String, Handshake)>();
        let mut running = 0usize;
        loop {
            while let Ok((peer, res)) = rx.try_recv() {
                running -= 1;
                match res {
                    Ok((t, keys)) => return Ok((t, Some(keys))),
                    Err(e) => self.lobby.borrow_mut().dropped_peer(&peer, &e),
                }
            }
            if let Some(w) = wait.filter(|&w| t0.elapsed() >= w) {
                return Err(TransportError::Timeout(w));
            }
            if running >= MAX_HANDSHAKES {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            let next = self.lobby.borrow_mut().next(first, 0, Some(Duration::from_millis(20)));
            let s = match next {
                Ok(s) => s,
                Err(TransportError::Timeout(_)) => continue,
                Err(e) => return Err(e),
            };
            let peer = lobby::peer(&s);
            let mut t = transport::wrap(s, self.mode, None, false, self.timeout)?;
            let Some(k) = psk.cloned() else { return Ok((t, None)) };
            let tx = tx.clone();
            running += 1;
            let spawned = std::thread::Builder::new().name("recv-handshake".into()).spawn(move || {
                let res = auth::destination(&mut *t, &k)
                    .and_then(|keys| {
                        let control = keys.keys(Conn::Control)?;
                        let streams = (0..MAX_STREAMS).map(|i| keys.keys(Conn::Data(i))).collect::<Result<_, _>>()?;
                        Ok((Box::new(Sealed::new(t, control)) as Box<dyn Transport>, streams))
                    })
                    .map_err(|e| e.to_string());
                let _ = tx.send((peer, res));
            });
            if let Err(e) = spawned {
                return Err(TransportError::Io { op: "spawn a handshake thread", source: e });
            }
        }
    }

    /// The next data stream: a connection whose `Join` opens under one of `keys` (sealed with
    /// that stream's keys), or, insecure, the next that says `Join`. Connections whose `Join`
    /// opens under no key are dropped and the next taken, all within one I/O timeout.
    pub fn data(&self, keys: Option<&StreamKeys>) -> Result<Box<dyn Transport>, TransportError> {
        let t0 = Instant::now();
        loop {
            let trailer = if keys.is_some() { TAG_LEN } else { 0 };
            let left = self.timeout.checked_sub(t0.elapsed()).ok_or(TransportError::Timeout(self.timeout))?;
            let s = self.lobby.borrow_mut().next(FrameKind::Join, trailer, Some(left))?;
            let Some(keys) = keys else { return transport::wrap(s, self.mode, None, false, self.timeout) };
            // Which stream this is shows only in which key opens its Join: try them on the
            // frame still in the socket.
            let mut first = [0u8; HEADER_LEN + 16 + TAG_LEN];
            let n = s.peek(&mut first).map_err(|source| TransportError::Io { op: "peek", source })?;
            match keys.iter().position(|(_, rx)| seal::opens(rx, &first[..n])) {
                Some(i) => {
                    let t = transport::wrap(s, self.mode, None, false, self.timeout)?;
                    return Ok(Box::new(Sealed::new(t, keys[i].clone())));
                }
                None => self.lobby.borrow_mut().dropped_peer(
                    &lobby::peer(&s),
                    "its Join failed authentication (none of this migration's keys opens it)",
                ),
            }
        }
    }
}
