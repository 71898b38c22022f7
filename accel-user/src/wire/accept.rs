//! Which incoming connections become a migration's control connection and data streams.
//! With authentication the control connection is the first whose handshake completes, and
//! a data stream is a connection whose `Join` opens under one of the session's stream keys.
//! Everything else is dropped with its reason (see [`super::lobby`]).
//!
//! Handshakes wait side by side without a thread each: an `AuthInit` that arrived whole is
//! answered at once, and the handshake then waits, as a few hundred bytes of state, for its
//! `AuthConfirm`. Each has a deadline counted from its connection's start (not per byte),
//! and at most [`MAX_HANDSHAKES`] wait at once, the oldest dropped first. A real source
//! answers within one round trip, so a keyless peer — flooding `AuthInit`s or trickling its
//! `AuthConfirm` — never keeps it out: it gets in unless more than [`MAX_HANDSHAKES`]
//! other handshakes start during its own round trip.
use std::cell::RefCell;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::wire::auth::{self, AwaitingConfirm, Conn, MAX_QUERIES};
use crate::wire::connect;
use crate::wire::frame::{FrameKind, Header, HEADER_LEN};
use crate::wire::keys::TransportKey;
use crate::wire::lobby::{self, Lobby};
use crate::wire::payload::MAX_STREAMS;
use crate::wire::seal::{self, FrameKey, Sealed, TAG_LEN};
use crate::wire::transport::{TcpTransport, Transport, TransportError, TransportMode};

/// Handshakes waiting for their `AuthConfirm` at once; one more drops the oldest.
pub const MAX_HANDSHAKES: usize = 64;

/// How long the lobby is asked for a new connection before waiting handshakes are looked
/// at again.
const TURN: Duration = Duration::from_millis(2);

/// Each connection's (send, receive) keys, by index.
pub type StreamKeys = Vec<(FrameKey, FrameKey)>;

/// The keys of the connections that join an authenticated session after its control
/// connection: data streams by stream index, handover queries by attempt.
pub struct JoinKeys {
    pub data: StreamKeys,
    pub query: StreamKeys,
}

/// An authenticated control connection, sealed, and the session's join keys.
type Control = (Box<dyn Transport>, JoinKeys);

/// A handshake that answered `AuthInit` and waits for the source's proof.
struct Waiting {
    t: TcpTransport,
    half: AwaitingConfirm,
    peer: String,
    deadline: Instant,
}

/// A receiver's listening socket, seen through its lobby.
pub struct Incoming<'l> {
    lobby: RefCell<Lobby<'l>>,
    mode: TransportMode,
    timeout: Duration,
    /// Stops the wait for a source (an operator's signal).
    cancel: crate::cancel::Cancel,
}

impl<'l> Incoming<'l> {
    /// Connections on `l`, wrapped in `mode` transports with I/O timeout `timeout` (which
    /// also bounds each handshake from its connection's start, and a connection's silence
    /// in the lobby).
    pub fn new(l: &'l TcpListener, mode: TransportMode, timeout: Duration) -> std::io::Result<Self> {
        Ok(Incoming { lobby: RefCell::new(Lobby::new(l, timeout)?), mode, timeout, cancel: Default::default() })
    }

    /// The wait for a control connection ends with `Cancelled` once `cancel` is set.
    pub fn with_cancel(mut self, cancel: crate::cancel::Cancel) -> Self {
        self.cancel = cancel;
        self
    }

    /// Why dropped connections were dropped.
    pub fn dropped(&self) -> Vec<String> {
        self.lobby.borrow().dropped()
    }

    fn drop_peer(&self, peer: &str, why: &str) {
        self.lobby.borrow_mut().dropped_peer(peer, why);
    }

    /// The control connection: the first whose handshake with `psk` completes, sealed, and
    /// the session's join keys (insecure, `psk` `None`: the first that says `Hello`, and
    /// no keys). `Timeout`: nothing within `wait` (`None`: for ever).
    pub fn control(
        &self,
        psk: Option<&TransportKey>,
        wait: Option<Duration>,
    ) -> Result<(Box<dyn Transport>, Option<JoinKeys>), TransportError> {
        let t0 = Instant::now();
        let Some(psk) = psk else {
            loop {
                if let Some(why) = self.cancel.reason() {
                    return Err(TransportError::Cancelled(why));
                }
                match self.lobby.borrow_mut().next(FrameKind::Hello, 0, Some(TURN)) {
                    Ok((s, _)) => return connect::wrap(s, self.mode, None, false, self.timeout).map(|t| (t, None)),
                    Err(TransportError::Timeout(_)) => {}
                    Err(e) => return Err(e),
                }
                if let Some(w) = wait.filter(|&w| t0.elapsed() >= w) {
                    return Err(TransportError::Timeout(w));
                }
            }
        };
        let mut waiting: std::collections::VecDeque<Waiting> = Default::default();
        loop {
            if let Some(done) = self.settle(&mut waiting) {
                return done.map(|(t, k)| (t, Some(k)));
            }
            if let Some(why) = self.cancel.reason() {
                return Err(TransportError::Cancelled(why));
            }
            if let Some(w) = wait.filter(|&w| t0.elapsed() >= w) {
                return Err(TransportError::Timeout(w));
            }
            let (s, since) = match self.lobby.borrow_mut().next(FrameKind::AuthInit, 0, Some(TURN)) {
                Ok(x) => x,
                Err(TransportError::Timeout(_)) => continue,
                Err(e) => return Err(e),
            };
            let peer = lobby::peer(&s);
            // The AuthInit is in the socket whole and the AuthReply fits its empty send
            // buffer: neither step waits on the peer.
            let mut t = match TcpTransport::new(s, self.timeout) {
                Ok(t) => t,
                Err(e) => {
                    self.drop_peer(&peer, &format!("cannot configure its socket: {e}"));
                    continue;
                }
            };
            match auth::destination_reply(&mut t, psk) {
                Ok(half) => {
                    if waiting.len() >= MAX_HANDSHAKES {
                        if let Some(old) = waiting.pop_front() {
                            let why = format!("handshake evicted: {MAX_HANDSHAKES} were waiting for their AuthConfirm");
                            self.drop_peer(&old.peer, &why);
                        }
                    }
                    waiting.push_back(Waiting { t, half, peer, deadline: since + self.timeout });
                }
                Err(e) => self.drop_peer(&peer, &e.to_string()),
            }
        }
    }

    /// Finish the first waiting handshake whose `AuthConfirm` arrived whole; drop those that
    /// failed, closed, sent something else, or passed their deadline.
    fn settle(&self, waiting: &mut std::collections::VecDeque<Waiting>) -> Option<Result<Control, TransportError>> {
        let mut i = 0;
        while i < waiting.len() {
            let w = &waiting[i];
            match confirm_arrived(w.t.socket()) {
                Ok(false) if Instant::now() < w.deadline => {
                    i += 1;
                    continue;
                }
                Ok(false) => {
                    let why = format!("authentication handshake: not complete within {:?} of connecting", self.timeout);
                    self.drop_peer(&w.peer, &why);
                }
                Err(why) => self.drop_peer(&w.peer, &why),
                Ok(true) => {
                    let w = waiting.remove(i).expect("index checked");
                    match self.finish(w) {
                        Ok(done) => return Some(Ok(done)),
                        Err((peer, why)) => self.drop_peer(&peer, &why),
                    }
                    continue;
                }
            }
            waiting.remove(i);
        }
        None
    }

    /// Check the source's proof and seal the connection in the configured transport.
    fn finish(&self, w: Waiting) -> Result<Control, (String, String)> {
        let Waiting { mut t, half, peer, .. } = w;
        let fail = |e: &dyn std::fmt::Display| (peer.clone(), e.to_string());
        let keys = auth::destination_confirm(&mut t, half).map_err(|e| fail(&e))?;
        let control = keys.keys(Conn::Control).map_err(|e| fail(&e))?;
        let data =
            (0..MAX_STREAMS).map(|i| keys.keys(Conn::Data(i))).collect::<Result<_, _>>().map_err(|e| fail(&e))?;
        let query =
            (0..MAX_QUERIES).map(|i| keys.keys(Conn::Query(i))).collect::<Result<_, _>>().map_err(|e| fail(&e))?;
        let (s, sent, received) = t.into_parts();
        let t = connect::prepare(self.mode, None, false, self.timeout)
            .and_then(|p| p.bind_after(s, sent, received))
            .map_err(|e| fail(&e))?;
        Ok((Box::new(Sealed::new(t, control)), JoinKeys { data, query }))
    }

    /// The next data stream: a connection whose `Join` opens under one of `keys` (sealed with
    /// that stream's keys), or, insecure, the next that says `Join`. Connections whose `Join`
    /// opens under no key are dropped and the next taken, all within one I/O timeout.
    pub fn data(&self, keys: Option<&JoinKeys>) -> Result<Box<dyn Transport>, TransportError> {
        let Some(keys) = keys else {
            let (s, _) = self.lobby.borrow_mut().next(FrameKind::Join, 0, Some(self.timeout))?;
            return connect::wrap(s, self.mode, None, false, self.timeout);
        };
        self.opened(FrameKind::Join, &keys.data, self.timeout).map(|(t, _)| t)
    }

    /// The next handover query of this session within `wait`: a connection whose `Query`
    /// opens under one of the query keys, sealed with it, and which attempt it is.
    pub fn query(&self, keys: &JoinKeys, wait: Duration) -> Result<(Box<dyn Transport>, u32), TransportError> {
        self.opened(FrameKind::Query, &keys.query, wait).map(|(t, i)| (t, i as u32))
    }

    /// The first connection within `wait` whose first frame is a `kind` that opens under one
    /// of `keys`, sealed with that key, and its index. Others are dropped with their reason.
    fn opened(
        &self,
        kind: FrameKind,
        keys: &StreamKeys,
        wait: Duration,
    ) -> Result<(Box<dyn Transport>, usize), TransportError> {
        let t0 = Instant::now();
        loop {
            let left = wait.checked_sub(t0.elapsed()).ok_or(TransportError::Timeout(wait))?;
            let (s, _) = self.lobby.borrow_mut().next(kind, TAG_LEN, Some(left))?;
            // Which connection this is shows only in which key opens its first frame: try
            // them on the frame still in the socket.
            let mut first = [0u8; HEADER_LEN + 16 + TAG_LEN];
            let n = s.peek(&mut first).map_err(|source| TransportError::Io { op: "peek", source })?;
            match keys.iter().position(|(_, rx)| seal::opens(rx, &first[..n])) {
                Some(i) => {
                    let t = connect::wrap(s, self.mode, None, false, self.timeout)?;
                    return Ok((Box::new(Sealed::new(t, keys[i].clone())), i));
                }
                None => self.lobby.borrow_mut().dropped_peer(
                    &lobby::peer(&s),
                    &format!("its {kind:?} failed authentication (none of this migration's keys opens it)"),
                ),
            }
        }
    }
}

/// Whether a whole `AuthConfirm` waits in `s` (`Err`: the peer closed, or sent something
/// else). Looks without reading, and without waiting.
fn confirm_arrived(s: &TcpStream) -> Result<bool, String> {
    match kvm_hooks::wait_readable(std::os::fd::AsFd::as_fd(s), Duration::ZERO) {
        Ok(true) => {}
        Ok(false) => return Ok(false),
        Err(e) => return Err(format!("authentication handshake: poll: {e}")),
    }
    let mut buf = [0u8; HEADER_LEN + auth::CONFIRM_LEN];
    // Readable: data (or the end of the stream) is there, so this peek does not block.
    let n = s.peek(&mut buf).map_err(|e| format!("authentication handshake: {e}"))?;
    if n == 0 {
        return Err("authentication handshake: the peer closed the connection before its AuthConfirm".into());
    }
    if n < HEADER_LEN {
        return Ok(false);
    }
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(&buf[..HEADER_LEN]);
    // Only a whole AuthConfirm of its exact size is ever read; anything else (an Abort
    // included) ends the handshake here, so no read can wait on a trickling peer.
    match Header::decode(&h) {
        Ok(h) if h.kind == FrameKind::AuthConfirm && h.len as usize == auth::CONFIRM_LEN => Ok(n == buf.len()),
        Ok(h) => {
            Err(format!("authentication handshake: sent {:?} ({} bytes) where AuthConfirm was expected", h.kind, h.len))
        }
        Err(e) => Err(format!("authentication handshake: {e}")),
    }
}
