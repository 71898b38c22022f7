//! The frame layer of one connection, kept apart from how bytes move: sequence numbers in
//! both directions, header checks, frames sent in pieces, and the fence that stops all
//! sending after a failed send. Every transport holds one [`Framer`]; none counts or
//! checks frames itself.
use super::error::TransportError;
use super::frame::{FrameKind, Header, Part, ProtocolError, HEADER_LEN};

/// Why a connection closed by `shutdown_write` sends no more.
pub(crate) const SHUT_FOR_SENDING: &str = "the connection was shut down for sending";

/// The payload length of a frame made of `parts`.
pub fn payload_len(parts: &[Part<'_>]) -> Result<u32, TransportError> {
    let len: u64 = parts
        .iter()
        .map(|p| match p {
            Part::Buf(b) => b.len() as u64,
            Part::Guest { len, .. } => *len,
        })
        .sum();
    u32::try_from(len).map_err(|_| TransportError::Guest(format!("frame of {len} bytes")))
}

/// Sequence numbers, the state of a frame sent in pieces, and the send fence.
#[derive(Debug, Default)]
pub struct Framer {
    send_seq: u64,
    recv_seq: u64,
    /// A frame sent in pieces has its first pieces out, not its last.
    raw_open: bool,
    /// Once a send failed: why, and the first sequence number that does not count as sent.
    /// The first failure is kept.
    fence: Option<(String, u64)>,
}

impl Framer {
    /// A framer for a connection that already carried `sent` and `received` frames (a
    /// handshake run over another transport): numbers, and so nonces, go on from there.
    pub fn resume(sent: u64, received: u64) -> Framer {
        Framer { send_seq: sent, recv_seq: received, ..Framer::default() }
    }

    /// Sequence number of the next frame sent.
    pub fn send_seq(&self) -> u64 {
        self.send_seq
    }

    /// Sequence number of the next frame expected.
    pub fn recv_seq(&self) -> u64 {
        self.recv_seq
    }

    /// `Broken` once a send failed.
    pub fn check_open(&self) -> Result<(), TransportError> {
        match &self.fence {
            Some((why, _)) => Err(TransportError::Broken(why.clone())),
            None => Ok(()),
        }
    }

    /// The header of the next whole frame, made of `parts`; fails once the fence is shut.
    pub fn header(&self, kind: FrameKind, parts: &[Part<'_>]) -> Result<Header, TransportError> {
        self.check_open()?;
        Ok(Header { kind, len: payload_len(parts)?, seq: self.send_seq })
    }

    /// A whole frame went out (or, for a sealed frame, its nonce is spent).
    pub fn sent(&mut self) {
        self.send_seq += 1;
    }

    /// Check a piece of a frame built elsewhere (a sealed one) before it is sent: the
    /// header comes with the first piece only and carries the next sequence number.
    pub fn check_piece(&self, hdr: Option<&[u8; HEADER_LEN]>) -> Result<(), TransportError> {
        self.check_open()?;
        let seq = self.send_seq;
        match (hdr, self.raw_open) {
            (Some(hdr), false) => {
                let h = Header::decode(hdr)?;
                if h.seq != seq {
                    return Err(TransportError::Guest(format!("raw frame with sequence {}, expected {seq}", h.seq)));
                }
                Ok(())
            }
            (None, true) => Ok(()),
            (Some(_), true) => Err(TransportError::Guest(format!("a header inside raw frame {seq}"))),
            (None, false) => Err(TransportError::Guest("a raw frame's piece without its header".into())),
        }
    }

    /// A piece went out: after the `last` one the frame is sent.
    pub fn piece_sent(&mut self, last: bool) {
        self.raw_open = !last;
        self.send_seq += u64::from(last);
    }

    /// Decode a received header and check it continues the sequence (advanced on success).
    pub fn received(&mut self, b: &[u8; HEADER_LEN]) -> Result<Header, TransportError> {
        let h = Header::decode(b)?;
        if h.seq != self.recv_seq {
            return Err(ProtocolError::Sequence { got: h.seq, want: self.recv_seq }.into());
        }
        self.recv_seq += 1;
        Ok(h)
    }

    /// Close for good: nothing is sent again, and frames from `unsent` on do not count as
    /// sent. A later call keeps the first failure.
    pub fn close_at(&mut self, why: impl std::fmt::Display, unsent: u64) {
        self.fence.get_or_insert_with(|| (why.to_string(), unsent));
    }

    /// Close for good at the next frame (the one being sent did not go out whole).
    pub fn close(&mut self, why: impl std::fmt::Display) {
        self.close_at(why, self.send_seq);
    }

    /// After a send failed: the first sequence number that does not count as sent, and why.
    pub fn unsent(&self) -> Option<(u64, String)> {
        self.fence.as_ref().map(|(why, seq)| (*seq, why.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_continue_and_are_checked() {
        let mut f = Framer::resume(3, 5);
        let h = f.header(FrameKind::Done, &[]).unwrap().encode();
        assert_eq!(Header::decode(&h).unwrap().seq, 3);
        f.sent();
        assert_eq!(f.send_seq(), 4);
        let mut peer = Framer::resume(0, 4);
        assert_eq!(peer.received(&h).unwrap_err().to_string(), "bad frame from peer: frame sequence 3, expected 4");
        let next = Header { kind: FrameKind::Done, len: 0, seq: 5 }.encode();
        assert_eq!(f.received(&next).unwrap().seq, 5);
        assert!(f.received(&next).is_err(), "a replayed header");
        assert_eq!(f.recv_seq(), 6);
    }

    #[test]
    fn pieces_bring_one_header_first() {
        let mut f = Framer::default();
        let hdr = Header { kind: FrameKind::Pages, len: 10, seq: 0 }.encode();
        assert!(f.check_piece(None).is_err(), "a piece before the header");
        f.check_piece(Some(&hdr)).unwrap();
        f.piece_sent(false);
        assert!(f.check_piece(Some(&hdr)).is_err(), "a second header inside the frame");
        f.check_piece(None).unwrap();
        f.piece_sent(true);
        assert_eq!(f.send_seq(), 1);
        assert!(f.check_piece(Some(&hdr)).unwrap_err().to_string().contains("expected 1"));
    }

    #[test]
    fn a_closed_fence_stops_every_send_and_keeps_the_first_reason() {
        let mut f = Framer::resume(7, 0);
        f.close("send timed out");
        f.close_at("later", 2);
        assert_eq!(f.unsent(), Some((7, "send timed out".into())));
        assert!(matches!(f.header(FrameKind::Done, &[]), Err(TransportError::Broken(_))));
        assert!(matches!(f.check_piece(None), Err(TransportError::Broken(_))));
    }
}
