//! Sealed frames: after the handshake (`auth.rs`) every frame on a connection is
//! AES-256-GCM sealed. The 24-byte header travels in clear and is authenticated; the
//! payload is encrypted; a 16-byte tag follows it (the header's `len` does not count it).
//! Each direction of each connection has its own key and the frame's sequence number is
//! its nonce, so a frame that is edited, replayed, reordered, dropped or moved to another
//! connection fails to open.
//!
//! Pages are sealed from a copy: the guest keeps running while a page is sent, and a page
//! that changed between sealing and sending would fail to open on the other side. The
//! receiver reads a whole frame and checks its tag before anyone sees a byte of it: a
//! `Pages` frame's run table is acted on, and its pages written to guest RAM, only once
//! the frame is known to be the peer's.
use std::time::Duration;

use kvm_hooks::memory::GuestRam;
use openssl::cipher::Cipher;
use openssl::cipher_ctx::CipherCtx;

use crate::protocol::{FrameKind, Header, ProtocolError, HEADER_LEN};
use crate::transport::{Part, SendFence, Transport, TransportError, SHUT_FOR_SENDING};

pub const TAG_LEN: usize = 16;
/// A frame is received in pieces of at most this many bytes.
const RECV_PIECE: usize = 1 << 20;

/// One direction's AES-256-GCM key. Its Debug output never shows the bytes; dropped keys
/// are overwritten.
#[derive(Clone)]
pub struct FrameKey([u8; 32]);

impl FrameKey {
    pub fn new(k: [u8; 32]) -> Self {
        FrameKey(k)
    }
}

impl PartialEq for FrameKey {
    fn eq(&self, other: &Self) -> bool {
        openssl::memcmp::eq(&self.0, &other.0)
    }
}

impl std::fmt::Debug for FrameKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameKey(<redacted>)")
    }
}

impl Drop for FrameKey {
    fn drop(&mut self) {
        self.0.fill(0);
        std::hint::black_box(&self.0);
    }
}

fn nonce(seq: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&seq.to_le_bytes());
    n
}

fn crypto(e: openssl::error::ErrorStack) -> TransportError {
    TransportError::Guest(format!("AES-GCM: {e}"))
}

fn unauthentic(h: &Header) -> TransportError {
    ProtocolError::Unauthentic { kind: h.kind, seq: h.seq }.into()
}

/// A cipher context for the frame with header `hdr`, its header already authenticated.
fn start(key: &FrameKey, hdr: &[u8; HEADER_LEN], seq: u64, encrypt: bool) -> Result<CipherCtx, TransportError> {
    let mut c = CipherCtx::new().map_err(crypto)?;
    let gcm = Some(Cipher::aes_256_gcm());
    if encrypt {
        c.encrypt_init(gcm, Some(&key.0), Some(&nonce(seq))).map_err(crypto)?;
    } else {
        c.decrypt_init(gcm, Some(&key.0), Some(&nonce(seq))).map_err(crypto)?;
    }
    c.cipher_update(hdr, None).map_err(crypto)?;
    Ok(c)
}

/// Whether `frame` (header ‖ payload ‖ tag, at sequence 0) opens under `key`. The receiver
/// uses it to learn which data stream a `Join` is without reading it off the socket.
pub fn opens(key: &FrameKey, frame: &[u8]) -> bool {
    let Some(hdr) = frame.get(..HEADER_LEN) else { return false };
    let hdr: [u8; HEADER_LEN] = hdr.try_into().expect("sliced to HEADER_LEN");
    let Ok(h) = Header::decode(&hdr) else { return false };
    let end = HEADER_LEN + h.len as usize;
    let (Some(body), Some(tag)) = (frame.get(HEADER_LEN..end), frame.get(end..end + TAG_LEN)) else {
        return false;
    };
    let Ok(mut c) = start(key, &hdr, h.seq, false) else { return false };
    let mut plain = body.to_vec();
    c.cipher_update_inplace(&mut plain, body.len()).is_ok() && c.set_tag(tag).is_ok() && c.cipher_final(&mut []).is_ok()
}

/// A received frame whose tag checked out: its plaintext is `Sealed::opened[at..end]`,
/// handed out by the reads that follow its header.
struct Opening {
    header: Header,
    at: usize,
    end: usize,
}

/// A transport whose frames are sealed with per-direction keys.
pub struct Sealed {
    inner: Box<dyn Transport>,
    tx: FrameKey,
    rx: FrameKey,
    /// The nonce of the next frame sealed. It advances when a frame is sealed, not when it
    /// is sent, so no two ciphertexts ever share one.
    next_seq: u64,
    /// A sealed frame failed to go out: nothing is sealed or sent on this connection again.
    fence: SendFence,
    /// The frame being sealed (payload ‖ tag); grows to the largest frame sent.
    staging: Vec<u8>,
    opening: Option<Opening>,
    /// The last frame received (payload ‖ tag), opened in place; grows to the largest
    /// frame received (bounded by the protocol's frame caps, checked with the header).
    opened: Vec<u8>,
}

impl Sealed {
    /// Seal everything `inner` carries from now on: frames sent with `tx`, received with `rx`.
    pub fn new(inner: Box<dyn Transport>, (tx, rx): (FrameKey, FrameKey)) -> Self {
        let next_seq = inner.send_seq();
        Sealed {
            inner,
            tx,
            rx,
            next_seq,
            fence: SendFence::default(),
            staging: Vec::new(),
            opening: None,
            opened: Vec::new(),
        }
    }

    /// Receive the rest of the frame `h` (payload and tag) and open it in place. Nothing of
    /// it is handed out unless its tag checks out; a frame that fails is wiped.
    fn open_frame(&mut self, h: &Header) -> Result<(), TransportError> {
        let len = h.len as usize;
        if self.opened.len() < len + TAG_LEN {
            self.opened.resize(len + TAG_LEN, 0);
        }
        // In pieces: each receive has its own time limit, so a large frame on a slow link
        // is judged by its silences, not by its length.
        for piece in self.opened[..len + TAG_LEN].chunks_mut(RECV_PIECE) {
            self.inner.recv_exact(piece)?;
        }
        let r = (|| {
            let mut c = start(&self.rx, &h.encode(), h.seq, false)?;
            let (payload, tag) = self.opened[..len + TAG_LEN].split_at_mut(len);
            c.cipher_update_inplace(payload, len).map_err(crypto)?;
            c.set_tag(tag).map_err(crypto)?;
            c.cipher_final(&mut []).map(drop).map_err(|_| unauthentic(h))
        })();
        if r.is_err() {
            self.opened[..len].fill(0);
        }
        r
    }

    /// The next `n` bytes of the open frame's plaintext; the frame closes at its end.
    fn take(&mut self, n: u64) -> Result<std::ops::Range<usize>, TransportError> {
        let o = match &mut self.opening {
            Some(o) if (o.end - o.at) as u64 >= n => o,
            Some(o) => {
                return Err(TransportError::Guest(format!(
                    "read of {n} bytes past the end of {:?} frame {} ({} bytes left)",
                    o.header.kind,
                    o.header.seq,
                    o.end - o.at
                )))
            }
            None => return Err(TransportError::Guest(format!("read of {n} payload bytes with no frame open"))),
        };
        let r = o.at..o.at + n as usize;
        o.at = r.end;
        if o.at == o.end {
            self.opening = None;
        }
        Ok(r)
    }
}

impl Transport for Sealed {
    fn send_frame(
        &mut self,
        kind: FrameKind,
        parts: &[Part<'_>],
        ram: Option<&GuestRam>,
    ) -> Result<(), TransportError> {
        self.fence.check()?;
        // The connection below may have failed after its last frame went out (that frame
        // still references the staging buffer in the kernel): seal nothing more.
        if let Some((unsent, why)) = self.inner.unsent() {
            self.fence.close(&why, unsent);
            return Err(TransportError::Broken(why));
        }
        let len32 = crate::transport::payload_len(parts)?;
        let len = len32 as usize;
        // The sequence continues the connection's (the handshake's frames came first).
        let seq = self.next_seq;
        let hdr = Header { kind, len: len32, seq }.encode();
        if self.staging.len() < len + TAG_LEN {
            self.staging.resize(len + TAG_LEN, 0);
        }
        let mut off = 0;
        for p in parts {
            match *p {
                Part::Buf(b) => {
                    self.staging[off..off + b.len()].copy_from_slice(b);
                    off += b.len();
                }
                Part::Guest { gpa, len } => {
                    let ram = ram.ok_or_else(|| TransportError::Guest("guest bytes without guest RAM".into()))?;
                    let n = len as usize;
                    ram.read(gpa, &mut self.staging[off..off + n]).map_err(|e| TransportError::Guest(e.to_string()))?;
                    off += n;
                }
            }
        }
        // From here on the nonce is spent, whatever the send does.
        self.next_seq += 1;
        let sealed = (|| {
            let mut c = start(&self.tx, &hdr, seq, true)?;
            c.cipher_update_inplace(&mut self.staging[..len], len).map_err(crypto)?;
            c.cipher_final(&mut []).map_err(crypto)?;
            c.tag(&mut self.staging[len..len + TAG_LEN]).map_err(crypto)
        })();
        let r = sealed.and_then(|()| self.inner.send_raw(&hdr, &self.staging[..len + TAG_LEN]));
        if let Err(e) = &r {
            self.fence.close(e, seq);
            self.inner.shutdown_write();
        }
        r
    }

    fn recv_header(&mut self) -> Result<Header, TransportError> {
        if let Some(o) = &self.opening {
            return Err(TransportError::Guest(format!(
                "{:?} frame {} was not read to its end ({} bytes left)",
                o.header.kind,
                o.header.seq,
                o.end - o.at
            )));
        }
        // The inner transport checked the header (sequence, kind, the kind's size cap).
        let h = self.inner.recv_header()?;
        self.open_frame(&h)?;
        if h.len > 0 {
            self.opening = Some(Opening { header: h, at: 0, end: h.len as usize });
        }
        Ok(h)
    }

    fn recv_exact(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        let r = self.take(buf.len() as u64)?;
        buf.copy_from_slice(&self.opened[r]);
        Ok(())
    }

    fn recv_into_guest(&mut self, ram: &GuestRam, gpa: u64, len: u64) -> Result<(), TransportError> {
        ram.iovec(gpa, len).map_err(|e| TransportError::Guest(e.to_string()))?;
        let r = self.take(len)?;
        ram.write(gpa, &self.opened[r]).map_err(|e| TransportError::Guest(e.to_string()))
    }

    fn send_raw(&mut self, _hdr: &[u8; HEADER_LEN], _body: &[u8]) -> Result<(), TransportError> {
        Err(TransportError::Guest("raw frames cannot go through a sealed connection".into()))
    }

    fn send_seq(&self) -> u64 {
        self.next_seq
    }

    fn unsent(&self) -> Option<(u64, String)> {
        self.fence.unsent().or_else(|| self.inner.unsent())
    }

    fn shutdown_write(&mut self) {
        self.fence.close(SHUT_FOR_SENDING, self.next_seq);
        self.inner.shutdown_write();
    }

    fn set_recv_timeout(&mut self, t: Duration) {
        self.inner.set_recv_timeout(t);
    }

    fn shutdown(&mut self) {
        self.inner.shutdown();
    }

    fn bytes_sent(&self) -> u64 {
        self.inner.bytes_sent()
    }

    fn flush(&mut self) -> Result<(), TransportError> {
        self.inner.flush()
    }

    fn zc_stats(&self) -> Option<kvm_hooks::uring::ZcStats> {
        self.inner.zc_stats()
    }

    fn describe(&self) -> String {
        format!("{}, sealed (AES-256-GCM)", self.inner.describe())
    }

    fn shutdown_handle(&self) -> Option<std::net::TcpStream> {
        self.inner.shutdown_handle()
    }

    fn wait_readable(&self, timeout: Duration) -> Result<bool, TransportError> {
        self.inner.wait_readable(timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{self, PAGE};
    use crate::transport::TcpTransport;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn key(b: u8) -> FrameKey {
        FrameKey::new([b; 32])
    }

    /// A sealed sender, and the raw socket its frames arrive on.
    fn sender() -> (Sealed, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let t = Box::new(TcpTransport::new(a, Duration::from_secs(5)).unwrap());
        (Sealed::new(t, (key(1), key(2))), b)
    }

    /// A sealed receiver of `bytes`.
    fn receiver(bytes: &[u8], rx: FrameKey) -> Sealed {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        a.write_all(bytes).unwrap();
        drop(a);
        let t = Box::new(TcpTransport::new(b, Duration::from_secs(5)).unwrap());
        Sealed::new(t, (key(7), rx))
    }

    /// Two frames as they go on the wire: an EndOfRound and a Pages frame with guest data.
    fn wire() -> (Vec<u8>, Vec<u8>) {
        let ram = GuestRam::new(64 << 20).unwrap();
        ram.write(PAGE, &[0xab; 2 * PAGE as usize]).unwrap();
        let (mut s, mut raw) = sender();
        s.send_frame(FrameKind::EndOfRound, &[Part::Buf(&protocol::encode_end_of_round(0, 2))], None).unwrap();
        let runs = [protocol::Run { gfn: 1, npages: 2, flags: 0 }];
        let mut meta = Vec::new();
        protocol::encode_pages_meta(1, &runs, &mut meta);
        s.send_frame(FrameKind::Pages, &[Part::Buf(&meta), Part::Guest { gpa: PAGE, len: 2 * PAGE }], Some(&ram))
            .unwrap();
        drop(s);
        let mut all = Vec::new();
        raw.read_to_end(&mut all).unwrap();
        let first = HEADER_LEN + 16 + TAG_LEN;
        (all[..first].to_vec(), all[first..].to_vec())
    }

    fn read_all(r: &mut Sealed, ram: &GuestRam) -> Result<(), TransportError> {
        let h = r.recv_header()?;
        let mut p = vec![0u8; h.len as usize];
        r.recv_exact(&mut p)?;
        let h = r.recv_header()?;
        let mut meta = [0u8; 24];
        r.recv_exact(&mut meta)?;
        r.recv_into_guest(ram, PAGE, u64::from(h.len) - 24)
    }

    #[test]
    fn frames_open_with_the_right_key_only() {
        let (a, b) = wire();
        let ram = GuestRam::new(64 << 20).unwrap();
        read_all(&mut receiver(&[a.clone(), b.clone()].concat(), key(1)), &ram).unwrap();
        let mut page = vec![0u8; PAGE as usize];
        ram.read(2 * PAGE, &mut page).unwrap();
        assert!(page.iter().all(|&x| x == 0xab), "page data arrives in clear after opening");
        assert!(!a.windows(4).any(|w| w == [0xab; 4]) && !b.windows(64).any(|w| w == [0xab; 64]), "sealed on the wire");
        let e = read_all(&mut receiver(&[a.clone(), b.clone()].concat(), key(3)), &ram).unwrap_err();
        assert!(e.to_string().contains("EndOfRound frame 0 failed authentication"), "{e}");
        assert!(opens(&key(1), &a) && !opens(&key(3), &a) && !opens(&key(1), &a[..a.len() - 1]));
    }

    /// Tag before use: a `Pages` frame with one page byte changed fails whole, before its
    /// run table is handed out or any of its pages reaches guest RAM.
    #[test]
    fn a_frame_that_fails_its_tag_writes_nothing() {
        let (a, mut b) = wire();
        b[HEADER_LEN + 24 + 100] ^= 0x01;
        let ram = GuestRam::new(64 << 20).unwrap();
        let mut r = receiver(&[a, b].concat(), key(1));
        let h = r.recv_header().unwrap();
        let mut p = vec![0u8; h.len as usize];
        r.recv_exact(&mut p).unwrap();
        let e = r.recv_header().unwrap_err();
        assert!(e.to_string().contains("Pages frame 1 failed authentication"), "{e}");
        let mut meta = [0u8; 24];
        assert!(r.recv_exact(&mut meta).is_err(), "the run table of a forged frame is handed out");
        assert!(r.recv_into_guest(&ram, PAGE, 2 * PAGE).is_err());
        let mut pages = vec![0u8; 2 * PAGE as usize];
        ram.read(PAGE, &mut pages).unwrap();
        assert!(pages.iter().all(|&x| x == 0), "a forged frame's pages reached guest RAM");
    }

    /// A send that times out on a peer that stopped reading: its nonce is spent, nothing
    /// is sent on the connection again (an `Abort` under the same nonce once leaked the
    /// timed-out frame), and when the peer reads again it finds the frames sent before,
    /// then the timed-out one cut short, then the end of the stream: the frame counted as
    /// not sent never arrives whole.
    #[test]
    fn a_send_that_timed_out_spends_its_nonce_and_is_never_delivered() {
        use crate::transport::{self, TransportMode};
        for mode in [TransportMode::Blocking, TransportMode::Copy, TransportMode::Zerocopy] {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (mut b, _) = l.accept().unwrap();
            let t = transport::wrap(a, mode, None, false, Duration::from_millis(200)).unwrap();
            let mut s = Sealed::new(t, (key(1), key(2)));
            let body = vec![0x5au8; 1 << 20];
            let mut sent = 0u64;
            let err = loop {
                match s.send_frame(FrameKind::State, &[Part::Buf(&body)], None) {
                    Ok(()) => sent += 1,
                    Err(e) => break e,
                }
                assert!(sent < 1024, "{mode:?}: 1 GiB went into a socket nobody reads");
            };
            // A copy send times out with the frame cut short; a zero-copy one may have put
            // the whole frame in the kernel and time out on its notifications: then that
            // frame counts as sent and the next one finds the connection broken.
            let (unsent, _) = s.unsent().expect("the failure is recorded");
            match err {
                TransportError::Timeout(_) => {
                    assert_eq!(unsent, sent, "{mode:?}");
                    assert_eq!(s.send_seq(), sent + 1, "{mode:?}: the timed-out frame spent its nonce");
                }
                TransportError::Broken(ref why) if mode == TransportMode::Zerocopy => {
                    assert!(why.contains("timed out"), "{mode:?}: {why}");
                    assert_eq!(unsent, sent, "{mode:?}");
                }
                e => panic!("{mode:?}: {e}"),
            }
            let again = s.send_frame(FrameKind::Abort, &[Part::Buf(&protocol::encode_abort("x"))], None).unwrap_err();
            assert!(matches!(again, TransportError::Broken(_)), "{mode:?}: {again}");
            // The peer reads again: everything the kernel still holds, then the end.
            b.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let mut all = Vec::new();
            b.read_to_end(&mut all).expect("the sender shut its side: the stream ends");
            let frame = HEADER_LEN + body.len() + TAG_LEN;
            let whole = all.len() / frame;
            assert_eq!(
                whole as u64,
                unsent,
                "{mode:?}: {} bytes arrived: a frame counted as not sent arrived whole",
                all.len()
            );
            for (i, f) in all.chunks(frame).enumerate() {
                let h = Header::decode(f[..HEADER_LEN].try_into().unwrap()).unwrap();
                assert_eq!(h.seq, i as u64, "{mode:?}: frame {i} carries sequence {}", h.seq);
            }
            drop(s);
        }
    }

    #[test]
    fn edits_anywhere_are_refused() {
        let (a, b) = wire();
        let ram = GuestRam::new(64 << 20).unwrap();
        // Header (the round), payload (page data) and tag: every byte counts.
        for at in [HEADER_LEN + 2, HEADER_LEN + 30, b.len() - 5000, b.len() - 1] {
            let mut e = b.clone();
            e[at] ^= 1;
            let err = read_all(&mut receiver(&[a.clone(), e].concat(), key(1)), &ram).unwrap_err().to_string();
            assert!(err.contains("Pages frame 1 failed authentication"), "byte {at}: {err}");
        }
        // A frame that is dropped, replayed or moved does not carry the expected sequence.
        let e = read_all(&mut receiver(&[b.clone()].concat(), key(1)), &ram).unwrap_err().to_string();
        assert!(e.contains("sequence 1, expected 0"), "{e}");
    }
}
