//! Sealed frames: after the handshake (`auth.rs`) every frame on a connection is
//! AES-256-GCM sealed. The 24-byte header travels in clear and is authenticated; the
//! payload is encrypted; a 16-byte tag follows it (the header's `len` does not count it).
//! Each direction of each connection has its own key and the frame's sequence number is
//! its nonce, so a frame that is edited, replayed, reordered, dropped or moved to another
//! connection fails to open.
//!
//! Pages are sealed from a copy: the guest keeps running while a page is sent, and a page
//! that changed between sealing and sending would fail to open on the other side. The
//! receiver opens page data in chunks on its way into guest RAM; a frame that fails to open
//! fails the migration, and a destination never resumes after a failure.
use std::time::Duration;

use kvm_hooks::memory::GuestRam;
use openssl::cipher::Cipher;
use openssl::cipher_ctx::CipherCtx;

use crate::protocol::{FrameKind, Header, ProtocolError, HEADER_LEN};
use crate::transport::{Part, Transport, TransportError};

pub const TAG_LEN: usize = 16;
/// Page data is opened in pieces of at most this many bytes.
const CHUNK: usize = 1 << 20;

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

/// The frame being opened: what is left of its payload.
struct Opening {
    header: Header,
    ctx: CipherCtx,
    left: u64,
}

/// A transport whose frames are sealed with per-direction keys.
pub struct Sealed {
    inner: Box<dyn Transport>,
    tx: FrameKey,
    rx: FrameKey,
    /// The frame being sealed (payload ‖ tag); grows to the largest frame sent.
    staging: Vec<u8>,
    opening: Option<Opening>,
    /// Page data on its way into guest RAM, opened a chunk at a time.
    bounce: Vec<u8>,
}

impl Sealed {
    /// Seal everything `inner` carries from now on: frames sent with `tx`, received with `rx`.
    pub fn new(inner: Box<dyn Transport>, (tx, rx): (FrameKey, FrameKey)) -> Self {
        Sealed { inner, tx, rx, staging: Vec::new(), opening: None, bounce: Vec::new() }
    }

    /// Account for `n` payload bytes just opened; at the frame's end check its tag.
    fn consumed(&mut self, n: usize) -> Result<(), TransportError> {
        let o = self.opening.as_mut().expect("checked by the caller");
        o.left -= n as u64;
        if o.left == 0 {
            self.finish_frame()?;
        }
        Ok(())
    }

    fn finish_frame(&mut self) -> Result<(), TransportError> {
        let mut o = self.opening.take().expect("a frame is open");
        let mut tag = [0u8; TAG_LEN];
        self.inner.recv_exact(&mut tag)?;
        o.ctx.set_tag(&tag).map_err(crypto)?;
        o.ctx.cipher_final(&mut []).map_err(|_| unauthentic(&o.header))?;
        Ok(())
    }

    /// Check that a frame is open with at least `n` payload bytes left.
    fn check_left(&self, n: u64) -> Result<(), TransportError> {
        match &self.opening {
            Some(o) if o.left >= n => Ok(()),
            Some(o) => Err(TransportError::Guest(format!(
                "read of {n} bytes past the end of {:?} frame {} ({} bytes left)",
                o.header.kind, o.header.seq, o.left
            ))),
            None => Err(TransportError::Guest(format!("read of {n} payload bytes with no frame open"))),
        }
    }
}

impl Transport for Sealed {
    fn send_frame(
        &mut self,
        kind: FrameKind,
        parts: &[Part<'_>],
        ram: Option<&GuestRam>,
    ) -> Result<(), TransportError> {
        let len32 = crate::transport::payload_len(parts)?;
        let len = len32 as usize;
        // The sequence continues the connection's (the handshake's frames came first).
        let seq = self.inner.send_seq();
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
        let mut c = start(&self.tx, &hdr, seq, true)?;
        c.cipher_update_inplace(&mut self.staging[..len], len).map_err(crypto)?;
        c.cipher_final(&mut []).map_err(crypto)?;
        c.tag(&mut self.staging[len..len + TAG_LEN]).map_err(crypto)?;
        self.inner.send_raw(&hdr, &self.staging[..len + TAG_LEN])
    }

    fn recv_header(&mut self) -> Result<Header, TransportError> {
        if let Some(o) = &self.opening {
            return Err(TransportError::Guest(format!(
                "{:?} frame {} was not read to its end ({} bytes left)",
                o.header.kind, o.header.seq, o.left
            )));
        }
        let h = self.inner.recv_header()?;
        let ctx = start(&self.rx, &h.encode(), h.seq, false)?;
        self.opening = Some(Opening { header: h, ctx, left: u64::from(h.len) });
        if h.len == 0 {
            self.finish_frame()?;
        }
        Ok(h)
    }

    fn recv_exact(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        self.check_left(buf.len() as u64)?;
        self.inner.recv_exact(buf)?;
        let o = self.opening.as_mut().expect("checked above");
        o.ctx.cipher_update_inplace(buf, buf.len()).map_err(crypto)?;
        self.consumed(buf.len())
    }

    fn recv_into_guest(&mut self, ram: &GuestRam, gpa: u64, len: u64) -> Result<(), TransportError> {
        ram.iovec(gpa, len).map_err(|e| TransportError::Guest(e.to_string()))?;
        self.check_left(len)?;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            if self.bounce.len() < n {
                self.bounce.resize(n, 0);
            }
            self.inner.recv_exact(&mut self.bounce[..n])?;
            let o = self.opening.as_mut().expect("checked above");
            o.ctx.cipher_update_inplace(&mut self.bounce[..n], n).map_err(crypto)?;
            ram.write(gpa + done, &self.bounce[..n]).map_err(|e| TransportError::Guest(e.to_string()))?;
            done += n as u64;
            self.consumed(n)?;
        }
        Ok(())
    }

    fn send_raw(&mut self, _hdr: &[u8; HEADER_LEN], _body: &[u8]) -> Result<(), TransportError> {
        Err(TransportError::Guest("raw frames cannot go through a sealed connection".into()))
    }

    fn send_seq(&self) -> u64 {
        self.inner.send_seq()
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
