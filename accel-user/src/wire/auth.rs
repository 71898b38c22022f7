//! Mutual authentication of a migration with a pre-shared key, and the keys that seal its
//! frames ([`super::seal`]).
//!
//! The handshake is the first thing on the control connection (plain frames):
//! ```text
//! S→D AuthInit     suite u32, reserved u32, nonce_s [32], X25519 public e_s [32]
//! D→S AuthReply    suite u32, reserved u32, nonce_d [32], X25519 public e_d [32], proof_d [32]
//! S→D AuthConfirm  proof_s [32]
//!
//! th      = SHA-256(AuthInit frame ‖ AuthReply frame without proof_d)
//! secret  = HKDF-Extract(salt = nonce_s ‖ nonce_d, ikm = psk ‖ X25519(e_s, e_d))
//! proof_d = HKDF-Expand(secret, "migaccel/4 destination proof" ‖ th)
//! proof_s = HKDF-Expand(secret, "migaccel/4 source proof" ‖ th)
//! key     = HKDF-Expand(secret, "migaccel/4 key " ‖ stream ‖ direction ‖ th)
//! ```
//! The destination proves that it holds the key before the source sends anything of the
//! VM; the source proves it before the destination creates a VM. Both sides' nonces and
//! ephemeral keys enter every key, so a recorded migration opens under no later session,
//! and pages recorded today stay secret if the pre-shared key leaks later.
use openssl::derive::Deriver;
use openssl::hash::MessageDigest;
use openssl::pkey::{Id, PKey};
use openssl::sign::Signer;

use crate::wire::frame::{self, FrameKind, Header};
use crate::wire::keys::TransportKey;
use crate::wire::payload;
use crate::wire::seal::FrameKey;
use crate::wire::transport::{Part, Transport, TransportError};

/// X25519, HKDF-SHA-256, pre-shared key; frames sealed with AEGIS-256X4 in records.
pub const SUITE: u32 = 2;
/// The handshake frames' lengths (the wire format's, named here as the handshake uses them).
pub use crate::wire::frame::{AUTH_CONFIRM_LEN as CONFIRM_LEN, AUTH_INIT_LEN as INIT_LEN, AUTH_REPLY_LEN as REPLY_LEN};
const LABEL: &[u8] = b"migaccel/4 ";

/// Which end of the migration this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Source,
    Destination,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("authentication handshake: {0}")]
    Transport(#[from] TransportError),
    #[error("authentication handshake: the peer sent {0:?} where {1:?} was expected")]
    Unexpected(FrameKind, FrameKind),
    #[error("authentication handshake: the peer refused: {0}")]
    Refused(String),
    #[error("authentication handshake: the peer offers cipher suite {0}; this build speaks suite {SUITE}")]
    Suite(u32),
    #[error("authentication failed: the {0} does not hold the same key (auth.key_file differs on the two hosts, auth.destination_id names another host, or the handshake was tampered with)")]
    BadProof(Role),
    #[error("authentication handshake: crypto: {0}")]
    Crypto(#[from] openssl::error::ErrorStack),
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Source => "source",
            Role::Destination => "destination",
        })
    }
}

/// What a completed handshake yields: the secret every frame key derives from.
pub struct SessionKeys {
    secret: [u8; 32],
    th: [u8; 32],
    role: Role,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionKeys").field("role", &self.role).finish_non_exhaustive()
    }
}

impl Drop for SessionKeys {
    fn drop(&mut self) {
        self.secret.fill(0);
        std::hint::black_box(&self.secret);
    }
}

/// Which connection a key seals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conn {
    Control,
    Data(u32),
    /// The source's `i`-th handover query of the session: each has keys of its own, so no
    /// two query connections ever seal under one key and nonce.
    Query(u32),
}

/// Most handover queries one session may make.
pub const MAX_QUERIES: u32 = 32;

impl SessionKeys {
    /// What `who` sends to prove it holds the pre-shared key.
    fn proof(&self, who: Role) -> Result<[u8; 32], AuthError> {
        let label: &[u8] = match who {
            Role::Source => b"source proof",
            Role::Destination => b"destination proof",
        };
        expand(&self.secret, &[LABEL, label, &self.th])
    }

    /// This side's (send, receive) keys for `conn`.
    pub fn keys(&self, conn: Conn) -> Result<(FrameKey, FrameKey), AuthError> {
        let name = match conn {
            Conn::Control => "control".to_string(),
            Conn::Data(i) => format!("data {i}"),
            Conn::Query(i) => format!("query {i}"),
        };
        let s2d = FrameKey::new(expand(&self.secret, &[LABEL, b"key ", name.as_bytes(), b" s2d", &self.th])?);
        let d2s = FrameKey::new(expand(&self.secret, &[LABEL, b"key ", name.as_bytes(), b" d2s", &self.th])?);
        Ok(match self.role {
            Role::Source => (s2d, d2s),
            Role::Destination => (d2s, s2d),
        })
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> Result<[u8; 32], AuthError> {
    let k = PKey::hmac(key)?;
    let mut s = Signer::new(MessageDigest::sha256(), &k)?;
    for p in parts {
        s.update(p)?;
    }
    let mut out = [0u8; 32];
    s.sign(&mut out)?;
    Ok(out)
}

/// HKDF-Expand (RFC 5869) for one 32-byte block: `HMAC(prk, info ‖ 0x01)`.
fn expand(prk: &[u8; 32], info: &[&[u8]]) -> Result<[u8; 32], AuthError> {
    let mut parts: Vec<&[u8]> = info.to_vec();
    parts.push(&[1]);
    hmac(prk, &parts)
}

fn random32() -> Result<[u8; 32], AuthError> {
    let mut b = [0u8; 32];
    openssl::rand::rand_bytes(&mut b)?;
    Ok(b)
}

/// An ephemeral X25519 key pair: (private key, raw public key).
fn ephemeral() -> Result<(PKey<openssl::pkey::Private>, [u8; 32]), AuthError> {
    let k = PKey::generate_x25519()?;
    let raw = k.raw_public_key()?;
    let mut p = [0u8; 32];
    p.copy_from_slice(&raw);
    Ok((k, p))
}

/// Overwrite key material that is no longer needed.
fn wipe(b: &mut [u8]) {
    b.fill(0);
    std::hint::black_box(b);
}

fn shared(mine: &PKey<openssl::pkey::Private>, theirs: &[u8]) -> Result<Vec<u8>, AuthError> {
    let peer = PKey::public_key_from_raw_bytes(theirs, Id::X25519)?;
    let mut d = Deriver::new(mine)?;
    d.set_peer(&peer)?;
    Ok(d.derive_to_vec()?)
}

/// The session's secret and transcript hash. `init` and `reply` are the handshake frames as
/// they go on the wire (header, then payload; the reply without its proof, its header's
/// length still counting it).
fn schedule(
    psk: &TransportKey,
    nonce_s: &[u8],
    nonce_d: &[u8],
    dh: &[u8],
    init: (&Header, &[u8]),
    reply: (&Header, &[u8]),
    role: Role,
) -> Result<SessionKeys, AuthError> {
    let salt = [nonce_s, nonce_d].concat();
    let secret = hmac(&salt, &[&psk.0, dh])?;
    let mut h = openssl::sha::Sha256::new();
    for (hdr, payload) in [init, reply] {
        h.update(&hdr.encode());
        h.update(payload);
    }
    Ok(SessionKeys { secret, th: h.finish(), role })
}

/// The part of `AuthInit` and `AuthReply` both sides send alike: suite, nonce, key share.
fn key_share(nonce: &[u8; 32], public: &[u8; 32], capacity: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(capacity);
    v.extend_from_slice(&SUITE.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(nonce);
    v.extend_from_slice(public);
    v
}

/// Receive one handshake frame of `want` (an `Abort` says why the peer gave up). The
/// header is checked before anything is allocated or read: from a peer that has not
/// authenticated, only `want`'s exact size, or an `Abort` (at most 1,028 bytes, its cap),
/// is ever read.
fn recv(t: &mut dyn Transport, want: FrameKind) -> Result<(Header, Vec<u8>), AuthError> {
    let h = t.recv_header()?;
    if h.kind == FrameKind::Abort {
        let mut p = vec![0u8; h.len as usize]; // at most Abort's cap, checked by Header::decode
        t.recv_exact(&mut p)?;
        return Err(AuthError::Refused(payload::Abort::decode(&p).map(|a| a.reason).unwrap_or_else(|e| e.to_string())));
    }
    if h.kind != want {
        return Err(AuthError::Unexpected(h.kind, want));
    }
    let need = want.max_len();
    if h.len != need {
        return Err(TransportError::Protocol(frame::ProtocolError::Payload {
            kind: want,
            msg: format!("{} bytes, expected {need}", h.len),
        })
        .into());
    }
    let mut p = vec![0u8; need as usize];
    t.recv_exact(&mut p)?;
    Ok((h, p))
}

fn check_suite(p: &[u8]) -> Result<(), AuthError> {
    let suite = u32::from_le_bytes(p[0..4].try_into().expect("4"));
    if suite != SUITE {
        return Err(AuthError::Suite(suite));
    }
    Ok(())
}

/// The source's side of the handshake on the control connection `t` (fresh: nothing sent
/// or received on it yet).
pub fn source(t: &mut dyn Transport, psk: &TransportKey) -> Result<SessionKeys, AuthError> {
    let nonce_s = random32()?;
    let (e_s, pub_s) = ephemeral()?;
    let init = key_share(&nonce_s, &pub_s, INIT_LEN);
    let init_h = Header { kind: FrameKind::AuthInit, len: INIT_LEN as u32, seq: t.send_seq() };
    t.send_frame(FrameKind::AuthInit, &[Part::Buf(&init)], None)?;
    let (h, reply) = recv(t, FrameKind::AuthReply)?;
    check_suite(&reply)?;
    let (nonce_d, pub_d, proof_d) = (&reply[8..40], &reply[40..72], &reply[72..104]);
    let mut dh = shared(&e_s, pub_d)?;
    let keys = schedule(psk, &nonce_s, nonce_d, &dh, (&init_h, &init), (&h, &reply[..72]), Role::Source);
    wipe(&mut dh);
    let keys = keys?;
    if !openssl::memcmp::eq(&keys.proof(Role::Destination)?, proof_d) {
        return Err(AuthError::BadProof(Role::Destination));
    }
    t.send_frame(FrameKind::AuthConfirm, &[Part::Buf(&keys.proof(Role::Source)?)], None)?;
    Ok(keys)
}

/// The destination's side of the handshake on a control connection whose first frame is an
/// `AuthInit`. A peer that fails is told only that authentication failed.
pub fn destination(t: &mut dyn Transport, psk: &TransportKey) -> Result<SessionKeys, AuthError> {
    let half = destination_reply(t, psk)?;
    destination_confirm(t, half)
}

/// A destination's handshake that answered `AuthInit` and waits for the source's proof.
/// Holding one costs a few hundred bytes, so a receiver can keep many while it waits for
/// the real source, none of them on a thread of its own.
#[derive(Debug)]
pub struct AwaitingConfirm(SessionKeys);

/// The destination's first half: read `AuthInit` and send `AuthReply` (with the
/// destination's proof). Neither blocks on a peer whose `AuthInit` has arrived whole.
pub fn destination_reply(t: &mut dyn Transport, psk: &TransportKey) -> Result<AwaitingConfirm, AuthError> {
    let (h, init) = recv(t, FrameKind::AuthInit)?;
    check_suite(&init)?;
    let (nonce_s, pub_s) = (&init[8..40], &init[40..72]);
    let nonce_d = random32()?;
    let (e_d, pub_d) = ephemeral()?;
    let mut reply = key_share(&nonce_d, &pub_d, REPLY_LEN);
    let mut dh = shared(&e_d, pub_s)?;
    let reply_h = Header { kind: FrameKind::AuthReply, len: REPLY_LEN as u32, seq: t.send_seq() };
    let keys = schedule(psk, nonce_s, &nonce_d, &dh, (&h, &init), (&reply_h, &reply), Role::Destination);
    wipe(&mut dh);
    let keys = keys?;
    reply.extend_from_slice(&keys.proof(Role::Destination)?);
    t.send_frame(FrameKind::AuthReply, &[Part::Buf(&reply)], None)?;
    Ok(AwaitingConfirm(keys))
}

/// The destination's second half: read the source's `AuthConfirm` and check its proof.
pub fn destination_confirm(t: &mut dyn Transport, half: AwaitingConfirm) -> Result<SessionKeys, AuthError> {
    let keys = half.0;
    let (_, proof_s) = recv(t, FrameKind::AuthConfirm)?;
    if !openssl::memcmp::eq(&keys.proof(Role::Source)?, &proof_s) {
        let _ = t.send_frame(FrameKind::Abort, &[Part::Buf(&payload::Abort::encode("authentication failed"))], None);
        return Err(AuthError::BadProof(Role::Source));
    }
    Ok(keys)
}

/// The pre-shared key bound to a destination identity: `HMAC-SHA-256(psk, "migaccel
/// destination " ‖ id)`. Both ends authenticate with it in place of the key file's key, so
/// a source that names another destination than the receiver's own fails at the
/// destination's proof, before it sends anything of the VM.
pub fn bind_destination(psk: &TransportKey, id: &str) -> Result<TransportKey, AuthError> {
    Ok(TransportKey(hmac(&psk.0, &[b"migaccel destination ", id.as_bytes()])?))
}

/// A fresh random key, for a source and destination in one process (demo, benches).
pub fn ephemeral_key() -> Result<TransportKey, AuthError> {
    Ok(TransportKey(random32()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::seal::Sealed;
    use crate::wire::transport::TcpTransport;
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    fn pair() -> (Box<dyn Transport>, Box<dyn Transport>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let t = Duration::from_secs(10);
        (Box::new(TcpTransport::new(a, t).unwrap()), Box::new(TcpTransport::new(b, t).unwrap()))
    }

    type Side = Result<(Box<dyn Transport>, SessionKeys), AuthError>;

    /// Run both sides; (source result, destination result).
    fn handshake(ks: TransportKey, kd: TransportKey) -> (Side, Side) {
        let (mut s, mut d) = pair();
        let dest = std::thread::spawn(move || destination(&mut *d, &kd).map(|k| (d, k)));
        // A source that fails drops (closes) its end: the destination stops waiting.
        let src = source(&mut *s, &ks).map(|k| (s, k));
        (src, dest.join().unwrap())
    }

    #[test]
    fn both_sides_derive_the_same_keys_and_fresh_ones_each_time() {
        let k = TransportKey([9; 32]);
        let (s, d) = handshake(k.clone(), k.clone());
        let ((ts, ks), (td, kd)) = (s.unwrap(), d.unwrap());
        let mut ts = Sealed::new(ts, ks.keys(Conn::Control).unwrap());
        let mut td = Sealed::new(td, kd.keys(Conn::Control).unwrap());
        ts.send_frame(
            FrameKind::Complete,
            &[Part::Buf(&payload::Complete { rounds: 3, sections: 2, pages_sent: 99 }.encode())],
            None,
        )
        .unwrap();
        let h = td.recv_header().unwrap();
        let mut p = vec![0u8; h.len as usize];
        td.recv_exact(&mut p).unwrap();
        assert_eq!(
            payload::Complete::decode(&p).unwrap(),
            payload::Complete { rounds: 3, sections: 2, pages_sent: 99 }
        );
        // A second session with the same key has other keys: its frames do not open the first's.
        let (s2, _) = handshake(k.clone(), k);
        let (_, ks2) = s2.unwrap();
        let (a, b) = (ks.keys(Conn::Data(0)).unwrap().0, ks2.keys(Conn::Data(0)).unwrap().0);
        assert!(a != b, "every session has its own keys");
        assert!(ks.keys(Conn::Data(0)).unwrap().0 != ks.keys(Conn::Data(1)).unwrap().0, "and every stream");
    }

    /// A header announcing a big frame where a handshake frame belongs is refused before
    /// a byte of it is read or allocated (a peer without the key must not make the
    /// receiver allocate and fill 16 MiB per handshake): the error comes at once, with the
    /// peer still connected and sending nothing more.
    #[test]
    fn oversized_handshake_frames_are_refused_unread() {
        use std::io::Write;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let mut d: Box<dyn Transport> = Box::new(TcpTransport::new(b, Duration::from_secs(600)).unwrap());
        a.write_all(&Header { kind: FrameKind::Pages, len: 16 << 20, seq: 0 }.encode()).unwrap();
        let e = destination(&mut *d, &TransportKey([9; 32])).unwrap_err();
        assert!(matches!(e, AuthError::Unexpected(FrameKind::Pages, FrameKind::AuthInit)), "{e}");
        let mut raw = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let mut d: Box<dyn Transport> = Box::new(TcpTransport::new(b, Duration::from_secs(600)).unwrap());
        raw.write_all(&Header { kind: FrameKind::AuthInit, len: 8, seq: 0 }.encode()).unwrap();
        let e = destination(&mut *d, &TransportKey([9; 32])).unwrap_err();
        assert!(e.to_string().contains("8 bytes, expected 72"), "{e}");
    }

    #[test]
    fn a_different_key_fails_on_both_sides() {
        let (s, d) = handshake(TransportKey([1; 32]), TransportKey([2; 32]));
        assert!(matches!(s, Err(AuthError::BadProof(Role::Destination))), "{:?}", s.err());
        assert!(d.is_err(), "the destination never completes a handshake with the wrong key");
    }
}
