//! Sealed frames: after the handshake (`wire::auth`) every frame on a connection is sealed
//! with AEGIS-256X4. The 24-byte header travels in clear; the payload is cut into records
//! of [`RECORD`] bytes (the last one shorter, at least one record even for an empty
//! payload), each encrypted and followed by its 16-byte tag (the header's `len` counts
//! neither tags). Every record authenticates the header too. Each direction of each
//! connection has its own key, and a record's nonce is its frame's sequence number and its
//! index in the frame, so a record or frame that is edited, replayed, reordered, dropped,
//! cut short or moved to another connection fails to open.
//!
//! One pass on each side, in cache-sized pieces: a record is sealed straight from guest
//! RAM into a send buffer of one record and sent from there (the guest keeps running, and
//! the sealed copy is what goes out, so a page that changes during the send cannot make
//! the frame fail to open); a received record is opened in place and then copied to guest
//! RAM. Nothing of a record is handed out before its tag checks out: a `Pages` frame's
//! run table (in its first record, with the header) is acted on, and each page written to
//! guest RAM, only once the bytes are known to be the peer's.
//! `docs/security.md` says why AEGIS-256X4 and records, and what was measured.
use std::time::Duration;

use aegis::aegis256x4::Aegis256X4;
use kvm_hooks::memory::GuestRam;

use super::frame::{FrameKind, Header, ProtocolError, HEADER_LEN};
use super::framer::{Framer, SHUT_FOR_SENDING};
use super::transport::{Part, Transport, TransportError};

pub const TAG_LEN: usize = 16;
/// Plaintext bytes of a record: small enough that a record being sealed or opened stays
/// in cache between the cipher and the socket copy.
pub const RECORD: usize = 256 << 10;

/// The frame cipher: AEGIS-256X4 with a 256-bit key, a 256-bit nonce and a 128-bit tag.
type Aead = Aegis256X4<TAG_LEN>;

/// Records of a payload of `len` bytes (an empty payload still has one, which
/// authenticates the header).
fn records(len: usize) -> usize {
    len.div_ceil(RECORD).max(1)
}

/// Bytes on the wire after the header of a sealed frame whose payload is `len` bytes.
pub fn wire_len(len: usize) -> usize {
    len + records(len) * TAG_LEN
}

/// One direction's 256-bit key. Its Debug output never shows the bytes; dropped keys are
/// overwritten.
#[derive(Clone)]
pub struct FrameKey([u8; 32]);

impl FrameKey {
    pub fn new(k: [u8; 32]) -> Self {
        FrameKey(k)
    }

    fn aead(&self, seq: u64, record: u32) -> Aead {
        Aead::new(&self.0, &nonce(seq, record))
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

/// The nonce of record `record` of the frame with sequence number `seq`: a key seals at
/// most one record per pair, and the sequence never repeats on a connection.
fn nonce(seq: u64, record: u32) -> [u8; 32] {
    let mut n = [0u8; 32];
    n[..8].copy_from_slice(&seq.to_le_bytes());
    n[8..12].copy_from_slice(&record.to_le_bytes());
    n
}

fn unauthentic(h: &Header) -> TransportError {
    ProtocolError::Unauthentic { kind: h.kind, seq: h.seq }.into()
}

/// Open record `record` (`ciphertext ‖ tag`) of the frame with header `hdr` in place. On
/// failure the record is wiped.
fn open_in_place(key: &FrameKey, hdr: &[u8; HEADER_LEN], seq: u64, record: u32, sealed: &mut [u8]) -> bool {
    let (payload, tag) = sealed.split_at_mut(sealed.len() - TAG_LEN);
    let tag: &[u8; TAG_LEN] = (&*tag).try_into().expect("split at TAG_LEN");
    let ok = key.aead(seq, record).decrypt_in_place(payload, tag, hdr).is_ok();
    if !ok {
        payload.fill(0);
    }
    ok
}

/// Whether `frame` (header ‖ one record, at sequence 0) opens under `key`. The receiver
/// uses it to learn which data stream a `Join` is without reading it off the socket.
pub fn opens(key: &FrameKey, frame: &[u8]) -> bool {
    let Some(hdr) = frame.get(..HEADER_LEN) else { return false };
    let hdr: [u8; HEADER_LEN] = hdr.try_into().expect("sliced to HEADER_LEN");
    let Ok(h) = Header::decode(&hdr) else { return false };
    let len = h.len as usize;
    if records(len) != 1 {
        return false;
    }
    let Some(sealed) = frame.get(HEADER_LEN..HEADER_LEN + wire_len(len)) else { return false };
    open_in_place(key, &hdr, h.seq, 0, &mut sealed.to_vec())
}

/// Where sealing has got to in a frame's parts: part `part`, byte `at` of it.
struct Cursor {
    part: usize,
    at: u64,
}

impl Cursor {
    /// Seal the next `out.len()` bytes of `parts` into `out`.
    fn seal(
        &mut self,
        e: &mut aegis::aegis256x4::Encryptor<TAG_LEN>,
        parts: &[Part<'_>],
        ram: Option<&GuestRam>,
        out: &mut [u8],
    ) -> Result<(), TransportError> {
        let mut off = 0;
        while off < out.len() {
            let p = *parts.get(self.part).ok_or_else(|| TransportError::Guest("frame parts end early".into()))?;
            let plen = match p {
                Part::Buf(b) => b.len() as u64,
                Part::Guest { len, .. } => len,
            };
            let n = (plen - self.at).min((out.len() - off) as u64);
            let dst = &mut out[off..off + n as usize];
            match p {
                Part::Buf(b) => e.update(&b[self.at as usize..(self.at + n) as usize], dst),
                Part::Guest { gpa, .. } => {
                    let ram = ram.ok_or_else(|| TransportError::Guest("guest bytes without guest RAM".into()))?;
                    // Straight from guest RAM into the sealed buffer.
                    ram.with_bytes(gpa + self.at, n, |b| e.update(b, dst))
                        .map_err(|e| TransportError::Guest(e.to_string()))?;
                }
            }
            off += n as usize;
            self.at += n;
            if self.at == plen {
                self.part += 1;
                self.at = 0;
            }
        }
        Ok(())
    }
}

/// The frame being read: its header, the record open in `Sealed::opened[at..end]`, and
/// what is still to come.
struct Opening {
    header: Header,
    /// Index of the next record to open.
    record: u32,
    at: usize,
    end: usize,
    /// Payload bytes in records not yet received.
    left: usize,
}

/// A transport whose frames are sealed with per-direction keys.
pub struct Sealed {
    inner: Box<dyn Transport>,
    tx: FrameKey,
    rx: FrameKey,
    /// Sealed frames' sequence numbers, which are their nonces, and the fence: a sealed
    /// frame that failed to go out stops all sealing on this connection. The number
    /// advances when a frame is sealed, not when it is sent, so no two ciphertexts ever
    /// share a nonce. Received headers are checked by the transport below.
    framer: Framer,
    /// The record being sealed (ciphertext ‖ tag).
    staging: Vec<u8>,
    opening: Option<Opening>,
    /// The last record received (ciphertext ‖ tag), opened in place.
    opened: Vec<u8>,
}

impl Sealed {
    /// Seal everything `inner` carries from now on: frames sent with `tx`, received with `rx`.
    pub fn new(inner: Box<dyn Transport>, (tx, rx): (FrameKey, FrameKey)) -> Self {
        let framer = Framer::resume(inner.send_seq(), 0);
        Sealed { inner, tx, rx, framer, staging: Vec::new(), opening: None, opened: Vec::new() }
    }

    /// Seal frame `seq` record by record and send each record as it is sealed.
    fn seal_and_send(
        &mut self,
        hdr: &[u8; HEADER_LEN],
        seq: u64,
        len: usize,
        parts: &[Part<'_>],
        ram: Option<&GuestRam>,
    ) -> Result<(), TransportError> {
        let n = records(len);
        let mut cur = Cursor { part: 0, at: 0 };
        for i in 0..n {
            let rlen = (len - i * RECORD).min(RECORD);
            if self.staging.len() < rlen + TAG_LEN {
                self.staging.resize(rlen + TAG_LEN, 0);
            }
            let mut e = self.tx.aead(seq, i as u32).encryptor(hdr);
            cur.seal(&mut e, parts, ram, &mut self.staging[..rlen])?;
            self.staging[rlen..rlen + TAG_LEN].copy_from_slice(&e.finalize());
            self.inner.send_raw((i == 0).then_some(hdr), &self.staging[..rlen + TAG_LEN], i + 1 == n)?;
        }
        Ok(())
    }

    /// Receive the next record of the open frame and open it in place. Nothing of it is
    /// handed out unless its tag checks out; a record that fails is wiped.
    fn open_record(&mut self) -> Result<(), TransportError> {
        let o = self.opening.as_mut().expect("a frame is open");
        let rlen = o.left.min(RECORD);
        if self.opened.len() < rlen + TAG_LEN {
            self.opened.resize(rlen + TAG_LEN, 0);
        }
        let rec = &mut self.opened[..rlen + TAG_LEN];
        self.inner.recv_exact(rec)?;
        if !open_in_place(&self.rx, &o.header.encode(), o.header.seq, o.record, rec) {
            let e = unauthentic(&o.header);
            self.opening = None;
            return Err(e);
        }
        o.record += 1;
        o.left -= rlen;
        o.at = 0;
        o.end = rlen;
        Ok(())
    }

    /// Hand the next `n` bytes of the open frame's plaintext to `to`, record by record;
    /// the frame closes at its end.
    fn take(
        &mut self,
        n: usize,
        mut to: impl FnMut(usize, &[u8]) -> Result<(), TransportError>,
    ) -> Result<(), TransportError> {
        match &self.opening {
            Some(o) if o.end - o.at + o.left >= n => {}
            Some(o) => {
                return Err(TransportError::Guest(format!(
                    "read of {n} bytes past the end of {:?} frame {} ({} bytes left)",
                    o.header.kind,
                    o.header.seq,
                    o.end - o.at + o.left
                )))
            }
            None => return Err(TransportError::Guest(format!("read of {n} payload bytes with no frame open"))),
        }
        let mut done = 0;
        while done < n {
            let o = self.opening.as_mut().expect("checked above");
            if o.at == o.end {
                self.open_record()?;
                continue;
            }
            let k = (o.end - o.at).min(n - done);
            let at = o.at;
            o.at += k;
            to(done, &self.opened[at..at + k])?;
            done += k;
        }
        if let Some(o) = &self.opening {
            if o.at == o.end && o.left == 0 {
                self.opening = None;
            }
        }
        Ok(())
    }
}

impl Transport for Sealed {
    fn send_frame(
        &mut self,
        kind: FrameKind,
        parts: &[Part<'_>],
        ram: Option<&GuestRam>,
    ) -> Result<(), TransportError> {
        self.framer.check_open()?;
        // The connection below may have failed after its last frame went out (that frame
        // still references the staging buffer in the kernel): seal nothing more.
        if let Some((unsent, why)) = self.inner.unsent() {
            self.framer.close_at(&why, unsent);
            return Err(TransportError::Broken(why));
        }
        // The sequence continues the connection's (the handshake's frames came first).
        let h = self.framer.header(kind, parts)?;
        let (hdr, seq, len) = (h.encode(), h.seq, h.len as usize);
        // From here on the frame's nonces are spent, whatever the send does.
        self.framer.sent();
        let r = self.seal_and_send(&hdr, seq, len, parts, ram);
        if let Err(e) = &r {
            self.framer.close_at(e, seq);
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
                o.end - o.at + o.left
            )));
        }
        // The inner transport checked the header (sequence, kind, the kind's size cap).
        let h = self.inner.recv_header()?;
        // The first record authenticates the header before it is handed out.
        self.opening = Some(Opening { header: h, record: 0, at: 0, end: 0, left: h.len as usize });
        self.open_record()?;
        if h.len == 0 {
            self.opening = None;
        }
        Ok(h)
    }

    fn recv_exact(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        self.take(buf.len(), |at, b| {
            buf[at..at + b.len()].copy_from_slice(b);
            Ok(())
        })
    }

    fn recv_into_guest(&mut self, ram: &GuestRam, gpa: u64, len: u64) -> Result<(), TransportError> {
        ram.iovec(gpa, len).map_err(|e| TransportError::Guest(e.to_string()))?;
        let n = usize::try_from(len).map_err(|_| TransportError::Guest(format!("read of {len} bytes")))?;
        self.take(n, |at, b| ram.write(gpa + at as u64, b).map_err(|e| TransportError::Guest(e.to_string())))
    }

    fn send_raw(&mut self, _: Option<&[u8; HEADER_LEN]>, _: &[u8], _: bool) -> Result<(), TransportError> {
        Err(TransportError::Guest("raw frames cannot go through a sealed connection".into()))
    }

    fn framer(&self) -> &Framer {
        &self.framer
    }

    fn framer_mut(&mut self) -> &mut Framer {
        &mut self.framer
    }

    fn unsent(&self) -> Option<(u64, String)> {
        self.framer.unsent().or_else(|| self.inner.unsent())
    }

    fn shutdown_write(&mut self) {
        self.framer.close(SHUT_FOR_SENDING);
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
        format!("{}, sealed (AEGIS-256X4)", self.inner.describe())
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
    use crate::wire::frame::PAGE;
    use crate::wire::payload;
    use crate::wire::transport::TcpTransport;
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
        s.send_frame(FrameKind::EndOfRound, &[Part::Buf(&payload::EndOfRound { round: 0, pages: 2 }.encode())], None)
            .unwrap();
        let runs = [payload::Run { gfn: 1, npages: 2, flags: 0 }];
        let mut meta = Vec::new();
        payload::PagesHead::encode(1, &runs, &mut meta);
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
        use crate::wire::connect;
        use crate::wire::transport::TransportMode;
        for mode in [TransportMode::Blocking, TransportMode::Copy, TransportMode::Zerocopy] {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (mut b, _) = l.accept().unwrap();
            let t = connect::wrap(a, mode, None, false, Duration::from_millis(200)).unwrap();
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
            let again = s.send_frame(FrameKind::Abort, &[Part::Buf(&payload::Abort::encode("x"))], None).unwrap_err();
            assert!(matches!(again, TransportError::Broken(_)), "{mode:?}: {again}");
            // The peer reads again: everything the kernel still holds, then the end.
            b.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let mut all = Vec::new();
            b.read_to_end(&mut all).expect("the sender shut its side: the stream ends");
            let frame = HEADER_LEN + wire_len(body.len());
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

    /// One `Pages` frame of 3 MiB of guest data (a run of 768 pages from gfn 16, each page
    /// filled with its gfn's low byte), as it goes on the wire: header, then 13 records.
    fn large_frame() -> Vec<u8> {
        let ram = GuestRam::new(64 << 20).unwrap();
        for g in 16..16 + 768u64 {
            ram.write(g * PAGE, &[g as u8; PAGE as usize]).unwrap();
        }
        let (mut s, mut raw) = sender();
        let runs = [payload::Run { gfn: 16, npages: 768, flags: 0 }];
        let mut meta = Vec::new();
        payload::PagesHead::encode(1, &runs, &mut meta);
        s.send_frame(
            FrameKind::Pages,
            &[Part::Buf(&meta), Part::Guest { gpa: 16 * PAGE, len: 768 * PAGE }],
            Some(&ram),
        )
        .unwrap();
        drop(s);
        let mut all = Vec::new();
        raw.read_to_end(&mut all).unwrap();
        assert_eq!(all.len(), HEADER_LEN + wire_len(24 + 768 * PAGE as usize));
        assert_eq!(records(24 + 768 * PAGE as usize), 13);
        all
    }

    /// Receive `large_frame`'s bytes into `ram`.
    fn read_large(bytes: &[u8], ram: &GuestRam) -> Result<(), TransportError> {
        let mut r = receiver(bytes, key(1));
        let h = r.recv_header()?;
        let mut meta = [0u8; 24];
        r.recv_exact(&mut meta)?;
        r.recv_into_guest(ram, 16 * PAGE, u64::from(h.len) - 24)
    }

    /// Where record `i` of `large_frame` starts on the wire.
    fn record_at(i: usize) -> usize {
        HEADER_LEN + i * (RECORD + TAG_LEN)
    }

    #[test]
    fn a_frame_of_many_records_arrives_whole_and_in_order() {
        let wire = large_frame();
        let ram = GuestRam::new(64 << 20).unwrap();
        read_large(&wire, &ram).unwrap();
        for g in 16..16 + 768u64 {
            assert_eq!(ram.read_u64(g * PAGE).unwrap(), u64::from_le_bytes([g as u8; 8]), "gfn {g}");
        }
        // Two records swapped: each carries its index in its nonce.
        let mut swapped = wire.clone();
        let (a, b) = (record_at(2), record_at(3));
        let rec = RECORD + TAG_LEN;
        let second = swapped[b..b + rec].to_vec();
        swapped.copy_within(a..a + rec, b);
        swapped[a..a + rec].copy_from_slice(&second);
        let e = read_large(&swapped, &GuestRam::new(64 << 20).unwrap()).unwrap_err();
        assert!(e.to_string().contains("Pages frame 0 failed authentication"), "{e}");
        // The last record dropped: the frame never completes.
        let e = read_large(&wire[..record_at(12)], &GuestRam::new(64 << 20).unwrap()).unwrap_err();
        assert!(matches!(e, TransportError::Closed), "{e}");
        // A record replayed in place of the next one.
        let mut replayed = wire.clone();
        replayed.copy_within(record_at(4)..record_at(5), record_at(5));
        let e = read_large(&replayed, &GuestRam::new(64 << 20).unwrap()).unwrap_err();
        assert!(e.to_string().contains("Pages frame 0 failed authentication"), "{e}");
    }

    /// A forged record stops the frame there: the records before it are the peer's and may
    /// have landed; nothing of the forged record, or of any after it, reaches guest RAM.
    #[test]
    fn a_forged_record_writes_none_of_its_pages() {
        let mut wire = large_frame();
        wire[record_at(5) + 1000] ^= 0x40;
        let ram = GuestRam::new(64 << 20).unwrap();
        let e = read_large(&wire, &ram).unwrap_err();
        assert!(e.to_string().contains("Pages frame 0 failed authentication"), "{e}");
        // Payload bytes before record 5: the 24-byte run table, then page data.
        let first_unverified = (5 * RECORD - 24) as u64;
        for g in 16..16 + 768u64 {
            let off = (g - 16) * PAGE;
            let got = ram.read_u64(g * PAGE).unwrap();
            if off + PAGE <= first_unverified {
                assert_eq!(got, u64::from_le_bytes([g as u8; 8]), "gfn {g}, before the forged record");
            } else if off >= first_unverified {
                let mut page = vec![0u8; PAGE as usize];
                ram.read(g * PAGE, &mut page).unwrap();
                assert!(page.iter().all(|&b| b == 0), "gfn {g}: bytes of a forged record reached guest RAM");
            }
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
